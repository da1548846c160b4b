//! `gather_rows` and `reduce_rows` (the kernels of core's expert-parallel
//! protocol) against cpu-ref on adversarial shapes: odd row byte sizes
//! (1-byte FP8 and 2-byte bf16 rows sharing words), −1 entries, zero rows,
//! i32 and i64 indices, views of `src` at unaligned offsets, and tensors
//! beyond a capped storage binding limit (windows).
//!
//! Judged: gather bit for bit; reduce within `calc_diff < 5e-6` and one
//! output ulp per element of cpu-ref, bit-identical from run to run and
//! with or without windows; a bad index is `IndexOutOfRange`.

use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::{run, GatherRows, ReduceRows};
use deepport_core::{DType, HostTensor};
use deepport_cpu::CpuRef;
use deepport_wgpu::WgpuOptions;

mod common;
use common::{assert_index_error, calc_diff, make, poisoned, shared, ulp, Rng};

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x0a0b_5eed)
}

fn random_bytes(r: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| r.next() as u8).collect()
}

/// `m` entries in `[0, s)` or −1 (about one in five), as `dtype`.
fn index(r: &mut Rng, m: usize, s: usize, dtype: DType) -> HostTensor {
    let v: Vec<i64> = (0..m)
        .map(|_| {
            if s == 0 || r.below(5) == 0 {
                -1
            } else {
                r.below(s as u64) as i64
            }
        })
        .collect();
    match dtype {
        DType::I32 => HostTensor::from_i32(&[m], &v.iter().map(|&x| x as i32).collect::<Vec<_>>()),
        _ => HostTensor::from_i64(&[m], &v),
    }
}

fn gather_on(
    b: &dyn Backend,
    src: &HostTensor,
    view: Option<(usize, usize)>,
    idx: &HostTensor,
) -> HostTensor {
    let s = b.upload(src).unwrap();
    let s = match view {
        Some((start, count)) => s.rows(start, count).unwrap(),
        None => s,
    };
    let i = b.upload(idx).unwrap();
    let mut shape = s.shape().to_vec();
    shape[0] = idx.shape()[0];
    let mut d = poisoned(b, src.dtype(), &shape);
    run(
        b,
        GatherRows {
            src: &s,
            index: &i,
            dst: &mut d,
        },
    )
    .unwrap();
    b.download(&d).unwrap()
}

/// Equal bytes, or a panic naming the first differing byte (not the
/// whole tensors).
fn assert_same_bytes(got: &HostTensor, want: &HostTensor, what: &str) {
    assert_eq!(got.bytes().len(), want.bytes().len(), "{what}: sizes");
    if let Some(i) = got
        .bytes()
        .iter()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
    {
        panic!(
            "{what}: byte {i} (of {}) is {:#04x}, expected {:#04x}",
            got.bytes().len(),
            got.bytes()[i],
            want.bytes()[i]
        );
    }
}

