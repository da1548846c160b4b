//! The `gemm_grouped` family: the grouped plain GEMMs (f32/bf16) in both
//! layouts, `gemm_grouped_contiguous` (`layout: contiguous`) and
//! `gemm_grouped_masked` (`layout: masked`).
//!
//! Inputs: `a` normal, `b` normal / √k (outputs of unit scale), in `ab`.
//! Contiguous: rows of `a` get groups from explicit 128-row blocks
//! (`blocks: "g:rows/…"`), from DeepGEMM's generator (`m` rows per group
//! ·U(0.7, 1.3), padded to 128 with −1, blocks optionally `shuffle`d, group
//! 1 `empty`), or, with `interleave`, one random group (or −1) per row —
//! a layout DeepGEMM does not produce but the op defines. Padding rows of
//! `a` hold NaN and their output is not judged. Masked: `masked_m`
//! explicit or `⌊m·U(0.7, 1.3)⌋` capped at `m_max`; rows past it hold NaN in
//! `a` and are not judged.

use super::gen::{self, poison_rows, row_mask};
use super::judging::Judging;
use super::{def, op_case, opt, req, Case, Family, KeyKind, ParamMap, FLOAT_DTYPES, P};
use crate::opspec::Arg;
use crate::rng::Rng;
use crate::suite::CaseSpec;
use deepport_core::ops::OpKind;
use deepport_core::{DType, HostTensor};

use KeyKind::{Flag, Int, Text};

fn is_masked(p: &ParamMap) -> bool {
    p.get("layout").and_then(|v| v.as_str()) == Some("masked")
}

fn kind(p: &ParamMap) -> OpKind {
    if is_masked(p) {
        OpKind::GemmGroupedMasked
    } else {
        OpKind::GemmGroupedContiguous
    }
}

fn ops(p: &ParamMap) -> Vec<OpKind> {
    vec![kind(p)]
}

fn outputs(p: &ParamMap) -> Vec<&'static str> {
    super::declared_outputs(kind(p))
}

/// The family (registered in [`super::FAMILIES`]).
pub static GEMM_GROUPED: Family = Family {
    name: "gemm_grouped",
    keys: &[
        req("layout", Text(&["contiguous", "masked"])),
        req("groups", Int),
        opt("m", Int),
        opt("blocks", Text(&[])),
        opt("m_max", Int),
        opt("masked_m", Text(&[])),
        req("n", Int),
        req("k", Int),
        def("ab", Text(&["f32", "bf16"]), "bf16"),
        def("out", Text(FLOAT_DTYPES), "bf16"),
        def("shuffle", Flag, "0"),
        def("empty", Flag, "0"),
        def("interleave", Flag, "0"),
    ],
    outputs,
    ops,
    source: super::generated,
    build,
};

/// The group of each row of the contiguous layout (−1 = padding).
fn layout(p: &P, rng: &mut Rng, groups: usize) -> Result<Vec<i64>, String> {
    if let Some(b) = p.opt_text("blocks")? {
        let mut idx = Vec::new();
        for item in b.split('/') {
            let (g, rows) = item
                .split_once(':')
                .and_then(|(g, r)| Some((g.trim().parse::<i64>().ok()?, r.trim().parse().ok()?)))
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
        .ok_or("gemm_grouped (contiguous) needs `m` (expected rows per group) or `blocks`")?;
    if p.flag("interleave")? {
        // Any group (or padding) on any row, about m rows per group.
        let rows = m * groups;
        return Ok((0..rows)
            .map(|_| rng.below(groups + 1) as i64 - 1)
            .collect());
    }
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

fn build(spec: &CaseSpec) -> Result<Case, String> {
    let p = P(&spec.params);
    let (g, n, k) = (p.int("groups")?, p.int("n")?, p.int("k")?);
    let ab = p.dtype("ab")?;
    let mut rng = Rng::new(spec.seed);
    let b_scale = (k.max(1) as f32).powf(-0.5);
    let params = vec![("out_dtype", Arg::Text(p.text("out")?))];
    if is_masked(&spec.params) {
        let m_max = p
            .opt_int("m_max")?
            .ok_or("gemm_grouped (masked) needs `m_max`")?;
        let masked: Vec<usize> = match p.ints("masked_m")? {
            Some(v) => v,
            None => {
                let m = p.opt_int("m")?.ok_or(
                    "gemm_grouped (masked) needs `m` (expected rows per group) or `masked_m`",
                )?;
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
        let a = poison_rows(gen::normal(&mut rng, ab, &[g, m_max, k], 1.0), &dead);
        let b = gen::normal(&mut rng, ab, &[g, n, k], b_scale);
        let mm: Vec<i64> = masked.iter().map(|&x| x as i64).collect();
        return op_case(
            spec,
            "gemm-grouped-masked",
            vec![
                ("a", a),
                ("b", b),
                ("masked_m", HostTensor::from_i64(&[g], &mm)),
            ],
            params,
            Judging::new(spec).mask("d", row_mask(&live, n)).into_fn(),
        );
    }
    let m_idx = layout(&p, &mut rng, g)?;
    let m_sum = m_idx.len();
    let pad: Vec<bool> = m_idx.iter().map(|&x| x < 0).collect();
    let a = poison_rows(gen::normal(&mut rng, ab, &[m_sum, k], 1.0), &pad);
    let b = gen::normal(&mut rng, ab, &[g, n, k], b_scale);
    let live: Vec<bool> = pad.iter().map(|&x| !x).collect();
    op_case(
        spec,
        "gemm-grouped-contiguous",
        vec![
            ("a", a),
            ("b", b),
            (
                "m_indices",
                HostTensor::from_index(DType::I32, &[m_sum], &m_idx),
            ),
        ],
        params,
        Judging::new(spec).mask("d", row_mask(&live, n)).into_fn(),
    )
}
