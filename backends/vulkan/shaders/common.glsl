// deepport-vulkan common library, included by every kernel. Plain GLSL 450
// on uint/int/float: f16, bf16 and FP8 are decoded and encoded by bit
// manipulation (the device may lack bf16 and FP8 types; conversions are
// bit-exact with deepport-core's `formats`). A port of the wgpu backend's
// common.wgsl: same dtype codes, same packing, same rounding.
//
// * Every tensor is bound as `uint[]`; 16-bit elements are packed two per
//   word and 8-bit elements four per word, little-endian.
// * Specialization constants: 0 = the device's subgroup size (never
//   assumed), 1 = the workgroup size (local_size_x_id).
// * Dispatches beyond the per-dimension limit are split over x and y:
//   `wg_lin()` is the linear workgroup index.

layout(constant_id = 0) const uint SUBGROUP_SIZE = 1u;
layout(local_size_x_id = 1) in;

#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u
#define DT_E4M3 3u
#define DT_E4M3FNUZ 4u
#define DT_I32 5u
#define DT_I64 6u
#define DT_U8 7u

uint wg_lin() {
    return gl_WorkGroupID.x + gl_NumWorkGroups.x * gl_WorkGroupID.y;
}

// Linear invocation index over the whole (split) dispatch.
uint inv_lin() {
    return wg_lin() * gl_WorkGroupSize.x + gl_LocalInvocationID.x;
}

float f32_nan() { return uintBitsToFloat(0x7fc00000u); }
float f32_inf(bool negative) { return uintBitsToFloat(0x7f800000u | (negative ? 0x80000000u : 0u)); }
bool is_finite_f32(float v) { return (floatBitsToUint(v) & 0x7f800000u) != 0x7f800000u; }
bool is_nan_f32(float v) { return (floatBitsToUint(v) & 0x7fffffffu) > 0x7f800000u; }

uint dt_per_word(uint dt) {
    if (dt == 1u || dt == 2u) return 2u;
    if (dt == 3u || dt == 4u || dt == 7u) return 4u;
    return 1u;
}

// The bits of element i inside its word.
uint dt_lane(uint dt, uint word, uint i) {
    uint per = dt_per_word(dt);
    if (per == 1u) return word;
    uint b = 32u / per;
    return (word >> ((i % per) * b)) & ((1u << b) - 1u);
}

// ---- bf16 ---------------------------------------------------------------
float bf16_to_f32(uint h) { return uintBitsToFloat(h << 16u); }

uint f32_to_bf16(float v) {
    uint u = floatBitsToUint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16u) | 0x40u;
    uint r = u + 0x7fffu + ((u >> 16u) & 1u);
    return r >> 16u;
}

// ---- f16 ----------------------------------------------------------------
float f16_to_f32(uint h) {
    uint sign = (h & 0x8000u) << 16u;
    uint e = (h >> 10u) & 0x1fu;
    uint m = h & 0x3ffu;
    if (e == 0x1fu) return uintBitsToFloat(sign | 0x7f800000u | (m << 13u));
    if (e == 0u) {
        float mag = float(m) * 5.9604644775390625e-8;
        return uintBitsToFloat(sign | floatBitsToUint(mag));
    }
    return uintBitsToFloat(sign | ((e + 112u) << 23u) | (m << 13u));
}

uint f32_to_f16(float v) {
    uint u = floatBitsToUint(v);
    uint sign = (u >> 16u) & 0x8000u;
    uint a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7c00u | 0x200u | ((a & 0x7fffffu) >> 13u);
    if (a == 0x7f800000u) return sign | 0x7c00u;
    int e = int(a >> 23u) - 127;
    if (e >= 16) return sign | 0x7c00u;
    uint m = a & 0x7fffffu;
    if (e >= -14) {
        uint h = (uint(e + 15) << 10u) | (m >> 13u);
        uint rem = m & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) h = h + 1u;
        return sign | h;
    }
    uint s = uint(-e - 1);
    if (s > 24u || a < 0x00800000u) return sign;
    uint mm = m | 0x800000u;
    uint k = mm >> s;
    uint rem = mm & ((1u << s) - 1u);
    uint hf = 1u << (s - 1u);
    if (rem > hf || (rem == hf && (k & 1u) == 1u)) k = k + 1u;
    return sign | k;
}

