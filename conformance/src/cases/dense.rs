//! The single-device dense op families: act_quant, weight_dequant, the FP8
//! GEMMs (dense, grouped contiguous, grouped masked), gemm, rms_norm, rope,
//! moe_gate, silu_mul, add, embedding and copy_window. Each case runs
//! through the same data-driven path as `deepport op` ([`crate::opspec`]).

use super::gen::{self, poison_rows, row_mask};
use super::judging::Judging;
use super::{
    def, op_case, opt, req, Case, Family, KeyKind, ParamMap, FLOAT_DTYPES, FP8_FORMATS, GEMM_OUT, P,
};
use crate::opspec::Arg;
use crate::rng::Rng;
use crate::types::CaseSpec;
use deepport_core::ops::OpKind;
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;

use KeyKind::{Flag, Float, Int, Text};

pub(crate) mod routing;

/// `$ops`/`$outs`: a one-op family's ops and tolerance keys (the op's
/// declared outputs, [`super::declared_outputs`]).
macro_rules! one_op {
    ($ops:ident, $outs:ident, $k:ident) => {
        fn $ops(_: &ParamMap) -> Vec<OpKind> {
            vec![OpKind::$k]
        }
        fn $outs(_: &ParamMap) -> Vec<&'static str> {
            super::declared_outputs(OpKind::$k)
        }
    };
}

one_op!(k_act_quant, o_act_quant, ActQuant);
one_op!(k_weight_dequant, o_weight_dequant, WeightDequant);
one_op!(k_fp8_gemm, o_fp8_gemm, Fp8Gemm);
one_op!(k_contig, o_contig, Fp8GroupedContiguous);
one_op!(k_masked, o_masked, Fp8GroupedMasked);
one_op!(k_gemm, o_gemm, Gemm);
one_op!(k_rms, o_rms, RmsNorm);
one_op!(k_rope, o_rope, Rope);
one_op!(k_moe, o_moe, MoeGate);
one_op!(k_silu, o_silu, SiluMul);
one_op!(k_add, o_add, Add);
one_op!(k_emb, o_emb, Embedding);
one_op!(k_copy, o_copy, CopyWindow);

fn rng(spec: &CaseSpec) -> Rng {
    Rng::new(spec.seed)
}

// ---- act_quant -------------------------------------------------------------

pub static ACT_QUANT: Family = Family {
    name: "act_quant",
    keys: &[
        req("m", Int),
        req("k", Int),
        def("x", Text(FLOAT_DTYPES), "bf16"),
        def("format", Text(FP8_FORMATS), "e4m3"),
        def("scale", Text(&["float", "ue8m0"]), "float"),
    ],
    outputs: o_act_quant,
    ops: k_act_quant,
    source: super::generated,
    build: build_act_quant,
};

/// Rows of normal·3 values with edge rows: all zeros (amax clamps to
/// 1e-4), tiny values and negative zeros, and a row with a huge outlier per
/// 128-group over a wide in-group range.
fn build_act_quant(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (m, k) = (p.int("m")?, p.int("k")?);
    let xd = p.dtype("x")?;
    let mut rng = rng(spec);
    let mut v = gen::normals(&mut rng, m * k, 3.0);
    if m >= 1 {
        v[..k].fill(0.0);
    }
    if m >= 2 {
        for (j, x) in v[k..2 * k].iter_mut().enumerate() {
            *x = if j.is_multiple_of(2) { 3e-5 } else { -0.0 };
        }
    }
    if m >= 3 {
        for (j, x) in v[2 * k..3 * k].iter_mut().enumerate() {
            *x = if j % 128 == 7 {
                -3.0e4
            } else {
                (j as f32 - 64.0) * 11.0
            };
        }
    }
    let x = HostTensor::from_f32(xd, &[m, k], &v);
    op_case(
        spec,
        "act-quant",
        vec![("x", x)],
        vec![
            ("format", Arg::Text(p.text("format")?)),
            ("scale_fmt", Arg::Text(p.text("scale")?)),
        ],
        Judging::new(spec).into_fn(),
    )
}

