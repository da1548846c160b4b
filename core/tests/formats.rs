//! Number formats (SPEC.md §1), checked against decoders and encoders written
//! here from the bit-field definitions, never against the code under test.

use deepport_core::formats::*;
use deepport_core::DType;

// ---- an independent model of the three FP8 layouts -------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// OCP "FN": no infinities, NaN = all-ones exponent and mantissa.
    Fn,
    /// AMD "FNUZ": NaN = 0x80 only, no negative zero, no infinities.
    Fnuz,
    /// IEEE-like: top exponent holds ±inf (mantissa 0) and NaNs.
    Ieee,
}

#[derive(Clone, Copy)]
struct Fmt {
    name: &'static str,
    exp_bits: u32,
    man_bits: u32,
    bias: i32,
    kind: Kind,
    decode: fn(u8) -> f32,
    encode: fn(f32) -> u8,
}

const E4M3: Fmt = Fmt {
    name: "e4m3",
    exp_bits: 4,
    man_bits: 3,
    bias: 7,
    kind: Kind::Fn,
    decode: e4m3_to_f32,
    encode: f32_to_e4m3,
};
const FNUZ: Fmt = Fmt {
    name: "e4m3fnuz",
    exp_bits: 4,
    man_bits: 3,
    bias: 8,
    kind: Kind::Fnuz,
    decode: e4m3fnuz_to_f32,
    encode: f32_to_e4m3fnuz,
};
const E5M2: Fmt = Fmt {
    name: "e5m2",
    exp_bits: 5,
    man_bits: 2,
    bias: 15,
    kind: Kind::Ieee,
    decode: e5m2_to_f32,
    encode: f32_to_e5m2,
};
const ALL: [Fmt; 3] = [E4M3, FNUZ, E5M2];

fn p2(e: i32) -> f64 {
    2f64.powi(e)
}

/// Value of a code from the bit fields; `None` = NaN.
fn ref_decode(f: &Fmt, code: u8) -> Option<f64> {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e_all = (1u32 << f.exp_bits) - 1;
    let m_all = (1u32 << f.man_bits) - 1;
    let e = (code as u32 >> f.man_bits) & e_all;
    let m = code as u32 & m_all;
    match f.kind {
        Kind::Fnuz if code == 0x80 => return None,
        Kind::Fn if e == e_all && m == m_all => return None,
        Kind::Ieee if e == e_all => {
            return if m == 0 {
                Some(sign * f64::INFINITY)
            } else {
                None
            }
        }
        _ => {}
    }
    let mb = f.man_bits as i32;
    let mag = if e == 0 {
        m as f64 * p2(1 - f.bias - mb)
    } else {
        ((1u32 << f.man_bits) + m) as f64 * p2(e as i32 - f.bias - mb)
    };
    Some(sign * mag)
}

/// Non-negative finite values with their codes, ascending (0 first).
fn positives(f: &Fmt) -> Vec<(f64, u8)> {
    let mut v: Vec<(f64, u8)> = (0u8..0x80)
        .filter_map(|c| ref_decode(f, c).map(|x| (x, c)))
        .filter(|(x, _)| x.is_finite())
        .collect();
    v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    v
}

/// Expected encoding of `x`: nearest finite value, ties to the even code;
/// past the range: saturate (FN, FNUZ) or IEEE overflow to ±inf. `None`
/// means "some NaN code of the format".
fn ref_encode(f: &Fmt, pos: &[(f64, u8)], x: f32) -> Option<u8> {
    if x.is_nan() {
        return None;
    }
    let a = (x as f64).abs();
    let (max, max_code) = *pos.last().unwrap();
    let (prev, _) = pos[pos.len() - 2];
    let code = if f.kind == Kind::Ieee && a >= max + (max - prev) / 2.0 {
        // IEEE: rounds to the (unbounded-exponent) next value 2^(emax+1),
        // which is not representable: overflow.
        (((1u32 << f.exp_bits) - 1) << f.man_bits) as u8
    } else if a > max {
        max_code
    } else {
        let i = pos.partition_point(|(v, _)| *v < a);
        if pos[i].0 == a {
            pos[i].1
        } else {
            let (lo, lc) = pos[i - 1];
            let (hi, hc) = pos[i];
            let (dl, dh) = (a - lo, hi - a);
            if dl < dh {
                lc
            } else if dh < dl {
                hc
            } else if lc % 2 == 0 {
                lc
            } else {
                hc
            }
        }
    };
    Some(apply_sign(f, code, x.is_sign_negative()))
}

