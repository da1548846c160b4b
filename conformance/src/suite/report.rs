//! Reports of a run and what is done with them afterwards.
//!
//! A run directory (`deepport run --report DIR`) holds:
//!
//! | file | what |
//! |---|---|
//! | `run.json` | the [`RunInfo`]: suite version, profile, backend, device, driver, git commit and clean-tree state, host, command |
//! | `results.jsonl` | one [`CaseResult`] per line, every field present (`null` when unknown); non-finite metric values as the strings `"NaN"`, `"inf"`, `"-inf"` |
//! | `junit.xml` | JUnit XML for CI systems: one `<testsuite>` per op family; Fail/Crash/Timeout are `<failure>`s, NotSupported is `<skipped>` (never a pass) |
//! | `summary.md` | a Markdown summary: the run's facts, outcome counts per op family, every case that did not pass |
//! | `report.html` | one self-contained page: the matrix, how close each metric runs to its threshold, the run's facts ([`html`]) |
//! | `resume.json` | the run's selection and options, for `deepport run --resume DIR` ([`crate::suite::exec::resume`]) |
//! | `.deepport-run.lock` | held (`flock`) by the run writing into the directory ([`lock`]) |
//!
//! `run.json` is written before the first case and `results.jsonl` grows
//! by one flushed line per finished case ([`ResultsJournal`]), so a killed
//! run leaves what it finished; at the end every file is rewritten in
//! catalogue order, each atomically ([`write_atomic`]).
//!
//! [`merge`] turns several run directories into a cases × backends Markdown
//! matrix (`deepport report merge`), and [`verify`] checks a submission
//! (`deepport verify`): every `v3-mustpass` case present exactly once, only
//! conformant outcomes, this suite version, a recorded clean tree.

pub mod html;
mod junit;
pub mod lock;
mod markdown;
mod verify;

pub use junit::junit_xml;
pub use lock::RunLock;
pub use markdown::{merge_runs, summary_md};
pub use verify::{verify_run, Problem, VerifyReport};

use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use crate::types::{CaseResult, RunInfo};
use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

/// File names inside a run directory.
pub const RUN_JSON: &str = "run.json";
pub const RESULTS_JSONL: &str = "results.jsonl";
pub const JUNIT_XML: &str = "junit.xml";
pub const SUMMARY_MD: &str = "summary.md";

/// The profile a submission must be run with.
pub const MUSTPASS_PROFILE: &str = "v3-mustpass";

/// A report file that could not be read or written: the file, the line
/// (1-based) where known, and what is wrong.
#[derive(Debug)]
pub struct ReportError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl ReportError {
    fn new(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        ReportError {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ReportError {}

/// The op family of a case id: the text before `(` (the whole id if none).
pub fn family_of(id: &str) -> &str {
    id.split_once('(').map_or(id, |(f, _)| f)
}

/// A metric value as text for tables: `NaN`, `inf`, `0`, integers plainly,
/// the rest in short scientific notation.
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.3e}")
    }
}

fn encode_f64(v: Option<f64>) -> serde_json::Value {
    match v {
        None => serde_json::Value::Null,
        Some(x) => match serde_json::Number::from_f64(x) {
            Some(n) => serde_json::Value::Number(n),
            None if x.is_nan() => "NaN".into(),
            None if x > 0.0 => "inf".into(),
            None => "-inf".into(),
        },
    }
}

