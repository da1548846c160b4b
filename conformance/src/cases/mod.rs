//! The op families of the conformance suite and their case builders.
//!
//! A case file of `conformance/cases/` names a family and a grid of
//! parameters; the catalogue (`suite::catalogue`, the layer above) expands it into
//! [`CaseSpec`]s and [`build`]s each one with its family's builder into a
//! runnable [`Case`]: inputs generated once from the case's seed (with the
//! adversarial features of DeepSeek's own tests — partial 128-blocks, NaN in
//! cache slots that must not be read, permuted block tables with huge unused
//! entries, padding rows, poisoned masked rows, near-zero and saturating
//! values), a `run` on one backend, and a `judge` driven by the case's
//! tolerance entries ([`judging`]).
//!
//! [`FAMILIES`] is the table of families: their parameter keys (in id
//! order, with types and defaults), the outputs that need a tolerance, the
//! ops they exercise and the builder.

mod dense;
pub(crate) mod ep;
mod gemm_grouped;
pub mod gen;
mod golden;
pub mod judging;
mod mla;
mod model;
mod sparse;

use crate::judge::Check;
use crate::opspec::{self, Arg, CliResult, Inputs, Outputs, Params};
use crate::types::{CaseSpec, Source};
use deepport_core::backend::Backend;
use deepport_core::ops::OpKind;
use deepport_core::{DType, HostTensor};
use serde_json::Value;
use std::collections::BTreeMap;

/// Runs a case on one backend and returns its named outputs.
pub type RunFn = Box<dyn Fn(&dyn Backend) -> CliResult<Outputs> + Send + Sync>;
/// Judges the outputs of the backend under test (first) against the
/// reference's or the expected ones (second).
pub type JudgeFn = Box<dyn Fn(&Outputs, &Outputs) -> Vec<Check> + Send + Sync>;

/// One runnable case.
pub struct Case {
    /// Canonical id, e.g. `fp8_gemm(m=37,n=576,k=256,ab=e4m3,out=bf16)`.
    pub id: String,
    /// The ops the case runs (the first names the case).
    pub ops: Vec<OpKind>,
    pub run: RunFn,
    pub judge: JudgeFn,
    /// Expected outputs stored with the case (golden data): when present,
    /// the case is judged against them instead of the reference backend.
    pub expected: Option<Outputs>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Case({})", self.id)
    }
}

/// Parameters of a case, by key.
pub type ParamMap = BTreeMap<String, Value>;

/// The type of a parameter key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A non-negative integer.
    Int,
    /// A real number.
    Float,
    /// 0 or 1 (YAML `true`/`false` are accepted and stored as 1/0).
    Flag,
    /// One of these words (any text without `,()=` when empty).
    Text(&'static [&'static str]),
}

/// One parameter key of a family.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub name: &'static str,
    pub kind: KeyKind,
    /// Value used when a case does not set the key (parsed like YAML).
    /// `None`: the key is required, unless `optional`.
    pub default: Option<&'static str>,
    /// May be absent (then it is left out of the id).
    pub optional: bool,
}

/// A required key.
pub const fn req(name: &'static str, kind: KeyKind) -> Key {
    Key {
        name,
        kind,
        default: None,
        optional: false,
    }
}

/// A key with a default.
pub const fn def(name: &'static str, kind: KeyKind, default: &'static str) -> Key {
    Key {
        name,
        kind,
        default: Some(default),
        optional: false,
    }
}

/// A key that may be absent.
pub const fn opt(name: &'static str, kind: KeyKind) -> Key {
    Key {
        name,
        kind,
        default: None,
        optional: true,
    }
}

/// Builds a runnable case.
pub type BuildFn = fn(&CaseSpec) -> Result<Case, String>;

/// An op family: one case file, one builder.
pub struct Family {
    pub name: &'static str,
    /// Keys in id order.
    pub keys: &'static [Key],
    /// The tolerance keys (output names) a case with these parameters must
    /// have, no more and no fewer.
    pub outputs: fn(&ParamMap) -> Vec<&'static str>,
    /// The ops a case with these parameters exercises.
    pub ops: fn(&ParamMap) -> Vec<OpKind>,
    /// Where its inputs and expected outputs come from.
    pub source: fn(&ParamMap) -> Source,
    pub build: BuildFn,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.name)
    }
}

