//! Attention: MLA decode over the paged latent cache, MLA prefill, RoPE.
//!
//! * `mla_decode`: `mla_metadata` (checks `cache_seqlens` and the used
//!   block-table entries, writes the split plan of [`crate::schedule::mla`]
//!   on the device), then the split kernel — `mla_decode_sm90` (wgmma) on
//!   Hopper for bf16 DeepSeek shapes, else the device's own split kernel
//!   if its `LaunchContext::mla_split_kernel` offers one (ROCm's MFMA
//!   kernel), else the portable `mla_decode_split` — then `mla_combine`
//!   (fixed slot order).
//! * `mla_prefill`: strided batched matmuls (`mla_bmm`) and a causal
//!   attention kernel with a two-part key (`mla_prefill_attn`); naive and
//!   absorbed forms as SPEC §5 writes them.
//! * `rope`: one kernel; the YaRN ramp bounds are computed here in f64.

use crate::launch::{
    Arg, CheckKind, Grid, Kernel, KernelSource, LaunchContext, MlaSplitKernel, Target,
};
use crate::schedule::mla::{decode_geometry, DecodeGeometry, MetaLayout, OVERHEAD_BLOCKS};
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

pub(crate) static MLA_CU: KernelSource = KernelSource {
    name: "mla.cu",
    text: include_str!("../../kernels/mla.cu"),
    target: Target::Portable,
    entries: &[
        "mla_metadata",
        "mla_decode_split",
        "mla_combine",
        "mla_bmm",
        "mla_prefill_attn",
    ],
};

pub(crate) static MLA_SM90_CU: KernelSource = KernelSource {
    name: "mla_sm90.cu",
    text: include_str!("../../kernels/mla_sm90.cu"),
    target: Target::Sm90a,
    entries: &["mla_decode_sm90"],
};

pub(crate) static ROPE_CU: KernelSource = KernelSource {
    name: "rope.cu",
    text: include_str!("../../kernels/rope.cu"),
    target: Target::Portable,
    entries: &["rope_kernel"],
};

/// This family's kernel sources.
pub(crate) static SOURCES: &[&KernelSource] = &[&MLA_CU, &MLA_SM90_CU, &ROPE_CU];

fn kernel(source: &'static KernelSource, entry: &'static str) -> Kernel {
    Kernel { source, entry }
}

/// `port.cuh`'s dtype codes.
fn dtype_code(op: &'static str, dt: DType) -> Result<i32> {
    match dt {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(Error::not_supported(
            "cuda",
            op,
            format!("dtype {other} in an attention kernel"),
        )),
    }
}

/// A size as a kernel's `int`, or an error naming the quantity.
fn i32_of(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::not_supported(
            "cuda",
            op,
            format!("{what} = {v} exceeds the kernels' 32-bit range"),
        )
    })
}

/// Threads of the portable kernels' CTAs, and warps of 32 in them (the
/// NVIDIA warp; `port.cuh`'s DP_WARP under CUDA).
const BLOCK: u32 = 256;
const WARP: u32 = 32;
const WARPS: u32 = BLOCK / WARP;
/// Keys staged per step of `mla_decode_split` (`MLA_CH` in mla.cu).
const DECODE_CH: usize = 8;
/// Largest head dim the register-resident kernels take (`MLA_MAXC·DP_WARP`).
const MAX_HEAD_DIM: usize = 1024;
/// Static shared memory every device offers without opt-in.
const SMEM_DEFAULT: usize = 48 * 1024;

/// The wgmma path: tile rows and shared memory (`mla_sm90.cu`).
const SM90_TILE_ROWS: u32 = 64;
const SM90_THREADS: u32 = 256;
/// Q tile 64×576 bf16 and one K block 64×576 bf16 (P stays in registers).
pub(crate) const SM90_SMEM: u32 = 64 * 576 * 2 * 2;

/// Whether `mla_decode` takes the Hopper wgmma kernel: bf16, DeepSeek's
/// head dims (576/512), pages of 64 tokens, and query heads per kv head a
/// multiple of 64 (so every 64-row tile is one `s` and 64 heads), `q`
/// and `kcache` 16-byte aligned (the kernel copies 16 bytes at a time).
pub(crate) fn use_sm90(
    cx: &dyn LaunchContext,
    dt: DType,
    d: &MlaDecodeDims,
    q: u64,
    kcache: u64,
) -> bool {
    let arch = cx.arch();
    arch.is_hopper()
        && q.is_multiple_of(16)
        && kcache.is_multiple_of(16)
        && arch.smem_optin >= SM90_SMEM
        && dt == DType::BF16
        && d.d == 576
        && d.dv == 512
        && d.block_size == 64
        && (d.h_q / d.h_kv).is_multiple_of(64)
}

