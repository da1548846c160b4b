//! Built-in cases of the single-device ops. Each runs through the same
//! data-driven path as `deepport op` ([`crate::opspec`]).

use super::{Case, JudgeFn};
use crate::error::CliError;
use crate::judge::{self, Check, Cmp};
use crate::opspec::{self, Inputs, Outputs, Params};
use crate::rng::Rng;
use deepport_core::ops::OpKind;
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;

/// A case that runs `op` (command-line name) on `tensors` with `params`.
fn case(
    id: String,
    op: &'static str,
    tensors: Vec<(&str, HostTensor)>,
    params: Vec<String>,
    judge: JudgeFn,
) -> Case {
    let kind = opspec::find(op).map_or(OpKind::Add, |s| s.kind);
    let tensors: BTreeMap<String, HostTensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let source = format!("built-in case {id}");
    Case {
        id,
        ops: vec![kind],
        run: Box::new(move |b| {
            let spec = opspec::find(op)
                .ok_or_else(|| CliError::usage(format!("internal: no op named {op}")))?;
            let inputs = Inputs::new(source.clone(), spec.name, tensors.clone());
            let mut p = Params::parse(spec, &params)?;
            opspec::run(spec, b, &inputs, &mut p)
        }),
        judge,
    }
}

fn params(kv: &[(&str, &str)]) -> Vec<String> {
    kv.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

// ---- judges --------------------------------------------------------------

/// The named output of both runs, or a failed check saying what is missing.
fn pair<'a>(
    a: &'a Outputs,
    r: &'a Outputs,
    name: &str,
) -> Result<(&'a HostTensor, &'a HostTensor), Check> {
    match (a.get(name), r.get(name)) {
        (Some(x), Some(y)) => Ok((x, y)),
        (None, _) => Err(Check::broken(
            format!("{name}.present"),
            "the backend returned no such output",
        )),
        (_, None) => Err(Check::broken(
            format!("{name}.present"),
            "the reference returned no such output",
        )),
    }
}

/// Float values of both, after checking dtype and shape agree.
fn floats(a: &HostTensor, r: &HostTensor, name: &str) -> Result<(Vec<f32>, Vec<f32>), Check> {
    if a.dtype() != r.dtype() || a.shape() != r.shape() {
        return Err(Check::broken(
            format!("{name}.layout"),
            format!(
                "got {} {:?}, reference {} {:?}",
                a.dtype(),
                a.shape(),
                r.dtype(),
                r.shape()
            ),
        ));
    }
    Ok((a.to_f32_vec(), r.to_f32_vec()))
}

/// Every named output must be bit-identical.
fn j_exact(names: &'static [&'static str]) -> JudgeFn {
    Box::new(move |a, r| {
        names
            .iter()
            .map(|n| match pair(a, r, n) {
                Ok((x, y)) => judge::exact(n, x, y),
                Err(c) => c,
            })
            .collect()
    })
}

/// Elementwise `|a − r| ≤ ulps·ulp(dtype, r) + abs_rms·rms(r)` with inf/NaN
/// parity, for each named output (dtype = the output's dtype).
fn j_ulps(names: &'static [&'static str], ulps: f64, abs_rms: f64) -> JudgeFn {
    Box::new(move |a, r| {
        let mut out = Vec::new();
        for n in names {
            let (x, y) = match pair(a, r, n) {
                Ok(p) => p,
                Err(c) => {
                    out.push(c);
                    continue;
                }
            };
            let (av, rv) = match floats(x, y, n) {
                Ok(v) => v,
                Err(c) => {
                    out.push(c);
                    continue;
                }
            };
            let cmp = Cmp::new(n, &av, &rv, y.shape());
            let dtype = y.dtype();
            let abs = abs_rms * judge::rms(&rv);
            let what = if abs_rms == 0.0 {
                format!("err/{ulps}ulp")
            } else {
                format!("err/({ulps}ulp+{abs_rms:.0e}rms)")
            };
            out.push(cmp.tolerance(&what, |v| ulps * judge::ulp(dtype, v) + abs));
            out.push(cmp.nonfinite_parity());
        }
        out
    })
}