impl Family {
    pub fn key(&self, name: &str) -> Option<&'static Key> {
        self.keys.iter().find(|k| k.name == name)
    }
}

fn generated(_: &ParamMap) -> Source {
    Source::Generated
}

/// Every family, in catalogue order.
pub static FAMILIES: &[&Family] = &[
    &dense::ACT_QUANT,
    &dense::WEIGHT_DEQUANT,
    &dense::FP8_GEMM,
    &dense::FP8_GROUPED_CONTIGUOUS,
    &dense::FP8_GROUPED_MASKED,
    &dense::GEMM,
    &gemm_grouped::GEMM_GROUPED,
    &mla::MLA_DECODE,
    &mla::MLA_PREFILL,
    &dense::RMS_NORM,
    &dense::ROPE,
    &dense::MOE_GATE,
    &dense::SILU_MUL,
    &dense::ADD,
    &dense::EMBEDDING,
    &dense::COPY_WINDOW,
    &sparse::INDEXER_LOGITS,
    &sparse::INDEXER_TOPK,
    &sparse::SPARSE_MLA_DECODE,
    &sparse::CACHE_QUANT,
    &sparse::SPARSE_MLA_PREFILL,
    &ep::EP,
    &golden::GOLDEN_OPS_FAMILY,
    &model::MODEL,
];

/// The family of this name.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.name == name)
}

/// The ops a case exercises (empty for an unknown family).
pub fn ops_of(spec: &CaseSpec) -> Vec<OpKind> {
    family(&spec.family).map_or_else(Vec::new, |f| (f.ops)(&spec.params))
}

/// Builds the runnable case of a spec.
pub fn build(spec: &CaseSpec) -> Result<Case, String> {
    let f = family(&spec.family).ok_or_else(|| format!("unknown op family `{}`", spec.family))?;
    (f.build)(spec)
}

// ---- output lists, from core's declarations --------------------------------

/// The tolerance key an output is judged under: the two routing outputs of
/// the MoE gate (`topk_idx`, `topk_weights`, with any prefix) share `topk`;
/// every other output has its own name.
pub fn tolerance_key(name: &str) -> &str {
    if name.ends_with("topk_idx") || name.ends_with("topk_weights") {
        "topk"
    } else {
        name
    }
}

/// The tolerance keys a case of one op needs: the outputs `kind` always
/// writes, as its declaration lists them, under their [`tolerance_key`]s.
pub fn declared_outputs(kind: OpKind) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for name in kind.decl().required_output_names() {
        let k = tolerance_key(name);
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

/// `prefix.name` for each name, as `&'static str` (interned once).
pub fn prefixed(prefix: &str, names: &[&str]) -> Vec<&'static str> {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static INTERNED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut set = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
    names
        .iter()
        .map(|n| {
            let s = format!("{prefix}.{n}");
            match set.get(s.as_str()) {
                Some(&i) => i,
                None => {
                    let i: &'static str = Box::leak(s.into_boxed_str());
                    set.insert(i);
                    i
                }
            }
        })
        .collect()
}

// ---- typed access to a case's parameters ----------------------------------

/// Typed getters over a case's parameters; errors name the key.
pub struct P<'a>(pub &'a ParamMap);

