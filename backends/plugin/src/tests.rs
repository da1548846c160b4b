use super::*;
use deepport_core::ops::{self, Add, Embedding, RmsNorm, SiluMul};

fn example() -> PluginBackend {
    let p = load(Path::new(EXAMPLE_PLUGIN)).expect("the example plugin loads");
    p.create(None).expect("its device 0")
}

#[test]
fn header_matches_the_op_list() {
    let h = include_str!("../../../plugin/include/deepport_plugin.h");
    let fields: Vec<&str> = h
        .lines()
        .filter_map(|l| l.trim().strip_prefix("dp_op_fn "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        fields, OP_FIELDS,
        "the header's op fields differ from the op list"
    );
    assert!(h.contains(&format!(
        "#define DEEPPORT_PLUGIN_ABI_VERSION {ABI_VERSION}u"
    )));
    let locals: Vec<&str> = OpKind::ALL
        .iter()
        .filter(|k| k.is_local())
        .map(|k| k.name())
        .collect();
    assert_eq!(locals, OP_FIELDS);
}

#[test]
fn example_plugin_runs_its_ops() {
    let b = example();
    assert_eq!(b.name(), "example-plugin");
    assert!(b.info().device.contains("example plugin"));
    let x = b
        .upload(&HostTensor::from_f32(
            DType::BF16,
            &[2, 3],
            &[1.0, -2.0, 3.0, 0.5, 0.25, -1.0],
        ))
        .unwrap();
    let y = b
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[2, 3],
            &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0],
        ))
        .unwrap();
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
    assert_eq!(
        b.download(&out).unwrap().to_f32_vec(),
        [2.0, -1.0, 4.0, 2.5, 2.25, 1.0]
    );
    let mut s = b.alloc(DType::F32, &[2, 3]).unwrap();
    ops::run(
        &b,
        SiluMul {
            gate: &x,
            up: &y,
            out: &mut s,
        },
    )
    .unwrap();
    let got = b.download(&s).unwrap().to_f32_vec();
    let want = 1.0f64 / (1.0 + (-1.0f64).exp());
    assert!((got[0] as f64 - want).abs() < 1e-6, "{got:?}");
    let w = b
        .upload(&HostTensor::from_f32(DType::F32, &[3], &[1.0, 1.0, 2.0]))
        .unwrap();
    let mut r = b.alloc(DType::F32, &[2, 3]).unwrap();
    ops::run(
        &b,
        RmsNorm {
            x: &y,
            weight: &w,
            y: &mut r,
            eps: 0.0,
        },
    )
    .unwrap();
    assert_eq!(
        b.download(&r).unwrap().to_f32_vec(),
        [1.0, 1.0, 2.0, 1.0, 1.0, 2.0]
    );
    // An id out of range is an error naming it, not a read out of bounds.
    let ids = b.upload(&HostTensor::from_i32(&[2], &[1, 2])).unwrap();
    let mut e = b.alloc(DType::BF16, &[2, 3]).unwrap();
    let err = ops::run(
        &b,
        Embedding {
            table: &x,
            ids: &ids,
            out: &mut e,
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("ids[1] = 2 is outside [0, 2)"),
        "{err}"
    );
    // f16 is not supported by the example: said up front and at the call.
    assert!(!b.supports(OpKind::Add, &[DType::F16; 3]).is_supported());
    let h = b.upload(&HostTensor::zeros(DType::F16, &[3])).unwrap();
    let mut o = b.alloc(DType::F16, &[3]).unwrap();
    let err = ops::run(
        &b,
        Add {
            a: &h,
            b: &h,
            out: &mut o,
        },
    )
    .unwrap_err();
    assert!(err.is_not_supported(), "{err}");
    // An op the vtable leaves NULL.
    assert!(!b.supports(OpKind::Gemm, &[DType::BF16; 3]).is_supported());
}

#[test]
fn views_and_foreign_tensors() {
    let b = example();
    let other = example();
    let x = b
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[4, 2],
            &[0., 1., 2., 3., 4., 5., 6., 7.],
        ))
        .unwrap();
    let v = x.rows(2, 2).unwrap();
    assert_eq!(b.download(&v).unwrap().to_f32_vec(), [4., 5., 6., 7.]);
    let mut out = b.alloc(DType::F32, &[2, 2]).unwrap();
    ops::run(
        &b,
        Add {
            a: &v,
            b: &v,
            out: &mut out,
        },
    )
    .unwrap();
    assert_eq!(b.download(&out).unwrap().to_f32_vec(), [8., 10., 12., 14.]);
    let err = other.download(&x).unwrap_err();
    assert!(matches!(err, Error::ForeignTensor { .. }), "{err}");
}

#[test]
fn registry_refuses_a_builtin_name_and_registers_once() {
    let p = load(Path::new(EXAMPLE_PLUGIN)).unwrap();
    let mut reg = Registry::new();
    reg.register(
        "example-plugin",
        "x",
        |_| Err(Error::Other("x".into())),
        || Ok(vec![]),
    );
    let e = register(&mut reg, &p).unwrap_err().to_string();
    assert!(e.contains("is the name of a backend of this build"), "{e}");
    let mut reg = Registry::new();
    let names = load_and_register(&mut reg, &[PathBuf::from(EXAMPLE_PLUGIN)]).unwrap();
    assert_eq!(names, ["example-plugin"]);
    let b = reg.create("example-plugin:0").unwrap();
    assert_eq!(b.name(), "example-plugin");
    assert!(reg.create("example-plugin:1").is_err());
    assert_eq!(reg.devices("example-plugin").unwrap().len(), 1);
}

#[test]
fn example_plugin_offers_the_1_1_extensions() {
    let p = std::sync::Arc::new(Plugin::load(std::path::Path::new(EXAMPLE_PLUGIN)).unwrap());
    assert_eq!(p.abi_minor(), ffi::ABI_MINOR);
    assert_eq!(p.extensions(), ["poll_error", "set_stream"]);
    let b = p.create(None).unwrap();
    let mut stream = 0u64;
    // SAFETY: the example plugin only remembers the pointer.
    unsafe { b.set_stream((&mut stream as *mut u64).cast()) }.unwrap();
    let x = b.upload(&HostTensor::zeros(DType::F32, &[3])).unwrap();
    assert_eq!(b.download(&x).unwrap().bytes(), &[0u8; 12]);
    b.synchronize().unwrap();
}
