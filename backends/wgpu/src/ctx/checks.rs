//! Deferred checks.
//!
//! Index values (token ids, positions, …) live on the device. Kernels never
//! read out of bounds (they clamp); a check kernel records the first bad
//! position in a small status buffer, and the error
//! (`Error::IndexOutOfRange`, `Error::NonFinite`) is returned by the next
//! `download` or `synchronize`, like an asynchronous CUDA error. Whatever is
//! downloaded in that call is discarded.
//!
//! Each op that checks gets one status slot (of [`STATUS_ENTRIES`] entries
//! of 4 words) in a device buffer; a kernel calls `flag(entry, index)`
//! (declared by [`Shader::status`]) and `capture.wgsl` copies the flagged
//! value next to the index. When the slots run out, the batch is settled
//! early (see [`Rec::flag_entry`]).

use super::memory::buffer;
use super::shader::{dtype_code, Params, Shader};
use super::window::Win;
use super::{dev_err, u32_of, Rec};
use deepport_core::backend::Tensor;
use deepport_core::Result;

/// Bytes of one status slot (16 entries of 4 words).
pub(super) const STATUS_SLOT: u64 = 256;
/// Status slots; when they run out, the batch is synchronized and checked.
pub(super) const STATUS_SLOTS: u32 = 1024;
/// Entries in one status slot.
pub(crate) const STATUS_ENTRIES: u32 = 16;

pub(crate) use deepport_gpu_host::checks::CheckKind;
/// A recorded check (shared with the vulkan backend: the status-entry
/// layout and the error it reports live in `deepport-gpu-host`); its first
/// word is `(slot · STATUS_ENTRIES + entry) · 4`.
pub(super) use deepport_gpu_host::checks::StatusCheck as Check;
use deepport_gpu_host::checks::ENTRY_WORDS;

const CHECK_RANGE_WGSL: &str = include_str!("../shaders/check_range.wgsl");
const CHECK_FINITE_WGSL: &str = include_str!("../shaders/check_finite.wgsl");
const CAPTURE_WGSL: &str = include_str!("../shaders/capture.wgsl");

impl Rec<'_> {
    /// The op's status slot, allocated on first use.
    pub(super) fn slot(&mut self) -> Result<u32> {
        if let Some(s) = self.slot {
            return Ok(s);
        }
        if self.st.next_status >= STATUS_SLOTS {
            // Out of status slots: settle the earlier ops first.
            let ctx = self.ctx;
            ctx.sync_locked(&mut self.st, self.op, None)?;
        }
        let s = self.st.next_status;
        self.st.next_status += 1;
        self.slot = Some(s);
        Ok(s)
    }

    /// A new status entry of this op, reported as `kind` on `arg` (of shape
    /// `shape`) when a kernel flags it. Returns the entry index for
    /// `flag(entry, index)` in a shader with [`Shader::status`].
    pub(crate) fn flag_entry(
        &mut self,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u32> {
        let slot = self.slot()?;
        if self.entries >= STATUS_ENTRIES {
            return Err(dev_err(format!(
                "{}: more than {STATUS_ENTRIES} checked arguments",
                self.op
            )));
        }
        let entry = self.entries;
        self.entries += 1;
        self.checks.push(Check::new(
            self.op,
            arg,
            shape,
            kind,
            (slot * STATUS_ENTRIES + entry) as usize * ENTRY_WORDS,
        ));
        Ok(entry)
    }

    /// Copies the flagged element of `t` (if any) into the entry, so the
    /// error can name its value.
    pub(crate) fn capture(&mut self, entry: u32, t: &Tensor) -> Result<()> {
        let es = t.dtype().size() as u64;
        let plan = self.ctx.plan_rows(self.op, t.numel().max(1), &[es])?;
        for (e0, e1) in plan {
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }

    fn capture_part(&mut self, entry: u32, t: &Tensor, e0: usize, e1: usize) -> Result<()> {
        let code = dtype_code(t.dtype())?;
        let sh = Shader::new("capture", CAPTURE_WGSL)
            .raw("src", false)
            .status();
        let es = t.dtype().size() as u64;
        let w = Win::rows(buffer(t)?, es, e0, e1);
        let p = Params::new()
            .u32(entry)
            .u32(code)
            .u32(u32_of(self.op, "numel", e0)?)
            .u32(u32_of(self.op, "numel", e1 - e0)?);
        self.dispatch_win(&sh, p, &[w], 1)
    }

    /// Records a check that every element of the index tensor `t` lies in
    /// `[lo, hi)` or equals `allow`; the error is `IndexOutOfRange` on `arg`.
    pub(crate) fn check_range(
        &mut self,
        arg: &'static str,
        t: &Tensor,
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    ) -> Result<()> {
        u32_of(self.op, arg, t.numel())?;
        if t.numel() == 0 {
            return Ok(());
        }
        let entry = self.flag_entry(arg, t.shape(), CheckKind::Range { lo, hi, allow })?;
        let sh = Shader::new("check_range", CHECK_RANGE_WGSL)
            .input("x", t.dtype())
            .status();
        let a = allow.unwrap_or(0);
        let es = t.dtype().size() as u64;
        for (e0, e1) in self.ctx.plan_rows(self.op, t.numel(), &[es])? {
            let n = (e1 - e0) as u32;
            let p = Params::new()
                .u32(n)
                .u32(entry)
                .u32(lo as u32)
                .u32((lo >> 32) as u32)
                .u32(hi as u32)
                .u32((hi >> 32) as u32)
                .u32(a as u32)
                .u32((a >> 32) as u32)
                .u32(allow.is_some() as u32)
                .u32(e0 as u32);
            let w = Win::rows(buffer(t)?, es, e0, e1);
            self.dispatch_win(&sh, p, &[w], n.div_ceil(256))?;
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }

    /// Records a check that every element of the float tensor `t` is finite.
    pub(crate) fn check_finite(&mut self, arg: &'static str, t: &Tensor) -> Result<()> {
        u32_of(self.op, arg, t.numel())?;
        if t.numel() == 0 {
            return Ok(());
        }
        let entry = self.flag_entry(arg, t.shape(), CheckKind::Finite)?;
        let sh = Shader::new("check_finite", CHECK_FINITE_WGSL)
            .input("x", t.dtype())
            .status();
        let es = t.dtype().size() as u64;
        for (e0, e1) in self.ctx.plan_rows(self.op, t.numel(), &[es])? {
            let n = (e1 - e0) as u32;
            let p = Params::new().u32(n).u32(entry).u32(e0 as u32);
            let w = Win::rows(buffer(t)?, es, e0, e1);
            self.dispatch_win(&sh, p, &[w], n.div_ceil(256))?;
            self.capture_part(entry, t, e0, e1)?;
        }
        Ok(())
    }
}
