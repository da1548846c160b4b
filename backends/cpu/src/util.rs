//! Small helpers shared by the reference ops.

use deepport_core::backend::Tensor;
use deepport_core::{HostTensor, Result};

/// Decodes a CPU tensor to f32 values.
pub fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(crate::to_host(t)?.to_f32_vec())
}

/// Decodes a CPU tensor to i64 values.
pub fn i64s(t: &Tensor) -> Result<Vec<i64>> {
    Ok(crate::to_host(t)?.to_i64_vec())
}

/// Encodes f32 values into `t` (rounding once to `t`'s dtype).
pub fn put_f32(t: &mut Tensor, values: &[f32]) -> Result<()> {
    let h = HostTensor::from_f32(t.dtype(), t.shape(), values);
    crate::store(t, &h)
}

/// Writes index values into an i32/i64/bool tensor.
pub fn put_i64(t: &mut Tensor, values: &[i64]) -> Result<()> {
    let h = match t.dtype() {
        deepport_core::DType::Bool => HostTensor::from_bool(
            t.shape(),
            &values.iter().map(|&v| v != 0).collect::<Vec<_>>(),
        ),
        d => HostTensor::from_index(d, t.shape(), values),
    };
    crate::store(t, &h)
}

/// Writes raw host data (same dtype) into `t`.
pub fn put_host(t: &mut Tensor, h: &HostTensor) -> Result<()> {
    crate::store(t, h)
}

/// Host copy of a CPU tensor.
pub fn host(t: &Tensor) -> Result<HostTensor> {
    crate::to_host(t)
}
