//! `sparse_mla_decode` (spec-v32 §9.3): MLA decode over the slots `indices`
//! selects in FlashMLA's 656-byte V3.2 FP8 latent cache, with the optional
//! `topk_length` and attention sink. The deferred checks first:
//! `topk_length` in `[0, topk]` and every used index −1 or inside
//! `[0, num_blocks·block_size)` (`shaders/sparse_check.wgsl`); then the
//! attention kernel shared with `sparse_mla_prefill` ([`attend`],
//! `shaders/sparse_attn.wgsl`: one invocation per head, the selected keys
//! staged once per chunk in workgroup memory for every head of the row, f32
//! online softmax), which never reads a slot outside the cache. A cache
//! beyond the storage binding limit is bound in windows of slots, the
//! softmax state carried between them.

use super::OpTable;
use crate::ctx::{buffer, u32_of, CheckKind, Params, Rec, Shader, Win};
use crate::Wgpu;
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};
use std::sync::Mutex;

const TEMPLATE: &str = include_str!("../shaders/sparse_attn.wgsl");
const CHECK: &str = include_str!("../shaders/sparse_check.wgsl");

/// Keys per chunk (`T` in the shader): `T·D·4` bytes of workgroup memory.
const T: usize = 8;
/// Heads per workgroup (`HT` in the shader).
const HT: usize = 8;
/// Words of carried state per (row, head): o[512], m, l.
const STATE_WORDS: usize = 514;

pub(crate) fn register(t: &mut OpTable) {
    t.sparse_mla_decode = Some(sparse_mla_decode);
}

/// The kernel body for `d` key channels (576 or 512), with or without the
/// `max_logits` store: the template with its per-head and per-channel
/// code written out (named registers, no dynamically indexed arrays).
fn body(d: usize, max_logits: bool) -> &'static str {
    type Bodies = Vec<((usize, bool), &'static str)>;
    static CACHE: Mutex<Bodies> = Mutex::new(Vec::new());
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, b)) = c.iter().find(|(k, _)| *k == (d, max_logits)) {
        return b;
    }
    let b: &'static str = Box::leak(generate(d, max_logits).into_boxed_str());
    c.push(((d, max_logits), b));
    b
}

fn generate(d: usize, max_logits: bool) -> String {
    use std::fmt::Write;
    // Rope vec4s per group: 4 (d = 576) or none.
    let rg = (d - V32_NOPE) / 16;
    let (mut q, mut score) = (String::new(), String::new());
    for i in 0..32 {
        let _ = writeln!(q, "    let q{i} = load_q4(qb + gg * 128u + {}u);", 4 * i);
        let _ = writeln!(score, "        part = part + dot(q{i}, Kf[kb + {i}u]);");
    }
    for i in 0..rg {
        let n = 32 + i;
        let _ = writeln!(
            q,
            "    let q{n} = load_q4(qb + 512u + gg * {}u + {}u);",
            4 * rg,
            4 * i
        );
        let _ = writeln!(score, "        part = part + dot(q{n}, Kf[rb + {i}u]);");
    }
    let xyzw = ["x", "y", "z", "w"];
    let (mut decl, mut load, mut save, mut out, mut pv) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    for h in 0..HT {
        let f = format!("{}.{}", h / 4, xyzw[h % 4]);
        let _ = writeln!(decl, "    var a{h} = vec2<f32>(0.0);");
        let _ = writeln!(load, "        a{h} = get_st2(row, h0 + {h}u, lid);");
        let _ = writeln!(save, "        put_st2(row, h0 + {h}u, lid, a{h});");
        let _ = writeln!(out, "    put_out2(row, h0 + {h}u, lid, a{h} * f{f});");
        let _ = writeln!(pv, "        a{h} = a{h} * al{f};");
    }
    for n in 0..2 * HT {
        let _ = writeln!(pv, "        let pr{n} = Pr[{n}];");
    }
    for t in 0..T {
        let _ = writeln!(pv, "        let k{t} = Kf[{t}u * D4 + lid / 2u];");
        let _ = writeln!(
            pv,
            "        let v{t} = select(k{t}.zw, k{t}.xy, lid % 2u == 0u);"
        );
        for h in 0..HT {
            let _ = writeln!(
                pv,
                "        a{h} = a{h} + pr{}.{} * v{t};",
                2 * h + t / 4,
                xyzw[t % 4]
            );
        }
    }
    let maxl = if max_logits {
        "            stw_maxl(item, bitcast<u32>(mx));\n"
    } else {
        ""
    };
    TEMPLATE
        .replace("{Q}\n", &q)
        .replace("{SCORE}\n", &score)
        .replace("{A_DECL}\n", &decl)
        .replace("{A_LOAD}\n", &load)
        .replace("{A_SAVE}\n", &save)
        .replace("{A_OUT}\n", &out)
        .replace("{PV}\n", &pv)
        .replace("{MAXL}\n", maxl)
}

