//! The device side of the wgpu backend: adapter and device, tensor buffers,
//! the pipeline cache, batched command submission, deferred index/finiteness
//! checks and error handling.
//!
//! # How an op runs
//!
//! A kernel module calls `Ctx::begin` with its op name and gets a `Rec`:
//! it holds the submission state, a fresh command encoder and three wgpu
//! error scopes (validation, out-of-memory, internal). `Rec::dispatch`
//! takes a `Shader` (WGSL body plus generated bindings), a `Params`
//! uniform block, the buffers and a linear workgroup count; the pipeline is
//! compiled once per (shader, generated header) and cached. `Rec::finish`
//! finishes the encoder and pops the scopes, so a validation error names the
//! op; the command buffer then waits in a batch. Batches are submitted
//! without waiting when they grow large, and on `download`/`synchronize`
//! (which then wait): no op blocks the host.
//!
//! # Index and finiteness checks
//!
//! Index values (token ids, positions, …) live on the device. Kernels never
//! read out of bounds (they clamp); a check kernel records the first bad
//! position in a small status buffer, and the error
//! (`Error::IndexOutOfRange`, `Error::NonFinite`) is returned by the next
//! `download` or `synchronize`, like an asynchronous CUDA error. Whatever is
//! downloaded in that call is discarded.
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

use deepport_core::backend::{Storage, Tensor};
use deepport_core::tensor::unravel;
use deepport_core::{DType, Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// Registered name of the backend.
pub(crate) const BACKEND: &str = "wgpu";

/// The WGSL library prepended to every kernel.
pub(crate) const COMMON_WGSL: &str = include_str!("shaders/common.wgsl");

/// Bytes of one uniform parameter slot (and the largest `Params`).
const PARAM_SLOT: u64 = 256;
/// Parameter slots in the uniform arena.
const PARAM_SLOTS: u64 = 1024;
/// Bytes of one status slot (16 entries of 4 words).
const STATUS_SLOT: u64 = 256;
/// Status slots; when they run out, the batch is synchronized and checked.
const STATUS_SLOTS: u32 = 1024;
/// Entries in one status slot.
pub(crate) const STATUS_ENTRIES: u32 = 16;
/// Command buffers batched before a (non-blocking) submit.
const MAX_PENDING: usize = 64;

pub(crate) fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason: reason.into(),
    }
}

/// Runs a future to completion on this thread (wgpu's native futures are
/// ready at once or after a device poll).
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rounds a byte count up to the 4-byte granularity of wgpu copies (at least 4).
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

// ---- tensors -------------------------------------------------------------------

/// Device memory of a wgpu tensor: a storage buffer, its size padded to 4
/// bytes (16-bit and 8-bit elements are packed into 32-bit words).
pub struct WgpuStorage {
    pub(crate) buffer: wgpu::Buffer,
    /// Bytes of data (unpadded).
    pub(crate) bytes: u64,
}

