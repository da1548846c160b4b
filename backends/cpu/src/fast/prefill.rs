//! MLA prefill (SPEC.md §5) in f32: the products and their sums in f32
//! (eight running sums per dot, so the compiler vectorizes them), the
//! softmax in f64, one rounding to `out`'s dtype; rows `(t, h)` in parallel.
//!
//! Naive form: per head, `K_nope = W_UK·c` and `V = W_UV·c` for every
//! cached position first (in parallel over head × position), then per row
//! the causal softmax over `q_nope·K_nope + q_pe·k_pe`. Absorbed form: per
//! row, `q_lat = q_nope·W_UK`, scores `q_lat·c + q_pe·k_pe`, `o_lat = Σ p·c`,
//! `out = W_UV·o_lat`.
//!
//! The absorbed form runs per head on tiles of [`TILE`] tokens, so that a
//! row of `W_UK` is read once for the tile's `q_nope·W_UK`, and computes
//! the scores and the `W_UV` rows as [`dots_cols`] over transposed
//! operands: every output's sums are still exactly those of [`dot`] (same
//! products, same order, same final combination), only the independent
//! outputs advance together, so not a bit changes (a test keeps the
//! one-dot-at-a-time kernel and compares bytes).

use super::{bytes_mut_of, encode_into, f32_values};
use deepport_core::ops::*;
use deepport_core::Result;
use rayon::prelude::*;

/// `Σ x·y` in f32 with eight interleaved sums.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut tail = 0f32;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `out[i] = Σ x_i·y` for `i < n`, each by [`dot`].
#[inline(always)]
fn dot_many<'a>(xs: impl Fn(usize) -> &'a [f32], n: usize, y: &[f32], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate().take(n) {
        *o = dot(xs(i), y);
    }
}

/// `out[i] = Σ_c xt[c·stride + i]·y[c]` for `i < n`: the dot products of
/// `y` with the columns of a transposed matrix, each exactly as [`dot`]
/// computes it — the sums of the eight phases `c mod 8` in `c` order, the
/// tail past the last multiple of 8 on its own, the same final order — but
/// run as row updates across the `n` outputs (vectorizable, no latency
/// chain). `acc` is scratch.
#[inline(always)]
fn dots_cols(xt: &[f32], stride: usize, n: usize, y: &[f32], acc: &mut Vec<f32>, out: &mut [f32]) {
    dots_cols_batch(xt, stride, n, &[y], acc, out);
}

/// [`dots_cols`] for several vectors `ys` (of one length) at once: row
/// `c` of `xt` is read once for all of them (`W_UV`, 256 KB per head, was
/// streamed from L2 once per token). `out` holds `ys.len()` rows of `n`;
/// each is exactly what [`dots_cols`] computes for its vector.
#[inline(always)]
fn dots_cols_batch(
    xt: &[f32],
    stride: usize,
    n: usize,
    ys: &[&[f32]],
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let m = ys.len();
    let Some(len) = ys.first().map(|y| y.len()) else {
        return;
    };
    let full = len - len % 8;
    acc.clear();
    acc.resize(m * 9 * n, 0.0);
    // Per vector t: its eight phases, then its tail, `[t][9][n]`.
    for c in 0..len {
        let x = &xt[c * stride..c * stride + n];
        let p = if c < full { c % 8 } else { 8 };
        for (t, y) in ys.iter().enumerate() {
            let yc = y[c];
            let a = &mut acc[(t * 9 + p) * n..(t * 9 + p + 1) * n];
            for (o, &xv) in a.iter_mut().zip(x) {
                *o += xv * yc;
            }
        }
    }
    for (t, o_row) in out.chunks_exact_mut(n.max(1)).enumerate().take(m) {
        let ph = &acc[t * 9 * n..(t + 1) * 9 * n];
        for (i, o) in o_row.iter_mut().enumerate().take(n) {
            let a = |p: usize| ph[p * n + i];
            *o = ((a(0) + a(4)) + (a(1) + a(5))) + ((a(2) + a(6)) + (a(3) + a(7))) + a(8);
        }
    }
}

