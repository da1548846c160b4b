//! `deepport forward --op-times`: a wrapper backend that times every call
//! made on the backend under test (each local op, and the memory methods)
//! and prints where the prefill's wall time went. Each call is timed on the
//! host around the inner call, so on an asynchronous backend the times are
//! launch times, not device times; on `cpu`/`cpu-ref` they are the kernels.
//! What is left of the prefill's wall time is the model's glue (and core's
//! expert-parallel protocol between the ops it launches).

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{Communicator, DType, HostTensor, Result};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Calls and total time per entry of one run.
type Entries = BTreeMap<&'static str, (u64, Duration)>;

/// Calls and time per entry (an op's name, or `alloc`/`upload`/…), per run.
#[derive(Default)]
pub struct OpTimes {
    /// The run in progress.
    current: Mutex<Entries>,
    /// Finished runs: their wall time and entries.
    runs: Mutex<Vec<(Duration, Entries)>>,
}

impl OpTimes {
    fn record(&self, name: &'static str, d: Duration) {
        if let Ok(mut m) = self.current.lock() {
            let e = m.entry(name).or_default();
            e.0 += 1;
            e.1 += d;
        }
    }

    /// Forgets everything recorded (e.g. the load's calls).
    pub fn clear(&self) {
        if let Ok(mut m) = self.current.lock() {
            m.clear();
        }
        if let Ok(mut r) = self.runs.lock() {
            r.clear();
        }
    }

    /// Closes a run that took `wall`.
    pub fn end_run(&self, wall: Duration) {
        let m = match self.current.lock() {
            Ok(mut m) => std::mem::take(&mut *m),
            Err(_) => return,
        };
        if let Ok(mut r) = self.runs.lock() {
            r.push((wall, m));
        }
    }

    /// One line per entry, most time first, then the rest of the wall time
    /// (outside every backend call): the median over the runs and the
    /// fastest run's (on a loaded machine the fastest is the least
    /// disturbed).
    pub fn report(&self) -> String {
        let runs = match self.runs.lock() {
            Ok(r) => r.clone(),
            Err(_) => return "op times unavailable (poisoned lock)".into(),
        };
        if runs.is_empty() {
            return "forward: no op times recorded".into();
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let stats = |mut v: Vec<Duration>| -> (f64, f64) {
            v.sort();
            (ms(v[v.len() / 2]), ms(v[0]))
        };
        let mut names: Vec<&'static str> =
            runs.iter().flat_map(|(_, m)| m.keys().copied()).collect();
        names.sort();
        names.dedup();
        let per = |name: &str| -> Vec<Duration> {
            runs.iter()
                .map(|(_, m)| m.get(name).map_or(Duration::ZERO, |e| e.1))
                .collect()
        };
        let calls = |name: &str| runs[0].1.get(name).map_or(0, |e| e.0);
        let mut rows: Vec<(&str, u64, f64, f64)> = names
            .iter()
            .map(|&n| {
                let (med, min) = stats(per(n));
                (n, calls(n), med, min)
            })
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        let (wall_med, wall_min) = stats(runs.iter().map(|r| r.0).collect());
        let rest: Vec<Duration> = runs
            .iter()
            .map(|(w, m)| w.saturating_sub(m.values().map(|e| e.1).sum()))
            .collect();
        let (rest_med, rest_min) = stats(rest);
        let mut s = format!(
            "forward: backend calls per prefill over {} run(s), ms: median (fastest); wall {wall_med:.3} ({wall_min:.3})\n",
            runs.len()
        );
        for (name, n, med, min) in rows {
            s += &format!(
                "  {name:<26} {n:>6} calls {med:>9.3} ({min:>8.3}) {:>5.1}%\n",
                100.0 * med / wall_med.max(1e-12)
            );
        }
        s += &format!(
            "  {:<26} {:>6}       {rest_med:>9.3} ({rest_min:>8.3}) {:>5.1}%",
            "(outside backend calls)",
            "",
            100.0 * rest_med / wall_med.max(1e-12)
        );
        s
    }
}

/// Times every call on `inner` into `times`.
pub struct Timed<'a> {
    pub inner: &'a dyn Backend,
    pub times: &'a OpTimes,
}

impl Timed<'_> {
    fn timed<R>(&self, name: &'static str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        self.times.record(name, t.elapsed());
        r
    }
}

macro_rules! timed_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            self.timed(stringify!($method), || self.inner.$method(op))
        }
    )*};
}

impl Backend for Timed<'_> {
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
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.timed("alloc", || self.inner.alloc(dtype, shape))
    }
    fn alloc_output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.timed("alloc_output", || self.inner.alloc_output(dtype, shape))
    }
    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.timed("alloc_zeroed", || self.inner.alloc_zeroed(dtype, shape))
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        self.timed("upload", || self.inner.upload(host))
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        self.timed("download", || self.inner.download(t))
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        self.timed("write", || self.inner.write(dst, src))
    }
    fn synchronize(&self) -> Result<()> {
        self.timed("synchronize", || self.inner.synchronize())
    }
    fn native_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<Dispatch<'_>>,
    ) -> Result<Option<DispatchOutput>> {
        self.inner.native_dispatch(comm, op)
    }
    fn native_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<Combine<'_>>,
    ) -> Result<Option<()>> {
        self.inner.native_combine(comm, op)
    }
    fn native_low_latency_dispatch(
        &self,
        comm: &dyn Communicator,
        op: &Checked<LowLatencyDispatch<'_>>,
    ) -> Result<Option<LowLatencyDispatchOutput>> {
        self.inner.native_low_latency_dispatch(comm, op)
    }
    fn native_low_latency_combine(
        &self,
        comm: &dyn Communicator,
        op: &mut Checked<LowLatencyCombine<'_>>,
    ) -> Result<Option<()>> {
        self.inner.native_low_latency_combine(comm, op)
    }

    deepport_core::for_each_local_op!(timed_local_ops);
}