fn apply_sign(f: &Fmt, code: u8, negative: bool) -> u8 {
    if !negative {
        code
    } else if f.kind == Kind::Fnuz && code == 0 {
        0
    } else {
        code | 0x80
    }
}

fn is_nan_code(f: &Fmt, code: u8) -> bool {
    ref_decode(f, code).is_none()
}

fn check_encode(f: &Fmt, pos: &[(f64, u8)], x: f32) {
    let got = (f.encode)(x);
    match ref_encode(f, pos, x) {
        None => assert!(
            is_nan_code(f, got),
            "{}: {x:e} (bits {:#010x}) encoded to {got:#04x}, not a NaN code",
            f.name,
            x.to_bits()
        ),
        Some(want) => assert_eq!(
            got,
            want,
            "{}: {x:e} (bits {:#010x}) encoded to {got:#04x}, expected {want:#04x}",
            f.name,
            x.to_bits()
        ),
    }
}

/// Next f32 above a non-negative finite value.
fn up(x: f32) -> f32 {
    assert!(x >= 0.0 && x.is_finite());
    if x == 0.0 {
        f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// Next f32 below a positive value.
fn down(x: f32) -> f32 {
    assert!(x > 0.0);
    f32::from_bits(x.to_bits() - 1)
}

// ---- decoding ----------------------------------------------------------------

#[test]
fn decode_all_256_codes_matches_bit_fields() {
    for f in &ALL {
        for c in 0..=255u8 {
            let got = (f.decode)(c);
            match ref_decode(f, c) {
                None => assert!(got.is_nan(), "{} {c:#04x}: {got} is not NaN", f.name),
                Some(v) => {
                    assert_eq!(got as f64, v, "{} {c:#04x}", f.name);
                    assert_eq!(
                        got.to_bits(),
                        (v as f32).to_bits(),
                        "{} {c:#04x}: sign of zero",
                        f.name
                    );
                }
            }
        }
    }
}

#[test]
fn special_code_counts() {
    let count =
        |f: &Fmt, p: &dyn Fn(f32) -> bool| (0..=255u8).filter(|&c| p((f.decode)(c))).count();
    let nan = |x: f32| x.is_nan();
    let inf = |x: f32| x.is_infinite();
    assert_eq!(count(&E4M3, &nan), 2);
    assert_eq!(count(&E4M3, &inf), 0);
    assert_eq!(count(&FNUZ, &nan), 1);
    assert_eq!(count(&FNUZ, &inf), 0);
    assert_eq!(count(&E5M2, &nan), 6);
    assert_eq!(count(&E5M2, &inf), 2);
    // NaN codes exactly where the formats put them.
    for c in 0..=255u8 {
        assert_eq!(
            e4m3_to_f32(c).is_nan(),
            c == 0x7f || c == 0xff,
            "e4m3 {c:#04x}"
        );
        assert_eq!(e4m3fnuz_to_f32(c).is_nan(), c == 0x80, "fnuz {c:#04x}");
        assert_eq!(
            e5m2_to_f32(c).is_nan(),
            (0x7d..=0x7f).contains(&(c & 0x7f)),
            "e5m2 {c:#04x}"
        );
    }
    // Only e4m3 and e5m2 have a negative zero.
    assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    assert_eq!(e5m2_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    assert_eq!(e4m3fnuz_to_f32(0x00).to_bits(), 0.0f32.to_bits());
    assert_eq!(
        (0..=255u8).filter(|&c| e4m3fnuz_to_f32(c) == 0.0).count(),
        1
    );
}

#[test]
fn value_sets_hand_checked() {
    // e4m3 (E4M3FN): bias 7.
    assert_eq!(e4m3_to_f32(0x7e), 448.0);
    assert_eq!(e4m3_to_f32(0xfe), -448.0);
    assert_eq!(e4m3_to_f32(0x01), p2(-9) as f32);
    assert_eq!(e4m3_to_f32(0x07), (7.0 * p2(-9)) as f32);
    assert_eq!(e4m3_to_f32(0x08), p2(-6) as f32);
    assert_eq!(e4m3_to_f32(0x38), 1.0);
    assert_eq!(e4m3_to_f32(0x39), 1.125);
    assert_eq!(e4m3_to_f32(0x77), 240.0);
    assert_eq!(e4m3_to_f32(0x78), 256.0);
    // e4m3fnuz: bias 8.
    assert_eq!(e4m3fnuz_to_f32(0x7f), 240.0);
    assert_eq!(e4m3fnuz_to_f32(0xff), -240.0);
    assert_eq!(e4m3fnuz_to_f32(0x01), p2(-10) as f32);
    assert_eq!(e4m3fnuz_to_f32(0x08), p2(-7) as f32);
    assert_eq!(e4m3fnuz_to_f32(0x40), 1.0);
    assert_eq!(e4m3fnuz_to_f32(0xc0), -1.0);
    // e5m2: bias 15.
    assert_eq!(e5m2_to_f32(0x7b), 57344.0);
    assert_eq!(e5m2_to_f32(0xfb), -57344.0);
    assert_eq!(e5m2_to_f32(0x7c), f32::INFINITY);
    assert_eq!(e5m2_to_f32(0xfc), f32::NEG_INFINITY);
    assert_eq!(e5m2_to_f32(0x01), p2(-16) as f32);
    assert_eq!(e5m2_to_f32(0x04), p2(-14) as f32);
    assert_eq!(e5m2_to_f32(0x3c), 1.0);
    assert_eq!(e5m2_to_f32(0x3d), 1.25);

    assert_eq!(E4M3_MAX, 448.0);
    assert_eq!(E4M3FNUZ_MAX, 240.0);
    assert_eq!(E5M2_MAX, 57344.0);
}

#[test]
fn value_set_extremes_and_order() {
    for (f, max, min_sub, min_normal, n_pos) in [
        (&E4M3, 448.0, p2(-9), p2(-6), 126),
        (&FNUZ, 240.0, p2(-10), p2(-7), 127),
        (&E5M2, 57344.0, p2(-16), p2(-14), 123),
    ] {
        let finite: Vec<f64> = (0..=255u8)
            .map(|c| (f.decode)(c) as f64)
            .filter(|v| v.is_finite())
            .collect();
        let pos: Vec<f64> = finite.iter().copied().filter(|&v| v > 0.0).collect();
        assert_eq!(pos.len(), n_pos, "{} positive values", f.name);
        let largest = finite.iter().copied().fold(f64::MIN, f64::max);
        let smallest = finite.iter().copied().fold(f64::MAX, f64::min);
        assert_eq!(largest, max, "{}", f.name);
        assert_eq!(smallest, -max, "{}", f.name);
        assert_eq!(
            pos.iter().copied().fold(f64::MAX, f64::min),
            min_sub,
            "{}",
            f.name
        );
        // Exactly (2^m − 1) subnormals, multiples of min_sub below min_normal.
        let subs: Vec<f64> = pos.iter().copied().filter(|&v| v < min_normal).collect();
        assert_eq!(subs.len(), (1 << f.man_bits) - 1, "{}", f.name);
        for v in subs {
            assert_eq!((v / min_sub).fract(), 0.0);
        }
        // Positive codes increase with the code.
        let mut last = -1.0f64;
        for c in 0..0x80u8 {
            let v = (f.decode)(c) as f64;
            if v.is_nan() {
                continue;
            }
            assert!(v > last, "{} {c:#04x} not increasing", f.name);
            last = v;
            // Negative code mirrors it.
            let n = (f.decode)(c | 0x80);
            if !(f.kind == Kind::Fnuz && c == 0) {
                assert_eq!(n as f64, -v, "{} {:#04x}", f.name, c | 0x80);
            }
        }
    }
}

// ---- encoding ----------------------------------------------------------------

#[test]
fn round_trip_every_finite_code() {
    for f in &ALL {
        for c in 0..=255u8 {
            let v = (f.decode)(c);
            if v.is_nan() {
                continue;
            }
            assert_eq!((f.encode)(v), c, "{} {c:#04x} = {v}", f.name);
        }
    }
    assert_eq!(f32_to_e4m3(-0.0), 0x80);
    assert_eq!(f32_to_e5m2(-0.0), 0x80);
    assert_eq!(f32_to_e4m3fnuz(-0.0), 0x00);
    assert_eq!(f32_to_e4m3fnuz(0.0), 0x00);
}

#[test]
fn halfway_cases_round_to_even_code() {
    for f in &ALL {
        let pos = positives(f);
        for w in pos.windows(2) {
            let ((lo, lc), (hi, hc)) = (w[0], w[1]);
            assert_eq!(
                hc,
                lc + 1,
                "{}: adjacent values have adjacent codes",
                f.name
            );
            let mid = (lo + hi) / 2.0;
            let m = mid as f32;
            assert_eq!(m as f64, mid, "{}: midpoint {mid} not exact in f32", f.name);
            let even = if lc % 2 == 0 { lc } else { hc };
            assert_eq!(
                (f.encode)(m),
                even,
                "{}: midpoint {mid:e} of {lo:e} and {hi:e}",
                f.name
            );
            assert_eq!(
                (f.encode)(-m),
                apply_sign(f, even, true),
                "{}: midpoint -{mid:e}",
                f.name
            );
            // Just above and below the midpoint.
            assert_eq!((f.encode)(up(m)), hc, "{}: just above {mid:e}", f.name);
            assert_eq!((f.encode)(down(m)), lc, "{}: just below {mid:e}", f.name);
            assert_eq!(
                (f.encode)(-up(m)),
                apply_sign(f, hc, true),
                "{}: just below -{mid:e}",
                f.name
            );
            assert_eq!(
                (f.encode)(-down(m)),
                apply_sign(f, lc, true),
                "{}: just above -{mid:e}",
                f.name
            );
            // Quarter points go to the nearer value.
            let q1 = (lo + (hi - lo) / 4.0) as f32;
            let q3 = (lo + 3.0 * (hi - lo) / 4.0) as f32;
            assert_eq!((f.encode)(q1), lc, "{}: {q1:e}", f.name);
            assert_eq!((f.encode)(q3), hc, "{}: {q3:e}", f.name);
        }
    }
}

#[test]
fn subnormal_rounding_hand_checked() {
    let s = |k: f64| (k * p2(-10)) as f32; // e4m3: smallest subnormal = 2 · 2^-10
    assert_eq!(f32_to_e4m3(s(1.0)), 0x00); // half of 2^-9: tie to 0
    assert_eq!(f32_to_e4m3(up(s(1.0))), 0x01);
    assert_eq!(f32_to_e4m3(down(s(1.0))), 0x00);
    assert_eq!(f32_to_e4m3(-s(1.0)), 0x80);
    assert_eq!(f32_to_e4m3(s(3.0)), 0x02); // between 0x01 and 0x02: even
    assert_eq!(f32_to_e4m3(s(5.0)), 0x02); // between 0x02 and 0x03: even
    assert_eq!(f32_to_e4m3(s(7.0)), 0x04);
    assert_eq!(f32_to_e4m3(s(15.0)), 0x08); // between 0x07 (7·2^-9) and 2^-6
    assert_eq!(f32_to_e4m3(s(13.0)), 0x06);
    assert_eq!(f32_to_e4m3(1e-30), 0x00);
    assert_eq!(f32_to_e4m3(-1e-30), 0x80);
    assert_eq!(f32_to_e4m3(f32::from_bits(1)), 0x00);
    // fnuz: smallest subnormal 2^-10; negative underflow is +0 (no −0).
    assert_eq!(f32_to_e4m3fnuz((0.5 * p2(-10)) as f32), 0x00);
    assert_eq!(f32_to_e4m3fnuz(-(0.5 * p2(-10)) as f32), 0x00);
    assert_eq!(f32_to_e4m3fnuz(-up((0.5 * p2(-10)) as f32)), 0x81);
    assert_eq!(f32_to_e4m3fnuz((1.5 * p2(-10)) as f32), 0x02);
    assert_eq!(f32_to_e4m3fnuz(-1e-30), 0x00);
    // e5m2: smallest subnormal 2^-16.
    assert_eq!(f32_to_e5m2(p2(-17) as f32), 0x00);
    assert_eq!(f32_to_e5m2(up(p2(-17) as f32)), 0x01);
    assert_eq!(f32_to_e5m2((3.0 * p2(-17)) as f32), 0x02);
    assert_eq!(f32_to_e5m2((7.0 * p2(-17)) as f32), 0x04); // 3.5·2^-16 → 2^-14
}

#[test]
fn normal_rounding_hand_checked() {
    assert_eq!(f32_to_e4m3(1.0625), 0x38); // between 1 and 1.125
    assert_eq!(f32_to_e4m3(1.1875), 0x3a); // between 1.125 and 1.25
    assert_eq!(f32_to_e4m3(1.07), 0x39);
    assert_eq!(f32_to_e4m3(-1.0625), 0xb8);
    assert_eq!(f32_to_e4m3(1.9375), 0x40); // between 1.875 and 2 → 2
    assert_eq!(f32_to_e4m3fnuz(1.0625), 0x40);
    assert_eq!(f32_to_e4m3fnuz(-1.1875), 0xc2);
    assert_eq!(f32_to_e5m2(1.125), 0x3c); // between 1 and 1.25
    assert_eq!(f32_to_e5m2(1.375), 0x3e); // between 1.25 and 1.5
}

#[test]
fn saturation_and_overflow() {
    // e4m3 saturates to ±448; 464 is the midpoint to the virtual 480.
    assert_eq!(f32_to_e4m3(448.0), 0x7e);
    assert_eq!(f32_to_e4m3(464.0), 0x7e);
    assert_eq!(f32_to_e4m3(up(464.0)), 0x7e);
    assert_eq!(f32_to_e4m3(480.0), 0x7e);
    assert_eq!(f32_to_e4m3(1e9), 0x7e);
    assert_eq!(f32_to_e4m3(f32::MAX), 0x7e);
    assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
    assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xfe);
    assert_eq!(f32_to_e4m3(-464.0), 0xfe);
    assert_eq!(f32_to_e4m3(-1e9), 0xfe);
    assert_eq!(f32_to_e4m3(432.0), 0x7e); // between 416 and 448: even (448)
    assert_eq!(f32_to_e4m3(down(432.0)), 0x7d);
    // fnuz saturates to ±240.
    assert_eq!(f32_to_e4m3fnuz(240.0), 0x7f);
    assert_eq!(f32_to_e4m3fnuz(248.0), 0x7f);
    assert_eq!(f32_to_e4m3fnuz(1e9), 0x7f);
    assert_eq!(f32_to_e4m3fnuz(f32::INFINITY), 0x7f);
    assert_eq!(f32_to_e4m3fnuz(-240.0), 0xff);
    assert_eq!(f32_to_e4m3fnuz(f32::NEG_INFINITY), 0xff);
    assert_eq!(f32_to_e4m3fnuz(-1e9), 0xff);
    // e5m2: IEEE overflow. 61440 is the midpoint to 2^16.
    assert_eq!(f32_to_e5m2(57344.0), 0x7b);
    assert_eq!(f32_to_e5m2(down(61440.0)), 0x7b);
    assert_eq!(f32_to_e5m2(61440.0), 0x7c);
    assert_eq!(f32_to_e5m2(65536.0), 0x7c);
    assert_eq!(f32_to_e5m2(1e9), 0x7c);
    assert_eq!(f32_to_e5m2(f32::INFINITY), 0x7c);
    assert_eq!(f32_to_e5m2(-61440.0), 0xfc);
    assert_eq!(f32_to_e5m2(-down(61440.0)), 0xfb);
    assert_eq!(f32_to_e5m2(f32::NEG_INFINITY), 0xfc);
    assert_eq!(e5m2_to_f32(f32_to_e5m2(1e9)), f32::INFINITY);
}

#[test]
fn nan_stays_nan() {
    let nans = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling, smallest payload
        f32::from_bits(0xff80_0001),
        f32::from_bits(0x7fff_ffff),
        f32::from_bits(0xffc0_0000),
    ];
    for x in nans {
        let c = f32_to_e4m3(x);
        assert_eq!(c & 0x7f, 0x7f, "e4m3 NaN {:#010x} → {c:#04x}", x.to_bits());
        assert!(e4m3_to_f32(c).is_nan());
        assert_eq!(f32_to_e4m3fnuz(x), 0x80, "fnuz NaN {:#010x}", x.to_bits());
        let c = f32_to_e5m2(x);
        assert!(
            (0x7d..=0x7f).contains(&(c & 0x7f)),
            "e5m2 NaN {:#010x} → {c:#04x}",
            x.to_bits()
        );
        assert!(e5m2_to_f32(c).is_nan());
        assert!(round_to(DType::F8E4M3, x).is_nan());
        assert!(round_to(DType::F8E4M3Fnuz, x).is_nan());
        assert!(round_to(DType::F8E5M2, x).is_nan());
        assert!(round_to(DType::BF16, x).is_nan());
        assert!(round_to(DType::F16, x).is_nan());
    }
}

#[test]
fn encode_sweep_matches_reference() {
    // Every 4093rd f32 bit pattern of both signs (NaNs, infinities and
    // subnormals included), plus every value near the FP8 range densely.
    let mut xs: Vec<f32> = (0..=u32::MAX).step_by(4093).map(f32::from_bits).collect();
    let lo = (p2(-18) as f32).to_bits();
    let hi = 70000f32.to_bits();
    xs.extend((lo..hi).step_by(331).map(f32::from_bits));
    xs.extend((lo..hi).step_by(331).map(|b| -f32::from_bits(b)));
    for f in &ALL {
        let pos = positives(f);
        for &x in &xs {
            check_encode(f, &pos, x);
        }
        // Every decoded value, midpoint and neighbour, both signs.
        for w in pos.windows(2) {
            let m = ((w[0].0 + w[1].0) / 2.0) as f32;
            for x in [w[0].0 as f32, m, up(m), down(m), w[1].0 as f32] {
                check_encode(f, &pos, x);
                check_encode(f, &pos, -x);
            }
        }
    }
}

// ---- UE8M0 -------------------------------------------------------------------

/// Smallest power of two ≥ s (s positive, finite), +inf past 2^127.
fn ref_round_up(s: f32) -> f32 {
    for e in -149..=127 {
        if p2(e) >= s as f64 {
            return p2(e) as f32;
        }
    }
    f32::INFINITY
}

#[test]
fn ue8m0_round_up_hand_checked() {
    assert_eq!(ue8m0_round_up(1.0), 1.0);
    assert_eq!(ue8m0_round_up(1.000_000_1), 2.0);
    assert_eq!(ue8m0_round_up(0.75), 1.0);
    assert_eq!(ue8m0_round_up(3.0), 4.0);
    assert_eq!(ue8m0_round_up(0.5000001), 1.0);
    assert_eq!(ue8m0_round_up(448.0), 512.0);
    assert_eq!(ue8m0_round_up(1.0 / 448.0), (1.0 / 256.0) as f32);
    for e in -149..=127 {
        let v = p2(e) as f32;
        assert_eq!(ue8m0_round_up(v), v, "2^{e} unchanged");
    }
    // f32 subnormals.
    assert_eq!(ue8m0_round_up(f32::from_bits(1)), f32::from_bits(1));
    assert_eq!(ue8m0_round_up(f32::from_bits(3)), f32::from_bits(4));
    assert_eq!(ue8m0_round_up(f32::from_bits(5)), f32::from_bits(8));
    assert_eq!(ue8m0_round_up(f32::from_bits(0x40_0000)), p2(-127) as f32);
    assert_eq!(ue8m0_round_up(f32::from_bits(0x40_0001)), f32::MIN_POSITIVE);
    assert_eq!(ue8m0_round_up(f32::from_bits(0x7f_ffff)), f32::MIN_POSITIVE);
    // Past 2^127 there is no f32 power of two.
    assert_eq!(ue8m0_round_up(f32::MAX), f32::INFINITY);
}

#[test]
fn ue8m0_round_up_sweep() {
    for bits in (1u32..0x7f80_0000).step_by(1009) {
        let s = f32::from_bits(bits);
        assert_eq!(
            ue8m0_round_up(s).to_bits(),
            ref_round_up(s).to_bits(),
            "{s:e}"
        );
    }
}

#[test]
fn ue8m0_bytes() {
    assert_eq!(f32_to_ue8m0(1.0), 127);
    assert_eq!(ue8m0_to_f32(127), 1.0);
    assert_eq!(ue8m0_to_f32(128), 2.0);
    assert_eq!(ue8m0_to_f32(126), 0.5);
    assert_eq!(ue8m0_to_f32(0), p2(-127) as f32);
    assert_eq!(ue8m0_to_f32(254), p2(127) as f32);
    assert!(ue8m0_to_f32(0xff).is_nan());
    for c in 0..=254u8 {
        assert_eq!(ue8m0_to_f32(c) as f64, p2(c as i32 - 127), "{c}");
        assert_eq!(f32_to_ue8m0(ue8m0_to_f32(c)), c, "{c}");
    }
    // Non-powers are rounded up first.
    assert_eq!(f32_to_ue8m0(3.0), 129);
    assert_eq!(f32_to_ue8m0(0.75), 127);
    assert_eq!(f32_to_ue8m0(1.000_000_1), 128);
    // Below 2^-127 the smallest code (2^-127) still covers the value.
    assert_eq!(f32_to_ue8m0(p2(-130) as f32), 0);
    assert_eq!(f32_to_ue8m0(f32::from_bits(1)), 0);
    // NaN, zero, negatives and overflow: the NaN code.
    assert_eq!(f32_to_ue8m0(f32::NAN), 0xff);
    assert_eq!(f32_to_ue8m0(0.0), 0xff);
    assert_eq!(f32_to_ue8m0(-1.0), 0xff);
    assert_eq!(f32_to_ue8m0(f32::INFINITY), 0xff);
    assert_eq!(f32_to_ue8m0(f32::MAX), 0xff);
    // round_to(E8M0) is the round-up.
    assert_eq!(round_to(DType::E8M0, 3.0), 4.0);
    assert_eq!(round_to(DType::E8M0, 0.25), 0.25);
}

// ---- bf16 / f16 --------------------------------------------------------------

/// Round-to-nearest-even f32 → bf16 bits, for finite (and infinite) inputs.
fn ref_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    ((b + 0x7fff + lsb) >> 16) << 16
}

