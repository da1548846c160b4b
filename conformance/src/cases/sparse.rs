//! DeepSeek-V3.2 sparse-attention families (docs/spec-v32.md §9):
//! `indexer_logits` (DeepGEMM `fp8_paged_mqa_logits`), `indexer_topk`
//! (judged as sets with near-tie bands), `sparse_mla_decode` (FlashMLA
//! sparse decode over the 656-byte FP8 latent cache), `sparse_mla_prefill`
//! (FlashMLA sparse prefill over a plain latent KV) and `cache_quant`
//! (both cache writers, bit-exact bytes).
//!
//! Inputs carry the adversarial features of DeepSeek's tests: permuted
//! block tables with huge unused entries, all-0xff (NaN) bytes in every
//! cache token that must not be read, odd block sizes, zero-length
//! sequences, all-invalid index rows and scales that are not powers of two.

use super::gen::{self, NormalStream};
use super::judging::{FamilyJudge, Judging};
use super::{def, op_case, opt, req, Case, Family, KeyKind, ParamMap, FLOAT_DTYPES, P};
use crate::judge::Check;
use crate::opspec::{Arg, Outputs};
use crate::rng::Rng;
use crate::types::{CaseSpec, Metric, Tolerance};
use deepport_core::formats::{f32_to_e4m3, round_bf16, ue8m0_round_up};
use deepport_core::ops::{OpKind, V32_D, V32_NOPE, V32_ROPE, V32_TOKEN_BYTES};
use deepport_core::{DType, HostTensor};
use std::collections::BTreeSet;
use std::sync::Arc;

use KeyKind::{Flag, Int, Text};

/// Unused block-table entries.
const HUGE: i32 = (1 << 30) + 7;

fn k_logits(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::IndexerLogits]
}
fn k_topk(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::IndexerTopk]
}
fn k_decode(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::SparseMlaDecode]
}
fn k_prefill(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::SparseMlaPrefill]
}
fn o_prefill(_: &ParamMap) -> Vec<&'static str> {
    vec!["out", "max_logits", "lse"]
}
fn k_quant(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::CacheQuant]
}
fn o_logits(_: &ParamMap) -> Vec<&'static str> {
    vec!["logits"]
}
fn o_topk(_: &ParamMap) -> Vec<&'static str> {
    vec!["indices"]
}
fn o_decode(_: &ParamMap) -> Vec<&'static str> {
    vec!["out", "lse"]
}
fn o_quant(_: &ParamMap) -> Vec<&'static str> {
    vec!["cache"]
}

/// Sequence lengths: `lens` (`0/1/77`) or `s_k` each, `varlen` spreading
/// them as FlashMLA does (`N(s_k, s_k/2)`, at least `min`), `zero` setting
/// sequence 0 and about a quarter of the others to 0.
fn lengths(p: &P, rng: &mut Rng, b: usize, min: usize) -> Result<Vec<usize>, String> {
    let mut lens = match p.ints("lens")? {
        Some(v) if v.len() == b => v,
        Some(v) => return Err(format!("lens has {} entries for b = {b}", v.len())),
        None => {
            let s_k = p.opt_int("s_k")?.ok_or("the case needs `s_k` or `lens`")?;
            let varlen = p.flag("varlen")?;
            (0..b)
                .map(|_| {
                    if varlen {
                        let x = s_k as f64 + f64::from(rng.normal()) * s_k as f64 / 2.0;
                        (x.max(0.0) as usize).max(min)
                    } else {
                        s_k
                    }
                })
                .collect()
        }
    };
    if p.flag("zero")? {
        for (i, l) in lens.iter_mut().enumerate() {
            if i == 0 || rng.below(4) == 0 {
                *l = 0;
            }
        }
    }
    Ok(lens)
}

/// A paged layout of `lens`: a permuted block table (one extra unused
/// column per row, unused entries huge), three unused blocks, and which
/// cache slots hold a token.
struct Paged {
    table: Vec<i32>,
    max_blocks: usize,
    num_blocks: usize,
    valid: Vec<bool>,
}

