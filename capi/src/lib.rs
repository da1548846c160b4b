//! deepport-capi: the C ABI of deepport. The header, `capi/include/deepport.h`,
//! is generated from this file by cbindgen (the test `tests/header.rs`
//! fails when the committed header is stale) and documents ownership and
//! thread safety.
//!
//! Every entry point runs inside [`entry`]: arguments are checked (NULL
//! pointers, UTF-8, dtypes, sizes), a panic is caught, and an error
//! becomes a [`DeepportStatus`] plus a thread-local message
//! ([`deepport_last_error`]).

use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_core::backend::Backend;
use deepport_core::ops::{self, Add, Embedding, Gemm, RmsNorm, SiluMul};
use deepport_core::registry::Registry;
use deepport_core::{DType, Error, HostTensor, Tensor};
use deepport_model::{Checkpoint, Model, ModelConfig, Numerics};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

pub mod launch;

/// Version of this C ABI; bumped on every incompatible change.
pub const DEEPPORT_ABI_VERSION: u32 = 1;

/// What a call returned. `DEEPPORT_STATUS_OK` is 0; on any other value
/// `deepport_last_error()` says what went wrong.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeepportStatus {
    Ok = 0,
    /// A NULL pointer, a string that is not UTF-8, an unknown dtype, a
    /// buffer of the wrong size, an unknown op or parameter.
    InvalidArgument = 1,
    /// Shapes, dtypes or parameters the op rejects (core's validation).
    Invalid = 2,
    /// The backend lacks this op (or these dtypes).
    NotSupported = 3,
    /// No backend of that name in this build.
    UnknownBackend = 4,
    /// The backend cannot run on this machine (no driver, no device).
    Unavailable = 5,
    /// An index value out of range (token id, block table, expert id).
    IndexOutOfRange = 6,
    /// A device fault, or a tensor of another backend instance.
    Device = 7,
    /// Out of memory, or over the memory budget.
    OutOfMemory = 8,
    /// A file could not be read or parsed.
    Io = 9,
    /// A tensor is in use by another call (see thread safety).
    Busy = 10,
    /// An internal panic was caught (a bug of deepport: please report it).
    Panic = 11,
    /// Anything else.
    Other = 12,
}

/// Element types. Data is little-endian; bf16 and f16 are 2 bytes, the FP8
/// formats and E8M0 1 byte of raw bits.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeepportDType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    /// OCP FP8 E4M3FN.
    F8E4M3 = 3,
    /// AMD FP8 E4M3FNUZ.
    F8E4M3Fnuz = 4,
    F8E5M2 = 5,
    /// UE8M0 scale byte.
    E8M0 = 6,
    I32 = 7,
    I64 = 8,
    U8 = 9,
    Bool = 10,
}

const DTYPES: [(i32, DType); 11] = [
    (0, DType::F32),
    (1, DType::F16),
    (2, DType::BF16),
    (3, DType::F8E4M3),
    (4, DType::F8E4M3Fnuz),
    (5, DType::F8E5M2),
    (6, DType::E8M0),
    (7, DType::I32),
    (8, DType::I64),
    (9, DType::U8),
    (10, DType::Bool),
];

fn dtype_from(code: i32) -> Result<DType, Fail> {
    DTYPES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, d)| *d)
        .ok_or_else(|| Fail::arg(format!("unknown dtype code {code} (0 to 10)")))
}

fn dtype_code(d: DType) -> i32 {
    DTYPES
        .iter()
        .find(|(_, x)| *x == d)
        .map(|(c, _)| *c)
        .unwrap_or(-1)
}

/// A backend instance (one device of one backend).
pub struct DeepportBackend {
    inner: Arc<dyn Backend>,
    info: [CString; 4],
}

/// A tensor in a backend's memory.
pub struct DeepportTensor {
    inner: RwLock<Tensor>,
}

/// A DeepSeek-V3 model loaded on a backend, with its latent cache.
pub struct DeepportModel {
    model: Mutex<Model<'static>>,
    vocab: usize,
    // Keeps the backend the model borrows alive; dropped after `model`.
    _backend: Arc<dyn Backend>,
}

/// The outputs of [`deepport_op_run`], by name.
pub struct DeepportOutputs {
    items: Vec<(CString, HostTensor, Vec<usize>)>,
}

/// Strings describing a backend instance; valid as long as the backend.
#[repr(C)]
pub struct DeepportDeviceInfo {
    pub backend: *const c_char,
    pub device: *const c_char,
    pub driver: *const c_char,
    pub vendor: *const c_char,
}

