//! Waivers: known, dated exceptions to conformance (`conformance/waivers.yaml`).
//!
//! A waiver names a backend, the devices and drivers it applies to, the
//! cases (globs over case ids), the outcomes expected from them, a reason
//! and an expiry date. During `deepport run`:
//!
//! * a result whose outcome is one of a matching unexpired waiver's expected
//!   outcomes no longer fails the run; the outcome itself is kept and the
//!   result records the waiver's reason ([`CaseResult::waiver`]);
//! * a result that is conformant (Pass or QualityWarning) although a matching
//!   unexpired waiver expects it to fail makes the run fail: the waiver is no
//!   longer needed and must be deleted;
//! * an expired waiver is ignored, with a warning.
//!
//! ```yaml
//! - backend: wgpu                  # backend name (glob)
//!   device: "*RTX 40*"             # device glob (default "*")
//!   driver: "*"                    # driver glob (default "*")
//!   cases: ["mla_decode(*h_q=128*"] # case id globs (`case:` for one)
//!   outcomes: [Fail, Timeout]      # expected non-conformant outcomes
//!   reason: "driver 550 miscompiles the split-k reduction (bug 1234)"
//!   expires: 2026-12-31            # last day the waiver applies
//! ```
//!
//! Globs use `*` (any text) and `?` (one character).

use super::catalogue::glob_match;
use crate::types::{CaseResult, Outcome};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A parse or validation error in a waiver file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiverError {
    pub path: PathBuf,
    /// 1-based line and column (0 when unknown).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for WaiverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        } else {
            write!(f, "{}: {}", self.path.display(), self.message)
        }
    }
}

impl std::error::Error for WaiverError {}

/// A calendar date (proleptic Gregorian, UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

impl Date {
    /// Parses `YYYY-MM-DD` strictly (a real date, four-digit year).
    pub fn parse(s: &str) -> Option<Date> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let digits = |r: std::ops::Range<usize>| -> Option<u32> {
            let t = &s[r];
            if t.bytes().all(|c| c.is_ascii_digit()) {
                t.parse().ok()
            } else {
                None
            }
        };
        let (year, month, day) = (digits(0..4)? as i64, digits(5..7)?, digits(8..10)?);
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Date { year, month, day })
    }

    /// The date `days` days after 1970-01-01.
    pub fn from_unix_days(days: i64) -> Date {
        // Shift the epoch to 0000-03-01 so that leap days end each
        // 400-year era's years; then split into eras, years and days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097); // day of era, 0..=146096
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
        let mp = (5 * doy + 2) / 153; // March = 0
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date { year, month, day }
    }

    /// Today in UTC, from the system clock.
    pub fn today() -> Date {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Date::from_unix_days((secs / 86_400) as i64)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// One waiver.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiver {
    /// Backend name glob.
    pub backend: String,
    /// Device glob (`*` when absent).
    pub device: String,
    /// Driver glob (`*` when absent).
    pub driver: String,
    /// Case id globs.
    pub cases: Vec<String>,
    /// The non-conformant outcomes the waiver expects.
    pub outcomes: Vec<Outcome>,
    pub reason: String,
    /// Last day on which the waiver applies.
    pub expires: Date,
    /// `file:line` of the entry, for messages.
    pub origin: String,
}

impl Waiver {
    /// Whether the waiver is about this result's backend, device, driver and case.
    pub fn matches(&self, r: &CaseResult) -> bool {
        glob_match(&self.backend, &r.backend)
            && glob_match(&self.device, &r.device)
            && glob_match(&self.driver, &r.driver)
            && self.cases.iter().any(|c| glob_match(c, &r.id))
    }

    /// Whether the waiver no longer applies on `today`.
    pub fn expired(&self, today: Date) -> bool {
        today > self.expires
    }

    /// The expected outcomes as `Fail/Crash`.
    pub fn expected_label(&self) -> String {
        self.outcomes
            .iter()
            .map(|o| o.label())
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWaiver {
    backend: Spanned<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    case: Option<Spanned<String>>,
    #[serde(default)]
    cases: Option<Spanned<Vec<String>>>,
    outcomes: Spanned<Vec<Outcome>>,
    reason: Spanned<String>,
    expires: Spanned<String>,
}

/// The waivers of one file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Waivers {
    pub path: Option<PathBuf>,
    pub list: Vec<Waiver>,
}

/// What applying waivers to a run found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaiverReport {
    /// Expired waivers that matched a result and were ignored.
    pub warnings: Vec<String>,
    /// Waivers that expect a failure from a case that is conformant: each
    /// fails the run.
    pub unneeded: Vec<String>,
    /// Indices of the waived results.
    pub waived: Vec<usize>,
}

