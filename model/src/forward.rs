//! The DeepSeek-V3 forward pass (SPEC.md §5, §8) over any [`Backend`].
//!
//! Every computation is an op of [`deepport_core::ops`]; the model only moves
//! handles around. Weights are uploaded once by [`Model::load`]. Host round
//! trips during a forward pass are limited to the per-expert token counts of
//! the MoE dispatch (a few integers per MoE layer) and, when asked for, the
//! taps; the logits come back at the end.
//!
//! # Numerics (SPEC.md §8)
//!
//! * [`Numerics::F32`]: FP8 weights dequantized to f32 with the
//!   `weight_dequant` op, every activation f32.
//! * [`Numerics::Bf16`]: FP8 weights dequantized to bf16, every tensor
//!   between ops bf16 (each op rounds its output once). The MoE top-k
//!   weights are rounded to bf16 before the combine, as DeepSeek's gate
//!   returns them in the activation dtype.
//! * [`Numerics::Fp8`]: as bf16, but every linear with an FP8 weight runs
//!   `act_quant` then `fp8_gemm` with the checkpoint's e4m3 weight and
//!   scales (bf16 output). `kv_b_proj` is used dequantized (bf16) inside the
//!   attention, as DeepSeek does. A linear whose input width is not a
//!   multiple of 128 cannot be quantized per 128-group and uses its
//!   dequantized bf16 weight instead (no DeepSeek-V3 linear is like that).
//!
//! # Attention
//!
//! Prefill ([`PrefillPath::Fused`], the default) runs `mla_prefill` over
//! the contiguous latent `c` and rope key (form naive or absorbed) and
//! writes both into the paged latent cache. Decode writes the new token's
//! `[c ‖ k_pe]` into the cache and runs `mla_decode` with
//! `q = [q_nope·W_UK ‖ q_pe]` per head, then maps the latent output back
//! with `W_UV` per head (weight slices prepared at load time).
//! [`PrefillPath::Paged`] runs a prompt through those decode kernels
//! (causal `mla_decode`, bottom-right aligned). The two prefill paths agree
//! in f32; in bf16/fp8 they differ in where they round: the fused op keeps
//! `q_nope·W_UK` and `Σ p·c` unrounded, the paged path rounds them to the
//! activation dtype between ops, which is where DeepSeek's absorbed
//! attention (and the golden data) round them.
//!
//! DeepSeek-V3.2 layers attend only the keys their lightning indexer
//! picks (`sparse_mla_prefill`; `v32_forward.rs`), in every path, and keep
//! an index-k cache `[num_blocks·64, index_head_dim]` next to the latent
//! cache (grown and written with it) for later steps.
//!
//! Each layer's cache is one device tensor `[num_blocks, 64, 1, 576]`
//! (576 = `kv_lora_rank + qk_rope_head_dim`), written with `copy_window`
//! on its `[num_blocks·64, 576]` matrix view. Pages are handed out in order
//! (block `i` of the sequence is page `i`); the cache grows (doubling, one
//! copy) when a sequence outgrows it.
//!
//! # Views
//!
//! Where a window of a tensor is contiguous in memory, [`Ctx::window`]
//! hands out a read-only view (`Tensor::view`) instead of a `copy_window`
//! into a fresh tensor, when the backend's kernels read offset views in
//! place (probed once at load by `reads_views`: cpu-ref and cpu do; wgpu
//! reads views only in `download`, `gather_rows` and `reduce_rows` and
//! gets copies). The views are:
//!
//! * the per-head `W_UV` slices of `kv_b_proj` (whole rows of the
//!   dequantized weight; no second copy of it is kept);
//! * in one-token decode, the per-head `q_nope` slices fed to `q·W_UK` and
//!   the per-head latent outputs fed to `·W_UVᵀ`, and the latent `c` and
//!   rope key windows of `kv_a_proj`'s output (one row each);
//! * with several ranks, this rank's share of the tokens (whole rows of the
//!   normalized hidden state) fed to the dispatch and the shared experts.
//!
//! The routed experts need no per-expert slices at all (one grouped GEMM
//! over `[G, n, k]`), and the latent cache pages are read in place by
//! `mla_decode` through the block table; the cache is copied only when it
//! grows. Views never change results: a kernel reads the same elements.
//!
//! # MoE
//!
//! Shaped as a serving engine runs it (DeepEP + DeepGEMM), over any
//! [`Communicator`]: `moe_gate` → `low_latency_dispatch` to the ranks that
//! hold the chosen experts → this rank's experts as **grouped GEMMs**
//! (contiguous layout in prefill: received rows gathered per expert, each
//! expert's rows padded to 128, `fp8_grouped_contiguous`; masked layout in
//! one-token decode: the dispatch buffer as is, `masked_m` = received
//! counts, `fp8_grouped_masked` on the FP8 payload of the dispatch) for
//! gate and up, `silu_mul`, the down projection → `low_latency_combine`
//! with the top-k weights → plus the shared experts. f32 and bf16 run the
//! same data flow and layouts with the plain grouped GEMMs
//! `gemm_grouped_contiguous` (prefill) and `gemm_grouped_masked` (decode)
//! on the dequantized expert weights `[G, n, k]`; each computed row is
//! exactly `gemm` of that row against its expert. There is never a loop
//! over experts. With shared experts the combine writes f32 and the
//! add rounds once, so routed + shared is rounded once (SPEC.md §8).
//!
//! With several ranks ([`Model::load_ep`]) rank `r` holds experts
//! `[r·E/R, (r+1)·E/R)`; attention, router and shared experts are
//! replicated. Each rank dispatches its share of the tokens, and the MoE
//! outputs are gathered back on every rank. Every per-token computation is
//! the same as with one rank, so f32 results are bit-identical.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::{Communicator, ThreadComm};
use deepport_core::dtype::DType;
use deepport_core::error::{Error, Result};
use deepport_core::ops::{self, *};
use deepport_core::tensor::HostTensor;
use std::cell::RefCell;
use std::collections::BTreeMap;

#[path = "v32_forward.rs"]
mod v32_forward;
#[doc(hidden)]
pub use v32_forward::IndexFault;

/// Tokens per page of the latent cache (FlashMLA's block size).
pub const CACHE_BLOCK: usize = 64;

/// Default chunk of [`Model::prefill_chunked`] (tokens): large enough for
/// the GEMMs to be efficient, small enough that one chunk's MoE dispatch
/// buffers stay bounded.
pub const DEFAULT_CHUNK: usize = 512;

/// The op name used in the model's own errors.
const OP: &str = "model";

/// Float dtypes accepted for norms, embeddings, router and lm_head weights.
const FLOATS: &[DType] = &[DType::BF16, DType::F16, DType::F32];

/// The numerics mode of a forward pass (SPEC.md §8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// Weights dequantized to f32, every activation f32.
    F32,
    /// Weights dequantized to bf16, every tensor between ops bf16.
    #[default]
    Bf16,
    /// As bf16, with act_quant + FP8 GEMM for every FP8 linear.
    Fp8,
}

impl Numerics {
    pub const ALL: [Numerics; 3] = [Numerics::F32, Numerics::Bf16, Numerics::Fp8];

    /// The dtype of every tensor passed between ops.
    pub fn act_dtype(self) -> DType {
        match self {
            Numerics::F32 => DType::F32,
            Numerics::Bf16 | Numerics::Fp8 => DType::BF16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Numerics::F32 => "f32",
            Numerics::Bf16 => "bf16",
            Numerics::Fp8 => "fp8",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.name() == s)
    }
}

impl std::fmt::Display for Numerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kernels a prefill's attention runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillPath {
    /// `mla_prefill` over the contiguous latent, in the chosen
    /// [`MlaForm`]. The attention is one op: `q_nope·W_UK` and `Σ p·c`
    /// are not rounded on their own.
    #[default]
    Fused,
    /// The decode kernels on the whole prompt: per-head `q_nope·W_UK`
    /// GEMMs, causal `mla_decode` over the paged cache, per-head `W_UV`
    /// GEMMs (always absorbed). `q_lat` and the latent output are tensors
    /// between ops, rounded to the activation dtype, exactly where
    /// DeepSeek's absorbed attention rounds them.
    Paged,
}

impl PrefillPath {
    pub fn name(self) -> &'static str {
        match self {
            PrefillPath::Fused => "fused",
            PrefillPath::Paged => "paged",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [PrefillPath::Fused, PrefillPath::Paged]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// How [`Model::load_with`] prepares a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub numerics: Numerics,
    /// Prefill attention form with [`PrefillPath::Fused`] (decode always
    /// runs absorbed over the cache).
    pub form: MlaForm,
    /// Activation scale format of `act_quant` in FP8 mode.
    pub scale_fmt: ScaleFmt,
    /// Kernels of the prefill attention.
    pub prefill: PrefillPath,
}

/// The MoE routing of one layer: per token, the chosen experts sorted
/// ascending and their weights in the same order.
#[derive(Clone, Debug)]
pub struct Routing {
    /// `[T, k]` i64, each row ascending.
    pub topk_idx: HostTensor,
    /// `[T, k]` f32, in the order of `topk_idx`.
    pub topk_weights: HostTensor,
}

impl Routing {
    /// Sorts each token's (expert, weight) pairs by expert index.
    fn sorted(idx: &HostTensor, w: &HostTensor) -> Result<Routing> {
        let shape = idx.shape().to_vec();
        let k = shape.last().copied().unwrap_or(0);
        let iv = idx.to_i64_vec();
        let wv = w.to_f32_vec();
        let mut oi = Vec::with_capacity(iv.len());
        let mut ow = Vec::with_capacity(wv.len());
        for (ri, rw) in iv.chunks(k.max(1)).zip(wv.chunks(k.max(1))) {
            let mut pairs: Vec<(i64, f32)> = ri.iter().copied().zip(rw.iter().copied()).collect();
            pairs.sort_by_key(|p| p.0);
            oi.extend(pairs.iter().map(|p| p.0));
            ow.extend(pairs.iter().map(|p| p.1));
        }
        Ok(Routing {
            topk_idx: HostTensor::from_i64(&shape, &oi),
            topk_weights: HostTensor::from_f32(DType::F32, &shape, &ow),
        })
    }
}

/// Intermediate tensors of a forward pass, by the golden data's names, in
/// data-flow order per layer: `layers.{i}.input` (hidden entering layer i);
/// inside the attention `layers.{i}.q` (`q_b_proj` output before RoPE,
/// `[T, H·(dn+dr)]`), `layers.{i}.kv_latent` (normalized latent `c`,
/// `[T, kv_lora_rank]`), `layers.{i}.attn_core` (attention output before
/// `o_proj`, `[T, H·dv]`); `layers.{i}.attn_out`; for MoE layers
/// `layers.{i}.gate_logits` (router logits `x·W_gᵀ`, f32 `[T, E]`),
/// `layers.{i}.topk_idx` (i64, ascending per token),
/// `layers.{i}.topk_weights` (f32, same order), `layers.{i}.expert_out`
/// (the chosen experts' outputs before the combine, `[T, k, hidden]` in
/// `topk_idx` order; one rank only) and `layers.{i}.shared_out`;
/// `layers.{i}.ffn_out` (attention and FFN outputs before the residual
/// add); `final_norm_out` and `logits`. Float taps are f32 host tensors
/// holding the mode's values.
#[derive(Clone, Debug, Default)]
pub struct Taps {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Taps {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }
    /// Appends the taps of the next chunk of tokens: every tap is
    /// `[T, …]`, concatenated along tokens.
    pub fn append(&mut self, next: Taps) -> Result<()> {
        for (name, t) in next.tensors {
            let merged = match self.tensors.remove(&name) {
                None => t,
                Some(prev) => {
                    // DeepSeek-V3.2's index_score/index_topk: later chunks
                    // see more keys; the narrower side is padded.
                    let (prev, t) = match (prev.shape(), t.shape()) {
                        ([_, a], [_, b]) if a != b && v32_forward::widens_between_chunks(&name) => {
                            let w = *a.max(b);
                            (
                                v32_forward::pad_columns(&prev, w)?,
                                v32_forward::pad_columns(&t, w)?,
                            )
                        }
                        _ => (prev, t),
                    };
                    if prev.dtype() != t.dtype() || prev.shape().get(1..) != t.shape().get(1..) {
                        return Err(Error::Other(format!(
                            "model: tap {name} changes shape between chunks ({:?} then {:?})",
                            prev.shape(),
                            t.shape()
                        )));
                    }
                    let mut shape = prev.shape().to_vec();
                    shape[0] += t.shape()[0];
                    let mut bytes = prev.into_bytes();
                    bytes.extend_from_slice(t.bytes());
                    HostTensor::from_bytes(t.dtype(), &shape, bytes)?
                }
            };
            self.tensors.insert(name, merged);
        }
        Ok(())
    }

