//! The grouped plain GEMMs (f32/bf16 operands, f32/bf16/f16 output):
//! `gemm_grouped_contiguous` and `gemm_grouped_masked`.
//!
//! One tiled kernel (`shaders/gemm_grouped.wgsl`, the `gemm` tiles with a
//! group per row) serves both layouts. Index arguments (`m_indices`,
//! `masked_m`) are checked on the device: a bad value is reported as
//! `IndexOutOfRange` at the next download or synchronize; the kernel skips
//! or clamps it and never reads out of bounds. Operands beyond the storage
//! binding limit are processed in windows of whole groups of `b` (masked:
//! with the same groups of `a` and `d`) and, contiguous, of rows of `a` and
//! `d`; the index tensor is bound whole. A window must start at an aligned
//! byte offset ([`crate::ctx::Win::rows`]): a group or row size that
//! cannot be placed so is `NotSupported` (DeepSeek-V3's expert shapes are
//! multiples of 256 bytes).

use super::OpTable;
use crate::ctx::{buffer, u32_of, Params, Rec, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{Result, Tensor};

const WGSL: &str = include_str!("../shaders/gemm_grouped.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.gemm_grouped_contiguous = Some(contiguous);
    t.gemm_grouped_masked = Some(masked);
}

/// Which layout the kernel computes (its `MODE` constant).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Contiguous = 1,
    Masked = 2,
}

/// Records the GEMM over every window.
fn record(
    rec: &mut Rec<'_>,
    op: &'static str,
    (a, b, idx, d): (&Tensor, &Tensor, &Tensor, &Tensor),
    mode: Mode,
    dims: &GemmDims,
) -> Result<()> {
    let GemmDims { groups, m, n, k } = *dims;
    if m == 0 || n == 0 || groups == 0 {
        return Ok(());
    }
    u32_of(op, "rows", m)?;
    u32_of(op, "n", n)?;
    u32_of(op, "k", k)?;
    let sh = Shader::new(op, WGSL)
        .constant("MODE", format!("{}u", mode as u32))
        .input("a", a.dtype())
        .input("b", b.dtype())
        .input("idx", idx.dtype())
        .atomic_output("d", d.dtype());
    let (ab, bb, ib, db) = (buffer(a)?, buffer(b)?, buffer(idx)?, buffer(d)?);
    // Bytes per row of a, b and d.
    let ra = (k * a.dtype().size()) as u64;
    let rb = (k * b.dtype().size()) as u64;
    let rd = (n * d.dtype().size()) as u64;
    let ctx = rec.ctx();
    let tiles_n = n.div_ceil(64);
    let tiles_m = m.div_ceil(64);
    let params = |rows: usize, tiles: usize, g0: usize, g1: usize, r0: usize| -> Result<Params> {
        Ok(Params::new()
            .u32(rows as u32)
            .u32(n as u32)
            .u32(k as u32)
            .u32(rows.div_ceil(64) as u32)
            .u32(tiles_n as u32)
            .u32(u32_of(op, "tiles", tiles)?)
            .u32(g0 as u32)
            .u32(g1 as u32)
            .u32(r0 as u32))
    };
    match mode {
        Mode::Masked => {
            // Whole groups: b [n, k], a [m_max, k], d [m_max, n] each.
            let per = [rb * n as u64, ra * m as u64, rd * m as u64];
            for (g0, g1) in ctx.plan_rows(op, groups, &per)? {
                let tiles = tiles_m * tiles_n * (g1 - g0);
                let p = params(m, tiles, g0, g1, 0)?;
                let wins = [
                    Win::rows(ab, per[1], g0, g1),
                    Win::rows(bb, per[0], g0, g1),
                    Win::whole(ib),
                    Win::rows(db, per[2], g0, g1),
                ];
                rec.dispatch_win(&sh, p, &wins, tiles as u32)?;
            }
        }
        Mode::Contiguous => {
            let group_wins = ctx.plan_rows(op, groups, &[rb * n as u64])?;
            for (m0, m1) in ctx.plan_rows(op, m, &[ra, rd])? {
                let rows = m1 - m0;
                let tiles = rows.div_ceil(64) * tiles_n;
                for &(g0, g1) in &group_wins {
                    let p = params(rows, tiles, g0, g1, m0)?;
                    let wins = [
                        Win::rows(ab, ra, m0, m1),
                        Win::rows(bb, rb * n as u64, g0, g1),
                        Win::whole(ib),
                        Win::rows(db, rd, m0, m1),
                    ];
                    rec.dispatch_win(&sh, p, &wins, tiles as u32)?;
                }
            }
        }
    }
    Ok(())
}

fn contiguous(w: &Wgpu, op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_contiguous";
    let (x, dims) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("m_indices", x.m_indices, 0, dims.groups as i64, Some(-1))?;
    record(
        &mut rec,
        OP,
        (x.a, x.b, x.m_indices, &*x.d),
        Mode::Contiguous,
        dims,
    )?;
    rec.finish()
}

fn masked(w: &Wgpu, op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_masked";
    let (x, dims) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("masked_m", x.masked_m, 0, dims.m as i64 + 1, None)?;
    record(
        &mut rec,
        OP,
        (x.a, x.b, x.masked_m, &*x.d),
        Mode::Masked,
        dims,
    )?;
    rec.finish()
}
