//! Built-in expert-parallel cases: 4 in-process ranks
//! ([`deepport_core::comm::run_ranks`]) running get_dispatch_layout,
//! dispatch + combine and low_latency_dispatch + low_latency_combine
//! (SPEC §7). Layouts, counts, handles and payloads are judged exactly;
//! combines with `calc_diff < 5e-6` and inf/NaN parity.

use super::{Case, JudgeFn};
use crate::error::CliError;
use crate::judge::{self, Check, Cmp};
use crate::opspec::Outputs;
use crate::rng::Rng;
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::comm::run_ranks;
use deepport_core::formats;
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};

const WORLD: usize = 4;
const EXPERTS: usize = 16;
const TOKENS: usize = 12;
const HIDDEN: usize = 256;
const TOPK: usize = 4;
const MAX_TOKENS: usize = 16;

/// One rank's routing and activations.
struct RankInput {
    x: Vec<f32>,
    topk_idx: Vec<i64>,
    topk_weights: Vec<f32>,
}

/// Distinct experts per token, about a fifth of the entries −1, and the
/// last token routed nowhere.
fn rank_input(seed: u64, rank: usize) -> RankInput {
    let mut rng = Rng::new(seed * 1000 + rank as u64);
    let x = rng.normals(TOKENS * HIDDEN, 1.0);
    let mut topk_idx = Vec::with_capacity(TOKENS * TOPK);
    let mut topk_weights = Vec::with_capacity(TOKENS * TOPK);
    for t in 0..TOKENS {
        let perm = rng.permutation(EXPERTS);
        for &e in perm.iter().take(TOPK) {
            let none = t == TOKENS - 1 || rng.below(5) == 0;
            topk_idx.push(if none { -1 } else { e as i64 });
            topk_weights.push(if none { 0.0 } else { rng.range_f32(0.05, 1.0) });
        }
    }
    RankInput {
        x,
        topk_idx,
        topk_weights,
    }
}

fn key(rank: usize, name: &str) -> String {
    format!("r{rank}.{name}")
}

/// Runs `f` on every rank and merges the per-rank outputs.
fn on_ranks(
    b: &dyn Backend,
    f: impl Fn(&dyn Backend, usize, &dyn deepport_core::Communicator) -> Result<Outputs> + Sync,
) -> Result<Outputs, CliError> {
    let per_rank = run_ranks(WORLD, |rank, comm| f(b, rank, comm)).map_err(CliError::Failed)?;
    Ok(per_rank.into_iter().flatten().collect())
}

/// Judges every output exactly, except those whose name ends in `.out`
/// (combine results): `calc_diff < 5e-6` plus inf/NaN parity.
fn j_ep() -> JudgeFn {
    Box::new(|a, r| {
        let mut checks = Vec::new();
        for (name, rt) in r {
            let Some(at) = a.get(name) else {
                checks.push(Check::broken(
                    format!("{name}.present"),
                    "the backend returned no such output",
                ));
                continue;
            };
            if name.ends_with(".out") {
                if at.dtype() != rt.dtype() || at.shape() != rt.shape() {
                    checks.push(judge::exact(name, at, rt));
                    continue;
                }
                let (av, rv) = (at.to_f32_vec(), rt.to_f32_vec());
                let cmp = Cmp::new(name, &av, &rv, rt.shape());
                checks.push(cmp.calc_diff(5e-6, true));
                checks.push(cmp.nonfinite_parity());
            } else {
                checks.push(judge::exact(name, at, rt));
            }
        }
        // Combine checks first in the headline when all pass.
        checks.sort_by_key(|c| !c.metric.contains("calc_diff"));
        checks
    })
}

fn dl(b: &dyn Backend, t: &Tensor) -> Result<HostTensor> {
    b.download(t)
}

