//! The conformance catalogue as `cargo test` trials (libtest-mimic).
//!
//! One trial per case × available backend, named `<backend>::<case id>`, so
//! that `cargo test -- mla_decode` or `cargo test -- 'cpu::fp8_gemm(m=1,'`
//! filter as usual. Each trial runs its case in process, on a thread of its
//! own under the case time limit, the way `deepport run` does, and judges it
//! against `cpu-ref` (or the case's stored golden data).
//!
//! * Pass and QualityWarning pass the trial.
//! * Fail, Crash and Timeout fail it, with the metric, value, threshold and
//!   message.
//! * NotSupported is an **ignored** trial (`ignored, [not supported] …`),
//!   never a pass; a closing line counts them.
//! * A waived outcome (`conformance/waivers.yaml`) is ignored with the
//!   waiver's reason; a waived case that passes fails (delete the waiver).
//!
//! Environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `DEEPPORT_PROFILE` | case profile: `smoke` (default), `full`, `v3-mustpass` |
//! | `DEEPPORT_BACKENDS` | comma-separated backends to test (default: every registered backend except the test-only `faulty`) |
//! | `DEEPPORT_REQUIRE` | comma-separated backends that must be available: an unavailable one is a failing trial `require::<backend>`; any other unavailable backend is an ignored trial `unavailable::<backend>` with the reason |
//! | `DEEPPORT_TIMEOUT` | per-case time limit in seconds (default 300) |
//!
//! `cpu-ref` is the reference: it runs only the cases with stored expected
//! data (golden and model cases); every other backend runs every case of
//! the profile.

use deepport_conformance::suite::exec::{self, RefCache};
use deepport_conformance::suite::report::fmt_value;
use deepport_conformance::suite::waivers::{Date, Waivers};
use deepport_conformance::suite::{catalogue, CaseResult, CaseSpec, Outcome, Source};
use deepport_conformance::{registry, REFERENCE_BACKEND};
use deepport_core::backend::Backend;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PROFILE_ENV: &str = "DEEPPORT_PROFILE";
const BACKENDS_ENV: &str = "DEEPPORT_BACKENDS";
const REQUIRE_ENV: &str = "DEEPPORT_REQUIRE";
const TIMEOUT_ENV: &str = "DEEPPORT_TIMEOUT";
const DEFAULT_PROFILE: &str = "smoke";

/// Backends registered only for the suite's own tests: not run unless
/// named in `DEEPPORT_BACKENDS`.
const TEST_ONLY: [&str; 1] = ["faulty"];

/// Names `DEEPPORT_REQUIRE` may hold that are tools, not backends (NVRTC:
/// backends/cuda/tests/compile.rs and `deepport kernels` require it; emu:
/// a C++ compiler for backends/cuda/tests/emulate.rs; hiprtc: ROCm's
/// compiler for backends/rocm/tests/compile.rs; chromium: a headless
/// browser for tests/html.rs; mpi: Open MPI's mpirun for
/// backends/mpi/tests and tests/mpi.rs — a transport, not a backend).
const REQUIRE_TOOLS: [&str; 5] = ["nvrtc", "emu", "hiprtc", "chromium", "mpi"];

/// Counts of outcomes that libtest cannot show by name.
#[derive(Default)]
struct Tally {
    not_supported: AtomicUsize,
    quality_warning: AtomicUsize,
    waived: AtomicUsize,
}

fn env_list(var: &str) -> Option<Vec<String>> {
    let v = std::env::var(var).ok()?;
    Some(
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    )
}

/// A trial that fails with `msg` (configuration problems).
fn failing(name: String, msg: String) -> Trial {
    Trial::test(name, move || Err(Failed::from(msg)))
}

/// A trial that is ignored at run time with `reason`.
fn ignored(name: String, reason: String) -> Trial {
    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
}

