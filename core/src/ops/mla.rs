//! Multi-head latent attention: paged decode (FlashMLA) and prefill.

use super::decl::*;
use super::*;

/// MLA decode over a paged latent cache, FlashMLA dense-decode semantics
/// (SPEC.md §4).
///
/// * `q [b, s_q, h_q, d]`, `kcache [num_blocks, block_size, h_kv, d]`
///   (bf16 in DeepSeek; f32 and f16 accepted), V = the first `dv` channels
///   of K where `dv` is the last dim of `out`.
/// * `block_table [b, max_blocks]` i32, `cache_seqlens [b]` i32.
/// * `out [b, s_q, h_q, dv]`, `lse [b, h_q, s_q]` f32 (natural log).
/// * Query head `h` reads kv head `h / (h_q / h_kv)`.
/// * Causal is bottom-right aligned: query `j` sees keys
///   `[0, seqlen − (s_q − 1 − j))`. Empty rows give `out = 0`, `lse = +inf`.
#[derive(Debug)]
pub struct MlaDecode<'a> {
    pub q: &'a Tensor,
    pub kcache: &'a Tensor,
    pub block_table: &'a Tensor,
    pub cache_seqlens: &'a Tensor,
    pub out: &'a mut Tensor,
    pub lse: &'a mut Tensor,
    pub softmax_scale: f32,
    pub causal: bool,
}

#[derive(Clone, Debug)]
pub struct MlaDecodeDims {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub h_kv: usize,
    /// Q/K head dim (576 for DeepSeek).
    pub d: usize,
    /// V head dim (512 for DeepSeek).
    pub dv: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_blocks: usize,
}

impl OpArgs for MlaDecode<'_> {
    type Dims = MlaDecodeDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::MlaDecode,
        summary: "MLA decode over a paged latent cache, FlashMLA semantics (SPEC §4)",
        tensors: &[
            input(
                "q",
                ACT_DTYPES,
                "[b, s_q, h_q, d] bf16/f32/f16 (d = 576 for DeepSeek)",
            ),
            input(
                "kcache",
                ACT_DTYPES,
                "[num_blocks, block_size, h_kv, d], converted to q's dtype; V = first head_dim_v channels",
            ),
            input(
                "block_table",
                &[DType::I32],
                "[b, max_blocks] i32/i64 (used as i32)",
            ),
            input("cache_seqlens", &[DType::I32], "[b] i32/i64 (used as i32)"),
            output(
                "out",
                ACT_DTYPES,
                "[b, s_q, h_q, head_dim_v], bf16 when q is bf16, else f32",
            ),
            output(
                "lse",
                &[DType::F32],
                "[b, h_q, s_q] f32, natural log; +inf for empty rows",
            ),
        ],
        params: &[
            computed(
                "softmax_scale",
                ParamKind::Float,
                "d^-0.5, d = last dim of q",
                "scale of q·kᵀ",
            ),
            param(
                "causal",
                ParamKind::Bool,
                "false",
                "bottom-right aligned causal mask (meaningful for s_q > 1)",
            ),
            param(
                "head_dim_v",
                ParamKind::Int,
                "512",
                "channels of V (the first of K)",
            ),
        ],
    };
    fn validate(&self) -> Result<MlaDecodeDims> {
        const OP: &str = "mla_decode";
        expect_dtype(OP, "kcache", self.kcache, &[self.q.dtype()])?;
        let qs = expect_rank(OP, "q", self.q, 4, "[b, s_q, h_q, d]")?;
        let (b, s_q, h_q, d) = (qs[0], qs[1], qs[2], qs[3]);
        let ks = expect_rank(
            OP,
            "kcache",
            self.kcache,
            4,
            "[num_blocks, block_size, h_kv, d]",
        )?;
        let (num_blocks, block_size, h_kv) = (ks[0], ks[1], ks[2]);
        expect_shape(
            OP,
            "kcache",
            self.kcache,
            &[num_blocks, block_size, h_kv, d],
            "[num_blocks, block_size, h_kv, d] (d from q)",
        )?;
        ensure(block_size > 0, OP, "kcache", || {
            "block_size must be > 0".into()
        })?;
        ensure(h_kv > 0 && h_q % h_kv == 0, OP, "kcache", || {
            format!("h_q = {h_q} must be a multiple of h_kv = {h_kv}")
        })?;
        let bt = expect_rank(OP, "block_table", self.block_table, 2, "[b, max_blocks]")?;
        let max_blocks = bt[1];
        expect_shape(
            OP,
            "block_table",
            self.block_table,
            &[b, max_blocks],
            "[b, max_blocks]",
        )?;
        expect_shape(OP, "cache_seqlens", self.cache_seqlens, &[b], "[b]")?;
        let os = expect_rank(OP, "out", self.out, 4, "[b, s_q, h_q, dv]")?;
        let dv = os[3];
        ensure(dv <= d, OP, "out", || {
            format!("head_dim_v = {dv} exceeds the K head dim {d}")
        })?;
        expect_shape(OP, "out", self.out, &[b, s_q, h_q, dv], "[b, s_q, h_q, dv]")?;
        expect_shape(OP, "lse", self.lse, &[b, h_q, s_q], "[b, h_q, s_q]")?;
        ensure(
            self.softmax_scale.is_finite() && self.softmax_scale > 0.0,
            OP,
            "softmax_scale",
            || format!("must be finite and > 0, got {}", self.softmax_scale),
        )?;
        Ok(MlaDecodeDims {
            batch: b,
            s_q,
            h_q,
            h_kv,
            d,
            dv,
            num_blocks,
            block_size,
            max_blocks,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", self.q),
            ("kcache", self.kcache),
            ("block_table", self.block_table),
            ("cache_seqlens", self.cache_seqlens),
            ("out", &*self.out),
            ("lse", &*self.lse),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out), ("lse", &mut *self.lse)]
    }
}

