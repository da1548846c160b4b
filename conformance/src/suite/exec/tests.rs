//! Unit tests of case execution and classification. Each case here is a
//! hand-written closure whose outcome is known in advance.

use super::child::{classify_exit, RESULT_PREFIX};
use super::output::Counts;
use super::*;
use crate::error::CliError;
use crate::suite::report::result_to_json_line;
use crate::types::Source;
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::AtomicUsize;

fn spec(id: &str) -> CaseSpec {
    CaseSpec {
        id: id.into(),
        family: "test".into(),
        params: BTreeMap::new(),
        seed: 42,
        profiles: Default::default(),
        tolerances: BTreeMap::new(),
        source: Source::Generated,
        origin: "tests.rs".into(),
    }
}

fn outs(v: f32) -> Outputs {
    BTreeMap::from([(
        "out".to_string(),
        HostTensor::from_f32(DType::F32, &[2], &[v, 1.0]),
    )])
}

fn info() -> DeviceInfo {
    DeviceInfo {
        backend: "cpu".into(),
        device: "test device".into(),
        driver: "test driver".into(),
        vendor: "test".into(),
    }
}

/// A judge with one check: `|a[0] − r[0]|` against pass 0.1, warn 1.
fn judge_first() -> crate::cases::JudgeFn {
    Box::new(|a, r| {
        let d = (a["out"].get_f32(0) - r["out"].get_f32(0)).abs() as f64;
        vec![
            Check::new("out.abs".into(), d, 0.1, d <= 0.1, format!("diff {d}"))
                .with_warn(1.0)
                .with_worst(Some(vec![0])),
        ]
    })
}

/// A case whose backend under test (`cpu`) yields `under_test` and whose
/// reference (`cpu-ref`) yields `reference`.
fn case(
    under_test: impl Fn() -> crate::opspec::CliResult<Outputs> + Send + Sync + 'static,
    reference: impl Fn() -> crate::opspec::CliResult<Outputs> + Send + Sync + 'static,
) -> Case {
    Case {
        id: "test(x=1)".into(),
        ops: vec![deepport_core::ops::OpKind::Add],
        run: Box::new(move |b| {
            if b.name() == crate::REFERENCE_BACKEND {
                reference()
            } else {
                under_test()
            }
        }),
        judge: judge_first(),
        expected: None,
    }
}

