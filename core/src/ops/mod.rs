//! Typed op arguments, validated once, before any backend sees them.
//!
//! Each op is a struct of tensor references and parameters (`Fp8Gemm`,
//! `MlaDecode`, …). [`OpArgs::check`] validates shapes, dtypes and
//! parameters and returns a [`Checked`] value, the only form a
//! [`Backend`](crate::backend::Backend) method accepts, together with the
//! op's dimensions. [`run`] does both steps and dispatches to the backend.
//!
//! Index *values* (block-table entries, expert ids, token ids, sequence
//! lengths) live in device memory, so core cannot read them without a round
//! trip. The contract is that every backend bounds-checks each index it reads
//! and returns [`Error::IndexOutOfRange`]; the helpers in [`index`] do it
//! for host-side data, and the conformance suite tests it with out-of-range
//! inputs. Semantics of every op: `SPEC.md`.

mod copy;
mod dense;
mod ep;
pub mod index;
mod mla;
mod rows;

pub use copy::*;
pub use dense::*;
pub use ep::*;
pub use mla::*;
pub use rows::*;

use crate::backend::{Backend, Tensor};
use crate::comm::Communicator;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// `ceil(x / 128)`: the number of 128-wide quantization blocks.
pub const fn blocks128(x: usize) -> usize {
    x.div_ceil(128)
}

/// The quantization block edge of DeepSeek's FP8 formats.
pub const QBLOCK: usize = 128;

/// Every op deepport knows, for capability queries and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    ActQuant,
    WeightDequant,
    Fp8Gemm,
    Fp8GroupedContiguous,
    Fp8GroupedMasked,
    Gemm,
    MlaDecode,
    MlaPrefill,
    RmsNorm,
    Rope,
    MoeGate,
    SiluMul,
    Embedding,
    Add,
    CopyWindow,
    GatherRows,
    ReduceRows,
    GetDispatchLayout,
    Dispatch,
    Combine,
    LowLatencyDispatch,
    LowLatencyCombine,
}

impl OpKind {
    pub const ALL: [OpKind; 22] = [
        OpKind::ActQuant,
        OpKind::WeightDequant,
        OpKind::Fp8Gemm,
        OpKind::Fp8GroupedContiguous,
        OpKind::Fp8GroupedMasked,
        OpKind::Gemm,
        OpKind::MlaDecode,
        OpKind::MlaPrefill,
        OpKind::RmsNorm,
        OpKind::Rope,
        OpKind::MoeGate,
        OpKind::SiluMul,
        OpKind::Embedding,
        OpKind::Add,
        OpKind::CopyWindow,
        OpKind::GatherRows,
        OpKind::ReduceRows,
        OpKind::GetDispatchLayout,
        OpKind::Dispatch,
        OpKind::Combine,
        OpKind::LowLatencyDispatch,
        OpKind::LowLatencyCombine,
    ];

