//! Expert parallelism, written once (DeepEP V1 semantics, SPEC.md §7).
//!
//! The four communicating ops — [`dispatch`], [`combine`],
//! [`low_latency_dispatch`], [`low_latency_combine`] — run here, over any
//! [`Backend`] and any [`Transport`]. The backend supplies kernels only:
//!
//! * [`GatherRows`](crate::ops::GatherRows) packs the rows a rank sends and
//!   places the rows it receives into low-latency slots;
//! * [`ReduceRows`](crate::ops::ReduceRows) is the weighted reduction of
//!   both combines, in a fixed order;
//! * [`ActQuant`](crate::ops::ActQuant) quantizes a low-latency FP8
//!   payload once per token.
//!
//! Core owns the routing plan, the wire format, the handle checks and the
//! combine order, so every backend behaves the same, and ranks of different
//! backends can share one group: the bytes on the wire do not depend on who
//! made them.
//!
//! # One step of the protocol
//!
//! 1. *Local*: read the expert ids (downloaded and range-checked on the
//!    host: a bad id is [`Error::IndexOutOfRange`] on the rank that holds
//!    it), build the plan, pack the payload rows on the device.
//! 2. *Exchange*: one control message to every rank, even from a rank whose
//!    local step failed (it sends a failure notice, so its peers fail at
//!    once with [`Error::Comm`] naming it instead of waiting for the
//!    transport's timeout). The payload follows on the transport's device
//!    path when it [accepts](DeviceExchange::accepts) the backend, else
//!    host-staged, one flat exchange per payload tensor with the counts
//!    the control messages announced (no message is built or split):
//!    * a backend whose memory is host memory
//!      ([`Backend::host_view`]: `cpu`, `cpu-ref`) is read in place:
//!      [`all_to_all_v_rows`](Transport::all_to_all_v_rows) sends the
//!      source tensor's rows (MPI straight from them where a peer's rows
//!      are contiguous), and the buffer received (rows in source order) is
//!      [adopted](Backend::adopt) as the received tensor, no copy, and goes
//!      back to the transport ([`Transport::recycler`]) when that tensor is
//!      dropped;
//!    * any other backend's rows are downloaded before the control message
//!      (a failed download is a local failure like any other), sent with
//!      [`all_to_all_v_flat`](Transport::all_to_all_v_flat) from the
//!      downloaded rows (packed in destination order), and the received
//!      buffer is uploaded.
//!
//!    The bytes on the wire are the same either way.
//! 3. *Receive*: parse with bounds checks, reject a peer whose parameters
//!    differ, then place or reduce the rows on the device.
//!
//! Set `$DEEPPORT_EP_TRACE` to print the time of each phase on stderr.
//!
//! # Wire format (version 2)
//!
//! Every control message: status byte (`0` ok; `1` failed, followed by the
//! UTF-8 error text and nothing else), wire version, op tag, a `staged`
//! byte (payload host-staged or on the device path), the op's parameters
//! as `u64`s (compared field by field with the receiver's own), the
//! payload row count, the routing section (its length in bytes, then the
//! op's per-row records, little-endian), and the payload tensors' count
//! and row sizes in bytes (checked against the receiver's own). Host-staged
//! payload bytes travel in the flat exchanges that follow, never inside a
//! control message.
//!
//! Routing records: dispatch — source token, k global expert ids (i64), k
//! weights (f32); combine — source token; low-latency dispatch and combine
//! — source token, global expert.
//!
//! # Combine order
//!
//! `combine` sums, for each token, the copies returned by source ranks in
//! ascending rank order; `low_latency_combine` sums in top-k slot order.
//! Both are one [`ReduceRows`](crate::ops::ReduceRows) whose order is fixed,
//! so a backend's combine is bit-identical from run to run and whatever the
//! number of ranks.
//!
//! Duplicate expert ids within one token's top-k: the normal dispatch
//! counts a token once per distinct expert; the low-latency path sends one
//! copy per (token, k) entry and pairs the copies back up in order.

mod wire;

use crate::backend::{Backend, Tensor};
#[cfg(doc)]
use crate::comm::DeviceExchange;
use crate::comm::Transport;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::index::check_range;
use crate::ops::*;
use crate::tensor::HostTensor;
use std::collections::{HashMap, VecDeque};
use wire::{Reader, Writer};

