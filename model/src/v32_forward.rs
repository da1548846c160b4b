//! DeepSeek-V3.2's sparse attention in the forward pass (a child module of
//! [`crate::forward`]; `golden/README.md`, "DeepSeek-V3.2").
//!
//! Per layer, from the normalized layer input `x` and the attention's
//! query latent `qr = q_a_layernorm(q_a_proj(x))`, the lightning indexer
//! picks `index_topk` keys per query; MLA then attends only those
//! (`sparse_mla_prefill` over `[latent ‖ k_pe]`, the absorbed form):
//!
//! 1. `q = wq_b(qr)` per head `[n, d]`; `k = LayerNorm(wk(x))` with bias;
//! 2. RoPE `layout = half` (pairs `(i, i + 32)`) on the first
//!    `qk_rope_head_dim` dims of q and k, MLA's YaRN angles;
//! 3. the Hadamard rotation `·H/√d`: a GEMM with the ±1 matrix written in
//!    f32, then a GEMM with `diag(f32(d^-½))` rounding once to the
//!    activation dtype (so bf16 gets one rounding, as the golden does);
//! 4. `w = weights_proj(x)·n^-½`;
//! 5. scores over visible keys `j ≤ i`: fp8 mode quantizes q (per head)
//!    and k (per token) with `act_quant` (float scales) and runs
//!    `indexer_logits` over a one-block index-k cache; f32/bf16 score
//!    `Σ_h relu(q·k)·w·d^-½` in f64 on the host (no relu op exists);
//! 6. `indexer_topk` with `lengths = i + 1`: the selected slots, `−1` past
//!    `min(topk, i + 1)`, handed to `sparse_mla_prefill` as they are.
//!
//! LayerNorm has no op: `x − mean(x)` is a GEMM with the centering matrix
//! `I − 11ᵀ/d` (exact in bf16) written in f32, then `rms_norm` (which is
//! LayerNorm on centered rows) and `add` of the bias in f32, then one
//! rounding to the activation dtype (`copy_window`).
//!
//! Taps: `layers.{i}.index_q [T, n·d]`, `index_k [T, d]` (after RoPE and
//! Hadamard, before FP8), `index_score [T, T]` (−inf above the diagonal),
//! `index_topk` (i64 `[T, min(topk, T)]`, ascending, −1 last).
//!
//! # The index-k cache (decode, chunked and paged prefill)
//!
//! Each layer keeps, next to its latent cache, an index-k cache: the
//! indexer key of every cached position (after RoPE and Hadamard), `[blocks
//! · 64, d]` in the activation dtype, row `p` = position `p` (page `i` of
//! the sequence is block `i`, as for the latent cache). Every step writes
//! its keys there (`copy_window`); the fused prefill does too, so later
//! chunks and decode steps see the prompt's keys. A step at `start > 0`
//! (a later chunk, a decode step, or every step of the paged prefill)
//! scores its `t` queries against all `start + t` cached keys, causal
//! within the step (query `i` sees keys `j ≤ start + i`):
//!
//! * fp8: `cache_quant` (`index` layout, float scales) turns the cache
//!   into DeepGEMM's paged 132-byte/token FP8 form and `indexer_logits`
//!   reads it through the latent cache's block table, with `context_lens =
//!   start + t` (`next_n = t`: the causal window of each query);
//! * f32/bf16: the fused prefill's host scoring (f64, no relu op) over
//!   the downloaded cache rows `[0, start + t)`.
//!
//! `indexer_topk` (`lengths = start + i + 1`) picks the positions; they are
//! slots of the latent cache, which `sparse_mla_prefill` reads as its `kv`
//! (`[blocks·64, 1, 576]`, the bf16/f32 `[latent ‖ k_pe]` rows): the
//! golden (and DeepSeek's V3.2-Exp inference code, whose decode attends its
//! bf16 `kv_cache`/`pe_cache` under the index mask) never quantizes the
//! latent, so `sparse_mla_decode` over the FP8 latent cache would add an
//! FP8 rounding the reference does not have.
//!
//! The FP8 index keys of the cache come from `cache_quant` (`x · (1/s)`,
//! DeepGEMM's writer), those of the fused prefill's own one-block cache
//! from `act_quant` (`x / s`, the golden's and DeepSeek's step); the two
//! differ where `x/s` and `x·(1/s)` round to neighbouring e4m3 values: 12
//! of the golden prompt's 15360 index-key bytes, moving fp8 `index_score`
//! by ≤ 2.8e-2 and no selection (chunked fp8 gives the fused prefill's
//! logits bit for bit; `model/tests/v32_decode.rs`). Matching DeepSeek's
//! bytes exactly would take a `cache_quant` that divides, or a byte-window
//! copy of `act_quant`'s output. Without a byte-window copy op, the FP8
//! form is also rewritten whole (`O(cached · d)`) at each step from the
//! kept keys, below the `O(cached · heads · d)` of `indexer_logits`.