#[test]
fn gather_rows_is_bit_exact() {
    let Some(w) = shared() else { return };
    let Some(capped) = make(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    let mut r = rng(1);
    let mut cases = 0;
    for dtype in [DType::F8E4M3, DType::BF16, DType::F32, DType::I64] {
        for row in [&[1usize][..], &[3], &[5], &[2, 3], &[0], &[33], &[128]] {
            for (s, m) in [
                (0, 0),
                (0, 5),
                (1, 1),
                (7, 13),
                (50, 40),
                (97, 200),
                (700, 900),
            ] {
                for idt in [DType::I32, DType::I64] {
                    let row_n: usize = row.iter().product();
                    let mut shape = vec![s];
                    shape.extend_from_slice(row);
                    let src = HostTensor::from_bytes(
                        dtype,
                        &shape,
                        random_bytes(&mut r, s * row_n * dtype.size()),
                    )
                    .unwrap();
                    let idx = index(&mut r, m, s, idt);
                    let want = gather_on(&CpuRef, &src, None, &idx);
                    for (b, name) in [(w as &dyn Backend, "wgpu"), (&capped, "capped")] {
                        let got = gather_on(b, &src, None, &idx);
                        assert_same_bytes(
                            &got,
                            &want,
                            &format!("{name}: {dtype} row {row:?}, S {s}, M {m}, {idt}"),
                        );
                    }
                    // A view of src rows [1, s): element offsets that leave
                    // the data at any byte of a word.
                    if s > 1 {
                        let idx = index(&mut r, m, s - 1, idt);
                        let want = gather_on(&CpuRef, &src, Some((1, s - 1)), &idx);
                        for (b, name) in [(w as &dyn Backend, "wgpu"), (&capped, "capped")] {
                            let got = gather_on(b, &src, Some((1, s - 1)), &idx);
                            assert_same_bytes(
                                &got,
                                &want,
                                &format!("{name}: view, {dtype} row {row:?}, S {s}, M {m}, {idt}"),
                            );
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 0);
}

struct Reduce {
    src: HostTensor,
    index: HostTensor,
    weights: Option<HostTensor>,
    out: DType,
}

/// `(S, N, K, h)`, `(src, out, index)` dtypes.
fn reduce_case(
    r: &mut Rng,
    (s, n, k, h): (usize, usize, usize, usize),
    (sdt, out, idt): (DType, DType, DType),
    weighted: bool,
) -> Reduce {
    let src = HostTensor::from_f32(sdt, &[s, h], &r.normals(s * h, 1.0));
    let index = index(r, n * k, s, idt).reshape(&[n, k]).unwrap();
    let weights = weighted.then(|| {
        let v: Vec<f32> = (0..n * k).map(|_| r.uniform() as f32).collect();
        HostTensor::from_f32(DType::F32, &[n, k], &v)
    });
    Reduce {
        src,
        index,
        weights,
        out,
    }
}

fn reduce_on(b: &dyn Backend, c: &Reduce, view: bool) -> HostTensor {
    let s: Tensor = b.upload(&c.src).unwrap();
    let s = if view {
        s.view(0, s.shape()).unwrap()
    } else {
        s
    };
    let i = b.upload(&c.index).unwrap();
    let wt = c.weights.as_ref().map(|w| b.upload(w).unwrap());
    let (n, h) = (c.index.shape()[0], c.src.shape()[1]);
    let mut o = poisoned(b, c.out, &[n, h]);
    run(
        b,
        ReduceRows {
            src: &s,
            index: &i,
            weights: wt.as_ref(),
            out: &mut o,
        },
    )
    .unwrap();
    b.download(&o).unwrap()
}

#[test]
fn reduce_rows_matches_cpu_ref_and_is_reproducible() {
    let Some(w) = shared() else { return };
    let Some(capped) = make(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    let mut r = rng(2);
    for (sdt, odt) in [
        (DType::BF16, DType::BF16),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::F32),
    ] {
        for (s, n, k, h) in [
            (0, 3, 2, 5),
            (5, 0, 3, 4),
            (6, 4, 0, 3),
            (1, 1, 1, 1),
            (9, 7, 4, 3),
            (40, 33, 4, 131),
            (64, 20, 8, 64),
            (300, 17, 5, 7),
            (400, 50, 6, 24),
        ] {
            for weighted in [false, true] {
                for idt in [DType::I32, DType::I64] {
                    let what = format!(
                        "{sdt}->{odt}, S {s}, N {n}, K {k}, h {h}, weighted {weighted}, {idt}"
                    );
                    let c = reduce_case(&mut r, (s, n, k, h), (sdt, odt, idt), weighted);
                    let want = reduce_on(&CpuRef, &c, false).to_f32_vec();
                    let got = reduce_on(w, &c, false);
                    let g = got.to_f32_vec();
                    let d = calc_diff(&g, &want);
                    assert!(d < 5e-6, "{what}: calc_diff {d}");
                    // bf16: within one ulp (f32 accumulation may round the
                    // other way at a tie of cpu-ref's f64 sum); f32: the
                    // accumulation error of a few terms of magnitude ≤ ~4.
                    for (i, (&a, &b)) in g.iter().zip(&want).enumerate() {
                        let tol = match odt {
                            DType::BF16 => ulp(odt, b) * 1.01,
                            _ => 1e-5 * (b as f64).abs().max(1.0),
                        };
                        assert!(
                            (a as f64 - b as f64).abs() <= tol,
                            "{what}: element {i}: {a} vs {b}"
                        );
                    }
                    for (b, again) in [(w as &dyn Backend, "rerun"), (&capped, "capped")] {
                        for view in [false, true] {
                            let g2 = reduce_on(b, &c, view);
                            assert_same_bytes(&g2, &got, &format!("{what}: {again} (view {view})"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_indices_are_index_errors() {
    let Some(w) = make(WgpuOptions::default()) else {
        return;
    };
    let src = HostTensor::from_f32(DType::BF16, &[4, 3], &[1.0; 12]);
    let idx = HostTensor::from_i64(&[3], &[0, 4, -1]);
    let s = w.upload(&src).unwrap();
    let i = w.upload(&idx).unwrap();
    let mut d = w.alloc(DType::BF16, &[3, 3]).unwrap();
    run(
        &w,
        GatherRows {
            src: &s,
            index: &i,
            dst: &mut d,
        },
    )
    .unwrap();
    let e = w.download(&d).unwrap_err();
    assert_index_error("gather", e, ("gather_rows", "index"), &[1], 4, None);
    let idx = HostTensor::from_i32(&[1, 2], &[-2, 0]);
    let i = w.upload(&idx).unwrap();
    let mut o = w.alloc(DType::F32, &[1, 3]).unwrap();
    run(
        &w,
        ReduceRows {
            src: &s,
            index: &i,
            weights: None,
            out: &mut o,
        },
    )
    .unwrap();
    let e = w.synchronize().unwrap_err();
    assert_index_error("reduce", e, ("reduce_rows", "index"), &[0, 0], -2, None);
}
