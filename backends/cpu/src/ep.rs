//! Expert-parallel reference ops (DeepEP V1 semantics, SPEC.md §7).
//!
//! Every op is written on top of one [`Communicator::all_to_all_v`] of byte
//! messages. Each message starts with a status byte: a rank whose local
//! checks fail (an out-of-range expert id, a foreign handle) still takes part
//! in the exchange and sends a failure notice, so its peers fail at once with
//! [`Error::Comm`] naming it instead of waiting for the communicator's
//! timeout; the failing rank itself returns its precise error.
//!
//! Messages also carry the shape parameters (dtype, hidden, k, experts, …)
//! and a receiver rejects a peer whose parameters differ from its own with
//! [`Error::Invalid`]. Received bytes are parsed with bounds checks: a
//! malformed message is an error, never a panic.
//!
//! Duplicate expert ids within one token's top-k: the layout and normal
//! dispatch counts count a token once per distinct expert; the low-latency
//! path sends one copy per (token, k) entry and pairs the copies back up in
//! order on combine.

use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::Communicator;
use deepport_core::formats::{f32_to_e4m3, round_bf16, ue8m0_round_up};
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use std::collections::{HashMap, VecDeque};

use crate::util::{host, put_f32, put_i64};

const OK: u8 = 0;
const FAILED: u8 = 1;

// ---- byte messages --------------------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Self {
        Writer(Vec::new())
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    me: usize,
    src: usize,
    op: &'static str,
}

impl<'a> Reader<'a> {
    fn new(op: &'static str, me: usize, src: usize, buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            me,
            src,
            op,
        }
    }
    fn malformed(&self, what: &str) -> Error {
        Error::Comm {
            rank: self.me,
            msg: format!(
                "{}: malformed message from rank {} ({what} at byte {} of {})",
                self.op,
                self.src,
                self.pos,
                self.buf.len()
            ),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.malformed("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn usize(&mut self) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| self.malformed("count too large"))
    }
    fn i64(&mut self) -> Result<i64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(a))
    }
    fn f32(&mut self) -> Result<f32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(f32::from_le_bytes(a))
    }
    /// A row count whose rows take at least `row_bytes` each: rejects counts
    /// the remaining message cannot hold (so no huge allocation on garbage).
    fn count(&mut self, row_bytes: usize) -> Result<usize> {
        let n = self.usize()?;
        let left = self.buf.len() - self.pos;
        if n.checked_mul(row_bytes.max(1)).is_none_or(|b| b > left) {
            return Err(self.malformed("row count exceeds message"));
        }
        Ok(n)
    }
    fn finish(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}

