//! Windows: binding a byte range of a buffer, so that tensors beyond
//! `max_storage_buffer_binding_size` are processed in row ranges.

use super::{dev_err, padded, Ctx, BACKEND};
use deepport_core::{Error, Result};

/// What a dispatch binds after the uniform block, in the shader's order.
pub(crate) type Bufs<'b> = [&'b wgpu::Buffer];

/// A byte range of a buffer, bound as one storage binding: how tensors
/// beyond `max_storage_buffer_binding_size` are processed in pieces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Win<'b> {
    pub(crate) buf: &'b wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

impl<'b> Win<'b> {
    /// The whole buffer.
    pub(crate) fn whole(buf: &'b wgpu::Buffer) -> Self {
        Win {
            buf,
            offset: 0,
            size: buf.size(),
        }
    }

    /// Rows `[r0, r1)` of a row-major buffer with `row_bytes` per row. The
    /// start must be aligned (chunks from [`Ctx::plan_rows`] are).
    pub(crate) fn rows(buf: &'b wgpu::Buffer, row_bytes: u64, r0: usize, r1: usize) -> Self {
        let offset = (r0 as u64 * row_bytes).min(buf.size());
        let end = padded(r1 as u64 * row_bytes).min(buf.size()).max(offset);
        Win {
            buf,
            offset,
            size: end - offset,
        }
    }

    /// Elements `[e0, e1)` of `elem_bytes` each, from the aligned offset at
    /// or below `e0`; also returns the element index the window starts at
    /// (subtract it from global indices inside the kernel).
    pub(crate) fn elems(
        buf: &'b wgpu::Buffer,
        elem_bytes: u64,
        e0: usize,
        e1: usize,
        align: u64,
    ) -> (Self, usize) {
        let start = e0 as u64 * elem_bytes;
        let offset = (start / align * align).min(buf.size());
        let end = padded(e1 as u64 * elem_bytes).min(buf.size()).max(offset);
        (
            Win {
                buf,
                offset,
                size: end - offset,
            },
            (offset / elem_bytes) as usize,
        )
    }
}

impl Ctx {
    /// The storage binding of a window: **the one place where the byte
    /// offset and size a kernel sees are decided and checked** (every
    /// `Rec::dispatch`/`dispatch_win` buffer goes through here). The range
    /// must fit `max_storage_buffer_binding_size` (else `NotSupported`:
    /// split the work with [`Ctx::plan_rows`]), start at a multiple of
    /// `min_storage_buffer_offset_alignment` and be a non-empty multiple of
    /// 4 bytes.
    ///
    /// A tensor view (an element offset over a parent buffer) becomes a
    /// window here: bound in place when its byte offset is aligned, staged
    /// through a copy (`copy_window`) otherwise.
    pub(crate) fn binding<'b>(&self, op: &str, w: &Win<'b>) -> Result<wgpu::BufferBinding<'b>> {
        let limit = self.max_binding;
        if w.size > limit {
            return Err(Error::not_supported(
                BACKEND,
                op.to_string(),
                format!(
                    "a tensor of {} bytes exceeds this adapter's storage binding limit of {limit} bytes",
                    w.size
                ),
            ));
        }
        if !w.offset.is_multiple_of(self.binding_align())
            || w.size == 0
            || !w.size.is_multiple_of(4)
        {
            return Err(dev_err(format!(
                "{op}: window {}+{} of a {}-byte buffer is not a valid binding",
                w.offset,
                w.size,
                w.buf.size()
            )));
        }
        Ok(wgpu::BufferBinding {
            buffer: w.buf,
            offset: w.offset,
            size: std::num::NonZeroU64::new(w.size),
        })
    }

    /// The storage binding limit in bytes (device limit, or the test cap).
    pub(crate) fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// The alignment of storage binding offsets.
    pub(crate) fn binding_align(&self) -> u64 {
        (self.limits.min_storage_buffer_offset_alignment as u64).max(4)
    }

    /// Splits `rows` rows into chunks `[r0, r1)` such that, for every
    /// operand with `row_bytes[i]` bytes per row, the rows of a chunk fit one
    /// storage binding and start at an aligned offset ([`Win::rows`]).
    /// One chunk when everything fits; `NotSupported` when one row alone
    /// (times the alignment granule) is too large.
    pub(crate) fn plan_rows(
        &self,
        op: &str,
        rows: usize,
        row_bytes: &[u64],
    ) -> Result<Vec<(usize, usize)>> {
        deepport_gpu_host::window::plan_rows(rows, row_bytes, self.max_binding, self.binding_align())
            .ok_or_else(|| {
            Error::not_supported(
                BACKEND,
                op.to_string(),
                format!(
                    "a row of {} bytes does not fit this adapter's storage binding limit of {} bytes",
                    row_bytes.iter().max().copied().unwrap_or(0),
                    self.max_binding
                ),
            )
        })
    }
}
