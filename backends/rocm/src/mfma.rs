//! The MFMA paths: where the CUDA backend uses wgmma (Hopper), the ROCm
//! backend uses CDNA's matrix cores. Today: the three FP8 GEMMs — dense,
//! grouped contiguous and grouped masked — in one kernel
//! (`kernels/fp8_gemm_mfma.cu`, `v_mfma_f32_32x32x8bf16_1k`, e4m3 and
//! e4m3fnuz decoded to bf16 in registers, f32 promotion per 128-wide K
//! block with the 1x128 / 128x128 scales; the layout as the CUDA kernels'
//! `mode`). Selected by architecture ([`has_mfma_bf16_1k`]); elsewhere
//! the portable kernel of the CUDA glue runs. The grouped GEMMs'
//! index tensors get the CUDA glue's deferred range check
//! (`glue::check_index`) before the launch. MLA decode's split kernel
//! (`kernels/mla_decode_mfma.cu`, [`mla_split`]) runs between the CUDA
//! glue's metadata and combine kernels, offered to the glue through
//! `LaunchContext::mla_split_kernel`.
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
use deepport_core::ops::{
    Checked, Fp8Gemm, Fp8GroupedContiguous, Fp8GroupedMasked, GemmDims, MlaDecodeDims,
};
use deepport_core::{DType, Error, Result};
use deepport_cuda::launch::{
    Arg, Grid, Kernel, KernelSource, LaunchContext, MlaSplitKernel, Target,
};
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

/// The MLA decode split kernel on matrix cores (`mla_decode_sm90`'s
/// arguments; the CUDA glue runs it through
/// `LaunchContext::mla_split_kernel`).
pub static MLA_DECODE_MFMA: KernelSource = KernelSource {
    name: "mla_decode_mfma.cu",
    text: include_str!("../kernels/mla_decode_mfma.cu"),
    target: Target::Portable,
    entries: &["mla_decode_mfma"],
};

/// The headers of the ROCm-only sources, handed to hiprtc next to the CUDA
/// backend's (`deepport_cuda::nvrtc::HEADERS`).
pub const HEADERS: &[(&str, &str)] = &[("mfma.cuh", include_str!("../kernels/mfma.cuh"))];

/// Output tile of one workgroup.
pub const TILE: usize = 64;

/// Query rows per workgroup of [`MLA_DECODE_MFMA`].
pub const MLA_TILE_ROWS: u32 = 32;

/// Whether `gfx` has `v_mfma_f32_32x32x8bf16_1k` (CDNA 2 and later).
pub fn has_mfma_bf16_1k(gfx: &str) -> bool {
    let base = gfx.split(':').next().unwrap_or(gfx);
    matches!(base, "gfx90a" | "gfx940" | "gfx941" | "gfx942" | "gfx950")
}

