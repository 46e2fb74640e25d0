//! The write-ahead manifest of attachment intents (`attachments/manifest.json`):
//! `{"intents": [{attachment_id, session_id, canonical_uri, intent_at_epoch_ms,
//! committed_at_epoch_ms}, …]}`. Rows keep unknown fields; the first writer owns a row.
//!
//! Why rows are typed: a manifest has a row per attachment, and as JSON trees 100,000 rows
//! took ~1 KB each (several hundred MiB once gc copied them). A row in the shape every
//! writer uses is kept as a small struct; any other row (unknown fields, other types) is
//! kept as its JSON tree, so nothing is lost.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::Arc;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};

use super::cached::{CacheStats, CachedFile};
use super::collection::{push_indented, push_key, push_top_object};
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
}

impl ManifestDoc {
    pub fn find(&self, id: &str) -> Option<&Intent> {
        self.rows.iter().find(|r| r.id() == Some(id))
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

fn parse(bytes: Vec<u8>, _prev: Option<&ManifestDoc>) -> std::result::Result<ManifestDoc, String> {
    parse_bytes(&bytes)
}

fn parse_bytes(bytes: &[u8]) -> std::result::Result<ManifestDoc, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ManifestDoc::default());
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_any(TopVisitor)
        .and_then(|d| de.end().map(|()| d))
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

pub struct Manifest {
    file: CachedFile<ManifestDoc>,
}

impl Manifest {
    pub fn new(path: std::path::PathBuf, stats: Arc<CacheStats>) -> Self {
        Manifest {
            file: CachedFile::new(path, parse, stats),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.file.path()
    }

    pub fn current(&self) -> Result<Arc<ManifestDoc>> {
        let l = self.file.current()?;
        Ok(l.value.clone())
    }

    /// The parse error as of the last time the manifest was read (no read now).
    pub fn known_error(&self) -> Option<String> {
        self.file.known_error()
    }

    pub fn error(&self) -> Option<String> {
        self.file.current().ok().and_then(|l| l.error.clone())
    }

    /// Applies `f` to a copy of the manifest and writes it if `f` says it changed something.
    /// The caller holds the writer lock.
    fn modify(&self, mut f: impl FnMut(&mut ManifestDoc) -> bool) -> Result<()> {
        self.file.update_streamed(
            |cur| {
                let mut doc = (*cur.value).clone();
                Ok(f(&mut doc).then_some((doc, ())))
            },
            |doc, w| doc.write_to(w),
        )?;
        Ok(())
    }

    /// Records the intent for `hex` unless a row for it exists (the first writer owns it).
    pub fn add_intent(&self, hex: &str, session_id: Option<&str>) -> Result<()> {
        self.modify(|doc| {
            if doc.find(hex).is_some() {
                return false;
            }
            doc.rows.push(Intent::Std(StdIntent {
                attachment_id: hex.into(),
                session_id: session_id.map(Into::into),
                canonical_uri: None,
                intent_at_epoch_ms: now_ms(),
                committed_at_epoch_ms: None,
            }));
            true
        })
    }

    /// Marks the uncommitted intents among `ids` committed now. Returns how many it marked.
    pub fn commit(&self, ids: &HashSet<String>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut marked = 0;
        self.modify(|doc| {
            marked = 0;
            let now = now_ms();
            for row in &mut doc.rows {
                if row.id().is_some_and(|id| ids.contains(id)) && !row.committed() {
                    row.set_committed(now);
                    marked += 1;
                }
            }
            marked > 0
        })?;
        Ok(marked)
    }

    /// What a garbage collection leaves: the rows of `forget` removed, those of `commit`
    /// committed now, in one rewrite.
    pub fn settle(&self, forget: &HashSet<String>, commit: &HashSet<String>) -> Result<()> {
        if forget.is_empty() && commit.is_empty() {
            return Ok(());
        }
        self.modify(|doc| {
            let before = doc.rows.len();
            doc.rows
                .retain(|r| !r.id().is_some_and(|id| forget.contains(id)));
            let mut changed = doc.rows.len() != before;
            let now = now_ms();
            for row in &mut doc.rows {
                if row.id().is_some_and(|id| commit.contains(id)) && !row.committed() {
                    row.set_committed(now);
                    changed = true;
                }
            }
            changed
        })
    }

    /// Removes the rows of `ids`.
    pub fn forget(&self, ids: &HashSet<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.modify(|doc| {
            let before = doc.rows.len();
            doc.rows
                .retain(|r| !r.id().is_some_and(|id| ids.contains(id)));
            doc.rows.len() != before
        })
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
}
