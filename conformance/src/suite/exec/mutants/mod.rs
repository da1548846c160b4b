//! Backends that are wrong on purpose, to measure how sharp the catalogue is.
//!
//! * [`LIBRARY`]: *semantic* mutants — each one small, realistic kernel bug
//!   (a wrong scale index, a rounding mode, a mask alignment, a forgotten
//!   parameter…) switched on alone inside an otherwise correct backend
//!   ([`Semantic`], which is `cpu-ref` everywhere else). Most are a correct
//!   `cpu-ref` call with a modified input or parameter, or a
//!   post-transformation of its output; the few that a wrapper cannot
//!   express run a small kernel of this module ([`kernels`]) whose bug-free
//!   configuration is itself checked to be conformant
//!   ([`Semantic::controls`]). Every entry names the real-world failure it
//!   stands for.
//! * [`matrix`]: runs a profile against each mutant (optionally as a
//!   bf16-only device would, which reports NotSupported for f32 and f16
//!   activations) and prints the mutant × profile matrix
//!   (`deepport mutants`).
//! * `wholesale` (tests only): backends that perturb every output, write
//!   nothing, panic, or implement nothing.
//!
//! Nothing here is registered as a backend: the mutants exist only to test
//! the suite.

mod kernels;
pub mod matrix;
#[cfg(test)]
mod wholesale;

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::comm::Communicator;
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};
use deepport_cpu::CpuRef;
use kernels::{ActQuantBug, Fp8Bug, GateBug, NormBug};

/// One bug of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    // FP8 GEMM family
    Fp8AccumBf16,
    Fp8ScaleTileN96,
    Fp8ScaleTransposed,
    Fp8ActScalePerToken,
    MaskedDropsLastRow,
    ContiguousGroupFromTileEnd,
    // act_quant
    ActQuantNoAmaxFloor,
    ActQuantTruncatingCast,
    ActQuantUe8m0RoundDown,
    // MLA
    MlaDefaultScale,
    MlaLseLog2,
    MlaCausalTopLeft,
    MlaDropsLastKey,
    MlaKvHeadModulo,
    MlaBlockTableIgnored,
    PrefillDefaultScale,
    // RMSNorm
    NormEpsOutsideSqrt,
    NormDefaultEps,
    NormSumSquaresBf16,
    // RoPE
    RopeHalfSplit,
    RopeNoMscale,
    RopeMscaleNotRatio,
    RopeYarnIgnored,
    RopeLayoutIgnored,
    // DeepSeek-V3.2 FP8 caches
    CacheScaleUe8m0,
    SparseScaleUe8m0,
    // MoE gate
    GateNoBias,
    GateNoRouteScale,
    GateTop1GroupScore,
    GateWeightsFromBiased,
    // expert parallelism
    LlDispatchUe8m0Ignored,
    LlCombineUnweighted,
    LlCombineWeightsTwice,
    /// Not a bug: routes the ops the library's own kernels implement
    /// through them with every bug off (see [`Semantic::controls`]).
    Control(Control),
}

/// Which own kernel a control backend exercises bug-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Fp8,
    ActQuant,
    RmsNorm,
    MoeGate,
}

/// A mutant of the library: its name, the bug, the ops it changes and the
/// real-world failure it stands for.
#[derive(Clone, Copy, Debug)]
pub struct MutantInfo {
    pub name: &'static str,
    pub bug: Bug,
    pub ops: &'static [OpKind],
    pub failure: &'static str,
}

const FP8_OPS: &[OpKind] = &[
    OpKind::Fp8Gemm,
    OpKind::Fp8GroupedContiguous,
    OpKind::Fp8GroupedMasked,
];

macro_rules! m {
    ($name:literal, $bug:ident, $ops:expr, $failure:literal) => {
        MutantInfo {
            name: $name,
            bug: Bug::$bug,
            ops: $ops,
            failure: $failure,
        }
    };
}

