//! Hand-written inline SVG plots: linear or log axes, points, lines, bars,
//! with a `<title>` tooltip on every data mark. No external reference,
//! no namespace URL (inline SVG in HTML needs none).

use super::esc;
use std::fmt::Write;

/// One axis: its range in data units, linear or base-10 logarithmic.
#[derive(Clone, Debug)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub label: String,
    /// Tick positions and labels instead of the automatic ones.
    pub ticks: Option<Vec<(f64, String)>>,
}

impl Axis {
    pub fn linear(lo: f64, hi: f64, label: &str) -> Axis {
        let (lo, hi) = sane(lo, hi, false);
        Axis {
            lo,
            hi,
            log: false,
            label: label.to_string(),
            ticks: None,
        }
    }

    /// A log axis covering whole decades around every positive finite
    /// value of `values` (and `extra`), at least one decade wide; `[1e-1,
    /// 1e1]` when there is none.
    pub fn log_fit(values: impl IntoIterator<Item = f64>, label: &str) -> Axis {
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for v in values {
            if v.is_finite() && v > 0.0 {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
        if !lo.is_finite() {
            lo = 0.1;
            hi = 10.0;
        }
        let mut elo = lo.log10().floor();
        let mut ehi = hi.log10().ceil();
        if ehi - elo < 1.0 {
            elo -= 1.0;
            ehi += 1.0;
        }
        // Beyond 30 decades the plot is unreadable anyway.
        if ehi - elo > 30.0 {
            elo = ehi - 30.0;
        }
        Axis {
            lo: 10f64.powf(elo),
            hi: 10f64.powf(ehi),
            log: true,
            label: label.to_string(),
            ticks: None,
        }
    }

    /// Position of `v` along the axis in `[0, 1]` (clamped; NaN → 0).
    pub fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            if v <= 0.0 {
                return 0.0;
            }
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        if f.is_nan() {
            0.0
        } else {
            f.clamp(0.0, 1.0)
        }
    }

    /// Whether `v` lies outside the axis (drawn clamped to its edge).
    pub fn clipped(&self, v: f64) -> bool {
        !(v.is_finite() && v >= self.lo && v <= self.hi && (!self.log || v > 0.0))
    }

    fn auto_ticks(&self) -> Vec<(f64, String)> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            let step = ((b - a) / 10).max(1);
            (a..=b)
                .step_by(step as usize)
                .map(|e| (10f64.powi(e), format!("1e{e}")))
                .collect()
        } else {
            let span = self.hi - self.lo;
            let raw = span / 6.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| span / s <= 8.0)
                .unwrap_or(10.0 * mag);
            let mut t = (self.lo / step).ceil() * step;
            let mut out = Vec::new();
            while t <= self.hi + step * 1e-9 && out.len() < 20 {
                out.push((t, short(t)));
                t += step;
            }
            out
        }
    }
}

fn sane(lo: f64, hi: f64, log: bool) -> (f64, f64) {
    let ok = |v: f64| v.is_finite() && (!log || v > 0.0);
    match (ok(lo), ok(hi)) {
        (true, true) if hi > lo => (lo, hi),
        (true, true) => (lo - 0.5, lo + 0.5),
        _ => (0.0, 1.0),
    }
}

/// A number for tick labels and tooltips.
pub fn short(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if (1e-2..1e4).contains(&v.abs()) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.2e}")
    }
}

/// One plot: an SVG of `w × h` pixels with the data area inside margins.
pub struct Plot {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    pub x: Axis,
    pub y: Axis,
    title: String,
    body: String,
    legend: Vec<(String, String)>,
    /// Rotate the x tick labels (long categorical names).
    pub rotate_x_labels: bool,
}

/// Colours for series (backends, ops): distinguishable, colour-blind aware.
pub const PALETTE: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7f7f7f", "#000000",
];

impl Plot {
    pub fn new(title: &str, x: Axis, y: Axis, w: f64, h: f64) -> Plot {
        Plot {
            w,
            h,
            left: 70.0,
            right: 20.0,
            top: 30.0,
            bottom: 50.0,
            x,
            y,
            title: title.to_string(),
            body: String::new(),
            legend: Vec::new(),
            rotate_x_labels: false,
        }
    }

