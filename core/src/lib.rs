//! deepport-core: the common ground of deepport.
//!
//! * [`formats`]: FP8 (e4m3, e4m3fnuz, e5m2), UE8M0, bf16/f16 rounding;
//! * [`tensor`]: host tensors and safetensors files;
//! * [`ops`]: typed, validated arguments of every op in `SPEC.md`;
//! * [`backend`]: the object-safe [`Backend`] trait and device tensors;
//! * [`comm`]: the [`Communicator`] trait and in-process ranks;
//! * [`registry`]: backends by name, available or why not.
#![forbid(unsafe_code)]

pub mod backend;
pub mod comm;
pub mod dtype;
pub mod error;
pub mod formats;
pub mod ops;
pub mod registry;
pub mod tensor;

pub use backend::{Backend, DeviceInfo, Support, Tensor};
pub use comm::{Communicator, ThreadComm};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::HostTensor;
