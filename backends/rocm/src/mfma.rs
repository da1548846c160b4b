//! The MFMA paths: where the CUDA backend uses wgmma (Hopper), the ROCm
//! backend uses CDNA's matrix cores. Today: the three FP8 GEMMs — dense,
//! grouped contiguous and grouped masked — in one kernel
//! (`kernels/fp8_gemm_mfma.cu`, `v_mfma_f32_32x32x8bf16_1k`, e4m3 and
//! e4m3fnuz decoded to bf16 in registers, f32 promotion per 128-wide K
//! block with the 1x128 / 128x128 scales; the layout as the CUDA kernels'
//! `mode`). Selected by architecture ([`has_mfma_bf16_1k`]); elsewhere
//! the portable kernel of the CUDA glue runs. The grouped GEMMs'
//! index tensors get the CUDA glue's deferred range check
//! (`glue::check_index`) before the launch. MLA decode runs the CUDA
//! glue's portable kernel (no MFMA path yet).
//!
//! Checked here: hiprtc (ROCm 5.2) compiles the source for gfx90a, the
//! glue's launches are checked on the CPU, and the kernel itself runs on
//! the CPU in the host emulation (`emu/fp8_mfma.cpp`, `tests/emulate.rs`:
//! the CUDA backend's emu.h with 64-wide wavefronts and a model of the
//! instruction, `emu/mfma_cdna.h`) against a double reference in every
//! layout. Unchecked here: gfx940/941/942
//! and gfx950 (ROCm 5.2's hiprtc aborts on them, see
//! [`crate::hiprtc::ROCM5_ARCHS`]), and the numerics on a device (no AMD
//! GPU was available).

use crate::device::RocmCx;
use deepport_core::backend::Tensor;
use deepport_core::ops::{Checked, Fp8Gemm, Fp8GroupedContiguous, Fp8GroupedMasked, GemmDims};
use deepport_core::{DType, Error, Result};
use deepport_cuda::launch::{Arg, Grid, Kernel, KernelSource, LaunchContext, Target};
use deepport_cuda::ops::glue;
use deepport_cuda::schedule::gemm::Layout;

/// The FP8 GEMM on matrix cores (a HIP-only source: `Target::Portable`
/// here only means "not sm_90a"; [`sources_for`] gates it by arch).
pub static FP8_GEMM_MFMA: KernelSource = KernelSource {
    name: "fp8_gemm_mfma.cu",
    text: include_str!("../kernels/fp8_gemm_mfma.cu"),
    target: Target::Portable,
    entries: &["fp8_gemm_mfma"],
};

/// Output tile of one workgroup.
pub const TILE: usize = 64;

/// Whether `gfx` has `v_mfma_f32_32x32x8bf16_1k` (CDNA 2 and later).
pub fn has_mfma_bf16_1k(gfx: &str) -> bool {
    let base = gfx.split(':').next().unwrap_or(gfx);
    matches!(base, "gfx90a" | "gfx940" | "gfx941" | "gfx942" | "gfx950")
}

/// The ROCm-only sources that compile for `gfx`.
pub fn sources_for(gfx: &str) -> Vec<&'static KernelSource> {
    if has_mfma_bf16_1k(gfx) {
        vec![&FP8_GEMM_MFMA]
    } else {
        Vec::new()
    }
}

fn dtype_code(op: &'static str, t: &Tensor) -> Result<i32> {
    match t.dtype() {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(Error::invalid(
            op,
            "d",
            format!("dtype {other} has no kernel code"),
        )),
    }
}

fn i64_arg(op: &'static str, v: usize) -> Result<Arg> {
    i64::try_from(v)
        .map(Arg::I64)
        .map_err(|_| Error::invalid(op, "a", format!("size {v} beyond i64")))
}

/// The grid of an `m x n` problem over `z` workgroup layers (the groups
/// of the masked layout, else 1), or `None` when it does not fit (then
/// the portable kernel runs).
pub fn grid(m: usize, n: usize, z: usize) -> Option<Grid> {
    let gx = u32::try_from(m.div_ceil(TILE)).ok()?;
    let gy = u32::try_from(n.div_ceil(TILE)).ok()?;
    let gz = u32::try_from(z).ok()?;
    (gx > 0 && gy > 0 && gz > 0 && gx <= i32::MAX as u32 && gy <= 65535 && gz <= 65535).then_some(
        Grid {
            grid: (gx, gy, gz),
            block: (256, 1, 1),
            smem: 0,
        },
    )
}

