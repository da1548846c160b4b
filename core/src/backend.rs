//! The `Backend` trait, capability answers and device info.
//!
//! A backend owns device memory and runs ops. Callers never see device
//! pointers: they allocate, upload, download and synchronize through the
//! trait, and pass [`Tensor`] handles inside typed, validated op arguments
//! ([`crate::ops`]). The trait is object safe so that the registry and the
//! command line choose a backend at run time by name and device
//! (`wgpu:0`, see [`crate::registry`]).
//!
//! Every op method has a default body that returns
//! [`Error::NotSupported`]: a vendor port can start from nothing, and an op
//! it has not written yet is reported as such, never silently skipped.
//!
//! # Instances
//!
//! Each backend object is one *instance* ([`Backend::instance`]): one device
//! of one backend. Tensors carry the id of the instance that made them and
//! core refuses an op whose tensors belong to another instance
//! ([`Error::ForeignTensor`]), so a tensor of GPU 0 is never read by GPU 1.
//!
//! # The asynchronous contract
//!
//! An op call may only *enqueue* work. What is checked when:
//!
//! * **At the call, always:** everything core validates (shapes, dtypes,
//!   parameters, ownership, views as outputs), and `NotSupported`. A backend
//!   must answer [`Backend::supports`] and fail an op it cannot run before
//!   it enqueues anything.
//! * **At the call or later:** errors that need the *values* of device
//!   tensors — an index out of range in a block table, a token id, an expert
//!   id ([`Error::IndexOutOfRange`]), a forbidden non-finite input
//!   ([`Error::NonFinite`]) — and device faults ([`Error::Device`]: out of
//!   memory during execution, device lost). A backend that runs
//!   asynchronously may report them at the next [`Backend::download`] or
//!   [`Backend::synchronize`] of *any* tensor of that instance instead; it
//!   must never drop them. Outputs of the failing op are then unspecified,
//!   and the download that reports the error returns no data.
//! * **Expert-parallel ops** exchange data with other ranks, so they
//!   synchronize the data they send; their routing errors surface at the
//!   call, on every rank (see [`crate::ep`]).
//!
//! Whoever judges results (the conformance runner, the forward pass's
//! golden checks) calls [`Backend::synchronize`] before it reads outputs and
//! treats an error there as the op's error.

use crate::comm::Communicator;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::*;
use crate::tensor::{numel, HostTensor};

pub use crate::device::{InstanceId, Storage, Tensor};

