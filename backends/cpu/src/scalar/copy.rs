//! Reference data movement: window copy, row gather, and the weighted row
//! reduction of the expert-parallel combines.

use super::ep::round_once;
use crate::util::{f32s, host, put_f32};
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

/// Copies the window element by element through f32 (exact for every
/// accepted source dtype), rounding once to the destination dtype. The
/// destination keeps its other elements: it is read, patched and written.
pub fn copy_window(op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let src = f32s(args.src)?;
    let mut dst = f32s(args.dst)?;
    let (rows, cols) = args.size;
    let (sr, sc) = args.src_origin;
    let (dr, dc) = args.dst_origin;
    for r in 0..rows {
        for c in 0..cols {
            dst[(dr + r) * dims.dst.1 + dc + c] = src[(sr + r) * dims.src.1 + sc + c];
        }
    }
    put_f32(args.dst, &dst)
}

/// `dst[i] = src[index[i]]` (−1: zero bytes), bit-exact on the raw bytes.
pub fn gather_rows(op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    const OP: &str = "gather_rows";
    let (a, d) = op.parts();
    let idx = host(a.index)?;
    check_range(OP, "index", &idx, 0, d.src_rows as i64, Some(-1))?;
    // In place: the rows can be hundreds of megabytes (expert-parallel
    // payloads), so neither side is copied whole.
    let src = crate::bytes_of(a.src)?;
    let row = d.row * a.src.dtype().size();
    let out = crate::bytes_mut_of(a.dst)?;
    if out.len() != d.rows * row {
        return Err(Error::Other(format!(
            "{OP}: internal: dst holds {} bytes, expected {}",
            out.len(),
            d.rows * row
        )));
    }
    if row == 0 {
        return Ok(());
    }
    let idx = idx.to_i64_vec();
    use rayon::prelude::*;
    // Rows in chunks of about 256 KiB per task.
    let per = (1 << 18) / row + 1;
    out.par_chunks_mut(per * row)
        .zip(idx.par_chunks(per))
        .for_each(|(chunk, js)| {
            for (dst, &j) in chunk.chunks_exact_mut(row).zip(js) {
                if j >= 0 {
                    let j = j as usize;
                    dst.copy_from_slice(&src[j * row..(j + 1) * row]);
                } else {
                    dst.fill(0);
                }
            }
        });
    Ok(())
}

/// `out[t] = round(Σ_j w[t,j]·src[index[t,j]])`, accumulated in f64 in `j`
/// order (each product is exact in f64), rounded once.
///
/// In place and in parallel over tokens: the source can be hundreds of
/// megabytes (expert-parallel payloads), so it is decoded row by row straight
/// from its bytes and the result is encoded straight into `out`. Each token is
/// one thread's work, in `j` order, so the result does not depend on the
/// number of threads.
pub fn reduce_rows(op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    const OP: &str = "reduce_rows";
    let (a, d) = op.parts();
    let idx = host(a.index)?;
    check_range(OP, "index", &idx, 0, d.src_rows as i64, Some(-1))?;
    let idx = idx.to_i64_vec();
    let src = crate::bytes_of(a.src)?;
    let (sdt, odt) = (a.src.dtype(), a.out.dtype());
    let w = a.weights.map(f32s).transpose()?;
    let (n, k, h) = (d.tokens, d.k, d.hidden);
    let (sb, ob) = (sdt.size(), odt.size());
    if src.len() < d.src_rows * h * sb {
        return Err(Error::Other(format!(
            "{OP}: internal: src holds {} bytes, expected {}",
            src.len(),
            d.src_rows * h * sb
        )));
    }
    let out = crate::bytes_mut_of(a.out)?;
    if out.len() != n * h * ob {
        return Err(Error::Other(format!(
            "{OP}: internal: out holds {} bytes, expected {}",
            out.len(),
            n * h * ob
        )));
    }
    if n == 0 || h == 0 {
        return Ok(());
    }
    let reduce_token = |t: usize, dst: &mut [u8], acc: &mut Vec<f64>| {
        acc.clear();
        acc.resize(h, 0.0);
        for j in 0..k {
            let r = idx[t * k + j];
            if r < 0 {
                continue;
            }
            let wt = w.as_ref().map_or(1.0, |w| w[t * k + j] as f64);
            let row = &src[r as usize * h * sb..(r as usize + 1) * h * sb];
            if sdt == DType::BF16 {
                for (v, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    let x = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                    *v += wt * x as f64;
                }
            } else {
                for (v, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                    *v += wt * f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
                }
            }
        }
        if odt == DType::BF16 {
            for (o, &v) in dst.chunks_exact_mut(2).zip(acc.iter()) {
                o.copy_from_slice(&bf16_bits_once(v).to_le_bytes());
            }
        } else {
            for (o, &v) in dst.chunks_exact_mut(4).zip(acc.iter()) {
                o.copy_from_slice(&round_once(odt, v).to_le_bytes());
            }
        }
    };
    use rayon::prelude::*;
    // Tokens in chunks of about 64 KiB of output per task.
    let per = (65536 / (h * ob)).max(1);
    out.par_chunks_mut(per * h * ob)
        .enumerate()
        .for_each_init(Vec::new, |acc, (c, chunk)| {
            for (i, dst) in chunk.chunks_mut(h * ob).enumerate() {
                reduce_token(c * per + i, dst, acc);
            }
        });
    Ok(())
}

