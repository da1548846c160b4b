//! DeepSeek-V3.2 sparse-attention ops (docs/spec-v32.md §9): no CUDA
//! kernel yet. Each answers NotSupported (and `supports` says so through
//! `KERNEL_OPS`), so the generic forwarding of every local op compiles.

use crate::launch::LaunchContext;
use deepport_core::ops::*;
use deepport_core::{Error, Result};

fn missing(op: &'static str) -> Error {
    Error::not_supported("cuda", op, "no CUDA kernel for the V3.2 sparse ops yet")
}

/// `indexer_logits`: not implemented.
pub fn indexer_logits(_cx: &dyn LaunchContext, _op: &mut Checked<IndexerLogits<'_>>) -> Result<()> {
    Err(missing("indexer_logits"))
}

/// `indexer_topk`: not implemented.
pub fn indexer_topk(_cx: &dyn LaunchContext, _op: &mut Checked<IndexerTopk<'_>>) -> Result<()> {
    Err(missing("indexer_topk"))
}

/// `sparse_mla_decode`: not implemented.
pub fn sparse_mla_decode(
    _cx: &dyn LaunchContext,
    _op: &mut Checked<SparseMlaDecode<'_>>,
) -> Result<()> {
    Err(missing("sparse_mla_decode"))
}

/// `sparse_mla_prefill`: not implemented.
pub fn sparse_mla_prefill(
    _cx: &dyn LaunchContext,
    _op: &mut Checked<SparseMlaPrefill<'_>>,
) -> Result<()> {
    Err(missing("sparse_mla_prefill"))
}

/// `cache_quant`: not implemented.
pub fn cache_quant(_cx: &dyn LaunchContext, _op: &mut Checked<CacheQuant<'_>>) -> Result<()> {
    Err(missing("cache_quant"))
}
