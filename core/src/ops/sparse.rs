//! DeepSeek-V3.2 sparse attention (docs/spec-v32.md): the lightning
//! indexer's logits over a paged FP8 key cache (DeepGEMM
//! `fp8_paged_mqa_logits`), its top-k selection, MLA decode over selected
//! tokens of an FP8 latent cache (FlashMLA sparse decode, 656-byte layout,
//! attention sink), sparse MLA prefill over a plain latent KV (FlashMLA
//! sparse prefill) and the writer that quantizes keys into either cache.

use super::decl::*;
use super::*;

const F32_ONLY: &[DType] = &[DType::F32];
const I32_ONLY: &[DType] = &[DType::I32];
const BYTES: &[DType] = &[DType::U8];

/// Latent channels of the V3.2 cache (e4m3, four scales).
pub const V32_NOPE: usize = 512;
/// Rope channels of the V3.2 cache (bf16).
pub const V32_ROPE: usize = 64;
/// Q/K head dim of sparse MLA (512 + 64).
pub const V32_D: usize = V32_NOPE + V32_ROPE;
/// Bytes per token of FlashMLA's V3.2 FP8 latent cache: 512 e4m3 ‖ 4 f32
/// scales (one per 128 channels) ‖ 64 bf16 rope values.
pub const V32_TOKEN_BYTES: usize = V32_NOPE + 4 * (V32_NOPE / QBLOCK) + 2 * V32_ROPE;
/// `amax` floor of the cache writers.
pub const CACHE_AMAX_FLOOR: f32 = 1e-4;

/// The lightning indexer's logits over a paged FP8 key cache (DeepGEMM
/// `fp8_paged_mqa_logits`, docs/spec-v32.md §9.1).
///
/// * `q [b, next_n, h, d]` e4m3, `weights [b·next_n, h]` f32;
/// * `kv_cache [num_blocks, block_size, d + 4]` u8: per block,
///   `block_size·d` e4m3 key bytes (token-major), then `block_size` f32
///   scales (the index-k cache; 132 bytes per token for d = 128);
/// * `context_lens [b]`, `block_table [b, max_blocks]` i32;
/// * `logits [b·next_n, max_len]` f32: row `(i, j)` sits at position
///   `p = context_lens[i] − next_n + j` and
///   `logits[(i,j), t] = Σ_h relu(q[i,j,h]·k[t]) · s[t] · w[(i,j), h]`
///   for `t ≤ p` (and `t < context_lens[i]`), `−inf` elsewhere.
#[derive(Debug)]
pub struct IndexerLogits<'a> {
    pub q: &'a Tensor,
    pub weights: &'a Tensor,
    pub kv_cache: &'a Tensor,
    pub context_lens: &'a Tensor,
    pub block_table: &'a Tensor,
    pub logits: &'a mut Tensor,
}

#[derive(Clone, Debug)]
pub struct IndexerLogitsDims {
    pub batch: usize,
    pub next_n: usize,
    pub heads: usize,
    pub d: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_blocks: usize,
    pub max_len: usize,
}

