//! The FP8 block-scaled GEMMs (`fp8_gemm`, `fp8_grouped_contiguous`,
//! `fp8_grouped_masked`) and the grouped plain GEMMs
//! (`gemm_grouped_contiguous`, `gemm_grouped_masked`): one kernel,
//! `shaders/gemm_rows.comp`, with the layout and operand format as
//! specialization constants (`gemm_rows_s8`, the same with FP8 operands
//! read through 8-bit storage, where the device has it; `fp8_gemm` on the
//! cooperative-matrix tile kernel where the device has a suitable
//! configuration). e4m3/e4m3fnuz and bf16 are decoded by bit
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
    u32_of(op, "d elements", rows.saturating_mul(n))?;
    let idx_dt = x.idx.map(|t| t.dtype()).unwrap_or(DType::I32);
    let spec = [
        mode as u32,
        x.scales.is_some() as u32,
        dt(x.a.dtype())?,
        dt(x.b.dtype())?,
        dt(x.d.dtype())?,
        dt(idx_dt)?,
    ];
    // Windows of whole groups when b (or, masked, a or d) exceeds one
    // binding; b's groups (and sb's) are bound from their first byte.
    let max = rec.max_range();
    let per_group = |t: &Tensor| t.nbytes() as u64 / g as u64;
    let mut unit = per_group(x.b);
    if let Some((_, sb)) = x.scales {
        unit = unit.max(per_group(sb));
    }
    if mode == Mode::Masked {
        unit = unit.max(per_group(x.a)).max(per_group(x.d));
        if let Some((sa, _)) = x.scales {
            unit = unit.max(per_group(sa));
        }
    }
    let Some(per) = deepport_gpu_host::window::groups_per_window(g, unit, max) else {
        return Err(deepport_core::Error::not_supported(
            crate::ctx::BACKEND,
            op,
            format!("one group of {unit} bytes exceeds maxStorageBufferRange ({max} bytes)"),
        ));
    };
    let used = rec.used().clone();
    if let (Mode::Dense, Some((sa, sb)), Some([tm, tn, tk])) = (mode, x.scales, used.coopmat) {
        // The cooperative-matrix tile kernel (one subgroup per tm×tn tile).
        let tiles_n = n.div_ceil(tn as usize);
        let tiles = u32_of(op, "tiles", m.div_ceil(tm as usize) * tiles_n)?;
        let spec = [dt(x.a.dtype())?, dt(x.b.dtype())?, dt(x.d.dtype())?, tm, tn, tk];
        let binds = [
            rec.whole(x.a)?,
            rec.whole(sa)?,
            rec.whole(x.b)?,
            rec.whole(sb)?,
            rec.whole(x.d)?,
        ];
        let p = Push::new()
            .u32(m as u32)
            .u32(n as u32)
            .u32(k as u32)
            .u32(k.div_ceil(128) as u32)
            .u32(n.div_ceil(128) as u32)
            .u32(tiles_n as u32)
            .u32(tiles);
        let wg = rec.subgroup_size();
        return rec.dispatch_wg("fp8_gemm_coopmat", wg, &spec, &binds, &p, tiles);
    }
    // FP8 operands through 8-bit storage where the device has it.
    let kernel = if x.scales.is_some() && used.fp8_storage8 {
        "gemm_rows_s8"
    } else {
        "gemm_rows"
    };
    let whole_rows = mode != Mode::Masked;
    let idx = match x.idx {
        Some(t) => Some(rec.whole(t)?),
        None => None,
    };
    let (mut a_whole, mut d_whole, mut sa_whole) = (None, None, None);
    if whole_rows {
        a_whole = Some(rec.whole(x.a)?);
        d_whole = Some(rec.whole(x.d)?);
        if let Some((sa, _)) = x.scales {
            sa_whole = Some(rec.whole(sa)?);
        }
    }
    let window = |rec: &Rec<'_>, t: &Tensor, g0: usize, g1: usize| -> Result<Bind> {
        let pg = per_group(t);
        rec.bind_bytes(t, g0 as u64 * pg, (g1 - g0) as u64 * pg)
    };
    let mut g0 = 0;
    while g0 < g {
        let g1 = (g0 + per).min(g);
        let b = window(rec, x.b, g0, g1)?;
        let (a, d) = match (a_whole, d_whole) {
            (Some(a), Some(d)) => (a, d),
            _ => (window(rec, x.a, g0, g1)?, window(rec, x.d, g0, g1)?),
        };
        // Unused bindings get a placeholder (never read).
        let (sa, sb) = match x.scales {
            Some((sa, sb)) => (
                match sa_whole {
                    Some(s) => s,
                    None => window(rec, sa, g0, g1)?,
                },
                window(rec, sb, g0, g1)?,
            ),
            None => (a, a),
        };
        let (r0, nrows) = if whole_rows { (0, rows) } else { (g0 * m, (g1 - g0) * m) };
        let p = Push::new()
            .u32(m as u32)
            .u32(n as u32)
            .u32(k as u32)
            .u32(k.div_ceil(128) as u32)
            .u32(n.div_ceil(128) as u32)
            .u32(nrows as u32)
            .u32(g as u32)
            .u32(g0 as u32)
            .u32(g1 as u32)
            .u32(r0 as u32);
        let count = u32_of(op, "d elements", nrows * n)?;
        let binds = [a, sa, b, sb, idx.unwrap_or(a), d];
        rec.dispatch(kernel, &spec, &binds, &p, groups(count))?;
        g0 = g1;
    }
    Ok(())
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
