//! Input generation for the case builders: deterministic (from the case's
//! seed, [`crate::rng::Rng`]) and cheap enough for real-size cases — large
//! tensors are converted to their dtype chunk by chunk, so a bf16 or FP8
//! tensor never needs a full f32 copy.

use crate::rng::Rng;
use deepport_core::{DType, HostTensor};

/// Elements converted per chunk by [`tensor_from_fn`].
const CHUNK: usize = 1 << 20;

/// Buffers at least this long are filled by several threads.
const PAR_MIN: usize = 1 << 16;

/// Fills `out` with standard normal values times `scale` (Box–Muller, both
/// values of each pair used). Long buffers are split over threads, each
/// piece starting from the generator jumped ahead to its first draw
/// ([`Rng::ahead`]), so the values and the generator's final state are
/// exactly those of one sequential pass.
pub fn fill_normal(rng: &mut Rng, out: &mut [f32], scale: f32) {
    if out.len() < PAR_MIN {
        fill_normal_seq(rng, out, scale);
        return;
    }
    let threads = threads();
    if threads < 2 {
        fill_normal_seq(rng, out, scale);
        return;
    }
    // Even pieces: a pair never straddles two threads, and piece `i`
    // starts at draw `i · per` (two draws per pair, two values per pair).
    let per = out.len().div_ceil(threads).next_multiple_of(2);
    std::thread::scope(|s| {
        for (i, piece) in out.chunks_mut(per).enumerate() {
            let mut r = rng.ahead((i * per) as u64);
            s.spawn(move || fill_normal_seq(&mut r, piece, scale));
        }
    });
    rng.skip(2 * out.len().div_ceil(2) as u64);
}

/// The threads input generation uses (asked once: the question reads
/// cgroup files).
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn fill_normal_seq(rng: &mut Rng, out: &mut [f32], scale: f32) {
    // Pairs in batches: the draws are sequential (u1 then u2, pair after
    // pair), the arithmetic of a batch's independent pairs overlaps.
    const PAIRS: usize = 8;
    let scale = f64::from(scale);
    for chunk in out.chunks_mut(2 * PAIRS) {
        let pairs = chunk.len().div_ceil(2);
        let (mut u1, mut u2) = ([1.0f64; PAIRS], [0.0f64; PAIRS]);
        for i in 0..pairs {
            u1[i] = 1.0 - rng.uniform();
            u2[i] = rng.uniform();
        }
        let (mut a, mut b) = ([0.0f64; PAIRS], [0.0f64; PAIRS]);
        for i in 0..PAIRS {
            (a[i], b[i]) = crate::rng::box_muller(u1[i], u2[i]);
        }
        for (i, pair) in chunk.chunks_mut(2).enumerate() {
            pair[0] = (a[i] * scale) as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = (b[i] * scale) as f32;
            }
        }
    }
}

/// `n` normal values times `scale`.
pub fn normals(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    fill_normal(rng, &mut v, scale);
    v
}

/// A tensor of `dtype` whose element `i` (row-major) is `f(i)`, rounded once
/// to the dtype; converted in chunks.
pub fn tensor_from_fn(
    dtype: DType,
    shape: &[usize],
    mut f: impl FnMut(usize) -> f32,
) -> HostTensor {
    let n: usize = shape.iter().product();
    if n <= CHUNK {
        let v: Vec<f32> = (0..n).map(&mut f).collect();
        return HostTensor::from_f32(dtype, shape, &v);
    }
    let mut bytes = Vec::with_capacity(n * dtype.size());
    let mut buf = Vec::with_capacity(CHUNK);
    let mut i = 0;
    while i < n {
        let m = CHUNK.min(n - i);
        buf.clear();
        buf.extend((i..i + m).map(&mut f));
        bytes.extend_from_slice(HostTensor::from_f32(dtype, &[m], &buf).bytes());
        i += m;
    }
    HostTensor::from_bytes(dtype, shape, bytes)
        .unwrap_or_else(|_| HostTensor::from_f32(dtype, shape, &[]))
}

/// Values a [`NormalStream`] generates at a time (even, and a divisor of
/// [`CHUNK`]).
const STREAM_BLOCK: usize = 4096;

/// A stream of normal values times a scale, generated in blocks.
pub struct NormalStream<'r> {
    rng: &'r mut Rng,
    scale: f32,
    buf: Vec<f32>,
    at: usize,
}

impl<'r> NormalStream<'r> {
    pub fn new(rng: &'r mut Rng, scale: f32) -> Self {
        NormalStream {
            rng,
            scale,
            buf: vec![0.0; STREAM_BLOCK],
            at: STREAM_BLOCK,
        }
    }

