//! The `rocm` backend of this slice: one device, HIP's default stream,
//! device memory (alloc, upload, download, write, synchronize) through the
//! runtime binding; every op answers `NotSupported` until the kernels'
//! launch glue lands (the kernels themselves already compile, see
//! `tests/compile.rs`).
//!
//! Every call first makes the device current on the calling thread
//! (`hipSetDevice`), since HIP's current device is per thread and ops may
//! be called from any thread. Copies are synchronous
//! (`hipMemcpyHtoD`/`DtoH`), so `synchronize` only waits for the default
//! stream.

use crate::hip::{self, dev_err, DeviceDesc, Hip, BACKEND};
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::device::Storage;
use deepport_core::ops::OpKind;
use deepport_core::{DType, Error, HostTensor, Result};

/// Device memory of one allocation, freed on drop.
pub struct RocmStorage {
    hip: &'static Hip,
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
}

impl Drop for RocmStorage {
    fn drop(&mut self) {
        // Nothing to report to: a failed free leaks the allocation.
        if self.hip.set_device(self.device).is_ok() {
            let _ = self.hip.free(self.ptr);
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
    hip: &'static Hip,
    device: usize,
    desc: DeviceDesc,
    id: InstanceId,
}

impl std::fmt::Debug for Rocm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rocm({}: {} {})",
            self.device, self.desc.name, self.desc.gfx
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
    /// reason without a HIP runtime, without a device, or without that one.
    pub fn on_device(ordinal: usize) -> Result<Self> {
        hip::probe().map_err(unavailable)?;
        let hip = hip::library().map_err(unavailable)?;
        let n = hip.device_count()?;
        if ordinal >= n {
            return Err(deepport_core::registry::no_such_device(BACKEND, ordinal, n));
        }
        hip.set_device(ordinal)?;
        let desc = hip.describe(ordinal)?;
        Ok(Rocm {
            hip,
            device: ordinal,
            desc,
            id: InstanceId::fresh(),
        })
    }

    /// The device's description.
    pub fn desc(&self) -> &DeviceDesc {
        &self.desc
    }

    fn current(&self) -> Result<()> {
        self.hip.set_device(self.device)
    }

    fn storage(&self, what: &str, bytes: usize) -> Result<RocmStorage> {
        self.current()?;
        let ptr = self
            .hip
            .malloc(bytes)
            .map_err(|e| dev_err(format!("{what}: {bytes} bytes: {e}")))?;
        Ok(RocmStorage {
            hip: self.hip,
            device: self.device,
            ptr,
            bytes,
            label: format!("{BACKEND}:{}", self.device),
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

/// What `supports` answers in this slice: no op has its launch glue yet.
pub fn support_of(op: OpKind) -> Support {
    Support::NotSupported(format!(
        "{} has no ROCm launch glue yet (the kernels compile with hiprtc; the runtime slice \
         has not landed)",
        op.name()
    ))
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

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let s = self.storage("upload", host.bytes().len())?;
        // SAFETY: `s` is a fresh allocation of exactly `host.bytes().len()` bytes.
        unsafe { self.hip.htod(s.ptr, host.bytes()) }
            .map_err(|e| dev_err(format!("upload: {e}")))?;
        Ok(self.tensor(host.dtype(), host.shape(), s))
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let s = t.storage_for::<RocmStorage>(self.id, BACKEND)?;
        let (off, n) = (t.offset_bytes(), t.nbytes());
        if off.checked_add(n).is_none_or(|end| end > s.bytes) {
            return Err(dev_err(format!(
                "download: bytes {off}..+{n} of a {}-byte buffer",
                s.bytes
            )));
        }
        self.current()?;
        self.hip.stream_synchronize(None)?;
        let mut out = vec![0u8; n];
        // SAFETY: `s.ptr + off .. + n` lies inside the allocation (checked above).
        unsafe { self.hip.dtoh(&mut out, s.ptr + off as u64) }
            .map_err(|e| dev_err(format!("download: {e}")))?;
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
        let s = dst.storage_mut_for::<RocmStorage>(self.id, BACKEND)?;
        if src.bytes().len() > s.bytes {
            return Err(dev_err(format!(
                "write: {} bytes into a {}-byte buffer",
                src.bytes().len(),
                s.bytes
            )));
        }
        let ptr = s.ptr;
        self.current()?;
        // SAFETY: the allocation at `ptr` holds at least `src.bytes().len()`
        // bytes (checked above).
        unsafe { self.hip.htod(ptr, src.bytes()) }.map_err(|e| dev_err(format!("write: {e}")))
    }

    fn synchronize(&self) -> Result<()> {
        self.current()?;
        self.hip.stream_synchronize(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_is_not_supported_in_this_slice() {
        for op in [
            OpKind::RmsNorm,
            OpKind::Fp8Gemm,
            OpKind::MlaDecode,
            OpKind::Dispatch,
        ] {
            let s = support_of(op);
            assert!(
                matches!(&s, Support::NotSupported(r) if r.contains(op.name())),
                "{s:?}"
            );
        }
    }
}
