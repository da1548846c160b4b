//! `cpu-ref`'s grouped plain GEMMs (f32/bf16): `gemm_grouped_contiguous` and
//! `gemm_grouped_masked` (semantics: `deepport_core::ops::GemmGroupedContiguous`,
//! `GemmGroupedMasked`).
//!
//! Each computed row is exactly the reference `gemm` of that row against its
//! group's `b`: products and sums in f64, one rounding to `d`'s dtype. Index
//! values are checked before anything is written. The rows of a group run
//! on the plain GEMM's tiles ([`crate::dense::tiled`]: the same sums in the
//! same order as the specification's row loops in
//! [`crate::scalar::grouped`], on several threads and register tiles;
//! `tests/oracle_bitexact.rs` compares the bits).

use crate::dense::{tiled, Accum};
use crate::scalar::dense::round_f64;
use crate::util::{f32s, host, i64s, put_host};
use deepport_core::ops::index::{check_range, check_value};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};

/// Encodes f64 values rounded once to `dtype` into bytes.
fn encode(dtype: DType, vals: &[f64]) -> HostTensor {
    let rounded: Vec<f32> = vals.iter().map(|&x| round_f64(dtype, x)).collect();
    HostTensor::from_f32(dtype, &[rounded.len()], &rounded)
}

pub(crate) fn gemm_grouped_contiguous(op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_contiguous";
    let (args, dims) = op.parts();
    let (g, m, n, k) = (dims.groups, dims.m, dims.n, dims.k);
    let idx_host = host(args.m_indices)?;
    check_range(OP, "m_indices", &idx_host, 0, g as i64, Some(-1))?;
    let idx = idx_host.to_i64_vec();
    let a = f32s(args.a)?;
    let b = f32s(args.b)?;
    let b_len = n * k;
    // Padding rows (-1): unspecified; the reference writes 0.
    let mut d = vec![0f64; m * n];
    for grp in 0..g {
        let rows: Vec<usize> = (0..m).filter(|&i| idx[i] == grp as i64).collect();
        let b_g = &b[grp * b_len..(grp + 1) * b_len];
        let vals = tiled(&a, &rows, b_g, n, k, Accum::Plain);
        for (i, &r) in rows.iter().enumerate() {
            d[r * n..(r + 1) * n].copy_from_slice(&vals[i * n..(i + 1) * n]);
        }
    }
    let dtype = args.d.dtype();
    let enc = encode(dtype, &d);
    let out = HostTensor::from_bytes(dtype, args.d.shape(), enc.bytes().to_vec())?;
    put_host(args.d, &out)
}

pub(crate) fn gemm_grouped_masked(op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_masked";
    let (args, dims) = op.parts();
    let (g, m_max, n, k) = (dims.groups, dims.m, dims.n, dims.k);
    let masked = i64s(args.masked_m)?;
    for (grp, &v) in masked.iter().enumerate() {
        check_value(OP, "masked_m", &[grp], v, 0, m_max as i64 + 1)?;
    }
    let a = f32s(args.a)?;
    let b = f32s(args.b)?;
    let b_len = n * k;
    // Rows at or past masked_m[g] keep their bytes: start from d as it is.
    let mut d_host = host(args.d)?;
    let dtype = d_host.dtype();
    let row_bytes = n * dtype.size();
    for grp in 0..g {
        let rows = masked[grp] as usize; // checked to lie in [0, m_max]
        let idx: Vec<usize> = (grp * m_max..grp * m_max + rows).collect();
        let vals = tiled(
            &a,
            &idx,
            &b[grp * b_len..(grp + 1) * b_len],
            n,
            k,
            Accum::Plain,
        );
        let enc = encode(dtype, &vals);
        let start = grp * m_max * row_bytes;
        d_host.bytes_mut()[start..start + rows * row_bytes].copy_from_slice(enc.bytes());
    }
    put_host(args.d, &d_host)
}
