//! The `model` family: the whole DeepSeek-V3 forward pass
//! ([`deepport_model`]) on the tiny golden checkpoint of
//! `golden/model/`, judged against the golden outputs of its numerics mode
//! (SPEC §8):
//!
//! * `check=logits`: one causal prefill of the golden prompt. f32 mode
//!   compares the logits and every tap (layer inputs, attention and FFN
//!   outputs, final norm) elementwise and the routing exactly; bf16 and fp8
//!   only statistically (cosine, top-1), because one flipped rounding moves
//!   a routing decision and two correct runs decorrelate.
//! * `check=layer, layer=i`: layer `i` teacher forced — fed the golden
//!   input (and the golden attention output for its FFN) — with its
//!   `attn_out`, `ffn_out` and, for MoE layers, its routing compared.
//! * `check=routing`: the routing of every MoE layer in one prefill.
//!
//! `path` picks the prefill attention kernels: `fused` (`mla_prefill`) or
//! `paged` (per-head GEMMs around a causal `mla_decode`, rounding where the
//! golden rounds).

use super::judging::Judging;
use super::{def, opt, req, Case, Family, KeyKind, ParamMap, P};
use crate::error::CliError;
use crate::opspec::Outputs;
use crate::types::{CaseSpec, Source};
use deepport_core::ops::{MlaForm, OpKind};
use deepport_core::tensor::read_safetensors;
use deepport_model::{Checkpoint, LoadOptions, Model, ModelConfig, Numerics, PrefillPath, Taps};
use std::path::PathBuf;

use KeyKind::{Int, Text};

pub static MODEL: Family = Family {
    name: "model",
    keys: &[
        req("mode", Text(&["f32", "bf16", "fp8"])),
        req("check", Text(&["logits", "layer", "routing"])),
        opt("layer", Int),
        def("path", Text(&["fused", "paged"]), "fused"),
        def("form", Text(&["absorb", "naive"]), "absorb"),
    ],
    outputs,
    ops,
    source,
    build,
};

fn text<'a>(p: &'a ParamMap, k: &str) -> &'a str {
    p.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

fn outputs(p: &ParamMap) -> Vec<&'static str> {
    match (text(p, "check"), text(p, "mode")) {
        ("logits", "f32") => vec!["logits", "taps", "routing"],
        ("logits", _) => vec!["logits"],
        ("layer", _) => vec!["attn_out", "ffn_out", "routing"],
        _ => vec!["routing"],
    }
}

fn ops(p: &ParamMap) -> Vec<OpKind> {
    use OpKind::*;
    let mut v = vec![
        Embedding,
        RmsNorm,
        WeightDequant,
        Gemm,
        Rope,
        Add,
        MoeGate,
        SiluMul,
        CopyWindow,
    ];
    v.push(if text(p, "path") == "paged" {
        MlaDecode
    } else {
        MlaPrefill
    });
    v.extend([LowLatencyDispatch, LowLatencyCombine]);
    if text(p, "mode") == "fp8" {
        v.extend([ActQuant, Fp8Gemm]);
    }
    v
}

fn source(p: &ParamMap) -> Source {
    let check = match (text(p, "check"), p.get("layer").and_then(|v| v.as_u64())) {
        ("layer", Some(i)) => format!("layer{i}"),
        (c, _) => c.to_string(),
    };
    Source::Model {
        mode: text(p, "mode").to_string(),
        check,
    }
}

/// Maps the golden data's tap names to the tolerance keys.
fn key_of(name: &str) -> String {
    if name.ends_with("topk_idx") || name.ends_with("topk_weights") {
        "routing".into()
    } else if name.starts_with("layers.") || name == "final_norm_out" {
        "taps".into()
    } else {
        name.into()
    }
}

fn model_dir() -> PathBuf {
    super::golden::resolve("golden/model")
}

