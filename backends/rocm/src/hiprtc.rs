//! hiprtc, loaded at run time: compiles the portable kernel sources (the
//! CUDA backend's `.cu` files, `deepport_cuda::sources()`) to an AMD code
//! object for one `gfx` architecture.
//!
//! * Library search ([`probe`] lists what it tried): `$DEEPPORT_HIPRTC_LIB`
//!   (a file; when set, nothing else is tried), then `libhiprtc.so`,
//!   `libhiprtc.so.6`, `libhiprtc.so.5` (ROCm 6 ships hiprtc as a library
//!   of its own), then the HIP runtime itself ([`crate::hip::library_names`]):
//!   ROCm 5.x keeps hiprtc inside `libamdhip64.so.5`. Loaded once.
//! * Headers: `deepport_cuda::nvrtc::HEADERS` (every `kernels/*.cuh`) and
//!   `crate::mfma::HEADERS` (this crate's `kernels/*.cuh`),
//!   handed to hiprtc in memory, so no ROCm header is needed.
//! * Options: `--offload-arch=<gfx> -std=c++17 -DDP_HIP -O3` (`DP_HIP`:
//!   `port.cuh` selects wavefront 64 and `__shfl_xor`), plus
//!   `-mwavefrontsize64` on RDNA (gfx10xx and later default to wave32).
#![allow(unsafe_code)]

use crate::hip::{dev_err, open_first, BACKEND};
use deepport_core::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The architectures the tests and tools compile for (CDNA 2 and CDNA 1:
/// what ROCm 5.2's hiprtc knows; gfx942 needs ROCm 6).
pub const KNOWN_ARCHS: &[&str] = &["gfx90a", "gfx908", "gfx942"];

/// The architectures hiprtc is allowed to compile for when the ROCm
/// release is older than 6.0. ROCm 5.2's hiprtc aborts the whole process
/// (`munmap_chunk(): invalid pointer`, SIGABRT) instead of returning an
/// error when asked for a target its LLVM does not know (measured:
/// gfx940, gfx941, gfx942, gfx950, gfx1100, gfx1200), so [`compile`]
/// refuses anything else up front. Measured on ROCm 5.2 (gfx906, gfx908,
/// gfx90a, gfx1030 compile); later 5.x releases know more targets:
/// `DEEPPORT_HIPRTC_ANY_ARCH=1` lifts the check.
pub const ROCM5_ARCHS: &[&str] = &[
    "gfx900", "gfx906", "gfx908", "gfx90a", "gfx90c", "gfx1010", "gfx1011", "gfx1012", "gfx1030",
    "gfx1031", "gfx1032", "gfx1034", "gfx1035",
];

/// Whether `gfx` may be compiled by a hiprtc of ROCm `version`
/// (`hipRuntimeGetVersion`, `None` when unknown).
pub fn arch_allowed(gfx: &str, version: Option<i32>) -> std::result::Result<(), String> {
    let base = gfx.split(':').next().unwrap_or(gfx);
    match version {
        Some(v) if v < 60_000_000 && !ROCM5_ARCHS.contains(&base) => {
            if std::env::var("DEEPPORT_HIPRTC_ANY_ARCH").is_ok_and(|v| v == "1") {
                return Ok(());
            }
            Err(format!(
                "ROCm {}.{}'s hiprtc cannot compile for {base} (it aborts the process on \
                 targets it does not know); known to work: {} (set \
                 DEEPPORT_HIPRTC_ANY_ARCH=1 to try anyway)",
                v / 10_000_000,
                (v / 100_000) % 100,
                ROCM5_ARCHS.join(", ")
            ))
        }
        _ => Ok(()),
    }
}

/// The output of one compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The code object (an ELF for `amdgcn-amd-amdhsa`, as hiprtc returns
    /// it), for `hipModuleLoadData`.
    pub code: Vec<u8>,
    /// hiprtc's log (warnings), empty when it had nothing to say.
    pub log: String,
}

