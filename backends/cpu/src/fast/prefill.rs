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

use super::simd::{Simd, Tile, MR_MAX, NR_MAX};
use super::{bytes_mut_of, encode_into, f32_values};
use deepport_core::ops::*;
use deepport_core::Result;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

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

/// `[cols][rows_pad]` from `[rows][cols]` (zero past `rows`), in 16 × 16
/// blocks (a row-at-a-time transpose writes one value per cache line of a
/// 512-wide matrix).
fn transpose_pad(x: &[f32], rows: usize, cols: usize, rows_pad: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut t = vec![0f32; rows_pad * cols];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let src = &x[r * cols..][c0..(c0 + T).min(cols)];
                for (c, &v) in (c0..).zip(src) {
                    t[c * rows_pad + r] = v;
                }
            }
        }
    }
    t
}

/// `[rows][cols_pad]` from `[rows][cols]`: in place when `cols` is already
/// `cols_pad`, else a copy with zero columns appended.
fn pad_cols(x: &[f32], rows: usize, cols: usize, cols_pad: usize) -> Cow<'_, [f32]> {
    if cols == cols_pad {
        return Cow::Borrowed(&x[..rows * cols]);
    }
    let mut v = vec![0f32; rows * cols_pad];
    for (dst, src) in v
        .chunks_exact_mut(cols_pad)
        .zip(x.chunks_exact(cols.max(1)))
    {
        dst[..cols].copy_from_slice(src);
    }
    Cow::Owned(v)
}

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

/// The absorbed form's operands, laid out once per call as the register
/// tile's B side (`[k][n]` rows, `n` padded to the tile width `nr`).
struct Absorbed<'a> {
    nr: usize,
    /// `dc` rounded up to `nr`; `S` rounded up to `nr`; `dv` likewise.
    dcp: usize,
    sp: usize,
    dvp: usize,
    /// Per head, `W_UK` as `[dn][dcp]`.
    wuk: Vec<Cow<'a, [f32]>>,
    /// The latent transposed, `[dc][sp]`, and the rope key, `[dr][sp]`.
    lat_t: Vec<f32>,
    kpe_t: Vec<f32>,
    /// The latent as `[S][dcp]`.
    lat: Cow<'a, [f32]>,
    /// Per head, `W_UV` transposed, `[dc][dvp]` (kept with `wkv_b`).
    wuv_t: Arc<Vec<Vec<f32>>>,
    /// Zeros for the A rows past the last token.
    zeros: Vec<f32>,
}

impl<'a> Absorbed<'a> {
    /// `wkv_b` is the weight tensor `c.w` was read from: the transposed
    /// `W_UV` is kept with it ([`crate::HostStorage::derived`]).
    fn new(c: &Inputs<'a>, wkv_b: &deepport_core::backend::Tensor, nr: usize) -> Result<Self> {
        let (dn, dc, dv, dr, n_s) = (c.dn, c.dc, c.dv, c.dr, c.n_s);
        let (dcp, sp, dvp) = (
            dc.next_multiple_of(nr),
            n_s.next_multiple_of(nr),
            dv.next_multiple_of(nr),
        );
        let head_rows = |h: usize, lo: usize, n: usize| {
            let r0 = h * (dn + dv) + lo;
            &c.w[r0 * dc..(r0 + n) * dc]
        };
        let wuk = (0..c.heads)
            .map(|h| pad_cols(head_rows(h, 0, dn), dn, dc, dcp))
            .collect();
        let make_wuv_t = || -> Vec<Vec<f32>> {
            (0..c.heads)
                .into_par_iter()
                .map(|h| transpose_pad(head_rows(h, dn, dv), dv, dc, dvp))
                .collect()
        };
        let key = crate::DerivedKey {
            offset: wkv_b.offset_bytes(),
            len: wkv_b.nbytes(),
            dtype: wkv_b.dtype(),
            kind: "mla_prefill W_UV transposed",
            params: [dn, dv, dc, nr],
        };
        let bytes = c.heads * dc * dvp * std::mem::size_of::<f32>();
        let wuv_t = match crate::storage(wkv_b)?.derived(key, bytes, make_wuv_t) {
            Some(kept) => kept,
            None => Arc::new(make_wuv_t()),
        };
        Ok(Absorbed {
            nr,
            dcp,
            sp,
            dvp,
            wuk,
            lat_t: transpose_pad(c.latent, n_s, dc, sp),
            kpe_t: transpose_pad(c.k_pe, n_s, dr, sp),
            lat: pad_cols(c.latent, n_s, dc, dcp),
            wuv_t,
            zeros: vec![0f32; dn.max(dr).max(dcp).max(sp)],
        })
    }
}

