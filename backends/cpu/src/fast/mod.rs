//! The fast CPU path (`cpu`): packed-panel GEMMs on a run-time chosen SIMD
//! micro-kernel, an MLA decode that computes every head of a kv head from
//! one pass over the latent cache, elementwise/row ops straight on the
//! tensors' bytes (bit-identical to `cpu-ref`), and rayon threads.
//!
//! [`ops`] holds one function per local op, named after the `Backend`
//! method: the fast kernels written here, and the reference kernel for
//! every op this module does not speed up.

pub mod amx;
pub mod simd;

mod gemm;
mod mla;
mod prefill;
mod small;
mod sparse;

use crate::HostStorage;
use deepport_core::backend::Tensor;
use deepport_core::{DType, Error, HostTensor, Result};
pub use simd::Simd;
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that forces an instruction set for the whole
/// process (`amx`, `avx512bf16`, `avx512`, `avx2`, `portable`); unset, the
/// best one is used (AMX-BF16 for the bf16-exact GEMMs where present).
pub const SIMD_ENV: &str = "DEEPPORT_CPU_SIMD";

thread_local! {
    /// The (SIMD set, AMX on) of this thread, set by [`with_simd`] /
    /// [`with_amx_kernels`].
    static OVERRIDE: Cell<Option<(Simd, bool)>> = const { Cell::new(None) };
}

/// The process-wide choice: (SIMD set, whether AMX kernels are used).
fn process_choice() -> (Simd, bool) {
    static CHOSEN: OnceLock<(Simd, bool)> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let forced = std::env::var(SIMD_ENV).ok();
        match forced.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
            None => (Simd::detect(), amx::available()),
            Some(v) if v == "amx" || v == "amx-bf16" || v == "amx_bf16" => {
                if let Some(why) = amx::unavailable_reason() {
                    eprintln!(
                        "deepport cpu: {SIMD_ENV}=amx but AMX is not usable ({why}); using {}",
                        Simd::detect().name()
                    );
                }
                (Simd::detect(), amx::available())
            }
            Some(v) => match Simd::parse(&v) {
                Some(s) if s.available() => (s, false),
                Some(s) => {
                    eprintln!(
                        "deepport cpu: {SIMD_ENV}={v}: this CPU cannot run the {} kernels; using {}",
                        s.name(),
                        Simd::detect().name()
                    );
                    (Simd::detect(), false)
                }
                None => {
                    eprintln!(
                        "deepport cpu: {SIMD_ENV}={v} is not one of amx, avx512bf16, avx512, avx2, portable; using the best set"
                    );
                    (Simd::detect(), amx::available())
                }
            },
        }
    })
}

/// The instruction set of this process: [`SIMD_ENV`] when it names one
/// this CPU runs, else the best one detected. Chosen once.
pub fn process_simd() -> Simd {
    process_choice().0
}

/// Whether this process uses the AMX-BF16 kernels ([`amx`]): AMX usable
/// here, and [`SIMD_ENV`] unset or `amx`.
pub fn process_amx() -> bool {
    process_choice().1
}

/// The instruction set an op launched from this thread uses: the one set
/// by [`with_simd`] if any, else [`process_simd`].
pub fn current_simd() -> Simd {
    OVERRIDE
        .with(|o| o.get())
        .map_or_else(process_simd, |c| c.0)
}

/// Whether ops launched from this thread use the AMX kernels.
pub fn current_amx() -> bool {
    OVERRIDE.with(|o| o.get()).map_or_else(process_amx, |c| c.1)
}

fn with_choice<R>(choice: (Simd, bool), f: impl FnOnce() -> R) -> R {
    struct Restore(Option<(Simd, bool)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(choice))));
    f()
}

/// Runs `f` with ops launched from this thread using `simd` and no AMX
/// (tests use it to exercise every path on every machine). Fails if this
/// CPU cannot run `simd`.
pub fn with_simd<R>(simd: Simd, f: impl FnOnce() -> R) -> Result<R> {
    if !simd.available() {
        return Err(Error::Other(format!(
            "this CPU cannot run the {} kernels",
            simd.name()
        )));
    }
    Ok(with_choice((simd, false), f))
}

