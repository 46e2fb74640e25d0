//! Attachments in Postgres: bytes chunked into `agentmount_chunks` (streamed in with COPY,
//! out with a cursor, never whole in memory, hashed as they arrive), sidecars, labels and
//! the write-ahead manifest in tables; and each host's bounded local read cache
//! (`<cache>/<hex>`, least recently used evicted first). Cached bytes never go stale: a
//! blob's name is the hash of its bytes, which is checked when it is fetched.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use serde_json::{Map, Value, json};

use super::{Postgres, Stmts, Tx, col, pg_io, prepared, private_dir, schema};
use crate::backend::AttachmentStore;
use crate::error::{Result, StoreError};
use crate::store::attachments::{self, Ingest, IngestPhases};
use crate::store::blob_index::{self, Blob, Listing, SidecarInfo};
use crate::store::gc::{GcOptions, GcReport};
use crate::store::hash::Sha256;

/// The size of one stored chunk.
pub const CHUNK: usize = 1 << 20;

#[derive(Default)]
struct Lru {
    /// hex → (bytes, last use).
    entries: HashMap<String, (u64, u64)>,
    /// Found at startup: not known to have survived a crash whole (the cache is not
    /// fsynced), so each is hashed at its first use.
    unverified: HashSet<String>,
    total: u64,
    tick: u64,
}

pub(super) struct Blobs {
    dir: PathBuf,
    cap: u64,
    lru: Mutex<Lru>,
    listing: Mutex<Option<Arc<Listing>>>,
    /// Moves at every `stale()`: a listing loaded across a change is not kept.
    generation: AtomicU64,
    /// Set while the listener is connected and has resynchronised: the cached listing is
    /// dropped at every announced change, so it can be served without asking.
    pub trust_listing: AtomicBool,
    pub last_ingest: Mutex<Option<IngestPhases>>,
    last_gc: Mutex<Option<GcReport>>,
    hits: AtomicU64,
    fetches: AtomicU64,
    /// Ingests stored by streaming while they arrived.
    pub streamed: AtomicU64,
    /// Streams running now (each holds a connection of its own): at most `MAX_STREAMS`.
    streams: Arc<std::sync::atomic::AtomicUsize>,
    evictions: AtomicU64,
}