/// FP8 GEMM rule (SPEC §3): `calc_diff < 1e-5`, and elementwise
/// `|d − r| ≤ 2·ulp_bf16(r) + 1e-3·rms(r)` (bf16 output) or
/// `|d − r| ≤ 1e-5·max(|r|, rms(r))` (f32 output), on the rows in `mask`.
fn j_fp8(mask: Option<Vec<bool>>) -> JudgeFn {
    Box::new(move |a, r| {
        let (x, y) = match pair(a, r, "d") {
            Ok(p) => p,
            Err(c) => return vec![c],
        };
        let (av, rv) = match floats(x, y, "d") {
            Ok(v) => v,
            Err(c) => return vec![c],
        };
        let mut cmp = Cmp::new("d", &av, &rv, y.shape());
        if let Some(m) = &mask {
            cmp = cmp.masked(m);
        }
        let rms = judge::rms(&cmp.selected_values().1);
        let elem = if y.dtype() == DType::BF16 {
            cmp.tolerance("err/(2ulp_bf16+1e-3rms)", |v| {
                2.0 * judge::ulp(DType::BF16, v) + 1e-3 * rms
            })
        } else {
            cmp.tolerance("err/(1e-5·max(|r|,rms))", |v| {
                1e-5 * (v.abs() as f64).max(rms)
            })
        };
        vec![cmp.calc_diff(1e-5, true), elem, cmp.nonfinite_parity()]
    })
}

/// FlashMLA's rule (SPEC §4): inf/NaN positions identical; out within
/// `8e-4` abs or `2.01/128` rel, lse within `1e-6` abs or `8.01/65536` rel;
/// `calc_diff(out) ≤ 5e-6`.
fn j_mla_decode() -> JudgeFn {
    Box::new(|a, r| {
        let mut checks = Vec::new();
        for (n, atol, rtol) in [("out", 8e-4, 2.01 / 128.0), ("lse", 1e-6, 8.01 / 65536.0)] {
            let (x, y) = match pair(a, r, n) {
                Ok(p) => p,
                Err(c) => {
                    checks.push(c);
                    continue;
                }
            };
            let (av, rv) = match floats(x, y, n) {
                Ok(v) => v,
                Err(c) => {
                    checks.push(c);
                    continue;
                }
            };
            let cmp = Cmp::new(n, &av, &rv, y.shape());
            checks.push(cmp.nonfinite_parity());
            checks.push(cmp.abs_or_rel(atol, rtol));
            if n == "out" {
                checks.insert(0, cmp.calc_diff(5e-6, false));
            }
        }
        checks
    })
}

/// Set equality per token and weights within 1e-6 after sorting by expert
/// id (SPEC §6); tokens in `near_tie` may route differently.
fn j_moe(topk: usize, near_tie: Vec<bool>) -> JudgeFn {
    Box::new(move |a, r| {
        let (ia, ir) = match pair(a, r, "topk_idx") {
            Ok(p) => p,
            Err(c) => return vec![c],
        };
        let (wa, wr) = match pair(a, r, "topk_weights") {
            Ok(p) => p,
            Err(c) => return vec![c],
        };
        let mut checks = judge::routing(
            "topk",
            &ia.to_i64_vec(),
            &wa.to_f32_vec(),
            &ir.to_i64_vec(),
            &wr.to_f32_vec(),
            topk,
            Some(&near_tie),
            1e-6,
        );
        if ia.dtype() != ir.dtype() || ia.shape() != ir.shape() {
            checks.push(Check::broken(
                "topk_idx.layout",
                format!(
                    "got {} {:?}, reference {} {:?}",
                    ia.dtype(),
                    ia.shape(),
                    ir.dtype(),
                    ir.shape()
                ),
            ));
        }
        checks
    })
}

// ---- input builders ------------------------------------------------------

fn normal(rng: &mut Rng, dtype: DType, shape: &[usize], scale: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f32(dtype, shape, &rng.normals(n, scale))
}

/// Random FP8 values (normal · 64, saturating) of the given format.
fn fp8(rng: &mut Rng, fmt: DType, shape: &[usize]) -> HostTensor {
    normal(rng, fmt, shape, 64.0)
}

/// Random positive scales around 1e-3.
fn scales(rng: &mut Rng, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range_f32(0.25, 2.0) * 1e-3).collect();
    HostTensor::from_f32(DType::F32, shape, &v)
}

