//! `moe_gate`: router logits by the GEMM kernel, then one workgroup per
//! token for the group-limited top-k (`shaders/moe_select.comp`).

use super::{dt, gemm, OpTable};
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

pub(crate) fn register(t: &mut OpTable) {
    t.moe_gate = Some(moe_gate);
}

fn moe_gate(v: &Vulkan, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    const OP: &str = "moe_gate";
    let (a, d) = op.parts();
    let (t, e) = (d.tokens, d.experts);
    let tokens = u32_of(OP, "tokens", t)?;
    u32_of(OP, "tokens·experts", t.saturating_mul(e))?;
    u32_of(OP, "tokens·topk", t.saturating_mul(a.topk))?;
    u32_of(OP, "tokens·n_group·4", t.saturating_mul(a.n_group).saturating_mul(4))?;
    if let Some(b) = a.bias {
        if b.dtype() != DType::F32 {
            return Err(deepport_core::Error::not_supported(
                crate::ctx::BACKEND,
                OP,
                format!("bias of dtype {} (only f32)", b.dtype()),
            ));
        }
    }
    let idx_dt = dt(a.topk_idx.dtype())?;
    let mut rec = v.ctx.begin(OP)?;
    rec.check_finite("x", a.x)?;
    rec.check_finite("weight", a.weight)?;
    if let Some(b) = a.bias {
        rec.check_finite("bias", b)?;
    }
    if tokens == 0 {
        return rec.finish();
    }
    let logits = rec.scratch(4 * (t * e) as u64)?;
    let (x, w) = (rec.whole(a.x)?, rec.whole(a.weight)?);
    gemm::record(
        &mut rec,
        OP,
        (x, a.x.dtype()),
        (w, a.weight.dtype()),
        (logits, DType::F32),
        (t, e, d.dim),
    )?;
    let groups = rec.scratch(16 * (t * a.n_group) as u64)?;
    let bias = match a.bias {
        Some(b) => rec.whole(b)?,
        None => rec.table(&[0u8; 4])?,
    };
    let p = Push::new()
        .u32(e as u32)
        .u32(a.n_group as u32)
        .u32((e / a.n_group) as u32)
        .u32(a.topk_group as u32)
        .u32(a.topk as u32)
        .u32(a.bias.is_some() as u32)
        .f32(a.route_scale)
        .u32(tokens);
    let binds = [
        logits,
        groups,
        bias,
        rec.whole(a.topk_idx)?,
        rec.whole(a.topk_weights)?,
    ];
    rec.dispatch("moe_select", &[idx_dt], &binds, &p, tokens)?;
    rec.finish()
}
