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
use crate::types::{CaseResult, CaseSpec, Outcome};
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

/// The matrix as text: one row per mutant (in the order of the first
/// column), for each column (a profile, all dtypes or bf16-only) the number
/// of catching cases (Fail), the QualityWarnings and the cases run, against
/// the minimum the column requires; `!` marks a cell under it.
pub fn render(runs: &[Vec<MutantRun>], minimum: &[usize]) -> String {
    let mut s = String::new();
    let Some(first) = runs.first() else {
        return s;
    };
    let name_w = LIBRARY
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(10)
        .max(6);
    let title = |r: &MutantRun, min: usize| {
        format!(
            "{}{} (≥{min})",
            r.profile,
            if r.bf16_only { ", bf16-only" } else { "" }
        )
    };
    s.push_str(&format!("{:name_w$}", "mutant"));
    for (col, &min) in runs.iter().zip(minimum) {
        if let Some(r) = col.first() {
            s.push_str(&format!("  {:>30}", title(r, min)));
        }
    }
    s.push('\n');
    for (i, row) in first.iter().enumerate() {
        s.push_str(&format!("{:name_w$}", row.mutant));
        for (col, &min) in runs.iter().zip(minimum) {
            if let Some(r) = col.get(i) {
                let cell = format!(
                    "{}{} fail, {} warn / {} run",
                    if r.caught() < min { "! " } else { "" },
                    r.caught(),
                    r.count(Outcome::QualityWarning),
                    r.results.len()
                );
                s.push_str(&format!("  {cell:>30}"));
            }
        }
        s.push('\n');
    }
    for (col, &min) in runs.iter().zip(minimum) {
        if let Some(r) = col.first() {
            let weakest = col.iter().map(MutantRun::caught).min().unwrap_or(0);
            let under = col.iter().filter(|r| r.caught() < min).count();
            s.push_str(&format!(
                "{}: {} mutants, {} case(s) in the profile; weakest caught by {weakest}; {under} under {min}\n",
                title(r, min),
                col.len(),
                r.profile_cases,
            ));
        }
    }
    s
}

/// `deepport mutants`.
#[derive(clap::Args, Debug, Clone)]
pub struct MutantsArgs {
    /// Profile to run against every mutant (a column of the matrix);
    /// repeat for several. Default: smoke.
    #[arg(long, short, value_name = "PROFILE",
          value_parser = clap::builder::PossibleValuesParser::new(crate::suite::catalogue::PROFILES))]
    pub profile: Vec<String>,
    /// Run as a bf16-only device would: cases asking for f32 or f16
    /// activations are left out or NotSupported.
    #[arg(long)]
    pub bf16_only: bool,
    /// Only these mutants (see the list with `--list`); repeat for several.
    #[arg(long, short, value_name = "NAME")]
    pub mutant: Vec<String>,
    /// Failing cases each mutant needs (default: 2 for smoke, 3 otherwise).
    #[arg(long, value_name = "N")]
    pub min: Option<usize>,
    /// Cases to run at once.
    #[arg(long, short, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    /// Leave out the whole-model cases (family `model`): each mutant then
    /// runs only its op families' cases, which is much faster.
    #[arg(long)]
    pub skip_model: bool,
    /// Print every mutant with the failure it stands for, and exit.
    #[arg(long)]
    pub list: bool,
    /// Print every case run on each mutant: outcome, deciding metric and value.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `deepport mutants`: the mutant × profile matrix; exits 1 when a mutant
/// is caught by fewer failing cases than its column requires.
pub fn mutants_main(args: MutantsArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    if args.list {
        for m in LIBRARY {
            println!("{:32} {}", m.name, m.failure);
        }
        return ExitCode::SUCCESS;
    }
    let chosen: Vec<&MutantInfo> = if args.mutant.is_empty() {
        LIBRARY.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in &args.mutant {
            match super::find(n) {
                Some(m) => v.push(m),
                None => {
                    eprintln!("error: no mutant named `{n}` (see `deepport mutants --list`)");
                    return ExitCode::from(2);
                }
            }
        }
        v
    };
    let all = match crate::suite::catalogue::load(&crate::suite::catalogue::default_dir()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let profiles = if args.profile.is_empty() {
        vec!["smoke".to_string()]
    } else {
        args.profile.clone()
    };
    let cache = RefCache::from_env();
    let mut cols = Vec::new();
    let mut mins = Vec::new();
    for p in &profiles {
        let specs: Vec<CaseSpec> = crate::suite::catalogue::select(&all, p, None)
            .into_iter()
            .filter(|s| !(args.skip_model && s.family == "model"))
            .collect();
        let t0 = std::time::Instant::now();
        let col: Vec<MutantRun> = chosen
            .iter()
            .map(|m| {
                let r = run_mutant(m, p, &specs, args.bf16_only, &cache, usize::from(args.jobs));
                eprintln!(
                    "{p}: {} caught by {} of {} case(s) run",
                    m.name,
                    r.caught(),
                    r.results.len()
                );
                r
            })
            .collect();
        eprintln!("{p}: {:.1} s", t0.elapsed().as_secs_f64());
        mins.push(args.min.unwrap_or(if p == "smoke" { 2 } else { 3 }));
        cols.push(col);
    }
    print!("{}", render(&cols, &mins));
    if args.verbose {
        for col in &cols {
            for r in col {
                println!("{} on {}:", r.mutant, r.profile);
                for c in &r.results {
                    println!(
                        "  {:14} {}  {} = {} (pass ≤ {})",
                        c.outcome.label(),
                        c.id,
                        c.metric.as_deref().unwrap_or("-"),
                        c.value.map_or("-".into(), |v| format!("{v:.3e}")),
                        c.threshold.map_or("-".into(), |v| format!("{v:.3e}")),
                    );
                }
            }
        }
    }
    let ok = cols
        .iter()
        .zip(&mins)
        .all(|(c, &min)| c.iter().all(|r| r.caught() >= min));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
