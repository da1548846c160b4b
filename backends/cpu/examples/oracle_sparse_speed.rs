//! Times `cpu-ref` (the fast oracle) against the scalar loops that specify
//! it on DeepSeek-V3.2's sparse ops (FlashMLA / DeepGEMM shapes of the
//! `full` profile, batch scaled down), and checks that both give the same
//! bytes.
//!
//! `cargo run --release -p deepport-cpu --example oracle_sparse_speed [-- --quick]`
//! (`DEEPPORT_CPU_THREADS=1` runs cpu-ref on one thread; `--scalar-only` /
//! `--ref-only` time one side).

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
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn fp8_byte(&mut self) -> u8 {
        loop {
            let b = self.next() as u8;
            if b & 0x7f != 0x7f {
                break b;
            }
        }
    }
    fn f32s(&mut self, dtype: DType, shape: &[usize], amp: f32) -> HostTensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.sym() * amp).collect();
        HostTensor::from_f32(dtype, shape, &v)
    }
    /// `k` distinct values below `n` (k ≤ n).
    fn distinct(&mut self, n: usize, k: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for j in 0..k {
            let r = j + self.below(n - j);
            p.swap(j, r);
        }
        p.truncate(k);
        p
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

#[derive(Clone, Copy, PartialEq)]
enum Sides {
    Both,
    Scalar,
    Ref,
}

fn compare(sides: Sides, name: &str, macs: f64, f: &dyn Fn(&dyn Backend) -> Result<Vec<Tensor>>) {
    let gmac = |cpu: f64| {
        if macs > 0.0 {
            format!(" ({:.2} GMAC per CPU-s)", macs / cpu / 1e9)
        } else {
            String::new()
        }
    };
    let fast = (sides != Sides::Scalar).then(|| timed(&CpuRef::new(), f));
    let spec = (sides != Sides::Ref).then(|| timed(&CpuScalar, f));
    let mut line = format!("{name}:");
    if let Some((w, c, _)) = &spec {
        line += &format!(" scalar {w:.2} s wall / {c:.2} s CPU{};", gmac(*c));
    }
    if let Some((w, c, _)) = &fast {
        line += &format!(" cpu-ref {w:.2} s wall / {c:.2} s CPU{};", gmac(*c));
    }
    if let (Some((fw, fc, fb)), Some((sw, sc, sb))) = (&fast, &spec) {
        line += &format!(
            " speed-up {:.1}x wall, {:.1}x CPU; outputs {}",
            sw / fw,
            sc / fc,
            if fb == sb { "identical" } else { "DIFFER" }
        );
    }
    println!("{line}");
}

/// A V3.2 latent cache of `slots` tokens (no NaN codes, scales near 1).
fn latent(rng: &mut Rng, slots: usize) -> HostTensor {
    let mut b = vec![0u8; slots * V32_TOKEN_BYTES];
    for t in b.chunks_mut(V32_TOKEN_BYTES) {
        for c in &mut t[..V32_NOPE] {
            *c = rng.fp8_byte();
        }
        for g in 0..4 {
            let s = 0.01 * (1.5 + rng.sym());
            t[V32_NOPE + 4 * g..V32_NOPE + 4 * g + 4].copy_from_slice(&s.to_le_bytes());
        }
        for r in 0..V32_ROPE {
            let v = half::bf16::from_f32(rng.sym()).to_le_bytes();
            t[528 + 2 * r..530 + 2 * r].copy_from_slice(&v);
        }
    }
    HostTensor::from_bytes(DType::U8, &[1, slots, V32_TOKEN_BYTES], b).expect("cache")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sides = if args.iter().any(|a| a == "--scalar-only") {
        Sides::Scalar
    } else if args.iter().any(|a| a == "--ref-only") {
        Sides::Ref
    } else {
        Sides::Both
    };
    let mut rng = Rng(0x5ba5_e0f1_2345_6789);
    let be = CpuRef::new();

    // sparse_mla_decode: h_q = 128, topk = 2048 of 2048 tokens per
    // sequence (FlashMLA's grid), b sequences; b = 1 splits the heads.
    for b in [if quick { 4 } else { 8 }, 1] {
        let (s_q, h_q, topk, s_k) = (1usize, 128usize, 2048usize, 2048usize);
        let cache = be.upload(&latent(&mut rng, b * s_k)).unwrap();
        let q = be
            .upload(&rng.f32s(DType::BF16, &[b, s_q, h_q, V32_D], 0.3))
            .unwrap();
        let ind: Vec<i64> = (0..b * s_q)
            .flat_map(|r| {
                let base = (r / s_q * s_k) as i64;
                rng.distinct(s_k, topk).into_iter().map(move |v| v + base)
            })
            .collect();
        let it = be
            .upload(&HostTensor::from_index(DType::I32, &[b, s_q, topk], &ind))
            .unwrap();
        compare(
            sides,
            &format!("sparse_mla_decode b={b} s_q={s_q} h_q={h_q} topk={topk}"),
            (b * s_q * h_q * topk * (V32_D + V32_NOPE)) as f64,
            &|be| {
                let mut out = be.alloc(DType::BF16, &[b, s_q, h_q, V32_NOPE])?;
                let mut lse = be.alloc(DType::F32, &[b, h_q, s_q])?;
                ops::run(
                    be,
                    SparseMlaDecode {
                        q: &q,
                        kcache: &cache,
                        indices: &it,
                        topk_length: None,
                        attn_sink: None,
                        out: &mut out,
                        lse: &mut lse,
                        softmax_scale: 0.0417,
                    },
                )?;
                Ok(vec![out, lse])
            },
        );
    }

    // sparse_mla_prefill: s_kv = 1521, topk = 512, h_q = 128, d_qk = 576.
    for s_q in [if quick { 8 } else { 16 }, 1] {
        let (s_kv, h_q, topk, d) = (1521usize, 128usize, 512usize, V32_D);
        let q = be
            .upload(&rng.f32s(DType::BF16, &[s_q, h_q, d], 0.3))
            .unwrap();
        let kv = be
            .upload(&rng.f32s(DType::BF16, &[s_kv, 1, d], 0.3))
            .unwrap();
        let ind: Vec<i64> = (0..s_q).flat_map(|_| rng.distinct(s_kv, topk)).collect();
        let it = be
            .upload(&HostTensor::from_index(DType::I32, &[s_q, 1, topk], &ind))
            .unwrap();
        compare(
            sides,
            &format!("sparse_mla_prefill s_q={s_q} s_kv={s_kv} h_q={h_q} topk={topk}"),
            (s_q * h_q * topk * (d + V32_NOPE)) as f64,
            &|be| {
                let mut out = be.alloc(DType::BF16, &[s_q, h_q, V32_NOPE])?;
                let mut m = be.alloc(DType::F32, &[s_q, h_q])?;
                let mut lse = be.alloc(DType::F32, &[s_q, h_q])?;
                ops::run(
                    be,
                    SparseMlaPrefill {
                        q: &q,
                        kv: &kv,
                        indices: &it,
                        topk_length: None,
                        attn_sink: None,
                        out: &mut out,
                        max_logits: &mut m,
                        lse: &mut lse,
                        softmax_scale: 0.5,
                    },
                )?;
                Ok(vec![out, m, lse])
            },
        );
    }

    // indexer_logits: DeepGEMM's paged grid, h = 64, d = 128, block 64.
    {
        let (b, next_n, h, d, bs) = (if quick { 4 } else { 8 }, 1usize, 64usize, 128usize, 64);
        let len = 8192usize;
        let max_blocks = len / bs;
        let nb = b * max_blocks;
        let qb: Vec<u8> = (0..b * next_n * h * d).map(|_| rng.fp8_byte()).collect();
        let q = be
            .upload(&HostTensor::from_bytes(DType::F8E4M3, &[b, next_n, h, d], qb).unwrap())
            .unwrap();
        let w = be
            .upload(&rng.f32s(DType::F32, &[b * next_n, h], 1.0))
            .unwrap();
        let mut cb = vec![0u8; nb * bs * (d + 4)];
        for blk in cb.chunks_mut(bs * (d + 4)) {
            for c in &mut blk[..bs * d] {
                *c = rng.fp8_byte();
            }
            for off in 0..bs {
                let s = 0.01 * (1.5 + rng.sym());
                blk[bs * d + 4 * off..bs * d + 4 * off + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
        let cache = be
            .upload(&HostTensor::from_bytes(DType::U8, &[nb, bs, d + 4], cb).unwrap())
            .unwrap();
        let lens = be
            .upload(&HostTensor::from_index(
                DType::I32,
                &[b],
                &vec![len as i64; b],
            ))
            .unwrap();
        let table: Vec<i64> = (0..nb as i64).collect();
        let bt = be
            .upload(&HostTensor::from_index(
                DType::I32,
                &[b, max_blocks],
                &table,
            ))
            .unwrap();
        compare(
            sides,
            &format!("indexer_logits b={b} next_n={next_n} h={h} len={len}"),
            (b * next_n * h * d * len) as f64,
            &|be| {
                let mut o = be.alloc(DType::F32, &[b * next_n, len])?;
                ops::run(
                    be,
                    IndexerLogits {
                        q: &q,
                        weights: &w,
                        kv_cache: &cache,
                        context_lens: &lens,
                        block_table: &bt,
                        logits: &mut o,
                    },
                )?;
                Ok(vec![o])
            },
        );
    }

    // indexer_topk: 512 rows of 16384 logits, topk 2048.
    {
        let (rows, n, topk) = (if quick { 128 } else { 512 }, 16384usize, 2048usize);
        let l = be.upload(&rng.f32s(DType::F32, &[rows, n], 4.0)).unwrap();
        let lens = be
            .upload(&HostTensor::from_index(
                DType::I32,
                &[rows],
                &vec![n as i64; rows],
            ))
            .unwrap();
        compare(
            sides,
            &format!("indexer_topk rows={rows} n={n} topk={topk}"),
            0.0,
            &|be| {
                let mut o = be.alloc(DType::I32, &[rows, topk])?;
                ops::run(
                    be,
                    IndexerTopk {
                        logits: &l,
                        lengths: &lens,
                        indices: &mut o,
                    },
                )?;
                Ok(vec![o])
            },
        );
    }
}
