//! The generic backend suite (`deepport-testkit`) for `rocm`: every op
//! against `cpu-ref` on small adversarial inputs, index errors, poisoned
//! slots, expert parallelism on 2 and 4 ranks (rank `r` on GPU
//! `r % devices`).
//!
//! Without a HIP runtime, hiprtc and an AMD GPU every check prints why and
//! passes, unless `DEEPPORT_REQUIRE` names `rocm`: then it fails.

use deepport_core::backend::Backend;
use deepport_rocm::Rocm;

deepport_testkit::backend_suite!("rocm", |rank| {
    let devices = deepport_rocm::devices()
        .map(|d| d.len().max(1))
        .unwrap_or(1);
    Ok(Box::new(Rocm::on_device(rank % devices)?) as Box<dyn Backend>)
});
