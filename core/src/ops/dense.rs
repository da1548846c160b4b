//! Dense ops: quantization, GEMMs, norms, RoPE, the MoE gate, elementwise.

use super::decl::*;
use super::*;
use crate::formats;

const FLOAT: ParamKind = ParamKind::Float;
const INT: ParamKind = ParamKind::Int;
pub(super) const OUT_BF16_F32: ParamKind = ParamKind::Choice(&["bf16", "f32"]);
const OUT_ACT: ParamKind = ParamKind::Choice(&["bf16", "f32", "f16"]);
const F32_ONLY: &[DType] = &[DType::F32];
/// Output dtypes of the FP8 GEMMs.
const GEMM_OUT: &[DType] = &[DType::BF16, DType::F32];

/// How act_quant stores its scales (SPEC.md §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleFmt {
    /// `s = amax / fp8_max`.
    #[default]
    Float,
    /// `s` rounded up to a power of two (UE8M0, DeepSeek-V3.1).
    Ue8m0,
}

impl ScaleFmt {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float" | "f32" => Some(Self::Float),
            "ue8m0" => Some(Self::Ue8m0),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Ue8m0 => "ue8m0",
        }
    }
}

/// Per-token, 128-group FP8 quantization (SPEC.md §2). The FP8 format
/// (e4m3 or e4m3fnuz) is the dtype of `q`.
///
/// `x [m, k]` f32/bf16/f16, `k % 128 == 0` → `q [m, k]`, `s [m, k/128]` f32.
#[derive(Debug)]
pub struct ActQuant<'a> {
    pub x: &'a Tensor,
    pub q: &'a mut Tensor,
    pub s: &'a mut Tensor,
    pub scale_fmt: ScaleFmt,
}

#[derive(Clone, Debug)]
pub struct ActQuantDims {
    pub m: usize,
    pub k: usize,
    /// 448 for e4m3, 240 for e4m3fnuz.
    pub fp8_max: f32,
}

impl OpArgs for ActQuant<'_> {
    type Dims = ActQuantDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::ActQuant,
        summary: "per-token, 128-group FP8 quantization: x ≈ q·s (SPEC §2)",
        tensors: &[
            input("x", ACT_DTYPES, "[m, k] f32/bf16/f16, k a multiple of 128"),
            output(
                "q",
                E4M3_DTYPES,
                "[m, k] e4m3 (e4m3fnuz with format=e4m3fnuz)",
            ),
            output("s", F32_ONLY, "[m, k/128] f32 scales"),
        ],
        params: &[
            param(
                "scale_fmt",
                ParamKind::Choice(&["float", "ue8m0"]),
                "float",
                "float: s = amax/448; ue8m0: s rounded up to a power of two",
            ),
            param(
                "format",
                ParamKind::Choice(&["e4m3", "e4m3fnuz"]),
                "e4m3",
                "FP8 format of q (e4m3fnuz: AMD MI300, max 240)",
            ),
        ],
    };
    fn validate(&self) -> Result<ActQuantDims> {
        const OP: &str = "act_quant";
        let xs = expect_rank(OP, "x", self.x, 2, "[m, k]")?;
        let (m, k) = (xs[0], xs[1]);
        ensure(k % QBLOCK == 0, OP, "x", || {
            format!("k = {k} must be a multiple of 128")
        })?;
        expect_shape(OP, "q", self.q, &[m, k], "[m, k]")?;
        expect_shape(OP, "s", self.s, &[m, k / QBLOCK], "[m, k/128]")?;
        Ok(ActQuantDims {
            m,
            k,
            fp8_max: formats::max_finite(self.q.dtype()),
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("x", self.x), ("q", &*self.q), ("s", &*self.s)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("q", &mut *self.q), ("s", &mut *self.s)]
    }
}

/// Block-scaled weight dequantization: `out[i, j] = w[i, j] · s[i/128, j/128]`.
#[derive(Debug)]
pub struct WeightDequant<'a> {
    pub w: &'a Tensor,
    pub s: &'a Tensor,
    pub out: &'a mut Tensor,
}

