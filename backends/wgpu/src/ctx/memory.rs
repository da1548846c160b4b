//! Tensor memory: storage buffers, allocation, upload, write and download.

use super::device::{pop_scopes, push_scopes};
use super::{dev_err, Ctx, BACKEND};
use deepport_core::backend::{Storage, Tensor};
use deepport_core::Result;

/// Rounds a byte count up to the 4-byte granularity of wgpu copies (at least 4).
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

/// Device memory of a wgpu tensor: a storage buffer, its size padded to 4
/// bytes (16-bit and 8-bit elements are packed into 32-bit words).
pub struct WgpuStorage {
    pub(crate) buffer: wgpu::Buffer,
    /// Bytes of data (unpadded).
    pub(crate) bytes: u64,
}

impl Storage for WgpuStorage {
    fn backend(&self) -> &str {
        BACKEND
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The buffer of a wgpu tensor (fails for another backend's tensor): where
/// every kernel looks a tensor's storage up. The byte range bound for it is
/// decided in one place, [`Ctx::binding`] (whole buffer, or a [`Win`] of
/// rows).
///
/// [`Win`]: super::Win
///
/// A view that starts at its parent's first byte is read in place (kernels
/// index from the start of the buffer and never past their own dims, so a
/// prefix of the parent reads the same); other views are `NotSupported`
/// here: kernels that take them (`gather_rows`, `reduce_rows`, `download`)
/// use [`view_buffer`]. Ops need no instance check here: core checks every
/// tensor of an op against the backend instance before launch.
pub(crate) fn buffer(t: &Tensor) -> Result<&wgpu::Buffer> {
    if t.is_view() && t.offset_bytes() != 0 {
        return Err(deepport_core::Error::not_supported(
            BACKEND,
            "a tensor view",
            "this wgpu kernel binds whole buffers; a view at a nonzero offset is not read in place",
        ));
    }
    view_buffer(t).map(|(b, _)| b)
}

/// The buffer of a wgpu tensor and the byte offset of its data in it
/// (nonzero only for a view).
pub(crate) fn view_buffer(t: &Tensor) -> Result<(&wgpu::Buffer, u64)> {
    t.storage_any::<WgpuStorage>()
        .map(|s| (&s.buffer, t.offset_bytes() as u64))
        .ok_or_else(|| deepport_core::Error::ForeignTensor {
            owner: t.owner().to_string(),
            backend: BACKEND.into(),
        })
}

/// The storage of a tensor of the instance `id` (memory methods); for a
/// view, its parent's (read it at `offset_bytes`).
pub(crate) fn storage_of(
    t: &Tensor,
    id: deepport_core::backend::InstanceId,
) -> Result<&WgpuStorage> {
    t.storage_for::<WgpuStorage>(id, BACKEND)
}

impl Ctx {
    /// A new zeroed storage buffer of `bytes` (padded) bytes.
    pub(crate) fn create_buffer(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_alive(what)?;
        let size = padded(bytes);
        if size > self.limits.max_buffer_size {
            return Err(dev_err(format!(
                "{what}: {size} bytes exceed this adapter's max_buffer_size ({} bytes)",
                self.limits.max_buffer_size
            )));
        }
        let mut scopes = push_scopes(&self.device);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!("{what}: allocating {size} bytes: {e}")));
        }
        Ok(buf)
    }

    /// A new buffer holding `data`.
    pub(crate) fn upload_bytes(&self, what: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let buf = self.create_buffer(what, data.len() as u64)?;
        if !data.is_empty() {
            let mut scopes = push_scopes(&self.device);
            write_padded(&self.queue, &buf, data);
            if let Some(e) = pop_scopes(&mut scopes) {
                return Err(dev_err(format!(
                    "{what}: writing {} bytes: {e}",
                    data.len()
                )));
            }
        }
        Ok(buf)
    }

    /// Overwrites `buf` with `data` after every op recorded so far.
    pub(crate) fn write_bytes(&self, what: &str, buf: &wgpu::Buffer, data: &[u8]) -> Result<()> {
        self.check_alive(what)?;
        let mut st = self.state(what)?;
        // Queue writes land before the next submission: submit what is
        // pending first, so earlier ops see the old contents.
        self.flush(&mut st)?;
        if !data.is_empty() {
            let mut scopes = push_scopes(&self.device);
            write_padded(&self.queue, buf, data);
            if let Some(e) = pop_scopes(&mut scopes) {
                return Err(dev_err(format!(
                    "{what}: writing {} bytes: {e}",
                    data.len()
                )));
            }
        }
        Ok(())
    }

    /// Copies `bytes` bytes of `buf` to the host after all recorded work,
    /// then reports any failed check or device error.
    pub(crate) fn read_bytes(&self, what: &str, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        self.check_alive(what)?;
        let mut st = self.state(what)?;
        let data = self.sync_locked(&mut st, what, Some((buf, bytes)))?;
        Ok(data.unwrap_or_default())
    }

    /// Waits for all recorded work; reports failed checks and device errors.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.check_alive("synchronize")?;
        let mut st = self.state("synchronize")?;
        self.sync_locked(&mut st, "synchronize", None).map(|_| ())
    }
}

fn write_padded(queue: &wgpu::Queue, buf: &wgpu::Buffer, data: &[u8]) {
    if data.len().is_multiple_of(4) {
        queue.write_buffer(buf, 0, data);
    } else {
        let mut v = data.to_vec();
        v.resize(padded(data.len() as u64) as usize, 0);
        queue.write_buffer(buf, 0, &v);
    }
}
