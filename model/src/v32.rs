//! DeepSeek-V3.2's lightning-indexer weights (DeepSeek Sparse Attention),
//! read and checked from a checkpoint. The forward pass runs them in its
//! fused prefill (`v32_forward.rs`); the steps are written in
//! `golden/README.md` ("DeepSeek-V3.2").

use crate::checkpoint::{Checkpoint, LinearWeight};
use crate::config::{IndexerConfig, ModelConfig};
use deepport_core::dtype::DType;
use deepport_core::error::{Error, Result};
use deepport_core::tensor::HostTensor;

/// One layer's indexer, under `model.layers.{i}.self_attn.indexer`.
#[derive(Clone, Debug)]
pub struct IndexerWeights {
    /// `wq_b`: `[index_n_heads · index_head_dim, q_lora_rank]`, applied to
    /// the attention's normalized query latent (`q_a_layernorm` output).
    pub wq_b: LinearWeight,
    /// `wk`: `[index_head_dim, hidden]`.
    pub wk: LinearWeight,
    /// `k_norm`: a LayerNorm (weight and bias, `[index_head_dim]`).
    pub k_norm_weight: HostTensor,
    pub k_norm_bias: HostTensor,
    /// `weights_proj`: `[index_n_heads, hidden]`, the per-head weights.
    pub weights_proj: LinearWeight,
}

/// The indexer configuration of `cfg`, or an error naming the missing
/// `index_topk` (a V3 config).
pub fn indexer_config(cfg: &ModelConfig) -> Result<&IndexerConfig> {
    cfg.indexer.as_ref().ok_or_else(|| {
        Error::invalid(
            "config",
            "index_topk",
            "missing: not a DeepSeek-V3.2 config (no index_n_heads/index_head_dim/index_topk)",
        )
    })
}

/// Reads and checks layer `layer`'s indexer weights (dtypes and shapes
/// from the config; FP8 linears with their 128×128 scales).
pub fn load_indexer(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<IndexerWeights> {
    let ix = indexer_config(cfg)?;
    let q_lora = cfg.q_lora_rank.ok_or_else(|| {
        Error::invalid(
            "config",
            "q_lora_rank",
            "DeepSeek-V3.2's indexer reads the query latent: q_lora_rank must be set",
        )
    })?;
    let p = format!("model.layers.{layer}.self_attn.indexer");
    let floats = [DType::BF16, DType::F16, DType::F32];
    Ok(IndexerWeights {
        wq_b: ckpt.linear(&format!("{p}.wq_b"), ix.n_heads * ix.head_dim, q_lora)?,
        wk: ckpt.linear(&format!("{p}.wk"), ix.head_dim, cfg.hidden_size)?,
        k_norm_weight: ckpt.get_checked(&format!("{p}.k_norm.weight"), &floats, &[ix.head_dim])?,
        k_norm_bias: ckpt.get_checked(&format!("{p}.k_norm.bias"), &floats, &[ix.head_dim])?,
        weights_proj: ckpt.linear(&format!("{p}.weights_proj"), ix.n_heads, cfg.hidden_size)?,
    })
}
