//! Elementwise and row ops (`add`, `silu_mul`, `rms_norm`, `embedding`):
//! the reference arithmetic (f64, one rounding to the output dtype), so the
//! results equal `cpu-ref`'s bit for bit, but read from and written to the
//! tensors' bytes directly, in parallel chunks, without intermediate host
//! tensors.

use super::{bytes_mut_of, bytes_of, decode_into, f32_values};
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};
use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// Rounds an f64 to f32 with round-to-odd (the last mantissa bit is set
/// when the conversion is inexact): a following round-to-nearest-even into
/// bf16 or f16 then equals one correct rounding of the f64.
#[inline]
fn f64_to_f32_odd(x: f64) -> f32 {
    let f = x as f32;
    if !x.is_finite() || f64::from(f) == x || f.is_infinite() {
        return f;
    }
    let toward_zero = if f64::from(f).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// Writes `values` (f64) into `dst` as `dtype`, each rounded once.
fn encode_f64(dtype: DType, values: &[f64], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (c, &v) in dst.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&(v as f32).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(values) {
                let h = half::bf16::from_f32(f64_to_f32_odd(v));
                c.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(values) {
                let h = half::f16::from_f32(f64_to_f32_odd(v));
                c.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        other => {
            let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            let h = HostTensor::from_f32(other, &[v.len()], &v);
            dst.copy_from_slice(h.bytes());
        }
    }
}

/// `out[i] = f(x[i], y[i])` in f64, rounded once; x, y, out of equal
/// element counts, in parallel chunks.
fn binary(
    x: &deepport_core::backend::Tensor,
    y: &deepport_core::backend::Tensor,
    out: &mut deepport_core::backend::Tensor,
    f: impl Fn(f64, f64) -> f64 + Sync,
) -> Result<()> {
    let (xd, yd, od) = (x.dtype(), y.dtype(), out.dtype());
    let (xb, yb) = (bytes_of(x)?, bytes_of(y)?);
    let ob = bytes_mut_of(out)?;
    let (xs, ys, os) = (xd.size(), yd.size(), od.size());
    ob.par_chunks_mut(CHUNK * os)
        .enumerate()
        .for_each(|(c, dst)| {
            let n = dst.len() / os;
            let lo = c * CHUNK;
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            decode_into(xd, &xb[lo * xs..(lo + n) * xs], &mut a);
            decode_into(yd, &yb[lo * ys..(lo + n) * ys], &mut b);
            let v: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(&p, &q)| f(f64::from(p), f64::from(q)))
                .collect();
            encode_f64(od, &v, dst);
        });
    Ok(())
}

pub(crate) fn add(op: &mut Checked<Add<'_>>) -> Result<()> {
    let args = op.args_mut();
    binary(args.a, args.b, args.out, |a, b| a + b)
}

pub(crate) fn silu_mul(op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    let args = op.args_mut();
    binary(args.gate, args.up, args.out, |g, u| {
        // exp(-0) is exactly 1: the same value without the call (the
        // padding rows of the MoE's contiguous layout are zeros).
        if g == 0.0 {
            g / 2.0 * u
        } else {
            g / (1.0 + (-g).exp()) * u
        }
    })
}

pub(crate) fn rms_norm(op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (rows, dim) = (dims.rows, dims.dim);
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let w = f32_values(args.weight)?;
    let eps = f64::from(args.eps);
    let (xd, od) = (args.x.dtype(), args.y.dtype());
    let xb = bytes_of(args.x)?;
    let yb = bytes_mut_of(args.y)?;
    let (xs, os) = (xd.size(), od.size());
    let per = (CHUNK / dim).max(1);
    yb.par_chunks_mut(per * dim * os)
        .enumerate()
        .for_each(|(c, dst)| {
            let n = dst.len() / os / dim;
            let r0 = c * per;
            let mut x = vec![0f32; n * dim];
            decode_into(xd, &xb[r0 * dim * xs..(r0 + n) * dim * xs], &mut x);
            let mut y = vec![0f64; n * dim];
            for (xr, yr) in x.chunks(dim).zip(y.chunks_mut(dim)) {
                // The reference's order: a sequential f64 sum.
                let mut ss = 0f64;
                for &v in xr {
                    ss += f64::from(v) * f64::from(v);
                }
                let inv = 1.0 / (ss / dim as f64 + eps).sqrt();
                for ((o, &v), &wj) in yr.iter_mut().zip(xr).zip(w.iter()) {
                    *o = f64::from(v) * inv * f64::from(wj);
                }
            }
            encode_f64(od, &y, dst);
        });
    Ok(())
}

pub(crate) fn embedding(op: &mut Checked<Embedding<'_>>) -> Result<()> {
    const OP: &str = "embedding";
    let (args, dims) = op.parts();
    let ids_host = crate::to_host(args.ids)?;
    check_range(OP, "ids", &ids_host, 0, dims.vocab as i64, None)?;
    let ids = ids_host.to_i64_vec();
    let dim = dims.dim;
    let (td, od) = (args.table.dtype(), args.out.dtype());
    let tb = bytes_of(args.table)?;
    let ob = bytes_mut_of(args.out)?;
    let (ts, os) = (td.size(), od.size());
    if dim == 0 {
        return Ok(());
    }
    for (&id, dst) in ids.iter().zip(ob.chunks_exact_mut(dim * os)) {
        let r = id as usize; // checked above
        let src = &tb[r * dim * ts..(r + 1) * dim * ts];
        if td == od {
            dst.copy_from_slice(src);
        } else {
            // Table values are exact in f32; one rounding to out's dtype.
            let mut v = vec![0f32; dim];
            decode_into(td, src, &mut v);
            super::encode_into(od, &v, dst);
        }
    }
    Ok(())
}

/// `act_quant` (SPEC.md §2) with the reference's arithmetic per 128-wide
/// group — the f32 amax, the 1e-4 floor, `scale = amax / fp8_max` in f32
/// (rounded up to a power of two for UE8M0), each value divided by the
/// scale in f32 and encoded once — so `q` and `s` equal `cpu-ref`'s bytes;
/// rows in parallel chunks, read from and written to the tensors' bytes.
/// A non-finite input is `NonFinite` at its first position, as cpu-ref
/// reports it.
pub(crate) fn act_quant(op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    const OP: &str = "act_quant";
    let (args, dims) = op.parts();
    let (m, k) = (dims.m, dims.k);
    if m == 0 || k == 0 {
        return Ok(());
    }
    let groups = k / QBLOCK;
    let (fp8_max, ue8m0) = (dims.fp8_max, args.scale_fmt == ScaleFmt::Ue8m0);
    let xd = args.x.dtype();
    let xs = xd.size();
    let xb = bytes_of(args.x)?;
    let per = (CHUNK / k).max(1);
    // The first non-finite input, in flat order (chunks are searched in
    // parallel; the earliest chunk with one wins).
    let bad = xb
        .par_chunks(per * k * xs)
        .enumerate()
        .filter_map(|(c, src)| {
            let mut x = vec![0f32; src.len() / xs];
            decode_into(xd, src, &mut x);
            x.iter()
                .position(|v| !v.is_finite())
                .map(|i| (c * per * k + i, x[i]))
        })
        .min_by_key(|&(i, _)| i);
    if let Some((i, v)) = bad {
        return Err(deepport_core::Error::NonFinite {
            op: OP,
            arg: "x",
            position: deepport_core::tensor::unravel(i, &[m, k]),
            value: f64::from(v),
        });
    }
    let (qd, sd) = (args.q.dtype(), args.s.dtype());
    let (qsz, ssz) = (qd.size(), sd.size());
    let qb = bytes_mut_of(args.q)?;
    let sb = bytes_mut_of(args.s)?;
    qb.par_chunks_mut(per * k * qsz)
        .zip(sb.par_chunks_mut(per * groups * ssz))
        .enumerate()
        .for_each(|(c, (qdst, sdst))| {
            let rows = qdst.len() / qsz / k;
            let r0 = c * per;
            let mut x = vec![0f32; rows * k];
            decode_into(xd, &xb[r0 * k * xs..(r0 + rows) * k * xs], &mut x);
            let mut q = vec![0f32; rows * k];
            let mut s = vec![0f32; rows * groups];
            for ((xg, qg), sg) in x
                .chunks_exact(QBLOCK)
                .zip(q.chunks_exact_mut(QBLOCK))
                .zip(s.iter_mut())
            {
                let amax = xg.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-4f32);
                let mut scale = amax / fp8_max;
                if ue8m0 {
                    scale = deepport_core::formats::ue8m0_round_up(scale);
                }
                *sg = scale;
                for (o, &v) in qg.iter_mut().zip(xg) {
                    *o = v / scale;
                }
            }
            qdst.copy_from_slice(HostTensor::from_f32(qd, &[rows * k], &q).bytes());
            sdst.copy_from_slice(HostTensor::from_f32(sd, &[rows * groups], &s).bytes());
        });
    Ok(())
}

