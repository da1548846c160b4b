// mla_prefill: strided copy into an f32 scratch buffer,
//   dst[d0 + i0·ds0 + i1·ds1 + c] = src[s0 + i0·ss0 + i1·ss1 + c]
// for i0 < n0, i1 < n1, c < cols (decoded to f32, exact). One invocation
// per element.
struct Params {
    n1: u32,
    cols: u32,
    total: u32, // n0 · n1 · cols
    s0: u32,
    ss0: u32,
    ss1: u32,
    d0: u32,
    ds0: u32,
    ds1: u32,
}

fn per_invocation(i: u32) {
    if i >= P.total {
        return;
    }
    let c = i % P.cols;
    let rest = i / P.cols;
    let i1 = rest % P.n1;
    let i0 = rest / P.n1;
    let v = ld_src(P.s0 + i0 * P.ss0 + i1 * P.ss1 + c);
    b_dst[P.d0 + i0 * P.ds0 + i1 * P.ds1 + c] = bitcast<u32>(v);
}
