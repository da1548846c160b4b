//! `rope` (plain and YaRN, interleaved or half-split pairs): the frequency
//! table comes from `RopeConfig::inv_freq` on the host, uploaded once per
//! configuration. Interleaved pairs run one invocation per pair
//! (`rope.wgsl`); half-split pairs (`layout = half`, V3.2's indexer) one
//! invocation per output word (`rope_half.wgsl`). Tokens are processed in
//! ranges when the tensors exceed the storage binding limit.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

const WGSL: &str = include_str!("../shaders/rope.wgsl");
const HALF: &str = include_str!("../shaders/rope_half.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.rope = Some(rope);
}

fn rope(w: &Wgpu, op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (a, d) = op.parts();
    let interleaved = a.config.layout == RopeLayout::Interleaved;
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
        let sh = if interleaved {
            Shader::new(OP, WGSL)
        } else {
            Shader::new("rope_half", HALF).per_word("y", "P.n")
        }
        .input("x", a.x.dtype())
        .input("positions", a.positions.dtype())
        .raw("freq", false)
        .output("y", a.y.dtype());
        let rb = |t: &deepport_core::backend::Tensor| (per_token * t.dtype().size()) as u64;
        let ep = a.positions.dtype().size() as u64;
        let plan = w.ctx.plan_rows(OP, d.tokens, &[rb(a.x), rb(a.y), ep])?;
        for (t0, t1) in plan {
            let pairs = ((t1 - t0) * per_token / 2) as u32;
            let n = ((t1 - t0) * per_token) as u32;
            let (p, groups_n) = if interleaved {
                let p = Params::new()
                    .u32(pairs)
                    .u32(half as u32)
                    .u32((d.heads * half) as u32)
                    .f32(a.config.cos_sin_scale());
                (p, groups(pairs, 256))
            } else {
                let p = Params::new()
                    .u32(n)
                    .u32(d.d as u32)
                    .u32(half as u32)
                    .u32(per_token as u32)
                    .f32(a.config.cos_sin_scale());
                let per = 4 / a.y.dtype().size().min(4) as u32;
                (p, groups(n.div_ceil(per), 256))
            };
            rec.dispatch_win(
                &sh,
                p,
                &[
                    Win::rows(buffer(a.x)?, rb(a.x), t0, t1),
                    Win::rows(buffer(a.positions)?, ep, t0, t1),
                    Win::whole(&table),
                    Win::rows(buffer(a.y)?, rb(a.y), t0, t1),
                ],
                groups_n,
            )?;
        }
    }
    rec.finish()
}
