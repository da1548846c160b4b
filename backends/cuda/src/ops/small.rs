//! Small ops and rows: norms, gate, elementwise, embedding, copies, the EP row kernels, dispatch layout.
//!
//! Every kernel here is portable (`port.cuh` only, `DP_WARP`), so the ROCm
//! backend compiles the same sources. Geometry is plain Rust: flat kernels
//! loop grid-stride over `i64` element indices, so a grid is capped (never
//! more than [`MAX_BLOCKS`] blocks) and any tensor size is covered; row
//! kernels loop over rows the same way. Index tensors (i32 or i64) are
//! range-checked in the kernels that read them (`dp_flag` into a status
//! entry from [`LaunchContext::check`]); `moe_gate`'s inputs are checked
//! finite by a separate kernel before the gate runs.

use crate::launch::{Arg, CheckKind, Grid, Kernel, KernelSource, LaunchContext, Target};
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

/// Elementwise ops, RMSNorm, the finite check.
pub(crate) static SMALL_CU: KernelSource = KernelSource {
    name: "small.cu",
    text: include_str!("../../kernels/small.cu"),
    target: Target::Portable,
    entries: &["sm_check_finite", "sm_add", "sm_silu_mul", "sm_rms_norm"],
};

/// Row movement: embedding, copy_window, gather_rows, reduce_rows.
pub(crate) static ROWS_CU: KernelSource = KernelSource {
    name: "rows.cu",
    text: include_str!("../../kernels/rows.cu"),
    target: Target::Portable,
    entries: &[
        "rw_check_index",
        "rw_embedding",
        "rw_copy_window",
        "rw_gather_rows",
        "rw_reduce_rows",
    ],
};

/// The MoE gate.
pub(crate) static GATE_CU: KernelSource = KernelSource {
    name: "gate.cu",
    text: include_str!("../../kernels/gate.cu"),
    target: Target::Portable,
    entries: &["gt_moe_gate"],
};

/// get_dispatch_layout.
pub(crate) static LAYOUT_CU: KernelSource = KernelSource {
    name: "layout.cu",
    text: include_str!("../../kernels/layout.cu"),
    target: Target::Portable,
    entries: &["ly_zero", "ly_expert_counts", "ly_rank_membership"],
};

/// This family's kernel sources.
pub(crate) static SOURCES: &[&KernelSource] = &[&SMALL_CU, &ROWS_CU, &GATE_CU, &LAYOUT_CU];

// ---- geometry ------------------------------------------------------------------

/// Threads per block of every kernel here (a multiple of 64, so of
/// `DP_WARP` on NVIDIA and AMD).
pub(crate) const BLOCK: u32 = 256;
/// Most blocks of a grid-stride launch (well under the x limit 2^31 − 1).
pub(crate) const MAX_BLOCKS: u32 = 1 << 16;
/// Dynamic shared memory a launch may use without an opt-in.
pub(crate) const SMEM_DEFAULT: u32 = 48 * 1024;

/// Blocks for `work` independent units (elements for flat kernels, rows
/// for row kernels) of `per_block` units per block: one pass when that
/// fits in [`MAX_BLOCKS`], else a grid-stride loop over that many blocks.
/// `None` when there is no work (a zero-block grid is not a launch).
pub(crate) fn blocks_for(work: usize, per_block: usize) -> Option<u32> {
    if work == 0 {
        return None;
    }
    Some(work.div_ceil(per_block.max(1)).min(MAX_BLOCKS as usize) as u32)
}

/// A 1-d grid of `blocks` × `block` threads.
pub(crate) fn grid_1d(blocks: u32, block: u32, smem: u32) -> Grid {
    Grid {
        grid: (blocks, 1, 1),
        block: (block, 1, 1),
        smem,
    }
}

/// A flat grid-stride launch over `n` elements.
pub(crate) fn flat_grid(n: usize) -> Option<Grid> {
    blocks_for(n, BLOCK as usize).map(|b| grid_1d(b, BLOCK, 0))
}

/// Threads for a row of `len` elements: `len` rounded up to 64, in
/// `[64, BLOCK]`.
pub(crate) fn row_block(len: usize) -> u32 {
    (len.div_ceil(64) * 64).clamp(64, BLOCK as usize) as u32
}

