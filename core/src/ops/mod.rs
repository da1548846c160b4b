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
pub mod decl;
mod dense;
mod ep;
mod grouped;
pub mod index;
mod mla;
mod rows;
mod sparse;

pub use copy::*;
pub use decl::{OpDecl, ParamDecl, ParamDefault, ParamKind, Role, TensorDecl};
pub use dense::*;
pub use ep::*;
pub use grouped::*;
pub use mla::*;
pub use rows::*;
pub use sparse::*;

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

// ---- the op list ----------------------------------------------------------
//
// Every op is listed once, below, as `Kind => method`: `Kind` is both the
// `OpKind` variant and the argument struct, `method` is the `Backend` method
// and the op's canonical name. `OpKind`, its names, `OpKind::decl`, the
// `LocalOp` impls and the `Backend` defaults are generated from these two
// lists; backends and wrappers forward every op with the same macros.

/// Calls `$cb! { [extra tokens] Kind => method, ... }` with every local op
/// (ops that run on one device with caller-allocated outputs), in catalogue
/// order. Backends and wrapper backends use it to forward every op:
///
/// ```ignore
/// macro_rules! forward {
///     ([$inner:ident] $($kind:ident => $method:ident),* $(,)?) => {$(
///         fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
///             self.$inner.$method(op)
///         }
///     )*};
/// }
/// impl Backend for Wrapper {
///     // ...
///     deepport_core::for_each_local_op!(forward, inner);
/// }
/// ```
#[macro_export]
macro_rules! for_each_local_op {
    ($cb:ident $(, $($extra:tt)*)?) => {
        $cb! {
            [$($($extra)*)?]
            ActQuant => act_quant,
            WeightDequant => weight_dequant,
            Fp8Gemm => fp8_gemm,
            Fp8GroupedContiguous => fp8_grouped_contiguous,
            Fp8GroupedMasked => fp8_grouped_masked,
            Gemm => gemm,
            GemmGroupedContiguous => gemm_grouped_contiguous,
            GemmGroupedMasked => gemm_grouped_masked,
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
            IndexerLogits => indexer_logits,
            IndexerTopk => indexer_topk,
            SparseMlaDecode => sparse_mla_decode,
            CacheQuant => cache_quant,
            SparseMlaPrefill => sparse_mla_prefill,
        }
    };
}

/// Calls `$cb! { [extra tokens] Kind => method, ... }` with every
/// expert-parallel op (ops that run on every rank at once with a
/// communicator; their `Backend` methods are written by hand).
#[macro_export]
macro_rules! for_each_ep_op {
    ($cb:ident $(, $($extra:tt)*)?) => {
        $cb! {
            [$($($extra)*)?]
            Dispatch => dispatch,
            Combine => combine,
            LowLatencyDispatch => low_latency_dispatch,
            LowLatencyCombine => low_latency_combine,
        }
    };
}

macro_rules! declare_kinds_with_local {
    ([] $($local:ident => $lm:ident),* $(,)?) => {
        $crate::for_each_ep_op!(declare_kinds, $($local => $lm),*);
    };
}

macro_rules! declare_kinds {
    ([$($local:ident => $lm:ident),*] $($ep:ident => $em:ident),* $(,)?) => {
        /// Every op deepport knows, for capability queries and reports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind {
            $($local,)*
            $($ep,)*
        }

        impl OpKind {
            /// How many ops there are.
            pub const COUNT: usize = [$(stringify!($local),)* $(stringify!($ep),)*].len();

            /// Every op, local ops first, in catalogue order.
            pub const ALL: [OpKind; Self::COUNT] = [$(OpKind::$local,)* $(OpKind::$ep,)*];

            /// Canonical snake_case name, used in case ids and reports.
            pub const fn name(self) -> &'static str {
                match self {
                    $(OpKind::$local => stringify!($lm),)*
                    $(OpKind::$ep => stringify!($em),)*
                }
            }

            /// The op's declaration: tensors, parameters, help.
            pub const fn decl(self) -> &'static OpDecl {
                match self {
                    $(OpKind::$local => <$local<'static> as OpArgs>::DECL,)*
                    $(OpKind::$ep => <$ep<'static> as OpArgs>::DECL,)*
                }
            }

            /// Whether the op runs on one device ([`LocalOp`]) rather than on
            /// every rank of an expert-parallel group.
            pub const fn is_local(self) -> bool {
                match self {
                    $(OpKind::$local => true,)*
                    $(OpKind::$ep => false,)*
                }
            }
        }

        $(impl LocalOp for $local<'_> {
            fn launch(op: &mut Checked<Self>, backend: &dyn Backend) -> Result<()> {
                check_launch(backend, op.args_mut())?;
                backend.$lm(op)
            }
        })*
    };
}

