//! Kernel freshness for a SQLite store: inotify on the database's directory, filtered to
//! the database, its `-wal` and its `-journal`. Any write there (another connection's
//! commit, ours, a checkpoint) wakes the watcher, which brings the snapshot to the
//! database's version (`PRAGMA data_version`) and reports exactly the rows whose bytes
//! changed or that are gone. Unchanged tables and rows keep their `Arc`s, so the diff
//! costs a pointer compare each.

use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::Instant;

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

fn run(
    db: Arc<Sqlite>,
    sink: Arc<dyn ChangeSink>,
    mut inotify: Inotify,
    names: HashSet<OsString>,
    mut last: Arc<Snapshot>,
) {
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
        // A commit writes the WAL in several write(2)s: look once for all that queued.
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
            for (id, v) in &old.rows {
                match new.rows.get(id) {
                    Some(n) if Arc::ptr_eq(&n.bytes, &v.bytes) => {}
                    n => out.push(StoreEvent::Record {
                        kind: *kind,
                        id: id.clone(),
                        gone: n.is_none(),
                    }),
                }
            }
        }
        last = now;
        if !out.is_empty() {
            sink.store_changed(out, t0);
        }
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
