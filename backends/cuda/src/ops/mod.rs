//! Op glue: one function per local op, `fn op(cx, &mut Checked<Op>)`,
//! grouped by family. Each picks a kernel (the sm_90a path on Hopper where
//! there is one), computes the launch geometry in plain Rust, and launches.

pub(crate) mod dense;
pub(crate) mod mla;
pub(crate) mod small;

pub(crate) use dense::*;
pub(crate) use mla::*;
pub(crate) use small::*;

/// Every kernel source of the backend, for the module cache and
/// `deepport kernels`. Each family lists its own.
pub fn sources() -> Vec<&'static crate::launch::KernelSource> {
    let mut v = Vec::new();
    v.extend_from_slice(dense::SOURCES);
    v.extend_from_slice(mla::SOURCES);
    v.extend_from_slice(small::SOURCES);
    v
}
