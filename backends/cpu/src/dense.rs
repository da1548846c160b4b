//! `cpu-ref`'s dense kernels: the FP8 GEMM family, the plain GEMM and
//! weight_dequant, computed fast with the arithmetic of the specification
//! in [`crate::scalar::dense`].
//!
//! Every output element gets exactly the operations of the scalar loops, in
//! the same order, and the same single rounding: the GEMMs keep one f64
//! accumulator per output element and add its products in `k` order (for
//! the FP8 GEMMs, per 128-wide block: an inner f64 sum from 0, then
//! `acc += inner · sa · sb`). What changes is only *which* elements are
//! computed together: tiles of outputs run on several threads
//! ([`par_map`]), and register tiles of `MR × NR` independent accumulators
//! advance together through `k` ([`crate::tiles`], compiled per
//! instruction set and vectorized across the `NR` columns; no
//! reassociation, no fused multiply-add). Operands are
//! widened to f64 once per tile and block (exact for every input dtype).
//!
//! The ops whose cost does not matter keep the scalar loops unchanged.

use crate::scalar::dense::put_f64;
use crate::tiles::{panels, MR, NR};
use crate::util::{f32s, host, i64s, par_map, put_f32, put_host};
use deepport_core::ops::index::{check_range, check_value};
use deepport_core::ops::*;
use deepport_core::{HostTensor, Result};

pub(crate) use crate::scalar::dense::{act_quant, add, embedding, rms_norm, rope, silu_mul};

// ---- the MoE gate ------------------------------------------------------------

/// `moe_gate` with the specification's arithmetic (`scalar::dense`): each
/// logit is the same sequential f64 sum `Σ_j x_j·w_ej`, but the experts'
/// sums advance together through `j` (independent chains instead of one
/// latency-bound chain per expert, over `W` transposed once per call), and
/// tokens run in parallel. The routing of each token is the
/// specification's own (`route_token`).
pub(crate) fn moe_gate(op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    use crate::scalar::dense::{gate_inputs, route_token};
    let (args, dims) = op.parts();
    let (t, dim, e) = (dims.tokens, dims.dim, dims.experts);
    let groups = (args.n_group, args.topk_group, args.topk);
    let topk = args.topk;
    let (x, w, bias) = gate_inputs(args, dims)?;
    // W transposed, widened: `[dim][e]`.
    let mut wt = vec![0f64; dim * e];
    for (ex, row) in w.chunks_exact(dim.max(1)).enumerate().take(e) {
        for (j, &v) in row.iter().enumerate() {
            wt[j * e + ex] = f64::from(v);
        }
    }
    use rayon::prelude::*;
    let (idx, wts): (Vec<Vec<i64>>, Vec<Vec<f64>>) = (0..t)
        .into_par_iter()
        .map(|tok| {
            let xs = &x[tok * dim..(tok + 1) * dim];
            let mut logit = vec![0f64; e];
            for (j, &xj) in xs.iter().enumerate() {
                let xj = f64::from(xj);
                for (l, &wv) in logit.iter_mut().zip(&wt[j * e..(j + 1) * e]) {
                    *l += xj * wv;
                }
            }
            let s: Vec<f32> = logit
                .iter()
                .map(|&l| (1.0 / (1.0 + (-l).exp())) as f32)
                .collect();
            let sb: Vec<f32> = s.iter().zip(&bias).map(|(&v, &b)| v + b).collect();
            let (mut idx, mut wts) = (vec![0i64; topk], vec![0f64; topk]);
            route_token(&s, &sb, groups, args.route_scale, &mut idx, &mut wts);
            (idx, wts)
        })
        .unzip();
    crate::util::put_i64(args.topk_idx, &idx.concat())?;
    put_f64(args.topk_weights, &wts.concat())
}

// ---- the tiled GEMMs ---------------------------------------------------------

/// Rows of A per parallel work unit.
const MC: usize = 128;
/// Columns of B per parallel work unit.
const NC: usize = 128;
/// `k` per packed block (the FP8 scale block).
const KC: usize = QBLOCK;

/// How the products of one `k` block reach an element's accumulator.
#[derive(Clone, Copy)]
pub(crate) enum Accum<'s> {
    /// `acc += a·b` straight through `k` (the plain GEMM).
    Plain,
    /// Per 128-block: `inner` from 0, then `acc += inner · sa[r, blk] ·
    /// sb[j/128, blk]` (the FP8 GEMMs). `sa` has a row of `kb` per row of
    /// A, `sb` a row of `kb` per 128 columns of B.
    Fp8 { sa: &'s [f32], sb: &'s [f32] },
}

