//! Runs that meet absurd sizes, get killed, or share a report directory
//! and a reference cache (issue 16):
//!
//! * a catalogue case with `m: 100000000000` is a clean per-case `Fail`
//!   naming the size and the memory budget, and the run goes on;
//! * `deepport op` refuses inputs and outputs beyond `--max-memory`;
//! * a run killed with SIGKILL keeps every case it finished in
//!   `results.jsonl`, `--resume` finishes it, and its reports equal an
//!   uninterrupted run's (durations and timestamps aside);
//! * a resume that does not match the run (profile, suite version,
//!   device) is refused;
//! * a second run into a report directory in use is refused, and two runs
//!   sharing one fresh reference cache agree.

#![cfg(feature = "cpu")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_deepport");

fn scratch(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("resilience-{test}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `deepport` with its reference cache in `cache` and no waiver file.
fn cmd(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("DEEPPORT_REFCACHE", cache)
        .env_remove("DEEPPORT_CASES")
        .stdin(Stdio::null());
    c
}

fn run(cache: &Path, args: &[&str]) -> Output {
    cmd(cache, args).output().expect("run deepport")
}

const GEMM_TOLERANCES: &str = r#"family: gemm
seed: 77
tolerances:
  d:
    - metric: elementwise
      pass: 1
      warn: 10
      params: {ulps: 1, rms_rel: 1.0e-5}
      reason: "f32 accumulation in another order, one rounding (test catalogue)"
groups:
"#;

/// A catalogue directory holding one `gemm.yaml` with these groups.
fn catalogue(dir: &Path, groups: &str) -> PathBuf {
    let c = dir.join("cases");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("gemm.yaml"), format!("{GEMM_TOLERANCES}{groups}")).unwrap();
    c
}

/// An empty waiver file (so that the repository's waivers do not apply).
fn no_waivers(dir: &Path) -> PathBuf {
    let w = dir.join("waivers.yaml");
    std::fs::write(&w, "[]\n").unwrap();
    w
}

/// `id -> line as JSON` of a report directory's results.jsonl.
fn results(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_absurd_case_size_is_a_clean_failure_naming_size_and_budget() {
    let d = scratch("absurd");
    let cases = catalogue(
        &d,
        r#"  - profiles: [smoke]
    cases:
      - {m: 100000000000, n: 7168, k: 7168, ab: bf16, out: bf16}
      - {m: 3, n: 5, k: 7, ab: f32, out: f32}
"#,
    );
    let w = no_waivers(&d);
    for isolate in [false, true] {
        let report = d.join(format!("report-{isolate}"));
        let mut args = vec![
            "run",
            "--cases",
            cases.to_str().unwrap(),
            "--waivers",
            w.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--max-memory",
            "2G",
        ];
        if isolate {
            args.push("--isolate");
        }
        let o = run(&d.join("cache"), &args);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        // A Fail: exit status 1, not a signal.
        assert_eq!(o.status.code(), Some(1), "isolate={isolate}\n{out}\n{err}");
        let rs = results(&report);
        assert_eq!(rs.len(), 2, "{rs:?}");
        let big = rs
            .iter()
            .find(|r| r["id"].as_str().unwrap().contains("m=100000000000"))
            .unwrap();
        assert_eq!(big["outcome"], "Fail", "{big}");
        let msg = big["message"].as_str().unwrap();
        for want in [
            "m=100000000000",         // the input
            "gemm.yaml",              // where it is declared
            "over the memory budget", // why
            "2147483648 bytes",       // the budget
            "--max-memory",
        ] {
            assert!(
                msg.contains(want),
                "isolate={isolate}: `{want}` not in {msg}"
            );
        }
        // The size: the estimate is in the message and exceeds the budget.
        let needs: u64 = msg
            .split("needs ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no size in {msg}"));
        assert!(needs > 100_000_000_000 * 7168, "{needs}");
        // The run went on: the small case passed.
        let small = rs
            .iter()
            .find(|r| r["id"].as_str().unwrap().contains("m=3,"))
            .unwrap();
        assert_eq!(small["outcome"], "Pass", "{small}");
        assert!(out.contains("run: 1 passed"), "{out}");
    }
    // A malformed budget is a usage error.
    let o = run(&d.join("cache"), &["run", "--max-memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("lots"), "{}", text(&o.stderr));
}

#[test]
fn deepport_op_checks_inputs_and_outputs_against_the_budget() {
    use deepport_core::{DType, HostTensor};
    let d = scratch("op");
    let inputs = d.join("in.safetensors");
    // Small inputs (2 KiB), a large output: d = a·bᵀ is 256×256 f32 (256 KiB).
    let tensors = BTreeMap::from([
        (
            "a".to_string(),
            HostTensor::from_f32(DType::F32, &[256, 1], &[0.5; 256]),
        ),
        (
            "b".to_string(),
            HostTensor::from_f32(DType::F32, &[256, 1], &[0.25; 256]),
        ),
    ]);
    deepport_core::tensor::write_safetensors(&inputs, &tensors, &BTreeMap::new()).unwrap();
    let out = d.join("out.safetensors");
    let op = |budget: &str| {
        run(
            &d.join("cache"),
            &[
                "op",
                "gemm",
                "--backend",
                "cpu-ref",
                "--inputs",
                inputs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--max-memory",
                budget,
            ],
        )
    };
    // The input file, read and parsed, is over 1K: names the file.
    let o = op("1K");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("in.safetensors") && err.contains("memory budget of 1024 bytes"),
        "{err}"
    );
    assert!(!out.exists());
    // The output is over 64K: names the output, its size and the budget.
    let o = op("64K");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("output tensor (f32 [256, 256])")
            && err.contains("262144 bytes")
            && err.contains("65536 bytes"),
        "{err}"
    );
    assert!(!out.exists());
    // Within budget it runs.
    let o = op("1M");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.exists());
}

