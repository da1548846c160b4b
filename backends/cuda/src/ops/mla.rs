//! Attention: MLA decode over the paged latent cache, MLA prefill, RoPE.

use crate::launch::KernelSource;
use crate::launch::LaunchContext;
use deepport_core::ops::*;
use deepport_core::Result;

/// This family's kernel sources.
pub(crate) static SOURCES: &[&KernelSource] = &[];

/// `mla_decode` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn mla_decode(_cx: &dyn LaunchContext, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `mla_prefill` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn mla_prefill(_cx: &dyn LaunchContext, op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}

/// `rope` (SPEC.md). Placeholder until its kernel lands.
pub(crate) fn rope(_cx: &dyn LaunchContext, op: &mut Checked<Rope<'_>>) -> Result<()> {
    Err(super::not_yet(op.kind()))
}
