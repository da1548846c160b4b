//! The expert-parallel ops of `deepport op` (`dispatch`, `combine`,
//! `low-latency-dispatch`, `low-latency-combine`): each runs on `--ranks N`
//! in-process ranks ([`deepport_core::comm::run_ranks`]), every rank on the
//! same backend. Tensors are per rank, named `r{rank}.{name}`
//! ([`super::rank_name`]), in the input file and in the output file.
//!
//! A combine undoes a dispatch and needs its handle (who sent which row
//! where). `deepport op` rebuilds it by running the dispatch again on the
//! routing (`topk_idx`) with a zero payload, so `x`'s rows must be in the
//! receive order (`combine`) or the slots (`low-latency-combine`) that the
//! same dispatch on the same backend gives.
//!
//! Every rank's inputs are validated before any rank starts (an error names
//! the rank); a failure on a rank names that rank, not the peers that
//! stopped because of it.

use super::{dim, down, out, rank_name, up, CliResult, Inputs, Outputs, Params};
use crate::error::CliError;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::run_ranks;
use deepport_core::ops::{self, *};
use deepport_core::{Communicator, DType, Error, HostTensor};

/// A usage error naming the rank.
fn on_rank(rank: usize, e: CliError) -> CliError {
    match e {
        CliError::Usage(m) => CliError::Usage(format!("rank {rank}: {m}")),
        CliError::Invalid(e) => CliError::Usage(format!("rank {rank}: invalid input: {e}")),
        CliError::Failed(e) => CliError::Failed(Error::Other(format!("rank {rank}: {e}"))),
    }
}

/// Checks the rank count and the expert count against it.
fn check_group(op: &str, ranks: usize, num_experts: usize) -> CliResult<()> {
    if ranks == 0 {
        return Err(CliError::usage(format!("{op}: --ranks must be at least 1")));
    }
    if num_experts < ranks || !num_experts.is_multiple_of(ranks) {
        return Err(CliError::usage(format!(
            "{op}: num_experts = {num_experts} must be a positive multiple of the rank count {ranks}"
        )));
    }
    Ok(())
}

/// Validates the arguments (an [`CliError::Invalid`]) and asks the backend
/// whether it supports their dtypes.
fn precheck<A: OpArgs>(b: &dyn Backend, op: A) -> CliResult<()> {
    let c = op.check().map_err(CliError::Invalid)?;
    if let deepport_core::Support::NotSupported(reason) = b.supports(A::KIND, &c.args().dtypes()) {
        return Err(CliError::Failed(Error::not_supported(
            b.name(),
            A::KIND.name(),
            reason,
        )));
    }
    Ok(())
}

/// Runs `f` on every rank and merges the per-rank outputs. When ranks
/// fail, the error reported is the first that is not a peer's
/// communicator error (the cause, not its echo), naming its rank.
fn on_ranks<T: Sync>(
    b: &dyn Backend,
    per_rank: &[T],
    f: impl Fn(&dyn Backend, &dyn Communicator, usize, &T) -> CliResult<Outputs> + Sync,
) -> CliResult<Outputs> {
    let results = run_ranks(per_rank.len(), |rank, comm| {
        Ok(f(b, comm, rank, &per_rank[rank]))
    })
    .map_err(CliError::Failed)?;
    let mut first_err: Option<(usize, CliError)> = None;
    let mut merged = Outputs::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) => merged.extend(o),
            Err(e) => {
                let echo = matches!(e.core(), Some(Error::Comm { .. }));
                let keep = match &first_err {
                    None => true,
                    Some((_, prev)) => matches!(prev.core(), Some(Error::Comm { .. })) && !echo,
                };
                if keep {
                    first_err = Some((rank, e));
                }
            }
        }
    }
    match first_err {
        Some((rank, e)) => Err(on_rank(rank, e)),
        None => Ok(merged),
    }
}

