//! The device context: [`Cx`] implements [`LaunchContext`] on the CUDA
//! driver (through cudarc's raw `sys`/`result` bindings).
//!
//! * One primary context and one non-blocking stream per backend instance;
//!   every call binds the context to the calling thread first.
//! * Device memory is stream-ordered (`cuMemAllocAsync`/`cuMemFreeAsync`
//!   on the instance's stream) where the device has memory pools, else
//!   `cuMemAlloc` with frees deferred to the next synchronize.
//! * Modules: each [`KernelSource`] is compiled once per process and arch by
//!   `crate::nvrtc::compile` for the device's arch (`sm_90a` on Hopper,
//!   `sm_{major}{minor}` elsewhere) and loaded (once per instance) from its
//!   cubin; functions are cached per entry point.
//! * Deferred checks: [`Cx::check`] hands out `u64` status entries of one
//!   device buffer (zeroed) and records what each means; at the next
//!   `synchronize`/`download` the stream is synchronized, the entries are
//!   read back and reset, and the first flagged one becomes the error
//!   (`IndexOutOfRange`/`NonFinite`), reported once — the semantics of the
//!   wgpu backend's `ctx/checks.rs`.
//!
//! Only [`probe::driver`] having succeeded makes it safe to call cudarc
//! (which panics on a missing library): [`Device::open`] checks it first.

use crate::launch::{
    Arch, Arg, CheckKind, Grid, Kernel, KernelSource, LaunchContext, Scratch, Target, TensorMap,
    TmaDtype, TmaParams, TmaSwizzle,
};
use crate::probe::{self, BACKEND};
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use deepport_core::backend::{InstanceId, Tensor};
use deepport_core::device::Storage;
use deepport_core::tensor::unravel;
use deepport_core::{Error, Result};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Status entries per instance; when they run out, the stream is settled
/// (synchronized and its checks read) before more are handed out.
pub const STATUS_ENTRIES: usize = 4096;

/// Dynamic shared memory a kernel may use without opting in.
pub const DEFAULT_SMEM: u32 = 48 * 1024;

/// An `Error::Device` of this backend.
pub(crate) fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

