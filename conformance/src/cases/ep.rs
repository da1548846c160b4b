//! The expert-parallel family `ep` (SPEC §7): R in-process ranks
//! ([`deepport_core::comm::run_ranks`]) running `get_dispatch_layout`
//! (`op=layout`), `dispatch` + `combine` (`op=dispatch`) or
//! `low_latency_dispatch` + `low_latency_combine` (`op=low_latency`), with
//! bf16 or FP8 payloads. Every output is per rank (`r{rank}.{name}`) and
//! judged under its rank-free tolerance key. Low-latency receive slots are
//! in no defined order: their rows come with `(local expert, source rank,
//! source token)` keys and are compared by key.

use super::judging::{rank_free, Judging};
use super::{def, opt, req, Case, Family, KeyKind, ParamMap, P};
use crate::error::CliError;
use crate::opspec::Outputs;
use crate::rng::Rng;
use crate::types::CaseSpec;
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::comm::run_ranks;
use deepport_core::formats;
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use keyed::KEYS;

use KeyKind::{Int, Text};

pub(crate) mod keyed;

pub static EP: Family = Family {
    name: "ep",
    keys: &[
        req("op", Text(&["layout", "dispatch", "low_latency"])),
        req("ranks", Int),
        req("experts", Int),
        req("tokens", Int),
        req("topk", Int),
        opt("hidden", Int),
        opt("payload", Text(&["bf16", "e4m3", "e4m3_ue8m0"])),
        opt("align", Int),
        opt("max_tokens", Int),
        def("none", Int, "5"),
    ],
    outputs,
    ops: kinds,
    source: super::generated,
    build,
};

fn op_of(p: &ParamMap) -> &str {
    p.get("op").and_then(|v| v.as_str()).unwrap_or("")
}

fn fp8_payload(p: &ParamMap) -> bool {
    p.get("payload")
        .and_then(|v| v.as_str())
        .is_some_and(|s| s.starts_with("e4m3"))
}

/// The declared outputs of the case's ops: the dispatch's (its FP8 scales
/// with an FP8 payload), then the combine's under `combine.`.
fn outputs(p: &ParamMap) -> Vec<&'static str> {
    let kinds = kinds(p);
    let Some(&first) = kinds.first() else {
        return Vec::new();
    };
    let decl = first.decl();
    let mut v = decl.required_output_names();
    if fp8_payload(p) {
        v.extend(decl.outputs().filter(|t| t.is_optional()).map(|t| t.name));
    }
    if let Some(&combine) = kinds.get(1) {
        v.extend(super::prefixed(
            "combine",
            &combine.decl().required_output_names(),
        ));
    }
    v
}

fn kinds(p: &ParamMap) -> Vec<OpKind> {
    match op_of(p) {
        "layout" => vec![OpKind::GetDispatchLayout],
        // Core's protocol runs the communicating ops on the backend's
        // gather_rows/reduce_rows kernels, so these cases judge them too.
        "dispatch" => vec![
            OpKind::Dispatch,
            OpKind::Combine,
            OpKind::GatherRows,
            OpKind::ReduceRows,
        ],
        _ => vec![
            OpKind::LowLatencyDispatch,
            OpKind::LowLatencyCombine,
            OpKind::GatherRows,
            OpKind::ReduceRows,
        ],
    }
}

/// Sizes of one EP case.
#[derive(Clone, Copy, Debug)]
struct Dims {
    world: usize,
    experts: usize,
    tokens: usize,
    hidden: usize,
    topk: usize,
    max_tokens: usize,
    /// One in `none` top-k entries is −1 (0: none).
    none: usize,
}

/// One rank's routing and activations.
struct RankInput {
    x: Vec<f32>,
    topk_idx: Vec<i64>,
    topk_weights: Vec<f32>,
}

