//! The write-ahead manifest of attachment intents (`attachments/manifest.json`):
//! `{"intents": [{attachment_id, session_id, canonical_uri, intent_at_epoch_ms,
//! committed_at_epoch_ms}, …]}`. Rows keep unknown fields; the first writer owns a row.
//!
//! Why rows are typed: a manifest has a row per attachment, and as JSON trees 100,000 rows
//! took ~1 KB each (several hundred MiB once gc copied them). A row in the shape every
//! writer uses is kept as a small struct; any other row (unknown fields, other types) is
//! kept as its JSON tree, so nothing is lost.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};

use super::atomic::{self, WriterLock};
use super::cached::CacheStats;
use super::collection::{push_indented, push_key, push_top_object};
use super::fingerprint::{self, Fingerprint};
use super::hash::Sha256;
use super::untrusted;
use crate::error::{Result, StoreError};

const KEY: &str = "intents";

/// A row in the standard shape: the five known fields, each of its usual type.
#[derive(Debug, Clone)]
pub struct StdIntent {
    pub attachment_id: Box<str>,
    pub session_id: Option<Box<str>>,
    /// `None`: the usual `sha256:<attachment_id>`.
    pub canonical_uri: Option<Box<str>>,
    pub intent_at_epoch_ms: i64,
    pub committed_at_epoch_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum Intent {
    Std(StdIntent),
    /// Any other row, kept whole.
    Other(Value),
}

impl Intent {
    fn from_value(v: Value) -> Intent {
        let Value::Object(m) = &v else {
            return Intent::Other(v);
        };
        let std = (|| {
            if m.len() != 5 {
                return None;
            }
            let id = m.get("attachment_id")?.as_str()?;
            let session_id = match m.get("session_id")? {
                Value::Null => None,
                Value::String(s) => Some(s.as_str().into()),
                _ => return None,
            };
            let uri = m.get("canonical_uri")?.as_str()?;
            let intent_at = m.get("intent_at_epoch_ms")?;
            let committed = match m.get("committed_at_epoch_ms")? {
                Value::Null => None,
                c => Some(exact_i64(c)?),
            };
            Some(StdIntent {
                attachment_id: id.into(),
                session_id,
                canonical_uri: (uri.strip_prefix("sha256:") != Some(id)).then(|| uri.into()),
                intent_at_epoch_ms: exact_i64(intent_at)?,
                committed_at_epoch_ms: committed,
            })
        })();
        match std {
            Some(s) => Intent::Std(s),
            None => Intent::Other(v),
        }
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            Intent::Std(s) => Some(&s.attachment_id),
            Intent::Other(v) => v.get("attachment_id").and_then(Value::as_str),
        }
    }

    pub fn committed(&self) -> bool {
        match self {
            Intent::Std(s) => s.committed_at_epoch_ms.is_some(),
            Intent::Other(v) => v.get("committed_at_epoch_ms").is_some_and(|v| !v.is_null()),
        }
    }

    pub fn intent_at(&self) -> i64 {
        match self {
            Intent::Std(s) => s.intent_at_epoch_ms,
            Intent::Other(v) => v
                .get("intent_at_epoch_ms")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        }
    }

    fn set_committed(&mut self, now: i64) {
        match self {
            Intent::Std(s) => s.committed_at_epoch_ms = Some(now),
            Intent::Other(Value::Object(m)) => {
                m.insert("committed_at_epoch_ms".into(), json!(now));
            }
            Intent::Other(_) => {}
        }
    }

    /// The row as pretty JSON at depth 4 (inside `"intents": [ … ]`).
    fn push_pretty(&self, out: &mut Vec<u8>) -> Result<()> {
        let s = match self {
            Intent::Std(s) => s,
            Intent::Other(v) => {
                let pretty = serde_json::to_vec_pretty(v).map_err(|e| {
                    StoreError::Invalid(format!("cannot serialise manifest row: {e}"))
                })?;
                push_indented(out, &pretty, 4);
                return Ok(());
            }
        };
        let field = |out: &mut Vec<u8>, first: bool, k: &str| -> Result<()> {
            out.extend_from_slice(if first { b"{\n      " } else { b",\n      " });
            push_key(out, k)
        };
        let string = |out: &mut Vec<u8>, v: &str| -> Result<()> {
            serde_json::to_writer(&mut *out, v)
                .map_err(|e| StoreError::Invalid(format!("cannot serialise manifest row: {e}")))
        };
        field(out, true, "attachment_id")?;
        string(out, &s.attachment_id)?;
        field(out, false, "session_id")?;
        match &s.session_id {
            Some(sid) => string(out, sid)?,
            None => out.extend_from_slice(b"null"),
        }
        field(out, false, "canonical_uri")?;
        match &s.canonical_uri {
            Some(u) => string(out, u)?,
            None => string(out, &format!("sha256:{}", s.attachment_id))?,
        }
        field(out, false, "intent_at_epoch_ms")?;
        out.extend_from_slice(s.intent_at_epoch_ms.to_string().as_bytes());
        field(out, false, "committed_at_epoch_ms")?;
        match s.committed_at_epoch_ms {
            Some(c) => out.extend_from_slice(c.to_string().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"\n    }");
        Ok(())
    }
}

/// An integer written exactly as an i64 prints (so the typed row writes back the same text).
fn exact_i64(v: &Value) -> Option<i64> {
    let Value::Number(num) = v else { return None };
    let n = num.as_i64()?;
    (num.to_string() == n.to_string()).then_some(n)
}

#[derive(Default, Debug, Clone)]
pub struct ManifestDoc {
    /// Top-level fields other than the intents, in file order.
    pub top: Map<String, Value>,
    pub rows: Vec<Intent>,
    index: Index,
}

/// Where each id's first row is, so that a lookup (an ingest's "is there an intent
/// already?", a commit) costs the same at 100 rows as at 100,000. Keyed by a hash of the
/// id (16 bytes a row, not a copy of the 64-character id); a lookup checks the row it
/// finds and scans on the rare collision.
#[derive(Default, Debug, Clone)]
struct Index {
    hasher: std::hash::RandomState,
    first: HashMap<u64, usize>,
    /// Some id has more than one row (another writer made them): a commit then scans, so
    /// that every row of the id is committed, as before.
    dups: bool,
}

impl ManifestDoc {
    pub fn find(&self, id: &str) -> Option<&Intent> {
        self.position(id).map(|i| &self.rows[i])
    }

