//! Tests of the `cpu-ref` MLA ops against independent dense references
//! written plainly here: MLA decode over a paged cache (SPEC.md §4) and MLA
//! prefill in its naive and absorbed forms (SPEC.md §5).

#![allow(clippy::needless_range_loop)] // the references index plainly on purpose

use deepport_core::formats::round_to;
use deepport_core::ops::{self, MlaDecode, MlaForm, MlaPrefill};
use deepport_core::{Backend, DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_testkit::Rng;

/// This file's draws from the shared test PRNG.
trait Draw {
    /// `n` values uniform in [-amp, amp), rounded to `dtype`.
    fn vec(&mut self, n: usize, amp: f32, dtype: DType) -> Vec<f32>;
}

impl Draw for Rng {
    fn vec(&mut self, n: usize, amp: f32, dtype: DType) -> Vec<f32> {
        (0..n)
            .map(|_| round_to(dtype, self.range_f32(-amp, amp)))
            .collect()
    }
}

const HUGE: i32 = 1 << 30;

/// A decode problem with its dense (unpaged) keys.
struct Decode {
    dtype: DType,
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    d: usize,
    dv: usize,
    block_size: usize,
    lens: Vec<usize>,
    /// `q [b, s_q, h_q, d]`.
    q: Vec<f32>,
    /// Per sequence: contiguous keys `[seqlen, h_kv, d]`.
    keys: Vec<Vec<f32>>,
    scale: f32,
}

impl Decode {
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        dtype: DType,
        lens: &[usize],
        s_q: usize,
        h_q: usize,
        h_kv: usize,
        d: usize,
        dv: usize,
        block_size: usize,
    ) -> Self {
        let b = lens.len();
        let q = rng.vec(b * s_q * h_q * d, 1.0, dtype);
        let keys = lens
            .iter()
            .map(|&l| rng.vec(l * h_kv * d, 1.0, dtype))
            .collect();
        Decode {
            dtype,
            s_q,
            h_q,
            h_kv,
            d,
            dv,
            block_size,
            lens: lens.to_vec(),
            q,
            keys,
            scale: (d as f32).powf(-0.5),
        }
    }

    /// Pages the keys into a NaN-filled cache with a randomly permuted block
    /// table whose unused entries hold 2^30. Returns
    /// `(kcache, block_table, num_blocks, max_blocks)`.
    fn page(&self, rng: &mut Rng, spare_blocks: usize) -> (Vec<f32>, Vec<i32>, usize, usize) {
        let bs = self.block_size;
        let used: Vec<usize> = self.lens.iter().map(|l| l.div_ceil(bs)).collect();
        let num_blocks = used.iter().sum::<usize>() + spare_blocks;
        // One unused entry per row at least.
        let max_blocks = used.iter().copied().max().unwrap_or(0) + 1;
        let perm = rng.permutation(num_blocks);
        let row = self.h_kv * self.d;
        let mut cache = vec![f32::NAN; num_blocks * bs * row];
        let mut table = vec![HUGE; self.lens.len() * max_blocks];
        let mut next = 0;
        for (b, &len) in self.lens.iter().enumerate() {
            for j in 0..used[b] {
                table[b * max_blocks + j] = perm[next] as i32;
                next += 1;
            }
            for t in 0..len {
                let blk = table[b * max_blocks + t / bs] as usize;
                let dst = (blk * bs + t % bs) * row;
                cache[dst..dst + row].copy_from_slice(&self.keys[b][t * row..(t + 1) * row]);
            }
        }
        (cache, table, num_blocks, max_blocks)
    }

    /// Dense reference: `(out [b, s_q, h_q, dv], lse [b, h_q, s_q])` in f64.
    fn reference(&self, causal: bool) -> (Vec<f64>, Vec<f64>) {
        let (b_n, s_q, h_q, d, dv) = (self.lens.len(), self.s_q, self.h_q, self.d, self.dv);
        let mut out = vec![0.0; b_n * s_q * h_q * dv];
        let mut lse = vec![0.0; b_n * h_q * s_q];
        for b in 0..b_n {
            let len = self.lens[b] as i64;
            for s in 0..s_q {
                let n = if causal {
                    (len - (s_q as i64 - 1 - s as i64)).max(0) as usize
                } else {
                    len as usize
                };
                for h in 0..h_q {
                    let kvh = h * self.h_kv / h_q;
                    let qi = ((b * s_q + s) * h_q + h) * d;
                    let k = |t: usize| &self.keys[b][(t * self.h_kv + kvh) * d..][..d];
                    let scores: Vec<f64> = (0..n)
                        .map(|t| {
                            let mut acc = 0.0f64;
                            for c in 0..d {
                                acc += self.q[qi + c] as f64 * k(t)[c] as f64;
                            }
                            acc * self.scale as f64
                        })
                        .collect();
                    let li = (b * h_q + h) * s_q + s;
                    if n == 0 {
                        lse[li] = f64::INFINITY;
                        continue;
                    }
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    lse[li] = m + sum.ln();
                    let oi = ((b * s_q + s) * h_q + h) * dv;
                    for (t, &sc) in scores.iter().enumerate() {
                        let p = (sc - m).exp() / sum;
                        for c in 0..dv {
                            out[oi + c] += p * k(t)[c] as f64;
                        }
                    }
                }
            }
        }
        (out, lse)
    }
}

