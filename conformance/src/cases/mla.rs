//! MLA families: `mla_decode` (FlashMLA dense decode over a paged latent
//! cache, SPEC §4) and `mla_prefill` (causal prefill over a contiguous
//! latent, naive or absorbed, SPEC §5).

use super::gen::{self, NormalStream};
use super::judging::Judging;
use super::{def, op_case, opt, req, Case, Family, KeyKind, ParamMap, FLOAT_DTYPES, P};
use crate::opspec::Arg;
use crate::rng::Rng;
use crate::types::CaseSpec;
use deepport_core::ops::OpKind;
use deepport_core::HostTensor;

use KeyKind::{Flag, Float, Int, Text};

/// Channels of a latent cache row (512 latent + 64 rope).
const D: usize = 576;
/// FlashMLA's page size.
const BLOCK: usize = 64;
/// Unused block-table entries.
const HUGE: i64 = (1 << 30) + 7;

fn o_decode(_: &ParamMap) -> Vec<&'static str> {
    vec!["out", "lse"]
}
fn o_prefill(_: &ParamMap) -> Vec<&'static str> {
    vec!["out"]
}
fn k_decode(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::MlaDecode]
}
fn k_prefill(_: &ParamMap) -> Vec<OpKind> {
    vec![OpKind::MlaPrefill]
}

pub static MLA_DECODE: Family = Family {
    name: "mla_decode",
    keys: &[
        req("b", Int),
        req("s_q", Int),
        req("h_q", Int),
        opt("s_k", Int),
        def("h_kv", Int, "1"),
        def("causal", Flag, "0"),
        def("varlen", Flag, "0"),
        def("zero", Flag, "0"),
        opt("lens", Text(&[])),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
        opt("scale", Float),
    ],
    outputs: o_decode,
    ops: k_decode,
    source: super::generated,
    build: build_decode,
};

