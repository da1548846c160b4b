//! The `rocm` backend: one device, HIP's default stream, device memory
//! through the runtime binding, and every local op through the CUDA
//! backend's op glue (`deepport_cuda::ops::glue`) on [`RocmCx`], which
//! loads the hiprtc-compiled code objects and launches them.
//!
//! Every call first makes the device current on the calling thread
//! (`hipSetDevice`), since HIP's current device is per thread and ops may
//! be called from any thread. Copies are synchronous
//! (`hipMemcpyHtoD`/`DtoH`, ordered after the kernels queued on the
//! default stream); `download` and `synchronize` report the first
//! deferred-check error (index ranges, finiteness) since the last one.

use crate::device::{compiled, Compiler, RocmCx};
use crate::hip::{self, dev_err, DeviceDesc, BACKEND};
use crate::runtime::Runtime;
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::device::Storage;
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use std::sync::Arc;

/// Device memory of one allocation, freed on drop.
pub struct RocmStorage {
    rt: Arc<dyn Runtime>,
    device: usize,
    ptr: u64,
    bytes: usize,
    label: String,
}

impl RocmStorage {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The device ordinal (`rocm:N`).
    pub fn device(&self) -> usize {
        self.device
    }
}

impl Drop for RocmStorage {
    fn drop(&mut self) {
        // Nothing to report to: a failed free leaks the allocation.
        // (hipFree waits for the device, so no queued kernel still reads it.)
        if self.rt.set_device(self.device).is_ok() {
            let _ = self.rt.free(self.ptr);
        }
    }
}

impl Storage for RocmStorage {
    fn backend(&self) -> &str {
        &self.label
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The ROCm backend on one device.
pub struct Rocm {
    cx: RocmCx,
    desc: DeviceDesc,
    id: InstanceId,
}

impl std::fmt::Debug for Rocm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rocm({}: {} {})",
            self.cx.device(),
            self.desc.name,
            self.desc.gfx
        )
    }
}

pub(crate) fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason,
    }
}

impl Rocm {
    /// The backend on device `ordinal` (`rocm:N`); `Unavailable` with the
    /// reason without a HIP runtime, without hiprtc, without a device, or
    /// without that one.
    pub fn on_device(ordinal: usize) -> Result<Self> {
        hip::probe().map_err(unavailable)?;
        let hip = hip::library().map_err(unavailable)?;
        crate::hiprtc::probe().map_err(|why| {
            unavailable(format!(
                "hiprtc (the kernel compiler) cannot be loaded: {why}"
            ))
        })?;
        let n = hip.device_count()?;
        if ordinal >= n {
            return Err(deepport_core::registry::no_such_device(BACKEND, ordinal, n));
        }
        hip.set_device(ordinal)?;
        let desc = hip.describe(ordinal)?;
        Self::with_runtime(Arc::new(hip), ordinal, desc, compiled)
    }

    /// The backend over any [`Runtime`] (the tests' host-memory stand-in,
    /// a tool's recorder), compiling with `compiler` for `desc.gfx`.
    pub fn with_runtime(
        rt: Arc<dyn Runtime>,
        device: usize,
        desc: DeviceDesc,
        compiler: Compiler,
    ) -> Result<Self> {
        let id = InstanceId::fresh();
        Ok(Rocm {
            cx: RocmCx::new(rt, device, &desc, id, compiler)?,
            desc,
            id,
        })
    }

    /// The device's description.
    pub fn desc(&self) -> &DeviceDesc {
        &self.desc
    }

    /// The launch context (for tests and tools).
    pub fn cx(&self) -> &RocmCx {
        &self.cx
    }

    /// The e4m3 format this device computes in (`F8E4M3Fnuz` on gfx94x).
    pub fn fp8_dtype(&self) -> DType {
        crate::fp8::fp8_dtype(&self.desc.gfx)
    }

    /// Uploads a checkpoint FP8 weight with its block scales in the
    /// device's format: on gfx94x an OCP e4m3 weight becomes e4m3fnuz and
    /// its scales are doubled (every dequantized value kept, see
    /// [`crate::fp8`]); elsewhere both are uploaded unchanged.
    pub fn upload_fp8_weight(
        &self,
        weight: &HostTensor,
        scale: &HostTensor,
    ) -> Result<(Tensor, Tensor)> {
        let (w, s) = crate::fp8::for_device(&self.desc.gfx, weight, scale)?;
        Ok((self.upload(&w)?, self.upload(&s)?))
    }

    fn storage(&self, what: &str, bytes: usize) -> Result<RocmStorage> {
        let rt = self.cx.runtime();
        self.cx.current()?;
        let ptr = rt
            .malloc(bytes)
            .map_err(|e| dev_err(format!("{what}: {bytes} bytes: {e}")))?;
        Ok(RocmStorage {
            rt: rt.clone(),
            device: self.cx.device(),
            ptr,
            bytes,
            label: format!("{BACKEND}:{}", self.cx.device()),
        })
    }