/// Runs `mla_decode` on `cpu-ref`; returns `(out, lse)`.
#[allow(clippy::too_many_arguments)]
fn run_decode(
    p: &Decode,
    cache: &[f32],
    table: &[i32],
    seqlens: &[i32],
    num_blocks: usize,
    max_blocks: usize,
    causal: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let be = CpuRef::new();
    let b = seqlens.len();
    let q = be.upload(&HostTensor::from_f32(
        p.dtype,
        &[b, p.s_q, p.h_q, p.d],
        &p.q,
    ))?;
    let kc = be.upload(&HostTensor::from_f32(
        p.dtype,
        &[num_blocks, p.block_size, p.h_kv, p.d],
        cache,
    ))?;
    let bt = be.upload(&HostTensor::from_i32(&[b, max_blocks], table))?;
    let sl = be.upload(&HostTensor::from_i32(&[b], seqlens))?;
    let mut out = be.alloc(p.dtype, &[b, p.s_q, p.h_q, p.dv])?;
    let mut lse = be.alloc(DType::F32, &[b, p.h_q, p.s_q])?;
    ops::run(
        &be,
        MlaDecode {
            q: &q,
            kcache: &kc,
            block_table: &bt,
            cache_seqlens: &sl,
            out: &mut out,
            lse: &mut lse,
            softmax_scale: p.scale,
            causal,
        },
    )?;
    Ok((
        be.download(&out)?.to_f32_vec(),
        be.download(&lse)?.to_f32_vec(),
    ))
}

fn seqlens(p: &Decode) -> Vec<i32> {
    p.lens.iter().map(|&l| l as i32).collect()
}

/// Pages `p` and runs it.
fn decode(p: &Decode, rng: &mut Rng, causal: bool) -> (Vec<f32>, Vec<f32>) {
    let (cache, table, nb, mb) = p.page(rng, 3);
    run_decode(p, &cache, &table, &seqlens(p), nb, mb, causal).expect("mla_decode failed")
}

/// Largest relative error of one rounding to `dtype` (half an ulp), with
/// room for f64 summation-order noise.
fn half_ulp(dtype: DType) -> f64 {
    let bits = match dtype {
        DType::BF16 => 8,
        DType::F16 => 11,
        _ => 24,
    };
    2f64.powi(-bits) * (1.0 + 1e-9)
}

fn check_out(what: &str, dtype: DType, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = half_ulp(dtype);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g} is not finite");
        let err = (g as f64 - w).abs();
        assert!(
            err <= w.abs() * tol + 1e-30,
            "{what}[{i}]: got {g}, want {w} (error {err:e})"
        );
    }
}

fn check_lse(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() {
            assert_eq!(g as f64, w, "{what}[{i}]");
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(
            err <= w.abs() * half_ulp(DType::F32) + 1e-30,
            "{what}[{i}]: got {g}, want {w} (error {err:e})"
        );
    }
}

