//! Multi-head latent attention: `mla_decode` (SPEC §4, split-K flash
//! decoding over the paged latent cache) and `mla_prefill` (SPEC §5, both
//! forms, composed from strided copies, batched GEMMs and the same
//! attention kernels over a one-block "cache").
//!
//! Attention runs in two passes: `shaders/mla_decode.wgsl` computes, per
//! (batch, kv head, tile of 8 query rows, split of the keys), the partial
//! softmax statistics and unnormalized output in f32;
//! `shaders/mla_combine.wgsl` merges the splits (log-sum-exp) and rounds
//! once. The number of splits follows the cache capacity and a target
//! workgroup count, bounded by the scratch size the adapter can bind.

use super::OpTable;
use crate::ctx::{buffer, u32_of, CheckKind, Params, Rec, Shader};
use crate::Wgpu;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

const PASS1: &str = include_str!("../shaders/mla_decode.wgsl");
const COMBINE: &str = include_str!("../shaders/mla_combine.wgsl");
const CHECK: &str = include_str!("../shaders/mla_check.wgsl");
const BMM: &str = include_str!("../shaders/mla_bmm.wgsl");
const COPY: &str = include_str!("../shaders/mla_copy.wgsl");

/// Query rows per workgroup and keys per chunk (`HT`, `T` in the shader).
const HT: usize = 8;
const T: usize = 32;
/// Workgroups pass 1 aims for (splits are added until it is reached).
const TARGET_WORKGROUPS: usize = 1024;
/// Most splits per row (the combine kernel's workgroup table).
const MAX_SPLITS: usize = 256;
/// Scratch budget of the partial outputs, in bytes.
const SCRATCH_BUDGET: u64 = 256 << 20;

pub(crate) fn register(t: &mut OpTable) {
    t.mla_decode = Some(mla_decode);
    t.mla_prefill = Some(mla_prefill);
}

/// A buffer and the dtype of its elements.
type Operand<'b> = (&'b wgpu::Buffer, DType);

/// One attention problem for the two passes.
struct Attn<'b> {
    q: Operand<'b>,
    k: Operand<'b>,
    block_table: &'b wgpu::Buffer,
    seqlens: &'b wgpu::Buffer,
    out: Operand<'b>,
    lse: Option<&'b wgpu::Buffer>,
    batch: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    /// Channels of q·k.
    d: usize,
    /// Channels per (slot, kv head) of the cache.
    kstride: usize,
    /// First V channel of a key row.
    voff: usize,
    dv: usize,
    num_blocks: usize,
    block_size: usize,
    max_blocks: usize,
    scale: f32,
    causal: bool,
}

