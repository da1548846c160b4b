//! `deepport run`: runs cases on a backend and on the reference backend,
//! judges each, and reports a table, a summary line and optionally JSON
//! Lines. A case is PASS, FAIL, NOT SUPPORTED or ERROR; only PASS is a pass.

use crate::cases::Case;
use crate::error::CliError;
use crate::judge::{self, Check};
use crate::opspec::{CliResult, Outputs};
use deepport_core::backend::Backend;
use deepport_core::registry::Registry;
use deepport_core::{DeviceInfo, Error};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// The outcome of one case on one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// The backend does not implement the op: never a pass.
    NotSupported,
    /// The backend (or the reference) returned an error or panicked.
    Error,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::NotSupported => "NOT SUPPORTED",
            Outcome::Error => "ERROR",
        }
    }
}

/// One case's result on one backend.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub id: String,
    pub backend: String,
    pub outcome: Outcome,
    /// Every check of the judgement (empty unless the case ran).
    pub checks: Vec<Check>,
    /// Why it failed, errored or is not supported.
    pub message: String,
    /// Time the backend under test took (the reference is not counted).
    pub duration: Duration,
}

impl CaseResult {
    /// The check shown in the table.
    pub fn headline(&self) -> Option<&Check> {
        judge::headline(&self.checks)
    }

    pub fn to_json(&self, info: &DeviceInfo) -> serde_json::Value {
        let h = self.headline();
        let num = |v: f64| {
            serde_json::Number::from_f64(v)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)
        };
        serde_json::json!({
            "id": self.id,
            "backend": self.backend,
            "device": info.device,
            "driver": info.driver,
            "outcome": self.outcome.label(),
            "metric": h.map(|c| c.metric.clone()),
            "value": h.map_or(serde_json::Value::Null, |c| num(c.value)),
            "threshold": h.map_or(serde_json::Value::Null, |c| num(c.threshold)),
            "detail": if self.message.is_empty() { h.map(|c| c.detail.clone()).unwrap_or_default() } else { self.message.clone() },
            "duration_s": self.duration.as_secs_f64(),
            "checks": self.checks.iter().map(|c| serde_json::json!({
                "metric": c.metric,
                "value": num(c.value),
                "threshold": num(c.threshold),
                "passed": c.passed,
                "detail": c.detail,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Counts of outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub not_supported: usize,
    pub errors: usize,
}

impl Summary {
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Pass => self.passed += 1,
            Outcome::Fail => self.failed += 1,
            Outcome::NotSupported => self.not_supported += 1,
            Outcome::Error => self.errors += 1,
        }
    }

    pub fn merge(&mut self, o: &Summary) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.not_supported += o.not_supported;
        self.errors += o.errors;
    }

    /// True when every case passed (and there was at least one).
    pub fn all_passed(&self) -> bool {
        self.passed > 0 && self.failed == 0 && self.not_supported == 0 && self.errors == 0
    }

    /// `passed, failed, not supported, errors` as one line.
    pub fn line(&self, label: &str) -> String {
        format!(
            "{label}: {} passed, {} failed, {} not supported, {} errors",
            self.passed, self.failed, self.not_supported, self.errors
        )
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into an error.
fn guarded<T>(f: impl FnOnce() -> CliResult<T>) -> CliResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(CliError::Failed(Error::Other(format!(
            "panicked: {}",
            panic_message(p)
        ))))
    })
}

/// Reference outputs, computed at most once per case.
pub struct ReferenceCache<'a> {
    reference: &'a dyn Backend,
    outputs: Vec<Option<Result<Outputs, String>>>,
}

impl<'a> ReferenceCache<'a> {
    pub fn new(reference: &'a dyn Backend, cases: usize) -> Self {
        ReferenceCache {
            reference,
            outputs: (0..cases).map(|_| None).collect(),
        }
    }

    fn get(&mut self, i: usize, case: &Case) -> &Result<Outputs, String> {
        let reference = self.reference;
        self.outputs[i]
            .get_or_insert_with(|| guarded(|| (case.run)(reference)).map_err(|e| e.to_string()))
    }
}

/// Runs one case on `backend` and judges it against the reference outputs.
pub fn run_case(
    case: &Case,
    index: usize,
    backend: &dyn Backend,
    refs: &mut ReferenceCache<'_>,
) -> CaseResult {
    let mut res = CaseResult {
        id: case.id.clone(),
        backend: backend.name().to_string(),
        outcome: Outcome::Error,
        checks: Vec::new(),
        message: String::new(),
        duration: Duration::ZERO,
    };
    let t0 = Instant::now();
    let actual = guarded(|| (case.run)(backend));
    res.duration = t0.elapsed();
    let actual = match actual {
        Ok(a) => a,
        Err(e) => {
            res.outcome = if e.is_not_supported() {
                Outcome::NotSupported
            } else {
                Outcome::Error
            };
            res.message = e.to_string();
            return res;
        }
    };
    let ref_name = refs.reference.name().to_string();
    let reference = match refs.get(index, case) {
        Ok(r) => r,
        Err(e) => {
            res.message = format!("reference {ref_name} failed: {e}");
            return res;
        }
    };
    match guarded(|| Ok((case.judge)(&actual, reference))) {
        Ok(checks) => {
            res.outcome = if judge::all_passed(&checks) {
                Outcome::Pass
            } else {
                Outcome::Fail
            };
            res.checks = checks;
        }
        Err(e) => res.message = format!("judge: {e}"),
    }
    res
}

