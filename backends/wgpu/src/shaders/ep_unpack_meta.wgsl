// The routing part of a received normal-dispatch record: global expert ids
// become local ids (i64) or −1 when the expert lives on another rank, the
// weights are copied bit-exact there and 0 elsewhere, and each distinct
// local expert of the row counts once in `counts` (zeroed beforehand). One
// invocation per received row. Rows may be a window: `recs` holds its
// records, and `idx` / `wts` start idx_sub / w_sub words before its first
// entry (they are bound from aligned offsets).
struct Params {
    rows: u32,
    k: u32,
    stride: u32,
    id_off: u32,
    w_off: u32,
    lo: u32,
    epr: u32,
    idx_sub: u32,
    w_sub: u32,
}

fn per_invocation(r: u32) {
    if r >= P.rows {
        return;
    }
    let base = r * P.stride;
    for (var j = 0u; j < P.k; j = j + 1u) {
        let g = b_recs[base + P.id_off + j];
        let o = r * P.k + j;
        // Unsigned wrap-around: ids below lo (and −1) land far above epr.
        let l = g - P.lo;
        if l < P.epr {
            b_idx[2u * o + P.idx_sub] = l;
            b_idx[2u * o + 1u + P.idx_sub] = 0u;
            b_wts[o + P.w_sub] = b_recs[base + P.w_off + j];
            var dup = false;
            for (var q = 0u; q < j; q = q + 1u) {
                if b_recs[base + P.id_off + q] == g {
                    dup = true;
                }
            }
            if !dup {
                atomicAdd(&b_counts[l], 1u);
            }
        } else {
            b_idx[2u * o + P.idx_sub] = 0xffffffffu;
            b_idx[2u * o + 1u + P.idx_sub] = 0xffffffffu;
            b_wts[o + P.w_sub] = 0u;
        }
    }
}
