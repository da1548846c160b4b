//! The dense reference ops of `cpu-ref` against independently computed
//! expectations: hand-computed FP8 codes, plain f64 loops written here from
//! SPEC.md, and hand-built routing cases.

use deepport_core::backend::{poison_host, Backend, Tensor};
use deepport_core::formats::{self, e4m3_to_f32, round_bf16, ulp_bf16};
use deepport_core::ops::{self, *};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_testkit::{compare, Rng};

// ---- helpers -------------------------------------------------------------------

fn be() -> CpuRef {
    CpuRef::new()
}

fn up(h: &HostTensor) -> Tensor {
    be().upload(h).expect("upload")
}

fn f32t(dtype: DType, shape: &[usize], v: &[f32]) -> Tensor {
    up(&HostTensor::from_f32(dtype, shape, v))
}

fn alloc(dtype: DType, shape: &[usize]) -> Tensor {
    be().alloc(dtype, shape).expect("alloc")
}

fn down(t: &Tensor) -> HostTensor {
    be().download(t).expect("download")
}

/// This file's draws from the shared test PRNG.
trait Draw {
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32;
    /// `n` values uniform in [-amp, amp).
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32>;
    /// Random finite e4m3 codes (never the NaN codes 0x7f / 0xff).
    fn e4m3_codes(&mut self, n: usize) -> Vec<u8>;
}

impl Draw for Rng {
    fn sym(&mut self) -> f32 {
        self.range_f32(-1.0, 1.0)
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym() * amp).collect()
    }
    fn e4m3_codes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| loop {
                let c = (self.next_u64() >> 56) as u8;
                if c & 0x7f != 0x7f {
                    break c;
                }
            })
            .collect()
    }
}

fn e4m3_tensor(shape: &[usize], codes: &[u8]) -> Tensor {
    up(&HostTensor::from_bytes(DType::F8E4M3, shape, codes.to_vec()).unwrap())
}

fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

/// SPEC §3 bf16 bound: `|d − r| ≤ 2 ulp_bf16(r) + 1e-3·rms(r)`; returns the
/// number of elements outside it.
fn bf16_gemm_violations(d: &[f32], r: &[f64]) -> usize {
    let rr = rms(r);
    d.iter()
        .zip(r)
        .filter(|(&d, &r)| {
            // NaN counts as a violation.
            d.is_nan() || (d as f64 - r).abs() > 2.0 * ulp_bf16(r as f32) as f64 + 1e-3 * rr
        })
        .count()
}

/// `calc_diff` (SPEC §3) of `x` against an f64 evaluation `y`.
fn calc_diff(x: &[f32], y: &[f64]) -> f64 {
    let y: Vec<f32> = y.iter().map(|&v| v as f32).collect();
    compare::calc_diff(x, &y)
}

/// Correct rounding to bf16 holds when the error is at most half a bf16 ulp.
fn assert_bf16_rounded(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = 0.5 * ulp_bf16(w as f32) as f64;
        assert!(
            (g as f64 - w).abs() <= bound,
            "{what}[{i}]: got {g}, want {w} (bound {bound})"
        );
    }
}

/// Rounding to f32 once: the error is below |want|·2^-24 (≥ half an ulp).
fn assert_f32_rounded(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = (w.abs() * 2f64.powi(-24)).max(2f64.powi(-150));
        assert!(
            (g as f64 - w).abs() <= bound,
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn run_act_quant(x: &HostTensor, qdtype: DType, fmt: ScaleFmt) -> Result<(HostTensor, Vec<f32>)> {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let xt = up(x);
    let mut q = alloc(qdtype, &[m, k]);
    let mut s = alloc(DType::F32, &[m, k / 128]);
    ops::run(
        &be(),
        ActQuant {
            x: &xt,
            q: &mut q,
            s: &mut s,
            scale_fmt: fmt,
        },
    )?;
    Ok((down(&q), down(&s).to_f32_vec()))
}

// ---- act_quant -------------------------------------------------------------------

#[test]
fn act_quant_tiny_group_clamps_amax() {
    // Row 0: group 0 is tiny (amax 2e-5 < 1e-4), group 1 has amax 448.
    let mut x = vec![0f32; 256];
    x[0] = 1e-5;
    x[1] = -2e-5;
    x[128] = 448.0;
    x[129] = 17.0;
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::F32, &[1, 256], &x),
        DType::F8E4M3,
        ScaleFmt::Float,
    )
    .unwrap();
    assert_eq!(s[0].to_bits(), (1e-4f32 / 448.0f32).to_bits());
    assert_eq!(s[1], 1.0);
    // 1e-5 / (1e-4/448) ≈ 44.8 → 44 = 1.011b·2^5: exponent field 12, mantissa 3.
    assert_eq!(q.bytes()[0], 0x63);
    // −2e-5 / s ≈ −89.6 → −88 = −1.011b·2^6: sign, field 13, mantissa 3.
    assert_eq!(q.bytes()[1], 0xEB);
    assert_eq!(q.bytes()[2], 0x00);
    assert_eq!(q.bytes()[128], 0x7E); // 448
}

