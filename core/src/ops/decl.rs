//! Op declarations: the metadata of every op, written once next to its
//! argument struct and validation.
//!
//! An [`OpDecl`] names an op's tensors (role, accepted dtypes, shape and
//! meaning) and its parameters (type, default, help). Everything that lists
//! an op's tensors or parameters is derived from it: the dtype checks that
//! [`OpArgs::check`](super::OpArgs::check) runs before an op's own
//! validation, the `deepport op` table and its `--help`, the conformance
//! catalogue's output lists and the golden op tables.
//!
//! Parameters are the ones a caller chooses when it lets the outputs be
//! allocated for it (as `deepport op` and the conformance cases do): besides
//! the fields of the argument struct (`eps`, `softmax_scale`, …) they may
//! pick an output's dtype (`out_dtype`) or size (`head_dim_v`).

use super::OpKind;
use crate::dtype::DType;

/// What an op does with a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Read.
    In,
    /// Read when given.
    OptionalIn,
    /// Written.
    Out,
    /// Written in some configurations (e.g. FP8 scales of an FP8 payload).
    OptionalOut,
}

/// One tensor of an op. A tensor an op updates in place (read and written)
/// is declared twice, once as an input and once as an output.
#[derive(Clone, Copy, Debug)]
pub struct TensorDecl {
    pub name: &'static str,
    pub role: Role,
    /// The dtypes the op accepts for it; relations between tensors (`b` has
    /// `a`'s FP8 format) are checked by the op's validation.
    pub dtypes: &'static [DType],
    /// Shape and meaning, for help texts (`[m, k] f32/bf16/f16, …`).
    pub doc: &'static str,
}

impl TensorDecl {
    pub const fn is_input(&self) -> bool {
        matches!(self.role, Role::In | Role::OptionalIn)
    }
    pub const fn is_output(&self) -> bool {
        matches!(self.role, Role::Out | Role::OptionalOut)
    }
    pub const fn is_optional(&self) -> bool {
        matches!(self.role, Role::OptionalIn | Role::OptionalOut)
    }
}

/// The type of a parameter value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A real number (`1e-6`, `2.5`).
    Float,
    /// A non-negative integer.
    Int,
    /// `true`/`false`/`1`/`0`.
    Bool,
    /// One of a fixed list of words.
    Choice(&'static [&'static str]),
}

impl ParamKind {
    /// What a value of this kind looks like, for messages.
    pub fn describe(self) -> String {
        match self {
            ParamKind::Float => "a number".into(),
            ParamKind::Int => "a non-negative integer".into(),
            ParamKind::Bool => "true, false, 1 or 0".into(),
            ParamKind::Choice(c) => format!("one of {}", c.join(", ")),
        }
    }
}

/// Default of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamDefault {
    /// A literal value, parsed like a command-line value.
    Value(&'static str),
    /// Derived from the inputs; the text says how.
    Computed(&'static str),
}

/// One parameter of an op.
#[derive(Clone, Copy, Debug)]
pub struct ParamDecl {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: ParamDefault,
    pub help: &'static str,
}

/// Everything declared about one op.
#[derive(Debug)]
pub struct OpDecl {
    pub kind: OpKind,
    /// One line: what it computes and where SPEC.md says so.
    pub summary: &'static str,
    /// Inputs then outputs, in the order [`OpArgs::dtypes`](super::OpArgs::dtypes)
    /// lists them to [`Backend::supports`](crate::backend::Backend::supports).
    pub tensors: &'static [TensorDecl],
    pub params: &'static [ParamDecl],
}

impl OpDecl {
    /// The op's canonical snake_case name.
    pub const fn name(&self) -> &'static str {
        self.kind.name()
    }
    /// The tensors an op reads, in order.
    pub fn inputs(&self) -> impl Iterator<Item = &'static TensorDecl> {
        self.tensors.iter().filter(|t| t.is_input())
    }
    /// The tensors an op writes, in order.
    pub fn outputs(&self) -> impl Iterator<Item = &'static TensorDecl> {
        self.tensors.iter().filter(|t| t.is_output())
    }
    /// Names of the outputs that are always written.
    pub fn required_output_names(&self) -> Vec<&'static str> {
        self.outputs()
            .filter(|t| !t.is_optional())
            .map(|t| t.name)
            .collect()
    }
    /// Names of every output.
    pub fn output_names(&self) -> Vec<&'static str> {
        self.outputs().map(|t| t.name).collect()
    }
    /// The first declaration of a tensor by name (its input one for an
    /// in-place tensor).
    pub fn tensor(&self, name: &str) -> Option<&'static TensorDecl> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// A parameter by name.
    pub fn param(&self, name: &str) -> Option<&'static ParamDecl> {
        self.params.iter().find(|p| p.name == name)
    }
}

// ---- const constructors, for declarations ---------------------------------

/// An input tensor.
pub const fn input(name: &'static str, dtypes: &'static [DType], doc: &'static str) -> TensorDecl {
    TensorDecl {
        name,
        role: Role::In,
        dtypes,
        doc,
    }
}

/// An optional input tensor.
pub const fn optional_input(
    name: &'static str,
    dtypes: &'static [DType],
    doc: &'static str,
) -> TensorDecl {
    TensorDecl {
        name,
        role: Role::OptionalIn,
        dtypes,
        doc,
    }
}

/// An output tensor.
pub const fn output(name: &'static str, dtypes: &'static [DType], doc: &'static str) -> TensorDecl {
    TensorDecl {
        name,
        role: Role::Out,
        dtypes,
        doc,
    }
}

/// An output written in some configurations only.
pub const fn optional_output(
    name: &'static str,
    dtypes: &'static [DType],
    doc: &'static str,
) -> TensorDecl {
    TensorDecl {
        name,
        role: Role::OptionalOut,
        dtypes,
        doc,
    }
}

/// A parameter with a literal default.
pub const fn param(
    name: &'static str,
    kind: ParamKind,
    default: &'static str,
    help: &'static str,
) -> ParamDecl {
    ParamDecl {
        name,
        kind,
        default: ParamDefault::Value(default),
        help,
    }
}

/// A parameter whose default is derived from the inputs (`how` says how).
pub const fn computed(
    name: &'static str,
    kind: ParamKind,
    how: &'static str,
    help: &'static str,
) -> ParamDecl {
    ParamDecl {
        name,
        kind,
        default: ParamDefault::Computed(how),
        help,
    }
}
