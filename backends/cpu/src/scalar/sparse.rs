//! DeepSeek-V3.2 sparse-attention reference ops (docs/spec-v32.md §9):
//! the indexer's logits over the paged FP8 index-k cache, its top-k
//! selection, sparse MLA decode over the FP8 latent cache and the cache
//! writer. Plain loops, f64 accumulation, one rounding.

use super::mla::{put_f64, softmax};
use crate::util::{f32s, host, i64s, put_host, put_i64};
use deepport_core::backend::Tensor;
use deepport_core::formats;
use deepport_core::ops::*;
use deepport_core::{Error, HostTensor, Result};
use half::bf16;
use std::cmp::Ordering;

fn out_of_range(
    op: &'static str,
    arg: &'static str,
    position: Vec<usize>,
    value: i64,
    range: String,
) -> Error {
    Error::IndexOutOfRange {
        op,
        arg,
        position,
        value,
        range,
    }
}

fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// ---- §9.1 indexer_logits --------------------------------------------------

/// Reads `context_lens` and `block_table` of `indexer_logits` and checks
/// every length and every block the lengths use, before any read of the cache.
pub(crate) fn logits_indices(
    a: &IndexerLogits<'_>,
    d: &IndexerLogitsDims,
) -> Result<(Vec<i64>, Vec<i64>)> {
    const OP: &str = "indexer_logits";
    let lens = i64s(a.context_lens)?;
    let table = i64s(a.block_table)?;
    let cap = (d.max_blocks * d.block_size).min(d.max_len) as i64;
    for (b, &len) in lens.iter().enumerate() {
        if len < 0 || len > cap {
            return Err(out_of_range(
                OP,
                "context_lens",
                vec![b],
                len,
                format!(
                    "[0, {cap}] (min of max_len {} and max_blocks {} × block_size {})",
                    d.max_len, d.max_blocks, d.block_size
                ),
            ));
        }
        for j in 0..(len as usize).div_ceil(d.block_size) {
            let blk = table[b * d.max_blocks + j];
            if blk < 0 || blk >= d.num_blocks as i64 {
                return Err(out_of_range(
                    OP,
                    "block_table",
                    vec![b, j],
                    blk,
                    format!("[0, {}) (num_blocks)", d.num_blocks),
                ));
            }
        }
    }
    Ok((lens, table))
}

/// The logit of one (query row, token): `(Σ_h relu(q_h·k) · w_h) · s` in
/// f64. `q` holds the row's `h·d` values, `k` the token's `d` key values.
pub(crate) fn indexer_logit(q: &[f32], w: &[f32], k: &[f64], s: f64) -> f64 {
    let d = k.len();
    let mut acc = 0f64;
    for (h, &wh) in w.iter().enumerate() {
        let dot: f64 = q[h * d..(h + 1) * d]
            .iter()
            .zip(k)
            .map(|(&x, &y)| f64::from(x) * y)
            .sum();
        acc += dot.max(0.0) * f64::from(wh);
    }
    acc * s
}

/// One token of the index-k cache: its `d` key values (decoded e4m3) and
/// its scale.
pub(crate) fn index_key(
    cache: &[u8],
    dims: &IndexerLogitsDims,
    blk: usize,
    off: usize,
) -> (Vec<f64>, f64) {
    let (d, bs) = (dims.d, dims.block_size);
    let base = blk * bs * (d + 4);
    let k = cache[base + off * d..base + (off + 1) * d]
        .iter()
        .map(|&c| f64::from(formats::e4m3_to_f32(c)))
        .collect();
    let s = f64::from(le_f32(cache, base + bs * d + off * 4));
    (k, s)
}