#[test]
fn act_quant_halfway_rounds_to_even_and_saturates() {
    // amax 448 gives s = 1 exactly, so q = e4m3(x) and x picks the ties.
    let mut x = vec![0f32; 128];
    x[0] = 448.0;
    x[1] = 17.0; // between 16 (mantissa 0) and 18 (mantissa 1) → 16
    x[2] = 19.0; // between 18 (mantissa 1) and 20 (mantissa 2) → 20
    x[3] = -17.0; // → −16
    x[4] = 3.0 * 2f32.powi(-10); // subnormal tie between 2^-9 and 2^-8 → 2^-8
    x[5] = 2f32.powi(-10); // tie between 0 and 2^-9 → +0
    x[6] = -448.0;
    x[7] = 0.3; // 0.3 → 0.3125 = 1.010b·2^-2 (field 5, mantissa 2)
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::F32, &[1, 128], &x),
        DType::F8E4M3,
        ScaleFmt::Float,
    )
    .unwrap();
    assert_eq!(s, vec![1.0]);
    let b = q.bytes();
    assert_eq!(&b[..8], &[0x7E, 0x58, 0x5A, 0xD8, 0x02, 0x00, 0xFE, 0x2A]);

    // A quotient that lands just above 448 in f32 must saturate to 448,
    // never become NaN (0x7f).
    let a = f32::from_bits(0x3f80_0006);
    let sc = a / 448.0f32;
    assert!(a / sc > 448.0, "precondition: x/s exceeds 448 in f32");
    let mut x = vec![0.25f32; 128];
    x[10] = a;
    x[11] = -a;
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::F32, &[1, 128], &x),
        DType::F8E4M3,
        ScaleFmt::Float,
    )
    .unwrap();
    assert_eq!(s[0].to_bits(), sc.to_bits());
    assert_eq!(q.bytes()[10], 0x7E);
    assert_eq!(q.bytes()[11], 0xFE);
}

#[test]
fn act_quant_ue8m0_scales_are_powers_of_two_at_or_above() {
    // Row 0: amax 300 → 300/448 ≈ 0.67 → 1.0; amax 1000 → 2.23 → 4.0;
    // Row 1: amax 112 → 112/448 = 0.25 exactly → stays 0.25.
    let mut x = vec![0f32; 2 * 256];
    x[0] = 300.0; // q = 300 → 288 = 1.001b·2^8: field 15, mantissa 1
    x[128] = -1000.0; // q = −250 → −256 (spacing 16 in [128,256)): field 15, mantissa 0
    x[129] = 3.0; // 0.75 = 1.1b·2^-1: field 6, mantissa 4
    x[256] = 112.0; // q = 448
    x[257] = 1.0; // q = 4: field 9, mantissa 0
    x[384] = 5e-5; // tiny group: 1e-4/448 → 2^-22 (≈2.38e-7 ≥ 2.23e-7)
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::F32, &[2, 256], &x),
        DType::F8E4M3,
        ScaleFmt::Ue8m0,
    )
    .unwrap();
    assert_eq!(s, vec![1.0, 4.0, 0.25, 2f32.powi(-22)]);
    let b = q.bytes();
    assert_eq!(b[0], 0x79);
    assert_eq!(b[128], 0xF8);
    assert_eq!(b[129], 0x34);
    assert_eq!(b[256], 0x7E);
    assert_eq!(b[257], 0x48);
    // 5e-5 / 2^-22 = 209.7 → 208 = 1.101b·2^7: field 14, mantissa 5.
    assert_eq!(b[384], 0x75);
}

#[test]
fn act_quant_e4m3fnuz_uses_240() {
    let mut x = vec![0f32; 256];
    x[0] = 240.0; // s = 1 → 240 = 1.111b·2^7: field 15 (bias 8), mantissa 7
    x[1] = 17.0; // tie → 16: field 12, mantissa 0
    x[2] = -17.0;
    x[3] = -240.0;
    x[4] = -0.0; // fnuz has no negative zero
    x[128] = 480.0; // s = 2 → 240
    x[129] = -3.0; // −1.5 = −1.1b·2^0: field 8, mantissa 4
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::F32, &[1, 256], &x),
        DType::F8E4M3Fnuz,
        ScaleFmt::Float,
    )
    .unwrap();
    assert_eq!(s, vec![1.0, 2.0]);
    let b = q.bytes();
    assert_eq!(&b[..5], &[0x7F, 0x60, 0xE0, 0xFF, 0x00]);
    assert_eq!(b[128], 0x7F);
    assert_eq!(b[129], 0xC4);
    assert_eq!(formats::e4m3fnuz_to_f32(b[0]), 240.0);
}

#[test]
fn act_quant_bf16_input() {
    // bf16-exact values; amax 100 → s = 100/448 in f32.
    let mut x = vec![0f32; 128];
    x[0] = 100.0;
    x[1] = 1.0; // 4.48 → 4.5 = 1.001b·2^2: field 9, mantissa 1
    x[2] = -0.5; // −2.24 → −2.25 = −1.001b·2^1: field 8, mantissa 1
    x[3] = 1.0078125; // 1 + 2^-7, bf16-exact: 4.515 → 4.5
    let (q, s) = run_act_quant(
        &HostTensor::from_f32(DType::BF16, &[1, 128], &x),
        DType::F8E4M3,
        ScaleFmt::Float,
    )
    .unwrap();
    assert_eq!(s[0].to_bits(), (100f32 / 448f32).to_bits());
    assert_eq!(&q.bytes()[..4], &[0x7E, 0x49, 0xC1, 0x49]);
}

#[test]
fn act_quant_rejects_non_finite_input() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![1f32; 2 * 256];
        x[256 + 130] = bad;
        let err = run_act_quant(
            &HostTensor::from_f32(DType::F32, &[2, 256], &x),
            DType::F8E4M3,
            ScaleFmt::Float,
        )
        .unwrap_err();
        match err {
            Error::NonFinite {
                op, arg, position, ..
            } => {
                assert_eq!((op, arg), ("act_quant", "x"));
                assert_eq!(position, vec![1, 130]);
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
}

#[test]
fn act_quant_validation_errors() {
    let x = up(&HostTensor::zeros(DType::F32, &[2, 100]));
    let mut q = alloc(DType::F8E4M3, &[2, 100]);
    let mut s = alloc(DType::F32, &[2, 1]);
    let err = ops::run(
        &be(),
        ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Float,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Invalid { arg: "x", .. }),
        "got {err:?}"
    );

    let x = up(&HostTensor::zeros(DType::F32, &[2, 128]));
    let mut q = alloc(DType::BF16, &[2, 128]);
    let mut s = alloc(DType::F32, &[2, 1]);
    let err = ops::run(
        &be(),
        ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Float,
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::DType { arg: "q", .. }), "got {err:?}");
}

