//! Elementwise and row ops (`add`, `silu_mul`, `rms_norm`, `embedding`):
//! the reference arithmetic (f64, one rounding to the output dtype), so the
//! results equal `cpu-ref`'s bit for bit — `silu_mul` within 1 ulp, as its
//! exponential is this module's vectorized one ([`exp_f64`]) — but read
//! from and written to the tensors' bytes directly, in parallel chunks,
//! without intermediate host tensors.

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

/// `out = f(x, y)` elementwise in f64, rounded once; x, y, out of equal
/// element counts. `f` maps a block of decoded `x` and `y` values to f64
/// (blocks of at most 512, in L1); chunks of [`CHUNK`] run in parallel (a
/// single chunk on the calling thread).
fn binary(
    x: &deepport_core::backend::Tensor,
    y: &deepport_core::backend::Tensor,
    out: &mut deepport_core::backend::Tensor,
    f: impl Fn(&[f32], &[f32], &mut [f64]) + Sync,
) -> Result<()> {
    const B: usize = 512;
    let (xd, yd, od) = (x.dtype(), y.dtype(), out.dtype());
    let (xb, yb) = (bytes_of(x)?, bytes_of(y)?);
    let ob = bytes_mut_of(out)?;
    let (xs, ys, os) = (xd.size(), yd.size(), od.size());
    let run = |c: usize, dst: &mut [u8]| {
        let (mut a, mut b, mut v) = ([0f32; B], [0f32; B], [0f64; B]);
        for (j, d) in dst.chunks_mut(B * os).enumerate() {
            let n = d.len() / os;
            let at = c * CHUNK + j * B;
            decode_into(xd, &xb[at * xs..(at + n) * xs], &mut a[..n]);
            decode_into(yd, &yb[at * ys..(at + n) * ys], &mut b[..n]);
            f(&a[..n], &b[..n], &mut v[..n]);
            encode_f64(od, &v[..n], d);
        }
    };
    if ob.len() <= CHUNK * os {
        run(0, ob);
    } else {
        ob.par_chunks_mut(CHUNK * os)
            .enumerate()
            .for_each(|(c, dst)| run(c, dst));
    }
    Ok(())
}

pub(crate) fn add(op: &mut Checked<Add<'_>>) -> Result<()> {
    let args = op.args_mut();
    binary(args.a, args.b, args.out, |a, b, o| {
        for ((o, &p), &q) in o.iter_mut().zip(a).zip(b) {
            *o = f64::from(p) + f64::from(q);
        }
    })
}

/// `e^x` in f64 without a libm call, so that a loop of it vectorizes: the
/// reduction `x = n·ln 2 + r` (`|r| ≤ ln2/2`, `ln 2` in two parts), the
/// degree-13 Taylor polynomial of `e^r` (truncation below 1e-17), and
/// `2^n` built in the exponent bits. Within a few f64 ulps of the exact
/// value for `x ∈ [−708, 709]`; `+∞` above 709.78 and `0` below −745.13,
/// as libm; in between it is `e^−708` or `e^709`, which leaves `1 + e^x`
/// as libm's value does for SiLU's use (`1` below, overflow far past any
/// f32 above). NaN stays NaN.
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // 1.5·2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(-708.0, 709.0); // NaN stays NaN
    let t = xc * std::f64::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // 1/k! for k = 13 down to 2, then e^r = 1 + r·(1 + r·(1/2 + ...)).
    const C: [f64; 12] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    let n_int = (t.to_bits() as i64).wrapping_sub(SHIFT.to_bits() as i64);
    let v = p * f64::from_bits(((n_int + 1023) << 52) as u64);
    if x > 709.782_712_893_384 {
        f64::INFINITY
    } else if x < -745.133_219_101_941_2 {
        0.0
    } else {
        v
    }
}

/// `out[i] = g·u / (1 + e^−g)` in f64 over one chunk. A chunk of zero
/// gates (the padding rows of the MoE's contiguous layout) is `g/2·u`,
/// the same values, without the exponential and the division.
#[inline(always)]
fn silu_body(g: &[f32], u: &[f32], out: &mut [f64]) {
    if g.iter().all(|&x| x == 0.0) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = f64::from(g) * 0.5 * f64::from(u);
        }
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        let g = f64::from(g);
        *o = g / (1.0 + exp_f64(-g)) * f64::from(u);
    }
}

super::simd::isa_dispatch!(fn silu_chunk(g: &[f32], u: &[f32], out: &mut [f64]) = silu_body);

