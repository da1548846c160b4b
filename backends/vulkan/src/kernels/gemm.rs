//! `gemm`: a tiled f32-accumulating GEMM (f32, bf16, f16 operands; bf16 and
//! f16 decoded by bit manipulation, so no device type is needed).

use super::{dt, OpTable};
use crate::ctx::{u32_of, Bind, Push, Rec};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

pub(crate) fn register(t: &mut OpTable) {
    t.gemm = Some(gemm);
}

/// Records `d[m, n] = a[m, k] · b[n, k]ᵀ` (operands as bindings and dtypes).
pub(crate) fn record(
    rec: &mut Rec<'_>,
    op: &'static str,
    a: (Bind, DType),
    b: (Bind, DType),
    d: (Bind, DType),
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    u32_of(op, "m·k", m.saturating_mul(k))?;
    u32_of(op, "n·k", n.saturating_mul(k))?;
    u32_of(op, "m·n", m.saturating_mul(n))?;
    let tiles_n = n.div_ceil(64);
    let tiles = u32_of(op, "tiles", m.div_ceil(64) * tiles_n)?;
    let p = Push::new()
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32)
        .u32(tiles_n as u32)
        .u32(tiles)
        .u32(n as u32)
        .u32(0)
        .u32(0)
        .u32(0);
    let spec = [dt(a.1)?, dt(b.1)?, dt(d.1)?];
    rec.dispatch("gemm", &spec, &[a.0, b.0, d.0], &p, tiles)
}

fn gemm(v: &Vulkan, op: &mut Checked<Gemm<'_>>) -> Result<()> {
    const OP: &str = "gemm";
    let (args, d) = op.parts();
    let mut rec = v.ctx.begin(OP)?;
    let (a, b, o) = (rec.whole(args.a)?, rec.whole(args.b)?, rec.whole(args.d)?);
    record(
        &mut rec,
        OP,
        (a, args.a.dtype()),
        (b, args.b.dtype()),
        (o, args.d.dtype()),
        (d.m, d.n, d.k),
    )?;
    rec.finish()
}
