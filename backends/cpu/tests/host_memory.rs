//! The host-memory capability of the CPU backends (`Backend::host_view`,
//! `Backend::adopt`): tensors read in place and buffers adopted without a
//! copy, handed back to their recycler when the tensor is dropped.

use deepport_core::backend::{Backend, Recycler};
use deepport_core::{DType, HostTensor};
use deepport_cpu::{Cpu, CpuRef};
use std::sync::{Arc, Mutex};

#[test]
fn host_view_reads_tensors_and_views_in_place() {
    for b in [&CpuRef as &dyn Backend, &Cpu] {
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let h = HostTensor::from_f32(DType::F32, &[6, 4], &v);
        let t = b.upload(&h).unwrap();
        assert_eq!(b.host_view(&t).unwrap(), h.bytes());
        let rows = t.rows(2, 3).unwrap();
        assert_eq!(b.host_view(&rows).unwrap(), &h.bytes()[2 * 16..5 * 16]);
        // In place: the same memory, not a copy.
        assert_eq!(
            b.host_view(&rows).unwrap().as_ptr(),
            b.host_view(&t).unwrap()[32..].as_ptr()
        );
    }
    // Another instance's tensor is not this backend's host memory.
    let t = Cpu
        .upload(&HostTensor::from_f32(DType::F32, &[2], &[1.0, 2.0]))
        .unwrap();
    assert!(CpuRef.host_view(&t).is_none());
}

#[test]
fn adopt_takes_the_buffer_and_hands_it_back_on_drop() {
    let back: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let b2 = back.clone();
    let rec: Recycler = Arc::new(move |buf| b2.lock().unwrap().push(buf));
    for b in [&CpuRef as &dyn Backend, &Cpu] {
        let h = HostTensor::from_f32(DType::BF16, &[3, 2], &[1.0, -2.0, 3.0, 0.5, 0.0, 8.0]);
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(h.bytes());
        let ptr = buf.as_ptr();
        let t = b
            .adopt(DType::BF16, &[3, 2], buf, Some(rec.clone()))
            .unwrap();
        assert_eq!(b.host_view(&t).unwrap().as_ptr(), ptr, "copied");
        assert_eq!(b.download(&t).unwrap().bytes(), h.bytes());
        // A view keeps the storage (and the buffer) alive.
        let v = t.rows(1, 1).unwrap();
        drop(t);
        assert!(back.lock().unwrap().is_empty());
        drop(v);
        let got = back.lock().unwrap().pop().expect("buffer handed back");
        assert_eq!(got.as_ptr(), ptr);
        assert!(got.capacity() >= 64);
        // A buffer of the wrong size is an error, not a tensor.
        let e = b.adopt(DType::BF16, &[3, 2], vec![0; 11], None);
        assert!(e.is_err());
        // Without a recycler the buffer is simply freed.
        let t = b.adopt(DType::F32, &[1], vec![0; 4], None).unwrap();
        drop(t);
        assert!(back.lock().unwrap().is_empty());
    }
}
