//! Expert-parallel ops (SPEC.md §7, DeepEP V1 semantics) over a
//! [`Communicator`].
//!
//! `get_dispatch_layout` runs entirely on the device (atomics for the
//! counts, the op's range check for bad expert ids).
//!
//! The four communicating ops exchange host bytes with one
//! `all_to_all_v`, but packing and unpacking are WGSL kernels:
//!
//! 1. *local step*: the expert ids are range-checked on the device and
//!    downloaded (they are small; a bad id surfaces there as
//!    `IndexOutOfRange`), the routing plan is built on the host, and a pack
//!    kernel gathers the rows for every destination into one contiguous
//!    device buffer of word-aligned records, which is downloaded;
//! 2. *exchange*: every rank sends every rank one message, even a rank whose
//!    local step failed (it sends a failure notice instead, so its peers
//!    return an error at once instead of waiting for the communicator's
//!    timeout; the failing rank returns its own, precise error);
//! 3. *receive*: the records of all sources are uploaded as one buffer and
//!    unpack kernels scatter them into the outputs (rows, scales, local
//!    expert ids, weights, per-expert counts), or the combine kernel sums
//!    them in f32 and rounds once.
//!
//! # Wire format (this backend's own)
//!
//! A message is a status byte (`OK`/`FAILED`; after `FAILED` the UTF-8 error
//! text), an op tag byte, the op's shape parameters as little-endian u64
//! (every receiver rejects a peer whose parameters differ from its own with
//! [`Error::Invalid`]), a row count `m`, `m` routing entries (u64 each: the
//! source token, and for the low-latency ops the global expert), then `m`
//! records of `stride` little-endian u32 words. Received messages are parsed
//! with bounds checks: a malformed message is an error, never a panic or an
//! out-of-bounds device read (the kernels address records the host counted).
//!
//! Records:
//! * dispatch: the row bytes (padded to whole words), the f32 scales when
//!   FP8, the k global expert ids as i32, the k weights' f32 bits;
//! * low-latency dispatch: the payload row (bf16/f32 bytes, or e4m3 codes
//!   and f32 scales quantized on the device with act_quant's kernel);
//! * both combines: the row in the combine input's dtype (bf16 or f32).
//!
//! # Limits
//!
//! Every kernel binds its tensors and staging buffers in windows that fit
//! `max_storage_buffer_binding_size` (`Win`): records and
//! rows in ranges from `Ctx::plan_rows`; the rows a pack
//! gathers, or the records an unpack scatters, in windows of their own
//! (a record outside the bound window is left to the dispatch that binds
//! it; unpack passes after the first merge their bytes into the row words).
//! Combine reorders the returned records on the host into entry order, so a
//! window of output tokens reads one contiguous range of records and sums in
//! the same order as without windows: results are bit-identical. Only rows
//! that cannot be placed alone (one token's returned records, say) give
//! `NotSupported`.
//!
//! One backend may serve several ranks (it is `Sync`; an op holds the
//! context lock only while recording or waiting on the device, never across
//! the exchange). Deferred errors belong to the backend, though: with a
//! shared backend, one rank's bad expert id may surface in another rank's
//! download during the same op. Use one backend per rank where the failing
//! rank must be the one that reports `IndexOutOfRange`.
//!
//! Duplicate expert ids in one token's top-k follow cpu-ref: counts take a
//! token once per distinct expert (and rank); the low-latency path sends a
//! copy per (token, k) entry and pairs the copies back up in order.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Rec, Shader, Win};
use crate::Wgpu;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::Communicator;
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use std::collections::{HashMap, VecDeque};

const LAYOUT_WGSL: &str = include_str!("../shaders/ep_layout.wgsl");
const PACK_WGSL: &str = include_str!("../shaders/ep_pack.wgsl");
const PACK_IDS_WGSL: &str = include_str!("../shaders/ep_pack_ids.wgsl");
const UNPACK_WGSL: &str = include_str!("../shaders/ep_unpack.wgsl");
const UNPACK_META_WGSL: &str = include_str!("../shaders/ep_unpack_meta.wgsl");
const COMBINE_WGSL: &str = include_str!("../shaders/ep_combine.wgsl");
/// The act_quant kernel, reused for the FP8 low-latency payload (same body,
/// so it shares the act_quant op's pipeline).
const ACT_QUANT_WGSL: &str = include_str!("../shaders/act_quant.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.get_dispatch_layout = Some(get_dispatch_layout);
    t.dispatch = Some(dispatch);
    t.combine = Some(combine);
    t.low_latency_dispatch = Some(low_latency_dispatch);
    t.low_latency_combine = Some(low_latency_combine);
}

/// Map entry of a slot that receives nothing.
const NONE: u32 = u32::MAX;

