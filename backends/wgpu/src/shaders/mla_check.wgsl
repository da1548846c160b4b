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

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = wg_lin(wid, nwg) * 256u + lid;
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