/// Formats a metric value compactly.
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == 0.0 {
        "0".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.3e}")
    }
}

/// The text table, written row by row as cases finish.
pub struct Table {
    id_width: usize,
}

const METRIC_WIDTH: usize = 36;

impl Table {
    pub fn new(cases: &[&Case]) -> Self {
        Table {
            id_width: cases.iter().map(|c| c.id.len()).max().unwrap_or(4).max(4),
        }
    }

    pub fn header(&self) -> String {
        format!(
            "{:<w$}  {:<13}  {:<mw$}  {:>10}  {:>10}  {:>9}",
            "CASE",
            "OUTCOME",
            "METRIC",
            "VALUE",
            "THRESHOLD",
            "TIME",
            w = self.id_width,
            mw = METRIC_WIDTH
        )
    }

    /// One row, plus an indented detail line for anything but a pass.
    pub fn row(&self, r: &CaseResult) -> String {
        let h = r.headline();
        let mut s = format!(
            "{:<w$}  {:<13}  {:<mw$}  {:>10}  {:>10}  {:>8.3}s",
            r.id,
            r.outcome.label(),
            h.map_or("-".into(), |c| c.metric.clone()),
            h.map_or("-".into(), |c| fmt_value(c.value)),
            h.map_or("-".into(), |c| fmt_value(c.threshold)),
            r.duration.as_secs_f64(),
            w = self.id_width,
            mw = METRIC_WIDTH
        );
        if r.outcome != Outcome::Pass {
            let why = if r.message.is_empty() {
                h.map(|c| c.detail.clone()).unwrap_or_default()
            } else {
                r.message.clone()
            };
            if !why.is_empty() {
                s.push_str("\n    -> ");
                s.push_str(&why);
            }
        }
        s
    }
}

/// Options of `deepport run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Backends to judge, in order.
    pub backends: Vec<String>,
    /// Only cases whose id contains one of these substrings (all when empty).
    pub filters: Vec<String>,
    /// Write one JSON object per case and backend here.
    pub jsonl: Option<std::path::PathBuf>,
}

/// The cases selected by `filters`.
pub fn select<'c>(cases: &'c [Case], filters: &[String]) -> Vec<&'c Case> {
    cases
        .iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.id.contains(f.as_str())))
        .collect()
}