fn words(bytes: usize) -> usize {
    bytes.div_ceil(4)
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

// ---- device helpers ---------------------------------------------------------------

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn upload_u32(w: &Wgpu, op: &'static str, v: &[u32]) -> Result<wgpu::Buffer> {
    w.ctx.upload_bytes(op, &u32_bytes(v))
}

fn u32_list(op: &'static str, what: &str, v: &[usize]) -> Result<Vec<u32>> {
    v.iter().map(|&x| u32_of(op, what, x)).collect()
}

/// Range-checks `topk_idx` on the device (`[0, E)` or −1) and downloads it;
/// a bad id (or any earlier deferred error) surfaces here.
fn read_topk(w: &Wgpu, op: &'static str, t: &Tensor, num_experts: usize) -> Result<Vec<i64>> {
    let mut rec = w.ctx.begin(op)?;
    rec.check_range("topk_idx", t, 0, num_experts as i64, Some(-1))?;
    rec.finish()?;
    Ok(w.download(t)?.to_i64_vec())
}

/// Rows `[start, end)`.
type Range = (usize, usize);

/// Records pack kernels that fill `n` records of `stride` words in `dst`;
/// record `r` takes its fields from source row `rows[r]`. Records, and the
/// source rows, are processed in windows that fit one storage binding.
struct Pack<'r, 'a> {
    rec: &'r mut Rec<'a>,
    op: &'static str,
    rows: &'r [usize],
    rows_buf: &'r wgpu::Buffer,
    stride: usize,
    dst: &'r wgpu::Buffer,
}

impl Pack<'_, '_> {
    /// Windows of records (with their `rows` entries), and for each the
    /// windows of source rows (of `row_bytes`, `src_rows` in all) it uses.
    fn windows(&self, src_rows: usize, row_bytes: u64) -> Result<Vec<(Range, Vec<Range>)>> {
        let ctx = self.rec.ctx();
        let recs = ctx.plan_rows(self.op, self.rows.len(), &[self.stride as u64 * 4])?;
        let srcs = ctx.plan_rows(self.op, src_rows, &[row_bytes])?;
        Ok(recs
            .into_iter()
            .map(|(r0, r1)| {
                let used = srcs
                    .iter()
                    .copied()
                    .filter(|&(s0, s1)| {
                        srcs.len() == 1 || self.rows[r0..r1].iter().any(|&t| t >= s0 && t < s1)
                    })
                    .collect();
                ((r0, r1), used)
            })
            .collect())
    }

    /// Field at word `off`: the `row_bytes` bytes of each listed row of `src`
    /// (`src_rows` rows).
    fn field(
        &mut self,
        src: &wgpu::Buffer,
        src_rows: usize,
        row_bytes: usize,
        off: usize,
    ) -> Result<()> {
        let op = self.op;
        let per = words(row_bytes);
        u32_of(op, "packed words", self.rows.len() * per)?;
        u32_of(op, "source bytes", src_rows * row_bytes)?;
        if self.rows.is_empty() || per == 0 {
            return Ok(());
        }
        let sh = Shader::new("ep_pack", PACK_WGSL)
            .raw("src", false)
            .raw("rows", false)
            .raw("dst", true);
        let rb = row_bytes as u64;
        let rec_bytes = self.stride as u64 * 4;
        let align = self.rec.ctx().binding_align();
        for ((r0, r1), srcs) in self.windows(src_rows, rb)? {
            let total = ((r1 - r0) * per) as u32;
            for (s0, s1) in srcs {
                let (rows, rows_at) = words_win(self.rows_buf, r0, r1, align);
                let p = Params::new()
                    .u32(total)
                    .u32(per as u32)
                    .u32(row_bytes as u32)
                    .u32(self.stride as u32)
                    .u32(off as u32)
                    .u32(s0 as u32)
                    .u32((s1 - s0) as u32)
                    .u32((r0 - rows_at) as u32);
                let bufs = [
                    Win::rows(src, rb, s0, s1),
                    rows,
                    Win::rows(self.dst, rec_bytes, r0, r1),
                ];
                self.rec.dispatch_win(&sh, p, &bufs, groups(total, 256))?;
            }
        }
        Ok(())
    }

    /// Field at word `off`: the k expert ids of each listed token as i32
    /// (`topk` is `[tokens, k]`).
    fn ids(&mut self, topk: &Tensor, k: usize, off: usize) -> Result<()> {
        u32_of(self.op, "packed ids", self.rows.len() * k)?;
        if self.rows.is_empty() || k == 0 {
            return Ok(());
        }
        let sh = Shader::new("ep_pack_ids", PACK_IDS_WGSL)
            .input("topk", topk.dtype())
            .raw("rows", false)
            .raw("dst", true);
        let rb = (k * topk.dtype().size()) as u64;
        let tokens = topk.numel() / k;
        let rec_bytes = self.stride as u64 * 4;
        let align = self.rec.ctx().binding_align();
        for ((r0, r1), srcs) in self.windows(tokens, rb)? {
            let total = ((r1 - r0) * k) as u32;
            for (s0, s1) in srcs {
                let (rows, rows_at) = words_win(self.rows_buf, r0, r1, align);
                let p = Params::new()
                    .u32(total)
                    .u32(k as u32)
                    .u32(self.stride as u32)
                    .u32(off as u32)
                    .u32(s0 as u32)
                    .u32((s1 - s0) as u32)
                    .u32((r0 - rows_at) as u32);
                let bufs = [
                    Win::rows(buffer(topk)?, rb, s0, s1),
                    rows,
                    Win::rows(self.dst, rec_bytes, r0, r1),
                ];
                self.rec.dispatch_win(&sh, p, &bufs, groups(total, 256))?;
            }
        }
        Ok(())
    }
}

/// Records unpack kernels that scatter fields of received records (`nrecs`
/// of `stride` words) into dense tensors of `nrows` rows: `map[i]` names the
/// record of row `i` (`NONE`: the row is zero); without a map row `i` comes
/// from record `i`. Rows and records are processed in windows that fit one
/// storage binding.
struct Unpack<'r, 'a> {
    rec: &'r mut Rec<'a>,
    op: &'static str,
    recs: &'r wgpu::Buffer,
    nrecs: usize,
    map: Option<&'r wgpu::Buffer>,
    nrows: usize,
    stride: usize,
}

impl Unpack<'_, '_> {
    /// Rows of `row_bytes` bytes of `dst` from the field at word `off`.
    fn field(&mut self, dst: &Tensor, row_bytes: usize, off: usize) -> Result<()> {
        let op = self.op;
        u32_of(op, "received bytes", self.nrows * row_bytes)?;
        u32_of(op, "received records", self.nrecs * self.stride * 4)?;
        if self.nrows * row_bytes == 0 {
            return Ok(());
        }
        let sh = Shader::new("ep_unpack", UNPACK_WGSL)
            .raw("recs", false)
            .raw("map", false)
            .raw("dst", true);
        let ctx = self.rec.ctx();
        let rb = row_bytes as u64;
        let rec_bytes = self.stride as u64 * 4;
        let dst_buf = buffer(dst)?;
        // (dst rows, records) windows per dispatch.
        let mut plan: Vec<((usize, usize), (usize, usize))> = Vec::new();
        match self.map {
            None => {
                for (r0, r1) in ctx.plan_rows(op, self.nrows, &[rb, rec_bytes])? {
                    plan.push(((r0, r1), (r0, r1)));
                }
            }
            Some(_) => {
                let mut recs = ctx.plan_rows(op, self.nrecs, &[rec_bytes])?;
                if recs.is_empty() {
                    recs.push((0, 0));
                }
                for rows in ctx.plan_rows(op, self.nrows, &[rb])? {
                    plan.extend(recs.iter().map(|&r| (rows, r)));
                }
            }
        }
        let mut prev_rows = None;
        for ((r0, r1), (e0, e1)) in plan {
            // Later windows of records merge into the rows the first wrote.
            let merge = prev_rows == Some(r0);
            prev_rows = Some(r0);
            let total_bytes = ((r1 - r0) * row_bytes) as u32;
            let total_words = total_bytes.div_ceil(4);
            let recs = if e1 > e0 {
                Win::rows(self.recs, rec_bytes, e0, e1)
            } else {
                word0(self.recs)
            };
            // Without a map the binding is a placeholder (the records themselves).
            let (map, map_at) = match self.map {
                Some(m) => words_win(m, r0, r1, ctx.binding_align()),
                None => (recs, r0),
            };
            let p = Params::new()
                .u32(total_words)
                .u32(total_bytes)
                .u32(row_bytes as u32)
                .u32(self.stride as u32)
                .u32(off as u32)
                .u32(self.map.is_none() as u32)
                .u32(r0 as u32)
                .u32(e0 as u32)
                .u32((e1 - e0) as u32)
                .u32(merge as u32)
                .u32((r0 - map_at) as u32);
            let bufs = [recs, map, Win::rows(dst_buf, rb, r0, r1)];
            self.rec
                .dispatch_win(&sh, p, &bufs, groups(total_words, 256))?;
        }
        Ok(())
    }
}

/// The first word of a buffer: the binding of a window that holds nothing.
fn word0(buf: &wgpu::Buffer) -> Win<'_> {
    Win {
        buf,
        offset: 0,
        size: 4.min(buf.size()),
    }
}