/// The wire format's version byte.
pub const WIRE_VERSION: u8 = 2;

const OK: u8 = 0;
const FAILED: u8 = 1;

/// Which op a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Dispatch = 1,
    Combine = 2,
    LowLatencyDispatch = 3,
    LowLatencyCombine = 4,
}

/// A stable code for a dtype on the wire.
fn dtype_code(d: DType) -> u64 {
    DType::ALL.iter().position(|&x| x == d).unwrap_or(0xff) as u64
}

/// A payload tensor to send: rows `order` of `src` (−1: a zero row), or
/// `src` itself when `order` is `None` (already packed). Packing waits
/// until the path is known: on the device path (and when the source is
/// larger than the packed rows) the backend's `gather_rows` packs it on the
/// device; host-staged, the source is downloaded once and the rows are
/// packed on the host straight into the buffer that is sent (a token going
/// to several ranks is downloaded once, not once per rank).
struct Rows<'t> {
    src: Src<'t>,
    order: Option<Vec<i64>>,
}

enum Src<'t> {
    Borrowed(&'t Tensor),
    Owned(Tensor),
}

impl<'t> Rows<'t> {
    fn gather(src: &'t Tensor, order: Vec<i64>) -> Self {
        Rows {
            src: Src::Borrowed(src),
            order: Some(order),
        }
    }
    fn gather_owned(src: Tensor, order: Vec<i64>) -> Self {
        Rows {
            src: Src::Owned(src),
            order: Some(order),
        }
    }
    fn packed(src: Tensor) -> Self {
        Rows {
            src: Src::Owned(src),
            order: None,
        }
    }
    fn src(&self) -> &Tensor {
        match &self.src {
            Src::Borrowed(t) => t,
            Src::Owned(t) => t,
        }
    }
    /// The dtype and shape of the packed tensor.
    fn desc(&self) -> (DType, Vec<usize>) {
        let t = self.src();
        let mut shape = t.shape().to_vec();
        if let (Some(o), Some(rows)) = (&self.order, shape.first_mut()) {
            *rows = o.len();
        }
        (t.dtype(), shape)
    }
    /// The packed tensor on the device.
    fn on_device(self, backend: &dyn Backend) -> Result<Tensor> {
        match (self.order, self.src) {
            (Some(o), src) => gather(
                backend,
                match &src {
                    Src::Borrowed(t) => t,
                    Src::Owned(t) => t,
                },
                &o,
            ),
            (None, Src::Owned(t)) => Ok(t),
            (None, Src::Borrowed(t)) => t.view(0, t.shape()),
        }
    }
    /// The packed rows' bytes on the host.
    fn on_host(self, backend: &dyn Backend, op: &str) -> Result<Vec<u8>> {
        let src = self.src();
        let rows = src.shape().first().copied().unwrap_or(1);
        match &self.order {
            None => Ok(backend.download(src)?.into_bytes()),
            Some(order) if rows <= order.len() => {
                let all = backend.download(src)?.into_bytes();
                let row = all.len().checked_div(rows).unwrap_or(0);
                let mut out = Vec::new();
                out.try_reserve_exact(order.len() * row).map_err(|_| {
                    Error::Other(format!(
                        "{op}: cannot allocate {} bytes for the packed rows",
                        order.len() * row
                    ))
                })?;
                for &j in order {
                    if j < 0 {
                        out.resize(out.len() + row, 0);
                        continue;
                    }
                    let j = j as usize;
                    let bytes = all.get(j * row..(j + 1) * row).ok_or_else(|| {
                        Error::Other(format!(
                            "{op}: internal: row {j} of a payload of {rows} rows"
                        ))
                    })?;
                    out.extend_from_slice(bytes);
                }
                Ok(out)
            }
            Some(_) => Ok(backend.download(&self.on_device(backend)?)?.into_bytes()),
        }
    }
}

/// A host-staged payload before the flat exchange.
enum Staged<'t> {
    /// Downloaded and packed in destination order.
    Bytes(Vec<u8>),
    /// In host memory: the transport sends the rows in place.
    InPlace(Rows<'t>),
}