/// The dtype code of `port.cuh` (`DP_F32`, `DP_BF16`, `DP_F16`) of a float
/// activation tensor.
pub(crate) fn act_code(op: &'static str, arg: &'static str, t: &Tensor) -> Result<i32> {
    match t.dtype() {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        actual => Err(Error::DType {
            op,
            arg,
            expected: "f32 or bf16 or f16".into(),
            actual,
        }),
    }
}

/// 1 for an i64 index tensor, 0 for i32.
pub(crate) fn index_is64(op: &'static str, arg: &'static str, t: &Tensor) -> Result<i32> {
    match t.dtype() {
        DType::I64 => Ok(1),
        DType::I32 => Ok(0),
        actual => Err(Error::DType {
            op,
            arg,
            expected: "i32 or i64".into(),
            actual,
        }),
    }
}

/// The element size to copy raw when `src` and `dst` share a dtype (a
/// bit-exact move), else 0 (convert through f32, one rounding).
fn same_bytes(src: &Tensor, dst: &Tensor) -> i32 {
    if src.dtype() == dst.dtype() {
        src.dtype().size() as i32
    } else {
        0
    }
}

/// The widest unit (16, 8, 4, 2 or 1 bytes) that divides a row of
/// `row_bytes` and aligns both base addresses, and the row in such units.
pub(crate) fn gather_width(row_bytes: usize, src: u64, dst: u64) -> (u32, usize) {
    for w in [16u32, 8, 4, 2] {
        let wb = w as usize;
        if row_bytes.is_multiple_of(wb) && src % w as u64 == 0 && dst % w as u64 == 0 {
            return (w, row_bytes / wb);
        }
    }
    (1, row_bytes)
}

/// Bytes of `gt_moe_gate`'s dynamic shared memory (see `gate.cu`).
pub(crate) fn gate_smem(experts: usize, n_group: usize) -> usize {
    n_group * 8 + experts * 8 + n_group + experts
}

fn len(n: usize) -> Arg {
    Arg::I64(n as i64)
}

fn k(source: &'static KernelSource, entry: &'static str) -> Kernel {
    Kernel { source, entry }
}

/// Launches `sm_check_finite` on `t` (dtype f32/bf16/f16) with a status
/// entry naming `op`/`arg`.
fn check_finite(
    cx: &dyn LaunchContext,
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
) -> Result<()> {
    let Some(grid) = flat_grid(t.numel()) else {
        return Ok(());
    };
    let code = act_code(op, arg, t)?;
    let status = cx.check(op, arg, t.shape(), CheckKind::Finite)?;
    cx.launch(
        k(&SMALL_CU, "sm_check_finite"),
        grid,
        &[
            Arg::Ptr(cx.ptr(t)?),
            len(t.numel()),
            Arg::I32(code),
            Arg::Ptr(status),
        ],
    )
}

/// Launches `rw_check_index` on `index`: values in `[lo, hi)` or `allow`.
/// For ops whose main kernel reads no index (rows of zero elements).
fn check_index(
    cx: &dyn LaunchContext,
    op: &'static str,
    arg: &'static str,
    index: &Tensor,
    hi: usize,
    allow: Option<i64>,
) -> Result<()> {
    let Some(grid) = flat_grid(index.numel()) else {
        return Ok(());
    };
    let is64 = index_is64(op, arg, index)?;
    let status = range_check(cx, op, arg, index, hi, allow)?;
    cx.launch(
        k(&ROWS_CU, "rw_check_index"),
        grid,
        &[
            Arg::Ptr(cx.ptr(index)?),
            Arg::I32(is64),
            len(index.numel()),
            Arg::I64(0),
            len(hi),
            Arg::I32(allow.is_some() as i32),
            Arg::I64(allow.unwrap_or(0)),
            Arg::Ptr(status),
        ],
    )
}

/// The status entry of a `[0, hi)` (or `allow`) range check on `index`.
fn range_check(
    cx: &dyn LaunchContext,
    op: &'static str,
    arg: &'static str,
    index: &Tensor,
    hi: usize,
    allow: Option<i64>,
) -> Result<u64> {
    cx.check(
        op,
        arg,
        index.shape(),
        CheckKind::Range {
            lo: 0,
            hi: hi as i64,
            allow,
        },
    )
}