impl OpArgs for IndexerLogits<'_> {
    type Dims = IndexerLogitsDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::IndexerLogits,
        summary: "V3.2 lightning-indexer logits over a paged FP8 key cache (DeepGEMM fp8_paged_mqa_logits, spec-v32 §9.1)",
        tensors: &[
            input("q", &[DType::F8E4M3], "[b, next_n, h, d] e4m3 indexer queries"),
            input(
                "weights",
                F32_ONLY,
                "[b·next_n, h] f32 per-head weights (q scale and softmax scale folded in)",
            ),
            input(
                "kv_cache",
                BYTES,
                "[num_blocks, block_size, d + 4] u8: per block block_size·d e4m3 bytes, then block_size f32 scales",
            ),
            input("context_lens", I32_ONLY, "[b] i32 tokens per sequence"),
            input("block_table", I32_ONLY, "[b, max_blocks] i32 cache blocks of each sequence"),
            output(
                "logits",
                F32_ONLY,
                "[b·next_n, max_len] f32, −inf outside each query's causal window",
            ),
        ],
        params: &[param(
            "max_len",
            ParamKind::Int,
            "0",
            "columns of logits; 0 = the longest context (max_blocks·block_size)",
        )],
    };
    fn validate(&self) -> Result<IndexerLogitsDims> {
        const OP: &str = "indexer_logits";
        let qs = expect_rank(OP, "q", self.q, 4, "[b, next_n, h, d]")?;
        let (b, next_n, h, d) = (qs[0], qs[1], qs[2], qs[3]);
        ensure(next_n > 0 && h > 0 && d > 0, OP, "q", || {
            format!("next_n, h and d must be > 0, got {qs:?}")
        })?;
        expect_shape(
            OP,
            "weights",
            self.weights,
            &[b * next_n, h],
            "[b·next_n, h]",
        )?;
        let ks = expect_rank(
            OP,
            "kv_cache",
            self.kv_cache,
            3,
            "[num_blocks, block_size, d + 4]",
        )?;
        let (num_blocks, block_size) = (ks[0], ks[1]);
        expect_shape(
            OP,
            "kv_cache",
            self.kv_cache,
            &[num_blocks, block_size, d + 4],
            "[num_blocks, block_size, d + 4] (d from q)",
        )?;
        ensure(block_size > 0, OP, "kv_cache", || {
            "block_size must be > 0".into()
        })?;
        expect_shape(OP, "context_lens", self.context_lens, &[b], "[b]")?;
        let bt = expect_rank(OP, "block_table", self.block_table, 2, "[b, max_blocks]")?;
        let max_blocks = bt[1];
        expect_shape(
            OP,
            "block_table",
            self.block_table,
            &[b, max_blocks],
            "[b, max_blocks]",
        )?;
        let ls = expect_rank(OP, "logits", self.logits, 2, "[b·next_n, max_len]")?;
        let max_len = ls[1];
        expect_shape(
            OP,
            "logits",
            self.logits,
            &[b * next_n, max_len],
            "[b·next_n, max_len]",
        )?;
        Ok(IndexerLogitsDims {
            batch: b,
            next_n,
            heads: h,
            d,
            num_blocks,
            block_size,
            max_blocks,
            max_len,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", self.q),
            ("weights", self.weights),
            ("kv_cache", self.kv_cache),
            ("context_lens", self.context_lens),
            ("block_table", self.block_table),
            ("logits", &*self.logits),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("logits", &mut *self.logits)]
    }
}

/// Top-k selection of the indexer (docs/spec-v32.md §9.2): for each row
/// `r` of `logits [rows, n]`, the positions `t < lengths[r]` of the
/// `k = min(topk, lengths[r])` largest logits, by descending value, ties
/// to the lower position (NaN ranks below −inf); `indices [rows, topk]`
/// i32 holds them in its first `k` slots and `−1` after.
#[derive(Debug)]
pub struct IndexerTopk<'a> {
    pub logits: &'a Tensor,
    pub lengths: &'a Tensor,
    pub indices: &'a mut Tensor,
}

#[derive(Clone, Debug)]
pub struct IndexerTopkDims {
    pub rows: usize,
    pub n: usize,
    pub topk: usize,
}