    fn put(&mut self, b: &dyn Backend, name: String, t: &Tensor) -> Result<()> {
        let h = b.download(t)?;
        let h = if h.dtype().is_float() {
            h.to_dtype(DType::F32)
        } else {
            h
        };
        self.tensors.insert(name, h);
        Ok(())
    }
}

/// What [`Model::layer_forward`] returns (f32 host tensors).
#[derive(Clone, Debug)]
pub struct LayerOutput {
    /// `MLA(input_layernorm(input))`, `[T, hidden]`.
    pub attn_out: HostTensor,
    /// `FFN(post_attention_layernorm(input + attn))`, `[T, hidden]`.
    pub ffn_out: HostTensor,
    /// MoE layers only.
    pub routing: Option<Routing>,
    /// The finer taps of this layer, by the names of [`Taps`]
    /// (`layers.{i}.q`, `kv_latent`, `attn_core`, `gate_logits`,
    /// `expert_out`, `shared_out`).
    pub taps: Taps,
}

// ---- weights ----------------------------------------------------------------

/// A linear layer ready to run.
enum Linear {
    /// `[out, in]` in the activation dtype.
    Dense(Tensor),
    /// The checkpoint's e4m3 weight `[out, in]` and f32 block scales.
    Fp8 { w: Tensor, s: Tensor },
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One projection of every expert of this rank, stacked for a grouped
/// GEMM (group `g` = local expert `g`).
enum Grouped {
    /// FP8 mode: the checkpoint's e4m3 weights `[G, n, k]` and f32 block
    /// scales `[G, ⌈n/128⌉, k/128]`, run by `fp8_grouped_contiguous`
    /// (prefill) and `fp8_grouped_masked` (decode).
    Fp8 { w: Tensor, s: Tensor },
    /// f32/bf16 mode: the dequantized weights `[G, n, k]` in the
    /// activation dtype, run by `gemm_grouped_contiguous` (prefill) and
    /// `gemm_grouped_masked` (decode), the same layouts as the FP8 path.
    Dense { w: Tensor },
}

impl Grouped {
    /// Output width `n`.
    fn n(&self) -> usize {
        match self {
            Grouped::Fp8 { w, .. } | Grouped::Dense { w } => w.shape()[1],
        }
    }
}

/// The routed experts of one rank, laid out for grouped GEMMs.
struct Experts {
    /// Local experts (`E / world`); global ids `[first, first + local)`.
    local: usize,
    gate: Grouped,
    up: Grouped,
    down: Grouped,
}

struct Moe {
    /// `[E, hidden]`.
    router: Tensor,
    /// `e_score_correction_bias [E]` f32.
    bias: Tensor,
    experts: Experts,
    shared: Option<Mlp>,
}

// One per layer: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[allow(clippy::large_enum_variant)] // a handful per model; boxing buys nothing
enum QProj {
    /// `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
    Lora { a: Linear, norm: Tensor, b: Linear },
    /// `q_proj` (no query compression).
    Direct(Linear),
}

struct Attention {
    q: QProj,
    kv_a: Linear,
    kv_norm: Tensor,
    /// `kv_b_proj` dequantized, `[H·(dn+dv), dc]`.
    wkv_b: Tensor,
    /// Per head `W_UKᵀ [dc, dn]` (so that `gemm(q_nope, ·)` = `q_nope·W_UK`).
    w_uk_t: Vec<Tensor>,
    /// Per head `W_UV [dv, dc]` (so that `gemm(o_lat, ·)` = `o_lat·W_UVᵀ`).
    w_uv: Vec<Tensor>,
    o_proj: Linear,
    /// DeepSeek-V3.2's lightning indexer (`v32_forward.rs`); `None` for V3.
    indexer: Option<v32_forward::Indexer>,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    ffn: Ffn,
}

/// DeepSeek-V3's multi-token-prediction module (layer `num_hidden_layers`
/// of the checkpoint): `enorm`, `hnorm`, `eh_proj`, one decoder layer (run
/// by the same code as every other layer), `shared_head`.
struct Mtp {
    /// The layer index in the checkpoint (`num_hidden_layers`).
    index: usize,
    enorm: Tensor,
    hnorm: Tensor,
    /// `[hidden, 2·hidden]`, applied to `[enorm(emb) ‖ hnorm(h)]`.
    eh_proj: Linear,
    layer: Layer,
    /// `shared_head.norm`.
    norm: Tensor,
    /// `shared_head.head` (the main `lm_head` when the checkpoint has none).
    head: Tensor,
}

/// What [`Model::mtp_forward`] produced.
#[derive(Debug)]
pub struct MtpOutput {
    /// `[T, vocab]` f32: at row `t`, the logits of token `t + 2`.
    pub logits: HostTensor,
    /// `mtp.embed_norm`, `mtp.hidden_norm`, `layers.{L}.input` (the
    /// `eh_proj` output), the decoder layer's taps under `layers.{L}.*`,
    /// `mtp.norm_out` and `mtp.logits`.
    pub taps: Taps,
}

// ---- execution context ----------------------------------------------------------

/// Model dimensions and op parameters, copied out of the config.
#[derive(Clone, Copy, Debug)]
struct Dims {
    hidden: usize,
    heads: usize,
    dn: usize,
    dr: usize,
    dv: usize,
    dc: usize,
    experts: usize,
    topk: usize,
    n_group: usize,
    topk_group: usize,
    route_scale: f32,
    eps: f32,
    softmax_scale: f32,
    rope: RopeConfig,
}

impl Dims {
    fn of(cfg: &ModelConfig) -> Dims {
        Dims {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            dn: cfg.qk_nope_head_dim,
            dr: cfg.qk_rope_head_dim,
            dv: cfg.v_head_dim,
            dc: cfg.kv_lora_rank,
            experts: cfg.n_routed_experts,
            topk: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            route_scale: cfg.routed_scaling_factor as f32,
            eps: cfg.rms_norm_eps as f32,
            softmax_scale: cfg.softmax_scale(),
            rope: cfg.rope_config(),
        }
    }
}

/// Everything an op call needs besides its tensors.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    b: &'a dyn Backend,
    act: DType,
    scale_fmt: ScaleFmt,
    d: Dims,
    /// Where the finer taps of layer `li` go, when asked for.
    taps: Option<&'a RefCell<Taps>>,
    li: usize,
    /// Whether the backend's kernels read offset views in place
    /// ([`reads_views`]): then [`Ctx::window`] returns a view where the
    /// window is contiguous, else a copy.
    views: bool,
}

/// Whether `b`'s kernels read a read-only view at a nonzero offset in place
/// in the ops the model feeds views to (`gemm`, `rms_norm`, `rope`,
/// `act_quant`; the expert-parallel protocol reads its input with
/// `gather_rows`, which every backend with EP reads views in). cpu-ref and
/// cpu do; wgpu binds whole buffers outside `gather_rows`/`reduce_rows`/
/// `download` and answers `NotSupported`, so the model copies there. Probed
/// once at load with tiny tensors; any failure means "copy".
fn reads_views(b: &dyn Backend) -> bool {
    let probe = || -> Result<()> {
        let ones = vec![1f32; 3 * QBLOCK];
        let t = b.upload(&HostTensor::from_f32(DType::F32, &[3, QBLOCK], &ones))?;
        let v = t.rows(1, 1)?;
        let w = t.view(2 * QBLOCK, &[QBLOCK])?;
        let mut d = b.alloc(DType::F32, &[1, 1])?;
        ops::run(
            b,
            Gemm {
                a: &v,
                b: &v,
                d: &mut d,
            },
        )?;
        let mut y = b.alloc(DType::F32, &[1, QBLOCK])?;
        ops::run(
            b,
            RmsNorm {
                x: &v,
                weight: &w,
                y: &mut y,
                eps: 1e-6,
            },
        )?;
        let pos = b.upload(&HostTensor::from_i64(&[1], &[1]))?;
        let mut r = b.alloc(DType::F32, &[1, QBLOCK])?;
        ops::run(
            b,
            Rope {
                x: &v,
                positions: &pos,
                y: &mut r,
                config: RopeConfig::default(),
            },
        )?;
        let mut q = b.alloc(DType::F8E4M3, &[1, QBLOCK])?;
        let mut sa = b.alloc(DType::F32, &[1, 1])?;
        ops::run(
            b,
            ActQuant {
                x: &v,
                q: &mut q,
                s: &mut sa,
                scale_fmt: ScaleFmt::Float,
            },
        )?;
        b.synchronize()
    };
    probe().is_ok()
}

/// The per-step index tensors shared by every layer.
struct Step {
    /// `[T]` i64, absolute positions.
    positions: Tensor,
    /// First position of the step.
    start: usize,
    /// `[1, num_blocks]` i32 (decode only).
    block_table: Option<Tensor>,
    /// `[1]` i32 = start + T (decode only).
    seqlens: Option<Tensor>,
}

/// Which attention path a layer runs.
enum AttnPath<'c> {
    /// `mla_prefill` over this step's tokens (start must be 0); writes the
    /// cache when given one.
    Fused {
        form: MlaForm,
        cache: Option<&'c mut Tensor>,
        /// DeepSeek-V3.2's index-k cache (`v32_forward.rs`), written when given.
        index: Option<&'c mut Tensor>,
    },
    /// Writes the cache, then `mla_decode` over it (causal when the step
    /// has several tokens); DeepSeek-V3.2: sparse attention over the
    /// cache, with its index-k cache.
    Paged {
        cache: &'c mut Tensor,
        index: Option<&'c mut Tensor>,
    },
}

