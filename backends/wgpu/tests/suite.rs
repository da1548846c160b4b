//! The generic backend suite (`deepport-testkit`) for `wgpu`: every op
//! against `cpu-ref` on small adversarial inputs, index errors, poisoned
//! slots, expert parallelism on 2 and 4 ranks (one wgpu instance per rank).
//!
//! Without an adapter every check prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`: then unavailability fails it.

use deepport_core::backend::Backend;
use deepport_wgpu::{Wgpu, WgpuOptions};

deepport_testkit::backend_suite!("wgpu", |_rank| Ok(Box::new(Wgpu::with_options(
    WgpuOptions::default()
)?) as Box<dyn Backend>));