use super::*;
use deepport_core::formats;

/// One layer's lightning indexer, ready to run.
pub(super) struct Indexer {
    wq_b: Linear,
    wk: Linear,
    weights_proj: Linear,
    /// `k_norm.weight` `[d]` f32.
    k_norm_w: Tensor,
    /// `k_norm.bias` `[d]`, repeated per token at each step.
    k_norm_b: Vec<f32>,
    /// `I − 11ᵀ/d` `[d, d]` in the activation dtype (exact in bf16).
    center: Tensor,
    /// Sylvester's ±1 Hadamard matrix `[d, d]` in the activation dtype.
    hadamard: Tensor,
    /// `diag(f32(d^-½))` `[d, d]` f32.
    hscale: Tensor,
    heads: usize,
    dim: usize,
    topk: usize,
    /// FP8 scoring (`indexer_logits`) instead of float scoring.
    fp8: bool,
    /// A deliberate break of the index-k cache ([`IndexFault`]; tests only).
    pub(super) fault: IndexFault,
}

/// Ways to break the index-k cache on purpose, so that tests can show
/// that they notice ([`crate::forward::Model::break_index_cache`]). Never
/// set in normal use.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexFault {
    /// The correct behaviour.
    #[default]
    None,
    /// Steps after the first do not write their index keys into the cache
    /// (their positions keep stale or zero keys).
    SkipWrite,
    /// A step's queries rank only the step's own keys (keys cached by
    /// earlier steps are never selected).
    ChunkOnly,
}

/// Where sparse attention finds its keys.
pub(super) enum SparseKv<'c> {
    /// This step's own `[latent ‖ k_pe]` and index keys (a prefill from
    /// position 0); the index keys also go to the index-k cache when given.
    Own { index: Option<&'c mut Tensor> },
    /// The layer's caches: the latent cache `[blocks, 64, 1, 576]` (this
    /// step's rows already written) and the index-k cache `[blocks·64, d]`
    /// (written here).
    Cached {
        latent: &'c mut Tensor,
        index: &'c mut Tensor,
    },
}

/// `t [rows, n]` (2-D) widened to `width` columns with `fill` on the
/// right: the indexer's score and top-k taps of later chunks see more
/// keys, so [`crate::forward::Taps::append`] pads the earlier chunks'.
pub(super) fn pad_columns(t: &HostTensor, width: usize) -> Result<HostTensor> {
    let (rows, n) = match t.shape() {
        [r, n] if *n <= width => (*r, *n),
        s => {
            return Err(Error::Other(format!(
                "model: cannot pad a tap of shape {s:?} to {width} columns"
            )))
        }
    };
    if t.dtype() == DType::I64 {
        let v = t.to_i64_vec();
        let mut out = vec![-1i64; rows * width];
        for r in 0..rows {
            out[r * width..r * width + n].copy_from_slice(&v[r * n..(r + 1) * n]);
        }
        return Ok(HostTensor::from_i64(&[rows, width], &out));
    }
    let v = t.to_f32_vec();
    let mut out = vec![f32::NEG_INFINITY; rows * width];
    for r in 0..rows {
        out[r * width..r * width + n].copy_from_slice(&v[r * n..(r + 1) * n]);
    }
    Ok(HostTensor::from_f32(DType::F32, &[rows, width], &out))
}

