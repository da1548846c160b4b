//! The fast `cpu` kernels against `cpu-ref` on odd shapes, on every
//! instruction set this machine runs (the portable path always), within
//! SPEC.md's tolerances.

use deepport_core::backend::{poison_host, Backend, Tensor};
use deepport_core::formats::ulp_bf16;
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor};
use deepport_cpu::fast::{with_amx_kernels, with_simd, Simd};
use deepport_cpu::{Cpu, CpuRef};

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym() * amp).collect()
    }
    /// Finite e4m3 codes (never 0x7f / 0xff).
    fn e4m3(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| loop {
                let c = (self.next() >> 56) as u8;
                if c & 0x7f != 0x7f {
                    break c;
                }
            })
            .collect()
    }
    /// Positive scales around 1e-2.
    fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 0.01 * (1.5 + self.sym())).collect()
    }
}

/// A kernel choice: one SIMD set without AMX, or the AMX-BF16 kernels.
#[derive(Clone, Copy, Debug)]
enum Kern {
    Set(Simd),
    Amx,
}

/// Every kernel choice this CPU runs (AMX where usable; where not, says so).
fn isas() -> Vec<Kern> {
    let mut v: Vec<Kern> = [Simd::Avx512Bf16, Simd::Avx512, Simd::Avx2, Simd::Portable]
        .into_iter()
        .filter(|s| s.available())
        .map(Kern::Set)
        .collect();
    match deepport_cpu::fast::amx::unavailable_reason() {
        None => v.insert(0, Kern::Amx),
        Some(why) => eprintln!("AMX kernels skipped: {why}"),
    }
    v
}