/// A `gfx` architecture name is `gfx` followed by hex digits and optional
/// target features (`gfx90a:sramecc+:xnack-`).
fn check_arch(gfx: &str) -> Result<()> {
    let base = gfx.split(':').next().unwrap_or("");
    let digits = base.strip_prefix("gfx").unwrap_or("");
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_hexdigit())
        || gfx
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '+' | '-')))
    {
        return Err(Error::Invalid {
            op: "hiprtc",
            arg: "arch",
            msg: format!("`{gfx}` is not an AMD GPU architecture (expected e.g. gfx90a, gfx942)"),
        });
    }
    Ok(())
}

/// Whether `gfx` is an RDNA architecture (gfx10xx, gfx11xx, gfx12xx),
/// whose compiler defaults to wavefront 32.
pub fn is_rdna(gfx: &str) -> bool {
    let base = gfx.split(':').next().unwrap_or(gfx);
    base.strip_prefix("gfx")
        .is_some_and(|d| d.len() == 4 && d.starts_with('1'))
}

/// The options hiprtc gets for `gfx`. `port.cuh` under `DP_HIP` assumes
/// wavefront 64 (`DP_WARP`): CDNA (gfx9xx) runs only that; RDNA defaults
/// to wavefront 32, so it gets `-mwavefrontsize64` (checked: without it
/// ROCm 5.2 emits `.wavefront_size: 32` kernels for gfx1030).
pub fn options(gfx: &str) -> Vec<String> {
    let mut o = vec![
        format!("--offload-arch={gfx}"),
        "-std=c++17".to_string(),
        "-DDP_HIP".to_string(),
        "-O3".to_string(),
    ];
    if is_rdna(gfx) {
        o.push("-mwavefrontsize64".to_string());
    }
    o
}

/// Loads hiprtc (once) and reports its version and file, or why it cannot
/// be loaded, naming every place tried.
pub fn probe() -> std::result::Result<String, String> {
    let lib = library()?;
    let rocm = lib.rocm_version.map_or("ROCm ?".to_string(), |v| {
        format!(
            "ROCm {}.{}.{}",
            v / 10_000_000,
            (v / 100_000) % 100,
            v % 100_000
        )
    });
    Ok(format!(
        "hiprtc of {rocm} (hiprtcVersion {}.{}, {})",
        lib.version.0,
        lib.version.1,
        lib.path.display()
    ))
}

