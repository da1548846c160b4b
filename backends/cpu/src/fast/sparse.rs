//! DeepSeek-V3.2 sparse attention, fast path (docs/spec-v32.md §9).
//!
//! * `sparse_mla_decode` / `sparse_mla_prefill`: one work item is a query
//!   row `(b, s)` (or a split of its selected slots, when there are too few
//!   rows for the threads). It gathers its valid slots in chunks of [`TC`]
//!   tokens, dequantizes each selected key once into an f32 panel (FP8
//!   latent: `e4m3 · scale` per 128 channels, rope from bf16; prefill: the
//!   kv row), computes the scores of **every** head against the chunk with
//!   the SIMD micro-kernel (`Sᵀ = K · Qᵀ`, f32 sums), an online softmax in
//!   f32 (running max and sum per head), then `O += P · V` with V read in
//!   place from the key panel (its first 512 channels). Splits are combined
//!   `lse`-weighted; the sink factor and `lse` in f64 at the end.
//!   The slot checks and the invalid-slot rules are `cpu-ref`'s own
//!   ([`sparse_indices`], [`prefill_indices`]), run before any read.
//! * `indexer_logits`: work items are (query row, 1024 columns); keys
//!   decoded per micro-tile, `q·k` for all heads with the micro-kernel
//!   (e4m3 products are exact in f32, f32 sums), `Σ_h relu(·)·w_h · s` in
//!   f64 with one rounding.
//! * `indexer_topk`: rows in parallel, a partial selection of the top `k`
//!   then a sort of those `k`, both in `cpu-ref`'s total order
//!   ([`topk_order`]): the same indices, bit for bit.
//! * `cache_quant`: blocks in parallel through `cpu-ref`'s token writer
//!   ([`quant_token`]): the same bytes.

use super::mla::exp_nonpos;
use super::simd::{Simd, Tile, MR_MAX, NR_MAX};
use super::{bytes_mut_of, bytes_of, current_simd, encode_into, f32_values};
use crate::scalar::sparse::{
    check_keys, logits_indices, prefill_indices, quant_token, sparse_indices, store_bytes,
    topk_lengths, topk_order,
};
use crate::util::put_i64;
use deepport_core::ops::*;
use deepport_core::{DType, Result};
use rayon::prelude::*;

/// Tokens per chunk of the attention kernel (the `P·V` product's K).
const TC: usize = 64;

/// Columns of one `indexer_logits` work item.
const LOGIT_COLS: usize = 1024;

fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// ---- the attention kernel shared by decode and prefill ------------------------

/// The running softmax state of one work item, per head.
struct Partial {
    /// Running max of the scaled scores (−inf: nothing seen).
    m: Vec<f32>,
    /// Running sum of `exp(score − m)`.
    l: Vec<f32>,
    /// Unnormalized output `[heads][512]`.
    o: Vec<f32>,
    /// A NaN score was seen (the reference's softmax gives NaN then).
    nan: Vec<bool>,
}

/// The shape of one attention problem.
struct Attn {
    simd: Simd,
    /// Channels of q and of a key (576, or 512 for a prefill with K = V).
    d: usize,
    heads: usize,
    scale: f32,
}

/// The online-softmax update of one head's chunk of scores: new running
/// max, rescale of `o`, and the probabilities in place.
#[inline]
fn softmax_step(m: &mut f32, l: &mut f32, nan: &mut bool, o: &mut [f32], row: &mut [f32]) {
    let mut mx = f32::NEG_INFINITY;
    for &v in row.iter() {
        *nan |= v.is_nan();
        mx = mx.max(v);
    }
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let m_new = m.max(mx);
    let alpha = exp_nonpos(*m - m_new);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp_nonpos(*v - m_new);
        sum += *v;
    }
    if alpha != 1.0 {
        for x in o.iter_mut() {
            *x *= alpha;
        }
    }
    *l = *l * alpha + sum;
    *m = m_new;
}

