//! `gemm_grouped_contiguous` and `gemm_grouped_masked` on cpu-ref against
//! hand-computed values, the reference `gemm` row by row, and the
//! validation rules they share with the grouped FP8 GEMMs.

use deepport_core::backend::{poison_host, Backend, Tensor};
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;

fn be() -> CpuRef {
    CpuRef::new()
}

fn up(h: &HostTensor) -> Tensor {
    be().upload(h).expect("upload")
}

fn f32t(dtype: DType, shape: &[usize], v: &[f32]) -> Tensor {
    up(&HostTensor::from_f32(dtype, shape, v))
}

fn down(t: &Tensor) -> Vec<f32> {
    be().download(t).expect("download").to_f32_vec()
}

fn contiguous(a: &Tensor, b: &Tensor, idx: &Tensor, d: &mut Tensor) -> Result<()> {
    ops::run(
        &be(),
        GemmGroupedContiguous {
            a,
            b,
            m_indices: idx,
            d,
        },
    )
}

fn masked(a: &Tensor, b: &Tensor, mm: &Tensor, d: &mut Tensor) -> Result<()> {
    ops::run(
        &be(),
        GemmGroupedMasked {
            a,
            b,
            masked_m: mm,
            d,
        },
    )
}

/// Two groups of `b [2, 3, 2]`:
/// group 0 = [[1, 0], [0, 1], [1, 1]], group 1 = [[2, 0], [0, 3], [1, -1]].
const B: [f32; 12] = [1., 0., 0., 1., 1., 1., 2., 0., 0., 3., 1., -1.];

#[test]
fn contiguous_hand_computed() {
    let a = f32t(
        DType::F32,
        &[4, 2],
        &[1., 2., /* pad */ 7., 7., 3., 4., -1., 5.],
    );
    let b = f32t(DType::F32, &[2, 3, 2], &B);
    for idx_dtype in [DType::I32, DType::I64] {
        let idx = up(&HostTensor::from_index(idx_dtype, &[4], &[1, -1, 0, 1]));
        let mut d = up(&poison_host(DType::F32, &[4, 3]));
        contiguous(&a, &b, &idx, &mut d).unwrap();
        let v = down(&d);
        // Row 0, group 1: [2·1, 3·2, 1 − 2].
        assert_eq!(&v[0..3], &[2., 6., -1.]);
        // Row 1 is padding: the reference writes 0.
        assert_eq!(&v[3..6], &[0., 0., 0.]);
        // Row 2, group 0: [3, 4, 7].
        assert_eq!(&v[6..9], &[3., 4., 7.]);
        // Row 3, group 1: [−2, 15, −6].
        assert_eq!(&v[9..12], &[-2., 15., -6.]);
    }
}

#[test]
fn masked_hand_computed_and_rows_past_the_mask_untouched() {
    // a [2 groups, m_max 2, k 2].
    let a = f32t(DType::F32, &[2, 2, 2], &[1., 2., 9., 9., 3., 4., -1., 5.]);
    let b = f32t(DType::F32, &[2, 3, 2], &B);
    let mm = up(&HostTensor::from_i64(&[2], &[1, 2]));
    let mut d = up(&poison_host(DType::F32, &[2, 2, 3]));
    masked(&a, &b, &mm, &mut d).unwrap();
    let v = down(&d);
    // Group 0, row 0: [1, 2, 3]; row 1 not computed: still NaN.
    assert_eq!(&v[0..3], &[1., 2., 3.]);
    assert!(v[3..6].iter().all(|x| x.is_nan()), "{:?}", &v[3..6]);
    // Group 1: [6, 12, −1] and [−2, 15, −6].
    assert_eq!(&v[6..9], &[6., 12., -1.]);
    assert_eq!(&v[9..12], &[-2., 15., -6.]);
}

