//! Dense reference ops (SPEC.md §1–3, §6, §8): FP8 quantization, the FP8
//! GEMM family, the plain GEMM, RMSNorm, RoPE, the MoE gate and the
//! elementwise ops.
//!
//! This is the specification of the oracle, so it is written as plain
//! loops, one element after another. Where SPEC.md fixes
//! an f32 step (act_quant, the weight_dequant product, the RoPE angle) the
//! code does exactly that step in f32; everything else accumulates in f64
//! and rounds **once**, directly from f64, to the output dtype
//! ([`round_f64`]). `cpu-ref`'s kernels (`crate::dense`) compute the same
//! arithmetic faster; `tests/oracle_bitexact.rs` holds them to these loops.

use crate::util::{f32s, host, i64s, put_f32, put_host, put_i64};
use deepport_core::backend::Tensor;
use deepport_core::formats;
use deepport_core::ops::index::{check_range, check_value};
use deepport_core::ops::*;
use deepport_core::tensor::unravel;
use deepport_core::{DType, Error, HostTensor, Result};

// ---- rounding and output helpers ------------------------------------------

/// Rounds an f64 to the nearest value of a float dtype (ties to even,
/// overflow to ±inf for the IEEE-like types), in **one** rounding, and
/// returns it as the f32 that holds it exactly. f32 uses Rust's correctly
/// rounded cast; bf16 and f16 are rounded here because `half`'s f64
/// conversions first truncate the f64 to 32 bits (a second rounding).
/// Other dtypes (FP8) go through f32, which is how SPEC.md defines them.
pub fn round_f64(dtype: DType, x: f64) -> f32 {
    let (man_bits, min_exp, max) = match dtype {
        DType::BF16 => (7, -126, formats::max_finite(DType::BF16) as f64),
        DType::F16 => (10, -14, formats::max_finite(DType::F16) as f64),
        DType::F32 => return x as f32,
        other => return formats::round_to(other, x as f32),
    };
    if !x.is_finite() || x == 0.0 {
        return x as f32;
    }
    let a = x.abs();
    // floor(log2(a)) from the bits; `a` is a normal f64 or a subnormal far
    // below every target's range (then clamped to the subnormal exponent).
    let e = (((a.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(min_exp);
    let quantum = 2f64.powi(e - man_bits);
    // Division and multiplication by a power of two are exact here.
    let q = (a / quantum).round_ties_even() * quantum;
    let r = if q > max { f64::INFINITY } else { q };
    let r = r as f32; // exact: r is representable in the target, hence in f32
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Writes f64 values into `t`, each rounded once to `t`'s dtype.
pub(crate) fn put_f64(t: &mut Tensor, values: &[f64]) -> Result<()> {
    let dtype = t.dtype();
    let v: Vec<f32> = values.iter().map(|&x| round_f64(dtype, x)).collect();
    put_f32(t, &v)
}

/// Runs `f(row, out_row)` over the rows of `out` (each `row_len` long),
/// one after another.
fn each_row<F>(out: &mut [f64], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f64]),
{
    if row_len == 0 {
        return;
    }
    for (r, row) in out.chunks_mut(row_len).enumerate() {
        f(r, row);
    }
}

/// Fails with `NonFinite` at the first NaN/inf of `values` (shape `shape`).
pub(crate) fn check_finite(
    op: &'static str,
    arg: &'static str,
    values: &[f32],
    shape: &[usize],
) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite {
            op,
            arg,
            position: unravel(i, shape),
            value: values[i] as f64,
        }),
    }
}

// ---- §2 act_quant ------------------------------------------------------------