// ---- FP8 GEMM --------------------------------------------------------------------

/// Inputs of a dense FP8 GEMM case.
struct Fp8Case {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<u8>,
    sa: Vec<f32>,
    b: Vec<u8>,
    sb: Vec<f32>,
}

impl Fp8Case {
    fn new(m: usize, n: usize, k: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        // Scales that differ strongly per block: powers of ten times a
        // random mantissa, so a misplaced block is far off.
        let sa = (0..m * kb)
            .map(|i| 10f32.powi((i % kb) as i32 - 2) * (1.0 + 0.5 * rng.sym()))
            .collect();
        let sb = (0..nb * kb)
            .map(|i| 3f32.powi((i % kb) as i32 * 2 - (i / kb) as i32) * (1.0 + 0.5 * rng.sym()))
            .collect();
        Fp8Case {
            m,
            n,
            k,
            a: rng.e4m3_codes(m * k),
            sa,
            b: rng.e4m3_codes(n * k),
            sb,
        }
    }

    /// Independent evaluation: dequantize both operands to f64 with the
    /// block scales (exact), then a plain dot product over all of k.
    fn expected(&self) -> Vec<f64> {
        let (m, n, k) = (self.m, self.n, self.k);
        let kb = k.div_ceil(128);
        let a: Vec<f64> = (0..m * k)
            .map(|i| e4m3_to_f32(self.a[i]) as f64 * self.sa[(i / k) * kb + (i % k) / 128] as f64)
            .collect();
        let b: Vec<f64> = (0..n * k)
            .map(|i| {
                e4m3_to_f32(self.b[i]) as f64 * self.sb[(i / k / 128) * kb + (i % k) / 128] as f64
            })
            .collect();
        let mut r = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                r[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        r
    }

    fn run(&self, out: DType) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        let a = e4m3_tensor(&[m, k], &self.a);
        let b = e4m3_tensor(&[n, k], &self.b);
        let sa = f32t(DType::F32, &[m, kb], &self.sa);
        let sb = f32t(DType::F32, &[nb, kb], &self.sb);
        let mut d = up(&poison_host(out, &[m, n]));
        ops::run(
            &be(),
            Fp8Gemm {
                a: &a,
                sa: &sa,
                b: &b,
                sb: &sb,
                d: &mut d,
            },
        )
        .unwrap();
        down(&d).to_f32_vec()
    }
}

#[test]
fn fp8_gemm_bf16_and_f32_out_match_f64_evaluation() {
    let case = Fp8Case::new(37, 576, 512, 7);
    let r = case.expected();
    let d = case.run(DType::BF16);
    assert_eq!(bf16_gemm_violations(&d, &r), 0);
    assert!(calc_diff(&d, &r) < 1e-5, "calc_diff {}", calc_diff(&d, &r));
    // The reference rounds once from f64: it must be the correctly rounded
    // bf16 value (the f64 sums of the two evaluations agree to ~1e-15).
    assert_bf16_rounded(&d, &r, "d");

    let d = case.run(DType::F32);
    for (i, (&d, &r)) in d.iter().zip(&r).enumerate() {
        assert!(
            (d as f64 - r).abs() <= 1e-5 * r.abs(),
            "d[{i}] = {d}, want {r}"
        );
    }
}

#[test]
fn fp8_gemm_partial_k_block() {
    // k = 200: the second K block holds 72 elements; n = 130: partial row block.
    let case = Fp8Case::new(3, 130, 200, 11);
    let r = case.expected();
    let d = case.run(DType::F32);
    for (i, (&d, &r)) in d.iter().zip(&r).enumerate() {
        assert!(
            (d as f64 - r).abs() <= 1e-5 * r.abs(),
            "d[{i}] = {d}, want {r}"
        );
    }
}

#[test]
fn fp8_gemm_swapped_scale_blocks_are_caught() {
    let case = Fp8Case::new(37, 576, 512, 7);
    let r = case.expected();
    let kb = 4;
    // Swap two K blocks of sb's row block 0, then two K blocks of sa's row 5.
    let mut swapped = Fp8Case::new(37, 576, 512, 7);
    swapped.sb.swap(1, 2);
    let d = swapped.run(DType::BF16);
    // The op follows its inputs (matches the evaluation with swapped scales)…
    assert_eq!(bf16_gemm_violations(&d, &swapped.expected()), 0);
    // …and the judge catches the mismatch against the true scales.
    // (Row block 0 of sb feeds the 37 × 128 outputs of columns 0..128; the
    // judge must fail a good share of them, whatever the draw.)
    let bad = bf16_gemm_violations(&d, &r);
    assert!(bad > 37 * 128 / 10, "only {bad} elements differ");

    let mut swapped = Fp8Case::new(37, 576, 512, 7);
    swapped.sa.swap(5 * kb, 5 * kb + 3);
    let d = swapped.run(DType::BF16);
    let bad = bf16_gemm_violations(&d, &r);
    assert!(bad > 100, "only {bad} elements differ");
}

// ---- grouped FP8 GEMM --------------------------------------------------------

struct GroupedCase {
    g: usize,
    n: usize,
    k: usize,
    b: Vec<u8>,
    sb: Vec<f32>,
}