fn decode_f64(v: &serde_json::Value, field: &str) -> Result<Option<f64>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{field}`: {n} is not a number")),
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            "inf" | "+inf" | "Infinity" => Ok(Some(f64::INFINITY)),
            "-inf" | "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            _ => Err(format!(
                "`{field}`: expected a number, null, \"NaN\", \"inf\" or \"-inf\", found {s:?}"
            )),
        },
        other => Err(format!("`{field}`: expected a number, found {other}")),
    }
}

/// The fields of a `results.jsonl` line, in the order written.
pub const RESULT_FIELDS: [&str; 13] = [
    "id",
    "backend",
    "device",
    "driver",
    "outcome",
    "metric",
    "value",
    "threshold",
    "worst_index",
    "seed",
    "duration_s",
    "message",
    "waiver",
];

/// Fields of [`CaseResult`] that may hold a non-finite number.
const FLOAT_FIELDS: [&str; 2] = ["value", "threshold"];

/// One line of `results.jsonl` (without the newline): every field of
/// [`CaseResult`], `waiver` included (`null` when none).
pub fn result_to_json_line(r: &CaseResult) -> String {
    let mut v = match serde_json::to_value(r) {
        Ok(serde_json::Value::Object(m)) => m,
        // CaseResult is a plain struct of strings and numbers: it always
        // serializes to an object.
        _ => serde_json::Map::new(),
    };
    v.insert("value".into(), encode_f64(r.value));
    v.insert("threshold".into(), encode_f64(r.threshold));
    v.insert(
        "waiver".into(),
        r.waiver
            .as_ref()
            .map_or(serde_json::Value::Null, |w| w.clone().into()),
    );
    if !r.duration_s.is_finite() {
        v.insert("duration_s".into(), encode_f64(Some(r.duration_s)));
    }
    // The fields in the order of the contract, then any others.
    let mut parts = Vec::with_capacity(v.len());
    for k in RESULT_FIELDS {
        if let Some(x) = v.remove(k) {
            parts.push(format!("{}:{x}", serde_json::Value::from(k)));
        }
    }
    for (k, x) in v {
        parts.push(format!("{}:{x}", serde_json::Value::from(k)));
    }
    format!("{{{}}}", parts.join(","))
}

/// Parses one line of `results.jsonl`.
pub fn result_from_json_line(line: &str) -> Result<CaseResult, String> {
    let mut v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "expected a JSON object".to_string())?;
    let mut floats = [None, None];
    for (slot, field) in floats.iter_mut().zip(FLOAT_FIELDS) {
        if let Some(x) = obj.get(field) {
            *slot = decode_f64(x, field)?;
        }
        obj.insert(field.into(), serde_json::Value::Null);
    }
    let duration = match obj.get("duration_s") {
        Some(d @ serde_json::Value::String(_)) => decode_f64(d, "duration_s")?,
        _ => None,
    };
    if duration.is_some() {
        obj.insert("duration_s".into(), 0.0.into());
    }
    let mut r: CaseResult = serde_json::from_value(v).map_err(|e| e.to_string())?;
    [r.value, r.threshold] = floats;
    if let Some(d) = duration {
        r.duration_s = d;
    }
    Ok(r)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: to a temporary file in the same
/// directory, synced, then renamed over `path`. A reader (or a run killed
/// meanwhile) sees the old file or the new one, never a part of either.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let ctx = |e: std::io::Error, what: &Path| {
        std::io::Error::new(e.kind(), format!("writing {}: {e}", what.display()))
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".to_string(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ctx(e, &tmp));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ctx(e, path)
    })?;
    // Make the rename itself durable where the platform allows.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    write_atomic(path, text.as_bytes())
}

/// The text of `results.jsonl`: one line per result.
pub fn results_jsonl(results: &[CaseResult]) -> String {
    let mut lines = String::new();
    for r in results {
        lines.push_str(&result_to_json_line(r));
        lines.push('\n');
    }
    lines
}

/// Writes `run.json`, `results.jsonl`, `junit.xml`, `summary.md` and `report.html` into
/// `dir` (created if missing; existing files are replaced, each atomically:
/// see [`write_atomic`]).
pub fn write_all(dir: &Path, info: &RunInfo, results: &[CaseResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    write_run_json(dir, info)?;
    write_file(&dir.join(RESULTS_JSONL), &results_jsonl(results))?;
    write_file(&dir.join(JUNIT_XML), &junit_xml(info, results))?;
    write_file(&dir.join(SUMMARY_MD), &summary_md(info, results))?;
    let run = html::RunRef { dir, info, results };
    write_file(&dir.join(html::REPORT_HTML), &html::run_page(&[run]))?;
    Ok(())
}

/// Writes `run.json` (atomically).
pub fn write_run_json(dir: &Path, info: &RunInfo) -> std::io::Result<()> {
    let run = serde_json::to_string_pretty(info).map_err(std::io::Error::other)?;
    write_file(&dir.join(RUN_JSON), &(run + "\n"))
}

/// `results.jsonl` written as a run goes: each finished case is appended as
/// one line in one write and flushed to the operating system at once, so a
/// run killed at any moment leaves every case it finished (and at most one
/// torn last line, which [`read_partial_results`] drops).
#[derive(Debug)]
pub struct ResultsJournal {
    path: PathBuf,
    file: std::fs::File,
}

impl ResultsJournal {
    /// Starts `dir/results.jsonl` holding exactly `done` (atomically
    /// replacing whatever was there: a torn tail is gone), open for
    /// appending.
    pub fn start(dir: &Path, done: &[CaseResult]) -> std::io::Result<ResultsJournal> {
        let path = dir.join(RESULTS_JSONL);
        write_file(&path, &results_jsonl(done))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            })?;
        Ok(ResultsJournal { path, file })
    }

    /// Appends one result and flushes it.
    pub fn append(&mut self, r: &CaseResult) -> std::io::Result<()> {
        let mut line = result_to_json_line(r);
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("appending to {}: {e}", self.path.display()),
                )
            })
    }
}

/// The results of a run directory that may have been interrupted: every
/// line of `results.jsonl` that parses, in file order, and the number of
/// lines that did not (a line torn by a killed run; their cases are simply
/// not done). A missing file is no result.
pub fn read_partial_results(dir: &Path) -> Result<(Vec<CaseResult>, usize), ReportError> {
    let path = dir.join(RESULTS_JSONL);
    let text = match std::fs::read(&path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(ReportError::new(&path, None, e.to_string())),
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match result_from_json_line(line) {
            Ok(r) => out.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

/// Reads `run.json` of a run directory.
pub fn read_run_info(dir: &Path) -> Result<RunInfo, ReportError> {
    let run_path = dir.join(RUN_JSON);
    let text = std::fs::read_to_string(&run_path)
        .map_err(|e| ReportError::new(&run_path, None, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| {
        ReportError::new(
            &run_path,
            Some(e.line()),
            format!("not a run description: {e}"),
        )
    })
}

/// Reads `run.json` and `results.jsonl` of a run directory. Errors name the
/// file and, for `results.jsonl`, the line.
pub fn read_dir(dir: &Path) -> Result<(RunInfo, Vec<CaseResult>), ReportError> {
    let info = read_run_info(dir)?;
    let res_path = dir.join(RESULTS_JSONL);
    let text = std::fs::read_to_string(&res_path)
        .map_err(|e| ReportError::new(&res_path, None, e.to_string()))?;
    let mut results = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = result_from_json_line(line).map_err(|e| {
            ReportError::new(&res_path, Some(i + 1), format!("not a case result: {e}"))
        })?;
        results.push(r);
    }
    Ok((info, results))
}

/// The cases × backends Markdown matrix of several run directories (see
/// [`merge_runs`]).
pub fn merge(dirs: &[PathBuf]) -> Result<String, ReportError> {
    let mut runs = Vec::with_capacity(dirs.len());
    for d in dirs {
        let (info, results) = read_dir(d)?;
        runs.push((d.clone(), info, results));
    }
    Ok(merge_runs(&runs))
}

/// Checks the submission in `dir` against the ids of the `v3-mustpass`
/// profile (see [`verify_run`]).
pub fn verify(dir: &Path, mustpass_ids: &BTreeSet<String>) -> Result<VerifyReport, ReportError> {
    let (info, results) = read_dir(dir)?;
    Ok(verify_run(dir, &info, &results, mustpass_ids))
}

fn git(repo: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()
}

/// `(commit, dirty)` of the git work tree at `repo`: `git rev-parse HEAD`
/// and whether `git status --porcelain` lists anything (modified, staged or
/// untracked-and-not-ignored files). Each is `None` when git is missing or
/// `repo` is not in a git work tree.
pub fn git_state(repo: &Path) -> (Option<String>, Option<bool>) {
    let commit = git(repo, &["rev-parse", "--verify", "HEAD"])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()));
    let dirty = git(repo, &["status", "--porcelain", "--untracked-files=normal"])
        .map(|s| !s.trim().is_empty());
    (commit, dirty)
}

/// `deepport report merge DIR... [--out FILE]`.
#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    /// Run directories (each written by `deepport run --report DIR`).
    #[arg(value_name = "DIR", required = true)]
    pub dirs: Vec<PathBuf>,
    /// Write the Markdown matrix here instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `deepport verify DIR`.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The run directory of the submission (`deepport run --profile
    /// v3-mustpass --report DIR`).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs `deepport report merge`: exit status 0 when the matrix was written,
