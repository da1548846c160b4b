//! What `deepport run` prints: the progress line on standard error, one
//! table per op family, the notices and the summary lines.

use crate::suite::report::fmt_value;
use crate::types::{CaseResult, Outcome};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Seconds with three significant-ish digits (`0.012`, `1.25`, `312`).
pub fn fmt_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}")
    } else if s < 100.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.0}")
    }
}

/// The progress line on standard error: redrawn in place on a terminal;
/// otherwise one line at every 5% or every 10 s.
pub struct Progress {
    total: usize,
    done: usize,
    bad: usize,
    start: Instant,
    last_line: Instant,
    last_step: usize,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            bad: 0,
            start: now,
            last_line: now,
            last_step: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Counts one finished case and redraws or prints as due.
    pub fn update(&mut self, r: &CaseResult) {
        self.done += 1;
        if !r.outcome.is_conformant() && r.outcome != Outcome::NotSupported {
            self.bad += 1;
        }
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        if self.tty {
            const W: usize = 24;
            let filled = (self.done * W).checked_div(self.total).unwrap_or(W).min(W);
            let id: String = r.id.chars().take(40).collect();
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}/{} {} {}s  {}: {} {}",
                "#".repeat(filled),
                " ".repeat(W - filled),
                self.done,
                self.total,
                self.bad_text(),
                fmt_secs(self.start.elapsed().as_secs_f64()),
                r.backend,
                id,
                r.outcome
            );
            let _ = err.flush();
        } else {
            let step = pct / 5;
            let due = step > self.last_step
                || self.last_line.elapsed() >= Duration::from_secs(10)
                || self.done == self.total;
            if due {
                self.last_step = step;
                self.last_line = Instant::now();
                let _ = writeln!(
                    err,
                    "progress: {}/{} ({pct}%){} {}s",
                    self.done,
                    self.total,
                    self.bad_text(),
                    fmt_secs(self.start.elapsed().as_secs_f64())
                );
            }
        }
    }

    fn bad_text(&self) -> String {
        if self.bad == 0 {
            String::new()
        } else {
            format!(" {} failing,", self.bad)
        }
    }

    /// Clears the in-place line.
    pub fn finish(&mut self) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// The outcome column: the label, and `(waived)` when a waiver applied.
fn outcome_text(r: &CaseResult) -> String {
    if r.waiver.is_some() {
        format!("{} (waived)", r.outcome)
    } else {
        r.outcome.to_string()
    }
}

/// One table per op family (in order of first appearance), each row a
/// case: id, outcome, metric, value, threshold, duration; anything but a
/// pass gets an indented line saying why.
pub fn tables(results: &[CaseResult], family_of: &BTreeMap<&str, &str>) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut by_family: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        let fam = family_of
            .get(r.id.as_str())
            .copied()
            .unwrap_or_else(|| crate::suite::report::family_of(&r.id));
        if !by_family.contains_key(fam) {
            order.push(fam);
        }
        by_family.entry(fam).or_default().push(r);
    }
    let mut s = String::new();
    for fam in order {
        let rows = &by_family[fam];
        let backend = rows.first().map_or("", |r| r.backend.as_str());
        let idw = rows.iter().map(|r| r.id.len()).max().unwrap_or(4).max(4);
        let ow = rows
            .iter()
            .map(|r| outcome_text(r).len())
            .max()
            .unwrap_or(7)
            .max(7);
        let mw = rows
            .iter()
            .map(|r| r.metric.as_deref().map_or(1, str::len))
            .max()
            .unwrap_or(6)
            .max(6);
        let counts = Counts::of_refs(rows);
        let _ = writeln!(
            s,
            "\n== {fam} on {backend}: {} case(s), {} ==",
            rows.len(),
            counts.brief()
        );
        let _ = writeln!(
            s,
            "{:<idw$}  {:<ow$}  {:<mw$}  {:>10}  {:>10}  {:>9}",
            "CASE", "OUTCOME", "METRIC", "VALUE", "THRESHOLD", "TIME"
        );
        for r in rows {
            let _ = writeln!(
                s,
                "{:<idw$}  {:<ow$}  {:<mw$}  {:>10}  {:>10}  {:>8}s",
                r.id,
                outcome_text(r),
                r.metric.as_deref().unwrap_or("-"),
                r.value.map_or("-".into(), fmt_value),
                r.threshold.map_or("-".into(), fmt_value),
                fmt_secs(r.duration_s),
            );
            if r.outcome != Outcome::Pass || !r.message.is_empty() {
                let mut why = r.message.clone();
                if let Some(w) = &r.worst_index {
                    if !why.contains(&format!("{w:?}")) {
                        let _ = write!(why, " (worst at {w:?})");
                    }
                }
                if let Some(w) = &r.waiver {
                    let _ = write!(why, " [waived: {w}]");
                }
                let why = why.trim();
                if !why.is_empty() {
                    let _ = writeln!(s, "    -> {why}");
                }
            }
        }
    }
    s
}

/// Outcome counts of a set of results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pass: usize,
    pub quality_warning: usize,
    pub fail: usize,
    pub not_supported: usize,
    pub crash: usize,
    pub timeout: usize,
    /// Non-conformant results a waiver covers.
    pub waived: usize,
    /// Conformant results a waiver expected to fail (each fails the run).
    pub unneeded: usize,
    /// Fail, Crash or Timeout without a waiver.
    pub failing: usize,
}

