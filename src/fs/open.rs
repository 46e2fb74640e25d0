//! Open handles: what an open of each node gives (a record's snapshot, a scratch file,
//! a blob's file for passthrough, an ingest), create, and read.

use super::*;

impl Core {
    pub(super) fn handle(&self, fh: u64) -> Option<Arc<Mutex<Handle>>> {
        self.handles.lock().get(&fh).cloned()
    }

    pub(super) fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(Mutex::new(h)));
        fh
    }

    /// Runs `f` on the store file behind an open attachment (for kernel passthrough).
    pub fn with_blob_file<R>(&self, fh: u64, f: impl FnOnce(&File) -> R) -> Option<R> {
        let h = self.handle(fh)?;
        match &*h.lock() {
            Handle::Blob { file } => Some(f(file)),
            _ => None,
        }
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let list = Arc::new(self.dir_list(ino)?);
        Ok(self.add_handle(Handle::Dir { list }))
    }

    /// Opens a file. `write` and `trunc` come from the open flags.
    pub fn open(&self, ino: u64, write: bool, trunc: bool) -> FsResult<(u64, OpenMode)> {
        let (fh, mut mode) = self.open_inner(ino, write, trunc)?;
        mode.noflush = !write;
        Ok((fh, mode))
    }

    pub(super) fn open_inner(
        &self,
        ino: u64,
        write: bool,
        trunc: bool,
    ) -> FsResult<(u64, OpenMode)> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let path = self.path_of_ino(ino);
        if write && let Err(e) = self.writable() {
            self.report(&path, "open", &e);
            return Err(e);
        }
        let direct = OpenMode {
            direct_io: true,
            keep_cache: false,
            ..Default::default()
        };
        let refuse_write = |what: &str| -> FsResult<()> {
            if write {
                let e = FsError::refuse(libc::EPERM, format!("{what} cannot be written"));
                self.report(&path, "open", &e);
                return Err(e);
            }
            Ok(())
        };
        match node {
            Node::Record(kind, id) => {
                let current = if trunc {
                    None
                } else {
                    match self.store.get(kind, &id)? {
                        Some(v) => Some(v),
                        None if self.pending.lock().contains_key(&(kind, id.clone())) => None,
                        None => return Err(FsError::new(libc::ENOENT)),
                    }
                };
                let data = current
                    .as_ref()
                    .map(|v| v.bytes.to_vec())
                    .unwrap_or_default();
                // O_TRUNC changes the kernel's size of the inode even on a read-only open.
                let write = write || trunc;
                let how = self.record_open(ino, kind, &id, current.as_ref(), write);
                let cached = matches!(how, RecordOpen::Cached);
                let generation = match how {
                    RecordOpen::Direct { generation, .. } => generation,
                    _ => versions::FOREIGN,
                };
                let mode = match how {
                    RecordOpen::Stale => return Err(FsError::new(libc::ESTALE)),
                    RecordOpen::Cached => OpenMode {
                        direct_io: false,
                        keep_cache: true,
                        ..Default::default()
                    },
                    RecordOpen::Direct { attrs, .. } => {
                        // A size the kernel cached of another version would cut reads short
                        // or pad them: drop its attributes before the open returns (safe
                        // here: the kernel holds no lock an inode invalidation needs, and
                        // no reader's pages are on this inode).
                        let size = data.len() as u64;
                        let stale = match attrs {
                            DropAttrs::Always => true,
                            DropAttrs::IfSizeDiffers => {
                                !trunc
                                    && self.last_size.lock().get(&ino).is_some_and(|&s| s != size)
                            }
                            DropAttrs::Never => false,
                        };
                        let dropped = stale && self.inval.now(Inval::Inode(ino));
                        if stale {
                            self.last_size.lock().insert(ino, size);
                        }
                        if attrs == DropAttrs::Always && dropped {
                            self.pages_dropped(ino, &data);
                        }
                        direct
                    }
                };
                Ok((
                    self.add_handle(Handle::Record {
                        ino,
                        data,
                        dirty: trunc,
                        written: false,
                        refused: None,
                        writer: None,
                        for_write: write,
                        cached,
                        generation,
                    }),
                    mode,
                ))
            }
            Node::Scratch(..) => {
                let file = self
                    .scratch_file(ino)
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                {
                    let mut s = file.lock();
                    // The descriptor on disk is opened now, so this one keeps the bytes
                    // if the name goes.
                    self.scratch_fd(&mut s)?;
                    if trunc && !self.opts.read_only {
                        self.scratch_set_len(&mut s, 0, true)?;
                    }
                }
                Ok((self.add_handle(Handle::Scratch { ino, file }), direct))
            }
            Node::Blob(_) | Node::Label(_) if write => {
                // A put by address (cp -a of a backup): checked against the name at close.
                let id = self
                    .blob_of(&node)?
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let hex = to_hex(&id);
                let st = Arc::new(Mutex::new(IngestState {
                    name: hex.clone(),
                    ingest: Some(self.attach()?.begin_ingest()?),
                    mtime: SystemTime::now(),
                    unlinked: false,
                    done: None,
                    expect: Some(hex),
                    touched: trunc,
                    relabel_from: None,
                }));
                Ok((
                    self.add_handle(Handle::Ingest {
                        state: st,
                        for_write: true,
                        wrote: false,
                    }),
                    direct,
                ))
            }
            Node::Blob(_) | Node::Label(_) => {
                let id = self
                    .blob_of(&node)?
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let file = self.attach()?.open_blob(&to_hex(&id))?;
                Ok((
                    self.add_handle(Handle::Blob { file }),
                    OpenMode {
                        direct_io: false,
                        keep_cache: true,
                        passthrough: true,
                        ..Default::default()
                    },
                ))
            }
            Node::Sidecar(id) if write => {
                let hex = to_hex(&id);
                let data = if trunc {
                    Vec::new()
                } else {
                    self.attach()?.sidecar_bytes(&hex)?.0
                };
                Ok((self.add_handle(Handle::SidecarPut { hex, data }), direct))
            }
            Node::Sidecar(id) => {
                let (data, mtime) = self.attach()?.sidecar_bytes(&to_hex(&id))?;
                let data: Arc<[u8]> = data.into();
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Ingest(name) => {
                let st = self
                    .ingests
                    .lock()
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                if trunc && let Some(i) = st.lock().ingest.as_mut() {
                    i.truncate(0)?;
                }
                Ok((
                    self.add_handle(Handle::Ingest {
                        state: st,
                        for_write: write,
                        wrote: false,
                    }),
                    direct,
                ))
            }
            // Read-only opens of .gc see one report; writable ones run collections.
            Node::Gc if !write => {
                let (data, mtime) = self.control_bytes(&node, false);
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Gc => Ok((self.add_handle(Handle::Gc), direct)),
            Node::Status | Node::Errors => {
                refuse_write(&node.name())?;
                let (data, mtime) = self.control_bytes(&node, false);
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Changes => {
                refuse_write(".changes")?;
                Ok((self.add_handle(Handle::Changes), direct))
            }
            Node::HistoryVersion(k, id, v) => {
                refuse_write("an earlier version")?;
                let j = self
                    .journal
                    .as_ref()
                    .ok_or_else(|| FsError::new(libc::ENOENT))?;
                let (data, mtime) = j.read_version(k, &id, &v)?;
                let data: Arc<[u8]> = data.into();
                Ok((self.add_handle(Handle::Bytes { data, mtime }), direct))
            }
            Node::Root
            | Node::Dir(_)
            | Node::AttachDir
            | Node::HistoryRoot
            | Node::HistoryDir(_)
            | Node::HistoryRecord(..) => Err(FsError::new(libc::EISDIR)),
        }
    }

    /// Creates and opens a new file in a directory.
    pub fn create(&self, parent: u64, name: &str, mode: u32) -> FsResult<(Attr, u64, OpenMode)> {
        let path = self.path_of(parent, name);
        let r = self.create_inner(parent, name, mode);
        if let Err(e) = &r {
            self.report(&path, "create", e);
        }
        r
    }

    pub(super) fn create_inner(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
    ) -> FsResult<(Attr, u64, OpenMode)> {
        check_name_len(name)?;
        self.writable()?;
        if !crate::store::collection::safe_name(name) {
            return Err(FsError::refuse(
                libc::EINVAL,
                format!("{name:?} is not a usable file name"),
            ));
        }
        let direct = OpenMode {
            direct_io: true,
            keep_cache: false,
            ..Default::default()
        };
        let now = SystemTime::now();
        if let Some(kind) = dir_kind(parent).filter(|k| self.serves(*k)) {
            match classify(&*self.store, kind, name) {
                Class::Invalid(reason) => Err(FsError::refuse(libc::EINVAL, reason)),
                Class::Scratch => {
                    let node = Node::Scratch(kind, name.to_string());
                    // A file of that name made meanwhile is replaced (its descriptors keep
                    // its bytes).
                    if let Some(old) = self.inodes.existing(&node) {
                        self.forget_scratch(old);
                    }
                    let file = self.new_scratch(kind, name, mode)?;
                    let ino = self.inodes.ino(&node);
                    self.scratch.lock().insert(ino, file.clone());
                    self.dir_changed(parent);
                    let attr = self.attr_of(ino, &node, None)?;
                    Ok((attr, self.add_handle(Handle::Scratch { ino, file }), direct))
                }
                Class::Record(id) => {
                    if let Some(e) = self.store.collection_error(kind) {
                        return Err(FsError::refuse(
                            libc::EIO,
                            format!(
                                "{}: store file does not parse ({e}); writes refused until it is fixed",
                                kind.dir_name()
                            ),
                        ));
                    }
                    self.pending.lock().insert((kind, id.clone()), now);
                    self.dir_changed(parent);
                    let node = Node::Record(kind, id.clone());
                    let mut ino = self.inodes.ino(&node);
                    // A record another process made meanwhile, whose inode readers' pages
                    // hold: the writer gets the name's new inode (no retry needed here).
                    let unpend = || {
                        self.pending.lock().remove(&(kind, id.clone()));
                    };
                    if let RecordOpen::Stale = self.record_open(ino, kind, &id, None, true) {
                        ino = self.inodes.ino(&node);
                        if let RecordOpen::Stale = self.record_open(ino, kind, &id, None, true) {
                            unpend();
                            return Err(FsError::new(libc::ESTALE));
                        }
                    }
                    let exists = match self.attr_of(ino, &node, None) {
                        Ok(a) => a,
                        Err(e) => {
                            self.record_closed(ino, true, false, versions::FOREIGN);
                            unpend();
                            return Err(e);
                        }
                    };
                    // The kernel counts the entry a create returns as a lookup.
                    self.looked_up(ino);
                    let fh = self.add_handle(Handle::Record {
                        ino,
                        data: Vec::new(),
                        dirty: true,
                        written: false,
                        refused: None,
                        writer: None,
                        for_write: true,
                        cached: false,
                        generation: versions::FOREIGN,
                    });
                    Ok((exists, fh, direct))
                }
            }
        } else if parent == ATTACH_DIR {
            // A new `<hex>`: a put by address (a backup restored), checked at close.
            let expect = parse_id(name).map(|id| to_hex(&id));
            if expect.is_none() && !attachments::valid_label(name) {
                return Err(FsError::refuse(
                    libc::EPERM,
                    format!(
                        "{name:?} names attachment bytes or metadata, which are made only by the store"
                    ),
                ));
            }
            if expect.is_none() {
                // The name becomes the bytes' label at close.
                attachments::check_new_label(name)?;
            }
            let ingest = self.attach()?.begin_ingest()?;
            let node = Node::Ingest(name.to_string());
            let ino = self.inodes.ino(&node);
            let st = Arc::new(Mutex::new(IngestState {
                name: name.to_string(),
                ingest: Some(ingest),
                mtime: now,
                unlinked: false,
                done: None,
                expect,
                touched: true,
                relabel_from: None,
            }));
            self.ingests.lock().insert(name.to_string(), st.clone());
            self.dir_changed(parent);
            let attr = self.attr_of(ino, &node, None)?;
            let fh = self.add_handle(Handle::Ingest {
                state: st,
                for_write: true,
                wrote: false,
            });
            Ok((attr, fh, direct))
        } else {
            Err(FsError::refuse(
                libc::EPERM,
                "only records, scratch files and attachments can be created",
            ))
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh).ok_or_else(|| FsError::new(libc::EBADF))?;
        let h = h.lock();
        let slice = |d: &[u8]| {
            let start = (offset as usize).min(d.len());
            let end = start.saturating_add(size as usize).min(d.len());
            d[start..end].to_vec()
        };
        match &*h {
            Handle::Record { data, .. } => Ok(slice(data)),
            Handle::Bytes { data, .. } => Ok(slice(data)),
            Handle::SidecarPut { data, .. } => Ok(slice(data)),
            Handle::Changes => match &self.journal {
                Some(j) => Ok(j.read_changes(offset, size as usize)?),
                None => Ok(Vec::new()),
            },
            Handle::Scratch { file, .. } => self.scratch_read(&mut file.lock(), offset, size),
            Handle::Blob { file } => {
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    let n = file
                        .read_at(&mut buf[got..], offset + got as u64)
                        .map_err(|e| StoreError::io("read attachment", e))?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                buf.truncate(got);
                Ok(buf)
            }
            Handle::Ingest { state, .. } => {
                let st = state.lock();
                match (&st.ingest, &st.done) {
                    (Some(i), _) => Ok(i.read_at(offset, size as usize)?),
                    (None, Some(hex)) => {
                        let f = self.attach()?.open_blob(hex)?;
                        let mut buf = vec![0u8; size as usize];
                        let n = f
                            .read_at(&mut buf, offset)
                            .map_err(|e| StoreError::io("read attachment", e))?;
                        buf.truncate(n);
                        Ok(buf)
                    }
                    _ => Ok(Vec::new()),
                }
            }
            Handle::Gc => Ok(slice(&self.gc_report())),
            Handle::Dir { .. } => Err(FsError::new(libc::EISDIR)),
        }
    }
}