/// Attention of the `heads` query rows `q` (`heads·d` values) over the
/// keys `slots` (in order; `fill(slot, row)` writes a key's `d` values).
fn attend(
    at: &Attn,
    q: &[f32],
    slots: &[usize],
    fill: &(impl Fn(usize, &mut [f32]) + Sync),
) -> Partial {
    let Attn {
        simd,
        d,
        heads,
        scale,
    } = *at;
    let (mr, nr) = (simd.mr(), simd.nr());
    let dv = V32_NOPE;
    let mut part = Partial {
        m: vec![f32::NEG_INFINITY; heads],
        l: vec![0f32; heads],
        o: vec![0f32; heads * dv],
        nan: vec![false; heads],
    };
    if slots.is_empty() {
        return part;
    }
    // Q packed as panels [d][nr] over the heads.
    let qpanels = heads.div_ceil(nr);
    let mut qp = vec![0f32; qpanels * d * nr];
    for h in 0..heads {
        let panel = &mut qp[(h / nr) * d * nr..][..d * nr];
        for (k, &v) in q[h * d..(h + 1) * d].iter().enumerate() {
            panel[k * nr + h % nr] = v;
        }
    }
    let mut kbuf = vec![0f32; TC * d];
    let mut scores = vec![0f32; heads * TC];
    let zeros = vec![0f32; d.max(TC)];
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];

    for chunk in slots.chunks(TC) {
        let tn = chunk.len();
        for (t, &slot) in chunk.iter().enumerate() {
            fill(slot, &mut kbuf[t * d..(t + 1) * d]);
        }
        // Sᵀ[t][h] = K[t]·Q[h], stored as S[h][t] (row stride TC).
        for tm in (0..tn).step_by(mr) {
            let a: [&[f32]; MR_MAX] = std::array::from_fn(|i| {
                if i < mr && tm + i < tn {
                    &kbuf[(tm + i) * d..(tm + i + 1) * d]
                } else {
                    &zeros[..d]
                }
            });
            for qpn in 0..qpanels {
                simd.tile(d, &a, &qp[qpn * d * nr..][..d * nr], nr, &mut tile);
                for (i, trow) in tile.iter().enumerate().take(mr.min(tn - tm)) {
                    for (j, &v) in trow.iter().enumerate().take(nr.min(heads - qpn * nr)) {
                        scores[(qpn * nr + j) * TC + tm + i] = v * scale;
                    }
                }
            }
        }
        for h in 0..heads {
            softmax_step(
                &mut part.m[h],
                &mut part.l[h],
                &mut part.nan[h],
                &mut part.o[h * dv..(h + 1) * dv],
                &mut scores[h * TC..h * TC + tn],
            );
        }
        // O[h] += P[h]·V, V = the first 512 channels of the key panel,
        // read in place (row stride d).
        for h0 in (0..heads).step_by(mr) {
            let a: [&[f32]; MR_MAX] = std::array::from_fn(|i| {
                if i < mr && h0 + i < heads {
                    &scores[(h0 + i) * TC..(h0 + i) * TC + tn]
                } else {
                    &zeros[..tn]
                }
            });
            for c0 in (0..dv).step_by(nr) {
                simd.tile(tn, &a, &kbuf[c0..], d, &mut tile);
                for (i, trow) in tile.iter().enumerate().take(mr.min(heads - h0)) {
                    let o = &mut part.o[(h0 + i) * dv + c0..][..nr];
                    for (x, &t) in o.iter_mut().zip(&trow[..nr]) {
                        *x += t;
                    }
                }
            }
        }
    }
    part
}

/// The attention of every item (query row): `keys[it]` its valid slots in
/// order, `q_of(it)` its `heads·d` query values. Returns `out
/// [items][heads][512]` (normalized, before the sink), `lse` and the max
/// score `[items][heads]` in f64 (empty rows: 0, +inf, −inf; a NaN score:
/// NaN out and lse).
fn attention<'q>(
    at: &Attn,
    keys: &[Vec<usize>],
    q_of: &(impl Fn(usize) -> &'q [f32] + Sync),
    fill: &(impl Fn(usize, &mut [f32]) + Sync),
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let (heads, dv) = (at.heads, V32_NOPE);
    let items = keys.len();
    // Enough work for every thread: split an item's slots when the items
    // alone are too few.
    let threads = rayon::current_num_threads();
    let max_chunks = keys.iter().map(|k| k.len().div_ceil(TC)).max().unwrap_or(0);
    let splits = if items >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(items.max(1))
            .clamp(1, max_chunks.max(1))
    };
    let parts: Vec<Partial> = (0..items * splits)
        .into_par_iter()
        .map(|w| {
            let (it, s) = (w / splits, w % splits);
            let k = &keys[it];
            // Whole chunks per split.
            let nc = k.len().div_ceil(TC);
            let (c0, c1) = (s * nc / splits, (s + 1) * nc / splits);
            let range = (c0 * TC).min(k.len())..(c1 * TC).min(k.len());
            attend(at, q_of(it), &k[range], fill)
        })
        .collect();

    let mut out = vec![0f32; items * heads * dv];
    let mut lse = vec![0f64; items * heads];
    let mut maxl = vec![0f64; items * heads];
    out.par_chunks_mut((heads * dv).max(1))
        .zip(lse.par_chunks_mut(heads.max(1)))
        .zip(maxl.par_chunks_mut(heads.max(1)))
        .zip(parts.par_chunks(splits))
        .for_each(|(((o, lse), maxl), chunk)| {
            for h in 0..heads {
                let m = chunk
                    .iter()
                    .map(|p| p.m[h])
                    .fold(f32::NEG_INFINITY, f32::max);
                maxl[h] = f64::from(m);
                let o = &mut o[h * dv..(h + 1) * dv];
                if chunk.iter().any(|p| p.nan[h]) {
                    // A NaN score: the reference's softmax is NaN throughout.
                    o.fill(f32::NAN);
                    lse[h] = f64::NAN;
                    continue;
                }
                if m == f32::NEG_INFINITY {
                    lse[h] = f64::INFINITY;
                    continue;
                }
                let mut l = 0f32;
                for p in chunk {
                    if p.m[h] == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = exp_nonpos(p.m[h] - m);
                    l += p.l[h] * w;
                    for (x, &y) in o.iter_mut().zip(&p.o[h * dv..(h + 1) * dv]) {
                        *x += y * w;
                    }
                }
                let inv = 1.0 / l;
                for x in o.iter_mut() {
                    *x *= inv;
                }
                lse[h] = f64::from(m) + f64::from(l).ln();
            }
        });
    (out, lse, maxl)
}

