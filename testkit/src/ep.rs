//! Expert parallelism (SPEC §7) on groups of 2 and 4 in-process ranks over
//! core's `ThreadComm`, each rank its own instance of the backend under
//! test, against the same group of `cpu-ref` ranks on the same inputs; and
//! `get_dispatch_layout`, the local op behind them.
//!
//! Judged: layouts, counts, handles and payloads bit for bit (dispatch rows,
//! FP8 scales, local expert ids, weights; low-latency slots and counts, in
//! core's protocol order); combines within `calc_diff < 5e-6` and one bf16
//! ulp per element of cpu-ref's; a second run of the same case bit-identical
//! to the first; a bad expert id is `IndexOutOfRange` on its rank and a
//! prompt communicator error naming it on the others. Groups that mix two
//! backends ([`mixed_dispatch_and_combine`], [`mixed_low_latency`]) must
//! behave exactly as the all-cpu-ref group.

use crate::compare::{calc_diff, ulp};
use crate::harness::{skip, Harness};
use crate::Rng;
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::comm::{run_ranks, ThreadComm};
use deepport_core::formats::round_bf16;
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use std::time::{Duration, Instant};

const E: usize = 16;
const K: usize = 4;
const MAX_TOKENS: usize = 12;

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x00de_ca1f)
}

/// One rank's tokens.
#[derive(Clone)]
struct Input {
    n: usize,
    hidden: usize,
    /// `[n, hidden]`, bf16-representable, magnitudes 0.01 … 29 per group.
    x: Vec<f32>,
    /// `[n, K]`, −1 = none; some tokens repeat an expert or go nowhere.
    topk: Vec<i64>,
    w: Vec<f32>,
}

fn inputs(ns: &[usize], hidden: usize, dups: bool, seed: u64) -> Vec<Input> {
    ns.iter()
        .enumerate()
        .map(|(rank, &n)| {
            let mut r = rng(seed * 17 + rank as u64);
            let x = (0..n * hidden)
                .map(|i| {
                    let mag = [0.01, 1.0, 29.0][(i / 128 + i / hidden) % 3];
                    round_bf16(((r.uniform() * 2.0 - 1.0) * mag) as f32)
                })
                .collect();
            let mut topk = Vec::with_capacity(n * K);
            for t in 0..n {
                let mut e: Vec<i64> = (0..E as i64).collect();
                r.shuffle(&mut e);
                let mut row = e[..K].to_vec();
                if t % 3 == 1 {
                    row[t % K] = -1;
                }
                if dups && t % 4 == 2 {
                    row[3] = row[0];
                }
                if t % 7 == 5 {
                    row = vec![-1; K];
                }
                topk.extend(row);
            }
            let w = (0..n * K)
                .map(|_| (r.uniform() * 0.9 + 0.05) as f32)
                .collect();
            Input {
                n,
                hidden,
                x,
                topk,
                w,
            }
        })
        .collect()
}

/// Runs `f` on every rank of `bs` (rank r on `bs[r]`), each rank's result
/// kept apart.
fn on_ranks_raw<T: Send>(
    bs: &[&dyn Backend],
    f: impl Fn(usize, &dyn Backend, &ThreadComm) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    run_ranks(bs.len(), |r, comm| Ok(f(r, bs[r], comm)))
        .unwrap_or_else(|e| panic!("a rank thread failed: {e}"))
}

/// [`on_ranks_raw`], every rank required to succeed; `None` (recorded as
/// skipped) when a rank answers `NotSupported`.
fn on_ranks<T: Send>(
    bs: &[&dyn Backend],
    what: &str,
    f: impl Fn(usize, &dyn Backend, &ThreadComm) -> Result<T> + Sync,
) -> Option<Vec<T>> {
    let res = on_ranks_raw(bs, f);
    if let Some((r, e)) = res.iter().enumerate().find_map(|(r, x)| match x {
        Err(e @ Error::NotSupported { .. }) => Some((r, e)),
        _ => None,
    }) {
        skip(bs[r].name(), what, e);
        return None;
    }
    Some(
        res.into_iter()
            .enumerate()
            .map(|(r, x)| x.unwrap_or_else(|e| panic!("{what}: rank {r}: {e}")))
            .collect(),
    )
}

