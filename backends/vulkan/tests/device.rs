//! Backend-specific checks: validation catches a deliberate misuse, memory
//! comes from few blocks, deferred errors are reported once, transfers
//! round-trip. Skipped (with a message) without a device unless
//! `DEEPPORT_REQUIRE` names `vulkan`.

use deepport_core::backend::Backend;
use deepport_core::ops;
use deepport_core::{DType, Error, HostTensor};
use deepport_testkit::harness::{available, required};
use deepport_vulkan::{validation_available, Vulkan, VulkanOptions};

fn make(validation: bool) -> Option<Vulkan> {
    available(
        "vulkan",
        Vulkan::with_options(VulkanOptions {
            device: 0,
            validation,
            ..Default::default()
        }),
    )
}

#[test]
fn validation_layer_reports_a_deliberate_misuse() {
    if !validation_available() {
        assert!(
            !required("vulkan"),
            "DEEPPORT_REQUIRE names vulkan but VK_LAYER_KHRONOS_validation is not installed"
        );
        eprintln!("skipping: VK_LAYER_KHRONOS_validation is not installed");
        return;
    }
    let Some(v) = make(true) else { return };
    assert!(v.validation());
    // Clean work first: nothing reported.
    let x = v
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[4],
            &[1.0, 2.0, 3.0, 4.0],
        ))
        .unwrap();
    v.synchronize().expect("clean work reports nothing");
    v.debug_misuse()
        .expect("recording the misuse itself succeeds");
    match v.synchronize() {
        Err(Error::Device { msg, .. }) => {
            assert!(msg.contains("validation"), "{msg}");
        }
        other => panic!("the unwritten descriptor set was not reported: {other:?}"),
    }
    // Reported once; the instance keeps working.
    v.synchronize().expect("reported once");
    assert_eq!(
        v.download(&x).unwrap().to_f32_vec(),
        vec![1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn misuse_hook_is_refused_without_validation() {
    let Some(v) = make(false) else { return };
    assert!(v.debug_misuse().is_err());
}

#[test]
fn tensors_are_sub_allocated_from_few_blocks() {
    let Some(v) = make(false) else { return };
    let mut keep = Vec::new();
    for i in 0..300usize {
        let n = 1 + (i * 37) % 1000;
        let h = HostTensor::from_f32(DType::F32, &[n], &vec![i as f32; n]);
        keep.push((v.upload(&h).unwrap(), i as f32, n));
    }
    assert_eq!(v.device_blocks(), 1, "300 small tensors share one block");
    for (t, val, n) in keep.iter().step_by(7) {
        assert_eq!(v.download(t).unwrap().to_f32_vec(), vec![*val; *n]);
    }
    // Freed ranges are reused: churn does not grow the arena.
    drop(keep);
    for _ in 0..50 {
        let t = v.alloc(DType::F32, &[1 << 20]).unwrap();
        drop(t);
    }
    assert_eq!(v.device_blocks(), 1);
}

#[test]
fn odd_sized_transfers_and_views_round_trip() {
    let Some(v) = make(validation_available()) else {
        return;
    };
    let bytes: Vec<u8> = (0..13u8).collect();
    let h = HostTensor::from_bytes(DType::U8, &[13], bytes.clone()).unwrap();
    let t = v.upload(&h).unwrap();
    assert_eq!(v.download(&t).unwrap().bytes(), &bytes[..]);
    let view = t.view(3, &[7]).unwrap();
    assert_eq!(v.download(&view).unwrap().bytes(), &bytes[3..10]);
    let mut t2 = v.alloc(DType::U8, &[13]).unwrap();
    let h2 = HostTensor::from_bytes(DType::U8, &[13], vec![9; 13]).unwrap();
    v.write(&mut t2, &h2).unwrap();
    assert_eq!(v.download(&t2).unwrap().bytes(), &[9u8; 13][..]);
}

#[test]
fn a_bad_index_is_reported_at_the_next_synchronize_once() {
    let Some(v) = make(validation_available()) else {
        return;
    };
    let src = v
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[3, 2],
            &[1., 2., 3., 4., 5., 6.],
        ))
        .unwrap();
    let idx = v.upload(&HostTensor::from_i32(&[3], &[2, 7, -1])).unwrap();
    let mut dst = v.alloc(DType::F32, &[3, 2]).unwrap();
    let r = ops::run(
        &v,
        ops::GatherRows {
            src: &src,
            index: &idx,
            dst: &mut dst,
        },
    );
    let e = match r {
        Err(e) => e,
        Ok(()) => v.synchronize().expect_err("index 7 is out of range"),
    };
    match e {
        Error::IndexOutOfRange {
            arg,
            position,
            value,
            ..
        } => {
            assert_eq!((arg, position, value), ("index", vec![1], 7));
        }
        other => panic!("{other:?}"),
    }
    v.synchronize().expect("reported once");
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
}