/// Which of the two equivalent MLA prefill forms to compute (SPEC.md §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlaForm {
    /// Expand `wkv_b · c` into per-head `k_nope` and `v`.
    Naive,
    /// Absorb `W_UK` into the query and `W_UV` into the output (DeepSeek's default).
    #[default]
    Absorbed,
}

impl MlaForm {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "naive" => Some(Self::Naive),
            "absorb" | "absorbed" => Some(Self::Absorbed),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Absorbed => "absorb",
        }
    }
}

/// Causal MLA attention for prefill over a contiguous latent cache.
///
/// * `q_nope [T, H, dn]`, `q_pe [T, H, dr]` (rope already applied);
/// * `latent [S, dc]` (the normalized `c`), `k_pe [S, dr]` (roped, shared
///   by all heads), `S ≥ T`; query `j` sits at position `S − T + j` and
///   sees keys `[0, S − T + j]`;
/// * `wkv_b [H·(dn + dv), dc]`: for head `h`, rows `h·(dn+dv) ..+dn` are
///   `W_UK`, the next `dv` rows are `W_UV` (Hugging Face `kv_b_proj`);
/// * `out [T, H, dv]`.
///
/// Naive: `k = [W_UK·c ‖ k_pe]`, `v = W_UV·c`. Absorbed: scores
/// `(q_nope·W_UK)·c + q_pe·k_pe`, `out = W_UV·Σ p·c`. Both must agree.
#[derive(Debug)]
pub struct MlaPrefill<'a> {
    pub q_nope: &'a Tensor,
    pub q_pe: &'a Tensor,
    pub latent: &'a Tensor,
    pub k_pe: &'a Tensor,
    pub wkv_b: &'a Tensor,
    pub out: &'a mut Tensor,
    pub softmax_scale: f32,
    pub form: MlaForm,
}

#[derive(Clone, Debug)]
pub struct MlaPrefillDims {
    pub t: usize,
    pub s: usize,
    pub heads: usize,
    pub dn: usize,
    pub dr: usize,
    pub dc: usize,
    pub dv: usize,
}

impl OpArgs for MlaPrefill<'_> {
    type Dims = MlaPrefillDims;
    const DECL: &'static OpDecl = &OpDecl {
        kind: OpKind::MlaPrefill,
        summary: "causal MLA prefill over a contiguous latent cache, naive or absorbed (SPEC §5)",
        tensors: &[
            input("q_nope", ACT_DTYPES, "[T, H, dn] f32/bf16/f16"),
            input("q_pe", ACT_DTYPES, "[T, H, dr] (rope applied)"),
            input("latent", ACT_DTYPES, "[S, dc] normalized latent c, S >= T"),
            input("k_pe", ACT_DTYPES, "[S, dr] roped key shared by all heads"),
            input(
                "wkv_b",
                ACT_DTYPES,
                "[H·(dn + head_dim_v), dc] kv_b_proj: per head dn rows W_UK then head_dim_v rows W_UV",
            ),
            output(
                "out",
                ACT_DTYPES,
                "[T, H, head_dim_v], bf16 when q_nope is bf16, else f32",
            ),
        ],
        params: &[
            computed(
                "softmax_scale",
                ParamKind::Float,
                "(dn + dr)^-0.5",
                "scale of the attention scores",
            ),
            param(
                "form",
                ParamKind::Choice(&["naive", "absorb"]),
                "absorb",
                "naive: expand kv_b_proj·c per head; absorb: fold W_UK/W_UV into q and out",
            ),
            param("head_dim_v", ParamKind::Int, "128", "V head dim dv"),
        ],
    };
    fn validate(&self) -> Result<MlaPrefillDims> {
        const OP: &str = "mla_prefill";
        let qn = expect_rank(OP, "q_nope", self.q_nope, 3, "[T, H, dn]")?;
        let (t, h, dn) = (qn[0], qn[1], qn[2]);
        let qp = expect_rank(OP, "q_pe", self.q_pe, 3, "[T, H, dr]")?;
        let dr = qp[2];
        expect_shape(OP, "q_pe", self.q_pe, &[t, h, dr], "[T, H, dr]")?;
        let ls = expect_rank(OP, "latent", self.latent, 2, "[S, dc]")?;
        let (s, dc) = (ls[0], ls[1]);
        ensure(s >= t, OP, "latent", || {
            format!("holds S = {s} positions, fewer than the T = {t} queries")
        })?;
        expect_shape(OP, "k_pe", self.k_pe, &[s, dr], "[S, dr]")?;
        let os = expect_rank(OP, "out", self.out, 3, "[T, H, dv]")?;
        let dv = os[2];
        expect_shape(OP, "out", self.out, &[t, h, dv], "[T, H, dv]")?;
        expect_shape(
            OP,
            "wkv_b",
            self.wkv_b,
            &[h * (dn + dv), dc],
            "[H·(dn+dv), dc]",
        )?;
        ensure(
            self.softmax_scale.is_finite() && self.softmax_scale > 0.0,
            OP,
            "softmax_scale",
            || format!("must be finite and > 0, got {}", self.softmax_scale),
        )?;
        Ok(MlaPrefillDims {
            t,
            s,
            heads: h,
            dn,
            dr,
            dc,
            dv,
        })
    }
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q_nope", self.q_nope),
            ("q_pe", self.q_pe),
            ("latent", self.latent),
            ("k_pe", self.k_pe),
            ("wkv_b", self.wkv_b),
            ("out", &*self.out),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}
