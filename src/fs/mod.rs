//! The mounted tree, the same for every backend (it talks to `crate::backend::Backend`
//! only): which names exist, what each operation does, open handles, scratch files and
//! in-progress ingests. `fuse.rs` only turns fuser callbacks into calls on `Core`.
//!
//! - `lookup.rs`: what a lookup and a getattr do
//! - `readdir.rs`: directory listings
//! - `open.rs`: open, create, read
//! - `write.rs`: write and the commit at flush/fsync/release
//! - `setattr.rs`: truncate, chmod/chown/utimes
//! - `rename.rs`: unlink and rename
//! - `scratch.rs`: scratch files, on disk in the state dir
//! - `control.rs`: `.gc`, `.status`, xattrs, statfs
//! - `invalidate.rs`: kernel cache invalidation, driven by the backend's change events
//! - `versions.rs`: one inode a record version, so reads can use the page cache
//! - `inodes.rs`, `errors_log.rs`: the inode table, `.errors`

mod control;
pub mod errors_log;
pub mod fuse;
pub mod inodes;
pub mod invalidate;
mod lookup;
mod open;
mod readdir;
mod rename;
mod scratch;
mod setattr;
mod versions;
mod write;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde_json::json;

use self::errors_log::ErrorLog;
use self::inodes::{Inodes, Node};
use self::invalidate::{Inval, Invalidator};
use self::versions::{DropAttrs, RecordOpen};
pub use self::write::Commit;
use crate::backend::{AttachmentStore, Backend, Kind, RecordView};
use crate::error::StoreError;
use crate::journal::Journal;
use crate::store::attachments::{self, Ingest, to_hex};
use crate::store::blob_index::{Blob, BlobId, Listing, parse_id};
use crate::store::gc::GcOptions;

/// An errno for the kernel, with the reason when it is a refusal worth reporting.
#[derive(Debug)]
pub struct FsError {
    pub errno: i32,
    pub reason: Option<String>,
}

impl FsError {
    pub fn new(errno: i32) -> Self {
        FsError {
            errno,
            reason: None,
        }
    }

    pub fn refuse(errno: i32, reason: impl Into<String>) -> Self {
        FsError {
            errno,
            reason: Some(reason.into()),
        }
    }
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        let errno = e.errno();
        FsError {
            errno,
            reason: (errno != libc::ENOENT).then(|| e.to_string()),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
}

#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Links: 0 for a file still open after its name went.
    pub nlink: u32,
    pub perm: u16,
    pub ttl: Duration,
    /// The I/O size tools should use (`st_blksize`): `cp` reads and writes in pieces of it.
    pub blksize: u32,
    /// The owner shown (the store's, or `--uid/--gid`).
    pub uid: u32,
    pub gid: u32,
    /// The inode number `stat` shows, when it is not `ino` (a record's versions: see
    /// versions.rs); 0 otherwise.
    pub st_ino: u64,
}

/// `st_blksize` of attachment files: `cp` then copies in 1 MiB writes (the FUSE maximum
/// negotiated at init) instead of 128 KiB ones, an eighth of the round trips.
pub const ATTACHMENT_BLKSIZE: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub uid: u32,
    pub gid: u32,
    pub read_only: bool,
    /// Entry/attr TTL for records and directories: the safety net behind inotify invalidation.
    pub ttl: Duration,
    /// TTL for immutable attachment bytes and sidecars.
    pub blob_ttl: Duration,
    /// Whether extended attributes are offered (`--no-xattr` turns them off).
    pub xattrs: bool,
    /// `--uid`/`--gid` were given: files show them instead of the store's owner.
    pub owner_given: bool,
    /// The largest scratch file (`--max-scratch-bytes`): a write or truncate past it is
    /// EFBIG.
    pub max_scratch_bytes: u64,
}

/// `--max-scratch-bytes` unless told: 1 GiB.
pub const DEFAULT_MAX_SCRATCH_BYTES: u64 = 1 << 30;