fn portable_and_native() -> Option<(Vulkan, Vulkan)> {
    let native = make(validation_available())?;
    let portable = Vulkan::with_options(VulkanOptions {
        validation: validation_available(),
        portable: true,
        ..Default::default()
    })
    .expect("the portable instance of an available device");
    Some((native, portable))
}

/// What the device offers decides what the kernels use, and `info()`
/// reports both; the portable instance uses nothing optional.
#[test]
fn capabilities_are_used_and_reported() {
    let Some((native, portable)) = portable_and_native() else {
        return;
    };
    let f = native.features();
    let u = native.used();
    assert_eq!(
        u.subgroup_reductions,
        f.subgroup_arith && f.subgroup_compute
    );
    assert_eq!(u.fp8_storage8, f.storage8 && f.shader_i8 && f.shader_f16);
    let line = native.info().driver;
    assert!(
        line.contains(&format!("subgroup {}", f.subgroup_size)),
        "{line}"
    );
    assert!(line.contains("cooperative matrix"), "{line}");
    if u.subgroup_reductions {
        assert!(line.contains("subgroupAdd/Max"), "{line}");
    }
    if !f.cooperative_matrix {
        assert!(u.coopmat.is_none());
        assert!(u.coopmat_reason.contains("lacks VK_KHR_cooperative_matrix"));
    }
    let pu = portable.used();
    assert!(!pu.subgroup_reductions && !pu.fp8_storage8 && pu.coopmat.is_none());
    assert!(portable.info().driver.contains("shared memory"));
}

/// The device paths (subgroup reductions, 8-bit FP8 loads) against the
/// portable ones: act_quant and fp8_gemm bit for bit (max is exact in any
/// order; FP8 → f16 → f32 products are exact), rms_norm within 2 ulp-ish.
#[test]
fn device_paths_agree_with_the_portable_kernels() {
    let Some((native, portable)) = portable_and_native() else {
        return;
    };
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // act_quant
    let (m, k) = (3, 384);
    let x: Vec<f32> = (0..m * k)
        .map(|i| rng.f32() * (1 + i % 7) as f32 * 10.0)
        .collect();
    let xh = HostTensor::from_f32(DType::F32, &[m, k], &x);
    let quant = |v: &Vulkan| {
        let xd = v.upload(&xh).unwrap();
        let mut q = v.alloc(DType::F8E4M3, &[m, k]).unwrap();
        let mut s = v.alloc(DType::F32, &[m, k / 128]).unwrap();
        ops::run(
            v,
            ops::ActQuant {
                x: &xd,
                q: &mut q,
                s: &mut s,
                scale_fmt: ops::ScaleFmt::Float,
            },
        )
        .unwrap();
        (
            v.download(&q).unwrap().bytes().to_vec(),
            v.download(&s).unwrap().bytes().to_vec(),
        )
    };
    assert_eq!(quant(&native), quant(&portable), "act_quant");
    // fp8_gemm, k not a multiple of 128, n past one 128 block
    let (m, n, k) = (5, 130, 200);
    let mut fp8 = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                let b = rng.next() as u8;
                if b & 0x7f == 0x7f {
                    0
                } else {
                    b
                }
            })
            .collect()
    };
    let a = HostTensor::from_bytes(DType::F8E4M3, &[m, k], fp8(m * k)).unwrap();
    let b = HostTensor::from_bytes(DType::F8E4M3, &[n, k], fp8(n * k)).unwrap();
    let sa: Vec<f32> = (0..m * 2).map(|i| 0.5 + i as f32 * 0.25).collect();
    let sb: Vec<f32> = (0..4).map(|i| 2.0 - i as f32 * 0.125).collect();
    let sah = HostTensor::from_f32(DType::F32, &[m, 2], &sa);
    let sbh = HostTensor::from_f32(DType::F32, &[2, 2], &sb);
    let gemm = |v: &Vulkan| {
        let (ad, bd) = (v.upload(&a).unwrap(), v.upload(&b).unwrap());
        let (sad, sbd) = (v.upload(&sah).unwrap(), v.upload(&sbh).unwrap());
        let mut d = v.alloc(DType::F32, &[m, n]).unwrap();
        ops::run(
            v,
            ops::Fp8Gemm {
                a: &ad,
                sa: &sad,
                b: &bd,
                sb: &sbd,
                d: &mut d,
            },
        )
        .unwrap();
        v.download(&d).unwrap().to_f32_vec()
    };
    let (dn, dp) = (gemm(&native), gemm(&portable));
    assert!(dn.iter().any(|v| *v != 0.0));
    assert_eq!(
        dn.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        dp.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "fp8_gemm"
    );
    // rms_norm: the sum's order differs
    let (rows, dim) = (4, 1000);
    let x: Vec<f32> = (0..rows * dim).map(|_| rng.f32() * 3.0).collect();
    let w: Vec<f32> = (0..dim).map(|_| rng.f32()).collect();
    let xh = HostTensor::from_f32(DType::F32, &[rows, dim], &x);
    let wh = HostTensor::from_f32(DType::F32, &[dim], &w);
    let norm = |v: &Vulkan| {
        let (xd, wd) = (v.upload(&xh).unwrap(), v.upload(&wh).unwrap());
        let mut y = v.alloc(DType::F32, &[rows, dim]).unwrap();
        ops::run(
            v,
            ops::RmsNorm {
                x: &xd,
                weight: &wd,
                y: &mut y,
                eps: 1e-6,
            },
        )
        .unwrap();
        v.download(&y).unwrap().to_f32_vec()
    };
    let (yn, yp) = (norm(&native), norm(&portable));
    for (i, (a, b)) in yn.iter().zip(&yp).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1e-3),
            "rms_norm[{i}]: {a} vs {b}"
        );
    }
    native.synchronize().unwrap();
    portable.synchronize().unwrap();
}

