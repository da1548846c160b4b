//! `junit.xml`: JUnit XML for CI systems.
//!
//! One `<testsuite>` per op family (per backend and op family when a run
//! holds several backends), with the device, driver and suite version as
//! properties. Fail, Crash and Timeout are `<failure type="Outcome">`;
//! NotSupported is `<skipped>` with a message saying it is not a pass;
//! QualityWarning passes with a `<system-out>` note. A waived Fail, Crash
//! or Timeout does not fail the run, so it is `<skipped>` too, its message
//! naming the outcome and the waiver (never a pass).

use super::{family_of, fmt_value};
use crate::types::{CaseResult, Outcome, RunInfo};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Escapes text for XML 1.0 content and attribute values. Characters XML
/// 1.0 forbids (control characters other than tab, newline and carriage
/// return, U+FFFE, U+FFFF) are written as `\u{..}` text; in attributes,
/// tab, newline and carriage return become character references so that
/// parsers keep them.
pub fn escape(s: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\'' if attribute => out.push_str("&apos;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\t' | '\n' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn attr(s: &str) -> String {
    escape(s, true)
}

fn text(s: &str) -> String {
    escape(s, false)
}

/// The deciding metric of a result as one line: `metric = value (threshold t)`.
fn metric_line(r: &CaseResult) -> String {
    let mut s = r.metric.clone().unwrap_or_default();
    if let Some(v) = r.value {
        if !s.is_empty() {
            s.push_str(" = ");
        }
        s.push_str(&fmt_value(v));
    }
    if let Some(t) = r.threshold {
        let _ = write!(s, " (threshold {})", fmt_value(t));
    }
    s
}

/// The body of a failure or note: metric line, message, seed, waiver.
fn detail(r: &CaseResult) -> String {
    let mut lines = Vec::new();
    let m = metric_line(r);
    if !m.is_empty() {
        lines.push(m);
    }
    if !r.message.is_empty() {
        lines.push(r.message.clone());
    }
    if let Some(idx) = &r.worst_index {
        lines.push(format!("worst index: {idx:?}"));
    }
    lines.push(format!("seed: {}", r.seed));
    if let Some(w) = &r.waiver {
        lines.push(format!("waived: {w}"));
    }
    lines.join("\n")
}

fn short_message(r: &CaseResult) -> String {
    let first = if r.message.is_empty() {
        metric_line(r)
    } else {
        r.message.lines().next().unwrap_or("").to_string()
    };
    let mut s = format!("{}: {first}", r.outcome.label());
    if r.waiver.is_some() {
        s.push_str(" (waived)");
    }
    s
}

fn secs(d: f64) -> String {
    if d.is_finite() && d >= 0.0 {
        format!("{d:.3}")
    } else {
        "0.000".into()
    }
}

/// A `<failure>`: Fail, Crash or Timeout without a waiver. A waived one is
/// `<skipped>` (it does not fail the run, and it is not a pass either).
fn is_failure(r: &CaseResult) -> bool {
    r.outcome.fails_run() && r.waiver.is_none()
}

#[derive(Default)]
struct Counts {
    tests: usize,
    failures: usize,
    skipped: usize,
    time: f64,
}

impl Counts {
    fn add(&mut self, r: &CaseResult) {
        self.tests += 1;
        if is_failure(r) {
            self.failures += 1;
        } else if r.outcome == Outcome::NotSupported || r.waiver.is_some() && r.outcome.fails_run()
        {
            self.skipped += 1;
        }
        if r.duration_s.is_finite() && r.duration_s > 0.0 {
            self.time += r.duration_s;
        }
    }

    fn attrs(&self) -> String {
        format!(
            "tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{}\"",
            self.tests,
            self.failures,
            self.skipped,
            secs(self.time)
        )
    }
}

/// The whole `junit.xml` document.
pub fn junit_xml(info: &RunInfo, results: &[CaseResult]) -> String {
    // Group by (backend, family), keeping the order of first appearance of
    // backends and sorting families.
    let mut backends: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<(usize, &str), Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        let b = match backends.iter().position(|b| *b == r.backend) {
            Some(i) => i,
            None => {
                backends.push(&r.backend);
                backends.len() - 1
            }
        };
        groups.entry((b, family_of(&r.id))).or_default().push(r);
    }
    let several = backends.len() > 1;
    let mut total = Counts::default();
    results.iter().for_each(|r| total.add(r));

    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" {}>",
        attr(&format!(
            "deepport conformance {} ({})",
            info.suite_version, info.profile
        )),
        total.attrs()
    );
    for ((b, family), rs) in &groups {
        let backend = backends[*b];
        let mut c = Counts::default();
        rs.iter().for_each(|r| c.add(r));
        let name = if several {
            format!("{backend}::{family}")
        } else {
            family.to_string()
        };
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" {} timestamp=\"{}\" hostname=\"{}\">",
            attr(&name),
            c.attrs(),
            attr(&info.started_utc),
            attr(&info.host)
        );
        // Device and driver of this suite's results (the run's when the
        // results leave them empty).
        let first = rs.first();
        let device = first
            .map(|r| r.device.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(&info.device);
        let driver = first
            .map(|r| r.driver.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(&info.driver);
        x.push_str("    <properties>\n");
        let commit = info.git_commit.clone().unwrap_or_else(|| "unknown".into());
        let dirty = match info.git_dirty {
            Some(true) => "true",
            Some(false) => "false",
            None => "unknown",
        };
        for (k, v) in [
            ("backend", backend),
            ("device", device),
            ("driver", driver),
            ("vendor", info.vendor.as_str()),
            ("suite_version", info.suite_version.as_str()),
            ("profile", info.profile.as_str()),
            ("git_commit", commit.as_str()),
            ("git_dirty", dirty),
        ] {
            let _ = writeln!(
                x,
                "      <property name=\"{}\" value=\"{}\"/>",
                attr(k),
                attr(v)
            );
        }
        x.push_str("    </properties>\n");
        for r in rs {
            let _ = write!(
                x,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{}\"",
                attr(&r.id),
                attr(&format!("deepport.{}.{family}", r.backend)),
                secs(r.duration_s)
            );
            match r.outcome {
                Outcome::Pass if r.waiver.is_none() => x.push_str("/>\n"),
                Outcome::Pass | Outcome::QualityWarning => {
                    let _ = writeln!(
                        x,
                        ">\n      <system-out>{}</system-out>\n    </testcase>",
                        text(&format!(
                            "{}\n{}",
                            if r.outcome == Outcome::Pass {
                                "Pass, with a waiver listed for this case"
                            } else {
                                "QualityWarning: conformant, but above the pass threshold"
                            },
                            detail(r)
                        ))
                    );
                }
                Outcome::NotSupported => {
                    let _ = writeln!(
                        x,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        attr(&format!(
                            "NotSupported: {} (not a pass)",
                            if r.message.is_empty() {
                                "the backend does not implement this case"
                            } else {
                                r.message.as_str()
                            }
                        ))
                    );
                }
                Outcome::Fail | Outcome::Crash | Outcome::Timeout if r.waiver.is_some() => {
                    let _ = writeln!(
                        x,
                        ">\n      <skipped message=\"{}\"/>\n      <system-out>{}</system-out>\n    </testcase>",
                        attr(&format!(
                            "{} (waived: {}; not a pass)",
                            r.outcome.label(),
                            r.waiver.as_deref().unwrap_or("")
                        )),
                        text(&detail(r))
                    );
                }
                Outcome::Fail | Outcome::Crash | Outcome::Timeout => {
                    let _ = writeln!(
                        x,
                        ">\n      <failure type=\"{}\" message=\"{}\">{}</failure>\n    </testcase>",
                        r.outcome.label(),
                        attr(&short_message(r)),
                        text(&detail(r))
                    );
                }
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup_quotes_and_control_characters() {
        assert_eq!(
            escape("a<b>&\"c'\n\u{1}", true),
            "a&lt;b&gt;&amp;&quot;c&apos;&#10;\\u{1}"
        );
        assert_eq!(escape("a<b>\"c'\n\t", false), "a&lt;b&gt;\"c'\n\t");
    }
}