impl Storage for WgpuStorage {
    fn backend(&self) -> &str {
        BACKEND
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The buffer of a wgpu tensor (fails for another backend's tensor, and
/// for a view: kernels bind whole buffers, so views are `NotSupported` until
/// bindings take an offset). Ops need no instance check here: core checks
/// every tensor of an op against the backend instance before launch.
pub(crate) fn buffer(t: &Tensor) -> Result<&wgpu::Buffer> {
    if t.is_view() {
        return Err(deepport_core::Error::not_supported(
            BACKEND,
            "a tensor view",
            "wgpu kernels bind whole buffers; views are not read in place yet",
        ));
    }
    t.storage_any::<WgpuStorage>()
        .map(|s| &s.buffer)
        .ok_or_else(|| deepport_core::Error::ForeignTensor {
            owner: t.owner().to_string(),
            backend: BACKEND.into(),
        })
}

/// The storage of a tensor of the instance `id` (memory methods).
pub(crate) fn storage_of(
    t: &Tensor,
    id: deepport_core::backend::InstanceId,
) -> Result<&WgpuStorage> {
    buffer(t)?;
    t.storage_for::<WgpuStorage>(id, BACKEND)
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

/// The dtype code used by `common.wgsl`.
pub(crate) fn dtype_code(d: DType) -> Result<u32> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F8E4M3 => 3,
        DType::F8E4M3Fnuz => 4,
        DType::I32 => 5,
        DType::I64 => 6,
        DType::U8 | DType::Bool => 7,
        other => {
            return Err(Error::not_supported(
                BACKEND,
                "storage",
                format!("dtype {other} has no WGSL accessor"),
            ))
        }
    })
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

// ---- shaders -------------------------------------------------------------------

/// How a kernel binds a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `var<storage, read> b_NAME: array<u32>` and `ld_NAME(i)`.
    Read,
    /// `var<storage, read_write> b_NAME: array<u32>`: whole-word stores
    /// (`stw_NAME`), loads (`ld_NAME`, `ldw_NAME`).
    ReadWrite,
    /// `var<storage, read_write> b_NAME: array<atomic<u32>>`: per-element
    /// stores into shared words (`st_NAME(i, v)`), whole words (`stw_NAME`).
    Atomic,
    /// The op's status slot (`flag(entry, index)`); bound by [`Rec`].
    Status,
}

#[derive(Clone, Debug)]
struct Bind {
    name: String,
    access: Access,
    dtype: Option<DType>,
}

/// A WGSL kernel: a body (entry point `main`, a `struct Params`) plus the
/// bindings and constants the host generates in front of it.
///
/// Binding 0 is `var<uniform> P: Params`; the buffers follow in the order
/// they were added. For a binding `x` with a dtype the header defines
/// `X_DT`, `X_PER` (elements per word) and accessors:
///
/// * float dtypes: `ld_x(i) -> f32`, and for outputs `enc_x(v) -> u32`
///   (lane bits), `stw_x(word, bits)`, `ldw_x(word)`; atomic outputs also
///   `st_x(i, v)` (one element, safe when other invocations write the other
///   lanes of its word);
/// * index dtypes (i32/i64): `ldi_x(i) -> vec2<u32>` (lo, hi; i32 sign
///   extended), and for outputs `sti_x(i, v)`.
#[derive(Clone, Debug)]
pub(crate) struct Shader {
    pub(crate) name: &'static str,
    body: &'static str,
    binds: Vec<Bind>,
    consts: Vec<(String, String)>,
}

impl Shader {
    pub(crate) fn new(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            body,
            binds: Vec::new(),
            consts: Vec::new(),
        }
    }
    fn bind(mut self, name: &str, access: Access, dtype: Option<DType>) -> Self {
        self.binds.push(Bind {
            name: name.to_string(),
            access,
            dtype,
        });
        self
    }
    /// A read-only tensor of `dtype`.
    pub(crate) fn input(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::Read, Some(dtype))
    }
    /// An output written in whole words by the invocation that owns them.
    pub(crate) fn output(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::ReadWrite, Some(dtype))
    }
    /// An output written element by element with atomics.
    pub(crate) fn atomic_output(self, name: &str, dtype: DType) -> Self {
        self.bind(name, Access::Atomic, Some(dtype))
    }
    /// A raw `array<u32>` (scratch), read-only or read-write.
    pub(crate) fn raw(self, name: &str, writable: bool) -> Self {
        let a = if writable {
            Access::ReadWrite
        } else {
            Access::Read
        };
        self.bind(name, a, None)
    }
    /// The op's status slot (see [`Rec::flag_entry`]).
    pub(crate) fn status(self) -> Self {
        self.bind("status", Access::Status, None)
    }
    /// `const NAME = value;` (`value` is WGSL, e.g. `256u`, `true`).
    pub(crate) fn constant(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.consts.push((name.to_string(), value.to_string()));
        self
    }

    fn has_status(&self) -> bool {
        self.binds.iter().any(|b| b.access == Access::Status)
    }

    /// The generated declarations; with the name, the pipeline cache key.
    fn header(&self) -> Result<String> {
        use std::fmt::Write;
        let mut h = String::from("// generated by deepport-wgpu\n");
        for (n, v) in &self.consts {
            let _ = writeln!(h, "const {n} = {v};");
        }
        let _ = writeln!(h, "@group(0) @binding(0) var<uniform> P: Params;");
        for (i, b) in self.binds.iter().enumerate() {
            let slot = i + 1;
            let n = &b.name;
            let up = n.to_uppercase();
            match b.access {
                Access::Status => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_status: array<atomic<u32>, 64>;\n\
                         fn flag(entry: u32, idx: u32) {{ atomicMax(&b_status[entry * 4u], 0xffffffffu - idx); }}"
                    );
                    continue;
                }
                Access::Read => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read> b_{n}: array<u32>;"
                    );
                }
                Access::ReadWrite => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_{n}: array<u32>;"
                    );
                }
                Access::Atomic => {
                    let _ = writeln!(
                        h,
                        "@group(0) @binding({slot}) var<storage, read_write> b_{n}: array<atomic<u32>>;"
                    );
                }
            }
            let Some(dt) = b.dtype else { continue };
            let code = dtype_code(dt)?;
            let per = match dt.size() {
                1 => 4,
                2 => 2,
                _ => 1,
            };
            let _ = writeln!(h, "const {up}_DT = {code}u;\nconst {up}_PER = {per}u;");
            let word = |w: &str| match b.access {
                Access::Atomic => format!("atomicLoad(&b_{n}[{w}])"),
                _ => format!("b_{n}[{w}]"),
            };
            if dt.is_index() {
                let ld = if dt == DType::I64 {
                    format!(
                        "return vec2<u32>({}, {});",
                        word("2u * i"),
                        word("2u * i + 1u")
                    )
                } else {
                    format!(
                        "let v = {}; return vec2<u32>(v, select(0u, 0xffffffffu, (v >> 31u) == 1u));",
                        word("i")
                    )
                };
                let _ = writeln!(h, "fn ldi_{n}(i: u32) -> vec2<u32> {{ {ld} }}");
                if b.access != Access::Read {
                    let st = match (b.access, dt) {
                        (Access::Atomic, DType::I64) => format!(
                            "atomicStore(&b_{n}[2u * i], v.x); atomicStore(&b_{n}[2u * i + 1u], v.y);"
                        ),
                        (Access::Atomic, _) => format!("atomicStore(&b_{n}[i], v.x);"),
                        (_, DType::I64) => {
                            format!("b_{n}[2u * i] = v.x; b_{n}[2u * i + 1u] = v.y;")
                        }
                        _ => format!("b_{n}[i] = v.x;"),
                    };
                    let _ = writeln!(h, "fn sti_{n}(i: u32, v: vec2<u32>) {{ {st} }}");
                }
                continue;
            }
            let _ = writeln!(
                h,
                "fn ld_{n}(i: u32) -> f32 {{ return dt_decode({code}u, dt_lane({code}u, {}, i)); }}",
                word(&format!("i / {per}u"))
            );
            match b.access {
                Access::ReadWrite => {
                    let _ = writeln!(
                        h,
                        "fn enc_{n}(v: f32) -> u32 {{ return dt_encode({code}u, v); }}\n\
                         fn ldw_{n}(w: u32) -> u32 {{ return b_{n}[w]; }}\n\
                         fn stw_{n}(w: u32, bits: u32) {{ b_{n}[w] = bits; }}"
                    );
                }
                Access::Atomic => {
                    let st = if per == 1 {
                        format!("atomicStore(&b_{n}[i], dt_encode({code}u, v));")
                    } else {
                        let bits = 32 / per;
                        format!(
                            "let w = i / {per}u; let sh = (i % {per}u) * {bits}u; \
                             let m = {mask}u << sh; \
                             atomicAnd(&b_{n}[w], ~m); \
                             atomicOr(&b_{n}[w], (dt_encode({code}u, v) << sh) & m);",
                            mask = (1u32 << bits) - 1
                        )
                    };
                    let _ = writeln!(
                        h,
                        "fn enc_{n}(v: f32) -> u32 {{ return dt_encode({code}u, v); }}\n\
                         fn stw_{n}(w: u32, bits: u32) {{ atomicStore(&b_{n}[w], bits); }}\n\
                         fn st_{n}(i: u32, v: f32) {{ {st} }}"
                    );
                }
                _ => {}
            }
        }
        Ok(h)
    }

    fn layout_entries(&self) -> Vec<wgpu::BindGroupLayoutEntry> {
        let mut v = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, b) in self.binds.iter().enumerate() {
            v.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: b.access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        v
    }
}