/// The specification of `indexer_logits`: `cpu-ref`'s kernel must give these bytes.
pub fn indexer_logits(op: &mut Checked<IndexerLogits<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let (lens, table) = logits_indices(a, d)?;
    let q = f32s(a.q)?;
    let w = f32s(a.weights)?;
    let cache = host(a.kv_cache)?;
    let cache = cache.bytes();
    let (hd, ml) = (d.heads * d.d, d.max_len);
    let mut out = vec![f64::NEG_INFINITY; d.batch * d.next_n * ml];
    for b in 0..d.batch {
        let len = lens[b] as usize;
        for j in 0..d.next_n {
            let row = b * d.next_n + j;
            // Position of this query: len − next_n + j; it sees t ≤ pos.
            let Some(pos) = (len + j + 1).checked_sub(d.next_n) else {
                continue;
            };
            let qr = &q[row * hd..(row + 1) * hd];
            let wr = &w[row * d.heads..(row + 1) * d.heads];
            for t in 0..pos {
                let blk = table[b * d.max_blocks + t / d.block_size] as usize;
                let (k, s) = index_key(cache, d, blk, t % d.block_size);
                out[row * ml + t] = indexer_logit(qr, wr, &k, s);
            }
        }
    }
    put_f64(a.logits, &out)
}

// ---- §9.2 indexer_topk ----------------------------------------------------

/// The order of top-k: higher logit first, NaN after every number, ties
/// to the lower position.
pub(crate) fn topk_order(l: &[f32], a: usize, b: usize) -> Ordering {
    let (x, y) = (l[a], l[b]);
    let by_value = match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    };
    by_value.then(a.cmp(&b))
}

/// Reads and checks `lengths` of `indexer_topk` (each in `[0, n]`).
pub(crate) fn topk_lengths(a: &IndexerTopk<'_>, d: &IndexerTopkDims) -> Result<Vec<i64>> {
    let lens = i64s(a.lengths)?;
    for (r, &l) in lens.iter().enumerate() {
        if l < 0 || l > d.n as i64 {
            return Err(out_of_range(
                "indexer_topk",
                "lengths",
                vec![r],
                l,
                format!("[0, {}] (columns of logits)", d.n),
            ));
        }
    }
    Ok(lens)
}

/// The specification of `indexer_topk`.
pub fn indexer_topk(op: &mut Checked<IndexerTopk<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let lens = topk_lengths(a, d)?;
    let logits = f32s(a.logits)?;
    let mut out = vec![-1i64; d.rows * d.topk];
    for r in 0..d.rows {
        let row = &logits[r * d.n..(r + 1) * d.n];
        let mut pos: Vec<usize> = (0..lens[r] as usize).collect();
        pos.sort_by(|&x, &y| topk_order(row, x, y));
        for (slot, &p) in pos.iter().take(d.topk).enumerate() {
            out[r * d.topk + slot] = p as i64;
        }
    }
    put_i64(a.indices, &out)
}

// ---- §9.3 sparse_mla_decode -------------------------------------------------

/// Reads and checks the slot indices (−1 or in `[0, num_blocks·block_size)`
/// for every slot before `topk_length`) and `topk_length` (in `[0, topk]`).
/// Returns the indices with every ignored slot set to −1.
pub(crate) fn sparse_indices(a: &SparseMlaDecode<'_>, d: &SparseMlaDecodeDims) -> Result<Vec<i64>> {
    const OP: &str = "sparse_mla_decode";
    let mut idx = i64s(a.indices)?;
    let lens = match a.topk_length {
        Some(t) => {
            let l = i64s(t)?;
            for (b, &v) in l.iter().enumerate() {
                if v < 0 || v > d.topk as i64 {
                    return Err(out_of_range(
                        OP,
                        "topk_length",
                        vec![b],
                        v,
                        format!("[0, {}] (topk)", d.topk),
                    ));
                }
            }
            l
        }
        None => vec![d.topk as i64; d.batch],
    };
    let slots = (d.num_blocks * d.block_size) as i64;
    for (e, v) in idx.iter_mut().enumerate() {
        let t = e % d.topk;
        let b = e / (d.topk * d.s_q);
        if t as i64 >= lens[b] {
            *v = -1;
            continue;
        }
        if *v != -1 && (*v < 0 || *v >= slots) {
            return Err(out_of_range(
                OP,
                "indices",
                vec![b, (e / d.topk) % d.s_q, t],
                *v,
                format!("[0, {slots}) (num_blocks·block_size) or -1"),
            ));
        }
    }
    Ok(idx)
}