fn run(c: &Case, cache: &RefCache) -> CaseResult {
    let (b, r) = (deepport_cpu::Cpu, deepport_cpu::CpuRef);
    run_case(
        &spec("test(x=1)"),
        c,
        &b,
        &info(),
        Reference { backend: &r, cache },
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-exec-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn judged_outcomes_and_fields() {
    let nc = RefCache::disabled();
    // Equal: Pass, fields from the check, no message.
    let r = run(&case(|| Ok(outs(2.0)), || Ok(outs(2.0))), &nc);
    assert_eq!(r.outcome, Outcome::Pass, "{r:?}");
    assert_eq!(r.metric.as_deref(), Some("out.abs"));
    assert_eq!((r.value, r.threshold), (Some(0.0), Some(0.1)));
    assert_eq!(r.worst_index, Some(vec![0]));
    assert_eq!((r.seed, r.backend.as_str()), (42, "cpu"));
    assert_eq!(
        (r.device.as_str(), r.driver.as_str()),
        ("test device", "test driver")
    );
    assert!(r.message.is_empty() && r.waiver.is_none());
    // Off by 0.5: outside pass (0.1), inside warn (1): QualityWarning.
    let r = run(&case(|| Ok(outs(2.5)), || Ok(outs(2.0))), &nc);
    assert_eq!(r.outcome, Outcome::QualityWarning, "{r:?}");
    assert_eq!(r.value, Some(0.5));
    assert!(r.message.contains("diff 0.5"), "{}", r.message);
    // Off by 3: Fail.
    let r = run(&case(|| Ok(outs(5.0)), || Ok(outs(2.0))), &nc);
    assert_eq!(r.outcome, Outcome::Fail);
    assert_eq!(r.value, Some(3.0));
    // A NaN (an unwritten, poisoned output) fails.
    let r = run(&case(|| Ok(outs(f32::NAN)), || Ok(outs(2.0))), &nc);
    assert_eq!(r.outcome, Outcome::Fail);
}

#[test]
fn errors_panics_and_not_supported() {
    let nc = RefCache::disabled();
    let r = run(
        &case(
            || {
                Err(CliError::Failed(Error::not_supported(
                    "cpu",
                    "add",
                    "no kernel",
                )))
            },
            || Ok(outs(1.0)),
        ),
        &nc,
    );
    assert_eq!(r.outcome, Outcome::NotSupported, "{r:?}");
    assert!(r.message.contains("no kernel"), "{}", r.message);
    assert_eq!(r.metric, None);

    // Any other error of a backend that claimed support is a Fail.
    let r = run(
        &case(
            || {
                Err(CliError::Failed(Error::Device {
                    backend: "cpu".into(),
                    msg: "launch failed".into(),
                }))
            },
            || Ok(outs(1.0)),
        ),
        &nc,
    );
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.message.contains("launch failed"), "{}", r.message);

    // A panic is a Fail with its message.
    let r = run(&case(|| panic!("kaboom"), || Ok(outs(1.0))), &nc);
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.message.contains("panicked: kaboom"), "{}", r.message);

    // The reference failing or panicking: Fail, "reference failed".
    let r = run(
        &case(
            || Ok(outs(1.0)),
            || Err(CliError::Failed(Error::Other("ref broke".into()))),
        ),
        &nc,
    );
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(
        r.message.starts_with("reference failed: ") && r.message.contains("ref broke"),
        "{}",
        r.message
    );
    let r = run(&case(|| Ok(outs(1.0)), || panic!("ref panic")), &nc);
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(
        r.message.starts_with("reference failed: ") && r.message.contains("ref panic"),
        "{}",
        r.message
    );
    // Even a reference that says NotSupported makes the case a Fail, not
    // NotSupported: the backend under test is not to blame.
    let r = run(
        &case(
            || Ok(outs(1.0)),
            || {
                Err(CliError::Failed(Error::not_supported(
                    "cpu-ref", "add", "x",
                )))
            },
        ),
        &nc,
    );
    assert_eq!(r.outcome, Outcome::Fail);

    // A judge that panics or judges nothing: Fail.
    let mut c = case(|| Ok(outs(1.0)), || Ok(outs(1.0)));
    c.judge = Box::new(|_, _| panic!("judge bug"));
    let r = run(&c, &nc);
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.message.contains("judge bug"), "{}", r.message);
    c.judge = Box::new(|_, _| Vec::new());
    let r = run(&c, &nc);
    assert_eq!(r.outcome, Outcome::Fail);
}

#[test]
fn golden_cases_are_judged_against_their_expected_outputs() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let mut c = case(
        || Ok(outs(2.0)),
        move || {
            c2.fetch_add(1, Ordering::SeqCst);
            Ok(outs(2.0))
        },
    );
    c.expected = Some(outs(7.0));
    let r = run(&c, &RefCache::disabled());
    // Judged against 7, not the reference's 2; the reference never ran.
    assert_eq!(r.outcome, Outcome::Fail, "{r:?}");
    assert_eq!(r.value, Some(5.0));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    c.expected = Some(outs(2.0));
    assert_eq!(run(&c, &RefCache::disabled()).outcome, Outcome::Pass);
}

