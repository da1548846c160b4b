//! `add` and `silu_mul`: one invocation per output word. Tensors beyond the
//! storage binding limit are processed in aligned element ranges.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/elementwise.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.add = Some(add);
    t.silu_mul = Some(silu_mul);
}

fn run(w: &Wgpu, op: &'static str, code: u32, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    u32_of(op, "numel", out.numel())?;
    let mut rec = w.ctx.begin(op)?;
    let sh = Shader::new(op, WGSL)
        .constant("OP", format!("{code}u"))
        .input("a", a.dtype())
        .input("b", b.dtype())
        .output("out", out.dtype())
        .per_word("out", "P.n");
    let es = |t: &Tensor| t.dtype().size() as u64;
    let per = (4 / out.dtype().size()) as u32;
    let plan = w.ctx.plan_rows(op, out.numel(), &[es(a), es(b), es(out)])?;
    for (e0, e1) in plan {
        let n = (e1 - e0) as u32;
        rec.dispatch_win(
            &sh,
            Params::new().u32(n),
            &[
                Win::rows(buffer(a)?, es(a), e0, e1),
                Win::rows(buffer(b)?, es(b), e0, e1),
                Win::rows(buffer(out)?, es(out), e0, e1),
            ],
            groups(n.div_ceil(per), 256),
        )?;
    }
    rec.finish()
}

fn add(w: &Wgpu, op: &mut Checked<Add<'_>>) -> Result<()> {
    let a = op.args();
    run(w, "add", 0, a.a, a.b, &*a.out)
}

fn silu_mul(w: &Wgpu, op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    let a = op.args();
    run(w, "silu_mul", 1, a.gate, a.up, &*a.out)
}
