//! deepport's CUDA backend (`cuda`): the Hopper reference.
//!
//! * The CUDA libraries (driver, NVRTC, NCCL) are loaded at run time; the
//!   crate builds with no CUDA toolkit. Each library is probed before any
//!   call, so a machine without `libcuda` lists `cuda` as unavailable with
//!   the reason.
//! * Kernels are `.cu` files under `kernels/`, embedded in the binary and
//!   compiled by NVRTC for the device's architecture (cached per arch):
//!   portable kernels for sm_80 and later, and Hopper (sm_90a) paths for
//!   the FP8 GEMMs (wgmma, TMA, persistent schedule) and MLA decode
//!   (wgmma, split-K and a combine kernel). Every portable source includes
//!   only `kernels/port.cuh`, so the ROCm backend compiles the same files.
//! * Op glue (`ops/`) computes launch geometry in plain Rust (`schedule/`,
//!   tested on the CPU) and launches through [`launch::LaunchContext`].

pub mod launch;
pub mod nvrtc;
pub mod ops;
pub mod schedule;

pub use ops::sources;
