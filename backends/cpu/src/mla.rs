//! `cpu-ref`'s MLA kernels: paged decode (SPEC.md §4) and prefill (SPEC.md
//! §5), with the arithmetic of [`crate::scalar::mla`].
//!
//! Decode: every query row keeps its scalar arithmetic (each score a dot
//! product summed in `d` order from −0.0, as `Iterator::sum` does, times
//! the scale; the same softmax; each output column summed in key order
//! from 0). The work is regrouped: one unit per (batch, KV head) runs on a
//! thread; within it the queries of all heads that share the KV head and
//! the keys (widened to f64 once) form two small GEMMs whose register
//! tiles ([`crate::tiles`]) advance independent dot products
//! together. Prefill runs its heads on several threads with the scalar
//! per-head code.
//!
//! Memory: the cache is read in place (each key decoded as it is packed),
//! and a thread's panels are reused from unit to unit ([`Scratch`]), so a
//! big case does not allocate and page-fault the cache's size again per
//! unit. Reused buffers are re-initialized to exactly the values a fresh
//! allocation had, so no bit changes (`tests/oracle_bitexact.rs`).

use crate::scalar::mla::{decode_indices, mla_prefill_with, put_f64, softmax};
use crate::tiles::{panels, MR, NR};
use crate::util::{f32s, par_map};
use deepport_core::ops::*;
use deepport_core::Result;
use std::cell::RefCell;

