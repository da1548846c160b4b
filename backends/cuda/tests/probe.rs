//! What the `cuda` backend says on a machine without CUDA (CI, this
//! workspace's development machine): unavailable with the reason, never a
//! panic. On a machine with a GPU the same tests check the available path.

use deepport_core::registry::{Availability, Registry};
use deepport_core::Error;
use deepport_cuda::{nccl, probe};

fn registry() -> Registry {
    let mut reg = Registry::new();
    deepport_cuda::register(&mut reg);
    reg
}

/// Whether this machine can run CUDA (the probe succeeds).
fn have_cuda() -> bool {
    probe::driver().is_ok()
}

#[test]
fn registry_lists_cuda_with_its_availability() {
    let reg = registry();
    assert_eq!(reg.names(), vec!["cuda"]);
    match reg.probe("cuda").expect("`cuda` parses") {
        Availability::Available(b) => {
            assert!(have_cuda());
            let info = b.info();
            assert_eq!(info.backend, "cuda");
            assert!(info.device.contains("sm_"), "{info:?}");
            assert_eq!(b.name(), "cuda");
        }
        Availability::Unavailable(reason) => {
            assert!(!have_cuda());
            println!("cuda unavailable here: {reason}");
            // The reason says what is missing: the driver library (with
            // the names tried), a device, or a new enough driver.
            assert!(
                reason.contains("libcuda")
                    || reason.contains("no CUDA device")
                    || reason.contains("driver too old")
                    || reason.contains("cuInit")
                    || reason.contains("NVRTC"),
                "{reason}"
            );
        }
    }
}

#[test]
fn missing_driver_names_the_library() {
    if have_cuda() {
        return;
    }
    let e = probe::driver().unwrap_err();
    match &e {
        Error::Unavailable { backend, reason } => {
            assert_eq!(backend, "cuda");
            // On a machine with no driver at all: both file names tried.
            if reason.contains("not found") {
                assert!(reason.contains("libcuda.so.1"), "{reason}");
                assert!(reason.contains("libcuda.so"), "{reason}");
            }
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let devices = registry().devices("cuda").unwrap_err();
    assert!(matches!(devices, Error::Unavailable { .. }), "{devices:?}");
}

#[test]
fn create_is_an_error_not_a_panic() {
    let reg = registry();
    for spec in ["cuda", "cuda:0", "cuda:1"] {
        match reg.create(spec) {
            Ok(b) => assert!(have_cuda(), "{spec} created {:?}", b.info()),
            Err(Error::Unavailable { backend, reason }) => {
                assert!(backend.starts_with("cuda"), "{backend}");
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("{spec}: expected Unavailable, got {other:?}"),
        }
    }
    // A device index beyond the devices is Unavailable naming the count.
    match reg.create("cuda:4096") {
        Err(Error::Unavailable { backend, reason }) => {
            if have_cuda() {
                assert_eq!(backend, "cuda:4096");
                assert!(reason.contains("device"), "{reason}");
            }
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("cuda:4096 exists?"),
    }
}

#[test]
fn malformed_device_index_is_a_clear_error() {
    let reg = registry();
    for spec in ["cuda:x", "cuda:-1", "cuda:", "cuda:1.5"] {
        match reg.create(spec) {
            Err(Error::Other(msg)) => {
                assert!(msg.contains("non-negative integer"), "{spec}: {msg}");
                assert!(msg.contains(spec.trim()), "{spec}: {msg}");
            }
            Err(other) => panic!("{spec}: expected a parse error, got {other:?}"),
            Ok(_) => panic!("{spec} parsed"),
        }
    }
}

#[test]
fn nccl_absent_is_unavailable_with_the_reason() {
    match nccl::library() {
        Ok(lib) => println!("NCCL {} from {}", lib.version_text(), lib.file),
        Err(Error::Unavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(reason.contains("NCCL"), "{reason}");
            if reason.contains("not found") {
                assert!(reason.contains("libnccl.so.2"), "{reason}");
            }
            // Every entry point says the same, without touching the GPU.
            let e = nccl::NcclId::new().unwrap_err();
            assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
            let e = nccl::NcclTransport::group(&[0, 1]).unwrap_err();
            assert!(e.to_string().contains("NCCL"), "{e}");
            assert!(nccl::probe().is_err());
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn kernel_sources_are_listed() {
    // Every source named once (the module cache is keyed by name).
    let srcs = deepport_cuda::sources();
    let mut names: Vec<_> = srcs.iter().map(|s| s.name).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate kernel source names");
}
