//! The AMX-BF16 kernels of `cpu` against `cpu-ref` on shapes that stress
//! them: ragged m/n/k tails, both sides of the 128-row switch between the
//! `Dᵀ = B·Aᵀ` path and the packed-B path, grouped layouts with padding
//! rows and empty groups, bf16 plain GEMMs, and MLA decode with 128 query
//! heads. Where AMX is not usable every test prints that it skipped and why.

use deepport_core::backend::{poison_host, Backend, Tensor};
use deepport_core::formats::ulp_bf16;
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor};
use deepport_cpu::fast::{amx, with_amx_kernels};
use deepport_cpu::{Cpu, CpuRef};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| amp * self.sym()).collect()
    }
    /// e4m3 codes, never NaN.
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
    fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 0.01 * (1.5 + self.sym())).collect()
    }
}

/// Whether AMX is usable; prints the skip otherwise.
fn amx_here(test: &str) -> bool {
    match amx::unavailable_reason() {
        None => true,
        Some(why) => {
            eprintln!("{test}: skipped, AMX not usable here ({why})");
            false
        }
    }
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// SPEC §3 bounds (bf16: 2 ulp + 1e-3·rms; f32: 1e-5 relative + 1e-5·rms).
fn assert_close(what: &str, dtype: DType, d: &[f32], r: &[f32]) {
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

fn up(be: &dyn Backend, h: &HostTensor) -> Tensor {
    be.upload(h).unwrap()
}

fn f32h(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(DType::F32, shape, v)
}

/// The FP8 GEMM on `be` (AMX forced for `Cpu`).
#[allow(clippy::too_many_arguments)]
fn fp8_gemm(
    be: &dyn Backend,
    amx: bool,
    a: &HostTensor,
    sa: &HostTensor,
    b: &HostTensor,
    sb: &HostTensor,
    dtype: DType,
    m: usize,
    n: usize,
) -> Vec<f32> {
    let (a, sa, b, sb) = (up(be, a), up(be, sa), up(be, b), up(be, sb));
    let mut d = be.alloc(dtype, &[m, n]).unwrap();
    let mut go = || {
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
    };
    if amx {
        with_amx_kernels(go).unwrap().unwrap();
    } else {
        go().unwrap();
    }
    be.download(&d).unwrap().to_f32_vec()
}

/// Random FP8 GEMM operands `(a, sa, b, sb)` for `m × n × k`.
fn fp8_operands(rng: &mut Rng, m: usize, n: usize, k: usize) -> [HostTensor; 4] {
    let kb = k.div_ceil(128);
    [
        HostTensor::from_bytes(DType::F8E4M3, &[m, k], rng.e4m3(m * k)).unwrap(),
        f32h(&[m, kb], &rng.scales(m * kb)),
        HostTensor::from_bytes(DType::F8E4M3, &[n, k], rng.e4m3(n * k)).unwrap(),
        f32h(&[n.div_ceil(128), kb], &rng.scales(n.div_ceil(128) * kb)),
    ]
}

#[test]
fn fp8_gemm_ragged_shapes_match_reference() {
    if !amx_here("fp8_gemm_ragged_shapes_match_reference") {
        return;
    }
    let mut rng = Rng(91);
    // Tails in every dimension; 128/129 rows sit on both sides of the
    // switch between the two AMX paths; k = 7·128 + 5 has a 5-wide block.
    let shapes = [
        (1, 33, 100),
        (16, 2112 / 8, 7 * 128),
        (31, 257, 520),
        (128, 130, 256),
        (129, 130, 256),
        (200, 64, 7 * 128 + 5),
        (300, 161, 384),
        // 34 K blocks: two passes over K on the large path (the
        // accumulator carried between them).
        (160, 130, 33 * 128 + 7),
    ];
    for &(m, n, k) in &shapes {
        let [a, sa, b, sb] = fp8_operands(&mut rng, m, n, k);
        for dtype in [DType::BF16, DType::F32] {
            let r = fp8_gemm(&CpuRef, false, &a, &sa, &b, &sb, dtype, m, n);
            let got = fp8_gemm(&Cpu, true, &a, &sa, &b, &sb, dtype, m, n);
            assert_close(&format!("amx {m}x{n}x{k} {dtype}"), dtype, &got, &r);
        }
    }
}

/// The AMX path keeps its decoded operand buffers between calls on a
/// thread: a call after one whose operands were all NaN codes must not see
/// any of them (padding rows, padding columns and the K tail are rewritten).
#[test]
fn reused_operand_buffers_carry_nothing_between_calls() {
    if !amx_here("reused_operand_buffers_carry_nothing_between_calls") {
        return;
    }
    let mut rng = Rng(17);
    let nan = |rows: usize, cols: usize| {
        HostTensor::from_bytes(DType::F8E4M3, &[rows, cols], vec![0x7f; rows * cols]).unwrap()
    };
    // Larger than every later call in every dimension, both AMX paths.
    for (m, n, k) in [(64, 200, 512), (300, 200, 512)] {
        let [_, sa, _, sb] = fp8_operands(&mut rng, m, n, k);
        let poisoned = fp8_gemm(
            &Cpu,
            true,
            &nan(m, k),
            &sa,
            &nan(n, k),
            &sb,
            DType::F32,
            m,
            n,
        );
        assert!(poisoned.iter().all(|v| v.is_nan()), "the poisoning call");
        for (m, n, k) in [(20, 33, 130), (129, 70, 260)] {
            let [a, sa, b, sb] = fp8_operands(&mut rng, m, n, k);
            let r = fp8_gemm(&CpuRef, false, &a, &sa, &b, &sb, DType::F32, m, n);
            let got = fp8_gemm(&Cpu, true, &a, &sa, &b, &sb, DType::F32, m, n);
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{m}x{n}x{k}: a stale NaN"
            );
            assert_close(&format!("after NaNs {m}x{n}x{k}"), DType::F32, &got, &r);
        }
    }
}

#[test]
fn fp8_grouped_layouts_match_reference() {
    if !amx_here("fp8_grouped_layouts_match_reference") {
        return;
    }
    let mut rng = Rng(93);
    let (g, n, k) = (4usize, 150usize, 300usize);
    let kb = k.div_ceil(128);
    // Contiguous: a small group, padding, an empty group, a group of 200
    // rows (packed B), padding at the end, a 1-row group.
    let mut idx = vec![1i64; 7];
    idx.extend(std::iter::repeat_n(-1, 40));
    idx.extend(std::iter::repeat_n(3, 200));
    idx.extend(std::iter::repeat_n(-1, 3));
    idx.push(0);
    let m = idx.len();
    let a = HostTensor::from_bytes(DType::F8E4M3, &[m, k], rng.e4m3(m * k)).unwrap();
    let sa = f32h(&[m, kb], &rng.scales(m * kb));
    let b = HostTensor::from_bytes(DType::F8E4M3, &[g, n, k], rng.e4m3(g * n * k)).unwrap();
    let nb = n.div_ceil(128);
    let sb = f32h(&[g, nb, kb], &rng.scales(g * nb * kb));
    let mi = HostTensor::from_index(DType::I32, &[m], &idx);
    let run = |be: &dyn Backend, amx: bool| {
        let (a, sa, b, sb, mi) = (
            up(be, &a),
            up(be, &sa),
            up(be, &b),
            up(be, &sb),
            up(be, &mi),
        );
        let mut d = be.alloc(DType::BF16, &[m, n]).unwrap();
        let mut go = || {
            ops::run(
                be,
                Fp8GroupedContiguous {
                    a: &a,
                    sa: &sa,
                    b: &b,
                    sb: &sb,
                    m_indices: &mi,
                    d: &mut d,
                },
            )
        };
        if amx {
            with_amx_kernels(go).unwrap().unwrap();
        } else {
            go().unwrap();
        }
        be.download(&d).unwrap().to_f32_vec()
    };
    let r = run(&CpuRef, false);
    let got = run(&Cpu, true);
    let keep: Vec<usize> = (0..m).filter(|&i| idx[i] >= 0).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        keep.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    assert_close("amx contiguous", DType::BF16, &pick(&got), &pick(&r));

    // Masked: empty, ragged, full (> 128 rows: packed B), one row.
    let m_max = 150;
    let masked = [0i64, 37, 150, 1];
    let a = HostTensor::from_bytes(DType::F8E4M3, &[g, m_max, k], rng.e4m3(g * m_max * k)).unwrap();
    let sa = f32h(&[g, m_max, kb], &rng.scales(g * m_max * kb));
    let mm = HostTensor::from_index(DType::I32, &[g], &masked);
    let poison = poison_host(DType::F32, &[g, m_max, n]);
    let run = |be: &dyn Backend, amx: bool| {
        let (a, sa, b, sb, mm) = (
            up(be, &a),
            up(be, &sa),
            up(be, &b),
            up(be, &sb),
            up(be, &mm),
        );
        let mut d = be.upload(&poison).unwrap();
        let mut go = || {
            ops::run(
                be,
                Fp8GroupedMasked {
                    a: &a,
                    sa: &sa,
                    b: &b,
                    sb: &sb,
                    masked_m: &mm,
                    d: &mut d,
                },
            )
        };
        if amx {
            with_amx_kernels(go).unwrap().unwrap();
        } else {
            go().unwrap();
        }
        be.download(&d).unwrap().to_f32_vec()
    };
    let r = run(&CpuRef, false);
    let got = run(&Cpu, true);
    let rows: Vec<usize> = (0..g)
        .flat_map(|grp| (0..masked[grp] as usize).map(move |i| grp * m_max + i))
        .collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    assert_close("amx masked", DType::F32, &pick(&got), &pick(&r));
    for grp in 0..g {
        for i in masked[grp] as usize..m_max {
            let row = &got[(grp * m_max + i) * n..][..n];
            assert!(
                row.iter().all(|v| v.is_nan()),
                "masked row {grp}/{i} written"
            );
        }
    }
}

#[test]
fn bf16_gemms_match_reference() {
    if !amx_here("bf16_gemms_match_reference") {
        return;
    }
    let mut rng = Rng(95);
    for &(m, n, k) in &[(1, 33, 200), (131, 70, 300), (40, 129, 130)] {
        let a = HostTensor::from_f32(DType::BF16, &[m, k], &rng.vec(m * k, 1.0));
        let b = HostTensor::from_f32(DType::BF16, &[n, k], &rng.vec(n * k, 1.0));
        for dtype in [DType::F32, DType::BF16] {
            let run = |be: &dyn Backend, amx: bool| {
                let (a, b) = (up(be, &a), up(be, &b));
                let mut d = be.alloc(dtype, &[m, n]).unwrap();
                let mut go = || {
                    ops::run(
                        be,
                        Gemm {
                            a: &a,
                            b: &b,
                            d: &mut d,
                        },
                    )
                };
                if amx {
                    with_amx_kernels(go).unwrap().unwrap();
                } else {
                    go().unwrap();
                }
                be.download(&d).unwrap().to_f32_vec()
            };
            let r = run(&CpuRef, false);
            let got = run(&Cpu, true);
            assert_close(&format!("amx gemm {m}x{n}x{k} {dtype}"), dtype, &got, &r);
        }
    }
    // Grouped, contiguous with padding rows.
    let (g, n, k) = (3usize, 70usize, 200usize);
    let mut idx = vec![2i64; 5];
    idx.extend(std::iter::repeat_n(-1, 9));
    idx.extend(std::iter::repeat_n(0, 140));
    let m = idx.len();
    let a = HostTensor::from_f32(DType::BF16, &[m, k], &rng.vec(m * k, 1.0));
    let b = HostTensor::from_f32(DType::BF16, &[g, n, k], &rng.vec(g * n * k, 1.0));
    let mi = HostTensor::from_index(DType::I32, &[m], &idx);
    let run = |be: &dyn Backend, amx: bool| {
        let (a, b, mi) = (up(be, &a), up(be, &b), up(be, &mi));
        let mut d = be.alloc(DType::F32, &[m, n]).unwrap();
        let mut go = || {
            ops::run(
                be,
                GemmGroupedContiguous {
                    a: &a,
                    b: &b,
                    m_indices: &mi,
                    d: &mut d,
                },
            )
        };
        if amx {
            with_amx_kernels(go).unwrap().unwrap();
        } else {
            go().unwrap();
        }
        be.download(&d).unwrap().to_f32_vec()
    };
    let r = run(&CpuRef, false);
    let got = run(&Cpu, true);
    let keep: Vec<usize> = (0..m).filter(|&i| idx[i] >= 0).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        keep.iter()
            .flat_map(|&i| v[i * n..(i + 1) * n].to_vec())
            .collect()
    };
    assert_close("amx grouped bf16", DType::F32, &pick(&got), &pick(&r));
}

