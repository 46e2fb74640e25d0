//! The directory store's watcher: inotify on the store's directories. When another process
//! (or we) replaces a store file, the collection is reloaded and exactly the records,
//! blobs and labels that changed are reported to the mount, which invalidates those kernel
//! entries and inodes: stat/lookup see the change within milliseconds while attribute
//! TTLs stay long enough for native-speed stat.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::{ChangeSink, Kind, StoreEvent};
use crate::store::Store;
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
    store: Arc<Store>,
    sink: Arc<dyn ChangeSink>,
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
    pub(super) fn new(store: Arc<Store>, sink: Arc<dyn ChangeSink>) -> std::io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let mut w = Watcher {
            store,
            sink,
            inotify,
            watched: HashMap::new(),
            by_wd: HashMap::new(),
            docs: HashMap::new(),
            conversations: HashMap::new(),
            attachments: Arc::default(),
        };
        w.ensure_watches();
        w.snapshot_all();
        if let Ok(l) = w.store.attachment_listing() {
            w.attachments = l;
        }
        Ok(w)
    }

    /// Takes the current version of every collection as the one the kernel knows.
    fn snapshot_all(&mut self) {
        for k in [Kind::Sessions, Kind::Goals] {
            if let Ok(Some(d)) = self.store.doc(k) {
                self.docs.insert(k, d);
            }
        }
        if let Some(c) = self.conversation_snapshot() {
            self.conversations = c;
        }
    }

    fn conversation_snapshot(&self) -> Option<HashMap<String, Arc<[u8]>>> {
        let l = self.store.list(Kind::Conversations).ok()?;
        Some(l.records.into_iter().map(|r| (r.id, r.bytes)).collect())
    }

    /// Watches every store directory that exists now (the store may be created later).
    fn ensure_watches(&mut self) {
        let l = &self.store.layout;
        let cas = self.store.attachments.cas_dir();
        let mut dirs = l.dirs();
        dirs.push(l.root.clone());
        dirs.push(cas.clone());
        if let Ok(rd) = crate::store::untrusted::read_dir(&cas) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| cas.join(e.file_name())),
            );
        }
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF
            // A store directory swapped for a symlink is not watched through it.
            | WatchMask::DONT_FOLLOW;
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
        let l = &self.store.layout;
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
            let in_shard = dir.parent() == Some(self.store.attachments.cas_dir().as_path());
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
                tracing::warn!("inotify queue overflowed: invalidating every cached entry");
                self.store.attachments.invalidate();
                self.snapshot_all();
                self.sink.store_changed(vec![StoreEvent::Everything], t0);
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
            let mut events = Vec::new();
            for t in targets {
                self.refresh(t, &mut events);
            }
            self.sink.store_changed(events, t0);
        }
    }

    fn refresh(&mut self, t: Target, out: &mut Vec<StoreEvent>) {
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
                    for (id, bytes) in &self.conversations {
                        if !old.contains_key(id) {
                            self.record_changed(Kind::Conversations, id, None, Some(bytes), out);
                        }
                    }
                }
            }
            Target::Collection(kind) => {
                let Ok(Some(new)) = self.store.doc(kind) else {
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
                for r in new.addressable() {
                    if old.get(&r.id).is_none() {
                        self.record_changed(kind, &r.id, None, Some(&r.bytes), out);
                    }
                }
            }
            Target::Conversation(id) => {
                let now = match self.store.get(Kind::Conversations, &id) {
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
                let Ok(l) = self.store.attachment_listing() else {
                    return;
                };
                let old = std::mem::replace(&mut self.attachments, l.clone());
                match t {
                    Target::Blob(id) => self.blob_changed(&l, id, out),
                    // The blobs that went: only the shards that changed are compared.
                    _ => {
                        for id in old.blobs_gone(&l) {
                            self.blob_changed(&l, id, out);
                        }
                    }
                }
                // Only the labels of candidates that changed are compared.
                for label in old.labels_moved(&l) {
                    out.push(StoreEvent::LabelGone(label.to_string()));
                }
            }
            Target::Dirs => {}
        }
    }

    /// A blob or its sidecar changed on disk: removed, or its sidecar rewritten.
    fn blob_changed(&self, l: &Listing, id: BlobId, out: &mut Vec<StoreEvent>) {
        out.push(StoreEvent::Blob {
            id,
            gone: l.get(&id).is_none(),
        });
    }

    /// One record the kernel may know, before and now: removed, or its bytes changed.
    /// (New records need nothing: negative entries are never cached.)
    fn record_changed(
        &self,
        kind: Kind,
        id: &str,
        before: Option<&Arc<[u8]>>,
        now: Option<&Arc<[u8]>>,
        out: &mut Vec<StoreEvent>,
    ) {
        match (before, now) {
            (Some(_), None) => out.push(StoreEvent::Record {
                kind,
                id: id.to_string(),
                gone: true,
            }),
            (Some(b), Some(n)) if b[..] != n[..] => out.push(StoreEvent::Record {
                kind,
                id: id.to_string(),
                gone: false,
            }),
            // A new record: nothing to invalidate (negative entries are never cached),
            // but the change feed records it.
            (None, Some(_)) => out.push(StoreEvent::Record {
                kind,
                id: id.to_string(),
                gone: false,
            }),
            _ => {}
        }
    }
}
