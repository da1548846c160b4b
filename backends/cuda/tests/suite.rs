//! The generic backend suite (`deepport-testkit`) for `cuda`: every op
//! against `cpu-ref` on small adversarial inputs, index errors, poisoned
//! slots, expert parallelism on 2 and 4 ranks (rank `r` on GPU
//! `r % devices`; several ranks share a GPU as separate instances).
//!
//! Without a CUDA driver and device every check prints why and passes,
//! unless `DEEPPORT_REQUIRE` names `cuda`: then unavailability fails it.

use deepport_core::backend::Backend;
use deepport_cuda::{probe, Cuda};

deepport_testkit::backend_suite!("cuda", |rank| {
    let devices = probe::driver().map(|d| d.devices.max(1)).unwrap_or(1);
    Ok(Box::new(Cuda::on_device(rank % devices)?) as Box<dyn Backend>)
});
