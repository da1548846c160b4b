//! `cpu-ref`'s grouped plain GEMMs (f32/bf16): `gemm_grouped_contiguous`
//! and `gemm_grouped_masked`. The layouts are the specification's
//! ([`crate::scalar::grouped`]); each group's rows run on the plain GEMM's
//! tiles ([`crate::dense::tiled`]: the same sums in the same order as the
//! specification's row loops, on several threads and register tiles;
//! `tests/oracle_bitexact.rs` compares the bits).

use crate::dense::{tiled, Accum};
use crate::scalar::grouped::{contiguous_with, masked_with};
use deepport_core::ops::*;
use deepport_core::Result;

fn tiles(a: &[f32], rows: &[usize], b: &[f32], n: usize, k: usize) -> Vec<f64> {
    tiled(a, rows, b, n, k, Accum::Plain)
}

pub(crate) fn gemm_grouped_contiguous(op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    contiguous_with(op, &tiles)
}

pub(crate) fn gemm_grouped_masked(op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    masked_with(op, &tiles)
}