/// One token of the V3.2 latent cache, dequantized exactly: 512 latent
/// values `e4m3 · scale` and 64 rope values.
pub(crate) fn latent_key(cache: &[u8], slot: usize) -> Vec<f64> {
    let t = &cache[slot * V32_TOKEN_BYTES..(slot + 1) * V32_TOKEN_BYTES];
    let mut k = Vec::with_capacity(V32_D);
    for c in 0..V32_NOPE {
        let s = le_f32(t, V32_NOPE + 4 * (c / QBLOCK));
        k.push(f64::from(formats::e4m3_to_f32(t[c])) * f64::from(s));
    }
    let rope = V32_NOPE + 4 * (V32_NOPE / QBLOCK);
    for i in 0..V32_ROPE {
        let v = bf16::from_le_bytes([t[rope + 2 * i], t[rope + 2 * i + 1]]);
        k.push(f64::from(v.to_f32()));
    }
    k
}

/// One (b, s, h) row of sparse decode: `(out, lse)` over the valid keys.
pub(crate) fn sparse_row(
    q: &[f32],
    keys: &[&[f64]],
    scale: f64,
    sink: Option<f32>,
) -> (Vec<f64>, f64) {
    let (o, lse, _) = sparse_row_max(q, keys, scale, sink);
    (o, lse)
}

/// One row of sparse attention: `(out, lse, max_logit)` over the valid
/// keys (`q` and each key hold `d_qk` values; V is a key's first 512).
/// No valid key: `out = 0`, `lse = +inf`, `max_logit = −inf`.
pub(crate) fn sparse_row_max(
    q: &[f32],
    keys: &[&[f64]],
    scale: f64,
    sink: Option<f32>,
) -> (Vec<f64>, f64, f64) {
    if keys.is_empty() {
        return (vec![0.0; V32_NOPE], f64::INFINITY, f64::NEG_INFINITY);
    }
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            let dot: f64 = q
                .iter()
                .zip(k.iter())
                .map(|(&x, &y)| f64::from(x) * y)
                .sum();
            dot * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (p, lse) = softmax(&scores);
    let mut o = vec![0.0f64; V32_NOPE];
    for (k, &pk) in keys.iter().zip(&p) {
        for (oc, &v) in o.iter_mut().zip(&k[..V32_NOPE]) {
            *oc += pk * v;
        }
    }
    if let Some(s) = sink {
        let f = 1.0 / (1.0 + (f64::from(s) - lse).exp());
        for oc in &mut o {
            *oc *= f;
        }
    }
    (o, lse, max)
}

/// The specification of `sparse_mla_decode`.
pub fn sparse_mla_decode(op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let idx = sparse_indices(a, d)?;
    let q = f32s(a.q)?;
    let sink = match a.attn_sink {
        Some(t) => Some(f32s(t)?),
        None => None,
    };
    let cache = host(a.kcache)?;
    let cache = cache.bytes();
    let scale = f64::from(a.softmax_scale);
    let (s_q, h_q, topk) = (d.s_q, d.h_q, d.topk);
    let mut out = Vec::with_capacity(d.batch * s_q * h_q * V32_NOPE);
    let mut lse = vec![0.0f64; d.batch * h_q * s_q];
    for b in 0..d.batch {
        for s in 0..s_q {
            let sel = &idx[(b * s_q + s) * topk..(b * s_q + s + 1) * topk];
            let keys: Vec<Vec<f64>> = sel
                .iter()
                .filter(|&&v| v >= 0)
                .map(|&v| latent_key(cache, v as usize))
                .collect();
            let keys: Vec<&[f64]> = keys.iter().map(|k| k.as_slice()).collect();
            for h in 0..h_q {
                let item = (b * s_q + s) * h_q + h;
                let qr = &q[item * V32_D..(item + 1) * V32_D];
                let (o, l) = sparse_row(qr, &keys, scale, sink.as_ref().map(|v| v[h]));
                out.extend_from_slice(&o);
                lse[(b * h_q + h) * s_q + s] = l;
            }
        }
    }
    put_f64(a.out, &out)?;
    put_f64(a.lse, &lse)
}

// ---- §9.7 sparse_mla_prefill ------------------------------------------------

