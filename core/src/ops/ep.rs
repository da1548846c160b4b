//! Expert-parallel communication ops, DeepEP V1 semantics (SPEC.md §7).
//!
//! `R` ranks, `E` experts; experts `[r·E/R, (r+1)·E/R)` live on rank `r`.
//! The ops run on every rank at once with a [`Communicator`].

use super::*;

/// Which rank owns global expert `e`.
pub fn expert_rank(e: usize, num_experts: usize, world: usize) -> usize {
    e / (num_experts / world)
}

/// Per-rank and per-expert token counts of a routing.
///
/// `topk_idx [N, k]` (i32/i64, −1 = none) → `num_tokens_per_rank [R]` i32,
/// `num_tokens_per_expert [E]` i32, `is_token_in_rank [N, R]` bool.
#[derive(Debug)]
pub struct GetDispatchLayout<'a> {
    pub topk_idx: &'a Tensor,
    pub num_tokens_per_rank: &'a mut Tensor,
    pub num_tokens_per_expert: &'a mut Tensor,
    pub is_token_in_rank: &'a mut Tensor,
    pub num_experts: usize,
    pub world_size: usize,
}

#[derive(Clone, Debug)]
pub struct LayoutDims {
    pub tokens: usize,
    pub topk: usize,
    pub num_experts: usize,
    pub world_size: usize,
}

fn check_world(op: &'static str, num_experts: usize, world: usize) -> Result<()> {
    ensure(world >= 1, op, "world_size", || "must be ≥ 1".into())?;
    ensure(
        num_experts >= world && num_experts.is_multiple_of(world),
        op,
        "num_experts",
        || format!("must be a positive multiple of the world size {world}, got {num_experts}"),
    )
}

impl OpArgs for GetDispatchLayout<'_> {
    type Dims = LayoutDims;
    const KIND: OpKind = OpKind::GetDispatchLayout;
    fn validate(&self) -> Result<LayoutDims> {
        const OP: &str = "get_dispatch_layout";
        check_world(OP, self.num_experts, self.world_size)?;
        expect_dtype(OP, "topk_idx", self.topk_idx, INDEX_DTYPES)?;
        let ts = expect_rank(OP, "topk_idx", self.topk_idx, 2, "[N, k]")?;
        let (n, k) = (ts[0], ts[1]);
        expect_dtype(
            OP,
            "num_tokens_per_rank",
            self.num_tokens_per_rank,
            &[DType::I32],
        )?;
        expect_dtype(
            OP,
            "num_tokens_per_expert",
            self.num_tokens_per_expert,
            &[DType::I32],
        )?;
        expect_dtype(
            OP,
            "is_token_in_rank",
            self.is_token_in_rank,
            &[DType::Bool],
        )?;
        expect_shape(
            OP,
            "num_tokens_per_rank",
            self.num_tokens_per_rank,
            &[self.world_size],
            "[R]",
        )?;
        expect_shape(
            OP,
            "num_tokens_per_expert",
            self.num_tokens_per_expert,
            &[self.num_experts],
            "[E]",
        )?;
        expect_shape(
            OP,
            "is_token_in_rank",
            self.is_token_in_rank,
            &[n, self.world_size],
            "[N, R]",
        )?;
        Ok(LayoutDims {
            tokens: n,
            topk: k,
            num_experts: self.num_experts,
            world_size: self.world_size,
        })
    }
    fn dtypes(&self) -> Vec<DType> {
        vec![
            self.topk_idx.dtype(),
            self.num_tokens_per_rank.dtype(),
            self.num_tokens_per_expert.dtype(),
            self.is_token_in_rank.dtype(),
        ]
    }
}