/// Maps a driver error to `Error::Device` naming what failed.
pub(crate) fn drv<T>(
    what: impl FnOnce() -> String,
    r: std::result::Result<T, DriverError>,
) -> Result<T> {
    r.map_err(|e| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        dev_err(format!("{}: {name} ({text})", what()))
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one device is, read from its attributes.
#[derive(Clone, Debug)]
pub struct DeviceDesc {
    pub ordinal: usize,
    pub name: String,
    pub arch: Arch,
    /// `sm_90a`, `sm_80`, …
    pub arch_name: String,
    pub memory_pools: bool,
    pub total_mem: usize,
}

/// Reads a device's description (no context needed). Call after
/// [`probe::driver`] succeeded.
pub(crate) fn describe(ordinal: usize) -> Result<DeviceDesc> {
    use sys::CUdevice_attribute_enum as A;
    let what = |s: &'static str| move || format!("device {ordinal}: {s}");
    let dev = drv(what("cuDeviceGet"), result::device::get(ordinal as i32))?;
    let name = drv(what("cuDeviceGetName"), result::device::get_name(dev))?;
    let attr = |a: sys::CUdevice_attribute, n: &'static str| -> Result<i32> {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet; the
        // attribute is a plain query.
        drv(what(n), unsafe { result::device::get_attribute(dev, a) })
    };
    let major = attr(
        A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        "compute capability",
    )?;
    let minor = attr(
        A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        "compute capability",
    )?;
    let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?;
    let smem = attr(
        A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        "opt-in shared memory",
    )?;
    let pools = attr(
        A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
        "memory pools",
    )?;
    // SAFETY: as above.
    let total_mem = drv(what("cuDeviceTotalMem"), unsafe {
        result::device::total_mem(dev)
    })?;
    let (major, minor) = (major.max(0) as u32, minor.max(0) as u32);
    Ok(DeviceDesc {
        ordinal,
        name,
        arch: Arch {
            major,
            minor,
            sms: sms.max(0) as u32,
            smem_optin: smem.max(0) as u32,
        },
        arch_name: probe::arch_string(major, minor),
        memory_pools: pools > 0,
        total_mem,
    })
}

/// One device: its context, the instance's stream, and how memory is
/// freed. Shared (`Arc`) by the context and every allocation.
pub struct Device {
    pub desc: DeviceDesc,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Frees waiting for the next synchronize (devices without memory
    /// pools only).
    deferred: Mutex<Vec<u64>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({})", self.desc.ordinal, self.desc.name)
    }
}

impl Device {
    /// Opens device `ordinal`: probes the driver, checks the index, retains
    /// the primary context and creates a stream.
    pub fn open(ordinal: usize) -> Result<Arc<Device>> {
        let info = probe::driver()?;
        if ordinal >= info.devices {
            return Err(deepport_core::registry::no_such_device(
                BACKEND,
                ordinal,
                info.devices,
            ));
        }
        let desc = describe(ordinal)?;
        let what = |s: &'static str| move || format!("cuda:{ordinal}: {s}");
        let ctx = drv(
            what("retaining the primary context"),
            CudaContext::new(ordinal),
        )?;
        let stream = drv(what("creating a stream"), ctx.new_stream())?;
        Ok(Arc::new(Device {
            desc,
            ctx,
            stream,
            deferred: Mutex::new(Vec::new()),
        }))
    }

    /// Makes the context current on this thread.
    pub(crate) fn bind(&self, what: &str) -> Result<()> {
        drv(
            || format!("{what}: binding the context"),
            self.ctx.bind_to_thread(),
        )
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// `bytes` of device memory, stream-ordered; 0 bytes is the null
    /// pointer.
    pub(crate) fn alloc(self: &Arc<Self>, what: &str, bytes: usize) -> Result<DeviceBuffer> {
        if bytes == 0 {
            return Ok(DeviceBuffer {
                dev: self.clone(),
                ptr: 0,
                bytes: 0,
            });
        }
        self.bind(what)?;
        let ptr = if self.desc.memory_pools {
            // SAFETY: the context is current; the stream belongs to it.
            drv(
                || format!("{what}: cuMemAllocAsync of {bytes} bytes"),
                unsafe { result::malloc_async(self.cu_stream(), bytes) },
            )?
        } else {
            // SAFETY: the context is current.
            drv(|| format!("{what}: cuMemAlloc of {bytes} bytes"), unsafe {
                result::malloc_sync(bytes)
            })?
        };
        Ok(DeviceBuffer {
            dev: self.clone(),
            ptr,
            bytes,
        })
    }

    /// Zero-fills `[ptr, ptr + bytes)`, stream-ordered.
    pub(crate) fn zero(&self, what: &str, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind(what)?;
        // SAFETY: `ptr..ptr+bytes` lies in an allocation of this context
        // (callers pass their own buffers); the memset is stream-ordered.
        drv(|| format!("{what}: cuMemsetD8Async"), unsafe {
            result::memset_d8_async(ptr, 0, bytes, self.cu_stream())
        })
    }

    /// Copies host bytes to `ptr`, stream-ordered. The source is pageable
    /// memory, which the driver stages before this call returns, so `src`
    /// may be dropped afterwards.
    pub(crate) fn upload(&self, what: &str, ptr: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind(what)?;
        // SAFETY: `ptr` addresses at least `src.len()` bytes of a live
        // allocation (checked by callers); `src` is a live host slice.
        drv(
            || format!("{what}: cuMemcpyHtoDAsync of {} bytes", src.len()),
            unsafe { result::memcpy_htod_async(ptr, src, self.cu_stream()) },
        )
    }

    /// Copies `dst.len()` bytes at `ptr` to the host after the work queued
    /// so far (synchronizes the stream).
    pub(crate) fn download(&self, what: &str, ptr: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return self.sync(what);
        }
        self.bind(what)?;
        // SAFETY: `ptr` addresses at least `dst.len()` bytes of a live
        // allocation; `dst` stays borrowed until the stream is synchronized
        // below, so the asynchronous copy never outlives it.
        let n = dst.len();
        drv(
            || format!("{what}: cuMemcpyDtoHAsync of {n} bytes"),
            unsafe { result::memcpy_dtoh_async(dst, ptr, self.cu_stream()) },
        )?;
        self.sync(what)
    }

    /// Synchronizes the stream and releases deferred frees.
    pub(crate) fn sync(&self, what: &str) -> Result<()> {
        self.bind(what)?;
        drv(
            || format!("{what}: cuStreamSynchronize"),
            self.stream.synchronize(),
        )?;
        let frees = std::mem::take(&mut *lock(&self.deferred));
        for p in frees {
            // SAFETY: `p` came from cuMemAlloc of this context and its last
            // user has completed (the stream was just synchronized).
            drv(|| format!("{what}: cuMemFree"), unsafe {
                result::free_sync(p)
            })?;
        }
        Ok(())
    }

    fn free(&self, ptr: u64) {
        if ptr == 0 {
            return;
        }
        if self.desc.memory_pools {
            if self.ctx.bind_to_thread().is_ok() {
                // SAFETY: `ptr` came from cuMemAllocAsync on this stream;
                // the free is ordered after every queued use. A failure here
                // (device lost) has nowhere to go but is not unsafe.
                let _ = unsafe { result::free_async(ptr, self.cu_stream()) };
            }
        } else {
            lock(&self.deferred).push(ptr);
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Finish queued work and the deferred frees before the stream and
        // context go; errors have no caller left to report to.
        let _ = self.sync("dropping the device");
    }
}

/// A device allocation, freed (stream-ordered) when dropped.
pub struct DeviceBuffer {
    pub(crate) dev: Arc<Device>,
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:?}, {} bytes)", self.dev, self.bytes)
    }
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

