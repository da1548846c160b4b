//! GEMM family and quantization: act_quant, weight_dequant, the FP8 and plain GEMMs (dense, contiguous, masked).
//!
//! * `act_quant`, `weight_dequant`: `kernels/quant.cu`, bit-exact with
//!   cpu-ref; a NaN/inf in `x` is reported as a deferred `NonFinite`.
//! * FP8 GEMMs: on Hopper, when the shape meets the preconditions
//!   (`schedule::gemm::choose_fp8_path`), the persistent TMA/wgmma kernel
//!   of `kernels/fp8_gemm_sm90.cu`; otherwise the portable tiled kernel of
//!   `kernels/gemm.cu`.
//! * Plain GEMMs: the portable tiled kernel of `kernels/gemm.cu`.
//! * Index arguments (`m_indices`, `masked_m`) get a deferred range check
//!   (`gemm_check_index`); the GEMM kernels clamp or skip bad values and
//!   never read out of bounds.

use crate::launch::{Arg, CheckKind, Kernel, KernelSource, LaunchContext, Target};
use crate::schedule::gemm::{
    choose_fp8_path, portable_grid, stride_grid, tma_a, tma_b, Fp8Path, Layout, Problem,
};
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

/// `kernels/quant.cu`: act_quant and weight_dequant.
pub(crate) static QUANT: KernelSource = KernelSource {
    name: "quant.cu",
    text: include_str!("../../kernels/quant.cu"),
    target: Target::Portable,
    entries: &["quant_act", "quant_weight_dequant"],
};

/// `kernels/gemm.cu`: the portable tiled GEMMs and the index check.
pub(crate) static GEMM: KernelSource = KernelSource {
    name: "gemm.cu",
    text: include_str!("../../kernels/gemm.cu"),
    target: Target::Portable,
    entries: &["gemm_check_index", "gemm_fp8_tiled", "gemm_plain_tiled"],
};

/// `kernels/fp8_gemm_sm90.cu`: the Hopper FP8 GEMM (BLOCK_N 128 or 64).
pub(crate) static FP8_SM90: KernelSource = KernelSource {
    name: "fp8_gemm_sm90.cu",
    text: include_str!("../../kernels/fp8_gemm_sm90.cu"),
    target: Target::Sm90a,
    entries: &["fp8_gemm_sm90_n128", "fp8_gemm_sm90_n64"],
};

/// This family's kernel sources. `gemm.cuh` is included by all three
/// (the module cache resolves includes under `kernels/`).
pub(crate) static SOURCES: &[&KernelSource] = &[&QUANT, &GEMM, &FP8_SM90];

fn kernel(source: &'static KernelSource, entry: &'static str) -> Kernel {
    Kernel { source, entry }
}

/// The `DP_*` dtype code of `port.cuh` for a float tensor.
fn code(op: &'static str, arg: &'static str, t: &Tensor) -> Result<i32> {
    match t.dtype() {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        DType::F8E4M3 => Ok(3),
        other => Err(Error::invalid(
            op,
            arg,
            format!("dtype {other} has no kernel code"),
        )),
    }
}

/// FP8 operand format flag: 1 for e4m3fnuz, 0 for OCP e4m3.
fn fnuz(t: &Tensor) -> i32 {
    i32::from(t.dtype() == DType::F8E4M3Fnuz)
}

fn i64_of(v: usize) -> Arg {
    Arg::I64(v as i64)
}

fn i32_of(op: &'static str, what: &'static str, v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| Error::not_supported("cuda", op, format!("{what} = {v} exceeds 2^31")))
}

