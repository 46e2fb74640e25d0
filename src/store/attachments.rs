//! Content-addressed attachments: `sha256/<hex[0..2]>/<hex>` holds the bytes and
//! `<hex>.json` lash's AttachmentMeta sidecar. Labels (file names) come from the sidecars.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use serde_json::{Map, Value, json};

use super::atomic;
use super::blob_index::{BlobIndex, Listing};
use super::fingerprint::{self, Fingerprint};
use super::hash::Sha256;
use super::untrusted;
use crate::error::{Result, StoreError};

pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn to_hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// Where attachments live: `sha256/<hex[0..2]>/<hex>` and its sidecar, and the index of
/// them (`blob_index`).
pub struct Attachments {
    pub dir: PathBuf,
    pub index: BlobIndex,
}

impl Attachments {
    pub fn new(dir: PathBuf) -> Self {
        Attachments {
            index: BlobIndex::new(dir.join("sha256")),
            dir,
        }
    }

    pub fn cas_dir(&self) -> PathBuf {
        self.dir.join("sha256")
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.cas_dir().join(&hex[..2]).join(hex)
    }

    pub fn sidecar_path(&self, hex: &str) -> PathBuf {
        self.cas_dir().join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// Forget everything cached (after an inotify overflow, say).
    pub fn invalidate(&self) {
        self.index.invalidate();
    }

    pub fn listing(&self) -> Result<Arc<Listing>> {
        self.index.listing()
    }
}

/// Whether a label can name a file in `attachments/` without clashing with the blob names.
pub fn valid_label(label: &str) -> bool {
    super::collection::safe_name(label)
        && !is_hex64(label)
        && !label.strip_suffix(".json").is_some_and(is_hex64)
}

/// EINVAL unless `label` can be an attachment label.
pub fn check_label(label: &str) -> Result<()> {
    if !valid_label(label) {
        return Err(StoreError::Invalid(format!(
            "{label:?} cannot be an attachment label"
        )));
    }
    check_new_label(label)
}

/// The mount's own files: no label takes their names, even in `attachments/`.
pub const CONTROL_NAMES: &[&str] = &[".gc", ".status", ".errors", ".changes", ".history"];

/// EINVAL unless `label`, a name [`valid_label`] accepts, may be given to a blob now: no
/// control characters (a newline would forge lines of every text listing), no U+FFFD (bytes
/// that were not text), not a control file's name, not a blob's name in uppercase (it reads
/// as that address, and is one on a case-insensitive copy), and in Unicode NFC (so `é`
/// typed two ways cannot be two labels that look alike). Labels a store already holds are
/// shown as they are; this is for labels given.
pub fn check_new_label(label: &str) -> Result<()> {
    let refuse = |why: String| Err(StoreError::Invalid(format!("label {label:?} {why}")));
    if let Some(c) = label
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return refuse(format!(
            "contains a control character (U+{:04X}): labels are one line of text",
            c as u32
        ));
    }
    if label.contains('\u{FFFD}') {
        return refuse(
            "contains U+FFFD, the mark of bytes that were not UTF-8: name it in text".into(),
        );
    }
    if CONTROL_NAMES.contains(&label) {
        return refuse("is the name of one of the mount's control files".into());
    }
    let lower = label.to_ascii_lowercase();
    if is_hex64(&lower) || lower.strip_suffix(".json").is_some_and(is_hex64) {
        return refuse(
            "reads as a blob's address (64 hex digits): addresses are lowercase and belong to the store".into(),
        );
    }
    if !unicode_normalization::is_nfc(label) {
        use unicode_normalization::UnicodeNormalization;
        let nfc: String = label.nfc().collect();
        return refuse(format!(
            "is not in Unicode NFC: write it as {nfc:?} (the same text, composed), so one name has one spelling"
        ));
    }
    Ok(())
}

/// A sidecar's full JSON and the fingerprint of the bytes it was parsed from (for a rewrite).
pub fn read_sidecar_value(path: &Path) -> Option<(Value, Fingerprint)> {
    let (bytes, fp) = fingerprint::read_with_fingerprint(path).ok()??;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some((v, fp)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "attachment sidecar does not parse");
            Some((Value::Null, fp))
        }
    }
}

