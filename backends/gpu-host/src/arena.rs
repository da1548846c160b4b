//! Sub-allocation of tensors from a few large blocks: a first-fit free list
//! per block with coalescing. Plain Rust with no graphics API in it, unit
//! tested on any machine (the vulkan backend uses it; the wgpu backend
//! allocates one buffer per tensor).

use std::collections::BTreeMap;

/// Where an allocation lives: block index and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub block: usize,
    pub offset: u64,
    pub size: u64,
}

/// One block's free ranges (offset → size), coalesced.
#[derive(Debug)]
struct Block {
    size: u64,
    free: BTreeMap<u64, u64>,
}

/// A free-list allocator over blocks that the caller creates on request.
#[derive(Debug)]
pub struct Arena {
    blocks: Vec<Block>,
    /// Size of a regular block; larger requests get a block of their own.
    pub block_size: u64,
    align: u64,
}

/// What [`Arena::alloc`] needs from the caller: a new block of `size` bytes.
pub struct NeedBlock {
    pub size: u64,
}

impl Arena {
    /// An arena whose allocations are aligned to `align` (a power of two).
    pub fn new(block_size: u64, align: u64) -> Self {
        Self {
            blocks: Vec::new(),
            block_size,
            align: align.max(1).next_power_of_two(),
        }
    }

    /// Number of blocks created so far.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    fn round(&self, size: u64) -> Option<u64> {
        size.max(1)
            .checked_add(self.align - 1)
            .map(|s| s & !(self.align - 1))
    }

    /// A slot of `size` bytes from the existing blocks, or `Err(NeedBlock)`
    /// with the size of the block to add (then call [`Arena::add_block`]
    /// and retry). `None` when the size overflows.
    pub fn alloc(&mut self, size: u64) -> Option<Result<Slot, NeedBlock>> {
        let size = self.round(size)?;
        for (b, blk) in self.blocks.iter_mut().enumerate() {
            let hit = blk
                .free
                .iter()
                .find(|(_, &s)| s >= size)
                .map(|(&o, &s)| (o, s));
            if let Some((o, s)) = hit {
                blk.free.remove(&o);
                if s > size {
                    blk.free.insert(o + size, s - size);
                }
                return Some(Ok(Slot {
                    block: b,
                    offset: o,
                    size,
                }));
            }
        }
        Some(Err(NeedBlock {
            size: size.max(self.block_size),
        }))
    }

    /// Registers a new block of `size` bytes (entirely free); returns its index.
    pub fn add_block(&mut self, size: u64) -> usize {
        let mut free = BTreeMap::new();
        free.insert(0, size);
        self.blocks.push(Block { size, free });
        self.blocks.len() - 1
    }

    /// Returns a slot to its block, merging it with free neighbours.
    pub fn free(&mut self, slot: Slot) {
        let Some(blk) = self.blocks.get_mut(slot.block) else {
            return;
        };
        let (mut o, mut s) = (slot.offset, slot.size);
        if let Some((&po, &ps)) = blk.free.range(..o).next_back() {
            if po + ps == o {
                blk.free.remove(&po);
                o = po;
                s += ps;
            }
        }
        if let Some(&ns) = blk.free.get(&(o + s)) {
            blk.free.remove(&(o + s));
            s += ns;
        }
        blk.free.insert(o, s);
    }

    /// Bytes free in block `b` (tests).
    pub fn free_bytes(&self, b: usize) -> u64 {
        self.blocks
            .get(b)
            .map(|k| k.free.values().sum())
            .unwrap_or(0)
    }

    /// Size of block `b`.
    pub fn block_bytes(&self, b: usize) -> u64 {
        self.blocks.get(b).map(|k| k.size).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(a: &mut Arena, n: u64) -> Slot {
        loop {
            match a.alloc(n).expect("no overflow") {
                Ok(s) => return s,
                Err(NeedBlock { size }) => {
                    a.add_block(size);
                }
            }
        }
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_coalesce() {
        let mut a = Arena::new(1024, 64);
        let x = take(&mut a, 10);
        let y = take(&mut a, 100);
        let z = take(&mut a, 64);
        assert_eq!(a.blocks(), 1);
        assert_eq!((x.offset, y.offset, z.offset), (0, 64, 192));
        assert_eq!(y.size, 128);
        a.free(y);
        // A hole of 128 bytes is reused first-fit.
        let w = take(&mut a, 128);
        assert_eq!(w.offset, 64);
        a.free(x);
        a.free(w);
        a.free(z);
        assert_eq!(a.free_bytes(0), 1024, "all ranges merged back");
        let big = take(&mut a, 1024);
        assert_eq!((big.block, big.offset), (0, 0));
    }

    #[test]
    fn large_requests_get_their_own_block() {
        let mut a = Arena::new(1024, 16);
        let s = take(&mut a, 5000);
        assert_eq!(a.blocks(), 1);
        assert_eq!(a.block_bytes(0), 5008);
        assert_eq!(s.size, 5008);
        let t = take(&mut a, 16);
        assert_eq!(t.block, 1, "a full block forces a new one");
        assert!(a.alloc(u64::MAX).is_none());
    }
}
