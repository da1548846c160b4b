//! CPU backends of deepport.
//!
//! * `cpu-ref` ([`CpuRef`]): every op of `SPEC.md` with f64 accumulation.
//!   It is the oracle that every other backend is judged against on shapes
//!   too large for stored golden data. Its arithmetic is that of the plain
//!   scalar loops in [`scalar`] (the specification); its expensive kernels
//!   run them tiled, vectorized across independent outputs and in parallel
//!   without changing a bit (`tests/oracle_bitexact.rs`).
//! * `cpu` ([`Cpu`]): the fast path ([`fast`]): FP8 and plain GEMMs on a
//!   SIMD micro-kernel chosen at run time (AVX-512, AVX2+FMA or portable),
//!   an MLA decode that reads the latent cache once for all heads, rayon
//!   threads. Ops it does not speed up run the reference kernels. Its
//!   device info names the kernels chosen.
//!
//! Device memory is host memory ([`HostStorage`]); both backends share it.

// `unsafe` is allowed only in `fast::simd`, `fast::amx` and `peak`
// (intrinsics, AMX `asm!`), `reduce` and `tiles` (calls of loops compiled
// for a detected instruction set) and the wrappers `fast::simd`'s
// `isa_dispatch!` generates for the same purpose (in `fast::prefill` and
// `fast::small`), each block with a `// SAFETY:` line.
#![deny(unsafe_code)]

mod copy;
mod dense;
mod ep;
pub mod fast;
mod grouped;
mod mla;
#[allow(unsafe_code)]
pub mod peak;
#[allow(unsafe_code)]
mod reduce;
#[doc(hidden)]
pub mod scalar;
mod sparse;
mod storage;
mod tiles;
pub mod util;

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Recycler, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use std::sync::OnceLock;
pub(crate) use storage::DerivedKey;
pub use storage::HostStorage;

/// Freed tensor buffers kept for the next `alloc` of a similar size: a
/// forward pass allocates ~90 intermediate tensors per prefill, and fresh
/// ones cost a page fault per 4 KB (a fifth of the tiny model's prefill,
/// `deepport forward --op-times`). A reused buffer is zeroed like a new
/// one. Bounded: at most [`pool::MAX_BUFS`] buffers of at most
/// [`pool::MAX_BUF`] bytes, [`pool::MAX_BYTES`] in all (the oldest leave
/// first); an allocation that fails empties the pool and tries again.
mod pool {
    use std::sync::Mutex;

    pub(crate) const MAX_BYTES: usize = 256 << 20;
    pub(crate) const MAX_BUF: usize = 64 << 20;
    pub(crate) const MAX_BUFS: usize = 256;

    struct Pool {
        bufs: Vec<Vec<u8>>,
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        bufs: Vec::new(),
        bytes: 0,
    });

    fn lock() -> std::sync::MutexGuard<'static, Pool> {
        POOL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty vector with room for `n` bytes (at most twice that, plus
    /// a page), if the pool holds one; with `keep`, it still holds up to
    /// `n` of its old bytes (for a tensor whose contents are unspecified).
    pub(crate) fn take(n: usize, keep: bool) -> Option<Vec<u8>> {
        if n == 0 {
            return None;
        }
        let mut p = lock();
        let fits = |c: usize| c >= n && c <= 2 * n + 4096;
        let best = (p.bufs.iter().enumerate())
            .filter(|(_, b)| fits(b.capacity()))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        let mut v = p.bufs.swap_remove(best);
        p.bytes -= v.capacity();
        if keep {
            v.truncate(n);
        } else {
            v.clear();
        }
        Some(v)
    }

    /// Keeps `v` for a later [`take`] if it fits the bounds.
    pub(crate) fn give(v: Vec<u8>) {
        let c = v.capacity();
        if c == 0 || c > MAX_BUF {
            return;
        }
        let mut p = lock();
        // The oldest make room (the pool follows the current working set).
        while !p.bufs.is_empty() && (p.bufs.len() >= MAX_BUFS || p.bytes + c > MAX_BYTES) {
            let old = p.bufs.remove(0);
            p.bytes -= old.capacity();
        }
        p.bytes += c;
        p.bufs.push(v);
    }

    /// Frees every pooled buffer.
    pub(crate) fn clear() {
        let mut p = lock();
        p.bufs.clear();
        p.bytes = 0;
    }

    /// (buffers, bytes) held, for tests.
    #[cfg(test)]
    pub(crate) fn held() -> (usize, usize) {
        let p = lock();
        (p.bufs.len(), p.bytes)
    }
}

