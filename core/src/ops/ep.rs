//! Expert-parallel communication ops, DeepEP V1 semantics (SPEC.md §7).
//!
//! `R` ranks, `E` experts; experts `[r·E/R, (r+1)·E/R)` live on rank `r`.
//! The ops run on every rank at once with a [`Communicator`].

use super::decl::*;
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
    const DECL: &'static OpDecl = &GET_DISPATCH_LAYOUT;
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
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("topk_idx", self.topk_idx),
            ("num_tokens_per_rank", &*self.num_tokens_per_rank),
            ("num_tokens_per_expert", &*self.num_tokens_per_expert),
            ("is_token_in_rank", &*self.is_token_in_rank),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![
            ("num_tokens_per_rank", &mut *self.num_tokens_per_rank),
            ("num_tokens_per_expert", &mut *self.num_tokens_per_expert),
            ("is_token_in_rank", &mut *self.is_token_in_rank),
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
    const DECL: &'static OpDecl = &DISPATCH;
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
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("x", self.x)];
        if let Some(s) = self.x_scales {
            v.push(("x_scales", s));
        }
        v.extend([
            ("topk_idx", self.topk_idx),
            ("topk_weights", self.topk_weights),
        ]);
        v
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        Vec::new()
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
    const DECL: &'static OpDecl = &COMBINE;
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
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("x", self.x), ("out", &*self.out)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
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
    const DECL: &'static OpDecl = &LOW_LATENCY_DISPATCH;
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
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("x", self.x), ("topk_idx", self.topk_idx)]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        Vec::new()
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
    const DECL: &'static OpDecl = &LOW_LATENCY_COMBINE;
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
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("x", self.x),
            ("topk_idx", self.topk_idx),
            ("topk_weights", self.topk_weights),
            ("out", &*self.out),
        ]
    }
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("out", &mut *self.out)]
    }
}

// ---- declarations -----------------------------------------------------------
//
// The outputs of `dispatch` and `low_latency_dispatch` are allocated by the
// backend and returned ([`DispatchOutput`], [`LowLatencyDispatchOutput`]);
// they are declared here under the names the suite and `deepport op` give
// them.

const BF16_F32: &[DType] = &[DType::BF16, DType::F32];
const I32_ONLY: &[DType] = &[DType::I32];
const F32_ONLY: &[DType] = &[DType::F32];
const EP_X: &[DType] = &[DType::BF16, DType::F32, DType::F8E4M3, DType::F8E4M3Fnuz];

const NUM_EXPERTS: ParamDecl = param(
    "num_experts",
    ParamKind::Int,
    "256",
    "experts E over all ranks (a multiple of the rank count)",
);

const GET_DISPATCH_LAYOUT: OpDecl = OpDecl {
    kind: OpKind::GetDispatchLayout,
    summary:
        "per-rank and per-expert token counts of a routing (DeepEP get_dispatch_layout, SPEC §7)",
    tensors: &[
        input(
            "topk_idx",
            INDEX_DTYPES,
            "[N, k] i32/i64 expert ids, -1 = none",
        ),
        output("num_tokens_per_rank", I32_ONLY, "[R] i32"),
        output("num_tokens_per_expert", I32_ONLY, "[E] i32"),
        output("is_token_in_rank", &[DType::Bool], "[N, R] bool"),
    ],
    params: &[
        NUM_EXPERTS,
        param("world_size", ParamKind::Int, "8", "ranks R"),
    ],
};

const DISPATCH: OpDecl = OpDecl {
    kind: OpKind::Dispatch,
    summary: "normal expert-parallel dispatch: each token once to every rank holding one of its experts (DeepEP V1, SPEC §7)",
    tensors: &[
        input("x", EP_X, "[N, hidden] bf16/f32, or e4m3 with x_scales"),
        optional_input("x_scales", F32_ONLY, "[N, hidden/128] f32 scales of an e4m3 x"),
        input("topk_idx", INDEX_DTYPES, "[N, k] i32/i64 expert ids, -1 = none"),
        input("topk_weights", F32_ONLY, "[N, k] f32"),
        output(
            "recv_x",
            EP_X,
            "[num_recv, hidden] in x's dtype, grouped by source rank, source token order",
        ),
        output("recv_src", INDEX_DTYPES, "[num_recv, 2] (source rank, source token)"),
        output(
            "num_recv_tokens_per_expert",
            INDEX_DTYPES,
            "[E_local] rows per local expert, padded to expert_alignment",
        ),
        output(
            "recv_topk_idx",
            INDEX_DTYPES,
            "[num_recv, k] i64 local expert ids, -1 where the expert is elsewhere",
        ),
        output("recv_topk_weights", F32_ONLY, "[num_recv, k] f32, 0 where the expert is elsewhere"),
        optional_output("recv_scales", F32_ONLY, "[num_recv, hidden/128] f32, with an e4m3 x"),
    ],
    params: &[
        NUM_EXPERTS,
        param(
            "expert_alignment",
            ParamKind::Int,
            "1",
            "pad each num_recv_tokens_per_expert entry up to a multiple of this",
        ),
    ],
};

const COMBINE: OpDecl = OpDecl {
    kind: OpKind::Combine,
    summary: "normal expert-parallel combine: sum of a token's rows back on its rank, f32 accumulation (SPEC §7)",
    tensors: &[
        input("x", BF16_F32, "[num_recv, hidden] bf16/f32, rows in the dispatch's receive order"),
        output("out", BF16_F32, "[N, hidden]"),
    ],
    params: &[],
};

const LOW_LATENCY_DISPATCH: OpDecl = OpDecl {
    kind: OpKind::LowLatencyDispatch,
    summary: "low-latency dispatch: each (token, expert) pair into a slot of the expert's buffer (SPEC §7)",
    tensors: &[
        input("x", BF16_F32, "[N, hidden] bf16/f32, N <= max_tokens_per_rank"),
        input("topk_idx", INDEX_DTYPES, "[N, k] i32/i64 expert ids, -1 = none"),
        output(
            "recv_x",
            EP_X,
            "[E_local, max_tokens·R, hidden] x's dtype or e4m3 (use_fp8); slot order undefined",
        ),
        output("recv_count", I32_ONLY, "[E_local] i32 filled slots per local expert"),
        optional_output(
            "recv_scales",
            F32_ONLY,
            "[E_local, max_tokens·R, hidden/128] f32, with use_fp8",
        ),
    ],
    params: &[
        NUM_EXPERTS,
        param("max_tokens_per_rank", ParamKind::Int, "128", "slots per source rank"),
        param("use_fp8", ParamKind::Bool, "false", "quantize the payload to e4m3 (act_quant's rule)"),
        param("ue8m0", ParamKind::Bool, "false", "with use_fp8: power-of-two scales"),
    ],
};

const LOW_LATENCY_COMBINE: OpDecl = OpDecl {
    kind: OpKind::LowLatencyCombine,
    summary: "low-latency combine: out[t] = Σ_k w[t,k]·y_{e_k}[t], f32 accumulation (SPEC §7)",
    tensors: &[
        input(
            "x",
            BF16_F32,
            "[E_local, max_tokens·R, hidden] expert outputs in dispatch slots",
        ),
        input("topk_idx", INDEX_DTYPES, "[N, k] i32/i64, as dispatched"),
        input("topk_weights", F32_ONLY, "[N, k] f32"),
        output("out", BF16_F32, "[N, hidden]"),
    ],
    params: &[],
};