/// A host tensor given to [`deepport_op_run`]: dense row-major data.
#[repr(C)]
pub struct DeepportHostTensor {
    /// NUL-terminated tensor name (as `deepport op --help` lists them).
    pub name: *const c_char,
    /// A DeepportDType value.
    pub dtype: i32,
    pub ndim: usize,
    pub shape: *const usize,
    pub data: *const c_void,
    /// Must equal the element count times the dtype's size.
    pub nbytes: usize,
}

// ---- errors ---------------------------------------------------------------

struct Fail {
    status: DeepportStatus,
    msg: String,
}

impl Fail {
    fn arg(msg: impl Into<String>) -> Self {
        Fail {
            status: DeepportStatus::InvalidArgument,
            msg: msg.into(),
        }
    }
    fn busy(what: &str) -> Self {
        Fail {
            status: DeepportStatus::Busy,
            msg: format!("{what} is in use by another call"),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        use DeepportStatus as S;
        let status = match &e {
            Error::Shape { .. } | Error::DType { .. } | Error::Invalid { .. } => S::Invalid,
            Error::NonFinite { .. } => S::Invalid,
            Error::IndexOutOfRange { .. } => S::IndexOutOfRange,
            Error::NotSupported { .. } => S::NotSupported,
            Error::Unavailable { .. } => S::Unavailable,
            Error::UnknownBackend { .. } => S::UnknownBackend,
            Error::ForeignTensor { .. } | Error::Device { .. } | Error::Comm { .. } => S::Device,
            Error::Io { .. } | Error::Format { .. } | Error::Tensor { .. } => S::Io,
            Error::OverBudget { .. } | Error::OutOfMemory { .. } => S::OutOfMemory,
            _ => S::Other,
        };
        Fail {
            status,
            msg: e.to_string(),
        }
    }
}

impl From<deepport_conformance::CliError> for Fail {
    fn from(e: deepport_conformance::CliError) -> Self {
        use deepport_conformance::CliError as C;
        match e {
            C::Usage(m) => Fail::arg(m),
            C::Invalid(e) | C::Failed(e) => e.into(),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one entry point: its errors and panics become a status and a message.
fn entry(f: impl FnOnce() -> Result<(), Fail>) -> DeepportStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => DeepportStatus::Ok,
        Ok(Err(fail)) => {
            set_error(&fail.msg);
            fail.status
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal panic (a bug of deepport): {msg}"));
            DeepportStatus::Panic
        }
    }
}

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(deepport_conformance::registry)
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Fail::arg(format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is NULL or a live object of this type made by deepport.
unsafe fn obj<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: NULL or live by the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Fail::arg(format!("{what} is NULL")))
}

fn out_ptr<T>(p: *mut T, what: &str) -> Result<(), Fail> {
    if p.is_null() {
        Err(Fail::arg(format!("the out pointer {what} is NULL")))
    } else {
        Ok(())
    }
}

/// # Safety
/// `shape` points to `ndim` values (or `ndim` is 0).
unsafe fn shape_arg(shape: *const usize, ndim: usize) -> Result<Vec<usize>, Fail> {
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if shape.is_null() {
        return Err(Fail::arg("shape is NULL"));
    }
    if ndim > 16 {
        return Err(Fail::arg(format!("{ndim} dimensions; at most 16")));
    }
    // SAFETY: `ndim` readable values by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(shape, ndim) }.to_vec())
}

fn nbytes_of(dtype: DType, shape: &[usize]) -> Result<usize, Fail> {
    shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| Fail::arg(format!("a {dtype} tensor of shape {shape:?} overflows")))
}

/// # Safety
/// `data` points to `nbytes` readable bytes (or `nbytes` is 0).
unsafe fn host_arg(
    dtype: DType,
    shape: &[usize],
    data: *const c_void,
    nbytes: usize,
) -> Result<HostTensor, Fail> {
    let want = nbytes_of(dtype, shape)?;
    if nbytes != want {
        return Err(Fail::arg(format!(
            "a {dtype} tensor of shape {shape:?} has {want} bytes, the buffer {nbytes}"
        )));
    }
    if data.is_null() && nbytes > 0 {
        return Err(Fail::arg("data is NULL"));
    }
    let bytes = if nbytes == 0 {
        Vec::new()
    } else {
        // SAFETY: `nbytes` readable bytes by the caller's contract.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), nbytes) }.to_vec()
    };
    Ok(HostTensor::from_bytes(dtype, shape, bytes)?)
}

fn boxed<T>(out: *mut *mut T, v: T) {
    // SAFETY: every caller checked `out` with `out_ptr` first.
    unsafe { *out = Box::into_raw(Box::new(v)) };
}

// ---- version, errors, discovery ------------------------------------------