/// Where a buffer goes when its user is done with it (see
/// [`Backend::adopt`] and [`crate::comm::Transport::recycler`]).
pub type Recycler = std::sync::Arc<dyn Fn(Vec<u8>) + Send + Sync>;

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
    /// This instance's id: every tensor it makes carries it, and core
    /// refuses to launch an op on tensors of another instance. A wrapper
    /// backend that delegates memory to an inner backend returns the inner
    /// backend's id.
    fn instance(&self) -> InstanceId;
    /// Device, driver and vendor.
    fn info(&self) -> DeviceInfo;
    /// Whether `op` runs with these dtypes (in the op's argument order, as
    /// [`OpArgs::dtypes`] lists them). Must agree with what the op does.
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support;

    /// Allocates an uninitialised tensor.
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor>;
    /// Allocates a tensor that the caller's next op overwrites entirely
    /// (every element of an op's output) before anything reads it: a
    /// backend that clears what [`Backend::alloc`] returns (the CPU
    /// backends do) may skip that here. Defaults to [`Backend::alloc`].
    fn alloc_output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.alloc(dtype, shape)
    }
    /// Allocates a tensor of zero bytes (0.0 in every float dtype): for an
    /// output an op writes only in part whose other elements are read
    /// later — the model's masked grouped GEMM outputs, whose masked-off
    /// rows `silu_mul` and `act_quant` go over whole. Defaults to
    /// [`Backend::alloc`] and a [`Backend::write`] of zeros from the host;
    /// a device backend should clear on the device instead (a memset).
    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let mut t = self.alloc(dtype, shape)?;
        self.write(&mut t, &HostTensor::zeros(dtype, shape))?;
        Ok(t)
    }
    /// Copies a host tensor to the device.
    fn upload(&self, host: &HostTensor) -> Result<Tensor>;
    /// Copies a device tensor to the host (waits for pending work on it).
    fn download(&self, t: &Tensor) -> Result<HostTensor>;
    /// Overwrites a device tensor with host data of the same dtype and shape.
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()>;
    /// Waits until all submitted work has finished.
    fn synchronize(&self) -> Result<()>;

    // ---- host memory (optional) -------------------------------------------
    //
    // A backend whose memory *is* host memory (`cpu`, `cpu-ref`) lets core
    // read a tensor in place and adopt a host buffer as a tensor, so that
    // expert-parallel payloads move between the transport and the tensors
    // with no download or upload copy ([`crate::ep`]). Every other backend
    // keeps the defaults: `None`, and an upload.

    /// `t`'s bytes read in place, when this backend's memory is host memory
    /// and `t` is its tensor; `None` otherwise (the default answer for
    /// every storage that does not implement [`Storage::host_bytes`]).
    /// The bytes are current: a host backend runs its ops synchronously.
    fn host_view<'t>(&self, t: &'t Tensor) -> Option<&'t [u8]> {
        t.check_owner(self.instance(), self.name()).ok()?;
        t.host_bytes()
    }

    /// A tensor of `dtype` and `shape` holding `bytes` (exactly
    /// `numel(shape) · dtype.size()` of them; the capacity may be larger).
    /// A host-memory backend takes the buffer as the tensor's storage,
    /// without a copy, and hands it to `recycle` (when given) once the
    /// storage is dropped, so the buffer can serve again (a transport's
    /// receive buffer: no fresh pages to fault in). Default: an upload
    /// (a copy), then the buffer goes to `recycle` at once.
    fn adopt(
        &self,
        dtype: DType,
        shape: &[usize],
        bytes: Vec<u8>,
        recycle: Option<Recycler>,
    ) -> Result<Tensor> {
        let host = HostTensor::from_bytes(dtype, shape, bytes)?;
        let t = self.upload(&host)?;
        if let Some(r) = recycle {
            r(host.into_bytes());
        }
        Ok(t)
    }

    /// Turns device-side kernel timing (e.g. timestamp queries around each
    /// op) on or off; returns whether the backend measures. Default: no.
    fn set_device_timing(&self, _on: bool) -> bool {
        false
    }
    /// Device time of the work completed since the last call, in seconds
    /// (call after `synchronize`); `None` when not measuring. For
    /// `deepport bench`.
    fn take_device_seconds(&self) -> Option<f64> {
        None
    }

    // One method per local op (`act_quant`, `fp8_gemm`, …; the list is
    // `ops::for_each_local_op!`), each defaulting to `NotSupported`.
    crate::for_each_local_op!(default_local_methods);

    // ---- expert parallelism ----------------------------------------------
    //
    // The expert-parallel ops (`ops::dispatch`, `ops::combine`,
    // `ops::low_latency_dispatch`, `ops::low_latency_combine`) are written
    // once, in core ([`crate::ep`]): routing plan, wire format, handle
    // checks and combine order. A backend supplies their kernels —
    // `gather_rows`, `reduce_rows`, `act_quant`, `get_dispatch_layout` — and
    // gets all four. The `native_*` hooks below let a backend whose fabric
    // does better (NVSHMEM-style fused kernels) run its own implementation
    // instead; `Ok(None)`, the default, means "use core's protocol", the only
    // choice that lets ranks of different backends share a group.

    /// A backend's own normal dispatch; `Ok(None)` runs core's protocol.
    fn native_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<Dispatch<'_>>,
    ) -> Result<Option<DispatchOutput>> {
        let _ = (comm, op);
        Ok(None)
    }
    /// A backend's own normal combine; `Ok(None)` runs core's protocol.
    fn native_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<Combine<'_>>,
    ) -> Result<Option<()>> {
        let _ = (comm, op);
        Ok(None)
    }
    /// A backend's own low-latency dispatch; `Ok(None)` runs core's protocol.
    fn native_low_latency_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<LowLatencyDispatch<'_>>,
    ) -> Result<Option<LowLatencyDispatchOutput>> {
        let _ = (comm, op);
        Ok(None)
    }
    /// A backend's own low-latency combine; `Ok(None)` runs core's protocol.
    fn native_low_latency_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<LowLatencyCombine<'_>>,
    ) -> Result<Option<()>> {
        let _ = (comm, op);
        Ok(None)
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