/// Distinct experts per token, about one entry in `none` set to −1, and
/// the last token routed nowhere.
fn rank_input(d: &Dims, seed: u64, rank: usize) -> RankInput {
    let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(rank as u64));
    let x = super::gen::normals(&mut rng, d.tokens * d.hidden, 1.0);
    let mut topk_idx = Vec::with_capacity(d.tokens * d.topk);
    let mut topk_weights = Vec::with_capacity(d.tokens * d.topk);
    for t in 0..d.tokens {
        let perm = rng.permutation(d.experts);
        for &e in perm.iter().take(d.topk) {
            let none = t + 1 == d.tokens || (d.none > 0 && rng.below(d.none) == 0);
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
    world: usize,
    f: impl Fn(&dyn Backend, usize, &dyn deepport_core::Communicator) -> Result<Outputs> + Sync,
) -> std::result::Result<Outputs, CliError> {
    let per_rank = run_ranks(world, |rank, comm| f(b, rank, comm)).map_err(CliError::Failed)?;
    Ok(per_rank.into_iter().flatten().collect())
}

fn dl(b: &dyn Backend, t: &Tensor) -> Result<HostTensor> {
    b.download(t)
}

fn build(spec: &CaseSpec) -> std::result::Result<Case, String> {
    let p = P(&spec.params);
    let op = p.text("op")?.to_string();
    let d = Dims {
        world: p.int("ranks")?,
        experts: p.int("experts")?,
        tokens: p.int("tokens")?,
        hidden: p.opt_int("hidden")?.unwrap_or(128),
        topk: p.int("topk")?,
        max_tokens: p.opt_int("max_tokens")?.unwrap_or(0),
        none: p.int("none")?,
    };
    if d.world == 0
        || !d.experts.is_multiple_of(d.world)
        || d.topk > d.experts
        || !d.hidden.is_multiple_of(128)
    {
        return Err(format!(
            "ep needs ranks ≥ 1 dividing experts, topk ≤ experts and hidden % 128 == 0 (got {:?})",
            d
        ));
    }
    let payload = p.opt_text("payload")?.unwrap_or("bf16").to_string();
    let seed = spec.seed;
    let (ops, run): (Vec<OpKind>, super::RunFn) = match op.as_str() {
        "layout" => (
            vec![OpKind::GetDispatchLayout],
            Box::new(move |b| on_ranks(b, d.world, |b, rank, _| layout_rank(b, &d, seed, rank))),
        ),
        "dispatch" => {
            let align = p.opt_int("align")?.unwrap_or(1);
            let fp8 = payload != "bf16";
            if p.has("hidden") && p.has("payload") {
                (
                    vec![
                        OpKind::Dispatch,
                        OpKind::Combine,
                        OpKind::GatherRows,
                        OpKind::ReduceRows,
                    ],
                    Box::new(move |b| {
                        on_ranks(b, d.world, |b, rank, comm| {
                            dispatch_rank(b, comm, &d, seed, rank, fp8, align)
                        })
                    }),
                )
            } else {
                return Err("ep op=dispatch needs `hidden` and `payload`".into());
            }
        }
        _ => {
            if !(p.has("hidden") && p.has("payload") && p.has("max_tokens")) {
                return Err("ep op=low_latency needs `hidden`, `payload` and `max_tokens`".into());
            }
            if d.max_tokens < d.tokens {
                return Err(format!("max_tokens {} < tokens {}", d.max_tokens, d.tokens));
            }
            let (fp8, ue8m0) = (payload != "bf16", payload == "e4m3_ue8m0");
            (
                vec![
                    OpKind::LowLatencyDispatch,
                    OpKind::LowLatencyCombine,
                    OpKind::GatherRows,
                    OpKind::ReduceRows,
                ],
                Box::new(move |b| {
                    on_ranks(b, d.world, |b, rank, comm| {
                        low_latency_rank(b, comm, &d, seed, rank, fp8, ue8m0)
                    })
                }),
            )
        }
    };
    Ok(Case {
        id: spec.id.clone(),
        ops,
        run,
        judge: Judging::new(spec)
            .key_of(rank_free)
            .with(keyed::judge())
            .into_fn(),
        expected: None,
    })
}

/// Runs rank `comm.rank()` of the `ep` case `spec` on `b` over `comm`: the
/// steps one in-process rank of [`build`]'s run takes, for transports with
/// one process per rank (`deepport run --comm mpi`).
pub(crate) fn run_rank(
    spec: &CaseSpec,
    b: &dyn Backend,
    comm: &dyn deepport_core::Communicator,
) -> Result<Outputs> {
    let bad = |e: String| Error::Other(format!("{}: {e}", spec.id));
    let p = P(&spec.params);
    let op = p.text("op").map_err(bad)?.to_string();
    let d = Dims {
        world: p.int("ranks").map_err(bad)?,
        experts: p.int("experts").map_err(bad)?,
        tokens: p.int("tokens").map_err(bad)?,
        hidden: p.opt_int("hidden").map_err(bad)?.unwrap_or(128),
        topk: p.int("topk").map_err(bad)?,
        max_tokens: p.opt_int("max_tokens").map_err(bad)?.unwrap_or(0),
        none: p.int("none").map_err(bad)?,
    };
    if d.world != comm.world_size() {
        return Err(bad(format!(
            "the case has {} ranks, the transport {}",
            d.world,
            comm.world_size()
        )));
    }
    let payload = p
        .opt_text("payload")
        .map_err(bad)?
        .unwrap_or("bf16")
        .to_string();
    let rank = comm.rank();
    match op.as_str() {
        "layout" => layout_rank(b, &d, spec.seed, rank),
        "dispatch" => {
            let align = p.opt_int("align").map_err(bad)?.unwrap_or(1);
            dispatch_rank(b, comm, &d, spec.seed, rank, payload != "bf16", align)
        }
        _ => low_latency_rank(
            b,
            comm,
            &d,
            spec.seed,
            rank,
            payload != "bf16",
            payload == "e4m3_ue8m0",
        ),
    }
}

fn layout_rank(b: &dyn Backend, d: &Dims, seed: u64, rank: usize) -> Result<Outputs> {
    let inp = rank_input(d, seed, rank);
    let idx = b.upload(&HostTensor::from_i64(&[d.tokens, d.topk], &inp.topk_idx))?;
    let mut per_rank = alloc_poisoned(b, DType::I32, &[d.world])?;
    let mut per_expert = alloc_poisoned(b, DType::I32, &[d.experts])?;
    let mut in_rank = alloc_poisoned(b, DType::Bool, &[d.tokens, d.world])?;
    ops::run(
        b,
        GetDispatchLayout {
            topk_idx: &idx,
            num_tokens_per_rank: &mut per_rank,
            num_tokens_per_expert: &mut per_expert,
            is_token_in_rank: &mut in_rank,
            num_experts: d.experts,
            world_size: d.world,
        },
    )?;
    Ok(Outputs::from([
        (key(rank, "num_tokens_per_rank"), dl(b, &per_rank)?),
        (key(rank, "num_tokens_per_expert"), dl(b, &per_expert)?),
        (key(rank, "is_token_in_rank"), dl(b, &in_rank)?),
    ]))
}

/// Quantizes rows with act_quant's rule (float scales, groups of 128), on
/// the host.
fn quantize_rows(x: &[f32], hidden: usize) -> (HostTensor, HostTensor) {
    let n = x.len() / hidden.max(1);
    let mut q = Vec::with_capacity(x.len());
    let mut s = Vec::with_capacity(x.len() / 128);
    for g in x.chunks(128) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
        let sc = amax / formats::E4M3_MAX;
        s.push(sc);
        q.extend(g.iter().map(|v| v / sc));
    }
    (
        HostTensor::from_f32(DType::F8E4M3, &[n, hidden], &q),
        HostTensor::from_f32(DType::F32, &[n, hidden / 128], &s),
    )
}