/// Sets whole rows of a row-major tensor to NaN (FP8 NaN codes included),
/// so a kernel that reads rows it must not read poisons its output.
fn poison_rows(t: &HostTensor, rows: &[bool]) -> HostTensor {
    let row = t.numel() / rows.len().max(1);
    let mut v = t.to_f32_vec();
    for (i, &p) in rows.iter().enumerate() {
        if p {
            v[i * row..(i + 1) * row].fill(f32::NAN);
        }
    }
    HostTensor::from_f32(t.dtype(), t.shape(), &v)
}

fn bf(d: DType) -> &'static str {
    d.short_name()
}

// ---- cases ---------------------------------------------------------------

fn act_quant_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(101);
    for (m, k, xd, fmt, sf) in [
        (37usize, 256usize, DType::BF16, "e4m3", "float"),
        (5, 384, DType::F32, "e4m3", "ue8m0"),
        (9, 128, DType::F16, "e4m3fnuz", "float"),
        (4, 256, DType::F32, "e4m3fnuz", "ue8m0"),
    ] {
        let mut v = rng.normals(m * k, 3.0);
        // Edge rows: all zeros (amax clamps to 1e-4), tiny values, huge
        // values, negative zeros, one outlier per group.
        v[..k].fill(0.0);
        for (j, x) in v[k..2 * k].iter_mut().enumerate() {
            *x = if j % 2 == 0 { 3e-5 } else { -0.0 };
        }
        if m > 2 {
            for (j, x) in v[2 * k..3 * k].iter_mut().enumerate() {
                *x = if j % 128 == 7 {
                    -3.0e4
                } else {
                    (j as f32 - 64.0) * 11.0
                };
            }
        }
        let x = HostTensor::from_f32(xd, &[m, k], &v);
        out.push(case(
            format!(
                "act_quant(m={m},k={k},x={},format={fmt},scale={sf})",
                bf(xd)
            ),
            "act-quant",
            vec![("x", x)],
            params(&[("format", fmt), ("scale_fmt", sf)]),
            j_exact(&["q", "s"]),
        ));
    }
}

fn weight_dequant_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(102);
    for (n, k, wf, od) in [
        (300usize, 200usize, DType::F8E4M3, DType::BF16),
        (130, 257, DType::F8E4M3Fnuz, DType::F32),
    ] {
        let w = fp8(&mut rng, wf, &[n, k]);
        let s = scales(&mut rng, &[n.div_ceil(128), k.div_ceil(128)]);
        out.push(case(
            format!("weight_dequant(n={n},k={k},w={},out={})", bf(wf), bf(od)),
            "weight-dequant",
            vec![("w", w), ("s", s)],
            params(&[("out_dtype", bf(od))]),
            j_ulps(&["out"], 1.0, 0.0),
        ));
    }
}

