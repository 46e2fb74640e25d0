//! Verification of a whole store: every file parses, every record is reachable under one
//! usable id that its `id` agrees with, every blob's hash equals its name and its sidecar's
//! byte_len its size, labels are given once, no manifest row without bytes, no stray temp
//! files. `fsck` changes nothing; `fsck_repair` mends what the mount already shows one way
//! (see docs/NOTES.md, "fsck reports, `fsck --repair` mends").

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::attachments::{self, is_hex64};
use super::collection::{self, Doc, Record, Shape};
use super::{Kind, Store, atomic, fingerprint, untrusted, validate};

#[derive(Debug, Default)]
pub struct FsckReport {
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
    pub checked_files: u64,
}

impl FsckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    super::hash::hash_reader(untrusted::open_read(path)?)
}

/// A problem line for an entry that is not what the store may hold there, if it is not.
fn wrong_entry(path: &Path, want_dir: bool) -> Option<String> {
    let m = fs::symlink_metadata(path).ok()?;
    let ok = if want_dir { m.is_dir() } else { m.is_file() };
    (!ok).then(|| {
        format!(
            "{}: is {}{}, not {}: never followed or opened (remove it)",
            path.display(),
            untrusted::describe(&m.file_type()),
            untrusted::owner_note(&m),
            if want_dir {
                "a directory"
            } else {
                "a regular file"
            }
        )
    })
}

