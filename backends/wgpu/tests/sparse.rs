//! DeepSeek-V3.2's ops on wgpu (docs/spec-v32.md §9, rope `layout = half`)
//! against `cpu-ref` on small adversarial inputs: odd sizes, a head count
//! that is not a multiple of the kernel's head tile, permuted block tables
//! with huge unused entries, 0xff (NaN) bytes in every cache token that must
//! not be read, −1 and past-`topk_length` slots, exact ties, NaN and ±0
//! logits. Index errors are deferred errors (next synchronize, once). The
//! catalogue (`deepport run --backend wgpu --profile v32`) judges the large
//! shapes; these checks cost seconds.
//!
//! Without an adapter every test prints why and passes, unless
//! `DEEPPORT_REQUIRE` names `wgpu`.

use deepport_core::backend::{Backend, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};
use deepport_testkit::compare::{assert_bytes, assert_close, assert_index_error, calc_diff};
use deepport_testkit::harness::{available, both, deferred_error, poisoned, run, up};
use deepport_testkit::Rng;
use deepport_wgpu::{Wgpu, WgpuOptions};

fn rng(seed: u64) -> Rng {
    Rng::salted(seed, 0x5eed_3232)
}

fn own() -> Option<Wgpu> {
    available("wgpu", Wgpu::with_options(WgpuOptions::default()))
}

fn i32s(shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_index(DType::I32, shape, v)
}

/// A random e4m3 code that is not NaN.
fn code(r: &mut Rng) -> u8 {
    loop {
        let c = (r.next_u64() & 0xff) as u8;
        if c & 0x7f != 0x7f {
            return c;
        }
    }
}

// ---- rope, layout = half ----------------------------------------------------------

#[test]
fn rope_half_matches_cpu_ref() {
    let Some(w) = own() else { return };
    let mut r = rng(1);
    for (shape, xd, yd) in [
        (vec![5usize, 3, 64], DType::BF16, DType::BF16),
        (vec![4, 2, 6], DType::F32, DType::F32),
        (vec![3, 129, 10], DType::F16, DType::BF16),
    ] {
        let n: usize = shape.iter().product();
        let x = HostTensor::from_f32(xd, &shape, &r.normals(n, 1.0));
        let pos: Vec<i64> = (0..shape[0] as i64).map(|t| t * 977 + 3).collect();
        let p = i32s(&[shape[0]], &pos);
        let cfg = RopeConfig {
            layout: RopeLayout::Half,
            ..Default::default()
        };
        let (got, want) = both(&w, &[&x, &p], |b, t| {
            let mut y = poisoned(b, yd, &shape);
            run(
                b,
                Rope {
                    x: &t[0],
                    positions: &t[1],
                    y: &mut y,
                    config: cfg,
                },
            )?;
            Ok(vec![y])
        })
        .expect("rope half runs");
        let xr = x.to_f32_vec();
        let d = shape[shape.len() - 1];
        assert_close(
            &format!("rope half {shape:?}"),
            &got[0],
            &want[0],
            |i, v| {
                let (c, row) = (i % d, i - i % d);
                let j = c % (d / 2);
                let ulp = match yd {
                    DType::F32 => 2f64.powi(-23),
                    _ => 2f64.powi(-8),
                };
                ulp * f64::from(v.abs())
                    + 2f64.powi(-21) * f64::from(xr[row + j].abs() + xr[row + j + d / 2].abs())
            },
        );
    }
}

// ---- cache_quant ------------------------------------------------------------------------