/// An attachment being written: bytes go to a temp file in the store while they are hashed,
/// so the hash costs no second pass and no memory (unless writes arrive out of order).
///
/// Why the pipeline: without SHA extensions one SHA-256 stream runs at about 0.26 GB/s,
/// slower than the FUSE data path and the disk. So past `INLINE_HASH` bytes the hashing
/// moves to a helper thread fed through a bounded queue (at most `HASH_QUEUE` chunks, so
/// memory stays constant and a writer waits only when hashing falls behind), and
/// writeback of the temp file starts as the bytes arrive, so the fsync at close has little
/// left to do: copy, hash and disk overlap instead of adding up.
/// Where a backend whose durable copy is elsewhere (Postgres) sends the bytes of an ingest
/// as they arrive, in order, so storing them overlaps with receiving them.
pub trait IngestTee: Send {
    /// The next bytes. An error ends the tee (the backend then stores from the temp file).
    fn push(&mut self, data: &[u8]) -> std::result::Result<(), String>;
    /// For the backend to take its own type back at finish.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

pub struct Ingest {
    /// Set by the backend: gets every byte while the writes come in order.
    pub tee: Option<Box<dyn IngestTee>>,
    file: File,
    tmp: PathBuf,
    /// The directory the temp file is in, held open (the store is untrusted: the temp file
    /// is made, renamed and removed relative to it, never by a path that could be swapped).
    dir: File,
    tmp_name: String,
    hasher: StreamHasher,
    hashed: u64,
    len: u64,
    in_order: bool,
    /// Bytes handed to writeback so far (`sync_file_range`).
    started_writeback: u64,
    done: bool,
    /// Where the time went, for `.status` and the benchmarks.
    pub phases: IngestPhases,
    started: std::time::Instant,
}

/// Where an ingest's time went, each phase on its own (milliseconds), so what dominates
/// is visible on any CPU: with or without SHA extensions, a fast or a slow disk.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IngestPhases {
    pub bytes: u64,
    /// From create to the end of the close.
    pub total_ms: f64,
    /// Writing the bytes into the temp file as they arrived.
    pub writes_ms: f64,
    /// Handing bytes to the hash (inline, or waiting for room in the helper's queue).
    pub hash_feed_ms: f64,
    /// At close: waiting for the hash of what was still queued.
    pub hash_wait_ms: f64,
    /// At close: fsync of the temp file (writeback was started as bytes arrived).
    pub fsync_ms: f64,
    /// Waiting for the writer lock.
    pub lock_ms: f64,
    /// The write-ahead intent in the manifest (durable before the bytes are visible).
    pub manifest_ms: f64,
    /// Moving the bytes into place and fsyncing the shard directory.
    pub rename_ms: f64,
    /// Writing the sidecar.
    pub sidecar_ms: f64,
    /// A shared store (Postgres): the one transaction streaming the bytes in with their
    /// blob row, write-ahead intent and sidecar.
    pub store_ms: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const INLINE_HASH: u64 = 4 << 20;
const HASH_QUEUE: usize = 8;
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// A SHA-256 over a stream of chunks: on the caller's thread at first, on a helper thread
/// (see `Ingest`) once the stream is long.
struct StreamHasher {
    inline: Option<Sha256>,
    piped: Option<(SyncSender<Vec<u8>>, JoinHandle<Sha256>)>,
}

impl StreamHasher {
    fn new() -> Self {
        StreamHasher {
            inline: Some(Sha256::new()),
            piped: None,
        }
    }

    fn update(&mut self, data: &[u8], hashed_before: u64) -> Result<()> {
        if let Some(h) = self.inline.as_mut() {
            if hashed_before + data.len() as u64 <= INLINE_HASH {
                h.update(data);
                return Ok(());
            }
            let (tx, rx) = sync_channel::<Vec<u8>>(HASH_QUEUE);
            let mut state = h.clone();
            let spawned = std::thread::Builder::new()
                .name("ingest-hash".into())
                .spawn(move || {
                    for chunk in rx {
                        state.update(&chunk);
                    }
                    state
                });
            match spawned {
                Ok(join) => {
                    self.inline = None;
                    self.piped = Some((tx, join));
                }
                Err(e) => {
                    // The hash is as right inline, only not overlapped with the writes.
                    tracing::warn!(error = %e, "cannot start a hashing thread; hashing on the request thread");
                    h.update(data);
                    return Ok(());
                }
            }
        }
        match &self.piped {
            Some((tx, _)) => tx.send(data.to_vec()).map_err(|_| {
                StoreError::io(
                    "hash attachment",
                    io::Error::other("the hashing thread stopped"),
                )
            }),
            None => Err(StoreError::io(
                "hash attachment",
                io::Error::other("no hasher"),
            )),
        }
    }

