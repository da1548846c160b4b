//! Deferred device-side checks: what a status entry means.
//!
//! Index values live on the device. Kernels never read out of bounds (they
//! clamp); a check kernel records the first bad position of a tensor in a
//! status entry of 4 words: word 0 is `u32::MAX - index`, set by
//! `atomicMax` (so the lowest flagged index wins; 0 means nothing was
//! flagged), words 1 and 2 the flagged value's low and high 32 bits (copied
//! by the backend's capture kernel), word 3 unused. The backend reads the
//! status words back at the next `download`/`synchronize` and reports the
//! first error, once. Where the entries live (one buffer of entries, or
//! slots of entries) is the backend's business: a [`StatusCheck`] knows the
//! index of its first word.

use deepport_core::tensor::unravel;
use deepport_core::Error;

/// Words per status entry.
pub const ENTRY_WORDS: usize = 4;

/// What a check requires of each element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Values must lie in `[lo, hi)` or equal `allow`.
    Range {
        lo: i64,
        hi: i64,
        allow: Option<i64>,
    },
    /// Values must be finite.
    Finite,
}

/// A recorded check: the op and argument it reports, the argument's shape,
/// and where its status entry starts in the status words.
#[derive(Clone, Debug)]
pub struct StatusCheck {
    pub op: &'static str,
    pub arg: &'static str,
    pub shape: Vec<usize>,
    pub kind: CheckKind,
    /// Index of the entry's first word in the status words.
    pub word: usize,
}

impl StatusCheck {
    pub fn new(
        op: &'static str,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
        word: usize,
    ) -> Self {
        Self {
            op,
            arg,
            shape: shape.to_vec(),
            kind,
            word,
        }
    }

    /// The error this check reports, given the status words read back
    /// (`None`: nothing flagged, or the entry lies beyond `words`).
    pub fn error(&self, words: &[u32]) -> Option<Error> {
        let w = *words.get(self.word)?;
        if w == 0 {
            return None;
        }
        let idx = (u32::MAX - w) as usize;
        let lo = words.get(self.word + 1).copied().unwrap_or(0) as u64;
        let hi = words.get(self.word + 2).copied().unwrap_or(0) as u64;
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

    fn range() -> CheckKind {
        CheckKind::Range {
            lo: 0,
            hi: 10,
            allow: Some(-1),
        }
    }

    #[test]
    fn an_entry_names_the_lowest_flagged_position_and_value() {
        let c = StatusCheck::new("embedding", "ids", &[2, 3], range(), 4);
        let mut words = vec![0u32; 8];
        assert!(c.error(&words).is_none(), "nothing flagged");
        words[4] = u32::MAX - 4;
        words[5] = (-3i64) as u64 as u32;
        words[6] = ((-3i64) as u64 >> 32) as u32;
        match c.error(&words) {
            Some(Error::IndexOutOfRange {
                op,
                arg,
                position,
                value,
                range,
            }) => {
                assert_eq!((op, arg), ("embedding", "ids"));
                assert_eq!(position, vec![1, 1]);
                assert_eq!(value, -3);
                assert_eq!(range, "[0, 10) or -1");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Another entry's words do not concern it.
        let other = StatusCheck::new("embedding", "ids", &[6], range(), 0);
        assert!(other.error(&words).is_none());
    }

    #[test]
    fn a_non_finite_entry_reports_the_f32_value() {
        let c = StatusCheck::new("act_quant", "x", &[4], CheckKind::Finite, 0);
        let words = [u32::MAX, f32::INFINITY.to_bits(), 0, 0];
        match c.error(&words) {
            Some(Error::NonFinite {
                position, value, ..
            }) => {
                assert_eq!(position, vec![0]);
                assert_eq!(value, f64::INFINITY);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_entry_beyond_the_words_reports_nothing() {
        let c = StatusCheck::new("op", "x", &[4], CheckKind::Finite, 8);
        assert!(c.error(&[1, 2, 3, 4]).is_none());
    }
}
