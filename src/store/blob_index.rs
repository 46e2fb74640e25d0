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

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
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
}

/// Every label with the blob it names, sorted by label.
pub type Labels = Arc<Vec<(Arc<str>, BlobId)>>;

/// A snapshot of the index.
#[derive(Debug, Clone)]
pub struct Listing {
    shards: Vec<Arc<Vec<Blob>>>,
    /// Every labelled blob, as a candidate for its label: sorted by label, then newest
    /// sidecar first (ties: the larger id), so a label's first candidate is its blob.
    /// Kept up to date blob by blob; a change copies one run of at most `2 * RUN`.
    cands: Runs<Cand>,
    /// label → blob, sorted by label (`labels()`): made from `cands` the first time a
    /// snapshot is asked for it, not at each change.
    flat: OnceLock<Labels>,
    count: usize,
}

impl Default for Listing {
    fn default() -> Self {
        Listing {
            shards: vec![Arc::default(); 256],
            cands: Runs::default(),
            flat: OnceLock::new(),
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
                l.put_shard(i as u8, s);
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
        self.cands
            .first_not(|c| &*c.label < label)
            .filter(|c| &*c.label == label)
            .map(|c| &c.id)
    }

    /// Every label with its blob, sorted by label.
    pub fn labels(&self) -> &Labels {
        self.flat.get_or_init(|| {
            let mut out: Vec<(Arc<str>, BlobId)> = Vec::new();
            for c in self.cands.iter() {
                // Candidates of one label are adjacent, the winner first.
                if out.last().is_none_or(|(l, _)| *l != c.label) {
                    out.push((c.label.clone(), c.id));
                }
            }
            Arc::new(out)
        })
    }

    /// The labels this listing names a blob by that `now` does not name the same blob by
    /// (gone, or naming another blob), sorted. Costs what changed between the two, not
    /// the number of labels, when `now` was derived from this listing.
    pub fn labels_moved(&self, now: &Listing) -> Vec<Arc<str>> {
        let mut touched: Vec<&Arc<str>> = Vec::new();
        self.cands.diff(&now.cands, |c| touched.push(&c.label));
        touched.sort_unstable();
        touched.dedup();
        touched
            .into_iter()
            .filter(|l| self.label(l).is_some_and(|id| now.label(l) != Some(id)))
            .cloned()
            .collect()
    }

    /// The blobs in this listing that `now` lacks, in id order. Shards the two share are
    /// skipped without a look at their blobs.
    pub fn blobs_gone(&self, now: &Listing) -> Vec<BlobId> {
        let mut out = Vec::new();
        for (old, new) in self.shards.iter().zip(&now.shards) {
            if Arc::ptr_eq(old, new) {
                continue;
            }
            let mut j = 0;
            for b in old.iter() {
                while j < new.len() && new[j].id < b.id {
                    j += 1;
                }
                if new.get(j).is_none_or(|n| n.id != b.id) {
                    out.push(b.id);
                }
            }
        }
        out
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

    /// Replaces shard `b`'s blobs (sorted by id), leaving the labels for a
    /// `rebuild_labels` (a full scan).
    fn put_shard(&mut self, b: u8, blobs: Vec<Blob>) {
        self.count = self.count - self.shards[b as usize].len() + blobs.len();
        self.shards[b as usize] = Arc::new(blobs);
    }

    /// Replaces shard `b`'s blobs (sorted by id) and updates the labels of those that
    /// changed: the cost is the shard's, not the index's.
    fn set_shard(&mut self, b: u8, blobs: Vec<Blob>) {
        let old = self.shards[b as usize].clone();
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < blobs.len() {
            let (o, n) = (old.get(i), blobs.get(j));
            let ord = match (o, n) {
                (Some(o), Some(n)) => o.id.cmp(&n.id),
                (Some(_), None) => Ordering::Less,
                _ => Ordering::Greater,
            };
            let (was, now) = match ord {
                Ordering::Less => (o.and_then(Cand::of), None),
                Ordering::Greater => (None, n.and_then(Cand::of)),
                Ordering::Equal => (o.and_then(Cand::of), n.and_then(Cand::of)),
            };
            self.swap_cand(was, now);
            i += usize::from(ord != Ordering::Greater);
            j += usize::from(ord != Ordering::Less);
        }
        self.put_shard(b, blobs);
    }

    /// Sets the sidecar of blob `i` in shard `b`.
    fn set_sidecar(&mut self, b: u8, i: usize, sc: Option<SidecarInfo>) {
        let blob = &mut Arc::make_mut(&mut self.shards[b as usize])[i];
        let was = Cand::of(blob);
        blob.sidecar = sc;
        let now = Cand::of(blob);
        self.swap_cand(was, now);
    }

    /// Inserts a blob at position `i` of its shard.
    fn insert_blob(&mut self, i: usize, blob: Blob) {
        let now = Cand::of(&blob);
        Arc::make_mut(&mut self.shards[blob.id[0] as usize]).insert(i, blob);
        self.count += 1;
        self.swap_cand(None, now);
    }

    /// Removes blob `i` of shard `b`.
    fn remove_blob(&mut self, b: u8, i: usize) {
        let blob = Arc::make_mut(&mut self.shards[b as usize]).remove(i);
        self.count -= 1;
        self.swap_cand(Cand::of(&blob), None);
    }

    fn swap_cand(&mut self, was: Option<Cand>, now: Option<Cand>) {
        if was == now {
            return;
        }
        if let Some(c) = was {
            self.cands.remove(&c);
        }
        if let Some(c) = now {
            self.cands.insert(c);
        }
        self.flat = OnceLock::new();
    }

    /// Every label from scratch (a full scan): one sort of every labelled blob.
    fn rebuild_labels(&mut self) {
        let mut all: Vec<Cand> = self.blobs().filter_map(Cand::of).collect();
        all.sort_unstable();
        self.cands = Runs::from_sorted(all);
        self.flat = OnceLock::new();
    }
}

/// A labelled blob as a candidate for its label.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cand {
    label: Arc<str>,
    /// Its sidecar's.
    mtime: SystemTime,
    id: BlobId,
}

impl Cand {
    fn of(b: &Blob) -> Option<Cand> {
        let sc = b.sidecar.as_ref()?;
        Some(Cand {
            label: sc.label.clone()?,
            mtime: sc.mtime,
            id: b.id,
        })
    }
}

impl Ord for Cand {
    /// By label, then the newest sidecar first, then the larger id first: the newest
    /// sidecar wins a shared label, and the choice does not depend on scan order.
    fn cmp(&self, o: &Self) -> Ordering {
        self.label
            .cmp(&o.label)
            .then(o.mtime.cmp(&self.mtime))
            .then(o.id.cmp(&self.id))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The target length of a run (a run is split past twice this).
const RUN: usize = if cfg!(test) { 4 } else { 128 };

/// A sorted sequence of distinct values kept as runs behind `Arc`s, so a snapshot is
/// cloned by cloning the run pointers and an insert or remove copies one run (and moves
/// the pointers after it): no cost per element of the whole sequence.
#[derive(Debug, Clone)]
struct Runs<T> {
    /// Non-empty, each sorted, each run's values before the next run's.
    runs: Vec<Arc<Vec<T>>>,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs { runs: Vec::new() }
    }
}

impl<T: Ord + Clone> Runs<T> {
    fn from_sorted(all: Vec<T>) -> Self {
        let mut runs = Vec::with_capacity(all.len().div_ceil(RUN));
        let mut it = all.into_iter().peekable();
        while it.peek().is_some() {
            runs.push(Arc::new(it.by_ref().take(RUN).collect()));
        }
        Runs { runs }
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.runs.iter().flat_map(|r| r.iter())
    }

