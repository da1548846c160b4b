//! Expert parallelism (SPEC §7) on groups of 2 and 4 in-process ranks over
//! core's `ThreadComm`, each rank its own instance of the backend under
//! test, against a group of `cpu-ref` ranks on the same inputs; and
//! `get_dispatch_layout`, the local op behind it.
//!
//! Judged: layouts, counts, handles and payloads exact (dispatch rows in the
//! same order as cpu-ref; low-latency rows keyed by (source rank, source
//! token) per local expert, since slot order is undefined); combine within
//! `calc_diff < 5e-6` of cpu-ref and, for bf16 outputs, within one bf16 ulp
//! of it per element; a second run of every case bit-identical to the
//! first; a bad expert id is `IndexOutOfRange` on its rank and a prompt
//! error on the others. Groups mixing two backends
//! ([`mixed_dispatch_and_combine`], [`mixed_low_latency`]) must behave as a
//! cpu-ref group.
//!
//! The `check_*` and `run_*` functions take any group, so a backend's own
//! tests can run them with settings that stress its kernels.

use crate::compare::calc_diff;
use crate::harness::{self, skip, Harness};
use crate::Rng;
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::comm::{run_ranks, ThreadComm};
use deepport_core::formats::{e4m3_to_f32, round_bf16, ulp_bf16};
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This module's PRNG streams.
fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x5eed_cafe)
}

/// Experts in every group (16: 8 per rank on 2 ranks, 4 on 4).
pub const E: usize = 16;
/// Experts per token.
pub const K: usize = 4;
/// `max_tokens_per_rank` of the low-latency cases.
pub const MAX_TOKENS: usize = 10;

/// `world` cpu-ref ranks (one instance: host memory).
pub fn cpu_ranks(world: usize) -> Vec<&'static dyn Backend> {
    vec![&CpuRef as &dyn Backend; world]
}

/// References to the backends of a group.
pub fn refs(v: &[Arc<dyn Backend>]) -> Vec<&dyn Backend> {
    v.iter().map(|b| &**b).collect()
}

/// One rank's tokens.
#[derive(Clone)]
#[allow(missing_docs)]
pub struct Input {
    pub n: usize,
    pub hidden: usize,
    /// `[n, hidden]`, bf16-representable; magnitudes vary per 128-group and
    /// token 0's first group is all zero (act_quant's 1e-4 clamp).
    pub x: Vec<f32>,
    /// `[n, K]`, −1 = none.
    pub topk: Vec<i64>,
    /// `[n, K]`.
    pub w: Vec<f32>,
}

/// Rank `rank`'s tokens: `n` tokens of width `hidden`; `dups` repeats an
/// expert inside some tokens' top-k.
fn input(rank: usize, n: usize, hidden: usize, dups: bool, seed: u64) -> Input {
    let mut rng = rng(seed * 31 + rank as u64);
    let mut x = Vec::with_capacity(n * hidden);
    for t in 0..n {
        for i in 0..hidden {
            let g = i / 128;
            let v = if t == 0 && g == 0 {
                0.0
            } else {
                let mag = [0.003, 1.0, 37.0, 0.4][(t + g) % 4];
                ((rng.uniform() * 2.0 - 1.0) * mag) as f32
            };
            x.push(round_bf16(v));
        }
    }
    let mut topk = Vec::with_capacity(n * K);
    for t in 0..n {
        let mut experts: Vec<i64> = (0..E as i64).collect();
        for j in 0..K {
            let p = j + rng.below(E - j);
            experts.swap(j, p);
        }
        let mut row = experts[..K].to_vec();
        if t % 3 == 1 {
            row[t % K] = -1;
        }
        if dups && t % 4 == 2 {
            row[3] = row[0];
        }
        if t % 7 == 4 {
            row = vec![-1; K]; // a token sent nowhere
        }
        topk.extend(row);
    }
    let w = (0..n * K)
        .map(|_| (rng.uniform() * 0.9 + 0.05) as f32)
        .collect();
    Input {
        n,
        hidden,
        x,
        topk,
        w,
    }
}

/// The tokens of every rank: `ns[r]` tokens on rank `r`.
pub fn inputs(ns: &[usize], hidden: usize, dups: bool, seed: u64) -> Vec<Input> {
    ns.iter()
        .enumerate()
        .map(|(r, &n)| input(r, n, hidden, dups, seed))
        .collect()
}

fn index_dtype(rank: usize) -> DType {
    if rank.is_multiple_of(2) {
        DType::I64
    } else {
        DType::I32
    }
}

/// Runs `f` on R ranks (rank r on `bs[r]`), each rank's result kept apart.
fn on_ranks<T: Send>(
    bs: &[&dyn Backend],
    f: impl Fn(usize, &dyn Backend, &ThreadComm) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    run_ranks(bs.len(), |r, comm| Ok(f(r, bs[r], comm)))
        .unwrap_or_else(|e| panic!("a rank thread failed: {e}"))
}

/// Every rank's result, or `None` (recorded as skipped) when a rank
/// answers `NotSupported`; any other error fails.
fn all_ok<T>(bs: &[&dyn Backend], v: Vec<Result<T>>, what: &str) -> Option<Vec<T>> {
    if let Some((r, e)) = v.iter().enumerate().find_map(|(r, x)| match x {
        Err(e @ Error::NotSupported { .. }) => Some((r, e)),
        _ => None,
    }) {
        skip(bs[r].name(), what, e);
        return None;
    }
    Some(
        v.into_iter()
            .enumerate()
            .map(|(r, x)| x.unwrap_or_else(|e| panic!("{what}: rank {r}: {e}")))
            .collect(),
    )
}