fn index_dtype(rank: usize) -> DType {
    [DType::I64, DType::I32][rank % 2]
}

fn cpu_group(world: usize) -> Vec<&'static dyn Backend> {
    vec![&CpuRef as &dyn Backend; world]
}

/// Combined outputs: `calc_diff < 5e-6` and one bf16 ulp per element.
fn assert_combined(got: &HostTensor, want: &HostTensor, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: combined shape");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let d = calc_diff(&g, &w);
    assert!(d < 5e-6, "{what}: combine calc_diff {d}");
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        assert!(a.is_finite(), "{what}: combined[{i}] = {a}");
        assert!(
            (a as f64 - b as f64).abs() <= ulp(DType::BF16, b),
            "{what}: combined[{i}]: {a} vs {b}"
        );
    }
}

// ---- normal dispatch / combine ------------------------------------------------

/// Everything a normal dispatch + combine produced on one rank, as bytes.
#[derive(Debug, PartialEq)]
struct Normal {
    layout: Vec<Vec<u8>>,
    recv: Vec<Vec<u8>>,
    counts: Vec<usize>,
    handle: DispatchHandle,
    combined: HostTensor,
}

fn combine_factor(rank: usize) -> f32 {
    [1.0, -0.5, 2.0, 0.75][rank % 4]
}

fn run_normal(bs: &[&dyn Backend], all: &[Input], fp8: bool) -> Option<Vec<Normal>> {
    let world = bs.len();
    on_ranks(bs, "dispatch/combine", |rank, b, comm| {
        let inp = &all[rank];
        let (n, h) = (inp.n, inp.hidden);
        let (x, s) = if fp8 {
            let mut r = rng(900 + rank as u64);
            let q = r.bytes(n * h);
            let sc: Vec<f32> = (0..n * h / 128)
                .map(|_| (r.uniform() * 0.01) as f32)
                .collect();
            (
                b.upload(&HostTensor::from_bytes(DType::F8E4M3, &[n, h], q)?)?,
                Some(b.upload(&HostTensor::from_f32(DType::F32, &[n, h / 128], &sc))?),
            )
        } else {
            (
                b.upload(&HostTensor::from_f32(DType::BF16, &[n, h], &inp.x))?,
                None,
            )
        };
        let topk = b.upload(&HostTensor::from_index(
            index_dtype(rank),
            &[n, K],
            &inp.topk,
        ))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[n, K], &inp.w))?;
        let mut pr = alloc_poisoned(b, DType::I32, &[world])?;
        let mut pe = alloc_poisoned(b, DType::I32, &[E])?;
        let mut ir = alloc_poisoned(b, DType::Bool, &[n, world])?;
        ops::run(
            b,
            GetDispatchLayout {
                topk_idx: &topk,
                num_tokens_per_rank: &mut pr,
                num_tokens_per_expert: &mut pe,
                is_token_in_rank: &mut ir,
                num_experts: E,
                world_size: world,
            },
        )?;
        let out = ops::dispatch(
            b,
            comm,
            Dispatch {
                x: &x,
                x_scales: s.as_ref(),
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: 4,
            },
        )?;
        let mut recv = vec![
            b.download(&out.recv_x)?.into_bytes(),
            b.download(&out.recv_topk_idx)?.into_bytes(),
            b.download(&out.recv_topk_weights)?.into_bytes(),
        ];
        if let Some(t) = &out.recv_scales {
            recv.push(b.download(t)?.into_bytes());
        }
        // Combine bf16 rows: the received rows (FP8 codes as values) times
        // a per-rank factor.
        let m = out.handle.recv_src.len();
        let rx = b.download(&out.recv_x)?.to_f32_vec();
        let y: Vec<f32> = rx
            .iter()
            .map(|v| {
                if v.is_finite() {
                    v * combine_factor(rank)
                } else {
                    0.0
                }
            })
            .collect();
        let y = b.upload(&HostTensor::from_f32(DType::BF16, &[m, h], &y))?;
        let mut o = alloc_poisoned(b, DType::BF16, &[n, h])?;
        ops::combine(
            b,
            comm,
            Combine {
                x: &y,
                handle: &out.handle,
                out: &mut o,
            },
        )?;
        b.synchronize()?;
        Ok(Normal {
            layout: vec![
                b.download(&pr)?.into_bytes(),
                b.download(&pe)?.into_bytes(),
                b.download(&ir)?.into_bytes(),
            ],
            recv,
            counts: out.num_recv_tokens_per_expert.clone(),
            handle: out.handle.clone(),
            combined: b.download(&o)?,
        })
    })
}