#[derive(Clone, Debug)]
pub struct MatDims {
    pub n: usize,
    pub k: usize,
}

impl OpArgs for WeightDequant<'_> {
    type Dims = MatDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::WeightDequant,
        summary: "block-scaled weight dequantization: out[i,j] = w[i,j]·s[i/128, j/128]",
        tensors: &[
            input("w", E4M3_DTYPES, "[n, k] e4m3 (or e4m3fnuz)"),
            input(
                "s",
                F32_ONLY,
                "[ceil(n/128), ceil(k/128)] scales (used as f32)",
            ),
            output("out", ACT_DTYPES, "[n, k] in out_dtype"),
        ],
        params: &[param("out_dtype", OUT_ACT, "bf16", "dtype of out")],
    };
    fn validate(&self) -> Result<MatDims> {
        const OP: &str = "weight_dequant";
        let ws = expect_rank(OP, "w", self.w, 2, "[n, k]")?;
        let (n, k) = (ws[0], ws[1]);
        expect_shape(
            OP,
            "s",
            self.s,
            &[blocks128(n), blocks128(k)],
            "[ceil(n/128), ceil(k/128)]",
        )?;
        expect_shape(OP, "out", self.out, &[n, k], "[n, k]")?;
        Ok(MatDims { n, k })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("w", self.w), ("s", self.s), ("out", &*self.out)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}

const FP8_SB_GROUPED: &str = "[G, ceil(n/128), ceil(k/128)] 128x128 block scales (used as f32)";

/// Dims of the FP8 GEMM family.
#[derive(Clone, Debug)]
pub struct GemmDims {
    /// Groups (1 for the dense GEMM).
    pub groups: usize,
    /// Rows of `a` (per group for the masked layout, total for contiguous).
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

#[allow(clippy::too_many_arguments)]
fn check_fp8_operands(
    op: &'static str,
    a: &Tensor,
    sa: &Tensor,
    b: &Tensor,
    sb: &Tensor,
    d: &Tensor,
    a_lead: &[usize],
    groups: Option<usize>,
) -> Result<GemmDims> {
    // The declared dtypes are checked; `b` must also have `a`'s format.
    expect_dtype(op, "b", b, &[a.dtype()])?;
    let k = *a.shape().last().unwrap_or(&0);
    let (g, n) = match groups {
        None => {
            let bs = expect_rank(op, "b", b, 2, "[n, k]")?;
            expect_shape(op, "b", b, &[bs[0], k], "[n, k] (k from a)")?;
            (1, bs[0])
        }
        Some(_) => {
            let bs = expect_rank(op, "b", b, 3, "[G, n, k]")?;
            expect_shape(op, "b", b, &[bs[0], bs[1], k], "[G, n, k] (k from a)")?;
            (bs[0], bs[1])
        }
    };
    if let Some(ga) = groups {
        ensure(ga == g, op, "b", || {
            format!("has {g} groups, but a has {ga}")
        })?;
    }
    let mut sa_shape = a_lead.to_vec();
    sa_shape.push(blocks128(k));
    expect_shape(op, "sa", sa, &sa_shape, "[.., ceil(k/128)]")?;
    let sb_shape: Vec<usize> = match groups {
        None => vec![blocks128(n), blocks128(k)],
        Some(_) => vec![g, blocks128(n), blocks128(k)],
    };
    expect_shape(op, "sb", sb, &sb_shape, "[(G,) ceil(n/128), ceil(k/128)]")?;
    let mut d_shape = a_lead.to_vec();
    d_shape.push(n);
    expect_shape(op, "d", d, &d_shape, "[.., n]")?;
    let m = *a_lead.last().unwrap();
    Ok(GemmDims { groups: g, m, n, k })
}

/// FP8 block-scaled GEMM, DeepGEMM "NT" semantics (SPEC.md §3):
/// `d[m, n] = Σ_kb (Σ_{k∈kb} a[m,k]·b[n,k]) · sa[m,kb] · sb[n/128,kb]`.
#[derive(Debug)]
pub struct Fp8Gemm<'a> {
    pub a: &'a Tensor,
    pub sa: &'a Tensor,
    pub b: &'a Tensor,
    pub sb: &'a Tensor,
    pub d: &'a mut Tensor,
}

