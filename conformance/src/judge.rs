//! How outputs are judged: metrics, tolerances and the [`Check`] each one
//! produces (SPEC.md, "Judged" paragraphs; DESIGN.md, "Judgement").
//!
//! Every comparison takes the actual values `a` (the backend under test) and
//! the reference values `r` (`cpu-ref`). Tolerances never name a backend.
//! NaN is never "close" to a number: wherever the reference is finite and the
//! actual value is not (a poisoned output left unwritten), the check fails.

use deepport_core::tensor::unravel;
use deepport_core::{DType, HostTensor};

/// `calc_diff(x, y) = 1 − 2·Σxy / Σ(x² + y²)` in f64 (DeepGEMM's metric,
/// about half the squared relative RMS error). Two all-zero vectors give 0.
/// Non-finite inputs give NaN, which fails every threshold.
pub fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
    if x.len() != y.len() {
        return f64::NAN;
    }
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a as f64, b as f64);
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return if xy.is_nan() { f64::NAN } else { 0.0 };
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

/// One unit in the last place of `x` in `dtype`: the spacing of that
/// format's values at `|x|` (f32, bf16, f16, fp8; other dtypes give 0).
pub fn ulp(dtype: DType, x: f32) -> f64 {
    // (mantissa bits, smallest normal exponent) of each format.
    let (man, emin) = match dtype {
        DType::F32 => (23, -126),
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        DType::F8E4M3 => (3, -6),
        DType::F8E4M3Fnuz => (3, -7),
        DType::F8E5M2 => (2, -14),
        _ => return 0.0,
    };
    let a = (x as f64).abs();
    if !a.is_finite() {
        return f64::INFINITY;
    }
    let e = if a == 0.0 {
        emin
    } else {
        (a.log2().floor() as i32).max(emin)
    };
    // log2 of values just below a power of two can round up; correct it.
    let e = if e > emin && 2f64.powi(e) > a {
        e - 1
    } else {
        e
    };
    2f64.powi(e - man)
}

/// The result of one metric on one case: its value, the threshold, and
/// whether it passed, with a human-readable detail (worst position, …).
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Metric name, e.g. `out.calc_diff`, `q.exact`.
    pub metric: String,
    pub value: f64,
    pub threshold: f64,
    pub passed: bool,
    /// Worst position and values, or why the check failed.
    pub detail: String,
}

impl Check {
    fn new(metric: String, value: f64, threshold: f64, passed: bool, detail: String) -> Self {
        Check {
            metric,
            value,
            threshold,
            passed,
            detail,
        }
    }

    /// A failed check that could not be computed (missing output, shape mismatch).
    pub fn broken(metric: impl Into<String>, detail: impl Into<String>) -> Self {
        Check::new(metric.into(), f64::NAN, 0.0, false, detail.into())
    }
}

/// Whether every check passed (an empty list does not pass).
pub fn all_passed(checks: &[Check]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c.passed)
}

/// The check to show in a one-line report: the first failing one, or the
/// first one when all passed.
pub fn headline(checks: &[Check]) -> Option<&Check> {
    checks.iter().find(|c| !c.passed).or_else(|| checks.first())
}

/// Exact comparison of two host tensors: dtype, shape and every byte.
/// The value is the number of differing elements.
pub fn exact(name: &str, a: &HostTensor, r: &HostTensor) -> Check {
    let metric = format!("{name}.exact");
    if a.dtype() != r.dtype() || a.shape() != r.shape() {
        return Check::broken(
            metric,
            format!(
                "got {} {:?}, reference {} {:?}",
                a.dtype(),
                a.shape(),
                r.dtype(),
                r.shape()
            ),
        );
    }
    let size = a.dtype().size().max(1);
    let mut bad = 0usize;
    let mut first = None;
    for (i, (x, y)) in a
        .bytes()
        .chunks(size)
        .zip(r.bytes().chunks(size))
        .enumerate()
    {
        if x != y {
            bad += 1;
            first.get_or_insert(i);
        }
    }
    let detail = match first {
        None => String::new(),
        Some(i) => format!(
            "{bad} of {} elements differ; first at {:?}: {} vs reference {}",
            a.numel(),
            unravel(i, a.shape()),
            show(a, i),
            show(r, i)
        ),
    };
    Check::new(metric, bad as f64, 0.0, bad == 0, detail)
}

