//! What a lookup does: which node a name is (reload-checked against the store), and the
//! attributes each kind of node shows (records, scratch files, blobs, sidecars, labels,
//! ingests, control files).

use super::*;

impl Core {
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
            let journal = self.journal.is_some();
            return Ok(match name {
                "attachments" if attachments => Node::AttachDir,
                ".gc" if attachments => Node::Gc,
                ".changes" if journal => Node::Changes,
                ".history" if journal => Node::HistoryRoot,
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
                if listing.get(&id).is_some() {
                    return Ok(Node::Blob(id));
                }
                // A put by address still being written.
                if self.ingests.lock().contains_key(name) {
                    return Ok(Node::Ingest(name.to_string()));
                }
                return Err(enoent());
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
        // `.history/…`
        if let Some(j) = &self.journal {
            match self.inodes.node(parent) {
                Some(Node::HistoryRoot) => {
                    if let Some(k) = self
                        .store
                        .collections()
                        .iter()
                        .find(|k| k.dir_name() == name)
                    {
                        return Ok(Node::HistoryDir(*k));
                    }
                    return Err(enoent());
                }
                Some(Node::HistoryDir(k)) => {
                    if j.history_versions(k, name).is_empty() {
                        return Err(enoent());
                    }
                    return Ok(Node::HistoryRecord(k, name.to_string()));
                }
                Some(Node::HistoryRecord(k, id)) => {
                    if !j.history_versions(k, &id).iter().any(|v| v == name) {
                        return Err(enoent());
                    }
                    return Ok(Node::HistoryVersion(k, id, name.to_string()));
                }
                _ => {}
            }
        }
        Err(FsError::new(libc::ENOTDIR))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        let node = self.resolve(parent, name)?;
        let ino = match &node {
            Node::Record(kind, id) => match self.store.get(*kind, id)? {
                // The inode of this version (its own: see versions.rs), counted as a lookup.
                Some(v) => {
                    let ino = self.record_ino(*kind, id, &v, true);
                    return Ok(self.record_attr(ino, *kind, &v));
                }
                // A record created and not stored yet.
                None => {
                    let ino = self.inodes.ino(&node);
                    let a = self.attr_of(ino, &node, None)?;
                    self.looked_up(ino);
                    return Ok(a);
                }
            },
            _ => self.inodes.ino(&node),
        };
        self.attr_of(ino, &node, None)
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let Some(node) = self.inodes.node(ino) else {
            // fstat of a descriptor whose name is gone: the file it still has.
            let _ = fh;
            return self
                .open_handle_attr(ino)
                .ok_or_else(|| FsError::new(libc::ENOENT));
        };
        self.attr_of(ino, &node, fh)
    }

    pub(super) fn attr_of(&self, ino: u64, node: &Node, fh: Option<u64>) -> FsResult<Attr> {
        let mut a = self.attr_of_node(ino, node, fh)?;
        if matches!(node, Node::Blob(_) | Node::Ingest(_)) {
            a.blksize = ATTACHMENT_BLKSIZE;
        }
        Ok(a)
    }

    pub(super) fn attr_of_node(&self, ino: u64, node: &Node, fh: Option<u64>) -> FsResult<Attr> {
        let ttl = self.opts.ttl;
        let file_perm = |p: u16| if self.opts.read_only { p & 0o555 } else { p };
        match node {
            Node::Root
            | Node::Dir(_)
            | Node::AttachDir
            | Node::HistoryRoot
            | Node::HistoryDir(_)
            | Node::HistoryRecord(..) => Ok(self.dir_attr(ino)),
            Node::Changes => {
                let j = self
                    .journal
                    .as_ref()
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let t = j.changes_time();
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    j.changes_len(),
                    (t, t),
                    0o444,
                    Duration::ZERO,
                ))
            }
            Node::HistoryVersion(k, id, v) => {
                let j = self
                    .journal
                    .as_ref()
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let (len, t) = j
                    .version_meta(*k, id, v)
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(self.attr(ino, FileKind::File, len, (t, t), 0o444, ttl))
            }
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
                // A superseded node id, or one page-cache readers hold, shows its version
                // whatever the store has now (even nothing).
                if let Some(a) = self.held_attr(ino, node) {
                    return Ok(a);
                }
                match self.store.get(*kind, id)? {
                    Some(v) => Ok(self.record_attr(ino, *kind, &v)),
                    None => match self.pending.lock().get(&(*kind, id.clone())) {
                        Some(&t) => Ok(self.attr(
                            ino,
                            FileKind::File,
                            0,
                            (t, t),
                            file_perm(0o644),
                            Duration::ZERO,
                        )),
                        // Removed meanwhile: an open descriptor still reads its version.
                        None => self
                            .open_handle_attr(ino)
                            .ok_or_else(|| FsError::new(libc::ENOENT)),
                    },
                }
            }
            Node::Scratch(..) => {
                let f = match fh.and_then(|f| self.handle(f)) {
                    Some(h) => match &*h.lock() {
                        Handle::Scratch { file, .. } => Some(file.clone()),
                        _ => None,
                    },
                    None => None,
                };
                match f.or_else(|| self.scratch_file(ino)) {
                    Some(f) => self.scratch_attr(ino, &f.lock()),
                    None => self
                        .open_handle_attr(ino)
                        .ok_or_else(|| FsError::new(libc::ENOENT)),
                }
            }
            Node::Blob(id) => {
                let listing = self.attach()?.listing()?;
                let b = listing.get(id).ok_or_else(|| FsError::new(libc::ENOENT))?;
                Ok(self.attr(
                    ino,
                    FileKind::File,
                    b.size,
                    (b.mtime, b.ctime),
                    0o444 & versions::file_mask(b.mode),
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
                    0o444 & versions::file_mask(sc.mode),
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
                    return Ok(self.attr(
                        ino,
                        FileKind::File,
                        data.len() as u64,
                        (*mtime, *mtime),
                        0o444,
                        Duration::ZERO,
                    ));
                }
                // .status is rendered from live counters: stat renders it and an open right
                // after reads that same rendering, so the size stat shows is what is read
                // (tar, cp and rsync trust it).
                let (data, mtime) = self.control_bytes(node, true);
                let size = data.len() as u64;
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
    /// The attributes a file still open shows once its name was unlinked or replaced
    /// (the kernel asks by inode, without the descriptor): the bytes an open descriptor
    /// still reads, nlink 0. Only asked when the name is gone, so the scan is rare.
    pub(super) fn open_handle_attr(&self, ino: u64) -> Option<Attr> {
        let open: Vec<Arc<Mutex<Handle>>> = self.handles.lock().values().cloned().collect();
        for h in open {
            let h = h.lock();
            match &*h {
                Handle::Scratch { ino: i, file } if *i == ino => {
                    return self.scratch_attr(ino, &file.lock()).ok();
                }
                Handle::Record { ino: i, data, .. } if *i == ino => {
                    let now = SystemTime::now();
                    let mut a = self.attr(
                        ino,
                        FileKind::File,
                        data.len() as u64,
                        (now, now),
                        0o644,
                        Duration::ZERO,
                    );
                    a.nlink = 0;
                    return Some(a);
                }
                _ => {}
            }
        }
        None
    }

    /// `.status` is rendered anew by a stat (`fresh`); an open within a second of the last
    /// rendering reads that rendering, so stat and read agree on its size.
    pub(super) fn control_bytes(&self, node: &Node, fresh: bool) -> (Arc<[u8]>, SystemTime) {
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
            Node::Errors => {
                self.note_skipped();
                (self.errors.render().into(), self.errors.changed())
            }
            _ => {
                let mut last = self.status_rendering.lock();
                let data = match &*last {
                    Some((at, d)) if !fresh && at.elapsed() < Duration::from_secs(1) => d.clone(),
                    _ => {
                        let d: Arc<[u8]> = self.render_status().into();
                        *last = Some((Instant::now(), d.clone()));
                        d
                    }
                };
                (data, self.started_wall)
            }
        }
    }

    /// fstat of a descriptor whose ingest finished: the blob it became, still a regular file.
    pub(super) fn finished_ingest_attr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let h = fh
            .and_then(|f| self.handle(f))
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let Handle::Ingest { state, .. } = &*h.lock() else {
            return Err(FsError::new(libc::ENOENT));
        };
        let st = state.lock();
        // Written again after it was stored: the new ingest, until it is stored too.
        if let Some(i) = &st.ingest {
            return Ok(self.attr(
                ino,
                FileKind::File,
                i.len(),
                (st.mtime, st.mtime),
                0o644,
                Duration::ZERO,
            ));
        }
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
}