/// The storage of a CPU tensor. Ops do not check the instance here: core
/// checks every tensor of an op against the backend before launch, and the
/// memory methods check it themselves ([`Tensor::storage_for`]).
fn storage(t: &Tensor) -> Result<&HostStorage> {
    t.storage_any::<HostStorage>()
        .ok_or_else(|| Error::ForeignTensor {
            owner: t.owner().to_string(),
            backend: "cpu".into(),
        })
}

/// The bytes of a CPU tensor (or view), read in place.
pub(crate) fn bytes_of(t: &Tensor) -> Result<&[u8]> {
    let s = storage(t)?;
    let (a, n) = (t.offset_bytes(), t.nbytes());
    s.bytes().get(a..a + n).ok_or_else(|| {
        Error::Other(format!(
            "internal: view {t:?} lies outside its storage of {} bytes",
            s.bytes().len()
        ))
    })
}

/// Copies a CPU tensor (or view) out as a host tensor.
pub(crate) fn to_host(t: &Tensor) -> Result<HostTensor> {
    HostTensor::from_bytes(t.dtype(), t.shape(), bytes_of(t)?.to_vec())
}

/// Overwrites a CPU tensor with host data of the same dtype and size.
pub(crate) fn store(t: &mut Tensor, h: &HostTensor) -> Result<()> {
    if h.dtype() != t.dtype() || h.numel() != t.numel() {
        return Err(Error::Other(format!(
            "cannot write a {} {:?} host tensor into a {} {:?} tensor",
            h.dtype(),
            h.shape(),
            t.dtype(),
            t.shape()
        )));
    }
    bytes_mut_of(t)?.copy_from_slice(h.bytes());
    Ok(())
}

/// The bytes of a CPU tensor, for writing in place.
pub(crate) fn bytes_mut_of(t: &mut Tensor) -> Result<&mut [u8]> {
    let instance = t.instance();
    Ok(t.storage_mut_for::<HostStorage>(instance, "cpu")?
        .bytes_mut())
}

fn device_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// A host tensor of `backend`: zeros, or with `keep` of unspecified
/// contents (a pooled buffer's old bytes, zeros past them).
fn alloc_host(
    backend: &'static str,
    id: InstanceId,
    dtype: DType,
    shape: &[usize],
    keep: bool,
) -> Result<Tensor> {
    let n = deepport_core::tensor::numel(shape)
        .checked_mul(dtype.size())
        .ok_or_else(|| Error::Device {
            backend: backend.into(),
            msg: format!("tensor {shape:?} is too large"),
        })?;
    let mut bytes = match pool::take(n, keep) {
        Some(v) => v,
        None => {
            let mut v = Vec::new();
            if v.try_reserve_exact(n).is_err() {
                pool::clear();
            }
            v.try_reserve_exact(n).map_err(|e| Error::Device {
                backend: backend.into(),
                msg: format!("out of memory allocating {n} bytes: {e}"),
            })?;
            v
        }
    };
    bytes.resize(n, 0);
    Ok(Tensor::new(
        dtype,
        shape,
        Box::new(HostStorage::new(backend, bytes, None)),
        id,
    ))
}

