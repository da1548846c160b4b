//! Expert-parallel ops of `cpu-ref` (SPEC.md §7) on 4 in-process ranks.
//!
//! Every expectation is computed here from all ranks' inputs, independently
//! of the code under test: routing tables, receive order, counts, payload
//! bytes, an act_quant written out plainly, and the combine sums.

use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::{run_ranks, Communicator, ThreadComm};
use deepport_core::formats::{e4m3_to_f32, f32_to_e4m3, round_bf16};
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_testkit::compare::calc_diff;
use deepport_testkit::Rng;
use std::time::{Duration, Instant};

const R: usize = 4;
const E: usize = 16;
const K: usize = 4;
const H: usize = 256;
const EPR: usize = E / R;
const NS: [usize; R] = [5, 0, 9, 3];
const MAX_TOKENS: usize = 10;

// ---- deterministic inputs -------------------------------------------------

/// This file's PRNG streams.
fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x1234_5678)
}

#[derive(Clone)]
struct Input {
    n: usize,
    /// `[n, H]`, bf16-representable.
    x: Vec<f32>,
    /// `[n, K]`, −1 = none.
    topk: Vec<i64>,
    /// `[n, K]`.
    w: Vec<f32>,
}

/// Rank `rank`'s tokens. `integer`: small integers (exact bf16 sums);
/// otherwise values of very different magnitude per 128-group, and one
/// all-zero group (the 1e-4 amax clamp).
fn input(rank: usize, integer: bool) -> Input {
    let mut rng = rng(1000 + rank as u64);
    let n = NS[rank];
    let mut x = Vec::with_capacity(n * H);
    for t in 0..n {
        for i in 0..H {
            let g = i / 128;
            let v = if integer {
                rng.below(17) as f32 - 8.0
            } else if t == 0 && g == 0 {
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
        if rank == 2 && t == 4 {
            row = vec![-1; K]; // a token sent nowhere
        }
        topk.extend(row);
    }
    let w = (0..n * K)
        .map(|_| (rng.uniform() * 0.9 + 0.05) as f32)
        .collect();
    Input { n, x, topk, w }
}

fn inputs(integer: bool) -> Vec<Input> {
    (0..R).map(|r| input(r, integer)).collect()
}

fn rank_of(e: i64) -> usize {
    e as usize / EPR
}

/// Distinct ranks token `t` of `inp` goes to.
fn dest_ranks(inp: &Input, t: usize) -> Vec<usize> {
    let mut d: Vec<usize> = inp.topk[t * K..(t + 1) * K]
        .iter()
        .filter(|&&e| e >= 0)
        .map(|&e| rank_of(e))
        .collect();
    d.sort();
    d.dedup();
    d
}

/// The rows rank `r` must receive, in order: source rank ascending, then
/// source token order.
fn expected_recv(all: &[Input], r: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for (s, inp) in all.iter().enumerate() {
        for t in 0..inp.n {
            if dest_ranks(inp, t).contains(&r) {
                v.push((s, t));
            }
        }
    }
    v
}

fn index_dtype(rank: usize) -> DType {
    if rank.is_multiple_of(2) {
        DType::I64
    } else {
        DType::I32
    }
}

fn up_topk(b: &CpuRef, rank: usize, inp: &Input) -> Result<Tensor> {
    b.upload(&HostTensor::from_index(
        index_dtype(rank),
        &[inp.n, K],
        &inp.topk,
    ))
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    HostTensor::from_f32(DType::BF16, &[v.len()], v).into_bytes()
}

/// Compares two byte strings of bf16 values; reports the first difference.
fn assert_bf16_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len() / 2).find(|&i| got[2 * i..2 * i + 2] != want[2 * i..2 * i + 2]) {
        let v = |b: &[u8]| half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
        panic!("{what}: element {i}: got {}, want {}", v(got), v(want));
    }
}

// ---- get_dispatch_layout ----------------------------------------------------

struct Layout {
    per_rank: Vec<i64>,
    per_expert: Vec<i64>,
    in_rank: Vec<i64>,
}

fn run_layout(topk: &[i64], n: usize, dtype: DType) -> Result<Layout> {
    let b = CpuRef;
    let t = b.upload(&HostTensor::from_index(dtype, &[n, K], topk))?;
    let mut pr = b.alloc(DType::I32, &[R])?;
    let mut pe = b.alloc(DType::I32, &[E])?;
    let mut ir = b.alloc(DType::Bool, &[n, R])?;
    ops::run(
        &b,
        GetDispatchLayout {
            topk_idx: &t,
            num_tokens_per_rank: &mut pr,
            num_tokens_per_expert: &mut pe,
            is_token_in_rank: &mut ir,
            num_experts: E,
            world_size: R,
        },
    )?;
    Ok(Layout {
        per_rank: b.download(&pr)?.to_i64_vec(),
        per_expert: b.download(&pe)?.to_i64_vec(),
        in_rank: b.download(&ir)?.bytes().iter().map(|&v| v as i64).collect(),
    })
}

#[test]
fn layout_counts_match_plain_counts() {
    for (rank, inp) in inputs(false).iter().enumerate() {
        let got = run_layout(&inp.topk, inp.n, index_dtype(rank)).unwrap();
        let mut per_rank = vec![0i64; R];
        let mut per_expert = vec![0i64; E];
        let mut in_rank = vec![0i64; inp.n * R];
        for t in 0..inp.n {
            for e in 0..E as i64 {
                if inp.topk[t * K..(t + 1) * K].contains(&e) {
                    per_expert[e as usize] += 1;
                }
            }
            for r in 0..R {
                let hit = inp.topk[t * K..(t + 1) * K]
                    .iter()
                    .any(|&e| e >= 0 && rank_of(e) == r);
                if hit {
                    per_rank[r] += 1;
                    in_rank[t * R + r] = 1;
                }
            }
        }
        assert_eq!(got.per_rank, per_rank, "rank {rank} num_tokens_per_rank");
        assert_eq!(
            got.per_expert, per_expert,
            "rank {rank} num_tokens_per_expert"
        );
        assert_eq!(got.in_rank, in_rank, "rank {rank} is_token_in_rank");
    }
}

