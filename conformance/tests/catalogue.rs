//! The case catalogue (`conformance/cases/*.yaml`): every file loads, ids
//! are unique, every op is covered by `smoke` and `v3-mustpass`, every
//! golden op file and every model case is in the catalogue, malformed files
//! are errors naming file, line and column, and `select` filters by profile
//! and glob. The smoke profile builds and passes on the CPU backends.

use deepport_conformance::judge;
use deepport_conformance::suite::catalogue::{self, PROFILES};
use deepport_conformance::suite::{CaseSpec, Metric, Outcome, Source};
use deepport_core::ops::OpKind;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn specs() -> Vec<CaseSpec> {
    let dir = catalogue::default_dir();
    catalogue::load(&dir).unwrap_or_else(|e| panic!("the catalogue does not load: {e}"))
}

fn yaml_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(catalogue::default_dir())
        .expect("conformance/cases")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_file_loads_and_names_its_family() {
    let files = yaml_files();
    let expect = [
        "act_quant",
        "weight_dequant",
        "fp8_gemm",
        "fp8_grouped_contiguous",
        "fp8_grouped_masked",
        "gemm",
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
        "golden_ops",
        "model",
    ];
    let stems: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for f in expect {
        assert!(stems.contains(f), "no case file {f}.yaml");
    }
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let cases = catalogue::parse_file(f, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cases.is_empty(), "{} has no case", f.display());
        let stem = f.file_stem().unwrap().to_string_lossy();
        for (c, line, _) in &cases {
            assert_eq!(c.family, stem, "{}", c.id);
            assert!(c.id.starts_with(&format!("{stem}(")), "{}", c.id);
            assert!(*line > 0);
            assert!(c.origin.contains(&format!("{stem}.yaml:")), "{}", c.origin);
        }
    }
}

#[test]
fn ids_are_unique_and_canonical() {
    let all = specs();
    let mut seen = BTreeSet::new();
    for s in &all {
        assert!(seen.insert(s.id.clone()), "duplicate id {}", s.id);
        assert!(s.id.ends_with(')'), "{}", s.id);
        assert!(!s.profiles.is_empty(), "{} is in no profile", s.id);
        for p in &s.profiles {
            assert!(PROFILES.contains(&p.as_str()), "{}: {p}", s.id);
        }
        for (out, tols) in &s.tolerances {
            assert!(!tols.is_empty(), "{}: {out}", s.id);
            for t in tols {
                assert!(!t.reason.trim().is_empty(), "{}: {out} has no reason", s.id);
                assert!(t.warn >= t.pass, "{}: {out}", s.id);
            }
        }
    }
    // The brief's example id exists, in that key order.
    assert!(
        seen.iter()
            .any(|id| id
                .starts_with("mla_decode(b=2,s_q=1,h_q=128,s_k=4096,h_kv=1,causal=0,varlen=1,")),
        "the real-size decode case is missing"
    );
}

#[test]
fn every_op_is_covered_by_smoke_and_mustpass() {
    let all = specs();
    for profile in ["smoke", "v3-mustpass", "full"] {
        let sel = catalogue::select(&all, profile, None);
        let covered: BTreeSet<OpKind> = sel.iter().flat_map(catalogue::ops).collect();
        // The V3.2 ops (cases only in smoke/full/v32) are beyond V3.
        let v32: BTreeSet<OpKind> = all
            .iter()
            .filter(|s| s.profiles.contains(catalogue::V32_PROFILE))
            .flat_map(catalogue::ops)
            .collect();
        let v32_families: BTreeSet<&str> = all
            .iter()
            .filter(|s| s.profiles.contains(catalogue::V32_PROFILE))
            .map(|s| s.family.as_str())
            .collect();
        for k in OpKind::ALL {
            if profile == "v3-mustpass" && v32.contains(&k) && k != OpKind::Rope {
                continue;
            }
            assert!(
                covered.contains(&k),
                "{profile} does not cover {}",
                k.name()
            );
        }
        let families: BTreeSet<&str> = sel.iter().map(|s| s.family.as_str()).collect();
        for f in deepport_conformance::cases::FAMILIES {
            if profile == "v3-mustpass" && v32_families.contains(f.name) && f.name != "rope" {
                continue;
            }
            assert!(
                families.contains(f.name),
                "{profile} has no {} case",
                f.name
            );
        }
    }
}

