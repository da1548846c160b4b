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
//! * This slice's [`Rocm`] backend has device memory (alloc, upload,
//!   download, views, write, synchronize) and no ops: every op answers
//!   `NotSupported` until the launch glue (the runtime slice) lands. The
//!   registry entry answers `Unavailable` with the probe's reason on a
//!   machine without ROCm or without an AMD GPU. The memory path has not
//!   run on an AMD GPU yet (none was available when it was written).

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod backend;
pub mod elf;
pub mod hip;
pub mod hiprtc;

use backend::unavailable;
pub use backend::{Rocm, RocmStorage};
use deepport_core::backend::DeviceInfo;
use deepport_core::Result;
use deepport_cuda::launch::{KernelSource, Target};
pub use hip::BACKEND;

/// The kernel sources this backend compiles: the CUDA backend's portable ones.
pub fn sources() -> Vec<&'static KernelSource> {
    deepport_cuda::sources()
        .into_iter()
        .filter(|s| s.target == Target::Portable)
        .collect()
}

/// The AMD GPUs of this machine, or why there are none.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    hip::probe().map_err(unavailable)?;
    let h = hip::library().map_err(unavailable)?;
    (0..h.device_count()?)
        .map(|i| h.describe(i).map(|d| backend::info_of(&d)))
        .collect()
}

/// Registers `rocm` (`rocm:N` picks device N). Creating it probes the HIP
/// runtime and answers [`deepport_core::Error::Unavailable`] with the reason when it
/// cannot run here; on an AMD GPU it is a [`Rocm`] whose memory works and
/// whose ops answer `NotSupported` (see the crate docs).
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "ROCm/HIP: the portable kernels compiled by hiprtc (gfx9xx, wavefront 64); first slice, memory only, no ops yet",
        |device| Ok(Box::new(Rocm::on_device(device.unwrap_or(0))?)),
        devices,
    );
}