fn fp8_gemm_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(103);
    for (m, n, k, fmt, od) in [
        (37usize, 576usize, 256usize, DType::F8E4M3, DType::BF16),
        (1, 200, 384, DType::F8E4M3, DType::F32),
        (130, 320, 640, DType::F8E4M3, DType::BF16),
        (17, 128, 128, DType::F8E4M3Fnuz, DType::BF16),
    ] {
        let a = fp8(&mut rng, fmt, &[m, k]);
        let sa = scales(&mut rng, &[m, k.div_ceil(128)]);
        let b = fp8(&mut rng, fmt, &[n, k]);
        let sb = scales(&mut rng, &[n.div_ceil(128), k.div_ceil(128)]);
        out.push(case(
            format!("fp8_gemm(m={m},n={n},k={k},ab={},out={})", bf(fmt), bf(od)),
            "fp8-gemm",
            vec![("a", a), ("sa", sa), ("b", b), ("sb", sb)],
            params(&[("out_dtype", bf(od))]),
            j_fp8(None),
        ));
    }

    // Grouped, contiguous: four 128-row blocks assigned to groups 1, 0, 2, 1;
    // blocks 0 and 2 end in padding rows (-1) whose A rows hold NaN.
    let (g, n, k) = (3usize, 192usize, 256usize);
    let blocks = [(1i64, 100usize), (0, 128), (2, 60), (1, 128)];
    let m_sum = 128 * blocks.len();
    let mut m_idx = Vec::with_capacity(m_sum);
    for &(grp, real) in &blocks {
        m_idx.extend(std::iter::repeat_n(grp, real));
        m_idx.extend(std::iter::repeat_n(-1, 128 - real));
    }
    let pad: Vec<bool> = m_idx.iter().map(|&x| x < 0).collect();
    let a = poison_rows(&fp8(&mut rng, DType::F8E4M3, &[m_sum, k]), &pad);
    let sa = scales(&mut rng, &[m_sum, k / 128]);
    let b = fp8(&mut rng, DType::F8E4M3, &[g, n, k]);
    let sb = scales(&mut rng, &[g, n.div_ceil(128), k / 128]);
    let mask: Vec<bool> = m_idx
        .iter()
        .flat_map(|&x| std::iter::repeat_n(x >= 0, n))
        .collect();
    out.push(case(
        format!("fp8_grouped_contiguous(groups={g},m_sum={m_sum},n={n},k={k},pad=96,out=bf16)"),
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
        params(&[("out_dtype", "bf16")]),
        j_fp8(Some(mask)),
    ));

    // Grouped, masked: rows >= masked_m[g] of A hold NaN and are not judged.
    let (g, m_max, n, k) = (4usize, 64usize, 256usize, 384usize);
    let masked_m = [0i64, 17, 64, 33];
    let live: Vec<bool> = (0..g * m_max)
        .map(|i| ((i % m_max) as i64) < masked_m[i / m_max])
        .collect();
    let dead: Vec<bool> = live.iter().map(|&l| !l).collect();
    let a = poison_rows(&fp8(&mut rng, DType::F8E4M3, &[g, m_max, k]), &dead);
    let sa = scales(&mut rng, &[g, m_max, k / 128]);
    let b = fp8(&mut rng, DType::F8E4M3, &[g, n, k]);
    let sb = scales(&mut rng, &[g, n / 128, k / 128]);
    let mask: Vec<bool> = live
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l, n))
        .collect();
    for od in [DType::BF16, DType::F32] {
        out.push(case(
            format!(
                "fp8_grouped_masked(groups={g},m_max={m_max},masked_m=0/17/64/33,n={n},k={k},out={})",
                bf(od)
            ),
            "fp8-grouped-masked",
            vec![
                ("a", a.clone()),
                ("sa", sa.clone()),
                ("b", b.clone()),
                ("sb", sb.clone()),
                ("masked_m", HostTensor::from_i64(&[g], &masked_m)),
            ],
            params(&[("out_dtype", bf(od))]),
            j_fp8(Some(mask.clone())),
        ));
    }
}

fn gemm_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(104);
    for (m, n, k, d, od) in [
        (33usize, 70usize, 100usize, DType::F32, DType::F32),
        (17, 40, 64, DType::BF16, DType::BF16),
    ] {
        let a = normal(&mut rng, d, &[m, k], 1.0);
        let b = normal(&mut rng, d, &[n, k], 1.0);
        out.push(case(
            format!("gemm(m={m},n={n},k={k},ab={},out={})", bf(d), bf(od)),
            "gemm",
            vec![("a", a), ("b", b)],
            params(&[("out_dtype", bf(od))]),
            j_ulps(&["d"], 1.0, 1e-5),
        ));
    }
}

/// One FlashMLA-style decode case: a permuted block table whose unused
/// entries hold a huge index, and NaN in every cache slot that must not be
/// read (past each sequence's length, and whole unused pages).
#[allow(clippy::too_many_arguments)]
fn mla_decode_case(
    seed: u64,
    lens: &[usize],
    s_q: usize,
    h_q: usize,
    h_kv: usize,
    causal: bool,
    dtype: DType,
    scale: Option<f32>,
) -> Case {
    const D: usize = 576;
    const BLOCK: usize = 64;
    let mut rng = Rng::new(seed);
    let b = lens.len();
    let used: Vec<usize> = lens.iter().map(|&l| l.div_ceil(BLOCK)).collect();
    let max_blocks = used.iter().copied().max().unwrap_or(0) + 1;
    let num_blocks = used.iter().sum::<usize>() + 3;
    let perm = rng.permutation(num_blocks);
    let mut table = vec![(1i64 << 30) + 7; b * max_blocks];
    let mut next = 0;
    for (i, &u) in used.iter().enumerate() {
        for j in 0..u {
            table[i * max_blocks + j] = perm[next] as i64;
            next += 1;
        }
    }
    let mut kc = vec![f32::NAN; num_blocks * BLOCK * h_kv * D];
    for (i, &len) in lens.iter().enumerate() {
        for t in 0..len {
            let blk = table[i * max_blocks + t / BLOCK] as usize;
            let off = (blk * BLOCK + t % BLOCK) * h_kv * D;
            for x in &mut kc[off..off + h_kv * D] {
                *x = rng.normal();
            }
        }
    }
    let q = normal(&mut rng, dtype, &[b, s_q, h_q, D], 1.0);
    let kcache = HostTensor::from_f32(dtype, &[num_blocks, BLOCK, h_kv, D], &kc);
    let lens_i: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
    let mut p = vec![("causal", if causal { "1" } else { "0" })];
    let scale_s = scale.map(|s| s.to_string());
    if let Some(s) = &scale_s {
        p.push(("softmax_scale", s));
    }
    let lens_s = lens
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("/");
    case(
        format!(
            "mla_decode(b={b},s_q={s_q},h_q={h_q},h_kv={h_kv},seqlens={lens_s},causal={},dtype={})",
            causal as u8,
            bf(dtype)
        ),
        "mla-decode",
        vec![
            ("q", q),
            ("kcache", kcache),
            (
                "block_table",
                HostTensor::from_i32(
                    &[b, max_blocks],
                    &table.iter().map(|&x| x as i32).collect::<Vec<_>>(),
                ),
            ),
            ("cache_seqlens", HostTensor::from_i64(&[b], &lens_i)),
        ],
        params(&p),
        j_mla_decode(),
    )
}

