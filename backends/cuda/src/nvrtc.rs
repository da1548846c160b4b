//! STAND-IN (branch `cudahost` only): the signatures of the helper
//! cudacompile's `nvrtc.rs`, so the device context compiles. The lead takes
//! cudacompile's file at merge; this one only says NVRTC is unavailable.

use crate::launch::KernelSource;
use deepport_core::{Error, Result};

/// A compiled kernel source.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: String,
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compiles `source` for `arch` (`sm_90a`, `sm_80`, …). Stand-in: always
/// [`Error::Unavailable`].
pub fn compile(source: &KernelSource, arch: &str) -> Result<Compiled> {
    Err(Error::Unavailable {
        backend: "cuda".into(),
        reason: format!(
            "NVRTC stand-in: cannot compile {} for {arch} in this branch",
            source.name
        ),
    })
}

/// NVRTC's version, or why it cannot be loaded. Stand-in: never loads.
pub fn probe() -> std::result::Result<String, String> {
    Err("NVRTC stand-in (cudahost branch): not loaded".into())
}