/// Sequence lengths: explicit `lens` (`0/1/77`), else `s_k` each, or with
/// `varlen` FlashMLA's `max(⌊N(s_k, s_k/2)⌋, s_q)`; with `zero`, sequence 0
/// and about a quarter of the others have length 0.
fn seq_lens(p: &P, rng: &mut Rng) -> Result<Vec<usize>, String> {
    let b = p.int("b")?;
    let s_q = p.int("s_q")?;
    let mut lens = match p.ints("lens")? {
        Some(v) if v.len() == b => v,
        Some(v) => return Err(format!("lens has {} entries for b = {b}", v.len())),
        None => {
            let s_k = p
                .opt_int("s_k")?
                .ok_or("mla_decode needs `s_k` or `lens`")?;
            let varlen = p.flag("varlen")?;
            let mut g = NormalStream::new(rng, 1.0);
            (0..b)
                .map(|_| {
                    if varlen {
                        let x = s_k as f64 + g.next_value() as f64 * s_k as f64 / 2.0;
                        (x.max(0.0) as usize).max(s_q)
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

/// A FlashMLA-style decode case: a permuted block table whose unused
/// entries hold a huge index (one extra unused column per row), three
/// unused pages, and NaN in every cache slot that must not be read (past
/// each sequence's length, and the unused pages).
fn build_decode(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (b, s_q, h_q, h_kv) = (p.int("b")?, p.int("s_q")?, p.int("h_q")?, p.int("h_kv")?);
    let dtype = p.dtype("dtype")?;
    let mut rng = Rng::new(spec.seed);
    let lens = seq_lens(&p, &mut rng)?;
    let used: Vec<usize> = lens.iter().map(|&l| l.div_ceil(BLOCK)).collect();
    let max_blocks = used.iter().copied().max().unwrap_or(0) + 1;
    let num_blocks = used.iter().sum::<usize>() + 3;
    let perm = rng.permutation(num_blocks);
    let mut table = vec![HUGE; b * max_blocks];
    let mut valid = vec![false; num_blocks * BLOCK];
    let mut next = 0;
    for (i, &u) in used.iter().enumerate() {
        for j in 0..u {
            let blk = perm[next];
            next += 1;
            table[i * max_blocks + j] = blk as i64;
            let filled = (lens[i] - j * BLOCK).min(BLOCK);
            valid[blk * BLOCK..blk * BLOCK + filled].fill(true);
        }
    }
    let kcache = gen::masked_normal(&mut rng, dtype, &[num_blocks, BLOCK, h_kv, D], &valid, 1.0);
    let q = gen::normal(&mut rng, dtype, &[b, s_q, h_q, D], 1.0);
    let lens_i: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
    let table_i: Vec<i32> = table.iter().map(|&x| x as i32).collect();
    let mut params = vec![("causal", Arg::Bool(p.flag("causal")?))];
    if let Some(s) = p.opt_float("scale")? {
        params.push(("softmax_scale", Arg::Float(s)));
    }
    op_case(
        spec,
        "mla-decode",
        vec![
            ("q", q),
            ("kcache", kcache),
            (
                "block_table",
                HostTensor::from_i32(&[b, max_blocks], &table_i),
            ),
            ("cache_seqlens", HostTensor::from_i64(&[b], &lens_i)),
        ],
        params,
        Judging::new(spec).into_fn(),
    )
}

pub static MLA_PREFILL: Family = Family {
    name: "mla_prefill",
    keys: &[
        req("t", Int),
        req("s", Int),
        req("h", Int),
        def("dn", Int, "128"),
        def("dr", Int, "64"),
        def("dc", Int, "512"),
        def("dv", Int, "128"),
        def("form", Text(&["naive", "absorb"]), "absorb"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
        opt("scale", Float),
    ],
    outputs: o_prefill,
    ops: k_prefill,
    source: super::generated,
    build: build_prefill,
};

fn build_prefill(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (t, s, h) = (p.int("t")?, p.int("s")?, p.int("h")?);
    let (dn, dr, dc, dv) = (p.int("dn")?, p.int("dr")?, p.int("dc")?, p.int("dv")?);
    let dt = p.dtype("dtype")?;
    let mut rng = Rng::new(spec.seed);
    let q_nope = gen::normal(&mut rng, dt, &[t, h, dn], 1.0);
    let q_pe = gen::normal(&mut rng, dt, &[t, h, dr], 1.0);
    let latent = gen::normal(&mut rng, dt, &[s, dc], 1.0);
    let k_pe = gen::normal(&mut rng, dt, &[s, dr], 1.0);
    let wkv_b = gen::normal(
        &mut rng,
        dt,
        &[h * (dn + dv), dc],
        (dc.max(1) as f32).powf(-0.5),
    );
    let mut params = vec![
        ("form", Arg::Text(p.text("form")?)),
        ("head_dim_v", Arg::Int(dv)),
    ];
    if let Some(sc) = p.opt_float("scale")? {
        params.push(("softmax_scale", Arg::Float(sc)));
    }
    op_case(
        spec,
        "mla-prefill",
        vec![
            ("q_nope", q_nope),
            ("q_pe", q_pe),
            ("latent", latent),
            ("k_pe", k_pe),
            ("wkv_b", wkv_b),
        ],
        params,
        Judging::new(spec).into_fn(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, serde_json::Value)]) -> ParamMap {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn lengths_follow_flashmla() {
        let m = params(&[
            ("b", 64.into()),
            ("s_q", 4.into()),
            ("s_k", 140.into()),
            ("varlen", 1.into()),
            ("zero", 0.into()),
        ]);
        let l = seq_lens(&P(&m), &mut Rng::new(1)).unwrap();
        assert_eq!(l.len(), 64);
        assert!(l.iter().all(|&x| x >= 4));
        assert!(l.iter().any(|&x| x != 140), "varlen lengths vary");
        let m = params(&[
            ("b", 128.into()),
            ("s_q", 2.into()),
            ("s_k", 20.into()),
            ("varlen", 0.into()),
            ("zero", 1.into()),
        ]);
        let l = seq_lens(&P(&m), &mut Rng::new(1)).unwrap();
        assert_eq!(l[0], 0);
        let zeros = l.iter().filter(|&&x| x == 0).count();
        assert!(zeros > 10 && zeros < 64, "{zeros}");
        let m = params(&[
            ("b", 2.into()),
            ("s_q", 1.into()),
            ("lens", "3".into()),
            ("zero", 0.into()),
        ]);
        assert!(seq_lens(&P(&m), &mut Rng::new(1)).is_err());
    }
}
