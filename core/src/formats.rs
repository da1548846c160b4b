//! Number formats: FP8 (E4M3FN, E4M3FNUZ, E5M2), UE8M0 scales, bf16 and f16.
//!
//! All conversions from f32 round to nearest, ties to even, exactly once
//! (the f32 value is exact in f64, and every step below is exact in f64
//! except the single rounding). Semantics follow SPEC.md §1:
//!
//! * `e4m3` (OCP E4M3FN): bias 7, max ±448, no infinities, NaN = `0x7f`/`0xff`.
//!   Encoding **saturates**: finite values and ±inf beyond the range become
//!   ±448. NaN stays NaN.
//! * `e4m3fnuz` (AMD MI300): bias 8, max ±240, NaN = `0x80`, no negative
//!   zero (−0 encodes as `0x00`). Encoding saturates to ±240.
//! * `e5m2` (OCP E5M2): bias 15, max ±57344, IEEE infinities and NaNs.
//!   Encoding follows IEEE: values past the range round to ±inf.
//! * UE8M0: an unsigned power-of-two scale, `2^(byte − 127)`, `0xff` = NaN.

use crate::dtype::DType;
use half::{bf16, f16};
use std::sync::LazyLock;

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite e4m3fnuz value.
pub const E4M3FNUZ_MAX: f32 = 240.0;
/// Largest finite e5m2 value.
pub const E5M2_MAX: f32 = 57344.0;

/// Description of an 8-bit float layout.
#[derive(Clone, Copy, Debug)]
struct Minifloat {
    man_bits: u32,
    bias: i32,
    max: f64,
    /// Saturate on overflow (true) or go to infinity (false, IEEE).
    saturate: bool,
    /// The "fnuz" family: NaN = 0x80, no negative zero, no infinities.
    fnuz: bool,
    /// Has IEEE infinities and NaNs (top exponent reserved).
    ieee: bool,
}

const E4M3: Minifloat = Minifloat {
    man_bits: 3,
    bias: 7,
    max: 448.0,
    saturate: true,
    fnuz: false,
    ieee: false,
};
const E4M3FNUZ: Minifloat = Minifloat {
    man_bits: 3,
    bias: 8,
    max: 240.0,
    saturate: true,
    fnuz: true,
    ieee: false,
};
const E5M2: Minifloat = Minifloat {
    man_bits: 2,
    bias: 15,
    max: 57344.0,
    saturate: false,
    fnuz: false,
    ieee: true,
};

/// floor(log2(a)) for a finite, positive f64, computed from its bits.
fn floor_log2(a: f64) -> i32 {
    debug_assert!(a > 0.0 && a.is_finite());
    let bits = a.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    if exp == 0 {
        // f64 subnormal: never reached from f32 inputs, but stay correct.
        let man = bits & ((1u64 << 52) - 1);
        -1074 + (63 - man.leading_zeros() as i32)
    } else {
        exp - 1023
    }
}

fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

impl Minifloat {
    fn exp_bits(&self) -> u32 {
        7 - self.man_bits
    }

    fn nan_code(&self, negative: bool) -> u8 {
        if self.fnuz {
            0x80
        } else if self.ieee {
            // Quiet NaN: all-ones exponent, top mantissa bit set.
            let code =
                (((1u8 << self.exp_bits()) - 1) << self.man_bits) | (1 << (self.man_bits - 1));
            code | ((negative as u8) << 7)
        } else {
            0x7f | ((negative as u8) << 7)
        }
    }

    fn decode(&self, code: u8) -> f32 {
        let negative = code & 0x80 != 0;
        if self.fnuz && code == 0x80 {
            return f32::NAN;
        }
        let exp_field = ((code >> self.man_bits) & ((1 << self.exp_bits()) - 1)) as i32;
        let man = (code & ((1 << self.man_bits) - 1)) as i32;
        let top_exp = (1 << self.exp_bits()) - 1;
        if self.ieee && exp_field == top_exp {
            let v = if man == 0 { f32::INFINITY } else { f32::NAN };
            return if negative { -v } else { v };
        }
        if !self.ieee && !self.fnuz && exp_field == top_exp && man == (1 << self.man_bits) - 1 {
            return f32::NAN;
        }
        let scale = (1 << self.man_bits) as f64;
        let mag = if exp_field == 0 {
            man as f64 / scale * pow2(1 - self.bias)
        } else {
            (1.0 + man as f64 / scale) * pow2(exp_field - self.bias)
        };
        let v = mag as f32;
        if negative {
            -v
        } else {
            v
        }
    }

    fn encode(&self, x: f32) -> u8 {
        let negative = x.is_sign_negative();
        if x.is_nan() {
            return self.nan_code(negative);
        }
        let sign_bit = if negative && !self.fnuz { 0x80u8 } else { 0 };
        let a = (x as f64).abs();
        let max_code = |this: &Self| this.encode_magnitude(this.max);
        if a.is_infinite() {
            return if self.saturate {
                max_code(self) | sign_bit_nonzero(negative)
            } else {
                self.inf_code() | sign_bit
            };
        }
        if a == 0.0 {
            return sign_bit;
        }
        let min_normal_exp = 1 - self.bias;
        let e = floor_log2(a).max(min_normal_exp);
        let quantum = pow2(e - self.man_bits as i32);
        let q = (a / quantum).round_ties_even() * quantum;
        if q > self.max {
            return if self.saturate {
                max_code(self) | sign_bit_nonzero(negative)
            } else {
                self.inf_code() | sign_bit
            };
        }
        if q == 0.0 {
            return sign_bit;
        }
        self.encode_magnitude(q) | sign_bit_nonzero(negative)
    }

