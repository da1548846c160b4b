//! `deepport_op_launch`: every local op of `OpKind::ALL` on device tensors
//! through the C ABI gives the bytes the Rust API gives (`opspec::run`, the
//! path of `deepport op`), and bad calls are status codes with messages.
//!
//! Inputs come from the committed golden op files where one exists for the
//! op (with its parameters), and from small hand-made tensors otherwise; a
//! declared local op with neither fails `every_local_op_on_device_tensors`
//! until it gets inputs here.

use deepport::*;
use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_core::ops::OpKind;
use deepport_core::tensor::read_safetensors;
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: deepport_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(deepport_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn backend(spec: &str) -> *mut DeepportBackend {
    let mut b = null_mut();
    let s = CString::new(spec).unwrap();
    // SAFETY: valid string and out pointer.
    let st = unsafe { deepport_backend_create(s.as_ptr(), &mut b) };
    assert_eq!(st, DeepportStatus::Ok, "{}", last_error());
    b
}

const DTYPES: [DType; 11] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E4M3Fnuz,
    DType::F8E5M2,
    DType::E8M0,
    DType::I32,
    DType::I64,
    DType::U8,
    DType::Bool,
];

fn code(d: DType) -> i32 {
    DTYPES.iter().position(|x| *x == d).unwrap() as i32
}

fn upload(b: *mut DeepportBackend, h: &HostTensor) -> *mut DeepportTensor {
    let mut t = null_mut();
    // SAFETY: valid pointers and sizes.
    let st = unsafe {
        deepport_tensor_upload(
            b,
            code(h.dtype()),
            h.shape().as_ptr(),
            h.shape().len(),
            h.bytes().as_ptr().cast(),
            h.bytes().len(),
            &mut t,
        )
    };
    assert_eq!(st, DeepportStatus::Ok, "{}", last_error());
    t
}

fn download(b: *mut DeepportBackend, t: *mut DeepportTensor, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: `v` has n bytes.
    let st = unsafe { deepport_tensor_download(b, t, v.as_mut_ptr().cast(), n) };
    assert_eq!(st, DeepportStatus::Ok, "{}", last_error());
    v
}

fn free(t: *mut DeepportTensor) {
    // SAFETY: made by deepport, freed once.
    unsafe { deepport_tensor_free(t) };
}

/// `deepport op`'s poisoning of outputs (NaN, or all-ones bytes), so that
/// elements an op leaves unwritten compare equal too.
fn poisoned(dtype: DType, shape: &[usize]) -> HostTensor {
    if dtype.is_float() {
        HostTensor::from_f32(
            dtype,
            shape,
            &vec![f32::NAN; shape.iter().product::<usize>()],
        )
    } else {
        let n = shape.iter().product::<usize>() * dtype.size();
        HostTensor::from_bytes(dtype, shape, vec![0xff; n]).unwrap()
    }
}

/// Runs `op` through the C ABI on device tensors.
fn launch(
    b: *mut DeepportBackend,
    op: &str,
    tensors: &[(&str, *mut DeepportTensor)],
    params: &str,
) -> DeepportStatus {
    let op = CString::new(op).unwrap();
    let names: Vec<CString> = tensors
        .iter()
        .map(|(n, _)| CString::new(*n).unwrap())
        .collect();
    let np: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let tp: Vec<*const DeepportTensor> = tensors.iter().map(|(_, t)| t.cast_const()).collect();
    let params = CString::new(params).unwrap();
    // SAFETY: valid strings, arrays of `n` entries, live tensors.
    unsafe {
        deepport_op_launch(
            b,
            op.as_ptr(),
            np.as_ptr(),
            tp.as_ptr(),
            tensors.len(),
            params.as_ptr(),
        )
    }
}