    fn tensor(&self, dtype: DType, shape: &[usize], s: RocmStorage) -> Tensor {
        Tensor::new(dtype, shape, Box::new(s), self.id)
    }
}

/// The description of a device in `DeviceInfo` form.
pub fn info_of(desc: &DeviceDesc) -> DeviceInfo {
    DeviceInfo {
        backend: BACKEND.into(),
        device: format!(
            "{} ({}, {} CUs, wavefront {})",
            desc.name, desc.gfx, desc.compute_units, desc.warp_size
        ),
        driver: hip::probe().unwrap_or_else(|e| e),
        vendor: "AMD".into(),
    }
}

/// What `supports` answers: the CUDA backend's list of local ops with
/// kernels (the same glue and sources run here); an expert-parallel op
/// when core's protocol has every building block.
pub fn support_of(op: OpKind) -> Support {
    match deepport_cuda::support_of(op, deepport_cuda::KERNEL_OPS) {
        Support::NotSupported(why) => Support::NotSupported(why.replace("CUDA", "ROCm")),
        s => s,
    }
}

/// The op glue: the CUDA backend's, but the MFMA paths of this backend
/// where it has them.
mod glue {
    pub use crate::mfma::{fp8_gemm, fp8_grouped_contiguous, fp8_grouped_masked};
    pub use deepport_cuda::ops::glue::*;
}

/// Every local op, forwarded to its glue.
macro_rules! forward_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            glue::$method(&self.cx, op)
        }
    )*};
}

impl Backend for Rocm {
    fn name(&self) -> &str {
        BACKEND
    }

    fn instance(&self) -> InstanceId {
        self.id
    }

    fn info(&self) -> DeviceInfo {
        info_of(&self.desc)
    }

    fn supports(&self, op: OpKind, _dtypes: &[DType]) -> Support {
        support_of(op)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| dev_err(format!("alloc: tensor {shape:?} of {dtype} is too large")))?;
        let s = self.storage("alloc", bytes)?;
        Ok(self.tensor(dtype, shape, s))
    }

    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        // hipMemset on the device, not a host upload of zeros.
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                dev_err(format!(
                    "alloc_zeroed: tensor {shape:?} of {dtype} is too large"
                ))
            })?;
        let s = self.storage("alloc_zeroed", bytes)?;
        // SAFETY: `s` is a fresh allocation of exactly `bytes` bytes.
        unsafe { self.cx.runtime().memset(s.ptr, 0, bytes) }
            .map_err(|e| dev_err(format!("alloc_zeroed: {e}")))?;
        Ok(self.tensor(dtype, shape, s))
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let s = self.storage("upload", host.bytes().len())?;
        // SAFETY: `s` is a fresh allocation of exactly `host.bytes().len()` bytes.
        unsafe { self.cx.runtime().htod(s.ptr, host.bytes()) }
            .map_err(|e| dev_err(format!("upload: {e}")))?;
        Ok(self.tensor(host.dtype(), host.shape(), s))
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let s = t.storage_for::<RocmStorage>(self.id, BACKEND)?;
        let ptr = crate::device::addr(s.ptr, s.bytes, t)
            .map_err(|e| dev_err(format!("download: {e}")))?;
        self.cx.current()?;
        let mut out = vec![0u8; t.nbytes()];
        // SAFETY: `ptr .. + n` lies inside the allocation (checked above).
        unsafe { self.cx.runtime().dtoh(&mut out, ptr) }
            .map_err(|e| dev_err(format!("download: {e}")))?;
        // A pending check error wins over the data.
        self.cx.synchronize()?;
        HostTensor::from_bytes(t.dtype(), t.shape(), out)
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
        let desc = format!("{dst:?}");
        let s = dst.storage_mut_for::<RocmStorage>(self.id, BACKEND)?;
        let (base, bytes) = (s.ptr, s.bytes);
        let off = dst.offset_bytes();
        if off
            .checked_add(src.bytes().len())
            .is_none_or(|end| end > bytes)
        {
            return Err(dev_err(format!(
                "write: {} bytes at offset {off} of {desc} into a {bytes}-byte buffer",
                src.bytes().len()
            )));
        }
        self.cx.current()?;
        // SAFETY: `[off, off + len)` lies inside the allocation (checked above).
        unsafe { self.cx.runtime().htod(base + off as u64, src.bytes()) }
            .map_err(|e| dev_err(format!("write: {e}")))
    }

    fn synchronize(&self) -> Result<()> {
        self.cx.synchronize()
    }

    deepport_core::for_each_local_op!(forward_local_ops);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_local_op_is_supported_with_the_cuda_glue() {
        for &op in deepport_cuda::KERNEL_OPS {
            assert!(support_of(op).is_supported(), "{op:?}");
        }
        assert!(support_of(OpKind::Dispatch).is_supported());
        // An op without a kernel would name ROCm, not CUDA.
        let s = deepport_cuda::support_of(OpKind::RmsNorm, &[]);
        assert!(matches!(&s, Support::NotSupported(r) if r.contains("CUDA")));
    }
}
