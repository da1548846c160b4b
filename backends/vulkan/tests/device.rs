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
