//! Verification of a whole store: every file parses, every blob's hash equals its name and
//! its sidecar's byte_len its size, no manifest row without bytes, no stray temp files
//! (those of dead writers are removed and reported as repaired).

use std::fs;
use std::path::Path;

use super::attachments::is_hex64;
use super::{Kind, Store, atomic, untrusted};

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

    pub fn fsck(&self) -> FsckReport {
        let mut r = FsckReport::default();
        r.problems.extend(self.untrusted_entries());
        if !self.options.read_only {
            match self.remove_stray_temps() {
                Ok(removed) => r.repaired.extend(
                    removed
                        .iter()
                        .map(|p| format!("removed stray temp file {}", p.display())),
                ),
                Err(e) => r.problems.push(format!("cannot clean temp files: {e}")),
            }
        }
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
                    if atomic::temp_owner_pid(&name).is_some_and(atomic::pid_alive) {
                        continue;
                    }
                    r.problems
                        .push(format!("{}: stray temp file", path.display()));
                    continue;
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
        let mut dangling = std::collections::HashSet::new();
        for row in &doc.rows {
            let Some(id) = row.id() else {
                r.problems
                    .push("manifest: a row without attachment_id".into());
                continue;
            };
            if !is_hex64(id) || self.attachments.blob_path(id).exists() {
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
            if self.options.read_only {
                r.problems.extend(
                    dangling
                        .iter()
                        .map(|id| format!("manifest: uncommitted intent {id} has no bytes")),
                );
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
