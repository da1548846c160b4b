//! The HIP runtime, loaded at run time through a binding of our own
//! (`libloading`): only the calls and the struct prefix the backend uses
//! are declared. Every call returns a `Result`; a failure is
//! `Error::Device` naming the call and HIP's error string.
//!
//! * Library search: `$DEEPPORT_HIP_LIB` (a file; when set, nothing else is
//!   tried), then `libamdhip64.so`, `libamdhip64.so.6`, `libamdhip64.so.5`
//!   through the dynamic loader (`LD_LIBRARY_PATH` works), then
//!   `/opt/rocm/lib/`. Loaded once per process.
//! * ROCm 5 and 6 differ in `hipDeviceProp_t` (ROCm 6 renamed the struct
//!   to `hipDeviceProp_tR0600`, reordered it and exports
//!   `hipGetDevicePropertiesR0600`). The description therefore comes from
//!   `hipDeviceGetAttribute` (stable enum values in 5.x and 6.x) and
//!   `hipDeviceGetName`; only the architecture name (`gcnArchName`, a
//!   string no attribute returns) is read from the properties struct. We
//!   do not declare the struct: hipGetDeviceProperties writes into a
//!   zeroed buffer of [`PROPS_BUFFER`] bytes (more than either layout, 792
//!   bytes in ROCm 5.2, 1472 in R0600), and [`arch_name_in`] reads
//!   `gcnArchName` at its offset (396 in ROCm 5, 1160 in R0600, measured
//!   with `offsetof`) or, failing that on ROCm 6, as the first
//!   NUL-terminated `gfx…` string after `name[256]`. A value not starting with `gfx` is an error;
//!   `$DEEPPORT_HIP_ARCH` overrides the architecture in every case.
#![allow(unsafe_code)]

use deepport_core::{Error, Result};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The backend's registry name.
pub const BACKEND: &str = "rocm";

/// An `Error::Device` of this backend.
pub fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

/// Bytes handed to `hipGetDeviceProperties` (larger than any layout).
pub const PROPS_BUFFER: usize = 8192;
/// `offsetof(hipDeviceProp_t, gcnArchName)` in ROCm 5.x (R0000 layout).
const GCN_ARCH_NAME_R0000: usize = 396;
/// `offsetof(hipDeviceProp_tR0600, gcnArchName)` (ROCm 6.x and 7.x: the
/// struct keeps reserved space for new fields, so the offset holds; measured
/// with `offsetof` on the layout of the ROCm 7 header).
const GCN_ARCH_NAME_R0600: usize = 1160;
/// `name[256]` opens the struct in both layouts.
const NAME_LEN: usize = 256;

// hipDeviceAttribute_t values: measured with a C compiler against ROCm
// 5.2's header, and counted in the ROCm 7 header (`hipDeviceAttributeUnused1`
// and `Unused2` keep the places of removed attributes, so the values hold
// across 5.x, 6.x and 7.x).
const ATTR_CC_MAJOR: c_int = 23;
const ATTR_CC_MINOR: c_int = 61;
const ATTR_CUS: c_int = 63;
const ATTR_SMEM_PER_BLOCK: c_int = 74;
const ATTR_WARP_SIZE: c_int = 87;

/// The names tried for the HIP runtime, in order.
pub fn library_names() -> Vec<String> {
    if let Some(p) = std::env::var_os("DEEPPORT_HIP_LIB").filter(|v| !v.is_empty()) {
        return vec![p.to_string_lossy().into_owned()];
    }
    let mut v: Vec<String> = ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push("/opt/rocm/lib/libamdhip64.so".into());
    v
}

/// Opens the first of `names` that loads, or says why none did.
pub(crate) fn open_first(
    names: &[String],
) -> std::result::Result<(PathBuf, libloading::Library), String> {
    let mut why = Vec::new();
    for n in names {
        // SAFETY: loading a shared library runs its initialisers; the HIP
        // and hiprtc libraries are loaded for their C API only, as their
        // vendor intends.
        match unsafe { libloading::Library::new(n) } {
            Ok(lib) => return Ok((PathBuf::from(n), lib)),
            Err(e) => why.push(format!("{n}: {e}")),
        }
    }
    Err(why.join("; "))
}

