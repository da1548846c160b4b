//! `deepport` under `mpirun` (built with `--features mpi`):
//!
//! * `run --comm mpi --profile ep` on 2 and 4 ranks: the catalogue's
//!   expert-parallel cases, one process per rank, judged against in-process
//!   `cpu-ref` ranks (layout, dispatch, combine, low-latency, bf16 and FP8);
//! * `forward --comm mpi --ep 4` against the single-process run: logits and
//!   every layer's routing (`topk_idx`, `topk_weights`) the same bytes in f32;
//! * ranks started with different options fail at start naming the option.
//!
//! Without `mpirun` every test prints `skipped: …` and passes, unless
//! `DEEPPORT_REQUIRE` (comma separated) names `mpi`.
#![cfg(feature = "mpi")]

use deepport_core::tensor::read_safetensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "mpi")
}

fn have_mpirun() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("mpirun").is_file()));
    if !found {
        assert!(
            !required(),
            "DEEPPORT_REQUIRE names mpi, but mpirun is not on the PATH"
        );
        eprintln!("skipped: mpirun is not on the PATH (DEEPPORT_REQUIRE=mpi makes this a failure)");
    }
    found
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deepport() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepport"));
    c.current_dir(repo());
    c
}

/// `mpirun … -np N deepport ARGS` (an MPMD `:` list when `per_rank` is given).
fn mpirun(np: usize, args: &[&str]) -> Output {
    Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .arg(env!("CARGO_BIN_EXE_deepport"))
        .args(args)
        .current_dir(repo())
        .env("DEEPPORT_MPI_TIMEOUT", "120")
        .output()
        .expect("running mpirun")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-mpi-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

#[test]
fn ep_profile_on_2_and_4_ranks_passes() {
    if !have_mpirun() {
        return;
    }
    for np in [2usize, 4] {
        let report = tmp(&format!("run{np}"));
        let o = mpirun(
            np,
            &[
                "run",
                "--comm",
                "mpi",
                "--profile",
                "ep",
                "--backend",
                "cpu",
                "--timeout",
                "120",
                "--report",
                report.to_str().expect("utf-8 path"),
            ],
        );
        let s = text(&o);
        assert!(o.status.success(), "np {np}: {s}");
        assert!(s.contains(&format!("on {np} MPI ranks")), "{s}");
        let jsonl = std::fs::read_to_string(report.join("results.jsonl")).expect("results.jsonl");
        let lines: Vec<&str> = jsonl.lines().collect();
        assert!(lines.len() >= 2, "np {np}: too few cases: {jsonl}");
        for l in &lines {
            assert!(
                l.contains(&format!("ranks={np}")),
                "np {np}: a case of another world size: {l}"
            );
            assert!(l.contains("\"Pass\""), "np {np}: {l}");
        }
        // Both payload kinds and both paths ran.
        for want in ["op=dispatch", "op=low_latency", "op=layout", "e4m3", "bf16"] {
            assert!(
                jsonl.contains(want),
                "np {np}: no case with {want}: {jsonl}"
            );
        }
    }
}

fn forward_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "forward",
        "--backend",
        "cpu",
        "--checkpoint",
        "golden/model",
        "--mode",
        "f32",
        "--tokens",
        "@golden/model/tokens.json",
        "--taps",
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn forward_on_4_mpi_ranks_equals_one_process_in_f32() {
    if !have_mpirun() {
        return;
    }
    let one = tmp("fwd1.safetensors");
    let four = tmp("fwd4.safetensors");
    let o = deepport()
        .args(forward_args(one.to_str().expect("utf-8"), &[]))
        .output()
        .expect("deepport forward");
    assert!(o.status.success(), "{}", text(&o));
    let o = mpirun(
        4,
        &forward_args(
            four.to_str().expect("utf-8"),
            &["--comm", "mpi", "--ep", "4"],
        ),
    );
    assert!(o.status.success(), "{}", text(&o));
    let a = read_safetensors(&one)
        .expect("single-process outputs")
        .tensors;
    let b = read_safetensors(&four).expect("MPI outputs").tensors;
    // Expert-parallel taps leave out the per-rank partial sums
    // (expert_out, shared_out); everything else must be there.
    let mut compared = 0;
    for (k, t) in &b {
        let want = a
            .get(k)
            .unwrap_or_else(|| panic!("{k}: not in the single-process run"));
        assert_eq!(t.shape(), want.shape(), "{k}");
        assert!(
            t.bytes() == want.bytes(),
            "{k} differs between 1 process and 4 MPI ranks"
        );
        compared += 1;
    }
    for k in [
        "logits",
        "layers.1.topk_idx",
        "layers.1.topk_weights",
        "layers.2.topk_idx",
        "layers.2.topk_weights",
        "layers.2.ffn_out",
    ] {
        assert!(
            b.contains_key(k),
            "{k} missing from the MPI run: {:?}",
            b.keys()
        );
    }
    assert!(compared >= 20, "{compared}");
}

/// The golden checks (bf16 and fp8, per layer with teacher forcing) pass
/// with the experts on 4 MPI ranks.
#[test]
fn forward_on_4_mpi_ranks_passes_the_golden_checks() {
    if !have_mpirun() {
        return;
    }
    for mode in ["bf16", "fp8"] {
        let o = mpirun(
            4,
            &[
                "forward",
                "--backend",
                "cpu",
                "--checkpoint",
                "golden/model",
                "--golden",
                "golden/model",
                "--mode",
                mode,
                "--comm",
                "mpi",
                "--ep",
                "4",
            ],
        );
        let s = text(&o);
        assert!(o.status.success(), "{mode}: {s}");
        assert!(
            s.contains("every layer and tap within tolerance"),
            "{mode}: {s}"
        );
    }
}

#[test]
fn ranks_with_different_options_fail_naming_the_option() {
    if !have_mpirun() {
        return;
    }
    let out = tmp("mismatch.safetensors");
    let out = out.to_str().expect("utf-8");
    let exe = env!("CARGO_BIN_EXE_deepport");
    let mut args: Vec<String> = ["--allow-run-as-root", "--oversubscribe", "-np", "1", exe]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(
        forward_args(out, &["--comm", "mpi", "--ep", "2", "--chunk", "16"])
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend([":", "-np", "1", exe].iter().map(|s| s.to_string()));
    args.extend(
        forward_args(out, &["--comm", "mpi", "--ep", "2", "--chunk", "8"])
            .iter()
            .map(|s| s.to_string()),
    );
    let t0 = std::time::Instant::now();
    let o = Command::new("mpirun")
        .args(&args)
        .current_dir(repo())
        .output()
        .expect("mpirun");
    let s = text(&o);
    assert!(!o.status.success(), "{s}");
    assert!(
        s.contains("`chunk` is \"16\" on rank 0 but \"8\" on rank 1"),
        "{s}"
    );
    assert!(t0.elapsed().as_secs() < 60, "{s}");
}

#[test]
fn jobs_are_rejected_and_timeout_is_the_mpi_deadline() {
    // Rejected before MPI starts: no mpirun needed.
    let o = deepport()
        .args(["run", "--comm", "mpi", "--profile", "ep", "--jobs", "2"])
        .output()
        .expect("deepport");
    let s = text(&o);
    assert_eq!(o.status.code(), Some(2), "{s}");
    assert!(s.contains("--jobs does not apply"), "{s}");
    if !have_mpirun() {
        return;
    }
    // Ranks given different --timeout values disagree at start.
    let exe = env!("CARGO_BIN_EXE_deepport");
    let run = ["run", "--comm", "mpi", "--profile", "ep", "--timeout"];
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1", exe])
        .args(run)
        .arg("60")
        .args([":", "-np", "1", exe])
        .args(run)
        .arg("90")
        .current_dir(repo())
        .output()
        .expect("mpirun");
    let s = text(&o);
    assert!(!o.status.success(), "{s}");
    assert!(s.contains("`timeout` is \"Some(60.0)\" on rank 0"), "{s}");
}