    fn key(&self, id: &str) -> u64 {
        self.index.hasher.hash_one(id)
    }

    /// The index of the first row of `id`.
    fn position(&self, id: &str) -> Option<usize> {
        let i = *self.index.first.get(&self.key(id))?;
        if self.rows.get(i).and_then(Intent::id) == Some(id) {
            return Some(i);
        }
        // Another id with the same 64-bit hash holds the slot.
        self.rows.iter().position(|r| r.id() == Some(id))
    }

    fn push(&mut self, row: Intent) {
        if let Some(id) = row.id() {
            let k = self.key(id);
            let i = self.rows.len();
            match self.index.first.get(&k) {
                None => {
                    self.index.first.insert(k, i);
                }
                Some(&j) => {
                    // The same id again, or (a 64-bit collision) maybe further on.
                    if self.rows.get(j).and_then(Intent::id) == Some(id)
                        || self.rows.iter().any(|r| r.id() == Some(id))
                    {
                        self.index.dups = true;
                    }
                }
            }
        }
        self.rows.push(row);
    }

    /// Builds the index again after rows were removed (gc) or read.
    fn reindex(&mut self) {
        let rows = std::mem::take(&mut self.rows);
        self.index.first = HashMap::with_capacity(rows.len());
        self.index.dups = false;
        self.rows.reserve(rows.len());
        for r in rows {
            self.push(r);
        }
    }

    /// Applies one journal entry (see [`Op`]); returns whether anything changed.
    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Intent(row) => {
                let Some(id) = row.id() else { return false };
                if self.position(id).is_some() {
                    return false;
                }
                self.push(row.clone());
                true
            }
            Op::Commit { ids, at } => {
                let mut changed = false;
                if self.index.dups {
                    let set: HashSet<&str> = ids.iter().map(|s| &**s).collect();
                    for row in &mut self.rows {
                        if row.id().is_some_and(|id| set.contains(id)) && !row.committed() {
                            row.set_committed(*at);
                            changed = true;
                        }
                    }
                    return changed;
                }
                for id in ids {
                    if let Some(i) = self.position(id)
                        && !self.rows[i].committed()
                    {
                        self.rows[i].set_committed(*at);
                        changed = true;
                    }
                }
                changed
            }
            Op::Forget { ids } => {
                if !ids.iter().any(|id| self.position(id).is_some()) {
                    return false;
                }
                let set: HashSet<&str> = ids.iter().map(|s| &**s).collect();
                self.rows
                    .retain(|r| !r.id().is_some_and(|id| set.contains(id)));
                self.reindex();
                true
            }
            Op::Folded { .. } => false,
        }
    }

    /// The whole file, written in pieces: exactly what pretty-printing the manifest as one
    /// JSON tree gives.
    fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut buf = Vec::with_capacity(64 << 10);
        let mut io_err = None;
        let r = push_top_object(&mut buf, &self.top, KEY, |out| {
            if self.rows.is_empty() {
                out.extend_from_slice(b"[]");
                return Ok(());
            }
            out.push(b'[');
            for (i, r) in self.rows.iter().enumerate() {
                out.extend_from_slice(if i == 0 { b"\n    " } else { b",\n    " });
                r.push_pretty(out)?;
                if out.len() >= 60 << 10 {
                    if let Err(e) = w.write_all(out) {
                        io_err = Some(e);
                        return Err(StoreError::Invalid("manifest write failed".into()));
                    }
                    out.clear();
                }
            }
            out.extend_from_slice(b"\n  ]");
            Ok(())
        });
        if let Some(e) = io_err {
            return Err(e);
        }
        r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        buf.push(b'\n');
        w.write_all(&buf)
    }
}

fn parse_bytes(bytes: &[u8]) -> std::result::Result<ManifestDoc, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ManifestDoc::default());
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_any(TopVisitor)
        .and_then(|d| de.end().map(|()| d))
        .map(|mut d| {
            d.reindex();
            d
        })
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => e.to_string(),
            _ => format!("invalid JSON: {e}"),
        })
}

/// The top-level object; the rows stream out of `intents` one at a time.
struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = ManifestDoc;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the manifest to be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<ManifestDoc, A::Error> {
        let mut doc = ManifestDoc::default();
        while let Some(k) = map.next_key::<String>()? {
            if k == KEY {
                doc.rows = map.next_value_seed(RowsSeed)?;
                doc.top.insert(k, Value::Null);
            } else {
                let v: Value = map.next_value()?;
                doc.top.insert(k, v);
            }
        }
        Ok(doc)
    }
}

struct RowsSeed;

