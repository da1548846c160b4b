//! Probing the CUDA driver before cudarc touches it.
//!
//! cudarc (`dynamic-loading`) dlopens `libcuda` on the first call of any
//! driver function and *panics* when the library or one of its symbols is
//! missing. So [`driver`] first opens the library itself with
//! `libloading` — `libcuda.so.1` (the name the driver package installs),
//! then `libcuda.so` (the development symlink) — checks every driver
//! symbol this crate calls, and calls `cuInit`, `cuDriverGetVersion` and
//! `cuDeviceGetCount` through that handle. Only when all of that succeeds
//! may cudarc be used; cudarc's own search finds the same library (its
//! candidates include `libcuda.so` and `libcuda.so.1`), already loaded.
//! cudarc tries `libcuda.so` first: when that name also loads (it may be a
//! toolkit's stub library on `LD_LIBRARY_PATH`), it is checked the same
//! way, so cudarc never gets a driver the probe did not accept.
//!
//! Every failure is [`Error::Unavailable`] with the exact reason: the
//! library is missing (with the names tried and the loader's message), a
//! symbol is missing or the driver reports a version below 12.0 (driver
//! too old), `cuInit` fails (its error code named), or no device.

use deepport_core::{Error, Result};
use std::ffi::{c_int, c_uint};
use std::sync::OnceLock;

/// The backend's name in errors.
pub(crate) const BACKEND: &str = "cuda";

/// The lowest driver API version this crate's bindings need (12.0:
/// `cuTensorMapEncodeTiled`).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// File names tried for the driver, in order.
pub const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Every driver entry point this crate (and the parts of cudarc it uses)
/// calls. A driver lacking one is too old; cudarc would panic on it.
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
    "cuTensorMapEncodeTiled",
    "cuGetErrorString",
    "cuGetErrorName",
    "cuDeviceTotalMem_v2",
];

/// What the driver probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// The file that loaded (`libcuda.so.1`, …).
    pub library: String,
    /// `cuDriverGetVersion`: 1000 * major + 10 * minor.
    pub version: i32,
    /// `cuDeviceGetCount`.
    pub devices: usize,
}

impl DriverInfo {
    /// `12.4`-style version text.
    pub fn version_text(&self) -> String {
        version_text(self.version)
    }
}

/// `12040` → `12.4`.
pub fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

pub fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason: reason.into(),
    }
}

/// The names of the `CUresult` codes `cuInit` and friends return on a
/// machine that cannot run CUDA.
pub fn cu_result_name(code: i32) -> &'static str {
    match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        4 => "CUDA_ERROR_DEINITIALIZED",
        34 => "CUDA_ERROR_STUB_LIBRARY",
        35 => "CUDA_ERROR_INSUFFICIENT_DRIVER",
        46 => "CUDA_ERROR_DEVICES_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        304 => "CUDA_ERROR_OPERATING_SYSTEM",
        803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        804 => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => "CUDA error",
    }
}

/// The reason for what the probe's calls returned, or `None` when the
/// driver is usable. Pure, so every branch is tested here.
pub fn driver_verdict(
    init: i32,
    version: Option<i32>,
    count: Option<(i32, i32)>,
) -> Option<String> {
    if init != 0 {
        let hint = match init {
            100 => ": no CUDA device (is the GPU visible to this process?)",
            35 | 803 => ": the kernel driver and libcuda do not match",
            34 => ": libcuda is the toolkit's stub library, not a driver",
            _ => "",
        };
        return Some(format!(
            "cuInit failed with {} ({init}){hint}",
            cu_result_name(init)
        ));
    }
    match version {
        None => return Some("cuDriverGetVersion failed".into()),
        Some(v) if v < MIN_DRIVER_VERSION => {
            return Some(format!(
                "driver too old: CUDA {} driver, this backend needs {} or newer",
                version_text(v),
                version_text(MIN_DRIVER_VERSION)
            ))
        }
        _ => {}
    }
    match count {
        Some((0, n)) if n > 0 => None,
        Some((0, _)) => Some("no CUDA device (cuDeviceGetCount = 0)".into()),
        Some((code, _)) => Some(format!(
            "cuDeviceGetCount failed with {} ({code})",
            cu_result_name(code)
        )),
        None => Some("cuDeviceGetCount failed".into()),
    }
}