/// `deepport run`: judges each backend on `cases` against `cpu-ref`,
/// printing the table to `out`. Returns the total summary.
pub fn run(
    reg: &Registry,
    cases: &[Case],
    opts: &RunOptions,
    out: &mut dyn Write,
) -> CliResult<Summary> {
    let selected = select(cases, &opts.filters);
    if selected.is_empty() {
        return Err(CliError::usage(format!(
            "no built-in case matches {:?}; `deepport run --list-cases` shows them",
            opts.filters
        )));
    }
    // Unknown names are usage errors, found before anything runs.
    for name in &opts.backends {
        if !reg.names().contains(&name.as_str()) {
            return Err(CliError::usage(format!(
                "unknown backend `{name}`; known backends: {}",
                reg.names().join(", ")
            )));
        }
    }
    let reference = reg.create(crate::REFERENCE_BACKEND).map_err(|e| {
        CliError::Failed(Error::Other(format!(
            "the reference backend `{}` is needed to judge: {e}",
            crate::REFERENCE_BACKEND
        )))
    })?;
    let mut jsonl = match &opts.jsonl {
        None => None,
        Some(p) => Some(std::fs::File::create(p).map_err(|source| {
            CliError::Failed(Error::Io {
                path: p.clone(),
                source,
            })
        })?),
    };
    let io = |e: std::io::Error| CliError::Failed(Error::Other(format!("writing the report: {e}")));
    let selected_owned: Vec<&Case> = selected;
    let mut refs = ReferenceCache::new(reference.as_ref(), selected_owned.len());
    let table = Table::new(&selected_owned);
    let mut total = Summary::default();
    for name in &opts.backends {
        let mut sum = Summary::default();
        let backend = reg.create(name);
        let info = match &backend {
            Ok(b) => b.info(),
            Err(_) => DeviceInfo {
                backend: name.clone(),
                ..DeviceInfo::default()
            },
        };
        match &backend {
            Ok(_) => writeln!(
                out,
                "backend {name}: {} | {} (judged against {})",
                info.device,
                info.driver,
                crate::REFERENCE_BACKEND
            ),
            Err(e) => writeln!(out, "backend {name}: {e}"),
        }
        .map_err(io)?;
        writeln!(out, "{}", table.header()).map_err(io)?;
        for (i, case) in selected_owned.iter().enumerate() {
            let r = match &backend {
                Ok(b) => run_case(case, i, b.as_ref(), &mut refs),
                Err(e) => CaseResult {
                    id: case.id.clone(),
                    backend: name.clone(),
                    outcome: Outcome::Error,
                    checks: Vec::new(),
                    message: e.to_string(),
                    duration: Duration::ZERO,
                },
            };
            sum.add(r.outcome);
            writeln!(out, "{}", table.row(&r)).map_err(io)?;
            out.flush().map_err(io)?;
            if let Some(f) = jsonl.as_mut() {
                writeln!(f, "{}", r.to_json(&info)).map_err(io)?;
            }
        }
        if opts.backends.len() > 1 {
            writeln!(out, "{}\n", sum.line(&format!("run ({name})"))).map_err(io)?;
        }
        total.merge(&sum);
    }
    writeln!(out, "{}", total.line("run")).map_err(io)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_line() {
        let mut s = Summary::default();
        for o in [Outcome::Pass, Outcome::Pass, Outcome::NotSupported] {
            s.add(o);
        }
        assert!(!s.all_passed(), "not supported is never a pass");
        assert_eq!(
            s.line("run"),
            "run: 2 passed, 0 failed, 1 not supported, 0 errors"
        );
        let mut t = Summary::default();
        t.add(Outcome::Pass);
        assert!(t.all_passed());
        assert!(!Summary::default().all_passed());
    }

    #[test]
    fn values_format_compactly() {
        assert_eq!(fmt_value(0.0), "0");
        assert_eq!(fmt_value(3.0), "3");
        assert_eq!(fmt_value(1e-5), "1.000e-5");
        assert_eq!(fmt_value(f64::NAN), "NaN");
        assert_eq!(fmt_value(f64::INFINITY), "inf");
    }

    #[test]
    fn guarded_turns_panics_into_errors() {
        let r: CliResult<()> = guarded(|| panic!("boom"));
        let e = r.unwrap_err();
        assert!(e.to_string().contains("boom"));
        assert!(!e.is_not_supported());
    }
}