impl Store {
    /// Entries where the store holds its files that are symlinks, FIFOs, sockets or devices
    /// (planted by whoever can write the store): each one a problem line.
    fn untrusted_entries(&self) -> Vec<String> {
        let l = &self.layout;
        let mut out = Vec::new();
        // Every directory on the way from the root to a store file.
        let mut dirs = std::collections::BTreeSet::new();
        for d in l.dirs() {
            let mut cur = d.as_path();
            while cur.starts_with(&l.root) && cur != l.root {
                dirs.insert(cur.to_path_buf());
                match cur.parent() {
                    Some(p) => cur = p,
                    None => break,
                }
            }
        }
        out.extend(dirs.iter().filter_map(|d| wrong_entry(d, true)));
        for f in [&l.sessions, &l.goals, &l.manifest, &l.lock] {
            out.extend(wrong_entry(f, false));
        }
        out.extend(wrong_entry(&l.root.join("agentmount.log"), false));
        let state = l.root.join(".agentmount");
        out.extend(wrong_entry(&state, true));
        // Our state directory, a level or four deep (history/<collection>/<id>/<version>).
        fn walk(dir: &Path, depth: u32, out: &mut Vec<String>) {
            for e in untrusted::read_dir(dir).into_iter().flatten().flatten() {
                let p = dir.join(e.file_name());
                match e.file_type() {
                    Ok(t) if t.is_dir() && depth > 0 => walk(&p, depth - 1, out),
                    Ok(t) if t.is_file() || t.is_dir() => {}
                    Ok(_) => out.extend(wrong_entry(&p, false)),
                    Err(_) => {}
                }
            }
        }
        walk(&state, 4, &mut out);
        for e in untrusted::read_dir(&l.conversations)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("conversation-") && name.ends_with(".json") {
                out.extend(wrong_entry(&l.conversations.join(&name), false));
            }
        }
        let cas = self.attachments.cas_dir();
        out.extend(wrong_entry(&cas, true));
        for e in untrusted::read_dir(&cas).into_iter().flatten().flatten() {
            out.extend(wrong_entry(&cas.join(e.file_name()), true));
        }
        out
    }

    /// Opens a store for fsck. `Store::open` of a writable store removes stray temp files
    /// before anyone sees them; fsck must see them (to report them, or to list their
    /// removal), so the store is opened read-only and made writable afterwards for a repair.
    pub fn open_for_fsck(
        layout: super::Layout,
        options: super::Options,
        repair: bool,
    ) -> crate::error::Result<Store> {
        let mut s = Store::open(
            layout,
            super::Options {
                read_only: true,
                ..options
            },
        )?;
        s.options.read_only = !repair;
        Ok(s)
    }

    /// Checks the store and changes nothing: everything `fsck_repair` would mend is a
    /// problem here.
    pub fn fsck(&self) -> FsckReport {
        self.check(false)
    }

    /// Checks the store and mends what it safely can (each repair listed); what it cannot
    /// decide stays a problem. Needs a writable store (a read-only one only reports).
    pub fn fsck_repair(&self) -> FsckReport {
        self.check(!self.options.read_only)
    }

    fn check(&self, repair: bool) -> FsckReport {
        let mut r = FsckReport::default();
        r.problems.extend(self.untrusted_entries());
        self.check_temps(&mut r, repair);
        for kind in Kind::ALL {
            match self.list(kind) {
                Ok(l) => {
                    r.checked_files += 1;
                    if let Some(e) = l.error {
                        r.problems
                            .push(format!("{}: does not parse: {e}", kind.dir_name()));
                    }
                }
                Err(e) => r.problems.push(format!("{}: {e}", kind.dir_name())),
            }
        }
        self.check_sessions(&mut r, repair);
        self.check_goals(&mut r, repair);
        self.check_conversations(&mut r, repair);
        let doc = match self.manifest.current() {
            Ok(d) => {
                if let Some(e) = self.manifest.error() {
                    r.problems.push(format!(
                        "{}: does not parse: {e}",
                        self.manifest.path().display()
                    ));
                }
                d
            }
            Err(e) => {
                r.problems.push(format!("manifest: {e}"));
                Default::default()
            }
        };
        let cas = self.attachments.cas_dir();
        let shards = untrusted::read_dir(&cas).into_iter().flatten().flatten();
        for shard in shards {
            let sname = shard.file_name().to_string_lossy().into_owned();
            let shard_path = cas.join(shard.file_name());
            if !shard.file_type().is_ok_and(|t| t.is_dir()) {
                continue; // reported above
            }
            let Ok(entries) = untrusted::read_dir(&shard_path) else {
                r.problems.push(format!(
                    "{}: not a readable directory",
                    shard_path.display()
                ));
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = shard_path.join(&name);
                if (is_hex64(&name) || name.strip_suffix(".json").is_some_and(is_hex64))
                    && let Some(p) = wrong_entry(&path, false)
                {
                    r.problems.push(p);
                    continue;
                }
                if name.contains(atomic::TEMP_MARKER) {
                    continue; // check_temps
                }
                if let Some(hex) = name.strip_suffix(".json") {
                    if !is_hex64(hex) {
                        continue;
                    }
                    r.checked_files += 1;
                    let sidecar = match super::fingerprint::read_with_fingerprint(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            let (b, _) = b.ok_or("gone")?;
                            serde_json::from_slice::<serde_json::Value>(&b)
                                .map_err(|e| e.to_string())
                        }) {
                        Ok(v) => v,
                        Err(err) => {
                            r.problems
                                .push(format!("{}: sidecar does not parse: {err}", path.display()));
                            continue;
                        }
                    };
                    self.check_sidecar(&mut r, repair, hex, &path, &sidecar);
                    let blob = self.attachments.blob_path(hex);
                    match fs::symlink_metadata(&blob) {
                        Ok(m) if !m.is_file() => {} // reported as a planted entry
                        Ok(m) => {
                            if let Some(n) =
                                sidecar.get("byte_len").and_then(serde_json::Value::as_u64)
                                && n != m.len()
                            {
                                r.problems.push(format!(
                                    "{}: byte_len {n} but the bytes are {} long",
                                    path.display(),
                                    m.len()
                                ));
                            }
                        }
                        Err(_) => r
                            .problems
                            .push(format!("{}: sidecar without bytes", path.display())),
                    }
                    continue;
                }
                if !is_hex64(&name) {
                    continue;
                }
                r.checked_files += 1;
                if !name.starts_with(&sname) {
                    r.problems.push(format!(
                        "{}: blob in the wrong shard directory",
                        path.display()
                    ));
                }
                match hash_file(&path) {
                    Ok((h, _)) if h == name => {}
                    Ok((h, _)) => r.problems.push(format!(
                        "{}: bytes hash to {h}, not to their name",
                        path.display()
                    )),
                    Err(e) => r
                        .problems
                        .push(format!("{}: cannot read: {e}", path.display())),
                }
            }
        }
        self.check_labels(&mut r, repair);
        let mut dangling = std::collections::HashSet::new();
        for row in &doc.rows {
            let Some(id) = row.id() else {
                r.problems
                    .push("manifest: a row without attachment_id".into());
                continue;
            };
            if !is_hex64(id)
                || super::fingerprint::stat(&self.attachments.blob_path(id))
                    .ok()
                    .flatten()
                    .is_some_and(|f| f.is_regular())
            {
                continue;
            }
            if row.committed() {
                r.problems.push(format!(
                    "manifest: committed intent {id} has no bytes in the store"
                ));
            } else {
                // A writer crashed between its intent and its bytes (or gc between deleting
                // bytes and forgetting the intent): the intent is all that is left.
                dangling.insert(id.to_string());
            }
        }
        if !dangling.is_empty() {
            if !repair {
                r.problems.extend(dangling.iter().map(|id| {
                    format!("manifest: uncommitted intent {id} has no bytes (a writer stopped between its intent and its bytes; `agentmount fsck --repair` forgets it)")
                }));
            } else {
                let res = self
                    .lock
                    .acquire()
                    .and_then(|_g| self.manifest.forget(&dangling));
                match res {
                    Ok(()) => r.repaired.extend(dangling.iter().map(|id| {
                        format!("forgot uncommitted intent {id}: its bytes never landed")
                    })),
                    Err(e) => r
                        .problems
                        .push(format!("manifest: cannot forget dangling intents: {e}")),
                }
            }
        }
        r
    }
}