/// bf16 elements differ by at most one bf16 ulp of cpu-ref's value.
fn assert_within_ulp(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = g.to_bits() == w.to_bits() || (g - w).abs() <= ulp_bf16(w);
        assert!(ok, "{what}: element {i}: got {g}, cpu-ref {w}");
    }
}

// ---- get_dispatch_layout ----------------------------------------------------------

/// The three outputs of `get_dispatch_layout`, as bytes.
#[allow(missing_docs)]
#[derive(PartialEq, Eq, Debug)]
pub struct Layout {
    pub per_rank: Vec<u8>,
    pub per_expert: Vec<u8>,
    pub in_rank: Vec<u8>,
}

/// `get_dispatch_layout` of `topk` (`[n, K]`) for 4 ranks, over poisoned
/// outputs.
pub fn run_layout(b: &dyn Backend, topk: &[i64], n: usize, dtype: DType) -> Result<Layout> {
    const R: usize = 4;
    let t = b.upload(&HostTensor::from_index(dtype, &[n, K], topk))?;
    // Poisoned outputs: a word the kernel forgets shows up.
    let mut pr = alloc_poisoned(b, DType::I32, &[R])?;
    let mut pe = alloc_poisoned(b, DType::I32, &[E])?;
    let mut ir = alloc_poisoned(b, DType::Bool, &[n, R])?;
    harness::run(
        b,
        GetDispatchLayout {
            topk_idx: &t,
            num_tokens_per_rank: &mut pr,
            num_tokens_per_expert: &mut pe,
            is_token_in_rank: &mut ir,
            num_experts: E,
            world_size: R,
        },
    )?;
    b.synchronize()?;
    Ok(Layout {
        per_rank: b.download(&pr)?.into_bytes(),
        per_expert: b.download(&pe)?.into_bytes(),
        in_rank: b.download(&ir)?.into_bytes(),
    })
}

/// `get_dispatch_layout` equals cpu-ref's (and a hand-computed example)
/// byte for byte, over poisoned outputs.
pub fn layout_matches_cpu_ref(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let b: &dyn Backend = &*bk;
    if let Err(e @ Error::NotSupported { .. }) = run_layout(b, &[0, 1, 2, 3], 1, DType::I64) {
        return skip(b.name(), "get_dispatch_layout", &e);
    }
    let mut cases: Vec<(Vec<i64>, usize)> = Vec::new();
    for inp in inputs(&[5, 0, 9, 3], 128, true, 1) {
        cases.push((inp.topk, inp.n));
    }
    // Many tokens (more than one GPU workgroup), with duplicates and −1 entries.
    let big = input(0, 700, 1, true, 2);
    cases.push((big.topk, big.n));
    // By hand: experts 4r..4r+3 live on rank r.
    cases.push((
        vec![0, 1, 5, -1, -1, -1, -1, -1, 15, 14, 13, 12, 7, 7, 7, 7],
        4,
    ));
    for (i, (topk, n)) in cases.iter().enumerate() {
        for dtype in [DType::I64, DType::I32] {
            let got = run_layout(b, topk, *n, dtype).unwrap();
            let want = run_layout(&CpuRef, topk, *n, dtype).unwrap();
            let what = format!("case {i} ({dtype})");
            assert_eq!(got.per_rank, want.per_rank, "{what}: num_tokens_per_rank");
            assert_eq!(
                got.per_expert, want.per_expert,
                "{what}: num_tokens_per_expert"
            );
            assert_eq!(got.in_rank, want.in_rank, "{what}: is_token_in_rank");
        }
    }
    // The hand example, written out.
    let got = run_layout(b, &cases.last().unwrap().0, 4, DType::I64).unwrap();
    let i32s = |v: &[i32]| HostTensor::from_i32(&[v.len()], v).into_bytes();
    assert_eq!(got.per_rank, i32s(&[1, 2, 0, 1]));
    let mut pe = [0i32; E];
    for e in [0, 1, 5, 12, 13, 14, 15] {
        pe[e] = 1;
    }
    pe[7] = 1;
    assert_eq!(got.per_expert, i32s(&pe));
    assert_eq!(
        got.in_rank,
        vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    );
}