/// The specification of `act_quant`: `cpu-ref`'s kernel must give these bytes.
pub fn act_quant(op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    const OP: &str = "act_quant";
    let (args, dims) = op.parts();
    let (m, k) = (dims.m, dims.k);
    let x = f32s(args.x)?;
    // A NaN would poison the scale of its whole group without a trace.
    check_finite(OP, "x", &x, &[m, k])?;
    let groups = k / QBLOCK;
    let mut q = vec![0f32; m * k];
    let mut s = vec![0f32; m * groups];
    for r in 0..m {
        for g in 0..groups {
            let lo = r * k + g * QBLOCK;
            let xs = &x[lo..lo + QBLOCK];
            let mut amax = 0f32;
            for &v in xs {
                amax = amax.max(v.abs());
            }
            let amax = amax.max(1e-4f32);
            let mut scale = amax / dims.fp8_max;
            if args.scale_fmt == ScaleFmt::Ue8m0 {
                scale = formats::ue8m0_round_up(scale);
            }
            s[r * groups + g] = scale;
            for (j, &v) in xs.iter().enumerate() {
                // f32 division; the FP8 encode (nearest even, saturating)
                // happens once, in `put_f32` with q's dtype.
                q[lo + j] = v / scale;
            }
        }
    }
    put_f32(args.q, &q)?;
    put_f32(args.s, &s)
}

// ---- weight_dequant ----------------------------------------------------------

/// The specification of `weight_dequant`: `cpu-ref`'s kernel must give these bytes.
pub fn weight_dequant(op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (n, k) = (dims.n, dims.k);
    let w = f32s(args.w)?;
    let s = f32s(args.s)?;
    let kb = blocks128(k);
    let mut out = vec![0f32; n * k];
    for i in 0..n {
        for j in 0..k {
            // The f32 product DeepSeek's weight_dequant computes; put_f32
            // then rounds once to out's dtype.
            out[i * k + j] = w[i * k + j] * s[(i / QBLOCK) * kb + j / QBLOCK];
        }
    }
    put_f32(args.out, &out)
}

// ---- §3 FP8 GEMM family ------------------------------------------------------

/// One output row of the block-scaled FP8 GEMM:
/// `d[j] = Σ_kb (Σ_{k∈kb} a[k]·b[j,k]) · sa[kb] · sb[j/128, kb]`.
/// `a_row [k]`, `sa_row [kb]`, `b [n, k]`, `sb [nb, kb]` of one group.
/// Products of two FP8 values are exact in f64 and so are the inner sums
/// (they span far fewer than 53 bits); the scaled block sums add in f64.
fn fp8_row(a_row: &[f32], sa_row: &[f32], b: &[f32], sb: &[f32], k: usize, out: &mut [f64]) {
    let kb = blocks128(k);
    for (j, o) in out.iter_mut().enumerate() {
        let b_row = &b[j * k..(j + 1) * k];
        let mut acc = 0f64;
        for blk in 0..kb {
            let lo = blk * QBLOCK;
            let hi = (lo + QBLOCK).min(k);
            let mut inner = 0f64;
            for kk in lo..hi {
                inner += a_row[kk] as f64 * b_row[kk] as f64;
            }
            acc += inner * sa_row[blk] as f64 * sb[(j / QBLOCK) * kb + blk] as f64;
        }
        *o = acc;
    }
}

/// The specification of `fp8_gemm`: `cpu-ref`'s kernel must give these bytes.
pub fn fp8_gemm(op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let a = f32s(args.a)?;
    let sa = f32s(args.sa)?;
    let b = f32s(args.b)?;
    let sb = f32s(args.sb)?;
    let kb = blocks128(k);
    let mut d = vec![0f64; m * n];
    each_row(&mut d, n, |i, row| {
        fp8_row(
            &a[i * k..(i + 1) * k],
            &sa[i * kb..(i + 1) * kb],
            &b,
            &sb,
            k,
            row,
        )
    });
    put_f64(args.d, &d)
}