/// One thing found wrong, and what `--repair` does about it (`None`: it cannot decide).
struct Finding {
    problem: String,
    fix: Option<String>,
}

impl Finding {
    fn left(problem: String) -> Self {
        Finding { problem, fix: None }
    }
    fn mend(problem: String, fix: String) -> Self {
        Finding {
            problem,
            fix: Some(fix),
        }
    }
}

/// Sorts findings into the report: without a repair (or when it failed) every finding is
/// a problem; after one, the mended are listed as repaired.
fn settle(
    r: &mut FsckReport,
    findings: Vec<Finding>,
    repair: bool,
    mend: impl FnOnce() -> crate::error::Result<()>,
) {
    let mendable = findings.iter().any(|f| f.fix.is_some());
    let failed = if repair && mendable {
        mend().err().map(|e| e.to_string())
    } else {
        None
    };
    for f in findings {
        match (f.fix, repair, &failed) {
            (Some(fix), true, None) => r.repaired.push(format!("{}: {fix}", f.problem)),
            (Some(_), true, Some(e)) => r
                .problems
                .push(format!("{} (the repair failed: {e})", f.problem)),
            (Some(_), false, _) => r.problems.push(format!(
                "{} (`agentmount fsck --repair` mends it)",
                f.problem
            )),
            (None, _, _) => r.problems.push(f.problem),
        }
    }
}

/// What the records map of a map-shaped collection file holds, as written: its keys in
/// file order (a key given twice appears twice), and the top-level keys given more than
/// once. Reading the keys costs no tree of the records.
fn scan_map_keys(bytes: &[u8], key: &'static str) -> Option<(Vec<String>, Vec<String>)> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Top(&'static str);
    impl<'de> Visitor<'de> for Top {
        type Value = (Vec<String>, Vec<String>);
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut seen, mut twice, mut keys) = (HashSet::new(), Vec::new(), Vec::new());
            while let Some(k) = map.next_key::<String>()? {
                if k == self.0 {
                    keys = map.next_value_seed(Keys)?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                if !seen.insert(k.clone()) {
                    twice.push(k);
                }
            }
            Ok((keys, twice))
        }
    }
    struct Keys;
    impl<'de> DeserializeSeed<'de> for Keys {
        type Value = Vec<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object keyed by id")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = de.deserialize_map(Top(key)).ok()?;
    de.end().ok()?;
    Some(v)
}

/// Each value given more than once, with how many times, in order of first appearance.
fn repeated<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<(&'a str, usize)> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut order = Vec::new();
    for i in items {
        let c = count.entry(i).or_insert(0);
        if *c == 0 {
            order.push(i);
        }
        *c += 1;
    }
    order
        .into_iter()
        .filter_map(|i| count.get(i).filter(|&&n| n > 1).map(|&n| (i, n)))
        .collect()
}

