//! deepport's generic backend test suite.
//!
//! Every backend crate runs the same checks with one macro call in its
//! tests (see [`backend_suite!`]):
//!
//! ```ignore
//! deepport_testkit::backend_suite!("cpu", |_rank| Ok(Box::new(deepport_cpu::Cpu)));
//! ```
//!
//! This expands to one `#[test]` per check, named after it. The factory
//! makes instances of the backend (`rank` is the rank of an expert-parallel
//! group; single-device checks use rank 0): checks that provoke errors get
//! fresh instances, the others share one per rank (see [`Harness`]). What
//! is checked, always against `cpu-ref` (the oracle) on the same inputs:
//!
//! * every local op on small adversarial inputs ([`local`], [`rows`],
//!   [`heavy`]): odd sizes, partial tiles, K not a multiple of 128, NaN and
//!   infinities, every dtype pairing, NaN in every slot an op must not read
//!   (paged-cache slots past the sequence, padding rows, masked rows),
//!   permuted block tables, poisoned outputs (an element a kernel does not
//!   write is caught), with SPEC.md's tolerances;
//! * index errors and non-finite inputs: `IndexOutOfRange` / `NonFinite`
//!   naming the argument and position, at the call or at the next
//!   `synchronize`/`download` (the asynchronous contract of
//!   `deepport_core::backend`), reported exactly once;
//! * expert parallelism ([`ep`]) on 2 and 4 ranks over core's `ThreadComm`:
//!   layouts, payloads and handles bit for bit, combines within SPEC §7, a
//!   second run bit-identical, routing errors on every rank.
//!
//! A case the backend answers `NotSupported` is recorded and printed as
//! skipped ([`harness::skip`]), never passed silently. A backend that is
//! unavailable on the machine (`Error::Unavailable` from the factory)
//! skips every check with a message, unless `DEEPPORT_REQUIRE` (comma
//! separated) names it: then every check fails.
//!
//! The pieces are public for backend-specific tests: the PRNG ([`Rng`]),
//! comparisons ([`compare`]), transfer helpers ([`harness`]) and the case
//! functions of [`heavy`] and [`rows`], which a backend can run at the
//! shapes or settings that stress its own kernels.

#![warn(missing_docs)]

pub mod compare;
pub mod emu;
pub mod ep;
pub mod harness;
pub mod heavy;
pub mod local;
mod rng;
pub mod rows;

pub use harness::{Factory, Harness};
pub use rng::Rng;

/// Expands to one `#[test]` per check of the generic suite for the backend
/// `$name` made by `$factory` (`Fn(usize) -> Result<Box<dyn Backend>>`, the
/// argument being the rank). Call it once, at the top level of a test file.
#[macro_export]
macro_rules! backend_suite {
    ($name:expr, $factory:expr $(,)?) => {
        fn __deepport_testkit_harness() -> &'static $crate::Harness {
            static HARNESS: ::std::sync::OnceLock<$crate::Harness> = ::std::sync::OnceLock::new();
            HARNESS.get_or_init(|| $crate::Harness::new($name, $factory))
        }
        $crate::__suite_tests! {
            __deepport_testkit_harness;
            local::act_quant_is_bit_exact,
            local::act_quant_rejects_non_finite_input,
            local::weight_dequant_is_exact,
            local::gemm_matches_reference,
            local::rms_norm_matches_reference,
            local::rope_matches_reference,
            local::rope_rejects_negative_positions,
            local::silu_mul_matches_reference,
            local::add_is_exact,
            local::embedding_is_exact,
            local::embedding_out_of_range_is_an_error,
            local::copy_window_is_exact,
            local::moe_gate_matches_reference,
            local::moe_gate_rejects_non_finite,
            local::local_ops_are_deterministic,
            local::alloc_zeroed_is_zero_after_reuse,
            rows::gather_rows_is_bit_exact,
            rows::reduce_rows_matches_cpu_ref_and_is_reproducible,
            rows::rows_bad_indices_are_index_errors,
            heavy::fp8_gemm_matches_reference,
            heavy::fp8_gemm_edge_shapes,
            heavy::fp8_gemm_nan_operands_propagate,
            heavy::fp8_grouped_contiguous_matches_reference,
            heavy::fp8_grouped_contiguous_bad_index_is_an_error,
            heavy::fp8_grouped_masked_matches_reference_and_leaves_rows,
            heavy::fp8_grouped_masked_bad_count_is_an_error,
            heavy::mla_decode_varlen_matches_reference,
            heavy::mla_decode_causal_multi_query,
            heavy::mla_decode_zero_lengths_and_f32,
            heavy::mla_decode_odd_head_dims,
            heavy::mla_decode_bad_indices_are_errors,
            heavy::mla_prefill_both_forms_match_reference,
            ep::layout_matches_cpu_ref,
            ep::layout_rejects_out_of_range_expert,
            ep::ep_dispatch_and_combine,
            ep::ep_low_latency,
            ep::ep_bad_expert_id_fails_every_rank_promptly,
            ep::ep_ranks_that_disagree_fail_with_invalid,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ($h:ident; $($module:ident :: $check:ident),* $(,)?) => {$(
        #[test]
        fn $check() {
            $crate::$module::$check($h());
        }
    )*};
}
