//! FP8 follows the device: MI300 (gfx940/941/942) computes in e4m3fnuz
//! (bias 8, max 240, NaN = `0x80`, no −0); MI350 (gfx950) and every other
//! target in OCP e4m3 (bias 7, max 448). DeepSeek-V3 checkpoints hold
//! OCP e4m3 weights with f32 (or UE8M0) block scales; [`ocp_to_fnuz`]
//! converts a weight and its scales for a gfx94x device without changing
//! one dequantized value.
//!
//! The conversion is exact: an OCP byte read as e4m3fnuz is worth exactly
//! half (same sign, mantissa and exponent field; the bias is one larger,
//! subnormals included), so every finite byte is kept and every scale is
//! doubled — 448 becomes the fnuz byte of 224, times a doubled scale.
//! Rounding into [-240, 240] instead would clip the weights beyond 240.
//! The two bytes that do not carry over: OCP −0 (`0x80`) is NaN in fnuz,
//! so it becomes +0 (`0x00`, the same dequantized value); OCP NaN
//! (`0x7f`/`0xff`) becomes fnuz NaN (`0x80`).
//!
//! The other way ([`fnuz_to_ocp`], an MI300 checkpoint on another arch):
//! each value re-encoded in OCP with the scales unchanged, exact but for
//! 16 tiny bytes (|v| < 2^-6) that round by at most 2^-10.

use deepport_core::{DType, Error, HostTensor, Result};

/// Whether `gfx` (target features allowed) computes FP8 in e4m3fnuz.
pub fn is_fnuz_arch(gfx: &str) -> bool {
    let base = gfx.split(':').next().unwrap_or(gfx);
    matches!(base, "gfx940" | "gfx941" | "gfx942")
}

/// The e4m3 dtype of a device of architecture `gfx`.
pub fn fp8_dtype(gfx: &str) -> DType {
    if is_fnuz_arch(gfx) {
        DType::F8E4M3Fnuz
    } else {
        DType::F8E4M3
    }
}

/// The e4m3fnuz byte worth half of the OCP e4m3 byte `b` (NaN stays NaN,
/// −0 becomes +0).
pub fn ocp_byte_to_fnuz_half(b: u8) -> u8 {
    match b {
        0x7f | 0xff => 0x80,
        0x80 => 0x00,
        other => other,
    }
}

fn invalid(arg: &'static str, msg: String) -> Error {
    Error::invalid("ocp_to_fnuz", arg, msg)
}

/// Doubles a scale tensor (f32, bf16, f16 exactly unless it overflows to
/// inf, which is reported; UE8M0 by one in the exponent byte).
fn double_scales(scale: &HostTensor) -> Result<HostTensor> {
    match scale.dtype() {
        DType::E8M0 => {
            let mut out = scale.clone();
            for b in out.bytes_mut() {
                match *b {
                    0xff => {}
                    0xfe => {
                        return Err(invalid(
                            "scale",
                            "a UE8M0 scale of 2^127 cannot be doubled".into(),
                        ))
                    }
                    v => *b = v + 1,
                }
            }
            Ok(out)
        }
        dt @ (DType::F32 | DType::BF16 | DType::F16) => {
            let v = scale.to_f32_vec();
            let doubled: Vec<f32> = v.iter().map(|s| s * 2.0).collect();
            let out = HostTensor::from_f32(dt, scale.shape(), &doubled);
            // Doubling is exact in every float format unless it overflows.
            if let Some(i) = v
                .iter()
                .zip(out.to_f32_vec())
                .position(|(s, d)| s.is_finite() && !d.is_finite())
            {
                return Err(invalid(
                    "scale",
                    format!(
                        "scale {} at flat index {i} overflows {dt} when doubled",
                        v[i]
                    ),
                ));
            }
            Ok(out)
        }
        other => Err(invalid(
            "scale",
            format!("scales of dtype {other} (expected f32, bf16, f16 or e8m0)"),
        )),
    }
}

/// Converts an OCP e4m3 weight and its scales (any block shape: the
/// scales are only doubled) to e4m3fnuz with the same dequantized values.
/// A weight already in e4m3fnuz is returned unchanged.
pub fn ocp_to_fnuz(weight: &HostTensor, scale: &HostTensor) -> Result<(HostTensor, HostTensor)> {
    match weight.dtype() {
        DType::F8E4M3Fnuz => Ok((weight.clone(), scale.clone())),
        DType::F8E4M3 => {
            let bytes: Vec<u8> = weight
                .bytes()
                .iter()
                .map(|&b| ocp_byte_to_fnuz_half(b))
                .collect();
            let w = HostTensor::from_bytes(DType::F8E4M3Fnuz, weight.shape(), bytes)?;
            Ok((w, double_scales(scale)?))
        }
        other => Err(invalid(
            "weight",
            format!("dtype {other} is not e4m3 (expected e4m3 or e4m3fnuz)"),
        )),
    }
}