fn assert_normal(got: &[Normal], want: &[Normal], what: &str) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let what = format!("{what}, rank {r}");
        assert!(g.layout == w.layout, "{what}: layout differs");
        assert_eq!(g.counts, w.counts, "{what}: counts");
        assert_eq!(g.handle, w.handle, "{what}: handle");
        assert_eq!(g.recv.len(), w.recv.len(), "{what}: payload count");
        for (i, name) in ["recv_x", "recv_topk_idx", "recv_topk_weights", "recv_scales"]
            .iter()
            .enumerate()
            .take(w.recv.len())
        {
            assert!(g.recv[i] == w.recv[i], "{what}: {name} differs");
        }
        assert_combined(&g.combined, &w.combined, &what);
    }
}

/// The normal cases of a `world`-rank group: tokens per rank (some ranks
/// empty), hidden (not always a multiple of 128 for bf16), duplicates, FP8.
fn normal_cases(world: usize) -> Vec<(Vec<usize>, usize, bool, bool)> {
    let ns = |v: [usize; 4]| v[..world].to_vec();
    vec![
        (ns([7, 0, 12, 5]), 131, true, false),
        (ns([9, 4, 0, 11]), 256, false, true),
        (ns([0, 0, 0, 0]), 128, false, false),
        (ns([40, 33, 1, 17]), 384, true, false),
    ]
}

/// Dispatch and combine on `group` equal the all-cpu-ref group, and a
/// second run is bit-identical.
fn check_normal(group: &[&dyn Backend], label: &str) {
    let world = group.len();
    for (ns, hidden, dups, fp8) in normal_cases(world) {
        let what = format!("{label}: tokens {ns:?}, hidden {hidden}, fp8 {fp8}");
        let all = inputs(&ns, hidden, dups, hidden as u64 + ns[0] as u64);
        let want = run_normal(&cpu_group(world), &all, fp8).expect("cpu-ref");
        let Some(got) = run_normal(group, &all, fp8) else {
            return;
        };
        assert_normal(&got, &want, &what);
        let again = run_normal(group, &all, fp8).expect("ran before");
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert!(a == g, "{what}, rank {r}: a second run differs");
        }
    }
}

// ---- low-latency dispatch / combine --------------------------------------------

/// Everything a low-latency dispatch + combine produced on one rank.
#[derive(Debug, PartialEq)]
struct LowLatency {
    recv: Vec<Vec<u8>>,
    count: Vec<u8>,
    handle: LowLatencyHandle,
    combined: HostTensor,
}

fn expert_factor(global_expert: usize) -> f32 {
    0.5 + 0.25 * global_expert as f32
}

fn run_ll(bs: &[&dyn Backend], all: &[Input], fp8: Option<bool>) -> Option<Vec<LowLatency>> {
    let world = bs.len();
    let epr = E / world;
    on_ranks(bs, "low-latency dispatch/combine", |rank, b, comm| {
        let inp = &all[rank];
        let (n, h) = (inp.n, inp.hidden);
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[n, h], &inp.x))?;
        let topk = b.upload(&HostTensor::from_index(
            index_dtype(rank + 1),
            &[n, K],
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
        let rx = b.download(&out.recv_x)?;
        let rs = out
            .recv_scales
            .as_ref()
            .map(|t| b.download(t))
            .transpose()?;
        let cap = MAX_TOKENS * world;
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
        let y = b.upload(&HostTensor::from_f32(DType::BF16, &[epr, cap, h], &y))?;
        let wts = b.upload(&HostTensor::from_f32(DType::F32, &[n, K], &inp.w))?;
        let mut o = alloc_poisoned(b, DType::BF16, &[n, h])?;
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
        b.synchronize()?;
        let mut recv = vec![rx.into_bytes()];
        if let Some(s) = rs {
            recv.push(s.into_bytes());
        }
        Ok(LowLatency {
            recv,
            count: b.download(&out.recv_count)?.into_bytes(),
            handle: out.handle.clone(),
            combined: b.download(&o)?,
        })
    })
}

