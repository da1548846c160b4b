//! The HTML reports: the run report (`report.html` written with every run
//! directory, `deepport report html`), the forward page (`forward --golden
//! --html`) and the roofline (`bench --html`).
//!
//! Without a browser: every page holds no reference to anything outside
//! itself, escapes what comes from data, and has one matrix cell per case
//! × backend. In a real browser (Debian's `chromium`, headless): each kind
//! of page loads without a JavaScript error, console message or CSP
//! violation, runs its script to the end, has its cells and SVGs, and its
//! filters and click details work. Without chromium the browser test is
//! skipped with a note, unless `DEEPPORT_REQUIRE` (comma separated) names
//! `chromium`: then a missing browser fails. `DEEPPORT_CHROMIUM` names the
//! binary when it is not `chromium` on PATH.

use deepport_conformance::model_check::{ForwardReport, TapCheck};
use deepport_conformance::suite::report::html::{
    bench_page, external_references, forward_page, BenchPoint, ForwardPlot, Roof, REPORT_HTML,
};
use deepport_conformance::suite::report::write_all;
use deepport_conformance::suite::{CaseResult, Outcome, RunInfo, SUITE_VERSION};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh empty directory under the target dir, unique per test.
fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("html-test-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What hostile data looks like: markup, quotes, a URL.
const HOSTILE: &str = "<script>alert(1)</script> \"q\" 'a' & https://evil.example/x.js";

fn info(backend: &str) -> RunInfo {
    RunInfo {
        suite_version: SUITE_VERSION.to_string(),
        profile: "v3-mustpass".into(),
        backend: backend.into(),
        device: format!("{backend}-dev <0>"),
        driver: "drv 1.0 & \"beta\"".into(),
        vendor: "acme".into(),
        git_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        git_dirty: Some(backend == "wgpu"),
        started_utc: "2026-01-02T03:04:05Z".into(),
        host: "testhost".into(),
        command: format!("deepport run --backend {backend} --report //server/share"),
    }
}

fn res(backend: &str, id: &str, outcome: Outcome, value: Option<f64>) -> CaseResult {
    CaseResult {
        id: id.into(),
        backend: backend.into(),
        device: format!("{backend}-dev <0>"),
        driver: "drv".into(),
        outcome,
        metric: Some("out.calc_diff".into()),
        value,
        threshold: Some(1e-5),
        worst_index: Some(vec![3, 1]),
        seed: 42,
        duration_s: 0.25,
        message: String::new(),
        waiver: None,
    }
}

/// Two runs: `cpu` with 8 cases over 4 families (every outcome, hostile
/// text, non-finite values, an id spelling `src=` as real ids do); `wgpu` lacking one case and holding another
/// twice, plus one case `cpu` lacks. 9 distinct cases in all.
fn two_runs(root: &Path) -> (PathBuf, PathBuf, usize) {
    let mut a = vec![
        res("cpu", "add(n=7)", Outcome::Pass, Some(1.5e-6)),
        res("cpu", "add(n=4096)", Outcome::QualityWarning, Some(2e-5)),
        res(
            "cpu",
            "fp8_gemm(m=1,n=2,k=3)",
            Outcome::Fail,
            Some(f64::NAN),
        ),
        res("cpu", "fp8_gemm(m=4,n=2,k=3)", Outcome::Crash, None),
        res("cpu", "mla_decode(b=1)", Outcome::Timeout, None),
        res("cpu", "mla_decode(b=2)", Outcome::NotSupported, None),
        res("cpu", "mla_decode(<b>=\"3\")", Outcome::Pass, Some(0.0)),
        res(
            "cpu",
            "copy_window(src=bf16,dst=f32)",
            Outcome::Pass,
            Some(0.0),
        ),
    ];
    a[2].message = HOSTILE.into();
    a[3].metric = None;
    a[3].threshold = None;
    a[4].value = Some(f64::INFINITY);
    let mut b: Vec<CaseResult> = a
        .iter()
        .filter(|r| r.id != "mla_decode(b=1)")
        .map(|r| CaseResult {
            backend: "wgpu".into(),
            device: "wgpu-dev".into(),
            ..r.clone()
        })
        .collect();
    b.push(res("wgpu", "add(n=7)", Outcome::Fail, Some(3e-4)));
    b.push(res("wgpu", "gemm(m=8)", Outcome::Pass, Some(1e-9)));
    b[0].waiver = Some(HOSTILE.into());
    let (da, db) = (root.join("cpu"), root.join("wgpu"));
    write_all(&da, &info("cpu"), &a).unwrap();
    write_all(&db, &info("wgpu"), &b).unwrap();
    (da, db, 9)
}

fn forward_report() -> ForwardReport {
    let c =
        |name: &str, metric: &'static str, value: f64, threshold: f64, at_least: bool| TapCheck {
            name: name.into(),
            metric,
            value,
            threshold,
            at_least,
        };
    ForwardReport {
        checks: vec![
            c("layers.0.q", "rel_rms", 1e-4, 1e-2, false),
            c("layers.0.attn_out", "rel_rms", 2e-3, 3e-2, false),
            c("layers.0.ffn_out", "rel_rms", 5e-2, 1e-2, false),
            c("layers.1.topk_idx", "routing_mismatches", 0.0, 2.0, false),
            c("layers.1.<ffn_out>", "rel_rms", 0.02, 1e-2, false),
            c("logits", "cosine_min", 0.995, 0.97, true),
            c("logits", "top1_agreement", 1.0, 0.75, true),
        ],
    }
}