#[test]
fn layout_hand_example_with_none_entries() {
    // Experts 0..3 on rank 0, 4..7 on rank 1, 8..11 on rank 2, 12..15 on rank 3.
    let topk = [
        0, 1, 5, -1, // ranks 0, 1
        -1, -1, -1, -1, // nowhere
        15, 14, 13, 12, // rank 3 only
    ];
    let got = run_layout(&topk, 3, DType::I64).unwrap();
    assert_eq!(got.per_rank, vec![1, 1, 0, 1]);
    let mut pe = vec![0i64; E];
    for e in [0, 1, 5, 12, 13, 14, 15] {
        pe[e] = 1;
    }
    assert_eq!(got.per_expert, pe);
    assert_eq!(got.in_rank, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
}

#[test]
fn layout_rejects_out_of_range_expert() {
    for (bad, dtype) in [(16i64, DType::I64), (-2, DType::I32), (99, DType::I32)] {
        let mut topk = vec![0i64, 1, 2, 3, 4, 5, 6, 7];
        topk[6] = bad;
        match run_layout(&topk, 2, dtype) {
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
            other => panic!("expected IndexOutOfRange for {bad}, got {:?}", other.err()),
        }
    }
}

// ---- normal dispatch / combine ------------------------------------------------

struct RankResult {
    recv_x: HostTensor,
    recv_scales: Option<HostTensor>,
    recv_topk_idx: Vec<i64>,
    recv_topk_weights: Vec<f32>,
    counts: Vec<usize>,
    handle: DispatchHandle,
    combined: Option<HostTensor>,
}

/// Dispatches `all` (bf16) on 4 ranks; then combines the received rows,
/// each multiplied by `rank + 1` when `scale_by_rank`.
fn run_dispatch_combine(all: &[Input], align: usize, scale_by_rank: bool) -> Vec<RankResult> {
    run_ranks(R, |rank, comm| {
        let b = CpuRef;
        let inp = &all[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, H], &inp.x))?;
        let topk = up_topk(&b, rank, inp)?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let out = ops::dispatch(
            &b,
            comm,
            Dispatch {
                x: &x,
                x_scales: None,
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: align,
            },
        )?;
        let recv_x = b.download(&out.recv_x)?;
        let m = out.handle.recv_src.len();
        let cx = if scale_by_rank {
            let v: Vec<f32> = recv_x
                .to_f32_vec()
                .iter()
                .map(|v| v * (rank + 1) as f32)
                .collect();
            b.upload(&HostTensor::from_f32(DType::BF16, &[m, H], &v))?
        } else {
            b.upload(&recv_x)?
        };
        let mut o = b.alloc(DType::BF16, &[inp.n, H])?;
        ops::combine(
            &b,
            comm,
            Combine {
                x: &cx,
                handle: &out.handle,
                out: &mut o,
            },
        )?;
        Ok(RankResult {
            recv_x,
            recv_scales: None,
            recv_topk_idx: b.download(&out.recv_topk_idx)?.to_i64_vec(),
            recv_topk_weights: b.download(&out.recv_topk_weights)?.to_f32_vec(),
            counts: out.num_recv_tokens_per_expert.clone(),
            handle: out.handle.clone(),
            combined: Some(b.download(&o)?),
        })
    })
    .unwrap()
}

fn check_dispatch(all: &[Input], res: &[RankResult], align: usize, row_bytes: usize) {
    for (r, got) in res.iter().enumerate() {
        let want = expected_recv(all, r);
        assert_eq!(got.handle.recv_src, want, "rank {r} receive order");
        assert_eq!(got.handle.rank, r);
        assert_eq!(got.handle.world_size, R);
        assert_eq!(got.handle.num_tokens, all[r].n);
        for d in 0..R {
            let plan: Vec<usize> = (0..all[r].n)
                .filter(|&t| dest_ranks(&all[r], t).contains(&d))
                .collect();
            assert_eq!(got.handle.send_plan[d], plan, "rank {r} send plan to {d}");
        }
        let m = want.len();
        assert_eq!(got.recv_x.shape(), &[m, H]);
        assert_eq!(got.recv_topk_idx.len(), m * K);
        let mut counts = [0usize; EPR];
        for (i, &(s, t)) in want.iter().enumerate() {
            // Payload bytes identical to the source row.
            let src_row = bf16_bytes(&all[s].x[t * H..(t + 1) * H]);
            let got_row = &got.recv_x.bytes()[i * row_bytes..(i + 1) * row_bytes];
            if row_bytes == 2 * H {
                assert_bf16_eq(
                    got_row,
                    &src_row,
                    &format!("rank {r} row {i} from ({s},{t})"),
                );
            }
            for j in 0..K {
                let e = all[s].topk[t * K + j];
                let (li, lw) = if e >= 0 && rank_of(e) == r {
                    ((e as usize - r * EPR) as i64, all[s].w[t * K + j])
                } else {
                    (-1, 0.0)
                };
                assert_eq!(got.recv_topk_idx[i * K + j], li, "rank {r} row {i} k {j}");
                assert_eq!(
                    got.recv_topk_weights[i * K + j].to_bits(),
                    lw.to_bits(),
                    "rank {r} row {i} k {j} weight"
                );
            }
            for (l, c) in counts.iter_mut().enumerate() {
                let g = (r * EPR + l) as i64;
                if all[s].topk[t * K..(t + 1) * K].contains(&g) {
                    *c += 1;
                }
            }
        }
        let padded: Vec<usize> = counts.iter().map(|&c| c.div_ceil(align) * align).collect();
        assert_eq!(got.counts, padded, "rank {r} counts (alignment {align})");
    }
}