// ---- ops -------------------------------------------------------------------------

/// `rms_norm` (SPEC.md §8): one block per row, f64 sum of squares, one
/// rounding.
pub(crate) fn rms_norm(cx: &dyn LaunchContext, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
    const OP: &str = "rms_norm";
    let (a, d) = op.parts();
    if d.dim == 0 {
        return Ok(());
    }
    let Some(blocks) = blocks_for(d.rows, 1) else {
        return Ok(());
    };
    let args = [
        Arg::Ptr(cx.ptr(a.x)?),
        Arg::I32(act_code(OP, "x", a.x)?),
        Arg::Ptr(cx.ptr(a.weight)?),
        Arg::I32(act_code(OP, "weight", a.weight)?),
        Arg::Ptr(cx.ptr_mut(a.y)?),
        Arg::I32(act_code(OP, "y", a.y)?),
        len(d.rows),
        len(d.dim),
        Arg::F32(a.eps),
    ];
    cx.launch(
        k(&SMALL_CU, "sm_rms_norm"),
        grid_1d(blocks, row_block(d.dim), 0),
        &args,
    )
}

/// `moe_gate` (SPEC.md §6): finite checks of x, weight and bias, then one
/// block per token.
pub(crate) fn moe_gate(cx: &dyn LaunchContext, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
    const OP: &str = "moe_gate";
    let (a, d) = op.parts();
    check_finite(cx, OP, "x", a.x)?;
    check_finite(cx, OP, "weight", a.weight)?;
    if let Some(b) = a.bias {
        check_finite(cx, OP, "bias", b)?;
    }
    let Some(blocks) = blocks_for(d.tokens, 1) else {
        return Ok(());
    };
    let smem = gate_smem(d.experts, a.n_group);
    if smem > SMEM_DEFAULT as usize || d.experts > i32::MAX as usize {
        return Err(Error::NotSupported {
            backend: "cuda".into(),
            op: OP.into(),
            reason: format!(
                "{} experts need {smem} bytes of shared memory, more than {SMEM_DEFAULT}",
                d.experts
            ),
        });
    }
    let bias = match a.bias {
        Some(b) => cx.ptr(b)?,
        None => 0,
    };
    let args = [
        Arg::Ptr(cx.ptr(a.x)?),
        Arg::I32(act_code(OP, "x", a.x)?),
        Arg::Ptr(cx.ptr(a.weight)?),
        Arg::I32(act_code(OP, "weight", a.weight)?),
        Arg::Ptr(bias),
        Arg::Ptr(cx.ptr_mut(a.topk_idx)?),
        Arg::I32(index_is64(OP, "topk_idx", a.topk_idx)?),
        Arg::Ptr(cx.ptr_mut(a.topk_weights)?),
        len(d.tokens),
        len(d.dim),
        Arg::I32(d.experts as i32),
        Arg::I32(a.n_group as i32),
        Arg::I32(a.topk_group as i32),
        Arg::I32(a.topk as i32),
        Arg::F32(a.route_scale),
    ];
    cx.launch(
        k(&GATE_CU, "gt_moe_gate"),
        grid_1d(blocks, BLOCK, smem as u32),
        &args,
    )
}

/// `silu_mul` (SPEC.md §8): flat, f32 math, one rounding to out's dtype.
pub(crate) fn silu_mul(cx: &dyn LaunchContext, op: &mut Checked<SiluMul<'_>>) -> Result<()> {
    const OP: &str = "silu_mul";
    let (a, d) = op.parts();
    let Some(grid) = flat_grid(d.numel) else {
        return Ok(());
    };
    let args = [
        Arg::Ptr(cx.ptr(a.gate)?),
        Arg::I32(act_code(OP, "gate", a.gate)?),
        Arg::Ptr(cx.ptr(a.up)?),
        Arg::I32(act_code(OP, "up", a.up)?),
        Arg::Ptr(cx.ptr_mut(a.out)?),
        Arg::I32(act_code(OP, "out", a.out)?),
        len(d.numel),
    ];
    cx.launch(k(&SMALL_CU, "sm_silu_mul"), grid, &args)
}