#[test]
fn cache_quant_is_bit_exact() {
    let Some(w) = own() else { return };
    let mut r = rng(2);
    for (layout, nb, bs, d, dt) in [
        (CacheLayout::Index, 3usize, 5usize, 128usize, DType::BF16),
        (CacheLayout::Index, 2, 3, 37, DType::F32),
        (CacheLayout::Latent, 2, 3, 576, DType::BF16),
        (CacheLayout::Latent, 1, 5, 576, DType::F32),
    ] {
        let mut xv: Vec<f32> = (0..nb * bs * d)
            .map(|i| r.normal() * 2f32.powi((i % 13) as i32 - 6))
            .collect();
        // An all-zero token: the amax floor.
        xv[..d].fill(0.0);
        let x = HostTensor::from_f32(dt, &[nb, bs, d], &xv);
        for ue8m0 in [false, true] {
            let shape = [nb, bs, layout.token_bytes(d)];
            let (got, want) = both(&w, &[&x], |b, t| {
                let mut c = poisoned(b, DType::U8, &shape);
                run(
                    b,
                    CacheQuant {
                        x: &t[0],
                        cache: &mut c,
                        layout,
                        ue8m0,
                    },
                )?;
                Ok(vec![c])
            })
            .expect("cache_quant runs");
            assert_bytes(
                &format!("cache_quant {layout:?} d={d} ue8m0={ue8m0}"),
                &got[0],
                &want[0],
            );
        }
    }
}

#[test]
fn cache_quant_reports_non_finite_keys() {
    let Some(w) = own() else { return };
    let mut xv = vec![1.0f32; 2 * 3 * 8];
    xv[13] = f32::NAN;
    let x = up(&w, &HostTensor::from_f32(DType::F32, &[2, 3, 8], &xv));
    let mut c = poisoned(&w, DType::U8, &[2, 3, 12]);
    let e = deferred_error(&w, "cache_quant(NaN)", || {
        run(
            &w,
            CacheQuant {
                x: &x,
                cache: &mut c,
                layout: CacheLayout::Index,
                ue8m0: false,
            },
        )
    })
    .expect("supported");
    assert!(e.to_string().contains('x'), "{e}");
}

// ---- indexer_logits -------------------------------------------------------------------------

