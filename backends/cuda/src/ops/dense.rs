//! GEMM family and quantization: act_quant, weight_dequant, the FP8 and plain GEMMs (dense, contiguous, masked).

use crate::launch::KernelSource;
use crate::launch::LaunchContext;
use deepport_core::ops::*;
use deepport_core::Result;

/// This family's kernel sources.
pub(crate) static SOURCES: &[&KernelSource] = &[];

/// `act_quant` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn act_quant(_cx: &dyn LaunchContext, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `weight_dequant` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn weight_dequant(
    _cx: &dyn LaunchContext,
    op: &mut Checked<WeightDequant<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `fp8_gemm` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn fp8_gemm(_cx: &dyn LaunchContext, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `fp8_grouped_contiguous` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn fp8_grouped_contiguous(
    _cx: &dyn LaunchContext,
    op: &mut Checked<Fp8GroupedContiguous<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `fp8_grouped_masked` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn fp8_grouped_masked(
    _cx: &dyn LaunchContext,
    op: &mut Checked<Fp8GroupedMasked<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `gemm` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn gemm(_cx: &dyn LaunchContext, op: &mut Checked<Gemm<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `gemm_grouped_contiguous` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn gemm_grouped_contiguous(
    _cx: &dyn LaunchContext,
    op: &mut Checked<GemmGroupedContiguous<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `gemm_grouped_masked` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn gemm_grouped_masked(
    _cx: &dyn LaunchContext,
    op: &mut Checked<GemmGroupedMasked<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}
