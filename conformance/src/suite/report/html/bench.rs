//! `deepport bench --html FILE`: the roofline of the machine (measured peak
//! FLOP/s and bandwidth) with every measured shape as a point, one plot per
//! backend.

use super::svg::{short, Axis, Plot, PALETTE};
use super::{esc, page};
use std::collections::BTreeSet;
use std::fmt::Write;

/// The measured roof: peak FLOP/s and streaming bandwidth.
#[derive(Clone, Debug)]
pub struct Roof {
    pub flops_per_s: f64,
    pub bytes_per_s: f64,
    /// What was measured, e.g. `host: avx512 FMA on 2 threads`.
    pub what: String,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct BenchPoint {
    pub op: String,
    pub shape: String,
    pub backend: String,
    pub device: String,
    pub median_s: f64,
    /// Achieved FLOP/s and bytes/s (by DeepGEMM's and FlashMLA's formulas).
    pub flops_per_s: f64,
    pub bytes_per_s: f64,
}

impl BenchPoint {
    /// Arithmetic intensity in FLOP per byte.
    pub fn intensity(&self) -> f64 {
        self.flops_per_s / self.bytes_per_s
    }
}

/// The page.
pub fn bench_page(roof: Option<&Roof>, points: &[BenchPoint]) -> String {
    let mut b = String::from("<h1>deepport bench: roofline</h1>");
    let pos = |v: f64| v.is_finite() && v > 0.0;
    let roof = roof.filter(|r| pos(r.flops_per_s) && pos(r.bytes_per_s));
    match roof {
        Some(r) => {
            let _ = write!(
                b,
                "<p>Roof: peak {} GFLOP/s, streaming bandwidth {} GB/s ({}); ridge at {} FLOP/byte. \
                 A point on the roof runs at the machine's limit for its arithmetic intensity.</p>",
                short(r.flops_per_s / 1e9),
                short(r.bytes_per_s / 1e9),
                esc(&r.what),
                short(r.flops_per_s / r.bytes_per_s)
            );
        }
        None => b.push_str(
            "<p class=\"note\">No roof: the peaks were not measured (--no-peak) or not usable.</p>",
        ),
    }
    let mut backends: Vec<&str> = Vec::new();
    for p in points {
        if !backends.contains(&p.backend.as_str()) {
            backends.push(&p.backend);
        }
    }
    let ops: Vec<&str> = points
        .iter()
        .map(|p| p.op.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ok = |p: &BenchPoint| {
        p.flops_per_s.is_finite()
            && p.bytes_per_s.is_finite()
            && p.flops_per_s > 0.0
            && p.bytes_per_s > 0.0
    };
    // Shared axes, so that backends compare at a glance.
    let mut xs: Vec<f64> = points
        .iter()
        .filter(|p| ok(p))
        .map(|p| p.intensity())
        .collect();
    let mut ys: Vec<f64> = points
        .iter()
        .filter(|p| ok(p))
        .map(|p| p.flops_per_s)
        .collect();
    if let Some(r) = roof {
        xs.push(r.flops_per_s / r.bytes_per_s);
        ys.push(r.flops_per_s);
    }
    let x = Axis::log_fit(xs, "arithmetic intensity (FLOP/byte)");
    let y = Axis::log_fit(ys, "FLOP/s");
    b.push_str("<div class=\"plots\">");
    if backends.is_empty() {
        b.push_str("<p class=\"note\">No measurement.</p>");
    }
    for be in &backends {
        let mine: Vec<&BenchPoint> = points.iter().filter(|p| p.backend == *be).collect();
        let device = mine.first().map_or("", |p| p.device.as_str());
        let mut plot = Plot::new(
            &format!("{be} ({device})"),
            x.clone(),
            y.clone(),
            560.0,
            380.0,
        );
        if let Some(r) = roof {
            let ridge = r.flops_per_s / r.bytes_per_s;
            let x0 = plot.x.lo;
            let x1 = plot.x.hi;
            let tip = format!(
                "roof: min({} GFLOP/s, {} GB/s × intensity)",
                short(r.flops_per_s / 1e9),
                short(r.bytes_per_s / 1e9)
            );
            let mut pts = Vec::new();
            if ridge > x0 {
                pts.push((x0, r.bytes_per_s * x0));
            }
            pts.push((ridge.clamp(x0, x1), r.flops_per_s.min(r.bytes_per_s * x1)));
            pts.push((x1, r.flops_per_s.min(r.bytes_per_s * x1)));
            plot.line(&pts, "#b00", false, &tip);
        }
        for p in &mine {
            if !ok(p) {
                continue;
            }
            let k = ops.iter().position(|o| *o == p.op).unwrap_or(0);
            let color = PALETTE[k % PALETTE.len()];
            let frac = roof.map(|r| {
                let bound = r.flops_per_s.min(r.bytes_per_s * p.intensity());
                format!(", {:.1}% of the roof", 100.0 * p.flops_per_s / bound)
            });
            plot.point(
                p.intensity(),
                p.flops_per_s,
                4.0,
                color,
                &format!(
                    "{}({}) on {}: {:.4} ms, {} TFLOP/s, {} GB/s, {} FLOP/byte{}",
                    p.op,
                    p.shape,
                    p.backend,
                    p.median_s * 1e3,
                    short(p.flops_per_s / 1e12),
                    short(p.bytes_per_s / 1e9),
                    short(p.intensity()),
                    frac.unwrap_or_default()
                ),
            );
        }
        for (k, o) in ops.iter().enumerate() {
            plot.legend(PALETTE[k % PALETTE.len()], o);
        }
        b.push_str(&plot.finish());
    }
    b.push_str("</div><h2>Measurements</h2><table id=\"bench\"><tr><th>op</th><th>shape</th>\
        <th>backend</th><th>device</th><th>median ms</th><th>TFLOP/s</th><th>GB/s</th><th>FLOP/byte</th></tr>");
    for p in points {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.4}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&p.op),
            esc(&p.shape),
            esc(&p.backend),
            esc(&p.device),
            p.median_s * 1e3,
            short(p.flops_per_s / 1e12),
            short(p.bytes_per_s / 1e9),
            short(p.intensity())
        );
    }
    b.push_str("</table>");
    page("deepport bench: roofline", &b, "")
}

/// Writes the page of `deepport bench --html` (atomically): the host's
/// measured peaks as the roof, each measurement as a point.
#[cfg(feature = "cpu")]
pub fn write_bench(
    path: &std::path::Path,
    peak: Option<&deepport_cpu::peak::HostPeak>,
    measured: &[crate::bench_cmd::Measurement],
) -> std::io::Result<()> {
    let roof = peak.map(|p| Roof {
        flops_per_s: p.flops_f32,
        bytes_per_s: p.read_bytes_per_s,
        what: format!(
            "host: {} FMA f32 on {} threads, streaming read",
            p.isa, p.threads
        ),
    });
    let points: Vec<BenchPoint> = measured
        .iter()
        .map(|m| BenchPoint {
            op: m.op.clone(),
            shape: m.shape.to_string(),
            backend: m.backend.clone(),
            device: m.device.clone(),
            median_s: m.median_s,
            flops_per_s: m.tflops * 1e12,
            bytes_per_s: m.gbps * 1e9,
        })
        .collect();
    super::write_page(path, &bench_page(roof.as_ref(), &points))
}