fn paged(rng: &mut Rng, lens: &[usize], block: usize) -> Paged {
    let used: Vec<usize> = lens.iter().map(|&l| l.div_ceil(block)).collect();
    let max_blocks = used.iter().copied().max().unwrap_or(0) + 1;
    let num_blocks = used.iter().sum::<usize>() + 3;
    let perm = rng.permutation(num_blocks);
    let mut table = vec![HUGE; lens.len() * max_blocks];
    let mut valid = vec![false; num_blocks * block];
    let mut next = 0;
    for (i, &u) in used.iter().enumerate() {
        for j in 0..u {
            let blk = perm[next];
            next += 1;
            table[i * max_blocks + j] = blk as i32;
            let filled = (lens[i] - j * block).min(block);
            valid[blk * block..blk * block + filled].fill(true);
        }
    }
    Paged {
        table,
        max_blocks,
        num_blocks,
        valid,
    }
}

/// A positive scale: a power of two with `ue8m0`, else a value that is not
/// one (`2^e · (1 + u)`, `u ∈ [0.05, 0.95]`).
fn scale(rng: &mut Rng, ue8m0: bool) -> f32 {
    let e = rng.below(7) as i32 - 10;
    let base = 2f32.powi(e);
    if ue8m0 {
        base
    } else {
        base * (1.0 + rng.range_f32(0.05, 0.95))
    }
}

/// The e4m3 byte of a normal value times 64 (never NaN).
fn e4m3_byte(normal: f32) -> u8 {
    f32_to_e4m3(normal * 64.0)
}

// ---- indexer_logits ---------------------------------------------------------

pub static INDEXER_LOGITS: Family = Family {
    name: "indexer_logits",
    keys: &[
        req("b", Int),
        def("next_n", Int, "1"),
        def("h", Int, "64"),
        def("d", Int, "128"),
        opt("s_k", Int),
        opt("lens", Text(&[])),
        def("block", Int, "64"),
        def("varlen", Flag, "0"),
        def("zero", Flag, "0"),
        def("ue8m0", Flag, "0"),
    ],
    outputs: o_logits,
    ops: k_logits,
    source: super::generated,
    build: build_logits,
};

fn build_logits(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (b, next_n, h, d, block) = (
        p.int("b")?,
        p.int("next_n")?,
        p.int("h")?,
        p.int("d")?,
        p.int("block")?,
    );
    let ue8m0 = p.flag("ue8m0")?;
    let mut rng = Rng::new(spec.seed);
    let lens = lengths(&p, &mut rng, b, next_n)?;
    let pg = paged(&mut rng, &lens, block);
    let row = block * (d + 4);
    let mut cache = vec![0xffu8; pg.num_blocks * row];
    // Each valid slot: `d` values of one normal stream over `rng` (in slot
    // order) and a scale from its own generator; filled a block at a time
    // in parallel (`gen::fill_rows_from_stream`).
    let mut srng = Rng::new(spec.seed ^ 0x5ca1e);
    let scales: Vec<f32> = pg
        .valid
        .iter()
        .map(|&v| if v { scale(&mut srng, ue8m0) } else { 0.0 })
        .collect();
    let valid = &pg.valid;
    gen::fill_rows_from_stream(
        &mut rng,
        1.0,
        &mut cache,
        row,
        |blk| (0..block).filter(|o| valid[blk * block + o]).count() * d,
        |blk, g, bytes| {
            for off in (0..block).filter(|o| valid[blk * block + o]) {
                for c in 0..d {
                    bytes[off * d + c] = e4m3_byte(g.next_value());
                }
                let at = block * d + off * 4;
                bytes[at..at + 4].copy_from_slice(&scales[blk * block + off].to_le_bytes());
            }
        },
    );
    let q = gen::fp8(&mut rng, DType::F8E4M3, &[b, next_n, h, d]);
    let weights = gen::normal(
        &mut rng,
        DType::F32,
        &[b * next_n, h],
        (h as f32).powf(-0.5),
    );
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    op_case(
        spec,
        "indexer-logits",
        vec![
            ("q", q),
            ("weights", weights),
            (
                "kv_cache",
                HostTensor::from_bytes(DType::U8, &[pg.num_blocks, block, d + 4], cache)
                    .map_err(|e| e.to_string())?,
            ),
            ("context_lens", HostTensor::from_i32(&[b], &lens_i)),
            (
                "block_table",
                HostTensor::from_i32(&[b, pg.max_blocks], &pg.table),
            ),
        ],
        vec![],
        Judging::new(spec).into_fn(),
    )
}

