//! The MPI side of `tests/mpirun.rs`: run under `mpirun -np N`.
//!
//! * `ops`: every expert-parallel op of SPEC.md §7 — layout, dispatch +
//!   combine, low-latency dispatch + combine — with bf16 and FP8 payloads,
//!   on `cpu-ref` over [`MpiComm`]; each rank also runs the same step on N
//!   in-process ranks ([`run_ranks`]) and checks that its own outputs are
//!   the same bytes. Prints `ops: N checks equal on rank R` per rank.
//! * `die RANK SECS`: after a barrier (start-up deadline) the deadline
//!   becomes SECS; after two more collectives rank RANK kills itself
//!   (SIGKILL); the others keep calling collectives and must fail within
//!   the deadline.
//! * `stall RANK SECS`: the same, but rank RANK stops itself (SIGSTOP) — a
//!   rank that neither dies nor answers.
//! * `mismatch RANK`: a handshake in which rank RANK has another hidden
//!   size; every rank must fail naming `hidden`.
//! * `a2a`: all_to_all_v of odd sizes (0, 1, large) checked byte by byte.
//!
//! Exit status: 0 on success, 1 on a wrong result, 3 on an error (after
//! printing `rank R: error: …`).

use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::{run_ranks, Transport};
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor, Result};
use deepport_mpi::MpiComm;
use std::collections::BTreeMap;
use std::process::ExitCode;

type Outputs = BTreeMap<String, Vec<u8>>;

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
    }
}

#[derive(Clone, Copy)]
struct Case {
    experts: usize,
    tokens: usize,
    hidden: usize,
    topk: usize,
}

fn inputs(c: &Case, seed: u64, rank: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((rank as u64 + 1) * 7919));
    let x = (0..c.tokens * c.hidden).map(|_| r.f32()).collect();
    let mut idx = Vec::new();
    let mut w = Vec::new();
    for t in 0..c.tokens {
        let mut chosen: Vec<i64> = Vec::new();
        while chosen.len() < c.topk {
            let e = (r.next() % c.experts as u64) as i64;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for (j, e) in chosen.into_iter().enumerate() {
            // Some −1 entries, and the last token routed nowhere.
            let none = t + 1 == c.tokens || (t + j) % 7 == 3;
            idx.push(if none { -1 } else { e });
            w.push(if none {
                0.0
            } else {
                0.1 + (r.next() % 90) as f32 / 100.0
            });
        }
    }
    (x, idx, w)
}

fn bytes(b: &dyn Backend, t: &Tensor) -> Result<Vec<u8>> {
    Ok(b.download(t)?.into_bytes())
}

fn layout(b: &dyn Backend, c: &Case, world: usize, rank: usize) -> Result<Outputs> {
    let (_, idx, _) = inputs(c, 1, rank);
    let idx = b.upload(&HostTensor::from_i64(&[c.tokens, c.topk], &idx))?;
    let mut per_rank = b.alloc(DType::I32, &[world])?;
    let mut per_expert = b.alloc(DType::I32, &[c.experts])?;
    let mut in_rank = b.alloc(DType::Bool, &[c.tokens, world])?;
    ops::run(
        b,
        GetDispatchLayout {
            topk_idx: &idx,
            num_tokens_per_rank: &mut per_rank,
            num_tokens_per_expert: &mut per_expert,
            is_token_in_rank: &mut in_rank,
            num_experts: c.experts,
            world_size: world,
        },
    )?;
    Ok(Outputs::from([
        ("per_rank".into(), bytes(b, &per_rank)?),
        ("per_expert".into(), bytes(b, &per_expert)?),
        ("in_rank".into(), bytes(b, &in_rank)?),
    ]))
}

