//! Any declared local op on caller-owned device tensors, by name
//! ([`crate::deepport_op_launch`]).
//!
//! Nothing here knows an op. The op's tensors and parameters come from its
//! declaration in core (`OpKind::decl`), its parameters are parsed by
//! `deepport op`'s typed path ([`Params::parse`]), and its typed arguments
//! are built by `deepport op`'s runner for that op ([`opspec::run`]), the
//! same code the conformance suite runs. A new op declared in core and
//! given a runner is therefore reachable here without a line of this file
//! changing.
//!
//! The runners allocate outputs and upload inputs themselves; they run here
//! against a [`Binder`], a backend that wraps the caller's backend and
//! hands the runner the caller's tensors instead, in two passes:
//!
//! 1. *Record*: every upload returns a placeholder (no device memory). At
//!    the launch, the op's arguments name each placeholder by its declared
//!    name; the binder notes which upload was which tensor, and which
//!    outputs (dtype, shape) the runner made from the inputs and
//!    parameters, and stops the runner before anything runs. The caller's
//!    outputs are then checked against those: a missing output, a wrong
//!    dtype or shape is an error naming it.
//! 2. *Bind*: the runner runs again; an upload of an input returns a view
//!    of the caller's tensor (no copy), an output a placeholder that the
//!    binder swaps for the caller's output tensor at the launch, where the
//!    op is validated again (core's checks: declared dtypes, shapes,
//!    ownership) on the caller's tensors before the backend sees it.
//!
//! The launch is asynchronous as every op is: nothing is downloaded and the
//! backend is not synchronized, so an error that needs device values (an
//! index out of range) surfaces at the next download or synchronize of the
//! backend (`backend.rs`'s contract). The runner's host-side placeholders
//! cost host memory the size of the tensors (zero pages, mostly never
//! touched) and the poisoned output staging of `deepport op`.

use crate::{DeepportStatus, Fail};
use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_conformance::CliError;
use deepport_core::backend::{Backend, DeviceInfo, Support};
use deepport_core::device::{InstanceId, Storage};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Tensor};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The device memory of a tensor the runner made that never reaches the
/// backend: the upload's sequence number.
struct Placeholder {
    seq: usize,
}

impl Storage for Placeholder {
    fn backend(&self) -> &str {
        "deepport_op_launch (placeholder)"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Record,
    Bind,
}

/// What the record pass learned.
#[derive(Default)]
struct Record {
    /// Upload sequence number → declared tensor name, and whether it is an
    /// output of the op.
    uploads: BTreeMap<usize, (&'static str, bool)>,
    /// The outputs the runner made: declared name, dtype, shape.
    made: Vec<(&'static str, DType, Vec<usize>)>,
    /// The runner reached the launch.
    launched: bool,
}

struct State {
    mode: Mode,
    next: usize,
    record: Record,
}

/// A backend that gives the op runner the caller's tensors (see the module
/// docs).
struct Binder<'a> {
    inner: &'a dyn Backend,
    inputs: BTreeMap<&'static str, &'a Tensor>,
    outputs: Mutex<BTreeMap<&'static str, &'a mut Tensor>>,
    state: Mutex<State>,
}

const RECORDED: &str = "deepport_op_launch: recorded";

fn internal(msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("internal (deepport_op_launch): {msg}"))
}

impl Binder<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn placeholder(&self, seq: usize, dtype: DType, shape: &[usize]) -> Tensor {
        Tensor::new(
            dtype,
            shape,
            Box::new(Placeholder { seq }),
            self.inner.instance(),
        )
    }

    /// An upload or allocation by the runner.
    fn make(&self, dtype: DType, shape: &[usize]) -> deepport_core::Result<Tensor> {
        let mut st = self.state();
        let seq = st.next;
        st.next += 1;
        if st.mode == Mode::Bind {
            if let Some(&(name, false)) = st.record.uploads.get(&seq) {
                let t = self
                    .inputs
                    .get(name)
                    .ok_or_else(|| internal(format!("input `{name}` is not bound")))?;
                return t.view(0, t.shape());
            }
        }
        Ok(self.placeholder(seq, dtype, shape))
    }