/// Runs `f` with ops of this thread on `k`.
fn with_kern<R>(k: Kern, f: impl FnOnce() -> R) -> deepport_core::Result<R> {
    match k {
        Kern::Set(s) => with_simd(s, f),
        Kern::Amx => with_amx_kernels(f),
    }
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// SPEC §3 bounds: bf16 `|d − r| ≤ 2 ulp_bf16(r) + 1e-3·rms(r)`, f32
/// `|d − r| ≤ 1e-5·|r| + 1e-5·rms(r)`.
fn assert_gemm_close(what: &str, dtype: DType, d: &[f32], r: &[f32]) {
    assert_eq!(d.len(), r.len());
    let rr = rms(r);
    assert!(rr > 0.0, "{what}: reference is all zero");
    for (i, (&x, &y)) in d.iter().zip(r).enumerate() {
        let err = (x as f64 - y as f64).abs();
        let tol = match dtype {
            DType::BF16 => 2.0 * ulp_bf16(y) as f64 + 1e-3 * rr,
            _ => 1e-5 * (y as f64).abs() + 1e-5 * rr,
        };
        assert!(err <= tol, "{what}: element {i}: {x} vs reference {y}");
    }
}

/// Uploads `h` to both backends.
fn up2(h: &HostTensor) -> (Tensor, Tensor) {
    (Cpu.upload(h).unwrap(), CpuRef.upload(h).unwrap())
}

fn codes(shape: &[usize], c: Vec<u8>) -> HostTensor {
    HostTensor::from_bytes(DType::F8E4M3, shape, c).unwrap()
}

fn f32h(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(DType::F32, shape, v)
}

#[test]
fn fp8_gemm_matches_reference() {
    let mut rng = Rng(7);
    // (m, n, k): m = 1, n not a multiple of any tile, k = 3·128, a K tail,
    // and m > 128 (B packed once per call; 130 and 257 rows are 2 and 3
    // row blocks of equal size, whose last register tile is partial).
    for &(m, n, k) in &[
        (1, 200, 384),
        (37, 300, 384),
        (9, 45, 200),
        (130, 129, 256),
        (257, 136, 256),
    ] {
        let a = codes(&[m, k], rng.e4m3(m * k));
        let sa = f32h(&[m, k.div_ceil(128)], &rng.scales(m * k.div_ceil(128)));
        let b = codes(&[n, k], rng.e4m3(n * k));
        let nsb = n.div_ceil(128) * k.div_ceil(128);
        let sb = f32h(&[n.div_ceil(128), k.div_ceil(128)], &rng.scales(nsb));
        let (a1, a2) = up2(&a);
        let (sa1, sa2) = up2(&sa);
        let (b1, b2) = up2(&b);
        let (sb1, sb2) = up2(&sb);
        for dtype in [DType::BF16, DType::F32] {
            let mut dr = CpuRef.alloc(dtype, &[m, n]).unwrap();
            ops::run(
                &CpuRef,
                Fp8Gemm {
                    a: &a2,
                    sa: &sa2,
                    b: &b2,
                    sb: &sb2,
                    d: &mut dr,
                },
            )
            .unwrap();
            let r = CpuRef.download(&dr).unwrap().to_f32_vec();
            for simd in isas() {
                let mut d = Cpu.alloc(dtype, &[m, n]).unwrap();
                with_kern(simd, || {
                    ops::run(
                        &Cpu,
                        Fp8Gemm {
                            a: &a1,
                            sa: &sa1,
                            b: &b1,
                            sb: &sb1,
                            d: &mut d,
                        },
                    )
                })
                .unwrap()
                .unwrap();
                let got = Cpu.download(&d).unwrap().to_f32_vec();
                assert_gemm_close(&format!("{simd:?} {m}x{n}x{k} {dtype}"), dtype, &got, &r);
            }
        }
    }
}

/// The values of `cpu`'s `d` and `cpu-ref`'s `dr`, as f32.
fn downloads(d: &Tensor, dr: &Tensor) -> (Vec<f32>, Vec<f32>) {
    (
        Cpu.download(d).unwrap().to_f32_vec(),
        CpuRef.download(dr).unwrap().to_f32_vec(),
    )
}

/// `Fp8Gemm` on both backends: `cpu` (on `kern`) and `cpu-ref` outputs.
fn fp8_gemm_both(
    kern: Kern,
    (a1, a2): (&Tensor, &Tensor),
    (sa1, sa2): (&Tensor, &Tensor),
    (b1, b2): (&Tensor, &Tensor),
    (sb1, sb2): (&Tensor, &Tensor),
    (m, n): (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut d = Cpu.alloc(DType::F32, &[m, n]).unwrap();
    let mut dr = CpuRef.alloc(DType::F32, &[m, n]).unwrap();
    with_kern(kern, || {
        ops::run(
            &Cpu,
            Fp8Gemm {
                a: a1,
                sa: sa1,
                b: b1,
                sb: sb1,
                d: &mut d,
            },
        )
    })
    .unwrap()
    .unwrap();
    ops::run(
        &CpuRef,
        Fp8Gemm {
            a: a2,
            sa: sa2,
            b: b2,
            sb: sb2,
            d: &mut dr,
        },
    )
    .unwrap();
    downloads(&d, &dr)
}

/// B decoded into panels is kept with the weight between calls (more than
/// 16 rows); a write to B must drop it.
#[test]
fn fp8_gemm_after_a_write_to_b_uses_the_new_codes() {
    let mut rng = Rng(78);
    let (m, n, k): (usize, usize, usize) = (37, 150, 384);
    let kb = k.div_ceil(128);
    let (a1, a2) = up2(&codes(&[m, k], rng.e4m3(m * k)));
    let (sa1, sa2) = up2(&f32h(&[m, kb], &rng.scales(m * kb)));
    let nsb = n.div_ceil(128) * kb;
    let (sb1, sb2) = up2(&f32h(&[n.div_ceil(128), kb], &rng.scales(nsb)));
    for kern in isas() {
        let (mut b1, mut b2) = up2(&codes(&[n, k], rng.e4m3(n * k)));
        let mut first = Vec::new();
        for _ in 0..2 {
            let (got, want) = fp8_gemm_both(
                kern,
                (&a1, &a2),
                (&sa1, &sa2),
                (&b1, &b2),
                (&sb1, &sb2),
                (m, n),
            );
            assert_gemm_close(&format!("{kern:?} B as uploaded"), DType::F32, &got, &want);
            first = got;
        }
        let nb = codes(&[n, k], rng.e4m3(n * k));
        Cpu.write(&mut b1, &nb).unwrap();
        CpuRef.write(&mut b2, &nb).unwrap();
        let (got, want) = fp8_gemm_both(
            kern,
            (&a1, &a2),
            (&sa1, &sa2),
            (&b1, &b2),
            (&sb1, &sb2),
            (m, n),
        );
        assert_gemm_close(
            &format!("{kern:?} after a write to B"),
            DType::F32,
            &got,
            &want,
        );
        assert!(got != first, "{kern:?}: the new B gave the old output");
    }
}

#[test]
fn fp8_gemm_one_wrong_block_scale_is_visible() {
    // The comparison above can fail: a kernel that drops one K block's
    // scale would differ from the reference by far more than the bound.
    let mut rng = Rng(11);
    let (m, n, k) = (4, 130, 256);
    let a = codes(&[m, k], rng.e4m3(m * k));
    let mut sa_v = rng.scales(m * 2);
    let sa = f32h(&[m, 2], &sa_v);
    let b = codes(&[n, k], rng.e4m3(n * k));
    let sb = f32h(&[2, 2], &rng.scales(4));
    let run = |be: &dyn Backend, sa: &HostTensor| {
        let (a, sa, b, sb) = (
            be.upload(&a).unwrap(),
            be.upload(sa).unwrap(),
            be.upload(&b).unwrap(),
            be.upload(&sb).unwrap(),
        );
        let mut d = be.alloc(DType::F32, &[m, n]).unwrap();
        ops::run(
            be,
            Fp8Gemm {
                a: &a,
                sa: &sa,
                b: &b,
                sb: &sb,
                d: &mut d,
            },
        )
        .unwrap();
        be.download(&d).unwrap().to_f32_vec()
    };
    let good = run(&CpuRef, &sa);
    sa_v[1] *= 2.0;
    let bad = run(&Cpu, &f32h(&[m, 2], &sa_v));
    let r = std::panic::catch_unwind(|| assert_gemm_close("bad", DType::F32, &bad, &good));
    assert!(r.is_err(), "a doubled block scale went unnoticed");
}

#[test]
fn grouped_contiguous_matches_reference() {
    let mut rng = Rng(21);
    let (g, n, k) = (3, 160, 384);
    // Group 0: 128 rows; padding: 128 rows; group 1: empty; group 2: 144
    // rows (more than one 128-row block: packed once).
    let mut idx = vec![0i64; 128];
    idx.extend(std::iter::repeat_n(-1, 128));
    idx.extend(std::iter::repeat_n(2, 144));
    let m = idx.len();
    let kb = k / 128;
    let a = codes(&[m, k], rng.e4m3(m * k));
    let sa = f32h(&[m, kb], &rng.scales(m * kb));
    let b = codes(&[g, n, k], rng.e4m3(g * n * k));
    let sb = f32h(&[g, 2, kb], &rng.scales(g * 2 * kb));
    let mi = HostTensor::from_index(DType::I32, &[m], &idx);
    let (a1, a2) = up2(&a);
    let (sa1, sa2) = up2(&sa);
    let (b1, b2) = up2(&b);
    let (sb1, sb2) = up2(&sb);
    let (mi1, mi2) = up2(&mi);
    let mut dr = CpuRef.alloc(DType::BF16, &[m, n]).unwrap();
    ops::run(
        &CpuRef,
        Fp8GroupedContiguous {
            a: &a2,
            sa: &sa2,
            b: &b2,
            sb: &sb2,
            m_indices: &mi2,
            d: &mut dr,
        },
    )
    .unwrap();
    let r = CpuRef.download(&dr).unwrap().to_f32_vec();
    let keep: Vec<usize> = (0..m).filter(|&i| idx[i] >= 0).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        keep.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    for simd in isas() {
        let mut d = Cpu.alloc(DType::BF16, &[m, n]).unwrap();
        with_kern(simd, || {
            ops::run(
                &Cpu,
                Fp8GroupedContiguous {
                    a: &a1,
                    sa: &sa1,
                    b: &b1,
                    sb: &sb1,
                    m_indices: &mi1,
                    d: &mut d,
                },
            )
        })
        .unwrap()
        .unwrap();
        let got = Cpu.download(&d).unwrap().to_f32_vec();
        assert_gemm_close(
            &format!("{simd:?} contiguous"),
            DType::BF16,
            &pick(&got),
            &pick(&r),
        );
    }
    // A group index out of range is an error, not a panic.
    let mut bad = idx.clone();
    bad[0] = 3;
    let bad = Cpu
        .upload(&HostTensor::from_index(DType::I32, &[m], &bad))
        .unwrap();
    let mut d = Cpu.alloc(DType::BF16, &[m, n]).unwrap();
    let err = ops::run(
        &Cpu,
        Fp8GroupedContiguous {
            a: &a1,
            sa: &sa1,
            b: &b1,
            sb: &sb1,
            m_indices: &bad,
            d: &mut d,
        },
    );
    assert!(err.is_err());
}

#[test]
fn grouped_masked_matches_reference_and_leaves_masked_rows() {
    let mut rng = Rng(33);
    let (g, m_max, n, k) = (3, 140, 70, 384);
    let masked = [0i64, 5, 140];
    let kb = k / 128;
    let a = codes(&[g, m_max, k], rng.e4m3(g * m_max * k));
    let sa = f32h(&[g, m_max, kb], &rng.scales(g * m_max * kb));
    let b = codes(&[g, n, k], rng.e4m3(g * n * k));
    let sb = f32h(&[g, 1, kb], &rng.scales(g * kb));
    let mm = HostTensor::from_index(DType::I32, &[g], &masked);
    let (a1, a2) = up2(&a);
    let (sa1, sa2) = up2(&sa);
    let (b1, b2) = up2(&b);
    let (sb1, sb2) = up2(&sb);
    let (mm1, mm2) = up2(&mm);
    let poison = poison_host(DType::F32, &[g, m_max, n]);
    let mut dr = CpuRef.upload(&poison).unwrap();
    ops::run(
        &CpuRef,
        Fp8GroupedMasked {
            a: &a2,
            sa: &sa2,
            b: &b2,
            sb: &sb2,
            masked_m: &mm2,
            d: &mut dr,
        },
    )
    .unwrap();
    let r = CpuRef.download(&dr).unwrap().to_f32_vec();
    let rows: Vec<usize> = (0..g)
        .flat_map(|grp| (0..masked[grp] as usize).map(move |i| grp * m_max + i))
        .collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    for simd in isas() {
        let mut d = Cpu.upload(&poison).unwrap();
        with_kern(simd, || {
            ops::run(
                &Cpu,
                Fp8GroupedMasked {
                    a: &a1,
                    sa: &sa1,
                    b: &b1,
                    sb: &sb1,
                    masked_m: &mm1,
                    d: &mut d,
                },
            )
        })
        .unwrap()
        .unwrap();
        let got = Cpu.download(&d).unwrap().to_f32_vec();
        assert_gemm_close(
            &format!("{simd:?} masked"),
            DType::F32,
            &pick(&got),
            &pick(&r),
        );
        // Rows at or past masked_m keep their bytes (NaN here).
        for grp in 0..g {
            for i in masked[grp] as usize..m_max {
                let row = &got[(grp * m_max + i) * n..][..n];
                assert!(row.iter().all(|v| v.is_nan()), "{simd:?} row {grp}/{i}");
            }
        }
    }
}

#[test]
fn gemm_matches_reference() {
    let mut rng = Rng(5);
    for &(m, n, k) in &[(1, 33, 200), (131, 70, 300)] {
        for dtype in [DType::F32, DType::BF16] {
            let a = HostTensor::from_f32(dtype, &[m, k], &rng.vec(m * k, 1.0));
            let b = HostTensor::from_f32(dtype, &[n, k], &rng.vec(n * k, 1.0));
            let (a1, a2) = up2(&a);
            let (b1, b2) = up2(&b);
            let mut dr = CpuRef.alloc(dtype, &[m, n]).unwrap();
            ops::run(
                &CpuRef,
                Gemm {
                    a: &a2,
                    b: &b2,
                    d: &mut dr,
                },
            )
            .unwrap();
            let r = CpuRef.download(&dr).unwrap().to_f32_vec();
            for simd in isas() {
                let mut d = Cpu.alloc(dtype, &[m, n]).unwrap();
                with_kern(simd, || {
                    ops::run(
                        &Cpu,
                        Gemm {
                            a: &a1,
                            b: &b1,
                            d: &mut d,
                        },
                    )
                })
                .unwrap()
                .unwrap();
                let got = Cpu.download(&d).unwrap().to_f32_vec();
                assert_gemm_close(&format!("{simd:?} gemm {m}x{n}x{k}"), dtype, &got, &r);
            }
        }
    }
}

/// `Gemm` on both backends: (cpu, cpu-ref) outputs.
fn gemm_both(
    a: (&Tensor, &Tensor),
    b: (&Tensor, &Tensor),
    m: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut d = Cpu.alloc(DType::F32, &[m, n]).unwrap();
    ops::run(
        &Cpu,
        Gemm {
            a: a.0,
            b: b.0,
            d: &mut d,
        },
    )
    .unwrap();
    let mut dr = CpuRef.alloc(DType::F32, &[m, n]).unwrap();
    ops::run(
        &CpuRef,
        Gemm {
            a: a.1,
            b: b.1,
            d: &mut dr,
        },
    )
    .unwrap();
    downloads(&d, &dr)
}

/// `cpu` keeps a weight's packed panels with the tensor between calls: a
/// write to the tensor — `Backend::write`, or an op's output — must give
/// the next call its new values, not the panels of the old ones.
#[test]
fn gemm_after_a_write_to_b_uses_the_new_values() {
    let mut rng = Rng(77);
    let (m, n, k, k2) = (40, 70, 130, 36);
    let a = f32h(&[m, k], &rng.vec(m * k, 1.0));
    let (a1, a2) = up2(&a);
    let (mut b1, mut b2) = up2(&f32h(&[n, k], &rng.vec(n * k, 1.0)));
    for _ in 0..2 {
        let (got, want) = gemm_both((&a1, &a2), (&b1, &b2), m, n);
        assert_gemm_close("gemm, B as uploaded (twice)", DType::F32, &got, &want);
    }
    let first = gemm_both((&a1, &a2), (&b1, &b2), m, n).0;
    // A write through the backend.
    let nb = f32h(&[n, k], &rng.vec(n * k, 1.0));
    Cpu.write(&mut b1, &nb).unwrap();
    CpuRef.write(&mut b2, &nb).unwrap();
    let (got, want) = gemm_both((&a1, &a2), (&b1, &b2), m, n);
    assert_gemm_close("gemm after Backend::write to B", DType::F32, &got, &want);
    assert!(got != first, "the new B gave the old output");
    // B as an op's output: B = x·yᵀ.
    let (x1, x2) = up2(&f32h(&[n, k2], &rng.vec(n * k2, 1.0)));
    let (y1, y2) = up2(&f32h(&[k, k2], &rng.vec(k * k2, 1.0)));
    ops::run(
        &Cpu,
        Gemm {
            a: &x1,
            b: &y1,
            d: &mut b1,
        },
    )
    .unwrap();
    ops::run(
        &CpuRef,
        Gemm {
            a: &x2,
            b: &y2,
            d: &mut b2,
        },
    )
    .unwrap();
    let (got, want) = gemm_both((&a1, &a2), (&b1, &b2), m, n);
    assert_gemm_close("gemm after an op wrote B", DType::F32, &got, &want);
}

/// One MLA decode case: returns (out, lse) of a backend.
struct Mla {
    b: usize,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    d: usize,
    dv: usize,
    bs: usize,
    seqlens: Vec<i64>,
    causal: bool,
}

impl Mla {
    fn inputs(&self, seed: u64) -> [HostTensor; 4] {
        let mut rng = Rng(seed);
        let Mla {
            b,
            s_q,
            h_q,
            h_kv,
            d,
            bs,
            ..
        } = *self;
        let max_blocks = self
            .seqlens
            .iter()
            .map(|&l| (l as usize).div_ceil(bs))
            .max()
            .unwrap()
            .max(1)
            + 1;
        let num_blocks = b * max_blocks + 3;
        let q = HostTensor::from_f32(
            DType::BF16,
            &[b, s_q, h_q, d],
            &rng.vec(b * s_q * h_q * d, 1.0),
        );
        // Unused slots and pages are NaN: a kernel that reads them fails.
        let mut kc = vec![f32::NAN; num_blocks * bs * h_kv * d];
        // A permutation of the pages.
        let mut perm: Vec<i64> = (0..num_blocks as i64).collect();
        for i in (1..perm.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let mut table = vec![i64::from(i32::MAX); b * max_blocks];
        let mut next = 0;
        for bi in 0..b {
            let len = self.seqlens[bi] as usize;
            for j in 0..len.div_ceil(bs) {
                let blk = perm[next] as usize;
                next += 1;
                table[bi * max_blocks + j] = blk as i64;
                for t in 0..bs.min(len - j * bs) {
                    let off = (blk * bs + t) * h_kv * d;
                    for (x, v) in kc[off..off + h_kv * d]
                        .iter_mut()
                        .zip(rng.vec(h_kv * d, 1.0))
                    {
                        *x = v;
                    }
                }
            }
        }
        [
            q,
            HostTensor::from_f32(DType::BF16, &[num_blocks, bs, h_kv, d], &kc),
            HostTensor::from_index(DType::I32, &[b, max_blocks], &table),
            HostTensor::from_index(DType::I32, &[b], &self.seqlens),
        ]
    }

    fn run(&self, be: &dyn Backend, inputs: &[HostTensor; 4]) -> (Vec<f32>, Vec<f32>) {
        let t = inputs.each_ref().map(|h| be.upload(h).unwrap());
        self.op(be, &t)
    }

    fn op(&self, be: &dyn Backend, t: &[Tensor; 4]) -> (Vec<f32>, Vec<f32>) {
        let [q, kc, bt, sl] = t;
        let mut out = be
            .alloc(DType::BF16, &[self.b, self.s_q, self.h_q, self.dv])
            .unwrap();
        let mut lse = be.alloc(DType::F32, &[self.b, self.h_q, self.s_q]).unwrap();
        ops::run(
            be,
            MlaDecode {
                q,
                kcache: kc,
                block_table: bt,
                cache_seqlens: sl,
                out: &mut out,
                lse: &mut lse,
                softmax_scale: (self.d as f32).powf(-0.5),
                causal: self.causal,
            },
        )
        .unwrap();
        (
            be.download(&out).unwrap().to_f32_vec(),
            be.download(&lse).unwrap().to_f32_vec(),
        )
    }
}

/// SPEC §4: inf/NaN positions equal, then `|a−r| < abs` or relative `< rel`.
fn assert_mla_close(what: &str, got: &[f32], want: &[f32], abs: f64, rel: f64) {
    for (i, (&a, &r)) in got.iter().zip(want).enumerate() {
        if !r.is_finite() || !a.is_finite() {
            assert!(
                a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()),
                "{what} {i}: {a} vs {r}"
            );
            continue;
        }
        let e = (a as f64 - r as f64).abs();
        assert!(
            e < abs || e / (r.abs() as f64 + 1e-6) < rel,
            "{what} {i}: {a} vs {r}"
        );
    }
}

#[test]
fn mla_decode_matches_reference() {
    let cases = [
        // Odd dims, an empty sequence, causal with s_q = 2, grouped heads.
        Mla {
            b: 3,
            s_q: 2,
            h_q: 6,
            h_kv: 2,
            d: 72,
            dv: 40,
            bs: 16,
            seqlens: vec![0, 37, 50],
            causal: true,
        },
        Mla {
            b: 3,
            s_q: 2,
            h_q: 6,
            h_kv: 2,
            d: 72,
            dv: 40,
            bs: 16,
            seqlens: vec![1, 37, 50],
            causal: false,
        },
        // One sequence: split over the pages; DeepSeek's 576/512.
        Mla {
            b: 1,
            s_q: 1,
            h_q: 16,
            h_kv: 1,
            d: 576,
            dv: 512,
            bs: 64,
            seqlens: vec![300],
            causal: false,
        },
    ];
    for (ci, case) in cases.iter().enumerate() {
        let inputs = case.inputs(100 + ci as u64);
        let (ro, rl) = case.run(&CpuRef, &inputs);
        for simd in isas() {
            let (o, l) = with_kern(simd, || case.run(&Cpu, &inputs)).unwrap();
            assert_mla_close(
                &format!("{simd:?} case {ci} out"),
                &o,
                &ro,
                8e-4,
                2.01 / 128.0,
            );
            assert_mla_close(
                &format!("{simd:?} case {ci} lse"),
                &l,
                &rl,
                1e-6,
                8.01 / 65536.0,
            );
        }
    }
}

#[test]
fn forced_portable_path_is_used_and_named() {
    // with_simd really switches the kernel: the portable path runs on every
    // machine, and the device info names the chosen instruction set.
    assert!(with_simd(Simd::Portable, deepport_cpu::fast::current_simd).unwrap() == Simd::Portable);
    let info = Cpu.info();
    assert!(info.driver.contains("micro-kernel"), "{}", info.driver);
    assert!(info.driver.contains("threads"), "{}", info.driver);
    // The AMX choice: on where usable (and named), else an error saying why.
    match deepport_cpu::fast::amx::unavailable_reason() {
        None => {
            assert!(with_amx_kernels(deepport_cpu::fast::current_amx).unwrap());
            assert!(!with_simd(Simd::Portable, deepport_cpu::fast::current_amx).unwrap());
            if deepport_cpu::fast::process_amx() {
                assert!(info.driver.contains("amx-bf16"), "{}", info.driver);
            }
        }
        Some(why) => {
            eprintln!("AMX part skipped: {why}");
            assert!(with_amx_kernels(|| ()).is_err());
            assert!(info.driver.contains("no amx"), "{}", info.driver);
        }
    }
}

#[test]
fn degenerate_fp8_shapes_match_reference_without_panics() {
    // k = 0 with more than 128 rows (the packed path), m = 0, n = 0.
    for &(m, n, k) in &[
        (130usize, 5usize, 0usize),
        (3, 5, 0),
        (0, 5, 128),
        (3, 0, 128),
    ] {
        let kb = k.div_ceil(128);
        let a = codes(&[m, k], vec![0x38; m * k]);
        let sa = f32h(&[m, kb], &vec![1.0; m * kb]);
        let b = codes(&[n, k], vec![0x40; n * k]);
        let sb = f32h(&[n.div_ceil(128), kb], &vec![1.0; n.div_ceil(128) * kb]);
        let mut results = Vec::new();
        for be in [&Cpu as &dyn Backend, &CpuRef] {
            let (a, sa, b, sb) = (
                be.upload(&a).unwrap(),
                be.upload(&sa).unwrap(),
                be.upload(&b).unwrap(),
                be.upload(&sb).unwrap(),
            );
            let mut d = be.alloc(DType::F32, &[m, n]).unwrap();
            let r = ops::run(
                be,
                Fp8Gemm {
                    a: &a,
                    sa: &sa,
                    b: &b,
                    sb: &sb,
                    d: &mut d,
                },
            );
            results.push(r.map(|_| raw(be, &d)).map_err(|e| e.to_string()));
        }
        assert_eq!(results[0], results[1], "({m}, {n}, {k})");
    }
}

/// Downloads a tensor's raw bytes.
fn raw(be: &dyn Backend, t: &Tensor) -> Vec<u8> {
    be.download(t).unwrap().bytes().to_vec()
}

#[test]
fn small_ops_match_reference() {
    // Index of silu_mul's output among the ops below.
    const SILU: usize = 2;
    let mut rng = Rng(77);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Element counts across the parallel chunk size (16384).
        let (rows, dim) = (7, 3001);
        let n = rows * dim;
        // Row 3 of x is zeros (silu_mul's zero-gate blocks), with an
        // infinity and a negative zero in y there.
        let mut xv = rng.vec(n, 4.0);
        xv[3 * dim..4 * dim].fill(0.0);
        let mut yv = rng.vec(n, 4.0);
        yv[3 * dim + 1500] = f32::INFINITY;
        yv[3 * dim + 1501] = -0.0;
        let x = HostTensor::from_f32(dtype, &[rows, dim], &xv);
        let y = HostTensor::from_f32(dtype, &[rows, dim], &yv);
        let w = HostTensor::from_f32(dtype, &[dim], &rng.vec(dim, 2.0));
        let ids: Vec<i64> = (0..9).map(|i| (i * 5 % rows) as i64).collect();
        let ids = HostTensor::from_index(DType::I64, &[9], &ids);
        let mut outs: Vec<Vec<Vec<u8>>> = Vec::new();
        for be in [&Cpu as &dyn Backend, &CpuRef] {
            let (x, y, w, ids) = (
                be.upload(&x).unwrap(),
                be.upload(&y).unwrap(),
                be.upload(&w).unwrap(),
                be.upload(&ids).unwrap(),
            );
            let mut v = Vec::new();
            let mut out = be.alloc(dtype, &[rows, dim]).unwrap();
            ops::run(
                be,
                Add {
                    a: &x,
                    b: &y,
                    out: &mut out,
                },
            )
            .unwrap();
            v.push(raw(be, &out));
            let mut out = be.alloc(DType::F32, &[rows, dim]).unwrap();
            ops::run(
                be,
                Add {
                    a: &x,
                    b: &y,
                    out: &mut out,
                },
            )
            .unwrap();
            v.push(raw(be, &out));
            let mut out = be.alloc(dtype, &[rows, dim]).unwrap();
            ops::run(
                be,
                SiluMul {
                    gate: &x,
                    up: &y,
                    out: &mut out,
                },
            )
            .unwrap();
            v.push(raw(be, &out));
            let mut out = be.alloc(dtype, &[rows, dim]).unwrap();
            ops::run(
                be,
                RmsNorm {
                    x: &x,
                    weight: &w,
                    y: &mut out,
                    eps: 1e-6,
                },
            )
            .unwrap();
            v.push(raw(be, &out));
            for odt in [dtype, DType::BF16] {
                let mut out = be.alloc(odt, &[9, dim]).unwrap();
                ops::run(
                    be,
                    Embedding {
                        table: &x,
                        ids: &ids,
                        out: &mut out,
                    },
                )
                .unwrap();
                v.push(raw(be, &out));
            }
            outs.push(v);
        }
        for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
            if i == SILU {
                continue;
            }
            assert!(a == b, "{dtype}: op #{i} differs from cpu-ref");
        }
        // silu_mul: cpu's exp is its own (vectorized), within a few f64
        // ulps of libm's: within 1 ulp of the output, the same bytes but
        // for values within those ulps of a rounding boundary.
        let val = |b: &[u8]| {
            HostTensor::from_bytes(dtype, &[b.len() / dtype.size()], b.to_vec())
                .unwrap()
                .to_f32_vec()
        };
        let (got, want) = (val(&outs[0][SILU]), val(&outs[1][SILU]));
        let mut same = 0;
        for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
            assert!(
                (x as f64 - y as f64).abs() <= ulp_of(dtype, y)
                    || x.to_bits() == y.to_bits()
                    || (x.is_nan() && y.is_nan()),
                "{dtype}: silu_mul element {i}: {x}, cpu-ref {y}"
            );
            same += usize::from(x.to_bits() == y.to_bits());
        }
        assert!(
            same * 1000 >= got.len() * 999,
            "{dtype}: silu_mul: only {same} of {} values equal cpu-ref's",
            got.len()
        );
    }
    // An id outside the table is an error.
    let table = Cpu
        .upload(&HostTensor::from_f32(DType::F32, &[4, 3], &[0.0; 12]))
        .unwrap();
    let ids = Cpu
        .upload(&HostTensor::from_index(DType::I64, &[1], &[4]))
        .unwrap();
    let mut out = Cpu.alloc(DType::F32, &[1, 3]).unwrap();
    assert!(ops::run(
        &Cpu,
        Embedding {
            table: &table,
            ids: &ids,
            out: &mut out,
        },
    )
    .is_err());
}