impl<'de> DeserializeSeed<'de> for RowsSeed {
    type Value = Vec<Intent>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed {
    type Value = Vec<Intent>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("field \"intents\" to be an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Vec<Intent>, A::Error> {
        let mut rows = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element::<Value>()? {
            rows.push(Intent::from_value(v));
        }
        Ok(rows)
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How long the journal waits after its last entry before it is folded into the manifest
/// in the background.
const IDLE_FOLD: Duration = Duration::from_secs(1);
/// A journal this many entries long (or half the manifest's rows, if more) is folded by
/// the writer that makes it so: each fold rewrites the manifest once, so a fold every
/// rows/2 entries costs each entry a constant share of it.
const FOLD_MIN_ENTRIES: usize = 1024;

/// One line of the journal (`manifest.journal` beside `manifest.json`), a JSON object.
#[derive(Debug, Clone)]
enum Op {
    /// `{"op":"intent","row":{…a manifest row…}}`: the row is added unless the manifest
    /// has one for its id (the first writer owns it).
    Intent(Intent),
    /// `{"op":"commit","ids":[…],"committed_at_epoch_ms":N}`: those rows, if uncommitted.
    Commit { ids: Vec<Box<str>>, at: i64 },
    /// `{"op":"forget","ids":[…]}`: those rows removed.
    Forget { ids: Vec<Box<str>> },
    /// `{"op":"folded","manifest_sha256":"…","manifest_bytes":N}`: written (durably) by a
    /// fold just before it renames the new manifest into place. As the last line, and
    /// matching `manifest.json`, it says every line above it is in the manifest already
    /// (a crash between the rename and the truncation of the journal).
    Folded { sha256: String, len: u64 },
}

impl Intent {
    fn to_value(&self) -> Value {
        match self {
            Intent::Std(s) => json!({
                "attachment_id": &*s.attachment_id,
                "session_id": s.session_id.as_deref(),
                "canonical_uri": match &s.canonical_uri {
                    Some(u) => u.to_string(),
                    None => format!("sha256:{}", s.attachment_id),
                },
                "intent_at_epoch_ms": s.intent_at_epoch_ms,
                "committed_at_epoch_ms": s.committed_at_epoch_ms,
            }),
            Intent::Other(v) => v.clone(),
        }
    }
}

impl Op {
    fn to_line(&self) -> Result<Vec<u8>> {
        let v = match self {
            Op::Intent(row) => json!({"op": "intent", "row": row.to_value()}),
            Op::Commit { ids, at } => {
                json!({"op": "commit", "ids": ids, "committed_at_epoch_ms": at})
            }
            Op::Forget { ids } => json!({"op": "forget", "ids": ids}),
            Op::Folded { sha256, len } => {
                json!({"op": "folded", "manifest_sha256": sha256, "manifest_bytes": len})
            }
        };
        let mut line = serde_json::to_vec(&v)
            .map_err(|e| StoreError::Invalid(format!("cannot serialise a journal entry: {e}")))?;
        line.push(b'\n');
        Ok(line)
    }

    fn from_line(line: &[u8]) -> std::result::Result<Op, String> {
        let v: Value = serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let ids = || -> std::result::Result<Vec<Box<str>>, String> {
            v.get("ids")
                .and_then(Value::as_array)
                .ok_or("\"ids\" is not an array")?
                .iter()
                .map(|id| id.as_str().map(Into::into).ok_or("an id is not a string"))
                .collect::<std::result::Result<_, _>>()
                .map_err(str::to_string)
        };
        match v.get("op").and_then(Value::as_str) {
            Some("intent") => {
                let row = Intent::from_value(v.get("row").cloned().unwrap_or(Value::Null));
                if row.id().is_none() {
                    return Err("an intent without attachment_id".into());
                }
                Ok(Op::Intent(row))
            }
            Some("commit") => Ok(Op::Commit {
                ids: ids()?,
                at: v
                    .get("committed_at_epoch_ms")
                    .and_then(Value::as_i64)
                    .ok_or("a commit without committed_at_epoch_ms")?,
            }),
            Some("forget") => Ok(Op::Forget { ids: ids()? }),
            Some("folded") => Ok(Op::Folded {
                sha256: v
                    .get("manifest_sha256")
                    .and_then(Value::as_str)
                    .ok_or("a fold mark without manifest_sha256")?
                    .to_string(),
                len: v
                    .get("manifest_bytes")
                    .and_then(Value::as_u64)
                    .ok_or("a fold mark without manifest_bytes")?,
            }),
            other => Err(format!("unknown entry {other:?}")),
        }
    }
}

/// The journal's whole entries; bytes after the last newline are an append a crash cut
/// short (never acknowledged: its fsync had not returned) and are dropped.
struct JournalText {
    ops: Vec<Op>,
    /// Bytes holding whole, good entries (where the next entry goes).
    good_len: u64,
    error: Option<String>,
}

fn parse_journal(bytes: &[u8]) -> JournalText {
    let mut ops = Vec::new();
    let mut pos = 0;
    while let Some(n) = memchr::memchr(b'\n', &bytes[pos..]) {
        let line = &bytes[pos..pos + n];
        if !line.iter().all(u8::is_ascii_whitespace) {
            match Op::from_line(line) {
                Ok(op) => ops.push(op),
                Err(e) => {
                    return JournalText {
                        ops,
                        good_len: pos as u64,
                        error: Some(format!("journal entry at byte {pos}: {e}")),
                    };
                }
            }
        }
        pos += n + 1;
    }
    JournalText {
        ops,
        good_len: pos as u64,
        error: None,
    }
}

/// What the manifest and its journal say, as one document.
#[derive(Default)]
struct State {
    loaded: bool,
    /// The `manifest.json` the view was built from (`None`: there is none).
    base_fp: Option<Fingerprint>,
    /// A version of `manifest.json` that does not parse (its fingerprint, why): the view
    /// is the last good one and writes are refused.
    base_bad: Option<(Option<Fingerprint>, String)>,
    journal_fp: Option<Fingerprint>,
    journal_bad: Option<String>,
    /// Bytes of the journal that hold whole entries.
    good_len: u64,
    /// How many journal entries `manifest.json` does not have yet. (They are applied to
    /// `doc` and not kept otherwise: whenever the manifest changes under us, the journal
    /// is read again with it.)
    pending: usize,
    /// The journal's entries are in `manifest.json` already (its fold mark matched): the
    /// next append empties it first.
    in_manifest: bool,
    /// `manifest.json` with the journal applied.
    doc: Arc<ManifestDoc>,
    /// The journal, open for appending (checked against the path before each use).
    file: Option<File>,
}

impl State {
    fn error(&self) -> Option<String> {
        match (&self.base_bad, &self.journal_bad) {
            (Some((_, e)), _) => Some(e.clone()),
            (None, Some(e)) => Some(e.clone()),
            (None, None) => None,
        }
    }

    fn fold_due(&self) -> bool {
        self.pending >= FOLD_MIN_ENTRIES.max(self.doc.rows.len() / 2)
    }
}

struct Inner {
    path: PathBuf,
    journal: PathBuf,
    lock: Arc<WriterLock>,
    read_only: bool,
    stats: Arc<CacheStats>,
    state: Mutex<State>,
    idle: Arc<Idle>,
}

/// The background fold's clock: the time of the last append, or a request to stop.
#[derive(Default)]
struct Idle {
    state: Mutex<IdleState>,
    cv: Condvar,
}

#[derive(Default)]
struct IdleState {
    last_append: Option<Instant>,
    started: bool,
    stop: bool,
}

/// The write-ahead manifest: `manifest.json` (lash's format, read and written whole) and
/// `manifest.journal` beside it, an append-only log of what changed since the manifest
/// was last written. A change costs one appended line and one fdatasync, whatever the
/// number of attachments; the journal is folded into `manifest.json` (one atomic replace,
/// then the journal emptied) once it is idle for a second, once it holds half as many
/// entries as the manifest has rows, at gc and when the store is closed. Readers (gc,
/// fsck, copy, `intent`) see the manifest with the journal applied.
pub struct Manifest {
    inner: Arc<Inner>,
}

impl Manifest {
    pub fn new(
        path: PathBuf,
        stats: Arc<CacheStats>,
        lock: Arc<WriterLock>,
        read_only: bool,
    ) -> Self {
        Manifest {
            inner: Arc::new(Inner {
                journal: journal_path(&path),
                path,
                lock,
                read_only,
                stats,
                state: Mutex::new(State::default()),
                idle: Arc::new(Idle::default()),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The journal of changes not yet folded into the manifest.
    pub fn journal_path(&self) -> &Path {
        &self.inner.journal
    }

    /// The manifest with the journal applied, reloaded if either file changed.
    pub fn current(&self) -> Result<Arc<ManifestDoc>> {
        let mut st = self.inner.state.lock();
        self.inner.refresh(&mut st)?;
        Ok(st.doc.clone())
    }

    /// How many journal entries are not yet in `manifest.json`.
    pub fn pending(&self) -> Result<usize> {
        let mut st = self.inner.state.lock();
        self.inner.refresh(&mut st)?;
        Ok(st.pending)
    }

    /// The parse error as of the last time the manifest was read (no read now).
    pub fn known_error(&self) -> Option<String> {
        self.inner.state.lock().error()
    }

    pub fn error(&self) -> Option<String> {
        let mut st = self.inner.state.lock();
        self.inner.refresh(&mut st).ok()?;
        st.error()
    }

    /// Records the intent for `hex` unless a row for it exists (the first writer owns it).
    /// The caller holds the writer lock. When this returns the intent is durable.
    pub fn add_intent(&self, hex: &str, session_id: Option<&str>) -> Result<()> {
        let mut st = self.inner.writable_state()?;
        if st.doc.position(hex).is_some() {
            return Ok(());
        }
        let row = Intent::Std(StdIntent {
            attachment_id: hex.into(),
            session_id: session_id.map(Into::into),
            canonical_uri: None,
            intent_at_epoch_ms: now_ms(),
            committed_at_epoch_ms: None,
        });
        self.inner.append(&mut st, Op::Intent(row))?;
        self.after_append(st);
        Ok(())
    }

    /// Marks the uncommitted intents among `ids` committed now. Returns how many it marked.
    /// The caller holds the writer lock.
    pub fn commit(&self, ids: &HashSet<String>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut st = self.inner.writable_state()?;
        let mut marked: Vec<Box<str>> = Vec::new();
        let mut count = 0;
        for id in ids {
            if st.doc.position(id).is_some() {
                let n = if st.doc.index.dups {
                    st.doc
                        .rows
                        .iter()
                        .filter(|r| r.id() == Some(id) && !r.committed())
                        .count()
                } else {
                    st.doc.find(id).map_or(0, |r| usize::from(!r.committed()))
                };
                if n > 0 {
                    count += n;
                    marked.push(id.as_str().into());
                }
            }
        }
        if marked.is_empty() {
            return Ok(0);
        }
        marked.sort();
        self.inner.append(
            &mut st,
            Op::Commit {
                ids: marked,
                at: now_ms(),
            },
        )?;
        self.after_append(st);
        Ok(count)
    }

    /// What a garbage collection leaves: the rows of `forget` removed, those of `commit`
    /// committed now, and the journal folded, in one rewrite of the manifest. The caller
    /// holds the writer lock.
    pub fn settle(&self, forget: &HashSet<String>, commit: &HashSet<String>) -> Result<()> {
        let mut st = self.inner.writable_state()?;
        let forget = Op::Forget {
            ids: forget.iter().map(|s| s.as_str().into()).collect(),
        };
        let commit = Op::Commit {
            ids: commit.iter().map(|s| s.as_str().into()).collect(),
            at: now_ms(),
        };
        self.inner.fold(&mut st, &[forget, commit])
    }

    /// Removes the rows of `ids`. The caller holds the writer lock.
    pub fn forget(&self, ids: &HashSet<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut st = self.inner.writable_state()?;
        let mut present: Vec<Box<str>> = ids
            .iter()
            .filter(|id| st.doc.position(id).is_some())
            .map(|s| s.as_str().into())
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        present.sort();
        self.inner.append(&mut st, Op::Forget { ids: present })?;
        self.after_append(st);
        Ok(())
    }

    /// Writes the journal's entries into `manifest.json` (one atomic replace) and empties
    /// the journal. Takes the writer lock.
    pub fn fold(&self) -> Result<()> {
        let _lock = self.inner.lock.acquire()?;
        let mut st = self.inner.writable_state()?;
        self.inner.fold(&mut st, &[])
    }

    /// Uncommitted intents recorded before `cutoff_ms`.
    pub fn uncommitted_before(&self, cutoff_ms: i64) -> Result<Vec<String>> {
        Ok(self
            .current()?
            .rows
            .iter()
            .filter(|r| !r.committed() && r.intent_at() < cutoff_ms)
            .filter_map(|r| r.id().map(str::to_string))
            .collect())
    }

    /// After an entry was appended (writer lock held): fold now if the journal is due,
    /// else let the background fold know.
    fn after_append(&self, mut st: MutexGuard<'_, State>) {
        if st.fold_due() {
            if let Err(e) = self.inner.fold(&mut st, &[]) {
                tracing::warn!(path = %self.inner.path.display(), error = %e, "cannot fold the manifest journal; its entries stay in the journal");
            }
            return;
        }
        drop(st);
        self.arm_idle_fold();
    }

    /// Folds a journal left by an earlier process (one killed, or a daemon that exited
    /// right after a burst) a second from now, in the background.
    pub fn fold_soon(&self) {
        if self.inner.read_only {
            return;
        }
        if fingerprint::stat(&self.inner.journal).is_ok_and(|fp| fp.is_some_and(|f| f.size > 0)) {
            self.arm_idle_fold();
        }
    }

    /// Starts (or restarts) the background fold's one-second clock.
    fn arm_idle_fold(&self) {
        let mut idle = self.inner.idle.state.lock();
        idle.last_append = Some(Instant::now());
        if !idle.started {
            idle.started = true;
            let (weak, sig) = (Arc::downgrade(&self.inner), self.inner.idle.clone());
            if let Err(e) = std::thread::Builder::new()
                .name("manifest-fold".into())
                .spawn(move || idle_folder(weak, sig))
            {
                tracing::warn!(error = %e, "cannot start the background manifest fold; the journal is folded at thresholds, gc and close");
            }
        }
        self.inner.idle.cv.notify_one();
    }
}

impl Drop for Manifest {
    /// Folds what the journal holds (a clean unmount leaves `manifest.json` complete),
    /// and stops the background fold.
    fn drop(&mut self) {
        {
            let mut idle = self.inner.idle.state.lock();
            idle.stop = true;
            self.inner.idle.cv.notify_all();
        }
        if self.inner.read_only || self.inner.state.lock().pending == 0 {
            return;
        }
        let r = self.inner.lock.acquire().and_then(|_lock| {
            let mut st = self.inner.writable_state()?;
            self.inner.fold(&mut st, &[])
        });
        if let Err(e) = r {
            tracing::warn!(path = %self.inner.path.display(), error = %e, "cannot fold the manifest journal at close; its entries stay in the journal");
        }
    }
}

/// The background fold: once no entry was appended for [`IDLE_FOLD`], takes the writer
/// lock and folds the journal, so `manifest.json` is complete for other readers soon
/// after a burst of ingests.
fn idle_folder(inner: Weak<Inner>, idle: Arc<Idle>) {
    let mut g = idle.state.lock();
    loop {
        if g.stop {
            return;
        }
        let Some(t) = g.last_append else {
            idle.cv.wait(&mut g);
            continue;
        };
        let since = t.elapsed();
        if since < IDLE_FOLD {
            idle.cv.wait_for(&mut g, IDLE_FOLD - since);
            continue;
        }
        g.last_append = None;
        let gone = MutexGuard::unlocked(&mut g, || {
            let Some(inner) = inner.upgrade() else {
                return true;
            };
            let r = inner.lock.acquire().and_then(|_lock| {
                let mut st = inner.writable_state()?;
                inner.fold(&mut st, &[])
            });
            if let Err(e) = r {
                tracing::warn!(path = %inner.path.display(), error = %e, "background fold of the manifest journal failed; retried after the next change");
            }
            false
        });
        if gone {
            return;
        }
    }
}

/// Gives a new journal the owner of the directory it is made in (best effort), as a
/// replaced store file keeps its owner: a store the platform owns stays its own when a
/// root daemon writes it, and the owner's own `agentmount gc` can still fold it.
fn keep_owner_of(dir: &Path, f: &File, path: &Path) {
    use std::os::fd::AsRawFd;
    let (Ok(Some(d)), Ok(m)) = (untrusted::lstat(dir), f.metadata()) else {
        return;
    };
    if (m.uid(), m.gid()) != (d.uid(), d.gid()) {
        // SAFETY: fchown on a descriptor we own.
        if unsafe { libc::fchown(f.as_raw_fd(), d.uid(), d.gid()) } != 0 {
            tracing::debug!(path = %path.display(), error = %io::Error::last_os_error(), "cannot give the journal its directory's owner");
        }
    }
}

fn journal_path(manifest: &Path) -> PathBuf {
    manifest.with_extension("journal")
}

/// Counts and hashes what a fold writes, for its fold mark.
struct Hashing<'a> {
    w: &'a mut dyn Write,
    hash: Sha256,
    len: u64,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Inner {
    /// The state, fresh, for a change: refused while either file does not parse. The
    /// caller holds the writer lock.
    fn writable_state(&self) -> Result<MutexGuard<'_, State>> {
        let mut st = self.state.lock();
        self.refresh(&mut st)?;
        if let Some(e) = st.error() {
            return Err(StoreError::Corrupt(format!(
                "{} does not parse ({e}); serving the last good version and refusing writes until it is fixed",
                self.path.display()
            )));
        }
        Ok(st)
    }

    /// Reloads the view if `manifest.json` or the journal changed since it was built (a
    /// stat of each when nothing did).
    fn refresh(&self, st: &mut State) -> Result<()> {
        let bfp = fingerprint::stat(&self.path)?;
        let jfp = fingerprint::stat(&self.journal)?;
        let base_same = match &st.base_bad {
            Some((fp, _)) => *fp == bfp,
            None => st.base_fp == bfp,
        };
        if st.loaded && base_same && st.journal_fp == jfp {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        self.reload(st)
    }

    /// Reads both files and builds the view again. The journal is read first: a fold that
    /// lands between the two reads then shows its entries twice (applying them again
    /// changes nothing), never not at all.
    fn reload(&self, st: &mut State) -> Result<()> {
        let journal = match fingerprint::read_with_fingerprint(&self.journal) {
            Ok(None) => (
                None,
                JournalText {
                    ops: Vec::new(),
                    good_len: 0,
                    error: None,
                },
            ),
            Ok(Some((bytes, fp))) => (Some(fp), parse_journal(&bytes)),
            Err(StoreError::Untrusted(why)) => (
                fingerprint::stat(&self.journal)?,
                JournalText {
                    ops: Vec::new(),
                    good_len: 0,
                    error: Some(why),
                },
            ),
            Err(e) => return Err(e),
        };
        let (jfp, mut jt) = journal;
        if let Some(e) = &jt.error {
            self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(path = %self.journal.display(), error = %e, "manifest journal does not parse; writes to the manifest are refused until it is fixed");
        }
        let fold_mark = match jt.ops.last().filter(|_| jt.error.is_none()) {
            Some(Op::Folded { sha256, len }) => Some((sha256.clone(), *len)),
            _ => None,
        };
        let prev_size = st.base_fp.map(|f| f.size).unwrap_or(0);
        let base = match fingerprint::read_with_fingerprint(&self.path) {
            Err(StoreError::Again(msg)) if st.loaded => {
                // Rewritten in place faster than we can read it: keep the last view.
                self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %self.path.display(), "{msg}; serving the last good version");
                return Ok(());
            }
            Err(StoreError::Untrusted(why)) => Err((fingerprint::stat(&self.path)?, why)),
            Err(e) => return Err(e),
            Ok(None) => Ok((None, ManifestDoc::default(), false)),
            Ok(Some((bytes, fp))) => {
                if bytes.iter().all(u8::is_ascii_whitespace) && st.loaded && prev_size > 0 {
                    Err((
                        Some(fp),
                        "the file is empty (a torn or interrupted write?)".to_string(),
                    ))
                } else {
                    let folded = fold_mark.as_ref().is_some_and(|(sha, len)| {
                        *len == bytes.len() as u64 && {
                            let mut h = Sha256::new();
                            h.update(&bytes);
                            h.finish_hex() == *sha
                        }
                    });
                    match parse_bytes(&bytes) {
                        Ok(doc) => Ok((Some(fp), doc, folded)),
                        Err(e) => Err((Some(fp), e)),
                    }
                }
            }
        };
        st.journal_fp = jfp;
        st.journal_bad = jt.error.take();
        st.good_len = jt.good_len;
        match base {
            Ok((fp, mut doc, folded)) => {
                st.base_fp = fp;
                st.base_bad = None;
                st.in_manifest = folded;
                st.pending = 0;
                if !folded {
                    for op in jt.ops.iter().filter(|o| !matches!(o, Op::Folded { .. })) {
                        doc.apply(op);
                        st.pending += 1;
                    }
                }
                st.doc = Arc::new(doc);
            }
            Err((fp, why)) => {
                // The last good view stays; writes are refused until the file parses.
                self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), error = %why, "store file does not parse; serving the last good version");
                st.base_bad = Some((fp, why));
            }
        }
        st.loaded = true;
        Ok(())
    }

    /// The journal open for appending, holding exactly its good entries (a tail cut short
    /// by a crash, or entries already folded, are cut off first).
    fn journal_file(&self, st: &mut State) -> Result<()> {
        let on_disk = untrusted::lstat(&self.journal)
            .map_err(|e| untrusted::store_error(&self.journal, "stat", e))?;
        let same = match (&st.file, &on_disk) {
            (Some(f), Some(m)) => f
                .metadata()
                .is_ok_and(|fm| (fm.dev(), fm.ino()) == (m.dev(), m.ino())),
            _ => false,
        };
        if !same {
            st.file = None;
            if let Some(dir) = self.journal.parent() {
                atomic::ensure_dir(dir)?;
            }
            let f = untrusted::open_write(&self.journal, true, 0o666)
                .map_err(|e| untrusted::store_error(&self.journal, "open", e))?;
            if on_disk.is_none()
                && let Some(dir) = self.journal.parent()
            {
                keep_owner_of(dir, &f, &self.journal);
                // The new file's name is durable before any entry in it counts.
                atomic::fsync_dir(dir)?;
            }
            st.file = Some(f);
        }
        let want = if st.in_manifest { 0 } else { st.good_len };
        let Some(f) = &st.file else {
            return Err(StoreError::Corrupt("manifest journal not open".into()));
        };
        let size = f
            .metadata()
            .map_err(|e| StoreError::io(format!("fstat {}", self.journal.display()), e))?
            .len();
        if size != want {
            if size < want {
                // Shorter than the entries we know: someone else changed it. Read it again.
                st.loaded = false;
                return Err(StoreError::Again(format!(
                    "{} changed under the writer lock",
                    self.journal.display()
                )));
            }
            f.set_len(want)
                .and_then(|()| f.sync_data())
                .map_err(|e| StoreError::io(format!("truncate {}", self.journal.display()), e))?;
        }
        if st.in_manifest {
            st.in_manifest = false;
            st.pending = 0;
        }
        st.good_len = want;
        Ok(())
    }

    /// Appends one entry and makes it durable, then applies it to the view. The caller
    /// holds the writer lock and has refreshed `st`.
    fn append(&self, st: &mut State, op: Op) -> Result<()> {
        let line = op.to_line()?;
        let r = self.journal_file(st).and_then(|()| {
            let f = st
                .file
                .as_ref()
                .ok_or_else(|| StoreError::Corrupt("manifest journal not open".into()))?;
            let mut w: &File = f;
            w.write_all(&line)
                .and_then(|()| f.sync_data())
                .map_err(|e| StoreError::io(format!("append to {}", self.journal.display()), e))?;
            f.metadata()
                .map_err(|e| StoreError::io(format!("fstat {}", self.journal.display()), e))
        });
        match r {
            Ok(m) => {
                st.journal_fp = Some(Fingerprint::of(&m));
                st.good_len += line.len() as u64;
                Arc::make_mut(&mut st.doc).apply(&op);
                st.pending += 1;
                Ok(())
            }
            Err(e) => {
                // What reached the file is unknown: read it again before the next change.
                st.loaded = false;
                Err(e)
            }
        }
    }

    /// Writes the view, with `extra` applied, as `manifest.json` (one atomic replace) and
    /// empties the journal. The caller holds the writer lock and a fresh `st`.
    fn fold(&self, st: &mut State, extra: &[Op]) -> Result<()> {
        let r = self.fold_inner(st, extra);
        if r.is_err() {
            // The view may hold changes that were not written: build it again.
            st.loaded = false;
        }
        r
    }

    fn fold_inner(&self, st: &mut State, extra: &[Op]) -> Result<()> {
        const ATTEMPTS: usize = 8;
        let mut changed = false;
        if !extra.is_empty() {
            let doc = Arc::make_mut(&mut st.doc);
            for op in extra {
                changed |= doc.apply(op);
            }
        }
        for _ in 0..ATTEMPTS {
            if st.pending == 0 && !changed {
                if st.in_manifest || st.good_len > 0 {
                    // Only a fold mark (or nothing new) is left: empty the journal.
                    self.journal_file(st)?;
                }
                return Ok(());
            }
            self.journal_file(st)?;
            let mark_len = std::cell::Cell::new(0u64);
            let (doc, file) = (&st.doc, &st.file);
            let journal = &self.journal;
            let replaced = atomic::replace_file_with(
                &self.path,
                |w| {
                    let mut h = Hashing {
                        w,
                        hash: Sha256::new(),
                        len: 0,
                    };
                    doc.write_to(&mut h)?;
                    let Hashing { hash, len, .. } = h;
                    let mark = Op::Folded {
                        sha256: hash.finish_hex(),
                        len,
                    }
                    .to_line()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                    let f = file
                        .as_ref()
                        .ok_or_else(|| io::Error::other("manifest journal not open"))?;
                    let mut jw: &File = f;
                    jw.write_all(&mark)
                        .and_then(|()| f.sync_data())
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", journal.display()))
                        })?;
                    mark_len.set(mark.len() as u64);
                    Ok(())
                },
                st.base_fp,
            )?;
            st.good_len += mark_len.get();
            match replaced {
                atomic::Replaced::Done(fp) => {
                    st.base_fp = Some(fp);
                    st.base_bad = None;
                    st.pending = 0;
                    st.in_manifest = true;
                    // Everything is in the manifest now; the mark makes a crash here safe.
                    if let Err(e) = self.journal_file(st) {
                        tracing::warn!(path = %self.journal.display(), error = %e, "cannot empty the manifest journal after a fold; its fold mark says it is folded");
                        st.loaded = false;
                        return Ok(());
                    }
                    if let Some(f) = &st.file {
                        st.journal_fp = f.metadata().ok().map(|m| Fingerprint::of(&m));
                    }
                    return Ok(());
                }
                atomic::Replaced::Raced => {
                    tracing::warn!(path = %self.path.display(), "another writer replaced the manifest during a fold; folding into its version");
                    self.reload(st)?;
                    if let Some(e) = st.error() {
                        return Err(StoreError::Corrupt(format!(
                            "{} does not parse ({e})",
                            self.path.display()
                        )));
                    }
                    changed = false;
                    if !extra.is_empty() {
                        let doc = Arc::make_mut(&mut st.doc);
                        for op in extra {
                            changed |= doc.apply(op);
                        }
                    }
                }
            }
        }
        Err(StoreError::Again(format!(
            "{}: other writers replaced the file {ATTEMPTS} times during one fold",
            self.path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pretty(v: &Value) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(v).unwrap();
        b.push(b'\n');
        b
    }

    /// Typed rows write back exactly what the JSON tree would; odd rows stay whole.
    #[test]
    fn rows_round_trip_byte_for_byte() {
        let h = "b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640";
        let v = json!({"version": 1, "intents": [
            {"attachment_id": h, "session_id": "s-1", "canonical_uri": format!("sha256:{h}"), "intent_at_epoch_ms": 17, "committed_at_epoch_ms": 18},
            {"attachment_id": h, "session_id": null, "canonical_uri": "elsewhere:\"x\"", "intent_at_epoch_ms": -3, "committed_at_epoch_ms": null},
            {"attachment_id": h, "session_id": null, "canonical_uri": "u", "intent_at_epoch_ms": 1, "committed_at_epoch_ms": null, "owner": {"x": [1]}},
            {"attachment_id": h, "session_id": 5, "canonical_uri": "u", "intent_at_epoch_ms": 1, "committed_at_epoch_ms": null},
            {"attachment_id": h, "session_id": null, "canonical_uri": "u", "intent_at_epoch_ms": 1.0, "committed_at_epoch_ms": null},
            "not a row"
        ], "after": null});
        let doc = parse_bytes(&pretty(&v)).unwrap();
        let kinds: Vec<bool> = doc
            .rows
            .iter()
            .map(|r| matches!(r, Intent::Std(_)))
            .collect();
        assert_eq!(kinds, [true, true, false, false, false, false]);
        let bytes = |d: &ManifestDoc| {
            let mut out = Vec::new();
            d.write_to(&mut out).unwrap();
            out
        };
        assert_eq!(
            String::from_utf8(bytes(&doc)).unwrap(),
            String::from_utf8(pretty(&v)).unwrap()
        );
        let empty = parse_bytes(b"{\"intents\": []}").unwrap();
        assert_eq!(bytes(&empty), b"{\n  \"intents\": []\n}\n");
        // Large enough to be written in several pieces.
        let rows: Vec<Value> = (0..2000)
            .map(|i| {
                json!({"attachment_id": format!("{i:064x}"), "session_id": null,
                    "canonical_uri": format!("sha256:{i:064x}"), "intent_at_epoch_ms": i,
                    "committed_at_epoch_ms": null})
            })
            .collect();
        let many = json!({ "intents": rows });
        assert_eq!(bytes(&parse_bytes(&pretty(&many)).unwrap()), pretty(&many));
        assert!(
            parse_bytes(b"{\"intents\": {}}")
                .unwrap_err()
                .contains("array")
        );
        assert!(parse_bytes(b"[]").unwrap_err().contains("object"));
    }

    fn handle(dir: &Path) -> Manifest {
        let lock = Arc::new(WriterLock::new(
            dir.join(".agentmount.lock"),
            Duration::from_secs(5),
        ));
        Manifest::new(
            dir.join("attachments/manifest.json"),
            Arc::default(),
            lock,
            false,
        )
    }

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// A crash cuts an append short (dropped, and cut off before the next one); a crash
    /// between a fold's rename and the journal's truncation leaves a fold mark that
    /// matches the manifest (the journal is then not applied again); a mark that does not
    /// match (the rename never happened) changes nothing.
    #[test]
    fn torn_appends_and_fold_marks_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let m = handle(d.path());
        let journal = d.path().join("attachments/manifest.journal");
        let lock = m.inner.lock.clone();
        {
            let _g = lock.acquire().unwrap();
            m.add_intent(&id(1), None).unwrap();
            m.add_intent(&id(2), Some("s-2")).unwrap();
            m.commit(&[id(2)].into()).unwrap();
        }
        let whole = std::fs::read(&journal).unwrap();
        assert_eq!(whole.iter().filter(|b| **b == b'\n').count(), 3);
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"op":"intent","row":{"attachm"#);
        std::fs::write(&journal, &torn).unwrap();
        let m2 = handle(d.path());
        assert_eq!(m2.pending().unwrap(), 3);
        assert!(m2.error().is_none());
        {
            let _g = lock.acquire().unwrap();
            m2.add_intent(&id(3), None).unwrap();
        }
        let text = std::fs::read(&journal).unwrap();
        assert!(text.starts_with(&whole) && text.ends_with(b"}\n"));
        assert_eq!(parse_journal(&text).ops.len(), 4);
        // A fold that crashed after its rename: the old journal and a matching mark.
        let old_journal = text.clone();
        m2.fold().unwrap();
        let manifest = std::fs::read(d.path().join("attachments/manifest.json")).unwrap();
        let mut h = Sha256::new();
        h.update(&manifest);
        let mark = Op::Folded {
            sha256: h.finish_hex(),
            len: manifest.len() as u64,
        }
        .to_line()
        .unwrap();
        std::fs::write(&journal, [&old_journal[..], &mark[..]].concat()).unwrap();
        let m3 = handle(d.path());
        assert_eq!(m3.pending().unwrap(), 0, "the mark says it is folded");
        assert_eq!(m3.current().unwrap().rows.len(), 3);
        {
            let _g = lock.acquire().unwrap();
            m3.add_intent(&id(4), None).unwrap();
        }
        let text = std::fs::read(&journal).unwrap();
        assert_eq!(
            parse_journal(&text).ops.len(),
            1,
            "emptied before the append"
        );
        // A mark for bytes that never landed is ignored: the entries are applied.
        let stale = Op::Folded {
            sha256: "0".repeat(64),
            len: 1,
        }
        .to_line()
        .unwrap();
        std::fs::write(&journal, [&text[..], &stale[..]].concat()).unwrap();
        let m4 = handle(d.path());
        assert_eq!(m4.pending().unwrap(), 1);
        let doc = m4.current().unwrap();
        assert_eq!(doc.rows.len(), 4);
        assert!(doc.find(&id(2)).is_some_and(Intent::committed));
        // A whole line that does not parse is damage: reported, writes refused.
        std::fs::write(&journal, [&text[..], b"not json\n"].concat()).unwrap();
        let m5 = handle(d.path());
        assert!(m5.error().is_some_and(|e| e.contains("journal")));
        let _g = lock.acquire().unwrap();
        assert!(m5.add_intent(&id(5), None).is_err());
    }
}