/// `embedding`: one block per token (grid-stride), ids range-checked.
pub(crate) fn embedding(cx: &dyn LaunchContext, op: &mut Checked<Embedding<'_>>) -> Result<()> {
    const OP: &str = "embedding";
    let (a, d) = op.parts();
    let Some(blocks) = blocks_for(d.tokens, 1) else {
        return Ok(());
    };
    let status = range_check(cx, OP, "ids", a.ids, d.vocab, None)?;
    let same = same_bytes(a.table, a.out);
    let args = [
        Arg::Ptr(cx.ptr(a.table)?),
        Arg::I32(act_code(OP, "table", a.table)?),
        Arg::Ptr(cx.ptr(a.ids)?),
        Arg::I32(index_is64(OP, "ids", a.ids)?),
        Arg::Ptr(cx.ptr_mut(a.out)?),
        Arg::I32(act_code(OP, "out", a.out)?),
        Arg::I32(same),
        len(d.vocab),
        len(d.dim),
        len(d.tokens),
        Arg::Ptr(status),
    ];
    cx.launch(
        k(&ROWS_CU, "rw_embedding"),
        grid_1d(blocks, row_block(d.dim), 0),
        &args,
    )
}

/// `add` (SPEC.md §8): flat, f64 sum, one rounding.
pub(crate) fn add(cx: &dyn LaunchContext, op: &mut Checked<Add<'_>>) -> Result<()> {
    const OP: &str = "add";
    let (a, d) = op.parts();
    let Some(grid) = flat_grid(d.numel) else {
        return Ok(());
    };
    let args = [
        Arg::Ptr(cx.ptr(a.a)?),
        Arg::I32(act_code(OP, "a", a.a)?),
        Arg::Ptr(cx.ptr(a.b)?),
        Arg::I32(act_code(OP, "b", a.b)?),
        Arg::Ptr(cx.ptr_mut(a.out)?),
        Arg::I32(act_code(OP, "out", a.out)?),
        len(d.numel),
    ];
    cx.launch(k(&SMALL_CU, "sm_add"), grid, &args)
}

/// Byte address of element (row, col) of a `[.., ld]` matrix at `base`.
pub(crate) fn elem_addr(base: u64, row: usize, col: usize, ld: usize, size: usize) -> u64 {
    base + ((row * ld + col) * size) as u64
}

/// `copy_window`: flat over the window; the host offsets both pointers to
/// the window origins.
pub(crate) fn copy_window(cx: &dyn LaunchContext, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    const OP: &str = "copy_window";
    let (a, d) = op.parts();
    let (rows, cols) = a.size;
    let Some(grid) = flat_grid(rows * cols) else {
        return Ok(());
    };
    let (ss, ds) = (a.src.dtype().size(), a.dst.dtype().size());
    let src = elem_addr(cx.ptr(a.src)?, a.src_origin.0, a.src_origin.1, d.src.1, ss);
    let same = same_bytes(a.src, a.dst);
    let (scode, dcode) = (act_code(OP, "src", a.src)?, act_code(OP, "dst", a.dst)?);
    let dst = elem_addr(
        cx.ptr_mut(a.dst)?,
        a.dst_origin.0,
        a.dst_origin.1,
        d.dst.1,
        ds,
    );
    let args = [
        Arg::Ptr(src),
        Arg::I32(scode),
        len(d.src.1),
        Arg::Ptr(dst),
        Arg::I32(dcode),
        len(d.dst.1),
        Arg::I32(same),
        len(rows),
        len(cols),
    ];
    cx.launch(k(&ROWS_CU, "rw_copy_window"), grid, &args)
}