/// The storage behind a tensor of the cuda backend.
#[derive(Debug)]
pub struct CudaStorage {
    pub(crate) buf: DeviceBuffer,
    pub(crate) label: String,
}

impl CudaStorage {
    /// The device address of the allocation.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
    /// The allocation's size in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.bytes
    }
    /// The device (context and stream) the allocation belongs to.
    pub fn device(&self) -> &Arc<Device> {
        &self.buf.dev
    }
}

impl Storage for CudaStorage {
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

// ---------------------------------------------------------------------------
// Deferred checks

/// A handed-out status entry: what to report when it is flagged.
#[derive(Clone, Debug)]
pub struct CheckRecord {
    pub op: &'static str,
    pub arg: &'static str,
    pub shape: Vec<usize>,
    pub kind: CheckKind,
}

impl CheckRecord {
    /// The error of a status entry (`(~index << 32) | value_bits`, see
    /// `dp_flag` in `port.cuh`), or `None` when it was not flagged. A range
    /// check's value is the low 32 bits of the index, sign-extended.
    pub fn error(&self, word: u64) -> Option<Error> {
        if word == 0 {
            return None;
        }
        let index = !((word >> 32) as u32) as usize;
        let bits = word as u32;
        let position = unravel(index, &self.shape);
        Some(match &self.kind {
            CheckKind::Range { lo, hi, allow } => Error::IndexOutOfRange {
                op: self.op,
                arg: self.arg,
                position,
                value: bits as i32 as i64,
                range: match allow {
                    Some(a) => format!("[{lo}, {hi}) or {a}"),
                    None => format!("[{lo}, {hi})"),
                },
            },
            CheckKind::Finite => Error::NonFinite {
                op: self.op,
                arg: self.arg,
                position,
                value: f32::from_bits(bits) as f64,
            },
        })
    }
}

/// The first error among `words` (entry `i` belongs to `records[i]`), in
/// the order the checks were handed out.
pub fn first_error(records: &[CheckRecord], words: &[u64]) -> Option<Error> {
    records.iter().zip(words).find_map(|(r, &w)| r.error(w))
}

#[derive(Default)]
struct Checks {
    records: Vec<CheckRecord>,
    /// The error found at a settle, reported at the next sync/download.
    pending: Option<Error>,
}

// ---------------------------------------------------------------------------
// Kernel arguments

/// Kernel arguments in the form `cuLaunchKernel` takes: each value in an
/// aligned slot (8 bytes; 128 bytes at 64-byte alignment for a map), and an
/// array of pointers to them. Built once, never grown afterwards, so the
/// pointers stay valid while the value lives.
pub struct PackedArgs {
    words: Vec<u64>,
    maps: Vec<TensorMap>,
    /// One per argument: (is a map, index into `words`/`maps`).
    order: Vec<(bool, usize)>,
}

impl PackedArgs {
    pub fn new(args: &[Arg]) -> Self {
        let mut p = PackedArgs {
            words: Vec::new(),
            maps: Vec::new(),
            order: Vec::new(),
        };
        for a in args {
            // A 4-byte argument lives in the low bytes of its 8-byte box;
            // the driver reads as many bytes as the parameter has, from the
            // box's first byte (little-endian: the low bytes).
            let w = match a {
                Arg::Ptr(v) | Arg::U64(v) => *v,
                Arg::I64(v) => *v as u64,
                Arg::I32(v) => *v as u32 as u64,
                Arg::U32(v) => *v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::TensorMap(m) => {
                    p.order.push((true, p.maps.len()));
                    p.maps.push((**m).clone());
                    continue;
                }
            };
            p.order.push((false, p.words.len()));
            p.words.push(w);
        }
        p
    }

    /// The bytes the driver reads for argument `i` (its C size).
    #[cfg(test)]
    pub(crate) fn bytes(&self, i: usize, args: &[Arg]) -> Vec<u8> {
        let (map, j) = self.order[i];
        if map {
            return self.maps[j]
                .0
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
        }
        let size = match args[i] {
            Arg::I32(_) | Arg::U32(_) | Arg::F32(_) => 4,
            _ => 8,
        };
        self.words[j].to_le_bytes()[..size].to_vec()
    }

