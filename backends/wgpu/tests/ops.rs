//! The wgpu backend against the CPU reference (`cpu-ref`), op by op.
//!
//! Inputs come from a deterministic PRNG and include the edge cases that
//! break GPU kernels: partial workgroups and tiles, rows longer than a
//! workgroup, more than 65535 workgroups, odd sizes of packed 16-bit
//! outputs, NaN/inf propagation, out-of-range indices.
//!
//! Tolerances (r = cpu-ref's value, computed in f64 and rounded once):
//! * exact (bytes): act_quant (q and s), embedding, copy_window,
//!   weight_dequant, add;
//! * gemm: `|d − r| ≤ ulp_out(r) + k·2⁻²⁴·Σ|a·b|` (f32 accumulation bound);
//! * rms_norm, silu_mul: 1 ulp of 16-bit outputs, 4 ulp of f32 outputs;
//! * rope: 1 ulp of the output + 2⁻²¹·(|x₀| + |x₁|) (f32 sin/cos/angle);
//! * moe_gate: the same experts in the same order, weights within 1e-6 ·
//!   route_scale (except tokens on a near tie, which SPEC §6 excuses).
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`: then unavailability fails the test.

use deepport_core::backend::{Backend, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor};
use deepport_cpu::CpuRef;
use deepport_wgpu::{Wgpu, WgpuOptions};

mod common;
use common::{assert_index_error, both, down, host, make, poisoned, shared, ulp, up, Rng};

/// This file's PRNG streams.
fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x1234_5678)
}

// ---- harness ------------------------------------------------------------------

/// A backend of its own (for tests whose errors must not leak into others).
fn own(opts: WgpuOptions) -> Option<Wgpu> {
    make(opts)
}

/// Elementwise comparison: NaN positions and infinities must match exactly;
/// finite values within `tol(index, reference)`.
fn assert_close(
    what: &str,
    got: &HostTensor,
    want: &HostTensor,
    tol: impl Fn(usize, f32) -> f64,
) -> f64 {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let g = got.to_f32_vec();
    let r = want.to_f32_vec();
    let mut worst = 0f64;
    for i in 0..r.len() {
        let (a, b) = (g[i], r[i]);
        if b.is_nan() || a.is_nan() {
            assert!(
                a.is_nan() && b.is_nan(),
                "{what}[{i}]: got {a}, want {b} (NaN mismatch)"
            );
            continue;
        }
        if b.is_infinite() || a.is_infinite() {
            assert_eq!(a, b, "{what}[{i}]: infinities differ");
            continue;
        }
        let err = (a as f64 - b as f64).abs();
        let t = tol(i, b);
        assert!(
            err <= t,
            "{what}[{i}]: got {a}, want {b}, error {err:e} > tolerance {t:e}"
        );
        if t > 0.0 {
            worst = worst.max(err / t);
        }
    }
    worst
}

fn assert_bytes(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    if got.bytes() != want.bytes() {
        let size = got.dtype().size();
        let (g, r) = (got.bytes(), want.bytes());
        let i = (0..g.len()).find(|&i| g[i] != r[i]).unwrap_or(0) / size;
        panic!(
            "{what}: element {i} differs: got {:02x?}, want {:02x?} ({} vs {})",
            &g[i * size..(i + 1) * size],
            &r[i * size..(i + 1) * size],
            got.to_f32_vec()[i],
            want.to_f32_vec()[i],
        );
    }
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
        let bytes: Vec<u8> = (0..n * dt.size()).map(|_| rng.next() as u8).collect();
        let h = HostTensor::from_bytes(dt, &[n], bytes).unwrap();
        let mut t = up(w, &h);
        assert_eq!(down(w, &t).bytes(), h.bytes(), "{dt} x {n}");
        let bytes2: Vec<u8> = (0..n * dt.size()).map(|_| rng.next() as u8).collect();
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

// ---- running an op on both backends ------------------------------------------------

// ---- act_quant ------------------------------------------------------------------

/// `max_exp` bounds the spread so that f16 inputs stay finite.
fn act_quant_inputs(rng: &mut Rng, m: usize, k: usize, max_exp: i32) -> Vec<f32> {
    let mut v = rng.normals(m * k, 3.0);
    // Edge rows: zeros (amax clamps to 1e-4), tiny values and −0, huge
    // values and outliers, then magnitudes spread over 2^-30 … 2^20 so that
    // quotients land on every FP8 binade, including subnormals and
    // saturation.
    v[..k].fill(0.0);
    if m > 1 {
        for (j, x) in v[k..2 * k].iter_mut().enumerate() {
            *x = if j % 2 == 0 { 3e-5 } else { -0.0 };
        }
    }
    if m > 2 {
        for (j, x) in v[2 * k..3 * k].iter_mut().enumerate() {
            *x = if j % 128 == 7 {
                -3.0e4
            } else {
                (j as f32 - 64.0) * 11.0
            };
        }
    }
    for r in 3..m {
        for x in &mut v[r * k..(r + 1) * k] {
            let e = (rng.below((max_exp + 31) as u64) as i32) - 30;
            *x *= 2f32.powi(e) * if rng.below(7) == 0 { 1e-3 } else { 1.0 };
        }
    }
    v
}

#[test]
fn act_quant_is_bit_exact() {
    let Some(w) = shared() else { return };
    let mut rng = rng(1);
    for (m, k, xd, qd, sf) in [
        (
            37usize,
            256usize,
            DType::BF16,
            DType::F8E4M3,
            ScaleFmt::Float,
        ),
        (5, 384, DType::F32, DType::F8E4M3, ScaleFmt::Ue8m0),
        (9, 128, DType::F16, DType::F8E4M3Fnuz, ScaleFmt::Float),
        (4, 256, DType::F32, DType::F8E4M3Fnuz, ScaleFmt::Ue8m0),
        (300, 1024, DType::F32, DType::F8E4M3, ScaleFmt::Float),
        (64, 512, DType::BF16, DType::F8E4M3Fnuz, ScaleFmt::Ue8m0),
    ] {
        let max_exp = if xd == DType::F16 { 10 } else { 19 };
        let x = host(xd, &[m, k], &act_quant_inputs(&mut rng, m, k, max_exp));
        let (got, want) = both(w, &[&x], |b, t| {
            let mut q = poisoned(b, qd, &[m, k]);
            let mut s = poisoned(b, DType::F32, &[m, k / 128]);
            run(
                b,
                ActQuant {
                    x: &t[0],
                    q: &mut q,
                    s: &mut s,
                    scale_fmt: sf,
                },
            )
            .unwrap();
            vec![q, s]
        });
        let id = format!("act_quant(m={m},k={k},{xd}->{qd},{sf:?})");
        assert_bytes(&format!("{id}.q"), &got[0], &want[0]);
        assert_bytes(&format!("{id}.s"), &got[1], &want[1]);
    }
}

#[test]
fn act_quant_rejects_non_finite_input() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let mut v = vec![1.0f32; 2 * 256];
    v[300] = f32::INFINITY;
    v[400] = f32::NAN;
    let x = up(&w, &host(DType::F32, &[2, 256], &v));
    let mut q = poisoned(&w, DType::F8E4M3, &[2, 256]);
    let mut s = poisoned(&w, DType::F32, &[2, 2]);
    run(
        &w,
        ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Float,
        },
    )
    .unwrap();
    match w.download(&q).unwrap_err() {
        Error::NonFinite {
            op,
            arg,
            position,
            value,
        } => {
            assert_eq!((op, arg), ("act_quant", "x"));
            assert_eq!(position, vec![1, 44]);
            assert_eq!(value, f64::INFINITY);
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // The error is reported once; the backend keeps working.
    w.synchronize().unwrap();
}

// ---- weight_dequant ------------------------------------------------------------

#[test]
fn weight_dequant_is_exact() {
    let Some(w) = shared() else { return };
    let mut rng = rng(2);
    for (n, k, wd, od) in [
        (300usize, 200usize, DType::F8E4M3, DType::BF16),
        (130, 257, DType::F8E4M3Fnuz, DType::F32),
        (129, 131, DType::F8E4M3, DType::F16),
        (1, 1, DType::F8E4M3, DType::BF16),
    ] {
        let mut wv = rng.normals(n * k, 64.0);
        wv[0] = f32::NAN; // the FP8 NaN code decodes to NaN
        let wt = host(wd, &[n, k], &wv);
        let sv: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128))
            .map(|_| (0.25 + rng.uniform() as f32 * 1.75) * 1e-3)
            .collect();
        let st = host(DType::F32, &[n.div_ceil(128), k.div_ceil(128)], &sv);
        let (got, want) = both(w, &[&wt, &st], |b, t| {
            let mut out = poisoned(b, od, &[n, k]);
            run(
                b,
                WeightDequant {
                    w: &t[0],
                    s: &t[1],
                    out: &mut out,
                },
            )
            .unwrap();
            vec![out]
        });
        assert_bytes(
            &format!("weight_dequant(n={n},k={k},{wd}->{od})"),
            &got[0],
            &want[0],
        );
    }
}

// ---- gemm -------------------------------------------------------------------------

#[test]
fn gemm_matches_reference() {
    let Some(w) = shared() else { return };
    let mut rng = rng(3);
    for (m, n, k, ad, bd, od) in [
        (
            33usize,
            70usize,
            100usize,
            DType::F32,
            DType::F32,
            DType::F32,
        ),
        (17, 40, 64, DType::BF16, DType::BF16, DType::BF16),
        (65, 131, 200, DType::F16, DType::F16, DType::F32),
        (130, 67, 33, DType::BF16, DType::F32, DType::BF16),
        (3, 5, 1000, DType::F32, DType::BF16, DType::F16),
        (1, 129, 7, DType::BF16, DType::BF16, DType::BF16),
        (4, 3, 0, DType::F32, DType::F32, DType::BF16),
    ] {
        let av = rng.normals(m * k, 1.0);
        let bv = rng.normals(n * k, 1.0);
        let a = host(ad, &[m, k], &av);
        let b = host(bd, &[n, k], &bv);
        let (got, want) = both(w, &[&a, &b], |be, t| {
            let mut d = poisoned(be, od, &[m, n]);
            run(
                be,
                Gemm {
                    a: &t[0],
                    b: &t[1],
                    d: &mut d,
                },
            )
            .unwrap();
            vec![d]
        });
        // Σ|a·b| per output, from the rounded inputs.
        let (ar, br) = (a.to_f32_vec(), b.to_f32_vec());
        let gamma = k as f64 * 2f64.powi(-24);
        let worst = assert_close(
            &format!("gemm(m={m},n={n},k={k},{ad}x{bd}->{od})"),
            &got[0],
            &want[0],
            |i, r| {
                let (row, col) = (i / n, i % n);
                let s: f64 = (0..k)
                    .map(|kk| (ar[row * k + kk] as f64 * br[col * k + kk] as f64).abs())
                    .sum();
                ulp(od, r) + gamma * s
            },
        );
        eprintln!("gemm(m={m},n={n},k={k},{ad}x{bd}->{od}): worst error / tolerance = {worst:.3}");
    }
}

// ---- rms_norm ---------------------------------------------------------------------

#[test]
fn rms_norm_matches_reference() {
    let Some(w) = shared() else { return };
    let mut rng = rng(4);
    for (rows, dim, xd, wd, yd, eps) in [
        (
            7usize,
            300usize,
            DType::BF16,
            DType::F32,
            DType::BF16,
            1e-6f32,
        ),
        (12, 64, DType::F32, DType::BF16, DType::F32, 1e-5),
        (3, 7168, DType::F32, DType::F32, DType::F32, 1e-6),
        (5, 513, DType::F16, DType::F16, DType::F16, 1e-6),
        (70_000, 3, DType::BF16, DType::BF16, DType::BF16, 1e-6),
    ] {
        let mut xv = rng.normals(rows * dim, 2.0);
        xv[dim..2 * dim].fill(0.0); // a zero row: y = 0
        if rows > 3 {
            xv[2 * dim + 1] = f32::NAN; // a NaN row stays NaN
            xv[3 * dim] = f32::INFINITY; // inf → inv = 0 → NaN there, 0 elsewhere
        }
        let x = host(xd, &[rows, dim], &xv);
        let wt = host(wd, &[dim], &rng.normals(dim, 1.0));
        let (got, want) = both(w, &[&x, &wt], |b, t| {
            let mut y = poisoned(b, yd, &[rows, dim]);
            run(
                b,
                RmsNorm {
                    x: &t[0],
                    weight: &t[1],
                    y: &mut y,
                    eps,
                },
            )
            .unwrap();
            vec![y]
        });
        let ulps = if yd == DType::F32 { 4.0 } else { 1.0 };
        let worst = assert_close(
            &format!("rms_norm(rows={rows},dim={dim},{xd},{wd}->{yd})"),
            &got[0],
            &want[0],
            |_, r| ulps * ulp(yd, r),
        );
        eprintln!("rms_norm(rows={rows},dim={dim},->{yd}): worst error / tolerance = {worst:.3}");
    }
}

// ---- rope ---------------------------------------------------------------------------

fn yarn(factor: f32, theta: f32, mscale: f32, beta: (f32, f32)) -> RopeConfig {
    RopeConfig {
        theta,
        yarn: Some(Yarn {
            factor,
            original_max_position_embeddings: 4096,
            beta_fast: beta.0,
            beta_slow: beta.1,
            mscale,
            mscale_all_dim: 1.0,
        }),
    }
}

#[test]
fn rope_matches_reference() {
    let Some(w) = shared() else { return };
    let mut rng = rng(5);
    type Case = (Vec<usize>, DType, DType, DType, Vec<i64>, RopeConfig);
    let cases: Vec<Case> = vec![
        (
            vec![6, 3, 64],
            DType::BF16,
            DType::BF16,
            DType::I64,
            vec![0, 1, 2, 3, 17, 4095],
            RopeConfig::default(),
        ),
        (
            vec![5, 2, 64],
            DType::F32,
            DType::F32,
            DType::I32,
            vec![0, 1, 4096, 70_000, 163_839],
            yarn(40.0, 10000.0, 1.0, (32.0, 1.0)),
        ),
        (
            vec![4, 64],
            DType::F32,
            DType::F32,
            DType::I64,
            vec![3, 999, 12_345, 65_535],
            yarn(8.0, 50000.0, 0.707, (16.0, 2.0)),
        ),
        (
            // Huge positions: exact i64 → f32 rounding, far range reduction.
            vec![6, 3, 128],
            DType::F32,
            DType::F32,
            DType::I64,
            vec![
                16_777_217,
                123_456_789,
                1 << 31,
                3_000_000_000,
                (1 << 40) + 12345,
                1 << 62,
            ],
            RopeConfig::default(),
        ),
        (
            vec![3, 129, 8],
            DType::F16,
            DType::BF16,
            DType::I32,
            vec![7, 100_000, 2_000_000_000],
            RopeConfig {
                theta: 500.0,
                yarn: None,
            },
        ),
    ];
    for (shape, xd, yd, pd, pos, cfg) in cases {
        let n: usize = shape.iter().product();
        let xv = rng.normals(n, 1.0);
        let x = host(xd, &shape, &xv);
        let p = HostTensor::from_index(pd, &[shape[0]], &pos);
        let (got, want) = both(w, &[&x, &p], |b, t| {
            let mut y = poisoned(b, yd, &shape);
            run(
                b,
                Rope {
                    x: &t[0],
                    positions: &t[1],
                    y: &mut y,
                    config: cfg,
                },
            )
            .unwrap();
            vec![y]
        });
        let xr = x.to_f32_vec();
        let worst = assert_close(
            &format!("rope({shape:?},{xd}->{yd},{pd})"),
            &got[0],
            &want[0],
            |i, r| {
                let j = i & !1;
                ulp(yd, r) + 2f64.powi(-21) * (xr[j].abs() + xr[j + 1].abs()) as f64
            },
        );
        // In f32 ulps of the reference, for the report.
        let g = got[0].to_f32_vec();
        let r = want[0].to_f32_vec();
        let max_ulps = g
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b as f64).abs() / ulp(DType::F32, b))
            .fold(0f64, f64::max);
        let max_abs = g
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "rope({shape:?},{xd}->{yd}): worst error / tolerance = {worst:.3}, \
             max abs error {max_abs:e} ({max_ulps:.1} f32 ulps of the reference)"
        );
    }
}

#[test]
fn rope_rejects_negative_positions() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let x = up(&w, &host(DType::F32, &[3, 4], &[1.0; 12]));
    let p = up(&w, &HostTensor::from_i64(&[3], &[0, 5, -2]));
    let mut y = poisoned(&w, DType::F32, &[3, 4]);
    run(
        &w,
        Rope {
            x: &x,
            positions: &p,
            y: &mut y,
            config: RopeConfig::default(),
        },
    )
    .unwrap();
    assert_index_error(
        "rope",
        w.synchronize().unwrap_err(),
        ("rope", "positions"),
        &[2],
        -2,
        None,
    );
}

// ---- silu_mul, add -------------------------------------------------------------------

#[test]
fn silu_mul_matches_reference() {
    let Some(w) = shared() else { return };
    let mut rng = rng(6);
    for (shape, gd, ud, od) in [
        (
            vec![9usize, 200usize],
            DType::BF16,
            DType::BF16,
            DType::BF16,
        ),
        (vec![1000], DType::F32, DType::F32, DType::F32),
        (vec![3, 333], DType::F16, DType::F32, DType::F16),
        (vec![20_001], DType::F32, DType::BF16, DType::F32),
    ] {
        let n: usize = shape.iter().product();
        let mut gv = rng.normals(n, 4.0);
        gv[..8].copy_from_slice(&[
            -100.0,
            -88.5,
            -20.0,
            20.0,
            88.5,
            100.0,
            f32::NAN,
            f32::INFINITY,
        ]);
        gv[8] = f32::NEG_INFINITY;
        let g = host(gd, &shape, &gv);
        let u = host(ud, &shape, &rng.normals(n, 1.0));
        let (got, want) = both(w, &[&g, &u], |b, t| {
            let mut out = poisoned(b, od, &shape);
            run(
                b,
                SiluMul {
                    gate: &t[0],
                    up: &t[1],
                    out: &mut out,
                },
            )
            .unwrap();
            vec![out]
        });
        let ulps = if od == DType::F32 { 4.0 } else { 1.0 };
        // 1e-37: a subnormal result may be flushed to zero on the device.
        let worst = assert_close(
            &format!("silu_mul({shape:?},{gd},{ud}->{od})"),
            &got[0],
            &want[0],
            |_, r| ulps * ulp(od, r) + 1e-37,
        );
        eprintln!("silu_mul({shape:?}->{od}): worst error / tolerance = {worst:.3}");
    }
}

#[test]
fn add_is_exact() {
    let Some(w) = shared() else { return };
    let mut rng = rng(7);
    for (shape, ad, bd, od) in [
        (
            vec![13usize, 70usize],
            DType::BF16,
            DType::BF16,
            DType::BF16,
        ),
        (vec![50], DType::BF16, DType::F32, DType::F32),
        (vec![3, 3, 3], DType::F32, DType::F32, DType::BF16),
        (vec![1001], DType::F16, DType::BF16, DType::F16),
        (vec![4097], DType::F32, DType::F32, DType::F16),
    ] {
        let n: usize = shape.iter().product();
        let mut av = rng.normals(n, 1.0);
        let mut bv = rng.normals(n, 1e-3);
        av[0] = f32::INFINITY;
        bv[0] = f32::NEG_INFINITY; // inf − inf = NaN
        av[1] = f32::NAN;
        av[2] = 65504.0; // overflows f16 when b pushes it up
        bv[2] = 16.0;
        // Ties that a double rounding (f32, then 16-bit) would get wrong.
        for i in 3..n.min(40) {
            av[i] = 1.0 + (i as f32) * 2f32.powi(-7);
            bv[i] = 2f32.powi(-8) + 2f32.powi(-30) * if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        let a = host(ad, &shape, &av);
        let b = host(bd, &shape, &bv);
        let (got, want) = both(w, &[&a, &b], |be, t| {
            let mut out = poisoned(be, od, &shape);
            run(
                be,
                Add {
                    a: &t[0],
                    b: &t[1],
                    out: &mut out,
                },
            )
            .unwrap();
            vec![out]
        });
        // NaN payloads may differ; compare NaN positions, then bits.
        assert_close(&format!("add({shape:?})"), &got[0], &want[0], |_, _| 0.0);
    }
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

// ---- embedding --------------------------------------------------------------------

#[test]
fn embedding_is_exact() {
    let Some(w) = shared() else { return };
    let mut rng = rng(9);
    for (vocab, dim, tokens, td, idd, od) in [
        (
            50usize,
            40usize,
            12usize,
            DType::BF16,
            DType::I64,
            DType::BF16,
        ),
        (7, 3, 5, DType::F32, DType::I32, DType::F32),
        (100, 3, 33, DType::F32, DType::I64, DType::BF16),
        (9, 5, 7, DType::BF16, DType::I32, DType::F32),
        (3, 1, 9, DType::F16, DType::I32, DType::F16),
    ] {
        let table = host(td, &[vocab, dim], &rng.normals(vocab * dim, 1.0));
        let mut ids: Vec<i64> = (0..tokens)
            .map(|_| rng.below(vocab as u64) as i64)
            .collect();
        ids[0] = 0;
        ids[tokens - 1] = vocab as i64 - 1;
        let idt = HostTensor::from_index(idd, &[tokens], &ids);
        let (got, want) = both(w, &[&table, &idt], |b, t| {
            let mut out = poisoned(b, od, &[tokens, dim]);
            run(
                b,
                Embedding {
                    table: &t[0],
                    ids: &t[1],
                    out: &mut out,
                },
            )
            .unwrap();
            vec![out]
        });
        assert_bytes(
            &format!("embedding(v={vocab},d={dim},t={tokens})"),
            &got[0],
            &want[0],
        );
    }
}

#[test]
fn embedding_out_of_range_is_an_error() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    for (idd, ids, bad_pos, bad_val) in [
        (DType::I64, vec![0i64, 3, 50, 7, -1], 2usize, 50i64),
        (DType::I32, vec![1, -1, 2, 99, 4], 1, -1),
        (DType::I64, vec![1, 1 << 40, 2], 1, 1 << 40),
    ] {
        let table = up(&w, &host(DType::BF16, &[50, 4], &vec![1.0; 200]));
        let idt = up(&w, &HostTensor::from_index(idd, &[ids.len()], &ids));
        let mut out = poisoned(&w, DType::BF16, &[ids.len(), 4]);
        run(
            &w,
            Embedding {
                table: &table,
                ids: &idt,
                out: &mut out,
            },
        )
        .unwrap();
        let e = w.download(&out).unwrap_err();
        // cpu-ref reports the same error at once.
        let ct = CpuRef
            .upload(&host(DType::BF16, &[50, 4], &vec![1.0; 200]))
            .unwrap();
        let ci = CpuRef
            .upload(&HostTensor::from_index(idd, &[ids.len()], &ids))
            .unwrap();
        let mut co = CpuRef.alloc(DType::BF16, &[ids.len(), 4]).unwrap();
        let ce = run(
            &CpuRef,
            Embedding {
                table: &ct,
                ids: &ci,
                out: &mut co,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), ce.to_string());
        assert_index_error(
            "embedding",
            e,
            ("embedding", "ids"),
            &[bad_pos],
            bad_val,
            Some("[0, 50)"),
        );
    }
    // Afterwards the backend works and reports nothing stale.
    let table = up(&w, &host(DType::F32, &[2, 2], &[1.0, 2.0, 3.0, 4.0]));
    let idt = up(&w, &HostTensor::from_i32(&[1], &[1]));
    let mut out = poisoned(&w, DType::F32, &[1, 2]);
    run(
        &w,
        Embedding {
            table: &table,
            ids: &idt,
            out: &mut out,
        },
    )
    .unwrap();
    assert_eq!(down(&w, &out).to_f32_vec(), vec![3.0, 4.0]);
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

// ---- copy_window -----------------------------------------------------------------

#[test]
fn copy_window_is_exact() {
    let Some(w) = shared() else { return };
    let mut rng = rng(10);
    type Case = (
        Vec<usize>,
        DType,
        Vec<usize>,
        DType,
        (usize, usize),
        (usize, usize),
        (usize, usize),
    );
    let cases: Vec<Case> = vec![
        (
            vec![6, 10],
            DType::F32,
            vec![4, 2, 8],
            DType::BF16,
            (2, 4),
            (4, 1),
            (3, 5),
        ),
        (
            vec![5, 576],
            DType::BF16,
            vec![7, 640],
            DType::F32,
            (0, 0),
            (1, 64),
            (5, 576),
        ),
        // Full-width windows of odd width: rows meet inside 16-bit words.
        (
            vec![9, 7],
            DType::BF16,
            vec![11, 7],
            DType::BF16,
            (1, 0),
            (3, 0),
            (7, 7),
        ),
        (
            vec![9, 7],
            DType::F32,
            vec![11, 7],
            DType::F16,
            (0, 0),
            (0, 0),
            (9, 7),
        ),
        // Narrow windows at odd offsets, one element wide.
        (
            vec![8, 5],
            DType::F16,
            vec![10, 9],
            DType::BF16,
            (1, 3),
            (2, 5),
            (6, 1),
        ),
        (
            vec![300, 33],
            DType::BF16,
            vec![301, 65],
            DType::BF16,
            (0, 1),
            (1, 31),
            (299, 31),
        ),
        (
            vec![1, 1],
            DType::F32,
            vec![1, 1],
            DType::F32,
            (0, 0),
            (0, 0),
            (1, 1),
        ),
    ];
    for (ss, sd, ds, dd, so, doo, size) in cases {
        let src = host(sd, &ss, &rng.normals(ss.iter().product(), 1.0));
        let dst0 = host(dd, &ds, &rng.normals(ds.iter().product(), 1.0));
        let run_it = |b: &dyn Backend| {
            let s = up(b, &src);
            let mut d = up(b, &dst0);
            run(
                b,
                CopyWindow {
                    src: &s,
                    dst: &mut d,
                    src_origin: so,
                    dst_origin: doo,
                    size,
                },
            )
            .unwrap();
            down(b, &d)
        };
        assert_bytes(
            &format!("copy_window({sd}{ss:?}->{dd}{ds:?},{so:?}->{doo:?},{size:?})"),
            &run_it(w),
            &run_it(&CpuRef),
        );
    }
}

// ---- moe_gate ----------------------------------------------------------------------

/// Tokens whose selection sits on a near tie in exact arithmetic (gap below
/// `rel`, relative): the k-th and (k+1)-th kept experts, or the last kept and
/// first dropped groups.
#[allow(clippy::too_many_arguments)]
fn moe_near_ties(
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    dim: usize,
    e: usize,
    n_group: usize,
    topk_group: usize,
    topk: usize,
    rel: f64,
) -> Vec<bool> {
    let t = x.len() / dim;
    let gsz = e / n_group;
    let close = |a: f64, b: f64| (a - b).abs() <= rel * a.abs().max(b.abs());
    (0..t)
        .map(|tok| {
            let sb: Vec<f64> = (0..e)
                .map(|ex| {
                    let l: f64 = (0..dim)
                        .map(|j| x[tok * dim + j] as f64 * wt[ex * dim + j] as f64)
                        .sum();
                    1.0 / (1.0 + (-l).exp()) + bias[ex] as f64
                })
                .collect();
            let mut gs: Vec<f64> = (0..n_group)
                .map(|g| {
                    let mut v = sb[g * gsz..(g + 1) * gsz].to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v[0] + v[1]
                })
                .collect();
            let mut order: Vec<usize> = (0..n_group).collect();
            order.sort_by(|&a, &b| gs[b].total_cmp(&gs[a]));
            let group_tie =
                topk_group < n_group && close(gs[order[topk_group - 1]], gs[order[topk_group]]);
            gs.clear();
            let mut kept: Vec<f64> = order[..topk_group]
                .iter()
                .flat_map(|&g| sb[g * gsz..(g + 1) * gsz].to_vec())
                .collect();
            kept.sort_by(|a, b| b.total_cmp(a));
            let k_tie = topk < kept.len() && close(kept[topk - 1], kept[topk]);
            group_tie || k_tie
        })
        .collect()
}

#[test]
fn moe_gate_matches_reference() {
    let Some(w) = shared() else { return };
    let mut rng = rng(11);
    for (t, e, dim, ng, tg, k, scale, dt, idd, with_bias) in [
        (
            20usize,
            64usize,
            96usize,
            8usize,
            4usize,
            8usize,
            2.5f32,
            DType::BF16,
            DType::I64,
            true,
        ),
        (11, 32, 64, 4, 2, 6, 1.0, DType::F32, DType::I32, false),
        (300, 256, 200, 8, 4, 8, 2.5, DType::BF16, DType::I64, true),
        (3, 600, 17, 300, 7, 9, 1.5, DType::F32, DType::I64, true),
        (5, 16, 8, 1, 1, 16, 1.0, DType::F16, DType::I32, true),
    ] {
        let xv = rng.normals(t * dim, 1.0);
        let mut wv = rng.normals(e * dim, (dim as f32).powf(-0.5));
        // Exact ties: expert 5 duplicates expert 3, expert 9 duplicates 2.
        wv.copy_within(3 * dim..4 * dim, 5 * dim);
        wv.copy_within(2 * dim..3 * dim, 9 * dim);
        let bv: Vec<f32> = if with_bias {
            let mut b = rng.normals(e, 0.1);
            b[5] = b[3];
            b[9] = b[2];
            b
        } else {
            vec![0.0; e]
        };
        let x = host(dt, &[t, dim], &xv);
        let wt = host(dt, &[e, dim], &wv);
        let bias = host(DType::F32, &[e], &bv);
        let ties = moe_near_ties(
            &x.to_f32_vec(),
            &wt.to_f32_vec(),
            &bv,
            dim,
            e,
            ng,
            tg,
            k,
            1e-5,
        );
        let (got, want) = both(w, &[&x, &wt, &bias], |b, ts| {
            let mut idx = poisoned(b, idd, &[t, k]);
            let mut wts = poisoned(b, DType::F32, &[t, k]);
            run(
                b,
                MoeGate {
                    x: &ts[0],
                    weight: &ts[1],
                    bias: with_bias.then_some(&ts[2]),
                    topk_idx: &mut idx,
                    topk_weights: &mut wts,
                    n_group: ng,
                    topk_group: tg,
                    topk: k,
                    route_scale: scale,
                },
            )
            .unwrap();
            vec![idx, wts]
        });
        let (gi, ri) = (got[0].to_i64_vec(), want[0].to_i64_vec());
        let (gw, rw) = (got[1].to_f32_vec(), want[1].to_f32_vec());
        let mut excused = 0;
        let mut worst = 0f64;
        for (tok, &tie) in ties.iter().enumerate() {
            let row = tok * k..(tok + 1) * k;
            if gi[row.clone()] != ri[row.clone()] {
                assert!(
                    tie,
                    "moe_gate(t={t},e={e}) token {tok}: got experts {:?}, want {:?}",
                    &gi[row.clone()],
                    &ri[row]
                );
                excused += 1;
                continue;
            }
            for j in row {
                let err = (gw[j] as f64 - rw[j] as f64).abs();
                assert!(
                    err <= 1e-6 * scale as f64,
                    "moe_gate token {tok}: weight {} vs {}",
                    gw[j],
                    rw[j]
                );
                worst = worst.max(err);
            }
        }
        eprintln!(
            "moe_gate(t={t},e={e},dim={dim},{dt}): {excused} near-tie tokens excused, worst weight error {worst:e}"
        );
    }
}

#[test]
fn moe_gate_rejects_non_finite() {
    let Some(w) = own(WgpuOptions::default()) else {
        return;
    };
    let x = up(&w, &host(DType::F32, &[2, 4], &[1.0; 8]));
    let mut wv = vec![0.5f32; 8 * 4];
    wv[13] = f32::NAN;
    let wt = up(&w, &host(DType::F32, &[8, 4], &wv));
    let mut idx = poisoned(&w, DType::I64, &[2, 2]);
    let mut wts = poisoned(&w, DType::F32, &[2, 2]);
    run(
        &w,
        MoeGate {
            x: &x,
            weight: &wt,
            bias: None,
            topk_idx: &mut idx,
            topk_weights: &mut wts,
            n_group: 2,
            topk_group: 1,
            topk: 2,
            route_scale: 1.0,
        },
    )
    .unwrap();
    match w.synchronize().unwrap_err() {
        Error::NonFinite {
            op, arg, position, ..
        } => assert_eq!((op, arg, position), ("moe_gate", "weight", vec![3, 1])),
        other => panic!("expected NonFinite, got {other:?}"),
    }
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
