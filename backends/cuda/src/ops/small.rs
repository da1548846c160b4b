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
        if row_bytes.is_multiple_of(wb)
            && src.is_multiple_of(w as u64)
            && dst.is_multiple_of(w as u64)
        {
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
pub fn rms_norm(cx: &dyn LaunchContext, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
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
pub fn moe_gate(cx: &dyn LaunchContext, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
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
pub fn silu_mul(cx: &dyn LaunchContext, op: &mut Checked<SiluMul<'_>>) -> Result<()> {
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
pub fn embedding(cx: &dyn LaunchContext, op: &mut Checked<Embedding<'_>>) -> Result<()> {
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
pub fn add(cx: &dyn LaunchContext, op: &mut Checked<Add<'_>>) -> Result<()> {
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
pub fn copy_window(cx: &dyn LaunchContext, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
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
pub fn gather_rows(cx: &dyn LaunchContext, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
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
pub fn reduce_rows(cx: &dyn LaunchContext, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
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
pub fn get_dispatch_layout(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Arch, Scratch, TensorMap, TmaParams};
    use deepport_core::backend::{InstanceId, Storage};
    use std::any::Any;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};

    // ---- a recording LaunchContext over fake device memory ----------------------

    /// Fake device memory: a base address, no bytes.
    struct Mem {
        base: u64,
    }
    impl Storage for Mem {
        fn backend(&self) -> &str {
            "mock"
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    /// A tensor at a fresh, 4 KiB-aligned fake address (nothing allocated,
    /// so shapes may be huge).
    fn t(dtype: DType, shape: &[usize]) -> Tensor {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let base = NEXT.fetch_add(1, Ordering::Relaxed) << 44;
        Tensor::new(dtype, shape, Box::new(Mem { base }), InstanceId::fresh())
    }

    fn base(t: &Tensor) -> u64 {
        t.storage_any::<Mem>().map_or(0, |m| m.base)
    }

    #[derive(Clone, Debug)]
    struct Launch {
        entry: &'static str,
        grid: Grid,
        args: Vec<Arg>,
    }

    #[derive(Clone, Debug)]
    struct Check {
        op: &'static str,
        arg: &'static str,
        shape: Vec<usize>,
        kind: CheckKind,
        addr: u64,
    }

    struct Rec {
        launches: RefCell<Vec<Launch>>,
        checks: RefCell<Vec<Check>>,
    }

    const STATUS_BASE: u64 = 0xfeed_0000;

    impl Rec {
        fn new() -> Self {
            Rec {
                launches: RefCell::new(Vec::new()),
                checks: RefCell::new(Vec::new()),
            }
        }
        fn entries(&self) -> Vec<&'static str> {
            self.launches.borrow().iter().map(|l| l.entry).collect()
        }
        fn only(&self, entry: &str) -> Launch {
            let l = self.launches.borrow();
            let v: Vec<_> = l.iter().filter(|l| l.entry == entry).collect();
            assert_eq!(v.len(), 1, "launches of {entry}: {:?}", self.entries());
            v[0].clone()
        }
        fn check_of(&self, arg: &str) -> Check {
            let c = self.checks.borrow();
            let v: Vec<_> = c.iter().filter(|c| c.arg == arg).collect();
            assert_eq!(v.len(), 1, "checks of {arg}: {c:?}");
            v[0].clone()
        }
    }

    fn mem_ptr(t: &Tensor) -> Result<u64> {
        let m = t
            .storage_any::<Mem>()
            .ok_or_else(|| Error::Other("not a mock tensor".into()))?;
        Ok(m.base + t.offset_bytes() as u64)
    }

    impl LaunchContext for Rec {
        fn arch(&self) -> Arch {
            Arch {
                major: 9,
                minor: 0,
                sms: 132,
                smem_optin: 227 * 1024,
            }
        }
        fn ptr(&self, t: &Tensor) -> Result<u64> {
            mem_ptr(t)
        }
        fn ptr_mut(&self, t: &mut Tensor) -> Result<u64> {
            mem_ptr(t)
        }
        fn scratch(&self, _bytes: usize) -> Result<Scratch> {
            Err(Error::Other("the small ops need no scratch".into()))
        }
        fn check(
            &self,
            op: &'static str,
            arg: &'static str,
            shape: &[usize],
            kind: CheckKind,
        ) -> Result<u64> {
            let mut c = self.checks.borrow_mut();
            let addr = STATUS_BASE + 8 * c.len() as u64;
            c.push(Check {
                op,
                arg,
                shape: shape.to_vec(),
                kind,
                addr,
            });
            Ok(addr)
        }
        fn tensor_map(&self, _params: &TmaParams) -> Result<TensorMap> {
            Err(Error::Other("the small ops use no TMA".into()))
        }
        /// Records the launch after checking what the driver would: the
        /// entry exists, the grid is within limits, the arguments match the
        /// kernel's C signature in number and kind.
        fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
            let bad = |m: String| Err(Error::Other(format!("{}: {m}", kernel.entry)));
            if !kernel.source.entries.contains(&kernel.entry) {
                return bad("not an entry of its source".into());
            }
            let (gx, gy, gz) = grid.grid;
            let (bx, by, bz) = grid.block;
            if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
                return bad(format!("bad grid {:?}", grid.grid));
            }
            if bx == 0 || by == 0 || bz == 0 || bx * by * bz > 1024 || bx % 64 != 0 {
                return bad(format!("bad block {:?}", grid.block));
            }
            if grid.smem > SMEM_DEFAULT {
                return bad(format!("smem {}", grid.smem));
            }
            let params = signature(kernel.source.text, kernel.entry)
                .ok_or_else(|| Error::Other(format!("{}: no signature", kernel.entry)))?;
            if params.len() != args.len() {
                return bad(format!("{} args for {} params", args.len(), params.len()));
            }
            for (i, (p, a)) in params.iter().zip(args).enumerate() {
                let ok = match a {
                    Arg::Ptr(_) => p.contains('*'),
                    Arg::I32(_) => p.starts_with("int "),
                    Arg::I64(_) => p.starts_with("i64 "),
                    Arg::F32(_) => p.starts_with("float "),
                    Arg::U32(_) => p.starts_with("u32 "),
                    Arg::U64(_) => p.starts_with("u64 "),
                    Arg::TensorMap(_) => false,
                };
                if !ok {
                    return bad(format!("argument {i} {a:?} for parameter `{p}`"));
                }
            }
            self.launches.borrow_mut().push(Launch {
                entry: kernel.entry,
                grid,
                args: args.to_vec(),
            });
            Ok(())
        }
    }

    /// The parameters of `extern "C" DP_GLOBAL void entry(...)` in `text`.
    fn signature(text: &str, entry: &str) -> Option<Vec<String>> {
        let head = format!("extern \"C\" DP_GLOBAL void {entry}(");
        let start = text.find(&head)? + head.len();
        let end = start + text[start..].find(')')?;
        Some(
            text[start..end]
                .split(',')
                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|p| !p.is_empty())
                .collect(),
        )
    }

    fn ptr_arg(a: &Arg) -> u64 {
        match a {
            Arg::Ptr(p) => *p,
            other => panic!("not a pointer: {other:?}"),
        }
    }
    fn i32_arg(a: &Arg) -> i32 {
        match a {
            Arg::I32(v) => *v,
            other => panic!("not an i32: {other:?}"),
        }
    }
    fn i64_arg(a: &Arg) -> i64 {
        match a {
            Arg::I64(v) => *v,
            other => panic!("not an i64: {other:?}"),
        }
    }

    /// Threads a launch runs (grid-stride kernels cover any count with ≥ 1).
    fn threads(g: &Grid) -> u64 {
        g.grid.0 as u64 * g.block.0 as u64
    }

    // ---- Rust mirrors of the kernels' arithmetic, against cpu-ref ----------------

    /// xorshift64*: deterministic test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// `sm_round_odd_f32` / `rw_round_odd_f32` of the kernels.
    fn round_odd_f32(v: f64) -> f32 {
        let t = v as f32;
        if t as f64 == v || v.is_nan() {
            return t;
        }
        let mut b = t.to_bits();
        if (t as f64).abs() > v.abs() {
            b -= 1;
        }
        f32::from_bits(b | 1)
    }

    #[test]
    fn round_odd_then_nearest_even_is_cpu_refs_single_rounding() {
        use deepport_cpu::scalar::dense::round_f64;
        use deepport_cpu::scalar::ep::round_once;
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut checked = 0;
        for i in 0..200_000 {
            // Random f64s, and f64s just around bf16/f16 midpoints.
            let v = if i % 2 == 0 {
                let e = rng.below(80) as i32 - 40;
                let m = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 + 1.0;
                let s = if rng.next() & 1 == 1 { -1.0 } else { 1.0 };
                s * m * 2f64.powi(e)
            } else {
                let base = half::bf16::from_bits((rng.next() & 0x7f7f) as u16).to_f64();
                let half_ulp = base.abs() * 2f64.powi(-8);
                base + half_ulp * [1.0, -1.0][rng.below(2)]
                    + [0.0, 1e-30, -1e-30][rng.below(3)] * base
            };
            let bf = half::bf16::from_f32(round_odd_f32(v)).to_f32();
            assert_eq!(
                bf.to_bits(),
                round_once(DType::BF16, v).to_bits(),
                "bf16 {v:e}"
            );
            assert_eq!(
                bf.to_bits(),
                round_f64(DType::BF16, v).to_bits(),
                "bf16 {v:e}"
            );
            let h = half::f16::from_f32(round_odd_f32(v)).to_f32();
            assert_eq!(h.to_bits(), round_f64(DType::F16, v).to_bits(), "f16 {v:e}");
            checked += 1;
        }
        assert_eq!(checked, 200_000);
    }

    /// total_cmp's order as an unsigned key (`gt_key32` / `gt_key64`).
    fn key32(v: f32) -> u32 {
        let b = v.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }
    fn key64(v: f64) -> u64 {
        let b = v.to_bits();
        if b & (1 << 63) != 0 {
            !b
        } else {
            b | (1 << 63)
        }
    }

    /// Thread 0 of `gt_moe_gate`, line for line.
    fn gate_select_kernel(
        sb: &[f32],
        n_group: usize,
        topk_group: usize,
        topk: usize,
    ) -> Vec<usize> {
        let e = sb.len();
        let gsz = e / n_group;
        let mut gs = vec![0f64; n_group];
        for (g, gsc) in gs.iter_mut().enumerate() {
            let (mut b0, mut b1): (Option<usize>, Option<usize>) = (None, None);
            for ex in g * gsz..(g + 1) * gsz {
                let kk = key32(sb[ex]);
                if b0.is_none_or(|b| kk > key32(sb[b])) {
                    b1 = b0;
                    b0 = Some(ex);
                } else if b1.is_none_or(|b| kk > key32(sb[b])) {
                    b1 = Some(ex);
                }
            }
            *gsc = sb[b0.unwrap()] as f64 + sb[b1.unwrap()] as f64;
        }
        let mut gkeep = vec![false; n_group];
        for _ in 0..topk_group {
            let mut best: Option<usize> = None;
            for g in 0..n_group {
                if !gkeep[g] && best.is_none_or(|b| key64(gs[g]) > key64(gs[b])) {
                    best = Some(g);
                }
            }
            gkeep[best.unwrap()] = true;
        }
        let mut taken = vec![false; e];
        let mut out = Vec::new();
        for _ in 0..topk {
            let mut best: Option<usize> = None;
            for ex in 0..e {
                if taken[ex] || !gkeep[ex / gsz] {
                    continue;
                }
                if best.is_none_or(|b| key32(sb[ex]) > key32(sb[b])) {
                    best = Some(ex);
                }
            }
            taken[best.unwrap()] = true;
            out.push(best.unwrap());
        }
        out
    }

    /// cpu-ref's selection (backends/cpu/src/scalar/dense.rs, `route_token`).
    fn gate_select_ref(sb: &[f32], n_group: usize, topk_group: usize, topk: usize) -> Vec<usize> {
        let gsz = sb.len() / n_group;
        let mut gscore: Vec<(f64, usize)> = (0..n_group)
            .map(|grp| {
                let mut v: Vec<f32> = sb[grp * gsz..(grp + 1) * gsz].to_vec();
                v.sort_by(|p, q| q.total_cmp(p));
                (v[0] as f64 + v[1] as f64, grp)
            })
            .collect();
        gscore.sort_by(|p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)));
        let mut kept: Vec<usize> = Vec::new();
        for &(_, grp) in &gscore[..topk_group] {
            kept.extend(grp * gsz..(grp + 1) * gsz);
        }
        kept.sort_by(|&p, &q| sb[q].total_cmp(&sb[p]).then(p.cmp(&q)));
        kept[..topk].to_vec()
    }

    #[test]
    fn gate_selection_matches_cpu_ref_including_ties() {
        let mut rng = Rng(42);
        for case in 0..3000 {
            let (e, n_group, topk_group, topk) = match case % 4 {
                0 => (256, 8, 4, 8),
                1 => (64, 8, 4, 8),
                2 => (32, 4, 2, 6),
                _ => (64, 1, 1, 8),
            };
            // Few distinct values: many exact ties among experts and groups.
            let levels = [0.25f32, 0.5, 0.75, 0.125, 1.0, -0.5, 0.0];
            let nl = 1 + case % levels.len();
            let sb: Vec<f32> = (0..e).map(|_| levels[rng.below(nl)]).collect();
            assert_eq!(
                gate_select_kernel(&sb, n_group, topk_group, topk),
                gate_select_ref(&sb, n_group, topk_group, topk),
                "case {case}: {sb:?}"
            );
        }
    }

    // ---- sources -------------------------------------------------------------------

    #[test]
    fn sources_declare_exactly_their_entries_and_include_only_port_cuh() {
        assert_eq!(SOURCES.len(), 4);
        for s in SOURCES {
            assert_eq!(s.target, Target::Portable, "{}", s.name);
            let defined = s.text.matches("extern \"C\" DP_GLOBAL void ").count();
            assert_eq!(defined, s.entries.len(), "{}", s.name);
            for e in s.entries {
                assert!(signature(s.text, e).is_some(), "{}: {e}", s.name);
            }
            for line in s
                .text
                .lines()
                .filter(|l| l.trim_start().starts_with("#include"))
            {
                assert_eq!(line.trim(), "#include \"port.cuh\"", "{}", s.name);
            }
            // Portable: no hard-coded warp width, no inline PTX.
            assert!(!s.text.contains("asm("), "{}", s.name);
            assert!(!s.text.contains("0xffffffff,"), "{}", s.name);
            assert!(!s.text.contains("__shfl_xor_sync"), "{}", s.name);
        }
    }

    #[test]
    fn signature_parser_reads_kinds() {
        let p = signature(SMALL_CU.text, "sm_add").unwrap();
        assert_eq!(p.len(), 7);
        assert!(p[0].contains('*') && p[1].starts_with("int ") && p[6].starts_with("i64 "));
    }

    // ---- geometry --------------------------------------------------------------

    #[test]
    fn grids_cover_or_stride() {
        assert!(flat_grid(0).is_none());
        for n in [1usize, 255, 256, 257, 1 << 20, (1 << 24) - 3] {
            let g = flat_grid(n).unwrap();
            assert!(threads(&g) >= n as u64, "{n}: {g:?}");
            assert!(threads(&g) < n as u64 + BLOCK as u64);
        }
        // Past MAX_BLOCKS blocks the kernels loop (grid-stride): capped grid.
        let huge = 3usize << 33;
        let g = flat_grid(huge).unwrap();
        assert_eq!(g.grid, (MAX_BLOCKS, 1, 1));
        assert_eq!(blocks_for(70_000, 1), Some(MAX_BLOCKS));
        assert_eq!(blocks_for(5, 1), Some(5));
        assert_eq!(row_block(1), 64);
        assert_eq!(row_block(65), 128);
        assert_eq!(row_block(7168), BLOCK);
    }

    #[test]
    fn gather_width_is_widest_aligned_unit() {
        assert_eq!(gather_width(1152, 0x1000, 0x2000), (16, 72));
        assert_eq!(gather_width(1152, 0x1008, 0x2000), (8, 144));
        assert_eq!(gather_width(6, 0x1000, 0x2000), (2, 3));
        assert_eq!(gather_width(7, 0x1000, 0x2000), (1, 7));
        assert_eq!(gather_width(16, 0x1001, 0x2000), (1, 16));
        assert_eq!(gather_width(12, 0x1000, 0x2004), (4, 3));
    }

    #[test]
    fn element_addresses() {
        assert_eq!(elem_addr(1000, 0, 0, 7, 2), 1000);
        assert_eq!(elem_addr(1000, 2, 3, 7, 2), 1000 + (2 * 7 + 3) * 2);
    }

    // ---- ops -------------------------------------------------------------------------

    #[test]
    fn rms_norm_one_block_per_row_on_a_view() {
        let big = t(DType::BF16, &[40, 300]);
        let x = big.view(300 * 3, &[3, 5, 300]).unwrap();
        let w = t(DType::F32, &[300]);
        let mut y = t(DType::BF16, &[3, 5, 300]);
        let mut op = RmsNorm {
            x: &x,
            weight: &w,
            y: &mut y,
            eps: 1e-6,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        rms_norm(&rec, &mut op).unwrap();
        let l = rec.only("sm_rms_norm");
        assert_eq!(l.grid.grid, (15, 1, 1));
        assert_eq!(l.grid.block.0, 256);
        assert_eq!(ptr_arg(&l.args[0]), base(&big) + 300 * 3 * 2);
        assert_eq!(i32_arg(&l.args[1]), 1);
        assert_eq!(i32_arg(&l.args[3]), 0);
        assert_eq!(i64_arg(&l.args[6]), 15);
        assert_eq!(i64_arg(&l.args[7]), 300);
        assert!(rec.checks.borrow().is_empty());
    }

    #[test]
    fn rms_norm_many_rows_stride() {
        let x = t(DType::F32, &[100_000, 64]);
        let w = t(DType::F32, &[64]);
        let mut y = t(DType::F32, &[100_000, 64]);
        let mut op = RmsNorm {
            x: &x,
            weight: &w,
            y: &mut y,
            eps: 1e-6,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        rms_norm(&rec, &mut op).unwrap();
        let l = rec.only("sm_rms_norm");
        assert_eq!(l.grid.grid.0, MAX_BLOCKS);
        assert_eq!(l.grid.block.0, 64);
    }

    fn gate_case(bias: bool, idx: DType, experts: usize) -> (Rec, Result<()>) {
        let x = t(DType::BF16, &[20, 96]);
        let w = t(DType::BF16, &[experts, 96]);
        let b = t(DType::F32, &[experts]);
        let mut ti = t(idx, &[20, 8]);
        let mut tw = t(DType::F32, &[20, 8]);
        let mut op = MoeGate {
            x: &x,
            weight: &w,
            bias: bias.then_some(&b),
            topk_idx: &mut ti,
            topk_weights: &mut tw,
            n_group: 8,
            topk_group: 4,
            topk: 8,
            route_scale: 2.5,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        let r = moe_gate(&rec, &mut op);
        (rec, r)
    }

    #[test]
    fn moe_gate_checks_inputs_finite_then_gates() {
        let (rec, r) = gate_case(true, DType::I64, 64);
        r.unwrap();
        assert_eq!(
            rec.entries(),
            [
                "sm_check_finite",
                "sm_check_finite",
                "sm_check_finite",
                "gt_moe_gate"
            ]
        );
        for (arg, shape) in [
            ("x", vec![20, 96]),
            ("weight", vec![64, 96]),
            ("bias", vec![64]),
        ] {
            let c = rec.check_of(arg);
            assert_eq!(c.op, "moe_gate");
            assert_eq!(c.shape, shape);
            assert!(matches!(c.kind, CheckKind::Finite));
        }
        // Each check kernel writes its own status entry and covers its tensor.
        let l = rec.launches.borrow();
        for (i, arg) in ["x", "weight", "bias"].iter().enumerate() {
            assert_eq!(ptr_arg(&l[i].args[3]), rec.check_of(arg).addr);
            assert!(threads(&l[i].grid) >= i64_arg(&l[i].args[1]) as u64);
        }
        let g = &l[3];
        assert_eq!(g.grid.grid, (20, 1, 1));
        assert_eq!(g.grid.smem as usize, gate_smem(64, 8));
        assert_ne!(ptr_arg(&g.args[4]), 0);
        assert_eq!(i32_arg(&g.args[6]), 1);
        assert_eq!(i32_arg(&g.args[10]), 64);
    }

    #[test]
    fn moe_gate_without_bias_and_i32_ids() {
        let (rec, r) = gate_case(false, DType::I32, 64);
        r.unwrap();
        assert_eq!(rec.checks.borrow().len(), 2);
        let g = rec.only("gt_moe_gate");
        assert_eq!(ptr_arg(&g.args[4]), 0);
        assert_eq!(i32_arg(&g.args[6]), 0);
    }

    #[test]
    fn moe_gate_too_many_experts_is_an_error_not_a_bad_launch() {
        let (rec, r) = gate_case(true, DType::I64, 8 * 1024);
        assert!(matches!(r, Err(Error::NotSupported { .. })), "{r:?}");
        assert!(!rec.entries().contains(&"gt_moe_gate"));
    }

    #[test]
    fn elementwise_mixed_dtypes_and_huge_tensors() {
        let a = t(DType::BF16, &[13, 70]);
        let b = t(DType::F32, &[13, 70]);
        let mut out = t(DType::F32, &[13, 70]);
        let mut op = Add {
            a: &a,
            b: &b,
            out: &mut out,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        add(&rec, &mut op).unwrap();
        let l = rec.only("sm_add");
        assert_eq!((i32_arg(&l.args[1]), i32_arg(&l.args[3])), (1, 0));
        assert_eq!(i32_arg(&l.args[5]), 0);
        assert!(threads(&l.grid) >= 13 * 70);

        let n = 5usize << 30; // past i32 and u32 element indices
        let g = t(DType::F16, &[n]);
        let u = t(DType::F16, &[n]);
        let mut o = t(DType::F16, &[n]);
        let mut op = SiluMul {
            gate: &g,
            up: &u,
            out: &mut o,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        silu_mul(&rec, &mut op).unwrap();
        let l = rec.only("sm_silu_mul");
        assert_eq!(i64_arg(&l.args[6]), n as i64);
        assert_eq!(l.grid.grid.0, MAX_BLOCKS);
        assert_eq!(i32_arg(&l.args[1]), 2);
    }

    #[test]
    fn empty_tensors_launch_nothing() {
        let a = t(DType::BF16, &[0, 70]);
        let b = t(DType::BF16, &[0, 70]);
        let mut out = t(DType::BF16, &[0, 70]);
        let mut op = Add {
            a: &a,
            b: &b,
            out: &mut out,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        add(&rec, &mut op).unwrap();
        assert!(rec.entries().is_empty());
    }

    #[test]
    fn embedding_checks_ids_and_copies_raw_when_dtypes_agree() {
        for (ids_dt, out_dt) in [(DType::I64, DType::BF16), (DType::I32, DType::F32)] {
            let table = t(DType::BF16, &[129_280, 128]);
            let ids = t(ids_dt, &[33]);
            let mut out = t(out_dt, &[33, 128]);
            let mut op = Embedding {
                table: &table,
                ids: &ids,
                out: &mut out,
            }
            .check()
            .unwrap();
            let rec = Rec::new();
            embedding(&rec, &mut op).unwrap();
            let c = rec.check_of("ids");
            assert_eq!(c.shape, [33]);
            assert!(matches!(
                c.kind,
                CheckKind::Range {
                    lo: 0,
                    hi: 129_280,
                    allow: None
                }
            ));
            let l = rec.only("rw_embedding");
            assert_eq!(l.grid.grid.0, 33);
            assert_eq!(l.grid.block.0, 128);
            assert_eq!(i32_arg(&l.args[3]), (ids_dt == DType::I64) as i32);
            let same = if out_dt == DType::BF16 { 2 } else { 0 };
            assert_eq!(i32_arg(&l.args[6]), same);
            assert_eq!(ptr_arg(&l.args[10]), c.addr);
        }
    }

    #[test]
    fn copy_window_offsets_views_and_origins() {
        let big = t(DType::F32, &[100]);
        let src = big.view(10, &[6, 10]).unwrap();
        let mut dst = t(DType::BF16, &[8, 2, 4]); // viewed as [16, 4]
        let mut op = CopyWindow {
            src: &src,
            dst: &mut dst,
            src_origin: (2, 4),
            dst_origin: (4, 1),
            size: (3, 3),
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        copy_window(&rec, &mut op).unwrap();
        let l = rec.only("rw_copy_window");
        assert_eq!(ptr_arg(&l.args[0]), base(&big) + (10 + 2 * 10 + 4) * 4);
        assert_eq!(i64_arg(&l.args[2]), 10);
        assert_eq!(ptr_arg(&l.args[3]), base(&dst) + (4 * 4 + 1) * 2);
        assert_eq!(i64_arg(&l.args[5]), 4);
        assert_eq!(i32_arg(&l.args[6]), 0);
        assert_eq!((i64_arg(&l.args[7]), i64_arg(&l.args[8])), (3, 3));
        assert!(threads(&l.grid) >= 9);
    }

    #[test]
    fn gather_rows_checks_index_allowing_minus_one() {
        let big = t(DType::BF16, &[64 * 576 + 4]);
        // A view 4 elements (8 bytes) in: only 8-byte units stay aligned.
        let src = big.view(4, &[64, 576]).unwrap();
        let index = t(DType::I32, &[48]);
        let mut dst = t(DType::BF16, &[48, 576]);
        let mut op = GatherRows {
            src: &src,
            index: &index,
            dst: &mut dst,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        gather_rows(&rec, &mut op).unwrap();
        let c = rec.check_of("index");
        assert_eq!(c.shape, [48]);
        assert!(matches!(
            c.kind,
            CheckKind::Range {
                lo: 0,
                hi: 64,
                allow: Some(-1)
            }
        ));
        let l = rec.only("rw_gather_rows");
        assert_eq!(ptr_arg(&l.args[0]), base(&big) + 8);
        assert_eq!(i32_arg(&l.args[7]), 8);
        assert_eq!(i64_arg(&l.args[6]), 576 * 2 / 8);
        assert!(threads(&l.grid) >= 48 * 576 * 2 / 8);
        assert_eq!(ptr_arg(&l.args[8]), c.addr);
    }

    #[test]
    fn gather_rows_of_empty_rows_still_checks_the_index() {
        let src = t(DType::U8, &[5, 0]);
        let index = t(DType::I64, &[3]);
        let mut dst = t(DType::U8, &[3, 0]);
        let mut op = GatherRows {
            src: &src,
            index: &index,
            dst: &mut dst,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        gather_rows(&rec, &mut op).unwrap();
        let l = rec.only("rw_check_index");
        assert_eq!(i32_arg(&l.args[1]), 1);
        assert_eq!(i64_arg(&l.args[4]), 5);
        assert_eq!((i32_arg(&l.args[5]), i64_arg(&l.args[6])), (1, -1));
        assert_eq!(ptr_arg(&l.args[7]), rec.check_of("index").addr);
    }

    #[test]
    fn reduce_rows_flat_with_and_without_weights() {
        for weighted in [true, false] {
            let src = t(DType::BF16, &[40, 256]);
            let index = t(DType::I64, &[12, 4]);
            let w = t(DType::F32, &[12, 4]);
            let mut out = t(DType::BF16, &[12, 256]);
            let mut op = ReduceRows {
                src: &src,
                index: &index,
                weights: weighted.then_some(&w),
                out: &mut out,
            }
            .check()
            .unwrap();
            let rec = Rec::new();
            reduce_rows(&rec, &mut op).unwrap();
            let c = rec.check_of("index");
            assert_eq!(c.shape, [12, 4]);
            assert!(matches!(
                c.kind,
                CheckKind::Range {
                    lo: 0,
                    hi: 40,
                    allow: Some(-1)
                }
            ));
            let l = rec.only("rw_reduce_rows");
            assert_eq!(ptr_arg(&l.args[4]) != 0, weighted);
            assert!(threads(&l.grid) >= 12 * 256);
            assert_eq!(i64_arg(&l.args[9]), 4);
            assert_eq!(ptr_arg(&l.args[11]), c.addr);
        }
    }

    #[test]
    fn dispatch_layout_zeroes_counts_then_counts() {
        let topk = t(DType::I64, &[12, 4]);
        let mut per_rank = t(DType::I32, &[4]);
        let mut per_expert = t(DType::I32, &[16]);
        let mut in_rank = t(DType::Bool, &[12, 4]);
        let mut op = GetDispatchLayout {
            topk_idx: &topk,
            num_tokens_per_rank: &mut per_rank,
            num_tokens_per_expert: &mut per_expert,
            is_token_in_rank: &mut in_rank,
            num_experts: 16,
            world_size: 4,
        }
        .check()
        .unwrap();
        let rec = Rec::new();
        get_dispatch_layout(&rec, &mut op).unwrap();
        assert_eq!(
            rec.entries(),
            [
                "ly_zero",
                "ly_zero",
                "ly_expert_counts",
                "ly_rank_membership"
            ]
        );
        let c = rec.check_of("topk_idx");
        assert_eq!(c.shape, [12, 4]);
        assert!(matches!(
            c.kind,
            CheckKind::Range {
                lo: 0,
                hi: 16,
                allow: Some(-1)
            }
        ));
        let l = rec.launches.borrow();
        let zeroed: Vec<_> = l[..2]
            .iter()
            .map(|l| (ptr_arg(&l.args[0]), i64_arg(&l.args[1])))
            .collect();
        assert_eq!(zeroed, [(base(&per_rank), 4), (base(&per_expert), 16)]);
        assert_eq!(ptr_arg(&l[2].args[5]), base(&per_expert));
        assert_eq!(ptr_arg(&l[2].args[6]), c.addr);
        assert!(threads(&l[2].grid) >= 48);
        assert_eq!(i64_arg(&l[3].args[6]), 4); // experts per rank
        assert!(threads(&l[3].grid) >= 48);
    }
}
