//! Host tensors and safetensors files: round trips, malformed files,
//! error messages that name the file and tensor, dtype conversions.

use deepport_core::tensor::{
    expect_tensor, parse_safetensors, read_safetensors, serialize_safetensors, write_safetensors,
    TensorFile,
};
use deepport_core::{DType, Error, HostTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "deepport-core-test-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One tensor of every dtype, with raw bytes chosen by hand.
fn sample_tensors() -> BTreeMap<String, HostTensor> {
    let mut m = BTreeMap::new();
    let all_codes: Vec<u8> = (0..=255u8).collect();
    for (name, dt) in [
        ("fp8.e4m3", DType::F8E4M3),
        ("fp8.e5m2", DType::F8E5M2),
        ("fp8.fnuz", DType::F8E4M3Fnuz),
        ("scale.ue8m0", DType::E8M0),
        ("raw.u8", DType::U8),
    ] {
        m.insert(
            name.to_string(),
            HostTensor::from_bytes(dt, &[16, 16], all_codes.clone()).unwrap(),
        );
    }
    // bf16 bits: 1.0, -2.0, +inf, NaN, smallest subnormal, -0.
    let bf: Vec<u8> = [0x3f80u16, 0xc000, 0x7f80, 0x7fc1, 0x0001, 0x8000]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    m.insert(
        "w.bf16".into(),
        HostTensor::from_bytes(DType::BF16, &[2, 3], bf).unwrap(),
    );
    let f16: Vec<u8> = [0x3c00u16, 0x7bff, 0xfc00, 0x7e01, 0x0001, 0x8000]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    m.insert(
        "w.f16".into(),
        HostTensor::from_bytes(DType::F16, &[3, 2], f16).unwrap(),
    );
    m.insert(
        "w.f32".into(),
        HostTensor::from_bytes(
            DType::F32,
            &[2, 2, 2],
            le_bytes_f32(&[
                1.5,
                -0.0,
                f32::MAX,
                f32::MIN_POSITIVE,
                f32::from_bits(1),
                f32::INFINITY,
                f32::from_bits(0x7fc0_1234),
                -3.25,
            ]),
        )
        .unwrap(),
    );
    m.insert(
        "idx.i32".into(),
        HostTensor::from_i32(&[5], &[0, -1, i32::MAX, i32::MIN, 42]),
    );
    m.insert(
        "idx.i64".into(),
        HostTensor::from_i64(&[2, 2], &[i64::MAX, i64::MIN, -1, 1 << 40]),
    );
    m.insert(
        "mask.bool".into(),
        HostTensor::from_bool(&[4], &[true, false, false, true]),
    );
    m.insert(
        "scalar.f32".into(),
        HostTensor::from_bytes(DType::F32, &[], le_bytes_f32(&[7.0])).unwrap(),
    );
    m.insert(
        "empty.f32".into(),
        HostTensor::from_bytes(DType::F32, &[0, 3], vec![]).unwrap(),
    );
    m
}

fn sample_metadata() -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert("deepport.case".to_string(), "round trip ✓".to_string());
    md
}

#[test]
fn safetensors_round_trip_every_dtype() {
    let dir = TempDir::new("roundtrip");
    let path = dir.path("all.safetensors");
    let tensors = sample_tensors();
    let md = sample_metadata();
    write_safetensors(&path, &tensors, &md).unwrap();
    let back = read_safetensors(&path).unwrap();
    assert_eq!(back.metadata, md);
    assert_eq!(
        back.tensors.keys().collect::<Vec<_>>(),
        tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &tensors {
        let b = &back.tensors[name];
        assert_eq!(b.dtype(), t.dtype(), "{name}");
        assert_eq!(b.shape(), t.shape(), "{name}");
        assert_eq!(b.bytes(), t.bytes(), "{name}: bytes differ");
    }
    // Decoded values survive too (spot checks written by hand).
    assert_eq!(back.tensors["fp8.e4m3"].get_f32(0x7e), 448.0);
    assert!(back.tensors["fp8.e4m3"].get_f32(0x7f).is_nan());
    assert_eq!(back.tensors["fp8.fnuz"].get_f32(0x7f), 240.0);
    assert_eq!(back.tensors["fp8.e5m2"].get_f32(0x7c), f32::INFINITY);
    assert_eq!(back.tensors["scale.ue8m0"].get_f32(127), 1.0);
    assert_eq!(back.tensors["w.bf16"].get_f32(1), -2.0);
    assert_eq!(back.tensors["w.f16"].get_f32(1), 65504.0);
    assert_eq!(
        back.tensors["idx.i64"].to_i64_vec(),
        vec![i64::MAX, i64::MIN, -1, 1 << 40]
    );
    assert_eq!(
        back.tensors["idx.i32"].to_i64_vec(),
        vec![0, -1, i32::MAX as i64, i32::MIN as i64, 42]
    );
    assert_eq!(back.tensors["mask.bool"].to_i64_vec(), vec![1, 0, 0, 1]);
    assert_eq!(back.tensors["scalar.f32"].to_f32_vec(), vec![7.0]);
    assert_eq!(back.tensors["empty.f32"].numel(), 0);

    // The safetensors dtype names on disk are the standard ones.
    let raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&raw[8..8 + n]).unwrap();
    for name in [
        "F8_E4M3",
        "F8_E5M2",
        "F8_E4M3FNUZ",
        "F8_E8M0",
        "BF16",
        "F16",
        "F32",
        "I32",
        "I64",
        "BOOL",
        "U8",
    ] {
        assert!(
            header.contains(&format!("\"{name}\"")),
            "{name} missing in {header}"
        );
    }
}

