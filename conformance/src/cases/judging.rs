//! Judging driven by a case's tolerance entries (the `tolerances` of its
//! [`CaseSpec`]): every output of the reference (or of the expected golden
//! data) is judged with each entry of its tolerance key, plus an inf/NaN
//! parity check for float outputs judged by a float metric. An output the
//! catalogue has no tolerance for, or one the backend did not return, is a
//! failed check — nothing is silently skipped.
//!
//! Two metrics need more than the two tensors of one output:
//! * `set_equality` judges `…topk_idx` together with `…topk_weights`
//!   ([`judge::routing`]), excusing the near-tie tokens given by the case;
//! * `keyed` judges the rows of an output by the keys in the output of the
//!   same name plus `.keys` ([`judge::keyed`]); `.keys` outputs are not
//!   judged on their own.

use super::JudgeFn;
use crate::judge::{self, Check, Cmp};
use crate::opspec::Outputs;
use crate::suite::{CaseSpec, Metric, Tolerance};
use deepport_core::HostTensor;
use std::collections::BTreeMap;

/// Suffix of the key tensor of a keyed output.
pub const KEYS: &str = ".keys";

/// How a case's outputs are judged.
#[derive(Clone)]
pub struct Judging {
    pub tolerances: BTreeMap<String, Vec<Tolerance>>,
    /// Maps an output name to its tolerance key.
    pub key_of: fn(&str) -> String,
    /// Elements judged, per output name (all when absent).
    pub masks: BTreeMap<String, Vec<bool>>,
    /// Per routing output (`…topk_idx`), each token's tie band: the
    /// experts a near-tie token may swap for one another (reported, not
    /// failed); empty for tokens that are not near-ties.
    pub near_tie: BTreeMap<String, Vec<Vec<i64>>>,
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
            near_tie: BTreeMap::new(),
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