/// Dequantizes rows with per-128 scales into f32 values (the "expert" of
/// the cases is the identity on the payload, times a factor).
fn dequant(q: &HostTensor, s: Option<&HostTensor>) -> Vec<f32> {
    let v = q.to_f32_vec();
    match s {
        None => v,
        Some(s) => {
            let sv = s.to_f32_vec();
            v.iter()
                .enumerate()
                .map(|(i, &x)| x * sv.get(i / 128).copied().unwrap_or(f32::NAN))
                .collect()
        }
    }
}

/// The case's expert applied to received rows, as a bf16 tensor of
/// `rows × hidden`: row `i` is `factor · dequant(x[i])` for each
/// `(i, factor)` of `live`, and NaN (which combine must never read) for every
/// other row. Works one row at a time, so that a receive buffer of
/// gigabytes (DeepEP's 8-rank shapes) is never widened to f32 whole.
fn expert_rows(
    x: &HostTensor,
    s: Option<&HostTensor>,
    rows: usize,
    hidden: usize,
    live: impl Iterator<Item = (usize, f32)>,
) -> Result<HostTensor> {
    const NAN_BF16: [u8; 2] = 0x7fc0u16.to_le_bytes();
    let (xb, sb) = (hidden * x.dtype().size(), (hidden / 128) * 4);
    let mut out = Vec::new();
    out.try_reserve_exact(rows * hidden * 2).map_err(|_| {
        Error::Other(format!(
            "ep case: cannot allocate the expert output ({rows} x {hidden} bf16)"
        ))
    })?;
    out.extend(std::iter::repeat_n(NAN_BF16, rows * hidden).flatten());
    for (i, f) in live {
        let row_x = HostTensor::from_bytes(
            x.dtype(),
            &[1, hidden],
            x.bytes()[i * xb..(i + 1) * xb].to_vec(),
        )?;
        let row_s = match s {
            Some(s) => Some(HostTensor::from_bytes(
                DType::F32,
                &[1, hidden / 128],
                s.bytes()[i * sb..(i + 1) * sb].to_vec(),
            )?),
            None => None,
        };
        let y: Vec<f32> = dequant(&row_x, row_s.as_ref())
            .into_iter()
            .map(|v| v * f)
            .collect();
        let y = HostTensor::from_f32(DType::BF16, &[1, hidden], &y);
        out[i * hidden * 2..(i + 1) * hidden * 2].copy_from_slice(y.bytes());
    }
    HostTensor::from_bytes(DType::BF16, &[rows, hidden], out)
}