fn mla_cases(out: &mut Vec<Case>) {
    out.push(mla_decode_case(
        201,
        &[1, 130, 64],
        1,
        16,
        1,
        false,
        DType::BF16,
        None,
    ));
    out.push(mla_decode_case(
        202,
        &[0, 1, 77],
        2,
        8,
        2,
        true,
        DType::BF16,
        None,
    ));
    out.push(mla_decode_case(
        203,
        &[5, 140],
        4,
        6,
        3,
        true,
        DType::F32,
        Some(0.0625),
    ));

    let mut rng = Rng::new(204);
    for (t, s, h, dn, dr, dc, dv, dt) in [
        (
            7usize,
            12usize,
            3usize,
            32usize,
            16usize,
            64usize,
            24usize,
            DType::F32,
        ),
        (5, 5, 2, 16, 8, 32, 16, DType::BF16),
    ] {
        let q_nope = normal(&mut rng, dt, &[t, h, dn], 1.0);
        let q_pe = normal(&mut rng, dt, &[t, h, dr], 1.0);
        let latent = normal(&mut rng, dt, &[s, dc], 1.0);
        let k_pe = normal(&mut rng, dt, &[s, dr], 1.0);
        let wkv_b = normal(&mut rng, dt, &[h * (dn + dv), dc], (dc as f32).powf(-0.5));
        for form in ["naive", "absorb"] {
            let dv_s = dv.to_string();
            out.push(case(
                format!(
                    "mla_prefill(t={t},s={s},h={h},dn={dn},dr={dr},dc={dc},dv={dv},form={form},dtype={})",
                    bf(dt)
                ),
                "mla-prefill",
                vec![
                    ("q_nope", q_nope.clone()),
                    ("q_pe", q_pe.clone()),
                    ("latent", latent.clone()),
                    ("k_pe", k_pe.clone()),
                    ("wkv_b", wkv_b.clone()),
                ],
                params(&[("form", form), ("head_dim_v", &dv_s)]),
                j_ulps(&["out"], 1.0, 1e-5),
            ));
        }
    }
}

/// Tokens whose routing sits on a near-tie (SPEC §6): the last kept and
/// first dropped group scores, or the k-th and (k+1)-th biased expert
/// scores among the kept groups, within 1e-6 relative. Computed in f64 from
/// the inputs, independently of any backend.
fn moe_near_ties(
    x: &HostTensor,
    w: &HostTensor,
    bias: Option<&HostTensor>,
    n_group: usize,
    topk_group: usize,
    topk: usize,
) -> Vec<bool> {
    let (t, dim) = (x.shape()[0], x.shape()[1]);
    let e = w.shape()[0];
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
                    s + bv.as_ref().map_or(0.0, |b| b[ei] as f64)
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
            let mut tie =
                topk_group < n_group && near(groups[topk_group - 1].0, groups[topk_group].0);
            let mut kept: Vec<f64> = groups[..topk_group]
                .iter()
                .flat_map(|&(_, g)| biased[g * per..(g + 1) * per].to_vec())
                .collect();
            kept.sort_by(|a, b| b.total_cmp(a));
            if topk < kept.len() && near(kept[topk - 1], kept[topk]) {
                tie = true;
            }
            tie
        })
        .collect()
}

