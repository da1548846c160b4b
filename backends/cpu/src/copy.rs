//! `cpu-ref`'s data movement (window copy, row gather, the weighted row
//! reduction of the expert-parallel combines): the specification's loops
//! in [`crate::scalar::copy`] unchanged (they move memory; their cost
//! does not matter).

pub(crate) use crate::scalar::copy::{copy_window, gather_rows, reduce_rows};
