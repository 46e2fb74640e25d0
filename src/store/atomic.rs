//! Atomic replacement of store files and the writer lock.
//!
//! Every store file is replaced the same way: a uniquely named temp file beside the target,
//! fsync, a last check that the target is still the version the change was computed from,
//! rename over the target, fsync of the directory. Nothing is ever written in place.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};

use super::fingerprint::{self, Fingerprint};
use super::untrusted;
use crate::error::{Result, StoreError};

/// Marker in every temp file name of ours: `.<name>.agentmount-tmp.<pid>.<nanos>.<n>`.
pub const TEMP_MARKER: &str = ".agentmount-tmp.";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temp path in the same directory as `target` (so rename is atomic).
pub fn temp_path_for(target: &Path) -> PathBuf {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    dir.join(temp_name(&name))
}

pub fn temp_name(base: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{base}{TEMP_MARKER}{}.{nanos}.{n}", std::process::id())
}

/// The pid encoded in one of our temp names, if it is one.
pub fn temp_owner_pid(name: &str) -> Option<i32> {
    let rest = &name[name.find(TEMP_MARKER)? + TEMP_MARKER.len()..];
    rest.split('.').next()?.parse().ok()
}

pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence; it has no side effects.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A killed writer nobody has reaped yet (a container whose init does not reap) is a
    // zombie: it exists, but writes nothing any more.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// Removes temp files of ours in `dir` whose writing process is gone. Returns what it removed.
pub fn remove_stray_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    // The directory held open: what is listed is what is removed from.
    let d = match untrusted::open_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(untrusted::store_error(dir, "read dir", e)),
    };
    let entries = fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
        .map_err(|e| StoreError::io(format!("read dir {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = temp_owner_pid(&name)
            && !pid_alive(pid)
        {
            let path = dir.join(&name);
            match untrusted::unlink_in(&d, &name) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("remove {}", path.display()), e)),
            }
        }
    }
    Ok(removed)
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = untrusted::open_dir(dir).map_err(|e| fingerprint::open_error(dir, e))?;
    f.sync_all()
        .map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))
}

/// Creates a store directory and its parents, refusing a symlink on the way.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    untrusted::create_dir_all(dir).map_err(|e| untrusted::store_error(dir, "create", e))
}

/// What `replace_file` found when it came to rename.
pub enum Replaced {
    /// The new bytes are in place; the fingerprint is that of the new file.
    Done(Fingerprint),
    /// The target no longer had the expected fingerprint: another writer got in. Nothing
    /// was changed; the caller reloads and redoes its change.
    Raced,
}

/// Writes `bytes` to a temp file beside `target`, fsyncs it, and renames it over `target`
/// if the target's fingerprint is still `expected` (`None` = the target must not exist).
pub fn replace_file(
    target: &Path,
    bytes: &[u8],
    expected: Option<Fingerprint>,
) -> Result<Replaced> {
    replace_file_with(target, |w| w.write_all(bytes), expected)
}