// ---- FP8 e4m3 (OCP E4M3FN) and e4m3fnuz ---------------------------------
float e4m3_to_f32(uint c, bool fnuz) {
    if (fnuz) {
        if (c == 0x80u) return f32_nan();
    } else if ((c & 0x7fu) == 0x7fu) {
        return f32_nan();
    }
    uint bias = fnuz ? 8u : 7u;
    uint sign = (c & 0x80u) << 24u;
    uint ef = (c >> 3u) & 0xfu;
    uint m = c & 7u;
    if (ef == 0u) {
        float scale = fnuz ? 0.0009765625 : 0.001953125;
        return uintBitsToFloat(sign | floatBitsToUint(float(m) * scale));
    }
    return uintBitsToFloat(sign | ((ef + 127u - bias) << 23u) | (m << 20u));
}

uint f32_to_e4m3(float v, bool fnuz) {
    uint u = floatBitsToUint(v);
    bool negative = (u >> 31u) == 1u;
    uint a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        if (fnuz) return 0x80u;
        return 0x7fu | (negative ? 0x80u : 0u);
    }
    uint max_code = fnuz ? 0x7fu : 0x7eu;
    int bias = fnuz ? 8 : 7;
    uint code = 0u;
    if (a >= 0x7f800000u) {
        code = max_code;
    } else if (a >= 0x00800000u) {
        int e = int(a >> 23u) - 127;
        int min_e = 1 - bias;
        int ee = max(e, min_e);
        int d = 20 + (ee - e);
        if (d <= 25) {
            uint mm = (a & 0x7fffffu) | 0x800000u;
            uint du = uint(d);
            uint k = mm >> du;
            uint rem = mm & ((1u << du) - 1u);
            uint hf = 1u << (du - 1u);
            if (rem > hf || (rem == hf && (k & 1u) == 1u)) k = k + 1u;
            if (e >= min_e) {
                code = (uint(e + bias) << 3u) + k - 8u;
            } else {
                code = k;
            }
            code = min(code, max_code);
        }
    }
    if (fnuz && code == 0u) return 0u;
    return code | (negative ? 0x80u : 0u);
}

// ---- generic decode / encode by dtype code ------------------------------
float dt_decode(uint dt, uint lane) {
    switch (dt) {
        case 0u: return uintBitsToFloat(lane);
        case 1u: return f16_to_f32(lane);
        case 2u: return bf16_to_f32(lane);
        case 3u: return e4m3_to_f32(lane, false);
        case 4u: return e4m3_to_f32(lane, true);
        case 5u: return float(int(lane));
        default: return float(lane);
    }
}

uint dt_encode(uint dt, float v) {
    switch (dt) {
        case 0u: return floatBitsToUint(v);
        case 1u: return f32_to_f16(v);
        case 2u: return f32_to_bf16(v);
        case 3u: return f32_to_e4m3(v, false);
        case 4u: return f32_to_e4m3(v, true);
        default: return floatBitsToUint(v);
    }
}

// ---- 64-bit integers as uvec2(lo, hi) -----------------------------------
bool i64_lt(uvec2 a, uvec2 b) {
    int ah = int(a.y);
    int bh = int(b.y);
    return ah < bh || (ah == bh && a.x < b.x);
}
bool i64_eq(uvec2 a, uvec2 b) { return a.x == b.x && a.y == b.y; }
bool i64_is_negative(uvec2 a) { return (a.y >> 31u) == 1u; }