/// Words `[e0, e1)` of a buffer from an aligned offset, and the word the
/// window starts at (the first word when the range is empty).
fn words_win(buf: &wgpu::Buffer, e0: usize, e1: usize, align: u64) -> (Win<'_>, usize) {
    if e1 > e0 {
        Win::elems(buf, 4, e0, e1, align)
    } else {
        (word0(buf), 0)
    }
}

/// Rows that came back to be combined: records of `stride` words holding
/// `dtype` elements in entry order, and per output token the CSR list
/// `offs[t]..offs[t+1]` of its entries (entry `p` is record `p`, weighted
/// by weight index `wi[p]`).
struct Returned {
    dtype: DType,
    recs: Vec<u8>,
    stride: usize,
    offs: Vec<u32>,
    wi: Vec<u32>,
}

impl Returned {
    /// `recs` holds records in arrival order; `lists[t]` names token `t`'s
    /// (record, weight index) pairs. Every record is used at most once.
    fn new<T: Copy>(
        op: &'static str,
        dtype: DType,
        recs: &[u8],
        stride: usize,
        lists: &[Vec<T>],
        pair: impl Fn(T) -> [u32; 2],
    ) -> Result<Self> {
        let rec_bytes = stride * 4;
        let mut offs = Vec::with_capacity(lists.len() + 1);
        let mut wi = Vec::new();
        let mut ordered = Vec::with_capacity(recs.len());
        offs.push(0);
        for l in lists {
            for &e in l {
                let [r, w] = pair(e);
                let at = r as usize * rec_bytes;
                let rec = recs.get(at..at + rec_bytes).ok_or_else(|| {
                    Error::Other(format!("{op}: internal: record {r} out of range"))
                })?;
                ordered.extend_from_slice(rec);
                wi.push(w);
            }
            offs.push(u32_of(op, "combine entries", wi.len())?);
        }
        Ok(Returned {
            dtype,
            recs: ordered,
            stride,
            offs,
            wi,
        })
    }

    /// Windows of output tokens `[t0, t1)` whose bindings (output rows of
    /// `out_row` bytes, their records, CSR offsets and weight indices, and
    /// `k` weights per token when weighted) each fit one storage binding.
    fn plan(
        &self,
        w: &Wgpu,
        op: &'static str,
        out_row: u64,
        k: Option<usize>,
    ) -> Result<Vec<(usize, usize)>> {
        let ctx = &w.ctx;
        let (limit, align) = (ctx.max_binding(), ctx.binding_align());
        let n = self.offs.len() - 1;
        let granule =
            (align >> out_row.trailing_zeros().min(align.trailing_zeros())).max(1) as usize;
        let rec_bytes = self.stride as u64 * 4;
        let span = |e0: u64, e1: u64| {
            // Win::elems rounds the start down to the alignment.
            (e1 - e0) + e0 % align + 4
        };
        let fits = |t0: usize, t1: usize| {
            let (e0, e1) = (self.offs[t0] as u64, self.offs[t1] as u64);
            let mut ok = (t1 - t0) as u64 * out_row + 4 <= limit
                && span(e0 * rec_bytes, e1 * rec_bytes) <= limit
                && span(e0 * 4, e1 * 4) <= limit
                && span(t0 as u64 * 4, (t1 as u64 + 1) * 4) <= limit;
            if let Some(k) = k {
                let kb = k as u64 * 4;
                ok &= span(t0 as u64 * kb, t1 as u64 * kb) <= limit;
            }
            ok
        };
        let mut out = Vec::new();
        let mut t0 = 0;
        while t0 < n {
            if fits(t0, n) {
                out.push((t0, n));
                break;
            }
            let mut t1 = t0;
            while t1 + granule < n && fits(t0, t1 + granule) {
                t1 += granule;
            }
            if t1 == t0 {
                return Err(Error::not_supported(
                    "wgpu",
                    op.to_string(),
                    format!(
                        "the rows of {granule} output token(s) do not fit this adapter's storage binding limit of {limit} bytes"
                    ),
                ));
            }
            out.push((t0, t1));
            t0 = t1;
        }
        Ok(out)
    }

    /// Records the sums into `out [N, hidden]`, weighted by `weights` (f32,
    /// `[N, k]`, indexed by the entries' weight index) when given.
    fn sum(
        &self,
        w: &Wgpu,
        op: &'static str,
        out: &Tensor,
        hidden: usize,
        weights: Option<(&Tensor, usize)>,
    ) -> Result<()> {
        u32_of(op, "output elements", out.numel())?;
        u32_of(op, "returned bytes", self.recs.len())?;
        if out.numel() == 0 {
            return Ok(());
        }
        let out_row = (hidden * out.dtype().size()) as u64;
        let plan = self.plan(w, op, out_row, weights.map(|(_, k)| k))?;
        let recs = w.ctx.upload_bytes(op, &self.recs)?;
        let offs = upload_u32(w, op, &self.offs)?;
        let wi = upload_u32(w, op, &self.wi)?;
        let align = w.ctx.binding_align();
        let mut rec = w.ctx.begin(op)?;
        let dummy = rec.scratch(4)?;
        let code = crate::ctx::dtype_code(self.dtype)?;
        let sh = Shader::new("ep_combine", COMBINE_WGSL)
            .constant("WEIGHTED", weights.is_some())
            .constant("Y_DT", format!("{code}u"))
            .raw("recs", false)
            .raw("offs", false)
            .raw("wi", false)
            .input("w", DType::F32)
            .output("out", out.dtype())
            .per_word("out", "P.total");
        let per = 4 / out.dtype().size();
        let out_buf = buffer(out)?;
        let stride = self.stride;
        for (t0, t1) in plan {
            let (e0, e1) = (self.offs[t0] as usize, self.offs[t1] as usize);
            let (offs_w, ob) = Win::elems(&offs, 4, t0, t1 + 1, align);
            let (recs_w, rb) = words_win(&recs, e0 * stride, e1 * stride, align);
            let (wi_w, wb) = words_win(&wi, e0, e1, align);
            let (w_w, w_base) = match weights {
                Some((t, k)) => words_win(buffer(t)?, t0 * k, t1 * k, align),
                None => (Win::whole(&dummy), 0),
            };
            let total = ((t1 - t0) * hidden) as u32;
            let p = Params::new()
                .u32(total)
                .u32(u32_of(op, "hidden", hidden)?)
                .u32(stride as u32)
                .u32(0)
                .u32((t0 - ob) as u32)
                .u32(rb as u32)
                .u32(wb as u32)
                .u32(w_base as u32);
            rec.dispatch_win(
                &sh,
                p,
                &[
                    recs_w,
                    offs_w,
                    wi_w,
                    w_w,
                    Win::rows(out_buf, out_row, t0, t1),
                ],
                groups(total.div_ceil(per as u32), 256),
            )?;
        }
        rec.finish()
    }
}

