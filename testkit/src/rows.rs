//! `gather_rows` and `reduce_rows` (the kernels of core's expert-parallel
//! protocol) against cpu-ref on adversarial shapes: odd row byte sizes
//! (1-byte FP8 and 2-byte bf16 rows sharing words), −1 entries, zero rows,
//! i32 and i64 indices, views of `src` at unaligned offsets.
//!
//! Judged: gather bit for bit; reduce within `calc_diff < 5e-6` and one
//! output ulp per element of cpu-ref, bit-identical from run to run, on a
//! view and on a second backend (`also`: the same backend with other
//! settings, e.g. a capped binding size); a bad index is `IndexOutOfRange`.

use crate::compare::{assert_bytes, assert_index_error, calc_diff, ulp};
use crate::harness::{deferred_error, poisoned, reported_error, run, skip, Harness};
use crate::Rng;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::{GatherRows, ReduceRows};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x0a0b_5eed)
}

/// `m` entries in `[0, s)` or −1 (about one in five), as `dtype`.
fn index(r: &mut Rng, m: usize, s: usize, dtype: DType) -> HostTensor {
    let v: Vec<i64> = (0..m)
        .map(|_| {
            if s == 0 || r.below(5) == 0 {
                -1
            } else {
                r.below(s) as i64
            }
        })
        .collect();
    HostTensor::from_index(dtype, &[m], &v)
}

fn gather_on(
    b: &dyn Backend,
    src: &HostTensor,
    view: Option<(usize, usize)>,
    idx: &HostTensor,
) -> Result<HostTensor> {
    let s = b.upload(src)?;
    let s = match view {
        Some((start, count)) => s.rows(start, count)?,
        None => s,
    };
    let i = b.upload(idx)?;
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
    )?;
    b.synchronize()?;
    b.download(&d)
}

/// `gather_rows` on `b` equals cpu-ref bit for bit, on whole tensors and on
/// views; `large` adds a case of 700 source and 900 output rows (for
/// backends that window large tensors). `label` names `b` in failures.
/// `false` when `b` does not support it (recorded as skipped).
pub fn check_gather_rows(b: &dyn Backend, large: bool, label: &str) -> bool {
    let mut r = rng(1);
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
                if s == 700 && !large {
                    continue;
                }
                for idt in [DType::I32, DType::I64] {
                    let row_n: usize = row.iter().product();
                    let mut shape = vec![s];
                    shape.extend_from_slice(row);
                    let src =
                        HostTensor::from_bytes(dtype, &shape, r.bytes(s * row_n * dtype.size()))
                            .unwrap();
                    let idx = index(&mut r, m, s, idt);
                    let want = gather_on(&CpuRef, &src, None, &idx).unwrap();
                    let what = format!("{label}: {dtype} row {row:?}, S {s}, M {m}, {idt}");
                    match gather_on(b, &src, None, &idx) {
                        Ok(got) => assert_bytes(&what, &got, &want),
                        Err(e @ Error::NotSupported { .. }) => {
                            skip(b.name(), &what, &e);
                            return false;
                        }
                        Err(e) => panic!("{what}: {e}"),
                    }
                    // A view of src rows [1, s): element offsets that leave
                    // the data at any byte of a word.
                    if s > 1 {
                        let idx = index(&mut r, m, s - 1, idt);
                        let want = gather_on(&CpuRef, &src, Some((1, s - 1)), &idx).unwrap();
                        let got = gather_on(b, &src, Some((1, s - 1)), &idx).unwrap();
                        assert_bytes(&format!("view of {what}"), &got, &want);
                    }
                }
            }
        }
    }
    true
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

fn reduce_on(b: &dyn Backend, c: &Reduce, view: bool) -> Result<HostTensor> {
    let s: Tensor = b.upload(&c.src)?;
    let s = if view { s.view(0, s.shape())? } else { s };
    let i = b.upload(&c.index)?;
    let wt = match &c.weights {
        Some(w) => Some(b.upload(w)?),
        None => None,
    };
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
    )?;
    b.synchronize()?;
    b.download(&o)
}

