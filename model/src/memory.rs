//! Memory estimates made before anything is allocated, so that a prompt or
//! a checkpoint that cannot fit fails with a clear message instead of an
//! out-of-memory kill.

use crate::config::ModelConfig;
use crate::forward::{Numerics, CACHE_BLOCK};
use std::fmt;

/// Bytes a forward pass will hold, by part (upper estimates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights of this rank after loading (in the mode's dtypes).
    pub weights: u64,
    /// The paged latent cache of every layer for the whole sequence
    /// (DeepSeek-V3.2: plus each layer's index-k cache).
    pub cache: u64,
    /// Activations of one chunk (the largest step), including the MoE
    /// dispatch buffers and attention scores.
    pub activations: u64,
    /// Logits kept on the host (`[T, vocab]` f32, or one row).
    pub logits: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.cache)
            .saturating_add(self.activations)
            .saturating_add(self.logits)
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "about {} (weights {}, latent cache {}, activations of one chunk {}, logits {})",
            gib(self.total()),
            gib(self.weights),
            gib(self.cache),
            gib(self.activations),
            gib(self.logits)
        )
    }
}

/// Estimates what a prompt of `tokens` tokens processed in chunks of
/// `chunk` needs on one of `world` expert-parallel ranks. Saturating
/// arithmetic: absurd inputs give huge numbers, never an overflow.
pub fn estimate(
    cfg: &ModelConfig,
    numerics: Numerics,
    world: usize,
    tokens: usize,
    chunk: usize,
    all_logits: bool,
) -> MemoryEstimate {
    let u = |x: usize| x as u64;
    let act = u(numerics.act_dtype().size());
    // FP8 linears stay one byte per weight (plus scales) in fp8 mode.
    let lin = if numerics == Numerics::Fp8 { 1 } else { act };
    let (h, heads) = (u(cfg.hidden_size), u(cfg.num_attention_heads));
    let (dn, dr, dv, dc) = (
        u(cfg.qk_nope_head_dim),
        u(cfg.qk_rope_head_dim),
        u(cfg.v_head_dim),
        u(cfg.kv_lora_rank),
    );
    let v = u(cfg.vocab_size);
    let e_local = u(cfg.n_routed_experts / world.max(1));
    let mi = u(cfg.moe_intermediate_size);
    let mut weights = 2u64.saturating_mul(v).saturating_mul(h).saturating_mul(act);
    for i in 0..cfg.num_hidden_layers {
        let q = match cfg.q_lora_rank {
            Some(r) => u(r) * h + u(r) * heads * (dn + dr),
            None => h * heads * (dn + dr),
        };
        let attn_lin = q + h * (dc + dr) + heads * dv * h;
        // kv_b dequantized, plus its per-head W_UK^T / W_UV copies.
        let kvb = 2 * dc * heads * (dn + dv) * act;
        let ffn = if cfg.is_moe_layer(i) {
            3 * h * mi * (e_local + u(cfg.n_shared_experts)) * lin
                + u(cfg.n_routed_experts) * h * act
        } else {
            3 * h * u(cfg.intermediate_size) * lin
        };
        // DeepSeek-V3.2's indexer: wq_b, wk, weights_proj and the three
        // d×d helper matrices (centering, Hadamard, its scale).
        let indexer = cfg.indexer.as_ref().map_or(0, |ix| {
            let (n, d) = (u(ix.n_heads), u(ix.head_dim));
            let q_lora = u(cfg.q_lora_rank.unwrap_or(0));
            (n * d * q_lora + d * h) * lin + n * h * act + 3 * d * d * 4
        });
        weights = weights.saturating_add(attn_lin * lin + kvb + ffn + indexer);
    }
    let blocks = u(tokens.div_ceil(CACHE_BLOCK).max(1));
    // DeepSeek-V3.2 keeps an index-k cache [blocks·64, d] per layer next
    // to the latent one (model/src/v32_forward.rs).
    let index_d = cfg.indexer.as_ref().map_or(0, |ix| u(ix.head_dim));
    let cache = blocks
        .saturating_mul(u(CACHE_BLOCK))
        .saturating_mul(dc + dr + index_d)
        .saturating_mul(act)
        .saturating_mul(u(cfg.num_hidden_layers));
    let c = u(chunk.min(tokens).max(1));
    let topk = u(cfg.num_experts_per_tok);
    let cap = c.saturating_mul(u(world.max(1)));
    // Per step: hidden states and projections, per-head q/latent/out,
    // the MoE dispatch buffer and its grouped-GEMM copies (rows padded to
    // 128 per expert), attention scores against the cache, the chunk's logits.
    let per_token = h * 12 + heads * (dn + dr + 2 * (dc + dr) + dv) + topk * (h + 3 * mi) + v;
    let dispatch = e_local
        .saturating_mul(cap)
        .saturating_mul(h)
        .saturating_mul(3);
    let padded = c.saturating_mul(topk).saturating_add(e_local * 128);
    let grouped = padded.saturating_mul(h + 3 * mi);
    let scores = c
        .saturating_mul(heads)
        .saturating_mul(u(tokens))
        .saturating_mul(4);
    // V3.2's indexer per step: its queries [c, n, d] (f32 and FP8), the
    // scores [c, tokens] f32 and, in fp8, the FP8 form of the index-k cache
    // (d + 4 bytes per cached position) rebuilt each step.
    let indexer = cfg.indexer.as_ref().map_or(0, |ix| {
        let (n, d) = (u(ix.n_heads), u(ix.head_dim));
        c.saturating_mul(n * d * 5)
            .saturating_add(c.saturating_mul(u(tokens)).saturating_mul(4))
            .saturating_add(blocks.saturating_mul(u(CACHE_BLOCK)).saturating_mul(d + 4))
    });
    let activations = c
        .saturating_mul(per_token)
        .saturating_add(dispatch)
        .saturating_add(grouped)
        .saturating_mul(act.max(4))
        .saturating_add(scores)
        .saturating_add(indexer);
    let logits = if all_logits {
        u(tokens).saturating_mul(v).saturating_mul(4)
    } else {
        v * 4
    };
    MemoryEstimate {
        weights,
        cache,
        activations,
        logits,
    }
}
