//! Comparison helpers: bitwise equality, elementwise tolerances (NaN and
//! infinity positions must match), `calc_diff` as SPEC.md §3 defines it,
//! and the shape of the errors backends must report.

use deepport_core::{DType, Error, HostTensor};

/// `calc_diff(x, y) = 1 − 2·Σxy / Σ(x² + y²)` in f64 (SPEC §3). Two all-zero
/// vectors give 0; a NaN or infinity anywhere, or different lengths, give
/// NaN, which fails every threshold.
pub fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
    if x.len() != y.len() {
        return f64::NAN;
    }
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        if !a.is_finite() || !b.is_finite() {
            return f64::NAN;
        }
        let (a, b) = (a as f64, b as f64);
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / sq
}

/// Root mean square of the finite values (0 for none).
pub fn rms(v: &[f32]) -> f64 {
    let (mut s, mut n) = (0.0f64, 0usize);
    for &x in v.iter().filter(|x| x.is_finite()) {
        s += (x as f64) * (x as f64);
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        (s / n as f64).sqrt()
    }
}

/// One unit in the last place of `x` in `dtype` (the spacing of that
/// format's values at `|x|`); f32 for non-float dtypes.
pub fn ulp(dtype: DType, x: impl Into<f64>) -> f64 {
    let (man, emin) = match dtype {
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        DType::F8E4M3 => (3, -6),
        DType::F8E4M3Fnuz => (3, -7),
        DType::F8E5M2 => (2, -14),
        _ => (23, -126),
    };
    let a = x.into().abs();
    if !a.is_finite() {
        return f64::INFINITY;
    }
    let e = if a == 0.0 {
        emin
    } else {
        (a.log2().floor() as i32).max(emin)
    };
    // log2 of values just below a power of two can round up.
    let e = if e > emin && 2f64.powi(e) > a {
        e - 1
    } else {
        e
    };
    2f64.powi(e - man)
}

/// Equal dtype, shape and bytes, or a panic naming the first differing
/// element (not the whole tensors).
pub fn assert_bytes(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    if got.bytes() != want.bytes() {
        let size = got.dtype().size().max(1);
        let (g, r) = (got.bytes(), want.bytes());
        let i = (0..g.len()).find(|&i| g[i] != r[i]).unwrap_or(0) / size;
        panic!(
            "{what}: element {i} differs: got {:02x?}, want {:02x?}",
            &g[i * size..(i + 1) * size],
            &r[i * size..(i + 1) * size],
        );
    }
}

/// Elementwise comparison of two float tensors (or value lists): NaN
/// positions and infinities must match exactly, finite values lie within
/// `tol(index, reference)`. Returns the worst `error / tolerance`.
pub fn assert_close_values(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: impl Fn(usize, f32) -> f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b.is_nan() || a.is_nan() {
            assert!(
                a.is_nan() && b.is_nan(),
                "{what}[{i}]: got {a}, want {b} (NaN mismatch)"
            );
            continue;
        }
        if b.is_infinite() || a.is_infinite() {
            assert_eq!(a, b, "{what}[{i}]: infinities differ");
            continue;
        }
        let err = (a as f64 - b as f64).abs();
        let t = tol(i, b);
        assert!(
            err <= t,
            "{what}[{i}]: got {a}, want {b}, error {err:e} > tolerance {t:e}"
        );
        if t > 0.0 {
            worst = worst.max(err / t);
        }
    }
    worst
}

/// [`assert_close_values`] on two host tensors of the same dtype and shape.
pub fn assert_close(
    what: &str,
    got: &HostTensor,
    want: &HostTensor,
    tol: impl Fn(usize, f32) -> f64,
) -> f64 {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_close_values(what, &got.to_f32_vec(), &want.to_f32_vec(), tol)
}

/// Largest absolute and relative (`|a − r| / |r|`, over `|r| > 0`)
/// difference of the finite pairs.
pub fn max_abs_rel(got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut abs, mut rel) = (0f64, 0f64);
    for (&a, &r) in got.iter().zip(want) {
        if a.is_finite() && r.is_finite() {
            let d = (a as f64 - r as f64).abs();
            abs = abs.max(d);
            if r != 0.0 {
                rel = rel.max(d / (r as f64).abs());
            }
        }
    }
    (abs, rel)
}

/// Two float lists are equal bit for bit (NaN payloads included).
pub fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: got {a}, want {b}");
    }
}

/// `e` is `IndexOutOfRange` on `op`'s argument `arg` at `position` with
/// `value` (and the range text, where given); `when` names the check.
pub fn assert_index_error(
    when: &str,
    e: Error,
    (op, arg): (&str, &str),
    position: &[usize],
    value: i64,
    range: Option<&str>,
) {
    match e {
        Error::IndexOutOfRange {
            op: o,
            arg: a,
            position: p,
            value: v,
            range: r,
        } => {
            assert_eq!((o, a), (op, arg), "{when}");
            assert_eq!(p, position, "{when}");
            assert_eq!(v, value, "{when}");
            if let Some(range) = range {
                assert_eq!(r, range, "{when}");
            }
        }
        other => panic!("{when}: expected IndexOutOfRange, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calc_diff_matches_its_definition() {
        assert_eq!(calc_diff(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(calc_diff(&[0.0; 4], &[0.0; 4]), 0.0);
        assert_eq!(calc_diff(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
        assert_eq!(calc_diff(&[1.0, -2.0], &[-1.0, 2.0]), 2.0);
        assert!(calc_diff(&[f32::NAN], &[1.0]).is_nan());
        assert!(calc_diff(&[f32::INFINITY], &[1.0]).is_nan());
        assert!(calc_diff(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn ulp_of_each_format() {
        assert_eq!(ulp(DType::F32, 1.0), 2f64.powi(-23));
        assert_eq!(ulp(DType::BF16, 1.0), 2f64.powi(-7));
        assert_eq!(ulp(DType::BF16, 1.99), 2f64.powi(-7));
        assert_eq!(ulp(DType::F16, 0.0), 2f64.powi(-24));
        assert_eq!(ulp(DType::F8E4M3, 448.0), 32.0);
    }

    #[test]
    fn close_catches_nan_and_distance() {
        let ok = std::panic::catch_unwind(|| {
            assert_close_values("x", &[1.0, f32::NAN], &[1.0, f32::NAN], |_, _| 0.0)
        });
        assert!(ok.is_ok());
        let nan =
            std::panic::catch_unwind(|| assert_close_values("x", &[f32::NAN], &[1.0], |_, _| 1e9));
        assert!(nan.is_err());
        let far =
            std::panic::catch_unwind(|| assert_close_values("x", &[1.1], &[1.0], |_, _| 0.05));
        assert!(far.is_err());
        assert_eq!(max_abs_rel(&[1.5, 2.0], &[1.0, 2.0]), (0.5, 0.5));
    }
}
