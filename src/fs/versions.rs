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
//! - A direct-I/O descriptor's mmap fills the page cache from its own snapshot: while a
//!   direct-I/O reader whose snapshot may not be the node id's version is open (`foreign`),
//!   no open uses the page cache, and when the last one goes the pages are dropped first.
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
    /// The store file's permission bits (see `RecordView::mode`).
    pub mode: Option<u32>,
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
    /// Direct-I/O readers whose snapshot is `version` (of generation `generation`), and those whose
    /// snapshot may be another version's: an mmap of a direct-I/O descriptor fills the page
    /// cache from its own snapshot, so while any of the latter is open no open uses the page
    /// cache, and when the last goes the pages are dropped before one does.
    generation: u64,
    direct_now: u32,
    foreign: u32,
    /// The kernel's lookup count (replies that handed the number out, less FORGETs).
    lookups: u64,
    /// The inode number `stat` shows: the name's first node id, kept by every version
    /// (0: this node id).
    st_ino: u64,
    /// The name has moved on to another node id.
    superseded: bool,
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

    /// Takes version `v` in place (no page-cache reader has it open; None: the next lookup or
    /// open gives it one); whatever pages it has are another version's until dropped, and
    /// direct-I/O readers of the old version are now foreign.
    fn take(&mut self, v: Option<Version>) {
        self.foreign += self.direct_now;
        self.direct_now = 0;
        self.generation += 1;
        self.version = v;
        self.stale_pages = true;
    }
}

