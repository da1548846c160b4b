//! `sparse_mla_decode` (spec-v32 §9.3): MLA decode over the slots `indices`
//! selects in FlashMLA's 656-byte V3.2 FP8 latent cache, with the optional
//! `topk_length` and attention sink. One kernel
//! (`shaders/sparse_mla_decode.wgsl`, the cache read as u32 words, f32
//! online softmax) after the deferred checks: `topk_length` in `[0, topk]`
//! and every used index −1 or inside `[0, num_blocks·block_size)`
//! (`shaders/sparse_check.wgsl`); the kernel never reads a slot outside the
//! cache.

use super::OpTable;
use crate::ctx::{buffer, u32_of, CheckKind, Params, Shader};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

const WGSL: &str = include_str!("../shaders/sparse_mla_decode.wgsl");
const CHECK: &str = include_str!("../shaders/sparse_check.wgsl");

/// Heads per workgroup (`HT` in the shader).
const HT: usize = 8;

pub(crate) fn register(t: &mut OpTable) {
    t.sparse_mla_decode = Some(sparse_mla_decode);
}

fn sparse_mla_decode(w: &Wgpu, op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
    const OP: &str = "sparse_mla_decode";
    let (a, d) = op.parts();
    let slots = d.num_blocks.saturating_mul(d.block_size);
    u32_of(
        OP,
        "kcache (words)",
        slots.saturating_mul(V32_TOKEN_BYTES / 4),
    )?;
    let slots = u32_of(OP, "num_blocks·block_size", slots)?;
    let rows = d.batch * d.s_q;
    let total_idx = u32_of(OP, "indices (elements)", rows.saturating_mul(d.topk))?;
    u32_of(
        OP,
        "q (elements)",
        rows.saturating_mul(d.h_q).saturating_mul(V32_D),
    )?;
    let mut rec = w.ctx.begin(OP)?;
    if let Some(t) = a.topk_length {
        rec.check_range("topk_length", t, 0, d.topk as i64 + 1, None)?;
    }
    // A placeholder for an absent optional input (never read).
    let dummy = rec.table(&[0u8; 4])?;
    let tl = match a.topk_length {
        Some(t) => buffer(t)?,
        None => &dummy,
    };
    let sink = match a.attn_sink {
        Some(t) => buffer(t)?,
        None => &dummy,
    };
    if total_idx > 0 {
        let entry = rec.flag_entry(
            "indices",
            a.indices.shape(),
            CheckKind::Range {
                lo: 0,
                hi: slots as i64,
                allow: Some(-1),
            },
        )?;
        let sh = Shader::new("sparse_check", CHECK)
            .input("idx", DType::I32)
            .input("tl", DType::I32)
            .status();
        let p = Params::new()
            .u32(total_idx)
            .u32(d.topk as u32)
            .u32(d.s_q as u32)
            .u32(slots)
            .u32(a.topk_length.is_some() as u32)
            .u32(entry);
        rec.dispatch(
            &sh,
            p,
            &[buffer(a.indices)?, tl],
            total_idx.div_ceil(256),
        )?;
        rec.capture(entry, a.indices)?;
    }
    let tiles = d.h_q.div_ceil(HT);
    let total = u32_of(OP, "workgroups", rows.saturating_mul(tiles))?;
    if total > 0 {
        let sh = Shader::new(OP, WGSL)
            .input("q", a.q.dtype())
            .raw("kc", false)
            .input("idx", DType::I32)
            .input("tl", DType::I32)
            .input("sink", DType::F32)
            .output("out", a.out.dtype())
            .output("lse", DType::F32);
        let p = Params::new()
            .u32(d.s_q as u32)
            .u32(d.h_q as u32)
            .u32(d.topk as u32)
            .u32(slots)
            .u32(tiles as u32)
            .u32(total)
            .u32(a.topk_length.is_some() as u32)
            .u32(a.attn_sink.is_some() as u32)
            .f32(a.softmax_scale);
        rec.dispatch(
            &sh,
            p,
            &[
                buffer(a.q)?,
                buffer(a.kcache)?,
                buffer(a.indices)?,
                tl,
                sink,
                buffer(a.out)?,
                buffer(a.lse)?,
            ],
            total,
        )?;
    }
    rec.finish()
}