impl GroupedCase {
    fn new(g: usize, n: usize, k: usize, rng: &mut Rng) -> Self {
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        let b = rng.e4m3_codes(g * n * k);
        let sb = (0..g * nb * kb)
            .map(|i| 2f32.powi((i % 7) as i32 - 3) * (1.0 + 0.5 * rng.sym()))
            .collect();
        GroupedCase { g, n, k, b, sb }
    }
    /// f64 row of group `grp` for one row of `a` codes and its scales.
    fn expected_row(&self, grp: usize, a: &[u8], sa: &[f32]) -> Vec<f64> {
        let (n, k) = (self.n, self.k);
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        (0..n)
            .map(|j| {
                (0..k)
                    .map(|t| {
                        let av = e4m3_to_f32(a[t]) as f64 * sa[t / 128] as f64;
                        let bv = e4m3_to_f32(self.b[(grp * n + j) * k + t]) as f64
                            * self.sb[(grp * nb + j / 128) * kb + t / 128] as f64;
                        av * bv
                    })
                    .sum()
            })
            .collect()
    }
    fn b_tensors(&self) -> (Tensor, Tensor) {
        let (g, n, k) = (self.g, self.n, self.k);
        (
            e4m3_tensor(&[g, n, k], &self.b),
            f32t(DType::F32, &[g, n.div_ceil(128), k.div_ceil(128)], &self.sb),
        )
    }
}

fn run_contiguous(
    c: &GroupedCase,
    a: &[u8],
    sa: &[f32],
    m_indices: &[i64],
    out: DType,
) -> Result<Vec<f32>> {
    let m = m_indices.len();
    let (n, k) = (c.n, c.k);
    let at = e4m3_tensor(&[m, k], a);
    let sat = f32t(DType::F32, &[m, k.div_ceil(128)], sa);
    let (b, sb) = c.b_tensors();
    let idx = up(&HostTensor::from_index(DType::I32, &[m], m_indices));
    let mut d = up(&poison_host(out, &[m, n]));
    ops::run(
        &be(),
        Fp8GroupedContiguous {
            a: &at,
            sa: &sat,
            b: &b,
            sb: &sb,
            m_indices: &idx,
            d: &mut d,
        },
    )?;
    Ok(down(&d).to_f32_vec())
}

#[test]
fn fp8_grouped_contiguous_with_padding_and_bad_index() {
    let mut rng = Rng::new(21);
    let (g, n, k) = (3, 136, 256);
    let c = GroupedCase::new(g, n, k, &mut rng);
    // Three 128-row blocks: group 2 (100 rows + 28 padding), group 0 (128),
    // group 1 (50 rows + 78 padding).
    let mut m_indices = vec![];
    m_indices.extend(std::iter::repeat_n(2i64, 100));
    m_indices.extend(std::iter::repeat_n(-1i64, 28));
    m_indices.extend(std::iter::repeat_n(0i64, 128));
    m_indices.extend(std::iter::repeat_n(1i64, 50));
    m_indices.extend(std::iter::repeat_n(-1i64, 78));
    let m = m_indices.len();
    let kb = k / 128;
    let a = rng.e4m3_codes(m * k);
    let sa: Vec<f32> = (0..m * kb)
        .map(|i| 10f32.powi((i % kb) as i32) * (1.0 + 0.5 * rng.sym()))
        .collect();
    let d = run_contiguous(&c, &a, &sa, &m_indices, DType::BF16).unwrap();
    let mut want = vec![];
    let mut got = vec![];
    for (i, &grp) in m_indices.iter().enumerate() {
        if grp < 0 {
            continue; // padding: unspecified
        }
        want.extend(c.expected_row(
            grp as usize,
            &a[i * k..(i + 1) * k],
            &sa[i * kb..(i + 1) * kb],
        ));
        got.extend_from_slice(&d[i * n..(i + 1) * n]);
    }
    assert_eq!(got.len(), 278 * n);
    assert_eq!(bf16_gemm_violations(&got, &want), 0);
    assert!(calc_diff(&got, &want) < 1e-5);

    // A row using the wrong group is caught: evaluate row 0 with group 1.
    let wrong = c.expected_row(1, &a[..k], &sa[..kb]);
    assert!(bf16_gemm_violations(&d[..n], &wrong) > n / 2);

    for (pos, bad) in [(200usize, 3i64), (7, -2)] {
        let mut mi = m_indices.clone();
        mi[pos] = bad;
        match run_contiguous(&c, &a, &sa, &mi, DType::BF16).unwrap_err() {
            Error::IndexOutOfRange {
                arg,
                position,
                value,
                ..
            } => {
                assert_eq!(arg, "m_indices");
                assert_eq!(position, vec![pos]);
                assert_eq!(value, bad);
            }
            other => panic!("expected IndexOutOfRange, got {other:?}"),
        }
    }
}

fn run_masked(
    c: &GroupedCase,
    m_max: usize,
    a: &[u8],
    sa: &[f32],
    masked_m: &[i64],
) -> Result<HostTensor> {
    let (g, n, k) = (c.g, c.n, c.k);
    let at = e4m3_tensor(&[g, m_max, k], a);
    let sat = f32t(DType::F32, &[g, m_max, k.div_ceil(128)], sa);
    let (b, sb) = c.b_tensors();
    let mm = up(&HostTensor::from_index(DType::I64, &[g], masked_m));
    let mut d = up(&poison_host(DType::BF16, &[g, m_max, n]));
    ops::run(
        &be(),
        Fp8GroupedMasked {
            a: &at,
            sa: &sat,
            b: &b,
            sb: &sb,
            masked_m: &mm,
            d: &mut d,
        },
    )?;
    Ok(down(&d))
}