// ---- messages -----------------------------------------------------------------------

const OK: u8 = 0;
const FAILED: u8 = 1;

const TAG_DISPATCH: u8 = 0xd1;
const TAG_COMBINE: u8 = 0xc1;
const TAG_LL_DISPATCH: u8 = 0xd2;
const TAG_LL_COMBINE: u8 = 0xc2;

/// An outgoing message (after the status byte).
struct Msg(Vec<u8>);

impl Msg {
    fn new(tag: u8) -> Self {
        Msg(vec![tag])
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// A bounds-checked reader of one received message.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    op: &'static str,
    me: usize,
    src: usize,
}

impl<'a> Rd<'a> {
    fn new(op: &'static str, me: usize, src: usize, buf: &'a [u8], tag: u8) -> Result<Self> {
        let mut rd = Rd {
            buf,
            pos: 0,
            op,
            me,
            src,
        };
        let t = rd.take(1)?[0];
        if t != tag {
            return Err(Error::Comm {
                rank: me,
                msg: format!(
                    "{op}: rank {src} sent a message of another operation (tag {t:#x}, expected {tag:#x}); \
                     all ranks must run the same collective"
                ),
            });
        }
        Ok(rd)
    }
    fn bad(&self, what: &str) -> Error {
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
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.bad("truncated")),
        }
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn usize(&mut self) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| self.bad("value too large"))
    }
    /// A row count whose rows need at least `row_bytes` each: rejects a count
    /// the rest of the message cannot hold (no huge allocation on garbage).
    fn count(&mut self, row_bytes: usize) -> Result<usize> {
        let n = self.usize()?;
        let left = self.buf.len() - self.pos;
        match n.checked_mul(row_bytes.max(1)) {
            Some(b) if b <= left => Ok(n),
            _ => Err(self.bad("row count exceeds the message")),
        }
    }
    fn done(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
    /// Fails unless the peer's parameter equals this rank's.
    fn agree(&mut self, arg: &'static str, what: &str, mine: u64) -> Result<()> {
        let theirs = self.u64()?;
        if theirs == mine {
            return Ok(());
        }
        Err(Error::invalid(
            self.op,
            arg,
            format!(
                "rank {} has {what} = {}, this rank has {}; all ranks must agree",
                self.src,
                shown(what, theirs),
                shown(what, mine)
            ),
        ))
    }
}

/// A parameter for an error message (dtypes by name).
fn shown(what: &str, v: u64) -> String {
    if what.contains("dtype") {
        if let Some(d) = usize::try_from(v).ok().and_then(|i| DType::ALL.get(i)) {
            return d.to_string();
        }
    }
    v.to_string()
}

fn wire_dtype(d: DType) -> u64 {
    DType::ALL
        .iter()
        .position(|&x| x == d)
        .map_or(u64::MAX, |p| p as u64)
}

/// The collective exchange. `local` is this rank's outgoing messages, or
/// the error that stopped it from building them: either way the rank takes
/// part, so its peers never wait on it. Returns the received messages
/// (status byte stripped), the local error, or an error naming a failed peer.
fn exchange(
    comm: &dyn Communicator,
    op: &'static str,
    local: Result<Vec<Msg>>,
) -> Result<Vec<Vec<u8>>> {
    let world = comm.world_size();
    let me = comm.rank();
    let local = local.and_then(|msgs| {
        if msgs.len() == world {
            Ok(msgs)
        } else {
            Err(Error::Other(format!(
                "{op}: internal: {} messages for {world} ranks",
                msgs.len()
            )))
        }
    });
    let send: Vec<Vec<u8>> = match &local {
        Ok(msgs) => msgs
            .iter()
            .map(|m| {
                let mut v = Vec::with_capacity(m.0.len() + 1);
                v.push(OK);
                v.extend_from_slice(&m.0);
                v
            })
            .collect(),
        Err(e) => {
            let mut v = vec![FAILED];
            v.extend_from_slice(e.to_string().as_bytes());
            vec![v; world]
        }
    };
    let got = comm.all_to_all_v(send);
    // A local failure wins over whatever the exchange reports.
    drop(local?);
    let got = got?;
    if got.len() != world {
        return Err(Error::Comm {
            rank: me,
            msg: format!(
                "{op}: all_to_all_v returned {} buffers for {world} ranks",
                got.len()
            ),
        });
    }
    got.into_iter()
        .enumerate()
        .map(|(src, mut buf)| match buf.first() {
            Some(&OK) => {
                buf.remove(0);
                Ok(buf)
            }
            Some(&FAILED) => Err(Error::Comm {
                rank: me,
                msg: format!(
                    "{op}: rank {src} failed: {}",
                    String::from_utf8_lossy(&buf[1..])
                ),
            }),
            _ => Err(Error::Comm {
                rank: me,
                msg: format!("{op}: rank {src} sent no status byte"),
            }),
        })
        .collect()
}

// ---- get_dispatch_layout --------------------------------------------------------------

