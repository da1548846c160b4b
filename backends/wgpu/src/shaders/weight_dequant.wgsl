// out[i, j] = w[i, j] · s[i/128, j/128]: the f32 product (correctly rounded
// in WGSL), then one rounding to out's dtype. One invocation per output word.
// w and out may be windows of rows starting at row 128·`sblock` (s is whole).
struct Params {
    total: u32,
    k: u32,
    kb: u32,
    sblock: u32,
}

// Output element i (one word per invocation: `Shader::per_word`).
fn lane(i: u32) -> u32 {
    let r = i / P.k;
    let c = i % P.k;
    return enc_out(ld_w(i) * ld_s((r / 128u + P.sblock) * P.kb + c / 128u));
}
