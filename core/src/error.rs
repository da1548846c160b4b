//! The one error type of deepport.
//!
//! Every variant names what went wrong precisely enough that a user can fix
//! their input without reading deepport's source: the op and argument, the
//! expected and actual shape or dtype, the file and tensor.

use crate::dtype::DType;
use std::path::PathBuf;

/// Result alias used throughout deepport.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in deepport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op argument has the wrong shape.
    #[error("{op}: argument `{arg}` has shape {actual:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: Vec<usize>,
    },
    /// An op argument has the wrong dtype.
    #[error("{op}: argument `{arg}` has dtype {actual}, expected {expected}")]
    DType {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: DType,
    },
    /// An op argument or parameter is invalid for another reason.
    #[error("{op}: argument `{arg}`: {msg}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        msg: String,
    },
    /// An index held in a tensor (block table entry, expert id, token id,
    /// sequence length, …) lies outside its valid range.
    #[error(
        "{op}: argument `{arg}` at {position:?} holds {value}, outside the valid range {range}"
    )]
    IndexOutOfRange {
        op: &'static str,
        arg: &'static str,
        position: Vec<usize>,
        value: i64,
        range: String,
    },
    /// A floating-point input holds NaN or ±inf where the op forbids it.
    #[error("{op}: argument `{arg}` holds a non-finite value ({value}) at {position:?}")]
    NonFinite {
        op: &'static str,
        arg: &'static str,
        position: Vec<usize>,
        value: f64,
    },
    /// The backend does not implement this op (or these dtypes).
    #[error("backend `{backend}` does not support {op}: {reason}")]
    NotSupported {
        backend: String,
        op: String,
        reason: String,
    },
    /// The backend cannot run on this machine (driver or device missing).
    #[error("backend `{backend}` is unavailable: {reason}")]
    Unavailable { backend: String, reason: String },
    /// No backend of that name is registered.
    #[error("unknown backend `{name}`; known backends: {known}")]
    UnknownBackend { name: String, known: String },
    /// A tensor was handed to a backend that did not allocate it.
    #[error("tensor belongs to backend `{owner}`, not `{backend}`")]
    ForeignTensor { owner: String, backend: String },
    /// A device or runtime failure (out of memory, device lost, compile error).
    #[error("backend `{backend}`: {msg}")]
    Device { backend: String, msg: String },
    /// A communicator failure (peer gone, timeout, mismatched collective).
    #[error("communicator (rank {rank}): {msg}")]
    Comm { rank: usize, msg: String },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed (truncated safetensors, bad JSON, …).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor inside a file is missing or not what was expected.
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// Anything else, with a message that says what.
    #[error("{0}")]
    Other(String),
    /// A size from user input (a case parameter, a file header, a token
    /// list) is over the memory budget ([`crate::budget::MemoryBudget`]).
    #[error(
        "{what} needs {bytes} bytes ({}), over the memory budget of {budget} bytes ({}); \
         --max-memory sets the budget",
        crate::budget::fmt_bytes(*.bytes),
        crate::budget::fmt_bytes(*.budget)
    )]
    OverBudget {
        what: String,
        bytes: u64,
        budget: u64,
    },
    /// Memory within the budget could not be reserved.
    #[error("{what}: cannot reserve {bytes} bytes ({}): {reason}", crate::budget::fmt_bytes(*.bytes))]
    OutOfMemory {
        what: String,
        bytes: u64,
        reason: String,
    },
}

impl Error {
    /// Shorthand for [`Error::NotSupported`].
    pub fn not_supported(backend: &str, op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::NotSupported {
            backend: backend.to_string(),
            op: op.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            arg,
            msg: msg.into(),
        }
    }

    /// True when the error says "this backend does not do that".
    pub fn is_not_supported(&self) -> bool {
        matches!(self, Error::NotSupported { .. })
    }
}
