//! The attachment index: every blob under `sha256/<xx>/`, what its sidecar says (label,
//! media type) and which blob each label names.
//!
//! Compact, because a store holds a lot of attachments: a blob is a 32-byte id, its size
//! and times, and its sidecar's label and (interned) media type, about 150 bytes; the
//! index is 256 shards, each a sorted vector behind an `Arc`, so a change copies one shard
//! and readers keep the snapshot they hold.
//!
//! Fresh, because every access is reload-checked: with a watch (the mount) the index drains
//! an inotify queue on the shard directories at each access. The kernel queues an event
//! before the system call that caused it returns, so one non-blocking read tells exactly
//! which names changed since the last access (one syscall, however many blobs). Without a
//! watch (the CLI, or when inotify is unavailable) it stats the root and every shard
//! directory instead (257 stats) and rescans the shards that changed.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use parking_lot::Mutex;

use super::attachments::{is_hex64, to_hex, valid_label};
use super::fingerprint::{self, Fingerprint};
use super::untrusted;
use crate::error::Result;

/// An attachment's id: the SHA-256 of its bytes.
pub type BlobId = [u8; 32];

/// The id a 64-character lowercase hex name stands for.
pub fn parse_id(hex: &str) -> Option<BlobId> {
    if !is_hex64(hex) {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let nib = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
        id[i] = nib(pair[0]) << 4 | nib(pair[1]);
    }
    Some(id)
}

/// What the index keeps of a sidecar.
#[derive(Debug, Clone)]
pub struct SidecarInfo {
    pub label: Option<Arc<str>>,
    /// `image/png`, `text/plain`, … from `{"kind": …, "type": …}`.
    pub media_type: Arc<str>,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The sidecar file's permission bits (the mount never shows it more open).
    pub mode: u32,
}

#[derive(Debug, Clone)]
pub struct Blob {
    pub id: BlobId,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The blob file's permission bits (the mount never shows it more open).
    pub mode: u32,
    pub sidecar: Option<SidecarInfo>,
}

impl Blob {
    pub fn hex(&self) -> String {
        to_hex(&self.id)
    }

    fn label(&self) -> Option<&Arc<str>> {
        self.sidecar.as_ref().and_then(|s| s.label.as_ref())
    }
}

/// A snapshot of the index.
#[derive(Debug, Clone)]
pub struct Listing {
    shards: Vec<Arc<Vec<Blob>>>,
    /// label → blob, sorted by label; when blobs share a label, the newest sidecar wins.
    labels: Arc<Vec<(Arc<str>, BlobId)>>,
    count: usize,
}

impl Default for Listing {
    fn default() -> Self {
        Listing {
            shards: vec![Arc::default(); 256],
            labels: Arc::default(),
            count: 0,
        }
    }
}

impl Listing {
    /// A listing of these blobs (any order; labels as the index resolves them).
    pub fn from_blobs(blobs: Vec<Blob>) -> Listing {
        let mut shards: Vec<Vec<Blob>> = vec![Vec::new(); 256];
        for b in blobs {
            shards[b.id[0] as usize].push(b);
        }
        let mut l = Listing::default();
        for (i, mut s) in shards.into_iter().enumerate() {
            if !s.is_empty() {
                s.sort_unstable_by_key(|b| b.id);
                l.set_shard(i as u8, s);
            }
        }
        l.rebuild_labels();
        l
    }

    pub fn get(&self, id: &BlobId) -> Option<&Blob> {
        let s = &self.shards[id[0] as usize];
        s.binary_search_by(|b| b.id.cmp(id)).ok().map(|i| &s[i])
    }

    pub fn get_hex(&self, hex: &str) -> Option<&Blob> {
        self.get(&parse_id(hex)?)
    }

    /// The blob a label names.
    pub fn label(&self, label: &str) -> Option<&BlobId> {
        self.labels
            .binary_search_by(|(l, _)| (**l).cmp(label))
            .ok()
            .map(|i| &self.labels[i].1)
    }

    /// Every label with its blob, sorted by label.
    pub fn labels(&self) -> &Arc<Vec<(Arc<str>, BlobId)>> {
        &self.labels
    }

