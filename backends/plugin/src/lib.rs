//! deepport-plugin: out-of-tree backends as shared libraries.
//!
//! A vendor implements the C vtable of `plugin/include/deepport_plugin.h`
//! in a shared library; [`Plugin::load`] opens it, checks it (the entry
//! symbol, the ABI version, the table's size, the required functions, the
//! name) and [`Plugin::create`] wraps one of its devices as a
//! [`deepport_core::Backend`], which the conformance suite judges like any
//! built-in backend (`deepport run --plugin libvendor.so`).
//!
//! Nothing a plugin answers is trusted: a NULL op pointer is
//! `NotSupported`, a status code outside the header's list, a NULL handle
//! from `alloc`, a NULL context from `create`, a negative device count, a
//! `supports` answer other than 0 or 1 are each a clear error naming the
//! plugin and the function, never a crash of the host. (A plugin that
//! corrupts memory or dies can still take the process down: judge those
//! with `deepport run --isolate`.)
//!
//! [`register_from_env`] adds every plugin named in `$DEEPPORT_PLUGIN`
//! (paths separated like `$PATH`) to a registry: `deepport --plugin PATH`
//! sets it, so that the case processes of `run --isolate` load it too.
//!
//! `build.rs` compiles the example plugin of `plugin/example/` and puts it
//! next to the binaries (`target/release/libdeepport_example_plugin.so`);
//! [`EXAMPLE_PLUGIN`] is its path in the build directory.

pub mod ffi;
mod params;

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Storage, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::registry::Registry;
use deepport_core::{DType, Error, HostTensor, Result};
use ffi::*;
use std::any::Any;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The example C plugin built by this crate's `build.rs` (in the build
/// directory; a copy lies next to the binaries of the profile).
pub const EXAMPLE_PLUGIN: &str = env!("DEEPPORT_EXAMPLE_PLUGIN");

/// The environment variable listing plugins to register (paths separated
/// like `$PATH`).
pub const PLUGIN_ENV: &str = "DEEPPORT_PLUGIN";

/// Longest string read from a plugin (names, messages).
const MAX_STR: usize = 4096;

/// Runs `f`, turning a panic into an error (no panic leaves a Backend
/// method of a plugin).
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Other(format!("{what}: internal panic: {msg}")))
        }
    }
}

/// Reads a NUL-terminated string of at most [`MAX_STR`] bytes.
///
/// # Safety
/// `p` is NULL or points to readable memory up to its NUL or `MAX_STR` bytes.
unsafe fn read_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut bytes = Vec::new();
    for i in 0..MAX_STR {
        // SAFETY: the caller promises readable bytes up to the NUL or MAX_STR.
        let b = unsafe { *p.add(i) } as u8;
        if b == 0 {
            return Some(String::from_utf8_lossy(&bytes).into_owned());
        }
        bytes.push(b);
    }
    bytes.extend_from_slice("…".as_bytes());
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// A loaded plugin library and its checked vtable.
pub struct Plugin {
    path: PathBuf,
    name: &'static str,
    vendor: String,
    /// The host's copy of the plugin's table (see `load_inner`).
    vt: Box<VtableV1>,
    ext: Ext,
    // Last: dropped after everything that points into it. Plugins loaded
    // through `load` are never dropped (their tensors may outlive a run).
    _lib: libloading::Library,
}

// SAFETY: `vt` points to the plugin's immutable vtable, which lives as long
// as `_lib`; the header requires every function of a plugin to be callable
// from any thread.
unsafe impl Send for Plugin {}
// SAFETY: as above; `Plugin` has no interior mutability.
unsafe impl Sync for Plugin {}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plugin({} from {})", self.name, self.path.display())
    }
}

fn load_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: format!("plugin {}", path.display()),
        reason: msg.to_string(),
    }
}

impl Plugin {
    /// Opens a plugin library and checks its vtable.
    pub fn load(path: &Path) -> Result<Plugin> {
        guard("loading a plugin", || Self::load_inner(path))
    }

