//! `indexer_logits` (spec-v32 §9.1): the lightning indexer's logits over
//! the paged FP8 index-k cache. Pass 1 (`indexer_q.wgsl`) decodes q to f32
//! scratch; pass 2 (`indexer_logits.wgsl`) computes every column of every
//! query row (one dispatch per window of cache blocks when the cache exceeds
//! the storage binding limit). `context_lens` and the used block-table entries are checked
//! on the device (deferred errors); the kernels never read outside the
//! cache.

use super::{groups, OpTable};
use crate::ctx::{buffer, u32_of, CheckKind, Params, Shader, Win};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

const QDEC: &str = include_str!("../shaders/indexer_q.wgsl");
const WGSL: &str = include_str!("../shaders/indexer_logits.wgsl");
/// The block-table check of `mla_decode` (the same rule: the first
/// ⌈len/block_size⌉ entries of each row, len clamped into [0, capacity]).
const CHECK: &str = include_str!("../shaders/mla_check.wgsl");

/// Columns per workgroup (`TOK` in the shader).
const TOK: usize = 64;
/// Largest head dim (keys live in registers: `d/4` vec4s).
const MAX_D: usize = 512;

pub(crate) fn register(t: &mut OpTable) {
    t.indexer_logits = Some(indexer_logits);
}

fn indexer_logits(w: &Wgpu, op: &mut Checked<IndexerLogits<'_>>) -> Result<()> {
    const OP: &str = "indexer_logits";
    let (a, d) = op.parts();
    if d.d % 4 != 0 || d.d > MAX_D {
        return Err(Error::not_supported(
            crate::ctx::BACKEND,
            OP,
            format!("head dim d = {} (the kernel takes multiples of 4 up to {MAX_D})", d.d),
        ));
    }
    let cap = (d.max_blocks.saturating_mul(d.block_size)).min(d.max_len);
    u32_of(OP, "cap + block_size", cap.saturating_add(d.block_size).saturating_add(1))?;
    u32_of(
        OP,
        "kv_cache (bytes)",
        d.num_blocks
            .saturating_mul(d.block_size)
            .saturating_mul(d.d + 4),
    )?;
    let rows = d.batch * d.next_n;
    let nq = u32_of(
        OP,
        "q (elements)",
        rows.saturating_mul(d.heads).saturating_mul(d.d),
    )?;
    u32_of(OP, "logits (elements)", rows.saturating_mul(d.max_len))?;
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range("context_lens", a.context_lens, 0, cap as i64 + 1, None)?;
    let entries = d.batch * d.max_blocks;
    if entries > 0 {
        let total = u32_of(OP, "block_table (elements)", entries)?;
        let entry = rec.flag_entry(
            "block_table",
            a.block_table.shape(),
            CheckKind::Range {
                lo: 0,
                hi: d.num_blocks as i64,
                allow: None,
            },
        )?;
        let sh = Shader::new("mla_check", CHECK)
            .input("bt", DType::I32)
            .input("lens", DType::I32)
            .status();
        let p = Params::new()
            .u32(total)
            .u32(d.max_blocks as u32)
            .u32(d.block_size as u32)
            .u32(u32_of(OP, "num_blocks", d.num_blocks)?)
            .u32(cap as u32)
            .u32(entry);
        rec.dispatch(
            &sh,
            p,
            &[buffer(a.block_table)?, buffer(a.context_lens)?],
            total.div_ceil(256),
        )?;
        rec.capture(entry, a.block_table)?;
    }
    let tiles = d.max_len.div_ceil(TOK);
    let total = u32_of(OP, "workgroups", d.batch.saturating_mul(tiles))?;
    if total > 0 && rows > 0 {
        let qf = rec.scratch((nq as u64 * 4).max(4))?;
        if nq > 0 {
            let sh = Shader::new("indexer_q", QDEC)
                .input("q", DType::F8E4M3)
                .raw("qf", true);
            rec.dispatch(&sh, Params::new().u32(nq), &[buffer(a.q)?, &qf], groups(nq, 256))?;
        }
        let sh = Shader::new(OP, WGSL)
            .workgroup_size(TOK as u32)
            .constant("D4", format!("{}u", d.d / 4))
            .raw("qf", false)
            .input("w", DType::F32)
            .raw("kv", false)
            .input("lens", DType::I32)
            .input("bt", DType::I32)
            .output("logits", DType::F32);
        let block_bytes = (d.block_size * (d.d + 4)) as u64;
        let plan = w.ctx.plan_rows(OP, d.num_blocks.max(1), &[block_bytes])?;
        for (i, &(b0, b1)) in plan.iter().enumerate() {
            let p = Params::new()
                .u32(d.next_n as u32)
                .u32(d.heads as u32)
                .u32(d.num_blocks as u32)
                .u32(d.block_size as u32)
                .u32(d.max_blocks as u32)
                .u32(d.max_len as u32)
                .u32(cap as u32)
                .u32(tiles as u32)
                .u32(total)
                .u32(b0 as u32)
                .u32(b1 as u32)
                .u32((i == 0) as u32);
            rec.dispatch_win(
                &sh,
                p,
                &[
                    Win::whole(&qf),
                    Win::whole(buffer(a.weights)?),
                    Win::rows(buffer(a.kv_cache)?, block_bytes, b0, b1),
                    Win::whole(buffer(a.context_lens)?),
                    Win::whole(buffer(a.block_table)?),
                    Win::whole(buffer(a.logits)?),
                ],
                total,
            )?;
        }
    }
    rec.finish()
}
