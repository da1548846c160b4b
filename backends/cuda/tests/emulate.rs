//! Runs the real kernel sources on the CPU: each harness in `emu/` includes
//! kernels/*.cu through `emu/emu.h` (a host emulation of the CUDA subset
//! they use, see emu/README.md), is compiled with the system C++ compiler
//! (`$CXX`, else `c++`, else `g++`) and run; it checks the kernels against
//! independent references and exits non-zero on any failed check. 32-wide
//! warps, and 64-wide (`-DDP_HIP`, the ROCm path of port.cuh) where the
//! kernels are portable.
//!
//! Without a C++ compiler the tests print "skipped: no C++ compiler" and
//! pass, unless `DEEPPORT_REQUIRE` (a comma list) names `emu`.

use deepport_testkit::emu::{Emu, Outcome};
use std::path::Path;

fn emu() -> Emu {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Emu {
        harness_dir: root.join("emu"),
        source_dirs: vec![root.join("kernels")],
        out_dir: env!("CARGO_TARGET_TMPDIR").into(),
    }
}

/// Compiles `emu/<harness>.cpp` with `defines` and runs it; `None` when
/// there is no compiler (and `emu` is not required).
fn compile_and_run(harness: &str, defines: &[&str]) -> Option<Outcome> {
    emu().run(harness, defines)
}

fn passes(harness: &str, defines: &[&str]) {
    emu().passes(harness, defines)
}

#[test]
fn small_ops_warp32() {
    passes("small_ops", &[]);
}

#[test]
fn small_ops_warp64() {
    passes("small_ops", &["-DDP_HIP"]);
}

#[test]
fn mla_decode_warp32() {
    passes("mla_decode", &[]);
}

#[test]
fn mla_decode_warp64() {
    passes("mla_decode", &["-DDP_HIP"]);
}

#[test]
fn mla_prefill_warp32() {
    passes("mla_prefill", &[]);
}

#[test]
fn mla_prefill_warp64() {
    passes("mla_prefill", &["-DDP_HIP"]);
}

/// The sm_90a kernel (wgmma through the models in emu/wgmma_sm90.h); NVIDIA
/// only, so 32-wide warps only.
#[test]
fn mla_sm90_warp32() {
    passes("mla_sm90", &[]);
}

#[test]
fn gemm_tiled_warp32() {
    passes("gemm_tiled", &[]);
}

#[test]
fn gemm_tiled_warp64() {
    passes("gemm_tiled", &["-DDP_HIP"]);
}

#[test]
fn quant_act_warp32() {
    passes("quant_act", &[]);
}

#[test]
fn quant_act_warp64() {
    passes("quant_act", &["-DDP_HIP"]);
}

/// The sm_90a FP8 GEMM (TMA, mbarrier and wgmma through the models in
/// emu/tma_sm90.h); NVIDIA only, so 32-wide warps only.
#[test]
fn fp8_sm90_warp32() {
    passes("fp8_sm90", &[]);
}

/// The FP8 encoders on a sample of the f32 bit patterns (the exhaustive
/// run, `-DEMU_FP8_EXHAUSTIVE`, takes minutes: by hand, see emu/README.md).
/// No warp-level code: 32 only.
#[test]
fn fp8_encode_sampled() {
    passes("fp8_encode", &[]);
}

/// The GEMM harnesses can fail: gemm.cu without its `__syncthreads` (a race
/// on the shared tiles) gives wrong values, and fp8_gemm_sm90.cu without
/// its mbarrier waits (loads land only when waited for, in the deferred TMA
/// model) trips the model's mbarrier protocol check.
#[test]
fn broken_gemm_kernels_are_caught() {
    for (harness, expect) in [("gemm_tiled", "FAIL "), ("fp8_sm90", "tma_sm90 model")] {
        emu().fails(harness, &["-DEMU_MUTATE=1"], expect);
    }
}

/// The harness can fail: a kernel-level bug (every flagged index shifted by
/// one, through port.cuh's `dp_flag`), a single flipped output bit, and a
/// race (small.cu's `__syncthreads` removed) are each caught.
#[test]
fn broken_kernels_are_caught() {
    for (define, expect) in [
        ("-DEMU_MUTATE=1", "embedding"),
        ("-DEMU_MUTATE=2", "add"),
        ("-DEMU_MUTATE=3", "rms_norm"),
    ] {
        if let Some(o) = compile_and_run("small_ops", &[define]) {
            assert!(
                !o.success,
                "{define}: the broken kernel passed:\n{}",
                o.output
            );
            assert!(o.output.contains("FAILED"), "{define}:\n{}", o.output);
            assert!(
                o.output.contains("FAIL "),
                "{define}: no failed check listed:\n{}",
                o.output
            );
            assert!(
                o.output.contains(expect),
                "{define}: `{expect}` not named:\n{}",
                o.output
            );
        }
    }
}