fn get_dispatch_layout_case(seed: u64) -> Case {
    Case {
        id: format!(
            "get_dispatch_layout(ranks={WORLD},experts={EXPERTS},tokens={TOKENS},topk={TOPK})"
        ),
        ops: vec![OpKind::GetDispatchLayout],
        run: Box::new(move |b| {
            on_ranks(b, |b, rank, _comm| {
                let inp = rank_input(seed, rank);
                let idx = b.upload(&HostTensor::from_i64(&[TOKENS, TOPK], &inp.topk_idx))?;
                let mut per_rank = alloc_poisoned(b, DType::I32, &[WORLD])?;
                let mut per_expert = alloc_poisoned(b, DType::I32, &[EXPERTS])?;
                let mut in_rank = alloc_poisoned(b, DType::Bool, &[TOKENS, WORLD])?;
                ops::run(
                    b,
                    GetDispatchLayout {
                        topk_idx: &idx,
                        num_tokens_per_rank: &mut per_rank,
                        num_tokens_per_expert: &mut per_expert,
                        is_token_in_rank: &mut in_rank,
                        num_experts: EXPERTS,
                        world_size: WORLD,
                    },
                )?;
                Ok(Outputs::from([
                    (key(rank, "num_tokens_per_rank"), dl(b, &per_rank)?),
                    (key(rank, "num_tokens_per_expert"), dl(b, &per_expert)?),
                    (key(rank, "is_token_in_rank"), dl(b, &in_rank)?),
                ]))
            })
        }),
        judge: j_ep(),
    }
}

/// Quantizes rows of 128 with act_quant's rule (float scales), on the host.
fn quantize_rows(x: &[f32]) -> (HostTensor, HostTensor) {
    let n = x.len() / HIDDEN;
    let mut q = Vec::with_capacity(x.len());
    let mut s = Vec::with_capacity(x.len() / 128);
    for g in x.chunks(128) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
        let sc = amax / formats::E4M3_MAX;
        s.push(sc);
        q.extend(g.iter().map(|v| v / sc));
    }
    (
        HostTensor::from_f32(DType::F8E4M3, &[n, HIDDEN], &q),
        HostTensor::from_f32(DType::F32, &[n, HIDDEN / 128], &s),
    )
}

/// Dequantizes FP8 rows with per-128 scales into bf16 (the "expert" of the
/// normal dispatch cases is the identity on the payload).
fn dequant_rows(q: &HostTensor, s: Option<&HostTensor>) -> HostTensor {
    let v = q.to_f32_vec();
    let out: Vec<f32> = match s {
        None => v,
        Some(s) => {
            let sv = s.to_f32_vec();
            v.iter()
                .enumerate()
                .map(|(i, &x)| x * sv.get(i / 128).copied().unwrap_or(f32::NAN))
                .collect()
        }
    };
    HostTensor::from_f32(DType::BF16, q.shape(), &out)
}

fn dispatch_combine_case(seed: u64, fp8: bool, align: usize) -> Case {
    Case {
        id: format!(
            "dispatch_combine(ranks={WORLD},experts={EXPERTS},tokens={TOKENS},hidden={HIDDEN},topk={TOPK},payload={},align={align})",
            if fp8 { "e4m3" } else { "bf16" }
        ),
        ops: vec![OpKind::Dispatch, OpKind::Combine],
        run: Box::new(move |b| {
            on_ranks(b, |b, rank, comm| {
                let inp = rank_input(seed, rank);
                let (x, xs) = if fp8 {
                    let (q, s) = quantize_rows(&inp.x);
                    (b.upload(&q)?, Some(b.upload(&s)?))
                } else {
                    (
                        b.upload(&HostTensor::from_f32(DType::BF16, &[TOKENS, HIDDEN], &inp.x))?,
                        None,
                    )
                };
                let idx = b.upload(&HostTensor::from_i64(&[TOKENS, TOPK], &inp.topk_idx))?;
                let w = b.upload(&HostTensor::from_f32(
                    DType::F32,
                    &[TOKENS, TOPK],
                    &inp.topk_weights,
                ))?;
                let d = ops::dispatch(
                    b,
                    comm,
                    Dispatch {
                        x: &x,
                        x_scales: xs.as_ref(),
                        topk_idx: &idx,
                        topk_weights: &w,
                        num_experts: EXPERTS,
                        expert_alignment: align,
                    },
                )?;
                let recv_x = dl(b, &d.recv_x)?;
                let recv_s = d.recv_scales.as_ref().map(|s| dl(b, s)).transpose()?;
                let mut o = Outputs::new();
                let src: Vec<i64> = d
                    .handle
                    .recv_src
                    .iter()
                    .flat_map(|&(r, t)| [r as i64, t as i64])
                    .collect();
                o.insert(
                    key(rank, "recv_src"),
                    HostTensor::from_i64(&[d.handle.recv_src.len(), 2], &src),
                );
                let counts: Vec<i64> = d.num_recv_tokens_per_expert.iter().map(|&c| c as i64).collect();
                o.insert(
                    key(rank, "num_recv_tokens_per_expert"),
                    HostTensor::from_i64(&[counts.len()], &counts),
                );
                o.insert(key(rank, "recv_topk_idx"), dl(b, &d.recv_topk_idx)?);
                o.insert(key(rank, "recv_topk_weights"), dl(b, &d.recv_topk_weights)?);
                // Identity expert: send the (dequantized) payload back.
                let y = b.upload(&dequant_rows(&recv_x, recv_s.as_ref()))?;
                o.insert(key(rank, "recv_x"), recv_x);
                if let Some(s) = recv_s {
                    o.insert(key(rank, "recv_scales"), s);
                }
                let mut out = alloc_poisoned(b, DType::BF16, &[TOKENS, HIDDEN])?;
                ops::combine(
                    b,
                    comm,
                    Combine {
                        x: &y,
                        handle: &d.handle,
                        out: &mut out,
                    },
                )?;
                o.insert(key(rank, "combine.out"), dl(b, &out)?);
                Ok(o)
            })
        }),
        judge: j_ep(),
    }
}