/// Converts an e4m3fnuz weight (an MI300 checkpoint) to OCP e4m3 for the
/// other archs, scales unchanged: every fnuz value is re-encoded as the
/// OCP byte of the same value (fnuz's range, ±240, lies inside OCP's).
/// Exact for every byte but the eight odd multiples of 2^-10 below 2^-6
/// on each side (fnuz's subnormals and smallest binade have a step of
/// 2^-10; OCP's step there is 2^-9), which round to the nearest even OCP
/// value, as `formats::f32_to_e4m3` rounds; `0x80`
/// (NaN) becomes `0x7f`. Returns the weight and how many bytes were
/// rounded. An OCP weight is returned unchanged.
pub fn fnuz_to_ocp(weight: &HostTensor) -> Result<(HostTensor, usize)> {
    use deepport_core::formats::{e4m3_to_f32, e4m3fnuz_to_f32, f32_to_e4m3};
    match weight.dtype() {
        DType::F8E4M3 => Ok((weight.clone(), 0)),
        DType::F8E4M3Fnuz => {
            let mut rounded = 0;
            let bytes: Vec<u8> = weight
                .bytes()
                .iter()
                .map(|&b| {
                    let v = e4m3fnuz_to_f32(b);
                    if v.is_nan() {
                        return 0x7f;
                    }
                    let o = f32_to_e4m3(v);
                    if e4m3_to_f32(o) != v {
                        rounded += 1;
                    }
                    o
                })
                .collect();
            Ok((
                HostTensor::from_bytes(DType::F8E4M3, weight.shape(), bytes)?,
                rounded,
            ))
        }
        other => Err(invalid(
            "weight",
            format!("dtype {other} is not e4m3 (expected e4m3 or e4m3fnuz)"),
        )),
    }
}