/// An expert id outside `[0, E)` other than −1 is `IndexOutOfRange` (at the
/// call or the next synchronize), reported once.
pub fn layout_rejects_out_of_range_expert(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let b: &dyn Backend = &*bk;
    if let Err(e @ Error::NotSupported { .. }) = run_layout(b, &[0, 1, 2, 3], 1, DType::I64) {
        return skip(b.name(), "get_dispatch_layout", &e);
    }
    for (bad, dtype) in [(16i64, DType::I64), (-2, DType::I32), (1 << 40, DType::I64)] {
        let mut topk = vec![0i64, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1];
        topk[6] = bad;
        match run_layout(b, &topk, 3, dtype) {
            Err(Error::IndexOutOfRange {
                arg,
                position,
                value,
                ..
            }) => {
                assert_eq!(arg, "topk_idx");
                assert_eq!(position, vec![1, 2]);
                assert_eq!(value, bad);
            }
            other => panic!(
                "expected IndexOutOfRange for {bad}, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // The error was reported once; the backend works afterwards.
    let got = run_layout(b, &[0, 4, 8, 12], 1, DType::I32).unwrap();
    assert_eq!(got.in_rank, vec![1, 1, 1, 1]);
}

// ---- normal dispatch / combine ----------------------------------------------------------

#[derive(Clone, Copy, Debug)]
/// The `x` of a normal dispatch.
pub enum Payload {
    /// bf16 or f32 rows.
    Float(DType),
    /// e4m3 codes (any byte, NaN codes included) and f32 scales.
    Fp8,
}

/// What a normal dispatch (and combine) produced on one rank.
#[allow(missing_docs)]
pub struct DispatchRes {
    pub recv_x: HostTensor,
    pub recv_scales: Option<HostTensor>,
    pub idx: HostTensor,
    pub wts: HostTensor,
    pub counts: Vec<usize>,
    pub handle: DispatchHandle,
    pub combined: Option<HostTensor>,
}

/// Receiver-dependent factor applied before combining.
fn combine_factor(rank: usize) -> f32 {
    [1.0, -0.5, 2.0, 0.75][rank % 4]
}

/// The x tensors of rank `r` for `payload` (FP8: bytes and scales drawn from
/// the rank's seed).
fn x_host(inp: &Input, payload: Payload, rank: usize) -> (HostTensor, Option<HostTensor>) {
    let (n, h) = (inp.n, inp.hidden);
    match payload {
        Payload::Float(dt) => (HostTensor::from_f32(dt, &[n, h], &inp.x), None),
        Payload::Fp8 => {
            let mut rng = rng(77 + rank as u64);
            let q = rng.bytes(n * h);
            let s: Vec<f32> = (0..n * h / 128)
                .map(|_| (rng.uniform() * 0.01) as f32)
                .collect();
            (
                HostTensor::from_bytes(DType::F8E4M3, &[n, h], q).unwrap(),
                Some(HostTensor::from_f32(DType::F32, &[n, h / 128], &s)),
            )
        }
    }
}

/// Dispatches on R ranks of `bs`; with `combine = Some((y dtype, out
/// dtype))`, combines the received rows times `combine_factor(rank)`.
pub fn run_dispatch(
    bs: &[&dyn Backend],
    all: &[Input],
    payload: Payload,
    align: usize,
    combine: Option<(DType, DType)>,
) -> Option<Vec<DispatchRes>> {
    let res = on_ranks(bs, |rank, b, comm| {
        let inp = &all[rank];
        let (xh, sh) = x_host(inp, payload, rank);
        let x = b.upload(&xh)?;
        let s = sh.map(|s| b.upload(&s)).transpose()?;
        let topk = b.upload(&HostTensor::from_index(
            index_dtype(rank),
            &[inp.n, K],
            &inp.topk,
        ))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let out = ops::dispatch(
            b,
            comm,
            Dispatch {
                x: &x,
                x_scales: s.as_ref(),
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: align,
            },
        )?;
        let recv_x = b.download(&out.recv_x)?;
        let combined = match combine {
            None => None,
            Some((ydt, odt)) => {
                let m = out.handle.recv_src.len();
                let c = combine_factor(rank);
                let y: Vec<f32> = recv_x.to_f32_vec().iter().map(|v| v * c).collect();
                let y = b.upload(&HostTensor::from_f32(ydt, &[m, inp.hidden], &y))?;
                let mut o = alloc_poisoned(b, odt, &[inp.n, inp.hidden])?;
                ops::combine(
                    b,
                    comm,
                    Combine {
                        x: &y,
                        handle: &out.handle,
                        out: &mut o,
                    },
                )?;
                Some(b.download(&o)?)
            }
        };
        Ok(DispatchRes {
            recv_x,
            recv_scales: out
                .recv_scales
                .as_ref()
                .map(|t| b.download(t))
                .transpose()?,
            idx: b.download(&out.recv_topk_idx)?,
            wts: b.download(&out.recv_topk_weights)?,
            counts: out.num_recv_tokens_per_expert.clone(),
            handle: out.handle.clone(),
            combined,
        })
    });
    all_ok(bs, res, "dispatch")
}

/// Dispatch results equal bit for bit (rows in order, scales, local ids,
/// weights, counts, handles).
pub fn assert_dispatch_eq(got: &[DispatchRes], want: &[DispatchRes], what: &str) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let what = format!("{what}, rank {r}");
        assert_eq!(g.handle, w.handle, "{what}: handle");
        assert_eq!(g.recv_x.dtype(), w.recv_x.dtype(), "{what}: recv_x dtype");
        assert_eq!(g.recv_x.shape(), w.recv_x.shape(), "{what}: recv_x shape");
        let row = w.recv_x.shape()[1] * w.recv_x.dtype().size();
        if let Some(i) = (0..w.handle.recv_src.len()).find(|&i| {
            g.recv_x.bytes()[i * row..(i + 1) * row] != w.recv_x.bytes()[i * row..(i + 1) * row]
        }) {
            panic!(
                "{what}: recv_x row {i} (from {:?}) differs",
                w.handle.recv_src[i]
            );
        }
        match (&g.recv_scales, &w.recv_scales) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert_eq!(a.shape(), b.shape(), "{what}: recv_scales shape");
                assert_eq!(a.bytes(), b.bytes(), "{what}: recv_scales");
            }
            _ => panic!("{what}: recv_scales present on one side only"),
        }
        assert_eq!(g.idx.dtype(), DType::I64, "{what}: recv_topk_idx dtype");
        assert_eq!(g.idx.shape(), w.idx.shape(), "{what}: recv_topk_idx shape");
        assert_eq!(
            g.idx.to_i64_vec(),
            w.idx.to_i64_vec(),
            "{what}: recv_topk_idx"
        );
        assert_eq!(
            g.wts.shape(),
            w.wts.shape(),
            "{what}: recv_topk_weights shape"
        );
        assert_eq!(
            g.wts.bytes(),
            w.wts.bytes(),
            "{what}: recv_topk_weights bits"
        );
        assert_eq!(g.counts, w.counts, "{what}: num_recv_tokens_per_expert");
    }
}