/// What one rank sends in one step.
struct Outgoing<'t> {
    /// Parameters every rank must agree on, with their names for messages.
    params: Vec<(&'static str, &'static str, u64)>,
    /// Per destination: the routing records.
    routing: Vec<Vec<u8>>,
    /// Per destination: payload rows.
    rows: Vec<usize>,
    /// Payload tensors, rows in destination order.
    payloads: Vec<Rows<'t>>,
}

/// What one rank received in one step.
struct Incoming {
    /// Per source: the routing records.
    routing: Vec<Vec<u8>>,
    /// Per source: payload rows.
    rows: Vec<usize>,
    /// Payload tensors, rows concatenated in source order.
    payloads: Vec<Tensor>,
}

/// Phase timing of the protocol, on stderr, when `$DEEPPORT_EP_TRACE` is
/// set: each call prints the time since the previous one and restarts it.
struct Trace(Option<(usize, std::time::Instant)>);

impl Trace {
    fn start(rank: usize) -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var_os("DEEPPORT_EP_TRACE").is_some());
        Trace(on.then(|| (rank, std::time::Instant::now())))
    }
    fn mark(&mut self, op: &str, phase: &str) {
        if let Some((rank, t)) = &mut self.0 {
            eprintln!(
                "deepport ep trace: rank {rank} {op} {phase}: {:.2} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            *t = std::time::Instant::now();
        }
    }
}

fn comm_err(rank: usize, msg: String) -> Error {
    Error::Comm { rank, msg }
}

