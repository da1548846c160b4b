//! Every local op of the backend under test against `cpu-ref`, op by op,
//! on small adversarial inputs from a deterministic PRNG: partial tiles and
//! odd sizes (odd widths of packed 16-bit outputs), NaN/inf propagation,
//! every input/output dtype pairing, out-of-range indices and non-finite
//! inputs that must be reported (at the call or at the next synchronize).
//!
//! Tolerances (r = cpu-ref's value, computed in f64 and rounded once):
//! * exact (bytes): act_quant (q and s), embedding, copy_window,
//!   weight_dequant, add, gather_rows;
//! * gemm: `|d − r| ≤ ulp_out(r) + k·2⁻²⁴·Σ|a·b|` (f32 accumulation bound);
//! * rms_norm, silu_mul: 1 ulp of 16-bit outputs, 4 ulp of f32 outputs;
//! * rope: 1 ulp of the output + 2⁻²¹·(|x₀| + |x₁|) (f32 sin/cos/angle);
//! * moe_gate: the same experts in the same order, weights within 1e-6 ·
//!   route_scale (except tokens on a near tie, which SPEC §6 excuses);
//! * the FP8 GEMMs, MLA and reduce_rows: see [`crate::heavy`] and
//!   [`crate::rows`].
//!
//! Every output starts poisoned (NaN / `0xff`), so an element a kernel does
//! not write fails the comparison.

use crate::compare::{assert_bytes, assert_close, assert_index_error, ulp};
use crate::harness::{
    both, deferred_error, down, host, poisoned, reported_error, run, up, Harness,
};
use crate::Rng;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor};
use deepport_cpu::CpuRef;

/// This module's PRNG streams.
fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x1234_5678)
}

// ---- act_quant ------------------------------------------------------------------

/// Inputs of `act_quant` (`[m, k]`): a zero row (the 1e-4 clamp), tiny
/// values and −0, huge values and outliers, then magnitudes spread over
/// 2^-30 … 2^max_exp so that quotients land on every FP8 binade, including
/// subnormals and saturation. `max_exp` bounds the spread so that f16
/// inputs stay finite.
pub fn act_quant_inputs(rng: &mut Rng, m: usize, k: usize, max_exp: i32) -> Vec<f32> {
    let mut v = rng.normals(m * k, 3.0);
    // Edge rows: zeros (amax clamps to 1e-4), tiny values and −0, huge
    // values and outliers, then magnitudes spread over 2^-30 … 2^20 so that
    // quotients land on every FP8 binade, including subnormals and
    // saturation.
    v[..k].fill(0.0);
    if m > 1 {
        for (j, x) in v[k..2 * k].iter_mut().enumerate() {
            *x = if j % 2 == 0 { 3e-5 } else { -0.0 };
        }
    }
    if m > 2 {
        for (j, x) in v[2 * k..3 * k].iter_mut().enumerate() {
            *x = if j % 128 == 7 {
                -3.0e4
            } else {
                (j as f32 - 64.0) * 11.0
            };
        }
    }
    for r in 3..m {
        for x in &mut v[r * k..(r + 1) * k] {
            let e = (rng.below((max_exp + 31) as usize) as i32) - 30;
            *x *= 2f32.powi(e) * if rng.below(7) == 0 { 1e-3 } else { 1.0 };
        }
    }
    v
}

/// `act_quant` (SPEC §2) equals cpu-ref bit for bit: zero rows, −0, tiny
/// and huge values, every FP8 binade, f32/bf16/f16 inputs, e4m3 and
/// e4m3fnuz, float and UE8M0 scales.
pub fn act_quant_is_bit_exact(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(1);
    for (m, k, xd, qd, sf) in [
        (
            37usize,
            256usize,
            DType::BF16,
            DType::F8E4M3,
            ScaleFmt::Float,
        ),
        (5, 384, DType::F32, DType::F8E4M3, ScaleFmt::Ue8m0),
        (9, 128, DType::F16, DType::F8E4M3Fnuz, ScaleFmt::Float),
        (4, 256, DType::F32, DType::F8E4M3Fnuz, ScaleFmt::Ue8m0),
        (300, 1024, DType::F32, DType::F8E4M3, ScaleFmt::Float),
        (64, 512, DType::BF16, DType::F8E4M3Fnuz, ScaleFmt::Ue8m0),
    ] {
        let max_exp = if xd == DType::F16 { 10 } else { 19 };
        let x = host(xd, &[m, k], &act_quant_inputs(&mut rng, m, k, max_exp));
        let Some((got, want)) = both(w, &[&x], |b, t| {
            let mut q = poisoned(b, qd, &[m, k]);
            let mut s = poisoned(b, DType::F32, &[m, k / 128]);
            run(
                b,
                ActQuant {
                    x: &t[0],
                    q: &mut q,
                    s: &mut s,
                    scale_fmt: sf,
                },
            )?;
            Ok(vec![q, s])
        }) else {
            continue;
        };
        let id = format!("act_quant(m={m},k={k},{xd}->{qd},{sf:?})");
        assert_bytes(&format!("{id}.q"), &got[0], &want[0]);
        assert_bytes(&format!("{id}.s"), &got[1], &want[1]);
    }
}

