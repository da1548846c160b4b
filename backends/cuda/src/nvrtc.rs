//! NVRTC, loaded at run time: compiles the embedded kernel sources to PTX
//! and cubin for one GPU architecture.
//!
//! A binding of our own (through `libloading`) of the few NVRTC calls the
//! backend needs, so the crate builds with no CUDA toolkit and a machine
//! without NVRTC reports why instead of failing to start.
//!
//! * Library search ([`probe`] lists what it tried): `$DEEPPORT_NVRTC`
//!   (a file path; when set, nothing else is tried), then `libnvrtc.so.13`,
//!   `libnvrtc.so.12` and `libnvrtc.so` through the dynamic loader (so
//!   `LD_LIBRARY_PATH` works), then `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda`
//!   `lib64/`, then the PyPI wheels (`nvidia-cuda-nvrtc-cu12`,
//!   `nvidia-cuda-nvrtc`) in the `site-packages` of every `python3` on
//!   `PATH`. Loaded once per process.
//! * Headers: every `kernels/*.cuh` is embedded ([`HEADERS`]) and handed to
//!   NVRTC in memory, so no CUDA toolkit header is needed (kernels include
//!   only these; `port.cuh` provides the types).
//! * Options: `--gpu-architecture=<arch> -std=c++17 -default-device
//!   -lineinfo -DDP_ARCH=<nn>` (`nn`: the architecture's digits, e.g. 90
//!   for `sm_90a`).
#![allow(unsafe_code)]

use crate::launch::{KernelSource, Target};
use deepport_core::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The headers every kernel source may include, by the name it includes
/// them with. Every `kernels/*.cuh` must be listed (a unit test checks).
pub const HEADERS: &[(&str, &str)] = &[
    ("port.cuh", include_str!("../kernels/port.cuh")),
    ("mla.cuh", include_str!("../kernels/mla.cuh")),
    ("gemm.cuh", include_str!("../kernels/gemm.cuh")),
];

/// The output of one compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (always produced).
    pub ptx: String,
    /// Cubin (SASS) for a real architecture (`sm_*`); empty for a virtual
    /// one (`compute_*`).
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), empty when it had nothing to say.
    pub log: String,
}

/// The architectures `deepport kernels` and the tests compile for, with
/// the kernel targets each runs.
pub const KNOWN_ARCHS: &[&str] = &[
    "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120",
];

/// The kernel targets whose sources apply to `arch`: `sm_90a` runs the
/// portable and the Hopper sources; every other known architecture
/// ([`KNOWN_ARCHS`]: sm_80 and later) the portable ones. An unknown
/// architecture is an error naming the known ones.
pub fn arch_targets(arch: &str) -> Result<&'static [Target]> {
    match arch {
        "sm_90a" => Ok(&[Target::Portable, Target::Sm90a]),
        a if KNOWN_ARCHS.contains(&a) => Ok(&[Target::Portable]),
        _ => Err(Error::Invalid {
            op: "nvrtc",
            arg: "arch",
            msg: format!(
                "unknown architecture `{arch}`; known: {}",
                KNOWN_ARCHS.join(", ")
            ),
        }),
    }
}

/// The architecture string a device of compute capability `major.minor`
/// compiles for: `sm_90a` on Hopper (the wgmma/TMA paths need the `a`
/// variant), `sm_<major><minor>` elsewhere.
pub fn arch_name(major: u32, minor: u32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The kernel sources of the backend that apply to `arch` (see
/// [`arch_targets`]), in [`crate::sources`] order.
pub fn sources_for(arch: &str) -> Result<Vec<&'static KernelSource>> {
    let targets = arch_targets(arch)?;
    Ok(crate::sources()
        .into_iter()
        .filter(|s| targets.contains(&s.target))
        .collect())
}

/// The `.entry` names a PTX module defines.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in ptx.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == ".entry" {
                if let Some(name) = words.next() {
                    let name = name.split('(').next().unwrap_or(name);
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
                break;
            }
        }
    }
    out
}

