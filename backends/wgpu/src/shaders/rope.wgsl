// RoPE on interleaved pairs: one invocation per pair (x[2i], x[2i+1]).
// angle = f32(pos) · freq[i] in f32 (pos converted with round-to-nearest-
// even); sin and cos come from `sincos_f32` (exact range reduction), scaled
// by the YaRN cos/sin factor.
struct Params {
    pairs: u32,
    half_d: u32,
    pairs_per_token: u32,
    cs_scale: f32,
}

fn per_invocation(p: u32) {
    if p >= P.pairs {
        return;
    }
    let t = p / P.pairs_per_token;
    let i = p % P.half_d;
    var pos = ldi_positions(t);
    if i64_is_negative(pos) {
        pos = vec2<u32>(0u, 0u); // reported by the check kernel
    }
    let angle = u64_to_f32(pos) * bitcast<f32>(b_freq[i]);
    let sc = sincos_f32(angle);
    let c = sc.y * P.cs_scale;
    let s = sc.x * P.cs_scale;
    let x0 = ld_x(2u * p);
    let x1 = ld_x(2u * p + 1u);
    let y0 = x0 * c - x1 * s;
    let y1 = x0 * s + x1 * c;
    if Y_PER == 1u {
        stw_y(2u * p, enc_y(y0));
        stw_y(2u * p + 1u, enc_y(y1));
    } else {
        // 16-bit output: the pair is exactly one word.
        stw_y(p, (enc_y(y0) & 0xffffu) | (enc_y(y1) << 16u));
    }
}
