//! Times one op at one shape on the `cpu` backend (a quick loop while
//! changing a kernel; alternate runs with the other side yourself).
//!
//! `cargo run --release -p deepport-benches --example op_time -- fp8_gemm m=4096,n=2112,k=7168 [ITERS]`
//!
//! `OP_TIME_BACKEND=cpu-ref` times the oracle instead.
//!
//! Prints the median and fastest wall time of ITERS launches (default 5)
//! after one warm-up, each synchronized. It builds only `deepport-core`,
//! `deepport-cpu` and this crate: a quick loop while changing a kernel
//! (`deepport bench` measures the same inputs, `benches/src/setup.rs`).
use deepport_benches::setup::Prepared;
use deepport_benches::Shape;
use deepport_core::backend::Backend;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (op, shape) = match (args.first(), args.get(1)) {
        (Some(o), Some(s)) => (
            o.clone(),
            Shape::parse(s).unwrap_or_else(|e| panic!("shape: {e}")),
        ),
        _ => {
            eprintln!(
                "usage: op_time OP SHAPE [ITERS]   e.g. op_time fp8_gemm m=16,n=2112,k=7168 9"
            );
            std::process::exit(2);
        }
    };
    let iters: usize = args.get(2).map_or(5, |s| s.parse().expect("ITERS"));
    // As the deepport CLI does: this thread runs ops with the workers.
    deepport_cpu::join_worker_pool();
    let be: Box<dyn Backend> = match std::env::var("OP_TIME_BACKEND").as_deref() {
        Ok("cpu-ref") => Box::new(deepport_cpu::CpuRef),
        Ok("cpu") | Err(_) => Box::new(deepport_cpu::Cpu),
        Ok(other) => {
            eprintln!("OP_TIME_BACKEND: `{other}` is neither cpu nor cpu-ref");
            std::process::exit(2);
        }
    };
    let be = &*be;
    let mut p = Prepared::new(be, &op, &shape).expect("inputs");
    p.launch(be).unwrap();
    be.synchronize().unwrap();
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t0 = Instant::now();
            p.launch(be).unwrap();
            be.synchronize().unwrap();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    println!(
        "{op} {shape}: median {:.6} s, min {:.6} s ({} runs)",
        t[t.len() / 2],
        t[0],
        t.len()
    );
}
