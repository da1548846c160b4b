//! Self-contained HTML pages: the run report (`report.html`, `deepport
//! report html`), the forward pass against golden data (`deepport forward
//! --golden DIR --html FILE`) and the roofline (`deepport bench --html FILE`).
//!
//! Every page is one file: CSS and a little JavaScript inline, plots as
//! inline SVG drawn here ([`svg`]), nothing fetched (a Content-Security-Policy
//! meta tag forbids it, and [`external_references`] checks the text). Every
//! string that comes from data is escaped with [`esc`], which also escapes
//! `/ : = ( @` so that no data can look like a reference in the page's text. The
//! JavaScript reads data only from the DOM, never from inlined strings.
//!
//! A page records its own JavaScript errors, console errors and CSP
//! violations in `<pre id="js-errors">`, and its last script sets
//! `data-ready="1"` on `<body>`: a headless browser's `--dump-dom` shows
//! both (`ci/html_check.sh`, `tests/html_browser.rs`).

mod bench;
mod forward;
mod run;
pub mod svg;

#[cfg(feature = "cpu")]
pub use bench::write_bench;
pub use bench::{bench_page, BenchPoint, Roof};
pub use forward::{forward_page, ForwardPlot};
pub use run::{html_main, report_html, run_page, HtmlArgs, RunRef};

/// The file name of the run report inside a run directory.
pub const REPORT_HTML: &str = "report.html";

/// Escapes text for HTML element content and attribute values: `& < > " '`
/// and also `/ : = ( @` (so that data never spells `//`, `http:`, `src=`,
/// `url(` or `@import`: case ids like `copy_window(src=bf16,…)` would).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            '/' => o.push_str("&#47;"),
            ':' => o.push_str("&#58;"),
            '=' => o.push_str("&#61;"),
            '(' => o.push_str("&#40;"),
            '@' => o.push_str("&#64;"),
            '\n' => o.push_str("&#10;"),
            c if c.is_control() && c != '\t' => o.push('\u{FFFD}'),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = "\
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;font-size:14px}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}\
h3{font-size:1em;margin:1em 0 .3em}\
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}\
#js-errors{color:#b00;background:#fee;border:1px solid #b00;padding:.5em;white-space:pre-wrap}\
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{background:#fff;border:1px solid #eee}\
.fail{color:#b00;font-weight:bold}.pass{color:#070}.note{color:#666}\
#matrix td.c{text-align:center;cursor:pointer;min-width:2.4em;font-size:12px}\
#matrix th.case{font-weight:normal;font-family:monospace;font-size:12px;background:#fafafa}\
#matrix thead th{position:sticky;top:0;z-index:1}\
.o-Pass{background:#7fc97f}.o-QualityWarning{background:#fdd36a}.o-Fail{background:#e8474c;color:#fff}\
.o-NotSupported{background:#c8c8c8}.o-Crash{background:#7b3294;color:#fff}.o-Timeout{background:#f0883e}\
.o-NotRun{background:repeating-linear-gradient(45deg,#fff,#fff 3px,#eee 3px,#eee 6px)}\
#detail{position:fixed;right:1em;bottom:1em;max-width:40em;max-height:50vh;overflow:auto;background:#fff;\
border:1px solid #888;box-shadow:0 2px 8px #0003;padding:.6em;white-space:pre-wrap;font-family:monospace;font-size:12px}\
.filters{margin:.5em 0}.filters label{margin-right:1em}.legend span{display:inline-block;padding:1px 6px;margin-right:4px}";

/// Records errors before anything else runs; writes them into
/// `#js-errors` once the document is parsed.
const ERROR_CAPTURE: &str = "(function(){var errs=[];window.__deepportErrors=errs;\
function show(){var e=document.getElementById('js-errors');if(e&&errs.length){e.textContent=errs.join('\\n');e.hidden=false;}}\
function rec(m){errs.push(String(m));show();}\
window.addEventListener('error',function(ev){rec('error: '+(ev.message||(ev.target&&ev.target.tagName)||ev.type));},true);\
window.addEventListener('unhandledrejection',function(ev){rec('unhandled rejection: '+ev.reason);});\
document.addEventListener('securitypolicyviolation',function(ev){rec('CSP violation: '+ev.violatedDirective+' '+ev.blockedURI);});\
var ce=console.error;console.error=function(){rec('console.error: '+Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};\
document.addEventListener('DOMContentLoaded',show);})();";

/// A whole page: `body` (already escaped HTML) and a script run at the end
/// of the body; the page marks itself ready after it.
pub(crate) fn page(title: &str, body: &str, script: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'none'; base-uri 'none'; form-action 'none'\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta name=\"generator\" content=\"deepport {ver}\">\
<title>{t}</title><style>{CSS}</style><script>{ERROR_CAPTURE}</script></head>\n<body>\
<pre id=\"js-errors\" hidden></pre>\n{body}\n<script>{script}\ndocument.body.setAttribute('data-ready','1');</script></body></html>\n",
        ver = esc(env!("CARGO_PKG_VERSION")),
        t = esc(title),
    )
}

/// Every place where `html` could refer to something outside itself: a
/// URL scheme or `//`, a `src`/`href`/`srcset` attribute, CSS `@import` or
/// `url(`, or an element that loads content (`<link>`, `<img>`, `<iframe>`,
/// `<object>`, `<embed>`, `<base>`, `<audio>`, `<video>`, `<source>`).
/// Empty for a self-contained page.
pub fn external_references(html: &str) -> Vec<String> {
    const BAD: [&str; 21] = [
        "//", "http:", "https:", "file:", "ftp:", "src=", "href=", "srcset", "@import", "url(",
        "<link", "<img", "<iframe", "<object", "<embed", "<base", "<audio", "<video", "<source",
        "<frame", "xlink:",
    ];
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for pat in BAD {
        for (i, _) in lower.match_indices(pat) {
            let a = lower[..i]
                .char_indices()
                .rev()
                .nth(30)
                .map_or(0, |(j, _)| j);
            let b = lower[i..]
                .char_indices()
                .nth(30 + pat.len())
                .map_or(lower.len(), |(j, _)| i + j);
            found.push(format!("`{pat}` in …{}…", &html[a..b]));
        }
    }
    found
}

/// Writes a page atomically.
pub(crate) fn write_page(path: &std::path::Path, html: &str) -> std::io::Result<()> {
    super::write_atomic(path, html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esc_leaves_no_markup_or_url_in_data() {
        let e = esc("<script>x='a'&\"b\"</script> http://evil.example/x.js\n");
        assert!(!e.contains('<') && !e.contains('>') && !e.contains('\'') && !e.contains('"'));
        assert!(external_references(&e).is_empty(), "{e}");
        let id = esc("copy_window(src=bf16,dst=f32) url(x) @import");
        assert!(external_references(&id).is_empty(), "{id}");
        assert_eq!(esc("add(n=7)"), "add&#40;n&#61;7)");
    }

    #[test]
    fn external_references_finds_each_kind() {
        for bad in [
            "<script src=\"a.js\"></script>",
            "<link rel=stylesheet href=x.css>",
            "<style>@import 'x.css'</style>",
            "<div style=\"background:url(x.png)\"></div>",
            "<a href=\"https://example.com\">x</a>",
            "<img alt=x>",
            "fetch('//cdn.example/x')",
        ] {
            assert!(!external_references(bad).is_empty(), "{bad}");
        }
        let p = page("t <&>", "<p>ok</p>", "var a=1;");
        assert!(
            external_references(&p).is_empty(),
            "{:?}",
            external_references(&p)
        );
    }
}
