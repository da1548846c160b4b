//! The registry entry never panics: without ROCm or without an AMD GPU it
//! answers `Unavailable` with a reason; with one, memory round-trips and
//! the local ops are supported (the CUDA backend's glue on HIP).

use deepport_core::backend::Support;
use deepport_core::ops::OpKind;
use deepport_core::registry::{Availability, Registry};
use deepport_core::{DType, HostTensor};

#[test]
fn factory_answers_with_a_reason_or_a_working_memory() {
    let mut reg = Registry::new();
    deepport_rocm::register(&mut reg);
    assert_eq!(reg.names(), vec!["rocm"]);
    let gpu = deepport_rocm::hip::probe();
    match reg.probe("rocm").expect("rocm is registered") {
        Availability::Unavailable(reason) => {
            println!("rocm: {reason}");
            assert!(!reason.trim().is_empty());
            assert!(gpu.is_err(), "HIP probe says {gpu:?}, yet: {reason}");
            assert!(deepport_rocm::devices().is_err());
        }
        Availability::Available(b) => {
            println!("rocm: {:?}", b.info());
            assert!(gpu.is_ok());
            assert_eq!(b.name(), "rocm");
            let s = b.supports(OpKind::RmsNorm, &[DType::BF16]);
            assert!(matches!(s, Support::Supported), "{s:?}");
            let vals: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
            let h = HostTensor::from_f32(DType::F32, &[37], &vals);
            let t = b.upload(&h).expect("upload");
            let back = b.download(&t).expect("download");
            assert_eq!(back.bytes(), h.bytes());
            b.synchronize().expect("synchronize");
        }
    }
}