/// One thread's decode buffers, kept from unit to unit.
#[derive(Default)]
struct Scratch {
    kq: Vec<f64>,
    kv: Vec<f64>,
    qp: Vec<f64>,
    dots: Vec<[[f64; NR]; MR]>,
    pp: Vec<f64>,
    o: Vec<[[f64; NR]; MR]>,
    key: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `v` as `n` copies of `fill`, reusing its allocation.
fn fresh<T: Copy>(v: &mut Vec<T>, n: usize, fill: T) -> &mut [T] {
    v.clear();
    v.resize(n, fill);
    v
}

pub(crate) fn mla_prefill(op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
    mla_prefill_with(op, |heads, f| par_map(heads, f))
}

pub(crate) fn mla_decode(op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
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
    let (seqlens, table) = decode_indices(a, dims)?;
    let q = f32s(a.q)?;
    let kdtype = a.kcache.dtype();
    let ksize = kdtype.size();
    let kc = crate::bytes_of(a.kcache)?;
    let scale = f64::from(a.softmax_scale);
    let causal = a.causal;
    let group = h_q / h_kv;
    let visible_of = |seqlen: usize, s: usize| {
        if causal {
            seqlen.saturating_sub(s_q - 1 - s)
        } else {
            seqlen
        }
    };

    let simd = crate::fast::current_simd();
    // One unit per (b, kvh): rows (s, h in the group) in (s, h) order,
    // each with its output row and lse.
    let units = par_map(batch * h_kv, |u| {
        SCRATCH.with(|scratch| {
            let Scratch {
                kq,
                kv,
                qp,
                dots,
                pp,
                o: o_buf,
                key: krow,
            } = &mut *scratch.borrow_mut();
            let (b, kvh) = (u / h_kv, u % h_kv);
            let seqlen = seqlens[b] as usize;
            let n_rows = s_q * group;
            let mut outs = vec![0.0f64; n_rows * dv];
            let mut lses = vec![f64::INFINITY; n_rows];
            if seqlen == 0 {
                return (outs, lses);
            }
            // Key `t` decoded to f32 (exact) into `krow`.
            let key = |t: usize, krow: &mut Vec<f32>| {
                let blk = table[b * max_blocks + t / block_size] as usize;
                let off = ((blk * block_size + t % block_size) * h_kv + kvh) * d;
                krow.resize(d, 0.0);
                crate::fast::decode_into(kdtype, &kc[off * ksize..(off + d) * ksize], krow);
            };
            // Keys for the scores: [tg][d][NR] (keys past seqlen are 0), and
            // for the outputs: [cg][seqlen][NR] over the first dv columns.
            let tg = seqlen.div_ceil(NR);
            let cg = dv.div_ceil(NR);
            let kq = fresh(kq, tg * d * NR, 0.0f64);
            let kv = fresh(kv, cg * seqlen * NR, 0.0f64);
            for t in 0..seqlen {
                key(t, krow);
                let (g, jj) = (t / NR, t % NR);
                let panel = &mut kq[g * d * NR..(g + 1) * d * NR];
                for (c, &v) in krow.iter().enumerate() {
                    panel[c * NR + jj] = f64::from(v);
                }
                for (c, &v) in krow[..dv].iter().enumerate() {
                    kv[(c / NR) * seqlen * NR + t * NR + c % NR] = f64::from(v);
                }
            }
            // Queries: [rg][d][MR] over rows (s, h).
            let rg = n_rows.div_ceil(MR);
            let qp = fresh(qp, rg * d * MR, 0.0f64);
            for r in 0..n_rows {
                let (s, hh) = (r / group, r % group);
                let item = (b * s_q + s) * h_q + kvh * group + hh;
                let (g, ii) = (r / MR, r % MR);
                let panel = &mut qp[g * d * MR..(g + 1) * d * MR];
                for (c, &v) in q[item * d..(item + 1) * d].iter().enumerate() {
                    panel[c * MR + ii] = f64::from(v);
                }
            }
            // Dot products from −0.0, as `Iterator::sum` starts.
            let dots = fresh(dots, rg * tg, [[-0.0f64; NR]; MR]);
            panels(simd, qp, d * MR, rg, kq, d * NR, tg, d, dots);

            // Per s: the group's rows share the visible length.
            let pp = fresh(pp, group.div_ceil(MR) * seqlen * MR, 0.0f64);
            for s in 0..s_q {
                let visible = visible_of(seqlen, s);
                if visible == 0 {
                    continue;
                }
                let hg = group.div_ceil(MR);
                let pp = &mut pp[..hg * visible * MR];
                pp.iter_mut().for_each(|v| *v = 0.0);
                for hh in 0..group {
                    let r = s * group + hh;
                    let (gi, ii) = (r / MR, r % MR);
                    let scores: Vec<f64> = (0..visible)
                        .map(|t| dots[gi * tg + t / NR][ii][t % NR] * scale)
                        .collect();
                    let (p, lse) = softmax(&scores);
                    lses[r] = lse;
                    let (g, i2) = (hh / MR, hh % MR);
                    for (t, &pt) in p.iter().enumerate() {
                        pp[g * visible * MR + t * MR + i2] = pt;
                    }
                }
                // o[h][c] = Σ_t p[h][t]·k[t][c], from 0, in t order.
                let o = fresh(&mut *o_buf, hg * cg, [[0.0f64; NR]; MR]);
                panels(simd, pp, visible * MR, hg, kv, seqlen * NR, cg, visible, o);
                for hh in 0..group {
                    let r = s * group + hh;
                    let (g, i2) = (hh / MR, hh % MR);
                    for c in 0..dv {
                        outs[r * dv + c] = o[g * cg + c / NR][i2][c % NR];
                    }
                }
            }
            (outs, lses)
        })
    });

    let mut out = vec![0.0f64; batch * s_q * h_q * dv];
    let mut lse = vec![0.0f64; batch * h_q * s_q];
    for (u, (outs, lses)) in units.into_iter().enumerate() {
        let (b, kvh) = (u / h_kv, u % h_kv);
        for r in 0..s_q * group {
            let (s, h) = (r / group, kvh * group + r % group);
            let item = (b * s_q + s) * h_q + h;
            out[item * dv..(item + 1) * dv].copy_from_slice(&outs[r * dv..(r + 1) * dv]);
            lse[(b * h_q + h) * s_q + s] = lses[r];
        }
    }
    put_f64(a.out, &out)?;
    put_f64(a.lse, &lse)
}