#[test]
fn bf16_halfway_to_even() {
    let f = f32::from_bits;
    // 1.0 = 0x3f80; 0x3f808000 lies halfway to 0x3f81.
    assert_eq!(round_bf16(f(0x3f80_8000)).to_bits(), 0x3f80_0000);
    assert_eq!(round_bf16(f(0x3f80_8001)).to_bits(), 0x3f81_0000);
    assert_eq!(round_bf16(f(0x3f80_7fff)).to_bits(), 0x3f80_0000);
    assert_eq!(round_bf16(f(0x3f81_8000)).to_bits(), 0x3f82_0000);
    assert_eq!(round_bf16(f(0x3f81_7fff)).to_bits(), 0x3f81_0000);
    assert_eq!(round_bf16(f(0xbf81_8000)).to_bits(), 0xbf82_0000);
    assert_eq!(round_bf16(f(0xbf80_8000)).to_bits(), 0xbf80_0000);
    assert_eq!(round_bf16(1.0 + p2(-8) as f32), 1.0);
    assert_eq!(round_bf16(1.0 + 3.0 * p2(-8) as f32), 1.0 + p2(-6) as f32);
    // Subnormal halfway, and the carry into the exponent.
    assert_eq!(round_bf16(f(0x0000_8000)).to_bits(), 0);
    assert_eq!(round_bf16(f(0x0001_8000)).to_bits(), 0x0002_0000);
    assert_eq!(round_bf16(f(0x3fff_8000)).to_bits(), 0x4000_0000);
    // Overflow past the largest bf16 rounds to inf.
    assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
    assert_eq!(round_bf16(f(0x7f7f_7fff)).to_bits(), 0x7f7f_0000);
    assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
    // NaN kept, even when only low payload bits are set.
    assert!(round_bf16(f(0x7f80_0001)).is_nan());
    assert!(round_bf16(f(0xff80_0001)).is_nan());
    assert!(round_bf16(f32::NAN).is_nan());
}

