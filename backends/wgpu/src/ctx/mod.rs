//! The device side of the wgpu backend, one module per concern:
//!
//! * [`device`]: adapter and device creation ([`WgpuOptions`]), error
//!   scopes, device loss;
//! * [`memory`]: tensor storage ([`WgpuStorage`]), allocation, upload,
//!   write, download and synchronize;
//! * [`shader`]: kernels ([`Shader`]: WGSL body + generated bindings and
//!   accessors), their uniform [`Params`], and the pipeline cache;
//! * [`record`]: recording one op ([`Rec`]), batching command buffers and
//!   submitting them, and settling a batch (how an op runs is described
//!   there);
//! * [`window`]: binding tensors beyond the storage binding limit in row
//!   windows ([`Win`], [`Ctx::plan_rows`]) and the one place where a
//!   binding's byte range is decided ([`Ctx::binding`]);
//! * [`checks`]: device-side index and finiteness checks whose errors
//!   surface at the next `download` or `synchronize`.
//!
//! # Limits
//!
//! The device is created with the adapter's full limits. Dispatches beyond
//! `max_compute_workgroups_per_dimension` are split over y and z (kernels
//! use `wg_lin` from `shaders/common.wgsl`). A tensor larger than
//! `max_storage_buffer_binding_size` (128 MiB on lavapipe) is bound in
//! windows (`Win`): kernels run once per range of rows that
//! `Ctx::plan_rows` sizes to the limit, with aligned offsets. Only when a
//! single row does not fit does an op return `NotSupported`, naming the row
//! size and the limit. A tensor larger than `max_buffer_size` cannot be
//! allocated (`Error::Device` naming both).

pub(crate) mod checks;
pub(crate) mod device;
pub(crate) mod memory;
pub(crate) mod record;
pub(crate) mod shader;
pub(crate) mod window;

pub(crate) use checks::CheckKind;
pub(crate) use device::adapters;
pub use device::WgpuOptions;
pub use memory::WgpuStorage;
pub(crate) use memory::{buffer, padded, storage_of, view_buffer};
pub(crate) use record::Rec;
pub(crate) use shader::{Params, Shader};
pub(crate) use window::Win;

use checks::Check;
use deepport_core::{Error, Result};
use shader::Pipe;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Registered name of the backend.
pub(crate) const BACKEND: &str = "wgpu";

pub(crate) fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A size or index as u32 (kernels index with 32 bits).
pub(crate) fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::not_supported(
            BACKEND,
            op,
            format!("{what} = {v} exceeds the 32-bit indexing of the WGSL kernels"),
        )
    })
}

/// What is locked while an op records or a batch settles.
struct State {
    pipelines: HashMap<(&'static str, String), Arc<Pipe>>,
    pending: Vec<wgpu::CommandBuffer>,
    pending_ops: Vec<&'static str>,
    next_param: u64,
    next_status: u32,
    checks: Vec<Check>,
    tables: HashMap<Vec<u8>, wgpu::Buffer>,
}

pub(crate) struct Ctx {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) adapter_info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    pub(crate) features: wgpu::Features,
    max_groups: u32,
    max_binding: u64,
    params: wgpu::Buffer,
    status: wgpu::Buffer,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// The thread recording an op (it holds `state`): lets calls that would
    /// deadlock on `state` fail instead.
    recorder: Mutex<Option<std::thread::ThreadId>>,
    state: Mutex<State>,
}

impl Ctx {
    fn check_alive(&self, what: &str) -> Result<()> {
        if let Some(r) = lock(&self.lost).as_ref() {
            return Err(dev_err(format!("{what}: {r}")));
        }
        Ok(())
    }

    /// Locks the submission state, failing (instead of deadlocking) when
    /// this thread is recording an op: a kernel must `finish` its `Rec`
    /// before it downloads, writes or synchronizes.
    fn state(&self, what: &str) -> Result<MutexGuard<'_, State>> {
        if *lock(&self.recorder) == Some(std::thread::current().id()) {
            return Err(dev_err(format!(
                "{what} called while this thread records an op (finish the Rec first)"
            )));
        }
        Ok(lock(&self.state))
    }

    /// Number of workgroups the kernels may be dispatched with per dimension.
    pub(crate) fn max_groups(&self) -> u32 {
        self.max_groups
    }
}