/// `[cols, rows]` from `[rows, cols]`, in 16 × 16 blocks (a row-at-a-time
/// transpose writes one value per cache line of a 512-wide matrix).
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut t = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let src = &x[r * cols..][c0..(c0 + T).min(cols)];
                for (c, &v) in (c0..).zip(src) {
                    t[c * rows + r] = v;
                }
            }
        }
    }
    t
}

/// Tokens of one head per task in the absorbed form.
const TILE: usize = 8;

/// `o += p·x`.
#[inline(always)]
fn axpy(o: &mut [f32], p: f32, x: &[f32]) {
    for (a, &b) in o.iter_mut().zip(x) {
        *a += p * b;
    }
}

/// Softmax of `scores` (already scaled), in f64, as f32 weights.
#[inline(always)]
fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&x| (x / sum) as f32).collect()
}

/// The operands of one call (f32, read in place or decoded once).
struct Inputs<'a> {
    q_nope: &'a [f32],
    q_pe: &'a [f32],
    latent: &'a [f32],
    k_pe: &'a [f32],
    w: &'a [f32],
    n_t: usize,
    n_s: usize,
    heads: usize,
    dn: usize,
    dr: usize,
    dc: usize,
    dv: usize,
    scale: f32,
}

impl Inputs<'_> {
    /// Row `i` of W_UK (i < dn) or W_UV (dn <= i < dn + dv) of head `h`.
    #[inline(always)]
    fn w_row(&self, h: usize, i: usize) -> &[f32] {
        let r = h * (self.dn + self.dv) + i;
        &self.w[r * self.dc..(r + 1) * self.dc]
    }
    #[inline(always)]
    fn lat(&self, s: usize) -> &[f32] {
        &self.latent[s * self.dc..(s + 1) * self.dc]
    }
    #[inline(always)]
    fn kpe(&self, s: usize) -> &[f32] {
        &self.k_pe[s * self.dr..(s + 1) * self.dr]
    }
}

/// Naive form, row `hs = h·S + s` of `[H, S, dn + dv]`: K_nope then V of
/// cached position `s` for head `h`.
#[inline(always)]
fn naive_kv_body(c: &Inputs<'_>, hs: usize, row: &mut [f32]) {
    let (h, s) = (hs / c.n_s.max(1), hs % c.n_s.max(1));
    let kv_len = c.dn + c.dv;
    dot_many(|i| c.w_row(h, i), kv_len, c.lat(s), row);
}

/// Naive form, the output row of `item = t·H + h`.
#[inline(always)]
fn naive_out_body(c: &Inputs<'_>, kv: &[f32], item: usize, o: &mut [f32]) {
    let (dn, dr, kv_len) = (c.dn, c.dr, c.dn + c.dv);
    let (t, h) = (item / c.heads, item % c.heads);
    let qn = &c.q_nope[item * dn..][..dn];
    let qp = &c.q_pe[item * dr..][..dr];
    let pos = c.n_s - c.n_t + t;
    let kvh = |s: usize| &kv[(h * c.n_s + s) * kv_len..][..kv_len];
    let scores: Vec<f32> = (0..=pos)
        .map(|s| (dot(qn, &kvh(s)[..dn]) + dot(qp, c.kpe(s))) * c.scale)
        .collect();
    for (s, &p) in softmax(&scores).iter().enumerate() {
        axpy(o, p, &kvh(s)[dn..]);
    }
}