impl Blobs {
    pub fn new(dir: PathBuf, cap: u64) -> Result<Blobs> {
        private_dir(&dir)?;
        private_dir(&dir.join("tmp"))?;
        // Leftovers of fetches or ingests a crash interrupted (not those of another live
        // mount sharing this cache directory).
        if let Ok(rd) = fs::read_dir(dir.join("tmp")) {
            for e in rd.flatten() {
                // Only our own temp names, of a writer that is gone.
                let owner = crate::store::atomic::temp_owner_pid(&e.file_name().to_string_lossy());
                if owner.is_some_and(|pid| !crate::store::atomic::pid_alive(pid)) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let mut lru = Lru::default();
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !attachments::is_hex64(&name) {
                    continue;
                }
                if let Ok(m) = e.metadata() {
                    found.push((
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        name,
                        m.len(),
                    ));
                }
            }
        }
        found.sort();
        for (_, hex, size) in found {
            lru.tick += 1;
            lru.total += size;
            lru.unverified.insert(hex.clone());
            lru.entries.insert(hex, (size, lru.tick));
        }
        let b = Blobs {
            dir,
            cap,
            lru: Mutex::new(lru),
            listing: Mutex::default(),
            generation: AtomicU64::new(0),
            trust_listing: AtomicBool::new(false),
            last_ingest: Mutex::default(),
            last_gc: Mutex::default(),
            hits: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
            streams: Arc::default(),
            evictions: AtomicU64::new(0),
        };
        b.evict(None);
        Ok(b)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Drops the cached listing (a blob, sidecar or label changed).
    pub fn stale(&self) {
        let mut l = self.listing.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        *l = None;
    }

    /// Keeps a listing loaded while the generation was `generation`, unless a change was
    /// announced since (then it may already be old: the next access loads again).
    fn keep(&self, generation: u64, l: &Arc<Listing>) {
        let mut cur = self.listing.lock();
        if self.generation.load(Ordering::SeqCst) == generation {
            *cur = Some(l.clone());
        }
    }

    pub fn cached_listing(&self) -> Option<Arc<Listing>> {
        self.listing.lock().clone()
    }

    /// Whether the cached file of `hex` holds its bytes: known for files this process
    /// wrote or checked; a file from before (a crash may have left it short) is hashed
    /// once, and dropped if it does not match.
    fn check(&self, hex: &str, path: &std::path::Path) -> bool {
        if !self.lru.lock().unverified.contains(hex) {
            return true;
        }
        let ok = crate::store::untrusted::open_read(path)
            .and_then(crate::store::hash::hash_reader)
            .is_ok_and(|(got, _)| got == hex);
        let mut l = self.lru.lock();
        l.unverified.remove(hex);
        if !ok {
            tracing::warn!(
                hex,
                "a cached attachment does not hash to its name (a crash cut it short?); fetching it again"
            );
            let _ = fs::remove_file(path);
            if let Some((size, _)) = l.entries.remove(hex) {
                l.total -= size;
            }
        }
        ok
    }

    fn touch(&self, hex: &str) {
        let mut l = self.lru.lock();
        l.tick += 1;
        let t = l.tick;
        if let Some(e) = l.entries.get_mut(hex) {
            e.1 = t;
        }
    }

    fn admit(&self, hex: &str, size: u64) {
        {
            let mut l = self.lru.lock();
            l.tick += 1;
            let t = l.tick;
            l.unverified.remove(hex);
            if let Some(old) = l.entries.insert(hex.to_string(), (size, t)) {
                l.total -= old.0;
            }
            l.total += size;
        }
        self.evict(Some(hex));
    }

    /// Removes the least recently used files until the cache is within its bound (never
    /// `keep`, the one just used: a blob larger than the bound is still served, then
    /// evicted by the next).
    fn evict(&self, keep: Option<&str>) {
        let mut l = self.lru.lock();
        if l.total <= self.cap {
            return;
        }
        let mut order: Vec<(u64, String, u64)> = l
            .entries
            .iter()
            .filter(|(h, _)| Some(h.as_str()) != keep)
            .map(|(h, (s, t))| (*t, h.clone(), *s))
            .collect();
        order.sort();
        for (_, hex, size) in order {
            if l.total <= self.cap {
                break;
            }
            let _ = fs::remove_file(self.dir.join(&hex));
            l.entries.remove(&hex);
            l.total -= size;
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> Value {
        let l = self.lru.lock();
        json!({
            "dir": self.dir,
            "bytes": l.total,
            "files": l.entries.len(),
            "bound_bytes": self.cap,
            "over_bound": l.total > self.cap,
            "hits": self.hits.load(Ordering::Relaxed),
            "fetches": self.fetches.load(Ordering::Relaxed),
            "ingests_streamed": self.streamed.load(Ordering::Relaxed),
            "evictions": self.evictions.load(Ordering::Relaxed),
        })
    }
}

/// A sidecar's bytes as the directory store writes them: pretty JSON, keeping the final
/// newline convention of what was there (none was there: one).
fn sidecar_bytes_of(m: &Map<String, Value>, before: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if before.is_none_or(|b| b.ends_with(b"\n")) {
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// Takes `label` from every sidecar but `except`'s (their bytes rewritten without it).
fn drop_label_tx(tx: &mut Tx<'_>, stmts: &mut Stmts, label: &str, except: &str) -> Result<()> {
    const SQL: &str =
        "SELECT hex, body FROM agentmount_sidecars WHERE label = $1 AND hex <> $2 FOR UPDATE";
    let st = prepared(tx, stmts, SQL)?;
    let rows = tx.query(&st, &[&label, &except]).map_err(|e| pg_io(&e))?;
    for r in rows {
        let hex: String = col(&r, 0)?;
        let body: Vec<u8> = col(&r, 1)?;
        set_label_tx(tx, stmts, &hex, &body, None)?;
    }
    Ok(())
}

/// Rewrites sidecar `hex` (current bytes `body`) with `label` (or without a label).
fn set_label_tx(
    tx: &mut Tx<'_>,
    stmts: &mut Stmts,
    hex: &str,
    body: &[u8],
    label: Option<&str>,
) -> Result<()> {
    let mut m = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    match label {
        Some(l) => m.insert("label".into(), Value::String(l.into())),
        None => m.shift_remove("label"),
    };
    let bytes = sidecar_bytes_of(&m, Some(body))?;
    if bytes == body {
        return Ok(());
    }
    const SQL: &str = "UPDATE agentmount_sidecars SET body = $2, label = $3 WHERE hex = $1";
    let st = prepared(tx, stmts, SQL)?;
    tx.execute(&st, &[&hex, &bytes, &label])
        .map_err(|e| pg_io(&e))?;
    Ok(())
}

fn sidecar_row(tx: &mut Tx<'_>, stmts: &mut Stmts, hex: &str) -> Result<Option<Vec<u8>>> {
    const SQL: &str = "SELECT body FROM agentmount_sidecars WHERE hex = $1 FOR UPDATE";
    let st = prepared(tx, stmts, SQL)?;
    tx.query_opt(&st, &[&hex])
        .map_err(|e| pg_io(&e))?
        .map(|r| col(&r, 0))
        .transpose()
}

fn put_sidecar_tx(tx: &mut Tx<'_>, stmts: &mut Stmts, hex: &str, bytes: &[u8]) -> Result<()> {
    let label = blob_index::sidecar_fields(bytes).and_then(|(l, _)| l);
    if let Some(l) = &label {
        drop_label_tx(tx, stmts, l, hex)?;
    }
    const SQL: &str = "INSERT INTO agentmount_sidecars (hex, body, label) VALUES ($1, $2, $3)
         ON CONFLICT (hex) DO UPDATE SET body = EXCLUDED.body, label = EXCLUDED.label";
    let st = prepared(tx, stmts, SQL)?;
    tx.execute(&st, &[&hex, &bytes, &label])
        .map_err(|e| pg_io(&e))?;
    Ok(())
}

fn blob_exists(tx: &mut Tx<'_>, stmts: &mut Stmts, hex: &str) -> Result<bool> {
    const SQL: &str = "SELECT size FROM agentmount_blobs WHERE hex = $1 FOR KEY SHARE";
    let st = prepared(tx, stmts, SQL)?;
    Ok(tx.query_opt(&st, &[&hex]).map_err(|e| pg_io(&e))?.is_some())
}

fn wrong_address(name: &str, hex: &str) -> StoreError {
    StoreError::NotPermitted(format!(
        "attachments/{name} holds only the bytes that hash to its name; these hash to {hex}"
    ))
}

impl Postgres {
    /// Streams the bytes of `tmp` into the store as blob `hex` (inside `tx`).
    fn upload(
        tx: &mut Tx<'_>,
        stmts: &mut Stmts,
        hex: &str,
        size: u64,
        tmp: &std::path::Path,
    ) -> Result<()> {
        const BLOB: &str = "INSERT INTO agentmount_blobs (hex, size) VALUES ($1, $2)";
        let st = prepared(tx, stmts, BLOB)?;
        tx.execute(&st, &[&hex, &(size as i64)])
            .map_err(|e| pg_io(&e))?;
        let mut f =
            File::open(tmp).map_err(|e| StoreError::io(format!("open {}", tmp.display()), e))?;
        let sink = tx
            .copy_in("COPY agentmount_chunks (hex, n, data) FROM STDIN (FORMAT binary)")
            .map_err(|e| pg_io(&e))?;
        let mut w = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::INT4, Type::BYTEA]);
        let mut buf = vec![0u8; CHUNK];
        let mut n: i32 = 0;
        loop {
            let got = crate::backend::read_full(&mut f, &mut buf)
                .map_err(|e| StoreError::io(format!("read {}", tmp.display()), e))?;
            if got == 0 {
                break;
            }
            let data: &[u8] = &buf[..got];
            w.write(&[&hex, &n, &data]).map_err(|e| pg_io(&e))?;
            n += 1;
            if got < CHUNK {
                break;
            }
        }
        w.finish().map_err(|e| pg_io(&e))?;
        Ok(())
    }

    fn finish_ingest_as(
        &self,
        mut ingest: Ingest,
        label: Option<&str>,
        expect: Option<&str>,
    ) -> Result<String> {
        if self.options.read_only {
            return Err(StoreError::ReadOnly("the mount is read-only".into()));
        }
        if let Some(l) = label {
            attachments::check_label(l)?;
        }
        let size = ingest.len();
        let (hex, head, tmp) = ingest.seal_as(false)?;
        if let Some(e) = expect
            && e != hex
        {
            return Err(wrong_address(e, &hex));
        }
        let t = std::time::Instant::now();
        let job = Finish {
            hex: hex.clone(),
            size,
            head,
            label: label.map(str::to_string),
        };
        let streamed = match ingest
            .tee
            .take()
            .and_then(|t| t.into_any().downcast::<Uploader>().ok())
        {
            Some(up) => up.finish(&job),
            None => None,
        };
        match streamed {
            Some(Ok(())) => self.blobs.streamed.fetch_add(1, Ordering::Relaxed),
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(hex = %hex, error = %e, "streaming the attachment in failed; storing it from the local copy");
                }
                self.write(|tx, stmts| finish_tx(tx, stmts, &job, Source::File(&tmp)))?;
                0
            }
        };
        ingest.phases.store_ms = t.elapsed().as_secs_f64() * 1e3;
        // The bytes are the store's now; the temp file becomes this host's cached copy.
        let cached = self.blobs.dir.join(&hex);
        {
            use std::os::unix::fs::PermissionsExt;
            // The cache is for the mounting user alone (DESIGN §5.3).
            let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600));
        }
        if fs::rename(&tmp, &cached).is_ok() {
            self.blobs.admit(&hex, size);
        }
        self.blobs.stale();
        let phases = ingest.finish_phases();
        tracing::info!(hex = %hex, label = label.unwrap_or(""), bytes = size, ?phases, "ingested attachment into Postgres");
        *self.blobs.last_ingest.lock() = Some(phases);
        Ok(hex)
    }

    /// Fetches blob `hex` into the cache (hash checked) and returns its path.
    fn fetch(&self, hex: &str) -> Result<PathBuf> {
        const SQL: &str = "SELECT data FROM agentmount_chunks WHERE hex = $1 ORDER BY n";
        let dest = self.blobs.dir.join(hex);
        let tmp = self
            .blobs
            .dir
            .join("tmp")
            .join(crate::store::atomic::temp_name("fetch"));
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?
        };
        let result = (|| {
            let (mut h, mut size);
            let mut attempt = 0;
            loop {
                // A pooled connection the server dropped (a restart, an idle timeout) is
                // replaced once, as for every read; the partial copy starts over.
                h = Sha256::new();
                size = 0u64;
                out.set_len(0)
                    .and_then(|()| std::io::Seek::rewind(&mut out))
                    .map_err(|e| StoreError::io(format!("truncate {}", tmp.display()), e))?;
                let mut c = self.checkout()?;
                let r = (|| -> std::result::Result<std::io::Result<()>, postgres::Error> {
                    let st = c.stmt(SQL)?;
                    let mut rows = c.client.query_raw(&st, [&hex as &(dyn ToSql + Sync)])?;
                    while let Some(row) = rows.next()? {
                        let data: &[u8] = row.try_get(0)?;
                        h.update(data);
                        size += data.len() as u64;
                        if let Err(e) = out.write_all(data) {
                            return Ok(Err(e));
                        }
                    }
                    Ok(Ok(()))
                })();
                match r {
                    Ok(io) => {
                        self.checkin(c);
                        io.map_err(|e| StoreError::io(format!("write {}", tmp.display()), e))?;
                        break;
                    }
                    Err(e) if (e.is_closed() || c.client.is_closed()) && attempt == 0 => {
                        self.pool.lock().clear();
                        attempt += 1;
                    }
                    Err(e) => {
                        if c.client.is_closed() {
                            self.down(&super::describe(&e));
                        }
                        return Err(self.map_err(&e));
                    }
                }
            }
            let got = h.finish_hex();
            if size == 0 && got != hex {
                return Err(StoreError::NotFound(format!("no attachment {hex}")));
            }
            if got != hex {
                return Err(StoreError::Corrupt(format!(
                    "attachment {hex}: the stored chunks hash to {got}; not served"
                )));
            }
            fs::rename(&tmp, &dest).map_err(|e| {
                StoreError::io(format!("rename {} -> {}", tmp.display(), dest.display()), e)
            })?;
            self.blobs.fetches.fetch_add(1, Ordering::Relaxed);
            self.blobs.admit(hex, size);
            Ok(dest.clone())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub(super) fn load_listing(&self) -> Result<Arc<Listing>> {
        const SQL: &str = "SELECT b.hex, b.size, b.created_at, s.body, s.changed_at
             FROM agentmount_blobs b LEFT JOIN agentmount_sidecars s USING (hex)";
        let generation = self.blobs.generation.load(Ordering::SeqCst);
        let rows = self.read(|c| {
            let st = c.stmt(SQL)?;
            c.client.query(&st, &[])
        })?;
        let mut blobs = Vec::with_capacity(rows.len());
        let mut media: HashMap<String, Arc<str>> = HashMap::new();
        for r in rows {
            let hex: String = col(&r, 0)?;
            let Some(id) = blob_index::parse_id(&hex) else {
                continue;
            };
            let size: i64 = col(&r, 1)?;
            let created: SystemTime = col(&r, 2)?;
            let body: Option<Vec<u8>> = col(&r, 3)?;
            let changed: Option<SystemTime> = col(&r, 4)?;
            let sidecar = body.map(|b| {
                let (label, mt) = blob_index::sidecar_fields(&b)
                    .unwrap_or((None, "application/octet-stream".into()));
                let changed = changed.unwrap_or(created);
                let media_type = media.entry(mt.clone()).or_insert_with(|| mt.into()).clone();
                SidecarInfo {
                    label: label.map(Into::into),
                    media_type,
                    size: b.len() as u64,
                    mtime: changed,
                    ctime: changed,
                    mode: 0o644,
                }
            });
            blobs.push(Blob {
                id,
                size: size.max(0) as u64,
                mtime: created,
                ctime: created,
                mode: 0o644,
                sidecar,
            });
        }
        let l = Arc::new(Listing::from_blobs(blobs));
        self.blobs.keep(generation, &l);
        Ok(l)
    }

    fn import_sidecar_tx(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.write(|tx, stmts| {
            if !blob_exists(tx, stmts, hex)? {
                return Err(StoreError::NotFound(format!("no attachment {hex}")));
            }
            if sidecar_row(tx, stmts, hex)?.as_deref() == Some(bytes) {
                return Ok(());
            }
            put_sidecar_tx(tx, stmts, hex, bytes)
        })?;
        self.blobs.stale();
        Ok(())
    }
}

/// What the close of an ingest stores.
struct Finish {
    hex: String,
    size: u64,
    head: Vec<u8>,
    label: Option<String>,
}

/// Where the bytes of a finishing ingest are.
enum Source<'a> {
    /// In the local temp file: streamed in now.
    File(&'a std::path::Path),
    /// Already in `agentmount_chunks` under this staging key, in this transaction.
    Staged(&'a str),
}

/// The close of an ingest, inside one transaction: the write-ahead intent (an existing
/// uncommitted one gets a new grace: a collection running now waits for this row, then
/// sees it young), the bytes unless the store has them, the label and the sidecar.
fn finish_tx(tx: &mut Tx<'_>, stmts: &mut Stmts, job: &Finish, source: Source<'_>) -> Result<()> {
    let hex = job.hex.as_str();
    const INTENT: &str = "INSERT INTO agentmount_manifest (hex) VALUES ($1)
         ON CONFLICT (hex) DO UPDATE SET intent_at = clock_timestamp()
         WHERE agentmount_manifest.committed_at IS NULL";
    let st = prepared(tx, stmts, INTENT)?;
    tx.execute(&st, &[&hex]).map_err(|e| pg_io(&e))?;
    let exists = blob_exists(tx, stmts, hex)?;
    match source {
        Source::File(tmp) if !exists => Postgres::upload(tx, stmts, hex, job.size, tmp)?,
        Source::File(_) => {}
        Source::Staged(key) => {
            if !exists {
                const BLOB: &str = "INSERT INTO agentmount_blobs (hex, size) VALUES ($1, $2)";
                let st = prepared(tx, stmts, BLOB)?;
                tx.execute(&st, &[&hex, &(job.size as i64)])
                    .map_err(|e| pg_io(&e))?;
            }
            // Renamed to the hash (the chunk bytes are not copied), or dropped: identical
            // bytes are already there.
            let sql = if exists {
                "DELETE FROM agentmount_chunks WHERE hex = $1 AND $2 <> ''"
            } else {
                "UPDATE agentmount_chunks SET hex = $2 WHERE hex = $1"
            };
            tx.execute(sql, &[&key, &hex]).map_err(|e| pg_io(&e))?;
        }
    }
    let label = job.label.as_deref();
    if let Some(l) = label {
        drop_label_tx(tx, stmts, l, hex)?;
    }
    match sidecar_row(tx, stmts, hex)? {
        Some(body) => set_label_tx(tx, stmts, hex, &body, label)?,
        None => {
            let m = attachments::new_sidecar(hex, job.size, &job.head, label);
            put_sidecar_tx(tx, stmts, hex, &sidecar_bytes_of(&m, None)?)?;
        }
    }
    Ok(())
}

/// At most this many ingests stream at once per daemon (each holds a connection of its own
/// outside the pool); more are stored at close.
const MAX_STREAMS: usize = 2;

/// Counts a running stream; gives its place back when the stream ends.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    fn take(n: &Arc<std::sync::atomic::AtomicUsize>) -> Option<StreamSlot> {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            (v < MAX_STREAMS).then_some(v + 1)
        })
        .ok()
        .map(|_| StreamSlot(n.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Streaming starts once an ingest has this many bytes (smaller ones are stored at close
/// on a pooled connection: a connection and a thread of their own would cost more).
const STREAM_FROM: usize = 4 * CHUNK;

enum Msg {
    Chunk(Vec<u8>),
    Finish(Box<Finish>),
}

/// An ingest's bytes streamed into Postgres while they arrive ([`attachments::IngestTee`]):
/// gathered into 1 MiB chunks and handed (through a queue of a few chunks, so memory stays
/// bounded) to a thread holding one transaction with a `COPY` open under a staging key.
/// At close the chunks are renamed to the hash in that transaction, with the blob row,
/// intent and sidecar, and it commits: the close waits only for what had not arrived yet.
pub(super) struct Uploader {
    conn: super::Conninfo,
    slots: Arc<std::sync::atomic::AtomicUsize>,
    gathered: Vec<Vec<u8>>,
    buf: Vec<u8>,
    sent: u64,
    stream: Option<(
        std::sync::mpsc::SyncSender<Msg>,
        std::thread::JoinHandle<Result<()>>,
    )>,
}

impl Uploader {
    pub fn new(conn: super::Conninfo, slots: Arc<std::sync::atomic::AtomicUsize>) -> Uploader {
        Uploader {
            conn,
            slots,
            gathered: Vec::new(),
            buf: Vec::with_capacity(CHUNK),
            sent: 0,
            stream: None,
        }
    }

    fn send(&mut self, chunk: Vec<u8>) -> std::result::Result<(), String> {
        match &self.stream {
            Some((tx, _)) => tx
                .send(Msg::Chunk(chunk))
                .map_err(|_| "the streaming connection stopped".to_string()),
            None => {
                self.gathered.push(chunk);
                if self.gathered.len() * CHUNK < STREAM_FROM {
                    return Ok(());
                }
                let slot = StreamSlot::take(&self.slots)
                    .ok_or_else(|| format!("{MAX_STREAMS} ingests are streaming already"))?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4);
                let conn = self.conn.clone();
                let join = std::thread::Builder::new()
                    .name("ingest-stream".into())
                    .spawn(move || {
                        let _slot = slot;
                        stream(conn, rx)
                    })
                    .map_err(|e| format!("start the streaming thread: {e}"))?;
                for c in std::mem::take(&mut self.gathered) {
                    tx.send(Msg::Chunk(c))
                        .map_err(|_| "the streaming connection stopped".to_string())?;
                }
                self.stream = Some((tx, join));
                Ok(())
            }
        }
    }

    /// Stores the ingest through the stream: `None` when nothing was streamed (small, or
    /// the stream had stopped), so the caller stores it from the temp file.
    fn finish(mut self: Box<Self>, job: &Finish) -> Option<Result<()>> {
        let (tx, join) = self.stream.take()?;
        let rest = std::mem::take(&mut self.buf);
        if self.sent != job.size
            || (!rest.is_empty() && tx.send(Msg::Chunk(rest)).is_err())
            || tx
                .send(Msg::Finish(Box::new(Finish {
                    hex: job.hex.clone(),
                    size: job.size,
                    head: job.head.clone(),
                    label: job.label.clone(),
                })))
                .is_err()
        {
            drop(tx);
            return match join.join() {
                Ok(Err(e)) => Some(Err(e)),
                _ => None,
            };
        }
        drop(tx);
        Some(join.join().unwrap_or_else(|_| {
            Err(StoreError::io(
                "stream attachment",
                std::io::Error::other("the streaming thread panicked"),
            ))
        }))
    }
}

impl attachments::IngestTee for Uploader {
    fn push(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        self.sent += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
                self.send(full)?;
            }
        }
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// The streaming thread: one connection, one transaction, a `COPY` under a staging key
/// until the close says what the bytes are. A queue closed without that (the ingest was
/// abandoned) rolls everything back.
fn stream(conn: super::Conninfo, rx: std::sync::mpsc::Receiver<Msg>) -> Result<()> {
    let mut client = conn
        .connect()
        .map_err(|why| StoreError::io("Postgres", std::io::Error::other(why)))?;
    let mut tx = client.transaction().map_err(|e| pg_io(&e))?;
    tx.batch_execute("SET CONSTRAINTS agentmount_chunks_hex_fkey DEFERRED")
        .map_err(|e| pg_io(&e))?;
    let mut nonce = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| {
        StoreError::io(
            "stream attachment",
            std::io::Error::other("no random bytes for a staging key"),
        )
    })?;
    let key = format!("staging-{}", attachments::to_hex(&nonce));
    let job = {
        let sink = tx
            .copy_in("COPY agentmount_chunks (hex, n, data) FROM STDIN (FORMAT binary)")
            .map_err(|e| pg_io(&e))?;
        let mut w = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::INT4, Type::BYTEA]);
        let mut n: i32 = 0;
        loop {
            match rx.recv() {
                Ok(Msg::Chunk(c)) => {
                    let data: &[u8] = &c;
                    w.write(&[&key, &n, &data]).map_err(|e| pg_io(&e))?;
                    n += 1;
                }
                Ok(Msg::Finish(job)) => {
                    w.finish().map_err(|e| pg_io(&e))?;
                    break job;
                }
                Err(_) => return Ok(()),
            }
        }
    };
    let mut stmts = HashMap::new();
    finish_tx(&mut tx, &mut stmts, &job, Source::Staged(&key))?;
    tx.commit().map_err(|e| pg_io(&e))
}

