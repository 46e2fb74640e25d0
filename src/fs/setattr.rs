//! setattr: truncation of what is being written, and chmod/chown/utimes, which the store
//! keeps none of (a change that changes nothing succeeds).

use super::*;

impl Core {
    pub fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> FsResult<Attr> {
        let path = self.path_of_ino(ino);
        let r = self.setattr_inner(caller, ino, fh, set);
        if let Err(e) = &r {
            self.report(&path, "setattr", e);
        }
        r
    }

    pub(super) fn setattr_inner(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> FsResult<Attr> {
        let SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = set;
        // A scratch file: by its name, or by a descriptor that outlived its name.
        let scratch = fh
            .and_then(|f| self.handle(f))
            .and_then(|h| match &*h.lock() {
                Handle::Scratch { file, .. } => Some(file.clone()),
                _ => None,
            })
            .or_else(|| self.scratch_file(ino));
        let node = match self.inodes.node(ino) {
            Some(n) => n,
            None if scratch.is_some() => Node::Scratch(Kind::Sessions, String::new()),
            None => return Err(FsError::new(libc::ENOENT)),
        };
        if let (Node::Scratch(..), Some(file)) = (&node, &scratch) {
            let (_, shown_uid, shown_gid) = self.shown_access();
            let changes_owner =
                uid.is_some_and(|u| u != shown_uid) || gid.is_some_and(|g| g != shown_gid);
            if changes_owner {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "the store keeps no owners: every file belongs to the mounting user",
                ));
            }
            if self.opts.read_only && (mode.is_some() || size.is_some()) {
                return Err(FsError::refuse(libc::EROFS, "the mount is read-only"));
            }
            let mut s = file.lock();
            // POSIX: a truncation that changes the size marks mtime and ctime; the file
            // on disk keeps mode and times, and moves its ctime with them.
            if let Some(n) = size {
                self.scratch_set_len(&mut s, n, false)?;
            }
            self.scratch_set_meta(&mut s, mode, atime, mtime)?;
            return self.scratch_attr(ino, &s);
        }
        let cur = self.attr_of(ino, &node, fh)?;
        let changes_owner = uid.is_some_and(|u| u != cur.uid) || gid.is_some_and(|g| g != cur.gid);
        // An attachment being written becomes immutable bytes shown 0444 once stored: the
        // mode a copy sets on it meanwhile (cp -p, rsync, a restore) is accepted, not kept.
        let changes_mode = mode.is_some_and(|m| (m & 0o7777) as u16 != cur.perm)
            && !matches!(node, Node::Ingest(_));
        let changes = changes_owner || changes_mode || size.is_some();
        if changes && self.opts.read_only {
            return Err(FsError::refuse(libc::EROFS, "the mount is read-only"));
        }
        if changes_owner {
            return Err(FsError::refuse(
                libc::EPERM,
                "the store keeps no owners: every file belongs to the mounting user",
            ));
        }
        if changes_mode {
            return Err(FsError::refuse(
                libc::EPERM,
                format!(
                    "the store keeps no modes: {} stays {:o}",
                    node.name(),
                    cur.perm
                ),
            ));
        }
        if let Some(n) = size {
            match &node {
                Node::Record(kind, id) => {
                    let h = fh.and_then(|f| self.handle(f));
                    let in_handle = h.as_ref().is_some_and(|h| {
                        if let Handle::Record {
                            data,
                            dirty,
                            written,
                            ..
                        } = &mut *h.lock()
                        {
                            data.resize(n as usize, 0);
                            *dirty = true;
                            *written = true;
                            true
                        } else {
                            false
                        }
                    });
                    if !in_handle {
                        // truncate(2) by path: the record as it would be, validated now.
                        let mut bytes = self
                            .store
                            .get(*kind, id)?
                            .map(|v| v.bytes.to_vec())
                            .unwrap_or_default();
                        if bytes.len() as u64 == n {
                            return Ok(cur);
                        }
                        bytes.resize(n as usize, 0);
                        // Readers' pages hold this inode: the kernel tries the new one.
                        self.record_truncate(ino, *kind, id)?;
                        let r = self.change_record(
                            caller,
                            *kind,
                            id,
                            || self.store.upsert(*kind, id, &bytes),
                            stored,
                        );
                        self.record_closed(ino, true, false, versions::FOREIGN);
                        r?;
                        self.inval.send(Inval::Inode(ino));
                    }
                }
                Node::Ingest(name) => {
                    // ftruncate: the descriptor's own ingest (even once stored); truncate(2)
                    // by name: the file being written under it.
                    let h = fh.and_then(|f| self.handle(f));
                    let mut h = h.as_ref().map(|h| h.lock());
                    let (st, wrote) = match h.as_deref_mut() {
                        Some(Handle::Ingest { state, wrote, .. }) => (state.clone(), Some(wrote)),
                        _ => {
                            let st = self.ingests.lock().get(name).cloned();
                            (st.ok_or_else(|| FsError::new(libc::ENOENT))?, None)
                        }
                    };
                    let mut st = st.lock();
                    if st.ingest.is_none() && wrote.is_some() {
                        self.reingest(&mut st)?;
                    }
                    let i = st.ingest.as_mut().ok_or_else(|| {
                        FsError::refuse(libc::EPERM, "attachment bytes cannot change")
                    })?;
                    i.truncate(n)?;
                    st.touched = true;
                    if let Some(w) = wrote {
                        *w = true;
                    }
                }
                Node::Gc => {}
                Node::Blob(_) | Node::Label(_) | Node::Sidecar(_) => {
                    return Err(FsError::refuse(
                        libc::EPERM,
                        "attachment bytes and metadata cannot change",
                    ));
                }
                Node::Status | Node::Errors => {
                    return Err(FsError::refuse(libc::EPERM, "this file cannot be written"));
                }
                _ => return Err(FsError::new(libc::EISDIR)),
            }
        }
        self.attr_of(ino, &node, fh)
    }
}