/// Runs the collective exchange. `local` is this rank's outgoing messages or
/// the error that stopped it from building them; either way the rank takes
/// part, so peers never wait on it. Returns the messages received (status
/// byte stripped), or the local error, or an error naming a failed peer.
fn exchange(
    comm: &dyn Communicator,
    op: &'static str,
    local: Result<Vec<Vec<u8>>>,
) -> Result<Vec<Vec<u8>>> {
    let world = comm.world_size();
    let me = comm.rank();
    let send = match &local {
        Ok(bufs) => bufs
            .iter()
            .map(|b| {
                let mut v = Vec::with_capacity(b.len() + 1);
                v.push(OK);
                v.extend_from_slice(b);
                v
            })
            .collect(),
        Err(e) => {
            let mut v = vec![FAILED];
            v.extend_from_slice(e.to_string().as_bytes());
            vec![v; world]
        }
    };
    let recv = comm.all_to_all_v(send);
    // A local failure wins over anything the exchange reports.
    local?;
    let recv = recv?;
    if recv.len() != world {
        return Err(Error::Comm {
            rank: me,
            msg: format!(
                "{op}: all_to_all_v returned {} buffers for {world} ranks",
                recv.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(world);
    for (src, mut buf) in recv.into_iter().enumerate() {
        match buf.first() {
            Some(&OK) => {
                buf.remove(0);
                out.push(buf);
            }
            Some(&FAILED) => {
                return Err(Error::Comm {
                    rank: me,
                    msg: format!(
                        "{op}: rank {src} failed: {}",
                        String::from_utf8_lossy(&buf[1..])
                    ),
                })
            }
            _ => {
                return Err(Error::Comm {
                    rank: me,
                    msg: format!("{op}: rank {src} sent no status byte"),
                })
            }
        }
    }
    Ok(out)
}

fn dtype_code(d: DType) -> u8 {
    DType::ALL.iter().position(|&x| x == d).unwrap_or(0xff) as u8
}

/// Fails unless a peer's parameter equals this rank's.
fn same<T: PartialEq + std::fmt::Debug>(
    op: &'static str,
    arg: &'static str,
    what: &str,
    src: usize,
    theirs: T,
    mine: T,
) -> Result<()> {
    if theirs == mine {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!(
                "rank {src} has {what} = {theirs:?}, this rank has {mine:?}; all ranks must agree"
            ),
        ))
    }
}

/// Experts per rank, or `Error::Invalid` unless `E` is a positive multiple of `R`.
fn experts_per_rank(op: &'static str, num_experts: usize, world: usize) -> Result<usize> {
    if world == 0 || num_experts < world || !num_experts.is_multiple_of(world) {
        return Err(Error::invalid(
            op,
            "num_experts",
            format!("must be a positive multiple of the world size {world}, got {num_experts}"),
        ));
    }
    Ok(num_experts / world)
}

/// Reads an index tensor and checks every entry lies in `[0, E)` or is −1.
fn read_topk(op: &'static str, t: &Tensor, num_experts: usize) -> Result<Vec<i64>> {
    let h = host(t)?;
    check_range(op, "topk_idx", &h, 0, num_experts as i64, Some(-1))?;
    Ok(h.to_i64_vec())
}

/// Rounds an f64 once to `dtype` (f32 or bf16): round-to-odd to f32 keeps
/// enough bits that the following nearest-even bf16 rounding is exact.
fn round_once(dtype: DType, v: f64) -> f32 {
    if dtype == DType::F32 || v.is_nan() {
        return v as f32;
    }
    let t = v as f32;
    let odd = if t as f64 == v {
        t
    } else {
        let mut b = t.to_bits();
        if (t as f64).abs() > v.abs() {
            b -= 1; // t rounded away from zero: step back toward zero
        }
        f32::from_bits(b | 1)
    };
    round_bf16(odd)
}

// ---- get_dispatch_layout ---------------------------------------------------

pub(crate) fn get_dispatch_layout(op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, k, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    let epr = experts_per_rank(OP, e, world)?;
    let topk = read_topk(OP, a.topk_idx, e)?;
    let mut per_rank = vec![0i64; world];
    let mut per_expert = vec![0i64; e];
    let mut in_rank = vec![0i64; n * world];
    for t in 0..n {
        let mut seen = vec![false; e];
        for &x in &topk[t * k..(t + 1) * k] {
            if x >= 0 {
                seen[x as usize] = true;
            }
        }
        for (ex, _) in seen.iter().enumerate().filter(|(_, &s)| s) {
            per_expert[ex] += 1;
            in_rank[t * world + ex / epr] = 1;
        }
        for r in 0..world {
            per_rank[r] += in_rank[t * world + r];
        }
    }
    put_i64(a.num_tokens_per_rank, &per_rank)?;
    put_i64(a.num_tokens_per_expert, &per_expert)?;
    put_i64(a.is_token_in_rank, &in_rank)
}

// ---- normal dispatch / combine ----------------------------------------------

struct DispatchLocal {
    send: Vec<Vec<u8>>,
    send_plan: Vec<Vec<usize>>,
    epr: usize,
}

fn dispatch_local(
    comm: &dyn Communicator,
    a: &Dispatch<'_>,
    d: &DispatchDims,
) -> Result<DispatchLocal> {
    const OP: &str = "dispatch";
    let world = comm.world_size();
    let (n, hidden, k, e) = (d.tokens, d.hidden, d.topk, d.num_experts);
    let epr = experts_per_rank(OP, e, world)?;
    let topk = read_topk(OP, a.topk_idx, e)?;
    let weights = host(a.topk_weights)?.to_f32_vec();
    let xh = host(a.x)?;
    let row = hidden * a.x.dtype().size();
    let scales = a.x_scales.map(host).transpose()?;
    let srow = hidden / QBLOCK * 4;

    let mut send_plan = vec![Vec::new(); world];
    for t in 0..n {
        let mut to = vec![false; world];
        for &x in &topk[t * k..(t + 1) * k] {
            if x >= 0 {
                to[x as usize / epr] = true;
            }
        }
        for (r, _) in to.iter().enumerate().filter(|(_, &b)| b) {
            send_plan[r].push(t);
        }
    }
    let send = send_plan
        .iter()
        .map(|tokens| {
            let mut w = Writer::new();
            w.u8(dtype_code(a.x.dtype()));
            w.usize(hidden);
            w.usize(k);
            w.u8(scales.is_some() as u8);
            w.usize(e);
            w.usize(tokens.len());
            for &t in tokens {
                w.usize(t);
                w.bytes(&xh.bytes()[t * row..(t + 1) * row]);
                if let Some(s) = &scales {
                    w.bytes(&s.bytes()[t * srow..(t + 1) * srow]);
                }
                for j in 0..k {
                    w.i64(topk[t * k + j]);
                }
                for j in 0..k {
                    w.bytes(&weights[t * k + j].to_le_bytes());
                }
            }
            w.0
        })
        .collect();
    Ok(DispatchLocal {
        send,
        send_plan,
        epr,
    })
}

pub(crate) fn dispatch(
    backend: &dyn Backend,
    comm: &dyn Communicator,
    op: &Checked<Dispatch<'_>>,
) -> Result<DispatchOutput> {
    const OP: &str = "dispatch";
    let (a, d) = (op.args(), op.dims());
    let me = comm.rank();
    let (hidden, k) = (d.hidden, d.topk);
    let dtype = a.x.dtype();
    let row = hidden * dtype.size();
    let has_scales = a.x_scales.is_some();
    let srow = if has_scales { hidden / QBLOCK * 4 } else { 0 };

    let local = dispatch_local(comm, a, d);
    let (send, plan) = match local {
        Ok(l) => (Ok(l.send), Some((l.send_plan, l.epr))),
        Err(e) => (Err(e), None),
    };
    let recv = exchange(comm, OP, send)?;
    let Some((send_plan, epr)) = plan else {
        return Err(Error::Other(format!(
            "{OP}: internal: exchange succeeded after a local failure"
        )));
    };
    let lo = (me * epr) as i64;
    let hi = lo + epr as i64;

    let mut recv_src = Vec::new();
    let mut x_bytes = Vec::new();
    let mut s_bytes = Vec::new();
    let mut r_idx: Vec<i64> = Vec::new();
    let mut r_w: Vec<f32> = Vec::new();
    let mut counts = vec![0usize; epr];
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        same(OP, "x", "x dtype", src, rd.u8()?, dtype_code(dtype))?;
        same(OP, "x", "hidden", src, rd.usize()?, hidden)?;
        same(OP, "topk_idx", "top-k", src, rd.usize()?, k)?;
        same(OP, "x_scales", "FP8 scales", src, rd.u8()? != 0, has_scales)?;
        same(
            OP,
            "num_experts",
            "num_experts",
            src,
            rd.usize()?,
            d.num_experts,
        )?;
        let m = rd.count(8 + row + srow + 12 * k)?;
        for _ in 0..m {
            let t = rd.usize()?;
            recv_src.push((src, t));
            x_bytes.extend_from_slice(rd.take(row)?);
            s_bytes.extend_from_slice(rd.take(srow)?);
            let ids = (0..k).map(|_| rd.i64()).collect::<Result<Vec<_>>>()?;
            let ws = (0..k).map(|_| rd.f32()).collect::<Result<Vec<_>>>()?;
            let mut hit = vec![false; epr];
            for (&g, &w) in ids.iter().zip(&ws) {
                if g >= lo && g < hi {
                    let l = (g - lo) as usize;
                    hit[l] = true;
                    r_idx.push(l as i64);
                    r_w.push(w);
                } else {
                    r_idx.push(-1);
                    r_w.push(0.0);
                }
            }
            for (c, h) in counts.iter_mut().zip(&hit) {
                *c += *h as usize;
            }
        }
        rd.finish()?;
    }
    let m = recv_src.len();
    let align = a.expert_alignment.max(1);
    let num_recv_tokens_per_expert = counts.iter().map(|c| c.div_ceil(align) * align).collect();
    let recv_x = backend.upload(&HostTensor::from_bytes(dtype, &[m, hidden], x_bytes)?)?;
    let recv_scales = if has_scales {
        Some(backend.upload(&HostTensor::from_bytes(
            DType::F32,
            &[m, hidden / QBLOCK],
            s_bytes,
        )?)?)
    } else {
        None
    };
    let recv_topk_idx = backend.upload(&HostTensor::from_i64(&[m, k], &r_idx))?;
    let recv_topk_weights = backend.upload(&HostTensor::from_f32(DType::F32, &[m, k], &r_w))?;
    Ok(DispatchOutput {
        recv_x,
        recv_scales,
        recv_topk_idx,
        recv_topk_weights,
        num_recv_tokens_per_expert,
        handle: DispatchHandle {
            rank: me,
            world_size: comm.world_size(),
            num_tokens: d.tokens,
            recv_src,
            send_plan,
        },
    })
}

/// Checks that a handle was made by a dispatch on this communicator.
fn check_handle(
    op: &'static str,
    comm: &dyn Communicator,
    rank: usize,
    world: usize,
) -> Result<()> {
    if rank != comm.rank() || world != comm.world_size() {
        return Err(Error::invalid(
            op,
            "handle",
            format!(
                "belongs to rank {rank} of {world}, but this communicator is rank {} of {}",
                comm.rank(),
                comm.world_size()
            ),
        ));
    }
    Ok(())
}

fn combine_local(comm: &dyn Communicator, a: &Combine<'_>, hidden: usize) -> Result<Vec<Vec<u8>>> {
    const OP: &str = "combine";
    let h = a.handle;
    check_handle(OP, comm, h.rank, h.world_size)?;
    if h.send_plan.len() != h.world_size {
        return Err(Error::invalid(
            OP,
            "handle",
            format!(
                "send plan has {} destinations for {} ranks",
                h.send_plan.len(),
                h.world_size
            ),
        ));
    }
    let x = host(a.x)?.to_f32_vec();
    let mut ws: Vec<Writer> = (0..h.world_size).map(|_| Writer::new()).collect();
    let mut rows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); h.world_size];
    for (i, &(src, t)) in h.recv_src.iter().enumerate() {
        let dst = rows.get_mut(src).ok_or_else(|| {
            Error::invalid(
                OP,
                "handle",
                format!(
                    "received row {i} names source rank {src} of {}",
                    h.world_size
                ),
            )
        })?;
        dst.push((i, t));
    }
    for (w, rows) in ws.iter_mut().zip(&rows) {
        w.usize(hidden);
        w.usize(rows.len());
        for &(i, t) in rows {
            w.usize(t);
            for v in &x[i * hidden..(i + 1) * hidden] {
                w.bytes(&v.to_le_bytes());
            }
        }
    }
    Ok(ws.into_iter().map(|w| w.0).collect())
}