impl P<'_> {
    fn get(&self, k: &str) -> Result<&Value, String> {
        self.0
            .get(k)
            .ok_or_else(|| format!("the case has no parameter `{k}`"))
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    pub fn int(&self, k: &str) -> Result<usize, String> {
        let v = self.get(k)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| format!("parameter `{k}` is {v}, expected a non-negative integer"))
    }
    pub fn opt_int(&self, k: &str) -> Result<Option<usize>, String> {
        if self.has(k) {
            self.int(k).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn float(&self, k: &str) -> Result<f64, String> {
        let v = self.get(k)?;
        v.as_f64()
            .ok_or_else(|| format!("parameter `{k}` is {v}, expected a number"))
    }
    pub fn opt_float(&self, k: &str) -> Result<Option<f64>, String> {
        if self.has(k) {
            self.float(k).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn flag(&self, k: &str) -> Result<bool, String> {
        Ok(self.int(k)? != 0)
    }
    pub fn text(&self, k: &str) -> Result<&str, String> {
        let v = self.get(k)?;
        v.as_str()
            .ok_or_else(|| format!("parameter `{k}` is {v}, expected text"))
    }
    pub fn opt_text(&self, k: &str) -> Result<Option<&str>, String> {
        if self.has(k) {
            self.text(k).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn dtype(&self, k: &str) -> Result<DType, String> {
        let s = self.text(k)?;
        DType::parse(s).ok_or_else(|| format!("parameter `{k}`: `{s}` is not a dtype"))
    }
    /// A `/`-separated list of integers (`0/17/64`).
    pub fn ints(&self, k: &str) -> Result<Option<Vec<usize>>, String> {
        let Some(s) = self.opt_text(k)? else {
            return Ok(None);
        };
        s.split('/')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("parameter `{k}`: `{x}` in `{s}` is not an integer"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Words accepted for float dtypes of activations.
pub const FLOAT_DTYPES: &[&str] = &["f32", "bf16", "f16"];
/// FP8 formats.
pub const FP8_FORMATS: &[&str] = &["e4m3", "e4m3fnuz"];
/// Output dtypes of the FP8 GEMMs.
pub const GEMM_OUT: &[&str] = &["bf16", "f32"];

// ---- a case that runs one op through the `deepport op` path ---------------

/// A case that runs the op `op` (command-line name) on `tensors` with the
/// typed `params`, judged by `judge`. Inputs and parameters are checked
/// once here (a parameter the op does not declare, or a value of the wrong
/// type, is an error naming it); every run reuses them.
pub(crate) fn op_case(
    spec: &CaseSpec,
    op: &'static str,
    tensors: Vec<(&str, HostTensor)>,
    params: Vec<(&str, Arg<'_>)>,
    judge: JudgeFn,
) -> Result<Case, String> {
    let os = opspec::find(op).ok_or_else(|| format!("internal: no op named {op}"))?;
    let tensors: BTreeMap<String, HostTensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let inputs = Inputs::new(format!("case {}", spec.id), os.name, tensors);
    let p = Params::from_args(os, &params).map_err(|e| e.to_string())?;
    Ok(Case {
        id: spec.id.clone(),
        ops: vec![os.kind],
        run: Box::new(move |b| {
            let mut p = p.clone();
            opspec::run(os, b, &inputs, &mut p)
        }),
        judge,
        expected: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn family_table_is_consistent() {
        let mut names = BTreeSet::new();
        for f in FAMILIES {
            assert!(names.insert(f.name), "duplicate family {}", f.name);
            let mut keys = BTreeSet::new();
            for k in f.keys {
                assert!(keys.insert(k.name), "{}: duplicate key {}", f.name, k.name);
                assert!(
                    !(k.optional && k.default.is_some()),
                    "{}: {} is optional with a default",
                    f.name,
                    k.name
                );
            }
        }
        assert!(family("mla_decode").is_some());
        assert!(family("nope").is_none());
    }

    #[test]
    fn typed_params_name_the_key() {
        let m: ParamMap = [
            ("a".to_string(), Value::from(3)),
            ("t".to_string(), Value::from("0/17/x")),
            ("d".to_string(), Value::from("bf16")),
        ]
        .into_iter()
        .collect();
        let p = P(&m);
        assert_eq!(p.int("a"), Ok(3));
        assert!(p.int("t").unwrap_err().contains("`t`"));
        assert!(p.int("zz").unwrap_err().contains("`zz`"));
        assert!(p.ints("t").unwrap_err().contains("`x`"));
        assert_eq!(p.dtype("d"), Ok(DType::BF16));
        assert_eq!(p.opt_int("zz"), Ok(None));
    }
}
