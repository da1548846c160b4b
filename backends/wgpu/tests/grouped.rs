//! `gemm_grouped_contiguous` / `gemm_grouped_masked` on wgpu: against
//! cpu-ref, bit for bit equal when the operands are split into windows
//! (a storage binding cap of 16 KiB), rows past `masked_m` untouched, and
//! out-of-range indices reported at the next synchronize.

use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::{self, *};
use deepport_core::{DType, HostTensor};
use deepport_cpu::CpuRef;
use deepport_testkit::compare::{assert_index_error, ulp};
use deepport_testkit::harness::{available, down, host, poisoned, up};
use deepport_testkit::Rng;
use deepport_wgpu::{Wgpu, WgpuOptions};

/// A wgpu instance, or `None` (skipped with the reason, unless
/// `DEEPPORT_REQUIRE` names wgpu: then the test fails).
fn make(opts: WgpuOptions) -> Option<Wgpu> {
    available("wgpu", Wgpu::with_options(opts))
}

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x6e6f_7570)
}

/// Inputs of one contiguous and one masked problem.
struct Problem {
    ab: DType,
    out: DType,
    a2: HostTensor,
    idx: HostTensor,
    a3: HostTensor,
    masked: HostTensor,
    b: HostTensor,
}

fn problem(
    seed: u64,
    ab: DType,
    out: DType,
    (g, n, k, m, m_max): (usize, usize, usize, usize, usize),
) -> Problem {
    let mut r = rng(seed);
    let groups: Vec<i64> = (0..m).map(|_| r.below(g + 1) as i64 - 1).collect();
    let masked: Vec<i64> = (0..g)
        .map(|i| if i == 1 { 0 } else { r.below(m_max + 1) as i64 })
        .collect();
    Problem {
        ab,
        out,
        a2: host(ab, &[m, k], &r.normals(m * k, 1.0)),
        idx: HostTensor::from_i32(&[m], &groups.iter().map(|&x| x as i32).collect::<Vec<_>>()),
        a3: host(ab, &[g, m_max, k], &r.normals(g * m_max * k, 1.0)),
        masked: HostTensor::from_i64(&[g], &masked),
        b: host(ab, &[g, n, k], &r.normals(g * n * k, (k as f32).powf(-0.5))),
    }
}

/// Runs both layouts on `be`; returns (contiguous d, masked d).
fn run(be: &dyn Backend, p: &Problem) -> (HostTensor, HostTensor) {
    let (a2, idx, a3, mm, b) = (
        up(be, &p.a2),
        up(be, &p.idx),
        up(be, &p.a3),
        up(be, &p.masked),
        up(be, &p.b),
    );
    let n = p.b.shape()[1];
    let mut d2 = poisoned(be, p.out, &[p.a2.shape()[0], n]);
    ops::run(
        be,
        GemmGroupedContiguous {
            a: &a2,
            b: &b,
            m_indices: &idx,
            d: &mut d2,
        },
    )
    .expect("contiguous");
    let s3 = p.a3.shape();
    let mut d3: Tensor = poisoned(be, p.out, &[s3[0], s3[1], n]);
    ops::run(
        be,
        GemmGroupedMasked {
            a: &a3,
            b: &b,
            masked_m: &mm,
            d: &mut d3,
        },
    )
    .expect("masked");
    (down(be, &d2), down(be, &d3))
}

/// Which rows are computed: contiguous (group ≥ 0), masked (r < masked_m).
fn live(p: &Problem) -> (Vec<bool>, Vec<bool>) {
    let c = p.idx.to_i64_vec().iter().map(|&x| x >= 0).collect();
    let m_max = p.a3.shape()[1];
    let mm = p.masked.to_i64_vec();
    let m = (0..mm.len() * m_max)
        .map(|i| (i % m_max) < mm[i / m_max] as usize)
        .collect();
    (c, m)
}

