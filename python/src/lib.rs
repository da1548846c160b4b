//! The native module of the `deepport` Python package (`deepport._deepport`).
//! The Python side (`deepport/__init__.py`) converts NumPy arrays to and
//! from `(name, dtype, shape, bytes)` tuples; this module runs them.
#![forbid(unsafe_code)]

use clap::Parser;
use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_conformance::CliError;
use deepport_core::{DType, Error, HostTensor};
use deepport_model::{Checkpoint, Model, ModelConfig, Numerics};
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

fn err(e: Error) -> PyErr {
    match e {
        Error::NotSupported { .. } => PyNotImplementedError::new_err(e.to_string()),
        Error::Shape { .. }
        | Error::DType { .. }
        | Error::Invalid { .. }
        | Error::IndexOutOfRange { .. }
        | Error::NonFinite { .. }
        | Error::UnknownBackend { .. } => PyValueError::new_err(e.to_string()),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

fn cli_err(e: CliError) -> PyErr {
    match e {
        CliError::Usage(m) => PyValueError::new_err(m),
        CliError::Invalid(e) | CliError::Failed(e) => err(e),
    }
}

fn dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).ok_or_else(|| PyValueError::new_err(format!("unknown dtype `{name}`")))
}

fn registry() -> deepport_core::registry::Registry {
    deepport_conformance::registry()
}

/// A status and message of the C ABI's Rust entries as a Python exception.
fn status_err((status, msg): (deepport::DeepportStatus, String)) -> PyErr {
    use deepport::DeepportStatus as S;
    match status {
        S::NotSupported => PyNotImplementedError::new_err(msg),
        S::InvalidArgument | S::Invalid | S::IndexOutOfRange | S::UnknownBackend => {
            PyValueError::new_err(msg)
        }
        _ => PyRuntimeError::new_err(msg),
    }
}

/// Every backend of this build: (name, description, available, device or reason).
#[pyfunction]
fn backends() -> Vec<(String, String, bool, String)> {
    let reg = registry();
    let mut out = Vec::new();
    for e in reg.entries() {
        let (ok, what) = match reg.probe(e.name) {
            Ok(deepport_core::registry::Availability::Available(b)) => (true, b.info().device),
            Ok(deepport_core::registry::Availability::Unavailable(r)) => (false, r),
            Err(e) => (false, e.to_string()),
        };
        out.push((e.name.to_string(), e.description.to_string(), ok, what));
    }
    out
}

/// Loads a plugin library and returns its backend name (it then appears in
/// `backends()` and can be used by name).
#[pyfunction]
fn load_plugin(path: &str) -> PyResult<String> {
    let mut paths: Vec<std::path::PathBuf> = deepport_plugin_paths();
    let p = std::path::PathBuf::from(path);
    if !paths.contains(&p) {
        paths.push(p);
    }
    let joined = std::env::join_paths(&paths).map_err(|e| PyValueError::new_err(e.to_string()))?;
    std::env::set_var("DEEPPORT_PLUGIN", &joined);
    let reg = registry();
    let canon = std::path::Path::new(path)
        .canonicalize()
        .map_err(|e| PyValueError::new_err(format!("{path}: {e}")))?;
    for e in reg.entries() {
        if e.description.contains(&canon.display().to_string()) {
            return Ok(e.name.to_string());
        }
    }
    Err(PyRuntimeError::new_err(format!(
        "{path} did not load as a deepport plugin (see the warning on stderr)"
    )))
}

fn deepport_plugin_paths() -> Vec<std::path::PathBuf> {
    std::env::var_os("DEEPPORT_PLUGIN")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default()
}

type Wire<'py> = (String, String, Vec<usize>, Bound<'py, PyBytes>);

/// Runs one op (as `deepport op`) on `backend` with host tensors
/// `(name, dtype, shape, bytes)` and parameters `NAME=VALUE`; returns the
/// outputs the same way.
#[pyfunction]
fn run_op<'py>(
    py: Python<'py>,
    backend: &str,
    op: &str,
    inputs: Vec<(String, String, Vec<usize>, Vec<u8>)>,
    params: Vec<String>,
) -> PyResult<Vec<Wire<'py>>> {
    let spec = opspec::find(op).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown op `{op}`; known: {}",
            opspec::names().join(", ")
        ))
    })?;
    let mut tensors = BTreeMap::new();
    for (name, dt, shape, data) in inputs {
        let t = HostTensor::from_bytes(dtype(&dt)?, &shape, data)
            .map_err(|e| PyValueError::new_err(format!("input `{name}`: {e}")))?;
        tensors.insert(name, t);
    }
    let mut params = Params::parse(spec, &params).map_err(cli_err)?;
    let inputs = Inputs::new("the Python caller's arrays", spec.name, tensors);
    inputs.check_present(spec, 1).map_err(cli_err)?;
    let b = registry().create(backend).map_err(err)?;
    let outs = opspec::run(spec, b.as_ref(), &inputs, &mut params).map_err(cli_err)?;
    Ok(outs
        .into_iter()
        .map(|(n, t)| {
            let d = t.dtype().short_name().to_string();
            let s = t.shape().to_vec();
            (n, d, s, PyBytes::new(py, t.bytes()))
        })
        .collect())
}