/// A non-finite `act_quant` input is `NonFinite` naming the first one.
pub fn act_quant_rejects_non_finite_input(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let w: &dyn Backend = &*bk;
    let mut v = vec![1.0f32; 2 * 256];
    v[300] = f32::INFINITY;
    v[400] = f32::NAN;
    let x = up(w, &host(DType::F32, &[2, 256], &v));
    let mut q = poisoned(w, DType::F8E4M3, &[2, 256]);
    let mut s = poisoned(w, DType::F32, &[2, 2]);
    let called = run(
        w,
        ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt: ScaleFmt::Float,
        },
    );
    let Some(e) = reported_error(w, "act_quant(non-finite x)", called, Some(&q)) else {
        return;
    };
    match e {
        Error::NonFinite {
            op,
            arg,
            position,
            value,
        } => {
            assert_eq!((op, arg), ("act_quant", "x"));
            assert_eq!(position, vec![1, 44]);
            assert_eq!(value, f64::INFINITY);
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

// ---- weight_dequant ------------------------------------------------------------

/// `weight_dequant` equals cpu-ref bit for bit (odd shapes, partial
/// blocks, the FP8 NaN code).
pub fn weight_dequant_is_exact(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(2);
    for (n, k, wd, od) in [
        (300usize, 200usize, DType::F8E4M3, DType::BF16),
        (130, 257, DType::F8E4M3Fnuz, DType::F32),
        (129, 131, DType::F8E4M3, DType::F16),
        (1, 1, DType::F8E4M3, DType::BF16),
    ] {
        let mut wv = rng.normals(n * k, 64.0);
        wv[0] = f32::NAN; // the FP8 NaN code decodes to NaN
        let wt = host(wd, &[n, k], &wv);
        let sv: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128))
            .map(|_| (0.25 + rng.uniform() as f32 * 1.75) * 1e-3)
            .collect();
        let st = host(DType::F32, &[n.div_ceil(128), k.div_ceil(128)], &sv);
        let Some((got, want)) = both(w, &[&wt, &st], |b, t| {
            let mut out = poisoned(b, od, &[n, k]);
            run(
                b,
                WeightDequant {
                    w: &t[0],
                    s: &t[1],
                    out: &mut out,
                },
            )?;
            Ok(vec![out])
        }) else {
            continue;
        };
        assert_bytes(
            &format!("weight_dequant(n={n},k={k},{wd}->{od})"),
            &got[0],
            &want[0],
        );
    }
}

// ---- gemm -------------------------------------------------------------------------

/// `gemm` within the f32 accumulation bound of cpu-ref (odd shapes, every
/// dtype pairing, K = 0).
pub fn gemm_matches_reference(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(3);
    for (m, n, k, ad, bd, od) in [
        (
            33usize,
            70usize,
            100usize,
            DType::F32,
            DType::F32,
            DType::F32,
        ),
        (17, 40, 64, DType::BF16, DType::BF16, DType::BF16),
        (65, 131, 200, DType::F16, DType::F16, DType::F32),
        (130, 67, 33, DType::BF16, DType::F32, DType::BF16),
        (3, 5, 1000, DType::F32, DType::BF16, DType::F16),
        (1, 129, 7, DType::BF16, DType::BF16, DType::BF16),
        (4, 3, 0, DType::F32, DType::F32, DType::BF16),
    ] {
        let av = rng.normals(m * k, 1.0);
        let bv = rng.normals(n * k, 1.0);
        let a = host(ad, &[m, k], &av);
        let b = host(bd, &[n, k], &bv);
        let Some((got, want)) = both(w, &[&a, &b], |be, t| {
            let mut d = poisoned(be, od, &[m, n]);
            run(
                be,
                Gemm {
                    a: &t[0],
                    b: &t[1],
                    d: &mut d,
                },
            )?;
            Ok(vec![d])
        }) else {
            continue;
        };
        // Σ|a·b| per output, from the rounded inputs.
        let (ar, br) = (a.to_f32_vec(), b.to_f32_vec());
        let gamma = k as f64 * 2f64.powi(-24);
        let worst = assert_close(
            &format!("gemm(m={m},n={n},k={k},{ad}x{bd}->{od})"),
            &got[0],
            &want[0],
            |i, r| {
                let (row, col) = (i / n, i % n);
                let s: f64 = (0..k)
                    .map(|kk| (ar[row * k + kk] as f64 * br[col * k + kk] as f64).abs())
                    .sum();
                ulp(od, r) + gamma * s
            },
        );
        eprintln!("gemm(m={m},n={n},k={k},{ad}x{bd}->{od}): worst error / tolerance = {worst:.3}");
    }
}

// ---- rms_norm ---------------------------------------------------------------------