/// `d[r][j]` for `r` in `rows` (indices of rows of `a [·, k]`) and `j <
/// n` (rows of `b [n, k]`), in the order of `rows`: the GEMM of the scalar
/// loops (`acc` from 0, products in `k` order), tile by tile.
pub(crate) fn tiled(
    a: &[f32],
    rows: &[usize],
    b: &[f32],
    n: usize,
    k: usize,
    mode: Accum<'_>,
) -> Vec<f64> {
    let m = rows.len();
    let mut d = vec![0f64; m * n];
    if m == 0 || n == 0 {
        return d;
    }
    let (units_m, units_n) = (m.div_ceil(MC), n.div_ceil(NC));
    let kb = blocks128(k);
    let simd = crate::fast::current_simd();
    let tiles = par_map(units_m * units_n, |u| {
        let (um, un) = (u / units_n, u % units_n);
        let (r0, r1) = (um * MC, ((um + 1) * MC).min(m));
        let (c0, c1) = (un * NC, ((un + 1) * NC).min(n));
        let (mg, ng) = ((r1 - r0).div_ceil(MR), (c1 - c0).div_ceil(NR));
        let mut acc = vec![[[0f64; NR]; MR]; mg * ng];
        let mut inner = vec![[[0f64; NR]; MR]; mg * ng];
        let mut ap = vec![0f64; mg * KC * MR];
        let mut bp = vec![0f64; ng * KC * NR];
        for blk in 0..kb {
            let (lo, hi) = (blk * KC, ((blk + 1) * KC).min(k));
            let kc = hi - lo;
            let ap = &mut ap[..mg * kc * MR];
            let bp = &mut bp[..ng * kc * NR];
            // Pack A: [mg][kc][MR], rows past the tile are 0 (never stored).
            for (g, panel) in ap.chunks_exact_mut(kc * MR).enumerate() {
                for ii in 0..MR {
                    let r = r0 + g * MR + ii;
                    if r < r1 {
                        let src = &a[rows[r] * k + lo..rows[r] * k + hi];
                        for (kk, &v) in src.iter().enumerate() {
                            panel[kk * MR + ii] = v as f64;
                        }
                    } else {
                        for kk in 0..kc {
                            panel[kk * MR + ii] = 0.0;
                        }
                    }
                }
            }
            // Pack B: [ng][kc][NR], columns past the tile are 0.
            for (g, panel) in bp.chunks_exact_mut(kc * NR).enumerate() {
                for jj in 0..NR {
                    let j = c0 + g * NR + jj;
                    if j < c1 {
                        let src = &b[j * k + lo..j * k + hi];
                        for (kk, &v) in src.iter().enumerate() {
                            panel[kk * NR + jj] = v as f64;
                        }
                    } else {
                        for kk in 0..kc {
                            panel[kk * NR + jj] = 0.0;
                        }
                    }
                }
            }
            match mode {
                Accum::Plain => panels(simd, ap, kc * MR, mg, bp, kc * NR, ng, kc, &mut acc),
                Accum::Fp8 { sa, sb } => {
                    inner.iter_mut().for_each(|t| *t = [[0.0; NR]; MR]);
                    panels(simd, ap, kc * MR, mg, bp, kc * NR, ng, kc, &mut inner);
                    for gi in 0..mg {
                        for ii in 0..MR {
                            let r = r0 + gi * MR + ii;
                            if r >= r1 {
                                break;
                            }
                            let s_a = sa[rows[r] * kb + blk] as f64;
                            for gj in 0..ng {
                                let t = gi * ng + gj;
                                for jj in 0..NR {
                                    let j = c0 + gj * NR + jj;
                                    if j >= c1 {
                                        break;
                                    }
                                    let s_b = sb[(j / QBLOCK) * kb + blk] as f64;
                                    acc[t][ii][jj] += inner[t][ii][jj] * s_a * s_b;
                                }
                            }
                        }
                    }
                }
            }
        }
        (r0, r1, c0, c1, ng, acc)
    });
    for (r0, r1, c0, c1, ng, acc) in tiles {
        for r in r0..r1 {
            let (gi, ii) = ((r - r0) / MR, (r - r0) % MR);
            for j in c0..c1 {
                let (gj, jj) = ((j - c0) / NR, (j - c0) % NR);
                d[r * n + j] = acc[gi * ng + gj][ii][jj];
            }
        }
    }
    d
}

// ---- weight_dequant ----------------------------------------------------------

