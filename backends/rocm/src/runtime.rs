//! What the backend needs of a GPU runtime, as a trait: HIP
//! ([`crate::hip::Hip`]) implements it on a device; the tests implement it
//! in host memory (allocations are `Vec`s, a "launch" is recorded), so the
//! whole launch path — module cache, kernel lookup, argument packing,
//! deferred checks, scratch lifetime — runs on a machine without an AMD
//! GPU. Modules and functions are opaque handles (`usize`).

use crate::hip::{Function, Hip, Module};
use deepport_core::Result;
use std::ffi::c_void;

/// A GPU runtime on one device, every call on the default stream.
pub trait Runtime: Send + Sync + 'static {
    /// Makes `device` current on the calling thread.
    fn set_device(&self, device: usize) -> Result<()>;
    fn malloc(&self, bytes: usize) -> Result<u64>;
    /// Frees an allocation of [`Runtime::malloc`] (waits for the device).
    fn free(&self, ptr: u64) -> Result<()>;
    /// Fills `bytes` bytes at `ptr` with `value`, ordered after queued work.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of at least `bytes` bytes.
    unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()>;
    /// Copies `src` to `dst` after the queued work (synchronous).
    ///
    /// # Safety
    /// `dst` must be a device allocation of at least `src.len()` bytes.
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies `dst.len()` bytes at `src` after the queued work (synchronous).
    ///
    /// # Safety
    /// `src` must be a device allocation of at least `dst.len()` bytes.
    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    /// Waits for the default stream.
    fn synchronize(&self) -> Result<()>;
    /// Loads a code object; the handle lives until [`Runtime::unload`].
    fn load(&self, code: &[u8]) -> Result<usize>;
    fn unload(&self, module: usize) -> Result<()>;
    /// The kernel `name` of a loaded module.
    fn function(&self, module: usize, name: &str) -> Result<usize>;
    /// Queues `function` with one pointer per kernel argument.
    ///
    /// # Safety
    /// `function` comes from [`Runtime::function`] of a loaded module;
    /// `params` matches the kernel's parameters, each pointer to a live
    /// value of the parameter's size; pointer arguments address device
    /// memory large enough for what the kernel touches.
    unsafe fn launch(
        &self,
        function: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()>;
}

impl Runtime for &'static Hip {
    fn set_device(&self, device: usize) -> Result<()> {
        Hip::set_device(self, device)
    }
    fn malloc(&self, bytes: usize) -> Result<u64> {
        Hip::malloc(self, bytes)
    }
    fn free(&self, ptr: u64) -> Result<()> {
        Hip::free(self, ptr)
    }
    unsafe fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract is HIP's.
        unsafe { Hip::memset(self, ptr, value, bytes) }
    }
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the caller's contract is HIP's.
        unsafe { Hip::htod(self, dst, src) }
    }
    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // SAFETY: the caller's contract is HIP's.
        unsafe { Hip::dtoh(self, dst, src) }
    }
    fn synchronize(&self) -> Result<()> {
        self.stream_synchronize(None)
    }
    fn load(&self, code: &[u8]) -> Result<usize> {
        Ok(self.module_load(code)?.0 as usize)
    }
    fn unload(&self, module: usize) -> Result<()> {
        self.module_unload(Module(module as *mut c_void))
    }
    fn function(&self, module: usize, name: &str) -> Result<usize> {
        Ok(self.get_function(&Module(module as *mut c_void), name)?.0 as usize)
    }
    unsafe fn launch(
        &self,
        function: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: the caller's contract is HIP's; the handle came from
        // `hipModuleGetFunction` of a loaded module.
        unsafe {
            Hip::launch(
                self,
                &Function(function as *mut c_void),
                grid,
                block,
                smem,
                None,
                params,
            )
        }
    }
}
