//! The documents behind the collections: sessions.json (a map keyed by id, inside a
//! top-level object), goals.json (an array ordered by id), and one file per conversation.
//! Each record keeps the JSON it was written with; unknown fields round-trip.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

use crate::error::{Result, StoreError};

/// One record as the mount presents it.
#[derive(Debug)]
pub struct Record {
    pub id: String,
    pub value: Value,
    /// Pretty JSON plus a newline: what a read of `<id>.json` returns.
    pub bytes: Arc<[u8]>,
}

impl Record {
    pub fn new(id: String, value: Value) -> Self {
        let bytes = present(&value);
        Record { id, value, bytes }
    }
}

pub fn present(value: &Value) -> Arc<[u8]> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
    bytes.push(b'\n');
    bytes.into()
}

/// Whether a name can be a file in the mount at all.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 250
}

/// How records sit in a single-file collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `{"<key>": {"<id>": record, …}, …other top-level fields…}`
    Map(&'static str),
    /// `[record, …]`, each with an `id`, kept ordered by id.
    Array,
}

/// A parsed single-file collection.
#[derive(Default, Debug)]
pub struct Doc {
    /// Top-level fields other than the records (map shape only), in file order.
    pub top: Map<String, Value>,
    /// Every record in file order, addressable or not.
    pub records: Vec<Arc<Record>>,
    /// id → position, for records whose id is a usable file name.
    pub index: HashMap<String, usize>,
}

impl Doc {
    pub fn get(&self, id: &str) -> Option<&Arc<Record>> {
        self.index.get(id).map(|&i| &self.records[i])
    }

    pub fn addressable(&self) -> impl Iterator<Item = &Arc<Record>> {
        self.records.iter().filter(|r| {
            self.index
                .get(&r.id)
                .is_some_and(|&i| Arc::ptr_eq(&self.records[i], r))
        })
    }

    fn from_records(top: Map<String, Value>, records: Vec<Arc<Record>>) -> Doc {
        let mut index = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            if safe_name(&r.id) {
                index.entry(r.id.clone()).or_insert(i);
            }
        }
        Doc {
            top,
            records,
            index,
        }
    }
}

pub fn parse_doc(shape: Shape, bytes: &[u8]) -> std::result::Result<Doc, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Doc::default());
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    match shape {
        Shape::Map(key) => {
            let Value::Object(mut top) = value else {
                return Err("the top level must be a JSON object".into());
            };
            let records = match top.get_mut(key).map(Value::take) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(m)) => m
                    .into_iter()
                    .map(|(k, v)| Arc::new(Record::new(k, v)))
                    .collect(),
                Some(_) => return Err(format!("field {key:?} must be an object keyed by id")),
            };
            // Keep the key's position in the top level; its value is rebuilt when written.
            if top.contains_key(key) {
                top.insert(key.into(), Value::Null);
            }
            Ok(Doc::from_records(top, records))
        }
        Shape::Array => {
            let Value::Array(items) = value else {
                return Err("the top level must be a JSON array".into());
            };
            let records = items
                .into_iter()
                .map(|v| {
                    let id = v
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    Arc::new(Record::new(id, v))
                })
                .collect();
            Ok(Doc::from_records(Map::new(), records))
        }
    }
}

/// One change to a collection.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert {
        id: String,
        value: Map<String, Value>,
    },
    Remove {
        id: String,
    },
    Rekey {
        from: String,
        to: String,
    },
}

impl Change {
    pub fn describe(&self) -> String {
        match self {
            Change::Upsert { id, .. } => format!("upsert {id}"),
            Change::Remove { id } => format!("remove {id}"),
            Change::Rekey { from, to } => format!("re-key {from} -> {to}"),
        }
    }
}

/// Sets `id` in a record that carries one (every session and goal does).
pub fn with_id(mut value: Value, id: &str) -> Value {
    if let Value::Object(m) = &mut value {
        m.insert("id".into(), Value::String(id.into()));
    }
    value
}

/// Applies one change, returning the new document. Records that did not change are shared.
pub fn apply(shape: Shape, doc: &Doc, change: &Change) -> Result<Doc> {
    let mut records = doc.records.clone();
    match change {
        Change::Upsert { id, value } => {
            let rec = Arc::new(Record::new(id.clone(), Value::Object(value.clone())));
            match doc.index.get(id) {
                Some(&i) => records[i] = rec,
                None => records.push(rec),
            }
        }
        Change::Remove { id } => {
            let i = *doc
                .index
                .get(id)
                .ok_or_else(|| StoreError::NotFound(format!("no record {id}")))?;
            records.remove(i);
        }
        Change::Rekey { from, to } => {
            let i = *doc
                .index
                .get(from)
                .ok_or_else(|| StoreError::NotFound(format!("no record {from}")))?;
            let moved = Arc::new(Record::new(
                to.clone(),
                with_id(records[i].value.clone(), to),
            ));
            match doc.index.get(to) {
                Some(&j) => {
                    records[j] = moved;
                    records.remove(i);
                }
                None => records[i] = moved,
            }
        }
    }
    if shape == Shape::Array {
        records.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(Doc::from_records(doc.top.clone(), records))
}

struct RecordMap<'a>(&'a [Arc<Record>]);

impl Serialize for RecordMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for r in self.0 {
            m.serialize_entry(&r.id, &r.value)?;
        }
        m.end()
    }
}

struct TopMap<'a> {
    key: &'a str,
    doc: &'a Doc,
}

impl Serialize for TopMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let has_key = self.doc.top.contains_key(self.key);
        let mut m = s.serialize_map(Some(self.doc.top.len() + usize::from(!has_key)))?;
        for (k, v) in &self.doc.top {
            if k == self.key {
                m.serialize_entry(k, &RecordMap(&self.doc.records))?;
            } else {
                m.serialize_entry(k, v)?;
            }
        }
        if !has_key {
            m.serialize_entry(self.key, &RecordMap(&self.doc.records))?;
        }
        m.end()
    }
}

struct RecordSeq<'a>(&'a [Arc<Record>]);

impl Serialize for RecordSeq<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for r in self.0 {
            seq.serialize_element(&r.value)?;
        }
        seq.end()
    }
}

/// The bytes of the whole collection file, pretty-printed as the platform writes it.
pub fn serialize_doc(shape: Shape, doc: &Doc) -> Result<Vec<u8>> {
    let r = match shape {
        Shape::Map(key) => serde_json::to_vec_pretty(&TopMap { key, doc }),
        Shape::Array => serde_json::to_vec_pretty(&RecordSeq(&doc.records)),
    };
    let mut bytes =
        r.map_err(|e| StoreError::Invalid(format!("cannot serialise collection: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Every `sha256:<64 lowercase hex>` reference in some bytes.
pub fn attachment_refs(bytes: &[u8], out: &mut std::collections::HashSet<String>) {
    const P: &[u8] = b"sha256:";
    let mut i = 0;
    while let Some(pos) = find(&bytes[i..], P) {
        let start = i + pos + P.len();
        let end = start + 64;
        if end <= bytes.len()
            && bytes[start..end]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && bytes.get(end).is_none_or(|b| !b.is_ascii_hexdigit())
        {
            out.insert(String::from_utf8_lossy(&bytes[start..end]).into_owned());
        }
        i = start;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
