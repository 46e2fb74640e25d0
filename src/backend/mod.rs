//! The store seam: what the mount asks of any backing store. `fs/` talks only to
//! [`Backend`] (records) and [`AttachmentStore`] (content-addressed bytes, for backends
//! that have them), and learns of other writers' changes through [`ChangeSink`]. Which
//! backend serves a `--store` is decided once, by [`open`].
//!
//! - `files`: the directory layout of trusty-mpm and lash (`crate::store` is its engine).
//! - `sqlite`: arbiter's SQLite database (arbiter-storage 0.5).
//! - `postgres`: agentmount's shared schema in PostgreSQL, for many hosts.

pub mod files;
pub mod files_watch;
pub mod postgres;
pub mod sqlite;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::error::{Result, StoreError};
use crate::store::attachments::Ingest;
use crate::store::blob_index::{BlobId, Listing};
use crate::store::gc::{GcOptions, GcReport};

/// A record collection: one directory of the mount. Each backend serves some of them
/// ([`Backend::collections`]); the directory's inode is fixed by the collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Sessions,
    Goals,
    Conversations,
    /// arbiter's agents.
    Agents,
    /// arbiter's delegation links.
    Delegations,
}

impl Kind {
    /// The collections of the directory store.
    pub const ALL: [Kind; 3] = [Kind::Sessions, Kind::Goals, Kind::Conversations];

    /// The directory name in the mount.
    pub fn dir_name(self) -> &'static str {
        match self {
            Kind::Sessions => "sessions",
            Kind::Goals => "goals",
            Kind::Conversations => "conversations",
            Kind::Agents => "agents",
            Kind::Delegations => "delegations",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Sessions => "session",
            Kind::Goals => "goal",
            Kind::Conversations => "conversation",
            Kind::Agents => "agent",
            Kind::Delegations => "delegation",
        }
    }
}

/// One record as the mount shows it: its presented bytes and its times.
#[derive(Clone, Debug)]
pub struct RecordView {
    pub id: String,
    pub bytes: Arc<[u8]>,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The permission bits of the store file the record lives in, when that file is its
    /// own or its collection's (the mount never shows the record more open); `None` for
    /// a row of a database.
    pub mode: Option<u32>,
}

/// A listing of a collection; `error` is set when the store behind it cannot be read
/// (the records are then the last good version).
#[derive(Default, Debug)]
pub struct ListView {
    pub records: Vec<RecordView>,
    pub error: Option<String>,
}

/// What changed in the store, as a backend's watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// A record's bytes changed (`gone`: it no longer exists).
    Record { kind: Kind, id: String, gone: bool },
    /// A blob or its sidecar changed (`gone`: the blob no longer exists).
    Blob { id: BlobId, gone: bool },
    /// A label no longer names the blob it named.
    LabelGone(String),
    /// The watcher lost track (an event queue overflowed): drop everything cached.
    Everything,
}

/// Where a backend's watcher reports changes (the mount: kernel invalidation).
pub trait ChangeSink: Send + Sync {
    /// `events` happened in the store; `since` is when the watcher first learnt of them.
    fn store_changed(&self, events: Vec<StoreEvent>, since: Instant);
}

