//! `deepport forward --mtp`: DeepSeek-V3's multi-token-prediction layer
//! after the main pass (speculative next-next-token logits), its draft
//! acceptance over `--decode N`, and its judgement against the MTP goldens
//! (`golden_mtp_{mode}.safetensors`, golden/README.md "MTP").

use crate::model_check::{self, ForwardReport, TapCheck};
use deepport_core::tensor::TensorFile;
use deepport_core::{Error, HostTensor, Result};
use deepport_model::forward::{Model, Numerics, PrefillPath};
use std::path::Path;

/// What the MTP layer drafted over the run.
#[derive(Debug, Clone)]
pub struct MtpRun {
    /// `[rows, vocab]` f32: row `t` holds the logits of token `t + 2`.
    pub logits: HostTensor,
    /// The token drafted by the last row, and the position it is for.
    pub last_draft: (u32, usize),
    /// Drafts for decoded positions that the main model then decoded:
    /// (accepted, checked).
    pub acceptance: (usize, usize),
}

impl MtpRun {
    /// One or two report lines.
    pub fn summary(&self) -> String {
        let (tok, pos) = self.last_draft;
        let mut s = format!(
            "forward: MTP drafts token {tok} for position {pos} (speculative next-next token)"
        );
        let (a, n) = self.acceptance;
        if n > 0 {
            s += &format!(
                "\nforward: MTP draft acceptance over the decoded tokens: {a} of {n} ({:.1}%)",
                100.0 * a as f64 / n as f64
            );
        }
        s
    }
}

fn argmax_row(v: &[f32], row: usize, vocab: usize) -> Result<u32> {
    let r = v.get(row * vocab..(row + 1) * vocab).unwrap_or(&[]);
    super::argmax(r)
        .map(|i| i as u32)
        .ok_or_else(|| Error::Other(format!("forward --mtp: row {row} holds no finite logit")))
}

/// Runs the MTP layer over the sequence the model has cached (kept hidden
/// states: [`Model::keep_hidden`] was on): `prompt`, then `decoded` (the
/// greedy tokens of `--decode`, possibly none); `prefill_logits` are the
/// prompt's logits (their last row gives the first new token). Row `t`
/// pairs the hidden state of position `t` with token `t + 1`; drafts of
/// positions the main model decoded count towards the acceptance rate.
pub fn run(
    model: &Model<'_>,
    prompt: &[u32],
    prefill_logits: &HostTensor,
    decoded: &[u32],
) -> Result<MtpRun> {
    let vocab = model.config().vocab_size;
    let pl = prefill_logits.to_f32_vec();
    let first = argmax_row(&pl, (pl.len() / vocab.max(1)).saturating_sub(1), vocab)?;
    let mut seq: Vec<u32> = prompt.to_vec();
    seq.push(first);
    seq.extend(decoded.iter().skip(1));
    let hidden = model.hidden_states()?;
    let d = model.config().hidden_size;
    let rows = hidden.shape()[0].min(seq.len() - 1);
    let hv = hidden.to_f32_vec();
    let h = HostTensor::from_f32(hidden.dtype(), &[rows, d], &hv[..rows * d]);
    let out = model.mtp_forward(&h, &seq[1..=rows])?;
    let lv = out.logits.to_f32_vec();
    let mut acc = (0, 0);
    for t in prompt.len().saturating_sub(1)..rows {
        if let Some(&actual) = seq.get(t + 2) {
            acc.1 += 1;
            acc.0 += (argmax_row(&lv, t, vocab)? == actual) as usize;
        }
    }
    Ok(MtpRun {
        last_draft: (argmax_row(&lv, rows.saturating_sub(1), vocab)?, rows + 1),
        logits: out.logits,
        acceptance: acc,
    })
}