/// A value quoted in a problem line: a hostile store can make it megabytes long.
fn short(v: &Value) -> String {
    crate::error::bounded(&v.to_string(), 200).into_owned()
}

/// Why the mount cannot show record `id` of `kind` (its file name would be refused).
fn hidden_why(kind: Kind, id: &str) -> Option<String> {
    validate::check_id(kind, id).err().map(|e| {
        let why = e.to_string();
        let why = why.strip_prefix("invalid: ").unwrap_or(&why).to_string();
        format!("hidden from the mount ({why}); fsck cannot tell which id was meant: rename or remove it by hand")
    })
}

impl Store {
    /// Temp files of ours (`*.agentmount-tmp.*`) in every store directory. A dead
    /// writer's is a problem (with its size: an interrupted ingest can leave gigabytes)
    /// until a repair removes it; a live writer's is left alone and not reported.
    fn check_temps(&self, r: &mut FsckReport, repair: bool) {
        let mut dirs = self.layout.dirs();
        let cas = self.attachments.cas_dir();
        dirs.extend(
            untrusted::read_dir(&cas)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| cas.join(e.file_name())),
        );
        for d in dirs {
            let Ok(entries) = untrusted::read_dir(&d) else {
                continue; // missing, or planted (reported above)
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.contains(atomic::TEMP_MARKER) {
                    continue;
                }
                let path = d.join(e.file_name());
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                let Some(pid) = atomic::temp_owner_pid(&name) else {
                    r.problems.push(format!(
                        "{}: named like an agentmount temp file ({size} bytes) but names no writer: left alone (remove it by hand when no writer runs)",
                        path.display()
                    ));
                    continue;
                };
                if atomic::pid_alive(pid) {
                    continue; // being written
                }
                let what = format!(
                    "{}: stray temp file of writer pid {pid}, which is gone ({size} bytes)",
                    path.display()
                );
                if !repair {
                    r.problems
                        .push(format!("{what} (`agentmount fsck --repair` removes it)"));
                    continue;
                }
                let removed = untrusted::open_dir(&d).and_then(|dir| {
                    untrusted::unlink_in(&dir, &e.file_name().to_string_lossy())?;
                    dir.sync_all()
                });
                match removed {
                    Ok(()) => r.repaired.push(format!("{what}: removed")),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => r.problems.push(format!("{what}: cannot remove it: {e}")),
                }
            }
        }
    }

    /// sessions.json: keys given twice, keys that are not a session id, records whose
    /// `id` is not their key, records that are not objects.
    fn check_sessions(&self, r: &mut FsckReport, repair: bool) {
        let path = self.layout.sessions.clone();
        let Ok(Some((bytes, _))) = fingerprint::read_with_fingerprint(&path) else {
            return; // missing, or reported with its reason above
        };
        let shape = Shape::Map("sessions");
        let Ok(doc) = collection::parse_doc(shape, &bytes, None) else {
            return; // does not parse: reported above
        };
        let file = path.display().to_string();
        let mut findings = Vec::new();
        if let Some((keys, twice)) = scan_map_keys(&bytes, "sessions") {
            for k in twice {
                findings.push(Finding::mend(
                    format!("{file}: top-level key {k:?} is given more than once; the mount shows the last"),
                    "rewritten with the last, as the mount showed it".into(),
                ));
            }
            for (k, n) in repeated(keys.iter().map(String::as_str)) {
                findings.push(Finding::mend(
                    format!("{file}: session key {k:?} is given {n} times; the mount shows the last one (a JSON object's last value wins)"),
                    "kept the last, in the first one's place, as the mount showed it".into(),
                ));
            }
        }
        drop(bytes);
        for rec in &doc.records {
            if let Some(why) = hidden_why(Kind::Sessions, &rec.id) {
                findings.push(Finding::left(format!(
                    "{file}: session {:?}: {why}",
                    rec.id
                )));
                continue;
            }
            match rec.value() {
                Ok(Value::Object(m)) => match m.get("id") {
                    None => {}
                    Some(Value::String(s)) if *s == rec.id => {}
                    Some(other) => findings.push(Finding::mend(
                        format!(
                            "{file}: session {:?} holds a record whose \"id\" is {}; the mount shows it as {}.json",
                            rec.id,
                            short(other),
                            rec.id
                        ),
                        format!(
                            "its \"id\" set to its key {:?} (the key is the name the mount and the platform look it up by)",
                            rec.id
                        ),
                    )),
                },
                Ok(other) => findings.push(Finding::left(format!(
                    "{file}: session {:?} is not a JSON object but {}: it cannot be written back",
                    rec.id,
                    short(&other)
                ))),
                Err(e) => findings.push(Finding::left(format!("{file}: {e}"))),
            }
        }
        settle(r, findings, repair, || {
            let _lock = self.lock.acquire()?;
            self.sessions
                .update(|cur| {
                    let mut records = cur.value.records.clone();
                    for rec in &mut records {
                        if !validate::valid_id(Kind::Sessions, &rec.id) {
                            continue;
                        }
                        if let Ok(v @ Value::Object(_)) = rec.value()
                            && v.get("id").is_some_and(|i| i.as_str() != Some(&rec.id))
                        {
                            *rec = Arc::new(Record::new(
                                rec.id.clone(),
                                &collection::with_id(v, &rec.id),
                            ));
                        }
                    }
                    let doc = Doc::from_records(cur.value.top.clone(), records);
                    let bytes = collection::serialize_doc(shape, &doc)?;
                    Ok(Some((bytes, doc, ())))
                })
                .map(|_| ())
        });
    }

    /// goals.json: ids given twice (the mount shows the first; the rest are hidden and
    /// would surface when it is removed), goals without a usable id.
    fn check_goals(&self, r: &mut FsckReport, repair: bool) {
        let path = self.layout.goals.clone();
        let Ok(Some((bytes, _))) = fingerprint::read_with_fingerprint(&path) else {
            return;
        };
        let Ok(doc) = collection::parse_doc(Shape::Array, &bytes, None) else {
            return;
        };
        drop(bytes);
        let file = path.display().to_string();
        let mut findings = Vec::new();
        for (i, rec) in doc.records.iter().enumerate() {
            if rec.id.is_empty() {
                findings.push(Finding::left(format!(
                    "{file}: goal #{} (in file order) has no string \"id\": hidden from the mount; give it one by hand",
                    i + 1
                )));
            } else if let Some(why) = hidden_why(Kind::Goals, &rec.id) {
                findings.push(Finding::left(format!("{file}: goal {:?}: {why}", rec.id)));
            }
        }
        for (id, n) in repeated(doc.records.iter().map(|r| r.id.as_str())) {
            if !validate::valid_id(Kind::Goals, id) {
                continue; // reported as hidden
            }
            findings.push(Finding::mend(
                format!("{file}: goal {id:?} is given {n} times; the mount shows the first, the others are hidden (and one would reappear when it is removed)"),
                format!("removed the {} later one(s), keeping the first, as the mount showed it", n - 1),
            ));
        }
        settle(r, findings, repair, || {
            let _lock = self.lock.acquire()?;
            self.goals
                .update(|cur| {
                    let d = &cur.value;
                    let records: Vec<_> = d
                        .records
                        .iter()
                        .enumerate()
                        .filter(|(i, rec)| {
                            !validate::valid_id(Kind::Goals, &rec.id)
                                || d.index.get(&rec.id) == Some(i)
                        })
                        .map(|(_, rec)| rec.clone())
                        .collect();
                    let doc = Doc::from_records(d.top.clone(), records);
                    let bytes = collection::serialize_doc(Shape::Array, &doc)?;
                    Ok(Some((bytes, doc, ())))
                })
                .map(|_| ())
        });
    }

    /// Conversation files named by an id the mount refuses, or whose `id` is not their
    /// name.
    fn check_conversations(&self, r: &mut FsckReport, repair: bool) {
        let dir = &self.layout.conversations;
        let Ok(entries) = untrusted::read_dir(dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.contains(atomic::TEMP_MARKER))
            .collect();
        names.sort();
        for name in names {
            let Some(id) = name
                .strip_prefix("conversation-")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let path = dir.join(&name);
            if let Some(why) = hidden_why(Kind::Conversations, id) {
                r.problems
                    .push(format!("{}: conversation {id:?}: {why}", path.display()));
                continue;
            }
            let Ok(Some((bytes, _))) = fingerprint::read_with_fingerprint(&path) else {
                continue;
            };
            let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&bytes) else {
                continue; // does not parse: reported above
            };
            let Some(other) = m.get("id").filter(|v| v.as_str() != Some(id)) else {
                continue;
            };
            let f = Finding::mend(
                format!(
                    "{}: its \"id\" is {} but its name says {id:?}; the mount shows it as {id}.json",
                    path.display(),
                    short(other)
                ),
                format!(
                    "its \"id\" set to {id:?}, its name (what the mount and the platform look it up by)"
                ),
            );
            settle(r, vec![f], repair, || {
                let _lock = self.lock.acquire()?;
                let id = id.to_string();
                self.conv_file(&id)
                    .update(|cur| {
                        let Some(rec) = cur.value.0.as_ref() else {
                            return Ok(None);
                        };
                        let rec = Arc::new(Record::new(
                            String::new(),
                            &collection::with_id(rec.value()?, &id),
                        ));
                        Ok(Some((rec.bytes.to_vec(), super::ConvFile(Some(rec)), ())))
                    })
                    .map(|_| ())
            });
        }
    }

    /// A sidecar whose `id` is not its name, or whose label the mount cannot show.
    fn check_sidecar(&self, r: &mut FsckReport, repair: bool, hex: &str, path: &Path, v: &Value) {
        if let Some(other) = v.get("id").filter(|i| i.as_str() != Some(hex)) {
            let f = Finding::mend(
                format!(
                    "{}: its \"id\" is {} but its name says {hex}",
                    path.display(),
                    short(other)
                ),
                format!("its \"id\" set to {hex}, its name (the hash of the bytes it describes)"),
            );
            settle(r, vec![f], repair, || {
                let _lock = self.lock.acquire()?;
                self.write_sidecar(hex, |cur| {
                    cur.and_then(Value::as_object).map(|m| {
                        let mut m = m.clone();
                        m.insert("id".into(), Value::String(hex.into()));
                        m
                    })
                })
            });
        }
        match v.get("label") {
            None | Some(Value::Null) => {}
            Some(Value::String(l)) if attachments::valid_label(l) => {}
            Some(other) => r.problems.push(format!(
                "{}: label {} cannot name a file in attachments/, so the mount shows no label for it; fsck cannot tell what was meant: change it by hand",
                path.display(),
                short(other)
            )),
        }
    }

    /// Labels that two or more sidecars give: the mount shows the label as the newest
    /// sidecar's; a repair takes it from the others.
    fn check_labels(&self, r: &mut FsckReport, repair: bool) {
        let listing = match self.attachments.listing() {
            Ok(l) => l,
            Err(e) => {
                r.problems
                    .push(format!("attachments: cannot list the blobs: {e}"));
                return;
            }
        };
        let mut by_label: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for b in listing.blobs() {
            if let Some(l) = b.sidecar.as_ref().and_then(|s| s.label.as_deref()) {
                by_label.entry(l).or_default().push(b.hex());
            }
        }
        for (label, mut hexes) in by_label {
            if hexes.len() < 2 {
                continue;
            }
            hexes.sort();
            let Some(winner) = listing.label(label).map(|id| attachments::to_hex(id)) else {
                continue;
            };
            let losers: Vec<String> = hexes.into_iter().filter(|h| *h != winner).collect();
            let f = Finding::mend(
                format!(
                    "attachments: label {label:?} is given by {} sidecars; the mount shows attachments/{label} as {winner} (the newest sidecar), not {}",
                    losers.len() + 1,
                    losers.join(", ")
                ),
                format!("the label taken from {}", losers.join(", ")),
            );
            settle(r, vec![f], repair, || {
                let _lock = self.lock.acquire()?;
                for h in &losers {
                    self.drop_label(h)?;
                }
                self.attachments.invalidate();
                Ok(())
            });
        }
    }
}