    pub fn next_value(&mut self) -> f32 {
        if self.at == self.buf.len() {
            fill_normal(self.rng, &mut self.buf, self.scale);
            self.at = 0;
        }
        self.at += 1;
        self.buf[self.at - 1]
    }
}

/// The values of a [`NormalStream`] from its `first`-th value on, without
/// drawing the ones before: a generator jumped ahead ([`Rng::ahead`]) to
/// the pair holding value `first`, refilled in the stream's blocks.
pub struct NormalCursor {
    rng: Rng,
    scale: f32,
    buf: Vec<f32>,
    at: usize,
    taken: usize,
}

impl NormalCursor {
    /// A cursor at value `first` of the stream `NormalStream::new(base, scale)`
    /// would give (one draw per value).
    pub fn at(base: &Rng, first: usize, scale: f32) -> Self {
        let mut c = NormalCursor {
            rng: base.ahead((first & !1) as u64),
            scale,
            buf: vec![0.0; STREAM_BLOCK],
            at: STREAM_BLOCK,
            taken: 0,
        };
        if first % 2 == 1 {
            c.next_value();
        }
        c.taken = 0;
        c
    }

    pub fn next_value(&mut self) -> f32 {
        if self.at == self.buf.len() {
            fill_normal_seq(&mut self.rng, &mut self.buf, self.scale);
            self.at = 0;
        }
        self.at += 1;
        self.taken += 1;
        self.buf[self.at - 1]
    }
}

/// Fills `out`, `row_bytes` bytes per row, in parallel: `fill(r, values,
/// bytes)` writes row `r` and takes exactly `values_in(r)` values from
/// `values`, which continues one [`NormalStream`] over `rng` (scale
/// `scale`) across the rows in order. Afterwards `rng` is where that stream
/// leaves it, so the bytes and every later draw equal one sequential pass
/// with a `NormalStream` (tested).
///
/// # Panics
/// If `fill` takes another number of values than `values_in` says (a bug
/// in a case builder), or `out` is not `row_bytes` times the rows.
pub fn fill_rows_from_stream(
    rng: &mut Rng,
    scale: f32,
    out: &mut [u8],
    row_bytes: usize,
    values_in: impl Fn(usize) -> usize + Sync,
    fill: impl Fn(usize, &mut NormalCursor, &mut [u8]) + Sync,
) {
    let rows = out.len().checked_div(row_bytes).unwrap_or(0);
    assert_eq!(
        rows * row_bytes,
        out.len(),
        "fill_rows_from_stream: ragged output"
    );
    // The stream offset of each row's first value.
    let mut first = Vec::with_capacity(rows + 1);
    let mut total = 0usize;
    for r in 0..rows {
        first.push(total);
        total += values_in(r);
    }
    first.push(total);
    let pieces = if total < PAR_MIN {
        1
    } else {
        (threads() * 4).min(rows.max(1))
    };
    let per = rows.div_ceil(pieces.max(1)).max(1);
    let base = rng.clone();
    let (first, fill, values_in) = (&first, &fill, &values_in);
    let run = |r0: usize, chunk: &mut [u8]| {
        let mut cur = NormalCursor::at(&base, first[r0], scale);
        for (i, bytes) in chunk.chunks_mut(row_bytes).enumerate() {
            let before = cur.taken;
            fill(r0 + i, &mut cur, bytes);
            assert_eq!(
                cur.taken - before,
                values_in(r0 + i),
                "row {} took another count of values",
                r0 + i
            );
        }
    };
    if pieces <= 1 || row_bytes == 0 {
        if rows > 0 {
            run(0, out);
        }
    } else {
        // Pieces are handed out in turn so uneven rows balance.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let chunks: Vec<std::sync::Mutex<Option<&mut [u8]>>> = out
            .chunks_mut(per * row_bytes)
            .map(|c| std::sync::Mutex::new(Some(c)))
            .collect();
        std::thread::scope(|s| {
            for _ in 0..threads().min(chunks.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(slot) = chunks.get(i) else { break };
                    let chunk = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(chunk) = chunk {
                        run(i * per, chunk);
                    }
                });
            }
        });
    }
    rng.skip((total.div_ceil(STREAM_BLOCK) * STREAM_BLOCK) as u64);
}

