//! `deepport kernels`: usage errors always; with NVRTC (the `cuda`
//! feature), the full compile for sm_90a and sm_80 with its manifest; with
//! hiprtc (the `rocm` feature; Debian's libamdhip64-dev, ROCm 5.2), every
//! code object for gfx90a and gfx908. Without the compiler a compile test
//! prints `skipped: <reason>` and passes, unless `DEEPPORT_REQUIRE` (comma
//! separated) names it (`nvrtc`, `hiprtc`).

use std::path::PathBuf;
use std::process::Command;

fn deepport(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepport"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kernels_cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Whether `DEEPPORT_REQUIRE` names `tool`.
fn required(tool: &str) -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == tool))
        .unwrap_or(false)
}

#[test]
fn help_explains_the_command() {
    let (code, out, err) = deepport(&["kernels", "--help"]);
    assert_eq!(code, 0, "{err}");
    for w in [
        "--backend",
        "--arch",
        "--out",
        "manifest.json",
        "DEEPPORT_NVRTC",
        "sm_90a",
        "sm_80",
        "Exit status",
    ] {
        assert!(out.contains(w), "`{w}` missing from:\n{out}");
    }
    let (code, out, _) = deepport(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("kernels"), "{out}");
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let d = tmp("backend");
    let (code, _, err) = deepport(&[
        "kernels",
        "--backend",
        "vulkan",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("vulkan") && err.contains("only `cuda`"),
        "{err}"
    );
    assert!(!d.exists(), "nothing is written on a usage error");
}

#[test]
fn missing_out_is_a_usage_error() {
    let (code, _, err) = deepport(&["kernels", "--arch", "sm_80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--out"), "{err}");
}

#[cfg(feature = "cuda")]
#[test]
fn unknown_arch_is_a_usage_error() {
    let d = tmp("arch");
    let (code, _, err) = deepport(&["kernels", "--arch", "sm_75", "--out", d.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("sm_75") && err.contains("sm_80") && err.contains("sm_90a"),
        "{err}"
    );
    assert!(!d.exists());
}

#[cfg(feature = "cuda")]
#[test]
fn nvrtc_missing_is_exit_1_naming_what_was_tried() {
    let d = tmp("missing");
    let out = Command::new(env!("CARGO_BIN_EXE_deepport"))
        .args(["kernels", "--arch", "sm_80", "--out", d.to_str().unwrap()])
        .env("DEEPPORT_NVRTC", "/nonexistent/libnvrtc.so.12")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("DEEPPORT_NVRTC=/nonexistent/libnvrtc.so.12"),
        "{err}"
    );
    assert!(!d.exists());
}

/// Compiles every source for `arch` and checks the files and the manifest.
#[cfg(feature = "cuda")]
fn compile_for(arch: &str, expected: &[&deepport_cuda::launch::KernelSource]) {
    let d = tmp(arch);
    let (code, out, err) = deepport(&["kernels", "--arch", arch, "--out", d.to_str().unwrap()]);
    if code == 1 && err.contains("NVRTC not") {
        assert!(
            !required("nvrtc"),
            "DEEPPORT_REQUIRE names nvrtc, but deepport kernels cannot load it:\n{err}"
        );
        eprintln!("skipped: {err}");
        return;
    }
    assert_eq!(code, 0, "{out}{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["backend"], "cuda");
    assert_eq!(m["arch"], arch);
    assert!(
        m["compiler"].as_str().unwrap().starts_with("NVRTC 1"),
        "{m}"
    );
    assert_eq!(m["failed"].as_array().unwrap().len(), 0, "{m}");
    let listed = m["sources"].as_array().unwrap();
    assert_eq!(listed.len(), expected.len(), "{m}");
    for (s, v) in expected.iter().zip(listed) {
        assert_eq!(v["source"], s.name);
        let stem = s.name.strip_suffix(".cu").unwrap_or(s.name);
        let ptx = std::fs::read_to_string(d.join(format!("{stem}.{arch}.ptx"))).unwrap();
        let cubin = std::fs::read(d.join(format!("{stem}.{arch}.cubin"))).unwrap();
        assert_eq!(v["ptx_bytes"].as_u64(), Some(ptx.len() as u64));
        assert_eq!(v["cubin_bytes"].as_u64(), Some(cubin.len() as u64));
        assert!(
            cubin.starts_with(b"\x7fELF"),
            "{}: cubin is not an ELF",
            s.name
        );
        for e in s.entries {
            assert!(ptx.contains(&format!(".entry {e}(")), "{}: {e}", s.name);
        }
        // The directory is usable as DEEPPORT_CUDA_KERNELS: the prebuilt
        // loader accepts it (fingerprint of these very sources).
        let loaded = deepport_cuda::nvrtc::load_prebuilt(&d, s, arch).unwrap();
        assert_eq!(loaded.cubin, cubin, "{}", s.name);
        assert_eq!(
            v["entries"].as_array().unwrap().len(),
            s.entries.len(),
            "{v}"
        );
    }
    assert!(
        out.contains(&format!("kernels: {} compiled, 0 failed", expected.len())),
        "{out}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn compiles_every_source_for_sm_90a_and_the_portable_ones_for_sm_80() {
    use deepport_cuda::launch::Target;
    let all = deepport_cuda::sources();
    compile_for("sm_90a", &all);
    let portable: Vec<_> = all
        .iter()
        .copied()
        .filter(|s| s.target == Target::Portable)
        .collect();
    compile_for("sm_80", &portable);
}

// --- rocm ---

#[test]
fn help_names_rocm() {
    let (code, out, err) = deepport(&["kernels", "--help"]);
    assert_eq!(code, 0, "{err}");
    for w in ["rocm", "hiprtc", "gfx90a", ".hsaco", "wavefront 64"] {
        assert!(out.contains(w), "`{w}` missing from:\n{out}");
    }
}

#[cfg(feature = "rocm")]
#[test]
fn a_cuda_arch_is_a_usage_error() {
    let d = tmp("rocm-arch");
    let (code, _, err) = deepport(&[
        "kernels",
        "--backend",
        "rocm",
        "--arch",
        "sm_90a",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sm_90a") && err.contains("gfx90a"), "{err}");
    assert!(!d.exists(), "nothing is written on a usage error");
}

/// Compiles every source for `gfx` and checks the files and the manifest.
#[cfg(feature = "rocm")]
fn compile_rocm_for(gfx: &str, mfma: bool) {
    let d = tmp(&format!("rocm-{gfx}"));
    let (code, out, err) = deepport(&[
        "kernels",
        "--backend",
        "rocm",
        "--arch",
        gfx,
        "--out",
        d.to_str().unwrap(),
    ]);
    if code == 1 && err.contains("hiprtc cannot be loaded") {
        assert!(
            !required("hiprtc"),
            "DEEPPORT_REQUIRE names hiprtc, but deepport kernels cannot load it:\n{err}"
        );
        eprintln!("skipped: {err}");
        return;
    }
    assert_eq!(code, 0, "{out}{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["backend"], "rocm");
    assert_eq!(m["arch"], gfx);
    assert_eq!(m["failed"].as_array().unwrap().len(), 0, "{m}");
    let mut expected = deepport_rocm::sources();
    expected.extend(deepport_rocm::mfma::sources_for(gfx));
    assert_eq!(
        expected.iter().any(|s| s.name == "fp8_gemm_mfma.cu"),
        mfma,
        "{gfx}"
    );
    let listed = m["sources"].as_array().unwrap();
    assert_eq!(listed.len(), expected.len(), "{m}");
    for (s, v) in expected.iter().zip(listed) {
        assert_eq!(v["source"], s.name);
        let stem = s.name.strip_suffix(".cu").unwrap_or(s.name);
        let code = std::fs::read(d.join(format!("{stem}.{gfx}.hsaco"))).unwrap();
        assert_eq!(v["bytes"].as_u64(), Some(code.len() as u64));
        let co = deepport_rocm::elf::parse(&code).unwrap();
        assert_eq!(co.gfx, Some(gfx), "{}", s.name);
        let mut want: Vec<String> = s.entries.iter().map(|e| e.to_string()).collect();
        want.sort();
        assert_eq!(co.kernels, want, "{}", s.name);
    }
    assert!(
        out.contains(&format!("kernels: {} compiled, 0 failed", expected.len())),
        "{out}"
    );
}

#[cfg(feature = "rocm")]
#[test]
fn writes_every_code_object_for_gfx90a_and_gfx908() {
    compile_rocm_for("gfx90a", true);
    compile_rocm_for("gfx908", false);
}