/// `cpu`'s own act_quant (rows in parallel chunks, straight from the
/// bytes) gives cpu-ref's `q` and `s` bytes for every input dtype, FP8
/// format and scale format, over several chunks, and reports the first
/// non-finite input where cpu-ref does.
#[test]
fn act_quant_equals_reference_bit_for_bit() {
    let mut rng = Rng(91);
    // 200 rows of 384: 42 rows a chunk, the last one partial.
    let (m, k) = (200, 384);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut v = rng.vec(m * k, 3.0);
        // Tiny groups (the 1e-4 floor), large values, exact zeros.
        v[..128].iter_mut().for_each(|x| *x *= 1e-7);
        v[128 * 5..128 * 6].iter_mut().for_each(|x| *x *= 2e4);
        v[128 * 9..128 * 10].iter_mut().for_each(|x| *x = 0.0);
        let x = HostTensor::from_f32(dtype, &[m, k], &v);
        for q_dt in [DType::F8E4M3, DType::F8E4M3Fnuz] {
            for fmt in [ScaleFmt::Float, ScaleFmt::Ue8m0] {
                let mut got = Vec::new();
                for be in [&Cpu as &dyn Backend, &CpuRef] {
                    let xt = be.upload(&x).unwrap();
                    let mut q = be.alloc(q_dt, &[m, k]).unwrap();
                    let mut s = be.alloc(DType::F32, &[m, k / 128]).unwrap();
                    ops::run(
                        be,
                        ActQuant {
                            x: &xt,
                            q: &mut q,
                            s: &mut s,
                            scale_fmt: fmt,
                        },
                    )
                    .unwrap();
                    got.push((raw(be, &q), raw(be, &s)));
                }
                assert!(
                    got[0] == got[1],
                    "{dtype} {q_dt} {fmt:?}: differs from cpu-ref"
                );
            }
        }
    }
    // The first non-finite input, in a later chunk, named as cpu-ref names it.
    let mut v = rng.vec(m * k, 1.0);
    v[150 * k + 7] = f32::INFINITY;
    v[170 * k + 1] = f32::NAN;
    let x = HostTensor::from_f32(DType::F32, &[m, k], &v);
    let errs: Vec<String> = [&Cpu as &dyn Backend, &CpuRef]
        .into_iter()
        .map(|be| {
            let xt = be.upload(&x).unwrap();
            let mut q = be.alloc(DType::F8E4M3, &[m, k]).unwrap();
            let mut s = be.alloc(DType::F32, &[m, k / 128]).unwrap();
            let r = ops::run(
                be,
                ActQuant {
                    x: &xt,
                    q: &mut q,
                    s: &mut s,
                    scale_fmt: ScaleFmt::Float,
                },
            );
            let e = r.and_then(|_| be.synchronize()).unwrap_err();
            e.to_string()
        })
        .collect();
    assert!(errs[0].contains("150, 7"), "{}", errs[0]);
    assert_eq!(errs[0], errs[1]);
}