fn show(t: &HostTensor, i: usize) -> String {
    if t.dtype().is_float() {
        let size = t.dtype().size();
        let bytes: String = t.bytes()[i * size..(i + 1) * size]
            .iter()
            .rev()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{} (0x{bytes})", t.get_f32(i))
    } else {
        t.get_i64(i).to_string()
    }
}

/// Class of a value for inf/NaN parity.
fn class(x: f32) -> u8 {
    if x.is_nan() {
        1
    } else if x == f32::INFINITY {
        2
    } else if x == f32::NEG_INFINITY {
        3
    } else {
        0
    }
}

/// A comparison of actual values `a` with reference values `r` of one
/// output, optionally restricted to the elements where `mask` is true.
#[derive(Clone, Copy, Debug)]
pub struct Cmp<'a> {
    pub name: &'a str,
    pub a: &'a [f32],
    pub r: &'a [f32],
    /// Shape of both, for reporting positions.
    pub shape: &'a [usize],
    /// Elements to judge (all when `None`).
    pub mask: Option<&'a [bool]>,
}

impl<'a> Cmp<'a> {
    pub fn new(name: &'a str, a: &'a [f32], r: &'a [f32], shape: &'a [usize]) -> Self {
        Cmp {
            name,
            a,
            r,
            shape,
            mask: None,
        }
    }

    /// Restricts the comparison to the elements where `mask` is true.
    pub fn masked(mut self, mask: &'a [bool]) -> Self {
        self.mask = Some(mask);
        self
    }

    fn sizes_ok(&self) -> Result<(), String> {
        if self.a.len() != self.r.len() {
            return Err(format!(
                "{} values, reference has {}",
                self.a.len(),
                self.r.len()
            ));
        }
        if let Some(m) = self.mask {
            if m.len() != self.a.len() {
                return Err(format!("mask of {} for {} values", m.len(), self.a.len()));
            }
        }
        Ok(())
    }