/// Requests the deferred range check of an index tensor (values in
/// `[lo, hi)`, or `allow`) and launches `gemm_check_index` over it.
pub fn check_index(
    cx: &dyn LaunchContext,
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    lo: i64,
    hi: i64,
    allow: Option<i64>,
) -> Result<()> {
    let count = t.numel();
    if count == 0 {
        return Ok(());
    }
    let status = cx.check(op, arg, t.shape(), CheckKind::Range { lo, hi, allow })?;
    let args = [
        Arg::Ptr(cx.ptr(t)?),
        Arg::I32(i32::from(t.dtype() == DType::I64)),
        i64_of(count),
        Arg::I64(lo),
        Arg::I64(hi),
        Arg::I64(allow.unwrap_or(0)),
        Arg::I32(i32::from(allow.is_some())),
        Arg::Ptr(status),
    ];
    cx.launch(
        kernel(&GEMM, "gemm_check_index"),
        stride_grid(count, 256, 256),
        &args,
    )
}

/// `act_quant` (SPEC.md §2): one 128-thread CTA per 128-element group.
pub fn act_quant(cx: &dyn LaunchContext, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
    const OP: &str = "act_quant";
    let (args, dims) = op.parts();
    let groups_total = dims.m * (dims.k / QBLOCK);
    if groups_total == 0 {
        return Ok(());
    }
    let status = cx.check(OP, "x", &[dims.m, dims.k], CheckKind::Finite)?;
    let launch_args = [
        Arg::Ptr(cx.ptr(args.x)?),
        Arg::I32(code(OP, "x", args.x)?),
        Arg::Ptr(cx.ptr_mut(&mut *args.q)?),
        Arg::I32(fnuz(args.q)),
        Arg::Ptr(cx.ptr_mut(&mut *args.s)?),
        Arg::F32(dims.fp8_max),
        Arg::I32(i32::from(args.scale_fmt == ScaleFmt::Ue8m0)),
        i64_of(groups_total),
        Arg::Ptr(status),
    ];
    cx.launch(
        kernel(&QUANT, "quant_act"),
        stride_grid(groups_total, 1, QBLOCK as u32),
        &launch_args,
    )
}

/// `weight_dequant`: elementwise, grid-stride.
pub fn weight_dequant(cx: &dyn LaunchContext, op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
    const OP: &str = "weight_dequant";
    let (args, dims) = op.parts();
    let total = dims.n * dims.k;
    if total == 0 {
        return Ok(());
    }
    let out_code = code(OP, "out", args.out)?;
    let launch_args = [
        Arg::Ptr(cx.ptr(args.w)?),
        Arg::I32(fnuz(args.w)),
        Arg::Ptr(cx.ptr(args.s)?),
        Arg::Ptr(cx.ptr_mut(&mut *args.out)?),
        Arg::I32(out_code),
        i64_of(dims.n),
        i64_of(dims.k),
    ];
    cx.launch(
        kernel(&QUANT, "quant_weight_dequant"),
        stride_grid(total, 256 * 4, 256),
        &launch_args,
    )
}

/// The operands of one FP8 GEMM launch.
struct Fp8Operands<'t> {
    a: &'t Tensor,
    sa: &'t Tensor,
    b: &'t Tensor,
    sb: &'t Tensor,
    /// `m_indices` / `masked_m`.
    idx: Option<&'t Tensor>,
}

fn idx_args(cx: &dyn LaunchContext, idx: Option<&Tensor>) -> Result<(Arg, Arg)> {
    Ok(match idx {
        Some(t) => (
            Arg::Ptr(cx.ptr(t)?),
            Arg::I32(i32::from(t.dtype() == DType::I64)),
        ),
        None => (Arg::Ptr(0), Arg::I32(0)),
    })
}