fn rows_of(t: &Tensor) -> usize {
    as_matrix(t.shape()).0
}

impl Ctx<'_> {
    /// Records `layers.{li}.{name}` when taps are being collected.
    fn tap(&self, name: &str, t: &Tensor) -> Result<()> {
        match self.taps {
            Some(c) => c
                .borrow_mut()
                .put(self.b, format!("layers.{}.{name}", self.li), t),
            None => Ok(()),
        }
    }

    fn alloc(&self, shape: &[usize]) -> Result<Tensor> {
        self.b.alloc(self.act, shape)
    }

    fn copy(
        &self,
        src: &Tensor,
        dst: &mut Tensor,
        src_origin: (usize, usize),
        dst_origin: (usize, usize),
        size: (usize, usize),
    ) -> Result<()> {
        ops::run(
            self.b,
            CopyWindow {
                src,
                dst,
                src_origin,
                dst_origin,
                size,
            },
        )
    }

    /// A `[rows, cols]` window of `src`'s matrix view: a read-only view of
    /// `src` when the window is contiguous in memory (whole rows, or one
    /// row) and the backend reads views in place (`self.views`), else a
    /// new tensor holding a copy (`copy_window`).
    fn window(
        &self,
        src: &Tensor,
        row: usize,
        col: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor> {
        let width = as_matrix(src.shape()).1;
        if self.views && (rows <= 1 || (col == 0 && cols == width)) {
            return src.view(row * width + col, &[rows, cols]);
        }
        let mut out = self.alloc(&[rows, cols])?;
        self.copy(src, &mut out, (row, col), (0, 0), (rows, cols))?;
        Ok(out)
    }

    /// `a [m, k]` · `w [n, k]`ᵀ in the activation dtype.
    fn gemm(&self, a: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mut d = self.alloc(&[rows_of(a), w.shape()[0]])?;
        ops::run(self.b, Gemm { a, b: w, d: &mut d })?;
        Ok(d)
    }

    fn linear(&self, x: &Tensor, l: &Linear) -> Result<Tensor> {
        match l {
            Linear::Dense(w) => self.gemm(x, w),
            Linear::Fp8 { w, s } => {
                let (m, k) = as_matrix(x.shape());
                let mut q = self.b.alloc(w.dtype(), &[m, k])?;
                let mut sa = self.b.alloc(DType::F32, &[m, k / QBLOCK])?;
                ops::run(
                    self.b,
                    ActQuant {
                        x,
                        q: &mut q,
                        s: &mut sa,
                        scale_fmt: self.scale_fmt,
                    },
                )?;
                let mut d = self.alloc(&[m, w.shape()[0]])?;
                ops::run(
                    self.b,
                    Fp8Gemm {
                        a: &q,
                        sa: &sa,
                        b: w,
                        sb: s,
                        d: &mut d,
                    },
                )?;
                Ok(d)
            }
        }
    }

    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let mut y = self.alloc(x.shape())?;
        ops::run(
            self.b,
            RmsNorm {
                x,
                weight,
                y: &mut y,
                eps: self.d.eps,
            },
        )?;
        Ok(y)
    }

    fn rope(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let mut y = self.alloc(x.shape())?;
        ops::run(
            self.b,
            Rope {
                x,
                positions,
                y: &mut y,
                config: self.d.rope,
            },
        )?;
        Ok(y)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut out = self.alloc(a.shape())?;
        ops::run(
            self.b,
            Add {
                a,
                b,
                out: &mut out,
            },
        )?;
        Ok(out)
    }

    /// SwiGLU: `down(silu(gate x) ⊙ up x)`.
    fn mlp(&self, x: &Tensor, m: &Mlp) -> Result<Tensor> {
        let g = self.linear(x, &m.gate)?;
        let u = self.linear(x, &m.up)?;
        let mut a = self.alloc(g.shape())?;
        ops::run(
            self.b,
            SiluMul {
                gate: &g,
                up: &u,
                out: &mut a,
            },
        )?;
        self.linear(&a, &m.down)
    }

    /// Writes this step's `[c ‖ k_pe]` rows into a layer's paged cache.
    /// Page `i` of the sequence is block `i` of the cache.
    fn write_cache(
        &self,
        cache: &mut Tensor,
        start: usize,
        latent: &Tensor,
        k_pe: &Tensor,
    ) -> Result<()> {
        let (dc, dr) = (self.d.dc, self.d.dr);
        let t = rows_of(latent);
        let end = start + t;
        let mut p = start;
        while p < end {
            let (blk, off) = (p / CACHE_BLOCK, p % CACHE_BLOCK);
            let n = (CACHE_BLOCK - off).min(end - p);
            let row = blk * CACHE_BLOCK + off;
            self.copy(latent, cache, (p - start, 0), (row, 0), (n, dc))?;
            self.copy(k_pe, cache, (p - start, 0), (row, dc), (n, dr))?;
            p += n;
        }
        Ok(())
    }

    /// MLA of one layer on normalized input `x [T, hidden]`.
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        step: &Step,
        path: AttnPath<'_>,
    ) -> Result<Tensor> {
        let Dims {
            heads: h,
            dn,
            dr,
            dv,
            dc,
            ..
        } = self.d;
        let t = rows_of(x);
        let qk = dn + dr;
        let (mut q, qr) = match &a.q {
            QProj::Lora { a: qa, norm, b: qb } => {
                let c = self.linear(x, qa)?;
                let cn = self.norm(&c, norm)?;
                (self.linear(&cn, qb)?, Some(cn))
            }
            QProj::Direct(l) => (self.linear(x, l)?, None),
        };
        let kv = self.linear(x, &a.kv_a)?;
        let c_raw = self.window(&kv, 0, 0, t, dc)?;
        let kpe_raw = self.window(&kv, 0, dc, t, dr)?;
        let latent = self.norm(&c_raw, &a.kv_norm)?;
        let k_pe = self.rope(&kpe_raw, &step.positions)?;
        self.tap("q", &q)?;
        self.tap("kv_latent", &latent)?;
        // q viewed as [T·H, dn + dr]: one row per (token, head).
        q.reshape(&[t * h, qk])?;
        let mut qpe_raw = self.window(&q, 0, dn, t * h, dr)?;
        qpe_raw.reshape(&[t, h, dr])?;
        let q_pe = self.rope(&qpe_raw, &step.positions)?;
        let o = match path {
            AttnPath::Fused { form, cache, index } => {
                if let Some(cache) = cache {
                    self.write_cache(cache, step.start, &latent, &k_pe)?;
                }
                if let (Some(ix), Some(qr)) = (&a.indexer, &qr) {
                    // DeepSeek-V3.2: attention over the indexer's selection.
                    q.reshape(&[t, h * qk])?;
                    let kv = v32_forward::SparseKv::Own { index };
                    let o =
                        self.sparse_attention(a, ix, x, qr, &q, &q_pe, &latent, &k_pe, step, kv)?;
                    self.tap("attn_core", &o)?;
                    return self.linear(&o, &a.o_proj);
                }
                let mut q_nope = self.window(&q, 0, 0, t * h, dn)?;
                q_nope.reshape(&[t, h, dn])?;
                let mut out = self.alloc(&[t, h, dv])?;
                ops::run(
                    self.b,
                    MlaPrefill {
                        q_nope: &q_nope,
                        q_pe: &q_pe,
                        latent: &latent,
                        k_pe: &k_pe,
                        wkv_b: &a.wkv_b,
                        out: &mut out,
                        softmax_scale: self.d.softmax_scale,
                        form,
                    },
                )?;
                out.reshape(&[t, h * dv])?;
                out
            }
            AttnPath::Paged { cache, index } => {
                self.write_cache(cache, step.start, &latent, &k_pe)?;
                q.reshape(&[t, h * qk])?;
                if let (Some(ix), Some(qr)) = (&a.indexer, &qr) {
                    let index = index.ok_or_else(|| {
                        Error::Other(
                            "model: DeepSeek-V3.2 paged attention without its index-k cache".into(),
                        )
                    })?;
                    let kv = v32_forward::SparseKv::Cached {
                        latent: cache,
                        index,
                    };
                    let o =
                        self.sparse_attention(a, ix, x, qr, &q, &q_pe, &latent, &k_pe, step, kv)?;
                    self.tap("attn_core", &o)?;
                    return self.linear(&o, &a.o_proj);
                }
                self.decode_attention(a, &q, &q_pe, cache, step)?
            }
        };
        self.tap("attn_core", &o)?;
        self.linear(&o, &a.o_proj)
    }

    /// Absorbed attention over the paged cache: `q [T, H·(dn+dr)]`,
    /// `q_pe [T, H, dr]` (roped) → `[T, H·dv]`.
    fn decode_attention(
        &self,
        a: &Attention,
        q: &Tensor,
        q_pe: &Tensor,
        cache: &Tensor,
        step: &Step,
    ) -> Result<Tensor> {
        let Dims {
            heads: h,
            dn,
            dr,
            dv,
            dc,
            ..
        } = self.d;
        let t = rows_of(q);
        let (qk, dl) = (dn + dr, dc + dr);
        let (Some(block_table), Some(seqlens)) = (&step.block_table, &step.seqlens) else {
            return Err(Error::Other(
                "model: paged attention step without a block table".into(),
            ));
        };
        let mut qm = self.alloc(&[t, h * dl])?;
        for hh in 0..h {
            let qn = self.window(q, 0, hh * qk, t, dn)?;
            let ql = self.gemm(&qn, &a.w_uk_t[hh])?;
            self.copy(&ql, &mut qm, (0, 0), (0, hh * dl), (t, dc))?;
        }
        qm.reshape(&[t * h, dl])?;
        self.copy(q_pe, &mut qm, (0, 0), (0, dc), (t * h, dr))?;
        qm.reshape(&[1, t, h, dl])?;
        let mut out = self.alloc(&[1, t, h, dc])?;
        let mut lse = self.b.alloc(DType::F32, &[1, h, t])?;
        ops::run(
            self.b,
            MlaDecode {
                q: &qm,
                kcache: cache,
                block_table,
                cache_seqlens: seqlens,
                out: &mut out,
                lse: &mut lse,
                softmax_scale: self.d.softmax_scale,
                causal: t > 1,
            },
        )?;
        out.reshape(&[t, h * dc])?;
        let mut o = self.alloc(&[t, h * dv])?;
        for hh in 0..h {
            let ol = self.window(&out, 0, hh * dc, t, dc)?;
            let oh = self.gemm(&ol, &a.w_uv[hh])?;
            self.copy(&oh, &mut o, (0, 0), (0, hh * dv), (t, dv))?;
        }
        Ok(o)
    }

    /// A host index tensor uploaded as i32.
    fn ids(&self, v: &[i32]) -> Result<Tensor> {
        self.b.upload(&HostTensor::from_i32(&[v.len()], v))
    }

    /// Row gather `out[i] = table[ids[i]]` (the `embedding` op).
    fn gather(&self, table: &Tensor, ids: &[i32]) -> Result<Tensor> {
        let ids_t = self.ids(ids)?;
        // `embedding` writes every row.
        let mut out = self
            .b
            .alloc_output(table.dtype(), &[ids.len(), table.shape()[1]])?;
        ops::run(
            self.b,
            Embedding {
                table,
                ids: &ids_t,
                out: &mut out,
            },
        )?;
        Ok(out)
    }

    /// `act_quant` of `x [m, k]` (FP8 activations and their scales).
    fn quant(&self, x: &Tensor, wdt: DType) -> Result<(Tensor, Tensor)> {
        let (m, k) = as_matrix(x.shape());
        let mut q = self.b.alloc(wdt, &[m, k])?;
        let mut sa = self.b.alloc(DType::F32, &[m, k / QBLOCK])?;
        ops::run(
            self.b,
            ActQuant {
                x,
                q: &mut q,
                s: &mut sa,
                scale_fmt: self.scale_fmt,
            },
        )?;
        Ok((q, sa))
    }

    /// A grouped GEMM over rows that each belong to one group.
    ///
    /// * contiguous layout (prefill): `x [m, k]`, `groups[i]` = group of row
    ///   `i`, `-1` for padding rows (DeepGEMM: constant per 128-row block);
    /// * masked layout (decode): `x [G, cap, k]` (`groups` is `None`), group
    ///   `g`'s first `masked_m[g]` rows are computed.
    ///
    /// `pre_quant` is the FP8 payload of `x` when the dispatch already
    /// quantized it. FP8 mode runs `fp8_grouped_contiguous` /
    /// `fp8_grouped_masked`, f32/bf16 mode `gemm_grouped_contiguous` /
    /// `gemm_grouped_masked`. Returns `[m, n]` / `[G, cap, n]` in the
    /// activation dtype; padding rows and masked-off rows hold anything.
    fn grouped(
        &self,
        w: &Grouped,
        g: usize,
        x: &Tensor,
        pre_quant: Option<(&Tensor, &Tensor)>,
        m_indices: Option<&Tensor>,
        masked_m: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xs = x.shape().to_vec();
        let k = *xs.last().unwrap_or(&0);
        let m = xs.iter().product::<usize>() / k.max(1);
        let n = w.n();
        let cap = m / g.max(1);
        match w {
            Grouped::Fp8 { w, s } => {
                let owned;
                let (q, sa) = match pre_quant {
                    Some(p) => p,
                    None => {
                        owned = self.quant(x, w.dtype())?;
                        (&owned.0, &owned.1)
                    }
                };
                match (m_indices, masked_m) {
                    (Some(m_indices), _) => {
                        let mut d = self.alloc(&[m, n])?;
                        ops::run(
                            self.b,
                            Fp8GroupedContiguous {
                                a: q,
                                sa,
                                b: w,
                                sb: s,
                                m_indices,
                                d: &mut d,
                            },
                        )?;
                        Ok(d)
                    }
                    (None, Some(masked_m)) => {
                        // Zeros: the masked-off rows reach `silu_mul` and
                        // the down projection's `act_quant`, which refuses
                        // what an allocator may leave there (NaN).
                        let mut d = self.b.alloc_zeroed(self.act, &[g, cap, n])?;
                        ops::run(
                            self.b,
                            Fp8GroupedMasked {
                                a: q,
                                sa,
                                b: w,
                                sb: s,
                                masked_m,
                                d: &mut d,
                            },
                        )?;
                        Ok(d)
                    }
                    (None, None) => {
                        Err(Error::Other("model: grouped GEMM without a layout".into()))
                    }
                }
            }
            Grouped::Dense { w } => match (m_indices, masked_m) {
                (Some(m_indices), _) => {
                    // Every row is written (padding rows with anything).
                    let mut d = self.b.alloc_output(self.act, &[m, n])?;
                    ops::run(
                        self.b,
                        GemmGroupedContiguous {
                            a: x,
                            b: w,
                            m_indices,
                            d: &mut d,
                        },
                    )?;
                    Ok(d)
                }
                (None, Some(masked_m)) => {
                    let mut d = self.alloc(&[g, cap, n])?;
                    ops::run(
                        self.b,
                        GemmGroupedMasked {
                            a: x,
                            b: w,
                            masked_m,
                            d: &mut d,
                        },
                    )?;
                    Ok(d)
                }
                (None, None) => Err(Error::Other("model: grouped GEMM without a layout".into())),
            },
        }
    }

    /// The routed experts' SwiGLU over dispatched rows, as a grouped GEMM
    /// pipeline: gate and up projections, `silu_mul`, down projection.
    fn experts(
        &self,
        ex: &Experts,
        x: &Tensor,
        pre_quant: Option<(&Tensor, &Tensor)>,
        m_indices: Option<&Tensor>,
        masked_m: Option<&Tensor>,
    ) -> Result<Tensor> {
        let g = ex.local;
        let gt = self.grouped(&ex.gate, g, x, pre_quant, m_indices, masked_m)?;
        let up = self.grouped(&ex.up, g, x, pre_quant, m_indices, masked_m)?;
        // `silu_mul` writes every element.
        let mut a = self.b.alloc_output(self.act, gt.shape())?;
        ops::run(
            self.b,
            SiluMul {
                gate: &gt,
                up: &up,
                out: &mut a,
            },
        )?;
        if m_indices.is_some() {
            return self.grouped(&ex.down, g, &a, None, m_indices, masked_m);
        }
        // Masked: the down projection reads [G·cap, inter] rows.
        let s = a.shape().to_vec();
        a.reshape(&[s[0] * s[1], s[2]])?;
        let mut a3 = a;
        let quant;
        let pre = match &ex.down {
            Grouped::Fp8 { w, .. } => {
                quant = self.quant(&a3, w.dtype())?;
                let (mut q, mut sa) = (quant.0, quant.1);
                q.reshape(&[s[0], s[1], s[2]])?;
                sa.reshape(&[s[0], s[1], s[2] / QBLOCK])?;
                Some((q, sa))
            }
            Grouped::Dense { .. } => None,
        };
        a3.reshape(&[s[0], s[1], s[2]])?;
        self.grouped(
            &ex.down,
            g,
            &a3,
            pre.as_ref().map(|(q, sa)| (q, sa)),
            None,
            masked_m,
        )
    }

    /// The MoE FFN on normalized input `x [T, hidden]`, shaped as a
    /// serving engine runs it (DeepEP + DeepGEMM):
    ///
    /// 1. `moe_gate` on every token (replicated on every rank);
    /// 2. with several ranks, this rank takes its share of the tokens
    ///    (rows `[r·T/R, (r+1)·T/R)`);
    /// 3. `low_latency_dispatch` to the ranks holding the chosen experts;
    /// 4. the experts of this rank as grouped GEMMs: in prefill the received
    ///    rows are gathered into the **contiguous** layout (each expert's
    ///    rows padded to 128, `m_indices`, `fp8_grouped_contiguous`), in
    ///    decode the dispatch buffer is used as is in the **masked** layout
    ///    (`masked_m` = received counts, `fp8_grouped_masked`, FP8 payload
    ///    straight from the dispatch); gate/up, `silu_mul`, down;
    /// 5. `low_latency_combine` with the top-k weights (fixed top-k order,
    ///    f32 accumulation), plus the shared experts;
    /// 6. with several ranks, the shares are gathered back on every rank
    ///    (a `dispatch` that sends each row to every rank, bit-exact).
    ///
    /// Returns the output `[T, hidden]` and the device routing.
    fn moe(
        &self,
        comm: &dyn Communicator,
        m: &Moe,
        x: &Tensor,
        masked: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = self.d;
        let t = rows_of(x);
        let (rank, world) = (comm.rank(), comm.world_size());
        let mut idx = self.b.alloc(DType::I64, &[t, d.topk])?;
        let mut w = self.b.alloc(DType::F32, &[t, d.topk])?;
        ops::run(
            self.b,
            MoeGate {
                x,
                weight: &m.router,
                bias: Some(&m.bias),
                topk_idx: &mut idx,
                topk_weights: &mut w,
                n_group: d.n_group,
                topk_group: d.topk_group,
                topk: d.topk,
                route_scale: d.route_scale,
            },
        )?;
        if self.taps.is_some() {
            // Router logits x·W_gᵀ in f32 (the gate's own input to sigmoid).
            let mut gl = self.b.alloc(DType::F32, &[t, d.experts])?;
            ops::run(
                self.b,
                Gemm {
                    a: x,
                    b: &m.router,
                    d: &mut gl,
                },
            )?;
            self.tap("gate_logits", &gl)?;
        }
        if self.act != DType::F32 {
            // DeepSeek's gate returns its weights in the activation dtype.
            let mut wr = self.alloc(&[t, d.topk])?;
            self.copy(&w, &mut wr, (0, 0), (0, 0), (t, d.topk))?;
            self.copy(&wr, &mut w, (0, 0), (0, 0), (t, d.topk))?;
        }
        // This rank's share of the tokens.
        let share = |r: usize| (r * t / world, (r + 1) * t / world);
        let (lo, hi) = share(rank);
        let n_own = hi - lo;
        let max_tokens = t.div_ceil(world).max(1);
        let owned;
        let (xs, idx_s, w_s) = if world == 1 {
            (x, &idx, &w)
        } else {
            let iv = self.b.download(&idx)?.to_i64_vec();
            let wv = self.b.download(&w)?.to_f32_vec();
            let k = d.topk;
            // A rank without tokens sends one row routed nowhere, so that
            // it takes part in the collectives with a non-empty tensor.
            let (rows, ii, ww): (usize, Vec<i64>, Vec<f32>) = if n_own == 0 {
                (1, vec![-1; k], vec![0.0; k])
            } else {
                (
                    n_own,
                    iv[lo * k..hi * k].to_vec(),
                    wv[lo * k..hi * k].to_vec(),
                )
            };
            let xs = self.window(x, if n_own == 0 { 0 } else { lo }, 0, rows, d.hidden)?;
            owned = (
                xs,
                self.b.upload(&HostTensor::from_i64(&[rows, k], &ii))?,
                self.b
                    .upload(&HostTensor::from_f32(DType::F32, &[rows, k], &ww))?,
            );
            (&owned.0, &owned.1, &owned.2)
        };
        let rows = rows_of(xs);
        let ex = &m.experts;
        let fp8_payload = masked && matches!(ex.gate, Grouped::Fp8 { .. });
        let disp = ops::low_latency_dispatch(
            self.b,
            comm,
            LowLatencyDispatch {
                x: xs,
                topk_idx: idx_s,
                num_experts: d.experts,
                max_tokens_per_rank: if world == 1 { t } else { max_tokens },
                use_fp8: fp8_payload,
                ue8m0: self.scale_fmt == ScaleFmt::Ue8m0,
            },
        )?;
        let g = ex.local;
        let cap = disp.handle.max_tokens_per_rank * world;
        let y = if masked {
            let mut rx = disp.recv_x;
            let mut y = match (&disp.recv_scales, fp8_payload) {
                (Some(sc), true) => {
                    self.experts(ex, &rx, Some((&rx, sc)), None, Some(&disp.recv_count))?
                }
                _ => {
                    rx.reshape(&[g, cap, d.hidden])?;
                    self.experts(ex, &rx, None, None, Some(&disp.recv_count))?
                }
            };
            y.reshape(&[g, cap, d.hidden])?;
            y
        } else {
            let counts = self.b.download(&disp.recv_count)?.to_i64_vec();
            if counts.len() != g {
                return Err(Error::Other(format!(
                    "model: low_latency_dispatch returned {} expert counts for {g} local experts",
                    counts.len()
                )));
            }
            // Contiguous layout: expert e's rows at [seg_e, seg_e + n_e),
            // each segment padded to a multiple of 128 rows (DeepGEMM's
            // m_indices are constant per 128-row block).
            let mut m_idx: Vec<i32> = Vec::new();
            let mut gather_ids: Vec<i32> = Vec::new();
            let mut back_ids = vec![0i32; g * cap];
            for (e, &n) in counts.iter().enumerate() {
                if n < 0 || n as usize > cap {
                    return Err(Error::Other(format!(
                        "model: low_latency_dispatch says local expert {e} received {n} tokens, outside [0, {cap}]"
                    )));
                }
                let n = n as usize;
                let seg = m_idx.len();
                for j in 0..n.next_multiple_of(QBLOCK) {
                    if j < n {
                        back_ids[e * cap + j] = (seg + j) as i32;
                        m_idx.push(e as i32);
                        gather_ids.push((e * cap + j) as i32);
                    } else {
                        m_idx.push(-1);
                        gather_ids.push((e * cap) as i32);
                    }
                }
            }
            let mut y = if m_idx.is_empty() {
                self.alloc(&[g * cap, d.hidden])?
            } else {
                let mut rx = disp.recv_x;
                rx.reshape(&[g * cap, d.hidden])?;
                let xc = self.gather(&rx, &gather_ids)?;
                let m_indices = self.ids(&m_idx)?;
                let yc = self.experts(ex, &xc, None, Some(&m_indices), None)?;
                self.gather(&yc, &back_ids)?
            };
            y.reshape(&[g, cap, d.hidden])?;
            y
        };
        // With shared experts the combine stays f32 so that routed + shared
        // is rounded once (SPEC.md §8: the MoE combine rounds once).
        let combined_dtype = if m.shared.is_some() {
            DType::F32
        } else {
            self.act
        };
        let mut out = self.b.alloc(combined_dtype, &[rows, d.hidden])?;
        ops::low_latency_combine(
            self.b,
            comm,
            LowLatencyCombine {
                x: &y,
                topk_idx: idx_s,
                topk_weights: w_s,
                handle: &disp.handle,
                out: &mut out,
            },
        )?;
        if world == 1 && self.taps.is_some() {
            self.tap_expert_out(&y, &idx, &disp.handle)?;
        }
        let out = match &m.shared {
            Some(s) => {
                let z = self.mlp(xs, s)?;
                if world == 1 {
                    self.tap("shared_out", &z)?;
                }
                self.add(&out, &z)?
            }
            None => out,
        };
        if world == 1 {
            return Ok((out, idx, w));
        }
        // Every rank gets every share back: a dispatch that sends each row
        // to one expert of every rank arrives grouped by source rank
        // ascending, in token order (bit-exact payload).
        let e_per = d.experts / world;
        let mut to_all = Vec::with_capacity(rows * world);
        for _ in 0..rows {
            for r in 0..world {
                to_all.push(if n_own == 0 { -1 } else { (r * e_per) as i64 });
            }
        }
        let to_all = self
            .b
            .upload(&HostTensor::from_i64(&[rows, world], &to_all))?;
        let zeros = self
            .b
            .upload(&HostTensor::zeros(DType::F32, &[rows, world]))?;
        let gathered = ops::dispatch(
            self.b,
            comm,
            Dispatch {
                x: &out,
                x_scales: None,
                topk_idx: &to_all,
                topk_weights: &zeros,
                num_experts: d.experts,
                expert_alignment: 1,
            },
        )?;
        if rows_of(&gathered.recv_x) != t {
            return Err(Error::Other(format!(
                "model: gathering the MoE shares returned {} rows for {t} tokens",
                rows_of(&gathered.recv_x)
            )));
        }
        Ok((gathered.recv_x, idx, w))
    }

    /// `layers.{li}.expert_out [T, k, hidden]`: each token's chosen
    /// experts' outputs before the combine, in ascending expert order (the
    /// order of the `topk_idx` tap). One rank only (all experts local).
    fn tap_expert_out(&self, y: &Tensor, idx: &Tensor, h: &LowLatencyHandle) -> Result<()> {
        let hidden = self.d.hidden;
        let yv = self.b.download(y)?.to_dtype(DType::F32).to_f32_vec();
        let iv = self.b.download(idx)?.to_i64_vec();
        let k = self.d.topk;
        let t = iv.len() / k.max(1);
        let cap = h.max_tokens_per_rank * h.world_size;
        let mut slot = BTreeMap::new();
        for (e, srcs) in h.recv_src.iter().enumerate() {
            for (s, &(_, tok)) in srcs.iter().enumerate() {
                slot.insert((tok, e as i64), e * cap + s);
            }
        }
        let mut out = Vec::with_capacity(t * k * hidden);
        for tok in 0..t {
            let mut es: Vec<i64> = iv[tok * k..(tok + 1) * k].to_vec();
            es.sort_unstable();
            for e in es {
                match slot.get(&(tok, e)) {
                    Some(&row) => out.extend_from_slice(&yv[row * hidden..(row + 1) * hidden]),
                    None => out.extend(std::iter::repeat_n(f32::NAN, hidden)),
                }
            }
        }
        let name = format!("layers.{}.expert_out", self.li);
        if let Some(c) = self.taps {
            c.borrow_mut().tensors.insert(
                name,
                HostTensor::from_f32(DType::F32, &[t, k, hidden], &out),
            );
        }
        Ok(())
    }

    /// The FFN of a layer; routing tensors for MoE layers.
    fn ffn(
        &self,
        comm: &dyn Communicator,
        f: &Ffn,
        x: &Tensor,
        masked: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        match f {
            Ffn::Dense(m) => Ok((self.mlp(x, m)?, None)),
            Ffn::Moe(m) => {
                let (out, idx, w) = self.moe(comm, m, x, masked)?;
                Ok((out, Some((idx, w))))
            }
        }
    }
}