#[test]
fn decode_varlen_paged_nan_filled() {
    let mut rng = Rng::new(1);
    let p = Decode::random(&mut rng, DType::BF16, &[1, 70, 130], 1, 4, 1, 576, 512, 64);
    let (out, lse) = decode(&p, &mut rng, false);
    let (ro, rl) = p.reference(false);
    check_out("out", DType::BF16, &out, &ro);
    check_lse("lse", &lse, &rl);
}

#[test]
fn decode_head_grouping() {
    let mut rng = Rng::new(2);
    for dtype in [DType::BF16, DType::F32] {
        let p = Decode::random(&mut rng, dtype, &[33, 100, 64], 1, 6, 2, 576, 512, 64);
        let (out, lse) = decode(&p, &mut rng, false);
        let (ro, rl) = p.reference(false);
        check_out("out", dtype, &out, &ro);
        check_lse("lse", &lse, &rl);
        // Heads 0..3 read kv head 0, heads 3..6 kv head 1: the two groups
        // must differ for this test to mean anything.
        assert_ne!(out[..512], out[3 * 512..4 * 512]);
    }
}

#[test]
fn decode_causal_bottom_right() {
    let mut rng = Rng::new(3);
    for s_q in [2, 4] {
        // Length 2 with s_q = 4 leaves query 0 with no key at all.
        let p = Decode::random(
            &mut rng,
            DType::BF16,
            &[5, 2, 64, 130],
            s_q,
            3,
            1,
            576,
            512,
            64,
        );
        let (out, lse) = decode(&p, &mut rng, true);
        let (ro, rl) = p.reference(true);
        check_out("out", DType::BF16, &out, &ro);
        check_lse("lse", &lse, &rl);
        // Causal must differ from non-causal (earlier queries see fewer keys).
        let (ro_full, _) = p.reference(false);
        assert!(ro.iter().zip(&ro_full).any(|(a, b)| a != b));
        if s_q == 4 {
            // Sequence 1, query 0: seqlen 2 − 3 < 0 → empty row.
            for h in 0..3 {
                let li = (3 + h) * 4;
                assert_eq!(lse[li], f32::INFINITY);
                let (b, s) = (1, 0);
                let oi = ((b * 4 + s) * 3 + h) * 512;
                assert!(out[oi..oi + 512].iter().all(|&x| x == 0.0));
            }
        }
    }
}

#[test]
fn decode_causal_single_query_equals_noncausal() {
    let mut rng = Rng::new(4);
    let p = Decode::random(&mut rng, DType::BF16, &[17, 129], 1, 2, 1, 576, 512, 64);
    let (cache, table, nb, mb) = p.page(&mut rng, 1);
    let sl = seqlens(&p);
    let a = run_decode(&p, &cache, &table, &sl, nb, mb, true).unwrap();
    let b = run_decode(&p, &cache, &table, &sl, nb, mb, false).unwrap();
    assert_eq!(a, b);
    let (ro, rl) = p.reference(false);
    check_out("out", DType::BF16, &a.0, &ro);
    check_lse("lse", &a.1, &rl);
}

#[test]
fn decode_zero_length_sequence() {
    let mut rng = Rng::new(5);
    let p = Decode::random(&mut rng, DType::BF16, &[0, 10, 0], 2, 2, 1, 576, 512, 64);
    for causal in [false, true] {
        let (out, lse) = decode(&p, &mut rng, causal);
        let (ro, rl) = p.reference(causal);
        check_out("out", DType::BF16, &out, &ro);
        check_lse("lse", &lse, &rl);
        for b in [0, 2] {
            let o = &out[b * 2 * 2 * 512..(b + 1) * 2 * 2 * 512];
            assert!(o.iter().all(|&x| x == 0.0), "sequence {b}: out must be 0");
            let l = &lse[b * 4..(b + 1) * 4];
            assert!(l.iter().all(|&x| x == f32::INFINITY), "sequence {b}: lse");
        }
    }
}

