//! The C ABI called as C would call it (through the same `extern "C"`
//! functions): discovery, memory, typed and generic ops, and every error
//! path returning a status and a message instead of crashing.

use deepport::*;
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: deepport_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(deepport_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn cpu() -> *mut DeepportBackend {
    let mut b = null_mut();
    let spec = CString::new("cpu").unwrap();
    // SAFETY: valid string and out pointer.
    let s = unsafe { deepport_backend_create(spec.as_ptr(), &mut b) };
    assert_eq!(s, DeepportStatus::Ok, "{}", last_error());
    b
}

fn upload_f32(b: *mut DeepportBackend, shape: &[usize], v: &[f32]) -> *mut DeepportTensor {
    let mut t = null_mut();
    // SAFETY: valid pointers and sizes.
    let s = unsafe {
        deepport_tensor_upload(
            b,
            DeepportDType::F32 as i32,
            shape.as_ptr(),
            shape.len(),
            v.as_ptr().cast(),
            v.len() * 4,
            &mut t,
        )
    };
    assert_eq!(s, DeepportStatus::Ok, "{}", last_error());
    t
}

fn download_f32(b: *mut DeepportBackend, t: *mut DeepportTensor, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // SAFETY: `v` has n floats.
    let s = unsafe { deepport_tensor_download(b, t, v.as_mut_ptr().cast(), n * 4) };
    assert_eq!(s, DeepportStatus::Ok, "{}", last_error());
    v
}

#[test]
fn discovery_lists_the_reference_backend() {
    assert_eq!(deepport_abi_version(), 1);
    let n = deepport_backend_count();
    let mut names = Vec::new();
    for i in 0..n {
        let mut p = null();
        // SAFETY: valid out pointer.
        assert_eq!(
            unsafe { deepport_backend_name(i, &mut p) },
            DeepportStatus::Ok
        );
        // SAFETY: a static NUL-terminated name.
        names.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    }
    assert!(names.iter().any(|n| n == "cpu-ref"), "{names:?}");
    let mut p = null();
    // SAFETY: valid out pointer.
    let s = unsafe { deepport_backend_name(n, &mut p) };
    assert_eq!(s, DeepportStatus::InvalidArgument);
    assert!(last_error().contains(&format!("backend index {n}")));
    let b = cpu();
    let mut info = DeepportDeviceInfo {
        backend: null(),
        device: null(),
        driver: null(),
        vendor: null(),
    };
    // SAFETY: live backend, valid out pointer.
    assert_eq!(
        unsafe { deepport_backend_info(b, &mut info) },
        DeepportStatus::Ok
    );
    // SAFETY: strings owned by the live backend.
    assert_eq!(
        unsafe { CStr::from_ptr(info.backend) }.to_str().unwrap(),
        "cpu"
    );
    // SAFETY: freed once.
    unsafe { deepport_backend_free(b) };
}

#[test]
fn typed_ops_and_their_errors() {
    let b = cpu();
    let x = upload_f32(b, &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = upload_f32(b, &[2, 2], &[0.5, 0.5, 0.5, 0.5]);
    let mut out = null_mut();
    // SAFETY: valid pointers.
    let s = unsafe {
        deepport_tensor_alloc(
            b,
            DeepportDType::F32 as i32,
            [2usize, 2].as_ptr(),
            2,
            &mut out,
        )
    };
    assert_eq!(s, DeepportStatus::Ok);
    // SAFETY: live objects.
    assert_eq!(unsafe { deepport_add(b, x, y, out) }, DeepportStatus::Ok);
    assert_eq!(download_f32(b, out, 4), [1.5, 2.5, 3.5, 4.5]);

    // An output that is also an input is refused, not raced.
    // SAFETY: live objects.
    assert_eq!(
        unsafe { deepport_add(b, x, y, x) },
        DeepportStatus::InvalidArgument
    );
    assert!(last_error().contains("also an input"), "{}", last_error());
    // A shape the op rejects.
    let z = upload_f32(b, &[4], &[0.0; 4]);
    // SAFETY: live objects.
    assert_eq!(
        unsafe { deepport_add(b, x, z, out) },
        DeepportStatus::Invalid
    );
    assert!(
        last_error().contains("add: argument `b`"),
        "{}",
        last_error()
    );
    // NULL pointers.
    // SAFETY: NULLs are checked.
    assert_eq!(
        unsafe { deepport_add(b, null(), y, out) },
        DeepportStatus::InvalidArgument
    );
    assert!(
        last_error().contains("input tensor 0 is NULL"),
        "{}",
        last_error()
    );
    // SAFETY: NULL backend is checked.
    assert_eq!(
        unsafe { deepport_backend_synchronize(null()) },
        DeepportStatus::InvalidArgument
    );
    // A bad dtype code and a wrong byte count.
    let mut t = null_mut();
    // SAFETY: valid pointers.
    let s = unsafe { deepport_tensor_alloc(b, 99, [2usize].as_ptr(), 1, &mut t) };
    assert_eq!(s, DeepportStatus::InvalidArgument);
    assert!(last_error().contains("unknown dtype code 99"));
    let v = [0f32; 3];
    // SAFETY: valid pointers; the size mismatch is checked.
    let s = unsafe {
        deepport_tensor_upload(
            b,
            0,
            [4usize].as_ptr(),
            1,
            v.as_ptr().cast::<c_void>(),
            12,
            &mut t,
        )
    };
    assert_eq!(s, DeepportStatus::InvalidArgument);
    assert!(
        last_error().contains("has 16 bytes, the buffer 12"),
        "{}",
        last_error()
    );
    // Unknown and unavailable backends.
    let bad = CString::new("nope").unwrap();
    // SAFETY: valid pointers.
    let s = unsafe { deepport_backend_create(bad.as_ptr(), &mut null_mut()) };
    assert_eq!(s, DeepportStatus::UnknownBackend);
    // The message is per thread.
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    // SAFETY: each freed once.
    unsafe {
        for t in [x, y, z, out] {
            deepport_tensor_free(t);
        }
        deepport_backend_free(b);
    }
}

#[test]
fn generic_op_runs_any_op_on_host_tensors() {
    let b = cpu();
    let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0];
    let w = [1.0f32, 2.0];
    let names = [CString::new("x").unwrap(), CString::new("weight").unwrap()];
    let inputs = [
        DeepportHostTensor {
            name: names[0].as_ptr(),
            dtype: DeepportDType::F32 as i32,
            ndim: 2,
            shape: [3usize, 2].as_ptr(),
            data: x.as_ptr().cast(),
            nbytes: 24,
        },
        DeepportHostTensor {
            name: names[1].as_ptr(),
            dtype: DeepportDType::F32 as i32,
            ndim: 1,
            shape: [2usize].as_ptr(),
            data: w.as_ptr().cast(),
            nbytes: 8,
        },
    ];
    let op = CString::new("rms_norm").unwrap();
    let p = [
        CString::new("eps=0").unwrap(),
        CString::new("out_dtype=f32").unwrap(),
    ];
    let params = [p[0].as_ptr(), p[1].as_ptr()];
    let mut outs = null_mut();
    // SAFETY: every pointer is valid for its documented length.
    let s = unsafe {
        deepport_op_run(
            b,
            op.as_ptr(),
            inputs.as_ptr(),
            2,
            params.as_ptr(),
            1,
            &mut outs,
        )
    };
    assert_eq!(s, DeepportStatus::Ok, "{}", last_error());
    // SAFETY: live outputs.
    assert_eq!(unsafe { deepport_outputs_count(outs) }, 1);
    let (mut name, mut data, mut nbytes, mut dtype) = (null(), null(), 0usize, -1);
    // SAFETY: live outputs, valid out pointers.
    let s = unsafe {
        deepport_outputs_get(
            outs,
            0,
            &mut name,
            &mut dtype,
            null_mut(),
            null_mut(),
            &mut data,
            &mut nbytes,
        )
    };
    assert_eq!(s, DeepportStatus::Ok);
    // SAFETY: owned by `outs`.
    assert_eq!(unsafe { CStr::from_ptr(name) }.to_str().unwrap(), "y");
    assert_eq!(dtype, DeepportDType::F32 as i32);
    // SAFETY: `nbytes` bytes owned by `outs`.
    let y: Vec<f32> =
        unsafe { std::slice::from_raw_parts(data.cast::<f32>(), nbytes / 4) }.to_vec();
    // rms of (3, 4) = sqrt(12.5); of (0, 0) = 0 -> 0 with eps 0 gives NaN*0? use row 3: rms 1.
    let r = 12.5f32.sqrt();
    assert!(
        (y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6,
        "{y:?}"
    );
    assert_eq!(&y[4..], [1.0, 2.0]);
    // SAFETY: freed once.
    unsafe { deepport_outputs_free(outs) };

    // Unknown op, unknown parameter, missing tensor.
    let bad = CString::new("no_such_op").unwrap();
    // SAFETY: valid pointers.
    let s = unsafe { deepport_op_run(b, bad.as_ptr(), inputs.as_ptr(), 2, null(), 0, &mut outs) };
    assert_eq!(s, DeepportStatus::InvalidArgument);
    assert!(last_error().contains("unknown op `no_such_op`"));
    let bp = CString::new("epsilon=1").unwrap();
    // SAFETY: valid pointers.
    let s = unsafe {
        deepport_op_run(
            b,
            op.as_ptr(),
            inputs.as_ptr(),
            2,
            [bp.as_ptr()].as_ptr(),
            1,
            &mut outs,
        )
    };
    assert_eq!(s, DeepportStatus::InvalidArgument, "{}", last_error());
    // SAFETY: valid pointers.
    let s = unsafe { deepport_op_run(b, op.as_ptr(), inputs.as_ptr(), 1, null(), 0, &mut outs) };
    assert_eq!(s, DeepportStatus::InvalidArgument);
    assert!(last_error().contains("weight"), "{}", last_error());
    // SAFETY: freed once.
    unsafe { deepport_backend_free(b) };
}