/// Timestamp queries: with timing on, an op's device time comes back after
/// the synchronize (positive, and below the wall time around it); off, none.
#[test]
fn timestamps_measure_op_time() {
    let Some(v) = make(validation_available()) else {
        return;
    };
    assert_eq!(v.take_device_seconds(), None, "timing is off by default");
    if !v.features().timestamps {
        assert!(!v.set_device_timing(true));
        return;
    }
    assert!(v.set_device_timing(true));
    assert_eq!(v.take_device_seconds(), Some(0.0), "nothing ran yet");
    let n = 1 << 20;
    let x = v
        .upload(&HostTensor::from_f32(DType::F32, &[n], &vec![1.5; n]))
        .unwrap();
    let mut y = v.alloc(DType::F32, &[n]).unwrap();
    v.synchronize().unwrap();
    v.take_device_seconds();
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        ops::run(
            &v,
            ops::Add {
                a: &x,
                b: &x,
                out: &mut y,
            },
        )
        .unwrap();
    }
    v.synchronize().unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let dev = v.take_device_seconds().expect("timing is on");
    assert!(
        dev > 0.0 && dev <= wall * 1.5,
        "device {dev} s, wall {wall} s"
    );
    assert_eq!(v.take_device_seconds(), Some(0.0), "taken once");
    assert_eq!(v.download(&y).unwrap().to_f32_vec()[..2], [3.0, 3.0]);
    assert!(!v.set_device_timing(false));
    assert_eq!(v.take_device_seconds(), None);
}

/// `alloc` gives zeros; with `poison` all-ones bytes (NaN in every float
/// format but e4m3fnuz), so a read of unwritten memory shows.
#[test]
fn alloc_zeroes_or_poisons() {
    let Some(v) = make(false) else {
        return;
    };
    let t = v.alloc(DType::F32, &[5]).unwrap();
    assert_eq!(v.download(&t).unwrap().bytes(), &[0u8; 20][..]);
    let p = Vulkan::with_options(VulkanOptions {
        poison: true,
        ..Default::default()
    })
    .unwrap();
    let t = p.alloc(DType::BF16, &[3]).unwrap();
    let h = p.download(&t).unwrap();
    assert_eq!(h.bytes(), &[0xffu8; 6][..]);
    assert!(h.to_f32_vec().iter().all(|x| x.is_nan()));
}

/// Padding rows (`m_indices = -1`) of a contiguous grouped GEMM come back
/// as zeros even over poisoned memory: an fp8 forward pass feeds whole
/// padded buffers to `act_quant`, which rejects NaN (found with
/// `DEEPPORT_VULKAN_POISON=1`).
#[test]
fn contiguous_padding_rows_are_written() {
    let Some(_) = make(false) else {
        return;
    };
    let v = Vulkan::with_options(VulkanOptions {
        poison: true,
        ..Default::default()
    })
    .unwrap();
    let (m, n, k) = (4, 3, 8);
    let a = v
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[m, k],
            &vec![0.5; m * k],
        ))
        .unwrap();
    let b = v
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[1, n, k],
            &vec![2.0; n * k],
        ))
        .unwrap();
    let idx = v
        .upload(&HostTensor::from_i32(&[m], &[0, -1, 0, -1]))
        .unwrap();
    let mut d = v.alloc(DType::F32, &[m, n]).unwrap();
    ops::run(
        &v,
        ops::GemmGroupedContiguous {
            a: &a,
            b: &b,
            m_indices: &idx,
            d: &mut d,
        },
    )
    .unwrap();
    let out = v.download(&d).unwrap().to_f32_vec();
    assert_eq!(
        out,
        vec![8.0, 8.0, 8.0, 0.0, 0.0, 0.0, 8.0, 8.0, 8.0, 0.0, 0.0, 0.0]
    );
}