impl AttachmentStore for Postgres {
    fn listing(&self) -> Result<Arc<Listing>> {
        if self.blobs.trust_listing.load(Ordering::Acquire)
            && let Some(l) = self.blobs.cached_listing()
        {
            return Ok(l);
        }
        match self.load_listing() {
            Ok(l) => Ok(l),
            Err(e @ StoreError::Io { .. }) => self.blobs.cached_listing().ok_or(e),
            Err(e) => Err(e),
        }
    }

    fn open_blob(&self, hex: &str) -> Result<File> {
        let path = self.blobs.dir.join(hex);
        if path.exists()
            && self.blobs.check(hex, &path)
            && let Ok(f) = crate::store::untrusted::open_read(&path)
        {
            self.blobs.hits.fetch_add(1, Ordering::Relaxed);
            self.blobs.touch(hex);
            return Ok(f);
        }
        let path = self.fetch(hex)?;
        crate::store::untrusted::open_read(&path)
            .map_err(|e| crate::store::untrusted::store_error(&path, "open", e))
    }

    fn sidecar_bytes(&self, hex: &str) -> Result<(Vec<u8>, SystemTime)> {
        const SQL: &str = "SELECT body, changed_at FROM agentmount_sidecars WHERE hex = $1";
        let row = self.read(|c| {
            let st = c.stmt(SQL)?;
            c.client.query_opt(&st, &[&hex])
        })?;
        match row {
            Some(r) => Ok((col(&r, 0)?, col(&r, 1)?)),
            None => Err(StoreError::NotFound(format!(
                "attachment {hex} has no sidecar"
            ))),
        }
    }