/// The semantic mutants, one realistic bug each.
pub const LIBRARY: &[MutantInfo] = &[
    m!("fp8_accum_bf16", Fp8AccumBf16, FP8_OPS,
       "no FP32 promotion: the running GEMM accumulator is held in bf16 between 128-K blocks (a port that promotes DeepGEMM's per-block sums into a low-precision register); the error grows with K"),
    m!("fp8_scale_tile_n96", Fp8ScaleTileN96, FP8_OPS,
       "one weight scale per BLOCK_N = 96 output tile, read at the tile's first row: a tile that straddles a 128-row scale block uses the wrong sb for its upper rows (DeepGEMM loads two scales there)"),
    m!("fp8_scale_transposed", Fp8ScaleTransposed, FP8_OPS,
       "weight_scale_inv indexed K-major (sb[kb, n/128]) instead of [n/128, kb]: a row-/column-major mixup of the scale tensor"),
    m!("fp8_act_scale_per_token", Fp8ActScalePerToken, FP8_OPS,
       "activation scale read once per token (sa[m, 0]) instead of per 128-wide K block: per-token scaling confused with DeepSeek's 1×128 groups"),
    m!("masked_drops_last_row", MaskedDropsLastRow, &[OpKind::Fp8GroupedMasked],
       "masked-M loop bound off by one (rows < masked_m − 1): each expert's last token is never computed"),
    m!("contiguous_group_from_tile_end", ContiguousGroupFromTileEnd, &[OpKind::Fp8GroupedContiguous],
       "the grouped-contiguous scheduler reads the expert id at the last row of each 128-row M tile: a tile that ends in padding (-1) is skipped whole"),
    m!("act_quant_no_amax_floor", ActQuantNoAmaxFloor, &[OpKind::ActQuant],
       "amax without the 1e-4 floor: an all-zero group gets scale 0 and q = 0/0 = NaN"),
    m!("act_quant_truncating_cast", ActQuantTruncatingCast, &[OpKind::ActQuant],
       "f32 → e4m3 conversion that truncates (rounds toward zero) instead of rounding to nearest even: a software FP8 encoder with the wrong rounding mode"),
    m!("act_quant_ue8m0_round_down", ActQuantUe8m0RoundDown, &[OpKind::ActQuant],
       "UE8M0 scale taken as the f32 scale's exponent byte (rounded down, not up, to a power of two): quantized values overflow 448 and saturate"),
    m!("mla_default_softmax_scale", MlaDefaultScale, &[OpKind::MlaDecode],
       "MLA decode ignores the given softmax_scale and uses 576^-0.5 (the V3 model passes 192^-0.5·mscale²)"),
    m!("mla_lse_log2", MlaLseLog2, &[OpKind::MlaDecode],
       "lse returned in base 2 (exp2-based online softmax without converting back to natural log)"),
    m!("mla_causal_top_left", MlaCausalTopLeft, &[OpKind::MlaDecode],
       "causal mask aligned top-left (query j sees keys [0, j]) instead of FlashMLA's bottom-right alignment"),
    m!("mla_drops_last_key", MlaDropsLastKey, &[OpKind::MlaDecode],
       "off-by-one in the key loop (t < seqlen − 1): the newest token of every sequence is never attended"),
    m!("mla_kv_head_modulo", MlaKvHeadModulo, &[OpKind::MlaDecode],
       "query head h reads kv head h % h_kv instead of h / (h_q/h_kv): the GQA head mapping interleaved instead of blocked"),
    m!("mla_block_table_ignored", MlaBlockTableIgnored, &[OpKind::MlaDecode],
       "paged cache read as if logical page j were physical page j: the block table is not applied"),
    m!("prefill_default_softmax_scale", PrefillDefaultScale, &[OpKind::MlaPrefill],
       "MLA prefill ignores the given softmax_scale and uses (dn + dr)^-0.5, dropping YaRN's mscale²"),
    m!("norm_eps_outside_sqrt", NormEpsOutsideSqrt, &[OpKind::RmsNorm],
       "RMSNorm with eps outside the square root: x / (sqrt(mean(x²)) + eps)"),
    m!("norm_default_eps", NormDefaultEps, &[OpKind::RmsNorm],
       "RMSNorm ignores the given eps and uses a hard-coded 1e-6"),
    m!("norm_sum_squares_bf16", NormSumSquaresBf16, &[OpKind::RmsNorm],
       "RMSNorm accumulates the sum of squares in bf16 (the input dtype) instead of f32"),
    m!("rope_half_split", RopeHalfSplit, &[OpKind::Rope],
       "RoPE rotates half-split pairs (x[i], x[i + d/2]) (GPT-NeoX / rotate_half style) instead of DeepSeek's interleaved pairs (x[2i], x[2i+1])"),
    m!("rope_no_mscale", RopeNoMscale, &[OpKind::Rope],
       "YaRN without the cos/sin factor mscale(f, mscale)/mscale(f, mscale_all_dim)"),
    m!("rope_mscale_not_ratio", RopeMscaleNotRatio, &[OpKind::Rope],
       "YaRN cos/sin multiplied by mscale(f, mscale) alone, without dividing by mscale(f, mscale_all_dim) (1.369 for V3 instead of 1)"),
    m!("rope_yarn_ignored", RopeYarnIgnored, &[OpKind::Rope],
       "rope_scaling not read: plain RoPE frequencies instead of YaRN's ramped ones"),
    m!("rope_layout_ignored", RopeLayoutIgnored, &[OpKind::Rope],
       "the rope layout is not read: interleaved pairs where half-split pairs are required (the first DeepSeek-V3.2 reference's indexer RoPE; a silent quality loss past 2048 tokens)"),
    m!("cache_scale_ue8m0", CacheScaleUe8m0, &[OpKind::CacheQuant],
       "the FP8 cache writer always rounds its scales up to powers of two (an e8m0 path taken for a cache whose scales are floats)"),
    m!("sparse_scale_ue8m0", SparseScaleUe8m0, &[OpKind::SparseMlaDecode],
       "sparse decode applies the latent cache's scales through an e8m0 path (rounded up to powers of two): right only when the writer's scales were powers of two"),
    m!("gate_no_bias", GateNoBias, &[OpKind::MoeGate],
       "e_score_correction_bias not added before selection (noaux_tc treated as plain top-k)"),
    m!("gate_no_route_scale", GateNoRouteScale, &[OpKind::MoeGate],
       "routed_scaling_factor not applied to the normalized weights"),
    m!("gate_top1_group_score", GateTop1GroupScore, &[OpKind::MoeGate],
       "group score = the best expert of the group instead of the sum of its top two"),
    m!("gate_weights_from_biased", GateWeightsFromBiased, &[OpKind::MoeGate],
       "routing weights normalized from the biased scores s + bias instead of the sigmoid scores"),
    m!("ll_dispatch_ue8m0_ignored", LlDispatchUe8m0Ignored, &[OpKind::LowLatencyDispatch],
       "low-latency dispatch ignores the UE8M0 flag and ships float scales"),
    m!("ll_combine_unweighted", LlCombineUnweighted, &[OpKind::LowLatencyCombine],
       "low-latency combine sums the expert outputs without the gate weights"),
    m!("ll_combine_weights_twice", LlCombineWeightsTwice, &[OpKind::LowLatencyCombine],
       "gate weights applied twice (the expert already weighted its output and combine weights it again)"),
];

