//! One rank of a catalogue `ep` case, on any transport (`--comm mpi`).
//!
//! The per-rank steps below are those of `cases/ep.rs` (which runs every
//! rank of a case on in-process threads and keeps its per-rank functions
//! private): the same inputs from the seed, the same ops, the same outputs
//! `r{rank}.{name}`. Rank 0 merges the ranks' outputs and judges them with
//! the case's own judge against `cpu-ref` on in-process ranks, so a
//! difference between this copy and `cases/ep.rs` fails the run.
//! (To be replaced by a `cases::ep::run_rank` when that module exposes one.)

use crate::cases::P;
use crate::opspec::Outputs;
use crate::rng::Rng;
use crate::types::CaseSpec;
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::formats;
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};

/// The suffix of the key tensors of low-latency outputs (`cases/ep/keyed.rs`).
const KEYS: &str = ".keys";

/// Runs rank `comm.rank()` of the `ep` case `spec` on `b` over `comm`.
pub fn run_rank(
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
    let x = crate::cases::gen::normals(&mut rng, d.tokens * d.hidden, 1.0);
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

fn dl(b: &dyn Backend, t: &Tensor) -> Result<HostTensor> {
    b.download(t)
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
    let recv_x = dl(b, &out.recv_x)?;
    let recv_s = out.recv_scales.as_ref().map(|s| dl(b, s)).transpose()?;
    let mut o = Outputs::new();
    let src: Vec<i64> = out
        .handle
        .recv_src
        .iter()
        .flat_map(|&(r, t)| [r as i64, t as i64])
        .collect();
    o.insert(
        key(rank, "recv_src"),
        HostTensor::from_i64(&[out.handle.recv_src.len(), 2], &src),
    );
    let counts: Vec<i64> = out
        .num_recv_tokens_per_expert
        .iter()
        .map(|&c| c as i64)
        .collect();
    o.insert(
        key(rank, "num_recv_tokens_per_expert"),
        HostTensor::from_i64(&[counts.len()], &counts),
    );
    o.insert(key(rank, "recv_topk_idx"), dl(b, &out.recv_topk_idx)?);
    o.insert(
        key(rank, "recv_topk_weights"),
        dl(b, &out.recv_topk_weights)?,
    );
    // Identity expert: send the (dequantized) payload back.
    let y = HostTensor::from_f32(
        DType::BF16,
        recv_x.shape(),
        &dequant(&recv_x, recv_s.as_ref()),
    );
    let y = b.upload(&y)?;
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
            handle: &out.handle,
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
    let recv_x = dl(b, &out.recv_x)?;
    let recv_s = out.recv_scales.as_ref().map(|s| dl(b, s)).transpose()?;
    let mut o = keyed_slots(d, rank, &recv_x, recv_s.as_ref(), &out.handle)?;
    o.insert(key(rank, "recv_count"), dl(b, &out.recv_count)?);

    // Expert e_local scales its rows by (1 + e_local/4); slots that were
    // not filled hold NaN and must not be read by combine.
    let slots = d.max_tokens * d.world;
    let e_local = d.experts / d.world;
    let rows = e_local * slots;
    let flat_x = recv_x.reshape(&[rows, d.hidden])?;
    let flat_s = match &recv_s {
        Some(s) => Some(s.clone().reshape(&[rows, d.hidden / 128])?),
        None => None,
    };
    let deq = dequant(&flat_x, flat_s.as_ref());
    let mut y = vec![f32::NAN; deq.len()];
    for (e, list) in out.handle.recv_src.iter().enumerate() {
        let f = 1.0 + e as f32 / 4.0;
        for j in 0..list.len().min(slots) {
            let row = (e * slots + j) * d.hidden;
            for c in 0..d.hidden {
                y[row + c] = deq[row + c] * f;
            }
        }
    }
    let y = b.upload(&HostTensor::from_f32(
        DType::BF16,
        &[e_local, slots, d.hidden],
        &y,
    ))?;
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
            handle: &out.handle,
            out: &mut combined,
        },
    )?;
    o.insert(key(rank, "combine.out"), dl(b, &combined)?);
    Ok(o)
}