// ---- loading ----------------------------------------------------------------

struct Loader<'a> {
    b: &'a dyn Backend,
    ckpt: &'a Checkpoint,
    act: DType,
    numerics: Numerics,
    /// This rank and the number of ranks the routed experts are split over.
    rank: usize,
    world: usize,
    d: Dims,
    /// [`reads_views`] of the backend.
    views: bool,
}

impl Loader<'_> {
    /// A float tensor of the given shape, converted to the activation dtype.
    fn float(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let h = self.ckpt.get_checked(name, FLOATS, shape)?;
        self.b.upload(&h.to_dtype(self.act))
    }

    /// A linear weight `[out, in]` dequantized to the activation dtype
    /// (FP8 weights through the `weight_dequant` op).
    fn dequantized(&self, prefix: &str, out: usize, inp: usize) -> Result<Tensor> {
        let lw = self.ckpt.linear(prefix, out, inp)?;
        match lw.scale {
            None => self.b.upload(&lw.weight.to_dtype(self.act)),
            Some(s) => {
                let w = self.b.upload(&lw.weight)?;
                let s = self.b.upload(&s)?;
                let mut o = self.b.alloc(self.act, &[out, inp])?;
                ops::run(
                    self.b,
                    WeightDequant {
                        w: &w,
                        s: &s,
                        out: &mut o,
                    },
                )?;
                Ok(o)
            }
        }
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        if self.numerics == Numerics::Fp8 && inp.is_multiple_of(QBLOCK) {
            let lw = self.ckpt.linear(prefix, out, inp)?;
            if let Some(s) = lw.scale {
                return Ok(Linear::Fp8 {
                    w: self.b.upload(&lw.weight)?,
                    s: self.b.upload(&s)?,
                });
            }
            return Ok(Linear::Dense(self.b.upload(&lw.weight.to_dtype(self.act))?));
        }
        Ok(Linear::Dense(self.dequantized(prefix, out, inp)?))
    }

    /// This rank's routed experts of MoE layer `p`, stacked per projection.
    fn experts(&self, p: &str, cfg: &ModelConfig) -> Result<Experts> {
        let (e, hidden, inter) = (
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
        );
        if self.world == 0 || !e.is_multiple_of(self.world) {
            return Err(Error::invalid(
                OP,
                "world_size",
                format!(
                    "{} ranks cannot split {e} routed experts evenly",
                    self.world
                ),
            ));
        }
        let local = e / self.world;
        let first = self.rank * local;
        let ids: Vec<usize> = (first..first + local).collect();
        Ok(Experts {
            local,
            gate: self.grouped(p, &ids, "gate_proj", inter, hidden)?,
            up: self.grouped(p, &ids, "up_proj", inter, hidden)?,
            down: self.grouped(p, &ids, "down_proj", hidden, inter)?,
        })
    }

    /// One projection of experts `ids`, stacked: FP8 `[G, n, k]` + scales
    /// in FP8 mode (when every expert has an FP8 weight and `k` is a
    /// multiple of 128), else dequantized `[G, n, k]`.
    fn grouped(&self, p: &str, ids: &[usize], proj: &str, n: usize, k: usize) -> Result<Grouped> {
        let g = ids.len();
        if self.numerics == Numerics::Fp8 && k.is_multiple_of(QBLOCK) {
            let mut ws = Vec::new();
            let mut ss = Vec::new();
            let mut fp8 = true;
            let mut wdt = DType::F8E4M3;
            for &x in ids {
                let lw = self.ckpt.linear(&format!("{p}.experts.{x}.{proj}"), n, k)?;
                match lw.scale {
                    Some(s) if fp8 && (ws.is_empty() || lw.weight.dtype() == wdt) => {
                        wdt = lw.weight.dtype();
                        ws.extend_from_slice(lw.weight.bytes());
                        ss.extend_from_slice(s.to_dtype(DType::F32).bytes());
                    }
                    _ => fp8 = false,
                }
            }
            if fp8 {
                let w = HostTensor::from_bytes(wdt, &[g, n, k], ws)?;
                let s = HostTensor::from_bytes(DType::F32, &[g, blocks128(n), k / QBLOCK], ss)?;
                return Ok(Grouped::Fp8 {
                    w: self.b.upload(&w)?,
                    s: self.b.upload(&s)?,
                });
            }
        }
        let ctx = self.ctx();
        let mut w = ctx.alloc(&[g * n, k])?;
        for (i, &x) in ids.iter().enumerate() {
            let we = self.dequantized(&format!("{p}.experts.{x}.{proj}"), n, k)?;
            ctx.copy(&we, &mut w, (0, 0), (i * n, 0), (n, k))?;
        }
        w.reshape(&[g, n, k])?;
        Ok(Grouped::Dense { w })
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            b: self.b,
            act: self.act,
            scale_fmt: ScaleFmt::Float,
            d: self.d,
            taps: None,
            li: 0,
            views: self.views,
        }
    }

    fn mlp(&self, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate: self.linear(&format!("{prefix}.gate_proj"), inter, hidden)?,
            up: self.linear(&format!("{prefix}.up_proj"), inter, hidden)?,
            down: self.linear(&format!("{prefix}.down_proj"), hidden, inter)?,
        })
    }

    fn attention(&self, cfg: &ModelConfig, i: usize) -> Result<Attention> {
        let p = format!("model.layers.{i}.self_attn");
        let d = Dims::of(cfg);
        let (h, hidden) = (d.heads, d.hidden);
        let qk = d.dn + d.dr;
        let q = match cfg.q_lora_rank {
            Some(r) => QProj::Lora {
                a: self.linear(&format!("{p}.q_a_proj"), r, hidden)?,
                norm: self.float(&format!("{p}.q_a_layernorm.weight"), &[r])?,
                b: self.linear(&format!("{p}.q_b_proj"), h * qk, r)?,
            },
            None => QProj::Direct(self.linear(&format!("{p}.q_proj"), h * qk, hidden)?),
        };
        let kv_a = self.linear(&format!("{p}.kv_a_proj_with_mqa"), d.dc + d.dr, hidden)?;
        let kv_norm = self.float(&format!("{p}.kv_a_layernorm.weight"), &[d.dc])?;
        let wkv_b = self.dequantized(&format!("{p}.kv_b_proj"), h * (d.dn + d.dv), d.dc)?;
        // Per-head slices. W_UKᵀ needs a transpose, which no op does: it is
        // built once here from the dequantized weight.
        let wh = self.b.download(&wkv_b)?.to_f32_vec();
        let ctx = Ctx {
            b: self.b,
            act: self.act,
            scale_fmt: ScaleFmt::Float,
            d,
            taps: None,
            li: 0,
            views: self.views,
        };
        let mut w_uk_t = Vec::with_capacity(h);
        let mut w_uv = Vec::with_capacity(h);
        for hh in 0..h {
            let base = hh * (d.dn + d.dv);
            let mut tr = vec![0f32; d.dc * d.dn];
            for r in 0..d.dn {
                for c in 0..d.dc {
                    tr[c * d.dn + r] = wh[(base + r) * d.dc + c];
                }
            }
            // Values came from the activation dtype: the conversion is exact.
            w_uk_t.push(
                self.b
                    .upload(&HostTensor::from_f32(self.act, &[d.dc, d.dn], &tr))?,
            );
            w_uv.push(ctx.window(&wkv_b, base + d.dn, 0, d.dv, d.dc)?);
        }
        Ok(Attention {
            q,
            kv_a,
            kv_norm,
            wkv_b,
            w_uk_t,
            w_uv,
            o_proj: self.linear(&format!("{p}.o_proj"), hidden, h * d.dv)?,
            indexer: self.indexer(cfg, i)?,
        })
    }

    fn ffn(&self, cfg: &ModelConfig, i: usize) -> Result<Ffn> {
        let p = format!("model.layers.{i}.mlp");
        let hidden = cfg.hidden_size;
        if !cfg.is_moe_layer(i) {
            return Ok(Ffn::Dense(self.mlp(&p, hidden, cfg.intermediate_size)?));
        }
        let e = cfg.n_routed_experts;
        let router = self.float(&format!("{p}.gate.weight"), &[e, hidden])?;
        let bias_h =
            self.ckpt
                .get_checked(&format!("{p}.gate.e_score_correction_bias"), FLOATS, &[e])?;
        let bias = self.b.upload(&bias_h.to_dtype(DType::F32))?;
        let experts = self.experts(&p, cfg)?;
        let shared = if cfg.n_shared_experts > 0 {
            Some(self.mlp(
                &format!("{p}.shared_experts"),
                hidden,
                cfg.n_shared_experts * cfg.moe_intermediate_size,
            )?)
        } else {
            None
        };
        Ok(Ffn::Moe(Moe {
            router,
            bias,
            experts,
            shared,
        }))
    }
}

