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

// Output element i (one word per invocation: `Shader::per_word`).
fn lane(i: u32) -> u32 {
    let a = ld_a(i);
    let b = ld_b(i);
    if OP == 0u {
        return add_round(a, b, OUT_DT);
    }
    return enc_out(silu_mul(a, b));
}
