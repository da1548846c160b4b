//! The op kernels: host code here, WGSL in `src/shaders/`.
//!
//! Each module has a `register(&mut OpTable)` that fills the table entries
//! of the ops it implements. The [`Backend`](deepport_core::Backend) methods
//! and `supports` are derived from the table: an op without an entry answers
//! `NotSupported`. **Adding a kernel module is one identifier in `modules!`
//! at the bottom of this file** (plus the module's own files).
//!
//! A kernel records its work through [`crate::ctx::Rec`]:
//!
//! ```text
//! let mut rec = w.ctx.begin("silu_mul")?;
//! let sh = Shader::new("silu_mul", include_str!("../shaders/elementwise.wgsl"))
//!     .constant("OP", "1u")
//!     .input("a", a.dtype()).input("b", b.dtype()).output("out", out.dtype());
//! rec.dispatch(&sh, Params::new().u32(n), &[buffer(a)?, buffer(b)?, buffer(out)?], groups)?;
//! rec.finish()
//! ```
//!
//! Tensors may exceed the adapter's storage binding limit: split the work
//! with `w.ctx.plan_rows(op, rows, &[bytes per row of each operand])` and
//! bind each range with `Win::rows` through `Rec::dispatch_win` (see
//! `elementwise.rs`, `gemm.rs`, `embedding.rs` for the patterns). Never
//! call `download`/`synchronize`/`write` while a `Rec` is open: finish it
//! first (the call fails instead of deadlocking).

use crate::Wgpu;
use deepport_core::backend::Support;
use deepport_core::comm::Communicator;
use deepport_core::ops::*;
use deepport_core::{DType, Result};

/// The table's fields: one per local op (from core's op list) plus the
/// expert-parallel ops, written out here.
macro_rules! op_table {
    ([$($ep_field:ident : $ep_kind:ident => $ep_ty:ty),* $(,)?]
     $($kind:ident => $field:ident),* $(,)?) => {
        /// The ops this backend implements: one function per op, `None`
        /// where it is not written yet, plus optional dtype restrictions.
        #[derive(Default)]
        pub(crate) struct OpTable {
            $(pub(crate) $field: Option<fn(&Wgpu, &mut Checked<$kind<'_>>) -> Result<()>>,)*
            $(pub(crate) $ep_field: Option<$ep_ty>,)*
            /// Extra dtype rules: `(op, check)`; the first `NotSupported`
            /// answer wins.
            pub(crate) restrict: Vec<(OpKind, fn(&[DType]) -> Support)>,
        }

        impl OpTable {
            fn has(&self, op: OpKind) -> bool {
                match op {
                    $(OpKind::$kind => self.$field.is_some(),)*
                    $(OpKind::$ep_kind => self.$ep_field.is_some(),)*
                }
            }
        }
    };
}

deepport_core::for_each_local_op!(
    op_table,
    dispatch: Dispatch =>
        fn(&Wgpu, &dyn Communicator, &Checked<Dispatch<'_>>) -> Result<DispatchOutput>,
    combine: Combine => fn(&Wgpu, &dyn Communicator, &mut Checked<Combine<'_>>) -> Result<()>,
    low_latency_dispatch: LowLatencyDispatch =>
        fn(&Wgpu, &dyn Communicator, &Checked<LowLatencyDispatch<'_>>)
            -> Result<LowLatencyDispatchOutput>,
    low_latency_combine: LowLatencyCombine =>
        fn(&Wgpu, &dyn Communicator, &mut Checked<LowLatencyCombine<'_>>) -> Result<()>,
);

impl OpTable {
    /// What `Backend::supports` answers.
    pub(crate) fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        if !self.has(op) {
            return Support::NotSupported(format!(
                "{} is not implemented by the wgpu backend yet",
                op.name()
            ));
        }
        for (k, f) in &self.restrict {
            if *k == op {
                if let s @ Support::NotSupported(_) = f(dtypes) {
                    return s;
                }
            }
        }
        Support::Supported
    }
}

/// Workgroups of `per` invocations covering `n` items.
pub(crate) fn groups(n: u32, per: u32) -> u32 {
    n.div_ceil(per)
}

macro_rules! modules {
    ($($m:ident),* $(,)?) => {
        $(mod $m;)*
        /// The table of every kernel module.
        pub(crate) fn table() -> OpTable {
            let mut t = OpTable::default();
            $($m::register(&mut t);)*
            t
        }
    };
}

modules!(
    act_quant,
    weight_dequant,
    elementwise,
    embedding,
    copy_window,
    gemm,
    rms_norm,
    rope,
    moe_gate,
    ep,
    fp8_gemm,
    mla,
);