/// Whether `name` is a tap [`pad_columns`] may widen between chunks.
pub(super) fn widens_between_chunks(name: &str) -> bool {
    name.ends_with(".index_score") || name.ends_with(".index_topk")
}

/// Sylvester's Hadamard matrix of order `n` (a power of two), row-major.
pub(super) fn hadamard(n: usize) -> Vec<f32> {
    let mut h = vec![1f32; 1];
    let mut m = 1;
    while m < n {
        let mut next = vec![0f32; 4 * m * m];
        for r in 0..m {
            for c in 0..m {
                let v = h[r * m + c];
                next[r * 2 * m + c] = v;
                next[r * 2 * m + c + m] = v;
                next[(r + m) * 2 * m + c] = v;
                next[(r + m) * 2 * m + c + m] = -v;
            }
        }
        h = next;
        m *= 2;
    }
    h
}

impl Loader<'_> {
    /// Layer `i`'s indexer when the config is V3.2's (`None` for V3).
    pub(super) fn indexer(&self, cfg: &ModelConfig, i: usize) -> Result<Option<Indexer>> {
        let Some(ix) = &cfg.indexer else {
            return Ok(None);
        };
        let q_lora = cfg.q_lora_rank.ok_or_else(|| {
            Error::invalid(
                OP,
                "q_lora_rank",
                "DeepSeek-V3.2's indexer reads the query latent: q_lora_rank must be set",
            )
        })?;
        let (n, d) = (ix.n_heads, ix.head_dim);
        if !d.is_power_of_two() || d < cfg.qk_rope_head_dim || d % QBLOCK != 0 {
            return Err(Error::invalid(
                OP,
                "index_head_dim",
                format!(
                    "must be a power of two, a multiple of {QBLOCK} and ≥ qk_rope_head_dim \
                     {} (the Hadamard rotation, FP8 groups and RoPE), got {d}",
                    cfg.qk_rope_head_dim
                ),
            ));
        }
        let p = format!("model.layers.{i}.self_attn.indexer");
        let vec_f32 = |name: &str| -> Result<HostTensor> {
            Ok(self
                .ckpt
                .get_checked(&format!("{p}.{name}"), FLOATS, &[d])?
                .to_dtype(DType::F32))
        };
        let k_norm_w = self.b.upload(&vec_f32("k_norm.weight")?)?;
        let k_norm_b = vec_f32("k_norm.bias")?.to_f32_vec();
        let mut center = vec![-1.0 / d as f32; d * d];
        for r in 0..d {
            center[r * d + r] += 1.0;
        }
        let mut hscale = vec![0f32; d * d];
        let s = (d as f64).powf(-0.5) as f32;
        for r in 0..d {
            hscale[r * d + r] = s;
        }
        Ok(Some(Indexer {
            wq_b: self.linear(&format!("{p}.wq_b"), n * d, q_lora)?,
            wk: self.linear(&format!("{p}.wk"), d, cfg.hidden_size)?,
            weights_proj: self.linear(&format!("{p}.weights_proj"), n, cfg.hidden_size)?,
            k_norm_w,
            k_norm_b,
            center: self
                .b
                .upload(&HostTensor::from_f32(self.act, &[d, d], &center))?,
            hadamard: self
                .b
                .upload(&HostTensor::from_f32(self.act, &[d, d], &hadamard(d)))?,
            hscale: self
                .b
                .upload(&HostTensor::from_f32(DType::F32, &[d, d], &hscale))?,
            heads: n,
            dim: d,
            topk: ix.topk,
            fp8: self.numerics == Numerics::Fp8,
            fault: IndexFault::None,
        }))
    }
}