    fn load_inner(path: &Path) -> Result<Plugin> {
        // SAFETY: loading a library runs its initialisers; that is the
        // trust a user gives a plugin by naming it.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| load_err(path, format!("cannot load the library: {e}")))?;
        // SAFETY: the symbol's type is the header's dp_plugin_entry_fn.
        let entry: EntryFn = unsafe {
            *lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()).map_err(|e| {
                load_err(
                    path,
                    format!(
                        "not a deepport plugin: it does not export `{ENTRY_SYMBOL}` ({e}); \
                         see plugin/include/deepport_plugin.h"
                    ),
                )
            })?
        };
        // SAFETY: calling the entry point as the header specifies.
        let vt = unsafe { entry(ABI_VERSION) };
        if vt.is_null() {
            return Err(load_err(
                path,
                format!(
                    "the plugin refused this host's ABI version {ABI_VERSION} \
                     (`{ENTRY_SYMBOL}` returned NULL): rebuild it against this deepport's \
                     deepport_plugin.h"
                ),
            ));
        }
        // SAFETY: non-NULL; the first two fields are read before trusting
        // the rest of the table.
        let (abi, size) = unsafe { ((*vt).abi_version, (*vt).struct_size) };
        if abi != ABI_VERSION {
            return Err(load_err(
                path,
                format!(
                    "ABI version mismatch: the plugin implements version {abi}, this host \
                     version {ABI_VERSION}; rebuild it against this deepport's deepport_plugin.h"
                ),
            ));
        }
        // The table must hold every field before the ops; op fields beyond
        // the plugin's struct_size (ops added to deepport after the plugin
        // was built) are NULL, i.e. NotSupported. The host reads its own
        // copy of the plugin's prefix, never past the plugin's table.
        let full = std::mem::size_of::<VtableV1>();
        let want = std::mem::offset_of!(VtableV1, act_quant);
        if (size as usize) < want {
            return Err(load_err(
                path,
                format!(
                    "its vtable is {size} bytes, this host's dp_plugin_v1 needs at least {want} \
                     (every field before the ops; the whole table is {full}): struct_size \
                     must be sizeof(dp_plugin_v1)"
                ),
            ));
        }
        let mut copy = Box::new(std::mem::MaybeUninit::<VtableV1>::zeroed());
        // SAFETY: the plugin's table has `size` readable bytes (header
        // contract); at most `full` are copied into the host's zeroed table,
        // in which all-zero fields are NULL pointers and `None`s.
        let copy = unsafe {
            std::ptr::copy_nonoverlapping(
                vt.cast::<u8>(),
                copy.as_mut_ptr().cast::<u8>(),
                (size as usize).min(full),
            );
            Box::from_raw(Box::into_raw(copy).cast::<VtableV1>())
        };
        let t = &*copy;
        let missing: Vec<&str> = [
            ("device_count", t.device_count.is_none()),
            ("create", t.create.is_none()),
            ("destroy", t.destroy.is_none()),
            ("alloc", t.alloc.is_none()),
            ("release", t.release.is_none()),
            ("upload", t.upload.is_none()),
            ("download", t.download.is_none()),
            ("synchronize", t.synchronize.is_none()),
        ]
        .into_iter()
        .filter_map(|(n, m)| m.then_some(n))
        .collect();
        if !missing.is_empty() {
            return Err(load_err(
                path,
                format!(
                    "required function(s) missing (NULL) in the vtable: {}",
                    missing.join(", ")
                ),
            ));
        }
        // SAFETY: the header requires a NUL-terminated string or NULL.
        let name = unsafe { read_str(t.name) }
            .ok_or_else(|| load_err(path, "its vtable has no name (NULL)"))?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(load_err(
                path,
                format!("its name {name:?} is not 1 to 64 characters of [a-z0-9_-]"),
            ));
        }
        // SAFETY: as for the name.
        let vendor = unsafe { read_str(t.vendor) }.unwrap_or_default();
        let ext = Ext::load(&lib, path)?;
        Ok(Plugin {
            path: path.to_path_buf(),
            name: Box::leak(name.into_boxed_str()),
            vendor,
            vt: copy,
            ext,
            _lib: lib,
        })
    }

    /// The ABI 1.1 extensions the plugin offers (`poll_error`,
    /// `set_stream`), by name; empty for a 1.0 plugin.
    pub fn extensions(&self) -> Vec<&'static str> {
        let e = &self.ext;
        [
            ("poll_error", e.poll_error.is_some()),
            ("set_stream", e.set_stream.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect()
    }

    /// The minor ABI version the plugin's extension table says it was
    /// built with (0: no extensions).
    pub fn abi_minor(&self) -> u32 {
        self.ext.minor
    }

    fn vt(&self) -> &VtableV1 {
        // Its function pointers point into `self._lib`, which lives as long.
        &self.vt
    }

    /// The backend name the plugin gives itself.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bug(&self, msg: impl std::fmt::Display) -> Error {
        Error::Device {
            backend: self.name.to_string(),
            msg: format!("plugin bug: {msg}"),
        }
    }

    /// The plugin's message for this thread's last failure.
    fn message(&self, ctx: *mut c_void) -> String {
        match self.vt().last_error {
            // SAFETY: header contract: a string or NULL, valid until the
            // next call on this thread.
            Some(f) => unsafe { read_str(f(ctx)) }.unwrap_or_else(|| "(no message)".into()),
            None => "(the plugin has no last_error)".into(),
        }
    }

    /// Maps a status of a memory or context function to a result.
    fn check(&self, ctx: *mut c_void, what: &str, s: Status) -> Result<()> {
        let name = self.name.to_string();
        match s {
            DP_OK => Ok(()),
            DP_OUT_OF_MEMORY => Err(Error::OutOfMemory {
                what: format!("{name}: {what}"),
                bytes: 0,
                reason: self.message(ctx),
            }),
            DP_NOT_SUPPORTED
            | DP_INVALID_ARGUMENT
            | DP_INDEX_OUT_OF_RANGE
            | DP_DEVICE_ERROR
            | DP_NON_FINITE => Err(Error::Device {
                backend: name,
                msg: format!("{what} failed ({}): {}", status_name(s), self.message(ctx)),
            }),
            other => Err(self.bug(format!(
                "{what} returned status {other}, which is not a dp_status (0 to 6)"
            ))),
        }
    }

    /// How many devices the plugin has.
    pub fn device_count(&self) -> Result<usize> {
        let f = self
            .vt()
            .device_count
            .ok_or_else(|| self.bug("no device_count"))?;
        // SAFETY: a checked, non-NULL function of the vtable.
        let n = unsafe { f() };
        usize::try_from(n).map_err(|_| self.bug(format!("device_count returned {n}")))
    }

    /// A backend instance on `device` (`None`: the plugin's default).
    pub fn create(self: &Arc<Self>, device: Option<usize>) -> Result<PluginBackend> {
        guard(self.name, || {
            let count = self.device_count()?;
            if let Some(d) = device {
                if d >= count {
                    return Err(deepport_core::registry::no_such_device(self.name, d, count));
                }
            } else if count == 0 {
                return Err(Error::Unavailable {
                    backend: self.name.to_string(),
                    reason: "the plugin reports no device".into(),
                });
            }
            let dev = match device {
                Some(d) => i32::try_from(d).map_err(|_| {
                    Error::Other(format!("{}: device index {d} is too large", self.name))
                })?,
                None => -1,
            };
            let f = self.vt().create.ok_or_else(|| self.bug("no create"))?;
            let mut raw: *mut c_void = std::ptr::null_mut();
            // SAFETY: header contract; `raw` is a valid out pointer.
            let s = unsafe { f(dev, &mut raw) };
            if s != DP_OK {
                return Err(match self.check(std::ptr::null_mut(), "create", s) {
                    Err(Error::Device { msg, .. }) => Error::Unavailable {
                        backend: self.name.to_string(),
                        reason: msg,
                    },
                    Err(e) => e,
                    Ok(()) => self.bug("create failed without a status"),
                });
            }
            if raw.is_null() {
                return Err(self.bug("create returned DP_OK and a NULL context"));
            }
            let ctx = Arc::new(Ctx {
                plugin: self.clone(),
                raw,
            });
            // SAFETY: ctx is live; the functions are optional and checked.
            let device_name = unsafe { self.vt().device_name.and_then(|f| read_str(f(raw))) };
            // SAFETY: as above.
            let driver = unsafe { self.vt().driver.and_then(|f| read_str(f(raw))) };
            Ok(PluginBackend {
                label: match device {
                    Some(d) => format!("{}:{d}", self.name),
                    None => self.name.to_string(),
                },
                info: DeviceInfo {
                    backend: self.name.to_string(),
                    device: device_name.unwrap_or_else(|| "(unnamed device)".into()),
                    driver: driver.unwrap_or_default(),
                    vendor: self.vendor.clone(),
                },
                ctx,
                id: InstanceId::fresh(),
            })
        })
    }
}

