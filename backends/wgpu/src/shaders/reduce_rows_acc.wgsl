// reduce_rows when `src` exceeds one storage binding: entry j of every
// token is added to an f32 accumulator, one pass per (j, window of src
// rows), j ascending, so each element sums in j order as in
// `reduce_rows.wgsl`; `reduce_rows_out.wgsl` rounds once at the end. The
// first pass (`init`) starts from 0. One invocation per element.
//
// Windows: `acc`, `index` and `weights` hold tokens [t0, t0 + total /
// hidden); `src` holds rows [v0, v0 + count), row v0 at element `src_sub`.
struct Params {
    total: u32,
    hidden: u32,
    k: u32,
    j: u32,
    v0: u32,
    count: u32,
    src_sub: u32,
    init: u32,
}

fn per_invocation(i: u32) {
    if i >= P.total {
        return;
    }
    let t = i / P.hidden;
    let c = i % P.hidden;
    let e = t * P.k + P.j;
    var acc = 0.0;
    if P.init == 0u {
        acc = bitcast<f32>(b_acc[i]);
    }
    let id = ldi_index(e);
    // −1, ids outside [0, S) and rows outside the window (unsigned
    // wrap-around puts rows below v0 high) add nothing.
    let rel = id.x - P.v0;
    if id.y == 0u && rel < P.count {
        let y = ld_src(P.src_sub + rel * P.hidden + c);
        if WEIGHTED {
            acc = acc + ld_weights(e) * y;
        } else {
            acc = acc + y;
        }
    }
    b_acc[i] = bitcast<u32>(acc);
}