#[test]
fn dispatch_then_combine_unchanged_rows() {
    let all = inputs(true);
    for align in [1, 4] {
        let res = run_dispatch_combine(&all, align, false);
        check_dispatch(&all, &res, align, 2 * H);
        for (r, got) in res.iter().enumerate() {
            let inp = &all[r];
            let mut want = vec![0f32; inp.n * H];
            for t in 0..inp.n {
                // One copy back per distinct destination rank (a plain sum
                // from +0, so a token sent nowhere is +0).
                for _ in dest_ranks(inp, t) {
                    for i in 0..H {
                        want[t * H + i] += inp.x[t * H + i];
                    }
                }
            }
            let out = got.combined.as_ref().unwrap();
            assert_eq!(out.shape(), &[inp.n, H]);
            assert_bf16_eq(
                out.bytes(),
                &bf16_bytes(&want),
                &format!("rank {r} combine"),
            );
        }
    }
}

#[test]
fn dispatch_then_combine_rows_scaled_by_receiver() {
    let all = inputs(true);
    let res = run_dispatch_combine(&all, 1, true);
    for (r, got) in res.iter().enumerate() {
        let inp = &all[r];
        let mut want = vec![0f32; inp.n * H];
        for t in 0..inp.n {
            for d in dest_ranks(inp, t) {
                for i in 0..H {
                    want[t * H + i] += inp.x[t * H + i] * (d + 1) as f32;
                }
            }
        }
        // The token that went nowhere comes back as zeros.
        if r == 2 {
            assert!(want[4 * H..5 * H].iter().all(|&v| v == 0.0));
        }
        let out = got.combined.as_ref().unwrap();
        assert_bf16_eq(
            out.bytes(),
            &bf16_bytes(&want),
            &format!("rank {r} combine"),
        );
    }
}

#[test]
fn fp8_dispatch_payload_is_bit_exact() {
    let all = inputs(false);
    // Arbitrary e4m3 codes and scales per rank.
    let codes: Vec<Vec<u8>> = (0..R)
        .map(|r| {
            let mut rng = rng(77 + r as u64);
            (0..all[r].n * H).map(|_| rng.next_u64() as u8).collect()
        })
        .collect();
    let scales: Vec<Vec<f32>> = (0..R)
        .map(|r| {
            let mut rng = rng(99 + r as u64);
            (0..all[r].n * H / 128)
                .map(|_| (rng.uniform() * 3.0) as f32 + 1e-3)
                .collect()
        })
        .collect();
    let res = run_ranks(R, |rank, comm| {
        let b = CpuRef;
        let inp = &all[rank];
        let x = b.upload(&HostTensor::from_bytes(
            DType::F8E4M3,
            &[inp.n, H],
            codes[rank].clone(),
        )?)?;
        let s = b.upload(&HostTensor::from_f32(
            DType::F32,
            &[inp.n, H / 128],
            &scales[rank],
        ))?;
        let topk = up_topk(&b, rank, inp)?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let out = ops::dispatch(
            &b,
            comm,
            Dispatch {
                x: &x,
                x_scales: Some(&s),
                topk_idx: &topk,
                topk_weights: &w,
                num_experts: E,
                expert_alignment: 1,
            },
        )?;
        Ok(RankResult {
            recv_x: b.download(&out.recv_x)?,
            recv_scales: out
                .recv_scales
                .as_ref()
                .map(|t| b.download(t))
                .transpose()?,
            recv_topk_idx: b.download(&out.recv_topk_idx)?.to_i64_vec(),
            recv_topk_weights: b.download(&out.recv_topk_weights)?.to_f32_vec(),
            counts: out.num_recv_tokens_per_expert.clone(),
            handle: out.handle.clone(),
            combined: None,
        })
    })
    .unwrap();
    check_dispatch(&all, &res, 1, H);
    for (r, got) in res.iter().enumerate() {
        assert_eq!(got.recv_x.dtype(), DType::F8E4M3);
        let sc = got.recv_scales.as_ref().expect("scales");
        let want = expected_recv(&all, r);
        assert_eq!(sc.shape(), &[want.len(), H / 128]);
        for (i, &(s, t)) in want.iter().enumerate() {
            assert_eq!(
                &got.recv_x.bytes()[i * H..(i + 1) * H],
                &codes[s][t * H..(t + 1) * H],
                "rank {r} row {i} codes"
            );
            let ws: Vec<u8> = scales[s][t * 2..t * 2 + 2]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            assert_eq!(
                &sc.bytes()[i * 8..(i + 1) * 8],
                &ws[..],
                "rank {r} row {i} scales"
            );
        }
    }
}

// ---- low-latency dispatch / combine ---------------------------------------------

/// act_quant (SPEC.md §2), written out here.
fn act_quant_row(x: &[f32], ue8m0: bool) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::new();
    let mut s = Vec::new();
    for g in 0..x.len() / 128 {
        let grp = &x[g * 128..(g + 1) * 128];
        let mut amax = 1e-4f32;
        for v in grp {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let mut sc = amax / 448.0;
        if ue8m0 {
            sc = (sc as f64).log2().ceil().exp2() as f32;
        }
        for &v in grp {
            q.push(f32_to_e4m3(v / sc));
        }
        s.push(sc);
    }
    (q, s)
}