/// Opens the first of `names` that loads; the error names each file tried
/// with the loader's message.
pub(crate) fn open_first(
    what: &str,
    names: &[&str],
) -> std::result::Result<(libloading::Library, String), String> {
    let mut tried = Vec::new();
    for n in names {
        // SAFETY: loading a system library runs its initialisers; libcuda
        // and libnccl are the vendor's libraries, loaded by name exactly as
        // cudarc (and every CUDA program) would.
        #[allow(unsafe_code)]
        match unsafe { libloading::Library::new(n) } {
            Ok(lib) => return Ok((lib, n.to_string())),
            Err(e) => {
                let e = e.to_string();
                tried.push(if e.contains(n) {
                    e
                } else {
                    format!("{n}: {e}")
                })
            }
        }
    }
    Err(format!("{what} library not found ({})", tried.join("; ")))
}

/// The symbols of `names` that `lib` lacks.
pub(crate) fn missing_symbols(lib: &libloading::Library, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            // SAFETY: only the symbol's presence is checked; the pointer is
            // never called or dereferenced.
            #[allow(unsafe_code)]
            let found = unsafe { lib.get::<*const ()>(n.as_bytes()) }.is_ok();
            !found
        })
        .map(|n| n.to_string())
        .collect()
}

/// Checks one opened driver library: symbols, `cuInit`, version, devices.
fn check_driver(
    lib: &libloading::Library,
    library: &str,
) -> std::result::Result<DriverInfo, String> {
    let missing = missing_symbols(lib, DRIVER_SYMBOLS);
    if !missing.is_empty() {
        return Err(format!(
            "driver too old: {library} lacks {} (this backend needs a CUDA {} or newer driver)",
            missing.join(", "),
            version_text(MIN_DRIVER_VERSION)
        ));
    }
    type InitFn = unsafe extern "C" fn(c_uint) -> c_int;
    type IntOutFn = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: the symbols exist (checked above) and have these C
    // signatures in every CUDA driver (`CUresult cuInit(unsigned)`,
    // `CUresult cuDriverGetVersion(int*)`, `CUresult cuDeviceGetCount(int*)`;
    // CUresult is a C enum, an int). The out-pointers are live locals.
    #[allow(unsafe_code)]
    let (init, version, count) = unsafe {
        let cu_init = lib.get::<InitFn>(b"cuInit").map_err(|e| e.to_string())?;
        let get_version = lib
            .get::<IntOutFn>(b"cuDriverGetVersion")
            .map_err(|e| e.to_string())?;
        let get_count = lib
            .get::<IntOutFn>(b"cuDeviceGetCount")
            .map_err(|e| e.to_string())?;
        let init = cu_init(0);
        let mut v: c_int = 0;
        let version = (get_version(&mut v) == 0).then_some(v);
        let mut n: c_int = 0;
        let count = if init == 0 {
            let code = get_count(&mut n);
            Some((code, n))
        } else {
            None
        };
        (init, version, count)
    };
    if let Some(reason) = driver_verdict(init, version, count) {
        return Err(format!("{library}: {reason}"));
    }
    Ok(DriverInfo {
        library: library.to_string(),
        version: version.unwrap_or(0),
        devices: count.map(|(_, n)| n.max(0) as usize).unwrap_or(0),
    })
}

fn probe_driver() -> std::result::Result<DriverInfo, String> {
    let (lib, library) = open_first("CUDA driver (libcuda)", DRIVER_NAMES)?;
    let info = check_driver(&lib, &library)?;
    // cudarc tries `libcuda.so` before `libcuda.so.1`. When both exist they
    // may differ (a toolkit's stub `libcuda.so` on LD_LIBRARY_PATH next to
    // the real driver): check the one cudarc will load as well.
    if library != "libcuda.so" {
        if let Ok((other, name)) = open_first("CUDA driver (libcuda)", &["libcuda.so"]) {
            check_driver(&other, &name).map_err(|why| {
                format!("{why} (cudarc loads libcuda.so before {library}; fix or remove it)")
            })?;
            std::mem::forget(other);
        }
    }
    // Keep the library loaded for the life of the process (cudarc's handle
    // refers to the same mapping; unloading a CUDA driver is never safe).
    std::mem::forget(lib);
    Ok(info)
}

/// Probes the driver once per process; `Err` is [`Error::Unavailable`]
/// with the reason. After `Ok`, cudarc's driver calls are safe to make.
pub fn driver() -> Result<DriverInfo> {
    static PROBE: OnceLock<std::result::Result<DriverInfo, String>> = OnceLock::new();
    PROBE.get_or_init(probe_driver).clone().map_err(unavailable)
}