    /// The `void**` array: one pointer per argument, valid while `self`
    /// lives unchanged.
    pub fn pointers(&self) -> Vec<*mut c_void> {
        self.order
            .iter()
            .map(|&(map, j)| {
                if map {
                    &self.maps[j] as *const TensorMap as *mut c_void
                } else {
                    &self.words[j] as *const u64 as *mut c_void
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// TMA descriptors

impl TmaDtype {
    /// Element size in bytes.
    pub fn size(self) -> u64 {
        match self {
            TmaDtype::U8 => 1,
            TmaDtype::U16 | TmaDtype::Bf16 => 2,
            TmaDtype::F32 => 4,
        }
    }
}

impl TmaSwizzle {
    /// The swizzle span in bytes (the inner box may not exceed it).
    pub fn span(self) -> Option<u64> {
        match self {
            TmaSwizzle::None => None,
            TmaSwizzle::B32 => Some(32),
            TmaSwizzle::B64 => Some(64),
            TmaSwizzle::B128 => Some(128),
        }
    }
}

/// Checks `p` against `cuTensorMapEncodeTiled`'s requirements (no
/// interleave, element strides 1), so a bad descriptor is a clear error
/// instead of `CUDA_ERROR_INVALID_VALUE`.
pub fn validate_tma(p: &TmaParams) -> Result<()> {
    let bad = |m: String| Error::Invalid {
        op: "tensor_map",
        arg: "params",
        msg: format!("TMA descriptor: {m} ({p:?})"),
    };
    let rank = p.dims.len();
    if !(1..=5).contains(&rank) {
        return Err(bad(format!("rank {rank}; must be 1..=5")));
    }
    if p.box_dims.len() != rank {
        return Err(bad(format!(
            "{} box dims for rank {rank}",
            p.box_dims.len()
        )));
    }
    if p.strides.len() != rank - 1 {
        return Err(bad(format!(
            "{} strides for rank {rank}; need {} (dims 1..)",
            p.strides.len(),
            rank - 1
        )));
    }
    if !p.base.is_multiple_of(16) {
        return Err(bad(format!(
            "base address {:#x} is not 16-byte aligned",
            p.base
        )));
    }
    for (i, &d) in p.dims.iter().enumerate() {
        if d == 0 || d > 1 << 32 {
            return Err(bad(format!("dim {i} = {d}; must be 1..=2^32")));
        }
    }
    for (i, &s) in p.strides.iter().enumerate() {
        if !s.is_multiple_of(16) || s >= 1 << 40 {
            return Err(bad(format!(
                "stride of dim {} = {s} bytes; must be a multiple of 16 below 2^40",
                i + 1
            )));
        }
    }
    for (i, &b) in p.box_dims.iter().enumerate() {
        if b == 0 || b > 256 {
            return Err(bad(format!("box dim {i} = {b}; must be 1..=256")));
        }
    }
    let inner = p.box_dims[0] as u64 * p.dtype.size();
    if !inner.is_multiple_of(16) {
        return Err(bad(format!(
            "inner box is {inner} bytes; must be a multiple of 16"
        )));
    }
    if let Some(span) = p.swizzle.span() {
        if inner > span {
            return Err(bad(format!(
                "inner box is {inner} bytes, more than the {span}-byte swizzle span"
            )));
        }
    }
    Ok(())
}

fn encode_tma(p: &TmaParams) -> Result<TensorMap> {
    use sys::CUtensorMapDataType_enum as D;
    use sys::CUtensorMapSwizzle_enum as S;
    validate_tma(p)?;
    let dtype = match p.dtype {
        TmaDtype::U8 => D::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        TmaDtype::U16 => D::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        TmaDtype::F32 => D::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        TmaDtype::Bf16 => D::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let swizzle = match p.swizzle {
        TmaSwizzle::None => S::CU_TENSOR_MAP_SWIZZLE_NONE,
        TmaSwizzle::B32 => S::CU_TENSOR_MAP_SWIZZLE_32B,
        TmaSwizzle::B64 => S::CU_TENSOR_MAP_SWIZZLE_64B,
        TmaSwizzle::B128 => S::CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let elem_strides = vec![1u32; p.dims.len()];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has `rank` entries (`strides` rank - 1), checked
    // by `validate_tma`; `map` is a live, correctly aligned CUtensorMap;
    // the call only writes `map`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            p.dims.len() as u32,
            p.base as *mut c_void,
            p.dims.as_ptr(),
            p.strides.as_ptr(),
            p.box_dims.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    drv(|| format!("cuTensorMapEncodeTiled({p:?})"), r.result())?;
    Ok(TensorMap(map.opaque))
}

// ---------------------------------------------------------------------------
// Modules

struct Module(sys::CUmodule);
// SAFETY: a CUmodule handle may be used from any thread (with its context
// current, which every use here ensures).
unsafe impl Send for Module {}
// SAFETY: as above; the handle is never mutated after loading.
unsafe impl Sync for Module {}

#[derive(Clone, Copy)]
struct Function {
    f: sys::CUfunction,
    /// The dynamic shared memory opted into so far.
    smem_set: u32,
}
// SAFETY: a CUfunction handle may be used from any thread (context current).
unsafe impl Send for Function {}

/// NVRTC's output for `src` on `arch`, compiled once per process (every
/// instance on a device of that arch loads the same cubin; compiling is
/// the expensive part), or read from `DEEPPORT_CUDA_KERNELS` (prebuilt by
/// `deepport kernels`, fingerprint-checked) when that is set.
fn compiled(src: &'static KernelSource, arch: &str) -> Result<Arc<crate::nvrtc::Compiled>> {
    type Cache = HashMap<(&'static str, String), Arc<crate::nvrtc::Compiled>>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (src.name, arch.to_string());
    if let Some(c) = lock(cache).get(&key) {
        return Ok(c.clone());
    }
    // Compiled outside the lock: other sources compile meanwhile; a source
    // compiled twice at once is only wasted work.
    let c = Arc::new(match crate::nvrtc::prebuilt_dir() {
        Some(dir) => crate::nvrtc::load_prebuilt(&dir, src, arch)?,
        None => crate::nvrtc::compile(src, arch)?,
    });
    lock(cache).insert(key, c.clone());
    Ok(c)
}

/// The device context of one backend instance (see the module docs).
pub struct Cx {
    pub(crate) dev: Arc<Device>,
    pub(crate) id: InstanceId,
    label: String,
    modules: Mutex<HashMap<&'static str, Module>>,
    functions: Mutex<HashMap<(&'static str, &'static str), Function>>,
    status: DeviceBuffer,
    checks: Mutex<Checks>,
}

impl Drop for Cx {
    fn drop(&mut self) {
        if self.dev.bind("unloading modules").is_err() {
            return;
        }
        let _ = self.dev.sync("unloading modules");
        for (_, m) in lock(&self.modules).drain() {
            // SAFETY: the module was loaded by this context and no work that
            // uses it is in flight (the stream was synchronized).
            let _ = unsafe { result::module::unload(m.0) };
        }
    }
}

impl Cx {
    /// Opens device `ordinal` for a new instance `id`.
    pub fn new(ordinal: usize, id: InstanceId) -> Result<Cx> {
        let dev = Device::open(ordinal)?;
        let status = dev.alloc("status buffer", STATUS_ENTRIES * 8)?;
        dev.zero("status buffer", status.ptr, status.bytes)?;
        Ok(Cx {
            label: format!("{BACKEND}:{ordinal}"),
            dev,
            id,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            status,
            checks: Mutex::new(Checks::default()),
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// `cuda:N`, for storage labels and messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Allocates a tensor's storage.
    pub(crate) fn storage(&self, what: &str, bytes: usize) -> Result<CudaStorage> {
        Ok(CudaStorage {
            buf: self.dev.alloc(what, bytes)?,
            label: self.label.clone(),
        })
    }

    /// Synchronizes the stream, reads and resets the status entries, and
    /// keeps the first error for the next [`Cx::take_error`].
    fn settle(&self, what: &str, checks: &mut Checks) -> Result<()> {
        self.dev.sync(what)?;
        if checks.records.is_empty() {
            return Ok(());
        }
        let n = checks.records.len();
        let mut raw = vec![0u8; n * 8];
        self.dev.download(what, self.status.ptr, &mut raw)?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let err = first_error(&checks.records, &words);
        self.dev.zero(what, self.status.ptr, n * 8)?;
        checks.records.clear();
        if checks.pending.is_none() {
            checks.pending = err;
        }
        Ok(())
    }

    /// Synchronizes and returns the first deferred-check error since the
    /// last call (reported once).
    pub fn synchronize(&self, what: &str) -> Result<()> {
        let mut c = lock(&self.checks);
        self.settle(what, &mut c)?;
        match c.pending.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Bytes `[off, off + len)` of a storage, after the queued work; a
    /// pending check error wins over the data.
    pub fn read(&self, what: &str, s: &CudaStorage, off: usize, len: usize) -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|end| end > s.bytes()) {
            return Err(dev_err(format!(
                "{what}: bytes [{off}, {off}+{len}) lie outside a {}-byte buffer",
                s.bytes()
            )));
        }
        let mut out = vec![0u8; len];
        self.dev.download(what, s.ptr() + off as u64, &mut out)?;
        self.synchronize(what)?;
        Ok(out)
    }

    fn function(&self, k: Kernel) -> Result<Function> {
        let key = (k.source.name, k.entry);
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(*f);
        }
        let module = self.module(k.source)?;
        let name = CString::new(k.entry)
            .map_err(|_| dev_err(format!("kernel entry {:?} contains a NUL", k.entry)))?;
        // SAFETY: `module` is a live module of this context (current, bound
        // in `module`); `name` is a NUL-terminated string.
        let f = drv(
            || format!("{}: cuModuleGetFunction({})", k.source.name, k.entry),
            unsafe { result::module::get_function(module, name) },
        )?;
        let func = Function {
            f,
            smem_set: DEFAULT_SMEM,
        };
        lock(&self.functions).insert(key, func);
        Ok(func)
    }

    fn module(&self, src: &'static KernelSource) -> Result<sys::CUmodule> {
        let mut mods = lock(&self.modules);
        if let Some(m) = mods.get(src.name) {
            return Ok(m.0);
        }
        let arch = &self.dev.desc.arch_name;
        if src.target == Target::Sm90a && !self.dev.desc.arch.is_hopper() {
            return Err(dev_err(format!(
                "kernel source {} is for sm_90a; this device is {arch}",
                src.name
            )));
        }
        let compiled = compiled(src, arch)?;
        self.dev.bind(src.name)?;
        let m = if compiled.cubin.is_empty() {
            let ptx = CString::new(compiled.ptx.as_str())
                .map_err(|_| dev_err(format!("{}: PTX contains a NUL", src.name)))?;
            // SAFETY: a NUL-terminated PTX image; the context is current.
            drv(
                || format!("{}: cuModuleLoadData (PTX for {arch})", src.name),
                unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) },
            )?
        } else {
            // SAFETY: a cubin image produced by NVRTC for this device's
            // arch (an ELF, whose size the driver reads from its header);
            // the context is current.
            drv(
                || format!("{}: cuModuleLoadData (cubin for {arch})", src.name),
                unsafe { result::module::load_data(compiled.cubin.as_ptr() as *const c_void) },
            )?
        };
        mods.insert(src.name, Module(m));
        Ok(m)
    }

    fn ptr_of(&self, s: &CudaStorage, t: &Tensor) -> Result<u64> {
        let off = t.offset_bytes();
        if off + t.nbytes() > s.bytes() {
            return Err(dev_err(format!(
                "{t:?}: bytes [{off}, {}) lie outside its {}-byte buffer",
                off + t.nbytes(),
                s.bytes()
            )));
        }
        Ok(s.ptr() + off as u64)
    }
}

/// Checks launch geometry against the driver's limits, naming the kernel.
pub fn validate_grid(k: &Kernel, g: &Grid, arch: &Arch) -> Result<()> {
    let bad = |m: String| dev_err(format!("launch of {}::{}: {m}", k.source.name, k.entry));
    let (gx, gy, gz) = g.grid;
    let (bx, by, bz) = g.block;
    if gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 {
        return Err(bad(format!(
            "empty grid {:?} x block {:?}",
            g.grid, g.block
        )));
    }
    if gy > 65535 || gz > 65535 || gx > i32::MAX as u32 {
        return Err(bad(format!(
            "grid {:?} beyond (2^31-1, 65535, 65535)",
            g.grid
        )));
    }
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads > 1024 || bz > 64 {
        return Err(bad(format!(
            "block {:?} beyond 1024 threads (z ≤ 64)",
            g.block
        )));
    }
    if g.smem > DEFAULT_SMEM && g.smem > arch.smem_optin {
        return Err(bad(format!(
            "{} bytes of dynamic shared memory; the device allows {}",
            g.smem, arch.smem_optin
        )));
    }
    Ok(())
}

impl LaunchContext for Cx {
    fn arch(&self) -> Arch {
        self.dev.desc.arch
    }

    fn ptr(&self, t: &Tensor) -> Result<u64> {
        let s = t.storage_for::<CudaStorage>(self.id, BACKEND)?;
        self.ptr_of(s, t)
    }

    fn ptr_mut(&self, t: &mut Tensor) -> Result<u64> {
        let (off, n, desc) = (t.offset_bytes(), t.nbytes(), format!("{t:?}"));
        let s = t.storage_mut_for::<CudaStorage>(self.id, BACKEND)?;
        if off + n > s.bytes() {
            return Err(dev_err(format!(
                "{desc}: bytes [{off}, {}) lie outside its {}-byte buffer",
                off + n,
                s.bytes()
            )));
        }
        Ok(s.ptr() + off as u64)
    }

    fn scratch(&self, bytes: usize) -> Result<Scratch> {
        let buf = self.dev.alloc("scratch", bytes)?;
        self.dev.zero("scratch", buf.ptr, bytes)?;
        Ok(Scratch {
            ptr: buf.ptr,
            bytes,
            _keep: Some(Box::new(buf)),
        })
    }

    fn check(
        &self,
        op: &'static str,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u64> {
        let mut c = lock(&self.checks);
        if c.records.len() >= STATUS_ENTRIES {
            // Out of entries: settle the earlier ops first (their error, if
            // any, stays pending for the next synchronize/download).
            self.settle(op, &mut c)?;
        }
        let i = c.records.len();
        c.records.push(CheckRecord {
            op,
            arg,
            shape: shape.to_vec(),
            kind,
        });
        Ok(self.status.ptr + 8 * i as u64)
    }

    fn tensor_map(&self, params: &TmaParams) -> Result<TensorMap> {
        validate_tma(params)?;
        self.dev.bind("cuTensorMapEncodeTiled")?;
        encode_tma(params)
    }

    fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
        validate_grid(&kernel, &grid, &self.dev.desc.arch)?;
        let func = self.function(kernel)?;
        let what = || format!("{}::{}", kernel.source.name, kernel.entry);
        self.dev.bind(kernel.entry)?;
        if grid.smem > func.smem_set {
            // SAFETY: `func.f` is a live function of this context; the
            // value is within the device's opt-in limit (validate_grid).
            drv(
                || {
                    format!(
                        "{}: cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {})",
                        what(),
                        grid.smem
                    )
                },
                unsafe {
                    result::function::set_function_attribute(
                        func.f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        grid.smem as i32,
                    )
                },
            )?;
            if let Some(f) = lock(&self.functions).get_mut(&(kernel.source.name, kernel.entry)) {
                f.smem_set = f.smem_set.max(grid.smem);
            }
        }
        let packed = PackedArgs::new(args);
        let mut ptrs = packed.pointers();
        // SAFETY: `func.f` is a live function; `ptrs` has one pointer per
        // kernel parameter, each to a live value of the parameter's size
        // (`packed` outlives the call; the driver copies the values before
        // returning). That the kernel's parameter list matches `args` is
        // the op glue's contract (tested on the CPU with a recorder).
        drv(|| format!("launch of {}", what()), unsafe {
            result::launch_kernel(
                func.f,
                grid.grid,
                grid.block,
                grid.smem,
                self.dev.cu_stream(),
                &mut ptrs,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(shape: &[usize], kind: CheckKind) -> CheckRecord {
        CheckRecord {
            op: "embedding",
            arg: "ids",
            shape: shape.to_vec(),
            kind,
        }
    }

    fn flag(index: u32, bits: u32) -> u64 {
        ((!index as u64) << 32) | bits as u64
    }

    #[test]
    fn status_entries_decode() {
        let r = rec(
            &[2, 3],
            CheckKind::Range {
                lo: 0,
                hi: 10,
                allow: Some(-1),
            },
        );
        assert!(r.error(0).is_none());
        match r.error(flag(4, (-7i32) as u32)) {
            Some(Error::IndexOutOfRange {
                op,
                arg,
                position,
                value,
                range,
            }) => {
                assert_eq!((op, arg), ("embedding", "ids"));
                assert_eq!(position, vec![1, 1]);
                assert_eq!(value, -7);
                assert_eq!(range, "[0, 10) or -1");
            }
            other => panic!("{other:?}"),
        }
        match r.error(flag(0, 12)) {
            Some(Error::IndexOutOfRange {
                position,
                value,
                range,
                ..
            }) => {
                assert_eq!(position, vec![0, 0]);
                assert_eq!(value, 12);
                assert_eq!(range, "[0, 10) or -1");
            }
            other => panic!("{other:?}"),
        }
        let f = rec(&[5], CheckKind::Finite);
        match f.error(flag(3, f32::INFINITY.to_bits())) {
            Some(Error::NonFinite {
                position, value, ..
            }) => {
                assert_eq!(position, vec![3]);
                assert!(value.is_infinite() && value > 0.0);
            }
            other => panic!("{other:?}"),
        }
        match f.error(flag(2, f32::NAN.to_bits())) {
            Some(Error::NonFinite { value, .. }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn atomic_max_keeps_the_smallest_index() {
        // dp_flag's atomicMax: a smaller index has a larger ~index.
        assert!(flag(3, 0) > flag(4, u32::MAX));
        let r = rec(
            &[10],
            CheckKind::Range {
                lo: 0,
                hi: 4,
                allow: None,
            },
        );
        match r.error(flag(3, 9).max(flag(7, 5))) {
            Some(Error::IndexOutOfRange {
                position, value, ..
            }) => {
                assert_eq!(position, vec![3]);
                assert_eq!(value, 9);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_error_in_record_order() {
        let recs = vec![
            rec(
                &[4],
                CheckKind::Range {
                    lo: 0,
                    hi: 4,
                    allow: None,
                },
            ),
            CheckRecord {
                op: "rms_norm",
                arg: "x",
                shape: vec![4],
                kind: CheckKind::Finite,
            },
        ];
        assert!(first_error(&recs, &[0, 0]).is_none());
        match first_error(&recs, &[0, flag(1, f32::NAN.to_bits())]) {
            Some(Error::NonFinite { op: "rms_norm", .. }) => {}
            other => panic!("{other:?}"),
        }
        match first_error(&recs, &[flag(2, 5), flag(1, 0)]) {
            Some(Error::IndexOutOfRange {
                op: "embedding", ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn args_pack_to_their_c_bytes() {
        let mut map = TensorMap([0; 16]);
        for (i, w) in map.0.iter_mut().enumerate() {
            *w = 0x0101_0101_0101_0101 * i as u64;
        }
        let args = vec![
            Arg::Ptr(0xdead_beef_0000_1000),
            Arg::I32(-2),
            Arg::U32(7),
            Arg::I64(-3),
            Arg::U64(u64::MAX - 1),
            Arg::F32(1.5),
            Arg::TensorMap(Box::new(map.clone())),
            Arg::U32(9),
        ];
        let p = PackedArgs::new(&args);
        let ptrs = p.pointers();
        assert_eq!(ptrs.len(), args.len());
        assert_eq!(p.bytes(0, &args), 0xdead_beef_0000_1000u64.to_le_bytes());
        assert_eq!(p.bytes(1, &args), (-2i32).to_le_bytes());
        assert_eq!(p.bytes(2, &args), 7u32.to_le_bytes());
        assert_eq!(p.bytes(3, &args), (-3i64).to_le_bytes());
        assert_eq!(p.bytes(4, &args), (u64::MAX - 1).to_le_bytes());
        assert_eq!(p.bytes(5, &args), 1.5f32.to_le_bytes());
        let mb = p.bytes(6, &args);
        assert_eq!(mb.len(), 128);
        assert_eq!(&mb[8..16], &0x0101_0101_0101_0101u64.to_le_bytes());
        assert_eq!(p.bytes(7, &args), 9u32.to_le_bytes());
        // The map is passed by value: its pointer is 64-byte aligned and
        // distinct from every scalar's.
        assert_eq!(ptrs[6] as usize % 64, 0);
        for (i, a) in ptrs.iter().enumerate() {
            assert_eq!(*a as usize % 8, 0, "arg {i}");
            for b in &ptrs[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    fn tma() -> TmaParams {
        TmaParams {
            dtype: TmaDtype::U8,
            base: 0x1000,
            dims: vec![7168, 4096],
            strides: vec![7168],
            box_dims: vec![128, 128],
            swizzle: TmaSwizzle::B128,
        }
    }

    #[test]
    fn tma_params_validate() {
        assert!(validate_tma(&tma()).is_ok());
        let err = |f: &dyn Fn(&mut TmaParams)| {
            let mut p = tma();
            f(&mut p);
            validate_tma(&p).unwrap_err().to_string()
        };
        assert!(err(&|p| p.base = 0x1008).contains("16-byte aligned"));
        assert!(err(&|p| p.strides = vec![7160]).contains("multiple of 16"));
        assert!(err(&|p| p.box_dims = vec![128, 512]).contains("box dim 1 = 512"));
        assert!(err(&|p| p.box_dims = vec![128]).contains("box dims for rank 2"));
        assert!(err(&|p| p.strides = vec![]).contains("strides for rank 2"));
        assert!(err(&|p| {
            p.dims = vec![];
            p.strides = vec![];
            p.box_dims = vec![];
        })
        .contains("rank 0"));
        assert!(err(&|p| p.dims = vec![0, 4096]).contains("dim 0 = 0"));
        assert!(err(&|p| {
            p.dtype = TmaDtype::Bf16;
        })
        .contains("swizzle span"));
        assert!(err(&|p| p.box_dims = vec![8, 128]).contains("multiple of 16"));
        let mut p = tma();
        p.dtype = TmaDtype::Bf16;
        p.box_dims = vec![64, 64];
        assert!(validate_tma(&p).is_ok());
        p.swizzle = TmaSwizzle::None;
        p.box_dims = vec![256, 1];
        assert!(validate_tma(&p).is_ok());
    }

    #[test]
    fn grids_validate() {
        static SRC: KernelSource = KernelSource {
            name: "t.cu",
            text: "",
            target: Target::Portable,
            entries: &["k"],
        };
        let k = Kernel {
            source: &SRC,
            entry: "k",
        };
        let h100 = Arch {
            major: 9,
            minor: 0,
            sms: 132,
            smem_optin: 232448,
        };
        let g = |grid, block, smem| Grid { grid, block, smem };
        assert!(validate_grid(&k, &g((1, 1, 1), (128, 1, 1), 0), &h100).is_ok());
        assert!(validate_grid(&k, &g((1, 1, 1), (128, 1, 1), 200_000), &h100).is_ok());
        let e = validate_grid(&k, &g((1, 1, 1), (128, 1, 1), 300_000), &h100).unwrap_err();
        assert!(e.to_string().contains("t.cu::k"), "{e}");
        assert!(validate_grid(&k, &g((0, 1, 1), (1, 1, 1), 0), &h100).is_err());
        assert!(validate_grid(&k, &g((1, 70000, 1), (1, 1, 1), 0), &h100).is_err());
        assert!(validate_grid(&k, &g((1, 1, 1), (1024, 2, 1), 0), &h100).is_err());
    }
}
