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

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Longest a harness may run (they take seconds; the emulation itself
/// aborts on a barrier deadlock, this guards against anything else).
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn emu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("emu")
}

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == "emu"))
        .unwrap_or(false)
}

/// The C++ compiler to use, if one runs.
fn compiler() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(cxx) = std::env::var("CXX") {
        if !cxx.trim().is_empty() {
            candidates.push(cxx);
        }
    }
    candidates.push("c++".into());
    candidates.push("g++".into());
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

/// Newest modification time of the harness and kernel sources.
fn newest_source() -> SystemTime {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut newest = SystemTime::UNIX_EPOCH;
    for dir in [emu_dir(), kernels] {
        for entry in fs::read_dir(&dir)
            .expect("source directory readable")
            .flatten()
        {
            if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(t);
            }
        }
    }
    newest
}

struct Outcome {
    success: bool,
    output: String,
}

/// Compiles `emu/<harness>.cpp` with `defines` and runs it; `None` when
/// there is no compiler (and `emu` is not required).
fn compile_and_run(harness: &str, defines: &[&str]) -> Option<Outcome> {
    let Some(cxx) = compiler() else {
        assert!(
            !required(),
            "DEEPPORT_REQUIRE names `emu` but no C++ compiler runs ($CXX, c++, g++)"
        );
        println!("skipped: no C++ compiler");
        return None;
    };
    let tag: String = defines
        .iter()
        .map(|d| d.trim_start_matches("-D").replace(['=', '-'], "_"))
        .collect::<Vec<_>>()
        .join("-");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu");
    fs::create_dir_all(&out_dir).expect("tmp dir");
    let exe = out_dir.join(format!("{harness}-{tag}"));
    let fresh = fs::metadata(&exe)
        .and_then(|m| m.modified())
        .map(|t| t > newest_source())
        .unwrap_or(false);
    if !fresh {
        let t0 = Instant::now();
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread"])
            .args(defines)
            .arg(emu_dir().join(format!("{harness}.cpp")))
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("compiler runs");
        assert!(
            out.status.success(),
            "{cxx} failed on {harness}.cpp {defines:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("compiled {harness} {defines:?} in {:.1?}", t0.elapsed());
    }
    // Output goes to a file: a long failure listing cannot block the pipe.
    let log = out_dir.join(format!("{harness}-{tag}.log"));
    let t0 = Instant::now();
    let mut child = Command::new(&exe)
        .stdout(File::create(&log).expect("log file"))
        .stderr(File::create(log.with_extension("err")).expect("log file"))
        .spawn()
        .expect("harness starts");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if t0.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = fs::read_to_string(&log).unwrap_or_default();
    output += &fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    println!(
        "{harness} {defines:?} ran in {:.1?}:\n{output}",
        t0.elapsed()
    );
    let Some(status) = status else {
        panic!("{harness} {defines:?} timed out after {RUN_LIMIT:?}");
    };
    Some(Outcome {
        success: status.success(),
        output,
    })
}

fn passes(harness: &str, defines: &[&str]) {
    if let Some(o) = compile_and_run(harness, defines) {
        assert!(o.success, "{harness} {defines:?} failed:\n{}", o.output);
        assert!(
            o.output.contains("PASSED"),
            "no summary line:\n{}",
            o.output
        );
    }
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
        if let Some(o) = compile_and_run(harness, &["-DEMU_MUTATE=1"]) {
            assert!(
                !o.success,
                "{harness}: the broken kernel passed:\n{}",
                o.output
            );
            assert!(
                o.output.contains(expect),
                "{harness}: `{expect}` not in the output:\n{}",
                o.output
            );
        }
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
