//! `cpu-ref` (the fast oracle) against the scalar loops that specify it
//! (`deepport_cpu::scalar`), bit for bit, on random cases of every local
//! op: several shapes including odd sizes, `k` not a multiple of 128 where
//! the op allows it, NaN/inf inputs where the op accepts them.
//!
//! Both run the same case on the same uploaded inputs; every output is
//! compared byte for byte, except that a NaN only has to meet a NaN (the
//! payload of a NaN produced from two NaN operands is not part of the
//! arithmetic: the compiler may swap the operands of a commutative add).

use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor};
use deepport_cpu::scalar::CpuScalar;
use deepport_cpu::CpuRef;
use std::collections::BTreeSet;

// ---- data ----------------------------------------------------------------------

/// xorshift64*: deterministic test data without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    /// `n` values in [-amp, amp); with `specials`, about one in 300 is a
    /// NaN or ±inf.
    fn vals(&mut self, n: usize, amp: f32, specials: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if specials && self.below(300) == 0 {
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][self.below(3)]
                } else {
                    self.sym() * amp
                }
            })
            .collect()
    }
    /// `n` values spread over 2^±30, so that sums cancel and their order
    /// shows in the rounded result.
    fn wide(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.sym() * 2f32.powi(self.below(61) as i32 - 30))
            .collect()
    }
    /// Random bytes: every FP8 code, NaN codes included when `nan`.
    fn fp8(&mut self, dtype: DType, shape: &[usize], nan: bool) -> HostTensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .map(|_| loop {
                let b = self.next() as u8;
                let is_nan = match dtype {
                    DType::F8E4M3Fnuz => b == 0x80,
                    _ => b & 0x7f == 0x7f,
                };
                if nan || !is_nan {
                    break b;
                }
            })
            .collect();
        HostTensor::from_bytes(dtype, shape, bytes).expect("fp8 bytes")
    }
    /// Positive scales (powers of two and others), one in 200 inf with
    /// `specials`.
    fn scales(&mut self, n: usize, specials: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if specials && self.below(200) == 0 {
                    f32::INFINITY
                } else {
                    (self.sym() + 1.5) * 2f32.powi(self.below(9) as i32 - 4)
                }
            })
            .collect()
    }
    fn raw(&mut self, dtype: DType, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let bytes = (0..n).map(|_| self.next() as u8).collect();
        HostTensor::from_bytes(dtype, shape, bytes).expect("raw bytes")
    }
}

fn f32h(dtype: DType, shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(dtype, shape, v)
}

fn idx(dtype: DType, shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_index(dtype, shape, v)
}

// ---- comparison ----------------------------------------------------------------

