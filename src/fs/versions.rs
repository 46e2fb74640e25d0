//! Records read from the kernel's page cache, one node id a version where readers need it.
//!
//! A read-only open of a record keeps the kernel's pages of it (FOPEN_KEEP_CACHE), so a
//! record read again costs the open's round trip and no reads. That is safe only while the
//! pages and the size the kernel has for the node id are one version's, and the rules below
//! keep it so:
//! - A node id shows one version at a time (`version`); its attributes are that version's.
//! - While no descriptor reads it from the page cache (`cached_handles == 0`), a node id
//!   takes a new version in place (at a lookup, a listing or an open), and its pages are
//!   dropped at the next open before any open uses the page cache again (`stale_pages`).
//! - While descriptors read it from the page cache, it keeps its version: a newer version
//!   gets a node id of its own, as a rename on a native filesystem gives a new inode. An
//!   open that reaches the old node id answers ESTALE and the kernel looks the name up
//!   again (`do_filp_open` retries with LOOKUP_REVAL); the retry's node id (`redirect`)
//!   never answers ESTALE: if it is outdated and held too by the time its open arrives, that
//!   one open reads the new bytes direct-I/O.
//! - A writer never shares a node id with page-cache readers (a write, O_TRUNC or truncate
//!   changes the kernel's size of it): it is sent to a node id of its own the same way,
//!   reserved for it. A node id open for writing (`written`) is read direct-I/O and shows
//!   the store's current attributes; after its last writer, it is a reader's again.
//! - Every version of a record shows the inode number the record's name first had
//!   (`st_ino`), as a file written in place keeps its inode: editors compare it.
//! - Entry invalidations go from the sender thread only (see invalidate.rs); the common
//!   changes need none.

use super::*;

/// A version of a record, as an inode shows it.
#[derive(Clone)]
pub(super) struct Version {
    pub bytes: Arc<[u8]>,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// What the kernel may hold of one record inode.
#[derive(Default)]
pub(super) struct RecIno {
    /// The version it shows (None: not given one yet).
    pub version: Option<Version>,
    /// Its pages in the kernel's cache may be another version's: dropped at the next open.
    stale_pages: bool,
    /// Opened for writing, or reserved for a writer sent here by ESTALE: never cached.
    written: bool,
    /// When it was reserved for a writer that has not opened it yet.
    reserved: Option<Instant>,
    /// Made (then) for the retry of an open answered ESTALE.
    redirect: Option<Instant>,
    /// Record descriptors open on it, how many of them write, and how many read from the
    /// page cache.
    handles: u32,
    writers: u32,
    cached_handles: u32,
    /// The kernel's lookup count (replies that handed the number out, less FORGETs).
    lookups: u64,
    /// The inode number `stat` shows: the name's first node id, kept by every version
    /// (0: this node id).
    st_ino: u64,
}

/// Node ids to what the kernel may hold of them. Keys are node ids, which the mount hands out
/// in sequence: a multiplicative hash spreads them at a fraction of SipHash's cost (a
/// listing of 10,000 records looks each up twice).
pub(super) type Table = HashMap<u64, RecIno, std::hash::BuildHasherDefault<NodeHasher>>;

#[derive(Default)]
pub(super) struct NodeHasher(u64);

impl std::hash::Hasher for NodeHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// How long an inode stays reserved for a writer redirected to it, and how long one made
/// for a retry never answers ESTALE (the kernel retries at once).
const RESERVED: Duration = Duration::from_secs(2);

impl RecIno {
    fn reserved_now(&self) -> bool {
        self.reserved.is_some_and(|t| t.elapsed() < RESERVED)
    }

    fn redirect_now(&self) -> bool {
        self.redirect.is_some_and(|t| t.elapsed() < RESERVED)
    }

    /// Takes version `v` in place (no page-cache reader has it open); whatever pages it has
    /// are another version's until dropped.
    fn take(&mut self, v: Version) {
        self.version = Some(v);
        self.stale_pages = true;
    }
}

/// How an open of a record inode is served.
pub(super) enum RecordOpen {
    /// From the page cache, which can only hold this inode's version.
    Cached,
    /// Direct I/O from the descriptor's snapshot, after doing `attrs` to the kernel's
    /// attributes of the inode.
    Direct { attrs: DropAttrs },
    /// The name now has another inode: the kernel must look it up again.
    Stale,
}

/// What an open does to the kernel's attributes of the inode before it returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DropAttrs {
    /// The inode was just given this version: whatever the kernel has is another's.
    Always,
    /// A writer's inode (its attributes follow the store): dropped if the size it last
    /// showed differs.
    IfSizeDiffers,
    /// Readers' pages hold another version: its attributes stay that version's.
    Never,
}

pub(super) fn same_bytes(a: &Arc<[u8]>, b: &Arc<[u8]>) -> bool {
    Arc::ptr_eq(a, b) || a[..] == b[..]
}