#[test]
fn bf16_sweep_matches_reference() {
    for bits in (0..=u32::MAX).step_by(997) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            assert!(round_bf16(x).is_nan());
            continue;
        }
        assert_eq!(round_bf16(x).to_bits(), ref_bf16(x), "{x:e} ({bits:#010x})");
        assert_eq!(round_to(DType::BF16, x).to_bits(), ref_bf16(x));
    }
}

#[test]
fn f16_rounding_hand_checked() {
    assert_eq!(round_f16(1.0 + p2(-11) as f32), 1.0);
    assert_eq!(round_f16(1.0 + 3.0 * p2(-11) as f32), (1.0 + p2(-9)) as f32);
    assert_eq!(round_f16(65504.0), 65504.0);
    assert_eq!(round_f16(down(65520.0)), 65504.0);
    assert_eq!(round_f16(65520.0), f32::INFINITY);
    assert_eq!(round_f16(p2(-25) as f32), 0.0); // half of the smallest subnormal
    assert_eq!(round_f16(up(p2(-25) as f32)), p2(-24) as f32);
    assert!(round_f16(f32::NAN).is_nan());
    assert_eq!(round_to(DType::F16, 65520.0), f32::INFINITY);
}

#[test]
fn ulp_bf16_values() {
    assert_eq!(ulp_bf16(1.0), p2(-7) as f32);
    assert_eq!(ulp_bf16(-1.0), p2(-7) as f32);
    assert_eq!(ulp_bf16(1.5), p2(-7) as f32);
    assert_eq!(ulp_bf16(down(2.0)), p2(-7) as f32);
    assert_eq!(ulp_bf16(2.0), p2(-6) as f32);
    assert_eq!(ulp_bf16(0.75), p2(-8) as f32);
    assert_eq!(ulp_bf16(448.0), 2.0);
    assert_eq!(ulp_bf16(f32::MIN_POSITIVE), p2(-133) as f32);
    assert_eq!(ulp_bf16(f32::from_bits(1)), p2(-133) as f32);
    assert_eq!(ulp_bf16(0.0), p2(-133) as f32);
    assert_eq!(ulp_bf16(f32::INFINITY), f32::INFINITY);
    // The spacing of bf16 values at x: the next bf16 above 1.0 is 1 + ulp.
    for x in [1.0f32, 3.0, 1000.0, 1e-20, 1e30] {
        let b = round_bf16(x).to_bits();
        let next = f32::from_bits(b + 0x1_0000);
        assert_eq!(next - f32::from_bits(b), ulp_bf16(x), "{x}");
    }
}

