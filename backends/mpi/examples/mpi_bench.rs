//! Expert-parallel dispatch + combine over [`MpiComm`] against a raw
//! `MPI_Alltoallv` moving the same bytes.
//!
//! ```text
//! cargo build --release -p deepport-mpi --examples
//! mpirun --oversubscribe -np 4 target/release/examples/mpi_bench [TOKENS] [ITERS]
//! ```
//!
//! Each rank routes TOKENS (default 1024) bf16 tokens of hidden 7168 to 8 of
//! 256 experts (DeepSeek-V3's shape) and runs, ITERS times (default 10),
//! each step between barriers:
//!
//! * `dispatch` and `combine` (core's protocol on the `cpu` backend over
//!   this transport: control messages, packing, the exchange, placing and
//!   the weighted reduction);
//! * `all_to_all_v_flat`: the transport alone, on the payload bytes
//!   dispatch and combine move (the path their payloads take);
//! * `MPI_Alltoallv`: a raw blocking `MPI_Alltoallv` on those bytes;
//! * one `memcpy` of the bytes rank 0 sends (what one pass over the rows
//!   costs: packing and reducing each make at least one).
//!
//! Rank 0 prints the median times and the ratio raw / ours (1.0: no
//! overhead over raw MPI; the target is ≥ 0.8). `DEEPPORT_MPI_GATHER=datatype`
//! has MPI gather dispatch's rows itself (see `deepport_mpi::GATHER_ENV`);
//! `DEEPPORT_EP_TRACE=1` prints the protocol's phases.

use deepport_core::backend::Backend;
use deepport_core::comm::Transport;
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor, Result};
use deepport_mpi::MpiComm;
use std::time::Instant;

const HIDDEN: usize = 7168;
const EXPERTS: usize = 256;
const TOPK: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens = args.first().copied().unwrap_or(1024);
    let iters = args.get(1).copied().unwrap_or(10).max(1);
    let comm = MpiComm::init()?;
    let (world, me) = (comm.world_size(), comm.rank());
    let mut reg = deepport_core::registry::Registry::new();
    deepport_cpu::register(&mut reg);
    let b = reg.create("cpu")?;
    let b: &dyn Backend = b.as_ref();

    // Routing: 8 distinct experts per token, pseudo-random.
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ me as u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut idx = Vec::with_capacity(tokens * TOPK);
    for _ in 0..tokens {
        let mut chosen: Vec<i64> = Vec::new();
        while chosen.len() < TOPK {
            let e = (next() % EXPERTS as u64) as i64;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        idx.extend(chosen);
    }
    let xv: Vec<f32> = (0..tokens * HIDDEN)
        .map(|i| (i % 97) as f32 / 97.0)
        .collect();
    let x = b.upload(&HostTensor::from_f32(DType::BF16, &[tokens, HIDDEN], &xv))?;
    let idx_t = b.upload(&HostTensor::from_i64(&[tokens, TOPK], &idx))?;
    let w = b.upload(&HostTensor::from_f32(
        DType::F32,
        &[tokens, TOPK],
        &vec![0.125; tokens * TOPK],
    ))?;

    // Payload bytes per destination (what dispatch sends; combine sends
    // the transposed counts back).
    let epr = EXPERTS / world;
    let row = HIDDEN * 2;
    let mut send_rows = vec![0usize; world];
    for t in 0..tokens {
        let mut to = vec![false; world];
        for &e in &idx[t * TOPK..(t + 1) * TOPK] {
            to[e as usize / epr] = true;
        }
        for (r, &hit) in to.iter().enumerate() {
            send_rows[r] += hit as usize;
        }
    }
    let send_bytes: Vec<usize> = send_rows.iter().map(|r| r * row).collect();
    let recv_bytes: Vec<usize> = {
        let msgs = comm.all_to_all_v(
            send_bytes
                .iter()
                .map(|c| (*c as u64).to_le_bytes().to_vec())
                .collect(),
        )?;
        msgs.iter()
            .map(|m| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&m[..8]);
                u64::from_le_bytes(a) as usize
            })
            .collect()
    };
    let sbuf = vec![1u8; send_bytes.iter().sum()];
    let mut rbuf = vec![0u8; recv_bytes.iter().sum()];
    let mut sback = vec![0u8; sbuf.len()];

    let (mut t_ours, mut t_a2a, mut t_raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_copy = Vec::new();
    let mut copy_dst = vec![0u8; sbuf.len()];
    for it in 0..iters + 1 {
        // dispatch + combine
        comm.barrier()?;
        let t0 = Instant::now();
        let out = ops::dispatch(
            b,
            &comm,
            Dispatch {
                x: &x,
                x_scales: None,
                topk_idx: &idx_t,
                topk_weights: &w,
                num_experts: EXPERTS,
                expert_alignment: 1,
            },
        )?;
        let mut combined = b.alloc(DType::BF16, &[tokens, HIDDEN])?;
        ops::combine(
            b,
            &comm,
            Combine {
                x: &out.recv_x,
                handle: &out.handle,
                out: &mut combined,
            },
        )?;
        comm.barrier()?;
        let ours = t0.elapsed().as_secs_f64();

        // The transport alone on the same bytes, both directions, on the
        // path the protocol's payloads take (`all_to_all_v_flat`).
        let fresh = sbuf.clone();
        comm.barrier()?;
        let t0 = Instant::now();
        let got = comm.all_to_all_v_flat(fresh, &send_bytes, &recv_bytes)?;
        let back = comm.all_to_all_v_flat(got, &recv_bytes, &send_bytes)?;
        comm.barrier()?;
        let a2a = t0.elapsed().as_secs_f64();
        comm.recycle(back);

        // Raw MPI_Alltoallv on the same bytes, both directions.
        comm.barrier()?;
        let t0 = Instant::now();
        comm.alltoallv_baseline(&sbuf, &send_bytes, &mut rbuf, &recv_bytes)?;
        comm.alltoallv_baseline(&rbuf, &recv_bytes, &mut sback, &send_bytes)?;
        comm.barrier()?;
        let raw = t0.elapsed().as_secs_f64();
        // One memcpy of the payload sent per direction (buffers already
        // touched): what one pass over the rows costs on this machine.
        let t0 = Instant::now();
        copy_dst.copy_from_slice(std::hint::black_box(&sbuf));
        std::hint::black_box(&copy_dst);
        let copy = t0.elapsed().as_secs_f64();
        if it > 0 {
            // The first iteration warms up (allocations, connections).
            t_ours.push(ours);
            t_a2a.push(a2a);
            t_raw.push(raw);
            t_copy.push(copy);
        }
    }
    if me == 0 {
        let (o, a, r) = (median(t_ours), median(t_a2a), median(t_raw));
        let mb = send_bytes.iter().sum::<usize>() as f64 / 1e6;
        println!(
            "ranks {world}, tokens {tokens}, hidden {HIDDEN}, top-{TOPK} of {EXPERTS}: rank 0 sends {mb:.1} MB per direction"
        );
        println!("  dispatch+combine (cpu, deepport-mpi): {:8.2} ms", o * 1e3);
        println!("  all_to_all_v_flat x2 (deepport-mpi):  {:8.2} ms", a * 1e3);
        println!("  MPI_Alltoallv x2 (raw):               {:8.2} ms", r * 1e3);
        println!(
            "  one memcpy of the payload:            {:8.2} ms",
            median(t_copy) * 1e3
        );
        println!(
            "  ratio raw / dispatch+combine = {:.2}; raw / transport alone = {:.2}",
            r / o,
            r / a
        );
    }
    Ok(())
}