/// Runs one collective step; see the module docs.
fn exchange(
    backend: &dyn Backend,
    comm: &dyn Transport,
    op: &'static str,
    tag: Tag,
    local: Result<Outgoing<'_>>,
) -> Result<Incoming> {
    let world = comm.world_size();
    let me = comm.rank();
    let device = comm.device().filter(|d| d.accepts(backend));
    let mut trace = Trace::start(me);
    // Host-staged payload bytes, per payload, downloaded before the control
    // exchange so that a failed download is a local failure peers hear
    // about. The device rows are released once downloaded: with DeepEP's
    // shapes a payload is hundreds of megabytes per rank.
    let local = local.and_then(|mut out| {
        if out.routing.len() != world || out.rows.len() != world {
            return Err(Error::Other(format!(
                "{op}: internal: a plan for {} ranks in a group of {world}",
                out.routing.len()
            )));
        }
        let descs: Vec<(DType, Vec<usize>)> = out.payloads.iter().map(Rows::desc).collect();
        let mut packed = Vec::new();
        let mut staged = Vec::new();
        for p in std::mem::take(&mut out.payloads) {
            match device {
                Some(_) => packed.push(p.on_device(backend)?),
                // Host memory: the transport reads the rows in place.
                None if backend.host_view(p.src()).is_some() => staged.push(Staged::InPlace(p)),
                None => staged.push(Staged::Bytes(p.on_host(backend, op)?)),
            }
        }
        Ok((out, descs, packed, staged))
    });
    let send: Vec<Vec<u8>> = match &local {
        Ok((out, descs, _, _)) => (0..world)
            .map(|dst| {
                let mut w = Writer::with_capacity(
                    64 + 8 * out.params.len() + out.routing[dst].len() + 8 * descs.len(),
                );
                w.u8(OK);
                w.u8(WIRE_VERSION);
                w.u8(tag as u8);
                w.u8(device.is_none() as u8);
                w.usize(out.params.len());
                for &(_, _, v) in &out.params {
                    w.u64(v);
                }
                w.usize(out.rows[dst]);
                w.usize(out.routing[dst].len());
                w.bytes(&out.routing[dst]);
                w.usize(descs.len());
                for (dtype, shape) in descs {
                    w.usize(desc_row_bytes(*dtype, shape));
                }
                w.0
            })
            .collect(),
        Err(e) => {
            let mut v = vec![FAILED];
            v.extend_from_slice(e.to_string().as_bytes());
            vec![v; world]
        }
    };
    trace.mark(op, "download");
    let recv = comm.all_to_all_v(send);
    trace.mark(op, "control exchange");
    // A local failure wins over anything the exchange reports.
    let (out, descs, packed, staged) = local?;
    let recv = recv?;
    if recv.len() != world {
        return Err(comm_err(
            me,
            format!(
                "{op}: the transport returned {} messages for {world} ranks",
                recv.len()
            ),
        ));
    }
    let mut inc = Incoming {
        routing: Vec::with_capacity(world),
        rows: Vec::with_capacity(world),
        payloads: Vec::new(),
    };
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Reader::new(op, me, src, buf);
        match rd.u8()? {
            OK => {}
            FAILED => {
                return Err(comm_err(
                    me,
                    format!(
                        "{op}: rank {src} failed: {}",
                        String::from_utf8_lossy(&buf[1..])
                    ),
                ))
            }
            _ => return Err(rd.malformed("bad status byte")),
        }
        let version = rd.u8()?;
        if version != WIRE_VERSION {
            return Err(comm_err(
                me,
                format!("{op}: rank {src} speaks wire version {version}, this rank {WIRE_VERSION}"),
            ));
        }
        if rd.u8()? != tag as u8 {
            return Err(comm_err(
                me,
                format!("{op}: rank {src} is running another expert-parallel op (collectives out of order?)"),
            ));
        }
        let staged = rd.u8()? != 0;
        if staged != device.is_none() {
            return Err(comm_err(
                me,
                format!(
                    "{op}: rank {src} and this rank disagree on the device path of the transport"
                ),
            ));
        }
        let np = rd.count(8)?;
        if np != out.params.len() {
            return Err(rd.malformed("parameter count"));
        }
        for &(arg, what, mine) in &out.params {
            let theirs = rd.u64()?;
            if theirs != mine {
                return Err(Error::invalid(
                    op,
                    arg,
                    format!(
                        "rank {src} has {what} = {theirs}, this rank has {mine}; all ranks must agree"
                    ),
                ));
            }
        }
        let rows = rd.usize()?;
        let rlen = rd.count(1)?;
        inc.routing.push(rd.take(rlen)?.to_vec());
        inc.rows.push(rows);
        if rd.count(8)? != descs.len() {
            return Err(rd.malformed("payload count"));
        }
        for (dtype, shape) in &descs {
            if rd.usize()? != desc_row_bytes(*dtype, shape) {
                return Err(rd.malformed("payload row size"));
            }
        }
        rd.finish()?;
    }
    drop(recv);
    let total: usize = inc.rows.iter().sum();
    match device {
        Some(dev) => {
            for t in &packed {
                inc.payloads
                    .push(dev.exchange_rows(backend, t, &out.rows, &inc.rows)?);
            }
        }
        None => {
            // One flat exchange per payload, from the downloaded bytes
            // (already packed in destination order) or, in host memory,
            // from the source tensor's rows in place, into one buffer
            // (rows in source order) that becomes the received tensor:
            // adopted as it is by a host-memory backend, uploaded by any
            // other. The buffer goes back to the transport afterwards.
            for ((dtype, shape), payload) in descs.iter().zip(staged) {
                let row = desc_row_bytes(*dtype, shape);
                let counts = |rows: &[usize]| -> Result<Vec<usize>> {
                    rows.iter()
                        .map(|&r| {
                            r.checked_mul(row).ok_or_else(|| {
                                comm_err(me, format!("{op}: {r} rows of {row} bytes overflow"))
                            })
                        })
                        .collect()
                };
                trace.mark(op, "parse");
                let got = match payload {
                    Staged::Bytes(bytes) => {
                        comm.all_to_all_v_flat(bytes, &counts(&out.rows)?, &counts(&inc.rows)?)?
                    }
                    Staged::InPlace(p) => {
                        let all: Vec<i64>;
                        let order = match &p.order {
                            Some(o) => o.as_slice(),
                            None => {
                                all = (0..shape[0] as i64).collect();
                                &all
                            }
                        };
                        comm.all_to_all_v_rows(p.src(), order, &out.rows, &inc.rows)?
                    }
                };
                trace.mark(op, "payload exchange");
                let mut shape = shape.clone();
                shape[0] = total;
                inc.payloads
                    .push(backend.adopt(*dtype, &shape, got, comm.recycler())?);
                trace.mark(op, "adopt");
            }
        }
    }
    Ok(inc)
}

/// A step's payloads: the rows, and the FP8 scales when they were sent.
/// Every step sends its rows, so an empty list is a protocol bug.
fn rows_and_scales(op: &'static str, payloads: Vec<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
    let mut it = payloads.into_iter();
    let rows = it
        .next()
        .ok_or_else(|| Error::Other(format!("{op}: internal: no payload received")))?;
    Ok((rows, it.next()))
}

