//! `deepport run` against the deliberately faulty backend: crashes and
//! hangs are recorded (`--isolate`) and the run goes on; garbage and
//! errors are failures; a missing op is NotSupported; waivers.
//!
//! The outcomes expected here follow from what `faulty` does (see
//! `src/faulty.rs`), written down by hand, never from the code under test.

// The faulty backend wraps cpu-ref.
#![cfg(feature = "cpu")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_deepport");

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-isolate-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs deepport with the test backends registered.
fn deepport(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DEEPPORT_TEST_BACKENDS", "1")
        .output()
        .expect("run deepport")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The first smoke case of each family, by id.
fn first_case(family: &str) -> String {
    let o = deepport(&["run", "--list-cases", "--filter", &format!("{family}(*")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    s.lines()
        .next()
        .unwrap_or_else(|| panic!("no smoke case of {family}"))
        .to_string()
}

/// `id -> (outcome, message, waiver)` from a report directory.
fn results(dir: &Path) -> BTreeMap<String, (String, String, Option<String>)> {
    let s = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    s.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                (
                    v["outcome"].as_str().unwrap().to_string(),
                    v["message"].as_str().unwrap_or_default().to_string(),
                    v["waiver"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

/// The lines of stdout that start with `prefix`.
fn line_with<'a>(s: &'a str, prefix: &str) -> &'a str {
    s.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{s}"))
}

#[test]
fn isolated_run_records_crash_hang_garbage_error_and_goes_on() {
    let dir = scratch("isolate");
    let report = dir.join("report");
    let crash = first_case("rms_norm");
    let hang = first_case("rope");
    let garbage = first_case("add");
    let error = first_case("silu_mul");
    let missing = first_case("mla_prefill");
    let good = first_case("fp8_gemm");
    let mut args = vec![
        "run",
        "--backend",
        "faulty",
        "--isolate",
        "--timeout",
        "5",
        "--report",
        report.to_str().unwrap(),
    ];
    for id in [&crash, &hang, &garbage, &error, &missing, &good] {
        args.extend(["--filter", id.as_str()]);
    }
    let t0 = Instant::now();
    let o = deepport(&args);
    let took = t0.elapsed().as_secs_f64();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    // One hang of 5 s; everything else is quick.
    assert!(took < 60.0, "took {took} s");

    let r = results(&report);
    assert_eq!(r.len(), 6, "every case has a result: {r:?}");
    let want = [
        (&crash, "Crash"),
        (&hang, "Timeout"),
        (&garbage, "Fail"),
        (&error, "Fail"),
        (&missing, "NotSupported"),
        (&good, "Pass"),
    ];
    for (id, outcome) in want {
        assert_eq!(r[id.as_str()].0, outcome, "{id}: {:?}", r[id.as_str()]);
    }
    // The crash is the abort of faulty's rms_norm: SIGABRT, with its stderr.
    let m = &r[crash.as_str()].1;
    assert!(m.contains("signal 6") && m.contains("SIGABRT"), "{m}");
    assert!(m.contains("aborting in rms_norm"), "{m}");
    // The hang was killed at the limit.
    assert!(
        r[hang.as_str()].1.contains("no result within 5"),
        "{:?}",
        r[hang.as_str()]
    );
    // silu_mul errored although faulty claims support: Fail with its message.
    assert!(
        r[error.as_str()].1.contains("deliberate"),
        "{:?}",
        r[error.as_str()]
    );

    assert!(
        line_with(&out, "run: ").starts_with(
            "run: 1 passed, 0 quality warnings, 2 failed, 1 not supported, 1 crashed, 1 timed out"
        ),
        "{out}"
    );
    assert_eq!(
        out.lines().last(),
        Some("conformance: 1 passed, 4 failed, 1 skipped"),
        "{out}"
    );
    assert!(out.contains("NOT SUPPORTED"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn in_process_jobs_classify_and_abandon_a_hang() {
    let dir = scratch("jobs");
    let report = dir.join("report");
    let hang = first_case("rope");
    let garbage = first_case("add");
    let error = first_case("silu_mul");
    let missing = first_case("mla_prefill");
    let good = first_case("fp8_gemm");
    let mut args = vec![
        "run",
        "--backend",
        "faulty",
        "--jobs",
        "3",
        "--timeout",
        "3",
        "--report",
        report.to_str().unwrap(),
    ];
    for id in [&hang, &garbage, &error, &missing, &good] {
        args.extend(["--filter", id.as_str()]);
    }
    let o = deepport(&args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let r = results(&report);
    let want = [
        (&hang, "Timeout"),
        (&garbage, "Fail"),
        (&error, "Fail"),
        (&missing, "NotSupported"),
        (&good, "Pass"),
    ];
    for (id, outcome) in want {
        assert_eq!(r[id.as_str()].0, outcome, "{id}: {:?}", r[id.as_str()]);
    }
    assert_eq!(
        out.lines().last(),
        Some("conformance: 1 passed, 3 failed, 1 skipped"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn waiver_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

fn run_with_waivers(ids: &[&str], waivers: &Path, report: &Path) -> Output {
    let mut args = vec![
        "run",
        "--backend",
        "faulty",
        "--waivers",
        waivers.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    for id in ids {
        args.extend(["--filter", id]);
    }
    deepport(&args)
}

#[test]
fn waivers_excuse_expected_failures_and_flag_unneeded_or_expired_ones() {
    let dir = scratch("waivers");
    let garbage = first_case("add");
    let good = first_case("fp8_gemm");
    let ids = [garbage.as_str(), good.as_str()];

    // 1. A waiver for the faulty add case: its Fail no longer fails the run.
    let w = waiver_file(
        &dir,
        "add.yaml",
        "- backend: faulty\n  device: \"*faulty*\"\n  case: \"add(*\"\n  outcomes: [Fail]\n  reason: add returns garbage on purpose\n  expires: 2999-12-31\n",
    );
    let rep = dir.join("r1");
    let o = run_with_waivers(&ids, &w, &rep);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let r = results(&rep);
    assert_eq!(r[&garbage].0, "Fail", "the outcome is kept");
    assert_eq!(
        r[&garbage].2.as_deref(),
        Some("add returns garbage on purpose")
    );
    assert_eq!(r[&good].0, "Pass");
    assert!(out.contains("Fail (waived)"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("conformance: 1 passed, 0 failed, 1 skipped"),
        "{out}"
    );

    // 2. A waiver on a passing case fails the run: it is no longer needed.
    let w = waiver_file(
        &dir,
        "unneeded.yaml",
        &format!(
            "- backend: faulty\n  cases: [\"{good}\"]\n  outcomes: [Fail, Crash]\n  reason: once broken\n  expires: 2999-12-31\n"
        ),
    );
    let o = run_with_waivers(&[good.as_str()], &w, &dir.join("r2"));
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("waiver no longer needed"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("conformance: 0 passed, 1 failed, 0 skipped"),
        "{out}"
    );

    // 3. An expired waiver is ignored, with a warning.
    let w = waiver_file(
        &dir,
        "expired.yaml",
        "- backend: faulty\n  case: \"add(*\"\n  outcomes: [Fail]\n  reason: old\n  expires: 2000-01-01\n",
    );
    let rep = dir.join("r3");
    let o = run_with_waivers(&ids, &w, &rep);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("expired on 2000-01-01"), "{err}");
    assert_eq!(results(&rep)[&garbage].2, None);
    assert_eq!(
        out.lines().last(),
        Some("conformance: 1 passed, 1 failed, 0 skipped"),
        "{out}"
    );

    // 4. Malformed waiver files are usage errors naming file, line and column.
    for (name, yaml, line, needle) in [
        ("bad-yaml.yaml", "- backend: faulty\n  case: [\"add(*\"\n", 2, ""),
        (
            "bad-date.yaml",
            "- backend: faulty\n  case: \"add(*\"\n  outcomes: [Fail]\n  reason: r\n  expires: 31.12.2999\n",
            5,
            "YYYY-MM-DD",
        ),
        (
            "no-reason.yaml",
            "# a comment\n- backend: faulty\n  case: \"add(*\"\n  outcomes: [Fail]\n  expires: 2999-12-31\n",
            5,
            "missing field `reason`",
        ),
    ] {
        let w = waiver_file(&dir, name, yaml);
        let o = run_with_waivers(&ids, &w, &dir.join("r4"));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        let at = format!("{}:{line}:", w.display());
        assert!(err.contains(&at), "{name}: want {at} in {err}");
        assert!(err.contains(needle), "{name}: want {needle} in {err}");
        // A column follows the line.
        let rest = &err[err.find(&at).unwrap() + at.len()..];
        assert!(
            rest.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{name}: no column in {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
