//! Runs `examples/mpi_selftest.rs` under `mpirun` (Open MPI): MPI ranks
//! against in-process ranks, bit for bit; a rank killed or stopped on
//! purpose; a configuration mismatch.
//!
//! Without `mpirun` on the PATH every test prints `skipped: …` and passes,
//! unless `DEEPPORT_REQUIRE` (comma separated) names `mpi`: then it fails.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "mpi")
}

/// `mpirun` when present; `None` (after a skip notice) otherwise.
fn mpirun() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpirun"))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        assert!(
            !required(),
            "DEEPPORT_REQUIRE names mpi, but mpirun is not on the PATH (apt-get install openmpi-bin libopenmpi-dev)"
        );
        eprintln!(
            "skipped: mpirun is not on the PATH (set DEEPPORT_REQUIRE=mpi to make this a failure)"
        );
    }
    found
}

/// The example binary cargo built next to this test.
fn selftest() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let p = dir.join("examples").join("mpi_selftest");
    assert!(
        p.is_file(),
        "{} is missing (cargo test builds the examples)",
        p.display()
    );
    p
}

fn run(np: usize, args: &[&str], timeout_s: &str) -> (Output, Duration) {
    let mpirun = mpirun().expect("mpirun is on the PATH (checked by the caller)");
    let t0 = Instant::now();
    let out = Command::new(mpirun)
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .arg(selftest())
        .args(args)
        .env("DEEPPORT_MPI_TIMEOUT", timeout_s)
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .output()
        .expect("running mpirun");
    (out, t0.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn ep_ops_equal_in_process_ranks_on_2_4_8() {
    if mpirun().is_none() {
        return;
    }
    for np in [2, 4, 8] {
        let (o, t) = run(np, &["ops"], "120");
        let s = text(&o);
        assert!(o.status.success(), "np {np}: {s}");
        let equal = s.matches(" checks equal on rank ").count();
        assert_eq!(equal, np, "np {np}: every rank must report equality: {s}");
        eprintln!("np {np}: ops equal in {:.1} s", t.as_secs_f64());
    }
}

#[test]
fn all_to_all_v_moves_odd_sizes() {
    if mpirun().is_none() {
        return;
    }
    let (o, _) = run(3, &["a2a"], "60");
    let s = text(&o);
    assert!(o.status.success(), "{s}");
    assert_eq!(s.matches("a2a: rank").count(), 3, "{s}");
    assert!(!s.contains("WRONG"), "{s}");
}

/// A rank that is killed (SIGKILL) mid-run: the job ends, with an error,
/// well within the deadline plus start-up.
#[test]
fn killed_rank_ends_the_job_within_the_deadline() {
    if mpirun().is_none() {
        return;
    }
    let (o, t) = run(4, &["die", "2", "5"], "60");
    let s = text(&o);
    assert!(!o.status.success(), "{s}");
    assert!(t < Duration::from_secs(40), "took {t:?}: {s}");
    // Either the survivors' deadline fired (our message) or mpirun noticed
    // the death first and ended the job (its message); both name the rank.
    assert!(
        s.contains("no answer from rank(s) 2") || (s.contains("rank 2") && s.contains("signal 9")),
        "no clear error naming rank 2: {s}"
    );
}

/// A rank that stops answering without dying (SIGSTOP): the others' deadline
/// fires, they name it, and the job is aborted (the stopped rank too).
#[test]
fn silent_rank_makes_the_others_fail_within_the_deadline() {
    if mpirun().is_none() {
        return;
    }
    let (o, t) = run(4, &["stall", "1", "4"], "60");
    let s = text(&o);
    assert!(!o.status.success(), "{s}");
    assert!(t < Duration::from_secs(40), "took {t:?}: {s}");
    assert!(s.contains("no answer from rank(s) 1 within 4.0 s"), "{s}");
}

#[test]
fn config_mismatch_names_the_field() {
    if mpirun().is_none() {
        return;
    }
    let (o, t) = run(3, &["mismatch", "2"], "30");
    let s = text(&o);
    assert!(!o.status.success(), "{s}");
    assert!(t < Duration::from_secs(40), "took {t:?}: {s}");
    // Every rank names the same difference.
    let named = s
        .matches("`hidden` is \"7168\" on rank 0 but \"4096\" on rank 2")
        .count();
    assert_eq!(named, 3, "{s}");
    assert!(!s.contains("handshake passed"), "{s}");
}