/// A weight and its scales in the FP8 format of a device of architecture
/// `gfx`: an OCP weight becomes e4m3fnuz on gfx94x (exact, scales
/// doubled); an e4m3fnuz weight becomes OCP elsewhere (scales unchanged;
/// see [`fnuz_to_ocp`] for the 16 bytes that round).
pub fn for_device(
    gfx: &str,
    weight: &HostTensor,
    scale: &HostTensor,
) -> Result<(HostTensor, HostTensor)> {
    if is_fnuz_arch(gfx) {
        ocp_to_fnuz(weight, scale)
    } else {
        Ok((fnuz_to_ocp(weight)?.0, scale.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepport_core::formats::{e4m3_to_f32, e4m3fnuz_to_f32, ue8m0_to_f32};

    #[test]
    fn every_byte_dequantizes_to_the_same_value() {
        let scales = [1.0f32, 0.5, 3.0e-3, 1.7e5];
        let w = HostTensor::from_bytes(DType::F8E4M3, &[256], (0..=255u8).collect()).unwrap();
        for s in scales {
            let sc = HostTensor::from_f32(DType::F32, &[1], &[s]);
            let (wf, sf) = ocp_to_fnuz(&w, &sc).unwrap();
            assert_eq!(wf.dtype(), DType::F8E4M3Fnuz);
            let s2 = sf.to_f32_vec()[0];
            assert_eq!(s2, 2.0 * s);
            for b in 0..=255u8 {
                let before = e4m3_to_f32(b) * s;
                let after = e4m3fnuz_to_f32(wf.bytes()[b as usize]) * s2;
                if before.is_nan() {
                    assert!(after.is_nan(), "{b:#x}");
                } else {
                    assert_eq!(before, after, "byte {b:#x} scale {s}");
                }
            }
        }
    }

    #[test]
    fn values_beyond_240_negative_zero_and_nan() {
        // 448 (0x7e), -448 (0xfe), 256 (0x78), 240 (0x77), -0, NaN.
        let w = HostTensor::from_bytes(
            DType::F8E4M3,
            &[2, 3],
            vec![0x7e, 0xfe, 0x78, 0x77, 0x80, 0x7f],
        )
        .unwrap();
        let s = HostTensor::from_f32(DType::F32, &[1, 1], &[1.0]);
        let (wf, sf) = ocp_to_fnuz(&w, &s).unwrap();
        assert_eq!(wf.bytes(), &[0x7e, 0xfe, 0x78, 0x77, 0x00, 0x80]);
        let deq: Vec<f32> = wf
            .bytes()
            .iter()
            .map(|&b| e4m3fnuz_to_f32(b) * sf.to_f32_vec()[0])
            .collect();
        assert_eq!(&deq[..5], &[448.0, -448.0, 256.0, 240.0, 0.0]);
        assert!(deq[5].is_nan());
        // Beyond 240 the fnuz byte alone could not hold the value.
        assert!(e4m3fnuz_to_f32(wf.bytes()[0]) <= 240.0);
    }

    #[test]
    fn ue8m0_and_bf16_scales_double_exactly() {
        let w = HostTensor::from_bytes(DType::F8E4M3, &[2], vec![0x7e, 0x01]).unwrap();
        let s = HostTensor::from_bytes(DType::E8M0, &[2], vec![127, 0xff]).unwrap();
        let (_, sf) = ocp_to_fnuz(&w, &s).unwrap();
        assert_eq!(sf.bytes(), &[128, 0xff]);
        assert_eq!(ue8m0_to_f32(sf.bytes()[0]), 2.0);
        let top = HostTensor::from_bytes(DType::E8M0, &[1], vec![0xfe]).unwrap();
        assert!(ocp_to_fnuz(&w, &top).is_err());
        let b = HostTensor::from_f32(DType::BF16, &[1], &[0.375]);
        assert_eq!(ocp_to_fnuz(&w, &b).unwrap().1.to_f32_vec(), vec![0.75]);
        let big = HostTensor::from_f32(DType::F32, &[1], &[f32::MAX]);
        assert!(matches!(
            ocp_to_fnuz(&w, &big),
            Err(Error::Invalid { arg: "scale", .. })
        ));
    }

    #[test]
    fn fnuz_checkpoints_become_ocp_with_the_same_values() {
        use deepport_core::formats::{e4m3_to_f32, e4m3fnuz_to_f32};
        let w = HostTensor::from_bytes(DType::F8E4M3Fnuz, &[256], (0..=255u8).collect()).unwrap();
        let (o, rounded) = fnuz_to_ocp(&w).unwrap();
        assert_eq!(o.dtype(), DType::F8E4M3);
        let mut off = Vec::new();
        for b in 0..=255u8 {
            let (before, after) = (e4m3fnuz_to_f32(b), e4m3_to_f32(o.bytes()[b as usize]));
            if before.is_nan() {
                assert!(after.is_nan());
            } else if before != after {
                assert!((before - after).abs() <= 2f32.powi(-10), "{b:#x}");
                off.push(b);
            }
        }
        // Exactly the odd multiples of 2^-10 below 2^-6, both signs.
        let want: Vec<u8> = (0..8u8)
            .map(|i| 2 * i + 1)
            .chain((0..8u8).map(|i| 0x81 + 2 * i))
            .collect();
        assert_eq!(off, want);
        assert_eq!(rounded, off.len());
        // 240 stays 240; fnuz NaN becomes OCP NaN.
        assert_eq!(e4m3_to_f32(o.bytes()[0x7f]), 240.0);
        assert_eq!(o.bytes()[0x80], 0x7f);
        // Round trip OCP -> fnuz -> OCP (scales doubled, then unchanged):
        // every finite value back, -0 as +0.
        let ocp = HostTensor::from_bytes(DType::F8E4M3, &[256], (0..=255u8).collect()).unwrap();
        let s = HostTensor::from_f32(DType::F32, &[1], &[1.0]);
        let (f, s2) = ocp_to_fnuz(&ocp, &s).unwrap();
        let (back, _) = fnuz_to_ocp(&f).unwrap();
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            let w = e4m3_to_f32(back.bytes()[b as usize]) * s2.to_f32_vec()[0];
            assert!(
                v.is_nan() && w.is_nan()
                    || v == w
                    || (v.abs() < 2f32.powi(-5) && (v - w).abs() <= 2f32.powi(-9)),
                "{b:#x}: {v} vs {w}"
            );
        }
    }

    #[test]
    fn follows_the_arch() {
        assert!(is_fnuz_arch("gfx942:sramecc+:xnack-") && is_fnuz_arch("gfx940"));
        assert!(!is_fnuz_arch("gfx950") && !is_fnuz_arch("gfx90a"));
        assert_eq!(fp8_dtype("gfx942"), DType::F8E4M3Fnuz);
        assert_eq!(fp8_dtype("gfx950"), DType::F8E4M3);
        let w = HostTensor::from_bytes(DType::F8E4M3, &[1], vec![0x80]).unwrap();
        let s = HostTensor::from_f32(DType::F32, &[1], &[1.0]);
        assert_eq!(for_device("gfx950", &w, &s).unwrap().0.bytes(), &[0x80]);
        let wf = HostTensor::from_bytes(DType::F8E4M3Fnuz, &[1], vec![0x7f]).unwrap();
        let (o, so) = for_device("gfx950", &wf, &s).unwrap();
        assert_eq!((o.dtype(), o.to_f32_vec()[0]), (DType::F8E4M3, 240.0));
        assert_eq!(so.to_f32_vec(), vec![1.0]);
        assert_eq!(for_device("gfx942", &w, &s).unwrap().0.bytes(), &[0x00]);
        let bad = HostTensor::from_f32(DType::F32, &[1], &[1.0]);
        assert!(ocp_to_fnuz(&bad, &s).is_err());
        assert!(ocp_to_fnuz(&w, &HostTensor::from_i32(&[1], &[1])).is_err());
    }
}
