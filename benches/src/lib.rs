//! Workloads of DeepSeek's kernels with their FLOP and byte counts, for
//! benchmarks and the roofline table.
//!
//! A roofline bound is `min(peak_flops, intensity · peak_bandwidth)`; the
//! table says, for each shape, whether it is compute or memory bound on a
//! given device and what time the bound allows. Benchmarks report achieved
//! numbers as a fraction of that bound.

#![forbid(unsafe_code)]

pub mod setup;

use std::collections::BTreeMap;
use std::fmt;

/// A benchmark shape: named positive integers (`m=128,n=2112,k=7168`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shape(pub BTreeMap<String, usize>);

impl Shape {
    /// A shape from `(name, value)` pairs.
    pub fn of(pairs: &[(&str, usize)]) -> Self {
        Shape(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }
    /// Parses `m=128,n=2112,k=7168` (also `m=128 n=2112`): names are
    /// lowercase identifiers, values positive integers (`_` allowed as a
    /// digit separator), each name at most once.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for part in text.split([',', ' ']).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not name=value"))?;
            let k = k.trim();
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            {
                return Err(format!("`{k}` is not a shape parameter name"));
            }
            let v: usize = v
                .trim()
                .replace('_', "")
                .parse()
                .map_err(|_| format!("{k}={v}: not a non-negative integer"))?;
            if v == 0 {
                return Err(format!("{k}=0: sizes must be positive"));
            }
            if map.insert(k.to_string(), v).is_some() {
                return Err(format!("`{k}` is given twice"));
            }
        }
        if map.is_empty() {
            return Err("empty shape".into());
        }
        Ok(Shape(map))
    }
    /// The value of `name`, if the shape has it.
    pub fn get(&self, name: &str) -> Option<&usize> {
        self.0.get(name)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Which benchmark grid to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    /// The shapes of the performance targets (benches/README.md): a few
    /// minutes on a 2-core CPU with the fast `cpu` backend.
    Quick,
    /// DeepSeek's own benchmark grids: DeepGEMM's (n, k) × m, its grouped
    /// test shapes, FlashMLA's decode grid. Hours on a CPU; sized for GPUs.
    DeepSeek,
}