/// The mutants of DeepSeek-V3.2's failures: the cases that catch them
/// (half-split rope, the V3.2 caches) are in `smoke`, `full` and `v32`,
/// never in `v3-mustpass`.
pub const BEYOND_V3: &[&str] = &[
    "rope_layout_ignored",
    "cache_scale_ue8m0",
    "sparse_scale_ue8m0",
];

/// The mutant of this name.
pub fn find(name: &str) -> Option<&'static MutantInfo> {
    LIBRARY.iter().find(|m| m.name == name)
}

/// `cpu-ref` with one bug switched on; with `bf16_only`, it also answers
/// NotSupported for every op whose activations (tensors other than the
/// op's f32 scales, lse and routing weights) are f32 or f16, as a
/// bf16-only device would.
#[derive(Clone, Copy, Debug)]
pub struct Semantic {
    pub bug: Bug,
    pub bf16_only: bool,
}

impl Semantic {
    pub fn new(bug: Bug, bf16_only: bool) -> Self {
        Self { bug, bf16_only }
    }

    /// The library's own kernels with every bug off, each with the ops it
    /// serves: they must be conformant wherever they run.
    pub fn controls() -> Vec<(Semantic, &'static [OpKind])> {
        vec![
            (Semantic::new(Bug::Control(Control::Fp8), false), FP8_OPS),
            (
                Semantic::new(Bug::Control(Control::ActQuant), false),
                &[OpKind::ActQuant],
            ),
            (
                Semantic::new(Bug::Control(Control::RmsNorm), false),
                &[OpKind::RmsNorm],
            ),
            (
                Semantic::new(Bug::Control(Control::MoeGate), false),
                &[OpKind::MoeGate],
            ),
        ]
    }

