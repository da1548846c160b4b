//! Reference data movement: window copy, row gather, and the weighted row
//! reduction of the expert-parallel combines.

use super::ep::round_once;
use crate::util::{f32s, host, put_f32};
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{Error, HostTensor, Result};

/// Copies the window element by element through f32 (exact for every
/// accepted source dtype), rounding once to the destination dtype. The
/// destination keeps its other elements: it is read, patched and written.
pub fn copy_window(op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let src = f32s(args.src)?;
    let mut dst = f32s(args.dst)?;
    let (rows, cols) = args.size;
    let (sr, sc) = args.src_origin;
    let (dr, dc) = args.dst_origin;
    for r in 0..rows {
        for c in 0..cols {
            dst[(dr + r) * dims.dst.1 + dc + c] = src[(sr + r) * dims.src.1 + sc + c];
        }
    }
    put_f32(args.dst, &dst)
}

/// `dst[i] = src[index[i]]` (−1: zero bytes), bit-exact on the raw bytes.
pub fn gather_rows(op: &mut Checked<GatherRows<'_>>) -> Result<()> {
    const OP: &str = "gather_rows";
    let (a, d) = op.parts();
    let idx = host(a.index)?;
    check_range(OP, "index", &idx, 0, d.src_rows as i64, Some(-1))?;
    // In place: the rows can be hundreds of megabytes (expert-parallel
    // payloads), so neither side is copied whole.
    let src = crate::bytes_of(a.src)?;
    let row = d.row * a.src.dtype().size();
    let out = crate::bytes_mut_of(a.dst)?;
    if out.len() != d.rows * row {
        return Err(Error::Other(format!(
            "{OP}: internal: dst holds {} bytes, expected {}",
            out.len(),
            d.rows * row
        )));
    }
    for (i, &j) in idx.to_i64_vec().iter().enumerate() {
        let dst = &mut out[i * row..(i + 1) * row];
        if j >= 0 {
            let j = j as usize;
            dst.copy_from_slice(&src[j * row..(j + 1) * row]);
        } else {
            dst.fill(0);
        }
    }
    Ok(())
}

/// `out[t] = round(Σ_j w[t,j]·src[index[t,j]])`, accumulated in f64 in `j`
/// order (each product is exact in f64), rounded once.
pub fn reduce_rows(op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
    const OP: &str = "reduce_rows";
    let (a, d) = op.parts();
    let idx = host(a.index)?;
    check_range(OP, "index", &idx, 0, d.src_rows as i64, Some(-1))?;
    let idx = idx.to_i64_vec();
    // Rows are decoded one at a time: the source can be hundreds of
    // megabytes (expert-parallel payloads), never widened whole.
    let src = crate::bytes_of(a.src)?;
    let (sdt, rb) = (a.src.dtype(), d.hidden * a.src.dtype().size());
    let w = a.weights.map(f32s).transpose()?;
    let (n, k, h) = (d.tokens, d.k, d.hidden);
    let dt = a.out.dtype();
    let mut out = vec![0f32; n * h];
    let mut acc = vec![0f64; h];
    for t in 0..n {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..k {
            let r = idx[t * k + j];
            if r < 0 {
                continue;
            }
            let wt = w.as_ref().map_or(1.0, |w| w[t * k + j] as f64);
            let bytes = &src[r as usize * rb..(r as usize + 1) * rb];
            let row = HostTensor::from_bytes(sdt, &[h], bytes.to_vec())?.to_f32_vec();
            for (v, &x) in acc.iter_mut().zip(&row) {
                *v += wt * x as f64;
            }
        }
        for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(&acc) {
            *o = round_once(dt, v);
        }
    }
    put_f32(a.out, &out)
}
