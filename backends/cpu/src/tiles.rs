//! `cpu-ref`'s register tiles: `c[i][j] += a[k][i] · b[k][j]` for `k` in
//! order, one f64 chain per output element, over packed panels — the loop
//! the oracle's GEMMs and MLA decode spend their time in.
//!
//! The arithmetic never changes: every element of a tile gets its products
//! one at a time in `k` order, each a multiplication then an addition
//! (Rust never fuses them, and no reassociation happens), so every
//! instruction set gives the same bits as the scalar loops
//! (`tests/oracle_bitexact.rs` checks each one this CPU runs). What the
//! instruction set changes is how many independent tiles advance together:
//! the loop is compiled once per set (`#[target_feature]`) and runs
//! `GA × GB` tiles at a time — 3 × 1 with AVX-512 (a row of `NR = 8` f64
//! accumulators is one zmm register in the release build), 1 × 1 with
//! AVX2 (6 ymm; 2 × 1 needed 12 of the 16 and spilled three), 1 × 1 on the
//! baseline target (SSE2) — chosen at run time from the fast backend's
//! [`Simd`] (so `DEEPPORT_CPU_SIMD` and [`crate::fast::with_simd`] select
//! it too). Measured with `examples/oracle_speed --quick` on one thread of
//! the 2-vCPU Xeon (loaded): FP8 GEMM 128 × 2112 × 7168 at 3.1–3.5 GMAC
//! per CPU-second on the baseline, 5.0–6.1 with AVX2 (2 × 1), 6.9 with
//! AVX-512; MLA decode 2.8–3.4, 5.6–6.0 and 5.7–7.6. (2 × 2 with AVX-512
//! spilled: 2.0.) On a 2-vCPU AMD EPYC (Zen 2), `op_time` with
//! `OP_TIME_BACKEND=cpu-ref`, alternated: AVX2 1 × 1 against 2 × 1 is
//! 0.54–0.57 against 0.58–0.59 s for MLA decode b=16, h_q=128, s_k=4096
//! and 0.177–0.178 against 0.185–0.187 s for that FP8 GEMM.
//!
//! `unsafe` here: calling the `#[target_feature]` instances, after
//! checking that the CPU has the feature.
#![allow(unsafe_code)]

use crate::fast::Simd;

/// Rows of the register tile.
pub(crate) const MR: usize = 3;
/// Columns of the register tile (the vectorized direction).
pub(crate) const NR: usize = 8;

/// One register tile of accumulators.
pub(crate) type Tile = [[f64; NR]; MR];

/// `c[gi·ng + gj] += panel gi of a × panel gj of b` for `gi < mg`,
/// `gj < ng`: the A panels are `[kc][MR]`, `a_stride` apart; the B panels
/// `[kc][NR]`, `b_stride` apart. `simd` picks the compiled instance (read
/// it on the launching thread: [`crate::fast::current_simd`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn panels(
    simd: Simd,
    ap: &[f64],
    a_stride: usize,
    mg: usize,
    bp: &[f64],
    b_stride: usize,
    ng: usize,
    kc: usize,
    c: &mut [Tile],
) {
    let p = Panels {
        ap,
        a_stride,
        mg,
        bp,
        b_stride,
        ng,
        kc,
    };
    assert!(
        c.len() >= mg * ng,
        "tiles: {} tiles for {mg} x {ng}",
        c.len()
    );
    if kc == 0 {
        return;
    }
    assert!(
        mg == 0 || ap.len() >= (mg - 1) * a_stride + kc * MR,
        "tiles: A panels too short"
    );
    assert!(
        ng == 0 || bp.len() >= (ng - 1) * b_stride + kc * NR,
        "tiles: B panels too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(simd, Simd::Avx512 | Simd::Avx512Bf16) && Simd::Avx512.available() {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { run_avx512(&p, c) };
            return;
        }
        if simd == Simd::Avx2 && Simd::Avx2.available() {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { run_avx2(&p, c) };
            return;
        }
    }
    let _ = simd;
    run::<1, 1>(&p, c);
}

struct Panels<'a> {
    ap: &'a [f64],
    a_stride: usize,
    mg: usize,
    bp: &'a [f64],
    b_stride: usize,
    ng: usize,
    kc: usize,
}

impl Panels<'_> {
    fn a(&self, gi: usize) -> &[f64] {
        &self.ap[gi * self.a_stride..gi * self.a_stride + self.kc * MR]
    }
    fn b(&self, gj: usize) -> &[f64] {
        &self.bp[gj * self.b_stride..gj * self.b_stride + self.kc * NR]
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(p: &Panels<'_>, c: &mut [Tile]) {
    run::<3, 1>(p, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(p: &Panels<'_>, c: &mut [Tile]) {
    // 1 × 1: 2 × 1 needs 12 of the 16 ymm registers for its sums, and
    // LLVM spilled three of them (a store and a reload per step).
    run::<1, 1>(p, c)
}

/// Walks the panels `GA × GB` tiles at a time (edges one at a time).
#[inline(always)]
fn run<const GA: usize, const GB: usize>(p: &Panels<'_>, c: &mut [Tile]) {
    let ng = p.ng;
    let mut gj = 0;
    while gj < ng {
        let nb = GB.min(ng - gj);
        let mut gi = 0;
        while gi < p.mg {
            let na = GA.min(p.mg - gi);
            if na == GA && nb == GB {
                let a: [&[f64]; GA] = std::array::from_fn(|x| p.a(gi + x));
                let b: [&[f64]; GB] = std::array::from_fn(|y| p.b(gj + y));
                let mut acc: [[Tile; GB]; GA] =
                    std::array::from_fn(|x| std::array::from_fn(|y| c[(gi + x) * ng + gj + y]));
                multi::<GA, GB>(p.kc, &a, &b, &mut acc);
                for (x, row) in acc.iter().enumerate() {
                    for (y, t) in row.iter().enumerate() {
                        c[(gi + x) * ng + gj + y] = *t;
                    }
                }
            } else {
                for x in 0..na {
                    for y in 0..nb {
                        let mut acc = [[c[(gi + x) * ng + gj + y]]];
                        multi::<1, 1>(p.kc, &[p.a(gi + x)], &[p.b(gj + y)], &mut acc);
                        c[(gi + x) * ng + gj + y] = acc[0][0];
                    }
                }
            }
            gi += GA;
        }
        gj += GB;
    }
}

/// `acc[x][y][i][j] += a[x][kk·MR + i] · b[y][kk·NR + j]` for `kk < kc` in
/// order: the `GA × GB` tiles advance through `k` together.
#[inline(always)]
fn multi<const GA: usize, const GB: usize>(
    kc: usize,
    a: &[&[f64]; GA],
    b: &[&[f64]; GB],
    acc: &mut [[Tile; GB]; GA],
) {
    let mut t = *acc;
    for kk in 0..kc {
        let av: [&[f64; MR]; GA] =
            std::array::from_fn(|x| a[x][kk * MR..kk * MR + MR].try_into().expect("MR"));
        let bv: [&[f64; NR]; GB] =
            std::array::from_fn(|y| b[y][kk * NR..kk * NR + NR].try_into().expect("NR"));
        for x in 0..GA {
            for y in 0..GB {
                for i in 0..MR {
                    for j in 0..NR {
                        t[x][y][i][j] += av[x][i] * bv[y][j];
                    }
                }
            }
        }
    }
    *acc = t;
}
