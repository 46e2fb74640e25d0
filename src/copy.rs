//! `agentmount copy FROM TO`: a whole store into another, between any two backends, through
//! the same seam the mount uses (so every record is validated as a write through the mount
//! would be, and every blob is hashed on the way in). Idempotent: records the target holds
//! with the same bytes and blobs it already has are skipped.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend;
use crate::cli::StoreArgs;

fn args_for(store: &Path) -> StoreArgs {
    StoreArgs {
        store: Some(store.to_path_buf()),
        create: false,
        sessions_file: None,
        goals_file: None,
        conversations_dir: None,
        attachments_dir: None,
        max_record_bytes: 16 << 20,
        lock_timeout: Duration::from_secs(10),
        state_dir: None,
        cache_dir: None,
        // Blobs pass through the local cache one at a time.
        cache_size: 0,
    }
}

fn is_url(p: &Path) -> bool {
    p.to_str().is_some_and(backend::postgres::is_url)
}

/// What a copy did, for the summary line.
#[derive(Default)]
struct Tally {
    records: u64,
    records_skipped: u64,
    blobs: u64,
    blobs_skipped: u64,
    bytes: u64,
    sidecars: u64,
}

struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn show(&mut self, t: &Tally, total_records: usize, total_blobs: usize, force: bool) {
        if !self.on || (!force && self.last.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last = Instant::now();
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\rcopy: records {}/{total_records}, attachments {}/{total_blobs} ({:.1} MiB)   ",
            t.records + t.records_skipped,
            t.blobs + t.blobs_skipped,
            t.bytes as f64 / (1 << 20) as f64
        );
        let _ = e.flush();
    }
}

pub fn run(from: &Path, to: &Path, quiet: bool) -> Result<(), String> {
    let from_args = args_for(from);
    from_args.check_exists()?;
    if !is_url(to) && !to.exists() {
        std::fs::create_dir_all(to)
            .map_err(|e| format!("cannot create the store {}: {e}", to.display()))?;
    }
    let to_args = args_for(to);
    let src = backend::open(&from_args.config(true), Path::new("agentmount-copy-from"))?;
    let dst = backend::open(&to_args.config(false), Path::new("agentmount-copy-to"))?;
    let mut tally = Tally::default();
    let mut progress = Progress {
        on: !quiet && std::io::stderr().is_terminal(),
        last: Instant::now(),
    };
    let mut lists = Vec::new();
    for &kind in src.collections() {
        let list = src
            .list(kind)
            .map_err(|e| format!("read {}: {e}", kind.dir_name()))?;
        if let Some(e) = list.error {
            return Err(format!(
                "{} of {} cannot be read ({e}); nothing copied from it",
                kind.dir_name(),
                src.location()
            ));
        }
        if !list.records.is_empty() && !dst.collections().contains(&kind) {
            return Err(format!(
                "{} has {} {} but {} ({}) has no such collection",
                src.location(),
                list.records.len(),
                kind.dir_name(),
                dst.location(),
                dst.backend_name()
            ));
        }
        lists.push((kind, list.records));
    }
    let listing = match src.attachments() {
        Some(a) => Some(a.listing().map_err(|e| format!("list attachments: {e}"))?),
        None => None,
    };
    let total_blobs = listing.as_ref().map_or(0, |l| l.len());
    if total_blobs > 0 && dst.attachments().is_none() {
        return Err(format!(
            "{} has {total_blobs} attachments but {} ({}) keeps none",
            src.location(),
            dst.location(),
            dst.backend_name()
        ));
    }
    let total_records: usize = lists.iter().map(|(_, r)| r.len()).sum();
    // Attachments first: a record that refers to one finds it there.
    if let (Some(listing), Some(sa), Some(da)) = (&listing, src.attachments(), dst.attachments()) {
        for b in listing.blobs() {
            let hex = b.hex();
            if da
                .blob_meta(&hex)
                .map_err(|e| format!("attachment {hex} in the target: {e}"))?
                .is_some()
            {
                tally.blobs_skipped += 1;
            } else {
                let mut src_file = sa
                    .open_blob(&hex)
                    .map_err(|e| format!("read attachment {hex}: {e}"))?;
                let mut ing = da
                    .begin_ingest()
                    .map_err(|e| format!("write attachment {hex}: {e}"))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0u64;
                loop {
                    let n = src_file
                        .read(&mut buf)
                        .map_err(|e| format!("read attachment {hex}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    ing.write_at(off, &buf[..n])
                        .map_err(|e| format!("write attachment {hex}: {e}"))?;
                    off += n as u64;
                    tally.bytes += n as u64;
                    progress.show(&tally, total_records, total_blobs, false);
                }
                da.finish_put(ing, &hex)
                    .map_err(|e| format!("write attachment {hex}: {e}"))?;
                tally.blobs += 1;
            }
            // The write-ahead manifest's state of the blob, as the source has it: so the
            // target's gc keeps what the source's would keep.
            let state = sa
                .intent(&hex)
                .map_err(|e| format!("read the intent of {hex}: {e}"))?;
            if da
                .intent(&hex)
                .map_err(|e| format!("the intent of {hex} in the target: {e}"))?
                != state
            {
                da.set_intent(&hex, state)
                    .map_err(|e| format!("write the intent of {hex}: {e}"))?;
            }
            if b.sidecar.is_some() {
                let (bytes, _) = sa
                    .sidecar_bytes(&hex)
                    .map_err(|e| format!("read the sidecar of {hex}: {e}"))?;
                da.import_sidecar(&hex, &bytes)
                    .map_err(|e| format!("write the sidecar of {hex}: {e}"))?;
                tally.sidecars += 1;
            }
            progress.show(&tally, total_records, total_blobs, false);
        }
    }
    for (kind, records) in &lists {
        for r in records {
            let same = dst
                .get(*kind, &r.id)
                .map_err(|e| format!("{} {} in the target: {e}", kind.singular(), r.id))?
                .is_some_and(|d| d.bytes == r.bytes);
            if same {
                tally.records_skipped += 1;
            } else {
                dst.upsert(*kind, &r.id, &r.bytes)
                    .map_err(|e| format!("{} {}: {e}", kind.singular(), r.id))?;
                tally.records += 1;
            }
            progress.show(&tally, total_records, total_blobs, false);
        }
    }
    progress.show(&tally, total_records, total_blobs, true);
    if progress.on {
        eprintln!();
    }
    if !quiet {
        println!(
            "copied {} records ({} already there), {} attachments ({} already there, {:.1} MiB), {} sidecars from {} to {}",
            tally.records,
            tally.records_skipped,
            tally.blobs,
            tally.blobs_skipped,
            tally.bytes as f64 / (1 << 20) as f64,
            tally.sidecars,
            src.location(),
            dst.location()
        );
    }
    Ok(())
}