impl OpArgs for IndexerTopk<'_> {
    type Dims = IndexerTopkDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::IndexerTopk,
        summary: "V3.2 indexer top-k: the min(topk, length) best positions of each row, −1 after (spec-v32 §9.2)",
        tensors: &[
            input("logits", F32_ONLY, "[rows, n] f32 indexer logits"),
            input(
                "lengths",
                I32_ONLY,
                "[rows] i32 visible positions of each row: [0, length), length ≤ n",
            ),
            output(
                "indices",
                I32_ONLY,
                "[rows, topk] i32 positions by descending logit (ties: lower first), −1 past min(topk, length)",
            ),
        ],
        params: &[param(
            "topk",
            ParamKind::Int,
            "2048",
            "slots per row (DeepSeek-V3.2: index_topk = 2048)",
        )],
    };
    fn validate(&self) -> Result<IndexerTopkDims> {
        const OP: &str = "indexer_topk";
        let ls = expect_rank(OP, "logits", self.logits, 2, "[rows, n]")?;
        let (rows, n) = (ls[0], ls[1]);
        expect_shape(OP, "lengths", self.lengths, &[rows], "[rows]")?;
        let is = expect_rank(OP, "indices", self.indices, 2, "[rows, topk]")?;
        let topk = is[1];
        expect_shape(OP, "indices", self.indices, &[rows, topk], "[rows, topk]")?;
        ensure(topk > 0, OP, "topk", || "must be > 0".into())?;
        Ok(IndexerTopkDims { rows, n, topk })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("logits", self.logits),
            ("lengths", self.lengths),
            ("indices", &*self.indices),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("indices", &mut *self.indices)]
    }
}

/// MLA decode over selected tokens of FlashMLA's V3.2 FP8 latent cache
/// (docs/spec-v32.md §9.3).
///
/// * `q [b, s_q, h_q, 576]`;
/// * `kcache [num_blocks, block_size, 656]` u8, one latent head: 512 e4m3
///   ‖ 4 f32 scales ‖ 64 bf16; `K[c] = e4m3(byte c) · scale[c / 128]`
///   (exact) for `c < 512`, the bf16 rope values after; V = `K[..512]`;
/// * `indices [b, s_q, topk]` i32: flattened cache slots
///   `block·block_size + offset`; `−1` is an invalid slot (skipped), any
///   other value outside `[0, num_blocks·block_size)` is an error;
/// * `topk_length [b]` i32 (optional): slots at or past it are invalid;
/// * `attn_sink [h_q]` f32 (optional): `out *= 1 / (1 + exp(sink − lse))`;
/// * `out [b, s_q, h_q, 512]`, `lse [b, h_q, s_q]` f32 (natural log, no
///   sink); a row with no valid slot gives `out = 0`, `lse = +inf`.
#[derive(Debug)]
pub struct SparseMlaDecode<'a> {
    pub q: &'a Tensor,
    pub kcache: &'a Tensor,
    pub indices: &'a Tensor,
    pub topk_length: Option<&'a Tensor>,
    pub attn_sink: Option<&'a Tensor>,
    pub out: &'a mut Tensor,
    pub lse: &'a mut Tensor,
    pub softmax_scale: f32,
}

