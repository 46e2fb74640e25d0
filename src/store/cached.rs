//! A store file parsed once per version: each read stats the file and re-parses only when
//! its fingerprint changed. When a new version does not parse, the last good value is kept
//! and the error is reported with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::fingerprint::{self, Fingerprint};
use crate::error::{Result, StoreError};

#[derive(Default, Debug)]
pub struct CacheStats {
    pub reloads: AtomicU64,
    pub hits: AtomicU64,
    pub parse_errors: AtomicU64,
}

pub struct Loaded<T> {
    /// Fingerprint of the version `value` was parsed from (`None`: the file did not exist).
    pub fp: Option<Fingerprint>,
    pub value: Arc<T>,
    /// Set when the file on disk now does not parse: `value` is the last good version.
    pub error: Option<String>,
    /// Fingerprint of the version that failed to parse, so it is not re-read every time.
    bad_fp: Option<Fingerprint>,
}

impl<T> Loaded<T> {
    pub fn corrupt_error(&self, path: &Path) -> Option<StoreError> {
        self.error.as_ref().map(|e| {
            StoreError::Corrupt(format!(
                "{} does not parse ({e}); serving the last good version and refusing writes until it is fixed",
                path.display()
            ))
        })
    }
}

/// Parses one version of a file; the second argument is the version parsed before, which
/// a parser may reuse parts of.
pub type Parser<T> = fn(Vec<u8>, Option<&T>) -> std::result::Result<T, String>;

pub struct CachedFile<T> {
    path: PathBuf,
    parse: Parser<T>,
    state: RwLock<Option<Arc<Loaded<T>>>>,
    reload: Mutex<()>,
    stats: Arc<CacheStats>,
}

