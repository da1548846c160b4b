//! Runs catalogue cases on backends and classifies each result.
//!
//! For each case and backend: build the case ([`catalogue::build`]), run it
//! on the backend under test (the op runners allocate every output poisoned
//! with NaN), get the reference outputs (the case's stored `expected`
//! outputs for golden cases, else `cpu-ref`'s, cached on disk by
//! [`refcache`]), judge them with the case's judge, and classify with
//! [`judge::verdict`]:
//!
//! * the backend says `NotSupported` → [`Outcome::NotSupported`];
//! * any other error, or a panic, from a backend that claimed support →
//!   [`Outcome::Fail`] with the message;
//! * the reference failing → `Fail` with `reference failed: …`;
//! * no result within the time limit → [`Outcome::Timeout`] (in process, the
//!   hung case's thread is abandoned; with `--isolate` its process is killed);
//! * with `--isolate`, a case process killed by a signal or exiting
//!   without a result → [`Outcome::Crash`] ([`child`]).
//!
//! [`run_main`] is `deepport run`: selection, scheduling over `--jobs`
//! workers, progress, waivers ([`super::waivers`]), tables and summary
//! ([`output`]), reports ([`super::report::write_all`]) and the exit status.

pub mod child;
pub mod gate;
pub mod mpi;
pub mod output;
pub mod refcache;
pub mod resume;

pub use refcache::RefCache;

use super::catalogue;
use super::waivers::{Date, Waivers};
use crate::cases::Case;
use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use crate::judge::{self, Check};
use crate::opspec::Outputs;
use crate::types::{CaseResult, CaseSpec, Outcome, RunInfo, SUITE_VERSION};
use deepport_core::backend::{Backend, DeviceInfo};
use deepport_core::registry::Registry;
use deepport_core::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The default per-case time limit, in seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into `Err("panicked: …")`.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(p.as_ref()))))
}

/// A result with the identity fields filled and everything else empty
/// (outcome `Fail` until classified).
pub fn blank_result(spec: &CaseSpec, backend: &str, info: &DeviceInfo) -> CaseResult {
    CaseResult {
        id: spec.id.clone(),
        backend: backend.to_string(),
        device: info.device.clone(),
        driver: info.driver.clone(),
        outcome: Outcome::Fail,
        metric: None,
        value: None,
        threshold: None,
        worst_index: None,
        seed: spec.seed,
        duration_s: 0.0,
        message: String::new(),
        waiver: None,
    }
}

/// Fills `res` from the judge's checks: the outcome from
/// [`judge::verdict`], metric, value, threshold and worst index from the
/// deciding check ([`judge::deciding`]), and for anything but a pass its
/// detail and the other failing metrics as the message.
pub fn classify(res: &mut CaseResult, checks: &[Check]) {
    res.outcome = judge::verdict(checks);
    let Some(c) = judge::deciding(checks) else {
        res.message = "the judge produced no check".into();
        return;
    };
    res.metric = Some(c.metric.clone());
    res.value = Some(c.value);
    res.threshold = Some(c.threshold);
    res.worst_index = c.worst_index.clone();
    if res.outcome != Outcome::Pass {
        let mut msg = c.detail.clone();
        let others: Vec<&str> = checks
            .iter()
            .filter(|o| !o.passed && !std::ptr::eq(*o, c))
            .map(|o| o.metric.as_str())
            .collect();
        if !others.is_empty() {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&format!(
                "also outside the pass threshold: {}",
                others.join(", ")
            ));
        }
        res.message = msg;
    }
}

/// The reference a case is judged against.
#[derive(Clone, Copy)]
pub struct Reference<'a> {
    /// The reference backend (`cpu-ref`).
    pub backend: &'a dyn Backend,
    /// The on-disk cache of its outputs.
    pub cache: &'a RefCache,
}

