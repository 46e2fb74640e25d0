//! The mounted tree: which names exist, what each operation does, open handles, scratch
//! files and in-progress ingests. `fuse.rs` only turns fuser callbacks into calls on `Core`.

pub mod errors_log;
pub mod fuse;
pub mod inodes;
pub mod invalidate;

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
use crate::backend::{AttachmentStore, Backend, ChangeSink, Kind, StoreEvent};
use crate::error::StoreError;
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
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub perm: u16,
    pub ttl: Duration,
    /// The I/O size tools should use (`st_blksize`): `cp` reads and writes in pieces of it.
    pub blksize: u32,
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
}

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
    /// `open; dup2; close` for `>`), only by release.
    Record {
        ino: u64,
        data: Vec<u8>,
        dirty: bool,
        written: bool,
    },
    Scratch {
        ino: u64,
    },
    Blob {
        file: File,
    },
    /// Fixed bytes (a sidecar, a control file's rendering) and the mtime they carry.
    Bytes {
        data: Arc<[u8]>,
        mtime: SystemTime,
    },
    Ingest {
        state: Arc<Mutex<IngestState>>,
    },
    Gc,
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

struct Scratch {
    kind: Kind,
    name: String,
    data: Vec<u8>,
    mode: u16,
    mtime: SystemTime,
    ctime: SystemTime,
}

struct IngestState {
    name: String,
    ino: u64,
    ingest: Option<Ingest>,
    mtime: SystemTime,
    unlinked: bool,
    /// Set once the bytes are in the store: the blob they became.
    done: Option<String>,
}

/// One name in a directory listing, with its attributes when known.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
    pub attr: Option<Attr>,
}