/// CPU seconds this process has used (user + system; Linux), or 0.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th; clock ticks of 1/100 s.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() > 13 {
        (f[11] + f[12]) / 100.0
    } else {
        0.0
    }
}

/// Best wall time of `reps` runs of `f` (after one warm-up run when
/// `reps > 1`), and the mean CPU seconds per run (all threads): on a
/// shared machine the second says what the kernel costs.
fn best_of(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    if reps > 1 {
        f();
    }
    let c0 = cpu_seconds();
    let best = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (best, (cpu_seconds() - c0) / reps as f64)
}

/// Fast `cpu` against `cpu-ref` on DeepGEMM's and FlashMLA's benchmark
/// shapes. Run it in release:
/// `cargo test --release -p deepport-cpu --test fast -- --ignored --nocapture`
/// (`DEEPPORT_BENCH_REF_LARGE=1` also times cpu-ref on m = 4096: minutes).
#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn bench_fast_vs_reference() {
    // Streaming read bandwidth of this machine (sum of 512 MiB of f32 on
    // every core).
    let big = vec![1f32; 128 << 20];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (t, _) = best_of(3, || {
        let s: f32 = std::thread::scope(|sc| {
            let hs: Vec<_> = big
                .chunks(big.len().div_ceil(threads))
                .map(|c| {
                    sc.spawn(move || {
                        c.chunks(1 << 12)
                            .map(|x| x.iter().sum::<f32>())
                            .sum::<f32>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert!(s > 0.0);
    });
    let bw = (big.len() * 4) as f64 / t / 1e9;
    drop(big);
    println!(
        "streaming read bandwidth: {bw:.1} GB/s; simd {:?}",
        deepport_cpu::fast::current_simd()
    );
    let only_fast = std::env::var_os("DEEPPORT_BENCH_FAST_ONLY").is_some();
    let large_ref = std::env::var_os("DEEPPORT_BENCH_REF_LARGE").is_some();
    let mut rng = Rng(99);
    // DEEPPORT_BENCH_M=16,128 times only those GEMMs (and no MLA decode).
    let only_m: Option<Vec<usize>> = std::env::var("DEEPPORT_BENCH_M")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    for &(m, n, k) in &[(16, 2112, 7168), (128, 2112, 7168), (4096, 2112, 7168)] {
        if only_m.as_ref().is_some_and(|v| !v.contains(&m)) {
            continue;
        }
        let a = codes(&[m, k], rng.e4m3(m * k));
        let sa = f32h(&[m, k / 128], &rng.scales(m * k / 128));
        let b = codes(&[n, k], rng.e4m3(n * k));
        let sb = f32h(
            &[n.div_ceil(128), k / 128],
            &rng.scales(n.div_ceil(128) * k / 128),
        );
        let flops = 2.0 * (m * n * k) as f64;
        let backends: Vec<(&str, Box<dyn Backend>)> =
            vec![("cpu", Box::new(Cpu)), ("cpu-ref", Box::new(CpuRef))];
        for (name, be) in &backends {
            if *name == "cpu-ref" && only_fast {
                continue;
            }
            if *name == "cpu-ref" && m > 128 && !large_ref {
                println!("fp8_gemm {m}x{n}x{k} {name}: skipped (set DEEPPORT_BENCH_REF_LARGE=1)");
                continue;
            }
            let (a, sa, b, sb) = (
                be.upload(&a).unwrap(),
                be.upload(&sa).unwrap(),
                be.upload(&b).unwrap(),
                be.upload(&sb).unwrap(),
            );
            let mut d = be.alloc(DType::BF16, &[m, n]).unwrap();
            let reps = if *name == "cpu" {
                std::env::var("DEEPPORT_BENCH_REPS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(5)
            } else {
                1
            };
            let (t, cpu) = best_of(reps, || {
                ops::run(
                    be.as_ref(),
                    Fp8Gemm {
                        a: &a,
                        sa: &sa,
                        b: &b,
                        sb: &sb,
                        d: &mut d,
                    },
                )
                .unwrap()
            });
            println!(
                "fp8_gemm {m}x{n}x{k} {name}: {:.2} ms, {:.3} TFLOP/s; {:.1} GFLOP per CPU-second",
                t * 1e3,
                flops / t / 1e12,
                flops / cpu / 1e9
            );
        }
    }
    if only_m.is_some() {
        return;
    }
    // FlashMLA decode: b = 16, s_q = 1, h_q = 128, s_k = 4096.
    let case = Mla {
        b: 16,
        s_q: 1,
        h_q: 128,
        h_kv: 1,
        d: 576,
        dv: 512,
        bs: 64,
        seqlens: vec![4096; 16],
        causal: false,
    };
    let inputs = case.inputs(5);
    let bytes = (16 * 4096 * 576 * 2) as f64;
    let flops = 16.0 * 4096.0 * 128.0 * 2.0 * (576.0 + 512.0);
    for (name, be) in [("cpu", &Cpu as &dyn Backend), ("cpu-ref", &CpuRef)] {
        if name == "cpu-ref" && only_fast {
            continue;
        }
        let reps = if name == "cpu" { 5 } else { 1 };
        let tensors = inputs.each_ref().map(|h| be.upload(h).unwrap());
        let (t, cpu) = best_of(reps, || {
            case.op(be, &tensors);
        });
        println!(
            "mla_decode b16 h_q128 s_k4096 {name}: {:.2} ms, {:.2} GB/s of cache ({:.0}% of streaming), {:.3} TFLOP/s; {:.1} GFLOP per CPU-second",
            t * 1e3,
            bytes / t / 1e9,
            100.0 * bytes / t / 1e9 / bw,
            flops / t / 1e12,
            flops / cpu / 1e9
        );
    }
}

/// One unit in the last place of `x` in `dtype` (f32/bf16/f16; normals,
/// and the subnormal step below them).
fn ulp_of(dtype: DType, x: f32) -> f64 {
    let (mant, emin) = match dtype {
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        _ => (23, -126),
    };
    let e = if x == 0.0 {
        emin
    } else {
        ((x.abs() as f64).log2().floor() as i32).max(emin)
    };
    2f64.powi(e - mant)
}

/// The catalogue's bound for gemm_grouped (conformance/cases/
/// gemm_grouped.yaml): `|d − r| ≤ 1 ulp_out(r) + rms_rel·rms(r)`,
/// `rms_rel` 1e-5 for bf16 operands, 3e-5 for f32.
fn assert_grouped_close(what: &str, ab: DType, out: DType, d: &[f32], r: &[f32]) {
    assert_eq!(d.len(), r.len());
    let rr = rms(r);
    assert!(rr > 0.0, "{what}: reference is all zero");
    let rel = if ab == DType::BF16 { 1e-5 } else { 3e-5 };
    for (i, (&x, &y)) in d.iter().zip(r).enumerate() {
        let err = (x as f64 - y as f64).abs();
        let tol = ulp_of(out, y) + rel * rr;
        assert!(err <= tol, "{what}: element {i}: {x} vs reference {y}");
    }
}

/// Operand/output dtype pairs the grouped plain GEMMs take.
const GROUPED_DTYPES: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F32, DType::F16),
];

#[test]
fn gemm_grouped_contiguous_matches_reference() {
    let mut rng = Rng(77);
    let (g, n, k) = (4, 67, 203);
    // Group 1: 3 rows; padding: 5; group 3: 140 rows (more than one
    // 128-row block: packed once); group 0: 17 (> NARROW); then single
    // rows of groups 2, 0, 2, 1 interleaved with padding.
    let mut idx = vec![1i64; 3];
    idx.extend(std::iter::repeat_n(-1, 5));
    idx.extend(std::iter::repeat_n(3, 140));
    idx.extend(std::iter::repeat_n(0, 17));
    idx.extend([-1, 2, 0, 2, -1, 1]);
    let m = idx.len();
    let mi = HostTensor::from_index(DType::I32, &[m], &idx);
    let (mi1, mi2) = up2(&mi);
    for (ab, out) in GROUPED_DTYPES {
        let a = HostTensor::from_f32(ab, &[m, k], &rng.vec(m * k, 1.0));
        let b = HostTensor::from_f32(ab, &[g, n, k], &rng.vec(g * n * k, 0.1));
        let (a1, a2) = up2(&a);
        let (b1, b2) = up2(&b);
        let poison = poison_host(out, &[m, n]);
        let mut dr = CpuRef.upload(&poison).unwrap();
        ops::run(
            &CpuRef,
            GemmGroupedContiguous {
                a: &a2,
                b: &b2,
                m_indices: &mi2,
                d: &mut dr,
            },
        )
        .unwrap();
        let r = CpuRef.download(&dr).unwrap().to_f32_vec();
        for simd in isas() {
            let mut d = Cpu.upload(&poison).unwrap();
            with_kern(simd, || {
                ops::run(
                    &Cpu,
                    GemmGroupedContiguous {
                        a: &a1,
                        b: &b1,
                        m_indices: &mi1,
                        d: &mut d,
                    },
                )
            })
            .unwrap()
            .unwrap();
            let got = Cpu.download(&d).unwrap().to_f32_vec();
            // -1 rows are written 0, like cpu-ref: compare every row.
            assert_grouped_close(
                &format!("{simd:?} {ab}->{out} contiguous"),
                ab,
                out,
                &got,
                &r,
            );
            for (i, &gi) in idx.iter().enumerate() {
                if gi < 0 {
                    assert!(got[i * n..(i + 1) * n].iter().all(|&v| v == 0.0));
                }
            }
        }
    }
    // A group index out of range (either side) is an error, not a panic.
    let a = Cpu
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[m, k],
            &vec![1.0; m * k],
        ))
        .unwrap();
    let b = Cpu
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[g, n, k],
            &vec![1.0; g * n * k],
        ))
        .unwrap();
    for badv in [g as i64, -2] {
        let mut bad = idx.clone();
        bad[m - 1] = badv;
        let bad = Cpu
            .upload(&HostTensor::from_index(DType::I64, &[m], &bad))
            .unwrap();
        let mut d = Cpu.alloc(DType::F32, &[m, n]).unwrap();
        let err = ops::run(
            &Cpu,
            GemmGroupedContiguous {
                a: &a,
                b: &b,
                m_indices: &bad,
                d: &mut d,
            },
        );
        assert!(err.is_err(), "m_indices value {badv} accepted");
    }
}