#[test]
fn the_reference_is_computed_once_and_a_corrupt_cache_recomputed() {
    let dir = scratch("cache");
    let cache = RefCache::at(&dir);
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let c = case(
        || Ok(outs(2.0)),
        move || {
            c2.fetch_add(1, Ordering::SeqCst);
            Ok(outs(2.0))
        },
    );
    for _ in 0..3 {
        assert_eq!(run(&c, &cache).outcome, Outcome::Pass);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Corrupt the cached file: recomputed (a second call), still a Pass,
    // never judged against the garbage.
    let path = cache.path_of(&spec("test(x=1)")).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(run(&c, &cache).outcome, Outcome::Pass);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(run(&c, &cache).outcome, Outcome::Pass);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_case_that_hangs_in_process_times_out() {
    let b: Arc<dyn Backend> = Arc::new(crate::faulty::Faulty::default());
    let r: Arc<dyn Backend> = Arc::new(deepport_cpu::CpuRef);
    // faulty's rope never returns.
    let all = catalogue::load(&catalogue::default_dir()).unwrap();
    let rope = catalogue::select(&all, "smoke", Some("rope(*"))
        .into_iter()
        .next()
        .expect("a smoke rope case");
    let t0 = Instant::now();
    let res = run_in_thread(
        &rope,
        &b,
        &info(),
        &r,
        &RefCache::disabled(),
        Duration::from_millis(300),
    );
    assert_eq!(res.outcome, Outcome::Timeout, "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(res.duration_s, 0.3);
    assert!(
        res.message.contains("no result within 0.300 s"),
        "{}",
        res.message
    );
    assert_eq!((res.id.as_str(), res.seed), (rope.id.as_str(), rope.seed));

    // A case the catalogue cannot build is a Fail naming it.
    let res = run_in_thread(
        &spec("no_such_family(x=1)"),
        &b,
        &info(),
        &r,
        &RefCache::disabled(),
        Duration::from_secs(60),
    );
    assert_eq!(res.outcome, Outcome::Fail);
    assert!(res.message.contains("cannot build"), "{}", res.message);
}

#[test]
fn child_exits_are_classified() {
    let s = spec("add(n=3)");
    let good = {
        let mut r = blank_result(&s, "faulty", &info());
        r.outcome = Outcome::Pass;
        r.value = Some(f64::NAN);
        r
    };
    let line = format!("noise\n{RESULT_PREFIX}{}\n", result_to_json_line(&good));
    let d = Duration::from_millis(5);
    // Exit 0 with a result: the result (NaN survives the round trip).
    let r = classify_exit(
        &s,
        "faulty",
        &info(),
        std::process::ExitStatus::from_raw(0),
        &line,
        "",
        d,
    );
    assert_eq!(r.outcome, Outcome::Pass);
    assert!(r.value.unwrap().is_nan());
    // Killed by SIGABRT (raw wait status 6): Crash, with the stderr tail.
    let r = classify_exit(
        &s,
        "faulty",
        &info(),
        std::process::ExitStatus::from_raw(6),
        "",
        "faulty: aborting in rms_norm, as designed\n",
        d,
    );
    assert_eq!(r.outcome, Outcome::Crash);
    assert!(r.message.contains("signal 6 (SIGABRT)"), "{}", r.message);
    assert!(r.message.contains("aborting in rms_norm"), "{}", r.message);
    assert_eq!((r.id.as_str(), r.seed), ("add(n=3)", 42));
    // Exit 0 without a result, exit 3 with one: both Crash.
    let r = classify_exit(
        &s,
        "faulty",
        &info(),
        std::process::ExitStatus::from_raw(0),
        "hello\n",
        "",
        d,
    );
    assert_eq!(r.outcome, Outcome::Crash);
    assert!(r.message.contains("without a result"), "{}", r.message);
    let r = classify_exit(
        &s,
        "faulty",
        &info(),
        std::process::ExitStatus::from_raw(3 << 8),
        &line,
        "",
        d,
    );
    assert_eq!(r.outcome, Outcome::Crash);
    assert!(r.message.contains("status 3"), "{}", r.message);
    // A garbled result line is not trusted.
    let r = classify_exit(
        &s,
        "faulty",
        &info(),
        std::process::ExitStatus::from_raw(0),
        &format!("{RESULT_PREFIX}{{not json\n"),
        "",
        d,
    );
    assert_eq!(r.outcome, Outcome::Crash);
}

#[test]
fn counts_and_closing_lines() {
    let s = spec("a(x=1)");
    let mk = |o: Outcome, waiver: Option<&str>, msg: &str| {
        let mut r = blank_result(&s, "cpu", &info());
        r.outcome = o;
        r.waiver = waiver.map(str::to_string);
        r.message = msg.into();
        r
    };
    let rs = vec![
        mk(Outcome::Pass, None, ""),
        mk(Outcome::Pass, None, ""),
        mk(Outcome::QualityWarning, None, ""),
        mk(Outcome::Fail, None, ""),
        mk(Outcome::Fail, Some("known"), ""),
        mk(Outcome::NotSupported, None, ""),
        mk(Outcome::Crash, None, ""),
        mk(Outcome::Timeout, None, ""),
        mk(Outcome::Pass, None, "waiver no longer needed: x"),
    ];
    let c = Counts::of(&rs);
    assert_eq!(
        c.run_line("run"),
        "run: 3 passed, 1 quality warnings, 2 failed, 1 not supported, 1 crashed, 1 timed out (1 waived)"
    );
    // passed: 2 Pass + 1 QW (the unneeded waiver's Pass counts as failed);
    // failed: Fail + Crash + Timeout + unneeded; skipped: NotSupported + waived.
    assert_eq!(
        c.closing_line("conformance"),
        "conformance: 3 passed, 4 failed, 2 skipped"
    );
    assert!(!c.run_ok());
    let ok = Counts::of(&rs[..3]);
    assert!(ok.run_ok());
    assert_eq!(
        ok.closing_line("conformance"),
        "conformance: 3 passed, 0 failed, 0 skipped"
    );
    // NotSupported and waived failures do not fail a run.
    let c = Counts::of(&[rs[0].clone(), rs[4].clone(), rs[5].clone()]);
    assert!(c.run_ok());
    assert_eq!(
        c.closing_line("conformance"),
        "conformance: 1 passed, 0 failed, 2 skipped"
    );
    // The V3 claim needs every case Pass or QualityWarning, unfiltered.
    assert!(output::v3_claim("cpu", &rs[..3], false).contains("MAY claim"));
    assert!(output::v3_claim("cpu", &rs[..3], true).contains("may NOT claim"));
    let claim = output::v3_claim("cpu", &[rs[0].clone(), rs[5].clone()], false);
    assert!(
        claim.contains("may NOT claim") && claim.contains("NotSupported"),
        "{claim}"
    );
}

#[test]
fn the_shipped_waiver_file_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("waivers.yaml");
    let w = Waivers::load(&p).unwrap();
    assert!(w.list.is_empty(), "{:?}", w.list);
    // The documented example, uncommented, is a valid waiver.
    let text = std::fs::read_to_string(&p).unwrap();
    let example: String = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .skip_while(|l| !l.starts_with("- backend:"))
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let w = Waivers::parse(&example, Path::new("example.yaml")).unwrap();
    assert_eq!(w.list.len(), 1, "{example}");
    assert_eq!(w.list[0].backend, "wgpu");
    assert_eq!(w.list[0].cases, vec!["mla_decode(*h_q=128*"]);
}

/// A worker starts its next case only after the previous case's result has
/// been taken (journaled): a case that then kills the process cannot take
/// a finished result down with it. `on_result` is made slow; without the
/// acknowledgement the second case would start while it still runs.
#[test]
fn the_next_case_starts_after_the_previous_result_is_taken() {
    let b: Arc<dyn Backend> = Arc::new(deepport_cpu::CpuRef);
    let all = catalogue::load(&catalogue::default_dir()).unwrap();
    let specs: Vec<CaseSpec> = catalogue::select(&all, "smoke", Some("a*"))
        .into_iter()
        .take(3)
        .collect();
    assert_eq!(specs.len(), 3);
    let backends = [RunBackend {
        name: "cpu-ref".into(),
        backend: b.clone(),
        info: info(),
    }];
    let opts = ExecOptions {
        isolate: false,
        jobs: 1,
        timeout: Duration::from_secs(60),
        cases_dir: catalogue::default_dir(),
        refcache: RefCache::disabled(),
    };
    let events = std::sync::Mutex::new(Vec::new());
    let pending: Vec<usize> = (0..specs.len()).collect();
    let finished = execute_some(
        &backends,
        &specs,
        &pending,
        &std::collections::BTreeSet::new(),
        &b,
        &opts,
        &|k| events.lock().unwrap().push(format!("start {k}")),
        &mut |k, _| {
            std::thread::sleep(Duration::from_millis(150));
            events.lock().unwrap().push(format!("taken {k}"));
        },
    );
    assert_eq!(finished.len(), 3);
    assert_eq!(
        *events.lock().unwrap(),
        ["start 0", "taken 0", "start 1", "taken 1", "start 2", "taken 2"]
    );
}
