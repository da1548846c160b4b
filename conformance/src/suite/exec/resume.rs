//! `deepport run --resume DIR`: what a run is (its [`RunPlan`], kept in
//! `DIR/resume.json`), and how a killed run is picked up again.
//!
//! A run with `--report DIR` writes `resume.json` and each backend's
//! `run.json` before its first case, then appends every finished case to
//! `results.jsonl` ([`crate::suite::report::ResultsJournal`]). To resume,
//! the plan is read back (what the command line gives must agree with it),
//! each backend must be the same device and driver as its `run.json` says,
//! the results already there are kept ([`load_done`]; a torn last line is
//! dropped and its case run again) and only the other cases run. The
//! reports are then written from all of them, in catalogue order, exactly
//! as an uninterrupted run writes them.

use super::RunArgs;
use crate::suite::report::{read_partial_results, ReportError};
use crate::types::{CaseResult, CaseSpec, RunInfo, SUITE_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The plan file of a report directory.
pub const RESUME_JSON: &str = "resume.json";

/// What a run does: the selection and the options that change verdicts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    pub suite_version: String,
    pub profile: String,
    pub filters: Vec<String>,
    /// Backend names, each once, in command-line order.
    pub backends: Vec<String>,
    /// `--cases`, when given.
    pub cases: Option<PathBuf>,
    /// `--waivers`, when given.
    pub waivers: Option<PathBuf>,
    pub isolate: bool,
    pub timeout_s: f64,
    pub no_refcache: bool,
}

/// The default backend of `deepport run`.
pub const DEFAULT_BACKEND: &str = "cpu";
/// The default profile of `deepport run`.
pub const DEFAULT_PROFILE: &str = "smoke";

fn dedup(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

impl RunPlan {
    /// The plan of a new run from its command line (defaults filled in).
    pub fn from_args(args: &RunArgs) -> RunPlan {
        RunPlan {
            suite_version: SUITE_VERSION.to_string(),
            profile: args
                .profile
                .clone()
                .unwrap_or_else(|| DEFAULT_PROFILE.into()),
            filters: args.filter.clone(),
            backends: if args.backend.is_empty() {
                vec![DEFAULT_BACKEND.to_string()]
            } else {
                dedup(&args.backend)
            },
            cases: args.cases.clone(),
            waivers: args.waivers.clone(),
            isolate: args.isolate,
            timeout_s: args.timeout.unwrap_or(super::DEFAULT_TIMEOUT_S),
            no_refcache: args.no_refcache,
        }
    }

    /// Reads `dir/resume.json`.
    pub fn read(dir: &Path) -> Result<RunPlan, String> {
        let path = dir.join(RESUME_JSON);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{} holds no run to resume ({}: {e}); only a run started with --report can be resumed",
                dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| format!("{}: not a run plan: {e}", path.display()))
    }

    /// Writes `dir/resume.json` (atomically).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)? + "\n";
        crate::suite::report::write_atomic(&dir.join(RESUME_JSON), text.as_bytes())
    }

    /// The plan of a resumed run: this stored plan, checked against the
    /// suite version of this program and against whatever the resuming
    /// command line gives (each must equal the stored value). `--isolate`
    /// and `--no-refcache` may be added: they do not change verdicts of
    /// cases that finish.
    pub fn resumed(mut self, args: &RunArgs) -> Result<RunPlan, String> {
        let differs = |what: &str, stored: String, given: String| {
            format!(
                "cannot resume: the run was started with {what} {stored}, not {given} \
                 (leave it out to use the run's own, or start a new run)"
            )
        };
        if self.suite_version != SUITE_VERSION {
            return Err(format!(
                "cannot resume: the run was started by suite version {}, and this is {SUITE_VERSION}; \
                 its cases may not mean the same: start a new run",
                self.suite_version
            ));
        }
        if !args.backend.is_empty() && dedup(&args.backend) != self.backends {
            return Err(differs(
                "--backend",
                self.backends.join(","),
                dedup(&args.backend).join(","),
            ));
        }
        if let Some(p) = args.profile.as_ref().filter(|p| **p != self.profile) {
            return Err(differs("--profile", self.profile.clone(), p.clone()));
        }
        if !args.filter.is_empty() && args.filter != self.filters {
            return Err(differs(
                "--filter",
                format!("{:?}", self.filters),
                format!("{:?}", args.filter),
            ));
        }
        let path_differs =
            |what: &str, stored: &Option<PathBuf>, given: &Option<PathBuf>| match (stored, given) {
                (_, None) => Ok(()),
                (Some(s), Some(g)) if s == g => Ok(()),
                (s, Some(g)) => Err(differs(
                    what,
                    s.as_ref()
                        .map_or("the default".into(), |p| p.display().to_string()),
                    g.display().to_string(),
                )),
            };
        path_differs("--cases", &self.cases, &args.cases)?;
        path_differs("--waivers", &self.waivers, &args.waivers)?;
        if let Some(t) = args.timeout.filter(|t| *t != self.timeout_s) {
            return Err(differs(
                "--timeout",
                self.timeout_s.to_string(),
                t.to_string(),
            ));
        }
        self.isolate |= args.isolate;
        self.no_refcache |= args.no_refcache;
        Ok(self)
    }
}

