//! Op glue: one function per local op, `fn op(cx, &mut Checked<Op>)`,
//! grouped by family. Each picks a kernel (the sm_90a path on Hopper where
//! there is one), computes the launch geometry in plain Rust, and launches.

pub(crate) mod dense;
pub(crate) mod mla;
pub(crate) mod small;
pub(crate) mod sparse;

pub(crate) use dense::*;
pub(crate) use mla::*;
pub(crate) use small::*;
pub(crate) use sparse::*;

/// The op glue of every local op, public so that another backend whose
/// device runs the same kernel sources (the ROCm backend, through
/// `port.cuh` under `DP_HIP`) drives them through its own
/// [`crate::launch::LaunchContext`] instead of copying this glue.
pub mod glue {
    pub use super::dense::{
        act_quant, check_index, fp8_gemm, fp8_grouped_contiguous, fp8_grouped_masked, gemm,
        gemm_grouped_contiguous, gemm_grouped_masked, weight_dequant,
    };
    pub use super::mla::{mla_decode, mla_prefill, rope};
    pub use super::small::{
        add, copy_window, embedding, gather_rows, get_dispatch_layout, moe_gate, reduce_rows,
        rms_norm, silu_mul,
    };
    pub use super::sparse::{
        cache_quant, indexer_logits, indexer_topk, sparse_mla_decode, sparse_mla_prefill,
    };
}

/// Every kernel source of the backend, for the module cache and
/// `deepport kernels`. Each family lists its own.
pub fn sources() -> Vec<&'static crate::launch::KernelSource> {
    let mut v = Vec::new();
    v.extend_from_slice(dense::SOURCES);
    v.extend_from_slice(mla::SOURCES);
    v.extend_from_slice(small::SOURCES);
    v
}
