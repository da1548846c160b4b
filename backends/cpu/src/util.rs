//! Small helpers shared by the reference ops.

use deepport_core::backend::Tensor;
use deepport_core::{HostTensor, Result};

/// Decodes a CPU tensor to f32 values.
pub fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(crate::to_host(t)?.to_f32_vec())
}

/// Decodes a CPU tensor to i64 values.
pub fn i64s(t: &Tensor) -> Result<Vec<i64>> {
    Ok(crate::to_host(t)?.to_i64_vec())
}

/// Encodes f32 values into `t` (rounding once to `t`'s dtype).
pub fn put_f32(t: &mut Tensor, values: &[f32]) -> Result<()> {
    let h = HostTensor::from_f32(t.dtype(), t.shape(), values);
    crate::store(t, &h)
}

/// Writes index values into an i32/i64/bool tensor.
pub fn put_i64(t: &mut Tensor, values: &[i64]) -> Result<()> {
    let h = match t.dtype() {
        deepport_core::DType::Bool => HostTensor::from_bool(
            t.shape(),
            &values.iter().map(|&v| v != 0).collect::<Vec<_>>(),
        ),
        d => HostTensor::from_index(d, t.shape(), values),
    };
    crate::store(t, &h)
}

/// Writes raw host data (same dtype) into `t`.
pub fn put_host(t: &mut Tensor, h: &HostTensor) -> Result<()> {
    crate::store(t, h)
}

/// Host copy of a CPU tensor.
pub fn host(t: &Tensor) -> Result<HostTensor> {
    crate::to_host(t)
}

/// How many threads `cpu-ref` spreads independent outputs over: the
/// available parallelism, or `DEEPPORT_CPU_THREADS` when set (≥ 1).
pub(crate) fn threads() -> usize {
    std::env::var("DEEPPORT_CPU_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Runs `f(i)` for `i in 0..n` on up to [`threads`] threads, each taking
/// the next unclaimed index (so uneven items balance), and returns the
/// results in index order. Each item is computed by the same code whatever
/// thread runs it.
pub(crate) fn par_map<R: Send, F: Fn(usize) -> R + Sync>(n: usize, f: F) -> Vec<R> {
    let threads = threads().min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (f, next) = (&f, &next);
    let mut parts: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            break done;
                        }
                        done.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    parts.sort_unstable_by_key(|&(i, _)| i);
    parts.into_iter().map(|(_, r)| r).collect()
}