/// The deciding metric, message and seed of a result, for a failure.
fn describe(r: &CaseResult) -> String {
    let mut s = r.outcome.label().to_string();
    if let Some(m) = &r.metric {
        s.push_str(&format!(": {m}"));
        if let Some(v) = r.value {
            s.push_str(&format!(" = {}", fmt_value(v)));
        }
        if let Some(t) = r.threshold {
            s.push_str(&format!(" (threshold {})", fmt_value(t)));
        }
    }
    if let Some(i) = &r.worst_index {
        s.push_str(&format!(" at {i:?}"));
    }
    s.push_str(&format!("; seed {}; {:.3} s", r.seed, r.duration_s));
    if !r.message.is_empty() {
        s.push_str(&format!("\n{}", r.message));
    }
    s
}

/// Everything a case trial needs, shared by the trials of one backend.
#[derive(Clone)]
struct Ctx {
    backend: Arc<dyn Backend>,
    reference: Arc<dyn Backend>,
    cache: RefCache,
    waivers: Arc<Waivers>,
    timeout: Duration,
    tally: Arc<Tally>,
}

/// Runs one case and turns its outcome into the trial's.
fn run_trial(spec: &CaseSpec, ctx: &Ctx) -> Result<Completion, Failed> {
    let info = ctx.backend.info();
    let r = exec::run_in_thread(
        spec,
        &ctx.backend,
        &info,
        &ctx.reference,
        &ctx.cache,
        ctx.timeout,
    );
    let mut rs = [r];
    let wrep = ctx.waivers.apply(&mut rs, Date::today());
    let [r] = rs;
    for w in &wrep.warnings {
        eprintln!("warning: {w}");
    }
    if !wrep.unneeded.is_empty() {
        return Err(Failed::from(format!(
            "{}\n{}",
            describe(&r),
            wrep.unneeded.join("\n")
        )));
    }
    if let Some(w) = &r.waiver {
        ctx.tally.waived.fetch_add(1, Ordering::Relaxed);
        if r.outcome == Outcome::NotSupported {
            ctx.tally.not_supported.fetch_add(1, Ordering::Relaxed);
        }
        return Ok(Completion::ignored_with(format!(
            "[waived: {w}] {}",
            describe(&r).replace('\n', "; ")
        )));
    }
    match r.outcome {
        Outcome::Pass => Ok(Completion::Completed),
        Outcome::QualityWarning => {
            ctx.tally.quality_warning.fetch_add(1, Ordering::Relaxed);
            Ok(Completion::Completed)
        }
        Outcome::NotSupported => {
            ctx.tally.not_supported.fetch_add(1, Ordering::Relaxed);
            Ok(Completion::ignored_with(format!(
                "[not supported] {}",
                r.message.replace('\n', "; ")
            )))
        }
        Outcome::Fail | Outcome::Crash | Outcome::Timeout => Err(Failed::from(describe(&r))),
    }
}

/// Whether `backend` runs `spec`: the reference runs only cases with stored
/// expected data; the others run every case.
fn runs(backend: &str, spec: &CaseSpec) -> bool {
    backend != REFERENCE_BACKEND || !matches!(spec.source, Source::Generated)
}

