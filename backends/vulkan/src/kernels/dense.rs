//! The row-wise and elementwise dense ops: `act_quant`, `weight_dequant`,
//! `embedding`, `rms_norm`, `rope`, `copy_window`. Each is a port of the
//! wgpu backend's kernel of the same name (same decomposition, same
//! rounding), without windowing: an operand beyond the device's
//! `maxStorageBufferRange` is `NotSupported`.

use super::{dt, groups, OpTable};
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn register(t: &mut OpTable) {
    t.act_quant = Some(act_quant);
    t.weight_dequant = Some(weight_dequant);
    t.embedding = Some(embedding);
    t.rms_norm = Some(rms_norm);
    t.rope = Some(rope);
    t.copy_window = Some(copy_window);
}

fn act_quant(v: &Vulkan, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    const OP: &str = "act_quant";
    let (a, d) = op.parts();
    u32_of(OP, "numel", d.m * d.k)?;
    let groups_total = u32_of(OP, "groups", d.m * (d.k / QBLOCK))?;
    let spec = [dt(a.x.dtype())?, dt(a.q.dtype())?];
    let mut rec = v.ctx.begin(OP)?;
    // A NaN or inf would poison its group's scale without a trace.
    rec.check_finite("x", a.x)?;
    if groups_total > 0 {
        let binds = [rec.whole(a.x)?, rec.whole(a.q)?, rec.whole(a.s)?];
        let p = Push::new()
            .u32(groups_total)
            .f32(d.fp8_max)
            .u32((a.scale_fmt == ScaleFmt::Ue8m0) as u32);
        rec.dispatch_wg(v.ctx.kernel("act_quant"), 128, &spec, &binds, &p, groups_total)?;
    }
    rec.finish()
}

fn weight_dequant(v: &Vulkan, op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    const OP: &str = "weight_dequant";
    let (a, d) = op.parts();
    let total = u32_of(OP, "numel", d.n * d.k)?;
    if total == 0 {
        return Ok(());
    }
    let spec = [dt(a.w.dtype())?, dt(a.s.dtype())?, dt(a.out.dtype())?];
    let mut rec = v.ctx.begin(OP)?;
    let binds = [rec.whole(a.w)?, rec.whole(a.s)?, rec.whole(a.out)?];
    let per = (4 / a.out.dtype().size()) as u32;
    let p = Push::new()
        .u32(total)
        .u32(d.k as u32)
        .u32(blocks128(d.k) as u32);
    rec.dispatch("weight_dequant", &spec, &binds, &p, groups(total.div_ceil(per)))?;
    rec.finish()
}

fn embedding(v: &Vulkan, op: &mut Checked<Embedding<'_>>) -> Result<()> {
    const OP: &str = "embedding";
    let (a, d) = op.parts();
    let total = u32_of(OP, "numel", d.tokens * d.dim)?;
    u32_of(OP, "table numel", d.vocab * d.dim)?;
    let spec = [dt(a.table.dtype())?, dt(a.ids.dtype())?, dt(a.out.dtype())?];
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("ids", a.ids, 0, d.vocab as i64, None)?;
    if total > 0 {
        let binds = [rec.whole(a.table)?, rec.whole(a.ids)?, rec.whole(a.out)?];
        let per = (4 / a.out.dtype().size()) as u32;
        let p = Push::new().u32(total).u32(d.dim as u32).u32(d.vocab as u32);
        rec.dispatch("embedding", &spec, &binds, &p, groups(total.div_ceil(per)))?;
    }
    rec.finish()
}

fn rms_norm(v: &Vulkan, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    const OP: &str = "rms_norm";
    let (a, d) = op.parts();
    let total = u32_of(OP, "numel", d.rows * d.dim)?;
    if total == 0 {
        return Ok(());
    }
    let rows = d.rows as u32;
    let dim = d.dim as u32;
    let mut rec = v.ctx.begin(OP)?;
    let inv = rec.scratch(4 * d.rows as u64)?;
    let x = rec.whole(a.x)?;
    rec.dispatch_wg(
        v.ctx.kernel("rms_stats"),
        256,
        &[dt(a.x.dtype())?],
        &[x, inv],
        &Push::new().u32(rows).u32(dim).f32(a.eps),
        rows,
    )?;
    let spec = [dt(a.x.dtype())?, dt(a.weight.dtype())?, dt(a.y.dtype())?];
    let binds = [x, inv, rec.whole(a.weight)?, rec.whole(a.y)?];
    let per = (4 / a.y.dtype().size()) as u32;
    rec.dispatch(
        "rms_apply",
        &spec,
        &binds,
        &Push::new().u32(total).u32(dim),
        groups(total.div_ceil(per)),
    )?;
    rec.finish()
}

fn rope(v: &Vulkan, op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (a, d) = op.parts();
    if a.config.layout != RopeLayout::Interleaved {
        return Err(deepport_core::Error::not_supported(
            "vulkan",
            OP,
            "rope layout `half` (only interleaved pairs)",
        ));
    }
    u32_of(OP, "numel", a.x.numel())?;
    let half = d.d / 2;
    let per_token = d.heads * d.d;
    let spec = [
        dt(a.x.dtype())?,
        dt(a.positions.dtype())?,
        dt(a.y.dtype())?,
    ];
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("positions", a.positions, 0, i64::MAX, None)?;
    if per_token > 0 && d.tokens > 0 {
        let freq: Vec<u8> = a
            .config
            .inv_freq(d.d)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let table = rec.table(&freq)?;
        let pairs = u32_of(OP, "pairs", d.tokens * per_token / 2)?;
        let binds = [rec.whole(a.x)?, rec.whole(a.positions)?, table, rec.whole(a.y)?];
        let p = Push::new()
            .u32(pairs)
            .u32(half as u32)
            .u32((d.heads * half) as u32)
            .f32(a.config.cos_sin_scale());
        rec.dispatch("rope", &spec, &binds, &p, groups(pairs))?;
    }
    rec.finish()
}

fn copy_window(v: &Vulkan, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    const OP: &str = "copy_window";
    let (a, d) = op.parts();
    let (rows, cols) = a.size;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    u32_of(OP, "dst numel", d.dst.0.saturating_mul(d.dst.1))?;
    u32_of(OP, "src numel", d.src.0.saturating_mul(d.src.1))?;
    let per = 4 / a.dst.dtype().size();
    let wpr = cols.div_ceil(per) + 1;
    let n = u32_of(OP, "window words", rows.saturating_mul(wpr))?;
    let spec = [dt(a.src.dtype())?, dt(a.dst.dtype())?];
    let (sr, sc) = a.src_origin;
    let (dr, dc) = a.dst_origin;
    let mut rec = v.ctx.begin(OP)?;
    let binds = [rec.whole(a.src)?, rec.whole(a.dst)?];
    let p = Push::new()
        .u32(rows as u32)
        .u32(cols as u32)
        .u32(d.src.1 as u32)
        .u32(d.dst.1 as u32)
        .u32(sr as u32)
        .u32(sc as u32)
        .u32(dr as u32)
        .u32(dc as u32)
        .u32(wpr as u32);
    rec.dispatch("copy_window", &spec, &binds, &p, groups(n))?;
    rec.finish()
}
