//! Split-K partitions of MLA decode (FlashMLA's metadata rules).
//!
//! MLA decode runs one CTA per (SM part, kv head, row tile). Each SM part
//! walks a list of *splits*: a split is a contiguous range of KV blocks of
//! one batch. A batch whose blocks all land in one part has one split; a
//! batch cut at part boundaries has several. Every split writes a partial
//! output and its log-sum-exp to scratch (slot = the split's index in the
//! global split list, which is ordered by batch, then by block), and the
//! combine kernel merges the splits of each batch in slot order — a fixed
//! order, so the result does not depend on which CTA ran first.
//!
//! # The rule (FlashMLA's balance rule, restated)
//!
//! With `n_i = ⌈len_i / block_size⌉` blocks for batch `i` and a fixed
//! cost of [`OVERHEAD_BLOCKS`] blocks per split (loading Q, writing the
//! partial, the combine's read):
//!
//! * total cost `C = Σ_i (n_i + OVERHEAD)`, payload per part
//!   `P = ⌈C / parts⌉ + OVERHEAD`;
//! * the parts are filled in order, batches in order: a part with
//!   remaining capacity `cap` *finishes* the current batch when its
//!   remaining `r` blocks satisfy `r + OVERHEAD ≤ cap` (it emits the split
//!   `[cur, n_i)` when `r > 0`, and `cap -= r + OVERHEAD`); otherwise it
//!   takes `cap − OVERHEAD` blocks when that is positive (a split that
//!   cuts the batch) and is full;
//! * the last part takes whatever remains (never needed when the rule's
//!   arithmetic holds — `parts · P ≥ C + parts · OVERHEAD` covers one cut
//!   or one wasted overhead per part — but it makes coverage
//!   unconditional).
//!
//! A zero-length batch costs `OVERHEAD` and produces no split; the combine
//! kernel writes its rows as `out = 0`, `lse = +inf` (SPEC §4).
//!
//! # Where the rule runs
//!
//! `cache_seqlens` lives on the device and the op contract has no host
//! copy (a download would synchronise the stream). So the same rule runs
//! on the device in the `mla_metadata` kernel (`kernels/mla.cu`, one CTA,
//! serial sweep on one thread — the sweep is O(b + parts)), writing the
//! [`MetaLayout`] buffer. [`plan`] here is its specification, tested on
//! the CPU; the kernel is a line-by-line transcription of it. The host
//! knows statically only the bound `b + parts` on the number of splits,
//! which sizes the scratch buffers.

/// The fixed cost of one split, in KV blocks (FlashMLA uses the same value).
pub const OVERHEAD_BLOCKS: u32 = 5;

/// One split: blocks `[blk_lo, blk_hi)` of batch `batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub batch: u32,
    pub blk_lo: u32,
    pub blk_hi: u32,
}

/// A split-K plan: the split list (ordered by batch, then block), each
/// part's range of splits, and each batch's range of splits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub splits: Vec<Split>,
    /// `parts + 1` offsets: part `p` runs `splits[part_ptr[p]..part_ptr[p+1]]`.
    pub part_ptr: Vec<u32>,
    /// `batch + 1` offsets: batch `i`'s splits (= partial slots) are
    /// `split_ptr[i]..split_ptr[i+1]`.
    pub split_ptr: Vec<u32>,
}

impl Plan {
    /// The number of splits of batch `i`.
    pub fn num_splits(&self, i: usize) -> u32 {
        self.split_ptr[i + 1] - self.split_ptr[i]
    }
}

/// KV blocks of a sequence of `len` tokens.
pub fn blocks_of(len: u32, block_size: u32) -> u32 {
    len.div_ceil(block_size.max(1))
}

/// The most splits any plan over `batch` batches and `parts` parts holds
/// (each part cuts at most one batch once): sizes the partial buffers.
pub fn max_splits(batch: usize, parts: usize) -> usize {
    batch + parts
}

