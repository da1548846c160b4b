//! Device tensors: an opaque storage owned by one backend *instance*, a
//! dtype, a shape, and optionally a window (a view) over a parent's storage.
//!
//! * **Ownership.** Every backend instance has an [`InstanceId`]; a tensor
//!   records the instance that made it. Handing a tensor of GPU 0 to GPU 1,
//!   or a `wgpu` tensor to `cpu`, is [`Error::ForeignTensor`] — checked by
//!   core before every op launch ([`crate::ops::LocalOp`]) and by backends'
//!   memory methods ([`Tensor::storage_for`]) — never a wrong read.
//! * **Views.** [`Tensor::view`] and [`Tensor::rows`] make a tensor that
//!   shares its parent's storage at an element offset: per-expert slices of
//!   stacked weights and pages of a cache need no copy. Views are read-only:
//!   core rejects a view passed as an op output, and a tensor whose storage
//!   is shared with a live view cannot be written ([`Tensor::storage_mut_for`]
//!   fails), so an op can never write memory that another tensor reads.
//!   A backend reads a view at [`Tensor::offset_bytes`] into its storage;
//!   one that cannot says `NotSupported` (see [`Tensor::is_view`]).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::numel;
use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Identifies one backend instance (one device of one backend, made once).
/// Two instances never share an id within a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(u64);

impl InstanceId {
    /// A fresh id, distinct from every other in this process.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        InstanceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
    /// The number behind the id (for messages).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Backend-specific device memory behind a [`Tensor`].
pub trait Storage: Any + Send + Sync {
    /// Name of the backend that allocated this storage (with its device,
    /// e.g. `wgpu:0`), for messages.
    fn backend(&self) -> &str;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// The whole storage's bytes, read in place, for a storage in host
    /// memory whose bytes are current whenever no op of its backend is
    /// running (a synchronous host backend: `cpu`, `cpu-ref`). Default:
    /// `None` (device memory). See [`Tensor::host_bytes`].
    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }
}

/// A tensor in a backend's memory: dtype, shape and an opaque storage that
/// only the allocating backend instance can read. See the module docs.
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Arc<dyn Storage>,
    owner: InstanceId,
    /// Element offset into the storage (0 unless a view).
    offset: usize,
    /// Elements the storage holds (the root tensor's element count).
    capacity: usize,
    view: bool,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({}, {:?}, on {} {}",
            self.dtype,
            self.shape,
            self.storage.backend(),
            self.owner
        )?;
        if self.view {
            write!(f, ", view at element {}", self.offset)?;
        }
        write!(f, ")")
    }
}

