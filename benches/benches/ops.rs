//! Criterion benchmarks of deepport ops on the CPU backends.
//!
//! `cargo bench -p deepport-benches` measures `cpu-ref` and `cpu` on the
//! same inputs in one run, so their ratio is meaningful on a noisy
//! machine. The inputs are `deepport bench`'s ([`deepport_benches::setup`]);
//! the shapes are slices of DeepSeek's small enough for the reference
//! (`deepport bench --grid deepseek` has the full ones).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepport_benches::setup::Prepared;
use deepport_benches::Shape;
use deepport_core::backend::Backend;

fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(deepport_cpu::CpuRef), Box::new(deepport_cpu::Cpu)]
}

fn shapes() -> Vec<(&'static str, Shape)> {
    vec![
        ("fp8_gemm", Shape::of(&[("m", 16), ("n", 576), ("k", 512)])),
        (
            "fp8_gemm",
            Shape::of(&[("m", 64), ("n", 2112), ("k", 1024)]),
        ),
        (
            "fp8_grouped_contiguous",
            Shape::of(&[("g", 2), ("m", 128), ("n", 256), ("k", 512)]),
        ),
        (
            "fp8_grouped_masked",
            Shape::of(&[
                ("g", 2),
                ("m", 64),
                ("expected_m", 16),
                ("n", 256),
                ("k", 512),
            ]),
        ),
        ("gemm", Shape::of(&[("m", 16), ("n", 576), ("k", 512)])),
        (
            "mla_decode",
            Shape::of(&[("b", 1), ("s_q", 1), ("h_q", 16), ("s_k", 256)]),
        ),
    ]
}

fn bench_ops(c: &mut Criterion) {
    let backends = backends();
    for (op, shape) in shapes() {
        let mut g = c.benchmark_group(format!("{op}({shape})"));
        let w = deepport_benches::setup::workload(op, &shape).expect("a known op and shape");
        g.throughput(Throughput::Elements(w.flops as u64));
        for b in &backends {
            let b = b.as_ref();
            let mut p = Prepared::new(b, op, &shape).expect("inputs fit on the CPU");
            g.bench_function(b.name().to_string(), |it| {
                it.iter(|| {
                    p.launch(b).unwrap();
                    b.synchronize().unwrap();
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_ops
}
criterion_main!(benches);
