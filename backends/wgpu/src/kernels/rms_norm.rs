//! `rms_norm`: a row-statistics pass and an elementwise pass, over ranges of
//! rows when the tensors exceed the storage binding limit.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const STATS: &str = include_str!("../shaders/rms_stats.wgsl");
const APPLY: &str = include_str!("../shaders/rms_apply.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.rms_norm = Some(rms_norm);
}

fn rms_norm(w: &Wgpu, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    const OP: &str = "rms_norm";
    let (a, d) = op.parts();
    u32_of(OP, "numel", d.rows * d.dim)?;
    if d.rows == 0 || d.dim == 0 {
        return Ok(());
    }
    let dim = d.dim as u32;
    let (ex, ey) = (a.x.dtype().size() as u64, a.y.dtype().size() as u64);
    let rb = (d.dim as u64 * ex, d.dim as u64 * ey);
    let plan = w.ctx.plan_rows(OP, d.rows, &[rb.0, rb.1, 4])?;
    let mut rec = w.ctx.begin(OP)?;
    let most = plan.iter().map(|(r0, r1)| r1 - r0).max().unwrap_or(0);
    let inv = rec.scratch(4 * most as u64)?;
    let stats = Shader::new("rms_stats", STATS)
        .input("x", a.x.dtype())
        .raw("inv", true);
    let apply = Shader::new("rms_apply", APPLY)
        .input("x", a.x.dtype())
        .raw("inv", false)
        .input("weight", a.weight.dtype())
        .output("y", a.y.dtype())
        .per_word("y", "P.total");
    let per = (4 / a.y.dtype().size()) as u32;
    for (r0, r1) in plan {
        let rows = (r1 - r0) as u32;
        let x = Win::rows(buffer(a.x)?, rb.0, r0, r1);
        let invw = Win::rows(&inv, 4, 0, r1 - r0);
        rec.dispatch_win(
            &stats,
            Params::new().u32(rows).u32(dim).f32(a.eps),
            &[x, invw],
            rows,
        )?;
        let total = rows * dim;
        rec.dispatch_win(
            &apply,
            Params::new().u32(total).u32(dim),
            &[
                x,
                invw,
                Win::whole(buffer(a.weight)?),
                Win::rows(buffer(a.y)?, rb.1, r0, r1),
            ],
            groups(total.div_ceil(per), 256),
        )?;
    }
    rec.finish()
}