    /// The first value for which `before` is false (`before` holds for a prefix).
    fn first_not(&self, before: impl Fn(&T) -> bool) -> Option<&T> {
        let k = self.runs.partition_point(|r| r.last().is_some_and(&before));
        let r = self.runs.get(k)?;
        r.get(r.partition_point(&before))
    }

    /// The run `x` is in, or belongs in.
    fn run_of(&self, x: &T) -> usize {
        self.runs
            .partition_point(|r| r.last().is_some_and(|l| l < x))
    }

    fn insert(&mut self, x: T) {
        if self.runs.is_empty() {
            self.runs.push(Arc::new(vec![x]));
            return;
        }
        let k = self.run_of(&x).min(self.runs.len() - 1);
        let Err(i) = self.runs[k].binary_search(&x) else {
            return;
        };
        let r = Arc::make_mut(&mut self.runs[k]);
        r.insert(i, x);
        if r.len() > 2 * RUN {
            let tail = r.split_off(RUN);
            self.runs.insert(k + 1, Arc::new(tail));
        }
    }

    fn remove(&mut self, x: &T) {
        let k = self.run_of(x);
        let Some(Ok(i)) = self.runs.get(k).map(|r| r.binary_search(x)) else {
            return;
        };
        let r = Arc::make_mut(&mut self.runs[k]);
        r.remove(i);
        let len = r.len();
        if len == 0 {
            self.runs.remove(k);
        } else if len < RUN / 2
            && self
                .runs
                .get(k + 1)
                .is_some_and(|next| len + next.len() <= 2 * RUN)
        {
            // A short run takes in the next one, so runs do not fragment.
            let next = self.runs.remove(k + 1);
            Arc::make_mut(&mut self.runs[k]).extend(next.iter().cloned());
        }
    }