pub(crate) fn combine(comm: &dyn Communicator, op: &mut Checked<Combine<'_>>) -> Result<()> {
    const OP: &str = "combine";
    let (a, d) = op.parts();
    let (n, hidden) = (d.tokens, d.hidden);
    let me = comm.rank();
    let send = combine_local(comm, a, hidden);
    let recv = exchange(comm, OP, send)?;
    let mut acc = vec![0f64; n * hidden];
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        same(OP, "x", "hidden", src, rd.usize()?, hidden)?;
        let m = rd.count(8 + 4 * hidden)?;
        let plan = &a.handle.send_plan[src];
        if m != plan.len() {
            return Err(Error::invalid(
                OP,
                "handle",
                format!(
                    "rank {src} returned {m} rows, but this rank sent it {} (handles of different dispatches?)",
                    plan.len()
                ),
            ));
        }
        for &want in plan {
            let t = rd.usize()?;
            if t != want || t >= n {
                return Err(Error::invalid(
                    OP,
                    "handle",
                    format!(
                        "rank {src} returned token {t} where this rank sent token {want} (handles of different dispatches?)"
                    ),
                ));
            }
            for v in &mut acc[t * hidden..(t + 1) * hidden] {
                *v += rd.f32()? as f64;
            }
        }
        rd.finish()?;
    }
    let dt = a.out.dtype();
    let out: Vec<f32> = acc.iter().map(|&v| round_once(dt, v)).collect();
    put_f32(a.out, &out)
}

