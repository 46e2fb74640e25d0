//! The backing store, usable with no mount at all: reload-checked collections, atomic
//! upserts under the writer lock, content-addressed attachments, the manifest, gc and fsck.

pub mod atomic;
pub mod attachments;
pub mod blob_index;
pub mod cached;
pub mod collection;
pub mod fingerprint;
pub mod fsck;
pub mod gc;
pub mod hash;
pub mod incremental;
pub mod manifest;
pub mod untrusted;
pub mod validate;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde_json::Value;

use self::atomic::WriterLock;
use self::attachments::{Attachments, Ingest};
use self::blob_index::Listing;
use self::cached::{CacheStats, CachedFile};
use self::collection::{Change, Doc, Record, Shape};
use self::fingerprint::Fingerprint;
use self::incremental::Source;
use self::manifest::Manifest;
use crate::error::{Result, StoreError};

pub use crate::backend::{Kind, ListView, RecordView};

/// Where each store file lives. Every path can be overridden, so other platforms' layouts mount.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    pub sessions: PathBuf,
    pub goals: PathBuf,
    pub conversations: PathBuf,
    pub attachments: PathBuf,
    pub manifest: PathBuf,
    pub lock: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Layout {
            sessions: root.join("session-manager/sessions.json"),
            goals: root.join("sm/goals.json"),
            conversations: root.join("sm"),
            attachments: root.join("attachments"),
            manifest: root.join("attachments/manifest.json"),
            lock: root.join(".agentmount.lock"),
            root,
        }
    }

    pub fn conversation_path(&self, id: &str) -> PathBuf {
        self.conversations.join(format!("conversation-{id}.json"))
    }

    /// The layout with the user's paths resolved once (symlinks in the store's root path
    /// are the user's choice); every entry below them is then checked as untrusted.
    pub fn resolved(self) -> Layout {
        let root = untrusted::trusted_path(&self.root);
        let under = |p: &Path| match p.strip_prefix(&self.root) {
            Ok(rel) => root.join(rel),
            Err(_) => untrusted::trusted_path(p),
        };
        Layout {
            sessions: under(&self.sessions),
            goals: under(&self.goals),
            conversations: under(&self.conversations),
            attachments: under(&self.attachments),
            manifest: under(&self.manifest),
            lock: under(&self.lock),
            root,
        }
    }

    /// The directories that hold store files (for temp clean-up and watching).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.sessions, &self.goals, &self.manifest]
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.push(self.conversations.clone());
        dirs.push(self.attachments.clone());
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// The default store: `$AGENTMOUNT_STORE`, else `$XDG_DATA_HOME/agentmount`, else
/// `~/.local/share/agentmount`.
pub fn default_store_dir() -> PathBuf {
    if let Some(s) = std::env::var_os("AGENTMOUNT_STORE").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x).join("agentmount");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/agentmount")
}

#[derive(Clone, Debug)]
pub struct Options {
    pub max_record_bytes: u64,
    pub lock_timeout: Duration,
    pub read_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_record_bytes: 16 << 20,
            lock_timeout: Duration::from_secs(10),
            read_only: false,
        }
    }
}

fn wrong_address(name: &str, hex: &str) -> StoreError {
    StoreError::NotPermitted(format!(
        "attachments/{name} holds only the bytes that hash to its name; these hash to {hex}"
    ))
}

/// The view of a record as the mount shows it: its presented bytes and its store file's
/// times.
fn view(id: &str, rec: &Record, fp: Option<Fingerprint>) -> RecordView {
    let (mtime, ctime) = fp
        .map(|f| (f.mtime(), f.ctime()))
        .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
    RecordView {
        id: id.to_string(),
        bytes: rec.bytes.clone(),
        mtime,
        ctime,
        mode: fp.map(|f| f.mode & 0o777),
    }
}

#[derive(Default, Debug)]
struct ConvFile(Option<Arc<Record>>);

fn parse_conv(bytes: Vec<u8>, _prev: Option<&ConvFile>) -> std::result::Result<ConvFile, String> {
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.is_object() {
        return Err("a conversation must be a JSON object".into());
    }
    Ok(ConvFile(Some(Arc::new(Record::new(String::new(), &v)))))
}

