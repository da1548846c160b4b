//! A small deterministic PRNG (SplitMix64) for the built-in cases: the same
//! seed gives the same inputs on every machine and in every build.

/// SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

/// SplitMix64's increment: the state after `k` draws is `seed + k · GAMMA`.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The generator as it will be `draws` draws from now (SplitMix64 is a
    /// counter, so this is O(1)): lets a long stream be generated in
    /// parallel pieces with exactly the values of one sequential pass.
    pub fn ahead(&self, draws: u64) -> Rng {
        Rng(self.0.wrapping_add(GAMMA.wrapping_mul(draws)))
    }

    /// Skips `draws` draws.
    pub fn skip(&mut self, draws: u64) {
        *self = self.ahead(draws);
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f32(&mut self, lo: f32, hi: f32) -> f32 {
        (lo as f64 + (hi as f64 - lo as f64) * self.uniform()) as f32
    }

    /// Uniform integer in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }

    /// Standard normal (Box–Muller, [`box_muller`]'s first value).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        box_muller(u1, u2).0 as f32
    }

    /// `n` standard normal values times `scale`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }
}

/// Box–Muller: the two standard normal values `r·cos θ` and `r·sin θ` of
/// `u1 ∈ (0, 1]` and `u2 ∈ [0, 1)`, with `r = √(−2 ln u1)` and `θ = 2π·u2`.
///
/// The logarithm, sine and cosine are this module's own polynomials in
/// IEEE basic operations (no libm, no fused multiply-add), so every
/// machine, libm and build computes the same bits; their error (< 1e-13
/// relative) is far below the f32 the values are rounded to. They are also
/// several times faster than libm's, which matters for the full profile's
/// gigabyte caches.
#[inline]
pub fn box_muller(u1: f64, u2: f64) -> (f64, f64) {
    let r = (-2.0 * ln_unit(u1)).sqrt();
    let (s, c) = sincos_turns(u2);
    (r * c, r * s)
}

/// `ln x` for a normal positive `x` (here `x ∈ [2⁻⁵³, 1]`): `x = m·2ᵉ` with
/// `m ∈ [√½, √2)`, `ln m = 2·atanh(s)`, `s = (m − 1)/(m + 1)`, `|s| < 0.172`,
/// summed to `s¹⁵` (next term below 1e-14 relative).
#[inline]
fn ln_unit(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let series = 1.0
        + z * (1.0 / 3.0
            + z * (1.0 / 5.0
                + z * (1.0 / 7.0
                    + z * (1.0 / 9.0 + z * (1.0 / 11.0 + z * (1.0 / 13.0 + z * (1.0 / 15.0)))))));
    e as f64 * std::f64::consts::LN_2 + 2.0 * s * series
}

/// `(sin 2πt, cos 2πt)` for `t ∈ [0, 1)`: the nearest quarter turn `k/4`
/// is taken out exactly, the rest `x ∈ [−π/4, π/4]` goes through Taylor
/// polynomials to `x¹³` / `x¹⁴` (next terms below 3e-14), and the quadrant
/// rotates the pair.
#[inline]
fn sincos_turns(t: f64) -> (f64, f64) {
    // Taylor coefficients ±1/n! (constant-folded; no division at run time).
    const S: [f64; 6] = [
        -1.0 / 6.0,
        1.0 / 120.0,
        -1.0 / 5040.0,
        1.0 / 362_880.0,
        -1.0 / 39_916_800.0,
        1.0 / 6_227_020_800.0,
    ];
    const C: [f64; 7] = [
        -1.0 / 2.0,
        1.0 / 24.0,
        -1.0 / 720.0,
        1.0 / 40_320.0,
        -1.0 / 3_628_800.0,
        1.0 / 479_001_600.0,
        -1.0 / 87_178_291_200.0,
    ];
    let k = (t * 4.0).round();
    let x = (t - k * 0.25) * std::f64::consts::TAU;
    let z = x * x;
    let s = x * (1.0 + z * (S[0] + z * (S[1] + z * (S[2] + z * (S[3] + z * (S[4] + z * S[5]))))));
    let c = 1.0
        + z * (C[0] + z * (C[1] + z * (C[2] + z * (C[3] + z * (C[4] + z * (C[5] + z * C[6]))))));
    // Rotate by the quadrant without branches (so batches vectorize).
    let q = (k as i64) & 3;
    let (a, b) = if q & 1 == 1 { (c, s) } else { (s, c) };
    let sin = if q >= 2 { -a } else { a };
    let cos = if q == 1 || q == 2 { -b } else { b };
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(7) < 7);
        }
        let mut p = r.permutation(50);
        let (mut seq, jump) = (Rng::new(3), Rng::new(3).ahead(12345));
        for _ in 0..12345 {
            seq.next_u64();
        }
        assert_eq!(seq.next_u64(), jump.clone().next_u64());
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn own_math_agrees_with_libm() {
        let mut r = Rng::new(11);
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            // Uniform draws, plus the ends and the quadrant boundaries.
            let (u1, u2) = match i {
                0 => (1.0, 0.0),
                1 => (f64::powi(2.0, -53), 0.25),
                2 => (0.5, 0.5),
                3 => (0.75, 0.125),
                4 => (
                    1e-300_f64.max(f64::powi(2.0, -53)),
                    1.0 - f64::EPSILON / 2.0,
                ),
                _ => (1.0 - r.uniform(), r.uniform()),
            };
            let rr = (-2.0 * u1.ln()).sqrt();
            let th = std::f64::consts::TAU * u2;
            let (a, b) = box_muller(u1, u2);
            for (got, want) in [(a, rr * th.cos()), (b, rr * th.sin())] {
                let err = (got - want).abs() / rr.max(1e-300);
                worst = worst.max(err);
            }
            assert!((ln_unit(u1) - u1.ln()).abs() <= 1e-13 * u1.ln().abs().max(1e-300) + 1e-15);
        }
        // Relative to r (θ = 2πu2 itself carries ~1e-16·2π of rounding).
        assert!(worst < 1e-13, "worst {worst:e}");
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(3);
        let v = r.normals(100_000, 1.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