    fn fp8_bug(&self) -> Option<Fp8Bug> {
        match self.bug {
            Bug::Fp8AccumBf16 => Some(Fp8Bug::AccumBf16),
            Bug::Fp8ScaleTileN96 => Some(Fp8Bug::ScaleTileN96),
            Bug::Control(Control::Fp8) => Some(Fp8Bug::None),
            _ => None,
        }
    }
}

/// How many of an op's tensors are f32 by its definition (scales, lse,
/// routing weights), so that a bf16-only device still accepts them.
fn fixed_f32(op: OpKind, dtypes: &[DType]) -> usize {
    match op {
        OpKind::ActQuant | OpKind::WeightDequant | OpKind::MlaDecode => 1,
        OpKind::Fp8Gemm | OpKind::Fp8GroupedContiguous | OpKind::Fp8GroupedMasked => 2,
        // x, weight, [bias,] topk_idx, topk_weights
        OpKind::MoeGate => 1 + usize::from(dtypes.len() == 5),
        OpKind::LowLatencyCombine => 1,
        // weights, logits / logits / [attn_sink,] lse
        OpKind::IndexerLogits | OpKind::SparseMlaDecode => 2,
        OpKind::IndexerTopk => 1,
        // [attn_sink,] max_logits, lse
        OpKind::SparseMlaPrefill => 3,
        _ => 0,
    }
}

/// Whether a bf16-only device takes this op with these dtypes.
pub fn bf16_only_supports(op: OpKind, dtypes: &[DType]) -> bool {
    let f32s = dtypes.iter().filter(|&&d| d == DType::F32).count();
    !dtypes.contains(&DType::F16) && f32s <= fixed_f32(op, dtypes)
}

fn dl(t: &Tensor) -> Result<HostTensor> {
    CpuRef.download(t)
}

fn up(h: &HostTensor) -> Result<Tensor> {
    CpuRef.upload(h)
}

fn put(t: &mut Tensor, h: &HostTensor) -> Result<()> {
    CpuRef.write(t, h)
}

macro_rules! plain {
    ($($m:ident: $t:ident),* $(,)?) => {$(
        fn $m(&self, op: &mut Checked<$t<'_>>) -> Result<()> {
            CpuRef.$m(op)
        }
    )*};
}