// ---- indexer_topk -----------------------------------------------------------

pub static INDEXER_TOPK: Family = Family {
    name: "indexer_topk",
    keys: &[
        req("rows", Int),
        req("n", Int),
        def("topk", Int, "2048"),
        opt("lens", Text(&[])),
        def("zero", Flag, "0"),
        def("ties", Flag, "0"),
    ],
    outputs: o_topk,
    ops: k_topk,
    source: super::generated,
    build: build_topk,
};

/// Relative width of a near-tie band (SPEC §6's routing rule).
const TIE_REL: f32 = 1e-6;

/// The near-tie band of each row: the positions whose logit lies within
/// [`TIE_REL`] of the k-th largest, when the band straddles the cut (some
/// selected, some not); empty otherwise.
fn tie_bands(logits: &[f32], n: usize, lens: &[usize], topk: usize) -> Vec<Vec<i64>> {
    lens.iter()
        .enumerate()
        .map(|(r, &len)| {
            let k = topk.min(len);
            if k == 0 || k == len {
                return Vec::new();
            }
            let row = &logits[r * n..r * n + len];
            let mut v: Vec<f32> = row.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            let cut = v[k - 1];
            let tol = TIE_REL * cut.abs().max(f32::MIN_POSITIVE);
            if (v[k] - cut).abs() > tol {
                return Vec::new();
            }
            (0..len)
                .filter(|&t| (row[t] - cut).abs() <= tol)
                .map(|t| t as i64)
                .collect()
        })
        .collect()
}

/// Judges `indices` as sets per row: the same number of −1 slots, distinct
/// positions, and the same set as the reference except for swaps inside
/// the row's near-tie band (reported, not failed).
fn judge_topk(
    bands: &[Vec<i64>],
    name: &str,
    t: &Tolerance,
    a: &Outputs,
    r: &Outputs,
) -> Vec<Check> {
    let metric = format!("{name}.set_mismatch");
    let (Some(ia), Some(ir)) = (a.get(name), r.get(name)) else {
        return vec![Check::broken(format!("{name}.present"), "missing indices")];
    };
    if ia.shape() != ir.shape() || ia.dtype().is_float() || ir.shape().len() != 2 {
        return vec![Check::broken(
            format!("{name}.layout"),
            format!(
                "got {} {:?}, reference {} {:?}",
                ia.dtype(),
                ia.shape(),
                ir.dtype(),
                ir.shape()
            ),
        )];
    }
    let topk = ir.shape()[1];
    let (va, vr) = (ia.to_i64_vec(), ir.to_i64_vec());
    let (mut bad, mut excused) = (0usize, 0usize);
    let mut first = None;
    for (row, (ra, rr)) in va
        .chunks(topk.max(1))
        .zip(vr.chunks(topk.max(1)))
        .enumerate()
    {
        let sa: BTreeSet<i64> = ra.iter().copied().filter(|&x| x != -1).collect();
        let sr: BTreeSet<i64> = rr.iter().copied().filter(|&x| x != -1).collect();
        let na = ra.iter().filter(|&&x| x != -1).count();
        let nr = rr.iter().filter(|&&x| x != -1).count();
        let ok_shape = na == sa.len() && na == nr && sa.iter().all(|&x| x >= 0);
        let band = bands.get(row).map(|b| b.as_slice()).unwrap_or(&[]);
        let diff_ok = sa.symmetric_difference(&sr).all(|x| band.contains(x));
        if ok_shape && sa == sr {
            continue;
        }
        if ok_shape && diff_ok {
            excused += 1;
            continue;
        }
        bad += 1;
        first.get_or_insert(row);
    }
    let detail = match first {
        Some(row) => format!(
            "{bad} rows select another set; row {row}: got {:?}, reference {:?}",
            &va[row * topk..(row + 1) * topk]
                .iter()
                .take(16)
                .collect::<Vec<_>>(),
            &vr[row * topk..(row + 1) * topk]
                .iter()
                .take(16)
                .collect::<Vec<_>>()
        ),
        None if excused > 0 => format!("{excused} near-tie rows differ inside their tie band"),
        None => String::new(),
    };
    let passed = bad as f64 <= t.pass;
    vec![Check::new(metric, bad as f64, t.pass, passed, detail).with_worst(first.map(|r| vec![r]))]
}

