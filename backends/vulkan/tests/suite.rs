//! The generic backend suite (`deepport-testkit`) for `vulkan`, with the
//! Khronos validation layer on when it is installed (then any validation
//! error fails the check that caused it: it comes back from the next
//! `synchronize`/`download` as `Error::Device`). Ops not implemented yet are
//! reported as skipped by the harness, never passed.
//!
//! Without a device every check prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `vulkan`.

use deepport_core::backend::Backend;
use deepport_vulkan::{validation_available, Vulkan, VulkanOptions};

deepport_testkit::backend_suite!("vulkan", |_rank| Ok(Box::new(Vulkan::with_options(
    VulkanOptions {
        device: 0,
        validation: validation_available(),
        ..Default::default()
    }
)?) as Box<dyn Backend>));
