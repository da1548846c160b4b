//! Expert-parallel kernels of the reference backend. The communicating ops
//! (dispatch, combine and their low-latency forms) are written once in
//! core (`deepport_core::ep`) over `gather_rows`/`reduce_rows` (in
//! `copy.rs`) and `act_quant`; what stays here is the layout op, which runs
//! on one rank.

use deepport_core::backend::Tensor;
use deepport_core::ep::experts_per_rank;
use deepport_core::formats::round_bf16;
use deepport_core::ops::index::check_range;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

use crate::util::{host, put_i64};

/// Reads an index tensor and checks every entry lies in `[0, E)` or is −1.
fn read_topk(op: &'static str, t: &Tensor, num_experts: usize) -> Result<Vec<i64>> {
    let h = host(t)?;
    check_range(op, "topk_idx", &h, 0, num_experts as i64, Some(-1))?;
    Ok(h.to_i64_vec())
}

/// Rounds an f64 once to `dtype` (f32 or bf16): round-to-odd to f32 keeps
/// enough bits that the following nearest-even bf16 rounding is exact.
pub fn round_once(dtype: DType, v: f64) -> f32 {
    if dtype == DType::F32 || v.is_nan() {
        return v as f32;
    }
    let t = v as f32;
    let odd = if t as f64 == v {
        t
    } else {
        let mut b = t.to_bits();
        if (t as f64).abs() > v.abs() {
            b -= 1; // t rounded away from zero: step back toward zero
        }
        f32::from_bits(b | 1)
    };
    round_bf16(odd)
}

// ---- get_dispatch_layout ---------------------------------------------------

/// The specification of `get_dispatch_layout`: `cpu-ref`'s kernel must give these bytes.
pub fn get_dispatch_layout(op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    const OP: &str = "get_dispatch_layout";
    let (a, d) = op.parts();
    let (n, k, e, world) = (d.tokens, d.topk, d.num_experts, d.world_size);
    let epr = experts_per_rank(OP, e, world)?;
    let topk = read_topk(OP, a.topk_idx, e)?;
    let mut per_rank = vec![0i64; world];
    let mut per_expert = vec![0i64; e];
    let mut in_rank = vec![0i64; n * world];
    for t in 0..n {
        let mut seen = vec![false; e];
        for &x in &topk[t * k..(t + 1) * k] {
            if x >= 0 {
                seen[x as usize] = true;
            }
        }
        for (ex, _) in seen.iter().enumerate().filter(|(_, &s)| s) {
            per_expert[ex] += 1;
            in_rank[t * world + ex / epr] = 1;
        }
        for r in 0..world {
            per_rank[r] += in_rank[t * world + r];
        }
    }
    put_i64(a.num_tokens_per_rank, &per_rank)?;
    put_i64(a.num_tokens_per_expert, &per_expert)?;
    put_i64(a.is_token_in_rank, &in_rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_once_is_a_single_rounding() {
        let tie = 1.0 + 2f64.powi(-8);
        // Just above the bf16 midpoint between 1 and 1 + 2^-7: must round up,
        // although a cast to f32 first would land exactly on the midpoint.
        assert_eq!(round_once(DType::BF16, tie + 2f64.powi(-40)), 1.0078125);
        assert_eq!(round_once(DType::BF16, tie - 2f64.powi(-40)), 1.0);
        assert_eq!(round_once(DType::BF16, -(tie + 2f64.powi(-40))), -1.0078125);
        // An exact midpoint ties to even.
        assert_eq!(round_once(DType::BF16, tie), 1.0);
        assert_eq!(round_once(DType::BF16, 1.0 + 3.0 * 2f64.powi(-8)), 1.015625);
        assert_eq!(round_once(DType::BF16, 1e300), f32::INFINITY);
        assert!(round_once(DType::BF16, f64::NAN).is_nan());
        assert_eq!(round_once(DType::BF16, 1e-300).to_bits(), 0);
        assert_eq!(round_once(DType::BF16, -1e-300).to_bits(), 0x8000_0000);
        assert_eq!(round_once(DType::F32, 0.1), 0.1f32);
    }
}