/// The bits of `v` rounded once to bf16 (to nearest, ties to even): the
/// bits of `bf16::from_f32(round_once(BF16, v))`, computed directly from
/// the f64 bits where the result is a normal bf16 or overflows (every
/// accumulated sum, in practice), and through [`round_once`] elsewhere
/// (zeros, subnormals, NaN).
#[inline]
fn bf16_bits_once(v: f64) -> u16 {
    const MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;
    const LOW: u64 = (1 << 45) - 1; // the f64 mantissa bits bf16 drops
    let a = v.abs();
    if a >= MIN_NORMAL && a.is_finite() {
        let b = v.to_bits();
        let r = (b + (LOW >> 1) + ((b >> 45) & 1)) & !LOW;
        // Exact in f32 (8 significant bits, normal or ±inf past the top).
        (f64::from_bits(r) as f32).to_bits().wrapping_shr(16) as u16
    } else {
        half::bf16::from_f32(round_once(DType::BF16, v)).to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_round_once() {
        let slow = |v: f64| half::bf16::from_f32(round_once(DType::BF16, v)).to_bits();
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut special = vec![
            0.0,
            -0.0,
            1.0,
            1.0 + 2f64.powi(-8),
            1.0 + 2f64.powi(-8) + 2f64.powi(-40),
            1.0 + 3.0 * 2f64.powi(-8),
            f32::MIN_POSITIVE as f64,
            f32::MIN_POSITIVE as f64 * (1.0 - 2f64.powi(-30)),
            1e-40,
            -1e-300,
            3.3895313892515355e38, // the largest bf16
            3.3961775292304e38,    // past the midpoint above it: inf
            3.3928544e38,          // just below that midpoint
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        // Random bit patterns, random values near bf16 midpoints, and
        // random sums of bf16 products (the kernel's inputs).
        for _ in 0..200_000 {
            let b = next();
            special.push(f64::from_bits(b));
            let m = f32::from_bits(((b >> 32) as u32) & 0xffff_0000 | 0x8000) as f64;
            special.push(m);
            special.push(m * (1.0 + f64::from_bits((b & 0xfff) | 0x3cb0_0000_0000_0000)));
            let x = f32::from_bits(((b >> 16) as u32) << 16) as f64;
            let y = f32::from_bits((b as u32) << 16) as f64;
            special.push(x * 0.125 + y * 0.375);
        }
        for v in special {
            assert_eq!(bf16_bits_once(v), slow(v), "{v:e} ({:#018x})", v.to_bits());
        }
    }
}