fn dispatch_rank(
    b: &dyn Backend,
    comm: &dyn deepport_core::Communicator,
    d: &Dims,
    seed: u64,
    rank: usize,
    fp8: bool,
    align: usize,
) -> Result<Outputs> {
    let inp = rank_input(d, seed, rank);
    let (x, xs) = if fp8 {
        let (q, s) = quantize_rows(&inp.x, d.hidden);
        (b.upload(&q)?, Some(b.upload(&s)?))
    } else {
        (
            b.upload(&HostTensor::from_f32(
                DType::BF16,
                &[d.tokens, d.hidden],
                &inp.x,
            ))?,
            None,
        )
    };
    let idx = b.upload(&HostTensor::from_i64(&[d.tokens, d.topk], &inp.topk_idx))?;
    let w = b.upload(&HostTensor::from_f32(
        DType::F32,
        &[d.tokens, d.topk],
        &inp.topk_weights,
    ))?;
    let out = ops::dispatch(
        b,
        comm,
        Dispatch {
            x: &x,
            x_scales: xs.as_ref(),
            topk_idx: &idx,
            topk_weights: &w,
            num_experts: d.experts,
            expert_alignment: align,
        },
    )?;
    let DispatchOutput {
        recv_x: dev_x,
        recv_scales: dev_s,
        recv_topk_idx,
        recv_topk_weights,
        num_recv_tokens_per_expert,
        handle,
    } = out;
    let recv_x = dl(b, &dev_x)?;
    let recv_s = dev_s.as_ref().map(|s| dl(b, s)).transpose()?;
    // The device copies are downloaded: free them before the expert's
    // output is uploaded (8 ranks × 32k rows × 7168 in DeepEP's shapes).
    drop((dev_x, dev_s));
    let mut o = Outputs::new();
    let src: Vec<i64> = handle
        .recv_src
        .iter()
        .flat_map(|&(r, t)| [r as i64, t as i64])
        .collect();
    o.insert(
        key(rank, "recv_src"),
        HostTensor::from_i64(&[handle.recv_src.len(), 2], &src),
    );
    let counts: Vec<i64> = num_recv_tokens_per_expert
        .iter()
        .map(|&c| c as i64)
        .collect();
    o.insert(
        key(rank, "num_recv_tokens_per_expert"),
        HostTensor::from_i64(&[counts.len()], &counts),
    );
    o.insert(key(rank, "recv_topk_idx"), dl(b, &recv_topk_idx)?);
    o.insert(key(rank, "recv_topk_weights"), dl(b, &recv_topk_weights)?);
    // Identity expert: send the (dequantized) payload back.
    let n = recv_x.shape().first().copied().unwrap_or(0);
    let y = if recv_s.is_none() && recv_x.dtype() == DType::BF16 {
        b.upload(&recv_x)?
    } else {
        let y = expert_rows(
            &recv_x,
            recv_s.as_ref(),
            n,
            d.hidden,
            (0..n).map(|i| (i, 1.0)),
        )?;
        b.upload(&y)?
    };
    o.insert(key(rank, "recv_x"), recv_x);
    if let Some(s) = recv_s {
        o.insert(key(rank, "recv_scales"), s);
    }
    let mut combined = alloc_poisoned(b, DType::BF16, &[d.tokens, d.hidden])?;
    ops::combine(
        b,
        comm,
        Combine {
            x: &y,
            handle: &handle,
            out: &mut combined,
        },
    )?;
    o.insert(key(rank, "combine.out"), dl(b, &combined)?);
    Ok(o)
}

