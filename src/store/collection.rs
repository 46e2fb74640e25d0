//! The documents behind the collections: sessions.json (a map keyed by id, inside a
//! top-level object), goals.json (an array ordered by id), and one file per conversation.
//! Each record keeps the JSON it was written with; unknown fields round-trip.

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::incremental::{self, Source};
use crate::error::{Result, StoreError};

/// One record as the mount presents it. Only its presented bytes are kept (a parsed tree
/// costs several times the bytes: at 10,000 sessions that was most of the daemon's memory);
/// the rare change that needs the tree (a re-key) parses it again.
#[derive(Debug)]
pub struct Record {
    pub id: String,
    /// Pretty JSON plus a newline: what a read of `<id>.json` returns.
    pub bytes: Arc<[u8]>,
}

impl Record {
    pub fn new(id: String, value: &Value) -> Self {
        Record {
            id,
            bytes: present(value),
        }
    }

    /// The record as a JSON tree, parsed from its bytes.
    pub fn value(&self) -> Result<Value> {
        serde_json::from_slice(&self.bytes).map_err(|e| {
            StoreError::Corrupt(format!("record {} does not parse again: {e}", self.id))
        })
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
        && name.len() <= 255
}

/// Whether `id` can name a record: `<id>.json` must itself be a usable name.
pub fn safe_record_id(id: &str) -> bool {
    safe_name(id) && id.len() + ".json".len() <= 255
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
    /// Shared between versions whose ids sit at the same places.
    pub index: Arc<HashMap<String, usize>>,
    /// The file this version was parsed from or written as, when known: the next version
    /// is then parsed by difference (see `incremental`).
    pub source: Option<Source>,
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

    pub(crate) fn from_records(top: Map<String, Value>, records: Vec<Arc<Record>>) -> Doc {
        let mut index = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            if safe_record_id(&r.id) {
                index.entry(r.id.clone()).or_insert(i);
            }
        }
        Doc {
            top,
            records,
            index: Arc::new(index),
            source: None,
        }
    }
}

/// Parses a collection file (see `parse_doc_owned`).
pub fn parse_doc(
    shape: Shape,
    bytes: &[u8],
    prev: Option<&Doc>,
) -> std::result::Result<Doc, String> {
    parse_doc_owned(shape, bytes.to_vec(), prev)
}

/// Parses a collection file one record at a time: each record's tree lives only while its
/// presented bytes are made, so parsing never holds the whole file as a tree.
///
/// `prev` is the version parsed before (if any). When it knows its file, only the records
/// where the two files differ are parsed (`incremental::splice`). Otherwise a record whose
/// text is exactly its previous presented bytes, nested as the pretty printer nests it, is
/// the same value and keeps its `Arc<Record>` without a parse. A file in another layout
/// simply parses every record.
pub fn parse_doc_owned(
    shape: Shape,
    bytes: Vec<u8>,
    prev: Option<&Doc>,
) -> std::result::Result<Doc, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Doc::default());
    }
    let bytes = match prev {
        Some(p) => match incremental::splice(shape, bytes, p) {
            Ok(doc) => return Ok(doc),
            Err(bytes) => bytes,
        },
        None => bytes,
    };
    if let Some((mut doc, spans)) = parse_located(shape, &bytes, prev) {
        doc.source = Source::new(bytes.into_boxed_slice(), spans);
        return Ok(doc);
    }
    parse_whole(shape, &bytes, prev)
}

/// The common case: a well-formed file whose map keys are all different, parsed with the
/// place of every record. `None` for anything else.
fn parse_located(
    shape: Shape,
    bytes: &[u8],
    prev: Option<&Doc>,
) -> Option<(Doc, Vec<std::ops::Range<usize>>)> {
    let (top, container) = match shape {
        Shape::Map(key) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let (top, container) = de.deserialize_map(TopRaw { key }).ok()?;
            de.end().ok()?;
            (top, container?)
        }
        Shape::Array => {
            let start = bytes.iter().position(|&b| !incremental::is_ws(b))?;
            let end = bytes.iter().rposition(|&b| !incremental::is_ws(b))? + 1;
            (Map::new(), bytes.get(start..end)?)
        }
    };
    if container == b"null" {
        return None;
    }
    let e = incremental::parse_container(shape, bytes, container, prev)?;
    Some((Doc::from_records(top, e.records), e.spans))
}