// ---- low-latency dispatch / combine ------------------------------------------

/// act_quant (SPEC.md §2) of one row: e4m3 codes and per-128 f32 scales.
fn quant_row(x: &[f32], ue8m0: bool) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut s = Vec::with_capacity(x.len() / QBLOCK);
    for g in x.chunks(QBLOCK) {
        let amax = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
        let mut sc = amax / 448.0;
        if ue8m0 {
            sc = ue8m0_round_up(sc);
        }
        q.extend(g.iter().map(|&v| f32_to_e4m3(v / sc)));
        s.push(sc);
    }
    (q, s)
}

fn ll_dispatch_local(
    comm: &dyn Communicator,
    a: &LowLatencyDispatch<'_>,
    d: &LowLatencyDims,
) -> Result<Vec<Vec<u8>>> {
    const OP: &str = "low_latency_dispatch";
    let world = comm.world_size();
    let (n, hidden, k, e) = (d.tokens, d.hidden, d.topk, d.num_experts);
    let epr = experts_per_rank(OP, e, world)?;
    let topk = read_topk(OP, a.topk_idx, e)?;
    let xh = host(a.x)?;
    let row = hidden * a.x.dtype().size();
    let x = if a.use_fp8 {
        xh.to_f32_vec()
    } else {
        Vec::new()
    };
    let mut per_dst: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
    for t in 0..n {
        for &g in &topk[t * k..(t + 1) * k] {
            if g >= 0 {
                per_dst[g as usize / epr].push((t, g as usize));
            }
        }
    }
    let mut quant: Vec<Option<(Vec<u8>, Vec<f32>)>> = vec![None; n];
    let mut send = Vec::with_capacity(world);
    for entries in &per_dst {
        let mut w = Writer::new();
        w.usize(hidden);
        w.usize(e);
        w.usize(a.max_tokens_per_rank);
        w.u8(a.use_fp8 as u8);
        w.u8(dtype_code(a.x.dtype()));
        w.usize(entries.len());
        for &(t, g) in entries {
            w.usize(t);
            w.usize(g);
            if a.use_fp8 {
                let (q, s) = quant[t]
                    .get_or_insert_with(|| quant_row(&x[t * hidden..(t + 1) * hidden], a.ue8m0));
                w.bytes(q);
                for v in s.iter() {
                    w.bytes(&v.to_le_bytes());
                }
            } else {
                w.bytes(&xh.bytes()[t * row..(t + 1) * row]);
            }
        }
        send.push(w.0);
    }
    Ok(send)
}

