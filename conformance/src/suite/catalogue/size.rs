//! How much host memory a case needs, estimated from its parameters before
//! anything is allocated, and the check of that estimate against the
//! memory budget ([`deepport_core::budget::MemoryBudget`]).
//!
//! A typo in a vendor's case file (`m: 100000000000`) must give that case a
//! clean `Fail` naming the size and the budget, not abort the whole run
//! when the builder asks the allocator for 650 TiB. The estimate counts the
//! elements of every input and output tensor of the case (the same shapes
//! the family's builder in [`crate::cases`] makes) and charges each
//! [`BYTES_PER_ELEMENT`] bytes, as if every element were held once as f32
//! (most are bf16 or FP8, and some are held twice: by the backend and by
//! the reference). It is a guard against sizes no machine can hold, not an
//! exact account; a case under it that still cannot allocate fails in its
//! builder or, with `--isolate`, crashes only its own process.

use crate::cases::{ParamMap, P};
use crate::types::CaseSpec;
use deepport_core::budget::MemoryBudget;

/// Bytes charged per tensor element.
pub const BYTES_PER_ELEMENT: f64 = 4.0;

/// Families whose sizes come from files of this tree, not from parameters.
const FROM_FILES: [&str; 2] = ["golden_ops", "model"];

/// Every family this module has an estimate for (a test checks that every
/// family of [`crate::cases::FAMILIES`] is listed).
pub const ESTIMATED: [&str; 22] = [
    "act_quant",
    "weight_dequant",
    "fp8_gemm",
    "fp8_grouped_contiguous",
    "fp8_grouped_masked",
    "gemm",
    "gemm_grouped",
    "mla_decode",
    "mla_prefill",
    "rms_norm",
    "rope",
    "moe_gate",
    "silu_mul",
    "add",
    "embedding",
    "copy_window",
    "ep",
    "indexer_logits",
    "indexer_topk",
    "sparse_mla_decode",
    "cache_quant",
    "sparse_mla_prefill",
];

