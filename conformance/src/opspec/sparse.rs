//! `deepport op` runners of the DeepSeek-V3.2 sparse-attention ops
//! (docs/spec-v32.md §9): outputs allocated from the inputs and parameters.

use super::{
    attention_out_dtype, dim, launch, out, outputs, up, CliResult, Inputs, Outputs, Params, RunFn,
};
use crate::error::CliError;
use deepport_core::backend::Backend;
use deepport_core::ops::*;
use deepport_core::DType;

/// The runner of a V3.2 op (`None` for any other op).
pub(super) fn runner(kind: OpKind) -> Option<RunFn> {
    Some(match kind {
        OpKind::IndexerLogits => run_indexer_logits,
        OpKind::IndexerTopk => run_indexer_topk,
        OpKind::SparseMlaDecode => run_sparse_mla_decode,
        OpKind::CacheQuant => run_cache_quant,
        OpKind::SparseMlaPrefill => run_sparse_mla_prefill,
        _ => return None,
    })
}

fn run_indexer_logits(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let qh = i.get("q")?;
    let kh = i.get("kv_cache")?;
    let th = i.as_i32("block_table")?;
    let rows = dim(qh, 0) * dim(qh, 1);
    let max_len = match p.int("max_len")? {
        0 => dim(&th, 1) * dim(kh, 1),
        n => n,
    };
    let q = up(b, qh)?;
    let weights = up(b, i.get("weights")?)?;
    let kv_cache = up(b, kh)?;
    let context_lens = up(b, &i.as_i32("context_lens")?)?;
    let block_table = up(b, &th)?;
    let mut logits = out(b, DType::F32, &[rows, max_len])?;
    launch(
        b,
        IndexerLogits {
            q: &q,
            weights: &weights,
            kv_cache: &kv_cache,
            context_lens: &context_lens,
            block_table: &block_table,
            logits: &mut logits,
        },
    )?;
    outputs(b, &[("logits", &logits)])
}

fn run_indexer_topk(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let lh = i.get("logits")?;
    let topk = p.int("topk")?;
    let logits = up(b, lh)?;
    let lengths = up(b, &i.as_i32("lengths")?)?;
    let mut indices = out(b, DType::I32, &[dim(lh, 0), topk])?;
    launch(
        b,
        IndexerTopk {
            logits: &logits,
            lengths: &lengths,
            indices: &mut indices,
        },
    )?;
    outputs(b, &[("indices", &indices)])
}

fn run_sparse_mla_decode(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let qh = i.get("q")?;
    let (bs, s_q, h_q) = (dim(qh, 0), dim(qh, 1), dim(qh, 2));
    let scale = p.float_or("softmax_scale", (V32_D as f32).powf(-0.5))?;
    let q = up(b, qh)?;
    let kcache = up(b, i.get("kcache")?)?;
    let indices = up(b, &i.as_i32("indices")?)?;
    let topk_length = match i.opt("topk_length") {
        Some(_) => Some(up(b, &i.as_i32("topk_length")?)?),
        None => None,
    };
    let attn_sink = match i.opt("attn_sink") {
        Some(_) => Some(up(b, &i.as_f32("attn_sink")?)?),
        None => None,
    };
    let mut o = out(
        b,
        attention_out_dtype(qh.dtype()),
        &[bs, s_q, h_q, V32_NOPE],
    )?;
    let mut lse = out(b, DType::F32, &[bs, h_q, s_q])?;
    launch(
        b,
        SparseMlaDecode {
            q: &q,
            kcache: &kcache,
            indices: &indices,
            topk_length: topk_length.as_ref(),
            attn_sink: attn_sink.as_ref(),
            out: &mut o,
            lse: &mut lse,
            softmax_scale: scale,
        },
    )?;
    outputs(b, &[("out", &o), ("lse", &lse)])
}

fn run_sparse_mla_prefill(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let qh = i.get("q")?;
    let (s_q, h_q) = (dim(qh, 0), dim(qh, 1));
    let scale = p.float_or("softmax_scale", (dim(qh, 2) as f32).powf(-0.5))?;
    let q = up(b, qh)?;
    let kv = up(b, i.get("kv")?)?;
    let indices = up(b, &i.as_i32("indices")?)?;
    let topk_length = match i.opt("topk_length") {
        Some(_) => Some(up(b, &i.as_i32("topk_length")?)?),
        None => None,
    };
    let attn_sink = match i.opt("attn_sink") {
        Some(_) => Some(up(b, &i.as_f32("attn_sink")?)?),
        None => None,
    };
    let mut o = out(b, attention_out_dtype(qh.dtype()), &[s_q, h_q, V32_NOPE])?;
    let mut max_logits = out(b, DType::F32, &[s_q, h_q])?;
    let mut lse = out(b, DType::F32, &[s_q, h_q])?;
    launch(
        b,
        SparseMlaPrefill {
            q: &q,
            kv: &kv,
            indices: &indices,
            topk_length: topk_length.as_ref(),
            attn_sink: attn_sink.as_ref(),
            out: &mut o,
            max_logits: &mut max_logits,
            lse: &mut lse,
            softmax_scale: scale,
        },
    )?;
    outputs(
        b,
        &[("out", &o), ("max_logits", &max_logits), ("lse", &lse)],
    )
}

fn run_cache_quant(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let xh = i.get("x")?;
    let name = p.choice("layout")?;
    let layout = CacheLayout::parse(name)
        .ok_or_else(|| CliError::usage(format!("unknown cache layout `{name}`")))?;
    let x = up(b, xh)?;
    let bytes = layout.token_bytes(dim(xh, 2));
    let mut cache = out(b, DType::U8, &[dim(xh, 0), dim(xh, 1), bytes])?;
    launch(
        b,
        CacheQuant {
            x: &x,
            cache: &mut cache,
            layout,
            ue8m0: p.bool("ue8m0")?,
        },
    )?;
    outputs(b, &[("cache", &cache)])
}