/// Absorbed form, one task: head `h`, tokens `[t0, t1)` of tile
/// `task % tiles`; the rows of its tokens for its head.
#[inline(always)]
fn absorbed_body(
    c: &Inputs<'_>,
    lat_t: &[f32],
    kpe_t: &[f32],
    wuv_t: &[f32],
    h: usize,
    t0: usize,
    t1: usize,
) -> Vec<f32> {
    let (heads, dn, dr, dc, dv, n_s) = (c.heads, c.dn, c.dr, c.dc, c.dv, c.n_s);
    let nt = t1 - t0;
    // q_lat = q_nope·W_UK per token, W_UK's rows in order.
    let mut q_lat = vec![0f32; nt * dc];
    for i in 0..dn {
        let wr = c.w_row(h, i);
        for (tt, ql) in q_lat.chunks_exact_mut(dc.max(1)).enumerate() {
            let qi = c.q_nope[((t0 + tt) * heads + h) * dn + i];
            axpy(ql, qi, wr);
        }
    }
    let mut o_rows = vec![0f32; nt * dv];
    // Each token's attention output in the latent space, `[nt][dc]`.
    let mut o_lats = vec![0f32; nt * dc];
    let (mut scores, mut pe, mut acc) = (Vec::new(), Vec::new(), Vec::new());
    for (tt, o_lat) in o_lats.chunks_exact_mut(dc.max(1)).enumerate().take(nt) {
        let t = t0 + tt;
        let item = t * heads + h;
        let ql = &q_lat[tt * dc..(tt + 1) * dc];
        let qp = &c.q_pe[item * dr..][..dr];
        let pos = n_s - c.n_t + t;
        scores.clear();
        scores.resize(pos + 1, 0f32);
        pe.clear();
        pe.resize(pos + 1, 0f32);
        dots_cols(lat_t, n_s, pos + 1, ql, &mut acc, &mut scores);
        dots_cols(kpe_t, n_s, pos + 1, qp, &mut acc, &mut pe);
        for (sc, &p) in scores.iter_mut().zip(&pe) {
            *sc = (*sc + p) * c.scale;
        }
        for (s, &p) in softmax(&scores).iter().enumerate() {
            axpy(o_lat, p, c.lat(s));
        }
    }
    // The output rows: W_UV applied to every token's o_lat in one pass.
    let ys: Vec<&[f32]> = o_lats.chunks_exact(dc.max(1)).take(nt).collect();
    dots_cols_batch(wuv_t, dv, dv, &ys, &mut acc, &mut o_rows);
    o_rows
}

