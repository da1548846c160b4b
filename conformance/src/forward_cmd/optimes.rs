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

/// Calls and time per entry (an op's name, or `alloc`/`upload`/…).
#[derive(Default)]
pub struct OpTimes {
    by_name: Mutex<BTreeMap<&'static str, (u64, Duration)>>,
}

impl OpTimes {
    fn record(&self, name: &'static str, d: Duration) {
        if let Ok(mut m) = self.by_name.lock() {
            let e = m.entry(name).or_default();
            e.0 += 1;
            e.1 += d;
        }
    }

    /// Forgets what was recorded (e.g. the load's calls).
    pub fn clear(&self) {
        if let Ok(mut m) = self.by_name.lock() {
            m.clear();
        }
    }

    /// One line per entry, most time first, then the rest of `wall` (the
    /// time outside every backend call), for `runs` runs.
    pub fn report(&self, wall: Duration, runs: u32) -> String {
        let m = match self.by_name.lock() {
            Ok(m) => m.clone(),
            Err(_) => return "op times unavailable (poisoned lock)".into(),
        };
        let runs = runs.max(1);
        let mut rows: Vec<_> = m.into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1));
        let total: Duration = rows.iter().map(|r| r.1 .1).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(runs);
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64().max(1e-12);
        let mut s = format!(
            "forward: backend calls per prefill ({runs} run(s); {:.3} ms wall each):\n",
            ms(wall)
        );
        for (name, (n, d)) in &rows {
            s += &format!(
                "  {name:<26} {:>6} calls {:>9.3} ms {:>5.1}%\n",
                n / u64::from(runs),
                ms(*d),
                pct(*d)
            );
        }
        let rest = wall.saturating_sub(total);
        s += &format!(
            "  {:<26} {:>6}       {:>9.3} ms {:>5.1}%",
            "(outside backend calls)",
            "",
            ms(rest),
            pct(rest)
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
