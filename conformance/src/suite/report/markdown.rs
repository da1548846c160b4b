//! Markdown: a run's `summary.md` and the merged cases × backends matrix.

use super::{family_of, fmt_value};
use crate::types::{CaseResult, Outcome, RunInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::PathBuf;

/// Escapes text for one Markdown table cell: `|` and backslashes escaped,
/// line breaks as `<br>`, `<`, `>` and `&` as entities (so that messages
/// cannot open HTML tags).
pub fn cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '|' => out.push_str("\\|"),
            '\\' => out.push_str("\\\\"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' => out.push_str("\\`"),
            '*' => out.push_str("\\*"),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("<br>");
            }
            '\n' => out.push_str("<br>"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Short label of an outcome in the merged matrix: `Pass`, `QW`, `**Fail**`,
/// `N/S`, `**Crash**`, `**Timeout**`.
pub fn short_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "Pass",
        Outcome::QualityWarning => "QW",
        Outcome::Fail => "**Fail**",
        Outcome::NotSupported => "N/S",
        Outcome::Crash => "**Crash**",
        Outcome::Timeout => "**Timeout**",
    }
}

/// The matrix cell of a case that a run did not run.
pub const NOT_RUN: &str = "—";

fn commit_text(info: &RunInfo) -> String {
    let commit = info.git_commit.as_deref().unwrap_or("unknown commit");
    let state = match info.git_dirty {
        Some(false) => "clean tree",
        Some(true) => "**uncommitted changes**",
        None => "tree state unknown",
    };
    format!("{commit} ({state})")
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_value)
}

fn counts_of<'a>(results: impl IntoIterator<Item = &'a CaseResult>) -> BTreeMap<Outcome, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r.outcome).or_insert(0) += 1;
    }
    m
}

/// The `summary.md` of a run.
pub fn summary_md(info: &RunInfo, results: &[CaseResult]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# deepport conformance: {} on {}\n",
        cell(&info.backend),
        cell(&info.device)
    );
    md.push_str("| | |\n|---|---|\n");
    for (k, v) in [
        ("backend", info.backend.clone()),
        ("device", info.device.clone()),
        ("driver", info.driver.clone()),
        ("vendor", info.vendor.clone()),
        ("profile", info.profile.clone()),
        ("suite version", info.suite_version.clone()),
        ("commit", commit_text(info)),
        ("started (UTC)", info.started_utc.clone()),
        ("host", info.host.clone()),
        ("command", info.command.clone()),
    ] {
        let v = if k == "commit" { v } else { cell(&v) };
        let _ = writeln!(md, "| {k} | {v} |");
    }

    let total = counts_of(results);
    let n = results.len();
    let conformant = results.iter().filter(|r| r.outcome.is_conformant()).count();
    let failing = results.iter().filter(|r| r.outcome.fails_run()).count();
    let _ = writeln!(
        md,
        "\n**{n} case(s): {}.** {conformant} conformant (Pass or QualityWarning); \
         {failing} Fail, Crash or Timeout. NotSupported is never a pass.\n",
        Outcome::ALL
            .iter()
            .map(|o| format!("{} {}", total.get(o).copied().unwrap_or(0), o.label()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // One row per op family (per backend and family when a run holds several).
    let backends: BTreeSet<&str> = results.iter().map(|r| r.backend.as_str()).collect();
    let several = backends.len() > 1;
    let mut families: BTreeMap<String, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        let key = if several {
            format!("{} / {}", r.backend, family_of(&r.id))
        } else {
            family_of(&r.id).to_string()
        };
        families.entry(key).or_default().push(r);
    }
    md.push_str("## Outcomes per op family\n\n| op family |");
    for o in Outcome::ALL {
        let _ = write!(md, " {} |", o.label());
    }
    md.push_str(" total |\n|---|");
    for _ in Outcome::ALL {
        md.push_str("---:|");
    }
    md.push_str("---:|\n");
    for (fam, rs) in &families {
        let c = counts_of(rs.iter().copied());
        let _ = write!(md, "| {} |", cell(fam));
        for o in Outcome::ALL {
            let k = c.get(&o).copied().unwrap_or(0);
            if k > 0 && !o.is_conformant() {
                let _ = write!(md, " **{k}** |");
            } else {
                let _ = write!(md, " {k} |");
            }
        }
        let _ = writeln!(md, " {} |", rs.len());
    }
    md.push_str("| **total** |");
    for o in Outcome::ALL {
        let _ = write!(md, " {} |", total.get(&o).copied().unwrap_or(0));
    }
    let _ = writeln!(md, " {n} |");

    let not_passed: Vec<&CaseResult> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Pass || r.waiver.is_some())
        .collect();
    md.push_str("\n## Cases that did not pass\n\n");
    if not_passed.is_empty() {
        md.push_str("None: every case passed.\n");
    } else {
        md.push_str(
            "| case | backend | outcome | metric | value | threshold | seed | message |\n\
             |---|---|---|---|---:|---:|---:|---|\n",
        );
        for r in not_passed {
            let mut msg = r.message.clone();
            if let Some(idx) = &r.worst_index {
                if !msg.is_empty() {
                    msg.push('\n');
                }
                let _ = write!(msg, "worst index {idx:?}");
            }
            if let Some(w) = &r.waiver {
                if !msg.is_empty() {
                    msg.push('\n');
                }
                let _ = write!(msg, "waived: {w}");
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&r.id),
                cell(&r.backend),
                short_label(r.outcome),
                cell(r.metric.as_deref().unwrap_or("-")),
                opt(r.value),
                opt(r.threshold),
                r.seed,
                cell(&msg)
            );
        }
    }
    md
}

