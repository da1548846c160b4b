//! The suite's types: the contract between the judge, the op families,
//! the runner and the reports.
//!
//! Every layer of the conformance suite imports them from here, and this
//! module imports nothing of the crate, so dependencies point one way:
//! `types` ← [`crate::judge`] ← [`crate::cases`] ← [`crate::suite`]
//! (catalogue, exec, report). [`crate::suite`] re-exports them under their
//! old paths (`suite::CaseSpec`, …).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Version of the suite (catalogue + judge). Reports record it; `verify`
/// rejects reports from another version. Bump it whenever a case, a
/// tolerance or a metric changes meaning.
///
/// suite.3: the inputs' normal values come from the suite's own Box–Muller
/// arithmetic (`rng::box_muller`) instead of libm, so they are the same
/// bits on every machine; every generated input changed.
pub const SUITE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+suite.3");

/// The outcome of one case on one backend (Khronos CTS style).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Outcome {
    /// Every check within its pass threshold.
    Pass,
    /// Some check outside its pass threshold but inside its (looser)
    /// quality-warning threshold. Counts as conformant.
    QualityWarning,
    /// A check outside its warning threshold, wrong NaN/inf positions, an
    /// error from a backend that claimed support, a missing output.
    Fail,
    /// The backend says it does not implement the op. Never a pass.
    NotSupported,
    /// The case killed its process (signal, abort, panic across FFI).
    Crash,
    /// The case did not finish within its time limit.
    Timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Pass,
        Outcome::QualityWarning,
        Outcome::Fail,
        Outcome::NotSupported,
        Outcome::Crash,
        Outcome::Timeout,
    ];

    /// Label used in tables, JSON and JUnit (`Pass`, `QualityWarning`, …).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "Pass",
            Outcome::QualityWarning => "QualityWarning",
            Outcome::Fail => "Fail",
            Outcome::NotSupported => "NotSupported",
            Outcome::Crash => "Crash",
            Outcome::Timeout => "Timeout",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.label().eq_ignore_ascii_case(s))
    }

    /// Counts toward conformance (Pass or QualityWarning).
    pub fn is_conformant(self) -> bool {
        matches!(self, Outcome::Pass | Outcome::QualityWarning)
    }

    /// Makes `deepport run` exit non-zero (Fail, Crash, Timeout). Note that
    /// NotSupported does not fail a run, but does fail a `v3-mustpass` claim.
    pub fn fails_run(self) -> bool {
        matches!(self, Outcome::Fail | Outcome::Crash | Outcome::Timeout)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A metric a tolerance entry applies (see [`crate::judge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// DeepGEMM's `1 − 2Σxy/Σ(x²+y²)`.
    CalcDiff,
    /// Elementwise `|a−r| ≤ abs + rel·|r| + ulps·ulp(r) + rms_rel·rms(r)`;
    /// the value reported is the worst ratio of error to allowance.
    Elementwise,
    /// FlashMLA's `|a−r| < abs or |a−r|/(|r|+1e-6) < rel`.
    AbsOrRel,
    /// Normalized mean squared error `Σ(a−r)²/Σr²`.
    Nmse,
    /// Bit-exact bytes.
    Exact,
    /// Routing: set of expert ids per token equal (near-ties reported, not failed).
    SetEquality,
    /// Rows compared by a key (low-latency dispatch slots), each exactly.
    Keyed,
    /// Cosine similarity (whole-model statistics); value is `1 − cos`.
    Cosine,
    /// Fraction of rows whose argmax differs (whole-model statistics).
    Top1Mismatch,
}

/// One tolerance entry from a case file: a metric and its thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub metric: Metric,
    /// Pass when the metric value is ≤ this.
    pub pass: f64,
    /// QualityWarning when above `pass` but ≤ this (defaults to `pass`).
    pub warn: f64,
    /// Parameters of the metric (`abs`, `rel`, `ulps`, `rms_rel`, …).
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
    /// Why this threshold: where it comes from (SPEC section, DeepSeek's test).
    pub reason: String,
}

/// Where a case's inputs and expected outputs come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Inputs generated from the case's seed; judged against `cpu-ref`.
    Generated,
    /// Inputs and expected outputs from a golden file (`golden/ops/….safetensors`).
    Golden { path: String },
    /// The whole-model golden data (`golden/model`), in a numerics mode.
    Model { mode: String, check: String },
}

/// One expanded case of the catalogue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseSpec {
    /// Canonical id, e.g. `mla_decode(b=2,s_q=1,h_q=128,s_k=4096,causal=0)`.
    /// Filters, waivers and reports use it.
    pub id: String,
    /// Op family (the YAML file stem, e.g. `fp8_gemm`).
    pub family: String,
    /// Case parameters from the grid (dims, dtypes, flags), in id order.
    pub params: BTreeMap<String, serde_json::Value>,
    pub seed: u64,
    /// Profiles this case belongs to (`smoke`, `full`, `v3-mustpass`).
    pub profiles: BTreeSet<String>,
    /// Tolerances per output name (`d`, `out`, `lse`, …).
    pub tolerances: BTreeMap<String, Vec<Tolerance>>,
    pub source: Source,
    /// The YAML file and line the case came from (for error messages).
    pub origin: String,
}

/// The result of one case on one backend: one line of `results.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub id: String,
    pub backend: String,
    pub device: String,
    pub driver: String,
    pub outcome: Outcome,
    /// The deciding metric (the worst check), e.g. `out.calc_diff`.
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// Position of the worst element, where the metric has one.
    pub worst_index: Option<Vec<usize>>,
    pub seed: u64,
    pub duration_s: f64,
    /// Why (error text, failed check detail, waiver applied).
    pub message: String,
    /// Set when a waiver matched this case: its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiver: Option<String>,
}

/// Facts about a run, written to `run.json` and checked by `verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub suite_version: String,
    pub profile: String,
    pub backend: String,
    pub device: String,
    pub driver: String,
    pub vendor: String,
    /// `git rev-parse HEAD` of the deepport tree, if known.
    pub git_commit: Option<String>,
    /// Whether the tree had uncommitted changes (None when unknown).
    pub git_dirty: Option<bool>,
    pub started_utc: String,
    pub host: String,
    /// The command line that produced the run.
    pub command: String,
}
