//! How outputs are judged: metrics, tolerances and the [`Check`] each one
//! produces (SPEC.md, "Judged" paragraphs; DESIGN.md, "Judgement").
//!
//! Every comparison takes the actual values `a` (the backend under test) and
//! the reference values `r` (`cpu-ref`). Tolerances never name a backend.
//! NaN is never "close" to a number: wherever the reference is finite and the
//! actual value is not (a poisoned output left unwritten), the check fails.

use crate::types::{Metric, Outcome, Tolerance};
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
///
/// Every metric is "lower is better": a check passes when its value is
/// within `threshold`, and a failing check whose value is still within
/// `warn` (≥ `threshold`) makes the case a
/// [`Outcome::QualityWarning`] instead of a failure (see [`verdict`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Metric name, e.g. `out.calc_diff`, `q.exact`.
    pub metric: String,
    pub value: f64,
    /// Pass threshold.
    pub threshold: f64,
    /// Quality-warning threshold (equal to `threshold` when there is none).
    pub warn: f64,
    pub passed: bool,
    /// Worst position and values, or why the check failed.
    pub detail: String,
    /// Position of the worst element, where the metric has one.
    pub worst_index: Option<Vec<usize>>,
}

impl Check {
    /// A check with no quality-warning band (`warn = threshold`).
    pub fn new(metric: String, value: f64, threshold: f64, passed: bool, detail: String) -> Self {
        Check {
            metric,
            value,
            threshold,
            warn: threshold,
            passed,
            detail,
            worst_index: None,
        }
    }

    /// A failed check that could not be computed (missing output, shape mismatch).
    pub fn broken(metric: impl Into<String>, detail: impl Into<String>) -> Self {
        Check::new(metric.into(), f64::NAN, 0.0, false, detail.into())
    }

    /// Sets the quality-warning threshold (never below the pass threshold).
    pub fn with_warn(mut self, warn: f64) -> Self {
        self.warn = if warn >= self.threshold {
            warn
        } else {
            self.threshold
        };
        self
    }

    /// Records the position of the worst element.
    pub fn with_worst(mut self, index: Option<Vec<usize>>) -> Self {
        self.worst_index = index;
        self
    }

    /// A failing check whose value is within its warning threshold.
    pub fn within_warn(&self) -> bool {
        !self.passed && self.value <= self.warn
    }
}

/// Whether every check passed (an empty list does not pass).
pub fn all_passed(checks: &[Check]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c.passed)
}

/// The outcome of a judged case: `Pass` when every check passed,
/// `QualityWarning` when every failing check is within its warning
/// threshold, else `Fail`. An empty list is a `Fail` (nothing was judged).
pub fn verdict(checks: &[Check]) -> Outcome {
    if checks.is_empty() {
        Outcome::Fail
    } else if checks.iter().all(|c| c.passed) {
        Outcome::Pass
    } else if checks.iter().all(|c| c.passed || c.within_warn()) {
        Outcome::QualityWarning
    } else {
        Outcome::Fail
    }
}

/// The check that decides the outcome: the first failing check outside its
/// warning band, else the first failing one, else the first one.
pub fn deciding(checks: &[Check]) -> Option<&Check> {
    checks
        .iter()
        .find(|c| !c.passed && !c.within_warn())
        .or_else(|| checks.iter().find(|c| !c.passed))
        .or_else(|| checks.first())
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
        .with_worst(first.map(|i| unravel(i, a.shape())))
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
        Check::new(metric, bad as f64, 0.0, bad == 0, detail).with_worst(first.map(|i| self.pos(i)))
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
        Check::new(metric, worst, 1.0, worst <= 1.0, detail).with_worst(at.map(|i| self.pos(i)))
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
        Check::new(metric, worst, 1.0, worst < 1.0, detail).with_worst(at.map(|i| self.pos(i)))
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

impl Cmp<'_> {
    /// Normalized mean squared error `Σ(a−r)² / Σr²` over the judged
    /// elements where both are finite (`0` when both are all zero; NaN when
    /// a position is finite on one side only, which fails every threshold).
    pub fn nmse(&self, threshold: f64) -> Check {
        let metric = format!("{}.nmse", self.name);
        if let Err(e) = self.sizes_ok() {
            return Check::broken(metric, e);
        }
        let (mut num, mut den, mut lone) = (0.0f64, 0.0f64, 0usize);
        let mut worst = (0.0f64, None);
        for i in self.selected() {
            let (a, r) = (self.a[i], self.r[i]);
            match (a.is_finite(), r.is_finite()) {
                (true, true) => {
                    let d = (a as f64 - r as f64).powi(2);
                    if worst.1.is_none() || d > worst.0 {
                        worst = (d, Some(i));
                    }
                    num += d;
                    den += (r as f64).powi(2);
                }
                (false, false) if class(a) == class(r) => {}
                _ => {
                    lone += 1;
                    worst.1.get_or_insert(i);
                }
            }
        }
        let v = if lone > 0 {
            f64::NAN
        } else if den == 0.0 {
            if num == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            num / den
        };
        let detail = if lone > 0 {
            format!("{lone} positions are finite on one side only")
        } else {
            worst.1.map_or(String::new(), |i| {
                format!(
                    "largest error at {:?}: {} vs reference {}",
                    self.pos(i),
                    self.a[i],
                    self.r[i]
                )
            })
        };
        Check::new(metric, v, threshold, v <= threshold, detail)
            .with_worst(worst.1.map(|i| self.pos(i)))
    }
}