/// What a setattr asks to change.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
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
    pub opts: MountOptions,
    pub inodes: Inodes,
    pub errors: ErrorLog,
    pub inval: Invalidator,
    pub stats: FsStats,
    handles: Mutex<HashMap<u64, Arc<Mutex<Handle>>>>,
    next_fh: AtomicU64,
    scratch: Mutex<HashMap<u64, Scratch>>,
    pending: Mutex<HashMap<(Kind, String), SystemTime>>,
    ingests: Mutex<HashMap<String, Arc<Mutex<IngestState>>>>,
    last_size: Mutex<HashMap<u64, u64>>,
    /// How attachment bytes reach readers, as `.status` shows it (set by the FUSE adapter).
    pub attachment_data_path: Mutex<String>,

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
    pub fn new(store: Arc<dyn Backend>, opts: MountOptions) -> Arc<Core> {
        Arc::new(Core {
            store,
            opts,
            inodes: Inodes::default(),
            errors: ErrorLog::default(),
            inval: Invalidator::default(),
            stats: FsStats::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scratch: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            ingests: Mutex::new(HashMap::new()),
            last_size: Mutex::new(HashMap::new()),
            attachment_data_path: Mutex::new("page cache (keep_cache)".into()),

            started: Instant::now(),
            started_wall: SystemTime::now(),
        })
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

    fn writable(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Err(FsError::refuse(libc::EROFS, "the mount is read-only"));
        }
        Ok(())
    }

    fn attr(
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
        Attr {
            ino,
            kind,
            size,
            mtime,
            ctime,
            perm,
            ttl,
            blksize: 4096,
        }
    }

    /// The attachment store, or ENOENT for a backend without one.
    fn attach(&self) -> FsResult<&dyn AttachmentStore> {
        self.store
            .attachments()
            .ok_or_else(|| FsError::new(libc::ENOENT))
    }

    /// Whether the store serves `kind`'s directory.
    fn serves(&self, kind: Kind) -> bool {
        self.store.collections().contains(&kind)
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        let t = self.store.root_time();
        self.attr(ino, FileKind::Dir, 0, (t, t), 0o755, self.opts.ttl)
    }

    // ---- names ----

    /// Which node a name in a directory is, if it exists now (reload-checked).
    pub fn resolve(&self, parent: u64, name: &str) -> FsResult<Node> {
        check_name_len(name)?;
        let enoent = || FsError::new(libc::ENOENT);
        if parent == inodes::ROOT {
            if let Some(k) = self
                .store
                .collections()
                .iter()
                .find(|k| k.dir_name() == name)
            {
                return Ok(Node::Dir(*k));
            }
            let attachments = self.store.attachments().is_some();
            return Ok(match name {
                "attachments" if attachments => Node::AttachDir,
                ".gc" if attachments => Node::Gc,
                ".status" => Node::Status,
                ".errors" => Node::Errors,
                _ => return Err(enoent()),
            });
        }
        if let Some(kind) = dir_kind(parent).filter(|k| self.serves(*k)) {
            let sn = Node::Scratch(kind, name.to_string());
            if let Some(ino) = self.inodes.existing(&sn)
                && self.scratch.lock().contains_key(&ino)
            {
                return Ok(sn);
            }
            let Class::Record(id) = classify(&*self.store, kind, name) else {
                return Err(enoent());
            };
            if self.store.get(kind, &id)?.is_some()
                || self.pending.lock().contains_key(&(kind, id.clone()))
            {
                return Ok(Node::Record(kind, id));
            }
            return Err(enoent());
        }
        if parent == ATTACH_DIR {
            // The index is exact at every access (it drains the store's inotify queue), so
            // it answers for the blob and sidecar names without a stat.
            if let Some(id) = parse_id(name) {
                let listing = self.attach()?.listing()?;
                return listing.get(&id).map(|_| Node::Blob(id)).ok_or_else(enoent);
            }
            if let Some(id) = name.strip_suffix(".json").and_then(parse_id) {
                let listing = self.attach()?.listing()?;
                return listing
                    .get(&id)
                    .filter(|b| b.sidecar.is_some())
                    .map(|_| Node::Sidecar(id))
                    .ok_or_else(enoent);
            }
            if self.ingests.lock().contains_key(name) {
                return Ok(Node::Ingest(name.to_string()));
            }
            if self.attach()?.listing()?.label(name).is_some() {
                return Ok(Node::Label(name.to_string()));
            }
            return Err(enoent());
        }
        Err(FsError::new(libc::ENOTDIR))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let node = self.resolve(parent, name)?;
        let ino = self.inodes.ino(&node);
        self.attr_of(ino, &node, None)
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        self.attr_of(ino, &node, fh)
    }

    fn attr_of(&self, ino: u64, node: &Node, fh: Option<u64>) -> FsResult<Attr> {
        let mut a = self.attr_of_node(ino, node, fh)?;
        if matches!(node, Node::Blob(_) | Node::Ingest(_)) {
            a.blksize = ATTACHMENT_BLKSIZE;
        }
        Ok(a)
    }

    fn attr_of_node(&self, ino: u64, node: &Node, fh: Option<u64>) -> FsResult<Attr> {
        let ttl = self.opts.ttl;
        let file_perm = |p: u16| if self.opts.read_only { p & 0o555 } else { p };
        match node {
            Node::Root | Node::Dir(_) | Node::AttachDir => Ok(self.dir_attr(ino)),
            Node::Record(kind, id) => {
                // An open handle being written shows its own length, as a file would.
                if let Some(fh) = fh
                    && let Some(h) = self.handle(fh)
                    && let Handle::Record {
                        data, dirty: true, ..
                    } = &*h.lock()
                {
                    let now = SystemTime::now();
                    return Ok(self.attr(
                        ino,
                        FileKind::File,
                        data.len() as u64,
                        (now, now),
                        file_perm(0o644),
                        Duration::ZERO,
                    ));
                }
                match self.store.get(*kind, id)? {
                    Some(v) => Ok(self.attr(
                        ino,
                        FileKind::File,
                        v.bytes.len() as u64,
                        (v.mtime, v.ctime),
                        file_perm(0o644),
                        ttl,
                    )),
                    None => match self.pending.lock().get(&(*kind, id.clone())) {
                        Some(&t) => Ok(self.attr(
                            ino,
                            FileKind::File,
                            0,
                            (t, t),
                            file_perm(0o644),
                            Duration::ZERO,
                        )),
                        None => Err(FsError::new(libc::ENOENT)),
                    },
                }
            }
            Node::Scratch(..) => {
                let s = self.scratch.lock();
                let s = s.get(&ino).ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    s.data.len() as u64,
                    (s.mtime, s.ctime),
                    s.mode,
                    Duration::ZERO,
                ))
            }
            Node::Blob(id) => {
                let listing = self.attach()?.listing()?;
                let b = listing.get(id).ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    b.size,
                    (b.mtime, b.ctime),
                    0o444,
                    self.opts.blob_ttl,
                ))
            }
            Node::Sidecar(id) => {
                let listing = self.attach()?.listing()?;
                let sc = listing
                    .get(id)
                    .and_then(|b| b.sidecar.as_ref())
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    sc.size,
                    (sc.mtime, sc.ctime),
                    0o444,
                    ttl,
                ))
            }
            Node::Label(label) => {
                let listing = self.attach()?.listing()?;
                let id = listing
                    .label(label)
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let t = label_time(&listing, id);
                Ok(self.attr(ino, FileKind::Symlink, 64, (t, t), 0o777, ttl))
            }
            Node::Ingest(name) => {
                let st = self.ingests.lock().get(name).cloned();
                match st {
                    Some(st) => {
                        let st = st.lock();
                        let len = st.ingest.as_ref().map(Ingest::len).unwrap_or(0);
                        Ok(self.attr(
                            ino,
                            FileKind::File,
                            len,
                            (st.mtime, st.mtime),
                            file_perm(0o644),
                            Duration::ZERO,
                        ))
                    }
                    None => self.finished_ingest_attr(ino, fh),
                }
            }
            Node::Gc | Node::Status | Node::Errors => {
                // fstat of an open control file describes exactly the bytes it reads.
                if let Some(fh) = fh
                    && let Some(h) = self.handle(fh)
                    && let Handle::Bytes { data, mtime } = &*h.lock()
                {
                    let size = if *node == Node::Status {
                        0
                    } else {
                        data.len() as u64
                    };
                    return Ok(self.attr(
                        ino,
                        FileKind::File,
                        size,
                        (*mtime, *mtime),
                        0o444,
                        Duration::ZERO,
                    ));
                }
                let (data, mtime) = self.control_bytes(node);
                // .status is generated at open from live counters: like a /proc file it
                // shows size 0 (read to EOF), so stat and read never disagree.
                let size = if *node == Node::Status {
                    0
                } else {
                    data.len() as u64
                };
                let perm = if *node == Node::Gc {
                    file_perm(0o644)
                } else {
                    0o444
                };
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    size,
                    (mtime, mtime),
                    perm,
                    Duration::ZERO,
                ))
            }
        }
    }

    /// The current bytes of a control file and the mtime it shows.
    fn control_bytes(&self, node: &Node) -> (Arc<[u8]>, SystemTime) {
        match node {
            Node::Gc => {
                let t = self
                    .store
                    .attachments()
                    .and_then(|a| a.last_gc())
                    .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.finished).ok())
                    .map(SystemTime::from)
                    .unwrap_or(self.started_wall);
                (self.gc_report().into(), t)
            }
            Node::Errors => (self.errors.render().into(), self.errors.changed()),
            _ => (self.render_status().into(), self.started_wall),
        }
    }

    /// fstat of a descriptor whose ingest finished: the blob it became, still a regular file.
    fn finished_ingest_attr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let h = fh
            .and_then(|f| self.handle(f))
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let Handle::Ingest { state } = &*h.lock() else {
            return Err(FsError::new(libc::ENOENT));
        };
        let st = state.lock();
        let hex = st.done.clone().ok_or_else(|| FsError::new(libc::ENOENT))?;
        let (size, mtime, ctime) = self
            .attach()?
            .blob_meta(&hex)?
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        Ok(self.attr(
            ino,
            FileKind::File,
            size,
            (mtime, ctime),
            0o444,
            Duration::ZERO,
        ))
    }

    /// A directory's entries, each with its attributes where the listing already knows
    /// them (so readdirplus answers `ls -l` without a lookup per name).
    fn dir_list(&self, ino: u64) -> FsResult<DirList> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let dir = self.dir_attr(ino);
        let mut out = vec![
            DirEntry {
                ino,
                kind: FileKind::Dir,
                name: ".".into(),
                attr: Some(dir.clone()),
            },
            DirEntry {
                ino: inodes::ROOT,
                kind: FileKind::Dir,
                name: "..".into(),
                attr: Some(self.dir_attr(inodes::ROOT)),
            },
        ];
        let head = out.clone();
        let ttl = self.opts.ttl;
        let file_perm = if self.opts.read_only { 0o444 } else { 0o644 };
        // `attr`: attributes known from the listing; None = ask attr_of.
        let mut add =
            |n: Node, k: FileKind, attr: Option<(u64, SystemTime, SystemTime, u16, Duration)>| {
                let i = self.inodes.ino(&n);
                let attr = match attr {
                    Some((size, m, c, perm, ttl)) => Some(self.attr(i, k, size, (m, c), perm, ttl)),
                    None => self.attr_of(i, &n, None).ok(),
                };
                out.push(DirEntry {
                    ino: i,
                    kind: k,
                    name: n.name(),
                    attr,
                });
            };
        match node {
            Node::Root => {
                let attachments = self.store.attachments().is_some();
                let dirs = self.store.collections().iter().map(|k| Node::Dir(*k));
                for n in dirs.chain(attachments.then_some(Node::AttachDir)) {
                    add(
                        n,
                        FileKind::Dir,
                        Some((0, dir.mtime, dir.ctime, 0o755, ttl)),
                    );
                }
                let control = attachments.then_some(Node::Gc).into_iter();
                for n in control.chain([Node::Status, Node::Errors]) {
                    add(n, FileKind::File, None);
                }
            }
            Node::Dir(kind) => {
                let list = self.store.list(kind)?;
                let mut seen = std::collections::HashSet::new();
                for r in list.records {
                    seen.insert(r.id.clone());
                    let a = (r.bytes.len() as u64, r.mtime, r.ctime, file_perm, ttl);
                    add(Node::Record(kind, r.id), FileKind::File, Some(a));
                }
                let pending: Vec<String> = self
                    .pending
                    .lock()
                    .keys()
                    .filter(|(k, id)| *k == kind && !seen.contains(id))
                    .map(|(_, id)| id.clone())
                    .collect();
                for id in pending {
                    add(Node::Record(kind, id), FileKind::File, None);
                }
                let scratch: Vec<String> = self
                    .scratch
                    .lock()
                    .values()
                    .filter(|s| s.kind == kind)
                    .map(|s| s.name.clone())
                    .collect();
                for name in scratch {
                    add(Node::Scratch(kind, name), FileKind::File, None);
                }
            }
            Node::AttachDir => {
                // Blobs, sidecars and labels are paged from a snapshot of the index as the
                // kernel asks for them: 300,000 names are never built at once.
                let listing = self.attach()?.listing()?;
                let mut starts = Vec::with_capacity(257);
                let mut n = head.len();
                for b in 0..=255u8 {
                    starts.push(n);
                    n += listing
                        .shard(b)
                        .iter()
                        .map(|x| 1 + usize::from(x.sidecar.is_some()))
                        .sum::<usize>();
                }
                starts.push(n);
                let names: Vec<String> = self.ingests.lock().keys().cloned().collect();
                let tail = names
                    .into_iter()
                    .map(|n| {
                        let node = Node::Ingest(n);
                        let i = self.inodes.ino(&node);
                        DirEntry {
                            ino: i,
                            kind: FileKind::File,
                            name: node.name(),
                            attr: self.attr_of(i, &node, None).ok(),
                        }
                    })
                    .collect();
                return Ok(DirList::Attachments(AttachDir {
                    head,
                    listing,
                    starts,
                    tail,
                }));
            }
            _ => return Err(FsError::new(libc::ENOTDIR)),
        }
        Ok(DirList::Entries(out))
    }

    /// One entry of `attachments/` made from the index.
    fn blob_entry(&self, b: &Blob, sidecar: bool) -> DirEntry {
        let (node, attr) = match (&b.sidecar, sidecar) {
            (Some(sc), true) => (
                Node::Sidecar(b.id),
                (sc.size, sc.mtime, sc.ctime, self.opts.ttl),
            ),
            _ => (
                Node::Blob(b.id),
                (b.size, b.mtime, b.ctime, self.opts.blob_ttl),
            ),
        };
        let ino = self.inodes.ino(&node);
        let (size, m, c, ttl) = attr;
        let mut a = self.attr(ino, FileKind::File, size, (m, c), 0o444, ttl);
        if !sidecar {
            a.blksize = ATTACHMENT_BLKSIZE;
        }
        DirEntry {
            ino,
            kind: FileKind::File,
            name: node.name(),
            attr: Some(a),
        }
    }

    /// Entries of an open directory from position `offset` on, each with the offset of the
    /// one after it, until `add` says the kernel's buffer is full.
    pub fn dir_page(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> FsResult<()> {
        let h = self.handle(fh).ok_or_else(|| FsError::new(libc::EBADF))?;
        let list = match &*h.lock() {
            Handle::Dir { list } => list.clone(),
            _ => return Err(FsError::new(libc::EBADF)),
        };
        let mut pos = usize::try_from(offset).unwrap_or(usize::MAX);
        let d = match &*list {
            DirList::Entries(entries) => {
                for (i, e) in entries.iter().enumerate().skip(pos) {
                    if add(e, i as u64 + 1) {
                        break;
                    }
                }
                return Ok(());
            }
            DirList::Attachments(d) => d,
        };
        while pos < d.head.len() {
            if add(&d.head[pos], pos as u64 + 1) {
                return Ok(());
            }
            pos += 1;
        }
        let labels_start = d.starts[256];
        if pos < labels_start {
            let first = d.starts.partition_point(|&x| x <= pos) - 1;
            let mut k = d.starts[first];
            for shard in first..256 {
                for b in d.listing.shard(shard as u8) {
                    for (sub, is_sidecar) in [(0, false), (1, true)] {
                        if is_sidecar && b.sidecar.is_none() {
                            continue;
                        }
                        if k + sub >= pos
                            && add(&self.blob_entry(b, is_sidecar), (k + sub) as u64 + 1)
                        {
                            return Ok(());
                        }
                    }
                    k += 1 + usize::from(b.sidecar.is_some());
                }
            }
            pos = labels_start;
        }
        let labels = d.listing.labels();
        while pos - labels_start < labels.len() {
            let (label, id) = &labels[pos - labels_start];
            let node = Node::Label(label.to_string());
            let ino = self.inodes.ino(&node);
            let t = label_time(&d.listing, id);
            let e = DirEntry {
                ino,
                kind: FileKind::Symlink,
                name: node.name(),
                attr: Some(self.attr(ino, FileKind::Symlink, 64, (t, t), 0o777, self.opts.ttl)),
            };
            if add(&e, pos as u64 + 1) {
                return Ok(());
            }
            pos += 1;
        }
        let tail_start = labels_start + labels.len();
        for (i, e) in d.tail.iter().enumerate().skip(pos - tail_start) {
            if add(e, (tail_start + i) as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.inodes.node(ino) {
            Some(n @ Node::Label(_)) => Ok(self
                .blob_of(&n)?
                .map(|id| to_hex(&id))
                .unwrap_or_default()
                .into_bytes()),
            Some(_) => Err(FsError::new(libc::EINVAL)),
            None => Err(FsError::new(libc::ENOENT)),
        }
    }

    /// The blob a node shows the bytes of: a blob itself, or the one a label names now.
    fn blob_of(&self, node: &Node) -> FsResult<Option<BlobId>> {
        match node {
            Node::Blob(id) => Ok(Some(*id)),
            Node::Label(label) => {
                let listing = self.attach()?.listing()?;
                let id = listing
                    .label(label)
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(Some(*id))
            }
            _ => Ok(None),
        }
    }

    // ---- handles ----

    fn handle(&self, fh: u64) -> Option<Arc<Mutex<Handle>>> {
        self.handles.lock().get(&fh).cloned()
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(Mutex::new(h)));
        fh
    }

    /// Runs `f` on the store file behind an open attachment (for kernel passthrough).
    pub fn with_blob_file<R>(&self, fh: u64, f: impl FnOnce(&File) -> R) -> Option<R> {
        let h = self.handle(fh)?;
        match &*h.lock() {
            Handle::Blob { file } => Some(f(file)),
            _ => None,
        }
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let list = Arc::new(self.dir_list(ino)?);
        Ok(self.add_handle(Handle::Dir { list }))
    }

    /// Opens a file. `write` and `trunc` come from the open flags.
    pub fn open(&self, ino: u64, write: bool, trunc: bool) -> FsResult<(u64, OpenMode)> {
        let (fh, mut mode) = self.open_inner(ino, write, trunc)?;
        mode.noflush = !write;
        Ok((fh, mode))
    }

    fn open_inner(&self, ino: u64, write: bool, trunc: bool) -> FsResult<(u64, OpenMode)> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let path = self.path_of_ino(ino);
        if write && let Err(e) = self.writable() {
            self.report(&path, "open", &e);
            return Err(e);
        }
        let direct = OpenMode {
            direct_io: true,
            keep_cache: false,
            ..Default::default()
        };
        let refuse_write = |what: &str| -> FsResult<()> {
            if write {
                let e = FsError::refuse(libc::EPERM, format!("{what} cannot be written"));
                self.report(&path, "open", &e);
                return Err(e);
            }
            Ok(())
        };
        match node {
            Node::Record(kind, id) => {
                let data = if trunc {
                    Vec::new()
                } else {
                    match self.store.get(kind, &id)? {
                        Some(v) => v.bytes.to_vec(),
                        None if self.pending.lock().contains_key(&(kind, id.clone())) => Vec::new(),
                        None => return Err(FsError::new(libc::ENOENT)),
                    }
                };
                // A size the kernel cached before this version would cut reads short or pad
                // them: drop its attributes before the open returns (safe here: the kernel
                // holds no lock an inode invalidation needs).
                if !trunc
                    && self
                        .last_size
                        .lock()
                        .get(&ino)
                        .is_some_and(|&s| s != data.len() as u64)
                {
                    self.inval.now(Inval::Inode(ino));
                    self.last_size.lock().insert(ino, data.len() as u64);
                }
                Ok((
                    self.add_handle(Handle::Record {
                        ino,
                        data,
                        dirty: trunc,
                        written: false,
                    }),
                    direct,
                ))
            }
            Node::Scratch(..) => {
                if trunc && let Some(s) = self.scratch.lock().get_mut(&ino) {
                    s.data.clear();
                    s.mtime = SystemTime::now();
                }
                Ok((self.add_handle(Handle::Scratch { ino }), direct))
            }
            Node::Blob(_) | Node::Label(_) => {
                refuse_write("attachment bytes")?;
                let id = self
                    .blob_of(&node)?
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let file = self.attach()?.open_blob(&to_hex(&id))?;
                Ok((
                    self.add_handle(Handle::Blob { file }),
                    OpenMode {
                        direct_io: false,
                        keep_cache: true,
                        passthrough: true,
                        ..Default::default()
                    },
                ))
            }
            Node::Sidecar(id) => {
                refuse_write("attachment metadata")?;
                let (data, mtime) = self.attach()?.sidecar_bytes(&to_hex(&id))?;
                let data: Arc<[u8]> = data.into();
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Ingest(name) => {
                let st = self
                    .ingests
                    .lock()
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                if trunc && let Some(i) = st.lock().ingest.as_mut() {
                    i.truncate(0)?;
                }
                Ok((self.add_handle(Handle::Ingest { state: st }), direct))
            }
            // Read-only opens of .gc see one report; writable ones run collections.
            Node::Gc if !write => {
                let (data, mtime) = self.control_bytes(&node);
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Gc => Ok((self.add_handle(Handle::Gc), direct)),
            Node::Status | Node::Errors => {
                refuse_write(&node.name())?;
                let (data, mtime) = self.control_bytes(&node);
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Root | Node::Dir(_) | Node::AttachDir => Err(FsError::new(libc::EISDIR)),
        }
    }

    /// Creates and opens a new file in a directory.
    pub fn create(&self, parent: u64, name: &str, mode: u32) -> FsResult<(Attr, u64, OpenMode)> {
        let path = self.path_of(parent, name);
        let r = self.create_inner(parent, name, mode);
        if let Err(e) = &r {
            self.report(&path, "create", e);
        }
        r
    }

    fn create_inner(&self, parent: u64, name: &str, mode: u32) -> FsResult<(Attr, u64, OpenMode)> {
        check_name_len(name)?;
        self.writable()?;
        if !crate::store::collection::safe_name(name) {
            return Err(FsError::refuse(
                libc::EINVAL,
                format!("{name:?} is not a usable file name"),
            ));
        }
        let direct = OpenMode {
            direct_io: true,
            keep_cache: false,
            ..Default::default()
        };
        let now = SystemTime::now();
        if let Some(kind) = dir_kind(parent).filter(|k| self.serves(*k)) {
            match classify(&*self.store, kind, name) {
                Class::Invalid(reason) => Err(FsError::refuse(libc::EINVAL, reason)),
                Class::Scratch => {
                    let node = Node::Scratch(kind, name.to_string());
                    let ino = self.inodes.ino(&node);
                    self.scratch.lock().insert(
                        ino,
                        Scratch {
                            kind,
                            name: name.to_string(),
                            data: Vec::new(),
                            mode: (mode & 0o7777) as u16,
                            mtime: now,
                            ctime: now,
                        },
                    );
                    let attr = self.attr_of(ino, &node, None)?;
                    Ok((attr, self.add_handle(Handle::Scratch { ino }), direct))
                }
                Class::Record(id) => {
                    if let Some(e) = self.store.collection_error(kind) {
                        return Err(FsError::refuse(
                            libc::EIO,
                            format!(
                                "{}: store file does not parse ({e}); writes refused until it is fixed",
                                kind.dir_name()
                            ),
                        ));
                    }
                    self.pending.lock().insert((kind, id.clone()), now);
                    let node = Node::Record(kind, id);
                    let ino = self.inodes.ino(&node);
                    let exists = self.attr_of(ino, &node, None)?;
                    let fh = self.add_handle(Handle::Record {
                        ino,
                        data: Vec::new(),
                        dirty: true,
                        written: false,
                    });
                    Ok((exists, fh, direct))
                }
            }
        } else if parent == ATTACH_DIR {
            if !attachments::valid_label(name) {
                return Err(FsError::refuse(
                    libc::EPERM,
                    format!(
                        "{name:?} names attachment bytes or metadata, which are made only by the store"
                    ),
                ));
            }
            let ingest = self.attach()?.begin_ingest()?;
            let node = Node::Ingest(name.to_string());
            let ino = self.inodes.ino(&node);
            let st = Arc::new(Mutex::new(IngestState {
                name: name.to_string(),
                ino,
                ingest: Some(ingest),
                mtime: now,
                unlinked: false,
                done: None,
            }));
            self.ingests.lock().insert(name.to_string(), st.clone());
            let attr = self.attr_of(ino, &node, None)?;
            Ok((attr, self.add_handle(Handle::Ingest { state: st }), direct))
        } else {
            Err(FsError::refuse(
                libc::EPERM,
                "only records, scratch files and attachments can be created",
            ))
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh).ok_or_else(|| FsError::new(libc::EBADF))?;
        let h = h.lock();
        let slice = |d: &[u8]| {
            let start = (offset as usize).min(d.len());
            let end = start.saturating_add(size as usize).min(d.len());
            d[start..end].to_vec()
        };
        match &*h {
            Handle::Record { data, .. } => Ok(slice(data)),
            Handle::Bytes { data, .. } => Ok(slice(data)),
            Handle::Scratch { ino } => Ok(self
                .scratch
                .lock()
                .get(ino)
                .map(|s| slice(&s.data))
                .unwrap_or_default()),
            Handle::Blob { file } => {
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    let n = file
                        .read_at(&mut buf[got..], offset + got as u64)
                        .map_err(|e| StoreError::io("read attachment", e))?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                buf.truncate(got);
                Ok(buf)
            }
            Handle::Ingest { state } => {
                let st = state.lock();
                match (&st.ingest, &st.done) {
                    (Some(i), _) => Ok(i.read_at(offset, size as usize)?),
                    (None, Some(hex)) => {
                        let f = self.attach()?.open_blob(hex)?;
                        let mut buf = vec![0u8; size as usize];
                        let n = f
                            .read_at(&mut buf, offset)
                            .map_err(|e| StoreError::io("read attachment", e))?;
                        buf.truncate(n);
                        Ok(buf)
                    }
                    _ => Ok(Vec::new()),
                }
            }
            Handle::Gc => Ok(slice(&self.gc_report())),
            Handle::Dir { .. } => Err(FsError::new(libc::EISDIR)),
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh).ok_or_else(|| FsError::new(libc::EBADF))?;
        let r = self.write_inner(&h, offset, data);
        if let Err(e) = &r {
            let ino = match &*h.lock() {
                Handle::Record { ino, .. } | Handle::Scratch { ino } => *ino,
                Handle::Gc => 6,
                _ => 0,
            };
            self.report(&self.path_of_ino(ino), "write", e);
        }
        r
    }

    fn write_inner(&self, h: &Arc<Mutex<Handle>>, offset: u64, data: &[u8]) -> FsResult<u32> {
        let mut h = h.lock();
        let put = |buf: &mut Vec<u8>| {
            let end = offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[offset as usize..end].copy_from_slice(data);
        };
        match &mut *h {
            Handle::Record {
                data: buf,
                dirty,
                written,
                ..
            } => {
                *written = true;
                let limit = self.store.max_record_bytes();
                if offset + data.len() as u64 > limit {
                    return Err(FsError::refuse(
                        libc::EFBIG,
                        format!("record over the size limit of {limit} bytes"),
                    ));
                }
                put(buf);
                *dirty = true;
            }
            Handle::Scratch { ino } => {
                let mut s = self.scratch.lock();
                let s = s.get_mut(ino).ok_or_else(|| FsError::new(libc::EBADF))?;
                put(&mut s.data);
                s.mtime = SystemTime::now();
            }
            Handle::Ingest { state } => {
                let mut st = state.lock();
                let Some(i) = st.ingest.as_mut() else {
                    return Err(FsError::refuse(
                        libc::EPERM,
                        "attachment already stored at its first close; its bytes cannot change",
                    ));
                };
                i.write_at(offset, data)?;
                st.mtime = SystemTime::now();
            }
            Handle::Gc => {
                drop(h);
                let text = String::from_utf8_lossy(data);
                let opts = GcOptions::parse_command(&text)?;
                self.attach()?.gc(&opts)?;
            }
            _ => return Err(FsError::refuse(libc::EPERM, "this file cannot be written")),
        }
        Ok(data.len() as u32)
    }

    /// close() and fsync(): a record's bytes are validated and upserted; an attachment's
    /// are stored. The errno of a refusal comes back from the call that caused it.
    pub fn flush(&self, fh: u64, op: &str) -> FsResult<()> {
        let Some(h) = self.handle(fh) else {
            return Ok(());
        };
        let mut guard = h.lock();
        match &mut *guard {
            Handle::Record { written: false, .. } if op == "close" => Ok(()),
            Handle::Record {
                ino, data, dirty, ..
            } if *dirty => {
                let ino = *ino;
                let path = self.path_of_ino(ino);
                let r = match self.inodes.node(ino) {
                    Some(Node::Record(kind, id)) => self
                        .store
                        .upsert(kind, &id, data)
                        .map_err(FsError::from)
                        .map(|v| {
                            self.pending.lock().remove(&(kind, id));
                            self.last_size.lock().insert(ino, v.bytes.len() as u64);
                        }),
                    Some(Node::Scratch(..)) => {
                        if let Some(s) = self.scratch.lock().get_mut(&ino) {
                            s.data = data.clone();
                        }
                        Ok(())
                    }
                    _ => Err(FsError::refuse(
                        libc::ENOENT,
                        "the file was removed while open",
                    )),
                };
                match r {
                    Ok(()) => {
                        *dirty = false;
                        drop(guard);
                        // The kernel extended its size as the bytes were written; the record
                        // as stored may differ (pretty-printed): refresh its attributes.
                        self.inval.send(Inval::Inode(ino));
                        Ok(())
                    }
                    Err(e) => {
                        // The caller got the errno; the refused bytes are dropped, not retried
                        // (and reported again) at release.
                        *dirty = false;
                        self.report(&path, op, &e);
                        Err(e)
                    }
                }
            }
            Handle::Ingest { state } => {
                let state = state.clone();
                drop(guard);
                let mut st = state.lock();
                let Some(ingest) = st.ingest.take() else {
                    return Ok(());
                };
                if st.unlinked {
                    return Ok(());
                }
                let name = st.name.clone();
                self.ingests.lock().remove(&name);
                match self.attach()?.finish_ingest(ingest, Some(&name)) {
                    Ok(hex) => {
                        st.done = Some(hex);
                        // The name is now a label symlink: the kernel must look it up again.
                        self.inval.send(Inval::Entry(ATTACH_DIR, name));
                        Ok(())
                    }
                    Err(e) => {
                        let e = FsError::from(e);
                        self.report(&format!("/attachments/{name}"), op, &e);
                        self.inodes.remove(&Node::Ingest(name.clone()));
                        self.inval.send(Inval::Entry(ATTACH_DIR, name));
                        Err(e)
                    }
                }
            }
            _ => Ok(()),
        }
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        let h = h.lock();
        match &*h {
            Handle::Record { ino, .. } => {
                // A record created here whose bytes never made it into the store goes away.
                if let Some(Node::Record(kind, id)) = self.inodes.node(*ino) {
                    let still_open = self.handles.lock().values().any(|o| {
                        o.try_lock().is_some_and(
                            |o| matches!(&*o, Handle::Record { ino: i, .. } if i == ino),
                        )
                    });
                    let pending = self.pending.lock().contains_key(&(kind, id.clone()));
                    if pending && !still_open && self.store.get(kind, &id).ok().flatten().is_none()
                    {
                        self.pending.lock().remove(&(kind, id.clone()));
                        self.inodes.remove(&Node::Record(kind, id.clone()));
                        self.inval
                            .send(Inval::Entry(kind_dir_ino(kind), format!("{id}.json")));
                    }
                }
            }
            Handle::Ingest { state } => {
                let st = state.lock();
                if st.ingest.is_none() {
                    self.inodes.remove(&Node::Ingest(st.name.clone()));
                } else if st.unlinked {
                    self.ingests.lock().remove(&st.name);
                    self.inodes.remove(&Node::Ingest(st.name.clone()));
                }
                let _ = st.ino;
            }
            _ => {}
        }
    }

    // ---- changes by name ----

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> FsResult<Attr> {
        let path = self.path_of_ino(ino);
        let r = self.setattr_inner(ino, fh, set);
        if let Err(e) = &r {
            self.report(&path, "setattr", e);
        }
        r
    }

    fn setattr_inner(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> FsResult<Attr> {
        let SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime,
        } = set;
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let cur = self.attr_of(ino, &node, fh)?;
        let changes_owner =
            uid.is_some_and(|u| u != self.opts.uid) || gid.is_some_and(|g| g != self.opts.gid);
        let changes_mode = mode.is_some_and(|m| (m & 0o7777) as u16 != cur.perm);
        let changes = changes_owner || changes_mode || size.is_some();
        if changes && self.opts.read_only {
            return Err(FsError::refuse(libc::EROFS, "the mount is read-only"));
        }
        if changes_owner {
            return Err(FsError::refuse(
                libc::EPERM,
                "the store keeps no owners: every file belongs to the mounting user",
            ));
        }
        if let Node::Scratch(..) = node {
            {
                let mut table = self.scratch.lock();
                let s = table
                    .get_mut(&ino)
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                if let Some(m) = mode {
                    s.mode = (m & 0o7777) as u16;
                }
                if let Some(n) = size {
                    s.data.resize(n as usize, 0);
                }
                if let Some(t) = mtime {
                    s.mtime = t;
                }
                s.ctime = SystemTime::now();
            }
            return self.attr_of(ino, &node, fh);
        }
        if changes_mode {
            return Err(FsError::refuse(
                libc::EPERM,
                format!(
                    "the store keeps no modes: {} stays {:o}",
                    node.name(),
                    cur.perm
                ),
            ));
        }
        if let Some(n) = size {
            match &node {
                Node::Record(kind, id) => {
                    let h = fh.and_then(|f| self.handle(f));
                    let in_handle = h.as_ref().is_some_and(|h| {
                        if let Handle::Record {
                            data,
                            dirty,
                            written,
                            ..
                        } = &mut *h.lock()
                        {
                            data.resize(n as usize, 0);
                            *dirty = true;
                            *written = true;
                            true
                        } else {
                            false
                        }
                    });
                    if !in_handle {
                        // truncate(2) by path: the record as it would be, validated now.
                        let mut bytes = self
                            .store
                            .get(*kind, id)?
                            .map(|v| v.bytes.to_vec())
                            .unwrap_or_default();
                        if bytes.len() as u64 == n {
                            return Ok(cur);
                        }
                        bytes.resize(n as usize, 0);
                        self.store.upsert(*kind, id, &bytes)?;
                        self.inval.send(Inval::Inode(ino));
                    }
                }
                Node::Ingest(name) => {
                    let st = self
                        .ingests
                        .lock()
                        .get(name)
                        .cloned()
                        .ok_or_else(|| FsError::new(libc::ENOENT))?;
                    let mut st = st.lock();
                    let i = st.ingest.as_mut().ok_or_else(|| {
                        FsError::refuse(libc::EPERM, "attachment bytes cannot change")
                    })?;
                    i.truncate(n)?;
                }
                Node::Gc => {}
                Node::Blob(_) | Node::Label(_) | Node::Sidecar(_) => {
                    return Err(FsError::refuse(
                        libc::EPERM,
                        "attachment bytes and metadata cannot change",
                    ));
                }
                Node::Status | Node::Errors => {
                    return Err(FsError::refuse(libc::EPERM, "this file cannot be written"));
                }
                _ => return Err(FsError::new(libc::EISDIR)),
            }
        }
        self.attr_of(ino, &node, fh)
    }

    pub fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let path = self.path_of(parent, name);
        let r = self.unlink_inner(parent, name);
        if let Err(e) = &r {
            self.report(&path, "unlink", e);
        }
        r
    }

    fn unlink_inner(&self, parent: u64, name: &str) -> FsResult<()> {
        let node = self.resolve(parent, name)?;
        self.writable()?;
        match &node {
            Node::Record(kind, id) => {
                let had_pending = self.pending.lock().remove(&(*kind, id.clone())).is_some();
                if self.store.get(*kind, id)?.is_some() {
                    self.store.remove(*kind, id)?;
                } else if !had_pending {
                    return Err(FsError::new(libc::ENOENT));
                }
            }
            Node::Scratch(..) => {
                if let Some(ino) = self.inodes.existing(&node) {
                    self.scratch.lock().remove(&ino);
                }
            }
            Node::Label(label) => self.attach()?.unlabel(label)?,
            Node::Ingest(n) => {
                if let Some(st) = self.ingests.lock().remove(n) {
                    st.lock().unlinked = true;
                }
            }
            Node::Blob(_) | Node::Sidecar(_) => {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "attachment bytes leave only through garbage collection (.gc); rm a label to drop a name",
                ));
            }
            Node::Gc | Node::Status | Node::Errors => {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "control files cannot be removed",
                ));
            }
            Node::Root | Node::Dir(_) | Node::AttachDir => return Err(FsError::new(libc::EISDIR)),
        }
        self.inodes.remove(&node);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<()> {
        let path = self.path_of(parent, name);
        let r = self.rename_inner(parent, name, newparent, newname, noreplace, exchange);
        if let Err(e) = &r {
            self.report(
                &format!("{path} -> {}", self.path_of(newparent, newname)),
                "rename",
                e,
            );
        }
        r
    }

    fn rename_inner(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<()> {
        check_name_len(newname)?;
        let node = self.resolve(parent, name)?;
        self.writable()?;
        if exchange {
            return Err(FsError::refuse(
                libc::EINVAL,
                "RENAME_EXCHANGE is not supported",
            ));
        }
        if parent != newparent {
            let movable = |p: u64| dir_kind(p).is_some_and(|k| self.serves(k)) || p == ATTACH_DIR;
            if movable(parent) && movable(newparent) {
                return Err(FsError::refuse(
                    libc::EXDEV,
                    "records and attachments cannot move between directories (each directory is its own collection)",
                ));
            }
            return Err(FsError::refuse(
                libc::EPERM,
                "the top-level names are fixed",
            ));
        }
        if !crate::store::collection::safe_name(newname) {
            return Err(FsError::refuse(
                libc::EINVAL,
                format!("{newname:?} is not a usable file name"),
            ));
        }
        let target = self.resolve(newparent, newname).ok();
        if noreplace && target.is_some() {
            return Err(FsError::new(libc::EEXIST));
        }
        if target.as_ref() == Some(&node) {
            return Ok(());
        }
        if let Some(kind) = dir_kind(parent).filter(|k| self.serves(*k)) {
            let class = classify(&*self.store, kind, newname);
            if let Class::Invalid(reason) = &class {
                return Err(FsError::refuse(libc::EINVAL, reason.clone()));
            }
            let new_node = match (&node, class) {
                (Node::Record(_, from), Class::Record(to)) => {
                    if self.pending.lock().contains_key(&(kind, from.clone()))
                        && self.store.get(kind, from)?.is_none()
                    {
                        return Err(FsError::refuse(
                            libc::EBUSY,
                            "the record is still being written: close it before renaming",
                        ));
                    }
                    self.store.rekey(kind, from, &to)?;
                    self.drop_scratch_target(&target);
                    Node::Record(kind, to)
                }
                (Node::Record(_, from), Class::Scratch) => {
                    let bytes = self
                        .store
                        .get(kind, from)?
                        .map(|v| v.bytes.to_vec())
                        .unwrap_or_default();
                    self.store.remove(kind, from)?;
                    self.drop_scratch_target(&target);
                    let ino = self.inodes.ino(&node);
                    let now = SystemTime::now();
                    self.scratch.lock().insert(
                        ino,
                        Scratch {
                            kind,
                            name: newname.to_string(),
                            data: bytes,
                            mode: 0o644,
                            mtime: now,
                            ctime: now,
                        },
                    );
                    Node::Scratch(kind, newname.to_string())
                }
                (Node::Scratch(..), Class::Record(to)) => {
                    let ino = self.inodes.ino(&node);
                    let data = self
                        .scratch
                        .lock()
                        .get(&ino)
                        .map(|s| s.data.clone())
                        .ok_or_else(|| FsError::new(libc::ENOENT))?;
                    self.store.upsert(kind, &to, &data)?;
                    self.scratch.lock().remove(&ino);
                    Node::Record(kind, to)
                }
                (Node::Scratch(..), Class::Scratch) => {
                    self.drop_scratch_target(&target);
                    let ino = self.inodes.ino(&node);
                    if let Some(s) = self.scratch.lock().get_mut(&ino) {
                        s.name = newname.to_string();
                        s.ctime = SystemTime::now();
                    }
                    Node::Scratch(kind, newname.to_string())
                }
                _ => return Err(FsError::new(libc::EINVAL)),
            };
            self.inodes.rename(&node, &new_node);
            if let Some(t) = target.filter(|t| *t != new_node) {
                self.inodes.remove(&t);
            }
            return Ok(());
        }
        if parent == ATTACH_DIR {
            if !attachments::valid_label(newname) {
                return Err(FsError::refuse(
                    libc::EPERM,
                    format!("{newname:?} names attachment bytes or metadata"),
                ));
            }
            match &node {
                Node::Label(old) => {
                    let hex = String::from_utf8_lossy(&self.readlink(self.inodes.ino(&node))?)
                        .into_owned();
                    self.attach()?.relabel(&hex, Some(old), newname)?;
                }
                Node::Ingest(old) => {
                    let mut map = self.ingests.lock();
                    let st = map.remove(old).ok_or_else(|| FsError::new(libc::ENOENT))?;
                    st.lock().name = newname.to_string();
                    map.insert(newname.to_string(), st);
                    let new_node = Node::Ingest(newname.to_string());
                    drop(map);
                    self.inodes.rename(&node, &new_node);
                    return Ok(());
                }
                _ => {
                    return Err(FsError::refuse(
                        libc::EPERM,
                        "attachment bytes and metadata keep their names",
                    ));
                }
            }
            let new_node = Node::Label(newname.to_string());
            self.inodes.rename(&node, &new_node);
            return Ok(());
        }
        Err(FsError::refuse(
            libc::EPERM,
            "the top-level names are fixed",
        ))
    }

    fn drop_scratch_target(&self, target: &Option<Node>) {
        if let Some(t @ Node::Scratch(..)) = target
            && let Some(ino) = self.inodes.existing(t)
        {
            self.scratch.lock().remove(&ino);
        }
    }

    // ---- xattrs ----

    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<(String, Vec<u8>)>> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let Some(id) = self.blob_of(&node)? else {
            return Ok(Vec::new());
        };
        let listing = self.attach()?.listing()?;
        let mut out = vec![("user.sha256".to_string(), to_hex(&id).into_bytes())];
        if let Some(s) = listing.get(&id).and_then(|b| b.sidecar.as_ref()) {
            out.push(("user.media_type".into(), s.media_type.as_bytes().to_vec()));
            if let Some(l) = &s.label {
                out.push(("user.label".into(), l.as_bytes().to_vec()));
            }
        }
        Ok(out)
    }

    // ---- control files ----

    fn gc_report(&self) -> Vec<u8> {
        let mut v = match self.store.attachments().and_then(|a| a.last_gc()) {
            Some(r) => serde_json::to_vec_pretty(&r).unwrap_or_default(),
            None => b"{\"last_run\": null, \"usage\": \"echo run > .gc | echo dry-run > .gc | echo grace=SECONDS > .gc\"}".to_vec(),
        };
        v.push(b'\n');
        v
    }

    pub fn render_status(&self) -> Vec<u8> {
        let fs = &self.stats;
        let attach = self.store.attachments();
        let (blobs, labels) = attach
            .and_then(|a| a.listing().ok())
            .map(|a| (a.len(), a.labels().len()))
            .unwrap_or((0, 0));
        let mut counts: serde_json::Map<String, serde_json::Value> = self
            .store
            .collections()
            .iter()
            .map(|k| (k.dir_name().to_string(), json!(self.store.count(*k))))
            .collect();
        if attach.is_some() {
            counts.insert("attachments".into(), json!(blobs));
            counts.insert("labels".into(), json!(labels));
        }
        counts.insert("scratch_files".into(), json!(self.scratch.lock().len()));
        counts.insert("open_handles".into(), json!(self.handles.lock().len()));
        counts.insert("inodes".into(), json!(self.inodes.len()));
        counts.insert("refusals".into(), json!(self.errors.count()));
        let mut v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "read_only": self.opts.read_only,
            "read_only_reason": self.store.read_only_reason(),
            "xattrs": self.opts.xattrs,
            "counts": counts,
            "invalidation": {
                "external_changes": fs.external_changes.load(Ordering::Relaxed),
                "sent": fs.invalidations.load(Ordering::Relaxed),
                "failed": fs.invalidation_errors.load(Ordering::Relaxed),
                "inotify_overflows": fs.overflows.load(Ordering::Relaxed),
                "last_latency_us": fs.last_latency_us.load(Ordering::Relaxed),
                "max_latency_us": fs.max_latency_us.load(Ordering::Relaxed),
                "ttl_ms": self.opts.ttl.as_millis() as u64,
            },
        });
        if let (Some(o), serde_json::Value::Object(b)) = (v.as_object_mut(), self.store.status()) {
            o.extend(b);
            let mut path = serde_json::Map::new();
            path.insert("records".into(), json!("direct_io"));
            if let Some(a) = attach {
                path.insert(
                    "attachments".into(),
                    json!(self.attachment_data_path.lock().clone()),
                );
                o.insert("attachment_index".into(), json!(a.index_mode()));
            }
            o.insert("data_path".into(), serde_json::Value::Object(path));
        }
        let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn statfs(&self) -> libc::statvfs {
        let mut dir = self.store.statfs_path();
        while !dir.exists() {
            if !dir.pop() {
                break;
            }
        }
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
            unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        }
        st
    }
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