fn build(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let mode_s = p.text("mode")?;
    let numerics = Numerics::parse(mode_s).ok_or_else(|| format!("unknown mode `{mode_s}`"))?;
    let check = p.text("check")?.to_string();
    let prefill = PrefillPath::parse(p.text("path")?).ok_or("unknown path")?;
    let form = MlaForm::parse(p.text("form")?).ok_or("unknown form")?;
    let layer = p.opt_int("layer")?;
    if (check == "layer") != layer.is_some() {
        return Err("model: `layer` is required with check=layer and only then".into());
    }
    let dir = model_dir();
    let gpath = dir.join(format!("golden_{mode_s}.safetensors"));
    let golden = read_safetensors(&gpath).map_err(|e| format!("golden data: {e}"))?;
    let cfg = ModelConfig::from_file(dir.join("config.json"))
        .map_err(|e| format!("golden model: {e}"))?;
    let tokens: Vec<u32> = golden
        .get(&gpath, "tokens")
        .map_err(|e| e.to_string())?
        .to_i64_vec()
        .iter()
        .map(|&t| t as u32)
        .collect();
    let moe: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&i| cfg.is_moe_layer(i))
        .collect();
    let g = |name: &str| golden.get(&gpath, name).cloned().map_err(|e| e.to_string());
    // The expected outputs, named as the run names its outputs.
    let mut expected = Outputs::new();
    let mut teacher = None;
    match check.as_str() {
        "logits" => {
            expected.insert("logits".into(), g("logits")?);
            if numerics == Numerics::F32 {
                for (name, t) in &golden.tensors {
                    if name.starts_with("layers.") || name == "final_norm_out" {
                        expected.insert(name.clone(), t.clone());
                    }
                }
            }
        }
        "layer" => {
            let i = layer.unwrap_or(0);
            if i >= cfg.num_hidden_layers {
                return Err(format!(
                    "layer {i}: the golden model has {} layers",
                    cfg.num_hidden_layers
                ));
            }
            for tap in ["attn_out", "ffn_out"] {
                expected.insert(tap.into(), g(&format!("layers.{i}.{tap}"))?);
            }
            if moe.contains(&i) {
                for tap in ["topk_idx", "topk_weights"] {
                    expected.insert(tap.into(), g(&format!("layers.{i}.{tap}"))?);
                }
            }
            teacher = Some((
                i,
                g(&format!("layers.{i}.input"))?,
                g(&format!("layers.{i}.attn_out"))?,
            ));
        }
        _ => {
            for &i in &moe {
                for tap in ["topk_idx", "topk_weights"] {
                    let name = format!("layers.{i}.{tap}");
                    expected.insert(name.clone(), g(&name)?);
                }
            }
        }
    }
    let want: Vec<String> = expected.keys().cloned().collect();
    let check_run = check.clone();
    let run = move |b: &dyn deepport_core::backend::Backend| -> Result<Outputs, CliError> {
        let fail = CliError::Failed;
        let ckpt = Checkpoint::open(&dir).map_err(fail)?;
        let opts = LoadOptions {
            numerics,
            form,
            scale_fmt: cfg.act_scale_fmt(),
            prefill,
        };
        let mut m = Model::load_with(b, &ckpt, &cfg, opts).map_err(fail)?;
        let mut out = Outputs::new();
        if let Some((i, input, attn)) = &teacher {
            let lo = m.layer_forward(*i, input, Some(attn)).map_err(fail)?;
            out.insert("attn_out".into(), lo.attn_out);
            out.insert("ffn_out".into(), lo.ffn_out);
            if let Some(r) = lo.routing {
                out.insert("topk_idx".into(), r.topk_idx);
                out.insert("topk_weights".into(), r.topk_weights);
            }
            return Ok(out);
        }
        let mut taps = Taps::new();
        let logits = m.prefill_with_taps(&tokens, &mut taps).map_err(fail)?;
        if check_run == "logits" {
            out.insert("logits".into(), logits);
        }
        for (name, t) in taps.tensors {
            if want.contains(&name) && name != "logits" {
                out.insert(name, t);
            }
        }
        Ok(out)
    };
    Ok(Case {
        id: spec.id.clone(),
        ops: ops(&spec.params),
        run: Box::new(run),
        judge: Judging::new(spec)
            .key_of(key_of)
            .with(super::dense::routing::judge(Default::default()))
            .into_fn(),
        expected: Some(expected),
    })
}