    fn inf_code(&self) -> u8 {
        ((1u8 << self.exp_bits()) - 1) << self.man_bits
    }

    /// Bits of an exactly representable, positive magnitude.
    fn encode_magnitude(&self, q: f64) -> u8 {
        let min_normal_exp = 1 - self.bias;
        let e = floor_log2(q);
        if e < min_normal_exp {
            let m = q / pow2(min_normal_exp - self.man_bits as i32);
            m as u8
        } else {
            let m = q / pow2(e - self.man_bits as i32) - (1u32 << self.man_bits) as f64;
            (((e + self.bias) as u8) << self.man_bits) | m as u8
        }
    }
}

fn sign_bit_nonzero(negative: bool) -> u8 {
    (negative as u8) << 7
}

fn table(fmt: Minifloat) -> [f32; 256] {
    let mut t = [0f32; 256];
    for (code, v) in t.iter_mut().enumerate() {
        *v = fmt.decode(code as u8);
    }
    t
}

static E4M3_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| table(E4M3));
static E4M3FNUZ_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| table(E4M3FNUZ));
static E5M2_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| table(E5M2));

/// Decodes an OCP E4M3FN byte.
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[code as usize]
}
/// Encodes to OCP E4M3FN: nearest-even, saturating to ±448, NaN kept.
pub fn f32_to_e4m3(x: f32) -> u8 {
    E4M3.encode(x)
}
/// Decodes an E4M3FNUZ byte.
pub fn e4m3fnuz_to_f32(code: u8) -> f32 {
    E4M3FNUZ_TABLE[code as usize]
}
/// Encodes to E4M3FNUZ: nearest-even, saturating to ±240, NaN → 0x80.
pub fn f32_to_e4m3fnuz(x: f32) -> u8 {
    E4M3FNUZ.encode(x)
}
/// Decodes an OCP E5M2 byte.
pub fn e5m2_to_f32(code: u8) -> f32 {
    E5M2_TABLE[code as usize]
}
/// Encodes to OCP E5M2: nearest-even, overflow to ±inf (IEEE).
pub fn f32_to_e5m2(x: f32) -> u8 {
    E5M2.encode(x)
}

/// Rounds a positive scale **up** to a power of two: `2^ceil(log2(s))`
/// (SPEC.md §1). NaN, ±inf, zero and negative values are returned unchanged.
pub fn ue8m0_round_up(s: f32) -> f32 {
    if !(s.is_finite() && s > 0.0) {
        return s;
    }
    let bits = s.to_bits();
    let exp = (bits >> 23) & 0xff;
    let man = bits & 0x7f_ffff;
    if exp == 0 {
        // f32 subnormal: the next power of two at or above it.
        let e = 64 - (man as u64).leading_zeros() as i32; // man ≤ 2^e
        let e = if man.is_power_of_two() { e - 1 } else { e };
        return (pow2(e - 149)) as f32;
    }
    if man == 0 {
        s
    } else {
        f32::from_bits((exp + 1) << 23)
    }
}

/// Encodes a power-of-two scale as a UE8M0 byte (its biased exponent).
/// Values that are not powers of two are rounded up first; NaN, values
/// ≤ 0 and values beyond 2^127 give `0xff` (NaN).
pub fn f32_to_ue8m0(s: f32) -> u8 {
    let r = ue8m0_round_up(s);
    if !(r.is_finite() && r > 0.0) {
        return 0xff;
    }
    let e = floor_log2(r as f64);
    if e < -127 {
        0
    } else {
        (e + 127).min(0xff) as u8
    }
}

/// Decodes a UE8M0 byte: `2^(code − 127)`, `0xff` = NaN.
pub fn ue8m0_to_f32(code: u8) -> f32 {
    if code == 0xff {
        f32::NAN
    } else {
        pow2(code as i32 - 127) as f32
    }
}

/// Rounds an f32 to bf16 (nearest even) and back.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Rounds an f32 to f16 (nearest even) and back.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds `x` to the nearest value representable in `dtype` (floats only;
/// integer types and bool return `x` unchanged).
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => round_bf16(x),
        DType::F16 => round_f16(x),
        DType::F8E4M3 => e4m3_to_f32(f32_to_e4m3(x)),
        DType::F8E4M3Fnuz => e4m3fnuz_to_f32(f32_to_e4m3fnuz(x)),
        DType::F8E5M2 => e5m2_to_f32(f32_to_e5m2(x)),
        DType::E8M0 => ue8m0_round_up(x),
        _ => x,
    }
}

/// The largest finite value of a float dtype (f32::MAX for f32).
pub fn max_finite(dtype: DType) -> f32 {
    match dtype {
        DType::F8E4M3 => E4M3_MAX,
        DType::F8E4M3Fnuz => E4M3FNUZ_MAX,
        DType::F8E5M2 => E5M2_MAX,
        DType::BF16 => bf16::MAX.to_f32(),
        DType::F16 => f16::MAX.to_f32(),
        _ => f32::MAX,
    }
}

/// One unit in the last place of `x` in bf16 (the spacing of bf16 values at
/// |x|), used by elementwise tolerances.
pub fn ulp_bf16(x: f32) -> f32 {
    let a = x.abs();
    if !a.is_finite() {
        return f32::INFINITY;
    }
    // bf16 has 8 significant bits; below the normal range the spacing is fixed.
    let e = if a < f32::MIN_POSITIVE {
        -126
    } else {
        floor_log2(a as f64)
    };
    pow2(e - 7) as f32
}