/// Checks that the PTX of `source` defines exactly the entry points the
/// source declares (`KernelSource::entries`): a missing one (a typo, or a
/// kernel not `extern "C"`) or an undeclared one is an error naming it.
pub fn check_entries(source: &KernelSource, compiled: &Compiled) -> Result<()> {
    let found = ptx_entries(&compiled.ptx);
    let missing: Vec<&str> = source
        .entries
        .iter()
        .copied()
        .filter(|e| !found.contains(e))
        .collect();
    let extra: Vec<&str> = found
        .iter()
        .copied()
        .filter(|e| !source.entries.contains(e))
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let mut msg = format!("kernel source {}: ", source.name);
    if !missing.is_empty() {
        msg += &format!(
            "declared entries missing from the PTX: {} (not defined, or not `extern \"C\"`)",
            missing.join(", ")
        );
    }
    if !extra.is_empty() {
        if !missing.is_empty() {
            msg += "; ";
        }
        msg += &format!(
            "entries in the PTX the source does not declare: {}",
            extra.join(", ")
        );
    }
    msg += &format!("; PTX defines: [{}]", found.join(", "));
    Err(Error::Device {
        backend: "cuda".into(),
        msg,
    })
}

/// Loads NVRTC (once) and reports its version, e.g. `NVRTC 12.9`, and the
/// file it came from; or why it cannot be loaded, naming every place
/// tried.
/// A fingerprint of what NVRTC compiles for `source`: its text and every
/// header (FNV-1a, 64 bits, hex). `deepport kernels` writes it next to each
/// cubin; [`load_prebuilt`] refuses a cubin whose fingerprint differs (a
/// stale directory), so prebuilt kernels never run against newer sources.
pub fn fingerprint(source: &KernelSource) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= u64::from(x);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(source.text.as_bytes());
    for (name, text) in HEADERS {
        eat(name.as_bytes());
        eat(text.as_bytes());
    }
    format!("{h:016x}")
}

/// The file names `deepport kernels` writes for `source` on `arch`:
/// (`<stem>.<arch>.ptx`, `.cubin`, `.fingerprint`).
pub fn prebuilt_names(source: &KernelSource, arch: &str) -> (String, String, String) {
    let stem = source.name.strip_suffix(".cu").unwrap_or(source.name);
    (
        format!("{stem}.{arch}.ptx"),
        format!("{stem}.{arch}.cubin"),
        format!("{stem}.{arch}.fingerprint"),
    )
}

/// The directory of prebuilt kernels named by `DEEPPORT_CUDA_KERNELS`
/// (what `deepport kernels --out DIR` wrote), if set: a GPU machine without
/// NVRTC runs from it.
pub fn prebuilt_dir() -> Option<PathBuf> {
    std::env::var_os("DEEPPORT_CUDA_KERNELS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Loads `source`'s cubin for `arch` from a `deepport kernels` directory,
/// checking its fingerprint against the embedded source.
pub fn load_prebuilt(dir: &Path, source: &KernelSource, arch: &str) -> Result<Compiled> {
    let (ptx, cubin, fp) = prebuilt_names(source, arch);
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| Error::Device {
            backend: "cuda".into(),
            msg: format!(
                "DEEPPORT_CUDA_KERNELS={}: cannot read {name}: {e} (write the directory with \
                 `deepport kernels --backend cuda --arch {arch} --out DIR`)",
                dir.display()
            ),
        })
    };
    let want = fingerprint(source);
    let have = String::from_utf8_lossy(&read(&fp)?).trim().to_string();
    if have != want {
        return Err(Error::Device {
            backend: "cuda".into(),
            msg: format!(
            "DEEPPORT_CUDA_KERNELS={}: {cubin} was built from other sources (fingerprint {have}, \
             this build has {want}); rebuild the directory with `deepport kernels`",
            dir.display()
        ),
        });
    }
    Ok(Compiled {
        ptx: String::from_utf8_lossy(&read(&ptx).unwrap_or_default()).into_owned(),
        cubin: read(&cubin)?,
        log: String::new(),
    })
}

pub fn probe() -> std::result::Result<String, String> {
    let lib = library()?;
    Ok(format!(
        "NVRTC {}.{} ({})",
        lib.version.0,
        lib.version.1,
        lib.path.display()
    ))
}

