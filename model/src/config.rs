//! The DeepSeek-V3 model configuration (`config.json` of a Hugging Face
//! checkpoint).
//!
//! [`ModelConfig::from_json`] reads the file field by field, so that a value
//! of the wrong type or out of range is an error that names the field
//! (`rope_scaling.factor`, `q_lora_rank`, …). Unknown fields are ignored.
//! Fields that Hugging Face's `DeepseekV3Config` gives a default are optional
//! here with the same default; the dimensions of the model are required.
//!
//! Only what the forward pass implements is accepted: sigmoid scoring with
//! the `noaux_tc` top-k method and normalized top-k weights (the V3 gate of
//! SPEC.md §6), SiLU, YaRN or no rope scaling, FP8 e4m3 with 128×128 blocks.
//! Anything else is an error naming the field, never a silent
//! approximation.

use deepport_core::error::{Error, Result};
use deepport_core::ops::{yarn_mscale, RopeConfig, ScaleFmt, Yarn};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The op name used in configuration errors ([`Error::Invalid`]).
const OP: &str = "config";

/// YaRN rope scaling (`rope_scaling` with `type`/`rope_type` = `yarn`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeScaling {
    /// `yarn` (the only type the V3 forward supports).
    pub rope_type: String,
    pub factor: f64,
    /// Default 4096.
    pub original_max_position_embeddings: usize,
    /// Default 32.
    pub beta_fast: f64,
    /// Default 1.
    pub beta_slow: f64,
    /// Default 1 (DeepSeek's modeling code).
    pub mscale: f64,
    /// Default 0 (DeepSeek's modeling code), which makes the softmax-scale
    /// factor exactly 1.
    pub mscale_all_dim: f64,
}

/// `quantization_config` of an FP8 checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantizationConfig {
    /// `fp8`.
    pub quant_method: String,
    /// `e4m3`.
    pub fmt: String,
    /// `dynamic` (activations are quantized per token at run time).
    pub activation_scheme: String,
    /// `[128, 128]`.
    pub weight_block_size: [usize; 2],
    /// `ue8m0` in DeepSeek-V3.1 (power-of-two activation scales); absent
    /// (float scales) in V3.
    pub scale_fmt: Option<String>,
}

/// DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): the
/// `index_*` fields of `config.json`. Each query scores every visible key
/// with `index_n_heads` heads of width `index_head_dim` (the first
/// `qk_rope_head_dim` dims rotated by non-interleaved RoPE, q and k
/// Hadamard-rotated and FP8-quantized), and attention runs over the
/// `index_topk` best keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IndexerConfig {
    /// `index_n_heads` (64 in V3.2-Exp).
    pub n_heads: usize,
    /// `index_head_dim` (128 in V3.2-Exp): a power of two (the Hadamard
    /// rotation) and a multiple of 128 (FP8 quantization per 128 values),
    /// larger than `qk_rope_head_dim`.
    pub head_dim: usize,
    /// `index_topk` (2048 in V3.2-Exp): keys attended per query.
    pub topk: usize,
}

/// A DeepSeek-V3 configuration. See the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// FFN width of the dense layers.
    pub intermediate_size: usize,
    /// FFN width of each routed (and each shared) expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Layers `0..first_k_dense_replace` are dense. Default 0.
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer from `first_k_dense_replace` on is
    /// MoE. Default 1.
    pub moe_layer_freq: usize,
    pub num_attention_heads: usize,
    /// Kept for completeness; MLA shares one latent across all heads.
    /// Default `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Shared experts, fused into one MLP of width
    /// `n_shared_experts · moe_intermediate_size`. `null` → 0.
    pub n_shared_experts: usize,
    /// `null` → a dense model (every layer dense).
    pub n_routed_experts: usize,
    /// Default 1.
    pub n_group: usize,
    /// Default 1.
    pub topk_group: usize,
    pub num_experts_per_tok: usize,
    /// Default 1.
    pub routed_scaling_factor: f64,
    /// `sigmoid`.
    pub scoring_func: String,
    /// `noaux_tc`.
    pub topk_method: String,
    /// Must be true (the gate normalizes its top-k weights).
    pub norm_topk_prob: bool,
    /// `null` for models without query compression (then `q_proj`).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    /// Default 10000.
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Default 4096.
    pub max_position_embeddings: usize,
    /// Default 1e-6.
    pub rms_norm_eps: f64,
    /// `null` for unquantized checkpoints (bf16/f32 linear weights).
    pub quantization_config: Option<QuantizationConfig>,
    /// Default false. When true and `lm_head.weight` is absent, the
    /// embedding table is the output projection.
    pub tie_word_embeddings: bool,
    /// `silu`.
    pub hidden_act: String,
    /// Must be false.
    pub attention_bias: bool,
    /// Multi-token-prediction layers stored after the main layers (layer
    /// `num_hidden_layers` is the first); `Model::load_mtp` loads the
    /// first one. Default 0.
    pub num_nextn_predict_layers: usize,
    /// DeepSeek-V3.2's lightning indexer: all three `index_n_heads`,
    /// `index_head_dim`, `index_topk` given, or none (V3).
    pub indexer: Option<IndexerConfig>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

