//! The directory store (trusty-mpm's and lash's files) behind the seam: `crate::store`
//! does the work; this file only says which of its operations answers which question.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::json;

use super::{AttachmentStore, Backend, ChangeSink, Kind, ListView, RecordView};
use crate::error::{Result, StoreError};
use crate::store::attachments::Ingest;
use crate::store::blob_index::Listing;
use crate::store::gc::{GcOptions, GcReport};
use crate::store::{Store, fingerprint, validate};

impl Backend for Store {
    fn backend_name(&self) -> &'static str {
        "directory"
    }

    fn location(&self) -> String {
        self.layout.root.display().to_string()
    }

    fn collections(&self) -> &'static [Kind] {
        &Kind::ALL
    }

    fn check_id(&self, kind: Kind, id: &str) -> Result<()> {
        validate::check_id(kind, id)
    }

    fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>> {
        Store::get(self, kind, id)
    }

    fn list(&self, kind: Kind) -> Result<ListView> {
        Store::list(self, kind)
    }

    fn count(&self, kind: Kind) -> usize {
        // Sessions and goals are counted on the parsed document, without a view per record.
        match self.doc(kind) {
            Ok(Some(d)) => d.addressable().count(),
            Ok(None) => Store::list(self, kind)
                .map(|v| v.records.len())
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView> {
        Store::upsert(self, kind, id, bytes)
    }

    fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        Store::remove(self, kind, id)
    }

    fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView> {
        Store::rekey(self, kind, from, to)
    }

    fn collection_error(&self, kind: Kind) -> Option<String> {
        Store::collection_error(self, kind)
    }

    fn max_record_bytes(&self) -> u64 {
        self.options.max_record_bytes
    }

    fn root_time(&self) -> SystemTime {
        std::fs::symlink_metadata(&self.layout.root)
            .ok()
            .and_then(|m| m.modified().ok())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn collection_time(&self, kind: Kind) -> SystemTime {
        let path = match kind {
            Kind::Sessions => &self.layout.sessions,
            Kind::Goals => &self.layout.goals,
            _ => &self.layout.conversations,
        };
        let t = std::fs::symlink_metadata(path)
            .ok()
            .and_then(|m| m.modified().ok());
        t.map_or_else(
            || Backend::root_time(self),
            |t| t.max(Backend::root_time(self)),
        )
    }

    fn shutdown(&self) -> Result<()> {
        self.manifest.fold()
    }

    fn state_dir(&self) -> PathBuf {
        self.layout.root.join(".agentmount")
    }

    fn access(&self) -> Option<super::Access> {
        let l = &self.layout;
        let metas: Vec<std::fs::Metadata> = [
            &l.root,
            &l.sessions,
            &l.goals,
            &l.conversations,
            &l.attachments,
        ]
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file() || m.is_dir())
        .collect();
        // The root first: a store not created yet shows what its parent would give it.
        match std::fs::symlink_metadata(&l.root) {
            Ok(_) => super::Access::of(&metas),
            Err(_) => None,
        }
    }

    fn statfs_path(&self) -> PathBuf {
        self.layout.root.clone()
    }

    fn attachments(&self) -> Option<&dyn AttachmentStore> {
        Some(self)
    }

    fn watch(self: Arc<Self>, sink: Arc<dyn ChangeSink>) -> Result<()> {
        let w = super::files_watch::Watcher::new(self, sink)
            .map_err(|e| StoreError::io("inotify on the store", e))?;
        std::thread::Builder::new()
            .name("agentmount-watch".into())
            .spawn(move || w.run())
            .map_err(|e| StoreError::io("start the store watcher", e))?;
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let l = &self.layout;
        let cs = &self.stats;
        let mut errs: serde_json::Map<String, serde_json::Value> = Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.dir_name().to_string(),
                    json!(Store::collection_error(self, *k)),
                )
            })
            .collect();
        // The manifest can be large (a row per attachment): report what the last write or
        // gc found rather than parse it for a status read.
        errs.insert("manifest".into(), json!(self.manifest.known_error()));
        json!({
            "backend": "directory",
            "store": {
                "root": l.root, "sessions": l.sessions, "goals": l.goals,
                "conversations": l.conversations, "attachments": l.attachments,
                "manifest": l.manifest, "lock": l.lock,
            },
            "cache": {
                "reloads": cs.reloads.load(Ordering::Relaxed),
                "hits": cs.hits.load(Ordering::Relaxed),
                "parse_errors": cs.parse_errors.load(Ordering::Relaxed),
            },
            "last_error": errs,
            "last_ingest": *self.last_ingest.lock(),
        })
    }
}

impl AttachmentStore for Store {
    fn listing(&self) -> Result<Arc<Listing>> {
        self.attachment_listing()
    }

    fn open_blob(&self, hex: &str) -> Result<File> {
        Store::open_blob(self, hex)
    }

    fn sidecar_bytes(&self, hex: &str) -> Result<(Vec<u8>, SystemTime)> {
        let path = self.attachments.sidecar_path(hex);
        let (data, fp) = fingerprint::read_with_fingerprint(&path)?
            .ok_or_else(|| StoreError::NotFound(format!("no sidecar {}", path.display())))?;
        Ok((data, fp.mtime()))
    }

    fn blob_meta(&self, hex: &str) -> Result<Option<(u64, SystemTime, SystemTime)>> {
        Ok(fingerprint::stat(&self.attachments.blob_path(hex))?
            .map(|fp| (fp.size, fp.mtime(), fp.ctime())))
    }

    fn begin_ingest(&self) -> Result<Ingest> {
        Store::begin_ingest(self)
    }

    fn finish_ingest(&self, ingest: Ingest, label: Option<&str>) -> Result<String> {
        Store::finish_ingest(self, ingest, label)
    }

    fn finish_put(&self, ingest: Ingest, hex: &str) -> Result<()> {
        Store::finish_put(self, ingest, hex)
    }

    fn put_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        Store::put_sidecar(self, hex, bytes)
    }

    fn import_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        Store::import_sidecar(self, hex, bytes)
    }

    fn intent(&self, hex: &str) -> Result<Option<bool>> {
        Ok(self.manifest.current()?.find(hex).map(|r| r.committed()))
    }

    fn set_intent(&self, hex: &str, state: Option<bool>) -> Result<()> {
        let _lock = self.lock.acquire()?;
        let ids: std::collections::HashSet<String> = [hex.to_string()].into();
        match state {
            None => self.manifest.forget(&ids),
            Some(committed) => {
                self.manifest.add_intent(hex, None)?;
                if committed {
                    self.manifest.commit(&ids)?;
                }
                Ok(())
            }
        }
    }

    fn relabel(&self, hex: &str, old: Option<&str>, label: &str) -> Result<()> {
        Store::relabel(self, hex, old, label)
    }

    fn unlabel(&self, label: &str) -> Result<()> {
        Store::unlabel(self, label)
    }

    fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        Store::gc(self, opts)
    }

    fn last_gc(&self) -> Option<GcReport> {
        Store::last_gc(self)
    }

    fn index_mode(&self) -> String {
        self.attachments.index.mode()
    }
}
