//! The ops that `deepport op` runs on a user's tensors, as one table of
//! [`OpSpec`]s: tensor names, parameters with their defaults, help text, and
//! one small runner per op that builds core's typed arguments.
//!
//! Everything generic lives here once: parsing `k=v` parameters against the
//! spec, looking tensors up by name with errors that name the file and list
//! what it holds, dtype conversions, poisoned output allocation, validation
//! before launch, and the `--help` table. The built-in cases of
//! `deepport run` go through the same path, handing their parameters typed
//! ([`Arg`], [`Params::from_args`]). The expert-parallel ops run on `--ranks
//! N` in-process ranks with per-rank tensors ([`rank_name`]; the runners
//! are in `opspec/ep.rs`).

mod ep;
mod sparse;

use crate::error::CliError;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::*;
use deepport_core::tensor::unravel;
use deepport_core::{DType, Error, HostTensor};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Result type of this module.
pub type CliResult<T> = Result<T, CliError>;

/// Named output tensors.
pub type Outputs = BTreeMap<String, HostTensor>;

pub use deepport_core::ops::decl::{ParamDefault, ParamKind};

/// One parameter of an op: core's declaration.
pub type ParamSpec = deepport_core::ops::ParamDecl;

/// One tensor of an op as the command line shows it, from core's
/// declaration.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec {
    pub name: &'static str,
    pub optional: bool,
    pub doc: &'static str,
}

/// Runs a local op: inputs and parsed parameters in, named host outputs out.
pub type RunFn = fn(&dyn Backend, &Inputs, &mut Params) -> CliResult<Outputs>;

/// Runs an expert-parallel op on a number of in-process ranks: per-rank
/// inputs (`r{rank}.{name}`) in, per-rank outputs out.
pub type RanksRunFn = fn(&dyn Backend, &Inputs, &Params, usize) -> CliResult<Outputs>;

/// How an op runs.
#[derive(Clone, Copy)]
pub enum Runner {
    /// On one backend.
    Local(RunFn),
    /// On a group of in-process ranks ([`deepport_core::comm::run_ranks`]),
    /// every rank on the same backend; tensors are per rank, named
    /// `r{rank}.{name}` (see [`rank_name`]).
    Ranks(RanksRunFn),
}

/// Everything the command line knows about one op: core's declaration
/// (names, tensors, parameters, help) and this module's runner.
#[derive(Clone, Copy)]
pub struct OpSpec {
    /// Command-line name (kebab-case).
    pub name: &'static str,
    pub kind: OpKind,
    pub summary: &'static str,
    pub inputs: &'static [TensorSpec],
    pub outputs: &'static [TensorSpec],
    pub params: &'static [ParamSpec],
    /// Inputs beyond the declaration's that `deepport op` needs to rebuild
    /// a dispatch handle (the routing a combine undoes); empty for most ops.
    pub handle_inputs: &'static [TensorSpec],
    /// Parameters beyond the declaration's, for the same purpose.
    pub handle_params: &'static [ParamSpec],
    pub run: Runner,
}

impl std::fmt::Debug for OpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpSpec({})", self.name)
    }
}

impl OpSpec {
    /// The op's declaration in core.
    pub fn decl(&self) -> &'static OpDecl {
        self.kind.decl()
    }

    /// The spec of a parameter by name (declared or handle parameter).
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.all_params().find(|p| p.name == name)
    }

    /// Every parameter the command accepts: the declaration's, then the
    /// handle parameters.
    pub fn all_params(&self) -> impl Iterator<Item = &'static ParamSpec> {
        self.params.iter().chain(self.handle_params.iter())
    }

    /// Every input tensor the command reads: the declaration's, then the
    /// handle inputs.
    pub fn all_inputs(&self) -> impl Iterator<Item = &'static TensorSpec> {
        self.inputs.iter().chain(self.handle_inputs.iter())
    }

    /// Whether the op runs on a group of ranks.
    pub fn on_ranks(&self) -> bool {
        matches!(self.run, Runner::Ranks(_))
    }
}

/// The name of a tensor of rank `rank` in the files of an expert-parallel
/// op: `r{rank}.{name}` (the names the conformance suite gives per-rank
/// outputs).
pub fn rank_name(rank: usize, name: &str) -> String {
    format!("r{rank}.{name}")
}

// ---- parameters ----------------------------------------------------------

/// A parsed parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Float(f32),
    Int(usize),
    Bool(bool),
    Choice(&'static str),
}

impl Value {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Float(v) => serde_json::Number::from_f64(*v as f64)
                .map_or_else(|| serde_json::Value::String(v.to_string()), Into::into),
            Value::Int(v) => (*v).into(),
            Value::Bool(v) => (*v).into(),
            Value::Choice(v) => (*v).into(),
        }
    }
}

/// A typed parameter value handed to an op by a case builder or read from a
/// file's JSON metadata (no trip through text).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg<'a> {
    /// A real number (for float parameters; integral values also fit
    /// integer parameters).
    Float(f64),
    /// A non-negative integer (also accepted by float parameters, and as 0
    /// or 1 by flags).
    Int(usize),
    /// A flag.
    Bool(bool),
    /// A word of a choice parameter.
    Text(&'a str),
}

impl<'a> Arg<'a> {
    /// The argument a JSON value holds (a number, a boolean or a string).
    pub fn from_json(v: &'a serde_json::Value) -> Option<Arg<'a>> {
        match v {
            serde_json::Value::Bool(b) => Some(Arg::Bool(*b)),
            serde_json::Value::String(s) => Some(Arg::Text(s)),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(i) => usize::try_from(i).ok().map(Arg::Int),
                None => n.as_f64().map(Arg::Float),
            },
            _ => None,
        }
    }

