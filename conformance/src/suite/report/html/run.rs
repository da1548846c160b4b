//! The run report: cases × backends matrix, closeness to the thresholds per
//! family and metric, run metadata.

use super::svg::{Axis, Plot, PALETTE};
use super::{esc, page, write_page};
use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use crate::suite::report::{family_of, fmt_value, read_dir, ReportError};
use crate::types::{CaseResult, Outcome, RunInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// One run directory's contents.
#[derive(Clone, Copy, Debug)]
pub struct RunRef<'a> {
    pub dir: &'a Path,
    pub info: &'a RunInfo,
    pub results: &'a [CaseResult],
}

/// One column of the matrix: one backend of one run.
struct Column<'a> {
    heading: String,
    run: RunRef<'a>,
    backend: String,
    device: String,
    driver: String,
    cells: BTreeMap<&'a str, Vec<&'a CaseResult>>,
}

fn columns<'a>(runs: &[RunRef<'a>]) -> Vec<Column<'a>> {
    let mut cols = Vec::new();
    for run in runs {
        let mut backends: Vec<&str> = Vec::new();
        for r in run.results {
            if !backends.contains(&r.backend.as_str()) {
                backends.push(&r.backend);
            }
        }
        if backends.is_empty() {
            backends.push(&run.info.backend);
        }
        for b in backends {
            let mine: Vec<&CaseResult> = run.results.iter().filter(|r| r.backend == b).collect();
            let pick = |f: fn(&CaseResult) -> &str, fallback: &str| {
                mine.iter()
                    .map(|r| f(r))
                    .find(|s| !s.is_empty())
                    .unwrap_or(fallback)
                    .to_string()
            };
            let device = pick(|r| &r.device, &run.info.device);
            let driver = pick(|r| &r.driver, &run.info.driver);
            let mut cells: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
            for r in mine {
                cells.entry(r.id.as_str()).or_default().push(r);
            }
            cols.push(Column {
                heading: format!("{b} ({device})"),
                run: *run,
                backend: b.to_string(),
                device,
                driver,
                cells,
            });
        }
    }
    let headings: Vec<String> = cols.iter().map(|c| c.heading.clone()).collect();
    for (i, c) in cols.iter_mut().enumerate() {
        if headings.iter().filter(|h| **h == headings[i]).count() > 1 {
            c.heading = format!("{} [{}]", c.heading, c.run.dir.display());
        }
    }
    cols
}

/// Severity for picking the cell colour when a column holds a case twice.
fn severity(o: Outcome) -> u8 {
    match o {
        Outcome::Pass => 0,
        Outcome::QualityWarning => 1,
        Outcome::NotSupported => 2,
        Outcome::Fail => 3,
        Outcome::Timeout => 4,
        Outcome::Crash => 5,
    }
}

fn short_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "P",
        Outcome::QualityWarning => "QW",
        Outcome::Fail => "F",
        Outcome::NotSupported => "N/S",
        Outcome::Crash => "C",
        Outcome::Timeout => "T",
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), fmt_value)
}

