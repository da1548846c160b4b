//! Every kernel source of the backend compiles with NVRTC, for sm_80 (the
//! portable ones) and sm_90a (all), to a non-empty cubin whose PTX defines
//! exactly the entry points the source declares. No GPU needed.
//!
//! Without NVRTC the tests print `skipped: <reason>` and pass, unless
//! `DEEPPORT_REQUIRE` (comma separated) names `nvrtc`: then they fail.

use deepport_core::Error;
use deepport_cuda::launch::{KernelSource, Target};
use deepport_cuda::nvrtc;

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == "nvrtc"))
        .unwrap_or(false)
}

/// Whether NVRTC loads; prints why not (or fails when it is required).
fn nvrtc_here() -> bool {
    match nvrtc::probe() {
        Ok(v) => {
            eprintln!("using {v}");
            true
        }
        Err(why) => {
            assert!(
                !required(),
                "DEEPPORT_REQUIRE names nvrtc, but it cannot be loaded: {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Compiles every source that applies to `arch`; collects every failure
/// so one run names them all.
fn compile_all(arch: &str) {
    let sources = nvrtc::sources_for(arch).unwrap();
    let mut failures = Vec::new();
    for s in &sources {
        match nvrtc::compile(s, arch) {
            Ok(c) => {
                if c.cubin.is_empty() {
                    failures.push(format!("{} ({arch}): empty cubin", s.name));
                }
                if let Err(e) = nvrtc::check_entries(s, &c) {
                    failures.push(format!("{arch}: {e}"));
                }
                eprintln!(
                    "ok {} {arch}: ptx {} bytes, cubin {} bytes, entries {:?}",
                    s.name,
                    c.ptx.len(),
                    c.cubin.len(),
                    s.entries
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} sources failed for {arch}:\n{}",
        failures.len(),
        sources.len(),
        failures.join("\n\n")
    );
    eprintln!("{arch}: {} sources compiled", sources.len());
}

#[test]
fn every_portable_source_compiles_for_sm_80() {
    if nvrtc_here() {
        compile_all("sm_80");
    }
}

#[test]
fn every_source_compiles_for_sm_90a() {
    if nvrtc_here() {
        compile_all("sm_90a");
    }
}

#[test]
fn sources_are_well_formed() {
    let all = deepport_cuda::sources();
    let mut names: Vec<&str> = all.iter().map(|s| s.name).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "two kernel sources share a name");
    for s in &all {
        assert!(s.name.ends_with(".cu"), "{}: not a .cu name", s.name);
        assert!(!s.entries.is_empty(), "{}: declares no entry", s.name);
        assert!(
            !s.text.contains("#include <"),
            "{}: includes a system or CUDA header (kernels include only kernels/*.cuh)",
            s.name
        );
    }
    // sm_80 gets the portable sources, sm_90a all of them.
    let portable = all.iter().filter(|s| s.target == Target::Portable).count();
    assert_eq!(nvrtc::sources_for("sm_80").unwrap().len(), portable);
    assert_eq!(nvrtc::sources_for("sm_90a").unwrap().len(), all.len());
}

static PROBE: KernelSource = KernelSource {
    name: "probe.cu",
    text: r#"#include "port.cuh"
extern "C" DP_GLOBAL void dp_probe_scale(const u16* x, float s, u16* y, i64 n) {
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = dp_f32_to_bf16(dp_bf16_to_f32(x[i]) * s * (float)DP_ARCH);
}
"#,
    target: Target::Portable,
    entries: &["dp_probe_scale"],
};

/// The pipeline itself, independent of which sources have landed: a small
/// kernel on the embedded `port.cuh`, with `DP_ARCH` defined.
#[test]
fn a_port_cuh_kernel_compiles_with_the_embedded_header() {
    if !nvrtc_here() {
        return;
    }
    for arch in ["sm_80", "sm_90a"] {
        let c = nvrtc::compile(&PROBE, arch).unwrap();
        assert!(!c.cubin.is_empty(), "{arch}");
        assert!(c.ptx.contains(&format!(".target {arch}")), "{}", c.ptx);
        nvrtc::check_entries(&PROBE, &c).unwrap();
    }
    // A virtual architecture: PTX only.
    let c = nvrtc::compile(&PROBE, "compute_80").unwrap();
    assert!(c.cubin.is_empty());
    assert_eq!(nvrtc::ptx_entries(&c.ptx), vec!["dp_probe_scale"]);
}

#[test]
fn a_broken_source_is_an_error_carrying_the_nvrtc_log() {
    if !nvrtc_here() {
        return;
    }
    static BROKEN: KernelSource = KernelSource {
        name: "broken.cu",
        text: "#include \"port.cuh\"\nextern \"C\" DP_GLOBAL void dp_broken(float* y) {\n  y[0] = undeclared_thing;\n}\n",
        target: Target::Portable,
        entries: &["dp_broken"],
    };
    let e = nvrtc::compile(&BROKEN, "sm_80").unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("broken.cu"), "{msg}");
    assert!(msg.contains("sm_80"), "{msg}");
    // NVRTC's log: the file, the line and the identifier.
    assert!(msg.contains("undeclared_thing"), "{msg}");
    assert!(msg.contains("broken.cu(3)"), "{msg}");

    // A CUDA toolkit header is not there: kernels must not include one.
    static SYSTEM: KernelSource = KernelSource {
        name: "system.cu",
        text: "#include <cuda_fp16.h>\nextern \"C\" __global__ void dp_x() {}\n",
        target: Target::Portable,
        entries: &["dp_x"],
    };
    let msg = nvrtc::compile(&SYSTEM, "sm_80").unwrap_err().to_string();
    assert!(msg.contains("cuda_fp16.h"), "{msg}");

    // A declared entry that is not in the PTX (not extern "C").
    static MANGLED: KernelSource = KernelSource {
        name: "mangled.cu",
        text: "#include \"port.cuh\"\nDP_GLOBAL void dp_mangled(float* y) { y[0] = 1.0f; }\n",
        target: Target::Portable,
        entries: &["dp_mangled"],
    };
    let c = nvrtc::compile(&MANGLED, "sm_80").unwrap();
    let msg = nvrtc::check_entries(&MANGLED, &c).unwrap_err().to_string();
    assert!(msg.contains("missing from the PTX: dp_mangled"), "{msg}");
}

#[test]
fn an_unknown_architecture_is_an_error() {
    let e = nvrtc::sources_for("sm_70").unwrap_err().to_string();
    assert!(e.contains("sm_70") && e.contains("sm_80"), "{e}");
    if !nvrtc_here() {
        return;
    }
    // Well formed but not one NVRTC knows: its error, not a panic.
    let e = nvrtc::compile(&PROBE, "sm_11").unwrap_err().to_string();
    assert!(e.contains("sm_11"), "{e}");
}
