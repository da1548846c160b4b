//! `cpu-ref`'s DeepSeek-V3.2 sparse-attention kernels (docs/spec-v32.md
//! §9), with the arithmetic of [`crate::scalar::sparse`] bit for bit.
//!
//! Every output element keeps its scalar computation: each score a dot
//! product summed in channel order from −0.0 (as `Iterator::sum` starts)
//! times the scale, the same softmax (`scalar::mla::softmax`), each output
//! column summed in the order of the selected slots from 0, the sink
//! factor applied last, one rounding at the store; the indexer's dot
//! products the same, its head sum and scale in the scalar order. What
//! changes is the grouping:
//!
//! * sparse MLA (decode and prefill): one query row (b, s) at a time holds
//!   its valid selected keys, dequantized/widened to f64 once and packed
//!   twice (for the scores `[key group][d][NR]`, for the outputs
//!   `[column group][key][NR]`); all heads of the row share them, so the
//!   scores are a small GEMM (heads × keys over d) and the outputs another
//!   (heads × 512 over keys), both on the register tiles of
//!   [`crate::tiles`], which advance independent sums together. Rows run
//!   on several threads ([`par_map`]); when there are fewer rows than
//!   threads, the heads of a row are split over the threads instead
//!   (sharing the row's packed keys).
//! * `indexer_logits`: one unit per (sequence, block of [`TOKENS`]
//!   tokens): the block's keys decoded once, the dot products of every
//!   (query, head) with every key on the tiles, then per (query, token) the
//!   head sum in head order.
//! * `indexer_topk`: the rows on several threads; per row a selection of
//!   the `topk` first positions, then a sort of those (the order is total,
//!   so the result is the full sort's).
//!
//! Index errors are found by the scalar code's own checks before any
//! arithmetic, so they are reported exactly as the specification does.
//! `tests/oracle_bitexact.rs` compares every op with the scalar loops under
//! every instruction set this CPU runs.

use crate::fast::Simd;
use crate::scalar::mla::{put_f64, softmax};
use crate::scalar::sparse::{
    index_key, logits_indices, prefill_indices, sparse_indices, topk_lengths, topk_order,
};
use crate::tiles::{panels, Tile, MR, NR};
use crate::util::{f32s, host, par_map, put_i64, threads};
use deepport_core::ops::*;
use deepport_core::{formats, Result};
use half::bf16;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

pub(crate) use crate::scalar::sparse::cache_quant;

/// Tokens per unit of `indexer_logits`.
const TOKENS: usize = 256;

// ---- sparse MLA: one query row over its selected keys ------------------------

/// The valid selected keys of one query row, widened to f64 and packed for
/// the two GEMMs: `kq` `[n/NR][dq][NR]` (keys past `n` are 0) for the
/// scores, `kv` `[512/NR][n][NR]` (the keys' first 512 channels) for the
/// outputs.
struct Keys {
    n: usize,
    dq: usize,
    kq: Vec<f64>,
    kv: Vec<f64>,
}

impl Keys {
    /// Packs `n` keys of `dq` values: `key(t, buf)` writes key `t` (in
    /// slot order) into `buf`. Keys are read NR at a time, so that both
    /// packings write memory in order. The panels are `scratch`'s (give
    /// them back with [`Keys::release`]).
    fn pack(s: &mut Scratch, n: usize, dq: usize, key: impl Fn(usize, &mut [f64])) -> Keys {
        let tg = n.div_ceil(NR);
        // Every element of both is written below (kq's lanes past n as 0).
        let mut kq = std::mem::take(&mut s.kq);
        let mut kv = std::mem::take(&mut s.kv);
        kq.resize(tg * dq * NR, 0.0);
        kq.truncate(tg * dq * NR);
        kv.resize((V32_NOPE / NR) * n * NR, 0.0);
        kv.truncate((V32_NOPE / NR) * n * NR);
        let buf = filled(&mut s.buf, NR * dq, 0.0);
        for g in 0..tg {
            let m = NR.min(n - g * NR);
            for (jj, k) in buf.chunks_exact_mut(dq).take(m).enumerate() {
                key(g * NR + jj, k);
            }
            let panel = &mut kq[g * dq * NR..(g + 1) * dq * NR];
            for (c, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (jj, v) in dst.iter_mut().enumerate() {
                    *v = if jj < m { buf[jj * dq + c] } else { 0.0 };
                }
            }
            for cb in 0..V32_NOPE / NR {
                let dst = &mut kv[cb * n * NR + g * NR * NR..][..m * NR];
                for (jj, d8) in dst.chunks_exact_mut(NR).enumerate() {
                    d8.copy_from_slice(&buf[jj * dq + cb * NR..jj * dq + (cb + 1) * NR]);
                }
            }
        }
        Keys { n, dq, kq, kv }
    }