/// The tooltip (and click detail) of one result.
fn detail(r: &CaseResult) -> String {
    let mut s = format!(
        "{}\nbackend: {} on {}\noutcome: {}\nmetric: {}\nvalue: {}\nthreshold: {}",
        r.id,
        r.backend,
        r.device,
        r.outcome.label(),
        r.metric.as_deref().unwrap_or("–"),
        opt(r.value),
        opt(r.threshold),
    );
    if let (Some(v), Some(t)) = (r.value, r.threshold) {
        if t != 0.0 && v.is_finite() {
            let _ = write!(s, " (value/threshold {:.3})", v / t);
        }
    }
    let wi = r.worst_index.as_ref().map_or("–".to_string(), |w| {
        format!(
            "[{}]",
            w.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    let _ = write!(
        s,
        "\nworst index: {wi}\nseed: {}\nduration: {:.3} s",
        r.seed, r.duration_s
    );
    if !r.message.is_empty() {
        let _ = write!(s, "\nmessage: {}", r.message);
    }
    if let Some(w) = &r.waiver {
        let _ = write!(s, "\nwaiver: {w}");
    }
    s
}

/// The value/threshold ratio of a result, when it has both; `0` when both
/// are 0 (an exact check that passed), `inf` for a nonzero value over a
/// zero threshold or a non-finite value.
fn ratio(r: &CaseResult) -> Option<f64> {
    let (v, t) = (r.value?, r.threshold?);
    Some(if !v.is_finite() {
        f64::INFINITY
    } else if t == 0.0 {
        if v == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (v / t).abs()
    })
}

const RUN_JS: &str = "(function(){\
var fam=document.getElementById('f-family'),out=document.getElementById('f-outcome');\
var rows=document.querySelectorAll('#matrix tbody tr');var dists=document.querySelectorAll('.dist');\
var det=document.getElementById('detail');\
function apply(){var f=fam.value,o=out.value,shown=0;\
for(var i=0;i<rows.length;i++){var r=rows[i];\
var ok=(f===''||r.getAttribute('data-f')===f)&&(o===''||r.getAttribute('data-os').indexOf(' '+o+' ')>=0);\
r.hidden=!ok;if(ok)shown++;}\
for(var j=0;j<dists.length;j++){dists[j].hidden=!(f===''||dists[j].getAttribute('data-f')===f);}\
document.getElementById('f-count').textContent=shown+' of '+rows.length+' cases shown';}\
fam.addEventListener('change',apply);out.addEventListener('change',apply);\
document.getElementById('matrix').addEventListener('click',function(ev){\
var td=ev.target.closest('td.c');if(!td)return;\
var cols=document.querySelectorAll('#matrix thead th.col');var k=+td.getAttribute('data-col');\
det.textContent=(cols[k]?cols[k].textContent+'\\n':'')+(td.getAttribute('title')||'');det.hidden=false;});\
det.addEventListener('click',function(){det.hidden=true;});\
apply();})();";

/// The report page of one or more runs.
pub fn run_page(runs: &[RunRef<'_>]) -> String {
    let cols = columns(runs);
    let ids: BTreeSet<&str> = cols.iter().flat_map(|c| c.cells.keys().copied()).collect();
    let families: BTreeSet<&str> = ids.iter().map(|id| family_of(id)).collect();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>deepport conformance report</h1><p><span id=\"n-cases\">{}</span> case(s) × \
         <span id=\"n-cols\">{}</span> backend column(s) from {} run director{}. Pass and \
         QualityWarning are conformant; NotSupported is never a pass.</p>",
        ids.len(),
        cols.len(),
        runs.len(),
        if runs.len() == 1 { "y" } else { "ies" }
    );

    // Run metadata.
    b.push_str("<h2>Runs</h2><table id=\"runs\"><tr><th></th>");
    for c in &cols {
        let _ = write!(b, "<th>{}</th>", esc(&c.heading));
    }
    b.push_str("</tr>");
    type Field = fn(&Column<'_>) -> String;
    let fields: [(&str, Field); 13] = [
        ("directory", |c| c.run.dir.display().to_string()),
        ("backend", |c| c.backend.clone()),
        ("device", |c| c.device.clone()),
        ("driver", |c| c.driver.clone()),
        ("vendor", |c| c.run.info.vendor.clone()),
        ("suite version", |c| c.run.info.suite_version.clone()),
        ("profile", |c| c.run.info.profile.clone()),
        ("git commit", |c| {
            c.run.info.git_commit.clone().unwrap_or("unknown".into())
        }),
        ("clean tree", |c| {
            match c.run.info.git_dirty {
                Some(false) => "yes",
                Some(true) => "no (uncommitted changes)",
                None => "unknown",
            }
            .into()
        }),
        ("started (UTC)", |c| c.run.info.started_utc.clone()),
        ("host", |c| c.run.info.host.clone()),
        ("command", |c| c.run.info.command.clone()),
        ("results", |c| {
            let n: usize = c.cells.values().map(Vec::len).sum();
            format!("{n} result(s), {} case(s)", c.cells.len())
        }),
    ];
    for (name, f) in fields {
        let _ = write!(b, "<tr><th>{name}</th>");
        for c in &cols {
            let v = f(c);
            let class = if name == "clean tree" && v != "yes" {
                " class=\"fail\""
            } else {
                ""
            };
            let _ = write!(b, "<td{class}>{}</td>", esc(&v));
        }
        b.push_str("</tr>");
    }
    b.push_str("</table>");

    // Outcome counts.
    b.push_str("<h2>Outcomes</h2><table id=\"counts\"><tr><th>outcome</th>");
    for c in &cols {
        let _ = write!(b, "<th>{}</th>", esc(&c.heading));
    }
    b.push_str("</tr>");
    for o in Outcome::ALL {
        let _ = write!(b, "<tr><td class=\"o-{l}\">{l}</td>", l = o.label());
        for c in &cols {
            let n = c
                .cells
                .values()
                .flatten()
                .filter(|r| r.outcome == o)
                .count();
            let _ = write!(b, "<td class=\"num\">{n}</td>");
        }
        b.push_str("</tr>");
    }
    b.push_str("<tr><td class=\"o-NotRun\">not run</td>");
    for c in &cols {
        let n = ids.iter().filter(|id| !c.cells.contains_key(*id)).count();
        let _ = write!(b, "<td class=\"num\">{n}</td>");
    }
    b.push_str("</tr></table>");

    // The matrix.
    b.push_str(
        "<h2>Matrix</h2><div class=\"filters\"><label>family <select id=\"f-family\"><option value=\"\">all</option>",
    );
    for f in &families {
        let _ = write!(b, "<option value=\"{e}\">{e}</option>", e = esc(f));
    }
    b.push_str(
        "</select></label><label>outcome <select id=\"f-outcome\"><option value=\"\">all</option>\
         <option value=\"bad\">not conformant (Fail, Crash, Timeout, NotSupported, not run)</option>",
    );
    for o in Outcome::ALL {
        let _ = write!(b, "<option value=\"{l}\">{l}</option>", l = o.label());
    }
    b.push_str(
        "<option value=\"NotRun\">not run</option></select></label><span id=\"f-count\"></span></div>\
         <p class=\"legend\">",
    );
    for o in Outcome::ALL {
        let _ = write!(
            b,
            "<span class=\"o-{}\">{} {}</span>",
            o.label(),
            short_label(o),
            o.label()
        );
    }
    b.push_str(
        "<span class=\"o-NotRun\">– not run</span> <span class=\"note\">Hover a cell for its metric, \
         value, threshold, worst index, seed and duration; click it to keep them.</span></p>\
         <table id=\"matrix\"><thead><tr><th>case</th>",
    );
    for (k, c) in cols.iter().enumerate() {
        let _ = write!(
            b,
            "<th class=\"col\" data-col=\"{k}\">{}</th>",
            esc(&c.heading)
        );
    }
    b.push_str("</tr></thead><tbody>");
    for id in &ids {
        let mut row = String::new();
        let mut os: BTreeSet<&str> = BTreeSet::new();
        for (k, c) in cols.iter().enumerate() {
            match c.cells.get(id) {
                None => {
                    os.insert("NotRun");
                    os.insert("bad");
                    let _ = write!(
                        row,
                        "<td class=\"c o-NotRun\" data-col=\"{k}\" data-o=\"NotRun\" title=\"{}\">–</td>",
                        esc(&format!("{id}\nnot run on this backend"))
                    );
                }
                Some(rs) => {
                    let worst = rs
                        .iter()
                        .map(|r| r.outcome)
                        .max_by_key(|o| severity(*o))
                        .unwrap_or(Outcome::Fail);
                    for r in rs {
                        os.insert(r.outcome.label());
                        if !r.outcome.is_conformant() {
                            os.insert("bad");
                        }
                    }
                    let mut tip = rs
                        .iter()
                        .map(|r| detail(r))
                        .collect::<Vec<_>>()
                        .join("\n\n");
                    let mut text = short_label(worst).to_string();
                    if rs.len() > 1 {
                        tip = format!("{} results for this case:\n\n{tip}", rs.len());
                        text.push_str(&format!("×{}", rs.len()));
                    }
                    let _ = write!(
                        row,
                        "<td class=\"c o-{l}\" data-col=\"{k}\" data-o=\"{l}\" title=\"{}\">{text}</td>",
                        esc(&tip),
                        l = worst.label(),
                    );
                }
            }
        }
        let os: Vec<&str> = os.into_iter().collect();
        let _ = write!(
            b,
            "<tr data-f=\"{}\" data-os=\" {} \"><th class=\"case\">{}</th>{row}</tr>",
            esc(family_of(id)),
            os.join(" "),
            esc(id)
        );
    }
    b.push_str("</tbody></table><div id=\"detail\" hidden title=\"click to close\"></div>");

    // Closeness to the threshold.
    b.push_str(
        "<h2>How close to failing</h2><p class=\"note\">Per op family and metric: how many cases \
         have each value/threshold ratio (log scale; 1 is the threshold, beyond it a case fails \
         or warns). Left of the axis: value 0; right: NaN, infinite, or nonzero where the \
         threshold is 0.</p><p class=\"legend\">",
    );
    for (k, c) in cols.iter().enumerate() {
        let _ = write!(
            b,
            "<span style=\"border-left:12px solid {}\">{}</span>",
            PALETTE[k % PALETTE.len()],
            esc(&c.heading)
        );
    }
    b.push_str("</p><div class=\"plots\">");
    b.push_str(&distributions(&cols, &families));
    b.push_str("</div>");
    page("deepport conformance report", &b, RUN_JS)
}

/// Histograms of log10(value/threshold) per family and metric, one series
/// per column.
fn distributions(cols: &[Column<'_>], families: &BTreeSet<&str>) -> String {
    const LO: f64 = -8.0; // decades below the threshold shown
    const HI: f64 = 2.0;
    const BIN: f64 = 0.5;
    let nbins = ((HI - LO) / BIN) as usize;
    let mut s = String::new();
    for fam in families {
        // metric → per column → bins (0: zero, 1..=nbins, nbins+1: overflow).
        let mut hist: BTreeMap<&str, Vec<Vec<usize>>> = BTreeMap::new();
        for (k, c) in cols.iter().enumerate() {
            for r in c.cells.values().flatten() {
                if family_of(&r.id) != *fam {
                    continue;
                }
                let (Some(m), Some(q)) = (r.metric.as_deref(), ratio(r)) else {
                    continue;
                };
                let h = hist
                    .entry(m)
                    .or_insert_with(|| vec![vec![0; nbins + 2]; cols.len()]);
                let bin = if q == 0.0 {
                    0
                } else if !q.is_finite() {
                    nbins + 1
                } else {
                    let i = ((q.log10() - LO) / BIN).floor();
                    i.clamp(0.0, nbins as f64 - 1.0) as usize + 1
                };
                h[k][bin] += 1;
            }
        }
        if hist.is_empty() {
            continue;
        }
        let _ = write!(
            s,
            "<div class=\"dist\" data-f=\"{f}\"><h3>{f}</h3><div class=\"plots\">",
            f = esc(fam)
        );
        for (metric, h) in &hist {
            let ymax = h.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
            let mut x = Axis::linear(LO - 2.0 * BIN, HI + 2.0 * BIN, "value / threshold");
            let mut ticks = vec![(LO - 1.5 * BIN, "0".to_string())];
            let mut e = LO;
            while e <= HI {
                ticks.push((e, format!("1e{e:.0}")));
                e += 2.0;
            }
            ticks.push((HI + 1.5 * BIN, "∞".to_string()));
            x.ticks = Some(ticks);
            let y = Axis::linear(0.0, (ymax * 1.1).max(5.0), "cases");
            let mut p = Plot::new(metric, x, y, 460.0, 220.0);
            let ncols = cols.len().max(1) as f64;
            for (k, counts) in h.iter().enumerate() {
                let color = PALETTE[k % PALETTE.len()];
                for (bin, &n) in counts.iter().enumerate() {
                    if n == 0 {
                        continue;
                    }
                    let (x0, what) = if bin == 0 {
                        (LO - 2.0 * BIN, "value 0".to_string())
                    } else if bin == nbins + 1 {
                        (
                            HI + BIN,
                            "NaN, infinite or nonzero over a zero threshold".to_string(),
                        )
                    } else {
                        let a = LO + (bin - 1) as f64 * BIN;
                        (a, format!("ratio 1e{a:.1} to 1e{:.1}", a + BIN))
                    };
                    let w = BIN / ncols;
                    let xa = x0 + w * k as f64;
                    p.bar(
                        xa,
                        xa + w,
                        n as f64,
                        color,
                        &format!("{}: {n} case(s), {what}", cols[k].heading),
                    );
                }
            }
            p.vline(0.0, "#b00", "threshold");
            s.push_str(&p.finish());
        }
        s.push_str("</div></div>");
    }
    s
}

/// Reads run directories and renders their report page.
pub fn report_html(dirs: &[PathBuf]) -> Result<String, ReportError> {
    let mut runs = Vec::with_capacity(dirs.len());
    for d in dirs {
        let (info, results) = read_dir(d)?;
        runs.push((d.clone(), info, results));
    }
    let refs: Vec<RunRef<'_>> = runs
        .iter()
        .map(|(dir, info, results)| RunRef { dir, info, results })
        .collect();
    Ok(run_page(&refs))
}

/// `deepport report html DIR... [--out FILE]`.
#[derive(clap::Args, Debug, Clone)]
pub struct HtmlArgs {
    /// Run directories (each written by `deepport run --report DIR`); each
    /// backend of each run is one column of the matrix.
    #[arg(value_name = "DIR", required = true)]
    pub dirs: Vec<PathBuf>,
    /// Write the page here (atomically) instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Runs `deepport report html`: exit status 0 when the page was written,
/// 2 when a run directory cannot be read, 1 when the output cannot be written.
pub fn html_main(args: HtmlArgs) -> ExitCode {
    let code = |c: i32| ExitCode::from(u8::try_from(c).unwrap_or(1));
    let html = match report_html(&args.dirs) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return code(EXIT_USAGE);
        }
    };
    let written = match &args.out {
        Some(p) => write_page(p, &html),
        None => std::io::Write::write_all(&mut std::io::stdout().lock(), html.as_bytes()),
    };
    match written {
        Ok(()) => {
            if let Some(p) = &args.out {
                eprintln!("wrote {} ({} run(s))", p.display(), args.dirs.len());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            code(EXIT_FAILURE)
        }
    }
}