impl OpArgs for Fp8Gemm<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Fp8Gemm,
        summary: "FP8 block-scaled GEMM, DeepGEMM NT: d = Σ_kb (a·bᵀ)_kb · sa · sb (SPEC §3)",
        tensors: &[
            input("a", E4M3_DTYPES, "[m, k] e4m3 (or e4m3fnuz)"),
            input(
                "sa",
                F32_ONLY,
                "[m, ceil(k/128)] scales (any float dtype, used as f32)",
            ),
            input("b", E4M3_DTYPES, "[n, k] e4m3, same format as a"),
            input(
                "sb",
                F32_ONLY,
                "[ceil(n/128), ceil(k/128)] 128x128 block scales (used as f32)",
            ),
            output("d", GEMM_OUT, "[m, n] in out_dtype"),
        ],
        params: &[param("out_dtype", OUT_BF16_F32, "bf16", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        let as_ = expect_rank("fp8_gemm", "a", self.a, 2, "[m, k]")?;
        check_fp8_operands(
            "fp8_gemm",
            self.a,
            self.sa,
            self.b,
            self.sb,
            self.d,
            &as_[..1],
            None,
        )
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("a", self.a),
            ("sa", self.sa),
            ("b", self.b),
            ("sb", self.sb),
            ("d", &*self.d),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}

/// Grouped FP8 GEMM, contiguous layout (SPEC.md §3.1): row `i` of `a` uses
/// group `m_indices[i]`; `-1` marks padding rows (output unspecified).
#[derive(Debug)]
pub struct Fp8GroupedContiguous<'a> {
    pub a: &'a Tensor,
    pub sa: &'a Tensor,
    pub b: &'a Tensor,
    pub sb: &'a Tensor,
    pub m_indices: &'a Tensor,
    pub d: &'a mut Tensor,
}

impl OpArgs for Fp8GroupedContiguous<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Fp8GroupedContiguous,
        summary: "grouped FP8 GEMM, contiguous layout (MoE prefill, SPEC §3.1)",
        tensors: &[
            input("a", E4M3_DTYPES, "[m_sum, k] e4m3"),
            input("sa", F32_ONLY, "[m_sum, ceil(k/128)] scales (used as f32)"),
            input("b", E4M3_DTYPES, "[G, n, k] e4m3"),
            input("sb", F32_ONLY, FP8_SB_GROUPED),
            input(
                "m_indices",
                INDEX_DTYPES,
                "[m_sum] i32/i64: group of each row, constant per 128 rows, -1 = padding",
            ),
            output(
                "d",
                GEMM_OUT,
                "[m_sum, n] in out_dtype (padding rows unspecified)",
            ),
        ],
        params: &[param("out_dtype", OUT_BF16_F32, "bf16", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        const OP: &str = "fp8_grouped_contiguous";
        let as_ = expect_rank(OP, "a", self.a, 2, "[m_sum, k]")?;
        let g = self.b.shape().first().copied().unwrap_or(0);
        let dims = check_fp8_operands(
            OP,
            self.a,
            self.sa,
            self.b,
            self.sb,
            self.d,
            &as_[..1],
            Some(g),
        )?;
        expect_shape(OP, "m_indices", self.m_indices, &[dims.m], "[m_sum]")?;
        Ok(dims)
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("a", self.a),
            ("sa", self.sa),
            ("b", self.b),
            ("sb", self.sb),
            ("m_indices", self.m_indices),
            ("d", &*self.d),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}

/// Grouped FP8 GEMM, masked layout (SPEC.md §3.2): group `g` computes its
/// first `masked_m[g]` rows; the rest are neither computed nor checked.
#[derive(Debug)]
pub struct Fp8GroupedMasked<'a> {
    pub a: &'a Tensor,
    pub sa: &'a Tensor,
    pub b: &'a Tensor,
    pub sb: &'a Tensor,
    pub masked_m: &'a Tensor,
    pub d: &'a mut Tensor,
}

