//! deepport's CUDA backend (`cuda`): the Hopper reference.
//!
//! * The CUDA libraries (driver, NVRTC, NCCL) are loaded at run time; the
//!   crate builds with no CUDA toolkit (cudarc with `dynamic-loading`,
//!   bindings of the CUDA 12.0 driver API, which run on every 12.x and 13.x
//!   driver). Each library is probed before any call ([`probe`]), so a
//!   machine without `libcuda` lists `cuda` as unavailable with the
//!   reason (library missing, no device, driver too old) instead of
//!   panicking. Without NVRTC no kernel can be compiled, so the backend is
//!   unavailable then too.
//! * One instance is one device (`cuda:N`): a primary context and a
//!   stream of its own ([`device::Cx`]). Memory is stream-ordered; ops
//!   queue kernels and never block; `download` and `synchronize` wait.
//! * Kernels are `.cu` files under `kernels/`, embedded in the binary and
//!   compiled by NVRTC for the device's architecture (once per process,
//!   source and arch; `sm_90a` on Hopper, `sm_{major}{minor}` elsewhere) and loaded
//!   from the cubin: portable kernels for sm_80 and later, and Hopper
//!   (sm_90a) paths for the FP8 GEMMs (wgmma, TMA, persistent schedule)
//!   and MLA decode (wgmma, split-K and a combine kernel). Every portable
//!   source includes only `kernels/port.cuh`, so the ROCm backend compiles
//!   the same files.
//! * Op glue (`ops/`) computes launch geometry in plain Rust (`schedule/`,
//!   tested on the CPU) and launches through [`launch::LaunchContext`].
//!   Ops whose kernel has not landed answer `NotSupported`; `supports`
//!   answers from [`KERNEL_OPS`] (the local ops with kernels).
//! * Index and finiteness checks run on the device (`dp_flag` in
//!   `port.cuh`) and their errors surface at the next `download` or
//!   `synchronize`, like an asynchronous CUDA error; whatever that call
//!   would have returned is discarded.
//! * Read-only views are read in place at their byte offset by every
//!   kernel and by `download`.
//! * Expert parallelism is core's protocol over this backend's
//!   `gather_rows`, `reduce_rows`, `act_quant` and `get_dispatch_layout`;
//!   [`nccl::NcclTransport`] moves the rows between GPUs in device memory.
//! * Driver failures are `Error::Device` values naming what failed.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod device;
pub mod launch;
#[allow(unsafe_code)]
pub mod nccl;
pub mod nvrtc;
pub mod ops;
pub mod probe;
pub mod schedule;

pub use device::{CudaStorage, Cx};
pub use ops::sources;

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use probe::BACKEND;

/// The CUDA backend: one device, one stream.
pub struct Cuda {
    pub(crate) cx: Cx,
    id: InstanceId,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({:?})", self.cx.device())
    }
}

impl Cuda {
    pub const NAME: &'static str = BACKEND;

    /// The backend on device 0; [`Error::Unavailable`] with the reason when
    /// the driver or the device is missing.
    pub fn new() -> Result<Self> {
        Self::on_device(0)
    }

    /// The backend on device `ordinal` (`cuda:N`). Unavailable without a
    /// usable driver, without that device, or without NVRTC (no kernel
    /// could be compiled).
    pub fn on_device(ordinal: usize) -> Result<Self> {
        probe::driver()?;
        match nvrtc::prebuilt_dir() {
            // Prebuilt kernels (`deepport kernels --out DIR`): no NVRTC needed.
            Some(dir) if !dir.is_dir() => {
                return Err(probe::unavailable(format!(
                    "DEEPPORT_CUDA_KERNELS={} is not a directory",
                    dir.display()
                )))
            }
            Some(_) => {}
            None => {
                nvrtc::probe().map_err(|why| {
                    probe::unavailable(format!(
                        "NVRTC (the kernel compiler) cannot be loaded: {why} \
                         (or set DEEPPORT_CUDA_KERNELS to a `deepport kernels` directory)"
                    ))
                })?;
            }
        }
        let id = InstanceId::fresh();
        Ok(Cuda {
            cx: Cx::new(ordinal, id)?,
            id,
        })
    }