/// The filled slots of a low-latency receive buffer as rows with keys
/// `(local expert, source rank, source token)`, in the backend's slot order.
fn keyed_slots(
    d: &Dims,
    rank: usize,
    recv_x: &HostTensor,
    recv_s: Option<&HostTensor>,
    h: &LowLatencyHandle,
) -> Result<Outputs> {
    let slots = d.max_tokens * d.world;
    let e_local = d.experts / d.world;
    let hs = d.hidden / 128;
    if h.recv_src.len() != e_local || h.recv_src.iter().any(|v| v.len() > slots) {
        return Err(Error::Other(format!(
            "low_latency_dispatch handle lists {} experts (expected {e_local}) or more than {slots} slots",
            h.recv_src.len()
        )));
    }
    if recv_x.shape() != [e_local, slots, d.hidden]
        || recv_s.is_some_and(|s| s.shape() != [e_local, slots, hs] || s.dtype() != DType::F32)
    {
        return Err(Error::Other(format!(
            "low_latency_dispatch returned recv_x {:?} and scales {:?}, expected [{e_local}, {slots}, {}] (and f32 [.., {hs}])",
            recv_x.shape(),
            recv_s.map(|s| s.shape().to_vec()),
            d.hidden
        )));
    }
    let row_b = d.hidden * recv_x.dtype().size();
    let srow_b = hs * 4;
    let (mut xb, mut sb, mut keys) = (Vec::new(), Vec::new(), Vec::new());
    for (e, list) in h.recv_src.iter().enumerate() {
        for (j, &(sr, st)) in list.iter().enumerate() {
            let row = e * slots + j;
            xb.extend_from_slice(&recv_x.bytes()[row * row_b..(row + 1) * row_b]);
            if let Some(s) = recv_s {
                sb.extend_from_slice(&s.bytes()[row * srow_b..(row + 1) * srow_b]);
            }
            keys.extend([e as i64, sr as i64, st as i64]);
        }
    }
    let n = keys.len() / 3;
    let keys = HostTensor::from_i64(&[n, 3], &keys);
    let mut o = Outputs::new();
    o.insert(
        key(rank, "recv_x"),
        HostTensor::from_bytes(recv_x.dtype(), &[n, d.hidden], xb)?,
    );
    o.insert(key(rank, &format!("recv_x{KEYS}")), keys.clone());
    if recv_s.is_some() {
        o.insert(
            key(rank, "recv_scales"),
            HostTensor::from_bytes(DType::F32, &[n, hs], sb)?,
        );
        o.insert(key(rank, &format!("recv_scales{KEYS}")), keys);
    }
    Ok(o)
}

