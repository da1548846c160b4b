//! The conformance suite: catalogue, execution, judgement and reports.
//!
//! The pieces and who owns them:
//! * [`catalogue`] — `conformance/cases/*.yaml` parsed into [`CaseSpec`]s
//!   (grids expanded, canonical ids, tolerances, profiles) and turned into
//!   runnable [`crate::cases::Case`]s by the op-family builders;
//! * [`exec`] — runs cases on backends (in process or `--isolate`d in a
//!   child process under a timeout), poisons outputs, caches reference
//!   results on disk, applies waivers, and classifies [`Outcome`]s;
//! * [`report`] — `results.jsonl`, `junit.xml`, `summary.md`, `run.json`,
//!   `deepport report merge` and `deepport verify`.
//!
//! The types they share (outcomes, tolerances, case specs, results) live in
//! [`crate::types`] and are re-exported here.

pub mod catalogue;
pub mod exec;
pub mod report;
pub mod waivers;

pub use crate::types::*;