// Clamps a (lo, hi) index to [0, n - 1] (n >= 1).
uint i64_clamp_index(uvec2 a, uint n) {
    if (i64_is_negative(a)) return 0u;
    if (a.y != 0u || a.x >= n) return n - 1u;
    return a.x;
}

// ---- correctly rounded division ------------------------------------------
float div_rn(float a, float b) {
    uint ua = floatBitsToUint(a);
    uint ub = floatBitsToUint(b);
    uint sign = (ua ^ ub) & 0x80000000u;
    uint aa = ua & 0x7fffffffu;
    uint ab = ub & 0x7fffffffu;
    if (aa > 0x7f800000u || ab > 0x7f800000u) return f32_nan();
    if (aa == 0x7f800000u) {
        if (ab == 0x7f800000u) return f32_nan();
        return uintBitsToFloat(sign | 0x7f800000u);
    }
    if (ab == 0x7f800000u) return uintBitsToFloat(sign);
    if (ab == 0u) {
        if (aa == 0u) return f32_nan();
        return uintBitsToFloat(sign | 0x7f800000u);
    }
    if (aa == 0u) return uintBitsToFloat(sign);
    uint ma = aa & 0x7fffffu;
    uint mb = ab & 0x7fffffu;
    int xa = int(aa >> 23u);
    int xb = int(ab >> 23u);
    if (xa == 0) {
        uint lz = uint(31 - findMSB(ma)) - 8u;
        ma = ma << lz;
        xa = 1 - int(lz);
    } else {
        ma = ma | 0x800000u;
    }
    if (xb == 0) {
        uint lz = uint(31 - findMSB(mb)) - 8u;
        mb = mb << lz;
        xb = 1 - int(lz);
    } else {
        mb = mb | 0x800000u;
    }
    int e = xa - xb;
    if (ma < mb) {
        ma = ma << 1u;
        e = e - 1;
    }
    uint q = 0u;
    uint r = ma;
    for (uint i = 0u; i < 26u; i++) {
        q = q << 1u;
        if (r >= mb) {
            r = r - mb;
            q = q | 1u;
        }
        r = r << 1u;
    }
    bool sticky = r != 0u;
    int be = e + 127;
    if (be >= 255) return uintBitsToFloat(sign | 0x7f800000u);
    uint shift = 2u;
    if (be <= 0) {
        int extra = 1 - be;
        if (extra > 25) return uintBitsToFloat(sign);
        shift = 2u + uint(extra);
    }
    uint keep = q >> shift;
    uint rem = q & ((1u << shift) - 1u);
    uint hf = 1u << (shift - 1u);
    uint k = keep;
    if (rem > hf || (rem == hf && (sticky || (keep & 1u) == 1u))) k = k + 1u;
    uint bits = k;
    if (be > 0) bits = (uint(be - 1) << 23u) + k;
    if (bits >= 0x7f800000u) bits = 0x7f800000u;
    return uintBitsToFloat(sign | bits);
}

// ---- exp -------------------------------------------------------------------
// e^x in f32, ~1 ulp: Cody-Waite reduction by ln 2 and a degree-7 Taylor
// polynomial (the same constants as the wgpu backend).
float exp_f32(float x) {
    if (is_nan_f32(x)) return x;
    if (x > 88.72283935546875) return f32_inf(false);
    if (x < -103.97208404541016) return 0.0;
    precise float k = roundEven(x * 1.4426950408889634);
    precise float r = (x - k * 0.693145751953125) - k * 1.428606765330187e-6;
    precise float p = 1.9841270113e-4;
    p = p * r + 1.3888889225e-3;
    p = p * r + 8.3333337680e-3;
    p = p * r + 4.1666667908e-2;
    p = p * r + 1.6666667163e-1;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int ki = int(k);
    if (ki > 127) return p * 2.0 * uintBitsToFloat(uint(ki - 1 + 127) << 23u);
    if (ki >= -126) return p * uintBitsToFloat(uint(ki + 127) << 23u);
    return (p * uintBitsToFloat(uint(ki + 64 + 127) << 23u)) * 5.421010862427522e-20;
}