/// Bytes of one row of a tensor of `dtype` and `shape` (everything after
/// the first dimension).
fn desc_row_bytes(dtype: DType, shape: &[usize]) -> usize {
    shape.iter().skip(1).product::<usize>() * dtype.size()
}

/// Experts per rank, or [`Error::Invalid`] unless `E` is a positive
/// multiple of `R`.
pub fn experts_per_rank(op: &'static str, num_experts: usize, world: usize) -> Result<usize> {
    if world == 0 || num_experts < world || !num_experts.is_multiple_of(world) {
        return Err(Error::invalid(
            op,
            "num_experts",
            format!("must be a positive multiple of the world size {world}, got {num_experts}"),
        ));
    }
    Ok(num_experts / world)
}

/// Downloads an expert-id tensor and checks every entry is in `[0, E)` or −1.
fn read_topk(
    backend: &dyn Backend,
    op: &'static str,
    t: &Tensor,
    num_experts: usize,
) -> Result<Vec<i64>> {
    let h = backend.download(t)?;
    check_range(op, "topk_idx", &h, 0, num_experts as i64, Some(-1))?;
    Ok(h.to_i64_vec())
}

/// `src`'s rows at `order` (−1: a zero row) as a new tensor of `backend`.
fn gather(backend: &dyn Backend, src: &Tensor, order: &[i64]) -> Result<Tensor> {
    let mut shape = src.shape().to_vec();
    shape[0] = order.len();
    let mut dst = backend.alloc(src.dtype(), &shape)?;
    if order.is_empty() {
        return Ok(dst);
    }
    let index = backend.upload(&HostTensor::from_i64(&[order.len()], order))?;
    run(
        backend,
        GatherRows {
            src,
            index: &index,
            dst: &mut dst,
        },
    )?;
    Ok(dst)
}

/// Checks that a handle was made on this rank of this group.
fn check_handle(op: &'static str, comm: &dyn Transport, rank: usize, world: usize) -> Result<()> {
    if rank != comm.rank() || world != comm.world_size() {
        return Err(Error::invalid(
            op,
            "handle",
            format!(
                "belongs to rank {rank} of {world}, but this transport is rank {} of {}",
                comm.rank(),
                comm.world_size()
            ),
        ));
    }
    Ok(())
}

// ---- normal dispatch / combine ------------------------------------------------