    /// Canonical snake_case name, used in case ids and reports.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::ActQuant => "act_quant",
            OpKind::WeightDequant => "weight_dequant",
            OpKind::Fp8Gemm => "fp8_gemm",
            OpKind::Fp8GroupedContiguous => "fp8_grouped_contiguous",
            OpKind::Fp8GroupedMasked => "fp8_grouped_masked",
            OpKind::Gemm => "gemm",
            OpKind::MlaDecode => "mla_decode",
            OpKind::MlaPrefill => "mla_prefill",
            OpKind::RmsNorm => "rms_norm",
            OpKind::Rope => "rope",
            OpKind::MoeGate => "moe_gate",
            OpKind::SiluMul => "silu_mul",
            OpKind::Embedding => "embedding",
            OpKind::Add => "add",
            OpKind::CopyWindow => "copy_window",
            OpKind::GatherRows => "gather_rows",
            OpKind::ReduceRows => "reduce_rows",
            OpKind::GetDispatchLayout => "get_dispatch_layout",
            OpKind::Dispatch => "dispatch",
            OpKind::Combine => "combine",
            OpKind::LowLatencyDispatch => "low_latency_dispatch",
            OpKind::LowLatencyCombine => "low_latency_combine",
        }
    }

    /// Parses a snake_case or kebab-case name.
    pub fn parse(s: &str) -> Option<OpKind> {
        let s = s.replace('-', "_");
        OpKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Op arguments that core can validate.
pub trait OpArgs: Sized {
    /// Dimensions derived during validation, handed to the backend.
    type Dims: Clone + std::fmt::Debug;
    const KIND: OpKind;
    /// Checks shapes, dtypes and parameters.
    fn validate(&self) -> Result<Self::Dims>;
    /// The dtypes of the tensor arguments, inputs then outputs, as
    /// [`Backend::supports`] receives them.
    fn dtypes(&self) -> Vec<DType>;
    /// Validates and wraps.
    fn check(self) -> Result<Checked<Self>> {
        let dims = self.validate()?;
        Ok(Checked { args: self, dims })
    }
}

/// Op arguments that passed validation, with their dimensions. Only
/// [`OpArgs::check`] creates one, so a backend never sees unchecked input.
#[derive(Debug)]
pub struct Checked<A: OpArgs> {
    args: A,
    dims: A::Dims,
}

impl<A: OpArgs> Checked<A> {
    pub fn args(&self) -> &A {
        &self.args
    }
    /// Mutable access for backends writing outputs.
    pub fn args_mut(&mut self) -> &mut A {
        &mut self.args
    }
    pub fn dims(&self) -> &A::Dims {
        &self.dims
    }
    pub fn kind(&self) -> OpKind {
        A::KIND
    }
    /// Arguments and dims at once (outputs mutable, dims shared).
    pub fn parts(&mut self) -> (&mut A, &A::Dims) {
        (&mut self.args, &self.dims)
    }
    pub fn into_args(self) -> A {
        self.args
    }
}

/// Ops that run on one device with caller-allocated outputs.
pub trait LocalOp: OpArgs {
    fn launch(op: &mut Checked<Self>, backend: &dyn Backend) -> Result<()>;
}

/// Validates `op` and runs it on `backend`.
pub fn run<A: LocalOp>(backend: &dyn Backend, op: A) -> Result<()> {
    let mut c = op.check()?;
    A::launch(&mut c, backend)
}

/// Validates and runs a normal dispatch: the backend's native
/// implementation if it has one, else core's protocol ([`crate::ep`]).
pub fn dispatch(
    backend: &dyn Backend,
    comm: &dyn Communicator,
    op: Dispatch<'_>,
) -> Result<DispatchOutput> {
    let c = op.check()?;
    check_owner(backend, Dispatch::KIND, c.args().x)?;
    match backend.native_dispatch(comm, &c)? {
        Some(out) => Ok(out),
        None => crate::ep::dispatch(backend, comm, &c),
    }
}

/// Validates and runs a normal combine (native or core's protocol).
pub fn combine(backend: &dyn Backend, comm: &dyn Communicator, op: Combine<'_>) -> Result<()> {
    let mut c = op.check()?;
    check_owner(backend, Combine::KIND, c.args().x)?;
    match backend.native_combine(comm, &mut c)? {
        Some(()) => Ok(()),
        None => crate::ep::combine(backend, comm, &mut c),
    }
}

/// Validates and runs a low-latency dispatch (native or core's protocol).
pub fn low_latency_dispatch(
    backend: &dyn Backend,
    comm: &dyn Communicator,
    op: LowLatencyDispatch<'_>,
) -> Result<LowLatencyDispatchOutput> {
    let c = op.check()?;
    check_owner(backend, LowLatencyDispatch::KIND, c.args().x)?;
    match backend.native_low_latency_dispatch(comm, &c)? {
        Some(out) => Ok(out),
        None => crate::ep::low_latency_dispatch(backend, comm, &c),
    }
}

/// Validates and runs a low-latency combine (native or core's protocol).
pub fn low_latency_combine(
    backend: &dyn Backend,
    comm: &dyn Communicator,
    op: LowLatencyCombine<'_>,
) -> Result<()> {
    let mut c = op.check()?;
    check_owner(backend, LowLatencyCombine::KIND, c.args().x)?;
    match backend.native_low_latency_combine(comm, &mut c)? {
        Some(()) => Ok(()),
        None => crate::ep::low_latency_combine(backend, comm, &mut c),
    }
}

/// Fails unless `t` belongs to `backend`'s instance.
pub fn check_owner(backend: &dyn Backend, op: OpKind, t: &Tensor) -> Result<()> {
    t.check_owner(backend.instance(), backend.name())
        .map_err(|e| match e {
            Error::ForeignTensor { owner, backend } => Error::ForeignTensor {
                owner,
                backend: format!("{backend} (running {op})"),
            },
            e => e,
        })
}

macro_rules! local_ops {
    ($($ty:ident => $method:ident),* $(,)?) => {
        $(impl LocalOp for $ty<'_> {
            fn launch(op: &mut Checked<Self>, backend: &dyn Backend) -> Result<()> {
                backend.$method(op)
            }
        })*
    };
}