/// Reorders the filled slots of a low-latency receive buffer by (source
/// rank, source token): slot order is not part of the contract.
fn canonical_slots(
    rank: usize,
    recv_x: &HostTensor,
    recv_s: Option<&HostTensor>,
    h: &LowLatencyHandle,
) -> Result<Outputs> {
    let slots = MAX_TOKENS * WORLD;
    let e_local = EXPERTS / WORLD;
    if h.recv_src.len() != e_local || h.recv_src.iter().any(|v| v.len() > slots) {
        return Err(Error::Other(format!(
            "low_latency_dispatch handle lists {} experts (expected {e_local}) or more than {slots} slots",
            h.recv_src.len()
        )));
    }
    if recv_x.shape() != [e_local, slots, HIDDEN]
        || recv_s
            .is_some_and(|s| s.shape() != [e_local, slots, HIDDEN / 128] || s.dtype() != DType::F32)
    {
        return Err(Error::Other(format!(
            "low_latency_dispatch returned recv_x {:?} and scales {:?}, expected [{e_local}, {slots}, {HIDDEN}] (and f32 [.., {}])",
            recv_x.shape(),
            recv_s.map(|s| s.shape().to_vec()),
            HIDDEN / 128
        )));
    }
    let row_b = HIDDEN * recv_x.dtype().size();
    let srow_b = (HIDDEN / 128) * 4;
    let (mut xb, mut sb, mut src) = (Vec::new(), Vec::new(), Vec::new());
    for (e, list) in h.recv_src.iter().enumerate() {
        let mut order: Vec<usize> = (0..list.len()).collect();
        order.sort_by_key(|&j| list[j]);
        for j in order {
            let row = e * slots + j;
            xb.extend_from_slice(&recv_x.bytes()[row * row_b..(row + 1) * row_b]);
            if let Some(s) = recv_s {
                sb.extend_from_slice(&s.bytes()[row * srow_b..(row + 1) * srow_b]);
            }
            src.extend([e as i64, list[j].0 as i64, list[j].1 as i64]);
        }
    }
    let n = src.len() / 3;
    let mut o = Outputs::new();
    o.insert(
        key(rank, "recv_x_by_source"),
        HostTensor::from_bytes(recv_x.dtype(), &[n, HIDDEN], xb)?,
    );
    if recv_s.is_some() {
        o.insert(
            key(rank, "recv_scales_by_source"),
            HostTensor::from_bytes(DType::F32, &[n, HIDDEN / 128], sb)?,
        );
    }
    o.insert(
        key(rank, "recv_sources"),
        HostTensor::from_i64(&[n, 3], &src),
    );
    Ok(o)
}