    fn selected(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.a.len()).filter(|&i| self.mask.is_none_or(|m| m[i]))
    }

    /// The judged values of `a` and `r`.
    pub fn selected_values(&self) -> (Vec<f32>, Vec<f32>) {
        self.selected().map(|i| (self.a[i], self.r[i])).unzip()
    }

    fn pos(&self, i: usize) -> Vec<usize> {
        unravel(i, self.shape)
    }

    /// inf/NaN positions must match the reference exactly (NaN, +inf and
    /// −inf each match only themselves). The value is the mismatch count.
    pub fn nonfinite_parity(&self) -> Check {
        let metric = format!("{}.nonfinite", self.name);
        if let Err(e) = self.sizes_ok() {
            return Check::broken(metric, e);
        }
        let mut bad = 0usize;
        let mut first = None;
        for i in self.selected() {
            if class(self.a[i]) != class(self.r[i]) {
                bad += 1;
                first.get_or_insert(i);
            }
        }
        let detail = first.map_or(String::new(), |i| {
            format!(
                "{bad} positions differ in inf/NaN; first at {:?}: {} vs reference {}",
                self.pos(i),
                self.a[i],
                self.r[i]
            )
        });
        Check::new(metric, bad as f64, 0.0, bad == 0, detail)
    }

    /// Elementwise `|a − r| ≤ tol(r)`. The value is the worst ratio
    /// `|a − r| / tol(r)` and the threshold is 1. Positions where both are
    /// the same non-finite value are skipped (judge them with
    /// [`Cmp::nonfinite_parity`]); any other non-finite difference fails.
    pub fn tolerance(&self, what: &str, tol: impl Fn(f32) -> f64) -> Check {
        let metric = format!("{}.{what}", self.name);
        if let Err(e) = self.sizes_ok() {
            return Check::broken(metric, e);
        }
        let mut worst = 0.0f64;
        let mut at = None;
        for i in self.selected() {
            let (a, r) = (self.a[i], self.r[i]);
            if !a.is_finite() || !r.is_finite() {
                if class(a) == class(r) {
                    continue;
                }
                worst = f64::INFINITY;
                at = Some(i);
                break;
            }
            let d = (a as f64 - r as f64).abs();
            let t = tol(r);
            let ratio = if d == 0.0 {
                0.0
            } else if t > 0.0 {
                d / t
            } else {
                f64::INFINITY
            };
            if at.is_none() || ratio > worst {
                worst = ratio;
                at = Some(i);
            }
        }
        let detail = at.map_or(String::new(), |i| {
            format!(
                "worst at {:?}: {} vs reference {} (|diff| {:.3e}, allowed {:.3e})",
                self.pos(i),
                self.a[i],
                self.r[i],
                (self.a[i] as f64 - self.r[i] as f64).abs(),
                tol(self.r[i])
            )
        });
        Check::new(metric, worst, 1.0, worst <= 1.0, detail)
    }

    /// `|a − r| ≤ ulps · ulp(dtype, r) + abs`: "within `ulps` units in the
    /// last place of the output dtype, plus a small absolute slack".
    pub fn ulps(&self, dtype: DType, ulps: f64, abs: f64) -> Check {
        self.tolerance(&format!("err/({ulps}ulp+{abs:.0e})"), |r| {
            ulps * ulp(dtype, r) + abs
        })
    }

    /// FlashMLA's elementwise rule: every element needs `|a − r| < atol` or
    /// `|a − r| / (|r| + 1e-6) < rtol`. The value is the worst
    /// `min(|a−r|/atol, rel/rtol)`; it must stay below 1.
    pub fn abs_or_rel(&self, atol: f64, rtol: f64) -> Check {
        let metric = format!("{}.abs<{atol:.0e}|rel<{rtol:.3e}", self.name);
        if let Err(e) = self.sizes_ok() {
            return Check::broken(metric, e);
        }
        let mut worst = 0.0f64;
        let mut at = None;
        for i in self.selected() {
            let (a, r) = (self.a[i], self.r[i]);
            if !a.is_finite() || !r.is_finite() {
                if class(a) == class(r) {
                    continue;
                }
                worst = f64::INFINITY;
                at = Some(i);
                break;
            }
            let d = (a as f64 - r as f64).abs();
            let rel = d / ((r as f64).abs() + 1e-6);
            let ratio = (d / atol).min(rel / rtol);
            if at.is_none() || ratio > worst {
                worst = ratio;
                at = Some(i);
            }
        }
        let detail = at.map_or(String::new(), |i| {
            format!(
                "worst at {:?}: {} vs reference {}",
                self.pos(i),
                self.a[i],
                self.r[i]
            )
        });
        Check::new(metric, worst, 1.0, worst < 1.0, detail)
    }

    /// `calc_diff` over the judged elements where both values are finite
    /// (non-finite positions are judged by [`Cmp::nonfinite_parity`]; when
    /// only one side is finite the value is NaN and the check fails).
    /// `strict` asks for `<` instead of `≤`.
    pub fn calc_diff(&self, threshold: f64, strict: bool) -> Check {
        let metric = format!("{}.calc_diff", self.name);
        if let Err(e) = self.sizes_ok() {
            return Check::broken(metric, e);
        }
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        let mut lone = 0usize;
        for i in self.selected() {
            let (a, r) = (self.a[i], self.r[i]);
            match (a.is_finite(), r.is_finite()) {
                (true, true) => {
                    xs.push(a);
                    ys.push(r);
                }
                (false, false) if class(a) == class(r) => {}
                _ => lone += 1,
            }
        }
        let v = if lone > 0 {
            f64::NAN
        } else {
            calc_diff(&xs, &ys)
        };
        let passed = if strict {
            v < threshold
        } else {
            v <= threshold
        };
        let detail = if lone > 0 {
            format!("{lone} positions are finite on one side only")
        } else {
            String::new()
        };
        Check::new(metric, v, threshold, passed, detail)
    }
}

