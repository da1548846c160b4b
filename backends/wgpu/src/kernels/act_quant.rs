//! `act_quant`: per-token 128-group FP8 quantization, bit-exact; rows in
//! ranges when the tensors exceed the storage binding limit.

use super::OpTable;
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/act_quant.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.act_quant = Some(act_quant);
}

fn act_quant(w: &Wgpu, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    const OP: &str = "act_quant";
    let (a, d) = op.parts();
    u32_of(OP, "numel", d.m * d.k)?;
    let g = d.k / QBLOCK;
    let mut rec = w.ctx.begin(OP)?;
    // A NaN or inf would poison its group's scale without a trace.
    rec.check_finite("x", a.x)?;
    if g > 0 {
        let sh = Shader::new(OP, WGSL)
            .workgroup_size(128)
            .input("x", a.x.dtype())
            .output("q", a.q.dtype())
            .output("s", a.s.dtype());
        let k = d.k as u64;
        let ex = a.x.dtype().size() as u64;
        let plan = w.ctx.plan_rows(OP, d.m, &[k * ex, k, g as u64 * 4])?;
        for (r0, r1) in plan {
            let total = ((r1 - r0) * g) as u32;
            let p = Params::new()
                .u32(total)
                .f32(d.fp8_max)
                .u32((a.scale_fmt == ScaleFmt::Ue8m0) as u32);
            rec.dispatch_win(
                &sh,
                p,
                &[
                    Win::rows(buffer(a.x)?, k * ex, r0, r1),
                    Win::rows(buffer(a.q)?, k, r0, r1),
                    Win::rows(buffer(a.s)?, g as u64 * 4, r0, r1),
                ],
                total,
            )?;
        }
    }
    rec.finish()
}