fn parse_sessions(bytes: Vec<u8>, prev: Option<&Doc>) -> std::result::Result<Doc, String> {
    collection::parse_doc_owned(Shape::Map("sessions"), bytes, prev)
}

fn parse_goals(bytes: Vec<u8>, prev: Option<&Doc>) -> std::result::Result<Doc, String> {
    collection::parse_doc_owned(Shape::Array, bytes, prev)
}

pub struct Store {
    pub layout: Layout,
    pub options: Options,
    sessions: CachedFile<Doc>,
    goals: CachedFile<Doc>,
    conversations: Mutex<HashMap<String, Arc<CachedFile<ConvFile>>>>,
    conv_errors: Mutex<HashMap<String, String>>,
    pub manifest: Manifest,
    pub attachments: Attachments,
    /// Shared with the manifest, whose background fold takes it.
    pub lock: Arc<WriterLock>,
    pub stats: Arc<CacheStats>,
    gc_running: AtomicBool,
    last_gc: Mutex<Option<gc::GcReport>>,
    /// Per blob, the sidecar's bytes and mtime before our last rewrite of it (see
    /// `write_sidecar`).
    sidecar_undo: Mutex<HashMap<String, (Vec<u8>, SystemTime)>>,
    /// Where the last ingest's time went (`.status`).
    pub last_ingest: Mutex<Option<attachments::IngestPhases>>,
    /// Blobs whose bytes were checked against their name, with the fingerprint checked
    /// (bytes are hashed before they are first served: the store is untrusted).
    verified: Mutex<HashMap<String, Fingerprint>>,
}

impl Store {
    /// Opens a store. Nothing is created until the first write; stray temp files of ours
    /// whose process is gone are removed (unless read-only).
    pub fn open(layout: Layout, options: Options) -> Result<Store> {
        // The user's paths, resolved once: everything below them is checked as untrusted.
        let layout = layout.resolved();
        let stats = Arc::new(CacheStats::default());
        let lock = Arc::new(WriterLock::new(layout.lock.clone(), options.lock_timeout));
        let store = Store {
            sessions: CachedFile::new(layout.sessions.clone(), parse_sessions, stats.clone()),
            goals: CachedFile::new(layout.goals.clone(), parse_goals, stats.clone()),
            conversations: Mutex::new(HashMap::new()),
            conv_errors: Mutex::new(HashMap::new()),
            manifest: Manifest::new(
                layout.manifest.clone(),
                stats.clone(),
                lock.clone(),
                options.read_only,
            ),
            attachments: Attachments::new(layout.attachments.clone()),
            lock,
            stats,
            gc_running: AtomicBool::new(false),
            last_gc: Mutex::new(None),
            sidecar_undo: Mutex::new(HashMap::new()),
            last_ingest: Mutex::new(None),
            verified: Mutex::new(HashMap::new()),
            layout,
            options,
        };
        if !store.options.read_only {
            for p in store.remove_stray_temps()? {
                tracing::info!(path = %p.display(), "removed stray temp file left by a crashed writer");
            }
            store.manifest.fold_soon();
        }
        Ok(store)
    }