/// The top-level object with the records container left as text; `None` for the
/// container when the key is missing or given twice.
struct TopRaw {
    key: &'static str,
}

impl<'de> Visitor<'de> for TopRaw {
    type Value = (Map<String, Value>, Option<&'de [u8]>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut top = Map::new();
        let mut container = None;
        let mut twice = false;
        while let Some(k) = map.next_key::<String>()? {
            if k == self.key {
                let raw: &'de RawValue = map.next_value()?;
                twice |= container.is_some();
                container = Some(raw.get().as_bytes());
                top.insert(k, Value::Null);
            } else {
                let v: Value = map.next_value()?;
                top.insert(k, v);
            }
        }
        Ok((top, if twice { None } else { container }))
    }
}

/// Parses the whole file with serde (any layout, duplicate keys, and the error message
/// when it does not parse).
fn parse_whole(shape: Shape, bytes: &[u8], prev: Option<&Doc>) -> std::result::Result<Doc, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = match shape {
        Shape::Map(key) => de.deserialize_any(MapDoc { key, prev }),
        Shape::Array => de
            .deserialize_any(RecordSeq { prev })
            .map(|records| (Map::new(), records)),
    };
    let (top, records) =
        parsed
            .and_then(|d| de.end().map(|()| d))
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => e.to_string(),
                _ => format!("invalid JSON: {e}"),
            })?;
    Ok(Doc::from_records(top, records))
}

/// Whether `raw` is `presented` (pretty JSON plus a newline) with every line after the first
/// indented by `indent` more spaces: how serde's pretty printer writes a value `indent / 2`
/// levels deep. Newlines occur in pretty JSON only between tokens (a newline inside a string
/// is written `\n`), so equal text means an equal value.
fn same_text(raw: &[u8], presented: &[u8], indent: usize) -> bool {
    let mut body = presented.strip_suffix(b"\n").unwrap_or(presented);
    let mut rest = raw;
    while let Some(n) = memchr::memchr(b'\n', body) {
        let Some(r) = rest.strip_prefix(&body[..=n]) else {
            return false;
        };
        if r.len() < indent || r[..indent].iter().any(|&b| b != b' ') {
            return false;
        }
        (rest, body) = (&r[indent..], &body[n + 1..]);
    }
    rest == body
}

/// The record for `raw`: the previous version's when the text is unchanged, else parsed.
pub(crate) fn record_from_raw(
    id: String,
    raw: &RawValue,
    prev: Option<&Arc<Record>>,
    indent: usize,
) -> serde_json::Result<Arc<Record>> {
    if let Some(p) = prev.filter(|p| same_text(raw.get().as_bytes(), &p.bytes, indent)) {
        return Ok(p.clone());
    }
    let v: Value = serde_json::from_str(raw.get())?;
    Ok(Arc::new(Record::new(id, &v)))
}

/// The record for `raw`, an element of the goals array (named by its `id`; records sit one
/// level deep). Anything odd about the id (missing, not a string, given twice) just means a
/// full parse, which decides it as before.
pub(crate) fn array_record(raw: &RawValue, prev: Option<&Doc>) -> serde_json::Result<Arc<Record>> {
    let prev = prev.and_then(|d| {
        let id = serde_json::from_str::<IdOnly>(raw.get()).ok()?.id?;
        d.get(&id)
    });
    if let Some(p) = prev.filter(|p| same_text(raw.get().as_bytes(), &p.bytes, 2)) {
        return Ok(p.clone());
    }
    let v: Value = serde_json::from_str(raw.get())?;
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Arc::new(Record::new(id, &v)))
}

