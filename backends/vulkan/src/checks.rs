//! Deferred device-side checks (plain Rust: what a status entry means).
//!
//! Index values live on the device. Kernels never read out of bounds (they
//! clamp or write zeros); a check kernel records the first bad position of
//! an index tensor in a status entry of 4 words (`u32::MAX - index` by
//! `atomicMax`, so the lowest index wins, then the value's low and high
//! words copied by `capture.comp`). The error is returned by the next
//! `download`/`synchronize`, exactly once; the status buffer is cleared at
//! the start of every batch. The layout is the wgpu backend's, so this
//! module could serve both.

use deepport_core::tensor::unravel;
use deepport_core::Error;

/// Status entries per batch; when they run out the batch is settled early.
pub(crate) const STATUS_ENTRIES: u32 = 4096;

/// What a check requires of each element.
#[derive(Clone, Debug)]
pub(crate) enum CheckKind {
    /// Values must lie in `[lo, hi)` or equal `allow`.
    Range {
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    },
    /// Values must be finite.
    Finite,
}

/// A recorded check: its status entry and what to report.
#[derive(Clone, Debug)]
pub(crate) struct Check {
    op: &'static str,
    arg: &'static str,
    shape: Vec<usize>,
    kind: CheckKind,
    entry: u32,
}

impl Check {
    pub(crate) fn new(
        op: &'static str,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
        entry: u32,
    ) -> Self {
        Self {
            op,
            arg,
            shape: shape.to_vec(),
            kind,
            entry,
        }
    }

    /// The error this check reports, given the status words.
    pub(crate) fn error(&self, words: &[u32]) -> Option<Error> {
        let base = (self.entry * 4) as usize;
        let w = *words.get(base)?;
        if w == 0 {
            return None;
        }
        let idx = (u32::MAX - w) as usize;
        let lo = words.get(base + 1).copied().unwrap_or(0) as u64;
        let hi = words.get(base + 2).copied().unwrap_or(0) as u64;
        let position = unravel(idx, &self.shape);
        Some(match &self.kind {
            CheckKind::Range {
                lo: l,
                hi: h,
                allow,
            } => Error::IndexOutOfRange {
                op: self.op,
                arg: self.arg,
                position,
                value: (lo | (hi << 32)) as i64,
                range: match allow {
                    Some(a) => format!("[{l}, {h}) or {a}"),
                    None => format!("[{l}, {h})"),
                },
            },
            CheckKind::Finite => Error::NonFinite {
                op: self.op,
                arg: self.arg,
                position,
                value: f32::from_bits(lo as u32) as f64,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_names_the_lowest_flagged_position_and_value() {
        let c = Check::new(
            "embedding",
            "ids",
            &[2, 3],
            CheckKind::Range {
                lo: 0,
                hi: 10,
                allow: None,
            },
            1,
        );
        let mut words = vec![0u32; 8];
        assert!(c.error(&words).is_none());
        words[4] = u32::MAX - 4;
        words[5] = (-3i64) as u64 as u32;
        words[6] = ((-3i64) as u64 >> 32) as u32;
        match c.error(&words) {
            Some(Error::IndexOutOfRange {
                position,
                value,
                arg,
                ..
            }) => {
                assert_eq!(position, vec![1, 1]);
                assert_eq!(value, -3);
                assert_eq!(arg, "ids");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