    /// The launch of the op by the runner.
    fn bind<A: OpArgs>(
        &self,
        op: &mut Checked<A>,
        run: impl FnOnce(&mut Checked<A>) -> deepport_core::Result<()>,
    ) -> deepport_core::Result<()> {
        let mode = self.state().mode;
        match mode {
            Mode::Record => {
                let outs: Vec<&'static str> = op
                    .args_mut()
                    .outputs_mut()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                let mut st = self.state();
                for (name, t) in op.args().tensors() {
                    let seq = t
                        .storage_any::<Placeholder>()
                        .ok_or_else(|| internal(format!("`{name}` was not made by the runner")))?
                        .seq;
                    let is_out = outs.contains(&name);
                    st.record.uploads.insert(seq, (name, is_out));
                    if is_out {
                        st.record.made.push((name, t.dtype(), t.shape().to_vec()));
                    }
                }
                st.record.launched = true;
                Err(Error::Other(RECORDED.into()))
            }
            Mode::Bind => {
                let mut outs = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
                let mut swapped = Vec::new();
                for (name, t) in op.args_mut().outputs_mut() {
                    let u = outs
                        .get_mut(name)
                        .ok_or_else(|| internal(format!("output `{name}` is not bound")))?;
                    std::mem::swap(t, &mut **u);
                    swapped.push(name);
                }
                let result = (|| {
                    check_declared(A::DECL, &op.args().tensors())?;
                    op.args().validate()?;
                    check_launch(self.inner, op.args_mut())?;
                    run(op)
                })();
                for (name, t) in op.args_mut().outputs_mut() {
                    if let (true, Some(u)) = (swapped.contains(&name), outs.get_mut(name)) {
                        std::mem::swap(t, &mut **u);
                    }
                }
                result
            }
        }
    }
}

macro_rules! bind_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> deepport_core::Result<()> {
            self.bind(op, |op| self.inner.$method(op))
        }
    )*};
}

impl Backend for Binder<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn instance(&self) -> InstanceId {
        self.inner.instance()
    }
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        self.inner.supports(op, dtypes)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> deepport_core::Result<Tensor> {
        self.make(dtype, shape)
    }
    fn upload(&self, host: &HostTensor) -> deepport_core::Result<Tensor> {
        self.make(host.dtype(), host.shape())
    }
    fn download(&self, t: &Tensor) -> deepport_core::Result<HostTensor> {
        // The runner downloads its outputs at the end; they are the
        // caller's and stay on the device.
        if t.storage_any::<Placeholder>().is_some() {
            Ok(HostTensor::zeros(t.dtype(), &[0]))
        } else {
            self.inner.download(t)
        }
    }
    fn write(&self, _dst: &mut Tensor, _src: &HostTensor) -> deepport_core::Result<()> {
        Err(internal("an op runner wrote host data into a tensor"))
    }
    fn synchronize(&self) -> deepport_core::Result<()> {
        // Asynchronous: the caller synchronizes when it wants to.
        Ok(())
    }
    deepport_core::for_each_local_op!(bind_ops);
}

/// One tensor the caller binds to a declared name.
pub struct Bound<'a> {
    pub name: &'a str,
    pub tensor: &'a RwLock<Tensor>,
}

fn describe(dtype: DType, shape: &[usize]) -> String {
    format!("{dtype} {shape:?}")
}