/// The ABI 1.1 extension functions of a plugin (`None`: absent).
#[derive(Default)]
struct Ext {
    minor: u32,
    poll_error: Option<unsafe extern "C" fn(ctx: *mut c_void) -> Status>,
    set_stream: Option<unsafe extern "C" fn(ctx: *mut c_void, stream: *mut c_void) -> Status>,
}

impl Ext {
    /// Reads the optional extension table: absent symbol or NULL table =
    /// no extensions; fields beyond the table's `struct_size` are absent.
    fn load(lib: &libloading::Library, path: &Path) -> Result<Ext> {
        // SAFETY: the symbol's type is the header's dp_plugin_ext_fn.
        let entry: ExtEntryFn = match unsafe { lib.get::<ExtEntryFn>(EXT_ENTRY_SYMBOL.as_bytes()) }
        {
            Ok(f) => *f,
            Err(_) => return Ok(Ext::default()),
        };
        // SAFETY: calling the entry point as the header specifies.
        let e = unsafe { entry(ABI_MINOR) };
        if e.is_null() {
            return Ok(Ext::default());
        }
        // SAFETY: non-NULL; the two leading u32 fields are read before
        // anything else, then only fields within `struct_size`.
        let (minor, size) = unsafe { ((*e).abi_minor, (*e).struct_size as usize) };
        if size < 8 {
            return Err(load_err(
                path,
                format!(
                    "its extension table (`{EXT_ENTRY_SYMBOL}`) is {size} bytes;                      struct_size must be sizeof(dp_plugin_ext), at least 8"
                ),
            ));
        }
        let within = |offset: usize| offset + std::mem::size_of::<usize>() <= size;
        let mut ext = Ext {
            minor,
            ..Ext::default()
        };
        if within(std::mem::offset_of!(ExtV1, poll_error)) {
            // SAFETY: the field lies within the plugin's table.
            ext.poll_error = unsafe { std::ptr::addr_of!((*e).poll_error).read() };
        }
        if within(std::mem::offset_of!(ExtV1, set_stream)) {
            // SAFETY: as above.
            ext.set_stream = unsafe { std::ptr::addr_of!((*e).set_stream).read() };
        }
        Ok(ext)
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        DP_OK => "DP_OK",
        DP_NOT_SUPPORTED => "DP_NOT_SUPPORTED",
        DP_INVALID_ARGUMENT => "DP_INVALID_ARGUMENT",
        DP_INDEX_OUT_OF_RANGE => "DP_INDEX_OUT_OF_RANGE",
        DP_OUT_OF_MEMORY => "DP_OUT_OF_MEMORY",
        DP_DEVICE_ERROR => "DP_DEVICE_ERROR",
        DP_NON_FINITE => "DP_NON_FINITE",
        _ => "garbage",
    }
}