/// `rms_norm` within 1 ulp (16-bit) / 4 ulp (f32) of cpu-ref, with zero,
/// NaN and infinite rows.
pub fn rms_norm_matches_reference(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(4);
    for (rows, dim, xd, wd, yd, eps) in [
        (
            7usize,
            300usize,
            DType::BF16,
            DType::F32,
            DType::BF16,
            1e-6f32,
        ),
        (12, 64, DType::F32, DType::BF16, DType::F32, 1e-5),
        (3, 7168, DType::F32, DType::F32, DType::F32, 1e-6),
        (5, 513, DType::F16, DType::F16, DType::F16, 1e-6),
        (70_000, 3, DType::BF16, DType::BF16, DType::BF16, 1e-6),
    ] {
        let mut xv = rng.normals(rows * dim, 2.0);
        xv[dim..2 * dim].fill(0.0); // a zero row: y = 0
        if rows > 3 {
            xv[2 * dim + 1] = f32::NAN; // a NaN row stays NaN
            xv[3 * dim] = f32::INFINITY; // inf → inv = 0 → NaN there, 0 elsewhere
        }
        let x = host(xd, &[rows, dim], &xv);
        let wt = host(wd, &[dim], &rng.normals(dim, 1.0));
        let Some((got, want)) = both(w, &[&x, &wt], |b, t| {
            let mut y = poisoned(b, yd, &[rows, dim]);
            run(
                b,
                RmsNorm {
                    x: &t[0],
                    weight: &t[1],
                    y: &mut y,
                    eps,
                },
            )?;
            Ok(vec![y])
        }) else {
            continue;
        };
        let ulps = if yd == DType::F32 { 4.0 } else { 1.0 };
        let worst = assert_close(
            &format!("rms_norm(rows={rows},dim={dim},{xd},{wd}->{yd})"),
            &got[0],
            &want[0],
            |_, r| ulps * ulp(yd, r),
        );
        eprintln!("rms_norm(rows={rows},dim={dim},->{yd}): worst error / tolerance = {worst:.3}");
    }
}

// ---- rope ---------------------------------------------------------------------------

fn yarn(factor: f32, theta: f32, mscale: f32, beta: (f32, f32)) -> RopeConfig {
    RopeConfig {
        layout: Default::default(),
        theta,
        yarn: Some(Yarn {
            factor,
            original_max_position_embeddings: 4096,
            beta_fast: beta.0,
            beta_slow: beta.1,
            mscale,
            mscale_all_dim: 1.0,
        }),
    }
}

/// `rope` (YaRN and plain) within 1 ulp + 2⁻²¹·|x| of cpu-ref, huge
/// positions included.
pub fn rope_matches_reference(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(5);
    type Case = (Vec<usize>, DType, DType, DType, Vec<i64>, RopeConfig);
    let cases: Vec<Case> = vec![
        (
            vec![6, 3, 64],
            DType::BF16,
            DType::BF16,
            DType::I64,
            vec![0, 1, 2, 3, 17, 4095],
            RopeConfig::default(),
        ),
        (
            vec![5, 2, 64],
            DType::F32,
            DType::F32,
            DType::I32,
            vec![0, 1, 4096, 70_000, 163_839],
            yarn(40.0, 10000.0, 1.0, (32.0, 1.0)),
        ),
        (
            vec![4, 64],
            DType::F32,
            DType::F32,
            DType::I64,
            vec![3, 999, 12_345, 65_535],
            yarn(8.0, 50000.0, 0.707, (16.0, 2.0)),
        ),
        (
            // Huge positions: exact i64 → f32 rounding, far range reduction.
            vec![6, 3, 128],
            DType::F32,
            DType::F32,
            DType::I64,
            vec![
                16_777_217,
                123_456_789,
                1 << 31,
                3_000_000_000,
                (1 << 40) + 12345,
                1 << 62,
            ],
            RopeConfig::default(),
        ),
        (
            vec![3, 129, 8],
            DType::F16,
            DType::BF16,
            DType::I32,
            vec![7, 100_000, 2_000_000_000],
            RopeConfig {
                layout: Default::default(),
                theta: 500.0,
                yarn: None,
            },
        ),
    ];
    for (shape, xd, yd, pd, pos, cfg) in cases {
        let n: usize = shape.iter().product();
        let xv = rng.normals(n, 1.0);
        let x = host(xd, &shape, &xv);
        let p = HostTensor::from_index(pd, &[shape[0]], &pos);
        let Some((got, want)) = both(w, &[&x, &p], |b, t| {
            let mut y = poisoned(b, yd, &shape);
            run(
                b,
                Rope {
                    x: &t[0],
                    positions: &t[1],
                    y: &mut y,
                    config: cfg,
                },
            )?;
            Ok(vec![y])
        }) else {
            continue;
        };
        let xr = x.to_f32_vec();
        let worst = assert_close(
            &format!("rope({shape:?},{xd}->{yd},{pd})"),
            &got[0],
            &want[0],
            |i, r| {
                let j = i & !1;
                ulp(yd, r) + 2f64.powi(-21) * (xr[j].abs() + xr[j + 1].abs()) as f64
            },
        );
        // In f32 ulps of the reference, for the report.
        let g = got[0].to_f32_vec();
        let r = want[0].to_f32_vec();
        let max_ulps = g
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b as f64).abs() / ulp(DType::F32, b))
            .fold(0f64, f64::max);
        let max_abs = g
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "rope({shape:?},{xd}->{yd}): worst error / tolerance = {worst:.3}, \
             max abs error {max_abs:e} ({max_ulps:.1} f32 ulps of the reference)"
        );
    }
}