/// A zero payload of `[rows, hidden]` for a dispatch that only rebuilds a
/// handle.
fn zeros(b: &dyn Backend, dtype: DType, rows: usize, hidden: usize) -> CliResult<Tensor> {
    up(b, &HostTensor::zeros(dtype, &[rows, hidden]))
}

fn failed(e: Error) -> CliError {
    CliError::Failed(e)
}

// ---- dispatch ----------------------------------------------------------------

/// One rank's uploaded dispatch inputs.
struct DispatchIn {
    x: Tensor,
    x_scales: Option<Tensor>,
    topk_idx: Tensor,
    topk_weights: Tensor,
}

fn dispatch_in(b: &dyn Backend, i: &Inputs, rank: usize) -> CliResult<DispatchIn> {
    let n = |name: &str| rank_name(rank, name);
    let x_scales = match i.opt(&n("x_scales")) {
        Some(_) => Some(up(b, &i.as_f32(&n("x_scales"))?)?),
        None => None,
    };
    Ok(DispatchIn {
        x: up(b, i.get(&n("x"))?)?,
        x_scales,
        topk_idx: up(b, i.get(&n("topk_idx"))?)?,
        topk_weights: up(b, &i.as_f32(&n("topk_weights"))?)?,
    })
}

fn dispatch_args(d: &DispatchIn, num_experts: usize, expert_alignment: usize) -> Dispatch<'_> {
    Dispatch {
        x: &d.x,
        x_scales: d.x_scales.as_ref(),
        topk_idx: &d.topk_idx,
        topk_weights: &d.topk_weights,
        num_experts,
        expert_alignment,
    }
}

/// The handle's `(source rank, source token)` list as an `[n, 2]` i64 tensor.
fn recv_src_tensor(h: &DispatchHandle) -> HostTensor {
    let v: Vec<i64> = h
        .recv_src
        .iter()
        .flat_map(|&(r, t)| [r as i64, t as i64])
        .collect();
    HostTensor::from_i64(&[h.recv_src.len(), 2], &v)
}

pub(super) fn run_dispatch(
    b: &dyn Backend,
    i: &Inputs,
    p: &Params,
    ranks: usize,
) -> CliResult<Outputs> {
    let (experts, align) = (p.int("num_experts")?, p.int("expert_alignment")?);
    check_group("dispatch", ranks, experts)?;
    let per_rank = (0..ranks)
        .map(|r| {
            let d = dispatch_in(b, i, r).map_err(|e| on_rank(r, e))?;
            precheck(b, dispatch_args(&d, experts, align)).map_err(|e| on_rank(r, e))?;
            Ok(d)
        })
        .collect::<CliResult<Vec<_>>>()?;
    on_ranks(b, &per_rank, |b, comm, rank, d| {
        let o = ops::dispatch(b, comm, dispatch_args(d, experts, align)).map_err(failed)?;
        let counts: Vec<i64> = o
            .num_recv_tokens_per_expert
            .iter()
            .map(|&c| c as i64)
            .collect();
        let mut out = Outputs::from([
            (rank_name(rank, "recv_x"), down(b, &o.recv_x)?),
            (rank_name(rank, "recv_src"), recv_src_tensor(&o.handle)),
            (
                rank_name(rank, "num_recv_tokens_per_expert"),
                HostTensor::from_i64(&[counts.len()], &counts),
            ),
            (rank_name(rank, "recv_topk_idx"), down(b, &o.recv_topk_idx)?),
            (
                rank_name(rank, "recv_topk_weights"),
                down(b, &o.recv_topk_weights)?,
            ),
        ]);
        if let Some(s) = &o.recv_scales {
            out.insert(rank_name(rank, "recv_scales"), down(b, s)?);
        }
        Ok(out)
    })
}

// ---- combine -----------------------------------------------------------------

/// One rank's uploaded combine input (the rows to combine, `[num_recv,
/// hidden]`).
struct CombineIn {
    x: Tensor,
    hidden: usize,
}

