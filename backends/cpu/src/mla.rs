//! MLA reference ops (placeholder until written).
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn mla_decode(_op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "mla_decode",
        "being written",
    ))
}

pub(crate) fn mla_prefill(_op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "mla_prefill",
        "being written",
    ))
}
