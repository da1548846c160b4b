// out[t, j] = table[ids[t], j]: one invocation per output word. Ids are
// clamped into the table (a check kernel reports bad ones); nothing is read
// out of bounds. When the table exceeds the storage binding limit it is
// bound in windows of rows [v0, v1), one dispatch each: lanes whose id lies
// outside the window keep what an earlier dispatch wrote (`partial`).
struct Params {
    total: u32,
    dim: u32,
    vocab: u32,
    v0: u32,
    v1: u32,
    partial: u32,
}

fn per_invocation(w: u32) {
    let first = w * OUT_PER;
    if first >= P.total {
        return;
    }
    let bits = 32u / OUT_PER;
    let mask = dt_lane_mask(OUT_DT);
    var word = 0u;
    if P.partial == 1u {
        word = ldw_out(w);
    }
    for (var l = 0u; l < OUT_PER; l = l + 1u) {
        let i = first + l;
        if i < P.total {
            let t = i / P.dim;
            let j = i % P.dim;
            var v = 0.0;
            if P.vocab > 0u {
                let id = i64_clamp_index(ldi_ids(t), P.vocab);
                if id < P.v0 || id >= P.v1 {
                    continue;
                }
                v = ld_table((id - P.v0) * P.dim + j);
            }
            let sh = l * bits;
            word = (word & ~(mask << sh)) | ((enc_out(v) & mask) << sh);
        }
    }
    stw_out(w, word);
}