/// Runs `f` with ops launched from this thread using the AMX-BF16 kernels
/// (and the best SIMD set for the rest). Fails, saying why, where AMX is
/// not usable.
pub fn with_amx_kernels<R>(f: impl FnOnce() -> R) -> Result<R> {
    if let Some(why) = amx::unavailable_reason() {
        return Err(Error::Other(format!("AMX kernels unavailable: {why}")));
    }
    Ok(with_choice((Simd::detect(), true), f))
}

/// What the fast backend runs, for `DeviceInfo.driver`.
pub fn describe() -> String {
    let s = process_simd();
    let (name, mr, nr) = (s.name(), s.mr(), s.nr());
    let fp8 = if process_amx() {
        format!(
            "fp8 gemm (dense/contiguous/masked) and bf16 gemm/gemm_grouped: amx-bf16 32x32 tdpbf16ps micro-kernel \
             (e4m3 exact in bf16, f32 sums per 128-K block promoted in f32), >128 rows: B packed once in VNNI panels, \
             <=128 rows: D^T = B.A^T with B decoded per K block; e4m3 -> bf16: {dec}; operands on cache lines; \
             f32 gemm: {name} {mr}x{nr} f32 FMA",
            dec = s.e4m3fn_bf16_decoder()
        )
    } else if s.bf16_dot() {
        format!(
            "fp8 gemm: {name} {mr}x{nr} vdpbf16ps micro-kernel (e4m3 exact in bf16, f32 sums per 128-K block), \
             <=16 rows: {mr}x16 f32 FMA on B rows; gemm: {mr}x{nr} f32 FMA"
        )
    } else {
        format!(
            "fp8 gemm / gemm: {name} {mr}x{nr} f32 micro-kernel on packed panels (f32 sums per 128-K block), \
             <=16 rows: {mr}x16 on B rows"
        )
    };
    let fp8 = match amx::unavailable_reason() {
        Some(why) => format!("{fp8} (no amx: {why})"),
        None if !process_amx() => format!("{fp8} (amx off: {SIMD_ENV})"),
        None => fp8,
    };
    let decode = if process_amx() {
        "amx-bf16 (bf16 q/cache: exact scores, P as bf16 hi+lo) else f32".to_string()
    } else {
        format!("{name} f32")
    };
    format!(
        "{fp8}; gemm_grouped (contiguous/masked): {mr}x{nr} f32 FMA per group; mla prefill: {mr}x{nr} f32 FMA tiles (absorbed), f64 softmax, (head, token tile) in parallel; mla decode: {decode}, all heads of a kv head per cache pass, split-K; \
         sparse_mla decode/prefill: {name} f32, selected keys dequantized once per 64-token chunk for all heads, online softmax, split over slots; \
         indexer_logits: {name} f32 dots (exact e4m3 products), f64 head sums; indexer_topk: partial selection in cpu-ref's order; \
         add/rms_norm/embedding/act_quant/rope/copy_window/cache_quant: parallel, bit-identical to cpu-ref; silu_mul: f64 with a vectorized exp, within 1 ulp of cpu-ref; {t} threads",
        t = rayon::current_num_threads()
    )
}

// ---- tensor bytes --------------------------------------------------------------

/// The bytes of a CPU tensor (or view), honoring its offset.
fn bytes_of(t: &Tensor) -> Result<&[u8]> {
    let s = crate::storage(t)?;
    let (a, n) = (t.offset_bytes(), t.nbytes());
    s.bytes().get(a..a + n).ok_or_else(|| {
        Error::Other(format!(
            "internal: view {t:?} lies outside its storage of {} bytes",
            s.bytes().len()
        ))
    })
}