// ---- the model ----------------------------------------------------------------

/// The ranks the routed experts are split over.
enum Comm<'b> {
    /// A world of one (every expert here).
    Own(ThreadComm),
    /// Any communicator: in-process threads, MPI, NCCL, …
    Borrowed(&'b dyn Communicator),
}

impl Comm<'_> {
    fn get(&self) -> &dyn Communicator {
        match self {
            Comm::Own(c) => c,
            Comm::Borrowed(c) => *c,
        }
    }
}

/// A DeepSeek-V3 model on a backend, with its latent cache.
pub struct Model<'b> {
    b: &'b dyn Backend,
    cfg: ModelConfig,
    opts: LoadOptions,
    dims: Dims,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    comm: Comm<'b>,
    /// One `[blocks, 64, 1, dc + dr]` cache per layer (empty before the
    /// first step).
    caches: Vec<Tensor>,
    /// DeepSeek-V3.2: one `[blocks·64, index_head_dim]` index-k cache per
    /// layer (`v32_forward.rs`), grown with `caches`; empty for V3.
    index_caches: Vec<Tensor>,
    blocks: usize,
    seq_len: usize,
    /// [`reads_views`] of the backend, probed at load.
    views: bool,
    /// The multi-token-prediction layer, once [`Model::load_mtp`] ran.
    mtp: Option<Mtp>,
    /// With [`Model::keep_hidden`]: the final hidden states (after
    /// `model.norm`) of every cached position, as raw rows.
    hidden: Option<Vec<u8>>,
}

