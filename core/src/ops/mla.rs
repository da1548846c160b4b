//! Multi-head latent attention: paged decode (FlashMLA) and prefill.

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
    const KIND: OpKind = OpKind::MlaDecode;
    fn validate(&self) -> Result<MlaDecodeDims> {
        const OP: &str = "mla_decode";
        expect_dtype(OP, "q", self.q, ACT_DTYPES)?;
        expect_dtype(OP, "kcache", self.kcache, &[self.q.dtype()])?;
        expect_dtype(OP, "block_table", self.block_table, &[DType::I32])?;
        expect_dtype(OP, "cache_seqlens", self.cache_seqlens, &[DType::I32])?;
        expect_dtype(OP, "out", self.out, ACT_DTYPES)?;
        expect_dtype(OP, "lse", self.lse, &[DType::F32])?;
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
    fn dtypes(&self) -> Vec<DType> {
        vec![
            self.q.dtype(),
            self.kcache.dtype(),
            self.block_table.dtype(),
            self.cache_seqlens.dtype(),
            self.out.dtype(),
            self.lse.dtype(),
        ]
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
    const KIND: OpKind = OpKind::MlaPrefill;
    fn validate(&self) -> Result<MlaPrefillDims> {
        const OP: &str = "mla_prefill";
        for (name, t) in [
            ("q_nope", self.q_nope),
            ("q_pe", self.q_pe),
            ("latent", self.latent),
            ("k_pe", self.k_pe),
            ("wkv_b", self.wkv_b),
        ] {
            expect_dtype(OP, name, t, ACT_DTYPES)?;
        }
        expect_dtype(OP, "out", self.out, ACT_DTYPES)?;
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
    fn dtypes(&self) -> Vec<DType> {
        vec![
            self.q_nope.dtype(),
            self.q_pe.dtype(),
            self.latent.dtype(),
            self.k_pe.dtype(),
            self.wkv_b.dtype(),
            self.out.dtype(),
        ]
    }
}