fn trials(tally: &Arc<Tally>) -> Vec<Trial> {
    let mut out = Vec::new();
    let profile = std::env::var(PROFILE_ENV).unwrap_or_else(|_| DEFAULT_PROFILE.to_string());
    if !catalogue::PROFILES.contains(&profile.as_str()) {
        out.push(failing(
            format!("config::{PROFILE_ENV}"),
            format!(
                "{PROFILE_ENV}={profile:?} is not a profile; use one of {}",
                catalogue::PROFILES.join(", ")
            ),
        ));
        return out;
    }
    let dir = catalogue::default_dir();
    let specs = match catalogue::load(&dir) {
        Ok(s) => catalogue::select(&s, &profile, None),
        Err(e) => {
            out.push(failing("catalogue::load".into(), e.to_string()));
            return out;
        }
    };
    if specs.is_empty() {
        out.push(failing(
            "catalogue::profile".into(),
            format!("the catalogue {} has no {profile} case", dir.display()),
        ));
        return out;
    }
    let waivers = match Waivers::default_path().map(|p| Waivers::load(&p)) {
        None => Waivers::default(),
        Some(Ok(w)) => w,
        Some(Err(e)) => {
            out.push(failing("config::waivers".into(), e.to_string()));
            return out;
        }
    };
    let timeout = match std::env::var(TIMEOUT_ENV) {
        Err(_) => exec::DEFAULT_TIMEOUT_S,
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 && v <= 1e7 => v,
            _ => {
                out.push(failing(
                    format!("config::{TIMEOUT_ENV}"),
                    format!("{TIMEOUT_ENV}={s:?} is not a positive number of seconds"),
                ));
                return out;
            }
        },
    };

    let reg = registry();
    let known = reg.names();
    let require = env_list(REQUIRE_ENV).unwrap_or_default();
    let names: Vec<String> = match env_list(BACKENDS_ENV) {
        Some(list) if !list.is_empty() => list,
        _ => known
            .iter()
            .filter(|n| !TEST_ONLY.contains(n))
            .map(|n| n.to_string())
            .collect(),
    };
    for name in &names {
        if !known.contains(&name.as_str()) {
            out.push(failing(
                format!("config::{BACKENDS_ENV}"),
                format!(
                    "{BACKENDS_ENV} names `{name}`, which this build does not have; known: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    for name in &require {
        if !known.contains(&name.as_str()) && !REQUIRE_TOOLS.contains(&name.as_str()) {
            out.push(failing(
                format!("require::{name}"),
                format!(
                    "{REQUIRE_ENV} requires `{name}`, which is not compiled into this build \
                     (enable its cargo feature); known: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    let reference: Arc<dyn Backend> = match reg.create(REFERENCE_BACKEND) {
        Ok(b) => Arc::from(b),
        Err(e) => {
            out.push(failing(
                format!("require::{REFERENCE_BACKEND}"),
                format!("the reference backend is needed to judge every case: {e}"),
            ));
            return out;
        }
    };
    let waivers = Arc::new(waivers);
    let cache = RefCache::from_env();
    for name in names.iter().filter(|n| known.contains(&n.as_str())) {
        let backend: Arc<dyn Backend> = match reg.create(name) {
            Ok(b) => Arc::from(b),
            Err(e) => {
                let reason = format!("backend `{name}` is unavailable here: {e}");
                if require.contains(name) {
                    out.push(failing(
                        format!("require::{name}"),
                        format!("{reason} ({REQUIRE_ENV} requires it)"),
                    ));
                } else {
                    eprintln!("note: {reason}");
                    out.push(ignored(format!("unavailable::{name}"), reason));
                }
                continue;
            }
        };
        let ctx = Ctx {
            backend,
            reference: Arc::clone(&reference),
            cache: cache.clone(),
            waivers: Arc::clone(&waivers),
            timeout: Duration::from_secs_f64(timeout),
            tally: Arc::clone(tally),
        };
        for spec in specs.iter().filter(|s| runs(name, s)) {
            let (spec, ctx) = (spec.clone(), ctx.clone());
            out.push(Trial::ignorable_test(
                format!("{name}::{}", spec.id),
                move || run_trial(&spec, &ctx),
            ));
        }
    }
    out
}

fn main() {
    let args = Arguments::from_args();
    let tally = Arc::new(Tally::default());
    let trials = trials(&tally);
    let conclusion = libtest_mimic::run(&args, trials);
    let ns = tally.not_supported.load(Ordering::Relaxed);
    let qw = tally.quality_warning.load(Ordering::Relaxed);
    let waived = tally.waived.load(Ordering::Relaxed);
    if ns + qw + waived > 0 {
        println!(
            "conformance: {ns} not supported (shown as ignored: never a pass), \
             {qw} quality warning(s) (passed), {waived} waived (shown as ignored)\n"
        );
    }
    conclusion.exit();
}