impl Backend for Semantic {
    fn name(&self) -> &str {
        "mutant"
    }
    fn instance(&self) -> InstanceId {
        CpuRef.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo::default()
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        if self.bf16_only && !bf16_only_supports(op, dtypes) {
            Support::NotSupported(format!("{op}: this device computes in bf16 only"))
        } else {
            Support::Supported
        }
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        CpuRef.alloc(dtype, shape)
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        CpuRef.upload(host)
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        CpuRef.download(t)
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        CpuRef.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    plain! {
        weight_dequant: WeightDequant, gemm: Gemm, silu_mul: SiluMul,
        gemm_grouped_contiguous: GemmGroupedContiguous, gemm_grouped_masked: GemmGroupedMasked,
        embedding: Embedding, add: Add, copy_window: CopyWindow,
        get_dispatch_layout: GetDispatchLayout, gather_rows: GatherRows, reduce_rows: ReduceRows,
        indexer_logits: IndexerLogits, indexer_topk: IndexerTopk,
    }

    fn cache_quant(&self, op: &mut Checked<CacheQuant<'_>>) -> Result<()> {
        if self.bug != Bug::CacheScaleUe8m0 {
            return CpuRef.cache_quant(op);
        }
        let (a, _) = op.parts();
        let mut c = CacheQuant {
            x: a.x,
            cache: &mut *a.cache,
            layout: a.layout,
            ue8m0: true,
        }
        .check()?;
        CpuRef.cache_quant(&mut c)
    }

    fn sparse_mla_decode(&self, op: &mut Checked<SparseMlaDecode<'_>>) -> Result<()> {
        if self.bug != Bug::SparseScaleUe8m0 {
            return CpuRef.sparse_mla_decode(op);
        }
        let (a, _) = op.parts();
        let h = dl(a.kcache)?;
        let mut bytes = h.bytes().to_vec();
        for tok in bytes.chunks_mut(V32_TOKEN_BYTES) {
            for g in 0..V32_NOPE / QBLOCK {
                let at = V32_NOPE + 4 * g;
                let s = f32::from_le_bytes([tok[at], tok[at + 1], tok[at + 2], tok[at + 3]]);
                let r = deepport_core::formats::ue8m0_round_up(s);
                tok[at..at + 4].copy_from_slice(&r.to_le_bytes());
            }
        }
        let k = up(&HostTensor::from_bytes(h.dtype(), h.shape(), bytes)?)?;
        let mut c = SparseMlaDecode {
            q: a.q,
            kcache: &k,
            indices: a.indices,
            topk_length: a.topk_length,
            attn_sink: a.attn_sink,
            out: &mut *a.out,
            lse: &mut *a.lse,
            softmax_scale: a.softmax_scale,
        }
        .check()?;
        CpuRef.sparse_mla_decode(&mut c)
    }

    fn act_quant(&self, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
        let bug = match self.bug {
            Bug::ActQuantNoAmaxFloor => ActQuantBug::NoAmaxFloor,
            Bug::ActQuantTruncatingCast => ActQuantBug::TruncatingCast,
            Bug::ActQuantUe8m0RoundDown => ActQuantBug::Ue8m0RoundDown,
            Bug::Control(Control::ActQuant) => ActQuantBug::None,
            _ => return CpuRef.act_quant(op),
        };
        kernels::act_quant(op, bug)
    }

    fn fp8_gemm(&self, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
        if let Some(bug) = self.fp8_bug() {
            return kernels::fp8_gemm(op, bug);
        }
        let (a, _) = op.parts();
        let Some((sa, sb)) = self.fp8_scales(a.sa, a.sb)? else {
            return CpuRef.fp8_gemm(op);
        };
        let mut c = Fp8Gemm {
            a: a.a,
            sa: &sa,
            b: a.b,
            sb: &sb,
            d: &mut *a.d,
        }
        .check()?;
        CpuRef.fp8_gemm(&mut c)
    }

    fn fp8_grouped_contiguous(&self, op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
        if let Some(bug) = self.fp8_bug() {
            return kernels::fp8_grouped_contiguous(op, bug);
        }
        let (a, _) = op.parts();
        let m_indices = if self.bug == Bug::ContiguousGroupFromTileEnd {
            let h = dl(a.m_indices)?;
            let idx = h.to_i64_vec();
            let m = idx.len();
            let v: Vec<i64> = (0..m)
                .map(|i| {
                    let end = ((i / QBLOCK) * QBLOCK + QBLOCK - 1).min(m - 1);
                    if idx[end] < 0 || idx[i] < 0 {
                        -1
                    } else {
                        idx[end]
                    }
                })
                .collect();
            Some(up(&HostTensor::from_index(h.dtype(), h.shape(), &v))?)
        } else {
            None
        };
        let scales = self.fp8_scales(a.sa, a.sb)?;
        if m_indices.is_none() && scales.is_none() {
            return CpuRef.fp8_grouped_contiguous(op);
        }
        let (sa, sb) = match &scales {
            Some((sa, sb)) => (sa, sb),
            None => (a.sa, a.sb),
        };
        let mut c = Fp8GroupedContiguous {
            a: a.a,
            sa,
            b: a.b,
            sb,
            m_indices: m_indices.as_ref().unwrap_or(a.m_indices),
            d: &mut *a.d,
        }
        .check()?;
        CpuRef.fp8_grouped_contiguous(&mut c)
    }

    fn fp8_grouped_masked(&self, op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
        if let Some(bug) = self.fp8_bug() {
            return kernels::fp8_grouped_masked(op, bug);
        }
        let (a, _) = op.parts();
        let masked = if self.bug == Bug::MaskedDropsLastRow {
            let h = dl(a.masked_m)?;
            let v: Vec<i64> = h.to_i64_vec().iter().map(|&m| (m - 1).max(0)).collect();
            Some(up(&HostTensor::from_index(h.dtype(), h.shape(), &v))?)
        } else {
            None
        };
        let scales = self.fp8_scales(a.sa, a.sb)?;
        if masked.is_none() && scales.is_none() {
            return CpuRef.fp8_grouped_masked(op);
        }
        let (sa, sb) = match &scales {
            Some((sa, sb)) => (sa, sb),
            None => (a.sa, a.sb),
        };
        let mut c = Fp8GroupedMasked {
            a: a.a,
            sa,
            b: a.b,
            sb,
            masked_m: masked.as_ref().unwrap_or(a.masked_m),
            d: &mut *a.d,
        }
        .check()?;
        CpuRef.fp8_grouped_masked(&mut c)
    }

    fn mla_decode(&self, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
        match self.bug {
            Bug::MlaDefaultScale => {
                let (a, dims) = op.parts();
                let mut c = MlaDecode {
                    q: a.q,
                    kcache: a.kcache,
                    block_table: a.block_table,
                    cache_seqlens: a.cache_seqlens,
                    out: &mut *a.out,
                    lse: &mut *a.lse,
                    softmax_scale: (dims.d as f32).powf(-0.5),
                    causal: a.causal,
                }
                .check()?;
                CpuRef.mla_decode(&mut c)
            }
            Bug::MlaLseLog2 => {
                CpuRef.mla_decode(op)?;
                let a = op.args_mut();
                let h = dl(a.lse)?;
                let v: Vec<f32> = h
                    .to_f32_vec()
                    .iter()
                    .map(|&x| x / std::f32::consts::LN_2)
                    .collect();
                put(a.lse, &HostTensor::from_f32(DType::F32, h.shape(), &v))
            }
            Bug::MlaDropsLastKey => {
                let (a, _) = op.parts();
                let h = dl(a.cache_seqlens)?;
                let v: Vec<i64> = h.to_i64_vec().iter().map(|&l| (l - 1).max(0)).collect();
                let lens = up(&HostTensor::from_index(h.dtype(), h.shape(), &v))?;
                let mut c = MlaDecode {
                    q: a.q,
                    kcache: a.kcache,
                    block_table: a.block_table,
                    cache_seqlens: &lens,
                    out: &mut *a.out,
                    lse: &mut *a.lse,
                    softmax_scale: a.softmax_scale,
                    causal: a.causal,
                }
                .check()?;
                CpuRef.mla_decode(&mut c)
            }
            Bug::MlaBlockTableIgnored => {
                let (a, dims) = op.parts();
                let h = dl(a.block_table)?;
                let nb = dims.num_blocks.max(1);
                let v: Vec<i64> = (0..h.numel())
                    .map(|i| ((i % dims.max_blocks.max(1)) % nb) as i64)
                    .collect();
                let table = up(&HostTensor::from_index(h.dtype(), h.shape(), &v))?;
                let mut c = MlaDecode {
                    q: a.q,
                    kcache: a.kcache,
                    block_table: &table,
                    cache_seqlens: a.cache_seqlens,
                    out: &mut *a.out,
                    lse: &mut *a.lse,
                    softmax_scale: a.softmax_scale,
                    causal: a.causal,
                }
                .check()?;
                CpuRef.mla_decode(&mut c)
            }
            Bug::MlaCausalTopLeft => kernels::mla_causal_top_left(op),
            Bug::MlaKvHeadModulo => kernels::mla_kv_head_modulo(op),
            _ => CpuRef.mla_decode(op),
        }
    }

    fn mla_prefill(&self, op: &mut Checked<MlaPrefill<'_>>) -> Result<()> {
        if self.bug != Bug::PrefillDefaultScale {
            return CpuRef.mla_prefill(op);
        }
        let (a, dims) = op.parts();
        let mut c = MlaPrefill {
            q_nope: a.q_nope,
            q_pe: a.q_pe,
            latent: a.latent,
            k_pe: a.k_pe,
            wkv_b: a.wkv_b,
            out: &mut *a.out,
            softmax_scale: ((dims.dn + dims.dr) as f32).powf(-0.5),
            form: a.form,
        }
        .check()?;
        CpuRef.mla_prefill(&mut c)
    }

    fn rms_norm(&self, op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
        let bug = match self.bug {
            Bug::NormEpsOutsideSqrt => NormBug::EpsOutsideSqrt,
            Bug::NormSumSquaresBf16 => NormBug::SumSquaresBf16,
            Bug::Control(Control::RmsNorm) => NormBug::None,
            Bug::NormDefaultEps => {
                let a = op.args_mut();
                let mut c = RmsNorm {
                    x: a.x,
                    weight: a.weight,
                    y: &mut *a.y,
                    eps: 1e-6,
                }
                .check()?;
                return CpuRef.rms_norm(&mut c);
            }
            _ => return CpuRef.rms_norm(op),
        };
        kernels::rms_norm(op, bug)
    }

    fn rope(&self, op: &mut Checked<Rope<'_>>) -> Result<()> {
        let a = op.args_mut();
        let mut config = a.config;
        match (self.bug, config.yarn.as_mut()) {
            (Bug::RopeHalfSplit, _) => return kernels::rope_half_split(op),
            (Bug::RopeNoMscale, Some(y)) => y.mscale = y.mscale_all_dim,
            (Bug::RopeMscaleNotRatio, Some(y)) => y.mscale_all_dim = 0.0,
            (Bug::RopeYarnIgnored, Some(_)) => config.yarn = None,
            (Bug::RopeLayoutIgnored, _) => config.layout = RopeLayout::Interleaved,
            _ => return CpuRef.rope(op),
        }
        let mut c = Rope {
            x: a.x,
            positions: a.positions,
            y: &mut *a.y,
            config,
        }
        .check()?;
        CpuRef.rope(&mut c)
    }

    fn moe_gate(&self, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
        let bug = match self.bug {
            Bug::GateTop1GroupScore => GateBug::Top1GroupScore,
            Bug::GateWeightsFromBiased => GateBug::WeightsFromBiased,
            Bug::Control(Control::MoeGate) => GateBug::None,
            Bug::GateNoBias | Bug::GateNoRouteScale => {
                let a = op.args_mut();
                let no_bias = self.bug == Bug::GateNoBias;
                let mut c = MoeGate {
                    x: a.x,
                    weight: a.weight,
                    bias: if no_bias { None } else { a.bias },
                    topk_idx: &mut *a.topk_idx,
                    topk_weights: &mut *a.topk_weights,
                    n_group: a.n_group,
                    topk_group: a.topk_group,
                    topk: a.topk,
                    route_scale: if no_bias { a.route_scale } else { 1.0 },
                }
                .check()?;
                return CpuRef.moe_gate(&mut c);
            }
            _ => return CpuRef.moe_gate(op),
        };
        kernels::moe_gate(op, bug)
    }

    // The expert-parallel bugs sit where a port's own dispatch/combine would
    // put them: in a native implementation, here core's protocol run on
    // changed arguments.
    fn native_low_latency_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<LowLatencyDispatch<'_>>,
    ) -> Result<Option<LowLatencyDispatchOutput>> {
        if self.bug != Bug::LlDispatchUe8m0Ignored {
            return Ok(None);
        }
        let a = op.args();
        let c = LowLatencyDispatch {
            x: a.x,
            topk_idx: a.topk_idx,
            num_experts: a.num_experts,
            max_tokens_per_rank: a.max_tokens_per_rank,
            use_fp8: a.use_fp8,
            ue8m0: false,
        }
        .check()?;
        deepport_core::ep::low_latency_dispatch(self, comm, &c).map(Some)
    }
    fn native_low_latency_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<LowLatencyCombine<'_>>,
    ) -> Result<Option<()>> {
        let f: fn(f32) -> f32 = match self.bug {
            Bug::LlCombineUnweighted => |_| 1.0,
            Bug::LlCombineWeightsTwice => |w| w * w,
            _ => return Ok(None),
        };
        let a = op.args_mut();
        let h = dl(a.topk_weights)?;
        let v: Vec<f32> = h.to_f32_vec().into_iter().map(f).collect();
        let w = up(&HostTensor::from_f32(DType::F32, h.shape(), &v))?;
        let mut c = LowLatencyCombine {
            x: a.x,
            topk_idx: a.topk_idx,
            topk_weights: &w,
            handle: a.handle,
            out: &mut *a.out,
        }
        .check()?;
        deepport_core::ep::low_latency_combine(self, comm, &mut c).map(Some)
    }
}

