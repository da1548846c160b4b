#version 450
#extension GL_GOOGLE_include_directive : require
// RoPE on interleaved pairs: one invocation per pair (x[2i], x[2i+1]).
// angle = f32(pos) · freq[i] in f32 (pos converted with round-to-nearest-
// even); sin and cos by `sincos_f32` (exact Payne–Hanek range reduction),
// scaled by the YaRN cos/sin factor. Negative positions are computed as 0
// (the check kernel reports them).
#include "common.glsl"
layout(constant_id = 2) const uint X_DT = 0u;
layout(constant_id = 3) const uint POS_DT = 5u;
layout(constant_id = 4) const uint Y_DT = 0u;
layout(push_constant) uniform Push { uint pairs; uint half_d; uint pairs_per_token; float cs_scale; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) readonly buffer Pos { uint pos[]; };
layout(std430, set = 0, binding = 2) readonly buffer Freq { uint freq[]; };
layout(std430, set = 0, binding = 3) buffer Y { uint y[]; };

// Unsigned 64-bit integer to f32, round to nearest even.
float u64_to_f32(uvec2 a) {
    if (a.y == 0u && a.x < 0x1000000u) return float(a.x);
    uint hi = a.y;
    uint lo = a.x;
    uint p;
    if (hi != 0u) {
        p = 32u + uint(findMSB(hi));
    } else {
        p = uint(findMSB(lo));
    }
    uint sh = 63u - p;
    if (sh >= 32u) {
        hi = lo << (sh - 32u);
        lo = 0u;
    } else if (sh > 0u) {
        hi = (hi << sh) | (lo >> (32u - sh));
        lo = lo << sh;
    }
    uint m = hi >> 8u;
    uint rem = hi & 0xffu;
    bool sticky = lo != 0u;
    if (rem > 0x80u || (rem == 0x80u && (sticky || (m & 1u) == 1u))) m = m + 1u;
    return uintBitsToFloat(((p + 126u) << 23u) + m);
}

const uint TWO_OVER_PI[10] = uint[10](
    0xa2f9836eu, 0x4e441529u, 0xfc2757d1u, 0xf534ddc0u, 0xdb629599u,
    0x3c439041u, 0xfe5163abu, 0xdebbc561u, 0xb7246e3au, 0x424dd2e0u);

uint two_over_pi_word(uint i) { return TWO_OVER_PI[min(i, 9u)]; }

// lo and hi halves of a · b.
uvec2 mul_wide(uint a, uint b) {
    uint lo, hi;
    umulExtended(a, b, hi, lo);
    return uvec2(lo, hi);
}

// 32 bits of the 128-bit number p (p[0] least significant) from bit b.
uint bits128(uint p[4], uint b) {
    uint q = b / 32u;
    uint r = b % 32u;
    if (q > 3u) return 0u;
    uint lo = p[q];
    uint hi = q + 1u <= 3u ? p[q + 1u] : 0u;
    if (r == 0u) return lo;
    return (lo >> r) | (hi << (32u - r));
}

float sin_poly(float r) {
    float z = r * r;
    float p = 2.7557319224e-6;
    p = p * z - 1.9841269841e-4;
    p = p * z + 8.3333333333e-3;
    p = p * z - 1.6666666667e-1;
    return r + r * z * p;
}

float cos_poly(float r) {
    float z = r * r;
    float p = -2.7557319224e-7;
    p = p * z + 2.4801587302e-5;
    p = p * z - 1.3888888889e-3;
    p = p * z + 4.1666666667e-2;
    return 1.0 - (0.5 * z - z * z * p);
}

