//! Small ops and rows: norms, gate, elementwise, embedding, copies, the EP row kernels, dispatch layout.

use crate::launch::KernelSource;
use crate::launch::LaunchContext;
use deepport_core::ops::*;
use deepport_core::Result;

/// This family's kernel sources.
pub(crate) static SOURCES: &[&KernelSource] = &[];

/// `rms_norm` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn rms_norm(_cx: &dyn LaunchContext, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `moe_gate` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn moe_gate(_cx: &dyn LaunchContext, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `silu_mul` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn silu_mul(_cx: &dyn LaunchContext, op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `embedding` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn embedding(_cx: &dyn LaunchContext, op: &mut Checked<Embedding<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `add` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn add(_cx: &dyn LaunchContext, op: &mut Checked<Add<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `copy_window` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn copy_window(_cx: &dyn LaunchContext, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `gather_rows` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn gather_rows(_cx: &dyn LaunchContext, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `reduce_rows` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn reduce_rows(_cx: &dyn LaunchContext, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `get_dispatch_layout` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn get_dispatch_layout(
    _cx: &dyn LaunchContext,
    op: &mut Checked<GetDispatchLayout<'_>>,
) -> Result<()> {
    Err(super::not_yet(op.kind()))
}
