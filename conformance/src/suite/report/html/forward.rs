//! `deepport forward --golden DIR --html FILE`: the error of every layer and
//! tap against its threshold, log scale, first divergence marked.

use super::svg::{Axis, Plot};
use super::{esc, page};
use crate::model_check::{ForwardReport, TapCheck};
use std::fmt::Write;

/// One forward run judged against golden data (one numerics mode).
#[derive(Clone, Copy, Debug)]
pub struct ForwardPlot<'a> {
    /// `f32`, `bf16`, `fp8`.
    pub mode: &'a str,
    pub backend: &'a str,
    /// `fused` or `paged`.
    pub prefill: &'a str,
    /// The golden file judged against.
    pub golden: &'a str,
    pub report: &'a ForwardReport,
}

/// What is plotted for a check: the error and its threshold. For metrics
/// where larger is better (cosine, agreement, both ≤ 1) the distance from
/// 1 is plotted, so that every point is "lower is better".
fn error_and_limit(c: &TapCheck) -> (f64, f64) {
    if c.at_least {
        (1.0 - c.value, 1.0 - c.threshold)
    } else {
        (c.value, c.threshold)
    }
}

/// The page: one plot and one table per run.
pub fn forward_page(runs: &[ForwardPlot<'_>]) -> String {
    let mut b = String::from("<h1>deepport forward against golden data</h1>");
    for (i, run) in runs.iter().enumerate() {
        let checks = &run.report.checks;
        let first = checks.iter().position(|c| !c.passed());
        let _ = write!(
            b,
            "<h2>{mode} numerics on {be} ({pf} prefill)</h2><p>Judged against <code>{g}</code>: \
             {n} check(s), {verdict}</p>",
            mode = esc(run.mode),
            be = esc(run.backend),
            pf = esc(run.prefill),
            g = esc(run.golden),
            n = checks.len(),
            verdict = match first {
                None => "<span class=\"pass\">every layer and tap within tolerance</span>".into(),
                Some(k) => format!(
                    "<span class=\"fail\" id=\"first-divergence-{i}\">first divergence: {}</span>",
                    esc(&checks[k].name)
                ),
            }
        );
        let y = Axis::log_fit(
            checks.iter().flat_map(|c| {
                let (e, t) = error_and_limit(c);
                [e, t]
            }),
            "error (1 − value for cosine and agreement)",
        );
        let n = checks.len().max(1) as f64;
        let mut x = Axis::linear(-0.5, n - 0.5, "layer and tap, in model order");
        // Label at most ~40 checks, always the first of each layer.
        let step = (checks.len() / 40).max(1);
        let mut ticks = Vec::new();
        let mut last_layer = None;
        for (k, c) in checks.iter().enumerate() {
            let layer = c.name.split('.').take(2).collect::<Vec<_>>().join(".");
            if k % step == 0 || last_layer.as_deref() != Some(layer.as_str()) {
                ticks.push((k as f64, c.name.clone()));
            }
            last_layer = Some(layer);
        }
        if ticks.len() > 60 {
            let s = ticks.len().div_ceil(60);
            ticks = ticks.into_iter().step_by(s).collect();
        }
        x.ticks = Some(ticks);
        let width = (260.0 + 14.0 * n).clamp(640.0, 1800.0);
        let mut p = Plot::new(
            &format!("{} — error per layer and tap vs threshold", run.mode),
            x,
            y,
            width,
            420.0,
        );
        p.rotate_x_labels = true;
        p.bottom_margin(150.0);
        for (k, c) in checks.iter().enumerate() {
            let (e, t) = error_and_limit(c);
            let op = if c.at_least { "≥" } else { "≤" };
            let tip = format!(
                "{}\n{} = {:.4e} (threshold {op} {:.4e}): {}",
                c.name,
                c.metric,
                c.value,
                c.threshold,
                if c.passed() { "pass" } else { "FAIL" }
            );
            p.dash(k as f64, t, 6.0, "#444", &format!("threshold of {tip}"));
            let color = if c.passed() { "#1a9850" } else { "#d73027" };
            p.point(k as f64, e, 4.0, color, &tip);
        }
        if let Some(k) = first {
            p.vline(
                k as f64,
                "#d73027",
                &format!("first divergence: {}", checks[k].name),
            );
        }
        p.legend("#1a9850", "within tolerance");
        p.legend("#d73027", "out of tolerance");
        p.legend("#444", "threshold (dash)");
        let _ = write!(b, "<div class=\"plots\">{}</div>", p.finish());
        b.push_str(
            "<table class=\"checks\"><tr><th>#</th><th>tap</th><th>metric</th><th>value</th>\
             <th>threshold</th><th>verdict</th></tr>",
        );
        for (k, c) in checks.iter().enumerate() {
            let op = if c.at_least { "≥" } else { "≤" };
            let mark = if Some(k) == first {
                " class=\"fail\""
            } else {
                ""
            };
            let _ = write!(
                b,
                "<tr{mark}><td class=\"num\">{k}</td><td>{}</td><td>{}</td><td class=\"num\">{:.4e}</td>\
                 <td class=\"num\">{op} {:.4e}</td><td>{}</td></tr>",
                esc(&c.name),
                esc(c.metric),
                c.value,
                c.threshold,
                if c.passed() { "pass" } else { "FAIL" }
            );
        }
        b.push_str("</table>");
    }
    page("deepport forward against golden data", &b, "")
}
