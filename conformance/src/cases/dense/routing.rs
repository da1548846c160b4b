//! The routing-set judge of the MoE gate (SPEC §6), used by the families
//! whose outputs are routings (`moe_gate`, the `moe-gate` golden cases, the
//! model's `topk` taps): per token the *set* of chosen experts must equal
//! the reference's, the weights (sorted by expert id) within a tolerance,
//! and near-tie tokens may differ within their tie band (reported, not
//! failed). `…topk_idx` is judged together with `…topk_weights`.

use crate::cases::judging::FamilyJudge;
use crate::judge::{self, Check};
use crate::opspec::Outputs;
use crate::types::{Metric, Tolerance};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Whether each token's selection is a selection at all: `topk` distinct,
/// non-negative expert ids (an unwritten or garbage output is not a
/// "different routing"). The value is the number of invalid tokens.
pub fn routing_validity(name: &str, idx: &[i64], topk: usize) -> Check {
    let metric = format!("{name}.valid");
    if topk == 0 || !idx.len().is_multiple_of(topk) {
        return Check::broken(metric, format!("{} ids are not rows of {topk}", idx.len()));
    }
    let mut bad = 0usize;
    let mut first = None;
    for (t, row) in idx.chunks(topk).enumerate() {
        let mut v = row.to_vec();
        v.sort_unstable();
        let distinct = v.windows(2).all(|w| w[0] != w[1]);
        if !distinct || v.first().is_some_and(|&e| e < 0) {
            bad += 1;
            first.get_or_insert((t, row.to_vec()));
        }
    }
    let detail = first.as_ref().map_or(String::new(), |(t, row)| {
        format!("{bad} tokens have repeated or negative expert ids; token {t}: {row:?}")
    });
    Check::new(metric, bad as f64, 0.0, bad == 0, detail).with_worst(first.map(|f| vec![f.0]))
}

/// Judges two MoE routings (SPEC.md §6): per token, the *set* of chosen
/// experts must be equal, and the weights, after sorting by expert id,
/// within `weight_tol`. A token whose selection sits on a near-tie of
/// scores may differ — reported, not failed — but only among the experts
/// of its tie band: `near_tie[t]` lists the experts that may be swapped
/// for one another (empty: the token is not a near-tie), and a selection
/// that differs by any other expert, or repeats an expert, fails. Returns
/// the set check and the weight check.
#[allow(clippy::too_many_arguments)]
pub fn routing(
    name: &str,
    idx_a: &[i64],
    w_a: &[f32],
    idx_r: &[i64],
    w_r: &[f32],
    topk: usize,
    near_tie: Option<&[Vec<i64>]>,
    weight_tol: f64,
) -> Vec<Check> {
    let set_metric = format!("{name}.set_mismatch");
    let w_metric = format!("{name}.weights_abs");
    let n = idx_r.len();
    if topk == 0
        || idx_a.len() != n
        || w_a.len() != n
        || w_r.len() != n
        || !n.is_multiple_of(topk)
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
            let band = near_tie.map_or(&[][..], |nt| nt[t].as_slice());
            let ea: Vec<i64> = pa.iter().map(|p| p.0).collect();
            let er: Vec<i64> = pr.iter().map(|p| p.0).collect();
            let distinct = ea.windows(2).all(|w| w[0] != w[1]);
            let within = ea
                .iter()
                .filter(|e| !er.contains(e))
                .chain(er.iter().filter(|e| !ea.contains(e)))
                .all(|e| band.contains(e));
            if !band.is_empty() && distinct && within {
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
        Check::new(set_metric, bad as f64, 0.0, bad == 0, set_detail)
            .with_worst(first_bad.as_ref().map(|f| vec![f.0])),
        Check::new(
            w_metric,
            worst_w,
            weight_tol,
            worst_w <= weight_tol,
            w_detail,
        )
        .with_worst(worst_at.map(|w| vec![w.0])),
    ]
}

/// `…topk_weights` is judged with its `…topk_idx`.
fn indices_of(name: &str) -> Option<String> {
    name.strip_suffix("topk_weights")
        .map(|prefix| format!("{prefix}topk_idx"))
}

/// The `set_equality` judge of a case: `near_tie` maps a routing output
/// (`…topk_idx`) to each token's tie band (empty for tokens that are not
/// near-ties).
pub fn judge(near_tie: BTreeMap<String, Vec<Vec<i64>>>) -> FamilyJudge {
    FamilyJudge {
        metric: Metric::SetEquality,
        companion_of: indices_of,
        judge: Arc::new(move |name, t, a, r| judge_routing(&near_tie, name, t, a, r)),
    }
}