#[test]
fn decode_index_errors() {
    let mut rng = Rng::new(6);
    let p = Decode::random(&mut rng, DType::BF16, &[70, 10], 1, 2, 1, 576, 512, 64);
    let (cache, table, nb, mb) = p.page(&mut rng, 0);
    let sl = seqlens(&p);
    assert!(run_decode(&p, &cache, &table, &sl, nb, mb, false).is_ok());

    // A used entry equal to num_blocks.
    let mut bad = table.clone();
    bad[1] = nb as i32; // row 0, entry 1 (70 tokens use two blocks)
    match run_decode(&p, &cache, &bad, &sl, nb, mb, false) {
        Err(Error::IndexOutOfRange {
            arg,
            position,
            value,
            ..
        }) => {
            assert_eq!(arg, "block_table");
            assert_eq!(position, vec![0, 1]);
            assert_eq!(value, nb as i64);
        }
        other => panic!("expected IndexOutOfRange on block_table, got {other:?}"),
    }
    // A negative used entry.
    let mut bad = table.clone();
    bad[mb] = -1; // row 1, entry 0
    match run_decode(&p, &cache, &bad, &sl, nb, mb, false) {
        Err(Error::IndexOutOfRange { arg, position, .. }) => {
            assert_eq!(arg, "block_table");
            assert_eq!(position, vec![1, 0]);
        }
        other => panic!("expected IndexOutOfRange on block_table, got {other:?}"),
    }
    // An unused entry may hold anything.
    let mut unused = table.clone();
    unused[mb + 1] = -7;
    assert!(run_decode(&p, &cache, &unused, &sl, nb, mb, false).is_ok());

    // cache_seqlens beyond max_blocks · block_size.
    let mut long = sl.clone();
    long[1] = (mb * 64 + 1) as i32;
    match run_decode(&p, &cache, &table, &long, nb, mb, false) {
        Err(Error::IndexOutOfRange {
            arg,
            position,
            value,
            ..
        }) => {
            assert_eq!(arg, "cache_seqlens");
            assert_eq!(position, vec![1]);
            assert_eq!(value, (mb * 64 + 1) as i64);
        }
        other => panic!("expected IndexOutOfRange on cache_seqlens, got {other:?}"),
    }
    // Exactly max_blocks · block_size passes the length check but then uses
    // entries that hold 2^30.
    let mut full = sl.clone();
    full[1] = (mb * 64) as i32;
    match run_decode(&p, &cache, &table, &full, nb, mb, false) {
        Err(Error::IndexOutOfRange { arg, value, .. }) => {
            assert_eq!(arg, "block_table");
            assert_eq!(value, HUGE as i64);
        }
        other => panic!("expected IndexOutOfRange on block_table, got {other:?}"),
    }
    // Negative length.
    let mut neg = sl.clone();
    neg[0] = -1;
    match run_decode(&p, &cache, &table, &neg, nb, mb, false) {
        Err(Error::IndexOutOfRange { arg, value, .. }) => {
            assert_eq!(arg, "cache_seqlens");
            assert_eq!(value, -1);
        }
        other => panic!("expected IndexOutOfRange on cache_seqlens, got {other:?}"),
    }
}

#[test]
fn decode_lse_is_natural_log() {
    // One sequence of three keys, d = 2, dv = 1, scale 1: scores 1, 2, 3.
    let p = Decode {
        dtype: DType::F32,
        s_q: 1,
        h_q: 1,
        h_kv: 1,
        d: 2,
        dv: 1,
        block_size: 2,
        lens: vec![3],
        q: vec![1.0, 0.0],
        keys: vec![vec![1.0, 5.0, 2.0, 6.0, 3.0, 7.0]],
        scale: 1.0,
    };
    // Blocks in reverse order; unused slot NaN.
    let cache = vec![3.0, 7.0, f32::NAN, f32::NAN, 1.0, 5.0, 2.0, 6.0];
    let (out, lse) = run_decode(&p, &cache, &[1, 0], &[3], 2, 2, false).unwrap();
    let ln_sum = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert!((ln_sum - 3.40760596444438).abs() < 1e-14);
    assert_eq!(lse[0], ln_sum as f32);
    // log2 would give 4.916…; a base mix-up cannot pass.
    let o = (1.0 * (1f64 - ln_sum).exp()
        + 2.0 * (2f64 - ln_sum).exp()
        + 3.0 * (3f64 - ln_sum).exp()) as f32;
    assert!((o - 2.575_210_4).abs() < 1e-6);
    assert_eq!(out, vec![o]);
}