    /// Hands the panels back to `s` for the next row.
    fn release(self, s: &mut Scratch) {
        s.kq = self.kq;
        s.kv = self.kv;
    }
}

/// Buffers a thread reuses from one unit to the next (fresh pages for
/// every row's panels cost page faults and clearing).
#[derive(Default)]
struct Scratch {
    kq: Vec<f64>,
    kv: Vec<f64>,
    buf: Vec<f64>,
    qp: Vec<f64>,
    pp: Vec<f64>,
    dots: Vec<Tile>,
    o: Vec<Tile>,
}

/// The scratch buffers of one op call: a unit takes one, gives it back.
#[derive(Default)]
struct Pool(Mutex<Vec<Scratch>>);

impl Pool {
    fn with<R>(&self, f: impl FnOnce(&mut Scratch) -> R) -> R {
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut s = lock().pop().unwrap_or_default();
        let r = f(&mut s);
        lock().push(s);
        r
    }
}

/// `v` as `n` copies of `fill`.
fn filled<T: Copy>(v: &mut Vec<T>, n: usize, fill: T) -> &mut [T] {
    v.clear();
    v.resize(n, fill);
    v
}

/// One token of the V3.2 latent cache into `k` (576 values), with the
/// arithmetic of `scalar::sparse::latent_key`: `e4m3 · scale` for the 512
/// latent values (exact in f64), the 64 bf16 rope values widened.
fn latent_into(cache: &[u8], slot: usize, k: &mut [f64]) {
    let t = &cache[slot * V32_TOKEN_BYTES..(slot + 1) * V32_TOKEN_BYTES];
    for (g, kg) in k[..V32_NOPE].chunks_exact_mut(QBLOCK).enumerate() {
        let at = V32_NOPE + 4 * g;
        let s = f64::from(f32::from_le_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]));
        for (v, &code) in kg.iter_mut().zip(&t[g * QBLOCK..(g + 1) * QBLOCK]) {
            *v = f64::from(formats::e4m3_to_f32(code)) * s;
        }
    }
    let rope = V32_NOPE + 4 * (V32_NOPE / QBLOCK);
    for (i, v) in k[V32_NOPE..V32_D].iter_mut().enumerate() {
        *v = f64::from(bf16::from_le_bytes([t[rope + 2 * i], t[rope + 2 * i + 1]]).to_f32());
    }
}

/// One head's result: `(out[512], lse, max_logit)`.
type HeadOut = (Vec<f64>, f64, f64);