/// Where the keys of [`attend`] come from.
pub(super) enum Keys<'t> {
    /// FlashMLA's FP8 latent cache: `slots` tokens of 656 bytes.
    Fp8 { cache: &'t Tensor, slots: usize },
    /// A plain `[s_kv, 1, d]` tensor (`d` = 576 or 512).
    Plain {
        kv: &'t Tensor,
        s_kv: usize,
        d: usize,
    },
}

/// The attention of both sparse MLA ops (see `shaders/sparse_attn.wgsl`).
/// `rows` query rows of `h_q` heads, `q` `[rows, h_q, d]`, `indices`
/// `[rows, topk]`, `topk_length` one per `s_q` rows, `lse` at
/// `[rows / s_q, h_q, rows % s_q]`, `max_logits` (prefill) at
/// `[rows, h_q]`. Valid keys: indices inside `[0, key rows)`; the others
/// are skipped (decode reports its errors with its own check kernel).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    rec: &mut Rec<'_>,
    op: &'static str,
    keys: Keys<'_>,
    q: &Tensor,
    indices: &Tensor,
    (rows, s_q, h_q, topk): (usize, usize, usize, usize),
    topk_length: Option<&Tensor>,
    attn_sink: Option<&Tensor>,
    out: &Tensor,
    lse: &Tensor,
    max_logits: Option<&Tensor>,
    scale: f32,
) -> Result<()> {
    let (kv, n_keys, d, row_bytes, kv_dt) = match keys {
        Keys::Fp8 { cache, slots } => (cache, slots, V32_D, V32_TOKEN_BYTES as u64, None),
        Keys::Plain { kv, s_kv, d } => (
            kv,
            s_kv,
            d,
            (d * kv.dtype().size()) as u64,
            Some(kv.dtype()),
        ),
    };
    let tiles = h_q.div_ceil(HT);
    let total = u32_of(op, "workgroups", rows.saturating_mul(tiles))?;
    if total == 0 {
        return Ok(());
    }
    let need = (T * d * 4 + 1400) as u32;
    let have = rec.ctx().limits.max_compute_workgroup_storage_size;
    if need > have {
        return Err(Error::not_supported(
            crate::ctx::BACKEND,
            op,
            format!("the kernel stages {need} bytes of keys in workgroup memory; the adapter allows {have}"),
        ));
    }
    u32_of(
        op,
        "q (elements)",
        rows.saturating_mul(h_q).saturating_mul(d),
    )?;
    u32_of(op, "key rows", n_keys.saturating_add(1))?;
    let dummy = rec.table(&[0u8; 4])?;
    let tl = match topk_length {
        Some(t) => buffer(t)?,
        None => &dummy,
    };
    let sink = match attn_sink {
        Some(t) => buffer(t)?,
        None => &dummy,
    };
    let plan = rec.ctx().plan_rows(op, n_keys.max(1), &[row_bytes])?;
    let st = if plan.len() > 1 {
        let words = rows.saturating_mul(h_q).saturating_mul(STATE_WORDS);
        let bytes = u32_of(op, "softmax state (words)", words)? as u64 * 4;
        if bytes > rec.ctx().max_binding() {
            return Err(Error::not_supported(
                crate::ctx::BACKEND,
                op,
                format!(
                    "the keys exceed the storage binding limit and so does the carried softmax state ({bytes} bytes)"
                ),
            ));
        }
        rec.scratch(bytes)?
    } else {
        // Never read or written, but bound read-write: its own buffer.
        rec.scratch(4)?
    };
    let mut sh = Shader::new(op, body(d, max_logits.is_some()))
        .constant("D", format!("{d}u"))
        .constant("D4", format!("{}u", d / 4))
        .constant("FP8", kv_dt.is_none())
        .constant(
            "KV_DT",
            format!(
                "{}u",
                crate::ctx::shader::dtype_code(kv_dt.unwrap_or(DType::U8))?
            ),
        )
        .input("q", q.dtype())
        .raw("kv", false)
        .input("idx", DType::I32)
        .input("tl", DType::I32)
        .input("sink", DType::F32)
        .raw("st", true)
        .output("out", out.dtype())
        .output("lse", DType::F32);
    if max_logits.is_some() {
        sh = sh.output("maxl", DType::F32);
    }
    let n = plan.len();
    for (i, &(k0, k1)) in plan.iter().enumerate() {
        let p = Params::new()
            .u32(h_q as u32)
            .u32(s_q as u32)
            .u32(topk as u32)
            .u32(tiles as u32)
            .u32(total)
            .u32(topk_length.is_some() as u32)
            .u32(attn_sink.is_some() as u32)
            .u32(k0 as u32)
            // (n_keys = 0 plans one empty window.)
            .u32(k1.min(n_keys) as u32)
            .u32((i == 0) as u32)
            .u32((i + 1 == n) as u32)
            .f32(scale);
        let mut bufs = vec![
            Win::whole(buffer(q)?),
            Win::rows(buffer(kv)?, row_bytes, k0, k1),
            Win::whole(buffer(indices)?),
            Win::whole(tl),
            Win::whole(sink),
            Win::whole(&st),
            Win::whole(buffer(out)?),
            Win::whole(buffer(lse)?),
        ];
        if let Some(m) = max_logits {
            bufs.push(Win::whole(buffer(m)?));
        }
        rec.dispatch_win(&sh, p, &bufs, total)?;
    }
    Ok(())
}