/// Compiles one source (`name` is the program name, `text` the source)
/// for `gfx`, with the CUDA backend's headers in memory. hiprtc missing is
/// `Error::Unavailable`; a compile error is `Error::Device` with the
/// source name, the architecture and hiprtc's log.
pub fn compile(name: &str, text: &str, gfx: &str) -> Result<Compiled> {
    check_arch(gfx)?;
    let lib = library().map_err(|reason| Error::Unavailable {
        backend: BACKEND.into(),
        reason,
    })?;
    arch_allowed(gfx, lib.rocm_version).map_err(|msg| Error::NotSupported {
        backend: BACKEND.into(),
        op: format!("compiling {name}"),
        reason: msg,
    })?;
    let cstr = |what: &str, s: &str| {
        CString::new(s).map_err(|_| dev_err(format!("{name}: {what} holds a NUL byte")))
    };
    let c_text = cstr("the source", text)?;
    let c_name = cstr("the name", name)?;
    let headers = deepport_cuda::nvrtc::HEADERS
        .iter()
        .chain(crate::mfma::HEADERS);
    let mut header_texts = Vec::new();
    let mut header_names = Vec::new();
    for (n, t) in headers {
        header_names.push(cstr("a header name", n)?);
        header_texts.push(cstr("a header", t)?);
    }
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = options(gfx)
        .iter()
        .map(|o| cstr("an option", o))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    // One compilation at a time: ROCm 5.2's hiprtc crashed (SIGSEGV) when
    // two threads compiled at once (measured in this crate's tests), so
    // every use of a program is serialised, the drop included.
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
    let mut raw: HiprtcProgram = std::ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer; the source, the name and the
    // `text_ptrs.len()` header texts and names are NUL-terminated strings
    // that outlive the call (hiprtc copies them).
    let rc = unsafe {
        (lib.create)(
            &mut raw,
            c_text.as_ptr(),
            c_name.as_ptr(),
            text_ptrs.len() as c_int,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    };
    lib.check(rc, "hiprtcCreateProgram", name)?;
    let prog = Program { lib, raw };
    // SAFETY: `prog.raw` is a live program; `opt_ptrs` holds
    // `opt_ptrs.len()` NUL-terminated strings (`opts`) that outlive the call.
    let rc = unsafe { (lib.compile)(prog.raw, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let log =
        String::from_utf8_lossy(trim_nul(&prog.output("log", lib.log_size, lib.log)?)).into_owned();
    if rc != 0 {
        return Err(dev_err(format!(
            "hiprtc could not compile kernel source {name} for {gfx} ({}):\n{}",
            lib.error_string(rc),
            log.trim_end()
        )));
    }
    let code = prog.output("code", lib.code_size, lib.code)?;
    if code.is_empty() {
        return Err(dev_err(format!(
            "hiprtc produced no code object for kernel source {name} ({gfx})"
        )));
    }
    Ok(Compiled { code, log })
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    &b[..end]
}

// ---------------------------------------------------------------------------
// The binding (hiprtc.h; the same shape as NVRTC's).

type HiprtcProgram = *mut c_void;
type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type FnCreate = unsafe extern "C" fn(
    *mut HiprtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(HiprtcProgram, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(HiprtcProgram, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(HiprtcProgram, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut HiprtcProgram) -> c_int;
type FnErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// hiprtc's entry points, copied out of the library (kept loaded here).
struct Hiprtc {
    path: PathBuf,
    /// What `hiprtcVersion` reports (ROCm 5.2 says 9.0: not the ROCm
    /// release).
    version: (i32, i32),
    /// The ROCm release (`hipRuntimeGetVersion` of the library hiprtc came
    /// from, or of the HIP runtime), when known.
    rocm_version: Option<i32>,
    create: FnCreate,
    compile: FnCompile,
    log_size: FnSize,
    log: FnGet,
    code_size: FnSize,
    code: FnGet,
    destroy: FnDestroy,
    error_string: FnErrorString,
    _lib: libloading::Library,
}

impl Hiprtc {
    fn error_string(&self, rc: c_int) -> String {
        // SAFETY: hiprtcGetErrorString accepts any value and returns a
        // pointer to a static NUL-terminated string (or null).
        let p = unsafe { (self.error_string)(rc) };
        if p.is_null() {
            return format!("hiprtc error {rc}");
        }
        // SAFETY: non-null, NUL-terminated and static (hiprtc's contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, rc: c_int, call: &str, name: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        Err(dev_err(format!(
            "{call} ({name}) failed: {} ({rc})",
            self.error_string(rc)
        )))
    }

    fn open(path: PathBuf, lib: libloading::Library) -> std::result::Result<Hiprtc, String> {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol is hiprtc's C function of that name,
                // whose signature (hiprtc.h) is `$ty`; the pointer is used
                // only while `lib` is alive (it is moved into the struct).
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
        let version_fn = sym!(b"hiprtcVersion\0", FnVersion);
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let rc = unsafe { version_fn(&mut major, &mut minor) };
        if rc != 0 {
            return Err(format!("{}: hiprtcVersion failed ({rc})", path.display()));
        }
        type FnRt = unsafe extern "C" fn(*mut c_int) -> c_int;
        // SAFETY: hipRuntimeGetVersion(int*) of hip_runtime_api.h, when
        // this library is the HIP runtime (ROCm 5.x); used only here, while
        // `lib` is alive.
        let own_rt = unsafe { lib.get::<FnRt>(b"hipRuntimeGetVersion\0") }
            .ok()
            .and_then(|f| {
                let mut v = 0;
                // SAFETY: a valid out-pointer; callable before hipInit.
                (unsafe { f(&mut v) } == 0).then_some(v)
            });
        let rocm_version = own_rt.or_else(|| {
            crate::hip::library()
                .ok()
                .and_then(|h| h.runtime_version().ok())
        });
        Ok(Hiprtc {
            version: (major, minor),
            rocm_version,
            create: sym!(b"hiprtcCreateProgram\0", FnCreate),
            compile: sym!(b"hiprtcCompileProgram\0", FnCompile),
            log_size: sym!(b"hiprtcGetProgramLogSize\0", FnSize),
            log: sym!(b"hiprtcGetProgramLog\0", FnGet),
            code_size: sym!(b"hiprtcGetCodeSize\0", FnSize),
            code: sym!(b"hiprtcGetCode\0", FnGet),
            destroy: sym!(b"hiprtcDestroyProgram\0", FnDestroy),
            error_string: sym!(b"hiprtcGetErrorString\0", FnErrorString),
            path,
            _lib: lib,
        })
    }
}

/// A program, destroyed on drop.
struct Program {
    lib: &'static Hiprtc,
    raw: HiprtcProgram,
}

impl Program {
    /// Reads one output (log or code) through its size and get calls.
    fn output(&self, what: &str, size: FnSize, get: FnGet) -> Result<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: `self.raw` is a live program; `n` a valid out-pointer.
        let rc = unsafe { size(self.raw, &mut n) };
        self.lib.check(rc, &format!("hiprtc get {what} size"), "")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` has the `n` bytes hiprtc said it writes.
        let rc = unsafe { get(self.raw, buf.as_mut_ptr().cast()) };
        self.lib.check(rc, &format!("hiprtc get {what}"), "")?;
        Ok(buf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `raw` is a live program, destroyed exactly once here.
        let _ = unsafe { (self.lib.destroy)(&mut self.raw) };
    }
}

/// The names tried for hiprtc, in order (before the HIP runtime itself).
pub fn library_names() -> Vec<String> {
    if let Some(p) = std::env::var_os("DEEPPORT_HIPRTC_LIB").filter(|v| !v.is_empty()) {
        return vec![p.to_string_lossy().into_owned()];
    }
    let mut v: Vec<String> = ["libhiprtc.so", "libhiprtc.so.6", "libhiprtc.so.5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(crate::hip::library_names());
    v
}

fn library() -> std::result::Result<&'static Hiprtc, String> {
    static LIB: OnceLock<std::result::Result<Hiprtc, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut why = Vec::new();
        for name in library_names() {
            match open_first(std::slice::from_ref(&name)) {
                Ok((path, lib)) => match Hiprtc::open(path, lib) {
                    Ok(h) => return Ok(h),
                    Err(e) => why.push(e),
                },
                Err(e) => why.push(e),
            }
        }
        Err(format!("hiprtc not found: {}", why.join("; ")))
    })
    .as_ref()
    .map_err(|e| e.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_are_checked() {
        for ok in [
            "gfx90a",
            "gfx908",
            "gfx942",
            "gfx90a:sramecc+:xnack-",
            "gfx1100",
        ] {
            assert!(check_arch(ok).is_ok(), "{ok}");
        }
        for bad in ["", "gfx", "sm_90a", "gfx90a -O0", "gfxzz", "gfx90a\0"] {
            assert!(
                matches!(check_arch(bad), Err(Error::Invalid { arg: "arch", .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            compile("x.cu", "", "sm_80"),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn rocm5_refuses_targets_its_compiler_aborts_on() {
        let v52 = Some(50_221_153);
        assert!(arch_allowed("gfx90a", v52).is_ok());
        assert!(arch_allowed("gfx90a:sramecc+:xnack-", v52).is_ok());
        if std::env::var_os("DEEPPORT_HIPRTC_ANY_ARCH").is_none() {
            let e = arch_allowed("gfx942", v52).unwrap_err();
            assert!(e.contains("ROCm 5.2") && e.contains("gfx942"), "{e}");
        }
        assert!(arch_allowed("gfx942", Some(60_300_000)).is_ok());
        assert!(arch_allowed("gfx942", None).is_ok());
    }

    #[test]
    fn options_define_dp_hip_and_the_arch() {
        let o = options("gfx90a");
        assert!(o.contains(&"--offload-arch=gfx90a".to_string()), "{o:?}");
        assert!(o.contains(&"-DDP_HIP".to_string()), "{o:?}");
        assert!(!o.iter().any(|x| x.contains("wavefront")), "{o:?}");
        let r = options("gfx1030");
        assert!(r.contains(&"-mwavefrontsize64".to_string()), "{r:?}");
        assert!(is_rdna("gfx1100") && is_rdna("gfx1201:xnack-"));
        assert!(!is_rdna("gfx90a") && !is_rdna("gfx942"));
    }
}
