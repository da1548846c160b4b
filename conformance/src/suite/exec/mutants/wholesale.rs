//! Backends that are wrong on purpose: every smoke case must catch them
//! (perturbed outputs, unwritten outputs, panics, nothing implemented).

use super::super::{run_spec, RefCache, Reference};
use crate::suite::catalogue;
use crate::types::{CaseSpec, Outcome};
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};
use deepport_cpu::CpuRef;
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Runs the reference, then perturbs every downloaded tensor, scaling
    /// floats by this factor.
    Perturb(f32),
    /// Local ops return Ok without writing their outputs.
    Lazy,
    /// Every op panics.
    Panic,
}

struct Mutant(Mode);

/// Scales floats by `scale`, flips the low bit of FP8 codes, adds 1 to
/// integers and flips bools.
fn perturb(h: HostTensor, scale: f32) -> HostTensor {
    match h.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => {
            let v: Vec<f32> = h.to_f32_vec().iter().map(|x| x * scale).collect();
            HostTensor::from_f32(h.dtype(), h.shape(), &v)
        }
        DType::I32 | DType::I64 => {
            let v: Vec<i64> = h.to_i64_vec().iter().map(|x| x + 1).collect();
            HostTensor::from_index(h.dtype(), h.shape(), &v)
        }
        _ => {
            let (d, s) = (h.dtype(), h.shape().to_vec());
            let b: Vec<u8> = h.into_bytes().iter().map(|b| b ^ 1).collect();
            HostTensor::from_bytes(d, &s, b).unwrap()
        }
    }
}

macro_rules! local {
    ($($m:ident: $t:ident),* $(,)?) => {$(
        fn $m(&self, op: &mut Checked<$t<'_>>) -> Result<()> {
            match self.0 {
                Mode::Perturb(_) => CpuRef.$m(op),
                Mode::Lazy => Ok(()),
                Mode::Panic => panic!("mutant {}", stringify!($m)),
            }
        }
    )*};
}

impl Backend for Mutant {
    fn name(&self) -> &str {
        "mutant"
    }
    fn instance(&self) -> InstanceId {
        CpuRef.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo::default()
    }
    fn supports(&self, _op: OpKind, _dtypes: &[DType]) -> Support {
        Support::Supported
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        CpuRef.alloc(dtype, shape)
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        CpuRef.upload(host)
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let h = CpuRef.download(t)?;
        Ok(match self.0 {
            Mode::Perturb(scale) => perturb(h, scale),
            _ => h,
        })
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        CpuRef.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    local! {
        act_quant: ActQuant, weight_dequant: WeightDequant, fp8_gemm: Fp8Gemm,
        fp8_grouped_contiguous: Fp8GroupedContiguous, fp8_grouped_masked: Fp8GroupedMasked,
        gemm: Gemm, gemm_grouped_contiguous: GemmGroupedContiguous,
        gemm_grouped_masked: GemmGroupedMasked, mla_decode: MlaDecode, mla_prefill: MlaPrefill, rms_norm: RmsNorm,
        rope: Rope, moe_gate: MoeGate, silu_mul: SiluMul, embedding: Embedding, add: Add,
        copy_window: CopyWindow, get_dispatch_layout: GetDispatchLayout,
        gather_rows: GatherRows, reduce_rows: ReduceRows,
        indexer_logits: IndexerLogits, indexer_topk: IndexerTopk,
        sparse_mla_decode: SparseMlaDecode, cache_quant: CacheQuant,
        sparse_mla_prefill: SparseMlaPrefill,
    }
}

/// A backend that implements nothing: every op is NotSupported.
struct Bare;

impl Backend for Bare {
    fn name(&self) -> &str {
        "bare"
    }
    fn instance(&self) -> InstanceId {
        CpuRef.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo::default()
    }
    fn supports(&self, op: OpKind, _dtypes: &[DType]) -> Support {
        Support::NotSupported(format!("{op} is not written"))
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        CpuRef.alloc(dtype, shape)
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        CpuRef.upload(host)
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        CpuRef.download(t)
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        CpuRef.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The smoke cases, run on `b` and judged against cpu-ref through a
/// reference cache shared by these tests.
fn outcomes(b: &dyn Backend, filter: impl Fn(&CaseSpec) -> bool) -> Vec<(String, Outcome, String)> {
    let all = catalogue::load(&catalogue::default_dir()).expect("the catalogue loads");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("deepport-exec-mutants-{}", std::process::id()));
    let cache = RefCache::at(dir);
    catalogue::select(&all, "smoke", None)
        .iter()
        .filter(|s| filter(s))
        .map(|s| {
            let r = run_spec(
                s,
                b,
                &DeviceInfo::default(),
                Reference {
                    backend: &CpuRef,
                    cache: &cache,
                },
            );
            (r.id, r.outcome, r.message)
        })
        .collect()
}

/// Expert-parallel cases that move data between ranks (dispatch and
/// combine go through the reference in every mutant but `Perturb`).
fn is_ep(s: &CaseSpec) -> bool {
    s.family == "ep" && s.params.get("op").and_then(|v| v.as_str()) != Some("layout")
}

#[test]
fn the_reference_is_conformant_against_itself() {
    let r = outcomes(&CpuRef, |_| true);
    assert!(r.len() > 20, "{}", r.len());
    for (id, o, m) in r {
        assert!(o.is_conformant(), "{id}: {o} {m}");
    }
}

/// Every result whose outcome `ok` rejects, one per line.
fn offenders(r: &[(String, Outcome, String)], ok: impl Fn(Outcome) -> bool) -> String {
    r.iter()
        .filter(|(_, o, _)| !ok(*o))
        .map(|(id, o, m)| format!("  {id}: {o} {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Scaling every float output by 1 + 2^-5 (about four bf16 ulps) is never
/// a clean pass (it may be a QualityWarning where the warning band is that
/// wide); scaling by 1.25 is always a Fail.
#[test]
fn every_case_catches_perturbed_outputs() {
    let r = outcomes(&Mutant(Mode::Perturb(1.0 + 1.0 / 32.0)), |_| true);
    let bad = offenders(&r, |o| o != Outcome::Pass);
    assert!(bad.is_empty(), "cases that pass perturbed outputs:\n{bad}");
    let r = outcomes(&Mutant(Mode::Perturb(1.25)), |_| true);
    let bad = offenders(&r, |o| o == Outcome::Fail);
    assert!(
        bad.is_empty(),
        "cases that do not fail perturbed outputs:\n{bad}"
    );
}

#[test]
fn every_local_case_catches_unwritten_outputs() {
    let r = outcomes(&Mutant(Mode::Lazy), |s| !is_ep(s));
    assert!(r.len() > 10, "{}", r.len());
    let bad = offenders(&r, |o| o == Outcome::Fail);
    assert!(
        bad.is_empty(),
        "cases that do not fail unwritten outputs:\n{bad}"
    );
}

#[test]
fn panics_fail_and_missing_ops_are_not_supported() {
    let r = outcomes(&Mutant(Mode::Panic), |_| true);
    for (id, o, m) in &r {
        assert_eq!(*o, Outcome::Fail, "{id}: {m}");
        assert!(m.contains("panicked"), "{id}: {m}");
    }
    for (id, o, m) in outcomes(&Bare, |_| true) {
        assert_eq!(o, Outcome::NotSupported, "{id}: {m}");
    }
}
