// RMSNorm, pass 1: one workgroup per row computes inv = 1 / sqrt(mean(x²) + eps)
// in f32 (compensated per-invocation sums, then a tree reduction over the
// 256 partial sums; no subgroup operations, so any subgroup size works).
struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
}

var<workgroup> red: array<f32, 256>;

fn per_workgroup(row: u32, lid: u32) {
    if row >= P.rows {
        return;
    }
    let base = row * P.dim;
    var s = 0.0;
    var c = 0.0;
    for (var j = lid; j < P.dim; j = j + 256u) {
        let x = ld_x(base + j);
        let t = two_sum(s, x * x);
        s = t.x;
        c = c + t.y;
    }
    red[lid] = s + c;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h >> 1u) {
        if lid < h {
            red[lid] = red[lid] + red[lid + h];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let ms = div_rn(red[0], f32(P.dim));
        let inv = div_rn(1.0, sqrt(ms + P.eps));
        b_inv[row] = bitcast<u32>(inv);
    }
}