fn params_vec(params: &str) -> Vec<String> {
    params
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Runs one op both ways on the `cpu` backend and compares every output
/// byte for byte.
fn same_bytes(op: &str, inputs: &BTreeMap<String, HostTensor>, params: &str) {
    let spec = opspec::find(op).unwrap();
    let rust_b = deepport_conformance::registry().create("cpu").unwrap();
    let mut p = Params::parse(spec, &params_vec(params)).unwrap();
    let want = opspec::run(
        spec,
        rust_b.as_ref(),
        &Inputs::new("test", spec.name, inputs.clone()),
        &mut p,
    )
    .unwrap_or_else(|e| panic!("{op} through the Rust API: {e}"));

    let b = backend("cpu");
    let mut bound: Vec<(String, *mut DeepportTensor)> = Vec::new();
    for (n, h) in inputs {
        bound.push((n.clone(), upload(b, h)));
    }
    for (n, w) in &want {
        if !inputs.contains_key(n) {
            bound.push((n.clone(), upload(b, &poisoned(w.dtype(), w.shape()))));
        }
    }
    let refs: Vec<(&str, *mut DeepportTensor)> =
        bound.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let st = launch(b, op, &refs, params);
    assert_eq!(st, DeepportStatus::Ok, "{op}: {}", last_error());
    for (n, w) in &want {
        let t = bound.iter().find(|(m, _)| m == n).unwrap().1;
        let got = download(b, t, w.bytes().len());
        assert!(
            got == w.bytes(),
            "{op}: output `{n}` differs from the Rust API's"
        );
    }
    for (_, t) in bound {
        free(t);
    }
    // SAFETY: made by deepport, freed once.
    unsafe { deepport_backend_free(b) };
}

fn golden_inputs() -> BTreeMap<String, (BTreeMap<String, HostTensor>, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/ops");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // The smallest file of each op, skipping degenerate ones (every row
    // masked, empty sequences) so that real values are compared.
    files.retain(|p| {
        let n = p.to_string_lossy();
        !n.contains("fully_masked") && !n.contains("zero_len")
    });
    files.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let mut out = BTreeMap::new();
    for f in files {
        let tf = read_safetensors(&f).unwrap();
        let op = tf.metadata["op"].replace('-', "_");
        if out.contains_key(&op) {
            continue;
        }
        let params = tf
            .metadata
            .get("params")
            .map(|j| {
                let v: serde_json::Value = serde_json::from_str(j).unwrap();
                v.as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        v => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let inputs = tf
            .tensors
            .into_iter()
            .filter(|(n, _)| !n.starts_with("expected."))
            .collect();
        out.insert(op, (inputs, params));
    }
    out
}

fn f32s(shape: &[usize], seed: u32) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed * 7919)
                % 1000;
            x as f32 / 250.0 - 2.0
        })
        .collect()
}

fn t(dtype: DType, shape: &[usize], seed: u32) -> HostTensor {
    HostTensor::from_f32(dtype, shape, &f32s(shape, seed))
}

fn idx(dtype: DType, shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_index(dtype, shape, v)
}

