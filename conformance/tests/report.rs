//! Reports: run directories written and read back, JUnit XML well-formed and
//! faithful, the merged matrix, `verify` on good and bad submissions, and the
//! git state.

use deepport_conformance::suite::report::{
    self, merge, read_dir, verify, write_all, Problem, JUNIT_XML, RESULTS_JSONL, RUN_JSON,
    SUMMARY_MD,
};
use deepport_conformance::suite::{CaseResult, Outcome, RunInfo, SUITE_VERSION};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A fresh empty directory under the target dir, unique per test.
fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("report-test-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn info(backend: &str, device: &str) -> RunInfo {
    RunInfo {
        suite_version: SUITE_VERSION.to_string(),
        profile: "v3-mustpass".into(),
        backend: backend.into(),
        device: device.into(),
        driver: "driver 1.2 <beta> & \"quoted\"".into(),
        vendor: "acme".into(),
        git_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        git_dirty: Some(false),
        started_utc: "2026-01-02T03:04:05Z".into(),
        host: "testhost".into(),
        command: "deepport run --backend cpu --profile v3-mustpass".into(),
    }
}

fn res(backend: &str, id: &str, outcome: Outcome) -> CaseResult {
    CaseResult {
        id: id.into(),
        backend: backend.into(),
        device: "dev0".into(),
        driver: "drv".into(),
        outcome,
        metric: Some("out.calc_diff".into()),
        value: Some(1.5e-6),
        threshold: Some(1e-5),
        worst_index: None,
        seed: 42,
        duration_s: 0.25,
        message: String::new(),
        waiver: None,
    }
}

/// Results covering every outcome, XML/Markdown special characters and
/// non-finite values.
fn sample(backend: &str) -> Vec<CaseResult> {
    let mut v = vec![
        res(backend, "add(n=7)", Outcome::Pass),
        res(backend, "add(n=4096)", Outcome::Pass),
        res(
            backend,
            "fp8_gemm(m=1,n=576,k=256)",
            Outcome::QualityWarning,
        ),
        res(backend, "fp8_gemm(m=64,n=576,k=256)", Outcome::Fail),
        res(backend, "mla_decode(b=2,s_q=1)", Outcome::NotSupported),
        res(backend, "rms_norm(n=5)", Outcome::Crash),
        res(backend, "rope(n=3)", Outcome::Timeout),
    ];
    v[2].value = Some(2e-5);
    v[2].message = "above pass, within warn".into();
    v[3].message = "a < b && c > d; \"quoted\" 'single' | pipe\nsecond line \u{1} ctl".into();
    v[3].value = Some(f64::NAN);
    v[3].threshold = Some(f64::INFINITY);
    v[3].worst_index = Some(vec![3, 17]);
    v[4].metric = None;
    v[4].value = None;
    v[4].threshold = None;
    v[4].message = "backend lacks <mla_decode> & friends".into();
    v[5].message = "killed by signal 6 (SIGABRT)".into();
    v[6].message = "no result within 30 s".into();
    v[6].waiver = Some("known hang, driver bug #12 <until 2026-12-31>".into());
    v
}

/// Compares results field by field, treating NaN as equal to NaN.
fn assert_same(a: &[CaseResult], b: &[CaseResult]) {
    assert_eq!(a.len(), b.len());
    let same = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => x == y || (x.is_nan() && y.is_nan()),
        (None, None) => true,
        _ => false,
    };
    for (x, y) in a.iter().zip(b) {
        assert!(
            same(x.value, y.value),
            "{}: {:?} vs {:?}",
            x.id,
            x.value,
            y.value
        );
        assert!(same(x.threshold, y.threshold), "{}", x.id);
        let (mut x, mut y) = (x.clone(), y.clone());
        x.value = None;
        y.value = None;
        x.threshold = None;
        y.threshold = None;
        assert_eq!(x, y);
    }
}

