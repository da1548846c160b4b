//! `embedding`: a row gather with a device-side id check. Tokens are
//! processed in ranges, and a table beyond the storage binding limit in
//! windows of rows, when the tensors are too large to bind at once.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/embedding.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.embedding = Some(embedding);
}

fn embedding(w: &Wgpu, op: &mut Checked<Embedding<'_>>) -> Result<()> {
    const OP: &str = "embedding";
    let (a, d) = op.parts();
    u32_of(OP, "numel", d.tokens * d.dim)?;
    u32_of(OP, "table numel", d.vocab * d.dim)?;
    let dim = d.dim as u32;
    let vocab = d.vocab as u32;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("ids", a.ids, 0, d.vocab as i64, None)?;
    if d.tokens > 0 && d.dim > 0 {
        let sh = Shader::new(OP, WGSL)
            .input("table", a.table.dtype())
            .input("ids", a.ids.dtype())
            .output("out", a.out.dtype());
        let per = (4 / a.out.dtype().size()) as u32;
        let row = |t: &deepport_core::backend::Tensor| (d.dim * t.dtype().size()) as u64;
        let ei = a.ids.dtype().size() as u64;
        let tokens = w.ctx.plan_rows(OP, d.tokens, &[row(a.out), ei])?;
        let windows = if d.vocab == 0 {
            vec![(0, 0)]
        } else {
            w.ctx.plan_rows(OP, d.vocab, &[row(a.table)])?
        };
        let partial = windows.len() > 1;
        for &(t0, t1) in &tokens {
            let total = ((t1 - t0) * d.dim) as u32;
            for &(v0, v1) in &windows {
                let table = if d.vocab == 0 {
                    Win::whole(buffer(a.table)?)
                } else {
                    Win::rows(buffer(a.table)?, row(a.table), v0, v1)
                };
                rec.dispatch_win(
                    &sh,
                    Params::new()
                        .u32(total)
                        .u32(dim)
                        .u32(vocab)
                        .u32(v0 as u32)
                        .u32(if d.vocab == 0 { 0 } else { v1 as u32 })
                        .u32(partial as u32),
                    &[
                        table,
                        Win::rows(buffer(a.ids)?, ei, t0, t1),
                        Win::rows(buffer(a.out)?, row(a.out), t0, t1),
                    ],
                    groups(total.div_ceil(per), 256),
                )?;
            }
        }
    }
    rec.finish()
}