/// Inputs of indexer_logits: (q, weights, kv_cache, context_lens, block_table).
fn logits_inputs(
    r: &mut Rng,
    (b, next_n, h, d, bs, max_blocks): (usize, usize, usize, usize, usize, usize),
    lens: &[i64],
) -> Vec<HostTensor> {
    let used: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(bs)).collect();
    let nb = used.iter().sum::<usize>() + 3;
    let perm = r.permutation(nb);
    let mut table = vec![i64::from(i32::MAX); b * max_blocks];
    let mut next = 0;
    let mut cache = vec![0xffu8; nb * bs * (d + 4)];
    for (i, &u) in used.iter().enumerate() {
        for j in 0..u {
            let blk = perm[next];
            next += 1;
            table[i * max_blocks + j] = blk as i64;
            let base = blk * bs * (d + 4);
            for off in 0..bs {
                if (j * bs + off) as i64 >= lens[i] {
                    continue; // never read: stays NaN
                }
                for c in 0..d {
                    cache[base + off * d + c] = code(r);
                }
                let s = r.range_f32(0.01, 0.2);
                let at = base + bs * d + off * 4;
                cache[at..at + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
    }
    vec![
        HostTensor::from_f32(
            DType::F8E4M3,
            &[b, next_n, h, d],
            &r.normals(b * next_n * h * d, 2.0),
        ),
        HostTensor::from_f32(
            DType::F32,
            &[b * next_n, h],
            &r.normals(b * next_n * h, 0.5),
        ),
        HostTensor::from_bytes(DType::U8, &[nb, bs, d + 4], cache).unwrap(),
        i32s(&[b], lens),
        i32s(&[b, max_blocks], &table),
    ]
}

fn run_logits(b: &dyn Backend, t: &[Tensor], rows: usize, max_len: usize) -> Result<Vec<Tensor>> {
    let mut l = poisoned(b, DType::F32, &[rows, max_len]);
    run(
        b,
        IndexerLogits {
            q: &t[0],
            weights: &t[1],
            kv_cache: &t[2],
            context_lens: &t[3],
            block_table: &t[4],
            logits: &mut l,
        },
    )?;
    Ok(vec![l])
}

#[test]
fn indexer_logits_matches_cpu_ref() {
    let Some(w) = own() else { return };
    let mut r = rng(3);
    for (dims, lens, max_len) in [
        (
            (2usize, 1usize, 4usize, 32usize, 7usize, 7usize),
            vec![37i64, 5],
            49usize,
        ),
        ((3, 2, 3, 64, 5, 30), vec![0, 1, 131], 140),
        ((2, 2, 8, 128, 64, 3), vec![65, 130], 150),
    ] {
        let inputs = logits_inputs(&mut r, dims, &lens);
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        let rows = dims.0 * dims.1;
        let (got, want) =
            both(&w, &refs, |b, t| run_logits(b, t, rows, max_len)).expect("indexer_logits runs");
        let g = got[0].to_f32_vec();
        let x = want[0].to_f32_vec();
        let fin: (Vec<f32>, Vec<f32>) = g
            .iter()
            .zip(&x)
            .filter(|(_, b)| b.is_finite())
            .map(|(&a, &b)| (a, b))
            .unzip();
        let rms = (fin.1.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()
            / fin.1.len().max(1) as f64)
            .sqrt();
        assert_close(
            &format!("indexer_logits {dims:?}"),
            &got[0],
            &want[0],
            |_, v| 1e-5 * f64::from(v.abs()) + 1e-5 * rms,
        );
        if !fin.1.is_empty() {
            assert!(calc_diff(&fin.0, &fin.1) < 1e-6);
        }
    }
}

#[test]
fn indexer_logits_windows_a_cache_beyond_the_binding_limit() {
    // 4 KiB bindings: the 51-block cache (256 bytes a block) is bound in
    // windows of 15 blocks, one dispatch each.
    let Some(w) = available(
        "wgpu",
        Wgpu::with_options(WgpuOptions {
            max_storage_binding: Some(4096),
            ..Default::default()
        }),
    ) else {
        return;
    };
    let mut r = rng(8);
    let dims = (2usize, 2usize, 3usize, 60usize, 4usize, 40usize);
    let inputs = logits_inputs(&mut r, dims, &[150, 37]);
    let refs: Vec<&HostTensor> = inputs.iter().collect();
    let (got, want) = both(&w, &refs, |b, t| run_logits(b, t, 4, 160)).expect("runs");
    assert_close("indexer_logits in windows", &got[0], &want[0], |_, v| {
        1e-5 * f64::from(v.abs()) + 1e-6
    });
}

#[test]
fn indexer_logits_reports_bad_blocks_and_lengths() {
    let Some(w) = own() else { return };
    let mut r = rng(4);
    let dims = (2usize, 1usize, 2usize, 16usize, 4usize, 3usize);
    let inputs = logits_inputs(&mut r, dims, &[9, 3]);
    // A used entry out of range (row 0 uses ⌈9/4⌉ = 3 entries; row 1's
    // unused entries stay huge), then a length past the table (cap 12).
    type Bad = (
        &'static str,
        [i64; 6],
        [i64; 2],
        &'static str,
        Vec<usize>,
        i64,
    );
    let cases: [Bad; 2] = [
        (
            "block",
            [0, 1, 99, 3, i64::from(i32::MAX), -7],
            [9, 3],
            "block_table",
            vec![0, 2],
            99,
        ),
        (
            "length",
            [0, 1, 2, 3, 4, 5],
            [13, 3],
            "context_lens",
            vec![0],
            13,
        ),
    ];
    for (what, bt, lens, arg, pos, value) in cases {
        let mut t: Vec<Tensor> = inputs.iter().map(|h| up(&w, h)).collect();
        t[3] = up(&w, &i32s(&[2], &lens));
        t[4] = up(&w, &i32s(&[2, 3], &bt));
        let e =
            deferred_error(&w, what, || run_logits(&w, &t, 2, 12).map(|_| ())).expect("supported");
        assert_index_error(what, e, ("indexer_logits", arg), &pos, value, None);
    }
}

// ---- indexer_topk ------------------------------------------------------------------------------

fn run_topk(b: &dyn Backend, t: &[Tensor], rows: usize, topk: usize) -> Result<Vec<Tensor>> {
    let mut o = poisoned(b, DType::I32, &[rows, topk]);
    run(
        b,
        IndexerTopk {
            logits: &t[0],
            lengths: &t[1],
            indices: &mut o,
        },
    )?;
    Ok(vec![o])
}

#[test]
fn indexer_topk_gives_cpu_refs_order() {
    let Some(w) = own() else { return };
    let mut r = rng(5);
    // Exact ties (few distinct values), NaN, ±0, −inf; a zero-length row,
    // rows shorter than topk; topk above n.
    for (rows, n, topk) in [(5usize, 300usize, 64usize), (3, 40, 64), (2, 2100, 2048)] {
        let mut v: Vec<f32> = (0..rows * n)
            .map(|_| (r.below(7) as f32 - 3.0) * 0.5)
            .collect();
        for i in (0..v.len()).step_by(17) {
            v[i] = [f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, r.normal()][i % 5];
        }
        let lens: Vec<i64> = (0..rows)
            .map(|i| match i {
                1 => 0,
                2 => (n / 3) as i64,
                _ => (n - i) as i64,
            })
            .collect();
        let l = HostTensor::from_f32(DType::F32, &[rows, n], &v);
        let ln = i32s(&[rows], &lens);
        let (got, want) =
            both(&w, &[&l, &ln], |b, t| run_topk(b, t, rows, topk)).expect("indexer_topk runs");
        // Ties are broken to the lower position and NaN ranks last, so the
        // order is defined: the same bytes.
        assert_bytes(
            &format!("indexer_topk {rows}x{n} k={topk}"),
            &got[0],
            &want[0],
        );
    }
}

#[test]
fn indexer_topk_reports_bad_lengths() {
    let Some(w) = own() else { return };
    let l = up(&w, &HostTensor::from_f32(DType::F32, &[2, 5], &[1.0; 10]));
    let ln = up(&w, &i32s(&[2], &[5, 6]));
    let e = deferred_error(&w, "topk(length)", || {
        run_topk(&w, &[l, ln], 2, 4).map(|_| ())
    })
    .expect("supported");
    assert_index_error(
        "topk(length)",
        e,
        ("indexer_topk", "lengths"),
        &[1],
        6,
        None,
    );
}

// ---- sparse_mla_decode ------------------------------------------------------------------------------

/// A latent cache of `slots` tokens; the tokens in `unread` are all 0xff.
fn latent_cache(r: &mut Rng, slots: usize, unread: &[usize]) -> Vec<u8> {
    let mut c = vec![0xffu8; slots * V32_TOKEN_BYTES];
    for t in 0..slots {
        if unread.contains(&t) {
            continue;
        }
        let tok = &mut c[t * V32_TOKEN_BYTES..(t + 1) * V32_TOKEN_BYTES];
        for b in tok[..V32_NOPE].iter_mut() {
            *b = code(r);
        }
        for g in 0..4 {
            let s = r.range_f32(0.002, 0.05);
            tok[V32_NOPE + 4 * g..V32_NOPE + 4 * g + 4].copy_from_slice(&s.to_le_bytes());
        }
        for i in 0..V32_ROPE {
            let v = half::bf16::from_f32(r.normal()).to_le_bytes();
            tok[528 + 2 * i..530 + 2 * i].copy_from_slice(&v);
        }
    }
    c
}

#[allow(clippy::too_many_arguments)]
fn run_sparse(
    b: &dyn Backend,
    t: &[Tensor],
    (batch, s_q, h_q): (usize, usize, usize),
    out_dt: DType,
    with_len: bool,
    with_sink: bool,
) -> Result<Vec<Tensor>> {
    let mut out = poisoned(b, out_dt, &[batch, s_q, h_q, V32_NOPE]);
    let mut lse = poisoned(b, DType::F32, &[batch, h_q, s_q]);
    run(
        b,
        SparseMlaDecode {
            q: &t[0],
            kcache: &t[1],
            indices: &t[2],
            topk_length: with_len.then(|| &t[3]),
            attn_sink: with_sink.then(|| &t[4]),
            out: &mut out,
            lse: &mut lse,
            softmax_scale: (V32_D as f32).powf(-0.5),
        },
    )?;
    Ok(vec![out, lse])
}

#[test]
fn sparse_mla_decode_matches_cpu_ref() {
    let Some(w) = own() else { return };
    decode_cases(
        &w,
        6,
        (4, 5),
        &[
            (2, 2, 5, 12, DType::BF16, true, true),
            (1, 3, 9, 20, DType::F32, false, false),
            (2, 1, 16, 9, DType::BF16, false, true),
        ],
    );
}

/// A cache of 60 slots (39 KiB) through 16 KiB bindings: windows of slots,
/// the softmax state carried between them.
#[test]
fn sparse_mla_decode_windows_a_large_cache() {
    let Some(w) = available(
        "wgpu",
        Wgpu::with_options(WgpuOptions {
            max_storage_binding: Some(16384),
            ..Default::default()
        }),
    ) else {
        return;
    };
    decode_cases(
        &w,
        8,
        (12, 5),
        &[
            (2, 1, 3, 40, DType::BF16, true, true),
            (1, 2, 2, 33, DType::F32, false, false),
        ],
    );
}

type DecodeCase = (usize, usize, usize, usize, DType, bool, bool);

fn decode_cases(w: &Wgpu, seed: u64, (nb, bs): (usize, usize), cases: &[DecodeCase]) {
    let mut r = rng(seed);
    let slots = nb * bs;
    let unread = [3usize, 7, 19];
    for &(batch, s_q, h_q, topk, qd, with_len, with_sink) in cases {
        let cache = latent_cache(&mut r, slots, &unread);
        let readable: Vec<i64> = (0..slots as i64)
            .filter(|s| !unread.contains(&(*s as usize)))
            .collect();
        let lens: Vec<i64> = (0..batch as i64)
            .map(|i| (topk as i64 - 3 * i).max(0))
            .collect();
        let mut idx = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            for s in 0..s_q {
                for k in 0..topk {
                    let past = with_len && k as i64 >= len;
                    idx.push(if past {
                        // Past topk_length: never read, never checked.
                        [-1, 1 << 30, unread[0] as i64][k % 3]
                    } else if (k + s) % 5 == 4 || (b == 1 && s == 0 && with_len) {
                        -1
                    } else {
                        readable[r.below(readable.len())]
                    });
                }
            }
        }
        let n = batch * s_q * h_q * V32_D;
        let inputs = [
            HostTensor::from_f32(qd, &[batch, s_q, h_q, V32_D], &r.normals(n, 1.0)),
            HostTensor::from_bytes(DType::U8, &[nb, bs, V32_TOKEN_BYTES], cache).unwrap(),
            i32s(&[batch, s_q, topk], &idx),
            i32s(&[batch], &lens),
            HostTensor::from_f32(DType::F32, &[h_q], &r.normals(h_q, 2.0)),
        ];
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        let out_dt = if qd == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let dims = (batch, s_q, h_q);
        let (got, want) = both(w, &refs, |b, t| {
            run_sparse(b, t, dims, out_dt, with_len, with_sink)
        })
        .expect("sparse_mla_decode runs");
        let what = format!("sparse_mla_decode {dims:?} topk={topk}");
        // FlashMLA's tolerances (spec-v32 §9.3).
        assert_close(&format!("{what} out"), &got[0], &want[0], |_, v| {
            1e-3f64.max(2.01 / 128.0 * f64::from(v.abs()))
        });
        assert!(
            calc_diff(&got[0].to_f32_vec(), &want[0].to_f32_vec()) < 5e-6,
            "{what}"
        );
        assert_close(&format!("{what} lse"), &got[1], &want[1], |_, v| {
            1e-6f64.max(8.01 / 65536.0 * f64::from(v.abs()))
        });
    }
}

#[test]
fn sparse_mla_decode_reports_bad_indices() {
    let Some(w) = own() else { return };
    let mut r = rng(7);
    let cache = latent_cache(&mut r, 6, &[]);
    let q = HostTensor::from_f32(
        DType::F32,
        &[1, 2, 2, V32_D],
        &r.normals(2 * 2 * V32_D, 1.0),
    );
    for (bad, at) in [(6i64, vec![0usize, 1, 2]), (-2, vec![0, 0, 1])] {
        let mut idx = vec![0i64, 1, 2, 3, 4, 5];
        idx[at[1] * 3 + at[2]] = bad;
        let t = vec![
            up(&w, &q),
            up(
                &w,
                &HostTensor::from_bytes(DType::U8, &[2, 3, V32_TOKEN_BYTES], cache.clone())
                    .unwrap(),
            ),
            up(&w, &i32s(&[1, 2, 3], &idx)),
            up(&w, &i32s(&[1], &[3])),
            up(&w, &HostTensor::from_f32(DType::F32, &[2], &[0.0, 0.0])),
        ];
        let e = deferred_error(&w, "sparse(index)", || {
            run_sparse(&w, &t, (1, 2, 2), DType::F32, false, false).map(|_| ())
        })
        .expect("supported");
        assert_index_error(
            "sparse(index)",
            e,
            ("sparse_mla_decode", "indices"),
            &at,
            bad,
            None,
        );
    }
    // topk_length out of range.
    let t = vec![
        up(&w, &q),
        up(
            &w,
            &HostTensor::from_bytes(DType::U8, &[2, 3, V32_TOKEN_BYTES], cache).unwrap(),
        ),
        up(&w, &i32s(&[1, 2, 3], &[0, 1, 2, 3, 4, 5])),
        up(&w, &i32s(&[1], &[4])),
        up(&w, &HostTensor::from_f32(DType::F32, &[2], &[0.0, 0.0])),
    ];
    let e = deferred_error(&w, "sparse(topk_length)", || {
        run_sparse(&w, &t, (1, 2, 2), DType::F32, true, false).map(|_| ())
    })
    .expect("supported");
    assert_index_error(
        "sparse(topk_length)",
        e,
        ("sparse_mla_decode", "topk_length"),
        &[0],
        4,
        None,
    );
}

// ---- sparse_mla_prefill ------------------------------------------------------------------------------

fn run_prefill(
    b: &dyn Backend,
    t: &[Tensor],
    (s_q, h_q): (usize, usize),
    out_dt: DType,
    with_len: bool,
    with_sink: bool,
) -> Result<Vec<Tensor>> {
    let mut out = poisoned(b, out_dt, &[s_q, h_q, V32_NOPE]);
    let mut maxl = poisoned(b, DType::F32, &[s_q, h_q]);
    let mut lse = poisoned(b, DType::F32, &[s_q, h_q]);
    run(
        b,
        SparseMlaPrefill {
            q: &t[0],
            kv: &t[1],
            indices: &t[2],
            topk_length: with_len.then(|| &t[3]),
            attn_sink: with_sink.then(|| &t[4]),
            out: &mut out,
            max_logits: &mut maxl,
            lse: &mut lse,
            softmax_scale: 0.5,
        },
    )?;
    Ok(vec![out, maxl, lse])
}

/// `(s_q, s_kv, h_q, topk, d_qk, dtype, topk_length, sink)`.
type PrefillCase = (usize, usize, usize, usize, usize, DType, bool, bool);

/// FlashMLA's invalid index values: negative, `s_kv` and far beyond.
fn invalid(s_kv: usize, k: usize) -> i64 {
    [
        -1,
        s_kv as i64,
        i32::MAX as i64,
        i32::MIN as i64,
        -123_456,
        114_514,
    ][k % 6]
}

/// Tokens 1 and `s_kv − 2` are NaN and named only past `topk_length`;
/// without `topk_length` query 0 has only invalid slots; about one slot in
/// five is invalid; duplicates happen; the sink has +inf and −inf heads.
fn prefill_cases(w: &Wgpu, seed: u64, cases: &[PrefillCase]) {
    let mut r = rng(seed);
    for &(s_q, s_kv, h_q, topk, d, dt, with_len, with_sink) in cases {
        let unread = [1usize, s_kv - 2];
        let readable: Vec<i64> = (0..s_kv as i64)
            .filter(|t| !unread.contains(&(*t as usize)))
            .collect();
        let lens: Vec<i64> = (0..s_q)
            .map(|s| [topk, 0, topk / 2 + 1, 3.min(topk)][s % 4] as i64)
            .collect();
        let mut idx = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            for k in 0..topk {
                idx.push(if with_len && k as i64 >= len {
                    // Past topk_length: never read.
                    [-1, unread[0] as i64, readable[r.below(readable.len())]][k % 3]
                } else if (s == 0 && !with_len) || (k + s) % 5 == 4 {
                    invalid(s_kv, k + s)
                } else {
                    readable[r.below(readable.len())]
                });
            }
        }
        let mut kv = r.normals(s_kv * d, 0.3);
        for &t in &unread {
            kv[t * d..(t + 1) * d].fill(f32::NAN);
        }
        let mut sink = r.normals(h_q, 2.0);
        sink[0] = f32::INFINITY;
        if h_q > 1 {
            sink[1] = f32::NEG_INFINITY;
        }
        let inputs = [
            HostTensor::from_f32(dt, &[s_q, h_q, d], &r.normals(s_q * h_q * d, 0.3)),
            HostTensor::from_f32(dt, &[s_kv, 1, d], &kv),
            i32s(&[s_q, 1, topk], &idx),
            i32s(&[s_q], &lens),
            HostTensor::from_f32(DType::F32, &[h_q], &sink),
        ];
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        let out_dt = if dt == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let (got, want) = both(w, &refs, |b, t| {
            run_prefill(b, t, (s_q, h_q), out_dt, with_len, with_sink)
        })
        .expect("sparse_mla_prefill runs");
        let what =
            format!("sparse_mla_prefill s_q={s_q} s_kv={s_kv} h_q={h_q} topk={topk} d={d} {dt}");
        // FlashMLA's tolerances (spec-v32 §9.7).
        assert_close(&format!("{what} out"), &got[0], &want[0], |_, v| {
            8e-4f64.max(3.01 / 128.0 * f64::from(v.abs()))
        });
        assert!(
            calc_diff(&got[0].to_f32_vec(), &want[0].to_f32_vec()) < 7e-6,
            "{what}"
        );
        for (i, name) in [(1, "max_logits"), (2, "lse")] {
            assert_close(&format!("{what} {name}"), &got[i], &want[i], |_, v| {
                1e-6f64.max(2.01 / 65536.0 * f64::from(v.abs()))
            });
        }
    }
}