/// One MFMA launch: the operands of any of the three FP8 GEMMs, with the
/// layout's index tensor (`m_indices` / `masked_m`) where it has one.
struct Launch<'t> {
    op: &'static str,
    layout: Layout,
    a: &'t Tensor,
    sa: &'t Tensor,
    b: &'t Tensor,
    sb: &'t Tensor,
    idx: Option<&'t Tensor>,
    dims: GemmDims,
}

/// The MFMA kernel's grid for a problem of `layout` on `cx`, or `None`
/// when the arch lacks the instruction, the problem is empty or the grid
/// does not fit (then the portable glue runs).
fn plan(cx: &RocmCx, layout: Layout, dims: &GemmDims) -> Option<Grid> {
    let z = if layout == Layout::Masked {
        dims.groups
    } else {
        1
    };
    if !has_mfma_bf16_1k(cx.gfx()) || dims.k == 0 {
        return None;
    }
    grid(dims.m, dims.n, z)
}

/// Launches the MFMA kernel on grid `g` (from [`plan`]).
fn launch(cx: &RocmCx, g: Grid, l: &Launch<'_>, d: &mut Tensor) -> Result<()> {
    let GemmDims { groups, m, n, k } = l.dims;
    let fnuz = i32::from(l.a.dtype() == DType::F8E4M3Fnuz);
    let (idx, idx64) = match l.idx {
        Some(t) => (
            Arg::Ptr(cx.ptr(t)?),
            Arg::I32(i32::from(t.dtype() == DType::I64)),
        ),
        None => (Arg::Ptr(0), Arg::I32(0)),
    };
    let launch_args = [
        Arg::Ptr(cx.ptr(l.a)?),
        Arg::Ptr(cx.ptr(l.sa)?),
        Arg::Ptr(cx.ptr(l.b)?),
        Arg::Ptr(cx.ptr(l.sb)?),
        Arg::I32(fnuz),
        Arg::Ptr(cx.ptr_mut(d)?),
        Arg::I32(dtype_code(l.op, d)?),
        idx,
        idx64,
        Arg::I32(l.layout.code()),
        i64_arg(l.op, m)?,
        i64_arg(l.op, n)?,
        i64_arg(l.op, k)?,
        i64_arg(l.op, groups)?,
    ];
    cx.launch(
        Kernel {
            source: &FP8_GEMM_MFMA,
            entry: "fp8_gemm_mfma",
        },
        g,
        &launch_args,
    )
}

/// `fp8_gemm` (SPEC.md §3) on `cx`: the MFMA kernel where the arch has
/// it, else the CUDA backend's glue (the portable tiled kernel).
pub fn fp8_gemm(cx: &RocmCx, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let dims = op.dims().clone();
    if dims.m == 0 || dims.n == 0 {
        return Ok(());
    }
    let Some(g) = plan(cx, Layout::Dense, &dims) else {
        return glue::fp8_gemm(cx, op);
    };
    let (args, _) = op.parts();
    let l = Launch {
        op: "fp8_gemm",
        layout: Layout::Dense,
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: None,
        dims,
    };
    launch(cx, g, &l, args.d)
}

/// `fp8_grouped_contiguous` (SPEC.md §3.1): `m_indices` range-checked on
/// the device (deferred, as the CUDA glue does), then the MFMA kernel in
/// its contiguous mode where the arch has it.
pub fn fp8_grouped_contiguous(
    cx: &RocmCx,
    op: &mut Checked<Fp8GroupedContiguous<'_>>,
) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let dims = op.dims().clone();
    let Some(g) = plan(cx, Layout::Contiguous, &dims) else {
        return glue::fp8_grouped_contiguous(cx, op);
    };
    let (args, _) = op.parts();
    let groups = i64::try_from(dims.groups).unwrap_or(i64::MAX);
    glue::check_index(cx, OP, "m_indices", args.m_indices, 0, groups, Some(-1))?;
    let l = Launch {
        op: OP,
        layout: Layout::Contiguous,
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: Some(args.m_indices),
        dims,
    };
    launch(cx, g, &l, args.d)
}