/// The element count of a case's tensors (inputs and outputs), computed in
/// f64 so that no parameter value can overflow it (precision does not
/// matter here); `None` for a family sized by files or unknown here.
pub fn elements(family: &str, params: &ParamMap) -> Option<f64> {
    let p = P(params);
    // A missing or malformed parameter counts as 0: the builder reports it.
    let i = |k: &str| p.int(k).map_or(0.0, |v| v as f64);
    let sum_list = |k: &str| {
        p.ints(k)
            .ok()
            .flatten()
            .map_or(0.0, |v| v.iter().map(|&x| x as f64).sum())
    };
    let c128 = |x: f64| (x / 128.0).ceil();
    let n = match family {
        "act_quant" => {
            let (m, k) = (i("m"), i("k"));
            2.0 * m * k + m * c128(k)
        }
        "weight_dequant" => {
            let (n, k) = (i("n"), i("k"));
            2.0 * n * k + c128(n) * c128(k)
        }
        "fp8_gemm" | "gemm" => {
            let (m, n, k) = (i("m"), i("n"), i("k"));
            m * k + n * k + m * n + m * c128(k) + c128(n) * c128(k)
        }
        "fp8_grouped_contiguous" => {
            let (g, n, k) = (i("groups"), i("n"), i("k"));
            // Rows: each group gets up to 1.3·m, padded to 128; or the
            // explicit 128-row blocks.
            let rows = match p.opt_text("blocks").ok().flatten() {
                Some(b) => 128.0 * b.split('/').count() as f64,
                None => g * (c128(i("m") * 1.3 + 1.0) * 128.0),
            };
            rows * k + g * n * k + rows * n + rows * c128(k) + g * c128(n) * c128(k)
        }
        "fp8_grouped_masked" => {
            let (g, m, n, k) = (i("groups"), i("m_max"), i("n"), i("k"));
            g * m * k + g * n * k + g * m * n + g * m * c128(k) + g * c128(n) * c128(k)
        }
        "gemm_grouped" => {
            let (g, n, k) = (i("groups"), i("n"), i("k"));
            // Rows as fp8_grouped_* (masked: G·m_max; contiguous: blocks,
            // interleaved G·m, or up to 1.3·m per group padded to 128).
            let rows = if p.opt_text("layout").ok().flatten() == Some("masked") {
                g * i("m_max")
            } else if let Some(b) = p.opt_text("blocks").ok().flatten() {
                128.0 * b.split('/').count() as f64
            } else if p.flag("interleave").unwrap_or(false) {
                g * i("m")
            } else {
                g * (c128(i("m") * 1.3 + 1.0) * 128.0)
            };
            rows * k + g * n * k + rows * n + rows
        }
        "mla_decode" => {
            let (b, s_q, h_q, h_kv) = (i("b"), i("s_q"), i("h_q"), i("h_kv").max(1.0));
            // `lens` lists the lengths; varlen draws them around s_k
            // (s_k + N(0, 1)·s_k/2: their sum stays well under 1.5·b·s_k).
            let total_len = if p.has("lens") {
                sum_list("lens")
            } else if p.flag("varlen").unwrap_or(false) {
                1.5 * b * i("s_k")
            } else {
                b * i("s_k")
            };
            let pages = (total_len / 64.0).ceil() + b + 3.0;
            pages * 64.0 * h_kv * 576.0 + b * s_q * h_q * (576.0 + 512.0 + 1.0) + b * pages
        }
        "mla_prefill" => {
            let (t, s, h) = (i("t"), i("s"), i("h"));
            let (dn, dr, dc, dv) = (i("dn"), i("dr"), i("dc"), i("dv"));
            t * h * (dn + dr + dv + 1.0) + s * (dc + dr) + h * (dn + dv) * dc + t * h * s
        }
        "rms_norm" => 2.0 * i("rows") * i("dim") + i("dim"),
        "rope" => 2.0 * i("t") * i("h").max(1.0) * i("d") + i("t"),
        "moe_gate" => {
            let (t, e, dim) = (i("t"), i("experts"), i("dim"));
            t * dim + e * dim + t * e + e + 2.0 * t * i("topk")
        }
        "silu_mul" | "add" => 3.0 * i("rows") * i("cols"),
        "embedding" => (i("vocab") + i("tokens")) * i("dim") + i("tokens"),
        "copy_window" => i("src_rows") * i("src_cols") + 2.0 * i("dst_rows") * i("dst_cols"),
        "ep" => {
            let (r, e, t, k) = (i("ranks"), i("experts"), i("tokens"), i("topk"));
            let hidden = p.opt_int("hidden").ok().flatten().unwrap_or(128) as f64;
            // The chance that a token's k distinct experts include one of
            // a given rank's E/R: the expected share of each rank's tokens
            // that every rank receives in a dispatch.
            let others = e - e / r.max(1.0);
            let miss = (0..k as u64).fold(1.0, |m, j| {
                let j = j as f64;
                if e - j <= 0.0 {
                    0.0
                } else {
                    m * ((others - j).max(0.0) / (e - j))
                }
            });
            // Received rows per rank, and how many copies of them a case
            // holds at its peak, measured on `cpu` with DeepEP's 8-rank
            // shapes (all ranks run at once; charged in 4-byte units, the
            // rows are bf16 or FP8): a dispatch holds five bf16 copies
            // while the reference's combine runs next to the backend's
            // received rows (staging, messages, the expert's output); a
            // low-latency case two of its receive buffer (local experts ×
            // ranks × max = experts × max per rank), with a margin.
            let recv = match p.opt_text("op").ok().flatten() {
                Some("dispatch") => 2.5 * t * r * (1.0 - miss) * hidden,
                Some("low_latency") => 1.25 * e * i("max_tokens") * hidden,
                _ => 0.0,
            };
            // Per rank: its tokens, the combined output, routing, layouts.
            r * (t * hidden * 2.0 + t * k * 2.0 + recv + r * e)
        }
        // DeepSeek-V3.2 (docs/spec-v32.md): paged caches of `block`-token
        // pages (byte tensors charged by their size in 4-byte units).
        "indexer_logits" | "sparse_mla_decode" => {
            let b = i("b");
            let block = i("block").max(1.0);
            let (total_len, longest) = if p.has("lens") {
                let v = p.ints("lens").ok().flatten().unwrap_or_default();
                (
                    sum_list("lens"),
                    v.iter().max().copied().unwrap_or(0) as f64,
                )
            } else if p.flag("varlen").unwrap_or(false) {
                (1.5 * b * i("s_k"), 3.0 * i("s_k"))
            } else {
                (b * i("s_k"), i("s_k"))
            };
            let pages = (total_len / block).ceil() + b + 3.0;
            if family == "indexer_logits" {
                let (nn, h, d) = (i("next_n").max(1.0), i("h"), i("d"));
                let max_len = longest + 2.0 * block;
                pages * block * (d + 4.0) / 4.0 + b * nn * (h * d / 4.0 + h + max_len) + b * pages
            } else {
                let (s_q, h_q, topk) = (i("s_q"), i("h_q"), i("topk"));
                pages * block * 656.0 / 4.0
                    + b * s_q * (h_q * (576.0 + 512.0 + 1.0) + topk)
                    + 2.0 * topk * 576.0
                    + b * pages
            }
        }
        "indexer_topk" => i("rows") * (i("n") + i("topk") + 1.0),
        // Plain tensors (twice: the tensors and the reference's f32
        // copies of q and kv) and one query's gathered keys in f64.
        "sparse_mla_prefill" => {
            let (s_q, s_kv, h_q, topk) = (i("s_q"), i("s_kv"), i("h_q"), i("topk"));
            let d = p.int("d_qk").map_or(576.0, |v| v as f64);
            2.0 * (s_q * h_q * d + s_kv * d)
                + s_q * (topk + 1.0)
                + s_q * h_q * (512.0 + 2.0)
                + 2.0 * topk.min(s_kv) * d
        }
        "cache_quant" => {
            let tokens = i("blocks") * i("block");
            let (d, bytes) = if p.opt_text("layout").ok().flatten() == Some("latent") {
                (576.0, 656.0)
            } else {
                (i("d"), i("d") + 4.0)
            };
            tokens * (d + bytes / 4.0)
        }
        f if FROM_FILES.contains(&f) => return None,
        // Unknown here: the builder reports an unknown family.
        _ => return None,
    };
    Some(n)
}