/// The mount hears of other writers' changes from the backend's watcher and drops exactly
/// what the kernel caches of them.
impl ChangeSink for Core {
    fn store_changed(&self, events: Vec<StoreEvent>, since: Instant) {
        let mut out = Vec::new();
        for e in events {
            match e {
                StoreEvent::Record { kind, id, gone } => {
                    let node = Node::Record(kind, id);
                    if gone {
                        self.gone(node, &mut out);
                    } else if let Some(ino) = self.inodes.existing(&node) {
                        out.push(Inval::Inode(ino));
                    }
                }
                StoreEvent::Blob { id, gone: false } => {
                    if let Some(ino) = self.inodes.existing(&Node::Sidecar(id)) {
                        out.push(Inval::Inode(ino));
                    }
                }
                StoreEvent::Blob { id, gone: true } => {
                    // Blob names never move, so no rename of ours can race this: drop its
                    // table entries too.
                    self.gone(Node::Blob(id), &mut out);
                    self.gone(Node::Sidecar(id), &mut out);
                    self.inodes.remove(&Node::Blob(id));
                }
                StoreEvent::LabelGone(label) => self.gone(Node::Label(label), &mut out),
                StoreEvent::Everything => {
                    self.stats.overflows.fetch_add(1, Ordering::Relaxed);
                    for (ino, node) in self.inodes.all() {
                        out.push(Inval::Inode(ino));
                        if !matches!(node, Node::Root) {
                            out.push(Inval::Entry(node.parent_ino(), node.name()));
                        }
                    }
                }
            }
        }
        self.stats.external_changes.fetch_add(1, Ordering::Relaxed);
        for i in out {
            let ok = self.inval.now(i);
            self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.stats
                    .invalidation_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let us = since.elapsed().as_micros() as u64;
        self.stats.last_latency_us.store(us, Ordering::Relaxed);
        self.stats.max_latency_us.fetch_max(us, Ordering::Relaxed);
    }
}

impl Core {
    /// A name that no longer exists (or now means something else): drop the kernel's
    /// entry. The inode table is left alone: the mount's own rename/unlink may be moving
    /// this very name right now, and only the operation itself may change its mapping (a
    /// stale mapping is harmless: the store answers ENOENT for it).
    fn gone(&self, node: Node, out: &mut Vec<Inval>) {
        if let Some(ino) = self.inodes.existing(&node) {
            out.push(Inval::Inode(ino));
        }
        out.push(Inval::Entry(node.parent_ino(), node.name()));
    }
}
