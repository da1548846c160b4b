//! `copy_window`: split, concat, cast and cache writes in one kernel. Large
//! tensors are bound as windows around ranges of window rows.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{Error, Result};

const WGSL: &str = include_str!("../shaders/copy_window.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.copy_window = Some(copy_window);
}

fn copy_window(w: &Wgpu, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    const OP: &str = "copy_window";
    let (a, d) = op.parts();
    let (rows, cols) = a.size;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Every element index must fit in 32 bits.
    u32_of(OP, "dst numel", d.dst.0.saturating_mul(d.dst.1))?;
    u32_of(OP, "src numel", d.src.0.saturating_mul(d.src.1))?;
    let (es, ed) = (a.src.dtype().size(), a.dst.dtype().size());
    let per = 4 / ed;
    let wpr = cols.div_ceil(per) + 1;
    u32_of(OP, "window words", rows.saturating_mul(wpr))?;
    // Window rows per dispatch: whole src and dst rows plus the alignment
    // slack of each binding must fit the limit.
    let align = w.ctx.binding_align() as usize;
    let max_rb = (d.src.1 * es).max(d.dst.1 * ed);
    let usable = (w.ctx.max_binding() as usize).saturating_sub(align + 8);
    let per_chunk = usable / max_rb.max(1);
    if per_chunk == 0 {
        return Err(Error::not_supported(
            "wgpu",
            OP,
            format!(
                "a row of {max_rb} bytes does not fit this adapter's storage binding limit of {} bytes",
                w.ctx.max_binding()
            ),
        ));
    }
    let (sr, sc) = a.src_origin;
    let (dr, dc) = a.dst_origin;
    let mut rec = w.ctx.begin(OP)?;
    let sh = Shader::new(OP, WGSL)
        .input("src", a.src.dtype())
        .output("dst", a.dst.dtype());
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + per_chunk).min(rows);
        let n = r1 - r0;
        let (sw, s_base) = Win::elems(
            buffer(a.src)?,
            es as u64,
            (sr + r0) * d.src.1 + sc,
            (sr + r1 - 1) * d.src.1 + sc + cols,
            align as u64,
        );
        let (dw, d_base) = Win::elems(
            buffer(a.dst)?,
            ed as u64,
            (dr + r0) * d.dst.1 + dc,
            (dr + r1 - 1) * d.dst.1 + dc + cols,
            align as u64,
        );
        let p = Params::new()
            .u32(n as u32)
            .u32(cols as u32)
            .u32(d.src.1 as u32)
            .u32(d.dst.1 as u32)
            .u32((sr + r0) as u32)
            .u32(sc as u32)
            .u32((dr + r0) as u32)
            .u32(dc as u32)
            .u32(wpr as u32)
            .u32(s_base as u32)
            .u32((d_base / per) as u32);
        rec.dispatch_win(&sh, p, &[sw, dw], groups((n * wpr) as u32, 256))?;
        r0 = r1;
    }
    rec.finish()
}