    /// Room below the data area (for rotated labels).
    pub fn bottom_margin(&mut self, px: f64) {
        self.bottom = px;
    }

    pub fn px(&self, v: f64) -> f64 {
        self.left + self.x.frac(v) * (self.w - self.left - self.right)
    }

    pub fn py(&self, v: f64) -> f64 {
        self.h - self.bottom - self.y.frac(v) * (self.h - self.top - self.bottom)
    }

    /// A circle at `(x, y)` (clamped to the plot; a clamped point is drawn
    /// as an open triangle), with a tooltip.
    pub fn point(&mut self, x: f64, y: f64, r: f64, color: &str, tip: &str) {
        let (cx, cy) = (self.px(x), self.py(y));
        if self.x.clipped(x) || self.y.clipped(y) {
            let _ = write!(
                self.body,
                "<path class=\"pt clipped\" d=\"M{:.1} {:.1}l{r:.1} {:.1}h{:.1}z\" fill=\"none\" stroke=\"{color}\"><title>{} (outside the axis)</title></path>",
                cx,
                cy - r,
                2.0 * r,
                -2.0 * r,
                esc(tip)
            );
        } else {
            let _ = write!(
                self.body,
                "<circle class=\"pt\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{r:.1}\" fill=\"{color}\"><title>{}</title></circle>",
                esc(tip)
            );
        }
    }

    /// A short horizontal tick of `half` pixels each side (a threshold).
    pub fn dash(&mut self, x: f64, y: f64, half: f64, color: &str, tip: &str) {
        let (cx, cy) = (self.px(x), self.py(y));
        let _ = write!(
            self.body,
            "<line class=\"thr\" x1=\"{:.1}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" stroke=\"{color}\" stroke-width=\"2\"><title>{}</title></line>",
            cx - half,
            cx + half,
            esc(tip)
        );
    }