super::simd::isa_dispatch!(fn naive_kv(c: &Inputs<'_>, hs: usize, row: &mut [f32]) = naive_kv_body);
super::simd::isa_dispatch!(
    fn naive_out(c: &Inputs<'_>, kv: &[f32], item: usize, o: &mut [f32]) = naive_out_body
);
super::simd::isa_dispatch!(
    #[allow(clippy::too_many_arguments)]
    fn absorbed(
        c: &Inputs<'_>,
        lat_t: &[f32],
        kpe_t: &[f32],
        wuv_t: &[f32],
        h: usize,
        t0: usize,
        t1: usize,
    ) -> Vec<f32> = absorbed_body
);

pub(crate) fn mla_prefill(op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let MlaPrefillDims {
        t: n_t,
        s: n_s,
        heads,
        dn,
        dr,
        dc,
        dv,
    } = dims.clone();
    // The kernels are compiled per instruction set (same bits under each).
    let simd = super::current_simd();
    // Read in place (f32) or decoded once.
    let q_nope = f32_values(a.q_nope)?;
    let q_pe = f32_values(a.q_pe)?;
    let latent = f32_values(a.latent)?;
    let k_pe = f32_values(a.k_pe)?;
    let w = f32_values(a.wkv_b)?;
    let c = Inputs {
        q_nope: &q_nope,
        q_pe: &q_pe,
        latent: &latent,
        k_pe: &k_pe,
        w: &w,
        n_t,
        n_s,
        heads,
        dn,
        dr,
        dc,
        dv,
        scale: a.softmax_scale,
    };
    let mut out = vec![0f32; n_t * heads * dv];
    if dv > 0 {
        match a.form {
            MlaForm::Naive => {
                // [H, S, dn + dv]: K_nope then V of each cached position.
                let kv_len = dn + dv;
                let mut kv = vec![0f32; heads * n_s * kv_len];
                if kv_len > 0 {
                    kv.par_chunks_mut(kv_len)
                        .enumerate()
                        .for_each(|(hs, row)| naive_kv(simd, &c, hs, row));
                }
                out.par_chunks_mut(dv)
                    .enumerate()
                    .for_each(|(item, o)| naive_out(simd, &c, &kv, item, o));
            }
            MlaForm::Absorbed => {
                // Transposed once per call: the latent and rope key
                // ([dc, S], [dr, S]) and each head's W_UV ([dc, dv]), so that
                // scores and output rows run as `dots_cols`.
                let lat_t = transpose(&latent, n_s, dc);
                let kpe_t = transpose(&k_pe, n_s, dr);
                let wuv_t: Vec<Vec<f32>> = (0..heads)
                    .into_par_iter()
                    .map(|h| {
                        let r0 = h * (dn + dv) + dn;
                        transpose(&w[r0 * dc..(r0 + dv) * dc], dv, dc)
                    })
                    .collect();
                // Tasks: (head, tile of TILE tokens); each writes the rows
                // of its tokens for its head.
                let tiles = n_t.div_ceil(TILE);
                let done: Vec<(usize, usize, Vec<f32>)> = (0..heads * tiles)
                    .into_par_iter()
                    .map(|task| {
                        let (h, tile) = (task / tiles, task % tiles);
                        let (t0, t1) = (tile * TILE, ((tile + 1) * TILE).min(n_t));
                        let rows = absorbed(simd, &c, &lat_t, &kpe_t, &wuv_t[h], h, t0, t1);
                        (h, t0, rows)
                    })
                    .collect();
                for (h, t0, rows) in done {
                    for (tt, r) in rows.chunks_exact(dv).enumerate() {
                        let item = (t0 + tt) * heads + h;
                        out[item * dv..(item + 1) * dv].copy_from_slice(r);
                    }
                }
            }
        }
    }
    let dtype = a.out.dtype();
    encode_into(dtype, &out, bytes_mut_of(a.out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The tiled kernel against the one-dot-at-a-time form it
    //! replaced: bit for bit.
    use super::*;
    use deepport_core::backend::{Backend, Tensor};
    use deepport_core::{DType, HostTensor};

    mod before {
        use super::super::{axpy, bytes_mut_of, dot, encode_into, f32_values, softmax};
        use deepport_core::ops::*;
        use deepport_core::Result;
        use rayon::prelude::*;

        #[allow(dead_code)]
        pub(super) fn mla_prefill_one_at_a_time(op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
            let (a, dims) = op.parts();
            let MlaPrefillDims {
                t: n_t,
                s: n_s,
                heads,
                dn,
                dr,
                dc,
                dv,
            } = dims.clone();
            let q_nope = f32_values(a.q_nope)?;
            let q_pe = f32_values(a.q_pe)?;
            let latent = f32_values(a.latent)?;
            let k_pe = f32_values(a.k_pe)?;
            let w = f32_values(a.wkv_b)?;
            let scale = a.softmax_scale;
            // Row `i` of W_UK (i < dn) or W_UV (dn <= i < dn + dv) of head `h`.
            let w_row = |h: usize, i: usize| -> &[f32] {
                let r = h * (dn + dv) + i;
                &w[r * dc..(r + 1) * dc]
            };
            let lat = |s: usize| &latent[s * dc..(s + 1) * dc];
            let kpe = |s: usize| &k_pe[s * dr..(s + 1) * dr];
            let mut out = vec![0f32; n_t * heads * dv];
            if dv > 0 {
                match a.form {
                    MlaForm::Naive => {
                        // [H, S, dn + dv]: K_nope then V of each cached position.
                        let kv_len = dn + dv;
                        let mut kv = vec![0f32; heads * n_s * kv_len];
                        if kv_len > 0 {
                            kv.par_chunks_mut(kv_len).enumerate().for_each(|(hs, row)| {
                                let (h, s) = (hs / n_s.max(1), hs % n_s.max(1));
                                for (i, o) in row.iter_mut().enumerate() {
                                    *o = dot(w_row(h, i), lat(s));
                                }
                            });
                        }
                        out.par_chunks_mut(dv).enumerate().for_each(|(item, o)| {
                            let (t, h) = (item / heads, item % heads);
                            let qn = &q_nope[item * dn..][..dn];
                            let qp = &q_pe[item * dr..][..dr];
                            let pos = n_s - n_t + t;
                            let kvh = |s: usize| &kv[(h * n_s + s) * kv_len..][..kv_len];
                            let scores: Vec<f32> = (0..=pos)
                                .map(|s| (dot(qn, &kvh(s)[..dn]) + dot(qp, kpe(s))) * scale)
                                .collect();
                            for (s, &p) in softmax(&scores).iter().enumerate() {
                                axpy(o, p, &kvh(s)[dn..]);
                            }
                        });
                    }
                    MlaForm::Absorbed => {
                        out.par_chunks_mut(dv).enumerate().for_each(|(item, o)| {
                            let (t, h) = (item / heads, item % heads);
                            let qn = &q_nope[item * dn..][..dn];
                            let qp = &q_pe[item * dr..][..dr];
                            let mut q_lat = vec![0f32; dc];
                            for (i, &qi) in qn.iter().enumerate() {
                                axpy(&mut q_lat, qi, w_row(h, i));
                            }
                            let pos = n_s - n_t + t;
                            let scores: Vec<f32> = (0..=pos)
                                .map(|s| (dot(&q_lat, lat(s)) + dot(qp, kpe(s))) * scale)
                                .collect();
                            let mut o_lat = vec![0f32; dc];
                            for (s, &p) in softmax(&scores).iter().enumerate() {
                                axpy(&mut o_lat, p, lat(s));
                            }
                            for (i, oi) in o.iter_mut().enumerate() {
                                *oi = dot(w_row(h, dn + i), &o_lat);
                            }
                        });
                    }
                }
            }
            let dtype = a.out.dtype();
            encode_into(dtype, &out, bytes_mut_of(a.out)?);
            Ok(())
        }
    }

    fn run(
        f: fn(&mut Checked<MlaPrefill<'_>>) -> Result<()>,
        dtype: DType,
        dims: (usize, usize, usize, usize, usize, usize, usize),
        vals: &[Vec<f32>; 5],
        form: MlaForm,
    ) -> Vec<u8> {
        let be = crate::Cpu::new();
        let (t, s, h, dn, dr, dc, dv) = dims;
        let shapes: [Vec<usize>; 5] = [
            vec![t, h, dn],
            vec![t, h, dr],
            vec![s, dc],
            vec![s, dr],
            vec![h * (dn + dv), dc],
        ];
        let up: Vec<Tensor> = shapes
            .iter()
            .zip(vals)
            .map(|(sh, v)| be.upload(&HostTensor::from_f32(dtype, sh, v)).unwrap())
            .collect();
        let mut out = be.alloc(dtype, &[t, h, dv]).unwrap();
        {
            let mut op = (MlaPrefill {
                q_nope: &up[0],
                q_pe: &up[1],
                latent: &up[2],
                k_pe: &up[3],
                wkv_b: &up[4],
                out: &mut out,
                softmax_scale: 1.0 / ((dn + dr) as f32).sqrt(),
                form,
            })
            .check()
            .unwrap();
            f(&mut op).unwrap();
        }
        be.download(&out).unwrap().into_bytes()
    }

    #[test]
    fn tiled_kernel_equals_the_one_at_a_time_kernel_bit_for_bit() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut vec = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
                })
                .collect()
        };
        // Odd dims (tails of 8), S > T, T past one TILE, V3's dims.
        let cases = [
            (7, 12, 3, 33, 17, 65, 23),
            (5, 5, 2, 16, 8, 32, 16),
            (19, 23, 3, 9, 5, 13, 6),
            (1, 1, 1, 1, 1, 1, 1),
            (17, 17, 2, 128, 64, 512, 128),
        ];
        for &dims in &cases {
            let (t, s, h, dn, dr, dc, dv) = dims;
            let vals = [
                vec(t * h * dn, 1.0),
                vec(t * h * dr, 1.0),
                vec(s * dc, 1.0),
                vec(s * dr, 1.0),
                vec(h * (dn + dv) * dc, 0.1),
            ];
            for dtype in [DType::F32, DType::BF16] {
                for form in [MlaForm::Naive, MlaForm::Absorbed] {
                    let new = run(mla_prefill, dtype, dims, &vals, form);
                    let old = run(before::mla_prefill_one_at_a_time, dtype, dims, &vals, form);
                    assert!(new == old, "{dims:?} {dtype} {form:?}: outputs differ");
                }
            }
        }
    }
}
