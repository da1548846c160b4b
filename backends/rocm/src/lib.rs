//! deepport's ROCm backend (`rocm`), first slice: the HIP runtime and
//! hiprtc, loaded at run time, and the portable kernels compiled for AMD
//! GPUs.
//!
//! * Nothing of ROCm is needed to build: [`hip`] binds the HIP runtime
//!   (`libamdhip64.so`, `.so.6`, `.so.5`, or `$DEEPPORT_HIP_LIB`) and
//!   [`hiprtc`] the runtime compiler (`libhiprtc.so*`, or the HIP runtime
//!   itself, where ROCm 5.x keeps it) through `libloading`, declaring only
//!   the calls used. Every call returns a `Result`; a machine without
//!   ROCm or without an AMD GPU reports why ([`hip::probe`]).
//! * Why not the `hip-sys` crate: it links `libamdhip64` at build time
//!   (so the workspace would not build, nor its binaries start, without
//!   ROCm) and binds no hiprtc, which this backend needs to compile its
//!   kernels. The CUDA backend binds NVRTC the same way for the same
//!   reason.
//! * Kernels: the CUDA backend's portable sources (`deepport_cuda::sources()`
//!   with `Target::Portable`, headers from `deepport_cuda::nvrtc::HEADERS`),
//!   the same files, never copies, compiled by hiprtc for the device's
//!   `gfx` architecture with `-DDP_HIP` (`port.cuh`: wavefront 64,
//!   `__shfl_xor`). The Hopper `*_sm90.cu` sources are CUDA-only.
//! * This slice has no `Backend` yet: the registry entry probes the
//!   runtime and answers `Unavailable` with the reason; where a GPU is
//!   present it says that the runtime slice (memory, launches, ops) has
//!   not landed. Every op will answer `NotSupported` until it does.

#![deny(unsafe_code)]

pub mod elf;
pub mod hip;
pub mod hiprtc;

use deepport_core::backend::DeviceInfo;
use deepport_core::{Error, Result};
use deepport_cuda::launch::{KernelSource, Target};
pub use hip::BACKEND;

/// The kernel sources this backend compiles: the CUDA backend's portable ones.
pub fn sources() -> Vec<&'static KernelSource> {
    deepport_cuda::sources()
        .into_iter()
        .filter(|s| s.target == Target::Portable)
        .collect()
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason,
    }
}

/// Why the backend cannot be created on `device`: the HIP probe's reason,
/// hiprtc's, or (with a GPU) that the runtime slice has not landed.
pub fn availability(device: usize) -> Error {
    let desc = match hip::probe() {
        Err(why) => return unavailable(why),
        Ok(d) => d,
    };
    if let Err(why) = hiprtc::probe() {
        return unavailable(format!(
            "{desc}; hiprtc (the kernel compiler) cannot be loaded: {why}"
        ));
    }
    let dev = hip::library()
        .map_err(|e| e.to_string())
        .and_then(|h| h.describe(device).map_err(|e| e.to_string()));
    match dev {
        Err(why) => unavailable(format!("{desc}; device {device}: {why}")),
        Ok(d) => unavailable(format!(
            "{desc}; device {device} is {} ({}): the ROCm backend's runtime slice \
             (memory, launches, ops) has not landed yet",
            d.name, d.gfx
        )),
    }
}

/// The AMD GPUs of this machine, or why there are none.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    hip::probe().map_err(unavailable)?;
    let h = hip::library().map_err(unavailable)?;
    let drv = hip::probe().unwrap_or_default();
    (0..h.device_count()?)
        .map(|i| {
            let d = h.describe(i)?;
            Ok(DeviceInfo {
                backend: BACKEND.into(),
                device: format!("{} ({}, {} CUs)", d.name, d.gfx, d.compute_units),
                driver: drv.clone(),
                vendor: "AMD".into(),
            })
        })
        .collect()
}

/// Registers `rocm` (`rocm:N` picks device N). In this slice creating it
/// always answers [`Error::Unavailable`] with the reason (see the crate docs).
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "ROCm/HIP: the portable kernels compiled by hiprtc (gfx9xx, wavefront 64); first slice, no ops yet",
        |device| Err(availability(device.unwrap_or(0))),
        devices,
    );
}