/// `gather_rows`: flat over dst in the widest aligned unit; index −1 (or a
/// flagged bad index) writes a zero row.
pub(crate) fn gather_rows(cx: &dyn LaunchContext, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    const OP: &str = "gather_rows";
    let (a, d) = op.parts();
    let row_bytes = d.row * a.src.dtype().size();
    if row_bytes == 0 {
        return check_index(cx, OP, "index", a.index, d.src_rows, Some(-1));
    }
    if d.rows == 0 {
        return Ok(());
    }
    let src = cx.ptr(a.src)?;
    let index = cx.ptr(a.index)?;
    let is64 = index_is64(OP, "index", a.index)?;
    let status = range_check(cx, OP, "index", a.index, d.src_rows, Some(-1))?;
    let dst = cx.ptr_mut(a.dst)?;
    let (width, units) = gather_width(row_bytes, src, dst);
    let Some(grid) = flat_grid(d.rows * units) else {
        return Ok(());
    };
    let args = [
        Arg::Ptr(src),
        Arg::Ptr(index),
        Arg::I32(is64),
        Arg::Ptr(dst),
        len(d.src_rows),
        len(d.rows),
        len(units),
        Arg::I32(width as i32),
        Arg::Ptr(status),
    ];
    cx.launch(k(&ROWS_CU, "rw_gather_rows"), grid, &args)
}

/// `reduce_rows` (SPEC.md §7): flat over out, f64 sum in slot order (cpu-ref's
/// arithmetic exactly), one rounding.
pub(crate) fn reduce_rows(cx: &dyn LaunchContext, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    const OP: &str = "reduce_rows";
    let (a, d) = op.parts();
    if d.hidden == 0 {
        return check_index(cx, OP, "index", a.index, d.src_rows, Some(-1));
    }
    let Some(grid) = flat_grid(d.tokens * d.hidden) else {
        return Ok(());
    };
    let status = range_check(cx, OP, "index", a.index, d.src_rows, Some(-1))?;
    let weights = match a.weights {
        Some(w) => cx.ptr(w)?,
        None => 0,
    };
    let args = [
        Arg::Ptr(cx.ptr(a.src)?),
        Arg::I32(act_code(OP, "src", a.src)?),
        Arg::Ptr(cx.ptr(a.index)?),
        Arg::I32(index_is64(OP, "index", a.index)?),
        Arg::Ptr(weights),
        Arg::Ptr(cx.ptr_mut(a.out)?),
        Arg::I32(act_code(OP, "out", a.out)?),
        len(d.src_rows),
        len(d.tokens),
        len(d.k),
        len(d.hidden),
        Arg::Ptr(status),
    ];
    cx.launch(k(&ROWS_CU, "rw_reduce_rows"), grid, &args)
}

/// `get_dispatch_layout` (SPEC.md §7): zero the counts, then count experts
/// (one thread per slot, ids checked) and rank membership (one thread per
/// token × rank), with integer atomics.
pub(crate) fn get_dispatch_layout(
    cx: &dyn LaunchContext,
    op: &mut Checked<GetDispatchLayout<'_>>,
) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, kk, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    if world == 0 || !e.is_multiple_of(world) {
        return Err(Error::invalid(
            OP,
            "num_experts",
            "must be a multiple of world_size",
        ));
    }
    let epr = e / world;
    let topk = cx.ptr(a.topk_idx)?;
    let is64 = index_is64(OP, "topk_idx", a.topk_idx)?;
    let per_rank = cx.ptr_mut(a.num_tokens_per_rank)?;
    let per_expert = cx.ptr_mut(a.num_tokens_per_expert)?;
    let in_rank = cx.ptr_mut(a.is_token_in_rank)?;
    for (p, count) in [(per_rank, world), (per_expert, e)] {
        if let Some(grid) = flat_grid(count) {
            cx.launch(k(&LAYOUT_CU, "ly_zero"), grid, &[Arg::Ptr(p), len(count)])?;
        }
    }
    if let Some(grid) = flat_grid(n * kk) {
        let status = range_check(cx, OP, "topk_idx", a.topk_idx, e, Some(-1))?;
        let args = [
            Arg::Ptr(topk),
            Arg::I32(is64),
            len(n),
            len(kk),
            len(e),
            Arg::Ptr(per_expert),
            Arg::Ptr(status),
        ];
        cx.launch(k(&LAYOUT_CU, "ly_expert_counts"), grid, &args)?;
    }
    if let Some(grid) = flat_grid(n * world) {
        let args = [
            Arg::Ptr(topk),
            Arg::I32(is64),
            len(n),
            len(kk),
            len(e),
            len(world),
            len(epr),
            Arg::Ptr(in_rank),
            Arg::Ptr(per_rank),
        ];
        cx.launch(k(&LAYOUT_CU, "ly_rank_membership"), grid, &args)?;
    }
    Ok(())
}