/// How an open of a record inode is served.
pub(super) enum RecordOpen {
    /// From the page cache, which can only hold this inode's version.
    Cached,
    /// Direct I/O from the descriptor's snapshot, after doing `attrs` to the kernel's
    /// attributes of the inode; `generation`: the generation of the version its snapshot is
    /// (`FOREIGN`: maybe not the inode's), for `record_closed`.
    Direct { attrs: DropAttrs, generation: u64 },
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

/// The generation of a direct-I/O reader whose snapshot may not be its inode's version.
pub(super) const FOREIGN: u64 = u64::MAX;

/// The bits a record may show given its store file's mode: read where the file gives
/// read, write where it gives write, for each of owner, group and others.
pub(super) fn file_mask(mode: u32) -> u16 {
    (mode & 0o666) as u16
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
        t.entry(from).or_default().superseded = true;
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
            mode: view.mode,
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
                e.take(Some(self.version_of(kind, view)));
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
                    e.take(Some(self.version_of(kind, view)));
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
        e.take(None);
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
    /// inode's own version's if it shows one (the kernel's pages of it are that version's,
    /// whatever the name shows now), else `now`'s.
    pub(super) fn record_attr(&self, ino: u64, kind: Kind, now: &RecordView) -> Attr {
        let (pinned, st_ino) = self.shown(ino);
        match pinned {
            Some(p) => self.version_attr(ino, &p, st_ino),
            None => {
                let times = self.record_times(kind, now);
                let v = Version {
                    bytes: now.bytes.clone(),
                    mtime: times.0,
                    ctime: times.1,
                    mode: now.mode,
                };
                self.version_attr(ino, &v, st_ino)
            }
        }
    }

    /// The attributes a listing gives inode `ino` if it shows one version: the listing
    /// may be older than the version the inode shows now.
    pub(super) fn pinned_attr(&self, ino: u64) -> Option<Attr> {
        let (p, st_ino) = self.shown(ino);
        Some(self.version_attr(ino, &p?, st_ino))
    }

    fn version_attr(&self, ino: u64, v: &Version, st_ino: u64) -> Attr {
        let perm = if self.opts.read_only { 0o444 } else { 0o644 };
        // Never more open than the record's own store file (a private conversation file).
        let perm = perm & v.mode.map_or(0o777, file_mask);
        let times = (v.mtime, v.ctime);
        let mut a = self.attr(
            ino,
            FileKind::File,
            v.bytes.len() as u64,
            times,
            perm,
            self.opts.ttl,
        );
        a.st_ino = st_ino;
        a
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
        let current = self.inodes.existing(&node) == Some(ino);
        let e = t.entry(ino).or_default();
        if write {
            if e.cached_handles > 0 {
                // Readers have its pages open: the writer gets a node id of its own, which
                // no reader caches (the inode number stat shows stays the record's). A
                // superseded node id is not the name's: the kernel's retry finds the name's.
                if current {
                    let new = self.move_name(&mut t, &node, ino);
                    let n = t.entry(new).or_default();
                    n.written = true;
                    n.redirect = Some(Instant::now());
                    n.reserved = Some(Instant::now());
                }
                return RecordOpen::Stale;
            }
            e.written = true;
            e.reserved = None;
            e.handles += 1;
            e.writers += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::IfSizeDiffers,
                generation: FOREIGN,
            };
        }
        let Some(now) = now.filter(|_| !e.written) else {
            e.handles += 1;
            e.foreign += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::IfSizeDiffers,
                generation: FOREIGN,
            };
        };
        let same = e
            .version
            .as_ref()
            .is_some_and(|p| same_bytes(&p.bytes, &now.bytes));
        if same && !e.stale_pages && e.foreign == 0 {
            e.cached_handles += 1;
            e.handles += 1;
            return RecordOpen::Cached;
        }
        if same && e.foreign > 0 {
            // Its pages may hold a foreign snapshot: direct-I/O until those readers go.
            e.handles += 1;
            e.direct_now += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::IfSizeDiffers,
                generation: e.generation,
            };
        }
        if same || e.cached_handles == 0 {
            // This version's, with stale pages; or no page-cache reader has it open, so it
            // takes this version. Its pages and attributes are dropped before the open
            // returns (`pages_dropped` then lets the next open use the page cache).
            if !same {
                e.take(Some(self.version_of(kind, now)));
            }
            e.handles += 1;
            e.direct_now += 1;
            return RecordOpen::Direct {
                attrs: DropAttrs::Always,
                generation: e.generation,
            };
        }
        if current && !e.redirect_now() {
            // Readers hold its pages: the kernel looks the name up again and finds a node id
            // for this version.
            let new = self.move_name(&mut t, &node, ino);
            t.entry(new).or_default().redirect = Some(Instant::now());
            return RecordOpen::Stale;
        }
        // A superseded node id reopened without a lookup (/proc/self/fd), or the retry of an
        // ESTALE that found its node id outdated and held too: this open reads the new bytes
        // direct-I/O (its fstat shows the size the node id shows), and the name moves on at
        // its next lookup.
        e.handles += 1;
        e.foreign += 1;
        if current {
            self.inval
                .send(Inval::Entry(kind_dir_ino(kind), node.name()));
        }
        RecordOpen::Direct {
            attrs: DropAttrs::Never,
            generation: FOREIGN,
        }
    }

    /// The kernel's pages and attributes of `ino` were dropped while it showed `bytes`: if it
    /// still does and no foreign snapshot can refill them, the next open may use the page
    /// cache.
    pub(super) fn pages_dropped(&self, ino: u64, bytes: &[u8]) {
        if let Some(e) = self.versions.lock().get_mut(&ino)
            && e.foreign == 0
            && e.version.as_ref().is_some_and(|v| v.bytes[..] == *bytes)
        {
            e.stale_pages = false;
        }
    }

    /// A record descriptor on `ino` closed (`wrote`: opened for writing; `cached`: read from
    /// the page cache; `generation`: a direct-I/O reader's, from `RecordOpen::Direct`). When the
    /// last writer goes the inode is a reader's again, its pages dropped at the next open.
    pub(super) fn record_closed(&self, ino: u64, wrote: bool, cached: bool, generation: u64) {
        let mut t = self.versions.lock();
        let Some(e) = t.get_mut(&ino) else {
            return;
        };
        e.handles = e.handles.saturating_sub(1);
        if wrote {
            e.writers = e.writers.saturating_sub(1);
            if e.writers == 0 {
                e.written = false;
                e.take(None);
            }
        } else if cached {
            e.cached_handles = e.cached_handles.saturating_sub(1);
        } else if generation == e.generation {
            e.direct_now = e.direct_now.saturating_sub(1);
        } else {
            e.foreign = e.foreign.saturating_sub(1);
            if e.foreign == 0 {
                e.stale_pages = true;
            }
        }
        self.retire(&mut t, ino);
    }

    /// Counts a lookup the kernel made of record node id `ino` outside `record_ino` (a
    /// create, a record not stored yet).
    pub(super) fn looked_up(&self, ino: u64) {
        self.versions.lock().entry(ino).or_default().lookups += 1;
    }

    /// The attributes a record node id shows whatever the store says now: its version's,
    /// when it is superseded or page-cache readers hold it (a removed record, one made again
    /// under the name).
    pub(super) fn held_attr(&self, ino: u64, node: &Node) -> Option<Attr> {
        let held = {
            let t = self.versions.lock();
            let e = t.get(&ino)?;
            !e.written
                && e.version.is_some()
                && (e.cached_handles > 0 || self.inodes.existing(node) != Some(ino))
        };
        if held { self.pinned_attr(ino) } else { None }
    }

    /// The node id a listing made earlier should hand out for `ino`: the name's node id now
    /// (a record's may have moved since), or None if the mount no longer knows it.
    pub(super) fn listed_ino(&self, ino: u64) -> Option<u64> {
        if self
            .versions
            .lock()
            .get(&ino)
            .is_some_and(|e| !e.superseded)
        {
            return self.inodes.knows(ino).then_some(ino);
        }
        match self.inodes.node(ino)? {
            node @ Node::Record(..) => Some(self.inodes.existing(&node).unwrap_or(ino)),
            _ => Some(ino),
        }
    }

    /// A record node id became something else (a scratch file): it shows no version.
    pub(super) fn drop_version(&self, ino: u64) {
        self.versions.lock().remove(&ino);
    }

    /// Removes superseded node id `ino` once neither the kernel nor a descriptor has it.
    fn retire(&self, t: &mut Table, ino: u64) {
        if let Some(e) = t.get(&ino)
            && e.lookups == 0
            && e.handles == 0
            && (self.inodes.forget(ino) || self.inodes.node(ino).is_none())
        {
            t.remove(&ino);
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
        match t.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(nlookup);
                // Superseded (or its name renamed over or removed): nobody can reach it again.
                self.retire(&mut t, ino);
            }
            None => {
                self.inodes.forget(ino);
            }
        }
    }
}
