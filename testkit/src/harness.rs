//! Making backends for the suite, moving tensors, running an op on the
//! backend under test and on `cpu-ref`, and recording skipped cases.

use deepport_core::backend::{alloc_poisoned, Backend, Support, Tensor};
use deepport_core::ops::{self, LocalOp};
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use std::sync::{Arc, Mutex, OnceLock};

/// Makes the backend of one rank (`0` for single-device checks). Each call
/// returns a fresh instance, so an error one check leaves behind never
/// reaches another.
pub type Factory = Arc<dyn Fn(usize) -> Result<Box<dyn Backend>> + Send + Sync>;

/// How many ranks' shared instances a harness keeps.
const SHARED_RANKS: usize = 4;

/// The backend under test: its registered name and a [`Factory`].
///
/// Checks that provoke errors take fresh instances ([`Harness::backend`],
/// [`Harness::ranks`]): under the asynchronous contract an error surfaces
/// at the next synchronize of *any* tensor of the instance, so it must not
/// reach another check. Checks that provoke none share one instance per
/// rank ([`Harness::shared`], [`Harness::shared_ranks`]), so that a backend
/// builds its kernels once.
pub struct Harness {
    name: String,
    factory: Factory,
    shared: [OnceLock<Option<Arc<dyn Backend>>>; SHARED_RANKS],
}

impl Harness {
    /// A harness for the backend `name` (the name `DEEPPORT_REQUIRE` lists)
    /// made by `factory`.
    pub fn new(
        name: &str,
        factory: impl Fn(usize) -> Result<Box<dyn Backend>> + Send + Sync + 'static,
    ) -> Self {
        Harness {
            name: name.to_string(),
            factory: Arc::new(factory),
            shared: Default::default(),
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `DEEPPORT_REQUIRE` (comma separated) names this backend:
    /// then an unavailable backend fails the check instead of skipping it.
    pub fn required(&self) -> bool {
        required(&self.name)
    }

    /// The backend of rank `rank`, or `None` (after printing why) when it is
    /// unavailable on this machine and not required. Any other error fails.
    pub fn rank(&self, rank: usize) -> Option<Arc<dyn Backend>> {
        available(&self.name, (self.factory)(rank)).map(Arc::from)
    }

    /// A fresh backend for a single-device check ([`Harness::rank`] 0).
    pub fn backend(&self) -> Option<Arc<dyn Backend>> {
        self.rank(0)
    }

    /// `world` fresh backends, one per rank.
    pub fn ranks(&self, world: usize) -> Option<Vec<Arc<dyn Backend>>> {
        (0..world).map(|r| self.rank(r)).collect()
    }

    /// The instance of rank `rank` shared by the checks that provoke no
    /// errors (made on first use; fresh beyond rank 3).
    pub fn shared_rank(&self, rank: usize) -> Option<Arc<dyn Backend>> {
        match self.shared.get(rank) {
            Some(cell) => cell.get_or_init(|| self.rank(rank)).clone(),
            None => self.rank(rank),
        }
    }

    /// The shared instance of rank 0, for single-device checks that
    /// provoke no errors.
    pub fn shared(&self) -> Option<Arc<dyn Backend>> {
        self.shared_rank(0)
    }

    /// The shared instances of ranks `0..world`.
    pub fn shared_ranks(&self, world: usize) -> Option<Vec<Arc<dyn Backend>>> {
        (0..world).map(|r| self.shared_rank(r)).collect()
    }
}

/// Whether `DEEPPORT_REQUIRE` (comma separated) names `backend`.
pub fn required(backend: &str) -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == backend))
        .unwrap_or(false)
}

/// The outcome of making a backend `name`: the backend, or `None` (after
/// printing why) when it is unavailable on this machine (`Unavailable`) and
/// `DEEPPORT_REQUIRE` does not name it. Any other error, or unavailability
/// of a required backend, fails.
pub fn available<T>(name: &str, made: Result<T>) -> Option<T> {
    match made {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                !required(name),
                "DEEPPORT_REQUIRE names {name}, but it is unavailable: {e}"
            );
            assert!(
                matches!(e, Error::Unavailable { .. }),
                "making {name} must succeed or fail with Unavailable, got {e:?}"
            );
            eprintln!("skipping: {name} unavailable: {e}");
            None
        }
    }
}