/// Low-latency dispatch (bf16, FP8, FP8 with UE8M0 scales) and combine on
/// `group` equal the all-cpu-ref group, and a second run is bit-identical.
fn check_low_latency(group: &[&dyn Backend], label: &str) {
    let world = group.len();
    let ns = |v: [usize; 4]| v[..world].to_vec();
    for (ns, hidden, fp8) in [
        (ns([5, 12, 0, 3]), 128, None),
        (ns([12, 7, 9, 1]), 256, Some(false)),
        (ns([3, 0, 11, 6]), 384, Some(true)),
        (ns([0, 0, 0, 0]), 128, None),
    ] {
        let what = format!("{label}: tokens {ns:?}, hidden {hidden}, fp8 {fp8:?}");
        let all = inputs(&ns, hidden, false, 7 + hidden as u64);
        let want = run_ll(&cpu_group(world), &all, fp8).expect("cpu-ref");
        let Some(got) = run_ll(group, &all, fp8) else {
            return;
        };
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{what}, rank {r}");
            assert_eq!(g.handle, w.handle, "{what}: handle");
            assert!(g.count == w.count, "{what}: recv_count differs");
            assert_eq!(g.recv.len(), w.recv.len(), "{what}: payload count");
            assert!(g.recv[0] == w.recv[0], "{what}: recv_x differs");
            if g.recv.len() > 1 {
                assert!(g.recv[1] == w.recv[1], "{what}: recv_scales differ");
            }
            assert_combined(&g.combined, &w.combined, &what);
        }
        let again = run_ll(group, &all, fp8).expect("ran before");
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert!(a == g, "{what}, rank {r}: a second run differs");
        }
    }
}

// ---- the suite's checks ---------------------------------------------------------

fn refs(v: &[Box<dyn Backend>]) -> Vec<&dyn Backend> {
    v.iter().map(|b| &**b).collect()
}

/// Normal dispatch + combine on 2 and on 4 ranks of the backend.
pub fn ep_dispatch_and_combine(h: &Harness) {
    for world in [2, 4] {
        let Some(group) = h.ranks(world) else { return };
        check_normal(&refs(&group), &format!("{} x{world}", h.name()));
    }
}

/// Low-latency dispatch + combine on 2 and on 4 ranks of the backend.
pub fn ep_low_latency(h: &Harness) {
    for world in [2, 4] {
        let Some(group) = h.ranks(world) else { return };
        check_low_latency(&refs(&group), &format!("{} x{world}", h.name()));
    }
}

/// Four ranks alternating between `a` (ranks 0, 2) and `b` (ranks 1, 3).
fn mixed_group(a: &Harness, b: &Harness) -> Option<Vec<Box<dyn Backend>>> {
    Some(vec![a.rank(0)?, b.rank(1)?, a.rank(2)?, b.rank(3)?])
}

/// Normal dispatch + combine on a group of two backends (ranks 0 and 2 of
/// `a`, 1 and 3 of `b`): as the all-cpu-ref group.
pub fn mixed_dispatch_and_combine(a: &Harness, b: &Harness) {
    let Some(group) = mixed_group(a, b) else { return };
    check_normal(&refs(&group), &format!("{}+{}", a.name(), b.name()));
}

/// Low-latency dispatch + combine on a group of two backends.
pub fn mixed_low_latency(a: &Harness, b: &Harness) {
    let Some(group) = mixed_group(a, b) else { return };
    check_low_latency(&refs(&group), &format!("{}+{}", a.name(), b.name()));
}

// ---- get_dispatch_layout ------------------------------------------------------------

struct Layout {
    per_rank: Vec<u8>,
    per_expert: Vec<u8>,
    in_rank: Vec<u8>,
}

