//! One expert-parallel group of mixed backends: ranks 0 and 2 on cpu-ref,
//! ranks 1 and 3 on wgpu (each its own instance), one `ThreadComm` group.
//! Both backends run core's protocol (one wire format), so the group must
//! behave exactly as 4 cpu-ref ranks (`deepport_testkit::ep`): payloads
//! and handles bit for bit, combines within SPEC §7, a second run
//! bit-identical.
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`.

use deepport_core::backend::Backend;
use deepport_cpu::CpuRef;
use deepport_testkit::{ep, Harness};
use deepport_wgpu::{Wgpu, WgpuOptions};

fn cpu_ref() -> Harness {
    Harness::new("cpu-ref", |_| Ok(Box::new(CpuRef) as Box<dyn Backend>))
}

fn wgpu() -> Harness {
    Harness::new("wgpu", |_| {
        Ok(Box::new(Wgpu::with_options(WgpuOptions::default())?) as Box<dyn Backend>)
    })
}

#[test]
fn mixed_group_dispatch_and_combine_equal_cpu_ref_group() {
    ep::mixed_dispatch_and_combine(&cpu_ref(), &wgpu());
}

#[test]
fn mixed_group_low_latency_equals_cpu_ref_group() {
    ep::mixed_low_latency(&cpu_ref(), &wgpu());
}