/// One plugin context (one device); destroyed when the last tensor and
/// backend using it are gone.
struct Ctx {
    plugin: Arc<Plugin>,
    raw: *mut c_void,
}

// SAFETY: the header requires a context to be usable from any thread
// (a plugin that is not thread-safe locks inside).
unsafe impl Send for Ctx {}
// SAFETY: as above.
unsafe impl Sync for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(f) = self.plugin.vt().destroy {
            // SAFETY: the context is live and destroyed exactly once, after
            // every buffer (each buffer holds an Arc of it).
            unsafe { f(self.raw) };
        }
    }
}

/// Device memory of a plugin: one allocation.
struct Buf {
    ctx: Arc<Ctx>,
    handle: *mut c_void,
    nbytes: u64,
    label: String,
}

// SAFETY: the handle is an opaque token that the plugin accepts from any
// thread (header contract).
unsafe impl Send for Buf {}
// SAFETY: as above.
unsafe impl Sync for Buf {}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(f) = self.ctx.plugin.vt().release {
            // SAFETY: released exactly once; the context outlives it.
            unsafe { f(self.ctx.raw, self.handle) };
        }
    }
}

impl Storage for Buf {
    fn backend(&self) -> &str {
        &self.label
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A plugin's device as a [`Backend`].
pub struct PluginBackend {
    ctx: Arc<Ctx>,
    id: InstanceId,
    label: String,
    info: DeviceInfo,
}

impl PluginBackend {
    fn plugin(&self) -> &Plugin {
        &self.ctx.plugin
    }

    fn nbytes(&self, dtype: DType, shape: &[usize]) -> Result<u64> {
        shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| {
                Error::Other(format!(
                    "{}: a {dtype} tensor of shape {shape:?} is too large",
                    self.label
                ))
            })
    }

    fn buf<'t>(&self, t: &'t Tensor) -> Result<&'t Buf> {
        t.storage_for::<Buf>(self.id, &self.label)
    }

    /// Reports a deferred error of the plugin (`poll_error`, ABI 1.1), once.
    fn poll(&self) -> Result<()> {
        let p = self.plugin();
        let Some(f) = p.ext.poll_error else {
            return Ok(());
        };
        // SAFETY: live context.
        let s = unsafe { f(self.ctx.raw) };
        let msg = || p.message(self.ctx.raw);
        match s {
            DP_OK => Ok(()),
            DP_INDEX_OUT_OF_RANGE | DP_NON_FINITE | DP_INVALID_ARGUMENT => Err(Error::invalid(
                "(deferred)",
                "(plugin)",
                format!("{} reported by poll_error: {}", status_name(s), msg()),
            )),
            DP_OUT_OF_MEMORY => Err(Error::OutOfMemory {
                what: format!("{}: (deferred)", self.label),
                bytes: 0,
                reason: msg(),
            }),
            DP_NOT_SUPPORTED | DP_DEVICE_ERROR => Err(Error::Device {
                backend: self.label.clone(),
                msg: format!("deferred error ({}): {}", status_name(s), msg()),
            }),
            other => Err(p.bug(format!(
                "poll_error returned status {other}, which is not a dp_status (0 to 6)"
            ))),
        }
    }

    /// Orders this context's later work on the caller's `stream` (a
    /// CUstream, hipStream_t, … as the plugin documents; NULL: the plugin's
    /// own), through the plugin's `set_stream` (ABI 1.1). `NotSupported`
    /// when the plugin has none.
    ///
    /// # Safety
    /// `stream` is what the plugin documents it accepts, valid as long as
    /// the plugin may use it.
    pub unsafe fn set_stream(&self, stream: *mut c_void) -> Result<()> {
        let p = self.plugin();
        let Some(f) = p.ext.set_stream else {
            return Err(Error::not_supported(
                p.name,
                "set_stream",
                "the plugin has no set_stream (ABI 1.1 extension)",
            ));
        };
        guard("set_stream", || {
            // SAFETY: live context; `stream` by the caller's contract.
            let s = unsafe { f(self.ctx.raw, stream) };
            if s == DP_NOT_SUPPORTED {
                return Err(Error::not_supported(
                    p.name,
                    "set_stream",
                    p.message(self.ctx.raw),
                ));
            }
            p.check(self.ctx.raw, "set_stream", s)
        })
    }

    /// Maps an op's status to a result.
    fn op_status(&self, kind: OpKind, s: Status) -> Result<()> {
        let op = kind.name();
        let msg = || self.plugin().message(self.ctx.raw);
        match s {
            DP_OK => Ok(()),
            DP_NOT_SUPPORTED => Err(Error::not_supported(self.plugin().name, op, msg())),
            DP_INVALID_ARGUMENT => Err(Error::invalid(op, "(plugin)", msg())),
            DP_INDEX_OUT_OF_RANGE => Err(Error::invalid(
                op,
                "(plugin)",
                format!("index out of range: {}", msg()),
            )),
            DP_NON_FINITE => Err(Error::invalid(
                op,
                "(plugin)",
                format!("non-finite value: {}", msg()),
            )),
            DP_OUT_OF_MEMORY => Err(Error::OutOfMemory {
                what: format!("{}: {op}", self.label),
                bytes: 0,
                reason: msg(),
            }),
            DP_DEVICE_ERROR => Err(Error::Device {
                backend: self.label.clone(),
                msg: format!("{op}: {}", msg()),
            }),
            other => Err(self.plugin().bug(format!(
                "{op} returned status {other}, which is not a dp_status (0 to 6)"
            ))),
        }
    }

    /// Runs one op through its function pointer.
    fn run_op<A: OpArgs>(
        &self,
        kind: OpKind,
        args: &mut A,
        params: &[(&'static std::ffi::CStr, f64)],
    ) -> Result<()> {
        let Some(f) = self.plugin().vt().op(kind) else {
            return Err(Error::not_supported(
                self.plugin().name,
                kind.name(),
                "the plugin's vtable has no function for it (NULL)",
            ));
        };
        // Outputs first, mutably: this checks that none is shared with a
        // live view (the plugin is about to write it).
        let mut handles: Vec<(&'static str, *mut c_void)> = Vec::new();
        for (name, t) in args.outputs_mut() {
            let b = t.storage_mut_for::<Buf>(self.id, &self.label)?;
            handles.push((name, b.handle));
        }
        let tensors = args.tensors();
        let decl = A::DECL;
        let mut shapes: Vec<Vec<i64>> = Vec::with_capacity(decl.tensors.len());
        let mut descs: Vec<DpTensor> = Vec::with_capacity(decl.tensors.len());
        for d in decl.tensors {
            let Some(&(_, t)) = tensors.iter().find(|(n, _)| *n == d.name) else {
                shapes.push(Vec::new());
                continue;
            };
            if t.shape().len() > MAX_DIMS {
                return Err(Error::not_supported(
                    self.plugin().name,
                    kind.name(),
                    format!(
                        "`{}` has {} dims; plugins take at most {MAX_DIMS}",
                        d.name,
                        t.shape().len()
                    ),
                ));
            }
            shapes.push(t.shape().iter().map(|&x| x as i64).collect());
        }
        for (d, shape) in decl.tensors.iter().zip(&shapes) {
            let desc = match tensors.iter().find(|(n, _)| *n == d.name) {
                None => DpTensor {
                    handle: std::ptr::null_mut(),
                    offset_bytes: 0,
                    dtype: -1,
                    ndim: 0,
                    shape: std::ptr::null(),
                    strides: std::ptr::null(),
                },
                Some(&(_, t)) => {
                    let handle = match handles.iter().find(|(n, _)| *n == d.name) {
                        Some(&(_, h)) => h,
                        None => self.buf(t)?.handle,
                    };
                    DpTensor {
                        handle,
                        offset_bytes: t.offset_bytes() as u64,
                        dtype: dtype_code(t.dtype()),
                        ndim: shape.len() as u32,
                        shape: shape.as_ptr(),
                        strides: std::ptr::null(),
                    }
                }
            };
            descs.push(desc);
        }
        let cparams: Vec<DpParam> = params
            .iter()
            .map(|(n, v)| DpParam {
                name: n.as_ptr(),
                value: *v,
            })
            .collect();
        // SAFETY: descriptors point to live shapes and to buffers of this
        // context that the checked op arguments keep alive; the op's
        // shapes were validated by core.
        let s = unsafe {
            f(
                self.ctx.raw,
                descs.as_ptr(),
                descs.len() as u32,
                cparams.as_ptr(),
                cparams.len() as u32,
            )
        };
        self.op_status(kind, s)
    }
}

macro_rules! plugin_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            guard(stringify!($method), || {
                let p = params::PluginParams::params(op.args());
                self.run_op(OpKind::$kind, op.args_mut(), &p)
            })
        }
    )*};
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        self.plugin().name
    }
    fn instance(&self) -> InstanceId {
        self.id
    }
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        let vt = self.plugin().vt();
        if vt.op(op).is_none() {
            return Support::NotSupported(
                "the plugin's vtable has no function for it (NULL)".into(),
            );
        }
        let Some(f) = vt.supports else {
            return Support::Supported;
        };
        let codes: Vec<i32> = dtypes.iter().map(|&d| dtype_code(d)).collect();
        let Ok(name) = CString::new(op.name()) else {
            return Support::NotSupported("op name with NUL".into());
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: live context, NUL-terminated name, `codes` of the given length.
            unsafe {
                f(
                    self.ctx.raw,
                    name.as_ptr(),
                    codes.as_ptr(),
                    codes.len() as u32,
                )
            }
        }));
        match r {
            Ok(1) => Support::Supported,
            Ok(0) => Support::NotSupported(format!(
                "the plugin does not support these dtypes ({})",
                dtypes
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Ok(other) => Support::NotSupported(format!(
                "plugin bug: supports() returned {other}, not 0 or 1"
            )),
            Err(_) => Support::NotSupported("internal panic in supports".into()),
        }
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        guard("alloc", || {
            let nbytes = self.nbytes(dtype, shape)?;
            let p = self.plugin();
            let f = p.vt().alloc.ok_or_else(|| p.bug("no alloc"))?;
            let mut h: *mut c_void = std::ptr::null_mut();
            // SAFETY: live context, valid out pointer.
            let s = unsafe { f(self.ctx.raw, nbytes, &mut h) };
            p.check(self.ctx.raw, &format!("alloc of {nbytes} bytes"), s)?;
            if h.is_null() {
                return Err(p.bug("alloc returned DP_OK and a NULL handle"));
            }
            let buf = Buf {
                ctx: self.ctx.clone(),
                handle: h,
                nbytes,
                label: self.label.clone(),
            };
            Ok(Tensor::new(dtype, shape, Box::new(buf), self.id))
        })
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let mut t = self.alloc(host.dtype(), host.shape())?;
        self.write(&mut t, host)?;
        Ok(t)
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        guard("download", || {
            let b = self.buf(t)?;
            let n = t.nbytes() as u64;
            let off = t.offset_bytes() as u64;
            if off.checked_add(n).is_none_or(|e| e > b.nbytes) {
                return Err(Error::Other(format!(
                    "{}: {t:?} lies outside its allocation",
                    self.label
                )));
            }
            let mut data = vec![0u8; n as usize];
            let p = self.plugin();
            let f = p.vt().download.ok_or_else(|| p.bug("no download"))?;
            // SAFETY: `data` has `n` writable bytes; the range lies in the allocation.
            let s = unsafe { f(self.ctx.raw, b.handle, off, data.as_mut_ptr().cast(), n) };
            p.check(self.ctx.raw, "download", s)?;
            self.poll()?;
            HostTensor::from_bytes(t.dtype(), t.shape(), data)
        })
    }

    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        guard("write", || {
            if dst.dtype() != src.dtype() || dst.shape() != src.shape() {
                return Err(Error::Other(format!(
                    "{}: cannot write {src:?} into {dst:?}",
                    self.label
                )));
            }
            let b = dst.storage_mut_for::<Buf>(self.id, &self.label)?;
            let n = src.bytes().len() as u64;
            if n > b.nbytes {
                return Err(Error::Other(format!(
                    "{}: write beyond the allocation",
                    self.label
                )));
            }
            let p = self.plugin();
            let f = p.vt().upload.ok_or_else(|| p.bug("no upload"))?;
            // SAFETY: `src` has `n` readable bytes; the range lies in the allocation.
            let s = unsafe { f(self.ctx.raw, b.handle, 0, src.bytes().as_ptr().cast(), n) };
            p.check(self.ctx.raw, "upload", s)
        })
    }

    fn synchronize(&self) -> Result<()> {
        guard("synchronize", || {
            let p = self.plugin();
            let f = p.vt().synchronize.ok_or_else(|| p.bug("no synchronize"))?;
            // SAFETY: live context.
            let s = unsafe { f(self.ctx.raw) };
            p.check(self.ctx.raw, "synchronize", s)?;
            self.poll()
        })
    }

    deepport_core::for_each_local_op!(plugin_ops);
}