#[test]
fn gemm_grouped_masked_matches_reference_and_leaves_masked_rows() {
    let mut rng = Rng(91);
    let (g, m_max, n, k) = (4, 133, 45, 131);
    let masked = [0i64, 1, 133, 20];
    let mm = HostTensor::from_index(DType::I32, &[g], &masked);
    let (mm1, mm2) = up2(&mm);
    let rows: Vec<usize> = (0..g)
        .flat_map(|grp| (0..masked[grp] as usize).map(move |i| grp * m_max + i))
        .collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    for (ab, out) in GROUPED_DTYPES {
        let a = HostTensor::from_f32(ab, &[g, m_max, k], &rng.vec(g * m_max * k, 1.0));
        let b = HostTensor::from_f32(ab, &[g, n, k], &rng.vec(g * n * k, 0.1));
        let (a1, a2) = up2(&a);
        let (b1, b2) = up2(&b);
        let poison = poison_host(out, &[g, m_max, n]);
        let mut dr = CpuRef.upload(&poison).unwrap();
        ops::run(
            &CpuRef,
            GemmGroupedMasked {
                a: &a2,
                b: &b2,
                masked_m: &mm2,
                d: &mut dr,
            },
        )
        .unwrap();
        let r = CpuRef.download(&dr).unwrap().to_f32_vec();
        for simd in isas() {
            let mut d = Cpu.upload(&poison).unwrap();
            with_kern(simd, || {
                ops::run(
                    &Cpu,
                    GemmGroupedMasked {
                        a: &a1,
                        b: &b1,
                        masked_m: &mm1,
                        d: &mut d,
                    },
                )
            })
            .unwrap()
            .unwrap();
            let got = Cpu.download(&d).unwrap().to_f32_vec();
            assert_grouped_close(
                &format!("{simd:?} {ab}->{out} masked"),
                ab,
                out,
                &pick(&got),
                &pick(&r),
            );
            // Rows at or past masked_m keep their bytes (NaN here).
            for grp in 0..g {
                for i in masked[grp] as usize..m_max {
                    let row = &got[(grp * m_max + i) * n..][..n];
                    assert!(row.iter().all(|v| v.is_nan()), "{simd:?} row {grp}/{i}");
                }
            }
        }
    }
    // masked_m past m_max (or negative) is an error, not a panic.
    let a = Cpu
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[g, m_max, k],
            &vec![1.0; g * m_max * k],
        ))
        .unwrap();
    let b = Cpu
        .upload(&HostTensor::from_f32(
            DType::F32,
            &[g, n, k],
            &vec![1.0; g * n * k],
        ))
        .unwrap();
    for badv in [m_max as i64 + 1, -1] {
        let mut bad = masked;
        bad[1] = badv;
        let bad = Cpu
            .upload(&HostTensor::from_index(DType::I32, &[g], &bad))
            .unwrap();
        let mut d = Cpu.alloc(DType::F32, &[g, m_max, n]).unwrap();
        let err = ops::run(
            &Cpu,
            GemmGroupedMasked {
                a: &a,
                b: &b,
                masked_m: &bad,
                d: &mut d,
            },
        );
        assert!(err.is_err(), "masked_m value {badv} accepted");
    }
}

