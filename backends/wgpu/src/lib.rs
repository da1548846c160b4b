//! deepport's wgpu backend (`wgpu`): every op as a WGSL compute kernel.
//!
//! * Runs wherever wgpu finds an adapter: Vulkan always (including lavapipe,
//!   Mesa's CPU Vulkan driver, which CI uses), Metal and DX12 behind the
//!   `metal` and `dx12` features.
//! * Tensors live in device storage buffers (`WgpuStorage`); f16, bf16 and
//!   FP8 are packed into 32-bit words and converted by bit manipulation in
//!   `shaders/common.wgsl`, so no adapter feature is required (SHADER_F16 and
//!   SUBGROUP are requested when present and reported in `info()`, but no
//!   kernel depends on them or on a subgroup size).
//! * Ops record into batched command buffers and never block; `download`
//!   and `synchronize` wait. Index checks run on the device and their errors
//!   surface at the next `download`/`synchronize` (see `ctx`).
//! * Pipelines compile once per shader variant and are cached.
//! * Limits are queried, not assumed: dispatches beyond 65535 workgroups are
//!   split over y/z, tensors beyond the storage binding limit are bound in
//!   windows, and no kernel depends on a subgroup size.
//! * Device loss, out-of-memory, validation and shader compile failures are
//!   `Error::Device` values naming the op (or shader); nothing panics. A
//!   missing driver makes the backend *unavailable* with the reason.
//!
//! * Expert parallelism is core's protocol (`deepport_core::ep`, one wire
//!   format shared with every backend, so wgpu and cpu-ref ranks can share
//!   a group) over this backend's `gather_rows`, `reduce_rows` and
//!   `act_quant` kernels; `get_dispatch_layout` is a kernel of its own.
//! * Read-only views: a view at its parent's first byte is read in place
//!   by every kernel; `gather_rows`, `reduce_rows` and `download` also read
//!   views at any offset.
//!
//! * DeepSeek-V3.2's ops (docs/spec-v32.md): rope `layout = half`,
//!   `cache_quant` (bit-exact), `indexer_logits`, `indexer_topk` (radix
//!   select + bitonic sort per row), `sparse_mla_decode` (the 656-byte
//!   FP8 latent cache read as words) and `sparse_mla_prefill` (a plain
//!   latent KV), one attention kernel for both; their index errors are
//!   deferred checks like every other kernel's.
//!
//! Ops not implemented yet answer `NotSupported` (see `kernels`).

#![forbid(unsafe_code)]

pub mod ctx;
mod kernels;

pub use ctx::{WgpuOptions, WgpuStorage};

use ctx::{buffer, Ctx, BACKEND};
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use kernels::OpTable;

/// The wgpu backend.
pub struct Wgpu {
    pub(crate) ctx: Ctx,
    table: OpTable,
    id: InstanceId,
}

impl std::fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wgpu({})", self.ctx.adapter_info.name)
    }
}

fn vendor_name(id: u32) -> String {
    match id {
        0x10de => "NVIDIA".into(),
        0x1002 | 0x1022 => "AMD".into(),
        0x8086 => "Intel".into(),
        0x106b => "Apple".into(),
        0x13b5 => "ARM".into(),
        0x5143 => "Qualcomm".into(),
        0x1010 => "Imagination".into(),
        0x10005 => "Mesa".into(),
        0 => "unknown".into(),
        other => format!("0x{other:04x}"),
    }
}

impl Wgpu {
    pub const NAME: &'static str = BACKEND;

    /// Probes for an adapter and creates the backend; [`Error::Unavailable`]
    /// with the reason when there is none.
    pub fn new() -> Result<Self> {
        Self::with_options(WgpuOptions::default())
    }

