// cache_quant, pass 2: one invocation per 32-bit word of the cache, each of
// its 4 bytes from the layout (spec-v32 §9.4) and the scales of pass 1.
//   index (per block: block·d e4m3 bytes, token-major, then block f32
//     scales): q = e4m3(x · (1/s));
//   latent (per token: 512 e4m3 ‖ 4 f32 scales ‖ 64 bf16): q = e4m3(x / s)
//     (correctly rounded division), rope values rounded to bf16.
// e4m3 rounds to nearest even and saturates. Bytes past the tensor's end
// (the last word's padding) are 0.
struct Params {
    words: u32,
    bytes: u32,
    d: u32,
    block_size: u32,
    latent: u32,
}

fn byte_at(b: u32) -> u32 {
    if b >= P.bytes {
        return 0u;
    }
    if P.latent == 1u {
        let tok = b / 656u;
        let r = b % 656u;
        if r < 512u {
            let s = bitcast<f32>(b_sc[2u * (tok * 4u + r / 128u)]);
            return f32_to_e4m3(div_rn(ld_x(tok * 576u + r), s), false);
        }
        if r < 528u {
            let g = (r - 512u) / 4u;
            let bits = b_sc[2u * (tok * 4u + g)];
            return (bits >> (8u * ((r - 512u) % 4u))) & 0xffu;
        }
        let i = (r - 528u) / 2u;
        let h = f32_to_bf16(ld_x(tok * 576u + 512u + i));
        return (h >> (8u * ((r - 528u) % 2u))) & 0xffu;
    }
    let per_block = P.block_size * (P.d + 4u);
    let blk = b / per_block;
    let r = b % per_block;
    let keys = P.block_size * P.d;
    if r < keys {
        let tok = blk * P.block_size + r / P.d;
        let inv = bitcast<f32>(b_sc[2u * tok + 1u]);
        return f32_to_e4m3(ld_x(tok * P.d + r % P.d) * inv, false);
    }
    let tok = blk * P.block_size + (r - keys) / 4u;
    let bits = b_sc[2u * tok];
    return (bits >> (8u * ((r - keys) % 4u))) & 0xffu;
}

fn per_invocation(w: u32) {
    if w >= P.words {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < 4u; j = j + 1u) {
        word = word | (byte_at(4u * w + j) << (8u * j));
    }
    b_cache[w] = word;
}