/// `reduce_rows` on `b` matches cpu-ref (`calc_diff < 5e-6`; one ulp of
/// bf16 outputs, the f32 accumulation bound of f32 outputs), and a rerun,
/// a view of `src` and the backend `also` (when given) give the same bits.
/// `large` adds a case of 400 source rows reduced into 50 (for backends
/// that window large tensors). `false` when `b` does not support it
/// (recorded as skipped).
pub fn check_reduce_rows(
    b: &dyn Backend,
    also: Option<&dyn Backend>,
    large: bool,
    label: &str,
) -> bool {
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
            if s == 400 && !large {
                continue;
            }
            for weighted in [false, true] {
                for idt in [DType::I32, DType::I64] {
                    let what = format!(
                        "{label}: {sdt}->{odt}, S {s}, N {n}, K {k}, h {h}, weighted {weighted}, {idt}"
                    );
                    let c = reduce_case(&mut r, (s, n, k, h), (sdt, odt, idt), weighted);
                    let want = reduce_on(&CpuRef, &c, false).unwrap().to_f32_vec();
                    let got = match reduce_on(b, &c, false) {
                        Ok(g) => g,
                        Err(e @ Error::NotSupported { .. }) => {
                            skip(b.name(), &what, &e);
                            return false;
                        }
                        Err(e) => panic!("{what}: {e}"),
                    };
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
                    let mut again: Vec<(&dyn Backend, &str)> = vec![(b, "rerun")];
                    if let Some(a) = also {
                        again.push((a, "also"));
                    }
                    for (b2, name) in again {
                        for view in [false, true] {
                            let g2 = reduce_on(b2, &c, view).unwrap();
                            assert_bytes(&format!("{what}: {name} (view {view})"), &g2, &got);
                        }
                    }
                }
            }
        }
    }
    true
}

/// [`check_gather_rows`] on a fresh backend.
pub fn gather_rows_is_bit_exact(h: &Harness) {
    let Some(b) = h.shared() else { return };
    check_gather_rows(&*b, false, h.name());
}

/// [`check_reduce_rows`] on a fresh backend.
pub fn reduce_rows_matches_cpu_ref_and_is_reproducible(h: &Harness) {
    let Some(b) = h.shared() else { return };
    check_reduce_rows(&*b, None, false, h.name());
}

/// An out-of-range row index is `IndexOutOfRange` naming its position.
pub fn rows_bad_indices_are_index_errors(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let w: &dyn Backend = &*bk;
    let src = HostTensor::from_f32(DType::BF16, &[4, 3], &[1.0; 12]);
    let idx = HostTensor::from_i64(&[3], &[0, 4, -1]);
    let s = w.upload(&src).unwrap();
    let i = w.upload(&idx).unwrap();
    let mut d = w.alloc(DType::BF16, &[3, 3]).unwrap();
    let called = run(
        w,
        GatherRows {
            src: &s,
            index: &i,
            dst: &mut d,
        },
    );
    if let Some(e) = reported_error(w, "gather_rows(bad index)", called, Some(&d)) {
        assert_index_error("gather", e, ("gather_rows", "index"), &[1], 4, None);
    }
    let idx = HostTensor::from_i32(&[1, 2], &[-2, 0]);
    let i = w.upload(&idx).unwrap();
    let mut o = w.alloc(DType::F32, &[1, 3]).unwrap();
    if let Some(e) = deferred_error(w, "reduce_rows(bad index)", || {
        run(
            w,
            ReduceRows {
                src: &s,
                index: &i,
                weights: None,
                out: &mut o,
            },
        )
    }) {
        assert_index_error("reduce", e, ("reduce_rows", "index"), &[0, 0], -2, None);
    }
}