// ---------------------------------------------------------------- prefill

struct Prefill {
    t: usize,
    s: usize,
    h: usize,
    dn: usize,
    dr: usize,
    dc: usize,
    dv: usize,
    q_nope: Vec<f32>,
    q_pe: Vec<f32>,
    latent: Vec<f32>,
    k_pe: Vec<f32>,
    wkv_b: Vec<f32>,
    scale: f32,
}

impl Prefill {
    fn random(rng: &mut Rng) -> Self {
        let (t, s, h, dn, dr, dc, dv) = (5, 9, 3, 16, 8, 32, 16);
        let f = DType::F32;
        Prefill {
            t,
            s,
            h,
            dn,
            dr,
            dc,
            dv,
            q_nope: rng.vec(t * h * dn, 1.0, f),
            q_pe: rng.vec(t * h * dr, 1.0, f),
            latent: rng.vec(s * dc, 1.0, f),
            k_pe: rng.vec(s * dr, 1.0, f),
            wkv_b: rng.vec(h * (dn + dv) * dc, 0.5, f),
            scale: ((dn + dr) as f32).powf(-0.5),
        }
    }

    fn run(&self, form: MlaForm) -> Vec<f32> {
        let be = CpuRef::new();
        let f = DType::F32;
        let up = |shape: &[usize], v: &[f32]| be.upload(&HostTensor::from_f32(f, shape, v));
        let q_nope = up(&[self.t, self.h, self.dn], &self.q_nope).unwrap();
        let q_pe = up(&[self.t, self.h, self.dr], &self.q_pe).unwrap();
        let latent = up(&[self.s, self.dc], &self.latent).unwrap();
        let k_pe = up(&[self.s, self.dr], &self.k_pe).unwrap();
        let wkv_b = up(&[self.h * (self.dn + self.dv), self.dc], &self.wkv_b).unwrap();
        let mut out = be.alloc(f, &[self.t, self.h, self.dv]).unwrap();
        ops::run(
            &be,
            MlaPrefill {
                q_nope: &q_nope,
                q_pe: &q_pe,
                latent: &latent,
                k_pe: &k_pe,
                wkv_b: &wkv_b,
                out: &mut out,
                softmax_scale: self.scale,
                form,
            },
        )
        .expect("mla_prefill failed");
        be.download(&out).unwrap().to_f32_vec()
    }

    /// Naive form written plainly: expand K and V per head, dense causal
    /// softmax in f64.
    fn reference(&self) -> Vec<f64> {
        let (t_n, s_n, h_n, dn, dr, dc, dv) =
            (self.t, self.s, self.h, self.dn, self.dr, self.dc, self.dv);
        let w = |row: usize, c: usize| self.wkv_b[row * dc + c] as f64;
        let mut out = vec![0.0; t_n * h_n * dv];
        for h in 0..h_n {
            // k_nope [S, dn] and v [S, dv] for this head.
            let mut k = vec![vec![0.0f64; dn]; s_n];
            let mut v = vec![vec![0.0f64; dv]; s_n];
            for s in 0..s_n {
                for i in 0..dn {
                    for c in 0..dc {
                        k[s][i] += w(h * (dn + dv) + i, c) * self.latent[s * dc + c] as f64;
                    }
                }
                for i in 0..dv {
                    for c in 0..dc {
                        v[s][i] += w(h * (dn + dv) + dn + i, c) * self.latent[s * dc + c] as f64;
                    }
                }
            }
            for t in 0..t_n {
                let visible = s_n - t_n + t + 1;
                let mut scores = Vec::new();
                for s in 0..visible {
                    let mut acc = 0.0f64;
                    for i in 0..dn {
                        acc += self.q_nope[(t * h_n + h) * dn + i] as f64 * k[s][i];
                    }
                    for i in 0..dr {
                        acc +=
                            self.q_pe[(t * h_n + h) * dr + i] as f64 * self.k_pe[s * dr + i] as f64;
                    }
                    scores.push(acc * self.scale as f64);
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for (s, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp() / sum;
                    for i in 0..dv {
                        out[(t * h_n + h) * dv + i] += p * v[s][i];
                    }
                }
            }
        }
        out
    }
}

#[test]
fn prefill_forms_agree_and_match_reference() {
    let mut rng = Rng::new(7);
    let p = Prefill::random(&mut rng);
    let naive = p.run(MlaForm::Naive);
    let absorbed = p.run(MlaForm::Absorbed);
    let want = p.reference();
    for i in 0..want.len() {
        let (a, b, w) = (naive[i] as f64, absorbed[i] as f64, want[i]);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
            "[{i}] naive {a} vs absorbed {b}"
        );
        for (name, g) in [("naive", a), ("absorbed", b)] {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
                "[{i}] {name} {g} vs reference {w}"
            );
        }
    }
    // The output is not trivially small.
    assert!(want.iter().any(|x| x.abs() > 0.1));
}