impl Core {
    /// Gives record name `node` a new node id, after `from` (the inode number `stat` shows
    /// stays the name's).
    fn move_name(&self, t: &mut Table, node: &Node, from: u64) -> u64 {
        let st_ino = match t.get(&from) {
            Some(e) if e.st_ino != 0 => e.st_ino,
            _ => from,
        };
        let new = self.inodes.reassign(node);
        t.entry(new).or_default().st_ino = st_ino;
        new
    }

    /// The inode number `stat` shows for node id `ino`, if not `ino` itself.
    pub(super) fn st_ino(&self, ino: u64) -> Option<u64> {
        self.versions
            .lock()
            .get(&ino)
            .map(|e| e.st_ino)
            .filter(|&i| i != 0 && i != ino)
    }

    fn version_of(&self, kind: Kind, view: &RecordView) -> Version {
        let (mtime, ctime) = self.record_times(kind, view);
        Version {
            bytes: view.bytes.clone(),
            mtime,
            ctime,
        }
    }

    /// The inode a lookup or listing gives record `id` at version `view`: the name's inode,
    /// taking this version in place unless page-cache readers have it open, else a new one.
    /// `counted`: the reply hands the number to the kernel (a lookup), which will FORGET it.
    pub(super) fn record_ino(&self, kind: Kind, id: &str, view: &RecordView, counted: bool) -> u64 {
        let node = Node::Record(kind, id.to_string());
        let mut t = self.versions.lock();
        let ino = self.inodes.ino(&node);
        let e = t.entry(ino).or_default();
        let keep = if e.written {
            // A writer's inode stays the name's while it writes or is expected to; after,
            // it is a reader's again.
            if e.writers == 0 && !e.reserved_now() {
                e.written = false;
                e.reserved = None;
                e.take(self.version_of(kind, view));
            }
            true
        } else {
            match &mut e.version {
                Some(p) if same_bytes(&p.bytes, &view.bytes) => {
                    // Equal bytes in another allocation: keep the store's, so the next
                    // comparison is a pointer's.
                    p.bytes = view.bytes.clone();
                    true
                }
                _ if e.cached_handles == 0 => {
                    e.take(self.version_of(kind, view));
                    true
                }
                _ => false,
            }
        };
        if keep {
            e.lookups += u64::from(counted);
            return ino;
        }
        // Open descriptors read this inode's version from the page cache: the new version
        // gets a node id of its own.
        let new = self.move_name(&mut t, &node, ino);
        let n = t.entry(new).or_default();
        n.version = Some(self.version_of(kind, view));
        n.lookups = u64::from(counted);
        new
    }

    /// Another process changed the record node id `ino` shows. Returns whether the node id
    /// can take the new version in place (it forgets its version: the next lookup, listing
    /// or open gives it the new one, and its pages go at that open); false while page-cache
    /// readers have it open, when the new version must get a node id of its own and the
    /// kernel must drop the name. (No version is made here: the record's times come from the
    /// journal, which records the change after the kernel has been told.)
    pub(super) fn record_changed(&self, ino: u64) -> bool {
        let mut t = self.versions.lock();
        let Some(e) = t.get_mut(&ino) else {
            return true;
        };
        if e.written {
            return true;
        }
        if e.cached_handles > 0 {
            return false;
        }
        e.version = None;
        e.stale_pages = true;
        true
    }

    /// A listing's entry was handed to the kernel (readdirplus): one more lookup.
    pub(super) fn handed_out(&self, ino: u64) {
        if let Some(e) = self.versions.lock().get_mut(&ino) {
            e.lookups += 1;
        }
    }

    /// The version inode `ino` shows, if it shows one (not a writer's), and the inode number
    /// `stat` shows for it.
    fn shown(&self, ino: u64) -> (Option<Version>, u64) {
        let t = self.versions.lock();
        match t.get(&ino) {
            Some(e) => (
                e.version.clone().filter(|_| !e.written),
                if e.st_ino != 0 { e.st_ino } else { ino },
            ),
            None => (None, ino),
        }
    }

    /// The attributes of record inode `ino` while the record's version is `now`: the
    /// inode's own version's, whatever the name shows now (the kernel's pages of it are that
    /// version's).
    pub(super) fn record_attr(&self, ino: u64, kind: Kind, now: &RecordView) -> Attr {
        let perm = if self.opts.read_only { 0o444 } else { 0o644 };
        let (pinned, st_ino) = self.shown(ino);
        let (size, times) = match pinned {
            Some(p) if !same_bytes(&p.bytes, &now.bytes) => (p.bytes.len(), (p.mtime, p.ctime)),
            Some(p) => (p.bytes.len(), (p.mtime, p.ctime)),
            None => (now.bytes.len(), self.record_times(kind, now)),
        };
        let mut a = self.attr(ino, FileKind::File, size as u64, times, perm, self.opts.ttl);
        a.st_ino = st_ino;
        a
    }