/// A negative position is `IndexOutOfRange`.
pub fn rope_rejects_negative_positions(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let w: &dyn Backend = &*bk;
    let x = up(w, &host(DType::F32, &[3, 4], &[1.0; 12]));
    let p = up(w, &HostTensor::from_i64(&[3], &[0, 5, -2]));
    let mut y = poisoned(w, DType::F32, &[3, 4]);
    let Some(e) = deferred_error(w, "rope(negative position)", || {
        run(
            w,
            Rope {
                x: &x,
                positions: &p,
                y: &mut y,
                config: RopeConfig::default(),
            },
        )
    }) else {
        return;
    };
    assert_index_error("rope", e, ("rope", "positions"), &[2], -2, None);
}

// ---- silu_mul, add -------------------------------------------------------------------

/// `silu_mul` within 1 ulp (16-bit) / 4 ulp (f32), extremes and NaN/inf
/// included.
pub fn silu_mul_matches_reference(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(6);
    for (shape, gd, ud, od) in [
        (
            vec![9usize, 200usize],
            DType::BF16,
            DType::BF16,
            DType::BF16,
        ),
        (vec![1000], DType::F32, DType::F32, DType::F32),
        (vec![3, 333], DType::F16, DType::F32, DType::F16),
        (vec![20_001], DType::F32, DType::BF16, DType::F32),
    ] {
        let n: usize = shape.iter().product();
        let mut gv = rng.normals(n, 4.0);
        gv[..8].copy_from_slice(&[
            -100.0,
            -88.5,
            -20.0,
            20.0,
            88.5,
            100.0,
            f32::NAN,
            f32::INFINITY,
        ]);
        gv[8] = f32::NEG_INFINITY;
        let g = host(gd, &shape, &gv);
        let u = host(ud, &shape, &rng.normals(n, 1.0));
        let Some((got, want)) = both(w, &[&g, &u], |b, t| {
            let mut out = poisoned(b, od, &shape);
            run(
                b,
                SiluMul {
                    gate: &t[0],
                    up: &t[1],
                    out: &mut out,
                },
            )?;
            Ok(vec![out])
        }) else {
            continue;
        };
        let ulps = if od == DType::F32 { 4.0 } else { 1.0 };
        // 1e-37: a subnormal result may be flushed to zero on the device.
        let worst = assert_close(
            &format!("silu_mul({shape:?},{gd},{ud}->{od})"),
            &got[0],
            &want[0],
            |_, r| ulps * ulp(od, r) + 1e-37,
        );
        eprintln!("silu_mul({shape:?}->{od}): worst error / tolerance = {worst:.3}");
    }
}

