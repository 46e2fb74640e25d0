//! Cross-host coherence: one connection per daemon LISTENs on the `agentmount` channel and
//! turns each announcement into the exact kernel invalidation it calls for. When the
//! connection drops it reconnects with backoff, LISTENs again and resynchronises by
//! version (every record's version against the cache, the attachment listing reloaded)
//! before the cached listing is trusted again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use postgres::fallible_iterator::FallibleIterator;
use serde_json::{Value, json};

use super::{Postgres, col, describe, schema};
use crate::backend::{AttachmentStore, ChangeSink, Kind, StoreEvent};
use crate::store::blob_index;

#[derive(Default)]
pub(super) struct State {
    connected_since: Option<SystemTime>,
    last_error: Option<String>,
    down_since: Option<SystemTime>,
}

impl State {
    pub fn status(&self) -> Value {
        let t = |t: &Option<SystemTime>| {
            t.map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
        };
        json!({
            "channel": schema::CHANNEL,
            "connected": self.connected_since.is_some(),
            "connected_since": t(&self.connected_since),
            "down_since": t(&self.down_since),
            "last_error": self.last_error,
        })
    }
}

/// Runs for the life of the mount.
pub(super) fn run(pg: Arc<Postgres>, sink: Arc<dyn ChangeSink>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match session(&pg, &sink) {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(why) => {
                pg.blobs.trust_listing.store(false, Ordering::Release);
                let mut s = pg.listener.lock();
                if s.connected_since.take().is_some() || s.down_since.is_none() {
                    tracing::warn!(error = %why, "the Postgres listener lost its connection; reconnecting");
                    s.down_since = Some(SystemTime::now());
                }
                s.last_error = Some(why);
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connected stretch: LISTEN, resynchronise, then follow announcements until the
/// connection fails.
fn session(pg: &Arc<Postgres>, sink: &Arc<dyn ChangeSink>) -> Result<(), String> {
    let mut client = pg.conn.connect()?;
    client
        .batch_execute(&format!("LISTEN {}", schema::CHANNEL))
        .map_err(|e| describe(&e))?;
    // Anything announced from here on is queued; what changed before is found by version.
    let since = Instant::now();
    let events = resync(pg, &mut client)?;
    pg.stats.resyncs.fetch_add(1, Ordering::Relaxed);
    if !events.is_empty() {
        sink.store_changed(events, since);
    }
    {
        let mut s = pg.listener.lock();
        s.connected_since = Some(SystemTime::now());
        s.down_since = None;
    }
    pg.up();
    pg.blobs.trust_listing.store(true, Ordering::Release);
    let mut last_check = Instant::now();
    loop {
        let mut batch: Vec<String> = Vec::new();
        {
            let mut n = client.notifications();
            let first = n
                .timeout_iter(Duration::from_millis(500))
                .next()
                .map_err(|e| describe(&e))?;
            if let Some(first) = first {
                batch.push(first.payload().to_string());
                // Whatever else already arrived goes in the same batch.
                let mut more = n.iter();
                while let Some(m) = more.next().map_err(|e| describe(&e))? {
                    batch.push(m.payload().to_string());
                }
            }
        }
        let since = Instant::now();
        if client.is_closed() {
            return Err("the server closed the connection".into());
        }
        if batch.is_empty() {
            // Quiet: make sure the connection is still there (a silent drop over TCP).
            if last_check.elapsed() > Duration::from_secs(5) {
                client
                    .is_valid(Duration::from_secs(3))
                    .map_err(|e| describe(&e))?;
                last_check = Instant::now();
            }
            continue;
        }
        pg.stats
            .notifications
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let events = announced(pg, &batch);
        if !events.is_empty() {
            sink.store_changed(events, since);
        }
    }
}

/// What a batch of announcements means for the kernel's caches.
fn announced(pg: &Postgres, batch: &[String]) -> Vec<StoreEvent> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut blobs_changed = false;
    for p in batch {
        if !seen.insert(p.as_str()) {
            continue;
        }
        let mut f = p.splitn(4, ' ');
        match (f.next(), f.next()) {
            (Some("r"), Some(v)) => {
                let (Some(coll), Some(id)) = (f.next(), f.next()) else {
                    continue;
                };
                let Some(kind) = Postgres::kind_named(coll) else {
                    continue;
                };
                let version = v.parse::<i64>().ok();
                // Our own write: the cache already holds this version.
                if version.is_some() && version == Some(pg.cached_version(kind, id)) {
                    continue;
                }
                out.push(StoreEvent::Record {
                    kind,
                    id: id.to_string(),
                    gone: version.is_none(),
                });
            }
            (Some("b"), Some(v)) => {
                let Some(hex) = f.next() else { continue };
                let Some(id) = blob_index::parse_id(hex) else {
                    continue;
                };
                blobs_changed = true;
                out.push(StoreEvent::Blob { id, gone: v == "-" });
            }
            _ => {}
        }
    }
    if blobs_changed {
        out.extend(labels_moved(pg));
    }
    out
}

/// Reloads the attachment listing; labels that no longer name the blob they named.
fn labels_moved(pg: &Postgres) -> Vec<StoreEvent> {
    let before: HashMap<String, [u8; 32]> = pg
        .blobs
        .cached_listing()
        .map(|l| {
            l.labels()
                .iter()
                .map(|(l, id)| (l.to_string(), *id))
                .collect()
        })
        .unwrap_or_default();
    pg.blobs.stale();
    let Ok(now) = pg.load_listing() else {
        return Vec::new();
    };
    before
        .into_iter()
        .filter(|(l, id)| now.label(l) != Some(id))
        .map(|(l, _)| StoreEvent::LabelGone(l))
        .collect()
}

/// After (re)connecting: every record whose version differs from the cache, every record
/// the cache lacks or holds in vain, and the attachments, as events.
fn resync(pg: &Postgres, client: &mut postgres::Client) -> Result<Vec<StoreEvent>, String> {
    let rows = client
        .query(
            "SELECT collection, id, version FROM agentmount_records",
            &[],
        )
        .map_err(|e| describe(&e))?;
    let mut out = Vec::new();
    let mut present: HashSet<(Kind, String)> = HashSet::with_capacity(rows.len());
    for r in rows {
        let coll: &str = col(&r, 0).map_err(|e| e.to_string())?;
        let Some(kind) = Postgres::kind_named(coll) else {
            continue;
        };
        let id: String = col(&r, 1).map_err(|e| e.to_string())?;
        let v: i64 = col(&r, 2).map_err(|e| e.to_string())?;
        if pg.cached_version(kind, &id) != v {
            out.push(StoreEvent::Record {
                kind,
                id: id.clone(),
                gone: false,
            });
        }
        present.insert((kind, id));
    }
    let vanished: Vec<(Kind, String)> = pg
        .records
        .read()
        .keys()
        .filter(|k| !present.contains(*k))
        .cloned()
        .collect();
    for (kind, id) in vanished {
        pg.records.write().remove(&(kind, id.clone()));
        out.push(StoreEvent::Record {
            kind,
            id,
            gone: true,
        });
    }
    let before = pg.blobs.cached_listing();
    pg.blobs.stale();
    if let (Ok(now), Some(before)) = (pg.listing(), before) {
        for b in before.blobs() {
            match now.get(&b.id) {
                None => out.push(StoreEvent::Blob {
                    id: b.id,
                    gone: true,
                }),
                Some(n)
                    if n.sidecar.as_ref().map(|s| s.mtime)
                        != b.sidecar.as_ref().map(|s| s.mtime) =>
                {
                    out.push(StoreEvent::Blob {
                        id: b.id,
                        gone: false,
                    })
                }
                Some(_) => {}
            }
        }
        for (l, id) in before.labels().iter() {
            if now.label(l) != Some(id) {
                out.push(StoreEvent::LabelGone(l.to_string()));
            }
        }
    }
    Ok(out)
}
