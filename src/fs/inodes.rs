//! The inode table: a stable number for each name while it exists. Numbers are never
//! reused, so a name that is removed and made again gets a new inode and the kernel never
//! confuses the two.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::store::Kind;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Dir(Kind),
    AttachDir,
    /// `<dir>/<id>.json`
    Record(Kind, String),
    /// A name in a record directory that lives in the mount only until renamed.
    Scratch(Kind, String),
    Blob(String),
    Sidecar(String),
    Label(String),
    /// `attachments/<name>` created and still being written.
    Ingest(String),
    Gc,
    Status,
    Errors,
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
            _ => return None,
        })
    }

    const FIXED: [Node; 8] = [
        Node::Root,
        Node::Dir(Kind::Sessions),
        Node::Dir(Kind::Goals),
        Node::Dir(Kind::Conversations),
        Node::AttachDir,
        Node::Gc,
        Node::Status,
        Node::Errors,
    ];

    /// The directory this node is listed in.
    pub fn parent_ino(&self) -> u64 {
        match self {
            Node::Record(k, _) | Node::Scratch(k, _) => Node::Dir(*k).fixed_ino().unwrap_or(ROOT),
            Node::Blob(_) | Node::Sidecar(_) | Node::Label(_) | Node::Ingest(_) => 5,
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
            Node::Scratch(_, n) | Node::Label(n) | Node::Ingest(n) | Node::Blob(n) => n.clone(),
            Node::Sidecar(h) => format!("{h}.json"),
            Node::Gc => ".gc".into(),
            Node::Status => ".status".into(),
            Node::Errors => ".errors".into(),
        }
    }
}

struct Table {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
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

impl Inodes {
    pub fn ino(&self, node: &Node) -> u64 {
        if let Some(&i) = self.t.read().by_node.get(node) {
            return i;
        }
        let mut t = self.t.write();
        if let Some(&i) = t.by_node.get(node) {
            return i;
        }
        let i = t.next;
        t.next += 1;
        t.by_node.insert(node.clone(), i);
        t.by_ino.insert(i, node.clone());
        i
    }

    pub fn existing(&self, node: &Node) -> Option<u64> {
        self.t.read().by_node.get(node).copied()
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.t.read().by_ino.get(&ino).cloned()
    }

    /// Forgets a name that no longer exists. Returns the inode it had.
    pub fn remove(&self, node: &Node) -> Option<u64> {
        if node.fixed_ino().is_some() {
            return None;
        }
        let mut t = self.t.write();
        let i = t.by_node.remove(node)?;
        t.by_ino.remove(&i);
        Some(i)
    }

    /// A rename: the inode keeps its number under its new name; whatever had the new name
    /// before loses its inode.
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
        self.t
            .read()
            .by_ino
            .iter()
            .map(|(i, n)| (*i, n.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.t.read().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