    /// Every blob, in id order.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// The blobs whose id starts with byte `b`, in id order.
    pub fn shard(&self, b: u8) -> &[Blob] {
        &self.shards[b as usize]
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn set_shard(&mut self, b: u8, blobs: Vec<Blob>) {
        self.count = self.count - self.shards[b as usize].len() + blobs.len();
        self.shards[b as usize] = Arc::new(blobs);
    }

    fn rebuild_labels(&mut self) {
        let mut all: Vec<(&Arc<str>, SystemTime, &BlobId)> = self
            .blobs()
            .filter_map(|b| Some((b.label()?, b.sidecar.as_ref()?.mtime, &b.id)))
            .collect();
        // The newest sidecar wins a shared label (ties: the larger id, so the choice does
        // not depend on scan order).
        all.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(a.2)));
        all.dedup_by(|later, first| later.0 == first.0);
        self.labels = Arc::new(all.into_iter().map(|(l, _, id)| (l.clone(), *id)).collect());
    }
}

/// What a watched refresh asks of its caller.
enum Step {
    Done,
    /// The attachments directory appeared: rebuild.
    Again,
    /// The watch cannot go on: stat-check instead, for this reason.
    FallBack(String),
}

/// How the index learns of changes.
enum Mode {
    /// Stat the root and every shard directory at each access.
    Stat {
        root_fp: Option<Fingerprint>,
        shard_fps: HashMap<u8, Option<Fingerprint>>,
    },
    Watch(Watch),
}

struct Watch {
    inotify: Inotify,
    root: Option<WatchDescriptor>,
    shards: HashMap<WatchDescriptor, u8>,
    buf: Vec<u8>,
}

const ROOT_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);
const SHARD_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::ONLYDIR);

struct State {
    listing: Arc<Listing>,
    built: bool,
    mode: Mode,
    /// Why the index is stat-checked although a watch was asked for.
    degraded: Option<String>,
    media: HashMap<Box<str>, Arc<str>>,
}

pub struct BlobIndex {
    cas: PathBuf,
    state: Mutex<State>,
}

impl BlobIndex {
    pub fn new(cas: PathBuf) -> Self {
        BlobIndex {
            cas,
            state: Mutex::new(State {
                listing: Arc::default(),
                built: false,
                mode: Mode::Stat {
                    root_fp: None,
                    shard_fps: HashMap::new(),
                },
                degraded: None,
                media: HashMap::new(),
            }),
        }
    }

    /// Switches to inotify-checked freshness (for a long-lived process: the mount). If
    /// inotify is unavailable the index stays stat-checked and says why in `mode()`.
    pub fn watch(&self) {
        let mut st = self.state.lock();
        match Inotify::init() {
            Ok(inotify) => {
                st.mode = Mode::Watch(Watch {
                    inotify,
                    root: None,
                    shards: HashMap::new(),
                    buf: vec![0; 64 * 1024],
                });
                st.built = false;
            }
            Err(e) => degrade(&mut st, format!("inotify unavailable: {e}")),
        }
    }

    /// How freshness is checked, for `.status`.
    pub fn mode(&self) -> String {
        let st = self.state.lock();
        match (&st.mode, &st.degraded) {
            (Mode::Watch(_), _) => "inotify".into(),
            (Mode::Stat { .. }, Some(why)) => format!("stat of every shard ({why})"),
            (Mode::Stat { .. }, None) => "stat of every shard".into(),
        }
    }

    /// Forgets everything: the next access rebuilds from disk.
    pub fn invalidate(&self) {
        self.state.lock().built = false;
    }

