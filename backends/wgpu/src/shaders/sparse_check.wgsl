// sparse_mla_decode: flags the first index, among the slots each sequence
// uses (before its topk_length, clamped into [0, topk]), that is neither −1
// nor inside [0, slots). One invocation per element of `indices`.
struct Params {
    total: u32,   // b · s_q · topk
    topk: u32,
    s_q: u32,
    slots: u32,   // num_blocks · block_size
    has_len: u32,
    entry: u32,
}

fn per_invocation(e: u32) {
    if e >= P.total {
        return;
    }
    let t = e % P.topk;
    let b = e / (P.topk * P.s_q);
    var klen = P.topk;
    if P.has_len == 1u {
        let l = ldi_tl(b);
        if i64_is_negative(l) {
            klen = 0u;
        } else if l.y == 0u && l.x < P.topk {
            klen = l.x;
        }
    }
    if t >= klen {
        return;
    }
    let v = ldi_idx(e);
    if i64_eq(v, vec2<u32>(0xffffffffu, 0xffffffffu)) {
        return;
    }
    if i64_is_negative(v) || v.y != 0u || v.x >= P.slots {
        flag(P.entry, e);
    }
}