// ---- process-wide plugins and the registry ---------------------------------

/// Plugins loaded by this process, never unloaded.
static LOADED: Mutex<Vec<Arc<Plugin>>> = Mutex::new(Vec::new());

/// How many plugins one process can register.
pub const MAX_PLUGINS: usize = 8;

fn loaded() -> std::sync::MutexGuard<'static, Vec<Arc<Plugin>>> {
    LOADED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads a plugin once per process (the same path again returns the same
/// plugin) and keeps it loaded for the life of the process.
pub fn load(path: &Path) -> Result<Arc<Plugin>> {
    let canon = path.canonicalize().map_err(|e| load_err(path, e))?;
    let mut all = loaded();
    if let Some(p) = all.iter().find(|p| p.path == canon) {
        return Ok(p.clone());
    }
    if all.len() >= MAX_PLUGINS {
        return Err(load_err(
            path,
            format!("at most {MAX_PLUGINS} plugins per process"),
        ));
    }
    let p = Arc::new(Plugin::load(&canon)?);
    if let Some(other) = all.iter().find(|o| o.name == p.name) {
        return Err(load_err(
            path,
            format!(
                "its name `{}` is taken by the plugin {}",
                p.name,
                other.path.display()
            ),
        ));
    }
    all.push(p.clone());
    Ok(p)
}

fn by_index(i: usize) -> Result<Arc<Plugin>> {
    loaded()
        .get(i)
        .cloned()
        .ok_or_else(|| Error::Other(format!("internal: no plugin #{i}")))
}

macro_rules! slots {
    ($($i:literal),*) => {
        const FACTORIES: [(deepport_core::registry::Factory, deepport_core::registry::DeviceLister); MAX_PLUGINS] = [$(
            (
                |d| Ok(Box::new(by_index($i)?.create(d)?) as Box<dyn Backend>),
                || {
                    let p = by_index($i)?;
                    (0..p.device_count()?).map(|d| Ok(p.create(Some(d))?.info())).collect()
                },
            ),
        )*];
    };
}
slots!(0, 1, 2, 3, 4, 5, 6, 7);

/// Registers a loaded plugin under its own name. Refuses a name the
/// registry already has (a plugin may not replace `cpu-ref`, the judge).
pub fn register(reg: &mut Registry, plugin: &Arc<Plugin>) -> Result<()> {
    if reg.names().contains(&plugin.name) {
        return Err(load_err(
            &plugin.path,
            format!(
                "its name `{}` is the name of a backend of this build; a plugin must have its own",
                plugin.name
            ),
        ));
    }
    let i = loaded()
        .iter()
        .position(|p| Arc::ptr_eq(p, plugin))
        .ok_or_else(|| Error::Other("internal: register a plugin from `load`".into()))?;
    let desc: &'static str =
        Box::leak(format!("plugin {} ({})", plugin.path.display(), plugin.vendor).into_boxed_str());
    let (factory, devices) = FACTORIES[i];
    reg.register(plugin.name, desc, factory, devices);
    Ok(())
}

/// The plugin paths in `$DEEPPORT_PLUGIN`.
pub fn env_paths() -> Vec<PathBuf> {
    std::env::var_os(PLUGIN_ENV)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Loads every plugin of `paths` and registers it; returns their names.
pub fn load_and_register(reg: &mut Registry, paths: &[PathBuf]) -> Result<Vec<&'static str>> {
    let mut names = Vec::new();
    for p in paths {
        let plugin = load(p)?;
        if !names.contains(&plugin.name) {
            register(reg, &plugin)?;
            names.push(plugin.name);
        }
    }
    Ok(names)
}

/// Registers every plugin named in `$DEEPPORT_PLUGIN` (the hook of the
/// `deepport` program's registry). A plugin that fails to load is reported
/// on stderr and left out: `deepport --plugin` checks them before.
pub fn register_from_env(reg: &mut Registry) {
    let paths = env_paths();
    if paths.is_empty() {
        return;
    }
    if let Err(e) = load_and_register(reg, &paths) {
        eprintln!("warning: {e}");
    }
}

/// Checks the plugins of `--plugin PATH` against a registry of the
/// built-in backends and returns their names (for messages and defaults).
pub fn check_plugins(builtin: &Registry, paths: &[PathBuf]) -> Result<Vec<&'static str>> {
    let mut reg = builtin.clone();
    load_and_register(&mut reg, paths)
}

#[cfg(test)]
mod tests;