/// Dispatch + combine; `fp8`: an e4m3 payload with per-128 scales.
fn normal(b: &dyn Backend, comm: &dyn Transport, c: &Case, fp8: bool) -> Result<Outputs> {
    let (x, idx, w) = inputs(c, 2, comm.rank());
    let (x, xs) = if fp8 {
        let q = HostTensor::from_f32(DType::F8E4M3, &[c.tokens, c.hidden], &x);
        let s: Vec<f32> = (0..c.tokens * c.hidden / 128)
            .map(|i| 0.5 + i as f32 / 64.0)
            .collect();
        let s = HostTensor::from_f32(DType::F32, &[c.tokens, c.hidden / 128], &s);
        (b.upload(&q)?, Some(b.upload(&s)?))
    } else {
        (
            b.upload(&HostTensor::from_f32(
                DType::BF16,
                &[c.tokens, c.hidden],
                &x,
            ))?,
            None,
        )
    };
    let idx = b.upload(&HostTensor::from_i64(&[c.tokens, c.topk], &idx))?;
    let w = b.upload(&HostTensor::from_f32(DType::F32, &[c.tokens, c.topk], &w))?;
    let out = ops::dispatch(
        b,
        comm,
        Dispatch {
            x: &x,
            x_scales: xs.as_ref(),
            topk_idx: &idx,
            topk_weights: &w,
            num_experts: c.experts,
            expert_alignment: 4,
        },
    )?;
    let mut o = Outputs::new();
    o.insert("recv_x".into(), bytes(b, &out.recv_x)?);
    if let Some(s) = &out.recv_scales {
        o.insert("recv_scales".into(), bytes(b, s)?);
    }
    o.insert("recv_topk_idx".into(), bytes(b, &out.recv_topk_idx)?);
    o.insert(
        "recv_topk_weights".into(),
        bytes(b, &out.recv_topk_weights)?,
    );
    o.insert(
        "counts".into(),
        format!(
            "{:?} {:?}",
            out.num_recv_tokens_per_expert, out.handle.recv_src
        )
        .into_bytes(),
    );
    // The "expert": the received rows as bf16, scaled.
    let rx = b.download(&out.recv_x)?.to_f32_vec();
    let y: Vec<f32> = rx.iter().map(|v| v * 0.75).collect();
    let y = b.upload(&HostTensor::from_f32(DType::BF16, out.recv_x.shape(), &y))?;
    let mut combined = b.alloc(DType::BF16, &[c.tokens, c.hidden])?;
    ops::combine(
        b,
        comm,
        Combine {
            x: &y,
            handle: &out.handle,
            out: &mut combined,
        },
    )?;
    o.insert("combine".into(), bytes(b, &combined)?);
    Ok(o)
}

/// Low-latency dispatch + combine with a bf16 or FP8 (UE8M0 or float
/// scales) payload.
fn low_latency(
    b: &dyn Backend,
    comm: &dyn Transport,
    c: &Case,
    fp8: bool,
    ue8m0: bool,
) -> Result<Outputs> {
    let (x, idx, w) = inputs(c, 3, comm.rank());
    let x = b.upload(&HostTensor::from_f32(
        DType::BF16,
        &[c.tokens, c.hidden],
        &x,
    ))?;
    let idx = b.upload(&HostTensor::from_i64(&[c.tokens, c.topk], &idx))?;
    let w = b.upload(&HostTensor::from_f32(DType::F32, &[c.tokens, c.topk], &w))?;
    let out = ops::low_latency_dispatch(
        b,
        comm,
        LowLatencyDispatch {
            x: &x,
            topk_idx: &idx,
            num_experts: c.experts,
            max_tokens_per_rank: c.tokens,
            use_fp8: fp8,
            ue8m0,
        },
    )?;
    let mut o = Outputs::new();
    // Slot order is defined by the protocol (source rank, then token), so
    // whole buffers compare; unfilled slots are not compared.
    let slots = c.tokens * comm.world_size();
    let rx = b.download(&out.recv_x)?;
    let row = c.hidden * rx.dtype().size();
    let mut filled = Vec::new();
    for (e, list) in out.handle.recv_src.iter().enumerate() {
        for j in 0..list.len() {
            let at = (e * slots + j) * row;
            filled.extend_from_slice(&rx.bytes()[at..at + row]);
        }
    }
    o.insert("recv_x".into(), filled);
    o.insert(
        "recv_src".into(),
        format!("{:?}", out.handle.recv_src).into_bytes(),
    );
    o.insert("recv_count".into(), bytes(b, &out.recv_count)?);
    let y: Vec<f32> = match &out.recv_scales {
        None => rx.to_f32_vec(),
        Some(s) => {
            let s = b.download(s)?.to_f32_vec();
            rx.to_f32_vec()
                .iter()
                .enumerate()
                .map(|(i, v)| v * s[i / 128])
                .collect()
        }
    };
    let y = b.upload(&HostTensor::from_f32(
        DType::BF16,
        &[out.recv_x.shape()[0], slots, c.hidden],
        &y,
    ))?;
    let mut combined = b.alloc(DType::BF16, &[c.tokens, c.hidden])?;
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
    o.insert("combine".into(), bytes(b, &combined)?);
    Ok(o)
}

type Step = fn(&dyn Backend, &dyn Transport, &Case) -> Result<Outputs>;

fn steps() -> Vec<(&'static str, Step)> {
    vec![
        ("layout", |b, c, k| layout(b, k, c.world_size(), c.rank())),
        ("dispatch+combine bf16", |b, c, k| normal(b, c, k, false)),
        ("dispatch+combine e4m3", |b, c, k| normal(b, c, k, true)),
        ("low_latency bf16", |b, c, k| {
            low_latency(b, c, k, false, false)
        }),
        ("low_latency e4m3", |b, c, k| {
            low_latency(b, c, k, true, false)
        }),
        ("low_latency e4m3 ue8m0", |b, c, k| {
            low_latency(b, c, k, true, true)
        }),
    ]
}

