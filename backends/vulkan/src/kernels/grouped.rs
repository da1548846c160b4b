//! The FP8 block-scaled GEMMs (`fp8_gemm`, `fp8_grouped_contiguous`,
//! `fp8_grouped_masked`) and the grouped plain GEMMs
//! (`gemm_grouped_contiguous`, `gemm_grouped_masked`): one kernel,
//! `shaders/gemm_rows.comp`, with the layout and operand format as
//! specialization constants. e4m3/e4m3fnuz and bf16 are decoded by bit
//! manipulation (lavapipe has neither FP8 nor bf16 types). Index arguments
//! are checked on the device and reported at the next download or
//! synchronize; the kernel skips bad rows and never reads out of bounds.

use super::{dt, groups, OpTable};
use crate::ctx::{u32_of, Bind, Push, Rec};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::{DType, Result, Tensor};

pub(crate) fn register(t: &mut OpTable) {
    t.fp8_gemm = Some(fp8_gemm);
    t.fp8_grouped_contiguous = Some(fp8_contiguous);
    t.fp8_grouped_masked = Some(fp8_masked);
    t.gemm_grouped_contiguous = Some(contiguous);
    t.gemm_grouped_masked = Some(masked);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Dense = 0,
    Contiguous = 1,
    Masked = 2,
}

/// Operands: a, sa (FP8 only), b, sb (FP8 only), index (grouped only), d.
struct Operands<'t> {
    a: &'t Tensor,
    scales: Option<(&'t Tensor, &'t Tensor)>,
    b: &'t Tensor,
    idx: Option<&'t Tensor>,
    d: &'t Tensor,
}

fn record(rec: &mut Rec<'_>, op: &'static str, x: &Operands<'_>, mode: Mode, dims: &GemmDims) -> Result<()> {
    let GemmDims { groups: g, m, n, k } = *dims;
    if m == 0 || n == 0 || g == 0 {
        return Ok(());
    }
    let rows = if mode == Mode::Masked { g * m } else { m };
    u32_of(op, "a elements", rows.saturating_mul(k))?;
    u32_of(op, "b elements", g.saturating_mul(n).saturating_mul(k))?;
    let total = u32_of(op, "d elements", rows.saturating_mul(n))?;
    let idx_dt = x.idx.map(|t| t.dtype()).unwrap_or(DType::I32);
    let spec = [
        mode as u32,
        x.scales.is_some() as u32,
        dt(x.a.dtype())?,
        dt(x.b.dtype())?,
        dt(x.d.dtype())?,
        dt(idx_dt)?,
    ];
    let a = rec.whole(x.a)?;
    let b = rec.whole(x.b)?;
    let d = rec.whole(x.d)?;
    // Unused bindings get a placeholder (never read).
    let (sa, sb): (Bind, Bind) = match x.scales {
        Some((sa, sb)) => (rec.whole(sa)?, rec.whole(sb)?),
        None => (a, a),
    };
    let idx = match x.idx {
        Some(t) => rec.whole(t)?,
        None => a,
    };
    let p = Push::new()
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32)
        .u32(k.div_ceil(128) as u32)
        .u32(n.div_ceil(128) as u32)
        .u32(rows as u32)
        .u32(g as u32);
    rec.dispatch("gemm_rows", &spec, &[a, sa, b, sb, idx, d], &p, groups(total))
}

fn fp8_gemm(v: &Vulkan, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    const OP: &str = "fp8_gemm";
    let (a, dims) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    let x = Operands {
        a: a.a,
        scales: Some((a.sa, a.sb)),
        b: a.b,
        idx: None,
        d: &*a.d,
    };
    record(&mut rec, OP, &x, Mode::Dense, dims)?;
    rec.finish()
}

fn fp8_contiguous(v: &Vulkan, op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let (a, dims) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("m_indices", a.m_indices, 0, dims.groups as i64, Some(-1))?;
    let x = Operands {
        a: a.a,
        scales: Some((a.sa, a.sb)),
        b: a.b,
        idx: Some(a.m_indices),
        d: &*a.d,
    };
    record(&mut rec, OP, &x, Mode::Contiguous, dims)?;
    rec.finish()
}

fn fp8_masked(v: &Vulkan, op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let (a, dims) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("masked_m", a.masked_m, 0, dims.m as i64 + 1, None)?;
    let x = Operands {
        a: a.a,
        scales: Some((a.sa, a.sb)),
        b: a.b,
        idx: Some(a.masked_m),
        d: &*a.d,
    };
    record(&mut rec, OP, &x, Mode::Masked, dims)?;
    rec.finish()
}

fn contiguous(v: &Vulkan, op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_contiguous";
    let (a, dims) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("m_indices", a.m_indices, 0, dims.groups as i64, Some(-1))?;
    let x = Operands {
        a: a.a,
        scales: None,
        b: a.b,
        idx: Some(a.m_indices),
        d: &*a.d,
    };
    record(&mut rec, OP, &x, Mode::Contiguous, dims)?;
    rec.finish()
}

fn masked(v: &Vulkan, op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_masked";
    let (a, dims) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("masked_m", a.masked_m, 0, dims.m as i64 + 1, None)?;
    let x = Operands {
        a: a.a,
        scales: None,
        b: a.b,
        idx: Some(a.masked_m),
        d: &*a.d,
    };
    record(&mut rec, OP, &x, Mode::Masked, dims)?;
    rec.finish()
}