fn attention(rec: &mut Rec<'_>, op: &'static str, a: &Attn<'_>) -> Result<()> {
    let rows = a.batch * a.s_q * a.h_q;
    if rows == 0 {
        return Ok(());
    }
    // Pass 1: each invocation owns channel pairs 2·lid + 512·j, j < NJ.
    let nj = a.dv.div_ceil(512).max(1);
    if nj > 8 {
        return Err(Error::not_supported(
            crate::ctx::BACKEND,
            op,
            format!("head_dim_v = {} exceeds 4096", a.dv),
        ));
    }
    let capacity = a.max_blocks.saturating_mul(a.block_size);
    u32_of(
        op,
        "max_blocks·block_size",
        capacity.saturating_add(a.block_size),
    )?;
    u32_of(op, "q (elements)", rows.saturating_mul(a.d))?;
    u32_of(
        op,
        "kcache (elements)",
        a.num_blocks
            .saturating_mul(a.block_size)
            .saturating_mul(a.h_kv)
            .saturating_mul(a.kstride),
    )?;
    u32_of(op, "out (elements)", rows.saturating_mul(a.dv))?;
    let grp = a.h_q / a.h_kv;
    let rows_kv = a.s_q * grp;
    let tiles = rows_kv.div_ceil(HT);
    let base_wgs = a.batch * a.h_kv * tiles;

    // Splits: enough workgroups for the device, at most MAX_SPLITS, each a
    // multiple of T keys, and a partial buffer the adapter can bind.
    let chunks = capacity.div_ceil(T).max(1);
    let limit = rec
        .ctx()
        .limits
        .max_storage_buffer_binding_size
        .min(SCRATCH_BUDGET)
        .min(u32::MAX as u64 - 3);
    let per_split = (rows * a.dv * 4) as u64;
    let by_memory = (limit / per_split.max(1)).max(1) as usize;
    let want = TARGET_WORKGROUPS
        .div_ceil(base_wgs.max(1))
        .min(MAX_SPLITS)
        .min(by_memory)
        .min(chunks)
        .max(1);
    let split_len = chunks.div_ceil(want) * T;
    let nsplit = capacity.div_ceil(split_len).max(1);
    let part_bytes = per_split * nsplit as u64;
    if part_bytes > limit {
        return Err(Error::not_supported(
            crate::ctx::BACKEND,
            op,
            format!(
                "the f32 partial outputs ({part_bytes} bytes) exceed this adapter's \
                 storage binding limit ({limit} bytes)"
            ),
        ));
    }
    let total = u32_of(op, "workgroups", base_wgs * nsplit)?;
    let part = rec.scratch(part_bytes)?;
    let stat = rec.scratch((rows * nsplit * 8) as u64)?;

    let sh = Shader::new("mla_decode", PASS1)
        .constant("NJ", format!("{nj}u"))
        .input("q", a.q.1)
        .input("k", a.k.1)
        .input("bt", DType::I32)
        .input("lens", DType::I32)
        .raw("part", true)
        .raw("stat", true);
    let p = Params::new()
        .u32(a.s_q as u32)
        .u32(a.h_q as u32)
        .u32(a.h_kv as u32)
        .u32(grp as u32)
        .u32(a.d as u32)
        .u32(a.kstride as u32)
        .u32(a.voff as u32)
        .u32(a.dv as u32)
        .u32(a.num_blocks as u32)
        .u32(a.block_size as u32)
        .u32(a.max_blocks as u32)
        .u32(capacity as u32)
        .u32(rows_kv as u32)
        .u32(tiles as u32)
        .u32(nsplit as u32)
        .u32(split_len as u32)
        .u32(a.causal as u32)
        .f32(a.scale)
        .u32(total);
    rec.dispatch(
        &sh,
        p,
        &[a.q.0, a.k.0, a.block_table, a.seqlens, &part, &stat],
        total,
    )?;

    let dummy;
    let lse = match a.lse {
        Some(b) => b,
        None => {
            dummy = rec.table(&[0u8; 4])?;
            &dummy
        }
    };
    let sh = Shader::new("mla_combine", COMBINE)
        .raw("part", false)
        .raw("stat", false)
        .atomic_output("out", a.out.1)
        .output("lse", DType::F32);
    let p = Params::new()
        .u32(a.s_q as u32)
        .u32(a.h_q as u32)
        .u32(a.h_kv as u32)
        .u32(grp as u32)
        .u32(a.dv as u32)
        .u32(nsplit as u32)
        .u32(rows as u32)
        .u32(a.lse.is_some() as u32);
    rec.dispatch(&sh, p, &[&part, &stat, a.out.0, lse], rows as u32)
}

fn mla_decode(w: &Wgpu, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    const OP: &str = "mla_decode";
    let (a, d) = op.parts();
    let capacity = d.max_blocks.saturating_mul(d.block_size);
    let mut rec = w.ctx.begin(OP)?;
    rec.check_range(
        "cache_seqlens",
        a.cache_seqlens,
        0,
        capacity as i64 + 1,
        None,
    )?;
    let entries = d.batch * d.max_blocks;
    if entries > 0 {
        let total = u32_of(OP, "block_table (elements)", entries)?;
        u32_of(
            OP,
            "max_blocks·block_size",
            capacity.saturating_add(d.block_size),
        )?;
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
            .u32(capacity as u32)
            .u32(entry);
        rec.dispatch(
            &sh,
            p,
            &[buffer(a.block_table)?, buffer(a.cache_seqlens)?],
            total.div_ceil(256),
        )?;
        rec.capture(entry, a.block_table)?;
    }
    let attn = Attn {
        q: (buffer(a.q)?, a.q.dtype()),
        k: (buffer(a.kcache)?, a.kcache.dtype()),
        block_table: buffer(a.block_table)?,
        seqlens: buffer(a.cache_seqlens)?,
        out: (buffer(a.out)?, a.out.dtype()),
        lse: Some(buffer(a.lse)?),
        batch: d.batch,
        s_q: d.s_q,
        h_q: d.h_q,
        h_kv: d.h_kv,
        d: d.d,
        kstride: d.d,
        voff: 0,
        dv: d.dv,
        num_blocks: d.num_blocks,
        block_size: d.block_size,
        max_blocks: d.max_blocks,
        scale: a.softmax_scale,
        causal: a.causal,
    };
    attention(&mut rec, OP, &attn)?;
    rec.finish()
}

// ---- prefill -------------------------------------------------------------------

/// A strided view for [`bmm`]: `base + z·batch + i·row + l·inner`.
#[derive(Clone, Copy)]
struct View {
    base: usize,
    batch: usize,
    row: usize,
    inner: usize,
}