/// The ABI version of this library (`DEEPPORT_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn deepport_abi_version() -> u32 {
    DEEPPORT_ABI_VERSION
}

/// The message of the calling thread's last failed call ("" if none).
/// Valid until the thread's next call into deepport.
#[no_mangle]
pub extern "C" fn deepport_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// How many backends this build has (available here or not). Plugins named
/// in `$DEEPPORT_PLUGIN` when this is first called are included.
#[no_mangle]
pub extern "C" fn deepport_backend_count() -> usize {
    catch_unwind(|| registry().entries().len()).unwrap_or(0)
}

/// The name of backend `index` (0 ≤ index < count), a static string.
///
/// # Safety
/// `name` is a valid pointer to write to.
#[no_mangle]
pub unsafe extern "C" fn deepport_backend_name(
    index: usize,
    name: *mut *const c_char,
) -> DeepportStatus {
    entry(|| {
        out_ptr(name, "name")?;
        static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
        let names = NAMES.get_or_init(|| {
            registry()
                .names()
                .iter()
                .map(|n| CString::new(*n).unwrap_or_default())
                .collect()
        });
        let n = names.get(index).ok_or_else(|| {
            Fail::arg(format!("backend index {index}; there are {}", names.len()))
        })?;
        // SAFETY: checked non-NULL above.
        unsafe { *name = n.as_ptr() };
        Ok(())
    })
}

/// Creates an instance of a backend: `NAME` or `NAME:DEVICE` (`cpu`,
/// `wgpu:0`). DEEPPORT_STATUS_UNAVAILABLE says why it cannot run here.
///
/// # Safety
/// `spec` is a NUL-terminated string; `out` a valid pointer to write to.
#[no_mangle]
pub unsafe extern "C" fn deepport_backend_create(
    spec: *const c_char,
    out: *mut *mut DeepportBackend,
) -> DeepportStatus {
    entry(|| {
        out_ptr(out, "out")?;
        // SAFETY: the caller's contract.
        let spec = unsafe { str_arg(spec, "spec") }?;
        let b = registry().create(spec)?;
        let i = b.info();
        let c = |s: String| CString::new(s.replace('\0', " ")).unwrap_or_default();
        let info = [c(i.backend), c(i.device), c(i.driver), c(i.vendor)];
        boxed(
            out,
            DeepportBackend {
                inner: Arc::from(b),
                info,
            },
        );
        Ok(())
    })
}

/// Frees a backend (NULL: nothing). Its tensors stay valid until freed.
///
/// # Safety
/// `b` is NULL or a backend not yet freed, used by no other call.
#[no_mangle]
pub unsafe extern "C" fn deepport_backend_free(b: *mut DeepportBackend) {
    if !b.is_null() {
        // SAFETY: made by Box::into_raw in deepport_backend_create, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(b) })));
    }
}

/// The backend's name, device, driver and vendor (strings valid as long as
/// the backend).
///
/// # Safety
/// `b` is a live backend; `info` a valid pointer to write to.
#[no_mangle]
pub unsafe extern "C" fn deepport_backend_info(
    b: *const DeepportBackend,
    info: *mut DeepportDeviceInfo,
) -> DeepportStatus {
    entry(|| {
        out_ptr(info, "info")?;
        // SAFETY: the caller's contract.
        let b = unsafe { obj(b, "backend") }?;
        // SAFETY: checked non-NULL.
        unsafe {
            *info = DeepportDeviceInfo {
                backend: b.info[0].as_ptr(),
                device: b.info[1].as_ptr(),
                driver: b.info[2].as_ptr(),
                vendor: b.info[3].as_ptr(),
            }
        };
        Ok(())
    })
}

/// Waits for all work submitted to the backend; reports a deferred error.
///
/// # Safety
/// `b` is a live backend.
#[no_mangle]
pub unsafe extern "C" fn deepport_backend_synchronize(b: *const DeepportBackend) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let b = unsafe { obj(b, "backend") }?;
        Ok(b.inner.synchronize()?)
    })
}

// ---- device memory --------------------------------------------------------

fn new_tensor(out: *mut *mut DeepportTensor, t: Tensor) {
    boxed(
        out,
        DeepportTensor {
            inner: RwLock::new(t),
        },
    );
}

/// Allocates an uninitialised tensor of `dtype` (a DeepportDType) and
/// `shape[ndim]` on the backend.
///
/// # Safety
/// `b` is a live backend, `shape` has `ndim` values, `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_alloc(
    b: *const DeepportBackend,
    dtype: i32,
    shape: *const usize,
    ndim: usize,
    out: *mut *mut DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        out_ptr(out, "out")?;
        // SAFETY: the caller's contract.
        let (b, shape) = unsafe { (obj(b, "backend")?, shape_arg(shape, ndim)?) };
        let dtype = dtype_from(dtype)?;
        nbytes_of(dtype, &shape)?;
        new_tensor(out, b.inner.alloc(dtype, &shape)?);
        Ok(())
    })
}