    fn blob_meta(&self, hex: &str) -> Result<Option<(u64, SystemTime, SystemTime)>> {
        const SQL: &str = "SELECT size, created_at FROM agentmount_blobs WHERE hex = $1";
        let row = self.read(|c| {
            let st = c.stmt(SQL)?;
            c.client.query_opt(&st, &[&hex])
        })?;
        row.map(|r| {
            let size: i64 = col(&r, 0)?;
            let t: SystemTime = col(&r, 1)?;
            Ok((size.max(0) as u64, t, t))
        })
        .transpose()
    }

    fn begin_ingest(&self) -> Result<Ingest> {
        if self.options.read_only {
            return Err(StoreError::ReadOnly("the mount is read-only".into()));
        }
        let mut ing = Ingest::create(&self.blobs.dir.join("tmp"))?;
        // While the server is away there is nothing to stream to: stored at close.
        if self.health.lock().down.is_none() {
            ing.tee = Some(Box::new(Uploader::new(
                self.conn.clone(),
                self.blobs.streams.clone(),
            )));
        }
        Ok(ing)
    }

    fn finish_ingest(&self, ingest: Ingest, label: Option<&str>) -> Result<String> {
        self.finish_ingest_as(ingest, label, None)
    }

    fn finish_put(&self, mut ingest: Ingest, hex: &str) -> Result<()> {
        if self.blob_meta(hex)?.is_some() {
            let got = ingest.digest()?;
            if got != hex {
                return Err(wrong_address(hex, &got));
            }
            return Ok(());
        }
        self.finish_ingest_as(ingest, None, Some(hex)).map(|_| ())
    }

