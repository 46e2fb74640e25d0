//! One error type for the store layer. Every variant knows its errno, so the FUSE
//! adapter never invents one, and the message is the reason shown in `.errors` and the log.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bad input: invalid JSON, wrong type, unknown enum value, id mismatch, bad name.
    #[error("{0}")]
    Invalid(String),
    /// A record over the size limit.
    #[error("{0}")]
    TooBig(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// A garbage collection is already running.
    #[error("{0}")]
    Busy(String),
    /// The writer lock was not taken in time, or other writers kept winning the race.
    #[error("{0}")]
    Again(String),
    /// A store file does not parse: the last good view is served, writes are refused.
    #[error("{0}")]
    Corrupt(String),
    /// The operation is never allowed on this object (attachment bytes, mkdir, links).
    #[error("{0}")]
    NotPermitted(String),
    #[error("{0}")]
    ReadOnly(String),
    /// An entry of the store that is not what the store may hold there (a symlink, a FIFO,
    /// a device, a file over the read bound): never followed or opened, reported instead.
    #[error("{0}")]
    Untrusted(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Invalid(_) => libc::EINVAL,
            StoreError::TooBig(_) => libc::EFBIG,
            StoreError::NotFound(_) => libc::ENOENT,
            StoreError::Exists(_) => libc::EEXIST,
            StoreError::Busy(_) => libc::EBUSY,
            StoreError::Again(_) => libc::EAGAIN,
            StoreError::Corrupt(_) => libc::EIO,
            StoreError::NotPermitted(_) => libc::EPERM,
            StoreError::ReadOnly(_) => libc::EROFS,
            StoreError::Untrusted(_) => libc::EIO,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The symbolic name of an errno, as `.errors` shows it.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        libc::EIO => "EIO",
        libc::EPERM => "EPERM",
        libc::EROFS => "EROFS",
        libc::EXDEV => "EXDEV",
        libc::ENOSPC => "ENOSPC",
        libc::EACCES => "EACCES",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EBADF => "EBADF",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        _ => "EOTHER",
    }
}