impl Default for MountOptions {
    fn default() -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        MountOptions {
            uid,
            gid,
            read_only: false,
            ttl: Duration::from_secs(1),
            blob_ttl: Duration::from_secs(3600),
            xattrs: true,
            owner_given: false,
            max_scratch_bytes: DEFAULT_MAX_SCRATCH_BYTES,
        }
    }
}

/// What the kernel should do with an opened file.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenMode {
    pub direct_io: bool,
    pub keep_cache: bool,
    /// Read-only opens: a close has nothing to commit, so the kernel need not send flush.
    pub noflush: bool,
    /// Immutable bytes in a store file: the kernel may read the backing file itself.
    pub passthrough: bool,
}

enum Handle {
    /// A record: `data` is the snapshot taken at open, or the bytes being written.
    /// `written`: bytes arrived since open. A buffer that was only truncated (O_TRUNC) is
    /// not committed by an early close of a duplicate descriptor (the shell's
    /// `open; dup2; close` for `>`), only by release. `refused`: the errno of a refused
    /// write: every later flush/fsync/close reports it and nothing is committed.
    Record {
        ino: u64,
        data: Vec<u8>,
        dirty: bool,
        written: bool,
        refused: Option<i32>,
        /// The lock owner (file table) of the process whose writes filled `data`.
        writer: Option<u64>,
        /// Opened for writing (counts as a writer of its inode until released).
        for_write: bool,
        /// Reads from the kernel's page cache.
        cached: bool,
        /// A direct-I/O reader's version generation (versions.rs).
        generation: u64,
    },
    Scratch {
        ino: u64,
        file: ScratchFile,
    },
    Blob {
        file: File,
    },
    /// Fixed bytes (a sidecar, a control file's rendering) and the mtime they carry.
    Bytes {
        data: Arc<[u8]>,
        mtime: SystemTime,
    },
    /// An attachment being written. `wrote`: bytes arrived (or a truncate) through this
    /// descriptor since it was opened: only then is its close a commit. The shell's `>`
    /// opens, dup2s and closes the original before anything is written; that close must
    /// not store an empty blob under the name. A descriptor that wrote nothing commits at
    /// release (`touch`, `: >` make an empty attachment there), when no other descriptor
    /// open for writing shares the ingest.
    Ingest {
        state: Arc<Mutex<IngestState>>,
        for_write: bool,
        wrote: bool,
    },
    /// A sidecar being written back (accepted at close only with its exact bytes).
    SidecarPut {
        hex: String,
        data: Vec<u8>,
    },
    Gc,
    /// `.changes`: reads at any offset see the feed as it is now (so `tail -f` follows).
    Changes,
    Dir {
        list: Arc<DirList>,
    },
}

/// What an open directory lists.
enum DirList {
    Entries(Vec<DirEntry>),
    Attachments(AttachDir),
}

/// `attachments/` as it was at opendir: `head` (`.`, `..`), then each blob and its
/// sidecar in id order, then the labels, then `tail` (files being written).
struct AttachDir {
    head: Vec<DirEntry>,
    listing: Arc<Listing>,
    /// The position of each shard's first entry (and, last, of the first label).
    starts: Vec<usize>,
    tail: Vec<DirEntry>,
}

/// The time a label shows: when its blob's sidecar (which holds the label) last changed.
fn label_time(listing: &Listing, id: &BlobId) -> SystemTime {
    listing
        .get(id)
        .and_then(|b| b.sidecar.as_ref())
        .map(|s| s.mtime)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A scratch file: its bytes, mode and times are a file's in the state dir
/// (`scratch.rs`). Its descriptors share the one open file, so one that stays open after
/// the name is unlinked or replaced keeps reading and writing the same bytes (nlink 0),
/// as on any POSIX filesystem.
struct Scratch {
    kind: Kind,
    /// Its name, in the mount and in `<state_dir>/scratch/<collection>/`.
    name: String,
    /// Opened the first time a descriptor or an attribute needs it; kept while it lives.
    file: Option<Arc<File>>,
    nlink: u32,
}

type ScratchFile = Arc<Mutex<Scratch>>;

struct IngestState {
    name: String,
    ingest: Option<Ingest>,
    mtime: SystemTime,
    unlinked: bool,
    /// Set once the bytes are in the store: the blob they became.
    done: Option<String>,
    /// A put by address (`attachments/<hex>` written): the bytes must hash to this.
    expect: Option<String>,
    /// Bytes were written or the file truncated since open (an open for writing of an
    /// existing blob that did neither changes nothing).
    touched: bool,
    /// A write after the bytes were stored started a new ingest from them: the blob that
    /// holds the name now, whose label moves to the new bytes at the next commit.
    relabel_from: Option<String>,
}

/// One name in a directory listing, with its attributes when known.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
    pub attr: Option<Attr>,
}

