//! The `Backend` trait, device tensors, capability answers and device info.
//!
//! A backend owns device memory and runs ops. Callers never see device
//! pointers: they allocate, upload, download and synchronize through the
//! trait, and pass [`Tensor`] handles inside typed, validated op arguments
//! ([`crate::ops`]). The trait is object safe so that the registry and the
//! command line choose a backend at run time by name.
//!
//! Every op method has a default body that returns
//! [`Error::NotSupported`]: a vendor port can start from nothing, and an op
//! it has not written yet is reported as such, never silently skipped.

use crate::comm::Communicator;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::*;
use crate::tensor::{numel, HostTensor};
use std::any::Any;
use std::fmt;

/// Backend-specific device memory behind a [`Tensor`].
pub trait Storage: Any + Send + Sync {
    /// Name of the backend that allocated this storage.
    fn backend(&self) -> &str;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A tensor in a backend's memory: dtype, shape and an opaque storage that
/// only the allocating backend can read.
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Box<dyn Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({}, {:?}, on {})",
            self.dtype,
            self.shape,
            self.storage.backend()
        )
    }
}

impl Tensor {
    /// Wraps backend storage. Backends call this from `alloc`/`upload`.
    pub fn new(dtype: DType, shape: &[usize], storage: Box<dyn Storage>) -> Self {
        Self {
            dtype,
            shape: shape.to_vec(),
            storage,
        }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// Size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Name of the backend that owns this tensor.
    pub fn owner(&self) -> &str {
        self.storage.backend()
    }

    /// Changes the shape (same element count) without touching the data.
    pub fn reshape(&mut self, shape: &[usize]) -> Result<()> {
        if numel(shape) != self.numel() {
            return Err(Error::Other(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// The backend storage, downcast; fails when another backend owns it.
    pub fn storage<S: Storage>(&self, backend: &str) -> Result<&S> {
        let owner = self.storage.backend().to_string();
        self.storage
            .as_any()
            .downcast_ref::<S>()
            .ok_or_else(|| Error::ForeignTensor {
                owner,
                backend: backend.to_string(),
            })
    }

    /// The backend storage, downcast mutably.
    pub fn storage_mut<S: Storage>(&mut self, backend: &str) -> Result<&mut S> {
        let owner = self.storage.backend().to_string();
        self.storage
            .as_any_mut()
            .downcast_mut::<S>()
            .ok_or_else(|| Error::ForeignTensor {
                owner,
                backend: backend.to_string(),
            })
    }
}

/// What a backend says about an op with given dtypes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Supported,
    NotSupported(String),
}

impl Support {
    pub fn is_supported(&self) -> bool {
        matches!(self, Support::Supported)
    }
}

/// Who and what a backend runs on; recorded in every report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Registered backend name (`cpu-ref`, `wgpu`, …).
    pub backend: String,
    /// Device name (GPU model, CPU model).
    pub device: String,
    /// Driver or runtime version.
    pub driver: String,
    /// Vendor (PCI vendor name or similar), for waivers.
    pub vendor: String,
}

/// The default local-op methods of [`Backend`]: `NotSupported`.
macro_rules! default_local_methods {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        #[doc = concat!("Runs [`", stringify!($kind), "`] (`", stringify!($method),
            "`, SPEC.md). Default: `NotSupported`.")]
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            Err(self.unsupported(op.kind()))
        }
    )*};
}

/// A device backend. See the module documentation.
pub trait Backend: Send + Sync {
    /// Registered name.
    fn name(&self) -> &str;
    /// Device, driver and vendor.
    fn info(&self) -> DeviceInfo;
    /// Whether `op` runs with these dtypes (in the op's argument order, as
    /// [`OpArgs::dtypes`] lists them). Must agree with what the op does.
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support;

    /// Allocates an uninitialised tensor.
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor>;
    /// Copies a host tensor to the device.
    fn upload(&self, host: &HostTensor) -> Result<Tensor>;
    /// Copies a device tensor to the host (waits for pending work on it).
    fn download(&self, t: &Tensor) -> Result<HostTensor>;
    /// Overwrites a device tensor with host data of the same dtype and shape.
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()>;
    /// Waits until all submitted work has finished.
    fn synchronize(&self) -> Result<()>;

    // One method per local op (`act_quant`, `fp8_gemm`, …; the list is
    // `ops::for_each_local_op!`), each defaulting to `NotSupported`.
    crate::for_each_local_op!(default_local_methods);

    /// Normal (DeepEP V1) dispatch. Output sizes depend on the routing, so
    /// the backend allocates them.
    fn dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<Dispatch<'_>>,
    ) -> Result<DispatchOutput> {
        let _ = comm;
        Err(self.unsupported(op.kind()))
    }
    fn combine(&self, comm: &dyn Communicator, op: &mut Checked<Combine<'_>>) -> Result<()> {
        let _ = comm;
        Err(self.unsupported(op.kind()))
    }
    fn low_latency_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<LowLatencyDispatch<'_>>,
    ) -> Result<LowLatencyDispatchOutput> {
        let _ = comm;
        Err(self.unsupported(op.kind()))
    }
    fn low_latency_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<LowLatencyCombine<'_>>,
    ) -> Result<()> {
        let _ = comm;
        Err(self.unsupported(op.kind()))
    }

    /// The `NotSupported` error for an op this backend lacks.
    fn unsupported(&self, op: OpKind) -> Error {
        Error::not_supported(self.name(), op.name(), "not implemented by this backend")
    }
}

/// Uploads `host`, runs nothing, and is handy in tests: allocate a tensor of
/// `dtype`/`shape` filled with NaN (floats) or `-1`-like garbage (`0xff`
/// bytes for integers), so a kernel that skips an output is caught.
pub fn alloc_poisoned(b: &dyn Backend, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    b.upload(&poison_host(dtype, shape))
}

/// A host tensor filled with NaN (float dtypes) or all-ones bytes.
pub fn poison_host(dtype: DType, shape: &[usize]) -> HostTensor {
    if dtype.is_float() {
        HostTensor::full(dtype, shape, f32::NAN)
    } else {
        let n = numel(shape) * dtype.size();
        HostTensor::from_bytes(dtype, shape, vec![0xff; n]).expect("sized above")
    }
}
