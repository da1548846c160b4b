// cache_quant, pass 1: the scale of each quantization group (spec-v32 §9.4,
// `deepport_core::ops::cache_scale`): one invocation per group of `glen`
// values starting at `g · gstride` (index: the whole token; latent: 128
// latent channels of a token, 4 groups per 576-value token).
//   index:  s = max(amax, 1e-4) / 448, and its reciprocal 1/s;
//   latent: s = max(amax / 448, 1e-4);
// both divisions correctly rounded; UE8M0 rounds s up to a power of two.
// Writes (s, 1/s) as f32 bits to `sc[2g]`, `sc[2g + 1]`.
struct Params {
    groups: u32,
    glen: u32,
    per_token: u32,   // groups per token
    d: u32,           // values per token
    latent: u32,
    ue8m0: u32,
}

fn per_invocation(g: u32) {
    if g >= P.groups {
        return;
    }
    let base = (g / P.per_token) * P.d + (g % P.per_token) * P.glen;
    var amax = 0.0;
    for (var c = 0u; c < P.glen; c = c + 1u) {
        amax = max(amax, abs(ld_x(base + c)));
    }
    var s: f32;
    if P.latent == 1u {
        s = max(div_rn(amax, 448.0), 1e-4);
    } else {
        s = div_rn(max(amax, 1e-4), 448.0);
    }
    if P.ue8m0 == 1u {
        let b = bitcast<u32>(s);
        if (b & 0x7fffffu) != 0u {
            s = bitcast<f32>(((b >> 23u) + 1u) << 23u);
        }
    }
    b_sc[2u * g] = bitcast<u32>(s);
    b_sc[2u * g + 1u] = bitcast<u32>(div_rn(1.0, s));
}
