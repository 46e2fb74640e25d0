//! Changes by name: unlink and rename (an upsert of a scratch file's content, a re-key,
//! a relabel), each one atomic change in the store.

use super::*;

impl Core {
    pub fn unlink(&self, caller: Caller, parent: u64, name: &str) -> FsResult<()> {
        let path = self.path_of(parent, name);
        let r = self.unlink_inner(caller, parent, name);
        if r.is_ok() {
            self.dir_changed(parent);
        }
        if let Err(e) = &r {
            self.report(&path, "unlink", e);
        }
        r
    }

    pub(super) fn unlink_inner(&self, caller: Caller, parent: u64, name: &str) -> FsResult<()> {
        let node = self.resolve(parent, name)?;
        self.writable()?;
        match &node {
            Node::Record(kind, id) => {
                let had_pending = self.pending.lock().remove(&(*kind, id.clone())).is_some();
                if self.store.get(*kind, id)?.is_some() {
                    self.change_record(caller, *kind, id, || self.store.remove(*kind, id), gone)?;
                } else if !had_pending {
                    return Err(FsError::new(libc::ENOENT));
                }
            }
            Node::Scratch(..) => {
                if let Some(ino) = self.inodes.existing(&node) {
                    self.unlink_scratch(ino);
                }
            }
            Node::Label(label) => {
                let hex = self.blob_of(&node)?.map(|id| to_hex(&id));
                self.attach()?.unlabel(label)?;
                if let Some(hex) = hex {
                    self.attachment_changed(caller, &hex, "update", None);
                }
            }
            Node::Ingest(n) => {
                let st = self.ingests.lock().remove(n);
                if let Some(st) = st {
                    st.lock().unlinked = true;
                }
            }
            Node::Blob(_) | Node::Sidecar(_) => {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "attachment bytes leave only through garbage collection (.gc); rm a label to drop a name",
                ));
            }
            Node::Gc | Node::Status | Node::Errors => {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "control files cannot be removed",
                ));
            }
            Node::Changes | Node::HistoryVersion(..) => {
                return Err(FsError::refuse(
                    libc::EPERM,
                    "the change feed and earlier versions are read-only",
                ));
            }
            Node::Root
            | Node::Dir(_)
            | Node::AttachDir
            | Node::HistoryRoot
            | Node::HistoryDir(_)
            | Node::HistoryRecord(..) => return Err(FsError::new(libc::EISDIR)),
        }
        self.inodes.remove(&node);
        Ok(())
    }

    /// `ln -s <hex> attachments/<label>` labels an existing blob (DESIGN §7), so `cp -a`
    /// of a backup restores labels. Any other symlink: EPERM.
    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &str,
        target: &std::path::Path,
    ) -> FsResult<Attr> {
        let path = self.path_of(parent, name);
        let r = self.symlink_inner(caller, parent, name, target);
        if let Err(e) = &r {
            self.report(&path, "symlink", e);
        }
        r
    }

    fn symlink_inner(
        &self,
        caller: Caller,
        parent: u64,
        name: &str,
        target: &std::path::Path,
    ) -> FsResult<Attr> {
        check_name_len(name)?;
        let refuse = |why: String| Err(FsError::refuse(libc::EPERM, why));
        if parent != ATTACH_DIR || self.store.attachments().is_none() {
            return refuse("symlinks exist only in attachments/, as labels of blobs".into());
        }
        self.writable()?;
        let target = target.to_string_lossy();
        let Some(id) = parse_id(&target) else {
            return refuse(format!(
                "a label must point at a blob's name (64 hex digits), not {target:?}"
            ));
        };
        if !attachments::valid_label(name) {
            return refuse(format!("{name:?} cannot be an attachment label"));
        }
        attachments::check_new_label(name)?;
        if self.attach()?.listing()?.get(&id).is_none() {
            return Err(FsError::refuse(
                libc::ENOENT,
                format!("no attachment {target} to label"),
            ));
        }
        if self.attach()?.listing()?.label(name).is_some() {
            return Err(FsError::refuse(
                libc::EEXIST,
                format!("label {name:?} exists"),
            ));
        }
        self.attach()?.relabel(&target, None, name)?;
        self.attachment_changed(caller, &target, "update", Some(name));
        self.dir_changed(parent);
        let node = Node::Label(name.to_string());
        let ino = self.inodes.ino(&node);
        // The label exists now: a failure to read it back must not turn the call into a
        // refusal (a retry would then get EEXIST). Show it as just made.
        Ok(self.attr_of(ino, &node, None).unwrap_or_else(|_| {
            let now = SystemTime::now();
            self.attr(
                ino,
                FileKind::Symlink,
                target.len() as u64,
                (now, now),
                0o777,
                self.opts.ttl,
            )
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        caller: Caller,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<()> {
        let path = self.path_of(parent, name);
        let r = self.rename_inner(
            caller, parent, name, newparent, newname, noreplace, exchange,
        );
        if r.is_ok() {
            self.dir_changed(parent);
            self.dir_changed(newparent);
        }
        if let Err(e) = &r {
            self.report(
                &format!("{path} -> {}", self.path_of(newparent, newname)),
                "rename",
                e,
            );
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rename_inner(
        &self,
        caller: Caller,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<()> {
        check_name_len(newname)?;
        let node = self.resolve(parent, name)?;
        self.writable()?;
        if exchange {
            return Err(FsError::refuse(
                libc::EINVAL,
                "RENAME_EXCHANGE is not supported",
            ));
        }
        if parent != newparent {
            let movable = |p: u64| dir_kind(p).is_some_and(|k| self.serves(k)) || p == ATTACH_DIR;
            if movable(parent) && movable(newparent) {
                return Err(FsError::refuse(
                    libc::EXDEV,
                    "records and attachments cannot move between directories (each directory is its own collection)",
                ));
            }
            return Err(FsError::refuse(
                libc::EPERM,
                "the top-level names are fixed",
            ));
        }
        if !crate::store::collection::safe_name(newname) {
            return Err(FsError::refuse(
                libc::EINVAL,
                format!("{newname:?} is not a usable file name"),
            ));
        }
        // Only "no such name" means there is no target: a failure to read it must not let a
        // RENAME_NOREPLACE (or any rename) act as if the name were free.
        let target = match self.resolve(newparent, newname) {
            Ok(t) => Some(t),
            Err(e) if e.errno == libc::ENOENT => None,
            Err(e) => return Err(e),
        };
        if noreplace && target.is_some() {
            return Err(FsError::new(libc::EEXIST));
        }
        if target.as_ref() == Some(&node) {
            return Ok(());
        }
        if let Some(kind) = dir_kind(parent).filter(|k| self.serves(*k)) {
            let class = classify(&*self.store, kind, newname);
            if let Class::Invalid(reason) = &class {
                return Err(FsError::refuse(libc::EINVAL, reason.clone()));
            }
            let new_node = match (&node, class) {
                (Node::Record(_, from), Class::Record(to)) => {
                    if self.pending.lock().contains_key(&(kind, from.clone()))
                        && self.store.get(kind, from)?.is_none()
                    {
                        return Err(FsError::refuse(
                            libc::EBUSY,
                            "the record is still being written: close it before renaming",
                        ));
                    }
                    self.expect_change(caller, kind, from);
                    self.expect_change(caller, kind, &to);
                    let view = match self.store.rekey(kind, from, &to) {
                        Ok(v) => v,
                        Err(e) => {
                            self.changed(kind, from);
                            self.changed(kind, &to);
                            return Err(e.into());
                        }
                    };
                    if let Some(j) = &self.journal {
                        j.renamed(kind, from, &to, &view, caller.source());
                    }
                    self.drop_scratch_target(&target);
                    Node::Record(kind, to)
                }
                (Node::Record(_, from), Class::Scratch) => {
                    let bytes = self
                        .store
                        .get(kind, from)?
                        .map(|v| v.bytes.to_vec())
                        .unwrap_or_default();
                    // The bytes are durable in the scratch file before the record goes;
                    // if it cannot go, the scratch file is taken back.
                    let file = self.record_to_scratch(kind, newname, &bytes, || {
                        self.change_record(
                            caller,
                            kind,
                            from,
                            || self.store.remove(kind, from),
                            gone,
                        )
                    })?;
                    // The file that had the name on disk was replaced: its descriptors
                    // keep its bytes.
                    if let Some(t @ Node::Scratch(..)) = &target
                        && let Some(tino) = self.inodes.existing(t)
                    {
                        self.forget_scratch(tino);
                    }
                    let ino = self.inodes.ino(&node);
                    // A scratch file from now on: it shows no record version.
                    self.drop_version(ino);
                    self.scratch.lock().insert(ino, file);
                    Node::Scratch(kind, newname.to_string())
                }
                (Node::Scratch(..), Class::Record(to)) => {
                    let ino = self.inodes.ino(&node);
                    let file = self
                        .scratch_file(ino)
                        .ok_or_else(|| FsError::new(libc::ENOENT))?;
                    let data =
                        self.scratch_bytes(&mut file.lock(), self.store.max_record_bytes())?;
                    self.change_record(
                        caller,
                        kind,
                        &to,
                        || self.store.upsert(kind, &to, &data),
                        stored,
                    )?;
                    self.unlink_scratch(ino);
                    Node::Record(kind, to)
                }
                (Node::Scratch(..), Class::Scratch) => {
                    let ino = self.inodes.ino(&node);
                    let file = self
                        .scratch_file(ino)
                        .ok_or_else(|| FsError::new(libc::ENOENT))?;
                    // One rename on disk replaces the target (its descriptors keep its
                    // bytes), as here.
                    self.rename_scratch_file(&mut file.lock(), newname)?;
                    if let Some(t @ Node::Scratch(..)) = &target
                        && let Some(tino) = self.inodes.existing(t)
                    {
                        self.forget_scratch(tino);
                    }
                    Node::Scratch(kind, newname.to_string())
                }
                _ => return Err(FsError::new(libc::EINVAL)),
            };
            self.inodes.rename(&node, &new_node);
            if let Some(t) = target.filter(|t| *t != new_node) {
                self.inodes.remove(&t);
            }
            return Ok(());
        }
        if parent == ATTACH_DIR {
            if !attachments::valid_label(newname) {
                return Err(FsError::refuse(
                    libc::EPERM,
                    format!("{newname:?} names attachment bytes or metadata"),
                ));
            }
            attachments::check_new_label(newname)?;
            match &node {
                Node::Label(old) => {
                    let hex = String::from_utf8_lossy(&self.readlink(self.inodes.ino(&node))?)
                        .into_owned();
                    self.attach()?.relabel(&hex, Some(old), newname)?;
                    self.attachment_changed(caller, &hex, "update", Some(newname));
                }
                Node::Ingest(old) => {
                    // Never the table's lock and an ingest's at once (a commit takes them
                    // the other way round).
                    let st = self.ingests.lock().remove(old);
                    let st = st.ok_or_else(|| FsError::new(libc::ENOENT))?;
                    st.lock().name = newname.to_string();
                    self.ingests.lock().insert(newname.to_string(), st);
                    let new_node = Node::Ingest(newname.to_string());
                    self.inodes.rename(&node, &new_node);
                    return Ok(());
                }
                _ => {
                    return Err(FsError::refuse(
                        libc::EPERM,
                        "attachment bytes and metadata keep their names",
                    ));
                }
            }
            let new_node = Node::Label(newname.to_string());
            self.inodes.rename(&node, &new_node);
            return Ok(());
        }
        Err(FsError::refuse(
            libc::EPERM,
            "the top-level names are fixed",
        ))
    }

    pub(super) fn drop_scratch_target(&self, target: &Option<Node>) {
        if let Some(t @ Node::Scratch(..)) = target
            && let Some(ino) = self.inodes.existing(t)
        {
            self.unlink_scratch(ino);
        }
    }
}
