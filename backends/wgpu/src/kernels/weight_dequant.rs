//! `weight_dequant`: block-scaled FP8 weights to f32/bf16/f16, in ranges of
//! 128-row blocks when the tensors exceed the storage binding limit.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/weight_dequant.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.weight_dequant = Some(weight_dequant);
}

fn weight_dequant(w: &Wgpu, op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    const OP: &str = "weight_dequant";
    let (a, d) = op.parts();
    u32_of(OP, "numel", d.n * d.k)?;
    if d.n == 0 || d.k == 0 {
        return Ok(());
    }
    let kb = blocks128(d.k);
    let (k, ew, eo) = (
        d.k as u64,
        a.w.dtype().size() as u64,
        a.out.dtype().size() as u64,
    );
    let mut rec = w.ctx.begin(OP)?;
    let sh = Shader::new(OP, WGSL)
        .input("w", a.w.dtype())
        .input("s", a.s.dtype())
        .output("out", a.out.dtype())
        .per_word("out", "P.total");
    let per = (4 / a.out.dtype().size()) as u32;
    // Units of 128 rows, so that each range starts a scale row.
    let plan = w
        .ctx
        .plan_rows(OP, blocks128(d.n), &[128 * k * ew, 128 * k * eo])?;
    for (b0, b1) in plan {
        let (r0, r1) = (b0 * 128, (b1 * 128).min(d.n));
        let total = ((r1 - r0) * d.k) as u32;
        rec.dispatch_win(
            &sh,
            Params::new()
                .u32(total)
                .u32(d.k as u32)
                .u32(kb as u32)
                .u32(b0 as u32),
            &[
                Win::rows(buffer(a.w)?, k * ew, r0, r1),
                Win::whole(buffer(a.s)?),
                Win::rows(buffer(a.out)?, k * eo, r0, r1),
            ],
            groups(total.div_ceil(per), 256),
        )?;
    }
    rec.finish()
}