#[test]
fn smoke_is_a_handful_per_family_and_inside_mustpass_and_full() {
    let all = specs();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for s in catalogue::select(&all, "smoke", None) {
        *per.entry(s.family.clone()).or_default() += 1;
        assert!(
            s.profiles.contains("full"),
            "{} is smoke but not full",
            s.id
        );
        assert!(
            s.profiles.contains("v3-mustpass") || s.profiles.contains(catalogue::V32_PROFILE),
            "{} is smoke but neither v3-mustpass nor v32",
            s.id
        );
        assert!(
            !(s.profiles.contains("v3-mustpass") && s.profiles.contains(catalogue::V32_PROFILE)),
            "{} is both v3-mustpass and v32",
            s.id
        );
    }
    for (f, n) in per {
        assert!(n <= 12, "{f} has {n} smoke cases");
    }
    // Every mustpass case is also in full.
    for s in catalogue::select(&all, "v3-mustpass", None) {
        assert!(
            s.profiles.contains("full"),
            "{} is mustpass but not full",
            s.id
        );
    }
}

#[test]
fn every_golden_op_file_is_a_case() {
    let all = specs();
    let golden = deepport_conformance::golden::default_dir().join("ops");
    let files: Vec<String> = std::fs::read_dir(&golden)
        .unwrap_or_else(|e| panic!("{}: {e}", golden.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(files.len() >= 27, "{} golden op files", files.len());
    for f in files {
        let path = format!("golden/ops/{f}");
        let hits: Vec<&CaseSpec> = all
            .iter()
            .filter(|s| s.source == Source::Golden { path: path.clone() })
            .collect();
        assert_eq!(hits.len(), 1, "{path} is in {} catalogue cases", hits.len());
        assert!(
            hits[0].profiles.contains("full")
                && (hits[0].profiles.contains("v3-mustpass")
                    || hits[0].profiles.contains(catalogue::V32_PROFILE))
        );
    }
}

#[test]
fn model_cases_are_all_mustpass_and_cover_every_mode() {
    let all = specs();
    let model: Vec<&CaseSpec> = all.iter().filter(|s| s.family == "model").collect();
    let mut seen = BTreeSet::new();
    for s in &model {
        assert!(
            s.profiles.contains("v3-mustpass"),
            "{} is not mustpass",
            s.id
        );
        match &s.source {
            Source::Model { mode, check } => {
                seen.insert((mode.clone(), check.clone()));
            }
            other => panic!("{}: source {other:?}", s.id),
        }
    }
    for (mode, check) in [
        ("f32", "logits"),
        ("bf16", "layer0"),
        ("bf16", "layer1"),
        ("bf16", "layer2"),
        ("fp8", "layer0"),
        ("fp8", "layer1"),
        ("fp8", "layer2"),
        ("f32", "routing"),
        ("bf16", "routing"),
        ("fp8", "routing"),
    ] {
        assert!(
            seen.contains(&(mode.to_string(), check.to_string())),
            "no model case {mode} {check}"
        );
    }
}

#[test]
fn tolerances_follow_spec() {
    let all = specs();
    let find = |prefix: &str| -> &CaseSpec {
        all.iter()
            .find(|s| s.id.starts_with(prefix))
            .unwrap_or_else(|| panic!("no case {prefix}"))
    };
    let t = &find("fp8_gemm(m=1,n=200,k=384,ab=e4m3,out=f32)").tolerances["d"];
    assert!(t
        .iter()
        .any(|t| t.metric == Metric::CalcDiff && t.pass == 1e-5));
    let e = t.iter().find(|t| t.metric == Metric::Elementwise).unwrap();
    assert_eq!(e.params["rel"], 1e-5);
    assert_eq!(e.params["rms_rel"], 1e-5);
    assert!(e.reason.contains("cancellation"));
    let t = &find("fp8_gemm(m=37,n=576").tolerances["d"];
    let e = t.iter().find(|t| t.metric == Metric::Elementwise).unwrap();
    assert_eq!((e.params["ulps"], e.params["rms_rel"]), (2.0, 1e-3));
    let d = find("mla_decode(");
    let out = &d.tolerances["out"];
    assert!(out
        .iter()
        .any(|t| t.metric == Metric::CalcDiff && t.pass == 5e-6));
    let aor = out.iter().find(|t| t.metric == Metric::AbsOrRel).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    assert!(close(aor.params["abs"], 8e-4) && close(aor.params["rel"], 2.01 / 128.0));
    let lse = &d.tolerances["lse"][0];
    assert!(close(lse.params["abs"], 1e-6) && close(lse.params["rel"], 8.01 / 65536.0));
    assert!(find("act_quant(").tolerances["q"][0].metric == Metric::Exact);
    assert!(find("moe_gate(").tolerances["topk"][0].metric == Metric::SetEquality);
    let c = &find("ep(op=dispatch,ranks=4,experts=16,tokens=12,topk=4,hidden=256,payload=bf16")
        .tolerances["combine.out"][0];
    assert_eq!((c.metric, c.pass), (Metric::CalcDiff, 5e-6));
    let c = &find("ep(op=dispatch,ranks=4,experts=16,tokens=12,topk=4,hidden=256,payload=e4m3")
        .tolerances["combine.out"][0];
    assert_eq!(c.warn, 9e-4);
    assert_eq!(
        find("ep(op=low_latency").tolerances["recv_x"][0].metric,
        Metric::Keyed
    );
}

#[test]
fn select_filters_by_profile_and_glob() {
    let all = specs();
    let smoke = catalogue::select(&all, "smoke", None);
    let full = catalogue::select(&all, "full", None);
    let must = catalogue::select(&all, "v3-mustpass", None);
    assert!(smoke.len() < must.len() && must.len() < full.len());
    assert!(smoke.iter().all(|s| s.profiles.contains("smoke")));
    let mla = catalogue::select(&all, "smoke", Some("mla_decode*"));
    assert!(!mla.is_empty());
    assert!(mla.iter().all(|s| s.id.starts_with("mla_decode(")));
    let hkv = catalogue::select(&all, "full", Some("mla_decode(*h_kv=8,*"));
    assert!(!hkv.is_empty());
    assert!(hkv.iter().all(|s| s.params["h_kv"] == 8));
    assert!(catalogue::select(&all, "smoke", Some("no_such_family*")).is_empty());
    assert!(catalogue::select(&all, "nonexistent-profile", None).is_empty());
    // Order is catalogue order.
    let pos = |id: &str| all.iter().position(|s| s.id == id).unwrap();
    assert!(smoke.windows(2).all(|w| pos(&w[0].id) < pos(&w[1].id)));
}

#[test]
fn full_holds_deepseeks_grids() {
    let all = specs();
    let full = catalogue::select(&all, "full", None);
    let count = |f: &str| full.iter().filter(|s| s.id.starts_with(f)).count();
    // FlashMLA: 4 b × 3 s_q × 3 s_k × 16 (h_q, h_kv) pairs × 5 (causal, s_q)
    // combinations... × varlen 2 = 1920, plus the corner and the small cases.
    let grid = full
        .iter()
        .filter(|s| {
            s.family == "mla_decode" && !s.params.contains_key("lens") && s.params["zero"] == 0
        })
        .count();
    assert!(grid >= 1920, "{grid} FlashMLA grid cases");
    assert!(full.iter().any(|s| s.family == "mla_decode"
        && s.params["b"] == 128
        && s.params["s_q"] == 2
        && s.params["zero"] == 1));
    for (n, k) in [
        (2112, 7168),
        (576, 7168),
        (24576, 1536),
        (32768, 512),
        (7168, 16384),
        (4096, 7168),
        (7168, 2048),
    ] {
        for m in [1, 64, 128, 4096] {
            let id = format!("fp8_gemm(m={m},n={n},k={k},ab=e4m3,out=bf16)");
            assert!(full.iter().any(|s| s.id == id), "missing {id}");
        }
    }
    for r in [2, 4, 8] {
        for op in ["layout", "dispatch", "low_latency"] {
            assert!(
                full.iter()
                    .any(|s| s.id.starts_with(&format!("ep(op={op},ranks={r},"))),
                "no ep {op} case with {r} ranks"
            );
        }
        for p in ["bf16", "e4m3"] {
            assert!(full.iter().any(|s| s.family == "ep"
                && s.params["ranks"] == r
                && s.params.get("payload").is_some_and(|v| v == p)));
        }
    }
    assert!(count("fp8_grouped_contiguous(") >= 4 && count("fp8_grouped_masked(") >= 6);
}

#[test]
fn malformed_files_are_errors_naming_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("deepport-catalogue-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(catalogue::default_dir().join("add.yaml")).unwrap();
    let check = |name: &str, text: &str, want: &str| {
        let _ = std::fs::remove_file(dir.join("add.yaml"));
        let _ = std::fs::remove_file(dir.join("bogus.yaml"));
        std::fs::write(dir.join(name), text).unwrap();
        let e = catalogue::load(&dir).expect_err(want);
        let shown = e.to_string();
        assert!(e.line > 0 && e.column > 0, "{shown}");
        assert!(
            shown.starts_with(&format!(
                "{}:{}:{}: ",
                dir.join(name).display(),
                e.line,
                e.column
            )),
            "{shown}"
        );
        assert!(shown.contains(want), "{shown} lacks {want}");
        e
    };
    // Malformed YAML: an unclosed flow sequence.
    let e = check(
        "add.yaml",
        &good.replacen(
            "profiles: [smoke, full, v3-mustpass]",
            "profiles: [smoke, full",
            1,
        ),
        "",
    );
    assert!(e.line > 1);
    // An unknown key.
    check(
        "add.yaml",
        &good.replacen("seed: 1013", "seed: 1013\nsede: 3", 1),
        "sede",
    );
    // A wrong type.
    let e = check("add.yaml", &good.replacen("seed: 1013", "seed: [1]", 1), "");
    assert_eq!(e.line, 3);
    // An unknown op family.
    let e = check(
        "bogus.yaml",
        &good.replacen("family: add", "family: bogus", 1),
        "unknown op family `bogus`",
    );
    assert_eq!((e.line, e.column), (2, 9));
    // An unknown parameter key.
    check(
        "add.yaml",
        &good.replacen("{rows: 13, cols: 70", "{rows: 13, colls: 70", 1),
        "unknown key `colls`",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // A missing directory is an error too.
    let missing = Path::new("/nonexistent/deepport/cases");
    assert!(catalogue::load(missing).is_err());
}

#[cfg(feature = "cpu")]
#[test]
fn smoke_builds_and_passes_on_the_cpu_backends() {
    use deepport_cpu::{Cpu, CpuRef};
    let all = specs();
    for s in catalogue::select(&all, "smoke", None) {
        let case = catalogue::build(&s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(case.id, s.id);
        assert_eq!(
            case.expected.is_some(),
            s.source != Source::Generated,
            "{}",
            s.id
        );
        let actual = (case.run)(&Cpu).unwrap_or_else(|e| panic!("{}: {e}", s.id));
        let reference = match &case.expected {
            Some(e) => e.clone(),
            None => (case.run)(&CpuRef).unwrap_or_else(|e| panic!("{}: {e}", s.id)),
        };
        let checks = (case.judge)(&actual, &reference);
        assert_eq!(
            judge::verdict(&checks),
            Outcome::Pass,
            "{}: {checks:?}",
            s.id
        );
        // Empty outputs never pass.
        let none = (case.judge)(&Default::default(), &reference);
        assert_eq!(judge::verdict(&none), Outcome::Fail, "{}", s.id);
    }
}
