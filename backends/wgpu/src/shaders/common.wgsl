// deepport-wgpu common library, prepended to every kernel (after the
// generated binding header). Everything here is plain WGSL on u32/i32/f32:
// no f16/bf16/fp8 types are needed, so it runs on every adapter.
//
// * Storage: every tensor is an `array<u32>`; 16-bit elements are packed two
//   per word and 8-bit elements four per word, little-endian (element i sits
//   in bits [(i % per)·bits, …) of word i / per).
// * Conversions are bit manipulation with round-to-nearest-even, exactly as
//   deepport-core's `formats` module defines them (saturating FP8, IEEE f16
//   and bf16 overflow to ±inf).
// * `div_rn` is a correctly rounded f32 division in integer arithmetic:
//   WGSL's `/` may be off by 2.5 ulp, and act_quant must be bit-exact.
// * `exp_f32`, `sincos_f32` are accurate (≈1 ulp) f32 implementations with
//   proper range reduction, independent of the driver's transcendentals.
// * Nothing assumes a subgroup size.

const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;
const DT_E4M3: u32 = 3u;
const DT_E4M3FNUZ: u32 = 4u;
const DT_I32: u32 = 5u;
const DT_I64: u32 = 6u;
const DT_U8: u32 = 7u;

// Runtime (not const-evaluated) NaN and infinity bit patterns: WGSL forbids
// NaN and inf in constant expressions.
var<private> NAN_BITS: u32 = 0x7fc00000u;
var<private> INF_BITS: u32 = 0x7f800000u;

fn f32_nan() -> f32 {
    return bitcast<f32>(NAN_BITS);
}

fn f32_inf(negative: bool) -> f32 {
    return bitcast<f32>(INF_BITS | select(0u, 0x80000000u, negative));
}