/// `add` equals cpu-ref (one rounding: ties a double rounding gets wrong,
/// inf − inf, f16 overflow).
pub fn add_is_exact(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(7);
    for (shape, ad, bd, od) in [
        (
            vec![13usize, 70usize],
            DType::BF16,
            DType::BF16,
            DType::BF16,
        ),
        (vec![50], DType::BF16, DType::F32, DType::F32),
        (vec![3, 3, 3], DType::F32, DType::F32, DType::BF16),
        (vec![1001], DType::F16, DType::BF16, DType::F16),
        (vec![4097], DType::F32, DType::F32, DType::F16),
    ] {
        let n: usize = shape.iter().product();
        let mut av = rng.normals(n, 1.0);
        let mut bv = rng.normals(n, 1e-3);
        av[0] = f32::INFINITY;
        bv[0] = f32::NEG_INFINITY; // inf − inf = NaN
        av[1] = f32::NAN;
        av[2] = 65504.0; // overflows f16 when b pushes it up
        bv[2] = 16.0;
        // Ties that a double rounding (f32, then 16-bit) would get wrong.
        for i in 3..n.min(40) {
            av[i] = 1.0 + (i as f32) * 2f32.powi(-7);
            bv[i] = 2f32.powi(-8) + 2f32.powi(-30) * if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        let a = host(ad, &shape, &av);
        let b = host(bd, &shape, &bv);
        let Some((got, want)) = both(w, &[&a, &b], |be, t| {
            let mut out = poisoned(be, od, &shape);
            run(
                be,
                Add {
                    a: &t[0],
                    b: &t[1],
                    out: &mut out,
                },
            )?;
            Ok(vec![out])
        }) else {
            continue;
        };
        // NaN payloads may differ; compare NaN positions, then bits.
        assert_close(&format!("add({shape:?})"), &got[0], &want[0], |_, _| 0.0);
    }
}

// ---- embedding --------------------------------------------------------------------

/// `embedding` equals cpu-ref bit for bit (i32 and i64 ids).
pub fn embedding_is_exact(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(9);
    for (vocab, dim, tokens, td, idd, od) in [
        (
            50usize,
            40usize,
            12usize,
            DType::BF16,
            DType::I64,
            DType::BF16,
        ),
        (7, 3, 5, DType::F32, DType::I32, DType::F32),
        (100, 3, 33, DType::F32, DType::I64, DType::BF16),
        (9, 5, 7, DType::BF16, DType::I32, DType::F32),
        (3, 1, 9, DType::F16, DType::I32, DType::F16),
    ] {
        let table = host(td, &[vocab, dim], &rng.normals(vocab * dim, 1.0));
        let mut ids: Vec<i64> = (0..tokens).map(|_| rng.below(vocab) as i64).collect();
        ids[0] = 0;
        ids[tokens - 1] = vocab as i64 - 1;
        let idt = HostTensor::from_index(idd, &[tokens], &ids);
        let Some((got, want)) = both(w, &[&table, &idt], |b, t| {
            let mut out = poisoned(b, od, &[tokens, dim]);
            run(
                b,
                Embedding {
                    table: &t[0],
                    ids: &t[1],
                    out: &mut out,
                },
            )?;
            Ok(vec![out])
        }) else {
            continue;
        };
        assert_bytes(
            &format!("embedding(v={vocab},d={dim},t={tokens})"),
            &got[0],
            &want[0],
        );
    }
}

/// An out-of-range token id is `IndexOutOfRange` with cpu-ref's message;
/// the backend works afterwards.
pub fn embedding_out_of_range_is_an_error(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let w: &dyn Backend = &*bk;
    for (idd, ids, bad_pos, bad_val) in [
        (DType::I64, vec![0i64, 3, 50, 7, -1], 2usize, 50i64),
        (DType::I32, vec![1, -1, 2, 99, 4], 1, -1),
        (DType::I64, vec![1, 1 << 40, 2], 1, 1 << 40),
    ] {
        let table = up(w, &host(DType::BF16, &[50, 4], &vec![1.0; 200]));
        let idt = up(w, &HostTensor::from_index(idd, &[ids.len()], &ids));
        let mut out = poisoned(w, DType::BF16, &[ids.len(), 4]);
        let called = run(
            w,
            Embedding {
                table: &table,
                ids: &idt,
                out: &mut out,
            },
        );
        let Some(e) = reported_error(w, "embedding(bad id)", called, Some(&out)) else {
            return;
        };
        // cpu-ref reports the same error at once.
        let ct = CpuRef
            .upload(&host(DType::BF16, &[50, 4], &vec![1.0; 200]))
            .unwrap();
        let ci = CpuRef
            .upload(&HostTensor::from_index(idd, &[ids.len()], &ids))
            .unwrap();
        let mut co = CpuRef.alloc(DType::BF16, &[ids.len(), 4]).unwrap();
        let ce = run(
            &CpuRef,
            Embedding {
                table: &ct,
                ids: &ci,
                out: &mut co,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), ce.to_string());
        assert_index_error(
            "embedding",
            e,
            ("embedding", "ids"),
            &[bad_pos],
            bad_val,
            Some("[0, 50)"),
        );
    }
    // Afterwards the backend works and reports nothing stale.
    let table = up(w, &host(DType::F32, &[2, 2], &[1.0, 2.0, 3.0, 4.0]));
    let idt = up(w, &HostTensor::from_i32(&[1], &[1]));
    let mut out = poisoned(w, DType::F32, &[1, 2]);
    run(
        w,
        Embedding {
            table: &table,
            ids: &idt,
            out: &mut out,
        },
    )
    .unwrap();
    assert_eq!(down(w, &out).to_f32_vec(), vec![3.0, 4.0]);
}

// ---- copy_window -----------------------------------------------------------------

/// `copy_window` equals cpu-ref bit for bit; what lies outside the window
/// in `dst` survives.
pub fn copy_window_is_exact(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(10);
    type Case = (
        Vec<usize>,
        DType,
        Vec<usize>,
        DType,
        (usize, usize),
        (usize, usize),
        (usize, usize),
    );
    let cases: Vec<Case> = vec![
        (
            vec![6, 10],
            DType::F32,
            vec![4, 2, 8],
            DType::BF16,
            (2, 4),
            (4, 1),
            (3, 5),
        ),
        (
            vec![5, 576],
            DType::BF16,
            vec![7, 640],
            DType::F32,
            (0, 0),
            (1, 64),
            (5, 576),
        ),
        // Full-width windows of odd width: rows meet inside 16-bit words.
        (
            vec![9, 7],
            DType::BF16,
            vec![11, 7],
            DType::BF16,
            (1, 0),
            (3, 0),
            (7, 7),
        ),
        (
            vec![9, 7],
            DType::F32,
            vec![11, 7],
            DType::F16,
            (0, 0),
            (0, 0),
            (9, 7),
        ),
        // Narrow windows at odd offsets, one element wide.
        (
            vec![8, 5],
            DType::F16,
            vec![10, 9],
            DType::BF16,
            (1, 3),
            (2, 5),
            (6, 1),
        ),
        (
            vec![300, 33],
            DType::BF16,
            vec![301, 65],
            DType::BF16,
            (0, 1),
            (1, 31),
            (299, 31),
        ),
        (
            vec![1, 1],
            DType::F32,
            vec![1, 1],
            DType::F32,
            (0, 0),
            (0, 0),
            (1, 1),
        ),
    ];
    for (ss, sd, ds, dd, so, doo, size) in cases {
        let src = host(sd, &ss, &rng.normals(ss.iter().product(), 1.0));
        let dst0 = host(dd, &ds, &rng.normals(ds.iter().product(), 1.0));
        // dst starts with data: what lies outside the window must survive.
        let Some((got, want)) = both(w, &[&src], |b, t| {
            let mut d = b.upload(&dst0)?;
            run(
                b,
                CopyWindow {
                    src: &t[0],
                    dst: &mut d,
                    src_origin: so,
                    dst_origin: doo,
                    size,
                },
            )?;
            Ok(vec![d])
        }) else {
            continue;
        };
        assert_bytes(
            &format!("copy_window({sd}{ss:?}->{dd}{ds:?},{so:?}->{doo:?},{size:?})"),
            &got[0],
            &want[0],
        );
    }
}

// ---- moe_gate ----------------------------------------------------------------------

/// Tokens whose selection sits on a near tie in exact arithmetic (gap below
/// `rel`, relative): the k-th and (k+1)-th kept experts, or the last kept and
/// first dropped groups.
#[allow(clippy::too_many_arguments)]
fn moe_near_ties(
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    dim: usize,
    e: usize,
    n_group: usize,
    topk_group: usize,
    topk: usize,
    rel: f64,
) -> Vec<bool> {
    let t = x.len() / dim;
    let gsz = e / n_group;
    let close = |a: f64, b: f64| (a - b).abs() <= rel * a.abs().max(b.abs());
    (0..t)
        .map(|tok| {
            let sb: Vec<f64> = (0..e)
                .map(|ex| {
                    let l: f64 = (0..dim)
                        .map(|j| x[tok * dim + j] as f64 * wt[ex * dim + j] as f64)
                        .sum();
                    1.0 / (1.0 + (-l).exp()) + bias[ex] as f64
                })
                .collect();
            let mut gs: Vec<f64> = (0..n_group)
                .map(|g| {
                    let mut v = sb[g * gsz..(g + 1) * gsz].to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v[0] + v[1]
                })
                .collect();
            let mut order: Vec<usize> = (0..n_group).collect();
            order.sort_by(|&a, &b| gs[b].total_cmp(&gs[a]));
            let group_tie =
                topk_group < n_group && close(gs[order[topk_group - 1]], gs[order[topk_group]]);
            gs.clear();
            let mut kept: Vec<f64> = order[..topk_group]
                .iter()
                .flat_map(|&g| sb[g * gsz..(g + 1) * gsz].to_vec())
                .collect();
            kept.sort_by(|a, b| b.total_cmp(a));
            let k_tie = topk < kept.len() && close(kept[topk - 1], kept[topk]);
            group_tie || k_tie
        })
        .collect()
}

/// `moe_gate` (SPEC §6): the same experts in the same order (near ties
/// excused), weights within 1e-6·route_scale; exact ties break low.
pub fn moe_gate_matches_reference(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(11);
    for (t, e, dim, ng, tg, k, scale, dt, idd, with_bias) in [
        (
            20usize,
            64usize,
            96usize,
            8usize,
            4usize,
            8usize,
            2.5f32,
            DType::BF16,
            DType::I64,
            true,
        ),
        (11, 32, 64, 4, 2, 6, 1.0, DType::F32, DType::I32, false),
        (300, 256, 200, 8, 4, 8, 2.5, DType::BF16, DType::I64, true),
        (3, 600, 17, 300, 7, 9, 1.5, DType::F32, DType::I64, true),
        (5, 16, 8, 1, 1, 16, 1.0, DType::F16, DType::I32, true),
    ] {
        let xv = rng.normals(t * dim, 1.0);
        let mut wv = rng.normals(e * dim, (dim as f32).powf(-0.5));
        // Exact ties: expert 5 duplicates expert 3, expert 9 duplicates 2.
        wv.copy_within(3 * dim..4 * dim, 5 * dim);
        wv.copy_within(2 * dim..3 * dim, 9 * dim);
        let bv: Vec<f32> = if with_bias {
            let mut b = rng.normals(e, 0.1);
            b[5] = b[3];
            b[9] = b[2];
            b
        } else {
            vec![0.0; e]
        };
        let x = host(dt, &[t, dim], &xv);
        let wt = host(dt, &[e, dim], &wv);
        let bias = host(DType::F32, &[e], &bv);
        let ties = moe_near_ties(
            &x.to_f32_vec(),
            &wt.to_f32_vec(),
            &bv,
            dim,
            e,
            ng,
            tg,
            k,
            1e-5,
        );
        let Some((got, want)) = both(w, &[&x, &wt, &bias], |b, ts| {
            let mut idx = poisoned(b, idd, &[t, k]);
            let mut wts = poisoned(b, DType::F32, &[t, k]);
            run(
                b,
                MoeGate {
                    x: &ts[0],
                    weight: &ts[1],
                    bias: with_bias.then_some(&ts[2]),
                    topk_idx: &mut idx,
                    topk_weights: &mut wts,
                    n_group: ng,
                    topk_group: tg,
                    topk: k,
                    route_scale: scale,
                },
            )?;
            Ok(vec![idx, wts])
        }) else {
            continue;
        };
        let (gi, ri) = (got[0].to_i64_vec(), want[0].to_i64_vec());
        let (gw, rw) = (got[1].to_f32_vec(), want[1].to_f32_vec());
        let mut excused = 0;
        let mut worst = 0f64;
        for (tok, &tie) in ties.iter().enumerate() {
            let row = tok * k..(tok + 1) * k;
            if gi[row.clone()] != ri[row.clone()] {
                assert!(
                    tie,
                    "moe_gate(t={t},e={e}) token {tok}: got experts {:?}, want {:?}",
                    &gi[row.clone()],
                    &ri[row]
                );
                excused += 1;
                continue;
            }
            for j in row {
                let err = (gw[j] as f64 - rw[j] as f64).abs();
                assert!(
                    err <= 1e-6 * scale as f64,
                    "moe_gate token {tok}: weight {} vs {}",
                    gw[j],
                    rw[j]
                );
                worst = worst.max(err);
            }
        }
        eprintln!(
            "moe_gate(t={t},e={e},dim={dim},{dt}): {excused} near-tie tokens excused, worst weight error {worst:e}"
        );
    }
}

/// A non-finite gate weight is `NonFinite` naming it.
pub fn moe_gate_rejects_non_finite(h: &Harness) {
    let Some(bk) = h.backend() else { return };
    let w: &dyn Backend = &*bk;
    let x = up(w, &host(DType::F32, &[2, 4], &[1.0; 8]));
    let mut wv = vec![0.5f32; 8 * 4];
    wv[13] = f32::NAN;
    let wt = up(w, &host(DType::F32, &[8, 4], &wv));
    let mut idx = poisoned(w, DType::I64, &[2, 2]);
    let mut wts = poisoned(w, DType::F32, &[2, 2]);
    let Some(e) = deferred_error(w, "moe_gate(non-finite weight)", || {
        run(
            w,
            MoeGate {
                x: &x,
                weight: &wt,
                bias: None,
                topk_idx: &mut idx,
                topk_weights: &mut wts,
                n_group: 2,
                topk_group: 1,
                topk: 2,
                route_scale: 1.0,
            },
        )
    }) else {
        return;
    };
    match e {
        Error::NonFinite {
            op, arg, position, ..
        } => assert_eq!((op, arg, position), ("moe_gate", "weight", vec![3, 1])),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

// ---- determinism ------------------------------------------------------------------

/// An op of the determinism check: inputs, and the closure that allocates
/// poisoned outputs and runs it.
type Case = (
    &'static str,
    Vec<HostTensor>,
    Box<dyn Fn(&dyn Backend, &[Tensor]) -> deepport_core::Result<Vec<Tensor>>>,
);

/// A second run of the same op on the same inputs and backend gives the
/// same bits (reductions in a fixed order): gemm, rms_norm, silu_mul,
/// moe_gate, fp8_gemm, mla_decode, mla_prefill.
pub fn local_ops_are_deterministic(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let mut rng = rng(20);
    let mut cases: Vec<Case> = Vec::new();
    let (m, n, k) = (33, 70, 300);
    cases.push((
        "gemm",
        vec![
            host(DType::F32, &[m, k], &rng.normals(m * k, 1.0)),
            host(DType::BF16, &[n, k], &rng.normals(n * k, 1.0)),
        ],
        Box::new(move |b, t| {
            let mut d = poisoned(b, DType::F32, &[m, n]);
            run(
                b,
                Gemm {
                    a: &t[0],
                    b: &t[1],
                    d: &mut d,
                },
            )?;
            Ok(vec![d])
        }),
    ));
    cases.push((
        "rms_norm",
        vec![
            host(DType::F32, &[5, 1500], &rng.normals(5 * 1500, 3.0)),
            host(DType::F32, &[1500], &rng.normals(1500, 1.0)),
        ],
        Box::new(|b, t| {
            let mut y = poisoned(b, DType::F32, &[5, 1500]);
            run(
                b,
                RmsNorm {
                    x: &t[0],
                    weight: &t[1],
                    y: &mut y,
                    eps: 1e-6,
                },
            )?;
            Ok(vec![y])
        }),
    ));
    cases.push((
        "moe_gate",
        vec![
            host(DType::F32, &[17, 96], &rng.normals(17 * 96, 1.0)),
            host(DType::F32, &[64, 96], &rng.normals(64 * 96, 0.1)),
            host(DType::F32, &[64], &rng.normals(64, 0.1)),
        ],
        Box::new(|b, t| {
            let mut idx = poisoned(b, DType::I64, &[17, 8]);
            let mut wts = poisoned(b, DType::F32, &[17, 8]);
            run(
                b,
                MoeGate {
                    x: &t[0],
                    weight: &t[1],
                    bias: Some(&t[2]),
                    topk_idx: &mut idx,
                    topk_weights: &mut wts,
                    n_group: 8,
                    topk_group: 4,
                    topk: 8,
                    route_scale: 2.5,
                },
            )?;
            Ok(vec![idx, wts])
        }),
    ));
    let (fm, fnn, fk) = (17usize, 130usize, 260usize);
    let kb = fk.div_ceil(128);
    cases.push((
        "fp8_gemm",
        vec![
            crate::heavy::reshape(
                crate::heavy::fp8_values(&mut rng, fm * fk, DType::F8E4M3),
                &[fm, fk],
            ),
            crate::heavy::scales(&mut rng, &[fm, kb]),
            crate::heavy::reshape(
                crate::heavy::fp8_values(&mut rng, fnn * fk, DType::F8E4M3),
                &[fnn, fk],
            ),
            crate::heavy::scales(&mut rng, &[fnn.div_ceil(128), kb]),
        ],
        Box::new(move |b, t| {
            let mut d = poisoned(b, DType::F32, &[fm, fnn]);
            run(
                b,
                Fp8Gemm {
                    a: &t[0],
                    sa: &t[1],
                    b: &t[2],
                    sb: &t[3],
                    d: &mut d,
                },
            )?;
            Ok(vec![d])
        }),
    ));
    let c = crate::heavy::Decode::v3(&[1, 130], 2, 4, 1, true);
    let x = crate::heavy::decode_inputs(&mut rng, &c);
    cases.push((
        "mla_decode",
        vec![x.q, x.kcache, x.block_table, x.seqlens],
        Box::new(move |b, t| crate::heavy::run_decode(b, &c, t)),
    ));
    let (t_, s, hh, dn, dr, dc, dv) = (4, 20, 2, 32, 16, 64, 24);
    cases.push((
        "mla_prefill",
        vec![
            host(DType::F32, &[t_, hh, dn], &rng.normals(t_ * hh * dn, 1.0)),
            host(DType::F32, &[t_, hh, dr], &rng.normals(t_ * hh * dr, 1.0)),
            host(DType::F32, &[s, dc], &rng.normals(s * dc, 1.0)),
            host(DType::F32, &[s, dr], &rng.normals(s * dr, 1.0)),
            host(
                DType::F32,
                &[hh * (dn + dv), dc],
                &rng.normals(hh * (dn + dv) * dc, 0.125),
            ),
        ],
        Box::new(move |b, x| {
            let mut out = poisoned(b, DType::F32, &[t_, hh, dv]);
            run(
                b,
                MlaPrefill {
                    q_nope: &x[0],
                    q_pe: &x[1],
                    latent: &x[2],
                    k_pe: &x[3],
                    wkv_b: &x[4],
                    out: &mut out,
                    softmax_scale: 0.2,
                    form: MlaForm::Absorbed,
                },
            )?;
            Ok(vec![out])
        }),
    ));
    for (name, inputs, f) in &cases {
        let inputs: Vec<&HostTensor> = inputs.iter().collect();
        let first = match crate::harness::on(w, &inputs, f) {
            Ok(v) => v,
            Err(e @ Error::NotSupported { .. }) => {
                crate::harness::skip(w.name(), name, &e);
                continue;
            }
            Err(e) => panic!("{name}: {e}"),
        };
        let second = crate::harness::on(w, &inputs, f).expect("ran before");
        for (i, (a, b)) in second.iter().zip(&first).enumerate() {
            assert_bytes(&format!("{name} output {i}, second run"), a, b);
        }
    }
}

// ---- memory ---------------------------------------------------------------------

/// `Backend::alloc_zeroed` gives zero bytes, also where the memory was
/// just another tensor's: each round fills tensors with `0xff` (NaN in
/// every float dtype), drops them, then allocates the same sizes zeroed —
/// a backend that reuses freed memory (pools, arenas) and skips the clear
/// fails here. Sizes cover an odd byte count and a multi-megabyte tensor.
pub fn alloc_zeroed_is_zero_after_reuse(h: &Harness) {
    let Some(bk) = h.shared() else { return };
    let w: &dyn Backend = &*bk;
    let sizes: [(DType, Vec<usize>); 4] = [
        (DType::F32, vec![7, 33]),
        (DType::BF16, vec![3, 5, 129]),
        (DType::F8E4M3, vec![1, 1001]),
        (DType::F32, vec![512, 1024]),
    ];
    for round in 0..3 {
        let filled: Vec<Tensor> = sizes
            .iter()
            .map(|(d, s)| {
                let ones = HostTensor::from_bytes(
                    *d,
                    s,
                    vec![0xff; d.size() * s.iter().product::<usize>()],
                )
                .expect("host tensor");
                up(w, &ones)
            })
            .collect();
        w.synchronize().expect("synchronize");
        drop(filled);
        for (d, s) in &sizes {
            let t = w.alloc_zeroed(*d, s).expect("alloc_zeroed");
            let got = down(w, &t);
            assert_bytes(
                &format!("alloc_zeroed {d} {s:?} (round {round})"),
                &got,
                &HostTensor::zeros(*d, s),
            );
        }
    }
}