struct LlResult {
    recv_x: HostTensor,
    recv_scales: Option<HostTensor>,
    recv_count: Vec<i64>,
    handle: LowLatencyHandle,
    out: Vec<f32>,
}

/// Low-latency dispatch of `all`; every local expert `l` computes
/// `y = bf16(x · (l + 1))` (x dequantized with FP8), then combine.
fn run_low_latency(all: &[Input], use_fp8: bool, ue8m0: bool) -> Vec<LlResult> {
    run_ranks(R, |rank, comm| {
        let b = CpuRef;
        let inp = &all[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, H], &inp.x))?;
        let topk = up_topk(&b, rank, inp)?;
        let d = ops::low_latency_dispatch(
            &b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &topk,
                num_experts: E,
                max_tokens_per_rank: MAX_TOKENS,
                use_fp8,
                ue8m0,
            },
        )?;
        let recv_x = b.download(&d.recv_x)?;
        let recv_scales = d.recv_scales.as_ref().map(|t| b.download(t)).transpose()?;
        let cap = MAX_TOKENS * R;
        let xv = recv_x.to_f32_vec();
        let sv = recv_scales.as_ref().map(|s| s.to_f32_vec());
        let mut y = vec![0f32; EPR * cap * H];
        for l in 0..EPR {
            for slot in 0..cap {
                for i in 0..H {
                    let at = (l * cap + slot) * H + i;
                    let v = match &sv {
                        Some(s) => xv[at] * s[(l * cap + slot) * (H / 128) + i / 128],
                        None => xv[at],
                    };
                    y[at] = v * (l + 1) as f32;
                }
            }
        }
        let yt = b.upload(&HostTensor::from_f32(DType::BF16, &[EPR, cap, H], &y))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let mut o = b.alloc(DType::BF16, &[inp.n, H])?;
        ops::low_latency_combine(
            &b,
            comm,
            LowLatencyCombine {
                x: &yt,
                topk_idx: &topk,
                topk_weights: &w,
                handle: &d.handle,
                out: &mut o,
            },
        )?;
        Ok(LlResult {
            recv_x,
            recv_scales,
            recv_count: b.download(&d.recv_count)?.to_i64_vec(),
            handle: d.handle.clone(),
            out: b.download(&o)?.to_f32_vec(),
        })
    })
    .unwrap()
}