    /// [`Wgpu::new`] with options.
    pub fn with_options(opts: WgpuOptions) -> Result<Self> {
        // wgpu reports failures as values, but a driver bug must not take
        // the caller down either.
        let ctx = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Ctx::new(&opts)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Unavailable {
                    backend: BACKEND.into(),
                    reason: format!("wgpu panicked while probing: {msg}"),
                })
            })?;
        Ok(Self {
            ctx,
            table: kernels::table(),
            id: InstanceId::fresh(),
        })
    }

    /// Whether the device has native f16 arithmetic (`SHADER_F16`).
    pub fn has_shader_f16(&self) -> bool {
        self.ctx.features.contains(wgpu::Features::SHADER_F16)
    }

    /// What wgpu says about the adapter (name, driver, subgroup sizes, …).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.adapter_info
    }

    /// The device limits (the adapter's full limits).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// The workgroups per dispatch dimension in use (device limit, or the
    /// cap from [`WgpuOptions`]).
    pub fn max_workgroups_per_dim(&self) -> u32 {
        self.ctx.max_groups()
    }

    /// Test hook: compiles a WGSL kernel (entry point `main`, a `struct
    /// Params`, the common library in scope) and reports compile errors.
    #[doc(hidden)]
    pub fn debug_compile(&self, name: &str, wgsl: &str) -> Result<()> {
        self.ctx.compile_only(name, wgsl)
    }

    /// Test hook: destroys the device, as a driver reset would; every later
    /// call must fail with [`Error::Device`].
    #[doc(hidden)]
    pub fn debug_lose_device(&self) {
        self.ctx.destroy();
    }

    fn tensor(&self, dtype: DType, shape: &[usize], buf: wgpu::Buffer, bytes: u64) -> Tensor {
        Tensor::new(
            dtype,
            shape,
            Box::new(WgpuStorage { buffer: buf, bytes }),
            self.id,
        )
    }

    fn nbytes(dtype: DType, shape: &[usize]) -> Result<u64> {
        shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .map(|n| n as u64)
            .ok_or_else(|| ctx::dev_err(format!("tensor {shape:?} of {dtype} is too large")))
    }
}

/// Every local op, forwarded to its entry of the kernel table
/// (`NotSupported` where there is none).
macro_rules! table_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            (self
                .table
                .$method
                .ok_or_else(|| self.unsupported(op.kind()))?)(self, op)
        }
    )*};
}

impl Backend for Wgpu {
    fn name(&self) -> &str {
        BACKEND
    }

    fn instance(&self) -> InstanceId {
        self.id
    }

    fn info(&self) -> DeviceInfo {
        let i = &self.ctx.adapter_info;
        let mut extras = Vec::new();
        if self.ctx.features.contains(wgpu::Features::SHADER_F16) {
            extras.push("f16");
        }
        if self.ctx.features.contains(wgpu::Features::SUBGROUP) {
            extras.push("subgroups");
        }
        DeviceInfo {
            backend: BACKEND.into(),
            device: format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend),
            driver: format!(
                "{} {} (wgpu 30{}{})",
                i.driver,
                i.driver_info,
                if extras.is_empty() { "" } else { "; " },
                extras.join(", ")
            )
            .trim()
            .to_string(),
            vendor: vendor_name(i.vendor),
        }
    }

    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        self.table.supports(op, dtypes)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = Self::nbytes(dtype, shape)?;
        let buf = self.ctx.create_buffer("alloc", bytes)?;
        Ok(self.tensor(dtype, shape, buf, bytes))
    }

    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        // wgpu zero-initializes every new buffer (WebGPU's rule), and
        // `alloc` always creates one: no second clear from the host.
        self.alloc(dtype, shape)
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let buf = self.ctx.upload_bytes("upload", host.bytes())?;
        Ok(self.tensor(host.dtype(), host.shape(), buf, host.bytes().len() as u64))
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let s = ctx::storage_of(t, self.id)?;
        // A view is read from its byte offset in the parent's buffer.
        let (off, n) = (t.offset_bytes() as u64, t.nbytes() as u64);
        let end = off + n;
        if end > s.bytes {
            return Err(ctx::dev_err(format!(
                "download: a view of bytes [{off}, {end}) lies outside its {}-byte buffer",
                s.bytes
            )));
        }
        let mut bytes = self.ctx.read_bytes("download", &s.buffer, end)?;
        if off > 0 {
            bytes.drain(..off as usize);
        }
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
        if dst.is_view() {
            return Err(Error::Other(format!(
                "write: {dst:?} is a view; views are read-only"
            )));
        }
        self.ctx.write_bytes("write", buffer(dst)?, src.bytes())
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize()
    }

    deepport_core::for_each_local_op!(table_local_ops);
}

/// The adapters wgpu finds here, in the order `wgpu:N` numbers them.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    Ok(ctx::adapters()?
        .iter()
        .map(|i| DeviceInfo {
            backend: BACKEND.into(),
            device: format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend),
            driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
            vendor: vendor_name(i.vendor),
        })
        .collect())
}

/// Registers `wgpu` (`wgpu:N` picks the N-th adapter of [`devices`]).
/// Creating it probes for an adapter and returns [`Error::Unavailable`]
/// with the reason when there is none.
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "WGSL compute through wgpu (Vulkan; lavapipe on the CPU)",
        |device| {
            Ok(Box::new(Wgpu::with_options(WgpuOptions {
                device,
                ..WgpuOptions::default()
            })?))
        },
        devices,
    );
}