fn moe_gate_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(301);
    for (t, e, dim, n_group, topk_group, topk, scale, dt, with_bias) in [
        (
            20usize,
            64usize,
            96usize,
            8usize,
            4usize,
            8usize,
            "2.5",
            DType::BF16,
            true,
        ),
        (11, 32, 64, 4, 2, 6, "1", DType::F32, false),
    ] {
        let x = normal(&mut rng, dt, &[t, dim], 1.0);
        let w = normal(&mut rng, dt, &[e, dim], (dim as f32).powf(-0.5));
        let bias = with_bias.then(|| normal(&mut rng, DType::F32, &[e], 0.1));
        let ties = moe_near_ties(&x, &w, bias.as_ref(), n_group, topk_group, topk);
        let mut tensors = vec![("x", x), ("weight", w)];
        if let Some(b) = bias {
            tensors.push(("bias", b));
        }
        let (ng, tg, tk) = (
            n_group.to_string(),
            topk_group.to_string(),
            topk.to_string(),
        );
        out.push(case(
            format!(
                "moe_gate(t={t},experts={e},dim={dim},n_group={n_group},topk_group={topk_group},topk={topk},bias={},dtype={})",
                with_bias as u8,
                bf(dt)
            ),
            "moe-gate",
            tensors,
            params(&[("n_group", &ng), ("topk_group", &tg), ("topk", &tk), ("route_scale", scale)]),
            j_moe(topk, ties),
        ));
    }
}

fn rope_norm_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(401);
    // Plain RoPE, bf16, [T, H, 64].
    let x = normal(&mut rng, DType::BF16, &[6, 3, 64], 1.0);
    let pos = HostTensor::from_i64(&[6], &[0, 1, 2, 3, 17, 4095]);
    out.push(case(
        "rope(t=6,h=3,d=64,yarn=0,dtype=bf16)".into(),
        "rope",
        vec![("x", x), ("positions", pos)],
        vec![],
        j_ulps(&["y"], 1.0, 1e-6),
    ));
    // YaRN as in DeepSeek-V3 (factor 40, L0 4096, betas 32/1, mscales 1/1),
    // positions past L0, f32.
    let x = normal(&mut rng, DType::F32, &[5, 2, 64], 1.0);
    let pos = HostTensor::from_i32(&[5], &[0, 1, 4096, 70_000, 163_839]);
    out.push(case(
        "rope(t=5,h=2,d=64,yarn=40,dtype=f32)".into(),
        "rope",
        vec![("x", x), ("positions", pos)],
        params(&[
            ("factor", "40"),
            ("original_max_position_embeddings", "4096"),
        ]),
        j_ulps(&["y"], 1.0, 1e-6),
    ));
    // YaRN with unequal mscales (cos/sin scaled), rank-2 x, other theta.
    let x = normal(&mut rng, DType::F32, &[4, 64], 1.0);
    let pos = HostTensor::from_i64(&[4], &[3, 999, 12_345, 65_535]);
    out.push(case(
        "rope(t=4,d=64,yarn=8,mscale=0.707,theta=50000,dtype=f32)".into(),
        "rope",
        vec![("x", x), ("positions", pos)],
        params(&[
            ("factor", "8"),
            ("theta", "50000"),
            ("mscale", "0.707"),
            ("mscale_all_dim", "1"),
            ("beta_fast", "16"),
            ("beta_slow", "2"),
        ]),
        j_ulps(&["y"], 1.0, 1e-6),
    ));

    let x = normal(&mut rng, DType::BF16, &[7, 300], 2.0);
    let w = normal(&mut rng, DType::F32, &[300], 1.0);
    out.push(case(
        "rms_norm(rows=7,dim=300,x=bf16,w=f32)".into(),
        "rms-norm",
        vec![("x", x), ("weight", w)],
        vec![],
        j_ulps(&["y"], 1.0, 1e-5),
    ));
    let mut xv = rng.normals(3 * 4 * 64, 1e-3);
    xv[64..128].fill(0.0); // an all-zero row: y = 0
    let x = HostTensor::from_f32(DType::F32, &[3, 4, 64], &xv);
    let w = normal(&mut rng, DType::BF16, &[64], 1.0);
    out.push(case(
        "rms_norm(rows=12,dim=64,x=f32,w=bf16,eps=1e-5)".into(),
        "rms-norm",
        vec![("x", x), ("weight", w)],
        params(&[("eps", "1e-5")]),
        j_ulps(&["y"], 1.0, 1e-5),
    ));
}