fn get_dispatch_layout(w: &Wgpu, op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, k, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    let epr = experts_per_rank(OP, e, world)?;
    u32_of(OP, "topk_idx elements", n * k)?;
    u32_of(OP, "is_token_in_rank elements", n * world)?;
    let (e32, r32) = (u32_of(OP, "num_experts", e)?, world as u32);
    let k32 = u32_of(OP, "top-k", k)?;
    // Windows of tokens: rows of topk_idx and of is_token_in_rank.
    let (tb, ib) = ((k * a.topk_idx.dtype().size()) as u64, world as u64);
    let mut plan = w.ctx.plan_rows(OP, n, &[tb.max(1), ib.max(1)])?;
    if plan.is_empty() {
        plan.push((0, 0));
    }
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("topk_idx", a.topk_idx, 0, e as i64, Some(-1))?;
    // Every window is cleared before any is counted.
    for phase in [0u32, 1] {
        let sh = Shader::new("ep_layout", LAYOUT_WGSL)
            .constant("PHASE", format!("{phase}u"))
            .input("topk", a.topk_idx.dtype())
            .atomic_output("per_rank", DType::I32)
            .atomic_output("per_expert", DType::I32)
            .atomic_output("in_rank", DType::Bool);
        for &(t0, t1) in &plan {
            let rows = (t1 - t0) as u32;
            let in_rank_words = (rows * r32).div_ceil(4);
            let count = if phase == 0 {
                // The counts are cleared once, with the first window.
                let counts = if t0 == 0 { r32.max(e32) } else { 0 };
                counts.max(in_rank_words)
            } else {
                rows
            };
            let p = Params::new()
                .u32(rows)
                .u32(k32)
                .u32(if phase == 0 && t0 > 0 { 0 } else { e32 })
                .u32(if phase == 0 && t0 > 0 { 0 } else { r32 })
                .u32(epr as u32)
                .u32(in_rank_words);
            let (topk, in_rank) = if t1 > t0 {
                (
                    Win::rows(buffer(a.topk_idx)?, tb.max(1), t0, t1),
                    Win::rows(buffer(a.is_token_in_rank)?, ib.max(1), t0, t1),
                )
            } else {
                (
                    word0(buffer(a.topk_idx)?),
                    word0(buffer(a.is_token_in_rank)?),
                )
            };
            let bufs = [
                topk,
                Win::whole(buffer(a.num_tokens_per_rank)?),
                Win::whole(buffer(a.num_tokens_per_expert)?),
                in_rank,
            ];
            rec.dispatch_win(&sh, p, &bufs, groups(count, 256))?;
        }
    }
    rec.finish()
}

// ---- normal dispatch ----------------------------------------------------------------

/// Word offsets of a normal-dispatch record.
struct DispatchRecord {
    x_bytes: usize,
    s_bytes: usize,
    s_off: usize,
    id_off: usize,
    w_off: usize,
    stride: usize,
}

impl DispatchRecord {
    fn new(hidden: usize, dtype: DType, scales: bool, k: usize) -> Self {
        let x_bytes = hidden * dtype.size();
        let s_bytes = if scales { hidden / QBLOCK * 4 } else { 0 };
        let s_off = words(x_bytes);
        let id_off = s_off + s_bytes / 4;
        let w_off = id_off + k;
        DispatchRecord {
            x_bytes,
            s_bytes,
            s_off,
            id_off,
            w_off,
            stride: w_off + k,
        }
    }
}

fn dispatch(
    w: &Wgpu,
    comm: &dyn Communicator,
    op: &Checked<Dispatch<'_>>,
) -> Result<DispatchOutput> {
    const OP: &str = "dispatch";
    let (a, d) = (op.args(), op.dims());
    let (send, plan) = match dispatch_local(w, comm, a, d) {
        Ok((msgs, plan)) => (Ok(msgs), Some(plan)),
        Err(e) => (Err(e), None),
    };
    let recv = exchange(comm, OP, send)?;
    let send_plan =
        plan.ok_or_else(|| Error::Other(format!("{OP}: internal: no plan after the exchange")))?;
    dispatch_receive(w, comm, a, d, &recv, send_plan)
}

fn dispatch_header(m: &mut Msg, a: &Dispatch<'_>, d: &DispatchDims) {
    m.u64(wire_dtype(a.x.dtype()));
    m.usize(d.hidden);
    m.usize(d.topk);
    m.u64(a.x_scales.is_some() as u64);
    m.usize(d.num_experts);
}

type Plan = Vec<Vec<usize>>;

fn dispatch_local(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &Dispatch<'_>,
    d: &DispatchDims,
) -> Result<(Vec<Msg>, Plan)> {
    const OP: &str = "dispatch";
    let world = comm.world_size();
    let (n, k) = (d.tokens, d.topk);
    let epr = experts_per_rank(OP, d.num_experts, world)?;
    let topk = read_topk(w, OP, a.topk_idx, d.num_experts)?;
    let mut plan: Plan = vec![Vec::new(); world];
    let mut to = vec![false; world];
    for t in 0..n {
        to.iter_mut().for_each(|b| *b = false);
        for &g in &topk[t * k..(t + 1) * k] {
            if g >= 0 {
                to[g as usize / epr] = true;
            }
        }
        for (r, _) in to.iter().enumerate().filter(|(_, &b)| b) {
            plan[r].push(t);
        }
    }
    let rows: Vec<usize> = plan.concat();
    let lay = DispatchRecord::new(d.hidden, a.x.dtype(), a.x_scales.is_some(), k);
    let rec_bytes = lay.stride * 4;
    let packed = send_buffer(w, OP, &rows, lay.stride, |p| {
        p.field(buffer(a.x)?, n, lay.x_bytes, 0)?;
        if let Some(sc) = a.x_scales {
            p.field(buffer(sc)?, n, lay.s_bytes, lay.s_off)?;
        }
        p.ids(a.topk_idx, k, lay.id_off)?;
        p.field(buffer(a.topk_weights)?, n, 4 * k, lay.w_off)
    })?;
    let mut msgs = Vec::with_capacity(world);
    let mut at = 0;
    for tokens in &plan {
        let mut m = Msg::new(TAG_DISPATCH);
        dispatch_header(&mut m, a, d);
        m.usize(tokens.len());
        for &t in tokens {
            m.usize(t);
        }
        m.bytes(&packed[at * rec_bytes..(at + tokens.len()) * rec_bytes]);
        at += tokens.len();
        msgs.push(m);
    }
    Ok((msgs, plan))
}