/// The estimated bytes of a case, or `None` when it is sized by files.
pub fn estimate(spec: &CaseSpec) -> Option<u64> {
    // `as` saturates: anything at or beyond 2^64 is u64::MAX.
    elements(&spec.family, &spec.params).map(|n| (n * BYTES_PER_ELEMENT) as u64)
}

/// The integer parameters of a case as `k=v` (for messages).
fn sizes_text(params: &ParamMap) -> String {
    params
        .iter()
        .filter(|(_, v)| v.is_u64())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a case's estimate against `budget`; the error names the case,
/// where it is declared, its size parameters, the estimate and the budget.
pub fn check(spec: &CaseSpec, budget: MemoryBudget) -> deepport_core::Result<()> {
    let Some(bytes) = estimate(spec) else {
        return Ok(());
    };
    budget.check(
        &format!(
            "case {} ({}): its tensors ({})",
            spec.id,
            spec.origin,
            sizes_text(&spec.params)
        ),
        bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn params(kv: &[(&str, u64)]) -> ParamMap {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    #[test]
    fn every_family_has_an_estimate_or_is_sized_by_files() {
        for f in crate::cases::FAMILIES {
            assert!(
                ESTIMATED.contains(&f.name) || FROM_FILES.contains(&f.name),
                "family {} has no size estimate in suite/catalogue/size.rs",
                f.name
            );
        }
        for f in ESTIMATED {
            assert!(crate::cases::family(f).is_some(), "{f}");
            assert!(elements(f, &ParamMap::new()).is_some(), "{f}");
        }
    }

    #[test]
    fn estimates_grow_with_every_dimension() {
        let base = params(&[("m", 128), ("n", 256), ("k", 512)]);
        let e0 = elements("fp8_gemm", &base).unwrap();
        assert!(e0 >= (128 * 512 + 256 * 512 + 128 * 256) as f64);
        for key in ["m", "n", "k"] {
            let mut p = base.clone();
            p.insert(key.into(), Value::from(1024u64));
            assert!(elements("fp8_gemm", &p).unwrap() > e0, "{key}");
        }
        // The typo: m = 10^11 with DeepSeek's k.
        let typo = params(&[("m", 100_000_000_000), ("n", 7168), ("k", 7168)]);
        let bytes = elements("fp8_gemm", &typo).unwrap() * BYTES_PER_ELEMENT;
        assert!(bytes > (1u64 << 50) as f64, "{bytes}");
        // Absurd values saturate instead of overflowing.
        let absurd = params(&[("m", u64::MAX), ("n", u64::MAX), ("k", u64::MAX)]);
        let spec = CaseSpec {
            params: absurd,
            ..spec_of(&[])
        };
        assert_eq!(estimate(&spec), Some(u64::MAX));
    }

    #[test]
    fn the_whole_catalogue_fits_a_modest_machine() {
        // Every real case must pass the check on a 16 GiB machine, or the
        // estimate would refuse cases that run; the largest are printed.
        let specs = crate::suite::catalogue::load(&crate::suite::catalogue::default_dir())
            .expect("the catalogue loads");
        let budget = MemoryBudget::new(16 << 30);
        let mut sizes: Vec<(u64, String)> = specs
            .iter()
            .filter_map(|s| estimate(s).map(|b| (b, s.id.clone())))
            .collect();
        sizes.sort();
        for (b, id) in sizes.iter().rev().take(5) {
            eprintln!("{:>12}  {id}", deepport_core::budget::fmt_bytes(*b));
        }
        for s in &specs {
            check(s, budget).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(
            sizes.last().is_some_and(|l| l.0 > 0),
            "no case was estimated"
        );
    }

    #[test]
    fn ep_estimates_cover_the_measured_peaks() {
        // Peak RSS of `deepport run --backend cpu` (reference included) on
        // the largest expert-parallel cases, measured with /usr/bin/time:
        // the estimate must not be below them, or the budget check lets
        // through cases that cannot run.
        let specs = crate::suite::catalogue::load(&crate::suite::catalogue::default_dir())
            .expect("the catalogue loads");
        let measured = [
            (
                "ep(op=dispatch,ranks=8,experts=256,tokens=4096,topk=8,hidden=7168,payload=bf16,",
                13_010_468u64 << 10,
            ),
            (
                "ep(op=low_latency,ranks=8,experts=288,tokens=128,topk=8,hidden=7168,payload=bf16,",
                8_004_992 << 10,
            ),
        ];
        for (prefix, peak) in measured {
            let spec = specs
                .iter()
                .find(|s| s.id.starts_with(prefix))
                .unwrap_or_else(|| panic!("no case {prefix}"));
            let est = estimate(spec).expect("estimated");
            assert!(est >= peak, "{}: estimate {est} < measured {peak}", spec.id);
        }
    }

    fn spec_of(kv: &[(&str, u64)]) -> CaseSpec {
        CaseSpec {
            id: "fp8_gemm(m=100000000000,n=7168,k=7168,ab=e4m3,out=bf16)".into(),
            family: "fp8_gemm".into(),
            params: params(kv),
            seed: 1,
            profiles: Default::default(),
            tolerances: Default::default(),
            source: crate::types::Source::Generated,
            origin: "fp8_gemm.yaml:12".into(),
        }
    }

    #[test]
    fn over_budget_names_case_origin_sizes_and_budget() {
        let spec = spec_of(&[("m", 100_000_000_000), ("n", 7168), ("k", 7168)]);
        let e = check(&spec, MemoryBudget::new(8 << 30))
            .unwrap_err()
            .to_string();
        for want in [
            "fp8_gemm(m=100000000000",
            "fp8_gemm.yaml:12",
            "m=100000000000",
            "8589934592 bytes",
            "--max-memory",
        ] {
            assert!(e.contains(want), "`{want}` missing from: {e}");
        }
        assert!(check(&spec, MemoryBudget::unlimited()).is_ok());
    }
}