#[derive(Clone, Debug)]
pub struct SparseMlaDecodeDims {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub topk: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl OpArgs for SparseMlaDecode<'_> {
    type Dims = SparseMlaDecodeDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::SparseMlaDecode,
        summary: "MLA decode over selected tokens of the V3.2 FP8 latent cache, attention sink (FlashMLA sparse decode, spec-v32 §9.3)",
        tensors: &[
            input("q", ACT_DTYPES, "[b, s_q, h_q, 576] bf16/f32/f16"),
            input(
                "kcache",
                BYTES,
                "[num_blocks, block_size, 656] u8: 512 e4m3 ‖ 4 f32 scales ‖ 64 bf16 rope per token",
            ),
            input(
                "indices",
                I32_ONLY,
                "[b, s_q, topk] i32 cache slots block·block_size + offset, −1 = invalid",
            ),
            optional_input(
                "topk_length",
                I32_ONLY,
                "[b] i32 valid slots per sequence (in [0, topk]), optional",
            ),
            optional_input("attn_sink", F32_ONLY, "[h_q] f32 attention sink logits, optional"),
            output(
                "out",
                ACT_DTYPES,
                "[b, s_q, h_q, 512], bf16 when q is bf16, else f32",
            ),
            output(
                "lse",
                F32_ONLY,
                "[b, h_q, s_q] f32, natural log without the sink; +inf for rows with no valid slot",
            ),
        ],
        params: &[computed(
            "softmax_scale",
            ParamKind::Float,
            "576^-0.5",
            "scale of q·kᵀ",
        )],
    };
    fn validate(&self) -> Result<SparseMlaDecodeDims> {
        const OP: &str = "sparse_mla_decode";
        let qs = expect_rank(OP, "q", self.q, 4, "[b, s_q, h_q, 576]")?;
        let (b, s_q, h_q) = (qs[0], qs[1], qs[2]);
        expect_shape(OP, "q", self.q, &[b, s_q, h_q, V32_D], "[b, s_q, h_q, 576]")?;
        let ks = expect_rank(
            OP,
            "kcache",
            self.kcache,
            3,
            "[num_blocks, block_size, 656]",
        )?;
        let (num_blocks, block_size) = (ks[0], ks[1]);
        expect_shape(
            OP,
            "kcache",
            self.kcache,
            &[num_blocks, block_size, V32_TOKEN_BYTES],
            "[num_blocks, block_size, 656]",
        )?;
        ensure(block_size > 0, OP, "kcache", || {
            "block_size must be > 0".into()
        })?;
        let is = expect_rank(OP, "indices", self.indices, 3, "[b, s_q, topk]")?;
        let topk = is[2];
        expect_shape(
            OP,
            "indices",
            self.indices,
            &[b, s_q, topk],
            "[b, s_q, topk]",
        )?;
        if let Some(t) = self.topk_length {
            expect_shape(OP, "topk_length", t, &[b], "[b]")?;
        }
        if let Some(t) = self.attn_sink {
            expect_shape(OP, "attn_sink", t, &[h_q], "[h_q]")?;
        }
        expect_shape(
            OP,
            "out",
            self.out,
            &[b, s_q, h_q, V32_NOPE],
            "[b, s_q, h_q, 512]",
        )?;
        expect_shape(OP, "lse", self.lse, &[b, h_q, s_q], "[b, h_q, s_q]")?;
        ensure(
            self.softmax_scale.is_finite() && self.softmax_scale > 0.0,
            OP,
            "softmax_scale",
            || format!("must be finite and > 0, got {}", self.softmax_scale),
        )?;
        Ok(SparseMlaDecodeDims {
            batch: b,
            s_q,
            h_q,
            topk,
            num_blocks,
            block_size,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![
            ("q", self.q),
            ("kcache", self.kcache),
            ("indices", self.indices),
        ];
        if let Some(t) = self.topk_length {
            v.push(("topk_length", t));
        }
        if let Some(t) = self.attn_sink {
            v.push(("attn_sink", t));
        }
        v.extend([("out", &*self.out), ("lse", &*self.lse)]);
        v
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out), ("lse", &mut *self.lse)]
    }
}

/// Sparse MLA prefill over a plain latent KV (FlashMLA
/// `flash_mla_sparse_fwd`, docs/spec-v32.md §9.7).
///
/// * `q [s_q, h_q, d_qk]`, `kv [s_kv, 1, d_qk]` (q's dtype), `d_qk` 576
///   (V3.2: 512 latent ‖ 64 rope) or 512; V = `kv[.., ..512]`;
/// * `indices [s_q, 1, topk]` i32: a value outside `[0, s_kv)` (−1, or
///   ≥ s_kv) is an invalid slot, skipped — never an error;
/// * `topk_length [s_q]` i32 (optional): slots at or past it are invalid;
/// * `attn_sink [h_q]` f32 (optional): `out *= 1 / (1 + exp(sink − lse))`;
/// * `out [s_q, h_q, 512]`, `max_logits [s_q, h_q]`, `lse [s_q, h_q]` f32
///   (natural log, no sink); a row with no valid slot gives `out = 0`,
///   `max_logits = −inf`, `lse = +inf`.
#[derive(Debug)]
pub struct SparseMlaPrefill<'a> {
    pub q: &'a Tensor,
    pub kv: &'a Tensor,
    pub indices: &'a Tensor,
    pub topk_length: Option<&'a Tensor>,
    pub attn_sink: Option<&'a Tensor>,
    pub out: &'a mut Tensor,
    pub max_logits: &'a mut Tensor,
    pub lse: &'a mut Tensor,
    pub softmax_scale: f32,
}