/// Normal dispatch (SPEC.md §7) over core's protocol. Use
/// [`crate::ops::dispatch`], which validates and may take a backend's
/// native path.
pub fn dispatch(
    backend: &dyn Backend,
    comm: &dyn Transport,
    op: &Checked<Dispatch<'_>>,
) -> Result<DispatchOutput> {
    const OP: &str = "dispatch";
    let (a, d) = (op.args(), op.dims());
    let (world, me) = (comm.world_size(), comm.rank());
    let (n, hidden, k, e) = (d.tokens, d.hidden, d.topk, d.num_experts);
    let has_scales = a.x_scales.is_some();
    let mut trace = Trace::start(me);
    let mut send_plan = vec![Vec::new(); world];
    let local = (|| {
        let epr = experts_per_rank(OP, e, world)?;
        let topk = read_topk(backend, OP, a.topk_idx, e)?;
        let weights = backend.download(a.topk_weights)?.to_f32_vec();
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
        let order: Vec<i64> = send_plan.iter().flatten().map(|&t| t as i64).collect();
        let mut payloads = Vec::new();
        if let Some(s) = a.x_scales {
            payloads.push(Rows::gather(s, order.clone()));
        }
        payloads.insert(0, Rows::gather(a.x, order));
        let routing = send_plan
            .iter()
            .map(|tokens| {
                let mut w = Writer::default();
                for &t in tokens {
                    w.usize(t);
                    for j in 0..k {
                        w.i64(topk[t * k + j]);
                    }
                    for j in 0..k {
                        w.f32(weights[t * k + j]);
                    }
                }
                w.0
            })
            .collect();
        Ok(Outgoing {
            params: vec![
                ("x", "x dtype", dtype_code(a.x.dtype())),
                ("x", "hidden", hidden as u64),
                ("topk_idx", "top-k", k as u64),
                ("x_scales", "FP8 scales", has_scales as u64),
                ("num_experts", "num_experts", e as u64),
            ],
            routing,
            rows: send_plan.iter().map(Vec::len).collect(),
            payloads,
        })
    })();
    trace.mark(OP, "plan and pack");
    let inc = exchange(backend, comm, OP, Tag::Dispatch, local)?;
    trace.mark(OP, "exchange");
    let epr = e / world;
    let (lo, hi) = ((me * epr) as i64, ((me + 1) * epr) as i64);
    let mut recv_src = Vec::new();
    let mut r_idx: Vec<i64> = Vec::new();
    let mut r_w: Vec<f32> = Vec::new();
    let mut counts = vec![0usize; epr];
    for (src, buf) in inc.routing.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        for _ in 0..inc.rows[src] {
            let t = rd.usize()?;
            recv_src.push((src, t));
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
    let (recv_x, recv_scales) = rows_and_scales(OP, inc.payloads)?;
    Ok(DispatchOutput {
        recv_x,
        recv_scales,
        recv_topk_idx: backend.upload(&HostTensor::from_i64(&[m, k], &r_idx))?,
        recv_topk_weights: backend.upload(&HostTensor::from_f32(DType::F32, &[m, k], &r_w))?,
        num_recv_tokens_per_expert: {
            trace.mark(OP, "receive");
            counts
        }
        .iter()
        .map(|c| c.div_ceil(align) * align)
        .collect(),
        handle: DispatchHandle {
            rank: me,
            world_size: world,
            num_tokens: n,
            recv_src,
            send_plan,
            state: HandleState::default(),
        },
    })
}

/// Normal combine (SPEC.md §7) over core's protocol: every received row goes
/// back to its source rank, which sums the copies of each token in
/// ascending source-rank order with one [`ReduceRows`].
pub fn combine(
    backend: &dyn Backend,
    comm: &dyn Transport,
    op: &mut Checked<Combine<'_>>,
) -> Result<()> {
    const OP: &str = "combine";
    let (a, d) = op.parts();
    let (n, hidden) = (d.tokens, d.hidden);
    let (world, me) = (comm.world_size(), comm.rank());
    let h = a.handle;
    let mut trace = Trace::start(me);
    let local = (|| {
        check_handle(OP, comm, h.rank, h.world_size)?;
        if h.send_plan.len() != world {
            return Err(Error::invalid(
                OP,
                "handle",
                format!(
                    "send plan has {} destinations for {world} ranks",
                    h.send_plan.len()
                ),
            ));
        }
        let mut per_src: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
        for (i, &(src, t)) in h.recv_src.iter().enumerate() {
            per_src
                .get_mut(src)
                .ok_or_else(|| {
                    Error::invalid(
                        OP,
                        "handle",
                        format!("received row {i} names source rank {src} of {world}"),
                    )
                })?
                .push((i, t));
        }
        let order: Vec<i64> = per_src.iter().flatten().map(|&(i, _)| i as i64).collect();
        let in_order = order.iter().enumerate().all(|(j, &i)| j as i64 == i);
        let packed = if in_order {
            Rows::packed(a.x.view(0, a.x.shape())?)
        } else {
            Rows::gather(a.x, order)
        };
        let routing = per_src
            .iter()
            .map(|rows| {
                let mut w = Writer::default();
                for &(_, t) in rows {
                    w.usize(t);
                }
                w.0
            })
            .collect();
        Ok(Outgoing {
            params: vec![
                ("x", "x dtype", dtype_code(a.x.dtype())),
                ("x", "hidden", hidden as u64),
            ],
            routing,
            rows: per_src.iter().map(Vec::len).collect(),
            payloads: vec![packed],
        })
    })();
    trace.mark(OP, "plan and pack");
    let inc = exchange(backend, comm, OP, Tag::Combine, local)?;
    trace.mark(OP, "exchange");
    // index[t, r]: the received row that rank r returned for token t.
    let mut index = vec![-1i64; n * world];
    let mut pos = 0usize;
    for (src, buf) in inc.routing.iter().enumerate() {
        let plan = &h.send_plan[src];
        if inc.rows[src] != plan.len() {
            return Err(Error::invalid(
                OP,
                "handle",
                format!(
                    "rank {src} returned {} rows, but this rank sent it {} (handles of different dispatches?)",
                    inc.rows[src],
                    plan.len()
                ),
            ));
        }
        let mut rd = Reader::new(OP, me, src, buf);
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
            index[t * world + src] = pos as i64;
            pos += 1;
        }
        rd.finish()?;
    }
    let (recv, _) = rows_and_scales(OP, inc.payloads)?;
    let index = backend.upload(&HostTensor::from_i64(&[n, world], &index))?;
    trace.mark(OP, "receive");
    run(
        backend,
        ReduceRows {
            src: &recv,
            index: &index,
            weights: None,
            out: a.out,
        },
    )?;
    trace.mark(OP, "reduce");
    Ok(())
}