/// `fp8_grouped_masked` (SPEC.md §3.2): `masked_m` range-checked on the
/// device (deferred), then the MFMA kernel with one workgroup layer per
/// group where the arch has it.
pub fn fp8_grouped_masked(cx: &RocmCx, op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let dims = op.dims().clone();
    let Some(g) = plan(cx, Layout::Masked, &dims) else {
        return glue::fp8_grouped_masked(cx, op);
    };
    let (args, _) = op.parts();
    let rows = i64::try_from(dims.m).unwrap_or(i64::MAX - 1);
    glue::check_index(cx, OP, "masked_m", args.masked_m, 0, rows + 1, None)?;
    let l = Launch {
        op: OP,
        layout: Layout::Masked,
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: Some(args.masked_m),
        dims,
    };
    launch(cx, g, &l, args.d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{backend, fake_compiler};
    use deepport_core::backend::Backend;
    use deepport_core::ops::run;
    use deepport_core::HostTensor;

    fn required() -> bool {
        std::env::var("DEEPPORT_REQUIRE").is_ok_and(|v| v.split([',', ' ']).any(|t| t == "hiprtc"))
    }

    #[test]
    fn the_mfma_source_compiles_for_gfx90a_with_wavefront_64() {
        if let Err(why) = crate::hiprtc::probe() {
            assert!(!required(), "DEEPPORT_REQUIRE names hiprtc, but: {why}");
            println!("skipped: {why}");
            return;
        }
        let c = crate::hiprtc::compile(FP8_GEMM_MFMA.name, FP8_GEMM_MFMA.text, "gfx90a").unwrap();
        let co = crate::elf::parse(&c.code).unwrap();
        assert_eq!(co.gfx, Some("gfx90a"));
        assert_eq!(co.kernels, vec!["fp8_gemm_mfma".to_string()]);
        assert_eq!(co.wavefront_sizes, vec![64]);
        // The matrix-core instruction is in the code: a VOP3P-MAI word with
        // opcode 0xD3E6 in its high half (what llvm-objdump --mcpu=gfx90a
        // prints as v_mfma_f32_32x32x8bf16_1k).
        let mfma = c
            .code
            .chunks_exact(4)
            .filter(|w| w[3] == 0xd3 && w[2] == 0xe6)
            .count();
        assert!(mfma >= 1, "no v_mfma_f32_32x32x8bf16_1k in the code object");
        // gfx908 has no bf16_1k MFMA: the source refuses it.
        let e = crate::hiprtc::compile(FP8_GEMM_MFMA.name, FP8_GEMM_MFMA.text, "gfx908")
            .unwrap_err()
            .to_string();
        assert!(e.contains("v_mfma_f32_32x32x8bf16_1k"), "{e}");
    }

    fn fp8_gemm_on(gfx: &str, m: usize, n: usize, k: usize, dt: DType) -> Vec<(String, Grid)> {
        let (fake, b) = backend(gfx, fake_compiler);
        let kb = k.div_ceil(128);
        let a = b.alloc(dt, &[m, k]).unwrap();
        let sa = b.upload(&HostTensor::zeros(DType::F32, &[m, kb])).unwrap();
        let w = b.alloc(dt, &[n, k]).unwrap();
        let sb = b
            .upload(&HostTensor::zeros(DType::F32, &[n.div_ceil(128), kb]))
            .unwrap();
        let mut d = b.alloc(DType::BF16, &[m, n]).unwrap();
        run(
            &b,
            Fp8Gemm {
                a: &a,
                sa: &sa,
                b: &w,
                sb: &sb,
                d: &mut d,
            },
        )
        .unwrap();
        fake.launches()
            .into_iter()
            .map(|l| {
                (
                    l.entry,
                    Grid {
                        grid: l.grid,
                        block: l.block,
                        smem: l.smem,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn selected_by_arch() {
        for gfx in ["gfx90a", "gfx942:sramecc+:xnack-", "gfx950"] {
            let l = fp8_gemm_on(gfx, 130, 7168, 1536, DType::F8E4M3);
            assert_eq!(l.len(), 1, "{l:?}");
            assert_eq!(l[0].0, "fp8_gemm_mfma");
            assert_eq!(l[0].1.grid, (3, 112, 1));
            assert_eq!(l[0].1.block, (256, 1, 1));
        }
        let l = fp8_gemm_on("gfx908", 130, 7168, 1536, DType::F8E4M3);
        assert_eq!(l[0].0, "gemm_fp8_tiled");
        let l = fp8_gemm_on("gfx1030", 1, 64, 100, DType::F8E4M3Fnuz);
        assert_eq!(l[0].0, "gemm_fp8_tiled");
        assert!(fp8_gemm_on("gfx90a", 0, 64, 128, DType::F8E4M3).is_empty());
        assert_eq!(sources_for("gfx90a").len(), 1);
        assert!(sources_for("gfx908").is_empty());
        assert!(grid(1, 64 * 65536, 1).is_none());
        assert!(grid(1, 64, 65536).is_none());
    }

    fn entries(fake: &crate::fake::Fake) -> Vec<(String, (u32, u32, u32), usize)> {
        fake.launches()
            .into_iter()
            .map(|l| (l.entry, l.grid, l.params))
            .collect()
    }

    /// The grouped GEMMs on `gfx`: (contiguous launches, masked launches).
    #[allow(clippy::type_complexity)]
    fn grouped_on(
        gfx: &str,
    ) -> (
        Vec<(String, (u32, u32, u32), usize)>,
        Vec<(String, (u32, u32, u32), usize)>,
    ) {
        let (g, m, n, k) = (3usize, 200usize, 256usize, 384usize);
        let kb = k.div_ceil(128);
        let (fake, b) = backend(gfx, fake_compiler);
        let w = b.alloc(DType::F8E4M3, &[g, n, k]).unwrap();
        let sb = b
            .upload(&HostTensor::zeros(DType::F32, &[g, n.div_ceil(128), kb]))
            .unwrap();
        let a = b.alloc(DType::F8E4M3, &[m, k]).unwrap();
        let sa = b.upload(&HostTensor::zeros(DType::F32, &[m, kb])).unwrap();
        let idx = b.upload(&HostTensor::zeros(DType::I32, &[m])).unwrap();
        let mut d = b.alloc(DType::BF16, &[m, n]).unwrap();
        run(
            &b,
            Fp8GroupedContiguous {
                a: &a,
                sa: &sa,
                b: &w,
                sb: &sb,
                m_indices: &idx,
                d: &mut d,
            },
        )
        .unwrap();
        let contiguous = entries(&fake);
        let (fake, b) = backend(gfx, fake_compiler);
        let w = b.alloc(DType::F8E4M3, &[g, n, k]).unwrap();
        let sb = b
            .upload(&HostTensor::zeros(DType::F32, &[g, n.div_ceil(128), kb]))
            .unwrap();
        let a = b.alloc(DType::F8E4M3, &[g, 64, k]).unwrap();
        let sa = b
            .upload(&HostTensor::zeros(DType::F32, &[g, 64, kb]))
            .unwrap();
        let mm = b.upload(&HostTensor::zeros(DType::I32, &[g])).unwrap();
        let mut d = b.alloc(DType::F32, &[g, 64, n]).unwrap();
        run(
            &b,
            Fp8GroupedMasked {
                a: &a,
                sa: &sa,
                b: &w,
                sb: &sb,
                masked_m: &mm,
                d: &mut d,
            },
        )
        .unwrap();
        (contiguous, entries(&fake))
    }

    #[test]
    fn the_grouped_gemms_run_on_matrix_cores_after_their_index_checks() {
        let (c, m) = grouped_on("gfx90a");
        // The deferred range check of the index tensor, then one launch.
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].0, "gemm_check_index");
        assert_eq!(c[1].0, "fp8_gemm_mfma");
        assert_eq!(c[1].1, (4, 4, 1), "200 rows x 256 columns in 64 x 64 tiles");
        assert_eq!(c[1].2, 14, "the kernel's 14 parameters");
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].0, "gemm_check_index");
        assert_eq!(m[1].0, "fp8_gemm_mfma");
        assert_eq!(m[1].1, (1, 4, 3), "one workgroup layer per group");
        // Without the instruction: the CUDA glue's portable kernel.
        let (c, m) = grouped_on("gfx908");
        assert_eq!(c.last().unwrap().0, "gemm_fp8_tiled");
        assert_eq!(m.last().unwrap().0, "gemm_fp8_tiled");
    }
}