#[derive(Clone, Debug)]
pub struct SparseMlaPrefillDims {
    pub s_q: usize,
    pub s_kv: usize,
    pub h_q: usize,
    pub d_qk: usize,
    pub topk: usize,
}

impl OpArgs for SparseMlaPrefill<'_> {
    type Dims = SparseMlaPrefillDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::SparseMlaPrefill,
        summary: "MLA prefill over selected tokens of a plain latent KV, attention sink (FlashMLA flash_mla_sparse_fwd, spec-v32 §9.7)",
        tensors: &[
            input("q", ACT_DTYPES, "[s_q, h_q, d_qk] bf16/f32/f16, d_qk = 576 (V3.2) or 512"),
            input(
                "kv",
                ACT_DTYPES,
                "[s_kv, 1, d_qk] in q's dtype: latent ‖ rope key per token; V = the first 512 channels",
            ),
            input(
                "indices",
                I32_ONLY,
                "[s_q, 1, topk] i32 token indices; outside [0, s_kv) (−1, ≥ s_kv) = invalid",
            ),
            optional_input(
                "topk_length",
                I32_ONLY,
                "[s_q] i32 valid slots per query (in [0, topk]), optional",
            ),
            optional_input("attn_sink", F32_ONLY, "[h_q] f32 attention sink logits, optional"),
            output(
                "out",
                ACT_DTYPES,
                "[s_q, h_q, 512], bf16 when q is bf16, else f32",
            ),
            output(
                "max_logits",
                F32_ONLY,
                "[s_q, h_q] f32 largest scaled logit; −inf for rows with no valid index",
            ),
            output(
                "lse",
                F32_ONLY,
                "[s_q, h_q] f32, natural log without the sink; +inf for rows with no valid index",
            ),
        ],
        params: &[computed(
            "softmax_scale",
            ParamKind::Float,
            "d_qk^-0.5",
            "scale of q·kᵀ",
        )],
    };
    fn validate(&self) -> Result<SparseMlaPrefillDims> {
        const OP: &str = "sparse_mla_prefill";
        let qs = expect_rank(OP, "q", self.q, 3, "[s_q, h_q, d_qk]")?;
        let (s_q, h_q, d_qk) = (qs[0], qs[1], qs[2]);
        ensure(d_qk == V32_D || d_qk == V32_NOPE, OP, "q", || {
            format!("d_qk must be {V32_D} or {V32_NOPE} (FlashMLA), got {d_qk}")
        })?;
        ensure(h_q > 0, OP, "q", || "h_q must be > 0".into())?;
        let ks = expect_rank(OP, "kv", self.kv, 3, "[s_kv, 1, d_qk]")?;
        let s_kv = ks[0];
        expect_shape(
            OP,
            "kv",
            self.kv,
            &[s_kv, 1, d_qk],
            "[s_kv, 1, d_qk] (h_kv = 1, d_qk from q)",
        )?;
        ensure(self.kv.dtype() == self.q.dtype(), OP, "kv", || {
            format!(
                "must have q's dtype {}, got {}",
                self.q.dtype(),
                self.kv.dtype()
            )
        })?;
        let is = expect_rank(OP, "indices", self.indices, 3, "[s_q, 1, topk]")?;
        let topk = is[2];
        expect_shape(
            OP,
            "indices",
            self.indices,
            &[s_q, 1, topk],
            "[s_q, 1, topk]",
        )?;
        if let Some(t) = self.topk_length {
            expect_shape(OP, "topk_length", t, &[s_q], "[s_q]")?;
        }
        if let Some(t) = self.attn_sink {
            expect_shape(OP, "attn_sink", t, &[h_q], "[h_q]")?;
        }
        expect_shape(
            OP,
            "out",
            self.out,
            &[s_q, h_q, V32_NOPE],
            "[s_q, h_q, 512]",
        )?;
        let want = if self.q.dtype() == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        ensure(self.out.dtype() == want, OP, "out", || {
            format!(
                "must be {want} for q in {}, got {}",
                self.q.dtype(),
                self.out.dtype()
            )
        })?;
        expect_shape(OP, "max_logits", self.max_logits, &[s_q, h_q], "[s_q, h_q]")?;
        expect_shape(OP, "lse", self.lse, &[s_q, h_q], "[s_q, h_q]")?;
        ensure(
            self.softmax_scale.is_finite() && self.softmax_scale > 0.0,
            OP,
            "softmax_scale",
            || format!("must be finite and > 0, got {}", self.softmax_scale),
        )?;
        Ok(SparseMlaPrefillDims {
            s_q,
            s_kv,
            h_q,
            d_qk,
            topk,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("q", self.q), ("kv", self.kv), ("indices", self.indices)];
        if let Some(t) = self.topk_length {
            v.push(("topk_length", t));
        }
        if let Some(t) = self.attn_sink {
            v.push(("attn_sink", t));
        }
        v.extend([
            ("out", &*self.out),
            ("max_logits", &*self.max_logits),
            ("lse", &*self.lse),
        ]);
        v
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![
            ("out", &mut *self.out),
            ("max_logits", &mut *self.max_logits),
            ("lse", &mut *self.lse),
        ]
    }
}

