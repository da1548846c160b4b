// RMSNorm, pass 2: y = x · inv[row] · weight, one invocation per output word.
struct Params {
    total: u32,
    dim: u32,
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wg_lin(wid, nwg) * 256u + lid;
    let first = w * Y_PER;
    if first >= P.total {
        return;
    }
    let bits = 32u / Y_PER;
    let mask = dt_lane_mask(Y_DT);
    var word = 0u;
    for (var l = 0u; l < Y_PER; l = l + 1u) {
        let i = first + l;
        if i < P.total {
            let row = i / P.dim;
            let j = i % P.dim;
            let v = ld_x(i) * bitcast<f32>(b_inv[row]) * ld_weight(j);
            word = word | ((enc_y(v) & mask) << (l * bits));
        }
    }
    stw_y(w, word);
}