fn low_latency_rank(
    b: &dyn Backend,
    comm: &dyn deepport_core::Communicator,
    d: &Dims,
    seed: u64,
    rank: usize,
    use_fp8: bool,
    ue8m0: bool,
) -> Result<Outputs> {
    let inp = rank_input(d, seed, rank);
    let x = b.upload(&HostTensor::from_f32(
        DType::BF16,
        &[d.tokens, d.hidden],
        &inp.x,
    ))?;
    let idx = b.upload(&HostTensor::from_i64(&[d.tokens, d.topk], &inp.topk_idx))?;
    let out = ops::low_latency_dispatch(
        b,
        comm,
        LowLatencyDispatch {
            x: &x,
            topk_idx: &idx,
            num_experts: d.experts,
            max_tokens_per_rank: d.max_tokens,
            use_fp8,
            ue8m0,
        },
    )?;
    let LowLatencyDispatchOutput {
        recv_x: dev_x,
        recv_scales: dev_s,
        recv_count,
        handle,
    } = out;
    let recv_x = dl(b, &dev_x)?;
    let recv_s = dev_s.as_ref().map(|s| dl(b, s)).transpose()?;
    // Free the device buffers before the expert's output is uploaded: with
    // DeepEP's low-latency shapes each is E·max_tokens·hidden per rank.
    drop((dev_x, dev_s));
    let mut o = keyed_slots(d, rank, &recv_x, recv_s.as_ref(), &handle)?;
    o.insert(key(rank, "recv_count"), dl(b, &recv_count)?);

    // Expert e_local scales its rows by (1 + e_local/4); slots that were
    // not filled hold NaN and must not be read by combine.
    let slots = d.max_tokens * d.world;
    let e_local = d.experts / d.world;
    let live = handle.recv_src.iter().enumerate().flat_map(|(e, list)| {
        (0..list.len().min(slots)).map(move |j| (e * slots + j, 1.0 + e as f32 / 4.0))
    });
    let y = expert_rows(&recv_x, recv_s.as_ref(), e_local * slots, d.hidden, live)?;
    drop((recv_x, recv_s));
    let y = b.upload(&y.reshape(&[e_local, slots, d.hidden])?)?;
    let w = b.upload(&HostTensor::from_f32(
        DType::F32,
        &[d.tokens, d.topk],
        &inp.topk_weights,
    ))?;
    let mut combined = alloc_poisoned(b, DType::BF16, &[d.tokens, d.hidden])?;
    ops::low_latency_combine(
        b,
        comm,
        LowLatencyCombine {
            x: &y,
            topk_idx: &idx,
            topk_weights: &w,
            handle: &handle,
            out: &mut combined,
        },
    )?;
    o.insert(key(rank, "combine.out"), dl(b, &combined)?);
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims {
            world: 4,
            experts: 16,
            tokens: 12,
            hidden: 256,
            topk: 4,
            max_tokens: 16,
            none: 5,
        }
    }

    #[test]
    fn routing_inputs_are_valid() {
        let d = dims();
        for r in 0..d.world {
            let inp = rank_input(&d, 1, r);
            assert_eq!(inp.topk_idx.len(), d.tokens * d.topk);
            for t in 0..d.tokens {
                let row = &inp.topk_idx[t * d.topk..(t + 1) * d.topk];
                let mut live: Vec<i64> = row.iter().copied().filter(|&e| e >= 0).collect();
                live.sort_unstable();
                let n = live.len();
                live.dedup();
                assert_eq!(live.len(), n, "duplicate expert in {row:?}");
                assert!(live.iter().all(|&e| (e as usize) < d.experts));
            }
            assert!(inp.topk_idx[(d.tokens - 1) * d.topk..]
                .iter()
                .all(|&e| e == -1));
        }
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        let d = dims();
        let inp = rank_input(&d, 2, 0);
        let (q, s) = quantize_rows(&inp.x, d.hidden);
        let back = dequant(&q, Some(&s));
        for (a, b) in back.iter().zip(&inp.x) {
            // e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4.
            assert!((a - b).abs() <= b.abs() * 0.07 + 1e-3, "{a} vs {b}");
        }
    }
}