#[test]
fn round_trip_keeps_every_field() {
    let dir = tmp("roundtrip");
    let i = info("cpu", "Test CPU");
    let rs = sample("cpu");
    write_all(&dir, &i, &rs).unwrap();
    for f in [RUN_JSON, RESULTS_JSONL, JUNIT_XML, SUMMARY_MD] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    let (i2, rs2) = read_dir(&dir).unwrap();
    assert_eq!(i2, i);
    assert_same(&rs2, &rs);
    assert!(rs2[3].value.unwrap().is_nan());
    assert_eq!(rs2[3].threshold, Some(f64::INFINITY));
}

#[test]
fn results_jsonl_has_one_object_per_case_with_exactly_the_contract_fields() {
    let dir = tmp("jsonl");
    write_all(&dir, &info("cpu", "Test CPU"), &sample("cpu")).unwrap();
    let text = std::fs::read_to_string(dir.join(RESULTS_JSONL)).unwrap();
    let expected: BTreeSet<&str> = [
        "id",
        "backend",
        "device",
        "driver",
        "outcome",
        "metric",
        "value",
        "threshold",
        "worst_index",
        "seed",
        "duration_s",
        "message",
        "waiver",
    ]
    .into_iter()
    .collect();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, expected, "{l}");
    }
    // In the contract's order.
    assert!(lines[0].starts_with("{\"id\":\"add(n=7)\",\"backend\":\"cpu\",\"device\""));
    assert!(
        lines[0].ends_with("\"message\":\"\",\"waiver\":null}"),
        "{}",
        lines[0]
    );
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["outcome"], "Pass");
    assert_eq!(first["id"], "add(n=7)");
    assert_eq!(first["waiver"], serde_json::Value::Null);
    let fail: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    assert_eq!(fail["value"], "NaN");
    assert_eq!(fail["threshold"], "inf");
    assert_eq!(fail["worst_index"], serde_json::json!([3, 17]));
}

#[test]
fn read_dir_names_the_file_and_line_of_a_bad_record() {
    let dir = tmp("bad");
    let rs = sample("cpu");
    write_all(&dir, &info("cpu", "Test CPU"), &rs).unwrap();
    let path = dir.join(RESULTS_JSONL);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[2] = lines[2].replace("\"QualityWarning\"", "\"Sometimes\"");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let e = read_dir(&dir).unwrap_err().to_string();
    assert!(e.contains(RESULTS_JSONL) && e.contains(":3:"), "{e}");

    lines[2] = "{not json".into();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let e = read_dir(&dir).unwrap_err().to_string();
    assert!(e.contains(":3:"), "{e}");

    std::fs::write(dir.join(RUN_JSON), "{\"suite_version\": 3}").unwrap();
    let e = read_dir(&dir).unwrap_err().to_string();
    assert!(e.contains(RUN_JSON), "{e}");

    std::fs::remove_file(dir.join(RUN_JSON)).unwrap();
    let e = read_dir(&dir).unwrap_err().to_string();
    assert!(e.contains(RUN_JSON), "{e}");
}

/// A parsed XML element.
#[derive(Debug, Default)]
struct Node {
    name: String,
    attrs: BTreeMap<String, String>,
    children: Vec<Node>,
    text: String,
}

impl Node {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
    fn one<'a>(&'a self, name: &'a str) -> &'a Node {
        let v: Vec<&Node> = self.all(name).collect();
        assert_eq!(v.len(), 1, "<{}> should have one <{name}>", self.name);
        v[0]
    }
    fn attr(&self, k: &str) -> &str {
        self.attrs
            .get(k)
            .unwrap_or_else(|| panic!("<{}> has no {k}", self.name))
    }
}