fn is_finite_f32(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

fn is_nan_f32(v: f32) -> bool {
    let a = bitcast<u32>(v) & 0x7fffffffu;
    return a > 0x7f800000u;
}

// Linear workgroup index of a dispatch split over x, y and z (the host splits
// counts beyond maxComputeWorkgroupsPerDimension). Extra workgroups get an
// index ≥ the logical count and must return.
fn wg_lin(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

// ---- element layout ---------------------------------------------------------

fn dt_per_word(dt: u32) -> u32 {
    switch dt {
        case 1u, 2u: {
            return 2u;
        }
        case 3u, 4u, 7u: {
            return 4u;
        }
        default: {
            return 1u;
        }
    }
}

fn dt_bits(dt: u32) -> u32 {
    return 32u / dt_per_word(dt);
}

fn dt_lane_mask(dt: u32) -> u32 {
    let b = dt_bits(dt);
    if b == 32u {
        return 0xffffffffu;
    }
    return (1u << b) - 1u;
}

// The bits of element i inside its word.
fn dt_lane(dt: u32, word: u32, i: u32) -> u32 {
    let per = dt_per_word(dt);
    if per == 1u {
        return word;
    }
    let b = 32u / per;
    return (word >> ((i % per) * b)) & ((1u << b) - 1u);
}

// ---- bf16 ---------------------------------------------------------------------

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// Round to nearest even; NaN stays NaN (quiet bit set, as the `half` crate).
fn f32_to_bf16(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    if (u & 0x7fffffffu) > 0x7f800000u {
        return (u >> 16u) | 0x40u;
    }
    let r = u + 0x7fffu + ((u >> 16u) & 1u);
    return r >> 16u;
}

// ---- f16 ------------------------------------------------------------------------

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0x1fu {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    if e == 0u {
        // Subnormal (or zero): m · 2^-24, exact in f32.
        let mag = f32(m) * 5.9604644775390625e-8;
        return bitcast<f32>(sign | bitcast<u32>(mag));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// Round to nearest even, overflow to ±inf, NaN stays NaN.
fn f32_to_f16(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    let sign = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if a > 0x7f800000u {
        return sign | 0x7c00u | 0x200u | ((a & 0x7fffffu) >> 13u);
    }
    if a == 0x7f800000u {
        return sign | 0x7c00u;
    }
    let e = i32(a >> 23u) - 127;
    if e >= 16 {
        return sign | 0x7c00u;
    }
    let m = a & 0x7fffffu;
    if e >= -14 {
        var h = (u32(e + 15) << 10u) | (m >> 13u);
        let rem = m & 0x1fffu;
        if rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u) {
            h = h + 1u;
        }
        return sign | h;
    }
    // Subnormal result: quantum 2^-24.
    let s = u32(-e - 1); // ≥ 14
    if s > 24u || a < 0x00800000u {
        return sign;
    }
    let mm = m | 0x800000u;
    var k = mm >> s;
    let rem = mm & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    if rem > half || (rem == half && (k & 1u) == 1u) {
        k = k + 1u;
    }
    return sign | k;
}

// ---- FP8 e4m3 (OCP E4M3FN) and e4m3fnuz -------------------------------------------

fn e4m3_to_f32(c: u32, fnuz: bool) -> f32 {
    if fnuz {
        if c == 0x80u {
            return f32_nan();
        }
    } else if (c & 0x7fu) == 0x7fu {
        return f32_nan();
    }
    let bias = select(7u, 8u, fnuz);
    let sign = (c & 0x80u) << 24u;
    let ef = (c >> 3u) & 0xfu;
    let m = c & 7u;
    if ef == 0u {
        // m · 2^(1 - bias - 3)
        let scale = select(0.001953125, 0.0009765625, fnuz);
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * scale));
    }
    return bitcast<f32>(sign | ((ef + 127u - bias) << 23u) | (m << 20u));
}

// The same value by selects (fewer branches; the tiled FP8 GEMMs use it).
fn e4m3_to_f32_sel(c: u32, fnuz: bool) -> f32 {
    let mag = c & 0x7fu;
    var v: f32;
    if fnuz {
        v = select(f32(mag) * 0.0009765625, bitcast<f32>((mag << 20u) + (119u << 23u)), mag >= 8u);
        if c == 0x80u {
            v = f32_nan();
        }
    } else {
        v = select(f32(mag) * 0.001953125, bitcast<f32>((mag << 20u) + (120u << 23u)), mag >= 8u);
        if mag == 0x7fu {
            v = f32_nan();
        }
    }
    return select(v, -v, (c & 0x80u) != 0u);
}

// Round to nearest even, saturating to ±448 (e4m3) / ±240 (e4m3fnuz).
// NaN → 0x7f|sign (e4m3) or 0x80 (fnuz). e4m3 keeps negative zero; fnuz has
// none.
fn f32_to_e4m3(v: f32, fnuz: bool) -> u32 {
    let u = bitcast<u32>(v);
    let negative = (u >> 31u) == 1u;
    let a = u & 0x7fffffffu;
    if a > 0x7f800000u {
        if fnuz {
            return 0x80u;
        }
        return 0x7fu | select(0u, 0x80u, negative);
    }
    let max_code = select(0x7eu, 0x7fu, fnuz);
    let bias = select(7, 8, fnuz);
    var code = 0u;
    if a >= 0x7f800000u {
        code = max_code;
    } else if a >= 0x00800000u {
        // Normal f32: a = M · 2^(E - 23), M has 24 bits.
        let e = i32(a >> 23u) - 127;
        let min_e = 1 - bias;
        let ee = max(e, min_e);
        let d = 20 + (ee - e); // bits of M below the FP8 quantum 2^(ee - 3)
        if d <= 25 {
            let mm = (a & 0x7fffffu) | 0x800000u;
            let du = u32(d);
            var k = mm >> du;
            let rem = mm & ((1u << du) - 1u);
            let half = 1u << (du - 1u);
            if rem > half || (rem == half && (k & 1u) == 1u) {
                k = k + 1u;
            }
            if e >= min_e {
                code = (u32(e + bias) << 3u) + k - 8u;
            } else {
                code = k;
            }
            code = min(code, max_code);
        }
    }
    // f32 subnormals and zeros stay 0.
    if fnuz {
        if code == 0u {
            return 0u;
        }
        return code | select(0u, 0x80u, negative);
    }
    return code | select(0u, 0x80u, negative);
}

// ---- generic decode / encode by dtype code ---------------------------------------

fn dt_decode(dt: u32, lane: u32) -> f32 {
    switch dt {
        case 0u: {
            return bitcast<f32>(lane);
        }
        case 1u: {
            return f16_to_f32(lane);
        }
        case 2u: {
            return bf16_to_f32(lane);
        }
        case 3u: {
            return e4m3_to_f32(lane, false);
        }
        case 4u: {
            return e4m3_to_f32(lane, true);
        }
        case 5u: {
            return f32(bitcast<i32>(lane));
        }
        default: {
            return f32(lane);
        }
    }
}

// The lane bits of `v` in dtype `dt` (not shifted into place).
fn dt_encode(dt: u32, v: f32) -> u32 {
    switch dt {
        case 0u: {
            return bitcast<u32>(v);
        }
        case 1u: {
            return f32_to_f16(v);
        }
        case 2u: {
            return f32_to_bf16(v);
        }
        case 3u: {
            return f32_to_e4m3(v, false);
        }
        case 4u: {
            return f32_to_e4m3(v, true);
        }
        default: {
            return bitcast<u32>(v);
        }
    }
}

// ---- 64-bit integers as vec2<u32>(lo, hi) ---------------------------------------

fn i64_lt(a: vec2<u32>, b: vec2<u32>) -> bool {
    let ah = bitcast<i32>(a.y);
    let bh = bitcast<i32>(b.y);
    return ah < bh || (ah == bh && a.x < b.x);
}

fn i64_eq(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x == b.x && a.y == b.y;
}

fn i64_is_negative(a: vec2<u32>) -> bool {
    return (a.y >> 31u) == 1u;
}

// Clamps a (lo, hi) index to [0, n - 1] (n ≥ 1) as u32.
fn i64_clamp_index(a: vec2<u32>, n: u32) -> u32 {
    if i64_is_negative(a) {
        return 0u;
    }
    if a.y != 0u || a.x >= n {
        return n - 1u;
    }
    return a.x;
}

// Unsigned 64-bit integer to f32, round to nearest even.
fn u64_to_f32(a: vec2<u32>) -> f32 {
    if a.y == 0u && a.x < 0x1000000u {
        return f32(a.x);
    }
    // Normalize so the leading one is bit 63 of (hi, lo).
    var hi = a.y;
    var lo = a.x;
    var p: u32; // index of the leading one
    if hi != 0u {
        p = 63u - countLeadingZeros(hi);
    } else {
        p = 31u - countLeadingZeros(lo);
    }
    let sh = 63u - p;
    if sh >= 32u {
        hi = lo << (sh - 32u);
        lo = 0u;
    } else if sh > 0u {
        hi = (hi << sh) | (lo >> (32u - sh));
        lo = lo << sh;
    }
    // Top 24 bits are the significand; the rest decides rounding.
    var m = hi >> 8u;
    let rem = hi & 0xffu;
    let sticky = lo != 0u;
    if rem > 0x80u || (rem == 0x80u && (sticky || (m & 1u) == 1u)) {
        m = m + 1u;
    }
    // value = m · 2^(p - 23); m may have carried to 2^24 (bits add up).
    let bits = ((p + 126u) << 23u) + m;
    return bitcast<f32>(bits);
}

// ---- error-free transforms --------------------------------------------------------

// a + b = s + e (Knuth's TwoSum). Best effort only: drivers may simplify
// float algebra (Mesa's NIR folds e to 0), so kernels use it for accuracy,
// never for exactness (see `add_round` for an exact integer sum).
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    return vec2<f32>(s, e);
}