fn dispatch_receive(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &Dispatch<'_>,
    d: &DispatchDims,
    recv: &[Vec<u8>],
    send_plan: Plan,
) -> Result<DispatchOutput> {
    const OP: &str = "dispatch";
    let me = comm.rank();
    let world = comm.world_size();
    let (hidden, k) = (d.hidden, d.topk);
    let epr = experts_per_rank(OP, d.num_experts, world)?;
    let dtype = a.x.dtype();
    let has_scales = a.x_scales.is_some();
    let lay = DispatchRecord::new(hidden, dtype, has_scales, k);
    let rec_bytes = lay.stride * 4;
    let mut recv_src = Vec::new();
    let mut recs: Vec<u8> = Vec::new();
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Rd::new(OP, me, src, buf, TAG_DISPATCH)?;
        rd.agree("x", "x dtype", wire_dtype(dtype))?;
        rd.agree("x", "hidden", hidden as u64)?;
        rd.agree("topk_idx", "top-k", k as u64)?;
        rd.agree("x_scales", "FP8 scales (1 = present)", has_scales as u64)?;
        rd.agree("num_experts", "num_experts", d.num_experts as u64)?;
        let m = rd.count(8 + rec_bytes)?;
        for _ in 0..m {
            recv_src.push((src, rd.usize()?));
        }
        recs.extend_from_slice(rd.take(m * rec_bytes)?);
        rd.done()?;
    }
    let m = recv_src.len();
    let groups_per_row = if has_scales { hidden / QBLOCK } else { 0 };
    let recv_x = w.alloc(dtype, &[m, hidden])?;
    let recv_scales = if has_scales {
        Some(w.alloc(DType::F32, &[m, groups_per_row])?)
    } else {
        None
    };
    let recv_topk_idx = w.alloc(DType::I64, &[m, k])?;
    let recv_topk_weights = w.alloc(DType::F32, &[m, k])?;
    let mut counts = vec![0usize; epr];
    if m > 0 {
        u32_of(OP, "received bytes", recs.len())?;
        u32_of(OP, "received rows", m)?;
        u32_of(OP, "received ids", m * k)?;
        let recs_buf = w.ctx.upload_bytes(OP, &recs)?;
        let s = lay.stride;
        let mut rec = w.ctx.begin(OP)?;
        let counts_buf = rec.scratch((epr * 4) as u64)?;
        let mut u = Unpack {
            rec: &mut rec,
            op: OP,
            recs: &recs_buf,
            nrecs: m,
            map: None,
            nrows: m,
            stride: s,
        };
        u.field(&recv_x, lay.x_bytes, 0)?;
        if let Some(sc) = &recv_scales {
            u.field(sc, lay.s_bytes, lay.s_off)?;
        }
        let sh = Shader::new("ep_unpack_meta", UNPACK_META_WGSL)
            .raw("recs", false)
            .raw("idx", true)
            .raw("wts", true)
            .atomic_output("counts", DType::I32);
        let lo = u32_of(OP, "expert id", me * epr)?;
        let rb = (s * 4) as u64;
        let align = w.ctx.binding_align();
        for (r0, r1) in w.ctx.plan_rows(OP, m, &[rb])? {
            let rows = (r1 - r0) as u32;
            let p = Params::new()
                .u32(rows)
                .u32(k as u32)
                .u32(s as u32)
                .u32(lay.id_off as u32)
                .u32(lay.w_off as u32)
                .u32(lo)
                .u32(epr as u32);
            let (idx, idx_at) = words_win(buffer(&recv_topk_idx)?, 2 * k * r0, 2 * k * r1, align);
            let (wts, wts_at) = words_win(buffer(&recv_topk_weights)?, k * r0, k * r1, align);
            let p = p
                .u32((2 * k * r0 - idx_at) as u32)
                .u32((k * r0 - wts_at) as u32);
            let bufs = [
                Win::rows(&recs_buf, rb, r0, r1),
                idx,
                wts,
                Win::whole(&counts_buf),
            ];
            rec.dispatch_win(&sh, p, &bufs, groups(rows, 256))?;
        }
        rec.finish()?;
        let c = w.ctx.read_bytes(OP, &counts_buf, (epr * 4) as u64)?;
        for (dst, b) in counts.iter_mut().zip(c.chunks_exact(4)) {
            *dst = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        }
    }
    let align = a.expert_alignment.max(1);
    Ok(DispatchOutput {
        recv_x,
        recv_scales,
        recv_topk_idx,
        recv_topk_weights,
        num_recv_tokens_per_expert: counts.iter().map(|c| c.div_ceil(align) * align).collect(),
        handle: DispatchHandle {
            rank: me,
            world_size: world,
            num_tokens: d.tokens,
            recv_src,
            send_plan,
            state: Default::default(),
        },
    })
}

// ---- normal combine -------------------------------------------------------------------

/// Fails unless a handle was made by a dispatch on this communicator.
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

fn combine(w: &Wgpu, comm: &dyn Communicator, op: &mut Checked<Combine<'_>>) -> Result<()> {
    const OP: &str = "combine";
    let (a, d) = op.parts();
    let send = combine_local(w, comm, a, d);
    let recv = exchange(comm, OP, send)?;
    combine_receive(w, comm, a, d, &recv)
}

fn combine_local(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &Combine<'_>,
    d: &CombineDims,
) -> Result<Vec<Msg>> {
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
    // Rows going back to each source rank, in receive order.
    let mut back: Vec<Vec<(usize, usize)>> = vec![Vec::new(); h.world_size];
    for (i, &(src, t)) in h.recv_src.iter().enumerate() {
        back.get_mut(src)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "handle",
                    format!(
                        "received row {i} names source rank {src} of {}",
                        h.world_size
                    ),
                )
            })?
            .push((i, t));
    }
    let row_bytes = d.hidden * a.x.dtype().size();
    let stride = words(row_bytes);
    let rows: Vec<usize> = back.iter().flatten().map(|&(i, _)| i).collect();
    let packed = send_buffer(w, OP, &rows, stride, |p| {
        p.field(buffer(a.x)?, a.x.numel() / d.hidden.max(1), row_bytes, 0)
    })?;
    let rec_bytes = stride * 4;
    let mut at = 0;
    Ok(back
        .iter()
        .map(|list| {
            let mut m = Msg::new(TAG_COMBINE);
            m.u64(wire_dtype(a.x.dtype()));
            m.usize(d.hidden);
            m.usize(list.len());
            for &(_, t) in list {
                m.usize(t);
            }
            m.bytes(&packed[at * rec_bytes..(at + list.len()) * rec_bytes]);
            at += list.len();
            m
        })
        .collect())
}

/// Builds the send buffer on the device: `fill` records the pack kernels
/// of `rows.len()` records of `stride` words (record `r` from source row
/// `rows[r]`); the buffer is then downloaded.
fn send_buffer(
    w: &Wgpu,
    op: &'static str,
    rows: &[usize],
    stride: usize,
    fill: impl FnOnce(&mut Pack<'_, '_>) -> Result<()>,
) -> Result<Vec<u8>> {
    let total = rows.len() * stride * 4;
    if total == 0 {
        return Ok(Vec::new());
    }
    u32_of(op, "send buffer bytes", total)?;
    let rows_buf = upload_u32(w, op, &u32_list(op, "row", rows)?)?;
    let mut rec = w.ctx.begin(op)?;
    let dst = rec.scratch(total as u64)?;
    fill(&mut Pack {
        rec: &mut rec,
        op,
        rows,
        rows_buf: &rows_buf,
        stride,
        dst: &dst,
    })?;
    rec.finish()?;
    w.ctx.read_bytes(op, &dst, total as u64)
}

