//! The storage of a CPU tensor: host bytes, and data derived from them.
//!
//! A kernel may keep what it derives from an operand's bytes — a weight
//! packed into its micro-kernel's panels — with the operand's storage
//! ([`HostStorage::derived`]), so that the next call on the same weight
//! reuses it. Derived data lives exactly as long as the bytes it was made
//! from: every write goes through [`HostStorage::bytes_mut`], which drops
//! it, and it goes with the storage. The bytes are private to this module,
//! so no other path can write them. All derived data together stays within
//! [`DERIVED_MAX`] bytes (and an eighth of the memory budget, `--max-memory`);
//! past that a kernel derives per call, as without the cache.

use deepport_core::backend::{Recycler, Storage};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Most bytes of derived data held by all storages together.
pub(crate) const DERIVED_MAX: usize = 512 << 20;

/// The most derived data kept: [`DERIVED_MAX`], or an eighth of the
/// process's memory budget (`--max-memory`) when that is less.
fn derived_limit() -> usize {
    let budget = deepport_core::budget::MemoryBudget::global().bytes() / 8;
    DERIVED_MAX.min(usize::try_from(budget).unwrap_or(usize::MAX))
}

/// Bytes of derived data held now, by all storages.
static DERIVED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// What a derived value was made from and how: the window of the storage
/// (a view's offset and length, in bytes) and the element type it was read
/// as, the kind of derivation, and its parameters (shape, group, panel
/// width, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DerivedKey {
    pub offset: usize,
    pub len: usize,
    pub dtype: deepport_core::DType,
    pub kind: &'static str,
    pub params: [usize; 4],
}

struct Entry {
    key: DerivedKey,
    value: Arc<dyn Any + Send + Sync>,
    bytes: usize,
}

/// Bytes of a CPU tensor.
pub struct HostStorage {
    backend: &'static str,
    bytes: Vec<u8>,
    /// Where the bytes go when the storage is dropped (a buffer adopted
    /// from a transport, `Backend::adopt`); `None`: to the buffer pool.
    recycle: Option<Recycler>,
    derived: Mutex<Vec<Entry>>,
}

impl HostStorage {
    pub(crate) fn new(backend: &'static str, bytes: Vec<u8>, recycle: Option<Recycler>) -> Self {
        HostStorage {
            backend,
            bytes,
            recycle,
            derived: Mutex::new(Vec::new()),
        }
    }

    /// The bytes, to read.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, to write: drops everything derived from them.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        self.clear_derived();
        &mut self.bytes
    }

    /// The value `make` derives from this storage's bytes, by `key`: made
    /// once and kept until the bytes are written or the storage dropped.
    /// `bytes` is what the value holds; `None` (and `make` not called)
    /// when keeping it would pass [`DERIVED_MAX`], or when `key` holds a
    /// value of another type (a caller bug: keys name their kind).
    pub(crate) fn derived<T: Any + Send + Sync>(
        &self,
        key: DerivedKey,
        bytes: usize,
        make: impl FnOnce() -> T,
    ) -> Option<Arc<T>> {
        let lock = || self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = lock().iter().find(|e| e.key == key) {
            return e.value.clone().downcast::<T>().ok();
        }
        let max = derived_limit();
        DERIVED_BYTES
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes).filter(|&n| n <= max)
            })
            .ok()?;
        let value = Arc::new(make());
        let mut d = lock();
        if let Some(e) = d.iter().find(|e| e.key == key) {
            // Another thread made it meanwhile: keep one.
            DERIVED_BYTES.fetch_sub(bytes, Ordering::SeqCst);
            return e.value.clone().downcast::<T>().ok();
        }
        d.push(Entry {
            key,
            value: value.clone(),
            bytes,
        });
        Some(value)
    }

    fn clear_derived(&mut self) {
        let d = self.derived.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in d.drain(..) {
            DERIVED_BYTES.fetch_sub(e.bytes, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
impl HostStorage {
    /// Derived values held, for tests.
    fn derived_len(&self) -> usize {
        self.derived.lock().unwrap().len()
    }
}

impl Storage for HostStorage {
    fn backend(&self) -> &str {
        self.backend
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    /// Host memory, current whenever no op runs (ops are synchronous).
    fn host_bytes(&self) -> Option<&[u8]> {
        Some(&self.bytes)
    }
}

impl Drop for HostStorage {
    fn drop(&mut self) {
        self.clear_derived();
        let bytes = std::mem::take(&mut self.bytes);
        match self.recycle.take() {
            Some(r) => r(bytes),
            None => crate::pool::give(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &'static str) -> DerivedKey {
        DerivedKey {
            offset: 0,
            len: 8,
            dtype: deepport_core::DType::U8,
            kind,
            params: [1, 2, 3, 4],
        }
    }

    /// A derived value is made once, dropped by a write and made again.
    #[test]
    fn derived_values_live_as_long_as_their_bytes() {
        let mut s = HostStorage::new("cpu", vec![1u8; 8], None);
        let mut made = 0;
        let sum = |s: &HostStorage| s.bytes().iter().map(|&b| b as u32).sum::<u32>();
        let a = s.derived(key("sum"), 4, || {
            made += 1;
            sum(&s)
        });
        assert_eq!(*a.unwrap(), 8);
        let b = s.derived(key("sum"), 4, || {
            made += 1;
            0u32
        });
        assert_eq!((*b.unwrap(), made), (8, 1), "made again without a write");
        // Another key is another value.
        assert_eq!(*s.derived(key("other"), 4, || 7u32).unwrap(), 7);
        assert_eq!(s.derived_len(), 2);
        s.bytes_mut()[0] = 9;
        assert_eq!(s.derived_len(), 0, "a write kept derived values");
        let c = s.derived(key("sum"), 4, || {
            made += 1;
            sum(&s)
        });
        assert_eq!(
            (*c.unwrap(), made),
            (16, 2),
            "a write did not drop the value"
        );
    }

    /// Past the budget nothing is kept and `make` is not called.
    #[test]
    fn derived_data_is_bounded() {
        let s = HostStorage::new("cpu", vec![0u8; 8], None);
        let v = s.derived(key("huge"), DERIVED_MAX + 1, || -> u8 {
            panic!("made past the budget")
        });
        assert!(v.is_none());
    }
}
