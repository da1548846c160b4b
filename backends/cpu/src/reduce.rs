//! `cpu-ref`'s (and `cpu`'s) weighted row reduction of the expert-parallel
//! combines: the arithmetic of [`crate::scalar::copy::reduce_rows`] (per
//! output element, `Σ_j w[t,j]·src[index[t,j]]` in f64 in `j` order, each
//! product exact, rounded once), restructured so it runs at memory speed:
//! the hidden dimension in blocks whose f64 accumulators stay in L1, loops
//! over plain slices that the compiler vectorizes across elements (each
//! element's operations and their order are unchanged), and the bf16
//! rounding branch-free, with the rare value outside the normal range
//! (zero, subnormal, NaN, ±inf) redone by the reference rounding. The
//! loops are compiled for AVX-512 and AVX2 too and chosen at run time
//! ([`crate::fast::current_simd`]); the arithmetic is the same.
//! `tests/oracle_bitexact.rs` compares it bit for bit with the loops.

use crate::fast::simd::Simd;
use crate::scalar::ep::round_once;
use crate::util::{f32s, host};
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

/// Hidden elements per block (2 KiB of f64 accumulators).
const BLOCK: usize = 256;

pub(crate) fn reduce_rows(op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
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
    let ctx = Ctx {
        src,
        idx: &idx,
        w: w.as_deref(),
        k,
        h,
        sb,
        ob,
        bf16_in: sdt == DType::BF16,
        bf16_out: odt == DType::BF16,
    };
    let simd = crate::fast::current_simd();
    use rayon::prelude::*;
    // Tokens in chunks of about 64 KiB of output per task.
    let per = (65536 / (h * ob)).max(1);
    out.par_chunks_mut(per * h * ob)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, dst) in chunk.chunks_mut(h * ob).enumerate() {
                ctx.token_with(simd, c * per + i, dst);
            }
        });
    Ok(())
}

/// One reduction's operands.
struct Ctx<'a> {
    src: &'a [u8],
    idx: &'a [i64],
    w: Option<&'a [f32]>,
    k: usize,
    h: usize,
    sb: usize,
    ob: usize,
    bf16_in: bool,
    bf16_out: bool,
}

impl Ctx<'_> {
    /// Token `t` into `dst`, compiled for the instruction set `simd` (the
    /// same operations in the same order whichever: only wider registers).
    #[inline]
    fn token_with(&self, simd: Simd, t: usize, dst: &mut [u8]) {
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 => {
                // SAFETY: `current_simd` only answers an instruction set
                // this CPU runs (`Simd::available`, checked at run time).
                unsafe { token_avx512(self, t, dst) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                // SAFETY: as above.
                unsafe { token_avx2(self, t, dst) }
            }
            _ => self.token(t, dst),
        }
    }

    #[inline(always)]
    fn token(&self, t: usize, dst: &mut [u8]) {
        let (k, h, sb, ob) = (self.k, self.h, self.sb, self.ob);
        let mut acc = [0f64; BLOCK];
        for c0 in (0..h).step_by(BLOCK) {
            let len = BLOCK.min(h - c0);
            let acc = &mut acc[..len];
            acc.fill(0.0);
            for j in 0..k {
                let r = self.idx[t * k + j];
                if r < 0 {
                    continue;
                }
                let wt = self.w.map_or(1.0, |w| w[t * k + j] as f64);
                let at = (r as usize * h + c0) * sb;
                let row = &self.src[at..at + len * sb];
                if self.bf16_in {
                    add_bf16(acc, row, wt);
                } else {
                    add_f32(acc, row, wt);
                }
            }
            let dst = &mut dst[c0 * ob..(c0 + len) * ob];
            if self.bf16_out {
                store_bf16(acc, dst);
            } else {
                for (o, &v) in dst.chunks_exact_mut(4).zip(acc.iter()) {
                    o.copy_from_slice(&(v as f32).to_le_bytes());
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn token_avx512(c: &Ctx<'_>, t: usize, dst: &mut [u8]) {
    c.token(t, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn token_avx2(c: &Ctx<'_>, t: usize, dst: &mut [u8]) {
    c.token(t, dst)
}

/// `acc[i] += wt · row[i]` for a bf16 row (the product is exact in f64).
#[inline(always)]
fn add_bf16(acc: &mut [f64], row: &[u8], wt: f64) {
    for (v, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
        let x = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        *v += wt * x as f64;
    }
}

/// `acc[i] += wt · row[i]` for an f32 row (the product is exact in f64).
#[inline(always)]
fn add_f32(acc: &mut [f64], row: &[u8], wt: f64) {
    for (v, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
        *v += wt * f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
    }
}

/// Rounds `acc` once to bf16 into `dst` (to nearest, ties to even): from
/// the f64 bits where the value is normal or overflows (branch-free, so
/// the loop vectorizes), and through [`round_once`] for a block holding any
/// other value (zeros, subnormals, NaN, ±inf), exactly as the reference.
#[inline(always)]
fn store_bf16(acc: &[f64], dst: &mut [u8]) {
    const MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;
    const LOW: u64 = (1 << 45) - 1; // the f64 mantissa bits bf16 drops
    let len = acc.len().min(BLOCK);
    let acc = &acc[..len];
    let mut bits = [0u16; BLOCK];
    let bits = &mut bits[..len];
    for (o, &v) in bits.iter_mut().zip(acc) {
        let b = v.to_bits();
        let r = b.wrapping_add((LOW >> 1) + ((b >> 45) & 1)) & !LOW;
        // Exact in f32 (8 significant bits, normal or ±inf past the top).
        *o = ((f64::from_bits(r) as f32).to_bits() >> 16) as u16;
    }
    // Values outside the normal range (NaN compares false).
    let slow = acc
        .iter()
        .map(|v| !(MIN_NORMAL..=f64::MAX).contains(&v.abs()) as u32)
        .sum::<u32>();
    if slow > 0 {
        for (o, &v) in bits.iter_mut().zip(acc) {
            let a = v.abs();
            if !(MIN_NORMAL..=f64::MAX).contains(&a) {
                *o = half::bf16::from_f32(round_once(DType::BF16, v)).to_bits();
            }
        }
    }
    for (o, &x) in dst.chunks_exact_mut(2).zip(bits.iter()) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}