/// Small inputs for the ops without golden files.
fn hand_made(op: &str) -> Option<(Vec<(&'static str, HostTensor)>, &'static str)> {
    Some(match op {
        "weight_dequant" => (
            vec![
                ("w", t(DType::F8E4M3, &[130, 200], 1)),
                ("s", t(DType::F32, &[2, 2], 2)),
            ],
            "out_dtype=f32",
        ),
        "gemm" => (
            vec![
                ("a", t(DType::F32, &[3, 5], 3)),
                ("b", t(DType::F32, &[4, 5], 4)),
            ],
            "out_dtype=bf16",
        ),
        "gemm_grouped_contiguous" => (
            vec![
                ("a", t(DType::F32, &[4, 6], 5)),
                ("b", t(DType::F32, &[2, 3, 6], 6)),
                ("m_indices", idx(DType::I32, &[4], &[0, 0, 1, -1])),
            ],
            "",
        ),
        "mla_prefill" => (
            vec![
                ("q_nope", t(DType::F32, &[3, 2, 8], 7)),
                ("q_pe", t(DType::F32, &[3, 2, 4], 8)),
                ("latent", t(DType::F32, &[3, 16], 9)),
                ("k_pe", t(DType::F32, &[3, 4], 10)),
                ("wkv_b", t(DType::F32, &[32, 16], 11)),
            ],
            "head_dim_v=8,form=naive",
        ),
        "silu_mul" => (
            vec![
                ("gate", t(DType::F32, &[2, 7], 12)),
                ("up", t(DType::F32, &[2, 7], 13)),
            ],
            "",
        ),
        "embedding" => (
            vec![
                ("table", t(DType::BF16, &[5, 6], 14)),
                ("ids", idx(DType::I32, &[4], &[4, 0, 2, 4])),
            ],
            "",
        ),
        "add" => (
            vec![
                ("a", t(DType::BF16, &[3, 4], 15)),
                ("b", t(DType::BF16, &[3, 4], 16)),
            ],
            "",
        ),
        "copy_window" => (
            vec![
                ("src", t(DType::F32, &[4, 6], 17)),
                ("dst", t(DType::F32, &[5, 7], 18)),
            ],
            "src_row=1,dst_col=2,rows=2,cols=3",
        ),
        "gather_rows" => (
            vec![
                ("src", t(DType::F32, &[5, 3], 19)),
                ("index", idx(DType::I32, &[4], &[4, -1, 0, 2])),
            ],
            "",
        ),
        "reduce_rows" => (
            vec![
                ("src", t(DType::F32, &[5, 4], 20)),
                ("index", idx(DType::I32, &[3, 2], &[0, 4, -1, 1, 3, 3])),
                ("weights", t(DType::F32, &[3, 2], 21)),
            ],
            "out_dtype=f32",
        ),
        "get_dispatch_layout" => (
            vec![(
                "topk_idx",
                idx(DType::I64, &[4, 2], &[0, 5, 7, -1, 3, 2, 6, 1]),
            )],
            "num_experts=8,world_size=2",
        ),
        _ => return None,
    })
}

#[test]
fn every_local_op_on_device_tensors() {
    let golden = golden_inputs();
    let mut missing = Vec::new();
    let mut ran = 0;
    for kind in OpKind::ALL.into_iter().filter(|k| k.is_local()) {
        let op = kind.name();
        if let Some((inputs, params)) = hand_made(op) {
            let inputs = inputs
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect();
            same_bytes(op, &inputs, params);
        } else if let Some((inputs, params)) = golden.get(op) {
            same_bytes(op, inputs, params);
        } else {
            missing.push(op);
            continue;
        }
        ran += 1;
    }
    assert!(
        missing.is_empty(),
        "no inputs for {missing:?} in capi/tests/device_ops.rs (add them to hand_made)"
    );
    assert!(ran >= 20, "{ran} ops ran");
}

fn expect(st: DeepportStatus, want: DeepportStatus, needle: &str) {
    let msg = last_error();
    assert_eq!(st, want, "{msg}");
    assert!(msg.contains(needle), "`{needle}` not in: {msg}");
}

#[test]
fn bad_launches_are_status_codes() {
    use DeepportStatus as S;
    let b = backend("cpu");
    let x = upload(b, &t(DType::F32, &[2, 3], 1));
    let y = upload(b, &t(DType::F32, &[2, 3], 2));
    let out = upload(b, &poisoned(DType::F32, &[2, 3]));
    let small = upload(b, &poisoned(DType::F32, &[2, 2]));
    let half = upload(b, &poisoned(DType::BF16, &[2, 3]));
    let ints = upload(b, &idx(DType::I32, &[2, 3], &[0; 6]));

    // It works, and the output is a + b.
    assert_eq!(
        launch(b, "add", &[("a", x), ("b", y), ("out", out)], ""),
        S::Ok
    );
    let got = download(b, out, 24);
    let want: Vec<f32> = f32s(&[2, 3], 1)
        .iter()
        .zip(f32s(&[2, 3], 2))
        .map(|(a, b)| a + b)
        .collect();
    let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(got, want);

    expect(
        launch(b, "no_such_op", &[], ""),
        S::InvalidArgument,
        "unknown op `no_such_op`",
    );
    expect(
        launch(b, "add", &[("a", x), ("c", y), ("out", out)], ""),
        S::InvalidArgument,
        "add has no tensor `c`",
    );
    expect(
        launch(b, "add", &[("a", x), ("out", out)], ""),
        S::InvalidArgument,
        "needs tensor `b`",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", y)], ""),
        S::InvalidArgument,
        "output `out` (f32 [2, 3]) is not given",
    );
    expect(
        launch(b, "add", &[("a", x), ("a", y), ("out", out)], ""),
        S::InvalidArgument,
        "more than once",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", x), ("out", out)], ""),
        S::InvalidArgument,
        "same tensor",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", y), ("out", small)], ""),
        S::Invalid,
        "output `out` is f32 [2, 2], but the op makes f32 [2, 3]",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", y), ("out", half)], ""),
        S::Invalid,
        "output `out` is bf16 [2, 3]",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", ints), ("out", out)], ""),
        S::Invalid,
        "add",
    );
    expect(
        launch(b, "add", &[("a", x), ("b", y), ("out", out)], "eps=1"),
        S::InvalidArgument,
        "unknown parameter `eps`",
    );
    expect(
        launch(
            b,
            "rms_norm",
            &[("x", x), ("weight", y), ("y", out)],
            "eps=abc",
        ),
        S::InvalidArgument,
        "parameter `eps` got `abc`",
    );
    // The gemm's output dtype follows out_dtype.
    let w = upload(b, &t(DType::F32, &[3, 3], 5));
    let d = upload(b, &poisoned(DType::BF16, &[2, 3]));
    expect(
        launch(b, "gemm", &[("a", x), ("b", w), ("d", d)], ""),
        S::Invalid,
        "out_dtype",
    );
    assert_eq!(
        launch(b, "gemm", &[("a", x), ("b", w), ("d", d)], "out_dtype=bf16"),
        S::Ok,
        "{}",
        last_error()
    );
    // Expert-parallel ops need a rank group.
    expect(
        launch(b, "dispatch", &[("x", x)], ""),
        S::NotSupported,
        "expert-parallel",
    );
    // A tensor of another backend instance.
    let other = backend("cpu-ref");
    let foreign = upload(other, &t(DType::F32, &[2, 3], 3));
    expect(
        launch(b, "add", &[("a", x), ("b", foreign), ("out", out)], ""),
        S::Device,
        "tensor `b`",
    );
    // An index out of range: now or at the next synchronize, never lost.
    let table = upload(b, &t(DType::F32, &[4, 3], 6));
    let ids = upload(b, &idx(DType::I32, &[2], &[1, 9]));
    let st = launch(
        b,
        "embedding",
        &[("table", table), ("ids", ids), ("out", out)],
        "",
    );
    let st = if st == S::Ok {
        // SAFETY: live backend.
        unsafe { deepport_backend_synchronize(b) }
    } else {
        st
    };
    assert_eq!(st, S::IndexOutOfRange, "{}", last_error());

    // NULL pointers.
    let op = CString::new("add").unwrap();
    // SAFETY: NULL arguments are what is being tested; n is 0 or the arrays are NULL.
    unsafe {
        expect(
            deepport_op_launch(null(), op.as_ptr(), null(), null(), 0, null()),
            S::InvalidArgument,
            "backend is NULL",
        );
        expect(
            deepport_op_launch(b, null(), null(), null(), 0, null()),
            S::InvalidArgument,
            "op is NULL",
        );
        expect(
            deepport_op_launch(b, op.as_ptr(), null(), null(), 3, null()),
            S::InvalidArgument,
            "NULL",
        );
        let names = [CString::new("a").unwrap()];
        let np = [names[0].as_ptr()];
        let tp: [*const DeepportTensor; 1] = [null()];
        expect(
            deepport_op_launch(b, op.as_ptr(), np.as_ptr(), tp.as_ptr(), 1, null()),
            S::InvalidArgument,
            "tensors[0] (`a`) is NULL",
        );
    }
    for p in [x, y, out, small, half, ints, w, d, foreign, table, ids] {
        free(p);
    }
    // SAFETY: made by deepport, freed once.
    unsafe {
        deepport_backend_free(b);
        deepport_backend_free(other);
    }
}