/// Runs a built case on `backend` and judges it. Never panics: a panic of
/// the backend, the reference or the judge is a `Fail` with its message.
pub fn run_case(
    spec: &CaseSpec,
    case: &Case,
    backend: &dyn Backend,
    info: &DeviceInfo,
    reference: Reference<'_>,
) -> CaseResult {
    let mut res = blank_result(spec, backend.name(), info);
    let t0 = Instant::now();
    let actual = catch_unwind(AssertUnwindSafe(|| (case.run)(backend)));
    res.duration_s = t0.elapsed().as_secs_f64();
    let actual = match actual {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            res.outcome = if e.is_not_supported() {
                Outcome::NotSupported
            } else {
                Outcome::Fail
            };
            res.message = e.to_string();
            return res;
        }
        Err(p) => {
            res.message = format!("panicked: {}", panic_message(p.as_ref()));
            return res;
        }
    };
    let computed;
    let expected: &Outputs = match &case.expected {
        Some(e) => e,
        None => {
            let (r, _) = reference.cache.get_or_compute(spec, || {
                guarded(|| (case.run)(reference.backend).map_err(|e| e.to_string()))
            });
            match r {
                Ok(r) => {
                    computed = r;
                    &computed
                }
                Err(e) => {
                    res.message = format!(
                        "reference failed: {} on {}: {e}",
                        spec.id,
                        reference.backend.name()
                    );
                    return res;
                }
            }
        }
    };
    match guarded(|| Ok((case.judge)(&actual, expected))) {
        Ok(checks) => classify(&mut res, &checks),
        Err(e) => res.message = format!("the judge failed: {e}"),
    }
    res
}

/// Builds the case of `spec` and runs it ([`run_case`]); a case that cannot
/// be built is a `Fail` naming the catalogue entry.
pub fn run_spec(
    spec: &CaseSpec,
    backend: &dyn Backend,
    info: &DeviceInfo,
    reference: Reference<'_>,
) -> CaseResult {
    match guarded(|| catalogue::build(spec).map_err(|e| e.to_string())) {
        Ok(case) => run_case(spec, &case, backend, info, reference),
        Err(e) => {
            let mut res = blank_result(spec, backend.name(), info);
            res.message = format!("cannot build the case ({}): {e}", spec.origin);
            res
        }
    }
}

/// A result for a case that did not finish within `limit`.
pub fn timeout_result(
    spec: &CaseSpec,
    backend: &str,
    info: &DeviceInfo,
    limit: Duration,
    how: &str,
) -> CaseResult {
    let mut res = blank_result(spec, backend, info);
    res.outcome = Outcome::Timeout;
    res.duration_s = limit.as_secs_f64();
    res.message = format!(
        "no result within {} s; {how}",
        output::fmt_secs(limit.as_secs_f64())
    );
    res
}

/// Runs one case in process on a thread of its own and waits at most
/// `limit`. A case that does not finish is a `Timeout`; its thread is
/// abandoned (it cannot be stopped) and ends with the process.
pub fn run_in_thread(
    spec: &CaseSpec,
    backend: &Arc<dyn Backend>,
    info: &DeviceInfo,
    reference: &Arc<dyn Backend>,
    cache: &RefCache,
    limit: Duration,
) -> CaseResult {
    let (tx, rx) = mpsc::channel();
    let (s, b, i, r, c) = (
        spec.clone(),
        Arc::clone(backend),
        info.clone(),
        Arc::clone(reference),
        cache.clone(),
    );
    let spawned = std::thread::Builder::new()
        .name(format!("case {}", spec.id))
        .stack_size(64 << 20)
        .spawn(move || {
            let res = run_spec(
                &s,
                b.as_ref(),
                &i,
                Reference {
                    backend: r.as_ref(),
                    cache: &c,
                },
            );
            let _ = tx.send(res);
        });
    if let Err(e) = spawned {
        let mut res = blank_result(spec, backend.name(), info);
        res.message = format!("cannot start a thread for the case: {e}");
        return res;
    }
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => timeout_result(
            spec,
            backend.name(),
            info,
            limit,
            "its thread was abandoned (use --isolate to kill hung cases)",
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let mut res = blank_result(spec, backend.name(), info);
            res.message = "the case's thread ended without a result".into();
            res
        }
    }
}

/// How a run executes its cases.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Run each case in a child process ([`child`]).
    pub isolate: bool,
    /// Cases run at once (at least 1).
    pub jobs: usize,
    /// Per-case time limit.
    pub timeout: Duration,
    /// The catalogue directory (passed to child processes).
    pub cases_dir: PathBuf,
    pub refcache: RefCache,
}

/// One backend of a run, created once.
pub struct RunBackend {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub info: DeviceInfo,
}