macro_rules! memory_ops {
    ($name:expr) => {
        fn instance(&self) -> InstanceId {
            Self::id()
        }
        fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
            crate::alloc_host($name, Self::id(), dtype, shape, false)
        }
        /// Like `alloc`, but a buffer from the pool keeps its old bytes
        /// (the contents are unspecified: no clearing).
        fn alloc_output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
            crate::alloc_host($name, Self::id(), dtype, shape, true)
        }
        /// `alloc` clears already.
        fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
            self.alloc(dtype, shape)
        }
        fn upload(&self, host: &HostTensor) -> Result<Tensor> {
            Ok(Tensor::new(
                host.dtype(),
                host.shape(),
                Box::new(HostStorage::new($name, host.bytes().to_vec(), None)),
                Self::id(),
            ))
        }
        /// Takes the buffer as the tensor's storage: no copy.
        fn adopt(
            &self,
            dtype: DType,
            shape: &[usize],
            bytes: Vec<u8>,
            recycle: Option<Recycler>,
        ) -> Result<Tensor> {
            // Checks the length against the shape.
            let bytes = HostTensor::from_bytes(dtype, shape, bytes)?.into_bytes();
            Ok(Tensor::new(
                dtype,
                shape,
                Box::new(HostStorage::new($name, bytes, recycle)),
                Self::id(),
            ))
        }
        fn download(&self, t: &Tensor) -> Result<HostTensor> {
            t.storage_for::<HostStorage>(Self::id(), $name)?;
            to_host(t)
        }
        fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
            if src.shape() != dst.shape() {
                return Err(Error::Other(format!(
                    "write: host tensor shape {:?} differs from device tensor shape {:?}",
                    src.shape(),
                    dst.shape()
                )));
            }
            dst.storage_for::<HostStorage>(Self::id(), $name)?;
            store(dst, src)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
    };
}

/// The reference kernel of every local op, by its method name: a new op's
/// kernel is a `pub(crate) fn <method>(op: &mut Checked<Op<'_>>)` in one of
/// these modules.
mod kernels {
    pub(crate) use crate::copy::{copy_window, gather_rows, reduce_rows};
    pub(crate) use crate::dense::*;
    pub(crate) use crate::ep::get_dispatch_layout;
    pub(crate) use crate::grouped::{gemm_grouped_contiguous, gemm_grouped_masked};
    pub(crate) use crate::mla::*;
    pub(crate) use crate::sparse::*;
}

/// Every local op, forwarded to its reference kernel.
macro_rules! reference_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            kernels::$method(op)
        }
    )*};
}

macro_rules! reference_ops {
    () => {
        deepport_core::for_each_local_op!(reference_local_ops);
    };
}

/// The reference backend (`cpu-ref`): the oracle.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuRef;

impl CpuRef {
    pub const NAME: &'static str = "cpu-ref";
    pub fn new() -> Self {
        CpuRef
    }
    /// Host memory is one device: every `CpuRef` value is the same
    /// instance and shares its tensors.
    fn id() -> InstanceId {
        static ID: OnceLock<InstanceId> = OnceLock::new();
        *ID.get_or_init(InstanceId::fresh)
    }
}

impl Backend for CpuRef {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: Self::NAME.into(),
            device: device_name(),
            driver: format!(
                "deepport-cpu {} (the scalar loops' arithmetic, f64 accumulation; tiled and parallel)",
                env!("CARGO_PKG_VERSION")
            ),
            vendor: "cpu".into(),
        }
    }
    fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
        // The reference implements every op for every dtype combination
        // that core's validation accepts.
        Support::Supported
    }
    memory_ops!("cpu-ref");
    reference_ops!();
}

/// Every local op, forwarded to [`fast::ops`] (a fast kernel, or the
/// reference one where the fast path has none).
macro_rules! fast_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            let r = fast::ops::$method(op);
            fast::linger();
            r
        }
    )*};
}

/// The fast CPU backend (`cpu`): see [`fast`]. The instruction set is
/// chosen once per process ([`fast::process_simd`], overridable with
/// `DEEPPORT_CPU_SIMD`) or per thread ([`fast::with_simd`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

impl Cpu {
    pub const NAME: &'static str = "cpu";
    pub fn new() -> Self {
        Cpu
    }
    /// One instance, like [`CpuRef`], but not the same one: a `cpu-ref`
    /// tensor is not a `cpu` tensor.
    fn id() -> InstanceId {
        static ID: OnceLock<InstanceId> = OnceLock::new();
        *ID.get_or_init(InstanceId::fresh)
    }
}

impl Backend for Cpu {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: Self::NAME.into(),
            device: device_name(),
            driver: format!(
                "deepport-cpu {} ({}; other ops: reference loops)",
                env!("CARGO_PKG_VERSION"),
                fast::describe()
            ),
            vendor: "cpu".into(),
        }
    }
    fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
        Support::Supported
    }
    memory_ops!("cpu");
    deepport_core::for_each_local_op!(fast_local_ops);
}

