//! Dense reference ops (placeholder until written).
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn act_quant(_op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "act_quant",
        "being written",
    ))
}

pub(crate) fn weight_dequant(_op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "weight_dequant",
        "being written",
    ))
}

pub(crate) fn fp8_gemm(_op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "fp8_gemm",
        "being written",
    ))
}

pub(crate) fn fp8_grouped_contiguous(_op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "fp8_grouped_contiguous",
        "being written",
    ))
}

pub(crate) fn fp8_grouped_masked(_op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "fp8_grouped_masked",
        "being written",
    ))
}

pub(crate) fn gemm(_op: &mut Checked<Gemm<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "gemm",
        "being written",
    ))
}

pub(crate) fn rms_norm(_op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "rms_norm",
        "being written",
    ))
}

pub(crate) fn rope(_op: &mut Checked<Rope<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "rope",
        "being written",
    ))
}

pub(crate) fn moe_gate(_op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "moe_gate",
        "being written",
    ))
}

pub(crate) fn silu_mul(_op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "silu_mul",
        "being written",
    ))
}

pub(crate) fn embedding(_op: &mut Checked<Embedding<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "embedding",
        "being written",
    ))
}

pub(crate) fn add(_op: &mut Checked<Add<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "add",
        "being written",
    ))
}