// ---- low-latency dispatch / combine ---------------------------------------------

/// Low-latency dispatch (SPEC.md §7) over core's protocol. With FP8 the
/// payload is quantized once per token by the backend's `act_quant`.
pub fn low_latency_dispatch(
    backend: &dyn Backend,
    comm: &dyn Transport,
    op: &Checked<LowLatencyDispatch<'_>>,
) -> Result<LowLatencyDispatchOutput> {
    const OP: &str = "low_latency_dispatch";
    let (a, d) = (op.args(), op.dims());
    let (world, me) = (comm.world_size(), comm.rank());
    let (n, hidden, k, e) = (d.tokens, d.hidden, d.topk, d.num_experts);
    let local = (|| {
        let epr = experts_per_rank(OP, e, world)?;
        let topk = read_topk(backend, OP, a.topk_idx, e)?;
        let mut per_dst: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
        for t in 0..n {
            for &g in &topk[t * k..(t + 1) * k] {
                if g >= 0 {
                    per_dst[g as usize / epr].push((t, g as usize));
                }
            }
        }
        let order: Vec<i64> = per_dst.iter().flatten().map(|&(t, _)| t as i64).collect();
        let payloads = if a.use_fp8 {
            let mut q = backend.alloc(DType::F8E4M3, &[n, hidden])?;
            let mut s = backend.alloc(DType::F32, &[n, hidden / QBLOCK])?;
            if n > 0 {
                run(
                    backend,
                    ActQuant {
                        x: a.x,
                        q: &mut q,
                        s: &mut s,
                        scale_fmt: if a.ue8m0 {
                            ScaleFmt::Ue8m0
                        } else {
                            ScaleFmt::Float
                        },
                    },
                )?;
            }
            vec![
                Rows::gather_owned(q, order.clone()),
                Rows::gather_owned(s, order),
            ]
        } else {
            vec![Rows::gather(a.x, order)]
        };
        let routing = per_dst
            .iter()
            .map(|entries| {
                let mut w = Writer::default();
                for &(t, g) in entries {
                    w.usize(t);
                    w.usize(g);
                }
                w.0
            })
            .collect();
        Ok(Outgoing {
            params: vec![
                ("x", "x dtype", dtype_code(a.x.dtype())),
                ("x", "hidden", hidden as u64),
                ("num_experts", "num_experts", e as u64),
                (
                    "max_tokens_per_rank",
                    "max_tokens_per_rank",
                    a.max_tokens_per_rank as u64,
                ),
                ("use_fp8", "use_fp8", a.use_fp8 as u64),
                ("ue8m0", "ue8m0", (a.use_fp8 && a.ue8m0) as u64),
            ],
            routing,
            rows: per_dst.iter().map(Vec::len).collect(),
            payloads,
        })
    })();
    let inc = exchange(backend, comm, OP, Tag::LowLatencyDispatch, local)?;
    let epr = e / world;
    let cap = a.max_tokens_per_rank * world;
    let lo = me * epr;
    let mut recv_src: Vec<Vec<(usize, usize)>> = vec![Vec::new(); epr];
    // slots[l·cap + slot]: the received row in that slot, −1 when empty.
    let mut slots = vec![-1i64; epr * cap];
    let mut pos = 0i64;
    for (src, buf) in inc.routing.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        for _ in 0..inc.rows[src] {
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
            slots[l * cap + slot] = pos;
            pos += 1;
        }
        rd.finish()?;
    }
    let mut placed = Vec::with_capacity(inc.payloads.len());
    for p in &inc.payloads {
        let mut t = gather(backend, p, &slots)?;
        let last = *p.shape().last().unwrap_or(&1);
        t.reshape(&[epr, cap, last])?;
        placed.push(t);
    }
    let (recv_x, recv_scales) = rows_and_scales(OP, placed)?;
    let counts: Vec<i32> = recv_src.iter().map(|v| v.len() as i32).collect();
    Ok(LowLatencyDispatchOutput {
        recv_x,
        recv_scales,
        recv_count: backend.upload(&HostTensor::from_i32(&[epr], &counts))?,
        handle: LowLatencyHandle {
            rank: me,
            world_size: world,
            num_experts: e,
            num_tokens: n,
            max_tokens_per_rank: a.max_tokens_per_rank,
            hidden,
            recv_src,
            state: HandleState::default(),
        },
    })
}

