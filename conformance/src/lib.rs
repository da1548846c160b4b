//! deepport-conformance: the conformance suite of deepport and the library
//! behind the `deepport` command-line program.
//!
//! * [`registry`]: every backend compiled into this build (one cargo
//!   feature per backend);
//! * [`types`]: the suite's shared types (outcomes, tolerances, case specs,
//!   results), which every layer below imports;
//! * [`opspec`]: the table of ops that `deepport op` runs on a user's
//!   safetensors file: tensor names, parameters and defaults, and one runner
//!   per op (the expert-parallel ones on `--ranks N` in-process ranks);
//! * [`judge`]: the generic comparison metrics (`calc_diff`, ulp-based
//!   elementwise tolerances, NMSE, exact bytes, …) and the [`judge::Check`]
//!   they produce;
//! * [`cases`]: the op families of the conformance suite, their case
//!   builders (small, deterministic, adversarial inputs) and the judges
//!   that belong to one family (routing sets, keyed rows);
//! * `bench_cmd`: `deepport bench` (with the `cpu` feature);
//! * [`kernels_cmd`]: `deepport kernels` (compiles the `cuda` kernels
//!   with NVRTC when the `cuda` feature is on);
//! * [`suite`]: the conformance suite: catalogue, execution (`deepport
//!   run`), waivers and reports.
//!
//! Imports point one way: `types` ← `judge` ← `cases` ← `suite` (with
//! `opspec` below `cases`).
#![forbid(unsafe_code)]

#[cfg(feature = "cpu")]
pub mod bench_cmd;
pub mod cases;
pub mod comm_cmd;
pub mod error;
#[cfg(feature = "cpu")]
pub mod faulty;
pub mod forward_cmd;
pub mod golden;
pub mod judge;
pub mod kernels_cmd;
pub mod list;
pub mod model_check;
pub mod opspec;
pub mod rng;
pub mod suite;
pub mod types;

pub use error::CliError;

use deepport_core::registry::Registry;

/// The name of the reference backend every other backend is judged against.
pub const REFERENCE_BACKEND: &str = "cpu-ref";

/// Every backend compiled into this build, by name. Each backend crate adds
/// itself under its own cargo feature.
pub fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut reg = Registry::new();
    #[cfg(feature = "cpu")]
    deepport_cpu::register(&mut reg);
    #[cfg(feature = "wgpu")]
    deepport_wgpu::register(&mut reg);
    #[cfg(feature = "cuda")]
    deepport_cuda::register(&mut reg);
    #[cfg(feature = "rocm")]
    deepport_rocm::register(&mut reg);
    #[cfg(feature = "vulkan")]
    deepport_vulkan::register(&mut reg);
    #[cfg(feature = "cpu")]
    faulty::register_if_enabled(&mut reg);
    #[cfg(feature = "plugin")]
    deepport_plugin::register_from_env(&mut reg);
    reg
}
