//! deepport's Vulkan backend (`vulkan`): GLSL compute shaders through ash.
//!
//! * `libvulkan` is loaded at run time (ash `loaded`): the crate builds
//!   without Vulkan, and a machine without a loader or device lists the
//!   backend as unavailable with the reason.
//! * Shaders are GLSL (`shaders/*.comp`), compiled to SPIR-V at build time
//!   by `glslangValidator`, or taken from the committed `spirv/` when the
//!   tool is absent (`tests/spirv.rs` fails when those are stale).
//! * Memory is sub-allocated from a few large blocks ([`arena`]); ops are
//!   recorded into one command buffer, submitted at `download` or
//!   `synchronize`; index checks run on the device and their errors come
//!   back at that point, once ([`checks`]). See [`ctx`] for the details.
//! * f16, bf16 and FP8 are decoded by bit manipulation in
//!   `shaders/common.glsl` (lavapipe has no bf16 and no FP8); the subgroup
//!   size is a specialization constant taken from the device.
//! * Ops not implemented answer `NotSupported` (see `kernels`).

/// The sub-allocator (shared with other backends: `deepport-gpu-host`).
pub use deepport_gpu_host::arena;
pub mod checks;
pub mod ctx;
mod kernels;

pub use ctx::{
    pick_coopmat, validation_available, CoopmatConfig, Features, Used, VulkanOptions, VulkanStorage,
};

use ctx::{dev_err, Ctx, Shared, BACKEND};
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use kernels::OpTable;

/// The committed-or-built SPIR-V of every shader, by name.
const SPIRV: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/spirv_list.rs"));

/// Where this build's SPIR-V came from: `glslangValidator` or `committed`.
pub const SPIRV_SOURCE: &str = env!("DEEPPORT_VULKAN_SPIRV_SOURCE");

/// Where the cooperative-matrix kernels' SPIR-V came from:
/// `$DEEPPORT_GLSLANG_COOPMAT` or `committed`.
pub const COOPMAT_SPIRV_SOURCE: &str = env!("DEEPPORT_VULKAN_COOPMAT_SPIRV_SOURCE");

pub(crate) fn spirv(name: &str) -> Option<&'static [u8]> {
    SPIRV.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Names of the shaders compiled into this build.
pub fn shader_names() -> Vec<&'static str> {
    SPIRV.iter().map(|(n, _)| *n).collect()
}

/// The Vulkan backend.
pub struct Vulkan {
    pub(crate) ctx: Ctx,
    table: OpTable,
    id: InstanceId,
}

impl std::fmt::Debug for Vulkan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vulkan({})", self.ctx.name)
    }
}

fn vendor_name(id: u32) -> String {
    match id {
        0x10de => "NVIDIA".into(),
        0x1002 | 0x1022 => "AMD".into(),
        0x8086 => "Intel".into(),
        0x13b5 => "ARM".into(),
        0x5143 => "Qualcomm".into(),
        0x10005 => "Mesa".into(),
        other => format!("0x{other:04x}"),
    }
}

impl Vulkan {
    pub const NAME: &'static str = BACKEND;

    /// The first compute device; [`Error::Unavailable`] with the reason
    /// when there is none.
    pub fn new() -> Result<Self> {
        Self::with_options(VulkanOptions::default())
    }

    /// [`Vulkan::new`] with options.
    pub fn with_options(opts: VulkanOptions) -> Result<Self> {
        Ok(Self {
            ctx: Shared::new(&opts)?,
            table: kernels::table(),
            id: InstanceId::fresh(),
        })
    }

    /// What the device offers (subgroup size, f16/int8, storage widths, …).
    pub fn features(&self) -> &Features {
        &self.ctx.features
    }

    /// What this instance's kernels use of it.
    pub fn used(&self) -> &Used {
        &self.ctx.used
    }

    /// One line: what the device offers and what the kernels use
    /// (`info().driver` and `deepport list` show it).
    pub fn capabilities(&self) -> String {
        let f = &self.ctx.features;
        let u = &self.ctx.used;
        let yn = |b: bool| if b { "yes" } else { "no" };
        let sg_ops = if f.subgroup_arith && f.subgroup_compute {
            "arithmetic"
        } else {
            "no arithmetic"
        };
        format!(
            "subgroup {} ({sg_ops}; reductions: {}), f16 {}, int8 {}, 16-bit storage {}, \
             8-bit storage {} (FP8 GEMM operands: {}), cooperative matrix {} ({}), timestamps {}",
            f.subgroup_size,
            if u.subgroup_reductions {
                "subgroupAdd/Max"
            } else {
                "shared memory"
            },
            yn(f.shader_f16),
            yn(f.shader_i8),
            yn(f.storage16),
            yn(f.storage8),
            if u.fp8_storage8 {
                "uint8_t, decoded to f16 by int8 arithmetic"
            } else {
                "32-bit words"
            },
            yn(u.coopmat.is_some()),
            u.coopmat_reason,
            yn(f.timestamps),
        )
    }

    /// Whether validation layers are on for this instance.
    pub fn validation(&self) -> bool {
        self.ctx.validation
    }