/// Who made a request: the process and user the kernel names for it. Passed down with
/// each operation that can change the store, so a journal line's pid and uid come from the
/// request itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// The journal's name for a change this caller made through the mount.
    pub fn source(self) -> crate::journal::Source {
        crate::journal::Source::Mount {
            pid: self.pid,
            uid: self.uid,
        }
    }
}

/// What a setattr asks to change.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

#[derive(Default)]
pub struct FsStats {
    pub invalidations: AtomicU64,
    pub invalidation_errors: AtomicU64,
    pub overflows: AtomicU64,
    pub last_latency_us: AtomicU64,
    pub max_latency_us: AtomicU64,
    pub external_changes: AtomicU64,
}

pub struct Core {
    pub store: Arc<dyn Backend>,
    /// Record times, `.changes` and `.history` (None with --no-journal).
    pub journal: Option<Arc<Journal>>,
    /// Why there is no journal, when there is none (`.status`).
    pub journal_off: Mutex<String>,
    /// Where the daemon logs, or why it keeps no log file (`.status` `log`).
    pub log: Mutex<serde_json::Value>,
    pub opts: MountOptions,
    pub inodes: Inodes,
    pub errors: ErrorLog,
    pub inval: Invalidator,
    pub stats: FsStats,
    handles: Mutex<HashMap<u64, Arc<Mutex<Handle>>>>,
    next_fh: AtomicU64,
    scratch: Mutex<HashMap<u64, ScratchFile>>,
    /// Where scratch files keep their bytes.
    scratch_dir: scratch::ScratchDir,
    /// When a name in a directory last changed through the mount.
    dir_times: Mutex<HashMap<u64, SystemTime>>,
    /// Record inodes: the version each shows and what the kernel may hold of it (one inode
    /// a version: see versions.rs).
    versions: Mutex<versions::Table>,
    pending: Mutex<HashMap<(Kind, String), SystemTime>>,
    ingests: Mutex<HashMap<String, Arc<Mutex<IngestState>>>>,
    last_size: Mutex<HashMap<u64, u64>>,
    /// How attachment bytes reach readers, as `.status` shows it (set by the FUSE adapter).
    pub attachment_data_path: Mutex<String>,
    /// The last rendering of `.status` and when it was made (see `control_bytes`).
    status_rendering: Mutex<Option<(Instant, Arc<[u8]>)>>,
    /// The store's own modes and owner, as last read (see `shown_access`).
    access: Mutex<Option<(Instant, Option<crate::backend::Access>)>>,

    started: Instant,
    started_wall: SystemTime,
}

/// How a name in a record directory is treated.
enum Class {
    Record(String),
    Scratch,
    Invalid(String),
}

fn classify(store: &dyn Backend, kind: Kind, name: &str) -> Class {
    if name.starts_with('.') || !name.ends_with(".json") {
        return Class::Scratch;
    }
    let id = &name[..name.len() - 5];
    match store.check_id(kind, id) {
        Ok(()) => Class::Record(id.to_string()),
        Err(e) => Class::Invalid(format!("{name}: {e}")),
    }
}

fn dir_kind(ino: u64) -> Option<Kind> {
    match ino {
        2 => Some(Kind::Sessions),
        3 => Some(Kind::Goals),
        4 => Some(Kind::Conversations),
        9 => Some(Kind::Agents),
        10 => Some(Kind::Delegations),
        _ => None,
    }
}