#[test]
fn fp8_grouped_masked_leaves_masked_rows_untouched() {
    let mut rng = Rng::new(33);
    let (g, n, k, m_max) = (3, 136, 256, 8);
    let c = GroupedCase::new(g, n, k, &mut rng);
    let kb = k / 128;
    let a = rng.e4m3_codes(g * m_max * k);
    let sa: Vec<f32> = (0..g * m_max * kb)
        .map(|i| 4f32.powi((i % kb) as i32) * (1.0 + 0.5 * rng.sym()))
        .collect();
    let masked_m = [5i64, 0, 8];
    let d = run_masked(&c, m_max, &a, &sa, &masked_m).unwrap();
    let poison = poison_host(DType::BF16, &[n]);
    let dv = d.to_f32_vec();
    assert_eq!(masked_m.len(), g);
    for (grp, &mm) in masked_m.iter().enumerate() {
        for r in 0..m_max {
            let row = grp * m_max + r;
            if (r as i64) < mm {
                let want = c.expected_row(
                    grp,
                    &a[row * k..(row + 1) * k],
                    &sa[row * kb..(row + 1) * kb],
                );
                let got = &dv[row * n..(row + 1) * n];
                assert_eq!(bf16_gemm_violations(got, &want), 0, "group {grp} row {r}");
            } else {
                // Untouched: still the poison bytes.
                assert_eq!(
                    &d.bytes()[row * n * 2..(row + 1) * n * 2],
                    poison.bytes(),
                    "group {grp} row {r} was written"
                );
                assert!(dv[row * n..(row + 1) * n].iter().all(|v| v.is_nan()));
            }
        }
    }

    for (bad, pos) in [([5i64, 9, 0], 1usize), ([-1, 0, 0], 0)] {
        match run_masked(&c, m_max, &a, &sa, &bad).unwrap_err() {
            Error::IndexOutOfRange {
                arg,
                position,
                value,
                ..
            } => {
                assert_eq!(arg, "masked_m");
                assert_eq!(position, vec![pos]);
                assert_eq!(value, bad[pos]);
            }
            other => panic!("expected IndexOutOfRange, got {other:?}"),
        }
    }
}

#[test]
fn fp8_gemm_rejects_mixed_fp8_dtypes() {
    let a = e4m3_tensor(&[2, 128], &[0; 256]);
    let b = up(&HostTensor::zeros(DType::F8E4M3Fnuz, &[4, 128]));
    let sa = f32t(DType::F32, &[2, 1], &[1.0; 2]);
    let sb = f32t(DType::F32, &[1, 1], &[1.0]);
    let mut d = alloc(DType::BF16, &[2, 4]);
    let err = ops::run(
        &be(),
        Fp8Gemm {
            a: &a,
            sa: &sa,
            b: &b,
            sb: &sb,
            d: &mut d,
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::DType { arg: "b", .. }), "got {err:?}");
}

// ---- MoE gate --------------------------------------------------------------------

/// Gate with dim 1 and x = [1]: the logit of expert e is `weight[e]`.
fn run_gate(
    logits: &[f32],
    bias: Option<&[f32]>,
    n_group: usize,
    topk_group: usize,
    topk: usize,
    route_scale: f32,
) -> Result<(Vec<i64>, Vec<f32>)> {
    let e = logits.len();
    let x = f32t(DType::F32, &[1, 1], &[1.0]);
    let w = f32t(DType::F32, &[e, 1], logits);
    let b = bias.map(|b| f32t(DType::F32, &[e], b));
    let mut idx = up(&poison_host(DType::I64, &[1, topk]));
    let mut wt = up(&poison_host(DType::F32, &[1, topk]));
    ops::run(
        &be(),
        MoeGate {
            x: &x,
            weight: &w,
            bias: b.as_ref(),
            topk_idx: &mut idx,
            topk_weights: &mut wt,
            n_group,
            topk_group,
            topk,
            route_scale,
        },
    )?;
    Ok((down(&idx).to_i64_vec(), down(&wt).to_f32_vec()))
}

/// Logit whose sigmoid is `p`.
fn logit(p: f64) -> f32 {
    (p / (1.0 - p)).ln() as f32
}

fn sigmoid32(l: f32) -> f64 {
    (1.0 / (1.0 + (-(l as f64)).exp())) as f32 as f64
}

#[test]
fn moe_gate_group_limit_changes_the_answer() {
    // 4 groups of 2. Scores: g0 [0.9, 0.1] (top-2 sum 1.0), g1 [0.8, 0.75]
    // (1.55), g2 [0.7, 0.7] (1.4), g3 [0.2, 0.2]. Keeping 2 groups keeps g1
    // and g2; top-2 there is {2, 3}. Plain top-2 would be {0, 2}.
    let p = [0.9, 0.1, 0.8, 0.75, 0.7, 0.7, 0.2, 0.2];
    let l: Vec<f32> = p.iter().map(|&p| logit(p)).collect();
    let (idx, w) = run_gate(&l, None, 4, 2, 2, 1.0).unwrap();
    assert_eq!(idx, vec![2, 3]);
    let (s2, s3) = (sigmoid32(l[2]), sigmoid32(l[3]));
    assert!((w[0] as f64 - s2 / (s2 + s3)).abs() <= 1e-7);
    assert!((w[1] as f64 - s3 / (s2 + s3)).abs() <= 1e-7);
    // All groups kept: plain top-2.
    let (idx, _) = run_gate(&l, None, 4, 4, 2, 1.0).unwrap();
    assert_eq!(idx, vec![0, 2]);
    // Bias steers selection (s' = s + bias) but not the weights (s).
    let mut bias = vec![0f32; 8];
    bias[1] = 0.65; // g0 becomes [0.9, 0.75]: sum 1.65 > 1.55 → keep g0, g1
    let (idx, w) = run_gate(&l, Some(&bias), 4, 2, 2, 1.0).unwrap();
    // s' order: e0 0.9, e2 0.8, e1 0.75 (0.1 + 0.65), e3 0.75.
    assert_eq!(idx, vec![0, 2]);
    let (s0, s2) = (sigmoid32(l[0]), sigmoid32(l[2]));
    assert!((w[0] as f64 - s0 / (s0 + s2)).abs() <= 1e-7);
}

