//! `add` and `silu_mul`: one invocation per output word.

use super::{dt, groups, OpTable};
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn register(t: &mut OpTable) {
    t.add = Some(add);
    t.silu_mul = Some(silu_mul);
}

fn run(v: &Vulkan, op: &'static str, code: u32, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    let n = u32_of(op, "numel", out.numel())?;
    let spec = [code, dt(a.dtype())?, dt(b.dtype())?, dt(out.dtype())?];
    let mut rec = v.ctx.begin(op)?;
    let binds = [rec.whole(a)?, rec.whole(b)?, rec.whole(out)?];
    let per = (4 / out.dtype().size()) as u32;
    rec.dispatch("elementwise", &spec, &binds, &Push::new().u32(n), groups(n.div_ceil(per)))?;
    rec.finish()
}

fn add(v: &Vulkan, op: &mut Checked<Add<'_>>) -> Result<()> {
    let a = op.args();
    run(v, "add", 0, a.a, a.b, &*a.out)
}

fn silu_mul(v: &Vulkan, op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    let a = op.args();
    run(v, "silu_mul", 1, a.gate, a.up, &*a.out)
}