impl Tensor {
    /// Wraps backend storage holding `numel(shape)` elements of `dtype`.
    /// Backends call this from `alloc`/`upload` with their own instance id.
    pub fn new(
        dtype: DType,
        shape: &[usize],
        storage: Box<dyn Storage>,
        owner: InstanceId,
    ) -> Self {
        Self {
            dtype,
            shape: shape.to_vec(),
            storage: Arc::from(storage),
            owner,
            offset: 0,
            capacity: numel(shape),
            view: false,
        }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// Size of the data in bytes (of the view, for a view).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Name of the backend (and device) that owns this tensor.
    pub fn owner(&self) -> &str {
        self.storage.backend()
    }
    /// The backend instance that owns this tensor.
    pub fn instance(&self) -> InstanceId {
        self.owner
    }
    /// True for a view made by [`Tensor::view`] or [`Tensor::rows`].
    pub fn is_view(&self) -> bool {
        self.view
    }
    /// Element offset of the data in the storage (0 unless a view).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Byte offset of the data in the storage (0 unless a view).
    pub fn offset_bytes(&self) -> usize {
        self.offset * self.dtype.size()
    }
    /// Element count of the whole storage (the root tensor's).
    pub fn storage_numel(&self) -> usize {
        self.capacity
    }

    /// Changes the shape (same element count) without touching the data.
    pub fn reshape(&mut self, shape: &[usize]) -> Result<()> {
        if numel(shape) != self.numel() {
            return Err(Error::Other(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// A read-only view of `numel(shape)` elements starting `offset`
    /// elements into this tensor's data. No data moves.
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let n = numel(shape);
        let end = offset.checked_add(n);
        if end.is_none_or(|e| e > self.numel()) {
            return Err(Error::Other(format!(
                "a view of {shape:?} at element {offset} does not fit in a tensor of shape {:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            owner: self.owner,
            offset: self.offset + offset,
            capacity: self.capacity,
            view: true,
        })
    }

    /// A read-only view of rows `[start, start + count)` along the first
    /// dimension (the other dimensions unchanged).
    pub fn rows(&self, start: usize, count: usize) -> Result<Tensor> {
        let Some((&rows, rest)) = self.shape.split_first() else {
            return Err(Error::Other("cannot take rows of a scalar tensor".into()));
        };
        if start.checked_add(count).is_none_or(|e| e > rows) {
            return Err(Error::Other(format!(
                "rows [{start}, {start}+{count}) are outside a tensor of shape {:?}",
                self.shape
            )));
        }
        let row = numel(rest);
        let mut shape = vec![count];
        shape.extend_from_slice(rest);
        self.view(start * row, &shape)
    }

    fn foreign(&self, instance: InstanceId, backend: &str) -> Error {
        Error::ForeignTensor {
            owner: format!("{} {}", self.storage.backend(), self.owner),
            backend: format!("{backend} {instance}"),
        }
    }

    /// Fails unless this tensor belongs to `instance` (named `backend` in
    /// the message).
    pub fn check_owner(&self, instance: InstanceId, backend: &str) -> Result<()> {
        if self.owner == instance {
            Ok(())
        } else {
            Err(self.foreign(instance, backend))
        }
    }

    /// The storage, downcast, for the backend instance `instance` (named
    /// `backend` in messages); fails for another instance's tensor. A view
    /// yields its parent's storage: read it at [`Tensor::offset_bytes`].
    pub fn storage_for<S: Storage>(&self, instance: InstanceId, backend: &str) -> Result<&S> {
        self.check_owner(instance, backend)?;
        self.storage
            .as_any()
            .downcast_ref::<S>()
            .ok_or_else(|| self.foreign(instance, backend))
    }

    /// The storage, downcast mutably. Fails for another instance's tensor,
    /// for a view, and while a view of this tensor is alive (an op must not
    /// write memory that another tensor reads).
    pub fn storage_mut_for<S: Storage>(
        &mut self,
        instance: InstanceId,
        backend: &str,
    ) -> Result<&mut S> {
        self.check_owner(instance, backend)?;
        if self.view {
            return Err(Error::Other(format!(
                "{backend}: a view is read-only; cannot write into {self:?}"
            )));
        }
        let desc = format!("{self:?}");
        let foreign = self.foreign(instance, backend);
        let s = Arc::get_mut(&mut self.storage).ok_or_else(|| {
            Error::Other(format!(
                "{backend}: {desc} has live views; it cannot be written while they exist"
            ))
        })?;
        s.as_any_mut().downcast_mut::<S>().ok_or(foreign)
    }

    /// This tensor's bytes (a view's window) read in place, when its
    /// storage is host memory ([`Storage::host_bytes`]); `None` otherwise.
    /// No copy: core's expert-parallel protocol sends host-memory payloads
    /// straight from them. While the borrow (or any view of this tensor)
    /// lives, nobody can write the storage ([`Tensor::storage_mut_for`]).
    pub fn host_bytes(&self) -> Option<&[u8]> {
        let a = self.offset_bytes();
        self.storage
            .host_bytes()?
            .get(a..a.checked_add(self.nbytes())?)
    }

    /// The storage, downcast, without an ownership check. For backends that
    /// share one storage type across instances and check ownership
    /// themselves; prefer [`Tensor::storage_for`].
    pub fn storage_any<S: Storage>(&self) -> Option<&S> {
        self.storage.as_any().downcast_ref::<S>()
    }
}
