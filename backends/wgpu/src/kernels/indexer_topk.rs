//! `indexer_topk` (spec-v32 §9.2): per row a radix select of the k-th
//! largest (logit, position) key in workgroup memory, the selected keys
//! compacted into scratch and sorted by a bitonic sort
//! (`shaders/indexer_topk.wgsl`), so the slots hold the positions by
//! descending logit (ties: lower position first; NaN last) and −1 after
//! `min(topk, length)`. `lengths` outside `[0, n]` is a deferred error.

use super::OpTable;
use crate::ctx::{buffer, u32_of, Params, Shader};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

const WGSL: &str = include_str!("../shaders/indexer_topk.wgsl");

pub(crate) fn register(t: &mut OpTable) {
    t.indexer_topk = Some(indexer_topk);
}

fn indexer_topk(w: &Wgpu, op: &mut Checked<IndexerTopk<'_>>) -> Result<()> {
    const OP: &str = "indexer_topk";
    let (a, d) = op.parts();
    let rows = u32_of(OP, "rows", d.rows)?;
    u32_of(OP, "logits (elements)", d.rows.saturating_mul(d.n))?;
    u32_of(OP, "indices (elements)", d.rows.saturating_mul(d.topk))?;
    // n + 1 positions (and their complements) fit the 32-bit key half.
    u32_of(OP, "n", d.n.saturating_add(1))?;
    let kpad = d.topk.min(d.n).max(1).next_power_of_two();
    let scratch = (d.rows as u64)
        .saturating_mul(kpad as u64)
        .saturating_mul(8);
    u32_of(OP, "scratch (words)", (scratch / 4) as usize)?;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("lengths", a.lengths, 0, d.n as i64 + 1, None)?;
    if rows > 0 {
        let sk = rec.scratch(scratch.max(8))?;
        let sh = Shader::new(OP, WGSL)
            .input("logits", DType::F32)
            .input("lens", DType::I32)
            .raw("sk", true)
            .output("out", DType::I32);
        let p = Params::new()
            .u32(rows)
            .u32(d.n as u32)
            .u32(d.topk as u32)
            .u32(kpad as u32);
        rec.dispatch(
            &sh,
            p,
            &[
                buffer(a.logits)?,
                buffer(a.lengths)?,
                &sk,
                buffer(a.indices)?,
            ],
            rows,
        )?;
    }
    rec.finish()
}
