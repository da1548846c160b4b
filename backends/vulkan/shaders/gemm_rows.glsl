// The FP8 block-scaled GEMMs (SPEC §3, DeepGEMM "NT") and the grouped plain
// GEMMs, one invocation per output element (simple, and fast enough on a
// CPU driver for the conformance shapes; the tiled `gemm.comp` serves the
// dense plain GEMM):
//   FP8 = 1:  d[r, j] = Σ_kb (Σ_{k ∈ kb} a[r, k] · b[g, j, k]) · sa[r, kb] · sb[g, j/128, kb]
//             (block sums in f32, exact for FP8 products; e4m3/e4m3fnuz
//             decoded by bit manipulation)
//   FP8 = 0:  d[r, j] = Σ_k a[r, k] · b[g, j, k] in f32
// MODE 0 dense (g = 0), 1 contiguous (g = m_indices[r]; -1: the row is
// written with zeros; a bad id: not written, the check kernel reports it), 2 masked
// (rows r ≥ masked_m[g] of group g are not written; masked_m clamped).
// Rows are global: masked rows count `g · m + r`. Operands beyond
// maxStorageBufferRange come in windows of whole groups [g0, g1): b and sb
// hold those groups only, and (masked) a, sa and d the rows from r0 on.
#include "common.glsl"
layout(constant_id = 2) const uint MODE = 0u;
layout(constant_id = 3) const uint FP8 = 1u;
layout(constant_id = 4) const uint A_DT = 3u;
layout(constant_id = 5) const uint B_DT = 3u;
layout(constant_id = 6) const uint D_DT = 0u;
layout(constant_id = 7) const uint IDX_DT = 5u;
layout(push_constant) uniform Push {
    uint m; uint n; uint k; uint kb; uint nb; uint rows; uint groups; uint g0; uint g1; uint r0;
} P;
#ifdef DP_STORAGE8
#include "f8.glsl"
layout(std430, set = 0, binding = 0) readonly buffer A { uint8_t a[]; };
#else
layout(std430, set = 0, binding = 0) readonly buffer A { uint a[]; };
#endif
layout(std430, set = 0, binding = 1) readonly buffer SA { uint sa[]; };
#ifdef DP_STORAGE8
layout(std430, set = 0, binding = 2) readonly buffer B { uint8_t b[]; };
#else
layout(std430, set = 0, binding = 2) readonly buffer B { uint b[]; };
#endif
layout(std430, set = 0, binding = 3) readonly buffer SB { uint sb[]; };
layout(std430, set = 0, binding = 4) readonly buffer I { uint idx[]; };
layout(std430, set = 0, binding = 5) buffer D { uint d[]; };

void store(uint i, float v) {
    if (dt_per_word(D_DT) == 1u) {
        d[i] = dt_encode(D_DT, v);
        return;
    }
    uint sh = (i % 2u) * 16u;
    atomicAnd(d[i / 2u], ~(0xffffu << sh));
    atomicOr(d[i / 2u], (dt_encode(D_DT, v) & 0xffffu) << sh);
}

void main() {
    uint i = inv_lin();
    if (i >= P.rows * P.n) return;
    uint r = P.r0 + i / P.n;
    uint j = i % P.n;
    uint g = 0u;
    if (MODE == 1u) {
        uvec2 id = LDI(idx, IDX_DT, r);
        // -1 marks a padding row: its output is unspecified; write 0 (as
        // cpu-ref does) so that no unwritten memory reaches a later op.
        if (id.x == 0xffffffffu && id.y == 0xffffffffu) {
            store((r - P.r0) * P.n + j, 0.0);
            return;
        }
        if (id.y != 0u || id.x >= P.groups) return;
        g = id.x;
    } else if (MODE == 2u) {
        g = r / P.m;
        uvec2 mm = LDI(idx, IDX_DT, g);
        uint lim = i64_is_negative(mm) ? 0u : (mm.y != 0u ? P.m : min(mm.x, P.m));
        if (r % P.m >= lim) return;
    }
    if (g < P.g0 || g >= P.g1) return;
    uint lr = r - P.r0;
    uint arow = lr * P.k;
    uint brow = ((g - P.g0) * P.n + j) * P.k;
    float acc = 0.0;
    if (FP8 == 1u) {
        uint sbrow = ((g - P.g0) * P.nb + j / 128u) * P.kb;
        for (uint kb = 0u; kb < P.kb; kb++) {
            uint k0 = kb * 128u;
            uint k1 = min(k0 + 128u, P.k);
            float part = 0.0;
            for (uint kk = k0; kk < k1; kk++) {
#ifdef DP_STORAGE8
                part += float(e4m3_to_f16(a[arow + kk], A_DT == DT_E4M3FNUZ)) * float(e4m3_to_f16(b[brow + kk], B_DT == DT_E4M3FNUZ));
#else
                part += LDF(a, A_DT, arow + kk) * LDF(b, B_DT, brow + kk);
#endif
            }
            acc += part * (uintBitsToFloat(sa[lr * P.kb + kb]) * uintBitsToFloat(sb[sbrow + kb]));
        }
    } else {
#ifndef DP_STORAGE8
        for (uint kk = 0u; kk < P.k; kk++) {
            acc += LDF(a, A_DT, arow + kk) * LDF(b, B_DT, brow + kk);
        }
#endif
    }
    store(lr * P.n + j, acc);
}
