//! What this machine's CPU can do at best, measured: f32 FMA throughput and
//! streaming read bandwidth, on every core at once.
//!
//! `deepport bench` measures these at start and reports every benchmark as
//! a fraction of the roofline they define, so a number means the same on a
//! 2-core AVX2 machine and a 64-core AVX-512 one. The FMA loop uses the
//! widest vector ISA the CPU has (chosen at run time): AVX-512F, AVX2+FMA,
//! or a portable loop the compiler vectorizes for the baseline target.

use std::time::Instant;

/// Peaks of the host, measured.
#[derive(Clone, Debug, PartialEq)]
pub struct HostPeak {
    /// f32 FLOP/s on every core (a fused multiply-add counts 2).
    pub flops_f32: f64,
    /// Bytes/s streamed from memory by every core reading at once.
    pub read_bytes_per_s: f64,
    /// Threads used (one per logical core).
    pub threads: usize,
    /// The vector ISA the FMA loop used: `avx512f`, `avx2+fma` or `portable`.
    pub isa: &'static str,
}

/// Vector ISA for the FMA loop on this CPU.
pub fn fma_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    "portable"
}

/// Measures both peaks; takes about a second. `threads` defaults to the
/// number of logical cores.
pub fn measure(threads: Option<usize>) -> HostPeak {
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let isa = fma_isa();
    HostPeak {
        flops_f32: fma_flops(threads, isa),
        read_bytes_per_s: read_bandwidth(threads),
        threads,
        isa,
    }
}

/// Best of three timed runs of `f` on `threads` threads at once, as
/// `work per thread / seconds · threads`.
fn best_rate(threads: usize, work_per_thread: f64, f: impl Fn(usize) -> f32 + Sync) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let f = &f;
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads).map(|t| s.spawn(move || f(t))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        best = best.max(work_per_thread * threads as f64 / dt);
    }
    best
}

/// FMA iterations per thread per timed run.
const FMA_ITERS: usize = 20_000_000;

fn fma_flops(threads: usize, isa: &'static str) -> f64 {
    // 12 independent accumulators hide the FMA latency (4 cycles × 2
    // ports + headroom) on every x86 core of the last decade.
    let (lanes, run): (usize, fn(usize) -> f32) = match isa {
        #[cfg(target_arch = "x86_64")]
        "avx512f" => (16, |n| {
            // SAFETY: chosen only when the CPU reports AVX-512F.
            unsafe { x86::fma_avx512(n) }
        }),
        #[cfg(target_arch = "x86_64")]
        "avx2+fma" => (8, |n| {
            // SAFETY: chosen only when the CPU reports AVX2 and FMA.
            unsafe { x86::fma_avx2(n) }
        }),
        _ => (PORTABLE_ACC, fma_portable),
    };
    let iters = if isa == "portable" {
        FMA_ITERS / 4
    } else {
        FMA_ITERS
    };
    best_rate(threads, (iters * 12 * lanes * 2) as f64, |_| run(iters))
}

const PORTABLE_ACC: usize = 8;

/// `a·x + b` on 12 independent groups of 8 lanes: the compiler vectorizes
/// it for the baseline target (SSE2 on x86-64 has no FMA: a multiply and an
/// add, still 2 FLOP).
fn fma_portable(iters: usize) -> f32 {
    let x = std::hint::black_box(0.999_999f32);
    let b = std::hint::black_box(1e-7f32);
    let mut acc = [[1.0f32; PORTABLE_ACC]; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            for v in a.iter_mut() {
                *v = *v * x + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_avx512(iters: usize) -> f32 {
        let x = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut a = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, x, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in a {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_avx2(iters: usize) -> f32 {
        let x = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut a = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, x, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in a {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 f32, the width of one unaligned store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

/// Bytes each thread reads per timed pass: far beyond any last-level cache.
const READ_BYTES_PER_THREAD: usize = 256 << 20;

fn read_bandwidth(threads: usize) -> f64 {
    let n = READ_BYTES_PER_THREAD / 4;
    // One buffer per thread, touched first by its own thread.
    let bufs: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || vec![t as f32 + 1.0; n]))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if bufs.len() != threads {
        return 0.0;
    }
    best_rate(threads, (n * 4) as f64, |t| sum_stream(&bufs[t]))
}

/// Sums a buffer with 16 independent accumulators (vectorized by the
/// compiler; memory, not arithmetic, is the limit).
fn sum_stream(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_loop_computes_what_it_claims() {
        // 1 → x·1 + b applied n times: a geometric series, the same in
        // every lane.
        let r = fma_portable(3);
        let (x, b) = (0.999_999f32, 1e-7f32);
        let mut v = 1.0f32;
        for _ in 0..3 {
            v = v * x + b;
        }
        let expect: f32 = std::iter::repeat_n(v, 12 * PORTABLE_ACC).sum();
        assert_eq!(r, expect);
    }

    #[test]
    fn the_stream_sum_is_a_sum() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(sum_stream(&v), v.iter().sum::<f32>());
    }
}