impl Semantic {
    /// The scales a scale-indexing mutant reads, as tensors in the layout
    /// the correct kernel expects; `None` when this mutant reads them right.
    fn fp8_scales(&self, sa: &Tensor, sb: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match self.bug {
            Bug::Fp8ScaleTransposed => {
                // Reads flat element kb_i·nb + nb_i of each group's
                // [nb, kb] block where [nb_i, kb_i] belongs.
                let h = dl(sb)?;
                let s = h.shape().to_vec();
                let (nb, kb) = (s[s.len() - 2], s[s.len() - 1]);
                let v = h.to_f32_vec();
                let mut out = v.clone();
                for g in 0..v.len() / (nb * kb).max(1) {
                    let base = g * nb * kb;
                    for i in 0..nb {
                        for j in 0..kb {
                            out[base + i * kb + j] = v[base + j * nb + i];
                        }
                    }
                }
                let sb2 = up(&HostTensor::from_f32(DType::F32, &s, &out))?;
                Ok(Some((up(&dl(sa)?)?, sb2)))
            }
            Bug::Fp8ActScalePerToken => {
                let h = dl(sa)?;
                let kb = *h.shape().last().unwrap_or(&1);
                let mut v = h.to_f32_vec();
                for row in v.chunks_mut(kb.max(1)) {
                    let first = row[0];
                    row.fill(first);
                }
                let sa2 = up(&HostTensor::from_f32(DType::F32, h.shape(), &v))?;
                Ok(Some((sa2, up(&dl(sb)?)?)))
            }
            _ => Ok(None),
        }
    }
}
