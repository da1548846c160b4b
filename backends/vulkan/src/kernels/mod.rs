//! The op kernels: host code here, GLSL in `shaders/`.
//!
//! Each module's `register(&mut OpTable)` fills the entries of the ops it
//! implements; `Backend` methods and `supports` derive from the table, so
//! an op without an entry answers `NotSupported`. A kernel records through
//! [`crate::ctx::Rec`]: `rec.dispatch(shader, spec constants, bindings,
//! push constants, workgroups)`, with index checks from [`Rec::check_range`].

use crate::checks::CheckKind;
use crate::ctx::{u32_of, Push, Rec, WG};
use crate::Vulkan;
use deepport_core::backend::{Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, Result};

macro_rules! op_table {
    ([] $($kind:ident => $field:ident),* $(,)?) => {
        /// The ops this backend implements (`None`: not written yet).
        #[derive(Default)]
        pub(crate) struct OpTable {
            $(pub(crate) $field: Option<fn(&Vulkan, &mut Checked<$kind<'_>>) -> Result<()>>,)*
            /// Extra dtype rules: `(op, check)`.
            pub(crate) restrict: Vec<(OpKind, fn(&[DType]) -> Support)>,
        }

        impl OpTable {
            fn has(&self, op: OpKind) -> bool {
                match op {
                    $(OpKind::$kind => self.$field.is_some(),)*
                    OpKind::Dispatch
                    | OpKind::Combine
                    | OpKind::LowLatencyDispatch
                    | OpKind::LowLatencyCombine => {
                        self.gather_rows.is_some()
                            && self.reduce_rows.is_some()
                            && self.act_quant.is_some()
                    }
                }
            }
        }
    };
}

deepport_core::for_each_local_op!(op_table);

impl OpTable {
    pub(crate) fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        if !self.has(op) {
            return Support::NotSupported(format!(
                "{} is not implemented by the vulkan backend yet",
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

/// The dtype code of the shaders (`common.glsl`).
pub(crate) fn dt(d: DType) -> Result<u32> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F8E4M3 => 3,
        DType::F8E4M3Fnuz => 4,
        DType::I32 => 5,
        DType::I64 => 6,
        DType::U8 | DType::Bool => 7,
        other => {
            return Err(Error::not_supported(
                crate::ctx::BACKEND,
                "kernel",
                format!("dtype {other} has no shader decoding yet"),
            ))
        }
    })
}

/// Workgroups of `WG` invocations covering `n` items.
pub(crate) fn groups(n: u32) -> u32 {
    n.div_ceil(WG)
}

impl Rec<'_> {
    /// Records a check that every element of the index tensor `t` lies in
    /// `[lo, hi)` or equals `allow` (`IndexOutOfRange` on `arg`, reported at
    /// the next download/synchronize).
    pub(crate) fn check_range(
        &mut self,
        arg: &'static str,
        t: &Tensor,
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    ) -> Result<()> {
        let n = u32_of(self.op, arg, t.numel())?;
        if n == 0 {
            return Ok(());
        }
        let entry = self.entry(arg, t.shape(), CheckKind::Range { lo, hi, allow })?;
        let (x, sub) = self.bind(t)?;
        let es = t.dtype().size() as u64;
        let first = (sub / es) as u32;
        let status = self.status();
        let a = allow.unwrap_or(0);
        let p = Push::new()
            .u32(n)
            .u32(entry)
            .u32(lo as u32)
            .u32((lo >> 32) as u32)
            .u32(hi as u32)
            .u32((hi >> 32) as u32)
            .u32(a as u32)
            .u32((a >> 32) as u32)
            .u32(allow.is_some() as u32)
            .u32(first);
        let code = dt(t.dtype())?;
        self.dispatch("check_range", &[code], &[x, status], &p, groups(n))?;
        let p = Push::new().u32(entry).u32(first).u32(n);
        self.dispatch("capture", &[code], &[x, status], &p, 1)
    }

    /// Records a check that every element of the float tensor `t` is finite.
    pub(crate) fn check_finite(&mut self, arg: &'static str, t: &Tensor) -> Result<()> {
        let n = u32_of(self.op, arg, t.numel())?;
        if n == 0 {
            return Ok(());
        }
        let entry = self.entry(arg, t.shape(), CheckKind::Finite)?;
        let (x, sub) = self.bind(t)?;
        let first = (sub / t.dtype().size() as u64) as u32;
        let status = self.status();
        let code = dt(t.dtype())?;
        let p = Push::new().u32(n).u32(entry).u32(first);
        self.dispatch("check_finite", &[code], &[x, status], &p, groups(n))?;
        let p = Push::new().u32(entry).u32(first).u32(n);
        self.dispatch("capture", &[code], &[x, status], &p, 1)
    }
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

modules!(elementwise, rows, dense, gemm, moe_gate, grouped, mla, ep);
