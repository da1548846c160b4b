//! wgpu-specific expert-parallel checks: one backend shared by all ranks
//! with split dispatches, and EP tensors beyond the storage binding limit
//! (processed in row windows). The cases and their judgement are the
//! generic suite's (`deepport_testkit::ep`), which also runs every EP op on
//! 2 and 4 wgpu ranks against cpu-ref ranks (`suite.rs`).
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`: then unavailability fails the test.

use deepport_core::backend::Backend;
use deepport_core::DType;
use deepport_cpu::CpuRef;
use deepport_testkit::ep::{
    assert_combined_close, assert_dispatch_eq, assert_ll_combined_close, assert_ll_eq,
    assert_same_bits, cpu_ranks, inputs, run_dispatch, run_layout, run_ll, Input, Payload,
};
use deepport_testkit::harness::available;
use deepport_wgpu::{Wgpu, WgpuOptions};
use std::sync::OnceLock;

const R: usize = 4;

fn make(opts: WgpuOptions) -> Option<Wgpu> {
    available("wgpu", Wgpu::with_options(opts))
}

/// R uncapped backends, shared by the tests (none leaves errors behind).
fn ranks() -> Option<Vec<&'static dyn Backend>> {
    static B: OnceLock<Option<Vec<Wgpu>>> = OnceLock::new();
    B.get_or_init(|| (0..R).map(|_| make(WgpuOptions::default())).collect())
        .as_ref()
        .map(|v| v.iter().map(|b| b as &dyn Backend).collect())
}

/// One backend shared by all four ranks (it is `Sync`), with dispatches
/// split over y and z (at most 8 workgroups per dimension).
#[test]
fn one_shared_backend_with_split_dispatches() {
    let Some(b) = make(WgpuOptions {
        max_workgroups_per_dim: Some(8),
        ..Default::default()
    }) else {
        return;
    };
    let bs: Vec<&dyn Backend> = vec![&b as &dyn Backend; R];
    let cpu = cpu_ranks(R);
    let all = inputs(&[300, 0, 40, 280], 131, true, 41);
    let c = Some((DType::BF16, DType::BF16));
    let got = run_dispatch(&bs, &all, Payload::Float(DType::BF16), 8, c).expect("wgpu runs EP");
    let want = run_dispatch(&cpu, &all, Payload::Float(DType::BF16), 8, c).expect("wgpu runs EP");
    assert_dispatch_eq(&got, &want, "shared, split");
    assert_combined_close(&got, &want, &all, "shared, split");
    let mut layout_ids = all[0].topk.clone();
    layout_ids.extend(&all[3].topk);
    let n = all[0].n + all[3].n;
    let g = run_layout(&b, &layout_ids, n, DType::I64).unwrap();
    let w = run_layout(&CpuRef, &layout_ids, n, DType::I64).unwrap();
    assert!(g.per_rank == w.per_rank && g.per_expert == w.per_expert && g.in_rank == w.in_rank);
    let all = inputs(&[10, 3, 0, 9], 256, false, 43);
    for fp8 in [None, Some(true)] {
        let got = run_ll(&bs, &all, DType::BF16, fp8, c).expect("wgpu runs EP");
        let want = run_ll(&cpu, &all, DType::BF16, fp8, c).expect("wgpu runs EP");
        assert_ll_eq(&got, &want, "shared, split");
        assert_ll_combined_close(&got, &want, "shared, split");
    }
}

/// With the storage binding limit capped (16 KiB; 64 KiB where a row's
/// alignment granule needs more), every EP tensor (inputs, outputs, send and
/// receive staging buffers) spans many bindings and is processed in row
/// windows: dispatch results still equal cpu-ref bit for bit, combines stay
/// as close to cpu-ref as uncapped, and equal the uncapped backend's bits.
#[test]
fn tensors_beyond_the_binding_limit_are_windowed() {
    let Some(full) = ranks() else { return };
    let cpu = cpu_ranks(R);
    for (cap, hidden, payload, combine) in [
        (
            16384u64,
            256,
            Payload::Float(DType::BF16),
            (DType::BF16, DType::BF16),
        ),
        (
            16384,
            128,
            Payload::Float(DType::F32),
            (DType::F32, DType::BF16),
        ),
        (
            65536,
            131,
            Payload::Float(DType::BF16),
            (DType::BF16, DType::F32),
        ),
        (65536, 384, Payload::Fp8, (DType::BF16, DType::BF16)),
    ] {
        let Some(b) = make(WgpuOptions {
            max_storage_binding: Some(cap),
            ..Default::default()
        }) else {
            return;
        };
        let bs: Vec<&dyn Backend> = vec![&b as &dyn Backend; R];
        let what = format!("cap {cap}, hidden {hidden}, {payload:?}, combine {combine:?}");
        let all = inputs(&[300, 0, 40, 280], hidden, true, 53 + hidden as u64);
        // FP8 codes include NaN codes: dispatched, not combined.
        let fp8_payload = matches!(payload, Payload::Fp8);
        let c = (!fp8_payload).then_some(combine);
        let got = run_dispatch(&bs, &all, payload, 4, c).expect("wgpu runs EP");
        let want = run_dispatch(&cpu, &all, payload, 4, c).expect("wgpu runs EP");
        assert_dispatch_eq(&got, &want, &what);
        if !fp8_payload {
            let same = run_dispatch(&full, &all, payload, 4, c).expect("wgpu runs EP");
            assert_combined_close(&got, &want, &all, &what);
            for (r, (g, s)) in got.iter().zip(&same).enumerate() {
                let what = format!("{what}, rank {r}, vs uncapped");
                assert_same_bits(g.combined.as_ref(), s.combined.as_ref(), &what);
            }
        }
        // The layout of all tokens (is_token_in_rank spans windows too).
        let mut ids = all[0].topk.clone();
        ids.extend(&all[3].topk);
        let n = all[0].n + all[3].n;
        for dt in [DType::I64, DType::I32] {
            let g = run_layout(&b, &ids, n, dt).unwrap();
            let w = run_layout(&CpuRef, &ids, n, dt).unwrap();
            assert!(
                g.per_rank == w.per_rank && g.per_expert == w.per_expert && g.in_rank == w.in_rank,
                "{what}: layout ({dt})"
            );
        }
        // Low latency: recv_x is [EPR, MAX_TOKENS·R, hidden].
        let xdt = match payload {
            Payload::Float(dt) => dt,
            Payload::Fp8 => DType::BF16,
        };
        let fp8 = fp8_payload.then_some(hidden == 384);
        let all = inputs(&[10, 3, 0, 9], hidden, false, 59 + hidden as u64);
        check_ll_windowed(&bs, &full, &all, xdt, fp8, combine, &what);
    }
}

/// Low-latency dispatch and combine on `bs` (a capped backend): equal to
/// cpu-ref as in the uncapped tests, combined bits equal to `full`'s.
fn check_ll_windowed(
    bs: &[&dyn Backend],
    full: &[&dyn Backend],
    all: &[Input],
    xdt: DType,
    fp8: Option<bool>,
    combine: (DType, DType),
    what: &str,
) {
    let c = Some(combine);
    let got = run_ll(bs, all, xdt, fp8, c).expect("wgpu runs EP");
    let want = run_ll(&cpu_ranks(R), all, xdt, fp8, c).expect("wgpu runs EP");
    let same = run_ll(full, all, xdt, fp8, c).expect("wgpu runs EP");
    assert_ll_eq(&got, &want, what);
    assert_ll_combined_close(&got, &want, what);
    for (r, (g, s)) in got.iter().zip(&same).enumerate() {
        let what = format!("{what}, rank {r}, low latency vs uncapped");
        assert_same_bits(g.combined.as_ref(), s.combined.as_ref(), &what);
    }
}

/// Low-latency records of 2 KiB under a 16 KiB limit: the received records
/// span several windows, so each window of recv_x rows is filled in passes
/// (one per window of records) that must merge, not overwrite. (The y rows
/// are bf16: one token's K = 4 f32 rows of 4 KiB would not fit 16 KiB.)
#[test]
fn low_latency_records_beyond_the_binding_limit_are_windowed() {
    let Some(full) = ranks() else { return };
    let Some(b) = make(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    let bs: Vec<&dyn Backend> = vec![&b as &dyn Backend; R];
    let all = inputs(&[10, 3, 0, 9], 1024, false, 61);
    for (xdt, fp8, combine) in [
        (DType::BF16, None, (DType::BF16, DType::BF16)),
        (DType::BF16, Some(false), (DType::BF16, DType::BF16)),
        (DType::F32, Some(true), (DType::BF16, DType::F32)),
    ] {
        let what = format!("hidden 1024, {xdt}, fp8 {fp8:?}, combine {combine:?}");
        check_ll_windowed(&bs, &full, &all, xdt, fp8, combine, &what);
    }
}