fn check_low_latency(use_fp8: bool, ue8m0: bool) {
    let all = inputs(false);
    let res = run_low_latency(&all, use_fp8, ue8m0);
    let cap = MAX_TOKENS * R;
    let g = H / 128;
    for (r, got) in res.iter().enumerate() {
        assert_eq!(got.recv_x.shape(), &[EPR, cap, H]);
        assert_eq!(
            got.recv_x.dtype(),
            if use_fp8 { DType::F8E4M3 } else { DType::BF16 }
        );
        assert_eq!(got.handle.rank, r);
        assert_eq!(got.handle.num_tokens, all[r].n);
        let es = if use_fp8 { 1 } else { 2 };
        for l in 0..EPR {
            let ge = (r * EPR + l) as i64;
            let mut want: Vec<(usize, usize)> = Vec::new();
            for (s, inp) in all.iter().enumerate() {
                for t in 0..inp.n {
                    if inp.topk[t * K..(t + 1) * K].contains(&ge) {
                        want.push((s, t));
                    }
                }
            }
            let mut slots = got.handle.recv_src[l].clone();
            assert_eq!(got.recv_count[l], want.len() as i64, "rank {r} expert {l}");
            slots.sort();
            assert_eq!(slots, want, "rank {r} expert {l} sources");
            for (slot, &(s, t)) in got.handle.recv_src[l].iter().enumerate() {
                let at = l * cap + slot;
                let row = &got.recv_x.bytes()[at * H * es..(at + 1) * H * es];
                let src = &all[s].x[t * H..(t + 1) * H];
                if use_fp8 {
                    let (q, sc) = act_quant_row(src, ue8m0);
                    assert_eq!(row, &q[..], "rank {r} expert {l} ({s},{t}) codes");
                    let gs = got.recv_scales.as_ref().unwrap().to_f32_vec();
                    for (j, want_s) in sc.iter().enumerate() {
                        assert_eq!(
                            gs[at * g + j].to_bits(),
                            want_s.to_bits(),
                            "rank {r} expert {l} ({s},{t}) scale {j}"
                        );
                    }
                } else {
                    assert_bf16_eq(
                        row,
                        &bf16_bytes(src),
                        &format!("rank {r} expert {l} ({s},{t})"),
                    );
                }
            }
            // Unfilled slots are zero.
            let filled = want.len();
            let tail = &got.recv_x.bytes()[(l * cap + filled) * H * es..(l + 1) * cap * H * es];
            assert!(tail.iter().all(|&b| b == 0), "rank {r} expert {l} unfilled");
            if let Some(s) = &got.recv_scales {
                let sv = s.to_f32_vec();
                assert!(sv[(l * cap + filled) * g..(l + 1) * cap * g]
                    .iter()
                    .all(|&v| v == 0.0));
            }
        }
        // Combine: out[t] = bf16(Σ_k w · y_k), y_k = bf16(x̂ · (local expert + 1)).
        let inp = &all[r];
        let mut want = vec![0f32; inp.n * H];
        for t in 0..inp.n {
            let src = &inp.x[t * H..(t + 1) * H];
            let xhat: Vec<f32> = if use_fp8 {
                let (q, sc) = act_quant_row(src, ue8m0);
                (0..H).map(|i| e4m3_to_f32(q[i]) * sc[i / 128]).collect()
            } else {
                src.to_vec()
            };
            for i in 0..H {
                let mut acc = 0f64;
                for j in 0..K {
                    let e = inp.topk[t * K + j];
                    if e < 0 {
                        continue;
                    }
                    let l = e as usize % EPR;
                    let y = round_bf16(xhat[i] * (l + 1) as f32);
                    acc += inp.w[t * K + j] as f64 * y as f64;
                }
                want[t * H + i] = round_bf16(acc as f32);
            }
        }
        let d = calc_diff(&got.out, &want);
        assert!(d < 5e-6, "rank {r} combine calc_diff {d}");
        for (i, (&a, &b)) in got.out.iter().zip(&want).enumerate() {
            let tol = deepport_core::formats::ulp_bf16(b);
            assert!((a - b).abs() <= tol, "rank {r} out[{i}] {a} vs {b}");
        }
        if r == 2 {
            assert!(got.out[4 * H..5 * H].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn low_latency_bf16() {
    check_low_latency(false, false);
}

#[test]
fn low_latency_fp8() {
    check_low_latency(true, false);
}

#[test]
fn low_latency_fp8_ue8m0() {
    check_low_latency(true, true);
}

#[test]
fn low_latency_repeated_expert_sums_both_weights() {
    // One rank, two experts; the token lists expert 1 twice.
    let comms = ThreadComm::group(1);
    let b = CpuRef;
    let xs: Vec<f32> = (0..H).map(|i| (i % 7) as f32 - 3.0).collect();
    let x = b
        .upload(&HostTensor::from_f32(DType::BF16, &[1, H], &xs))
        .unwrap();
    let topk = b
        .upload(&HostTensor::from_i64(&[1, 3], &[1, -1, 1]))
        .unwrap();
    let d = ops::low_latency_dispatch(
        &b,
        &comms[0],
        LowLatencyDispatch {
            x: &x,
            topk_idx: &topk,
            num_experts: 2,
            max_tokens_per_rank: 2,
            use_fp8: false,
            ue8m0: false,
        },
    )
    .unwrap();
    assert_eq!(b.download(&d.recv_count).unwrap().to_i64_vec(), vec![0, 2]);
    assert_eq!(d.handle.recv_src[1], vec![(0, 0), (0, 0)]);
    let w = b
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[1, 3],
            &[0.5, 9.0, 0.25],
        ))
        .unwrap();
    let mut o = b.alloc(DType::BF16, &[1, H]).unwrap();
    ops::low_latency_combine(
        &b,
        &comms[0],
        LowLatencyCombine {
            x: &d.recv_x,
            topk_idx: &topk,
            topk_weights: &w,
            handle: &d.handle,
            out: &mut o,
        },
    )
    .unwrap();
    let want: Vec<f32> = xs.iter().map(|v| v * 0.75).collect();
    assert_bf16_eq(
        b.download(&o).unwrap().bytes(),
        &bf16_bytes(&want),
        "repeated expert",
    );
}

// ---- errors ------------------------------------------------------------------

fn dispatch_one(
    comm: &dyn Communicator,
    rank: usize,
    inp: &Input,
    num_experts: usize,
) -> Result<DispatchOutput> {
    let b = CpuRef;
    let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, H], &inp.x))?;
    let topk = up_topk(&b, rank, inp)?;
    let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
    ops::dispatch(
        &b,
        comm,
        Dispatch {
            x: &x,
            x_scales: None,
            topk_idx: &topk,
            topk_weights: &w,
            num_experts,
            expert_alignment: 1,
        },
    )
}

#[test]
fn bad_expert_id_fails_that_rank_precisely_and_the_others_fast() {
    let mut all = inputs(false);
    all[2].topk[3 * K + 1] = E as i64; // rank 2, token 3, k 1
    let start = Instant::now();
    let errs = run_ranks(R, |rank, comm| {
        Ok(dispatch_one(comm, rank, &all[rank], E).err())
    })
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    for (r, e) in errs.iter().enumerate() {
        match (r, e) {
            (
                2,
                Some(Error::IndexOutOfRange {
                    arg,
                    position,
                    value,
                    ..
                }),
            ) => {
                assert_eq!(*arg, "topk_idx");
                assert_eq!(position, &vec![3, 1]);
                assert_eq!(*value, E as i64);
            }
            (r, Some(Error::Comm { rank, msg })) if r != 2 => {
                assert_eq!(*rank, r);
                assert!(msg.contains("rank 2"), "{msg}");
            }
            (r, other) => panic!("rank {r}: unexpected {other:?}"),
        }
    }
}

#[test]
fn experts_not_divisible_by_world_is_invalid() {
    let all = inputs(false);
    // 6 experts on 4 ranks; every rank's ids stay below 6.
    let all: Vec<Input> = all
        .into_iter()
        .map(|mut i| {
            i.topk
                .iter_mut()
                .for_each(|e| *e = if *e < 0 { -1 } else { *e % 6 });
            i
        })
        .collect();
    let errs = run_ranks(R, |rank, comm| {
        Ok(dispatch_one(comm, rank, &all[rank], 6).err())
    })
    .unwrap();
    for (r, e) in errs.iter().enumerate() {
        assert!(
            matches!(
                e,
                Some(Error::Invalid {
                    arg: "num_experts",
                    ..
                })
            ),
            "rank {r}: {e:?}"
        );
    }
}