/// Combined outputs: calc_diff < 5e-6 and, for bf16, one bf16 ulp per
/// element; for f32, within the f32 accumulation bound of ≤ R terms of
/// total magnitude ≤ 4.5·|x|.
pub fn assert_combined_close(got: &[DispatchRes], want: &[DispatchRes], all: &[Input], what: &str) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.combined.as_ref().unwrap(), w.combined.as_ref().unwrap());
        let what = format!("{what}, rank {r}");
        assert_eq!(g.dtype(), w.dtype());
        assert_eq!(g.shape(), w.shape(), "{what}: shape");
        let (gv, wv) = (g.to_f32_vec(), w.to_f32_vec());
        let d = calc_diff(&gv, &wv);
        assert!(d < 5e-6, "{what}: calc_diff {d}");
        if g.dtype() == DType::BF16 {
            assert_within_ulp(&gv, &wv, &what);
        } else {
            for (i, (&a, &b)) in gv.iter().zip(&wv).enumerate() {
                let bound = got.len() as f32 * 2f32.powi(-24) * 4.5 * all[r].x[i].abs();
                assert!(
                    (a - b).abs() <= bound,
                    "{what}: element {i}: {a} vs cpu-ref {b}"
                );
            }
        }
    }
}

/// Normal dispatch + combine on `group` (bf16 and f32 payloads, bf16 and
/// f32 combines, several alignments): equal to a cpu-ref group, and a
/// second run bit-identical. `false` when skipped (`NotSupported`).
pub fn check_dispatch_and_combine(group: &[&dyn Backend], label: &str) -> bool {
    let world = group.len();
    let cpu = cpu_ranks(world);
    // hidden 131: odd bf16 rows (not word-aligned); rank 1 has no tokens.
    for (ns, hidden, payload, align, combine) in [
        (
            [5, 0, 9, 3],
            131,
            Payload::Float(DType::BF16),
            1,
            (DType::BF16, DType::BF16),
        ),
        (
            [5, 0, 9, 3],
            256,
            Payload::Float(DType::BF16),
            4,
            (DType::BF16, DType::F32),
        ),
        (
            [4, 7, 0, 2],
            129,
            Payload::Float(DType::F32),
            3,
            (DType::F32, DType::BF16),
        ),
        (
            [3, 6, 1, 0],
            64,
            Payload::Float(DType::F32),
            2,
            (DType::F32, DType::F32),
        ),
        // Many received rows (more than one GPU workgroup).
        (
            [300, 0, 40, 280],
            128,
            Payload::Float(DType::BF16),
            128,
            (DType::BF16, DType::BF16),
        ),
    ] {
        let ns = &ns[..world];
        let all = inputs(ns, hidden, true, hidden as u64);
        let what = format!(
            "{label}: {ns:?} hidden {hidden} {payload:?} align {align} combine {combine:?}"
        );
        let Some(got) = run_dispatch(group, &all, payload, align, Some(combine)) else {
            return false;
        };
        let want = run_dispatch(&cpu, &all, payload, align, Some(combine)).expect("cpu-ref");
        assert_dispatch_eq(&got, &want, &what);
        assert_combined_close(&got, &want, &all, &what);
        let again = run_dispatch(group, &all, payload, align, Some(combine)).expect("ran before");
        assert_dispatch_eq(&again, &got, &format!("{what}, second run"));
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert_same_bits(
                a.combined.as_ref(),
                g.combined.as_ref(),
                &format!("{what}, rank {r}, second run"),
            );
        }
    }
    true
}

/// Combined outputs of two runs, bit for bit.
pub fn assert_same_bits(got: Option<&HostTensor>, want: Option<&HostTensor>, what: &str) {
    let (g, w) = (got.expect("combined"), want.expect("combined"));
    assert_eq!(g.shape(), w.shape(), "{what}: shape");
    assert!(g.bytes() == w.bytes(), "{what}: combined bits differ");
}