/// Heads `hs` of one query row (`q` holds the row's `h_q · dq` values)
/// over `keys`: what `scalar::sparse::sparse_row_max` gives for each head.
fn attend(
    simd: Simd,
    scratch: &mut Scratch,
    keys: &Keys,
    q: &[f32],
    hs: Range<usize>,
    scale: f64,
    sink: Option<&[f32]>,
) -> Vec<HeadOut> {
    let (n, dq) = (keys.n, keys.dq);
    let nh = hs.len();
    if n == 0 {
        return (0..nh)
            .map(|_| (vec![0.0; V32_NOPE], f64::INFINITY, f64::NEG_INFINITY))
            .collect();
    }
    // Queries: [rg][dq][MR] over the heads.
    let rg = nh.div_ceil(MR);
    let Scratch {
        qp, pp, dots, o, ..
    } = scratch;
    let qp = filled(qp, rg * dq * MR, 0.0);
    for (hh, h) in hs.clone().enumerate() {
        let panel = &mut qp[(hh / MR) * dq * MR..(hh / MR + 1) * dq * MR];
        for (c, &v) in q[h * dq..(h + 1) * dq].iter().enumerate() {
            panel[c * MR + hh % MR] = f64::from(v);
        }
    }
    // Dot products from −0.0, as `Iterator::sum` starts.
    let tg = n.div_ceil(NR);
    let dots = filled(dots, rg * tg, [[-0.0f64; NR]; MR]);
    panels(simd, qp, dq * MR, rg, &keys.kq, dq * NR, tg, dq, dots);

    // Per head: scores, max, softmax; the probabilities packed [rg][n][MR].
    let pp = filled(pp, rg * n * MR, 0.0);
    let mut stats = Vec::with_capacity(nh);
    for hh in 0..nh {
        let (g, i) = (hh / MR, hh % MR);
        let scores: Vec<f64> = (0..n)
            .map(|t| dots[g * tg + t / NR][i][t % NR] * scale)
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (p, lse) = softmax(&scores);
        for (t, &pt) in p.iter().enumerate() {
            pp[g * n * MR + t * MR + i] = pt;
        }
        stats.push((lse, max));
    }
    // o[h][c] = Σ_t p[h][t]·v[t][c], from 0, in slot order.
    let cg = V32_NOPE / NR;
    let o = filled(o, rg * cg, [[0.0f64; NR]; MR]);
    panels(simd, pp, n * MR, rg, &keys.kv, n * NR, cg, n, o);

    hs.enumerate()
        .map(|(hh, h)| {
            let (g, i) = (hh / MR, hh % MR);
            let (lse, max) = stats[hh];
            let mut out: Vec<f64> = (0..V32_NOPE)
                .map(|c| o[g * cg + c / NR][i][c % NR])
                .collect();
            if let Some(s) = sink {
                let f = 1.0 / (1.0 + (f64::from(s[h]) - lse).exp());
                for oc in &mut out {
                    *oc *= f;
                }
            }
            (out, lse, max)
        })
        .collect()
}

/// Every query row's heads: `rows` rows, row `r` with `keys_of(r)` (its
/// valid keys in slot order, packed) and its queries `q[r·h_q·dq ..]`. Rows run on
/// several threads; with fewer rows than threads, each row's heads are
/// split over the threads instead. Returns the heads of row `r` at
/// `[r·h_q ..]`.
#[allow(clippy::too_many_arguments)]
fn attend_rows(
    rows: usize,
    h_q: usize,
    dq: usize,
    q: &[f32],
    scale: f64,
    sink: Option<&[f32]>,
    keys_of: impl Fn(&mut Scratch, usize) -> Keys + Sync,
) -> Vec<HeadOut> {
    let simd = crate::fast::current_simd();
    let pool = Pool::default();
    let row_q = |r: usize| &q[r * h_q * dq..(r + 1) * h_q * dq];
    let n_threads = threads();
    if rows >= n_threads || h_q < 2 * MR {
        return par_map(rows, |r| {
            pool.with(|s| {
                let keys = keys_of(s, r);
                let heads = attend(simd, s, &keys, row_q(r), 0..h_q, scale, sink);
                keys.release(s);
                heads
            })
        })
        .into_iter()
        .flatten()
        .collect();
    }
    // Few rows: split the heads into about two chunks per thread (whole
    // register tiles), all sharing the row's keys.
    let chunk = h_q.div_ceil(2 * n_threads).div_ceil(MR) * MR;
    let chunks = h_q.div_ceil(chunk);
    let mut all = Vec::with_capacity(rows * h_q);
    let mut ks = Scratch::default();
    for r in 0..rows {
        let keys = keys_of(&mut ks, r);
        let parts = par_map(chunks, |c| {
            let hs = c * chunk..((c + 1) * chunk).min(h_q);
            pool.with(|s| attend(simd, s, &keys, row_q(r), hs, scale, sink))
        });
        keys.release(&mut ks);
        all.extend(parts.into_iter().flatten());
    }
    all
}

