//! Workloads of DeepSeek's kernels with their FLOP and byte counts, for
//! benchmarks and the roofline table.
//!
//! A roofline bound is `min(peak_flops, intensity · peak_bandwidth)`; the
//! table says, for each shape, whether it is compute or memory bound on a
//! given device and what time the bound allows. Benchmarks report achieved
//! numbers as a fraction of that bound.

#![forbid(unsafe_code)]

/// One kernel invocation's work.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Canonical id, e.g. `fp8_gemm(m=128,n=7168,k=2048)`.
    pub id: String,
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes that must move between memory and the chip at least once.
    pub bytes: f64,
}

impl Workload {
    /// FLOP per byte.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }
    /// Lower bound on time (s) on a device with the given peaks.
    pub fn bound_seconds(&self, peak_flops: f64, peak_bytes_per_s: f64) -> f64 {
        (self.flops / peak_flops).max(self.bytes / peak_bytes_per_s)
    }
    /// True when compute, not memory, limits this workload.
    pub fn compute_bound(&self, peak_flops: f64, peak_bytes_per_s: f64) -> bool {
        self.flops / peak_flops >= self.bytes / peak_bytes_per_s
    }
}

/// DeepGEMM's benchmark (n, k) pairs (SPEC.md §3).
pub const DEEPGEMM_NK: [(usize, usize); 7] = [
    (2112, 7168),
    (576, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
];

/// DeepGEMM's m values.
pub const DEEPGEMM_M: [usize; 4] = [1, 64, 128, 4096];

/// FP8 GEMM: e4m3 operands, f32 scales, bf16 output.
pub fn fp8_gemm(m: usize, n: usize, k: usize) -> Workload {
    let kb = k.div_ceil(128) as f64;
    let (mf, nf, kf) = (m as f64, n as f64, k as f64);
    Workload {
        id: format!("fp8_gemm(m={m},n={n},k={k})"),
        flops: 2.0 * mf * nf * kf,
        bytes: mf * kf + nf * kf + 4.0 * (mf * kb + n.div_ceil(128) as f64 * kb) + 2.0 * mf * nf,
    }
}

/// FlashMLA dense decode over a bf16 latent cache (d = 576, dv = 512).
pub fn mla_decode(b: usize, s_q: usize, h_q: usize, s_k: usize) -> Workload {
    let (d, dv) = (576.0, 512.0);
    let (bf, sq, hq, sk) = (b as f64, s_q as f64, h_q as f64, s_k as f64);
    Workload {
        id: format!("mla_decode(b={b},s_q={s_q},h_q={h_q},s_k={s_k})"),
        flops: bf * sq * hq * sk * 2.0 * (d + dv),
        bytes: bf * sk * d * 2.0 + bf * sq * hq * (d + dv) * 2.0,
    }
}

/// The roofline table of DeepSeek's shapes as Markdown, for a device with
/// the given peak FLOP/s and bytes/s.
pub fn roofline_markdown(device: &str, peak_flops: f64, peak_bytes_per_s: f64) -> String {
    let mut rows = Vec::new();
    for &(n, k) in &DEEPGEMM_NK {
        for &m in &DEEPGEMM_M {
            rows.push(fp8_gemm(m, n, k));
        }
    }
    for &(b, hq) in &[(1usize, 128usize), (64, 128), (128, 128)] {
        rows.push(mla_decode(b, 1, hq, 4096));
    }
    let mut s = format!(
        "Roofline on {device}: {:.0} TFLOP/s, {:.2} TB/s\n\n| workload | FLOP/byte | bound | time bound (µs) |\n|---|---:|---|---:|\n",
        peak_flops / 1e12,
        peak_bytes_per_s / 1e12
    );
    for w in rows {
        let bound = if w.compute_bound(peak_flops, peak_bytes_per_s) {
            "compute"
        } else {
            "memory"
        };
        s += &format!(
            "| {} | {:.1} | {} | {:.2} |\n",
            w.id,
            w.intensity(),
            bound,
            w.bound_seconds(peak_flops, peak_bytes_per_s) * 1e6
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_counts() {
        let w = fp8_gemm(128, 576, 7168);
        assert_eq!(w.flops, 2.0 * 128.0 * 576.0 * 7168.0);
        // 576 rows → 5 scale row blocks, 7168/128 = 56 K blocks.
        let bytes = 128.0 * 7168.0
            + 576.0 * 7168.0
            + 4.0 * (128.0 * 56.0 + 5.0 * 56.0)
            + 2.0 * 128.0 * 576.0;
        assert_eq!(w.bytes, bytes);
    }

    #[test]
    fn decode_is_memory_bound_on_hopper() {
        // H800 figures FlashMLA quotes: ~3 TB/s, ~660 dense FP8/BF16 TFLOP/s.
        let w = mla_decode(64, 1, 128, 4096);
        assert!(!w.compute_bound(660e12, 3.0e12) || w.intensity() > 200.0);
        let m1 = fp8_gemm(1, 7168, 16384);
        assert!(
            !m1.compute_bound(1979e12, 4.8e12),
            "m = 1 GEMM is memory bound"
        );
        let big = fp8_gemm(4096, 7168, 16384);
        assert!(
            big.compute_bound(1979e12, 4.8e12),
            "m = 4096 GEMM is compute bound"
        );
    }

    #[test]
    fn table_lists_every_shape() {
        let t = roofline_markdown("H200", 1979e12, 4.8e12);
        assert_eq!(
            t.lines().filter(|l| l.starts_with("| fp8_gemm")).count(),
            28
        );
        assert_eq!(
            t.lines().filter(|l| l.starts_with("| mla_decode")).count(),
            3
        );
    }
}
