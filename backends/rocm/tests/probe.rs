//! The registry entry never panics: on a machine without an AMD GPU (or
//! without ROCm) it answers `Unavailable` with a reason.

use deepport_core::registry::{Availability, Registry};

#[test]
fn factory_is_unavailable_with_a_reason() {
    let mut reg = Registry::new();
    deepport_rocm::register(&mut reg);
    assert_eq!(reg.names(), vec!["rocm"]);
    match reg.probe("rocm").expect("rocm is registered") {
        Availability::Unavailable(reason) => {
            println!("rocm: {reason}");
            assert!(!reason.trim().is_empty());
        }
        Availability::Available(_) => panic!("this slice has no backend to create"),
    }
    // The HIP probe agrees: here (no GPU) it names why.
    if let Err(why) = deepport_rocm::hip::probe() {
        assert!(!why.is_empty());
        assert!(deepport_rocm::devices().is_err());
    }
}
