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
//! Only the fused prefill runs V3.2; decode, the paged prefill and chunked
//! prefill beyond the first chunk answer an error naming what is missing
//! (an index-k cache kept across steps).

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

    /// The indexer's selection for a prefill from position 0 of `x [T,
    /// hidden]` (normalized layer input) and `qr [T, q_lora]`: `[T, 1,
    /// topk]` i32 token indices, −1 past `min(topk, i + 1)`.
    fn index_select(&self, ix: &Indexer, x: &Tensor, qr: &Tensor, step: &Step) -> Result<Tensor> {
        let (t, n, d) = (rows_of(x), ix.heads, ix.dim);
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
        let scores = if ix.fp8 {
            self.index_scores_fp8(ix, &q, &k, &w)?
        } else {
            self.index_scores_float(ix, &q, &k, &w)?
        };
        self.tap("index_score", &scores)?;
        let lens: Vec<i32> = (1..=t as i32).collect();
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
            let kk = ix.topk.min(t);
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

    /// f32/bf16 scores `[T, T]` f32: `Σ_h relu(q_h·k_j)·(w_h·d^-½)` in
    /// f64 from the mode's values, −inf for `j > i`.
    fn index_scores_float(
        &self,
        ix: &Indexer,
        q: &Tensor,
        k: &Tensor,
        w: &Tensor,
    ) -> Result<Tensor> {
        let (t, n, d) = (rows_of(k), ix.heads, ix.dim);
        let qv = self.b.download(q)?.to_f32_vec();
        let kv = self.b.download(k)?.to_f32_vec();
        let wv = self.b.download(w)?.to_f32_vec();
        let (hn, sd) = ((n as f64).powf(-0.5), (d as f64).powf(-0.5));
        let mut s = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            for j in 0..=i {
                let kj = &kv[j * d..(j + 1) * d];
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
                s[i * t + j] = acc as f32;
            }
        }
        self.b
            .upload(&HostTensor::from_f32(DType::F32, &[t, t], &s))
    }

    /// `x` rounded to the activation dtype (as f64).
    fn round_act(&self, x: f64) -> f64 {
        match self.act {
            DType::BF16 => f64::from(formats::round_bf16(x as f32)),
            _ => f64::from(x as f32),
        }
    }

    /// FP8 scores `[T, T]` f32 (the reference's FP8 path): q per head and
    /// k per token through `act_quant` (float scales), the weights
    /// `f32(w·n^-½)·q_scale·f32(d^-½)` in f32, then `indexer_logits` over a
    /// one-block index-k cache built from k's e4m3 bytes and scales.
    fn index_scores_fp8(&self, ix: &Indexer, q: &Tensor, k: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (t, n, d) = (rows_of(k), ix.heads, ix.dim);
        let quant = |x: &Tensor| -> Result<(Tensor, Tensor)> {
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
        };
        let (mut q8, qs) = quant(q)?;
        let (k8, ks) = quant(k)?;
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
        q8.reshape(&[1, t, n, d])?;
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

    /// Sparse MLA over this step's tokens (prefill from position 0): the
    /// indexer's selection, then `sparse_mla_prefill` on the absorbed
    /// query `[q_nope·W_UK ‖ q_pe]` and `[latent ‖ k_pe]`, then `W_UV`.
    /// `q [T, H·(dn + dr)]`, `q_pe [T, H, dr]` (roped) → `[T, H·dv]`.
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
        if step.start != 0 {
            return Err(Error::invalid(
                OP,
                "indexer",
                "DeepSeek-V3.2 sparse attention runs only a prefill from position 0 so far",
            ));
        }
        let idx = self.index_select(ix, x, qr, step)?;
        let mut qm = self.alloc(&[t, h * dl])?;
        for hh in 0..h {
            let qn = self.window(q, 0, hh * qk, t, dn)?;
            let ql = self.gemm(&qn, &a.w_uk_t[hh])?;
            self.copy(&ql, &mut qm, (0, 0), (0, hh * dl), (t, dc))?;
        }
        qm.reshape(&[t * h, dl])?;
        self.copy(q_pe, &mut qm, (0, 0), (0, dc), (t * h, dr))?;
        qm.reshape(&[t, h, dl])?;
        let mut kv = self.alloc(&[t, dl])?;
        self.copy(latent, &mut kv, (0, 0), (0, 0), (t, dc))?;
        self.copy(k_pe, &mut kv, (0, 0), (0, dc), (t, dr))?;
        kv.reshape(&[t, 1, dl])?;
        let mut out = self.alloc(&[t, h, dc])?;
        let mut max_logits = self.b.alloc(DType::F32, &[t, h])?;
        let mut lse = self.b.alloc(DType::F32, &[t, h])?;
        ops::run(
            self.b,
            SparseMlaPrefill {
                q: &qm,
                kv: &kv,
                indices: &idx,
                topk_length: None,
                attn_sink: None,
                out: &mut out,
                max_logits: &mut max_logits,
                lse: &mut lse,
                softmax_scale: self.d.softmax_scale,
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
