//! Kernel freshness for a SQLite store: inotify on the database's directory, filtered to
//! the database, its `-wal` and its `-journal`. Any write there (another connection's
//! commit, ours, a checkpoint) wakes the watcher, which brings the snapshot to the
//! database's version (`PRAGMA data_version`) and reports exactly the rows whose bytes
//! changed or that are gone. Unchanged tables and rows keep their `Arc`s, so the diff
//! costs a pointer compare each.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};

use super::{COLLECTIONS, Snapshot, Sqlite};
use crate::backend::{ChangeSink, StoreEvent};
use crate::error::{Result, StoreError};

pub(super) fn start(db: Arc<Sqlite>, sink: Arc<dyn ChangeSink>) -> Result<()> {
    let dir = db
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into());
    let name = db.path.file_name().map(OsString::from).unwrap_or_default();
    let names: HashSet<OsString> = ["", "-wal", "-journal"]
        .iter()
        .map(|suffix| {
            let mut n = name.clone();
            n.push(suffix);
            n
        })
        .collect();
    let inotify = Inotify::init().map_err(|e| StoreError::io("inotify", e))?;
    inotify
        .watches()
        .add(
            &dir,
            WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
        )
        .map_err(|e| StoreError::io(format!("watch {}", dir.display()), e))?;
    let first = db.current()?;
    std::thread::Builder::new()
        .name("agentmount-watch".into())
        .spawn(move || run(db, sink, inotify, names, first))
        .map_err(|e| StoreError::io("start the database watcher", e))?;
    Ok(())
}

/// How long the watcher waits for another connection's write transaction to end before it
/// looks anyway (a longer transaction is seen at its next write, or when the TTL runs out).
const WRITER_WAIT: Duration = Duration::from_secs(2);

/// The database's `-shm` (WAL index), where SQLite keeps its WAL locks as fcntl byte
/// locks: byte 120 is held by the one writer from its first write to the end of its commit.
struct Shm {
    path: PathBuf,
    file: Option<File>,
}

impl Shm {
    /// Whether another process holds the WAL write lock now. Without a `-shm` (a rollback
    /// journal database) there is nothing to wait for.
    fn write_locked(&mut self) -> bool {
        if self.file.is_none() {
            self.file = crate::store::untrusted::open_read(&self.path).ok();
        }
        let Some(f) = &self.file else {
            return false;
        };
        // SAFETY: F_GETLK fills the flock struct we own; the descriptor is open.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 120;
        fl.l_len = 1;
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
        if rc != 0 {
            self.file = None;
            return false;
        }
        fl.l_type != libc::F_UNLCK as libc::c_short
    }
}

fn run(
    db: Arc<Sqlite>,
    sink: Arc<dyn ChangeSink>,
    mut inotify: Inotify,
    names: HashSet<OsString>,
    mut last: Arc<Snapshot>,
) {
    let mut shm = Shm {
        path: PathBuf::from(format!("{}-shm", db.path.display())),
        file: None,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "inotify read failed; the watcher stops and changes are seen when the TTL runs out");
                return;
            }
        };
        let t0 = Instant::now();
        let ours = events
            .into_iter()
            .any(|e| e.name.is_some_and(|n| names.contains(n)));
        if !ours {
            continue;
        }
        // The first write to the WAL comes while the writer's transaction is still open:
        // its commit is visible (PRAGMA data_version moves) only once it releases the WAL
        // write lock, after the last write raised its last event. So wait for the lock
        // (bounded), then look once for everything that queued meanwhile.
        let deadline = t0 + WRITER_WAIT;
        while shm.write_locked() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        let _ = drain(&mut inotify, &mut buf);
        let Ok(now) = db.current() else {
            continue;
        };
        if Arc::ptr_eq(&now, &last) {
            continue;
        }
        let mut out = Vec::new();
        for (i, kind) in COLLECTIONS.iter().enumerate() {
            let (old, new) = (&last.tables[i], &now.tables[i]);
            if Arc::ptr_eq(old, new) {
                continue;
            }
            // Both maps in key order, side by side: unchanged rows share their Arc.
            let mut a = old.rows.iter().peekable();
            let mut b = new.rows.iter().peekable();
            loop {
                match (a.peek(), b.peek()) {
                    (Some((ka, ra)), Some((kb, rb))) => match ka.cmp(kb) {
                        std::cmp::Ordering::Equal => {
                            if !Arc::ptr_eq(ra, rb) && ra.view.bytes != rb.view.bytes {
                                out.push(event(*kind, ka, false));
                            }
                            a.next();
                            b.next();
                        }
                        std::cmp::Ordering::Less => {
                            out.push(event(*kind, ka, true));
                            a.next();
                        }
                        std::cmp::Ordering::Greater => {
                            out.push(event(*kind, kb, false));
                            b.next();
                        }
                    },
                    (Some((ka, _)), None) => {
                        out.push(event(*kind, ka, true));
                        a.next();
                    }
                    (None, Some((kb, _))) => {
                        out.push(event(*kind, kb, false));
                        b.next();
                    }
                    (None, None) => break,
                }
            }
        }
        last = now;
        if !out.is_empty() {
            sink.store_changed(out, t0);
        }
    }
}

fn event(kind: crate::backend::Kind, id: &str, gone: bool) -> StoreEvent {
    StoreEvent::Record {
        kind,
        id: id.to_string(),
        gone,
    }
}

/// Reads whatever events are queued now without blocking.
fn drain(inotify: &mut Inotify, buf: &mut [u8]) -> std::io::Result<()> {
    loop {
        match inotify.read_events(buf) {
            Ok(mut ev) => {
                if ev.next().is_none() {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
