//! The inode table: a stable number for each name while it exists. Numbers are never
//! reused, so a name that is removed and made again gets a new inode and the kernel never
//! confuses the two.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::backend::Kind;
use crate::store::attachments::to_hex;
use crate::store::blob_index::BlobId;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Dir(Kind),
    AttachDir,
    /// `<dir>/<id>.json`
    Record(Kind, String),
    /// A name in a record directory that lives in the mount only until renamed.
    Scratch(Kind, String),
    /// `attachments/<hex>`
    Blob(BlobId),
    /// `attachments/<hex>.json`
    Sidecar(BlobId),
    Label(String),
    /// `attachments/<name>` created and still being written.
    Ingest(String),
    Gc,
    Status,
    Errors,
    /// `.changes`
    Changes,
    /// `.history/`
    HistoryRoot,
    /// `.history/<collection>/`
    HistoryDir(Kind),
    /// `.history/<collection>/<id>/`
    HistoryRecord(Kind, String),
    /// `.history/<collection>/<id>/<version>`
    HistoryVersion(Kind, String, String),
}

pub const ROOT: u64 = 1;

impl Node {
    fn fixed_ino(&self) -> Option<u64> {
        Some(match self {
            Node::Root => ROOT,
            Node::Dir(Kind::Sessions) => 2,
            Node::Dir(Kind::Goals) => 3,
            Node::Dir(Kind::Conversations) => 4,
            Node::AttachDir => 5,
            Node::Gc => 6,
            Node::Status => 7,
            Node::Errors => 8,
            Node::Dir(Kind::Agents) => 9,
            Node::Dir(Kind::Delegations) => 10,
            Node::Changes => 11,
            Node::HistoryRoot => 12,
            Node::HistoryDir(k) => 13 + *k as u64,
            _ => return None,
        })
    }

    const FIXED: [Node; 17] = [
        Node::Root,
        Node::Dir(Kind::Sessions),
        Node::Dir(Kind::Goals),
        Node::Dir(Kind::Conversations),
        Node::AttachDir,
        Node::Gc,
        Node::Status,
        Node::Errors,
        Node::Dir(Kind::Agents),
        Node::Dir(Kind::Delegations),
        Node::Changes,
        Node::HistoryRoot,
        Node::HistoryDir(Kind::Sessions),
        Node::HistoryDir(Kind::Goals),
        Node::HistoryDir(Kind::Conversations),
        Node::HistoryDir(Kind::Agents),
        Node::HistoryDir(Kind::Delegations),
    ];

    /// The directory this node is listed in.
    pub fn parent_ino(&self) -> u64 {
        match self {
            Node::Record(k, _) | Node::Scratch(k, _) => Node::Dir(*k).fixed_ino().unwrap_or(ROOT),
            Node::Blob(_) | Node::Sidecar(_) | Node::Label(_) | Node::Ingest(_) => 5,
            Node::HistoryDir(_) => 12,
            Node::HistoryRecord(k, _) => Node::HistoryDir(*k).fixed_ino().unwrap_or(ROOT),
            _ => ROOT,
        }
    }

    /// Its name in that directory.
    pub fn name(&self) -> String {
        match self {
            Node::Root => "/".into(),
            Node::Dir(k) => k.dir_name().into(),
            Node::AttachDir => "attachments".into(),
            Node::Record(_, id) => format!("{id}.json"),
            Node::Scratch(_, n) | Node::Label(n) | Node::Ingest(n) => n.clone(),
            Node::Blob(id) => to_hex(id),
            Node::Sidecar(id) => format!("{}.json", to_hex(id)),
            Node::Gc => ".gc".into(),
            Node::Changes => ".changes".into(),
            Node::HistoryRoot => ".history".into(),
            Node::HistoryDir(k) => k.dir_name().into(),
            Node::HistoryRecord(_, id) => id.clone(),
            Node::HistoryVersion(_, _, v) => v.clone(),
            Node::Status => ".status".into(),
            Node::Errors => ".errors".into(),
        }
    }
}

struct Table {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
    /// Blobs apart, as a pair of numbers each (the blob's is even, its sidecar's the next):
    /// a store holds many, and 40 bytes a key keep them small.
    blobs: HashMap<BlobId, u64>,
    blob_of: HashMap<u64, BlobId>,
    next: u64,
}

pub struct Inodes {
    t: RwLock<Table>,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut t = Table {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            blobs: HashMap::new(),
            blob_of: HashMap::new(),
            next: 64,
        };
        for n in Node::FIXED {
            if let Some(i) = n.fixed_ino() {
                t.by_node.insert(n.clone(), i);
                t.by_ino.insert(i, n);
            }
        }
        Inodes { t: RwLock::new(t) }
    }
}