/// Runs `mla_prefill` on `be`; returns `out` as f32.
#[allow(clippy::too_many_arguments)]
/// The shapes of `mla_prefill`'s inputs `(q_nope, q_pe, latent, k_pe,
/// wkv_b)` for dims `(T, S, H, dn, dr, dc, dv)`.
fn prefill_shapes(dims: (usize, usize, usize, usize, usize, usize, usize)) -> [Vec<usize>; 5] {
    let (t, s, h, dn, dr, dc, dv) = dims;
    [
        vec![t, h, dn],
        vec![t, h, dr],
        vec![s, dc],
        vec![s, dr],
        vec![h * (dn + dv), dc],
    ]
}

/// Random inputs of those shapes: amplitude 1, the weight 0.1.
fn prefill_vals(
    rng: &mut Rng,
    dims: (usize, usize, usize, usize, usize, usize, usize),
) -> [Vec<f32>; 5] {
    let shapes = prefill_shapes(dims);
    std::array::from_fn(|i| rng.vec(shapes[i].iter().product(), if i == 4 { 0.1 } else { 1.0 }))
}

fn run_prefill(
    be: &dyn Backend,
    dtype: DType,
    dims: (usize, usize, usize, usize, usize, usize, usize),
    vals: &[Vec<f32>; 5],
    scale: f32,
    form: MlaForm,
) -> Vec<f32> {
    let (t, h, dv) = (dims.0, dims.2, dims.6);
    let shapes = prefill_shapes(dims);
    let up: Vec<Tensor> = shapes
        .iter()
        .zip(vals)
        .map(|(sh, v)| be.upload(&HostTensor::from_f32(dtype, sh, v)).unwrap())
        .collect();
    let mut out = be.alloc(dtype, &[t, h, dv]).unwrap();
    ops::run(
        be,
        MlaPrefill {
            q_nope: &up[0],
            q_pe: &up[1],
            latent: &up[2],
            k_pe: &up[3],
            wkv_b: &up[4],
            out: &mut out,
            softmax_scale: scale,
            form,
        },
    )
    .unwrap();
    be.download(&out).unwrap().to_f32_vec()
}