fn combine_receive(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &Combine<'_>,
    d: &CombineDims,
    recv: &[Vec<u8>],
) -> Result<()> {
    const OP: &str = "combine";
    let me = comm.rank();
    let (n, hidden) = (d.tokens, d.hidden);
    let dtype = a.x.dtype();
    let stride = words(hidden * dtype.size());
    let rec_bytes = stride * 4;
    let mut per_token: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut recs: Vec<u8> = Vec::new();
    let mut next = 0usize;
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Rd::new(OP, me, src, buf, TAG_COMBINE)?;
        rd.agree("x", "x dtype", wire_dtype(dtype))?;
        rd.agree("x", "hidden", hidden as u64)?;
        let m = rd.count(8 + rec_bytes)?;
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
            per_token[t].push(u32_of(OP, "returned rows", next)?);
            next += 1;
        }
        recs.extend_from_slice(rd.take(m * rec_bytes)?);
        rd.done()?;
    }
    Returned::new(OP, dtype, &recs, stride, &per_token, |r| [r, 0])?.sum(w, OP, a.out, hidden, None)
}

// ---- low-latency dispatch ------------------------------------------------------------

fn low_latency_dispatch(
    w: &Wgpu,
    comm: &dyn Communicator,
    op: &Checked<LowLatencyDispatch<'_>>,
) -> Result<LowLatencyDispatchOutput> {
    const OP: &str = "low_latency_dispatch";
    let (a, d) = (op.args(), op.dims());
    let send = ll_dispatch_local(w, comm, a, d);
    let recv = exchange(comm, OP, send)?;
    ll_dispatch_receive(w, comm, a, d, &recv)
}

/// Payload of a low-latency record: (payload bytes, scale bytes, stride words).
fn ll_payload(a: &LowLatencyDispatch<'_>, hidden: usize) -> (usize, usize, usize) {
    if a.use_fp8 {
        let (x, s) = (hidden, hidden / QBLOCK * 4);
        (x, s, words(x) + s / 4)
    } else {
        let x = hidden * a.x.dtype().size();
        (x, 0, words(x))
    }
}

fn ll_dispatch_local(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &LowLatencyDispatch<'_>,
    d: &LowLatencyDims,
) -> Result<Vec<Msg>> {
    const OP: &str = "low_latency_dispatch";
    let world = comm.world_size();
    let (n, hidden, k, e) = (d.tokens, d.hidden, d.topk, d.num_experts);
    let epr = experts_per_rank(OP, e, world)?;
    let topk = read_topk(w, OP, a.topk_idx, e)?;
    // One entry per (token, k) with an expert, in (token, k) order.
    let mut per_dst: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
    for t in 0..n {
        for &g in &topk[t * k..(t + 1) * k] {
            if g >= 0 {
                per_dst[g as usize / epr].push((t, g as usize));
            }
        }
    }
    let rows: Vec<usize> = per_dst.iter().flatten().map(|&(t, _)| t).collect();
    let (x_bytes, s_bytes, stride) = ll_payload(a, hidden);
    let rec_bytes = stride * 4;
    let packed = send_buffer(w, OP, &rows, stride, |p| {
        if !a.use_fp8 {
            return p.field(buffer(a.x)?, n, x_bytes, 0);
        }
        // act_quant (SPEC.md §2) of every token on the device.
        u32_of(OP, "quantization groups", n * (hidden / QBLOCK))?;
        u32_of(OP, "x elements", n * hidden)?;
        let q = p.rec.scratch((n * hidden) as u64)?;
        let s = p.rec.scratch((n * s_bytes) as u64)?;
        let sh = Shader::new("act_quant", ACT_QUANT_WGSL)
            .workgroup_size(128)
            .input("x", a.x.dtype())
            .output("q", DType::F8E4M3)
            .output("s", DType::F32);
        let g = hidden / QBLOCK;
        let xb = (hidden * a.x.dtype().size()) as u64;
        let (qb, sb) = (hidden as u64, s_bytes as u64);
        let ctx = p.rec.ctx();
        for (r0, r1) in ctx.plan_rows(OP, if g > 0 { n } else { 0 }, &[xb, qb, sb])? {
            let ng = ((r1 - r0) * g) as u32;
            let prm = Params::new().u32(ng).f32(448.0).u32(a.ue8m0 as u32);
            let bufs = [
                Win::rows(buffer(a.x)?, xb, r0, r1),
                Win::rows(&q, qb, r0, r1),
                Win::rows(&s, sb, r0, r1),
            ];
            p.rec.dispatch_win(&sh, prm, &bufs, ng)?;
        }
        p.field(&q, n, x_bytes, 0)?;
        p.field(&s, n, s_bytes, words(x_bytes))
    })?;
    let mut at = 0;
    Ok(per_dst
        .iter()
        .map(|entries| {
            let mut m = Msg::new(TAG_LL_DISPATCH);
            m.usize(hidden);
            m.usize(e);
            m.usize(a.max_tokens_per_rank);
            m.u64(a.use_fp8 as u64);
            m.u64(wire_dtype(a.x.dtype()));
            m.usize(entries.len());
            for &(t, g) in entries {
                m.usize(t);
                m.usize(g);
            }
            m.bytes(&packed[at * rec_bytes..(at + entries.len()) * rec_bytes]);
            at += entries.len();
            m
        })
        .collect())
}

