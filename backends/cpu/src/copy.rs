//! `cpu-ref`'s data movement (window copy, row gather): the
//! specification's loops in [`crate::scalar::copy`] unchanged (they move
//! memory). The weighted row reduction of the expert-parallel combines is
//! [`crate::reduce`] (the same arithmetic at memory speed).

pub(crate) use crate::reduce::reduce_rows;
pub(crate) use crate::scalar::copy::{copy_window, gather_rows};