/// A kernel's uniform parameters, little-endian, in the field order of its
/// WGSL `struct Params` (scalars only: u32, i32, f32).
#[derive(Clone, Debug, Default)]
pub(crate) struct Params(Vec<u8>);

impl Params {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    #[allow(dead_code)] // for kernels with signed parameters
    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

struct Pipe {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

// ---- deferred checks -------------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) enum CheckKind {
    /// Values must lie in `[lo, hi)` or equal `allow`.
    Range {
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    },
    /// Values must be finite.
    Finite,
}

#[derive(Clone, Debug)]
struct Check {
    op: &'static str,
    arg: &'static str,
    shape: Vec<usize>,
    kind: CheckKind,
    slot: u32,
    entry: u32,
}

impl Check {
    /// The error this check reports, given its status words.
    fn error(&self, words: &[u32]) -> Option<Error> {
        let base = (self.slot * STATUS_ENTRIES * 4 + self.entry * 4) as usize;
        let w = *words.get(base)?;
        if w == 0 {
            return None;
        }
        let idx = (u32::MAX - w) as usize;
        let lo = words.get(base + 1).copied().unwrap_or(0) as u64;
        let hi = words.get(base + 2).copied().unwrap_or(0) as u64;
        let position = unravel(idx, &self.shape);
        Some(match &self.kind {
            CheckKind::Range {
                lo: l,
                hi: h,
                allow,
            } => Error::IndexOutOfRange {
                op: self.op,
                arg: self.arg,
                position,
                value: (lo | (hi << 32)) as i64,
                range: match allow {
                    Some(a) => format!("[{l}, {h}) or {a}"),
                    None => format!("[{l}, {h})"),
                },
            },
            CheckKind::Finite => Error::NonFinite {
                op: self.op,
                arg: self.arg,
                position,
                value: f32::from_bits(lo as u32) as f64,
            },
        })
    }
}

const CHECK_RANGE_WGSL: &str = include_str!("shaders/check_range.wgsl");
const CHECK_FINITE_WGSL: &str = include_str!("shaders/check_finite.wgsl");
const CAPTURE_WGSL: &str = include_str!("shaders/capture.wgsl");

// ---- the context -------------------------------------------------------------------

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
fn pop_scopes(scopes: &mut Vec<wgpu::ErrorScopeGuard>) -> Option<String> {
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

fn push_scopes(device: &wgpu::Device) -> Vec<wgpu::ErrorScopeGuard> {
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

    // ---- memory ----

    /// A new zeroed storage buffer of `bytes` (padded) bytes.
    pub(crate) fn create_buffer(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_alive(what)?;
        let size = padded(bytes);
        if size > self.limits.max_buffer_size {
            return Err(dev_err(format!(
                "{what}: {size} bytes exceed this adapter's max_buffer_size ({} bytes)",
                self.limits.max_buffer_size
            )));
        }
        let mut scopes = push_scopes(&self.device);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!("{what}: allocating {size} bytes: {e}")));
        }
        Ok(buf)
    }

    /// A new buffer holding `data`.
    pub(crate) fn upload_bytes(&self, what: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let buf = self.create_buffer(what, data.len() as u64)?;
        if !data.is_empty() {
            let mut scopes = push_scopes(&self.device);
            write_padded(&self.queue, &buf, data);
            if let Some(e) = pop_scopes(&mut scopes) {
                return Err(dev_err(format!(
                    "{what}: writing {} bytes: {e}",
                    data.len()
                )));
            }
        }
        Ok(buf)
    }

    /// Overwrites `buf` with `data` after every op recorded so far.
    pub(crate) fn write_bytes(&self, what: &str, buf: &wgpu::Buffer, data: &[u8]) -> Result<()> {
        self.check_alive(what)?;
        let mut st = self.state(what)?;
        // Queue writes land before the next submission: submit what is
        // pending first, so earlier ops see the old contents.
        self.flush(&mut st)?;
        if !data.is_empty() {
            let mut scopes = push_scopes(&self.device);
            write_padded(&self.queue, buf, data);
            if let Some(e) = pop_scopes(&mut scopes) {
                return Err(dev_err(format!(
                    "{what}: writing {} bytes: {e}",
                    data.len()
                )));
            }
        }
        Ok(())
    }

    /// Copies `bytes` bytes of `buf` to the host after all recorded work,
    /// then reports any failed check or device error.
    pub(crate) fn read_bytes(&self, what: &str, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        self.check_alive(what)?;
        let mut st = self.state(what)?;
        let data = self.sync_locked(&mut st, what, Some((buf, bytes)))?;
        Ok(data.unwrap_or_default())
    }

    /// Waits for all recorded work; reports failed checks and device errors.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.check_alive("synchronize")?;
        let mut st = self.state("synchronize")?;
        self.sync_locked(&mut st, "synchronize", None).map(|_| ())
    }

    /// Submits the pending batch without waiting.
    fn flush(&self, st: &mut State) -> Result<Option<wgpu::SubmissionIndex>> {
        let ops = std::mem::take(&mut st.pending_ops);
        let cmds = std::mem::take(&mut st.pending);
        let mut scopes = push_scopes(&self.device);
        let idx = self.queue.submit(cmds);
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!(
                "submitting {} op(s) ({}): {e}",
                ops.len(),
                summarize(&ops)
            )));
        }
        Ok(Some(idx))
    }

    /// Flushes, optionally reads a buffer and the status slots, waits, and
    /// evaluates the deferred checks.
    fn sync_locked(
        &self,
        st: &mut State,
        what: &str,
        read: Option<(&wgpu::Buffer, u64)>,
    ) -> Result<Option<Vec<u8>>> {
        let mut scopes = push_scopes(&self.device);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(what) });
        let mut readback = None;
        if let Some((buf, bytes)) = read {
            let size = padded(bytes);
            let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("deepport readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(buf, 0, &rb, 0, size);
            readback = Some((rb, bytes));
        }
        let mut status_rb = None;
        let checks = std::mem::take(&mut st.checks);
        let used = st.next_status as u64 * STATUS_SLOT;
        if !checks.is_empty() && used > 0 {
            let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("deepport status readback"),
                size: used,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&self.status, 0, &rb, 0, used);
            status_rb = Some(rb);
        }
        if used > 0 {
            enc.clear_buffer(&self.status, 0, Some(used));
        }
        st.next_status = 0;
        st.pending.push(enc.finish());
        st.pending_ops.push("readback");
        if let Some(e) = pop_scopes(&mut scopes) {
            st.pending.clear();
            st.pending_ops.clear();
            return Err(dev_err(format!("{what}: {e}")));
        }
        let idx = self.flush(st)?;
        // Map what is read back, then wait for the submission.
        let mut scopes = push_scopes(&self.device);
        let results: Arc<Mutex<Vec<std::result::Result<(), String>>>> = Default::default();
        let mut mapped = Vec::new();
        for b in readback
            .as_ref()
            .map(|(b, _)| b)
            .into_iter()
            .chain(status_rb.as_ref())
        {
            let r = results.clone();
            b.slice(..).map_async(wgpu::MapMode::Read, move |res| {
                lock(&r).push(res.map_err(|e| e.to_string()));
            });
            mapped.push(b);
        }
        let poll = self.device.poll(wgpu::PollType::Wait {
            submission_index: idx,
            timeout: None,
        });
        if let Err(e) = poll {
            let _ = pop_scopes(&mut scopes);
            self.check_alive(what)?;
            return Err(dev_err(format!("{what}: waiting for the device: {e}")));
        }
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!("{what}: {e}")));
        }
        self.check_alive(what)?;
        {
            let res = lock(&results);
            if res.len() != mapped.len() {
                return Err(dev_err(format!(
                    "{what}: {} of {} readback buffers were mapped after the wait",
                    res.len(),
                    mapped.len()
                )));
            }
            if let Some(Err(e)) = res.iter().find(|r| r.is_err()) {
                return Err(dev_err(format!("{what}: mapping a readback buffer: {e}")));
            }
        }
        let read_mapped = |b: &wgpu::Buffer, n: usize| -> Result<Vec<u8>> {
            let view = b
                .slice(..)
                .get_mapped_range()
                .map_err(|e| dev_err(format!("{what}: reading back: {e}")))?;
            let v = view[..n].to_vec();
            drop(view);
            b.unmap();
            Ok(v)
        };
        let data = match &readback {
            Some((rb, bytes)) => Some(read_mapped(rb, *bytes as usize)?),
            None => None,
        };
        let status_words: Vec<u32> = match &status_rb {
            Some(rb) => read_mapped(rb, used as usize)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None => Vec::new(),
        };
        let errs = std::mem::take(&mut *lock(&self.uncaptured));
        if !errs.is_empty() {
            return Err(dev_err(format!(
                "{what}: uncaptured device error(s): {}",
                errs.join("; ")
            )));
        }
        for c in &checks {
            if let Some(e) = c.error(&status_words) {
                return Err(e);
            }
        }
        Ok(data)
    }

    // ---- recording ----

    /// Starts recording the op `op`.
    pub(crate) fn begin(&self, op: &'static str) -> Result<Rec<'_>> {
        self.check_alive(op)?;
        let st = self.state(op)?;
        *lock(&self.recorder) = Some(std::thread::current().id());
        let scopes = push_scopes(&self.device);
        let enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        Ok(Rec {
            ctx: self,
            op,
            st,
            enc: Some(enc),
            scopes,
            slot: None,
            entries: 0,
            checks: Vec::new(),
        })
    }

    fn pipeline(&self, st: &mut State, op: &str, shader: &Shader) -> Result<Arc<Pipe>> {
        let header = shader.header()?;
        let key = (shader.name, header);
        if let Some(p) = st.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let source = format!("{}\n{}\n{}", key.1, COMMON_WGSL, shader.body);
        let p = self.compile(op, shader.name, &source, &shader.layout_entries())?;
        let p = Arc::new(p);
        st.pipelines.insert(key, p.clone());
        Ok(p)
    }

    fn compile(
        &self,
        op: &str,
        name: &str,
        source: &str,
        entries: &[wgpu::BindGroupLayoutEntry],
    ) -> Result<Pipe> {
        let mut scopes = push_scopes(&self.device);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(name),
                entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!(
                "{op}: shader `{name}` failed to compile: {e}"
            )));
        }
        Ok(Pipe { pipeline, layout })
    }

    /// Destroys the device (test hook for device loss).
    pub(crate) fn destroy(&self) {
        self.device.destroy();
        // wgpu reports the loss from its next maintenance pass.
        let _ = self.device.poll(wgpu::PollType::Poll);
    }

    /// Compiles a WGSL kernel outside the cache (test hook).
    pub(crate) fn compile_only(&self, name: &str, body: &str) -> Result<()> {
        self.check_alive("compile")?;
        let source =
            format!("@group(0) @binding(0) var<uniform> P: Params;\n{COMMON_WGSL}\n{body}");
        let entries = [wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        self.compile("compile", name, &source, &entries).map(|_| ())
    }

    /// The storage binding limit in bytes (device limit, or the test cap).
    pub(crate) fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// The alignment of storage binding offsets.
    pub(crate) fn binding_align(&self) -> u64 {
        (self.limits.min_storage_buffer_offset_alignment as u64).max(4)
    }

    /// Splits `rows` rows into chunks `[r0, r1)` such that, for every
    /// operand with `row_bytes[i]` bytes per row, the rows of a chunk fit one
    /// storage binding and start at an aligned offset ([`Win::rows`]).
    /// One chunk when everything fits; `NotSupported` when one row alone
    /// (times the alignment granule) is too large.
    pub(crate) fn plan_rows(
        &self,
        op: &str,
        rows: usize,
        row_bytes: &[u64],
    ) -> Result<Vec<(usize, usize)>> {
        plan_rows(rows, row_bytes, self.max_binding, self.binding_align()).ok_or_else(|| {
            Error::not_supported(
                BACKEND,
                op.to_string(),
                format!(
                    "a row of {} bytes does not fit this adapter's storage binding limit of {} bytes",
                    row_bytes.iter().max().copied().unwrap_or(0),
                    self.max_binding
                ),
            )
        })
    }

    /// Splits a linear workgroup count over x, y, z.
    fn split(&self, op: &str, groups: u32) -> Result<(u32, u32, u32)> {
        split_groups(groups, self.max_groups).ok_or_else(|| {
            Error::not_supported(
                BACKEND,
                op.to_string(),
                format!("{groups} workgroups exceed {}³", self.max_groups),
            )
        })
    }
}

