//! `deepport forward`: the DeepSeek-V3 forward pass on any backend, from a
//! Hugging Face checkpoint directory, optionally judged against golden data.

use crate::error::CliError;
use crate::model_check::{self, ForwardReport};
use deepport_core::ops::MlaForm;
use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::Error;
use deepport_model::forward::{LoadOptions, Model, Numerics, PrefillPath, Taps};
use deepport_model::{Checkpoint, ModelConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Arguments of `deepport forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Backend to run on (`deepport list` shows them).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Hugging Face DeepSeek-V3 checkpoint directory: config.json plus
    /// model.safetensors or a sharded model.safetensors.index.json.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt token ids: `1,2,3`, or `@file.json` holding a JSON list.
    /// Defaults to the golden prompt when --golden is given.
    #[arg(long)]
    pub tokens: Option<String>,
    /// Numerics mode (SPEC.md §8).
    #[arg(long, default_value = "bf16", value_parser = ["f32", "bf16", "fp8"])]
    pub mode: String,
    /// Attention form of the fused prefill (naive expands kv_b per head;
    /// absorb is DeepSeek's default).
    #[arg(long, default_value = "absorb", value_parser = ["naive", "absorb"])]
    pub attn: String,
    /// Prefill kernels: `fused` (mla_prefill) or `paged` (the decode
    /// kernels over the paged cache, rounding where DeepSeek rounds).
    #[arg(long, default_value = "fused", value_parser = ["fused", "paged"])]
    pub prefill: String,
    /// Write logits (and taps) here as safetensors.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write per-layer taps: layers.{i}.input/attn_out/ffn_out/topk_idx/topk_weights.
    #[arg(long)]
    pub taps: bool,
    /// Golden directory (holding golden_{mode}.safetensors): judge the run
    /// per layer and tap, and name the first layer and op that left tolerance.
    #[arg(long)]
    pub golden: Option<PathBuf>,
}

fn parse_tokens(spec: &str) -> Result<Vec<u32>, CliError> {
    let text = if let Some(path) = spec.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("--tokens {path}: {e}")))?
    } else {
        format!("[{spec}]")
    };
    let v: Vec<i64> = serde_json::from_str(text.trim()).map_err(|e| {
        CliError::usage(format!(
            "--tokens: expected comma-separated ids or @file.json with a JSON list: {e}"
        ))
    })?;
    v.into_iter()
        .map(|t| {
            u32::try_from(t)
                .map_err(|_| CliError::usage(format!("--tokens: {t} is not a valid token id")))
        })
        .collect()
}

fn failed(e: Error) -> CliError {
    CliError::Failed(e)
}

/// Runs `deepport forward`; returns whether the golden checks (if any) passed.
pub fn run(args: &ForwardArgs) -> Result<bool, CliError> {
    let numerics = Numerics::parse(&args.mode)
        .ok_or_else(|| CliError::usage(format!("--mode {}", args.mode)))?;
    let form = MlaForm::parse(&args.attn)
        .ok_or_else(|| CliError::usage(format!("--attn {}", args.attn)))?;
    let prefill = PrefillPath::parse(&args.prefill)
        .ok_or_else(|| CliError::usage(format!("--prefill {}", args.prefill)))?;
    let backend = crate::registry().create(&args.backend).map_err(failed)?;
    let cfg = ModelConfig::from_file(args.checkpoint.join("config.json")).map_err(failed)?;
    let ckpt = Checkpoint::open(&args.checkpoint).map_err(failed)?;
    let golden = match &args.golden {
        Some(dir) => {
            let p = dir.join(format!("golden_{}.safetensors", numerics.name()));
            Some((read_safetensors(&p).map_err(failed)?, p))
        }
        None => None,
    };
    let tokens = match (&args.tokens, &golden) {
        (Some(t), _) => parse_tokens(t)?,
        (None, Some((g, p))) => model_check::golden_tokens(g, p).map_err(failed)?,
        (None, None) => return Err(CliError::usage("--tokens is required without --golden")),
    };
    let opts = LoadOptions {
        numerics,
        form,
        scale_fmt: cfg.act_scale_fmt(),
        prefill,
    };
    eprintln!(
        "forward: loading {} on {} ({} mode, {} prefill, {} attention)…",
        args.checkpoint.display(),
        backend.name(),
        numerics,
        prefill.name(),
        form.name()
    );
    let t0 = std::time::Instant::now();
    let mut model = Model::load_with(backend.as_ref(), &ckpt, &cfg, opts).map_err(failed)?;
    eprintln!(
        "forward: loaded in {:.1} s; prefill of {} tokens…",
        t0.elapsed().as_secs_f64(),
        tokens.len()
    );
    let t1 = std::time::Instant::now();
    let mut taps = Taps::new();
    let logits = model
        .prefill_with_taps(&tokens, &mut taps)
        .map_err(failed)?;
    eprintln!("forward: prefill took {:.2} s", t1.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        let mut tensors = BTreeMap::new();
        tensors.insert("logits".to_string(), logits.clone());
        if args.taps {
            for (k, v) in &taps.tensors {
                if k.starts_with("layers.") {
                    tensors.insert(k.clone(), v.clone());
                }
            }
        }
        let meta = BTreeMap::from([
            ("backend".to_string(), backend.name().to_string()),
            ("mode".to_string(), numerics.name().to_string()),
            ("attn".to_string(), form.name().to_string()),
            ("prefill".to_string(), prefill.name().to_string()),
            (
                "tokens".to_string(),
                serde_json::to_string(&tokens).unwrap_or_default(),
            ),
        ]);
        write_safetensors(out, &tensors, &meta).map_err(failed)?;
        eprintln!("forward: wrote {}", out.display());
    }
    let Some((g, p)) = &golden else {
        return Ok(true);
    };
    let report: ForwardReport =
        model_check::check_forward(&mut model, g, p, prefill).map_err(failed)?;
    print!("{}", report.table());
    match report.first_failure() {
        None => {
            println!(
                "forward: every layer and tap within tolerance of {}",
                p.display()
            );
            Ok(true)
        }
        Some(c) => {
            println!(
                "forward: first divergence: {} ({} = {:.4e}, threshold {:.4e}) against {}",
                c.name,
                c.metric,
                c.value,
                c.threshold,
                display(p)
            );
            Ok(false)
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse() {
        assert_eq!(parse_tokens("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_tokens("1,x").is_err());
        assert!(parse_tokens("-1").is_err());
        assert!(parse_tokens("@/nonexistent/file.json").is_err());
    }
}