vec2 sincos_f32(float xv) {
    uint u = floatBitsToUint(xv);
    bool negative = (u >> 31u) == 1u;
    uint a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return vec2(f32_nan(), f32_nan());
    float r;
    uint quadrant = 0u;
    if (a < 0x3f490fdbu) {
        r = uintBitsToFloat(a);
    } else {
        uint big_m = (a & 0x7fffffu) | 0x800000u;
        int e = int(a >> 23u) - 150;
        uint s = uint(max(1, e - 1));
        uint o = s - 1u;
        uint wq = o / 32u;
        uint wr = o % 32u;
        uint w[3];
        for (uint i = 0u; i < 3u; i++) {
            uint t0 = two_over_pi_word(wq + i);
            uint t1 = two_over_pi_word(wq + i + 1u);
            w[i] = wr == 0u ? t0 : ((t0 << wr) | (t1 >> (32u - wr)));
        }
        uvec2 p2 = mul_wide(big_m, w[2]);
        uvec2 p1 = mul_wide(big_m, w[1]);
        uvec2 p0 = mul_wide(big_m, w[0]);
        uint p[4];
        p[0] = p2.x;
        uint s1 = p2.y + p1.x;
        uint c1 = s1 < p2.y ? 1u : 0u;
        p[1] = s1;
        uint s2a = p1.y + p0.x;
        uint c2a = s2a < p1.y ? 1u : 0u;
        uint s2 = s2a + c1;
        uint c2b = s2 < s2a ? 1u : 0u;
        p[2] = s2;
        p[3] = p0.y + c2a + c2b;
        uint sh = uint(int(s) + 95 - e);
        quadrant = bits128(p, sh) & 3u;
        uint fh = bits128(p, sh - 32u);
        uint fl = bits128(p, sh - 64u);
        bool fneg = false;
        if ((fh >> 31u) == 1u) {
            quadrant = (quadrant + 1u) & 3u;
            fneg = true;
            fh = ~fh;
            fl = ~fl;
            fl = fl + 1u;
            if (fl == 0u) fh = fh + 1u;
        }
        float fr = 0.0;
        float frl = 0.0;
        if (fh != 0u || fl != 0u) {
            uint lz = 0u;
            uint nh = fh;
            uint nl = fl;
            if (fh != 0u) {
                lz = 31u - uint(findMSB(fh));
                if (lz > 0u) {
                    nh = (fh << lz) | (fl >> (32u - lz));
                    nl = fl << lz;
                }
            } else {
                uint l2 = 31u - uint(findMSB(fl));
                lz = 32u + l2;
                nh = fl << l2;
                nl = 0u;
            }
            uint hi24 = nh >> 8u;
            uint lo24 = ((nh & 0xffu) << 16u) | (nl >> 16u);
            int ehi = 103 - int(lz);
            int elo = 79 - int(lz);
            fr = float(hi24) * uintBitsToFloat(uint(ehi) << 23u);
            frl = float(lo24) * uintBitsToFloat(uint(elo) << 23u);
        }
        float c_hi = 1.5707963705062866;
        float c_lo = -4.371139000186243e-8;
        r = fr * c_hi + (fr * c_lo + frl * c_hi);
        if (fneg) r = -r;
    }
    float s0 = sin_poly(r);
    float c0 = cos_poly(r);
    float sv;
    float cv;
    if (quadrant == 0u) {
        sv = s0; cv = c0;
    } else if (quadrant == 1u) {
        sv = c0; cv = -s0;
    } else if (quadrant == 2u) {
        sv = -s0; cv = -c0;
    } else {
        sv = -c0; cv = s0;
    }
    if (negative) sv = -sv;
    return vec2(sv, cv);
}

void main() {
    uint p = inv_lin();
    if (p >= P.pairs) return;
    uint t = p / P.pairs_per_token;
    uint i = p % P.half_d;
    uvec2 ps = LDI(pos, POS_DT, t);
    if (i64_is_negative(ps)) ps = uvec2(0u, 0u);
    float angle = u64_to_f32(ps) * uintBitsToFloat(freq[i]);
    vec2 sc = sincos_f32(angle);
    float c = sc.y * P.cs_scale;
    float s = sc.x * P.cs_scale;
    float x0 = LDF(x, X_DT, 2u * p);
    float x1 = LDF(x, X_DT, 2u * p + 1u);
    float y0 = x0 * c - x1 * s;
    float y1 = x0 * s + x1 * c;
    if (dt_per_word(Y_DT) == 1u) {
        y[2u * p] = dt_encode(Y_DT, y0);
        y[2u * p + 1u] = dt_encode(Y_DT, y1);
    } else {
        y[p] = (dt_encode(Y_DT, y0) & 0xffffu) | (dt_encode(Y_DT, y1) << 16u);
    }
}
