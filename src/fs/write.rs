//! Writes: bytes into a record's buffer, a scratch file or an ingest; the commit at
//! flush/fsync/release (validated upsert, finished ingest, a `.gc` run).

use super::*;

/// What makes a descriptor's bytes commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// close(2) of one descriptor (FUSE flush), by the process with lock owner `owner`.
    Close { owner: u64 },
    /// fsync(2) or fdatasync(2).
    Fsync,
    /// The last descriptor went (FUSE release): what no close committed is committed now.
    Release,
}

impl Commit {
    /// The operation's name in `.errors` and the log.
    pub fn name(self) -> &'static str {
        match self {
            Commit::Close { .. } => "close",
            Commit::Fsync => "fsync",
            Commit::Release => "release",
        }
    }
}

impl Core {
    /// `owner`: the kernel's lock owner of the writing process (its file table), when told.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], owner: Option<u64>) -> FsResult<u32> {
        let h = self.handle(fh).ok_or_else(|| FsError::new(libc::EBADF))?;
        let r = self.write_inner(&h, offset, data, owner);
        if let Err(e) = &r {
            let ino = match &*h.lock() {
                Handle::Record { ino, .. } | Handle::Scratch { ino, .. } => *ino,
                Handle::Gc => 6,
                _ => 0,
            };
            self.report(&self.path_of_ino(ino), "write", e);
        }
        r
    }

    pub(super) fn write_inner(
        &self,
        h: &Arc<Mutex<Handle>>,
        offset: u64,
        data: &[u8],
        owner: Option<u64>,
    ) -> FsResult<u32> {
        let mut h = h.lock();
        let put = |buf: &mut Vec<u8>| {
            let end = offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[offset as usize..end].copy_from_slice(data);
        };
        match &mut *h {
            Handle::Record {
                data: buf,
                dirty,
                written,
                refused,
                writer,
                ..
            } => {
                *written = true;
                if owner.is_some() {
                    *writer = owner;
                }
                if let Some(errno) = *refused {
                    return Err(FsError::new(errno));
                }
                let limit = self.store.max_record_bytes();
                if offset + data.len() as u64 > limit {
                    // This descriptor's bytes can no longer be the record: its close
                    // reports the same errno and commits nothing.
                    *refused = Some(libc::EFBIG);
                    *dirty = false;
                    buf.clear();
                    return Err(FsError::refuse(
                        libc::EFBIG,
                        format!("record over the size limit of {limit} bytes"),
                    ));
                }
                put(buf);
                *dirty = true;
            }
            Handle::Scratch { file, .. } => self.scratch_write(&mut file.lock(), offset, data)?,
            Handle::Ingest { state, wrote, .. } => {
                let mut st = state.lock();
                if st.ingest.is_none() {
                    // Stored at an earlier close (a child's, another descriptor's): go on
                    // from the stored bytes, so the name ends up naming all that was written.
                    self.reingest(&mut st)?;
                }
                let Some(i) = st.ingest.as_mut() else {
                    return Err(FsError::new(libc::EIO));
                };
                i.write_at(offset, data)?;
                st.mtime = SystemTime::now();
                st.touched = true;
                *wrote = true;
            }
            Handle::SidecarPut { data: buf, .. } => put(buf),
            Handle::Gc => {
                drop(h);
                let text = String::from_utf8_lossy(data);
                let opts = GcOptions::parse_command(&text)?;
                let report = self.attach()?.gc(&opts)?;
                if !report.dry_run
                    && let Some(j) = &self.journal
                {
                    for hex in &report.reclaimed_ids {
                        j.attachment(hex, "delete", None, crate::journal::Source::Gc);
                    }
                }
            }
            _ => return Err(FsError::refuse(libc::EPERM, "this file cannot be written")),
        }
        Ok(data.len() as u32)
    }

    /// close(), fsync() and the last release: a record's bytes are validated and upserted; an attachment's
    /// are stored. The errno of a refusal comes back from the call that caused it.
    ///
    /// A close is a commit only when it comes from the process that wrote (its lock owner,
    /// which its threads share): a child that inherited the descriptor and closes it (a
    /// fork + exec in another thread closes its close-on-exec copies) must not commit a
    /// buffer the writer is still filling. Its bytes are committed at the writer's close,
    /// or at release.
    pub fn flush(&self, caller: Caller, fh: u64, event: Commit) -> FsResult<()> {
        let op = event.name();
        let Some(h) = self.handle(fh) else {
            return Ok(());
        };
        let mut guard = h.lock();
        match &mut *guard {
            Handle::Record {
                refused: Some(errno),
                ..
            } => Err(FsError::new(*errno)),
            Handle::Record { written: false, .. } if matches!(event, Commit::Close { .. }) => {
                Ok(())
            }
            Handle::Record {
                writer: Some(w), ..
            } if matches!(event, Commit::Close { owner } if owner != *w) => Ok(()),
            Handle::Record {
                ino, data, dirty, ..
            } if *dirty => {
                let ino = *ino;
                let path = self.path_of_ino(ino);
                let r = match self.inodes.node(ino) {
                    Some(Node::Record(kind, id)) => self
                        .change_record(
                            caller,
                            kind,
                            &id,
                            || self.store.upsert(kind, &id, data),
                            stored,
                        )
                        .map(|v| {
                            self.pending.lock().remove(&(kind, id));
                            self.last_size.lock().insert(ino, v.bytes.len() as u64);
                        }),
                    Some(Node::Scratch(..)) => match self.scratch_file(ino) {
                        Some(s) => self.scratch_replace(&mut s.lock(), data),
                        None => Ok(()),
                    },
                    // The name was unlinked while this descriptor was open: its bytes go
                    // nowhere, as on any POSIX filesystem.
                    _ => Ok(()),
                };
                match r {
                    Ok(()) => {
                        *dirty = false;
                        drop(guard);
                        // The kernel extended its size as the bytes were written; the record
                        // as stored may differ (pretty-printed): refresh its attributes.
                        self.inval.send(Inval::Inode(ino));
                        Ok(())
                    }
                    Err(e) => {
                        // The caller got the errno; the refused bytes are dropped, not retried
                        // (and reported again) at release.
                        *dirty = false;
                        self.report(&path, op, &e);
                        Err(e)
                    }
                }
            }
            Handle::Ingest {
                state,
                for_write,
                wrote,
            } => {
                let (state, for_write, wrote) = (state.clone(), *for_write, *wrote);
                drop(guard);
                let commit = match event {
                    // Nothing written through this descriptor: the shell's `open; dup2;
                    // close` before its write, or a close with nothing to say. The commit
                    // waits for a close that has bytes, or for the release.
                    Commit::Close { .. } => wrote,
                    Commit::Release => for_write && !self.other_ingest_writer(fh, &state),
                    Commit::Fsync => for_write,
                };
                if !commit {
                    return Ok(());
                }
                self.commit_ingest(caller, &state, op)
            }
            Handle::Scratch { file, .. } if event == Commit::Fsync => {
                let file = file.clone();
                drop(guard);
                self.scratch_sync(&file.lock())
            }
            Handle::SidecarPut { hex, data } => {
                let attach = self.attach()?;
                let label_of = || {
                    let listing = attach.listing().ok()?;
                    let sidecar = listing.get_hex(hex)?.sidecar.as_ref()?;
                    Some(sidecar.label.as_deref().map(str::to_string))
                };
                let before = label_of();
                let r = attach.put_sidecar(hex, data).map_err(FsError::from);
                match &r {
                    Err(e) => self.report(&format!("/attachments/{hex}.json"), op, e),
                    // A label given (or taken) by writing the sidecar back is a change like
                    // one given by a write or a symlink.
                    Ok(()) => {
                        if let (Some(before), Some(after)) = (before, label_of())
                            && after != before
                        {
                            self.attachment_changed(caller, hex, "update", after.as_deref());
                        }
                    }
                }
                r
            }
            _ => Ok(()),
        }
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        let ingest = match &*h.lock() {
            Handle::Ingest { state, .. } => Some(state.clone()),
            _ => None,
        };
        if let Some(state) = ingest {
            let last = !self.other_ingest_handle(fh, &state);
            let mut st = state.lock();
            if st.unlinked && last {
                // Its name went while it was open: the bytes go with the last descriptor.
                st.ingest = None;
            }
            if st.ingest.is_none() || st.unlinked {
                self.forget_ingest(&state, &st.name);
                if last {
                    self.inodes.remove(&Node::Ingest(st.name.clone()));
                }
            }
            return;
        }
        let h = h.lock();
        if let Handle::Record {
            ino,
            for_write,
            cached,
            generation,
            ..
        } = &*h
        {
            self.record_closed(*ino, *for_write, *cached, *generation);
            // A record created here whose bytes never made it into the store goes away.
            if let Some(Node::Record(kind, id)) = self.inodes.node(*ino) {
                // A handle busy in another request may be one of this record's: counted as
                // open (a placeholder left a moment longer), never as closed (its bytes would
                // then go nowhere).
                let still_open = self.handles.lock().values().any(|o| {
                    o.try_lock()
                        .is_none_or(|o| matches!(&*o, Handle::Record { ino: i, .. } if i == ino))
                });
                let pending = self.pending.lock().contains_key(&(kind, id.clone()));
                if pending && !still_open && self.store.get(kind, &id).ok().flatten().is_none() {
                    self.pending.lock().remove(&(kind, id.clone()));
                    self.inodes.remove(&Node::Record(kind, id.clone()));
                    self.inval
                        .send(Inval::Entry(kind_dir_ino(kind), format!("{id}.json")));
                }
            }
        }
    }

    /// Stores an ingest's bytes (its commit at close, fsync or release).
    fn commit_ingest(
        &self,
        caller: Caller,
        state: &Arc<Mutex<IngestState>>,
        op: &str,
    ) -> FsResult<()> {
        let mut st = state.lock();
        if st.unlinked || st.ingest.is_none() {
            // Unlinked while open: its bytes go nowhere (they stay readable through its
            // descriptors until the last is released).
            return Ok(());
        }
        let name = st.name.clone();
        if let Some(hex) = st.expect.clone().filter(|_| !st.touched) {
            // Opened for writing, neither written nor truncated: nothing changes.
            st.ingest = None;
            self.forget_ingest(state, &name);
            st.done = Some(hex);
            return Ok(());
        }
        let Some(ingest) = st.ingest.take() else {
            return Ok(());
        };
        self.forget_ingest(state, &name);
        // A put by address (`<hex>` written) changes nothing unless the bytes are new; any
        // other name becomes a label.
        let relabel_from = st.relabel_from.take();
        let stored = match st.expect.clone() {
            Some(hex) => self.attach()?.finish_put(ingest, &hex).map(|()| hex),
            None => {
                // Written again after it was stored: the label leaves the bytes it named
                // for the new ones (a label names one blob).
                if relabel_from.is_some() {
                    let _ = self.attach()?.unlabel(&name);
                }
                let r = self.attach()?.finish_ingest(ingest, Some(&name));
                if r.is_err()
                    && let Some(old) = &relabel_from
                {
                    let _ = self.attach()?.relabel(old, None, &name);
                }
                r
            }
        };
        match stored {
            Ok(hex) => {
                if st.expect.is_none() {
                    self.attachment_changed(caller, &hex, "create", Some(&name));
                }
                st.done = Some(hex);
                // The name is now a label symlink (or the blob): look it up again.
                self.inval.send(Inval::Entry(ATTACH_DIR, name));
                Ok(())
            }
            Err(e) => {
                let e = FsError::from(e);
                self.report(&format!("/attachments/{name}"), op, &e);
                st.done = None;
                self.inodes.remove(&Node::Ingest(name.clone()));
                self.inval.send(Inval::Entry(ATTACH_DIR, name));
                Err(e)
            }
        }
    }

    /// A write reached an ingest whose bytes were already stored (its first close came
    /// before the last write: a child process that wrote and exited, then its parent
    /// writing on): a new ingest starts from the stored bytes, and the next commit stores
    /// them all under the name.
    pub(super) fn reingest(&self, st: &mut IngestState) -> FsResult<()> {
        let Some(hex) = st.done.clone() else {
            return Err(FsError::refuse(
                libc::EIO,
                "this attachment was refused at an earlier close (see .errors); its descriptor takes no more bytes",
            ));
        };
        let attach = self.attach()?;
        let mut ingest = attach.begin_ingest()?;
        let blob = attach.open_blob(&hex)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = match blob.read_at(&mut buf, off) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io("read attachment", e).into()),
            };
            ingest.write_at(off, &buf[..n])?;
            off += n as u64;
        }
        if st.expect.is_none() {
            let listing = attach.listing()?;
            if listing.label(&st.name).is_some_and(|id| to_hex(id) == hex) {
                st.relabel_from = Some(hex);
            } else {
                // The name was removed or given to other bytes meanwhile: as for any file
                // written after its name went, these bytes go nowhere.
                st.unlinked = true;
            }
        }
        st.ingest = Some(ingest);
        st.mtime = SystemTime::now();
        Ok(())
    }

    /// Whether a descriptor other than `fh` is open on this ingest.
    fn other_ingest_handle(&self, fh: u64, state: &Arc<Mutex<IngestState>>) -> bool {
        self.ingest_handles(fh, state).0
    }

    /// Whether a descriptor other than `fh`, open for writing, shares this ingest.
    fn other_ingest_writer(&self, fh: u64, state: &Arc<Mutex<IngestState>>) -> bool {
        self.ingest_handles(fh, state).1
    }

    /// (any other descriptor, any other writer) on `state`. Locks each handle in turn, so
    /// it must be called holding neither a handle's lock nor `state`'s.
    fn ingest_handles(&self, fh: u64, state: &Arc<Mutex<IngestState>>) -> (bool, bool) {
        let open: Vec<(u64, Arc<Mutex<Handle>>)> = self
            .handles
            .lock()
            .iter()
            .filter(|(k, _)| **k != fh)
            .map(|(k, h)| (*k, h.clone()))
            .collect();
        let (mut any, mut writer) = (false, false);
        for (_, h) in open {
            if let Handle::Ingest {
                state: s,
                for_write,
                ..
            } = &*h.lock()
                && Arc::ptr_eq(s, state)
            {
                any = true;
                writer |= *for_write;
            }
        }
        (any, writer)
    }

    /// Takes an ingest's name out of the table of files being written, if it is still
    /// this ingest's (a new file may have been created under the name since).
    fn forget_ingest(&self, state: &Arc<Mutex<IngestState>>, name: &str) {
        let mut map = self.ingests.lock();
        if map.get(name).is_some_and(|s| Arc::ptr_eq(s, state)) {
            map.remove(name);
        }
    }
}