type E = c_int;
type FnInit = unsafe extern "C" fn(c_uint) -> E;
type FnIntOut = unsafe extern "C" fn(*mut c_int) -> E;
type FnAttr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> E;
type FnName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> E;
type FnProps = unsafe extern "C" fn(*mut c_void, c_int) -> E;
type FnSetDevice = unsafe extern "C" fn(c_int) -> E;
type FnMalloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> E;
type FnFree = unsafe extern "C" fn(*mut c_void) -> E;
type FnMemset = unsafe extern "C" fn(*mut c_void, c_int, usize) -> E;
type FnHtoD = unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> E;
type FnDtoH = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> E;
type FnStreamCreate = unsafe extern "C" fn(*mut *mut c_void) -> E;
type FnStream = unsafe extern "C" fn(*mut c_void) -> E;
type FnModuleLoadData = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> E;
type FnModuleUnload = unsafe extern "C" fn(*mut c_void) -> E;
type FnGetFunction = unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> E;
type FnLaunch = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> E;
type FnErrorString = unsafe extern "C" fn(E) -> *const c_char;

/// The HIP runtime's entry points, copied out of the library (kept loaded).
pub struct Hip {
    pub path: PathBuf,
    init: FnInit,
    device_count: FnIntOut,
    attr: FnAttr,
    name: FnName,
    props: FnProps,
    /// Whether `props` is `hipGetDevicePropertiesR0600` (ROCm 6 layout).
    props_r0600: bool,
    driver_version: FnIntOut,
    runtime_version: FnIntOut,
    set_device: FnSetDevice,
    malloc: FnMalloc,
    free: FnFree,
    memset: FnMemset,
    htod: FnHtoD,
    dtoh: FnDtoH,
    stream_create: FnStreamCreate,
    stream_sync: FnStream,
    stream_destroy: FnStream,
    module_load: FnModuleLoadData,
    module_unload: FnModuleUnload,
    get_function: FnGetFunction,
    launch: FnLaunch,
    error_string: FnErrorString,
    _lib: libloading::Library,
}

impl std::fmt::Debug for Hip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hip({})", self.path.display())
    }
}

impl Hip {
    fn open(path: PathBuf, lib: libloading::Library) -> std::result::Result<Hip, String> {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol is HIP's C function of that name, whose
                // signature (hip_runtime_api.h) is `$ty`; the pointer is
                // used only while `lib` is alive (moved into the struct).
                let s: libloading::Symbol<$ty> = unsafe { lib.get($name) }.map_err(|e| {
                    format!(
                        "{}: no symbol {}: {e}",
                        path.display(),
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?;
                *s
            }};
        }
        // ROCm 6 exports the R0600 layout under its own name; ROCm 5 only
        // `hipGetDeviceProperties` (R0000 layout).
        // SAFETY: as in `sym!` (same signature for both names).
        let r0600: Option<FnProps> =
            unsafe { lib.get::<FnProps>(b"hipGetDevicePropertiesR0600\0") }
                .ok()
                .map(|s| *s);
        let (props, props_r0600) = match r0600 {
            Some(f) => (f, true),
            None => (sym!(b"hipGetDeviceProperties\0", FnProps), false),
        };
        Ok(Hip {
            init: sym!(b"hipInit\0", FnInit),
            device_count: sym!(b"hipGetDeviceCount\0", FnIntOut),
            attr: sym!(b"hipDeviceGetAttribute\0", FnAttr),
            name: sym!(b"hipDeviceGetName\0", FnName),
            props,
            props_r0600,
            driver_version: sym!(b"hipDriverGetVersion\0", FnIntOut),
            runtime_version: sym!(b"hipRuntimeGetVersion\0", FnIntOut),
            set_device: sym!(b"hipSetDevice\0", FnSetDevice),
            malloc: sym!(b"hipMalloc\0", FnMalloc),
            free: sym!(b"hipFree\0", FnFree),
            memset: sym!(b"hipMemset\0", FnMemset),
            htod: sym!(b"hipMemcpyHtoD\0", FnHtoD),
            dtoh: sym!(b"hipMemcpyDtoH\0", FnDtoH),
            stream_create: sym!(b"hipStreamCreate\0", FnStreamCreate),
            stream_sync: sym!(b"hipStreamSynchronize\0", FnStream),
            stream_destroy: sym!(b"hipStreamDestroy\0", FnStream),
            module_load: sym!(b"hipModuleLoadData\0", FnModuleLoadData),
            module_unload: sym!(b"hipModuleUnload\0", FnModuleUnload),
            get_function: sym!(b"hipModuleGetFunction\0", FnGetFunction),
            launch: sym!(b"hipModuleLaunchKernel\0", FnLaunch),
            error_string: sym!(b"hipGetErrorString\0", FnErrorString),
            path,
            _lib: lib,
        })
    }

