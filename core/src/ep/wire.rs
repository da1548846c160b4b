//! The byte encoding of expert-parallel messages: little-endian writers and
//! a bounds-checked reader (a malformed message is an error, never a panic
//! or a huge allocation).

use crate::error::{Error, Result};

/// Appends little-endian values to a message.
#[derive(Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    /// A writer for a message of about `bytes` bytes (reserved at once, so
    /// that a payload of hundreds of megabytes is not copied as it grows).
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Writer(Vec::with_capacity(bytes))
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Reads a message from rank `src` on rank `me`, with bounds checks.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    me: usize,
    src: usize,
    op: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(op: &'static str, me: usize, src: usize, buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            me,
            src,
            op,
        }
    }
    pub(crate) fn malformed(&self, what: &str) -> Error {
        Error::Comm {
            rank: self.me,
            msg: format!(
                "{}: malformed message from rank {} ({what} at byte {} of {})",
                self.op,
                self.src,
                self.pos,
                self.buf.len()
            ),
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.malformed("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn usize(&mut self) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| self.malformed("count too large"))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(a))
    }
    pub(crate) fn f32(&mut self) -> Result<f32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(f32::from_le_bytes(a))
    }
    /// A count of items taking at least `item_bytes` each: rejects counts
    /// the rest of the message cannot hold.
    pub(crate) fn count(&mut self, item_bytes: usize) -> Result<usize> {
        let n = self.usize()?;
        let left = self.buf.len() - self.pos;
        if n.checked_mul(item_bytes.max(1)).is_none_or(|b| b > left) {
            return Err(self.malformed("count exceeds message"));
        }
        Ok(n)
    }
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}