/// The specification of `fp8_grouped_contiguous`: `cpu-ref`'s kernel must give these bytes.
pub fn fp8_grouped_contiguous(op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
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
    let kb = blocks128(k);
    let (b_len, sb_len) = (n * k, blocks128(n) * kb);
    let mut d = vec![0f64; m * n];
    each_row(&mut d, n, |i, row| {
        // Padding rows (-1): unspecified by SPEC.md; the reference writes 0.
        if let Ok(grp) = usize::try_from(idx[i]) {
            fp8_row(
                &a[i * k..(i + 1) * k],
                &sa[i * kb..(i + 1) * kb],
                &b[grp * b_len..(grp + 1) * b_len],
                &sb[grp * sb_len..(grp + 1) * sb_len],
                k,
                row,
            );
        }
    });
    put_f64(args.d, &d)
}

/// The specification of `fp8_grouped_masked`: `cpu-ref`'s kernel must give these bytes.
pub fn fp8_grouped_masked(op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
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
    let kb = blocks128(k);
    let (b_len, sb_len) = (n * k, blocks128(n) * kb);
    // Rows at or past masked_m[g] keep their bytes: start from d as it is.
    let mut d_host = host(args.d)?;
    let dtype = d_host.dtype();
    let row_bytes = n * dtype.size();
    for grp in 0..g {
        let rows = masked[grp] as usize; // checked to lie in [0, m_max]
        let mut vals = vec![0f64; rows * n];
        each_row(&mut vals, n, |i, row| {
            let r = grp * m_max + i;
            fp8_row(
                &a[r * k..(r + 1) * k],
                &sa[r * kb..(r + 1) * kb],
                &b[grp * b_len..(grp + 1) * b_len],
                &sb[grp * sb_len..(grp + 1) * sb_len],
                k,
                row,
            );
        });
        let rounded: Vec<f32> = vals.iter().map(|&x| round_f64(dtype, x)).collect();
        let enc = HostTensor::from_f32(dtype, &[rows * n], &rounded);
        let start = grp * m_max * row_bytes;
        d_host.bytes_mut()[start..start + rows * row_bytes].copy_from_slice(enc.bytes());
    }
    put_host(args.d, &d_host)
}

// ---- plain GEMM --------------------------------------------------------------

/// The specification of `gemm`: `cpu-ref`'s kernel must give these bytes.
pub fn gemm(op: &mut Checked<Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let a = f32s(args.a)?;
    let b = f32s(args.b)?;
    let mut d = vec![0f64; m * n];
    each_row(&mut d, n, |i, row| {
        let a_row = &a[i * k..(i + 1) * k];
        for (j, o) in row.iter_mut().enumerate() {
            let b_row = &b[j * k..(j + 1) * k];
            let mut acc = 0f64;
            for kk in 0..k {
                acc += a_row[kk] as f64 * b_row[kk] as f64;
            }
            *o = acc;
        }
    });
    put_f64(args.d, &d)
}

// ---- RMSNorm -----------------------------------------------------------------

/// The specification of `rms_norm`: `cpu-ref`'s kernel must give these bytes.
pub fn rms_norm(op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (rows, dim) = (dims.rows, dims.dim);
    let x = f32s(args.x)?;
    let w = f32s(args.weight)?;
    let eps = args.eps as f64;
    let mut y = vec![0f64; rows * dim];
    for r in 0..rows {
        let xs = &x[r * dim..(r + 1) * dim];
        let mut ss = 0f64;
        for &v in xs {
            ss += v as f64 * v as f64;
        }
        let inv = 1.0 / (ss / dim as f64 + eps).sqrt();
        for j in 0..dim {
            y[r * dim + j] = xs[j] as f64 * inv * w[j] as f64;
        }
    }
    put_f64(args.y, &y)
}

// ---- §8 RoPE -----------------------------------------------------------------