    /// The current index, brought up to date with the disk.
    pub fn listing(&self) -> Result<Arc<Listing>> {
        let mut st = self.state.lock();
        let r = loop {
            if !matches!(st.mode, Mode::Watch(_)) {
                break self.refresh_stat(&mut st);
            }
            match self.refresh_watched(&mut st) {
                Ok(Step::Done) => break Ok(()),
                Ok(Step::Again) => {}
                Ok(Step::FallBack(why)) => degrade(&mut st, why),
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = r {
            // A failed refresh must not leave a half-updated index looking current.
            st.built = false;
            return Err(e);
        }
        Ok(st.listing.clone())
    }

    fn refresh_stat(&self, st: &mut State) -> Result<()> {
        let root_now = fingerprint::stat(&self.cas)?;
        let State {
            listing,
            built,
            mode,
            media,
            ..
        } = st;
        let Mode::Stat { root_fp, shard_fps } = mode else {
            return Ok(());
        };
        if !*built {
            shard_fps.clear();
            *listing = Arc::default();
        }
        if root_now != *root_fp || !*built {
            let names = shard_names(&self.cas)?;
            let gone: Vec<u8> = shard_fps
                .keys()
                .filter(|k| !names.contains(k))
                .copied()
                .collect();
            for b in gone {
                shard_fps.remove(&b);
                Arc::make_mut(listing).set_shard(b, Vec::new());
            }
            for b in names {
                shard_fps.entry(b).or_insert(None);
            }
            *root_fp = root_now;
        }
        let mut changed = !*built;
        for (&b, fp) in shard_fps.iter_mut() {
            let now = fingerprint::stat(&self.shard_dir(b))?;
            if now.is_some() && *fp == now {
                continue;
            }
            let blobs = scan_shard(&self.shard_dir(b), b, media)?;
            Arc::make_mut(listing).set_shard(b, blobs);
            *fp = now;
            changed = true;
        }
        if changed {
            Arc::make_mut(listing).rebuild_labels();
        }
        *built = true;
        Ok(())
    }

    fn refresh_watched(&self, st: &mut State) -> Result<Step> {
        let State {
            listing,
            built,
            mode,
            media,
            ..
        } = st;
        let Mode::Watch(w) = mode else {
            return Ok(Step::Done);
        };
        let mut full = !*built;
        let (mut rescan, mut gone) = (BTreeSet::new(), BTreeSet::new());
        let mut names: Vec<(u8, String)> = Vec::new();
        loop {
            let events = match w.inotify.read_events(&mut w.buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Ok(Step::FallBack(format!("inotify read failed: {e}"))),
            };
            for ev in events {
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    full = true;
                    continue;
                }
                let shard_of_name = || {
                    ev.name
                        .and_then(|n| n.to_str())
                        .filter(|n| n.len() == 2)
                        .and_then(|n| u8::from_str_radix(n, 16).ok())
                };
                if Some(&ev.wd) == w.root.as_ref() {
                    if ev.mask.intersects(
                        EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF,
                    ) {
                        full = true;
                    } else if let Some(b) = shard_of_name() {
                        if ev
                            .mask
                            .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                        {
                            gone.insert(b);
                        } else {
                            rescan.insert(b);
                        }
                    }
                } else if let Some(&b) = w.shards.get(&ev.wd) {
                    if ev.mask.contains(EventMask::IGNORED) {
                        // The directory was removed (the root's DELETE says so too).
                        w.shards.remove(&ev.wd);
                    } else if let Some(n) = ev.name.and_then(|n| n.to_str()) {
                        names.push((b, n.to_string()));
                    }
                }
            }
        }
        if full {
            // (Re)build everything: watch first, then scan, so nothing is missed between.
            let root = match w.inotify.watches().add(&self.cas, ROOT_MASK) {
                Ok(wd) => Some(wd),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Ok(Step::FallBack(format!(
                        "cannot watch {}: {e}",
                        self.cas.display()
                    )));
                }
            };
            w.root = root;
            *listing = Arc::default();
            if w.root.is_some() {
                rescan.extend(shard_names(&self.cas)?);
            }
            gone.clear();
            names.clear();
        } else if w.root.is_none() {
            // No attachments directory yet: one stat tells when it appears.
            if fingerprint::stat(&self.cas)?.is_some() {
                *built = false;
                return Ok(Step::Again);
            }
        }
        let mut labels_changed = full;
        for &b in &gone {
            if !rescan.contains(&b) {
                labels_changed |= !listing.shard(b).is_empty();
                Arc::make_mut(listing).set_shard(b, Vec::new());
            }
        }
        for &b in &rescan {
            let dir = self.shard_dir(b);
            match w.inotify.watches().add(&dir, SHARD_MASK) {
                Ok(wd) => {
                    w.shards.insert(wd, b);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Ok(Step::FallBack(format!(
                        "cannot watch {}: {e}",
                        dir.display()
                    )));
                }
            }
            let blobs = scan_shard(&dir, b, media)?;
            Arc::make_mut(listing).set_shard(b, blobs);
            labels_changed = true;
        }
        for (b, name) in names {
            if !rescan.contains(&b) {
                labels_changed |= self.update_name(listing, b, &name, media)?;
            }
        }
        if labels_changed {
            Arc::make_mut(listing).rebuild_labels();
        }
        *built = true;
        Ok(Step::Done)
    }