/// Launches the FP8 GEMM of `p` (index checks already requested).
fn fp8_launch(
    cx: &dyn LaunchContext,
    op: &'static str,
    p: &Problem,
    x: &Fp8Operands<'_>,
    d: &mut Tensor,
) -> Result<()> {
    if p.is_empty() {
        return Ok(());
    }
    let d_code = code(op, "d", d)?;
    let (a_ptr, b_ptr) = (cx.ptr(x.a)?, cx.ptr(x.b)?);
    let d_ptr = cx.ptr_mut(d)?;
    let (idx_ptr, idx64) = idx_args(cx, x.idx)?;
    match choose_fp8_path(&cx.arch(), p, fnuz(x.a) == 1, a_ptr, b_ptr) {
        Fp8Path::Sm90(plan) => {
            let ta = cx.tensor_map(&tma_a(&plan, a_ptr))?;
            let tb = cx.tensor_map(&tma_b(&plan, b_ptr))?;
            let entry = if plan.block_n == 128 {
                "fp8_gemm_sm90_n128"
            } else {
                "fp8_gemm_sm90_n64"
            };
            let args = [
                Arg::TensorMap(Box::new(ta)),
                Arg::TensorMap(Box::new(tb)),
                Arg::Ptr(cx.ptr(x.sa)?),
                Arg::Ptr(cx.ptr(x.sb)?),
                Arg::Ptr(d_ptr),
                Arg::I32(d_code),
                idx_ptr,
                idx64,
                Arg::I32(p.layout.code()),
                i32_of(op, "m", p.m)?,
                i32_of(op, "n", p.n)?,
                i32_of(op, "k", p.k)?,
                i32_of(op, "groups", p.groups)?,
                i32_of(op, "tiles_m", plan.tiles_m)?,
                i32_of(op, "tiles_n", plan.tiles_n)?,
                i32_of(op, "tiles", plan.num_tiles)?,
            ];
            cx.launch(kernel(&FP8_SM90, entry), plan.grid(&cx.arch()), &args)
        }
        Fp8Path::Portable { .. } => {
            let args = [
                Arg::Ptr(a_ptr),
                Arg::Ptr(cx.ptr(x.sa)?),
                Arg::Ptr(b_ptr),
                Arg::Ptr(cx.ptr(x.sb)?),
                Arg::I32(fnuz(x.a)),
                Arg::Ptr(d_ptr),
                Arg::I32(d_code),
                idx_ptr,
                idx64,
                Arg::I32(p.layout.code()),
                i64_of(p.m),
                i64_of(p.n),
                i64_of(p.k),
                i64_of(p.groups),
            ];
            cx.launch(
                kernel(&GEMM, "gemm_fp8_tiled"),
                portable_grid(op, p)?,
                &args,
            )
        }
    }
}

fn problem(layout: Layout, dims: &GemmDims) -> Problem {
    Problem {
        layout,
        groups: dims.groups,
        m: dims.m,
        n: dims.n,
        k: dims.k,
    }
}

/// `fp8_gemm` (SPEC.md §3).
pub fn fp8_gemm(cx: &dyn LaunchContext, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let x = Fp8Operands {
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: None,
    };
    let p = problem(Layout::Dense, dims);
    fp8_launch(cx, "fp8_gemm", &p, &x, args.d)
}

/// `fp8_grouped_contiguous` (SPEC.md §3.1).
pub fn fp8_grouped_contiguous(
    cx: &dyn LaunchContext,
    op: &mut Checked<Fp8GroupedContiguous<'_>>,
) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let (args, dims) = op.parts();
    check_index(
        cx,
        OP,
        "m_indices",
        args.m_indices,
        0,
        dims.groups as i64,
        Some(-1),
    )?;
    let x = Fp8Operands {
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: Some(args.m_indices),
    };
    let p = problem(Layout::Contiguous, dims);
    fp8_launch(cx, OP, &p, &x, args.d)
}

/// `fp8_grouped_masked` (SPEC.md §3.2).
pub fn fp8_grouped_masked(
    cx: &dyn LaunchContext,
    op: &mut Checked<Fp8GroupedMasked<'_>>,
) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let (args, dims) = op.parts();
    check_index(
        cx,
        OP,
        "masked_m",
        args.masked_m,
        0,
        dims.m as i64 + 1,
        None,
    )?;
    let x = Fp8Operands {
        a: args.a,
        sa: args.sa,
        b: args.b,
        sb: args.sb,
        idx: Some(args.masked_m),
    };
    let p = problem(Layout::Masked, dims);
    fp8_launch(cx, OP, &p, &x, args.d)
}