/// The `(op, shape)` pairs of a grid, optionally only those of one op.
pub fn grid(which: Grid, op: Option<&str>) -> Vec<(&'static str, Shape)> {
    let mut v: Vec<(&'static str, Shape)> = Vec::new();
    match which {
        Grid::Quick => {
            for m in [16, 128, 4096] {
                v.push(("fp8_gemm", Shape::of(&[("m", m), ("n", 2112), ("k", 7168)])));
            }
            v.push((
                "fp8_grouped_contiguous",
                Shape::of(&[("g", 4), ("m", 256), ("n", 4096), ("k", 7168)]),
            ));
            v.push((
                "fp8_grouped_masked",
                Shape::of(&[
                    ("g", 4),
                    ("m", 256),
                    ("expected_m", 64),
                    ("n", 4096),
                    ("k", 7168),
                ]),
            ));
            v.push(("gemm", Shape::of(&[("m", 128), ("n", 2112), ("k", 7168)])));
            v.push((
                "mla_decode",
                Shape::of(&[("b", 16), ("s_q", 1), ("h_q", 128), ("s_k", 4096)]),
            ));
        }
        Grid::DeepSeek => {
            for &(n, k) in &DEEPGEMM_NK {
                for &m in &DEEPGEMM_M {
                    v.push(("fp8_gemm", Shape::of(&[("m", m), ("n", n), ("k", k)])));
                }
            }
            for &(g, m, n, k) in &DEEPGEMM_CONTIGUOUS {
                v.push((
                    "fp8_grouped_contiguous",
                    Shape::of(&[("g", g), ("m", m), ("n", n), ("k", k)]),
                ));
            }
            for &(g, e) in &DEEPGEMM_MASKED {
                for (n, k) in [(4096, 7168), (7168, 2048)] {
                    v.push((
                        "fp8_grouped_masked",
                        Shape::of(&[
                            ("g", g),
                            ("m", 2 * e),
                            ("expected_m", e),
                            ("n", n),
                            ("k", k),
                        ]),
                    ));
                }
            }
            for s_q in [1, 2] {
                for s_k in [4096, 8192] {
                    v.push((
                        "mla_decode",
                        Shape::of(&[("b", 128), ("s_q", s_q), ("h_q", 128), ("s_k", s_k)]),
                    ));
                }
            }
        }
    }
    v.retain(|(o, _)| op.is_none_or(|want| want == *o));
    v
}

/// DeepGEMM's grouped contiguous test shapes: (groups, rows per group, n, k).
pub const DEEPGEMM_CONTIGUOUS: [(usize, usize, usize, usize); 4] = [
    (4, 8192, 4096, 7168),
    (4, 8192, 7168, 2048),
    (8, 4096, 4096, 7168),
    (8, 4096, 7168, 2048),
];

/// DeepGEMM's grouped masked test shapes: (groups, expected rows per group).
pub const DEEPGEMM_MASKED: [(usize, usize); 3] = [(1, 1024), (2, 512), (4, 256)];

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

/// Grouped FP8 GEMM, contiguous layout: `g` groups of `m` rows each.
pub fn fp8_grouped_contiguous(g: usize, m: usize, n: usize, k: usize) -> Workload {
    let kb = k.div_ceil(128) as f64;
    let (gf, mf, nf, kf) = (g as f64, m as f64, n as f64, k as f64);
    Workload {
        id: format!("fp8_grouped_contiguous(g={g},m={m},n={n},k={k})"),
        flops: 2.0 * gf * mf * nf * kf,
        bytes: gf * mf * kf
            + gf * nf * kf
            + 4.0 * gf * (mf * kb + n.div_ceil(128) as f64 * kb)
            + 2.0 * gf * mf * nf
            + 4.0 * gf * mf,
    }
}

/// Grouped FP8 GEMM, masked layout: `g` groups of up to `m` rows, `e` of
/// them valid in each (DeepGEMM counts only the valid rows).
pub fn fp8_grouped_masked(g: usize, m: usize, e: usize, n: usize, k: usize) -> Workload {
    let kb = k.div_ceil(128) as f64;
    let (gf, ef, nf, kf) = (g as f64, e as f64, n as f64, k as f64);
    Workload {
        id: format!("fp8_grouped_masked(g={g},m={m},expected_m={e},n={n},k={k})"),
        flops: 2.0 * gf * ef * nf * kf,
        bytes: gf * ef * kf
            + gf * nf * kf
            + 4.0 * gf * (ef * kb + n.div_ceil(128) as f64 * kb)
            + 2.0 * gf * ef * nf,
    }
}

/// A plain GEMM `d = a·bᵀ` with every operand of `elem` bytes.
fn plain_gemm(name: &str, elem: f64, m: usize, n: usize, k: usize) -> Workload {
    let (mf, nf, kf) = (m as f64, n as f64, k as f64);
    Workload {
        id: format!("{name}(m={m},n={n},k={k})"),
        flops: 2.0 * mf * nf * kf,
        bytes: elem * (mf * kf + nf * kf + mf * nf),
    }
}

/// bf16 GEMM with bf16 output.
pub fn gemm_bf16(m: usize, n: usize, k: usize) -> Workload {
    plain_gemm("gemm", 2.0, m, n, k)
}

/// A plain GEMM in f32 (the f32 forward pass's linears).
pub fn gemm_f32(m: usize, n: usize, k: usize) -> Workload {
    plain_gemm("gemm_f32", 4.0, m, n, k)
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
    fn shapes_parse_and_print() {
        let s = Shape::parse("m=128,n=2_112 k=7168").unwrap();
        assert_eq!(s.to_string(), "k=7168,m=128,n=2112");
        for bad in ["", "m", "m=0", "m=-1", "m=1,m=2", "M=1", "m=1e3"] {
            assert!(Shape::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn every_grid_shape_has_a_workload() {
        for g in [Grid::Quick, Grid::DeepSeek] {
            for (op, shape) in grid(g, None) {
                let w = setup::workload(op, &shape).unwrap();
                assert!(w.flops > 0.0 && w.bytes > 0.0, "{op} {shape}");
            }
        }
        assert!(grid(Grid::Quick, Some("mla_decode")).len() == 1);
        assert!(setup::workload("nope", &Shape::of(&[("m", 1)])).is_err());
        assert!(setup::workload("fp8_gemm", &Shape::of(&[("m", 1)])).is_err());
    }

    #[test]
    fn every_bench_op_runs_on_the_reference() {
        let be = deepport_cpu::CpuRef;
        let small = [
            ("fp8_gemm", Shape::of(&[("m", 3), ("n", 130), ("k", 256)])),
            (
                "fp8_grouped_contiguous",
                Shape::of(&[("g", 2), ("m", 4), ("n", 128), ("k", 128)]),
            ),
            (
                "fp8_grouped_masked",
                Shape::of(&[
                    ("g", 2),
                    ("m", 4),
                    ("expected_m", 3),
                    ("n", 128),
                    ("k", 128),
                ]),
            ),
            ("gemm", Shape::of(&[("m", 3), ("n", 5), ("k", 7)])),
            ("gemm_f32", Shape::of(&[("m", 3), ("n", 5), ("k", 7)])),
            (
                "mla_decode",
                Shape::of(&[("b", 2), ("s_q", 1), ("h_q", 2), ("s_k", 70)]),
            ),
        ];
        assert_eq!(small.len(), setup::BENCH_OPS.len());
        for (op, shape) in small {
            let mut p = setup::Prepared::new(&be, op, &shape).unwrap();
            p.launch(&be)
                .unwrap_or_else(|e| panic!("{op}({shape}): {e}"));
        }
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
