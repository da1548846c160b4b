//! The keyed-row judge of the expert-parallel family (SPEC §7):
//! low-latency receive slots are in no defined order, so their rows come
//! with keys (`(local expert, source rank, source token)`) in an output of
//! the same name plus [`KEYS`] and are compared by key, each bit-exact.

use crate::cases::judging::FamilyJudge;
use crate::judge::{self, Check};
use crate::opspec::Outputs;
use crate::types::{Metric, Tolerance};
use deepport_core::HostTensor;
use std::sync::Arc;

/// Suffix of the key tensor of a keyed output.
pub const KEYS: &str = ".keys";

/// Rows whose order is undefined, compared by a key (SPEC §7: low-latency
/// dispatch slots, keyed by source rank and token). `a_keys`/`r_keys` hold
/// `key_width` integers per row; every reference key must appear exactly
/// once among the actual rows with bit-identical bytes, and no other key
/// may appear. The value is the number of missing, extra, duplicated or
/// differing rows.
pub fn keyed(
    name: &str,
    a: &HostTensor,
    a_keys: &[i64],
    r: &HostTensor,
    r_keys: &[i64],
    key_width: usize,
) -> Check {
    use std::collections::BTreeMap;
    let metric = format!("{name}.keyed");
    let rows = |t: &HostTensor, keys: &[i64]| -> Result<usize, String> {
        if key_width == 0 || !keys.len().is_multiple_of(key_width) {
            return Err(format!(
                "{} key values are not rows of {key_width}",
                keys.len()
            ));
        }
        let n = keys.len() / key_width;
        let lead = t.shape().first().copied().unwrap_or(0);
        if lead != n {
            return Err(format!("{n} keys for {lead} rows ({:?})", t.shape()));
        }
        Ok(n)
    };
    if a.dtype() != r.dtype() || a.shape().get(1..) != r.shape().get(1..) {
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
    let (na, nr) = match (rows(a, a_keys), rows(r, r_keys)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) => return Check::broken(metric, format!("backend: {e}")),
        (_, Err(e)) => return Check::broken(metric, format!("reference: {e}")),
    };
    let row_bytes = |t: &HostTensor, n: usize| t.bytes().len().checked_div(n).unwrap_or(0);
    let (ba, br) = (row_bytes(a, na), row_bytes(r, nr));
    let mut by_key: BTreeMap<&[i64], Vec<usize>> = BTreeMap::new();
    for i in 0..na {
        by_key
            .entry(&a_keys[i * key_width..(i + 1) * key_width])
            .or_default()
            .push(i);
    }
    let mut bad = 0usize;
    let mut first: Option<String> = None;
    let mut worst = None;
    let mut seen = 0usize;
    for j in 0..nr {
        let key = &r_keys[j * key_width..(j + 1) * key_width];
        match by_key.get(key).map(|v| v.as_slice()) {
            Some([i]) => {
                seen += 1;
                if a.bytes()[i * ba..(i + 1) * ba] != r.bytes()[j * br..(j + 1) * br] {
                    bad += 1;
                    worst.get_or_insert(vec![j]);
                    first.get_or_insert_with(|| {
                        format!("row with key {key:?} differs (backend row {i}, reference row {j})")
                    });
                }
            }
            Some(v) => {
                seen += v.len();
                bad += 1;
                worst.get_or_insert(vec![j]);
                first.get_or_insert_with(|| format!("key {key:?} appears {} times", v.len()));
            }
            None => {
                bad += 1;
                worst.get_or_insert(vec![j]);
                first.get_or_insert_with(|| format!("key {key:?} is missing"));
            }
        }
    }
    // Keys the reference does not have.
    let extra = na.saturating_sub(seen);
    if extra > 0 {
        bad += extra;
        first.get_or_insert_with(|| format!("{extra} rows with keys the reference does not have"));
    }
    let detail = first.map_or(String::new(), |f| format!("{bad} bad rows; {f}"));
    Check::new(metric, bad as f64, 0.0, bad == 0, detail).with_worst(worst)
}

/// `x.keys` is judged with `x`.
fn rows_of(name: &str) -> Option<String> {
    name.strip_suffix(KEYS).map(str::to_string)
}