/// Copies host data (`nbytes` = element count × dtype size) into a new
/// tensor on the backend.
///
/// # Safety
/// `b` is a live backend, `shape` has `ndim` values, `data` `nbytes`
/// readable bytes, `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_upload(
    b: *const DeepportBackend,
    dtype: i32,
    shape: *const usize,
    ndim: usize,
    data: *const c_void,
    nbytes: usize,
    out: *mut *mut DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        out_ptr(out, "out")?;
        // SAFETY: the caller's contract.
        let (b, shape) = unsafe { (obj(b, "backend")?, shape_arg(shape, ndim)?) };
        // SAFETY: the caller's contract.
        let host = unsafe { host_arg(dtype_from(dtype)?, &shape, data, nbytes) }?;
        new_tensor(out, b.inner.upload(&host)?);
        Ok(())
    })
}

/// Copies a tensor to host memory (`nbytes` must be its size); waits for
/// the work that writes it.
///
/// # Safety
/// `b` and `t` are live, `dst` has `nbytes` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_download(
    b: *const DeepportBackend,
    t: *const DeepportTensor,
    dst: *mut c_void,
    nbytes: usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let (b, t) = unsafe { (obj(b, "backend")?, obj(t, "tensor")?) };
        let t = t.inner.try_read().map_err(|_| Fail::busy("the tensor"))?;
        if nbytes != t.nbytes() {
            return Err(Fail::arg(format!(
                "{t:?} has {} bytes, the buffer {nbytes}",
                t.nbytes()
            )));
        }
        if dst.is_null() && nbytes > 0 {
            return Err(Fail::arg("dst is NULL"));
        }
        let host = b.inner.download(&t)?;
        if nbytes > 0 {
            // SAFETY: `dst` has `nbytes` writable bytes; sizes checked equal.
            unsafe { std::ptr::copy_nonoverlapping(host.bytes().as_ptr(), dst.cast(), nbytes) };
        }
        Ok(())
    })
}

/// Overwrites a tensor with host data of its size.
///
/// # Safety
/// `b` and `t` are live, `src` has `nbytes` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_write(
    b: *const DeepportBackend,
    t: *const DeepportTensor,
    src: *const c_void,
    nbytes: usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let (b, t) = unsafe { (obj(b, "backend")?, obj(t, "tensor")?) };
        let mut t = t.inner.try_write().map_err(|_| Fail::busy("the tensor"))?;
        // SAFETY: the caller's contract.
        let host = unsafe { host_arg(t.dtype(), t.shape(), src, nbytes) }?;
        Ok(b.inner.write(&mut t, &host)?)
    })
}

/// Frees a tensor (NULL: nothing).
///
/// # Safety
/// `t` is NULL or a tensor not yet freed, used by no other call.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_free(t: *mut DeepportTensor) {
    if !t.is_null() {
        // SAFETY: made by Box::into_raw, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(t) })));
    }
}

/// The tensor's dtype (a DeepportDType), rank and shape: `shape` receives
/// up to `cap` dimensions, `ndim` the rank. Either pointer may be NULL.
///
/// # Safety
/// `t` is live; `dtype`, `ndim` are NULL or writable; `shape` is NULL or
/// has `cap` writable values.
#[no_mangle]
pub unsafe extern "C" fn deepport_tensor_describe(
    t: *const DeepportTensor,
    dtype: *mut i32,
    shape: *mut usize,
    cap: usize,
    ndim: *mut usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let t = unsafe { obj(t, "tensor") }?;
        let t = t.inner.try_read().map_err(|_| Fail::busy("the tensor"))?;
        // SAFETY: each pointer is NULL or writable (for `cap` values).
        unsafe {
            if !dtype.is_null() {
                *dtype = dtype_code(t.dtype());
            }
            if !ndim.is_null() {
                *ndim = t.shape().len();
            }
            if !shape.is_null() {
                for (i, &d) in t.shape().iter().take(cap).enumerate() {
                    *shape.add(i) = d;
                }
            }
        }
        Ok(())
    })
}

// ---- typed ops on device tensors ------------------------------------------

