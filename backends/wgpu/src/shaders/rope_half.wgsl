// RoPE on half-split pairs (x[i], x[i + d/2]) (`layout = half`, NeoX style;
// DeepSeek-V3.2's indexer rope): one output word per invocation
// (`per_word`), each element from its pair. The angle, sin and cos are
// computed as in rope.wgsl: f32(pos) · freq[i] in f32, `sincos_f32`, the
// YaRN cos/sin factor.
struct Params {
    n: u32,          // elements in this window
    d: u32,
    half_d: u32,
    per_token: u32,  // heads · d
    cs_scale: f32,
}

fn lane(e: u32) -> u32 {
    let t = e / P.per_token;
    let c = e % P.d;
    let row = e - c;
    let i = c % P.half_d;
    var pos = ldi_positions(t);
    if i64_is_negative(pos) {
        pos = vec2<u32>(0u, 0u); // reported by the check kernel
    }
    let angle = u64_to_f32(pos) * bitcast<f32>(b_freq[i]);
    let sc = sincos_f32(angle);
    let co = sc.y * P.cs_scale;
    let si = sc.x * P.cs_scale;
    let x0 = ld_x(row + i);
    let x1 = ld_x(row + i + P.half_d);
    var y: f32;
    if c < P.half_d {
        y = x0 * co - x1 * si;
    } else {
        y = x0 * si + x1 * co;
    }
    return enc_y(y);
}