/// Launches the plain tiled GEMM of `p`.
fn plain_launch(
    cx: &dyn LaunchContext,
    op: &'static str,
    p: &Problem,
    a: &Tensor,
    b: &Tensor,
    idx: Option<&Tensor>,
    d: &mut Tensor,
) -> Result<()> {
    if p.is_empty() {
        return Ok(());
    }
    let (idx_ptr, idx64) = idx_args(cx, idx)?;
    let grid = portable_grid(op, p)?;
    let d_code = code(op, "d", d)?;
    let args = [
        Arg::Ptr(cx.ptr(a)?),
        Arg::I32(code(op, "a", a)?),
        Arg::Ptr(cx.ptr(b)?),
        Arg::I32(code(op, "b", b)?),
        Arg::Ptr(cx.ptr_mut(d)?),
        Arg::I32(d_code),
        idx_ptr,
        idx64,
        Arg::I32(p.layout.code()),
        i64_of(p.m),
        i64_of(p.n),
        i64_of(p.k),
        i64_of(p.groups),
    ];
    cx.launch(kernel(&GEMM, "gemm_plain_tiled"), grid, &args)
}

/// `gemm`: plain NT GEMM, f32 accumulation.
pub fn gemm(cx: &dyn LaunchContext, op: &mut Checked<Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let p = problem(Layout::Dense, dims);
    plain_launch(cx, "gemm", &p, args.a, args.b, None, args.d)
}

/// `gemm_grouped_contiguous`: plain grouped GEMM, contiguous layout.
pub fn gemm_grouped_contiguous(
    cx: &dyn LaunchContext,
    op: &mut Checked<GemmGroupedContiguous<'_>>,
) -> Result<()> {
    const OP: &str = "gemm_grouped_contiguous";
    let (args, dims) = op.parts();
    check_index(
        cx,
        OP,
        "m_indices",
        args.m_indices,
        0,
        dims.groups as i64,
        Some(-1),
    )?;
    let p = problem(Layout::Contiguous, dims);
    plain_launch(cx, OP, &p, args.a, args.b, Some(args.m_indices), args.d)
}