    /// This argument as a value of parameter `p`, or `None` when its type
    /// does not fit.
    fn to_value(self, p: &ParamSpec) -> Option<Value> {
        match (p.kind, self) {
            (ParamKind::Float, Arg::Float(x)) => Some(Value::Float(x as f32)),
            (ParamKind::Float, Arg::Int(i)) => Some(Value::Float(i as f32)),
            (ParamKind::Int, Arg::Int(i)) => Some(Value::Int(i)),
            (ParamKind::Int, Arg::Float(x))
                if x >= 0.0 && x.fract() == 0.0 && x <= usize::MAX as f64 =>
            {
                Some(Value::Int(x as usize))
            }
            (ParamKind::Bool, Arg::Bool(b)) => Some(Value::Bool(b)),
            (ParamKind::Bool, Arg::Int(i @ (0 | 1))) => Some(Value::Bool(i == 1)),
            (ParamKind::Choice(c), Arg::Text(s)) => {
                c.iter().copied().find(|w| *w == s).map(Value::Choice)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Arg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arg::Float(x) => write!(f, "{x}"),
            Arg::Int(i) => write!(f, "{i}"),
            Arg::Bool(b) => write!(f, "{b}"),
            Arg::Text(s) => write!(f, "`{s}`"),
        }
    }
}

fn parse_value(op: &str, p: &ParamSpec, raw: &str) -> CliResult<Value> {
    let bad = || {
        CliError::usage(format!(
            "{op}: parameter `{}` got `{raw}`, expected {}",
            p.name,
            p.kind.describe()
        ))
    };
    let s = raw.trim();
    Ok(match p.kind {
        ParamKind::Float => Value::Float(s.parse::<f32>().map_err(|_| bad())?),
        ParamKind::Int => Value::Int(s.parse::<usize>().map_err(|_| bad())?),
        ParamKind::Bool => Value::Bool(match s.to_ascii_lowercase().as_str() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => return Err(bad()),
        }),
        ParamKind::Choice(c) => Value::Choice(c.iter().copied().find(|w| *w == s).ok_or_else(bad)?),
    })
}

/// The parameters of one op invocation: what the user gave plus literal
/// defaults; computed defaults are filled in by the op's runner, so that
/// [`Params::to_json`] records every value the op actually used.
#[derive(Clone, Debug)]
pub struct Params {
    op: &'static str,
    values: BTreeMap<&'static str, Value>,
}

impl Params {
    /// Parses `k=v` strings against the op's parameter specs. Unknown names,
    /// malformed values and repeated names are usage errors that list the
    /// valid parameters.
    pub fn parse(spec: &OpSpec, args: &[String]) -> CliResult<Params> {
        let valid = || valid_params(spec);
        let mut given: BTreeMap<&'static str, Value> = BTreeMap::new();
        for a in args {
            let Some((k, v)) = a.split_once('=') else {
                return Err(CliError::usage(format!(
                    "{}: parameter `{a}` is not of the form name=value; {}",
                    spec.name,
                    valid()
                )));
            };
            let k = k.trim();
            let p = spec.param(k).ok_or_else(|| {
                CliError::usage(format!(
                    "{}: unknown parameter `{k}`; {}",
                    spec.name,
                    valid()
                ))
            })?;
            let val = parse_value(spec.name, p, v)?;
            if given.insert(p.name, val).is_some() {
                return Err(CliError::usage(format!(
                    "{}: parameter `{k}` is given more than once",
                    spec.name
                )));
            }
        }
        Params::with_defaults(spec, given)
    }

    /// Typed parameters (from a case builder or a file's JSON metadata)
    /// checked against the op's parameter specs: unknown names, values of
    /// the wrong type and repeated names are usage errors naming them.
    pub fn from_args(spec: &OpSpec, args: &[(&str, Arg<'_>)]) -> CliResult<Params> {
        let mut given: BTreeMap<&'static str, Value> = BTreeMap::new();
        for (k, a) in args {
            let p = spec.param(k).ok_or_else(|| {
                CliError::usage(format!(
                    "{}: unknown parameter `{k}`; {}",
                    spec.name,
                    valid_params(spec)
                ))
            })?;
            let v = a.to_value(p).ok_or_else(|| {
                CliError::usage(format!(
                    "{}: parameter `{k}` got {a}, expected {}",
                    spec.name,
                    p.kind.describe()
                ))
            })?;
            if given.insert(p.name, v).is_some() {
                return Err(CliError::usage(format!(
                    "{}: parameter `{k}` is given more than once",
                    spec.name
                )));
            }
        }
        Params::with_defaults(spec, given)
    }

    /// Fills in the literal defaults of the parameters not given.
    fn with_defaults(spec: &OpSpec, mut given: BTreeMap<&'static str, Value>) -> CliResult<Params> {
        for p in spec.all_params() {
            if let (ParamDefault::Value(d), false) = (p.default, given.contains_key(p.name)) {
                given.insert(p.name, parse_value(spec.name, p, d)?);
            }
        }
        Ok(Params {
            op: spec.name,
            values: given,
        })
    }

    fn internal(&self, name: &str, want: &str) -> CliError {
        CliError::Failed(Error::Other(format!(
            "internal: {} parameter `{name}` is not a {want} in the op table",
            self.op
        )))
    }

    /// A float parameter (given or literal default).
    pub fn float(&self, name: &str) -> CliResult<f32> {
        match self.values.get(name) {
            Some(Value::Float(v)) => Ok(*v),
            _ => Err(self.internal(name, "float with a default")),
        }
    }

    /// A float parameter whose default is computed: the given value, or
    /// `default` (which is then recorded).
    pub fn float_or(&mut self, name: &'static str, default: f32) -> CliResult<f32> {
        match self.values.get(name) {
            Some(Value::Float(v)) => Ok(*v),
            Some(_) => Err(self.internal(name, "float")),
            None => {
                self.values.insert(name, Value::Float(default));
                Ok(default)
            }
        }
    }

    /// An integer parameter whose default is computed (see [`Params::float_or`]).
    pub fn int_or(&mut self, name: &'static str, default: usize) -> CliResult<usize> {
        match self.values.get(name) {
            Some(Value::Int(v)) => Ok(*v),
            Some(_) => Err(self.internal(name, "integer")),
            None => {
                self.values.insert(name, Value::Int(default));
                Ok(default)
            }
        }
    }

    pub fn int(&self, name: &str) -> CliResult<usize> {
        match self.values.get(name) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Err(self.internal(name, "integer with a default")),
        }
    }

    pub fn bool(&self, name: &str) -> CliResult<bool> {
        match self.values.get(name) {
            Some(Value::Bool(v)) => Ok(*v),
            _ => Err(self.internal(name, "bool with a default")),
        }
    }

    pub fn choice(&self, name: &str) -> CliResult<&'static str> {
        match self.values.get(name) {
            Some(Value::Choice(v)) => Ok(v),
            _ => Err(self.internal(name, "choice with a default")),
        }
    }