/// `replace_file`, the content written by `write` straight into the temp file (a large
/// file is never held whole in memory).
///
/// The directory is opened once with no symlink on its path (the store is untrusted) and
/// the temp file is made, renamed and fsynced relative to that descriptor, so a directory
/// swapped for a symlink meanwhile cannot send the write elsewhere. The new file keeps the
/// target's mode and owner: a store the platform writes as its own user stays its own when
/// a root daemon writes it.
pub fn replace_file_with(
    target: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    expected: Option<Fingerprint>,
) -> Result<Replaced> {
    let dir_path = target.parent().unwrap_or(Path::new("."));
    ensure_dir(dir_path)?;
    let dir = untrusted::open_dir(dir_path).map_err(|e| fingerprint::open_error(dir_path, e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp_name = temp_name(&name);
    let tmp = dir_path.join(&tmp_name);
    let result = (|| {
        let f = untrusted::create_in(&dir, &tmp_name, 0o666)
            .map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
        if let Some(fp) = expected {
            keep_mode_and_owner(&f, fp, &tmp);
        }
        let mut w = io::BufWriter::with_capacity(256 << 10, f);
        write(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
        let f = w
            .into_inner()
            .map_err(|e| StoreError::io(format!("write {}", tmp.display()), e.into_error()))?;
        f.sync_all()
            .map_err(|e| StoreError::io(format!("fsync {}", tmp.display()), e))?;
        // The check before the rename: the narrowest window we can give a writer that does
        // not take the lock (it can still slip in between this stat and the rename).
        if fingerprint::stat(target)? != expected {
            return Ok(Replaced::Raced);
        }
        untrusted::rename_in(&dir, &tmp_name, &name).map_err(|e| {
            StoreError::io(
                format!("rename {} -> {}", tmp.display(), target.display()),
                e,
            )
        })?;
        // fstat of our descriptor after the rename is the fingerprint of the bytes we wrote,
        // even if another rename replaced the target a moment later.
        let fp = f
            .metadata()
            .map_err(|e| StoreError::io(format!("fstat {}", target.display()), e))?;
        dir.sync_all()
            .map_err(|e| StoreError::io(format!("fsync {}", dir_path.display()), e))?;
        Ok(Replaced::Done(Fingerprint::of(&fp)))
    })();
    if !matches!(result, Ok(Replaced::Done(_))) {
        let _ = untrusted::unlink_in(&dir, &tmp_name);
    }
    result
}

/// Gives a replacement file the mode and owner of the file it replaces (best effort: an
/// unprivileged daemon cannot give a file away, and then keeps its own).
fn keep_mode_and_owner(f: &File, old: Fingerprint, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = f.metadata() else { return };
    if (now.uid(), now.gid()) != (old.uid, old.gid) {
        // SAFETY: fchown on a descriptor we own.
        let r = unsafe { libc::fchown(f.as_raw_fd(), old.uid, old.gid) };
        if r != 0 {
            tracing::debug!(path = %path.display(), error = %io::Error::last_os_error(), "cannot keep the replaced file's owner");
        }
    }
    let perm = old.mode & 0o777;
    if now.mode() & 0o7777 != perm {
        // SAFETY: fchmod on a descriptor we own.
        let r = unsafe { libc::fchmod(f.as_raw_fd(), perm) };
        if r != 0 {
            tracing::debug!(path = %path.display(), error = %io::Error::last_os_error(), "cannot keep the replaced file's mode");
        }
    }
}

/// The writer lock: flock(2) on `.agentmount.lock`, shared with other processes, plus an
/// in-process mutex so threads of one process queue instead of polling each other.
pub struct WriterLock {
    path: PathBuf,
    local: Mutex<()>,
    timeout: Duration,
}

pub struct LockGuard<'a> {
    _local: MutexGuard<'a, ()>,
    _file: File,
}

impl WriterLock {
    pub fn new(path: PathBuf, timeout: Duration) -> Self {
        WriterLock {
            path,
            local: Mutex::new(()),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock, waiting at most the configured timeout (then EAGAIN).
    pub fn acquire(&self) -> Result<LockGuard<'_>> {
        let deadline = Instant::now() + self.timeout;
        let local = self
            .local
            .try_lock_until(deadline)
            .ok_or_else(|| self.timed_out())?;
        if let Some(dir) = self.path.parent() {
            ensure_dir(dir)?;
        }
        let file = untrusted::open_write(&self.path, false, 0o666)
            .map_err(|e| untrusted::store_error(&self.path, "open lock", e))?;
        let mut pause = Duration::from_micros(100);
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(LockGuard {
                    _local: local,
                    _file: file,
                });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK)
                && err.raw_os_error() != Some(libc::EINTR)
            {
                return Err(StoreError::io(
                    format!("flock {}", self.path.display()),
                    err,
                ));
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Again(format!(
            "writer lock {} not taken within {:?}: another writer holds it",
            self.path.display(),
            self.timeout
        ))
    }
}
