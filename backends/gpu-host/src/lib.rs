//! Host-side plumbing shared by the GPU backends that bind storage buffers
//! (`deepport-wgpu`, `deepport-vulkan`): no graphics API, no `unsafe`, unit
//! tested on any machine.
//!
//! * [`arena`]: a first-fit sub-allocator over a few large blocks (vulkan;
//!   wgpu allocates one buffer per tensor).
//! * [`checks`]: what a deferred-check status entry means — the layout of
//!   the 4 words (`u32::MAX - index` by `atomicMax`, so the lowest index
//!   wins; then the flagged value's low and high words) and the error it
//!   reports (`IndexOutOfRange`, `NonFinite`), for both backends.
//! * [`window`]: splitting work into windows that fit the device's storage
//!   binding limit (`maxStorageBufferRange`, `max_storage_buffer_binding_size`).

#![forbid(unsafe_code)]

pub mod arena;
pub mod checks;
pub mod window;