#[test]
fn sparse_mla_prefill_matches_cpu_ref() {
    let Some(w) = own() else { return };
    prefill_cases(
        &w,
        9,
        &[
            // All-invalid query 0, invalid values, ±inf sinks, h_q not a
            // multiple of the head tile.
            (5, 40, 5, 16, V32_D, DType::BF16, false, true),
            // topk > s_kv, topk_length (0, full, partial).
            (4, 9, 9, 24, V32_D, DType::F32, true, false),
            // d_qk = 512 (K = V), f16, both options.
            (4, 33, 16, 20, V32_NOPE, DType::F16, true, true),
        ],
    );
}

/// A KV beyond 16 KiB bindings: windows of tokens, the softmax state
/// carried between them.
#[test]
fn sparse_mla_prefill_windows_a_large_kv() {
    let Some(w) = available(
        "wgpu",
        Wgpu::with_options(WgpuOptions {
            max_storage_binding: Some(16384),
            ..Default::default()
        }),
    ) else {
        return;
    };
    prefill_cases(
        &w,
        10,
        &[
            (2, 40, 3, 24, V32_D, DType::BF16, true, true),
            (2, 30, 2, 16, V32_NOPE, DType::F32, false, false),
        ],
    );
}

#[test]
fn sparse_mla_prefill_reports_bad_lengths() {
    let Some(w) = own() else { return };
    let mut r = rng(11);
    let t = vec![
        up(
            &w,
            &HostTensor::from_f32(DType::F32, &[2, 1, V32_NOPE], &r.normals(2 * V32_NOPE, 1.0)),
        ),
        up(
            &w,
            &HostTensor::from_f32(DType::F32, &[4, 1, V32_NOPE], &r.normals(4 * V32_NOPE, 1.0)),
        ),
        up(&w, &i32s(&[2, 1, 3], &[0, 1, 2, 3, -1, 9])),
        up(&w, &i32s(&[2], &[3, 4])),
    ];
    let e = deferred_error(&w, "prefill(topk_length)", || {
        run_prefill(&w, &t, (2, 1), DType::F32, true, false).map(|_| ())
    })
    .expect("supported");
    assert_index_error(
        "prefill(topk_length)",
        e,
        ("sparse_mla_prefill", "topk_length"),
        &[1],
        4,
        None,
    );
}