crate::for_each_local_op!(declare_kinds_with_local);

impl OpKind {
    /// Parses a snake_case or kebab-case name.
    pub fn parse(s: &str) -> Option<OpKind> {
        let s = s.replace('-', "_");
        OpKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The command-line name (kebab-case).
    pub fn cli_name(self) -> String {
        self.name().replace('_', "-")
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
    /// The op's declaration (tensors, parameters, help), written next to
    /// its argument struct.
    const DECL: &'static OpDecl;
    const KIND: OpKind = Self::DECL.kind;
    /// Checks shapes, dtypes and parameters beyond what the declaration
    /// says (declared dtypes are checked by [`OpArgs::check`] first).
    fn validate(&self) -> Result<Self::Dims>;
    /// The tensor arguments by their declared names, inputs then outputs,
    /// in declaration order (an absent optional tensor is left out; an
    /// in-place tensor appears once).
    fn tensors(&self) -> Vec<(&'static str, &Tensor)>;
    /// The output tensors, writable, by their declared names.
    fn outputs_mut(&mut self) -> Vec<(&'static str, &mut Tensor)>;
    /// The dtypes of the tensor arguments, inputs then outputs, as
    /// [`Backend::supports`] receives them.
    fn dtypes(&self) -> Vec<DType> {
        self.tensors().iter().map(|(_, t)| t.dtype()).collect()
    }
    /// Checks the declared dtypes, validates and wraps.
    fn check(self) -> Result<Checked<Self>> {
        check_declared(Self::DECL, &self.tensors())?;
        let dims = self.validate()?;
        Ok(Checked { args: self, dims })
    }
}

/// Checks each tensor against its declaration: the name is declared and its
/// dtype is one of the declared ones.
pub fn check_declared(decl: &OpDecl, tensors: &[(&'static str, &Tensor)]) -> Result<()> {
    let op = decl.name();
    for &(name, t) in tensors {
        let Some(d) = decl.tensor(name) else {
            return Err(Error::Other(format!(
                "internal: {op} has no declared tensor `{name}`"
            )));
        };
        expect_dtype(op, d.name, t, d.dtypes)?;
    }
    Ok(())
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
    let mut c = op.check()?;
    check_launch(backend, c.args_mut())?;
    match backend.native_dispatch(comm, &c)? {
        Some(out) => Ok(out),
        None => crate::ep::dispatch(backend, comm, &c),
    }
}

/// Validates and runs a normal combine (native or core's protocol).
pub fn combine(backend: &dyn Backend, comm: &dyn Communicator, op: Combine<'_>) -> Result<()> {
    let mut c = op.check()?;
    check_launch(backend, c.args_mut())?;
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
    let mut c = op.check()?;
    check_launch(backend, c.args_mut())?;
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
    check_launch(backend, c.args_mut())?;
    match backend.native_low_latency_combine(comm, &mut c)? {
        Some(()) => Ok(()),
        None => crate::ep::low_latency_combine(backend, comm, &mut c),
    }
}

/// What core checks at every launch, for every backend: each tensor of the
/// op belongs to this backend instance ([`Error::ForeignTensor`] otherwise,
/// never a read of another device's memory), and no output is a view
/// (views are read-only).
pub fn check_launch<A: OpArgs>(backend: &dyn Backend, args: &mut A) -> Result<()> {
    let op = A::DECL.name();
    for (name, t) in args.tensors() {
        t.check_owner(backend.instance(), backend.name())
            .map_err(|e| match e {
                Error::ForeignTensor { owner, backend } => Error::ForeignTensor {
                    owner,
                    backend: format!("{backend} (argument `{name}` of {op})"),
                },
                e => e,
            })?;
    }
    for (name, t) in args.outputs_mut() {
        if t.is_view() {
            return Err(Error::invalid(
                A::DECL.kind.name(),
                name,
                "is a view; views are read-only, an output must own its memory",
            ));
        }
    }
    Ok(())
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
