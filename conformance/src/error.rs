//! The error type of the command line: a usage error (exit status 2) or a
//! failure of the op or backend (exit status 1).

use deepport_core::Error;
use std::fmt;

/// Exit status for a usage error: unknown op, missing tensor, bad parameter,
/// inputs that do not fit the op.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for an op or backend failure, or a failed `run`.
pub const EXIT_FAILURE: i32 = 1;

/// What went wrong on the command line.
#[derive(Debug)]
pub enum CliError {
    /// The invocation or its inputs are wrong (exit status 2).
    Usage(String),
    /// The inputs do not satisfy the op's contract (shapes, dtypes,
    /// parameter ranges), as core's validation reports it (exit status 2).
    Invalid(Error),
    /// The backend or the op failed, including `NotSupported` and an
    /// unavailable backend (exit status 1).
    Failed(Error),
}

impl CliError {
    /// Shorthand for a usage error.
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::Invalid(_) => EXIT_USAGE,
            CliError::Failed(_) => EXIT_FAILURE,
        }
    }

    /// The core error behind a failure, if any.
    pub fn core(&self) -> Option<&Error> {
        match self {
            CliError::Usage(_) => None,
            CliError::Invalid(e) | CliError::Failed(e) => Some(e),
        }
    }

    /// True when the backend said it does not implement the op.
    pub fn is_not_supported(&self) -> bool {
        self.core().is_some_and(Error::is_not_supported)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) => f.write_str(m),
            CliError::Invalid(e) => write!(f, "invalid input: {e}"),
            CliError::Failed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CliError::Usage(_) => None,
            CliError::Invalid(e) | CliError::Failed(e) => Some(e),
        }
    }
}