/// Multiplies each head's output by the sink factor `1/(1 + exp(sink_h −
/// lse))` (`out [items][heads][512]`, `lse [items][heads]`).
fn apply_sink(out: &mut [f32], lse: &[f64], sink: &[f32], heads: usize) {
    out.par_chunks_mut(V32_NOPE)
        .zip(lse.par_iter())
        .enumerate()
        .for_each(|(r, (o, &l))| {
            if !l.is_finite() {
                // No valid slot (out = 0) or a NaN row: the sink changes nothing.
                return;
            }
            let f = 1.0 / (1.0 + (f64::from(sink[r % heads]) - l).exp());
            for x in o {
                *x = (f64::from(*x) * f) as f32;
            }
        });
}

/// One token of the V3.2 latent cache dequantized into `row` (576 values):
/// `e4m3 · scale` per 128 channels, then the 64 bf16 rope values.
fn latent_row(simd: Simd, cache: &[u8], slot: usize, row: &mut [f32]) {
    let t = &cache[slot * V32_TOKEN_BYTES..(slot + 1) * V32_TOKEN_BYTES];
    simd.decode_e4m3fn(&t[..V32_NOPE], &mut row[..V32_NOPE]);
    for g in 0..V32_NOPE / QBLOCK {
        let s = le_f32(t, V32_NOPE + 4 * g);
        for v in &mut row[g * QBLOCK..(g + 1) * QBLOCK] {
            *v *= s;
        }
    }
    let rope = V32_NOPE + 4 * (V32_NOPE / QBLOCK);
    for (i, v) in row[V32_NOPE..V32_D].iter_mut().enumerate() {
        let bits = u16::from_le_bytes([t[rope + 2 * i], t[rope + 2 * i + 1]]);
        *v = f32::from_bits((bits as u32) << 16);
    }
}

