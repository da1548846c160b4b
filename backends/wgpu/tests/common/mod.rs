//! Helpers shared by the wgpu test files (`mod common;` in each): the
//! adapter harness, a deterministic PRNG, tensor transfer and the
//! comparison helpers.
//!
//! Without an adapter, [`make`] prints why and returns `None` (the test
//! passes), unless `DEEPPORT_REQUIRE` names `wgpu`: then unavailability
//! fails the test.

// Each test file uses a different subset.
#![allow(dead_code)]

use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::{DType, Error, HostTensor};
use deepport_cpu::CpuRef;
use deepport_wgpu::{Wgpu, WgpuOptions};
use std::sync::OnceLock;

// ---- harness ------------------------------------------------------------------

/// Whether `DEEPPORT_REQUIRE` names `wgpu`.
pub fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == "wgpu"))
        .unwrap_or(false)
}

/// A backend of its own (for tests whose errors must not leak into others);
/// `None` when wgpu is unavailable (and not required).
pub fn make(opts: WgpuOptions) -> Option<Wgpu> {
    match Wgpu::with_options(opts) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                !required(),
                "DEEPPORT_REQUIRE names wgpu, but it is unavailable: {e}"
            );
            assert!(
                matches!(e, Error::Unavailable { .. }),
                "probing must fail with Unavailable, got {e:?}"
            );
            eprintln!("skipping: wgpu unavailable: {e}");
            None
        }
    }
}

/// The backend shared by tests that cannot produce deferred errors.
pub fn shared() -> Option<&'static Wgpu> {
    static B: OnceLock<Option<Wgpu>> = OnceLock::new();
    B.get_or_init(|| make(WgpuOptions::default())).as_ref()
}

// ---- inputs -------------------------------------------------------------------

/// splitmix64 with Box–Muller normals. `salt` keeps each test file's
/// streams as they were.
pub struct Rng(u64);

impl Rng {
    pub fn salted(seed: u64, salt: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// 2^e with e uniform in [lo, hi] (block scales spanning many octaves).
    pub fn pow2(&mut self, lo: i32, hi: i32) -> f32 {
        let e = lo + self.below((hi - lo + 1) as u64) as i32;
        2f32.powi(e) * (1.0 + self.uniform() as f32)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

// ---- transfer -----------------------------------------------------------------

pub fn host(dtype: DType, shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(dtype, shape, v)
}

pub fn up(b: &dyn Backend, h: &HostTensor) -> Tensor {
    b.upload(h).expect("upload")
}

pub fn poisoned(b: &dyn Backend, dtype: DType, shape: &[usize]) -> Tensor {
    alloc_poisoned(b, dtype, shape).expect("alloc")
}

pub fn down(b: &dyn Backend, t: &Tensor) -> HostTensor {
    b.download(t).expect("download")
}

/// Uploads `inputs` to `b`, runs `f` (which allocates poisoned outputs) and
/// downloads the outputs.
pub fn on<F>(b: &dyn Backend, inputs: &[&HostTensor], f: &F) -> Vec<HostTensor>
where
    F: Fn(&dyn Backend, &[Tensor]) -> Vec<Tensor>,
{
    let ts: Vec<Tensor> = inputs.iter().map(|h| up(b, h)).collect();
    let outs = f(b, &ts);
    outs.iter().map(|t| down(b, t)).collect()
}

/// [`on`] wgpu and on `cpu-ref`: (got, want).
pub fn both<F>(w: &Wgpu, inputs: &[&HostTensor], f: F) -> (Vec<HostTensor>, Vec<HostTensor>)
where
    F: Fn(&dyn Backend, &[Tensor]) -> Vec<Tensor>,
{
    (on(w, inputs, &f), on(&CpuRef, inputs, &f))
}

// ---- judging ------------------------------------------------------------------

/// One ulp of `dtype` at |x| (the spacing of its values there).
pub fn ulp(dtype: DType, x: impl Into<f64>) -> f64 {
    let (man, min_exp) = match dtype {
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        _ => (23, -126),
    };
    let a = x.into().abs();
    let e = if a == 0.0 {
        min_exp
    } else {
        (a.log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - man)
}

/// `1 − 2·Σxy / Σ(x² + y²)` in f64 (SPEC §3).
pub fn calc_diff(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut sq) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a as f64, b as f64);
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / sq
}

/// `e` is `IndexOutOfRange` on `op`'s argument `arg` at `position` with
/// `value` (and the range text, where given); `when` names the check.
pub fn assert_index_error(
    when: &str,
    e: Error,
    (op, arg): (&str, &str),
    position: &[usize],
    value: i64,
    range: Option<&str>,
) {
    match e {
        Error::IndexOutOfRange {
            op: o,
            arg: a,
            position: p,
            value: v,
            range: r,
        } => {
            assert_eq!((o, a), (op, arg), "{when}");
            assert_eq!(p, position, "{when}");
            assert_eq!(v, value, "{when}");
            if let Some(range) = range {
                assert_eq!(r, range, "{when}");
            }
        }
        other => panic!("{when}: expected IndexOutOfRange, got {other:?}"),
    }
}