pub(super) fn run_combine(
    b: &dyn Backend,
    i: &Inputs,
    p: &Params,
    ranks: usize,
) -> CliResult<Outputs> {
    let experts = p.int("num_experts")?;
    check_group("combine", ranks, experts)?;
    let per_rank = (0..ranks)
        .map(|r| {
            let n = |name: &str| rank_name(r, name);
            let xh = i.get(&n("x"))?;
            if xh.shape().len() != 2 {
                return Err(on_rank(
                    r,
                    CliError::usage(format!(
                        "combine: tensor `{}` is {:?}, expected [num_recv, hidden]",
                        n("x"),
                        xh.shape()
                    )),
                ));
            }
            let ih = i.get(&n("topk_idx"))?;
            let (tokens, topk, hidden) = (dim(ih, 0), dim(ih, 1), dim(xh, 1));
            // The handle's dispatch: a zero f32 payload, zero weights.
            let d = DispatchIn {
                x: zeros(b, DType::F32, tokens, hidden.max(1))?,
                x_scales: None,
                topk_idx: up(b, ih)?,
                topk_weights: zeros(b, DType::F32, tokens, topk)?,
            };
            precheck(b, dispatch_args(&d, experts, 1)).map_err(|e| on_rank(r, e))?;
            let c = CombineIn {
                x: up(b, xh)?,
                hidden,
            };
            Ok((c, d))
        })
        .collect::<CliResult<Vec<_>>>()?;
    on_ranks(b, &per_rank, |b, comm, rank, (c, d)| {
        let h = ops::dispatch(b, comm, dispatch_args(d, experts, 1)).map_err(failed)?;
        let mut o = out(b, c.x.dtype(), &[h.handle.num_tokens, c.hidden])?;
        ops::combine(
            b,
            comm,
            Combine {
                x: &c.x,
                handle: &h.handle,
                out: &mut o,
            },
        )
        .map_err(classify)?;
        Ok(Outputs::from([(rank_name(rank, "out"), down(b, &o)?)]))
    })
}

/// Core's validation errors of a combine (shapes and dtypes that only the
/// handle can check) are the user's to fix; anything else is a failure.
fn classify(e: Error) -> CliError {
    match e {
        Error::Shape { .. } | Error::DType { .. } | Error::Invalid { .. } => CliError::Invalid(e),
        other => CliError::Failed(other),
    }
}

// ---- low-latency dispatch --------------------------------------------------------

/// One rank's uploaded low-latency dispatch inputs.
struct LowLatencyIn {
    x: Tensor,
    topk_idx: Tensor,
}

/// The parameters of a low-latency dispatch.
#[derive(Clone, Copy)]
struct LowLatencyParams {
    experts: usize,
    max_tokens: usize,
    use_fp8: bool,
    ue8m0: bool,
}

fn ll_args(d: &LowLatencyIn, p: LowLatencyParams) -> LowLatencyDispatch<'_> {
    LowLatencyDispatch {
        x: &d.x,
        topk_idx: &d.topk_idx,
        num_experts: p.experts,
        max_tokens_per_rank: p.max_tokens,
        use_fp8: p.use_fp8,
        ue8m0: p.ue8m0,
    }
}

pub(super) fn run_low_latency_dispatch(
    b: &dyn Backend,
    i: &Inputs,
    p: &Params,
    ranks: usize,
) -> CliResult<Outputs> {
    let lp = LowLatencyParams {
        experts: p.int("num_experts")?,
        max_tokens: p.int("max_tokens_per_rank")?,
        use_fp8: p.bool("use_fp8")?,
        ue8m0: p.bool("ue8m0")?,
    };
    check_group("low-latency-dispatch", ranks, lp.experts)?;
    let per_rank = (0..ranks)
        .map(|r| {
            let n = |name: &str| rank_name(r, name);
            let d = LowLatencyIn {
                x: up(b, i.get(&n("x"))?)?,
                topk_idx: up(b, i.get(&n("topk_idx"))?)?,
            };
            precheck(b, ll_args(&d, lp)).map_err(|e| on_rank(r, e))?;
            Ok(d)
        })
        .collect::<CliResult<Vec<_>>>()?;
    on_ranks(b, &per_rank, |b, comm, rank, d| {
        let o = ops::low_latency_dispatch(b, comm, ll_args(d, lp)).map_err(failed)?;
        let mut out = Outputs::from([
            (rank_name(rank, "recv_x"), down(b, &o.recv_x)?),
            (rank_name(rank, "recv_count"), down(b, &o.recv_count)?),
        ]);
        if let Some(s) = &o.recv_scales {
            out.insert(rank_name(rank, "recv_scales"), down(b, s)?);
        }
        Ok(out)
    })
}

