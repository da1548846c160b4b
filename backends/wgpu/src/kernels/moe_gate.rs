//! `moe_gate`: router logits by the GEMM kernel, then one workgroup per
//! token for the group-limited top-k (see `shaders/moe_select.wgsl`).

use super::{gemm, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

const WGSL: &str = include_str!("../shaders/moe_select.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.moe_gate = Some(moe_gate);
}

fn moe_gate(w: &Wgpu, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    const OP: &str = "moe_gate";
    let (a, d) = op.parts();
    let (t, e) = (d.tokens, d.experts);
    let tokens = u32_of(OP, "tokens", t)?;
    u32_of(OP, "tokens·experts", t.saturating_mul(e))?;
    u32_of(OP, "tokens·topk", t.saturating_mul(a.topk))?;
    u32_of(
        OP,
        "tokens·n_group·4",
        t.saturating_mul(a.n_group).saturating_mul(4),
    )?;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_finite("x", a.x)?;
    rec.check_finite("weight", a.weight)?;
    if let Some(b) = a.bias {
        rec.check_finite("bias", b)?;
    }
    if tokens == 0 {
        return rec.finish();
    }
    let logits = rec.scratch(4 * (t * e) as u64)?;
    gemm::record(
        &mut rec,
        OP,
        (buffer(a.x)?, a.x.dtype()),
        (buffer(a.weight)?, a.weight.dtype()),
        (&logits, DType::F32),
        (t, e, d.dim),
    )?;
    let groups = rec.scratch(16 * (t * a.n_group) as u64)?;
    let zero = rec.table(&[0u8; 4])?;
    let bias = match a.bias {
        Some(b) => buffer(b)?.clone(),
        None => zero,
    };
    let sh = Shader::new("moe_select", WGSL)
        .raw("logits", true)
        .raw("groups", true)
        .input("bias", DType::F32)
        .output("topk_idx", a.topk_idx.dtype())
        .output("topk_weights", DType::F32);
    let rl = 4 * e as u64;
    let rg = 16 * a.n_group as u64;
    let ri = (a.topk * a.topk_idx.dtype().size()) as u64;
    let rw = 4 * a.topk as u64;
    for (t0, t1) in w.ctx.plan_rows(OP, t, &[rl, rg, ri, rw])? {
        let p = Params::new()
            .u32(e as u32)
            .u32(a.n_group as u32)
            .u32((e / a.n_group) as u32)
            .u32(a.topk_group as u32)
            .u32(a.topk as u32)
            .u32(a.bias.is_some() as u32)
            .f32(a.route_scale)
            .u32((t1 - t0) as u32);
        rec.dispatch_win(
            &sh,
            p,
            &[
                Win::rows(&logits, rl, t0, t1),
                Win::rows(&groups, rg, t0, t1),
                Win::whole(&bias),
                Win::rows(buffer(a.topk_idx)?, ri, t0, t1),
                Win::rows(buffer(a.topk_weights)?, rw, t0, t1),
            ],
            (t1 - t0) as u32,
        )?;
    }
    rec.finish()
}