impl Ctx<'_> {
    /// `a · bᵀ` with `d` in `dtype`.
    fn gemm_to(&self, a: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut d = self.b.alloc(dtype, &[rows_of(a), w.shape()[0]])?;
        ops::run(self.b, Gemm { a, b: w, d: &mut d })?;
        Ok(d)
    }

    /// RoPE `layout = half` on the first `qk_rope_head_dim` columns of
    /// `x [rows, d]` (rows = tokens × heads), in place.
    fn index_rope(&self, x: &mut Tensor, heads: usize, positions: &Tensor) -> Result<()> {
        let dr = self.d.dr;
        let rows = rows_of(x);
        let mut head = self.window(x, 0, 0, rows, dr)?;
        head.reshape(&[rows / heads, heads, dr])?;
        let mut y = self.alloc(head.shape())?;
        ops::run(
            self.b,
            Rope {
                x: &head,
                positions,
                y: &mut y,
                config: RopeConfig {
                    layout: RopeLayout::Half,
                    ..self.d.rope
                },
            },
        )?;
        drop(head);
        self.copy(&y, x, (0, 0), (0, 0), (rows, dr))
    }

    /// `x [rows, d] · H/√d`, rounded once to the activation dtype.
    fn index_hadamard(&self, ix: &Indexer, x: &Tensor) -> Result<Tensor> {
        let y = self.gemm_to(x, &ix.hadamard, DType::F32)?;
        self.gemm_to(&y, &ix.hscale, self.act)
    }

    /// `LayerNorm(x)` with `k_norm`'s weight and bias, `x [T, d]`.
    fn index_layer_norm(&self, ix: &Indexer, x: &Tensor) -> Result<Tensor> {
        let t = rows_of(x);
        let centered = self.gemm_to(x, &ix.center, DType::F32)?;
        let mut normed = self.b.alloc(DType::F32, &[t, ix.dim])?;
        ops::run(
            self.b,
            RmsNorm {
                x: &centered,
                weight: &ix.k_norm_w,
                y: &mut normed,
                eps: self.d.eps,
            },
        )?;
        let bias: Vec<f32> = (0..t).flat_map(|_| ix.k_norm_b.iter().copied()).collect();
        let bias = self
            .b
            .upload(&HostTensor::from_f32(DType::F32, &[t, ix.dim], &bias))?;
        let mut sum = self.b.alloc(DType::F32, &[t, ix.dim])?;
        ops::run(
            self.b,
            Add {
                a: &normed,
                b: &bias,
                out: &mut sum,
            },
        )?;
        let mut out = self.alloc(&[t, ix.dim])?;
        self.copy(&sum, &mut out, (0, 0), (0, 0), (t, ix.dim))?;
        Ok(out)
    }

    /// The indexer's selection for this step's `t` queries from `x [t,
    /// hidden]` (normalized layer input) and `qr [t, q_lora]`: `[t, 1,
    /// topk]` i32 key positions (slots of the latent cache when cached),
    /// −1 past `min(topk, start + i + 1)`.
    fn index_select(
        &self,
        ix: &Indexer,
        x: &Tensor,
        qr: &Tensor,
        step: &Step,
        kv: &mut SparseKv<'_>,
    ) -> Result<Tensor> {
        let (t, n, d) = (rows_of(x), ix.heads, ix.dim);
        let start = step.start;
        let total = start + t;
        let mut q = self.linear(qr, &ix.wq_b)?;
        q.reshape(&[t * n, d])?;
        self.index_rope(&mut q, n, &step.positions)?;
        let k_pre = self.linear(x, &ix.wk)?;
        let mut k = self.index_layer_norm(ix, &k_pre)?;
        self.index_rope(&mut k, 1, &step.positions)?;
        let q = self.index_hadamard(ix, &q)?;
        let k = self.index_hadamard(ix, &k)?;
        // index_q is judged flat: [T·n, d] holds the golden's [T, n·d].
        self.tap("index_q", &q)?;
        self.tap("index_k", &k)?;
        let w = self.linear(x, &ix.weights_proj)?;
        let scores = match kv {
            SparseKv::Own { index } => {
                if start != 0 {
                    return Err(Error::invalid(
                        OP,
                        "indexer",
                        "sparse attention over a step's own keys runs only from position 0",
                    ));
                }
                if let Some(index) = index {
                    self.copy(&k, index, (0, 0), (0, 0), (t, d))?;
                }
                if ix.fp8 {
                    self.index_scores_fp8(ix, &q, &k, &w)?
                } else {
                    let kv = self.b.download(&k)?.to_f32_vec();
                    self.index_scores_float(ix, &q, &kv, 0, &w)?
                }
            }
            SparseKv::Cached { index, .. } => {
                if ix.fault != IndexFault::SkipWrite || start == 0 {
                    self.copy(&k, index, (0, 0), (start, 0), (t, d))?;
                }
                if ix.fp8 {
                    self.index_scores_fp8_cached(ix, &q, index, &w, step)?
                } else {
                    let all = self.b.download(index)?.to_f32_vec();
                    self.index_scores_float(ix, &q, &all[..total * d], start, &w)?
                }
            }
        };
        let scores = if ix.fault == IndexFault::ChunkOnly && start > 0 {
            // The deliberate break: keys before this step are never ranked.
            let mut s = self.b.download(&scores)?.to_f32_vec();
            for row in s.chunks_mut(total) {
                row[..start].fill(f32::NEG_INFINITY);
            }
            self.b
                .upload(&HostTensor::from_f32(DType::F32, &[t, total], &s))?
        } else {
            scores
        };
        self.tap("index_score", &scores)?;
        let lens: Vec<i32> = (start as i32 + 1..=total as i32).collect();
        let lengths = self.b.upload(&HostTensor::from_i32(&[t], &lens))?;
        let mut idx = self.b.alloc(DType::I32, &[t, ix.topk])?;
        ops::run(
            self.b,
            IndexerTopk {
                logits: &scores,
                lengths: &lengths,
                indices: &mut idx,
            },
        )?;
        if let Some(cell) = self.taps {
            let kk = ix.topk.min(total);
            let all = self.b.download(&idx)?.to_i64_vec();
            let mut rows = Vec::with_capacity(t * kk);
            for r in all.chunks(ix.topk) {
                let mut sel: Vec<i64> = r.iter().copied().filter(|&v| v >= 0).collect();
                sel.sort_unstable();
                sel.resize(kk, -1);
                rows.extend(sel);
            }
            cell.borrow_mut().tensors.insert(
                format!("layers.{}.index_topk", self.li),
                HostTensor::from_i64(&[t, kk], &rows),
            );
        }
        idx.reshape(&[t, 1, ix.topk])?;
        Ok(idx)
    }

    /// f32/bf16 scores `[t, start + t]` f32 of the queries `q [t·n, d]`
    /// against the keys `keys` (`start + t` rows of `d`, the mode's
    /// values): `Σ_h relu(q_h·k_j)·(w_h·d^-½)` in f64 on the host, −inf for
    /// `j > start + i`.
    fn index_scores_float(
        &self,
        ix: &Indexer,
        q: &Tensor,
        keys: &[f32],
        start: usize,
        w: &Tensor,
    ) -> Result<Tensor> {
        let (n, d) = (ix.heads, ix.dim);
        let t = rows_of(q) / n;
        let total = start + t;
        let qv = self.b.download(q)?.to_f32_vec();
        let wv = self.b.download(w)?.to_f32_vec();
        let (hn, sd) = ((n as f64).powf(-0.5), (d as f64).powf(-0.5));
        let mut s = vec![f32::NEG_INFINITY; t * total];
        for i in 0..t {
            for j in 0..=start + i {
                let kj = &keys[j * d..(j + 1) * d];
                let mut acc = 0f64;
                for h in 0..n {
                    let qh = &qv[(i * n + h) * d..(i * n + h + 1) * d];
                    let dot: f64 = qh
                        .iter()
                        .zip(kj)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    // w = weights_proj(x)·n^-½: exact for a power-of-two n,
                    // otherwise rounded to the activation dtype as the
                    // golden does.
                    let wh = self.round_act(f64::from(wv[i * n + h]) * hn);
                    acc += dot.max(0.0) * (wh * sd);
                }
                s[i * total + j] = acc as f32;
            }
        }
        self.b
            .upload(&HostTensor::from_f32(DType::F32, &[t, total], &s))
    }

    /// `x` rounded to the activation dtype (as f64).
    fn round_act(&self, x: f64) -> f64 {
        match self.act {
            DType::BF16 => f64::from(formats::round_bf16(x as f32)),
            _ => f64::from(x as f32),
        }
    }

    /// `act_quant` with float scales of `x [rows, d]`: e4m3 bytes and the
    /// per-row scale (one 128-group per row for `d = 128`).
    fn index_quant(&self, x: &Tensor, d: usize) -> Result<(Tensor, Tensor)> {
        let rows = rows_of(x);
        let mut q8 = self.b.alloc(DType::F8E4M3, &[rows, d])?;
        let mut s = self.b.alloc(DType::F32, &[rows, d / QBLOCK])?;
        ops::run(
            self.b,
            ActQuant {
                x,
                q: &mut q8,
                s: &mut s,
                scale_fmt: ScaleFmt::Float,
            },
        )?;
        Ok((q8, s))
    }

    /// The FP8 queries `[1, t, n, d]` of `q [t·n, d]` and the per-head
    /// weights `[t, n]` f32 `f32(w·n^-½)·q_scale·f32(d^-½)` (the
    /// reference's FP8 path).
    fn index_fp8_queries(&self, ix: &Indexer, q: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, d) = (ix.heads, ix.dim);
        let t = rows_of(q) / n;
        let (mut q8, qs) = self.index_quant(q, d)?;
        let qs = self.b.download(&qs)?.to_f32_vec();
        let wv = self.b.download(w)?.to_f32_vec();
        let (hn, sd) = ((n as f64).powf(-0.5), (d as f64).powf(-0.5) as f32);
        let groups = d / QBLOCK;
        let weights: Vec<f32> = (0..t * n)
            .map(|r| {
                let wh = self.round_act(f64::from(wv[r]) * hn) as f32;
                (wh * qs[r * groups]) * sd
            })
            .collect();
        let weights = self
            .b
            .upload(&HostTensor::from_f32(DType::F32, &[t, n], &weights))?;
        q8.reshape(&[1, t, n, d])?;
        Ok((q8, weights))
    }

    /// FP8 scores `[T, T]` f32 of a prefill from position 0 (the
    /// reference's FP8 path): q per head and k per token through
    /// `act_quant` (float scales), then `indexer_logits` over a one-block
    /// index-k cache built from k's e4m3 bytes and scales.
    fn index_scores_fp8(&self, ix: &Indexer, q: &Tensor, k: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (t, d) = (rows_of(k), ix.dim);
        let (q8, weights) = self.index_fp8_queries(ix, q, w)?;
        let (k8, ks) = self.index_quant(k, d)?;
        let groups = d / QBLOCK;
        // One block of T tokens: T·d e4m3 bytes, then T f32 scales.
        let mut cache = self.b.download(&k8)?.into_bytes();
        let ks = self.b.download(&ks)?.to_f32_vec();
        for r in 0..t {
            cache.extend_from_slice(&ks[r * groups].to_le_bytes());
        }
        let cache = self
            .b
            .upload(&HostTensor::from_bytes(DType::U8, &[1, t, d + 4], cache)?)?;
        let lens = self.b.upload(&HostTensor::from_i32(&[1], &[t as i32]))?;
        let table = self.b.upload(&HostTensor::from_i32(&[1, 1], &[0]))?;
        let mut logits = self.b.alloc(DType::F32, &[t, t])?;
        ops::run(
            self.b,
            IndexerLogits {
                q: &q8,
                weights: &weights,
                kv_cache: &cache,
                context_lens: &lens,
                block_table: &table,
                logits: &mut logits,
            },
        )?;
        Ok(logits)
    }

    /// FP8 scores `[t, start + t]` f32 over the index-k cache `index
    /// [blocks·64, d]`: `cache_quant` writes its paged FP8 form (132 bytes
    /// per token for d = 128), `indexer_logits` reads it through the
    /// step's block table with `context_lens = start + t`.
    fn index_scores_fp8_cached(
        &self,
        ix: &Indexer,
        q: &Tensor,
        index: &mut Tensor,
        w: &Tensor,
        step: &Step,
    ) -> Result<Tensor> {
        let d = ix.dim;
        let t = rows_of(q) / ix.heads;
        let total = step.start + t;
        let (Some(block_table), Some(seqlens)) = (&step.block_table, &step.seqlens) else {
            return Err(Error::Other(
                "model: cached sparse attention without a block table".into(),
            ));
        };
        let (q8, weights) = self.index_fp8_queries(ix, q, w)?;
        let blocks = rows_of(index) / CACHE_BLOCK;
        let mut fp8 = self.b.alloc(DType::U8, &[blocks, CACHE_BLOCK, d + 4])?;
        index.reshape(&[blocks, CACHE_BLOCK, d])?;
        let quant = ops::run(
            self.b,
            CacheQuant {
                x: index,
                cache: &mut fp8,
                layout: CacheLayout::Index,
                ue8m0: false,
            },
        );
        index.reshape(&[blocks * CACHE_BLOCK, d])?;
        quant?;
        let mut logits = self.b.alloc(DType::F32, &[t, total])?;
        ops::run(
            self.b,
            IndexerLogits {
                q: &q8,
                weights: &weights,
                kv_cache: &fp8,
                context_lens: seqlens,
                block_table,
                logits: &mut logits,
            },
        )?;
        Ok(logits)
    }

    /// Sparse MLA of this step: the indexer's selection, then
    /// `sparse_mla_prefill` on the absorbed query `[q_nope·W_UK ‖ q_pe]`
    /// over `[latent ‖ k_pe]` (this step's own rows, or every row of the
    /// latent cache), then `W_UV`. `q [T, H·(dn + dr)]`, `q_pe [T, H, dr]`
    /// (roped) → `[T, H·dv]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sparse_attention(
        &self,
        a: &Attention,
        ix: &Indexer,
        x: &Tensor,
        qr: &Tensor,
        q: &Tensor,
        q_pe: &Tensor,
        latent: &Tensor,
        k_pe: &Tensor,
        step: &Step,
        mut kv: SparseKv<'_>,
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
        let (qk, dl) = (dn + dr, dc + dr);
        let idx = self.index_select(ix, x, qr, step, &mut kv)?;
        let mut qm = self.alloc(&[t, h * dl])?;
        for hh in 0..h {
            let qn = self.window(q, 0, hh * qk, t, dn)?;
            let ql = self.gemm(&qn, &a.w_uk_t[hh])?;
            self.copy(&ql, &mut qm, (0, 0), (0, hh * dl), (t, dc))?;
        }
        qm.reshape(&[t * h, dl])?;
        self.copy(q_pe, &mut qm, (0, 0), (0, dc), (t * h, dr))?;
        qm.reshape(&[t, h, dl])?;
        let mut out = self.alloc(&[t, h, dc])?;
        let mut max_logits = self.b.alloc(DType::F32, &[t, h])?;
        let mut lse = self.b.alloc(DType::F32, &[t, h])?;
        let mut attend = |kv: &Tensor| -> Result<()> {
            ops::run(
                self.b,
                SparseMlaPrefill {
                    q: &qm,
                    kv,
                    indices: &idx,
                    topk_length: None,
                    attn_sink: None,
                    out: &mut out,
                    max_logits: &mut max_logits,
                    lse: &mut lse,
                    softmax_scale: self.d.softmax_scale,
                },
            )
        };
        match kv {
            SparseKv::Own { .. } => {
                let mut own = self.alloc(&[t, dl])?;
                self.copy(latent, &mut own, (0, 0), (0, 0), (t, dc))?;
                self.copy(k_pe, &mut own, (0, 0), (0, dc), (t, dr))?;
                own.reshape(&[t, 1, dl])?;
                attend(&own)?;
            }
            SparseKv::Cached { latent: cache, .. } => {
                // The cache [blocks, 64, 1, dl] as FlashMLA's kv [slots, 1,
                // dl]: slot p = position p (page i is block i).
                let shape = cache.shape().to_vec();
                let slots = rows_of(cache);
                cache.reshape(&[slots, 1, dl])?;
                let r = attend(&*cache);
                cache.reshape(&shape)?;
                r?;
            }
        }
        out.reshape(&[t, h * dc])?;
        let mut o = self.alloc(&[t, h * dv])?;
        for hh in 0..h {
            let ol = self.window(&out, 0, hh * dc, t, dc)?;
            let oh = self.gemm(&ol, &a.w_uv[hh])?;
            self.copy(&oh, &mut o, (0, 0), (0, hh * dv), (t, dv))?;
        }
        Ok(o)
    }
}