#[test]
fn combine_with_foreign_handle_is_invalid() {
    let all = inputs(true);
    let errs = run_ranks(R, |rank, comm| {
        let b = CpuRef;
        let d = dispatch_one(comm, rank, &all[rank], E)?;
        let mut handle = d.handle.clone();
        if rank == 1 {
            handle.rank = 0;
        }
        let mut o = b.alloc(DType::BF16, &[all[rank].n, H])?;
        Ok(ops::combine(
            &b,
            comm,
            Combine {
                x: &d.recv_x,
                handle: &handle,
                out: &mut o,
            },
        )
        .err())
    })
    .unwrap();
    for (r, e) in errs.iter().enumerate() {
        if r == 1 {
            assert!(
                matches!(e, Some(Error::Invalid { arg: "handle", .. })),
                "rank 1: {e:?}"
            );
        } else {
            assert!(matches!(e, Some(Error::Comm { .. })), "rank {r}: {e:?}");
        }
    }
}

#[test]
fn low_latency_combine_with_other_routing_is_invalid() {
    let all = inputs(false);
    let errs = run_ranks(R, |rank, comm| {
        let b = CpuRef;
        let inp = &all[rank];
        let x = b.upload(&HostTensor::from_f32(DType::BF16, &[inp.n, H], &inp.x))?;
        let topk = up_topk(&b, rank, inp)?;
        let d = ops::low_latency_dispatch(
            &b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &topk,
                num_experts: E,
                max_tokens_per_rank: MAX_TOKENS,
                use_fp8: false,
                ue8m0: false,
            },
        )?;
        // Rank 0 combines with a routing where token 0 moved to another expert.
        let mut tk = inp.topk.clone();
        if rank == 0 {
            let e = tk[0];
            tk[0] = if e < 0 { 0 } else { (e + 1) % E as i64 };
            if tk[1..K].contains(&tk[0]) {
                tk[0] = -1;
            }
        }
        let topk2 = b.upload(&HostTensor::from_i64(&[inp.n, K], &tk))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[inp.n, K], &inp.w))?;
        let mut o = b.alloc(DType::BF16, &[inp.n, H])?;
        Ok(ops::low_latency_combine(
            &b,
            comm,
            LowLatencyCombine {
                x: &d.recv_x,
                topk_idx: &topk2,
                topk_weights: &w,
                handle: &d.handle,
                out: &mut o,
            },
        )
        .err())
    })
    .unwrap();
    assert!(
        matches!(
            errs[0],
            Some(Error::Invalid {
                arg: "topk_idx",
                ..
            })
        ),
        "rank 0: {:?}",
        errs[0]
    );
    for (r, e) in errs.iter().enumerate().skip(1) {
        assert!(e.is_none(), "rank {r}: {e:?}");
    }
}

