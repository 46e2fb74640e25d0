//! The write-ahead manifest of attachment intents (`attachments/manifest.json`):
//! `{"intents": [{attachment_id, session_id, canonical_uri, intent_at_epoch_ms,
//! committed_at_epoch_ms}, …]}`. Rows keep unknown fields; the first writer owns a row.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::cached::{CacheStats, CachedFile};
use crate::error::{Result, StoreError};

#[derive(Default, Debug, Clone)]
pub struct ManifestDoc {
    pub top: Map<String, Value>,
}

impl ManifestDoc {
    pub fn intents(&self) -> &[Value] {
        self.top
            .get("intents")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn intents_mut(&mut self) -> &mut Vec<Value> {
        let slot = self
            .top
            .entry("intents")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !slot.is_array() {
            *slot = Value::Array(Vec::new());
        }
        match slot {
            Value::Array(a) => a,
            _ => unreachable!("made an array just above"),
        }
    }

    pub fn find(&self, id: &str) -> Option<&Value> {
        self.intents().iter().find(|r| row_id(r) == Some(id))
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec_pretty(&self.top)
            .map_err(|e| StoreError::Invalid(format!("cannot serialise manifest: {e}")))?;
        b.push(b'\n');
        Ok(b)
    }
}

pub fn row_id(row: &Value) -> Option<&str> {
    row.get("attachment_id").and_then(Value::as_str)
}

pub fn committed(row: &Value) -> bool {
    row.get("committed_at_epoch_ms")
        .is_some_and(|v| !v.is_null())
}

pub fn intent_at(row: &Value) -> i64 {
    row.get("intent_at_epoch_ms")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn parse(bytes: &[u8]) -> std::result::Result<ManifestDoc, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ManifestDoc::default());
    }
    match serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))? {
        Value::Object(top) => match top.get("intents") {
            None | Some(Value::Array(_)) => Ok(ManifestDoc { top }),
            Some(_) => Err("field \"intents\" must be an array".into()),
        },
        _ => Err("the manifest must be a JSON object".into()),
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
        self.file.update(|cur| {
            let mut doc = (*cur.value).clone();
            if !f(&mut doc) {
                return Ok(None);
            }
            Ok(Some((doc.bytes()?, doc, ())))
        })?;
        Ok(())
    }

    /// Records the intent for `hex` unless a row for it exists (the first writer owns it).
    pub fn add_intent(&self, hex: &str, session_id: Option<&str>) -> Result<()> {
        self.modify(|doc| {
            if doc.find(hex).is_some() {
                return false;
            }
            doc.intents_mut().push(json!({
                "attachment_id": hex,
                "session_id": session_id,
                "canonical_uri": format!("sha256:{hex}"),
                "intent_at_epoch_ms": now_ms(),
                "committed_at_epoch_ms": null,
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
            for row in doc.intents_mut() {
                if row_id(row).is_some_and(|id| ids.contains(id)) && !committed(row) {
                    if let Value::Object(m) = row {
                        m.insert("committed_at_epoch_ms".into(), json!(now));
                    }
                    marked += 1;
                }
            }
            marked > 0
        })?;
        Ok(marked)
    }

    /// Removes the rows of `ids`.
    pub fn forget(&self, ids: &HashSet<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.modify(|doc| {
            let rows = doc.intents_mut();
            let before = rows.len();
            rows.retain(|r| !row_id(r).is_some_and(|id| ids.contains(id)));
            rows.len() != before
        })
    }

    /// Uncommitted intents recorded before `cutoff_ms`.
    pub fn uncommitted_before(&self, cutoff_ms: i64) -> Result<Vec<String>> {
        Ok(self
            .current()?
            .intents()
            .iter()
            .filter(|r| !committed(r) && intent_at(r) < cutoff_ms)
            .filter_map(|r| row_id(r).map(str::to_string))
            .collect())
    }
}