/// The `keyed` judge of a case.
pub fn judge() -> FamilyJudge {
    FamilyJudge {
        metric: Metric::Keyed,
        companion_of: rows_of,
        judge: Arc::new(|name, t, a, r| vec![judge_keyed(name, t, a, r)]),
    }
}

fn judge_keyed(name: &str, t: &Tolerance, a: &Outputs, r: &Outputs) -> Check {
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
        keyed(name, at, &ak.to_i64_vec(), rt, &rk.to_i64_vec(), width(rk)),
        t,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::judging::{rank_free, Judging};
    use crate::types::{CaseSpec, Source};
    use deepport_core::DType;

    #[test]
    fn keyed_rows_compare_by_key() {
        let r = HostTensor::from_f32(DType::BF16, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let keys = [0i64, 1, 0, 2, 1, 0];
        // The same rows in another order, keys moved with them.
        let a = HostTensor::from_f32(DType::BF16, &[3, 2], &[5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);
        let akeys = [1i64, 0, 0, 1, 0, 2];
        assert!(keyed("x", &a, &akeys, &r, &keys, 2).passed);
        // One row's bytes differ.
        let b = HostTensor::from_f32(DType::BF16, &[3, 2], &[5.0, 6.0, 1.0, 2.5, 3.0, 4.0]);
        let c = keyed("x", &b, &akeys, &r, &keys, 2);
        assert_eq!((c.passed, c.value), (false, 1.0));
        assert_eq!(c.worst_index, Some(vec![0]));
        // A key missing (replaced by another).
        let c = keyed("x", &a, &[9, 9, 0, 1, 0, 2], &r, &keys, 2);
        assert!(!c.passed && c.value == 2.0, "{c:?}");
        // A row too few.
        let short = HostTensor::from_f32(DType::BF16, &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert!(!keyed("x", &short, &keys[..4], &r, &keys, 2).passed);
        // Keys that do not match the rows are a broken check.
        assert!(!keyed("x", &a, &akeys[..4], &r, &keys, 2).passed);
        assert!(!keyed("x", &a, &akeys, &r, &keys, 0).passed);
    }

    #[test]
    fn keyed_rows_match_in_any_order() {
        let spec = CaseSpec {
            id: "t()".into(),
            family: "t".into(),
            params: Default::default(),
            seed: 1,
            profiles: Default::default(),
            tolerances: [(
                "recv_x".to_string(),
                vec![Tolerance {
                    metric: Metric::Keyed,
                    pass: 0.0,
                    warn: 0.0,
                    params: Default::default(),
                    reason: "test".into(),
                }],
            )]
            .into_iter()
            .collect(),
            source: Source::Generated,
            origin: "test".into(),
        };
        let j = Judging::new(&spec).key_of(rank_free).with(judge());
        let rows = |v: &[f32]| HostTensor::from_f32(DType::BF16, &[v.len() / 2, 2], v);
        let outs = |x: HostTensor, k: &[i64]| -> Outputs {
            [
                ("r0.recv_x".to_string(), x),
                (
                    "r0.recv_x.keys".to_string(),
                    HostTensor::from_i64(&[2, 2], k),
                ),
            ]
            .into_iter()
            .collect()
        };
        let r = outs(rows(&[1.0, 2.0, 3.0, 4.0]), &[0, 5, 1, 2]);
        let swapped = outs(rows(&[3.0, 4.0, 1.0, 2.0]), &[1, 2, 0, 5]);
        assert!(judge::all_passed(&j.judge(&swapped, &r)));
        let wrong = outs(rows(&[3.0, 4.0, 1.0, 2.5]), &[1, 2, 0, 5]);
        assert!(!judge::all_passed(&j.judge(&wrong, &r)));
        let dup = outs(rows(&[1.0, 2.0, 1.0, 2.0]), &[0, 5, 0, 5]);
        assert!(!judge::all_passed(&j.judge(&dup, &r)));
        // Without the family's judge, the keys have no tolerance and the
        // keyed metric is not silently passed.
        let bare = Judging::new(&spec).key_of(rank_free);
        assert!(!judge::all_passed(&bare.judge(&r, &r)));
    }
}