/// `{"<key>": {"<id>": record, …}, …}`: the records stream out of `<key>`; the other
/// top-level fields are kept (the key's position too, its value rebuilt when written).
struct MapDoc<'p> {
    key: &'static str,
    prev: Option<&'p Doc>,
}

impl<'de> Visitor<'de> for MapDoc<'_> {
    type Value = (Map<String, Value>, Vec<Arc<Record>>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a JSON object at the top level holding {:?}", self.key)
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut top = Map::new();
        let mut records = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if k == self.key {
                records = map.next_value_seed(RecordMapSeed {
                    key: self.key,
                    prev: self.prev,
                })?;
                top.insert(k, Value::Null);
            } else {
                let v: Value = map.next_value()?;
                top.insert(k, v);
            }
        }
        Ok((top, records))
    }
}

struct RecordMapSeed<'p> {
    key: &'static str,
    prev: Option<&'p Doc>,
}

impl<'de> DeserializeSeed<'de> for RecordMapSeed<'_> {
    type Value = Vec<Arc<Record>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordMapSeed<'_> {
    type Value = Vec<Arc<Record>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "field {:?} to be an object keyed by id", self.key)
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut records: Vec<Arc<Record>> = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut seen: HashMap<String, usize> = HashMap::new();
        while let Some(k) = map.next_key::<String>()? {
            let raw: &RawValue = map.next_value()?;
            // Records sit two levels deep: the top object, then the map of records.
            let prev = self.prev.and_then(|d| d.get(&k));
            // A key given twice keeps its first position and its last value, as a JSON map
            // (and the platform's own parser) reads it.
            match seen.get(&k) {
                Some(&i) => {
                    records[i] = record_from_raw(k, raw, prev, 4).map_err(A::Error::custom)?
                }
                None => {
                    seen.insert(k.clone(), records.len());
                    records.push(record_from_raw(k, raw, prev, 4).map_err(A::Error::custom)?);
                }
            }
        }
        Ok(records)
    }
}

/// `[record, …]`, each named by its `id`.
struct RecordSeq<'p> {
    prev: Option<&'p Doc>,
}

/// Only a record's `id`, to find its previous version before parsing it.
#[derive(serde::Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

impl<'de> Visitor<'de> for RecordSeq<'_> {
    type Value = Vec<Arc<Record>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records at the top level")
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(raw) = seq.next_element::<&RawValue>()? {
            records.push(array_record(raw, self.prev).map_err(A::Error::custom)?);
        }
        Ok(records)
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
            let rec = Arc::new(Record::new(id.clone(), &Value::Object(value.clone())));
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
            let moved = Arc::new(Record::new(to.clone(), &with_id(records[i].value()?, to)));
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

/// Appends pretty JSON that was made at nesting depth 0 as if it had been made `indent`
/// spaces deep. Pretty JSON has a newline only between tokens (inside strings it is escaped),
/// so indenting after each one gives exactly what serde_json's pretty printer writes.
pub(crate) fn push_indented(out: &mut Vec<u8>, pretty: &[u8], indent: usize) {
    let pretty = pretty.strip_suffix(b"\n").unwrap_or(pretty);
    for line in pretty.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line);
        if line.ends_with(b"\n") {
            out.resize(out.len() + indent, b' ');
        }
    }
}

pub(crate) fn push_key(out: &mut Vec<u8>, key: &str) -> Result<()> {
    serde_json::to_writer(&mut *out, key)
        .map_err(|e| StoreError::Invalid(format!("cannot serialise key {key:?}: {e}")))?;
    out.extend_from_slice(b": ");
    Ok(())
}