/// The record operations every backend provides. Every method is reload-checked against
/// the store (another process may write it at any time); every change is one atomic
/// commit with a lost-update guard, and a refused change leaves the store as it was.
pub trait Backend: Send + Sync {
    /// Which backend this is ("directory", "sqlite").
    fn backend_name(&self) -> &'static str;
    /// Where the store is, for messages and the mount's fsname (no secrets).
    fn location(&self) -> String;
    /// The collections this store has, in the order the root lists them.
    fn collections(&self) -> &'static [Kind];
    /// Whether `id` names a record of `kind` (and so `<id>.json` is a record name).
    fn check_id(&self, kind: Kind, id: &str) -> Result<()>;
    /// One record, fresh.
    fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>>;
    /// Every record of a collection, fresh.
    fn list(&self, kind: Kind) -> Result<ListView>;
    /// How many records a collection has (for `.status`).
    fn count(&self, kind: Kind) -> usize {
        self.list(kind).map(|l| l.records.len()).unwrap_or(0)
    }
    /// Validates `bytes` as record `id` and stores it: one atomic change.
    fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView>;
    /// Removes record `id`: one atomic change.
    fn remove(&self, kind: Kind, id: &str) -> Result<()>;
    /// Renames record `from` to `to` (replacing `to`), its id rewritten: one atomic change.
    fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView>;
    /// Why a collection cannot be read now, if it cannot (writes to it are refused).
    fn collection_error(&self, kind: Kind) -> Option<String>;
    /// The largest record accepted.
    fn max_record_bytes(&self) -> u64;
    /// Set when the backend itself must not be written (beyond `--read-only`), and why.
    fn read_only_reason(&self) -> Option<String> {
        None
    }
    /// The times directories show.
    fn root_time(&self) -> SystemTime;
    /// When a collection last changed in the store (its directory's mtime).
    fn collection_time(&self, kind: Kind) -> SystemTime {
        let _ = kind;
        self.root_time()
    }
    /// Where agentmount keeps its own state for this store (record times, the change feed,
    /// history): beside the platform's files, never inside them.
    fn state_dir(&self) -> PathBuf;
    /// Who may read and write the store itself (its files' modes and owner), which the
    /// mount mirrors so that a private store stays private under `--allow-other`. `None`
    /// for a store with no files of its own here (Postgres).
    fn access(&self) -> Option<Access> {
        None
    }
    /// A local path whose filesystem `statfs` reports.
    fn statfs_path(&self) -> PathBuf;
    /// The attachment store, for backends that have one.
    fn attachments(&self) -> Option<&dyn AttachmentStore> {
        None
    }
    /// Starts watching the store for other writers' changes, reported to `sink` from a
    /// thread of the backend's own. Without it, changes are seen when TTLs run out.
    fn watch(self: Arc<Self>, sink: Arc<dyn ChangeSink>) -> Result<()>;
    /// What `.status` shows of the store: where it is, its caches, its errors.
    fn status(&self) -> serde_json::Value;
    /// The mount is ending: write out what is kept for later (the manifest journal's
    /// pending entries, for the platform's readers).
    fn shutdown(&self) -> Result<()> {
        Ok(())
    }
}

/// Content-addressed attachments: immutable bytes named by their SHA-256, a sidecar of
/// metadata each, labels, a write-ahead manifest and garbage collection.
pub trait AttachmentStore: Send + Sync {
    /// Which blobs, sidecars and labels exist now.
    fn listing(&self) -> Result<Arc<Listing>>;
    /// The bytes of blob `hex`, as a file the kernel may read directly.
    fn open_blob(&self, hex: &str) -> Result<File>;
    /// The metadata sidecar of blob `hex` and its mtime.
    fn sidecar_bytes(&self, hex: &str) -> Result<(Vec<u8>, SystemTime)>;
    /// Size and times of blob `hex` (for the descriptor of a just-finished ingest).
    fn blob_meta(&self, hex: &str) -> Result<Option<(u64, SystemTime, SystemTime)>>;
    /// Starts streaming a new attachment in.
    fn begin_ingest(&self) -> Result<Ingest>;
    /// Finishes an ingest (intent, bytes, sidecar with `label`); returns the hex id.
    fn finish_ingest(&self, ingest: Ingest, label: Option<&str>) -> Result<String>;
    /// A put by address: the bytes must hash to `hex` (identical bytes onto an existing
    /// blob change nothing); otherwise EPERM.
    fn finish_put(&self, ingest: Ingest, hex: &str) -> Result<()>;
    /// A sidecar written back: accepted only with exactly its current bytes.
    fn put_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()>;
    /// Sets blob `hex`'s sidecar to exactly `bytes` (`agentmount copy`); the label they
    /// carry is taken from any other blob.
    fn import_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()>;
    /// Blob `hex`'s write-ahead intent: none (the store never took it in: gc leaves it
    /// alone), uncommitted (`Some(false)`: collectable once unreferenced past the grace) or
    /// committed (`Some(true)`).
    fn intent(&self, hex: &str) -> Result<Option<bool>>;
    /// Sets blob `hex`'s intent to that state (`agentmount copy` carries it over).
    fn set_intent(&self, hex: &str, state: Option<bool>) -> Result<()>;
    /// Gives `label` to blob `hex` (dropping label `old`, for a rename).
    fn relabel(&self, hex: &str, old: Option<&str>, label: &str) -> Result<()>;
    /// Removes a label (the name only).
    fn unlabel(&self, label: &str) -> Result<()>;
    /// Runs a garbage collection.
    fn gc(&self, opts: &GcOptions) -> Result<GcReport>;
    /// The report of the last collection.
    fn last_gc(&self) -> Option<GcReport>;
    /// How the attachment index keeps itself fresh (for `.status`).
    fn index_mode(&self) -> String;
}

/// The permission bits and owner a store's own files have, as the mount shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Permission bits (0o777) no file of the mount may exceed: for each class (owner,
    /// group, others), read only if every store file and directory grants it, write only
    /// if every one does. Directories show execute where they show read.
    pub mask: u16,
    pub uid: u32,
    pub gid: u32,
}