    /// The launch context (for op glue tests and tools).
    pub fn cx(&self) -> &Cx {
        &self.cx
    }

    /// The device's description (name, arch, SMs, memory).
    pub fn desc(&self) -> &device::DeviceDesc {
        &self.cx.device().desc
    }

    fn nbytes(dtype: DType, shape: &[usize]) -> Result<usize> {
        shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| device::dev_err(format!("tensor {shape:?} of {dtype} is too large")))
    }

    fn tensor(&self, dtype: DType, shape: &[usize], s: CudaStorage) -> Tensor {
        Tensor::new(dtype, shape, Box::new(s), self.id)
    }
}

fn driver_text() -> String {
    let drv = probe::driver()
        .map(|d| format!("CUDA driver {} ({})", d.version_text(), d.library))
        .unwrap_or_else(|e| e.to_string());
    let rtc = nvrtc::probe().unwrap_or_else(|why| format!("NVRTC unavailable: {why}"));
    let nccl = nccl::probe().unwrap_or_else(|_| "no NCCL".into());
    format!("{drv}; {rtc}; {nccl}")
}

fn info_of(d: &device::DeviceDesc) -> DeviceInfo {
    DeviceInfo {
        backend: BACKEND.into(),
        device: format!(
            "{} ({}, {} SMs, {} MiB)",
            d.name,
            d.arch_name,
            d.arch.sms,
            d.total_mem >> 20
        ),
        driver: driver_text(),
        vendor: "NVIDIA".into(),
    }
}

/// The local ops whose kernels have landed (their `ops/` function
/// launches instead of answering `NotSupported`). Add an op here with its
/// kernel; `supports` answers from this list.
pub const KERNEL_OPS: &[OpKind] = &[
    OpKind::ActQuant,
    OpKind::WeightDequant,
    OpKind::Fp8Gemm,
    OpKind::Fp8GroupedContiguous,
    OpKind::Fp8GroupedMasked,
    OpKind::Gemm,
    OpKind::GemmGroupedContiguous,
    OpKind::GemmGroupedMasked,
    OpKind::RmsNorm,
    OpKind::MoeGate,
    OpKind::SiluMul,
    OpKind::Embedding,
    OpKind::Add,
    OpKind::CopyWindow,
    OpKind::GatherRows,
    OpKind::ReduceRows,
    OpKind::GetDispatchLayout,
    OpKind::MlaDecode,
    OpKind::MlaPrefill,
    OpKind::Rope,
];

/// The local ops core's expert-parallel protocol runs over.
pub const EP_BUILDING_BLOCKS: &[OpKind] = &[
    OpKind::GatherRows,
    OpKind::ReduceRows,
    OpKind::ActQuant,
    OpKind::GetDispatchLayout,
];

/// What `supports` answers for `op` when `kernels` are the local ops with
/// kernels: a local op is supported with its kernel; an expert-parallel op
/// when every building block of core's protocol is.
pub fn support_of(op: OpKind, kernels: &[OpKind]) -> Support {
    if op.is_local() {
        return if kernels.contains(&op) {
            Support::Supported
        } else {
            Support::NotSupported(format!("{} has no CUDA kernel yet", op.name()))
        };
    }
    let missing: Vec<&str> = EP_BUILDING_BLOCKS
        .iter()
        .filter(|k| !kernels.contains(k))
        .map(|k| k.name())
        .collect();
    if missing.is_empty() {
        Support::Supported
    } else {
        Support::NotSupported(format!(
            "{} runs over {}, which have no CUDA kernel yet",
            op.name(),
            missing.join(", ")
        ))
    }
}