    fn put_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.write(|tx, stmts| {
            let Some(cur) = sidecar_row(tx, stmts, hex)? else {
                return Err(StoreError::NotFound(format!(
                    "attachment {hex} has no sidecar"
                )));
            };
            match attachments::sidecar_restore(hex, &cur, bytes)? {
                None => Ok(()),
                Some(_) => put_sidecar_tx(tx, stmts, hex, bytes),
            }
        })?;
        self.blobs.stale();
        Ok(())
    }

    fn import_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.import_sidecar_tx(hex, bytes)
    }

    fn intent(&self, hex: &str) -> Result<Option<bool>> {
        const SQL: &str = "SELECT committed_at IS NOT NULL FROM agentmount_manifest WHERE hex = $1";
        let row = self.read(|c| {
            let st = c.stmt(SQL)?;
            c.client.query_opt(&st, &[&hex])
        })?;
        row.map(|r| col::<bool>(&r, 0)).transpose()
    }

    fn set_intent(&self, hex: &str, state: Option<bool>) -> Result<()> {
        self.write(|tx, _| {
            let r = match state {
                None => tx.execute("DELETE FROM agentmount_manifest WHERE hex = $1", &[&hex]),
                Some(committed) => tx.execute(
                    "INSERT INTO agentmount_manifest (hex, committed_at)
                     VALUES ($1, CASE WHEN $2 THEN clock_timestamp() END)
                     ON CONFLICT (hex) DO UPDATE SET committed_at = EXCLUDED.committed_at",
                    &[&hex, &committed],
                ),
            };
            r.map(|_| ()).map_err(|e| pg_io(&e))
        })
    }

    fn relabel(&self, hex: &str, old: Option<&str>, label: &str) -> Result<()> {
        attachments::check_label(label)?;
        self.write(|tx, stmts| {
            const SIZE: &str = "SELECT size FROM agentmount_blobs WHERE hex = $1 FOR KEY SHARE";
            let st = prepared(tx, stmts, SIZE)?;
            let Some(size) = tx
                .query_opt(&st, &[&hex])
                .map_err(|e| pg_io(&e))?
                .map(|r| col::<i64>(&r, 0))
                .transpose()?
            else {
                return Err(StoreError::NotFound(format!("no attachment {hex}")));
            };
            drop_label_tx(tx, stmts, label, hex)?;
            if let Some(o) = old {
                drop_label_tx(tx, stmts, o, hex)?;
            }
            match sidecar_row(tx, stmts, hex)? {
                Some(body) => set_label_tx(tx, stmts, hex, &body, Some(label)),
                None => {
                    let m = attachments::new_sidecar(hex, size.max(0) as u64, &[], Some(label));
                    put_sidecar_tx(tx, stmts, hex, &sidecar_bytes_of(&m, None)?)
                }
            }
        })?;
        self.blobs.stale();
        Ok(())
    }

    fn unlabel(&self, label: &str) -> Result<()> {
        self.write(|tx, stmts| {
            const SQL: &str =
                "SELECT hex, body FROM agentmount_sidecars WHERE label = $1 FOR UPDATE";
            let st = prepared(tx, stmts, SQL)?;
            let rows = tx.query(&st, &[&label]).map_err(|e| pg_io(&e))?;
            if rows.is_empty() {
                return Err(StoreError::NotFound(format!(
                    "no attachment labelled {label:?}"
                )));
            }
            for r in rows {
                let hex: String = col(&r, 0)?;
                let body: Vec<u8> = col(&r, 1)?;
                set_label_tx(tx, stmts, &hex, &body, None)?;
            }
            Ok(())
        })?;
        self.blobs.stale();
        Ok(())
    }

    /// One collection across every host: a transaction-level advisory lock (another host's
    /// run: EBUSY), writers paused by a SHARE lock on the records while the references are
    /// read and the orphans deleted, so a record committed anywhere either is seen by the
    /// mark or commits after the sweep.
    fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        if !opts.dry_run && self.options.read_only {
            return Err(StoreError::ReadOnly("the mount is read-only".into()));
        }
        let mut report = GcReport {
            started: chrono::Utc::now().to_rfc3339(),
            dry_run: opts.dry_run,
            grace: opts.grace_secs,
            ..Default::default()
        };
        let grace = opts.grace_secs as f64;
        let report = self.tx(|tx, _| {
            let got: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&schema::GC_LOCK])
                .map_err(|e| pg_io(&e))
                .and_then(|r| col(&r, 0))?;
            if !got {
                return Err(StoreError::Busy(
                    "a garbage collection is already running (on this or another host)".into(),
                ));
            }
            tx.batch_execute("LOCK TABLE agentmount_records IN SHARE MODE")
                .map_err(|e| pg_io(&e))?;
            let mut refs = HashSet::new();
            let mut rows = tx
                .query_raw(
                    "SELECT body FROM agentmount_records",
                    std::iter::empty::<&(dyn ToSql + Sync)>(),
                )
                .map_err(|e| pg_io(&e))?;
            while let Some(r) = rows.next().map_err(|e| pg_io(&e))? {
                let body: &str = col(&r, 0)?;
                crate::store::collection::attachment_refs(body.as_bytes(), &mut refs);
            }
            drop(rows);
            let intents = tx
                .query(
                    "SELECT m.hex, m.committed_at IS NOT NULL,
                            m.intent_at < clock_timestamp() - make_interval(secs => $1),
                            coalesce(b.size, 0)
                     FROM agentmount_manifest m LEFT JOIN agentmount_blobs b USING (hex)
                     ORDER BY m.hex FOR UPDATE OF m",
                    &[&grace],
                )
                .map_err(|e| pg_io(&e))?;
            let (mut commit, mut reclaim) = (Vec::new(), Vec::new());
            for r in intents {
                let hex: String = col(&r, 0)?;
                let committed: bool = col(&r, 1)?;
                let old: bool = col(&r, 2)?;
                let size: i64 = col(&r, 3)?;
                report.scanned += 1;
                if refs.contains(&hex) {
                    report.kept_referenced += 1;
                    if !committed {
                        commit.push(hex);
                    }
                    continue;
                }
                if committed {
                    continue;
                }
                if !old {
                    report.kept_young += 1;
                    continue;
                }
                report.reclaimed += 1;
                report.bytes_freed += size.max(0) as u64;
                report.reclaimed_ids.push(hex.clone());
                reclaim.push(hex);
            }
            if !opts.dry_run {
                tx.execute(
                    "UPDATE agentmount_manifest SET committed_at = clock_timestamp() WHERE hex = ANY($1)",
                    &[&commit],
                )
                .map_err(|e| pg_io(&e))?;
                tx.execute("DELETE FROM agentmount_blobs WHERE hex = ANY($1)", &[&reclaim])
                    .map_err(|e| pg_io(&e))?;
                tx.execute("DELETE FROM agentmount_manifest WHERE hex = ANY($1)", &[&reclaim])
                    .map_err(|e| pg_io(&e))?;
            }
            report.finished = chrono::Utc::now().to_rfc3339();
            Ok(report)
        })?;
        if !opts.dry_run {
            for hex in &report.reclaimed_ids {
                let _ = fs::remove_file(self.blobs.dir.join(hex));
            }
            self.blobs.stale();
        }
        tracing::info!(
            reclaimed = report.reclaimed,
            bytes = report.bytes_freed,
            dry_run = opts.dry_run,
            "garbage collection finished (cluster-wide)"
        );
        *self.blobs.last_gc.lock() = Some(report.clone());
        Ok(report)
    }

    fn last_gc(&self) -> Option<GcReport> {
        self.blobs.last_gc.lock().clone()
    }

    fn index_mode(&self) -> String {
        if self.blobs.trust_listing.load(Ordering::Relaxed) {
            "postgres: listing cached, dropped at every LISTEN/NOTIFY announcement".into()
        } else {
            "postgres: listing read at every access (the listener is not connected)".into()
        }
    }
}