fn elementwise_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(501);
    let g = normal(&mut rng, DType::BF16, &[9, 200], 3.0);
    let u = normal(&mut rng, DType::BF16, &[9, 200], 1.0);
    out.push(case(
        "silu_mul(shape=9x200,dtype=bf16)".into(),
        "silu-mul",
        vec![("gate", g), ("up", u)],
        vec![],
        j_ulps(&["out"], 1.0, 1e-6),
    ));
    // Saturating gates: silu(−100) is a denormal-sized negative, silu(100) = 100.
    let mut gv = rng.normals(1000, 4.0);
    gv[..6].copy_from_slice(&[-100.0, -88.5, -20.0, 20.0, 88.5, 100.0]);
    let g = HostTensor::from_f32(DType::F32, &[1000], &gv);
    let u = normal(&mut rng, DType::F32, &[1000], 1.0);
    out.push(case(
        "silu_mul(shape=1000,dtype=f32)".into(),
        "silu-mul",
        vec![("gate", g), ("up", u)],
        vec![],
        j_ulps(&["out"], 1.0, 1e-6),
    ));

    let a = normal(&mut rng, DType::BF16, &[13, 70], 1.0);
    let b = normal(&mut rng, DType::BF16, &[13, 70], 1.0);
    out.push(case(
        "add(shape=13x70,a=bf16,b=bf16)".into(),
        "add",
        vec![("a", a), ("b", b)],
        vec![],
        j_ulps(&["out"], 1.0, 1e-6),
    ));
    let a = normal(&mut rng, DType::BF16, &[50], 1.0);
    let b = normal(&mut rng, DType::F32, &[50], 1e-3);
    out.push(case(
        "add(shape=50,a=bf16,b=f32)".into(),
        "add",
        vec![("a", a), ("b", b)],
        vec![],
        j_ulps(&["out"], 1.0, 1e-6),
    ));

    let table = normal(&mut rng, DType::BF16, &[50, 40], 1.0);
    let ids = HostTensor::from_i64(&[12], &[0, 49, 3, 3, 17, 0, 25, 48, 1, 2, 49, 30]);
    out.push(case(
        "embedding(vocab=50,dim=40,tokens=12,ids=i64,dtype=bf16)".into(),
        "embedding",
        vec![("table", table), ("ids", ids)],
        vec![],
        j_exact(&["out"]),
    ));
    let table = normal(&mut rng, DType::F32, &[7, 3], 1.0);
    let ids = HostTensor::from_i32(&[5], &[6, 0, 6, 1, 5]);
    out.push(case(
        "embedding(vocab=7,dim=3,tokens=5,ids=i32,dtype=f32)".into(),
        "embedding",
        vec![("table", table), ("ids", ids)],
        vec![],
        j_exact(&["out"]),
    ));
}

fn copy_window_cases(out: &mut Vec<Case>) {
    let mut rng = Rng::new(701);
    // f32 → bf16 into the middle of a 3-d dst (viewed as [8, 8]); bf16 → f32.
    let src = normal(&mut rng, DType::F32, &[6, 10], 1.0);
    let dst = normal(&mut rng, DType::BF16, &[4, 2, 8], 1.0);
    out.push(case(
        "copy_window(src=f32[6x10],dst=bf16[8x8],window=3x5,from=2/4,to=4/1)".into(),
        "copy-window",
        vec![("src", src), ("dst", dst)],
        params(&[
            ("src_row", "2"),
            ("src_col", "4"),
            ("dst_row", "4"),
            ("dst_col", "1"),
            ("rows", "3"),
            ("cols", "5"),
        ]),
        j_exact(&["dst"]),
    ));
    let src = normal(&mut rng, DType::BF16, &[5, 576], 1.0);
    let dst = normal(&mut rng, DType::F32, &[7, 640], 1.0);
    out.push(case(
        "copy_window(src=bf16[5x576],dst=f32[7x640],window=5x576,from=0/0,to=1/64)".into(),
        "copy-window",
        vec![("src", src), ("dst", dst)],
        params(&[("dst_row", "1"), ("dst_col", "64")]),
        j_exact(&["dst"]),
    ));
}