/// The split plan for per-batch block counts `nblk` over `parts` parts
/// (the rule in the module docs). `parts` is at least 1.
pub fn plan(nblk: &[u32], parts: usize) -> Plan {
    let parts = parts.max(1);
    let ov = u64::from(OVERHEAD_BLOCKS);
    let total: u64 = nblk.iter().map(|&n| u64::from(n) + ov).sum();
    let payload = total.div_ceil(parts as u64) + ov;
    let mut splits = Vec::with_capacity(max_splits(nblk.len(), parts));
    let mut part_ptr = Vec::with_capacity(parts + 1);
    let (mut i, mut cur) = (0usize, 0u32);
    for p in 0..parts {
        part_ptr.push(splits.len() as u32);
        let last = p + 1 == parts;
        let mut cap = payload;
        while i < nblk.len() {
            let rem = nblk[i] - cur;
            if last || u64::from(rem) + ov <= cap {
                if rem > 0 {
                    splits.push(Split {
                        batch: i as u32,
                        blk_lo: cur,
                        blk_hi: nblk[i],
                    });
                }
                cap = cap.saturating_sub(u64::from(rem) + ov);
                i += 1;
                cur = 0;
            } else {
                if cap > ov {
                    // rem + ov > cap, so take < rem: a proper cut.
                    let take = (cap - ov) as u32;
                    splits.push(Split {
                        batch: i as u32,
                        blk_lo: cur,
                        blk_hi: cur + take,
                    });
                    cur += take;
                }
                break;
            }
        }
    }
    part_ptr.push(splits.len() as u32);
    let mut split_ptr = vec![0u32; nblk.len() + 1];
    for s in &splits {
        split_ptr[s.batch as usize + 1] += 1;
    }
    for b in 0..nblk.len() {
        split_ptr[b + 1] += split_ptr[b];
    }
    Plan {
        splits,
        part_ptr,
        split_ptr,
    }
}

/// Rows of a decode CTA tile: query rows `(s, h)` that share one kv head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeGeometry {
    /// SM parts (grid.x of the split kernel).
    pub parts: u32,
    /// Query rows per kv head: `s_q · (h_q / h_kv)`.
    pub rows: u32,
    /// Rows one CTA handles.
    pub tile_rows: u32,
    /// Row tiles per kv head (grid.z of the split kernel).
    pub row_tiles: u32,
    /// Partial slots (`b + parts`).
    pub slots: u32,
}

/// CUDA's grid limits: x < 2^31, y and z ≤ 65535.
pub const GRID_X_MAX: u64 = (1 << 31) - 1;
pub const GRID_YZ_MAX: u64 = 65535;

/// FlashMLA's part count: the SMs divided among the (kv head, row tile)
/// CTAs that each part needs, at least 1. Fails (returns `None`) when a
/// grid dimension or a 32-bit row count would overflow.
pub fn decode_geometry(
    sms: u32,
    batch: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    tile_rows: u32,
) -> Option<DecodeGeometry> {
    if h_kv == 0 || tile_rows == 0 {
        return None;
    }
    let rows = s_q.checked_mul(h_q / h_kv)?;
    let row_tiles = rows.div_ceil(tile_rows as usize);
    if h_kv as u64 > GRID_YZ_MAX || row_tiles as u64 > GRID_YZ_MAX {
        return None;
    }
    let per_part = (h_kv * row_tiles).max(1);
    let parts = (sms as usize / per_part).max(1);
    let slots = max_splits(batch, parts);
    // Every partial row index (slot · s_q · h_q + row) must fit in 32 bits
    // of row count; element offsets are 64-bit in the kernels.
    let total_rows = slots.checked_mul(s_q)?.checked_mul(h_q)?;
    if total_rows as u64 > u64::from(u32::MAX) || slots as u64 > GRID_X_MAX {
        return None;
    }
    Some(DecodeGeometry {
        parts: parts as u32,
        rows: u32::try_from(rows).ok()?,
        tile_rows,
        row_tiles: row_tiles as u32,
        slots: slots as u32,
    })
}

