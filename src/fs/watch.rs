//! The store watcher: inotify on the store's directories. When another process (or we)
//! replaces a store file, the collection is reloaded and exactly the kernel entries and
//! inodes that changed are invalidated, so stat/lookup see the change within milliseconds
//! while attribute TTLs stay long enough for native-speed stat.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::inodes::Node;
use super::invalidate::Inval;
use super::{ATTACH_DIR, Core, kind_dir_ino};
use crate::store::Kind;
use crate::store::atomic::TEMP_MARKER;
use crate::store::blob_index::{BlobId, Listing, parse_id};
use crate::store::collection::Doc;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Collection(Kind),
    Conversation(String),
    /// A blob or its sidecar, named by an event in its shard directory.
    Blob(BlobId),
    /// Anything else under attachments/: compare every blob.
    Attachments,
    Dirs,
}

pub struct Watcher {
    core: Arc<Core>,
    inotify: Inotify,
    watched: HashMap<PathBuf, WatchDescriptor>,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    /// The versions of sessions.json and goals.json the kernel was last told about.
    docs: HashMap<Kind, Arc<Doc>>,
    /// The conversations the kernel was last told about (one file each).
    conversations: HashMap<String, Arc<[u8]>>,
    /// The attachment listing the kernel was last told about (shared, not copied).
    attachments: Arc<Listing>,
}