/// The version of the loaded NVRTC as `major.minor`, when it loads.
pub fn version() -> std::result::Result<(i32, i32), String> {
    library().map(|l| l.version)
}

/// The file NVRTC was loaded from, when it loads.
pub fn library_path() -> std::result::Result<PathBuf, String> {
    library().map(|l| l.path.clone())
}

/// The `-DDP_ARCH=<nn>` value of an architecture string (`sm_90a` → 90).
fn arch_number(arch: &str) -> Option<u32> {
    let rest = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let suffix = &rest[digits.len()..];
    if digits.is_empty() || !(suffix.is_empty() || suffix == "a" || suffix == "f") {
        return None;
    }
    digits.parse().ok()
}

/// Compiles one kernel source for `arch` (`sm_80`, `sm_90a`, …; a
/// `compute_*` architecture gives PTX only). NVRTC missing is
/// `Error::Unavailable`; a compile error is `Error::Device` carrying the
/// source name, the architecture and NVRTC's log.
pub fn compile(source: &KernelSource, arch: &str) -> Result<Compiled> {
    let dev = |msg: String| Error::Device {
        backend: "cuda".into(),
        msg,
    };
    let nn = arch_number(arch).ok_or_else(|| Error::Invalid {
        op: "nvrtc",
        arg: "arch",
        msg: format!("`{arch}` is not an architecture (expected e.g. sm_80, sm_90a, compute_90)"),
    })?;
    let lib = library().map_err(|reason| Error::Unavailable {
        backend: "cuda".into(),
        reason,
    })?;
    let cstr = |what: &str, s: &str| {
        CString::new(s).map_err(|_| dev(format!("{}: {what} holds a NUL byte", source.name)))
    };
    let text = cstr("the source", source.text)?;
    let name = cstr("the name", source.name)?;
    let mut header_texts = Vec::with_capacity(HEADERS.len());
    let mut header_names = Vec::with_capacity(HEADERS.len());
    for (n, t) in HEADERS {
        header_names.push(cstr("a header name", n)?);
        header_texts.push(cstr("a header", t)?);
    }
    let header_text_ptrs: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let options = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
        format!("-DDP_ARCH={nn}"),
    ];
    let options: Vec<CString> = options
        .iter()
        .map(|o| cstr("an option", o))
        .collect::<Result<_>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|c| c.as_ptr()).collect();

    let prog = Program::create(
        lib,
        &text,
        &name,
        &header_text_ptrs,
        &header_name_ptrs,
        source.name,
    )?;
    // SAFETY: `prog.0` is a live program; `option_ptrs` holds
    // `option_ptrs.len()` pointers to NUL-terminated strings (`options`)
    // that outlive the call.
    let rc =
        unsafe { (lib.compile_program)(prog.0, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
    let log = prog.log()?;
    if rc != 0 {
        return Err(dev(format!(
            "NVRTC could not compile kernel source {} for {arch} ({}):\n{}",
            source.name,
            lib.error_string(rc),
            log.trim_end()
        )));
    }
    let ptx_bytes = prog.output("PTX", lib.get_ptx_size, lib.get_ptx)?;
    let ptx = String::from_utf8_lossy(trim_nul(&ptx_bytes)).into_owned();
    let cubin = if arch.starts_with("sm_") {
        let c = prog.output("CUBIN", lib.get_cubin_size, lib.get_cubin)?;
        if c.is_empty() {
            return Err(dev(format!(
                "NVRTC produced no cubin for kernel source {} ({arch})",
                source.name
            )));
        }
        c
    } else {
        Vec::new()
    };
    Ok(Compiled { ptx, cubin, log })
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    &b[..end]
}

// ---------------------------------------------------------------------------
// The binding.

type NvrtcProgram = *mut c_void;
type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type FnCreate = unsafe extern "C" fn(
    *mut NvrtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut NvrtcProgram) -> c_int;
type FnErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// NVRTC's entry points, copied out of the library (kept loaded here).
struct Nvrtc {
    path: PathBuf,
    version: (i32, i32),
    create_program: FnCreate,
    compile_program: FnCompile,
    get_log_size: FnSize,
    get_log: FnGet,
    get_ptx_size: FnSize,
    get_ptx: FnGet,
    get_cubin_size: FnSize,
    get_cubin: FnGet,
    destroy_program: FnDestroy,
    error_string: FnErrorString,
    _lib: libloading::Library,
}

impl Nvrtc {
    fn error_string(&self, rc: c_int) -> String {
        // SAFETY: nvrtcGetErrorString accepts any value and returns a
        // pointer to a static NUL-terminated string (or null).
        let p = unsafe { (self.error_string)(rc) };
        if p.is_null() {
            return format!("NVRTC error {rc}");
        }
        // SAFETY: non-null, NUL-terminated and static (NVRTC's contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn open(path: &Path, lib: libloading::Library) -> std::result::Result<Nvrtc, String> {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol is NVRTC's C function of that name,
                // whose signature (nvrtc.h) is `$ty`; the pointer is used
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
        let version_fn = sym!(b"nvrtcVersion\0", FnVersion);
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are to live c_ints.
        let rc = unsafe { version_fn(&mut major, &mut minor) };
        if rc != 0 {
            return Err(format!("{}: nvrtcVersion failed ({rc})", path.display()));
        }
        Ok(Nvrtc {
            path: path.to_path_buf(),
            version: (major, minor),
            create_program: sym!(b"nvrtcCreateProgram\0", FnCreate),
            compile_program: sym!(b"nvrtcCompileProgram\0", FnCompile),
            get_log_size: sym!(b"nvrtcGetProgramLogSize\0", FnSize),
            get_log: sym!(b"nvrtcGetProgramLog\0", FnGet),
            get_ptx_size: sym!(b"nvrtcGetPTXSize\0", FnSize),
            get_ptx: sym!(b"nvrtcGetPTX\0", FnGet),
            get_cubin_size: sym!(b"nvrtcGetCUBINSize\0", FnSize),
            get_cubin: sym!(b"nvrtcGetCUBIN\0", FnGet),
            destroy_program: sym!(b"nvrtcDestroyProgram\0", FnDestroy),
            error_string: sym!(b"nvrtcGetErrorString\0", FnErrorString),
            _lib: lib,
        })
    }
}

/// An NVRTC program, destroyed on drop.
struct Program<'a>(NvrtcProgram, &'a Nvrtc, &'a str);

impl<'a> Program<'a> {
    fn create(
        lib: &'a Nvrtc,
        text: &CStr,
        name: &CStr,
        headers: &[*const c_char],
        include_names: &[*const c_char],
        source: &'a str,
    ) -> Result<Program<'a>> {
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: `text` and `name` are NUL-terminated; `headers` and
        // `include_names` hold `headers.len()` pointers each to
        // NUL-terminated strings that outlive the call (NVRTC copies them);
        // `prog` is a valid out-pointer.
        let rc = unsafe {
            (lib.create_program)(
                &mut prog,
                text.as_ptr(),
                name.as_ptr(),
                headers.len() as c_int,
                headers.as_ptr(),
                include_names.as_ptr(),
            )
        };
        if rc != 0 || prog.is_null() {
            return Err(Error::Device {
                backend: "cuda".into(),
                msg: format!(
                    "nvrtcCreateProgram for kernel source {source}: {}",
                    lib.error_string(rc)
                ),
            });
        }
        Ok(Program(prog, lib, source))
    }

    /// One output buffer (log, PTX, cubin) through its size and get calls.
    fn output(&self, what: &str, size_fn: FnSize, get_fn: FnGet) -> Result<Vec<u8>> {
        let err = |rc| Error::Device {
            backend: "cuda".into(),
            msg: format!(
                "NVRTC {what} of kernel source {}: {}",
                self.2,
                self.1.error_string(rc)
            ),
        };
        let mut n = 0usize;
        // SAFETY: `self.0` is a live program, `n` a valid out-pointer.
        let rc = unsafe { size_fn(self.0, &mut n) };
        if rc != 0 {
            return Err(err(rc));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` holds the `n` bytes NVRTC said it will write.
        let rc = unsafe { get_fn(self.0, buf.as_mut_ptr().cast()) };
        if rc != 0 {
            return Err(err(rc));
        }
        Ok(buf)
    }

    fn log(&self) -> Result<String> {
        let b = self.output("log", self.1.get_log_size, self.1.get_log)?;
        Ok(String::from_utf8_lossy(trim_nul(&b)).into_owned())
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from nvrtcCreateProgram and is destroyed
        // only here, once.
        unsafe { (self.1.destroy_program)(&mut self.0) };
    }
}

// ---------------------------------------------------------------------------
// Finding the library.

static LIBRARY: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

fn library() -> std::result::Result<&'static Nvrtc, String> {
    LIBRARY.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Where NVRTC is looked for, in order (see the module docs).
fn candidates() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|k| std::env::var_os(k).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for r in roots {
        for n in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
            let p = r.join("lib64").join(n);
            if p.exists() {
                v.push(p);
            }
        }
    }
    for sp in python_site_packages() {
        for (dir, n) in [
            ("nvidia/cu13/lib", "libnvrtc.so.13"),
            ("nvidia/cuda_nvrtc/lib", "libnvrtc.so.13"),
            ("nvidia/cuda_nvrtc/lib", "libnvrtc.so.12"),
        ] {
            let p = sp.join(dir).join(n);
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            if p.exists() && !v.contains(&p) {
                v.push(p);
            }
        }
    }
    v
}

/// The `site-packages` directories of every `python3` on `PATH` (a venv's
/// `bin/python3` → `lib/python3.*/site-packages`), found by listing
/// directories, without running Python.
fn python_site_packages() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Some(path) = std::env::var_os("PATH") else {
        return out;
    };
    for dir in std::env::split_paths(&path) {
        let py = dir.join("python3");
        if !py.exists() {
            continue;
        }
        let mut prefixes = vec![dir.join("..")];
        if let Ok(real) = std::fs::canonicalize(&py) {
            if let Some(p) = real.parent().and_then(Path::parent) {
                prefixes.push(p.to_path_buf());
            }
        }
        for prefix in prefixes {
            for lib in ["lib", "lib64", "local/lib"] {
                let Ok(rd) = std::fs::read_dir(prefix.join(lib)) else {
                    continue;
                };
                for e in rd.flatten() {
                    let name = e.file_name();
                    if name.to_string_lossy().starts_with("python3") {
                        for sub in ["site-packages", "dist-packages"] {
                            let sp = e.path().join(sub);
                            let sp = std::fs::canonicalize(&sp).unwrap_or(sp);
                            if sp.is_dir() && !out.contains(&sp) {
                                out.push(sp);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn load() -> std::result::Result<Nvrtc, String> {
    let try_one = |p: &Path| -> std::result::Result<Nvrtc, String> {
        // SAFETY: loading NVRTC runs its (and its dependencies') library
        // initialisers, which have no preconditions on our side.
        let lib = unsafe { libloading::Library::new(p) }.map_err(|e| e.to_string())?;
        Nvrtc::open(p, lib)
    };
    if let Some(p) = std::env::var_os("DEEPPORT_NVRTC") {
        let p = PathBuf::from(p);
        return try_one(&p).map_err(|e| {
            format!(
                "NVRTC not loadable from DEEPPORT_NVRTC={}: {e}",
                p.display()
            )
        });
    }
    let mut tried = Vec::new();
    for p in candidates() {
        match try_one(&p) {
            Ok(l) => return Ok(l),
            Err(e) => tried.push(format!("{} ({e})", p.display())),
        }
    }
    let sps = python_site_packages();
    let wheels = if sps.is_empty() {
        "no python3 on PATH".to_string()
    } else {
        sps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "NVRTC not found; tried: {}; PyPI wheels (nvidia/cuda_nvrtc/lib, nvidia/cu13/lib) in: {wheels}. \
         Install it (e.g. `pip install nvidia-cuda-nvrtc-cu12`) \
         and set DEEPPORT_NVRTC to libnvrtc.so.12, or put its directory on LD_LIBRARY_PATH",
        tried.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuilt_kernels_are_fingerprint_checked() {
        let dir = std::env::temp_dir().join(format!("dp-prebuilt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = crate::sources()[0];
        let arch = "sm_80";
        let (ptx, cubin, fp) = prebuilt_names(src, arch);
        // Missing files: an error naming the file and how to write it.
        let e = load_prebuilt(&dir, src, arch).unwrap_err().to_string();
        assert!(e.contains(&fp) && e.contains("deepport kernels"), "{e}");
        std::fs::write(dir.join(&ptx), "// ptx").unwrap();
        std::fs::write(dir.join(&cubin), b"\x7fELF fake").unwrap();
        // A stale fingerprint is refused.
        std::fs::write(dir.join(&fp), "0123456789abcdef").unwrap();
        let e = load_prebuilt(&dir, src, arch).unwrap_err().to_string();
        assert!(e.contains("other sources"), "{e}");
        // The right one loads the cubin as written.
        std::fs::write(dir.join(&fp), fingerprint(src)).unwrap();
        let c = load_prebuilt(&dir, src, arch).unwrap();
        assert_eq!(c.cubin, b"\x7fELF fake");
        // Fingerprints differ between sources and follow the text.
        let all = crate::sources();
        let mut fps: Vec<String> = all.iter().map(|s| fingerprint(s)).collect();
        fps.sort();
        fps.dedup();
        assert_eq!(fps.len(), all.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_header_under_kernels_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("kernels/")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cuh"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = HEADERS.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "every kernels/*.cuh must be listed in nvrtc::HEADERS (and only those)"
        );
        for (n, t) in HEADERS {
            let disk = std::fs::read_to_string(dir.join(n)).expect("header");
            assert_eq!(&disk, t, "{n}: embedded text differs from the file");
        }
    }

    #[test]
    fn arch_targets_and_numbers() {
        assert_eq!(
            arch_targets("sm_90a").unwrap(),
            &[Target::Portable, Target::Sm90a]
        );
        for a in ["sm_80", "sm_86", "sm_89", "sm_90"] {
            assert_eq!(arch_targets(a).unwrap(), &[Target::Portable], "{a}");
        }
        let e = arch_targets("sm_75").unwrap_err().to_string();
        assert!(e.contains("sm_75") && e.contains("sm_90a"), "{e}");
        assert_eq!(arch_name(9, 0), "sm_90a");
        assert_eq!(arch_name(8, 6), "sm_86");
        assert_eq!(arch_name(10, 0), "sm_100");
        assert_eq!(arch_number("sm_90a"), Some(90));
        assert_eq!(arch_number("sm_80"), Some(80));
        assert_eq!(arch_number("compute_90"), Some(90));
        assert_eq!(arch_number("sm_100f"), Some(100));
        assert_eq!(arch_number("gfx942"), None);
        assert_eq!(arch_number("sm_"), None);
        assert_eq!(arch_number("sm_90x"), None);
    }

    #[test]
    fn ptx_entry_names() {
        let ptx = "//\n.version 8.8\n.target sm_90a\n\
                   .visible .entry dp_a(\n\t.param .u64 dp_a_param_0\n)\n{\n}\n\
                   .visible .entry dp_b()\n{\n}\n.func helper(\n";
        assert_eq!(ptx_entries(ptx), vec!["dp_a", "dp_b"]);
        static SRC: KernelSource = KernelSource {
            name: "t.cu",
            text: "",
            target: Target::Portable,
            entries: &["dp_a", "dp_c"],
        };
        let c = Compiled {
            ptx: ptx.into(),
            cubin: vec![],
            log: String::new(),
        };
        let e = check_entries(&SRC, &c).unwrap_err().to_string();
        assert!(
            e.contains("t.cu") && e.contains("missing from the PTX: dp_c"),
            "{e}"
        );
        assert!(e.contains("does not declare: dp_b"), "{e}");
        static OK: KernelSource = KernelSource {
            name: "t.cu",
            text: "",
            target: Target::Portable,
            entries: &["dp_b", "dp_a"],
        };
        check_entries(&OK, &c).unwrap();
    }

    #[test]
    fn bad_arch_string_is_an_error_before_loading() {
        static SRC: KernelSource = KernelSource {
            name: "t.cu",
            text: "",
            target: Target::Portable,
            entries: &[],
        };
        let e = compile(&SRC, "gfx942").unwrap_err().to_string();
        assert!(e.contains("gfx942"), "{e}");
    }
}
