//! deepport-core: the common ground of deepport.
//!
//! * [`formats`]: FP8 (e4m3, e4m3fnuz, e5m2), UE8M0, bf16/f16 rounding;
//! * [`tensor`]: host tensors and safetensors files;
//! * [`budget`]: the memory budget for sizes that come from user input;
//! * [`ops`]: typed, validated arguments of every op in `SPEC.md`;
//! * [`backend`]: the object-safe [`Backend`] trait;
//! * [`device`]: device tensors (owned by one backend instance; views);
//! * [`comm`]: the [`Transport`] trait (host-staged and device paths) and
//!   in-process ranks;
//! * [`ep`]: expert parallelism, written once over any backend and transport;
//! * [`registry`]: backends by name, available or why not.
#![forbid(unsafe_code)]

pub mod backend;
pub mod budget;
pub mod comm;
pub mod device;
pub mod dtype;
pub mod ep;
pub mod error;
pub mod formats;
pub mod ops;
pub mod registry;
pub mod tensor;

pub use backend::{Backend, DeviceInfo, Support, Tensor};
pub use comm::{Communicator, ThreadComm, Transport};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::HostTensor;