    /// Every parameter value the op used, as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_json()))
                .collect(),
        )
    }
}

/// The "valid parameters of …" part of a usage error.
fn valid_params(spec: &OpSpec) -> String {
    let names: Vec<&str> = spec.all_params().map(|p| p.name).collect();
    if names.is_empty() {
        format!("{} takes no parameters", spec.name)
    } else {
        format!("valid parameters of {}: {}", spec.name, names.join(", "))
    }
}

// ---- inputs --------------------------------------------------------------

/// The input tensors of one invocation and where they came from.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The file (or a description of the built-in case), for messages.
    pub source: String,
    pub op: &'static str,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Inputs {
    pub fn new(
        source: impl Into<String>,
        op: &'static str,
        tensors: BTreeMap<String, HostTensor>,
    ) -> Self {
        Inputs {
            source: source.into(),
            op,
            tensors,
        }
    }

    fn held(&self) -> String {
        if self.tensors.is_empty() {
            "no tensors".into()
        } else {
            self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// A required tensor; a missing one is a usage error that names the
    /// file and the tensor and lists the tensors present.
    pub fn get(&self, name: &str) -> CliResult<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| {
            CliError::usage(format!(
                "{}: {} needs tensor `{name}`, which is missing; the file holds: {}",
                self.source,
                self.op,
                self.held()
            ))
        })
    }

    /// An optional tensor.
    pub fn opt(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Tensors the op does not use on `ranks` ranks (1 for a local op),
    /// for a warning.
    pub fn unused(&self, spec: &OpSpec, ranks: usize) -> Vec<String> {
        let used: Vec<String> = if spec.on_ranks() {
            (0..ranks)
                .flat_map(|r| spec.all_inputs().map(move |t| rank_name(r, t.name)))
                .collect()
        } else {
            spec.all_inputs().map(|t| t.name.to_string()).collect()
        };
        self.tensors
            .keys()
            .filter(|k| !used.contains(k))
            .cloned()
            .collect()
    }

    /// Checks that every required input is present (per rank for an
    /// expert-parallel op): a missing one is a usage error naming it.
    /// A rank count other than 1 for a local op is a usage error.
    pub fn check_present(&self, spec: &OpSpec, ranks: usize) -> CliResult<()> {
        check_ranks(spec, ranks)?;
        for t in spec.all_inputs().filter(|t| !t.optional) {
            if spec.on_ranks() {
                for r in 0..ranks {
                    self.get(&rank_name(r, t.name))?;
                }
            } else {
                self.get(t.name)?;
            }
        }
        Ok(())
    }

    /// A float tensor converted to f32 (exact from bf16, f16 and FP8);
    /// other dtypes are passed on for the op's validation to reject.
    pub fn as_f32(&self, name: &str) -> CliResult<HostTensor> {
        Ok(convert_float(self.get(name)?, DType::F32))
    }

    /// An index tensor converted to i32; a value outside the i32 range is a
    /// usage error naming the tensor, position and value. Non-integer
    /// dtypes are passed on for the op's validation to reject.
    pub fn as_i32(&self, name: &str) -> CliResult<HostTensor> {
        let t = self.get(name)?;
        if t.dtype() != DType::I64 {
            return Ok(t.clone());
        }
        let v = t.to_i64_vec();
        if let Some(i) = v.iter().position(|&x| i32::try_from(x).is_err()) {
            return Err(CliError::usage(format!(
                "{}: tensor `{name}` holds {} at {:?}, which does not fit in i32 ({} needs i32 indices)",
                self.source,
                v[i],
                unravel(i, t.shape()),
                self.op
            )));
        }
        Ok(t.to_dtype(DType::I32))
    }
}

/// Converts a float tensor to another float dtype; anything else unchanged.
fn convert_float(t: &HostTensor, to: DType) -> HostTensor {
    if t.dtype().is_float() && to.is_float() {
        t.to_dtype(to)
    } else {
        t.clone()
    }
}

// ---- running -------------------------------------------------------------

/// Dim `i` of a host tensor, 0 when it has fewer dims (validation reports it).
fn dim(t: &HostTensor, i: usize) -> usize {
    t.shape().get(i).copied().unwrap_or(0)
}

/// Last dim, 0 for a scalar.
fn last(t: &HostTensor) -> usize {
    t.shape().last().copied().unwrap_or(0)
}

fn up(b: &dyn Backend, t: &HostTensor) -> CliResult<Tensor> {
    b.upload(t).map_err(CliError::Failed)
}

/// An output tensor, poisoned with NaN (floats) or all-ones bytes. Its
/// shape comes from the user's tensors and parameters, so its size is
/// checked against the memory budget first and its host staging copy is
/// reserved fallibly (an error naming the size and the budget, never an
/// abort).
fn out(b: &dyn Backend, dtype: DType, shape: &[usize]) -> CliResult<Tensor> {
    let budget = deepport_core::budget::MemoryBudget::global();
    let what = format!("an output tensor ({dtype} {shape:?})");
    let host = if dtype.is_float() {
        HostTensor::try_full(&what, dtype, shape, f32::NAN, budget)
    } else {
        HostTensor::try_zeros(&what, dtype, shape, budget).map(|mut t| {
            t.bytes_mut().fill(0xff);
            t
        })
    }
    .map_err(CliError::Invalid)?;
    b.upload(&host).map_err(CliError::Failed)
}

fn down(b: &dyn Backend, t: &Tensor) -> CliResult<HostTensor> {
    b.download(t).map_err(CliError::Failed)
}

