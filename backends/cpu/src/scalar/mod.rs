//! The specification of the oracle: every local op of `cpu-ref` as the
//! plainest loops, one output element after another, f64 accumulation,
//! one rounding.
//!
//! `cpu-ref`'s own kernels (`dense`, `grouped`, `mla`, `copy`, `ep`, `sparse` at the crate root)
//! compute every output element with exactly this arithmetic (the same
//! operations in the same order, the same single rounding), only in
//! parallel across output elements and restructured so that independent
//! outputs vectorize. `tests/oracle_bitexact.rs` compares the two bit for
//! bit on random cases of every op, through [`CpuScalar`].
//!
//! Not part of the public API: this module exists for that test and for
//! the speed comparison in `benches/`.

pub mod copy;
pub mod dense;
pub mod ep;
pub mod grouped;
pub mod mla;
pub mod sparse;

use crate::CpuRef;
use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, HostTensor, Result};

/// A backend that runs [`scalar`](self)'s loops: `cpu-ref` without its
/// speed. It is not registered; it shares `cpu-ref`'s memory (its tensors
/// are `cpu-ref` tensors), so one upload serves both.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuScalar;

macro_rules! scalar_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            kernels::$method(op)
        }
    )*};
}

/// Every local op's specification, by its method name.
mod kernels {
    pub(crate) use super::copy::{copy_window, gather_rows, reduce_rows};
    pub(crate) use super::dense::*;
    pub(crate) use super::ep::get_dispatch_layout;
    pub(crate) use super::grouped::{gemm_grouped_contiguous, gemm_grouped_masked};
    pub(crate) use super::mla::*;
    pub(crate) use super::sparse::{
        cache_quant, indexer_logits, indexer_topk, sparse_mla_decode, sparse_mla_prefill,
    };
}

impl Backend for CpuScalar {
    fn name(&self) -> &str {
        "cpu-scalar"
    }
    fn instance(&self) -> InstanceId {
        CpuRef.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "cpu-scalar".into(),
            device: CpuRef.info().device,
            driver: format!(
                "deepport-cpu {} (the oracle's plain scalar loops)",
                env!("CARGO_PKG_VERSION")
            ),
            vendor: "cpu".into(),
        }
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
        CpuRef.download(t)
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        CpuRef.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    deepport_core::for_each_local_op!(scalar_local_ops);
}
