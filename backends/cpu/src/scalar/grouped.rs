//! The specification of the grouped plain GEMMs (f32/bf16):
//! `gemm_grouped_contiguous` and `gemm_grouped_masked` (semantics:
//! `deepport_core::ops::GemmGroupedContiguous`, `GemmGroupedMasked`).
//!
//! Each computed row is exactly the reference `gemm` of that row against its
//! group's `b`: products and sums in f64, one rounding to `d`'s dtype. Index
//! values are checked before anything is written.
//!
//! The layouts (checks, which rows belong to which group, what is written)
//! are [`contiguous_with`] and [`masked_with`], shared with `cpu-ref`'s
//! kernels, which pass its tiled GEMM where this file passes [`rows_f64`].

use crate::scalar::dense::round_f64;
use crate::util::{f32s, host, i64s, put_host};
use deepport_core::ops::index::{check_range, check_value};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};

/// `d[i][j] = Σ_k a[rows[i]][k]·b[j][k]` in f64 for the listed rows of
/// `a [·, k]` against one group's `b [n, k]` (row-major `[rows.len(), n]`).
pub(crate) type RowsGemm<'f> = &'f dyn Fn(&[f32], &[usize], &[f32], usize, usize) -> Vec<f64>;

/// The specification's [`RowsGemm`]: one row, one column after another,
/// `acc` from 0, products in `k` order.
pub(crate) fn rows_f64(a: &[f32], rows: &[usize], b: &[f32], n: usize, k: usize) -> Vec<f64> {
    let mut d = vec![0f64; rows.len() * n];
    if n == 0 {
        return d;
    }
    for (out, &r) in d.chunks_mut(n).zip(rows) {
        let a_row = &a[r * k..(r + 1) * k];
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = 0f64;
            for (x, y) in a_row.iter().zip(&b[j * k..(j + 1) * k]) {
                acc += *x as f64 * *y as f64;
            }
            *o = acc;
        }
    }
    d
}

/// Encodes f64 values rounded once to `dtype` into bytes.
fn encode(dtype: DType, vals: &[f64]) -> HostTensor {
    let rounded: Vec<f32> = vals.iter().map(|&x| round_f64(dtype, x)).collect();
    HostTensor::from_f32(dtype, &[rounded.len()], &rounded)
}

pub fn gemm_grouped_contiguous(op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    contiguous_with(op, &rows_f64)
}

pub fn gemm_grouped_masked(op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    masked_with(op, &rows_f64)
}

/// The contiguous layout with `gemm` computing each group's rows.
pub(crate) fn contiguous_with(
    op: &mut Checked<GemmGroupedContiguous<'_>>,
    gemm: RowsGemm<'_>,
) -> Result<()> {
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
        let vals = gemm(&a, &rows, &b[grp * b_len..(grp + 1) * b_len], n, k);
        for (i, &r) in rows.iter().enumerate() {
            d[r * n..(r + 1) * n].copy_from_slice(&vals[i * n..(i + 1) * n]);
        }
    }
    let dtype = args.d.dtype();
    let enc = encode(dtype, &d);
    let out = HostTensor::from_bytes(dtype, args.d.shape(), enc.bytes().to_vec())?;
    put_host(args.d, &out)
}

/// The masked layout with `gemm` computing each group's rows.
pub(crate) fn masked_with(
    op: &mut Checked<GemmGroupedMasked<'_>>,
    gemm: RowsGemm<'_>,
) -> Result<()> {
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
        let count = masked[grp] as usize; // checked to lie in [0, m_max]
        let rows: Vec<usize> = (grp * m_max..grp * m_max + count).collect();
        let vals = gemm(&a, &rows, &b[grp * b_len..(grp + 1) * b_len], n, k);
        let enc = encode(dtype, &vals);
        let start = grp * m_max * row_bytes;
        d_host.bytes_mut()[start..start + count * row_bytes].copy_from_slice(enc.bytes());
    }
    put_host(args.d, &d_host)
}
