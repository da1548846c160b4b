//! `rope` (plain and YaRN): the frequency table comes from
//! `RopeConfig::inv_freq` on the host, uploaded once per configuration.
//! Tokens are processed in ranges when the tensors exceed the storage
//! binding limit.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/rope.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.rope = Some(rope);
}

fn rope(w: &Wgpu, op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (a, d) = op.parts();
    if a.config.layout != RopeLayout::Interleaved {
        return Err(deepport_core::Error::not_supported(
            "wgpu",
            OP,
            "rope layout `half` (only interleaved pairs)",
        ));
    }
    u32_of(OP, "numel", a.x.numel())?;
    let half = d.d / 2;
    let per_token = d.heads * d.d;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("positions", a.positions, 0, i64::MAX, None)?;
    if per_token > 0 && d.tokens > 0 {
        let freq: Vec<u8> = a
            .config
            .inv_freq(d.d)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let table = rec.table(&freq)?;
        let sh = Shader::new(OP, WGSL)
            .input("x", a.x.dtype())
            .input("positions", a.positions.dtype())
            .raw("freq", false)
            .output("y", a.y.dtype());
        let rb = |t: &deepport_core::backend::Tensor| (per_token * t.dtype().size()) as u64;
        let ep = a.positions.dtype().size() as u64;
        let plan = w.ctx.plan_rows(OP, d.tokens, &[rb(a.x), rb(a.y), ep])?;
        for (t0, t1) in plan {
            let pairs = ((t1 - t0) * per_token / 2) as u32;
            let p = Params::new()
                .u32(pairs)
                .u32(half as u32)
                .u32((d.heads * half) as u32)
                .f32(a.config.cos_sin_scale());
            rec.dispatch_win(
                &sh,
                p,
                &[
                    Win::rows(buffer(a.x)?, rb(a.x), t0, t1),
                    Win::rows(buffer(a.positions)?, ep, t0, t1),
                    Win::whole(&table),
                    Win::rows(buffer(a.y)?, rb(a.y), t0, t1),
                ],
                groups(pairs, 256),
            )?;
        }
    }
    rec.finish()
}