/// `gemm_grouped_masked`: plain grouped GEMM, masked layout.
pub fn gemm_grouped_masked(
    cx: &dyn LaunchContext,
    op: &mut Checked<GemmGroupedMasked<'_>>,
) -> Result<()> {
    const OP: &str = "gemm_grouped_masked";
    let (args, dims) = op.parts();
    check_index(
        cx,
        OP,
        "masked_m",
        args.masked_m,
        0,
        dims.m as i64 + 1,
        None,
    )?;
    let p = problem(Layout::Masked, dims);
    plain_launch(cx, OP, &p, args.a, args.b, Some(args.masked_m), args.d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Arch, Grid, Scratch, TensorMap, TmaParams};
    use deepport_core::backend::InstanceId;
    use deepport_core::device::Storage;
    use std::any::Any;
    use std::cell::RefCell;

    struct Fake;
    impl Storage for Fake {
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

    fn t(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor::new(dtype, shape, Box::new(Fake), InstanceId::fresh())
    }

    /// A launch as the recorder saw it.
    #[derive(Debug)]
    struct Launch {
        entry: &'static str,
        target: Target,
        grid: Grid,
        args: Vec<Arg>,
    }

    /// Records every request; device addresses are a 256-aligned base plus
    /// the tensor's view offset.
    /// (op, arg, shape, kind as text) of a requested check.
    type CheckRecord = (&'static str, &'static str, Vec<usize>, String);

    struct Recorder {
        arch: Arch,
        launches: RefCell<Vec<Launch>>,
        checks: RefCell<Vec<CheckRecord>>,
        maps: RefCell<Vec<TmaParams>>,
    }

    const STATUS: u64 = 0x5151_0000;

    impl Recorder {
        fn new(arch: Arch) -> Self {
            Self {
                arch,
                launches: RefCell::new(Vec::new()),
                checks: RefCell::new(Vec::new()),
                maps: RefCell::new(Vec::new()),
            }
        }
    }

    impl LaunchContext for Recorder {
        fn arch(&self) -> Arch {
            self.arch
        }
        fn ptr(&self, t: &Tensor) -> Result<u64> {
            Ok(0x7000_0000_0000 + t.offset_bytes() as u64)
        }
        fn ptr_mut(&self, t: &mut Tensor) -> Result<u64> {
            self.ptr(t)
        }
        fn scratch(&self, bytes: usize) -> Result<Scratch> {
            Ok(Scratch {
                ptr: 0x9000_0000,
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
            self.checks
                .borrow_mut()
                .push((op, arg, shape.to_vec(), format!("{kind:?}")));
            Ok(STATUS)
        }
        fn tensor_map(&self, params: &TmaParams) -> Result<TensorMap> {
            crate::schedule::gemm::validate_tma(params)
                .map_err(|e| Error::invalid("tensor_map", "params", e))?;
            self.maps.borrow_mut().push(params.clone());
            Ok(TensorMap([0; 16]))
        }
        fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
            assert!(
                kernel.source.entries.contains(&kernel.entry),
                "{} is not an entry of {}",
                kernel.entry,
                kernel.source.name
            );
            let want = signature(kernel.source.text, kernel.entry);
            let got: Vec<&str> = args.iter().map(arg_kind).collect();
            assert_eq!(got, want, "arguments of {}", kernel.entry);
            self.launches.borrow_mut().push(Launch {
                entry: kernel.entry,
                target: kernel.source.target,
                grid,
                args: args.to_vec(),
            });
            Ok(())
        }
    }

    fn arg_kind(a: &Arg) -> &'static str {
        match a {
            Arg::Ptr(_) => "ptr",
            Arg::I32(_) => "i32",
            Arg::U32(_) => "u32",
            Arg::I64(_) => "i64",
            Arg::U64(_) => "u64",
            Arg::F32(_) => "f32",
            Arg::TensorMap(_) => "tmap",
        }
    }

    /// The parameter kinds of a kernel entry, parsed from its source: the
    /// parameter list after `entry(` (or, for entries made by the
    /// `H_ENTRY` macro, after `NAME(` in the macro).
    fn signature(src: &str, entry: &str) -> Vec<&'static str> {
        let open = match src.find(&format!("{entry}(const")) {
            Some(i) if !src[i..].starts_with(&format!("{entry}(const __grid")) => i,
            _ if src.contains(&format!("H_ENTRY({entry},")) => {
                src.find("NAME(").expect("H_ENTRY macro")
            }
            other => other.unwrap_or_else(|| panic!("{entry} not found")),
        };
        let rest = &src[open..];
        let list = &rest[rest.find('(').unwrap() + 1..rest.find(')').unwrap()];
        list.split(',')
            .map(|p| {
                let p = p.replace('\\', " ");
                let p = p.trim();
                if p.contains("GemmTmaDesc") {
                    "tmap"
                } else if p.contains('*') {
                    "ptr"
                } else if p.starts_with("int ") {
                    "i32"
                } else if p.starts_with("i64 ") {
                    "i64"
                } else if p.starts_with("float ") {
                    "f32"
                } else {
                    panic!("unknown parameter `{p}` of {entry}")
                }
            })
            .collect()
    }

    #[test]
    fn signatures_parse() {
        assert_eq!(
            signature(GEMM.text, "gemm_check_index"),
            vec!["ptr", "i32", "i64", "i64", "i64", "i64", "i32", "ptr"]
        );
        let s = signature(FP8_SM90.text, "fp8_gemm_sm90_n64");
        assert_eq!(s.len(), 16);
        assert_eq!(&s[..3], &["tmap", "tmap", "ptr"]);
    }

    const H200: Arch = Arch {
        major: 9,
        minor: 0,
        sms: 132,
        smem_optin: 232448,
    };
    const A100: Arch = Arch {
        major: 8,
        minor: 0,
        sms: 108,
        smem_optin: 166912,
    };

    fn i32_arg(a: &Arg) -> i32 {
        match a {
            Arg::I32(v) => *v,
            other => panic!("expected I32, got {other:?}"),
        }
    }

    fn fp8_gemm_on(arch: Arch, m: usize, n: usize, k: usize, a_dtype: DType) -> Recorder {
        let cx = Recorder::new(arch);
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        let a = t(a_dtype, &[m, k]);
        let sa = t(DType::F32, &[m, kb]);
        let b = t(a_dtype, &[n, k]);
        let sb = t(DType::F32, &[nb, kb]);
        let mut d = t(DType::BF16, &[m, n]);
        let mut op = Fp8Gemm {
            a: &a,
            sa: &sa,
            b: &b,
            sb: &sb,
            d: &mut d,
        }
        .check()
        .unwrap();
        fp8_gemm(&cx, &mut op).unwrap();
        cx
    }

    #[test]
    fn fp8_gemm_takes_the_hopper_path_on_h200() {
        let cx = fp8_gemm_on(H200, 4096, 7168, 2048, DType::F8E4M3);
        let l = cx.launches.borrow();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].entry, "fp8_gemm_sm90_n128");
        assert_eq!(l[0].target, Target::Sm90a);
        assert_eq!(l[0].grid.grid, (132, 1, 1));
        assert_eq!(l[0].grid.block, (128, 1, 1));
        assert!(l[0].grid.smem as usize <= H200.smem_optin as usize);
        assert_eq!(l[0].args.len(), 16);
        assert!(matches!(l[0].args[0], Arg::TensorMap(_)));
        // mode, m, n, k, groups, tiles_m, tiles_n, tiles
        let ints: Vec<i32> = l[0].args[8..].iter().map(i32_arg).collect();
        assert_eq!(ints, vec![0, 4096, 7168, 2048, 1, 64, 56, 64 * 56]);
        let maps = cx.maps.borrow();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].dims, vec![2048, 4096]);
        assert_eq!(maps[1].dims, vec![2048, 7168]);
        assert_eq!(maps[1].box_dims, vec![128, 128]);
        assert!(cx.checks.borrow().is_empty());
        // n = 2112 = 16.5 blocks: BLOCK_N 64.
        let cx = fp8_gemm_on(H200, 1, 2112, 7168, DType::F8E4M3);
        assert_eq!(cx.launches.borrow()[0].entry, "fp8_gemm_sm90_n64");
        assert_eq!(cx.launches.borrow()[0].grid.grid, (33, 1, 1));
    }

    #[test]
    fn fp8_gemm_falls_back_to_the_portable_kernel() {
        for (arch, m, n, k, dt) in [
            (A100, 128, 4096, 7168, DType::F8E4M3),
            (H200, 128, 576, 7168, DType::F8E4M3Fnuz),
            (H200, 5, 576 + 8, 7168, DType::F8E4M3),
            (H200, 5, 512, 200, DType::F8E4M3),
        ] {
            let cx = fp8_gemm_on(arch, m, n, k, dt);
            let l = cx.launches.borrow();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0].entry, "gemm_fp8_tiled");
            assert_eq!(l[0].target, Target::Portable);
            assert_eq!(
                l[0].grid.grid,
                (m.div_ceil(64) as u32, n.div_ceil(64) as u32, 1)
            );
            assert_eq!(i32_arg(&l[0].args[4]), i32::from(dt == DType::F8E4M3Fnuz));
            assert_eq!(i32_arg(&l[0].args[6]), 1, "bf16 output code");
            assert!(cx.maps.borrow().is_empty());
        }
        // A view at an odd offset cannot be a TMA base.
        let cx = Recorder::new(H200);
        let a_root = t(DType::F8E4M3, &[129, 128]);
        let a = a_root.view(1, &[128, 128]).unwrap();
        let sa = t(DType::F32, &[128, 1]);
        let b = t(DType::F8E4M3, &[128, 128]);
        let sb = t(DType::F32, &[1, 1]);
        let mut d = t(DType::F32, &[128, 128]);
        let mut op = Fp8Gemm {
            a: &a,
            sa: &sa,
            b: &b,
            sb: &sb,
            d: &mut d,
        }
        .check()
        .unwrap();
        fp8_gemm(&cx, &mut op).unwrap();
        assert_eq!(cx.launches.borrow()[0].entry, "gemm_fp8_tiled");
        assert_eq!(i32_arg(&cx.launches.borrow()[0].args[6]), 0, "f32 code");
    }

    #[test]
    fn grouped_fp8_requests_index_checks() {
        // Contiguous: G = 8, 1024 rows.
        let cx = Recorder::new(H200);
        let (g, m, n, k) = (8, 1024, 4096, 7168);
        let a = t(DType::F8E4M3, &[m, k]);
        let sa = t(DType::F32, &[m, k / 128]);
        let b = t(DType::F8E4M3, &[g, n, k]);
        let sb = t(DType::F32, &[g, n / 128, k / 128]);
        let idx = t(DType::I32, &[m]);
        let mut d = t(DType::BF16, &[m, n]);
        let mut op = Fp8GroupedContiguous {
            a: &a,
            sa: &sa,
            b: &b,
            sb: &sb,
            m_indices: &idx,
            d: &mut d,
        }
        .check()
        .unwrap();
        fp8_grouped_contiguous(&cx, &mut op).unwrap();
        let checks = cx.checks.borrow();
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].0, "fp8_grouped_contiguous");
        assert_eq!(checks[0].1, "m_indices");
        assert_eq!(checks[0].2, vec![m]);
        assert!(checks[0].3.contains("lo: 0, hi: 8, allow: Some(-1)"));
        let l = cx.launches.borrow();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].entry, "gemm_check_index");
        assert!(matches!(l[0].args[7], Arg::Ptr(STATUS)));
        assert_eq!(l[1].entry, "fp8_gemm_sm90_n128");
        assert_eq!(i32_arg(&l[1].args[8]), 1, "contiguous mode");
        assert_eq!(cx.maps.borrow()[1].dims, vec![k as u64, (g * n) as u64]);

        // Masked on A100 (portable): grid z = G, check [0, m_max].
        let cx = Recorder::new(A100);
        let (g, m_max) = (32, 256);
        let a = t(DType::F8E4M3, &[g, m_max, k]);
        let sa = t(DType::F32, &[g, m_max, k / 128]);
        let b = t(DType::F8E4M3, &[g, n, k]);
        let sb = t(DType::F32, &[g, n / 128, k / 128]);
        let mm = t(DType::I64, &[g]);
        let mut d = t(DType::F32, &[g, m_max, n]);
        let mut op = Fp8GroupedMasked {
            a: &a,
            sa: &sa,
            b: &b,
            sb: &sb,
            masked_m: &mm,
            d: &mut d,
        }
        .check()
        .unwrap();
        fp8_grouped_masked(&cx, &mut op).unwrap();
        let checks = cx.checks.borrow();
        assert_eq!(checks[0].1, "masked_m");
        assert!(checks[0].3.contains("lo: 0, hi: 257, allow: None"));
        let l = cx.launches.borrow();
        assert_eq!(l[0].entry, "gemm_check_index");
        assert_eq!(i32_arg(&l[0].args[1]), 1, "i64 indices");
        assert_eq!(l[1].entry, "gemm_fp8_tiled");
        assert_eq!(l[1].grid.grid, (4, 64, 32));
        assert_eq!(i32_arg(&l[1].args[8]), 1, "i64 indices");
        assert_eq!(i32_arg(&l[1].args[9]), 2, "masked mode");
    }

    #[test]
    fn act_quant_checks_x_and_launches_one_cta_per_group() {
        let cx = Recorder::new(A100);
        let x = t(DType::BF16, &[3, 512]);
        let mut q = t(DType::F8E4M3Fnuz, &[3, 512]);
        let mut s = t(DType::F32, &[3, 4]);
        let mut op = ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Ue8m0,
        }
        .check()
        .unwrap();
        act_quant(&cx, &mut op).unwrap();
        let checks = cx.checks.borrow();
        assert_eq!(checks.len(), 1);
        assert_eq!((checks[0].1, checks[0].3.as_str()), ("x", "Finite"));
        let l = cx.launches.borrow();
        assert_eq!(l[0].entry, "quant_act");
        assert_eq!(l[0].grid.grid, (12, 1, 1));
        assert_eq!(l[0].grid.block, (128, 1, 1));
        assert_eq!(i32_arg(&l[0].args[1]), 1, "bf16 input");
        assert_eq!(i32_arg(&l[0].args[3]), 1, "fnuz output");
        assert!(matches!(l[0].args[5], Arg::F32(v) if v == 240.0));
        assert_eq!(i32_arg(&l[0].args[6]), 1, "ue8m0");
    }

    #[test]
    fn plain_gemms_use_the_tiled_kernel() {
        let cx = Recorder::new(H200);
        let a = t(DType::BF16, &[100, 70]);
        let b = t(DType::F32, &[130, 70]);
        let mut d = t(DType::F16, &[100, 130]);
        let mut op = Gemm {
            a: &a,
            b: &b,
            d: &mut d,
        }
        .check()
        .unwrap();
        gemm(&cx, &mut op).unwrap();
        let l = cx.launches.borrow();
        assert_eq!(l[0].entry, "gemm_plain_tiled");
        assert_eq!(l[0].grid.grid, (2, 3, 1));
        let codes: Vec<i32> = [1, 3, 5].iter().map(|&i| i32_arg(&l[0].args[i])).collect();
        assert_eq!(codes, vec![1, 0, 2]);

        let cx = Recorder::new(H200);
        let (g, m_max, n, k) = (4, 9, 64, 32);
        let a = t(DType::F32, &[g, m_max, k]);
        let b = t(DType::F32, &[g, n, k]);
        let mm = t(DType::I32, &[g]);
        let mut d = t(DType::F32, &[g, m_max, n]);
        let mut op = GemmGroupedMasked {
            a: &a,
            b: &b,
            masked_m: &mm,
            d: &mut d,
        }
        .check()
        .unwrap();
        gemm_grouped_masked(&cx, &mut op).unwrap();
        assert_eq!(cx.checks.borrow()[0].1, "masked_m");
        let l = cx.launches.borrow();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].grid.grid, (1, 1, 4));

        let cx = Recorder::new(A100);
        let a = t(DType::BF16, &[300, k]);
        let b = t(DType::BF16, &[g, n, k]);
        let idx = t(DType::I64, &[300]);
        let mut d = t(DType::BF16, &[300, n]);
        let mut op = GemmGroupedContiguous {
            a: &a,
            b: &b,
            m_indices: &idx,
            d: &mut d,
        }
        .check()
        .unwrap();
        gemm_grouped_contiguous(&cx, &mut op).unwrap();
        assert!(cx.checks.borrow()[0].3.contains("allow: Some(-1)"));
        let l = cx.launches.borrow();
        assert_eq!(l[1].grid.grid, (5, 1, 1));
        assert_eq!(i32_arg(&l[1].args[8]), 1, "contiguous mode");
    }

    #[test]
    fn empty_problems_launch_nothing() {
        let cx = fp8_gemm_on(H200, 0, 128, 128, DType::F8E4M3);
        assert!(cx.launches.borrow().is_empty());
        let cx = Recorder::new(H200);
        let w = t(DType::F8E4M3, &[0, 256]);
        let s = t(DType::F32, &[0, 2]);
        let mut out = t(DType::BF16, &[0, 256]);
        let mut op = WeightDequant {
            w: &w,
            s: &s,
            out: &mut out,
        }
        .check()
        .unwrap();
        weight_dequant(&cx, &mut op).unwrap();
        assert!(cx.launches.borrow().is_empty());
    }

    #[test]
    fn sources_list_their_entries() {
        for src in SOURCES {
            for e in src.entries {
                assert!(
                    src.text.contains(&format!("{e}(")) || src.text.contains(&format!("({e},")),
                    "{} lacks {e}",
                    src.name
                );
            }
        }
        assert!(crate::nvrtc::HEADERS.iter().any(|(n, _)| *n == "gemm.cuh"));
        assert!(QUANT.text.contains("#include \"gemm.cuh\""));
    }
}