pub(crate) fn low_latency_dispatch(
    backend: &dyn Backend,
    comm: &dyn Communicator,
    op: &Checked<LowLatencyDispatch<'_>>,
) -> Result<LowLatencyDispatchOutput> {
    const OP: &str = "low_latency_dispatch";
    let (a, d) = (op.args(), op.dims());
    let me = comm.rank();
    let world = comm.world_size();
    let hidden = d.hidden;
    let send = ll_dispatch_local(comm, a, d);
    let recv = exchange(comm, OP, send)?;
    // The local step succeeded, so the expert split is valid.
    let epr = experts_per_rank(OP, d.num_experts, world)?;
    let cap = a.max_tokens_per_rank * world;
    let (esize, groups) = if a.use_fp8 {
        (1, hidden / QBLOCK)
    } else {
        (a.x.dtype().size(), 0)
    };
    let row = hidden * esize;
    let mut x_bytes = vec![0u8; epr * cap * row];
    let mut scales = vec![0f32; epr * cap * groups];
    let mut recv_src: Vec<Vec<(usize, usize)>> = vec![Vec::new(); epr];
    let lo = me * epr;
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        same(OP, "x", "hidden", src, rd.usize()?, hidden)?;
        same(
            OP,
            "num_experts",
            "num_experts",
            src,
            rd.usize()?,
            d.num_experts,
        )?;
        same(
            OP,
            "max_tokens_per_rank",
            "max_tokens_per_rank",
            src,
            rd.usize()?,
            a.max_tokens_per_rank,
        )?;
        same(OP, "use_fp8", "use_fp8", src, rd.u8()? != 0, a.use_fp8)?;
        same(OP, "x", "dtype", src, rd.u8()?, dtype_code(a.x.dtype()))?;
        let m = rd.count(16 + row + 4 * groups)?;
        for _ in 0..m {
            let t = rd.usize()?;
            let g = rd.usize()?;
            if g < lo || g >= lo + epr {
                return Err(rd.malformed("expert not on this rank"));
            }
            let l = g - lo;
            let slot = recv_src[l].len();
            if slot >= cap {
                return Err(Error::invalid(
                    OP,
                    "topk_idx",
                    format!(
                        "local expert {l} (global {g}) receives more than max_tokens_per_rank·R = {cap} tokens (an expert repeated in a token's top-k?)"
                    ),
                ));
            }
            recv_src[l].push((src, t));
            let at = l * cap + slot;
            x_bytes[at * row..(at + 1) * row].copy_from_slice(rd.take(row)?);
            for s in &mut scales[at * groups..(at + 1) * groups] {
                *s = rd.f32()?;
            }
        }
        rd.finish()?;
    }
    let dtype = if a.use_fp8 {
        DType::F8E4M3
    } else {
        a.x.dtype()
    };
    let recv_x = backend.upload(&HostTensor::from_bytes(
        dtype,
        &[epr, cap, hidden],
        x_bytes,
    )?)?;
    let recv_scales = if a.use_fp8 {
        Some(backend.upload(&HostTensor::from_f32(
            DType::F32,
            &[epr, cap, groups],
            &scales,
        ))?)
    } else {
        None
    };
    let counts: Vec<i32> = recv_src.iter().map(|v| v.len() as i32).collect();
    let recv_count = backend.upload(&HostTensor::from_i32(&[epr], &counts))?;
    Ok(LowLatencyDispatchOutput {
        recv_x,
        recv_scales,
        recv_count,
        handle: LowLatencyHandle {
            rank: me,
            world_size: world,
            num_experts: d.num_experts,
            num_tokens: d.tokens,
            max_tokens_per_rank: a.max_tokens_per_rank,
            hidden,
            recv_src,
        },
    })
}

