//! Judging driven by a case's tolerance entries (the `tolerances` of its
//! [`CaseSpec`]): every output of the reference (or of the expected golden
//! data) is judged with each entry of its tolerance key, plus an inf/NaN
//! parity check for float outputs judged by a float metric. An output the
//! catalogue has no tolerance for, or one the backend did not return, is a
//! failed check — nothing is silently skipped.
//!
//! The generic metrics come from [`crate::judge`]. A metric that needs more
//! than the two tensors of one output is judged by the family that uses it,
//! which adds a [`FamilyJudge`] to the case's [`Judging`]: the MoE routing
//! judge (`set_equality`, `cases/dense/routing.rs`) and the keyed-row judge
//! of the expert-parallel family (`keyed`, `cases/ep/keyed.rs`). A case
//! whose tolerance names such a metric without its family's judge gets a
//! failed check, never a silent pass.

use super::JudgeFn;
use crate::judge::{self, Check, Cmp};
use crate::opspec::Outputs;
use crate::types::{CaseSpec, Metric, Tolerance};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Judges one output under one tolerance entry with every output of both
/// sides at hand: `(name, tolerance, actual, reference)`.
pub type FamilyJudgeFn = dyn Fn(&str, &Tolerance, &Outputs, &Outputs) -> Vec<Check> + Send + Sync;

/// A family's judge for a metric that needs more than one output's two
/// tensors.
#[derive(Clone)]
pub struct FamilyJudge {
    /// The tolerance metric it judges.
    pub metric: Metric,
    /// For an output judged together with another one (`…topk_weights`
    /// with `…topk_idx`, `x.keys` with `x`): the name of that other
    /// output. Such an output is not judged on its own when the other one
    /// is present and judged by this metric.
    pub companion_of: fn(&str) -> Option<String>,
    /// The judge itself.
    pub judge: Arc<FamilyJudgeFn>,
}

/// How a case's outputs are judged.
#[derive(Clone)]
pub struct Judging {
    pub tolerances: BTreeMap<String, Vec<Tolerance>>,
    /// Maps an output name to its tolerance key.
    pub key_of: fn(&str) -> String,
    /// Elements judged, per output name (all when absent).
    pub masks: BTreeMap<String, Vec<bool>>,
    /// The family's judges for metrics beyond [`judge::apply`]'s.
    pub family: Vec<FamilyJudge>,
}

fn identity(s: &str) -> String {
    s.to_string()
}

/// `r3.recv_x` → `recv_x`: per-rank outputs share their rank-free key.
pub fn rank_free(s: &str) -> String {
    match s.split_once('.') {
        Some((r, rest))
            if r.starts_with('r') && r[1..].chars().all(|c| c.is_ascii_digit()) && r.len() > 1 =>
        {
            rest.to_string()
        }
        _ => s.to_string(),
    }
}

fn is_float_metric(m: Metric) -> bool {
    matches!(
        m,
        Metric::CalcDiff
            | Metric::Elementwise
            | Metric::AbsOrRel
            | Metric::Nmse
            | Metric::Cosine
            | Metric::Top1Mismatch
    )
}

impl Judging {
    pub fn new(spec: &CaseSpec) -> Self {
        Judging {
            tolerances: spec.tolerances.clone(),
            key_of: identity,
            masks: BTreeMap::new(),
            family: Vec::new(),
        }
    }

    pub fn key_of(mut self, f: fn(&str) -> String) -> Self {
        self.key_of = f;
        self
    }

    pub fn mask(mut self, output: &str, mask: Vec<bool>) -> Self {
        self.masks.insert(output.to_string(), mask);
        self
    }

    /// Adds a family's judge for its metric.
    pub fn with(mut self, j: FamilyJudge) -> Self {
        self.family.push(j);
        self
    }

    /// Whether `name` is judged as part of another output of `r`.
    fn is_companion(&self, name: &str, r: &Outputs) -> bool {
        self.family.iter().any(|f| {
            (f.companion_of)(name).is_some_and(|main| {
                r.contains_key(&main)
                    && self
                        .tolerances
                        .get(&(self.key_of)(&main))
                        .is_some_and(|ts| ts.iter().any(|t| t.metric == f.metric))
            })
        })
    }

    pub fn into_fn(self) -> JudgeFn {
        Box::new(move |a, r| self.judge(a, r))
    }

    /// Judges every output of `r` (the reference or expected outputs).
    pub fn judge(&self, a: &Outputs, r: &Outputs) -> Vec<Check> {
        let mut checks = Vec::new();
        if r.is_empty() {
            checks.push(Check::broken("outputs", "the reference has no outputs"));
        }
        for (name, rt) in r {
            if self.is_companion(name, r) {
                continue;
            }
            let key = (self.key_of)(name);
            let Some(tols) = self.tolerances.get(&key).filter(|t| !t.is_empty()) else {
                checks.push(Check::broken(
                    format!("{name}.tolerance"),
                    format!("the catalogue has no tolerance for output `{key}`"),
                ));
                continue;
            };
            let Some(at) = a.get(name) else {
                checks.push(Check::broken(
                    format!("{name}.present"),
                    "the backend returned no such output",
                ));
                continue;
            };
            let mask = self.masks.get(name).map(|m| m.as_slice());
            for t in tols {
                match self.family.iter().find(|f| f.metric == t.metric) {
                    Some(f) => checks.extend((f.judge)(name, t, a, r)),
                    None => checks.push(judge::apply(name, t, at, rt, mask)),
                }
            }
            if rt.dtype().is_float()
                && at.dtype() == rt.dtype()
                && at.shape() == rt.shape()
                && tols.iter().any(|t| is_float_metric(t.metric))
            {
                let (av, rv) = (at.to_f32_vec(), rt.to_f32_vec());
                let mut cmp = Cmp::new(name, &av, &rv, rt.shape());
                if let Some(m) = mask {
                    cmp = cmp.masked(m);
                }
                checks.push(cmp.nonfinite_parity());
            }
        }
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CaseSpec, Source};
    use deepport_core::{DType, HostTensor};