/// The forward pass: loads `checkpoint` on `backend` in `mode` (f32, bf16,
/// fp8), prefills `tokens` and greedily decodes `decode` more. Returns
/// (the prompt's logits as f32 bytes [T, vocab], vocab, the decoded tokens).
#[pyfunction]
#[pyo3(signature = (backend, checkpoint, tokens, mode = "f32", decode = 0))]
fn forward<'py>(
    py: Python<'py>,
    backend: &str,
    checkpoint: &str,
    tokens: Vec<u32>,
    mode: &str,
    decode: usize,
) -> PyResult<(Bound<'py, PyBytes>, usize, Vec<u32>)> {
    let numerics = Numerics::parse(mode)
        .ok_or_else(|| PyValueError::new_err(format!("mode `{mode}`: f32, bf16 or fp8")))?;
    if tokens.is_empty() {
        return Err(PyValueError::new_err("the prompt is empty"));
    }
    let b = registry().create(backend).map_err(err)?;
    let dir = std::path::Path::new(checkpoint);
    let cfg = ModelConfig::from_file(dir.join("config.json")).map_err(err)?;
    let ckpt = Checkpoint::open(dir).map_err(err)?;
    let mut m = Model::load(b.as_ref(), &ckpt, &cfg, numerics, Default::default()).map_err(err)?;
    let logits = m.prefill(&tokens).map_err(err)?;
    let v = cfg.vocab_size;
    let argmax = |x: &[f32]| {
        let mut best = 0;
        for (i, y) in x.iter().enumerate() {
            if *y > x[best] {
                best = i;
            }
        }
        best as u32
    };
    let all = logits.to_f32_vec();
    let mut out = Vec::new();
    if decode > 0 {
        let mut next = argmax(&all[(tokens.len() - 1) * v..]);
        out.push(next);
        while out.len() < decode {
            next = argmax(&m.decode(next).map_err(err)?.to_f32_vec());
            out.push(next);
        }
    }
    let bytes: Vec<u8> = all.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok((PyBytes::new(py, &bytes), v, out))
}

/// One backend instance (`Backend("cpu")`, `Backend("wgpu:0")`): device
/// memory and ops on device tensors, kept between calls.
#[pyclass(name = "Backend", module = "deepport._deepport", frozen)]
struct PyBackend {
    inner: Arc<dyn deepport_core::Backend>,
}

/// A tensor in a backend's memory (made by `Backend.upload`/`alloc`).
#[pyclass(name = "Tensor", module = "deepport._deepport", frozen)]
struct PyTensor {
    inner: Arc<RwLock<deepport_core::Tensor>>,
    backend: Arc<dyn deepport_core::Backend>,
}

fn tensor_of(b: &PyBackend, t: deepport_core::Tensor) -> PyTensor {
    PyTensor {
        inner: Arc::new(RwLock::new(t)),
        backend: b.inner.clone(),
    }
}

fn busy() -> PyErr {
    PyRuntimeError::new_err("the tensor is in use by another call")
}

#[pymethods]
impl PyBackend {
    #[new]
    fn new(spec: &str) -> PyResult<Self> {
        let b = registry().create(spec).map_err(err)?;
        Ok(PyBackend {
            inner: Arc::from(b),
        })
    }

    /// The backend's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// A new tensor holding `data` (raw little-endian bytes of `dtype`).
    fn upload(&self, dtype_name: &str, shape: Vec<usize>, data: Vec<u8>) -> PyResult<PyTensor> {
        let h = HostTensor::from_bytes(dtype(dtype_name)?, &shape, data)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(tensor_of(self, self.inner.upload(&h).map_err(err)?))
    }

    /// A new uninitialised tensor.
    fn alloc(&self, dtype_name: &str, shape: Vec<usize>) -> PyResult<PyTensor> {
        let d = dtype(dtype_name)?;
        Ok(tensor_of(self, self.inner.alloc(d, &shape).map_err(err)?))
    }

