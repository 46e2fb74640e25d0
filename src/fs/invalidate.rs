//! Kernel cache invalidation (FUSE notify). Notifications are sent from a dedicated thread,
//! never from inside a FUSE operation that holds a kernel lock the invalidation needs
//! (an entry invalidation takes the parent directory's lock: sent from a lookup or rename
//! on that directory it would deadlock). The one synchronous use is an inode invalidation
//! from `open`, where the kernel holds no lock it needs.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use fuser::{INodeNo, Notifier};
use parking_lot::Mutex;

use super::inodes::Node;
use crate::backend::{ChangeSink, StoreEvent};

#[derive(Debug, Clone)]
pub enum Inval {
    /// Attributes and cached pages of an inode.
    Inode(u64),
    /// Attributes only (pages readers may still use stay).
    Attrs(u64),
    /// A name in a directory.
    Entry(u64, String),
}

#[derive(Default)]
pub struct Invalidator {
    notifier: OnceLock<Notifier>,
    tx: Mutex<Option<Sender<Inval>>>,
}

impl Invalidator {
    /// Connects to the kernel session; returns the queue for the sending thread.
    pub fn connect(&self, notifier: Notifier) -> Receiver<Inval> {
        let _ = self.notifier.set(notifier);
        let (tx, rx) = channel();
        *self.tx.lock() = Some(tx);
        rx
    }

    /// Queues an invalidation for the sending thread.
    pub fn send(&self, i: Inval) {
        if let Some(tx) = &*self.tx.lock() {
            let _ = tx.send(i);
        }
    }

    /// Sends an invalidation now. Returns false if the kernel refused it for a reason other
    /// than not knowing the inode or name (which means there is nothing cached to drop).
    pub fn now(&self, i: Inval) -> bool {
        let Some(n) = self.notifier.get() else {
            return true;
        };
        let r = match &i {
            Inval::Inode(ino) => n.inval_inode(INodeNo(*ino), 0, 0),
            // A negative offset: the kernel drops the attributes and leaves the pages.
            Inval::Attrs(ino) => n.inval_inode(INodeNo(*ino), -1, 0),
            Inval::Entry(parent, name) => {
                n.inval_entry(INodeNo(*parent), std::ffi::OsStr::new(name))
            }
        };
        match r {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => {
                tracing::debug!(?i, error = %e, "kernel invalidation failed");
                false
            }
        }
    }
}

/// The sending thread: drains the queue until the session ends.
pub fn run_sender(core: std::sync::Arc<super::Core>, rx: Receiver<Inval>) {
    while let Ok(i) = rx.recv() {
        core.invalidate_now(i);
    }
}

impl super::Core {
    /// Sends one invalidation now and counts it (and its failure) for `.status`.
    pub(super) fn invalidate_now(&self, i: Inval) {
        let ok = self.inval.now(i);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.stats
                .invalidation_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The mount hears of other writers' changes from the backend's watcher and drops exactly
/// what the kernel caches of them.
impl ChangeSink for super::Core {
    fn store_changed(&self, events: Vec<StoreEvent>, since: Instant) {
        let mut out = Vec::new();
        let mut records = Vec::new();
        for e in events {
            match e {
                StoreEvent::Record { kind, id, gone } => {
                    if self.journal.is_some() {
                        records.push((kind, id.clone()));
                    }
                    let node = Node::Record(kind, id);
                    if gone {
                        self.gone(node, &mut out);
                    } else if let Some(ino) = self.inodes.existing(&node) {
                        // No page-cache reader has the name's node id open: it takes the new
                        // version in place, the kernel drops its attributes now and its pages
                        // at the next open. Otherwise the new version gets a node id of its own
                        // at the next lookup, and the kernel drops the name (versions.rs).
                        if self.record_changed(ino) {
                            out.push(Inval::Attrs(ino));
                        } else {
                            out.push(Inval::Entry(node.parent_ino(), node.name()));
                        }
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
                    if let Some(j) = &self.journal {
                        j.rescan(&*self.store);
                    }
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
        // Entry invalidations go through the sender thread: one needs its directory's lock,
        // which a process waiting for the mount may hold (never block a watcher on it).
        for i in out {
            match i {
                Inval::Entry(..) => self.inval.send(i),
                i => self.invalidate_now(i),
            }
        }
        let us = since.elapsed().as_micros() as u64;
        self.stats.last_latency_us.store(us, Ordering::Relaxed);
        self.stats.max_latency_us.fetch_max(us, Ordering::Relaxed);
        // The journal records what changed once the kernel has been told (its hashing and
        // history writes add nothing to the invalidation latency).
        if let Some(j) = &self.journal {
            for (kind, id) in records {
                let now = self.store.get(kind, &id).ok().flatten();
                j.observe(kind, &id, now.as_ref(), false);
            }
        }
    }
}

impl super::Core {
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
