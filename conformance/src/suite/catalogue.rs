//! The case catalogue: `conformance/cases/*.yaml`, one file per op family,
//! parsed with `serde-saphyr` and expanded into [`CaseSpec`]s.
//!
//! A case file:
//!
//! ```yaml
//! family: mla_decode            # the file stem; a family of crate::cases
//! seed: 4000                    # base of every case's seed
//! tolerances:                   # per output, for every group
//!   out:
//!     - metric: calc_diff       # see suite::Metric
//!       pass: 5.0e-6            # Pass when the value is ≤ this
//!       warn: 5.0e-5            # QualityWarning up to this (default: pass)
//!       params: {strict: 1}     # metric parameters
//!       when: "dtype == 'bf16'" # only for the cases where this holds
//!       reason: "FlashMLA's test (SPEC §4)"
//! groups:
//!   - name: flashmla grid
//!     profiles: [full]          # or {full: true, v3-mustpass: "b <= 2"}
//!     grid: {b: [1, 2], s_q: [1, 2, 4], h_q: 64, h_kv: [1, 2]}
//!     cases: [{s_k: 20}, {s_k: 140, varlen: 1}]   # each merged with grid
//!     where: "h_q % h_kv == 0"  # or a list; cases where it is false are dropped
//!     tolerances: {…}           # replaces the file's entries for these outputs
//! ```
//!
//! Lists expand as a cartesian product. Every parameter key must be one of
//! the family's keys ([`crate::cases::Family`]), of the right type; keys
//! with a default are filled in; the id is `family(k=v,…)` in the
//! family's key order. A case's tolerance keys must be exactly the outputs
//! the family judges for its parameters. Every error names the file, line
//! and column.

mod expr;
pub mod size;

use crate::cases::{self, Family, KeyKind, ParamMap};
use crate::types::{CaseSpec, Metric, Source, Tolerance};
use expr::Expr;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The most cases one grid (or one case entry merged into it) may expand
/// to: a typo in a list must not make the catalogue take all memory.
pub const MAX_CASES_PER_ENTRY: usize = 100_000;

/// The profiles every case may belong to.
pub const PROFILES: [&str; 4] = ["smoke", "full", "v3-mustpass", V32_PROFILE];

/// The profile of the DeepSeek-V3.2 cases (docs/spec-v32.md): sparse
/// attention beyond V3, deliberately outside `v3-mustpass`.
pub const V32_PROFILE: &str = "v32";

/// An error in a case file: the file, line and column (1-based; 0 when the
/// error concerns the whole file), and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogueError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl std::fmt::Display for CatalogueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for CatalogueError {}

/// A case that cannot be built into a runnable case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildError {
    pub id: String,
    /// Where the case is declared (file:line).
    pub origin: String,
    pub message: String,
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.id, self.origin, self.message)
    }
}

impl std::error::Error for BuildError {}

/// `$DEEPPORT_CASES`, else `conformance/cases` of the source tree.
pub fn default_dir() -> PathBuf {
    std::env::var_os("DEEPPORT_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("cases"))
}

// ---- the raw YAML ------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    family: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    seed: u64,
    #[serde(default)]
    tolerances: BTreeMap<String, Vec<Spanned<RawTol>>>,
    groups: Vec<Spanned<RawGroup>>,
}

type RawParams = BTreeMap<String, Spanned<Value>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    name: Option<String>,
    profiles: Spanned<RawProfiles>,
    #[serde(default)]
    grid: RawParams,
    #[serde(default)]
    cases: Vec<Spanned<RawParams>>,
    #[serde(default, rename = "where")]
    where_: Option<Spanned<StrList>>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    tolerances: BTreeMap<String, Vec<Spanned<RawTol>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTol {
    metric: Metric,
    pass: f64,
    #[serde(default)]
    warn: Option<f64>,
    #[serde(default)]
    params: BTreeMap<String, f64>,
    #[serde(default)]
    when: Option<String>,
    reason: String,
}

