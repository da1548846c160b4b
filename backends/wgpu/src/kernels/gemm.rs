//! `gemm`: a tiled f32-accumulating GEMM (f32, bf16, f16 operands). Also
//! used by `moe_gate` for the router logits. Operands beyond the storage
//! binding limit are processed in row ranges of a (and d) and of b.

use super::OpTable;
use crate::ctx::{buffer, u32_of, Params, Rec, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

const WGSL: &str = include_str!("../shaders/gemm.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.gemm = Some(gemm);
}

/// A buffer and the dtype of its elements.
pub(crate) type Operand<'b> = (&'b wgpu::Buffer, DType);

/// Records `d[m, n] = a[m, k] · b[n, k]ᵀ`.
pub(crate) fn record(
    rec: &mut Rec<'_>,
    op: &'static str,
    a: Operand<'_>,
    b: Operand<'_>,
    d: Operand<'_>,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    u32_of(op, "m·k", m.saturating_mul(k))?;
    u32_of(op, "n·k", n.saturating_mul(k))?;
    u32_of(op, "m·n", m.saturating_mul(n))?;
    let sh = Shader::new("gemm", WGSL)
        .input("a", a.1)
        .input("b", b.1)
        .atomic_output("d", d.1);
    let ra = (k * a.1.size()) as u64;
    let rb = (k * b.1.size()) as u64;
    let rd = (n * d.1.size()) as u64;
    let ctx = rec.ctx();
    let rows = ctx.plan_rows(op, m, &[ra, rd])?;
    let cols = ctx.plan_rows(op, n, &[rb])?;
    for &(m0, m1) in &rows {
        for &(n0, n1) in &cols {
            let (mc, nc) = (m1 - m0, n1 - n0);
            let tiles_n = nc.div_ceil(64);
            let tiles = u32_of(op, "tiles", mc.div_ceil(64) * tiles_n)?;
            let p = Params::new()
                .u32(mc as u32)
                .u32(nc as u32)
                .u32(k as u32)
                .u32(tiles_n as u32)
                .u32(tiles)
                .u32(n as u32)
                .u32(n0 as u32);
            rec.dispatch_win(
                &sh,
                p,
                &[
                    Win::rows(a.0, ra, m0, m1),
                    Win::rows(b.0, rb, n0, n1),
                    Win::rows(d.0, rd, m0, m1),
                ],
                tiles,
            )?;
        }
    }
    Ok(())
}

fn gemm(w: &Wgpu, op: &mut Checked<Gemm<'_>>) -> Result<()> {
    const OP: &str = "gemm";
    let (args, d) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    record(
        &mut rec,
        OP,
        (buffer(args.a)?, args.a.dtype()),
        (buffer(args.b)?, args.b.dtype()),
        (buffer(args.d)?, args.d.dtype()),
        (d.m, d.n, d.k),
    )?;
    rec.finish()
}