    /// The attributes a listing gives inode `ino` if it shows one version: the listing
    /// may be older than the version the inode shows now.
    pub(super) fn pinned_attr(&self, ino: u64) -> Option<Attr> {
        let (p, st_ino) = self.shown(ino);
        let p = p?;
        let perm = if self.opts.read_only { 0o444 } else { 0o644 };
        let mut a = self.attr(
            ino,
            FileKind::File,
            p.bytes.len() as u64,
            (p.mtime, p.ctime),
            perm,
            self.opts.ttl,
        );
        a.st_ino = st_ino;
        Some(a)
    }

    /// Opens record inode `ino` of record `id`, whose current version is `now` (None: a
    /// record created but not stored yet, or an O_TRUNC).
    pub(super) fn record_open(
        &self,
        ino: u64,
        kind: Kind,
        id: &str,
        now: Option<&RecordView>,
        write: bool,
    ) -> RecordOpen {
        let node = Node::Record(kind, id.to_string());
        let mut t = self.versions.lock();
        let e = t.entry(ino).or_default();
        if write {
            if e.cached_handles > 0 {
                // Readers have its pages open: the writer gets a node id of its own, which
                // no reader caches (the inode number stat shows stays the record's).
                let new = self.move_name(&mut t, &node, ino);
                let n = t.entry(new).or_default();
                n.written = true;
                n.redirect = Some(Instant::now());
                n.reserved = Some(Instant::now());
                return RecordOpen::Stale;
            }
            e.written = true;
            e.reserved = None;
            e.handles += 1;
            e.writers += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::IfSizeDiffers,
            };
        }
        let Some(now) = now.filter(|_| !e.written) else {
            e.handles += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::IfSizeDiffers,
            };
        };
        match &e.version {
            Some(p) if same_bytes(&p.bytes, &now.bytes) && !e.stale_pages => {
                e.cached_handles += 1;
                e.handles += 1;
                RecordOpen::Cached
            }
            // No page-cache reader has it open: it takes this version, its pages and
            // attributes dropped before the open returns (`pages_dropped` then lets the
            // next open use the page cache).
            _ if e.cached_handles == 0 => {
                e.take(self.version_of(kind, now));
                e.handles += 1;
                RecordOpen::Direct {
                    attrs: DropAttrs::Always,
                }
            }
            // Readers hold its pages: the kernel looks the name up again and finds a node
            // id for this version.
            _ if !e.redirect_now() => {
                let new = self.move_name(&mut t, &node, ino);
                t.entry(new).or_default().redirect = Some(Instant::now());
                RecordOpen::Stale
            }
            // That retry found its node id outdated too, and held: this open reads the new
            // bytes direct-I/O (its fstat shows the size its lookup gave), and the name
            // moves on at its next lookup.
            _ => {
                e.handles += 1;
                self.inval
                    .send(Inval::Entry(kind_dir_ino(kind), node.name()));
                RecordOpen::Direct {
                    attrs: DropAttrs::Never,
                }
            }
        }
    }

    /// The kernel's pages and attributes of `ino` were dropped while it showed `bytes`: if it
    /// still does, the next open may use the page cache.
    pub(super) fn pages_dropped(&self, ino: u64, bytes: &[u8]) {
        if let Some(e) = self.versions.lock().get_mut(&ino)
            && e.version.as_ref().is_some_and(|v| v.bytes[..] == *bytes)
        {
            e.stale_pages = false;
        }
    }

    /// A record descriptor on `ino` closed (`wrote`: opened for writing; `cached`: read from
    /// the page cache). When the last writer goes the inode is a reader's again, its pages
    /// dropped at the next open.
    pub(super) fn record_closed(&self, ino: u64, wrote: bool, cached: bool) {
        let mut t = self.versions.lock();
        let Some(e) = t.get_mut(&ino) else {
            return;
        };
        e.handles = e.handles.saturating_sub(1);
        if cached {
            e.cached_handles = e.cached_handles.saturating_sub(1);
        }
        if wrote {
            e.writers = e.writers.saturating_sub(1);
            if e.writers == 0 {
                e.written = false;
                e.version = None;
                e.stale_pages = true;
            }
        }
    }

    /// A record inode is about to change through a path (truncate(2)): refused with ESTALE
    /// when readers' pages hold it (the name moves to an inode reserved for the retry),
    /// else it counts as a writer until `record_closed(ino, true)`.
    pub(super) fn record_truncate(&self, ino: u64, kind: Kind, id: &str) -> FsResult<()> {
        match self.record_open(ino, kind, id, None, true) {
            RecordOpen::Stale => Err(FsError::new(libc::ESTALE)),
            _ => Ok(()),
        }
    }

    /// The kernel forgot `nlookup` lookups of `ino`: a superseded version's number goes
    /// once the kernel knows it no more.
    pub fn forget(&self, ino: u64, nlookup: u64) {
        let mut t = self.versions.lock();
        if let Some(e) = t.get_mut(&ino) {
            e.lookups = e.lookups.saturating_sub(nlookup);
            if e.lookups > 0 || e.handles > 0 {
                return;
            }
        }
        // Superseded (or its name renamed over or removed): nobody can reach it again.
        if self.inodes.forget(ino) || self.inodes.node(ino).is_none() {
            t.remove(&ino);
        }
    }
}