/// Normal dispatch: every token goes once to every rank that holds one of
/// its experts.
///
/// `x [N, hidden]` bf16 (or e4m3 with `x_scales [N, hidden/128]` f32),
/// `topk_idx [N, k]` (−1 = none), `topk_weights [N, k]` f32.
#[derive(Debug)]
pub struct Dispatch<'a> {
    pub x: &'a Tensor,
    pub x_scales: Option<&'a Tensor>,
    pub topk_idx: &'a Tensor,
    pub topk_weights: &'a Tensor,
    pub num_experts: usize,
    /// Each `num_recv_tokens_per_expert` entry is padded up to a multiple of this.
    pub expert_alignment: usize,
}

#[derive(Clone, Debug)]
pub struct DispatchDims {
    pub tokens: usize,
    pub hidden: usize,
    pub topk: usize,
    pub num_experts: usize,
}

impl OpArgs for Dispatch<'_> {
    type Dims = DispatchDims;
    const KIND: OpKind = OpKind::Dispatch;
    fn validate(&self) -> Result<DispatchDims> {
        const OP: &str = "dispatch";
        let xs = expect_rank(OP, "x", self.x, 2, "[N, hidden]")?;
        let (n, hidden) = (xs[0], xs[1]);
        match self.x_scales {
            None => expect_dtype(OP, "x", self.x, &[DType::BF16, DType::F32])?,
            Some(s) => {
                expect_dtype(OP, "x", self.x, E4M3_DTYPES)?;
                expect_dtype(OP, "x_scales", s, &[DType::F32])?;
                ensure(hidden % QBLOCK == 0, OP, "x", || {
                    format!("hidden = {hidden} must be a multiple of 128 with scales")
                })?;
                expect_shape(OP, "x_scales", s, &[n, hidden / QBLOCK], "[N, hidden/128]")?;
            }
        }
        expect_dtype(OP, "topk_idx", self.topk_idx, INDEX_DTYPES)?;
        let ts = expect_rank(OP, "topk_idx", self.topk_idx, 2, "[N, k]")?;
        let k = ts[1];
        expect_shape(OP, "topk_idx", self.topk_idx, &[n, k], "[N, k]")?;
        expect_dtype(OP, "topk_weights", self.topk_weights, &[DType::F32])?;
        expect_shape(OP, "topk_weights", self.topk_weights, &[n, k], "[N, k]")?;
        ensure(self.num_experts >= 1, OP, "num_experts", || {
            "must be ≥ 1".into()
        })?;
        ensure(self.expert_alignment >= 1, OP, "expert_alignment", || {
            "must be ≥ 1".into()
        })?;
        Ok(DispatchDims {
            tokens: n,
            hidden,
            topk: k,
            num_experts: self.num_experts,
        })
    }
    fn dtypes(&self) -> Vec<DType> {
        let mut v = vec![self.x.dtype()];
        if let Some(s) = self.x_scales {
            v.push(s.dtype());
        }
        v.extend([self.topk_idx.dtype(), self.topk_weights.dtype()]);
        v
    }
}

/// Routing record of a normal dispatch, consumed by [`Combine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchHandle {
    pub rank: usize,
    pub world_size: usize,
    /// Tokens this rank dispatched (N).
    pub num_tokens: usize,
    /// For each received row: (source rank, source token index).
    pub recv_src: Vec<(usize, usize)>,
    /// For each destination rank: the local token indices sent there, in order.
    pub send_plan: Vec<Vec<usize>>,
    /// Backend device state kept with the handle (core ignores it).
    pub state: crate::ep::HandleState,
}

/// What a normal dispatch returns on each rank.
#[derive(Debug)]
pub struct DispatchOutput {
    /// `[num_recv, hidden]`, rows grouped by source rank ascending, source
    /// token order within a rank; same dtype as `x`, bit-exact.
    pub recv_x: Tensor,
    /// `[num_recv, hidden/128]` f32 when `x` was FP8.
    pub recv_scales: Option<Tensor>,
    /// `[num_recv, k]` i64: local expert ids, −1 where the expert is elsewhere.
    pub recv_topk_idx: Tensor,
    /// `[num_recv, k]` f32: 0 where the expert is elsewhere.
    pub recv_topk_weights: Tensor,
    /// Per local expert, padded up to `expert_alignment`.
    pub num_recv_tokens_per_expert: Vec<usize>,
    pub handle: DispatchHandle,
}