/// `silu_mul` in f64, one rounding to `out`'s dtype, like cpu-ref, but with
/// [`exp_f64`] in place of libm's `exp` (a vectorized loop): within 1 ulp
/// of cpu-ref's output, and its bytes but where the f64 value falls within
/// a few f64 ulps of a rounding boundary of the output dtype.
pub(crate) fn silu_mul(op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    let args = op.args_mut();
    let simd = super::current_simd();
    binary(args.gate, args.up, args.out, |g, u, o| {
        silu_chunk(simd, g, u, o)
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
    let simd = super::current_simd();
    let (xd, od) = (args.x.dtype(), args.y.dtype());
    let xb = bytes_of(args.x)?;
    let yb = bytes_mut_of(args.y)?;
    let (xs, os) = (xd.size(), od.size());
    // Chunks of a few rows (at least two per thread on a short prompt).
    let per = (CHUNK / dim).clamp(1, rows.div_ceil(2 * rayon::current_num_threads()).max(8));
    yb.par_chunks_mut(per * dim * os)
        .enumerate()
        .for_each(|(c, dst)| {
            let n = dst.len() / os / dim;
            let r0 = c * per;
            let mut x = vec![0f32; n * dim];
            decode_into(xd, &xb[r0 * dim * xs..(r0 + n) * dim * xs], &mut x);
            let mut y = vec![0f64; n * dim];
            let mut ss = vec![0f64; n];
            sum_squares(simd, &x, dim, &mut ss);
            for ((xr, yr), &ss) in x.chunks(dim).zip(y.chunks_mut(dim)).zip(&ss) {
                let inv = 1.0 / (ss / dim as f64 + eps).sqrt();
                for ((o, &v), &wj) in yr.iter_mut().zip(xr).zip(w.iter()) {
                    *o = f64::from(v) * inv * f64::from(wj);
                }
            }
            encode_f64(od, &y, dst);
        });
    Ok(())
}

/// `ss[r] = Σ_j x[r][j]²` in f64, each the reference's sequential sum
/// (`j` ascending from 0), eight rows advancing together (independent
/// chains instead of one latency-bound chain per row).
#[inline(always)]
fn sum_squares_body(x: &[f32], dim: usize, ss: &mut [f64]) {
    const R: usize = 8;
    for (blk, out) in x.chunks(R * dim).zip(ss.chunks_mut(R)) {
        let mut acc = [0f64; R];
        let n = out.len();
        for j in 0..dim {
            for (r, a) in acc.iter_mut().enumerate().take(n) {
                let v = f64::from(blk[r * dim + j]);
                *a += v * v;
            }
        }
        out.copy_from_slice(&acc[..n]);
    }
}

super::simd::isa_dispatch!(fn sum_squares(x: &[f32], dim: usize, ss: &mut [f64]) = sum_squares_body);

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

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_f64` against libm: within 4 f64 ulps on [−708, 709] (dense
    /// and at the reduction's edges), libm's infinities, zeros and NaN
    /// outside, and SiLU's `1 + e^x` equal to libm's across the clamped
    /// ranges.
    #[test]
    fn exp_f64_is_within_a_few_ulps_of_libm() {
        let ulp = |v: f64| f64::from_bits(v.to_bits() + 1) - v;
        let mut xs: Vec<f64> = (-708_000..=709_000).map(|i| i as f64 / 1000.0).collect();
        let ln2 = std::f64::consts::LN_2;
        for k in -1000..=1000 {
            let edge = (k as f64 + 0.5) * ln2;
            xs.extend([edge, f64::from_bits(edge.to_bits() + 1), k as f64 * ln2]);
        }
        xs.extend([0.0, -0.0, 1e-300, -1e-300, 5e-324]);
        for &x in xs.iter().filter(|x| (-708.0..=709.0).contains(*x)) {
            let (got, want) = (exp_f64(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * ulp(want),
                "exp({x}) = {got}, libm {want}"
            );
        }
        for x in [709.8, 710.0, 1e10, f64::INFINITY] {
            assert_eq!(exp_f64(x), f64::INFINITY, "exp({x})");
        }
        for x in [-745.2, -800.0, -1e10, f64::NEG_INFINITY] {
            assert_eq!(exp_f64(x), 0.0, "exp({x})");
        }
        assert!(exp_f64(f64::NAN).is_nan());
        for x in [-745.0, -720.0, -708.5, 709.2, 709.7] {
            let (got, want) = (1.0 + exp_f64(x), 1.0 + x.exp());
            assert!(got == want || (got > 1e307 && want > 1e307), "1 + exp({x})");
        }
    }
}