/// The ROCm-only sources that compile for `gfx`.
pub fn sources_for(gfx: &str) -> Vec<&'static KernelSource> {
    if has_mfma_bf16_1k(gfx) {
        vec![&FP8_GEMM_MFMA, &MLA_DECODE_MFMA]
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

/// The MFMA split kernel for an `mla_decode` on `gfx`, when the operands
/// fit it: bf16 `q` and cache, DeepSeek's head dims (576 / 512), pages of
/// 64 tokens, query heads per kv head a multiple of 32 (each 32-row tile is
/// one `s`), `q` and `kcache` 16-byte aligned (keys are copied 8 bytes at a
/// time). Otherwise `None`: the CUDA glue's portable kernel runs.
pub fn mla_split(
    gfx: &str,
    dtype: DType,
    d: &MlaDecodeDims,
    q: u64,
    kcache: u64,
) -> Option<MlaSplitKernel> {
    let fits = has_mfma_bf16_1k(gfx)
        && dtype == DType::BF16
        && d.d == 576
        && d.dv == 512
        && d.block_size == 64
        && d.h_kv > 0
        && (d.h_q / d.h_kv).is_multiple_of(MLA_TILE_ROWS as usize)
        && q.is_multiple_of(16)
        && kcache.is_multiple_of(16);
    fits.then_some(MlaSplitKernel {
        kernel: Kernel {
            source: &MLA_DECODE_MFMA,
            entry: "mla_decode_mfma",
        },
        tile_rows: MLA_TILE_ROWS,
        threads: 256,
        smem: 0,
    })
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
    fn the_mfma_sources_compile_for_gfx90a_with_wavefront_64() {
        if let Err(why) = crate::hiprtc::probe() {
            assert!(!required(), "DEEPPORT_REQUIRE names hiprtc, but: {why}");
            println!("skipped: {why}");
            return;
        }
        for src in sources_for("gfx90a") {
            let c = crate::hiprtc::compile(src.name, src.text, "gfx90a").unwrap();
            let co = crate::elf::parse(&c.code).unwrap();
            assert_eq!(co.gfx, Some("gfx90a"), "{}", src.name);
            assert_eq!(co.kernels, src.entries.to_vec(), "{}", src.name);
            assert_eq!(co.wavefront_sizes, vec![64], "{}", src.name);
            // The matrix-core instruction is in the code: a VOP3P-MAI word
            // with opcode 0xD3E6 in its high half (what llvm-objdump
            // --mcpu=gfx90a prints as v_mfma_f32_32x32x8bf16_1k).
            let mfma = c
                .code
                .chunks_exact(4)
                .filter(|w| w[3] == 0xd3 && w[2] == 0xe6)
                .count();
            assert!(mfma >= 1, "{}: no v_mfma_f32_32x32x8bf16_1k", src.name);
            // gfx908 has no bf16_1k MFMA: the source refuses it.
            let e = crate::hiprtc::compile(src.name, src.text, "gfx908")
                .unwrap_err()
                .to_string();
            assert!(e.contains("v_mfma_f32_32x32x8bf16_1k"), "{}: {e}", src.name);
        }
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
        assert_eq!(sources_for("gfx90a").len(), 2);
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

    /// The launches of one bf16 MLA decode with DeepSeek's dims on `gfx`
    /// (`h_q` query heads, one kv head, 2 sequences, 2 pages of 64 each).
    fn mla_decode_on(gfx: &str, h_q: usize, dt: DType) -> Vec<(String, (u32, u32, u32), u32)> {
        use deepport_core::ops::MlaDecode;
        let (fake, b) = backend(gfx, fake_compiler);
        let (batch, s_q, d, dv, pages) = (2usize, 1usize, 576usize, 512usize, 4usize);
        let q = b.alloc(dt, &[batch, s_q, h_q, d]).unwrap();
        let kc = b.alloc(dt, &[pages, 64, 1, d]).unwrap();
        let bt = b
            .upload(&HostTensor::from_i32(&[batch, 2], &[0, 1, 2, 3]))
            .unwrap();
        let lens = b
            .upload(&HostTensor::from_i32(&[batch], &[100, 128]))
            .unwrap();
        let mut out = b.alloc(dt, &[batch, s_q, h_q, dv]).unwrap();
        let mut lse = b.alloc(DType::F32, &[batch, h_q, s_q]).unwrap();
        run(
            &b,
            MlaDecode {
                q: &q,
                kcache: &kc,
                block_table: &bt,
                cache_seqlens: &lens,
                out: &mut out,
                lse: &mut lse,
                softmax_scale: 0.04,
                causal: false,
            },
        )
        .unwrap();
        fake.launches()
            .into_iter()
            .map(|l| (l.entry, l.grid, l.smem))
            .collect()
    }

    #[test]
    fn mla_decode_takes_the_mfma_split_kernel_where_it_fits() {
        let l = mla_decode_on("gfx90a", 128, DType::BF16);
        let entries: Vec<&str> = l.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(entries, ["mla_metadata", "mla_decode_mfma", "mla_combine"]);
        // 128 heads of one kv head in tiles of 32 rows; static LDS only.
        assert_eq!(l[1].1 .1, 1);
        assert_eq!(l[1].1 .2, 4);
        assert_eq!(l[1].2, 0);
        // Elsewhere the portable split kernel: no bf16_1k MFMA (gfx908),
        // f32 operands, or heads per kv head not a multiple of 32.
        for (gfx, h_q, dt) in [
            ("gfx908", 128, DType::BF16),
            ("gfx90a", 128, DType::F32),
            ("gfx90a", 16, DType::BF16),
        ] {
            let l = mla_decode_on(gfx, h_q, dt);
            assert_eq!(l[1].0, "mla_decode_split", "{gfx} h_q={h_q} {dt}");
        }
    }
}