impl<T: Default> CachedFile<T> {
    pub fn new(path: PathBuf, parse: Parser<T>, stats: Arc<CacheStats>) -> Self {
        CachedFile {
            path,
            parse,
            state: RwLock::new(None),
            reload: Mutex::new(()),
            stats,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current version, reloaded if the file changed since it was last parsed.
    pub fn current(&self) -> Result<Arc<Loaded<T>>> {
        let now = fingerprint::stat(&self.path)?;
        if let Some(l) = self.fresh(now) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(l);
        }
        let _one_reader_parses = self.reload.lock();
        let now = fingerprint::stat(&self.path)?;
        if let Some(l) = self.fresh(now) {
            return Ok(l);
        }
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        let previous = self.state.read().clone();
        let read = match fingerprint::read_with_fingerprint(&self.path) {
            // A file rewritten in place faster than we can read one whole version: keep
            // serving the last version we could read (the next access tries again).
            Err(StoreError::Again(msg)) => match previous {
                Some(p) => {
                    self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %self.path.display(), "{msg}; serving the last good version");
                    return Ok(p);
                }
                None => return Err(StoreError::Again(msg)),
            },
            // A symlink, FIFO or device where the file should be (the store is untrusted):
            // never read; reported like a file that does not parse.
            Err(StoreError::Untrusted(why)) => {
                self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                let loaded = Arc::new(Loaded {
                    fp: previous.as_ref().and_then(|p| p.fp),
                    value: previous.map(|p| p.value.clone()).unwrap_or_default(),
                    error: Some(why),
                    bad_fp: now,
                });
                *self.state.write() = Some(loaded.clone());
                return Ok(loaded);
            }
            r => r?,
        };
        let loaded = match read {
            None => Loaded {
                fp: None,
                value: Arc::new(T::default()),
                error: None,
                bad_fp: None,
            },
            // A file that was good and is now empty was most likely caught mid-write by a
            // careless (in-place) writer, or truncated by one that died: not "no records".
            Some((bytes, fp))
                if bytes.iter().all(u8::is_ascii_whitespace)
                    && previous
                        .as_ref()
                        .is_some_and(|p| p.fp.is_some_and(|f| f.size > 0)) =>
            {
                self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), "store file became empty; serving the last good version");
                Loaded {
                    fp: previous.as_ref().and_then(|p| p.fp),
                    value: previous.map(|p| p.value.clone()).unwrap_or_default(),
                    error: Some("the file is empty (a torn or interrupted write?)".into()),
                    bad_fp: Some(fp),
                }
            }
            Some((bytes, fp)) => match (self.parse)(bytes, previous.as_ref().map(|p| &*p.value)) {
                Ok(v) => Loaded {
                    fp: Some(fp),
                    value: Arc::new(v),
                    error: None,
                    bad_fp: None,
                },
                Err(e) => {
                    self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %self.path.display(), error = %e, "store file does not parse; serving the last good version");
                    Loaded {
                        fp: previous.as_ref().and_then(|p| p.fp),
                        value: previous.map(|p| p.value.clone()).unwrap_or_default(),
                        error: Some(e),
                        bad_fp: Some(fp),
                    }
                }
            },
        };
        let loaded = Arc::new(loaded);
        *self.state.write() = Some(loaded.clone());
        Ok(loaded)
    }

    fn fresh(&self, now: Option<Fingerprint>) -> Option<Arc<Loaded<T>>> {
        let guard = self.state.read();
        let l = guard.as_ref()?;
        let same = if l.error.is_some() {
            l.bad_fp == now
        } else {
            l.fp == now
        };
        same.then(|| l.clone())
    }

    /// Installs the value just written by us, with the fingerprint of the bytes written.
    pub fn install(&self, fp: Fingerprint, value: T) -> Arc<Loaded<T>> {
        let l = Arc::new(Loaded {
            fp: Some(fp),
            value: Arc::new(value),
            error: None,
            bad_fp: None,
        });
        *self.state.write() = Some(l.clone());
        l
    }

    /// Read-modify-write under the caller's writer lock: `change` computes the new bytes
    /// and value from the current version (or `None`: nothing to write). If another writer
    /// replaced the file between our read and our rename, the change is redone on the new
    /// content, a bounded number of times.
    pub fn update<R>(
        &self,
        mut change: impl FnMut(&Loaded<T>) -> Result<Option<(Vec<u8>, T, R)>>,
    ) -> Result<(Arc<Loaded<T>>, Option<R>)> {
        let bytes = std::cell::RefCell::new(Vec::new());
        self.update_streamed(
            |cur| {
                Ok(change(cur)?.map(|(b, v, r)| {
                    *bytes.borrow_mut() = b;
                    (v, r)
                }))
            },
            |_, w| w.write_all(&bytes.borrow()),
        )
    }

    /// `update` for a large file: `change` computes only the new value, and `write` writes
    /// it straight into the temp file.
    pub fn update_streamed<R>(
        &self,
        mut change: impl FnMut(&Loaded<T>) -> Result<Option<(T, R)>>,
        write: impl Fn(&T, &mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(Arc<Loaded<T>>, Option<R>)> {
        const ATTEMPTS: usize = 32;
        for _ in 0..ATTEMPTS {
            let cur = self.current()?;
            if let Some(e) = cur.corrupt_error(&self.path) {
                return Err(e);
            }
            let Some((value, r)) = change(&cur)? else {
                return Ok((cur, None));
            };
            let expected = cur.fp;
            drop(cur);
            match super::atomic::replace_file_with(&self.path, |w| write(&value, w), expected)? {
                super::atomic::Replaced::Done(fp) => return Ok((self.install(fp, value), Some(r))),
                super::atomic::Replaced::Raced => {
                    tracing::warn!(path = %self.path.display(), "another writer replaced the file during our update; redoing the change on its version");
                }
            }
        }
        Err(StoreError::Again(format!(
            "{}: other writers replaced the file {ATTEMPTS} times during one update",
            self.path.display()
        )))
    }

    /// The parse error of the version last read, without reading the file again (for
    /// status displays that must not force a parse of a large file).
    pub fn known_error(&self) -> Option<String> {
        self.state.read().as_ref().and_then(|l| l.error.clone())
    }

    /// Forgets the cached version, so the next read re-reads the file.
    pub fn forget(&self) {
        *self.state.write() = None;
    }
}