/// The host is the one device of the CPU backends.
fn host_device(name: &'static str, device: Option<usize>) -> Result<()> {
    match device {
        None | Some(0) => Ok(()),
        Some(d) => Err(deepport_core::registry::no_such_device(name, d, 1)),
    }
}

/// Makes the calling thread one of the worker threads that `cpu` and
/// `cpu-ref` run their ops on (rayon's global pool, otherwise as by
/// default: one worker per CPU, this thread counted). An op called from
/// this thread then runs its parallel parts here, with the other workers,
/// instead of handing them to the pool and sleeping until they finish — a
/// round trip through the scheduler per op (tens of microseconds on a VM;
/// a tenth of the tiny model's forward pass). For a program's main thread,
/// before any op runs: the thread must outlive every op. Returns `false`
/// and changes nothing when the pool already exists, or when it would
/// have no other worker (one CPU, e.g. an MPI rank bound to a core, or
/// `RAYON_NUM_THREADS=1`): ops called from other threads while this one
/// waits for them (the in-process expert-parallel ranks) would have no
/// worker left to run on.
pub fn join_worker_pool() -> bool {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads < 2 {
        return false;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Registers `cpu` and `cpu-ref` (device 0: the host).
pub fn register(reg: &mut deepport_core::registry::Registry) {
    use deepport_core::registry::single_device;
    reg.register(
        "cpu",
        "CPU fast path: run-time chosen SIMD (AVX-512 / AVX2+FMA / portable) FP8 GEMMs and MLA decode, multithreaded",
        |d| {
            host_device(Cpu::NAME, d)?;
            Ok(Box::new(Cpu))
        },
        || single_device(|_| Ok(Box::new(Cpu))),
    );
    reg.register(
        "cpu-ref",
        "CPU reference: plain loops, f64 accumulation (the oracle)",
        |d| {
            host_device(CpuRef::NAME, d)?;
            Ok(Box::new(CpuRef))
        },
        || single_device(|_| Ok(Box::new(CpuRef))),
    );
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    /// A buffer back from the pool is zeroed like a fresh one, and the
    /// pool reuses what was freed (the same allocation comes back; tried a
    /// few times, as tests on other threads allocate too).
    #[test]
    fn pooled_allocations_come_back_zeroed() {
        let be = Cpu;
        let shape = [3usize, 40_013];
        let mut reused = 0;
        for _ in 0..8 {
            let mut t = be.alloc(DType::U8, &shape).unwrap();
            let before = bytes_of(&t).unwrap().as_ptr();
            bytes_mut_of(&mut t).unwrap().fill(0xa5);
            drop(t);
            let t = be.alloc(DType::U8, &shape).unwrap();
            let b = bytes_of(&t).unwrap();
            assert!(b.iter().all(|&v| v == 0), "a pooled buffer kept old bytes");
            reused += usize::from(b.as_ptr() == before);
        }
        assert!(reused > 0, "no freed buffer was reused");
    }

    /// `alloc_output` skips the clearing (a pooled buffer may come back
    /// with old bytes) but has the right size; `alloc` still clears.
    #[test]
    fn alloc_output_is_sized_and_alloc_still_clears() {
        let be = Cpu;
        let shape = [5usize, 30_011];
        for _ in 0..4 {
            let mut t = be.alloc_output(DType::U8, &shape).unwrap();
            assert_eq!(bytes_of(&t).unwrap().len(), 5 * 30_011);
            bytes_mut_of(&mut t).unwrap().fill(0x5a);
            drop(t);
            let t = be.alloc(DType::U8, &shape).unwrap();
            assert!(bytes_of(&t).unwrap().iter().all(|&v| v == 0));
        }
    }

    /// The pool stays within its bounds however much is freed into it.
    #[test]
    fn the_pool_is_bounded() {
        for i in 0..2 * pool::MAX_BUFS {
            pool::give(vec![0u8; 1000 + i]);
        }
        pool::give(vec![0u8; pool::MAX_BUF + 1]);
        let (n, bytes) = pool::held();
        assert!(
            n <= pool::MAX_BUFS && bytes <= pool::MAX_BYTES,
            "{n} buffers, {bytes} bytes"
        );
    }
}