/// `d[z, i, j] = Σ_l a[z, i, l] · b[z, l, j]` over strided views (for `b`,
/// `row` is the stride of l and `inner` that of j; `d` has unit stride in j).
#[allow(clippy::too_many_arguments)]
fn bmm(
    rec: &mut Rec<'_>,
    op: &'static str,
    a: (Operand<'_>, View),
    b: (Operand<'_>, View),
    d: (Operand<'_>, View),
    (batch, m, n, k): (usize, usize, usize, usize),
) -> Result<()> {
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let tiles_m = m.div_ceil(64);
    let tiles_n = n.div_ceil(64);
    let tiles = u32_of(op, "tiles", batch * tiles_m * tiles_n)?;
    let sh = Shader::new("mla_bmm", BMM)
        .input("a", a.0 .1)
        .input("b", b.0 .1)
        .atomic_output("d", d.0 .1);
    let mut p = Params::new()
        .u32(batch as u32)
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32);
    for v in [
        a.1.base, a.1.batch, a.1.row, a.1.inner, b.1.base, b.1.batch, b.1.row, b.1.inner, d.1.base,
        d.1.batch, d.1.row,
    ] {
        p = p.u32(u32_of(op, "offset", v)?);
    }
    let p = p.u32(tiles_m as u32).u32(tiles_n as u32).u32(tiles);
    rec.dispatch(&sh, p, &[a.0 .0, b.0 .0, d.0 .0], tiles)
}

/// `dst[d0 + i0·ds0 + i1·ds1 + c] = src[s0 + i0·ss0 + i1·ss1 + c]` (f32 dst).
#[allow(clippy::too_many_arguments)]
fn copy(
    rec: &mut Rec<'_>,
    op: &'static str,
    src: Operand<'_>,
    (s0, ss0, ss1): (usize, usize, usize),
    dst: &wgpu::Buffer,
    (d0, ds0, ds1): (usize, usize, usize),
    (n0, n1, cols): (usize, usize, usize),
) -> Result<()> {
    let total = u32_of(op, "copy (elements)", n0 * n1 * cols)?;
    if total == 0 {
        return Ok(());
    }
    let sh = Shader::new("mla_copy", COPY)
        .input("src", src.1)
        .raw("dst", true);
    let mut p = Params::new().u32(n1 as u32).u32(cols as u32).u32(total);
    for v in [s0, ss0, ss1, d0, ds0, ds1] {
        p = p.u32(u32_of(op, "offset", v)?);
    }
    rec.dispatch(&sh, p, &[src.0, dst], total.div_ceil(256))
}

fn f32_scratch(rec: &Rec<'_>, op: &'static str, elems: usize) -> Result<wgpu::Buffer> {
    u32_of(op, "scratch (elements)", elems)?;
    rec.scratch(elems as u64 * 4)
}

fn mla_prefill(w: &Wgpu, op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    const OP: &str = "mla_prefill";
    let (a, dims) = op.parts();
    let MlaPrefillDims {
        t,
        s,
        heads: h,
        dn,
        dr,
        dc,
        dv,
    } = dims.clone();
    let mut rec = w.ctx.begin(OP)?;
    if t == 0 || h == 0 || dv == 0 {
        return rec.finish();
    }
    for (name, n) in [
        ("q_nope", t * h * dn),
        ("q_pe", t * h * dr),
        ("latent", s * dc),
        ("k_pe", s * dr),
        ("wkv_b", h * (dn + dv) * dc),
        ("out", t * h * dv),
    ] {
        u32_of(OP, name, n)?;
    }
    let q_nope = (buffer(a.q_nope)?, a.q_nope.dtype());
    let q_pe = (buffer(a.q_pe)?, a.q_pe.dtype());
    let latent = (buffer(a.latent)?, a.latent.dtype());
    let k_pe = (buffer(a.k_pe)?, a.k_pe.dtype());
    let wkv = (buffer(a.wkv_b)?, a.wkv_b.dtype());
    let out = (buffer(a.out)?, a.out.dtype());
    let wrow = (dn + dv) * dc; // one head of wkv_b
                               // A one-block cache holding all S positions; every query sees it whole
                               // up to its causal limit (query j at position S − T + j).
    let table = rec.table(&0i32.to_le_bytes())?;
    let lens = rec.table(&u32_of(OP, "S", s)?.to_le_bytes())?;
    match a.form {
        MlaForm::Naive => {
            // Keys [S, H, dn + dr + dv] = [W_UK·c ‖ k_pe ‖ W_UV·c] in f32,
            // queries [T, H, dn + dr] = [q_nope ‖ q_pe].
            let kd = dn + dr + dv;
            let keys = f32_scratch(&rec, OP, s * h * kd)?;
            let lat_v = View {
                base: 0,
                batch: 0,
                row: dc,
                inner: 1,
            };
            bmm(
                &mut rec,
                OP,
                (latent, lat_v),
                (
                    wkv,
                    View {
                        base: 0,
                        batch: wrow,
                        row: 1,
                        inner: dc,
                    },
                ),
                (
                    (&keys, DType::F32),
                    View {
                        base: 0,
                        batch: kd,
                        row: h * kd,
                        inner: 1,
                    },
                ),
                (h, s, dn, dc),
            )?;
            bmm(
                &mut rec,
                OP,
                (latent, lat_v),
                (
                    wkv,
                    View {
                        base: dn * dc,
                        batch: wrow,
                        row: 1,
                        inner: dc,
                    },
                ),
                (
                    (&keys, DType::F32),
                    View {
                        base: dn + dr,
                        batch: kd,
                        row: h * kd,
                        inner: 1,
                    },
                ),
                (h, s, dv, dc),
            )?;
            copy(
                &mut rec,
                OP,
                k_pe,
                (0, dr, 0),
                &keys,
                (dn, h * kd, kd),
                (s, h, dr),
            )?;
            let qd = dn + dr;
            let q = f32_scratch(&rec, OP, t * h * qd)?;
            copy(
                &mut rec,
                OP,
                q_nope,
                (0, h * dn, dn),
                &q,
                (0, h * qd, qd),
                (t, h, dn),
            )?;
            copy(
                &mut rec,
                OP,
                q_pe,
                (0, h * dr, dr),
                &q,
                (dn, h * qd, qd),
                (t, h, dr),
            )?;
            let attn = Attn {
                q: (&q, DType::F32),
                k: (&keys, DType::F32),
                block_table: &table,
                seqlens: &lens,
                out,
                lse: None,
                batch: 1,
                s_q: t,
                h_q: h,
                h_kv: h,
                d: qd,
                kstride: kd,
                voff: dn + dr,
                dv,
                num_blocks: 1,
                block_size: s,
                max_blocks: 1,
                scale: a.softmax_scale,
                causal: true,
            };
            attention(&mut rec, OP, &attn)?;
        }
        MlaForm::Absorbed => {
            // Keys [S, 1, dc + dr] = [c ‖ k_pe], queries [T, H, dc + dr] =
            // [q_nope·W_UK ‖ q_pe]; o_lat [T, H, dc]; out = W_UV·o_lat.
            let kd = dc + dr;
            let keys = f32_scratch(&rec, OP, s * kd)?;
            copy(
                &mut rec,
                OP,
                latent,
                (0, dc, 0),
                &keys,
                (0, kd, 0),
                (s, 1, dc),
            )?;
            copy(
                &mut rec,
                OP,
                k_pe,
                (0, dr, 0),
                &keys,
                (dc, kd, 0),
                (s, 1, dr),
            )?;
            let q = f32_scratch(&rec, OP, t * h * kd)?;
            bmm(
                &mut rec,
                OP,
                (
                    q_nope,
                    View {
                        base: 0,
                        batch: dn,
                        row: h * dn,
                        inner: 1,
                    },
                ),
                (
                    wkv,
                    View {
                        base: 0,
                        batch: wrow,
                        row: dc,
                        inner: 1,
                    },
                ),
                (
                    (&q, DType::F32),
                    View {
                        base: 0,
                        batch: kd,
                        row: h * kd,
                        inner: 1,
                    },
                ),
                (h, t, dc, dn),
            )?;
            copy(
                &mut rec,
                OP,
                q_pe,
                (0, h * dr, dr),
                &q,
                (dc, h * kd, kd),
                (t, h, dr),
            )?;
            let o_lat = f32_scratch(&rec, OP, t * h * dc)?;
            let attn = Attn {
                q: (&q, DType::F32),
                k: (&keys, DType::F32),
                block_table: &table,
                seqlens: &lens,
                out: (&o_lat, DType::F32),
                lse: None,
                batch: 1,
                s_q: t,
                h_q: h,
                h_kv: 1,
                d: kd,
                kstride: kd,
                voff: 0,
                dv: dc,
                num_blocks: 1,
                block_size: s,
                max_blocks: 1,
                scale: a.softmax_scale,
                causal: true,
            };
            attention(&mut rec, OP, &attn)?;
            bmm(
                &mut rec,
                OP,
                (
                    (&o_lat, DType::F32),
                    View {
                        base: 0,
                        batch: dc,
                        row: h * dc,
                        inner: 1,
                    },
                ),
                (
                    wkv,
                    View {
                        base: dn * dc,
                        batch: wrow,
                        row: 1,
                        inner: dc,
                    },
                ),
                (
                    out,
                    View {
                        base: 0,
                        batch: dv,
                        row: h * dv,
                        inner: 1,
                    },
                ),
                (h, t, dv, dc),
            )?;
        }
    }
    rec.finish()
}
