//! Kernel cache invalidation (FUSE notify). Notifications are sent from a dedicated thread,
//! never from inside a FUSE operation that holds a kernel lock the invalidation needs
//! (an entry invalidation takes the parent directory's lock: sent from a lookup or rename
//! on that directory it would deadlock). The one synchronous use is an inode invalidation
//! from `open`, where the kernel holds no lock it needs.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};

use fuser::{INodeNo, Notifier};
use parking_lot::Mutex;

#[derive(Debug, Clone)]
pub enum Inval {
    /// Attributes and cached pages of an inode.
    Inode(u64),
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
        let ok = core.inval.now(i);
        core.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        if !ok {
            core.stats
                .invalidation_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