// ---- weight_dequant ----------------------------------------------------------

pub static WEIGHT_DEQUANT: Family = Family {
    name: "weight_dequant",
    keys: &[
        req("n", Int),
        req("k", Int),
        def("w", Text(FP8_FORMATS), "e4m3"),
        def("out", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_weight_dequant,
    ops: k_weight_dequant,
    source: super::generated,
    build: build_weight_dequant,
};

fn build_weight_dequant(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (n, k) = (p.int("n")?, p.int("k")?);
    let mut rng = rng(spec);
    let w = gen::fp8(&mut rng, p.dtype("w")?, &[n, k]);
    let s = gen::scales(&mut rng, &[n.div_ceil(128), k.div_ceil(128)]);
    op_case(
        spec,
        "weight-dequant",
        vec![("w", w), ("s", s)],
        vec![("out_dtype", Arg::Text(p.text("out")?))],
        Judging::new(spec).into_fn(),
    )
}

// ---- FP8 GEMMs -----------------------------------------------------------------

pub static FP8_GEMM: Family = Family {
    name: "fp8_gemm",
    keys: &[
        req("m", Int),
        req("n", Int),
        req("k", Int),
        def("ab", Text(FP8_FORMATS), "e4m3"),
        def("out", Text(GEMM_OUT), "bf16"),
    ],
    outputs: o_fp8_gemm,
    ops: k_fp8_gemm,
    source: super::generated,
    build: build_fp8_gemm,
};

fn build_fp8_gemm(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (m, n, k) = (p.int("m")?, p.int("n")?, p.int("k")?);
    let fmt = p.dtype("ab")?;
    let mut rng = rng(spec);
    let a = gen::fp8(&mut rng, fmt, &[m, k]);
    let sa = gen::scales(&mut rng, &[m, k.div_ceil(128)]);
    let b = gen::fp8(&mut rng, fmt, &[n, k]);
    let sb = gen::scales(&mut rng, &[n.div_ceil(128), k.div_ceil(128)]);
    op_case(
        spec,
        "fp8-gemm",
        vec![("a", a), ("sa", sa), ("b", b), ("sb", sb)],
        vec![("out_dtype", Arg::Text(p.text("out")?))],
        Judging::new(spec).into_fn(),
    )
}

pub static FP8_GROUPED_CONTIGUOUS: Family = Family {
    name: "fp8_grouped_contiguous",
    keys: &[
        req("groups", Int),
        opt("m", Int),
        opt("blocks", Text(&[])),
        req("n", Int),
        req("k", Int),
        def("out", Text(GEMM_OUT), "bf16"),
        def("shuffle", Flag, "0"),
        def("empty", Flag, "0"),
    ],
    outputs: o_contig,
    ops: k_contig,
    source: super::generated,
    build: build_contiguous,
};

/// The group of each row: either explicit 128-row blocks `g:rows/…` (each
/// block holds `rows` rows of group `g`, then padding), or DeepGEMM's
/// generator: group `g` gets `⌊m·U(0.7, 1.3)⌋` rows (none for group 1 with
/// `empty`), padded to a multiple of 128 with −1; with `shuffle` the
/// 128-row blocks are permuted (any block order is valid, SPEC §3.1).
fn contiguous_layout(p: &P, rng: &mut Rng, groups: usize) -> Result<Vec<i64>, String> {
    if let Some(b) = p.opt_text("blocks")? {
        let mut idx = Vec::new();
        for item in b.split('/') {
            let (g, rows) = item
                .split_once(':')
                .and_then(|(g, r)| {
                    Some((
                        g.trim().parse::<i64>().ok()?,
                        r.trim().parse::<usize>().ok()?,
                    ))
                })
                .ok_or_else(|| format!("blocks: `{item}` is not `group:rows`"))?;
            if rows > 128 || g < 0 || g as usize >= groups {
                return Err(format!(
                    "blocks: `{item}` needs 0 ≤ group < {groups} and rows ≤ 128"
                ));
            }
            idx.extend(std::iter::repeat_n(g, rows));
            idx.extend(std::iter::repeat_n(-1, 128 - rows));
        }
        return Ok(idx);
    }
    let m = p
        .opt_int("m")?
        .ok_or("fp8_grouped_contiguous needs `m` (expected rows per group) or `blocks`")?;
    let empty = p.flag("empty")?;
    let mut blocks: Vec<Vec<i64>> = Vec::new();
    for g in 0..groups {
        let rows = if empty && g == 1 {
            0
        } else {
            (m as f64 * (0.7 + 0.6 * rng.uniform())) as usize
        };
        let mut v: Vec<i64> = std::iter::repeat_n(g as i64, rows).collect();
        v.resize(rows.div_ceil(128) * 128, -1);
        blocks.extend(v.chunks(128).map(|c| c.to_vec()));
    }
    if p.flag("shuffle")? {
        let perm = rng.permutation(blocks.len());
        blocks = perm.iter().map(|&i| blocks[i].clone()).collect();
    }
    Ok(blocks.concat())
}

fn build_contiguous(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (g, n, k) = (p.int("groups")?, p.int("n")?, p.int("k")?);
    let mut rng = rng(spec);
    let m_idx = contiguous_layout(&p, &mut rng, g)?;
    let m_sum = m_idx.len();
    let pad: Vec<bool> = m_idx.iter().map(|&x| x < 0).collect();
    let a = poison_rows(gen::fp8(&mut rng, DType::F8E4M3, &[m_sum, k]), &pad);
    let sa = gen::scales(&mut rng, &[m_sum, k.div_ceil(128)]);
    let b = gen::fp8(&mut rng, DType::F8E4M3, &[g, n, k]);
    let sb = gen::scales(&mut rng, &[g, n.div_ceil(128), k.div_ceil(128)]);
    let live: Vec<bool> = pad.iter().map(|&x| !x).collect();
    op_case(
        spec,
        "fp8-grouped-contiguous",
        vec![
            ("a", a),
            ("sa", sa),
            ("b", b),
            ("sb", sb),
            (
                "m_indices",
                HostTensor::from_index(DType::I32, &[m_sum], &m_idx),
            ),
        ],
        vec![("out_dtype", Arg::Text(p.text("out")?))],
        Judging::new(spec).mask("d", row_mask(&live, n)).into_fn(),
    )
}

pub static FP8_GROUPED_MASKED: Family = Family {
    name: "fp8_grouped_masked",
    keys: &[
        req("groups", Int),
        req("m_max", Int),
        opt("m", Int),
        opt("masked_m", Text(&[])),
        req("n", Int),
        req("k", Int),
        def("out", Text(GEMM_OUT), "bf16"),
    ],
    outputs: o_masked,
    ops: k_masked,
    source: super::generated,
    build: build_masked,
};

/// `masked_m` explicit (`0/17/64/33`) or DeepGEMM's `⌊m·U(0.7, 1.3)⌋`
/// capped at `m_max`. Rows at or past `masked_m[g]` hold NaN in A and are
/// not judged.
fn build_masked(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (g, m_max, n, k) = (p.int("groups")?, p.int("m_max")?, p.int("n")?, p.int("k")?);
    let mut rng = rng(spec);
    let masked: Vec<usize> = match p.ints("masked_m")? {
        Some(v) => v,
        None => {
            let m = p
                .opt_int("m")?
                .ok_or("fp8_grouped_masked needs `m` (expected rows per group) or `masked_m`")?;
            (0..g)
                .map(|_| ((m as f64 * (0.7 + 0.6 * rng.uniform())) as usize).min(m_max))
                .collect()
        }
    };
    if masked.len() != g {
        return Err(format!(
            "masked_m has {} entries for {g} groups",
            masked.len()
        ));
    }
    let live: Vec<bool> = (0..g * m_max)
        .map(|i| i % m_max.max(1) < masked[i / m_max.max(1)])
        .collect();
    let dead: Vec<bool> = live.iter().map(|&l| !l).collect();
    let a = poison_rows(gen::fp8(&mut rng, DType::F8E4M3, &[g, m_max, k]), &dead);
    let sa = gen::scales(&mut rng, &[g, m_max, k.div_ceil(128)]);
    let b = gen::fp8(&mut rng, DType::F8E4M3, &[g, n, k]);
    let sb = gen::scales(&mut rng, &[g, n.div_ceil(128), k.div_ceil(128)]);
    let mm: Vec<i64> = masked.iter().map(|&x| x as i64).collect();
    op_case(
        spec,
        "fp8-grouped-masked",
        vec![
            ("a", a),
            ("sa", sa),
            ("b", b),
            ("sb", sb),
            ("masked_m", HostTensor::from_i64(&[g], &mm)),
        ],
        vec![("out_dtype", Arg::Text(p.text("out")?))],
        Judging::new(spec).mask("d", row_mask(&live, n)).into_fn(),
    )
}

// ---- gemm ------------------------------------------------------------------------

pub static GEMM: Family = Family {
    name: "gemm",
    keys: &[
        req("m", Int),
        req("n", Int),
        req("k", Int),
        def("ab", Text(FLOAT_DTYPES), "f32"),
        def("out", Text(FLOAT_DTYPES), "f32"),
    ],
    outputs: o_gemm,
    ops: k_gemm,
    source: super::generated,
    build: build_gemm,
};

fn build_gemm(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (m, n, k) = (p.int("m")?, p.int("n")?, p.int("k")?);
    let d = p.dtype("ab")?;
    let mut rng = rng(spec);
    let a = gen::normal(&mut rng, d, &[m, k], 1.0);
    let b = gen::normal(&mut rng, d, &[n, k], (k.max(1) as f32).powf(-0.5));
    op_case(
        spec,
        "gemm",
        vec![("a", a), ("b", b)],
        vec![("out_dtype", Arg::Text(p.text("out")?))],
        Judging::new(spec).into_fn(),
    )
}

// ---- rms_norm, rope ------------------------------------------------------------------

pub static RMS_NORM: Family = Family {
    name: "rms_norm",
    keys: &[
        req("rows", Int),
        req("dim", Int),
        def("x", Text(FLOAT_DTYPES), "bf16"),
        def("w", Text(FLOAT_DTYPES), "f32"),
        def("scale", Float, "1"),
        opt("eps", Float),
    ],
    outputs: o_rms,
    ops: k_rms,
    source: super::generated,
    build: build_rms_norm,
};

/// Rows of normal·`scale` values; row 1 (when there is one) is all zeros,
/// whose output is 0.
fn build_rms_norm(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (rows, dim) = (p.int("rows")?, p.int("dim")?);
    let mut rng = rng(spec);
    let mut xv = gen::normals(&mut rng, rows * dim, p.float("scale")? as f32);
    if rows >= 2 {
        xv[dim..2 * dim].fill(0.0);
    }
    let x = HostTensor::from_f32(p.dtype("x")?, &[rows, dim], &xv);
    let w = gen::normal(&mut rng, p.dtype("w")?, &[dim], 1.0);
    let mut params = Vec::new();
    if let Some(e) = p.opt_float("eps")? {
        params.push(("eps", Arg::Float(e)));
    }
    op_case(
        spec,
        "rms-norm",
        vec![("x", x), ("weight", w)],
        params,
        Judging::new(spec).into_fn(),
    )
}

pub static ROPE: Family = Family {
    name: "rope",
    keys: &[
        req("t", Int),
        opt("h", Int),
        def("d", Int, "64"),
        def("factor", Float, "1"),
        def("theta", Float, "10000"),
        def("mscale", Float, "1"),
        def("mscale_all_dim", Float, "1"),
        def("beta_fast", Float, "32"),
        def("beta_slow", Float, "1"),
        def("l0", Int, "4096"),
        def("pos", Text(&["i32", "i64"]), "i64"),
        def("dtype", Text(FLOAT_DTYPES), "f32"),
        opt("layout", Text(&["interleaved", "half"])),
    ],
    outputs: o_rope,
    ops: k_rope,
    source: super::generated,
    build: build_rope,
};

/// Positions: 0, 1, 4095, 4096 (around YaRN's L0), 163839 (the V3 context
/// end), then random ones below 163840. `x` is `[t, h, d]`, or `[t, d]`
/// without `h`.
fn build_rope(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (t, d) = (p.int("t")?, p.int("d")?);
    let mut rng = rng(spec);
    let shape = match p.opt_int("h")? {
        Some(h) => vec![t, h, d],
        None => vec![t, d],
    };
    let x = gen::normal(&mut rng, p.dtype("dtype")?, &shape, 1.0);
    let edge = [0i64, 1, 4095, 4096, 163_839];
    let pos: Vec<i64> = (0..t)
        .map(|i| {
            edge.get(i)
                .copied()
                .unwrap_or_else(|| rng.below(163_840) as i64)
        })
        .collect();
    let pos = HostTensor::from_index(p.dtype("pos")?, &[t], &pos);
    let params = vec![
        ("factor", Arg::Float(p.float("factor")?)),
        ("theta", Arg::Float(p.float("theta")?)),
        ("mscale", Arg::Float(p.float("mscale")?)),
        ("mscale_all_dim", Arg::Float(p.float("mscale_all_dim")?)),
        ("beta_fast", Arg::Float(p.float("beta_fast")?)),
        ("beta_slow", Arg::Float(p.float("beta_slow")?)),
        ("original_max_position_embeddings", Arg::Int(p.int("l0")?)),
        (
            "layout",
            Arg::Text(p.opt_text("layout")?.unwrap_or("interleaved")),
        ),
    ];
    op_case(
        spec,
        "rope",
        vec![("x", x), ("positions", pos)],
        params,
        Judging::new(spec).into_fn(),
    )
}

// ---- moe_gate ---------------------------------------------------------------------------

pub static MOE_GATE: Family = Family {
    name: "moe_gate",
    keys: &[
        req("t", Int),
        req("experts", Int),
        req("dim", Int),
        req("n_group", Int),
        req("topk_group", Int),
        req("topk", Int),
        def("scale", Float, "2.5"),
        def("bias", Flag, "1"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_moe,
    ops: k_moe,
    source: super::generated,
    build: build_moe_gate,
};

/// Maps both routing outputs to the `topk` tolerance.
pub(crate) fn topk_key(name: &str) -> String {
    super::tolerance_key(name).into()
}

fn build_moe_gate(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (t, e, dim) = (p.int("t")?, p.int("experts")?, p.int("dim")?);
    let (ng, tg, tk) = (p.int("n_group")?, p.int("topk_group")?, p.int("topk")?);
    if ng == 0
        || !e.is_multiple_of(ng)
        || e / ng < 2
        || tg == 0
        || tg > ng
        || tk == 0
        || tk > tg * (e / ng)
    {
        return Err(format!(
            "moe_gate needs experts % n_group == 0, ≥ 2 experts per group, 1 ≤ topk_group ≤ n_group and topk ≤ topk_group·experts/n_group (got {e}, {ng}, {tg}, {tk})"
        ));
    }
    let dt = p.dtype("dtype")?;
    let mut rng = rng(spec);
    let x = gen::normal(&mut rng, dt, &[t, dim], 1.0);
    let w = gen::normal(&mut rng, dt, &[e, dim], (dim.max(1) as f32).powf(-0.5));
    let bias = p
        .flag("bias")?
        .then(|| gen::normal(&mut rng, DType::F32, &[e], 0.1));
    let ties = moe_near_ties(&x, &w, bias.as_ref(), ng, tg, tk);
    let mut tensors = vec![("x", x), ("weight", w)];
    if let Some(b) = bias {
        tensors.push(("bias", b));
    }
    op_case(
        spec,
        "moe-gate",
        tensors,
        vec![
            ("n_group", Arg::Int(ng)),
            ("topk_group", Arg::Int(tg)),
            ("topk", Arg::Int(tk)),
            ("route_scale", Arg::Float(p.float("scale")?)),
        ],
        Judging::new(spec)
            .key_of(topk_key)
            .with(routing::judge(BTreeMap::from([(
                "topk_idx".to_string(),
                ties,
            )])))
            .into_fn(),
    )
}

/// Each token's tie band (SPEC §6): when the last kept and the first
/// dropped group scores are within 1e-6 relative, every expert of the
/// groups tied with them; when the k-th and (k+1)-th biased expert scores
/// among the candidates (the kept groups and any tied ones) are within 1e-6
/// relative, every candidate expert tied with them. Empty for a token that
/// is not a near-tie. Computed in f64 from the inputs, independently of any
/// backend.
pub(crate) fn moe_near_ties(
    x: &HostTensor,
    w: &HostTensor,
    bias: Option<&HostTensor>,
    n_group: usize,
    topk_group: usize,
    topk: usize,
) -> Vec<Vec<i64>> {
    let (t, dim) = (
        x.shape().first().copied().unwrap_or(0),
        x.shape().get(1).copied().unwrap_or(0),
    );
    let e = w.shape().first().copied().unwrap_or(0);
    if n_group == 0
        || !e.is_multiple_of(n_group)
        || e / n_group < 2
        || topk_group == 0
        || topk_group > n_group
        || topk == 0
    {
        return vec![Vec::new(); t];
    }
    let (xv, wv) = (x.to_f32_vec(), w.to_f32_vec());
    let bv = bias.map(|b| b.to_f32_vec());
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs());
    let per = e / n_group;
    (0..t)
        .map(|ti| {
            let biased: Vec<f64> = (0..e)
                .map(|ei| {
                    let dot: f64 = (0..dim)
                        .map(|j| xv[ti * dim + j] as f64 * wv[ei * dim + j] as f64)
                        .sum();
                    let s = 1.0 / (1.0 + (-dot).exp());
                    s + bv
                        .as_ref()
                        .and_then(|b| b.get(ei))
                        .map_or(0.0, |&b| b as f64)
                })
                .collect();
            let mut groups: Vec<(f64, usize)> = (0..n_group)
                .map(|g| {
                    let mut v = biased[g * per..(g + 1) * per].to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    (v[0] + v[1], g)
                })
                .collect();
            groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut band: Vec<i64> = Vec::new();
            let mut candidates: Vec<usize> = groups[..topk_group].iter().map(|g| g.1).collect();
            if topk_group < n_group {
                let (last, first_out) = (groups[topk_group - 1].0, groups[topk_group].0);
                if near(last, first_out) {
                    for &(gs, g) in &groups {
                        if near(gs, last) || near(gs, first_out) {
                            band.extend((g * per..(g + 1) * per).map(|x| x as i64));
                            if !candidates.contains(&g) {
                                candidates.push(g);
                            }
                        }
                    }
                }
            }
            let mut kept: Vec<(f64, usize)> = candidates
                .iter()
                .flat_map(|&g| (g * per..(g + 1) * per).map(|x| (biased[x], x)))
                .collect();
            kept.sort_by(|a, b| b.0.total_cmp(&a.0));
            if topk < kept.len() && near(kept[topk - 1].0, kept[topk].0) {
                let (k1, k2) = (kept[topk - 1].0, kept[topk].0);
                band.extend(
                    kept.iter()
                        .filter(|(s, _)| near(*s, k1) || near(*s, k2))
                        .map(|&(_, x)| x as i64),
                );
            }
            band.sort_unstable();
            band.dedup();
            band
        })
        .collect()
}

// ---- silu_mul, add, embedding, copy_window ---------------------------------------------------

pub static SILU_MUL: Family = Family {
    name: "silu_mul",
    keys: &[
        req("rows", Int),
        req("cols", Int),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
        def("saturate", Flag, "0"),
    ],
    outputs: o_silu,
    ops: k_silu,
    source: super::generated,
    build: build_silu_mul,
};

/// Gates normal·3; with `saturate` the first six gates are ±20, ±88.5 and
/// ±100 (silu(−100) is a tiny negative, silu(100) = 100).
fn build_silu_mul(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (rows, cols) = (p.int("rows")?, p.int("cols")?);
    let dt = p.dtype("dtype")?;
    let mut rng = rng(spec);
    let mut gv = gen::normals(&mut rng, rows * cols, 3.0);
    if p.flag("saturate")? {
        let edge = [-100.0, -88.5, -20.0, 20.0, 88.5, 100.0];
        let n = edge.len().min(gv.len());
        gv[..n].copy_from_slice(&edge[..n]);
    }
    let g = HostTensor::from_f32(dt, &[rows, cols], &gv);
    let u = gen::normal(&mut rng, dt, &[rows, cols], 1.0);
    op_case(
        spec,
        "silu-mul",
        vec![("gate", g), ("up", u)],
        vec![],
        Judging::new(spec).into_fn(),
    )
}

pub static ADD: Family = Family {
    name: "add",
    keys: &[
        req("rows", Int),
        req("cols", Int),
        def("a", Text(FLOAT_DTYPES), "bf16"),
        def("b", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_add,
    ops: k_add,
    source: super::generated,
    build: build_add,
};

/// `b` is 1e-3 times smaller than `a` when their dtypes differ, so the
/// sum's rounding matters.
fn build_add(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (rows, cols) = (p.int("rows")?, p.int("cols")?);
    let (da, db) = (p.dtype("a")?, p.dtype("b")?);
    let mut rng = rng(spec);
    let a = gen::normal(&mut rng, da, &[rows, cols], 1.0);
    let b = gen::normal(
        &mut rng,
        db,
        &[rows, cols],
        if da == db { 1.0 } else { 1e-3 },
    );
    op_case(
        spec,
        "add",
        vec![("a", a), ("b", b)],
        vec![],
        Judging::new(spec).into_fn(),
    )
}

pub static EMBEDDING: Family = Family {
    name: "embedding",
    keys: &[
        req("vocab", Int),
        req("dim", Int),
        req("tokens", Int),
        def("ids", Text(&["i32", "i64"]), "i64"),
        def("dtype", Text(FLOAT_DTYPES), "bf16"),
    ],
    outputs: o_emb,
    ops: k_emb,
    source: super::generated,
    build: build_embedding,
};

/// Ids include 0, vocab−1 and repeats.
fn build_embedding(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (v, dim, t) = (p.int("vocab")?, p.int("dim")?, p.int("tokens")?);
    if v == 0 {
        return Err("embedding needs vocab ≥ 1".into());
    }
    let mut rng = rng(spec);
    let table = gen::normal(&mut rng, p.dtype("dtype")?, &[v, dim], 1.0);
    let ids: Vec<i64> = (0..t)
        .map(|i| match i {
            0 => 0,
            1 => v as i64 - 1,
            2 => 0,
            _ => rng.below(v) as i64,
        })
        .collect();
    let ids = HostTensor::from_index(p.dtype("ids")?, &[t], &ids);
    op_case(
        spec,
        "embedding",
        vec![("table", table), ("ids", ids)],
        vec![],
        Judging::new(spec).into_fn(),
    )
}

pub static COPY_WINDOW: Family = Family {
    name: "copy_window",
    keys: &[
        def("src", Text(FLOAT_DTYPES), "bf16"),
        def("dst", Text(FLOAT_DTYPES), "bf16"),
        req("src_rows", Int),
        req("src_cols", Int),
        req("dst_rows", Int),
        req("dst_cols", Int),
        opt("dst_split", Int),
        req("rows", Int),
        req("cols", Int),
        def("src_row", Int, "0"),
        def("src_col", Int, "0"),
        def("dst_row", Int, "0"),
        def("dst_col", Int, "0"),
    ],
    outputs: o_copy,
    ops: k_copy,
    source: super::generated,
    build: build_copy_window,
};

/// With `dst_split = s`, dst is `[dst_rows/s, s, dst_cols]` (viewed as
/// `[dst_rows, dst_cols]`). Elements outside the window must be kept.
fn build_copy_window(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let mut rng = rng(spec);
    let src = gen::normal(
        &mut rng,
        p.dtype("src")?,
        &[p.int("src_rows")?, p.int("src_cols")?],
        1.0,
    );
    let (dr, dc) = (p.int("dst_rows")?, p.int("dst_cols")?);
    let shape = match p.opt_int("dst_split")? {
        Some(s) if s > 0 && dr.is_multiple_of(s) => vec![dr / s, s, dc],
        Some(s) => return Err(format!("dst_split {s} does not divide dst_rows {dr}")),
        None => vec![dr, dc],
    };
    let dst = gen::normal(&mut rng, p.dtype("dst")?, &shape, 1.0);
    let params: Vec<(&str, Arg)> = ["src_row", "src_col", "dst_row", "dst_col", "rows", "cols"]
        .iter()
        .map(|k| Ok((*k, Arg::Int(p.int(k)?))))
        .collect::<Result<_, String>>()?;
    op_case(
        spec,
        "copy-window",
        vec![("src", src), ("dst", dst)],
        params,
        Judging::new(spec).into_fn(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_tie_detects_equal_scores() {
        // Two experts with identical weights → identical scores: with
        // topk = 1 and both in the single group, the choice is a tie.
        let x = HostTensor::from_f32(DType::F32, &[1, 2], &[1.0, 0.5]);
        let w = HostTensor::from_f32(
            DType::F32,
            &[4, 2],
            &[1.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0, -1.0],
        );
        assert_eq!(moe_near_ties(&x, &w, None, 1, 1, 1), vec![vec![0, 1]]);
        // topk = 2 takes both tied experts: no tie at the boundary.
        let none: Vec<Vec<i64>> = vec![vec![]];
        assert_eq!(moe_near_ties(&x, &w, None, 1, 1, 2), none);
        // Two groups with equal group scores and topk_group = 1: every
        // expert of both groups is in the band.
        let w2 = HostTensor::from_f32(
            DType::F32,
            &[4, 2],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0],
        );
        assert_eq!(
            moe_near_ties(&x, &w2, None, 2, 1, 1),
            vec![vec![0, 1, 2, 3]]
        );
        // A bias that separates the groups removes the tie.
        let b = HostTensor::from_f32(DType::F32, &[4], &[0.0, 0.0, 0.1, 0.1]);
        assert_eq!(moe_near_ties(&x, &w2, Some(&b), 2, 1, 1), none);
        // Invalid grouping gives no ties instead of a panic.
        assert_eq!(moe_near_ties(&x, &w2, None, 3, 1, 1), none);
    }

    fn params(kv: &[(&str, serde_json::Value)]) -> ParamMap {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn contiguous_layout_blocks_are_constant_and_padded() {
        let m = params(&[
            ("m", 300.into()),
            ("shuffle", 1.into()),
            ("empty", 1.into()),
        ]);
        let idx = contiguous_layout(&P(&m), &mut Rng::new(3), 4).unwrap();
        assert_eq!(idx.len() % 128, 0);
        for block in idx.chunks(128) {
            let g: Vec<i64> = block.iter().copied().filter(|&x| x >= 0).collect();
            assert!(g.windows(2).all(|w| w[0] == w[1]), "mixed block");
            // padding only at the end of a block
            let first_pad = block.iter().position(|&x| x < 0).unwrap_or(128);
            assert!(block[first_pad..].iter().all(|&x| x < 0));
        }
        assert!(!idx.contains(&1), "group 1 should be empty");
        let m = params(&[("blocks", "1:100/0:128".into())]);
        let idx = contiguous_layout(&P(&m), &mut Rng::new(3), 2).unwrap();
        assert_eq!(idx.len(), 256);
        assert_eq!(idx.iter().filter(|&&x| x == 1).count(), 100);
        let bad = params(&[("blocks", "5:10".into())]);
        assert!(contiguous_layout(&P(&bad), &mut Rng::new(3), 2).is_err());
        assert!(contiguous_layout(&P(&params(&[])), &mut Rng::new(3), 2).is_err());
    }
}