/// The bytes of an output tensor, to overwrite in place.
fn bytes_mut_of(t: &mut Tensor) -> Result<&mut [u8]> {
    let instance = t.instance();
    let n = t.nbytes();
    let s = t.storage_mut_for::<HostStorage>(instance, "cpu")?;
    s.bytes_mut()
        .get_mut(..n)
        .ok_or_else(|| Error::Other("internal: output storage too small".into()))
}

/// Decodes float values of `dtype` from little-endian `bytes` into `out`
/// (`out.len()` values).
pub(crate) fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        other => {
            let n = out.len();
            let sz = other.size();
            let h = HostTensor::from_bytes(other, &[n], bytes[..n * sz].to_vec())
                .map(|h| h.to_f32_vec())
                .unwrap_or_else(|_| vec![f32::NAN; n]);
            out.copy_from_slice(&h);
        }
    }
}

/// Encodes f32 values into `dtype` bytes (`dst.len() = values.len() ·
/// size`), rounding once to nearest even.
fn encode_into(dtype: DType, values: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (c, v) in dst.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        other => {
            let h = HostTensor::from_f32(other, &[values.len()], values);
            dst.copy_from_slice(h.bytes());
        }
    }
}

/// A tensor's values as f32 (honoring views): an f32 tensor's own bytes,
/// read in place (no copy of a weight per call), else decoded into a new
/// vector. In place needs a little-endian machine and 4-byte alignment
/// (host allocations and f32 views have it); otherwise it decodes.
fn f32_values(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    let bytes = bytes_of(t)?;
    if t.dtype() == DType::F32 && cfg!(target_endian = "little") {
        if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
            return Ok(Cow::Borrowed(v));
        }
    }
    let mut v = vec![0f32; t.numel()];
    decode_into(t.dtype(), bytes, &mut v);
    Ok(Cow::Owned(v))
}

/// The f32 value of each of the 256 codes of an 8-bit float dtype.
fn fp8_lut(dtype: DType) -> Result<[f32; 256]> {
    let codes: Vec<u8> = (0..=255u8).collect();
    let h = HostTensor::from_bytes(dtype, &[256], codes)?;
    let v = h.to_f32_vec();
    let mut lut = [0f32; 256];
    lut.copy_from_slice(&v);
    Ok(lut)
}

/// Bytes of a cache line: where AMX operands and stores start.
const LINE: usize = 64;

/// A value placed on a cache-line boundary (an AMX output block on the
/// stack).
#[repr(C, align(64))]
pub(crate) struct Aligned<T>(pub T);

/// The offset (in values) of the first cache-line boundary in `buf`, or 0
/// where there is none within a line.
fn line_offset<T>(buf: &[T]) -> usize {
    let off = buf.as_ptr().align_offset(LINE);
    if off.saturating_mul(std::mem::size_of::<T>()) < LINE {
        off
    } else {
        0
    }
}

/// `len` values of `buf` from a cache-line boundary, growing `buf` as
/// needed (new values are `T::default()`; old ones are left as they are,
/// for the caller to overwrite). AMX tile rows and vector stores that
/// straddle two lines cost up to three times as much: a heap `Vec` is
/// only 16-byte aligned (benches/README.md, "alignment").
fn lines_mut<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let pad = LINE / std::mem::size_of::<T>().max(1);
    if buf.len() < len + pad {
        buf.resize(len + pad, T::default());
    }
    let off = line_offset(buf);
    &mut buf[off..off + len]
}

/// The `len` values [`lines_mut`] returned for the same, unchanged `buf`.
fn lines<T>(buf: &[T], len: usize) -> &[T] {
    &buf[line_offset(buf)..][..len]
}

/// A zeroed buffer of `len` values starting on a cache line.
fn zeroed_lines<T: Copy + Default>(len: usize) -> Lines<T> {
    let mut buf = Vec::new();
    lines_mut(&mut buf, len);
    Lines {
        off: line_offset(&buf),
        buf,
        len,
    }
}

