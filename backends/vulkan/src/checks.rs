//! Deferred device-side checks. The meaning of a status entry (4 words:
//! `u32::MAX - index` by `atomicMax`, so the lowest index wins, then the
//! flagged value's low and high words copied by `capture.comp`) and the
//! error it reports are shared with the wgpu backend
//! ([`deepport_gpu_host::checks`]); here the entries are one device buffer
//! of [`STATUS_ENTRIES`], cleared at the start of every batch. The error is
//! returned by the next `download`/`synchronize`, exactly once.

pub use deepport_gpu_host::checks::{CheckKind, StatusCheck as Check, ENTRY_WORDS};

/// Status entries per batch; when they run out the batch is settled early.
pub(crate) const STATUS_ENTRIES: u32 = 4096;
