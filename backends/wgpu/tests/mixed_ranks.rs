//! One expert-parallel group of mixed backends: ranks 0 and 2 on cpu-ref,
//! ranks 1 and 3 on wgpu (each its own instance), one `ThreadComm` group.
//! Both backends run core's protocol (one wire format), so the group must
//! behave exactly as 4 cpu-ref ranks:
//!
//! * layouts, counts, handles and dispatched payloads (rows, FP8 scales,
//!   local expert ids, weights; low-latency slots and counts) bit for bit;
//! * combines within SPEC §7's `calc_diff < 5e-6` (bf16 out) of the
//!   all-cpu-ref group;
//! * a second run of the same case bit-identical to the first.
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`.

use deepport_core::backend::{alloc_poisoned, Backend};
use deepport_core::comm::run_ranks;
use deepport_core::formats::round_bf16;
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_wgpu::{Wgpu, WgpuOptions};

mod common;
use common::{calc_diff, make, Rng};

const R: usize = 4;
const E: usize = 16;
const K: usize = 4;
const EPR: usize = E / R;
const MAX_TOKENS: usize = 12;

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x00de_ca1f)
}

/// Two wgpu backends of their own, or `None` without an adapter.
fn wgpu_pair() -> Option<[Wgpu; 2]> {
    Some([make(WgpuOptions::default())?, make(WgpuOptions::default())?])
}

/// cpu-ref, wgpu, cpu-ref, wgpu.
fn mixed(w: &[Wgpu; 2]) -> Vec<&dyn Backend> {
    vec![&CpuRef, &w[0], &CpuRef, &w[1]]
}

fn all_cpu() -> Vec<&'static dyn Backend> {
    vec![&CpuRef as &dyn Backend; R]
}

struct Input {
    n: usize,
    hidden: usize,
    /// `[n, hidden]`, bf16-representable.
    x: Vec<f32>,
    /// `[n, K]`, −1 = none; some tokens repeat an expert or go nowhere.
    topk: Vec<i64>,
    w: Vec<f32>,
}

fn inputs(ns: [usize; R], hidden: usize, dups: bool, seed: u64) -> Vec<Input> {
    (0..R)
        .map(|rank| {
            let n = ns[rank];
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

fn on_ranks<T: Send>(
    bs: &[&dyn Backend],
    f: impl Fn(usize, &dyn Backend, &deepport_core::comm::ThreadComm) -> Result<T> + Sync,
) -> Vec<T> {
    run_ranks(R, |r, comm| Ok(f(r, bs[r], comm)))
        .unwrap_or_else(|e| panic!("a rank thread failed: {e}"))
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

fn index_dtype(rank: usize) -> DType {
    [DType::I64, DType::I32][rank % 2]
}

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
    [1.0, -0.5, 2.0, 0.75][rank]
}

fn run_normal(bs: &[&dyn Backend], all: &[Input], fp8: bool) -> Vec<Normal> {
    on_ranks(bs, |rank, b, comm| {
        let inp = &all[rank];
        let (n, h) = (inp.n, inp.hidden);
        let (x, s) = if fp8 {
            let mut r = rng(900 + rank as u64);
            let q: Vec<u8> = (0..n * h).map(|_| r.next() as u8).collect();
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
        let mut pr = alloc_poisoned(b, DType::I32, &[R])?;
        let mut pe = alloc_poisoned(b, DType::I32, &[E])?;
        let mut ir = alloc_poisoned(b, DType::Bool, &[n, R])?;
        ops::run(
            b,
            GetDispatchLayout {
                topk_idx: &topk,
                num_tokens_per_rank: &mut pr,
                num_tokens_per_expert: &mut pe,
                is_token_in_rank: &mut ir,
                num_experts: E,
                world_size: R,
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
        // Combine bf16 rows: the received rows (dequantized when FP8) times
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
        for (i, name) in [
            "recv_x",
            "recv_topk_idx",
            "recv_topk_weights",
            "recv_scales",
        ]
        .iter()
        .enumerate()
        .take(w.recv.len())
        {
            assert!(g.recv[i] == w.recv[i], "{what}: {name} differs");
        }
        assert_eq!(g.recv.len(), w.recv.len(), "{what}: payload count");
        assert_eq!(
            g.combined.shape(),
            w.combined.shape(),
            "{what}: combined shape"
        );
        let d = calc_diff(&g.combined.to_f32_vec(), &w.combined.to_f32_vec());
        assert!(d < 5e-6, "{what}: combine calc_diff {d}");
    }
}

#[test]
fn mixed_group_dispatch_and_combine_equal_cpu_ref_group() {
    let Some(wp) = wgpu_pair() else { return };
    let bs = mixed(&wp);
    for (ns, hidden, dups, fp8) in [
        ([7, 0, 12, 5], 131, true, false),
        ([9, 4, 0, 11], 256, false, true),
        ([0, 0, 0, 0], 128, false, false),
        ([40, 33, 1, 17], 384, true, false),
    ] {
        let what = format!("tokens {ns:?}, hidden {hidden}, fp8 {fp8}");
        let all = inputs(ns, hidden, dups, hidden as u64 + ns[0] as u64);
        let want = run_normal(&all_cpu(), &all, fp8);
        let got = run_normal(&bs, &all, fp8);
        assert_normal(&got, &want, &what);
        // The same case again on the mixed group: bit-identical.
        let again = run_normal(&bs, &all, fp8);
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert!(a == g, "{what}, rank {r}: a second run differs");
        }
    }
}

/// Everything a low-latency dispatch + combine produced on one rank.
#[derive(Debug, PartialEq)]
struct LowLatency {
    recv: Vec<Vec<u8>>,
    count: Vec<u8>,
    handle: LowLatencyHandle,
    combined: HostTensor,
}

fn expert_factor(rank: usize, l: usize) -> f32 {
    0.5 + 0.25 * (rank * EPR + l) as f32
}

fn run_ll(bs: &[&dyn Backend], all: &[Input], fp8: Option<bool>) -> Vec<LowLatency> {
    on_ranks(bs, |rank, b, comm| {
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
        let cap = MAX_TOKENS * R;
        let xv = rx.to_f32_vec();
        let sv = rs.as_ref().map(|t| t.to_f32_vec());
        let mut y = vec![0f32; EPR * cap * h];
        for (l, slots) in out.handle.recv_src.iter().enumerate() {
            for s in 0..slots.len() {
                let at = l * cap + s;
                for i in 0..h {
                    let mut v = xv[at * h + i];
                    if let Some(sv) = &sv {
                        v *= sv[at * (h / 128) + i / 128];
                    }
                    y[at * h + i] = v * expert_factor(rank, l);
                }
            }
        }
        let y = b.upload(&HostTensor::from_f32(DType::BF16, &[EPR, cap, h], &y))?;
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

#[test]
fn mixed_group_low_latency_equals_cpu_ref_group() {
    let Some(wp) = wgpu_pair() else { return };
    let bs = mixed(&wp);
    for (ns, hidden, fp8) in [
        ([5, 12, 0, 3], 128, None),
        ([12, 7, 9, 1], 256, Some(false)),
        ([3, 0, 11, 6], 384, Some(true)),
        ([0, 0, 0, 0], 128, None),
    ] {
        let what = format!("tokens {ns:?}, hidden {hidden}, fp8 {fp8:?}");
        let all = inputs(ns, hidden, false, 7 + hidden as u64);
        let want = run_ll(&all_cpu(), &all, fp8);
        let got = run_ll(&bs, &all, fp8);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{what}, rank {r}");
            assert_eq!(g.handle, w.handle, "{what}: handle");
            assert!(g.count == w.count, "{what}: recv_count differs");
            assert_eq!(g.recv.len(), w.recv.len(), "{what}: payload count");
            assert!(g.recv[0] == w.recv[0], "{what}: recv_x differs");
            if g.recv.len() > 1 {
                assert!(g.recv[1] == w.recv[1], "{what}: recv_scales differ");
            }
            let (gv, wv) = (g.combined.to_f32_vec(), w.combined.to_f32_vec());
            let d = calc_diff(&gv, &wv);
            assert!(d < 5e-6, "{what}: combine calc_diff {d}");
            assert!(gv.iter().all(|v| v.is_finite()), "{what}: non-finite");
        }
        let again = run_ll(&bs, &all, fp8);
        for (r, (a, g)) in again.iter().zip(&got).enumerate() {
            assert!(a == g, "{what}, rank {r}: a second run differs");
        }
    }
}