#[test]
fn mla_decode_with_128_heads_matches_reference() {
    if !amx_here("mla_decode_with_128_heads_matches_reference") {
        return;
    }
    // DeepSeek's geometry (576/512, 64-token pages, 128 heads on one kv
    // head), ragged lengths, a causal s_q = 2 case, NaN in unused slots.
    for &(b, s_q, h_q, causal, ref lens) in &[
        (2usize, 1usize, 128usize, false, vec![300i64, 65]),
        (2, 2, 48, true, vec![129, 2]),
    ] {
        let (d, dv, bs) = (576, 512, 64);
        let mut rng = Rng(97 + b as u64 + s_q as u64);
        let max_blocks = lens
            .iter()
            .map(|&l| (l as usize).div_ceil(bs))
            .max()
            .unwrap()
            + 1;
        let num_blocks = b * max_blocks + 2;
        let q = HostTensor::from_f32(
            DType::BF16,
            &[b, s_q, h_q, d],
            &rng.vec(b * s_q * h_q * d, 1.0),
        );
        let mut kc = vec![f32::NAN; num_blocks * bs * d];
        let mut table = vec![i64::from(i32::MAX); b * max_blocks];
        let mut next = num_blocks - 1; // pages in reverse order
        for bi in 0..b {
            let len = lens[bi] as usize;
            for j in 0..len.div_ceil(bs) {
                table[bi * max_blocks + j] = next as i64;
                for t in 0..bs.min(len - j * bs) {
                    let off = (next * bs + t) * d;
                    kc[off..off + d].copy_from_slice(&rng.vec(d, 1.0));
                }
                next -= 1;
            }
        }
        let inputs = [
            q,
            HostTensor::from_f32(DType::BF16, &[num_blocks, bs, 1, d], &kc),
            HostTensor::from_index(DType::I32, &[b, max_blocks], &table),
            HostTensor::from_index(DType::I32, &[b], lens),
        ];
        let run = |be: &dyn Backend, amx: bool| {
            let t = inputs.each_ref().map(|h| up(be, h));
            let mut out = be.alloc(DType::BF16, &[b, s_q, h_q, dv]).unwrap();
            let mut lse = be.alloc(DType::F32, &[b, h_q, s_q]).unwrap();
            let mut go = || {
                ops::run(
                    be,
                    MlaDecode {
                        q: &t[0],
                        kcache: &t[1],
                        block_table: &t[2],
                        cache_seqlens: &t[3],
                        out: &mut out,
                        lse: &mut lse,
                        softmax_scale: 1.0 / (d as f32).sqrt(),
                        causal,
                    },
                )
            };
            if amx {
                with_amx_kernels(go).unwrap().unwrap();
            } else {
                go().unwrap();
            }
            (
                be.download(&out).unwrap().to_f32_vec(),
                be.download(&lse).unwrap().to_f32_vec(),
            )
        };
        let (ro, rl) = run(&CpuRef, false);
        let (o, l) = run(&Cpu, true);
        for (what, got, want, abs, rel) in [
            ("out", &o, &ro, 8e-4, 2.01 / 128.0),
            ("lse", &l, &rl, 1e-6, 8.01 / 65536.0),
        ] {
            for (i, (&x, &y)) in got.iter().zip(want.iter()).enumerate() {
                if y.is_infinite() || y.is_nan() {
                    assert!(
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                        "{what} {i}"
                    );
                    continue;
                }
                let err = (x as f64 - y as f64).abs();
                assert!(
                    err < abs || err / (y.abs() as f64 + 1e-6) < rel,
                    "mla b {b} s_q {s_q} {what} {i}: {x} vs {y}"
                );
            }
        }
        // calc_diff ≤ 5e-6 on out (SPEC §4).
        let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
        for (&x, &y) in o.iter().zip(&ro) {
            let (x, y) = (x as f64, y as f64);
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        let diff = 1.0 - 2.0 * xy / (xx + yy);
        assert!(diff <= 5e-6, "mla calc_diff {diff}");
    }
}
