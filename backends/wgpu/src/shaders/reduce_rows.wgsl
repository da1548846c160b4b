// reduce_rows: out[t, c] = Σ_j w[t, j] · src[index[t, j], c], accumulated in
// f32 in j order (−1 skipped; an index outside [0, S) too, which the op's
// range check reports), rounded once to the output dtype. Without WEIGHTED
// every weight is 1 (the weights binding is a placeholder, never read).
// One invocation per output word (`Shader::per_word`).
//
// Windows: `out`, `index` and `weights` hold tokens [t0, t0 + total /
// hidden); `src` is bound from the aligned offset at or below its data,
// which starts at element `src_sub`.
struct Params {
    total: u32,
    hidden: u32,
    k: u32,
    src_rows: u32,
    src_sub: u32,
}

fn lane(i: u32) -> u32 {
    let t = i / P.hidden;
    let c = i % P.hidden;
    var acc = 0.0;
    for (var j = 0u; j < P.k; j = j + 1u) {
        let e = t * P.k + j;
        let id = ldi_index(e);
        if id.y != 0u || id.x >= P.src_rows {
            continue;
        }
        let y = ld_src(P.src_sub + id.x * P.hidden + c);
        if WEIGHTED {
            acc = acc + ld_weights(e) * y;
        } else {
            acc = acc + y;
        }
    }
    return enc_out(acc);
}