/// A string or a list of strings.
#[derive(Debug, Default)]
struct StrList(Vec<String>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an expression or a list of expressions")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StrList, E> {
                Ok(StrList(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<StrList, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    v.push(s);
                }
                Ok(StrList(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A profile condition: always, never, or an expression.
#[derive(Clone, Debug)]
enum Cond {
    Always(bool),
    Expr(String),
}

impl<'de> Deserialize<'de> for Cond {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cond;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or an expression")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Cond, E> {
                Ok(Cond::Always(b))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Cond, E> {
                Ok(Cond::Expr(s.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[smoke, full]` or `{full: true, v3-mustpass: "b <= 2"}`.
#[derive(Debug)]
struct RawProfiles(Vec<(String, Cond)>);

impl<'de> Deserialize<'de> for RawProfiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawProfiles;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of profiles or a map of profile to condition")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<RawProfiles, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    v.push((s, Cond::Always(true)));
                }
                Ok(RawProfiles(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawProfiles, A::Error> {
                let mut v = Vec::new();
                while let Some((k, c)) = a.next_entry::<String, Cond>()? {
                    v.push((k, c));
                }
                Ok(RawProfiles(v))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- errors ---------------------------------------------------------------------

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn at<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> CatalogueError {
        CatalogueError {
            file: self.file.to_path_buf(),
            line: s.referenced.line(),
            column: s.referenced.column(),
            message: message.into(),
        }
    }
    fn origin<T>(&self, s: &Spanned<T>) -> String {
        format!("{}:{}", self.file.display(), s.referenced.line())
    }
}

/// Turns a serde-saphyr error into ours: the message without the location
/// suffix, and the location as line and column.
fn yaml_error(file: &Path, e: &serde_saphyr::Error) -> CatalogueError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut msg = e.without_snippet().to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    CatalogueError {
        file: file.to_path_buf(),
        line,
        column,
        message: msg,
    }
}

// ---- loading --------------------------------------------------------------------

/// Loads every `*.yaml` file of `dir` (in name order) and expands it. Ids
/// must be unique across the whole catalogue.
pub fn load(dir: &Path) -> Result<Vec<CaseSpec>, CatalogueError> {
    let whole = |message: String| CatalogueError {
        file: dir.to_path_buf(),
        line: 0,
        column: 0,
        message,
    };
    let rd = std::fs::read_dir(dir)
        .map_err(|e| whole(format!("cannot read the case directory: {e}")))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(whole("no *.yaml case files".into()));
    }
    let mut all = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| CatalogueError {
            file: f.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        for (spec, line, col) in parse_file(f, &text)? {
            if let Some(first) = seen.get(&spec.id) {
                return Err(CatalogueError {
                    file: f.clone(),
                    line,
                    column: col,
                    message: format!(
                        "duplicate case id {}: declared at {first} and again at {}",
                        spec.id, spec.origin
                    ),
                });
            }
            seen.insert(spec.id.clone(), spec.origin.clone());
            all.push(spec);
        }
    }
    Ok(all)
}

/// Parses and expands one case file; each spec comes with the line and
/// column it was declared at.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<(CaseSpec, u64, u64)>, CatalogueError> {
    let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| yaml_error(file, &e))?;
    let cx = Ctx { file };
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let fam = cases::family(&raw.family.value).ok_or_else(|| {
        cx.at(
            &raw.family,
            format!(
                "unknown op family `{}`; known families: {}",
                raw.family.value,
                cases::FAMILIES
                    .iter()
                    .map(|f| f.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    if fam.name != stem {
        return Err(cx.at(
            &raw.family,
            format!(
                "family `{}` must be in a file named {}.yaml",
                fam.name, fam.name
            ),
        ));
    }
    let file_tols = check_tolerances(&cx, &raw.tolerances)?;
    let mut out = Vec::new();
    if raw.groups.is_empty() {
        return Err(CatalogueError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: "the file has no groups".into(),
        });
    }
    for g in &raw.groups {
        expand_group(&cx, fam, raw.seed, &file_tols, g, &mut out)?;
    }
    Ok(out)
}

/// A checked tolerance entry and its parsed `when`.
#[derive(Clone)]
struct Tol {
    tol: Tolerance,
    when: Option<Expr>,
    at: (u64, u64),
}

/// Parameters each metric accepts.
fn metric_params(m: Metric) -> &'static [&'static str] {
    match m {
        Metric::Elementwise => &["abs", "rel", "ulps", "rms_rel"],
        Metric::AbsOrRel => &["abs", "rel", "strict"],
        Metric::CalcDiff | Metric::Nmse | Metric::Top1Mismatch => &["strict"],
        Metric::Exact | Metric::Keyed => &[],
        Metric::SetEquality => &["weight_abs", "weight_warn", "fraction"],
        Metric::Cosine => &["min", "strict"],
    }
}

fn check_tolerances(
    cx: &Ctx,
    raw: &BTreeMap<String, Vec<Spanned<RawTol>>>,
) -> Result<BTreeMap<String, Vec<Tol>>, CatalogueError> {
    let mut out = BTreeMap::new();
    for (key, list) in raw {
        let mut v = Vec::new();
        for s in list {
            let t = &s.value;
            if t.reason.trim().is_empty() {
                return Err(cx.at(s, format!("tolerance of `{key}` needs a reason")));
            }
            let warn = t.warn.unwrap_or(t.pass);
            let ordered = t.pass >= 0.0 && warn >= t.pass;
            if !ordered {
                return Err(cx.at(
                    s,
                    format!(
                        "tolerance of `{key}`: need 0 ≤ pass ≤ warn, got pass {} warn {warn}",
                        t.pass
                    ),
                ));
            }
            let allowed = metric_params(t.metric);
            if let Some(bad) = t.params.keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(cx.at(
                    s,
                    format!(
                        "tolerance of `{key}`: metric {:?} has no parameter `{bad}` (it takes: {})",
                        t.metric,
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
            let when = match &t.when {
                None => None,
                Some(w) => {
                    Some(Expr::parse(w).map_err(|e| cx.at(s, format!("`when` of `{key}`: {e}")))?)
                }
            };
            v.push(Tol {
                tol: Tolerance {
                    metric: t.metric,
                    pass: t.pass,
                    warn,
                    params: t.params.clone(),
                    reason: t.reason.clone(),
                },
                when,
                at: (s.referenced.line(), s.referenced.column()),
            });
        }
        out.insert(key.clone(), v);
    }
    Ok(out)
}

/// Checks a YAML scalar against a key's kind and normalizes it.
fn scalar(fam: &Family, key: &str, v: &Value) -> Result<Value, String> {
    let k = fam.key(key).ok_or_else(|| {
        format!(
            "unknown key `{key}` for family {}; its keys are: {}",
            fam.name,
            fam.keys
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let bad = |want: &str| format!("`{key}` must be {want}, got {v}");
    Ok(match k.kind {
        KeyKind::Int => Value::from(v.as_u64().ok_or_else(|| bad("a non-negative integer"))?),
        KeyKind::Float => {
            let x = v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad("a number"))?;
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .ok_or_else(|| bad("a number"))?
        }
        KeyKind::Flag => match v {
            Value::Bool(b) => Value::from(*b as u64),
            Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                Value::from(n.as_u64().unwrap_or(0))
            }
            _ => return Err(bad("0 or 1")),
        },
        KeyKind::Text(choices) => {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(bad("text")),
            };
            if !choices.is_empty() && !choices.contains(&s.as_str()) {
                return Err(bad(&format!("one of {}", choices.join(", "))));
            }
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || ",()=".contains(c)) {
                return Err(format!(
                    "`{key}` = `{s}`: text values must be non-empty without spaces or , ( ) ="
                ));
            }
            Value::String(s)
        }
    })
}

/// The values of a key: a scalar, or each element of a list.
fn values(fam: &Family, key: &str, v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(format!("`{key}` has an empty list of values"));
            }
            items.iter().map(|x| scalar(fam, key, x)).collect()
        }
        other => Ok(vec![scalar(fam, key, other)?]),
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(f)) => f.to_string(),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The canonical id: `family(k=v,…)` in the family's key order.
pub fn canonical_id(fam: &Family, params: &ParamMap) -> String {
    let parts: Vec<String> = fam
        .keys
        .iter()
        .filter_map(|k| {
            params
                .get(k.name)
                .map(|v| format!("{}={}", k.name, fmt_value(v)))
        })
        .collect();
    format!("{}({})", fam.name, parts.join(","))
}

/// 64-bit FNV-1a.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A case's seed: stable under additions elsewhere in the catalogue.
fn case_seed(base: u64, id: &str) -> u64 {
    let mut z = base ^ fnv1a(id);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & ((1u64 << 53) - 1)
}

fn expand_group(
    cx: &Ctx,
    fam: &'static Family,
    base_seed: u64,
    file_tols: &BTreeMap<String, Vec<Tol>>,
    g: &Spanned<RawGroup>,
    out: &mut Vec<(CaseSpec, u64, u64)>,
) -> Result<(), CatalogueError> {
    let gv = &g.value;
    let gname = gv.name.clone().unwrap_or_else(|| "(unnamed group)".into());
    let known = |n: &str| fam.key(n).is_some();
    // Profiles.
    let mut profiles = Vec::new();
    for (name, cond) in &gv.profiles.value.0 {
        if !PROFILES.contains(&name.as_str()) {
            return Err(cx.at(
                &gv.profiles,
                format!(
                    "unknown profile `{name}`; profiles are {}",
                    PROFILES.join(", ")
                ),
            ));
        }
        let c = match cond {
            Cond::Always(b) => Err(*b),
            Cond::Expr(s) => Ok(Expr::parse(s)
                .map_err(|e| cx.at(&gv.profiles, format!("profile `{name}`: {e}")))?),
        };
        profiles.push((name.clone(), c));
    }
    if profiles.is_empty() {
        return Err(cx.at(&gv.profiles, format!("group {gname} has no profile")));
    }
    let wheres: Vec<Expr> = match &gv.where_ {
        None => Vec::new(),
        Some(w) => w
            .value
            .0
            .iter()
            .map(|s| Expr::parse(s).map_err(|e| cx.at(w, format!("`where`: {e}"))))
            .collect::<Result<_, _>>()?,
    };
    let mut tols = file_tols.clone();
    for (k, v) in check_tolerances(cx, &gv.tolerances)? {
        tols.insert(k, v);
    }
    // The maps to expand: grid alone, or grid merged into each case.
    let mut maps: Vec<(RawParams, (u64, u64), String)> = Vec::new();
    if gv.cases.is_empty() {
        maps.push((
            gv.grid.clone(),
            (g.referenced.line(), g.referenced.column()),
            cx.origin(g),
        ));
    } else {
        for c in &gv.cases {
            let mut m = gv.grid.clone();
            for (k, v) in &c.value {
                if m.insert(k.clone(), v.clone()).is_some() {
                    return Err(cx.at(v, format!("`{k}` is set both in the grid and in this case")));
                }
            }
            maps.push((
                m,
                (c.referenced.line(), c.referenced.column()),
                cx.origin(c),
            ));
        }
    }
    let seed_base = gv.seed.unwrap_or(base_seed);
    for (m, at, origin) in maps {
        // Values per key, in the family's key order.
        let mut axes: Vec<(&'static str, Vec<Value>)> = Vec::new();
        for (k, v) in &m {
            values(fam, k, &v.value).map_err(|e| cx.at(v, e))?;
        }
        for key in fam.keys {
            match m.get(key.name) {
                Some(v) => axes.push((
                    key.name,
                    values(fam, key.name, &v.value).map_err(|e| cx.at(v, e))?,
                )),
                None => match key.default {
                    Some(d) => {
                        let dv: Value = serde_json::from_str(d)
                            .unwrap_or_else(|_| Value::String(d.to_string()));
                        let dv = scalar(fam, key.name, &dv).map_err(|e| CatalogueError {
                            file: cx.file.to_path_buf(),
                            line: at.0,
                            column: at.1,
                            message: format!("internal: default of `{}`: {e}", key.name),
                        })?;
                        axes.push((key.name, vec![dv]));
                    }
                    None if key.optional => {}
                    None => {
                        return Err(CatalogueError {
                            file: cx.file.to_path_buf(),
                            line: at.0,
                            column: at.1,
                            message: format!("{gname}: a {} case needs `{}`", fam.name, key.name),
                        })
                    }
                },
            }
        }
        let err_at = |message: String| CatalogueError {
            file: cx.file.to_path_buf(),
            line: at.0,
            column: at.1,
            message,
        };
        // Cartesian product, of a size a catalogue can hold.
        let total = axes
            .iter()
            .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
            .filter(|&t| t <= MAX_CASES_PER_ENTRY)
            .ok_or_else(|| {
                err_at(format!(
                    "{gname}: the grid expands to {} cases, more than the {MAX_CASES_PER_ENTRY} one entry may declare",
                    axes.iter()
                        .map(|(k, v)| format!("{} {k}", v.len()))
                        .collect::<Vec<_>>()
                        .join(" × ")
                ))
            })?;
        for mut n in 0..total {
            let mut params = ParamMap::new();
            for (k, vals) in axes.iter().rev() {
                params.insert(k.to_string(), vals[n % vals.len()].clone());
                n /= vals.len();
            }
            let id = canonical_id(fam, &params);
            let mut keep = true;
            for w in &wheres {
                if !w
                    .test(&params, &known)
                    .map_err(|e| err_at(format!("`where` for {id}: {e}")))?
                {
                    keep = false;
                    break;
                }
            }
            if !keep {
                continue;
            }
            let mut set = BTreeSet::new();
            for (name, c) in &profiles {
                let on = match c {
                    Err(b) => *b,
                    Ok(e) => e
                        .test(&params, &known)
                        .map_err(|e| err_at(format!("profile `{name}` for {id}: {e}")))?,
                };
                if on {
                    set.insert(name.clone());
                }
            }
            if set.is_empty() {
                return Err(err_at(format!("{id} belongs to no profile")));
            }
            // Tolerances that apply to this case.
            let mut tolerances: BTreeMap<String, Vec<Tolerance>> = BTreeMap::new();
            for (k, list) in &tols {
                let mut v = Vec::new();
                for t in list {
                    let on = match &t.when {
                        None => true,
                        Some(e) => e.test(&params, &known).map_err(|e| CatalogueError {
                            file: cx.file.to_path_buf(),
                            line: t.at.0,
                            column: t.at.1,
                            message: format!("`when` of `{k}` for {id}: {e}"),
                        })?,
                    };
                    if on {
                        v.push(t.tol.clone());
                    }
                }
                if !v.is_empty() {
                    tolerances.insert(k.clone(), v);
                }
            }
            let need = (fam.outputs)(&params);
            if let Some(missing) = need.iter().find(|k| !tolerances.contains_key(**k)) {
                return Err(err_at(format!(
                    "{id}: no tolerance entry for output `{missing}`"
                )));
            }
            if let Some(extra) = tolerances.keys().find(|k| !need.contains(&k.as_str())) {
                return Err(err_at(format!(
                    "{id}: tolerance for `{extra}`, which this case does not output (outputs: {})",
                    need.join(", ")
                )));
            }
            let spec = CaseSpec {
                seed: case_seed(seed_base, &id),
                source: (fam.source)(&params),
                family: fam.name.to_string(),
                id,
                params,
                profiles: set,
                tolerances,
                origin: origin.clone(),
            };
            out.push((spec, at.0, at.1));
        }
    }
    Ok(())
}

// ---- selection and building ---------------------------------------------------------

/// Glob match over the whole text: `*` any run of characters, `?` one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The cases of `profile` whose id matches the glob `filter` (`*`, `?`;
/// the whole id must match), in catalogue order.
pub fn select(specs: &[CaseSpec], profile: &str, filter: Option<&str>) -> Vec<CaseSpec> {
    specs
        .iter()
        .filter(|s| s.profiles.contains(profile))
        .filter(|s| filter.is_none_or(|f| glob_match(f, &s.id)))
        .cloned()
        .collect()
}

/// Turns a case into a runnable case: inputs generated from its seed (or
/// read from its golden file), its run, and a judge built from its
/// tolerances. The case's size is checked against the process-wide memory
/// budget first ([`size::check`]): a case too large for it is an error
/// naming the case, its sizes and the budget, and nothing is allocated.
pub fn build(spec: &CaseSpec) -> Result<cases::Case, BuildError> {
    build_within(spec, deepport_core::budget::MemoryBudget::global())
}

/// [`build`] with an explicit memory budget.
pub fn build_within(
    spec: &CaseSpec,
    budget: deepport_core::budget::MemoryBudget,
) -> Result<cases::Case, BuildError> {
    size::check(spec, budget).map_err(|e| BuildError {
        id: spec.id.clone(),
        origin: spec.origin.clone(),
        message: e.to_string(),
    })?;
    cases::build(spec).map_err(|message| BuildError {
        id: spec.id.clone(),
        origin: spec.origin.clone(),
        message,
    })
}

/// The ops a case exercises.
pub fn ops(spec: &CaseSpec) -> Vec<deepport_core::ops::OpKind> {
    cases::ops_of(spec)
}

/// Where a case's inputs come from, as text (for tables).
pub fn source_label(spec: &CaseSpec) -> String {
    match &spec.source {
        Source::Generated => format!("generated (seed {})", spec.seed),
        Source::Golden { path } => path.clone(),
        Source::Model { mode, check } => format!("golden/model {mode} {check}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
family: add
seed: 7
tolerances:
  out:
    - metric: elementwise
      pass: 1
      warn: 10
      params: {ulps: 1}
      reason: "one rounding"
groups:
  - name: g
    profiles: {full: true, smoke: "rows == 1"}
    grid: {rows: [1, 2, 3], cols: 8}
    where: "rows != 3"
  - profiles: [v3-mustpass]
    cases:
      - {rows: 5, cols: 7, a: f32, b: bf16}
"#;

    fn parse(text: &str) -> Result<Vec<CaseSpec>, CatalogueError> {
        parse_file(Path::new("add.yaml"), text).map(|v| v.into_iter().map(|x| x.0).collect())
    }

    #[test]
    fn grid_expansion_where_profiles_and_ids() {
        let s = parse(GOOD).unwrap();
        let ids: Vec<&str> = s.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "add(rows=1,cols=8,a=bf16,b=bf16)",
                "add(rows=2,cols=8,a=bf16,b=bf16)",
                "add(rows=5,cols=7,a=f32,b=bf16)"
            ]
        );
        assert!(s[0].profiles.contains("smoke") && s[0].profiles.contains("full"));
        assert!(!s[1].profiles.contains("smoke"));
        assert_eq!(s[2].profiles.iter().collect::<Vec<_>>(), ["v3-mustpass"]);
        assert_eq!(s[0].tolerances["out"][0].warn, 10.0);
        assert_eq!(s[0].origin, "add.yaml:12");
        assert_eq!(s[2].origin, "add.yaml:18");
        assert_ne!(s[0].seed, s[1].seed);
        assert_eq!(s[0].seed, case_seed(7, &s[0].id));
        assert_eq!(s[0].source, Source::Generated);
    }

    fn err(text: &str) -> CatalogueError {
        parse(text).unwrap_err()
    }

    #[test]
    fn bad_files_name_line_and_column() {
        // Malformed YAML.
        let e = err("family: add\nseed: 1\ngroups:\n  - profiles: [full\n    grid: {rows: 1}\n");
        assert_eq!((e.line, e.column), (5, 9), "{e}");
        // Unknown key at the top level.
        let e = err("family: add\nseed: 1\ngroupz: []\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("groupz"), "{e}");
        // Wrong type.
        let e = err("family: add\nseed: one\ngroups: []\n");
        assert_eq!((e.line, e.column), (2, 7), "{e}");
        // Unknown family.
        let e = err("family: nope\nseed: 1\ngroups: []\n");
        assert_eq!((e.line, e.column), (1, 9), "{e}");
        assert!(e.message.contains("unknown op family `nope`"), "{e}");
        // Unknown parameter key, wrong value type, bad choice.
        let base = GOOD.replace(
            "grid: {rows: [1, 2, 3], cols: 8}",
            "grid: {rows: [1, 2, 3], cols: 8, colz: 1}",
        );
        let e = err(&base);
        assert_eq!((e.line, e.column), (14, 44), "{e}");
        assert!(e.message.contains("unknown key `colz`"), "{e}");
        let e = err(&GOOD.replace("cols: 8}", "cols: -8}"));
        assert!(e.message.contains("non-negative integer"), "{e}");
        assert_eq!(e.line, 14);
        let e = err(&GOOD.replace("a: f32", "a: f64"));
        assert!(e.message.contains("one of"), "{e}");
        assert_eq!(e.line, 18);
        // Unknown metric, unknown metric parameter, missing reason.
        let e = err(&GOOD.replace("metric: elementwise", "metric: elementwize"));
        assert_eq!(e.line, 6, "{e}");
        let e = err(&GOOD.replace("{ulps: 1}", "{ulpz: 1}"));
        assert!(e.message.contains("ulpz"), "{e}");
        assert_eq!(e.line, 6, "{e}");
        let e = err(&GOOD.replace("reason: \"one rounding\"", "reason: \" \""));
        assert!(e.message.contains("reason"), "{e}");
        // warn below pass.
        let e = err(&GOOD.replace("warn: 10", "warn: 0.5"));
        assert!(e.message.contains("pass ≤ warn"), "{e}");
        // Bad where expression and where on an unknown name.
        let e = err(&GOOD.replace("rows != 3", "rows = 3"));
        assert!(e.message.contains("where"), "{e}");
        assert_eq!(e.line, 15);
        let e = err(&GOOD.replace("rows != 3", "rowz != 3"));
        assert!(e.message.contains("rowz"), "{e}");
        // Unknown profile.
        let e = err(&GOOD.replace("[v3-mustpass]", "[v3]"));
        assert!(e.message.contains("unknown profile `v3`"), "{e}");
        // Missing required key.
        let e = err(&GOOD.replace("{rows: 5, cols: 7, a: f32, b: bf16}", "{rows: 5}"));
        assert!(e.message.contains("needs `cols`"), "{e}");
        assert_eq!(e.line, 18);
        // Missing and extra tolerance outputs.
        let e = err(&GOOD.replace("  out:\n", "  y:\n"));
        assert!(
            e.message.contains("no tolerance entry for output `out`"),
            "{e}"
        );
        // Family in the wrong file.
        let e = parse_file(Path::new("rope.yaml"), GOOD).unwrap_err();
        assert!(e.message.contains("add.yaml"), "{e}");
        // The Display form names file, line and column.
        assert!(e.to_string().starts_with("rope.yaml:2:9: "), "{e}");
    }

    #[test]
    fn a_grid_too_large_is_an_error_not_an_allocation() {
        let list = (0..1000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let text = GOOD.replace(
            "grid: {rows: [1, 2, 3], cols: 8}",
            &format!("grid: {{rows: [{list}], cols: [{list}]}}"),
        );
        let e = err(&text);
        assert!(e.message.contains("1000 rows × 1000 cols"), "{e}");
        assert_eq!(e.line, 12, "{e}");
    }

    #[test]
    fn duplicate_ids_name_both_origins() {
        let dir = std::env::temp_dir().join(format!("deepport-cat-dup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dup = GOOD.replace("{rows: 5, cols: 7, a: f32, b: bf16}", "{rows: 2, cols: 8}");
        std::fs::write(dir.join("add.yaml"), dup).unwrap();
        let e = load(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.message
                .contains("duplicate case id add(rows=2,cols=8,a=bf16,b=bf16)"),
            "{e}"
        );
        assert!(
            e.message.contains("add.yaml:12") && e.message.contains("add.yaml:18"),
            "{e}"
        );
        assert_eq!(e.line, 18);
    }

    #[test]
    fn globs_and_select() {
        assert!(glob_match("mla_decode*", "mla_decode(b=1)"));
        assert!(glob_match("*h_kv=?,*", "x(h_kv=2,y=1)"));
        assert!(!glob_match("*h_kv=?,*", "x(h_kv=12,y=1)"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("mla", "mla_decode"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        let s = parse(GOOD).unwrap();
        assert_eq!(select(&s, "full", None).len(), 2);
        assert_eq!(select(&s, "smoke", None).len(), 1);
        assert_eq!(select(&s, "full", Some("*rows=2*")).len(), 1);
        assert_eq!(select(&s, "v3-mustpass", Some("add(rows=5*")).len(), 1);
        assert!(select(&s, "nope", None).is_empty());
    }
}
