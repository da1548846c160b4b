//! `cpu-ref`'s expert-parallel layout op: the specification's loop in
//! [`crate::scalar::ep`] unchanged. The communicating ops are written once
//! in core (`deepport_core::ep`) over `gather_rows`/`reduce_rows` and
//! `act_quant`.

pub(crate) use crate::scalar::ep::get_dispatch_layout;