/// `{"<id>": record, …}` at nesting depth `indent`; each record's span goes to `spans`.
fn push_record_map(
    out: &mut Vec<u8>,
    records: &[Arc<Record>],
    indent: usize,
    spans: &mut Vec<std::ops::Range<usize>>,
) -> Result<()> {
    if records.is_empty() {
        out.extend_from_slice(b"{}");
        return Ok(());
    }
    out.push(b'{');
    for (i, r) in records.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
        out.resize(out.len() + indent + 2, b' ');
        let start = out.len();
        push_key(out, &r.id)?;
        push_indented(out, &r.bytes, indent + 2);
        spans.push(start..out.len());
    }
    out.push(b'\n');
    out.resize(out.len() + indent, b' ');
    out.push(b'}');
    Ok(())
}

/// A pretty top-level object: `top`'s fields in order, with `key`'s value (appended when
/// `top` lacks it) written by `push_value` at depth 2 rather than taken from `top`.
pub(crate) fn push_top_object(
    out: &mut Vec<u8>,
    top: &Map<String, Value>,
    key: &str,
    mut push_value: impl FnMut(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let missing = (!top.contains_key(key)).then_some((key, &Value::Null));
    let fields = top.iter().map(|(k, v)| (k.as_str(), v)).chain(missing);
    out.push(b'{');
    for (i, (k, v)) in fields.enumerate() {
        out.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
        push_key(out, k)?;
        if k == key {
            push_value(out)?;
        } else {
            let pretty = serde_json::to_vec_pretty(v)
                .map_err(|e| StoreError::Invalid(format!("cannot serialise field {k:?}: {e}")))?;
            push_indented(out, &pretty, 2);
        }
    }
    out.extend_from_slice(b"\n}");
    Ok(())
}

/// The bytes of the whole collection file, pretty-printed as the platform writes it (what
/// `serde_json::to_vec_pretty` of the whole document would give), made by splicing each
/// record's presented bytes rather than serialising every record again.
pub fn serialize_doc(shape: Shape, doc: &Doc) -> Result<Vec<u8>> {
    Ok(serialize_doc_spans(shape, doc)?.0)
}

/// `serialize_doc`, and where each record went (for the written version's `Source`).
pub fn serialize_doc_spans(
    shape: Shape,
    doc: &Doc,
) -> Result<(Vec<u8>, Vec<std::ops::Range<usize>>)> {
    let mut spans = Vec::with_capacity(doc.records.len());
    let total: usize = doc
        .records
        .iter()
        .map(|r| r.bytes.len() + r.id.len() + 16)
        .sum();
    let mut out = Vec::with_capacity(total + total / 8 + 64);
    match shape {
        Shape::Map(key) => push_top_object(&mut out, &doc.top, key, |out| {
            push_record_map(out, &doc.records, 2, &mut spans)
        })?,
        Shape::Array if doc.records.is_empty() => out.extend_from_slice(b"[]"),
        Shape::Array => {
            out.push(b'[');
            for (i, r) in doc.records.iter().enumerate() {
                out.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
                let start = out.len();
                push_indented(&mut out, &r.bytes, 2);
                spans.push(start..out.len());
            }
            out.extend_from_slice(b"\n]");
        }
    }
    out.push(b'\n');
    Ok((out, spans))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The spliced file is exactly what serialising the whole document would give, so
    /// switching from one to the other changes no byte the platform sees.
    #[test]
    fn spliced_documents_equal_serde_pretty_output() {
        let sessions = br#"{"version": 3, "sessions": {"a": {"id": "a", "n": [1, {"x": "a\nb"}], "e": {}, "z": []},
            "b": {"id": "b", "deep": {"k": {"k": [true, null, 1.50]}}}}, "after": {"q": [1, 2]}}"#;
        let doc = parse_doc(Shape::Map("sessions"), sessions, None).unwrap();
        let want = {
            let v: Value = serde_json::from_slice(sessions).unwrap();
            let mut b = serde_json::to_vec_pretty(&v).unwrap();
            b.push(b'\n');
            b
        };
        assert_eq!(
            String::from_utf8(serialize_doc(Shape::Map("sessions"), &doc).unwrap()).unwrap(),
            String::from_utf8(want).unwrap()
        );
        let goals = br#"[{"id": "g-1", "sessions": [{"s": 1}], "notes": ""}, {"id": "g-2"}]"#;
        let doc = parse_doc(Shape::Array, goals, None).unwrap();
        let v: Value = serde_json::from_slice(goals).unwrap();
        let mut want = serde_json::to_vec_pretty(&v).unwrap();
        want.push(b'\n');
        assert_eq!(serialize_doc(Shape::Array, &doc).unwrap(), want);
        for (shape, empty) in [
            (Shape::Array, "[]\n"),
            (Shape::Map("sessions"), "{\n  \"sessions\": {}\n}\n"),
        ] {
            let doc = Doc::default();
            assert_eq!(serialize_doc(shape, &doc).unwrap(), empty.as_bytes());
        }
    }

    /// A version we wrote knows its file: another writer's change to one record of it is
    /// parsed by difference, and gives what a fresh parse gives.
    #[test]
    fn a_written_version_is_the_base_of_the_next_reload() {
        let shape = Shape::Map("sessions");
        let v = serde_json::json!({"sessions": {"a": {"id": "a", "n": 1}, "b": {"id": "b", "n": 2}, "c": {"id": "c"}}});
        let doc = parse_doc(shape, &serde_json::to_vec_pretty(&v).unwrap(), None).unwrap();
        let change = Change::Upsert {
            id: "b".into(),
            value: serde_json::json!({"id": "b", "n": 3})
                .as_object()
                .unwrap()
                .clone(),
        };
        let mut ours = apply(shape, &doc, &change).unwrap();
        let (bytes, spans) = serialize_doc_spans(shape, &ours).unwrap();
        ours.source = Source::new(bytes.clone().into_boxed_slice(), spans);
        assert!(ours.source.is_some());
        let theirs = String::from_utf8(bytes)
            .unwrap()
            .replace("\"n\": 3", "\"n\": 30");
        let fresh = parse_doc(shape, theirs.as_bytes(), None).unwrap();
        let diffed = parse_doc(shape, theirs.as_bytes(), Some(&ours)).unwrap();
        let view = |d: &Doc| {
            d.records
                .iter()
                .map(|r| (r.id.clone(), r.bytes.to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&diffed), view(&fresh));
        assert_eq!(
            &diffed.get("b").unwrap().bytes[..],
            b"{\n  \"id\": \"b\",\n  \"n\": 30\n}\n"
        );
        for id in ["a", "c"] {
            assert!(Arc::ptr_eq(diffed.get(id).unwrap(), ours.get(id).unwrap()));
        }
    }

    #[test]
    fn collection_files_of_the_wrong_shape_say_what_is_wrong() {
        let e = parse_doc(Shape::Map("sessions"), b"[1]", None).unwrap_err();
        assert!(e.contains("top level"), "{e}");
        let e = parse_doc(Shape::Map("sessions"), br#"{"sessions": 3}"#, None).unwrap_err();
        assert!(e.contains("keyed by id"), "{e}");
        let e = parse_doc(Shape::Array, br#"{"id": 1}"#, None).unwrap_err();
        assert!(e.contains("array"), "{e}");
        let e = parse_doc(Shape::Array, b"[{} ", None).unwrap_err();
        assert!(e.starts_with("invalid JSON"), "{e}");
        assert!(parse_doc(Shape::Map("sessions"), br#"{"sessions": null}"#, None).is_ok());
        let d = parse_doc(
            Shape::Map("sessions"),
            br#"{"sessions": {"a": 1, "b": 2, "a": 3}}"#,
            None,
        )
        .unwrap();
        let got: Vec<(&str, &[u8])> = d
            .records
            .iter()
            .map(|r| (r.id.as_str(), &r.bytes[..]))
            .collect();
        assert_eq!(got, [("a", &b"3\n"[..]), ("b", &b"2\n"[..])]);
    }
}