/// All single-device cases.
pub(super) fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    act_quant_cases(&mut v);
    weight_dequant_cases(&mut v);
    fp8_gemm_cases(&mut v);
    gemm_cases(&mut v);
    mla_cases(&mut v);
    moe_gate_cases(&mut v);
    rope_norm_cases(&mut v);
    elementwise_cases(&mut v);
    copy_window_cases(&mut v);
    v
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
        assert_eq!(moe_near_ties(&x, &w, None, 1, 1, 1), vec![true]);
        // topk = 2 takes both tied experts: no tie at the boundary.
        assert_eq!(moe_near_ties(&x, &w, None, 1, 1, 2), vec![false]);
        // Two groups with equal group scores and topk_group = 1: a tie.
        let w2 = HostTensor::from_f32(
            DType::F32,
            &[4, 2],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0],
        );
        assert_eq!(moe_near_ties(&x, &w2, None, 2, 1, 1), vec![true]);
    }

    fn outs(items: &[(&str, HostTensor)]) -> Outputs {
        items
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    #[test]
    fn fp8_judge_catches_one_wrong_block_scale() {
        // d [256, 256] bf16 of unit-scale values; the "backend" applied a
        // scale off by 2^-4 on one 128x128 block.
        let mut rng = Rng::new(9);
        let r: Vec<f32> = rng.normals(256 * 256, 1.0);
        let mut a = r.clone();
        for i in 0..128 {
            for j in 128..256 {
                a[i * 256 + j] *= 1.0 + 1.0 / 16.0;
            }
        }
        let rt = HostTensor::from_f32(DType::BF16, &[256, 256], &r);
        let at = HostTensor::from_f32(DType::BF16, &[256, 256], &a);
        let j = j_fp8(None);
        assert!(judge::all_passed(&j(
            &outs(&[("d", rt.clone())]),
            &outs(&[("d", rt.clone())])
        )));
        let checks = j(&outs(&[("d", at)]), &outs(&[("d", rt.clone())]));
        assert!(!judge::all_passed(&checks), "{checks:?}");
        // The same error only on masked-out rows passes.
        let mask: Vec<bool> = (0..256 * 256).map(|i| i / 256 >= 128).collect();
        let mut a2 = r.clone();
        a2[5] = f32::NAN;
        let checks = j_fp8(Some(mask))(
            &outs(&[("d", HostTensor::from_f32(DType::BF16, &[256, 256], &a2))]),
            &outs(&[("d", rt)]),
        );
        assert!(judge::all_passed(&checks), "{checks:?}");
    }

    #[test]
    fn mla_decode_judge_catches_nan_and_inf_mismatch() {
        let r_out = HostTensor::from_f32(DType::BF16, &[1, 1, 2, 2], &[0.5, -0.25, 0.0, 0.0]);
        let r_lse = HostTensor::from_f32(DType::F32, &[1, 2, 1], &[1.5, f32::INFINITY]);
        let reference = outs(&[("out", r_out.clone()), ("lse", r_lse.clone())]);
        let j = j_mla_decode();
        assert!(judge::all_passed(&j(&reference, &reference)));
        // An empty row whose lse is finite instead of +inf.
        let bad_lse = HostTensor::from_f32(DType::F32, &[1, 2, 1], &[1.5, 0.0]);
        let c = j(
            &outs(&[("out", r_out.clone()), ("lse", bad_lse)]),
            &reference,
        );
        assert!(!judge::all_passed(&c));
        // One output element left NaN (unwritten).
        let bad_out = HostTensor::from_f32(DType::BF16, &[1, 1, 2, 2], &[0.5, f32::NAN, 0.0, 0.0]);
        let c = j(
            &outs(&[("out", bad_out), ("lse", r_lse.clone())]),
            &reference,
        );
        assert!(!judge::all_passed(&c));
        // A missing output.
        let c = j(&outs(&[("out", r_out)]), &reference);
        assert!(!judge::all_passed(&c));
    }

    #[test]
    fn poison_rows_marks_whole_rows() {
        let t = HostTensor::from_f32(DType::F8E4M3, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let p = poison_rows(&t, &[false, true, false]);
        let v = p.to_f32_vec();
        assert_eq!(&v[..2], &[1.0, 2.0]);
        assert!(v[2].is_nan() && v[3].is_nan());
        assert_eq!(&v[4..], &[5.0, 6.0]);
    }
}