/// An owned buffer whose values start on a cache line ([`zeroed_lines`]).
struct Lines<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T> std::ops::Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// One function per local op, named after its `Backend` method: the fast
/// kernels, and (through the glob import, which local items shadow) the
/// reference kernel of every other op.
pub(crate) mod ops {
    pub(crate) use super::gemm::{
        fp8_gemm, fp8_grouped_contiguous, fp8_grouped_masked, gemm, gemm_grouped_contiguous,
        gemm_grouped_masked,
    };
    pub(crate) use super::mla::mla_decode;
    pub(crate) use super::prefill::mla_prefill;
    pub(crate) use super::small::{
        act_quant, add, copy_window, embedding, rms_norm, rope, silu_mul,
    };
    pub(crate) use super::sparse::{
        cache_quant, indexer_logits, indexer_topk, sparse_mla_decode, sparse_mla_prefill,
    };
    pub(crate) use crate::kernels::*;
}

/// The environment variable that sets how long, in microseconds, an idle
/// worker keeps looking for work after an op ([`linger`]; default
/// [`LINGER_US`], `0` turns it off: e.g. for several processes sharing
/// few cores).
pub const LINGER_ENV: &str = "DEEPPORT_CPU_LINGER_US";

/// [`linger`]'s default, in microseconds.
pub const LINGER_US: u64 = 300;

/// How long an idle worker lingers: [`LINGER_ENV`] if it holds a number,
/// else [`LINGER_US`] (read once).
fn linger_time() -> std::time::Duration {
    static T: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let us = std::env::var(LINGER_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(LINGER_US);
        std::time::Duration::from_micros(us)
    })
}

/// Keeps one idle worker awake for [`LINGER_US`] µs (or
/// [`LINGER_ENV`]'s) after an op, taking any
/// parallel work that appears meanwhile (`rayon::yield_now`), the way an
/// OpenMP runtime spins before it blocks. A model's ops follow each other
/// microseconds apart; without this, each one's parallel part woke a
/// sleeping worker through the scheduler (tens of microseconds on a VM,
/// about a sixth of the tiny model's forward pass). One such worker at a
/// time; never the thread that calls the ops ([`crate::join_worker_pool`]:
/// it would stall there), and not with a single worker.
pub(crate) fn linger() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SPINNING: AtomicBool = AtomicBool::new(false);
    let linger = linger_time();
    if linger.is_zero() || rayon::current_num_threads() < 2 || SPINNING.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let caller = rayon::current_thread_index();
    rayon::spawn(move || {
        if caller.is_none() || rayon::current_thread_index() != caller {
            let mut since = std::time::Instant::now();
            while since.elapsed() < linger {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => since = std::time::Instant::now(),
                    _ => std::hint::spin_loop(),
                }
            }
        }
        SPINNING.store(false, Ordering::Release);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_line<T>(s: &[T]) -> bool {
        (s.as_ptr() as usize).is_multiple_of(LINE)
    }

    /// Every buffer the helpers hand out starts on a cache line, has the
    /// length asked for, and `lines` finds the same values `lines_mut`
    /// wrote, across regrowth of the vector.
    #[test]
    fn line_buffers_start_on_a_cache_line() {
        let mut buf: Vec<u16> = Vec::new();
        for len in [1usize, 31, 32, 33, 4096, 100_000, 7] {
            let s = lines_mut(&mut buf, len);
            assert_eq!(s.len(), len);
            assert!(on_line(s), "u16 × {len} not on a line");
            for (i, v) in s.iter_mut().enumerate() {
                *v = i as u16;
            }
            let r = lines(&buf, len);
            assert!(r.iter().enumerate().all(|(i, &v)| v == i as u16));
        }
        for len in [1usize, 17, 5000] {
            let z = zeroed_lines::<u32>(len);
            assert_eq!(z.len(), len);
            assert!(on_line(&z) && z.iter().all(|&v| v == 0));
            let f = zeroed_lines::<f32>(len);
            assert!(on_line(&f));
        }
        let a = Aligned([0u8; 3]);
        assert!(on_line(&a.0));
    }
}