impl Watcher {
    pub fn new(core: Arc<Core>) -> std::io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let mut w = Watcher {
            core,
            inotify,
            watched: HashMap::new(),
            by_wd: HashMap::new(),
            docs: HashMap::new(),
            conversations: HashMap::new(),
            attachments: Arc::default(),
        };
        w.ensure_watches();
        w.snapshot_all();
        if let Ok(l) = w.core.store.attachment_listing() {
            w.attachments = l;
        }
        Ok(w)
    }

    /// Takes the current version of every collection as the one the kernel knows.
    fn snapshot_all(&mut self) {
        for k in [Kind::Sessions, Kind::Goals] {
            if let Ok(Some(d)) = self.core.store.doc(k) {
                self.docs.insert(k, d);
            }
        }
        if let Some(c) = self.conversation_snapshot() {
            self.conversations = c;
        }
    }

    fn conversation_snapshot(&self) -> Option<HashMap<String, Arc<[u8]>>> {
        let l = self.core.store.list(Kind::Conversations).ok()?;
        Some(l.records.into_iter().map(|r| (r.id, r.bytes)).collect())
    }

    /// Watches every store directory that exists now (the store may be created later).
    fn ensure_watches(&mut self) {
        let l = &self.core.store.layout;
        let cas = self.core.store.attachments.cas_dir();
        let mut dirs = l.dirs();
        dirs.push(l.root.clone());
        dirs.push(cas.clone());
        if let Ok(rd) = std::fs::read_dir(&cas) {
            dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF;
        for d in dirs {
            if self.watched.contains_key(&d) || !d.is_dir() {
                continue;
            }
            match self.inotify.watches().add(&d, mask) {
                Ok(wd) => {
                    self.by_wd.insert(wd.clone(), d.clone());
                    self.watched.insert(d, wd);
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch store directory; changes there are seen only when the TTL runs out")
                }
            }
        }
    }

    fn classify(&self, dir: &Path, name: &OsStr, out: &mut HashSet<Target>) {
        let name = name.to_string_lossy();
        if name.contains(TEMP_MARKER) {
            return;
        }
        let l = &self.core.store.layout;
        let is = |p: &Path| {
            p.parent() == Some(dir)
                && p.file_name()
                    .map(|n| n.to_string_lossy() == name)
                    .unwrap_or(false)
        };
        if is(&l.sessions) {
            out.insert(Target::Collection(Kind::Sessions));
        }
        if is(&l.goals) {
            out.insert(Target::Collection(Kind::Goals));
        }
        if dir == l.conversations
            && let Some(id) = name
                .strip_prefix("conversation-")
                .and_then(|n| n.strip_suffix(".json"))
        {
            out.insert(Target::Conversation(id.to_string()));
        }
        if dir.starts_with(&l.attachments) && !is(&l.manifest) {
            let in_shard = dir.parent() == Some(self.core.store.attachments.cas_dir().as_path());
            let id = parse_id(name.strip_suffix(".json").unwrap_or(&name));
            match id {
                Some(id) if in_shard => out.insert(Target::Blob(id)),
                _ => out.insert(Target::Attachments),
            };
        }
    }

    pub fn run(mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let events = match self.inotify.read_events_blocking(&mut buf) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "inotify read failed; the watcher stops and changes are seen when the TTL runs out");
                    return;
                }
            };
            let t0 = Instant::now();
            let mut targets = HashSet::new();
            let mut overflow = false;
            for ev in events {
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                if ev.mask.contains(EventMask::ISDIR) || ev.mask.contains(EventMask::DELETE_SELF) {
                    targets.insert(Target::Dirs);
                }
                if let (Some(dir), Some(name)) = (self.by_wd.get(&ev.wd).cloned(), ev.name) {
                    self.classify(&dir, name, &mut targets);
                }
            }
            if overflow {
                self.core.stats.overflows.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("inotify queue overflowed: invalidating every cached entry");
                self.invalidate_everything();
                continue;
            }
            if targets.remove(&Target::Dirs) {
                self.watched.retain(|p, _| p.is_dir());
                self.ensure_watches();
                targets.extend([
                    Target::Collection(Kind::Sessions),
                    Target::Collection(Kind::Goals),
                    Target::Collection(Kind::Conversations),
                    Target::Attachments,
                ]);
            }
            if targets.is_empty() {
                continue;
            }
            self.core
                .stats
                .external_changes
                .fetch_add(1, Ordering::Relaxed);
            let mut invals = Vec::new();
            for t in targets {
                self.refresh(t, &mut invals);
            }
            for i in invals {
                self.send(i);
            }
            let us = t0.elapsed().as_micros() as u64;
            self.core.stats.last_latency_us.store(us, Ordering::Relaxed);
            self.core
                .stats
                .max_latency_us
                .fetch_max(us, Ordering::Relaxed);
        }
    }

    fn send(&self, i: Inval) {
        let ok = self.core.inval.now(i);
        self.core
            .stats
            .invalidations
            .fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.core
                .stats
                .invalidation_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refresh(&mut self, t: Target, out: &mut Vec<Inval>) {
        match t {
            Target::Collection(Kind::Conversations) => {
                if let Some(new) = self.conversation_snapshot() {
                    let old = std::mem::replace(&mut self.conversations, new);
                    for (id, bytes) in &old {
                        let now = self.conversations.get(id).cloned();
                        self.record_changed(
                            Kind::Conversations,
                            id,
                            Some(bytes),
                            now.as_ref(),
                            out,
                        );
                    }
                }
            }
            Target::Collection(kind) => {
                let Ok(Some(new)) = self.core.store.doc(kind) else {
                    return;
                };
                let Some(old) = self.docs.insert(kind, new.clone()) else {
                    return;
                };
                if Arc::ptr_eq(&old, &new) {
                    return;
                }
                if Arc::ptr_eq(&old.index, &new.index) {
                    // Every id where it was (a reload by difference that changed values
                    // only): compare the records pair by pair, no lookups.
                    for (i, (o, n)) in old.records.iter().zip(&new.records).enumerate() {
                        if !Arc::ptr_eq(o, n) && old.index.get(&o.id) == Some(&i) {
                            self.record_changed(kind, &o.id, Some(&o.bytes), Some(&n.bytes), out);
                        }
                    }
                    return;
                }
                for r in old.addressable() {
                    match new.get(&r.id) {
                        Some(n) if Arc::ptr_eq(n, r) => {}
                        n => self.record_changed(
                            kind,
                            &r.id,
                            Some(&r.bytes),
                            n.map(|n| &n.bytes),
                            out,
                        ),
                    }
                }
            }
            Target::Conversation(id) => {
                let now = match self.core.store.get(Kind::Conversations, &id) {
                    Ok(v) => v.map(|v| v.bytes),
                    Err(_) => return,
                };
                let before = match &now {
                    Some(b) => self.conversations.insert(id.clone(), b.clone()),
                    None => self.conversations.remove(&id),
                };
                self.record_changed(Kind::Conversations, &id, before.as_ref(), now.as_ref(), out);
            }
            Target::Blob(_) | Target::Attachments => {
                let Ok(l) = self.core.store.attachment_listing() else {
                    return;
                };
                let old = std::mem::replace(&mut self.attachments, l.clone());
                match t {
                    Target::Blob(id) => self.blob_changed(&l, id, out),
                    _ => {
                        for b in old.blobs() {
                            if l.get(&b.id).is_none() {
                                self.blob_changed(&l, b.id, out);
                            }
                        }
                    }
                }
                // Labels move only when a sidecar changes: compare them only then.
                if !Arc::ptr_eq(old.labels(), l.labels()) {
                    for (label, id) in old.labels().iter() {
                        if l.label(label) != Some(id) {
                            self.gone(Node::Label(label.to_string()), out);
                        }
                    }
                }
            }
            Target::Dirs => {}
        }
    }

    /// A blob or its sidecar changed on disk: drop what the kernel has of a removed blob
    /// (its table entries too: blob names never move, so no rename of ours can race this),
    /// and the attributes of a rewritten sidecar.
    fn blob_changed(&self, l: &Listing, id: BlobId, out: &mut Vec<Inval>) {
        if l.get(&id).is_some() {
            if let Some(ino) = self.core.inodes.existing(&Node::Sidecar(id)) {
                out.push(Inval::Inode(ino));
            }
            return;
        }
        self.gone(Node::Blob(id), out);
        self.gone(Node::Sidecar(id), out);
        self.core.inodes.remove(&Node::Blob(id));
    }

    /// A name that no longer exists (or now means something else): drop the kernel's entry.
    /// The inode table is left alone: the mount's own rename/unlink may be moving this very
    /// name right now, and only the operation itself may change its mapping (a stale mapping
    /// is harmless: the store answers ENOENT for it).
    fn gone(&self, node: Node, out: &mut Vec<Inval>) {
        if let Some(ino) = self.core.inodes.existing(&node) {
            out.push(Inval::Inode(ino));
        }
        let parent = match &node {
            Node::Record(k, _) => kind_dir_ino(*k),
            _ => ATTACH_DIR,
        };
        out.push(Inval::Entry(parent, node.name()));
    }

    /// One record the kernel may know, before and now: a removed record loses its entry, a
    /// changed one its attributes and pages. (New records need nothing: negative entries
    /// are never cached.)
    fn record_changed(
        &self,
        kind: Kind,
        id: &str,
        before: Option<&Arc<[u8]>>,
        now: Option<&Arc<[u8]>>,
        out: &mut Vec<Inval>,
    ) {
        match (before, now) {
            (Some(_), None) => self.gone(Node::Record(kind, id.to_string()), out),
            (Some(b), Some(n)) if b[..] != n[..] => {
                if let Some(ino) = self
                    .core
                    .inodes
                    .existing(&Node::Record(kind, id.to_string()))
                {
                    out.push(Inval::Inode(ino));
                }
            }
            _ => {}
        }
    }

    fn invalidate_everything(&mut self) {
        self.core.store.attachments.invalidate();
        for (ino, node) in self.core.inodes.all() {
            self.send(Inval::Inode(ino));
            if !matches!(node, Node::Root) {
                self.send(Inval::Entry(node.parent_ino(), node.name()));
            }
        }
        self.snapshot_all();
    }
}