    fn finish(mut self) -> Result<String> {
        if let Some(h) = self.inline.take() {
            return Ok(h.finish_hex());
        }
        let Some((tx, join)) = self.piped.take() else {
            return Err(StoreError::io(
                "hash attachment",
                io::Error::other("no hasher"),
            ));
        };
        drop(tx);
        join.join().map(Sha256::finish_hex).map_err(|_| {
            StoreError::io(
                "hash attachment",
                io::Error::other("the hashing thread panicked"),
            )
        })
    }
}

impl Ingest {
    pub fn create(attachments_dir: &Path) -> Result<Ingest> {
        atomic::ensure_dir(attachments_dir)?;
        let tmp_name = atomic::temp_name("ingest");
        let tmp = attachments_dir.join(&tmp_name);
        let dir = untrusted::open_dir(attachments_dir)
            .map_err(|e| untrusted::store_error(attachments_dir, "open", e))?;
        let file = untrusted::create_in(&dir, &tmp_name, 0o666)
            .map_err(|e| untrusted::store_error(&tmp, "create", e))?;
        Ok(Ingest {
            tee: None,
            file,
            tmp,
            dir,
            tmp_name,
            hasher: StreamHasher::new(),
            hashed: 0,
            len: 0,
            in_order: true,
            started_writeback: 0,
            done: false,
            phases: IngestPhases::default(),
            started: std::time::Instant::now(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.file
            .write_all_at(data, offset)
            .map_err(|e| StoreError::io(format!("write {}", self.tmp.display()), e))?;
        let t1 = std::time::Instant::now();
        self.phases.writes_ms += ms(t1 - t0);
        if self.in_order && offset == self.hashed {
            self.hasher.update(data, self.hashed)?;
            self.hashed += data.len() as u64;
            self.phases.hash_feed_ms += ms(t1.elapsed());
            if let Some(t) = self.tee.as_mut()
                && let Err(e) = t.push(data)
            {
                tracing::debug!(error = %e, "streaming the ingest stopped; it is stored from the temp file at close");
                self.tee = None;
            }
        } else {
            self.in_order = false;
            self.tee = None;
        }
        self.len = self.len.max(offset + data.len() as u64);
        if self.len - self.started_writeback >= WRITEBACK_CHUNK {
            self.start_writeback();
        }
        Ok(())
    }

    /// Asks the kernel to start writing what has arrived, without waiting for it.
    fn start_writeback(&mut self) {
        let (from, len) = (self.started_writeback, self.len - self.started_writeback);
        // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            // Only an early start is lost: the fsync at close still makes the bytes durable.
            tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range failed");
        }
        self.started_writeback = self.len;
    }

    pub fn read_at(&self, offset: u64, size: usize) -> Result<Vec<u8>> {
        let end = self.len.min(offset + size as u64);
        let mut buf = vec![0; end.saturating_sub(offset) as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| StoreError::io(format!("read {}", self.tmp.display()), e))?;
        Ok(buf)
    }

    pub fn truncate(&mut self, size: u64) -> Result<()> {
        if size != self.hashed {
            // Bytes already sent would no longer be the content.
            self.tee = None;
        }
        self.file
            .set_len(size)
            .map_err(|e| StoreError::io(format!("truncate {}", self.tmp.display()), e))?;
        if size == 0 {
            self.hasher = StreamHasher::new();
            self.hashed = 0;
            self.in_order = true;
        } else if size != self.hashed {
            self.in_order = false;
        }

        self.len = size;
        self.started_writeback = self.started_writeback.min(size);
        Ok(())
    }

    /// The hash of the bytes; a second pass only if writes came out of order.
    pub fn digest(&mut self) -> Result<String> {
        let hasher = std::mem::replace(&mut self.hasher, StreamHasher::new());
        if !self.in_order || self.hashed != self.len {
            tracing::debug!(path = %self.tmp.display(), "writes arrived out of order; hashing in a second pass");
            // Our own descriptor, read from offset 0 (never the path, which others may
            // have replaced by a FIFO or a symlink meanwhile).
            let reader = Pread {
                file: &self.file,
                at: 0,
            };
            let (hex, _) = super::hash::hash_reader(reader)
                .map_err(|e| StoreError::io(format!("read {}", self.tmp.display()), e))?;
            return Ok(hex);
        }
        hasher.finish()
    }

    /// Hashes, fsyncs and returns (hex, head bytes for media detection, temp path).
    pub(super) fn seal(&mut self) -> Result<(String, Vec<u8>, PathBuf)> {
        self.seal_as(true)
    }

    /// As `seal`; without `fsync` the temp file is not made durable (a backend whose
    /// durable copy is elsewhere, such as Postgres, keeps the local file only as a cache).
    pub fn seal_as(&mut self, fsync: bool) -> Result<(String, Vec<u8>, PathBuf)> {
        let t0 = std::time::Instant::now();
        let hex = self.digest()?;
        let t1 = std::time::Instant::now();
        if fsync {
            self.file
                .sync_all()
                .map_err(|e| StoreError::io(format!("fsync {}", self.tmp.display()), e))?;
        }
        self.phases.hash_wait_ms = ms(t1 - t0);
        self.phases.fsync_ms = ms(t1.elapsed());
        self.phases.bytes = self.len;
        let head = self.read_at(0, 64 * 1024)?;
        self.done = true;
        Ok((hex, head, self.tmp.clone()))
    }
}

/// Reads a file from an offset by pread, leaving its position alone.
struct Pread<'a> {
    file: &'a File,
    at: u64,
}

impl std::io::Read for Pread<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Ingest {
    /// Moves the sealed temp file to `name` in directory `dest` (both held open): the
    /// bytes land exactly there, whatever happened to the store's paths meanwhile.
    pub fn rename_into(&self, dest: &File, name: &str) -> io::Result<()> {
        let (f, t) = (
            std::ffi::CString::new(self.tmp_name.as_str())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        );
        use std::os::fd::AsRawFd;
        // SAFETY: NUL-terminated names relative to directory descriptors we hold.
        let r = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                f.as_ptr(),
                dest.as_raw_fd(),
                t.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The fingerprint of the temp file's inode, from our descriptor.
    pub fn fingerprint(&self) -> io::Result<Fingerprint> {
        self.file.metadata().map(|m| Fingerprint::of(&m))
    }

    /// The phases so far, with the total up to now.
    pub fn finish_phases(&self) -> IngestPhases {
        let mut p = self.phases.clone();
        p.total_ms = ms(self.started.elapsed());
        p
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // An ingest abandoned before it finished leaves nothing behind; one that finished
        // had its temp file renamed into place or removed as a duplicate.
        let _ = untrusted::unlink_in(&self.dir, &self.tmp_name);
    }
}

/// A sidecar written back (DESIGN §7): `Ok(None)` when `new` is `cur` byte for byte
/// (nothing to do); `Ok(Some(label))` when only its `label` differs (store `new` as
/// written, giving the blob that label, if any); EPERM otherwise: every other field
/// describes the bytes, which never change.
pub fn sidecar_restore(hex: &str, cur: &[u8], new: &[u8]) -> Result<Option<Option<String>>> {
    if cur == new {
        return Ok(None);
    }
    let refuse = |why: &str| {
        StoreError::NotPermitted(format!(
            "the sidecar of {hex} describes its bytes and is made by the store: {why}"
        ))
    };
    let (Ok(Value::Object(mut new)), Ok(Value::Object(mut old))) = (
        serde_json::from_slice::<Value>(new),
        serde_json::from_slice::<Value>(cur),
    ) else {
        return Err(refuse("what was written is not a JSON object"));
    };
    let label = new.shift_remove("label");
    let had = old.shift_remove("label");
    if new != old {
        return Err(refuse(
            "only its label may differ from what the store holds",
        ));
    }
    match label {
        None => Ok(Some(None)),
        Some(Value::String(l)) if valid_label(&l) => {
            if had.as_ref().and_then(Value::as_str) != Some(l.as_str()) {
                check_new_label(&l)?;
            }
            Ok(Some(Some(l)))
        }
        Some(other) => Err(refuse(&format!("{other} cannot be a label"))),
    }
}

/// The sidecar for new bytes: lash's AttachmentMeta form.
pub fn new_sidecar(hex: &str, size: u64, head: &[u8], label: Option<&str>) -> Map<String, Value> {
    let (media, dims) = detect_media(head, label);
    let mut m = Map::new();
    m.insert("id".into(), json!(hex));
    m.insert("media_type".into(), media);
    m.insert("byte_len".into(), json!(size));
    if let Some((w, h)) = dims {
        m.insert("width".into(), json!(w));
        m.insert("height".into(), json!(h));
    }
    if let Some(l) = label {
        m.insert("label".into(), json!(l));
    }
    m
}

/// Media type from magic bytes (images lash reads), else from the extension.
pub fn detect_media(head: &[u8], label: Option<&str>) -> (Value, Option<(u64, u64)>) {
    let be16 = |i: usize| {
        head.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as u64)
    };
    let le16 = |i: usize| {
        head.get(i..i + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let be32 = |i: usize| {
        head.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let le32 = |i: usize| {
        head.get(i..i + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]).unsigned_abs() as u64)
    };
    let image = |t: &str| json!({"kind": "image", "type": t});
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return (image("png"), be32(16).zip(be32(20)));
    }
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        return (image("gif"), le16(6).zip(le16(8)));
    }
    if head.starts_with(b"BM") && head.len() >= 26 {
        return (image("bmp"), le32(18).zip(le32(22)));
    }
    if head.len() >= 30 && &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        let dims = match &head[12..16] {
            b"VP8X" => Some((
                1 + (head[24] as u64 | (head[25] as u64) << 8 | (head[26] as u64) << 16),
                1 + (head[27] as u64 | (head[28] as u64) << 8 | (head[29] as u64) << 16),
            )),
            b"VP8 " => le16(26)
                .zip(le16(28))
                .map(|(w, h)| (w & 0x3fff, h & 0x3fff)),
            b"VP8L" if head.len() >= 25 => {
                let b = |i: usize| head[i] as u64;
                Some((
                    1 + (((b(22) & 0x3f) << 8) | b(21)),
                    1 + (((b(24) & 0xf) << 10) | (b(23) << 2) | ((b(22) & 0xc0) >> 6)),
                ))
            }
            _ => None,
        };
        return (image("webp"), dims);
    }
    if head.starts_with(&[0xff, 0xd8, 0xff]) {
        // Walk the markers to the first start-of-frame within the head bytes.
        let mut i = 2;
        let mut dims = None;
        while i + 9 < head.len() && head[i] == 0xff {
            let marker = head[i + 1];
            let Some(len) = be16(i + 2) else { break };
            if matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc) {
                dims = be16(i + 7).zip(be16(i + 5));
                break;
            }
            i += 2 + len as usize;
        }
        return (image("jpeg"), dims);
    }
    let mime = if head.starts_with(b"%PDF-") {
        "application/pdf"
    } else {
        let ext = label
            .and_then(|l| l.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("txt" | "log") => "text/plain",
            Some("md") => "text/markdown",
            Some("json") => "application/json",
            Some("csv") => "text/csv",
            Some("html" | "htm") => "text/html",
            Some("xml") => "application/xml",
            Some("yaml" | "yml") => "application/yaml",
            Some("pdf") => "application/pdf",
            Some("zip") => "application/zip",
            Some("gz") => "application/gzip",
            Some("tar") => "application/x-tar",
            Some("svg") => "image/svg+xml",
            Some("rs" | "py" | "sh" | "c" | "h" | "go" | "js" | "ts" | "toml") => "text/plain",
            _ if !head.is_empty() && std::str::from_utf8(head).is_ok() => "text/plain",
            _ => "application/octet-stream",
        }
    };
    (json!({"kind": "file", "type": mime}), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_labels_are_one_line_of_composed_text_that_shadows_no_name() {
        for ok in ["pixel.png", "café.txt", ".rsync.AbCd", "東京.md", "a b"] {
            assert!(check_label(ok).is_ok(), "{ok}");
        }
        let hex = "b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640";
        for bad in [
            "a\nb".to_string(),
            "a\u{85}b".into(),
            "a\u{2028}b".into(),
            "\u{FFFD}".into(),
            ".gc".into(),
            ".history".into(),
            hex.to_ascii_uppercase(),
            format!("{}.json", hex.to_ascii_uppercase()),
            "cafe\u{301}".into(),
        ] {
            let e = check_new_label(&bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
        }
        // Names the store keeps for itself stay what they were (EINVAL from the store,
        // EPERM at the mount).
        assert!(check_label(hex).is_err());
    }
}
