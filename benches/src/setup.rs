//! Ready-to-run benchmark cases: inputs on a backend for one op at one
//! shape, and the op launch to time. Shared by `deepport bench` and the
//! criterion benchmarks, so both measure the same thing.

use crate::{Shape, Workload};
use deepport_core::backend::{alloc_poisoned, Backend, Tensor};
use deepport_core::ops::{self, Fp8Gemm, Fp8GroupedContiguous, Fp8GroupedMasked, Gemm, MlaDecode};
use deepport_core::{DType, Error, HostTensor, Result};

/// The ops `deepport bench` knows, with the shape parameters each takes
/// (and their defaults where one exists).
pub const BENCH_OPS: &[(&str, &[&str])] = &[
    ("fp8_gemm", &["m", "n", "k"]),
    ("fp8_grouped_contiguous", &["g", "m", "n", "k"]),
    ("fp8_grouped_masked", &["g", "m", "n", "k", "expected_m"]),
    ("gemm", &["m", "n", "k"]),
    ("gemm_f32", &["m", "n", "k"]),
    ("mla_decode", &["b", "s_q", "h_q", "s_k"]),
];

/// Inputs of one op at one shape, resident on a backend.
pub struct Prepared {
    /// What the case moves and computes.
    pub workload: Workload,
    inputs: Inputs,
}

enum Inputs {
    Fp8 {
        a: Tensor,
        sa: Tensor,
        b: Tensor,
        sb: Tensor,
        /// `m_indices` (contiguous) or `masked_m` (masked).
        layout: Option<Tensor>,
        masked: bool,
        d: Tensor,
    },
    Gemm {
        a: Tensor,
        b: Tensor,
        d: Tensor,
    },
    Mla {
        q: Tensor,
        kcache: Tensor,
        block_table: Tensor,
        seqlens: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: f32,
    },
}

/// Deterministic values in `[-scale, scale)` (xorshift; not a statistical
/// generator, only inputs that are not all alike).
pub fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn bad(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("bench {op}: {msg}"))
}

/// Gets a shape parameter, which must be positive.
fn dim(op: &str, shape: &Shape, name: &str) -> Result<usize> {
    match shape.get(name) {
        Some(0) => Err(bad(op, format!("{name} must be positive"))),
        Some(&v) => Ok(v),
        None => Err(bad(
            op,
            format!(
                "the shape has no `{name}` (it needs {})",
                BENCH_OPS
                    .iter()
                    .find(|(o, _)| *o == op)
                    .map_or(String::new(), |(_, p)| p.join(", "))
            ),
        )),
    }
}

/// Number of elements of `shape`, or an error when it overflows.
fn numel(op: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(op, format!("tensor {shape:?} is too large")))
}

/// Bytes the inputs and outputs of `op` at `shape` take on the device, so a
/// caller can check them against a memory budget before allocating.
pub fn footprint(op: &str, shape: &Shape) -> Result<u64> {
    let w = workload(op, shape)?;
    // Every tensor is read or written at least once: the workload's bytes
    // bound the footprint from below, and inputs are stored at most at
    // 4 bytes per element where the workload counts 1 or 2.
    Ok((w.bytes * 2.0).min(u64::MAX as f64) as u64)
}

/// The workload (FLOP and bytes by DeepSeek's formulas) of `op` at `shape`.
pub fn workload(op: &str, shape: &Shape) -> Result<Workload> {
    let d = |n| dim(op, shape, n);
    Ok(match op {
        "fp8_gemm" => crate::fp8_gemm(d("m")?, d("n")?, d("k")?),
        "fp8_grouped_contiguous" => {
            crate::fp8_grouped_contiguous(d("g")?, d("m")?, d("n")?, d("k")?)
        }
        "fp8_grouped_masked" => {
            let (m, e) = (d("m")?, d("expected_m")?);
            if e > m {
                return Err(bad(op, format!("expected_m = {e} exceeds m = {m}")));
            }
            crate::fp8_grouped_masked(d("g")?, m, e, d("n")?, d("k")?)
        }
        "gemm" => crate::gemm_bf16(d("m")?, d("n")?, d("k")?),
        "gemm_f32" => crate::gemm_f32(d("m")?, d("n")?, d("k")?),
        "mla_decode" => crate::mla_decode(d("b")?, d("s_q")?, d("h_q")?, d("s_k")?),
        _ => return Err(unknown(op)),
    })
}

