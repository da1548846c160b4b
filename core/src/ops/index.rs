//! Bounds checks for index values read on the host (CPU backends, and any
//! backend that stages index tensors through host memory).

use crate::error::{Error, Result};
use crate::tensor::{unravel, HostTensor};

/// Checks that every element of `t` lies in `[lo, hi)`; `allow` values
/// (e.g. `-1` for "no expert") pass too. The error names op, argument,
/// position, value and range.
pub fn check_range(
    op: &'static str,
    arg: &'static str,
    t: &HostTensor,
    lo: i64,
    hi: i64,
    allow: Option<i64>,
) -> Result<()> {
    for i in 0..t.numel() {
        let v = t.get_i64(i);
        if (v < lo || v >= hi) && Some(v) != allow {
            let range = match allow {
                Some(a) => format!("[{lo}, {hi}) or {a}"),
                None => format!("[{lo}, {hi})"),
            };
            return Err(Error::IndexOutOfRange {
                op,
                arg,
                position: unravel(i, t.shape()),
                value: v,
                range,
            });
        }
    }
    Ok(())
}

/// Checks a single index value.
pub fn check_value(
    op: &'static str,
    arg: &'static str,
    position: &[usize],
    v: i64,
    lo: i64,
    hi: i64,
) -> Result<()> {
    if v < lo || v >= hi {
        return Err(Error::IndexOutOfRange {
            op,
            arg,
            position: position.to_vec(),
            value: v,
            range: format!("[{lo}, {hi})"),
        });
    }
    Ok(())
}