    /// Device memory blocks allocated so far (tensors are sub-allocated).
    pub fn device_blocks(&self) -> usize {
        self.ctx.device_blocks()
    }

    /// Test hook: records (never submits) a dispatch whose descriptor set
    /// was never written; with validation on, the next `synchronize` must
    /// fail naming the validation error. Refused without validation (the
    /// driver would see an invalid command buffer).
    #[doc(hidden)]
    pub fn debug_misuse(&self) -> Result<()> {
        if !self.ctx.validation {
            return Err(Error::Other(
                "debug_misuse needs validation layers (VulkanOptions::validation)".into(),
            ));
        }
        let mut rec = self.ctx.begin("debug_misuse")?;
        rec.misuse_unwritten_descriptor()?;
        rec.finish()
    }

    fn tensor(&self, dtype: DType, shape: &[usize], s: VulkanStorage) -> Tensor {
        Tensor::new(dtype, shape, Box::new(s), self.id)
    }

    fn nbytes(dtype: DType, shape: &[usize]) -> Result<u64> {
        shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .map(|n| n as u64)
            .ok_or_else(|| dev_err(format!("tensor {shape:?} of {dtype} is too large")))
    }
}

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

impl Backend for Vulkan {
    fn name(&self) -> &str {
        BACKEND
    }

    fn instance(&self) -> InstanceId {
        self.id
    }

    fn info(&self) -> DeviceInfo {
        let f = &self.ctx.features;
        DeviceInfo {
            backend: BACKEND.into(),
            device: self.ctx.name.clone(),
            driver: format!(
                "{} (Vulkan {}.{}; {}; SPIR-V from {}, cooperative-matrix SPIR-V from {})",
                self.ctx.driver,
                ash::vk::api_version_major(f.api),
                ash::vk::api_version_minor(f.api),
                self.capabilities(),
                SPIRV_SOURCE,
                COOPMAT_SPIRV_SOURCE
            ),
            vendor: vendor_name(self.ctx.vendor),
        }
    }

    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        self.table.supports(op, dtypes)
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = Self::nbytes(dtype, shape)?;
        let s = self.ctx.alloc("alloc", bytes)?;
        if self.ctx.poison {
            self.ctx.fill_slot("alloc", s.slot, u32::MAX)?;
        } else {
            self.ctx.zero_slot("alloc", s.slot)?;
        }
        Ok(self.tensor(dtype, shape, s))
    }

    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        // A fill on the device (also under DEEPPORT_VULKAN_POISON, which
        // poisons only what `alloc` hands out).
        let bytes = Self::nbytes(dtype, shape)?;
        let s = self.ctx.alloc("alloc_zeroed", bytes)?;
        self.ctx.zero_slot("alloc_zeroed", s.slot)?;
        Ok(self.tensor(dtype, shape, s))
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let s = self.ctx.alloc("upload", host.bytes().len() as u64)?;
        self.ctx.write_bytes("upload", s.slot, host.bytes())?;
        Ok(self.tensor(host.dtype(), host.shape(), s))
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let s = t.storage_for::<VulkanStorage>(self.id, BACKEND)?;
        let (off, n) = (t.offset_bytes() as u64, t.nbytes() as u64);
        if off + n > s.bytes {
            return Err(dev_err(format!(
                "download: a view of bytes [{off}, {}) lies outside its {}-byte tensor",
                off + n,
                s.bytes
            )));
        }
        let bytes = self.ctx.read_bytes("download", s.slot, off, n)?;
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
        let s = dst.storage_for::<VulkanStorage>(self.id, BACKEND)?;
        self.ctx.write_bytes("write", s.slot, src.bytes())
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize()
    }

    /// Timestamp queries around every op (`TOP_OF_PIPE` before its first
    /// command, `BOTTOM_OF_PIPE` after its last), scaled by `timestampPeriod`.
    fn set_device_timing(&self, on: bool) -> bool {
        self.ctx.set_timing(on)
    }

    fn take_device_seconds(&self) -> Option<f64> {
        self.ctx.take_device_seconds()
    }

    deepport_core::for_each_local_op!(table_local_ops);
}

/// The Vulkan compute devices here, in the order `vulkan:N` numbers them.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    Ok(ctx::list_devices()?
        .into_iter()
        .map(|(name, driver, vendor)| DeviceInfo {
            backend: BACKEND.into(),
            device: name,
            driver,
            vendor: vendor_name(vendor),
        })
        .collect())
}

/// Registers `vulkan` (`vulkan:N` picks the N-th device of [`devices`]).
/// Validation layers are enabled when `DEEPPORT_VULKAN_VALIDATION=1`.
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "GLSL compute through ash (Vulkan; lavapipe on the CPU)",
        |device| {
            Ok(Box::new(Vulkan::with_options(VulkanOptions {
                device: device.unwrap_or(0),
                validation: std::env::var("DEEPPORT_VULKAN_VALIDATION").is_ok_and(|v| v == "1"),
                portable: std::env::var("DEEPPORT_VULKAN_PORTABLE").is_ok_and(|v| v == "1"),
                poison: std::env::var("DEEPPORT_VULKAN_POISON").is_ok_and(|v| v == "1"),
            })?))
        },
        devices,
    );
}