/// The specification of `rope`: `cpu-ref`'s kernel must give these bytes.
pub fn rope(op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (args, dims) = op.parts();
    let (heads, d) = (dims.heads, dims.d);
    let pos_host = host(args.positions)?;
    check_range(OP, "positions", &pos_host, 0, i64::MAX, None)?;
    let pos = pos_host.to_i64_vec();
    let freq = args.config.inv_freq(d);
    let cs_scale = args.config.cos_sin_scale() as f64;
    let x = f32s(args.x)?;
    let mut y = vec![0f64; x.len()];
    for (tok, &p) in pos.iter().enumerate() {
        let p = p as f32;
        for (i, &f) in freq.iter().enumerate() {
            let angle = p * f; // in f32, as SPEC.md §8 fixes
            let c = (angle as f64).cos() * cs_scale;
            let s = (angle as f64).sin() * cs_scale;
            let (c0, c1) = args.config.layout.pair(i, d);
            for h in 0..heads {
                let base = (tok * heads + h) * d;
                let (i0, i1) = (base + c0, base + c1);
                let (x0, x1) = (x[i0] as f64, x[i1] as f64);
                y[i0] = x0 * c - x1 * s;
                y[i1] = x0 * s + x1 * c;
            }
        }
    }
    put_f64(args.y, &y)
}

// ---- §6 MoE gate -------------------------------------------------------------

/// The specification of `moe_gate`: `cpu-ref`'s kernel must give these bytes.
pub fn moe_gate(op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (t, dim, e) = (dims.tokens, dims.dim, dims.experts);
    let (n_group, topk_group, topk) = (args.n_group, args.topk_group, args.topk);
    let (x, w, bias) = gate_inputs(args, dims)?;
    let mut out_idx = vec![0i64; t * topk];
    let mut out_w = vec![0f64; t * topk];
    for tok in 0..t {
        let xs = &x[tok * dim..(tok + 1) * dim];
        // s = sigmoid(logit) in f64, rounded once to f32; s' = s + bias in f32.
        let mut s = vec![0f32; e];
        let mut sb = vec![0f32; e];
        for ex in 0..e {
            let ws = &w[ex * dim..(ex + 1) * dim];
            let mut logit = 0f64;
            for j in 0..dim {
                logit += xs[j] as f64 * ws[j] as f64;
            }
            s[ex] = (1.0 / (1.0 + (-logit).exp())) as f32;
            sb[ex] = s[ex] + bias[ex];
        }
        route_token(
            &s,
            &sb,
            (n_group, topk_group, topk),
            args.route_scale,
            &mut out_idx[tok * topk..(tok + 1) * topk],
            &mut out_w[tok * topk..(tok + 1) * topk],
        );
    }
    put_i64(args.topk_idx, &out_idx)?;
    put_f64(args.topk_weights, &out_w)
}

// ---- elementwise and gather ----------------------------------------------------

/// `moe_gate`'s `x`, `weight` and `bias` (zeros without one) as f32, each
/// checked finite (`NonFinite` at the first position that is not).
pub(crate) fn gate_inputs(
    args: &MoeGate<'_>,
    dims: &MoeGateDims,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "moe_gate";
    let (t, dim, e) = (dims.tokens, dims.dim, dims.experts);
    let x = f32s(args.x)?;
    check_finite(OP, "x", &x, &[t, dim])?;
    let w = f32s(args.weight)?;
    check_finite(OP, "weight", &w, &[e, dim])?;
    let bias = match args.bias {
        Some(b) => {
            let b = f32s(b)?;
            check_finite(OP, "bias", &b, &[e])?;
            b
        }
        None => vec![0f32; e],
    };
    Ok((x, w, bias))
}

