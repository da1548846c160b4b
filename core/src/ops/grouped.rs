//! Grouped plain GEMMs (f32/bf16), DeepGEMM's `m_grouped_bf16_gemm_nt_*`:
//! the MoE experts of the f32 and bf16 numerics modes, in the same two
//! layouts as the grouped FP8 GEMMs (`fp8_grouped_contiguous`,
//! `fp8_grouped_masked`) and with the same validation rules.
//!
//! Semantics (both layouts): an output row `r` that belongs to group `g`
//! is `d[r, j] = Σ_k a[r, k]·b[g, j, k]`, accumulated in f32 or wider
//! (cpu-ref: f64) and rounded once to `d`'s dtype, exactly as `gemm` of
//! that row against `b[g]`.
//!
//! * **contiguous** (prefill): `a [m_sum, k]`, `m_indices [m_sum]` gives
//!   each row's group, `-1` marks a padding row whose output is unspecified
//!   (cpu-ref writes 0; the conformance suite does not judge it). DeepGEMM
//!   keeps the group constant over 128-row blocks; the op does not require
//!   it. A value outside `[-1, G)` is `IndexOutOfRange`.
//! * **masked** (decode): `a [G, m_max, k]`, group `g` computes its first
//!   `masked_m[g]` rows; the rows at or past it are neither computed nor
//!   written (they keep whatever `d` held). A value outside `[0, m_max]` is
//!   `IndexOutOfRange`.

use super::decl::*;
use super::*;

/// Operand dtypes of the grouped plain GEMMs.
const GROUPED_AB: &[DType] = &[DType::F32, DType::BF16];
/// `out_dtype` of the grouped plain GEMMs (as `gemm`).
const OUT_ACT: ParamKind = ParamKind::Choice(&["bf16", "f32", "f16"]);

/// Shapes shared by both layouts: `b [G, n, k]` with `a`'s dtype and `k`;
/// `d` = `a_lead ++ [n]`. `groups`: the group count `a` implies (masked).
fn check_grouped(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    d: &Tensor,
    a_lead: &[usize],
    groups: Option<usize>,
) -> Result<GemmDims> {
    expect_dtype(op, "b", b, &[a.dtype()])?;
    let k = *a.shape().last().unwrap_or(&0);
    let bs = expect_rank(op, "b", b, 3, "[G, n, k]")?;
    let (g, n) = (bs[0], bs[1]);
    expect_shape(op, "b", b, &[g, n, k], "[G, n, k] (k from a)")?;
    if let Some(ga) = groups {
        ensure(ga == g, op, "b", || {
            format!("has {g} groups, but a has {ga}")
        })?;
    }
    let mut d_shape = a_lead.to_vec();
    d_shape.push(n);
    expect_shape(op, "d", d, &d_shape, "[.., n]")?;
    let m = *a_lead.last().unwrap_or(&0);
    Ok(GemmDims { groups: g, m, n, k })
}

/// Grouped plain GEMM, contiguous layout (DeepGEMM
/// `m_grouped_bf16_gemm_nt_contiguous`): row `i` of `a` is multiplied by
/// group `m_indices[i]` of `b`; `-1` marks padding rows (output
/// unspecified). See the module docs.
#[derive(Debug)]
pub struct GemmGroupedContiguous<'a> {
    /// `[m_sum, k]` f32 or bf16.
    pub a: &'a Tensor,
    /// `[G, n, k]`, `a`'s dtype.
    pub b: &'a Tensor,
    /// `[m_sum]` i32/i64 in `[-1, G)`.
    pub m_indices: &'a Tensor,
    /// `[m_sum, n]`.
    pub d: &'a mut Tensor,
}

impl OpArgs for GemmGroupedContiguous<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::GemmGroupedContiguous,
        summary: "grouped plain GEMM (f32/bf16), contiguous layout (MoE prefill): d[i] = a[i]·b[m_indices[i]]ᵀ",
        tensors: &[
            input("a", GROUPED_AB, "[m_sum, k] f32/bf16"),
            input("b", GROUPED_AB, "[G, n, k], a's dtype"),
            input(
                "m_indices",
                INDEX_DTYPES,
                "[m_sum] i32/i64: group of each row (DeepGEMM: constant per 128 rows), -1 = padding",
            ),
            output(
                "d",
                ACT_DTYPES,
                "[m_sum, n] in out_dtype (padding rows unspecified)",
            ),
        ],
        params: &[param("out_dtype", OUT_ACT, "f32", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        const OP: &str = "gemm_grouped_contiguous";
        let as_ = expect_rank(OP, "a", self.a, 2, "[m_sum, k]")?;
        let dims = check_grouped(OP, self.a, self.b, self.d, &as_[..1], None)?;
        expect_shape(OP, "m_indices", self.m_indices, &[dims.m], "[m_sum]")?;
        Ok(dims)
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("a", self.a),
            ("b", self.b),
            ("m_indices", self.m_indices),
            ("d", &*self.d),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}

/// Grouped plain GEMM, masked layout (DeepGEMM
/// `m_grouped_bf16_gemm_nt_masked`): group `g` computes
/// `d[g, r] = a[g, r]·b[g]ᵀ` for its first `masked_m[g]` rows; the rest of
/// `d` is not written. See the module docs.
#[derive(Debug)]
pub struct GemmGroupedMasked<'a> {
    /// `[G, m_max, k]` f32 or bf16.
    pub a: &'a Tensor,
    /// `[G, n, k]`, `a`'s dtype.
    pub b: &'a Tensor,
    /// `[G]` i32/i64 in `[0, m_max]`.
    pub masked_m: &'a Tensor,
    /// `[G, m_max, n]`.
    pub d: &'a mut Tensor,
}

impl OpArgs for GemmGroupedMasked<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::GemmGroupedMasked,
        summary: "grouped plain GEMM (f32/bf16), masked layout (MoE decode): d[g, r] = a[g, r]·b[g]ᵀ for r < masked_m[g]",
        tensors: &[
            input("a", GROUPED_AB, "[G, m_max, k] f32/bf16"),
            input("b", GROUPED_AB, "[G, n, k], a's dtype"),
            input(
                "masked_m",
                INDEX_DTYPES,
                "[G] i32/i64 in [0, m_max]: rows computed per group",
            ),
            output(
                "d",
                ACT_DTYPES,
                "[G, m_max, n] in out_dtype (rows >= masked_m[g] are not written)",
            ),
        ],
        params: &[param("out_dtype", OUT_ACT, "f32", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        const OP: &str = "gemm_grouped_masked";
        let as_ = expect_rank(OP, "a", self.a, 3, "[G, m_max, k]")?;
        let dims = check_grouped(OP, self.a, self.b, self.d, &as_[..2], Some(as_[0]))?;
        expect_shape(OP, "masked_m", self.masked_m, &[dims.groups], "[G]")?;
        Ok(dims)
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("a", self.a),
            ("b", self.b),
            ("masked_m", self.masked_m),
            ("d", &*self.d),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}