#[test]
fn round_trip_without_metadata() {
    let dir = TempDir::new("nometa");
    let path = dir.path("plain.safetensors");
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "x".to_string(),
        HostTensor::from_f32(DType::BF16, &[2], &[1.0, 2.0]),
    );
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let back = read_safetensors(&path).unwrap();
    assert!(back.metadata.is_empty());
    assert_eq!(back.tensors["x"], tensors["x"]);
}

fn assert_names(err: &Error, parts: &[&str]) {
    let s = err.to_string();
    for p in parts {
        assert!(s.contains(p), "error {s:?} does not name {p:?}");
    }
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let dir = TempDir::new("trunc");
    let good = dir.path("good.safetensors");
    write_safetensors(&good, &sample_tensors(), &sample_metadata()).unwrap();
    let raw = std::fs::read(&good).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let data_len = raw.len() - 8 - n;
    assert!(data_len > 8);
    let cuts = [
        0,
        1,
        7,
        8,
        9,
        8 + n / 2,
        8 + n - 1,
        8 + n,
        8 + n + 1,
        8 + n + data_len / 2,
        raw.len() - 1,
    ];
    for cut in cuts {
        let path = dir.path(&format!("cut-{cut}.safetensors"));
        std::fs::write(&path, &raw[..cut]).unwrap();
        let err = read_safetensors(&path).expect_err(&format!("cut at {cut} accepted"));
        assert_names(&err, &[&path.display().to_string()]);
        assert!(matches!(err, Error::Format { .. }), "cut {cut}: {err:?}");
    }
    // Trailing garbage is not silently accepted either.
    let path = dir.path("long.safetensors");
    let mut long = raw.clone();
    long.extend_from_slice(&[0; 3]);
    std::fs::write(&path, &long).unwrap();
    let err = read_safetensors(&path).unwrap_err();
    assert_names(&err, &[&path.display().to_string()]);
}