fn judge_routing(
    near_tie: &BTreeMap<String, Vec<Vec<i64>>>,
    name: &str,
    t: &Tolerance,
    a: &Outputs,
    r: &Outputs,
) -> Vec<Check> {
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
    let mut c = routing(
        &label,
        &ia.to_i64_vec(),
        &wa.to_f32_vec(),
        &ir.to_i64_vec(),
        &wr.to_f32_vec(),
        topk,
        near_tie.get(name).map(|v| v.as_slice()),
        weight_abs.unwrap_or(f64::INFINITY),
    );
    let valid = routing_validity(&label, &ia.to_i64_vec(), topk);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::judging::Judging;
    use crate::judge::all_passed;
    use crate::types::{CaseSpec, Source};
    use deepport_core::{DType, HostTensor};

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
        // Token 1 is a near tie between experts 2 and 7: excused.
        let band = [vec![], vec![2i64, 7]];
        let c = routing("g", &idx_c, &w_r, &idx_r, &w_r, 2, Some(&band), 1e-6);
        assert!(all_passed(&c), "{c:?}");
        assert!(c[0].detail.contains("near-tie"));
        // ... but not a swap with an expert outside the tie band.
        let idx_d = [3i64, 5, 1, 9];
        let c = routing("g", &idx_d, &w_r, &idx_r, &w_r, 2, Some(&band), 1e-6);
        assert!(!c[0].passed, "{c:?}");
        // ... nor a repeated expert.
        let idx_e = [3i64, 5, 7, 7];
        let band2 = [vec![], vec![1i64, 2, 7]];
        let c = routing("g", &idx_e, &w_r, &idx_r, &w_r, 2, Some(&band2), 1e-6);
        assert!(!c[0].passed, "{c:?}");
        // Mismatched sizes are a failure.
        let c = routing("g", &idx_a[..2], &w_a, &idx_r, &w_r, 2, None, 1e-6);
        assert!(!all_passed(&c));
    }

    #[test]
    fn routing_validity_rejects_garbage() {
        assert!(routing_validity("g", &[1, 2, 3, 0], 2).passed);
        let c = routing_validity("g", &[1, 1, 3, 0, -1, 2], 2);
        assert_eq!((c.passed, c.value), (false, 2.0));
        assert_eq!(c.worst_index, Some(vec![0]));
        assert!(!routing_validity("g", &[1, 2, 3], 2).passed);
    }

    #[test]
    fn routing_pairs_indices_with_weights() {
        let tol = Tolerance {
            metric: Metric::SetEquality,
            pass: 0.0,
            warn: 0.0,
            params: [("weight_abs".to_string(), 1e-6)].into_iter().collect(),
            reason: "test".into(),
        };
        let spec = CaseSpec {
            id: "t()".into(),
            family: "t".into(),
            params: Default::default(),
            seed: 1,
            profiles: Default::default(),
            tolerances: [("topk".to_string(), vec![tol])].into_iter().collect(),
            source: Source::Generated,
            origin: "test".into(),
        };
        let ties = BTreeMap::from([("topk_idx".to_string(), vec![vec![], vec![4, 5]])]);
        let j = Judging::new(&spec)
            .key_of(|n| {
                if n.contains("topk") {
                    "topk".into()
                } else {
                    n.into()
                }
            })
            .with(judge(ties));
        let r: Outputs = [
            (
                "topk_idx".to_string(),
                HostTensor::from_i64(&[2, 2], &[1, 2, 3, 4]),
            ),
            (
                "topk_weights".to_string(),
                HostTensor::from_f32(DType::F32, &[2, 2], &[0.5, 0.25, 0.1, 0.2]),
            ),
        ]
        .into_iter()
        .collect();
        assert!(all_passed(&j.judge(&r, &r)));
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
        assert!(all_passed(&c), "{c:?}");
        // Token 0 differing fails.
        a.insert(
            "topk_idx".into(),
            HostTensor::from_i64(&[2, 2], &[1, 7, 3, 4]),
        );
        assert!(!all_passed(&j.judge(&a, &r)));
        // Without the family's judge, set_equality is never a silent pass.
        let bare = Judging::new(&spec).key_of(|n| {
            if n.contains("topk") {
                "topk".into()
            } else {
                n.into()
            }
        });
        assert!(!all_passed(&bare.judge(&r, &r)));
    }
}