// ---- low-latency combine -----------------------------------------------------------

/// One rank's uploaded low-latency combine inputs and the dispatch that
/// rebuilds its handle.
struct LowLatencyCombineIn {
    x: Tensor,
    topk_weights: Tensor,
    dispatch: LowLatencyIn,
    tokens: usize,
    hidden: usize,
}

pub(super) fn run_low_latency_combine(
    b: &dyn Backend,
    i: &Inputs,
    _p: &Params,
    ranks: usize,
) -> CliResult<Outputs> {
    if ranks == 0 {
        return Err(CliError::usage(
            "low-latency-combine: --ranks must be at least 1",
        ));
    }
    // The handle's sizes come from x: [E_local, max_tokens·R, hidden].
    let x0 = i.get(&rank_name(0, "x"))?;
    let shape = x0.shape().to_vec();
    if shape.len() != 3 || !shape[1].is_multiple_of(ranks) || shape[0] == 0 {
        return Err(CliError::usage(format!(
            "low-latency-combine: tensor `{}` is {shape:?}, expected [E_local, max_tokens·R, hidden] \
             with E_local ≥ 1 and max_tokens·R a multiple of the rank count {ranks}",
            rank_name(0, "x")
        )));
    }
    let lp = LowLatencyParams {
        experts: shape[0] * ranks,
        max_tokens: shape[1] / ranks,
        use_fp8: false,
        ue8m0: false,
    };
    let per_rank = (0..ranks)
        .map(|r| {
            let n = |name: &str| rank_name(r, name);
            let (xh, ih) = (i.get(&n("x"))?, i.get(&n("topk_idx"))?);
            if xh.shape() != shape.as_slice() {
                return Err(on_rank(
                    r,
                    CliError::usage(format!(
                        "low-latency-combine: tensor `{}` is {:?}, but `{}` is {shape:?}; every rank's x has one shape",
                        n("x"),
                        xh.shape(),
                        rank_name(0, "x")
                    )),
                ));
            }
            let tokens = dim(ih, 0);
            let hidden = shape[2];
            let payload = if xh.dtype() == DType::F32 {
                DType::F32
            } else {
                DType::BF16
            };
            let dispatch = LowLatencyIn {
                x: zeros(b, payload, tokens, hidden)?,
                topk_idx: up(b, ih)?,
            };
            precheck(b, ll_args(&dispatch, lp)).map_err(|e| on_rank(r, e))?;
            Ok(LowLatencyCombineIn {
                x: up(b, xh)?,
                topk_weights: up(b, &i.as_f32(&n("topk_weights"))?)?,
                dispatch,
                tokens,
                hidden,
            })
        })
        .collect::<CliResult<Vec<_>>>()?;
    on_ranks(b, &per_rank, |b, comm, rank, c| {
        let h = ops::low_latency_dispatch(b, comm, ll_args(&c.dispatch, lp)).map_err(failed)?;
        let mut o = out(b, c.x.dtype(), &[c.tokens, c.hidden])?;
        ops::low_latency_combine(
            b,
            comm,
            LowLatencyCombine {
                x: &c.x,
                topk_idx: &c.dispatch.topk_idx,
                topk_weights: &c.topk_weights,
                handle: &h.handle,
                out: &mut o,
            },
        )
        .map_err(classify)?;
        Ok(Outputs::from([(rank_name(rank, "out"), down(b, &o)?)]))
    })
}