/// `rope` (SPEC.md §3) with the reference's arithmetic — the angle
/// `position · inv_freq` in f32, its cosine and sine in f64 times the YaRN
/// scale, the rotation in f64, one rounding to `y`'s dtype — so `y` equals
/// `cpu-ref`'s bytes; tokens in parallel chunks, read from and written to
/// the tensors' bytes. A negative position is `IndexOutOfRange`, as cpu-ref
/// reports it.
pub(crate) fn rope(op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (args, dims) = op.parts();
    let (heads, d) = (dims.heads, dims.d);
    let pos_host = crate::to_host(args.positions)?;
    check_range(OP, "positions", &pos_host, 0, i64::MAX, None)?;
    let pos = pos_host.to_i64_vec();
    let row = heads * d;
    if row == 0 || pos.is_empty() {
        return Ok(());
    }
    let freq = args.config.inv_freq(d);
    let cs_scale = f64::from(args.config.cos_sin_scale());
    let layout = args.config.layout;
    let (xd, od) = (args.x.dtype(), args.y.dtype());
    let xb = bytes_of(args.x)?;
    let yb = bytes_mut_of(args.y)?;
    let (xs, os) = (xd.size(), od.size());
    let per = (CHUNK / row).max(1);
    yb.par_chunks_mut(per * row * os)
        .enumerate()
        .for_each(|(c, dst)| {
            let n = dst.len() / os / row;
            let t0 = c * per;
            let mut x = vec![0f32; n * row];
            decode_into(xd, &xb[t0 * row * xs..(t0 + n) * row * xs], &mut x);
            // Zeros where no pair writes (as the reference's output buffer).
            let mut y = vec![0f64; n * row];
            for (tok, (xt, yt)) in x.chunks_exact(row).zip(y.chunks_exact_mut(row)).enumerate() {
                let p = pos[t0 + tok] as f32;
                for (i, &f) in freq.iter().enumerate() {
                    let angle = p * f; // in f32, as SPEC.md §8 fixes
                    let cs = (angle as f64).cos() * cs_scale;
                    let sn = (angle as f64).sin() * cs_scale;
                    let (c0, c1) = layout.pair(i, d);
                    for h in 0..heads {
                        let (i0, i1) = (h * d + c0, h * d + c1);
                        let (x0, x1) = (f64::from(xt[i0]), f64::from(xt[i1]));
                        yt[i0] = x0 * cs - x1 * sn;
                        yt[i1] = x0 * sn + x1 * cs;
                    }
                }
            }
            encode_f64(od, &y, dst);
        });
    Ok(())
}

