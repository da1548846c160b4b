// Combine sums: out[t, c] = Σ over the entries p of token t (CSR: offs[t] ..
// offs[t+1]; entry p's row is record p, its weight w[wi[p]]) of y[p, c],
// times the weight when WEIGHTED; accumulated in f32 in entry order and
// rounded once to the output dtype. Records hold Y_DT elements from lane 0
// of word `off`. One invocation per output word.
//
// Windows: `out` holds tokens [t0, t0 + total / hidden); `offs` starts at
// token t0 - offs_sub, `recs` at word rec_base, `wi` at entry wi_base and
// `w` at weight index w_base (the host binds each from an aligned offset).
struct Params {
    total: u32,
    hidden: u32,
    stride: u32,
    off: u32,
    offs_sub: u32,
    rec_base: u32,
    wi_base: u32,
    w_base: u32,
}

fn y_at(rec: u32, c: u32) -> f32 {
    let per = dt_per_word(Y_DT);
    let word = b_recs[rec * P.stride + P.off + c / per - P.rec_base];
    return dt_decode(Y_DT, dt_lane(Y_DT, word, c));
}

// Output element i (one word per invocation: `Shader::per_word`).
fn lane(i: u32) -> u32 {
    let t = i / P.hidden + P.offs_sub;
    let c = i % P.hidden;
    var acc = 0.0;
    for (var p = b_offs[t]; p < b_offs[t + 1u]; p = p + 1u) {
        let y = y_at(p, c);
        if WEIGHTED {
            acc = acc + ld_w(b_wi[p - P.wi_base] - P.w_base) * y;
        } else {
            acc = acc + y;
        }
    }
    return enc_out(acc);
}