/// Normal combine: `out[t] = bf16(Σ over ranks that received t of x_row)`,
/// f32 accumulation; weighting is the caller's job.
#[derive(Debug)]
pub struct Combine<'a> {
    /// `[num_recv, hidden]` bf16/f32, rows in the dispatch's receive order.
    pub x: &'a Tensor,
    pub handle: &'a DispatchHandle,
    /// `[N, hidden]`.
    pub out: &'a mut Tensor,
}

#[derive(Clone, Debug)]
pub struct CombineDims {
    pub num_recv: usize,
    pub hidden: usize,
    pub tokens: usize,
}

impl OpArgs for Combine<'_> {
    type Dims = CombineDims;
    const KIND: OpKind = OpKind::Combine;
    fn validate(&self) -> Result<CombineDims> {
        const OP: &str = "combine";
        expect_dtype(OP, "x", self.x, &[DType::BF16, DType::F32])?;
        expect_dtype(OP, "out", self.out, &[DType::BF16, DType::F32])?;
        let xs = expect_rank(OP, "x", self.x, 2, "[num_recv, hidden]")?;
        let (m, hidden) = (xs[0], xs[1]);
        ensure(m == self.handle.recv_src.len(), OP, "x", || {
            format!(
                "has {m} rows but the dispatch handle received {}",
                self.handle.recv_src.len()
            )
        })?;
        expect_shape(
            OP,
            "out",
            self.out,
            &[self.handle.num_tokens, hidden],
            "[N, hidden]",
        )?;
        Ok(CombineDims {
            num_recv: m,
            hidden,
            tokens: self.handle.num_tokens,
        })
    }
    fn dtypes(&self) -> Vec<DType> {
        vec![self.x.dtype(), self.out.dtype()]
    }
}

/// Low-latency dispatch: each (token, expert) pair lands in a slot of the
/// expert's buffer. `x [N, hidden]` bf16, `N ≤ max_tokens_per_rank`.
#[derive(Debug)]
pub struct LowLatencyDispatch<'a> {
    pub x: &'a Tensor,
    pub topk_idx: &'a Tensor,
    pub num_experts: usize,
    pub max_tokens_per_rank: usize,
    /// Quantize the payload to e4m3 with act_quant's rule.
    pub use_fp8: bool,
    /// With `use_fp8`: UE8M0 (power-of-two) scales.
    pub ue8m0: bool,
}

#[derive(Clone, Debug)]
pub struct LowLatencyDims {
    pub tokens: usize,
    pub hidden: usize,
    pub topk: usize,
    pub num_experts: usize,
}

impl OpArgs for LowLatencyDispatch<'_> {
    type Dims = LowLatencyDims;
    const KIND: OpKind = OpKind::LowLatencyDispatch;
    fn validate(&self) -> Result<LowLatencyDims> {
        const OP: &str = "low_latency_dispatch";
        // bf16 is DeepEP's payload; f32 serves deepport's f32 numerics mode (carried bit-exact).
        expect_dtype(OP, "x", self.x, &[DType::BF16, DType::F32])?;
        let xs = expect_rank(OP, "x", self.x, 2, "[N, hidden]")?;
        let (n, hidden) = (xs[0], xs[1]);
        ensure(n <= self.max_tokens_per_rank, OP, "x", || {
            format!(
                "has {n} tokens, more than max_tokens_per_rank = {}",
                self.max_tokens_per_rank
            )
        })?;
        if self.use_fp8 {
            ensure(hidden % QBLOCK == 0, OP, "x", || {
                format!("hidden = {hidden} must be a multiple of 128 for FP8")
            })?;
        }
        expect_dtype(OP, "topk_idx", self.topk_idx, INDEX_DTYPES)?;
        let ts = expect_rank(OP, "topk_idx", self.topk_idx, 2, "[N, k]")?;
        expect_shape(OP, "topk_idx", self.topk_idx, &[n, ts[1]], "[N, k]")?;
        ensure(self.num_experts >= 1, OP, "num_experts", || {
            "must be ≥ 1".into()
        })?;
        Ok(LowLatencyDims {
            tokens: n,
            hidden,
            topk: ts[1],
            num_experts: self.num_experts,
        })
    }
    fn dtypes(&self) -> Vec<DType> {
        vec![self.x.dtype(), self.topk_idx.dtype()]
    }
}