impl Table {
    fn existing(&self, node: &Node) -> Option<u64> {
        match node {
            Node::Blob(id) => self.blobs.get(id).copied(),
            Node::Sidecar(id) => self.blobs.get(id).map(|i| i + 1),
            n => self.by_node.get(n).copied(),
        }
    }
}

impl Inodes {
    pub fn ino(&self, node: &Node) -> u64 {
        if let Some(i) = self.t.read().existing(node) {
            return i;
        }
        let mut t = self.t.write();
        if let Some(i) = t.existing(node) {
            return i;
        }
        match node {
            Node::Blob(id) | Node::Sidecar(id) => {
                let pair = t.next.next_multiple_of(2);
                t.next = pair + 2;
                t.blobs.insert(*id, pair);
                t.blob_of.insert(pair, *id);
                pair + u64::from(matches!(node, Node::Sidecar(_)))
            }
            _ => {
                let i = t.next;
                t.next += 1;
                t.by_node.insert(node.clone(), i);
                t.by_ino.insert(i, node.clone());
                i
            }
        }
    }

    pub fn existing(&self, node: &Node) -> Option<u64> {
        self.t.read().existing(node)
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        let t = self.t.read();
        if let Some(n) = t.by_ino.get(&ino) {
            return Some(n.clone());
        }
        let id = *t.blob_of.get(&(ino & !1))?;
        Some(if ino & 1 == 0 {
            Node::Blob(id)
        } else {
            Node::Sidecar(id)
        })
    }

    /// Whether `ino` still names something (without cloning what).
    pub fn knows(&self, ino: u64) -> bool {
        let t = self.t.read();
        t.by_ino.contains_key(&ino) || t.blob_of.contains_key(&(ino & !1))
    }

    /// Forgets a name that no longer exists. Returns the inode it had.
    pub fn remove(&self, node: &Node) -> Option<u64> {
        if node.fixed_ino().is_some() {
            return None;
        }
        let mut t = self.t.write();
        if let Node::Blob(id) | Node::Sidecar(id) = node {
            // A blob and its sidecar go together (only garbage collection removes them).
            let i = t.blobs.remove(id)?;
            t.blob_of.remove(&i);
            return Some(i + u64::from(matches!(node, Node::Sidecar(_))));
        }
        let i = t.by_node.remove(node)?;
        t.by_ino.remove(&i);
        Some(i)
    }

    /// A new inode for a record's name whose content became another version: the old
    /// number keeps meaning the old version for whoever still holds it (descriptors, the
    /// kernel's pages) until the kernel forgets it.
    pub fn reassign(&self, node: &Node) -> u64 {
        let mut t = self.t.write();
        let i = t.next;
        t.next += 1;
        t.by_node.insert(node.clone(), i);
        t.by_ino.insert(i, node.clone());
        i
    }

    /// The kernel forgot inode `ino`: a superseded version's number goes (a name's current
    /// inode stays, so a later lookup finds the same number). Returns whether it went.
    pub fn forget(&self, ino: u64) -> bool {
        let mut t = self.t.write();
        let Some(node) = t.by_ino.get(&ino) else {
            return false;
        };
        if node.fixed_ino().is_some() || t.by_node.get(node) == Some(&ino) {
            return false;
        }
        t.by_ino.remove(&ino);
        true
    }

    /// A rename: the inode keeps its number under its new name; whatever had the new name
    /// before loses its inode. (Blob names never change.)
    pub fn rename(&self, from: &Node, to: &Node) {
        let mut t = self.t.write();
        if let Some(old) = t.by_node.remove(to) {
            t.by_ino.remove(&old);
        }
        if let Some(i) = t.by_node.remove(from) {
            t.by_node.insert(to.clone(), i);
            t.by_ino.insert(i, to.clone());
        }
    }

    /// Every (ino, node) known, for invalidating everything after an inotify overflow.
    pub fn all(&self) -> Vec<(u64, Node)> {
        let t = self.t.read();
        let named = t.by_ino.iter().map(|(i, n)| (*i, n.clone()));
        let blobs = t
            .blobs
            .iter()
            .flat_map(|(id, i)| [(*i, Node::Blob(*id)), (i + 1, Node::Sidecar(*id))]);
        named.chain(blobs).collect()
    }

    pub fn len(&self) -> usize {
        let t = self.t.read();
        t.by_ino.len() + 2 * t.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