    fn error_string(&self, rc: E) -> String {
        // SAFETY: hipGetErrorString accepts any value and returns a static
        // NUL-terminated string (or null).
        let p = unsafe { (self.error_string)(rc) };
        if p.is_null() {
            return format!("HIP error {rc}");
        }
        // SAFETY: non-null, NUL-terminated and static (HIP's contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `Ok` for hipSuccess, else `Error::Device` naming `call`.
    fn check(&self, rc: E, call: &str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(dev_err(format!(
                "{call} failed: {} ({rc})",
                self.error_string(rc)
            )))
        }
    }

    fn int_out(&self, f: FnIntOut, call: &str) -> Result<i32> {
        let mut v = 0;
        // SAFETY: `v` is a valid out-pointer for the one int `f` writes.
        self.check(unsafe { f(&mut v) }, call)?;
        Ok(v)
    }

    /// `hipInit(0)`.
    pub fn init(&self) -> Result<()> {
        // SAFETY: plain value argument.
        self.check(unsafe { (self.init)(0) }, "hipInit")
    }

    pub fn device_count(&self) -> Result<usize> {
        Ok(self.int_out(self.device_count, "hipGetDeviceCount")?.max(0) as usize)
    }

    /// `hipRuntimeGetVersion` (e.g. 50221153 for ROCm 5.2; callable
    /// before `hipInit` and without a device).
    pub fn runtime_version(&self) -> Result<i32> {
        self.int_out(self.runtime_version, "hipRuntimeGetVersion")
    }

    /// `(driver, runtime)` versions (`hipDriverGetVersion`, `hipRuntimeGetVersion`).
    pub fn versions(&self) -> Result<(i32, i32)> {
        Ok((
            self.int_out(self.driver_version, "hipDriverGetVersion")?,
            self.int_out(self.runtime_version, "hipRuntimeGetVersion")?,
        ))
    }

    fn attribute(&self, attr: c_int, what: &str, device: usize) -> Result<i32> {
        let mut v = 0;
        // SAFETY: valid out-pointer; attr and device are plain values
        // (HIP rejects unknown ones with an error).
        let rc = unsafe { (self.attr)(&mut v, attr, device as c_int) };
        self.check(
            rc,
            &format!("hipDeviceGetAttribute({what}, device {device})"),
        )?;
        Ok(v)
    }

