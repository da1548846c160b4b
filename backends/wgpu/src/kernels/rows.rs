//! `gather_rows` and `reduce_rows`: the device kernels of core's
//! expert-parallel protocol (`deepport_core::ep` packs, places and combines
//! with them, so this backend gets every expert-parallel op from core).
//!
//! Both take `src` as a view at any element offset (core's combines hand
//! over views of their input): the binding starts at the aligned offset at
//! or below the view's data and the kernel skips the difference.
//!
//! Limits: `dst`/`out` are processed in ranges of rows from
//! `Ctx::plan_rows`, and `src` is bound in windows of rows when it exceeds
//! the storage binding limit: `gather_rows` merges each window's rows into
//! what earlier windows wrote; `reduce_rows` then sums into an f32
//! accumulator one top-k entry at a time (j ascending, every window for
//! each j), so each element still sums in j order and rounds once: the
//! result is the same as without windows. Only a row too large for one
//! binding is `NotSupported`.

use super::{groups, OpTable};
use crate::ctx::{buffer, padded, u32_of, view_buffer, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

const GATHER_WGSL: &str = include_str!("../shaders/gather_rows.wgsl");
const REDUCE_WGSL: &str = include_str!("../shaders/reduce_rows.wgsl");
const REDUCE_ACC_WGSL: &str = include_str!("../shaders/reduce_rows_acc.wgsl");
const REDUCE_OUT_WGSL: &str = include_str!("../shaders/reduce_rows_out.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.gather_rows = Some(gather_rows);
    t.reduce_rows = Some(reduce_rows);
}

/// The binding of bytes `[b0, b1)` of `t`'s data (a view's offset added),
/// from the aligned offset at or below; also returns where `b0` lies in it.
/// `b1 > b0`.
fn data_window<'b>(w: &Wgpu, t: &'b Tensor, b0: u64, b1: u64) -> Result<(Win<'b>, u64)> {
    let (buf, off) = view_buffer(t)?;
    let align = w.ctx.binding_align();
    let start = off + b0;
    let offset = (start / align * align).min(buf.size());
    let end = padded(off + b1).min(buf.size()).max(offset);
    Ok((
        Win {
            buf,
            offset,
            size: end - offset,
        },
        start - offset,
    ))
}

/// Windows of `rows` source rows of `row_bytes` bytes, each of which fits
/// one binding whatever its alignment slack; `[(0, 0)]` when there are no
/// rows.
fn src_windows(w: &Wgpu, op: &str, rows: usize, row_bytes: u64) -> Result<Vec<(usize, usize)>> {
    if rows == 0 {
        return Ok(vec![(0, 0)]);
    }
    let usable = w
        .ctx
        .max_binding()
        .saturating_sub(w.ctx.binding_align() + 8);
    let per = (usable / row_bytes.max(1)) as usize;
    if per == 0 {
        return Err(Error::not_supported(
            "wgpu",
            op.to_string(),
            format!(
                "a row of {row_bytes} bytes does not fit this adapter's storage binding limit of {} bytes",
                w.ctx.max_binding()
            ),
        ));
    }
    Ok((0..rows.div_ceil(per))
        .map(|c| (c * per, ((c + 1) * per).min(rows)))
        .collect())
}

fn gather_rows(w: &Wgpu, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    const OP: &str = "gather_rows";
    let (a, d) = op.parts();
    let rb = d.row * a.src.dtype().size();
    u32_of(OP, "index entries", d.rows)?;
    u32_of(OP, "src rows", d.src_rows)?;
    u32_of(OP, "row bytes", rb)?;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("index", a.index, 0, d.src_rows as i64, Some(-1))?;
    if d.rows > 0 && rb > 0 {
        let ei = a.index.dtype().size() as u64;
        let sh = Shader::new(OP, GATHER_WGSL)
            .raw("src", false)
            .input("index", a.index.dtype())
            .raw("dst", true);
        let rb64 = rb as u64;
        let dst_plan = w.ctx.plan_rows(OP, d.rows, &[rb64, ei])?;
        let srcs = src_windows(w, OP, d.src_rows, rb64)?;
        for &(t0, t1) in &dst_plan {
            let total_bytes = u32_of(OP, "dst bytes", (t1 - t0) * rb)?;
            let words = total_bytes.div_ceil(4);
            for (i, &(v0, v1)) in srcs.iter().enumerate() {
                let (src, sub) = if v1 > v0 {
                    data_window(w, a.src, v0 as u64 * rb64, v1 as u64 * rb64)?
                } else {
                    (Win::whole(view_buffer(a.src)?.0), 0)
                };
                let p = Params::new()
                    .u32(words)
                    .u32(total_bytes)
                    .u32(rb as u32)
                    .u32(sub as u32)
                    .u32(v0 as u32)
                    .u32((v1 - v0) as u32)
                    .u32((i > 0) as u32);
                rec.dispatch_win(
                    &sh,
                    p,
                    &[
                        src,
                        Win::rows(buffer(a.index)?, ei, t0, t1),
                        Win::rows(buffer(a.dst)?, rb64, t0, t1),
                    ],
                    groups(words, 256),
                )?;
            }
        }
    }
    rec.finish()
}