/// Drops what differs between two equal runs: durations, times, paths.
fn normalize(text: &str, report: &Path) -> String {
    let mut out = String::new();
    for line in text.replace(report.to_str().unwrap(), "REPORT").lines() {
        let mut l = line.to_string();
        // JUnit `time="…"` and `timestamp="…"` attributes.
        for attr in ["time=\"", "timestamp=\""] {
            while let Some(i) = l.find(attr) {
                let rest = &l[i + attr.len()..];
                let j = rest.find('"').map_or(l.len(), |j| i + attr.len() + j);
                l = format!("{}{}{}", &l[..i], "T=", &l[(j + 1).min(l.len())..]);
            }
        }
        // Markdown rows with a time or a duration.
        if l.contains("started")
            || l.contains("command")
            || l.contains(" s |")
            || l.contains("duration")
        {
            continue;
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn without_durations(rs: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    rs.into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("duration_s");
            r
        })
        .collect()
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A catalogue of 24 gemm cases slow enough (~0.1 s each on cpu in a
/// debug build) to kill a run in the middle.
const SLOW_GROUP: &str = r#"  - profiles: [smoke]
    grid:
      m: [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 220, 221, 222, 223]
      n: 256
      k: 1024
      ab: f32
      out: f32
"#;
const SLOW_CASES: usize = 24;

#[test]
fn a_killed_run_resumes_to_the_reports_of_an_uninterrupted_one() {
    let d = scratch("resume");
    let cases = catalogue(&d, SLOW_GROUP);
    let w = no_waivers(&d);
    let base = |report: &Path| -> Vec<String> {
        [
            "run",
            "--cases",
            cases.to_str().unwrap(),
            "--waivers",
            w.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--jobs",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let argv = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(" ");
    let _ = argv;

    // The uninterrupted run.
    let whole = d.join("whole");
    let a = base(&whole);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = run(&d.join("cache-whole"), &a);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(results(&whole).len(), SLOW_CASES);

    // The same run, killed once a few cases are in results.jsonl.
    let killed = d.join("killed");
    let b = base(&killed);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let mut child = cmd(&d.join("cache-killed"), &b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let journal = killed.join("results.jsonl");
    while lines_in(&journal) < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no results appear");
        std::thread::sleep(Duration::from_millis(2));
    }
    // While it runs, its directory is locked against a second run.
    let o = run(&d.join("cache-killed"), &b);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("in use by another deepport run"), "{err}");
    assert!(err.contains(&format!("process {}", child.id())), "{err}");

    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let at_kill = lines_in(&journal);
    assert!(
        (3..SLOW_CASES).contains(&at_kill),
        "{at_kill} of {SLOW_CASES} cases were done when the run was killed"
    );
    // What the killed run left: run.json, and results.jsonl with whole lines
    // (at most a torn last one), no final reports.
    assert!(killed.join("run.json").is_file());
    assert!(!killed.join("summary.md").exists());
    let text_at_kill = std::fs::read_to_string(&journal).unwrap();
    let n_lines = text_at_kill.lines().count();
    for (i, l) in text_at_kill.lines().enumerate() {
        if i + 1 < n_lines {
            serde_json::from_str::<serde_json::Value>(l).expect("a whole line");
        }
    }

    // A resume that does not match is refused, and changes nothing.
    for (extra, want) in [
        (vec!["--profile", "full"], "--profile"),
        (vec!["--backend", "cpu-ref"], "--backend"),
    ] {
        let mut r = vec!["run", "--resume", killed.to_str().unwrap()];
        r.extend(extra);
        let o = run(&d.join("cache-killed"), &r);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
    let run_json = std::fs::read_to_string(killed.join("run.json")).unwrap();
    std::fs::write(
        killed.join("run.json"),
        run_json.replace("\"device\": \"", "\"device\": \"another "),
    )
    .unwrap();
    let o = run(
        &d.join("cache-killed"),
        &["run", "--resume", killed.to_str().unwrap()],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("device"), "{err}");
    std::fs::write(killed.join("run.json"), &run_json).unwrap();
    let plan = std::fs::read_to_string(killed.join("resume.json")).unwrap();
    std::fs::write(
        killed.join("resume.json"),
        plan.replace("+suite.", "+oldsuite."),
    )
    .unwrap();
    let o = run(
        &d.join("cache-killed"),
        &["run", "--resume", killed.to_str().unwrap()],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("suite version"), "{err}");
    std::fs::write(killed.join("resume.json"), &plan).unwrap();

    // The resume: takes over the dead run's lock, runs only what is left.
    let o = run(
        &d.join("cache-killed"),
        &["run", "--resume", killed.to_str().unwrap()],
    );
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    let done_line = out
        .lines()
        .find(|l| l.starts_with("resuming"))
        .unwrap_or_else(|| panic!("{out}"));
    let whole_lines = text_at_kill
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    assert!(
        done_line.contains(&format!(
            "{whole_lines} of {SLOW_CASES} case(s) already done"
        )),
        "{done_line}"
    );

    // The same reports as the uninterrupted run.
    assert_eq!(
        without_durations(results(&killed)),
        without_durations(results(&whole))
    );
    for f in ["junit.xml", "summary.md"] {
        assert_eq!(
            normalize(&std::fs::read_to_string(killed.join(f)).unwrap(), &killed),
            normalize(&std::fs::read_to_string(whole.join(f)).unwrap(), &whole),
            "{f}"
        );
    }
    let info = |dir: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("started_utc");
        o.remove("command");
        v
    };
    assert_eq!(info(&killed), info(&whole));
    // The resumed run kept the killed run's own start and command.
    let killed_info: serde_json::Value = serde_json::from_str(&run_json).unwrap();
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("run.json")).unwrap()).unwrap();
    assert_eq!(now["started_utc"], killed_info["started_utc"]);
    assert_eq!(now["command"], killed_info["command"]);
    // No temporary files are left behind.
    for e in std::fs::read_dir(&killed).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "{name}");
    }
    // Resuming a finished run changes nothing and runs nothing.
    let before = std::fs::read_to_string(killed.join("results.jsonl")).unwrap();
    let o = run(
        &d.join("cache-killed"),
        &["run", "--resume", killed.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&format!(
            "{SLOW_CASES} of {SLOW_CASES} case(s) already done, 0 to run"
        )),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(killed.join("results.jsonl")).unwrap(),
        before
    );
}

