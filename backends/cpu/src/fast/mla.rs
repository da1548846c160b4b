//! MLA decode over a paged latent cache (SPEC.md §4), fast path.
//!
//! One work item is (batch row, kv head, split of the pages). It reads each
//! cache row of its pages once, converts a page to f32 and computes the
//! scores of **every** query row that shares the kv head (all `s_q ×
//! h_q/h_kv` of them) with the SIMD micro-kernel, as a small GEMM
//! `Sᵀ = K_page · Qᵀ`; an online softmax in f32 keeps a running max and sum
//! per row, and `O += P · V_page` is a second small GEMM. Splits of the
//! pages are combined at the end (`lse`-weighted), so a few long sequences
//! still use every thread.

use super::amx::{self, Amx, Block};
use super::simd::{Tile, MR_MAX, NR_MAX};
use super::{
    bytes_mut_of, bytes_of, current_simd, decode_into, encode_into, f32_values, zeroed_lines,
    Aligned,
};
use deepport_core::ops::*;
use deepport_core::{Error, Result};
use rayon::prelude::*;

/// exp(x) in f32 for x ≤ 0 (arguments are `score − running max`), exact to
/// about 2 ulp, 0 below −87 (and for −inf). Written so that a loop over it
/// vectorizes.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let xc = x.max(-87.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// The running softmax state of one work item.
struct Partial {
    /// Running max of the scaled scores per row (−inf: nothing seen).
    m: Vec<f32>,
    /// Running sum of `exp(score − m)` per row.
    l: Vec<f32>,
    /// Unnormalized output `[rows][dv]`.
    o: Vec<f32>,
}

/// Everything a work item reads.
struct Ctx<'a> {
    dims: MlaDecodeDims,
    q: &'a [f32],
    kc: &'a [u8],
    kdtype: deepport_core::DType,
    table: &'a [i64],
    seqlens: &'a [i64],
    scale: f32,
    causal: bool,
    /// Chosen on the launching thread (the override is thread-local).
    simd: super::Simd,
    /// Scores and `P·V` on AMX-BF16 ([`attend_amx`]): AMX chosen, q and the
    /// cache bf16, pages of at most 128 tokens.
    amx: bool,
}

fn attend(cx: &Ctx<'_>, b: usize, kvh: usize, pages: std::ops::Range<usize>) -> Partial {
    let MlaDecodeDims {
        s_q,
        h_q,
        h_kv,
        d,
        dv,
        block_size: bs,
        max_blocks,
        ..
    } = cx.dims;
    let simd = cx.simd;
    let (mr, nr) = (simd.mr(), simd.nr());
    let group = h_q / h_kv;
    let rows = s_q * group;
    let seqlen = cx.seqlens[b] as usize;
    let esz = cx.kdtype.size();

    // Q rows of this kv head, packed as panels [d][nr] over the rows.
    let qpanels = rows.div_ceil(nr);
    let mut qp = vec![0f32; qpanels * d * nr];
    let mut visible = vec![0usize; rows];
    for r in 0..rows {
        let (s, h) = (r / group, kvh * group + r % group);
        let qrow = &cx.q[((b * s_q + s) * h_q + h) * d..][..d];
        let panel = &mut qp[(r / nr) * d * nr..][..d * nr];
        for (kk, &v) in qrow.iter().enumerate() {
            panel[kk * nr + r % nr] = v;
        }
        visible[r] = if cx.causal {
            seqlen.saturating_sub(s_q - 1 - s)
        } else {
            seqlen
        };
    }
    let max_visible = visible.iter().copied().max().unwrap_or(0);

    let mut part = Partial {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0f32; rows],
        o: vec![0f32; rows * dv],
    };
    let vpanels = dv.div_ceil(nr);
    let mut kbuf = vec![0f32; bs * d];
    let mut scores = vec![0f32; rows * bs];
    let mut vpan = vec![0f32; vpanels * bs * nr];
    let zeros = vec![0f32; d.max(bs)];
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];

    for page in pages {
        let t0 = page * bs;
        if t0 >= max_visible {
            break;
        }
        let tn = bs.min(seqlen - t0);
        let blk = cx.table[b * max_blocks + page] as usize; // checked by the caller
        for tt in 0..tn {
            let off = ((blk * bs + tt) * h_kv + kvh) * d;
            decode_into(
                cx.kdtype,
                &cx.kc[off * esz..(off + d) * esz],
                &mut kbuf[tt * d..(tt + 1) * d],
            );
        }
        // Sᵀ[t][r] = K[t] · Q[r], stored as S[r][t] (row stride tn).
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
                for i in 0..mr.min(tn - tm) {
                    for j in 0..nr.min(rows - qpn * nr) {
                        scores[(qpn * nr + j) * tn + tm + i] = tile[i][j] * cx.scale;
                    }
                }
            }
        }
        // Mask, then the online softmax update of each row.
        for r in 0..rows {
            let row = &mut scores[r * tn..(r + 1) * tn];
            let vis = visible[r].saturating_sub(t0).min(tn);
            row[vis..].fill(f32::NEG_INFINITY);
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if mx == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let m_new = part.m[r].max(mx);
            let alpha = exp_nonpos(part.m[r] - m_new);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = exp_nonpos(*v - m_new);
                sum += *v;
            }
            if alpha != 1.0 {
                for o in &mut part.o[r * dv..(r + 1) * dv] {
                    *o *= alpha;
                }
            }
            part.l[r] = part.l[r] * alpha + sum;
            part.m[r] = m_new;
        }
        // V panels [tn][nr] from the first dv channels of the page.
        for vp in 0..vpanels {
            let panel = &mut vpan[vp * bs * nr..][..tn * nr];
            let cols = nr.min(dv - vp * nr);
            for tt in 0..tn {
                let dst = &mut panel[tt * nr..(tt + 1) * nr];
                dst[..cols].copy_from_slice(&kbuf[tt * d + vp * nr..][..cols]);
                dst[cols..].fill(0.0);
            }
        }
        // O[r] += P[r] · V.
        for r0 in (0..rows).step_by(mr) {
            let a: [&[f32]; MR_MAX] = std::array::from_fn(|i| {
                if i < mr && r0 + i < rows {
                    &scores[(r0 + i) * tn..(r0 + i + 1) * tn]
                } else {
                    &zeros[..tn]
                }
            });
            for vp in 0..vpanels {
                simd.tile(tn, &a, &vpan[vp * bs * nr..][..tn * nr], nr, &mut tile);
                let cols = nr.min(dv - vp * nr);
                for (i, trow) in tile.iter().enumerate().take(mr.min(rows - r0)) {
                    let o = &mut part.o[(r0 + i) * dv + vp * nr..][..cols];
                    for (x, &t) in o.iter_mut().zip(&trow[..cols]) {
                        *x += t;
                    }
                }
            }
        }
    }
    part
}