    /// Describes device `device`.
    pub fn describe(&self, device: usize) -> Result<DeviceDesc> {
        let mut name = vec![0u8; NAME_LEN];
        // SAFETY: `name` has NAME_LEN bytes, the length passed.
        let rc =
            unsafe { (self.name)(name.as_mut_ptr().cast(), NAME_LEN as c_int, device as c_int) };
        self.check(rc, &format!("hipDeviceGetName(device {device})"))?;
        let gfx = match std::env::var("DEEPPORT_HIP_ARCH") {
            Ok(a) if !a.is_empty() => a,
            _ => {
                let mut props = vec![0u8; PROPS_BUFFER];
                // SAFETY: `props` is a zeroed buffer larger than either
                // layout of hipDeviceProp_t (792 bytes in ROCm 5.2,
                // 1472 in R0600), so the call writes inside it.
                let rc = unsafe { (self.props)(props.as_mut_ptr().cast(), device as c_int) };
                self.check(rc, &format!("hipGetDeviceProperties(device {device})"))?;
                arch_name_in(&props, self.props_r0600).ok_or_else(|| {
                    dev_err(format!(
                        "device {device}: no gfx architecture name in hipGetDeviceProperties \
                         (set DEEPPORT_HIP_ARCH, e.g. gfx90a)"
                    ))
                })?
            }
        };
        Ok(DeviceDesc {
            name: c_string(&name),
            gfx,
            compute_units: self.attribute(ATTR_CUS, "MultiprocessorCount", device)? as u32,
            warp_size: self.attribute(ATTR_WARP_SIZE, "WarpSize", device)? as u32,
            smem_per_block: self.attribute(
                ATTR_SMEM_PER_BLOCK,
                "MaxSharedMemoryPerBlock",
                device,
            )? as u32,
            cc: (
                self.attribute(ATTR_CC_MAJOR, "ComputeCapabilityMajor", device)?,
                self.attribute(ATTR_CC_MINOR, "ComputeCapabilityMinor", device)?,
            ),
        })
    }

    pub fn set_device(&self, device: usize) -> Result<()> {
        // SAFETY: plain value argument.
        self.check(
            unsafe { (self.set_device)(device as c_int) },
            "hipSetDevice",
        )
    }

