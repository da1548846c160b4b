//! `cpu-ref`'s DeepSeek-V3.2 sparse-attention kernels (docs/spec-v32.md
//! §9): the specification's loops themselves (`scalar::sparse`), one
//! function serving both.

pub(crate) use crate::scalar::sparse::{
    cache_quant, indexer_logits, indexer_topk, sparse_mla_decode, sparse_mla_prefill,
};