pub const ATTACH_DIR: u64 = 5;

impl Core {
    pub fn new(
        store: Arc<dyn Backend>,
        opts: MountOptions,
        journal: Option<Arc<Journal>>,
    ) -> Arc<Core> {
        let scratch_dir =
            scratch::ScratchDir::open(&store.state_dir(), store.collections(), opts.read_only);
        let core = Arc::new(Core {
            store,
            opts,
            journal,
            journal_off: Mutex::new(String::new()),
            log: Mutex::new(serde_json::Value::Null),
            inodes: Inodes::default(),
            errors: ErrorLog::default(),
            inval: Invalidator::default(),
            stats: FsStats::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scratch: Mutex::new(HashMap::new()),
            scratch_dir,
            dir_times: Mutex::new(HashMap::new()),
            versions: Mutex::new(versions::Table::default()),
            pending: Mutex::new(HashMap::new()),
            ingests: Mutex::new(HashMap::new()),
            last_size: Mutex::new(HashMap::new()),
            attachment_data_path: Mutex::new("page cache (keep_cache)".into()),
            status_rendering: Mutex::new(None),
            access: Mutex::new(None),

            started: Instant::now(),
            started_wall: SystemTime::now(),
        });
        core.load_scratch();
        core
    }

    /// Records a refusal in `.errors` and the log (for errors that carry a reason).
    pub fn report(&self, path: &str, op: &str, e: &FsError) {
        if let Some(r) = &e.reason {
            self.errors.push(path, op, e.errno, r);
        }
    }

    pub fn path_of(&self, parent: u64, name: &str) -> String {
        match self.inodes.node(parent) {
            Some(Node::Root) | None => format!("/{name}"),
            Some(p) => format!("/{}/{name}", p.name()),
        }
    }

    pub fn path_of_ino(&self, ino: u64) -> String {
        match self.inodes.node(ino) {
            Some(n @ Node::Root) => n.name(),
            Some(n) => self.path_of(n.parent_ino(), &n.name()),
            None => format!("<inode {ino}>"),
        }
    }

