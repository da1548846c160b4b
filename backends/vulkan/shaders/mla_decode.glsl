// MLA decode over a paged latent cache (SPEC §4, FlashMLA semantics), one
// workgroup (256) per (b, s, h) query row:
//   1. scores[t] = (q · k_t) · scale for the visible keys t (f32 dots),
//      written to a scratch row of `cap` floats;
//   2. m = max, e_t = exp(s_t - m), sum by workgroup reductions
//      (reduce.glsl: subgroup operations or a shared-memory tree);
//   3. out[c] = Σ_t e_t · k_t[c] / sum for c < dv (V = the first dv
//      channels of K); lse = m + ln(sum), +inf and zeros for empty rows.
// Lengths and block ids are clamped (mla_check reports bad ones), so
// nothing is read out of bounds. 16-bit outputs are merged into words with
// atomics (odd dv puts row boundaries inside words).
#include "common.glsl"
#define WG_RED 256u
#include "reduce.glsl"
layout(constant_id = 2) const uint Q_DT = 0u;
layout(constant_id = 3) const uint OUT_DT = 0u;
layout(constant_id = 4) const uint CAUSAL = 0u;
layout(push_constant) uniform Push {
    uint items; uint s_q; uint h_q; uint h_kv; uint d; uint dv; uint num_blocks; uint block_size;
    uint max_blocks; uint cap; float scale;
} P;
layout(std430, set = 0, binding = 0) readonly buffer Q { uint q[]; };
layout(std430, set = 0, binding = 1) readonly buffer K { uint kc[]; };
layout(std430, set = 0, binding = 2) readonly buffer BT { uint bt[]; };
layout(std430, set = 0, binding = 3) readonly buffer SL { uint sl[]; };
layout(std430, set = 0, binding = 4) buffer O { uint o[]; };
layout(std430, set = 0, binding = 5) buffer LSE { uint lse[]; };
layout(std430, set = 0, binding = 6) coherent buffer S { float sc[]; };

void store_out(uint i, float v) {
    if (dt_per_word(OUT_DT) == 1u) {
        o[i] = dt_encode(OUT_DT, v);
        return;
    }
    uint sh = (i % 2u) * 16u;
    atomicAnd(o[i / 2u], ~(0xffffu << sh));
    atomicOr(o[i / 2u], (dt_encode(OUT_DT, v) & 0xffffu) << sh);
}

// Element offset of key t's head kvh in the cache.
uint key_base(uint b, uint t, uint kvh) {
    uint blk = min(bt[b * P.max_blocks + t / P.block_size], P.num_blocks - 1u);
    if (int(bt[b * P.max_blocks + t / P.block_size]) < 0) blk = 0u;
    return ((blk * P.block_size + t % P.block_size) * P.h_kv + kvh) * P.d;
}

void main() {
    uint item = wg_lin();
    uint lid = gl_LocalInvocationID.x;
    if (item >= P.items) return;
    uint h = item % P.h_q;
    uint s = (item / P.h_q) % P.s_q;
    uint b = item / (P.h_q * P.s_q);
    uint kvh = h / (P.h_q / P.h_kv);
    int len = int(sl[b]);
    uint seqlen = uint(clamp(len, 0, int(P.cap)));
    uint visible = seqlen;
    if (CAUSAL == 1u) {
        uint back = P.s_q - 1u - s;
        visible = seqlen > back ? seqlen - back : 0u;
    }
    uint lse_i = (b * P.h_q + h) * P.s_q + s;
    if (visible == 0u) {
        for (uint c = lid; c < P.dv; c += 256u) store_out(item * P.dv + c, 0.0);
        if (lid == 0u) lse[lse_i] = floatBitsToUint(f32_inf(false));
        return;
    }
    uint row = item * P.cap;
    uint qb = item * P.d;
    // 1. scores
    float mx = f32_inf(true);
    for (uint t = lid; t < visible; t += 256u) {
        uint kb = key_base(b, t, kvh);
        float acc = 0.0;
        for (uint c = 0u; c < P.d; c++) acc += LDF(q, Q_DT, qb + c) * LDF(kc, Q_DT, kb + c);
        float v = acc * P.scale;
        sc[row + t] = v;
        mx = max(mx, v);
    }
    float m = dp_max(mx);
    // 2. exponentials and their sum
    float sum = 0.0;
    for (uint t = lid; t < visible; t += 256u) {
        float e = exp_f32(sc[row + t] - m);
        sc[row + t] = e;
        sum += e;
    }
    memoryBarrierBuffer();
    float total = dp_sum(sum);
    // 3. output
    for (uint c = lid; c < P.dv; c += 256u) {
        float acc = 0.0;
        for (uint t = 0u; t < visible; t++) acc += sc[row + t] * LDF(kc, Q_DT, key_base(b, t, kvh) + c);
        store_out(item * P.dv + c, div_rn(acc, total));
    }
    if (lid == 0u) lse[lse_i] = floatBitsToUint(m + log(total));
}