fn reduce_rows(w: &Wgpu, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    const OP: &str = "reduce_rows";
    let (a, d) = op.parts();
    let (n, k, h, s) = (d.tokens, d.k, d.hidden, d.src_rows);
    u32_of(OP, "index entries", n.saturating_mul(k))?;
    u32_of(OP, "src elements", s.saturating_mul(h))?;
    u32_of(OP, "out elements", n.saturating_mul(h))?;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("index", a.index, 0, s as i64, Some(-1))?;
    if n > 0 && h > 0 {
        let es = a.src.dtype().size() as u64;
        let eo = a.out.dtype().size() as u64;
        let ei = a.index.dtype().size() as u64;
        let (kb, wb) = (k as u64 * ei, k as u64 * 4);
        let srcs = src_windows(w, OP, s, h as u64 * es)?;
        // A window of src rows: its binding and the element its first row
        // starts at (the window starts at a multiple of 4 bytes and the data
        // at a multiple of the element size: `sub` is whole elements).
        let src_win = |(v0, v1): (usize, usize)| -> Result<(Win<'_>, u32)> {
            if v1 == v0 {
                return Ok((Win::whole(view_buffer(a.src)?.0), 0));
            }
            let rb = h as u64 * es;
            let (win, sub) = data_window(w, a.src, v0 as u64 * rb, v1 as u64 * rb)?;
            Ok((win, u32_of(OP, "src offset", (sub / es) as usize)?))
        };
        let windowed = srcs.len() > 1 && k > 0;
        let mut row_bytes = vec![h as u64 * eo, kb, wb];
        if windowed {
            row_bytes.push(h as u64 * 4);
        }
        let plan = w.ctx.plan_rows(OP, n, &row_bytes)?;
        let per = (4 / eo) as u32;
        for (t0, t1) in plan {
            let total = ((t1 - t0) * h) as u32;
            let index = Win::rows(buffer(a.index)?, kb, t0, t1);
            // Without weights the binding is a placeholder (never read).
            let weights = match a.weights {
                Some(wt) => Win::rows(buffer(wt)?, wb, t0, t1),
                None => index,
            };
            let out = Win::rows(buffer(a.out)?, h as u64 * eo, t0, t1);
            if !windowed {
                let sh = Shader::new(OP, REDUCE_WGSL)
                    .constant("WEIGHTED", a.weights.is_some())
                    .input("src", a.src.dtype())
                    .input("index", a.index.dtype())
                    .input("weights", DType::F32)
                    .output("out", a.out.dtype())
                    .per_word("out", "P.total");
                let (src, sub) = src_win(srcs[0])?;
                let p = Params::new()
                    .u32(total)
                    .u32(h as u32)
                    .u32(k as u32)
                    .u32(s as u32)
                    .u32(sub);
                rec.dispatch_win(
                    &sh,
                    p,
                    &[src, index, weights, out],
                    groups(total.div_ceil(per), 256),
                )?;
                continue;
            }
            let acc = rec.scratch(total as u64 * 4)?;
            let sh = Shader::new("reduce_rows_acc", REDUCE_ACC_WGSL)
                .constant("WEIGHTED", a.weights.is_some())
                .input("src", a.src.dtype())
                .input("index", a.index.dtype())
                .input("weights", DType::F32)
                .raw("acc", true);
            for j in 0..k {
                for (i, &(v0, v1)) in srcs.iter().enumerate() {
                    let (src, sub) = src_win((v0, v1))?;
                    let p = Params::new()
                        .u32(total)
                        .u32(h as u32)
                        .u32(k as u32)
                        .u32(j as u32)
                        .u32(v0 as u32)
                        .u32((v1 - v0) as u32)
                        .u32(sub)
                        .u32((j == 0 && i == 0) as u32);
                    rec.dispatch_win(
                        &sh,
                        p,
                        &[src, index, weights, Win::whole(&acc)],
                        groups(total, 256),
                    )?;
                }
            }
            let sh = Shader::new("reduce_rows_out", REDUCE_OUT_WGSL)
                .raw("acc", false)
                .output("out", a.out.dtype())
                .per_word("out", "P.total");
            rec.dispatch_win(
                &sh,
                Params::new().u32(total),
                &[Win::whole(&acc), out],
                groups(total.div_ceil(per), 256),
            )?;
        }
    }
    rec.finish()
}