    /// Removes temp files of ours whose process is gone, in every store directory.
    pub fn remove_stray_temps(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut dirs = self.layout.dirs();
        let cas = self.attachments.cas_dir();
        if let Ok(rd) = untrusted::read_dir(&cas) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| cas.join(e.file_name())),
            );
        }
        for d in dirs {
            match atomic::remove_stray_temps(&d) {
                Ok(r) => removed.extend(r),
                // A directory planted as a symlink is skipped (and reported), not cleaned.
                Err(StoreError::Untrusted(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    fn single(&self, kind: Kind) -> Option<(&CachedFile<Doc>, Shape)> {
        match kind {
            Kind::Sessions => Some((&self.sessions, Shape::Map("sessions"))),
            Kind::Goals => Some((&self.goals, Shape::Array)),
            _ => None,
        }
    }

    fn conv_file(&self, id: &str) -> Arc<CachedFile<ConvFile>> {
        self.conversations
            .lock()
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(CachedFile::new(
                    self.layout.conversation_path(id),
                    parse_conv,
                    self.stats.clone(),
                ))
            })
            .clone()
    }

    fn conv_view(&self, id: &str) -> Result<Option<RecordView>> {
        let l = self.conv_file(id).current()?;
        {
            let mut errs = self.conv_errors.lock();
            match &l.error {
                Some(e) => {
                    errs.insert(id.to_string(), e.clone());
                }
                None => {
                    errs.remove(id);
                }
            }
        }
        Ok(l.value.0.as_ref().map(|r| view(id, r, l.fp)))
    }

    /// One record, reload-checked against the store (a stat when nothing changed).
    pub fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>> {
        if !Kind::ALL.contains(&kind) {
            return Ok(None);
        }
        match self.single(kind) {
            Some((file, _)) => {
                let l = file.current()?;
                Ok(l.value.get(id).map(|r| view(id, r, l.fp)))
            }
            None => {
                if !collection::safe_record_id(id) {
                    return Ok(None);
                }
                self.conv_view(id)
            }
        }
    }

    /// The parsed document of a single-file collection (sessions, goals), reload-checked;
    /// `None` for conversations. Records unchanged since the version before are the same
    /// `Arc`s, so comparing two versions costs a pointer compare per record.
    pub fn doc(&self, kind: Kind) -> Result<Option<Arc<Doc>>> {
        match self.single(kind) {
            Some((file, _)) => Ok(Some(file.current()?.value.clone())),
            None => Ok(None),
        }
    }

    /// Every addressable record of a collection, reload-checked.
    pub fn list(&self, kind: Kind) -> Result<ListView> {
        if !Kind::ALL.contains(&kind) {
            return Ok(ListView::default());
        }
        if let Some((file, _)) = self.single(kind) {
            let l = file.current()?;
            return Ok(ListView {
                records: l
                    .value
                    .addressable()
                    .map(|r| view(&r.id, r, l.fp))
                    .collect(),
                error: l.error.clone(),
            });
        }
        let mut ids = Vec::new();
        let dir = &self.layout.conversations;
        match untrusted::read_dir(dir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(id) = name
                        .strip_prefix("conversation-")
                        .and_then(|n| n.strip_suffix(".json"))
                        && collection::safe_record_id(id)
                        && !name.contains(atomic::TEMP_MARKER)
                    {
                        // A symlink, FIFO or device planted as a conversation is skipped
                        // (and reported), never opened.
                        match e.file_type() {
                            Ok(t) if t.is_file() => ids.push(id.to_string()),
                            Ok(t) => {
                                untrusted::skip_entry(&dir.join(&name), &t);
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(untrusted::store_error(dir, "read dir", e)),
        }
        ids.sort();
        {
            let keep: HashSet<&String> = ids.iter().collect();
            self.conversations.lock().retain(|k, _| keep.contains(k));
            self.conv_errors.lock().retain(|k, _| keep.contains(k));
        }
        let mut records = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(v) = self.conv_view(id)? {
                records.push(v);
            }
        }
        let error = self.collection_error(kind);
        Ok(ListView { records, error })
    }

    /// The current parse error of a collection, if a store file behind it does not parse.
    pub fn collection_error(&self, kind: Kind) -> Option<String> {
        if !Kind::ALL.contains(&kind) {
            return None;
        }
        match self.single(kind) {
            Some((file, _)) => file.current().ok().and_then(|l| l.error.clone()),
            None => {
                let errs = self.conv_errors.lock();
                let mut v: Vec<String> = errs
                    .iter()
                    .map(|(id, e)| format!("conversation {id}: {e}"))
                    .collect();
                v.sort();
                (!v.is_empty()).then(|| v.join("; "))
            }
        }
    }

    fn writable(&self) -> Result<()> {
        if self.options.read_only {
            return Err(StoreError::ReadOnly("the store is open read-only".into()));
        }
        Ok(())
    }

    /// Validates `bytes` as record `id` and upserts it: one atomic write of its store file.
    pub fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView> {
        self.writable()?;
        let obj = validate::parse_record(kind, id, bytes, self.options.max_record_bytes)?;
        let _lock = self.lock.acquire()?;
        let view = self.write_change(
            kind,
            Change::Upsert {
                id: id.to_string(),
                value: obj,
            },
        )?;
        let view = view.ok_or_else(|| {
            StoreError::NotFound(format!("{} {id} vanished after its write", kind.singular()))
        })?;
        self.commit_refs(&view.bytes)?;
        Ok(view)
    }

    /// Removes record `id`: one atomic write (sessions, goals) or an unlink (conversations).
    pub fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        self.writable()?;
        validate::check_id(kind, id)?;
        let _lock = self.lock.acquire()?;
        self.write_change(kind, Change::Remove { id: id.to_string() })?;
        Ok(())
    }

    /// Renames record `from` to `to` (replacing `to` if it exists), its `id` rewritten.
    pub fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView> {
        self.writable()?;
        validate::check_id(kind, to)?;
        if from == to {
            return self
                .get(kind, from)?
                .ok_or_else(|| StoreError::NotFound(format!("no {} {from}", kind.singular())));
        }
        let _lock = self.lock.acquire()?;
        let view = self.write_change(
            kind,
            Change::Rekey {
                from: from.to_string(),
                to: to.to_string(),
            },
        )?;
        view.ok_or_else(|| {
            StoreError::NotFound(format!("{} {to} vanished after its write", kind.singular()))
        })
    }

    /// Applies one change under the (held) writer lock. Returns the view of the record the
    /// change leaves (none for a removal).
    fn write_change(&self, kind: Kind, change: Change) -> Result<Option<RecordView>> {
        tracing::debug!(collection = kind.dir_name(), change = %change.describe(), "write");
        if let Some((file, shape)) = self.single(kind) {
            let (l, _) = file.update(|cur| {
                let mut doc = collection::apply(shape, &cur.value, &change)?;
                let (bytes, spans) = collection::serialize_doc_spans(shape, &doc)?;
                // The written version knows its file, so the next external change to it is
                // parsed by difference (a copy: the bytes also go to the temp file).
                doc.source = Source::new(bytes.clone().into_boxed_slice(), spans);
                Ok(Some((bytes, doc, ())))
            })?;
            let id = match &change {
                Change::Upsert { id, .. } | Change::Remove { id } => id,
                Change::Rekey { to, .. } => to,
            };
            return Ok(l.value.get(id).map(|r| view(id, r, l.fp)));
        }
        match &change {
            Change::Upsert { id, value } => {
                let rec = Arc::new(Record::new(id.clone(), &Value::Object(value.clone())));
                let (l, _) = self
                    .conv_file(id)
                    .update(|_| Ok(Some((rec.bytes.to_vec(), ConvFile(Some(rec.clone())), ()))))?;
                Ok(l.value.0.as_ref().map(|r| view(id, r, l.fp)))
            }
            Change::Remove { id } => {
                let path = self.layout.conversation_path(id);
                let dir = untrusted::open_dir(&self.layout.conversations)
                    .map_err(|e| untrusted::store_error(&self.layout.conversations, "open", e))?;
                let name = format!("conversation-{id}.json");
                untrusted::unlink_in(&dir, &name).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => {
                        StoreError::NotFound(format!("no conversation {id}"))
                    }
                    _ => StoreError::io(format!("remove {}", path.display()), e),
                })?;
                atomic::fsync_dir(&self.layout.conversations)?;
                self.conv_file(id).forget();
                Ok(None)
            }
            Change::Rekey { from, to } => {
                let cur = self
                    .conv_view(from)?
                    .ok_or_else(|| StoreError::NotFound(format!("no conversation {from}")))?;
                if let Some(e) = self
                    .conv_file(from)
                    .current()?
                    .corrupt_error(&self.layout.conversation_path(from))
                {
                    return Err(e);
                }
                let value: Value = serde_json::from_slice(&cur.bytes)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let (src, dst) = (
                    self.layout.conversation_path(from),
                    self.layout.conversation_path(to),
                );
                let (src_name, dst_name) = (
                    format!("conversation-{from}.json"),
                    format!("conversation-{to}.json"),
                );
                let convs = &self.layout.conversations;
                let dir = untrusted::open_dir(convs)
                    .map_err(|e| untrusted::store_error(convs, "open", e))?;
                if value.get("id").is_some() {
                    // The record names itself: write it under the new name, then drop the old.
                    let moved = collection::with_id(value, to);
                    let rec = Arc::new(Record::new(to.clone(), &moved));
                    self.conv_file(to).update(|_| {
                        Ok(Some((rec.bytes.to_vec(), ConvFile(Some(rec.clone())), ())))
                    })?;
                    untrusted::unlink_in(&dir, &src_name)
                        .map_err(|e| StoreError::io(format!("remove {}", src.display()), e))?;
                } else {
                    untrusted::rename_in(&dir, &src_name, &dst_name).map_err(|e| {
                        StoreError::io(format!("rename {} -> {}", src.display(), dst.display()), e)
                    })?;
                }
                atomic::fsync_dir(&self.layout.conversations)?;
                self.conv_file(from).forget();
                self.conv_file(to).forget();
                self.conv_view(to)
            }
        }
    }

    /// Marks committed the intents of attachments that a just-written record references.
    fn commit_refs(&self, bytes: &[u8]) -> Result<()> {
        let mut refs = HashSet::new();
        collection::attachment_refs(bytes, &mut refs);
        if refs.is_empty() {
            return Ok(());
        }
        let n = self.manifest.commit(&refs)?;
        if n > 0 {
            tracing::info!(
                count = n,
                "committed attachment intents referenced by a record"
            );
        }
        Ok(())
    }

    // ---- attachments ----

    pub fn attachment_listing(&self) -> Result<Arc<Listing>> {
        self.attachments.listing()
    }

    /// Starts streaming a new attachment into the store.
    pub fn begin_ingest(&self) -> Result<Ingest> {
        self.writable()?;
        Ingest::create(&self.layout.attachments)
    }

    /// Finishes an ingest: write-ahead intent (durable before the bytes are visible), bytes
    /// moved into place unless identical bytes are there (dedupe), sidecar with `label`.
    /// Returns the hex id.
    pub fn finish_ingest(&self, ingest: Ingest, label: Option<&str>) -> Result<String> {
        self.finish_ingest_as(ingest, label, None)
    }

    /// A put by address (DESIGN §7): bytes written to `attachments/<hex>` must hash to
    /// `<hex>`. Identical bytes onto an existing blob change nothing (not even its sidecar);
    /// new bytes are stored like any ingest, without a label; any other bytes: EPERM.
    pub fn finish_put(&self, mut ingest: Ingest, expect: &str) -> Result<()> {
        self.writable()?;
        // Only bytes checked against their name count as "already there": a file planted
        // under the name is replaced by the right bytes.
        if self.check_blob(expect).is_ok() {
            let hex = ingest.digest()?;
            if hex != expect {
                return Err(wrong_address(expect, &hex));
            }
            return Ok(());
        }
        self.finish_ingest_as(ingest, None, Some(expect))
            .map(|_| ())
    }

    /// A sidecar written back (a restore): accepted when every field but `label` is what
    /// the store holds (those describe the bytes, which never change); its `label` is then
    /// given to this blob (taken from any other) and the bytes are stored as written, so
    /// the sidecar is the backup's byte for byte. Anything else: EPERM.
    pub fn put_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.writable()?;
        let path = self.attachments.sidecar_path(hex);
        let (cur, _) = fingerprint::read_with_fingerprint(&path)?
            .ok_or_else(|| StoreError::NotFound(format!("no sidecar for attachment {hex}")))?;
        let Some(label) = attachments::sidecar_restore(hex, &cur, bytes)? else {
            return Ok(());
        };
        self.store_sidecar_bytes(hex, label.as_deref(), bytes)
    }

    /// Writes blob `hex`'s sidecar as `bytes`, taking `label` (what they carry) from every
    /// other blob first.
    fn store_sidecar_bytes(&self, hex: &str, label: Option<&str>, bytes: &[u8]) -> Result<()> {
        let path = self.attachments.sidecar_path(hex);
        let _lock = self.lock.acquire()?;
        if let Some(l) = label {
            for b in self.attachments.listing()?.blobs() {
                let has = b.sidecar.as_ref().and_then(|s| s.label.as_deref()) == Some(l);
                if has && b.hex() != hex {
                    self.drop_label(&b.hex())?;
                }
            }
        }
        let fp = fingerprint::stat(&path)?;
        match atomic::replace_file(&path, bytes, fp)? {
            atomic::Replaced::Done(_) => {
                self.attachments.invalidate();
                Ok(())
            }
            atomic::Replaced::Raced => Err(StoreError::Again(format!(
                "{} changed while it was being rewritten",
                path.display()
            ))),
        }
    }

    fn finish_ingest_as(
        &self,
        mut ingest: Ingest,
        label: Option<&str>,
        expect: Option<&str>,
    ) -> Result<String> {
        self.writable()?;
        if let Some(l) = label {
            attachments::check_label(l)?;
        }
        let size = ingest.len();
        let (hex, head, tmp) = ingest.seal()?;
        if let Some(e) = expect
            && e != hex
        {
            return Err(wrong_address(e, &hex));
        }
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        let _lock = self.lock.acquire()?;
        ingest.phases.lock_ms = ms(t);
        let t = std::time::Instant::now();
        self.manifest.add_intent(&hex, None)?;
        ingest.phases.manifest_ms = ms(t);
        let t = std::time::Instant::now();
        let dest = self.attachments.blob_path(&hex);
        let shard = dest
            .parent()
            .unwrap_or(&self.layout.attachments)
            .to_path_buf();
        atomic::ensure_dir(&shard)?;
        // Identical bytes already there (checked against their name) are kept: dedupe.
        // Anything else at that name (a symlink, a special file, other bytes planted in the
        // store) is replaced by ours.
        if self.check_blob(&hex).is_err() {
            // Into the shard's descriptor, opened with no symlink on its path: a shard
            // swapped for a symlink meanwhile cannot receive our bytes elsewhere.
            let dir = untrusted::open_dir(&shard)
                .map_err(|e| untrusted::store_error(&shard, "open", e))?;
            ingest.rename_into(&dir, &hex).map_err(|e| {
                StoreError::io(format!("rename {} -> {}", tmp.display(), dest.display()), e)
            })?;
            dir.sync_all()
                .map_err(|e| StoreError::io(format!("fsync {}", shard.display()), e))?;
            // What we hashed is the inode our descriptor holds: only that counts as
            // checked (if another file took the temp name before the rename, it is not).
            if let Ok(fp) = ingest.fingerprint() {
                self.verified.lock().insert(hex.clone(), fp);
            }
        }
        ingest.phases.rename_ms = ms(t);
        let t = std::time::Instant::now();
        let mut phases = ingest.finish_phases();
        drop(ingest);
        self.write_sidecar(&hex, |existing| {
            let mut m = match existing {
                Some(Value::Object(m)) => m.clone(),
                _ => attachments::new_sidecar(&hex, size, &head, label),
            };
            match label {
                Some(l) => m.insert("label".into(), Value::String(l.into())),
                None => m.shift_remove("label"),
            };
            Some(m)
        })?;
        phases.sidecar_ms = ms(t);
        phases.total_ms += phases.sidecar_ms;
        tracing::info!(hex = %hex, label = label.unwrap_or(""), bytes = size, ?phases, "ingested attachment");
        *self.last_ingest.lock() = Some(phases);
        Ok(hex)
    }

    /// Convenience: ingests bytes from a reader.
    pub fn ingest_reader(&self, mut r: impl io::Read, label: Option<&str>) -> Result<String> {
        let mut ing = self.begin_ingest()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| StoreError::io("read attachment source", e))?;
            if n == 0 {
                break;
            }
            ing.write_at(off, &buf[..n])?;
            off += n as u64;
        }
        self.finish_ingest(ing, label)
    }

    /// Rewrites a sidecar atomically (caller holds the writer lock). `f` gets the current
    /// value and returns the new one (`None`: leave it).
    ///
    /// The file keeps its final-newline convention (lash writes none), identical bytes are
    /// not rewritten, and a label removed and given back to the same blob (`cp -a` unlinks
    /// a label symlink before making it again) restores the sidecar's bytes and mtime, so
    /// a restore of an unchanged backup changes nothing.
    fn write_sidecar(
        &self,
        hex: &str,
        f: impl FnOnce(Option<&Value>) -> Option<serde_json::Map<String, Value>>,
    ) -> Result<()> {
        let path = self.attachments.sidecar_path(hex);
        let before = fingerprint::read_with_fingerprint(&path)
            .ok()
            .flatten()
            .map(|(b, _)| b);
        let cur = attachments::read_sidecar_value(&path);
        let Some(new) = f(cur.as_ref().map(|(v, _)| v)) else {
            return Ok(());
        };
        let mut bytes =
            serde_json::to_vec_pretty(&new).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if before.as_ref().is_none_or(|b| b.ends_with(b"\n")) {
            bytes.push(b'\n');
        }
        if before.as_deref() == Some(&bytes[..]) {
            return Ok(());
        }
        let prior_mtime = cur.as_ref().map(|(_, fp)| fp.mtime());
        let undo = self.sidecar_undo.lock().remove(hex);
        match atomic::replace_file(&path, &bytes, cur.map(|(_, fp)| fp))? {
            atomic::Replaced::Done(_) => {
                match undo {
                    Some((old, mtime)) if old == bytes => {
                        // The label came back: the sidecar is the one it was, time included.
                        let t = std::fs::FileTimes::new().set_modified(mtime);
                        if let Err(e) = untrusted::open_read(&path).and_then(|f| f.set_times(t)) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot restore the sidecar's mtime");
                        }
                    }
                    _ => {
                        if let (Some(old), Some(mtime)) = (before, prior_mtime) {
                            self.sidecar_undo
                                .lock()
                                .insert(hex.to_string(), (old, mtime));
                        }
                    }
                }
                Ok(())
            }
            atomic::Replaced::Raced => Err(StoreError::Again(format!(
                "{} changed while it was being rewritten",
                path.display()
            ))),
        }
    }

    /// Gives `label` to blob `hex`, taking it from every other blob, and (for a rename)
    /// dropping label `old` everywhere.
    pub fn relabel(&self, hex: &str, old: Option<&str>, label: &str) -> Result<()> {
        self.writable()?;
        attachments::check_label(label)?;
        let _lock = self.lock.acquire()?;
        let listing = self.attachments.listing()?;
        for b in listing.blobs() {
            let l = b.sidecar.as_ref().and_then(|s| s.label.as_deref());
            if b.hex() != hex && (l == Some(label) || (old.is_some() && l == old)) {
                self.drop_label(&b.hex())?;
            }
        }
        let size = listing.get_hex(hex).map(|b| b.size).unwrap_or(0);
        self.write_sidecar(hex, |v| {
            let mut m = match v {
                Some(Value::Object(m)) => m.clone(),
                _ => attachments::new_sidecar(hex, size, &[], Some(label)),
            };
            m.insert("label".into(), Value::String(label.into()));
            Some(m)
        })
    }

    /// Removes the `label` field of blob `hex`'s sidecar (caller holds the writer lock).
    fn drop_label(&self, hex: &str) -> Result<()> {
        self.write_sidecar(hex, |v| {
            v.and_then(Value::as_object).map(|m| {
                let mut m = m.clone();
                m.shift_remove("label");
                m
            })
        })
    }

    /// Sets blob `hex`'s sidecar to exactly `bytes` (a copy from another store), taking
    /// the label they carry from every other blob.
    pub fn import_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.writable()?;
        if !fingerprint::stat(&self.attachments.blob_path(hex))?.is_some_and(|f| f.is_regular()) {
            return Err(StoreError::NotFound(format!("no attachment {hex}")));
        }
        let path = self.attachments.sidecar_path(hex);
        if fingerprint::read_with_fingerprint(&path)
            .ok()
            .flatten()
            .is_some_and(|(b, _)| b == bytes)
        {
            return Ok(());
        }
        let label = crate::store::blob_index::sidecar_fields(bytes).and_then(|(l, _)| l);
        self.store_sidecar_bytes(hex, label.as_deref(), bytes)
    }

    /// Removes a label (the name only: bytes leave only through gc).
    pub fn unlabel(&self, label: &str) -> Result<()> {
        self.writable()?;
        let _lock = self.lock.acquire()?;
        let listing = self.attachments.listing()?;
        let mut found = false;
        for b in listing.blobs() {
            if b.sidecar.as_ref().and_then(|s| s.label.as_deref()) == Some(label) {
                found = true;
                self.drop_label(&b.hex())?;
            }
        }
        if !found {
            return Err(StoreError::NotFound(format!(
                "no attachment labelled {label:?}"
            )));
        }
        Ok(())
    }

    /// Opens blob `hex`'s bytes to serve them: a regular file (never a symlink or special
    /// file), whose bytes hash to its name the first time they are served (and again
    /// whenever its file changes).
    pub fn open_blob(&self, hex: &str) -> Result<fs::File> {
        self.verify_blob(hex, true)
    }

    /// Whether blob `hex`'s file holds exactly the bytes its name says (hashing it unless
    /// it was checked before and has not changed since).
    fn check_blob(&self, hex: &str) -> Result<fs::File> {
        self.verify_blob(hex, false)
    }

    /// `open_blob`; `capped`: a first hash waits for no other (a FUSE request must not
    /// queue behind a huge blob): EAGAIN while two others are being checked.
    fn verify_blob(&self, hex: &str, capped: bool) -> Result<fs::File> {
        use std::os::unix::fs::MetadataExt;
        static CHECKING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = self.attachments.blob_path(hex);
        let f =
            untrusted::open_read(&path).map_err(|e| untrusted::store_error(&path, "open", e))?;
        let m = f
            .metadata()
            .map_err(|e| StoreError::io(format!("fstat {}", path.display()), e))?;
        let fp = Fingerprint::of(&m);
        if self.verified.lock().get(hex) == Some(&fp) {
            return Ok(f);
        }
        // A sparse file (holes: no bytes we ever wrote look like that) is refused before it
        // is read: `truncate -s 1T` would otherwise cost a FUSE worker hours.
        if m.len() > 1 << 20 && m.blocks() * 512 + (1 << 20) < m.len() {
            let why = format!(
                "{} is sparse ({} bytes, {} allocated): not attachment bytes, not served",
                path.display(),
                m.len(),
                m.blocks() * 512
            );
            untrusted::skipped(&path, &why);
            return Err(StoreError::Untrusted(why));
        }
        struct Slot;
        impl Drop for Slot {
            fn drop(&mut self) {
                CHECKING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        let n = CHECKING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _slot = Slot;
        if capped && n >= 2 {
            return Err(StoreError::Again(format!(
                "{} is checked against its name before it is first served, and two other attachments are being checked now: try again",
                path.display()
            )));
        }
        let (got, _) = hash::hash_reader(&f)
            .and_then(|h| io::Seek::seek(&mut &f, io::SeekFrom::Start(0)).map(|_| h))
            .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
        if got != hex {
            let why = format!(
                "{} does not hash to its name (its bytes hash to {got}): not served",
                path.display()
            );
            untrusted::skipped(&path, &why);
            return Err(StoreError::Untrusted(why));
        }
        self.verified.lock().insert(hex.to_string(), fp);
        Ok(f)
    }

    pub fn last_gc(&self) -> Option<gc::GcReport> {
        self.last_gc.lock().clone()
    }
}
