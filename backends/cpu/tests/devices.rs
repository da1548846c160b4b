//! Instances, devices and views of the CPU backends.

use deepport_core::backend::Backend;
use deepport_core::registry::{BackendSpec, Registry};
use deepport_core::{DType, Error, HostTensor};
use deepport_cpu::{Cpu, CpuRef};

fn registry() -> Registry {
    let mut r = Registry::new();
    deepport_cpu::register(&mut r);
    r
}

#[test]
fn a_tensor_of_one_instance_is_refused_by_another() {
    let h = HostTensor::from_f32(DType::F32, &[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let t = Cpu.upload(&h).unwrap();
    let e = CpuRef.download(&t).unwrap_err();
    assert!(matches!(e, Error::ForeignTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("cpu"), "{e}");
    let mut u = CpuRef.upload(&h).unwrap();
    let e = Cpu.write(&mut u, &h).unwrap_err();
    assert!(matches!(e, Error::ForeignTensor { .. }), "{e:?}");
    // The same instance reads it back.
    assert_eq!(Cpu.download(&t).unwrap().bytes(), h.bytes());
}

#[test]
fn backend_specs_pick_a_device_or_say_why_not() {
    let r = registry();
    assert_eq!(
        BackendSpec::parse("wgpu:1").unwrap(),
        BackendSpec {
            name: "wgpu".into(),
            device: Some(1)
        }
    );
    assert!(BackendSpec::parse("wgpu:x").is_err());
    assert_eq!(r.create("cpu-ref:0").unwrap().name(), "cpu-ref");
    assert_eq!(r.create("cpu").unwrap().name(), "cpu");
    let e = r.create("cpu-ref:3").err().expect("no device 3");
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("index 0"), "{e}");
    let devices = r.devices("cpu-ref").unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].backend, "cpu-ref");
    let e = r.create("nope:0").err().expect("unknown");
    assert!(matches!(e, Error::UnknownBackend { .. }), "{e:?}");
}

#[test]
fn views_read_rows_in_place_and_are_read_only() {
    let b = CpuRef;
    let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let mut t = b
        .upload(&HostTensor::from_f32(DType::F32, &[4, 6], &v))
        .unwrap();
    let rows = t.rows(1, 2).unwrap();
    assert!(rows.is_view());
    assert_eq!(rows.shape(), &[2, 6]);
    assert_eq!(rows.offset(), 6);
    assert_eq!(b.download(&rows).unwrap().to_f32_vec(), v[6..18].to_vec());
    // A view of a view keeps counting from the parent.
    let inner = rows.view(3, &[4]).unwrap();
    assert_eq!(b.download(&inner).unwrap().to_f32_vec(), v[9..13].to_vec());
    assert!(rows.view(10, &[4]).is_err(), "past the view's end");
    assert!(t.rows(3, 2).is_err(), "past the tensor's end");
    // Writing into a view, or into a tensor while a view of it lives, fails.
    let mut w = t.rows(0, 1).unwrap();
    let one = HostTensor::from_f32(DType::F32, &[1, 6], &[0.; 6]);
    assert!(b.write(&mut w, &one).is_err());
    let all = HostTensor::from_f32(DType::F32, &[4, 6], &[0.; 24]);
    let e = b.write(&mut t, &all).unwrap_err();
    assert!(e.to_string().contains("live views"), "{e}");
    drop((rows, inner, w));
    b.write(&mut t, &all).unwrap();
}

#[test]
fn ops_read_views_without_a_copy() {
    use deepport_core::ops::{self, Add};
    let b = CpuRef;
    let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let t = b
        .upload(&HostTensor::from_f32(DType::F32, &[4, 3], &v))
        .unwrap();
    let (x, y) = (t.rows(0, 2).unwrap(), t.rows(2, 2).unwrap());
    let mut out = b.alloc(DType::F32, &[2, 3]).unwrap();
    ops::run(
        &b,
        Add {
            a: &x,
            b: &y,
            out: &mut out,
        },
    )
    .unwrap();
    let want: Vec<f32> = (0..6).map(|i| v[i] + v[i + 6]).collect();
    assert_eq!(b.download(&out).unwrap().to_f32_vec(), want);
}

#[test]
fn core_refuses_an_op_on_another_instance_s_tensor_or_into_a_view() {
    use deepport_core::ops::{self, Add};
    let h = HostTensor::from_f32(DType::F32, &[2, 3], &[1.; 6]);
    let mine = CpuRef.upload(&h).unwrap();
    let theirs = Cpu.upload(&h).unwrap();
    let mut out = CpuRef.alloc(DType::F32, &[2, 3]).unwrap();
    let e = ops::run(
        &CpuRef,
        Add {
            a: &mine,
            b: &theirs,
            out: &mut out,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::ForeignTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("argument `b` of add"), "{e}");

    let big = CpuRef
        .upload(&HostTensor::from_f32(DType::F32, &[4, 3], &[0.; 12]))
        .unwrap();
    let mut view = big.rows(0, 2).unwrap();
    let e = ops::run(
        &CpuRef,
        Add {
            a: &mine,
            b: &mine,
            out: &mut view,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "out", .. }), "{e:?}");
}