/// One column of the merged matrix: one backend of one run directory.
struct Column<'a> {
    heading: String,
    dir: &'a PathBuf,
    info: &'a RunInfo,
    backend: String,
    device: String,
    driver: String,
    cells: BTreeMap<&'a str, Vec<&'a CaseResult>>,
}

/// The cases × backends Markdown matrix of several runs `(dir, info,
/// results)`: rows are the case ids (sorted), columns `backend (device)` per
/// run (per backend of a run that holds several), cells the outcome (`—`
/// when that run did not run the case), then a totals row and the list of
/// runs with driver, suite version and commit.
pub fn merge_runs(runs: &[(PathBuf, RunInfo, Vec<CaseResult>)]) -> String {
    let mut cols: Vec<Column<'_>> = Vec::new();
    for (dir, info, results) in runs {
        let mut backends: Vec<&str> = Vec::new();
        for r in results {
            if !backends.contains(&r.backend.as_str()) {
                backends.push(&r.backend);
            }
        }
        if backends.is_empty() {
            backends.push(&info.backend);
        }
        for b in backends {
            let mine: Vec<&CaseResult> = results.iter().filter(|r| r.backend == b).collect();
            let pick = |f: fn(&CaseResult) -> &str, fallback: &str| {
                mine.iter()
                    .map(|r| f(r))
                    .find(|s| !s.is_empty())
                    .unwrap_or(fallback)
                    .to_string()
            };
            let device = pick(|r| &r.device, &info.device);
            let driver = pick(|r| &r.driver, &info.driver);
            let mut cells: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
            for r in mine {
                cells.entry(r.id.as_str()).or_default().push(r);
            }
            cols.push(Column {
                heading: format!("{b} ({device})"),
                dir,
                info,
                backend: b.to_string(),
                device,
                driver,
                cells,
            });
        }
    }
    // Two columns with the same heading get their directory appended.
    let headings: Vec<String> = cols.iter().map(|c| c.heading.clone()).collect();
    for (i, c) in cols.iter_mut().enumerate() {
        if headings.iter().filter(|h| **h == headings[i]).count() > 1 {
            c.heading = format!("{} [{}]", c.heading, c.dir.display());
        }
    }
    let ids: BTreeSet<&str> = cols.iter().flat_map(|c| c.cells.keys().copied()).collect();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# deepport conformance matrix\n\n{} case(s) × {} backend run(s). \
         Pass and QW (quality warning) are conformant; N/S (not supported) is never a pass; \
         {NOT_RUN} means the run did not include the case.\n",
        ids.len(),
        cols.len()
    );
    md.push_str("| case |");
    for c in &cols {
        let _ = write!(md, " {} |", cell(&c.heading));
    }
    md.push_str("\n|---|");
    for _ in &cols {
        md.push_str("---|");
    }
    md.push('\n');
    for id in &ids {
        let _ = write!(md, "| {} |", cell(id));
        for c in &cols {
            let text = match c.cells.get(id) {
                None => NOT_RUN.to_string(),
                Some(rs) => rs
                    .iter()
                    .map(|r| {
                        let mut s = short_label(r.outcome).to_string();
                        if r.waiver.is_some() {
                            s.push_str(" (waived)");
                        }
                        s
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let _ = write!(md, " {text} |");
        }
        md.push('\n');
    }
    md.push_str("| **total** |");
    for c in &cols {
        let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
        for r in c.cells.values().flatten() {
            *counts.entry(r.outcome).or_insert(0) += 1;
        }
        let not_run = ids.iter().filter(|id| !c.cells.contains_key(*id)).count();
        let mut parts: Vec<String> = Outcome::ALL
            .iter()
            .filter_map(|o| counts.get(o).map(|k| format!("{k} {}", short_label(*o))))
            .collect();
        if not_run > 0 {
            parts.push(format!("{not_run} {NOT_RUN}"));
        }
        let _ = write!(md, " {} |", parts.join(" · "));
    }
    md.push_str("\n\n## Runs\n\n");
    for c in &cols {
        let _ = writeln!(
            md,
            "- **{}** on {}: driver {}; suite {}; profile {}; commit {}; started {}; from `{}`",
            cell(&c.backend),
            cell(&c.device),
            cell(&c.driver),
            cell(&c.info.suite_version),
            cell(&c.info.profile),
            commit_text(c.info),
            cell(&c.info.started_utc),
            c.dir.display().to_string().replace('`', "'")
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::cell;

    #[test]
    fn cells_cannot_break_the_table() {
        assert_eq!(cell("a|b\nc<d>"), "a\\|b<br>c&lt;d&gt;");
    }
}