fn bench_points() -> Vec<BenchPoint> {
    let p = |op: &str, shape: &str, backend: &str, tflops: f64, gbps: f64| BenchPoint {
        op: op.into(),
        shape: shape.into(),
        backend: backend.into(),
        device: format!("{backend} <dev>"),
        median_s: 1e-3,
        flops_per_s: tflops * 1e12,
        bytes_per_s: gbps * 1e9,
    };
    vec![
        p("fp8_gemm", "m=16,n=2112,k=7168", "cpu", 0.2, 15.0),
        p("fp8_gemm", "m=128,n=2112,k=7168", "cpu", 0.8, 8.0),
        p(
            "mla_decode",
            "b=1,s_q=1,h_q=128,s_k=4096",
            "cpu",
            0.01,
            20.0,
        ),
        p("fp8_gemm", "m=16,n=2112,k=7168", "cpu-ref", 0.001, 0.07),
        p("gemm", "m=1,n=1,k=1 <x>", "cpu-ref", 0.0, 0.0),
    ]
}

fn roof() -> Roof {
    Roof {
        flops_per_s: 1.2e12,
        bytes_per_s: 40e9,
        what: "test <roof>".into(),
    }
}

fn deepport(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepport"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The matrix rows of a page: for each `<tr data-f=…>`, its number of
/// cells and their `data-col`s.
fn matrix_rows(html: &str) -> Vec<Vec<usize>> {
    let Some(start) = html.find("<table id=\"matrix\"") else {
        return Vec::new();
    };
    let table = &html[start..];
    let table = &table[..table.find("</table>").unwrap_or(table.len())];
    table
        .split("<tr data-f=")
        .skip(1)
        .map(|row| {
            row.split("<td class=\"c ")
                .skip(1)
                .map(|cell| {
                    let k = cell.find("data-col=\"").expect("cell without data-col") + 10;
                    cell[k..k + cell[k..].find('"').unwrap()].parse().unwrap()
                })
                .collect()
        })
        .collect()
}

/// Asserts one cell per case × column, columns in order.
fn assert_cells(html: &str, cases: usize, cols: usize) {
    let rows = matrix_rows(html);
    assert_eq!(rows.len(), cases, "rows of the matrix");
    for r in &rows {
        assert_eq!(*r, (0..cols).collect::<Vec<_>>(), "cells of a row");
    }
}

/// The three kinds of page, written into `dir`: (file, kind).
fn all_pages(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let (a, b, _) = two_runs(dir);
    let run = dir.join("report.html");
    let (code, _, err) = deepport(&[
        "report",
        "html",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report = forward_report();
    let fwd = dir.join("forward.html");
    let plots = [
        ForwardPlot {
            mode: "fp8",
            backend: "cpu",
            prefill: "fused",
            golden: "golden/model/golden_fp8.safetensors",
            report: &report,
        },
        ForwardPlot {
            mode: "bf16 <x>",
            backend: "cpu",
            prefill: "paged",
            golden: HOSTILE,
            report: &ForwardReport::default(),
        },
    ];
    std::fs::write(&fwd, forward_page(&plots)).unwrap();
    let bench = dir.join("bench.html");
    std::fs::write(&bench, bench_page(Some(&roof()), &bench_points())).unwrap();
    let bench_bare = dir.join("bench-no-peak.html");
    std::fs::write(&bench_bare, bench_page(None, &[])).unwrap();
    vec![
        (run, "run"),
        (a.join(REPORT_HTML), "run"),
        (fwd, "forward"),
        (bench, "bench"),
        (bench_bare, "bench"),
    ]
}

#[test]
fn pages_are_self_contained_and_escape_their_data() {
    let dir = tmp("static");
    for (path, kind) in all_pages(&dir) {
        let html = std::fs::read_to_string(&path).unwrap();
        let refs = external_references(&html);
        assert!(refs.is_empty(), "{}: {refs:#?}", path.display());
        assert!(
            !html.contains("<script>alert"),
            "{}: unescaped data",
            path.display()
        );
        assert!(!html.contains("evil.example/"), "{}", path.display());
        assert!(
            html.contains("<svg") || path.ends_with("bench-no-peak.html"),
            "{kind}"
        );
        assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</html>\n"));
    }
    // The run page of both runs: 8 cases × 2 columns, the metadata, the
    // distribution of each family's metric.
    let run = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_cells(&run, 9, 2);
    assert!(run.contains("<span id=\"n-cases\">9</span>"));
    assert!(
        run.contains("no &#40;uncommitted changes)"),
        "clean-tree row"
    );
    assert!(run.contains(SUITE_VERSION));
    assert!(
        run.contains("data-o=\"NotRun\""),
        "mla_decode(b=1) was not run on wgpu"
    );
    assert!(
        run.contains(">F×2<"),
        "add(n=7) holds two wgpu results (the worst one colours the cell)"
    );
    assert!(run.contains("class=\"c o-Fail\" data-col=\"1\""));
    for fam in ["add", "copy_window", "fp8_gemm", "mla_decode", "gemm"] {
        assert!(
            run.contains(&format!("<div class=\"dist\" data-f=\"{fam}\">")),
            "{fam}"
        );
    }
    assert!(run.contains("mla_decode&#40;&lt;b&gt;&#61;&quot;3&quot;)"));
    assert!(run.contains("worst index&#58; [3, 1]"));
    // The report written with the run directory: one column.
    let one = std::fs::read_to_string(dir.join("cpu").join(REPORT_HTML)).unwrap();
    assert_cells(&one, 8, 1);
    // Forward: the first divergence named and marked.
    let fwd = std::fs::read_to_string(dir.join("forward.html")).unwrap();
    assert!(fwd.contains("id=\"first-divergence-0\">first divergence: layers.0.ffn_out<"));
    assert!(fwd.contains("class=\"marker\""), "first divergence line");
    assert_eq!(fwd.matches("<svg").count(), 2, "one plot per mode");
    // Bench: one plot per backend with the roof.
    let bench = std::fs::read_to_string(dir.join("bench.html")).unwrap();
    assert_eq!(bench.matches("<svg").count(), 2);
    assert_eq!(bench.matches("<title>roof&#58;").count(), 2);
    assert!(bench.contains("outside the axis") || bench.matches("class=\"pt\"").count() == 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pages_survive_odd_values() {
    use deepport_conformance::suite::report::html::{run_page, RunRef};
    let odd = [
        0.0,
        -0.0,
        -1.0,
        1e-300,
        1e300,
        f64::MIN_POSITIVE,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    let mut results = Vec::new();
    for (i, v) in odd.iter().enumerate() {
        for (j, t) in odd.iter().enumerate() {
            let mut r = res(
                "cpu",
                &format!("odd{i}_{j}"),
                Outcome::ALL[(i + j) % 6],
                Some(*v),
            );
            r.threshold = Some(*t);
            r.duration_s = odd[(i * 7 + j) % odd.len()];
            r.worst_index = Some(vec![usize::MAX; i]);
            r.seed = u64::MAX;
            r.message = "\u{0}\u{7}\r\n\u{202e}é".repeat(j);
            results.push(r);
        }
    }
    results.push(CaseResult {
        id: String::new(),
        metric: Some(String::new()),
        ..res("", "", Outcome::Fail, None)
    });
    let info = info("cpu");
    let html = run_page(&[RunRef {
        dir: Path::new("/odd//dir"),
        info: &info,
        results: &results,
    }]);
    assert!(
        external_references(&html).is_empty(),
        "{:?}",
        external_references(&html)
    );
    // 81 cases of `cpu` and one with an empty id of an empty backend: 82
    // cases × 2 columns.
    assert_eq!(
        matrix_rows(&html).iter().map(Vec::len).sum::<usize>(),
        (odd.len() * odd.len() + 1) * 2
    );
    assert!(
        !html.contains("NaN\"") && !html.contains("inf\""),
        "non-finite SVG coordinates"
    );
    let empty = run_page(&[]);
    assert!(empty.contains("<span id=\"n-cases\">0</span>"));
    let checks = odd
        .iter()
        .enumerate()
        .map(|(i, v)| TapCheck {
            name: format!("layers.{i}.x"),
            metric: "rel_rms",
            value: *v,
            threshold: odd[odd.len() - 1 - i],
            at_least: i % 2 == 0,
        })
        .collect();
    let report = ForwardReport { checks };
    let plot = ForwardPlot {
        mode: "fp8",
        backend: "cpu",
        prefill: "fused",
        golden: "g",
        report: &report,
    };
    let fwd = forward_page(&[plot]);
    assert!(external_references(&fwd).is_empty());
    assert!(!fwd.contains("NaN\""), "non-finite SVG coordinates");
    let points: Vec<BenchPoint> = odd
        .iter()
        .map(|v| BenchPoint {
            op: "x".into(),
            shape: String::new(),
            backend: "b".into(),
            device: String::new(),
            median_s: *v,
            flops_per_s: *v,
            bytes_per_s: 1.0 / *v,
        })
        .collect();
    let bad_roof = Roof {
        flops_per_s: f64::NAN,
        bytes_per_s: 0.0,
        what: String::new(),
    };
    let bench = bench_page(Some(&bad_roof), &points);
    assert!(external_references(&bench).is_empty());
    assert!(!bench.contains("NaN\""), "non-finite SVG coordinates");
    assert!(
        bench.contains("No roof"),
        "a roof that is not a number is not drawn"
    );
}

#[test]
fn report_html_names_a_missing_or_corrupt_run() {
    let dir = tmp("errors");
    let (code, _, err) = deepport(&["report", "html", dir.join("nope").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("run.json"), "{err}");
    let (a, _, _) = two_runs(&dir);
    std::fs::write(a.join("results.jsonl"), "{\"id\": 3}\n").unwrap();
    let out = dir.join("out.html");
    let (code, _, err) = deepport(&[
        "report",
        "html",
        a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("results.jsonl:1"), "{err}");
    assert!(!out.exists(), "no page for a corrupt run");
    // An unwritable output is exit status 1.
    let b = dir.join("wgpu");
    let (code, _, err) = deepport(&[
        "report",
        "html",
        b.to_str().unwrap(),
        "--out",
        dir.join("no/such/dir/x.html").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "cpu")]
#[test]
fn forward_and_bench_write_their_pages() {
    let dir = tmp("cli");
    let g = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../golden/model");
    let fwd = dir.join("forward.html");
    let (code, out, err) = deepport(&[
        "forward",
        "--checkpoint",
        g.to_str().unwrap(),
        "--mode",
        "f32",
        "--golden",
        g.to_str().unwrap(),
        "--html",
        fwd.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let html = std::fs::read_to_string(&fwd).unwrap();
    assert!(external_references(&html).is_empty());
    assert!(html.contains("every layer and tap within tolerance"));
    assert!(html.contains("layers.0.attn_out"), "every tap in the table");
    // --html needs --golden.
    let (code, _, err) = deepport(&[
        "forward",
        "--checkpoint",
        g.to_str().unwrap(),
        "--tokens",
        "1",
        "--html",
        fwd.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    let bench = dir.join("bench.html");
    let (code, out, err) = deepport(&[
        "bench",
        "--backend",
        "cpu,cpu-ref",
        "--op",
        "fp8_gemm",
        "--shape",
        "m=4,n=128,k=128",
        "--min-time",
        "0",
        "--min-iters",
        "1",
        "--html",
        bench.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let html = std::fs::read_to_string(&bench).unwrap();
    assert!(external_references(&html).is_empty());
    assert_eq!(html.matches("<svg").count(), 2, "one roofline per backend");
    assert_eq!(
        html.matches("<title>roof&#58;").count(),
        2,
        "the measured roof"
    );
    assert!(
        html.contains("k&#61;128,m&#61;4,n&#61;128"),
        "the shape in the table"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- browser

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DEEPPORT_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for d in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn chromium_required() -> bool {
    std::env::var("DEEPPORT_REQUIRE").is_ok_and(|v| v.split(',').any(|s| s.trim() == "chromium"))
}

/// What the browser made of a page.
struct Loaded {
    dom: String,
    /// Console lines chromium logged (`…:CONSOLE:…] "message", source: …`).
    console: Vec<String>,
}

fn load(browser: &Path, page: &Path, profile: &Path, extra: &[&str]) -> Loaded {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    Loaded {
        dom: String::from_utf8_lossy(&out.stdout).into_owned(),
        console: stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .map(String::from)
            .collect(),
    }
}

/// The problems a loaded page shows: errors it recorded, console lines, a
/// script that did not finish.
fn problems(l: &Loaded) -> Vec<String> {
    let mut p: Vec<String> = l.console.clone();
    if !l.dom.contains("<pre id=\"js-errors\" hidden=\"\"></pre>") {
        let s = l.dom.find("<pre id=\"js-errors\"").unwrap_or(0);
        p.push(format!(
            "recorded errors: {}",
            &l.dom[s..(s + 400).min(l.dom.len())]
        ));
    }
    if !l.dom.contains("data-ready=\"1\"") {
        p.push("the page's script did not run to its end".into());
    }
    p
}

#[test]
fn pages_load_in_a_real_browser() {
    let Some(browser) = chromium() else {
        assert!(
            !chromium_required(),
            "DEEPPORT_REQUIRE names chromium, but no chromium is on PATH (nor DEEPPORT_CHROMIUM)"
        );
        eprintln!("note: skipped: no chromium on PATH (set DEEPPORT_CHROMIUM, or install Debian's chromium)");
        return;
    };
    let dir = tmp("browser");
    let profile = dir.join("profile");
    for (page, kind) in all_pages(&dir) {
        let l = load(&browser, &page, &profile, &["--dump-dom"]);
        let p = problems(&l);
        assert!(p.is_empty(), "{}: {p:#?}", page.display());
        let svgs = l.dom.matches("<svg").count();
        match kind {
            "run" => {
                let (cases, cols) = if page.ends_with("cpu/report.html") {
                    (8, 1)
                } else {
                    (9, 2)
                };
                assert_cells(&l.dom, cases, cols);
                assert!(
                    l.dom.contains(&format!("{cases} of {cases} cases shown")),
                    "filter count"
                );
                assert!(svgs >= 3, "{svgs} SVGs");
            }
            "forward" => assert_eq!(svgs, 2),
            _ => assert_eq!(svgs, if page.ends_with("bench.html") { 2 } else { 0 }),
        }
        let shot = dir.join(format!(
            "{}.png",
            page.file_stem().unwrap().to_string_lossy()
        ));
        let _ = load(
            &browser,
            &page,
            &profile,
            &[
                "--window-size=1280,1600",
                &format!("--screenshot={}", shot.display()),
            ],
        );
        let png = std::fs::read(&shot).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 2000,
            "{}",
            shot.display()
        );
    }

    // The filters and the click details, driven by a script appended to a
    // copy of the two-run page.
    let run = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let drive = "<script>(function(){\
        var f=document.getElementById('f-family');f.value='mla_decode';f.dispatchEvent(new Event('change'));\
        var shown=[].filter.call(document.querySelectorAll('#matrix tbody tr'),function(r){return !r.hidden;}).length;\
        var o=document.getElementById('f-outcome');o.value='bad';o.dispatchEvent(new Event('change'));\
        var bad=[].filter.call(document.querySelectorAll('#matrix tbody tr'),function(r){return !r.hidden;}).length;\
        var d=[].filter.call(document.querySelectorAll('.dist'),function(x){return !x.hidden;}).length;\
        document.querySelector('#matrix td.o-Fail').click();\
        var det=document.getElementById('detail');\
        document.body.setAttribute('data-test','family='+shown+' bad='+bad+' dists='+d+' detail='+(!det.hidden&&det.textContent.indexOf('seed: 42')>=0));\
        })();</script></body>";
    let driven = dir.join("driven.html");
    std::fs::write(&driven, run.replacen("</body>", drive, 1)).unwrap();
    let l = load(&browser, &driven, &profile, &["--dump-dom"]);
    assert!(problems(&l).is_empty(), "{:#?}", problems(&l));
    // mla_decode: 3 cases; not conformant somewhere: b=1 (Timeout, not run
    // on wgpu) and b=2 (NotSupported); one distribution section.
    assert!(
        l.dom
            .contains("data-test=\"family=3 bad=2 dists=1 detail=true\""),
        "{}",
        &l.dom[..l.dom.find("<pre").unwrap_or(0).min(600)]
    );

    // The check sees errors: a throwing script and a blocked external
    // image are both caught.
    for (name, inject) in [
        ("throws", "<script>undefinedFunction();</script></body>"),
        (
            "fetches",
            "<img src=\"https://example.invalid/x.png\"></body>",
        ),
    ] {
        let bad = dir.join(format!("{name}.html"));
        std::fs::write(&bad, run.replacen("</body>", inject, 1)).unwrap();
        let l = load(&browser, &bad, &profile, &["--dump-dom"]);
        assert!(
            !problems(&l).is_empty(),
            "{name}: the browser check saw nothing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