/// A tensor of `rows` rows of `width` elements each: where `valid[r]`, the
/// next `width` values of a [`NormalStream`] over `rng` (times `scale`,
/// rounded to `dtype`), elsewhere NaN; `rng` ends where that stream leaves
/// it. Generated in parallel ([`fill_rows_from_stream`]).
pub fn masked_normal(
    rng: &mut Rng,
    dtype: DType,
    shape: &[usize],
    valid: &[bool],
    scale: f32,
) -> HostTensor {
    let n: usize = shape.iter().product();
    let width = if valid.is_empty() { 0 } else { n / valid.len() };
    let row_bytes = width * dtype.size();
    let mut bytes = vec![0u8; n * dtype.size()];
    let nan = HostTensor::from_f32(dtype, &[width], &vec![f32::NAN; width]).into_bytes();
    fill_rows_from_stream(
        rng,
        scale,
        &mut bytes,
        row_bytes,
        |r| if valid[r] { width } else { 0 },
        |r, g, out| {
            if valid[r] {
                let v: Vec<f32> = (0..width).map(|_| g.next_value()).collect();
                out.copy_from_slice(HostTensor::from_f32(dtype, &[width], &v).bytes());
            } else {
                out.copy_from_slice(&nan);
            }
        },
    );
    HostTensor::from_bytes(dtype, shape, bytes)
        .unwrap_or_else(|_| HostTensor::from_f32(dtype, shape, &[]))
}

/// Normal values times `scale`, rounded to `dtype`.
pub fn normal(rng: &mut Rng, dtype: DType, shape: &[usize], scale: f32) -> HostTensor {
    let n: usize = shape.iter().product();
    if n <= CHUNK {
        return HostTensor::from_f32(dtype, shape, &normals(rng, n, scale));
    }
    // The values of a `NormalStream` (which fills blocks of STREAM_BLOCK),
    // generated CHUNK at a time (a multiple of the block) by the parallel
    // `fill_normal`; the generator then skips what the stream's last block
    // would have drawn beyond `n`, so later draws are unchanged too.
    let mut bytes = Vec::with_capacity(n * dtype.size());
    let mut buf = vec![0.0; CHUNK];
    let mut drawn = 0;
    for start in (0..n).step_by(CHUNK) {
        let m = CHUNK.min(n - start);
        fill_normal(rng, &mut buf[..m], scale);
        drawn += 2 * m.div_ceil(2);
        bytes.extend_from_slice(HostTensor::from_f32(dtype, &[m], &buf[..m]).bytes());
    }
    rng.skip((n.div_ceil(STREAM_BLOCK) * STREAM_BLOCK - drawn) as u64);
    HostTensor::from_bytes(dtype, shape, bytes)
        .unwrap_or_else(|_| HostTensor::from_f32(dtype, shape, &[]))
}

/// Random FP8 values (normal · 64, saturating at the format's maximum).
pub fn fp8(rng: &mut Rng, fmt: DType, shape: &[usize]) -> HostTensor {
    normal(rng, fmt, shape, 64.0)
}

/// Random positive scales in [0.25e-3, 2e-3) (f32).
pub fn scales(rng: &mut Rng, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range_f32(0.25, 2.0) * 1e-3).collect();
    HostTensor::from_f32(DType::F32, shape, &v)
}

/// Sets whole rows of a row-major tensor to NaN (the FP8 NaN code for FP8
/// tensors), so a kernel that reads rows it must not read poisons its
/// output. `rows[i]` marks row `i`; rows are `numel / rows.len()` wide.
pub fn poison_rows(t: HostTensor, rows: &[bool]) -> HostTensor {
    if rows.is_empty() || !rows.iter().any(|&p| p) {
        return t;
    }
    let (dtype, shape) = (t.dtype(), t.shape().to_vec());
    let size = dtype.size();
    let row = t.numel() / rows.len();
    let nan = HostTensor::from_f32(dtype, &[1], &[f32::NAN]).into_bytes();
    let mut bytes = t.into_bytes();
    for (i, &p) in rows.iter().enumerate() {
        if p {
            for e in i * row..(i + 1) * row {
                bytes[e * size..(e + 1) * size].copy_from_slice(&nan);
            }
        }
    }
    HostTensor::from_bytes(dtype, &shape, bytes)
        .unwrap_or_else(|_| HostTensor::from_f32(dtype, &shape, &[]))
}

