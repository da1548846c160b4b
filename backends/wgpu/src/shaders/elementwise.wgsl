// add (OP = 0) and silu_mul (OP = 1): one invocation per output word, so
// packed 16-bit outputs need no atomics. `add` rounds the exact sum once
// (`add_round`); silu_mul computes in f32.
struct Params {
    n: u32,
}

fn silu_mul(g: f32, u: f32) -> f32 {
    // g · sigmoid(g) as one correctly rounded division, then · u.
    return div_rn(g, 1.0 + exp_f32(-g)) * u;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wg_lin(wid, nwg) * 256u + lid;
    let first = w * OUT_PER;
    if first >= P.n {
        return;
    }
    let bits = 32u / OUT_PER;
    let mask = dt_lane_mask(OUT_DT);
    var word = 0u;
    for (var l = 0u; l < OUT_PER; l = l + 1u) {
        let i = first + l;
        if i < P.n {
            let a = ld_a(i);
            let b = ld_b(i);
            var lane: u32;
            if OP == 0u {
                lane = add_round(a, b, OUT_DT);
            } else {
                lane = enc_out(silu_mul(a, b));
            }
            word = word | ((lane & mask) << (l * bits));
        }
    }
    stw_out(w, word);
}