/// A file with a hand-written JSON header and `data` after it.
fn handmade(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn malformed_headers_are_errors_naming_the_file() {
    let dir = TempDir::new("bad");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", handmade("this is not json at all!", &[0; 16])),
        ("binary", {
            let mut v = 12u64.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xff, 0xfe, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            v
        }),
        ("huge-len", {
            let mut v = u64::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
        ("len-past-end", {
            let mut v = 1000u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
        (
            "offsets-past-data",
            handmade(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
        ),
        (
            "offsets-vs-shape",
            handmade(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
                &[0; 12],
            ),
        ),
        (
            "offsets-reversed",
            handmade(
                r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#,
                &[0; 8],
            ),
        ),
        (
            "shape-overflow",
            handmade(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
        ),
        (
            "unknown-dtype",
            handmade(
                r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                &[0; 1],
            ),
        ),
        ("not-an-object", handmade(r#"[1, 2, 3]"#, &[])),
        ("empty", Vec::new()),
    ];
    for (tag, bytes) in cases {
        let path = dir.path(&format!("{tag}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let err = read_safetensors(&path).expect_err(tag);
        assert_names(&err, &[&path.display().to_string()]);
        // parse_safetensors names the path it is given as well.
        let fake = Path::new("/some/where/model-00001.safetensors");
        let err = parse_safetensors(fake, &bytes).expect_err(tag);
        assert_names(&err, &["/some/where/model-00001.safetensors"]);
    }
}

#[test]
fn unsupported_dtype_names_file_and_tensor() {
    // F64 is valid safetensors but not a deepport dtype.
    let bytes = handmade(
        r#"{"weird.weight":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let p = Path::new("ckpt/x.safetensors");
    let err = parse_safetensors(p, &bytes).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    assert_names(&err, &["ckpt/x.safetensors", "weird.weight", "F64"]);
}

#[test]
fn missing_file_is_io_error_naming_it() {
    let dir = TempDir::new("missing");
    let path = dir.path("nope.safetensors");
    let err = read_safetensors(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names(&err, &[&path.display().to_string()]);
    // Writing into a directory that does not exist names the target.
    let bad = dir.path("no/such/dir/out.safetensors");
    let err = write_safetensors(&bad, &sample_tensors(), &BTreeMap::new()).unwrap_err();
    assert_names(&err, &[&bad.display().to_string()]);
}

#[test]
fn get_missing_tensor_names_tensor_and_file() {
    let bytes = serialize_safetensors(&sample_tensors(), &BTreeMap::new()).unwrap();
    let p = Path::new("/models/v3/model-00007-of-00163.safetensors");
    let f: TensorFile = parse_safetensors(p, &bytes).unwrap();
    assert_eq!(f.get(p, "w.bf16").unwrap().dtype(), DType::BF16);
    let err = f
        .get(p, "model.layers.3.mlp.gate.weight")
        .expect_err("missing tensor");
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "/models/v3/model-00007-of-00163.safetensors",
            "model.layers.3.mlp.gate.weight",
        ],
    );
}

#[test]
fn expect_tensor_names_file_and_tensor() {
    let p = Path::new("dir/file.safetensors");
    let t = HostTensor::from_f32(DType::BF16, &[4, 8], &[0.0; 32]);
    expect_tensor(p, "w", &t, &[DType::BF16], &[4, 8]).unwrap();
    expect_tensor(p, "w", &t, &[DType::F32, DType::BF16], &[4, 8]).unwrap();

    let err = expect_tensor(p, "layer.w", &t, &[DType::F8E4M3], &[4, 8]).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    assert_names(&err, &["dir/file.safetensors", "layer.w", "bf16", "e4m3"]);

    let err = expect_tensor(p, "layer.w", &t, &[DType::BF16], &[8, 4]).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    assert_names(
        &err,
        &["dir/file.safetensors", "layer.w", "[4, 8]", "[8, 4]"],
    );

    let err = expect_tensor(p, "layer.w", &t, &[DType::BF16], &[4, 8, 1]).unwrap_err();
    assert_names(&err, &["layer.w", "[4, 8, 1]"]);
}

#[test]
fn from_bytes_checks_length() {
    assert!(HostTensor::from_bytes(DType::F32, &[2, 3], vec![0; 24]).is_ok());
    for len in [0, 23, 25, 6] {
        let err = HostTensor::from_bytes(DType::F32, &[2, 3], vec![0; len]).unwrap_err();
        assert_names(&err, &["24", &len.to_string()]);
    }
    assert!(HostTensor::from_bytes(DType::BF16, &[3], vec![0; 3]).is_err());
    assert!(HostTensor::from_bytes(DType::I64, &[1], vec![0; 4]).is_err());
    assert!(HostTensor::from_bytes(DType::F8E4M3, &[5], vec![0; 5]).is_ok());
    // A shape whose byte size overflows usize is an error, not a panic or
    // a wrapped-around size.
    assert!(HostTensor::from_bytes(DType::F32, &[usize::MAX, 2], vec![]).is_err());
    assert!(HostTensor::from_bytes(DType::F32, &[1 << 62, 4], vec![]).is_err());
    assert!(HostTensor::from_bytes(DType::I64, &[1 << 61], vec![]).is_err());
}

#[test]
fn reshape_checks_numel() {
    let t = HostTensor::from_i32(&[2, 3], &[1, 2, 3, 4, 5, 6]);
    let r = t.clone().reshape(&[3, 2]).unwrap();
    assert_eq!(r.shape(), &[3, 2]);
    assert_eq!(r.to_i64_vec(), vec![1, 2, 3, 4, 5, 6]);
    assert!(t.reshape(&[4, 2]).is_err());
}

#[test]
fn to_dtype_conversions() {
    // f32 → bf16: round to nearest even, once.
    let x = HostTensor::from_bytes(
        DType::F32,
        &[4],
        le_bytes_f32(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, f32::NAN]),
    )
    .unwrap();
    let b = x.to_dtype(DType::BF16);
    assert_eq!(b.dtype(), DType::BF16);
    assert_eq!(b.shape(), &[4]);
    let bits: Vec<u16> = b
        .bytes()
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(&bits[..3], &[0x3f80, 0x3f82, 0xc020]);
    assert_eq!(bits[3] & 0x7f80, 0x7f80);
    assert_ne!(bits[3] & 0x007f, 0, "NaN became inf");

    // f32 → e4m3 saturates; → fnuz; → e5m2 overflows.
    let x = HostTensor::from_bytes(
        DType::F32,
        &[5],
        le_bytes_f32(&[464.0, -1e9, 1.0625, 0.0, -0.0]),
    )
    .unwrap();
    assert_eq!(
        x.to_dtype(DType::F8E4M3).bytes(),
        &[0x7e, 0xfe, 0x38, 0x00, 0x80]
    );
    assert_eq!(
        x.to_dtype(DType::F8E4M3Fnuz).bytes(),
        &[0x7f, 0xff, 0x40, 0x00, 0x00]
    );
    assert_eq!(
        x.to_dtype(DType::F8E5M2).bytes(),
        &[0x5f, 0xfc, 0x3c, 0x00, 0x80]
    );
    // fp8 → f32 is exact.
    let q = HostTensor::from_bytes(DType::F8E4M3, &[4], vec![0x7e, 0x01, 0xb8, 0x7f]).unwrap();
    let f = q.to_dtype(DType::F32).to_f32_vec();
    assert_eq!(&f[..3], &[448.0, 1.0 / 512.0, -1.0]);
    assert!(f[3].is_nan());
    // fp8 → fp8 goes through f32: e4m3 448 saturates to fnuz 240.
    assert_eq!(
        q.to_dtype(DType::F8E4M3Fnuz).bytes(),
        &[0x7f, 0x02, 0xc0, 0x80]
    );

    // Integers: exact within range.
    let i = HostTensor::from_i32(&[4], &[-7, 0, 3, i32::MAX]);
    let l = i.to_dtype(DType::I64);
    assert_eq!(l.dtype(), DType::I64);
    assert_eq!(l.to_i64_vec(), vec![-7, 0, 3, i32::MAX as i64]);
    let back = HostTensor::from_i64(&[3], &[-5, 1 << 20, 9]).to_dtype(DType::I32);
    assert_eq!(back.dtype(), DType::I32);
    assert_eq!(back.to_i64_vec(), vec![-5, 1 << 20, 9]);
    let m = i.to_dtype(DType::Bool);
    assert_eq!(m.dtype(), DType::Bool);
    assert_eq!(m.bytes(), &[1, 0, 1, 1]);
    let mi = HostTensor::from_bool(&[3], &[true, false, true]).to_dtype(DType::I32);
    assert_eq!(mi.to_i64_vec(), vec![1, 0, 1]);
    // int → float, float → int (truncation toward zero).
    assert_eq!(
        i.to_dtype(DType::F32).to_f32_vec(),
        vec![-7.0, 0.0, 3.0, 2147483648.0]
    );
    let fl = HostTensor::from_bytes(DType::F32, &[3], le_bytes_f32(&[2.7, -2.7, 100.0])).unwrap();
    assert_eq!(fl.to_dtype(DType::I32).to_i64_vec(), vec![2, -2, 100]);
    assert_eq!(fl.to_dtype(DType::I64).to_i64_vec(), vec![2, -2, 100]);

    // UE8M0 scales: values, not raw bytes, whatever the source dtype.
    let s = HostTensor::from_bytes(DType::F32, &[3], le_bytes_f32(&[1.0, 3.0, 0.25])).unwrap();
    let e = s.to_dtype(DType::E8M0);
    assert_eq!(e.bytes(), &[127, 129, 125]);
    assert_eq!(e.to_dtype(DType::F32).to_f32_vec(), vec![1.0, 4.0, 0.25]);
    assert_eq!(e.to_dtype(DType::I32).to_i64_vec(), vec![1, 4, 0]);
    let from_int = HostTensor::from_i32(&[2], &[1, 4]).to_dtype(DType::E8M0);
    assert_eq!(from_int.dtype(), DType::E8M0);
    assert_eq!(from_int.to_f32_vec(), vec![1.0, 4.0]);

    // Same dtype: a copy.
    assert_eq!(i.to_dtype(DType::I32), i);
}

#[test]
fn from_f32_and_readers() {
    let t = HostTensor::from_f32(DType::BF16, &[2, 2], &[1.0, 1.0 + 1.0 / 256.0, -0.5, 3.0]);
    assert_eq!(t.to_f32_vec(), vec![1.0, 1.0, -0.5, 3.0]);
    assert_eq!(t.get_f32(3), 3.0);
    let z = HostTensor::zeros(DType::F8E4M3Fnuz, &[3]);
    assert_eq!(z.to_f32_vec(), vec![0.0; 3]);
    let full = HostTensor::full(DType::F8E4M3, &[2], 1000.0);
    assert_eq!(full.bytes(), &[0x7e, 0x7e]);
    let ix = HostTensor::from_index(DType::I32, &[2], &[5, -1]);
    assert_eq!(ix.dtype(), DType::I32);
    assert_eq!(ix.bytes().len(), 8);
    assert_eq!(ix.to_i64_vec(), vec![5, -1]);
    let ix = HostTensor::from_index(DType::I64, &[2], &[5, -1]);
    assert_eq!(ix.dtype(), DType::I64);
    assert_eq!(ix.bytes().len(), 16);
}

#[test]
fn first_non_finite_reports_position() {
    let t = HostTensor::from_bytes(
        DType::F32,
        &[2, 3],
        le_bytes_f32(&[0.0, 1.0, 2.0, 3.0, f32::INFINITY, f32::NAN]),
    )
    .unwrap();
    let (pos, v) = t.first_non_finite().unwrap();
    assert_eq!(pos, vec![1, 1]);
    assert_eq!(v, f32::INFINITY);
    let q = HostTensor::from_bytes(DType::F8E4M3, &[2, 2], vec![0, 1, 0x7f, 0]).unwrap();
    assert_eq!(q.first_non_finite().unwrap().0, vec![1, 0]);
    let fnuz = HostTensor::from_bytes(DType::F8E4M3Fnuz, &[2], vec![0x7f, 0xff]).unwrap();
    assert!(fnuz.first_non_finite().is_none());
    let s = HostTensor::from_bytes(DType::E8M0, &[3], vec![127, 0, 0xff]).unwrap();
    assert_eq!(s.first_non_finite().unwrap().0, vec![2]);
    assert!(HostTensor::from_i32(&[1], &[-1])
        .first_non_finite()
        .is_none());
}

/// `deepport forward --out` files must be comparable byte for byte: the
/// same tensors and metadata give the same bytes, with the metadata in key
/// order (the safetensors crate alone writes it in a `HashMap`'s order).
#[test]
fn serialized_bytes_are_deterministic_and_metadata_sorted() {
    let meta: BTreeMap<String, String> = (0..12)
        .map(|i| (format!("key{:02}", 11 - i), format!("value \"{i}\"\n")))
        .collect();
    let first = serialize_safetensors(&sample_tensors(), &meta).unwrap();
    for _ in 0..16 {
        assert_eq!(
            serialize_safetensors(&sample_tensors(), &meta).unwrap(),
            first
        );
    }
    let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0, "the header is padded to 8 bytes");
    let header = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
    let positions: Vec<usize> = meta
        .keys()
        .map(|k| header.find(k.as_str()).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "metadata keys in order: {header}"
    );
    // Both the safetensors crate and deepport read it back.
    let f = parse_safetensors(Path::new("m.safetensors"), &first).unwrap();
    assert_eq!(f.metadata, meta);
    for (name, t) in sample_tensors() {
        assert_eq!(
            f.get(Path::new("m.safetensors"), &name).unwrap().bytes(),
            t.bytes()
        );
    }
    // No tensors at all, metadata only.
    let only = serialize_safetensors(&BTreeMap::new(), &meta).unwrap();
    let f = parse_safetensors(Path::new("e.safetensors"), &only).unwrap();
    assert_eq!(f.metadata, meta);
}