/// Reads `indices` and `topk_length` of `sparse_mla_prefill`: checks
/// `topk_length` (in `[0, topk]`) and returns the indices with every
/// invalid slot (outside `[0, s_kv)`, or at or past `topk_length`) set to −1.
pub(crate) fn prefill_indices(
    a: &SparseMlaPrefill<'_>,
    d: &SparseMlaPrefillDims,
) -> Result<Vec<i64>> {
    let mut idx = i64s(a.indices)?;
    let lens = match a.topk_length {
        Some(t) => {
            let l = i64s(t)?;
            for (s, &v) in l.iter().enumerate() {
                if v < 0 || v > d.topk as i64 {
                    return Err(out_of_range(
                        "sparse_mla_prefill",
                        "topk_length",
                        vec![s],
                        v,
                        format!("[0, {}] (topk)", d.topk),
                    ));
                }
            }
            l
        }
        None => vec![d.topk as i64; d.s_q],
    };
    for (e, v) in idx.iter_mut().enumerate() {
        let (s, t) = (e / d.topk.max(1), e % d.topk.max(1));
        if t as i64 >= lens[s] || *v < 0 || *v >= d.s_kv as i64 {
            *v = -1;
        }
    }
    Ok(idx)
}

/// The specification of `sparse_mla_prefill`.
pub fn sparse_mla_prefill(op: &mut Checked<SparseMlaPrefill<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let idx = prefill_indices(a, d)?;
    let q = f32s(a.q)?;
    let kv = f32s(a.kv)?;
    let sink = match a.attn_sink {
        Some(t) => Some(f32s(t)?),
        None => None,
    };
    let scale = f64::from(a.softmax_scale);
    let (h_q, dq, topk) = (d.h_q, d.d_qk, d.topk);
    let mut out = Vec::with_capacity(d.s_q * h_q * V32_NOPE);
    let mut maxl = vec![0.0f64; d.s_q * h_q];
    let mut lse = vec![0.0f64; d.s_q * h_q];
    for s in 0..d.s_q {
        let keys: Vec<Vec<f64>> = idx[s * topk..(s + 1) * topk]
            .iter()
            .filter(|&&v| v >= 0)
            .map(|&v| {
                let v = v as usize;
                kv[v * dq..(v + 1) * dq]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect()
            })
            .collect();
        let keys: Vec<&[f64]> = keys.iter().map(|k| k.as_slice()).collect();
        for h in 0..h_q {
            let item = s * h_q + h;
            let qr = &q[item * dq..(item + 1) * dq];
            let (o, l, m) = sparse_row_max(qr, &keys, scale, sink.as_ref().map(|v| v[h]));
            out.extend_from_slice(&o);
            lse[item] = l;
            maxl[item] = m;
        }
    }
    put_f64(a.out, &out)?;
    put_f64(a.max_logits, &maxl)?;
    put_f64(a.lse, &lse)
}

// ---- §9.4 cache_quant -------------------------------------------------------

/// Quantizes one group: returns its scale and writes the e4m3 bytes.
pub(crate) fn quant_group(layout: CacheLayout, xs: &[f32], ue8m0: bool, q: &mut [u8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let s = cache_scale(layout, amax, ue8m0);
    match layout {
        CacheLayout::Index => {
            let inv = 1.0f32 / s;
            for (b, &v) in q.iter_mut().zip(xs) {
                *b = formats::f32_to_e4m3(v * inv);
            }
        }
        CacheLayout::Latent => {
            for (b, &v) in q.iter_mut().zip(xs) {
                *b = formats::f32_to_e4m3(v / s);
            }
        }
    }
    s
}

/// Quantizes one token (`x` holds its `d` values) into `cache`.
pub(crate) fn quant_token(
    a: &CacheQuant<'_>,
    d: &CacheQuantDims,
    x: &[f32],
    blk: usize,
    off: usize,
    cache: &mut [u8],
) {
    match a.layout {
        CacheLayout::Index => {
            let base = blk * d.block_size * d.token_bytes;
            let q = &mut cache[base + off * d.d..base + (off + 1) * d.d];
            let s = quant_group(a.layout, x, a.ue8m0, q);
            let at = base + d.block_size * d.d + off * 4;
            cache[at..at + 4].copy_from_slice(&s.to_le_bytes());
        }
        CacheLayout::Latent => {
            let base = (blk * d.block_size + off) * d.token_bytes;
            let t = &mut cache[base..base + d.token_bytes];
            for g in 0..V32_NOPE / QBLOCK {
                let r = g * QBLOCK..(g + 1) * QBLOCK;
                let s = quant_group(a.layout, &x[r.clone()], a.ue8m0, &mut t[r]);
                let at = V32_NOPE + 4 * g;
                t[at..at + 4].copy_from_slice(&s.to_le_bytes());
            }
            let rope = V32_NOPE + 4 * (V32_NOPE / QBLOCK);
            for i in 0..V32_ROPE {
                let v = bf16::from_f32(x[V32_NOPE + i]).to_le_bytes();
                t[rope + 2 * i..rope + 2 * i + 2].copy_from_slice(&v);
            }
        }
    }
}

/// Fails on a non-finite key value (it would poison its group's scale).
pub(crate) fn check_keys(x: &[f32], d: &CacheQuantDims) -> Result<()> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        let (tok, c) = (i / d.d, i % d.d);
        return Err(Error::invalid(
            "cache_quant",
            "x",
            format!(
                "non-finite value {} at [{}, {}, {c}]",
                x[i],
                tok / d.block_size.max(1),
                tok % d.block_size.max(1)
            ),
        ));
    }
    Ok(())
}

