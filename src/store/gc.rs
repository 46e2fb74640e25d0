//! Orphan reclamation. An attachment is referenced when any record in any collection
//! contains `sha256:<hex>`. Only attachments with an uncommitted intent of ours, older than
//! the grace period and referenced by nothing, are deleted; bytes without an intent of ours
//! are never touched (another program may own them).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{Kind, Store, atomic, collection, fingerprint, manifest};
use crate::error::{Result, StoreError};

#[derive(Clone, Debug)]
pub struct GcOptions {
    pub grace_secs: u64,
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace_secs: 3600,
            dry_run: false,
        }
    }
}

/// What `.gc` accepts. Every command but `dry-run` deletes.
pub const USAGE: [&str; 3] = [
    "echo dry-run > .gc        reports what a collection would delete; deletes nothing",
    "echo run > .gc            DELETES orphaned attachments: referenced by no record, never committed, older than 1 hour",
    "echo grace=SECONDS > .gc  DELETES orphans older than SECONDS (grace=0: every orphan, even one written a second ago)",
];

impl GcOptions {
    /// Parses what was written to `.gc`: exactly one of `run`, `dry-run`, `grace=<seconds>`,
    /// optionally followed by one newline (as `echo` writes it). Anything else, a blank
    /// line included, is refused (EINVAL) so that a typo never runs a collection.
    pub fn parse_command(text: &str) -> Result<GcOptions> {
        let word = text.strip_suffix('\n').unwrap_or(text);
        let mut o = GcOptions::default();
        match word {
            "run" => {}
            "dry-run" => o.dry_run = true,
            w if w.starts_with("grace=") => {
                let secs = &w["grace=".len()..];
                o.grace_secs = secs
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| secs.parse().ok())
                    .flatten()
                    .ok_or_else(|| {
                        StoreError::Invalid(format!(
                            "gc: {w:?}: grace takes a whole number of seconds, as in grace=3600"
                        ))
                    })?;
            }
            w => {
                return Err(StoreError::Invalid(format!(
                    "gc: {w:?} is not a command; write exactly one of `dry-run` (deletes nothing), `run` or `grace=<seconds>` (both delete orphans)"
                )));
            }
        }
        Ok(o)
    }
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct GcReport {
    pub started: String,
    pub finished: String,
    pub dry_run: bool,
    pub grace: u64,
    /// Intents examined.
    pub scanned: u64,
    pub reclaimed: u64,
    pub kept_referenced: u64,
    pub kept_young: u64,
    pub bytes_freed: u64,
    pub reclaimed_ids: Vec<String>,
    pub errors: Vec<String>,
}

struct Running<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Store {
    /// Every `sha256:<hex>` referenced by any record in any collection, read fresh.
    pub fn referenced_attachments(&self) -> Result<HashSet<String>> {
        let mut refs = HashSet::new();
        for kind in Kind::ALL {
            let list = self.list(kind)?;
            if let Some(e) = list.error {
                // Marking from a last good view could free something the new version uses.
                return Err(StoreError::Corrupt(format!(
                    "{}: {e}; gc refuses to run until it parses",
                    kind.dir_name()
                )));
            }
            for r in &list.records {
                collection::attachment_refs(&r.bytes, &mut refs);
            }
        }
        Ok(refs)
    }

    /// Runs one collection and returns its report (also kept as the last report).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        if !opts.dry_run {
            self.writable()?;
        }
        if self.gc_running.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Busy(
                "a garbage collection is already running".into(),
            ));
        }
        let _running = Running(&self.gc_running);
        let mut report = GcReport {
            started: chrono::Utc::now().to_rfc3339(),
            dry_run: opts.dry_run,
            grace: opts.grace_secs,
            ..Default::default()
        };
        let _lock = self.lock.acquire()?;
        let refs = self.referenced_attachments()?;
        let doc = self.manifest.current()?;
        if let Some(e) = self.manifest.error() {
            return Err(StoreError::Corrupt(format!("manifest does not parse: {e}")));
        }
        let cutoff = manifest::now_ms() - (opts.grace_secs as i64).saturating_mul(1000);
        let (mut commit, mut forget) = (HashSet::new(), HashSet::new());
        let mut removed_in: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for row in &doc.rows {
            let Some(id) = row.id() else {
                continue;
            };
            report.scanned += 1;
            if refs.contains(id) {
                report.kept_referenced += 1;
                if !row.committed() {
                    commit.insert(id.to_string());
                }
                continue;
            }
            if row.committed() {
                continue;
            }
            if row.intent_at() >= cutoff {
                report.kept_young += 1;
                continue;
            }
            if !super::attachments::is_hex64(id) {
                report
                    .errors
                    .push(format!("intent {id:?} is not a sha256 hex id; left alone"));
                continue;
            }
            let blob = self.attachments.blob_path(id);
            let size = fingerprint::stat(&blob)?.map(|f| f.size).unwrap_or(0);
            if !opts.dry_run {
                let mut failed = false;
                // Removed through the shard directory's descriptor, opened with no symlink on
                // its path: a shard planted as a symlink never sends a removal elsewhere.
                let shard = blob.parent().unwrap_or(&self.layout.attachments);
                let dir = match super::untrusted::open_dir(shard) {
                    Ok(d) => Some(d),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => {
                        let why = super::untrusted::store_error(shard, "open", e);
                        report.errors.push(why.to_string());
                        continue;
                    }
                };
                for p in [self.attachments.sidecar_path(id), blob.clone()] {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    let r = match &dir {
                        Some(d) => super::untrusted::unlink_in(d, name),
                        None => Ok(()),
                    };
                    match r {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            report.errors.push(format!("remove {}: {e}", p.display()));
                            failed = true;
                        }
                    }
                }
                if failed {
                    continue;
                }
                if let Some(dir) = blob.parent() {
                    removed_in
                        .entry(dir.to_path_buf())
                        .or_default()
                        .push(id.to_string());
                }
            }
            report.reclaimed += 1;
            report.bytes_freed += size;
            report.reclaimed_ids.push(id.to_string());
        }
        // One fsync per shard directory, after all its removals (not one per blob: 10,000
        // reclaimed attachments cost seconds of fsyncs that way). An intent is forgotten
        // only once its removal is durable, or a crash could bring back bytes with no intent.
        for (dir, ids) in removed_in {
            match atomic::fsync_dir(&dir) {
                Ok(()) => forget.extend(ids),
                Err(e) => report.errors.push(format!(
                    "{e}; the intents of {} reclaimed attachment(s) there are kept",
                    ids.len()
                )),
            }
        }
        if !opts.dry_run {
            // Bytes are gone before their intents are forgotten: a crash in between leaves
            // an intent without bytes, which the next run forgets. (Our copy of the old
            // manifest goes first: a large one is not held twice while it is rewritten.)
            drop(doc);
            self.manifest.settle(&forget, &commit)?;
        }
        report.finished = chrono::Utc::now().to_rfc3339();
        tracing::info!(
            reclaimed = report.reclaimed,
            bytes = report.bytes_freed,
            dry_run = opts.dry_run,
            "garbage collection finished"
        );
        *self.last_gc.lock() = Some(report.clone());
        Ok(report)
    }
}
