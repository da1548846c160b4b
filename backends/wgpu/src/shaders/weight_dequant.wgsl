// out[i, j] = w[i, j] · s[i/128, j/128]: the f32 product (correctly rounded
// in WGSL), then one rounding to out's dtype. One invocation per output word.
// w and out may be windows of rows starting at row 128·`sblock` (s is whole).
struct Params {
    total: u32,
    k: u32,
    kb: u32,
    sblock: u32,
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wg_lin(wid, nwg) * 256u + lid;
    let first = w * OUT_PER;
    if first >= P.total {
        return;
    }
    let bits = 32u / OUT_PER;
    let mask = dt_lane_mask(OUT_DT);
    var word = 0u;
    for (var l = 0u; l < OUT_PER; l = l + 1u) {
        let i = first + l;
        if i < P.total {
            let r = i / P.k;
            let c = i % P.k;
            let v = ld_w(i) * ld_s((r / 128u + P.sblock) * P.kb + c / 128u);
            word = word | ((enc_out(v) & mask) << (l * bits));
        }
    }
    stw_out(w, word);
}