/// Throughput of `sparse_mla_decode` on one shape (not a test: run with
/// `DEEPPORT_SPARSE_BENCH=b,s_q,h_q,topk cargo test --release -p
/// deepport-wgpu --test sparse -- --ignored --nocapture decode_throughput`).
/// Prints GMAC/s (q·K and p·V: h_q·topk·(576 + 512) per query row).
#[test]
#[ignore = "a throughput probe, not a check: set DEEPPORT_SPARSE_BENCH=b,s_q,h_q,topk and run with --ignored (see the comment above)"]
fn decode_throughput() {
    let Ok(shape) = std::env::var("DEEPPORT_SPARSE_BENCH") else {
        return;
    };
    let v: Vec<usize> = shape
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    let (batch, s_q, h_q, topk) = (v[0], v[1], v[2], v[3]);
    let Some(w) = own() else { return };
    let mut r = rng(12);
    let (nb, bs) = ((topk * batch).div_ceil(64), 64usize);
    let cache = latent_cache(&mut r, nb * bs, &[]);
    let idx: Vec<i64> = (0..batch * s_q * topk)
        .map(|_| r.below(nb * bs) as i64)
        .collect();
    let n = batch * s_q * h_q * V32_D;
    let t = vec![
        up(
            &w,
            &HostTensor::from_f32(DType::BF16, &[batch, s_q, h_q, V32_D], &r.normals(n, 1.0)),
        ),
        up(
            &w,
            &HostTensor::from_bytes(DType::U8, &[nb, bs, V32_TOKEN_BYTES], cache).unwrap(),
        ),
        up(&w, &i32s(&[batch, s_q, topk], &idx)),
        up(&w, &i32s(&[batch], &vec![topk as i64; batch])),
        up(
            &w,
            &HostTensor::from_f32(DType::F32, &[h_q], &r.normals(h_q, 1.0)),
        ),
    ];
    let macs = (batch * s_q * h_q * topk * (V32_D + V32_NOPE)) as f64;
    let mut times = Vec::new();
    for i in 0..4 {
        let t0 = std::time::Instant::now();
        run_sparse(&w, &t, (batch, s_q, h_q), DType::BF16, false, true).expect("runs");
        w.synchronize().expect("sync");
        let s = t0.elapsed().as_secs_f64();
        if i > 0 {
            times.push(s);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    println!(
        "sparse_mla_decode b={batch} s_q={s_q} h_q={h_q} topk={topk}: {med:.3} s, {:.3} GMAC/s (times {times:?})",
        macs / med / 1e9
    );
}

/// `s_kv = 0`: every index is invalid (0 included), every row is empty.
#[test]
fn sparse_mla_prefill_without_keys() {
    let Some(w) = own() else { return };
    let mut r = rng(13);
    let inputs = [
        HostTensor::from_f32(DType::BF16, &[2, 2, V32_D], &r.normals(2 * 2 * V32_D, 1.0)),
        HostTensor::from_f32(DType::BF16, &[0, 1, V32_D], &[]),
        i32s(&[2, 1, 4], &[0, -1, 1, 5, 0, 0, 2, -7]),
        i32s(&[2], &[4, 4]),
        HostTensor::from_f32(DType::F32, &[2], &[0.5, -1.0]),
    ];
    let refs: Vec<&HostTensor> = inputs.iter().collect();
    let (got, want) = both(&w, &refs, |b, t| {
        run_prefill(b, t, (2, 2), DType::BF16, false, true)
    })
    .expect("sparse_mla_prefill runs");
    for i in 0..3 {
        assert_bytes("prefill s_kv = 0", &got[i], &want[i]);
    }
}