    /// Calls `f` with every value in exactly one of `self` and `now`, in order. Runs the
    /// two share at the same place are skipped without a look at their values.
    fn diff<'a>(&'a self, now: &'a Self, mut f: impl FnMut(&'a T)) {
        let (a, b) = (&self.runs, &now.runs);
        let (mut i, mut ii, mut j, mut jj) = (0, 0, 0, 0);
        loop {
            if ii == 0 && jj == 0 && i < a.len() && j < b.len() && Arc::ptr_eq(&a[i], &b[j]) {
                i += 1;
                j += 1;
                continue;
            }
            let x = a.get(i).map(|r| &r[ii]);
            let y = b.get(j).map(|r| &r[jj]);
            let ord = match (x, y) {
                (None, None) => break,
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
            };
            match ord {
                Ordering::Less => f(&a[i][ii]),
                Ordering::Greater => f(&b[j][jj]),
                Ordering::Equal => {}
            }
            if ord != Ordering::Greater {
                ii += 1;
                if ii == a[i].len() {
                    (i, ii) = (i + 1, 0);
                }
            }
            if ord != Ordering::Less {
                jj += 1;
                if jj == b[j].len() {
                    (j, jj) = (j + 1, 0);
                }
            }
        }
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
        // A full scan: the labels are built once at the end, not blob by blob.
        let full = !*built;
        if full {
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
        for (&b, fp) in shard_fps.iter_mut() {
            let now = fingerprint::stat(&self.shard_dir(b))?;
            if now.is_some() && *fp == now {
                continue;
            }
            let blobs = scan_shard(&self.shard_dir(b), b, media)?;
            if full {
                Arc::make_mut(listing).put_shard(b, blobs);
            } else {
                Arc::make_mut(listing).set_shard(b, blobs);
            }
            *fp = now;
        }
        if full {
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
        for &b in &gone {
            if !rescan.contains(&b) && !listing.shard(b).is_empty() {
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
            if full {
                Arc::make_mut(listing).put_shard(b, blobs);
            } else {
                Arc::make_mut(listing).set_shard(b, blobs);
            }
        }
        for (b, name) in names {
            if !rescan.contains(&b) {
                self.update_name(listing, b, &name, media)?;
            }
        }
        if full {
            // A full scan: the labels are built once, not blob by blob.
            Arc::make_mut(listing).rebuild_labels();
        }
        *built = true;
        Ok(Step::Done)
    }

    /// Applies what happened to one name in shard `b` (and to the labels it touches).
    fn update_name(
        &self,
        listing: &mut Arc<Listing>,
        b: u8,
        name: &str,
        media: &mut HashMap<Box<str>, Arc<str>>,
    ) -> Result<()> {
        let (hex, is_sidecar) = match name.strip_suffix(".json") {
            Some(h) => (h, true),
            None => (name, false),
        };
        let Some(id) = parse_id(hex).filter(|id| id[0] == b) else {
            return Ok(());
        };
        let shard = &listing.shards[b as usize];
        let pos = shard.binary_search_by(|x| x.id.cmp(&id));
        if is_sidecar {
            let Ok(i) = pos else { return Ok(()) };
            let sc = read_sidecar(&self.shard_dir(b).join(name), media);
            Arc::make_mut(listing).set_sidecar(b, i, sc);
            return Ok(());
        }
        let dir = self.shard_dir(b);
        // Only a regular file is a blob: anything else planted there is skipped.
        let now = fingerprint::stat(&dir.join(hex))?;
        let now = match now {
            Some(fp) if !fp.is_regular() => {
                let p = dir.join(hex);
                if let Ok(m) = fs::symlink_metadata(&p) {
                    untrusted::skip_entry(&p, &m.file_type());
                }
                None
            }
            n => n,
        };
        match (now, pos) {
            (Some(fp), Ok(i)) => {
                // The blob's own times: not the label's (that is its sidecar's).
                let l = Arc::make_mut(listing);
                let e = &mut Arc::make_mut(&mut l.shards[b as usize])[i];
                (e.size, e.mtime, e.ctime, e.mode) =
                    (fp.size, fp.mtime(), fp.ctime(), fp.mode & 0o777);
            }
            (Some(fp), Err(i)) => {
                let sidecar = read_sidecar(&dir.join(format!("{hex}.json")), media);
                Arc::make_mut(listing).insert_blob(
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
            }
            (None, Ok(i)) => Arc::make_mut(listing).remove_blob(b, i),
            (None, Err(_)) => {}
        }
        Ok(())
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
                        untrusted::skip_entry(&cas.join(&n), &t);
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
            untrusted::skip_entry(&dir.join(&name), &meta.file_type());
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
    use proptest::prelude::*;
    use std::time::Duration;

    /// A sidecar: `None`, or a label out of a few (or none) and a sidecar mtime out of a
    /// few, so labels are shared and mtimes tie.
    type Sc = Option<(Option<u8>, u8)>;

    fn sidecar(sc: Sc) -> Option<SidecarInfo> {
        let (label, secs) = sc?;
        Some(SidecarInfo {
            // A fresh string each time: equal labels are not the same allocation.
            label: label.map(|l| Arc::from(format!("label-{l}"))),
            media_type: Arc::from("text/plain"),
            size: 1,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(secs)),
            ctime: SystemTime::UNIX_EPOCH,
            mode: 0o644,
        })
    }

    fn blob(id: (u8, u8), sc: Sc) -> Blob {
        let mut bid = [0u8; 32];
        (bid[0], bid[1]) = id;
        Blob {
            id: bid,
            size: 1,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            mode: 0o644,
            sidecar: sidecar(sc),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Rewrite (or remove) the sidecar of the `n`th blob.
        Sidecar(usize, Sc),
        Insert((u8, u8), Sc),
        Remove(usize),
        /// Rescan a shard: some blobs gone, some sidecars changed, some blobs new.
        Shard(u8, Vec<(u8, Option<Sc>)>),
    }

    fn sc() -> impl Strategy<Value = Sc> {
        proptest::option::weighted(0.9, (proptest::option::weighted(0.85, 0u8..6), 0u8..4))
    }

    fn id() -> impl Strategy<Value = (u8, u8)> {
        (0u8..3, any::<u8>())
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<usize>(), sc()).prop_map(|(n, s)| Op::Sidecar(n, s)),
            3 => (id(), sc()).prop_map(|(i, s)| Op::Insert(i, s)),
            2 => any::<usize>().prop_map(Op::Remove),
            1 => (0u8..3, proptest::collection::vec((any::<u8>(), proptest::option::of(sc())), 0..12))
                .prop_map(|(b, e)| Op::Shard(b, e)),
        ]
    }

    fn apply(l: &mut Listing, op: Op) {
        let ids: Vec<BlobId> = l.blobs().map(|b| b.id).collect();
        match op {
            Op::Sidecar(n, s) if !ids.is_empty() => {
                let id = ids[n % ids.len()];
                let i = l.shard(id[0]).iter().position(|b| b.id == id).unwrap();
                l.set_sidecar(id[0], i, sidecar(s));
            }
            Op::Insert(i, s) => {
                let b = blob(i, s);
                if let Err(pos) = l.shard(b.id[0]).binary_search_by(|x| x.id.cmp(&b.id)) {
                    l.insert_blob(pos, b);
                }
            }
            Op::Remove(n) if !ids.is_empty() => {
                let id = ids[n % ids.len()];
                let i = l.shard(id[0]).iter().position(|b| b.id == id).unwrap();
                l.remove_blob(id[0], i);
            }
            Op::Shard(s, edits) => {
                let mut blobs = l.shard(s).to_vec();
                for (k, e) in edits {
                    let at = blobs.iter().position(|b| b.id[1] == k);
                    match (at, e) {
                        (Some(i), None) => {
                            blobs.remove(i);
                        }
                        (Some(i), Some(sc)) => blobs[i].sidecar = sidecar(sc),
                        (None, Some(sc)) => blobs.push(blob((s, k), sc)),
                        (None, None) => {}
                    }
                }
                blobs.sort_unstable_by_key(|b| b.id);
                l.set_shard(s, blobs);
            }
            _ => {}
        }
    }

    /// What `labels_moved` must say, the way the watcher used to work it out.
    fn moved_naive(old: &Listing, now: &Listing) -> Vec<Arc<str>> {
        old.labels()
            .iter()
            .filter(|(l, id)| now.label(l) != Some(id))
            .map(|(l, _)| l.clone())
            .collect()
    }

    fn same_labels(l: &Listing, full: &Listing) {
        assert_eq!(l.labels(), full.labels());
        for k in 0..7 {
            let name = format!("label-{k}");
            assert_eq!(l.label(&name), full.label(&name), "{name}");
        }
        assert_eq!(l.label(""), None);
        assert_eq!(l.label("label-"), None);
        assert_eq!(l.label("zzz"), None);
        // The runs: non-empty, bounded, sorted across runs.
        assert!(
            l.cands
                .runs
                .iter()
                .all(|r| !r.is_empty() && r.len() <= 2 * RUN)
        );
        let all: Vec<&Cand> = l.cands.iter().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Labels kept blob by blob are exactly the labels a full rebuild gives, after
        /// every change; earlier snapshots are left as they were; and the watcher's
        /// differences (labels moved, blobs gone) are what comparing every entry gives.
        #[test]
        fn incremental_labels_match_a_full_rebuild(
            start in proptest::collection::vec((id(), sc()), 0..40),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let mut l = Arc::new(Listing::from_blobs({
                let mut v: Vec<Blob> = start.into_iter().map(|(i, s)| blob(i, s)).collect();
                v.sort_unstable_by_key(|b| b.id);
                v.dedup_by_key(|b| b.id);
                v
            }));
            for op in ops {
                let before = l.clone();
                let before_labels = before.labels().clone();
                apply(Arc::make_mut(&mut l), op);
                let full = Listing::from_blobs(l.blobs().cloned().collect());
                same_labels(&l, &full);
                prop_assert_eq!(l.len(), full.len());
                prop_assert_eq!(before.labels(), &before_labels);
                let mut diff = Vec::new();
                before.cands.diff(&l.cands, |c| diff.push(c.clone()));
                let (a, b): (BTreeSet<Cand>, BTreeSet<Cand>) =
                    (before.cands.iter().cloned().collect(), l.cands.iter().cloned().collect());
                prop_assert_eq!(diff, a.symmetric_difference(&b).cloned().collect::<Vec<_>>());
                prop_assert_eq!(before.labels_moved(&l), moved_naive(&before, &l));
                let gone: Vec<BlobId> =
                    before.blobs().filter(|b| l.get(&b.id).is_none()).map(|b| b.id).collect();
                prop_assert_eq!(before.blobs_gone(&l), gone);
            }
        }
    }

    #[test]
    fn ids_parse_from_lowercase_hex_only() {
        let h = "b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640";
        let id = parse_id(h).unwrap();
        assert_eq!(to_hex(&id), h);
        assert!(parse_id(&h.to_uppercase()).is_none());
        assert!(parse_id(&h[1..]).is_none());
    }
}
