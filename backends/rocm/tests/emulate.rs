//! Runs the ROCm-only kernels on the CPU: `emu/fp8_mfma.cpp` and
//! `emu/mla_mfma.cpp` include `kernels/fp8_gemm_mfma.cu` and
//! `kernels/mla_decode_mfma.cu` unchanged through the CUDA backend's host
//! emulation (`backends/cuda/emu/emu.h`, 64-wide wavefronts) with a model
//! of the MFMA instruction (`emu/mfma_cdna.h`), and check the dense,
//! contiguous and masked FP8 GEMMs and MLA decode against the double
//! references the CUDA kernels' harnesses use
//! (`backends/cuda/emu/fp8_gemm_check.h`, `mla_decode_check.h`).
//! No AMD GPU is needed; what the model cannot prove is in mfma_cdna.h.
//!
//! Without a C++ compiler the tests print "skipped: no C++ compiler" and
//! pass, unless `DEEPPORT_REQUIRE` names `emu`.

use deepport_testkit::emu::Emu;
use std::path::Path;

fn emu() -> Emu {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cuda = root.join("../cuda");
    Emu {
        harness_dir: root.join("emu"),
        source_dirs: vec![root.join("kernels"), cuda.join("emu"), cuda.join("kernels")],
        out_dir: env!("CARGO_TARGET_TMPDIR").into(),
    }
}

/// `-DDP_HIP` (wavefront 64) and the include paths of the CUDA sources.
fn args(extra: &'static [&'static str]) -> Vec<String> {
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cuda");
    let mut v = vec![
        "-DDP_HIP".to_string(),
        format!("-I{}", cuda.join("emu").display()),
        format!("-I{}", cuda.join("kernels").display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn fp8_gemm_mfma_dense_contiguous_masked() {
    emu().passes("fp8_mfma", &refs(&args(&[])));
}

/// The harness can fail: the kernel without its `__syncthreads` (a race on
/// the LDS tiles) gives wrong values.
#[test]
fn a_broken_mfma_kernel_is_caught() {
    emu().fails("fp8_mfma", &refs(&args(&["-DEMU_MUTATE=1"])), "FAIL ");
}

#[test]
fn mla_decode_mfma_split_kernel() {
    emu().passes("mla_mfma", &refs(&args(&[])));
}

/// The MLA harness can fail: without the kernel's `__syncthreads` the key
/// tile and the S partials race.
#[test]
fn a_broken_mla_kernel_is_caught() {
    emu().fails("mla_mfma", &refs(&args(&["-DEMU_MUTATE=1"])), "FAIL ");
}