float sigmoid_f32(float x) { return div_rn(1.0, 1.0 + exp_f32(-x)); }

// a + b rounded once to dtype dt (f32, f16 or bf16), as lane bits: for
// 16-bit results the exact sum is formed in integer arithmetic.
uint add_round(float a, float b, uint dt) {
    float s = a + b;
    if (dt == DT_F32 || !is_finite_f32(a) || !is_finite_f32(b)) return dt_encode(dt, s);
    uint ua = floatBitsToUint(a);
    uint ub = floatBitsToUint(b);
    if ((ua & 0x7fffffffu) < (ub & 0x7fffffffu)) {
        uint t = ua;
        ua = ub;
        ub = t;
    }
    uint aa = ua & 0x7fffffffu;
    uint ab = ub & 0x7fffffffu;
    if (ab == 0u) {
        if (aa == 0u) return dt_encode(dt, uintBitsToFloat(ua & ub & 0x80000000u));
        return dt_encode(dt, uintBitsToFloat(ua));
    }
    uint sign = ua & 0x80000000u;
    uint ea = max(aa >> 23u, 1u);
    uint eb = max(ab >> 23u, 1u);
    uint ma = aa & 0x7fffffu;
    if ((aa >> 23u) != 0u) ma = ma | 0x800000u;
    uint mb = ab & 0x7fffffu;
    if ((ab >> 23u) != 0u) mb = mb | 0x800000u;
    ma = ma << 6u;
    mb = mb << 6u;
    uint d = ea - eb;
    uint mbs = 0u;
    if (d < 31u) {
        mbs = mb >> d;
        if ((mbs << d) != mb) mbs = mbs | 1u;
    } else {
        mbs = 1u;
    }
    uint r;
    if (((ua ^ ub) >> 31u) == 0u) {
        r = ma + mbs;
    } else {
        r = ma - mbs;
    }
    if (r == 0u) return 0u;
    int e0 = int(ea) - 156;
    int msb = findMSB(r);
    int p = 8;
    int emin = -126;
    int bias = 127;
    uint inf_bits = 0x7f80u;
    uint mshift = 7u;
    if (dt == DT_F16) {
        p = 11;
        emin = -14;
        bias = 15;
        inf_bits = 0x7c00u;
        mshift = 10u;
    }
    int et = max(msb + e0, emin);
    int qe = et - (p - 1);
    int sh = qe - e0;
    uint k;
    if (sh <= 0) {
        k = r << uint(-sh);
    } else if (sh > 31) {
        k = 0u;
    } else {
        uint shu = uint(sh);
        k = r >> shu;
        uint rem = r & ((1u << shu) - 1u);
        uint hf = 1u << (shu - 1u);
        if (rem > hf || (rem == hf && (k & 1u) == 1u)) k = k + 1u;
    }
    uint bits;
    if (msb + e0 >= emin) {
        bits = (uint(et + bias - 1) << mshift) + k;
    } else {
        bits = k;
    }
    bits = min(bits, inf_bits);
    uint sbit = sign != 0u ? (1u << (mshift + (dt == DT_BF16 ? 8u : 5u))) : 0u;
    return bits | sbit;
}

// Buffers are declared by each kernel as `uint NAME[]` blocks; these macros
// read element i of dtype dt from such an array.
#define LDF(arr, dt, i) dt_decode((dt), dt_lane((dt), arr[(i) / dt_per_word(dt)], (i)))
// An index element as (lo, hi) from an i32 or i64 array.
#define LDI(arr, dt, i) ((dt) == DT_I64 ? uvec2(arr[2u * (i)], arr[2u * (i) + 1u]) : uvec2(arr[(i)], (arr[(i)] >> 31u) != 0u ? 0xffffffffu : 0u))
