//! Reloading a collection file by parsing only what changed.
//!
//! The platform rewrites sessions.json whole to change one session. A parsed version keeps
//! its file's bytes and where each record sits in them ([`Source`]); the next version is
//! compared with those bytes, and only the records between the first and the last differing
//! byte are parsed again. The bytes before and after are the same text in the same place of
//! a document that parsed, so they still parse and still mean the same records; the part in
//! between is checked against the grammar of the records container at that point (commas
//! included). Anything this cannot decide (a change outside the records, a key that now
//! appears twice) falls back to parsing the whole file, which also gives the error message
//! when the new version does not parse.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::collection::{Doc, Record, Shape, array_record, record_from_raw, safe_record_id};

/// Where a parsed version's records sit in its file.
pub struct Source {
    bytes: Box<[u8]>,
    /// The records container's opening and closing bracket.
    open: usize,
    close: usize,
    /// Per record, in order: from its first byte (a map entry's key) to the end of its value.
    spans: Vec<Range<usize>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "Source({} bytes, {} records)",
            self.bytes.len(),
            self.spans.len()
        )
    }
}

/// JSON whitespace (not form feed or vertical tab, which `is_ascii_whitespace` includes).
pub(crate) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

impl Source {
    /// The source of a file whose records sit at `spans` (at least one: the brackets are
    /// found from the first and the last record).
    pub fn new(bytes: Box<[u8]>, spans: Vec<Range<usize>>) -> Option<Source> {
        let (first, last) = (spans.first()?, spans.last()?);
        let open = bytes.get(..first.start)?.iter().rposition(|&b| !is_ws(b))?;
        let close = last.end + bytes.get(last.end..)?.iter().position(|&b| !is_ws(b))?;
        let brackets = (bytes[open], bytes[close]);
        matches!(brackets, (b'{', b'}') | (b'[', b']')).then_some(Source {
            bytes,
            open,
            close,
            spans,
        })
    }
}

/// Records parsed from part of a container, with their spans relative to that part.
pub struct Entries {
    pub records: Vec<Arc<Record>>,
    pub spans: Vec<Range<usize>>,
}

/// Parses the entries of a records container between two points: `text` follows an entry
/// (`after_entry`, so it must begin with a comma) or the opening bracket, and precedes an
/// entry (`before_entry`, so it must end with a comma) or the closing bracket. `None` when
/// `text` is not that, or a map key appears twice in it.
pub fn parse_entries(
    shape: Shape,
    text: &[u8],
    after_entry: bool,
    before_entry: bool,
    prev: Option<&Doc>,
) -> Option<Entries> {
    #[derive(PartialEq)]
    enum State {
        Start,
        AfterEntry,
        AfterComma,
    }
    let mut state = if after_entry {
        State::AfterEntry
    } else {
        State::Start
    };
    let mut out = Entries {
        records: Vec::new(),
        spans: Vec::new(),
    };
    let mut keys = HashSet::new();
    let mut pos = 0;
    loop {
        pos += text[pos..]
            .iter()
            .position(|&b| !is_ws(b))
            .unwrap_or(text.len() - pos);
        if pos == text.len() {
            let ok = match state {
                State::Start => true,
                State::AfterEntry => !before_entry,
                State::AfterComma => before_entry,
            };
            return ok.then_some(out);
        }
        if state == State::AfterEntry {
            if text[pos] != b',' {
                return None;
            }
            pos += 1;
            state = State::AfterComma;
            continue;
        }
        let start = pos;
        let key = match shape {
            Shape::Map(_) => {
                if text[pos] != b'"' {
                    return None;
                }
                let mut keys_de =
                    serde_json::Deserializer::from_slice(&text[pos..]).into_iter::<String>();
                let key = keys_de.next()?.ok()?;
                pos += keys_de.byte_offset();
                pos += text[pos..].iter().position(|&b| !is_ws(b))?;
                if text[pos] != b':' {
                    return None;
                }
                pos += 1;
                if !keys.insert(key.clone()) {
                    return None;
                }
                Some(key)
            }
            Shape::Array => None,
        };
        let mut values =
            serde_json::Deserializer::from_slice(&text[pos..]).into_iter::<&RawValue>();
        let raw = values.next()?.ok()?;
        pos += values.byte_offset();
        let rec = match key {
            Some(k) => {
                let prev = prev.and_then(|d| d.get(&k));
                record_from_raw(k, raw, prev, 4).ok()?
            }
            None => array_record(raw, prev).ok()?,
        };
        out.records.push(rec);
        out.spans.push(start..pos);
        state = State::AfterEntry;
    }
}