#[test]
fn two_runs_sharing_a_fresh_reference_cache_agree() {
    let d = scratch("shared-cache");
    let cases = catalogue(&d, SLOW_GROUP);
    let w = no_waivers(&d);
    let cache = d.join("cache");
    let reports = [d.join("r1"), d.join("r2")];
    let children: Vec<_> = reports
        .iter()
        .map(|r| {
            cmd(
                &cache,
                &[
                    "run",
                    "--cases",
                    cases.to_str().unwrap(),
                    "--waivers",
                    w.to_str().unwrap(),
                    "--report",
                    r.to_str().unwrap(),
                    "--jobs",
                    "2",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert!(o.status.success(), "{err}");
        // No cache entry was ever seen half-written.
        assert!(!err.contains("reference cache"), "{err}");
    }
    let a = without_durations(results(&reports[0]));
    assert_eq!(a.len(), SLOW_CASES);
    assert!(a.iter().all(|r| r["outcome"] == "Pass"), "{a:?}");
    assert_eq!(a, without_durations(results(&reports[1])));
    // Every cache entry is whole, and nothing temporary is left.
    let mut entries = 0;
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.starts_with(".tmp"), "{name}");
        deepport_core::tensor::read_safetensors(&p).unwrap();
        entries += 1;
    }
    assert_eq!(entries, SLOW_CASES);
}

#[test]
fn a_case_that_kills_the_runner_is_a_crash_after_resume() {
    // The test-only `faulty` backend aborts the process in rms_norm. Run
    // in process (no --isolate), that takes the runner down; the resume
    // runs the case that was running in a child process, records it as a
    // Crash with the reason, and goes on.
    let d = scratch("abort");
    let w = no_waivers(&d);
    let first = |family: &str| {
        let o = run(
            &d.join("cache"),
            &["run", "--list-cases", "--filter", &format!("{family}(*")],
        );
        text(&o.stdout).lines().next().unwrap().to_string()
    };
    let (good, abort, after) = (first("gemm"), first("rms_norm"), first("silu_mul"));
    let report = d.join("report");
    let args = [
        "run",
        "--backend",
        "faulty",
        "--waivers",
        w.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--filter",
        &good,
        "--filter",
        &abort,
        "--filter",
        &after,
    ];
    let o = cmd(&d.join("cache"), &args)
        .env("DEEPPORT_TEST_BACKENDS", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        o.status.signal().is_some(),
        "the in-process abort should kill the runner: {:?}",
        o.status
    );
    assert_eq!(
        results(&report).len(),
        1,
        "only the case before it finished"
    );
    let o = cmd(
        &d.join("cache"),
        &["run", "--resume", report.to_str().unwrap()],
    )
    .env("DEEPPORT_TEST_BACKENDS", "1")
    .output()
    .unwrap();
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains(&format!(
            "1 case(s) were running when the run stopped; each runs in its own process this time: {abort}"
        )),
        "{out}"
    );
    let rs = results(&report);
    let outcome = |id: &str| {
        rs.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {rs:?}"))
            .clone()
    };
    assert_eq!(rs.len(), 3);
    assert_eq!(outcome(&good)["outcome"], "Pass");
    let crash = outcome(&abort);
    assert_eq!(crash["outcome"], "Crash", "{crash}");
    assert!(
        crash["message"].as_str().unwrap().contains("SIGABRT"),
        "{crash}"
    );
    // The case after it ran in process, as asked: faulty's silu_mul errors.
    assert_eq!(outcome(&after)["outcome"], "Fail");
}
