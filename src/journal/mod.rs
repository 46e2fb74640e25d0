//! What changed, when, by whom (DESIGN §6), the same for every backend: each record's own
//! times, the change feed (`.changes`) and earlier versions (`.history/`).
//!
//! The journal keeps, for every record it has seen, the bytes it last saw, their SHA-256
//! and when they last changed. Whoever first sees a record's bytes differ from the known
//! ones (the backend's watcher, a getattr, our own write) records one change: a feed line
//! (after the store's commit, so no line is ever written for a change that did not
//! happen) and the earlier version under `history/`. Our own writes announce themselves
//! first (`expect`), so they are attributed to the writing process, never to "external".
//!
//! Kept beside the platform's files, never inside them (`Backend::state_dir`):
//! - `changes.jsonl`: the feed, appended a line at a time (no fsync: a crash may lose the
//!   last line, never the store's change), bounded to the newest `changes_max` lines;
//! - `times.jsonl`: every record's hash and times, written at mount, at each rotation of
//!   the feed and at unmount; the feed lines after it are replayed at the next mount;
//! - `history/<collection>/<id>/<version>`: earlier versions, names that sort by time,
//!   bounded per record and in total (the oldest go first).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::backend::{Backend, Kind, RecordView};
use crate::error::{Result, StoreError};
use crate::store::untrusted::{self, Beneath};

#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// Feed lines kept (the newest).
    pub changes_max: usize,
    /// Earlier versions kept per record.
    pub history_per_record: usize,
    /// Earlier versions kept in all.
    pub history_total: usize,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            changes_max: 100_000,
            history_per_record: 20,
            history_total: 10_000,
        }
    }
}

/// Who made a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A process writing through the mount (pid and uid from the kernel's request).
    Mount { pid: u32, uid: u32 },
    /// Another process or host, writing the store itself.
    External,
    /// A garbage collection.
    Gc,
}

/// Record times as persisted: (collection, id) -> (sha, mtime ns, ctime ns).
type Prior = HashMap<(Kind, String), (String, i128, i128)>;

struct Known {
    bytes: Arc<[u8]>,
    sha: String,
    mtime: SystemTime,
    ctime: SystemTime,
}

struct Inner {
    known: HashMap<(Kind, String), Known>,
    expect: HashMap<(Kind, String), Source>,
    seq: u64,
    /// Numbers earlier versions (their names end with it).
    vseq: u64,
    feed: File,
    feed_lines: usize,
    /// Every stored version: seq -> (collection, id, name), oldest first.
    versions: BTreeMap<u64, (Kind, String, String)>,
    per_record: HashMap<(Kind, String), VecDeque<(u64, String)>>,
}

pub struct Journal {
    dir: Beneath,
    opts: JournalOptions,
    inner: Mutex<Inner>,
}

fn sha(bytes: &[u8]) -> String {
    let mut h = crate::store::hash::Sha256::new();
    h.update(bytes);
    format!("sha256:{}", h.finish_hex())
}

/// Replaces a file of the journal's: a temp file renamed over it (old or new, never torn;
/// not fsynced: the journal may lose its newest state in a crash, the store never).
fn replace(dir: &Beneath, rel: &str, bytes: &[u8]) -> Result<()> {
    let tmp = format!("{rel}.tmp-{}", std::process::id());
    let err = |what: &str, e| untrusted::store_error(&dir.path().join(&tmp), what, e);
    let _ = dir.unlink(Path::new(&tmp));
    let mut f = dir
        .create_new(Path::new(&tmp), 0o600)
        .map_err(|e| err("create", e))?;
    f.write_all(bytes).map_err(|e| err("write", e))?;
    drop(f);
    dir.rename(Path::new(&tmp), Path::new(rel))
        .map_err(|e| err("rename", e))
}