/// Per-row cosine similarity of two row-major `[rows, n]` matrices (f64).
/// A row with a non-finite value, or a zero row against a non-zero one,
/// has cosine −1; two zero rows have cosine 1.
pub fn row_cosines(a: &[f32], r: &[f32], n: usize) -> Vec<f64> {
    if n == 0 || a.len() != r.len() {
        return vec![-1.0];
    }
    a.chunks(n)
        .zip(r.chunks(n))
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy) = (0.0f64, 0.0f64, 0.0f64);
            for (&p, &q) in x.iter().zip(y) {
                let (p, q) = (p as f64, q as f64);
                xy += p * q;
                xx += p * p;
                yy += q * q;
            }
            if xx == 0.0 && yy == 0.0 {
                1.0
            } else {
                let c = xy / (xx.sqrt() * yy.sqrt());
                if c.is_finite() {
                    c
                } else {
                    -1.0
                }
            }
        })
        .collect()
}

/// `1 − cos` of each row pair of two `[rows, n]` matrices, reduced by the
/// mean (or, with `use_min`, by the worst row). The worst row is reported.
pub fn cosine(name: &str, a: &[f32], r: &[f32], n: usize, use_min: bool, threshold: f64) -> Check {
    let metric = format!(
        "{name}.{}",
        if use_min { "1-cos_min" } else { "1-cos_mean" }
    );
    if n == 0 || a.len() != r.len() || !a.len().is_multiple_of(n) {
        return Check::broken(
            metric,
            format!("{} values vs reference {} (rows of {n})", a.len(), r.len()),
        );
    }
    let cos = row_cosines(a, r, n);
    let (mut worst, mut at) = (f64::INFINITY, 0usize);
    for (i, &c) in cos.iter().enumerate() {
        if c < worst {
            worst = c;
            at = i;
        }
    }
    let mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    let v = 1.0 - if use_min { worst } else { mean };
    let detail = format!("cosine mean {mean:.6}, worst row {at}: {worst:.6}");
    Check::new(metric, v, threshold, v <= threshold, detail).with_worst(Some(vec![at]))
}

