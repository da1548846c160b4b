//! deepport-model: the DeepSeek-V3 model, written once against the
//! [`Backend`](deepport_core::Backend) trait so that any backend runs the
//! whole model from a Hugging Face checkpoint (FP8 e4m3 weights with
//! 128×128 `weight_scale_inv`).
//!
//! * [`config`]: `config.json` ([`ModelConfig`]), validated field by field;
//! * [`checkpoint`]: the safetensors files ([`Checkpoint`]), single or
//!   sharded, headers parsed here, tensors read lazily;
//! * [`forward`]: the forward pass ([`Model`]) in the three numerics modes
//!   of SPEC.md §8, with a paged latent cache for decoding, taps and
//!   teacher-forced per-layer runs for conformance, chunked prefill, expert
//!   parallelism over any communicator;
//! * [`memory`]: memory estimates made before allocating;
//! * [`v32`]: DeepSeek-V3.2's indexer weights (loaded and checked); the
//!   forward pass runs V3.2 (indexer + sparse MLA, `v32_forward.rs`) in
//!   every path: fused, paged and chunked prefill and decode, with an
//!   index-k cache per layer next to the latent cache.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod forward;
pub mod memory;
pub mod v32;

pub use checkpoint::{Checkpoint, LinearWeight};
pub use config::{IndexerConfig, ModelConfig, QuantizationConfig, RopeScaling};
pub use forward::{
    LayerOutput, LoadOptions, Model, MtpOutput, Numerics, PrefillPath, Routing, Taps, DEFAULT_CHUNK,
};
pub use memory::MemoryEstimate;