/// The catalogue's bound for mla_prefill (conformance/cases/
/// mla_prefill.yaml): `|o − r| ≤ 1 ulp_out(r) + 1e-5·rms(r)`.
#[test]
fn mla_prefill_matches_reference() {
    let mut rng = Rng(404);
    let cases = [
        // Odd dims, S > T (a cached prefix), T = S.
        (7, 12, 3, 33, 17, 65, 23),
        (5, 5, 2, 16, 8, 32, 16),
        // V3's head dims.
        (9, 16, 2, 128, 64, 512, 128),
    ];
    for &dims in &cases {
        let (dn, dr) = (dims.3, dims.4);
        let vals = prefill_vals(&mut rng, dims);
        let scale = 1.0 / ((dn + dr) as f32).sqrt();
        for dtype in [DType::F32, DType::BF16] {
            for form in [MlaForm::Naive, MlaForm::Absorbed] {
                let r = run_prefill(&CpuRef, dtype, dims, &vals, scale, form);
                let rr = rms(&r);
                assert!(rr > 0.0);
                // Every instruction set within the bound. The naive form's
                // loops are compiled per set without fused multiply-adds:
                // every set gives its bits. The absorbed form runs on each
                // set's register tile (FMA where the set has it).
                let portable = with_simd(Simd::Portable, || {
                    run_prefill(&Cpu, dtype, dims, &vals, scale, form)
                })
                .unwrap();
                for set in [Simd::Portable, Simd::Avx512, Simd::Avx2] {
                    if !set.available() {
                        continue;
                    }
                    let got = with_simd(set, || run_prefill(&Cpu, dtype, dims, &vals, scale, form))
                        .unwrap();
                    if form == MlaForm::Naive {
                        let same = got
                            .iter()
                            .zip(&portable)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{dims:?} {dtype} {form:?}: {set:?} differs from portable"
                        );
                    }
                    for (i, (&x, &y)) in got.iter().zip(&r).enumerate() {
                        let err = (x as f64 - y as f64).abs();
                        let tol = ulp_of(dtype, y) + 1e-5 * rr;
                        assert!(
                            err <= tol,
                            "{dims:?} {dtype} {form:?} {set:?}: element {i}: {x} vs reference {y}"
                        );
                    }
                }
                // A wrong scale is visible at this bound.
                let off = run_prefill(&Cpu, dtype, dims, &vals, scale * 1.01, form);
                assert!(off
                    .iter()
                    .zip(&r)
                    .any(|(&x, &y)| (x as f64 - y as f64).abs() > ulp_of(dtype, y) + 1e-5 * rr));
            }
        }
    }
}