/// The i32 metadata buffer written by `mla_metadata` (offsets in i32
/// elements): `part_ptr[parts+1]`, `split_ptr[b+1]`, then
/// `splits[b+parts][4]` (batch, blk_lo, blk_hi, 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaLayout {
    pub part_ptr: usize,
    pub split_ptr: usize,
    pub splits: usize,
    pub len: usize,
}

impl MetaLayout {
    pub fn new(batch: usize, parts: usize) -> Self {
        let part_ptr = 0;
        let split_ptr = parts + 1;
        let splits = split_ptr + batch + 1;
        let len = splits + 4 * max_splits(batch, parts);
        Self {
            part_ptr,
            split_ptr,
            splits,
            len,
        }
    }

    /// The buffer `mla_metadata` writes for `plan` (for tests and for a
    /// host-side fallback).
    pub fn encode(&self, plan: &Plan) -> Vec<i32> {
        let mut v = vec![0i32; self.len];
        for (k, &x) in plan.part_ptr.iter().enumerate() {
            v[self.part_ptr + k] = x as i32;
        }
        for (k, &x) in plan.split_ptr.iter().enumerate() {
            v[self.split_ptr + k] = x as i32;
        }
        for (k, s) in plan.splits.iter().enumerate() {
            let o = self.splits + 4 * k;
            v[o] = s.batch as i32;
            v[o + 1] = s.blk_lo as i32;
            v[o + 2] = s.blk_hi as i32;
        }
        v
    }
}

