//! `sparse_mla_prefill` (spec-v32 §9.7, FlashMLA `flash_mla_sparse_fwd`):
//! MLA prefill over the tokens `indices` selects from a plain
//! `[s_kv, 1, d_qk]` latent KV (`d_qk` 576 or 512, q's dtype), with the
//! optional `topk_length` and attention sink, and the row maxima
//! (`max_logits`). Indices outside `[0, s_kv)` are invalid and skipped,
//! never an error; `topk_length` outside `[0, topk]` is a deferred error.
//! The attention is `sparse_mla_decode`'s kernel ([`super::sparse_mla_decode::attend`])
//! with plain keys: a KV beyond the storage binding limit is bound in
//! windows of tokens.

use super::sparse_mla_decode::{attend, Keys};
use super::OpTable;
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn register(t: &mut OpTable) {
    t.sparse_mla_prefill = Some(sparse_mla_prefill);
}

fn sparse_mla_prefill(w: &Wgpu, op: &mut Checked<SparseMlaPrefill<'_>>) -> Result<()> {
    const OP: &str = "sparse_mla_prefill";
    let (a, d) = op.parts();
    let mut rec = w.ctx.begin(OP)?;
    if let Some(t) = a.topk_length {
        rec.check_range("topk_length", t, 0, d.topk as i64 + 1, None)?;
    }
    attend(
        &mut rec,
        OP,
        Keys::Plain {
            kv: a.kv,
            s_kv: d.s_kv,
            d: d.d_qk,
        },
        a.q,
        a.indices,
        (d.s_q, 1, d.h_q, d.topk),
        a.topk_length,
        a.attn_sink,
        a.out,
        a.lse,
        Some(&*a.max_logits),
        a.softmax_scale,
    )?;
    rec.finish()
}