fn at(path: &Path, loc: serde_saphyr::Location, message: String) -> WaiverError {
    WaiverError {
        path: path.to_path_buf(),
        line: loc.line(),
        column: loc.column(),
        message,
    }
}

/// A YAML error's text without its snippet and without the `line N column
/// M` that [`WaiverError`] prints in front already.
fn bare_message(e: &serde_saphyr::Error) -> String {
    let s = e.without_snippet().to_string();
    let s = s.trim();
    let s = s.strip_prefix("error: ").unwrap_or(s);
    let rest = s
        .strip_prefix("line ")
        .and_then(|r| r.split_once(": "))
        .filter(|(pos, _)| {
            pos.split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|(_, m)| m);
    let s = rest.unwrap_or(s).trim();
    // And the ` at line N, column M` some messages end with.
    let s = match s.rsplit_once(" at line ") {
        Some((m, pos))
            if pos
                .split(", column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            m
        }
        _ => s,
    };
    s.to_string()
}

impl Waivers {
    /// The default waiver file, `conformance/waivers.yaml` of this source
    /// tree, when it exists.
    pub fn default_path() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("waivers.yaml");
        p.is_file().then_some(p)
    }

    /// Reads and validates a waiver file.
    pub fn load(path: &Path) -> Result<Waivers, WaiverError> {
        let text = std::fs::read_to_string(path).map_err(|e| WaiverError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read the waiver file: {e}"),
        })?;
        Waivers::parse(&text, path)
    }

    /// Parses and validates waiver YAML (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Waivers, WaiverError> {
        // A file of comments only holds no waiver.
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            return Ok(Waivers {
                path: Some(path.to_path_buf()),
                list: Vec::new(),
            });
        }
        let raw: Vec<RawWaiver> = serde_saphyr::from_str(text).map_err(|e| {
            let loc = e.location();
            WaiverError {
                path: path.to_path_buf(),
                line: loc.map_or(0, |l| l.line()),
                column: loc.map_or(0, |l| l.column()),
                message: bare_message(&e),
            }
        })?;
        let mut list = Vec::with_capacity(raw.len());
        for w in raw {
            let origin = format!("{}:{}", path.display(), w.backend.referenced.line());
            if w.backend.value.trim().is_empty() {
                return Err(at(
                    path,
                    w.backend.referenced,
                    "`backend` must name a backend (or a glob)".into(),
                ));
            }
            let mut cases = Vec::new();
            if let Some(c) = &w.case {
                cases.push(c.value.clone());
            }
            if let Some(c) = &w.cases {
                cases.extend(c.value.iter().cloned());
            }
            if cases.is_empty() || cases.iter().any(|c| c.trim().is_empty()) {
                let loc = w
                    .cases
                    .as_ref()
                    .map(|c| c.referenced)
                    .or(w.case.as_ref().map(|c| c.referenced))
                    .unwrap_or(w.backend.referenced);
                return Err(at(
                    path,
                    loc,
                    "a waiver needs `case: GLOB` or `cases: [GLOB, ...]` with non-empty globs"
                        .into(),
                ));
            }
            if w.outcomes.value.is_empty() {
                return Err(at(
                    path,
                    w.outcomes.referenced,
                    "`outcomes` must list the expected outcomes (Fail, NotSupported, Crash, Timeout)"
                        .into(),
                ));
            }
            if let Some(o) = w.outcomes.value.iter().find(|o| o.is_conformant()) {
                return Err(at(
                    path,
                    w.outcomes.referenced,
                    format!(
                        "`outcomes` lists {o}, which is conformant: a waiver is for Fail, NotSupported, Crash or Timeout"
                    ),
                ));
            }
            if w.reason.value.trim().is_empty() {
                return Err(at(
                    path,
                    w.reason.referenced,
                    "`reason` must say why the waiver exists".into(),
                ));
            }
            let expires = Date::parse(w.expires.value.trim()).ok_or_else(|| {
                at(
                    path,
                    w.expires.referenced,
                    format!(
                        "`expires` must be a date YYYY-MM-DD, found {:?}",
                        w.expires.value
                    ),
                )
            })?;
            list.push(Waiver {
                backend: w.backend.value,
                device: w.device.unwrap_or_else(|| "*".into()),
                driver: w.driver.unwrap_or_else(|| "*".into()),
                cases,
                outcomes: w.outcomes.value,
                reason: w.reason.value.trim().to_string(),
                expires,
                origin,
            });
        }
        Ok(Waivers {
            path: Some(path.to_path_buf()),
            list,
        })
    }

    /// Applies the waivers to `results` as of `today` (see the module
    /// documentation): sets [`CaseResult::waiver`] on waived results and
    /// notes unneeded waivers in their messages.
    pub fn apply(&self, results: &mut [CaseResult], today: Date) -> WaiverReport {
        let mut rep = WaiverReport::default();
        let mut warned = vec![false; self.list.len()];
        for (i, r) in results.iter_mut().enumerate() {
            let mut live = Vec::new();
            for (wi, w) in self.list.iter().enumerate() {
                if !w.matches(r) {
                    continue;
                }
                if w.expired(today) {
                    if !warned[wi] {
                        warned[wi] = true;
                        rep.warnings.push(format!(
                            "waiver at {} expired on {} and is ignored (first match: {} on {})",
                            w.origin, w.expires, r.id, r.backend
                        ));
                    }
                    continue;
                }
                live.push(w);
            }
            if live.is_empty() {
                continue;
            }
            if r.outcome.is_conformant() {
                for w in &live {
                    let msg = format!(
                        "waiver no longer needed: {} on {} is {} but the waiver at {} expects {} ({})",
                        r.id,
                        r.backend,
                        r.outcome,
                        w.origin,
                        w.expected_label(),
                        w.reason
                    );
                    if !r.message.is_empty() {
                        r.message.push_str("; ");
                    }
                    r.message.push_str(&msg);
                    rep.unneeded.push(msg);
                }
            } else if let Some(w) = live.iter().find(|w| w.outcomes.contains(&r.outcome)) {
                r.waiver = Some(w.reason.clone());
                rep.waived.push(i);
            }
        }
        rep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, backend: &str, outcome: Outcome) -> CaseResult {
        CaseResult {
            id: id.into(),
            backend: backend.into(),
            device: "Big GPU 9000".into(),
            driver: "550.1".into(),
            outcome,
            metric: None,
            value: None,
            threshold: None,
            worst_index: None,
            seed: 1,
            duration_s: 0.0,
            message: String::new(),
            waiver: None,
        }
    }

    fn parse(text: &str) -> Result<Waivers, WaiverError> {
        Waivers::parse(text, Path::new("w.yaml"))
    }

    #[test]
    fn dates_parse_strictly_and_convert_from_days() {
        assert_eq!(
            Date::parse("2024-02-29"),
            Some(Date {
                year: 2024,
                month: 2,
                day: 29
            })
        );
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "24-01-01",
            "2024/01/01",
            "2024-1-01x",
            "",
        ] {
            assert_eq!(Date::parse(bad), None, "{bad}");
        }
        // Hand-checked: day 0 is 1970-01-01; 11016 days later is 2000-02-29;
        // 19723 is 2024-01-01; -1 is 1969-12-31.
        assert_eq!(Date::from_unix_days(0).to_string(), "1970-01-01");
        assert_eq!(Date::from_unix_days(11_016).to_string(), "2000-02-29");
        assert_eq!(Date::from_unix_days(19_723).to_string(), "2024-01-01");
        assert_eq!(Date::from_unix_days(-1).to_string(), "1969-12-31");
        assert!(Date::today().year >= 2024);
    }

    /// The globs waivers rely on (the catalogue's matcher).
    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("add(*)", "add(n=3)"));
        assert!(glob_match("a?d*", "add(n=3)"));
        assert!(!glob_match("add", "add(n=3)"));
        assert!(glob_match("*h_q=128*", "mla_decode(b=2,h_q=128,s_k=64)"));
        assert!(!glob_match("*h_q=128*", "mla_decode(b=2,h_q=12,s_k=64)"));
        assert!(glob_match("*a*b*c", "xxaxxbxxbxc"));
        assert!(!glob_match("*a*b*c", "xxaxxbxxbxcd"));
        assert!(glob_match("??", "éx"));
    }

    const ONE: &str = "\
# a comment
- backend: faulty
  device: \"Big GPU*\"
  cases: [\"add(*\", \"silu_mul(*\"]
  outcomes: [Fail]
  reason: garbage on purpose
  expires: 2999-12-31
";

    #[test]
    fn parses_a_waiver_with_defaults() {
        let w = parse(ONE).unwrap();
        assert_eq!(w.list.len(), 1);
        let w = &w.list[0];
        assert_eq!(w.backend, "faulty");
        assert_eq!(w.device, "Big GPU*");
        assert_eq!(w.driver, "*");
        assert_eq!(w.cases, vec!["add(*", "silu_mul(*"]);
        assert_eq!(w.outcomes, vec![Outcome::Fail]);
        assert_eq!(w.reason, "garbage on purpose");
        assert_eq!(w.expires.to_string(), "2999-12-31");
        assert_eq!(w.origin, "w.yaml:2");
        // Empty files and `[]` hold no waiver.
        assert!(parse("# nothing\n\n").unwrap().list.is_empty());
        assert!(parse("[]\n").unwrap().list.is_empty());
    }

    #[test]
    fn bad_files_name_line_and_column() {
        let cases: [(&str, u64, &str); 6] = [
            // Missing reason: reported at the end of the entry.
            (
                "- backend: x\n  case: a\n  outcomes: [Fail]\n  expires: 2999-01-01\n",
                4,
                "missing field `reason`",
            ),
            // Unknown outcome.
            (
                "- backend: x\n  case: a\n  outcomes: [Broken]\n  reason: r\n  expires: 2999-01-01\n",
                3,
                "Broken",
            ),
            // Bad date.
            (
                "- backend: x\n  case: a\n  outcomes: [Fail]\n  reason: r\n  expires: 2999-02-30\n",
                5,
                "YYYY-MM-DD",
            ),
            // Pass is not waivable.
            (
                "- backend: x\n  case: a\n  outcomes: [Pass]\n  reason: r\n  expires: 2999-01-01\n",
                3,
                "Pass",
            ),
            // Empty reason.
            (
                "- backend: x\n  case: a\n  outcomes: [Fail]\n  reason: \"  \"\n  expires: 2999-01-01\n",
                4,
                "reason",
            ),
            // Malformed YAML.
            ("- backend: [x\n  case: a\n", 0, ""),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with("w.yaml:"), "{s}");
            if line > 0 {
                assert_eq!(e.line, line, "{s}");
            } else {
                assert!(e.line > 0, "{s}");
            }
            assert!(e.column > 0, "{s}");
            assert!(s.contains(needle), "{needle} not in {s}");
            assert!(!s.contains("at line"), "position given twice: {s}");
        }
        // No case glob.
        let e = parse("- backend: x\n  outcomes: [Fail]\n  reason: r\n  expires: 2999-01-01\n")
            .unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("case"), "{e}");
        // Unknown key.
        let e = parse(
            "- backend: x\n  case: a\n  outcome: [Fail]\n  reason: r\n  expires: 2999-01-01\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("outcome"), "{e}");
    }

    #[test]
    fn apply_waives_expected_failures_and_flags_unneeded_ones() {
        let w = parse(ONE).unwrap();
        let today = Date::parse("2025-06-01").unwrap();
        let mut rs = vec![
            result("add(n=3)", "faulty", Outcome::Fail),
            result("silu_mul(n=3)", "faulty", Outcome::Pass),
            result("add(n=3)", "cpu", Outcome::Fail),
            result("silu_mul(n=4)", "faulty", Outcome::Crash),
            result("rope(n=4)", "faulty", Outcome::Fail),
        ];
        let rep = w.apply(&mut rs, today);
        assert_eq!(rs[0].waiver.as_deref(), Some("garbage on purpose"));
        assert_eq!(rs[0].outcome, Outcome::Fail, "the outcome is kept");
        assert_eq!(rep.waived, vec![0]);
        assert_eq!(rep.unneeded.len(), 1);
        assert!(rep.unneeded[0].contains("silu_mul(n=3)"));
        assert!(rs[1].message.contains("waiver no longer needed"));
        assert_eq!(rs[1].waiver, None);
        // Another backend, an unexpected outcome, an unlisted case: untouched.
        for r in &rs[2..] {
            assert_eq!(r.waiver, None, "{}", r.id);
        }
        assert!(rep.warnings.is_empty());

        // The device glob must match.
        let mut rs = vec![result("add(n=3)", "faulty", Outcome::Fail)];
        rs[0].device = "Small GPU".into();
        assert!(w.apply(&mut rs, today).waived.is_empty());
    }

    #[test]
    fn expired_waivers_are_ignored_with_a_warning() {
        let w = parse(&ONE.replace("2999-12-31", "2025-05-31")).unwrap();
        let mut rs = vec![
            result("add(n=3)", "faulty", Outcome::Fail),
            result("add(n=4)", "faulty", Outcome::Fail),
            result("silu_mul(n=3)", "faulty", Outcome::Pass),
        ];
        // Valid through its expiry day.
        let mut same_day = rs.clone();
        let rep = w.apply(&mut same_day, Date::parse("2025-05-31").unwrap());
        assert_eq!(rep.waived, vec![0, 1]);
        let rep = w.apply(&mut rs, Date::parse("2025-06-01").unwrap());
        assert!(rep.waived.is_empty() && rep.unneeded.is_empty());
        assert!(rs.iter().all(|r| r.waiver.is_none()));
        assert_eq!(rep.warnings.len(), 1, "{:?}", rep.warnings);
        assert!(rep.warnings[0].contains("expired on 2025-05-31"));
    }
}