/// The combine's merge of per-split `(lse, partial out)` for one row, in
/// slot order — the arithmetic `mla_combine` performs, in f32. Returns
/// `(out, lse)`; no splits or all-empty splits give `(0, +inf)`.
pub fn combine_row(parts: &[(f32, &[f32])], dv: usize) -> (Vec<f32>, f32) {
    let m = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return (vec![0.0; dv], f32::INFINITY);
    }
    let mut sum = 0.0f32;
    for p in parts {
        sum += (p.0 - m).exp();
    }
    let mut out = vec![0.0f32; dv];
    for p in parts {
        let w = (p.0 - m).exp() / sum;
        if w == 0.0 {
            continue; // an empty split's partial is never read
        }
        for (o, &x) in out.iter_mut().zip(p.1) {
            *o += w * x;
        }
    }
    (out, m + sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut s = seed | 1;
        move |n| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n.max(1)
        }
    }

    /// Every block of every batch exactly once, splits contiguous and in
    /// (batch, block) order, part and batch pointers consistent, bound on
    /// the split count respected.
    fn check(nblk: &[u32], parts: usize) -> Plan {
        let p = plan(nblk, parts);
        assert_eq!(p.part_ptr.len(), parts.max(1) + 1);
        assert_eq!(p.part_ptr[0], 0);
        assert_eq!(*p.part_ptr.last().unwrap() as usize, p.splits.len());
        assert!(p.part_ptr.windows(2).all(|w| w[0] <= w[1]));
        assert!(p.splits.len() <= max_splits(nblk.len(), parts.max(1)));
        let mut next = vec![0u32; nblk.len()];
        let mut prev: Option<Split> = None;
        for s in &p.splits {
            assert!(s.blk_lo < s.blk_hi, "empty split {s:?}");
            assert_eq!(next[s.batch as usize], s.blk_lo, "gap or overlap at {s:?}");
            next[s.batch as usize] = s.blk_hi;
            if let Some(q) = prev {
                assert!((q.batch, q.blk_lo) < (s.batch, s.blk_lo), "order");
            }
            prev = Some(*s);
        }
        assert_eq!(next, nblk, "every block assigned");
        for (i, &n) in nblk.iter().enumerate() {
            let r = p.split_ptr[i] as usize..p.split_ptr[i + 1] as usize;
            assert!(p.splits[r.clone()].iter().all(|s| s.batch == i as u32));
            assert_eq!(r.is_empty(), n == 0, "batch {i}: splits iff blocks");
        }
        p
    }

    #[test]
    fn small_cases() {
        let p = check(&[4], 1);
        assert_eq!(
            p.splits,
            vec![Split {
                batch: 0,
                blk_lo: 0,
                blk_hi: 4
            }]
        );
        // One long sequence over 4 parts is cut into 4 nearly equal pieces.
        let p = check(&[100], 4);
        assert_eq!(p.splits.len(), 4);
        assert_eq!(p.num_splits(0), 4);
        let sizes: Vec<u32> = p.splits.iter().map(|s| s.blk_hi - s.blk_lo).collect();
        // payload = ⌈105 / 4⌉ + 5 = 32: three cuts of 32 − 5 blocks, the rest last.
        assert_eq!(sizes, vec![27, 27, 27, 19]);
        // Zero-length batches: no split, no work, pointers still defined.
        let p = check(&[0, 3, 0, 0, 2], 3);
        assert_eq!(p.num_splits(0), 0);
        assert_eq!(p.num_splits(2), 0);
        assert_eq!(p.num_splits(1), 1);
        let p = check(&[0, 0, 0], 8);
        assert!(p.splits.is_empty());
        let p = check(&[], 4);
        assert!(p.splits.is_empty() && p.split_ptr == vec![0]);
    }

    #[test]
    fn batches_and_lengths_grid() {
        let mut r = rng(0x5eed);
        for &b in &[1usize, 16, 64, 128] {
            for &s_k in &[1u32, 20, 140, 4096, 32768] {
                for &bs in &[64u32, 16] {
                    for &parts in &[1usize, 2, 8, 66, 132] {
                        // fixed length and varlen max(N(s_k, s_k/2), 1) with zeros
                        let fixed: Vec<u32> = vec![blocks_of(s_k, bs); b];
                        check(&fixed, parts);
                        let var: Vec<u32> = (0..b)
                            .map(|_| {
                                let len = if r(5) == 0 {
                                    0
                                } else {
                                    (s_k / 2 + r(u64::from(s_k)) as u32).min(s_k)
                                };
                                blocks_of(len, bs)
                            })
                            .collect();
                        check(&var, parts);
                    }
                }
            }
        }
    }

    /// The balance the rule promises: no part exceeds the payload (except
    /// the last part's catch-all, which must take nothing here).
    #[test]
    fn balanced_and_catch_all_unused() {
        let mut r = rng(7);
        for _ in 0..300 {
            let b = 1 + r(130) as usize;
            let parts = 1 + r(140) as usize;
            let nblk: Vec<u32> = (0..b).map(|_| r(600) as u32).collect();
            let p = check(&nblk, parts);
            let ov = u64::from(OVERHEAD_BLOCKS);
            let total: u64 = nblk.iter().map(|&n| u64::from(n) + ov).sum();
            let payload = total.div_ceil(parts as u64) + ov;
            for k in 0..parts {
                let cost: u64 = p.splits[p.part_ptr[k] as usize..p.part_ptr[k + 1] as usize]
                    .iter()
                    .map(|s| u64::from(s.blk_hi - s.blk_lo) + ov)
                    .sum();
                assert!(
                    cost <= payload,
                    "part {k}: {cost} > {payload} ({nblk:?}, {parts})"
                );
            }
        }
    }

    #[test]
    fn deterministic() {
        let nblk = [7u32, 0, 513, 64, 1, 0, 200];
        assert_eq!(plan(&nblk, 13), plan(&nblk, 13));
    }

    /// The buffer `mla_metadata` (kernels/mla.cu) writes for this case
    /// under host emulation (`emu/mla_decode.cpp` checks it): the
    /// device transcription of the rule must agree with [`plan`] exactly.
    #[test]
    fn device_metadata_matches_plan() {
        let lens = [100u32, 0, 8200, 1000, 1, 0, 3200];
        let nblk: Vec<u32> = lens.iter().map(|&l| blocks_of(l, 16)).collect();
        assert_eq!(nblk, vec![7, 0, 513, 63, 1, 0, 200]);
        let device: Vec<i32> = vec![
            0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14, 15, 16, 17, 0, 1, 1, 10, 12, 13, 13, 17, 0, 0, 7, 0,
            2, 0, 46, 0, 2, 46, 109, 0, 2, 109, 172, 0, 2, 172, 235, 0, 2, 235, 298, 0, 2, 298,
            361, 0, 2, 361, 424, 0, 2, 424, 487, 0, 2, 487, 513, 0, 3, 0, 32, 0, 3, 32, 63, 0, 4,
            0, 1, 0, 6, 0, 16, 0, 6, 16, 79, 0, 6, 79, 142, 0, 6, 142, 200, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0,
        ];
        let layout = MetaLayout::new(7, 13);
        assert_eq!(layout.encode(&plan(&nblk, 13)), device);
    }

    #[test]
    fn metadata_encoding() {
        let nblk = [3u32, 0, 40];
        let p = plan(&nblk, 4);
        let l = MetaLayout::new(3, 4);
        assert_eq!(l.len, 5 + 4 + 4 * 7);
        let v = l.encode(&p);
        assert_eq!(v[l.split_ptr + 3] as usize, p.splits.len());
        let last = p.splits.len() - 1;
        assert_eq!(v[l.splits + 4 * last + 2], 40);
        assert_eq!(v[l.part_ptr + 4] as usize, p.splits.len());
    }

    #[test]
    fn geometry() {
        // DeepSeek decode: h_q 128, h_kv 1, s_q 1, 8-row tiles, 132 SMs.
        let g = decode_geometry(132, 64, 1, 128, 1, 8).unwrap();
        assert_eq!(g.row_tiles, 16);
        assert_eq!(g.parts, 8);
        assert_eq!(g.slots, 72);
        // 64-row tiles (the wgmma path), s_q 2: 4 tiles, 33 parts.
        let g = decode_geometry(132, 128, 2, 128, 1, 64).unwrap();
        assert_eq!((g.row_tiles, g.parts), (4, 33));
        // more CTAs per part than SMs: still one part
        let g = decode_geometry(4, 1, 4, 126, 3, 8).unwrap();
        assert_eq!(g.parts, 1);
        assert_eq!(g.rows, 4 * 42);
        // grid limits
        assert!(decode_geometry(132, 1, 1, 70000, 70000, 8).is_none());
        assert!(decode_geometry(132, 1, 1 << 20, 1 << 10, 1, 1).is_none());
        assert!(decode_geometry(132, 1, 1, 8, 0, 8).is_none());
    }

    #[test]
    fn combine_is_softmax_of_parts() {
        // two halves of one softmax merge into the whole
        let s = [0.5f32, -1.0, 2.0, 0.25];
        let v = [[1.0f32, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 4.0]];
        let half = |r: std::ops::Range<usize>| {
            let m = s[r.clone()]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let l: f32 = s[r.clone()].iter().map(|x| (x - m).exp()).sum();
            let mut o = [0.0f32; 2];
            for t in r {
                for c in 0..2 {
                    o[c] += (s[t] - m).exp() / l * v[t][c];
                }
            }
            (m + l.ln(), o)
        };
        let (l0, o0) = half(0..2);
        let (l1, o1) = half(2..4);
        let (o, l) = combine_row(&[(l0, &o0), (l1, &o1)], 2);
        let (lw, ow) = half(0..4);
        assert!((l - lw).abs() < 1e-5);
        assert!((o[0] - ow[0]).abs() < 1e-5 && (o[1] - ow[1]).abs() < 1e-5);
        // empty splits and no splits
        let nan = [f32::NAN, f32::NAN];
        let (o, l) = combine_row(&[(f32::NEG_INFINITY, &nan), (l0, &o0)], 2);
        assert!(o.iter().all(|x| x.is_finite()) && (l - l0).abs() < 1e-6);
        let (o, l) = combine_row(&[], 2);
        assert_eq!((o, l), (vec![0.0, 0.0], f32::INFINITY));
    }
}