/// See [`Ctx::plan_rows`]; `None` when a row cannot be placed.
fn plan_rows(
    rows: usize,
    row_bytes: &[u64],
    limit: u64,
    align: u64,
) -> Option<Vec<(usize, usize)>> {
    if rows == 0 {
        return Some(Vec::new());
    }
    let max_rb = row_bytes.iter().copied().max().unwrap_or(0).max(1);
    let usable = limit.saturating_sub(4);
    if rows as u64 * max_rb <= usable {
        return Some(vec![(0, rows)]);
    }
    // Chunk starts r0 must make r0·rb a multiple of `align` for every
    // operand: a multiple of align / gcd(align, rb) (powers of two).
    let granule = row_bytes
        .iter()
        .map(|&rb| {
            let tz = rb.trailing_zeros().min(align.trailing_zeros());
            align >> tz
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let per = (usable / max_rb) / granule * granule;
    if per == 0 {
        return None;
    }
    let per = per as usize;
    Some(
        (0..rows.div_ceil(per))
            .map(|c| (c * per, ((c + 1) * per).min(rows)))
            .collect(),
    )
}

/// (x, y, z) with every dimension ≤ `m` and x·y·z ≥ `groups` (the excess is
/// under x·y, and kernels skip it); `None` beyond m³.
fn split_groups(groups: u32, m: u32) -> Option<(u32, u32, u32)> {
    let m = m.max(1);
    if groups <= m {
        return Some((groups, 1, 1));
    }
    let rest = groups.div_ceil(m);
    let y = rest.min(m);
    let z = rest.div_ceil(y);
    if z > m {
        return None;
    }
    let x = groups.div_ceil(y * z);
    Some((x, y, z))
}

fn write_padded(queue: &wgpu::Queue, buf: &wgpu::Buffer, data: &[u8]) {
    if data.len().is_multiple_of(4) {
        queue.write_buffer(buf, 0, data);
    } else {
        let mut v = data.to_vec();
        v.resize(padded(data.len() as u64) as usize, 0);
        queue.write_buffer(buf, 0, &v);
    }
}

fn summarize(ops: &[&str]) -> String {
    let mut v: Vec<&str> = Vec::new();
    for o in ops {
        if !v.contains(o) {
            v.push(o);
        }
    }
    v.join(", ")
}

/// What a dispatch binds after the uniform block, in the shader's order.
pub(crate) type Bufs<'b> = [&'b wgpu::Buffer];

/// A byte range of a buffer, bound as one storage binding: how tensors
/// beyond `max_storage_buffer_binding_size` are processed in pieces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Win<'b> {
    pub(crate) buf: &'b wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

impl<'b> Win<'b> {
    /// The whole buffer.
    pub(crate) fn whole(buf: &'b wgpu::Buffer) -> Self {
        Win {
            buf,
            offset: 0,
            size: buf.size(),
        }
    }

    /// Rows `[r0, r1)` of a row-major buffer with `row_bytes` per row. The
    /// start must be aligned (chunks from [`Ctx::plan_rows`] are).
    pub(crate) fn rows(buf: &'b wgpu::Buffer, row_bytes: u64, r0: usize, r1: usize) -> Self {
        let offset = (r0 as u64 * row_bytes).min(buf.size());
        let end = padded(r1 as u64 * row_bytes).min(buf.size()).max(offset);
        Win {
            buf,
            offset,
            size: end - offset,
        }
    }

    /// Elements `[e0, e1)` of `elem_bytes` each, from the aligned offset at
    /// or below `e0`; also returns the element index the window starts at
    /// (subtract it from global indices inside the kernel).
    pub(crate) fn elems(
        buf: &'b wgpu::Buffer,
        elem_bytes: u64,
        e0: usize,
        e1: usize,
        align: u64,
    ) -> (Self, usize) {
        let start = e0 as u64 * elem_bytes;
        let offset = (start / align * align).min(buf.size());
        let end = padded(e1 as u64 * elem_bytes).min(buf.size()).max(offset);
        (
            Win {
                buf,
                offset,
                size: end - offset,
            },
            (offset / elem_bytes) as usize,
        )
    }
}

/// Recording of one op: see the module documentation.
pub(crate) struct Rec<'a> {
    ctx: &'a Ctx,
    op: &'static str,
    st: MutexGuard<'a, State>,
    enc: Option<wgpu::CommandEncoder>,
    scopes: Vec<wgpu::ErrorScopeGuard>,
    slot: Option<u32>,
    entries: u32,
    checks: Vec<Check>,
}

