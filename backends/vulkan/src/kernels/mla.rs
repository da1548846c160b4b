//! `mla_decode` (paged latent cache, SPEC §4) and `mla_prefill` (SPEC §5).
//!
//! Decode: `mla_check` flags bad `cache_seqlens` and the bad block ids the
//! lengths use (reported at the next download/synchronize, as cpu-ref's
//! checks would at the call), then one workgroup per query row computes
//! scores into a scratch row, the softmax by shared-memory reductions and
//! the output (`shaders/mla_decode.comp`). Prefill: five staged kernels in
//! the absorbed order for both forms (`shaders/mla_prefill.comp`). All
//! accumulation is f32.

use super::{dt, groups, OpTable};
use crate::checks::CheckKind;
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

pub(crate) fn register(t: &mut OpTable) {
    t.mla_decode = Some(mla_decode);
    t.mla_prefill = Some(mla_prefill);
}

fn mla_decode(v: &Vulkan, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    const OP: &str = "mla_decode";
    let (a, d) = op.parts();
    if a.block_table.dtype() != DType::I32 || a.cache_seqlens.dtype() != DType::I32 {
        return Err(Error::not_supported(crate::ctx::BACKEND, OP, "index tensors other than i32"));
    }
    let items = u32_of(OP, "b·s_q·h_q", d.batch * d.s_q * d.h_q)?;
    let cap = d.max_blocks.saturating_mul(d.block_size);
    u32_of(OP, "cache capacity", cap)?;
    u32_of(OP, "rows·capacity", (items as usize).saturating_mul(cap))?;
    u32_of(OP, "kcache elements", a.kcache.numel())?;
    u32_of(OP, "q elements", a.q.numel())?;
    let spec = [dt(a.q.dtype())?, dt(a.out.dtype())?, a.causal as u32];
    let mut rec = v.ctx.begin(OP)?;
    let capacity = cap as i64;
    let e_len = rec.entry(
        "cache_seqlens",
        a.cache_seqlens.shape(),
        CheckKind::Range {
            lo: 0,
            hi: capacity + 1,
            allow: None,
        },
    )?;
    let e_blk = rec.entry(
        "block_table",
        a.block_table.shape(),
        CheckKind::Range {
            lo: 0,
            hi: d.num_blocks as i64,
            allow: None,
        },
    )?;
    let bt = rec.whole(a.block_table)?;
    let sl = rec.whole(a.cache_seqlens)?;
    let status = rec.status();
    let n = u32_of(OP, "b·max_blocks", d.batch * d.max_blocks.max(1))?;
    let p = Push::new()
        .u32(d.batch as u32)
        .u32(d.max_blocks as u32)
        .u32(d.block_size as u32)
        .u32(d.num_blocks as u32)
        .u32(cap as u32)
        .u32(e_len)
        .u32(e_blk);
    rec.dispatch("mla_check", &[], &[bt, sl, status], &p, groups(n))?;
    let code = dt(DType::I32)?;
    let bt_len = a.block_table.numel() as u32;
    rec.dispatch("capture", &[code], &[sl, status], &Push::new().u32(e_len).u32(0).u32(d.batch as u32), 1)?;
    rec.dispatch("capture", &[code], &[bt, status], &Push::new().u32(e_blk).u32(0).u32(bt_len), 1)?;
    if items > 0 && d.dv + d.d > 0 {
        let scores = rec.scratch(4 * (items as u64 * cap as u64).max(1))?;
        let binds = [
            rec.whole(a.q)?,
            rec.whole(a.kcache)?,
            bt,
            sl,
            rec.whole(a.out)?,
            rec.whole(a.lse)?,
            scores,
        ];
        let p = Push::new()
            .u32(items)
            .u32(d.s_q as u32)
            .u32(d.h_q as u32)
            .u32(d.h_kv as u32)
            .u32(d.d as u32)
            .u32(d.dv as u32)
            .u32(d.num_blocks.max(1) as u32)
            .u32(d.block_size as u32)
            .u32(d.max_blocks as u32)
            .u32(cap as u32)
            .f32(a.softmax_scale);
        rec.dispatch(v.ctx.kernel("mla_decode"), &spec, &binds, &p, items)?;
    }
    rec.finish()
}

fn mla_prefill(v: &Vulkan, op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    const OP: &str = "mla_prefill";
    let (a, d) = op.parts();
    let th = d.t * d.heads;
    u32_of(OP, "T·H·dc", th.saturating_mul(d.dc))?;
    u32_of(OP, "T·H·S", th.saturating_mul(d.s))?;
    u32_of(OP, "T·H·dv", th.saturating_mul(d.dv))?;
    u32_of(OP, "wkv_b elements", a.wkv_b.numel())?;
    u32_of(OP, "latent elements", a.latent.numel())?;
    if th == 0 || d.dv == 0 {
        return Ok(());
    }
    let dts = [
        dt(a.q_nope.dtype())?,
        dt(a.q_pe.dtype())?,
        dt(a.latent.dtype())?,
        dt(a.k_pe.dtype())?,
        dt(a.wkv_b.dtype())?,
        dt(a.out.dtype())?,
    ];
    let mut rec = v.ctx.begin(OP)?;
    let ql = rec.scratch(4 * (th * d.dc).max(1) as u64)?;
    let sc = rec.scratch(4 * (th * d.s).max(1) as u64)?;
    let binds = [
        rec.whole(a.q_nope)?,
        rec.whole(a.q_pe)?,
        rec.whole(a.latent)?,
        rec.whole(a.k_pe)?,
        rec.whole(a.wkv_b)?,
        ql,
        sc,
        rec.whole(a.out)?,
    ];
    let p = Push::new()
        .u32(d.t as u32)
        .u32(d.s as u32)
        .u32(d.heads as u32)
        .u32(d.dn as u32)
        .u32(d.dr as u32)
        .u32(d.dc as u32)
        .u32(d.dv as u32)
        .f32(a.softmax_scale);
    let stage = |s: u32| {
        let mut v = vec![s];
        v.extend_from_slice(&dts);
        v
    };
    let counts = [th * d.dc, th * d.s, 0, th * d.dc, th * d.dv];
    for (s, &n) in counts.iter().enumerate() {
        let wgs = if s == 2 { th as u32 } else { groups(n as u32) };
        rec.dispatch("mla_prefill", &stage(s as u32), &binds, &p, wgs)?;
    }
    rec.finish()
}