fn ll_dispatch_receive(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &LowLatencyDispatch<'_>,
    d: &LowLatencyDims,
    recv: &[Vec<u8>],
) -> Result<LowLatencyDispatchOutput> {
    const OP: &str = "low_latency_dispatch";
    let me = comm.rank();
    let world = comm.world_size();
    let hidden = d.hidden;
    let epr = experts_per_rank(OP, d.num_experts, world)?;
    let cap = a.max_tokens_per_rank * world;
    let (x_bytes, s_bytes, stride) = ll_payload(a, hidden);
    let rec_bytes = stride * 4;
    let lo = me * epr;
    let mut recv_src: Vec<Vec<(usize, usize)>> = vec![Vec::new(); epr];
    let mut map = vec![NONE; epr * cap];
    let mut recs: Vec<u8> = Vec::new();
    let mut next = 0usize;
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Rd::new(OP, me, src, buf, TAG_LL_DISPATCH)?;
        rd.agree("x", "hidden", hidden as u64)?;
        rd.agree("num_experts", "num_experts", d.num_experts as u64)?;
        rd.agree(
            "max_tokens_per_rank",
            "max_tokens_per_rank",
            a.max_tokens_per_rank as u64,
        )?;
        rd.agree("use_fp8", "use_fp8 (1 = on)", a.use_fp8 as u64)?;
        rd.agree("x", "x dtype", wire_dtype(a.x.dtype()))?;
        let m = rd.count(16 + rec_bytes)?;
        for _ in 0..m {
            let t = rd.usize()?;
            let g = rd.usize()?;
            if g < lo || g >= lo + epr {
                return Err(rd.bad("expert not on this rank"));
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
            map[l * cap + slot] = u32_of(OP, "received rows", next)?;
            next += 1;
        }
        recs.extend_from_slice(rd.take(m * rec_bytes)?);
        rd.done()?;
    }
    let groups_per_row = hidden / QBLOCK;
    let dtype = if a.use_fp8 {
        DType::F8E4M3
    } else {
        a.x.dtype()
    };
    let recv_x = w.alloc(dtype, &[epr, cap, hidden])?;
    let recv_scales = if a.use_fp8 {
        Some(w.alloc(DType::F32, &[epr, cap, groups_per_row])?)
    } else {
        None
    };
    if epr * cap * hidden > 0 {
        u32_of(OP, "received bytes", recs.len())?;
        let recs_buf = w.ctx.upload_bytes(OP, &recs)?;
        let map_buf = upload_u32(w, OP, &map)?;
        let mut rec = w.ctx.begin(OP)?;
        let mut u = Unpack {
            rec: &mut rec,
            op: OP,
            recs: &recs_buf,
            nrecs: next,
            map: Some(&map_buf),
            nrows: epr * cap,
            stride,
        };
        u.field(&recv_x, x_bytes, 0)?;
        if let Some(sc) = &recv_scales {
            u.field(sc, s_bytes, words(x_bytes))?;
        }
        rec.finish()?;
    }
    let counts: Vec<i32> = recv_src.iter().map(|v| v.len() as i32).collect();
    let recv_count = w.upload(&HostTensor::from_i32(&[epr], &counts))?;
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
            state: Default::default(),
        },
    })
}

// ---- low-latency combine --------------------------------------------------------------

fn low_latency_combine(
    w: &Wgpu,
    comm: &dyn Communicator,
    op: &mut Checked<LowLatencyCombine<'_>>,
) -> Result<()> {
    const OP: &str = "low_latency_combine";
    let (a, d) = op.parts();
    let (send, topk) = match ll_combine_local(w, comm, a) {
        Ok((msgs, topk)) => (Ok(msgs), topk),
        Err(e) => (Err(e), Vec::new()),
    };
    let recv = exchange(comm, OP, send)?;
    ll_combine_receive(w, comm, a, d, &recv, &topk)
}

fn ll_combine_local(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &LowLatencyCombine<'_>,
) -> Result<(Vec<Msg>, Vec<i64>)> {
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
    let topk = read_topk(w, OP, a.topk_idx, h.num_experts)?;
    // (token, global expert, slot row) per source rank, in slot order.
    let mut per_src: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); h.world_size];
    for (l, slots) in h.recv_src.iter().enumerate() {
        for (slot, &(src, t)) in slots.iter().enumerate() {
            per_src
                .get_mut(src)
                .ok_or_else(|| {
                    Error::invalid(
                        OP,
                        "handle",
                        format!("a slot names source rank {src} of {}", h.world_size),
                    )
                })?
                .push((t, h.rank * epr + l, l * cap + slot));
        }
    }
    let row_bytes = h.hidden * a.x.dtype().size();
    let stride = words(row_bytes);
    let rows: Vec<usize> = per_src.iter().flatten().map(|&(_, _, r)| r).collect();
    let packed = send_buffer(w, OP, &rows, stride, |p| {
        p.field(buffer(a.x)?, a.x.numel() / h.hidden.max(1), row_bytes, 0)
    })?;
    let rec_bytes = stride * 4;
    let mut at = 0;
    let msgs = per_src
        .iter()
        .map(|list| {
            let mut m = Msg::new(TAG_LL_COMBINE);
            m.u64(wire_dtype(a.x.dtype()));
            m.usize(h.hidden);
            m.usize(list.len());
            for &(t, g, _) in list {
                m.usize(t);
                m.usize(g);
            }
            m.bytes(&packed[at * rec_bytes..(at + list.len()) * rec_bytes]);
            at += list.len();
            m
        })
        .collect();
    Ok((msgs, topk))
}

fn ll_combine_receive(
    w: &Wgpu,
    comm: &dyn Communicator,
    a: &LowLatencyCombine<'_>,
    d: &LowLatencyDims,
    recv: &[Vec<u8>],
    topk: &[i64],
) -> Result<()> {
    const OP: &str = "low_latency_combine";
    let me = comm.rank();
    let (n, hidden, k) = (d.tokens, d.hidden, d.topk);
    let dtype = a.x.dtype();
    let stride = words(hidden * dtype.size());
    let rec_bytes = stride * 4;
    let mut rows: HashMap<(usize, usize), VecDeque<u32>> = HashMap::new();
    let mut recs: Vec<u8> = Vec::new();
    let mut next = 0usize;
    for (src, buf) in recv.iter().enumerate() {
        let mut rd = Rd::new(OP, me, src, buf, TAG_LL_COMBINE)?;
        rd.agree("x", "x dtype", wire_dtype(dtype))?;
        rd.agree("x", "hidden", hidden as u64)?;
        let m = rd.count(16 + rec_bytes)?;
        for _ in 0..m {
            let t = rd.usize()?;
            let g = rd.usize()?;
            rows.entry((t, g))
                .or_default()
                .push_back(u32_of(OP, "returned rows", next)?);
            next += 1;
        }
        recs.extend_from_slice(rd.take(m * rec_bytes)?);
        rd.done()?;
    }
    if topk.len() != n * k {
        return Err(Error::Other(format!(
            "{OP}: internal: {} expert ids for [{n}, {k}]",
            topk.len()
        )));
    }
    let mut per_token: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n];
    for (t, list) in per_token.iter_mut().enumerate() {
        for j in 0..k {
            let g = topk[t * k + j];
            if g < 0 {
                continue;
            }
            let r = rows
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
            list.push((r, u32_of(OP, "topk_weights elements", t * k + j)?));
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
    Returned::new(OP, dtype, &recs, stride, &per_token, |(r, wi)| [r, wi])?.sum(
        w,
        OP,
        a.out,
        hidden,
        Some((a.topk_weights, k)),
    )
}
