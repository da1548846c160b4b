//! deepport's ROCm backend (`rocm`): the HIP runtime and hiprtc, loaded
//! at run time, and the portable kernels compiled for AMD GPUs.
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
//! * Ops: [`Rocm`] runs every local op through the CUDA backend's op
//!   glue (`deepport_cuda::ops::glue`, never copied) on [`device::RocmCx`],
//!   its [`deepport_cuda::launch::LaunchContext`] over HIP: code objects
//!   compiled once per (source, gfx), loaded per instance
//!   (`hipModuleLoadData`/`hipModuleGetFunction`), launched with
//!   `hipModuleLaunchKernel`; index and finiteness checks are deferred to
//!   the next `download`/`synchronize` like CUDA's. [`runtime::Runtime`]
//!   abstracts the HIP calls so that the whole path is tested on the CPU
//!   against a host-memory runtime (nothing has run on an AMD GPU yet:
//!   none was available when it was written).
//! * FP8 follows the device ([`fp8`]): e4m3fnuz on gfx94x, with checkpoint
//!   weights and scales converted exactly by [`Rocm::upload_fp8_weight`].
//! * The registry entry answers `Unavailable` with the probe's reason on
//!   a machine without ROCm, hiprtc or an AMD GPU.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod backend;
#[allow(unsafe_code)]
pub mod device;
pub mod elf;
#[cfg(test)]
#[allow(unsafe_code)]
mod fake;
pub mod fp8;
pub mod hip;
pub mod hiprtc;
pub mod mfma;
pub mod rccl;
#[allow(unsafe_code)]
pub mod runtime;

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
/// cannot run here; on an AMD GPU it is a [`Rocm`] (see the crate docs).
pub fn register(reg: &mut deepport_core::registry::Registry) {
    reg.register(
        BACKEND,
        "ROCm/HIP: the portable kernels compiled by hiprtc (gfx9xx, wavefront 64) through the CUDA op glue, MFMA FP8 GEMMs and MLA decode on gfx90a/gfx94x/gfx950",
        |device| Ok(Box::new(Rocm::on_device(device.unwrap_or(0))?)),
        devices,
    );
}