/// The byte layout a [`CacheQuant`] writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheLayout {
    /// DeepGEMM's paged index-k cache: per block, `block_size·d` e4m3
    /// bytes (token-major), then `block_size` f32 scales (one per token);
    /// `q = e4m3(x · (1/s))`.
    #[default]
    Index,
    /// FlashMLA's V3.2 latent cache, per token: 512 e4m3 ‖ 4 f32 scales ‖
    /// 64 bf16 (656 bytes); `q = e4m3(x / s)`.
    Latent,
}

impl CacheLayout {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "index" => Some(Self::Index),
            "latent" => Some(Self::Latent),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Index => "index",
            Self::Latent => "latent",
        }
    }
    /// Bytes per token for keys of `d` channels.
    pub fn token_bytes(self, d: usize) -> usize {
        match self {
            Self::Index => d + 4,
            Self::Latent => V32_TOKEN_BYTES,
        }
    }
}

/// Quantizes keys into one of the V3.2 FP8 caches (docs/spec-v32.md
/// §9.4): `x [num_blocks, block_size, d]` f32/bf16/f16 →
/// `cache [num_blocks, block_size, bytes]` u8.
///
/// One scale per group of values (the whole token for `index`, each 128
/// latent channels for `latent`), [`cache_scale`]; the rope channels of
/// `latent` (512..576) are stored as bf16.
#[derive(Debug)]
pub struct CacheQuant<'a> {
    pub x: &'a Tensor,
    pub cache: &'a mut Tensor,
    pub layout: CacheLayout,
    pub ue8m0: bool,
}

#[derive(Clone, Debug)]
pub struct CacheQuantDims {
    pub num_blocks: usize,
    pub block_size: usize,
    pub d: usize,
    pub token_bytes: usize,
}

