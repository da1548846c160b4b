//! CPU backends of deepport.
//!
//! * `cpu-ref` ([`CpuRef`]): every op of `SPEC.md` as the plainest correct
//!   loops with f64 accumulation. It is the oracle that every other backend
//!   is judged against on shapes too large for stored golden data, so it is
//!   never optimised; it may run independent output elements in parallel
//!   without changing their arithmetic.
//! * `cpu` ([`Cpu`]): the fast path. Until the fast-CPU work lands it
//!   delegates every op to the reference code, and says so in its device info.
//!
//! Device memory is host memory ([`HostStorage`]); both backends share it.

#![forbid(unsafe_code)]

mod copy;
mod dense;
mod ep;
mod mla;
pub mod util;

use deepport_core::backend::{Backend, DeviceInfo, Storage, Support, Tensor};
use deepport_core::comm::Communicator;
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use std::any::Any;

/// Bytes of a CPU tensor.
pub struct HostStorage {
    backend: &'static str,
    pub(crate) bytes: Vec<u8>,
}

impl Storage for HostStorage {
    fn backend(&self) -> &str {
        self.backend
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn storage(t: &Tensor) -> Result<&HostStorage> {
    t.storage::<HostStorage>("cpu")
}

/// Copies a CPU tensor out as a host tensor.
pub(crate) fn to_host(t: &Tensor) -> Result<HostTensor> {
    HostTensor::from_bytes(t.dtype(), t.shape(), storage(t)?.bytes.clone())
}

/// Overwrites a CPU tensor with host data of the same dtype and size.
pub(crate) fn store(t: &mut Tensor, h: &HostTensor) -> Result<()> {
    if h.dtype() != t.dtype() || h.numel() != t.numel() {
        return Err(Error::Other(format!(
            "cannot write a {} {:?} host tensor into a {} {:?} tensor",
            h.dtype(),
            h.shape(),
            t.dtype(),
            t.shape()
        )));
    }
    let s = t.storage_mut::<HostStorage>("cpu")?;
    s.bytes.copy_from_slice(h.bytes());
    Ok(())
}

fn device_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

macro_rules! memory_ops {
    ($name:expr) => {
        fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
            let n = deepport_core::tensor::numel(shape)
                .checked_mul(dtype.size())
                .ok_or_else(|| Error::Device {
                    backend: $name.into(),
                    msg: format!("tensor {shape:?} is too large"),
                })?;
            let mut bytes = Vec::new();
            bytes.try_reserve_exact(n).map_err(|e| Error::Device {
                backend: $name.into(),
                msg: format!("out of memory allocating {n} bytes: {e}"),
            })?;
            bytes.resize(n, 0);
            Ok(Tensor::new(
                dtype,
                shape,
                Box::new(HostStorage {
                    backend: $name,
                    bytes,
                }),
            ))
        }
        fn upload(&self, host: &HostTensor) -> Result<Tensor> {
            Ok(Tensor::new(
                host.dtype(),
                host.shape(),
                Box::new(HostStorage {
                    backend: $name,
                    bytes: host.bytes().to_vec(),
                }),
            ))
        }
        fn download(&self, t: &Tensor) -> Result<HostTensor> {
            to_host(t)
        }
        fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
            if src.shape() != dst.shape() {
                return Err(Error::Other(format!(
                    "write: host tensor shape {:?} differs from device tensor shape {:?}",
                    src.shape(),
                    dst.shape()
                )));
            }
            store(dst, src)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
    };
}

/// The reference kernel of every local op, by its method name: a new op's
/// kernel is a `pub(crate) fn <method>(op: &mut Checked<Op<'_>>)` in one of
/// these modules.
mod kernels {
    pub(crate) use crate::copy::copy_window;
    pub(crate) use crate::dense::*;
    pub(crate) use crate::ep::get_dispatch_layout;
    pub(crate) use crate::mla::*;
}

/// Every local op, forwarded to its reference kernel.
macro_rules! reference_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            kernels::$method(op)
        }
    )*};
}

macro_rules! reference_ops {
    () => {
        deepport_core::for_each_local_op!(reference_local_ops);
        fn dispatch(
            &self,
            comm: &dyn Communicator,
            op: &Checked<Dispatch<'_>>,
        ) -> Result<DispatchOutput> {
            ep::dispatch(self, comm, op)
        }
        fn combine(&self, comm: &dyn Communicator, op: &mut Checked<Combine<'_>>) -> Result<()> {
            ep::combine(comm, op)
        }
        fn low_latency_dispatch(
            &self,
            comm: &dyn Communicator,
            op: &Checked<LowLatencyDispatch<'_>>,
        ) -> Result<LowLatencyDispatchOutput> {
            ep::low_latency_dispatch(self, comm, op)
        }
        fn low_latency_combine(
            &self,
            comm: &dyn Communicator,
            op: &mut Checked<LowLatencyCombine<'_>>,
        ) -> Result<()> {
            ep::low_latency_combine(comm, op)
        }
    };
}

/// The reference backend (`cpu-ref`): the oracle.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuRef;

impl CpuRef {
    pub const NAME: &'static str = "cpu-ref";
    pub fn new() -> Self {
        CpuRef
    }
}

impl Backend for CpuRef {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: Self::NAME.into(),
            device: device_name(),
            driver: format!(
                "deepport-cpu {} (reference loops, f64 accumulation)",
                env!("CARGO_PKG_VERSION")
            ),
            vendor: "cpu".into(),
        }
    }
    fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
        // The reference implements every op for every dtype combination
        // that core's validation accepts.
        Support::Supported
    }
    memory_ops!("cpu-ref");
    reference_ops!();
}

/// The fast CPU backend (`cpu`). Delegates to the reference code for now.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

impl Cpu {
    pub const NAME: &'static str = "cpu";
    pub fn new() -> Self {
        Cpu
    }
}

impl Backend for Cpu {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: Self::NAME.into(),
            device: device_name(),
            driver: format!(
                "deepport-cpu {} (fast path not written yet: delegates to the reference loops)",
                env!("CARGO_PKG_VERSION")
            ),
            vendor: "cpu".into(),
        }
    }
    fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
        Support::Supported
    }
    memory_ops!("cpu");
    reference_ops!();
}

/// Registers `cpu` and `cpu-ref`.
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        "cpu",
        "CPU fast path (delegates to the reference for now)",
        || Ok(Box::new(Cpu)),
    );
    reg.register(
        "cpu-ref",
        "CPU reference: plain loops, f64 accumulation (the oracle)",
        || Ok(Box::new(CpuRef)),
    );
}