#[test]
fn moe_gate_exact_ties_break_to_lower_index() {
    // Two identical groups of 4 with three tied top experts each.
    let l = [0.5f32, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0];
    let (idx, w) = run_gate(&l, None, 2, 1, 2, 1.0).unwrap();
    assert_eq!(idx, vec![1, 2]); // group 0 kept, experts 1 and 2
    assert_eq!(w[0], w[1]);
    assert!((w[0] - 0.5).abs() <= 1e-7);
    // A tiny bias on expert 3 lifts it first (and group 0 stays ahead).
    let mut bias = vec![0f32; 8];
    bias[3] = 1e-3;
    let (idx, _) = run_gate(&l, Some(&bias), 2, 1, 2, 1.0).unwrap();
    assert_eq!(idx, vec![3, 1]);
    // The same on group 1's expert 6: group 1 wins the group tie now.
    let mut bias = vec![0f32; 8];
    bias[6] = 1e-3;
    let (idx, _) = run_gate(&l, Some(&bias), 2, 1, 3, 1.0).unwrap();
    assert_eq!(idx, vec![6, 5, 7]);
}

#[test]
fn moe_gate_weights_are_normalized_and_scaled() {
    let mut rng = Rng::new(5);
    let (t, dim, e) = (4, 32, 16);
    let x = rng.vec(t * dim, 1.0);
    let wt = rng.vec(e * dim, 0.5);
    let bias = rng.vec(e, 0.1);
    let (topk, scale) = (4, 2.5f32);
    let xt = f32t(DType::BF16, &[t, dim], &x);
    let x = down(&xt).to_f32_vec(); // the bf16 values the op sees
    let w = f32t(DType::F32, &[e, dim], &wt);
    let b = f32t(DType::F32, &[e], &bias);
    let mut idx = alloc(DType::I32, &[t, topk]);
    let mut out_w = alloc(DType::F32, &[t, topk]);
    ops::run(
        &be(),
        MoeGate {
            x: &xt,
            weight: &w,
            bias: Some(&b),
            topk_idx: &mut idx,
            topk_weights: &mut out_w,
            n_group: 4,
            topk_group: 2,
            topk,
            route_scale: scale,
        },
    )
    .unwrap();
    let idx = down(&idx).to_i64_vec();
    let out_w = down(&out_w).to_f32_vec();
    for tok in 0..t {
        // Independent evaluation of SPEC §6 for this token.
        let s: Vec<f64> = (0..e)
            .map(|ex| {
                let l: f64 = (0..dim)
                    .map(|j| x[tok * dim + j] as f64 * wt[ex * dim + j] as f64)
                    .sum();
                (1.0 / (1.0 + (-l).exp())) as f32 as f64
            })
            .collect();
        let sp: Vec<f64> = (0..e).map(|ex| (s[ex] as f32 + bias[ex]) as f64).collect();
        let mut groups: Vec<(f64, usize)> = (0..4)
            .map(|g| {
                let mut v = sp[g * 4..g * 4 + 4].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                (v[0] + v[1], g)
            })
            .collect();
        groups.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        let mut cand: Vec<usize> = groups[..2]
            .iter()
            .flat_map(|&(_, g)| g * 4..g * 4 + 4)
            .collect();
        cand.sort_by(|&a, &b| sp[b].partial_cmp(&sp[a]).unwrap().then(a.cmp(&b)));
        let want: Vec<i64> = cand[..topk].iter().map(|&c| c as i64).collect();
        assert_eq!(&idx[tok * topk..(tok + 1) * topk], &want[..], "token {tok}");
        let sum: f64 = cand[..topk].iter().map(|&c| s[c]).sum();
        let mut wsum = 0f64;
        for (slot, &c) in cand[..topk].iter().enumerate() {
            let want = s[c] / sum * scale as f64;
            let got = out_w[tok * topk + slot] as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "token {tok}: {got} vs {want}"
            );
            wsum += got;
        }
        assert!((wsum - scale as f64).abs() <= 1e-5);
    }
}

#[test]
fn moe_gate_rejects_nan() {
    let mut l = vec![0.0f32; 8];
    l[3] = f32::NAN;
    // NaN in the weight.
    let err = run_gate(&l, None, 4, 2, 2, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { arg: "weight", .. }),
        "got {err:?}"
    );
    // NaN in x.
    let x = f32t(DType::F32, &[2, 1], &[1.0, f32::NAN]);
    let w = f32t(DType::F32, &[8, 1], &[0.5; 8]);
    let mut idx = alloc(DType::I64, &[2, 2]);
    let mut wt = alloc(DType::F32, &[2, 2]);
    let err = ops::run(
        &be(),
        MoeGate {
            x: &x,
            weight: &w,
            bias: None,
            topk_idx: &mut idx,
            topk_weights: &mut wt,
            n_group: 4,
            topk_group: 2,
            topk: 2,
            route_scale: 1.0,
        },
    )
    .unwrap_err();
    match err {
        Error::NonFinite { arg, position, .. } => {
            assert_eq!(arg, "x");
            assert_eq!(position, vec![1, 0]);
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

// ---- RoPE ------------------------------------------------------------------------

/// SPEC §8 YaRN frequencies, written out in f64: returns (freq', low, high).
fn yarn_freqs(
    d: usize,
    theta: f64,
    f: f64,
    l0: f64,
    beta_fast: f64,
    beta_slow: f64,
) -> (Vec<f64>, f64, f64) {
    let corr =
        |beta: f64| d as f64 * (l0 / (2.0 * std::f64::consts::PI * beta)).ln() / (2.0 * theta.ln());
    let low = corr(beta_fast).floor().max(0.0);
    let high = corr(beta_slow).ceil().min(d as f64 - 1.0);
    let freqs = (0..d / 2)
        .map(|i| {
            let base = theta.powf(-2.0 * i as f64 / d as f64);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            base * (1.0 - ramp) + base / f * ramp
        })
        .collect();
    (freqs, low, high)
}

fn v3_yarn(mscale: f32, mscale_all_dim: f32) -> RopeConfig {
    RopeConfig {
        layout: Default::default(),
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim,
        }),
    }
}

