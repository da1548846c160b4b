//! wgpu-specific checks: probing, device loss, driver errors, oversized
//! tensors, the storage binding limit (windows), split dispatches (more
//! than 65535 workgroups, capped workgroups per dimension), long batches
//! and deferred errors behind them. Every op against cpu-ref on small
//! adversarial inputs is the generic suite (`suite.rs`, deepport-testkit).
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`: then unavailability fails the test.

use deepport_core::backend::{Backend, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor};
use deepport_cpu::CpuRef;
use deepport_testkit::compare::{assert_bytes, assert_close, assert_index_error, ulp};
use deepport_testkit::harness::{self, available, down, host, poisoned, up};
use deepport_testkit::local::act_quant_inputs;
use deepport_testkit::Rng;
use deepport_wgpu::{Wgpu, WgpuOptions};
use std::sync::OnceLock;

/// This file's PRNG streams.
fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x1234_5678)
}

// ---- harness ------------------------------------------------------------------

/// A backend of its own (for tests whose errors must not leak into others);
/// `None` when wgpu is unavailable (and not required).
fn own(opts: WgpuOptions) -> Option<Wgpu> {
    available("wgpu", Wgpu::with_options(opts))
}

/// The backend shared by tests that cannot produce deferred errors.
fn shared() -> Option<&'static Wgpu> {
    static B: OnceLock<Option<Wgpu>> = OnceLock::new();
    B.get_or_init(|| own(WgpuOptions::default())).as_ref()
}

/// Runs `f` (which allocates poisoned outputs) on wgpu and on cpu-ref:
/// (got, want). wgpu runs every op.
fn both<F>(w: &Wgpu, inputs: &[&HostTensor], f: F) -> (Vec<HostTensor>, Vec<HostTensor>)
where
    F: Fn(&dyn Backend, &[Tensor]) -> Vec<Tensor>,
{
    harness::both(w, inputs, |b, t| Ok(f(b, t))).expect("wgpu runs every op")
}

// ---- backend basics -------------------------------------------------------------

#[test]
fn probe_and_info() {
    let Some(w) = shared() else { return };
    let info = w.info();
    assert_eq!(info.backend, "wgpu");
    assert!(!info.device.is_empty() && !info.driver.is_empty());
    eprintln!(
        "wgpu adapter: {} | driver: {} | vendor: {} | shader-f16: {} | workgroups/dim: {}",
        info.device,
        info.driver,
        info.vendor,
        w.has_shader_f16(),
        w.max_workgroups_per_dim()
    );
    let l = w.limits();
    eprintln!(
        "limits: max_buffer_size {} B, max_storage_buffer_binding_size {} B, \
         max_storage_buffers_per_shader_stage {}, workgroup storage {} B, \
         subgroup sizes {}..{}",
        l.max_buffer_size,
        l.max_storage_buffer_binding_size,
        l.max_storage_buffers_per_shader_stage,
        l.max_compute_workgroup_storage_size,
        w.adapter_info().subgroup_min_size,
        w.adapter_info().subgroup_max_size
    );
    let reg = {
        let mut r = deepport_core::registry::Registry::new();
        deepport_wgpu::register(&mut r);
        r
    };
    assert!(reg.create("wgpu").is_ok());
}

#[test]
fn supports_is_honest() {
    let Some(w) = shared() else { return };
    for k in [
        OpKind::ActQuant,
        OpKind::WeightDequant,
        OpKind::Gemm,
        OpKind::RmsNorm,
        OpKind::Rope,
        OpKind::MoeGate,
        OpKind::SiluMul,
        OpKind::Embedding,
        OpKind::Add,
        OpKind::CopyWindow,
    ] {
        assert_eq!(w.supports(k, &[DType::BF16]), Support::Supported, "{k}");
    }
    for k in [
        OpKind::Fp8Gemm,
        OpKind::Fp8GroupedContiguous,
        OpKind::Fp8GroupedMasked,
        OpKind::MlaDecode,
        OpKind::MlaPrefill,
        OpKind::GetDispatchLayout,
        OpKind::Dispatch,
        OpKind::Combine,
        OpKind::LowLatencyDispatch,
        OpKind::LowLatencyCombine,
    ] {
        if w.supports(k, &[]).is_supported() {
            continue; // implemented by now
        }
        if k == OpKind::Fp8Gemm {
            let a = up(w, &HostTensor::zeros(DType::F8E4M3, &[1, 128]));
            let sa = up(w, &HostTensor::zeros(DType::F32, &[1, 1]));
            let b = up(w, &HostTensor::zeros(DType::F8E4M3, &[1, 128]));
            let sb = up(w, &HostTensor::zeros(DType::F32, &[1, 1]));
            let mut d = poisoned(w, DType::F32, &[1, 1]);
            let e = run(
                w,
                Fp8Gemm {
                    a: &a,
                    sa: &sa,
                    b: &b,
                    sb: &sb,
                    d: &mut d,
                },
            )
            .unwrap_err();
            assert!(e.is_not_supported(), "{e}");
        }
    }
}

#[test]
fn roundtrip_odd_sizes_and_write() {
    let Some(w) = shared() else { return };
    for (dt, n) in [
        (DType::BF16, 3usize),
        (DType::F8E4M3, 5),
        (DType::F16, 1),
        (DType::F32, 7),
        (DType::I64, 3),
        (DType::Bool, 6),
        (DType::F32, 0),
    ] {
        let mut rng = rng(n as u64);
        let bytes: Vec<u8> = (0..n * dt.size()).map(|_| rng.next_u64() as u8).collect();
        let h = HostTensor::from_bytes(dt, &[n], bytes).unwrap();
        let mut t = up(w, &h);
        assert_eq!(down(w, &t).bytes(), h.bytes(), "{dt} x {n}");
        let bytes2: Vec<u8> = (0..n * dt.size()).map(|_| rng.next_u64() as u8).collect();
        let h2 = HostTensor::from_bytes(dt, &[n], bytes2).unwrap();
        w.write(&mut t, &h2).unwrap();
        assert_eq!(down(w, &t).bytes(), h2.bytes(), "{dt} x {n} after write");
        let z = w.alloc(dt, &[n]).unwrap();
        assert!(down(w, &z).bytes().iter().all(|&b| b == 0));
    }
    // A write after a recorded op must not be seen by that op.
    let a = up(w, &host(DType::F32, &[4], &[1.0, 2.0, 3.0, 4.0]));
    let mut b = up(w, &host(DType::F32, &[4], &[10.0; 4]));
    let mut out = poisoned(w, DType::F32, &[4]);
    run(
        w,
        Add {
            a: &a,
            b: &b,
            out: &mut out,
        },
    )
    .unwrap();
    w.write(&mut b, &host(DType::F32, &[4], &[100.0; 4]))
        .unwrap();
    assert_eq!(down(w, &out).to_f32_vec(), vec![11.0, 12.0, 13.0, 14.0]);
    // Wrong shape is an error, not a panic.
    assert!(w.write(&mut b, &host(DType::F32, &[3], &[0.0; 3])).is_err());
}

#[test]
fn foreign_tensors_are_errors() {
    let Some(w) = shared() else { return };
    let a = CpuRef.upload(&host(DType::F32, &[2], &[1.0, 2.0])).unwrap();
    let b = up(w, &host(DType::F32, &[2], &[1.0, 2.0]));
    let mut out = poisoned(w, DType::F32, &[2]);
    let e = run(
        w,
        Add {
            a: &a,
            b: &b,
            out: &mut out,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::ForeignTensor { .. }), "{e:?}");
    assert!(w.download(&a).is_err());
}

#[test]
fn shader_compile_error_is_an_error() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let bad = "struct Params { n: u32, }\n@compute @workgroup_size(1)\nfn main() { let x: u32 = undefined_thing + 1; }";
    let e = w.debug_compile("broken_kernel", bad).unwrap_err();
    match &e {
        Error::Device { backend, msg } => {
            assert_eq!(backend, "wgpu");
            assert!(msg.contains("broken_kernel"), "{msg}");
        }
        other => panic!("expected Error::Device, got {other:?}"),
    }
    let good =
        "struct Params { n: u32, }\n@compute @workgroup_size(1)\nfn main() { let x = P.n + 1u; }";
    w.debug_compile("good_kernel", good).unwrap();
    // The backend still works afterwards.
    let a = up(&w, &host(DType::F32, &[2], &[1.0, 2.0]));
    let mut out = poisoned(&w, DType::F32, &[2]);
    run(
        &w,
        Add {
            a: &a,
            b: &a,
            out: &mut out,
        },
    )
    .unwrap();
    assert_eq!(down(&w, &out).to_f32_vec(), vec![2.0, 4.0]);
}

#[test]
fn no_matching_adapter_is_unavailable() {
    // Runs even without any adapter: the probe must fail softly.
    match Wgpu::with_options(WgpuOptions {
        adapter: Some("no-such-adapter-anywhere".into()),
        ..Default::default()
    }) {
        Err(Error::Unavailable { backend, reason }) => {
            assert_eq!(backend, "wgpu");
            assert!(reason.contains("no-such-adapter-anywhere"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn no_vulkan_driver_is_unavailable() {
    // In a child process without any Vulkan driver (the loader finds no
    // ICD), creating the backend is `Unavailable` with a reason, not a panic.
    if std::env::var("DEEPPORT_WGPU_NO_DRIVER_CHILD").is_ok() {
        match Wgpu::new() {
            Err(Error::Unavailable { reason, .. }) => {
                println!("unavailable as expected: {reason}");
                return;
            }
            Err(other) => panic!("expected Unavailable, got {other:?}"),
            Ok(w) => {
                // A non-Vulkan adapter (Metal, DX12 builds) may still exist.
                println!("an adapter remains: {:?}", w.info());
                return;
            }
        }
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "no_vulkan_driver_is_unavailable", "--nocapture"])
        .env("DEEPPORT_WGPU_NO_DRIVER_CHILD", "1")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env_remove("DEEPPORT_WGPU_ADAPTER")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn device_loss_is_an_error() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let a = up(&w, &host(DType::F32, &[4], &[1.0; 4]));
    w.debug_lose_device();
    let mut out = w.alloc(DType::F32, &[4]);
    if let Ok(out) = out.as_mut() {
        let e = run(&w, Add { a: &a, b: &a, out }).unwrap_err();
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
    }
    for e in [
        out.err(),
        w.download(&a).err(),
        w.synchronize().err(),
        w.upload(&host(DType::F32, &[1], &[0.0])).err(),
    ] {
        match e {
            Some(Error::Device { backend, msg }) => {
                assert_eq!(backend, "wgpu");
                assert!(msg.contains("lost"), "{msg}");
            }
            other => panic!("expected a device-lost error, got {other:?}"),
        }
    }
}

#[test]
fn oversized_tensors_are_errors() {
    // A GEMM whose rows (20000 bytes) exceed the storage binding limit
    // (capped here to 16 KiB) is tiled, not refused: it must still compute
    // the right answer. Beyond max_buffer_size: a Device error naming it.
    let Some(w) = own(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    let a = up(&w, &host(DType::F32, &[2, 5000], &vec![1.0; 10_000]));
    let b = up(&w, &host(DType::F32, &[3, 5000], &vec![0.5; 15_000]));
    let mut d = w.alloc(DType::F32, &[2, 3]).unwrap();
    match run(
        &w,
        Gemm {
            a: &a,
            b: &b,
            d: &mut d,
        },
    ) {
        Ok(()) => assert_eq!(
            down(&w, &d).to_f32_vec(),
            vec![2500.0; 6],
            "tiled GEMM result"
        ),
        // An honest refusal must name the row size and the limit.
        Err(Error::NotSupported { op, reason, .. }) => {
            assert_eq!(op, "gemm");
            assert!(
                reason.contains("20000") && reason.contains("16384"),
                "{reason}"
            );
        }
        Err(other) => panic!("expected a result or NotSupported, got {other:?}"),
    }
    let e = w.alloc(DType::F32, &[1 << 62]).unwrap_err();
    assert!(matches!(e, Error::Device { .. }), "{e:?}");
    let e = w.alloc(DType::F32, &[1 << 40]).unwrap_err();
    match e {
        Error::Device { msg, .. } => assert!(msg.contains("max_buffer_size"), "{msg}"),
        other => panic!("expected Device, got {other:?}"),
    }
}

#[test]
fn every_op_beyond_the_binding_limit() {
    // With storage bindings capped at 16 KiB every tensor below is larger
    // than one binding: the ops must process them in windows (element, row
    // or table-row ranges) and still match the reference.
    let Some(w) = own(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    let mut rng = rng(13);
    let what = "windowed";
    // act_quant: x 200 × 128 bf16 (51 KiB).
    let x = host(
        DType::BF16,
        &[200, 128],
        &act_quant_inputs(&mut rng, 200, 128, 19),
    );
    act_quant_vs_ref(&w, what, &x, ScaleFmt::Ue8m0);
    // add and silu_mul over 10 001 elements.
    let a = host(DType::F32, &[10_001], &rng.normals(10_001, 2.0));
    let b2 = host(DType::BF16, &[10_001], &rng.normals(10_001, 1.0));
    silu_mul_and_add_vs_ref(&w, what, &a, &b2);
    // weight_dequant: 700 × 20 e4m3 → f32 (56 KiB out; 128-row units).
    let wq = host(DType::F8E4M3, &[700, 20], &rng.normals(14_000, 50.0));
    let sv: Vec<f32> = (0..6).map(|i| 1e-3 * (i + 1) as f32).collect();
    let ws = host(DType::F32, &[6, 1], &sv);
    weight_dequant_vs_ref(&w, what, &wq, &ws, DType::F32);
    // gemm: a 130 × 40 f32, b 300 × 40 bf16, d 130 × 300 bf16: ranges of
    // rows of a and d and of rows of b.
    let a = host(DType::F32, &[130, 40], &rng.normals(5200, 1.0));
    let bm = host(DType::BF16, &[300, 40], &rng.normals(12_000, 1.0));
    gemm_vs_ref(&w, what, &a, &bm);
    // rms_norm: 200 rows of 70.
    let xr = host(DType::F32, &[200, 70], &rng.normals(14_000, 1.0));
    let wr = host(DType::F32, &[70], &rng.normals(70, 1.0));
    rms_norm_vs_ref(&w, what, &xr, &wr);
    // embedding: a 100 × 77 f32 table (30 KiB) in row windows, odd dim, bf16 out.
    let table = host(DType::F32, &[100, 77], &rng.normals(7700, 1.0));
    let ids: Vec<i64> = (0..300).map(|i| (i * 37 % 100) as i64).collect();
    embedding_vs_ref(&w, what, &table, &HostTensor::from_i64(&[300], &ids));
    // copy_window: f32 200 × 77 → bf16 205 × 81.
    let src = host(DType::F32, &[200, 77], &rng.normals(200 * 77, 1.0));
    let dst0 = host(DType::BF16, &[205, 81], &rng.normals(205 * 81, 1.0));
    copy_window_vs_ref(&w, what, &src, &dst0, (198, 75));
    // rope: 90 tokens × 4 heads × 64, bf16.
    let xr = host(DType::BF16, &[90, 4, 64], &rng.normals(90 * 256, 1.0));
    let pv: Vec<i64> = (0..90).map(|i| i * 1000 + 7).collect();
    rope_vs_ref(&w, what, &xr, &HostTensor::from_i64(&[90], &pv));
    // moe_gate: 300 tokens.
    let xg = host(DType::F32, &[300, 32], &rng.normals(300 * 32, 1.0));
    let wg = host(DType::F32, &[16, 32], &rng.normals(16 * 32, 0.2));
    moe_gate_vs_ref(&w, what, &xg, &wg);
    // A check over several windows (39 KiB of f32) reports the global
    // position and value of the first bad element.
    let m = 78;
    let mut v = vec![1.0f32; m * 128];
    v[9_000] = f32::NAN;
    v[9_900] = f32::INFINITY;
    let xq = up(&w, &host(DType::F32, &[m, 128], &v));
    let mut q = poisoned(&w, DType::F8E4M3, &[m, 128]);
    let mut s = poisoned(&w, DType::F32, &[m, 1]);
    run(
        &w,
        ActQuant {
            x: &xq,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Float,
        },
    )
    .unwrap();
    match w.synchronize().unwrap_err() {
        Error::NonFinite {
            position, value, ..
        } => {
            assert_eq!(position, vec![9_000 / 128, 9_000 % 128]);
            assert!(value.is_nan());
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn long_batches_without_sync() {
    // 1100 dependent ops: several batch submissions and a wrap of the
    // parameter arena (1024 slots), all before the one download.
    let Some(w) = shared() else { return };
    let one = up(w, &host(DType::F32, &[3], &[1.0, 0.5, 0.25]));
    let mut acc = up(w, &host(DType::F32, &[3], &[0.0; 3]));
    for _ in 0..1100 {
        let mut next = w.alloc(DType::F32, &[3]).unwrap();
        run(
            w,
            Add {
                a: &acc,
                b: &one,
                out: &mut next,
            },
        )
        .unwrap();
        acc = next;
    }
    assert_eq!(down(w, &acc).to_f32_vec(), vec![1100.0, 550.0, 275.0]);
}

#[test]
fn add_beyond_65535_workgroups() {
    // 2^24 + 1000 f32 outputs at 256 per workgroup: 65540 workgroups, so the
    // dispatch is split over y. Compared with the host sum (f32 addition is
    // the one rounding cpu-ref makes for an f32 output).
    let Some(w) = shared() else { return };
    let n = (1usize << 24) + 1000;
    let mut rng = rng(8);
    let av: Vec<f32> = (0..n)
        .map(|i| (i % 1000) as f32 * 0.5 + rng.normal())
        .collect();
    let bv: Vec<f32> = (0..n).map(|i| (i / 1000) as f32).collect();
    let a = up(w, &host(DType::BF16, &[n], &av));
    let b = up(w, &host(DType::F32, &[n], &bv));
    let mut out = poisoned(w, DType::F32, &[n]);
    run(
        w,
        Add {
            a: &a,
            b: &b,
            out: &mut out,
        },
    )
    .unwrap();
    let got = down(w, &out).to_f32_vec();
    let ar = down(w, &a).to_f32_vec();
    for i in 0..n {
        let want = ar[i] + bv[i];
        assert_eq!(got[i].to_bits(), want.to_bits(), "element {i}");
    }
}

/// A device-side index error (an out-of-range token id in `embedding`) is
/// reported by the next `download` *or* `synchronize`, whatever is
/// downloaded and whatever was recorded in between: never lost, and
/// reported once. (`heavy.rs`'s `mla_decode_bad_indices_are_errors` does
/// the same for out-of-range block-table entries.)
#[test]
fn deferred_index_errors_are_reported_never_lost() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let table = up(
        &w,
        &host(
            DType::F32,
            &[4, 2],
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        ),
    );
    let bad = up(&w, &HostTensor::from_i64(&[3], &[1, 9, 2]));
    let one = up(&w, &host(DType::F32, &[2], &[1.0, 1.0]));
    let embed = |out: &mut Tensor| {
        run(
            &w,
            Embedding {
                table: &table,
                ids: &bad,
                out,
            },
        )
        .expect("the op call itself does not wait for the device")
    };
    let expect_bad = |e: Error, when: &str| {
        assert_index_error(when, e, ("embedding", "ids"), &[1], 9, Some("[0, 4)"))
    };
    let mut out = poisoned(&w, DType::F32, &[3, 2]);

    // 1. At the next synchronize; then nothing stale.
    embed(&mut out);
    expect_bad(w.synchronize().unwrap_err(), "synchronize");
    w.synchronize().expect("reported once");

    // 2. At the next download, even of a tensor the op did not touch.
    embed(&mut out);
    expect_bad(w.download(&one).unwrap_err(), "download of another tensor");
    assert_eq!(down(&w, &one).to_f32_vec(), vec![1.0, 1.0]);

    // 3. Behind a long batch (submitted without waiting, parameter arena
    //    wrapped) and a write: still reported at the next synchronize.
    embed(&mut out);
    let mut acc = up(&w, &host(DType::F32, &[2], &[0.0, 0.0]));
    for _ in 0..1100 {
        let mut next = w.alloc(DType::F32, &[2]).unwrap();
        run(
            &w,
            Add {
                a: &acc,
                b: &one,
                out: &mut next,
            },
        )
        .unwrap();
        acc = next;
    }
    let mut spare = w.alloc(DType::F32, &[2]).unwrap();
    w.write(&mut spare, &host(DType::F32, &[2], &[3.0, 4.0]))
        .expect("a write does not settle the batch");
    expect_bad(
        w.synchronize().unwrap_err(),
        "synchronize after 1100 ops and a write",
    );
    assert_eq!(down(&w, &acc).to_f32_vec(), vec![1100.0, 1100.0]);
    assert_eq!(down(&w, &spare).to_f32_vec(), vec![3.0, 4.0]);

    // 4. More checking ops than status slots before any wait: the earlier
    //    ops are settled when the slots run out, and the error comes back
    //    from that op call rather than being dropped.
    embed(&mut out);
    let good = up(&w, &HostTensor::from_i64(&[3], &[0, 1, 2]));
    let mut settled = None;
    for i in 0..1100 {
        let res = run(
            &w,
            Embedding {
                table: &table,
                ids: &good,
                out: &mut out,
            },
        );
        if let Err(e) = res {
            settled = Some((i, e));
            break;
        }
    }
    match settled {
        Some((_, e)) => expect_bad(e, "op call that ran out of status slots"),
        None => expect_bad(
            w.synchronize().unwrap_err(),
            "synchronize after 1100 checks",
        ),
    }
    w.synchronize().expect("reported once");
    assert_eq!(
        down(&w, &out).to_f32_vec(),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
}

// ---- split dispatches on small problems ------------------------------------------------

#[test]
fn every_op_with_split_dispatches() {
    // At most 4 workgroups per dimension: dispatches of 5–16 workgroups are
    // split over y, 17–64 over y and z, and extra workgroups must do nothing.
    let Some(w) = own(WgpuOptions {
        max_workgroups_per_dim: Some(4),
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(w.max_workgroups_per_dim(), 4);
    let mut rng = rng(12);
    let what = "split";
    // act_quant: 10 × 3 = 30 workgroups.
    let x = host(
        DType::BF16,
        &[10, 384],
        &act_quant_inputs(&mut rng, 10, 384, 19),
    );
    act_quant_vs_ref(&w, what, &x, ScaleFmt::Float);
    // gemm: 3 × 5 = 15 tiles.
    let a = host(DType::F32, &[130, 40], &rng.normals(130 * 40, 1.0));
    let bm = host(DType::BF16, &[300, 40], &rng.normals(300 * 40, 1.0));
    gemm_vs_ref(&w, what, &a, &bm);
    // rms_norm: 50 rows (50 workgroups → 4 × 4 × 4).
    let xr = host(DType::F32, &[50, 70], &rng.normals(3500, 1.0));
    let wr = host(DType::F32, &[70], &rng.normals(70, 1.0));
    rms_norm_vs_ref(&w, what, &xr, &wr);
    // Elementwise ops over 5000 elements (≥ 10 workgroups).
    let a = host(DType::F32, &[5000], &rng.normals(5000, 2.0));
    let b2 = host(DType::BF16, &[5000], &rng.normals(5000, 1.0));
    silu_mul_and_add_vs_ref(&w, what, &a, &b2);
    // weight_dequant, embedding, copy_window, rope, moe_gate.
    let wq = host(DType::F8E4M3, &[100, 100], &rng.normals(10_000, 50.0));
    let ws = host(DType::F32, &[1, 1], &[0.01]);
    weight_dequant_vs_ref(&w, what, &wq, &ws, DType::BF16);
    let table = host(DType::F32, &[40, 77], &rng.normals(40 * 77, 1.0));
    let ids: Vec<i64> = (0..30).map(|i| (i * 7 % 40) as i64).collect();
    embedding_vs_ref(&w, what, &table, &HostTensor::from_i64(&[30], &ids));
    let src = host(DType::F32, &[40, 77], &rng.normals(40 * 77, 1.0));
    let dst0 = host(DType::BF16, &[45, 81], &rng.normals(45 * 81, 1.0));
    copy_window_vs_ref(&w, what, &src, &dst0, (38, 75));
    let xr = host(DType::BF16, &[9, 4, 64], &rng.normals(9 * 256, 1.0));
    let pos = HostTensor::from_i64(&[9], &[0, 1, 2, 100, 1000, 4095, 4096, 70_000, 9]);
    rope_vs_ref(&w, what, &xr, &pos);
    let xg = host(DType::F32, &[13, 32], &rng.normals(13 * 32, 1.0));
    let wg = host(DType::F32, &[16, 32], &rng.normals(16 * 32, 0.2));
    moe_gate_vs_ref(&w, what, &xg, &wg);
}

// ---- every op on one configuration (the limit tests above) ------------------------

/// `act_quant` of `x` ([m, k]) matches cpu-ref bit for bit.
fn act_quant_vs_ref(w: &Wgpu, what: &str, x: &HostTensor, scale_fmt: ScaleFmt) {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let (g, r) = both(w, &[x], |b, t| {
        let mut q = poisoned(b, DType::F8E4M3, &[m, k]);
        let mut s = poisoned(b, DType::F32, &[m, k / 128]);
        run(
            b,
            ActQuant {
                x: &t[0],
                q: &mut q,
                s: &mut s,
                scale_fmt,
            },
        )
        .unwrap();
        vec![q, s]
    });
    assert_bytes(&format!("{what} act_quant q"), &g[0], &r[0]);
    assert_bytes(&format!("{what} act_quant s"), &g[1], &r[1]);
}

/// `silu_mul` (bf16 out, 1 ulp) and `add` (f32 out, exact) of `a` and `b`.
fn silu_mul_and_add_vs_ref(w: &Wgpu, what: &str, a: &HostTensor, b2: &HostTensor) {
    let shape = a.shape().to_vec();
    let (g, r) = both(w, &[a, b2], |b, t| {
        let mut o1 = poisoned(b, DType::BF16, &shape);
        let mut o2 = poisoned(b, DType::F32, &shape);
        run(
            b,
            SiluMul {
                gate: &t[0],
                up: &t[1],
                out: &mut o1,
            },
        )
        .unwrap();
        run(
            b,
            Add {
                a: &t[0],
                b: &t[1],
                out: &mut o2,
            },
        )
        .unwrap();
        vec![o1, o2]
    });
    assert_close(&format!("{what} silu_mul"), &g[0], &r[0], |_, v| {
        ulp(DType::BF16, v)
    });
    assert_bytes(&format!("{what} add"), &g[1], &r[1]);
}

/// `weight_dequant` of `wq` with scales `ws` to `out`, exact.
fn weight_dequant_vs_ref(w: &Wgpu, what: &str, wq: &HostTensor, ws: &HostTensor, out: DType) {
    let shape = wq.shape().to_vec();
    let (g, r) = both(w, &[wq, ws], |b, t| {
        let mut o = poisoned(b, out, &shape);
        run(
            b,
            WeightDequant {
                w: &t[0],
                s: &t[1],
                out: &mut o,
            },
        )
        .unwrap();
        vec![o]
    });
    assert_bytes(&format!("{what} weight_dequant"), &g[0], &r[0]);
}

/// `gemm` of `a` ([m, k]) and `bm` ([n, k]) to bf16.
fn gemm_vs_ref(w: &Wgpu, what: &str, a: &HostTensor, bm: &HostTensor) {
    let (m, n) = (a.shape()[0], bm.shape()[0]);
    let (g, r) = both(w, &[a, bm], |b, t| {
        let mut d = poisoned(b, DType::BF16, &[m, n]);
        run(
            b,
            Gemm {
                a: &t[0],
                b: &t[1],
                d: &mut d,
            },
        )
        .unwrap();
        vec![d]
    });
    assert_close(&format!("{what} gemm"), &g[0], &r[0], |_, v| {
        ulp(DType::BF16, v) + 1e-4
    });
}

/// `rms_norm` of `xr` with weight `wr` to bf16.
fn rms_norm_vs_ref(w: &Wgpu, what: &str, xr: &HostTensor, wr: &HostTensor) {
    let shape = xr.shape().to_vec();
    let (g, r) = both(w, &[xr, wr], |b, t| {
        let mut y = poisoned(b, DType::BF16, &shape);
        run(
            b,
            RmsNorm {
                x: &t[0],
                weight: &t[1],
                y: &mut y,
                eps: 1e-6,
            },
        )
        .unwrap();
        vec![y]
    });
    assert_close(&format!("{what} rms_norm"), &g[0], &r[0], |_, v| {
        ulp(DType::BF16, v)
    });
}

/// `embedding` of the ids `idt` in `table` to bf16, exact.
fn embedding_vs_ref(w: &Wgpu, what: &str, table: &HostTensor, idt: &HostTensor) {
    let shape = [idt.shape()[0], table.shape()[1]];
    let (g, r) = both(w, &[table, idt], |b, t| {
        let mut o = poisoned(b, DType::BF16, &shape);
        run(
            b,
            Embedding {
                table: &t[0],
                ids: &t[1],
                out: &mut o,
            },
        )
        .unwrap();
        vec![o]
    });
    assert_bytes(&format!("{what} embedding"), &g[0], &r[0]);
}

/// `copy_window` of a `size` window of `src` at (1, 2) into `dst0` at (3, 1).
fn copy_window_vs_ref(
    w: &Wgpu,
    what: &str,
    src: &HostTensor,
    dst0: &HostTensor,
    size: (usize, usize),
) {
    let go = |b: &dyn Backend| {
        let s = up(b, src);
        let mut d = up(b, dst0);
        run(
            b,
            CopyWindow {
                src: &s,
                dst: &mut d,
                src_origin: (1, 2),
                dst_origin: (3, 1),
                size,
            },
        )
        .unwrap();
        down(b, &d)
    };
    assert_bytes(&format!("{what} copy_window"), &go(w), &go(&CpuRef));
}

/// `rope` (default config) of `xr` at `pos`, bf16.
fn rope_vs_ref(w: &Wgpu, what: &str, xr: &HostTensor, pos: &HostTensor) {
    let shape = xr.shape().to_vec();
    let (g, r) = both(w, &[xr, pos], |b, t| {
        let mut y = poisoned(b, DType::BF16, &shape);
        run(
            b,
            Rope {
                x: &t[0],
                positions: &t[1],
                y: &mut y,
                config: RopeConfig::default(),
            },
        )
        .unwrap();
        vec![y]
    });
    assert_close(&format!("{what} rope"), &g[0], &r[0], |_, v| {
        ulp(DType::BF16, v) + 1e-6
    });
}

/// `moe_gate` (16 experts in 4 groups, top-2 groups, top-4) of `xg`.
fn moe_gate_vs_ref(w: &Wgpu, what: &str, xg: &HostTensor, wg: &HostTensor) {
    let tokens = xg.shape()[0];
    let (g, r) = both(w, &[xg, wg], |b, t| {
        let mut idx = poisoned(b, DType::I32, &[tokens, 4]);
        let mut wts = poisoned(b, DType::F32, &[tokens, 4]);
        run(
            b,
            MoeGate {
                x: &t[0],
                weight: &t[1],
                bias: None,
                topk_idx: &mut idx,
                topk_weights: &mut wts,
                n_group: 4,
                topk_group: 2,
                topk: 4,
                route_scale: 1.0,
            },
        )
        .unwrap();
        vec![idx, wts]
    });
    assert_eq!(
        g[0].to_i64_vec(),
        r[0].to_i64_vec(),
        "{what} moe_gate experts"
    );
    assert_close(&format!("{what} moe_gate weights"), &g[1], &r[1], |_, _| {
        1e-6
    });
}