/// The softmax update of one row of scores (`row`: the chunk's scores,
/// already masked with −inf): new running max, rescale of `o`, and the
/// row's probabilities in place; a row with nothing visible is zeroed and
/// changes nothing.
#[inline]
fn softmax_step(m: &mut f32, l: &mut f32, o: &mut [f32], row: &mut [f32]) {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
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

/// [`attend`] on AMX-BF16: chunks of up to 128 tokens (whole pages);
/// `Sᵀ = K·Qᵀ` with K rows (bf16, exact) as the row operand and Q as VNNI
/// pairs over its rows (K = 576 padded to 640), the f32 online softmax, then
/// `O += P·V` with P split into two bf16 (`hi + lo`, 16 significant bits:
/// FlashMLA's single bf16 rounding of P fails SPEC §4's elementwise bound
/// on short sequences) and V (the first `dv` channels) packed as token pairs.
fn attend_amx(
    cx: &Ctx<'_>,
    amx: &Amx,
    b: usize,
    kvh: usize,
    pages: std::ops::Range<usize>,
) -> Partial {
    const BL: usize = amx::BLOCK;
    const TC: usize = amx::K; // tokens per chunk (the PV product's K)
    let MlaDecodeDims {
        s_q,
        h_q,
        h_kv,
        d,
        dv,
        block_size: bs,
        max_blocks,
        ..
    } = cx.dims;
    let group = h_q / h_kv;
    let rows = s_q * group;
    let rp = rows.div_ceil(BL) * BL;
    let kbd = d.div_ceil(amx::K);
    let dpad = kbd * amx::K;
    let dvp = dv.div_ceil(BL) * BL;
    let seqlen = cx.seqlens[b] as usize;
    let ppc = (TC / bs).max(1); // pages per chunk (bs ≤ 128, checked by the caller)

    // Q as VNNI pairs over its rows: [dpad/2][rp].
    let mut qv = zeroed_lines::<u32>(dpad / 2 * rp);
    let mut visible = vec![0usize; rows];
    for r in 0..rows {
        let (s, h) = (r / group, kvh * group + r % group);
        let qrow = &cx.q[((b * s_q + s) * h_q + h) * d..][..d];
        for (i, pair) in qrow.chunks(2).enumerate() {
            let lo = pair[0].to_bits() >> 16;
            let hi = pair.get(1).map_or(0, |v| v.to_bits() >> 16);
            qv[i * rp + r] = lo | hi << 16;
        }
        visible[r] = if cx.causal {
            seqlen.saturating_sub(s_q - 1 - s)
        } else {
            seqlen
        };
    }
    let max_visible = visible.iter().copied().max().unwrap_or(0);
    let mut part = Partial {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0f32; rows],
        o: vec![0f32; rows * dv],
    };
    // K rows of a chunk, [TC][dpad] bf16 (zero padding and zero rows past
    // the chunk's tokens: a NaN there would reach P·V as 0·NaN).
    let mut kbuf = zeroed_lines::<u16>(TC * dpad);
    let mut scores = vec![0f32; rows * TC];
    // P as bf16 hi ‖ lo halves, [rp][2·TC]: p ≈ hi + lo to 2^-17.
    let mut p16 = zeroed_lines::<u16>(rp * 2 * TC);
    // V as token pairs, twice ([2][TC/2][dvp]): the hi and lo K blocks.
    let mut vv = zeroed_lines::<u32>(TC * dvp);
    let mut out = Aligned::<Block>([[0f32; BL]; BL]);
    let kc = cx.kc;

    let mut page = pages.start;
    while page < pages.end {
        let t0 = page * bs;
        if t0 >= max_visible {
            break;
        }
        let np = ppc.min(pages.end - page);
        let tn = (np * bs).min(seqlen - t0);
        for tt in 0..TC {
            let row = &mut kbuf[tt * dpad..][..d];
            if tt < tn {
                let pg = page + tt / bs;
                let blk = cx.table[b * max_blocks + pg] as usize; // checked by the caller
                let off = ((blk * bs + tt % bs) * h_kv + kvh) * d;
                for (o, c) in row
                    .iter_mut()
                    .zip(kc[off * 2..(off + d) * 2].chunks_exact(2))
                {
                    *o = u16::from_le_bytes([c[0], c[1]]);
                }
            } else {
                row.fill(0);
            }
        }
        let tnp = tn.div_ceil(BL) * BL;
        // Sᵀ[t][r] = K[t]·Q[r], stored as S[r][t] (row stride TC).
        for tb in (0..tnp).step_by(BL) {
            for r0 in (0..rows).step_by(BL) {
                amx.block_k(kbd, &kbuf[tb * dpad..], dpad, &qv[r0..], rp, &mut out.0);
                for (i, orow) in out.0.iter().enumerate().take(tn.saturating_sub(tb).min(BL)) {
                    for (j, &v) in orow.iter().enumerate().take((rows - r0).min(BL)) {
                        scores[(r0 + j) * TC + tb + i] = v * cx.scale;
                    }
                }
            }
        }
        // Mask, the online softmax, P in bf16.
        for r in 0..rows {
            let row = &mut scores[r * TC..r * TC + tn];
            let vis = visible[r].saturating_sub(t0).min(tn);
            row[vis..].fill(f32::NEG_INFINITY);
            softmax_step(
                &mut part.m[r],
                &mut part.l[r],
                &mut part.o[r * dv..(r + 1) * dv],
                row,
            );
            let (hi, lo) = p16[r * 2 * TC..(r + 1) * 2 * TC].split_at_mut(TC);
            for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(row.iter()) {
                let vh = half::bf16::from_f32(v);
                *h = vh.to_bits();
                *l = half::bf16::from_f32(v - vh.to_f32()).to_bits();
            }
            hi[tn..].fill(0);
            lo[tn..].fill(0);
        }
        // V as token pairs: vv[q][c] = V[2q][c] | V[2q+1][c] << 16.
        for q in 0..TC / 2 {
            let (r0, r1) = (
                &kbuf[2 * q * dpad..][..dv],
                &kbuf[(2 * q + 1) * dpad..][..dv],
            );
            let dst = &mut vv[q * dvp..][..dv];
            for ((o, &x), &y) in dst.iter_mut().zip(r0).zip(r1) {
                *o = x as u32 | (y as u32) << 16;
            }
        }
        vv.copy_within(..TC / 2 * dvp, TC / 2 * dvp);
        // O[r] += P[r]·V.
        for r0 in (0..rows).step_by(BL) {
            for c0 in (0..dv).step_by(BL) {
                amx.block_k(2, &p16[r0 * 2 * TC..], 2 * TC, &vv[c0..], dvp, &mut out.0);
                let cols = (dv - c0).min(BL);
                for (i, orow) in out.0.iter().enumerate().take((rows - r0).min(BL)) {
                    let o = &mut part.o[(r0 + i) * dv + c0..][..cols];
                    for (x, &t) in o.iter_mut().zip(&orow[..cols]) {
                        *x += t;
                    }
                }
            }
        }
        page += np;
    }
    part
}