/// `cpu` keeps `W_UV` transposed with the `wkv_b` tensor between
/// `mla_prefill` calls: a write to `wkv_b` must reach the next call.
#[test]
fn mla_prefill_after_a_write_to_wkv_b_uses_the_new_weight() {
    let mut rng = Rng(405);
    let dims @ (t, _, h, dn, dr, dc, dv) = (9, 12, 2, 16, 8, 64, 16);
    let shapes = prefill_shapes(dims);
    let vals = prefill_vals(&mut rng, dims);
    let up: Vec<Tensor> = shapes
        .iter()
        .zip(&vals)
        .map(|(sh, v)| Cpu.upload(&f32h(sh, v)).unwrap())
        .collect();
    let mut w = Cpu.upload(&f32h(&shapes[4], &vals[4])).unwrap();
    let scale = 1.0 / ((dn + dr) as f32).sqrt();
    let prefill = |w: &Tensor| {
        let mut out = Cpu.alloc(DType::F32, &[t, h, dv]).unwrap();
        ops::run(
            &Cpu,
            MlaPrefill {
                q_nope: &up[0],
                q_pe: &up[1],
                latent: &up[2],
                k_pe: &up[3],
                wkv_b: w,
                out: &mut out,
                softmax_scale: scale,
                form: MlaForm::Absorbed,
            },
        )
        .unwrap();
        Cpu.download(&out).unwrap().to_f32_vec()
    };
    let first = prefill(&w);
    assert_eq!(first, prefill(&w), "the same call gave another output");
    let w2 = rng.vec(h * (dn + dv) * dc, 0.1);
    Cpu.write(&mut w, &f32h(&shapes[4], &w2)).unwrap();
    let got = prefill(&w);
    let mut vals2 = vals.clone();
    vals2[4] = w2;
    let want = run_prefill(&CpuRef, DType::F32, dims, &vals2, scale, MlaForm::Absorbed);
    let rr = rms(&want);
    for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
        let tol = ulp_of(DType::F32, y) + 1e-5 * rr;
        assert!(
            (x as f64 - y as f64).abs() <= tol,
            "element {i}: {x} vs reference {y} after the write"
        );
    }
}