#[test]
fn rope_yarn_frequencies_match_spec() {
    let (f, low, high) = yarn_freqs(64, 10000.0, 40.0, 4096.0, 32.0, 1.0);
    assert_eq!((low, high), (10.0, 23.0));
    // Below `low` the frequencies are untouched, above `high` divided by 40.
    assert_eq!(f[0], 1.0);
    assert!((f[31] - 10000f64.powf(-62.0 / 64.0) / 40.0).abs() < 1e-18);
    let core = v3_yarn(1.0, 1.0).inv_freq(64);
    assert_eq!(core.len(), 32);
    for i in 0..32 {
        assert_eq!(core[i], f[i] as f32, "freq[{i}]");
    }
    // Without YaRN: θ^(-2i/d).
    let plain = RopeConfig::default().inv_freq(64);
    for (i, &p) in plain.iter().enumerate() {
        assert_eq!(p, 10000f64.powf(-((2 * i) as f64) / 64.0) as f32);
    }
    // Softmax scale of the real model (SPEC §8): 192^-0.5 · m², m = 0.1·ln(40) + 1.
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((192f64.powf(-0.5) * m * m - 0.1352337789).abs() < 1e-9);
}

fn run_rope(x: &HostTensor, pos: &[i64], cfg: RopeConfig, out: DType) -> Result<HostTensor> {
    let xt = up(x);
    let p = up(&HostTensor::from_index(DType::I64, &[pos.len()], pos));
    let mut y = up(&poison_host(out, x.shape()));
    ops::run(
        &be(),
        Rope {
            x: &xt,
            positions: &p,
            y: &mut y,
            config: cfg,
        },
    )?;
    Ok(down(&y))
}

#[test]
fn rope_matches_independent_evaluation() {
    let (t, h, d) = (4, 3, 64);
    let mut rng = Rng::new(9);
    let x = rng.vec(t * h * d, 2.0);
    let pos = [0i64, 1, 4097, 163_000];
    for (ms, ms_all) in [(1.0f32, 1.0f32), (1.0, 0.707)] {
        let cfg = v3_yarn(ms, ms_all);
        let (f, _, _) = yarn_freqs(d, 10000.0, 40.0, 4096.0, 32.0, 1.0);
        let scale = (0.1 * ms as f64 * 40f64.ln() + 1.0) / (0.1 * ms_all as f64 * 40f64.ln() + 1.0);
        let y = run_rope(
            &HostTensor::from_f32(DType::F32, &[t, h, d], &x),
            &pos,
            cfg,
            DType::F32,
        )
        .unwrap()
        .to_f32_vec();
        assert_eq!(f.len(), d / 2);
        for (tok, &p) in pos.iter().enumerate() {
            for hh in 0..h {
                for (i, &fi) in f.iter().enumerate() {
                    // Angle in f32 from the f32 frequency (SPEC §8).
                    let ang = (p as f32 * fi as f32) as f64;
                    let (c, s) = (ang.cos(), ang.sin());
                    let o = (tok * h + hh) * d + 2 * i;
                    let (x0, x1) = (x[o] as f64, x[o + 1] as f64);
                    let y0 = (x0 * c - x1 * s) * scale;
                    let y1 = (x0 * s + x1 * c) * scale;
                    let tol = 1e-6 * (x0.abs() + x1.abs()) * scale;
                    assert!((y[o] as f64 - y0).abs() <= tol, "y[{tok},{hh},{}]", 2 * i);
                    assert!(
                        (y[o + 1] as f64 - y1).abs() <= tol,
                        "y[{tok},{hh},{}]",
                        2 * i + 1
                    );
                }
            }
        }
    }
}

#[test]
fn rope_position_zero_is_identity_and_negative_is_rejected() {
    let mut rng = Rng::new(10);
    let x = HostTensor::from_f32(DType::BF16, &[2, 64], &rng.vec(128, 3.0));
    let y = run_rope(&x, &[0, 0], v3_yarn(1.0, 1.0), DType::BF16).unwrap();
    assert_eq!(y.bytes(), x.bytes());
    // Position 1 is not the identity.
    let y = run_rope(&x, &[0, 1], v3_yarn(1.0, 1.0), DType::BF16).unwrap();
    assert_ne!(y.bytes(), x.bytes());
    match run_rope(&x, &[0, -1], RopeConfig::default(), DType::BF16).unwrap_err() {
        Error::IndexOutOfRange {
            arg,
            position,
            value,
            ..
        } => {
            assert_eq!((arg, position, value), ("positions", vec![1], -1));
        }
        other => panic!("expected IndexOutOfRange, got {other:?}"),
    }
}

// ---- RMSNorm, GEMM, elementwise, embedding -------------------------------------

#[test]
fn rms_norm_matches_f64() {
    let (rows, dim) = (3, 96);
    let mut rng = Rng::new(12);
    let mut x = rng.vec(rows * dim, 4.0);
    x[dim] = 100.0; // one row dominated by an outlier
    let w: Vec<f32> = rng.vec(dim, 1.0).iter().map(|v| v + 1.0).collect();
    let eps = 1e-6f32;
    let want: Vec<f64> = (0..rows * dim)
        .map(|i| {
            let r = i / dim;
            let ms = x[r * dim..(r + 1) * dim]
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                / dim as f64;
            x[i] as f64 / (ms + eps as f64).sqrt() * w[i % dim] as f64
        })
        .collect();
    for out in [DType::BF16, DType::F32] {
        let xt = f32t(DType::F32, &[rows, dim], &x);
        let wt = f32t(DType::F32, &[dim], &w);
        let mut y = up(&poison_host(out, &[rows, dim]));
        ops::run(
            &be(),
            RmsNorm {
                x: &xt,
                weight: &wt,
                y: &mut y,
                eps,
            },
        )
        .unwrap();
        let y = down(&y).to_f32_vec();
        if out == DType::BF16 {
            assert_bf16_rounded(&y, &want, "y");
        } else {
            assert_f32_rounded(&y, &want, "y");
        }
    }
}