    /// Applies what happened to one name in shard `b`. Returns whether labels may change.
    fn update_name(
        &self,
        listing: &mut Arc<Listing>,
        b: u8,
        name: &str,
        media: &mut HashMap<Box<str>, Arc<str>>,
    ) -> Result<bool> {
        let (hex, is_sidecar) = match name.strip_suffix(".json") {
            Some(h) => (h, true),
            None => (name, false),
        };
        let Some(id) = parse_id(hex).filter(|id| id[0] == b) else {
            return Ok(false);
        };
        let shard = &listing.shards[b as usize];
        let pos = shard.binary_search_by(|x| x.id.cmp(&id));
        if is_sidecar {
            let Ok(i) = pos else { return Ok(false) };
            let sc = read_sidecar(&self.shard_dir(b).join(name), media);
            let l = Arc::make_mut(listing);
            Arc::make_mut(&mut l.shards[b as usize])[i].sidecar = sc;
            return Ok(true);
        }
        let dir = self.shard_dir(b);
        // Only a regular file is a blob: anything else planted there is skipped.
        let now = fingerprint::stat(&dir.join(hex))?;
        let now = match now {
            Some(fp) if !fp.is_regular() => {
                let p = dir.join(hex);
                if let Ok(m) = fs::symlink_metadata(&p) {
                    untrusted::skipped(&p, &not_here(&p, &m.file_type()));
                }
                None
            }
            n => n,
        };
        match (now, pos) {
            (Some(fp), Ok(i)) => {
                let l = Arc::make_mut(listing);
                let e = &mut Arc::make_mut(&mut l.shards[b as usize])[i];
                (e.size, e.mtime, e.ctime, e.mode) =
                    (fp.size, fp.mtime(), fp.ctime(), fp.mode & 0o777);
                Ok(false)
            }
            (Some(fp), Err(i)) => {
                let sidecar = read_sidecar(&dir.join(format!("{hex}.json")), media);
                let l = Arc::make_mut(listing);
                Arc::make_mut(&mut l.shards[b as usize]).insert(
                    i,
                    Blob {
                        id,
                        size: fp.size,
                        mtime: fp.mtime(),
                        ctime: fp.ctime(),
                        mode: fp.mode & 0o777,
                        sidecar,
                    },
                );
                l.count += 1;
                Ok(true)
            }
            (None, Ok(i)) => {
                let l = Arc::make_mut(listing);
                Arc::make_mut(&mut l.shards[b as usize]).remove(i);
                l.count -= 1;
                Ok(true)
            }
            (None, Err(_)) => Ok(false),
        }
    }

    fn shard_dir(&self, b: u8) -> PathBuf {
        self.cas.join(format!("{b:02x}"))
    }
}

fn degrade(st: &mut State, why: String) {
    tracing::warn!(
        "attachment index: {why}; checking freshness by a stat of every shard directory instead"
    );
    st.mode = Mode::Stat {
        root_fp: None,
        shard_fps: HashMap::new(),
    };
    st.degraded = Some(why);
    st.built = false;
}