/// Parses `k=v,k=v` (empty: none).
fn split_params(params: &str) -> Vec<String> {
    params
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Runs op `name` on `backend` with the caller's device tensors (inputs
/// are read-locked, outputs write-locked; a tensor in use is
/// [`DeepportStatus::Busy`]) and parameters `k=v,k=v` (see the module
/// docs). The Rust entry of [`crate::deepport_op_launch`], for other
/// bindings (the Python module): on failure, the status and the message.
pub fn launch_op(
    backend: &dyn Backend,
    name: &str,
    bound: &[Bound<'_>],
    params: &str,
) -> Result<(), (DeepportStatus, String)> {
    launch(backend, name, bound, params).map_err(|f| (f.status, f.msg))
}

pub(crate) fn launch(
    backend: &dyn Backend,
    name: &str,
    bound: &[Bound<'_>],
    params: &str,
) -> Result<(), Fail> {
    let spec = opspec::find(name).ok_or_else(|| {
        Fail::arg(format!(
            "unknown op `{name}`; known: {}",
            opspec::names().join(", ")
        ))
    })?;
    let decl = spec.decl();
    if spec.on_ranks() {
        return Err(Fail {
            status: DeepportStatus::NotSupported,
            msg: format!(
                "{} is an expert-parallel op: it runs on every rank of a group at once, which \
                 deepport_op_launch does not set up; run it with deepport_op_run (one rank, host \
                 tensors) or from Rust (deepport_core::ops::{})",
                spec.name,
                decl.name()
            ),
        });
    }
    // Names: declared, given once; an output is a name the op writes.
    let mut names: Vec<(&'static str, bool, &RwLock<Tensor>)> = Vec::new();
    for b in bound {
        let d = decl.tensor(b.name).ok_or_else(|| {
            let all: Vec<&str> = decl.tensors.iter().map(|t| t.name).collect();
            Fail::arg(format!(
                "{} has no tensor `{}`; its tensors: {}",
                decl.name(),
                b.name,
                all.join(", ")
            ))
        })?;
        if names.iter().any(|(n, _, _)| *n == d.name) {
            return Err(Fail::arg(format!(
                "{}: tensor `{}` is given more than once",
                decl.name(),
                d.name
            )));
        }
        if let Some((other, _, _)) = names.iter().find(|(_, _, t)| std::ptr::eq(*t, b.tensor)) {
            return Err(Fail::arg(format!(
                "{}: `{}` and `{other}` are the same tensor; an op's tensors must be distinct",
                decl.name(),
                d.name
            )));
        }
        let is_out = decl.outputs().any(|t| t.name == d.name);
        names.push((d.name, is_out, b.tensor));
    }
    // Lock: inputs read, outputs written (a tensor in use is BUSY).
    let mut readers: Vec<(&'static str, RwLockReadGuard<'_, Tensor>)> = Vec::new();
    let mut writers: Vec<(&'static str, RwLockWriteGuard<'_, Tensor>)> = Vec::new();
    for &(n, is_out, t) in &names {
        if is_out {
            let g = t
                .try_write()
                .map_err(|_| Fail::busy(&format!("tensor `{n}`")))?;
            writers.push((n, g));
        } else {
            let g = t
                .try_read()
                .map_err(|_| Fail::busy(&format!("tensor `{n}`")))?;
            readers.push((n, g));
        }
    }
    for (n, t) in readers
        .iter()
        .map(|(n, g)| (*n, &**g))
        .chain(writers.iter().map(|(n, g)| (*n, &**g)))
    {
        t.check_owner(backend.instance(), backend.name())
            .map_err(|e| Fail {
                msg: format!("{}: tensor `{n}`: {e}", decl.name()),
                ..Fail::from(e)
            })?;
    }
    let mut params = Params::parse(spec, &split_params(params))?;
    // The runner reads shapes and dtypes from host tensors: zero-filled
    // stand-ins (their pages are never touched unless a runner converts).
    let host: BTreeMap<String, HostTensor> = readers
        .iter()
        .map(|(n, g)| (*n, &**g))
        .chain(writers.iter().map(|(n, g)| (*n, &**g)))
        .map(|(n, t)| (n.to_string(), HostTensor::zeros(t.dtype(), t.shape())))
        .collect();
    let inputs = Inputs::new("the tensors given to deepport_op_launch", spec.name, host);
    inputs.check_present(spec, 1)?;

    let binder = Binder {
        inner: backend,
        inputs: readers.iter().map(|(n, g)| (*n, &**g)).collect(),
        outputs: Mutex::new(BTreeMap::new()),
        state: Mutex::new(State {
            mode: Mode::Record,
            next: 0,
            record: Record::default(),
        }),
    };
    // Pass 1: which upload is which tensor, which outputs the op makes.
    let first = opspec::run(spec, &binder, &inputs, &mut params);
    let record = {
        let mut st = binder.state();
        if !st.record.launched {
            return Err(match first {
                Err(e) => e.into(),
                Ok(_) => Fail::from(internal(format!("{} did not launch", spec.name))),
            });
        }
        std::mem::take(&mut st.record)
    };
    if let Err(e) = first {
        let recorded = matches!(&e, CliError::Failed(Error::Other(m)) if m == RECORDED);
        if !recorded {
            return Err(e.into());
        }
    }
    // The caller's outputs are exactly the ones the op makes.
    for (n, dtype, shape) in &record.made {
        let Some((_, t)) = writers.iter().find(|(w, _)| w == n) else {
            return Err(Fail::arg(format!(
                "{}: output `{n}` ({}) is not given; allocate it and pass it as `{n}`",
                decl.name(),
                describe(*dtype, shape)
            )));
        };
        if t.dtype() != *dtype || t.shape() != shape.as_slice() {
            return Err(Fail {
                status: DeepportStatus::Invalid,
                msg: format!(
                    "{}: output `{n}` is {}, but the op makes {} from these inputs and \
                     parameters (parameters such as out_dtype choose an output's dtype)",
                    decl.name(),
                    describe(t.dtype(), t.shape()),
                    describe(*dtype, shape)
                ),
            });
        }
        if t.is_view() {
            return Err(Fail {
                status: DeepportStatus::Invalid,
                msg: format!(
                    "{}: output `{n}` is a view; views are read-only",
                    decl.name()
                ),
            });
        }
    }
    for (n, _) in &writers {
        if !record.made.iter().any(|(m, _, _)| m == n) {
            return Err(Fail::arg(format!(
                "{}: `{n}` is not written by the op with these inputs and parameters",
                decl.name()
            )));
        }
    }
    for (n, _) in &readers {
        if !record.uploads.values().any(|(u, _)| u == n) {
            return Err(Fail::arg(format!(
                "{}: tensor `{n}` is not read by the op with these inputs and parameters",
                decl.name()
            )));
        }
    }
    // Pass 2: the caller's tensors.
    {
        let mut outs = binder.outputs.lock().unwrap_or_else(|p| p.into_inner());
        for (n, g) in writers.iter_mut() {
            outs.insert(*n, &mut **g);
        }
    }
    {
        let mut st = binder.state();
        st.mode = Mode::Bind;
        st.next = 0;
        st.record = record;
    }
    opspec::run(spec, &binder, &inputs, &mut params)?;
    Ok(())
}