/// Runs `f` with read access to `ins` and write access to `out`; refuses
/// an output that is also an input (no aliasing) and a tensor in use.
fn with_tensors(
    ins: &[*const DeepportTensor],
    out: *const DeepportTensor,
    f: impl FnOnce(&[&Tensor], &mut Tensor) -> Result<(), Error>,
) -> Result<(), Fail> {
    if ins.contains(&out) {
        return Err(Fail::arg(
            "an output tensor is also an input; use another tensor",
        ));
    }
    let mut guards = Vec::with_capacity(ins.len());
    for (i, &p) in ins.iter().enumerate() {
        // SAFETY: the caller's contract: NULL or live tensors.
        let t = unsafe { obj(p, &format!("input tensor {i}")) }?;
        guards.push(
            t.inner
                .try_read()
                .map_err(|_| Fail::busy("an input tensor"))?,
        );
    }
    // SAFETY: as above.
    let o = unsafe { obj(out, "output tensor") }?;
    let mut o = o
        .inner
        .try_write()
        .map_err(|_| Fail::busy("the output tensor"))?;
    let refs: Vec<&Tensor> = guards.iter().map(|g| &**g).collect();
    Ok(f(&refs, &mut o)?)
}

/// `out = a + b` (SPEC.md `add`).
///
/// # Safety
/// Every pointer is a live object of its type.
#[no_mangle]
pub unsafe extern "C" fn deepport_add(
    backend: *const DeepportBackend,
    a: *const DeepportTensor,
    b: *const DeepportTensor,
    out: *const DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let be = unsafe { obj(backend, "backend") }?;
        with_tensors(&[a, b], out, |t, out| {
            ops::run(
                be.inner.as_ref(),
                Add {
                    a: t[0],
                    b: t[1],
                    out,
                },
            )
        })
    })
}

/// `out = silu(gate) · up` (SPEC.md `silu_mul`).
///
/// # Safety
/// Every pointer is a live object of its type.
#[no_mangle]
pub unsafe extern "C" fn deepport_silu_mul(
    backend: *const DeepportBackend,
    gate: *const DeepportTensor,
    up: *const DeepportTensor,
    out: *const DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let be = unsafe { obj(backend, "backend") }?;
        with_tensors(&[gate, up], out, |t, out| {
            ops::run(
                be.inner.as_ref(),
                SiluMul {
                    gate: t[0],
                    up: t[1],
                    out,
                },
            )
        })
    })
}

/// `y = x / sqrt(mean(x²) + eps) · weight` over the last dim (SPEC.md `rms_norm`).
///
/// # Safety
/// Every pointer is a live object of its type.
#[no_mangle]
pub unsafe extern "C" fn deepport_rms_norm(
    backend: *const DeepportBackend,
    x: *const DeepportTensor,
    weight: *const DeepportTensor,
    y: *const DeepportTensor,
    eps: f32,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let be = unsafe { obj(backend, "backend") }?;
        with_tensors(&[x, weight], y, |t, y| {
            ops::run(
                be.inner.as_ref(),
                RmsNorm {
                    x: t[0],
                    weight: t[1],
                    y,
                    eps,
                },
            )
        })
    })
}

/// `out[t] = table[ids[t]]` (SPEC.md `embedding`).
///
/// # Safety
/// Every pointer is a live object of its type.
#[no_mangle]
pub unsafe extern "C" fn deepport_embedding(
    backend: *const DeepportBackend,
    table: *const DeepportTensor,
    ids: *const DeepportTensor,
    out: *const DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let be = unsafe { obj(backend, "backend") }?;
        with_tensors(&[table, ids], out, |t, out| {
            ops::run(
                be.inner.as_ref(),
                Embedding {
                    table: t[0],
                    ids: t[1],
                    out,
                },
            )
        })
    })
}

/// `d = a · bᵀ` (SPEC.md `gemm`: a [m, k], b [n, k], d [m, n]).
///
/// # Safety
/// Every pointer is a live object of its type.
#[no_mangle]
pub unsafe extern "C" fn deepport_gemm(
    backend: *const DeepportBackend,
    a: *const DeepportTensor,
    b: *const DeepportTensor,
    d: *const DeepportTensor,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let be = unsafe { obj(backend, "backend") }?;
        with_tensors(&[a, b], d, |t, d| {
            ops::run(
                be.inner.as_ref(),
                Gemm {
                    a: t[0],
                    b: t[1],
                    d,
                },
            )
        })
    })
}

// ---- every local op, generically, on device tensors ---------------------------