fn run_layout(b: &dyn Backend, topk: &[i64], n: usize, dtype: DType) -> Result<Layout> {
    const R: usize = 4;
    let t = b.upload(&HostTensor::from_index(dtype, &[n, K], topk))?;
    // Poisoned outputs: a word the kernel forgets shows up.
    let mut pr = alloc_poisoned(b, DType::I32, &[R])?;
    let mut pe = alloc_poisoned(b, DType::I32, &[E])?;
    let mut ir = alloc_poisoned(b, DType::Bool, &[n, R])?;
    ops::run(
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
    let Some(bk) = h.backend() else { return };
    let b: &dyn Backend = &*bk;
    let mut cases: Vec<(Vec<i64>, usize)> = Vec::new();
    for inp in inputs(&[5, 0, 9, 3], 128, true, 1) {
        cases.push((inp.topk, inp.n));
    }
    // More tokens than one workgroup, with duplicates and −1 entries.
    let big = inputs(&[700], 1, true, 2).remove(0);
    cases.push((big.topk, big.n));
    // By hand: experts 4r..4r+3 live on rank r.
    let hand = vec![0, 1, 5, -1, -1, -1, -1, -1, 15, 14, 13, 12, 7, 7, 7, 7];
    cases.push((hand.clone(), 4));
    for (i, (topk, n)) in cases.iter().enumerate() {
        for dtype in [DType::I64, DType::I32] {
            let what = format!("layout case {i} ({dtype})");
            let got = match run_layout(b, topk, *n, dtype) {
                Ok(g) => g,
                Err(e @ Error::NotSupported { .. }) => return skip(b.name(), &what, &e),
                Err(e) => panic!("{what}: {e}"),
            };
            let want = run_layout(&CpuRef, topk, *n, dtype).unwrap();
            assert_eq!(got.per_rank, want.per_rank, "{what}: num_tokens_per_rank");
            assert_eq!(got.per_expert, want.per_expert, "{what}: num_tokens_per_expert");
            assert_eq!(got.in_rank, want.in_rank, "{what}: is_token_in_rank");
        }
    }
    // The hand example, written out.
    let got = run_layout(b, &hand, 4, DType::I64).unwrap();
    let i32s = |v: &[i32]| HostTensor::from_i32(&[v.len()], v).into_bytes();
    assert_eq!(got.per_rank, i32s(&[1, 2, 0, 1]));
    let mut pe = [0i32; E];
    for e in [0, 1, 5, 7, 12, 13, 14, 15] {
        pe[e] = 1;
    }
    assert_eq!(got.per_expert, i32s(&pe));
    assert_eq!(got.in_rank, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
}

/// An expert id outside `[0, E)` (other than −1) is `IndexOutOfRange` at the
/// call or the next synchronize; the backend works afterwards.
pub fn layout_rejects_out_of_range_expert(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let b: &dyn Backend = &*bk;
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
            Err(e @ Error::NotSupported { .. }) => return skip(b.name(), "layout", &e),
            other => panic!(
                "expected IndexOutOfRange for {bad}, got {:?}",
                other.map(|_| ())
            ),
        }
        b.synchronize().expect("reported once");
    }
    let got = run_layout(b, &[0, 4, 8, 12], 1, DType::I32).unwrap();
    assert_eq!(got.in_rank, vec![1, 1, 1, 1]);
}

// ---- errors ---------------------------------------------------------------------

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
/// combine fails its rank with `IndexOutOfRange` and the other ranks
/// promptly; the same backends then run a clean round trip.
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
    let res = on_ranks_raw(&bs, |rank, b, comm| {
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
    let res = on_ranks_raw(&bs, |rank, b, comm| {
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
    let res = on_ranks_raw(&bs, |rank, b, comm| {
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
    let want = run_normal(&cpu_group(4), &good, false).expect("cpu-ref");
    let got = run_normal(&bs, &good, false).expect("supported above");
    assert_normal(&got, &want, "after errors");
}

/// Ranks that disagree on the hidden size all fail with `Invalid`.
pub fn ep_ranks_that_disagree_fail_with_invalid(h: &Harness) {
    let Some(own) = h.ranks(4) else { return };
    let bs = refs(&own);
    let all = inputs(&[2, 3, 1, 2], 128, false, 31);
    let res = on_ranks_raw(&bs, |rank, b, comm| {
        let inp = &all[rank];
        let hd = if rank == 1 { 64 } else { 128 };
        let xs: Vec<f32> = (0..inp.n * hd).map(|i| inp.x[i % inp.x.len()]).collect();
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, hd], &xs))?;
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
            Err(e @ Error::NotSupported { .. }) => return skip(h.name(), "dispatch", &e),
            other => panic!("rank {r}: expected Invalid, got {:?}", other.err()),
        }
    }
}