/// FP8 dispatch on `group` moves the sender's bytes (NaN codes included)
/// and scales, bit for bit, as a cpu-ref group does.
pub fn check_fp8_dispatch(group: &[&dyn Backend], label: &str) {
    let world = group.len();
    let cpu = cpu_ranks(world);
    for ns in [[5, 0, 9, 3], [0, 0, 0, 4]] {
        let ns = &ns[4 - world..];
        let all = inputs(ns, 384, false, 5);
        let Some(got) = run_dispatch(group, &all, Payload::Fp8, 2, None) else {
            return;
        };
        let want = run_dispatch(&cpu, &all, Payload::Fp8, 2, None).expect("cpu-ref");
        assert_dispatch_eq(&got, &want, &format!("{label}: fp8 {ns:?}"));
        // The payload is the sender's bytes (NaN codes included).
        for (r, g) in got.iter().enumerate() {
            for (i, &(s, t)) in g.handle.recv_src.iter().enumerate() {
                let (xs, ss) = x_host(&all[s], Payload::Fp8, s);
                let h = 384;
                assert_eq!(
                    g.recv_x.bytes()[i * h..(i + 1) * h],
                    xs.bytes()[t * h..(t + 1) * h],
                    "rank {r} row {i}"
                );
                let sb = 4 * h / 128;
                assert_eq!(
                    g.recv_scales.as_ref().unwrap().bytes()[i * sb..(i + 1) * sb],
                    ss.unwrap().bytes()[t * sb..(t + 1) * sb],
                    "rank {r} row {i} scales"
                );
            }
        }
    }
}

/// No tokens on any rank: empty results, as a cpu-ref group.
pub fn check_no_tokens_anywhere(group: &[&dyn Backend], label: &str) {
    let world = group.len();
    let cpu = cpu_ranks(world);
    let all = inputs(&vec![0; world], 256, false, 9);
    let Some(got) = run_dispatch(
        group,
        &all,
        Payload::Float(DType::BF16),
        4,
        Some((DType::BF16, DType::BF16)),
    ) else {
        return;
    };
    let want = run_dispatch(
        &cpu,
        &all,
        Payload::Float(DType::BF16),
        4,
        Some((DType::BF16, DType::BF16)),
    )
    .expect("cpu-ref");
    assert_dispatch_eq(&got, &want, &format!("{label}: empty"));
    for g in &got {
        assert_eq!(g.counts, vec![0; E / world]);
        assert_eq!(g.recv_x.shape(), &[0, 256]);
    }
}

// ---- low-latency dispatch / combine -------------------------------------------------------

/// One received low-latency row: (source rank, source token), payload bytes,
/// scale bytes.
pub type LlRow = ((usize, usize), Vec<u8>, Vec<u8>);

/// What a low-latency dispatch (and combine) produced on one rank.
#[allow(missing_docs)]
pub struct LlRes {
    /// Per local expert, the filled slots sorted by key.
    pub rows: Vec<Vec<LlRow>>,
    pub count: Vec<i64>,
    pub handle: LowLatencyHandle,
    pub recv_shape: Vec<usize>,
    pub recv_dtype: DType,
    pub combined: Option<HostTensor>,
}

/// Expert output for a slot of local expert `l`: the dequantized received
/// row times a per-expert factor.
fn expert_factor(global_expert: usize) -> f32 {
    0.5 + 0.25 * global_expert as f32
}

/// Low-latency dispatch on R ranks; with `combine = Some((y dtype, out
/// dtype))`, combines `expert_factor · dequant(row)` with the gate weights.
pub fn run_ll(
    bs: &[&dyn Backend],
    all: &[Input],
    xdt: DType,
    fp8: Option<bool>,
    combine: Option<(DType, DType)>,
) -> Option<Vec<LlRes>> {
    let world = bs.len();
    let epr = E / world;
    let res = on_ranks(bs, |rank, b, comm| {
        let inp = &all[rank];
        let h = inp.hidden;
        let x = b.upload(&HostTensor::from_f32(xdt, &[inp.n, h], &inp.x))?;
        let topk = b.upload(&HostTensor::from_index(
            index_dtype(rank + 1),
            &[inp.n, K],
            &inp.topk,
        ))?;
        let out = ops::low_latency_dispatch(
            b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &topk,
                num_experts: E,
                max_tokens_per_rank: MAX_TOKENS,
                use_fp8: fp8.is_some(),
                ue8m0: fp8.unwrap_or(false),
            },
        )?;
        let cap = MAX_TOKENS * world;
        let rx = b.download(&out.recv_x)?;
        let rs = out
            .recv_scales
            .as_ref()
            .map(|t| b.download(t))
            .transpose()?;
        let count = b.download(&out.recv_count)?.to_i64_vec();
        let esz = rx.dtype().size();
        let sb = if rs.is_some() { 4 * h / 128 } else { 0 };
        let mut rows = Vec::new();
        for (l, slots) in out.handle.recv_src.iter().enumerate() {
            let mut v: Vec<LlRow> = slots
                .iter()
                .enumerate()
                .map(|(s, &key)| {
                    let at = l * cap + s;
                    let p = rx.bytes()[at * h * esz..(at + 1) * h * esz].to_vec();
                    let q = rs
                        .as_ref()
                        .map(|t| t.bytes()[at * sb..(at + 1) * sb].to_vec())
                        .unwrap_or_default();
                    (key, p, q)
                })
                .collect();
            v.sort();
            rows.push(v);
        }
        let combined = match combine {
            None => None,
            Some((ydt, odt)) => {
                let xv = rx.to_f32_vec();
                let sv = rs.as_ref().map(|t| t.to_f32_vec());
                let mut y = vec![0f32; epr * cap * h];
                for (l, slots) in out.handle.recv_src.iter().enumerate() {
                    for s in 0..slots.len() {
                        let at = l * cap + s;
                        for i in 0..h {
                            let mut v = xv[at * h + i];
                            if let Some(sv) = &sv {
                                v *= sv[at * (h / 128) + i / 128];
                            }
                            y[at * h + i] = v * expert_factor(rank * epr + l);
                        }
                    }
                }
                let y = b.upload(&HostTensor::from_f32(ydt, &[epr, cap, h], &y))?;
                let wts = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
                let mut o = alloc_poisoned(b, odt, &[inp.n, h])?;
                ops::low_latency_combine(
                    b,
                    comm,
                    LowLatencyCombine {
                        x: &y,
                        topk_idx: &topk,
                        topk_weights: &wts,
                        handle: &out.handle,
                        out: &mut o,
                    },
                )?;
                Some(b.download(&o)?)
            }
        };
        Ok(LlRes {
            rows,
            count,
            handle: out.handle.clone(),
            recv_shape: rx.shape().to_vec(),
            recv_dtype: rx.dtype(),
            combined,
        })
    });
    all_ok(bs, res, "low_latency_dispatch")
}