/// Routing record of a low-latency dispatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LowLatencyHandle {
    pub rank: usize,
    pub world_size: usize,
    pub num_experts: usize,
    pub num_tokens: usize,
    pub max_tokens_per_rank: usize,
    pub hidden: usize,
    /// Per local expert, per filled slot: (source rank, source token).
    pub recv_src: Vec<Vec<(usize, usize)>>,
    /// Backend device state kept with the handle (core ignores it).
    pub state: crate::ep::HandleState,
}

/// What a low-latency dispatch returns on each rank.
#[derive(Debug)]
pub struct LowLatencyDispatchOutput {
    /// `[E_local, max_tokens·R, hidden]`, bf16 or e4m3; slot order undefined.
    pub recv_x: Tensor,
    /// `[E_local, max_tokens·R, hidden/128]` f32 with FP8.
    pub recv_scales: Option<Tensor>,
    /// `[E_local]` i32: filled slots per local expert.
    pub recv_count: Tensor,
    pub handle: LowLatencyHandle,
}

/// Low-latency combine: `out[t] = bf16(Σ_k w[t,k] · y_{e_k}[t])`, f32
/// accumulation, −1 entries skipped.
#[derive(Debug)]
pub struct LowLatencyCombine<'a> {
    /// `[E_local, max_tokens·R, hidden]` bf16: expert outputs in dispatch slots.
    pub x: &'a Tensor,
    pub topk_idx: &'a Tensor,
    pub topk_weights: &'a Tensor,
    pub handle: &'a LowLatencyHandle,
    /// `[N, hidden]` bf16.
    pub out: &'a mut Tensor,
}

impl OpArgs for LowLatencyCombine<'_> {
    type Dims = LowLatencyDims;
    const KIND: OpKind = OpKind::LowLatencyCombine;
    fn validate(&self) -> Result<LowLatencyDims> {
        const OP: &str = "low_latency_combine";
        let h = self.handle;
        let e_local = h.num_experts / h.world_size.max(1);
        expect_dtype(OP, "x", self.x, &[DType::BF16, DType::F32])?;
        expect_shape(
            OP,
            "x",
            self.x,
            &[e_local, h.max_tokens_per_rank * h.world_size, h.hidden],
            "[E_local, max_tokens·R, hidden]",
        )?;
        expect_dtype(OP, "topk_idx", self.topk_idx, INDEX_DTYPES)?;
        let ts = expect_rank(OP, "topk_idx", self.topk_idx, 2, "[N, k]")?;
        let k = ts[1];
        expect_shape(
            OP,
            "topk_idx",
            self.topk_idx,
            &[h.num_tokens, k],
            "[N, k] (N from the handle)",
        )?;
        expect_dtype(OP, "topk_weights", self.topk_weights, &[DType::F32])?;
        expect_shape(
            OP,
            "topk_weights",
            self.topk_weights,
            &[h.num_tokens, k],
            "[N, k]",
        )?;
        expect_dtype(OP, "out", self.out, &[DType::BF16, DType::F32])?;
        expect_shape(
            OP,
            "out",
            self.out,
            &[h.num_tokens, h.hidden],
            "[N, hidden]",
        )?;
        Ok(LowLatencyDims {
            tokens: h.num_tokens,
            hidden: h.hidden,
            topk: k,
            num_experts: h.num_experts,
        })
    }
    fn dtypes(&self) -> Vec<DType> {
        vec![
            self.x.dtype(),
            self.topk_idx.dtype(),
            self.topk_weights.dtype(),
            self.out.dtype(),
        ]
    }
}