impl std::fmt::Debug for Model<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({} layers, {}, {}, on {}, {} cached tokens)",
            self.layers.len(),
            self.opts.numerics,
            self.opts.form.name(),
            self.b.name(),
            self.seq_len
        )
    }
}

impl<'b> Model<'b> {
    /// Loads a model: every weight is read from `ckpt`, prepared for
    /// `numerics` and uploaded once. The FP8 activation scale format is the
    /// checkpoint's (`quantization_config.scale_fmt`).
    pub fn load(
        backend: &'b dyn Backend,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        numerics: Numerics,
        form: MlaForm,
    ) -> Result<Self> {
        let opts = LoadOptions {
            numerics,
            form,
            scale_fmt: cfg.act_scale_fmt(),
            prefill: PrefillPath::Fused,
        };
        Self::load_with(backend, ckpt, cfg, opts)
    }

    /// Loads a model with explicit options, all experts on this one rank.
    pub fn load_with(
        backend: &'b dyn Backend,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self> {
        let comm = ThreadComm::group(1)
            .pop()
            .ok_or_else(|| Error::Other("model: ThreadComm::group(1) returned no rank".into()))?;
        Self::load_inner(backend, Comm::Own(comm), ckpt, cfg, opts)
    }

    /// Loads this rank's part of an expert-parallel model: the routed
    /// experts are split evenly over `comm`'s ranks (rank `r` holds
    /// experts `[r·E/R, (r+1)·E/R)`); everything else (embedding,
    /// attention, router, shared experts, lm_head) is replicated. Every
    /// rank must then make the same calls (prefill, decode,
    /// `layer_forward`) with the same tokens, as the MoE layers run
    /// collectives; each rank gets the whole result.
    pub fn load_ep(
        backend: &'b dyn Backend,
        comm: &'b dyn Communicator,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self> {
        Self::load_inner(backend, Comm::Borrowed(comm), ckpt, cfg, opts)
    }