/// Taps of an MTP golden in data-flow order (`L` = the MTP layer index).
fn tap_order(l: usize) -> Vec<String> {
    let mut v = vec!["mtp.embed_norm".to_string(), "mtp.hidden_norm".to_string()];
    v.extend(
        model_check::TAP_ORDER
            .iter()
            .map(|t| format!("layers.{l}.{t}")),
    );
    v.push("mtp.norm_out".into());
    v.push("mtp.logits".into());
    v
}

/// rel_rms bounds (attention block, FFN block and after) of bf16/fp8; f32
/// is judged by max abs ≤ 1e-4 (1e-5 for top-k weights). The MTP layer is
/// fed the golden's hidden states, but its FFN sees this run's own
/// attention output, so the FFN bound covers the attention error carried
/// forward. cpu-ref measured (golden/README.md, "MTP"): bf16 fused 3.7e-3 /
/// 6.2e-3, paged bit-exact; fp8 fused 1.3e-2 / 4.4e-2, paged 1.3e-4 /
/// 1.6e-3.
pub fn bounds(mode: Numerics, path: PrefillPath) -> (f64, f64) {
    match (mode, path) {
        (Numerics::Fp8, PrefillPath::Fused) => (3e-2, 1e-1),
        (Numerics::Fp8, PrefillPath::Paged) => (1e-2, 1e-2),
        (_, PrefillPath::Fused) => (1e-2, 2e-2),
        (_, PrefillPath::Paged) => (3e-3, 3e-3),
    }
}

/// Runs the MTP layer on the golden's inputs (`mtp.hidden`,
/// `mtp.next_tokens`) and judges every tap, in data-flow order.
pub fn check(
    model: &Model<'_>,
    golden: &TensorFile,
    path: &Path,
    prefill: PrefillPath,
) -> Result<ForwardReport> {
    let mode = model.options().numerics;
    let next: Vec<u32> = golden
        .get(path, "mtp.next_tokens")?
        .to_i64_vec()
        .iter()
        .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
        .collect();
    let out = model.mtp_forward(golden.get(path, "mtp.hidden")?, &next)?;
    let l = model.config().num_hidden_layers;
    let (attn_b, ffn_b) = bounds(mode, prefill);
    let mut report = ForwardReport::default();
    let mut in_ffn = false;
    for name in tap_order(l) {
        in_ffn |= name.ends_with(".gate_logits");
        let Some(gold) = golden.tensors.get(&name) else {
            continue;
        };
        let mine = out.taps.get(&name);
        if mine.is_none() && (name.ends_with(".expert_out") || name.ends_with(".shared_out")) {
            // Not produced with several expert-parallel ranks.
            continue;
        }
        if name.ends_with(".topk_idx") {
            let k = *gold.shape().last().unwrap_or(&1);
            let value = mine.map_or(f64::INFINITY, |m| {
                let (a, r) = (m.to_i64_vec(), gold.to_i64_vec());
                if a.len() != r.len() {
                    return f64::INFINITY;
                }
                a.chunks(k).zip(r.chunks(k)).filter(|(x, y)| x != y).count() as f64
            });
            report.checks.push(TapCheck {
                name,
                metric: "routing_mismatches",
                value,
                threshold: 0.0,
                at_least: false,
            });
            continue;
        }
        let a = mine.map(|t| t.to_f32_vec()).unwrap_or_default();
        let g = gold.to_f32_vec();
        let check = if mode == Numerics::F32 {
            TapCheck {
                threshold: if name.ends_with(".topk_weights") {
                    1e-5
                } else {
                    1e-4
                },
                value: model_check::max_abs(&a, &g),
                name,
                metric: "max_abs",
                at_least: false,
            }
        } else {
            if name.ends_with(".topk_weights") {
                continue;
            }
            TapCheck {
                threshold: if in_ffn { ffn_b } else { attn_b },
                value: model_check::rel_rms(&a, &g),
                name,
                metric: "rel_rms",
                at_least: false,
            }
        };
        report.checks.push(check);
    }
    Ok(report)
}
