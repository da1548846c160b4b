//! The FP8 block-scaled GEMM family (SPEC §3): `fp8_gemm`,
//! `fp8_grouped_contiguous`, `fp8_grouped_masked`, with e4m3 or e4m3fnuz
//! operands and bf16 or f32 output.
//!
//! One tiled kernel (`shaders/fp8_gemm.wgsl`) serves all three layouts;
//! dense GEMMs with few rows use a GEMV-like kernel
//! (`shaders/fp8_gemv.wgsl`) instead of mostly empty 64-row tiles. Index
//! arguments (`m_indices`, `masked_m`) are checked on the device: a bad value
//! is reported as `IndexOutOfRange` at the next download or synchronize; the
//! kernels clamp or skip it and never read out of bounds.

use super::OpTable;
use crate::ctx::{buffer, u32_of, Params, Rec, Shader};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Result, Tensor};

const TILED: &str = include_str!("../shaders/fp8_gemm.wgsl");
const GEMV: &str = include_str!("../shaders/fp8_gemv.wgsl");

/// Dense GEMMs with at most this many rows use the GEMV kernel.
const GEMV_MAX_M: usize = 8;

pub(crate) fn register(t: &mut OpTable) {
    t.fp8_gemm = Some(fp8_gemm);
    t.fp8_grouped_contiguous = Some(contiguous);
    t.fp8_grouped_masked = Some(masked);
}

/// Which layout the tiled kernel computes (its `MODE` constant).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Dense = 0,
    Contiguous = 1,
    Masked = 2,
}

struct Operands<'t> {
    a: &'t Tensor,
    sa: &'t Tensor,
    b: &'t Tensor,
    sb: &'t Tensor,
    d: &'t Tensor,
}

fn fnuz(t: &Tensor) -> bool {
    t.dtype() == DType::F8E4M3Fnuz
}

/// Records the GEMM; `idx` is `m_indices` / `masked_m` (or a dummy).
fn record(
    rec: &mut Rec<'_>,
    op: &'static str,
    x: &Operands<'_>,
    idx: (&wgpu::Buffer, DType),
    mode: Mode,
    dims: &GemmDims,
) -> Result<()> {
    let GemmDims { groups, m, n, k } = *dims;
    // Rows of the tiled grid per group (masked: m_max; else all rows).
    if m == 0 || n == 0 || groups == 0 {
        return Ok(());
    }
    let rows_total = if mode == Mode::Masked { groups * m } else { m };
    u32_of(op, "a (bytes)", rows_total.saturating_mul(k))?;
    u32_of(op, "b (bytes)", groups.saturating_mul(n).saturating_mul(k))?;
    u32_of(op, "d (elements)", rows_total.saturating_mul(n))?;
    let kb = k.div_ceil(128);
    let nb = n.div_ceil(128);
    let aligned = k % 4 == 0;
    let bufs = [
        buffer(x.a)?,
        buffer(x.sa)?,
        buffer(x.b)?,
        buffer(x.sb)?,
        idx.0,
        buffer(x.d)?,
    ];
    // The bindings (in `bufs` order) and format constants of both kernels.
    let operands = |sh: Shader| {
        sh.constant("FNUZ", fnuz(x.a))
            .constant("K_ALIGNED", aligned)
            .input("a", x.a.dtype())
            .input("sa", DType::F32)
            .input("b", x.b.dtype())
            .input("sb", DType::F32)
            .input("idx", idx.1)
            .atomic_output("d", x.d.dtype())
    };
    // Their parameters begin alike.
    let dims = Params::new()
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32)
        .u32(kb as u32)
        .u32(nb as u32);
    if mode == Mode::Dense && m <= GEMV_MAX_M {
        let wgs = u32_of(op, "workgroups", n.div_ceil(512))?;
        // Rows per pass: 1, 2 or 4.
        let mr = if m >= 4 {
            4
        } else if m >= 2 {
            2
        } else {
            1
        };
        let sh = operands(Shader::new("fp8_gemv", GEMV).constant("MR", format!("{mr}u")));
        let p = dims.u32(wgs);
        return rec.dispatch(&sh, p, &bufs, wgs);
    }
    let tiles_m = m.div_ceil(64);
    let tiles_n = n.div_ceil(64);
    let per_group = tiles_m * tiles_n;
    let tiles = if mode == Mode::Masked {
        per_group * groups
    } else {
        per_group
    };
    let tiles = u32_of(op, "tiles", tiles)?;
    let sh = operands(
        Shader::new("fp8_gemm", TILED).constant("MODE", format!("{}u", mode as u32)),
    );
    let p = dims
        .u32(tiles_m as u32)
        .u32(tiles_n as u32)
        .u32(tiles)
        .u32(groups as u32);
    rec.dispatch(&sh, p, &bufs, tiles)
}

fn fp8_gemm(w: &Wgpu, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    const OP: &str = "fp8_gemm";
    let (a, dims) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    let dummy = rec.table(&[0u8; 4])?;
    let x = Operands {
        a: a.a,
        sa: a.sa,
        b: a.b,
        sb: a.sb,
        d: &*a.d,
    };
    record(&mut rec, OP, &x, (&dummy, DType::I32), Mode::Dense, dims)?;
    rec.finish()
}

fn contiguous(w: &Wgpu, op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let (a, dims) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("m_indices", a.m_indices, 0, dims.groups as i64, Some(-1))?;
    let x = Operands {
        a: a.a,
        sa: a.sa,
        b: a.b,
        sb: a.sb,
        d: &*a.d,
    };
    record(
        &mut rec,
        OP,
        &x,
        (buffer(a.m_indices)?, a.m_indices.dtype()),
        Mode::Contiguous,
        dims,
    )?;
    rec.finish()
}

fn masked(w: &Wgpu, op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let (a, dims) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("masked_m", a.masked_m, 0, dims.m as i64 + 1, None)?;
    let x = Operands {
        a: a.a,
        sa: a.sa,
        b: a.b,
        sb: a.sb,
        d: &*a.d,
    };
    record(
        &mut rec,
        OP,
        &x,
        (buffer(a.masked_m)?, a.masked_m.dtype()),
        Mode::Masked,
        dims,
    )?;
    rec.finish()
}