/// The valid slots of each row of `idx` (`[items][topk]`, −1 = invalid).
fn valid_slots(idx: &[i64], items: usize, topk: usize) -> Vec<Vec<usize>> {
    (0..items)
        .map(|it| {
            idx[it * topk..(it + 1) * topk]
                .iter()
                .filter(|&&v| v >= 0)
                .map(|&v| v as usize)
                .collect()
        })
        .collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

// ---- §9.3 sparse_mla_decode ------------------------------------------------------

pub(crate) fn sparse_mla_decode(op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let dims = dims.clone();
    // Index and topk_length checks come before any read of the cache.
    let idx = sparse_indices(a, &dims)?;
    let (batch, s_q, h_q, topk) = (dims.batch, dims.s_q, dims.h_q, dims.topk);
    let q = f32_values(a.q)?;
    let sink = match a.attn_sink {
        Some(t) => Some(f32_values(t)?),
        None => None,
    };
    let cache = bytes_of(a.kcache)?;
    let simd = current_simd();
    let items = batch * s_q;
    let keys = valid_slots(&idx, items, topk);
    let at = Attn {
        simd,
        d: V32_D,
        heads: h_q,
        scale: a.softmax_scale,
    };
    let q: &[f32] = &q;
    let (mut out, lse, _) = attention(
        &at,
        &keys,
        &|it| &q[it * h_q * V32_D..(it + 1) * h_q * V32_D],
        &|slot, row| latent_row(simd, cache, slot, row),
    );
    if let Some(s) = &sink {
        apply_sink(&mut out, &lse, s, h_q);
    }
    // lse [b, h_q, s_q] from [b, s_q, h_q].
    let mut lse_t = vec![0f32; items * h_q];
    for b in 0..batch {
        for s in 0..s_q {
            for h in 0..h_q {
                lse_t[(b * h_q + h) * s_q + s] = lse[(b * s_q + s) * h_q + h] as f32;
            }
        }
    }
    let odt = a.out.dtype();
    encode_into(odt, &out, bytes_mut_of(a.out)?);
    let ldt = a.lse.dtype();
    encode_into(ldt, &lse_t, bytes_mut_of(a.lse)?);
    Ok(())
}

// ---- §9.7 sparse_mla_prefill ------------------------------------------------------

pub(crate) fn sparse_mla_prefill(op: &mut Checked<SparseMlaPrefill<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let dims = dims.clone();
    // topk_length is checked, and every invalid slot set to −1, first.
    let idx = prefill_indices(a, &dims)?;
    let (s_q, h_q, dq, topk) = (dims.s_q, dims.h_q, dims.d_qk, dims.topk);
    let q = f32_values(a.q)?;
    let kv = f32_values(a.kv)?;
    let sink = match a.attn_sink {
        Some(t) => Some(f32_values(t)?),
        None => None,
    };
    let keys = valid_slots(&idx, s_q, topk);
    let at = Attn {
        simd: current_simd(),
        d: dq,
        heads: h_q,
        scale: a.softmax_scale,
    };
    let (q, kv): (&[f32], &[f32]) = (&q, &kv);
    let (mut out, lse, maxl) = attention(
        &at,
        &keys,
        &|s| &q[s * h_q * dq..(s + 1) * h_q * dq],
        &|t, row| row.copy_from_slice(&kv[t * dq..(t + 1) * dq]),
    );
    if let Some(s) = &sink {
        apply_sink(&mut out, &lse, s, h_q);
    }
    let odt = a.out.dtype();
    encode_into(odt, &out, bytes_mut_of(a.out)?);
    let mdt = a.max_logits.dtype();
    encode_into(mdt, &to_f32(&maxl), bytes_mut_of(a.max_logits)?);
    let ldt = a.lse.dtype();
    encode_into(ldt, &to_f32(&lse), bytes_mut_of(a.lse)?);
    Ok(())
}

// ---- §9.1 indexer_logits ------------------------------------------------------------

/// Everything an `indexer_logits` work item reads.
struct LogitsCtx<'a> {
    simd: Simd,
    dims: IndexerLogitsDims,
    q: &'a [f32],
    w: &'a [f32],
    cache: &'a [u8],
    table: &'a [i64],
}

/// Logits of query row `row` for the tokens `t0..t0 + dst.len()`.
fn logits_chunk(cx: &LogitsCtx<'_>, row: usize, t0: usize, dst: &mut [f32]) {
    let IndexerLogitsDims {
        next_n,
        heads,
        d,
        block_size: bs,
        max_blocks,
        ..
    } = cx.dims;
    let simd = cx.simd;
    let (mr, nr) = (simd.mr(), simd.nr());
    let b = row / next_n;
    let qr = &cx.q[row * heads * d..(row + 1) * heads * d];
    let wr = &cx.w[row * heads..(row + 1) * heads];
    let qpanels = heads.div_ceil(nr);
    let mut qp = vec![0f32; qpanels * d * nr];
    for h in 0..heads {
        let panel = &mut qp[(h / nr) * d * nr..][..d * nr];
        for (k, &v) in qr[h * d..(h + 1) * d].iter().enumerate() {
            panel[k * nr + h % nr] = v;
        }
    }
    let mut kbuf = vec![0f32; MR_MAX * d];
    let mut scale = [0f64; MR_MAX];
    let mut acc = [0f64; MR_MAX];
    let zeros = vec![0f32; d];
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
    let n = dst.len();
    for tm in (0..n).step_by(mr) {
        let tn = mr.min(n - tm);
        for i in 0..tn {
            let t = t0 + tm + i;
            let blk = cx.table[b * max_blocks + t / bs] as usize; // checked by the caller
            let (base, off) = (blk * bs * (d + 4), t % bs);
            simd.decode_e4m3fn(
                &cx.cache[base + off * d..base + (off + 1) * d],
                &mut kbuf[i * d..(i + 1) * d],
            );
            scale[i] = f64::from(le_f32(cx.cache, base + bs * d + off * 4));
        }
        let a: [&[f32]; MR_MAX] = std::array::from_fn(|i| {
            if i < tn {
                &kbuf[i * d..(i + 1) * d]
            } else {
                &zeros[..]
            }
        });
        acc.fill(0.0);
        for qpn in 0..qpanels {
            simd.tile(d, &a, &qp[qpn * d * nr..][..d * nr], nr, &mut tile);
            let hs = nr.min(heads - qpn * nr);
            for (i, trow) in tile.iter().enumerate().take(tn) {
                for (j, &v) in trow.iter().enumerate().take(hs) {
                    acc[i] += f64::from(v.max(0.0)) * f64::from(wr[qpn * nr + j]);
                }
            }
        }
        for i in 0..tn {
            dst[tm + i] = (acc[i] * scale[i]) as f32;
        }
    }
}

