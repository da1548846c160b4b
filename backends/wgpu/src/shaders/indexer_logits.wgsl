// The lightning indexer's logits over the paged FP8 index-k cache
// (spec-v32 §9.1, DeepGEMM fp8_paged_mqa_logits):
//   logits[(i, j), t] = (Σ_h relu(q[i, j, h]·k_t) · w[(i, j), h]) · s_t
// for t ≤ context_lens[i] − next_n + j, −inf elsewhere. One workgroup per
// (sequence i, tile of 64 columns), one invocation per column t: its key
// (D4 words of e4m3 bytes, decoded once into registers) and scale are read
// through the block table, then every query row j of the sequence and every
// head h is one f32 dot product (q decoded to f32 by pass 1, the same
// address in every invocation). Lengths are clamped into [0, cap] and block
// ids into [0, num_blocks): the check kernels report bad values, and tokens
// at or past a sequence's length are never read.
//
// A cache beyond the storage binding limit is bound in windows of blocks
// [blk_lo, blk_hi), one dispatch each: a dispatch computes the visible
// columns whose block lies in its window, and the first one also writes the
// −inf columns, so every element is written exactly once.
struct Params {
    next_n: u32,
    heads: u32,
    num_blocks: u32,
    block_size: u32,
    max_blocks: u32,
    max_len: u32,
    cap: u32,      // min(max_len, max_blocks · block_size)
    tiles: u32,    // ceil(max_len / 64)
    total: u32,    // workgroups
    blk_lo: u32,   // the window of the cache bound as `kv`
    blk_hi: u32,
    first: u32,    // 1: this dispatch writes the −inf columns
}

const TOK: u32 = 64u;

fn qf4(i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(b_qf[i], b_qf[i + 1u], b_qf[i + 2u], b_qf[i + 3u]));
}

fn per_workgroup(wg: u32, lid: u32) {
    if wg >= P.total {
        return;
    }
    let tile = wg % P.tiles;
    let b = wg / P.tiles;
    let t = tile * TOK + lid;
    if t >= P.max_len {
        return;
    }
    let lv = ldi_lens(b);
    var len = lv.x;
    if i64_is_negative(lv) {
        len = 0u;
    } else if lv.y != 0u || lv.x > P.cap {
        len = P.cap;
    }
    let d = D4 * 4u;
    var k: array<vec4<f32>, D4>;
    var s = 0.0;
    var mine = false;
    if t < len {
        let blk = i64_clamp_index(ldi_bt(b * P.max_blocks + t / P.block_size), P.num_blocks);
        mine = blk >= P.blk_lo && blk < P.blk_hi;
    }
    if mine {
        let blk = i64_clamp_index(ldi_bt(b * P.max_blocks + t / P.block_size), P.num_blocks);
        let off = t % P.block_size;
        let base = (blk - P.blk_lo) * P.block_size * (d + 4u);
        let kw = (base + off * d) / 4u;
        for (var c = 0u; c < D4; c = c + 1u) {
            let w = b_kv[kw + c];
            k[c] = vec4<f32>(
                e4m3_to_f32_sel(w & 0xffu, false),
                e4m3_to_f32_sel((w >> 8u) & 0xffu, false),
                e4m3_to_f32_sel((w >> 16u) & 0xffu, false),
                e4m3_to_f32_sel(w >> 24u, false)
            );
        }
        s = bitcast<f32>(b_kv[(base + P.block_size * d + off * 4u) / 4u]);
    }
    for (var j = 0u; j < P.next_n; j = j + 1u) {
        let row = b * P.next_n + j;
        var v = f32_inf(true);
        // This row sees t < len + j + 1 − next_n.
        let visible = t + P.next_n < len + j + 1u;
        if (visible && !mine) || (!visible && P.first == 0u) {
            continue;
        }
        if visible {
            var acc = 0.0;
            for (var h = 0u; h < P.heads; h = h + 1u) {
                let qb = (row * P.heads + h) * d;
                var dp = 0.0;
                for (var c = 0u; c < D4; c = c + 1u) {
                    dp = dp + dot(qf4(qb + 4u * c), k[c]);
                }
                acc = acc + max(dp, 0.0) * ld_w(row * P.heads + h);
            }
            v = acc * s;
        }
        stw_logits(row * P.max_len + t, bitcast<u32>(v));
    }
}