/// The next version of `prev`'s file, parsed by difference; the bytes back when that
/// cannot be decided (the caller parses the whole file).
pub fn splice(shape: Shape, new: Vec<u8>, prev: &Doc) -> Result<Doc, Vec<u8>> {
    let Some(sp) = splice_spans(shape, &new, prev) else {
        return Err(new);
    };
    let mut doc = if sp.same_ids {
        Doc {
            top: prev.top.clone(),
            records: sp.records,
            index: prev.index.clone(),
            source: None,
        }
    } else {
        Doc::from_records(prev.top.clone(), sp.records)
    };
    doc.source = Some(Source {
        bytes: new.into_boxed_slice(),
        open: sp.open,
        close: sp.close,
        spans: sp.spans,
    });
    Ok(doc)
}

/// The records and their places in the new version.
struct Spliced {
    records: Vec<Arc<Record>>,
    open: usize,
    close: usize,
    spans: Vec<Range<usize>>,
    /// Every id is where it was, so the previous index serves as is.
    same_ids: bool,
}

fn splice_spans(shape: Shape, new: &[u8], prev: &Doc) -> Option<Spliced> {
    let src = prev.source.as_ref()?;
    let old = &src.bytes[..];
    if old == new {
        return Some(Spliced {
            records: prev.records.clone(),
            open: src.open,
            close: src.close,
            spans: src.spans.clone(),
            same_ids: true,
        });
    }
    let p = common_prefix(old, new);
    let s = common_suffix(&old[p..], &new[p..]);
    let (old_end, new_end) = (old.len() - s, new.len() - s);
    // The change must lie inside the records container (its brackets unchanged).
    if p <= src.open || old_end > src.close {
        return None;
    }
    let delta = new.len() as isize - old.len() as isize;
    let shift = |x: usize| x.checked_add_signed(delta);
    // Records wholly before the first difference, and wholly after the last one, stay.
    let i = src.spans.partition_point(|r| r.end < p);
    let j = i + src.spans[i..].partition_point(|r| r.start < old_end);
    let wstart = if i > 0 {
        src.spans[i - 1].end
    } else {
        src.open + 1
    };
    let wend = shift(if j < src.spans.len() {
        src.spans[j].start
    } else {
        src.close
    })?;
    if wend < new_end || wstart > p || wend < wstart {
        return None;
    }
    let window = parse_entries(
        shape,
        new.get(wstart..wend)?,
        i > 0,
        j < src.spans.len(),
        Some(prev),
    )?;
    if let Shape::Map(_) = shape {
        // A key of the window that a kept record has too would make it appear twice.
        for r in &window.records {
            if !safe_record_id(&r.id) {
                return None;
            }
            if let Some(&at) = prev.index.get(&r.id)
                && !(i..j).contains(&at)
            {
                return None;
            }
        }
    }
    // The kept records are the same Arcs in the same order, so the ids are where they were
    // exactly when the window holds the ids it replaces.
    let same_ids = window.records.len() == j - i
        && window
            .records
            .iter()
            .zip(&prev.records[i..j])
            .all(|(a, b)| a.id == b.id);
    let n = src.spans.len() - (j - i) + window.records.len();
    let mut records = Vec::with_capacity(n);
    let mut spans = Vec::with_capacity(n);
    records.extend_from_slice(&prev.records[..i]);
    spans.extend_from_slice(&src.spans[..i]);
    records.extend(window.records);
    spans.extend(
        window
            .spans
            .into_iter()
            .map(|r| r.start + wstart..r.end + wstart),
    );
    records.extend_from_slice(&prev.records[j..]);
    for r in &src.spans[j..] {
        spans.push(shift(r.start)?..shift(r.end)?);
    }
    Some(Spliced {
        records,
        open: src.open,
        close: shift(src.close)?,
        spans,
        same_ids,
    })
}

/// Parses a whole file whose records container is `container` (a slice of `bytes`), keeping
/// where each record sits. `None` when the container does not hold well-formed entries or a
/// map key appears twice (the caller's full parse decides those).
pub fn parse_container(
    shape: Shape,
    bytes: &[u8],
    container: &[u8],
    prev: Option<&Doc>,
) -> Option<Entries> {
    let base = (container.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize)? + 1;
    let (first, last) = (*container.first()?, *container.last()?);
    let interior = container.get(1..container.len().checked_sub(1)?)?;
    if !matches!(
        (shape, first, last),
        (Shape::Map(_), b'{', b'}') | (Shape::Array, b'[', b']')
    ) {
        return None;
    }
    let mut e = parse_entries(shape, interior, false, false, prev)?;
    for r in &mut e.spans {
        *r = r.start + base..r.end + base;
    }
    Some(e)
}

/// Length of the common prefix: blocks compared by memcmp, then bytes in the first block
/// that differs.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 512;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Length of the common suffix.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 512;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + BLOCK <= n && a[n - i - BLOCK..n - i] == b[n - i - BLOCK..n - i] {
        i += BLOCK;
    }
    while i < n && a[n - 1 - i] == b[n - 1 - i] {
        i += 1;
    }
    i
}