/// Runs any local op by name (`fp8_gemm`, `mla_decode`, `rope`, …; the
/// names, tensors and parameters of `deepport op --help`, from the op's
/// declaration) on device tensors the caller owns. No data moves between
/// host and device.
///
/// `tensors[i]` is bound to the declared tensor `names[i]`, for `i < n`:
/// every required input, the optional inputs wanted, and every output the
/// op writes (allocated by the caller with deepport_tensor_alloc). Inputs
/// are read in their own dtypes (no conversion); each output must have
/// exactly the dtype and shape the op makes from these inputs and
/// parameters (an output's dtype follows parameters such as `out_dtype`),
/// and `copy_window`'s `dst` is updated in place. `params` is NULL, "" or
/// `NAME=VALUE[,NAME=VALUE...]` (defaults as `deepport op --help` lists).
///
/// Errors: an unknown op, tensor name or parameter, a missing tensor or a
/// tensor given twice is DEEPPORT_STATUS_INVALID_ARGUMENT; wrong dtypes,
/// shapes or parameter values (core's validation) DEEPPORT_STATUS_INVALID;
/// a tensor of another backend instance DEEPPORT_STATUS_DEVICE; a tensor in
/// use by another call DEEPPORT_STATUS_BUSY; an op the backend lacks
/// DEEPPORT_STATUS_NOT_SUPPORTED, as are the expert-parallel ops
/// (`dispatch`, `combine`, `low_latency_*`: they need a rank group; use
/// deepport_op_run for one rank on host tensors).
///
/// Asynchronous: the op may still be running when this returns. Errors that
/// need device values (an index out of range) are reported by the next
/// deepport_tensor_download or deepport_backend_synchronize on this backend.
///
/// # Safety
/// `backend` is live; `op` NUL-terminated; `names` and `tensors` have `n`
/// entries (NUL-terminated strings, live tensors); `params` is NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn deepport_op_launch(
    backend: *const DeepportBackend,
    op: *const c_char,
    names: *const *const c_char,
    tensors: *const *const DeepportTensor,
    n: usize,
    params: *const c_char,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let (b, name) = unsafe { (obj(backend, "backend")?, str_arg(op, "op")?) };
        if n > 0 && (names.is_null() || tensors.is_null()) {
            return Err(Fail::arg("names or tensors is NULL"));
        }
        if n > 256 {
            return Err(Fail::arg(format!("{n} tensors; at most 256")));
        }
        let mut bound = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `n` entries each, by the caller's contract.
            let (np, tp) = unsafe { (*names.add(i), *tensors.add(i)) };
            // SAFETY: NULL or NUL-terminated, by the caller's contract.
            let tname = unsafe { str_arg(np, &format!("names[{i}]")) }?;
            // SAFETY: NULL or live, by the caller's contract.
            let tensor = unsafe { obj(tp, &format!("tensors[{i}] (`{tname}`)")) }?;
            bound.push(launch::Bound {
                name: tname,
                tensor: &tensor.inner,
            });
        }
        let params = if params.is_null() {
            ""
        } else {
            // SAFETY: NUL-terminated by the caller's contract.
            unsafe { str_arg(params, "params") }?
        };
        launch::launch(b.inner.as_ref(), name, &bound, params)
    })
}

// ---- every op, generically, on host tensors ----------------------------------

/// Runs any op by name (`fp8_gemm`, `mla_decode`, `dispatch`, …; the names
/// and tensors of `deepport op --help`) on host tensors, exactly as
/// `deepport op` does: inputs are uploaded, outputs allocated (their dtypes
/// and sizes from the parameters' defaults or `params`), run, downloaded.
/// `params` are `n_params` strings `NAME=VALUE`. Expert-parallel ops run on
/// one rank. On success `*out` holds the outputs (free with
/// deepport_outputs_free).
///
/// # Safety
/// `b` is live; `op` NUL-terminated; `inputs` has `n_inputs` entries whose
/// pointers are valid as described in DeepportHostTensor; `params` has
/// `n_params` NUL-terminated strings; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn deepport_op_run(
    b: *const DeepportBackend,
    op: *const c_char,
    inputs: *const DeepportHostTensor,
    n_inputs: usize,
    params: *const *const c_char,
    n_params: usize,
    out: *mut *mut DeepportOutputs,
) -> DeepportStatus {
    entry(|| {
        out_ptr(out, "out")?;
        // SAFETY: the caller's contract.
        let (b, name) = unsafe { (obj(b, "backend")?, str_arg(op, "op")?) };
        let spec = opspec::find(name).ok_or_else(|| {
            Fail::arg(format!(
                "unknown op `{name}`; known: {}",
                opspec::names().join(", ")
            ))
        })?;
        let mut tensors = BTreeMap::new();
        if n_inputs > 0 && inputs.is_null() {
            return Err(Fail::arg("inputs is NULL"));
        }
        for i in 0..n_inputs {
            // SAFETY: `n_inputs` entries by the caller's contract.
            let h = unsafe { &*inputs.add(i) };
            // SAFETY: as documented for DeepportHostTensor.
            let tname = unsafe { str_arg(h.name, &format!("inputs[{i}].name")) }?;
            // SAFETY: as above.
            let shape = unsafe { shape_arg(h.shape, h.ndim) }?;
            // SAFETY: as above.
            let t = unsafe { host_arg(dtype_from(h.dtype)?, &shape, h.data, h.nbytes) }
                .map_err(|f| Fail::arg(format!("input `{tname}`: {}", f.msg)))?;
            tensors.insert(tname.to_string(), t);
        }
        let mut ps = Vec::with_capacity(n_params);
        if n_params > 0 && params.is_null() {
            return Err(Fail::arg("params is NULL"));
        }
        for i in 0..n_params {
            // SAFETY: `n_params` strings by the caller's contract.
            ps.push(unsafe { str_arg(*params.add(i), &format!("params[{i}]")) }?.to_string());
        }
        let mut params = Params::parse(spec, &ps)?;
        let inputs = Inputs::new("the C caller's tensors", spec.name, tensors);
        inputs.check_present(spec, 1)?;
        let outs = opspec::run(spec, b.inner.as_ref(), &inputs, &mut params)?;
        let items = outs
            .into_iter()
            .map(|(n, t)| {
                let shape = t.shape().to_vec();
                (CString::new(n).unwrap_or_default(), t, shape)
            })
            .collect();
        boxed(out, DeepportOutputs { items });
        Ok(())
    })
}