impl OpArgs for CacheQuant<'_> {
    type Dims = CacheQuantDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::CacheQuant,
        summary: "quantize keys into a V3.2 FP8 cache: the 132-byte index-k or the 656-byte latent layout (spec-v32 §9.4)",
        tensors: &[
            input(
                "x",
                ACT_DTYPES,
                "[num_blocks, block_size, d] keys (index: any d; latent: d = 576)",
            ),
            output(
                "cache",
                BYTES,
                "[num_blocks, block_size, d + 4] (index) or [num_blocks, block_size, 656] (latent) u8",
            ),
        ],
        params: &[
            param(
                "layout",
                ParamKind::Choice(&["index", "latent"]),
                "index",
                "index: DeepGEMM's paged index-k cache; latent: FlashMLA's V3.2 FP8 latent cache",
            ),
            param(
                "ue8m0",
                ParamKind::Bool,
                "false",
                "round each scale up to a power of two (FlashMLA's latent cache and V3.2's scale_fmt do)",
            ),
        ],
    };
    fn validate(&self) -> Result<CacheQuantDims> {
        const OP: &str = "cache_quant";
        let xs = expect_rank(OP, "x", self.x, 3, "[num_blocks, block_size, d]")?;
        let (nb, bs, d) = (xs[0], xs[1], xs[2]);
        match self.layout {
            CacheLayout::Index => ensure(d > 0, OP, "x", || "d must be > 0".into())?,
            CacheLayout::Latent => ensure(d == V32_D, OP, "x", || {
                format!("the latent layout holds d = {V32_D} channels, got {d}")
            })?,
        }
        let token_bytes = self.layout.token_bytes(d);
        expect_shape(
            OP,
            "cache",
            self.cache,
            &[nb, bs, token_bytes],
            "[num_blocks, block_size, bytes per token]",
        )?;
        Ok(CacheQuantDims {
            num_blocks: nb,
            block_size: bs,
            d,
            token_bytes,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("x", self.x), ("cache", &*self.cache)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("cache", &mut *self.cache)]
    }
}

/// The scale of one quantization group of a cache writer (every backend
/// uses this rule; it is the semantics, not an implementation), in f32:
///
/// * `index` (DeepGEMM's `kv_cache_cast_to_fp8`): `max(amax, 1e-4) / 448`;
/// * `latent` (FlashMLA's `quantize_k_cache`): `max(amax / 448, 1e-4)`;
///
/// then, with `ue8m0`, rounded up to a power of two (exactly).
pub fn cache_scale(layout: CacheLayout, amax: f32, ue8m0: bool) -> f32 {
    let s = match layout {
        CacheLayout::Index => amax.max(CACHE_AMAX_FLOOR) / 448.0,
        CacheLayout::Latent => (amax / 448.0).max(CACHE_AMAX_FLOOR),
    };
    if ue8m0 {
        crate::formats::ue8m0_round_up(s)
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_scales_follow_each_reference() {
        // index: max(amax, 1e-4) / 448; latent: max(amax / 448, 1e-4).
        assert_eq!(cache_scale(CacheLayout::Index, 0.0, false), 1e-4 / 448.0);
        assert_eq!(cache_scale(CacheLayout::Latent, 0.0, false), 1e-4);
        assert_eq!(cache_scale(CacheLayout::Index, 448.0, false), 1.0);
        let s = cache_scale(CacheLayout::Index, 3.0, false);
        assert_eq!(s, 3.0 / 448.0);
        // UE8M0: rounded up to a power of two, exactly.
        let r = cache_scale(CacheLayout::Index, 3.0, true);
        assert_eq!(r, 2f32.powi(-7));
        assert!(r >= s);
        assert_eq!(cache_scale(CacheLayout::Latent, 0.0, true), 2f32.powi(-13));
        assert_eq!(cache_scale(CacheLayout::Latent, 448.0, true), 1.0);
    }

    #[test]
    fn layouts_parse_and_size() {
        assert_eq!(V32_TOKEN_BYTES, 656);
        assert_eq!(CacheLayout::Index.token_bytes(128), 132);
        assert_eq!(CacheLayout::Latent.token_bytes(576), 656);
        for l in [CacheLayout::Index, CacheLayout::Latent] {
            assert_eq!(CacheLayout::parse(l.name()), Some(l));
        }
        assert_eq!(CacheLayout::parse("other"), None);
        for l in [RopeLayout::Interleaved, RopeLayout::Half] {
            assert_eq!(RopeLayout::parse(l.name()), Some(l));
        }
        assert_eq!(RopeLayout::Half.pair(3, 64), (3, 35));
        assert_eq!(RopeLayout::Interleaved.pair(3, 64), (6, 7));
        assert_eq!(RopeConfig::default().layout, RopeLayout::Interleaved);
    }
}