fn shard_names(cas: &Path) -> Result<BTreeSet<u8>> {
    let mut out = BTreeSet::new();
    match untrusted::read_dir(cas) {
        Ok(rd) => {
            for e in rd.flatten() {
                let n = e.file_name();
                // A shard that is a symlink (or anything but a directory) is skipped.
                match e.file_type() {
                    Ok(t) if t.is_dir() => {}
                    Ok(t) => {
                        untrusted::skipped(&cas.join(&n), &not_here(&cas.join(&n), &t));
                        continue;
                    }
                    Err(_) => continue,
                }
                if let Some(b) = n
                    .to_str()
                    .filter(|n| {
                        n.len() == 2
                            && n.bytes()
                                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                    })
                    .and_then(|n| u8::from_str_radix(n, 16).ok())
                {
                    out.insert(b);
                }
            }
            Ok(out)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(out),
        Err(e) => Err(untrusted::store_error(cas, "read dir", e)),
    }
}

fn not_here(path: &Path, t: &fs::FileType) -> String {
    format!(
        "{} is {}: skipped, never followed or opened (the store is untrusted input)",
        path.display(),
        untrusted::describe(t)
    )
}

/// Every blob in one shard directory (names whose first byte is not the shard's are not
/// reachable by the layout and are left out), sorted by id.
fn scan_shard(dir: &Path, b: u8, media: &mut HashMap<Box<str>, Arc<str>>) -> Result<Vec<Blob>> {
    let mut out = Vec::new();
    let rd = match untrusted::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(untrusted::store_error(dir, "read dir", e)),
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(parse_id).filter(|id| id[0] == b) else {
            continue;
        };
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            untrusted::skipped(
                &dir.join(&name),
                &not_here(&dir.join(&name), &meta.file_type()),
            );
            continue;
        }
        let fp = Fingerprint::of(&meta);
        let sidecar = read_sidecar(&dir.join(format!("{}.json", to_hex(&id))), media);
        out.push(Blob {
            id,
            size: fp.size,
            mtime: fp.mtime(),
            ctime: fp.ctime(),
            mode: fp.mode & 0o777,
            sidecar,
        });
    }
    out.sort_unstable_by_key(|b| b.id);
    Ok(out)
}

#[derive(serde::Deserialize)]
struct SidecarFields {
    label: Option<String>,
    media_type: Option<MediaTypeFields>,
}

#[derive(serde::Deserialize)]
struct MediaTypeFields {
    kind: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
}

/// The label and media type a sidecar's bytes give (`None` when they do not parse).
pub fn sidecar_fields(bytes: &[u8]) -> Option<(Option<String>, String)> {
    let f = serde_json::from_slice::<SidecarFields>(bytes).ok()?;
    let m = f.media_type.as_ref();
    let kind = m.and_then(|m| m.kind.as_deref()).unwrap_or("file");
    let ty = m
        .and_then(|m| m.ty.as_deref())
        .unwrap_or("application/octet-stream");
    let mt = if kind == "image" {
        format!("image/{ty}")
    } else {
        ty.to_string()
    };
    Some((f.label.filter(|l| valid_label(l)), mt))
}

/// What the index keeps of a sidecar, parsed straight into those fields (no JSON tree).
fn read_sidecar(path: &Path, media: &mut HashMap<Box<str>, Arc<str>>) -> Option<SidecarInfo> {
    let (bytes, fp) = fingerprint::read_with_fingerprint(path).ok()??;
    let (label, mt) = sidecar_fields(&bytes).unwrap_or_else(|| {
        tracing::warn!(path = %path.display(), "attachment sidecar does not parse");
        (None, "application/octet-stream".to_string())
    });
    let media_type = match media.get(mt.as_str()) {
        Some(m) => m.clone(),
        None => {
            let m: Arc<str> = mt.as_str().into();
            media.insert(mt.into_boxed_str(), m.clone());
            m
        }
    };
    Some(SidecarInfo {
        label: label.map(Into::into),
        media_type,
        size: fp.size,
        mtime: fp.mtime(),
        ctime: fp.ctime(),
        mode: fp.mode & 0o777,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_from_lowercase_hex_only() {
        let h = "b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640";
        let id = parse_id(h).unwrap();
        assert_eq!(to_hex(&id), h);
        assert!(parse_id(&h.to_uppercase()).is_none());
        assert!(parse_id(&h[1..]).is_none());
    }
}