impl OpArgs for Fp8GroupedMasked<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Fp8GroupedMasked,
        summary: "grouped FP8 GEMM, masked layout (MoE decode, SPEC §3.2)",
        tensors: &[
            input("a", E4M3_DTYPES, "[G, m_max, k] e4m3"),
            input(
                "sa",
                F32_ONLY,
                "[G, m_max, ceil(k/128)] scales (used as f32)",
            ),
            input("b", E4M3_DTYPES, "[G, n, k] e4m3"),
            input("sb", F32_ONLY, FP8_SB_GROUPED),
            input(
                "masked_m",
                INDEX_DTYPES,
                "[G] i32/i64: rows computed per group",
            ),
            output(
                "d",
                GEMM_OUT,
                "[G, m_max, n] in out_dtype (rows >= masked_m[g] are not computed: left NaN)",
            ),
        ],
        params: &[param("out_dtype", OUT_BF16_F32, "bf16", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        const OP: &str = "fp8_grouped_masked";
        let as_ = expect_rank(OP, "a", self.a, 3, "[G, m_max, k]")?;
        let dims = check_fp8_operands(
            OP,
            self.a,
            self.sa,
            self.b,
            self.sb,
            self.d,
            &as_[..2],
            Some(as_[0]),
        )?;
        expect_shape(OP, "masked_m", self.masked_m, &[dims.groups], "[G]")?;
        Ok(dims)
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("a", self.a),
            ("sa", self.sa),
            ("b", self.b),
            ("sb", self.sb),
            ("masked_m", self.masked_m),
            ("d", &*self.d),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}

/// Plain GEMM, "NT": `d[m, n] = Σ_k a[m,k]·b[n,k]`, accumulation in f32 or wider (cpu-ref: f64), one
/// rounding to `d`'s dtype. f32, bf16 or f16 operands.
#[derive(Debug)]
pub struct Gemm<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub d: &'a mut Tensor,
}

impl OpArgs for Gemm<'_> {
    type Dims = GemmDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Gemm,
        summary: "plain GEMM, NT: d = a·bᵀ, f32 accumulation",
        tensors: &[
            input("a", ACT_DTYPES, "[m, k] f32/bf16/f16"),
            input("b", ACT_DTYPES, "[n, k] f32/bf16/f16"),
            output("d", ACT_DTYPES, "[m, n] in out_dtype"),
        ],
        params: &[param("out_dtype", OUT_ACT, "f32", "dtype of d")],
    };
    fn validate(&self) -> Result<GemmDims> {
        const OP: &str = "gemm";
        let as_ = expect_rank(OP, "a", self.a, 2, "[m, k]")?;
        let (m, k) = (as_[0], as_[1]);
        let bs = expect_rank(OP, "b", self.b, 2, "[n, k]")?;
        let n = bs[0];
        expect_shape(OP, "b", self.b, &[n, k], "[n, k] (k from a)")?;
        expect_shape(OP, "d", self.d, &[m, n], "[m, n]")?;
        Ok(GemmDims { groups: 1, m, n, k })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("a", self.a), ("b", self.b), ("d", &*self.d)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("d", &mut *self.d)]
    }
}

/// Dims of row-wise ops: `rows` rows of `dim` elements.
#[derive(Clone, Debug)]
pub struct RowDims {
    pub rows: usize,
    pub dim: usize,
}

/// RMSNorm over the last dim: `y = x / sqrt(mean(x²) + eps) · weight`,
/// computed in f32 or wider (cpu-ref: f64), one rounding to `y`'s dtype.
#[derive(Debug)]
pub struct RmsNorm<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub y: &'a mut Tensor,
    pub eps: f32,
}

