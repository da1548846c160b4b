//! Times `cpu-ref` (the fast oracle) against the scalar loops that specify
//! it on DeepSeek-V3 shapes, and checks that both give the same bytes.
//!
//! `cargo run --release -p deepport-cpu --example oracle_speed [-- --quick]`
//! (`DEEPPORT_CPU_THREADS=1` runs cpu-ref on one thread).

use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor, Result};
use deepport_cpu::scalar::CpuScalar;
use deepport_cpu::CpuRef;
use std::time::Instant;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn fp8(&mut self, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .map(|_| loop {
                let b = self.next() as u8;
                if b & 0x7f != 0x7f {
                    break b;
                }
            })
            .collect();
        HostTensor::from_bytes(DType::F8E4M3, shape, bytes).expect("fp8")
    }
    fn f32s(&mut self, dtype: DType, shape: &[usize], amp: f32) -> HostTensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.sym() * amp).collect();
        HostTensor::from_f32(dtype, shape, &v)
    }
}

/// CPU seconds this process has used (all threads), from /proc/self/stat
/// (clock ticks of 1/100 s); 0 where it cannot be read.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    (tick(11) + tick(12)) / 100.0
}

/// Runs `f` on a backend and returns (wall seconds, CPU seconds, output bytes).
fn timed(
    b: &dyn Backend,
    f: &dyn Fn(&dyn Backend) -> Result<Vec<Tensor>>,
) -> (f64, f64, Vec<Vec<u8>>) {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let outs = f(b).expect("op");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    let bytes = outs
        .iter()
        .map(|t| b.download(t).expect("download").bytes().to_vec())
        .collect();
    (secs, cpu, bytes)
}

fn compare(name: &str, macs: f64, f: &dyn Fn(&dyn Backend) -> Result<Vec<Tensor>>) {
    let (fast, fast_cpu, fb) = timed(&CpuRef::new(), f);
    let (spec, spec_cpu, sb) = timed(&CpuScalar, f);
    println!(
        "{name}: scalar {spec:.2} s wall / {spec_cpu:.2} s CPU ({:.2} GMAC per CPU-s); \
         cpu-ref {fast:.2} s wall / {fast_cpu:.2} s CPU ({:.2} GMAC per CPU-s); \
         speed-up {:.1}x wall, {:.1}x CPU; outputs {}",
        macs / spec_cpu / 1e9,
        macs / fast_cpu / 1e9,
        spec / fast,
        spec_cpu / fast_cpu,
        if fb == sb { "identical" } else { "DIFFER" }
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let be = CpuRef::new();

    // fp8_gemm 128 × 2112 × 7168 (DeepSeek-V3's fused q_a/kv_a projection).
    let (m, n, k): (usize, usize, usize) = (128, 2112, 7168);
    let kb = k.div_ceil(128);
    let a = be.upload(&rng.fp8(&[m, k])).unwrap();
    let b = be.upload(&rng.fp8(&[n, k])).unwrap();
    let sa = be.upload(&rng.f32s(DType::F32, &[m, kb], 1.0)).unwrap();
    let sb = be
        .upload(&rng.f32s(DType::F32, &[n.div_ceil(128), kb], 1.0))
        .unwrap();
    compare(
        &format!("fp8_gemm m={m} n={n} k={k}"),
        (m * n * k) as f64,
        &|be| {
            let mut d = be.alloc(DType::BF16, &[m, n])?;
            ops::run(
                be,
                Fp8Gemm {
                    a: &a,
                    sa: &sa,
                    b: &b,
                    sb: &sb,
                    d: &mut d,
                },
            )?;
            Ok(vec![d])
        },
    );

    // mla_decode b=16, s_q=1, h_q=128, h_kv=1, d=576, dv=512.
    let (batch, s_q, h_q, d, dv, bs): (usize, usize, usize, usize, usize, usize) =
        (16, 1, 128, 576, 512, 64);
    let s_k = if quick { 1024 } else { 4096 };
    let max_blocks = s_k / bs;
    let nb = batch * max_blocks;
    let q = be
        .upload(&rng.f32s(DType::BF16, &[batch, s_q, h_q, d], 1.0))
        .unwrap();
    let kc = be
        .upload(&rng.f32s(DType::BF16, &[nb, bs, 1, d], 1.0))
        .unwrap();
    let table: Vec<i64> = (0..nb as i64).collect();
    let bt = be
        .upload(&HostTensor::from_index(
            DType::I32,
            &[batch, max_blocks],
            &table,
        ))
        .unwrap();
    let sl = be
        .upload(&HostTensor::from_index(
            DType::I32,
            &[batch],
            &vec![s_k as i64; batch],
        ))
        .unwrap();
    compare(
        &format!("mla_decode b={batch} s_q={s_q} h_q={h_q} s_k={s_k}"),
        (batch * s_q * h_q * s_k * (d + dv)) as f64,
        &|be| {
            let mut out = be.alloc(DType::BF16, &[batch, s_q, h_q, dv])?;
            let mut lse = be.alloc(DType::F32, &[batch, h_q, s_q])?;
            ops::run(
                be,
                MlaDecode {
                    q: &q,
                    kcache: &kc,
                    block_table: &bt,
                    cache_seqlens: &sl,
                    out: &mut out,
                    lse: &mut lse,
                    softmax_scale: 0.1352,
                    causal: false,
                },
            )?;
            Ok(vec![out, lse])
        },
    );
}
