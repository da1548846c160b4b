//! Criterion benchmarks of deepport ops on the CPU backends.
//!
//! `cargo bench -p deepport-benches` measures `cpu-ref` and `cpu` on the same
//! inputs in one run, so their ratio is meaningful on a noisy machine.
//! Shapes are small slices of DeepSeek's (the reference is plain loops).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepport_core::backend::{alloc_poisoned, Backend};
use deepport_core::ops::{self, Fp8Gemm, MlaDecode};
use deepport_core::{DType, HostTensor};

fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(deepport_cpu::CpuRef), Box::new(deepport_cpu::Cpu)]
}

fn bench_fp8_gemm(c: &mut Criterion) {
    let (m, n, k) = (16, 576, 512);
    let mut g = c.benchmark_group("fp8_gemm(m=16,n=576,k=512)");
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    for b in backends() {
        let a = b
            .upload(&HostTensor::from_f32(
                DType::F8E4M3,
                &[m, k],
                &rand_f32(m * k, 1, 200.0),
            ))
            .unwrap();
        let sa = b
            .upload(&HostTensor::from_f32(
                DType::F32,
                &[m, k / 128],
                &vec![0.01; m * k / 128],
            ))
            .unwrap();
        let bw = b
            .upload(&HostTensor::from_f32(
                DType::F8E4M3,
                &[n, k],
                &rand_f32(n * k, 2, 200.0),
            ))
            .unwrap();
        let nb = n.div_ceil(128);
        let sb = b
            .upload(&HostTensor::from_f32(
                DType::F32,
                &[nb, k / 128],
                &vec![0.02; nb * k / 128],
            ))
            .unwrap();
        let mut d = alloc_poisoned(b.as_ref(), DType::BF16, &[m, n]).unwrap();
        g.bench_function(b.name().to_string(), |it| {
            it.iter(|| {
                ops::run(
                    b.as_ref(),
                    Fp8Gemm {
                        a: &a,
                        sa: &sa,
                        b: &bw,
                        sb: &sb,
                        d: &mut d,
                    },
                )
                .unwrap();
                b.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

fn bench_mla_decode(c: &mut Criterion) {
    let (batch, h_q, s_k, d, dv, bs) = (1, 16, 256, 576, 512, 64);
    let nblk = s_k / bs;
    let mut g = c.benchmark_group("mla_decode(b=1,s_q=1,h_q=16,s_k=256)");
    for b in backends() {
        let q = b
            .upload(&HostTensor::from_f32(
                DType::BF16,
                &[batch, 1, h_q, d],
                &rand_f32(h_q * d, 3, 1.0),
            ))
            .unwrap();
        let kc = b
            .upload(&HostTensor::from_f32(
                DType::BF16,
                &[nblk, bs, 1, d],
                &rand_f32(s_k * d, 4, 1.0),
            ))
            .unwrap();
        let bt = b
            .upload(&HostTensor::from_i32(
                &[batch, nblk],
                &(0..nblk as i32).collect::<Vec<_>>(),
            ))
            .unwrap();
        let sl = b
            .upload(&HostTensor::from_i32(&[batch], &[s_k as i32]))
            .unwrap();
        let mut out = alloc_poisoned(b.as_ref(), DType::BF16, &[batch, 1, h_q, dv]).unwrap();
        let mut lse = alloc_poisoned(b.as_ref(), DType::F32, &[batch, h_q, 1]).unwrap();
        g.bench_function(b.name().to_string(), |it| {
            it.iter(|| {
                ops::run(
                    b.as_ref(),
                    MlaDecode {
                        q: &q,
                        kcache: &kc,
                        block_table: &bt,
                        cache_seqlens: &sl,
                        out: &mut out,
                        lse: &mut lse,
                        softmax_scale: (d as f32).powf(-0.5),
                        causal: false,
                    },
                )
                .unwrap();
                b.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_fp8_gemm, bench_mla_decode
}
criterion_main!(benches);