#[test]
fn prefill_is_causal() {
    let mut rng = Rng::new(8);
    let p = Prefill::random(&mut rng);
    let (t_n, s_n, h_n, dv) = (p.t, p.s, p.h, p.dv);
    // Query j sits at position S − T + j = 4 + j; change row 6.
    let row = 6;
    for form in [MlaForm::Naive, MlaForm::Absorbed] {
        let base = p.run(form);
        let mut later = Prefill::random(&mut Rng::new(8));
        for c in 0..p.dc {
            later.latent[row * p.dc + c] += 0.75;
        }
        for c in 0..p.dr {
            later.k_pe[row * p.dr + c] -= 0.5;
        }
        let changed = later.run(form);
        for t in 0..t_n {
            let pos = s_n - t_n + t;
            let a = &base[t * h_n * dv..(t + 1) * h_n * dv];
            let b = &changed[t * h_n * dv..(t + 1) * h_n * dv];
            if pos < row {
                assert_eq!(a, b, "{form:?}: query {t} (position {pos}) saw row {row}");
            } else {
                assert_ne!(
                    a, b,
                    "{form:?}: query {t} (position {pos}) ignored row {row}"
                );
            }
        }
        // Changing row 0 changes every query.
        let mut early = Prefill::random(&mut Rng::new(8));
        for c in 0..p.dc {
            early.latent[c] = -early.latent[c];
        }
        let changed = early.run(form);
        for t in 0..t_n {
            assert_ne!(
                base[t * h_n * dv..(t + 1) * h_n * dv],
                changed[t * h_n * dv..(t + 1) * h_n * dv],
                "{form:?}: query {t} ignored row 0"
            );
        }
    }
}

#[test]
fn prefill_bf16_output_rounds_once() {
    // Same problem with a bf16 output: each element is the f64 result
    // rounded once, so within half a bf16 ulp of the reference.
    let mut rng = Rng::new(9);
    let p = Prefill::random(&mut rng);
    let want = p.reference();
    let be = CpuRef::new();
    let f = DType::F32;
    let up = |shape: &[usize], v: &[f32]| be.upload(&HostTensor::from_f32(f, shape, v)).unwrap();
    let q_nope = up(&[p.t, p.h, p.dn], &p.q_nope);
    let q_pe = up(&[p.t, p.h, p.dr], &p.q_pe);
    let latent = up(&[p.s, p.dc], &p.latent);
    let k_pe = up(&[p.s, p.dr], &p.k_pe);
    let wkv_b = up(&[p.h * (p.dn + p.dv), p.dc], &p.wkv_b);
    for form in [MlaForm::Naive, MlaForm::Absorbed] {
        let mut out = be.alloc(DType::BF16, &[p.t, p.h, p.dv]).unwrap();
        ops::run(
            &be,
            MlaPrefill {
                q_nope: &q_nope,
                q_pe: &q_pe,
                latent: &latent,
                k_pe: &k_pe,
                wkv_b: &wkv_b,
                out: &mut out,
                softmax_scale: p.scale,
                form,
            },
        )
        .unwrap();
        let got = be.download(&out).unwrap().to_f32_vec();
        check_out("prefill bf16", DType::BF16, &got, &want);
    }
}