fn cpu_ref() -> Result<Box<dyn Backend>> {
    let mut reg = deepport_core::registry::Registry::new();
    deepport_cpu::register(&mut reg);
    reg.create("cpu-ref")
}

fn cmd_ops(comm: &MpiComm) -> Result<bool> {
    let world = comm.world_size();
    let me = comm.rank();
    let b = cpu_ref()?;
    let mut ok = true;
    let mut n = 0;
    for c in [
        Case {
            experts: 4 * world,
            tokens: 9,
            hidden: 256,
            topk: 3,
        },
        Case {
            experts: 8 * world,
            tokens: 33,
            hidden: 512,
            topk: 6.min(8 * world),
        },
    ] {
        for (name, step) in steps() {
            let mine = step(b.as_ref(), comm, &c)?;
            let threads = run_ranks(world, |_, tc| {
                let b = cpu_ref()?;
                step(b.as_ref(), tc, &c)
            })?;
            let want = &threads[me];
            for (k, v) in want {
                n += 1;
                if mine.get(k) != Some(v) {
                    ok = false;
                    println!(
                        "rank {me}: {name} (tokens {}): `{k}` differs from the in-process run",
                        c.tokens
                    );
                }
            }
            if mine.len() != want.len() {
                ok = false;
                println!("rank {me}: {name}: other outputs than the in-process run");
            }
        }
    }
    println!(
        "ops: {n} checks {} on rank {me}",
        if ok { "equal" } else { "NOT all equal" }
    );
    Ok(ok)
}

fn cmd_a2a(comm: &MpiComm) -> Result<bool> {
    let (world, me) = (comm.world_size(), comm.rank());
    let msg = |src: usize, dst: usize, round: usize| -> Vec<u8> {
        let len = match (src + dst + round) % 4 {
            0 => 0,
            1 => 1,
            2 => 1000 + src * 17,
            _ => 3 << 20,
        };
        (0..len)
            .map(|i| (i * 31 + src * 7 + dst * 3 + round) as u8)
            .collect()
    };
    let mut ok = true;
    for round in 0..6 {
        let recv = comm.all_to_all_v((0..world).map(|d| msg(me, d, round)).collect())?;
        for (src, got) in recv.iter().enumerate() {
            if *got != msg(src, me, round) {
                ok = false;
                println!("rank {me}: round {round}: the message from rank {src} differs");
            }
        }
    }
    comm.barrier()?;
    println!("a2a: rank {me} {}", if ok { "ok" } else { "WRONG" });
    Ok(ok)
}

fn signal_self(sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &std::process::id().to_string()])
        .status();
}

fn cmd_fault(comm: &MpiComm, victim: usize, sig: &str, deadline_s: usize) -> Result<bool> {
    // Everybody up (under the start-up deadline), then the short one.
    comm.barrier()?;
    comm.set_timeout(std::time::Duration::from_secs(deadline_s as u64));
    for i in 0.. {
        if i == 2 && comm.rank() == victim {
            eprintln!("rank {victim}: sending myself {sig}");
            signal_self(sig);
        }
        comm.all_to_all_v(vec![vec![i as u8; 16]; comm.world_size()])?;
        if i > 1000 {
            break;
        }
    }
    Ok(true)
}

fn cmd_mismatch(comm: &MpiComm, odd: usize) -> Result<bool> {
    let hidden = if comm.rank() == odd { "4096" } else { "7168" };
    comm.handshake(&[
        ("experts", "256".into()),
        ("hidden", hidden.into()),
        ("dtype", "bf16".into()),
    ])?;
    println!("rank {}: handshake passed", comm.rank());
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let comm = match MpiComm::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let arg = |i: usize| {
        args.get(i)
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(1)
    };
    let t0 = std::time::Instant::now();
    let r = match args.first().map(String::as_str) {
        Some("ops") => cmd_ops(&comm),
        Some("a2a") => cmd_a2a(&comm),
        Some("die") => cmd_fault(&comm, arg(1), "-KILL", arg(2)),
        Some("stall") => cmd_fault(&comm, arg(1), "-STOP", arg(2)),
        Some("mismatch") => cmd_mismatch(&comm, arg(1)),
        _ => {
            eprintln!("usage: mpi_selftest ops|a2a|die RANK SECS|stall RANK SECS|mismatch RANK");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!(
                "rank {}: error after {:.1} s: {e}",
                comm.rank(),
                t0.elapsed().as_secs_f64()
            );
            // A broken group aborts the job when dropped; a healthy one
            // (every rank saw the same error) finalizes.
            drop(comm);
            ExitCode::from(3)
        }
    }
}
