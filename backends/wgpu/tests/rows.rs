//! `gather_rows` and `reduce_rows` with the storage binding limit capped
//! (16 KiB): tensors span many bindings and are processed in row windows.
//! Judged as in the generic suite (`deepport_testkit::rows`): gather bit for
//! bit with cpu-ref, reduce within SPEC §7 of cpu-ref and bit-identical to
//! the uncapped backend, on whole tensors and on views.
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`.

use deepport_testkit::harness::available;
use deepport_testkit::rows::{check_gather_rows, check_reduce_rows};
use deepport_wgpu::{Wgpu, WgpuOptions};

fn capped() -> Option<Wgpu> {
    available(
        "wgpu",
        Wgpu::with_options(WgpuOptions {
            max_storage_binding: Some(16384),
            ..Default::default()
        }),
    )
}

#[test]
fn gather_rows_beyond_the_binding_limit_is_bit_exact() {
    let Some(c) = capped() else { return };
    assert!(check_gather_rows(&c, true, "wgpu capped"));
}

#[test]
fn reduce_rows_beyond_the_binding_limit_matches_uncapped_bits() {
    let Some(c) = capped() else { return };
    let Some(full) = available("wgpu", Wgpu::with_options(WgpuOptions::default())) else {
        return;
    };
    assert!(check_reduce_rows(&c, Some(&full), true, "wgpu capped"));
}
