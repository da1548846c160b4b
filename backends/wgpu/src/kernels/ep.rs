//! `get_dispatch_layout` (SPEC.md §7), entirely on the device: atomics for
//! the counts, the op's range check for bad expert ids. Tokens are processed
//! in windows when `topk_idx` or `is_token_in_rank` exceed the storage
//! binding limit.
//!
//! The four communicating expert-parallel ops are core's protocol
//! (`deepport_core::ep`: one wire format, so ranks of different backends
//! share a group) over this backend's `gather_rows`, `reduce_rows`
//! (`rows.rs`) and `act_quant` kernels.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ep::experts_per_rank;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

const LAYOUT_WGSL: &str = include_str!("../shaders/ep_layout.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.get_dispatch_layout = Some(get_dispatch_layout);
}

/// The first word of a buffer: the binding of a window that holds nothing.
fn word0(buf: &wgpu::Buffer) -> Win<'_> {
    Win {
        buf,
        offset: 0,
        size: 4.min(buf.size()),
    }
}

// ---- get_dispatch_layout --------------------------------------------------------------

fn get_dispatch_layout(w: &Wgpu, op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, k, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    let epr = experts_per_rank(OP, e, world)?;
    u32_of(OP, "topk_idx elements", n * k)?;
    u32_of(OP, "is_token_in_rank elements", n * world)?;
    let (e32, r32) = (u32_of(OP, "num_experts", e)?, world as u32);
    let k32 = u32_of(OP, "top-k", k)?;
    // Windows of tokens: rows of topk_idx and of is_token_in_rank.
    let (tb, ib) = ((k * a.topk_idx.dtype().size()) as u64, world as u64);
    let mut plan = w.ctx.plan_rows(OP, n, &[tb.max(1), ib.max(1)])?;
    if plan.is_empty() {
        plan.push((0, 0));
    }
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("topk_idx", a.topk_idx, 0, e as i64, Some(-1))?;
    // Every window is cleared before any is counted.
    for phase in [0u32, 1] {
        let sh = Shader::new("ep_layout", LAYOUT_WGSL)
            .constant("PHASE", format!("{phase}u"))
            .input("topk", a.topk_idx.dtype())
            .atomic_output("per_rank", DType::I32)
            .atomic_output("per_expert", DType::I32)
            .atomic_output("in_rank", DType::Bool);
        for &(t0, t1) in &plan {
            let rows = (t1 - t0) as u32;
            let in_rank_words = (rows * r32).div_ceil(4);
            let count = if phase == 0 {
                // The counts are cleared once, with the first window.
                let counts = if t0 == 0 { r32.max(e32) } else { 0 };
                counts.max(in_rank_words)
            } else {
                rows
            };
            let p = Params::new()
                .u32(rows)
                .u32(k32)
                .u32(if phase == 0 && t0 > 0 { 0 } else { e32 })
                .u32(if phase == 0 && t0 > 0 { 0 } else { r32 })
                .u32(epr as u32)
                .u32(in_rank_words);
            let (topk, in_rank) = if t1 > t0 {
                (
                    Win::rows(buffer(a.topk_idx)?, tb.max(1), t0, t1),
                    Win::rows(buffer(a.is_token_in_rank)?, ib.max(1), t0, t1),
                )
            } else {
                (
                    word0(buffer(a.topk_idx)?),
                    word0(buffer(a.is_token_in_rank)?),
                )
            };
            let bufs = [
                topk,
                Win::whole(buffer(a.num_tokens_per_rank)?),
                Win::whole(buffer(a.num_tokens_per_expert)?),
                in_rank,
            ];
            rec.dispatch_win(&sh, p, &bufs, groups(count, 256))?;
        }
    }
    rec.finish()
}