    pub(super) fn writable(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Err(FsError::refuse(libc::EROFS, "the mount is read-only"));
        }
        Ok(())
    }

    pub(super) fn attr(
        &self,
        ino: u64,
        kind: FileKind,
        size: u64,
        (mtime, ctime): (SystemTime, SystemTime),
        perm: u16,
        ttl: Duration,
    ) -> Attr {
        if kind == FileKind::File {
            self.last_size.lock().insert(ino, size);
        }
        let (mask, uid, gid) = self.shown_access();
        Attr {
            ino,
            kind,
            size,
            atime: mtime,
            mtime,
            ctime,
            nlink: 1,
            // A symlink's mode means nothing on Linux (always 0777).
            perm: if kind == FileKind::Symlink {
                perm
            } else {
                perm & mask
            },
            ttl,
            blksize: 4096,
            st_ino: 0,
            uid,
            gid,
        }
    }

    /// The mask every mode is shown under and the owner files show: the store's own (a
    /// private store stays private under `--allow-other`), re-read at most once a second.
    pub(super) fn shown_access(&self) -> (u16, u32, u32) {
        let a = {
            let mut cur = self.access.lock();
            match &*cur {
                Some((at, a)) if at.elapsed() < Duration::from_secs(1) => *a,
                _ => {
                    let a = self.store.access();
                    *cur = Some((Instant::now(), a));
                    a
                }
            }
        };
        let mask = a.map_or(0o777, |a| a.mask);
        match a {
            Some(a) if !self.opts.owner_given => (mask, a.uid, a.gid),
            _ => (mask, self.opts.uid, self.opts.gid),
        }
    }

    /// The attachment store, or ENOENT for a backend without one.
    pub(super) fn attach(&self) -> FsResult<&dyn AttachmentStore> {
        self.store
            .attachments()
            .ok_or_else(|| FsError::new(libc::ENOENT))
    }

    /// The scratch file a name in a record directory has now.
    fn scratch_file(&self, ino: u64) -> Option<ScratchFile> {
        self.scratch.lock().get(&ino).cloned()
    }

    /// A record's times: its own (when its content last changed) with the journal, else
    /// its store file's.
    pub(super) fn record_times(&self, kind: Kind, v: &RecordView) -> (SystemTime, SystemTime) {
        match &self.journal {
            Some(j) => j.times(kind, v),
            None => (v.mtime, v.ctime),
        }
    }

    /// Announces the current request's change to record `id` to the journal.
    pub(super) fn expect_change(&self, caller: Caller, kind: Kind, id: &str) {
        if let Some(j) = &self.journal {
            j.expect(kind, id, caller.source());
        }
    }

    /// One change of record `id` through the mount, told to the journal: announced before
    /// it runs (so the watcher's sighting of it is ours), then what it left, taken from the
    /// change's own result (`after`: the record as stored, `None` when it is gone) with no
    /// read-back from the store. A failed change reads back what is there.
    pub(super) fn change_record<T>(
        &self,
        caller: Caller,
        kind: Kind,
        id: &str,
        change: impl FnOnce() -> crate::error::Result<T>,
        after: impl FnOnce(&T) -> Option<&RecordView>,
    ) -> FsResult<T> {
        self.expect_change(caller, kind, id);
        let r = change();
        match (&self.journal, &r) {
            (Some(j), Ok(v)) => {
                j.observe(kind, id, after(v), true);
            }
            (Some(_), Err(_)) => self.changed(kind, id),
            (None, _) => {}
        }
        r.map_err(FsError::from)
    }

    /// After a change of ours (or a refused one): what record `id` is now, read back.
    pub(super) fn changed(&self, kind: Kind, id: &str) {
        if let Some(j) = &self.journal {
            match self.store.get(kind, id) {
                Ok(v) => {
                    j.observe(kind, id, v.as_ref(), true);
                }
                Err(_) => j.unexpect(kind, id),
            }
        }
    }

    /// An attachment event for the feed.
    pub(super) fn attachment_changed(
        &self,
        caller: Caller,
        hex: &str,
        op: &str,
        label: Option<&str>,
    ) {
        if let Some(j) = &self.journal {
            j.attachment(hex, op, label, caller.source());
        }
    }

    /// Whether the store serves `kind`'s directory.
    pub(super) fn serves(&self, kind: Kind) -> bool {
        self.store.collections().contains(&kind)
    }

    /// A name was made, removed or renamed in directory `ino` through the mount.
    fn dir_changed(&self, ino: u64) {
        self.dir_times.lock().insert(ino, SystemTime::now());
    }

    /// A directory's mtime and ctime: the newest change to its entries, whether made
    /// through the mount (names) or seen in the store (the collection behind it).
    pub(super) fn dir_attr(&self, ino: u64) -> Attr {
        let store = match dir_kind(ino) {
            Some(k) => self.store.collection_time(k),
            None => self.store.root_time(),
        };
        let local = self.dir_times.lock().get(&ino).copied();
        let t = local.map_or(store, |l| l.max(store));
        self.attr(ino, FileKind::Dir, 0, (t, t), 0o755, self.opts.ttl)
    }
}

/// What an upsert or re-key leaves: the record as stored (for `Core::change_record`).
fn stored(v: &RecordView) -> Option<&RecordView> {
    Some(v)
}

/// What a removal leaves: nothing.
fn gone<T>(_: &T) -> Option<&RecordView> {
    None
}

/// Names are at most 255 bytes, as statfs reports (FUSE itself would pass up to 1024).
fn check_name_len(name: &str) -> FsResult<()> {
    if name.len() > 255 {
        return Err(FsError::refuse(
            libc::ENAMETOOLONG,
            format!("a name of {} bytes is over the limit of 255", name.len()),
        ));
    }
    Ok(())
}

pub fn kind_dir_ino(kind: Kind) -> u64 {
    match kind {
        Kind::Sessions => 2,
        Kind::Goals => 3,
        Kind::Conversations => 4,
        Kind::Agents => 9,
        Kind::Delegations => 10,
    }
}
