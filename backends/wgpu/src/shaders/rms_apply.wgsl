// RMSNorm, pass 2: y = x · inv[row] · weight, one invocation per output word.
struct Params {
    total: u32,
    dim: u32,
}

// Output element i (one word per invocation: `Shader::per_word`).
fn lane(i: u32) -> u32 {
    let row = i / P.dim;
    let j = i % P.dim;
    return enc_y(ld_x(i) * bitcast<f32>(b_inv[row]) * ld_weight(j));
}