struct LlCombineLocal {
    send: Vec<Vec<u8>>,
    topk: Vec<i64>,
}

fn ll_combine_local(comm: &dyn Communicator, a: &LowLatencyCombine<'_>) -> Result<LlCombineLocal> {
    const OP: &str = "low_latency_combine";
    let h = a.handle;
    check_handle(OP, comm, h.rank, h.world_size)?;
    let epr = experts_per_rank(OP, h.num_experts, h.world_size)?;
    let cap = h.max_tokens_per_rank * h.world_size;
    if h.recv_src.len() != epr || h.recv_src.iter().any(|v| v.len() > cap) {
        return Err(Error::invalid(
            OP,
            "handle",
            format!("its slot lists do not fit [{epr} experts, {cap} slots]"),
        ));
    }
    let topk = read_topk(OP, a.topk_idx, h.num_experts)?;
    let xh = host(a.x)?;
    let row = h.hidden * a.x.dtype().size();
    let mut per_src: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); h.world_size];
    for (l, slots) in h.recv_src.iter().enumerate() {
        for (slot, &(src, t)) in slots.iter().enumerate() {
            let dst = per_src.get_mut(src).ok_or_else(|| {
                Error::invalid(
                    OP,
                    "handle",
                    format!("slot names source rank {src} of {}", h.world_size),
                )
            })?;
            dst.push((t, h.rank * epr + l, l * cap + slot));
        }
    }
    let send = per_src
        .iter()
        .map(|rows| {
            let mut w = Writer::new();
            w.usize(h.hidden);
            w.u8(dtype_code(a.x.dtype()));
            w.usize(rows.len());
            for &(t, g, at) in rows {
                w.usize(t);
                w.usize(g);
                w.bytes(&xh.bytes()[at * row..(at + 1) * row]);
            }
            w.0
        })
        .collect();
    Ok(LlCombineLocal { send, topk })
}