pub(crate) fn weight_dequant(op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (n, k) = (dims.n, dims.k);
    let w = f32s(args.w)?;
    let s = f32s(args.s)?;
    let kb = blocks128(k);
    // The f32 product of the scalar loops, 128 rows (one scale row) at a time.
    let parts = par_map(n.div_ceil(QBLOCK), |rb| {
        let (r0, r1) = (rb * QBLOCK, ((rb + 1) * QBLOCK).min(n));
        let srow = &s[rb * kb..(rb + 1) * kb];
        let mut out = Vec::with_capacity((r1 - r0) * k);
        for i in r0..r1 {
            let wrow = &w[i * k..(i + 1) * k];
            out.extend(wrow.iter().enumerate().map(|(j, &v)| v * srow[j / QBLOCK]));
        }
        out
    });
    put_f32(args.out, &parts.concat())
}

// ---- §3 FP8 GEMM family ------------------------------------------------------

pub(crate) fn fp8_gemm(op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let a = f32s(args.a)?;
    let sa = f32s(args.sa)?;
    let b = f32s(args.b)?;
    let sb = f32s(args.sb)?;
    let rows: Vec<usize> = (0..m).collect();
    let d = tiled(&a, &rows, &b, n, k, Accum::Fp8 { sa: &sa, sb: &sb });
    put_f64(args.d, &d)
}

pub(crate) fn fp8_grouped_contiguous(op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let (args, dims) = op.parts();
    let (g, m, n, k) = (dims.groups, dims.m, dims.n, dims.k);
    let idx_host = host(args.m_indices)?;
    check_range(OP, "m_indices", &idx_host, 0, g as i64, Some(-1))?;
    let idx = idx_host.to_i64_vec();
    let a = f32s(args.a)?;
    let sa = f32s(args.sa)?;
    let b = f32s(args.b)?;
    let sb = f32s(args.sb)?;
    let (b_len, sb_len) = (n * k, blocks128(n) * blocks128(k));
    // Padding rows (-1) stay 0, as in the scalar loops.
    let mut d = vec![0f64; m * n];
    for grp in 0..g {
        let rows: Vec<usize> = (0..m).filter(|&i| idx[i] == grp as i64).collect();
        let vals = tiled(
            &a,
            &rows,
            &b[grp * b_len..(grp + 1) * b_len],
            n,
            k,
            Accum::Fp8 {
                sa: &sa,
                sb: &sb[grp * sb_len..(grp + 1) * sb_len],
            },
        );
        for (i, &r) in rows.iter().enumerate() {
            d[r * n..(r + 1) * n].copy_from_slice(&vals[i * n..(i + 1) * n]);
        }
    }
    put_f64(args.d, &d)
}

pub(crate) fn fp8_grouped_masked(op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let (args, dims) = op.parts();
    let (g, m_max, n, k) = (dims.groups, dims.m, dims.n, dims.k);
    let masked = i64s(args.masked_m)?;
    for (grp, &v) in masked.iter().enumerate() {
        check_value(OP, "masked_m", &[grp], v, 0, m_max as i64 + 1)?;
    }
    let a = f32s(args.a)?;
    let sa = f32s(args.sa)?;
    let b = f32s(args.b)?;
    let sb = f32s(args.sb)?;
    let (b_len, sb_len) = (n * k, blocks128(n) * blocks128(k));
    // Rows at or past masked_m[g] keep their bytes: start from d as it is.
    let mut d_host = host(args.d)?;
    let dtype = d_host.dtype();
    let row_bytes = n * dtype.size();
    for grp in 0..g {
        let count = masked[grp] as usize; // checked to lie in [0, m_max]
        let rows: Vec<usize> = (grp * m_max..grp * m_max + count).collect();
        let vals = tiled(
            &a,
            &rows,
            &b[grp * b_len..(grp + 1) * b_len],
            n,
            k,
            Accum::Fp8 {
                sa: &sa,
                sb: &sb[grp * sb_len..(grp + 1) * sb_len],
            },
        );
        let rounded: Vec<f32> = vals
            .iter()
            .map(|&x| crate::scalar::dense::round_f64(dtype, x))
            .collect();
        let enc = HostTensor::from_f32(dtype, &[count * n], &rounded);
        let start = grp * m_max * row_bytes;
        d_host.bytes_mut()[start..start + count * row_bytes].copy_from_slice(enc.bytes());
    }
    put_host(args.d, &d_host)
}

// ---- plain GEMM --------------------------------------------------------------

pub(crate) fn gemm(op: &mut Checked<Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let a = f32s(args.a)?;
    let b = f32s(args.b)?;
    let rows: Vec<usize> = (0..m).collect();
    let d = tiled(&a, &rows, &b, n, k, Accum::Plain);
    put_f64(args.d, &d)
}