impl OpArgs for RmsNorm<'_> {
    type Dims = RowDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::RmsNorm,
        summary: "RMSNorm over the last dim: y = x / sqrt(mean(x²) + eps) · weight",
        tensors: &[
            input("x", ACT_DTYPES, "[.., dim] f32/bf16/f16"),
            input("weight", ACT_DTYPES, "[dim] f32/bf16/f16"),
            output("y", ACT_DTYPES, "same shape and dtype as x"),
        ],
        params: &[param("eps", FLOAT, "1e-6", "added to the mean square")],
    };
    fn validate(&self) -> Result<RowDims> {
        const OP: &str = "rms_norm";
        ensure(!self.x.shape().is_empty(), OP, "x", || {
            "must have at least one dim".into()
        })?;
        let dim = *self.x.shape().last().unwrap();
        expect_shape(OP, "weight", self.weight, &[dim], "[dim]")?;
        expect_shape(OP, "y", self.y, self.x.shape(), "(same as x)")?;
        ensure(self.eps.is_finite() && self.eps >= 0.0, OP, "eps", || {
            format!("must be finite and ≥ 0, got {}", self.eps)
        })?;
        Ok(RowDims {
            rows: self.x.numel() / dim.max(1),
            dim,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("x", self.x), ("weight", self.weight), ("y", &*self.y)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("y", &mut *self.y)]
    }
}

/// YaRN context extension parameters (SPEC.md §8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub mscale: f32,
    pub mscale_all_dim: f32,
}

/// Which channels RoPE rotates together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(x[2i], x[2i+1])` (DeepSeek-V3's MLA rope, the default).
    #[default]
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])` ("rotate half"; DeepSeek-V3.2's indexer).
    Half,
}

impl RopeLayout {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "interleaved" => Some(Self::Interleaved),
            "half" => Some(Self::Half),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Interleaved => "interleaved",
            Self::Half => "half",
        }
    }
    /// The two channels of pair `i` of a `d`-channel vector.
    pub fn pair(self, i: usize, d: usize) -> (usize, usize) {
        match self {
            Self::Interleaved => (2 * i, 2 * i + 1),
            Self::Half => (i, i + d / 2),
        }
    }
}

/// Rotary embedding configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub yarn: Option<Yarn>,
    /// Pairing of the rotated channels (interleaved unless stated).
    pub layout: RopeLayout,
}

impl Default for RopeConfig {
    fn default() -> Self {
        Self {
            theta: 10000.0,
            yarn: None,
            layout: RopeLayout::Interleaved,
        }
    }
}

/// YaRN's `mscale(f, x) = 0.1·x·ln(f) + 1` (1 when `f ≤ 1`).
pub fn yarn_mscale(factor: f32, m: f32) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m as f64 * (factor as f64).ln() + 1.0
    }
}

impl RopeConfig {
    /// The per-pair frequencies `freq'_i`, `i < d/2`, computed in f64 and
    /// rounded once to f32. This table *is* the semantics of RoPE/YaRN in
    /// deepport; every backend uses it (angles are `f32(pos) · freq'_i` in f32).
    pub fn inv_freq(&self, d: usize) -> Vec<f32> {
        let theta = self.theta as f64;
        let half = d / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / d as f64))
            .collect();
        let Some(y) = self.yarn else {
            return base.iter().map(|&f| f as f32).collect();
        };
        let corr = |beta: f64| {
            d as f64
                * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * beta))
                    .ln()
                / (2.0 * theta.ln())
        };
        let low = corr(y.beta_fast as f64).floor().max(0.0);
        let high = corr(y.beta_slow as f64).ceil().min(d as f64 - 1.0);
        let span = if high == low {
            high - low + 0.001
        } else {
            high - low
        };
        base.iter()
            .enumerate()
            .map(|(i, &f)| {
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                (f * (1.0 - ramp) + f / y.factor as f64 * ramp) as f32
            })
            .collect()
    }

    /// The factor applied to cos and sin: `mscale(f, mscale) / mscale(f, mscale_all_dim)`.
    pub fn cos_sin_scale(&self) -> f32 {
        match self.yarn {
            None => 1.0,
            Some(y) => {
                (yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)) as f32
            }
        }
    }
}