/// Absorbed form, one task: head `h`, tokens `[t0, t1)` (at most the
/// tile's `mr` rows), each step on the register tile (`Simd::tile`, fused
/// multiply-adds, sums in K order): `q_lat = q_nope·W_UK`, the scores
/// `(q_lat·c + q_pe·k_pe)·scale` over the keys the tile's last token sees,
/// the softmax per token (in f64, past its own position zero),
/// `o_lat = P·c`, and the rows `o_lat·W_UVᵀ`, `[t1 − t0][dv]`.
fn absorbed_task<'a>(
    c: &Inputs<'a>,
    ab: &'a Absorbed<'_>,
    simd: Simd,
    h: usize,
    t0: usize,
    t1: usize,
) -> Vec<f32> {
    let (heads, dn, dr, dc, dv, n_s) = (c.heads, c.dn, c.dr, c.dc, c.dv, c.n_s);
    let (mr, nr, dcp, sp, dvp) = (simd.mr(), ab.nr, ab.dcp, ab.sp, ab.dvp);
    let nt = t1 - t0;
    let zeros = &ab.zeros;
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
    // The A rows of the tile: rows of a `[mr][ld]` buffer, ...
    fn rows_of(buf: &[f32], ld: usize, mr: usize) -> [&[f32]; MR_MAX] {
        std::array::from_fn(|r| {
            if r < mr {
                &buf[r * ld..(r + 1) * ld]
            } else {
                &[]
            }
        })
    }
    // ... or this head's rows `[d]` of the tile's tokens (zeros past them).
    let q_rows = |x: &'a [f32], d: usize| -> [&'a [f32]; MR_MAX] {
        std::array::from_fn(|r| {
            if r < nt {
                &x[((t0 + r) * heads + h) * d..][..d]
            } else {
                &zeros[..d]
            }
        })
    };
    // q_lat = q_nope·W_UK, [mr][dcp].
    let mut q_lat = vec![0f32; mr * dcp];
    let a = q_rows(c.q_nope, dn);
    for j0 in (0..dcp).step_by(nr) {
        simd.tile(dn, &a, &ab.wuk[h][j0..], dcp, &mut tile);
        for (r, t) in tile.iter().enumerate().take(nt) {
            q_lat[r * dcp + j0..][..nr].copy_from_slice(&t[..nr]);
        }
    }
    // Scores over the keys [0, s_hi) the last token sees, [mr][sp].
    let s_hi = n_s - c.n_t + t1;
    let mut p = vec![0f32; mr * sp];
    let (aq, ap) = (rows_of(&q_lat, dcp, mr), q_rows(c.q_pe, dr));
    let mut pe: Tile = [[0f32; NR_MAX]; MR_MAX];
    for s0 in (0..s_hi).step_by(nr) {
        simd.tile(dc, &aq, &ab.lat_t[s0..], sp, &mut tile);
        simd.tile(dr, &ap, &ab.kpe_t[s0..], sp, &mut pe);
        for r in 0..nt {
            let dst = &mut p[r * sp + s0..][..nr];
            for ((d, &x), &y) in dst.iter_mut().zip(&tile[r][..nr]).zip(&pe[r][..nr]) {
                *d = (x + y) * c.scale;
            }
        }
    }
    // Softmax per token over its own keys; the rest of its row is zero.
    for r in 0..nt {
        let pos = n_s - c.n_t + t0 + r;
        let row = &mut p[r * sp..(r + 1) * sp];
        let w = softmax(&row[..=pos]);
        row[..=pos].copy_from_slice(&w);
        row[pos + 1..].fill(0.0);
    }
    // o_lat = P·c, [mr][dcp].
    let mut o_lat = vec![0f32; mr * dcp];
    let a = rows_of(&p, sp, mr);
    for j0 in (0..dcp).step_by(nr) {
        simd.tile(s_hi, &a, &ab.lat[j0..], dcp, &mut tile);
        for (r, t) in tile.iter().enumerate().take(nt) {
            o_lat[r * dcp + j0..][..nr].copy_from_slice(&t[..nr]);
        }
    }
    // The output rows o_lat·W_UVᵀ, [nt][dv].
    let mut o = vec![0f32; nt * dv];
    let a = rows_of(&o_lat, dcp, mr);
    for j0 in (0..dvp).step_by(nr) {
        simd.tile(dc, &a, &ab.wuv_t[h][j0..], dvp, &mut tile);
        let jn = nr.min(dv - j0);
        for (r, t) in tile.iter().enumerate().take(nt) {
            o[r * dv + j0..][..jn].copy_from_slice(&t[..jn]);
        }
    }
    o
}

