//! MLA reference ops: paged decode (SPEC.md §4) and prefill (SPEC.md §5).
//!
//! The specification of `cpu-ref`'s MLA: plain loops, one work item (one
//! query row of one head) after another, f64 accumulation, one rounding to
//! the output dtype. `crate::mla` computes the same arithmetic faster.

use crate::util::{f32s, i64s, put_f32, put_host};
use deepport_core::backend::Tensor;
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use half::{bf16, f16};

/// Rounds an f64 to f32 with round-to-odd (the result's last mantissa bit
/// is set when the conversion is inexact). A round-to-odd intermediate with
/// at least two spare bits makes the following round-to-nearest-even into
/// bf16 or f16 equal to a single correct rounding of the f64.
pub(crate) fn f64_to_f32_odd(x: f64) -> f32 {
    let f = x as f32;
    if !x.is_finite() || f64::from(f) == x || f.is_infinite() {
        return f;
    }
    // The neighbour of `x` toward zero on the f32 grid.
    let toward_zero = if f64::from(f).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// Encodes f64 values into `t`, rounding each once to `t`'s dtype.
pub(crate) fn put_f64(t: &mut Tensor, values: &[f64]) -> Result<()> {
    let bytes: Vec<u8> = match t.dtype() {
        DType::F32 => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(f64_to_f32_odd(v)).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(f64_to_f32_odd(v)).to_le_bytes())
            .collect(),
        _ => {
            let v: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            return put_f32(t, &v);
        }
    };
    let h = HostTensor::from_bytes(t.dtype(), t.shape(), bytes)?;
    put_host(t, &h)
}