/// Rotary embedding on pairs of the last dim: interleaved `(x[2i], x[2i+1])`
/// or, with `layout = half`, `(x[i], x[i + d/2])`. `x [T, …, d]`, `positions [T]` (i32/i64, ≥ 0) → `y` (same shape).
#[derive(Debug)]
pub struct Rope<'a> {
    pub x: &'a Tensor,
    pub positions: &'a Tensor,
    pub y: &'a mut Tensor,
    pub config: RopeConfig,
}

#[derive(Clone, Debug)]
pub struct RopeDims {
    pub tokens: usize,
    /// Rotated vectors per token (product of the middle dims).
    pub heads: usize,
    pub d: usize,
}

impl OpArgs for Rope<'_> {
    type Dims = RopeDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Rope,
        summary: "rotary embedding on interleaved (or half-split) pairs, optional YaRN (SPEC §8)",
        tensors: &[
            input("x", ACT_DTYPES, "[T, .., d] f32/bf16/f16, d even"),
            input("positions", INDEX_DTYPES, "[T] i32/i64"),
            output("y", ACT_DTYPES, "same shape and dtype as x"),
        ],
        params: &[
            param("theta", FLOAT, "10000", "rope_theta"),
            param("factor", FLOAT, "1", "YaRN factor; 1 means no YaRN"),
            param(
                "original_max_position_embeddings",
                INT,
                "4096",
                "YaRN L0 (used when factor > 1)",
            ),
            param("beta_fast", FLOAT, "32", "YaRN beta_fast"),
            param("beta_slow", FLOAT, "1", "YaRN beta_slow"),
            param("mscale", FLOAT, "1", "YaRN mscale"),
            param("mscale_all_dim", FLOAT, "1", "YaRN mscale_all_dim"),
            param(
                "layout",
                ParamKind::Choice(&["interleaved", "half"]),
                "interleaved",
                "pairs (x[2i], x[2i+1]) or (x[i], x[i+d/2]) (V3.2's indexer: half)",
            ),
        ],
    };
    fn validate(&self) -> Result<RopeDims> {
        const OP: &str = "rope";
        let xs = self.x.shape();
        ensure(xs.len() >= 2, OP, "x", || {
            format!("must be [T, …, d], got {xs:?}")
        })?;
        let (t, d) = (xs[0], xs[xs.len() - 1]);
        ensure(d % 2 == 0, OP, "x", || {
            format!("last dim d = {d} must be even")
        })?;
        expect_shape(OP, "positions", self.positions, &[t], "[T]")?;
        expect_shape(OP, "y", self.y, xs, "(same as x)")?;
        let c = &self.config;
        ensure(c.theta.is_finite() && c.theta > 1.0, OP, "theta", || {
            format!("must be > 1, got {}", c.theta)
        })?;
        if let Some(y) = c.yarn {
            ensure(
                y.factor.is_finite() && y.factor >= 1.0,
                OP,
                "factor",
                || format!("must be ≥ 1, got {}", y.factor),
            )?;
            ensure(
                y.original_max_position_embeddings > 0,
                OP,
                "original_max_position_embeddings",
                || "must be > 0".into(),
            )?;
            ensure(
                y.beta_fast > 0.0 && y.beta_slow > 0.0,
                OP,
                "beta_fast/beta_slow",
                || "must be > 0".into(),
            )?;
            expect_finite_param(OP, "mscale", y.mscale)?;
            expect_finite_param(OP, "mscale_all_dim", y.mscale_all_dim)?;
        }
        let heads = self.x.numel().checked_div(t * d).unwrap_or(0);
        Ok(RopeDims {
            tokens: t,
            heads,
            d,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("x", self.x),
            ("positions", self.positions),
            ("y", &*self.y),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("y", &mut *self.y)]
    }
}