fn build_topk(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (rows, n, topk) = (p.int("rows")?, p.int("n")?, p.int("topk")?);
    let mut rng = Rng::new(spec.seed);
    let mut lens = match p.ints("lens")? {
        Some(v) if v.len() == rows => v,
        Some(v) => return Err(format!("lens has {} entries for rows = {rows}", v.len())),
        // Causal windows, as in prefill: row r sees n − rows + r + 1 positions.
        None => (0..rows)
            .map(|r| (n + r + 1).saturating_sub(rows).min(n))
            .collect(),
    };
    if p.flag("zero")? {
        for (i, l) in lens.iter_mut().enumerate() {
            if i == 0 || rng.below(4) == 0 {
                *l = 0;
            }
        }
    }
    let ties = p.flag("ties")?;
    let mut logits = gen::normals(&mut rng, rows * n, 1.0);
    for (r, &len) in lens.iter().enumerate() {
        for (t, v) in logits[r * n..(r + 1) * n].iter_mut().enumerate() {
            if t >= len {
                *v = f32::NEG_INFINITY;
            } else if ties {
                // Few distinct values: many exact ties at the cut.
                *v = (*v * 4.0).round() / 4.0;
            }
        }
    }
    let bands = tie_bands(&logits, n, &lens, topk);
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let judge = FamilyJudge {
        metric: Metric::SetEquality,
        companion_of: |_| None,
        judge: Arc::new(move |name, t, a, r| judge_topk(&bands, name, t, a, r)),
    };
    op_case(
        spec,
        "indexer-topk",
        vec![
            (
                "logits",
                HostTensor::from_f32(DType::F32, &[rows, n], &logits),
            ),
            ("lengths", HostTensor::from_i32(&[rows], &lens_i)),
        ],
        vec![("topk", Arg::Int(topk))],
        Judging::new(spec).with(judge).into_fn(),
    )
}

// ---- sparse_mla_decode -------------------------------------------------------

