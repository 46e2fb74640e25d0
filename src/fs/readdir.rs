//! Directory listings: each entry with its attributes (so readdirplus answers `ls -l`
//! without a lookup per name); `attachments/` paged from a snapshot of the index;
//! symlink targets.

use super::*;

impl Core {
    /// A directory's entries, each with its attributes where the listing already knows
    /// them (so readdirplus answers `ls -l` without a lookup per name).
    pub(super) fn dir_list(&self, ino: u64) -> FsResult<DirList> {
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
        // `attr`: attributes known from the listing; None = ask attr_of.
        // `at`: the entry's inode when the caller chose it (a record's version).
        let mut add =
            |at: Option<u64>,
             n: Node,
             k: FileKind,
             attr: Option<(u64, SystemTime, SystemTime, u16, Duration)>| {
                let i = at.unwrap_or_else(|| self.inodes.ino(&n));
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
                let history = self.journal.is_some().then_some(Node::HistoryRoot);
                for n in dirs
                    .chain(attachments.then_some(Node::AttachDir))
                    .chain(history)
                {
                    add(
                        None,
                        n,
                        FileKind::Dir,
                        Some((0, dir.mtime, dir.ctime, 0o755, ttl)),
                    );
                }
                let control = attachments.then_some(Node::Gc).into_iter();
                let changes = self.journal.is_some().then_some(Node::Changes);
                for n in control.chain(changes).chain([Node::Status, Node::Errors]) {
                    add(None, n, FileKind::File, None);
                }
            }
            Node::Dir(kind) => {
                let list = self.store.list(kind)?;
                let mut seen = std::collections::HashSet::new();
                for r in list.records {
                    // A row another program gave an id that names no file here (`a/b`,
                    // `..`, an uppercase UUID) is not listed: one such entry would fail the
                    // whole listing (fsck reports it).
                    if self.store.check_id(kind, &r.id).is_err() {
                        continue;
                    }
                    seen.insert(r.id.clone());
                    // Each version its own inode (see versions.rs).
                    let i = self.record_ino(kind, &r.id, &r, false);
                    let a = self.record_attr(i, kind, &r);
                    let a = (a.size, a.mtime, a.ctime, a.perm, a.ttl);
                    add(Some(i), Node::Record(kind, r.id), FileKind::File, Some(a));
                }
                let pending: Vec<String> = self
                    .pending
                    .lock()
                    .keys()
                    .filter(|(k, id)| *k == kind && !seen.contains(id))
                    .map(|(_, id)| id.clone())
                    .collect();
                for id in pending {
                    add(None, Node::Record(kind, id), FileKind::File, None);
                }
                let scratch: Vec<String> = self
                    .scratch
                    .lock()
                    .values()
                    .filter_map(|s| {
                        let s = s.lock();
                        (s.kind == kind).then(|| s.name.clone())
                    })
                    .collect();
                for name in scratch {
                    add(None, Node::Scratch(kind, name), FileKind::File, None);
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
            Node::HistoryRoot => {
                for k in self.store.collections() {
                    add(
                        None,
                        Node::HistoryDir(*k),
                        FileKind::Dir,
                        Some((0, dir.mtime, dir.ctime, 0o555, ttl)),
                    );
                }
            }
            Node::HistoryDir(k) => {
                if let Some(j) = &self.journal {
                    for id in j.history_ids(k) {
                        add(
                            None,
                            Node::HistoryRecord(k, id),
                            FileKind::Dir,
                            Some((0, dir.mtime, dir.ctime, 0o555, ttl)),
                        );
                    }
                }
            }
            Node::HistoryRecord(k, id) => {
                if let Some(j) = &self.journal {
                    for v in j.history_versions(k, &id) {
                        add(
                            None,
                            Node::HistoryVersion(k, id.clone(), v),
                            FileKind::File,
                            None,
                        );
                    }
                }
            }
            _ => return Err(FsError::new(libc::ENOTDIR)),
        }
        Ok(DirList::Entries(out))
    }

    /// One entry of `attachments/` made from the index.
    pub(super) fn blob_entry(&self, b: &Blob, sidecar: bool) -> DirEntry {
        let (node, attr) = match (&b.sidecar, sidecar) {
            (Some(sc), true) => (
                Node::Sidecar(b.id),
                (sc.size, sc.mtime, sc.ctime, self.opts.ttl, sc.mode),
            ),
            _ => (
                Node::Blob(b.id),
                (b.size, b.mtime, b.ctime, self.opts.blob_ttl, b.mode),
            ),
        };
        let ino = self.inodes.ino(&node);
        let (size, m, c, ttl, mode) = attr;
        let perm = 0o444 & versions::file_mask(mode);
        let mut a = self.attr(ino, FileKind::File, size, (m, c), perm, ttl);
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
    pub(super) fn blob_of(&self, node: &Node) -> FsResult<Option<BlobId>> {
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
}