/// Judges two MoE routings (SPEC.md §6): per token, the *set* of chosen
/// experts must be equal, and the weights, after sorting by expert id,
/// within `weight_tol`. Tokens marked in `near_tie` (the selection sits on
/// a near-tie of scores) may differ: they are counted in the detail, not
/// failed. Returns the set check and the weight check.
#[allow(clippy::too_many_arguments)]
pub fn routing(
    name: &str,
    idx_a: &[i64],
    w_a: &[f32],
    idx_r: &[i64],
    w_r: &[f32],
    topk: usize,
    near_tie: Option<&[bool]>,
    weight_tol: f64,
) -> Vec<Check> {
    let set_metric = format!("{name}.set_mismatch");
    let w_metric = format!("{name}.weights_abs");
    let n = idx_r.len();
    if topk == 0
        || idx_a.len() != n
        || w_a.len() != n
        || w_r.len() != n
        || n % topk != 0
        || near_tie.is_some_and(|t| t.len() != n / topk)
    {
        return vec![Check::broken(
            set_metric,
            format!(
                "sizes differ: idx {} / {}, weights {} / {} (topk {topk})",
                idx_a.len(),
                n,
                w_a.len(),
                w_r.len()
            ),
        )];
    }
    let tokens = n / topk;
    let sorted = |idx: &[i64], w: &[f32], t: usize| {
        let mut p: Vec<(i64, f32)> = (0..topk)
            .map(|j| (idx[t * topk + j], w[t * topk + j]))
            .collect();
        p.sort_by_key(|&(e, _)| e);
        p
    };
    let (mut bad, mut excused) = (0usize, 0usize);
    let mut first_bad = None;
    let mut worst_w = 0.0f64;
    let mut worst_at = None;
    for t in 0..tokens {
        let pa = sorted(idx_a, w_a, t);
        let pr = sorted(idx_r, w_r, t);
        let same = pa.iter().map(|p| p.0).eq(pr.iter().map(|p| p.0));
        if !same {
            if near_tie.is_some_and(|nt| nt[t]) {
                excused += 1;
            } else {
                bad += 1;
                first_bad.get_or_insert((t, pa, pr));
            }
            continue;
        }
        for (x, y) in pa.iter().zip(&pr) {
            let d = (x.1 as f64 - y.1 as f64).abs();
            let d = if d.is_nan() { f64::INFINITY } else { d };
            if worst_at.is_none() || d > worst_w {
                worst_w = d;
                worst_at = Some((t, x.0, x.1, y.1));
            }
        }
    }
    let mut set_detail = match &first_bad {
        None => String::new(),
        Some((t, pa, pr)) => format!(
            "{bad} tokens route differently; token {t}: experts {:?}, reference {:?}",
            pa.iter().map(|p| p.0).collect::<Vec<_>>(),
            pr.iter().map(|p| p.0).collect::<Vec<_>>()
        ),
    };
    if excused > 0 {
        if !set_detail.is_empty() {
            set_detail.push_str("; ");
        }
        set_detail.push_str(&format!(
            "{excused} near-tie tokens route differently (reported, not failed)"
        ));
    }
    let w_detail = worst_at.map_or(String::new(), |(t, e, a, r)| {
        format!("worst at token {t}, expert {e}: {a} vs reference {r}")
    });
    vec![
        Check::new(set_metric, bad as f64, 0.0, bad == 0, set_detail),
        Check::new(
            w_metric,
            worst_w,
            weight_tol,
            worst_w <= weight_tol,
            w_detail,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calc_diff_matches_its_definition() {
        assert_eq!(calc_diff(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(calc_diff(&[0.0; 4], &[0.0; 4]), 0.0);
        // x = (1, 0), y = (0, 1): Σxy = 0, Σ(x²+y²) = 2 → 1.
        assert_eq!(calc_diff(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
        // x = -y: 1 − 2·(−Σx²)/(2Σx²) = 2.
        assert_eq!(calc_diff(&[1.0, -2.0], &[-1.0, 2.0]), 2.0);
        // y = x·(1 + e): 1 − 2(1+e)/(1 + (1+e)²) = e²/(2 + 2e + e²).
        let e = 1e-3f64;
        let x = [0.5f32, -1.25, 3.0, 7.5];
        let y: Vec<f32> = x.iter().map(|&v| (v as f64 * (1.0 + e)) as f32).collect();
        let want = e * e / (2.0 + 2.0 * e + e * e);
        let got = calc_diff(&x, &y);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(calc_diff(&[f32::NAN], &[1.0]).is_nan());
        assert!(calc_diff(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn ulp_of_each_format() {
        assert_eq!(ulp(DType::F32, 1.0), 2f64.powi(-23));
        assert_eq!(ulp(DType::F32, 1.5), 2f64.powi(-23));
        assert_eq!(ulp(DType::F32, -2.0), 2f64.powi(-22));
        assert_eq!(ulp(DType::BF16, 1.0), 2f64.powi(-7));
        assert_eq!(ulp(DType::BF16, 0.999), 2f64.powi(-8));
        assert_eq!(ulp(DType::BF16, 3.0), 2f64.powi(-6));
        assert_eq!(ulp(DType::F16, 1.0), 2f64.powi(-10));
        assert_eq!(ulp(DType::F16, 0.0), 2f64.powi(-24));
        assert_eq!(ulp(DType::F16, 1e-6), 2f64.powi(-24));
        assert_eq!(ulp(DType::F8E4M3, 448.0), 32.0);
        assert_eq!(ulp(DType::F8E4M3, 0.0), 2f64.powi(-9));
        assert_eq!(ulp(DType::F32, 0.0), 2f64.powi(-149));
        assert_eq!(ulp(DType::I32, 5.0), 0.0);
        // Agrees with core's bf16 ulp wherever both are defined.
        for x in [1e-30f32, 0.1, 0.75, 1.0, 255.0, 1e20] {
            assert_eq!(
                ulp(DType::BF16, x),
                deepport_core::formats::ulp_bf16(x) as f64,
                "{x}"
            );
        }
    }

    #[test]
    fn rms_ignores_non_finite() {
        assert_eq!(rms(&[3.0, -4.0]), (12.5f64).sqrt());
        assert_eq!(rms(&[3.0, f32::NAN, -4.0]), (12.5f64).sqrt());
        assert_eq!(rms(&[]), 0.0);
    }

    #[test]
    fn exact_counts_differing_elements() {
        let a = HostTensor::from_i32(&[2, 2], &[1, 2, 3, 4]);
        let b = HostTensor::from_i32(&[2, 2], &[1, 2, 0, 4]);
        let c = exact("x", &a, &a);
        assert!(c.passed && c.value == 0.0);
        let c = exact("x", &a, &b);
        assert!(!c.passed);
        assert_eq!(c.value, 1.0);
        assert!(c.detail.contains("[1, 0]"), "{}", c.detail);
        let c = exact("x", &a, &a.clone().reshape(&[4]).unwrap());
        assert!(!c.passed);
        // -0.0 and 0.0 differ in bytes.
        let z = HostTensor::from_f32(DType::F32, &[1], &[0.0]);
        let nz = HostTensor::from_f32(DType::F32, &[1], &[-0.0]);
        assert!(!exact("z", &z, &nz).passed);
    }

    #[test]
    fn nonfinite_parity_is_positional() {
        let r = [1.0, f32::INFINITY, f32::NAN, 0.0];
        let shape = [4];
        assert!(Cmp::new("o", &r, &r, &shape).nonfinite_parity().passed);
        let a = [1.0, f32::NEG_INFINITY, f32::NAN, 0.0];
        let c = Cmp::new("o", &a, &r, &shape).nonfinite_parity();
        assert_eq!((c.passed, c.value), (false, 1.0));
        let a = [1.0, f32::INFINITY, 5.0, f32::NAN];
        let c = Cmp::new("o", &a, &r, &shape).nonfinite_parity();
        assert_eq!(c.value, 2.0);
        // Masked-out positions are not judged.
        let m = [true, true, false, false];
        assert!(
            Cmp::new("o", &a, &r, &shape)
                .masked(&m)
                .nonfinite_parity()
                .passed
        );
    }

    #[test]
    fn tolerance_ratio_and_poison() {
        let r = [1.0f32, 2.0, -4.0];
        let a = [1.0f32 + 2f32.powi(-7), 2.0, -4.0];
        let shape = [3];
        // One bf16 ulp at 1.0 is 2^-7: ratio exactly 1 passes.
        let c = Cmp::new("y", &a, &r, &shape).ulps(DType::BF16, 1.0, 0.0);
        assert!(c.passed, "{c:?}");
        assert_eq!(c.value, 1.0);
        // Half an ulp allowed: ratio 2 fails.
        let c = Cmp::new("y", &a, &r, &shape).ulps(DType::BF16, 0.5, 0.0);
        assert!(!c.passed);
        assert_eq!(c.value, 2.0);
        assert!(c.detail.contains("[0]"), "{}", c.detail);
        // A NaN where the reference is finite always fails.
        let a = [1.0f32, f32::NAN, -4.0];
        let c = Cmp::new("y", &a, &r, &shape).ulps(DType::F32, 1e9, 1e9);
        assert!(!c.passed && c.value.is_infinite());
        // A zero tolerance demands equality.
        let c = Cmp::new("y", &r, &r, &shape).tolerance("exact", |_| 0.0);
        assert!(c.passed);
        // Length mismatch is a failure, not a panic.
        assert!(
            !Cmp::new("y", &r[..2], &r, &shape)
                .ulps(DType::F32, 1.0, 0.0)
                .passed
        );
    }

    #[test]
    fn abs_or_rel_is_flashmla_rule() {
        let shape = [3];
        let r = [0.0f32, 1.0, 100.0];
        // 5e-4 absolute passes at 0; 1% relative passes at 100 (2.01/128 ≈ 1.57%).
        let a = [5e-4f32, 1.0, 101.0];
        let c = Cmp::new("o", &a, &r, &shape).abs_or_rel(8e-4, 2.01 / 128.0);
        assert!(c.passed, "{c:?}");
        // 2% off at 100 and 1e-3 off at 0 fail.
        let a = [1e-3f32, 1.0, 102.0];
        let c = Cmp::new("o", &a, &r, &shape).abs_or_rel(8e-4, 2.01 / 128.0);
        assert!(!c.passed);
        // Exactly at atol fails (strict <), like FlashMLA's test.
        let r1 = [0.0f32];
        let a1 = [0.5f32];
        let c = Cmp::new("o", &a1, &r1, &[1]).abs_or_rel(0.5, 1e-9);
        assert!(!c.passed);
    }

    #[test]
    fn calc_diff_check_skips_matching_non_finite() {
        let shape = [3];
        let r = [1.0f32, f32::INFINITY, 2.0];
        let c = Cmp::new("l", &r, &r, &shape).calc_diff(5e-6, false);
        assert!(c.passed && c.value == 0.0, "{c:?}");
        let a = [1.0f32, 3.0, 2.0];
        let c = Cmp::new("l", &a, &r, &shape).calc_diff(5e-6, false);
        assert!(!c.passed && c.value.is_nan());
        // Strict: value equal to the threshold fails.
        let c = Cmp::new("l", &[1.0, 0.0], &[0.0, 1.0], &[2]).calc_diff(1.0, true);
        assert!(!c.passed);
        let c = Cmp::new("l", &[1.0, 0.0], &[0.0, 1.0], &[2]).calc_diff(1.0, false);
        assert!(c.passed);
    }

    #[test]
    fn routing_is_set_equality_then_weights() {
        // Two tokens, topk 2; token 0 lists experts in another order.
        let idx_r = [3i64, 5, 1, 2];
        let w_r = [0.7f32, 0.3, 0.6, 0.4];
        let idx_a = [5i64, 3, 1, 2];
        let w_a = [0.3f32, 0.7, 0.6, 0.4];
        let c = routing("g", &idx_a, &w_a, &idx_r, &w_r, 2, None, 1e-6);
        assert!(all_passed(&c), "{c:?}");
        // Weight off by 2e-6 fails.
        let w_b = [0.3f32, 0.700002, 0.6, 0.4];
        let c = routing("g", &idx_a, &w_b, &idx_r, &w_r, 2, None, 1e-6);
        assert!(c[0].passed && !c[1].passed);
        // A different set fails, unless the token is a near tie.
        let idx_c = [3i64, 5, 1, 7];
        let c = routing("g", &idx_c, &w_r, &idx_r, &w_r, 2, None, 1e-6);
        assert!(!c[0].passed && c[0].value == 1.0);
        let c = routing(
            "g",
            &idx_c,
            &w_r,
            &idx_r,
            &w_r,
            2,
            Some(&[false, true]),
            1e-6,
        );
        assert!(all_passed(&c), "{c:?}");
        assert!(c[0].detail.contains("near-tie"));
        // Mismatched sizes are a failure.
        let c = routing("g", &idx_a[..2], &w_a, &idx_r, &w_r, 2, None, 1e-6);
        assert!(!all_passed(&c));
    }

    #[test]
    fn headline_prefers_failures() {
        let ok = Check::new("a".into(), 0.0, 1.0, true, String::new());
        let bad = Check::broken("b", "x");
        assert_eq!(headline(&[ok.clone(), bad.clone()]).unwrap().metric, "b");
        assert_eq!(headline(std::slice::from_ref(&ok)).unwrap().metric, "a");
        assert!(!all_passed(&[]));
        assert!(all_passed(&[ok]));
    }
}