pub static SPARSE_MLA_DECODE: Family = Family {
    name: "sparse_mla_decode",
    keys: &[
        req("b", Int),
        req("s_q", Int),
        req("h_q", Int),
        req("topk", Int),
        opt("s_k", Int),
        opt("lens", Text(&[])),
        def("block", Int, "64"),
        def("varlen", Flag, "0"),
        def("zero", Flag, "0"),
        def("invalid", Flag, "0"),
        def("sink", Flag, "0"),
        def("topk_len", Flag, "0"),
        def("ue8m0", Flag, "1"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_decode,
    ops: k_decode,
    source: super::generated,
    build: build_decode,
};

fn build_decode(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (b, s_q, h_q, topk, block) = (
        p.int("b")?,
        p.int("s_q")?,
        p.int("h_q")?,
        p.int("topk")?,
        p.int("block")?,
    );
    let (ue8m0, all_invalid) = (p.flag("ue8m0")?, p.flag("invalid")?);
    let dtype = p.dtype("dtype")?;
    let mut rng = Rng::new(spec.seed);
    let lens = lengths(&p, &mut rng, b, 1)?;
    let pg = paged(&mut rng, &lens, block);
    let slots = pg.num_blocks * block;
    let mut cache = vec![0xffu8; slots * V32_TOKEN_BYTES];
    // Each valid slot: 512 e4m3 values then 64 bf16 RoPE values of one
    // normal stream over `rng` (in slot order), and four scales from their
    // own generator; filled in parallel (`gen::fill_rows_from_stream`).
    let mut srng = Rng::new(spec.seed ^ 0x5ca1e);
    let groups = V32_NOPE / 128;
    let scales: Vec<f32> = pg
        .valid
        .iter()
        .flat_map(|&v| {
            let s: Vec<f32> = (0..groups)
                .map(|_| {
                    if v {
                        scale(&mut srng, ue8m0) * 8.0
                    } else {
                        0.0
                    }
                })
                .collect();
            s
        })
        .collect();
    let valid = &pg.valid;
    gen::fill_rows_from_stream(
        &mut rng,
        1.0,
        &mut cache,
        V32_TOKEN_BYTES,
        |slot| if valid[slot] { V32_NOPE + V32_ROPE } else { 0 },
        |slot, g, t| {
            if !valid[slot] {
                return;
            }
            for c in t[..V32_NOPE].iter_mut() {
                *c = e4m3_byte(g.next_value());
            }
            for (s, v) in scales[slot * groups..(slot + 1) * groups]
                .iter()
                .enumerate()
            {
                t[V32_NOPE + 4 * s..V32_NOPE + 4 * s + 4].copy_from_slice(&v.to_le_bytes());
            }
            let rope = V32_NOPE + 4 * groups;
            for i in 0..V32_ROPE {
                let v = ((round_bf16(g.next_value()).to_bits() >> 16) as u16).to_le_bytes();
                t[rope + 2 * i..rope + 2 * i + 2].copy_from_slice(&v);
            }
        },
    );
    // Per (b, s): `topk` distinct positions of the sequence (FlashMLA's
    // randperm), −1 where the sequence is shorter, mapped to cache slots.
    // With `invalid`, every index of sequence 0 is −1 (FlashMLA's
    // all-invalid rows) and about a quarter of the others' are −1 too.
    let mut idx = vec![-1i32; b * s_q * topk];
    for bi in 0..b {
        if all_invalid && bi == 0 {
            continue;
        }
        for s in 0..s_q {
            let perm = rng.permutation(lens[bi]);
            for (t, &pos) in perm.iter().take(topk).enumerate() {
                if all_invalid && rng.below(4) == 0 {
                    continue;
                }
                let blk = pg.table[bi * pg.max_blocks + pos / block];
                idx[(bi * s_q + s) * topk + t] = blk * block as i32 + (pos % block) as i32;
            }
        }
    }
    let q = gen::normal(&mut rng, dtype, &[b, s_q, h_q, V32_D], 1.0);
    let mut tensors = vec![
        ("q", q),
        (
            "kcache",
            HostTensor::from_bytes(DType::U8, &[pg.num_blocks, block, V32_TOKEN_BYTES], cache)
                .map_err(|e| e.to_string())?,
        ),
        ("indices", HostTensor::from_i32(&[b, s_q, topk], &idx)),
    ];
    if p.flag("topk_len")? {
        let l: Vec<i32> = (0..b).map(|_| rng.below(topk + 1) as i32).collect();
        tensors.push(("topk_length", HostTensor::from_i32(&[b], &l)));
    }
    if p.flag("sink")? {
        tensors.push(("attn_sink", gen::normal(&mut rng, DType::F32, &[h_q], 2.0)));
    }
    op_case(
        spec,
        "sparse-mla-decode",
        tensors,
        vec![],
        Judging::new(spec).into_fn(),
    )
}

// ---- sparse_mla_prefill ------------------------------------------------------

pub static SPARSE_MLA_PREFILL: Family = Family {
    name: "sparse_mla_prefill",
    keys: &[
        req("s_q", Int),
        req("s_kv", Int),
        req("h_q", Int),
        req("topk", Int),
        def("d_qk", Int, "576"),
        def("invalid", Flag, "0"),
        def("sink", Flag, "0"),
        def("topk_len", Flag, "0"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_prefill,
    ops: k_prefill,
    source: super::generated,
    build: build_prefill,
};

/// FlashMLA's invalid index values (`tests/lib.py`): negative, `s_kv`
/// itself and far beyond it.
fn invalid_index(rng: &mut Rng, s_kv: usize) -> i32 {
    let c = [
        i32::MIN,
        -123_456,
        -1,
        s_kv as i32,
        114_514,
        1_919_810,
        2_147_480_000,
        i32::MAX,
    ];
    c[rng.below(c.len())]
}

fn build_prefill(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (s_q, s_kv, h_q, topk, d_qk) = (
        p.int("s_q")?,
        p.int("s_kv")?,
        p.int("h_q")?,
        p.int("topk")?,
        p.int("d_qk")?,
    );
    let dtype = p.dtype("dtype")?;
    let mut rng = Rng::new(spec.seed);
    // FlashMLA's inputs: N(0, 0.1²) plus one offset in ±0.05 per tensor.
    let values = |n: usize, rng: &mut Rng| {
        let off = rng.range_f32(-0.05, 0.05);
        let mut g = NormalStream::new(rng, 0.1);
        (0..n).map(|_| g.next_value() + off).collect::<Vec<f32>>()
    };
    let q = values(s_q * h_q * d_qk, &mut rng);
    let mut kv = values(s_kv * d_qk, &mut rng);
    // Per query: `topk` distinct tokens (FlashMLA's randperm), the slots
    // past s_kv filled with FlashMLA's invalid values; with `invalid`,
    // query 0 and about one in eight others have only invalid slots.
    let mut idx = vec![0i32; s_q * topk];
    for s in 0..s_q {
        let row = &mut idx[s * topk..(s + 1) * topk];
        let perm = rng.permutation(s_kv);
        for (t, slot) in row.iter_mut().enumerate() {
            *slot = match perm.get(t) {
                Some(&v) => v as i32,
                None => invalid_index(&mut rng, s_kv),
            };
        }
        if p.flag("invalid")? && (s == 0 || rng.below(8) == 0) {
            let v = invalid_index(&mut rng, s_kv);
            row.fill(v);
        }
    }
    let lens: Option<Vec<i32>> = if p.flag("topk_len")? {
        Some(
            (0..s_q)
                .map(|_| rng.below(topk.max(63) + 1).min(topk) as i32)
                .collect(),
        )
    } else {
        None
    };
    // Tokens no slot names (valid or past topk_length) must not be read:
    // NaN there.
    let mut named = vec![false; s_kv];
    for &v in &idx {
        if v >= 0 && (v as usize) < s_kv {
            named[v as usize] = true;
        }
    }
    for (t, _) in named.iter().enumerate().filter(|(_, &n)| !n) {
        kv[t * d_qk..(t + 1) * d_qk].fill(f32::NAN);
    }
    let mut tensors = vec![
        ("q", HostTensor::from_f32(dtype, &[s_q, h_q, d_qk], &q)),
        ("kv", HostTensor::from_f32(dtype, &[s_kv, 1, d_qk], &kv)),
        ("indices", HostTensor::from_i32(&[s_q, 1, topk], &idx)),
    ];
    if let Some(l) = lens {
        tensors.push(("topk_length", HostTensor::from_i32(&[s_q], &l)));
    }
    if p.flag("sink")? {
        // FlashMLA: N(0, 1), a quarter-ish −inf (no effect) and +inf (out = 0).
        let sink: Vec<f32> = (0..h_q)
            .map(|_| {
                let (v, m) = (rng.normal(), rng.normal());
                if m < -0.5 {
                    f32::NEG_INFINITY
                } else if m > 0.5 {
                    f32::INFINITY
                } else {
                    v
                }
            })
            .collect();
        tensors.push(("attn_sink", HostTensor::from_f32(DType::F32, &[h_q], &sink)));
    }
    op_case(
        spec,
        "sparse-mla-prefill",
        tensors,
        vec![("softmax_scale", Arg::Float(0.5))],
        Judging::new(spec).into_fn(),
    )
}

// ---- cache_quant ----------------------------------------------------------------

pub static CACHE_QUANT: Family = Family {
    name: "cache_quant",
    keys: &[
        req("blocks", Int),
        req("block", Int),
        def("layout", Text(&["index", "latent"]), "index"),
        def("d", Int, "128"),
        def("ue8m0", Flag, "0"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_quant,
    ops: k_quant,
    source: super::generated,
    build: build_quant,
};

fn build_quant(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (blocks, block) = (p.int("blocks")?, p.int("block")?);
    let layout = p.text("layout")?;
    let d = if layout == "latent" {
        V32_D
    } else {
        p.int("d")?
    };
    let dtype = p.dtype("dtype")?;
    let mut rng = Rng::new(spec.seed);
    // Magnitudes spread over many binades, a zero token (amax floor) and
    // one whose amax/448 is just above a power of two (where a float scale
    // and its UE8M0 rounding differ most).
    let mut x = gen::normals(&mut rng, blocks * block * d, 1.0);
    for (tok, v) in x.chunks_mut(d.max(1)).enumerate() {
        let m = 2f32.powi((tok % 13) as i32 - 6);
        match tok % 7 {
            3 => v.fill(0.0),
            5 => {
                v.iter_mut().for_each(|e| *e = (*e * 0.1).clamp(-1.0, 1.0));
                v[0] = ue8m0_round_up(3.0) * 1.0001;
            }
            _ => v.iter_mut().for_each(|e| *e *= m),
        }
    }
    let xt = HostTensor::from_f32(dtype, &[blocks, block, d], &x);
    op_case(
        spec,
        "cache-quant",
        vec![("x", xt)],
        vec![
            ("layout", Arg::Text(layout)),
            ("ue8m0", Arg::Bool(p.flag("ue8m0")?)),
        ],
        Judging::new(spec).into_fn(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::all_passed;

    fn tol() -> Tolerance {
        Tolerance {
            metric: Metric::SetEquality,
            pass: 0.0,
            warn: 0.0,
            params: Default::default(),
            reason: "test".into(),
        }
    }

    fn outs(v: &[i32], k: usize) -> Outputs {
        [(
            "indices".to_string(),
            HostTensor::from_i32(&[v.len() / k, k], v),
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn topk_is_judged_as_sets_with_tie_bands() {
        let r = outs(&[3, 1, -1, 0, 2, 5], 3);
        // Another order of the same sets passes.
        let a = outs(&[1, 3, -1, 2, 5, 0], 3);
        assert!(all_passed(&judge_topk(
            &[vec![], vec![]],
            "indices",
            &tol(),
            &a,
            &r
        )));
        // A different set fails, unless inside the row's tie band.
        let a = outs(&[3, 1, -1, 0, 2, 4], 3);
        assert!(!all_passed(&judge_topk(
            &[vec![], vec![]],
            "indices",
            &tol(),
            &a,
            &r
        )));
        let bands = [vec![], vec![4, 5]];
        assert!(all_passed(&judge_topk(&bands, "indices", &tol(), &a, &r)));
        // A repeated position or a missing −1 fails.
        let a = outs(&[3, 3, -1, 0, 2, 5], 3);
        assert!(!all_passed(&judge_topk(&bands, "indices", &tol(), &a, &r)));
        let a = outs(&[3, 1, 4, 0, 2, 5], 3);
        assert!(!all_passed(&judge_topk(&bands, "indices", &tol(), &a, &r)));
    }

    #[test]
    fn tie_bands_straddle_the_cut() {
        let l = [1.0f32, 0.5, 0.5, 0.2, 2.0, 1.0, 0.0, f32::NEG_INFINITY];
        let b = tie_bands(&l, 4, &[4, 3], 2);
        assert_eq!(b[0], vec![1, 2]);
        assert!(b[1].is_empty());
    }

    #[test]
    fn scales_are_powers_of_two_only_when_asked() {
        let mut r = Rng::new(3);
        for _ in 0..50 {
            let s = scale(&mut r, true);
            assert_eq!(ue8m0_round_up(s), s);
            let s = scale(&mut r, false);
            assert_ne!(ue8m0_round_up(s), s);
        }
    }
}