impl Model<'_> {
    /// DeepSeek-V3.2's index-k caches at `blocks` blocks: zeros (finite, for
    /// `cache_quant`), the cached sequence's rows copied over.
    pub(super) fn grow_index_caches(&self, blocks: usize) -> Result<Vec<Tensor>> {
        let Some(ix) = &self.cfg.indexer else {
            return Ok(Vec::new());
        };
        let (ctx, d) = (self.ctx(), ix.head_dim);
        let zeros = HostTensor::from_f32(
            ctx.act,
            &[blocks * CACHE_BLOCK, d],
            &vec![0f32; blocks * CACHE_BLOCK * d],
        );
        let mut out = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let mut c = self.b.upload(&zeros)?;
            if self.seq_len > 0 {
                if let Some(old) = self.index_caches.get(li) {
                    ctx.copy(old, &mut c, (0, 0), (0, 0), (self.seq_len, d))?;
                }
            }
            out.push(c);
        }
        Ok(out)
    }

    /// A zeroed index-k cache of `blocks` blocks for one call (V3.2; `None`
    /// for V3).
    pub(super) fn scratch_index_cache(&self, blocks: usize) -> Result<Option<Tensor>> {
        let Some(ix) = &self.cfg.indexer else {
            return Ok(None);
        };
        let n = blocks * CACHE_BLOCK;
        let zeros = HostTensor::from_f32(
            self.ctx().act,
            &[n, ix.head_dim],
            &vec![0f32; n * ix.head_dim],
        );
        Ok(Some(self.b.upload(&zeros)?))
    }

    /// Breaks DeepSeek-V3.2's index-k cache on purpose ([`IndexFault`]),
    /// so that tests can show they notice; `IndexFault::None` restores it.
    #[doc(hidden)]
    pub fn break_index_cache(&mut self, fault: IndexFault) {
        for l in &mut self.layers {
            if let Some(ix) = &mut l.attn.indexer {
                ix.fault = fault;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hadamard;

    #[test]
    fn hadamard_rows_are_orthogonal() {
        let n = 8;
        let h = hadamard(n);
        for a in 0..n {
            for b in 0..n {
                let dot: f32 = (0..n).map(|c| h[a * n + c] * h[b * n + c]).sum();
                assert_eq!(dot, if a == b { n as f32 } else { 0.0 });
            }
        }
        assert_eq!(&h[..n], &[1.0; 8]);
        assert_eq!(h[n + 1], -1.0);
    }
}