fn unknown(op: &str) -> Error {
    Error::Other(format!(
        "bench: no benchmark for op `{op}` (known: {})",
        BENCH_OPS
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Uploads FP8 operands `[lead.., rows, k]` with 1×128 (activation) or
/// 128×128 (weight) scales.
fn fp8_operand(
    be: &dyn Backend,
    op: &str,
    lead: &[usize],
    rows: usize,
    k: usize,
    weight: bool,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let mut shape = lead.to_vec();
    shape.extend([rows, k]);
    let n = numel(op, &shape)?;
    let x = be.upload(&HostTensor::from_f32(
        DType::F8E4M3,
        &shape,
        &rand_f32(n, seed, 400.0),
    ))?;
    let kb = k.div_ceil(128);
    let mut sshape = lead.to_vec();
    if weight {
        sshape.extend([rows.div_ceil(128), kb]);
    } else {
        sshape.extend([rows, kb]);
    }
    let sn = numel(op, &sshape)?;
    let s: Vec<f32> = rand_f32(sn, seed + 1, 1.0)
        .iter()
        .map(|v| (v.abs() + 0.5) * 1e-3)
        .collect();
    let sx = be.upload(&HostTensor::from_f32(DType::F32, &sshape, &s))?;
    Ok((x, sx))
}

impl Prepared {
    /// Uploads the inputs of `op` at `shape` to `be` and allocates its
    /// outputs (poisoned, so an op that writes nothing is not faster).
    pub fn new(be: &dyn Backend, op: &str, shape: &Shape) -> Result<Self> {
        let workload = workload(op, shape)?;
        let d = |n| dim(op, shape, n);
        let inputs = match op {
            "fp8_gemm" => {
                let (m, n, k) = (d("m")?, d("n")?, d("k")?);
                let (a, sa) = fp8_operand(be, op, &[], m, k, false, 1)?;
                let (b, sb) = fp8_operand(be, op, &[], n, k, true, 3)?;
                let dd = alloc_poisoned(be, DType::BF16, &[m, n])?;
                Inputs::Fp8 {
                    a,
                    sa,
                    b,
                    sb,
                    layout: None,
                    masked: false,
                    d: dd,
                }
            }
            "fp8_grouped_contiguous" => {
                let (g, m, n, k) = (d("g")?, d("m")?, d("n")?, d("k")?);
                let rows = numel(op, &[g, m])?;
                let (a, sa) = fp8_operand(be, op, &[], rows, k, false, 1)?;
                let (b, sb) = fp8_operand(be, op, &[g], n, k, true, 3)?;
                // m rows per group, in group order (DeepGEMM's benchmark
                // layout: every group's rows aligned to the block size).
                let idx: Vec<i32> = (0..rows).map(|i| (i / m) as i32).collect();
                let layout = be.upload(&HostTensor::from_i32(&[rows], &idx))?;
                let dd = alloc_poisoned(be, DType::BF16, &[rows, n])?;
                Inputs::Fp8 {
                    a,
                    sa,
                    b,
                    sb,
                    layout: Some(layout),
                    masked: false,
                    d: dd,
                }
            }
            "fp8_grouped_masked" => {
                let (g, m, n, k, e) = (d("g")?, d("m")?, d("n")?, d("k")?, d("expected_m")?);
                if e > m {
                    return Err(bad(op, format!("expected_m = {e} exceeds m = {m}")));
                }
                let (a, sa) = fp8_operand(be, op, &[g], m, k, false, 1)?;
                let (b, sb) = fp8_operand(be, op, &[g], n, k, true, 3)?;
                let layout = be.upload(&HostTensor::from_i32(&[g], &vec![e as i32; g]))?;
                let dd = alloc_poisoned(be, DType::BF16, &[g, m, n])?;
                Inputs::Fp8 {
                    a,
                    sa,
                    b,
                    sb,
                    layout: Some(layout),
                    masked: true,
                    d: dd,
                }
            }
            "gemm" | "gemm_f32" => {
                let dt = if op == "gemm" {
                    DType::BF16
                } else {
                    DType::F32
                };
                let (m, n, k) = (d("m")?, d("n")?, d("k")?);
                let a = be.upload(&HostTensor::from_f32(
                    dt,
                    &[m, k],
                    &rand_f32(numel(op, &[m, k])?, 1, 1.0),
                ))?;
                let b = be.upload(&HostTensor::from_f32(
                    dt,
                    &[n, k],
                    &rand_f32(numel(op, &[n, k])?, 2, 1.0),
                ))?;
                let dd = alloc_poisoned(be, dt, &[m, n])?;
                Inputs::Gemm { a, b, d: dd }
            }
            "mla_decode" => {
                let (b, s_q, h_q, s_k) = (d("b")?, d("s_q")?, d("h_q")?, d("s_k")?);
                let (dk, dv, bs) = (576, 512, 64);
                let nblk = s_k.div_ceil(bs);
                let q = be.upload(&HostTensor::from_f32(
                    DType::BF16,
                    &[b, s_q, h_q, dk],
                    &rand_f32(numel(op, &[b, s_q, h_q, dk])?, 3, 1.0),
                ))?;
                let blocks = numel(op, &[b, nblk])?;
                let kcache = be.upload(&HostTensor::from_f32(
                    DType::BF16,
                    &[blocks, bs, 1, dk],
                    &rand_f32(numel(op, &[blocks, bs, dk])?, 4, 1.0),
                ))?;
                // Every sequence owns its blocks, in a permuted order so
                // the kernel cannot assume contiguity.
                let table: Vec<i32> = (0..blocks).map(|i| ((i * 7919) % blocks) as i32).collect();
                let block_table = be.upload(&HostTensor::from_i32(&[b, nblk], &table))?;
                let seqlens = be.upload(&HostTensor::from_i32(&[b], &vec![s_k as i32; b]))?;
                let out = alloc_poisoned(be, DType::BF16, &[b, s_q, h_q, dv])?;
                let lse = alloc_poisoned(be, DType::F32, &[b, h_q, s_q])?;
                Inputs::Mla {
                    q,
                    kcache,
                    block_table,
                    seqlens,
                    out,
                    lse,
                    scale: (dk as f32).powf(-0.5),
                }
            }
            _ => return Err(unknown(op)),
        };
        Ok(Prepared { workload, inputs })
    }

    /// Launches the op once (without synchronizing: the caller times a
    /// batch of launches and synchronizes at its end).
    pub fn launch(&mut self, be: &dyn Backend) -> Result<()> {
        match &mut self.inputs {
            Inputs::Fp8 {
                a,
                sa,
                b,
                sb,
                layout,
                masked,
                d,
            } => match (layout, *masked) {
                (None, _) => ops::run(be, Fp8Gemm { a, sa, b, sb, d }),
                (Some(m_indices), false) => ops::run(
                    be,
                    Fp8GroupedContiguous {
                        a,
                        sa,
                        b,
                        sb,
                        m_indices,
                        d,
                    },
                ),
                (Some(masked_m), true) => ops::run(
                    be,
                    Fp8GroupedMasked {
                        a,
                        sa,
                        b,
                        sb,
                        masked_m,
                        d,
                    },
                ),
            },
            Inputs::Gemm { a, b, d } => ops::run(be, Gemm { a, b, d }),
            Inputs::Mla {
                q,
                kcache,
                block_table,
                seqlens,
                out,
                lse,
                scale,
            } => ops::run(
                be,
                MlaDecode {
                    q,
                    kcache,
                    block_table,
                    cache_seqlens: seqlens,
                    out,
                    lse,
                    softmax_scale: *scale,
                    causal: false,
                },
            ),
        }
    }
}