/// Index of the largest value of a row (the first on ties; NaN never wins).
fn argmax(row: &[f32]) -> usize {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// The fraction of rows of two `[rows, n]` matrices whose argmax differs.
pub fn top1_mismatch(name: &str, a: &[f32], r: &[f32], n: usize, threshold: f64) -> Check {
    let metric = format!("{name}.top1_mismatch");
    if n == 0 || a.len() != r.len() || !a.len().is_multiple_of(n) || a.is_empty() {
        return Check::broken(
            metric,
            format!("{} values vs reference {} (rows of {n})", a.len(), r.len()),
        );
    }
    let rows = a.len() / n;
    let mut bad = 0usize;
    let mut first = None;
    for (i, (x, y)) in a.chunks(n).zip(r.chunks(n)).enumerate() {
        let (ax, ay) = (argmax(x), argmax(y));
        if ax != ay {
            bad += 1;
            first.get_or_insert((i, ax, ay));
        }
    }
    let v = bad as f64 / rows as f64;
    let detail = first.map_or(String::new(), |(i, ax, ay)| {
        format!("{bad} of {rows} rows differ; first: row {i} argmax {ax}, reference {ay}")
    });
    Check::new(metric, v, threshold, v <= threshold, detail).with_worst(first.map(|f| vec![f.0]))
}

/// A tolerance parameter, or `default` when the entry does not set it.
pub fn param(t: &Tolerance, name: &str, default: f64) -> f64 {
    t.params.get(name).copied().unwrap_or(default)
}

/// Applies a tolerance's thresholds to a computed check: its pass
/// threshold (strict `<` when `params.strict` is 1), its warning threshold
/// and the metric label.
pub fn thresholded(mut c: Check, t: &Tolerance) -> Check {
    let strict = param(t, "strict", 0.0) != 0.0;
    c.threshold = t.pass;
    c.passed = if strict {
        c.value < t.pass
    } else {
        c.value <= t.pass
    };
    c.with_warn(t.warn)
}

fn params_label(t: &Tolerance) -> String {
    let p: Vec<String> = t
        .params
        .iter()
        .filter(|(k, _)| k.as_str() != "strict")
        .map(|(k, v)| format!("{k}={v:e}"))
        .collect();
    if p.is_empty() {
        String::new()
    } else {
        format!("({})", p.join(","))
    }
}

/// Judges one output with one tolerance entry of the catalogue, for the
/// metrics that need nothing but the two tensors: `calc_diff`,
/// `elementwise`, `abs_or_rel`, `nmse`, `exact`, `cosine` and
/// `top1_mismatch` (rows are the last dim). `mask` restricts the judged
/// elements (float metrics only). `set_equality` and `keyed` need more than
/// two tensors and are judged by the families that use them (the MoE
/// routing judge of `cases::dense::routing`, the keyed-row judge of
/// `cases::ep::keyed`, registered through `cases::judging::FamilyJudge`);
/// asked here, they give a broken check.
pub fn apply(
    name: &str,
    t: &Tolerance,
    a: &HostTensor,
    r: &HostTensor,
    mask: Option<&[bool]>,
) -> Check {
    if t.metric == Metric::Exact {
        return thresholded(exact(name, a, r), t);
    }
    if a.dtype() != r.dtype() || a.shape() != r.shape() {
        return Check::broken(
            format!("{name}.layout"),
            format!(
                "got {} {:?}, reference {} {:?}",
                a.dtype(),
                a.shape(),
                r.dtype(),
                r.shape()
            ),
        );
    }
    if !r.dtype().is_float() {
        return Check::broken(
            format!("{name}.{:?}", t.metric),
            format!(
                "metric {:?} needs a float output, got {}",
                t.metric,
                r.dtype()
            ),
        );
    }
    let (av, rv) = (a.to_f32_vec(), r.to_f32_vec());
    let mut cmp = Cmp::new(name, &av, &rv, r.shape());
    if let Some(m) = mask {
        cmp = cmp.masked(m);
    }
    let n = r.shape().last().copied().unwrap_or(1);
    let c = match t.metric {
        Metric::CalcDiff => cmp.calc_diff(t.pass, false),
        Metric::Nmse => cmp.nmse(t.pass),
        Metric::Elementwise => {
            let (abs, rel, ulps, rms_rel) = (
                param(t, "abs", 0.0),
                param(t, "rel", 0.0),
                param(t, "ulps", 0.0),
                param(t, "rms_rel", 0.0),
            );
            let rms_v = if rms_rel != 0.0 {
                rms(&cmp.selected_values().1)
            } else {
                0.0
            };
            let dtype = r.dtype();
            let mut c = cmp.tolerance(&format!("elementwise{}", params_label(t)), |v| {
                abs + rel * (v as f64).abs() + ulps * ulp(dtype, v) + rms_rel * rms_v
            });
            if rms_rel != 0.0 {
                c.detail
                    .push_str(&format!(" (rms of the reference {rms_v:.4e})"));
            }
            c
        }
        Metric::AbsOrRel => {
            let mut c = cmp.abs_or_rel(param(t, "abs", 0.0), param(t, "rel", 0.0));
            c.metric = format!("{name}.abs_or_rel{}", params_label(t));
            c
        }
        Metric::Cosine => {
            let (sa, sr) = cmp.selected_values();
            let n = if mask.is_some() { sa.len().max(1) } else { n };
            cosine(name, &sa, &sr, n, param(t, "min", 0.0) != 0.0, t.pass)
        }
        Metric::Top1Mismatch => top1_mismatch(name, &av, &rv, n, t.pass),
        Metric::Exact | Metric::SetEquality | Metric::Keyed => {
            return Check::broken(
                format!("{name}.{:?}", t.metric),
                "this metric is judged by the case, not by judge::apply",
            )
        }
    };
    thresholded(c, t)
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

    fn tol(metric: Metric, pass: f64, warn: f64, params: &[(&str, f64)]) -> Tolerance {
        Tolerance {
            metric,
            pass,
            warn,
            params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            reason: "test".into(),
        }
    }

    #[test]
    fn verdict_distinguishes_pass_warning_and_fail() {
        let ok = Check::new("a".into(), 0.5, 1.0, true, String::new());
        let warned = Check::new("b".into(), 3.0, 1.0, false, String::new()).with_warn(10.0);
        let failed = Check::new("c".into(), 30.0, 1.0, false, String::new()).with_warn(10.0);
        let nan = Check::new("d".into(), f64::NAN, 1.0, false, String::new()).with_warn(10.0);
        assert_eq!(verdict(&[]), Outcome::Fail);
        assert_eq!(verdict(std::slice::from_ref(&ok)), Outcome::Pass);
        assert_eq!(
            verdict(&[ok.clone(), warned.clone()]),
            Outcome::QualityWarning
        );
        assert_eq!(
            verdict(&[ok.clone(), warned.clone(), failed.clone()]),
            Outcome::Fail
        );
        assert_eq!(verdict(&[warned.clone(), nan]), Outcome::Fail);
        assert_eq!(
            deciding(&[ok.clone(), warned.clone(), failed.clone()])
                .unwrap()
                .metric,
            "c"
        );
        assert_eq!(deciding(&[ok.clone(), warned]).unwrap().metric, "b");
        // A warn threshold below the pass threshold is raised to it.
        assert_eq!(ok.with_warn(0.1).warn, 1.0);
    }

    #[test]
    fn nmse_is_its_definition_and_fails() {
        let r = [1.0f32, -2.0, 2.0];
        let a = [1.0f32, -2.0, 2.3];
        let c = Cmp::new("o", &a, &r, &[3]).nmse(1e-2);
        let want = 0.3f64.powi(2) / 9.0;
        assert!((c.value - want).abs() < 1e-7, "{c:?}");
        assert!(c.passed);
        assert_eq!(c.worst_index, Some(vec![2]));
        assert!(!Cmp::new("o", &a, &r, &[3]).nmse(1e-3).passed);
        let nan = [1.0f32, f32::NAN, 2.0];
        assert!(Cmp::new("o", &nan, &r, &[3]).nmse(1.0).value.is_nan());
        assert_eq!(Cmp::new("o", &[0.0], &[0.0], &[1]).nmse(0.0).value, 0.0);
        assert!(!Cmp::new("o", &[1.0], &[0.0], &[1]).nmse(1e9).passed);
    }

    #[test]
    fn cosine_and_top1_fail_on_decorrelated_rows() {
        let r = [1.0f32, 2.0, 3.0, 3.0, 2.0, 1.0];
        // Scale-invariant: 2·r has cosine 1.
        let a: Vec<f32> = r.iter().map(|x| x * 2.0).collect();
        let c = cosine("l", &a, &r, 3, false, 1e-6);
        assert!(c.passed && c.value.abs() < 1e-12, "{c:?}");
        // Row 1 reversed: its cosine is 10/14.
        let b = [1.0f32, 2.0, 3.0, 1.0, 2.0, 3.0];
        let c = cosine("l", &b, &r, 3, true, 0.1);
        assert!((c.value - (1.0 - 10.0 / 14.0)).abs() < 1e-9, "{c:?}");
        assert!(!c.passed);
        assert_eq!(c.worst_index, Some(vec![1]));
        let c = cosine("l", &b, &r, 3, false, 0.1);
        assert!((c.value - (1.0 - 12.0 / 14.0)).abs() < 1e-9 && !c.passed);
        let t = top1_mismatch("l", &b, &r, 3, 0.4);
        assert_eq!((t.value, t.passed), (0.5, false));
        assert!(top1_mismatch("l", &a, &r, 3, 0.0).passed);
        assert!(!cosine("l", &[1.0, f32::NAN, 0.0], &[1.0, 1.0, 1.0], 3, false, 1.0).passed);
        assert!(!top1_mismatch("l", &r[..4], &r, 3, 1.0).passed);
    }

    #[test]
    fn apply_uses_the_tolerance_entry() {
        let r = HostTensor::from_f32(DType::F32, &[4], &[1.0, -2.0, 100.0, 0.0]);
        let a = HostTensor::from_f32(DType::F32, &[4], &[1.0, -2.0, 100.5, 1e-3]);
        // abs 2e-3 + rel 1e-2: 0.5 ≤ 1.002 at 100, 1e-3 ≤ 2e-3 at 0.
        let t = tol(
            Metric::Elementwise,
            1.0,
            10.0,
            &[("abs", 2e-3), ("rel", 1e-2)],
        );
        let c = apply("y", &t, &a, &r, None);
        assert!(c.passed, "{c:?}");
        // rel 1e-3: 0.5 / 0.102 ≈ 4.9 → outside pass, inside warn.
        let t = tol(
            Metric::Elementwise,
            1.0,
            10.0,
            &[("abs", 2e-3), ("rel", 1e-3)],
        );
        let c = apply("y", &t, &a, &r, None);
        assert!(!c.passed && c.within_warn(), "{c:?}");
        assert_eq!(c.worst_index, Some(vec![2]));
        // rms_rel uses the reference's rms (50.02…): 0.5 ≤ 1e-2·50.
        let t = tol(Metric::Elementwise, 1.0, 1.0, &[("rms_rel", 1e-2)]);
        assert!(apply("y", &t, &a, &r, None).passed);
        let t = tol(Metric::Elementwise, 1.0, 1.0, &[("rms_rel", 1e-3)]);
        assert!(!apply("y", &t, &a, &r, None).passed);
        // Masked elements are not judged.
        let t = tol(Metric::Elementwise, 1.0, 1.0, &[]);
        let m = [true, true, false, false];
        assert!(apply("y", &t, &a, &r, Some(&m)).passed);
        assert!(!apply("y", &t, &a, &r, None).passed);
        // calc_diff with strict: equal to the threshold fails.
        let (x, y) = (
            HostTensor::from_f32(DType::F32, &[2], &[1.0, 0.0]),
            HostTensor::from_f32(DType::F32, &[2], &[0.0, 1.0]),
        );
        assert!(apply("d", &tol(Metric::CalcDiff, 1.0, 1.0, &[]), &x, &y, None).passed);
        assert!(
            !apply(
                "d",
                &tol(Metric::CalcDiff, 1.0, 1.0, &[("strict", 1.0)]),
                &x,
                &y,
                None
            )
            .passed
        );
        // abs_or_rel (strict like FlashMLA).
        let t = tol(
            Metric::AbsOrRel,
            1.0,
            10.0,
            &[("abs", 1e-3), ("rel", 1e-3), ("strict", 1.0)],
        );
        let c = apply("o", &t, &a, &r, None);
        assert!(!c.passed && c.within_warn(), "{c:?}");
        // nmse, exact, and layout mismatches.
        assert!(!apply("o", &tol(Metric::Nmse, 1e-9, 1e-9, &[]), &a, &r, None).passed);
        assert!(apply("o", &tol(Metric::Nmse, 1e-9, 1e-9, &[]), &r, &r, None).passed);
        assert!(!apply("o", &tol(Metric::Exact, 0.0, 0.0, &[]), &a, &r, None).passed);
        let r16 = r.to_dtype(DType::BF16);
        assert!(!apply("o", &tol(Metric::Nmse, 1.0, 1.0, &[]), &a, &r16, None).passed);
        // Metrics that need the case's context are broken here.
        assert!(!apply("o", &tol(Metric::SetEquality, 0.0, 0.0, &[]), &r, &r, None).passed);
        assert!(!apply("o", &tol(Metric::Keyed, 0.0, 0.0, &[]), &r, &r, None).passed);
        // Float metrics on integer outputs are broken, not a panic.
        let i = HostTensor::from_i32(&[2], &[1, 2]);
        assert!(!apply("o", &tol(Metric::CalcDiff, 1.0, 1.0, &[]), &i, &i, None).passed);
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