/// Low-latency results equal bit for bit, rows keyed by (source rank,
/// source token) per local expert (slot order is not defined).
pub fn assert_ll_eq(got: &[LlRes], want: &[LlRes], what: &str) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let what = format!("{what}, rank {r}");
        assert_eq!(g.recv_dtype, w.recv_dtype, "{what}: recv_x dtype");
        assert_eq!(g.recv_shape, w.recv_shape, "{what}: recv_x shape");
        assert_eq!(g.count, w.count, "{what}: recv_count");
        let hs = |h: &LowLatencyHandle| {
            (
                h.rank,
                h.world_size,
                h.num_experts,
                h.num_tokens,
                h.max_tokens_per_rank,
                h.hidden,
            )
        };
        assert_eq!(hs(&g.handle), hs(&w.handle), "{what}: handle");
        for (l, (gr, wr)) in g.rows.iter().zip(&w.rows).enumerate() {
            let keys = |v: &[LlRow]| v.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(keys(gr), keys(wr), "{what}: expert {l} sources");
            for (a, b) in gr.iter().zip(wr) {
                assert!(a.1 == b.1, "{what}: expert {l} row from {:?} differs", a.0);
                assert!(
                    a.2 == b.2,
                    "{what}: expert {l} scales from {:?} differ",
                    a.0
                );
            }
        }
        assert_eq!(g.count.len(), E / got.len());
        for (l, c) in g.count.iter().enumerate() {
            assert_eq!(*c as usize, g.handle.recv_src[l].len(), "{what}: count {l}");
        }
    }
}

/// Low-latency combines within `calc_diff < 5e-6`, all finite.
pub fn assert_ll_combined_close(got: &[LlRes], want: &[LlRes], what: &str) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.combined.as_ref().unwrap(), w.combined.as_ref().unwrap());
        assert_eq!(g.shape(), w.shape(), "{what}, rank {r}: shape");
        let d = calc_diff(&g.to_f32_vec(), &w.to_f32_vec());
        assert!(d < 5e-6, "{what}, rank {r}: calc_diff {d}");
        assert!(
            g.to_f32_vec().iter().all(|v| v.is_finite()),
            "{what}, rank {r}: non-finite output"
        );
    }
}

/// Low-latency dispatch (bf16 and f32 inputs; bf16, FP8 and FP8-UE8M0
/// payloads) and combine (bf16 and f32) on `group`: equal to a cpu-ref
/// group, and a second run bit-identical. `false` when skipped.
pub fn check_low_latency(group: &[&dyn Backend], label: &str) -> bool {
    let world = group.len();
    let cpu = cpu_ranks(world);
    for (ns, hidden, xdt, fp8, combine) in [
        (
            [5, 0, 9, 3],
            256,
            DType::BF16,
            None,
            (DType::BF16, DType::BF16),
        ),
        (
            [5, 0, 9, 3],
            131,
            DType::BF16,
            None,
            (DType::BF16, DType::F32),
        ),
        (
            [2, 10, 0, 7],
            64,
            DType::F32,
            None,
            (DType::F32, DType::BF16),
        ),
        (
            [5, 0, 9, 3],
            256,
            DType::BF16,
            Some(false),
            (DType::BF16, DType::BF16),
        ),
        (
            [10, 4, 1, 0],
            384,
            DType::BF16,
            Some(true),
            (DType::F32, DType::BF16),
        ),
        (
            [3, 3, 3, 3],
            128,
            DType::F32,
            Some(true),
            (DType::BF16, DType::F32),
        ),
    ] {
        let ns = &ns[..world];
        let all = inputs(ns, hidden, false, 3 + hidden as u64);
        let what = format!("{label}: {ns:?} hidden {hidden} {xdt} fp8 {fp8:?} combine {combine:?}");
        let Some(got) = run_ll(group, &all, xdt, fp8, Some(combine)) else {
            return false;
        };
        let want = run_ll(&cpu, &all, xdt, fp8, Some(combine)).expect("cpu-ref");
        assert_ll_eq(&got, &want, &what);
        assert_ll_combined_close(&got, &want, &what);
        let again = run_ll(group, &all, xdt, fp8, Some(combine)).expect("ran before");
        assert_ll_eq(&again, &got, &format!("{what}, second run"));
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert_same_bits(
                a.combined.as_ref(),
                g.combined.as_ref(),
                &format!("{what}, rank {r}, second run"),
            );
        }
    }
    true
}