pub(crate) fn low_latency_combine(
    comm: &dyn Communicator,
    op: &mut Checked<LowLatencyCombine<'_>>,
) -> Result<()> {
    const OP: &str = "low_latency_combine";
    let (a, d) = op.parts();
    let me = comm.rank();
    let (n, hidden, k) = (d.tokens, d.hidden, d.topk);
    let (send, topk) = match ll_combine_local(comm, a) {
        Ok(l) => (Ok(l.send), l.topk),
        Err(e) => (Err(e), Vec::new()),
    };
    let recv = exchange(comm, OP, send)?;
    // Payload element size: every rank's x has this rank's dtype (checked per message).
    let x_dtype = a.x.dtype();
    let esize = x_dtype.size();
    let mut rows: HashMap<(usize, usize), VecDeque<&[u8]>> = HashMap::new();
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        same(OP, "x", "hidden", src, rd.usize()?, hidden)?;
        same(OP, "x", "dtype", src, rd.u8()?, dtype_code(a.x.dtype()))?;
        let m = rd.count(16 + esize * hidden)?;
        for _ in 0..m {
            let t = rd.usize()?;
            let g = rd.usize()?;
            rows.entry((t, g))
                .or_default()
                .push_back(rd.take(esize * hidden)?);
        }
        rd.finish()?;
    }
    let w = host(a.topk_weights)?.to_f32_vec();
    let out_dtype = a.out.dtype();
    let mut out = vec![0f32; n * hidden];
    let mut acc = vec![0f64; hidden];
    for t in 0..n {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..k {
            let g = topk[t * k + j];
            if g < 0 {
                continue;
            }
            let y = rows
                .get_mut(&(t, g as usize))
                .and_then(|q| q.pop_front())
                .ok_or_else(|| {
                    Error::invalid(
                        OP,
                        "topk_idx",
                        format!(
                            "token {t} names expert {g} at top-k slot {j}, but no row for it came back (topk_idx differs from the one dispatched?)"
                        ),
                    )
                })?;
            let wt = w[t * k + j] as f64;
            for (v, b) in acc.iter_mut().zip(y.chunks_exact(esize)) {
                let yv = match x_dtype {
                    DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                };
                *v += wt * yv as f64;
            }
        }
        for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(&acc) {
            *o = round_once(out_dtype, v);
        }
    }
    if let Some(((t, g), _)) = rows.iter().find(|(_, q)| !q.is_empty()) {
        return Err(Error::invalid(
            OP,
            "topk_idx",
            format!(
                "a row for token {t}, expert {g} came back but topk_idx does not route it there (topk_idx differs from the one dispatched?)"
            ),
        ));
    }
    put_f32(a.out, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_once_is_a_single_rounding() {
        let tie = 1.0 + 2f64.powi(-8);
        // Just above the bf16 midpoint between 1 and 1 + 2^-7: must round up,
        // although a cast to f32 first would land exactly on the midpoint.
        assert_eq!(round_once(DType::BF16, tie + 2f64.powi(-40)), 1.0078125);
        assert_eq!(round_once(DType::BF16, tie - 2f64.powi(-40)), 1.0);
        assert_eq!(round_once(DType::BF16, -(tie + 2f64.powi(-40))), -1.0078125);
        // An exact midpoint ties to even.
        assert_eq!(round_once(DType::BF16, tie), 1.0);
        assert_eq!(round_once(DType::BF16, 1.0 + 3.0 * 2f64.powi(-8)), 1.015625);
        assert_eq!(round_once(DType::BF16, 1e300), f32::INFINITY);
        assert!(round_once(DType::BF16, f64::NAN).is_nan());
        assert_eq!(round_once(DType::BF16, 1e-300).to_bits(), 0);
        assert_eq!(round_once(DType::BF16, -1e-300).to_bits(), 0x8000_0000);
        assert_eq!(round_once(DType::F32, 0.1), 0.1f32);
    }
}