/// bf16 operands, bf16 output: `1 + 2⁻⁹ + 2⁻⁹ = 1 + 2⁻⁸`, a tie between
/// bf16 neighbours 1 and 1 + 2⁻⁷, rounds (once, to even) to 1; the f32
/// output keeps it exactly. A bf16 running sum would round 1 + 2⁻⁹ to 1 at
/// each step and give 1 in both.
#[test]
fn bf16_accumulates_wide_and_rounds_once() {
    let t = 2f32.powi(-9);
    let a = f32t(DType::BF16, &[1, 3], &[1., 1., 1.]);
    let b = f32t(DType::BF16, &[1, 2, 3], &[1., t, t, 1., 2. * t, 2. * t]);
    let idx = up(&HostTensor::from_i32(&[1], &[0]));
    let mut d32 = up(&poison_host(DType::F32, &[1, 2]));
    contiguous(&a, &b, &idx, &mut d32).unwrap();
    assert_eq!(down(&d32), vec![1. + 2. * t, 1. + 4. * t]);
    let mut d16 = up(&poison_host(DType::BF16, &[1, 2]));
    contiguous(&a, &b, &idx, &mut d16).unwrap();
    // 1 + 2⁻⁸ ties to 1; 1 + 2⁻⁷ is a bf16 value.
    assert_eq!(down(&d16), vec![1., 1. + 4. * t]);
    // Masked layout, same numbers.
    let a3 = f32t(DType::BF16, &[1, 1, 3], &[1., 1., 1.]);
    let mm = up(&HostTensor::from_i32(&[1], &[1]));
    let mut m16 = up(&poison_host(DType::BF16, &[1, 1, 2]));
    masked(&a3, &b, &mm, &mut m16).unwrap();
    assert_eq!(down(&m16), vec![1., 1. + 4. * t]);
}

/// xorshift64*: deterministic data.
struct Rng(u64);

impl Rng {
    fn sym(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sym()).collect()
    }
}

/// Every computed row equals the reference `gemm` of that row against its
/// group's weights, bit for bit (f32 and bf16 operands, every output dtype).
#[test]
fn rows_equal_the_reference_gemm() {
    let (g, n, k) = (3, 5, 37);
    let mut rng = Rng(0x1234_5678);
    for ab in [DType::F32, DType::BF16] {
        for out in [DType::F32, DType::BF16, DType::F16] {
            let groups: Vec<i64> = vec![2, 2, -1, 0, 1, 1, 1, -1, 0];
            let m = groups.len();
            let ah = HostTensor::from_f32(ab, &[m, k], &rng.vec(m * k));
            let bh = HostTensor::from_f32(ab, &[g, n, k], &rng.vec(g * n * k));
            let (a, b) = (up(&ah), up(&bh));
            let idx = up(&HostTensor::from_i64(&[m], &groups));
            let mut d = up(&poison_host(out, &[m, n]));
            contiguous(&a, &b, &idx, &mut d).unwrap();
            let dv = be().download(&d).unwrap();
            // Masked layout over the same rows: group gi's rows in order.
            let m_max = 4;
            let mut a3 = vec![0f32; g * m_max * k];
            let mut counts = vec![0usize; g];
            let af = ah.to_f32_vec();
            let mut slot = vec![None; m];
            for (i, &gi) in groups.iter().enumerate() {
                if gi >= 0 {
                    let gi = gi as usize;
                    let r = gi * m_max + counts[gi];
                    a3[r * k..(r + 1) * k].copy_from_slice(&af[i * k..(i + 1) * k]);
                    slot[i] = Some(r);
                    counts[gi] += 1;
                }
            }
            let a3 = up(&HostTensor::from_f32(ab, &[g, m_max, k], &a3));
            let mm: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
            let mm = up(&HostTensor::from_i64(&[g], &mm));
            let mut d3 = up(&poison_host(out, &[g, m_max, n]));
            masked(&a3, &b, &mm, &mut d3).unwrap();
            let d3v = be().download(&d3).unwrap();
            let rs = n * out.size();
            for (i, &gi) in groups.iter().enumerate() {
                if gi < 0 {
                    continue;
                }
                let gi = gi as usize;
                let arow = up(&HostTensor::from_f32(ab, &[1, k], &af[i * k..(i + 1) * k]));
                let bf = bh.to_f32_vec();
                let brow = up(&HostTensor::from_f32(
                    ab,
                    &[n, k],
                    &bf[gi * n * k..(gi + 1) * n * k],
                ));
                let mut want = be().alloc(out, &[1, n]).unwrap();
                ops::run(
                    &be(),
                    Gemm {
                        a: &arow,
                        b: &brow,
                        d: &mut want,
                    },
                )
                .unwrap();
                let wv = be().download(&want).unwrap();
                assert_eq!(
                    &dv.bytes()[i * rs..(i + 1) * rs],
                    wv.bytes(),
                    "contiguous row {i} ({ab} → {out})"
                );
                let r = slot[i].unwrap();
                assert_eq!(
                    &d3v.bytes()[r * rs..(r + 1) * rs],
                    wv.bytes(),
                    "masked row {r} ({ab} → {out})"
                );
            }
        }
    }
}