/// Parses a whole document with quick-xml (end names checked, entities
/// resolved, duplicate attributes rejected) into a tree; panics when it is
/// not well-formed.
fn parse_xml(doc: &str) -> Node {
    use quick_xml::events::{BytesStart, Event};
    // XML 1.0 forbids these characters anywhere, escaped or not.
    assert!(
        !doc.chars()
            .any(|c| (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r')),
        "raw control character in XML"
    );
    assert!(
        !doc.contains("&#1;"),
        "character reference to a forbidden char"
    );
    let mut reader = quick_xml::Reader::from_str(doc);
    let mut stack: Vec<Node> = vec![Node::default()];
    let open = |e: &BytesStart<'_>| {
        let mut n = Node {
            name: String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
            ..Node::default()
        };
        for a in e.attributes() {
            let a = a.expect("malformed attribute");
            let k = String::from_utf8(a.key.as_ref().to_vec()).unwrap();
            let v = a.unescape_value().expect("bad escape in attribute");
            assert!(n.attrs.insert(k, v.into_owned()).is_none());
        }
        n
    };
    loop {
        match reader.read_event().expect("not well-formed XML") {
            Event::Start(e) => stack.push(open(&e)),
            Event::Empty(e) => {
                let n = open(&e);
                stack.last_mut().unwrap().children.push(n);
            }
            Event::End(_) => {
                let n = stack.pop().unwrap();
                stack.last_mut().expect("unbalanced").children.push(n);
            }
            Event::Text(t) => {
                let s = t.unescape().expect("bad escape in text");
                stack.last_mut().unwrap().text.push_str(&s);
            }
            Event::CData(_) | Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::DocType(_) => panic!("unexpected DOCTYPE"),
            Event::Eof => break,
        }
    }
    assert_eq!(stack.len(), 1, "unclosed elements");
    let mut root = stack.pop().unwrap();
    assert!(root.text.trim().is_empty(), "text outside the root element");
    assert_eq!(root.children.len(), 1, "one root element");
    root.children.pop().unwrap()
}

#[test]
fn junit_is_well_formed_and_faithful() {
    let dir = tmp("junit");
    let rs = sample("cpu");
    let i = info("cpu", "Test CPU");
    write_all(&dir, &i, &rs).unwrap();
    let doc = std::fs::read_to_string(dir.join(JUNIT_XML)).unwrap();
    let root = parse_xml(&doc);
    assert_eq!(root.name, "testsuites");
    assert_eq!(root.attr("tests"), "7");
    // Fail and Crash; the Timeout is waived: skipped with NotSupported.
    assert_eq!(root.attr("failures"), "2");
    assert_eq!(root.attr("skipped"), "2");

    let suites: Vec<&Node> = root.all("testsuite").collect();
    let names: Vec<&str> = suites.iter().map(|s| s.attr("name")).collect();
    assert_eq!(names, ["add", "fp8_gemm", "mla_decode", "rms_norm", "rope"]);
    for s in &suites {
        let props: BTreeMap<&str, &str> = s
            .one("properties")
            .all("property")
            .map(|p| (p.attr("name"), p.attr("value")))
            .collect();
        assert_eq!(props["device"], "dev0");
        assert_eq!(props["driver"], "drv");
        assert_eq!(props["suite_version"], SUITE_VERSION);
        assert_eq!(props["backend"], "cpu");
        let cases: Vec<&Node> = s.all("testcase").collect();
        assert_eq!(s.attr("tests"), cases.len().to_string());
    }
    let case = |id: &str| -> &Node {
        suites
            .iter()
            .flat_map(|s| s.all("testcase"))
            .find(|c| c.attr("name") == id)
            .unwrap_or_else(|| panic!("no testcase {id}"))
    };
    let pass = case("add(n=7)");
    assert!(pass.children.is_empty(), "a pass has no child: {pass:?}");

    let qw = case("fp8_gemm(m=1,n=576,k=256)");
    assert!(qw.all("failure").next().is_none() && qw.all("skipped").next().is_none());
    assert!(qw.one("system-out").text.contains("QualityWarning"));

    let fail = case("fp8_gemm(m=64,n=576,k=256)");
    let f = fail.one("failure");
    assert_eq!(f.attr("type"), "Fail");
    // The message survives escaping, special characters and all (the
    // forbidden control character is replaced by visible text).
    assert!(
        f.text
            .contains("a < b && c > d; \"quoted\" 'single' | pipe\nsecond line"),
        "{:?}",
        f.text
    );
    assert!(f
        .attr("message")
        .contains("a < b && c > d; \"quoted\" 'single'"));
    assert!(f.text.contains("NaN"), "{:?}", f.text);

    let ns = case("mla_decode(b=2,s_q=1)");
    let sk = ns.one("skipped");
    assert!(sk.attr("message").starts_with("NotSupported: "));
    assert!(sk
        .attr("message")
        .contains("backend lacks <mla_decode> & friends"));
    assert!(sk.attr("message").ends_with("(not a pass)"));
    assert!(ns.all("failure").next().is_none());

    assert_eq!(case("rms_norm(n=5)").one("failure").attr("type"), "Crash");
    let waived = case("rope(n=3)");
    assert!(waived.all("failure").next().is_none());
    let m = waived.one("skipped").attr("message");
    assert!(m.starts_with("Timeout (waived: known hang, driver bug #12 <until 2026-12-31>"));
    assert!(m.ends_with("not a pass)"), "{m}");
    assert!(waived
        .one("system-out")
        .text
        .contains("no result within 30 s"));
    let sums: (usize, usize) = suites.iter().fold((0, 0), |(f, k), s| {
        (
            f + s.attr("failures").parse::<usize>().unwrap(),
            k + s.attr("skipped").parse::<usize>().unwrap(),
        )
    });
    assert_eq!(sums, (2, 2));
}

#[test]
fn junit_with_several_backends_keeps_them_apart() {
    let dir = tmp("junit2");
    let mut rs = sample("cpu");
    rs.extend(sample("faulty"));
    write_all(&dir, &info("cpu", "Test CPU"), &rs).unwrap();
    let root = parse_xml(&std::fs::read_to_string(dir.join(JUNIT_XML)).unwrap());
    assert_eq!(root.attr("tests"), "14");
    let names: BTreeSet<&str> = root.all("testsuite").map(|s| s.attr("name")).collect();
    assert!(
        names.contains("cpu::add") && names.contains("faulty::add"),
        "{names:?}"
    );
    assert_eq!(names.len(), 10);
}

#[test]
fn summary_lists_facts_counts_and_every_case_that_did_not_pass() {
    let dir = tmp("summary");
    let i = info("cpu", "Test CPU");
    write_all(&dir, &i, &sample("cpu")).unwrap();
    let md = std::fs::read_to_string(dir.join(SUMMARY_MD)).unwrap();
    for fact in [
        "cpu",
        "Test CPU",
        SUITE_VERSION,
        "0123456789abcdef0123456789abcdef01234567",
        "clean tree",
        "v3-mustpass",
    ] {
        assert!(md.contains(fact), "summary lacks {fact}:\n{md}");
    }
    // The fp8_gemm family row: 0 Pass, 1 QualityWarning, 1 Fail, total 2.
    let row = md
        .lines()
        .find(|l| l.starts_with("| fp8_gemm |"))
        .expect("fp8_gemm row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(
        cells[1..9],
        ["fp8_gemm", "0", "1", "**1**", "0", "0", "0", "2"]
    );
    let row = md.lines().find(|l| l.starts_with("| add |")).unwrap();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[1..9], ["add", "2", "0", "0", "0", "0", "0", "2"]);

    let section = md.split("## Cases that did not pass").nth(1).unwrap();
    for id in [
        "fp8_gemm(m=1,n=576,k=256)",
        "fp8_gemm(m=64,n=576,k=256)",
        "mla_decode(b=2,s_q=1)",
        "rms_norm(n=5)",
        "rope(n=3)",
    ] {
        assert!(section.contains(id), "{id} missing");
    }
    assert!(!section.contains("add(n=7)"));
    // The message with a pipe and a newline stays in one table row.
    let fail_row = section
        .lines()
        .find(|l| l.contains("fp8_gemm(m=64"))
        .unwrap();
    assert!(fail_row.contains("\\| pipe<br>second line"), "{fail_row}");
    assert!(fail_row.contains("**Fail**") && fail_row.contains("NaN"));
    let to_row = section.lines().find(|l| l.contains("rope(n=3)")).unwrap();
    assert!(to_row.contains("waived"), "{to_row}");
}