/// One token's routing from its scores `s` (sigmoid, f32) and `sb`
/// (`s + bias`, f32): the `topk_group` groups of the largest sums of their
/// two largest `sb` (ties to the lower group), in them the `topk` experts
/// of the largest `sb` (ties to the lower index), and their weights
/// `s / Σ s · route_scale` in f64. `groups` is `(n_group, topk_group,
/// topk)`.
pub(crate) fn route_token(
    s: &[f32],
    sb: &[f32],
    groups: (usize, usize, usize),
    route_scale: f32,
    idx: &mut [i64],
    w: &mut [f64],
) {
    let (n_group, topk_group, topk) = groups;
    let gsz = s.len() / n_group;
    // Group score: sum of the two largest s' of the group (exact in f64).
    let mut gscore: Vec<(f64, usize)> = (0..n_group)
        .map(|grp| {
            let mut v: Vec<f32> = sb[grp * gsz..(grp + 1) * gsz].to_vec();
            v.sort_by(|p, q| q.total_cmp(p));
            (v[0] as f64 + v[1] as f64, grp)
        })
        .collect();
    // Descending score, ties to the lower group index.
    gscore.sort_by(|p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)));
    let mut kept: Vec<usize> = Vec::with_capacity(topk_group * gsz);
    for &(_, grp) in &gscore[..topk_group] {
        kept.extend(grp * gsz..(grp + 1) * gsz);
    }
    // Descending s', ties to the lower expert index.
    kept.sort_by(|&p, &q| sb[q].total_cmp(&sb[p]).then(p.cmp(&q)));
    let chosen = &kept[..topk];
    let mut sum = 0f64;
    for &ex in chosen {
        sum += s[ex] as f64;
    }
    for (slot, &ex) in chosen.iter().enumerate() {
        idx[slot] = ex as i64;
        w[slot] = s[ex] as f64 / (sum + 1e-20) * route_scale as f64;
    }
}

/// The specification of `silu_mul`: `cpu-ref`'s kernel must give these bytes.
pub fn silu_mul(op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    let args = op.args_mut();
    let g = f32s(args.gate)?;
    let u = f32s(args.up)?;
    let out: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect();
    put_f64(args.out, &out)
}

/// The specification of `embedding`: `cpu-ref`'s kernel must give these bytes.
pub fn embedding(op: &mut Checked<Embedding<'_>>) -> Result<()> {
    const OP: &str = "embedding";
    let (args, dims) = op.parts();
    let ids_host = host(args.ids)?;
    check_range(OP, "ids", &ids_host, 0, dims.vocab as i64, None)?;
    let ids = ids_host.to_i64_vec();
    let table = f32s(args.table)?;
    let dim = dims.dim;
    let mut out = Vec::with_capacity(dims.tokens * dim);
    for &id in &ids {
        let r = id as usize; // checked above
        out.extend_from_slice(&table[r * dim..(r + 1) * dim]);
    }
    // Table values are exact in f32; put_f32 rounds once to out's dtype.
    put_f32(args.out, &out)
}

/// The specification of `add`: `cpu-ref`'s kernel must give these bytes.
pub fn add(op: &mut Checked<Add<'_>>) -> Result<()> {
    let args = op.args_mut();
    let a = f32s(args.a)?;
    let b = f32s(args.b)?;
    let out: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    put_f64(args.out, &out)
}

#[cfg(test)]
mod tests {
    use super::round_f64;
    use deepport_core::DType;

    #[test]
    fn round_f64_is_one_rounding() {
        // 1 + 2^-8 is the bf16 halfway point between 1 and 1 + 2^-7: a tiny
        // excess (beyond f32's precision) must round up, not to even.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(round_f64(DType::BF16, x), 1.0 + 2f32.powi(-7));
        assert_eq!(round_f64(DType::BF16, 1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(
            round_f64(DType::BF16, -(1.0 + 3.0 * 2f64.powi(-8))),
            -(1.0 + 2f32.powi(-6))
        );
        let y = 1.0 + 2f64.powi(-11) + 2f64.powi(-45);
        assert_eq!(round_f64(DType::F16, y), 1.0 + 2f32.powi(-10));
        assert_eq!(round_f64(DType::F16, 65520.0), f32::INFINITY);
        assert_eq!(round_f64(DType::F16, 65519.0), 65504.0);
        // f16 subnormal spacing 2^-24.
        assert_eq!(round_f64(DType::F16, 1.4 * 2f64.powi(-24)), 2f32.powi(-24));
        assert!(round_f64(DType::BF16, f64::NAN).is_nan());
        assert_eq!(round_f64(DType::F32, 0.1), 0.1f32);
    }
}
