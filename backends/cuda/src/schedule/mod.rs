//! Launch geometry in plain Rust, tested on the CPU: tile schedules of the
//! GEMMs, split-K partitions of MLA decode, TMA descriptor parameters.

pub mod gemm;
pub mod mla;