/// The specification of `cache_quant`.
pub fn cache_quant(op: &mut Checked<CacheQuant<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let x = f32s(a.x)?;
    check_keys(&x, d)?;
    let mut cache = vec![0u8; d.num_blocks * d.block_size * d.token_bytes];
    for blk in 0..d.num_blocks {
        for off in 0..d.block_size {
            let tok = blk * d.block_size + off;
            quant_token(a, d, &x[tok * d.d..(tok + 1) * d.d], blk, off, &mut cache);
        }
    }
    store_bytes(a.cache, cache)
}

/// Writes raw bytes into a u8 tensor.
pub(crate) fn store_bytes(t: &mut Tensor, bytes: Vec<u8>) -> Result<()> {
    let h = HostTensor::from_bytes(t.dtype(), t.shape(), bytes)?;
    put_host(t, &h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuRef;
    use deepport_core::backend::Backend;
    use deepport_core::DType;

    fn up(h: &HostTensor) -> Tensor {
        CpuRef.upload(h).unwrap()
    }

    /// A latent cache of `slots` tokens: every latent byte `code`, scales
    /// `scale`, rope values 0.
    fn latent(slots: usize, code: u8, scale: f32) -> HostTensor {
        let mut b = vec![0u8; slots * V32_TOKEN_BYTES];
        for t in b.chunks_mut(V32_TOKEN_BYTES) {
            t[..V32_NOPE].fill(code);
            for g in 0..4 {
                t[V32_NOPE + 4 * g..V32_NOPE + 4 * g + 4].copy_from_slice(&scale.to_le_bytes());
            }
        }
        HostTensor::from_bytes(DType::U8, &[1, slots, V32_TOKEN_BYTES], b).unwrap()
    }

    fn decode(idx: &[i64], sink: Option<f32>, cache: &HostTensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let topk = idx.len();
        let q = up(&HostTensor::from_f32(
            DType::F32,
            &[1, 1, 1, V32_D],
            &[0.1; V32_D],
        ));
        let k = up(cache);
        let i = up(&HostTensor::from_index(DType::I32, &[1, 1, topk], idx));
        let s = sink.map(|v| up(&HostTensor::from_f32(DType::F32, &[1], &[v])));
        let mut out = CpuRef.alloc(DType::F32, &[1, 1, 1, V32_NOPE])?;
        let mut lse = CpuRef.alloc(DType::F32, &[1, 1, 1])?;
        let mut c = SparseMlaDecode {
            q: &q,
            kcache: &k,
            indices: &i,
            topk_length: None,
            attn_sink: s.as_ref(),
            out: &mut out,
            lse: &mut lse,
            softmax_scale: 0.5,
        }
        .check()?;
        sparse_mla_decode(&mut c)?;
        Ok((f32s(&out)?, f32s(&lse)?))
    }

    #[test]
    fn sparse_decode_skips_invalid_slots_and_applies_the_sink() {
        // e4m3 0x38 = 1.0, scale 0.25: every latent value is 0.25.
        let cache = latent(3, 0x38, 0.25);
        let (o, l) = decode(&[1, -1, 2], None, &cache).unwrap();
        // Two equal keys: softmax 1/2 each, out = V = 0.25, lse = S + ln 2.
        let s = 0.5 * 0.1 * 0.25 * V32_NOPE as f64;
        assert!((o[0] - 0.25).abs() < 1e-7, "{}", o[0]);
        assert!((f64::from(l[0]) - (s + 2f64.ln())).abs() < 1e-5, "{}", l[0]);
        let (os, ls) = decode(&[1, -1, 2], Some(l[0]), &cache).unwrap();
        // sink = lse halves the output; lse is returned without the sink.
        assert!((os[0] - 0.125).abs() < 1e-7, "{}", os[0]);
        assert_eq!(ls[0], l[0]);
        // All invalid: out 0, lse +inf.
        let (o, l) = decode(&[-1, -1], Some(1.0), &cache).unwrap();
        assert!(o.iter().all(|&v| v == 0.0));
        assert_eq!(l[0], f32::INFINITY);
    }

    /// One query of `sparse_mla_prefill` over `kv` rows that are `row(t)`
    /// everywhere: `(out[0], max_logits, lse)` per head.
    fn prefill(
        idx: &[i64],
        s_kv: usize,
        sink: Option<f32>,
        topk_length: Option<i64>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let topk = idx.len();
        let q = up(&HostTensor::from_f32(
            DType::F32,
            &[1, 1, V32_D],
            &[0.1; V32_D],
        ));
        let kv: Vec<f32> = (0..s_kv)
            .flat_map(|t| std::iter::repeat_n(0.01 * t as f32, V32_D))
            .collect();
        let kv = up(&HostTensor::from_f32(DType::F32, &[s_kv, 1, V32_D], &kv));
        let i = up(&HostTensor::from_index(DType::I32, &[1, 1, topk], idx));
        let s = sink.map(|v| up(&HostTensor::from_f32(DType::F32, &[1], &[v])));
        let l = topk_length.map(|v| up(&HostTensor::from_index(DType::I32, &[1], &[v])));
        let mut out = CpuRef.alloc(DType::F32, &[1, 1, V32_NOPE])?;
        let mut m = CpuRef.alloc(DType::F32, &[1, 1])?;
        let mut lse = CpuRef.alloc(DType::F32, &[1, 1])?;
        let mut c = SparseMlaPrefill {
            q: &q,
            kv: &kv,
            indices: &i,
            topk_length: l.as_ref(),
            attn_sink: s.as_ref(),
            out: &mut out,
            max_logits: &mut m,
            lse: &mut lse,
            softmax_scale: 0.5,
        }
        .check()?;
        sparse_mla_prefill(&mut c)?;
        Ok((f32s(&out)?, f32s(&m)?, f32s(&lse)?))
    }

    #[test]
    fn sparse_prefill_skips_every_value_outside_the_kv_and_reports_max_and_lse() {
        // Tokens 2 and 3 valid; -1, s_kv, i32::MAX and i32::MIN invalid.
        let idx = [2, -1, 4, 3, i64::from(i32::MAX), i64::from(i32::MIN)];
        let (o, m, l) = prefill(&idx, 4, None, None).unwrap();
        let s = |t: f64| 0.5 * 0.1 * 0.01 * t * V32_D as f64;
        let lse = (s(2.0).exp() + s(3.0).exp()).ln();
        assert!((f64::from(l[0]) - lse).abs() < 1e-5, "{} vs {lse}", l[0]);
        assert!((f64::from(m[0]) - s(3.0)).abs() < 1e-6, "{}", m[0]);
        let p3 = (s(3.0) - lse).exp();
        let want = 0.02 * (1.0 - p3) + 0.03 * p3;
        assert!((f64::from(o[0]) - want).abs() < 1e-7, "{} vs {want}", o[0]);
        // topk_length 1: only token 2.
        let (_, m, _) = prefill(&idx, 4, None, Some(1)).unwrap();
        assert!((f64::from(m[0]) - s(2.0)).abs() < 1e-6);
        // A +inf sink zeroes out, −inf leaves it; neither touches lse.
        let (oz, _, lz) = prefill(&idx, 4, Some(f32::INFINITY), None).unwrap();
        assert!(oz.iter().all(|&v| v == 0.0));
        assert_eq!(lz, l);
        let (on, _, _) = prefill(&idx, 4, Some(f32::NEG_INFINITY), None).unwrap();
        assert_eq!(on, o);
        // No valid slot (also with s_kv = 0): out 0, max −inf, lse +inf.
        for s_kv in [0, 2] {
            let (o, m, l) = prefill(&[2, -1], s_kv, Some(0.5), None).unwrap();
            assert!(o.iter().all(|&v| v == 0.0));
            assert_eq!((m[0], l[0]), (f32::NEG_INFINITY, f32::INFINITY));
        }
        // topk_length past topk is an error.
        assert!(matches!(
            prefill(&idx, 4, None, Some(7)),
            Err(Error::IndexOutOfRange {
                arg: "topk_length",
                ..
            })
        ));
    }

    #[test]
    fn out_of_range_slots_are_errors_not_reads() {
        let cache = latent(3, 0x38, 0.25);
        for bad in [3i64, -2, i64::from(i32::MAX)] {
            match decode(&[0, bad], None, &cache) {
                Err(Error::IndexOutOfRange { arg, value, .. }) => {
                    assert_eq!((arg, value), ("indices", bad))
                }
                r => panic!("{bad}: {r:?}"),
            }
        }
    }

    #[test]
    fn topk_orders_ties_to_the_lower_position_and_pads() {
        let l = HostTensor::from_f32(DType::F32, &[1, 5], &[1.0, 3.0, f32::NAN, 3.0, 2.0]);
        let n = HostTensor::from_index(DType::I32, &[1], &[5]);
        let (l, n) = (up(&l), up(&n));
        let mut o = CpuRef.alloc(DType::I32, &[1, 7]).unwrap();
        let mut c = IndexerTopk {
            logits: &l,
            lengths: &n,
            indices: &mut o,
        }
        .check()
        .unwrap();
        indexer_topk(&mut c).unwrap();
        assert_eq!(i64s(&o).unwrap(), [1, 3, 4, 0, 2, -1, -1]);
        let bad = up(&HostTensor::from_index(DType::I32, &[1], &[6]));
        let mut c = IndexerTopk {
            logits: &l,
            lengths: &bad,
            indices: &mut o,
        }
        .check()
        .unwrap();
        assert!(matches!(
            indexer_topk(&mut c),
            Err(Error::IndexOutOfRange { arg: "lengths", .. })
        ));
    }

    #[test]
    fn cache_writers_round_trip_and_keep_float_scales() {
        let x: Vec<f32> = (0..2 * 576)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let xt = up(&HostTensor::from_f32(DType::F32, &[1, 2, 576], &x));
        for ue8m0 in [false, true] {
            let mut c = CpuRef.alloc(DType::U8, &[1, 2, V32_TOKEN_BYTES]).unwrap();
            let mut op = CacheQuant {
                x: &xt,
                cache: &mut c,
                layout: CacheLayout::Latent,
                ue8m0,
            }
            .check()
            .unwrap();
            cache_quant(&mut op).unwrap();
            let h = host(&c).unwrap();
            for tok in 0..2 {
                let k = latent_key(h.bytes(), tok);
                for (j, (&kv, &xv)) in k.iter().zip(&x[tok * 576..]).enumerate() {
                    let tol = if j < V32_NOPE {
                        0.08 * 50.0 / 7.0
                    } else {
                        0.01 * xv.abs() as f64
                    };
                    assert!((kv - f64::from(xv)).abs() <= tol, "{tok} {j}: {kv} vs {xv}");
                }
                let s = le_f32(h.bytes(), tok * V32_TOKEN_BYTES + V32_NOPE);
                let amax = x[tok * 576..tok * 576 + 128]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                if ue8m0 {
                    assert_eq!(formats::ue8m0_round_up(s), s);
                } else {
                    assert_eq!(s, amax / 448.0);
                    assert_ne!(
                        formats::ue8m0_round_up(s),
                        s,
                        "a float scale, not a power of two"
                    );
                }
            }
        }
    }
}