/// `mla_decode` (SPEC.md §4).
pub fn mla_decode(cx: &dyn LaunchContext, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    const OP: &str = "mla_decode";
    let (a, dims) = op.parts();
    let d = dims.clone();
    let dt = a.q.dtype();
    let code = dtype_code(OP, dt)?;
    let out_code = dtype_code(OP, a.out.dtype())?;
    if d.batch == 0 {
        return Ok(());
    }
    let q = cx.ptr(a.q)?;
    let kc = cx.ptr(a.kcache)?;
    // The split kernel: Hopper's wgmma one, else the device's own (ROCm's
    // MFMA kernel), else the portable `mla_decode_split`.
    let special = if use_sm90(cx, dt, &d, q, kc) {
        Some(MlaSplitKernel {
            kernel: kernel(&MLA_SM90_CU, "mla_decode_sm90"),
            tile_rows: SM90_TILE_ROWS,
            threads: SM90_THREADS,
            smem: SM90_SMEM,
        })
    } else {
        cx.mla_split_kernel(dt, &d, q, kc)
    };
    if special.is_none() && d.d > MAX_HEAD_DIM {
        return Err(Error::not_supported(
            "cuda",
            OP,
            format!("head dim {} > {MAX_HEAD_DIM}", d.d),
        ));
    }
    let tile_rows = special.map_or(WARPS, |k| k.tile_rows);
    let g: DecodeGeometry =
        decode_geometry(cx.arch().sms, d.batch, d.s_q, d.h_q, d.h_kv, tile_rows).ok_or_else(
            || {
                Error::not_supported(
                    "cuda",
                    OP,
                    format!(
                        "batch {} × s_q {} × h_q {} exceeds the launch limits",
                        d.batch, d.s_q, d.h_q
                    ),
                )
            },
        )?;
    let capacity = d.max_blocks.saturating_mul(d.block_size);
    let (batch, s_q, h_q, h_kv) = (
        i32_of(OP, "batch", d.batch)?,
        i32_of(OP, "s_q", d.s_q)?,
        i32_of(OP, "h_q", d.h_q)?,
        i32_of(OP, "h_kv", d.h_kv)?,
    );
    let (dd, dv) = (i32_of(OP, "d", d.d)?, i32_of(OP, "head_dim_v", d.dv)?);
    let num_blocks = i32_of(OP, "num_blocks", d.num_blocks)?;
    let block_size = i32_of(OP, "block_size", d.block_size)?;
    let max_blocks = i32_of(OP, "max_blocks", d.max_blocks)?;
    i32_of(OP, "batch·max_blocks", d.batch.saturating_mul(d.max_blocks))?;
    let parts = g.parts as i32;

    // Deferred checks: lengths in [0, capacity], used entries in [0, num_blocks).
    let st_len = cx.check(
        OP,
        "cache_seqlens",
        &[d.batch],
        CheckKind::Range {
            lo: 0,
            hi: capacity as i64 + 1,
            allow: None,
        },
    )?;
    let st_bt = cx.check(
        OP,
        "block_table",
        &[d.batch, d.max_blocks],
        CheckKind::Range {
            lo: 0,
            hi: d.num_blocks as i64,
            allow: None,
        },
    )?;

    let layout = MetaLayout::new(d.batch, g.parts as usize);
    let meta = cx.scratch(layout.len * 4)?;
    let bt = cx.ptr(a.block_table)?;
    let lens = cx.ptr(a.cache_seqlens)?;
    cx.launch(
        kernel(&MLA_CU, "mla_metadata"),
        Grid {
            grid: (1, 1, 1),
            block: (BLOCK, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(lens),
            Arg::Ptr(bt),
            Arg::I32(batch),
            Arg::I32(max_blocks),
            Arg::I32(block_size),
            Arg::I32(num_blocks),
            Arg::I32(parts),
            Arg::I32(OVERHEAD_BLOCKS as i32),
            Arg::Ptr(meta.ptr()),
            Arg::Ptr(st_len),
            Arg::Ptr(st_bt),
        ],
    )?;
    let rows_total = d.batch * d.s_q * d.h_q;
    if rows_total == 0 {
        return Ok(());
    }
    let slot_rows = g.slots as usize * d.s_q * d.h_q;
    let opart = cx.scratch(slot_rows * d.dv * 4)?;
    let lpart = cx.scratch(slot_rows * 4)?;
    let split_args = |extra: &[Arg]| -> Vec<Arg> {
        let mut v = vec![
            Arg::Ptr(q),
            Arg::Ptr(kc),
            Arg::Ptr(bt),
            Arg::Ptr(lens),
            Arg::Ptr(meta.ptr()),
            Arg::Ptr(opart.ptr()),
            Arg::Ptr(lpart.ptr()),
            Arg::I32(batch),
            Arg::I32(s_q),
            Arg::I32(h_q),
            Arg::I32(h_kv),
        ];
        v.extend_from_slice(extra);
        v
    };
    let grid = (g.parts, d.h_kv as u32, g.row_tiles);
    if let Some(k) = special {
        cx.launch(
            k.kernel,
            Grid {
                grid,
                block: (k.threads, 1, 1),
                smem: k.smem,
            },
            &split_args(&[
                Arg::I32(num_blocks),
                Arg::I32(max_blocks),
                Arg::I32(parts),
                Arg::I32(a.causal as i32),
                Arg::F32(a.softmax_scale),
            ]),
        )?;
    } else {
        let smem = DECODE_CH * d.d * 4;
        debug_assert!(smem <= SMEM_DEFAULT);
        cx.launch(
            kernel(&MLA_CU, "mla_decode_split"),
            Grid {
                grid,
                block: (BLOCK, 1, 1),
                smem: smem as u32,
            },
            &split_args(&[
                Arg::I32(dd),
                Arg::I32(dv),
                Arg::I32(num_blocks),
                Arg::I32(block_size),
                Arg::I32(max_blocks),
                Arg::I32(parts),
                Arg::I32(code),
                Arg::I32(a.causal as i32),
                Arg::F32(a.softmax_scale),
            ]),
        )?;
    }
    let combine_ctas = rows_total.div_ceil(WARPS as usize);
    let combine_x = u32::try_from(combine_ctas)
        .ok()
        .filter(|&x| u64::from(x) <= crate::schedule::mla::GRID_X_MAX)
        .ok_or_else(|| Error::not_supported("cuda", OP, "too many rows for one combine grid"))?;
    let out = cx.ptr_mut(a.out)?;
    let lse = cx.ptr_mut(a.lse)?;
    cx.launch(
        kernel(&MLA_CU, "mla_combine"),
        Grid {
            grid: (combine_x, 1, 1),
            block: (BLOCK, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(meta.ptr()),
            Arg::Ptr(opart.ptr()),
            Arg::Ptr(lpart.ptr()),
            Arg::Ptr(out),
            Arg::Ptr(lse),
            Arg::I32(batch),
            Arg::I32(s_q),
            Arg::I32(h_q),
            Arg::I32(dv),
            Arg::I32(parts),
            Arg::I32(out_code),
        ],
    )
}

/// A strided operand of [`bmm`]: `ptr + off + z·sz + row·s1 + col·s2`
/// (element strides).
#[derive(Clone, Copy, Debug)]
struct View {
    ptr: u64,
    dt: i32,
    off: i64,
    sz: i64,
    s1: i64,
    s2: i64,
}

/// `d[z, i, j] = Σ_l a[z, i, l] · b[z, l, j]`, `a` strides (z, i, l),
/// `b` strides (z, l, j), `d` strides (z, i, j) (no offset).
#[allow(clippy::too_many_arguments)]
fn bmm(
    cx: &dyn LaunchContext,
    op: &'static str,
    a: View,
    b: View,
    d: View,
    z: usize,
    i: usize,
    j: usize,
    l: usize,
) -> Result<()> {
    if z == 0 || i == 0 || j == 0 {
        return Ok(());
    }
    let ij = i.saturating_mul(j);
    let gx = u32::try_from(ij.div_ceil(BLOCK as usize))
        .ok()
        .filter(|&x| u64::from(x) <= crate::schedule::mla::GRID_X_MAX);
    let (Some(gx), true) = (gx, z <= 65535) else {
        return Err(Error::not_supported(
            "cuda",
            op,
            format!("matmul {z}×{i}×{j} exceeds the launch limits"),
        ));
    };
    cx.launch(
        kernel(&MLA_CU, "mla_bmm"),
        Grid {
            grid: (gx, z as u32, 1),
            block: (BLOCK, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(a.ptr),
            Arg::I32(a.dt),
            Arg::I64(a.off),
            Arg::I64(a.sz),
            Arg::I64(a.s1),
            Arg::I64(a.s2),
            Arg::Ptr(b.ptr),
            Arg::I32(b.dt),
            Arg::I64(b.off),
            Arg::I64(b.sz),
            Arg::I64(b.s1),
            Arg::I64(b.s2),
            Arg::Ptr(d.ptr),
            Arg::I32(d.dt),
            Arg::I64(d.sz),
            Arg::I64(d.s1),
            Arg::I64(d.s2),
            Arg::I32(i32_of(op, "rows", i)?),
            Arg::I32(i32_of(op, "cols", j)?),
            Arg::I32(i32_of(op, "inner", l)?),
        ],
    )
}

/// Rows per CTA of `mla_prefill_attn` (CTA of 32 threads a row) for
/// per-row shared memory of `floats` f32: 8, 4, 2 or 1 (powers of two keep
/// the CTA a whole number of 64-wide wavefronts down to 2 rows), or `None`
/// when one row does not fit.
fn prefill_warps(floats: usize) -> Option<u32> {
    let per_row = floats.checked_mul(4)?.max(1);
    [WARPS, 4, 2, 1]
        .into_iter()
        .find(|&w| w as usize * per_row <= SMEM_DEFAULT)
}

/// `mla_prefill` (SPEC.md §5).
pub fn mla_prefill(cx: &dyn LaunchContext, op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    const OP: &str = "mla_prefill";
    let (a, dims) = op.parts();
    let MlaPrefillDims {
        t,
        s,
        heads,
        dn,
        dr,
        dc,
        dv,
    } = dims.clone();
    if t == 0 || heads == 0 || dv == 0 {
        return Ok(());
    }
    let code = |t: &deepport_core::backend::Tensor| dtype_code(OP, t.dtype());
    let (qn, qp, lat, kpe, w) = (
        cx.ptr(a.q_nope)?,
        cx.ptr(a.q_pe)?,
        cx.ptr(a.latent)?,
        cx.ptr(a.k_pe)?,
        cx.ptr(a.wkv_b)?,
    );
    let (qn_dt, qp_dt, lat_dt, kpe_dt, w_dt) = (
        code(a.q_nope)?,
        code(a.q_pe)?,
        code(a.latent)?,
        code(a.k_pe)?,
        code(a.wkv_b)?,
    );
    let out_dt = code(a.out)?;
    let out = cx.ptr_mut(a.out)?;
    let (hs, wrow) = ((dn + dv) as i64, dc as i64);
    let head_w = hs * wrow; // elements of one head's rows of wkv_b
    let f32v = |ptr: u64, sz: i64, s1: i64, s2: i64| View {
        ptr,
        dt: 0,
        off: 0,
        sz,
        s1,
        s2,
    };
    // The attention: (q1, k1 per head or shared, v per head or shared).
    struct Attn {
        q1: (u64, i32),
        k1: (u64, i32, i64, i64),
        v: (u64, i32, i64, i64),
        out: (u64, i32),
        d1: usize,
        dv: usize,
    }
    let attend = |x: Attn| -> Result<()> {
        let floats = x.d1 + dr + x.dv;
        let nw = prefill_warps(floats).ok_or_else(|| {
            Error::not_supported(
                "cuda",
                OP,
                format!("per-row working set of {floats} floats exceeds shared memory"),
            )
        })?;
        let rows = t * heads;
        let gx = u32::try_from(rows.div_ceil(nw as usize))
            .map_err(|_| Error::not_supported("cuda", OP, "too many rows"))?;
        cx.launch(
            kernel(&MLA_CU, "mla_prefill_attn"),
            Grid {
                grid: (gx, 1, 1),
                block: (nw * WARP, 1, 1),
                smem: nw * floats as u32 * 4,
            },
            &[
                Arg::Ptr(x.q1.0),
                Arg::I32(x.q1.1),
                Arg::Ptr(qp),
                Arg::I32(qp_dt),
                Arg::Ptr(x.k1.0),
                Arg::I32(x.k1.1),
                Arg::I64(x.k1.2),
                Arg::I64(x.k1.3),
                Arg::Ptr(kpe),
                Arg::I32(kpe_dt),
                Arg::Ptr(x.v.0),
                Arg::I32(x.v.1),
                Arg::I64(x.v.2),
                Arg::I64(x.v.3),
                Arg::Ptr(x.out.0),
                Arg::I32(x.out.1),
                Arg::I32(i32_of(OP, "T", t)?),
                Arg::I32(i32_of(OP, "S", s)?),
                Arg::I32(i32_of(OP, "H", heads)?),
                Arg::I32(i32_of(OP, "d1", x.d1)?),
                Arg::I32(i32_of(OP, "dr", dr)?),
                Arg::I32(i32_of(OP, "dv", x.dv)?),
                Arg::F32(a.softmax_scale),
            ],
        )
    };
    let hi = heads as i64;
    match a.form {
        MlaForm::Naive => {
            // k_nope [S, H, dn] and v [S, H, dv] in f32 scratch.
            let kn = cx.scratch(s * heads * dn * 4)?;
            let vv = cx.scratch(s * heads * dv * 4)?;
            let lat_t = View {
                ptr: lat,
                dt: lat_dt,
                off: 0,
                sz: 0,
                s1: 1,
                s2: wrow,
            };
            // k_nope[s, h, i] = Σ_c W[h·hs + i, c] · lat[s, c]: z = h, i, j = s.
            let w_uk = View {
                ptr: w,
                dt: w_dt,
                off: 0,
                sz: head_w,
                s1: wrow,
                s2: 1,
            };
            let kn_v = f32v(kn.ptr(), dn as i64, 1, hi * dn as i64);
            bmm(cx, OP, w_uk, lat_t, kn_v, heads, dn, s, dc)?;
            let w_uv = View {
                off: dn as i64 * wrow,
                ..w_uk
            };
            let v_v = f32v(vv.ptr(), dv as i64, 1, hi * dv as i64);
            bmm(cx, OP, w_uv, lat_t, v_v, heads, dv, s, dc)?;
            attend(Attn {
                q1: (qn, qn_dt),
                k1: (kn.ptr(), 0, hi * dn as i64, dn as i64),
                v: (vv.ptr(), 0, hi * dv as i64, dv as i64),
                out: (out, out_dt),
                d1: dn,
                dv,
            })
        }
        MlaForm::Absorbed => {
            // q_lat[t, h, c] = Σ_i q_nope[t, h, i] · W[h·hs + i, c]
            let q_lat = cx.scratch(t * heads * dc * 4)?;
            let o_lat = cx.scratch(t * heads * dc * 4)?;
            let qn_v = View {
                ptr: qn,
                dt: qn_dt,
                off: 0,
                sz: dn as i64,
                s1: hi * dn as i64,
                s2: 1,
            };
            let w_uk = View {
                ptr: w,
                dt: w_dt,
                off: 0,
                sz: head_w,
                s1: wrow,
                s2: 1,
            };
            let ql_v = f32v(q_lat.ptr(), dc as i64, hi * dc as i64, 1);
            bmm(cx, OP, qn_v, w_uk, ql_v, heads, t, dc, dn)?;
            attend(Attn {
                q1: (q_lat.ptr(), 0),
                k1: (lat, lat_dt, wrow, 0),
                v: (lat, lat_dt, wrow, 0),
                out: (o_lat.ptr(), 0),
                d1: dc,
                dv: dc,
            })?;
            // out[t, h, i] = Σ_c o_lat[t, h, c] · W[h·hs + dn + i, c]
            let ol_v = f32v(o_lat.ptr(), dc as i64, hi * dc as i64, 1);
            let w_uv_t = View {
                ptr: w,
                dt: w_dt,
                off: dn as i64 * wrow,
                sz: head_w,
                s1: 1,
                s2: wrow,
            };
            let out_v = View {
                ptr: out,
                dt: out_dt,
                off: 0,
                sz: dv as i64,
                s1: hi * dv as i64,
                s2: 1,
            };
            bmm(cx, OP, ol_v, w_uv_t, out_v, heads, t, dv, dc)
        }
    }
}

/// YaRN's ramp bounds `(low, span)` for head dim `d` (f64), exactly as
/// [`RopeConfig::inv_freq`] computes them.
pub(crate) fn yarn_ramp(theta: f32, y: &Yarn, d: usize) -> (f64, f64) {
    let theta = theta as f64;
    let corr = |beta: f64| {
        d as f64
            * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * beta)).ln()
            / (2.0 * theta.ln())
    };
    let low = corr(y.beta_fast as f64).floor().max(0.0);
    let high = corr(y.beta_slow as f64).ceil().min(d as f64 - 1.0);
    let span = if high == low {
        high - low + 0.001
    } else {
        high - low
    };
    (low, span)
}

/// `rope` (SPEC.md §8).
pub fn rope(cx: &dyn LaunchContext, op: &mut Checked<Rope<'_>>) -> Result<()> {
    const OP: &str = "rope";
    let (a, dims) = op.parts();
    if a.config.layout != RopeLayout::Interleaved {
        return Err(Error::not_supported(
            "cuda",
            OP,
            "rope layout `half` (only interleaved pairs)",
        ));
    }
    let (tokens, heads, d) = (dims.tokens, dims.heads, dims.d);
    let dt = dtype_code(OP, a.x.dtype())?;
    let pos_dt = match a.positions.dtype() {
        DType::I32 => 0,
        DType::I64 => 1,
        other => {
            return Err(Error::not_supported(
                "cuda",
                OP,
                format!("positions dtype {other}"),
            ))
        }
    };
    if tokens == 0 {
        return Ok(());
    }
    let pairs = tokens.saturating_mul(d / 2);
    if pairs == 0 {
        return Ok(());
    }
    let st = cx.check(
        OP,
        "positions",
        &[tokens],
        CheckKind::Range {
            lo: 0,
            hi: i64::MAX,
            allow: None,
        },
    )?;
    let gx = u32::try_from(pairs.div_ceil(BLOCK as usize))
        .ok()
        .filter(|&x| u64::from(x) <= crate::schedule::mla::GRID_X_MAX)
        .ok_or_else(|| Error::not_supported("cuda", OP, "too many tokens for one grid"))?;
    let c = a.config;
    let (yarn, low, span, factor) = match c.yarn {
        Some(y) => {
            let (low, span) = yarn_ramp(c.theta, &y, d);
            (1, low, span, y.factor as f64)
        }
        None => (0, 0.0, 1.0, 1.0),
    };
    let x = cx.ptr(a.x)?;
    let pos = cx.ptr(a.positions)?;
    let y = cx.ptr_mut(a.y)?;
    cx.launch(
        kernel(&ROPE_CU, "rope_kernel"),
        Grid {
            grid: (gx, 1, 1),
            block: (BLOCK, 1, 1),
            smem: 0,
        },
        &[
            Arg::Ptr(x),
            Arg::Ptr(pos),
            Arg::Ptr(y),
            Arg::I32(dt),
            Arg::I32(pos_dt),
            Arg::I32(i32_of(OP, "tokens", tokens)?),
            Arg::I32(i32_of(OP, "heads", heads)?),
            Arg::I32(i32_of(OP, "d", d)?),
            Arg::U64((c.theta as f64).to_bits()),
            Arg::I32(yarn),
            Arg::U64(low.to_bits()),
            Arg::U64(span.to_bits()),
            Arg::U64(factor.to_bits()),
            Arg::F32(c.cos_sin_scale()),
            Arg::Ptr(st),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Arch, Scratch, TensorMap, TmaParams};
    use deepport_core::backend::{Backend, Tensor};
    use std::cell::{Cell, RefCell};

    struct Launch {
        entry: &'static str,
        source: &'static str,
        grid: Grid,
        args: Vec<Arg>,
    }

    /// (op, arg, shape, kind, status address) of one requested check.
    type CheckRec = (&'static str, &'static str, Vec<usize>, String, u64);

    /// Records launches, checks and scratch requests; hands out fake addresses.
    struct Mock {
        arch: Arch,
        next: Cell<u64>,
        launches: RefCell<Vec<Launch>>,
        checks: RefCell<Vec<CheckRec>>,
        scratch: RefCell<Vec<(usize, u64)>>,
    }

    impl Mock {
        fn new(major: u32, minor: u32) -> Self {
            Self {
                arch: Arch {
                    major,
                    minor,
                    sms: 132,
                    smem_optin: 227 * 1024,
                },
                next: Cell::new(0x1000),
                launches: RefCell::default(),
                checks: RefCell::default(),
                scratch: RefCell::default(),
            }
        }
        fn addr(&self) -> u64 {
            let a = self.next.get();
            self.next.set(a + 0x100000);
            a
        }
        fn entries(&self) -> Vec<&'static str> {
            self.launches.borrow().iter().map(|l| l.entry).collect()
        }
    }

    impl LaunchContext for Mock {
        fn arch(&self) -> Arch {
            self.arch
        }
        fn ptr(&self, _t: &Tensor) -> Result<u64> {
            Ok(self.addr())
        }
        fn ptr_mut(&self, _t: &mut Tensor) -> Result<u64> {
            Ok(self.addr())
        }
        fn scratch(&self, bytes: usize) -> Result<Scratch> {
            let ptr = self.addr();
            self.scratch.borrow_mut().push((bytes, ptr));
            Ok(Scratch {
                ptr,
                bytes,
                _keep: None,
            })
        }
        fn check(
            &self,
            op: &'static str,
            arg: &'static str,
            shape: &[usize],
            kind: CheckKind,
        ) -> Result<u64> {
            let a = self.addr();
            self.checks
                .borrow_mut()
                .push((op, arg, shape.to_vec(), format!("{kind:?}"), a));
            Ok(a)
        }
        fn tensor_map(&self, _p: &TmaParams) -> Result<TensorMap> {
            Ok(TensorMap([0; 16]))
        }
        fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
            assert!(
                kernel.source.entries.contains(&kernel.entry),
                "{} not an entry of {}",
                kernel.entry,
                kernel.source.name
            );
            let (g, b) = (grid.grid, grid.block);
            assert!(g.0 >= 1 && g.1 >= 1 && g.2 >= 1 && g.1 <= 65535 && g.2 <= 65535);
            assert!(b.0 * b.1 * b.2 <= 1024 && b.0 % 32 == 0);
            let limit = if kernel.source.target == Target::Sm90a {
                self.arch.smem_optin
            } else {
                48 * 1024
            };
            assert!(grid.smem <= limit, "{}: smem {}", kernel.entry, grid.smem);
            self.launches.borrow_mut().push(Launch {
                entry: kernel.entry,
                source: kernel.source.name,
                grid,
                args: args.to_vec(),
            });
            Ok(())
        }
    }

    fn cpu() -> deepport_cpu::CpuRef {
        deepport_cpu::CpuRef::new()
    }

    fn ptrs(args: &[Arg]) -> Vec<u64> {
        args.iter()
            .filter_map(|a| match a {
                Arg::Ptr(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn i32s(args: &[Arg]) -> Vec<i32> {
        args.iter()
            .filter_map(|a| match a {
                Arg::I32(v) => Some(*v),
                _ => None,
            })
            .collect()
    }

    /// Runs mla_decode on `mock` with the given shapes; returns nothing but
    /// leaves the recording in the mock.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        mock: &Mock,
        dt: DType,
        b: usize,
        s_q: usize,
        h_q: usize,
        h_kv: usize,
        d: usize,
        dv: usize,
        bs: usize,
        max_blocks: usize,
    ) -> Result<()> {
        let be = cpu();
        let q = be.alloc(dt, &[b, s_q, h_q, d])?;
        let k = be.alloc(dt, &[10, bs, h_kv, d])?;
        let bt = be.alloc(DType::I32, &[b, max_blocks])?;
        let lens = be.alloc(DType::I32, &[b])?;
        let mut out = be.alloc(dt, &[b, s_q, h_q, dv])?;
        let mut lse = be.alloc(DType::F32, &[b, h_q, s_q])?;
        let mut op = MlaDecode {
            q: &q,
            kcache: &k,
            block_table: &bt,
            cache_seqlens: &lens,
            out: &mut out,
            lse: &mut lse,
            softmax_scale: 0.1,
            causal: true,
        }
        .check()?;
        mla_decode(mock, &mut op)
    }

    #[test]
    fn decode_portable_launches() {
        let m = Mock::new(8, 0);
        decode(&m, DType::F32, 3, 2, 16, 2, 64, 48, 16, 5).unwrap();
        assert_eq!(
            m.entries(),
            vec!["mla_metadata", "mla_decode_split", "mla_combine"]
        );
        // checks: lengths in [0, 5·16], used entries in [0, 10)
        let checks = m.checks.borrow();
        assert_eq!(checks.len(), 2);
        assert_eq!(
            (checks[0].1, checks[0].2.clone()),
            ("cache_seqlens", vec![3])
        );
        assert!(checks[0].3.contains("hi: 81"), "{}", checks[0].3);
        assert_eq!(
            (checks[1].1, checks[1].2.clone()),
            ("block_table", vec![3, 5])
        );
        assert!(checks[1].3.contains("hi: 10"), "{}", checks[1].3);
        let l = m.launches.borrow();
        // the metadata kernel gets both status entries, last
        let mp = ptrs(&l[0].args);
        assert_eq!(&mp[mp.len() - 2..], &[checks[0].4, checks[1].4]);
        assert_eq!(l[0].grid.grid, (1, 1, 1));
        // rows per kv head 2·8 = 16 → 2 tiles of 8; parts 132 / (2·2) = 33
        assert_eq!(l[1].grid.grid, (33, 2, 2));
        assert_eq!(l[1].grid.block, (256, 1, 1));
        assert_eq!(l[1].grid.smem, 8 * 64 * 4);
        assert_eq!(i32s(&l[1].args)[..4], [3, 2, 16, 2]);
        // the same metadata buffer feeds split and combine
        let meta = ptrs(&l[0].args)[2];
        assert_eq!(ptrs(&l[1].args)[4], meta);
        assert_eq!(ptrs(&l[2].args)[0], meta);
        // combine: 3·2·16 rows, 8 per CTA
        assert_eq!(l[2].grid.grid, (12, 1, 1));
        // scratch: meta, then partials for b + parts slots
        let sc = m.scratch.borrow();
        assert_eq!(sc[0].0, MetaLayout::new(3, 33).len * 4);
        assert_eq!(sc[1].0, 36 * 2 * 16 * 48 * 4);
        assert_eq!(sc[2].0, 36 * 2 * 16 * 4);
    }

    #[test]
    fn decode_hopper_path_and_fallbacks() {
        let m = Mock::new(9, 0);
        decode(&m, DType::BF16, 2, 1, 128, 1, 576, 512, 64, 4).unwrap();
        let l = m.launches.borrow();
        assert_eq!(l[1].entry, "mla_decode_sm90");
        assert_eq!(l[1].source, "mla_sm90.cu");
        assert_eq!(l[1].grid.grid, (66, 1, 2));
        assert_eq!(l[1].grid.block, (256, 1, 1));
        assert_eq!(l[1].grid.smem, SM90_SMEM);
        assert_eq!((l[0].source, l[2].source), ("mla.cu", "mla.cu"));
        assert_eq!(l[2].entry, "mla_combine");
        drop(l);
        // f32, h_q not a multiple of 64, page 16, or not Hopper: portable
        for (major, dt, h_q, bs) in [
            (9, DType::F32, 128, 64),
            (9, DType::BF16, 63, 64),
            (9, DType::BF16, 128, 16),
            (8, DType::BF16, 128, 64),
            (10, DType::BF16, 128, 64),
            (9, DType::BF16, 128, 64 + 1000),
        ] {
            let m = Mock::new(major, 0);
            if bs > 1000 {
                m.next.set(0x1008); // q at an 8-byte-aligned address
            }
            decode(&m, dt, 2, 1, h_q, 1, 576, 512, bs.min(64), 4).unwrap();
            assert_eq!(
                m.entries()[1],
                "mla_decode_split",
                "{major} {dt} {h_q} {bs}"
            );
        }
    }

    #[test]
    fn decode_limits_and_empty() {
        let m = Mock::new(8, 0);
        let e = decode(&m, DType::F32, 1, 1, 8, 1, 1040, 512, 16, 2).unwrap_err();
        assert!(e.is_not_supported(), "{e}");
        assert!(m.launches.borrow().is_empty());
        // batch 0: nothing to launch
        let m = Mock::new(8, 0);
        decode(&m, DType::F32, 0, 1, 8, 1, 64, 64, 16, 2).unwrap();
        assert!(m.launches.borrow().is_empty());
        // s_q = 0: indices still checked, no attention launched
        let m = Mock::new(8, 0);
        decode(&m, DType::F32, 2, 0, 8, 1, 64, 64, 16, 2).unwrap();
        assert_eq!(m.entries(), vec!["mla_metadata"]);
    }

    fn prefill(m: &Mock, form: MlaForm, dt: DType) -> Result<()> {
        let be = cpu();
        let (t, s, h, dn, dr, dc, dv) = (3, 5, 4, 16, 8, 32, 12);
        let qn = be.alloc(dt, &[t, h, dn])?;
        let qp = be.alloc(dt, &[t, h, dr])?;
        let lat = be.alloc(dt, &[s, dc])?;
        let kpe = be.alloc(dt, &[s, dr])?;
        let w = be.alloc(dt, &[h * (dn + dv), dc])?;
        let mut out = be.alloc(dt, &[t, h, dv])?;
        let mut op = MlaPrefill {
            q_nope: &qn,
            q_pe: &qp,
            latent: &lat,
            k_pe: &kpe,
            wkv_b: &w,
            out: &mut out,
            softmax_scale: 0.2,
            form,
        }
        .check()?;
        mla_prefill(m, &mut op)
    }

    fn i64s(args: &[Arg]) -> Vec<i64> {
        args.iter()
            .filter_map(|a| match a {
                Arg::I64(v) => Some(*v),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn prefill_absorbed_launches() {
        let m = Mock::new(8, 0);
        prefill(&m, MlaForm::Absorbed, DType::BF16).unwrap();
        assert_eq!(m.entries(), vec!["mla_bmm", "mla_prefill_attn", "mla_bmm"]);
        let l = m.launches.borrow();
        // q_lat = q_nope · W_UK per head: grid (⌈3·32/256⌉, 4)
        assert_eq!(l[0].grid.grid, (1, 4, 1));
        assert_eq!(i32s(&l[0].args)[3..], [3, 32, 16]);
        // a = q_nope (z dn, i H·dn, l 1); b = W (z 28·32, l 32, j 1)
        assert_eq!(i64s(&l[0].args)[..8], [0, 16, 64, 1, 0, 28 * 32, 32, 1]);
        // attention: 12 rows, 8 warps, smem 8·(32 + 8 + 32) floats
        assert_eq!(l[1].grid.grid, (2, 1, 1));
        assert_eq!(l[1].grid.smem, 8 * 72 * 4);
        assert_eq!(i32s(&l[1].args)[6..], [3, 5, 4, 32, 8, 32]);
        // out = o_lat · W_UVᵀ: W offset dn·dc, l stride 1, j stride dc
        assert_eq!(i64s(&l[2].args)[4..8], [16 * 32, 28 * 32, 1, 32]);
        assert_eq!(i32s(&l[2].args)[3..], [3, 12, 32]);
    }

    #[test]
    fn prefill_naive_launches() {
        let m = Mock::new(9, 0);
        prefill(&m, MlaForm::Naive, DType::F32).unwrap();
        assert_eq!(m.entries(), vec!["mla_bmm", "mla_bmm", "mla_prefill_attn"]);
        let l = m.launches.borrow();
        // k_nope [S, H, dn]: d strides (z dn, i 1, j H·dn)
        assert_eq!(i64s(&l[0].args)[8..], [16, 1, 64]);
        assert_eq!(i32s(&l[0].args)[3..], [16, 5, 32]);
        // v: W offset dn·dc
        assert_eq!(i64s(&l[1].args)[0], 16 * 32);
        assert_eq!(i32s(&l[1].args)[3..], [12, 5, 32]);
        assert_eq!(i32s(&l[2].args)[6..], [3, 5, 4, 16, 8, 12]);
        // scratch: k_nope and v in f32
        let sc = m.scratch.borrow();
        assert_eq!((sc[0].0, sc[1].0), (5 * 4 * 16 * 4, 5 * 4 * 12 * 4));
    }

    #[test]
    fn rope_launch_and_yarn_table() {
        let be = cpu();
        let x = be.alloc(DType::BF16, &[5, 3, 64]).unwrap();
        let p = be.alloc(DType::I64, &[5]).unwrap();
        let mut y = be.alloc(DType::BF16, &[5, 3, 64]).unwrap();
        let yarn = Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        };
        let config = RopeConfig {
            layout: Default::default(),
            theta: 10000.0,
            yarn: Some(yarn),
        };
        let mut op = Rope {
            x: &x,
            positions: &p,
            y: &mut y,
            config,
        }
        .check()
        .unwrap();
        let m = Mock::new(8, 0);
        rope(&m, &mut op).unwrap();
        let l = m.launches.borrow();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].grid.grid, (1, 1, 1));
        assert_eq!(i32s(&l[0].args), vec![1, 1, 5, 3, 64, 1]);
        let checks = m.checks.borrow();
        assert_eq!((checks[0].1, checks[0].2.clone()), ("positions", vec![5]));
        assert_eq!(*ptrs(&l[0].args).last().unwrap(), checks[0].4);
        // The kernel's table (pow, then the ramp with these bounds) is
        // RopeConfig::inv_freq: DeepSeek's low 10, high 23.
        let (low, span) = yarn_ramp(10000.0, &yarn, 64);
        assert_eq!((low, span), (10.0, 13.0));
        let table = config.inv_freq(64);
        for (i, &f) in table.iter().enumerate() {
            let base = 10000f64.powf(-2.0 * i as f64 / 64.0);
            let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
            let k = (base * (1.0 - ramp) + base / 40.0 * ramp) as f32;
            assert_eq!(k.to_bits(), f.to_bits(), "pair {i}");
        }
    }

    #[test]
    fn prefill_rows_per_cta() {
        assert_eq!(prefill_warps(512 + 64 + 512), Some(8));
        assert_eq!(prefill_warps(2000), Some(4));
        assert_eq!(prefill_warps(5000), Some(2));
        assert_eq!(prefill_warps(12288), Some(1));
        assert_eq!(prefill_warps(12289), None);
    }

    #[test]
    fn sources_declare_their_entries() {
        for src in SOURCES {
            for e in src.entries {
                let sig = format!(" {e}(");
                assert!(
                    src.text.contains(&sig) && src.text.contains("extern \"C\""),
                    "{} lacks {e}",
                    src.name
                );
            }
            if src.target == Target::Portable {
                for line in src.text.lines().filter(|l| l.starts_with("#include")) {
                    assert!(
                        line.contains("port.cuh") || line.contains("mla.cuh"),
                        "{}: {line}",
                        src.name
                    );
                }
                assert!(!src.text.contains("asm("), "{}: inline PTX", src.name);
            }
        }
    }
}