#[test]
fn low_latency_rejects_out_of_range_and_too_many_tokens() {
    let comms = ThreadComm::group(1);
    let b = CpuRef;
    let x = b.upload(&HostTensor::zeros(DType::BF16, &[3, H])).unwrap();
    let run = |topk: &[i64], max: usize| {
        let t = b.upload(&HostTensor::from_i64(&[3, 2], topk)).unwrap();
        ops::low_latency_dispatch(
            &b,
            &comms[0],
            LowLatencyDispatch {
                x: &x,
                topk_idx: &t,
                num_experts: 4,
                max_tokens_per_rank: max,
                use_fp8: true,
                ue8m0: false,
            },
        )
    };
    match run(&[0, 1, 2, 3, -1, 4], 3) {
        Err(Error::IndexOutOfRange {
            arg,
            position,
            value,
            ..
        }) => {
            assert_eq!(arg, "topk_idx");
            assert_eq!(position, vec![2, 1]);
            assert_eq!(value, 4);
        }
        other => panic!("expected IndexOutOfRange, got {:?}", other.err()),
    }
    assert!(run(&[0, 1, 2, 3, -1, 0], 2).is_err());
    assert!(run(&[0, 1, 2, 3, -1, 0], 3).is_ok());
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_not_hang() {
    let all = inputs(false);
    let comms = ThreadComm::group_with_timeout(R, Duration::from_millis(300));
    let start = Instant::now();
    let results: Vec<Option<Result<DispatchOutput>>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let inp = &all[rank];
                s.spawn(move || {
                    if rank == 3 {
                        drop(comm); // never joins the collective
                        None
                    } else {
                        Some(dispatch_one(&comm, rank, inp, E))
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(20));
    for (r, res) in results.iter().enumerate().take(3) {
        match res {
            Some(Err(Error::Comm { rank, .. })) => assert_eq!(*rank, r),
            other => panic!(
                "rank {r}: expected a comm error, got {:?}",
                other.as_ref().map(|o| o.as_ref().err())
            ),
        }
    }
}

/// f32 payloads (deepport's f32 numerics mode) travel bit-exact through the
/// low-latency path, and the combine sums them with one f32 rounding.
#[test]
fn low_latency_f32_payload_round_trip() {
    use deepport_core::backend::{alloc_poisoned, Backend};
    use deepport_core::ops::{LowLatencyCombine, LowLatencyDispatch};
    use deepport_core::{comm::run_ranks, DType, HostTensor};
    let (world, e, k, hidden, n) = (2usize, 4usize, 2usize, 8usize, 3usize);
    let results = run_ranks(world, |rank, comm| {
        let b = deepport_cpu::CpuRef;
        let xs: Vec<f32> = (0..n * hidden)
            .map(|i| (i as f32 + 0.1) * (rank as f32 + 1.0) / 7.0)
            .collect();
        let ids: Vec<i64> = (0..n)
            .flat_map(|t| [(t % e) as i64, ((t + 2) % e) as i64])
            .collect();
        let ws: Vec<f32> = (0..n).flat_map(|_| [0.25f32, 0.75]).collect();
        let x = b.upload(&HostTensor::from_f32(DType::F32, &[n, hidden], &xs))?;
        let idx = b.upload(&HostTensor::from_i64(&[n, k], &ids))?;
        let w = b.upload(&HostTensor::from_f32(DType::F32, &[n, k], &ws))?;
        let d = deepport_core::ops::low_latency_dispatch(
            &b,
            comm,
            LowLatencyDispatch {
                x: &x,
                topk_idx: &idx,
                num_experts: e,
                max_tokens_per_rank: n,
                use_fp8: false,
                ue8m0: false,
            },
        )?;
        assert_eq!(d.recv_x.dtype(), DType::F32);
        // Experts are the identity: the combine must return Σ w · x = x.
        let mut out = alloc_poisoned(&b, DType::F32, &[n, hidden])?;
        deepport_core::ops::low_latency_combine(
            &b,
            comm,
            LowLatencyCombine {
                x: &d.recv_x,
                topk_idx: &idx,
                topk_weights: &w,
                handle: &d.handle,
                out: &mut out,
            },
        )?;
        Ok((xs, b.download(&out)?.to_f32_vec()))
    })
    .unwrap();
    for (xs, out) in results {
        assert_eq!(
            xs, out,
            "0.25·x + 0.75·x must round back to x exactly in f32"
        );
    }
}

// ---- core's protocol: reproducibility, rank-count independence, device path --

/// The low-latency round trip of every global token over `world` ranks:
/// expert `g` returns its row scaled by `(g + 1) / 8`. Returns every token's
/// combined output, in global token order.
fn ll_round_trip(world: usize, comm_of: &dyn Fn(usize) -> Vec<Box<dyn Communicator>>) -> Vec<u32> {
    const N: usize = 12;
    let mut rng = rng(77);
    let x: Vec<f32> = (0..N * H)
        .map(|_| round_bf16((rng.uniform() * 2.0 - 1.0) as f32))
        .collect();
    let topk: Vec<i64> = (0..N * K)
        .map(|i| if i % 7 == 3 { -1 } else { rng.below(E) as i64 })
        .collect();
    let w: Vec<f32> = (0..N * K).map(|_| rng.uniform() as f32).collect();
    let per = N / world;
    let epr = E / world;
    let comms = comm_of(world);
    let outs: Vec<Vec<u32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (x, topk, w) = (&x, &topk, &w);
                s.spawn(move || -> Result<Vec<u32>> {
                    let b = CpuRef;
                    let t0 = rank * per;
                    let xt = b.upload(&HostTensor::from_f32(
                        DType::BF16,
                        &[per, H],
                        &x[t0 * H..(t0 + per) * H],
                    ))?;
                    let tk = b.upload(&HostTensor::from_i64(
                        &[per, K],
                        &topk[t0 * K..(t0 + per) * K],
                    ))?;
                    let wt = b.upload(&HostTensor::from_f32(
                        DType::F32,
                        &[per, K],
                        &w[t0 * K..(t0 + per) * K],
                    ))?;
                    let d = ops::low_latency_dispatch(
                        &b,
                        comm.as_ref(),
                        LowLatencyDispatch {
                            x: &xt,
                            topk_idx: &tk,
                            num_experts: E,
                            max_tokens_per_rank: N,
                            use_fp8: false,
                            ue8m0: false,
                        },
                    )?;
                    let cap = N * world;
                    let mut y = b.download(&d.recv_x)?.to_f32_vec();
                    for l in 0..epr {
                        let g = rank * epr + l;
                        for v in &mut y[l * cap * H..(l + 1) * cap * H] {
                            *v *= (g + 1) as f32 / 8.0;
                        }
                    }
                    let yt = b.upload(&HostTensor::from_f32(DType::F32, &[epr, cap, H], &y))?;
                    let mut o = b.alloc(DType::BF16, &[per, H])?;
                    ops::low_latency_combine(
                        &b,
                        comm.as_ref(),
                        LowLatencyCombine {
                            x: &yt,
                            topk_idx: &tk,
                            topk_weights: &wt,
                            handle: &d.handle,
                            out: &mut o,
                        },
                    )?;
                    Ok(b.download(&o)?
                        .to_f32_vec()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank panicked").expect("rank failed"))
            .collect()
    });
    outs.concat()
}

fn thread_comms(world: usize) -> Vec<Box<dyn Communicator>> {
    ThreadComm::group(world)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect()
}

#[test]
fn low_latency_combine_is_the_same_bits_for_any_rank_count_and_run() {
    let one = ll_round_trip(1, &thread_comms);
    assert!(one.iter().any(|&b| b != 0), "combine produced nothing");
    for world in [2, 4] {
        assert_eq!(ll_round_trip(world, &thread_comms), one, "R = {world}");
    }
    assert_eq!(ll_round_trip(4, &thread_comms), one, "second run");
}

#[test]
fn normal_combine_is_bit_identical_run_to_run() {
    let all = inputs(false);
    let a = run_dispatch_combine(&all, 1, true);
    let b = run_dispatch_combine(&all, 1, true);
    for (r, (x, y)) in a.iter().zip(&b).enumerate() {
        let bits = |h: &Option<HostTensor>| h.as_ref().expect("combined").bytes().to_vec();
        assert_eq!(
            bits(&x.combined),
            bits(&y.combined),
            "rank {r}: combine differs between runs"
        );
        assert_eq!(x.recv_x.bytes(), y.recv_x.bytes(), "rank {r}: payload");
    }
}

/// A transport with a device path: payload rows of `cpu-ref` tensors move
/// through a side channel of their own (here: the inner group's byte
/// exchange on the rows' raw bytes), never inside the control messages.
struct DevicePath {
    inner: ThreadComm,
    calls: std::sync::atomic::AtomicUsize,
}

impl Communicator for DevicePath {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.inner.all_to_all_v(send)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn device(&self) -> Option<&dyn deepport_core::comm::DeviceExchange> {
        Some(self)
    }
}

impl deepport_core::comm::DeviceExchange for DevicePath {
    fn accepts(&self, backend: &dyn Backend) -> bool {
        backend.name() == CpuRef::NAME
    }
    fn exchange_rows(
        &self,
        backend: &dyn Backend,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let h = backend.download(send)?;
        let row = h.bytes().len() / send_rows.iter().sum::<usize>().max(1);
        let mut at = 0;
        let msgs = send_rows
            .iter()
            .map(|&n| {
                let m = h.bytes()[at..at + n * row].to_vec();
                at += n * row;
                m
            })
            .collect();
        let got = self.inner.all_to_all_v(msgs)?;
        let mut shape = send.shape().to_vec();
        shape[0] = recv_rows.iter().sum();
        backend.upload(&HostTensor::from_bytes(send.dtype(), &shape, got.concat())?)
    }
}

#[test]
fn the_device_path_moves_the_payload_and_gives_the_same_bits() {
    let staged = ll_round_trip(4, &thread_comms);
    let counters = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let c2 = counters.clone();
    let via_device = ll_round_trip(4, &move |world| {
        ThreadComm::group(world)
            .into_iter()
            .map(|inner| {
                let d = std::sync::Arc::new(DevicePath {
                    inner,
                    calls: Default::default(),
                });
                c2.lock().unwrap().push(d.clone());
                Box::new(Fwd(d)) as Box<dyn Communicator>
            })
            .collect()
    });
    assert_eq!(via_device, staged);
    let calls: usize = counters
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.calls.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    // Each of 4 ranks: one payload in dispatch, one in combine.
    assert_eq!(calls, 8, "the payload did not take the device path");
}

/// Forwards to a shared [`DevicePath`] (the test reads its count after).
struct Fwd(std::sync::Arc<DevicePath>);

impl Communicator for Fwd {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.0.all_to_all_v(send)
    }
    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
    fn device(&self) -> Option<&dyn deepport_core::comm::DeviceExchange> {
        Some(self.0.as_ref())
    }
}

/// Counts the flat exchanges of a [`ThreadComm`] (the default bodies of
/// `all_to_all_v_flat` and `all_to_all_v_rows` run on top of it).
struct CountFlat {
    inner: ThreadComm,
    rows: std::sync::atomic::AtomicUsize,
    flat: std::sync::atomic::AtomicUsize,
}

impl Communicator for CountFlat {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.inner.all_to_all_v(send)
    }
    fn all_to_all_v_flat(
        &self,
        send: Vec<u8>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<u8>> {
        self.flat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.all_to_all_v_flat(send, send_counts, recv_counts)
    }
    fn all_to_all_v_rows(
        &self,
        src: &Tensor,
        order: &[i64],
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Vec<u8>> {
        self.rows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The default body (pack, then this transport's flat exchange).
        let (bytes, row) = deepport_core::comm::host_rows(self.rank(), src)?;
        let mut send = Vec::new();
        deepport_core::comm::pack_rows(self.rank(), bytes, row, order, &mut send)?;
        let c = |v: &[usize]| deepport_core::comm::row_counts(self.rank(), v, row);
        self.all_to_all_v_flat(send, &c(send_rows)?, &c(recv_rows)?)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}

struct FwdCount(std::sync::Arc<CountFlat>);

impl Communicator for FwdCount {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.0.all_to_all_v(send)
    }
    fn all_to_all_v_flat(&self, s: Vec<u8>, sc: &[usize], rc: &[usize]) -> Result<Vec<u8>> {
        self.0.all_to_all_v_flat(s, sc, rc)
    }
    fn all_to_all_v_rows(
        &self,
        src: &Tensor,
        order: &[i64],
        sr: &[usize],
        rr: &[usize],
    ) -> Result<Vec<u8>> {
        self.0.all_to_all_v_rows(src, order, sr, rr)
    }
    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
}

#[test]
fn host_memory_payloads_are_sent_in_place_and_give_the_same_bits() {
    let staged = ll_round_trip(4, &thread_comms);
    let counters = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let c2 = counters.clone();
    let counted = ll_round_trip(4, &move |world| {
        ThreadComm::group(world)
            .into_iter()
            .map(|inner| {
                let d = std::sync::Arc::new(CountFlat {
                    inner,
                    rows: Default::default(),
                    flat: Default::default(),
                });
                c2.lock().unwrap().push(d.clone());
                Box::new(FwdCount(d)) as Box<dyn Communicator>
            })
            .collect()
    });
    assert_eq!(counted, staged);
    let sum = |f: &dyn Fn(&CountFlat) -> usize| -> usize {
        counters.lock().unwrap().iter().map(|d| f(d)).sum()
    };
    use std::sync::atomic::Ordering::Relaxed;
    // Each of 4 ranks: one payload in dispatch, one in combine, each sent
    // from the tensor in place (`all_to_all_v_rows`), none downloaded.
    assert_eq!(
        sum(&|d| d.rows.load(Relaxed)),
        8,
        "payloads not sent in place"
    );
    assert_eq!(sum(&|d| d.flat.load(Relaxed)), 8);
}