/// `sparse_mla_decode` (spec-v32 §9.3): `scalar::sparse::sparse_mla_decode`'s bits.
pub(crate) fn sparse_mla_decode(op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
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
    let rows = d.batch * s_q;
    let heads = attend_rows(rows, h_q, V32_D, &q, scale, sink.as_deref(), |sc, r| {
        let slots: Vec<usize> = idx[r * topk..(r + 1) * topk]
            .iter()
            .filter(|&&v| v >= 0)
            .map(|&v| v as usize)
            .collect();
        Keys::pack(sc, slots.len(), V32_D, |t, k| {
            latent_into(cache, slots[t], k)
        })
    });
    let mut out = Vec::with_capacity(rows * h_q * V32_NOPE);
    let mut lse = vec![0.0f64; rows * h_q];
    for (item, (o, l, _)) in heads.into_iter().enumerate() {
        let (r, h) = (item / h_q, item % h_q);
        let (b, s) = (r / s_q, r % s_q);
        out.extend_from_slice(&o);
        lse[(b * h_q + h) * s_q + s] = l;
    }
    put_f64(a.out, &out)?;
    put_f64(a.lse, &lse)
}

/// `sparse_mla_prefill` (spec-v32 §9.7): `scalar::sparse::sparse_mla_prefill`'s bits.
pub(crate) fn sparse_mla_prefill(op: &mut Checked<SparseMlaPrefill<'_>>) -> Result<()> {
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
    let heads = attend_rows(d.s_q, h_q, dq, &q, scale, sink.as_deref(), |sc, s| {
        let rows: Vec<usize> = idx[s * topk..(s + 1) * topk]
            .iter()
            .filter(|&&v| v >= 0)
            .map(|&v| v as usize)
            .collect();
        Keys::pack(sc, rows.len(), dq, |t, k| {
            let v = rows[t];
            for (o, &x) in k.iter_mut().zip(&kv[v * dq..(v + 1) * dq]) {
                *o = f64::from(x);
            }
        })
    });
    let mut out = Vec::with_capacity(d.s_q * h_q * V32_NOPE);
    let mut maxl = Vec::with_capacity(d.s_q * h_q);
    let mut lse = Vec::with_capacity(d.s_q * h_q);
    for (o, l, m) in heads {
        out.extend_from_slice(&o);
        lse.push(l);
        maxl.push(m);
    }
    put_f64(a.out, &out)?;
    put_f64(a.max_logits, &maxl)?;
    put_f64(a.lse, &lse)
}

// ---- the indexer ----------------------------------------------------------------