/// How many outputs `o` holds.
///
/// # Safety
/// `o` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn deepport_outputs_count(o: *const DeepportOutputs) -> usize {
    // SAFETY: the caller's contract.
    unsafe { o.as_ref() }.map_or(0, |o| o.items.len())
}

/// Output `index`: its name, dtype, rank, shape and data (all valid as long
/// as `o`). Any out pointer may be NULL.
///
/// # Safety
/// `o` is live; each out pointer is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn deepport_outputs_get(
    o: *const DeepportOutputs,
    index: usize,
    name: *mut *const c_char,
    dtype: *mut i32,
    ndim: *mut usize,
    shape: *mut *const usize,
    data: *mut *const c_void,
    nbytes: *mut usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let o = unsafe { obj(o, "outputs") }?;
        let (n, t, s) = o.items.get(index).ok_or_else(|| {
            Fail::arg(format!("output index {index}; there are {}", o.items.len()))
        })?;
        // SAFETY: each pointer is NULL or writable.
        unsafe {
            if !name.is_null() {
                *name = n.as_ptr();
            }
            if !dtype.is_null() {
                *dtype = dtype_code(t.dtype());
            }
            if !ndim.is_null() {
                *ndim = s.len();
            }
            if !shape.is_null() {
                *shape = s.as_ptr();
            }
            if !data.is_null() {
                *data = t.bytes().as_ptr().cast();
            }
            if !nbytes.is_null() {
                *nbytes = t.bytes().len();
            }
        }
        Ok(())
    })
}

/// Frees outputs (NULL: nothing).
///
/// # Safety
/// `o` is NULL or not yet freed.
#[no_mangle]
pub unsafe extern "C" fn deepport_outputs_free(o: *mut DeepportOutputs) {
    if !o.is_null() {
        // SAFETY: made by Box::into_raw, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(o) })));
    }
}

// ---- the forward pass -------------------------------------------------------

/// Loads a DeepSeek-V3 model from a Hugging Face checkpoint directory
/// (config.json + safetensors) onto a backend, in numerics `mode`: "f32",
/// "bf16" or "fp8" (SPEC.md §8). The model keeps the backend alive.
///
/// # Safety
/// `b` is live; `checkpoint_dir` and `mode` are NUL-terminated; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn deepport_model_load(
    b: *const DeepportBackend,
    checkpoint_dir: *const c_char,
    mode: *const c_char,
    out: *mut *mut DeepportModel,
) -> DeepportStatus {
    entry(|| {
        out_ptr(out, "out")?;
        // SAFETY: the caller's contract.
        let (b, dir, mode) = unsafe {
            (
                obj(b, "backend")?,
                str_arg(checkpoint_dir, "checkpoint_dir")?,
                str_arg(mode, "mode")?,
            )
        };
        let m = DeepportModel::load(b.inner.clone(), std::path::Path::new(dir), mode)
            .map_err(|(status, msg)| Fail { status, msg })?;
        boxed(out, m);
        Ok(())
    })
}