#[test]
fn gemm_matches_f64() {
    let (m, n, k) = (5, 7, 300);
    let mut rng = Rng::new(13);
    let a = HostTensor::from_f32(DType::BF16, &[m, k], &rng.vec(m * k, 1.0));
    let b = HostTensor::from_f32(DType::F32, &[n, k], &rng.vec(n * k, 1.0));
    let (av, bv) = (a.to_f32_vec(), b.to_f32_vec());
    let want: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k)
                .map(|t| av[r * k + t] as f64 * bv[c * k + t] as f64)
                .sum()
        })
        .collect();
    for out in [DType::BF16, DType::F32] {
        let (at, bt) = (up(&a), up(&b));
        let mut d = up(&poison_host(out, &[m, n]));
        ops::run(
            &be(),
            Gemm {
                a: &at,
                b: &bt,
                d: &mut d,
            },
        )
        .unwrap();
        let d = down(&d).to_f32_vec();
        if out == DType::BF16 {
            assert_bf16_rounded(&d, &want, "d");
        } else {
            assert_f32_rounded(&d, &want, "d");
        }
    }
}

#[test]
fn silu_mul_and_add_round_once() {
    let n = 257;
    let mut rng = Rng::new(14);
    let g = HostTensor::from_f32(DType::BF16, &[n], &rng.vec(n, 8.0));
    let u = HostTensor::from_f32(DType::F32, &[n], &rng.vec(n, 2.0));
    let (gv, uv) = (g.to_f32_vec(), u.to_f32_vec());
    let (gt, ut) = (up(&g), up(&u));

    let mut out = up(&poison_host(DType::BF16, &[n]));
    ops::run(
        &be(),
        SiluMul {
            gate: &gt,
            up: &ut,
            out: &mut out,
        },
    )
    .unwrap();
    let want: Vec<f64> = gv
        .iter()
        .zip(&uv)
        .map(|(&g, &u)| g as f64 * u as f64 / (1.0 + (-(g as f64)).exp()))
        .collect();
    assert_bf16_rounded(&down(&out).to_f32_vec(), &want, "silu_mul");

    for out_dt in [DType::F32, DType::BF16] {
        let mut out = up(&poison_host(out_dt, &[n]));
        ops::run(
            &be(),
            Add {
                a: &gt,
                b: &ut,
                out: &mut out,
            },
        )
        .unwrap();
        let got = down(&out).to_f32_vec();
        let exact: Vec<f64> = (0..n).map(|i| gv[i] as f64 + uv[i] as f64).collect();
        if out_dt == DType::BF16 {
            assert_bf16_rounded(&got, &exact, "add");
        } else {
            // An f32 add is correctly rounded.
            for i in 0..n {
                assert_eq!(got[i], gv[i] + uv[i], "add[{i}]");
            }
        }
    }
}

#[test]
fn embedding_gathers_rows_and_checks_ids() {
    let (v, dim) = (10, 16);
    let mut rng = Rng::new(15);
    let table = HostTensor::from_f32(DType::BF16, &[v, dim], &rng.vec(v * dim, 1.0));
    let tv = table.to_f32_vec();
    let tt = up(&table);
    let ids = [3i64, 0, 9, 3];
    let run = |ids: &[i64]| -> Result<Vec<f32>> {
        let it = up(&HostTensor::from_index(DType::I32, &[ids.len()], ids));
        let mut out = up(&poison_host(DType::F32, &[ids.len(), dim]));
        ops::run(
            &be(),
            Embedding {
                table: &tt,
                ids: &it,
                out: &mut out,
            },
        )?;
        Ok(down(&out).to_f32_vec())
    };
    let out = run(&ids).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        assert_eq!(&out[t * dim..(t + 1) * dim], &tv[id * dim..(id + 1) * dim]);
    }
    for (bad, pos) in [([3i64, 0, 10, 1], 2usize), ([-1, 0, 0, 0], 0)] {
        match run(&bad).unwrap_err() {
            Error::IndexOutOfRange {
                op,
                arg,
                position,
                value,
                ..
            } => {
                assert_eq!((op, arg), ("embedding", "ids"));
                assert_eq!(position, vec![pos]);
                assert_eq!(value, bad[pos]);
            }
            other => panic!("expected IndexOutOfRange, got {other:?}"),
        }
    }
}

#[test]
fn weight_dequant_576_rows() {
    let (n, k) = (576, 300);
    let mut rng = Rng::new(16);
    let codes = rng.e4m3_codes(n * k);
    let (nb, kb) = (5, 3);
    let s: Vec<f32> = (0..nb * kb)
        .map(|i| 2f32.powi(i as i32 - 7) * (1.0 + 0.5 * rng.sym()))
        .collect();
    let w = e4m3_tensor(&[n, k], &codes);
    let st = f32t(DType::F32, &[nb, kb], &s);
    for out_dt in [DType::F32, DType::BF16] {
        let mut out = up(&poison_host(out_dt, &[n, k]));
        ops::run(
            &be(),
            WeightDequant {
                w: &w,
                s: &st,
                out: &mut out,
            },
        )
        .unwrap();
        let got = down(&out).to_f32_vec();
        for i in 0..n {
            for j in 0..k {
                // Exact product in f64, rounded to f32 (DeepSeek's f32 product),
                // then to the output dtype.
                let p = (e4m3_to_f32(codes[i * k + j]) as f64 * s[(i / 128) * kb + j / 128] as f64)
                    as f32;
                let want = if out_dt == DType::BF16 {
                    round_bf16(p)
                } else {
                    p
                };
                assert_eq!(got[i * k + j].to_bits(), want.to_bits(), "out[{i},{j}]");
            }
        }
    }
}
