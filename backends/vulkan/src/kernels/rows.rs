//! `gather_rows` and `reduce_rows`: the device kernels of core's
//! expert-parallel protocol. `src` and `index` may be views at any offset
//! (core's combines hand over views): the binding starts at the aligned
//! offset at or below the data and the kernel skips the difference.

use super::{dt, groups, OpTable};
use crate::ctx::{u32_of, Push};
use crate::Vulkan;
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn register(t: &mut OpTable) {
    t.gather_rows = Some(gather_rows);
    t.reduce_rows = Some(reduce_rows);
}

fn gather_rows(v: &Vulkan, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    const OP: &str = "gather_rows";
    let (a, d) = op.parts();
    let rb = d.row * a.src.dtype().size();
    u32_of(OP, "index entries", d.rows)?;
    let src_rows = u32_of(OP, "src rows", d.src_rows)?;
    let rb32 = u32_of(OP, "row bytes", rb)?;
    let total_bytes = u32_of(OP, "dst bytes", d.rows * rb)?;
    let code = dt(a.index.dtype())?;
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("index", a.index, 0, d.src_rows as i64, Some(-1))?;
    if d.rows > 0 && rb > 0 {
        let (src, src_sub) = rec.bind(a.src)?;
        let (idx, idx_sub) = rec.bind(a.index)?;
        let (dst, dst_sub) = rec.bind(a.dst)?;
        let words = ((dst_sub + total_bytes as u64).div_ceil(4) - dst_sub / 4) as u32;
        let p = Push::new()
            .u32(words)
            .u32(total_bytes)
            .u32(rb32)
            .u32(src_sub as u32)
            .u32(src_rows)
            .u32(dst_sub as u32)
            .u32(idx_sub as u32);
        rec.dispatch("gather_rows", &[code], &[src, idx, dst], &p, groups(words))?;
    }
    rec.finish()
}

fn reduce_rows(v: &Vulkan, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    const OP: &str = "reduce_rows";
    let (a, d) = op.parts();
    let (n, k, h, s) = (d.tokens, d.k, d.hidden, d.src_rows);
    u32_of(OP, "index entries", n.saturating_mul(k))?;
    u32_of(OP, "src elements", s.saturating_mul(h))?;
    let total = u32_of(OP, "out elements", n.saturating_mul(h))?;
    let spec = [
        dt(a.src.dtype())?,
        dt(a.index.dtype())?,
        dt(a.out.dtype())?,
        a.weights.is_some() as u32,
    ];
    let mut rec = v.ctx.begin(OP)?;
    rec.check_range("index", a.index, 0, s as i64, Some(-1))?;
    if total > 0 {
        let elems = |t: &deepport_core::backend::Tensor, sub: u64| (sub / t.dtype().size() as u64) as u32;
        let (src, src_sub) = rec.bind(a.src)?;
        let (idx, idx_sub) = rec.bind(a.index)?;
        // Without weights the binding is a placeholder (never read).
        let (wts, w_sub) = match a.weights {
            Some(w) => {
                let (b, sub) = rec.bind(w)?;
                (b, elems(w, sub))
            }
            None => (idx, 0),
        };
        let out = rec.whole(a.out)?;
        let per = (4 / a.out.dtype().size()) as u32;
        let p = Push::new()
            .u32(total)
            .u32(h as u32)
            .u32(k as u32)
            .u32(s as u32)
            .u32(elems(a.src, src_sub))
            .u32(elems(a.index, idx_sub))
            .u32(w_sub);
        rec.dispatch("reduce_rows", &spec, &[src, idx, wts, out], &p, groups(total.div_ceil(per)))?;
    }
    rec.finish()
}