/// DeepSeek-V3 "noaux_tc" MoE gate (SPEC.md §6).
/// `x [T, dim]`, `weight [E, dim]`, `bias [E]` f32 → `topk_idx [T, k]`
/// (i32/i64), `topk_weights [T, k]` f32. Rows are ordered by descending
/// biased score, ties to the lower expert index.
#[derive(Debug)]
pub struct MoeGate<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub topk_idx: &'a mut Tensor,
    pub topk_weights: &'a mut Tensor,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk: usize,
    pub route_scale: f32,
}

#[derive(Clone, Debug)]
pub struct MoeGateDims {
    pub tokens: usize,
    pub dim: usize,
    pub experts: usize,
}

impl OpArgs for MoeGate<'_> {
    type Dims = MoeGateDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::MoeGate,
        summary: "DeepSeek-V3 noaux_tc MoE router: sigmoid scores, group-limited top-k (SPEC §6)",
        tensors: &[
            input("x", ACT_DTYPES, "[T, dim] f32/bf16/f16"),
            input("weight", ACT_DTYPES, "[E, dim] f32/bf16/f16"),
            optional_input(
                "bias",
                F32_ONLY,
                "[E] e_score_correction_bias (used as f32), optional",
            ),
            output("topk_idx", INDEX_DTYPES, "[T, topk] i64 expert ids"),
            output("topk_weights", F32_ONLY, "[T, topk] f32"),
        ],
        params: &[
            param("n_group", INT, "8", "expert groups"),
            param("topk_group", INT, "4", "groups kept per token"),
            param("topk", INT, "8", "experts per token"),
            param("route_scale", FLOAT, "2.5", "routed_scaling_factor"),
        ],
    };
    fn validate(&self) -> Result<MoeGateDims> {
        const OP: &str = "moe_gate";
        let xs = expect_rank(OP, "x", self.x, 2, "[T, dim]")?;
        let (t, dim) = (xs[0], xs[1]);
        let ws = expect_rank(OP, "weight", self.weight, 2, "[E, dim]")?;
        let e = ws[0];
        expect_shape(
            OP,
            "weight",
            self.weight,
            &[e, dim],
            "[E, dim] (dim from x)",
        )?;
        if let Some(b) = self.bias {
            expect_shape(OP, "bias", b, &[e], "[E]")?;
        }
        ensure(
            self.n_group >= 1 && e % self.n_group == 0,
            OP,
            "n_group",
            || format!("must divide E = {e}, got {}", self.n_group),
        )?;
        ensure(e / self.n_group >= 2, OP, "n_group", || {
            "each group needs at least 2 experts (group score = top-2 sum)".into()
        })?;
        ensure(
            (1..=self.n_group).contains(&self.topk_group),
            OP,
            "topk_group",
            || {
                format!(
                    "must be in [1, n_group = {}], got {}",
                    self.n_group, self.topk_group
                )
            },
        )?;
        let kept = self.topk_group * (e / self.n_group);
        ensure(self.topk >= 1 && self.topk <= kept, OP, "topk", || {
            format!(
                "must be in [1, {kept}] (experts in the kept groups), got {}",
                self.topk
            )
        })?;
        expect_finite_param(OP, "route_scale", self.route_scale)?;
        expect_shape(OP, "topk_idx", self.topk_idx, &[t, self.topk], "[T, topk]")?;
        expect_shape(
            OP,
            "topk_weights",
            self.topk_weights,
            &[t, self.topk],
            "[T, topk]",
        )?;
        Ok(MoeGateDims {
            tokens: t,
            dim,
            experts: e,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("x", self.x), ("weight", self.weight)];
        if let Some(b) = self.bias {
            v.push(("bias", b));
        }
        v.extend([
            ("topk_idx", &*self.topk_idx),
            ("topk_weights", &*self.topk_weights),
        ]);
        v
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![
            ("topk_idx", &mut *self.topk_idx),
            ("topk_weights", &mut *self.topk_weights),
        ]
    }
}