impl DeepportModel {
    /// Loads a model onto `backend` (kept alive by the model), as
    /// [`deepport_model_load`] does: the Rust entry for other bindings (the
    /// Python module). On failure, the status and the message.
    pub fn load(
        backend: Arc<dyn Backend>,
        dir: &std::path::Path,
        mode: &str,
    ) -> Result<DeepportModel, (DeepportStatus, String)> {
        let inner = || -> Result<DeepportModel, Fail> {
            let numerics = Numerics::parse(mode)
                .ok_or_else(|| Fail::arg(format!("mode `{mode}`: f32, bf16 or fp8")))?;
            let cfg = ModelConfig::from_file(dir.join("config.json"))?;
            let ckpt = Checkpoint::open(dir)?;
            // SAFETY: the Arc keeps the backend at a stable heap address,
            // and DeepportModel drops `model` before `_backend`, so the
            // reference outlives every use.
            let r: &'static dyn Backend = unsafe { &*Arc::as_ptr(&backend) };
            let model = Model::load(r, &ckpt, &cfg, numerics, Default::default())?;
            Ok(DeepportModel {
                model: Mutex::new(model),
                vocab: cfg.vocab_size,
                _backend: backend,
            })
        };
        inner().map_err(|f| (f.status, f.msg))
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Model<'static>>, Fail> {
        self.model.try_lock().map_err(|_| Fail::busy("the model"))
    }

    /// Runs a prompt from position 0 (replacing the cached sequence):
    /// logits `[tokens, vocab]` f32. `Busy` while another call runs.
    pub fn prefill(&self, tokens: &[u32]) -> Result<HostTensor, (DeepportStatus, String)> {
        let run = || -> Result<HostTensor, Fail> {
            if tokens.is_empty() {
                return Err(Fail::arg("the prompt is empty"));
            }
            Ok(self.lock()?.prefill(tokens)?)
        };
        run().map_err(|f| (f.status, f.msg))
    }

    /// Appends one token to the cached sequence: its logits `[vocab]` f32.
    pub fn decode(&self, token: u32) -> Result<HostTensor, (DeepportStatus, String)> {
        let run = || -> Result<HostTensor, Fail> { Ok(self.lock()?.decode(token)?) };
        run().map_err(|f| (f.status, f.msg))
    }
}

/// The model's vocabulary size (0 for NULL).
///
/// # Safety
/// `m` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn deepport_model_vocab(m: *const DeepportModel) -> usize {
    // SAFETY: the caller's contract.
    unsafe { m.as_ref() }.map_or(0, |m| m.vocab)
}

fn copy_logits(l: &HostTensor, dst: *mut f32, len: usize) -> Result<(), Fail> {
    let v = l.to_f32_vec();
    if len < v.len() {
        return Err(Fail::arg(format!(
            "the logits buffer holds {len} floats; {} are needed",
            v.len()
        )));
    }
    if dst.is_null() {
        return Err(Fail::arg("logits is NULL"));
    }
    // SAFETY: `dst` has `len` ≥ v.len() writable floats.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len()) };
    Ok(())
}

/// Runs a prompt from position 0 (replacing any cached sequence) and writes
/// the logits of every position, `[n_tokens, vocab]` f32 row-major, to
/// `logits` (`len` floats, at least n_tokens × vocab).
///
/// # Safety
/// `m` is live; `tokens` has `n_tokens` values; `logits` `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn deepport_model_prefill(
    m: *const DeepportModel,
    tokens: *const u32,
    n_tokens: usize,
    logits: *mut f32,
    len: usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let m = unsafe { obj(m, "model") }?;
        if tokens.is_null() || n_tokens == 0 {
            return Err(Fail::arg("the prompt is empty (or tokens is NULL)"));
        }
        // SAFETY: `n_tokens` values by the caller's contract.
        let toks = unsafe { std::slice::from_raw_parts(tokens, n_tokens) }.to_vec();
        let mut model = m.model.try_lock().map_err(|_| Fail::busy("the model"))?;
        let l = model.prefill(&toks)?;
        copy_logits(&l, logits, len)
    })
}

/// Appends one token to the cached sequence and writes its logits
/// (`vocab` f32) to `logits` (`len` ≥ vocab floats).
///
/// # Safety
/// `m` is live; `logits` has `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn deepport_model_decode(
    m: *const DeepportModel,
    token: u32,
    logits: *mut f32,
    len: usize,
) -> DeepportStatus {
    entry(|| {
        // SAFETY: the caller's contract.
        let m = unsafe { obj(m, "model") }?;
        let mut model = m.model.try_lock().map_err(|_| Fail::busy("the model"))?;
        let l = model.decode(token)?;
        copy_logits(&l, logits, len)
    })
}

/// Frees a model (NULL: nothing).
///
/// # Safety
/// `m` is NULL or a model not yet freed, used by no other call.
#[no_mangle]
pub unsafe extern "C" fn deepport_model_free(m: *mut DeepportModel) {
    if !m.is_null() {
        // SAFETY: made by Box::into_raw, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(m) })));
    }
}