pub(crate) fn indexer_logits(op: &mut Checked<IndexerLogits<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let dims = dims.clone();
    // Lengths and used block-table entries are checked before any read.
    let (lens, table) = logits_indices(a, &dims)?;
    let q = f32_values(a.q)?;
    let w = f32_values(a.weights)?;
    let cx = LogitsCtx {
        simd: current_simd(),
        dims: dims.clone(),
        q: &q,
        w: &w,
        cache: bytes_of(a.kv_cache)?,
        table: &table,
    };
    let (next_n, ml) = (dims.next_n, dims.max_len);
    let rows = dims.batch * next_n;
    let mut out = vec![f32::NEG_INFINITY; rows * ml];
    if ml > 0 {
        let mut work: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (row, r) in out.chunks_mut(ml).enumerate() {
            let (b, j) = (row / next_n, row % next_n);
            // Position len − next_n + j: the row sees the tokens t ≤ pos.
            let Some(vis) = (lens[b] as usize + j + 1).checked_sub(next_n) else {
                continue;
            };
            for (c, chunk) in r[..vis].chunks_mut(LOGIT_COLS).enumerate() {
                work.push((row, c * LOGIT_COLS, chunk));
            }
        }
        work.into_par_iter()
            .for_each(|(row, t0, dst)| logits_chunk(&cx, row, t0, dst));
    }
    let dt = a.logits.dtype();
    encode_into(dt, &out, bytes_mut_of(a.logits)?);
    Ok(())
}

// ---- §9.2 indexer_topk -----------------------------------------------------------

pub(crate) fn indexer_topk(op: &mut Checked<IndexerTopk<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let dims = dims.clone();
    let lens = topk_lengths(a, &dims)?;
    let logits = f32_values(a.logits)?;
    let (n, topk) = (dims.n, dims.topk);
    let mut out = vec![-1i64; dims.rows * topk];
    if topk > 0 {
        out.par_chunks_mut(topk).enumerate().for_each(|(r, dst)| {
            let row = &logits[r * n..(r + 1) * n];
            let len = lens[r] as usize;
            let k = topk.min(len);
            if k == 0 {
                return;
            }
            let mut pos: Vec<usize> = (0..len).collect();
            let order = |x: &usize, y: &usize| topk_order(row, *x, *y);
            if k < len {
                // A total order (ties to the lower position): the first
                // k after the selection are exactly the full sort's.
                pos.select_nth_unstable_by(k - 1, order);
                pos.truncate(k);
            }
            pos.sort_unstable_by(order);
            for (o, &p) in dst.iter_mut().zip(&pos) {
                *o = p as i64;
            }
        });
    }
    put_i64(a.indices, &out)
}

// ---- §9.4 cache_quant ------------------------------------------------------------

pub(crate) fn cache_quant(op: &mut Checked<CacheQuant<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let dims = dims.clone();
    let x = f32_values(a.x)?;
    check_keys(&x, &dims)?;
    let (bs, d) = (dims.block_size, dims.d);
    let per_block = bs * dims.token_bytes;
    let mut cache = vec![0u8; dims.num_blocks * per_block];
    if per_block > 0 {
        let args: &CacheQuant<'_> = a;
        cache
            .par_chunks_mut(per_block)
            .enumerate()
            .for_each(|(blk, c)| {
                for off in 0..bs {
                    let tok = blk * bs + off;
                    // The block's bytes as a one-block cache.
                    quant_token(args, &dims, &x[tok * d..(tok + 1) * d], 0, off, c);
                }
            });
    }
    debug_assert_eq!(a.cache.dtype(), DType::U8);
    store_bytes(a.cache, cache)
}