/// The two implementations of the oracle.
fn backends() -> [(&'static str, Box<dyn Backend>); 2] {
    [
        ("cpu-ref", Box::new(CpuRef::new())),
        ("scalar", Box::new(CpuScalar)),
    ]
}

fn up(b: &dyn Backend, h: &HostTensor) -> Tensor {
    b.upload(h).expect("upload")
}

fn down(b: &dyn Backend, t: &Tensor) -> HostTensor {
    b.download(t).expect("download")
}

/// Element `i` of a float tensor as f64 when it is a NaN (of any payload).
fn is_nan_at(h: &HostTensor, i: usize) -> bool {
    match h.dtype() {
        DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E4M3Fnuz => {
            h.to_f32_vec()[i].is_nan()
        }
        _ => false,
    }
}

/// Fails unless `fast` equals `spec` bit for bit (NaN meets any NaN).
fn assert_same(case: &str, name: &str, fast: &HostTensor, spec: &HostTensor) {
    assert_eq!(fast.dtype(), spec.dtype(), "{case}: {name} dtype");
    assert_eq!(fast.shape(), spec.shape(), "{case}: {name} shape");
    if fast.bytes() == spec.bytes() {
        return;
    }
    let size = fast.dtype().size();
    let (fb, sb) = (fast.bytes(), spec.bytes());
    for i in 0..fast.numel() {
        let r = i * size..(i + 1) * size;
        if fb[r.clone()] != sb[r] && !(is_nan_at(fast, i) && is_nan_at(spec, i)) {
            panic!(
                "{case}: {name}[{i}] differs: cpu-ref bytes {:02x?} ({}), scalar bytes {:02x?} ({})",
                &fb[i * size..(i + 1) * size],
                fast.to_f32_vec().get(i).copied().unwrap_or(f32::NAN),
                &sb[i * size..(i + 1) * size],
                spec.to_f32_vec().get(i).copied().unwrap_or(f32::NAN),
            );
        }
    }
}

/// Runs `case` on both implementations and compares every output it
/// returns. The case must succeed on both.
fn check(
    case: &str,
    run: impl Fn(&dyn Backend) -> deepport_core::Result<Vec<(&'static str, HostTensor)>>,
) {
    let [(_, fast), (_, spec)] = backends();
    let f = run(fast.as_ref()).unwrap_or_else(|e| panic!("{case}: cpu-ref failed: {e}"));
    let s = run(spec.as_ref()).unwrap_or_else(|e| panic!("{case}: scalar failed: {e}"));
    assert_eq!(f.len(), s.len());
    assert!(!f.is_empty(), "{case}: no outputs");
    for ((name, fh), (_, sh)) in f.iter().zip(&s) {
        assert_same(case, name, fh, sh);
    }
}

// ---- the cases, per op ----------------------------------------------------------

const FP8: [DType; 2] = [DType::F8E4M3, DType::F8E4M3Fnuz];
const ACT: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn act_quant(rng: &mut Rng) {
    for (i, &(m, k)) in [(1, 128), (5, 384), (37, 256)].iter().enumerate() {
        let xd = ACT[i % 3];
        let x = f32h(xd, &[m, k], &rng.vals(m * k, 3.0, false));
        for (j, &qd) in FP8.iter().enumerate() {
            let fmt = [ScaleFmt::Float, ScaleFmt::Ue8m0][(i + j) % 2];
            check(&format!("act_quant m={m} k={k} {qd:?} {fmt:?}"), |b| {
                let xt = up(b, &x);
                let mut q = b.alloc(qd, &[m, k])?;
                let mut s = b.alloc(DType::F32, &[m, k / 128])?;
                ops::run(
                    b,
                    ActQuant {
                        x: &xt,
                        q: &mut q,
                        s: &mut s,
                        scale_fmt: fmt,
                    },
                )?;
                Ok(vec![("q", down(b, &q)), ("s", down(b, &s))])
            });
        }
    }
}

fn weight_dequant(rng: &mut Rng) {
    for (i, &(n, k)) in [(1, 1), (300, 200), (129, 385), (256, 128)]
        .iter()
        .enumerate()
    {
        let wd = FP8[i % 2];
        let w = rng.fp8(wd, &[n, k], true);
        let (nb, kb) = (n.div_ceil(128), k.div_ceil(128));
        let s = f32h(DType::F32, &[nb, kb], &rng.scales(nb * kb, true));
        let od = ACT[i % 3];
        check(&format!("weight_dequant n={n} k={k} {wd:?} {od:?}"), |b| {
            let (wt, st) = (up(b, &w), up(b, &s));
            let mut out = b.alloc(od, &[n, k])?;
            ops::run(
                b,
                WeightDequant {
                    w: &wt,
                    s: &st,
                    out: &mut out,
                },
            )?;
            Ok(vec![("out", down(b, &out))])
        });
    }
}

/// Shapes of the FP8 GEMMs: odd sizes, k below, at and past 128 and not a
/// multiple of it, n past a scale block.
const GEMM_SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (5, 7, 130),
    (37, 200, 384),
    (130, 260, 300),
    (9, 129, 128),
    (3, 513, 77),
];

/// An FP8 GEMM whose block sums cancel: blocks 0 and 1 of every row hold
/// the same codes with b negated and equal huge scales (their scaled sums
/// cancel exactly); the later blocks have small scales. Any other order of
/// the block additions loses the small blocks' low bits.
fn fp8_gemm_cancelling(rng: &mut Rng, m: usize, n: usize, k: usize) {
    assert!(k > 256);
    let dt = DType::F8E4M3;
    let kb = k.div_ceil(128);
    let mut a = rng.fp8(dt, &[m, k], false).bytes().to_vec();
    let mut bv = rng.fp8(dt, &[n, k], false).bytes().to_vec();
    for i in 0..m {
        for kk in 0..128 {
            a[i * k + 128 + kk] = a[i * k + kk];
        }
    }
    for j in 0..n {
        for kk in 0..128 {
            bv[j * k + 128 + kk] = bv[j * k + kk] ^ 0x80;
        }
    }
    let a = HostTensor::from_bytes(dt, &[m, k], a).expect("a");
    let b_ = HostTensor::from_bytes(dt, &[n, k], bv).expect("b");
    let sa: Vec<f32> = (0..m * kb)
        .map(|x| if x % kb < 2 { 2f32.powi(20) } else { 1.0 })
        .collect();
    let nb = n.div_ceil(128);
    let sb: Vec<f32> = (0..nb * kb)
        .map(|x| {
            if x % kb < 2 {
                2f32.powi(20)
            } else {
                2f32.powi(-20) * (1.0 + rng.sym().abs())
            }
        })
        .collect();
    let (sa, sb) = (
        f32h(DType::F32, &[m, kb], &sa),
        f32h(DType::F32, &[nb, kb], &sb),
    );
    check(&format!("fp8_gemm (cancelling) m={m} n={n} k={k}"), |b| {
        let (at, sat, bt, sbt) = (up(b, &a), up(b, &sa), up(b, &b_), up(b, &sb));
        let mut d = b.alloc(DType::F32, &[m, n])?;
        ops::run(
            b,
            Fp8Gemm {
                a: &at,
                sa: &sat,
                b: &bt,
                sb: &sbt,
                d: &mut d,
            },
        )?;
        Ok(vec![("d", down(b, &d))])
    });
}

fn fp8_gemm(rng: &mut Rng) {
    fp8_gemm_cancelling(rng, 5, 9, 300);
    fp8_gemm_cancelling(rng, 17, 140, 520);
    for (i, &(m, n, k)) in GEMM_SHAPES.iter().enumerate() {
        let ad = FP8[i % 2];
        let od = [DType::BF16, DType::F32][i % 2];
        let nan = i % 3 == 1;
        let kb = k.div_ceil(128);
        let a = rng.fp8(ad, &[m, k], nan);
        let b_ = rng.fp8(ad, &[n, k], nan);
        // Scales over a wide range make the f64 sum of the blocks cancel.
        let sa = f32h(DType::F32, &[m, kb], &rng.scales(m * kb, nan));
        let nkb = n.div_ceil(128) * kb;
        let sbv = if nan {
            rng.scales(nkb, nan)
        } else {
            rng.wide(nkb)
        };
        let sb = f32h(DType::F32, &[n.div_ceil(128), kb], &sbv);
        check(&format!("fp8_gemm m={m} n={n} k={k} {ad:?} {od:?}"), |b| {
            let (at, sat, bt, sbt) = (up(b, &a), up(b, &sa), up(b, &b_), up(b, &sb));
            let mut d = b.alloc(od, &[m, n])?;
            ops::run(
                b,
                Fp8Gemm {
                    a: &at,
                    sa: &sat,
                    b: &bt,
                    sb: &sbt,
                    d: &mut d,
                },
            )?;
            Ok(vec![("d", down(b, &d))])
        });
    }
}

fn fp8_grouped_contiguous(rng: &mut Rng) {
    for (i, &(g, m, n, k)) in [
        (1usize, 5usize, 7usize, 130usize),
        (3, 70, 200, 256),
        (4, 131, 129, 300),
        (2, 1, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let ad = FP8[i % 2];
        let od = [DType::BF16, DType::F32][i % 2];
        let nan = i == 1;
        let kb = k.div_ceil(128);
        let nb = n.div_ceil(128);
        let a = rng.fp8(ad, &[m, k], nan);
        let b_ = rng.fp8(ad, &[g, n, k], nan);
        let sa = f32h(DType::F32, &[m, kb], &rng.wide(m * kb));
        let sb = f32h(DType::F32, &[g, nb, kb], &rng.scales(g * nb * kb, nan));
        // Shuffled groups with padding rows (-1).
        let mi: Vec<i64> = (0..m).map(|_| rng.below(g + 1) as i64 - 1).collect();
        let it = [DType::I32, DType::I64][i % 2];
        let mih = idx(it, &[m], &mi);
        check(
            &format!("fp8_grouped_contiguous g={g} m={m} n={n} k={k}"),
            |b| {
                let (at, sat, bt, sbt, mt) =
                    (up(b, &a), up(b, &sa), up(b, &b_), up(b, &sb), up(b, &mih));
                let mut d = b.alloc(od, &[m, n])?;
                ops::run(
                    b,
                    Fp8GroupedContiguous {
                        a: &at,
                        sa: &sat,
                        b: &bt,
                        sb: &sbt,
                        m_indices: &mt,
                        d: &mut d,
                    },
                )?;
                Ok(vec![("d", down(b, &d))])
            },
        );
    }
}

fn fp8_grouped_masked(rng: &mut Rng) {
    for (i, &(g, m_max, n, k)) in [
        (1usize, 5usize, 7usize, 130usize),
        (3, 64, 200, 256),
        (4, 33, 129, 300),
        (2, 1, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let ad = FP8[i % 2];
        let od = [DType::BF16, DType::F32][i % 2];
        let nan = i == 2;
        let kb = k.div_ceil(128);
        let nb = n.div_ceil(128);
        let a = rng.fp8(ad, &[g, m_max, k], nan);
        let b_ = rng.fp8(ad, &[g, n, k], nan);
        let sa = f32h(DType::F32, &[g, m_max, kb], &rng.wide(g * m_max * kb));
        let sb = f32h(DType::F32, &[g, nb, kb], &rng.scales(g * nb * kb, nan));
        let masked: Vec<i64> = (0..g).map(|_| rng.below(m_max + 1) as i64).collect();
        let mh = idx(DType::I32, &[g], &masked);
        // Rows past masked_m keep d's bytes: start from the same random d.
        let d0 = rng.raw(od, &[g, m_max, n]);
        check(
            &format!("fp8_grouped_masked g={g} m_max={m_max} n={n} k={k} masked={masked:?}"),
            |b| {
                let (at, sat, bt, sbt, mt) =
                    (up(b, &a), up(b, &sa), up(b, &b_), up(b, &sb), up(b, &mh));
                let mut d = up(b, &d0);
                ops::run(
                    b,
                    Fp8GroupedMasked {
                        a: &at,
                        sa: &sat,
                        b: &bt,
                        sb: &sbt,
                        masked_m: &mt,
                        d: &mut d,
                    },
                )?;
                Ok(vec![("d", down(b, &d))])
            },
        );
    }
}

/// Rows of `a [m, k]` and `b [n, k]` whose dot products cancel: two
/// products of ±2^60 at k/3 and 2k/3 cancel exactly, with small products
/// before, between and after them, so any other order of the additions
/// gives another f32 result.
fn cancel_pair(rng: &mut Rng, m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let (p1, p2) = (k / 3, 2 * k / 3);
    let mut a = rng.vals(m * k, 1.0, false);
    let mut b = rng.vals(n * k, 1.0, false);
    for i in 0..m {
        a[i * k + p1] = 2f32.powi(30);
        a[i * k + p2] = 2f32.powi(30);
    }
    for j in 0..n {
        let v = [1.0, 1.5, 0.75][rng.below(3)] * 2f32.powi(30);
        b[j * k + p1] = v;
        b[j * k + p2] = -v;
    }
    (a, b)
}

/// A plain GEMM whose sums cancel: in every row, two products of ±2^60
/// cancel exactly, with small products before, between and after them, so
/// any other order of the additions gives another f32 result.
fn gemm_cancelling(rng: &mut Rng, m: usize, n: usize, k: usize, dt: DType) {
    let (a, b_) = cancel_pair(rng, m, n, k);
    let (a, b_) = (f32h(dt, &[m, k], &a), f32h(dt, &[n, k], &b_));
    check(
        &format!("gemm (cancelling) m={m} n={n} k={k} {dt:?}"),
        |b| {
            let (at, bt) = (up(b, &a), up(b, &b_));
            let mut d = b.alloc(DType::F32, &[m, n])?;
            ops::run(
                b,
                Gemm {
                    a: &at,
                    b: &bt,
                    d: &mut d,
                },
            )?;
            Ok(vec![("d", down(b, &d))])
        },
    );
}

fn gemm(rng: &mut Rng) {
    gemm_cancelling(rng, 6, 9, 300, DType::F32);
    gemm_cancelling(rng, 13, 130, 257, DType::BF16);
    for (i, &(m, n, k)) in GEMM_SHAPES.iter().enumerate() {
        let (ad, od) = (ACT[i % 3], ACT[(i + 1) % 3]);
        let specials = i % 2 == 1;
        let (a, b_) = if i % 3 == 0 {
            (
                f32h(ad, &[m, k], &rng.wide(m * k)),
                f32h(ad, &[n, k], &rng.wide(n * k)),
            )
        } else {
            (
                f32h(ad, &[m, k], &rng.vals(m * k, 2.0, specials)),
                f32h(ad, &[n, k], &rng.vals(n * k, 2.0, specials)),
            )
        };
        check(&format!("gemm m={m} n={n} k={k} {ad:?} {od:?}"), |b| {
            let (at, bt) = (up(b, &a), up(b, &b_));
            let mut d = b.alloc(od, &[m, n])?;
            ops::run(
                b,
                Gemm {
                    a: &at,
                    b: &bt,
                    d: &mut d,
                },
            )?;
            Ok(vec![("d", down(b, &d))])
        });
    }
}

/// The grouped bf16/f32 GEMMs: cpu-ref runs each group's rows on the
/// plain GEMM's tiles, the specification on its row loops.
fn gemm_grouped_contiguous(rng: &mut Rng) {
    for (i, &(g, m, n, k)) in [(3usize, 7usize, 9usize, 130usize), (2, 40, 33, 77)]
        .iter()
        .enumerate()
    {
        let dt = [DType::F32, DType::BF16][i % 2];
        // Case 0: sums that cancel (`cancel_pair`), so any other order
        // of the additions shows in the rounded result.
        let (a, b_) = if i == 0 {
            cancel_pair(rng, m, g * n, k)
        } else {
            (rng.vals(m * k, 2.0, true), rng.vals(g * n * k, 2.0, false))
        };
        let (a, b_) = (f32h(dt, &[m, k], &a), f32h(dt, &[g, n, k], &b_));
        let idx: Vec<i32> = (0..m).map(|_| rng.below(g + 1) as i32 - 1).collect();
        check(
            &format!("gemm_grouped_contiguous g={g} m={m} n={n} k={k} {dt:?}"),
            |b| {
                let (at, bt) = (up(b, &a), up(b, &b_));
                let it = b.upload(&HostTensor::from_i32(&[m], &idx))?;
                let mut d = b.alloc(DType::F32, &[m, n])?;
                ops::run(
                    b,
                    GemmGroupedContiguous {
                        a: &at,
                        b: &bt,
                        m_indices: &it,
                        d: &mut d,
                    },
                )?;
                Ok(vec![("d", down(b, &d))])
            },
        );
    }
}

fn gemm_grouped_masked(rng: &mut Rng) {
    for (i, &(g, m, n, k)) in [(3usize, 5usize, 9usize, 130usize), (2, 17, 20, 64)]
        .iter()
        .enumerate()
    {
        let dt = [DType::BF16, DType::F32][i % 2];
        // Case 1: sums that cancel (`cancel_pair`).
        let (a, b_) = if i == 1 {
            cancel_pair(rng, g * m, g * n, k)
        } else {
            (
                rng.vals(g * m * k, 2.0, false),
                rng.vals(g * n * k, 2.0, true),
            )
        };
        let (a, b_) = (f32h(dt, &[g, m, k], &a), f32h(dt, &[g, n, k], &b_));
        let mm: Vec<i32> = (0..g).map(|_| rng.below(m + 1) as i32).collect();
        check(
            &format!("gemm_grouped_masked g={g} m={m} n={n} k={k} {dt:?}"),
            |b| {
                let (at, bt) = (up(b, &a), up(b, &b_));
                let mt = b.upload(&HostTensor::from_i32(&[g], &mm))?;
                let mut d = b.alloc(DType::BF16, &[g, m, n])?;
                ops::run(
                    b,
                    GemmGroupedMasked {
                        a: &at,
                        b: &bt,
                        masked_m: &mt,
                        d: &mut d,
                    },
                )?;
                Ok(vec![("d", down(b, &d))])
            },
        );
    }
}

/// (batch, s_q, h_q, h_kv, d, dv, block_size, causal)
type DecodeShape = (usize, usize, usize, usize, usize, usize, usize, bool);

/// An MLA decode whose sums cancel. Scores: channels 0..4 of a query are
/// `[2^20, r, 2^20, r']` and of key `t` `[a_t, r_t, -a_t, r'_t]` (the small
/// channel-1 term is lost between two cancelling ones, so another order of
/// the dot product gives another score); the other query channels are 0.
/// Outputs: the last visible key repeats key 0's channels 0..4 (the same
/// score, hence the same probability) and the two hold ±2^40 in channels
/// 4..dv, with small values in between: the result is made of rounding
/// residues that only the scalar order of additions reproduces.
fn mla_decode_cancelling(rng: &mut Rng, batch: usize, s_q: usize, h_q: usize, h_kv: usize) {
    let (d, dv, bs) = (40, 32, 4);
    let len: usize = 11;
    let max_blocks = len.div_ceil(bs);
    let num_blocks = batch * max_blocks;
    let table: Vec<i64> = (0..num_blocks as i64).collect();
    let table = idx(DType::I32, &[batch, max_blocks], &table);
    let sl = idx(DType::I32, &[batch], &vec![len as i64; batch]);
    let mut q = vec![0f32; batch * s_q * h_q * d];
    for row in q.chunks_exact_mut(d) {
        row[0] = 2f32.powi(20);
        row[1] = rng.sym();
        row[2] = 2f32.powi(20);
        row[3] = rng.sym();
    }
    let mut kc = rng.vals(num_blocks * bs * h_kv * d, 1.0, false);
    let key_at = |b: usize, t: usize, h: usize| ((b * max_blocks * bs + t) * h_kv + h) * d;
    for b in 0..batch {
        for h in 0..h_kv {
            for t in 0..len {
                let o = key_at(b, t, h);
                let a = rng.sym() * 2f32.powi(20);
                kc[o] = a;
                kc[o + 2] = -a;
            }
            let (first, last) = (key_at(b, 0, h), key_at(b, len - 1, h));
            for c in 0..4 {
                kc[last + c] = kc[first + c];
            }
            for c in 4..dv {
                kc[first + c] = 2f32.powi(40);
                kc[last + c] = -(2f32.powi(40));
            }
        }
    }
    let q = f32h(DType::F32, &[batch, s_q, h_q, d], &q);
    let kc = f32h(DType::F32, &[num_blocks, bs, h_kv, d], &kc);
    check(
        &format!("mla_decode (cancelling) b={batch} s_q={s_q} h_q={h_q} h_kv={h_kv}"),
        |b| {
            let (qt, kt, bt, st) = (up(b, &q), up(b, &kc), up(b, &table), up(b, &sl));
            let mut out = b.alloc(DType::F32, &[batch, s_q, h_q, dv])?;
            let mut lse = b.alloc(DType::F32, &[batch, h_q, s_q])?;
            ops::run(
                b,
                MlaDecode {
                    q: &qt,
                    kcache: &kt,
                    block_table: &bt,
                    cache_seqlens: &st,
                    out: &mut out,
                    lse: &mut lse,
                    softmax_scale: 0.25,
                    causal: false,
                },
            )?;
            Ok(vec![("out", down(b, &out)), ("lse", down(b, &lse))])
        },
    );
}

fn mla_decode(rng: &mut Rng) {
    mla_decode_cancelling(rng, 2, 2, 8, 2);
    mla_decode_cancelling(rng, 1, 3, 5, 1);
    let shapes: [DecodeShape; 6] = [
        (1, 1, 1, 1, 8, 8, 4, false),
        (3, 2, 8, 2, 40, 24, 16, true),
        (2, 4, 6, 3, 33, 17, 5, true),
        (2, 1, 16, 1, 576, 512, 64, false),
        (4, 3, 9, 1, 19, 7, 3, false),
        (2, 2, 128, 1, 576, 512, 64, true),
    ];
    for (i, &(batch, s_q, h_q, h_kv, d, dv, bs, causal)) in shapes.iter().enumerate() {
        let dt = if i % 2 == 1 {
            [DType::F32, DType::BF16][(i / 2) % 2]
        } else {
            [DType::BF16, DType::F32, DType::F16][i % 3]
        };
        // Lengths: one empty sequence in most cases, the rest random.
        let max_len = 3 * bs + 2;
        let lens: Vec<i64> = (0..batch)
            .map(|j| {
                if j == 0 && i % 2 == 1 {
                    0
                } else {
                    1 + rng.below(max_len) as i64
                }
            })
            .collect();
        let max_blocks = max_len.div_ceil(bs);
        let num_blocks = batch * max_blocks + 1;
        // A shuffled block table.
        let mut perm: Vec<i64> = (0..num_blocks as i64).collect();
        for j in (1..perm.len()).rev() {
            perm.swap(j, rng.below(j + 1));
        }
        let table = idx(
            DType::I32,
            &[batch, max_blocks],
            &perm[..batch * max_blocks],
        );
        let sl = idx(DType::I32, &[batch], &lens);
        // Odd cases: tiny queries (flat softmax) over keys spread over
        // 2^±30, so that the order of every sum shows in the output.
        let nq = batch * s_q * h_q * d;
        let nk = num_blocks * bs * h_kv * d;
        let (q, kc) = if i % 2 == 1 {
            (
                f32h(dt, &[batch, s_q, h_q, d], &rng.vals(nq, 1e-12, false)),
                f32h(dt, &[num_blocks, bs, h_kv, d], &rng.wide(nk)),
            )
        } else {
            // Some inf in the cache make NaN/inf outputs where they are read.
            (
                f32h(dt, &[batch, s_q, h_q, d], &rng.vals(nq, 1.0, false)),
                f32h(dt, &[num_blocks, bs, h_kv, d], &rng.vals(nk, 1.0, i == 4)),
            )
        };
        let scale = [0.0625f32, 0.1352, 1.0 / (d as f32).sqrt(), 0.3][i % 4];
        check(&format!("mla_decode b={batch} s_q={s_q} h_q={h_q} h_kv={h_kv} d={d} dv={dv} lens={lens:?} causal={causal}"), |b| {
            let (qt, kt, bt, st) = (up(b, &q), up(b, &kc), up(b, &table), up(b, &sl));
            let out_dt = if dt == DType::BF16 { DType::BF16 } else { DType::F32 };
            let mut out = b.alloc(out_dt, &[batch, s_q, h_q, dv])?;
            let mut lse = b.alloc(DType::F32, &[batch, h_q, s_q])?;
            ops::run(
                b,
                MlaDecode {
                    q: &qt,
                    kcache: &kt,
                    block_table: &bt,
                    cache_seqlens: &st,
                    out: &mut out,
                    lse: &mut lse,
                    softmax_scale: scale,
                    causal,
                },
            )?;
            Ok(vec![("out", down(b, &out)), ("lse", down(b, &lse))])
        });
    }
}

fn mla_prefill(rng: &mut Rng) {
    // (t, s, heads, dn, dr, dc, dv)
    for (i, &(t, s, h, dn, dr, dc, dv)) in [
        (1, 1, 1, 4, 2, 8, 4),
        (4, 7, 3, 8, 4, 12, 6),
        (5, 9, 2, 16, 8, 24, 16),
    ]
    .iter()
    .enumerate()
    {
        let dt = ACT[i % 3];
        let qn = f32h(dt, &[t, h, dn], &rng.vals(t * h * dn, 1.0, false));
        let qp = f32h(dt, &[t, h, dr], &rng.vals(t * h * dr, 1.0, false));
        let lat = f32h(dt, &[s, dc], &rng.vals(s * dc, 1.0, false));
        let kpe = f32h(dt, &[s, dr], &rng.vals(s * dr, 1.0, false));
        let w = f32h(
            dt,
            &[h * (dn + dv), dc],
            &rng.vals(h * (dn + dv) * dc, 0.5, false),
        );
        for form in [MlaForm::Naive, MlaForm::Absorbed] {
            check(&format!("mla_prefill t={t} s={s} h={h} {form:?}"), |b| {
                let (a1, a2, a3, a4, a5) =
                    (up(b, &qn), up(b, &qp), up(b, &lat), up(b, &kpe), up(b, &w));
                let out_dt = if dt == DType::BF16 {
                    DType::BF16
                } else {
                    DType::F32
                };
                let mut out = b.alloc(out_dt, &[t, h, dv])?;
                ops::run(
                    b,
                    MlaPrefill {
                        q_nope: &a1,
                        q_pe: &a2,
                        latent: &a3,
                        k_pe: &a4,
                        wkv_b: &a5,
                        out: &mut out,
                        softmax_scale: 1.0 / ((dn + dr) as f32).sqrt(),
                        form,
                    },
                )?;
                Ok(vec![("out", down(b, &out))])
            });
        }
    }
}

fn rms_norm(rng: &mut Rng) {
    for (i, &(rows, dim)) in [(1, 1), (7, 33), (16, 512)].iter().enumerate() {
        let dt = ACT[i % 3];
        let x = f32h(dt, &[rows, dim], &rng.vals(rows * dim, 4.0, i == 1));
        let w = f32h(dt, &[dim], &rng.vals(dim, 1.0, false));
        check(&format!("rms_norm rows={rows} dim={dim}"), |b| {
            let (xt, wt) = (up(b, &x), up(b, &w));
            let mut y = b.alloc(dt, &[rows, dim])?;
            ops::run(
                b,
                RmsNorm {
                    x: &xt,
                    weight: &wt,
                    y: &mut y,
                    eps: 1e-6,
                },
            )?;
            Ok(vec![("y", down(b, &y))])
        });
    }
}

fn rope(rng: &mut Rng) {
    let yarn = RopeConfig {
        layout: Default::default(),
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        }),
    };
    for (i, &(t, h, d)) in [(1, 1, 2), (5, 3, 64), (9, 2, 10)].iter().enumerate() {
        let dt = ACT[i % 3];
        let x = f32h(dt, &[t, h, d], &rng.vals(t * h * d, 2.0, i == 2));
        let pos: Vec<i64> = (0..t).map(|_| rng.below(200_000) as i64).collect();
        let p = idx(DType::I64, &[t], &pos);
        let cfg = match i {
            1 => yarn,
            2 => RopeConfig {
                layout: RopeLayout::Half,
                ..RopeConfig::default()
            },
            _ => RopeConfig::default(),
        };
        check(&format!("rope t={t} h={h} d={d}"), |b| {
            let (xt, pt) = (up(b, &x), up(b, &p));
            let mut y = b.alloc(dt, &[t, h, d])?;
            ops::run(
                b,
                Rope {
                    x: &xt,
                    positions: &pt,
                    y: &mut y,
                    config: cfg,
                },
            )?;
            Ok(vec![("y", down(b, &y))])
        });
    }
}

fn moe_gate(rng: &mut Rng) {
    for (i, &(t, dim, e, n_group, topk_group, topk)) in [
        (3, 16, 8, 2, 1, 2),
        (9, 40, 32, 4, 2, 6),
        (4, 8, 8, 2, 1, 2),
    ]
    .iter()
    .enumerate()
    {
        let dt = ACT[i % 3];
        let (mut xv, mut wv) = (rng.vals(t * dim, 1.0, false), rng.vals(e * dim, 1.0, false));
        let dt = if i == 2 {
            // Cancelling logits: x_0·w_0 + 1e16 − 1e16 in the specification's
            // order loses the first product (ties broken by the bias);
            // any other order of the sum keeps it.
            for tok in 0..t {
                xv[tok * dim..(tok + 1) * dim]
                    .copy_from_slice(&[1.0, 1e16, -1e16, 0.0, 0.0, 0.0, 0.0, 0.0]);
            }
            for ex in 0..e {
                wv[ex * dim..ex * dim + 3].copy_from_slice(&[0.25 * (ex + 1) as f32, 1.0, 1.0]);
            }
            DType::F32
        } else {
            dt
        };
        let x = f32h(dt, &[t, dim], &xv);
        let w = f32h(dt, &[e, dim], &wv);
        let bias = f32h(DType::F32, &[e], &rng.vals(e, 0.1, false));
        check(&format!("moe_gate t={t} e={e}"), |b| {
            let (xt, wt, bt) = (up(b, &x), up(b, &w), up(b, &bias));
            let mut ix = b.alloc(DType::I64, &[t, topk])?;
            let mut wts = b.alloc(DType::F32, &[t, topk])?;
            ops::run(
                b,
                MoeGate {
                    x: &xt,
                    weight: &wt,
                    bias: if i == 0 { None } else { Some(&bt) },
                    topk_idx: &mut ix,
                    topk_weights: &mut wts,
                    n_group,
                    topk_group,
                    topk,
                    route_scale: 2.5,
                },
            )?;
            Ok(vec![
                ("topk_idx", down(b, &ix)),
                ("topk_weights", down(b, &wts)),
            ])
        });
    }
}

fn silu_mul(rng: &mut Rng) {
    for (i, &n) in [1usize, 37, 1000].iter().enumerate() {
        let dt = ACT[i % 3];
        let g = f32h(dt, &[n], &rng.vals(n, 8.0, i == 2));
        let u = f32h(dt, &[n], &rng.vals(n, 8.0, i == 2));
        check(&format!("silu_mul n={n}"), |b| {
            let (gt, ut) = (up(b, &g), up(b, &u));
            let mut out = b.alloc(dt, &[n])?;
            ops::run(
                b,
                SiluMul {
                    gate: &gt,
                    up: &ut,
                    out: &mut out,
                },
            )?;
            Ok(vec![("out", down(b, &out))])
        });
    }
}

fn add(rng: &mut Rng) {
    for (i, &n) in [1usize, 37, 1000].iter().enumerate() {
        let dt = ACT[i % 3];
        let a = f32h(dt, &[n], &rng.vals(n, 8.0, i == 2));
        let c = f32h(dt, &[n], &rng.vals(n, 8.0, i == 2));
        check(&format!("add n={n}"), |b| {
            let (at, ct) = (up(b, &a), up(b, &c));
            let mut out = b.alloc(dt, &[n])?;
            ops::run(
                b,
                Add {
                    a: &at,
                    b: &ct,
                    out: &mut out,
                },
            )?;
            Ok(vec![("out", down(b, &out))])
        });
    }
}

fn embedding(rng: &mut Rng) {
    let (v, dim, t) = (11, 9, 7);
    let table = f32h(DType::BF16, &[v, dim], &rng.vals(v * dim, 3.0, true));
    let ids: Vec<i64> = (0..t).map(|_| rng.below(v) as i64).collect();
    let ih = idx(DType::I32, &[t], &ids);
    check("embedding", |b| {
        let (tt, it) = (up(b, &table), up(b, &ih));
        let mut out = b.alloc(DType::BF16, &[t, dim])?;
        ops::run(
            b,
            Embedding {
                table: &tt,
                ids: &it,
                out: &mut out,
            },
        )?;
        Ok(vec![("out", down(b, &out))])
    });
}

fn copy_window(rng: &mut Rng) {
    let src = f32h(DType::F32, &[6, 9], &rng.vals(54, 3.0, true));
    let dst0 = rng.raw(DType::BF16, &[5, 7]);
    check("copy_window", |b| {
        let st = up(b, &src);
        let mut dt = up(b, &dst0);
        ops::run(
            b,
            CopyWindow {
                src: &st,
                dst: &mut dt,
                src_origin: (1, 2),
                dst_origin: (2, 1),
                size: (3, 5),
            },
        )?;
        Ok(vec![("dst", down(b, &dt))])
    });
}

fn gather_rows(rng: &mut Rng) {
    let src = rng.raw(DType::BF16, &[6, 5]);
    let ix: Vec<i64> = (0..9).map(|_| rng.below(7) as i64 - 1).collect();
    let ih = idx(DType::I64, &[9], &ix);
    check("gather_rows", |b| {
        let (st, it) = (up(b, &src), up(b, &ih));
        let mut dst = b.alloc(DType::BF16, &[9, 5])?;
        ops::run(
            b,
            GatherRows {
                src: &st,
                index: &it,
                dst: &mut dst,
            },
        )?;
        Ok(vec![("dst", down(b, &dst))])
    });
}

fn reduce_rows(rng: &mut Rng) {
    // Small, then past one block of the hidden dimension (with a partial
    // last block), values spread so that sums cancel, and every dtype pair.
    for (i, &(s, n, k, h)) in [(10, 4, 3, 33), (40, 9, 5, 600)].iter().enumerate() {
        for (sd, od) in [
            (DType::BF16, DType::BF16),
            (DType::F32, DType::F32),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            if i == 0 && (sd, od) != (DType::BF16, DType::BF16) {
                continue;
            }
            reduce_rows_case(rng, s, n, k, h, sd, od);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn reduce_rows_case(rng: &mut Rng, s: usize, n: usize, k: usize, h: usize, sd: DType, od: DType) {
    let mut v = rng.vals(s * h, 3.0, true);
    for (x, y) in v.iter_mut().zip(rng.wide(s * h)).step_by(3) {
        *x = y;
    }
    // Rows of subnormal sums (rounded to bf16 by the reference's slow path).
    for x in v.iter_mut().take(2 * h) {
        *x *= 2f32.powi(-128);
    }
    let src = f32h(sd, &[s, h], &v);
    let mut ix: Vec<i64> = (0..n * k).map(|_| rng.below(s + 1) as i64 - 1).collect();
    // Token 0 sums only the subnormal rows.
    for (j, x) in ix.iter_mut().take(k).enumerate() {
        *x = [0, 1, -1][j % 3];
    }
    let ih = idx(DType::I32, &[n, k], &ix);
    let w = f32h(DType::F32, &[n, k], &rng.vals(n * k, 1.0, false));
    for weighted in [false, true] {
        check(
            &format!("reduce_rows {s}x{h} {sd:?}->{od:?} weighted={weighted}"),
            |b| {
                let (st, it, wt) = (up(b, &src), up(b, &ih), up(b, &w));
                let mut out = b.alloc(od, &[n, h])?;
                ops::run(
                    b,
                    ReduceRows {
                        src: &st,
                        index: &it,
                        weights: weighted.then_some(&wt),
                        out: &mut out,
                    },
                )?;
                Ok(vec![("out", down(b, &out))])
            },
        );
    }
}

fn get_dispatch_layout(rng: &mut Rng) {
    let (n, k, e, world) = (13, 4, 16, 4);
    let ix: Vec<i64> = (0..n * k).map(|_| rng.below(e + 1) as i64 - 1).collect();
    let ih = idx(DType::I64, &[n, k], &ix);
    check("get_dispatch_layout", |b| {
        let it = up(b, &ih);
        let mut pr = b.alloc(DType::I32, &[world])?;
        let mut pe = b.alloc(DType::I32, &[e])?;
        let mut ir = b.alloc(DType::Bool, &[n, world])?;
        ops::run(
            b,
            GetDispatchLayout {
                topk_idx: &it,
                num_tokens_per_rank: &mut pr,
                num_tokens_per_expert: &mut pe,
                is_token_in_rank: &mut ir,
                num_experts: e,
                world_size: world,
            },
        )?;
        Ok(vec![
            ("num_tokens_per_rank", down(b, &pr)),
            ("num_tokens_per_expert", down(b, &pe)),
            ("is_token_in_rank", down(b, &ir)),
        ])
    });
}

// ---- DeepSeek-V3.2 sparse ops ----------------------------------------------------

fn indexer_logits(rng: &mut Rng) {
    // (b, next_n, h, d, block, max_blocks): the last one has sequences
    // longer than cpu-ref's token blocks (256), lengths not a multiple of
    // the register tile, and one of length 1 (its first query sees nothing).
    for &(b, next_n, h, d, block, max_blocks) in &[
        (2usize, 1usize, 3usize, 16usize, 5usize, 4usize),
        (3, 2, 4, 128, 64, 4),
        (3, 2, 7, 128, 64, 10),
    ] {
        let lens: Vec<i64> = (0..b)
            .map(|i| match i {
                0 => 0,
                1 if max_blocks > 4 => 1,
                2 if max_blocks > 4 => 257 + rng.below((max_blocks - 5) * block) as i64,
                _ => 1 + rng.below((max_blocks - 1) * block) as i64,
            })
            .collect();
        let nb = b * max_blocks + 1;
        let mut table: Vec<i64> = (0..nb as i64).collect();
        table.rotate_left(1);
        let table = &table[..b * max_blocks];
        let mut q = rng.fp8(DType::F8E4M3, &[b, next_n, h, d], false);
        let mut wv = rng.vals(b * next_n * h, 1.0, false);
        if max_blocks > 4 {
            // The head sum cancels: head 1 repeats head 0's query (the
            // same dot product) with weight −2^40 against head 0's +2^40.
            // In head order the two cancel exactly before the other heads
            // come; in another order the others' terms are rounded against
            // 2^40·dot first and leave a residue that shows.
            let mut qb = q.bytes().to_vec();
            for row in qb.chunks_exact_mut(h * d) {
                let first = row[..d].to_vec();
                row[d..2 * d].copy_from_slice(&first);
            }
            q = HostTensor::from_bytes(DType::F8E4M3, &[b, next_n, h, d], qb).unwrap();
            for row in wv.chunks_exact_mut(h) {
                row[0] = 2f32.powi(40);
                row[1] = -(2f32.powi(40));
            }
        }
        let w = f32h(DType::F32, &[b * next_n, h], &wv);
        let mut cache = rng.raw(DType::U8, &[nb, block, d + 4]).bytes().to_vec();
        let sc = rng.scales(nb * block, false);
        for blk in 0..nb {
            for off in 0..block {
                let at = blk * block * (d + 4) + block * d + off * 4;
                cache[at..at + 4].copy_from_slice(&sc[blk * block + off].to_le_bytes());
            }
        }
        let cache = HostTensor::from_bytes(DType::U8, &[nb, block, d + 4], cache).unwrap();
        let lt = idx(DType::I32, &[b], &lens);
        let tt = idx(DType::I32, &[b, max_blocks], table);
        check(
            &format!("indexer_logits b={b} next_n={next_n} d={d}"),
            |be| {
                let (qt, wt, ct, l, t) = (
                    up(be, &q),
                    up(be, &w),
                    up(be, &cache),
                    up(be, &lt),
                    up(be, &tt),
                );
                let mut o = be.alloc(DType::F32, &[b * next_n, max_blocks * block])?;
                ops::run(
                    be,
                    IndexerLogits {
                        q: &qt,
                        weights: &wt,
                        kv_cache: &ct,
                        context_lens: &l,
                        block_table: &t,
                        logits: &mut o,
                    },
                )?;
                Ok(vec![("logits", down(be, &o))])
            },
        );
    }
}

fn indexer_topk(rng: &mut Rng) {
    // The last case: few distinct values (ties at the cut) and more NaN,
    // topk below most lengths (cpu-ref selects, then sorts the selection).
    for &(rows, n, topk) in &[(3usize, 20usize, 8usize), (4, 9, 16), (6, 64, 7)] {
        let mut v = rng.vals(rows * n, 2.0, true);
        let every = if n == 64 { 1 } else { 3 };
        v.iter_mut()
            .step_by(every)
            .for_each(|x| *x = (*x * 2.0).round());
        if n == 64 {
            v.iter_mut().step_by(17).for_each(|x| *x = f32::NAN);
        }
        let l = f32h(DType::F32, &[rows, n], &v);
        let lens: Vec<i64> = (0..rows).map(|_| rng.below(n + 1) as i64).collect();
        let lt = idx(DType::I32, &[rows], &lens);
        check(&format!("indexer_topk rows={rows} n={n}"), |be| {
            let (x, y) = (up(be, &l), up(be, &lt));
            let mut o = be.alloc(DType::I32, &[rows, topk])?;
            ops::run(
                be,
                IndexerTopk {
                    logits: &x,
                    lengths: &y,
                    indices: &mut o,
                },
            )?;
            Ok(vec![("indices", down(be, &o))])
        });
    }
}

/// A V3.2 latent cache of `nb · block` tokens: random e4m3 codes (no
/// NaN), random scales, random bf16 rope values; in every token channel 2
/// is −channel 0 (the scores' cancelling pair of [`cancelling_queries`]).
fn latent_cache(rng: &mut Rng, nb: usize, block: usize) -> Vec<u8> {
    let mut cache = rng
        .raw(DType::U8, &[nb, block, V32_TOKEN_BYTES])
        .bytes()
        .to_vec();
    for t in cache.chunks_mut(V32_TOKEN_BYTES) {
        for c in t[..V32_NOPE].iter_mut() {
            if *c & 0x7f == 0x7f {
                *c = 0x10;
            }
        }
        t[2] = t[0] ^ 0x80;
        let sc = rng.scales(4, false);
        for (g, s) in sc.iter().enumerate() {
            t[V32_NOPE + 4 * g..V32_NOPE + 4 * g + 4].copy_from_slice(&s.to_le_bytes());
        }
        for r in 0..V32_ROPE {
            let v = half_bits(rng.sym());
            t[528 + 2 * r..528 + 2 * r + 2].copy_from_slice(&v);
        }
    }
    cache
}

/// Makes latent tokens `a` and `b` twins for the outputs' cancellation:
/// the same bytes, except that `b` negates channels 128..512, and both get
/// those channels' scales times 2^40. Against [`cancelling_queries`]
/// (zero past channel 128) the two have the same score, hence the same
/// probability, and their values in channels 128..512 cancel. Selected
/// first and second, they cancel exactly before the other keys' terms come
/// in the scalar order; in another order those terms are rounded against
/// the twins' 2^40-sized values first and leave a residue that shows.
fn latent_twins(cache: &mut [u8], a: usize, b: usize) {
    let tok = V32_TOKEN_BYTES;
    for g in 1..4 {
        let at = a * tok + V32_NOPE + 4 * g;
        let s = f32::from_le_bytes(cache[at..at + 4].try_into().unwrap()) * 2f32.powi(40);
        cache[at..at + 4].copy_from_slice(&s.to_le_bytes());
    }
    let ta: Vec<u8> = cache[a * tok..(a + 1) * tok].to_vec();
    let tb = &mut cache[b * tok..(b + 1) * tok];
    tb.copy_from_slice(&ta);
    for c in &mut tb[128..V32_NOPE] {
        *c ^= 0x80;
    }
}

/// `n` query rows of `d` values whose scores cancel: channels 0 and 2 are
/// 2^36 and every key holds `x, …, −x` there, so the small channel-1 and
/// channel-3 terms are partly lost between the two cancelling ones and
/// another order of the dot product gives another score. Channels 4..128
/// are small random values, the rest 0 (see [`latent_twins`]).
fn cancelling_queries(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut q = vec![0f32; n * d];
    for row in q.chunks_exact_mut(d) {
        row[..128].copy_from_slice(&rng.vals(128, 1e-3, false));
        row[0] = 2f32.powi(36);
        row[1] = rng.sym();
        row[2] = 2f32.powi(36);
        row[3] = rng.sym();
    }
    q
}

/// (b, s_q, h_q, topk, block, cancelling, sink, topk_length)
type SparseDecodeShape = (usize, usize, usize, usize, usize, bool, bool, bool);

fn sparse_mla_decode(rng: &mut Rng) {
    // One row with many heads (split over threads), several rows (rows
    // over threads), topk not a multiple of the tile, cancelling sums
    // (f32 outputs), sink and topk_length on and off.
    let shapes: [SparseDecodeShape; 6] = [
        (2, 1, 3, 6, 5, false, true, false),
        (1, 2, 2, 9, 3, false, false, true),
        (1, 1, 20, 37, 7, true, true, false),
        (3, 2, 16, 45, 4, true, false, true),
        (2, 1, 64, 29, 16, true, true, false),
        (1, 1, 7, 1, 1, false, false, false),
    ];
    for (i, &(b, s_q, h_q, topk, block, cancel, with_sink, with_len)) in shapes.iter().enumerate() {
        let nb = 4;
        let slots = nb * block;
        let mut cache = latent_cache(rng, nb, block);
        let mut ind: Vec<i64> = (0..b * s_q * topk)
            .map(|_| {
                if rng.below(4) == 0 {
                    -1
                } else {
                    rng.below(slots) as i64
                }
            })
            .collect();
        if cancel {
            // Twins at slots 0 and slots − 1, first and second in every row.
            latent_twins(&mut cache, 0, slots - 1);
            for row in ind.chunks_exact_mut(topk) {
                row[0] = 0;
                row[1] = slots as i64 - 1;
            }
        }
        let cache =
            HostTensor::from_bytes(DType::U8, &[nb, block, V32_TOKEN_BYTES], cache).unwrap();
        let it = idx(DType::I32, &[b, s_q, topk], &ind);
        let dt = if cancel { DType::F32 } else { ACT[i % 2] };
        let n = b * s_q * h_q;
        let qv = if cancel {
            cancelling_queries(rng, n, V32_D)
        } else {
            rng.vals(n * V32_D, 0.3, false)
        };
        let q = f32h(dt, &[b, s_q, h_q, V32_D], &qv);
        let sink = f32h(DType::F32, &[h_q], &rng.vals(h_q, 2.0, false));
        let tl = idx(
            DType::I32,
            &[b],
            &(0..b)
                .map(|_| rng.below(topk + 1) as i64)
                .collect::<Vec<_>>(),
        );
        let scale = if cancel { 2f32.powi(-12) } else { 0.05 };
        check(
            &format!("sparse_mla_decode b={b} s_q={s_q} h_q={h_q} topk={topk} cancelling={cancel}"),
            |be| {
                let (qt, ct, ix, st, lt) = (
                    up(be, &q),
                    up(be, &cache),
                    up(be, &it),
                    up(be, &sink),
                    up(be, &tl),
                );
                let mut o = be.alloc(
                    if dt == DType::BF16 {
                        DType::BF16
                    } else {
                        DType::F32
                    },
                    &[b, s_q, h_q, V32_NOPE],
                )?;
                let mut l = be.alloc(DType::F32, &[b, h_q, s_q])?;
                ops::run(
                    be,
                    SparseMlaDecode {
                        q: &qt,
                        kcache: &ct,
                        indices: &ix,
                        topk_length: with_len.then_some(&lt),
                        attn_sink: with_sink.then_some(&st),
                        out: &mut o,
                        lse: &mut l,
                        softmax_scale: scale,
                    },
                )?;
                Ok(vec![("out", down(be, &o)), ("lse", down(be, &l))])
            },
        );
    }
}

/// (s_q, s_kv, h_q, topk, d_qk, cancelling)
type SparsePrefillShape = (usize, usize, usize, usize, usize, bool);

fn sparse_mla_prefill(rng: &mut Rng) {
    let shapes: [SparsePrefillShape; 6] = [
        (3, 7, 2, 9, V32_D, false),
        (2, 12, 3, 5, V32_NOPE, false),
        (2, 0, 2, 4, V32_D, false),
        (1, 30, 16, 21, V32_D, true),
        (5, 40, 7, 19, V32_NOPE, true),
        (4, 50, 12, 33, V32_D, true),
    ];
    for (i, &(s_q, s_kv, h_q, topk, d, cancel)) in shapes.iter().enumerate() {
        let mut ind: Vec<i64> = (0..s_q * topk)
            .map(|_| match rng.below(5) {
                0 => -1,
                1 => s_kv as i64 + rng.below(3) as i64,
                _ => rng.below(s_kv.max(1)) as i64,
            })
            .collect();
        let dt = if cancel { DType::F32 } else { ACT[i % 2] };
        let mut kvv = rng.vals(s_kv * d, 0.3, false);
        let qv = if cancel {
            // The latent twins of `latent_twins` in plain values: rows 0
            // and s_kv − 1, first and second in every query's selection.
            for k in kvv.chunks_exact_mut(d) {
                k[2] = -k[0];
            }
            for v in &mut kvv[128..V32_NOPE] {
                *v *= 2f32.powi(40);
            }
            let first: Vec<f32> = kvv[..d].to_vec();
            let last = &mut kvv[(s_kv - 1) * d..s_kv * d];
            last.copy_from_slice(&first);
            last[128..V32_NOPE].iter_mut().for_each(|v| *v = -*v);
            for row in ind.chunks_exact_mut(topk) {
                row[0] = 0;
                row[1] = s_kv as i64 - 1;
            }
            cancelling_queries(rng, s_q * h_q, d)
        } else {
            rng.vals(s_q * h_q * d, 0.3, false)
        };
        let it = idx(DType::I32, &[s_q, 1, topk], &ind);
        let q = f32h(dt, &[s_q, h_q, d], &qv);
        let kv = f32h(dt, &[s_kv, 1, d], &kvv);
        let mut sv = rng.vals(h_q, 2.0, false);
        sv[0] = f32::NEG_INFINITY;
        let sink = f32h(DType::F32, &[h_q], &sv);
        let tl = idx(
            DType::I32,
            &[s_q],
            &(0..s_q)
                .map(|_| rng.below(topk + 1) as i64)
                .collect::<Vec<_>>(),
        );
        let (with_len, with_sink) = (i % 3 == 1, i % 3 != 1);
        check(
            &format!(
                "sparse_mla_prefill s_q={s_q} s_kv={s_kv} h_q={h_q} d={d} cancelling={cancel}"
            ),
            |be| {
                let (qt, kt, ix, st, lt) = (
                    up(be, &q),
                    up(be, &kv),
                    up(be, &it),
                    up(be, &sink),
                    up(be, &tl),
                );
                let od = if dt == DType::BF16 {
                    DType::BF16
                } else {
                    DType::F32
                };
                let mut o = be.alloc(od, &[s_q, h_q, V32_NOPE])?;
                let mut m = be.alloc(DType::F32, &[s_q, h_q])?;
                let mut l = be.alloc(DType::F32, &[s_q, h_q])?;
                ops::run(
                    be,
                    SparseMlaPrefill {
                        q: &qt,
                        kv: &kt,
                        indices: &ix,
                        topk_length: with_len.then_some(&lt),
                        attn_sink: with_sink.then_some(&st),
                        out: &mut o,
                        max_logits: &mut m,
                        lse: &mut l,
                        softmax_scale: if cancel { 4.0 } else { 0.07 },
                    },
                )?;
                Ok(vec![
                    ("out", down(be, &o)),
                    ("max_logits", down(be, &m)),
                    ("lse", down(be, &l)),
                ])
            },
        );
    }
}

/// The little-endian bytes of `x` rounded to bf16.
fn half_bits(x: f32) -> [u8; 2] {
    ((deepport_core::formats::round_bf16(x).to_bits() >> 16) as u16).to_le_bytes()
}

fn cache_quant(rng: &mut Rng) {
    for (i, &(nb, bs, layout, ue8m0)) in [
        (2usize, 3usize, CacheLayout::Index, false),
        (1, 5, CacheLayout::Index, true),
        (2, 2, CacheLayout::Latent, false),
        (1, 3, CacheLayout::Latent, true),
    ]
    .iter()
    .enumerate()
    {
        let d = if layout == CacheLayout::Latent {
            V32_D
        } else {
            128
        };
        // f16 cannot hold the wide values (overflow to inf is an error).
        let dt = ACT[i % 2];
        let mut v = rng.wide(nb * bs * d);
        v[..d].iter_mut().for_each(|x| *x = 0.0);
        let x = f32h(dt, &[nb, bs, d], &v);
        check(&format!("cache_quant {layout:?} ue8m0={ue8m0}"), |be| {
            let xt = up(be, &x);
            let mut c = be.alloc(DType::U8, &[nb, bs, layout.token_bytes(d)])?;
            ops::run(
                be,
                CacheQuant {
                    x: &xt,
                    cache: &mut c,
                    layout,
                    ue8m0,
                },
            )?;
            Ok(vec![("cache", down(be, &c))])
        });
    }
}

/// The random cases of one op.
type Cases = fn(&mut Rng);

/// Every local op's random cases.
const CASES: &[(OpKind, Cases)] = &[
    (OpKind::ActQuant, act_quant),
    (OpKind::WeightDequant, weight_dequant),
    (OpKind::Fp8Gemm, fp8_gemm),
    (OpKind::Fp8GroupedContiguous, fp8_grouped_contiguous),
    (OpKind::Fp8GroupedMasked, fp8_grouped_masked),
    (OpKind::Gemm, gemm),
    (OpKind::MlaDecode, mla_decode),
    (OpKind::MlaPrefill, mla_prefill),
    (OpKind::RmsNorm, rms_norm),
    (OpKind::Rope, rope),
    (OpKind::MoeGate, moe_gate),
    (OpKind::SiluMul, silu_mul),
    (OpKind::Embedding, embedding),
    (OpKind::Add, add),
    (OpKind::CopyWindow, copy_window),
    (OpKind::GatherRows, gather_rows),
    (OpKind::ReduceRows, reduce_rows),
    (OpKind::GetDispatchLayout, get_dispatch_layout),
    (OpKind::GemmGroupedContiguous, gemm_grouped_contiguous),
    (OpKind::GemmGroupedMasked, gemm_grouped_masked),
    (OpKind::IndexerLogits, indexer_logits),
    (OpKind::IndexerTopk, indexer_topk),
    (OpKind::SparseMlaDecode, sparse_mla_decode),
    (OpKind::CacheQuant, cache_quant),
    (OpKind::SparseMlaPrefill, sparse_mla_prefill),
];

#[test]
fn every_local_op_has_cases() {
    let covered: BTreeSet<OpKind> = CASES.iter().map(|&(k, _)| k).collect();
    let missing: Vec<&str> = OpKind::ALL
        .into_iter()
        .filter(|k| k.is_local() && !covered.contains(k))
        .map(|k| k.name())
        .collect();
    assert!(
        missing.is_empty(),
        "local ops without bit-exactness cases in oracle_bitexact.rs: {missing:?}"
    );
}

#[test]
fn cpu_ref_equals_the_scalar_loops_bit_for_bit() {
    for (n, &(kind, cases)) in CASES.iter().enumerate() {
        // Two seeds per op, independent of the other ops' cases.
        for seed in 0..2u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((n as u64) << 8 | seed) ^ kind as u64);
            cases(&mut rng);
        }
    }
}

#[test]
fn the_comparison_sees_a_one_ulp_difference() {
    // The check must be able to fail: a bf16 tensor one ulp off.
    let a = f32h(DType::BF16, &[3], &[1.0, 2.0, 3.0]);
    let b = f32h(DType::BF16, &[3], &[1.0, 2.0 + 2f32.powi(-6), 3.0]);
    let r = std::panic::catch_unwind(|| assert_same("probe", "x", &a, &b));
    assert!(r.is_err());
    // NaN meets NaN of another payload.
    let n1 = HostTensor::from_bytes(DType::F32, &[1], f32::NAN.to_le_bytes().to_vec()).unwrap();
    let n2 = HostTensor::from_bytes(DType::F32, &[1], (-f32::NAN).to_le_bytes().to_vec()).unwrap();
    assert_same("probe", "nan", &n1, &n2);
}

/// cpu-ref's register tiles are compiled per instruction set
/// (`src/tiles.rs`): the ops that run on them give the scalar loops' bits
/// with every set this CPU runs (forced through `with_simd`; the default
/// run above takes the best one).
#[test]
fn every_instruction_set_gives_the_scalar_loops_bits() {
    use deepport_cpu::fast::{with_simd, Simd};
    let tiled: [(OpKind, Cases); 10] = [
        (OpKind::Fp8Gemm, fp8_gemm),
        (OpKind::Fp8GroupedContiguous, fp8_grouped_contiguous),
        (OpKind::Fp8GroupedMasked, fp8_grouped_masked),
        (OpKind::Gemm, gemm),
        (OpKind::GemmGroupedContiguous, gemm_grouped_contiguous),
        (OpKind::GemmGroupedMasked, gemm_grouped_masked),
        (OpKind::MlaDecode, mla_decode),
        (OpKind::SparseMlaDecode, sparse_mla_decode),
        (OpKind::SparseMlaPrefill, sparse_mla_prefill),
        (OpKind::IndexerLogits, indexer_logits),
    ];
    let sets: Vec<Simd> = [Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.available())
        .collect();
    println!("instruction sets checked: {sets:?}");
    for simd in sets {
        for &(kind, cases) in &tiled {
            let mut rng = Rng(0x5eed ^ kind as u64 ^ (simd as u64) << 16);
            with_simd(simd, || cases(&mut rng)).expect("available");
        }
    }
}