local_ops! {
    ActQuant => act_quant,
    WeightDequant => weight_dequant,
    Fp8Gemm => fp8_gemm,
    Fp8GroupedContiguous => fp8_grouped_contiguous,
    Fp8GroupedMasked => fp8_grouped_masked,
    Gemm => gemm,
    MlaDecode => mla_decode,
    MlaPrefill => mla_prefill,
    RmsNorm => rms_norm,
    Rope => rope,
    MoeGate => moe_gate,
    SiluMul => silu_mul,
    Embedding => embedding,
    Add => add,
    CopyWindow => copy_window,
    GatherRows => gather_rows,
    ReduceRows => reduce_rows,
    GetDispatchLayout => get_dispatch_layout,
}

// ---- validation helpers -------------------------------------------------

/// Float activation dtypes that ops computing in f32 accept.
pub const ACT_DTYPES: &[DType] = &[DType::F32, DType::BF16, DType::F16];
/// Index dtypes.
pub const INDEX_DTYPES: &[DType] = &[DType::I32, DType::I64];
/// FP8 dtypes of the e4m3 family.
pub const E4M3_DTYPES: &[DType] = &[DType::F8E4M3, DType::F8E4M3Fnuz];

pub(crate) fn dtype_list(d: &[DType]) -> String {
    d.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Fails unless `t`'s dtype is one of `allowed`.
pub fn expect_dtype(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    allowed: &[DType],
) -> Result<()> {
    if allowed.contains(&t.dtype()) {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            arg,
            expected: dtype_list(allowed),
            actual: t.dtype(),
        })
    }
}

/// Fails unless `t` has rank `n`; returns its shape.
pub fn expect_rank<'t>(
    op: &'static str,
    arg: &'static str,
    t: &'t Tensor,
    n: usize,
    what: &str,
) -> Result<&'t [usize]> {
    if t.shape().len() == n {
        Ok(t.shape())
    } else {
        Err(Error::Shape {
            op,
            arg,
            expected: format!("rank {n} {what}"),
            actual: t.shape().to_vec(),
        })
    }
}

/// Fails unless `t`'s shape equals `shape` (named dims for the message).
pub fn expect_shape(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    shape: &[usize],
    names: &str,
) -> Result<()> {
    if t.shape() == shape {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            arg,
            expected: format!("{shape:?} {names}"),
            actual: t.shape().to_vec(),
        })
    }
}

/// Fails when a parameter condition does not hold.
pub fn ensure(
    cond: bool,
    op: &'static str,
    arg: &'static str,
    msg: impl FnOnce() -> String,
) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::invalid(op, arg, msg()))
    }
}

/// Fails when two arguments are the same tensor (outputs must not alias inputs).
pub(crate) fn expect_finite_param(op: &'static str, arg: &'static str, v: f32) -> Result<()> {
    ensure(v.is_finite(), op, arg, || {
        format!("must be finite, got {v}")
    })
}