impl Access {
    /// The access the store's files `metas` (the root first) give: the owner is the root's,
    /// the mask the intersection of what each grants.
    pub fn of(metas: &[std::fs::Metadata]) -> Option<Access> {
        use std::os::unix::fs::MetadataExt;
        let root = metas.first()?;
        let mut mask = 0o777u16;
        for m in metas {
            // Read and write bits of each class; a directory's execute counts as read.
            let mode = m.mode() as u16;
            let mut grant = 0u16;
            for shift in [6, 3, 0] {
                let bits = (mode >> shift) & 0o7;
                let r = if m.is_dir() {
                    bits & 0o4 != 0 && bits & 0o1 != 0
                } else {
                    bits & 0o4 != 0
                };
                let w = bits & 0o2 != 0;
                let class = if r { 0o5 } else { 0 } | if w { 0o2 } else { 0 };
                grant |= class << shift;
            }
            mask &= grant;
        }
        Some(Access {
            mask,
            uid: root.uid(),
            gid: root.gid(),
        })
    }
}

/// What a `--store` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Directory,
    Sqlite,
    /// A `postgres://` or `postgresql://` URL.
    Postgres,
}

/// The first 16 bytes of every SQLite database file.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Tells a directory store from a SQLite database by what is at `path`: a regular file
/// that starts with SQLite's header is a database; anything else is a directory store.
pub fn detect(path: &Path) -> Result<StoreKind> {
    if path.to_str().is_some_and(postgres::is_url) {
        return Ok(StoreKind::Postgres);
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            let mut head = [0u8; 16];
            let mut f = File::open(path)
                .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
            let n = read_full(&mut f, &mut head)
                .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
            if n == 16 && &head == SQLITE_HEADER {
                Ok(StoreKind::Sqlite)
            } else {
                Err(StoreError::Invalid(format!(
                    "{} is a file but not a SQLite database (a store is a directory or an arbiter database)",
                    path.display()
                )))
            }
        }
        _ => Ok(StoreKind::Directory),
    }
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
pub(crate) fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What to open and how: built by the CLI from its flags (no backend knows clap), or by
/// any other caller (`copy`, the tests).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Where each store file is; `layout.root` is the directory, database file or URL.
    pub layout: crate::store::Layout,
    pub options: crate::store::Options,
    /// A Postgres store: where this host keeps its state (journal, log, cache).
    pub state_dir: Option<PathBuf>,
    /// A Postgres store: the local attachment read cache (default `<state_dir>/blobs`).
    pub cache_dir: Option<PathBuf>,
    /// A Postgres store: the most bytes the attachment cache keeps.
    pub cache_size: u64,
}

impl StoreConfig {
    /// The store at `root` (a directory, database file or URL) with default options.
    pub fn at(root: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            layout: crate::store::Layout::new(root),
            options: crate::store::Options::default(),
            state_dir: None,
            cache_dir: None,
            cache_size: 4 << 30,
        }
    }
}

/// Opens the store `cfg` names, whichever backend it is. `place` tells apart the per-host
/// state of two uses of one Postgres store on a host (the mountpoint, or what the CLI does).
pub fn open(
    cfg: &StoreConfig,
    place: &Path,
) -> std::result::Result<std::sync::Arc<dyn Backend>, String> {
    let layout = cfg.layout.clone();
    let options = cfg.options.clone();
    match detect(&layout.root).map_err(|e| e.to_string())? {
        StoreKind::Directory => {
            let store = crate::store::Store::open(layout, options)
                .map_err(|e| format!("cannot open the store: {e}"))?;
            Ok(std::sync::Arc::new(store))
        }
        StoreKind::Sqlite => Ok(std::sync::Arc::new(
            sqlite::Sqlite::open(
                &crate::store::untrusted::trusted_path(&layout.root),
                options,
            )
            .map_err(|e| format!("cannot open {}: {e}", layout.root.display()))?,
        )),
        StoreKind::Postgres => {
            let url = layout.root.to_str().unwrap_or_default();
            // Resolved once: files under them are opened with no symlink on the path.
            let state = crate::store::untrusted::trusted_path(&postgres_state_dir(cfg, place));
            let cache = crate::store::untrusted::trusted_path(
                &cfg.cache_dir.clone().unwrap_or_else(|| state.join("blobs")),
            );
            Ok(std::sync::Arc::new(
                postgres::Postgres::open(url, options, state, cache, cfg.cache_size)
                    .map_err(|e| format!("cannot open {}: {e}", postgres::redact(url)))?,
            ))
        }
    }
}

/// Where agentmount keeps its per-host state of the Postgres store `cfg` names.
pub fn postgres_state_dir(cfg: &StoreConfig, place: &Path) -> PathBuf {
    let root = &cfg.layout.root;
    cfg.state_dir
        .clone()
        .unwrap_or_else(|| postgres::default_state_dir(root.to_str().unwrap_or_default(), place))
}