impl Drop for Rec<'_> {
    fn drop(&mut self) {
        *lock(&self.ctx.recorder) = None;
        // Pop the scopes innermost first (an early return discards the op).
        while let Some(s) = self.scopes.pop() {
            drop(s.pop());
        }
    }
}

impl<'a> Rec<'a> {
    pub(crate) fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    /// The op's status slot, allocated on first use.
    fn slot(&mut self) -> Result<u32> {
        if let Some(s) = self.slot {
            return Ok(s);
        }
        if self.st.next_status >= STATUS_SLOTS {
            // Out of status slots: settle the earlier ops first.
            let ctx = self.ctx;
            ctx.sync_locked(&mut self.st, self.op, None)?;
        }
        let s = self.st.next_status;
        self.st.next_status += 1;
        self.slot = Some(s);
        Ok(s)
    }

    /// A new status entry of this op, reported as `kind` on `arg` (of shape
    /// `shape`) when a kernel flags it. Returns the entry index for
    /// `flag(entry, index)` in a shader with [`Shader::status`].
    pub(crate) fn flag_entry(
        &mut self,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u32> {
        let slot = self.slot()?;
        if self.entries >= STATUS_ENTRIES {
            return Err(dev_err(format!(
                "{}: more than {STATUS_ENTRIES} checked arguments",
                self.op
            )));
        }
        let entry = self.entries;
        self.entries += 1;
        self.checks.push(Check {
            op: self.op,
            arg,
            shape: shape.to_vec(),
            kind,
            slot,
            entry,
        });
        Ok(entry)
    }

    /// Copies the flagged element of `t` (if any) into the entry, so the
    /// error can name its value.
    pub(crate) fn capture(&mut self, entry: u32, t: &Tensor) -> Result<()> {
        let es = t.dtype().size() as u64;
        let plan = self.ctx.plan_rows(self.op, t.numel().max(1), &[es])?;
        for (e0, e1) in plan {
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }

    fn capture_part(&mut self, entry: u32, t: &Tensor, e0: usize, e1: usize) -> Result<()> {
        let code = dtype_code(t.dtype())?;
        let sh = Shader::new("capture", CAPTURE_WGSL)
            .raw("src", false)
            .status();
        let es = t.dtype().size() as u64;
        let w = Win::rows(buffer(t)?, es, e0, e1);
        let p = Params::new()
            .u32(entry)
            .u32(code)
            .u32(u32_of(self.op, "numel", e0)?)
            .u32(u32_of(self.op, "numel", e1 - e0)?);
        self.dispatch_win(&sh, p, &[w], 1)
    }

    /// Records a check that every element of the index tensor `t` lies in
    /// `[lo, hi)` or equals `allow`; the error is `IndexOutOfRange` on `arg`.
    pub(crate) fn check_range(
        &mut self,
        arg: &'static str,
        t: &Tensor,
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    ) -> Result<()> {
        u32_of(self.op, arg, t.numel())?;
        if t.numel() == 0 {
            return Ok(());
        }
        let entry = self.flag_entry(arg, t.shape(), CheckKind::Range { lo, hi, allow })?;
        let sh = Shader::new("check_range", CHECK_RANGE_WGSL)
            .input("x", t.dtype())
            .status();
        let a = allow.unwrap_or(0);
        let es = t.dtype().size() as u64;
        for (e0, e1) in self.ctx.plan_rows(self.op, t.numel(), &[es])? {
            let n = (e1 - e0) as u32;
            let p = Params::new()
                .u32(n)
                .u32(entry)
                .u32(lo as u32)
                .u32((lo >> 32) as u32)
                .u32(hi as u32)
                .u32((hi >> 32) as u32)
                .u32(a as u32)
                .u32((a >> 32) as u32)
                .u32(allow.is_some() as u32)
                .u32(e0 as u32);
            let w = Win::rows(buffer(t)?, es, e0, e1);
            self.dispatch_win(&sh, p, &[w], n.div_ceil(256))?;
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }

    /// Records a check that every element of the float tensor `t` is finite.
    pub(crate) fn check_finite(&mut self, arg: &'static str, t: &Tensor) -> Result<()> {
        u32_of(self.op, arg, t.numel())?;
        if t.numel() == 0 {
            return Ok(());
        }
        let entry = self.flag_entry(arg, t.shape(), CheckKind::Finite)?;
        let sh = Shader::new("check_finite", CHECK_FINITE_WGSL)
            .input("x", t.dtype())
            .status();
        let es = t.dtype().size() as u64;
        for (e0, e1) in self.ctx.plan_rows(self.op, t.numel(), &[es])? {
            let n = (e1 - e0) as u32;
            let p = Params::new().u32(n).u32(entry).u32(e0 as u32);
            let w = Win::rows(buffer(t)?, es, e0, e1);
            self.dispatch_win(&sh, p, &[w], n.div_ceil(256))?;
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }

    /// A small constant table (e.g. RoPE frequencies), uploaded once and
    /// cached by content.
    pub(crate) fn table(&mut self, data: &[u8]) -> Result<wgpu::Buffer> {
        if let Some(b) = self.st.tables.get(data) {
            return Ok(b.clone());
        }
        let b = self.ctx.upload_bytes(self.op, data)?;
        if self.st.tables.len() > 256 {
            self.st.tables.clear();
        }
        self.st.tables.insert(data.to_vec(), b.clone());
        Ok(b)
    }

    /// A scratch storage buffer that lives as long as the op's commands.
    pub(crate) fn scratch(&self, bytes: u64) -> Result<wgpu::Buffer> {
        self.ctx.create_buffer(self.op, bytes)
    }

    /// Records one dispatch of `shader` over `groups` workgroups (a linear
    /// count; split over y and z when it exceeds the per-dimension limit).
    pub(crate) fn dispatch(
        &mut self,
        shader: &Shader,
        params: Params,
        bufs: &Bufs<'_>,
        groups: u32,
    ) -> Result<()> {
        let wins: Vec<Win<'_>> = bufs.iter().map(|b| Win::whole(b)).collect();
        self.dispatch_win(shader, params, &wins, groups)
    }

    /// [`Rec::dispatch`] with buffer windows (see [`Win`], [`Ctx::plan_rows`]).
    pub(crate) fn dispatch_win(
        &mut self,
        shader: &Shader,
        params: Params,
        bufs: &[Win<'_>],
        groups: u32,
    ) -> Result<()> {
        let op = self.op;
        if groups == 0 {
            return Ok(());
        }
        let non_status = shader
            .binds
            .iter()
            .filter(|b| b.access != Access::Status)
            .count();
        if bufs.len() != non_status {
            return Err(dev_err(format!(
                "{op}: shader `{}` binds {non_status} buffers, {} given",
                shader.name,
                bufs.len()
            )));
        }
        if params.0.len() as u64 > PARAM_SLOT {
            return Err(dev_err(format!(
                "{op}: parameters of `{}` exceed {PARAM_SLOT} bytes",
                shader.name
            )));
        }
        let limit = self.ctx.max_binding;
        let align = self.ctx.binding_align();
        for b in bufs {
            if b.size > limit {
                return Err(Error::not_supported(
                    BACKEND,
                    op,
                    format!(
                        "a tensor of {} bytes exceeds this adapter's storage binding limit of {limit} bytes",
                        b.size
                    ),
                ));
            }
            if !b.offset.is_multiple_of(align) || b.size == 0 || !b.size.is_multiple_of(4) {
                return Err(dev_err(format!(
                    "{op}: window {}+{} of a {}-byte buffer is not a valid binding",
                    b.offset,
                    b.size,
                    b.buf.size()
                )));
            }
        }
        let storage_count = shader.binds.len() as u32;
        if storage_count > self.ctx.limits.max_storage_buffers_per_shader_stage {
            return Err(Error::not_supported(
                BACKEND,
                op,
                format!(
                    "shader `{}` binds {storage_count} storage buffers; the adapter allows {}",
                    shader.name, self.ctx.limits.max_storage_buffers_per_shader_stage
                ),
            ));
        }
        let (x, y, z) = self.ctx.split(op, groups)?;
        let status_slot = if shader.has_status() {
            Some(self.slot()?)
        } else {
            None
        };
        let pipe = self.ctx.pipeline(&mut self.st, op, shader)?;
        // Parameters go to the next arena slot (queue writes land before the
        // batch that reads them; a full arena is submitted first).
        if self.st.next_param >= PARAM_SLOTS {
            let ctx = self.ctx;
            ctx.flush(&mut self.st)?;
            self.st.next_param = 0;
        }
        let off = self.st.next_param * PARAM_SLOT;
        self.st.next_param += 1;
        let mut bytes = params.0;
        bytes.resize(PARAM_SLOT as usize, 0);
        self.ctx.queue.write_buffer(&self.ctx.params, off, &bytes);

        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ctx.params,
                offset: off,
                size: std::num::NonZeroU64::new(PARAM_SLOT),
            }),
        }];
        let mut it = bufs.iter();
        for (i, b) in shader.binds.iter().enumerate() {
            let resource = if b.access == Access::Status {
                let s = status_slot.unwrap_or(0) as u64;
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.ctx.status,
                    offset: s * STATUS_SLOT,
                    size: std::num::NonZeroU64::new(STATUS_SLOT),
                })
            } else {
                match it.next() {
                    Some(w) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: w.buf,
                        offset: w.offset,
                        size: std::num::NonZeroU64::new(w.size),
                    }),
                    None => return Err(dev_err(format!("{op}: missing buffer"))),
                }
            };
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource,
            });
        }
        let bg = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(shader.name),
                layout: &pipe.layout,
                entries: &entries,
            });
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| dev_err(format!("{op}: recording already finished")))?;
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(shader.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(x, y, z);
        Ok(())
    }

    /// Ends the op: reports validation and memory errors naming the op, then
    /// queues its commands (submitted without waiting when the batch is full).
    pub(crate) fn finish(mut self) -> Result<()> {
        let op = self.op;
        let cmd = self.enc.take().map(|e| e.finish());
        if let Some(e) = pop_scopes(&mut self.scopes) {
            return Err(dev_err(format!("{op}: {e}")));
        }
        if let Some(cmd) = cmd {
            self.st.pending.push(cmd);
            self.st.pending_ops.push(op);
        }
        let checks = std::mem::take(&mut self.checks);
        self.st.checks.extend(checks);
        if self.st.pending.len() >= MAX_PENDING {
            let ctx = self.ctx;
            ctx.flush(&mut self.st)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_group_within_the_limit() {
        for m in [1u32, 2, 3, 4, 7, 65535] {
            for g in (0..2000u32).chain([65535, 65536, 70_000, 1 << 24, u32::MAX]) {
                match split_groups(g, m) {
                    Some((x, y, z)) => {
                        assert!(x <= m && y <= m && z <= m, "{g} on {m}: {x} {y} {z}");
                        let total = x as u64 * y as u64 * z as u64;
                        assert!(total >= g as u64, "{g} on {m}: {x} {y} {z}");
                        // The excess is less than one x·y layer.
                        assert!(total - (g as u64) < (x as u64 * y as u64).max(1));
                    }
                    None => assert!(g as u64 > (m as u64).pow(3), "{g} on {m}"),
                }
            }
        }
    }

    #[test]
    fn header_declares_bindings_and_accessors() {
        let sh = Shader::new("t", "")
            .constant("OP", "1u")
            .input("x", DType::BF16)
            .input("ids", DType::I64)
            .output("y", DType::F8E4M3)
            .atomic_output("d", DType::F16)
            .raw("tmp", true)
            .status();
        let h = sh.header().unwrap();
        for want in [
            "const OP = 1u;",
            "var<uniform> P: Params;",
            "@binding(1) var<storage, read> b_x: array<u32>;",
            "const X_DT = 2u;",
            "const X_PER = 2u;",
            "fn ld_x(i: u32) -> f32",
            "fn ldi_ids(i: u32) -> vec2<u32>",
            "@binding(3) var<storage, read_write> b_y: array<u32>;",
            "fn stw_y(",
            "fn enc_y(",
            "@binding(4) var<storage, read_write> b_d: array<atomic<u32>>;",
            "fn st_d(i: u32, v: f32)",
            "@binding(5) var<storage, read_write> b_tmp: array<u32>;",
            "@binding(6) var<storage, read_write> b_status",
            "fn flag(entry: u32, idx: u32)",
        ] {
            assert!(h.contains(want), "missing `{want}` in\n{h}");
        }
        assert_eq!(sh.layout_entries().len(), 7);
    }

    #[test]
    fn a_recording_thread_cannot_synchronize() {
        let Ok(ctx) = Ctx::new(&WgpuOptions::default()) else {
            eprintln!("skipping: no adapter");
            return;
        };
        let rec = ctx.begin("test").unwrap();
        let e = ctx.synchronize().unwrap_err();
        assert!(e.to_string().contains("finish the Rec"), "{e}");
        assert!(ctx.begin("nested").is_err());
        rec.finish().unwrap();
        ctx.synchronize().unwrap();
    }
}