/// Runs every spec on every backend (backend-major order), `jobs` at a
/// time, calling `on_result` as each finishes. Results come back in
/// backend-major, catalogue order.
pub fn execute(
    backends: &[RunBackend],
    specs: &[CaseSpec],
    reference: &Arc<dyn Backend>,
    opts: &ExecOptions,
    on_result: &mut dyn FnMut(&CaseResult),
) -> Vec<CaseResult> {
    let all: Vec<usize> = (0..backends.len() * specs.len()).collect();
    let mut results: Vec<Option<CaseResult>> = all.iter().map(|_| None).collect();
    let none = std::collections::BTreeSet::new();
    for (k, r) in execute_some(
        backends,
        specs,
        &all,
        &none,
        reference,
        opts,
        &|_| {},
        &mut |_, r| on_result(r),
    ) {
        results[k] = Some(r);
    }
    results
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|| lost_result(backends, specs, k)))
        .collect()
}

/// The row of a case that produced no result (a worker cannot die: every
/// case is guarded; this keeps the row rather than lose it).
fn lost_result(backends: &[RunBackend], specs: &[CaseSpec], k: usize) -> CaseResult {
    let b = &backends[k / specs.len()];
    let mut res = blank_result(&specs[k % specs.len()], &b.name, &b.info);
    res.message = "internal: the case produced no result".into();
    res
}

/// Runs the cases `pending` (indices `backend * specs.len() + spec`),
/// `jobs` at a time, calling `on_start(k)` as each starts and
/// `on_result(k, result)` as each finishes, and returns `(k, result)` for
/// each in the order they finished. The cases in `isolate` run in a child
/// process even without `--isolate`.
#[allow(clippy::too_many_arguments)]
pub fn execute_some(
    backends: &[RunBackend],
    specs: &[CaseSpec],
    pending: &[usize],
    isolate: &std::collections::BTreeSet<usize>,
    reference: &Arc<dyn Backend>,
    opts: &ExecOptions,
    on_start: &(dyn Fn(usize) + Sync),
    on_result: &mut dyn FnMut(usize, &CaseResult),
) -> Vec<(usize, CaseResult)> {
    let total = pending.len();
    let next = AtomicUsize::new(0);
    // Each result travels with an acknowledgement: a worker starts its next
    // case only after `on_result` has taken this one (e.g. appended it to
    // the journal), so a case that then kills the process cannot take the
    // previous case's finished result down with it.
    let (tx, rx) = mpsc::channel::<(usize, CaseResult, mpsc::SyncSender<()>)>();
    let mut out = Vec::with_capacity(total);
    if specs.is_empty() {
        return out;
    }
    // Cases at once share the memory budget (a case alone was checked
    // against it when built).
    let gate = gate::MemoryGate::new(deepport_core::budget::MemoryBudget::global().bytes());
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.clamp(1, total.max(1)) {
            let tx = tx.clone();
            let (next, gate) = (&next, &gate);
            scope.spawn(move || {
                let (ack_tx, ack_rx) = mpsc::sync_channel::<()>(1);
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    let k = pending[i];
                    let (b, spec) = (&backends[k / specs.len()], &specs[k % specs.len()]);
                    let ticket = gate.enter_case(spec);
                    on_start(k);
                    let r = if opts.isolate || isolate.contains(&k) {
                        child::run_isolated(spec, &b.name, &b.info, opts)
                    } else {
                        run_in_thread(
                            spec,
                            &b.backend,
                            &b.info,
                            reference,
                            &opts.refcache,
                            opts.timeout,
                        )
                    };
                    drop(ticket);
                    if tx.send((k, r, ack_tx.clone())).is_err() || ack_rx.recv().is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (k, r, ack) in rx {
            on_result(k, &r);
            out.push((k, r));
            let _ = ack.send(());
        }
    });
    out
}

/// `deepport run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Backend to judge (see `deepport list`); repeat to judge several.
    /// Default: cpu.
    #[arg(long, short, value_name = "NAME")]
    pub backend: Vec<String>,
    /// Case profile: smoke (quick), full (whole grids), v3-mustpass
    /// (everything DeepSeek-V3 inference needs) or ep (the expert-parallel
    /// cases of v3-mustpass; with --comm mpi, those with ranks = world size).
    #[arg(long, short, value_name = "PROFILE",
          value_parser = clap::builder::PossibleValuesParser::new(catalogue::PROFILES.into_iter().chain([mpi::EP_PROFILE])))]
    pub profile: Option<String>,
    /// How expert-parallel ranks talk: `thread` (in this process) or `mpi`
    /// (under `mpirun -np N`, each process one rank: only the `ep` cases
    /// with ranks = N run; rank 0 judges and reports; needs a build with
    /// `--features mpi`).
    #[arg(long, default_value = "thread", value_parser = crate::comm_cmd::COMMS)]
    pub comm: String,
    /// Run only cases whose id matches this glob (`*` any text, `?` one
    /// character; a filter without either matches ids containing it);
    /// repeat to add more. See `--list-cases`.
    #[arg(long, short, value_name = "GLOB")]
    pub filter: Vec<String>,
    /// Run each case in a child process, so that a crash or a hang is
    /// recorded (Crash, Timeout) and the run goes on. Without it a crash
    /// ends the run and a hung case is abandoned on its thread.
    #[arg(long)]
    pub isolate: bool,
    /// Cases to run at once.
    #[arg(long, short, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    /// Per-case time limit in seconds (a case over it is a Timeout).
    /// Default: 300.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Write run.json, results.jsonl, junit.xml and summary.md here (one
    /// subdirectory per backend when there are several). results.jsonl
    /// grows as cases finish; the other reports are written at the end.
    /// The directory is locked while the run lasts.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Continue the run whose report directory is DIR (killed or
    /// interrupted): the cases it finished are kept, the others are run,
    /// and the reports end as an uninterrupted run's. The selection and
    /// options come from DIR; any given here must match. The suite
    /// version, backends, devices and drivers must be the same.
    #[arg(long, value_name = "DIR", conflicts_with = "list_cases")]
    pub resume: Option<PathBuf>,
    /// Waiver file (default: conformance/waivers.yaml when present).
    #[arg(long, value_name = "FILE")]
    pub waivers: Option<PathBuf>,
    /// Print the ids of the selected cases and exit.
    #[arg(long)]
    pub list_cases: bool,
    /// The case catalogue directory (default: conformance/cases, or
    /// $DEEPPORT_CASES).
    #[arg(long, value_name = "DIR")]
    pub cases: Option<PathBuf>,
    /// Compute every reference anew instead of using the cache in
    /// target/deepport-refcache (or $DEEPPORT_REFCACHE).
    #[arg(long)]
    pub no_refcache: bool,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e7 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