/// 2 when a run directory cannot be read, 1 when the output cannot be written.
pub fn merge_main(args: MergeArgs) -> ExitCode {
    let md = match merge(&args.dirs) {
        Ok(md) => md,
        Err(e) => {
            eprintln!("error: {e}");
            return exit(EXIT_USAGE);
        }
    };
    let written = match &args.out {
        Some(p) => write_file(p, &md),
        None => std::io::stdout().lock().write_all(md.as_bytes()),
    };
    match written {
        Ok(()) => {
            if let Some(p) = &args.out {
                eprintln!("wrote {} ({} run(s))", p.display(), args.dirs.len());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit(EXIT_FAILURE)
        }
    }
}

/// Runs `deepport verify`: prints the report; exit status 0 only when the
/// submission has no problem, 1 when it has, 2 when the run directory or the
/// catalogue cannot be read.
pub fn verify_main(args: VerifyArgs) -> ExitCode {
    let dir = super::catalogue::default_dir();
    let specs = match super::catalogue::load(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: reading the case catalogue {}: {e}", dir.display());
            return exit(EXIT_USAGE);
        }
    };
    let ids: BTreeSet<String> = super::catalogue::select(&specs, MUSTPASS_PROFILE, None)
        .into_iter()
        .map(|s| s.id)
        .collect();
    if ids.is_empty() {
        eprintln!(
            "error: the catalogue {} has no {MUSTPASS_PROFILE} case",
            dir.display()
        );
        return exit(EXIT_USAGE);
    }
    match verify(&args.dir, &ids) {
        Ok(report) => {
            print!("{report}");
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                exit(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit(EXIT_USAGE)
        }
    }
}