/// The file, in each backend's run directory, listing the id of every case
/// as it starts.
pub const STARTED_FILE: &str = ".deepport-started";

/// Opens the started-cases file of a run directory for appending
/// (emptied first for a new run).
pub fn open_started(dir: &Path, fresh: bool) -> std::io::Result<std::fs::File> {
    let path = dir.join(STARTED_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|f| {
            if fresh {
                f.set_len(0)?;
            }
            Ok(f)
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The ids of the cases a run directory says were started.
pub fn read_started(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read(dir.join(STARTED_FILE))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that a backend about to resume a run is what the run's
/// `run.json` recorded: same suite version, profile, backend, device and
/// driver.
pub fn check_same(stored: &RunInfo, now: &RunInfo) -> Result<(), String> {
    for (what, a, b) in [
        ("suite version", &stored.suite_version, &now.suite_version),
        ("profile", &stored.profile, &now.profile),
        ("backend", &stored.backend, &now.backend),
        ("device", &stored.device, &now.device),
        ("driver", &stored.driver, &now.driver),
    ] {
        if a != b {
            return Err(format!(
                "cannot resume: the run of backend `{}` was on {what} `{a}`, this one is on `{b}`; \
                 resume on the same machine and driver, or start a new run",
                stored.backend
            ));
        }
    }
    Ok(())
}

/// Removes what applying waivers added to a result (its waiver, and the
/// "waiver no longer needed" notes), so that a finished run's results can
/// be judged against the waivers again.
pub fn unwaive(r: &mut CaseResult) {
    r.waiver = None;
    if let Some(i) = r.message.find("waiver no longer needed: ") {
        r.message.truncate(i);
        let kept = r.message.trim_end().trim_end_matches(';').trim_end().len();
        r.message.truncate(kept);
    }
}

/// The results a run directory already holds for `backend`, by case id,
/// for the cases of `specs` only (the last line of a case wins), unwaived;
/// and how many lines were unreadable (torn by a kill).
pub fn load_done(
    dir: &Path,
    backend: &str,
    specs: &[CaseSpec],
) -> Result<(BTreeMap<String, CaseResult>, usize), ReportError> {
    let (all, bad) = read_partial_results(dir)?;
    let wanted: std::collections::BTreeSet<&str> = specs.iter().map(|s| s.id.as_str()).collect();
    let mut done = BTreeMap::new();
    for mut r in all {
        if r.backend == backend && wanted.contains(r.id.as_str()) {
            unwaive(&mut r);
            done.insert(r.id.clone(), r);
        }
    }
    Ok((done, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Outcome;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(a: &[&str]) -> RunArgs {
        Cli::parse_from(std::iter::once("run").chain(a.iter().copied())).run
    }

    #[test]
    fn a_resume_must_agree_with_the_stored_plan() {
        let plan = RunPlan::from_args(&args(&[
            "--backend",
            "cpu",
            "--backend",
            "cpu",
            "--filter",
            "add",
            "--timeout",
            "30",
        ]));
        assert_eq!(plan.backends, ["cpu"]);
        assert_eq!(plan.profile, "smoke");
        assert_eq!(plan.timeout_s, 30.0);
        // Nothing given: the stored plan.
        assert_eq!(plan.clone().resumed(&args(&[])).unwrap(), plan);
        // The same values given: fine; --isolate may be added.
        let r = plan
            .clone()
            .resumed(&args(&["--backend", "cpu", "--isolate", "--filter", "add"]))
            .unwrap();
        assert!(r.isolate);
        for (bad, what) in [
            (vec!["--backend", "cpu-ref"], "--backend"),
            (vec!["--profile", "full"], "--profile"),
            (vec!["--filter", "rope"], "--filter"),
            (vec!["--timeout", "31"], "--timeout"),
            (vec!["--cases", "/elsewhere"], "--cases"),
        ] {
            let e = plan.clone().resumed(&args(&bad)).unwrap_err();
            assert!(e.contains(what), "{bad:?}: {e}");
        }
        let mut old = plan.clone();
        old.suite_version = "0.0.1+suite.0".into();
        let e = old.resumed(&args(&[])).unwrap_err();
        assert!(e.contains("0.0.1+suite.0"), "{e}");
    }

    #[test]
    fn unwaive_undoes_what_waivers_add() {
        let mut r = CaseResult {
            id: "add(rows=1)".into(),
            backend: "cpu".into(),
            device: "d".into(),
            driver: "v".into(),
            outcome: Outcome::Pass,
            metric: None,
            value: None,
            threshold: None,
            worst_index: None,
            seed: 1,
            duration_s: 0.1,
            message: "close call; waiver no longer needed: add(rows=1) on cpu is Pass".into(),
            waiver: Some("known bug".into()),
        };
        unwaive(&mut r);
        assert_eq!(r.message, "close call");
        assert_eq!(r.waiver, None);
        r.message = "waiver no longer needed: x".into();
        unwaive(&mut r);
        assert_eq!(r.message, "");
        r.message = "plain".into();
        unwaive(&mut r);
        assert_eq!(r.message, "plain");
    }
}