/// A per-element mask from a per-row mask (rows `width` wide).
pub fn row_mask(rows: &[bool], width: usize) -> Vec<bool> {
    rows.iter()
        .flat_map(|&r| std::iter::repeat_n(r, width))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_normals_are_the_sequential_stream() {
        // Odd and even lengths, beyond PAR_MIN; the generator must end in
        // the same state (the next draw equal).
        for n in [PAR_MIN + 1, 3 * PAR_MIN + 6, 1_000_003] {
            let (mut a, mut b) = (Rng::new(n as u64), Rng::new(n as u64));
            let mut par = vec![0.0; n];
            let mut seq = vec![0.0; n];
            fill_normal(&mut a, &mut par, 0.5);
            fill_normal_seq(&mut b, &mut seq, 0.5);
            assert!(par
                .iter()
                .zip(&seq)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(a.next_u64(), b.next_u64());
        }
        // `normal` beyond CHUNK equals the one-value-at-a-time stream it
        // replaced, and leaves the generator where the stream left it.
        for n in [CHUNK + 1, 2 * CHUNK + 4097] {
            for dtype in [DType::BF16, DType::F32] {
                let (mut a, mut b) = (Rng::new(9), Rng::new(9));
                let fast = normal(&mut a, dtype, &[n], 2.0);
                let mut s = NormalStream::new(&mut b, 2.0);
                let slow = tensor_from_fn(dtype, &[n], |_| s.next_value());
                assert_eq!(fast.bytes(), slow.bytes());
                assert_eq!(a.next_u64(), b.next_u64());
            }
        }
    }

    #[test]
    fn parallel_rows_are_the_sequential_stream() {
        // Masked rows (NaN, no draws), odd widths (a piece may start in the
        // middle of a Box–Muller pair), sizes below and beyond PAR_MIN: the
        // bytes and the generator's final state equal one NormalStream.
        for (rows, width) in [(7, 3), (1000, 577), (3001, 131), (64, 2048), (5, 0)] {
            let valid: Vec<bool> = (0..rows).map(|r| r % 5 != 2 && r != 0).collect();
            for dtype in [DType::BF16, DType::F32, DType::F8E4M3] {
                let (mut a, mut b) = (Rng::new(rows as u64), Rng::new(rows as u64));
                let fast = masked_normal(&mut a, dtype, &[rows, width], &valid, 1.5);
                let mut s = NormalStream::new(&mut b, 1.5);
                let slow = tensor_from_fn(dtype, &[rows, width], |e| {
                    if valid[e / width.max(1)] {
                        s.next_value()
                    } else {
                        f32::NAN
                    }
                });
                drop(s);
                assert_eq!(fast.bytes(), slow.bytes(), "{rows}x{width} {dtype}");
                assert_eq!(a.next_u64(), b.next_u64(), "{rows}x{width} {dtype}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "took another count")]
    fn a_row_taking_the_wrong_count_is_caught() {
        let mut out = vec![0u8; 8];
        fill_rows_from_stream(
            &mut Rng::new(1),
            1.0,
            &mut out,
            2,
            |_| 2,
            |r, g, _| {
                g.next_value();
                if r != 2 {
                    g.next_value();
                }
            },
        );
    }

    #[test]
    fn chunked_conversion_matches_direct() {
        let shape = [3, CHUNK / 2 + 7];
        let f = |i: usize| (i as f32 * 0.37).sin() * 300.0;
        for d in [DType::BF16, DType::F8E4M3, DType::F32] {
            let a = tensor_from_fn(d, &shape, f);
            let v: Vec<f32> = (0..shape[0] * shape[1]).map(f).collect();
            let b = HostTensor::from_f32(d, &shape, &v);
            assert_eq!(a.bytes(), b.bytes(), "{d}");
            assert_eq!(a.shape(), &shape);
        }
    }

    #[test]
    fn normal_values_are_deterministic_and_normal() {
        let a = normals(&mut Rng::new(5), 200_001, 2.0);
        let b = normals(&mut Rng::new(5), 200_001, 2.0);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 4.0).abs() < 0.08, "{var}");
        let big = normal(&mut Rng::new(6), DType::BF16, &[CHUNK + 3], 1.0);
        assert_eq!(big.numel(), CHUNK + 3);
        assert!(big.to_f32_vec().iter().all(|x| x.is_finite()));
    }

    #[test]
    fn poison_rows_marks_whole_rows() {
        let t = HostTensor::from_f32(DType::F8E4M3, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let v = poison_rows(t, &[false, true, false]).to_f32_vec();
        assert_eq!(&v[..2], &[1.0, 2.0]);
        assert!(v[2].is_nan() && v[3].is_nan());
        assert_eq!(&v[4..], &[5.0, 6.0]);
        assert_eq!(row_mask(&[true, false], 2), vec![true, true, false, false]);
    }
}