/// Low-latency combine (SPEC.md §7) over core's protocol: expert outputs go
/// back to their tokens' ranks, which sum them in top-k slot order with one
/// weighted [`ReduceRows`].
pub fn low_latency_combine(
    backend: &dyn Backend,
    comm: &dyn Transport,
    op: &mut Checked<LowLatencyCombine<'_>>,
) -> Result<()> {
    const OP: &str = "low_latency_combine";
    let (a, d) = op.parts();
    let (world, me) = (comm.world_size(), comm.rank());
    let (n, k) = (d.tokens, d.topk);
    let h = a.handle;
    let mut topk = Vec::new();
    let local = (|| {
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
        topk = read_topk(backend, OP, a.topk_idx, h.num_experts)?;
        let mut per_src: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); world];
        for (l, slots) in h.recv_src.iter().enumerate() {
            for (slot, &(src, t)) in slots.iter().enumerate() {
                per_src
                    .get_mut(src)
                    .ok_or_else(|| {
                        Error::invalid(
                            OP,
                            "handle",
                            format!("slot names source rank {src} of {world}"),
                        )
                    })?
                    .push((t, h.rank * epr + l, l * cap + slot));
            }
        }
        let order: Vec<i64> = per_src
            .iter()
            .flatten()
            .map(|&(_, _, at)| at as i64)
            .collect();
        let flat = a.x.view(0, &[epr * cap, h.hidden])?;
        let packed = Rows::gather_owned(flat, order);
        let routing = per_src
            .iter()
            .map(|rows| {
                let mut w = Writer::default();
                for &(t, g, _) in rows {
                    w.usize(t);
                    w.usize(g);
                }
                w.0
            })
            .collect();
        Ok(Outgoing {
            params: vec![
                ("x", "x dtype", dtype_code(a.x.dtype())),
                ("x", "hidden", h.hidden as u64),
            ],
            routing,
            rows: per_src.iter().map(Vec::len).collect(),
            payloads: vec![packed],
        })
    })();
    let inc = exchange(backend, comm, OP, Tag::LowLatencyCombine, local)?;
    let mut rows: HashMap<(usize, usize), VecDeque<i64>> = HashMap::new();
    let mut pos = 0i64;
    for (src, buf) in inc.routing.iter().enumerate() {
        let mut rd = Reader::new(OP, me, src, buf);
        for _ in 0..inc.rows[src] {
            let t = rd.usize()?;
            let g = rd.usize()?;
            rows.entry((t, g)).or_default().push_back(pos);
            pos += 1;
        }
        rd.finish()?;
    }
    let mut index = vec![-1i64; n * k];
    for t in 0..n {
        for j in 0..k {
            let g = topk[t * k + j];
            if g < 0 {
                continue;
            }
            index[t * k + j] = rows
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
    let (recv, _) = rows_and_scales(OP, inc.payloads)?;
    let index = backend.upload(&HostTensor::from_i64(&[n, k], &index))?;
    run(
        backend,
        ReduceRows {
            src: &recv,
            index: &index,
            weights: Some(a.topk_weights),
            out: a.out,
        },
    )
}

/// Where a backend keeps device state with an expert-parallel handle (index
/// tensors it wants to reuse, events, …). Core never looks inside; handles
/// compare equal regardless of it.
#[derive(Clone, Default)]
pub struct HandleState(pub Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl std::fmt::Debug for HandleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "HandleState(set)"
        } else {
            "HandleState(empty)"
        })
    }
}

impl PartialEq for HandleState {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for HandleState {}
