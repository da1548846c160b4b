//! Runs a profile against each mutant of the library and tabulates how
//! many cases catch it: the mutant × profile matrix.
//!
//! A mutant changes only its own ops, so only the cases that exercise one
//! of them ([`crate::cases::ops_of`]) are run; every other case runs
//! nothing but `cpu-ref` and passes by construction (the reference is
//! conformant against itself, a test of `exec`). Leaving them out can only
//! undercount catches.

use super::{MutantInfo, Semantic, LIBRARY};
use crate::cases;
use crate::suite::exec::{run_spec, RefCache, Reference};
use crate::suite::{CaseResult, CaseSpec, Outcome};
use deepport_core::backend::DeviceInfo;
use deepport_core::ops::OpKind;
use deepport_cpu::CpuRef;
use serde_json::Value;

/// Whether a case runs on a bf16-only device: no parameter asks for f32
/// or f16 activations (dtypes, output dtypes, the f32 model mode). Golden
/// cases whose files hold f32 tensors are refused by the device itself
/// ([`super::bf16_only_supports`]) and come out NotSupported.
pub fn bf16_case(spec: &CaseSpec) -> bool {
    !spec
        .params
        .values()
        .any(|v| matches!(v, Value::String(s) if s == "f32" || s == "f16"))
}

/// Whether `spec` exercises one of `ops`.
pub fn touches(spec: &CaseSpec, ops: &[OpKind]) -> bool {
    cases::ops_of(spec).iter().any(|o| ops.contains(o))
}

/// One mutant run on one profile.
#[derive(Clone, Debug)]
pub struct MutantRun {
    pub mutant: &'static str,
    pub profile: String,
    pub bf16_only: bool,
    /// Results of the cases that exercise the mutant's ops.
    pub results: Vec<CaseResult>,
    /// Cases of the profile (after the dtype restriction) in all.
    pub profile_cases: usize,
}

impl MutantRun {
    pub fn count(&self, o: Outcome) -> usize {
        self.results.iter().filter(|r| r.outcome == o).count()
    }
    /// Cases that catch the mutant: outcome Fail (or Crash/Timeout).
    pub fn caught(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome.fails_run())
            .count()
    }
    /// The ids of the catching cases.
    pub fn catchers(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|r| r.outcome.fails_run())
            .map(|r| r.id.as_str())
            .collect()
    }
}

/// Runs `backend` on the cases of `specs` that exercise `ops` (and, with
/// `bf16_only`, run on a bf16-only device), `jobs` at a time, in order.
pub fn run_cases(
    backend: &Semantic,
    ops: &[OpKind],
    specs: &[CaseSpec],
    cache: &RefCache,
    jobs: usize,
) -> Vec<CaseResult> {
    let todo: Vec<&CaseSpec> = specs
        .iter()
        .filter(|s| touches(s, ops) && (!backend.bf16_only || bf16_case(s)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<CaseResult>> = vec![None; todo.len()];
    let slots = std::sync::Mutex::new(&mut out);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, todo.len().max(1)) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(spec) = todo.get(k) else { break };
                let r = run_spec(
                    spec,
                    backend,
                    &DeviceInfo::default(),
                    Reference {
                        backend: &CpuRef,
                        cache,
                    },
                );
                slots.lock().unwrap_or_else(|e| e.into_inner())[k] = Some(r);
            });
        }
    });
    out.into_iter().flatten().collect()
}

/// Runs `specs` (one profile's cases) against `mutant`.
pub fn run_mutant(
    mutant: &MutantInfo,
    profile: &str,
    specs: &[CaseSpec],
    bf16_only: bool,
    cache: &RefCache,
    jobs: usize,
) -> MutantRun {
    let b = Semantic::new(mutant.bug, bf16_only);
    MutantRun {
        mutant: mutant.name,
        profile: profile.to_string(),
        bf16_only,
        results: run_cases(&b, mutant.ops, specs, cache, jobs),
        profile_cases: specs.iter().filter(|s| !bf16_only || bf16_case(s)).count(),
    }
}

/// The matrix as text: one row per mutant, for each run column the number
/// of catching cases (Fail), the QualityWarnings and the cases run, plus
/// the minimum each column requires; `!` marks a cell under it.
pub fn render(runs: &[Vec<MutantRun>], minimum: &[usize]) -> String {
    let mut s = String::new();
    let name_w = LIBRARY
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(10)
        .max(6);
    s.push_str(&format!("{:name_w$}", "mutant"));
    for (col, min) in runs.iter().zip(minimum) {
        if let Some(r) = col.first() {
            let title = format!(
                "{}{} (≥{min})",
                r.profile,
                if r.bf16_only { ", bf16-only" } else { "" }
            );
            s.push_str(&format!("  {title:>28}"));
        }
    }
    s.push_str("\n");
    for (i, m) in LIBRARY.iter().enumerate() {
        s.push_str(&format!("{:name_w$}", m.name));
        for (col, &min) in runs.iter().zip(minimum) {
            if let Some(r) = col.get(i) {
                let cell = format!(
                    "{}{} fail, {} warn / {} run",
                    if r.caught() < min { "! " } else { "" },
                    r.caught(),
                    r.count(Outcome::QualityWarning),
                    r.results.len()
                );
                s.push_str(&format!("  {cell:>28}"));
            }
        }
        s.push('\n');
    }
    for (col, &min) in runs.iter().zip(minimum) {
        if let Some(r) = col.first() {
            let weakest = col.iter().map(MutantRun::caught).min().unwrap_or(0);
            let under = col.iter().filter(|r| r.caught() < min).count();
            s.push_str(&format!(
                "{}{}: {} mutants, {} case(s) in the profile; weakest caught by {}; {} under {min}\n",
                r.profile,
                if r.bf16_only { " (bf16-only device)" } else { "" },
                col.len(),
                r.profile_cases,
                weakest,
                under
            ));
        }
    }
    s
}