#[test]
fn merge_builds_the_cases_by_backends_matrix() {
    let a = tmp("merge-a");
    let b = tmp("merge-b");
    write_all(
        &a,
        &info("cpu", "Test CPU"),
        &[
            res("cpu", "add(n=7)", Outcome::Pass),
            res("cpu", "mla_decode(b=1)", Outcome::QualityWarning),
            res("cpu", "fp8_gemm(m=1)", Outcome::Fail),
        ],
    )
    .unwrap();
    let mut gpu_info = info("wgpu", "Big GPU");
    gpu_info.git_dirty = Some(true);
    let mut gpu = vec![
        res("wgpu", "fp8_gemm(m=1)", Outcome::Pass),
        res("wgpu", "mla_decode(b=1)", Outcome::NotSupported),
        res("wgpu", "rope(n=3)", Outcome::Crash),
        res("wgpu", "zeta(n=1)", Outcome::Timeout),
    ];
    for r in &mut gpu {
        r.device = "Big GPU".into();
    }
    write_all(&b, &gpu_info, &gpu).unwrap();
    let md = merge(&[a.clone(), b.clone()]).unwrap();

    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(table[0], "| case | cpu (dev0) | wgpu (Big GPU) |");
    let rows: Vec<Vec<&str>> = table[2..]
        .iter()
        .map(|l| {
            l.split('|')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .collect();
    let expect: Vec<Vec<&str>> = vec![
        vec!["add(n=7)", "Pass", "—"],
        vec!["fp8_gemm(m=1)", "**Fail**", "Pass"],
        vec!["mla_decode(b=1)", "QW", "N/S"],
        vec!["rope(n=3)", "—", "**Crash**"],
        vec!["zeta(n=1)", "—", "**Timeout**"],
    ];
    assert_eq!(rows[..5], expect[..]);
    let totals = &rows[5];
    assert_eq!(totals[0], "**total**");
    assert_eq!(totals[1], "1 Pass · 1 QW · 1 **Fail** · 2 —");
    assert_eq!(
        totals[2],
        "1 Pass · 1 N/S · 1 **Crash** · 1 **Timeout** · 1 —"
    );

    let runs = md.split("## Runs").nth(1).unwrap();
    assert!(runs.contains("**cpu**") && runs.contains("**wgpu**"));
    assert!(runs.contains("driver drv"));
    assert!(runs.contains(SUITE_VERSION));
    assert!(runs.contains("uncommitted changes"));
    assert!(runs.contains(&a.display().to_string()));

    // A missing directory is an error naming it.
    let e = merge(&[a, tmp("merge-empty")]).unwrap_err().to_string();
    assert!(e.contains("merge-empty") && e.contains(RUN_JSON), "{e}");
}

fn mustpass() -> BTreeSet<String> {
    ["add(n=7)", "fp8_gemm(m=1)", "mla_decode(b=1)"]
        .into_iter()
        .map(String::from)
        .collect()
}

fn clean_submission() -> Vec<CaseResult> {
    vec![
        res("cpu", "add(n=7)", Outcome::Pass),
        res("cpu", "fp8_gemm(m=1)", Outcome::QualityWarning),
        res("cpu", "mla_decode(b=1)", Outcome::Pass),
        // Extra cases do not hurt.
        res("cpu", "rope(n=3)", Outcome::Pass),
    ]
}

fn verify_with(name: &str, i: &RunInfo, rs: &[CaseResult]) -> report::VerifyReport {
    let dir = tmp(name);
    write_all(&dir, i, rs).unwrap();
    verify(&dir, &mustpass()).unwrap()
}

#[test]
fn verify_passes_a_clean_submission() {
    let r = verify_with("v-clean", &info("cpu", "Test CPU"), &clean_submission());
    assert!(r.is_ok(), "{r}");
    assert!(r.to_string().contains("OK"));
}

#[test]
fn verify_catches_each_problem() {
    let i = info("cpu", "Test CPU");
    let only = |r: &report::VerifyReport| -> Problem {
        assert_eq!(r.problems.len(), 1, "{r}");
        assert!(!r.is_ok());
        r.problems[0].clone()
    };

    let mut rs = clean_submission();
    rs.remove(1);
    let r = verify_with("v-missing", &i, &rs);
    assert_eq!(
        only(&r),
        Problem::Missing {
            id: "fp8_gemm(m=1)".into()
        }
    );
    assert!(r.to_string().contains("missing case fp8_gemm(m=1)"));

    let mut rs = clean_submission();
    rs.push(res("cpu", "add(n=7)", Outcome::Pass));
    let r = verify_with("v-dup", &i, &rs);
    assert_eq!(
        only(&r),
        Problem::Duplicate {
            id: "add(n=7)".into(),
            count: 2
        }
    );

    let mut rs = clean_submission();
    rs[2].outcome = Outcome::Fail;
    rs[2].message = "out.calc_diff 3e-3 > 1e-5".into();
    let r = verify_with("v-fail", &i, &rs);
    assert!(matches!(
        only(&r),
        Problem::NotConformant { ref id, outcome: Outcome::Fail, waiver: None, .. } if id == "mla_decode(b=1)"
    ));

    // NotSupported and waived failures are not conformant either.
    let mut rs = clean_submission();
    rs[0].outcome = Outcome::NotSupported;
    rs[1].outcome = Outcome::Crash;
    rs[1].waiver = Some("driver bug".into());
    let r = verify_with("v-ns", &i, &rs);
    assert_eq!(r.problems.len(), 2, "{r}");
    assert!(r.to_string().contains("waived: driver bug"), "{r}");
    assert!(
        r.to_string()
            .contains("0 missing, 0 duplicated, 2 not Pass or QualityWarning of which 1 waived"),
        "{r}"
    );

    let mut dirty = i.clone();
    dirty.git_dirty = Some(true);
    let r = verify_with("v-dirty", &dirty, &clean_submission());
    assert_eq!(only(&r), Problem::TreeNotClean(Some(true)));
    let mut unknown = i.clone();
    unknown.git_dirty = None;
    let r = verify_with("v-unknown", &unknown, &clean_submission());
    assert_eq!(only(&r), Problem::TreeNotClean(None));

    let mut nocommit = i.clone();
    nocommit.git_commit = None;
    let r = verify_with("v-nocommit", &nocommit, &clean_submission());
    assert_eq!(only(&r), Problem::CommitMissing);

    let mut old = i.clone();
    old.suite_version = "0.0.1+suite.0".into();
    let r = verify_with("v-version", &old, &clean_submission());
    assert!(
        matches!(only(&r), Problem::SuiteVersion { ref found, .. } if found == "0.0.1+suite.0")
    );

    let mut smoke = i.clone();
    smoke.profile = "smoke".into();
    let r = verify_with("v-profile", &smoke, &clean_submission());
    assert!(matches!(only(&r), Problem::Profile { ref found } if found == "smoke"));

    let mut rs = clean_submission();
    rs[3].backend = "other".into();
    let r = verify_with("v-foreign", &i, &rs);
    assert!(matches!(only(&r), Problem::ForeignBackend { .. }));
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn git_state_reads_commit_and_dirty_state() {
    let dir = tmp("git");
    assert_eq!(report::git_state(&dir.join("does-not-exist")), (None, None));
    if git(&dir, &["--version"]).is_none() {
        eprintln!("git is not installed: only the absent case is checked");
        return;
    }
    // A directory outside any work tree (the temp dir may sit in one on
    // some machines: only check when git agrees it is not).
    if git(&dir, &["rev-parse", "--is-inside-work-tree"]).is_none() {
        assert_eq!(report::git_state(&dir), (None, None));
    }
    git(&dir, &["init", "-q"]).expect("git init");
    std::fs::write(dir.join("a.txt"), "one\n").unwrap();
    git(&dir, &["add", "a.txt"]).unwrap();
    git(&dir, &["commit", "-q", "-m", "one"]).expect("git commit");
    let head = git(&dir, &["rev-parse", "HEAD"]).unwrap();
    assert_eq!(head.len(), 40);
    assert_eq!(report::git_state(&dir), (Some(head.clone()), Some(false)));
    std::fs::write(dir.join("a.txt"), "two\n").unwrap();
    assert_eq!(report::git_state(&dir), (Some(head.clone()), Some(true)));
    git(&dir, &["checkout", "-q", "a.txt"]).unwrap();
    std::fs::write(dir.join("new.txt"), "untracked\n").unwrap();
    assert_eq!(report::git_state(&dir), (Some(head), Some(true)));
}

// ---- The CI matrix (ci/matrix.yaml) and the GPU workflow template ----

/// Backends that have a job in the CI matrix before they exist in the tree.
const PLANNED_BACKENDS: [&str; 5] = ["cuda", "rocm", "vulkan", "wgpu", "mpi"];

/// One entry of `ci/matrix.yaml` (and of the workflow's `matrix.include`).
#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixEntry {
    kind: String,
    runner: Vec<String>,
    backend: String,
    features: String,
    profile: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Matrix {
    kinds: Vec<MatrixEntry>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read_matrix() -> Vec<MatrixEntry> {
    let path = repo_root().join("ci/matrix.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let m: Matrix = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    m.kinds
}

#[test]
fn ci_matrix_names_only_known_or_planned_backends() {
    let kinds = read_matrix();
    assert!(!kinds.is_empty());
    let registered = deepport_conformance::registry().names();
    let cargo_toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let features = cargo_toml
        .split("\n[features]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("[features] table in conformance/Cargo.toml");
    let has_feature = |f: &str| {
        features
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{f} =")))
    };
    let mut seen = BTreeSet::new();
    for k in &kinds {
        assert!(seen.insert(k.kind.as_str()), "kind {} listed twice", k.kind);
        assert!(
            !k.kind.is_empty()
                && k.kind
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "kind {:?}: lower-case letters, digits and `-` only (it names a directory)",
            k.kind
        );
        assert!(!k.runner.is_empty(), "{}: no runner labels", k.kind);
        let known = registered.contains(&k.backend.as_str());
        assert!(
            known || PLANNED_BACKENDS.contains(&k.backend.as_str()),
            "{}: backend {} is neither registered ({registered:?}) nor planned ({PLANNED_BACKENDS:?})",
            k.kind,
            k.backend
        );
        if known {
            assert!(
                has_feature(&k.features),
                "{}: cargo feature {} is not in conformance/Cargo.toml",
                k.kind,
                k.features
            );
        } else {
            // One feature per backend, named after it.
            assert_eq!(k.features, k.backend, "{}", k.kind);
        }
        assert!(
            deepport_conformance::suite::catalogue::PROFILES.contains(&k.profile.as_str()),
            "{}: unknown profile {}",
            k.kind,
            k.profile
        );
    }
    // The CPU backend is in the matrix, so the merged matrix always has a
    // column that runs anywhere.
    assert!(kinds.iter().any(|k| k.backend == "cpu"));
}

#[test]
fn gpu_workflow_matrix_matches_ci_matrix() {
    let path = repo_root().join(".github/workflows/gpu-conformance.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let wf: serde_json::Value = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    let include = wf["jobs"]["conformance"]["strategy"]["matrix"]["include"].clone();
    assert!(
        include.is_array(),
        "no jobs.conformance.strategy.matrix.include"
    );
    let entries: Vec<MatrixEntry> = serde_json::from_value(include).unwrap();
    assert_eq!(
        entries,
        read_matrix(),
        "the workflow's matrix differs from ci/matrix.yaml"
    );

    // The jobs do what the template promises.
    let steps = |job: &str| -> String {
        wf["jobs"][job]["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("job {job} has no steps"))
            .iter()
            .filter_map(|s| s["run"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let run = steps("conformance");
    for part in [
        "run --backend \"$BACKEND\"",
        "--profile \"$PROFILE\"",
        "--report \"reports/$KIND\"",
        "--isolate",
    ] {
        assert!(run.contains(part), "the conformance job lacks `{part}`");
    }
    let merge = steps("merge");
    assert!(merge.contains("deepport report merge"));
    assert!(merge.contains("--out matrix.md"));
    assert!(merge.contains("deepport verify"));
    assert!(merge.contains("GITHUB_STEP_SUMMARY"));
    assert_eq!(wf["jobs"]["merge"]["needs"], "conformance");
}