/// The FP8 payload follows act_quant's rule, written out here: per
/// 128-group s = max(amax, 1e-4)/448 (UE8M0: rounded up to a power of two),
/// and the codes decode to within half an e4m3 step of x/s.
pub fn check_fp8_payload_follows_act_quant(group: &[&dyn Backend], label: &str) {
    let world = group.len();
    let all = inputs(&[4, 0, 6, 2][..world], 256, false, 11);
    for ue8m0 in [false, true] {
        let Some(got) = run_ll(group, &all, DType::BF16, Some(ue8m0), None) else {
            return;
        };
        for (r, g) in got.iter().enumerate() {
            for rows in &g.rows {
                for ((s, t), q, sc) in rows {
                    let x = &all[*s].x[t * 256..(t + 1) * 256];
                    for grp in 0..2 {
                        let xs = &x[grp * 128..(grp + 1) * 128];
                        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
                        let mut want = amax / 448.0;
                        if ue8m0 {
                            want = 2f32.powi((want as f64).log2().ceil() as i32);
                        }
                        let gs = f32::from_le_bytes(sc[4 * grp..4 * grp + 4].try_into().unwrap());
                        assert_eq!(gs, want, "{label}: rank {r} ({s},{t}) group {grp} scale");
                        for (i, &v) in xs.iter().enumerate() {
                            let d = e4m3_to_f32(q[grp * 128 + i]);
                            let target = v / gs;
                            let step =
                                2f32.powi((target.abs().max(1.0 / 64.0)).log2().floor() as i32 - 3);
                            assert!(
                                (d - target).abs() <= step / 2.0 + 1e-6,
                                "{label}: rank {r} ({s},{t}) element {i}: code {d} for {target}"
                            );
                        }
                    }
                }
            }
        }
    }
}

// ---- errors ---------------------------------------------------------------------------

/// Rank `bad` fails its own check with `IndexOutOfRange`; every other rank
/// returns a communicator error naming it, well before the 60 s timeout.
fn assert_failed_promptly<T>(res: Vec<Result<T>>, bad: usize, value: i64, start: Instant) {
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "errors took {took:?}");
    for (r, x) in res.into_iter().enumerate() {
        match x {
            Err(Error::IndexOutOfRange { arg, value: v, .. }) if r == bad => {
                assert_eq!(arg, "topk_idx");
                assert_eq!(v, value);
            }
            Err(Error::Comm { msg, .. }) if r != bad => {
                assert!(msg.contains(&format!("rank {bad}")), "rank {r}: {msg}");
            }
            Err(e) => panic!("rank {r}: unexpected error {e}"),
            Ok(_) => panic!("rank {r}: succeeded"),
        }
    }
}

/// A bad expert id in normal dispatch, low-latency dispatch and low-latency
/// combine fails its rank with `IndexOutOfRange` and every other rank
/// promptly with a communicator error naming it; the same backends then run
/// a clean round trip.
pub fn ep_bad_expert_id_fails_every_rank_promptly(h: &Harness) {
    let Some(own) = h.ranks(4) else { return };
    let bs = refs(&own);
    let good = inputs(&[5, 0, 9, 3], 128, false, 21);
    let mut bad = good.clone();
    bad[2].topk[4 * K + 1] = E as i64;
    bad[0].topk[1] = -3;

    // Normal dispatch: rank 2 holds id 16.
    let mut one_bad = good.clone();
    one_bad[2] = bad[2].clone();
    let start = Instant::now();
    let res = on_ranks(&bs, |rank, b, comm| {
        let inp = &one_bad[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, 128], &inp.x))?;
        let topk = b.upload(&HostTensor::from_index(DType::I64, &[inp.n, K], &inp.topk))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        ops::dispatch(
            b,
            comm,
            Dispatch {
                x: &x,
                x_scales: None,
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: 1,
            },
        )
        .map(|_| ())
    });
    if let Some(Err(e @ Error::NotSupported { .. })) = res.iter().find(|r| r.is_err()) {
        return skip(h.name(), "dispatch", e);
    }
    assert_failed_promptly(res, 2, E as i64, start);

    // Low-latency dispatch: rank 0 holds −3.
    let mut one_bad = good.clone();
    one_bad[0] = bad[0].clone();
    let start = Instant::now();
    let res = on_ranks(&bs, |rank, b, comm| {
        let inp = &one_bad[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, 128], &inp.x))?;
        let topk = b.upload(&HostTensor::from_index(DType::I32, &[inp.n, K], &inp.topk))?;
        ops::low_latency_dispatch(
            b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &topk,
                num_experts: E,
                max_tokens_per_rank: MAX_TOKENS,
                use_fp8: true,
                ue8m0: false,
            },
        )
        .map(|_| ())
    });
    assert_failed_promptly(res, 0, -3, start);

    // Low-latency combine: the dispatch succeeds, then rank 3's combine
    // topk_idx holds an id beyond E.
    let start = Instant::now();
    let res = on_ranks(&bs, |rank, b, comm| {
        let inp = &good[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, 128], &inp.x))?;
        let topk = b.upload(&HostTensor::from_index(DType::I64, &[inp.n, K], &inp.topk))?;
        let out = ops::low_latency_dispatch(
            b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &topk,
                num_experts: E,
                max_tokens_per_rank: MAX_TOKENS,
                use_fp8: false,
                ue8m0: false,
            },
        )
        .unwrap_or_else(|e| panic!("rank {rank}: dispatch failed: {e}"));
        let mut ids = inp.topk.clone();
        if rank == 3 {
            ids[K + 2] = 99;
        }
        let topk2 = b.upload(&HostTensor::from_index(DType::I64, &[inp.n, K], &ids))?;
        let wts = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let mut o = b.alloc(DType::BF16, &[inp.n, 128])?;
        let y: &Tensor = &out.recv_x;
        ops::low_latency_combine(
            b,
            comm,
            LowLatencyCombine {
                x: y,
                topk_idx: &topk2,
                topk_weights: &wts,
                handle: &out.handle,
                out: &mut o,
            },
        )
    });
    assert_failed_promptly(res, 3, 99, start);

    // Afterwards the same backends run a clean round trip.
    let cpu = cpu_ranks(4);
    let got = run_dispatch(
        &bs,
        &good,
        Payload::Float(DType::BF16),
        1,
        Some((DType::BF16, DType::BF16)),
    )
    .expect("ran above");
    let want = run_dispatch(
        &cpu,
        &good,
        Payload::Float(DType::BF16),
        1,
        Some((DType::BF16, DType::BF16)),
    )
    .expect("cpu-ref");
    assert_dispatch_eq(&got, &want, "after errors");
}