fn invalid(arg: &'static str, msg: impl Into<String>) -> Error {
    Error::invalid(OP, arg, msg)
}

/// Reads `obj[key]` as a `T`; absent or `null` gives `None`. A value of the
/// wrong type is an error naming `name` (the full field path).
fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    key: &str,
    name: &'static str,
) -> Result<Option<T>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value::<T>(v.clone())
            .map(Some)
            .map_err(|e| invalid(name, format!("{e} (got {v})"))),
    }
}

fn required<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    key: &str,
    name: &'static str,
) -> Result<T> {
    field(obj, key, name)?.ok_or_else(|| invalid(name, "is required but missing (or null)"))
}

fn positive(name: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(invalid(name, "must be > 0, got 0"));
    }
    Ok(())
}

fn finite_positive(name: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(invalid(name, format!("must be finite and > 0, got {v}")));
    }
    Ok(())
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(&v)
    }

    /// Parses and validates a configuration from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Other(format!("config: not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    /// Reads and validates a configuration from a parsed JSON value.
    pub fn from_value(v: &Value) -> Result<Self> {
        let o = v
            .as_object()
            .ok_or_else(|| Error::Other("config: the JSON root must be an object".into()))?;
        let num_attention_heads: usize = required(o, "num_attention_heads", "num_attention_heads")?;
        let n_routed_experts: usize =
            field(o, "n_routed_experts", "n_routed_experts")?.unwrap_or(0);
        let cfg = ModelConfig {
            model_type: field(o, "model_type", "model_type")?,
            vocab_size: required(o, "vocab_size", "vocab_size")?,
            hidden_size: required(o, "hidden_size", "hidden_size")?,
            intermediate_size: required(o, "intermediate_size", "intermediate_size")?,
            moe_intermediate_size: if n_routed_experts > 0 {
                required(o, "moe_intermediate_size", "moe_intermediate_size")?
            } else {
                field(o, "moe_intermediate_size", "moe_intermediate_size")?.unwrap_or(0)
            },
            num_hidden_layers: required(o, "num_hidden_layers", "num_hidden_layers")?,
            first_k_dense_replace: field(o, "first_k_dense_replace", "first_k_dense_replace")?
                .unwrap_or(0),
            moe_layer_freq: field(o, "moe_layer_freq", "moe_layer_freq")?.unwrap_or(1),
            num_attention_heads,
            num_key_value_heads: field(o, "num_key_value_heads", "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            n_shared_experts: field(o, "n_shared_experts", "n_shared_experts")?.unwrap_or(0),
            n_routed_experts,
            n_group: field(o, "n_group", "n_group")?.unwrap_or(1),
            topk_group: field(o, "topk_group", "topk_group")?.unwrap_or(1),
            num_experts_per_tok: if n_routed_experts > 0 {
                required(o, "num_experts_per_tok", "num_experts_per_tok")?
            } else {
                field(o, "num_experts_per_tok", "num_experts_per_tok")?.unwrap_or(0)
            },
            routed_scaling_factor: field(o, "routed_scaling_factor", "routed_scaling_factor")?
                .unwrap_or(1.0),
            scoring_func: field(o, "scoring_func", "scoring_func")?
                .unwrap_or_else(|| "sigmoid".into()),
            topk_method: field(o, "topk_method", "topk_method")?
                .unwrap_or_else(|| "noaux_tc".into()),
            norm_topk_prob: field(o, "norm_topk_prob", "norm_topk_prob")?.unwrap_or(true),
            q_lora_rank: field(o, "q_lora_rank", "q_lora_rank")?,
            kv_lora_rank: required(o, "kv_lora_rank", "kv_lora_rank")?,
            qk_rope_head_dim: required(o, "qk_rope_head_dim", "qk_rope_head_dim")?,
            qk_nope_head_dim: required(o, "qk_nope_head_dim", "qk_nope_head_dim")?,
            v_head_dim: required(o, "v_head_dim", "v_head_dim")?,
            rope_theta: field(o, "rope_theta", "rope_theta")?.unwrap_or(10000.0),
            rope_scaling: Self::rope_scaling(o)?,
            max_position_embeddings: field(
                o,
                "max_position_embeddings",
                "max_position_embeddings",
            )?
            .unwrap_or(4096),
            rms_norm_eps: field(o, "rms_norm_eps", "rms_norm_eps")?.unwrap_or(1e-6),
            quantization_config: Self::quantization(o)?,
            tie_word_embeddings: field(o, "tie_word_embeddings", "tie_word_embeddings")?
                .unwrap_or(false),
            hidden_act: field(o, "hidden_act", "hidden_act")?.unwrap_or_else(|| "silu".into()),
            attention_bias: field(o, "attention_bias", "attention_bias")?.unwrap_or(false),
            num_nextn_predict_layers: field(
                o,
                "num_nextn_predict_layers",
                "num_nextn_predict_layers",
            )?
            .unwrap_or(0),
            indexer: Self::indexer(o)?,
            bos_token_id: field(o, "bos_token_id", "bos_token_id")?,
            eos_token_id: field(o, "eos_token_id", "eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The V3.2 indexer fields: all or none.
    fn indexer(o: &Map<String, Value>) -> Result<Option<IndexerConfig>> {
        let n: Option<usize> = field(o, "index_n_heads", "index_n_heads")?;
        let d: Option<usize> = field(o, "index_head_dim", "index_head_dim")?;
        let k: Option<usize> = field(o, "index_topk", "index_topk")?;
        match (n, d, k) {
            (None, None, None) => Ok(None),
            (Some(n_heads), Some(head_dim), Some(topk)) => Ok(Some(IndexerConfig {
                n_heads,
                head_dim,
                topk,
            })),
            _ => {
                let missing = [
                    ("index_n_heads", n.is_none()),
                    ("index_head_dim", d.is_none()),
                    ("index_topk", k.is_none()),
                ]
                .iter()
                .find(|(_, m)| *m)
                .map_or("index_topk", |(name, _)| *name);
                Err(invalid(
                    missing,
                    "missing: DeepSeek-V3.2's indexer needs index_n_heads, index_head_dim and \
                     index_topk together",
                ))
            }
        }
    }

    fn rope_scaling(o: &Map<String, Value>) -> Result<Option<RopeScaling>> {
        let rs = match o.get("rope_scaling") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(invalid(
                    "rope_scaling",
                    format!("must be an object or null, got {v}"),
                ))
            }
        };
        let ty: Option<String> = field(rs, "type", "rope_scaling.type")?;
        let rty: Option<String> = field(rs, "rope_type", "rope_scaling.rope_type")?;
        let rope_type = match (ty, rty) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(
                    "rope_scaling.rope_type",
                    format!("`{b}` disagrees with rope_scaling.type `{a}`"),
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(invalid(
                    "rope_scaling.type",
                    "missing (neither `type` nor `rope_type` is set)",
                ))
            }
        };
        Ok(Some(RopeScaling {
            rope_type,
            factor: required(rs, "factor", "rope_scaling.factor")?,
            original_max_position_embeddings: field(
                rs,
                "original_max_position_embeddings",
                "rope_scaling.original_max_position_embeddings",
            )?
            .unwrap_or(4096),
            beta_fast: field(rs, "beta_fast", "rope_scaling.beta_fast")?.unwrap_or(32.0),
            beta_slow: field(rs, "beta_slow", "rope_scaling.beta_slow")?.unwrap_or(1.0),
            mscale: field(rs, "mscale", "rope_scaling.mscale")?.unwrap_or(1.0),
            mscale_all_dim: field(rs, "mscale_all_dim", "rope_scaling.mscale_all_dim")?
                .unwrap_or(0.0),
        }))
    }

    fn quantization(o: &Map<String, Value>) -> Result<Option<QuantizationConfig>> {
        let q = match o.get("quantization_config") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(invalid(
                    "quantization_config",
                    format!("must be an object or null, got {v}"),
                ))
            }
        };
        Ok(Some(QuantizationConfig {
            quant_method: required(q, "quant_method", "quantization_config.quant_method")?,
            fmt: field(q, "fmt", "quantization_config.fmt")?.unwrap_or_else(|| "e4m3".into()),
            activation_scheme: field(
                q,
                "activation_scheme",
                "quantization_config.activation_scheme",
            )?
            .unwrap_or_else(|| "dynamic".into()),
            weight_block_size: field(
                q,
                "weight_block_size",
                "quantization_config.weight_block_size",
            )?
            .unwrap_or([128, 128]),
            scale_fmt: field(q, "scale_fmt", "quantization_config.scale_fmt")?,
        }))
    }

    /// Checks every value the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("intermediate_size", self.intermediate_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("num_key_value_heads", self.num_key_value_heads)?;
        positive("moe_layer_freq", self.moe_layer_freq)?;
        positive("kv_lora_rank", self.kv_lora_rank)?;
        positive("qk_rope_head_dim", self.qk_rope_head_dim)?;
        positive("qk_nope_head_dim", self.qk_nope_head_dim)?;
        positive("v_head_dim", self.v_head_dim)?;
        positive("max_position_embeddings", self.max_position_embeddings)?;
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid(
                "qk_rope_head_dim",
                format!(
                    "must be even (rotated pairs), got {}",
                    self.qk_rope_head_dim
                ),
            ));
        }
        if self.q_lora_rank == Some(0) {
            return Err(invalid("q_lora_rank", "must be > 0 or null, got 0"));
        }
        if let Some(ix) = &self.indexer {
            positive("index_n_heads", ix.n_heads)?;
            positive("index_topk", ix.topk)?;
            let d = ix.head_dim;
            if !d.is_power_of_two() || !d.is_multiple_of(128) {
                return Err(invalid(
                    "index_head_dim",
                    format!(
                        "must be a power of two (Hadamard rotation) and a multiple of 128 \
                         (FP8 blocks), got {d}"
                    ),
                ));
            }
            if d <= self.qk_rope_head_dim {
                return Err(invalid(
                    "index_head_dim",
                    format!(
                        "must exceed qk_rope_head_dim = {} (RoPE covers its first dims), got {d}",
                        self.qk_rope_head_dim
                    ),
                ));
            }
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(invalid(
                "first_k_dense_replace",
                format!(
                    "must be ≤ num_hidden_layers = {}, got {}",
                    self.num_hidden_layers, self.first_k_dense_replace
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be finite and ≥ 0, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(invalid(
                "rope_theta",
                format!("must be finite and > 1, got {}", self.rope_theta),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("only `silu` is supported, got `{}`", self.hidden_act),
            ));
        }
        if self.attention_bias {
            return Err(invalid(
                "attention_bias",
                "must be false (DeepSeek-V3 attention has no biases)",
            ));
        }
        if self.n_routed_experts > 0 {
            let e = self.n_routed_experts;
            positive("moe_intermediate_size", self.moe_intermediate_size)?;
            positive("n_group", self.n_group)?;
            if !e.is_multiple_of(self.n_group) || e / self.n_group < 2 {
                return Err(invalid(
                    "n_group",
                    format!(
                        "must divide n_routed_experts = {e} into groups of at least 2, got {}",
                        self.n_group
                    ),
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(invalid(
                    "topk_group",
                    format!(
                        "must be in [1, n_group = {}], got {}",
                        self.n_group, self.topk_group
                    ),
                ));
            }
            let kept = self.topk_group * (e / self.n_group);
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > kept {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!(
                        "must be in [1, {kept}] (experts in the kept groups), got {}",
                        self.num_experts_per_tok
                    ),
                ));
            }
            if !self.routed_scaling_factor.is_finite() {
                return Err(invalid(
                    "routed_scaling_factor",
                    format!("must be finite, got {}", self.routed_scaling_factor),
                ));
            }
            if self.scoring_func != "sigmoid" {
                return Err(invalid(
                    "scoring_func",
                    format!(
                        "only `sigmoid` (DeepSeek-V3) is supported, got `{}`",
                        self.scoring_func
                    ),
                ));
            }
            if self.topk_method != "noaux_tc" {
                return Err(invalid(
                    "topk_method",
                    format!(
                        "only `noaux_tc` (DeepSeek-V3) is supported, got `{}`",
                        self.topk_method
                    ),
                ));
            }
            if !self.norm_topk_prob {
                return Err(invalid(
                    "norm_topk_prob",
                    "must be true (the V3 gate normalizes its top-k weights)",
                ));
            }
        }
        if let Some(r) = &self.rope_scaling {
            if r.rope_type != "yarn" {
                return Err(invalid(
                    "rope_scaling.type",
                    format!("only `yarn` is supported, got `{}`", r.rope_type),
                ));
            }
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return Err(invalid(
                    "rope_scaling.factor",
                    format!("must be finite and ≥ 1, got {}", r.factor),
                ));
            }
            positive(
                "rope_scaling.original_max_position_embeddings",
                r.original_max_position_embeddings,
            )?;
            finite_positive("rope_scaling.beta_fast", r.beta_fast)?;
            finite_positive("rope_scaling.beta_slow", r.beta_slow)?;
            if !r.mscale.is_finite() {
                return Err(invalid(
                    "rope_scaling.mscale",
                    format!("must be finite, got {}", r.mscale),
                ));
            }
            if !r.mscale_all_dim.is_finite() {
                return Err(invalid(
                    "rope_scaling.mscale_all_dim",
                    format!("must be finite, got {}", r.mscale_all_dim),
                ));
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return Err(invalid(
                    "quantization_config.quant_method",
                    format!("only `fp8` is supported, got `{}`", q.quant_method),
                ));
            }
            if q.fmt != "e4m3" {
                return Err(invalid(
                    "quantization_config.fmt",
                    format!("only `e4m3` is supported, got `{}`", q.fmt),
                ));
            }
            if q.activation_scheme != "dynamic" {
                return Err(invalid(
                    "quantization_config.activation_scheme",
                    format!(
                        "only `dynamic` (per-token) is supported, got `{}`",
                        q.activation_scheme
                    ),
                ));
            }
            if q.weight_block_size != [128, 128] {
                return Err(invalid(
                    "quantization_config.weight_block_size",
                    format!(
                        "only [128, 128] is supported, got {:?}",
                        q.weight_block_size
                    ),
                ));
            }
            if let Some(s) = &q.scale_fmt {
                if ScaleFmt::parse(s).is_none() {
                    return Err(invalid(
                        "quantization_config.scale_fmt",
                        format!("must be `ue8m0` or `float`, got `{s}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether layer `i` has a MoE FFN (else a dense SwiGLU).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq)
    }

    /// Query/key head dim: `qk_nope_head_dim + qk_rope_head_dim` (192 for V3).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Channels per cached token: `kv_lora_rank + qk_rope_head_dim` (576).
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The rotary embedding of SPEC.md §8.
    pub fn rope_config(&self) -> RopeConfig {
        RopeConfig {
            layout: Default::default(),
            theta: self.rope_theta as f32,
            yarn: self.rope_scaling.as_ref().map(|r| Yarn {
                factor: r.factor as f32,
                original_max_position_embeddings: r.original_max_position_embeddings,
                beta_fast: r.beta_fast as f32,
                beta_slow: r.beta_slow as f32,
                mscale: r.mscale as f32,
                mscale_all_dim: r.mscale_all_dim as f32,
            }),
        }
    }

    /// The YaRN attention factor `m = 0.1·mscale_all_dim·ln(factor) + 1`
    /// (1 without rope scaling or with factor ≤ 1), in f64.
    pub fn attention_mscale(&self) -> f64 {
        match &self.rope_scaling {
            Some(r) => yarn_mscale(r.factor as f32, r.mscale_all_dim as f32),
            None => 1.0,
        }
    }

    /// `(qk_nope + qk_rope)^-0.5 · m²` (SPEC.md §8), computed in f64 and
    /// rounded once to f32.
    pub fn softmax_scale(&self) -> f32 {
        let m = self.attention_mscale();
        ((self.qk_head_dim() as f64).powf(-0.5) * m * m) as f32
    }

    /// The activation-scale format of the FP8 mode this checkpoint was made
    /// for (`ue8m0` in V3.1, float otherwise).
    pub fn act_scale_fmt(&self) -> ScaleFmt {
        self.quantization_config
            .as_ref()
            .and_then(|q| q.scale_fmt.as_deref())
            .and_then(ScaleFmt::parse)
            .unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    /// Deserializes through [`ModelConfig::from_value`], so serde users get
    /// the same defaults, validation and field-naming errors.
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        ModelConfig::from_value(&v).map_err(serde::de::Error::custom)
    }
}