pub(crate) fn mla_decode(op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    const OP: &str = "mla_decode";
    let (a, dims) = op.parts();
    let MlaDecodeDims {
        batch,
        s_q,
        h_q,
        h_kv,
        dv,
        num_blocks,
        block_size,
        max_blocks,
        ..
    } = dims.clone();

    // Index checks come before any read of the cache.
    let seqlens = crate::to_host(a.cache_seqlens)?.to_i64_vec();
    let table = crate::to_host(a.block_table)?.to_i64_vec();
    let capacity = (max_blocks as i64).saturating_mul(block_size as i64);
    for (b, &len) in seqlens.iter().enumerate() {
        if len < 0 || len > capacity {
            return Err(Error::IndexOutOfRange {
                op: OP,
                arg: "cache_seqlens",
                position: vec![b],
                value: len,
                range: format!(
                    "[0, {capacity}] (max_blocks {max_blocks} × block_size {block_size})"
                ),
            });
        }
        for j in 0..(len as usize).div_ceil(block_size) {
            let blk = table[b * max_blocks + j];
            if blk < 0 || blk >= num_blocks as i64 {
                return Err(Error::IndexOutOfRange {
                    op: OP,
                    arg: "block_table",
                    position: vec![b, j],
                    value: blk,
                    range: format!("[0, {num_blocks}) (num_blocks)"),
                });
            }
        }
    }

    let q = f32_values(a.q)?;
    let cx = Ctx {
        dims: dims.clone(),
        q: &q,
        kc: bytes_of(a.kcache)?,
        kdtype: a.kcache.dtype(),
        table: &table,
        seqlens: &seqlens,
        scale: a.softmax_scale,
        causal: a.causal,
        simd: current_simd(),
        amx: super::current_amx()
            && a.q.dtype() == deepport_core::DType::BF16
            && a.kcache.dtype() == deepport_core::DType::BF16
            && block_size <= amx::K,
    };
    let group = h_q / h_kv;
    let rows = s_q * group;

    // Enough work items for every thread: split the pages when the batch
    // alone is too small.
    let items = batch * h_kv;
    let threads = rayon::current_num_threads();
    let max_pages = seqlens
        .iter()
        .map(|&l| (l as usize).div_ceil(block_size))
        .max()
        .unwrap_or(0);
    let splits = if items >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(items.max(1))
            .clamp(1, max_pages.max(1))
    };
    let work: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..h_kv).flat_map(move |h| (0..splits).map(move |s| (b, h, s))))
        .collect();
    let parts: Vec<Partial> = work
        .par_iter()
        .map(|&(b, kvh, s)| {
            let pages = (seqlens[b] as usize).div_ceil(block_size);
            let range = s * pages / splits..(s + 1) * pages / splits;
            if cx.amx {
                if let Some(part) = amx::with_amx(|x| attend_amx(&cx, x, b, kvh, range.clone())) {
                    return part;
                }
            }
            attend(&cx, b, kvh, range)
        })
        .collect();

    // Combine the splits of each (batch row, kv head).
    let mut out = vec![0f32; batch * s_q * h_q * dv];
    let mut lse = vec![0f32; batch * h_q * s_q];
    for (w, chunk) in parts.chunks(splits).enumerate() {
        let (b, kvh) = (w / h_kv, w % h_kv);
        for r in 0..rows {
            let (s, h) = (r / group, kvh * group + r % group);
            let m = chunk
                .iter()
                .map(|p| p.m[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[((b * s_q + s) * h_q + h) * dv..][..dv];
            let li = (b * h_q + h) * s_q + s;
            if m == f32::NEG_INFINITY {
                lse[li] = f32::INFINITY;
                continue;
            }
            let mut l = 0f32;
            for p in chunk {
                if p.m[r] == f32::NEG_INFINITY {
                    continue;
                }
                let w = (p.m[r] - m).exp();
                l += p.l[r] * w;
                for (x, &y) in o.iter_mut().zip(&p.o[r * dv..(r + 1) * dv]) {
                    *x += y * w;
                }
            }
            let inv = 1.0 / l;
            for x in o.iter_mut() {
                *x *= inv;
            }
            lse[li] = m + l.ln();
        }
    }
    let odt = a.out.dtype();
    encode_into(odt, &out, bytes_mut_of(a.out)?);
    let ldt = a.lse.dtype();
    encode_into(ldt, &lse, bytes_mut_of(a.lse)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::exp_nonpos;

    #[test]
    fn exp_is_close_to_std() {
        let mut x = 0f32;
        while x > -100.0 {
            let (got, want) = (exp_nonpos(x), x.exp());
            if x < -87.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!((got - want).abs() <= 4e-7 * want, "x {x}: {got} vs {want}");
            }
            x -= 0.0137;
        }
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }
}