/// Prints `error: …` and returns the exit status.
fn fail(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The specs of `profile` matching any of `filters` (all when none), in
/// catalogue order, each once. A filter without `*` or `?` matches the ids
/// that contain it.
pub fn select_many(specs: &[CaseSpec], profile: &str, filters: &[String]) -> Vec<CaseSpec> {
    if profile == mpi::EP_PROFILE {
        return mpi::select_ep(specs, filters);
    }
    if filters.is_empty() {
        return catalogue::select(specs, profile, None);
    }
    let mut keep = std::collections::BTreeSet::new();
    for f in filters {
        let glob = if f.contains(['*', '?']) {
            f.clone()
        } else {
            format!("*{f}*")
        };
        for s in catalogue::select(specs, profile, Some(&glob)) {
            keep.insert(s.id);
        }
    }
    catalogue::select(specs, profile, None)
        .into_iter()
        .filter(|s| keep.contains(&s.id))
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` now.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = Date::from_unix_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{d}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .or_else(|_| std::fs::read_to_string("/etc/hostname"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The command line, with arguments that need it quoted.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Creates the backends of a run; unknown names are usage errors.
fn create_backends(reg: &Registry, names: &[String]) -> Result<Vec<RunBackend>, (i32, String)> {
    let mut out = Vec::new();
    for name in names {
        if out.iter().any(|b: &RunBackend| &b.name == name) {
            continue;
        }
        match reg.create(name) {
            Ok(b) => {
                let info = b.info();
                out.push(RunBackend {
                    name: name.clone(),
                    backend: Arc::from(b),
                    info,
                });
            }
            Err(e @ Error::UnknownBackend { .. }) => return Err((EXIT_USAGE, e.to_string())),
            Err(e) => {
                return Err((
                    EXIT_FAILURE,
                    format!("backend `{name}` cannot run here: {e}"),
                ))
            }
        }
    }
    Ok(out)
}

/// The run directory of backend `name` in the report directory `dir`: `dir`
/// itself for a single backend, else `dir/name`.
fn backend_dir(dir: &Path, name: &str, several: bool) -> PathBuf {
    if several {
        dir.join(name)
    } else {
        dir.to_path_buf()
    }
}

/// `deepport run`: see [`RunArgs`] and the module documentation.
pub fn run_main(args: RunArgs) -> ExitCode {
    if args.comm == "mpi" && !args.list_cases {
        return mpi::run_main(args);
    }
    // With --resume, the directory is locked before its plan is read, so
    // that a live run cannot be resumed from under itself.
    let mut lock = None;
    let (plan, report_dir) = match &args.resume {
        Some(dir) => {
            if args.report.as_ref().is_some_and(|r| r != dir) {
                return fail(
                    EXIT_USAGE,
                    "--resume DIR writes its reports into DIR; leave out --report or give the same directory",
                );
            }
            if !dir.is_dir() {
                return fail(
                    EXIT_USAGE,
                    format!("cannot resume: {} is not a directory", dir.display()),
                );
            }
            match super::report::RunLock::acquire(dir) {
                Ok(l) => lock = Some(l),
                Err(e) => return fail(EXIT_USAGE, e),
            }
            match resume::RunPlan::read(dir).and_then(|p| p.resumed(&args)) {
                Ok(p) => (p, Some(dir.clone())),
                Err(e) => return fail(EXIT_USAGE, e),
            }
        }
        None => (resume::RunPlan::from_args(&args), args.report.clone()),
    };
    let resuming = args.resume.is_some();
    let cases_dir = plan.cases.clone().unwrap_or_else(catalogue::default_dir);
    let all = match catalogue::load(&cases_dir) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let specs = select_many(&all, &plan.profile, &plan.filters);
    if specs.is_empty() {
        return fail(
            EXIT_USAGE,
            format!(
                "no case of profile `{}` matches {}; `deepport run --list-cases --profile {}` shows them",
                plan.profile,
                if plan.filters.is_empty() {
                    "(no filter)".to_string()
                } else {
                    plan.filters.join(", ")
                },
                plan.profile
            ),
        );
    }
    if args.list_cases {
        let mut s = String::new();
        for spec in &specs {
            s.push_str(&spec.id);
            s.push('\n');
        }
        return match std::io::Write::write_all(&mut std::io::stdout().lock(), s.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_FAILURE, format!("writing to stdout: {e}")),
        };
    }
    let waivers = match plan.waivers.clone().or_else(Waivers::default_path) {
        Some(p) => match Waivers::load(&p) {
            Ok(w) => w,
            Err(e) => return fail(EXIT_USAGE, e),
        },
        None => Waivers::default(),
    };
    if let (None, Some(dir)) = (&lock, &report_dir) {
        match super::report::RunLock::acquire(dir) {
            Ok(l) => lock = Some(l),
            Err(e) => return fail(EXIT_USAGE, e),
        }
    }
    let reg = crate::registry();
    let backends = match create_backends(&reg, &plan.backends) {
        Ok(b) => b,
        Err((code, msg)) => return fail(code, msg),
    };
    let reference: Arc<dyn Backend> = match reg.create(crate::REFERENCE_BACKEND) {
        Ok(b) => Arc::from(b),
        Err(e) => {
            return fail(
                EXIT_FAILURE,
                format!(
                    "the reference backend `{}` is needed to judge: {e}",
                    crate::REFERENCE_BACKEND
                ),
            )
        }
    };
    let opts = ExecOptions {
        isolate: plan.isolate,
        jobs: usize::from(args.jobs),
        timeout: Duration::from_secs_f64(plan.timeout_s),
        cases_dir,
        refcache: if plan.no_refcache {
            RefCache::disabled()
        } else {
            RefCache::from_env()
        },
    };
    let n = specs.len();
    let several = backends.len() > 1;
    let started = utc_now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("."));
    let (git_commit, git_dirty) = if report_dir.is_some() {
        super::report::git_state(&repo)
    } else {
        (None, None)
    };
    let mut infos: Vec<RunInfo> = backends
        .iter()
        .map(|b| RunInfo {
            suite_version: SUITE_VERSION.to_string(),
            profile: plan.profile.clone(),
            backend: b.name.clone(),
            device: b.info.device.clone(),
            driver: b.info.driver.clone(),
            vendor: b.info.vendor.clone(),
            git_commit: git_commit.clone(),
            git_dirty,
            started_utc: started.clone(),
            host: hostname(),
            command: command_line(),
        })
        .collect();

    // The report directory: the plan, each backend's run.json, and the
    // results so far (kept when resuming), before the first case runs.
    let mut done: Vec<Option<CaseResult>> = (0..backends.len() * n).map(|_| None).collect();
    let mut journals: Vec<Option<super::report::ResultsJournal>> =
        backends.iter().map(|_| None).collect();
    // Which cases started, so that a resume knows which were running when
    // the run died: those run in a child process the next time, so that a
    // case that kills the runner (an abort, an allocation the size check
    // did not foresee) is recorded as a Crash instead of killing it again.
    let mut started_logs: Vec<Option<std::sync::Mutex<std::fs::File>>> =
        backends.iter().map(|_| None).collect();
    let mut in_flight = std::collections::BTreeSet::new();
    if let Some(dir) = &report_dir {
        if !resuming {
            if let Err(e) = plan.write(dir) {
                return fail(EXIT_FAILURE, e);
            }
        }
        for (bi, b) in backends.iter().enumerate() {
            let d = backend_dir(dir, &b.name, several);
            if resuming {
                let stored = match super::report::read_run_info(&d) {
                    Ok(i) => i,
                    Err(e) => return fail(EXIT_USAGE, format!("cannot resume: {e}")),
                };
                if let Err(e) = resume::check_same(&stored, &infos[bi]) {
                    return fail(EXIT_USAGE, e);
                }
                // The run keeps the facts of its start.
                infos[bi].started_utc = stored.started_utc;
                infos[bi].command = stored.command;
                infos[bi].host = stored.host;
                let (mut found, torn) = match resume::load_done(&d, &b.name, &specs) {
                    Ok(x) => x,
                    Err(e) => return fail(EXIT_USAGE, format!("cannot resume: {e}")),
                };
                if torn > 0 {
                    eprintln!(
                        "note: {}: dropped {torn} unreadable line(s) of {} (cut off when the run was killed); their cases run again",
                        d.display(),
                        super::report::RESULTS_JSONL
                    );
                }
                let was_started = resume::read_started(&d);
                for (i, s) in specs.iter().enumerate() {
                    done[bi * n + i] = found.remove(&s.id);
                    if done[bi * n + i].is_none() && was_started.contains(&s.id) {
                        in_flight.insert(bi * n + i);
                    }
                }
            } else {
                let setup = std::fs::create_dir_all(&d).and_then(|()| {
                    for stale in [
                        super::report::JUNIT_XML,
                        super::report::SUMMARY_MD,
                        super::report::html::REPORT_HTML,
                    ] {
                        match std::fs::remove_file(d.join(stale)) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                            _ => {}
                        }
                    }
                    super::report::write_run_json(&d, &infos[bi])
                });
                if let Err(e) = setup {
                    return fail(
                        EXIT_FAILURE,
                        format!("preparing the report in {}: {e}", d.display()),
                    );
                }
            }
            let kept: Vec<CaseResult> = done[bi * n..(bi + 1) * n]
                .iter()
                .flatten()
                .cloned()
                .collect();
            match super::report::ResultsJournal::start(&d, &kept) {
                Ok(j) => journals[bi] = Some(j),
                Err(e) => return fail(EXIT_FAILURE, e),
            }
            match resume::open_started(&d, !resuming) {
                Ok(f) => started_logs[bi] = Some(std::sync::Mutex::new(f)),
                Err(e) => return fail(EXIT_FAILURE, e),
            }
        }
    }
    let pending: Vec<usize> = (0..done.len()).filter(|&k| done[k].is_none()).collect();

    for b in &backends {
        println!(
            "backend {}: {} | {} (judged against {}); profile {}, {} case(s){}",
            b.name,
            b.info.device,
            b.info.driver,
            crate::REFERENCE_BACKEND,
            plan.profile,
            specs.len(),
            if opts.isolate {
                ", each in its own process"
            } else {
                ""
            }
        );
    }
    if let (true, Some(dir)) = (resuming, &report_dir) {
        println!(
            "resuming {}: {} of {} case(s) already done, {} to run",
            dir.display(),
            done.len() - pending.len(),
            done.len(),
            pending.len()
        );
        if !in_flight.is_empty() && !opts.isolate {
            println!(
                "{} case(s) were running when the run stopped; each runs in its own process this time: {}",
                in_flight.len(),
                in_flight
                    .iter()
                    .map(|&k| specs[k % n].id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut progress = output::Progress::new(pending.len());
    let mut journal_failed = false;
    let t0 = Instant::now();
    let on_start = |k: usize| {
        if let Some(Ok(mut f)) = started_logs[k / n].as_ref().map(|m| m.lock()) {
            // Best effort: without it a resume merely runs the case in process.
            let _ = std::io::Write::write_all(&mut *f, format!("{}\n", specs[k % n].id).as_bytes());
        }
    };
    let finished = execute_some(
        &backends,
        &specs,
        &pending,
        &in_flight,
        &reference,
        &opts,
        &on_start,
        &mut |k, r| {
            progress.update(r);
            if let Some(j) = journals[k / n].as_mut() {
                if let Err(e) = j.append(r) {
                    if !journal_failed {
                        eprintln!("warning: {e}; the reports are still written at the end");
                    }
                    journal_failed = true;
                }
            }
        },
    );
    progress.finish();
    drop(journals);
    drop(started_logs);
    let wall = t0.elapsed().as_secs_f64();
    for (k, r) in finished {
        done[k] = Some(r);
    }
    let mut results: Vec<CaseResult> = done
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|| lost_result(&backends, &specs, k)))
        .collect();
    let wrep = waivers.apply(&mut results, Date::today());
    for w in &wrep.warnings {
        eprintln!("warning: {w}");
    }

    let mut out = String::new();
    let families: std::collections::BTreeMap<&str, &str> = specs
        .iter()
        .map(|s| (s.id.as_str(), s.family.as_str()))
        .collect();
    let mut ok = wrep.unneeded.is_empty();
    for (bi, b) in backends.iter().enumerate() {
        let rs = &results[bi * n..(bi + 1) * n];
        out.push_str(&output::tables(rs, &families));
        let counts = output::Counts::of(rs);
        ok &= counts.run_ok();
        out.push_str(&counts.notices(&b.name, rs));
        if plan.profile == super::report::MUSTPASS_PROFILE {
            out.push_str(&output::v3_claim(&b.name, rs, !plan.filters.is_empty()));
        }
        if several {
            out.push_str(&format!(
                "{}\n\n",
                counts.run_line(&format!("run ({})", b.name))
            ));
        }
    }
    let total = output::Counts::of(&results);
    if !wrep.unneeded.is_empty() {
        out.push_str(&format!(
            "\n{} waiver(s) no longer needed (delete them from {}):\n",
            wrep.unneeded.len(),
            waivers
                .path
                .as_deref()
                .map_or("the waiver file".into(), |p| p.display().to_string())
        ));
        for u in &wrep.unneeded {
            out.push_str(&format!("  {u}\n"));
        }
    }
    out.push_str(&format!(
        "{}  [{} s]\n",
        total.run_line("run"),
        output::fmt_secs(wall)
    ));
    out.push_str(&total.closing_line("conformance"));
    out.push('\n');
    if let Err(e) = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        return fail(EXIT_FAILURE, format!("writing to stdout: {e}"));
    }

    if let Some(dir) = &report_dir {
        for (bi, b) in backends.iter().enumerate() {
            let rs = &results[bi * n..(bi + 1) * n];
            let d = backend_dir(dir, &b.name, several);
            if let Err(e) = super::report::write_all(&d, &infos[bi], rs) {
                return fail(
                    EXIT_FAILURE,
                    format!("writing the report to {}: {e}", d.display()),
                );
            }
            eprintln!("report: wrote {}", d.display());
        }
    }
    drop(lock);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE as u8)
    }
}

#[cfg(feature = "cpu")]
pub mod mutants;
#[cfg(all(test, feature = "cpu"))]
mod tests;