/// `sm_90a` on Hopper (the arch-specific wgmma/TMA/setmaxnreg features),
/// `sm_{major}{minor}` elsewhere.
pub fn arch_string(major: u32, minor: u32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_strings() {
        assert_eq!(arch_string(9, 0), "sm_90a");
        assert_eq!(arch_string(8, 0), "sm_80");
        assert_eq!(arch_string(8, 9), "sm_89");
        assert_eq!(arch_string(10, 0), "sm_100");
        assert_eq!(arch_string(12, 0), "sm_120");
    }

    #[test]
    fn verdicts() {
        assert_eq!(driver_verdict(0, Some(12040), Some((0, 2))), None);
        let r = driver_verdict(100, None, None).unwrap();
        assert!(
            r.contains("CUDA_ERROR_NO_DEVICE") && r.contains("no CUDA device"),
            "{r}"
        );
        let r = driver_verdict(35, None, None).unwrap();
        assert!(r.contains("INSUFFICIENT_DRIVER"), "{r}");
        let r = driver_verdict(0, Some(11080), Some((0, 1))).unwrap();
        assert!(
            r.contains("driver too old") && r.contains("11.8") && r.contains("12.0"),
            "{r}"
        );
        let r = driver_verdict(0, Some(13000), Some((0, 0))).unwrap();
        assert!(r.contains("no CUDA device"), "{r}");
        let r = driver_verdict(0, Some(13000), Some((999, 0))).unwrap();
        assert!(r.contains("CUDA_ERROR_UNKNOWN"), "{r}");
        assert!(driver_verdict(0, None, Some((0, 1))).is_some());
    }

    #[test]
    fn version_texts() {
        assert_eq!(version_text(12040), "12.4");
        assert_eq!(version_text(13000), "13.0");
        assert_eq!(version_text(12090), "12.9");
    }

    #[test]
    fn missing_library_is_named() {
        let e = open_first("test", &["libdeepport-does-not-exist.so.7"]).unwrap_err();
        assert!(e.contains("libdeepport-does-not-exist.so.7"), "{e}");
        assert!(e.contains("test library not found"), "{e}");
    }

    /// Builds a fake `libcuda` with the C compiler (when there is one) and
    /// runs the real probe path on it: dlopen, symbol check, calls.
    fn fake_driver(tag: &str, init: i32, version: i32, count: i32, omit: &str) -> Option<String> {
        let dir =
            std::env::temp_dir().join(format!("deepport-cuda-fake-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut c = String::new();
        for s in DRIVER_SYMBOLS {
            match *s {
                "cuInit" => c += &format!("int cuInit(unsigned f) {{ (void)f; return {init}; }}\n"),
                "cuDriverGetVersion" => {
                    c +=
                        &format!("int cuDriverGetVersion(int* v) {{ *v = {version}; return 0; }}\n")
                }
                "cuDeviceGetCount" => {
                    c += &format!("int cuDeviceGetCount(int* n) {{ *n = {count}; return 0; }}\n")
                }
                s if s == omit => {}
                s => c += &format!("int {s}(void) {{ return 0; }}\n"),
            }
        }
        let src = dir.join("fake.c");
        let lib = dir.join("libcuda-fake.so");
        std::fs::write(&src, c).ok()?;
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            println!("no C compiler: fake-driver test skipped");
            return None;
        }
        Some(lib.to_string_lossy().into_owned())
    }

    #[test]
    fn probe_path_on_fake_drivers() {
        let run = |path: &str| {
            let (lib, name) = open_first("fake", &[path]).expect("the fake library loads");
            check_driver(&lib, &name)
        };
        let Some(good) = fake_driver("good", 0, 12040, 2, "") else {
            return;
        };
        let info = run(&good).expect("a good fake driver");
        assert_eq!((info.version, info.devices), (12040, 2));
        let nodev = fake_driver("nodev", 100, 12040, 0, "").unwrap();
        let e = run(&nodev).unwrap_err();
        assert!(e.contains("CUDA_ERROR_NO_DEVICE"), "{e}");
        let zero = fake_driver("zero", 0, 13000, 0, "").unwrap();
        let e = run(&zero).unwrap_err();
        assert!(e.contains("no CUDA device"), "{e}");
        let old = fake_driver("old", 0, 11080, 1, "").unwrap();
        let e = run(&old).unwrap_err();
        assert!(e.contains("driver too old") && e.contains("11.8"), "{e}");
        let nosym = fake_driver("nosym", 0, 12040, 1, "cuTensorMapEncodeTiled").unwrap();
        let e = run(&nosym).unwrap_err();
        assert!(
            e.contains("driver too old") && e.contains("cuTensorMapEncodeTiled"),
            "{e}"
        );
        for p in [good, nodev, zero, old, nosym] {
            if let Some(d) = std::path::Path::new(&p).parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}