/// `indexer_logits` (spec-v32 §9.1): `scalar::sparse::indexer_logits`'s bits.
pub(crate) fn indexer_logits(op: &mut Checked<IndexerLogits<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let (lens, table) = logits_indices(a, d)?;
    let q = f32s(a.q)?;
    let w = f32s(a.weights)?;
    let cache = host(a.kv_cache)?;
    let cache = cache.bytes();
    let (heads, dd, next_n, ml) = (d.heads, d.d, d.next_n, d.max_len);
    // Query j of sequence b sees tokens t < len + j + 1 − next_n; the last
    // one sees all `len` tokens.
    let units: Vec<(usize, Range<usize>)> = (0..d.batch)
        .flat_map(|b| {
            let len = lens[b] as usize;
            (0..len.div_ceil(TOKENS)).map(move |u| (b, u * TOKENS..((u + 1) * TOKENS).min(len)))
        })
        .collect();
    let simd = crate::fast::current_simd();
    let rows = next_n * heads;
    let rg = rows.div_ceil(MR);
    let parts = par_map(units.len(), |u| {
        let (b, ref ts) = units[u];
        let (t0, nt) = (ts.start, ts.len());
        // Keys [tg][d][NR] and their scales.
        let tg = nt.div_ceil(NR);
        let mut kp = vec![0.0f64; tg * dd * NR];
        let mut ks = Vec::with_capacity(nt);
        for tt in 0..nt {
            let t = t0 + tt;
            let blk = table[b * d.max_blocks + t / d.block_size] as usize;
            let (k, s) = index_key(cache, d, blk, t % d.block_size);
            let panel = &mut kp[(tt / NR) * dd * NR..(tt / NR + 1) * dd * NR];
            for (c, &v) in k.iter().enumerate() {
                panel[c * NR + tt % NR] = v;
            }
            ks.push(s);
        }
        // Queries [rg][d][MR] over rows (j, h).
        let mut qp = vec![0.0f64; rg * dd * MR];
        let qb = &q[b * rows * dd..(b + 1) * rows * dd];
        for r in 0..rows {
            let panel = &mut qp[(r / MR) * dd * MR..(r / MR + 1) * dd * MR];
            for (c, &v) in qb[r * dd..(r + 1) * dd].iter().enumerate() {
                panel[c * MR + r % MR] = f64::from(v);
            }
        }
        let mut dots: Vec<Tile> = vec![[[-0.0f64; NR]; MR]; rg * tg];
        panels(simd, &qp, dd * MR, rg, &kp, dd * NR, tg, dd, &mut dots);
        // Per (j, t): Σ_h relu(dot)·w_h in head order, times the scale.
        let len = lens[b] as usize;
        let mut vals = vec![f64::NEG_INFINITY; next_n * nt];
        for j in 0..next_n {
            let Some(pos) = (len + j + 1).checked_sub(next_n) else {
                continue;
            };
            let wr = &w[(b * next_n + j) * heads..(b * next_n + j + 1) * heads];
            for tt in 0..pos.saturating_sub(t0).min(nt) {
                let mut acc = 0f64;
                for (h, &wh) in wr.iter().enumerate() {
                    let r = j * heads + h;
                    let dot = dots[(r / MR) * tg + tt / NR][r % MR][tt % NR];
                    acc += dot.max(0.0) * f64::from(wh);
                }
                vals[j * nt + tt] = acc * ks[tt];
            }
        }
        vals
    });
    let mut out = vec![f64::NEG_INFINITY; d.batch * next_n * ml];
    for ((b, ts), vals) in units.iter().zip(parts) {
        let nt = ts.len();
        for j in 0..next_n {
            let row = b * next_n + j;
            out[row * ml + ts.start..row * ml + ts.end]
                .copy_from_slice(&vals[j * nt..(j + 1) * nt]);
        }
    }
    put_f64(a.logits, &out)
}

/// `indexer_topk` (spec-v32 §9.2): the scalar selection, rows on several threads.
pub(crate) fn indexer_topk(op: &mut Checked<IndexerTopk<'_>>) -> Result<()> {
    let (a, d) = op.parts();
    let lens = topk_lengths(a, d)?;
    let logits = f32s(a.logits)?;
    let rows = par_map(d.rows, |r| {
        let row = &logits[r * d.n..(r + 1) * d.n];
        let len = lens[r] as usize;
        let k = d.topk.min(len);
        let mut pos: Vec<usize> = (0..len).collect();
        // `topk_order` is a total order (ties go to the lower position), so
        // the k first after a selection are the k first after a full sort.
        if k < len {
            if k == 0 {
                pos.clear();
            } else {
                pos.select_nth_unstable_by(k - 1, |&x, &y| topk_order(row, x, y));
                pos.truncate(k);
            }
        }
        pos.sort_by(|&x, &y| topk_order(row, x, y));
        let mut out = vec![-1i64; d.topk];
        for (slot, &p) in pos.iter().enumerate() {
            out[slot] = p as i64;
        }
        out
    });
    let out: Vec<i64> = rows.into_iter().flatten().collect();
    put_i64(a.indices, &out)
}
