//! `deepport kernels --backend rocm`: usage errors always; with hiprtc
//! (Debian's libamdhip64-dev, ROCm 5.2), every code object for gfx90a and
//! gfx908 with its manifest. Without hiprtc the compile test prints
//! `skipped: <reason>` and passes, unless `DEEPPORT_REQUIRE` (comma
//! separated) names `hiprtc`.

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
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kernels_rocm_cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == "hiprtc"))
        .unwrap_or(false)
}

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
    let d = tmp("arch");
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
fn compile_for(gfx: &str, mfma: bool) {
    let d = tmp(gfx);
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
            !required(),
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
    compile_for("gfx90a", true);
    compile_for("gfx908", false);
}
