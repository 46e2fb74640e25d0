//! Control files and attributes: `.gc`'s report, `.status`, xattrs of attachments, statfs.

use super::*;

impl Core {
    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<(String, Vec<u8>)>> {
        let node = self
            .inodes
            .node(ino)
            .ok_or_else(|| FsError::new(libc::ENOENT))?;
        let Some(id) = self.blob_of(&node)? else {
            return Ok(Vec::new());
        };
        let listing = self.attach()?.listing()?;
        let mut out = vec![("user.sha256".to_string(), to_hex(&id).into_bytes())];
        if let Some(s) = listing.get(&id).and_then(|b| b.sidecar.as_ref()) {
            out.push(("user.media_type".into(), s.media_type.as_bytes().to_vec()));
            if let Some(l) = &s.label {
                out.push(("user.label".into(), l.as_bytes().to_vec()));
            }
        }
        Ok(out)
    }

    pub(super) fn gc_report(&self) -> Vec<u8> {
        let mut v = match self.store.attachments().and_then(|a| a.last_gc()) {
            Some(r) => serde_json::to_vec_pretty(&r).unwrap_or_default(),
            None => serde_json::to_vec_pretty(&json!({
                "last_run": null,
                "usage": crate::store::gc::USAGE,
            }))
            .unwrap_or_default(),
        };
        v.push(b'\n');
        v
    }

    pub fn render_status(&self) -> Vec<u8> {
        let fs = &self.stats;
        let attach = self.store.attachments();
        let (blobs, labels) = attach
            .and_then(|a| a.listing().ok())
            .map(|a| (a.len(), a.labels().len()))
            .unwrap_or((0, 0));
        let mut counts: serde_json::Map<String, serde_json::Value> = self
            .store
            .collections()
            .iter()
            .map(|k| (k.dir_name().to_string(), json!(self.store.count(*k))))
            .collect();
        if attach.is_some() {
            counts.insert("attachments".into(), json!(blobs));
            counts.insert("labels".into(), json!(labels));
        }
        counts.insert("scratch_files".into(), json!(self.scratch.lock().len()));
        counts.insert("open_handles".into(), json!(self.handles.lock().len()));
        counts.insert("inodes".into(), json!(self.inodes.len()));
        counts.insert("refusals".into(), json!(self.errors.total()));
        let mut v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "read_only": self.opts.read_only,
            "read_only_reason": self.store.read_only_reason(),
            "xattrs": self.opts.xattrs,
            "counts": counts,
            "untrusted_entries": untrusted_status(),
            "invalidation": {
                "external_changes": fs.external_changes.load(Ordering::Relaxed),
                "sent": fs.invalidations.load(Ordering::Relaxed),
                "failed": fs.invalidation_errors.load(Ordering::Relaxed),
                "inotify_overflows": fs.overflows.load(Ordering::Relaxed),
                "last_latency_us": fs.last_latency_us.load(Ordering::Relaxed),
                "max_latency_us": fs.max_latency_us.load(Ordering::Relaxed),
                "ttl_ms": self.opts.ttl.as_millis() as u64,
            },
        });
        if let (Some(o), serde_json::Value::Object(b)) = (v.as_object_mut(), self.store.status()) {
            o.extend(b);
            let mut path = serde_json::Map::new();
            path.insert("records".into(), json!("direct_io"));
            if let Some(a) = attach {
                path.insert(
                    "attachments".into(),
                    json!(self.attachment_data_path.lock().clone()),
                );
                o.insert("attachment_index".into(), json!(a.index_mode()));
            }
            o.insert("data_path".into(), serde_json::Value::Object(path));
            o.insert(
                "journal".into(),
                match &self.journal {
                    Some(j) => j.status(),
                    None => json!(self.journal_off.lock().clone()),
                },
            );
            o.insert("log".into(), self.log.lock().clone());
        }
        let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Moves the store entries skipped as untrusted (symlinks, FIFOs, devices, blobs that
    /// do not hash to their name) into `.errors`.
    pub(super) fn note_skipped(&self) {
        for (path, why) in crate::store::untrusted::take_skipped() {
            self.errors
                .push(&path.display().to_string(), "skip", libc::EIO, &why);
        }
    }

    pub fn statfs(&self) -> libc::statvfs {
        let mut dir = self.store.statfs_path();
        while !dir.exists() {
            if !dir.pop() {
                break;
            }
        }
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
            unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        }
        st
    }
}

/// `.status`' account of store entries skipped as untrusted input.
fn untrusted_status() -> serde_json::Value {
    let (total, recent) = crate::store::untrusted::skipped_summary();
    json!({
        "skipped": total,
        "recent": recent
            .iter()
            .map(|(p, why)| json!({"path": p, "reason": why}))
            .collect::<Vec<_>>(),
    })
}