/// Ranks that disagree on the hidden size all fail with `Invalid` (at the
/// call: core validates before anything is enqueued).
pub fn ep_ranks_that_disagree_fail_with_invalid(h: &Harness) {
    let Some(own) = h.shared_ranks(4) else { return };
    let bs = refs(&own);
    // Rank 1 dispatches a different hidden size: every rank gets Invalid.
    let all = inputs(&[2, 3, 1, 2], 128, false, 31);
    let res = on_ranks(&bs, |rank, b, comm| {
        let inp = &all[rank];
        let h = if rank == 1 { 64 } else { 128 };
        let xs: Vec<f32> = (0..inp.n * h).map(|i| inp.x[i % inp.x.len()]).collect();
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, h], &xs))?;
        let topk = b.upload(&HostTensor::from_index(DType::I64, &[inp.n, K], &inp.topk))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        ops::dispatch(
            b,
            comm,
            Dispatch {
                x: &x,
                x_scales: None,
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: 1,
            },
        )
        .map(|_| ())
    });
    for (r, x) in res.into_iter().enumerate() {
        match x {
            Err(Error::Invalid { arg, msg, .. }) => {
                assert_eq!(arg, "x", "rank {r}");
                assert!(msg.contains("hidden"), "rank {r}: {msg}");
            }
            other => panic!("rank {r}: expected Invalid, got {:?}", other.err()),
        }
    }
}
// ---- the suite's checks -----------------------------------------------------------

/// Normal dispatch + combine (all payloads, determinism, FP8 bytes, empty
/// groups) on 2 and on 4 ranks of the backend.
pub fn ep_dispatch_and_combine(h: &Harness) {
    for world in [2, 4] {
        let Some(group) = h.shared_ranks(world) else {
            return;
        };
        let group = refs(&group);
        let label = format!("{} x{world}", h.name());
        if !check_dispatch_and_combine(&group, &label) {
            return;
        }
        check_fp8_dispatch(&group, &label);
        check_no_tokens_anywhere(&group, &label);
    }
}

/// Low-latency dispatch + combine (all payloads, determinism, the FP8
/// payload's act_quant rule) on 2 and on 4 ranks of the backend.
pub fn ep_low_latency(h: &Harness) {
    for world in [2, 4] {
        let Some(group) = h.shared_ranks(world) else {
            return;
        };
        let group = refs(&group);
        let label = format!("{} x{world}", h.name());
        if !check_low_latency(&group, &label) {
            return;
        }
        check_fp8_payload_follows_act_quant(&group, &label);
    }
}

/// Four ranks alternating between `a` (ranks 0, 2) and `b` (ranks 1, 3).
fn mixed_group(a: &Harness, b: &Harness) -> Option<Vec<Arc<dyn Backend>>> {
    Some(vec![a.rank(0)?, b.rank(1)?, a.rank(2)?, b.rank(3)?])
}

/// One group of two backends (ranks 0 and 2 of `a`, 1 and 3 of `b`) behaves
/// as a cpu-ref group in normal dispatch + combine (both run core's
/// protocol, one wire format).
pub fn mixed_dispatch_and_combine(a: &Harness, b: &Harness) {
    let Some(group) = mixed_group(a, b) else {
        return;
    };
    let label = format!("{}+{}", a.name(), b.name());
    if check_dispatch_and_combine(&refs(&group), &label) {
        check_fp8_dispatch(&refs(&group), &label);
    }
}

/// [`mixed_dispatch_and_combine`] for low-latency dispatch + combine.
pub fn mixed_low_latency(a: &Harness, b: &Harness) {
    let Some(group) = mixed_group(a, b) else {
        return;
    };
    check_low_latency(&refs(&group), &format!("{}+{}", a.name(), b.name()));
}