    /// `hipMalloc(bytes)`: a device pointer.
    pub fn malloc(&self, bytes: usize) -> Result<u64> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.check(unsafe { (self.malloc)(&mut p, bytes.max(1)) }, "hipMalloc")?;
        Ok(p as u64)
    }

    /// `hipFree(ptr)`; `ptr` must come from [`Hip::malloc`] and not be used
    /// afterwards (HIP rejects unknown pointers with an error).
    pub fn free(&self, ptr: u64) -> Result<()> {
        // SAFETY: HIP validates the pointer; the caller owns it.
        self.check(unsafe { (self.free)(ptr as *mut c_void) }, "hipFree")
    }

    /// `hipMemset(ptr, value, bytes)` on the default stream (ordered after
    /// the work queued there).
    ///
    /// # Safety
    /// `ptr` must be a device allocation of at least `bytes` bytes.
    pub unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: per the caller's contract; value and size are plain values.
        let rc = unsafe { (self.memset)(ptr as *mut c_void, c_int::from(value), bytes) };
        self.check(rc, "hipMemset")
    }

    /// Copies `src` to device memory at `dst` (synchronous).
    ///
    /// # Safety
    /// `dst` must be a device allocation of at least `src.len()` bytes.
    pub unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `src` is readable for its length; `dst` per the contract.
        let rc = unsafe { (self.htod)(dst as *mut c_void, src.as_ptr().cast(), src.len()) };
        self.check(rc, "hipMemcpyHtoD")
    }

    /// Copies `dst.len()` bytes of device memory at `src` into `dst`.
    ///
    /// # Safety
    /// `src` must be a device allocation of at least `dst.len()` bytes.
    pub unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // SAFETY: `dst` is writable for its length; `src` per the contract.
        let rc = unsafe { (self.dtoh)(dst.as_mut_ptr().cast(), src as *mut c_void, dst.len()) };
        self.check(rc, "hipMemcpyDtoH")
    }

    pub fn stream_create(&self) -> Result<Stream> {
        let mut s = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        self.check(unsafe { (self.stream_create)(&mut s) }, "hipStreamCreate")?;
        Ok(Stream(s))
    }

    /// Waits for `stream` (`None`: the default stream).
    pub fn stream_synchronize(&self, stream: Option<&Stream>) -> Result<()> {
        let s = stream.map_or(std::ptr::null_mut(), |s| s.0);
        // SAFETY: null or a stream this runtime created (a `Stream` is
        // only made by `stream_create` and not yet destroyed).
        self.check(unsafe { (self.stream_sync)(s) }, "hipStreamSynchronize")
    }

    pub fn stream_destroy(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live stream of this runtime, consumed here.
        self.check(
            unsafe { (self.stream_destroy)(stream.0) },
            "hipStreamDestroy",
        )
    }

    /// Loads a code object (hiprtc's output) as a module.
    pub fn module_load(&self, code: &[u8]) -> Result<Module> {
        if code.len() < 4 || &code[..4] != b"\x7fELF" {
            return Err(dev_err("hipModuleLoadData: the code object is not an ELF"));
        }
        let mut m = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `code` is a whole ELF code object
        // (HIP reads its size from the headers) that outlives the call.
        let rc = unsafe { (self.module_load)(&mut m, code.as_ptr().cast()) };
        self.check(rc, "hipModuleLoadData")?;
        Ok(Module(m))
    }

    pub fn module_unload(&self, module: Module) -> Result<()> {
        // SAFETY: a live module of this runtime, consumed here.
        self.check(unsafe { (self.module_unload)(module.0) }, "hipModuleUnload")
    }

    /// The entry point `name` of `module` (valid while the module is loaded).
    pub fn get_function(&self, module: &Module, name: &str) -> Result<Function> {
        let c = CString::new(name).map_err(|_| dev_err("a kernel name holds a NUL byte"))?;
        let mut f = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a live module; `c` is NUL-terminated
        // and outlives the call.
        let rc = unsafe { (self.get_function)(&mut f, module.0, c.as_ptr()) };
        self.check(rc, &format!("hipModuleGetFunction({name})"))?;
        Ok(Function(f))
    }

    /// Launches `function` with `params` (one pointer per kernel argument,
    /// each to the argument's value).
    ///
    /// # Safety
    /// `params` must match the kernel's signature, every pointer argument
    /// must be valid device memory for what the kernel accesses, the
    /// values pointed to must live until the call returns, and the
    /// function's module must still be loaded.
    pub unsafe fn launch(
        &self,
        function: &Function,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        stream: Option<&Stream>,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let stream = stream.map_or(std::ptr::null_mut(), |s| s.0);
        // SAFETY: per the caller's contract; `extra` is null.
        let rc = unsafe {
            (self.launch)(
                function.0,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.check(rc, "hipModuleLaunchKernel")
    }
}

/// A HIP stream (`hipStream_t`), made only by [`Hip::stream_create`].
#[derive(Debug)]
pub struct Stream(pub(crate) *mut c_void);
/// A loaded module (`hipModule_t`), made only by [`Hip::module_load`].
#[derive(Debug)]
pub struct Module(pub(crate) *mut c_void);
/// A kernel of a module (`hipFunction_t`), made only by [`Hip::get_function`].
#[derive(Debug)]
pub struct Function(pub(crate) *mut c_void);

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// `gcnArchName` in a `hipGetDeviceProperties` buffer: at its ROCm 5
/// offset, or (R0600 layout) the first NUL-terminated string after
/// `name[256]` that starts with `gfx`. `None` when it is not a `gfx…` name.
pub fn arch_name_in(props: &[u8], r0600: bool) -> Option<String> {
    let is_arch = |s: &str| {
        s.strip_prefix("gfx").is_some_and(|r| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '+' | '-'))
        })
    };
    let at = if r0600 {
        GCN_ARCH_NAME_R0600
    } else {
        GCN_ARCH_NAME_R0000
    };
    let s = c_string(props.get(at..)?);
    if is_arch(&s) {
        return Some(s);
    }
    if !r0600 {
        return None;
    }
    // A later R0600 revision that moved the field: the first `gfx…` string
    // after `name`.
    let body = props.get(NAME_LEN..)?;
    (0..body.len().saturating_sub(4))
        .filter(|&i| &body[i..i + 3] == b"gfx" && (i == 0 || body[i - 1] == 0))
        .map(|i| c_string(&body[i..]))
        .find(|s| is_arch(s))
}