/// Softmax-weighted statistics of one score row: returns the probabilities
/// and the natural-log logsumexp. The row must be non-empty.
pub(crate) fn softmax(scores: &[f64]) -> (Vec<f64>, f64) {
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|&s| (s - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    let p = e.iter().map(|&x| x / sum).collect();
    (p, m + sum.ln())
}

/// Reads `cache_seqlens` and `block_table` and checks every length and
/// every block index the lengths use, before any read of the cache.
pub(crate) fn decode_indices(
    a: &MlaDecode<'_>,
    dims: &MlaDecodeDims,
) -> Result<(Vec<i64>, Vec<i64>)> {
    const OP: &str = "mla_decode";
    let (num_blocks, block_size, max_blocks) = (dims.num_blocks, dims.block_size, dims.max_blocks);
    let seqlens = i64s(a.cache_seqlens)?;
    let table = i64s(a.block_table)?;
    let capacity = (max_blocks as i64).saturating_mul(block_size as i64);
    for (b, &len) in seqlens.iter().enumerate() {
        if len < 0 || len > capacity {
            return Err(Error::IndexOutOfRange {
                op: OP,
                arg: "cache_seqlens",
                position: vec![b],
                value: len,
                range: format!(
                    "[0, {capacity}] (max_blocks {max_blocks} × block_size {block_size})"
                ),
            });
        }
        let used = (len as usize).div_ceil(block_size);
        for j in 0..used {
            let blk = table[b * max_blocks + j];
            if blk < 0 || blk >= num_blocks as i64 {
                return Err(Error::IndexOutOfRange {
                    op: OP,
                    arg: "block_table",
                    position: vec![b, j],
                    value: blk,
                    range: format!("[0, {num_blocks}) (num_blocks)"),
                });
            }
        }
    }

    Ok((seqlens, table))
}

/// The specification of `mla_decode`: `cpu-ref`'s kernel must give these bytes.
pub fn mla_decode(op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
    let (a, dims) = op.parts();
    let MlaDecodeDims {
        batch,
        s_q,
        h_q,
        h_kv,
        d,
        dv,
        block_size,
        max_blocks,
        ..
    } = dims.clone();

    // Index checks come before any read of the cache.
    let (seqlens, table) = decode_indices(a, dims)?;

    let q = f32s(a.q)?;
    let kc = f32s(a.kcache)?;
    let scale = f64::from(a.softmax_scale);
    let causal = a.causal;
    let group = h_q / h_kv;

    // One work item per (b, s, h), in the order of `out`'s layout.
    let rows = (0..batch * s_q * h_q)
        .map(|item| {
            let h = item % h_q;
            let s = (item / h_q) % s_q;
            let b = item / (h_q * s_q);
            let kvh = h / group;
            let seqlen = seqlens[b] as usize;
            let visible = if causal {
                seqlen.saturating_sub(s_q - 1 - s)
            } else {
                seqlen
            };
            if visible == 0 {
                return (vec![0.0f64; dv], f64::INFINITY);
            }
            let key = |t: usize| -> &[f32] {
                let blk = table[b * max_blocks + t / block_size] as usize;
                let off = ((blk * block_size + t % block_size) * h_kv + kvh) * d;
                &kc[off..off + d]
            };
            let qrow = &q[item * d..(item + 1) * d];
            let scores: Vec<f64> = (0..visible)
                .map(|t| {
                    let k = key(t);
                    let dot: f64 = qrow
                        .iter()
                        .zip(k)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum();
                    dot * scale
                })
                .collect();
            let (p, lse) = softmax(&scores);
            let mut o = vec![0.0f64; dv];
            for (t, &pt) in p.iter().enumerate() {
                let k = key(t);
                for (oc, &kv) in o.iter_mut().zip(&k[..dv]) {
                    *oc += pt * f64::from(kv);
                }
            }
            (o, lse)
        })
        .collect::<Vec<_>>();

    let mut out = Vec::with_capacity(batch * s_q * h_q * dv);
    let mut lse = vec![0.0f64; batch * h_q * s_q];
    for (item, (o, l)) in rows.into_iter().enumerate() {
        out.extend_from_slice(&o);
        let h = item % h_q;
        let s = (item / h_q) % s_q;
        let b = item / (h_q * s_q);
        lse[(b * h_q + h) * s_q + s] = l;
    }
    put_f64(a.out, &out)?;
    put_f64(a.lse, &lse)
}

/// The specification of `mla_prefill`: `cpu-ref`'s kernel must give these bytes.
pub fn mla_prefill(op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    mla_prefill_with(op, |heads, f| (0..heads).map(f).collect())
}

/// [`mla_prefill`] with the map over heads given: `map(heads, f)` returns
/// `f(h)` for every head in order (one after another here; `cpu-ref` runs
/// the heads on several threads with the same per-head code).
pub(crate) fn mla_prefill_with(
    op: &mut Checked<MlaPrefill<'_>>,
    map: impl FnOnce(usize, &(dyn Fn(usize) -> Vec<f64> + Sync)) -> Vec<Vec<f64>>,
) -> Result<()> {
    let (a, dims) = op.parts();
    let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let inputs = PrefillInputs {
        q_nope: to64(f32s(a.q_nope)?),
        q_pe: to64(f32s(a.q_pe)?),
        latent: to64(f32s(a.latent)?),
        k_pe: to64(f32s(a.k_pe)?),
        wkv_b: to64(f32s(a.wkv_b)?),
    };
    let out = prefill_f64(dims, &inputs, f64::from(a.softmax_scale), a.form, map);
    put_f64(a.out, &out)
}

/// The inputs of [`mla_prefill`], widened to f64.
struct PrefillInputs {
    q_nope: Vec<f64>,
    q_pe: Vec<f64>,
    latent: Vec<f64>,
    k_pe: Vec<f64>,
    wkv_b: Vec<f64>,
}

/// MLA prefill in f64 before the final rounding: `out [T, H, dv]`.
fn prefill_f64(
    dims: &MlaPrefillDims,
    x: &PrefillInputs,
    scale: f64,
    form: MlaForm,
    map: impl FnOnce(usize, &(dyn Fn(usize) -> Vec<f64> + Sync)) -> Vec<Vec<f64>>,
) -> Vec<f64> {
    let MlaPrefillDims {
        t: n_t,
        s: n_s,
        heads,
        dn,
        dr,
        dc,
        dv,
    } = dims.clone();
    let (q_nope, q_pe, latent, k_pe, w) = (&x.q_nope, &x.q_pe, &x.latent, &x.k_pe, &x.wkv_b);
    let dot = |x: &[f64], y: &[f64]| -> f64 { x.iter().zip(y).map(|(a, b)| a * b).sum() };
    // Row `i` of W_UK (i < dn) or W_UV (dn <= i < dn + dv) of head `h`.
    let w_row = |h: usize, i: usize| -> &[f64] {
        let r = h * (dn + dv) + i;
        &w[r * dc..(r + 1) * dc]
    };
    let lat = |s: usize| &latent[s * dc..(s + 1) * dc];
    let kpe = |s: usize| &k_pe[s * dr..(s + 1) * dr];

    // One work item per head: [T, dv] outputs.
    let head = |h: usize| {
        let mut res = vec![0.0f64; n_t * dv];
        match form {
            MlaForm::Naive => {
                let k_nope: Vec<Vec<f64>> = (0..n_s)
                    .map(|s| (0..dn).map(|i| dot(w_row(h, i), lat(s))).collect())
                    .collect();
                let v: Vec<Vec<f64>> = (0..n_s)
                    .map(|s| (0..dv).map(|i| dot(w_row(h, dn + i), lat(s))).collect())
                    .collect();
                for t in 0..n_t {
                    let qn = &q_nope[(t * heads + h) * dn..][..dn];
                    let qp = &q_pe[(t * heads + h) * dr..][..dr];
                    let pos = n_s - n_t + t;
                    let scores: Vec<f64> = (0..=pos)
                        .map(|s| (dot(qn, &k_nope[s]) + dot(qp, kpe(s))) * scale)
                        .collect();
                    let (p, _) = softmax(&scores);
                    let o = &mut res[t * dv..(t + 1) * dv];
                    for (s, &ps) in p.iter().enumerate() {
                        for (oc, &vc) in o.iter_mut().zip(&v[s]) {
                            *oc += ps * vc;
                        }
                    }
                }
            }
            MlaForm::Absorbed => {
                for t in 0..n_t {
                    let qn = &q_nope[(t * heads + h) * dn..][..dn];
                    let qp = &q_pe[(t * heads + h) * dr..][..dr];
                    let mut q_lat = vec![0.0f64; dc];
                    for (i, &qi) in qn.iter().enumerate() {
                        for (ql, &wc) in q_lat.iter_mut().zip(w_row(h, i)) {
                            *ql += qi * wc;
                        }
                    }
                    let pos = n_s - n_t + t;
                    let scores: Vec<f64> = (0..=pos)
                        .map(|s| (dot(&q_lat, lat(s)) + dot(qp, kpe(s))) * scale)
                        .collect();
                    let (p, _) = softmax(&scores);
                    let mut o_lat = vec![0.0f64; dc];
                    for (s, &ps) in p.iter().enumerate() {
                        for (ol, &c) in o_lat.iter_mut().zip(lat(s)) {
                            *ol += ps * c;
                        }
                    }
                    for i in 0..dv {
                        res[t * dv + i] = dot(w_row(h, dn + i), &o_lat);
                    }
                }
            }
        }
        res
    };
    let per_head = map(heads, &head);

    let mut out = vec![0.0f64; n_t * heads * dv];
    for (h, res) in per_head.iter().enumerate() {
        for t in 0..n_t {
            out[(t * heads + h) * dv..][..dv].copy_from_slice(&res[t * dv..(t + 1) * dv]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(heads: usize, f: &(dyn Fn(usize) -> Vec<f64> + Sync)) -> Vec<Vec<f64>> {
        (0..heads).map(f).collect()
    }

    #[test]
    fn prefill_forms_agree_in_f64() {
        let dims = MlaPrefillDims {
            t: 4,
            s: 7,
            heads: 2,
            dn: 8,
            dr: 4,
            dc: 12,
            dv: 6,
        };
        let mut state: u64 = 12345;
        let mut vals = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                })
                .collect()
        };
        let x = PrefillInputs {
            q_nope: vals(4 * 2 * 8),
            q_pe: vals(4 * 2 * 4),
            latent: vals(7 * 12),
            k_pe: vals(7 * 4),
            wkv_b: vals(2 * (8 + 6) * 12),
        };
        let naive = prefill_f64(&dims, &x, 0.3, MlaForm::Naive, seq);
        let absorbed = prefill_f64(&dims, &x, 0.3, MlaForm::Absorbed, seq);
        let norm = naive.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(norm > 0.1);
        for (a, b) in naive.iter().zip(&absorbed) {
            assert!((a - b).abs() <= 1e-12 * norm, "naive {a} vs absorbed {b}");
        }
    }

    /// Correct bf16 rounding of an f64, by searching the neighbours of the
    /// double-rounded result.
    fn bf16_exact(x: f64) -> u16 {
        let bits = bf16::from_f32(x as f32).to_bits();
        let cands = [bits.wrapping_sub(1), bits, bits.wrapping_add(1)];
        let mut best = bits;
        let mut best_err = f64::INFINITY;
        for c in cands {
            let v = f64::from(bf16::from_bits(c).to_f32());
            if !v.is_finite() {
                continue;
            }
            let err = (v - x).abs();
            if err < best_err || (err == best_err && c % 2 == 0) {
                best_err = err;
                best = c;
            }
        }
        best
    }

    #[test]
    fn round_once_to_bf16() {
        // 1 + 2^-8 is a bf16 tie; adding 2^-40 (lost in f32) must round up.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        let once = bf16::from_f32(f64_to_f32_odd(x)).to_bits();
        assert_eq!(once, bf16::from_f32(1.0 + 2f32.powi(-7)).to_bits());
        // The naive double rounding (f64 → f32 → bf16) gets it wrong.
        let twice = bf16::from_f32(x as f32).to_bits();
        assert_ne!(once, twice);
        let mut s: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 11) as f64 / (1u64 << 53) as f64;
            let x = (m - 0.5) * 2f64.powi((s % 40) as i32 - 20);
            assert_eq!(bf16::from_f32(f64_to_f32_odd(x)).to_bits(), bf16_exact(x));
        }
    }
}