fn low_latency_case(seed: u64, use_fp8: bool, ue8m0: bool) -> Case {
    let payload = match (use_fp8, ue8m0) {
        (false, _) => "bf16",
        (true, false) => "e4m3",
        (true, true) => "e4m3_ue8m0",
    };
    Case {
        id: format!(
            "low_latency_dispatch_combine(ranks={WORLD},experts={EXPERTS},tokens={TOKENS},max_tokens={MAX_TOKENS},hidden={HIDDEN},topk={TOPK},payload={payload})"
        ),
        ops: vec![OpKind::LowLatencyDispatch, OpKind::LowLatencyCombine],
        run: Box::new(move |b| {
            on_ranks(b, |b, rank, comm| {
                let inp = rank_input(seed, rank);
                let x = b.upload(&HostTensor::from_f32(DType::BF16, &[TOKENS, HIDDEN], &inp.x))?;
                let idx_h = HostTensor::from_i64(&[TOKENS, TOPK], &inp.topk_idx);
                let idx = b.upload(&idx_h)?;
                let d = ops::low_latency_dispatch(
                    b,
                    comm,
                    LowLatencyDispatch {
                        x: &x,
                        topk_idx: &idx,
                        num_experts: EXPERTS,
                        max_tokens_per_rank: MAX_TOKENS,
                        use_fp8,
                        ue8m0,
                    },
                )?;
                let recv_x = dl(b, &d.recv_x)?;
                let recv_s = d.recv_scales.as_ref().map(|s| dl(b, s)).transpose()?;
                let mut o = canonical_slots(rank, &recv_x, recv_s.as_ref(), &d.handle)?;
                o.insert(key(rank, "recv_count"), dl(b, &d.recv_count)?);

                // Expert e_local scales its rows by (1 + e_local/4); slots that
                // were not filled hold NaN and must not be read by combine.
                let slots = MAX_TOKENS * WORLD;
                let rows = EXPERTS / WORLD * slots;
                let flat_s = match &recv_s {
                    Some(s) => Some(s.clone().reshape(&[rows, HIDDEN / 128])?),
                    None => None,
                };
                let deq = dequant_rows(&recv_x.clone().reshape(&[rows, HIDDEN])?, flat_s.as_ref())
                    .to_f32_vec();
                let mut y = vec![f32::NAN; deq.len()];
                for (e, list) in d.handle.recv_src.iter().enumerate() {
                    let f = 1.0 + e as f32 / 4.0;
                    for j in 0..list.len().min(slots) {
                        let row = (e * slots + j) * HIDDEN;
                        for c in 0..HIDDEN {
                            y[row + c] = deq[row + c] * f;
                        }
                    }
                }
                let y = b.upload(&HostTensor::from_f32(
                    DType::BF16,
                    &[EXPERTS / WORLD, slots, HIDDEN],
                    &y,
                ))?;
                let w = b.upload(&HostTensor::from_f32(
                    DType::F32,
                    &[TOKENS, TOPK],
                    &inp.topk_weights,
                ))?;
                let mut out = alloc_poisoned(b, DType::BF16, &[TOKENS, HIDDEN])?;
                ops::low_latency_combine(
                    b,
                    comm,
                    LowLatencyCombine {
                        x: &y,
                        topk_idx: &idx,
                        topk_weights: &w,
                        handle: &d.handle,
                        out: &mut out,
                    },
                )?;
                o.insert(key(rank, "combine.out"), dl(b, &out)?);
                Ok(o)
            })
        }),
        judge: j_ep(),
    }
}

/// All expert-parallel cases.
pub(super) fn cases() -> Vec<Case> {
    vec![
        get_dispatch_layout_case(601),
        dispatch_combine_case(602, false, 1),
        dispatch_combine_case(603, true, 4),
        low_latency_case(604, false, false),
        low_latency_case(605, true, false),
        low_latency_case(606, true, true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_inputs_are_valid() {
        for r in 0..WORLD {
            let inp = rank_input(1, r);
            assert_eq!(inp.topk_idx.len(), TOKENS * TOPK);
            for t in 0..TOKENS {
                let row = &inp.topk_idx[t * TOPK..(t + 1) * TOPK];
                let mut live: Vec<i64> = row.iter().copied().filter(|&e| e >= 0).collect();
                live.sort_unstable();
                let n = live.len();
                live.dedup();
                assert_eq!(live.len(), n, "duplicate expert in {row:?}");
                assert!(live.iter().all(|&e| (e as usize) < EXPERTS));
            }
            assert!(inp.topk_idx[(TOKENS - 1) * TOPK..].iter().all(|&e| e == -1));
        }
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        let inp = rank_input(2, 0);
        let (q, s) = quantize_rows(&inp.x);
        let back = dequant_rows(&q, Some(&s)).to_f32_vec();
        for (a, b) in back.iter().zip(&inp.x) {
            // e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4, plus bf16.
            assert!((a - b).abs() <= b.abs() * 0.07 + 1e-3, "{a} vs {b}");
        }
    }
}
