//! File fingerprints: (device, inode, size, mtime ns, ctime ns).
//!
//! Why all five: (mtime, len) alone misses two same-length writes within one coarse clock
//! tick; an atomic rename always changes the inode, and an in-place write changes ctime.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::untrusted;
use crate::error::{Result, StoreError};

/// The error for a store file that cannot be opened or read (see
/// [`untrusted::store_error`]).
pub fn open_error(path: &Path, e: io::Error) -> StoreError {
    untrusted::store_error(path, "read", e)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    /// Type and permission bits (`st_mode`), and the owner: what the mount mirrors.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Fingerprint {
    pub fn of(meta: &Metadata) -> Self {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// A regular file (not a symlink, FIFO, socket or device planted in the store).
    pub fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    pub fn mtime(&self) -> SystemTime {
        ns_to_time(self.mtime_ns)
    }

    pub fn ctime(&self) -> SystemTime {
        ns_to_time(self.ctime_ns)
    }
}

pub fn ns_to_time(ns: i128) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos((-ns) as u64)
    }
}

/// Stats a path without following a symlink there: `Ok(None)` when it does not exist.
pub fn stat(path: &Path) -> Result<Option<Fingerprint>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Fingerprint::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(format!("stat {}", path.display()), e)),
    }
}

/// Reads a whole file and returns its bytes with the fingerprint of exactly those bytes.
///
/// The fingerprint comes from fstat of the open descriptor after the read, compared with
/// the one before: if an in-place writer changed the file meanwhile, read again, so a
/// fingerprint is never paired with bytes it does not describe.
///
/// The store is untrusted: a symlink, FIFO, socket or device there, or a file over
/// [`untrusted::MAX_STORE_FILE_BYTES`], is refused with [`StoreError::Untrusted`].
pub fn read_with_fingerprint(path: &Path) -> Result<Option<(Vec<u8>, Fingerprint)>> {
    read_with_fingerprint_max(path, untrusted::MAX_STORE_FILE_BYTES)
}

/// `read_with_fingerprint`, reading at most `max` bytes.
pub fn read_with_fingerprint_max(path: &Path, max: u64) -> Result<Option<(Vec<u8>, Fingerprint)>> {
    for _ in 0..16 {
        let file = match untrusted::open_read(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(open_error(path, e)),
        };
        let before = file
            .metadata()
            .map_err(|e| StoreError::io(format!("fstat {}", path.display()), e))?;
        let buf = untrusted::read_file_bounded(&file, before.len(), max, path)
            .map_err(|e| open_error(path, e))?;
        let after = file
            .metadata()
            .map_err(|e| StoreError::io(format!("fstat {}", path.display()), e))?;
        let (fb, fa) = (Fingerprint::of(&before), Fingerprint::of(&after));
        if fb == fa && fa.size == buf.len() as u64 {
            return Ok(Some((buf, fa)));
        }
    }
    Err(StoreError::Again(format!(
        "{} kept changing while being read (an in-place writer?)",
        path.display()
    )))
}