/// Backends that are wrong on purpose: every case must catch them.
#[cfg(all(test, feature = "cpu"))]
mod mutant_tests {
    use super::*;
    use crate::cases;
    use deepport_core::backend::{Support, Tensor};
    use deepport_core::comm::Communicator;
    use deepport_core::ops::*;
    use deepport_core::{DType, HostTensor, Result};
    use deepport_cpu::CpuRef;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        /// Runs the reference, then perturbs every downloaded tensor.
        Perturb,
        /// Local ops return Ok without writing their outputs.
        Lazy,
        /// Every op panics.
        Panic,
    }

    struct Mutant(Mode);

    /// Scales floats by 1 + 2^-5, flips the low bit of FP8 codes, adds 1 to
    /// integers and flips bools.
    fn perturb(h: HostTensor) -> HostTensor {
        match h.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => {
                let v: Vec<f32> = h
                    .to_f32_vec()
                    .iter()
                    .map(|x| x * (1.0 + 1.0 / 32.0))
                    .collect();
                HostTensor::from_f32(h.dtype(), h.shape(), &v)
            }
            DType::I32 | DType::I64 => {
                let v: Vec<i64> = h.to_i64_vec().iter().map(|x| x + 1).collect();
                HostTensor::from_index(h.dtype(), h.shape(), &v)
            }
            _ => {
                let (d, s) = (h.dtype(), h.shape().to_vec());
                let b: Vec<u8> = h.into_bytes().iter().map(|b| b ^ 1).collect();
                HostTensor::from_bytes(d, &s, b).unwrap()
            }
        }
    }

    macro_rules! local {
        ($($m:ident: $t:ident),* $(,)?) => {$(
            fn $m(&self, op: &mut Checked<$t<'_>>) -> Result<()> {
                match self.0 {
                    Mode::Perturb => CpuRef.$m(op),
                    Mode::Lazy => Ok(()),
                    Mode::Panic => panic!("mutant {}", stringify!($m)),
                }
            }
        )*};
    }

    impl Backend for Mutant {
        fn name(&self) -> &str {
            "mutant"
        }
        fn info(&self) -> DeviceInfo {
            DeviceInfo::default()
        }
        fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
            Support::Supported
        }
        fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
            CpuRef.alloc(dtype, shape)
        }
        fn upload(&self, host: &HostTensor) -> Result<Tensor> {
            CpuRef.upload(host)
        }
        fn download(&self, t: &Tensor) -> Result<HostTensor> {
            let h = CpuRef.download(t)?;
            Ok(if self.0 == Mode::Perturb {
                perturb(h)
            } else {
                h
            })
        }
        fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
            CpuRef.write(dst, src)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        local! {
            act_quant: ActQuant, weight_dequant: WeightDequant, fp8_gemm: Fp8Gemm,
            fp8_grouped_contiguous: Fp8GroupedContiguous, fp8_grouped_masked: Fp8GroupedMasked,
            gemm: Gemm, mla_decode: MlaDecode, mla_prefill: MlaPrefill, rms_norm: RmsNorm,
            rope: Rope, moe_gate: MoeGate, silu_mul: SiluMul, embedding: Embedding, add: Add,
            copy_window: CopyWindow, get_dispatch_layout: GetDispatchLayout,
        }
        fn dispatch(
            &self,
            comm: &dyn Communicator,
            op: &Checked<Dispatch<'_>>,
        ) -> Result<DispatchOutput> {
            assert!(self.0 != Mode::Panic, "mutant dispatch");
            CpuRef.dispatch(comm, op)
        }
        fn combine(&self, comm: &dyn Communicator, op: &mut Checked<Combine<'_>>) -> Result<()> {
            CpuRef.combine(comm, op)
        }
        fn low_latency_dispatch(
            &self,
            comm: &dyn Communicator,
            op: &Checked<LowLatencyDispatch<'_>>,
        ) -> Result<LowLatencyDispatchOutput> {
            assert!(self.0 != Mode::Panic, "mutant low_latency_dispatch");
            CpuRef.low_latency_dispatch(comm, op)
        }
        fn low_latency_combine(
            &self,
            comm: &dyn Communicator,
            op: &mut Checked<LowLatencyCombine<'_>>,
        ) -> Result<()> {
            CpuRef.low_latency_combine(comm, op)
        }
    }

    /// A backend that implements nothing: every op is NotSupported.
    struct Bare;

    impl Backend for Bare {
        fn name(&self) -> &str {
            "bare"
        }
        fn info(&self) -> DeviceInfo {
            DeviceInfo::default()
        }
        fn supports(&self, op: OpKind, _dtypes: &[DType]) -> Support {
            Support::NotSupported(format!("{op} is not written"))
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
    }

    fn outcomes(b: &dyn Backend, filter: impl Fn(&Case) -> bool) -> Vec<(String, Outcome, String)> {
        let all = cases::builtin();
        let mut refs = ReferenceCache::new(&CpuRef, all.len());
        all.iter()
            .enumerate()
            .filter(|(_, c)| filter(c))
            .map(|(i, c)| {
                let r = run_case(c, i, b, &mut refs);
                (r.id, r.outcome, r.message)
            })
            .collect()
    }

    #[test]
    fn the_reference_passes_against_itself() {
        for (id, o, m) in outcomes(&CpuRef, |_| true) {
            assert_eq!(o, Outcome::Pass, "{id}: {m}");
        }
    }

    #[test]
    fn every_case_catches_perturbed_outputs() {
        for (id, o, m) in outcomes(&Mutant(Mode::Perturb), |_| true) {
            assert_eq!(
                o,
                Outcome::Fail,
                "{id} did not catch a perturbed output: {m}"
            );
        }
    }

    #[test]
    fn every_local_case_catches_unwritten_outputs() {
        let local = |c: &Case| !c.ops.iter().any(|k| k.name().contains("dispatch"));
        let r = outcomes(&Mutant(Mode::Lazy), local);
        assert!(r.len() > 30);
        for (id, o, m) in r {
            assert_eq!(
                o,
                Outcome::Fail,
                "{id} did not catch an unwritten output: {m}"
            );
        }
    }

    #[test]
    fn panics_are_errors_and_missing_ops_are_not_supported() {
        // One local and one expert-parallel case each keep the test short.
        let pick = |c: &Case| {
            c.id.starts_with("act_quant(m=5")
                || c.id.starts_with("dispatch_combine(") && c.id.contains("bf16")
        };
        let r = outcomes(&Mutant(Mode::Panic), pick);
        assert_eq!(r.len(), 2);
        for (id, o, m) in r {
            assert_eq!(o, Outcome::Error, "{id}: {m}");
            assert!(m.contains("panicked"), "{id}: {m}");
        }
        let r = outcomes(&Bare, |_| true);
        for (id, o, m) in &r {
            assert_eq!(*o, Outcome::NotSupported, "{id}: {m}");
        }
        let mut s = Summary::default();
        r.iter().for_each(|x| s.add(x.1));
        assert!(!s.all_passed());
    }
}
