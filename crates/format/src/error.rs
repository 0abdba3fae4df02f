//! The one error type of the format layer: a small kind for control flow plus context.

use std::io;

/// What went wrong, coarse enough for callers to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image file (or a backing file) does not exist.
    NotFound,
    /// The on-disk structures are inconsistent or hostile.
    Corrupt,
    /// A valid image uses a feature we do not implement.
    Unsupported,
    /// The operating system reported an I/O error.
    Io,
    /// The caller asked for something impossible (out of range, bad option).
    InvalidArgument,
    /// Another process holds a conflicting lock on the image.
    Busy,
    /// The image is open read-only (or marked corrupt) and a write was attempted.
    ReadOnly,
    /// The device is out of space (ENOSPC).
    NoSpace,
}

/// An error of the format layer, with what it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<io::Error>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Wraps an OS error with what we were doing; ENOSPC and ENOENT get their own kinds.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            _ if source.kind() == io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        let context = context.into();
        Error {
            kind,
            message: format!("{context}: {source}"),
            source: Some(source),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno that best describes this error on a wire protocol (NBD, QMP).
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Corrupt | ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
        }
    }

    /// Prefixes the message with more context (for example the image path).
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