// ---- correctly rounded division ------------------------------------------------------

// a / b rounded to nearest even, in integer arithmetic (WGSL's `/` is only
// accurate to 2.5 ulp). IEEE special cases included.
fn div_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let sign = (ua ^ ub) & 0x80000000u;
    let aa = ua & 0x7fffffffu;
    let ab = ub & 0x7fffffffu;
    if aa > 0x7f800000u || ab > 0x7f800000u {
        return f32_nan();
    }
    if aa == 0x7f800000u {
        if ab == 0x7f800000u {
            return f32_nan();
        }
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if ab == 0x7f800000u {
        return bitcast<f32>(sign);
    }
    if ab == 0u {
        if aa == 0u {
            return f32_nan();
        }
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if aa == 0u {
        return bitcast<f32>(sign);
    }
    var ma = aa & 0x7fffffu;
    var mb = ab & 0x7fffffu;
    var xa = i32(aa >> 23u);
    var xb = i32(ab >> 23u);
    if xa == 0 {
        let lz = countLeadingZeros(ma) - 8u;
        ma = ma << lz;
        xa = 1 - i32(lz);
    } else {
        ma = ma | 0x800000u;
    }
    if xb == 0 {
        let lz = countLeadingZeros(mb) - 8u;
        mb = mb << lz;
        xb = 1 - i32(lz);
    } else {
        mb = mb | 0x800000u;
    }
    var e = xa - xb;
    if ma < mb {
        ma = ma << 1u;
        e = e - 1;
    }
    // ma / mb in [1, 2): 26 quotient bits by long division.
    var q = 0u;
    var r = ma;
    for (var i = 0u; i < 26u; i = i + 1u) {
        q = q << 1u;
        if r >= mb {
            r = r - mb;
            q = q | 1u;
        }
        r = r << 1u;
    }
    let sticky = r != 0u;
    let be = e + 127;
    if be >= 255 {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    var shift = 2u;
    if be <= 0 {
        let extra = 1 - be;
        if extra > 25 {
            return bitcast<f32>(sign);
        }
        shift = 2u + u32(extra);
    }
    let keep = q >> shift;
    let rem = q & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    var k = keep;
    if rem > half || (rem == half && (sticky || (keep & 1u) == 1u)) {
        k = k + 1u;
    }
    var bits = k;
    if be > 0 {
        bits = (u32(be - 1) << 23u) + k;
    }
    if bits >= 0x7f800000u {
        bits = 0x7f800000u;
    }
    return bitcast<f32>(sign | bits);
}

// ---- exp and the logistic function ------------------------------------------------

// e^x in f32, ≈1 ulp: Cody–Waite reduction by ln 2 (the high part has 16
// significant bits, so k·ln2_hi is exact) and a degree-7 Taylor polynomial on
// |r| ≤ ln2/2 (truncation error 0.1 ulp).
fn exp_f32(x: f32) -> f32 {
    if is_nan_f32(x) {
        return x;
    }
    if x > 88.72283935546875 {
        return f32_inf(false);
    }
    if x < -103.97208404541016 {
        return 0.0;
    }
    let k = round(x * 1.4426950408889634);
    let r = (x - k * 0.693145751953125) - k * 1.428606765330187e-6;
    var p = 1.9841270113e-4;
    p = p * r + 1.3888889225e-3;
    p = p * r + 8.3333337680e-3;
    p = p * r + 4.1666667908e-2;
    p = p * r + 1.6666667163e-1;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let ki = i32(k);
    if ki > 127 {
        return p * 2.0 * bitcast<f32>(u32(ki - 1 + 127) << 23u);
    }
    if ki >= -126 {
        return p * bitcast<f32>(u32(ki + 127) << 23u);
    }
    // Subnormal result: scale in two steps (the last one rounds once).
    return (p * bitcast<f32>(u32(ki + 64 + 127) << 23u)) * 5.421010862427522e-20;
}

// 1 / (1 + e^-x), the division correctly rounded.
fn sigmoid_f32(x: f32) -> f32 {
    return div_rn(1.0, 1.0 + exp_f32(-x));
}

// ---- sin and cos with Payne–Hanek range reduction ------------------------------

// 2/π as a bit string, most significant bit first (320 bits).
fn two_over_pi_word(i: u32) -> u32 {
    var t = array<u32, 10>(
        0xa2f9836eu, 0x4e441529u, 0xfc2757d1u, 0xf534ddc0u, 0xdb629599u,
        0x3c439041u, 0xfe5163abu, 0xdebbc561u, 0xb7246e3au, 0x424dd2e0u
    );
    return t[min(i, 9u)];
}

// lo and hi 32-bit halves of a · b.
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (p00 & 0xffffu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

// 32 bits of the 128-bit number p (p[0] least significant) starting at bit b.
fn bits128(p: array<u32, 4>, b: u32) -> u32 {
    var w = p;
    let q = b / 32u;
    let r = b % 32u;
    let lo = w[min(q, 3u)];
    var hi = 0u;
    if q + 1u <= 3u {
        hi = w[q + 1u];
    }
    if q > 3u {
        return 0u;
    }
    if r == 0u {
        return lo;
    }
    return (lo >> r) | (hi << (32u - r));
}

fn sin_poly(r: f32) -> f32 {
    let z = r * r;
    var p = 2.7557319224e-6;
    p = p * z - 1.9841269841e-4;
    p = p * z + 8.3333333333e-3;
    p = p * z - 1.6666666667e-1;
    return r + r * z * p;
}

fn cos_poly(r: f32) -> f32 {
    let z = r * r;
    var p = -2.7557319224e-7;
    p = p * z + 2.4801587302e-5;
    p = p * z - 1.3888888889e-3;
    p = p * z + 4.1666666667e-2;
    return 1.0 - (0.5 * z - z * z * p);
}

// (sin x, cos x) for any finite f32 x, abs error ≈ 1e-7: the exact reduction
// x = (k + f)·π/2 is done in integer arithmetic against 2/π (so huge RoPE
// angles lose nothing), then short polynomials on |r| ≤ π/4.
fn sincos_f32(x: f32) -> vec2<f32> {
    let u = bitcast<u32>(x);
    let negative = (u >> 31u) == 1u;
    let a = u & 0x7fffffffu;
    if a >= 0x7f800000u {
        return vec2<f32>(f32_nan(), f32_nan());
    }
    var r: f32;
    var quadrant = 0u;
    if a < 0x3f490fdbu {
        // |x| < π/4
        r = bitcast<f32>(a);
    } else {
        // |x| = M · 2^E with a 24-bit integer M.
        let big_m = (a & 0x7fffffu) | 0x800000u;
        let e = i32(a >> 23u) - 150;
        // Bits of 2/π at weights ≥ 2^(2 - E) only add multiples of 4.
        let s = u32(max(1, e - 1)); // first needed bit, 1-based
        let o = s - 1u;
        let wq = o / 32u;
        let wr = o % 32u;
        var w: array<u32, 3>;
        for (var i = 0u; i < 3u; i = i + 1u) {
            let t0 = two_over_pi_word(wq + i);
            let t1 = two_over_pi_word(wq + i + 1u);
            if wr == 0u {
                w[i] = t0;
            } else {
                w[i] = (t0 << wr) | (t1 >> (32u - wr));
            }
        }
        // P = M · W (W = w[0]:w[1]:w[2], 96 bits) as four words, least first.
        let p2 = mul_wide(big_m, w[2]);
        let p1 = mul_wide(big_m, w[1]);
        let p0 = mul_wide(big_m, w[0]);
        var p: array<u32, 4>;
        p[0] = p2.x;
        let s1 = p2.y + p1.x;
        let c1 = select(0u, 1u, s1 < p2.y);
        p[1] = s1;
        let s2a = p1.y + p0.x;
        let c2a = select(0u, 1u, s2a < p1.y);
        let s2 = s2a + c1;
        let c2b = select(0u, 1u, s2 < s2a);
        p[2] = s2;
        p[3] = p0.y + c2a + c2b;
        // x·2/π = P · 2^-sh
        let sh = u32(i32(s) + 95 - e);
        quadrant = bits128(p, sh) & 3u;
        var fh = bits128(p, sh - 32u);
        var fl = bits128(p, sh - 64u);
        var fneg = false;
        if (fh >> 31u) == 1u {
            // f ≥ 1/2: use f - 1 and the next quadrant.
            quadrant = (quadrant + 1u) & 3u;
            fneg = true;
            fh = ~fh;
            fl = ~fl;
            fl = fl + 1u;
            if fl == 0u {
                fh = fh + 1u;
            }
        }
        // f = F · 2^-64 with F = fh:fl ≤ 2^63: normalize F to N = F << lz
        // (leading one at bit 63) and take 48 significant bits as two f32s.
        var fr: f32 = 0.0;
        var frl: f32 = 0.0;
        if fh != 0u || fl != 0u {
            var lz = 0u;
            var nh = fh;
            var nl = fl;
            if fh != 0u {
                lz = countLeadingZeros(fh);
                if lz > 0u {
                    nh = (fh << lz) | (fl >> (32u - lz));
                    nl = fl << lz;
                }
            } else {
                let l2 = countLeadingZeros(fl);
                lz = 32u + l2;
                nh = fl << l2;
                nl = 0u;
            }
            let hi24 = nh >> 8u;
            let lo24 = ((nh & 0xffu) << 16u) | (nl >> 16u);
            // hi24 weighs 2^(-24 - lz), lo24 2^(-48 - lz); lz ≤ 63.
            let ehi = 103 - i32(lz);
            let elo = 79 - i32(lz);
            fr = f32(hi24) * bitcast<f32>(u32(ehi) << 23u);
            frl = f32(lo24) * bitcast<f32>(u32(elo) << 23u);
        }
        // r = f · π/2, with π/2 as a two-term sum.
        let c_hi = 1.5707963705062866;
        let c_lo = -4.371139000186243e-8;
        r = fr * c_hi + (fr * c_lo + frl * c_hi);
        if fneg {
            r = -r;
        }
    }
    let s0 = sin_poly(r);
    let c0 = cos_poly(r);
    var sv: f32;
    var cv: f32;
    switch quadrant {
        case 0u: {
            sv = s0;
            cv = c0;
        }
        case 1u: {
            sv = c0;
            cv = -s0;
        }
        case 2u: {
            sv = -s0;
            cv = -c0;
        }
        default: {
            sv = -c0;
            cv = s0;
        }
    }
    if negative {
        sv = -sv;
    }
    return vec2<f32>(sv, cv);
}

// a + b rounded once to dtype dt (f32, f16 or bf16), returned as lane bits.
// For 16-bit results the exact sum is formed in integer arithmetic (an f32
// sum followed by a 16-bit rounding would round twice, and float error-free
// transforms do not survive drivers' algebraic simplification).
fn add_round(a: f32, b: f32, dt: u32) -> u32 {
    let s = a + b;
    if dt == DT_F32 || !is_finite_f32(a) || !is_finite_f32(b) {
        return dt_encode(dt, s);
    }
    var ua = bitcast<u32>(a);
    var ub = bitcast<u32>(b);
    if (ua & 0x7fffffffu) < (ub & 0x7fffffffu) {
        let t = ua;
        ua = ub;
        ub = t;
    }
    let aa = ua & 0x7fffffffu;
    let ab = ub & 0x7fffffffu;
    if ab == 0u {
        // b is ±0: a + b is a (or +0 for +0 + −0).
        if aa == 0u {
            return dt_encode(dt, bitcast<f32>(ua & ub & 0x80000000u));
        }
        return dt_encode(dt, bitcast<f32>(ua));
    }
    let sign = ua & 0x80000000u;
    // Significands with implicit bits; subnormals have exponent field 1.
    let ea = max(aa >> 23u, 1u);
    let eb = max(ab >> 23u, 1u);
    var ma = aa & 0x7fffffu;
    if (aa >> 23u) != 0u {
        ma = ma | 0x800000u;
    }
    var mb = ab & 0x7fffffu;
    if (ab >> 23u) != 0u {
        mb = mb | 0x800000u;
    }
    // Six guard bits; b aligned to a with a sticky bit.
    ma = ma << 6u;
    mb = mb << 6u;
    let d = ea - eb;
    var mbs = 0u;
    if d < 31u {
        mbs = mb >> d;
        if (mbs << d) != mb {
            mbs = mbs | 1u;
        }
    } else {
        mbs = 1u;
    }
    var r: u32;
    if ((ua ^ ub) >> 31u) == 0u {
        r = ma + mbs;
    } else {
        r = ma - mbs;
    }
    if r == 0u {
        return 0u;
    }
    // value = r · 2^(ea - 127 - 23 - 6); round r to the target's precision.
    let e0 = i32(ea) - 156;
    let msb = i32(31u - countLeadingZeros(r));
    var p = 8;
    var emin = -126;
    var bias = 127;
    var inf_bits = 0x7f80u;
    var mshift = 7u;
    if dt == DT_F16 {
        p = 11;
        emin = -14;
        bias = 15;
        inf_bits = 0x7c00u;
        mshift = 10u;
    }
    let et = max(msb + e0, emin); // exponent of the result
    let qe = et - (p - 1); // exponent of its last place
    let sh = qe - e0;
    var k: u32;
    if sh <= 0 {
        k = r << u32(-sh);
    } else if sh > 31 {
        k = 0u;
    } else {
        let shu = u32(sh);
        k = r >> shu;
        let rem = r & ((1u << shu) - 1u);
        let half = 1u << (shu - 1u);
        if rem > half || (rem == half && (k & 1u) == 1u) {
            k = k + 1u;
        }
    }
    var bits: u32;
    if msb + e0 >= emin {
        bits = (u32(et + bias - 1) << mshift) + k;
    } else {
        bits = k;
    }
    bits = min(bits, inf_bits);
    let sbit = select(0u, 1u << (mshift + u32(select(5, 8, dt == DT_BF16))), sign != 0u);
    return bits | sbit;
}