    fn tol(metric: Metric, pass: f64, warn: f64, params: &[(&str, f64)]) -> Tolerance {
        Tolerance {
            metric,
            pass,
            warn,
            params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            reason: "test".into(),
        }
    }

    fn spec(tols: Vec<(&str, Vec<Tolerance>)>) -> CaseSpec {
        CaseSpec {
            id: "t()".into(),
            family: "t".into(),
            params: Default::default(),
            seed: 1,
            profiles: Default::default(),
            tolerances: tols.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            source: Source::Generated,
            origin: "test".into(),
        }
    }

    fn outs(items: Vec<(&str, HostTensor)>) -> Outputs {
        items.into_iter().map(|(n, t)| (n.to_string(), t)).collect()
    }

    #[test]
    fn every_output_needs_a_tolerance_and_a_value() {
        let j = Judging::new(&spec(vec![("y", vec![tol(Metric::Exact, 0.0, 0.0, &[])])]));
        let y = HostTensor::from_i32(&[2], &[1, 2]);
        let r = outs(vec![("y", y.clone()), ("z", y.clone())]);
        let c = j.judge(&r, &r);
        assert_eq!(judge::verdict(&c), crate::types::Outcome::Fail);
        assert!(c.iter().any(|c| c.metric == "z.tolerance"), "{c:?}");
        let r = outs(vec![("y", y.clone())]);
        let c = j.judge(&Outputs::new(), &r);
        assert_eq!(c[0].metric, "y.present");
        assert_eq!(
            judge::verdict(&j.judge(&r, &r)),
            crate::types::Outcome::Pass
        );
        assert_eq!(
            judge::verdict(&j.judge(&r, &Outputs::new())),
            crate::types::Outcome::Fail
        );
    }

    #[test]
    fn warn_band_gives_quality_warning_and_nan_fails() {
        let j = Judging::new(&spec(vec![(
            "y",
            vec![tol(Metric::Elementwise, 1.0, 10.0, &[("abs", 1e-3)])],
        )]));
        let r = outs(vec![(
            "y",
            HostTensor::from_f32(DType::F32, &[3], &[1.0, 2.0, 3.0]),
        )]);
        let near = outs(vec![(
            "y",
            HostTensor::from_f32(DType::F32, &[3], &[1.0, 2.005, 3.0]),
        )]);
        let far = outs(vec![(
            "y",
            HostTensor::from_f32(DType::F32, &[3], &[1.0, 2.05, 3.0]),
        )]);
        let nan = outs(vec![(
            "y",
            HostTensor::from_f32(DType::F32, &[3], &[1.0, f32::NAN, 3.0]),
        )]);
        assert_eq!(
            judge::verdict(&j.judge(&r, &r)),
            crate::types::Outcome::Pass
        );
        let c = j.judge(&near, &r);
        assert_eq!(
            judge::verdict(&c),
            crate::types::Outcome::QualityWarning,
            "{c:?}"
        );
        assert_eq!(c[0].worst_index, Some(vec![1]));
        assert_eq!(
            judge::verdict(&j.judge(&far, &r)),
            crate::types::Outcome::Fail
        );
        let c = j.judge(&nan, &r);
        assert_eq!(judge::verdict(&c), crate::types::Outcome::Fail);
        assert!(c.iter().any(|c| c.metric == "y.nonfinite" && !c.passed));
    }

    #[test]
    fn masks_limit_the_judged_elements() {
        let j = Judging::new(&spec(vec![(
            "d",
            vec![tol(Metric::CalcDiff, 1e-5, 1e-5, &[])],
        )]))
        .mask("d", vec![true, false]);
        let r = outs(vec![(
            "d",
            HostTensor::from_f32(DType::F32, &[2], &[1.0, 0.0]),
        )]);
        let a = outs(vec![(
            "d",
            HostTensor::from_f32(DType::F32, &[2], &[1.0, f32::NAN]),
        )]);
        assert!(judge::all_passed(&j.judge(&a, &r)));
        let j2 = Judging::new(&spec(vec![(
            "d",
            vec![tol(Metric::CalcDiff, 1e-5, 1e-5, &[])],
        )]));
        assert!(!judge::all_passed(&j2.judge(&a, &r)));
    }

    #[test]
    fn rank_free_strips_the_rank() {
        assert_eq!(rank_free("r12.out"), "out");
        assert_eq!(rank_free("rope.y"), "rope.y");
        assert_eq!(rank_free("r.x"), "r.x");
    }
}