// ---- skips ----------------------------------------------------------------------

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records and prints a case the backend does not support. Never silent:
/// every skip is printed (run with `--nocapture` to see them) and kept in
/// [`skipped`].
pub fn skip(backend: &str, what: &str, why: &dyn std::fmt::Display) {
    let line = format!("SKIPPED {backend}: {what}: {why}");
    eprintln!("testkit: {line}");
    SKIPPED.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

/// Every case skipped so far in this process.
pub fn skipped() -> Vec<String> {
    SKIPPED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ---- transfer -------------------------------------------------------------------

/// A host tensor of `dtype` holding `v` (rounded to `dtype`).
pub fn host(dtype: DType, shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(dtype, shape, v)
}

/// Uploads `h` to `b`.
pub fn up(b: &dyn Backend, h: &HostTensor) -> Tensor {
    b.upload(h).expect("upload")
}

/// An output tensor filled with NaN (floats) or `0xff` bytes (integers), so
/// that an element a kernel forgets to write is caught.
pub fn poisoned(b: &dyn Backend, dtype: DType, shape: &[usize]) -> Tensor {
    alloc_poisoned(b, dtype, shape).expect("alloc")
}

/// Downloads `t` from `b`.
pub fn down(b: &dyn Backend, t: &Tensor) -> HostTensor {
    b.download(t).expect("download")
}

/// Uploads `inputs` to `b`, runs `f` (which allocates poisoned outputs and
/// runs the op) and downloads the outputs after a synchronize.
pub fn on<F>(b: &dyn Backend, inputs: &[&HostTensor], f: &F) -> Result<Vec<HostTensor>>
where
    F: Fn(&dyn Backend, &[Tensor]) -> Result<Vec<Tensor>>,
{
    let ts: Vec<Tensor> = inputs.iter().map(|h| up(b, h)).collect();
    let outs = f(b, &ts)?;
    b.synchronize()?;
    outs.iter().map(|t| b.download(t)).collect()
}

/// [`on`] the backend under test and on `cpu-ref`: `Some((got, want))`, or
/// `None` (recorded with [`skip`]) when `b` answers `NotSupported`. Any other
/// error fails.
pub fn both<F>(
    b: &dyn Backend,
    inputs: &[&HostTensor],
    f: F,
) -> Option<(Vec<HostTensor>, Vec<HostTensor>)>
where
    F: Fn(&dyn Backend, &[Tensor]) -> Result<Vec<Tensor>>,
{
    let got = match on(b, inputs, &f) {
        Ok(v) => v,
        Err(e @ Error::NotSupported { .. }) => {
            skip(b.name(), "op", &e);
            return None;
        }
        Err(e) => panic!("{}: {e}", b.name()),
    };
    let want = on(&CpuRef, inputs, &f).expect("cpu-ref");
    Some((got, want))
}

/// The error an op with bad index *values* (or non-finite inputs) must
/// report under the asynchronous contract (core/src/backend.rs): either at
/// the call or at the next `synchronize`, exactly once. `call` enqueues the
/// op. Returns the error; `None` (recorded with [`skip`]) when the backend
/// answers `NotSupported`. Panics when no error is reported at all.
pub fn deferred_error(
    b: &dyn Backend,
    what: &str,
    call: impl FnOnce() -> Result<()>,
) -> Option<Error> {
    reported_error(b, what, call(), None)
}

/// [`deferred_error`] for an op already called (`called` is what the call
/// returned): a deferred error must surface at the next `download` of
/// `settle` when given (any tensor of the instance), else at the next
/// `synchronize`; exactly once either way.
pub fn reported_error(
    b: &dyn Backend,
    what: &str,
    called: Result<()>,
    settle: Option<&Tensor>,
) -> Option<Error> {
    let e = match called {
        Err(e @ Error::NotSupported { .. }) => {
            skip(b.name(), what, &e);
            return None;
        }
        Err(e) => e,
        Ok(()) => {
            let later = match settle {
                Some(t) => b.download(t).err(),
                None => b.synchronize().err(),
            };
            later.unwrap_or_else(|| {
                panic!("{what}: no error reported, at the call or at the next download/synchronize")
            })
        }
    };
    b.synchronize()
        .unwrap_or_else(|e2| panic!("{what}: the error must be reported once, then {e2}"));
    Some(e)
}

/// Runs a local op as `deepport_core::ops::run` does, holding the backend
/// to its own [`Backend::supports`] answer: an op it says it does not
/// support returns `NotSupported` (and the case is skipped) without being
/// launched; an op it says it supports must not answer `NotSupported`.
pub fn run<A: LocalOp>(b: &dyn Backend, op: A) -> Result<()> {
    let kind = A::KIND;
    match b.supports(kind, &op.dtypes()) {
        Support::NotSupported(why) => Err(Error::not_supported(b.name(), kind.name(), why)),
        Support::Supported => {
            let dtypes = op.dtypes();
            let r = ops::run(b, op);
            if let Err(e @ Error::NotSupported { .. }) = &r {
                panic!(
                    "{}: supports({kind}, {dtypes:?}) says Supported, but the op answers {e}",
                    b.name()
                );
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::catch_unwind;

    fn unavailable() -> Result<()> {
        Err(Error::Unavailable {
            backend: "tk-test".into(),
            reason: "no device".into(),
        })
    }

    /// Unavailable skips, unless
    /// `DEEPPORT_REQUIRE` names the backend; any other error fails.
    #[test]
    fn unavailable_skips_unless_required() {
        assert!(available("tk-test", unavailable()).is_none());
        assert_eq!(available("tk-test", Ok(3)), Some(3));
        let device = || {
            available::<()>(
                "tk-test",
                Err(Error::Device {
                    backend: "tk-test".into(),
                    msg: "lost".into(),
                }),
            )
        };
        assert!(catch_unwind(device).is_err());
        // The only test of this binary that reads or sets the variable.
        std::env::set_var("DEEPPORT_REQUIRE", "other, tk-test");
        let required = catch_unwind(|| available("tk-test", unavailable()));
        std::env::remove_var("DEEPPORT_REQUIRE");
        assert!(required.is_err());
    }
}
