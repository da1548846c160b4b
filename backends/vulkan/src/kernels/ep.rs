//! `get_dispatch_layout`: the expert-parallel routing layout as a kernel
//! (the expert-parallel ops themselves are core's protocol over
//! `gather_rows`, `reduce_rows` and `act_quant`).

use super::{dt, groups, OpTable};
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::ep::experts_per_rank;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

pub(crate) fn register(t: &mut OpTable) {
    t.get_dispatch_layout = Some(get_dispatch_layout);
}

fn get_dispatch_layout(v: &Vulkan, op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, k, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    let epr = experts_per_rank(OP, e, world)?;
    u32_of(OP, "topk_idx elements", n * k)?;
    u32_of(OP, "is_token_in_rank elements", n * world)?;
    for t in [&*a.num_tokens_per_rank, &*a.num_tokens_per_expert] {
        if t.dtype() != DType::I32 {
            return Err(Error::not_supported(crate::ctx::BACKEND, OP, "counts other than i32"));
        }
    }
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("topk_idx", a.topk_idx, 0, e as i64, Some(-1))?;
    let outs = [
        rec.whole(a.num_tokens_per_rank)?,
        rec.whole(a.num_tokens_per_expert)?,
        rec.whole(a.is_token_in_rank)?,
    ];
    for o in outs {
        rec.zero(o);
    }
    if n > 0 {
        let p = Push::new()
            .u32(n as u32)
            .u32(k as u32)
            .u32(e as u32)
            .u32(world as u32)
            .u32(epr as u32);
        let binds = [rec.whole(a.topk_idx)?, outs[0], outs[1], outs[2]];
        rec.dispatch("ep_layout", &[dt(a.topk_idx.dtype())?], &binds, &p, groups(n as u32))?;
    }
    rec.finish()
}