    pub fn near_tie(mut self, output: &str, ties: Vec<Vec<i64>>) -> Self {
        self.near_tie.insert(output.to_string(), ties);
        self
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
            if name.ends_with(KEYS) && r.contains_key(&name[..name.len() - KEYS.len()]) {
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
            let routing = tols.iter().any(|t| t.metric == Metric::SetEquality);
            if routing
                && name.ends_with("topk_weights")
                && r.contains_key(&name.replace("topk_weights", "topk_idx"))
            {
                continue;
            }
            let Some(at) = a.get(name) else {
                checks.push(Check::broken(
                    format!("{name}.present"),
                    "the backend returned no such output",
                ));
                continue;
            };
            let mask = self.masks.get(name).map(|m| m.as_slice());
            for t in tols {
                match t.metric {
                    Metric::SetEquality => checks.extend(self.routing(name, t, a, r)),
                    Metric::Keyed => checks.push(keyed(name, t, a, r)),
                    _ => checks.push(judge::apply(name, t, at, rt, mask)),
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

    fn routing(&self, name: &str, t: &Tolerance, a: &Outputs, r: &Outputs) -> Vec<Check> {
        let Some(prefix) = name.strip_suffix("topk_idx") else {
            return vec![Check::broken(
                format!("{name}.set_equality"),
                "set_equality judges `…topk_idx` outputs only",
            )];
        };
        let wname = format!("{prefix}topk_weights");
        let label = format!("{prefix}topk");
        let (Some(ia), Some(ir)) = (a.get(name), r.get(name)) else {
            return vec![Check::broken(
                format!("{name}.present"),
                "missing routing indices",
            )];
        };
        let (Some(wa), Some(wr)) = (a.get(&wname), r.get(&wname)) else {
            return vec![Check::broken(
                format!("{wname}.present"),
                "missing routing weights",
            )];
        };
        if ia.shape() != ir.shape() || wa.shape() != wr.shape() || ia.dtype().is_float() {
            return vec![Check::broken(
                format!("{label}.layout"),
                format!(
                    "got {} {:?} / {:?}, reference {} {:?} / {:?}",
                    ia.dtype(),
                    ia.shape(),
                    wa.shape(),
                    ir.dtype(),
                    ir.shape(),
                    wr.shape()
                ),
            )];
        }
        let topk = ir.shape().last().copied().unwrap_or(0);
        let tokens = ir.numel().checked_div(topk).unwrap_or(0);
        let weight_abs = t.params.get("weight_abs").copied();
        let mut c = judge::routing(
            &label,
            &ia.to_i64_vec(),
            &wa.to_f32_vec(),
            &ir.to_i64_vec(),
            &wr.to_f32_vec(),
            topk,
            self.near_tie.get(name).map(|v| v.as_slice()),
            weight_abs.unwrap_or(f64::INFINITY),
        );
        let valid = judge::routing_validity(&label, &ia.to_i64_vec(), topk);
        if c.len() == 2 {
            if judge::param(t, "fraction", 0.0) != 0.0 && tokens > 0 {
                c[0].value /= tokens as f64;
                c[0].metric = format!("{label}.set_mismatch_fraction");
            }
            let set = judge::thresholded(c.remove(0), t);
            let mut out = vec![set, valid];
            if weight_abs.is_some() {
                let w = c.remove(0);
                let warn = judge::param(t, "weight_warn", w.threshold);
                out.push(w.with_warn(warn));
            }
            return out;
        }
        c
    }
}

fn keyed(name: &str, t: &Tolerance, a: &Outputs, r: &Outputs) -> Check {
    let kname = format!("{name}{KEYS}");
    let (Some(at), Some(rt)) = (a.get(name), r.get(name)) else {
        return Check::broken(format!("{name}.present"), "missing keyed rows");
    };
    let (Some(ak), Some(rk)) = (a.get(&kname), r.get(&kname)) else {
        return Check::broken(format!("{kname}.present"), "missing row keys");
    };
    let width = |k: &HostTensor| k.shape().get(1).copied().unwrap_or(1);
    if width(ak) != width(rk) || ak.dtype().is_float() {
        return Check::broken(
            format!("{name}.keyed"),
            format!(
                "keys {} {:?}, reference {:?}",
                ak.dtype(),
                ak.shape(),
                rk.shape()
            ),
        );
    }
    judge::thresholded(
        judge::keyed(name, at, &ak.to_i64_vec(), rt, &rk.to_i64_vec(), width(rk)),
        t,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{CaseSpec, Source};
    use deepport_core::DType;

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
        assert_eq!(judge::verdict(&c), crate::suite::Outcome::Fail);
        assert!(c.iter().any(|c| c.metric == "z.tolerance"), "{c:?}");
        let r = outs(vec![("y", y.clone())]);
        let c = j.judge(&Outputs::new(), &r);
        assert_eq!(c[0].metric, "y.present");
        assert_eq!(
            judge::verdict(&j.judge(&r, &r)),
            crate::suite::Outcome::Pass
        );
        assert_eq!(
            judge::verdict(&j.judge(&r, &Outputs::new())),
            crate::suite::Outcome::Fail
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
            crate::suite::Outcome::Pass
        );
        let c = j.judge(&near, &r);
        assert_eq!(
            judge::verdict(&c),
            crate::suite::Outcome::QualityWarning,
            "{c:?}"
        );
        assert_eq!(c[0].worst_index, Some(vec![1]));
        assert_eq!(
            judge::verdict(&j.judge(&far, &r)),
            crate::suite::Outcome::Fail
        );
        let c = j.judge(&nan, &r);
        assert_eq!(judge::verdict(&c), crate::suite::Outcome::Fail);
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
    fn routing_pairs_indices_with_weights() {
        let j = Judging::new(&spec(vec![(
            "topk",
            vec![tol(Metric::SetEquality, 0.0, 0.0, &[("weight_abs", 1e-6)])],
        )]))
        .key_of(|n| {
            if n.contains("topk") {
                "topk".into()
            } else {
                n.into()
            }
        })
        .near_tie("topk_idx", vec![vec![], vec![4, 5]]);
        let r = outs(vec![
            ("topk_idx", HostTensor::from_i64(&[2, 2], &[1, 2, 3, 4])),
            (
                "topk_weights",
                HostTensor::from_f32(DType::F32, &[2, 2], &[0.5, 0.25, 0.1, 0.2]),
            ),
        ]);
        assert!(judge::all_passed(&j.judge(&r, &r)));
        // Token 1 differs, but it is a near tie: reported, not failed.
        let mut a = r.clone();
        a.insert(
            "topk_idx".into(),
            HostTensor::from_i64(&[2, 2], &[2, 1, 3, 5]),
        );
        a.insert(
            "topk_weights".into(),
            HostTensor::from_f32(DType::F32, &[2, 2], &[0.25, 0.5, 0.1, 0.2]),
        );
        let c = j.judge(&a, &r);
        assert!(judge::all_passed(&c), "{c:?}");
        // Token 0 differing fails.
        a.insert(
            "topk_idx".into(),
            HostTensor::from_i64(&[2, 2], &[1, 7, 3, 4]),
        );
        assert!(!judge::all_passed(&j.judge(&a, &r)));
    }

    #[test]
    fn keyed_rows_match_in_any_order() {
        let j = Judging::new(&spec(vec![(
            "recv_x",
            vec![tol(Metric::Keyed, 0.0, 0.0, &[])],
        )]))
        .key_of(rank_free);
        let rows = |v: &[f32]| HostTensor::from_f32(DType::BF16, &[v.len() / 2, 2], v);
        let r = outs(vec![
            ("r0.recv_x", rows(&[1.0, 2.0, 3.0, 4.0])),
            (
                "r0.recv_x.keys",
                HostTensor::from_i64(&[2, 2], &[0, 5, 1, 2]),
            ),
        ]);
        let swapped = outs(vec![
            ("r0.recv_x", rows(&[3.0, 4.0, 1.0, 2.0])),
            (
                "r0.recv_x.keys",
                HostTensor::from_i64(&[2, 2], &[1, 2, 0, 5]),
            ),
        ]);
        assert!(judge::all_passed(&j.judge(&swapped, &r)));
        let wrong = outs(vec![
            ("r0.recv_x", rows(&[3.0, 4.0, 1.0, 2.5])),
            (
                "r0.recv_x.keys",
                HostTensor::from_i64(&[2, 2], &[1, 2, 0, 5]),
            ),
        ]);
        assert!(!judge::all_passed(&j.judge(&wrong, &r)));
        let dup = outs(vec![
            ("r0.recv_x", rows(&[1.0, 2.0, 1.0, 2.0])),
            (
                "r0.recv_x.keys",
                HostTensor::from_i64(&[2, 2], &[0, 5, 0, 5]),
            ),
        ]);
        assert!(!judge::all_passed(&j.judge(&dup, &r)));
        assert_eq!(rank_free("r12.out"), "out");
        assert_eq!(rank_free("rope.y"), "rope.y");
        assert_eq!(rank_free("r.x"), "r.x");
    }
}