/// `copy_window` (SPEC.md §4): the window's elements through f32 into
/// `dst`'s dtype (one rounding; a same-dtype f32 copy moves the bytes),
/// row by row straight between the tensors' bytes. Elements of `dst`
/// outside the window keep their bytes.
pub(crate) fn copy_window(op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (rows, cols) = args.size;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let (sr, sc) = args.src_origin;
    let (dr, dc) = args.dst_origin;
    let (sw, dw) = (dims.src.1, dims.dst.1);
    let (sd, dd) = (args.src.dtype(), args.dst.dtype());
    let (ss, ds) = (sd.size(), dd.size());
    let sb = bytes_of(args.src)?;
    let db = bytes_mut_of(args.dst)?;
    let raw = sd == dd && sd == DType::F32;
    let mut buf = vec![0f32; if raw { 0 } else { cols }];
    for r in 0..rows {
        let s0 = ((sr + r) * sw + sc) * ss;
        let d0 = ((dr + r) * dw + dc) * ds;
        let src = &sb[s0..s0 + cols * ss];
        let dst = &mut db[d0..d0 + cols * ds];
        if raw {
            dst.copy_from_slice(src);
        } else {
            decode_into(sd, src, &mut buf);
            super::encode_into(dd, &buf, dst);
        }
    }
    Ok(())
}
