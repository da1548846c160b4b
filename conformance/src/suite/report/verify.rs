//! `deepport verify`: checks a submission.
//!
//! A run directory is a conformant `v3-mustpass` submission when:
//! * it was produced by this suite version (`run.json`);
//! * the commit it was built from is recorded and the tree was clean;
//! * it ran the `v3-mustpass` profile;
//! * every `v3-mustpass` case is present exactly once, for the run's backend;
//! * every outcome is Pass or QualityWarning. A waived failure is still not
//!   conformant: it is listed as waived.

use super::MUSTPASS_PROFILE;
use crate::types::{CaseResult, Outcome, RunInfo, SUITE_VERSION};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a submission.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// `run.json` records another suite version.
    SuiteVersion { found: String, expected: String },
    /// No git commit recorded.
    CommitMissing,
    /// The tree had uncommitted changes (`Some(true)`) or its state is
    /// unknown (`None`).
    TreeNotClean(Option<bool>),
    /// The run used another profile.
    Profile { found: String },
    /// A `v3-mustpass` case is not in `results.jsonl`.
    Missing { id: String },
    /// A case appears more than once.
    Duplicate { id: String, count: usize },
    /// A result for another backend than the run's.
    ForeignBackend { id: String, backend: String },
    /// An outcome other than Pass or QualityWarning (`waiver`: the reason,
    /// when a waiver matched; it is still not conformant).
    NotConformant {
        id: String,
        outcome: Outcome,
        message: String,
        waiver: Option<String>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::SuiteVersion { found, expected } => write!(
                f,
                "suite version {found:?} differs from this suite's {expected:?}: rerun with this version"
            ),
            Problem::CommitMissing => f.write_str(
                "no git commit recorded: run from a git checkout of deepport so the build can be traced",
            ),
            Problem::TreeNotClean(Some(_)) => f.write_str(
                "the tree had uncommitted changes: commit them (or stash them) and rerun",
            ),
            Problem::TreeNotClean(None) => {
                f.write_str("the tree's clean state was not recorded (git_dirty is unknown)")
            }
            Problem::Profile { found } => write!(
                f,
                "profile {found:?} is not {MUSTPASS_PROFILE:?}: run with --profile {MUSTPASS_PROFILE}"
            ),
            Problem::Missing { id } => write!(f, "missing case {id}"),
            Problem::Duplicate { id, count } => write!(f, "case {id} present {count} times"),
            Problem::ForeignBackend { id, backend } => {
                write!(f, "case {id}: result for another backend, {backend:?}")
            }
            Problem::NotConformant {
                id,
                outcome,
                message,
                waiver,
            } => {
                write!(f, "case {id}: {outcome}")?;
                if let Some(w) = waiver {
                    write!(f, " (waived: {w}; a waived case is not conformant)")?;
                }
                if !message.is_empty() {
                    let first = message.lines().next().unwrap_or("");
                    write!(f, ": {first}")?;
                }
                Ok(())
            }
        }
    }
}

/// The result of `deepport verify`.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub info: RunInfo,
    /// Number of results in the submission.
    pub results: usize,
    /// Number of `v3-mustpass` cases checked for.
    pub mustpass: usize,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when the submission has no problem.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems of one kind, e.g. `|p| matches!(p, Problem::Missing { .. })`.
    pub fn count(&self, pred: impl Fn(&Problem) -> bool) -> usize {
        self.problems.iter().filter(|p| pred(p)).count()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "submission {}: {} on {} ({}), profile {}, suite {}, commit {}",
            self.dir.display(),
            self.info.backend,
            self.info.device,
            self.info.driver,
            self.info.profile,
            self.info.suite_version,
            self.info.git_commit.as_deref().unwrap_or("unknown")
        )?;
        if self.is_ok() {
            return writeln!(
                f,
                "OK: all {} {MUSTPASS_PROFILE} cases present once, every one Pass or QualityWarning",
                self.mustpass
            );
        }
        writeln!(
            f,
            "NOT CONFORMANT: {} problem(s) ({} results, {} {MUSTPASS_PROFILE} cases)",
            self.problems.len(),
            self.results,
            self.mustpass
        )?;
        let missing = self.count(|p| matches!(p, Problem::Missing { .. }));
        let duplicated = self.count(|p| matches!(p, Problem::Duplicate { .. }));
        let bad = self.count(|p| matches!(p, Problem::NotConformant { .. }));
        let waived =
            self.count(|p| matches!(p, Problem::NotConformant { waiver, .. } if waiver.is_some()));
        writeln!(
            f,
            "  ({missing} missing, {duplicated} duplicated, {bad} not Pass or QualityWarning \
             of which {waived} waived)"
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Checks the run `(info, results)` read from `dir` against the ids of the
/// `v3-mustpass` profile.
pub fn verify_run(
    dir: &Path,
    info: &RunInfo,
    results: &[CaseResult],
    mustpass_ids: &BTreeSet<String>,
) -> VerifyReport {
    let mut problems = Vec::new();
    if info.suite_version != SUITE_VERSION {
        problems.push(Problem::SuiteVersion {
            found: info.suite_version.clone(),
            expected: SUITE_VERSION.to_string(),
        });
    }
    if info
        .git_commit
        .as_deref()
        .is_none_or(|c| c.trim().is_empty())
    {
        problems.push(Problem::CommitMissing);
    }
    if info.git_dirty != Some(false) {
        problems.push(Problem::TreeNotClean(info.git_dirty));
    }
    if info.profile != MUSTPASS_PROFILE {
        problems.push(Problem::Profile {
            found: info.profile.clone(),
        });
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results {
        *seen.entry(r.id.as_str()).or_insert(0) += 1;
    }
    for id in mustpass_ids {
        if !seen.contains_key(id.as_str()) {
            problems.push(Problem::Missing { id: id.clone() });
        }
    }
    for (id, &count) in &seen {
        if count > 1 {
            problems.push(Problem::Duplicate {
                id: id.to_string(),
                count,
            });
        }
    }
    for r in results {
        if r.backend != info.backend {
            problems.push(Problem::ForeignBackend {
                id: r.id.clone(),
                backend: r.backend.clone(),
            });
        }
        if !r.outcome.is_conformant() {
            problems.push(Problem::NotConformant {
                id: r.id.clone(),
                outcome: r.outcome,
                message: r.message.clone(),
                waiver: r.waiver.clone(),
            });
        }
    }
    VerifyReport {
        dir: dir.to_path_buf(),
        info: info.clone(),
        results: results.len(),
        mustpass: mustpass_ids.len(),
        problems,
    }
}