/// SwiGLU activation: `out = silu(gate) · up`, f32-or-wider math, one rounding.
#[derive(Debug)]
pub struct SiluMul<'a> {
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub out: &'a mut Tensor,
}

/// Dims of elementwise ops.
#[derive(Clone, Debug)]
pub struct ElemDims {
    pub numel: usize,
}

fn check_elementwise(
    op: &'static str,
    names: [&'static str; 3],
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
) -> Result<ElemDims> {
    expect_shape(
        op,
        names[1],
        b,
        a.shape(),
        &format!("(same as {})", names[0]),
    )?;
    expect_shape(
        op,
        names[2],
        out,
        a.shape(),
        &format!("(same as {})", names[0]),
    )?;
    Ok(ElemDims { numel: a.numel() })
}

impl OpArgs for SiluMul<'_> {
    type Dims = ElemDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::SiluMul,
        summary: "SwiGLU activation: out = silu(gate) · up",
        tensors: &[
            input("gate", ACT_DTYPES, "any shape, f32/bf16/f16"),
            input("up", ACT_DTYPES, "same shape as gate"),
            output(
                "out",
                ACT_DTYPES,
                "same shape; the inputs' dtype when they agree, else f32",
            ),
        ],
        params: &[],
    };
    fn validate(&self) -> Result<ElemDims> {
        check_elementwise(
            "silu_mul",
            ["gate", "up", "out"],
            self.gate,
            self.up,
            self.out,
        )
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("gate", self.gate), ("up", self.up), ("out", &*self.out)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}

/// Elementwise `out = a + b` in f32 or wider, one rounding.
#[derive(Debug)]
pub struct Add<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub out: &'a mut Tensor,
}

impl OpArgs for Add<'_> {
    type Dims = ElemDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Add,
        summary: "elementwise out = a + b",
        tensors: &[
            input("a", ACT_DTYPES, "any shape, f32/bf16/f16"),
            input("b", ACT_DTYPES, "same shape as a"),
            output(
                "out",
                ACT_DTYPES,
                "same shape; the inputs' dtype when they agree, else f32",
            ),
        ],
        params: &[],
    };
    fn validate(&self) -> Result<ElemDims> {
        check_elementwise("add", ["a", "b", "out"], self.a, self.b, self.out)
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("a", self.a), ("b", self.b), ("out", &*self.out)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}

/// Row gather: `out[t] = table[ids[t]]`; an id outside `[0, V)` is an error.
#[derive(Debug)]
pub struct Embedding<'a> {
    pub table: &'a Tensor,
    pub ids: &'a Tensor,
    pub out: &'a mut Tensor,
}

#[derive(Clone, Debug)]
pub struct EmbeddingDims {
    pub vocab: usize,
    pub dim: usize,
    pub tokens: usize,
}

impl OpArgs for Embedding<'_> {
    type Dims = EmbeddingDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::Embedding,
        summary: "row gather: out[t] = table[ids[t]]",
        tensors: &[
            input("table", ACT_DTYPES, "[V, dim] f32/bf16/f16"),
            input("ids", INDEX_DTYPES, "[T] i32/i64, each in [0, V)"),
            output("out", ACT_DTYPES, "[T, dim] in the table's dtype"),
        ],
        params: &[],
    };
    fn validate(&self) -> Result<EmbeddingDims> {
        const OP: &str = "embedding";
        let ts = expect_rank(OP, "table", self.table, 2, "[V, dim]")?;
        let (v, dim) = (ts[0], ts[1]);
        let is = expect_rank(OP, "ids", self.ids, 1, "[T]")?;
        let t = is[0];
        expect_shape(OP, "out", self.out, &[t, dim], "[T, dim]")?;
        Ok(EmbeddingDims {
            vocab: v,
            dim,
            tokens: t,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("table", self.table),
            ("ids", self.ids),
            ("out", &*self.out),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}