    fn load_inner(
        backend: &'b dyn Backend,
        comm: Comm<'b>,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let act = opts.numerics.act_dtype();
        let views = reads_views(backend);
        let ld = Loader {
            b: backend,
            ckpt,
            act,
            numerics: opts.numerics,
            rank: comm.get().rank(),
            world: comm.get().world_size(),
            d: Dims::of(cfg),
            views,
        };
        let (v, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let embed = ld.float("model.embed_tokens.weight", &[v, hidden])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: ld.float(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                attn: ld.attention(cfg, i)?,
                post_norm: ld.float(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                ffn: ld.ffn(cfg, i)?,
            });
        }
        let norm = ld.float("model.norm.weight", &[hidden])?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            ld.float("model.embed_tokens.weight", &[v, hidden])?
        } else {
            ld.float("lm_head.weight", &[v, hidden])?
        };
        Ok(Model {
            b: backend,
            cfg: cfg.clone(),
            opts,
            dims: Dims::of(cfg),
            embed,
            layers,
            norm,
            lm_head,
            comm,
            caches: Vec::new(),
            index_caches: Vec::new(),
            blocks: 0,
            seq_len: 0,
            views,
            mtp: None,
            hidden: None,
        })
    }

    /// Loads the multi-token-prediction layer (DeepSeek-V3's MTP module,
    /// layer index `num_hidden_layers` of the checkpoint) for
    /// [`Model::mtp_forward`]. A config without one
    /// (`num_nextn_predict_layers` = 0) is an error, as is a missing weight
    /// (named). Only the first MTP depth is loaded.
    pub fn load_mtp(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let cfg = &self.cfg;
        if cfg.num_nextn_predict_layers == 0 {
            return Err(Error::invalid(
                OP,
                "mtp",
                format!(
                    "the checkpoint has no multi-token-prediction layer: its config.json says \
                     num_nextn_predict_layers = 0 (weights of layer {} expected)",
                    cfg.num_hidden_layers
                ),
            ));
        }
        let i = cfg.num_hidden_layers;
        let p = format!("model.layers.{i}");
        let ld = Loader {
            b: self.b,
            ckpt,
            act: self.opts.numerics.act_dtype(),
            numerics: self.opts.numerics,
            rank: self.comm.get().rank(),
            world: self.comm.get().world_size(),
            d: self.dims,
            views: self.views,
        };
        let (v, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let head_name = format!("{p}.shared_head.head.weight");
        let head = if ckpt.contains(&head_name) {
            ld.float(&head_name, &[v, hidden])?
        } else {
            // Engines share the main lm_head; the released V3 checkpoint
            // holds an equal copy.
            ld.float("lm_head.weight", &[v, hidden])?
        };
        self.mtp = Some(Mtp {
            index: i,
            enorm: ld.float(&format!("{p}.enorm.weight"), &[hidden])?,
            hnorm: ld.float(&format!("{p}.hnorm.weight"), &[hidden])?,
            eh_proj: ld.linear(&format!("{p}.eh_proj"), hidden, 2 * hidden)?,
            layer: Layer {
                input_norm: ld.float(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                attn: ld.attention(cfg, i)?,
                post_norm: ld.float(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                ffn: ld.ffn(cfg, i)?,
            },
            norm: ld.float(&format!("{p}.shared_head.norm.weight"), &[hidden])?,
            head,
        });
        Ok(())
    }

    /// Whether [`Model::load_mtp`] loaded a multi-token-prediction layer.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// With `on`, every step keeps the final hidden states (after
    /// `model.norm`) of its positions, for [`Model::hidden_states`] (the
    /// MTP layer's input). Costs one download per step.
    pub fn keep_hidden(&mut self, on: bool) {
        self.hidden = on.then(Vec::new);
    }

    /// The kept final hidden states `[seq_len, hidden]` (activation dtype)
    /// of every cached position; an error unless [`Model::keep_hidden`] was
    /// on since the sequence began.
    pub fn hidden_states(&self) -> Result<HostTensor> {
        let act = self.opts.numerics.act_dtype();
        let rows = self.hidden.as_ref().ok_or_else(|| {
            Error::invalid(OP, "hidden", "keep_hidden(true) was not set before the run")
        })?;
        let n = self.seq_len;
        let want = n * self.dims.hidden * act.size();
        if rows.len() != want {
            return Err(Error::invalid(
                OP,
                "hidden",
                format!(
                    "{} bytes kept for {n} cached positions (keep_hidden was switched on mid-sequence)",
                    rows.len()
                ),
            ));
        }
        HostTensor::from_bytes(act, &[n, self.dims.hidden], rows.clone())
    }

    /// The multi-token-prediction layer at positions `0..T`: row `t`
    /// combines `hidden[t]` (the main model's final hidden state after
    /// `model.norm` at position `t`) with the embedding of `next_tokens[t]`
    /// (token `t + 1`) and gives the logits of token `t + 2`:
    /// `x = eh_proj([enorm(embed(next)) ‖ hnorm(hidden)])`, one decoder
    /// layer (causal over the MTP positions; the prefill path of the load
    /// options), `shared_head.head(shared_head.norm(·))`. The model's cache
    /// is untouched. Needs [`Model::load_mtp`].
    pub fn mtp_forward(&self, hidden: &HostTensor, next_tokens: &[u32]) -> Result<MtpOutput> {
        let mtp = self.mtp.as_ref().ok_or_else(|| {
            Error::invalid(
                OP,
                "mtp",
                "no multi-token-prediction layer loaded (load_mtp)",
            )
        })?;
        let d = self.dims.hidden;
        let s = hidden.shape();
        let t = next_tokens.len();
        if !hidden.dtype().is_float() || s.len() != 2 || s[1] != d || s[0] != t {
            return Err(Error::invalid(
                OP,
                "hidden",
                format!(
                    "must be a float [{t}, {d}] tensor (one row per next token), got {} {s:?}",
                    hidden.dtype()
                ),
            ));
        }
        self.check_tokens(next_tokens)?;
        self.check_positions(0, t)?;
        let cell = RefCell::new(Taps::new());
        let ctx = Ctx {
            taps: Some(&cell),
            li: mtp.index,
            ..self.ctx()
        };
        let b = self.b;
        let ids: Vec<i64> = next_tokens.iter().map(|&x| x as i64).collect();
        let ids = b.upload(&HostTensor::from_i64(&[t], &ids))?;
        let mut e = ctx.alloc(&[t, d])?;
        ops::run(
            b,
            Embedding {
                table: &self.embed,
                ids: &ids,
                out: &mut e,
            },
        )?;
        let en = ctx.norm(&e, &mtp.enorm)?;
        let h = b.upload(&hidden.to_dtype(ctx.act))?;
        let hn = ctx.norm(&h, &mtp.hnorm)?;
        let mut cat = ctx.alloc(&[t, 2 * d])?;
        ctx.copy(&en, &mut cat, (0, 0), (0, 0), (t, d))?;
        ctx.copy(&hn, &mut cat, (0, 0), (0, d), (t, d))?;
        let x = ctx.linear(&cat, &mtp.eh_proj)?;
        {
            let mut tp = cell.borrow_mut();
            tp.put(b, "mtp.embed_norm".into(), &en)?;
            tp.put(b, "mtp.hidden_norm".into(), &hn)?;
            tp.put(b, format!("layers.{}.input", mtp.index), &x)?;
        }
        let out = match self.opts.prefill {
            PrefillPath::Fused => self.decoder_layer(
                &ctx,
                &mtp.layer,
                &x,
                &self.step(0, t, None)?,
                AttnPath::Fused {
                    form: self.opts.form,
                    cache: None,
                    index: None,
                },
                false,
            )?,
            PrefillPath::Paged => {
                let blocks = t.div_ceil(CACHE_BLOCK);
                let dl = self.dims.dc + self.dims.dr;
                let mut scratch = ctx.alloc(&[blocks, CACHE_BLOCK, 1, dl])?;
                let mut index = self.scratch_index_cache(blocks)?;
                self.decoder_layer(
                    &ctx,
                    &mtp.layer,
                    &x,
                    &self.step(0, t, Some(blocks))?,
                    AttnPath::Paged {
                        cache: &mut scratch,
                        index: index.as_mut(),
                    },
                    false,
                )?
            }
        };
        let fnorm = ctx.norm(&out, &mtp.norm)?;
        let logits = ctx.gemm(&fnorm, &mtp.head)?;
        let logits = b.download(&logits)?.to_dtype(DType::F32);
        let mut taps = cell.into_inner();
        taps.put(b, "mtp.norm_out".into(), &fnorm)?;
        taps.tensors.insert("mtp.logits".into(), logits.clone());
        Ok(MtpOutput { logits, taps })
    }

    /// One decoder layer on `h` (the residual stream): attention, residual
    /// add, FFN, residual add; returns the new residual stream. The
    /// attention output, FFN output and routing go to `ctx`'s taps when it
    /// collects them. Every layer of the model, and the MTP layer, runs
    /// through here.
    fn decoder_layer(
        &self,
        ctx: &Ctx<'_>,
        layer: &Layer,
        h: &Tensor,
        step: &Step,
        path: AttnPath<'_>,
        masked: bool,
    ) -> Result<Tensor> {
        let b = self.b;
        let xn = ctx.norm(h, &layer.input_norm)?;
        let a = ctx.attention(&layer.attn, &xn, step, path)?;
        let hm = ctx.add(h, &a)?;
        let xn2 = ctx.norm(&hm, &layer.post_norm)?;
        let (f, routing) = ctx.ffn(self.comm.get(), &layer.ffn, &xn2, masked)?;
        let out = ctx.add(&hm, &f)?;
        if let Some(cell) = ctx.taps {
            let li = ctx.li;
            let mut tp = cell.borrow_mut();
            tp.put(b, format!("layers.{li}.attn_out"), &a)?;
            tp.put(b, format!("layers.{li}.ffn_out"), &f)?;
            if let Some((idx, w)) = routing {
                let r = Routing::sorted(&b.download(&idx)?, &b.download(&w)?)?;
                tp.tensors
                    .insert(format!("layers.{li}.topk_idx"), r.topk_idx);
                tp.tensors
                    .insert(format!("layers.{li}.topk_weights"), r.topk_weights);
            }
        }
        Ok(out)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn options(&self) -> LoadOptions {
        self.opts
    }
    pub fn backend(&self) -> &'b dyn Backend {
        self.b
    }
    /// Tokens in the latent cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    /// Forgets the cached sequence (the cache memory is kept).
    pub fn reset(&mut self) {
        self.seq_len = 0;
    }

    fn ctx(&self) -> Ctx<'b> {
        Ctx {
            b: self.b,
            act: self.opts.numerics.act_dtype(),
            scale_fmt: self.opts.scale_fmt,
            d: self.dims,
            taps: None,
            li: 0,
            views: self.views,
        }
    }

    /// Grows every layer's cache to hold `tokens` positions (doubling),
    /// keeping the cached sequence.
    fn ensure_capacity(&mut self, tokens: usize) -> Result<()> {
        let need = tokens.div_ceil(CACHE_BLOCK).max(1);
        if need <= self.blocks && self.caches.len() == self.layers.len() {
            return Ok(());
        }
        let blocks = need.max(2 * self.blocks);
        let ctx = self.ctx();
        let dl = self.dims.dc + self.dims.dr;
        let mut caches = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let mut c = ctx.alloc(&[blocks, CACHE_BLOCK, 1, dl])?;
            if self.seq_len > 0 {
                if let Some(old) = self.caches.get(li) {
                    ctx.copy(old, &mut c, (0, 0), (0, 0), (self.seq_len, dl))?;
                }
            }
            caches.push(c);
        }
        self.caches = caches;
        self.index_caches = self.grow_index_caches(blocks)?;
        self.blocks = blocks;
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid(OP, "tokens", "must not be empty"));
        }
        let v = self.cfg.vocab_size;
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, &x)| x as usize >= v) {
            return Err(Error::IndexOutOfRange {
                op: OP,
                arg: "tokens",
                position: vec![i],
                value: tok as i64,
                range: format!("[0, {v})"),
            });
        }
        Ok(())
    }

    /// Runs the prompt from position 0 (replacing any cached sequence) and
    /// returns the logits `[T, vocab]` as f32.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<HostTensor> {
        self.run_step(tokens, false, false, None)
    }

    /// [`Model::prefill`], filling `taps`.
    pub fn prefill_with_taps(&mut self, tokens: &[u32], taps: &mut Taps) -> Result<HostTensor> {
        self.run_step(tokens, false, false, Some(taps))
    }

    /// Appends one token to the cached sequence and returns its logits
    /// `[1, vocab]` as f32.
    pub fn decode(&mut self, token: u32) -> Result<HostTensor> {
        self.run_step(&[token], true, true, None)
    }

    /// [`Model::decode`], filling `taps`.
    pub fn decode_with_taps(&mut self, token: u32, taps: &mut Taps) -> Result<HostTensor> {
        self.run_step(&[token], true, true, Some(taps))
    }

    /// Appends several tokens at once through the paged-cache (decode)
    /// path, causal among themselves; returns their logits `[T, vocab]`.
    pub fn extend(&mut self, tokens: &[u32]) -> Result<HostTensor> {
        self.run_step(tokens, true, false, None)
    }

    /// Runs a prompt from position 0 in chunks of at most `chunk` tokens
    /// (chunked prefill): the first chunk as [`Model::prefill`] (the
    /// prefill path of the load options), every later one appended
    /// through the paged latent cache (causal `mla_decode` over everything
    /// cached so far). The cache is reserved for the whole prompt first, so
    /// memory grows with the cache, linearly in the prompt; attention
    /// scores are never `T × T`. With `all_logits` the logits of every
    /// position come back (`[T, vocab]`), else only the last (`[1, vocab]`).
    /// With `taps`, the taps of the chunks are concatenated along tokens.
    ///
    /// In f32 with [`PrefillPath::Paged`] the result equals a one-shot
    /// paged prefill bit for bit (every token's arithmetic is the same).
    pub fn prefill_chunked(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        all_logits: bool,
        mut taps: Option<&mut Taps>,
    ) -> Result<HostTensor> {
        if chunk == 0 {
            return Err(Error::invalid(OP, "chunk", "must be ≥ 1"));
        }
        self.check_tokens(tokens)?;
        self.check_positions(0, tokens.len())?;
        self.seq_len = 0;
        self.ensure_capacity(tokens.len())?;
        let vocab = self.cfg.vocab_size;
        let mut logits: Vec<u8> = Vec::new();
        let mut last = None;
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let mut ct = taps.as_ref().map(|_| Taps::new());
            let l = self.run_step(part, i > 0, false, ct.as_mut())?;
            if let (Some(tp), Some(ct)) = (taps.as_deref_mut(), ct) {
                tp.append(ct)?;
            }
            if all_logits {
                logits.extend_from_slice(l.bytes());
            }
            last = Some(l);
        }
        let last = last.ok_or_else(|| Error::invalid(OP, "tokens", "must not be empty"))?;
        if all_logits {
            return HostTensor::from_bytes(DType::F32, &[tokens.len(), vocab], logits);
        }
        let n = last.shape()[0];
        let bytes = last.bytes()[(n - 1) * vocab * 4..].to_vec();
        HostTensor::from_bytes(DType::F32, &[1, vocab], bytes)
    }

    /// The index tensors of a step of `t` tokens from `start`; with
    /// `blocks`, the block table (page `i` = block `i`) and sequence length
    /// of the paged path.
    fn step(&self, start: usize, t: usize, blocks: Option<usize>) -> Result<Step> {
        let pos: Vec<i64> = (start..start + t).map(|p| p as i64).collect();
        let positions = self.b.upload(&HostTensor::from_i64(&[t], &pos))?;
        let (block_table, seqlens) = match blocks {
            Some(nb) => {
                let table: Vec<i32> = (0..nb as i32).collect();
                (
                    Some(self.b.upload(&HostTensor::from_i32(&[1, nb], &table))?),
                    Some(
                        self.b
                            .upload(&HostTensor::from_i32(&[1], &[(start + t) as i32]))?,
                    ),
                )
            }
            None => (None, None),
        };
        Ok(Step {
            positions,
            start,
            block_table,
            seqlens,
        })
    }

    /// Checks that positions `[start, start + t)` exist in the model.
    fn check_positions(&self, start: usize, t: usize) -> Result<usize> {
        let max = self.cfg.max_position_embeddings;
        let total = start
            .checked_add(t)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or_else(|| Error::invalid(OP, "tokens", "sequence too long"))?;
        if total > max {
            return Err(Error::invalid(
                OP,
                "tokens",
                format!(
                    "the sequence would reach {total} tokens ({start} cached + {t} new), beyond \
                     the checkpoint's max_position_embeddings = {max}"
                ),
            ));
        }
        Ok(total)
    }

    /// Runs `tokens`: from position 0 (`append` false, replacing the cached
    /// sequence) or after the cached sequence (`append`, through the paged
    /// cache). `masked`: the MoE runs in the decode (masked) layout.
    fn run_step(
        &mut self,
        tokens: &[u32],
        append: bool,
        masked: bool,
        mut taps: Option<&mut Taps>,
    ) -> Result<HostTensor> {
        self.check_tokens(tokens)?;
        let t = tokens.len();
        let decode = append;
        let start = if decode { self.seq_len } else { 0 };
        let total = self.check_positions(start, t)?;
        if !decode {
            self.seq_len = 0;
        }
        self.ensure_capacity(total)?;
        let ctx = self.ctx();
        let b = self.b;
        let paged = decode || self.opts.prefill == PrefillPath::Paged;
        let step = self.step(start, t, paged.then_some(self.blocks))?;
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let ids = b.upload(&HostTensor::from_i64(&[t], &ids))?;
        let mut h = ctx.alloc(&[t, self.dims.hidden])?;
        ops::run(
            b,
            Embedding {
                table: &self.embed,
                ids: &ids,
                out: &mut h,
            },
        )?;
        let form = self.opts.form;
        let want = taps.is_some();
        let cell = RefCell::new(taps.as_deref_mut().map(std::mem::take).unwrap_or_default());
        let mut caches = std::mem::take(&mut self.caches);
        let mut index_caches = std::mem::take(&mut self.index_caches);
        let result = (|| -> Result<Tensor> {
            let mut index_iter = index_caches.iter_mut();
            for (li, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
                let index = index_iter.next();
                let lctx = Ctx {
                    taps: want.then_some(&cell),
                    li,
                    ..ctx
                };
                if want {
                    cell.borrow_mut().put(b, format!("layers.{li}.input"), &h)?;
                }
                let path = if paged {
                    AttnPath::Paged { cache, index }
                } else {
                    AttnPath::Fused {
                        form,
                        cache: Some(cache),
                        index,
                    }
                };
                h = self.decoder_layer(&lctx, layer, &h, &step, path, masked)?;
            }
            Ok(h)
        })();
        self.caches = caches;
        self.index_caches = index_caches;
        let h = result?;
        self.seq_len = total;
        let fnorm = ctx.norm(&h, &self.norm)?;
        if let Some(rows) = self.hidden.as_mut() {
            if !decode {
                rows.clear();
            }
            rows.extend_from_slice(b.download(&fnorm)?.bytes());
        }
        let logits = ctx.gemm(&fnorm, &self.lm_head)?;
        let out = b.download(&logits)?.to_dtype(DType::F32);
        if let Some(tp) = taps {
            *tp = cell.into_inner();
            tp.put(b, "final_norm_out".into(), &fnorm)?;
            tp.tensors.insert("logits".into(), out.clone());
        }
        Ok(out)
    }

    /// One layer, teacher forced: `input [T, hidden]` (any float dtype; it
    /// is converted to the mode's activation dtype) at positions `0..T`.
    /// The attention runs the prefill path (form of the load options) and
    /// leaves the cache alone. The FFN input is `input + attn_out`, where
    /// `attn_out` is `attn_teacher` when given (e.g. the golden attention
    /// output, so the FFN is judged on its own), else this layer's own
    /// attention output.
    pub fn layer_forward(
        &self,
        i: usize,
        input: &HostTensor,
        attn_teacher: Option<&HostTensor>,
    ) -> Result<LayerOutput> {
        let layer = self.layers.get(i).ok_or_else(|| {
            Error::invalid(
                OP,
                "layer",
                format!(
                    "index {i} out of range: the model has {} layers",
                    self.layers.len()
                ),
            )
        })?;
        let hidden = self.dims.hidden;
        let check = |arg: &'static str, x: &HostTensor| -> Result<usize> {
            let s = x.shape();
            if !x.dtype().is_float() || s.len() != 2 || s[1] != hidden || s[0] == 0 {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "must be a float [T, {hidden}] tensor with T ≥ 1, got {} {s:?}",
                        x.dtype()
                    ),
                ));
            }
            Ok(s[0])
        };
        let t = check("input", input)?;
        if let Some(a) = attn_teacher {
            if check("attn_teacher", a)? != t {
                return Err(Error::invalid(
                    OP,
                    "attn_teacher",
                    format!("has {:?} rows, input has {t}", a.shape()),
                ));
            }
        }
        let cell = RefCell::new(Taps::new());
        let ctx = Ctx {
            taps: Some(&cell),
            li: i,
            ..self.ctx()
        };
        let b = self.b;
        let act = ctx.act;
        let h = b.upload(&input.to_dtype(act))?;
        let xn = ctx.norm(&h, &layer.input_norm)?;
        let a = match self.opts.prefill {
            PrefillPath::Fused => ctx.attention(
                &layer.attn,
                &xn,
                &self.step(0, t, None)?,
                AttnPath::Fused {
                    form: self.opts.form,
                    cache: None,
                    index: None,
                },
            )?,
            PrefillPath::Paged => {
                // A scratch cache for this call; the model's cache is untouched.
                let blocks = t.div_ceil(CACHE_BLOCK);
                let dl = self.dims.dc + self.dims.dr;
                let mut scratch = ctx.alloc(&[blocks, CACHE_BLOCK, 1, dl])?;
                let mut index = self.scratch_index_cache(blocks)?;
                ctx.attention(
                    &layer.attn,
                    &xn,
                    &self.step(0, t, Some(blocks))?,
                    AttnPath::Paged {
                        cache: &mut scratch,
                        index: index.as_mut(),
                    },
                )?
            }
        };
        let hm = match attn_teacher {
            Some(at) => ctx.add(&h, &b.upload(&at.to_dtype(act))?)?,
            None => ctx.add(&h, &a)?,
        };
        let xn2 = ctx.norm(&hm, &layer.post_norm)?;
        let (f, routing) = ctx.ffn(self.comm.get(), &layer.ffn, &xn2, false)?;
        let routing = match routing {
            Some((idx, w)) => Some(Routing::sorted(&b.download(&idx)?, &b.download(&w)?)?),
            None => None,
        };
        Ok(LayerOutput {
            attn_out: b.download(&a)?.to_dtype(DType::F32),
            ffn_out: b.download(&f)?.to_dtype(DType::F32),
            routing,
            taps: cell.into_inner(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_backends_read_views_in_place() {
        assert!(reads_views(&deepport_cpu::CpuRef::new()));
        assert!(reads_views(&deepport_cpu::Cpu::new()));
    }
}