/// Computed rows within 1 ulp + 1e-5·rms of cpu-ref (f32 accumulation in
/// another order, one rounding); masked-off rows still hold the poison.
fn check_against_reference(
    got: &HostTensor,
    want: &HostTensor,
    rows: &[bool],
    masked: bool,
    what: &str,
) {
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let n = g.len() / rows.len();
    let live: Vec<f64> = w
        .iter()
        .enumerate()
        .filter(|(i, _)| rows[i / n])
        .map(|(_, &x)| x as f64)
        .collect();
    let rms = (live.iter().map(|x| x * x).sum::<f64>() / live.len().max(1) as f64).sqrt();
    for (i, (&x, &y)) in g.iter().zip(&w).enumerate() {
        if !rows[i / n] {
            if masked {
                assert!(
                    x.is_nan(),
                    "{what}: element {i} of a masked-off row was written: {x}"
                );
            }
            continue;
        }
        let tol = ulp(got.dtype(), y) + 1e-5 * rms;
        assert!(
            ((x as f64) - (y as f64)).abs() <= tol,
            "{what}: element {i}: {x} vs {y} (tol {tol})"
        );
    }
}

#[test]
fn matches_the_reference_and_windows_change_no_bit() {
    let Some(whole) = make(WgpuOptions::default()) else {
        return;
    };
    let Some(split) = make(WgpuOptions {
        max_storage_binding: Some(16384),
        ..Default::default()
    }) else {
        return;
    };
    // Windowed cases have per-group and per-row byte sizes that are
    // multiples of 256 (any offset alignment); the odd one runs whole.
    for (seed, ab, out, dims, windowed) in [
        (1, DType::F32, DType::F32, (5, 64, 48, 300, 40), true),
        (2, DType::BF16, DType::BF16, (4, 32, 96, 150, 64), true),
        (3, DType::BF16, DType::F16, (3, 65, 17, 90, 64), false),
    ] {
        let p = problem(seed, ab, out, dims);
        let what = format!("{:?} → {:?} {dims:?}", p.ab, p.out);
        let (c_ref, m_ref) = run(&CpuRef, &p);
        let (c_w, m_w) = run(&whole, &p);
        let (lc, lm) = live(&p);
        check_against_reference(&c_w, &c_ref, &lc, false, &format!("contiguous {what}"));
        check_against_reference(&m_w, &m_ref, &lm, true, &format!("masked {what}"));
        if !windowed {
            continue;
        }
        // Windows change which dispatch computes a row, never its arithmetic.
        let (c_s, m_s) = run(&split, &p);
        let n = p.b.shape()[1] * out.size();
        for (i, &l) in lc.iter().enumerate() {
            if l {
                assert_eq!(
                    &c_w.bytes()[i * n..(i + 1) * n],
                    &c_s.bytes()[i * n..(i + 1) * n],
                    "contiguous row {i} {what}"
                );
            }
        }
        assert_eq!(m_w.bytes(), m_s.bytes(), "masked {what}");
    }
}

#[test]
fn out_of_range_indices_are_reported() {
    let Some(w) = make(WgpuOptions::default()) else {
        return;
    };
    let b = up(&w, &host(DType::F32, &[2, 3, 4], &[0.5; 24]));
    let a = up(&w, &host(DType::F32, &[3, 4], &[1.0; 12]));
    let idx = up(&w, &HostTensor::from_i32(&[3], &[0, 2, -1]));
    let mut d = poisoned(&w, DType::F32, &[3, 3]);
    ops::run(
        &w,
        GemmGroupedContiguous {
            a: &a,
            b: &b,
            m_indices: &idx,
            d: &mut d,
        },
    )
    .expect("recorded");
    let e = w.synchronize().expect_err("group 2 of 2");
    assert_index_error(
        "contiguous",
        e,
        ("gemm_grouped_contiguous", "m_indices"),
        &[1],
        2,
        None,
    );
    let a3 = up(&w, &host(DType::F32, &[2, 2, 4], &[1.0; 16]));
    let mm = up(&w, &HostTensor::from_i64(&[2], &[1, 3]));
    let mut d3 = poisoned(&w, DType::F32, &[2, 2, 3]);
    ops::run(
        &w,
        GemmGroupedMasked {
            a: &a3,
            b: &b,
            masked_m: &mm,
            d: &mut d3,
        },
    )
    .expect("recorded");
    let e = w.synchronize().expect_err("masked_m 3 > m_max 2");
    assert_index_error(
        "masked",
        e,
        ("gemm_grouped_masked", "masked_m"),
        &[1],
        3,
        None,
    );
}
