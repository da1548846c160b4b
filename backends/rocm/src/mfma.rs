//! The MFMA paths: where the CUDA backend uses wgmma (Hopper), the ROCm
//! backend uses CDNA's matrix cores. Today: the dense FP8 GEMM
//! (`kernels/fp8_gemm_mfma.cu`, `v_mfma_f32_32x32x8bf16_1k`, e4m3 and
//! e4m3fnuz decoded to bf16 in registers, f32 promotion per 128-wide K
//! block with the 1x128 / 128x128 scales). Selected by architecture
//! ([`has_mfma_bf16_1k`]); elsewhere, and for the grouped GEMMs, the
//! portable kernel of the CUDA glue runs.
//!
//! Checked here: hiprtc (ROCm 5.2) compiles the source for gfx90a and the
//! glue's launches are checked on the CPU. Unchecked here: gfx940/941/942
//! and gfx950 (ROCm 5.2's hiprtc aborts on them, see
//! [`crate::hiprtc::ROCM5_ARCHS`]), and the numerics on a device (no AMD
//! GPU was available).

use crate::device::RocmCx;
use deepport_core::backend::Tensor;
use deepport_core::ops::{Checked, Fp8Gemm};
use deepport_core::{DType, Error, Result};
use deepport_cuda::launch::{Arg, Grid, Kernel, KernelSource, LaunchContext, Target};

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

fn dtype_code(t: &Tensor) -> Result<i32> {
    match t.dtype() {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(Error::invalid(
            "fp8_gemm",
            "d",
            format!("dtype {other} has no kernel code"),
        )),
    }
}

fn i64_arg(v: usize) -> Result<Arg> {
    i64::try_from(v)
        .map(Arg::I64)
        .map_err(|_| Error::invalid("fp8_gemm", "a", format!("size {v} beyond i64")))
}

/// The grid of an `m x n` problem, or `None` when it does not fit
/// (then the portable kernel runs).
pub fn grid(m: usize, n: usize) -> Option<Grid> {
    let gx = u32::try_from(m.div_ceil(TILE)).ok()?;
    let gy = u32::try_from(n.div_ceil(TILE)).ok()?;
    (gx > 0 && gy > 0 && gx <= i32::MAX as u32 && gy <= 65535).then_some(Grid {
        grid: (gx, gy, 1),
        block: (256, 1, 1),
        smem: 0,
    })
}

/// `fp8_gemm` (SPEC.md §3) on `cx`: the MFMA kernel where the arch has
/// it, else the CUDA backend's glue (the portable tiled kernel).
pub fn fp8_gemm(cx: &RocmCx, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let g = match grid(m, n) {
        Some(g) if has_mfma_bf16_1k(cx.gfx()) && k > 0 => g,
        _ if m == 0 || n == 0 => return Ok(()),
        _ => return deepport_cuda::ops::glue::fp8_gemm(cx, op),
    };
    let fnuz = i32::from(args.a.dtype() == DType::F8E4M3Fnuz);
    let launch_args = [
        Arg::Ptr(cx.ptr(args.a)?),
        Arg::Ptr(cx.ptr(args.sa)?),
        Arg::Ptr(cx.ptr(args.b)?),
        Arg::Ptr(cx.ptr(args.sb)?),
        Arg::I32(fnuz),
        Arg::Ptr(cx.ptr_mut(args.d)?),
        Arg::I32(dtype_code(args.d)?),
        i64_arg(m)?,
        i64_arg(n)?,
        i64_arg(k)?,
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
        assert!(grid(1, 64 * 65536).is_none());
    }
}