fn ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn from_ns(n: i128) -> SystemTime {
    if n >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(n as u64)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_nanos((-n) as u64)
    }
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn kind_of(name: &str) -> Option<Kind> {
    [
        Kind::Sessions,
        Kind::Goals,
        Kind::Conversations,
        Kind::Agents,
        Kind::Delegations,
    ]
    .into_iter()
    .find(|k| k.dir_name() == name)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |e| StoreError::io(what, e)
}

/// Creates directories of the journal's (0700) below its directory.
fn mkdir(dir: &Beneath, rel: &Path) -> Result<()> {
    dir.mkdir_all(rel, 0o700)
        .map_err(|e| untrusted::store_error(&dir.path().join(rel), "create", e))
}

/// Lists a journal directory; empty when it cannot be read.
fn list(dir: &Beneath, rel: &Path) -> impl Iterator<Item = fs::DirEntry> {
    dir.read_dir(rel).into_iter().flatten().flatten()
}

const FEED: &str = "changes.jsonl";
const TIMES: &str = "times.jsonl";

impl Journal {
    /// Opens (or starts) the journal in `dir` and reconciles it with the store: records
    /// that changed while nothing watched are recorded as external changes now.
    ///
    /// The directory sits in a store others can write: it is used only when it is ours
    /// alone (see [`Beneath`]), and everything in it is reached through its descriptor.
    pub fn open(dir: PathBuf, opts: JournalOptions, store: &dyn Backend) -> Result<Journal> {
        let dir =
            Beneath::open_private(&dir).map_err(|e| untrusted::store_error(&dir, "open", e))?;
        mkdir(&dir, Path::new("history"))?;
        // Temp files of a process that crashed while replacing one of ours.
        for e in list(&dir, Path::new("")) {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = dir.unlink(Path::new(&e.file_name()));
            }
        }
        let feed_path = dir.path().join(FEED);
        // A line cut short by a crash is dropped: the feed ends at its last whole line.
        let mut lines = Vec::new();
        if let Ok(f) = dir.open_read(Path::new(FEED)) {
            let mut r = BufReader::new(f.take(untrusted::MAX_STORE_FILE_BYTES));
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = r
                    .read_until(b'\n', &mut buf)
                    .map_err(io(format!("read {}", feed_path.display())))?;
                if n == 0 || buf.last() != Some(&b'\n') {
                    break;
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    lines.push(v);
                }
            }
        }
        let whole: usize = {
            let mut n = 0;
            for v in &lines {
                n += serde_json::to_vec(v).map(|b| b.len() + 1).unwrap_or(0);
            }
            n
        };
        let feed = dir
            .open_append(Path::new(FEED), 0o600)
            .map_err(|e| untrusted::store_error(&feed_path, "open", e))?;
        let len = feed
            .metadata()
            .map_err(io(format!("stat {}", feed_path.display())))?
            .len() as usize;
        if len != whole && !lines.is_empty() {
            // Rewrite without the torn tail (serialised the same way, one per line).
            let mut out = Vec::new();
            for v in &lines {
                out.extend(serde_json::to_vec(v).unwrap_or_default());
                out.push(b'\n');
            }
            replace(&dir, FEED, &out)?;
        }
        let feed = dir
            .open_append(Path::new(FEED), 0o600)
            .map_err(|e| untrusted::store_error(&feed_path, "open", e))?;
        let seq = lines.last().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
        let j = Journal {
            dir,
            opts,
            inner: Mutex::new(Inner {
                known: HashMap::new(),
                expect: HashMap::new(),
                seq,
                vseq: 0,
                feed,
                feed_lines: lines.len(),
                versions: BTreeMap::new(),
                per_record: HashMap::new(),
            }),
        };
        j.load_history()?;
        let snapshot = j.load_times()?;
        j.reconcile(store, snapshot, &lines)?;
        j.save_times()?;
        Ok(j)
    }

    fn load_history(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        let root = Path::new("history");
        for c in list(&self.dir, root) {
            let Some(kind) = kind_of(&c.file_name().to_string_lossy()) else {
                continue;
            };
            for r in list(&self.dir, &root.join(c.file_name())) {
                let id = r.file_name().to_string_lossy().into_owned();
                let mut vs: Vec<String> = list(&self.dir, &root.join(c.file_name()).join(&id))
                    .filter(|v| v.file_type().is_ok_and(|t| t.is_file()))
                    .map(|v| v.file_name().to_string_lossy().into_owned())
                    .filter(|v| !v.starts_with('.'))
                    .collect();
                vs.sort();
                for v in vs {
                    let seq = v
                        .rsplit('-')
                        .next()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0);
                    inner.vseq = inner.vseq.max(seq);
                    inner.versions.insert(seq, (kind, id.clone(), v.clone()));
                    inner
                        .per_record
                        .entry((kind, id.clone()))
                        .or_default()
                        .push_back((seq, v));
                }
            }
        }
        Ok(())
    }

    /// The times snapshot: every record's hash and times, and the feed seq it is current to.
    fn load_times(&self) -> Result<Option<(u64, Prior)>> {
        let p = self.dir.path().join(TIMES);
        let Ok(f) = self.dir.open_read(Path::new(TIMES)) else {
            return Ok(None);
        };
        let f = f.take(untrusted::MAX_STORE_FILE_BYTES);
        let mut seq = 0;
        let mut map = HashMap::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(io(format!("read {}", p.display())))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(s) = v["seq"].as_u64() {
                seq = s;
                continue;
            }
            let (Some(k), Some(id), Some(h), Some(m), Some(c)) = (
                v["collection"].as_str().and_then(kind_of),
                v["id"].as_str(),
                v["sha"].as_str(),
                v["mtime_ns"].as_i64(),
                v["ctime_ns"].as_i64(),
            ) else {
                continue;
            };
            map.insert((k, id.to_string()), (h.to_string(), m as i128, c as i128));
        }
        Ok(Some((seq, map)))
    }

    /// Writes the times snapshot (temp file + rename).
    pub fn save_times(&self) -> Result<()> {
        let inner = self.inner.lock();
        let mut out = Vec::new();
        out.extend(serde_json::to_vec(&json!({"seq": inner.seq})).unwrap_or_default());
        out.push(b'\n');
        for ((k, id), kn) in &inner.known {
            let line = json!({
                "collection": k.dir_name(), "id": id, "sha": kn.sha,
                "mtime_ns": ns(kn.mtime) as i64, "ctime_ns": ns(kn.ctime) as i64,
            });
            out.extend(serde_json::to_vec(&line).unwrap_or_default());
            out.push(b'\n');
        }
        drop(inner);
        replace(&self.dir, TIMES, &out)?;
        Ok(())
    }

    fn reconcile(
        &self,
        store: &dyn Backend,
        snapshot: Option<(u64, Prior)>,
        lines: &[Value],
    ) -> Result<()> {
        let first = snapshot.is_none();
        let (snap_seq, mut prior) = snapshot.unwrap_or_default();
        // Changes recorded after the snapshot (the last session's, if it did not unmount
        // cleanly) bring the prior times up to date.
        for v in lines {
            if v["seq"].as_u64().is_none_or(|s| s <= snap_seq) {
                continue;
            }
            let (Some(k), Some(id)) =
                (v["collection"].as_str().and_then(kind_of), v["id"].as_str())
            else {
                continue;
            };
            let t = v["time"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| ns(SystemTime::from(t)))
                .unwrap_or(0);
            match (v["op"].as_str(), v["after"].as_str()) {
                (Some("rename"), after) => {
                    prior.remove(&(k, id.to_string()));
                    if let (Some(to), Some(a)) = (v["to"].as_str(), after) {
                        prior.insert((k, to.to_string()), (a.to_string(), t, t));
                    }
                }
                (_, Some(a)) => {
                    prior.insert((k, id.to_string()), (a.to_string(), t, t));
                }
                (_, None) => {
                    prior.remove(&(k, id.to_string()));
                }
            }
        }
        for kind in store.collections() {
            let list = store.list(*kind)?;
            for r in list.records {
                let h = sha(&r.bytes);
                let key = (*kind, r.id.clone());
                let (mtime, ctime, changed) = match prior.remove(&key) {
                    Some((ph, m, c)) if ph == h => (from_ns(m), from_ns(c), None),
                    Some((ph, _, _)) => {
                        let now = SystemTime::now();
                        (now, now, Some(("update", Some(ph))))
                    }
                    // The first mount takes the store's times as they are; later, a record
                    // never seen is new.
                    None if first => (r.mtime, r.ctime, None),
                    None => {
                        let now = SystemTime::now();
                        (now, now, Some(("create", None)))
                    }
                };
                if let Some((op, before)) = changed {
                    self.append(
                        *kind,
                        &r.id,
                        op,
                        None,
                        Source::External,
                        before.as_deref(),
                        Some(&h),
                        ctime,
                    )?;
                }
                self.inner.lock().known.insert(
                    key,
                    Known {
                        bytes: r.bytes.clone(),
                        sha: h,
                        mtime,
                        ctime,
                    },
                );
            }
        }
        for ((kind, id), (ph, _, _)) in prior {
            if store.collections().contains(&kind) {
                let now = SystemTime::now();
                self.append(
                    kind,
                    &id,
                    "delete",
                    None,
                    Source::External,
                    Some(&ph),
                    None,
                    now,
                )?;
            }
        }
        Ok(())
    }

    /// Appends one feed line. Caller must not hold `inner`.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        kind: Kind,
        id: &str,
        op: &str,
        to: Option<&str>,
        source: Source,
        before: Option<&str>,
        after: Option<&str>,
        time: SystemTime,
    ) -> Result<u64> {
        let mut v = json!({
            "seq": 0, "time": rfc3339(time), "collection": kind.dir_name(), "id": id,
            "op": op,
        });
        if let Some(to) = to {
            v["to"] = json!(to);
        }
        self.append_value(v, source, before, after)
    }

    fn append_value(
        &self,
        mut v: Value,
        source: Source,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<u64> {
        match source {
            Source::Mount { pid, uid } => {
                v["source"] = json!("mount");
                v["pid"] = json!(pid);
                v["uid"] = json!(uid);
            }
            Source::External => v["source"] = json!("external"),
            Source::Gc => v["source"] = json!("gc"),
        }
        v["before"] = json!(before);
        v["after"] = json!(after);
        let mut inner = self.inner.lock();
        inner.seq += 1;
        let seq = inner.seq;
        v["seq"] = json!(seq);
        let mut line = serde_json::to_vec(&v).map_err(|e| StoreError::Invalid(e.to_string()))?;
        line.push(b'\n');
        // One write(2) per line on an O_APPEND file: readers never see half a line.
        inner
            .feed
            .write_all(&line)
            .map_err(io("append to the change feed"))?;
        inner.feed_lines += 1;
        let rotate = inner.feed_lines > self.opts.changes_max + self.opts.changes_max / 10 + 1;
        drop(inner);
        if rotate {
            self.rotate()?;
        }
        Ok(seq)
    }

    /// Keeps the newest `changes_max` lines (and writes the times snapshot first, so no
    /// line needed to rebuild times is dropped).
    fn rotate(&self) -> Result<()> {
        self.save_times()?;
        let p = self.feed_path();
        let mut inner = self.inner.lock();
        let data = self
            .dir
            .read_bounded(Path::new(FEED), untrusted::MAX_STORE_FILE_BYTES)
            .map_err(|e| untrusted::store_error(&p, "read", e))?
            .map(|(d, _)| d)
            .unwrap_or_default();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(memchr::memchr_iter(b'\n', &data).map(|i| i + 1))
            .filter(|&i| i < data.len())
            .collect();
        let drop_n = starts.len().saturating_sub(self.opts.changes_max);
        let from = starts.get(drop_n).copied().unwrap_or(data.len());
        replace(&self.dir, FEED, &data[from..])?;
        inner.feed = self
            .dir
            .open_append(Path::new(FEED), 0o600)
            .map_err(|e| untrusted::store_error(&p, "open", e))?;
        inner.feed_lines = starts.len() - drop_n;
        tracing::info!(dropped = drop_n, "change feed rotated");
        Ok(())
    }

    pub fn feed_path(&self) -> PathBuf {
        self.dir.path().join(FEED)
    }

    /// Announces a change the current request is about to make (so whoever sees it first
    /// attributes it to this source).
    pub fn expect(&self, kind: Kind, id: &str, source: Source) {
        self.inner
            .lock()
            .expect
            .insert((kind, id.to_string()), source);
    }

    pub fn unexpect(&self, kind: Kind, id: &str) {
        self.inner.lock().expect.remove(&(kind, id.to_string()));
    }

    /// A record's times as the mount shows them, observing its current bytes: a change
    /// nobody recorded yet is recorded now.
    pub fn times(&self, kind: Kind, view: &RecordView) -> (SystemTime, SystemTime) {
        {
            let mut inner = self.inner.lock();
            if let Some(k) = inner.known.get_mut(&(kind, view.id.clone())) {
                if Arc::ptr_eq(&k.bytes, &view.bytes) {
                    return (k.mtime, k.ctime);
                }
                if k.bytes[..] == view.bytes[..] {
                    k.bytes = view.bytes.clone();
                    return (k.mtime, k.ctime);
                }
            }
        }
        self.observe(kind, &view.id, Some(view), false)
    }

    /// Records what a record is now (`None`: gone), if it differs from what was known.
    /// `own`: the writer of an announced change reporting it (a change announced and not
    /// yet reported is left to its writer, so it is recorded once, with its source).
    pub fn observe(
        &self,
        kind: Kind,
        id: &str,
        view: Option<&RecordView>,
        own: bool,
    ) -> (SystemTime, SystemTime) {
        let now = SystemTime::now();
        let key = (kind, id.to_string());
        let (before, source) = {
            let mut inner = self.inner.lock();
            let expected = if own {
                inner.expect.remove(&key)
            } else if inner.expect.contains_key(&key) {
                let t = inner
                    .known
                    .get(&key)
                    .map_or((now, now), |k| (k.mtime, k.ctime));
                return t;
            } else {
                None
            };
            let prev = inner.known.get(&key);
            match (prev, view) {
                (Some(k), Some(v)) if k.bytes[..] == v.bytes[..] => return (k.mtime, k.ctime),
                (None, None) => return (now, now),
                _ => {}
            }
            let source = expected.unwrap_or(Source::External);
            let before = inner.known.remove(&key).map(|k| (k.bytes, k.sha));
            if let Some(v) = view {
                inner.known.insert(
                    key.clone(),
                    Known {
                        bytes: v.bytes.clone(),
                        sha: sha(&v.bytes),
                        mtime: now,
                        ctime: now,
                    },
                );
            }
            (before, source)
        };
        let after = view.map(|v| sha(&v.bytes));
        let op = match (&before, view) {
            (None, _) => "create",
            (Some(_), Some(_)) => "update",
            (Some(_), None) => "delete",
        };
        if let Some((bytes, _)) = &before {
            self.keep_version(kind, id, bytes);
        }
        if let Err(e) = self.append(
            kind,
            id,
            op,
            None,
            source,
            before.as_ref().map(|(_, s)| s.as_str()),
            after.as_deref(),
            now,
        ) {
            tracing::warn!(error = %e, "cannot append to the change feed");
        }
        (now, now)
    }

    /// A re-key through the mount: one `rename` line.
    pub fn renamed(&self, kind: Kind, from: &str, to: &str, view: &RecordView, source: Source) {
        let now = SystemTime::now();
        let before = {
            let mut inner = self.inner.lock();
            inner.expect.remove(&(kind, from.to_string()));
            inner.expect.remove(&(kind, to.to_string()));
            let before = inner.known.remove(&(kind, from.to_string()));
            let replaced = inner.known.remove(&(kind, to.to_string()));
            inner.known.insert(
                (kind, to.to_string()),
                Known {
                    bytes: view.bytes.clone(),
                    sha: sha(&view.bytes),
                    mtime: now,
                    ctime: now,
                },
            );
            (before, replaced)
        };
        if let Some(r) = &before.1 {
            self.keep_version(kind, to, &r.bytes);
        }
        if let Some(b) = &before.0 {
            self.keep_version(kind, from, &b.bytes);
        }
        let after = sha(&view.bytes);
        if let Err(e) = self.append(
            kind,
            from,
            "rename",
            Some(to),
            source,
            before.0.as_ref().map(|k| k.sha.as_str()),
            Some(&after),
            now,
        ) {
            tracing::warn!(error = %e, "cannot append to the change feed");
        }
    }

    /// An attachment event: ingest (`create`), a label given or taken (`update`, with
    /// `label`), reclamation by gc (`delete`).
    pub fn attachment(&self, hex: &str, op: &str, label: Option<&str>, source: Source) {
        let mut v = json!({
            "seq": 0, "time": rfc3339(SystemTime::now()), "collection": "attachments",
            "id": hex, "op": op,
        });
        if op != "delete" {
            v["label"] = json!(label);
        }
        let h = format!("sha256:{hex}");
        let (before, after) = match op {
            "create" => (None, Some(h.as_str())),
            "delete" => (Some(h.as_str()), None),
            _ => (Some(h.as_str()), Some(h.as_str())),
        };
        if let Err(e) = self.append_value(v, source, before, after) {
            tracing::warn!(error = %e, "cannot append to the change feed");
        }
    }

    /// Stores an earlier version of a record; prunes the oldest beyond the bounds (a few
    /// unlinks: pruning never waits for anything).
    fn keep_version(&self, kind: Kind, id: &str, bytes: &[u8]) {
        let seq = {
            let mut inner = self.inner.lock();
            inner.vseq += 1;
            inner.vseq
        };
        let name = format!(
            "{}-{seq:012}",
            chrono::Utc::now().format("%Y-%m-%dT%H-%M-%S%.6fZ")
        );
        // An id is a name in our directory: one that is no file name (another backend's
        // row named `../x`, say) keeps no history.
        if !crate::store::collection::safe_record_id(id) {
            tracing::warn!(
                collection = kind.dir_name(),
                id,
                "an id that is no file name keeps no history"
            );
            return;
        }
        let dir = Path::new("history").join(kind.dir_name()).join(id);
        let r = mkdir(&self.dir, &dir).and_then(|()| {
            let tmp = dir.join(format!(".{name}.tmp"));
            let err = |what: &str, e| untrusted::store_error(&self.dir.path().join(&tmp), what, e);
            let _ = self.dir.unlink(&tmp);
            self.dir
                .create_new(&tmp, 0o600)
                .and_then(|mut f| f.write_all(bytes))
                .map_err(|e| err("write", e))?;
            self.dir
                .rename(&tmp, &dir.join(&name))
                .map_err(|e| err("rename", e))
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot keep an earlier version");
            return;
        }
        let mut drop_files = Vec::new();
        {
            let mut inner = self.inner.lock();
            inner
                .versions
                .insert(seq, (kind, id.to_string(), name.clone()));
            let inner = &mut *inner;
            let q = inner.per_record.entry((kind, id.to_string())).or_default();
            q.push_back((seq, name));
            while q.len() > self.opts.history_per_record {
                if let Some((s, n)) = q.pop_front() {
                    drop_files.push((kind, id.to_string(), n));
                    inner.versions.remove(&s);
                }
            }
            while inner.versions.len() > self.opts.history_total {
                let Some((&s, _)) = inner.versions.iter().next() else {
                    break;
                };
                if let Some((k, i, n)) = inner.versions.remove(&s) {
                    if let Some(q) = inner.per_record.get_mut(&(k, i.clone())) {
                        q.retain(|(qs, _)| *qs != s);
                    }
                    drop_files.push((k, i, n));
                }
            }
        }
        for (k, i, n) in drop_files {
            let d = Path::new("history").join(k.dir_name()).join(&i);
            let _ = self.dir.unlink(&d.join(n));
            let _ = self.dir.rmdir(&d);
        }
    }

    /// Brings every record of the store up to date (after the watcher lost track).
    pub fn rescan(&self, store: &dyn Backend) {
        for kind in store.collections() {
            let Ok(list) = store.list(*kind) else {
                continue;
            };
            let mut present = std::collections::HashSet::new();
            for r in &list.records {
                present.insert(r.id.clone());
                self.times(*kind, r);
            }
            let gone: Vec<String> = self
                .inner
                .lock()
                .known
                .keys()
                .filter(|(k, id)| k == kind && !present.contains(id))
                .map(|(_, id)| id.clone())
                .collect();
            for id in gone {
                self.observe(*kind, &id, None, false);
            }
        }
    }

    /// Records of a collection that have earlier versions.
    pub fn history_ids(&self, kind: Kind) -> Vec<String> {
        let inner = self.inner.lock();
        let mut v: Vec<String> = inner
            .per_record
            .iter()
            .filter(|((k, _), q)| *k == kind && !q.is_empty())
            .map(|((_, id), _)| id.clone())
            .collect();
        v.sort();
        v
    }

    /// A record's earlier versions, oldest first.
    pub fn history_versions(&self, kind: Kind, id: &str) -> Vec<String> {
        self.inner
            .lock()
            .per_record
            .get(&(kind, id.to_string()))
            .map(|q| q.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default()
    }

    fn version_rel(kind: Kind, id: &str, version: &str) -> PathBuf {
        Path::new("history")
            .join(kind.dir_name())
            .join(id)
            .join(version)
    }

    /// An earlier version's bytes and mtime.
    pub fn read_version(
        &self,
        kind: Kind,
        id: &str,
        version: &str,
    ) -> Result<(Vec<u8>, SystemTime)> {
        let rel = Self::version_rel(kind, id, version);
        let err = |e| untrusted::store_error(&self.dir.path().join(&rel), "read", e);
        let (data, m) = self
            .dir
            .read_bounded(&rel, untrusted::MAX_STORE_FILE_BYTES)
            .map_err(err)?
            .ok_or_else(|| StoreError::NotFound(format!("no version {version}")))?;
        Ok((data, m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    /// An earlier version's size and mtime (`None`: there is no such version file).
    pub fn version_meta(&self, kind: Kind, id: &str, version: &str) -> Option<(u64, SystemTime)> {
        let m = self
            .dir
            .lstat(&Self::version_rel(kind, id, version))
            .ok()??;
        m.is_file()
            .then(|| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    /// The feed's current length in bytes (what `.changes` shows as its size).
    pub fn changes_len(&self) -> u64 {
        self.inner
            .lock()
            .feed
            .metadata()
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Bytes of the feed from `offset`.
    pub fn read_changes(&self, offset: u64, size: usize) -> Result<Vec<u8>> {
        let inner = self.inner.lock();
        let f = self
            .dir
            .open_read(Path::new(FEED))
            .map_err(io("open the change feed"))?;
        drop(inner);
        let mut buf = vec![0u8; size];
        let mut got = 0;
        while got < size {
            let n = f
                .read_at(&mut buf[got..], offset + got as u64)
                .map_err(io("read the change feed"))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// When the feed last changed.
    pub fn changes_time(&self) -> SystemTime {
        self.inner
            .lock()
            .feed
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Sizes for `.status`.
    pub fn status(&self) -> Value {
        let inner = self.inner.lock();
        json!({
            "dir": self.dir.path(),
            "seq": inner.seq,
            "feed_lines": inner.feed_lines,
            "changes_max": self.opts.changes_max,
            "history_versions": inner.versions.len(),
            "history_per_record": self.opts.history_per_record,
            "history_total": self.opts.history_total,
            "tracked_records": inner.known.len(),
        })
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = self.save_times() {
            tracing::warn!(error = %e, "cannot save record times");
        }
    }
}
