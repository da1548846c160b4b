//! `--isolate`: each case in a child process under a time limit.
//!
//! The parent runs `deepport case-exec --backend B --id ID --cases DIR`
//! (this same program, [`std::env::current_exe`]), which runs the one case
//! in process and prints its [`CaseResult`] as one JSON line after
//! [`RESULT_PREFIX`] on standard output. The parent drains the child's
//! output on two threads, polls [`std::process::Child::try_wait`], and
//! kills the child when the time limit passes (`Timeout`). A child killed
//! by a signal, or one that exits without a result, is a `Crash`; the run
//! goes on either way.

use super::{blank_result, run_spec, timeout_result, ExecOptions, RefCache, Reference};
use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use crate::suite::catalogue;
use crate::suite::report::{result_from_json_line, result_to_json_line};
use crate::types::{CaseResult, CaseSpec, Outcome};
use deepport_core::backend::DeviceInfo;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The hidden subcommand a child process runs.
pub const SUBCOMMAND: &str = "case-exec";

/// Marks the result line on a child's standard output.
pub const RESULT_PREFIX: &str = "deepport-case-result: ";

/// How much of a child's standard error a message quotes.
const STDERR_TAIL: usize = 600;

/// `deepport case-exec` (hidden): runs one case in this process and prints
/// its result line.
#[derive(clap::Args, Debug, Clone)]
pub struct CaseExecArgs {
    #[arg(long, value_name = "NAME")]
    pub backend: String,
    /// The case id, exactly.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The catalogue directory.
    #[arg(long, value_name = "DIR")]
    pub cases: Option<PathBuf>,
    /// The reference cache directory.
    #[arg(long, value_name = "DIR")]
    pub refcache: Option<PathBuf>,
    /// Do not use the reference cache.
    #[arg(long, conflicts_with = "refcache")]
    pub no_refcache: bool,
}

fn exit(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs `deepport case-exec`.
pub fn case_exec_main(args: CaseExecArgs) -> ExitCode {
    let dir = args.cases.unwrap_or_else(catalogue::default_dir);
    let specs = match catalogue::load(&dir) {
        Ok(s) => s,
        Err(e) => return exit(EXIT_USAGE, e),
    };
    let Some(spec) = specs.into_iter().find(|s| s.id == args.id) else {
        return exit(
            EXIT_USAGE,
            format!("no case `{}` in {}", args.id, dir.display()),
        );
    };
    let reg = crate::registry();
    let backend = match reg.create(&args.backend) {
        Ok(b) => b,
        Err(e) => return exit(EXIT_FAILURE, e),
    };
    let reference = match reg.create(crate::REFERENCE_BACKEND) {
        Ok(b) => b,
        Err(e) => return exit(EXIT_FAILURE, e),
    };
    let cache = match (args.no_refcache, args.refcache) {
        (true, _) => RefCache::disabled(),
        (false, Some(d)) => RefCache::at(d),
        (false, None) => RefCache::from_env(),
    };
    let info = backend.info();
    let res = run_spec(
        &spec,
        backend.as_ref(),
        &info,
        Reference {
            backend: reference.as_ref(),
            cache: &cache,
        },
    );
    let line = format!("{RESULT_PREFIX}{}\n", result_to_json_line(&res));
    match std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit(EXIT_FAILURE, format!("writing the result: {e}")),
    }
}

/// The conventional name of a signal.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "signal",
    }
}

/// The last `max` bytes of `s` (on a character boundary), trimmed.
fn tail(s: &str, max: usize) -> &str {
    let s = s.trim();
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Classifies a finished child from its exit status and output.
pub fn classify_exit(
    spec: &CaseSpec,
    backend: &str,
    info: &DeviceInfo,
    status: ExitStatus,
    stdout: &str,
    stderr: &str,
    elapsed: Duration,
) -> CaseResult {
    let parsed = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .map(result_from_json_line);
    let err_tail = tail(stderr, STDERR_TAIL);
    let with_stderr = |msg: String| {
        if err_tail.is_empty() {
            msg
        } else {
            format!("{msg}; stderr: {err_tail}")
        }
    };
    match (status.success(), parsed) {
        (true, Some(Ok(r))) => r,
        (_, parsed) => {
            let mut res = blank_result(spec, backend, info);
            res.outcome = Outcome::Crash;
            res.duration_s = elapsed.as_secs_f64();
            let how = if let Some(sig) = status.signal() {
                format!(
                    "the case process was killed by signal {sig} ({})",
                    signal_name(sig)
                )
            } else if let Some(code) = status.code().filter(|c| *c != 0) {
                format!("the case process exited with status {code}")
            } else {
                "the case process exited".to_string()
            };
            let what = match parsed {
                None => " without a result".to_string(),
                Some(Err(e)) => format!(" with an unreadable result ({e})"),
                Some(Ok(r)) => format!(" after reporting {}", r.outcome),
            };
            res.message = with_stderr(format!("{how}{what}"));
            res
        }
    }
}

/// Reads a pipe to the end on a thread of its own.
fn drain(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// Runs one case in a child process (see the module documentation).
pub fn run_isolated(
    spec: &CaseSpec,
    backend: &str,
    info: &DeviceInfo,
    opts: &ExecOptions,
) -> CaseResult {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            let mut res = blank_result(spec, backend, info);
            res.outcome = Outcome::Crash;
            res.message = format!("cannot find this program to start the case process: {e}");
            return res;
        }
    };
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg("--backend")
        .arg(backend)
        .arg("--id")
        .arg(&spec.id)
        .arg("--cases")
        .arg(&opts.cases_dir);
    match opts.refcache.dir() {
        Some(d) => cmd.arg("--refcache").arg(d),
        None => cmd.arg("--no-refcache"),
    };
    // The child judges sizes against the same budget as this run.
    let budget = deepport_core::budget::MemoryBudget::global();
    cmd.arg("--max-memory").arg(
        if budget == deepport_core::budget::MemoryBudget::unlimited() {
            "unlimited".to_string()
        } else {
            budget.bytes().to_string()
        },
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let mut res = blank_result(spec, backend, info);
            res.outcome = Outcome::Crash;
            res.message = format!("cannot start the case process: {e}");
            return res;
        }
    };
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(_) => break None,
        }
        if t0.elapsed() >= opts.timeout {
            let _ = child.kill();
            let _ = child.wait();
            return timeout_result(
                spec,
                backend,
                info,
                opts.timeout,
                "the case process was killed",
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let elapsed = t0.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let mut res = blank_result(spec, backend, info);
        res.outcome = Outcome::Crash;
        res.message = "lost track of the case process".into();
        return res;
    };
    // The pipes close when the child exits, unless it left a process behind
    // holding them: then give up on its output after a moment.
    let grace = Duration::from_secs(2);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    classify_exit(
        spec,
        backend,
        info,
        status,
        &String::from_utf8_lossy(&stdout),
        &String::from_utf8_lossy(&stderr),
        elapsed,
    )
}