fn expect_index_err(r: Result<()>, arg: &str, value: i64) {
    match r {
        Err(Error::IndexOutOfRange {
            arg: a, value: v, ..
        }) => {
            assert_eq!((a, v), (arg, value));
        }
        other => panic!("expected IndexOutOfRange for {arg}={value}, got {other:?}"),
    }
}

#[test]
fn out_of_range_group_ids_and_masks_are_errors() {
    let a = f32t(DType::F32, &[2, 2], &[1., 2., 3., 4.]);
    let b = f32t(DType::F32, &[2, 3, 2], &B);
    for bad in [2i64, -2, i64::MAX] {
        let idx = up(&HostTensor::from_i64(&[2], &[0, bad]));
        let mut d = up(&poison_host(DType::F32, &[2, 3]));
        expect_index_err(contiguous(&a, &b, &idx, &mut d), "m_indices", bad);
    }
    let a3 = f32t(DType::F32, &[2, 1, 2], &[1., 2., 3., 4.]);
    for bad in [2i64, -1] {
        let mm = up(&HostTensor::from_i64(&[2], &[1, bad]));
        let mut d = up(&poison_host(DType::F32, &[2, 1, 3]));
        expect_index_err(masked(&a3, &b, &mm, &mut d), "masked_m", bad);
        // Nothing was written.
        assert!(down(&d).iter().all(|x| x.is_nan()));
    }
}

#[test]
fn bad_shapes_and_dtypes_are_errors() {
    let b = f32t(DType::F32, &[2, 3, 2], &B);
    let idx = up(&HostTensor::from_i32(&[2], &[0, 1]));
    // b in another dtype than a.
    let a16 = f32t(DType::BF16, &[2, 2], &[1., 2., 3., 4.]);
    let mut d = up(&poison_host(DType::F32, &[2, 3]));
    let e = contiguous(&a16, &b, &idx, &mut d).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "b", .. }), "{e:?}");
    // f16 operands are not accepted.
    let ah = f32t(DType::F16, &[2, 2], &[1., 2., 3., 4.]);
    let bh = f32t(DType::F16, &[2, 3, 2], &B);
    let e = contiguous(&ah, &bh, &idx, &mut d).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "a", .. }), "{e:?}");
    // k of b differs from a's.
    let a3k = f32t(DType::F32, &[2, 3], &[0.; 6]);
    let e = contiguous(&a3k, &b, &idx, &mut d).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "b", .. }), "{e:?}");
    // b of rank 2.
    let b2 = f32t(DType::F32, &[3, 2], &B[..6]);
    let a = f32t(DType::F32, &[2, 2], &[1., 2., 3., 4.]);
    let e = contiguous(&a, &b2, &idx, &mut d).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "b", .. }), "{e:?}");
    // m_indices of the wrong length, d of the wrong shape.
    let idx3 = up(&HostTensor::from_i32(&[3], &[0, 1, 0]));
    let e = contiguous(&a, &b, &idx3, &mut d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "m_indices",
                ..
            }
        ),
        "{e:?}"
    );
    let mut d_bad = up(&poison_host(DType::F32, &[2, 4]));
    let e = contiguous(&a, &b, &idx, &mut d_bad).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "d", .. }), "{e:?}");
    // Masked: a's group count differs from b's; masked_m of the wrong length.
    let a3 = f32t(DType::F32, &[3, 1, 2], &[0.; 6]);
    let mm = up(&HostTensor::from_i32(&[3], &[1, 1, 1]));
    let mut d3 = up(&poison_host(DType::F32, &[3, 1, 3]));
    let e = masked(&a3, &b, &mm, &mut d3).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "b", .. }), "{e:?}");
    let a2 = f32t(DType::F32, &[2, 1, 2], &[0.; 4]);
    let mut d2 = up(&poison_host(DType::F32, &[2, 1, 3]));
    let e = masked(&a2, &b, &mm, &mut d2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "masked_m",
                ..
            }
        ),
        "{e:?}"
    );
}