/// Validates (errors are [`CliError::Invalid`]), asks the backend whether it
/// supports these dtypes, and launches (errors are [`CliError::Failed`]).
fn launch<A: LocalOp>(b: &dyn Backend, op: A) -> CliResult<()> {
    let mut c = op.check().map_err(CliError::Invalid)?;
    if let deepport_core::Support::NotSupported(reason) = b.supports(A::KIND, &c.args().dtypes()) {
        return Err(CliError::Failed(Error::not_supported(
            b.name(),
            A::KIND.name(),
            reason,
        )));
    }
    A::launch(&mut c, b).map_err(CliError::Failed)?;
    b.synchronize().map_err(CliError::Failed)
}

fn outputs(b: &dyn Backend, items: &[(&str, &Tensor)]) -> CliResult<Outputs> {
    items
        .iter()
        .map(|(n, t)| Ok((n.to_string(), down(b, t)?)))
        .collect()
}

/// bf16 stays bf16; every other activation dtype computes to f32.
fn attention_out_dtype(q: DType) -> DType {
    if q == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The dtype of both inputs when they agree, f32 otherwise.
fn common_dtype(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else {
        DType::F32
    }
}

fn out_dtype(p: &Params) -> CliResult<DType> {
    let s = p.choice("out_dtype")?;
    DType::parse(s).ok_or_else(|| CliError::usage(format!("unknown dtype `{s}`")))
}

fn run_act_quant(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let xh = i.get("x")?;
    let fmt = if p.choice("format")? == "e4m3fnuz" {
        DType::F8E4M3Fnuz
    } else {
        DType::F8E4M3
    };
    let scale_fmt = ScaleFmt::parse(p.choice("scale_fmt")?).unwrap_or_default();
    let (m, k) = (dim(xh, 0), dim(xh, 1));
    let x = up(b, xh)?;
    let mut q = out(b, fmt, &[m, k])?;
    let mut s = out(b, DType::F32, &[m, k / QBLOCK])?;
    launch(
        b,
        ActQuant {
            x: &x,
            q: &mut q,
            s: &mut s,
            scale_fmt,
        },
    )?;
    outputs(b, &[("q", &q), ("s", &s)])
}

fn run_weight_dequant(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let wh = i.get("w")?;
    let w = up(b, wh)?;
    let s = up(b, &i.as_f32("s")?)?;
    let mut o = out(b, out_dtype(p)?, &[dim(wh, 0), dim(wh, 1)])?;
    launch(
        b,
        WeightDequant {
            w: &w,
            s: &s,
            out: &mut o,
        },
    )?;
    outputs(b, &[("out", &o)])
}

/// Uploads the four FP8 GEMM operands (scales converted to f32).
fn fp8_operands(b: &dyn Backend, i: &Inputs) -> CliResult<[Tensor; 4]> {
    Ok([
        up(b, i.get("a")?)?,
        up(b, &i.as_f32("sa")?)?,
        up(b, i.get("b")?)?,
        up(b, &i.as_f32("sb")?)?,
    ])
}

fn run_fp8_gemm(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (m, n) = (dim(i.get("a")?, 0), dim(i.get("b")?, 0));
    let [a, sa, bb, sb] = fp8_operands(b, i)?;
    let mut d = out(b, out_dtype(p)?, &[m, n])?;
    launch(
        b,
        Fp8Gemm {
            a: &a,
            sa: &sa,
            b: &bb,
            sb: &sb,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_fp8_grouped_contiguous(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (m, n) = (dim(i.get("a")?, 0), dim(i.get("b")?, 1));
    let [a, sa, bb, sb] = fp8_operands(b, i)?;
    let mi = up(b, i.get("m_indices")?)?;
    let mut d = out(b, out_dtype(p)?, &[m, n])?;
    launch(
        b,
        Fp8GroupedContiguous {
            a: &a,
            sa: &sa,
            b: &bb,
            sb: &sb,
            m_indices: &mi,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_fp8_grouped_masked(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let ah = i.get("a")?;
    let (g, m, n) = (dim(ah, 0), dim(ah, 1), dim(i.get("b")?, 1));
    let [a, sa, bb, sb] = fp8_operands(b, i)?;
    let mm = up(b, i.get("masked_m")?)?;
    let mut d = out(b, out_dtype(p)?, &[g, m, n])?;
    launch(
        b,
        Fp8GroupedMasked {
            a: &a,
            sa: &sa,
            b: &bb,
            sb: &sb,
            masked_m: &mm,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_gemm(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (ah, bh) = (i.get("a")?, i.get("b")?);
    let (a, bb) = (up(b, ah)?, up(b, bh)?);
    let mut d = out(b, out_dtype(p)?, &[dim(ah, 0), dim(bh, 0)])?;
    launch(
        b,
        Gemm {
            a: &a,
            b: &bb,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_gemm_grouped_contiguous(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (ah, bh) = (i.get("a")?, i.get("b")?);
    let (a, bb) = (up(b, ah)?, up(b, bh)?);
    let mi = up(b, i.get("m_indices")?)?;
    let mut d = out(b, out_dtype(p)?, &[dim(ah, 0), dim(bh, 1)])?;
    launch(
        b,
        GemmGroupedContiguous {
            a: &a,
            b: &bb,
            m_indices: &mi,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_gemm_grouped_masked(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (ah, bh) = (i.get("a")?, i.get("b")?);
    let (a, bb) = (up(b, ah)?, up(b, bh)?);
    let mm = up(b, i.get("masked_m")?)?;
    let mut d = out(b, out_dtype(p)?, &[dim(ah, 0), dim(ah, 1), dim(bh, 1)])?;
    launch(
        b,
        GemmGroupedMasked {
            a: &a,
            b: &bb,
            masked_m: &mm,
            d: &mut d,
        },
    )?;
    outputs(b, &[("d", &d)])
}

fn run_mla_decode(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let qh = i.get("q")?;
    let kh = convert_float(i.get("kcache")?, qh.dtype());
    let (bs, s_q, h_q, d) = (dim(qh, 0), dim(qh, 1), dim(qh, 2), last(qh));
    let scale = p.float_or("softmax_scale", (d as f32).powf(-0.5))?;
    let causal = p.bool("causal")?;
    let dv = p.int("head_dim_v")?;
    let q = up(b, qh)?;
    let kcache = up(b, &kh)?;
    let block_table = up(b, &i.as_i32("block_table")?)?;
    let cache_seqlens = up(b, &i.as_i32("cache_seqlens")?)?;
    let mut o = out(b, attention_out_dtype(qh.dtype()), &[bs, s_q, h_q, dv])?;
    let mut lse = out(b, DType::F32, &[bs, h_q, s_q])?;
    launch(
        b,
        MlaDecode {
            q: &q,
            kcache: &kcache,
            block_table: &block_table,
            cache_seqlens: &cache_seqlens,
            out: &mut o,
            lse: &mut lse,
            softmax_scale: scale,
            causal,
        },
    )?;
    outputs(b, &[("out", &o), ("lse", &lse)])
}

fn run_mla_prefill(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let qn = i.get("q_nope")?;
    let qp = i.get("q_pe")?;
    let (t, h) = (dim(qn, 0), dim(qn, 1));
    let scale = p.float_or("softmax_scale", ((last(qn) + last(qp)) as f32).powf(-0.5))?;
    let form = MlaForm::parse(p.choice("form")?).unwrap_or_default();
    let dv = p.int("head_dim_v")?;
    let q_nope = up(b, qn)?;
    let q_pe = up(b, qp)?;
    let latent = up(b, i.get("latent")?)?;
    let k_pe = up(b, i.get("k_pe")?)?;
    let wkv_b = up(b, i.get("wkv_b")?)?;
    let mut o = out(b, attention_out_dtype(qn.dtype()), &[t, h, dv])?;
    launch(
        b,
        MlaPrefill {
            q_nope: &q_nope,
            q_pe: &q_pe,
            latent: &latent,
            k_pe: &k_pe,
            wkv_b: &wkv_b,
            out: &mut o,
            softmax_scale: scale,
            form,
        },
    )?;
    outputs(b, &[("out", &o)])
}

fn run_moe_gate(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let xh = i.get("x")?;
    let topk = p.int("topk")?;
    let x = up(b, xh)?;
    let weight = up(b, i.get("weight")?)?;
    let bias = match i.opt("bias") {
        Some(_) => Some(up(b, &i.as_f32("bias")?)?),
        None => None,
    };
    let t = dim(xh, 0);
    let mut idx = out(b, DType::I64, &[t, topk])?;
    let mut w = out(b, DType::F32, &[t, topk])?;
    launch(
        b,
        MoeGate {
            x: &x,
            weight: &weight,
            bias: bias.as_ref(),
            topk_idx: &mut idx,
            topk_weights: &mut w,
            n_group: p.int("n_group")?,
            topk_group: p.int("topk_group")?,
            topk,
            route_scale: p.float("route_scale")?,
        },
    )?;
    outputs(b, &[("topk_idx", &idx), ("topk_weights", &w)])
}

fn run_rms_norm(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let xh = i.get("x")?;
    let x = up(b, xh)?;
    let weight = up(b, i.get("weight")?)?;
    let mut y = out(b, xh.dtype(), xh.shape())?;
    launch(
        b,
        RmsNorm {
            x: &x,
            weight: &weight,
            y: &mut y,
            eps: p.float("eps")?,
        },
    )?;
    outputs(b, &[("y", &y)])
}

fn run_rope(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let xh = i.get("x")?;
    let factor = p.float("factor")?;
    let yarn = if factor == 1.0 {
        None
    } else {
        Some(Yarn {
            factor,
            original_max_position_embeddings: p.int("original_max_position_embeddings")?,
            beta_fast: p.float("beta_fast")?,
            beta_slow: p.float("beta_slow")?,
            mscale: p.float("mscale")?,
            mscale_all_dim: p.float("mscale_all_dim")?,
        })
    };
    let layout = p.choice("layout")?;
    let config = RopeConfig {
        theta: p.float("theta")?,
        yarn,
        layout: RopeLayout::parse(layout)
            .ok_or_else(|| CliError::usage(format!("unknown rope layout `{layout}`")))?,
    };
    let x = up(b, xh)?;
    let positions = up(b, i.get("positions")?)?;
    let mut y = out(b, xh.dtype(), xh.shape())?;
    launch(
        b,
        Rope {
            x: &x,
            positions: &positions,
            y: &mut y,
            config,
        },
    )?;
    outputs(b, &[("y", &y)])
}

fn run_silu_mul(b: &dyn Backend, i: &Inputs, _p: &mut Params) -> CliResult<Outputs> {
    let (gh, uh) = (i.get("gate")?, i.get("up")?);
    let (gate, upt) = (up(b, gh)?, up(b, uh)?);
    let mut o = out(b, common_dtype(gh.dtype(), uh.dtype()), gh.shape())?;
    launch(
        b,
        SiluMul {
            gate: &gate,
            up: &upt,
            out: &mut o,
        },
    )?;
    outputs(b, &[("out", &o)])
}

fn run_add(b: &dyn Backend, i: &Inputs, _p: &mut Params) -> CliResult<Outputs> {
    let (ah, bh) = (i.get("a")?, i.get("b")?);
    let (a, bb) = (up(b, ah)?, up(b, bh)?);
    let mut o = out(b, common_dtype(ah.dtype(), bh.dtype()), ah.shape())?;
    launch(
        b,
        Add {
            a: &a,
            b: &bb,
            out: &mut o,
        },
    )?;
    outputs(b, &[("out", &o)])
}

fn run_embedding(b: &dyn Backend, i: &Inputs, _p: &mut Params) -> CliResult<Outputs> {
    let (th, ih) = (i.get("table")?, i.get("ids")?);
    let (table, ids) = (up(b, th)?, up(b, ih)?);
    let mut o = out(b, th.dtype(), &[dim(ih, 0), dim(th, 1)])?;
    launch(
        b,
        Embedding {
            table: &table,
            ids: &ids,
            out: &mut o,
        },
    )?;
    outputs(b, &[("out", &o)])
}

fn run_copy_window(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let (sh, dh) = (i.get("src")?, i.get("dst")?);
    let (s_rows, s_cols) = as_matrix(sh.shape());
    let src_origin = (p.int("src_row")?, p.int("src_col")?);
    let dst_origin = (p.int("dst_row")?, p.int("dst_col")?);
    let size = (
        p.int_or("rows", s_rows.saturating_sub(src_origin.0))?,
        p.int_or("cols", s_cols.saturating_sub(src_origin.1))?,
    );
    let src = up(b, sh)?;
    let mut dst = up(b, dh)?;
    launch(
        b,
        CopyWindow {
            src: &src,
            dst: &mut dst,
            src_origin,
            dst_origin,
            size,
        },
    )?;
    outputs(b, &[("dst", &dst)])
}

fn run_get_dispatch_layout(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let th = i.get("topk_idx")?;
    let (experts, world) = (p.int("num_experts")?, p.int("world_size")?);
    let topk_idx = up(b, th)?;
    let mut per_rank = out(b, DType::I32, &[world])?;
    let mut per_expert = out(b, DType::I32, &[experts])?;
    let mut in_rank = out(b, DType::Bool, &[dim(th, 0), world])?;
    launch(
        b,
        GetDispatchLayout {
            topk_idx: &topk_idx,
            num_tokens_per_rank: &mut per_rank,
            num_tokens_per_expert: &mut per_expert,
            is_token_in_rank: &mut in_rank,
            num_experts: experts,
            world_size: world,
        },
    )?;
    outputs(
        b,
        &[
            ("num_tokens_per_rank", &per_rank),
            ("num_tokens_per_expert", &per_expert),
            ("is_token_in_rank", &in_rank),
        ],
    )
}

fn run_gather_rows(b: &dyn Backend, i: &Inputs, _p: &mut Params) -> CliResult<Outputs> {
    let sh = i.get("src")?;
    let ih = i.get("index")?;
    let mut shape = sh.shape().to_vec();
    if let Some(first) = shape.first_mut() {
        *first = dim(ih, 0);
    }
    let src = up(b, sh)?;
    let index = up(b, ih)?;
    let mut dst = out(b, sh.dtype(), &shape)?;
    launch(
        b,
        GatherRows {
            src: &src,
            index: &index,
            dst: &mut dst,
        },
    )?;
    outputs(b, &[("dst", &dst)])
}

fn run_reduce_rows(b: &dyn Backend, i: &Inputs, p: &mut Params) -> CliResult<Outputs> {
    let sh = i.get("src")?;
    let ih = i.get("index")?;
    let src = up(b, sh)?;
    let index = up(b, ih)?;
    let weights = i.opt("weights").map(|w| up(b, w)).transpose()?;
    let mut o = out(b, out_dtype(p)?, &[dim(ih, 0), last(sh)])?;
    launch(
        b,
        ReduceRows {
            src: &src,
            index: &index,
            weights: weights.as_ref(),
            out: &mut o,
        },
    )?;
    outputs(b, &[("out", &o)])
}

// ---- the table -----------------------------------------------------------

/// The runner of each op; everything else about an op comes from its
/// declaration in core.
fn runner(kind: OpKind) -> Option<Runner> {
    Some(Runner::Ranks(match kind {
        OpKind::Dispatch => ep::run_dispatch,
        OpKind::Combine => ep::run_combine,
        OpKind::LowLatencyDispatch => ep::run_low_latency_dispatch,
        OpKind::LowLatencyCombine => ep::run_low_latency_combine,
        _ => return local_runner(kind).map(Runner::Local),
    }))
}

fn local_runner(kind: OpKind) -> Option<RunFn> {
    Some(match kind {
        OpKind::ActQuant => run_act_quant,
        OpKind::WeightDequant => run_weight_dequant,
        OpKind::Fp8Gemm => run_fp8_gemm,
        OpKind::Fp8GroupedContiguous => run_fp8_grouped_contiguous,
        OpKind::Fp8GroupedMasked => run_fp8_grouped_masked,
        OpKind::Gemm => run_gemm,
        OpKind::GemmGroupedContiguous => run_gemm_grouped_contiguous,
        OpKind::GemmGroupedMasked => run_gemm_grouped_masked,
        OpKind::MlaDecode => run_mla_decode,
        OpKind::MlaPrefill => run_mla_prefill,
        OpKind::RmsNorm => run_rms_norm,
        OpKind::Rope => run_rope,
        OpKind::MoeGate => run_moe_gate,
        OpKind::SiluMul => run_silu_mul,
        OpKind::Embedding => run_embedding,
        OpKind::Add => run_add,
        OpKind::CopyWindow => run_copy_window,
        OpKind::GetDispatchLayout => run_get_dispatch_layout,
        OpKind::GatherRows => run_gather_rows,
        OpKind::ReduceRows => run_reduce_rows,
        _ => return sparse::runner(kind),
    })
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

fn tensor_specs(d: impl Iterator<Item = &'static TensorDecl>) -> &'static [TensorSpec] {
    leak(
        d.map(|t| TensorSpec {
            name: t.name,
            optional: t.is_optional(),
            doc: t.doc,
        })
        .collect(),
    )
}

/// What `deepport op combine` reads beyond combine's declaration to
/// rebuild the dispatch handle: the routing and the expert count of the
/// dispatch (its declaration's).
fn combine_handle_inputs() -> &'static [TensorSpec] {
    leak(vec![TensorSpec {
        name: "topk_idx",
        optional: false,
        doc: "[N, k] the routing as dispatched (rebuilds the dispatch handle)",
    }])
}

fn spec_of(kind: OpKind, run: Runner) -> OpSpec {
    let d = kind.decl();
    let (handle_inputs, handle_params): (&'static [TensorSpec], &'static [ParamSpec]) = match kind {
        OpKind::Combine => (
            combine_handle_inputs(),
            leak(
                OpKind::Dispatch
                    .decl()
                    .params
                    .iter()
                    .filter(|p| p.name == "num_experts")
                    .copied()
                    .collect(),
            ),
        ),
        _ => (&[], &[]),
    };
    OpSpec {
        name: Box::leak(kind.cli_name().into_boxed_str()),
        kind,
        summary: d.summary,
        inputs: tensor_specs(d.inputs()),
        outputs: tensor_specs(d.outputs()),
        params: d.params,
        handle_inputs,
        handle_params,
        run,
    }
}

/// Every op that `deepport op` runs, in [`OpKind::ALL`] order, built once
/// from core's declarations.
pub static OPS: std::sync::LazyLock<Vec<OpSpec>> = std::sync::LazyLock::new(|| {
    OpKind::ALL
        .into_iter()
        .filter_map(|k| runner(k).map(|r| spec_of(k, r)))
        .collect()
});

/// Looks an op up by its command-line name (kebab- or snake-case).
pub fn find(name: &str) -> Option<&'static OpSpec> {
    let n = name.replace('_', "-");
    OPS.iter().find(|o| o.name == n)
}

/// Names of every op, in table order.
pub fn names() -> Vec<&'static str> {
    OPS.iter().map(|o| o.name).collect()
}

/// Runs `spec` on `backend` with `inputs` and `params` (which gains the
/// computed defaults). Outputs come back in the op's natural dtypes. An
/// expert-parallel op runs on one rank here; see [`run_on_ranks`].
pub fn run(
    spec: &OpSpec,
    backend: &dyn Backend,
    inputs: &Inputs,
    params: &mut Params,
) -> CliResult<Outputs> {
    run_on_ranks(spec, backend, inputs, params, 1)
}

/// Runs `spec` on `ranks` in-process ranks of `backend` (an
/// expert-parallel op; tensors per rank as [`rank_name`]s), or on the
/// backend itself (a local op, where `ranks` must be 1).
pub fn run_on_ranks(
    spec: &OpSpec,
    backend: &dyn Backend,
    inputs: &Inputs,
    params: &mut Params,
    ranks: usize,
) -> CliResult<Outputs> {
    check_ranks(spec, ranks)?;
    match spec.run {
        Runner::Local(f) => f(backend, inputs, params),
        Runner::Ranks(f) => f(backend, inputs, params, ranks),
    }
}

/// A local op runs on one device (`ranks` 1); an expert-parallel op on at
/// least one rank.
fn check_ranks(spec: &OpSpec, ranks: usize) -> CliResult<()> {
    match spec.run {
        Runner::Local(_) if ranks != 1 => Err(CliError::usage(format!(
            "{} runs on one device; --ranks {ranks} applies to the expert-parallel ops only",
            spec.name
        ))),
        Runner::Ranks(_) if ranks == 0 => Err(CliError::usage(format!(
            "{}: --ranks must be at least 1",
            spec.name
        ))),
        _ => Ok(()),
    }
}

/// The metadata `deepport op` writes into its output file: the op, the
/// backend, every parameter value used, and for an expert-parallel op the
/// rank count.
pub fn output_metadata(
    spec: &OpSpec,
    backend: &str,
    params: &Params,
    ranks: usize,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([
        ("op".to_string(), spec.name.to_string()),
        ("backend".to_string(), backend.to_string()),
        ("params".to_string(), params.to_json().to_string()),
    ]);
    if spec.on_ranks() {
        m.insert("ranks".to_string(), ranks.to_string());
    }
    m
}

/// The per-op table of `deepport op --help`.
pub fn help_table() -> String {
    let mut s = String::from("OPS (inputs -> outputs, parameters with defaults):\n");
    for o in OPS.iter() {
        let _ = writeln!(s, "\n  {}  —  {}", o.name, o.summary);
        if o.on_ranks() {
            let _ = writeln!(
                s,
                "    on --ranks N in-process ranks; every tensor per rank, named r{{rank}}.{{name}} (r0.x, r1.x, …)"
            );
        }
        for (label, list) in [
            ("in ", o.inputs),
            ("out", o.outputs),
            ("hdl", o.handle_inputs),
        ] {
            for (j, t) in list.iter().enumerate() {
                let head = if j == 0 { label } else { "   " };
                let _ = writeln!(s, "    {head}  {:<14} {}", t.name, t.doc);
            }
        }
        for (j, p) in o.all_params().enumerate() {
            let head = if j == 0 { "par" } else { "   " };
            let default = match p.default {
                ParamDefault::Value(v) => v.to_string(),
                ParamDefault::Computed(c) => c.to_string(),
            };
            let values = match p.kind {
                ParamKind::Choice(c) => format!("={}", c.join("|")),
                ParamKind::Bool => "=true|false".into(),
                ParamKind::Int => "=N".into(),
                ParamKind::Float => "=X".into(),
            };
            let _ = writeln!(
                s,
                "    {head}  {}{values}  (default {default}): {}",
                p.name, p.help
            );
        }
    }
    s.push_str(
        "\nInputs of any float dtype are accepted where an op computes in f32; index \
         tensors may be i32 or i64. Outputs are poisoned with NaN before the op runs, so \
         anything an op leaves unwritten reads NaN. `hdl` tensors and parameters rebuild a \
         dispatch handle: a combine runs its dispatch again on the routing (zero payload), so \
         its x must be in the order that dispatch gives on the same backend.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::BTreeSet::new();
        for o in OPS.iter() {
            assert!(seen.insert(o.name), "duplicate op {}", o.name);
            assert_eq!(o.kind.name(), o.name.replace('-', "_"));
            assert_eq!(find(o.kind.name()).map(|f| f.name), Some(o.name));
            // Every literal default parses.
            let params = Params::parse(o, &[]).expect(o.name);
            for ps in o.all_params() {
                match ps.default {
                    ParamDefault::Value(_) => assert!(params.values.contains_key(ps.name)),
                    ParamDefault::Computed(_) => assert!(!params.values.contains_key(ps.name)),
                }
            }
        }
        // Every op, local or expert-parallel.
        assert_eq!(OPS.len(), OpKind::ALL.len());
        for o in OPS.iter() {
            assert_eq!(o.on_ranks(), !o.kind.is_local(), "{}", o.name);
        }
    }

    #[test]
    fn params_parse_and_reject() {
        let spec = find("mla-decode").unwrap();
        let p = Params::parse(spec, &["causal=1".into(), "head_dim_v=64".into()]).unwrap();
        assert!(p.bool("causal").unwrap());
        assert_eq!(p.int("head_dim_v").unwrap(), 64);
        let p = Params::parse(spec, &["causal=FALSE".into()]).unwrap();
        assert!(!p.bool("causal").unwrap());
        let e = Params::parse(spec, &["causal=maybe".into()]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("causal"), "{e}");
        let e = Params::parse(spec, &["nope=1".into()]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("nope") && m.contains("softmax_scale") && m.contains("head_dim_v"),
            "{m}"
        );
        let e = Params::parse(spec, &["causal".into()]).unwrap_err();
        assert!(e.to_string().contains("name=value"));
        let e = Params::parse(spec, &["causal=1".into(), "causal=0".into()]).unwrap_err();
        assert!(e.to_string().contains("more than once"));
        let e = Params::parse(spec, &["head_dim_v=-3".into()]).unwrap_err();
        assert!(e.to_string().contains("head_dim_v"));
        let aq = find("act_quant").unwrap();
        let e = Params::parse(aq, &["format=e5m2".into()]).unwrap_err();
        assert!(e.to_string().contains("e4m3fnuz"), "{e}");
    }

    #[test]
    fn typed_args_are_checked_like_text() {
        let spec = find("mla-prefill").unwrap();
        let p = Params::from_args(
            spec,
            &[
                ("form", Arg::Text("naive")),
                ("head_dim_v", Arg::Int(64)),
                ("softmax_scale", Arg::Float(0.125)),
            ],
        )
        .unwrap();
        assert_eq!(p.choice("form").unwrap(), "naive");
        assert_eq!(p.int("head_dim_v").unwrap(), 64);
        assert_eq!(p.float("softmax_scale").unwrap(), 0.125);
        // The same values as text give the same parameters.
        let t = Params::parse(
            spec,
            &[
                "form=naive".into(),
                "head_dim_v=64".into(),
                "softmax_scale=0.125".into(),
            ],
        )
        .unwrap();
        assert_eq!(p.to_json(), t.to_json());
        // Unknown names, wrong types, words outside the choice, repeats.
        for (args, want) in [
            (vec![("nope", Arg::Int(1))], "nope"),
            (vec![("form", Arg::Text("fused"))], "fused"),
            (vec![("head_dim_v", Arg::Float(1.5))], "head_dim_v"),
            (vec![("head_dim_v", Arg::Text("64"))], "head_dim_v"),
            (
                vec![("head_dim_v", Arg::Int(1)), ("head_dim_v", Arg::Int(2))],
                "more than once",
            ),
        ] {
            let e = Params::from_args(spec, &args).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(want), "{e}");
        }
        // Flags take booleans or 0/1; floats take integers.
        let d = find("mla-decode").unwrap();
        let p = Params::from_args(d, &[("causal", Arg::Int(1))]).unwrap();
        assert!(p.bool("causal").unwrap());
        assert!(Params::from_args(d, &[("causal", Arg::Int(2))]).is_err());
        let p = Params::from_args(d, &[("softmax_scale", Arg::Int(2))]).unwrap();
        assert_eq!(p.float("softmax_scale").unwrap(), 2.0);
        // JSON metadata values.
        let j: serde_json::Value =
            serde_json::from_str(r#"{"a": 3, "b": 2.5, "c": true, "d": "x", "e": null}"#).unwrap();
        assert_eq!(Arg::from_json(&j["a"]), Some(Arg::Int(3)));
        assert_eq!(Arg::from_json(&j["b"]), Some(Arg::Float(2.5)));
        assert_eq!(Arg::from_json(&j["c"]), Some(Arg::Bool(true)));
        assert_eq!(Arg::from_json(&j["d"]), Some(Arg::Text("x")));
        assert_eq!(Arg::from_json(&j["e"]), None);
    }

    #[test]
    fn computed_default_is_recorded() {
        let spec = find("mla-decode").unwrap();
        let mut p = Params::parse(spec, &[]).unwrap();
        assert_eq!(p.float_or("softmax_scale", 0.25).unwrap(), 0.25);
        let j = p.to_json();
        assert_eq!(j["softmax_scale"], 0.25);
        assert_eq!(j["causal"], false);
        assert_eq!(j["head_dim_v"], 512);
        let mut p = Params::parse(spec, &["softmax_scale=0.5".into()]).unwrap();
        assert_eq!(p.float_or("softmax_scale", 0.25).unwrap(), 0.5);
    }

    #[test]
    fn index_conversion_checks_range() {
        let mut m = BTreeMap::new();
        m.insert(
            "block_table".to_string(),
            HostTensor::from_i64(&[1, 3], &[0, 5, 1 << 40]),
        );
        m.insert("ok".to_string(), HostTensor::from_i64(&[2], &[-1, 7]));
        let i = Inputs::new("in.safetensors", "mla-decode", m);
        let e = i.as_i32("block_table").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("block_table") && msg.contains("[0, 2]"),
            "{msg}"
        );
        let ok = i.as_i32("ok").unwrap();
        assert_eq!(ok.dtype(), DType::I32);
        assert_eq!(ok.to_i64_vec(), vec![-1, 7]);
        let e = i.get("q").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("in.safetensors")
                && msg.contains("`q`")
                && msg.contains("block_table, ok"),
            "{msg}"
        );
    }

    #[test]
    fn help_lists_every_op_and_param() {
        let h = help_table();
        for o in OPS.iter() {
            assert!(h.contains(o.name), "{}", o.name);
            for p in o.params {
                assert!(h.contains(p.name), "{}.{}", o.name, p.name);
            }
            for t in o.inputs.iter().chain(o.outputs) {
                assert!(h.contains(t.name));
            }
        }
    }
}