impl Counts {
    pub fn of(results: &[CaseResult]) -> Counts {
        Counts::of_refs(&results.iter().collect::<Vec<_>>())
    }

    pub fn of_refs(results: &[&CaseResult]) -> Counts {
        let mut c = Counts::default();
        for r in results {
            match r.outcome {
                Outcome::Pass => c.pass += 1,
                Outcome::QualityWarning => c.quality_warning += 1,
                Outcome::Fail => c.fail += 1,
                Outcome::NotSupported => c.not_supported += 1,
                Outcome::Crash => c.crash += 1,
                Outcome::Timeout => c.timeout += 1,
            }
            if r.waiver.is_some() {
                c.waived += 1;
            } else if r.outcome.fails_run() {
                c.failing += 1;
            }
            if r.outcome.is_conformant() && r.message.contains("waiver no longer needed") {
                c.unneeded += 1;
            }
        }
        c
    }

    /// Whether these results alone let the run succeed.
    pub fn run_ok(&self) -> bool {
        self.failing == 0 && self.unneeded == 0
    }

    /// `run: N passed, N quality warnings, N failed, N not supported, N
    /// crashed, N timed out` (raw outcome counts).
    pub fn run_line(&self, label: &str) -> String {
        let mut s = format!(
            "{label}: {} passed, {} quality warnings, {} failed, {} not supported, {} crashed, {} timed out",
            self.pass, self.quality_warning, self.fail, self.not_supported, self.crash, self.timeout
        );
        if self.waived > 0 {
            let _ = write!(s, " ({} waived)", self.waived);
        }
        s
    }

    /// The machine-readable closing line `label: N passed, N failed, N
    /// skipped`: passed = conformant (less unneeded waivers), failed =
    /// unwaived Fail/Crash/Timeout plus unneeded waivers, skipped =
    /// NotSupported and waived results.
    pub fn closing_line(&self, label: &str) -> String {
        let conformant = self.pass + self.quality_warning - self.unneeded;
        let failed = self.failing + self.unneeded;
        let skipped = self.pass
            + self.quality_warning
            + self.fail
            + self.not_supported
            + self.crash
            + self.timeout
            - conformant
            - failed;
        format!("{label}: {conformant} passed, {failed} failed, {skipped} skipped")
    }

    /// Short counts for a table heading.
    pub fn brief(&self) -> String {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.pass, "Pass"),
            (self.quality_warning, "QualityWarning"),
            (self.fail, "Fail"),
            (self.not_supported, "NotSupported"),
            (self.crash, "Crash"),
            (self.timeout, "Timeout"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        parts.join(", ")
    }

    /// Prominent notices: NotSupported cases (never a pass, listed) and
    /// waived ones.
    pub fn notices(&self, backend: &str, results: &[CaseResult]) -> String {
        let mut s = String::new();
        if self.not_supported > 0 {
            let _ = writeln!(
                s,
                "\n!! {backend}: {} case(s) NOT SUPPORTED: never a pass; they do not fail this run, but they do fail a v3-mustpass claim:",
                self.not_supported
            );
            list_some(
                &mut s,
                results
                    .iter()
                    .filter(|r| r.outcome == Outcome::NotSupported),
            );
        }
        if self.waived > 0 {
            let _ = writeln!(
                s,
                "\n!! {backend}: {} non-conformant case(s) waived:",
                self.waived
            );
            for r in results.iter().filter(|r| r.waiver.is_some()).take(10) {
                let _ = writeln!(
                    s,
                    "  {} {} (waiver: {})",
                    r.outcome,
                    r.id,
                    r.waiver.as_deref().unwrap_or_default()
                );
            }
            if self.waived > 10 {
                let _ = writeln!(s, "  ... and {} more", self.waived - 10);
            }
        }
        s
    }
}

/// Lists up to ten results as `  Outcome id`.
fn list_some<'a>(s: &mut String, rs: impl Iterator<Item = &'a CaseResult>) {
    let rs: Vec<&CaseResult> = rs.collect();
    for r in rs.iter().take(10) {
        let _ = writeln!(s, "  {} {}", r.outcome, r.id);
    }
    if rs.len() > 10 {
        let _ = writeln!(s, "  ... and {} more", rs.len() - 10);
    }
}

/// Whether `backend` may claim DeepSeek-V3 conformance from a
/// `v3-mustpass` run: every case Pass or QualityWarning, and the whole
/// profile run (no filter).
pub fn v3_claim(backend: &str, results: &[CaseResult], filtered: bool) -> String {
    let bad: Vec<&CaseResult> = results
        .iter()
        .filter(|r| !r.outcome.is_conformant())
        .collect();
    if filtered {
        return format!(
            "\nV3 conformance: {backend} may NOT claim DeepSeek-V3 conformance from this run: \
             it was filtered (run the whole v3-mustpass profile)\n"
        );
    }
    if bad.is_empty() {
        return format!(
            "\nV3 conformance: {backend} MAY claim DeepSeek-V3 conformance: all {} v3-mustpass case(s) are Pass or QualityWarning\n",
            results.len()
        );
    }
    let c = Counts::of_refs(&bad);
    let mut s = format!(
        "\nV3 conformance: {backend} may NOT claim DeepSeek-V3 conformance: {} of {} v3-mustpass case(s) are not Pass or QualityWarning ({})\n",
        bad.len(),
        results.len(),
        c.brief()
    );
    list_some(&mut s, bad.into_iter());
    s
}
