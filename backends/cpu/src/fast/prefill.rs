//! MLA prefill (SPEC.md §5) in f32: the products and their sums in f32
//! (eight running sums per dot, so the compiler vectorizes them), the
//! softmax in f64, one rounding to `out`'s dtype; rows `(t, h)` in parallel.
//!
//! Naive form: per head, `K_nope = W_UK·c` and `V = W_UV·c` for every
//! cached position first (in parallel over head × position), then per row
//! the causal softmax over `q_nope·K_nope + q_pe·k_pe`. Absorbed form: per
//! row, `q_lat = q_nope·W_UK`, scores `q_lat·c + q_pe·k_pe`, `o_lat = Σ p·c`,
//! `out = W_UV·o_lat`.

use super::{bytes_mut_of, encode_into, f32_values};
use deepport_core::ops::*;
use deepport_core::Result;
use rayon::prelude::*;

/// `Σ x·y` in f32 with eight interleaved sums.
#[inline]
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

/// `o += p·x`.
#[inline]
fn axpy(o: &mut [f32], p: f32, x: &[f32]) {
    for (a, &b) in o.iter_mut().zip(x) {
        *a += p * b;
    }
}

/// Softmax of `scores` (already scaled), in f64, as f32 weights.
fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&x| (x / sum) as f32).collect()
}

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