/// Every local op, forwarded to its op glue in `ops/`.
macro_rules! forward_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            crate::ops::$method(&self.cx, op)
        }
    )*};
}

impl Backend for Cuda {
    fn name(&self) -> &str {
        BACKEND
    }

    fn instance(&self) -> InstanceId {
        self.id
    }

    fn info(&self) -> DeviceInfo {
        info_of(self.desc())
    }

    fn supports(&self, op: OpKind, _dtypes: &[DType]) -> Support {
        support_of(op, KERNEL_OPS)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = Self::nbytes(dtype, shape)?;
        let s = self.cx.storage("alloc", bytes)?;
        Ok(self.tensor(dtype, shape, s))
    }

    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        // cuMemsetD8Async on the stream, not a host upload of zeros.
        let bytes = Self::nbytes(dtype, shape)?;
        let s = self.cx.storage("alloc_zeroed", bytes)?;
        self.cx.device().zero("alloc_zeroed", s.ptr(), bytes)?;
        Ok(self.tensor(dtype, shape, s))
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let s = self.cx.storage("upload", host.bytes().len())?;
        self.cx.device().upload("upload", s.ptr(), host.bytes())?;
        Ok(self.tensor(host.dtype(), host.shape(), s))
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let s = t.storage_for::<CudaStorage>(self.id, BACKEND)?;
        let bytes = self.cx.read("download", s, t.offset_bytes(), t.nbytes())?;
        HostTensor::from_bytes(t.dtype(), t.shape(), bytes)
    }

    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        if src.dtype() != dst.dtype() || src.shape() != dst.shape() {
            return Err(Error::Other(format!(
                "write: host tensor {} {:?} differs from device tensor {} {:?}",
                src.dtype(),
                src.shape(),
                dst.dtype(),
                dst.shape()
            )));
        }
        let n = dst.nbytes();
        let s = dst.storage_mut_for::<CudaStorage>(self.id, BACKEND)?;
        if n > s.bytes() {
            return Err(device::dev_err(format!(
                "write: {n} bytes into a {}-byte buffer",
                s.bytes()
            )));
        }
        let ptr = s.ptr();
        self.cx.device().upload("write", ptr, src.bytes())
    }

    fn synchronize(&self) -> Result<()> {
        self.cx.synchronize("synchronize")
    }

    deepport_core::for_each_local_op!(forward_local_ops);
}

/// The CUDA devices here, in the order `cuda:N` numbers them; the reason
/// when the driver is unusable.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let d = probe::driver()?;
    (0..d.devices)
        .map(|i| device::describe(i).map(|desc| info_of(&desc)))
        .collect()
}

/// Registers `cuda` (`cuda:N` picks device N). Creating it probes the
/// driver and returns [`Error::Unavailable`] with the reason when it cannot
/// run here.
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "CUDA kernels compiled by NVRTC (sm_80+, Hopper sm_90a paths), NCCL expert parallelism",
        |device| Ok(Box::new(Cuda::on_device(device.unwrap_or(0))?)),
        devices,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_follows_the_kernel_list() {
        let s = support_of(OpKind::RmsNorm, &[]);
        assert!(
            matches!(&s, Support::NotSupported(r) if r.contains("rms_norm")),
            "{s:?}"
        );
        assert!(support_of(OpKind::RmsNorm, &[OpKind::RmsNorm]).is_supported());
        let s = support_of(OpKind::Dispatch, &[OpKind::GatherRows, OpKind::ActQuant]);
        assert!(
            matches!(&s, Support::NotSupported(r) if r.contains("reduce_rows") && r.contains("get_dispatch_layout") && !r.contains("gather_rows")),
            "{s:?}"
        );
        assert!(support_of(OpKind::Combine, EP_BUILDING_BLOCKS).is_supported());
        // Today's list: every local op in it is one of core's.
        for k in KERNEL_OPS {
            assert!(k.is_local(), "{k:?}");
        }
    }
}