/// What [`Hip::describe`] reports of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    pub name: String,
    /// The architecture hiprtc compiles for (`gfx90a`, `gfx942:sramecc+:xnack-`, …).
    pub gfx: String,
    pub compute_units: u32,
    pub warp_size: u32,
    pub smem_per_block: u32,
    /// HIP's compute-capability emulation (major, minor).
    pub cc: (i32, i32),
}

impl DeviceDesc {
    /// The architecture without target features (`gfx90a`), what hiprtc's
    /// `--offload-arch` gets.
    pub fn gfx_base(&self) -> &str {
        self.gfx.split(':').next().unwrap_or(&self.gfx)
    }
}

/// Loads the HIP runtime (once), or why it cannot be loaded.
pub fn library() -> std::result::Result<&'static Hip, String> {
    static LIB: OnceLock<std::result::Result<Hip, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let (path, lib) =
            open_first(&library_names()).map_err(|e| format!("HIP runtime not found: {e}"))?;
        Hip::open(path, lib)
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// Whether HIP can run here: `Ok(description)` (library, versions, device
/// count) or `Err(reason)`: library missing, `hipInit` failed, no device.
pub fn probe() -> std::result::Result<String, String> {
    let hip = library()?;
    hip.init()
        .map_err(|e| format!("{} loaded, but {}", hip.path.display(), strip(&e)))?;
    let n = hip
        .device_count()
        .map_err(|e| format!("{}: {}", hip.path.display(), strip(&e)))?;
    if n == 0 {
        return Err(format!("{}: no AMD GPU (0 devices)", hip.path.display()));
    }
    let (drv, rt) = hip.versions().unwrap_or((0, 0));
    Ok(format!(
        "HIP runtime {rt} (driver {drv}, {}), {n} device(s)",
        hip.path.display()
    ))
}

fn strip(e: &Error) -> String {
    match e {
        Error::Device { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_name_is_found_in_both_layouts() {
        let mut p = vec![0u8; PROPS_BUFFER];
        p[..6].copy_from_slice(b"MI250X");
        p[GCN_ARCH_NAME_R0000..GCN_ARCH_NAME_R0000 + 21].copy_from_slice(b"gfx90a:sramecc+:xnack");
        assert_eq!(
            arch_name_in(&p, false).as_deref(),
            Some("gfx90a:sramecc+:xnack")
        );
        let mut q = vec![0u8; PROPS_BUFFER];
        q[GCN_ARCH_NAME_R0600..GCN_ARCH_NAME_R0600 + 6].copy_from_slice(b"gfx942");
        assert_eq!(arch_name_in(&q, true).as_deref(), Some("gfx942"));
        let mut m = vec![0u8; PROPS_BUFFER];
        m[1000..1006].copy_from_slice(b"gfx950");
        assert_eq!(arch_name_in(&m, true).as_deref(), Some("gfx950"));
        // Not a gfx name at the offset: None, never garbage.
        assert_eq!(arch_name_in(&q, false), None);
        assert_eq!(arch_name_in(&vec![0u8; PROPS_BUFFER], true), None);
        let mut r = vec![0u8; PROPS_BUFFER];
        r[500..503].copy_from_slice(b"gfx");
        assert_eq!(arch_name_in(&r, true), None);
    }

    #[test]
    fn env_override_is_the_only_library_tried() {
        // The names list without the override starts with the plain soname.
        if std::env::var_os("DEEPPORT_HIP_LIB").is_none() {
            let n = library_names();
            assert_eq!(n[0], "libamdhip64.so");
            assert!(n.contains(&"libamdhip64.so.5".to_string()));
        }
    }
}
