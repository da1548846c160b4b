#version 450
#extension GL_GOOGLE_include_directive : require
// Plain "NT" GEMM, d[m, n] = Σ_k a[m, k] · b[n, k], f32 accumulation, one
// rounding to d's dtype (bf16 and f16 operands decoded by bit manipulation).
// 64×64 output tiles, 16-deep K slices staged (as f32) in shared memory,
// 4×4 outputs per invocation (workgroup 256). Partial tiles are
// zero-padded; nothing is read out of bounds. 16-bit outputs are merged
// into their word with atomicAnd/atomicOr (odd n puts row and tile
// boundaries inside words; the halves are disjoint, so the atomics commute).
// `a_off`, `b_off`, `d_off` (elements) and `ldd` let grouped GEMMs reuse it.
#include "common.glsl"
layout(constant_id = 2) const uint A_DT = 0u;
layout(constant_id = 3) const uint B_DT = 0u;
layout(constant_id = 4) const uint D_DT = 0u;
layout(push_constant) uniform Push {
    uint m; uint n; uint k; uint tiles_n; uint tiles; uint ldd; uint a_off; uint b_off; uint d_off;
} P;
layout(std430, set = 0, binding = 0) readonly buffer A { uint a[]; };
layout(std430, set = 0, binding = 1) readonly buffer B { uint b[]; };
layout(std430, set = 0, binding = 2) buffer D { uint d[]; };
shared float As[1024];
shared float Bs[1024];

void store(uint i, float v) {
    uint per = dt_per_word(D_DT);
    if (per == 1u) {
        d[i] = floatBitsToUint(v);
        return;
    }
    uint sh = (i % 2u) * 16u;
    uint bits = dt_encode(D_DT, v) & 0xffffu;
    atomicAnd(d[i / 2u], ~(0xffffu << sh));
    atomicOr(d[i / 2u], bits << sh);
}

void store_row(uint r, uint c0, vec4 v) {
    if (r >= P.m) return;
    for (uint j = 0u; j < 4u; j++) {
        if (c0 + j < P.n) store(P.d_off + r * P.ldd + c0 + j, v[j]);
    }
}

void main() {
    uint tile = wg_lin();
    uint lid = gl_LocalInvocationID.x;
    if (tile >= P.tiles) return;
    uint row0 = (tile / P.tiles_n) * 64u;
    uint col0 = (tile % P.tiles_n) * 64u;
    uint tx = lid % 16u;
    uint ty = lid / 16u;
    vec4 c0 = vec4(0.0);
    vec4 c1 = vec4(0.0);
    vec4 c2 = vec4(0.0);
    vec4 c3 = vec4(0.0);
    for (uint k0 = 0u; k0 < P.k; k0 += 16u) {
        for (uint q = 0u; q < 4u; q++) {
            uint e = lid + q * 256u;
            uint r = e / 16u;
            uint kk = e % 16u;
            uint gk = k0 + kk;
            float va = 0.0;
            if (row0 + r < P.m && gk < P.k) va = LDF(a, A_DT, P.a_off + (row0 + r) * P.k + gk);
            As[kk * 64u + r] = va;
            float vb = 0.0;
            if (col0 + r < P.n && gk < P.k) vb = LDF(b, B_DT, P.b_off + (col0 + r) * P.k + gk);
            Bs[kk * 64u + r] = vb;
        }
        barrier();
        for (uint kk = 0u; kk < 16u; kk++) {
            uint ab = kk * 64u + ty * 4u;
            uint bb = kk * 64u + tx * 4u;
            vec4 av = vec4(As[ab], As[ab + 1u], As[ab + 2u], As[ab + 3u]);
            vec4 bv = vec4(Bs[bb], Bs[bb + 1u], Bs[bb + 2u], Bs[bb + 3u]);
            c0 += av.x * bv;
            c1 += av.y * bv;
            c2 += av.z * bv;
            c3 += av.w * bv;
        }
        barrier();
    }
    uint r0 = row0 + ty * 4u;
    uint cc = col0 + tx * 4u;
    store_row(r0, cc, c0);
    store_row(r0 + 1u, cc, c1);
    store_row(r0 + 2u, cc, c2);
    store_row(r0 + 3u, cc, c3);
}
