//! The `golden_ops` family: the op cases of `golden/ops/` (inputs and
//! expected outputs computed independently with PyTorch/f64, see
//! `golden/README.md`). Each case runs the file's op with the file's
//! parameters and is judged against the stored `expected.*` tensors
//! instead of the reference backend.

use super::dense::{moe_near_ties, routing, topk_key};
use super::gen::row_mask;
use super::judging::Judging;
use super::{opt, req, Case, Family, KeyKind, ParamMap, P};
use crate::opspec::{self, Arg, Inputs, Outputs, Params};
use crate::types::{CaseSpec, Source};
use deepport_core::ops::OpKind;
use deepport_core::tensor::read_safetensors;
use std::collections::BTreeMap;
use std::path::PathBuf;

use KeyKind::Text;

pub static GOLDEN_OPS_FAMILY: Family = Family {
    name: "golden_ops",
    keys: &[
        req("file", Text(&[])),
        // Any declared op (command-line name): the file says which.
        req("op", Text(&[])),
        opt("out", Text(super::GEMM_OUT)),
    ],
    outputs,
    ops,
    source,
    build,
};

fn op_name(p: &ParamMap) -> &str {
    p.get("op").and_then(|v| v.as_str()).unwrap_or("")
}

fn outputs(p: &ParamMap) -> Vec<&'static str> {
    OpKind::parse(op_name(p)).map_or_else(Vec::new, super::declared_outputs)
}

fn ops(p: &ParamMap) -> Vec<OpKind> {
    OpKind::parse(op_name(p)).map_or_else(Vec::new, |k| vec![k])
}

fn source(p: &ParamMap) -> Source {
    let file = p.get("file").and_then(|v| v.as_str()).unwrap_or("");
    Source::Golden {
        path: format!("golden/ops/{file}.safetensors"),
    }
}

/// Where a `golden/…` path of a [`Source`] lives on this machine: under
/// [`crate::golden::default_dir`] (`$DEEPPORT_GOLDEN` or the source tree).
pub fn resolve(path: &str) -> PathBuf {
    let rel = path.strip_prefix("golden/").unwrap_or(path);
    crate::golden::default_dir().join(rel)
}

fn build(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let op = p.text("op")?;
    let os = opspec::find(op).ok_or_else(|| format!("unknown op `{op}`"))?;
    let Source::Golden { path } = &spec.source else {
        return Err("golden_ops cases need a golden source".into());
    };
    let file = resolve(path);
    let tf = read_safetensors(&file).map_err(|e| format!("golden data: {e}"))?;
    let meta_op = tf.metadata.get("op").map(String::as_str).unwrap_or("");
    if meta_op != op {
        return Err(format!(
            "{} holds op `{meta_op}`, the catalogue says `{op}`",
            file.display()
        ));
    }
    let json: serde_json::Value = match tf.metadata.get("params") {
        None => serde_json::Value::Object(Default::default()),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("{}: params are not JSON: {e}", file.display()))?,
    };
    let obj = json
        .as_object()
        .ok_or_else(|| format!("{}: params are not a JSON object", file.display()))?;
    let params = obj
        .iter()
        .map(|(k, v)| {
            Arg::from_json(v).map(|a| (k.as_str(), a)).ok_or_else(|| {
                format!(
                    "{}: parameter `{k}` is {v}, not a number, flag or word",
                    file.display()
                )
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let parsed = Params::from_args(os, &params).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut inputs = BTreeMap::new();
    let mut expected = Outputs::new();
    for (name, t) in tf.tensors {
        match name.strip_prefix("expected.") {
            Some(out) => {
                expected.insert(out.to_string(), t);
            }
            None => {
                inputs.insert(name, t);
            }
        }
    }
    if expected.is_empty() {
        return Err(format!("{} has no expected.* tensors", file.display()));
    }
    let mut judging = Judging::new(spec);
    match op {
        // Padding rows (m_indices −1) and rows past masked_m are stored as 0
        // and are not checked (golden/README.md).
        "fp8-grouped-contiguous" | "gemm-grouped-contiguous" => {
            let mi = inputs.get("m_indices").ok_or("missing m_indices")?;
            let n = expected
                .get("d")
                .and_then(|d| d.shape().get(1).copied())
                .unwrap_or(0);
            let live: Vec<bool> = mi.to_i64_vec().iter().map(|&g| g >= 0).collect();
            judging = judging.mask("d", row_mask(&live, n));
        }
        "fp8-grouped-masked" | "gemm-grouped-masked" => {
            let mm = inputs
                .get("masked_m")
                .ok_or("missing masked_m")?
                .to_i64_vec();
            let shape = expected
                .get("d")
                .map(|d| d.shape().to_vec())
                .unwrap_or_default();
            let (m_max, n) = (
                shape.get(1).copied().unwrap_or(0),
                shape.get(2).copied().unwrap_or(0),
            );
            let live: Vec<bool> = (0..mm.len() * m_max)
                .map(|i| (i % m_max) < mm[i / m_max].max(0) as usize)
                .collect();
            judging = judging.mask("d", row_mask(&live, n));
        }
        "moe-gate" => {
            let (x, w) = (
                inputs.get("x").ok_or("missing x")?,
                inputs.get("weight").ok_or("missing weight")?,
            );
            let ties = moe_near_ties(
                x,
                w,
                inputs.get("bias"),
                parsed.int("n_group").map_err(|e| e.to_string())?,
                parsed.int("topk_group").map_err(|e| e.to_string())?,
                parsed.int("topk").map_err(|e| e.to_string())?,
            );
            judging = judging
                .key_of(topk_key)
                .with(routing::judge(BTreeMap::from([(
                    "topk_idx".to_string(),
                    ties,
                )])));
        }
        _ => {}
    }
    let inputs = Inputs::new(file.display().to_string(), os.name, inputs);
    Ok(Case {
        id: spec.id.clone(),
        ops: vec![os.kind],
        run: Box::new(move |b| {
            let mut p = parsed.clone();
            opspec::run(os, b, &inputs, &mut p)
        }),
        judge: judging.into_fn(),
        expected: Some(expected),
    })
}
