//! Adapter and device creation, error scopes and device loss.

use super::checks::{STATUS_SLOT, STATUS_SLOTS};
use super::record::{block_on, PARAM_SLOT, PARAM_SLOTS};
use super::{lock, Ctx, State, BACKEND};
use deepport_core::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Options for creating the backend (tests use them to exercise limits).
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Caps workgroups per dispatch dimension below the device limit, so
    /// that split dispatches can be tested on small problems.
    pub max_workgroups_per_dim: Option<u32>,
    /// Caps the bytes a kernel may bind per buffer below the device's
    /// `max_storage_buffer_binding_size` (to test the error path).
    pub max_storage_binding: Option<u64>,
    /// Picks the first adapter whose name contains this (case-insensitive);
    /// otherwise `DEEPPORT_WGPU_ADAPTER`, otherwise wgpu's high-performance
    /// choice.
    pub adapter: Option<String>,
    /// Picks the N-th adapter of [`adapters`] (`wgpu:N`); overrides `adapter`.
    pub device: Option<usize>,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason: reason.into(),
    }
}

fn backends() -> wgpu::Backends {
    #[allow(unused_mut)]
    let mut b = wgpu::Backends::VULKAN;
    #[cfg(feature = "metal")]
    {
        b |= wgpu::Backends::METAL;
    }
    #[cfg(feature = "dx12")]
    {
        b |= wgpu::Backends::DX12;
    }
    b
}

/// Pops error scopes (innermost first) and reports the first error.
pub(super) fn pop_scopes(scopes: &mut Vec<wgpu::ErrorScopeGuard>) -> Option<String> {
    let mut first = None;
    while let Some(s) = scopes.pop() {
        if let Some(e) = block_on(s.pop()) {
            let kind = match &e {
                wgpu::Error::OutOfMemory { .. } => "out of device memory",
                wgpu::Error::Validation { .. } => "validation error",
                wgpu::Error::Internal { .. } => "internal error",
            };
            first.get_or_insert_with(|| format!("{kind}: {e}"));
        }
    }
    first
}

pub(super) fn push_scopes(device: &wgpu::Device) -> Vec<wgpu::ErrorScopeGuard> {
    vec![
        device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
        device.push_error_scope(wgpu::ErrorFilter::Internal),
        device.push_error_scope(wgpu::ErrorFilter::Validation),
    ]
}

impl Ctx {
    /// Probes for an adapter and creates the device; `Unavailable` with the
    /// reason when there is none.
    pub(crate) fn new(opts: &WgpuOptions) -> Result<Ctx> {
        let backends = backends();
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = backends;
        desc.flags = wgpu::InstanceFlags::empty().with_env();
        let instance = wgpu::Instance::new(desc);
        let wanted = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("DEEPPORT_WGPU_ADAPTER").ok())
            .filter(|s| !s.is_empty());
        let adapter = match (opts.device, wanted) {
            (Some(i), _) => {
                let mut all = block_on(instance.enumerate_adapters(backends));
                let n = all.len();
                if i >= n {
                    return Err(deepport_core::registry::no_such_device(BACKEND, i, n));
                }
                all.swap_remove(i)
            }
            (None, Some(name)) => {
                let all = block_on(instance.enumerate_adapters(backends));
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                let pos = names
                    .iter()
                    .position(|n| n.to_lowercase().contains(&name.to_lowercase()))
                    .ok_or_else(|| {
                        unavailable(format!(
                            "no adapter matches `{name}` (adapters: {})",
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        ))
                    })?;
                all.into_iter()
                    .nth(pos)
                    .ok_or_else(|| unavailable("adapter vanished"))?
            }
            (None, None) => block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            }))
            .map_err(|e| {
                unavailable(format!(
                    "no {backends:?} adapter ({e}); install a Vulkan driver \
                     (e.g. mesa-vulkan-drivers for lavapipe on the CPU)"
                ))
            })?,
        };
        let adapter_info = adapter.get_info();
        let af = adapter.features();
        let mut features = wgpu::Features::empty();
        for f in [wgpu::Features::SHADER_F16, wgpu::Features::SUBGROUP] {
            if af.contains(f) {
                features |= f;
            }
        }
        let limits = adapter.limits();
        if limits.max_compute_invocations_per_workgroup < 256
            || limits.max_compute_workgroup_size_x < 256
            || limits.max_compute_workgroup_storage_size < 16384
        {
            return Err(unavailable(format!(
                "adapter `{}` allows {} invocations per workgroup and {} bytes of \
                 workgroup memory; the kernels need 256 and 16384",
                adapter_info.name,
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_storage_size
            )));
        }
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("deepport"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| {
            unavailable(format!(
                "adapter `{}` refused a device: {e}",
                adapter_info.name
            ))
        })?;
        let lost = Arc::new(Mutex::new(None::<String>));
        let l2 = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *lock(&l2) = Some(format!("device lost ({reason:?}): {msg}"));
        });
        let uncaptured = Arc::new(Mutex::new(Vec::<String>::new()));
        let u2 = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&u2).push(e.to_string());
        }));
        let mut max_groups = limits.max_compute_workgroups_per_dimension.max(1);
        if let Some(m) = opts.max_workgroups_per_dim {
            max_groups = max_groups.min(m.max(1));
        }
        let mut max_binding = limits
            .max_storage_buffer_binding_size
            .min(u32::MAX as u64 - 3);
        if let Some(m) = opts.max_storage_binding {
            max_binding = max_binding.min(m);
        }
        let scopes = push_scopes(&device);
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("deepport params"),
            size: PARAM_SLOT * PARAM_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let status = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("deepport status"),
            size: STATUS_SLOT * STATUS_SLOTS as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut scopes = scopes;
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(unavailable(format!("creating the work buffers: {e}")));
        }
        Ok(Ctx {
            device,
            queue,
            adapter_info,
            limits,
            features,
            max_groups,
            max_binding,
            params,
            status,
            lost,
            uncaptured,
            recorder: Mutex::new(None),
            state: Mutex::new(State {
                pipelines: HashMap::new(),
                pending: Vec::new(),
                pending_ops: Vec::new(),
                next_param: 0,
                next_status: 0,
                checks: Vec::new(),
                tables: HashMap::new(),
            }),
        })
    }

    /// Destroys the device (test hook for device loss).
    pub(crate) fn destroy(&self) {
        self.device.destroy();
        // wgpu reports the loss from its next maintenance pass.
        let _ = self.device.poll(wgpu::PollType::Poll);
    }
}

/// Every adapter wgpu finds (the order of `wgpu:N`).
pub(crate) fn adapters() -> Result<Vec<wgpu::AdapterInfo>> {
    let backends = backends();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    desc.flags = wgpu::InstanceFlags::empty().with_env();
    let instance = wgpu::Instance::new(desc);
    let all = block_on(instance.enumerate_adapters(backends));
    if all.is_empty() {
        return Err(unavailable(format!(
            "no {backends:?} adapter; install a Vulkan driver (e.g. mesa-vulkan-drivers for lavapipe on the CPU)"
        )));
    }
    Ok(all.iter().map(|a| a.get_info()).collect())
}
