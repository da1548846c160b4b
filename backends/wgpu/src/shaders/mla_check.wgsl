// mla_decode: flags the first block_table entry that a sequence uses (the
// first ⌈len/block_size⌉ of its row, len clamped into [0, capacity]) and
// that lies outside [0, num_blocks). One invocation per entry.
struct Params {
    total: u32,      // b · max_blocks
    max_blocks: u32,
    block_size: u32,
    num_blocks: u32,
    capacity: u32,
    entry: u32,
}

fn per_invocation(i: u32) {
    if i >= P.total {
        return;
    }
    let b = i / P.max_blocks;
    let j = i % P.max_blocks;
    let lv = ldi_lens(b);
    var len = lv.x;
    if i64_is_negative(lv) {
        len = 0u;
    } else if lv.y != 0u || lv.x > P.capacity {
        len = P.capacity;
    }
    let used = (len + P.block_size - 1u) / P.block_size;
    if j < used {
        let v = ldi_bt(i);
        if i64_is_negative(v) || v.y != 0u || v.x >= P.num_blocks {
            flag(P.entry, i);
        }
    }
}