fn sparse_mla_decode(w: &Wgpu, op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
    const OP: &str = "sparse_mla_decode";
    let (a, d) = op.parts();
    let slots = d.num_blocks.saturating_mul(d.block_size);
    let slots32 = u32_of(OP, "num_blocks·block_size", slots)?;
    let rows = d.batch * d.s_q;
    let total_idx = u32_of(OP, "indices (elements)", rows.saturating_mul(d.topk))?;
    let mut rec = w.ctx.begin(OP)?;
    if let Some(t) = a.topk_length {
        rec.check_range("topk_length", t, 0, d.topk as i64 + 1, None)?;
    }
    if total_idx > 0 {
        let dummy = rec.table(&[0u8; 4])?;
        let tl = match a.topk_length {
            Some(t) => buffer(t)?,
            None => &dummy,
        };
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
            .u32(slots32)
            .u32(a.topk_length.is_some() as u32)
            .u32(entry);
        rec.dispatch(&sh, p, &[buffer(a.indices)?, tl], total_idx.div_ceil(256))?;
        rec.capture(entry, a.indices)?;
    }
    attend(
        &mut rec,
        OP,
        Keys::Fp8 {
            cache: a.kcache,
            slots,
        },
        a.q,
        a.indices,
        (rows, d.s_q, d.h_q, d.topk),
        a.topk_length,
        a.attn_sink,
        a.out,
        a.lse,
        None,
        a.softmax_scale,
    )?;
    rec.finish()
}