super::simd::isa_dispatch!(fn naive_kv(c: &Inputs<'_>, hs: usize, row: &mut [f32]) = naive_kv_body);
super::simd::isa_dispatch!(
    fn naive_out(c: &Inputs<'_>, kv: &[f32], item: usize, o: &mut [f32]) = naive_out_body
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
                let ab = Absorbed::new(&c, a.wkv_b, simd.nr())?;
                // Tasks: (head, tile of `mr` tokens); each writes the rows
                // of its tokens for its head.
                let mr = simd.mr();
                let tiles = n_t.div_ceil(mr);
                let done: Vec<(usize, usize, Vec<f32>)> = (0..heads * tiles)
                    .into_par_iter()
                    .map(|task| {
                        let (h, tile) = (task / tiles, task % tiles);
                        let (t0, t1) = (tile * mr, ((tile + 1) * mr).min(n_t));
                        (h, t0, absorbed_task(&c, &ab, simd, h, t0, t1))
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
    //! The kernels against the one-dot-at-a-time forms they replaced: the
    //! naive form bit for bit; the absorbed form, which runs on the
    //! register tile (fused multiply-adds, other sums), within f32
    //! rounding of it.
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

    fn values(dtype: DType, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / dtype.size();
        HostTensor::from_bytes(dtype, &[n], bytes.to_vec())
            .unwrap()
            .to_f32_vec()
    }

    #[test]
    fn the_kernels_agree_with_the_one_at_a_time_forms() {
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
                let new = run(mla_prefill, dtype, dims, &vals, MlaForm::Naive);
                let old = run(
                    before::mla_prefill_one_at_a_time,
                    dtype,
                    dims,
                    &vals,
                    MlaForm::Naive,
                );
                assert!(new == old, "{dims:?} {dtype} naive: outputs differ");
                let new = values(
                    dtype,
                    &run(mla_prefill, dtype, dims, &vals, MlaForm::Absorbed),
                );
                let old = values(
                    dtype,
                    &run(
                        before::mla_prefill_one_at_a_time,
                        dtype,
                        dims,
                        &vals,
                        MlaForm::Absorbed,
                    ),
                );
                // f32: other sums of the same products; bf16: one output
                // rounding may land on the neighbouring value.
                let rms = (old.iter().map(|v| v * v).sum::<f32>() / old.len() as f32).sqrt();
                let tol = |r: f32| match dtype {
                    DType::F32 => 1e-5 * r.abs() + 1e-5 * rms,
                    _ => r.abs() / 128.0 + 1e-5 * rms,
                };
                for (i, (&x, &r)) in new.iter().zip(&old).enumerate() {
                    assert!(
                        (x - r).abs() <= tol(r),
                        "{dims:?} {dtype} absorbed: out[{i}] = {x}, the scalar form gives {r}"
                    );
                }
            }
        }
    }
}