    /// A polyline through data points.
    pub fn line(&mut self, pts: &[(f64, f64)], color: &str, dashed: bool, tip: &str) {
        if pts.is_empty() {
            return;
        }
        let mut d = String::new();
        for (i, (x, y)) in pts.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1} {:.1}",
                if i == 0 { "M" } else { "L" },
                self.px(*x),
                self.py(*y)
            );
        }
        let _ = write!(
            self.body,
            "<path d=\"{d}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{}><title>{}</title></path>",
            if dashed { " stroke-dasharray=\"5 3\"" } else { "" },
            esc(tip)
        );
    }

    /// A vertical line across the data area at `x`, labelled at its top.
    pub fn vline(&mut self, x: f64, color: &str, label: &str) {
        let cx = self.px(x);
        let _ = write!(
            self.body,
            "<line class=\"marker\" x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-dasharray=\"4 2\"><title>{l}</title></line><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\" font-size=\"11\">{l}</text>",
            self.top,
            self.h - self.bottom,
            cx + 3.0,
            self.top + 11.0,
            l = esc(label)
        );
    }

    /// A bar from `y = 0` (the bottom of the axis) up to `y`, between `x0`
    /// and `x1`.
    pub fn bar(&mut self, x0: f64, x1: f64, y: f64, color: &str, tip: &str) {
        let (a, b) = (self.px(x0), self.px(x1));
        let base = self.h - self.bottom;
        let top = self.py(y);
        let _ = write!(
            self.body,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}</title></rect>",
            a.min(b),
            (b - a).abs().max(1.0),
            (base - top).max(0.0),
            esc(tip)
        );
    }

    /// Text at data coordinates.
    pub fn label(&mut self, x: f64, y: f64, color: &str, text: &str) {
        let _ = write!(
            self.body,
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\" font-size=\"11\">{}</text>",
            self.px(x),
            self.py(y),
            esc(text)
        );
    }

    pub fn legend(&mut self, color: &str, text: &str) {
        self.legend.push((color.to_string(), text.to_string()));
    }

    /// The `<svg>` element.
    pub fn finish(self) -> String {
        let (x0, x1) = (self.left, self.w - self.right);
        let (y0, y1) = (self.top, self.h - self.bottom);
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg class=\"plot\" role=\"img\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\"><title>{t}</title>\
             <text x=\"{:.1}\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{t}</text>",
            self.left,
            w = self.w,
            h = self.h,
            t = esc(&self.title)
        );
        // Grid and ticks.
        let xt = self.x.ticks.clone().unwrap_or_else(|| self.x.auto_ticks());
        for (v, l) in &xt {
            let px = self.px(*v);
            let _ = write!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{y0:.1}\" x2=\"{px:.1}\" y2=\"{y1:.1}\" stroke=\"#e4e4e4\"/>"
            );
            if self.rotate_x_labels {
                let _ = write!(
                    s,
                    "<text font-size=\"10\" text-anchor=\"end\" transform=\"translate({px:.1},{:.1}) rotate(-50)\">{}</text>",
                    y1 + 12.0,
                    esc(l)
                );
            } else {
                let _ = write!(
                    s,
                    "<text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
                    y1 + 14.0,
                    esc(l)
                );
            }
        }
        let yt = self.y.ticks.clone().unwrap_or_else(|| self.y.auto_ticks());
        for (v, l) in &yt {
            let py = self.py(*v);
            let _ = write!(
                s,
                "<line x1=\"{x0:.1}\" y1=\"{py:.1}\" x2=\"{x1:.1}\" y2=\"{py:.1}\" stroke=\"#e4e4e4\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
                x0 - 4.0,
                py + 3.0,
                esc(l)
            );
        }
        let _ = write!(
            s,
            "<rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#888\"/>",
            x1 - x0,
            y1 - y0
        );
        // Axis labels.
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\
             <text font-size=\"11\" text-anchor=\"middle\" transform=\"translate(14,{:.1}) rotate(-90)\">{}</text>",
            (x0 + x1) / 2.0,
            self.h - 6.0,
            esc(&self.x.label),
            (y0 + y1) / 2.0,
            esc(&self.y.label)
        );
        s.push_str(&self.body);
        // Legend, top right inside the data area.
        for (i, (c, t)) in self.legend.iter().enumerate() {
            let ly = y0 + 12.0 + 14.0 * i as f64;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
                x1 - 14.0,
                ly - 9.0,
                x1 - 18.0,
                esc(t)
            );
        }
        s.push_str("</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis_covers_the_data_in_decades() {
        let a = Axis::log_fit([3e-5, 2e-2, 0.0, f64::NAN], "x");
        assert_eq!((a.lo, a.hi), (1e-5, 1e-1));
        assert!(a.frac(1e-5).abs() < 1e-12);
        assert!((a.frac(1e-3) - 0.5).abs() < 1e-12);
        assert!(a.clipped(0.0) && a.clipped(1.0) && !a.clipped(1e-2));
        let t = a.auto_ticks();
        assert_eq!(t.first().map(|t| t.1.as_str()), Some("1e-5"));
        assert_eq!(t.len(), 5);
        let empty = Axis::log_fit([], "x");
        assert!(empty.lo < empty.hi);
    }

    #[test]
    fn linear_ticks_are_round() {
        let a = Axis::linear(0.0, 37.0, "n");
        let t = a.auto_ticks();
        assert!(t.len() >= 4 && t.len() <= 9, "{t:?}");
        assert_eq!(t[1].1, "5");
        let bad = Axis::linear(f64::NAN, 1.0, "n");
        assert_eq!((bad.lo, bad.hi), (0.0, 1.0));
    }

    #[test]
    fn tooltips_and_labels_are_escaped() {
        let mut p = Plot::new(
            "<t>",
            Axis::linear(0.0, 1.0, "x&"),
            Axis::linear(0.0, 1.0, "y"),
            200.0,
            100.0,
        );
        p.point(0.5, 0.5, 2.0, "red", "a<b>&\"c\"");
        p.point(5.0, 0.5, 2.0, "red", "out");
        let s = p.finish();
        assert!(s.contains("a&lt;b&gt;&amp;&quot;c&quot;"), "{s}");
        assert!(!s.contains("<t>") && !s.contains("x&<"));
        assert!(s.contains("outside the axis"));
    }
}