    /// Waits for the submitted work; raises a deferred error.
    fn synchronize(&self) -> PyResult<()> {
        self.inner.synchronize().map_err(err)
    }

    /// Runs a local op on device tensors (`deepport_op_launch`): `tensors`
    /// binds declared names to tensors of this backend (outputs included,
    /// allocated by the caller), `params` is `k=v,k=v`.
    fn launch(
        &self,
        op: &str,
        tensors: Vec<(String, PyRef<'_, PyTensor>)>,
        params: &str,
    ) -> PyResult<()> {
        let bound: Vec<deepport::launch::Bound<'_>> = tensors
            .iter()
            .map(|(n, t)| deepport::launch::Bound {
                name: n.as_str(),
                tensor: &t.inner,
            })
            .collect();
        deepport::launch::launch_op(self.inner.as_ref(), op, &bound, params).map_err(status_err)
    }
}

#[pymethods]
impl PyTensor {
    /// The dtype's name (`f32`, `bf16`, …).
    #[getter]
    fn dtype(&self) -> PyResult<String> {
        let t = self.inner.try_read().map_err(|_| busy())?;
        Ok(t.dtype().short_name().to_string())
    }

    #[getter]
    fn shape(&self) -> PyResult<Vec<usize>> {
        let t = self.inner.try_read().map_err(|_| busy())?;
        Ok(t.shape().to_vec())
    }

    /// The data as bytes (waits for the work writing it; raises a deferred error).
    fn download<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let t = self.inner.try_read().map_err(|_| busy())?;
        let h = self.backend.download(&t).map_err(err)?;
        Ok(PyBytes::new(py, h.bytes()))
    }

    /// Overwrites the tensor with raw bytes of its size.
    fn write(&self, data: Vec<u8>) -> PyResult<()> {
        let mut t = self.inner.try_write().map_err(|_| busy())?;
        let h = HostTensor::from_bytes(t.dtype(), t.shape(), data)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        self.backend.write(&mut t, &h).map_err(err)
    }
}

/// A DeepSeek-V3 model loaded once on a backend; prefill and decode run on
/// it many times, keeping the weights and the latent cache between calls.
#[pyclass(name = "Model", module = "deepport._deepport", frozen)]
struct PyModel {
    inner: deepport::DeepportModel,
}

fn f32_bytes<'py>(py: Python<'py>, t: &HostTensor) -> Bound<'py, PyBytes> {
    let v: Vec<u8> = t
        .to_f32_vec()
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    PyBytes::new(py, &v)
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (backend, checkpoint, mode = "f32"))]
    fn new(backend: &PyBackend, checkpoint: &str, mode: &str) -> PyResult<Self> {
        let inner = deepport::DeepportModel::load(
            backend.inner.clone(),
            std::path::Path::new(checkpoint),
            mode,
        )
        .map_err(status_err)?;
        Ok(PyModel { inner })
    }

    #[getter]
    fn vocab(&self) -> usize {
        self.inner.vocab()
    }

    /// Runs a prompt from position 0 (replacing the cached sequence):
    /// f32 bytes of the logits `[len(tokens), vocab]`.
    fn prefill<'py>(&self, py: Python<'py>, tokens: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let l = self.inner.prefill(&tokens).map_err(status_err)?;
        Ok(f32_bytes(py, &l))
    }

    /// Appends one token to the cached sequence: f32 bytes of its logits `[vocab]`.
    fn decode<'py>(&self, py: Python<'py>, token: u32) -> PyResult<Bound<'py, PyBytes>> {
        let l = self.inner.decode(token).map_err(status_err)?;
        Ok(f32_bytes(py, &l))
    }
}

#[derive(Parser)]
#[command(name = "deepport-run")]
struct RunCli {
    #[command(flatten)]
    args: deepport_conformance::suite::exec::RunArgs,
}

/// Runs the conformance suite (`deepport run ARGS...`, e.g. `["--backend",
/// "cpu", "--profile", "smoke", "--report", DIR]`); returns the exit status.
#[pyfunction]
fn run_suite(args: Vec<String>) -> PyResult<i32> {
    let argv = std::iter::once("deepport-run".to_string()).chain(args);
    let cli = RunCli::try_parse_from(argv).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let code = deepport_conformance::suite::exec::run_main(cli.args);
    Ok(if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    })
}

#[pymodule]
fn _deepport(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add_function(wrap_pyfunction!(load_plugin, m)?)?;
    m.add_function(wrap_pyfunction!(run_op, m)?)?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(run_suite, m)?)?;
    m.add_class::<PyBackend>()?;
    m.add_class::<PyTensor>()?;
    m.add_class::<PyModel>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