// ---- round_to / max_finite ---------------------------------------------------

#[test]
fn round_to_and_max_finite() {
    assert_eq!(round_to(DType::F8E4M3, 464.0), 448.0);
    assert_eq!(round_to(DType::F8E4M3, 1.0625), 1.0);
    assert_eq!(round_to(DType::F8E4M3Fnuz, 1000.0), 240.0);
    assert_eq!(round_to(DType::F8E4M3Fnuz, -0.0).to_bits(), 0);
    assert_eq!(round_to(DType::F8E5M2, 61440.0), f32::INFINITY);
    assert_eq!(round_to(DType::F8E5M2, 1.125), 1.0);
    assert_eq!(round_to(DType::F32, 1.000_000_1), 1.000_000_1);
    assert_eq!(round_to(DType::I32, 1.7), 1.7);
    assert_eq!(round_to(DType::Bool, 0.3), 0.3);
    assert_eq!(max_finite(DType::F8E4M3), 448.0);
    assert_eq!(max_finite(DType::F8E4M3Fnuz), 240.0);
    assert_eq!(max_finite(DType::F8E5M2), 57344.0);
    assert_eq!(max_finite(DType::BF16), f32::from_bits(0x7f7f_0000));
    assert_eq!(max_finite(DType::F16), 65504.0);
    assert_eq!(max_finite(DType::F32), f32::MAX);
}
