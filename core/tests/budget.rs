//! The memory budget and the fallible host-tensor constructors: sizes from
//! user input are refused before memory is taken, with an error naming the
//! input, the size and the budget; within budget they equal the infallible
//! constructors.

use deepport_core::budget::{tensor_bytes, MemoryBudget};
use deepport_core::tensor::{read_safetensors_within, write_safetensors};
use deepport_core::{DType, Error, HostTensor};
use std::collections::BTreeMap;

#[test]
fn try_constructors_refuse_over_budget_and_match_within() {
    let b = MemoryBudget::new(1 << 20);
    // The typo: m = 10^11 rows of 7168 bf16 values.
    let e = HostTensor::try_zeros("case x input `a`", DType::BF16, &[100_000_000_000, 7168], b)
        .unwrap_err();
    match &e {
        Error::OverBudget {
            what,
            bytes,
            budget,
        } => {
            assert_eq!(what, "case x input `a`");
            assert_eq!(*bytes, 100_000_000_000 * 7168 * 2);
            assert_eq!(*budget, 1 << 20);
        }
        other => panic!("{other:?}"),
    }
    let s = e.to_string();
    assert!(
        s.contains("1433600000000000 bytes") && s.contains("1048576 bytes"),
        "{s}"
    );
    // A shape whose size overflows is refused too, not wrapped.
    let e = HostTensor::try_zeros("t", DType::F32, &[usize::MAX / 2, 3], b).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    assert!(tensor_bytes("t", DType::F32, &[usize::MAX / 2, 3]).is_err());
    // Exactly at the budget is allowed.
    let t = HostTensor::try_zeros("t", DType::F32, &[256, 1024], b).unwrap();
    assert_eq!(t, HostTensor::zeros(DType::F32, &[256, 1024]));
    assert!(HostTensor::try_zeros("t", DType::F32, &[256, 1025], b).is_err());
    // try_full and try_from_fn agree with the plain constructors, bytes for bytes.
    for d in [DType::F32, DType::BF16, DType::F8E4M3] {
        let f = HostTensor::try_full("t", d, &[3, 70_001], 1.5, MemoryBudget::unlimited()).unwrap();
        assert_eq!(f, HostTensor::full(d, &[3, 70_001], 1.5), "{d}");
        let g = |i: usize| ((i as f32) * 0.37).sin() * 100.0;
        let a =
            HostTensor::try_from_fn("t", d, &[5, 70_001], MemoryBudget::unlimited(), g).unwrap();
        let v: Vec<f32> = (0..5 * 70_001).map(g).collect();
        assert_eq!(a, HostTensor::from_f32(d, &[5, 70_001], &v), "{d}");
    }
    let nan = HostTensor::try_full("t", DType::BF16, &[4], f32::NAN, b).unwrap();
    assert!(nan.to_f32_vec().iter().all(|x| x.is_nan()));
    assert!(HostTensor::try_from_fn("t", DType::F32, &[1 << 20], b, |_| 0.0).is_err());
}

#[test]
fn a_safetensors_file_is_checked_against_the_budget_before_it_is_read() {
    let dir = std::env::temp_dir().join(format!("deepport-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.safetensors");
    let tensors = BTreeMap::from([(
        "x".to_string(),
        HostTensor::from_f32(DType::F32, &[1024], &[1.0; 1024]),
    )]);
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    // Read and parsed it takes twice its size.
    let e = read_safetensors_within(&path, MemoryBudget::new(2 * len - 1)).unwrap_err();
    assert!(matches!(e, Error::OverBudget { .. }), "{e:?}");
    assert!(e.to_string().contains("t.safetensors"), "{e}");
    let f = read_safetensors_within(&path, MemoryBudget::new(2 * len)).unwrap();
    assert_eq!(f.tensors, tensors);
    let _ = std::fs::remove_dir_all(&dir);
}
