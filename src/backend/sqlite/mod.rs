//! arbiter's SQLite database (arbiter-storage 0.5, WAL mode) behind the seam:
//! `sessions/`, `agents/` and `delegations/`, one row a file.
//!
//! - **Reads** come from a snapshot of the three tables, rendered once per database
//!   version: every lookup, getattr, readdir and open asks `PRAGMA data_version` (it moves
//!   when another connection commits) and reloads only then. Rows whose bytes did not
//!   change keep their rendering and their time, so the watcher compares by pointer.
//! - **Writes** are one `BEGIN IMMEDIATE` transaction each (a busy database is retried up
//!   to the lock timeout, then EAGAIN); our own commit patches the snapshot.
//! - **Freshness in the kernel**: inotify on the database and its `-wal` (see `watch.rs`).
//! - A database that stops reading (corrupted by another process) keeps serving the last
//!   good snapshot; writes are refused (EIO) and SQLite never overwrites what it cannot read.

pub mod arbiter;
pub mod crypt;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use serde_json::json;

use self::crypt::Crypt;
use super::{Backend, ChangeSink, Kind, ListView, RecordView};
use crate::error::{Result, StoreError};
use crate::store::Options;

/// A database file's identity and version as stat shows it: inode, size, mtime (ns).
type FileId = (u64, u64, i128);

const COLLECTIONS: [Kind; 3] = [Kind::Sessions, Kind::Agents, Kind::Delegations];

/// One table as the mount shows it. Cloning it (to patch in our own write) copies
/// pointers only.
#[derive(Default, Clone)]
struct Table {
    rows: BTreeMap<Arc<str>, Arc<Row>>,
    /// The same rows in rowid order, as a table scan returns them: a reload walks the
    /// scan and this side by side, so an unchanged row costs a compare of its raw values
    /// and no lookup.
    order: Arc<Vec<Arc<Row>>>,
    /// Sessions only: whether any row holds arbiter's ciphertext.
    ciphertext: bool,
}

/// One row: its file, the raw column values it was rendered from (a reload renders only
/// rows whose raw values changed), and why arbiter could not load it, if it could not
/// (such a row is shown as stored).
struct Row {
    rowid: i64,
    key: Arc<str>,
    view: RecordView,
    raw: Box<[u8]>,
    bad: Option<String>,
}

/// The scan every reload and read-back uses: the rowid first, then arbiter's columns.
const ROWID: &str = "_agentmount_rowid";

impl Table {
    /// Rows arbiter itself could not load (bad UUID, timestamp, enum, ciphertext).
    fn bad(&self) -> Vec<String> {
        self.rows.values().filter_map(|r| r.bad.clone()).collect()
    }
}

/// A row's column values, encoded so two versions compare by bytes.
fn raw_row(row: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(256);
    for i in 1..n {
        match row.get_ref(i)? {
            ValueRef::Null => out.push(0),
            ValueRef::Integer(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            ValueRef::Real(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_le_bytes());
            }
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                out.push(3);
                out.extend_from_slice(&(t.len() as u64).to_le_bytes());
                out.extend_from_slice(t);
            }
        }
    }
    Ok(out)
}

/// Whether a row's column values are the ones `raw` encodes (as `raw_row` does), without
/// encoding them.
fn raw_eq(row: &rusqlite::Row<'_>, n: usize, raw: &[u8]) -> rusqlite::Result<bool> {
    use rusqlite::types::ValueRef;
    let mut at = 0usize;
    let mut take = |len: usize| -> Option<&[u8]> {
        let s = raw.get(at..at + len)?;
        at += len;
        Some(s)
    };
    for i in 1..n {
        let same = match row.get_ref(i)? {
            ValueRef::Null => take(1) == Some(&[0]),
            ValueRef::Integer(v) => take(1) == Some(&[1]) && take(8) == Some(&v.to_le_bytes()[..]),
            ValueRef::Real(v) => take(1) == Some(&[2]) && take(8) == Some(&v.to_le_bytes()[..]),
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                take(1) == Some(&[3])
                    && take(8) == Some(&(t.len() as u64).to_le_bytes()[..])
                    && take(t.len()) == Some(t)
            }
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(at == raw.len())
}

/// Where a sessions statement has the two JSON-array columns arbiter encrypts (looked up
/// once per statement: by name a row, they cost a scan of the column names each).
fn cipher_columns(st: &rusqlite::Statement<'_>) -> rusqlite::Result<[usize; 2]> {
    if !st.column_names().contains(&"authorized_tools") {
        return Ok([0, 0]);
    }
    Ok([
        st.column_index("authorized_tools")?,
        st.column_index("delegation_chain_snapshot")?,
    ])
}

/// Whether a session row holds arbiter's ciphertext: a JSON-array column that is not a
/// JSON array.
fn row_has_ciphertext(row: &rusqlite::Row<'_>, cols: [usize; 2]) -> rusqlite::Result<bool> {
    for col in cols {
        if let rusqlite::types::ValueRef::Text(t) = row.get_ref(col)?
            && t.trim_ascii_start().first() != Some(&b'[')
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The three tables at one database version.
struct Snapshot {
    data_version: i64,
    tables: [Arc<Table>; 3],
}

impl Snapshot {
    fn table(&self, kind: Kind) -> Option<&Arc<Table>> {
        COLLECTIONS
            .iter()
            .position(|k| *k == kind)
            .map(|i| &self.tables[i])
    }
}

pub struct Sqlite {
    path: PathBuf,
    options: Options,
    conn: Mutex<Connection>,
    snap: RwLock<Arc<Snapshot>>,
    crypt: Option<Crypt>,
    /// Why the database must not be written, found at mount or at a later write (arbiter
    /// started storing ciphertext while we have no key).
    read_only_reason: Mutex<Option<String>>,
    /// Why the database cannot be read now (the last good snapshot is served).
    error: Mutex<Option<String>>,
    reloads: AtomicU64,
    hits: AtomicU64,
    /// How long the last reload took (µs).
    last_reload_us: AtomicU64,
    /// The database file as last checked by `PRAGMA quick_check` (inode, size, mtime)
    /// and what the check found (`Some`: damaged). Another process that scribbles on the
    /// file (not through SQLite) changes it.
    checked: Mutex<Option<(FileId, Option<String>)>>,
}

/// The errno an SQLite failure deserves: a busy database EAGAIN, a corrupt one EIO.
pub(crate) fn sql_error(what: &str, e: rusqlite::Error) -> StoreError {
    let code = e.sqlite_error_code();
    let msg = format!("{what}: {e}");
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Again(format!(
            "{msg} (the database stayed locked past the lock timeout)"
        )),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt(msg),
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly(msg),
        Some(ErrorCode::ConstraintViolation) => StoreError::Invalid(msg),
        Some(ErrorCode::DiskFull) => {
            StoreError::io(msg, std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        _ => StoreError::io(msg, std::io::Error::from_raw_os_error(libc::EIO)),
    }
}

/// A database others can write is untrusted input (SQLite's "defense against dark
/// arts"): no memory-mapped I/O (a file truncated under a mapping is SIGBUS, which would
/// kill the daemon), no SQL functions from the schema run with our rights, cells checked
/// as they are read, and the defensive flag that forbids writes which corrupt on purpose.
fn harden(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA mmap_size = 0", [], |_| Ok(()))
        .map_err(|e| sql_error("set mmap_size", e))?;
    conn.execute_batch("PRAGMA trusted_schema = OFF; PRAGMA cell_size_check = ON;")
        .map_err(|e| sql_error("harden the connection", e))?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
        .map_err(|e| sql_error("set SQLITE_DBCONFIG_DEFENSIVE", e))?;
    Ok(())
}

/// The database and the files SQLite keeps beside it (`-wal`, `-shm`, `-journal`) must be
/// regular files: SQLite would open a symlink or FIFO planted there and, as the daemon's
/// user, write WAL frames wherever it points.
fn check_files(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Some(m) = crate::store::untrusted::lstat(&p)
            .map_err(|e| StoreError::io(format!("stat {}", p.display()), e))?
            && !m.file_type().is_file()
        {
            let why = format!(
                "{} is {}, not a regular file: the database is not opened (the store is untrusted input)",
                p.display(),
                crate::store::untrusted::describe(&m.file_type())
            );
            crate::store::untrusted::skipped(&p, &why);
            return Err(StoreError::Untrusted(why));
        }
    }
    Ok(())
}

fn mtime_of(path: &Path) -> SystemTime {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| {
            std::fs::symlink_metadata(p)
                .ok()
                .and_then(|m| m.modified().ok())
        })
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Sqlite {
    /// Opens arbiter's database. Refused, with the reason, when it lacks arbiter's tables
    /// (the mount never runs migrations) or the encryption key is malformed.
    pub fn open(path: &Path, options: Options) -> Result<Sqlite> {
        let crypt = Crypt::from_env()?;
        check_files(path)?;
        let flags = if options.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| sql_error(&format!("open {}", path.display()), e))?;
        conn.busy_timeout(options.lock_timeout)
            .map_err(|e| sql_error("set the busy timeout", e))?;
        harden(&conn)?;
        let tables: Vec<String> = {
            let mut st = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .map_err(|e| sql_error("read the schema", e))?;
            st.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
                .map_err(|e| sql_error("read the schema", e))?
        };
        let missing: Vec<&str> = ["sessions", "agents", "delegation_links"]
            .into_iter()
            .filter(|t| !tables.iter().any(|have| have == t))
            .collect();
        if !missing.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{} is a SQLite database without arbiter's tables (missing: {}); agentmount never creates or migrates them: run arbiter (arbiter-storage 0.5) on it first",
                path.display(),
                missing.join(", ")
            )));
        }
        let read_only_reason = match &crypt {
            None if has_ciphertext(&conn)? => Some(format!(
                "the sessions table holds encrypted fields and {} is not set: mounted read-only, encrypted fields are shown as stored",
                crypt::KEY_VAR
            )),
            _ => None,
        };
        let s = Sqlite {
            path: path.to_path_buf(),
            options,
            conn: Mutex::new(conn),
            snap: RwLock::new(Arc::new(Snapshot {
                data_version: i64::MIN,
                tables: Default::default(),
            })),
            crypt,
            read_only_reason: Mutex::new(read_only_reason),
            error: Mutex::new(None),
            reloads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            last_reload_us: AtomicU64::new(0),
            checked: Mutex::new(None),
        };
        s.verify_file()?;
        s.current()?;
        if let Some(e) = s.error.lock().clone() {
            return Err(StoreError::Corrupt(e));
        }
        Ok(s)
    }

    /// The snapshot at the database's current version: a `PRAGMA data_version` when
    /// nothing changed, a reload of the three tables when another connection committed.
    /// If the database cannot be read, the last good snapshot (and the error is kept).
    fn current(&self) -> Result<Arc<Snapshot>> {
        if self.damage().is_some() && self.verify_file().is_err() {
            return Ok(self.snap.read().clone());
        }
        let conn = self.conn.lock();
        let dv: std::result::Result<i64, _> =
            conn.query_row("PRAGMA data_version", [], |r| r.get(0));
        let prev = self.snap.read().clone();
        match dv {
            Ok(v) if v == prev.data_version && self.error.lock().is_none() => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(prev);
            }
            Ok(_) | Err(_) => {}
        }
        match self.load(&conn, &prev) {
            Ok(new) => {
                let new = Arc::new(new);
                *self.snap.write() = new.clone();
                if let Some(e) = self.error.lock().take() {
                    tracing::info!(db = %self.path.display(), previous = %e, "the database reads again");
                }
                Ok(new)
            }
            Err(e) => {
                let msg = e.to_string();
                let mut err = self.error.lock();
                if err.as_deref() != Some(msg.as_str()) {
                    tracing::error!(db = %self.path.display(), error = %msg, "cannot read the database: serving the last good view, writes refused");
                }
                *err = Some(msg);
                Ok(prev)
            }
        }
    }

    /// Reads the three tables in one read transaction. Rows whose bytes are unchanged keep
    /// their view (bytes `Arc` and times); changed ones get the time they were first seen.
    fn load(&self, conn: &Connection, prev: &Snapshot) -> Result<Snapshot> {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let sql = |e| sql_error("read the database", e);
        conn.execute_batch("BEGIN DEFERRED").map_err(sql)?;
        let r = (|| {
            let dv: i64 = conn
                .query_row("PRAGMA data_version", [], |r| r.get(0))
                .map_err(sql)?;
            let first = prev.data_version == i64::MIN;
            let now = if first {
                mtime_of(&self.path)
            } else {
                SystemTime::now()
            };
            let mut tables: [Arc<Table>; 3] = Default::default();
            for (i, kind) in COLLECTIONS.iter().enumerate() {
                let old = &prev.tables[i];
                let (name, key) = arbiter::table(*kind).unwrap_or(("", ""));
                let mut st = conn
                    .prepare_cached(&format!(
                        "SELECT rowid AS {ROWID}, * FROM {name} ORDER BY rowid"
                    ))
                    .map_err(sql)?;
                let n = st.column_count();
                let key_col = st.column_index(key).map_err(sql)?;
                let cipher_cols = cipher_columns(&st).map_err(sql)?;
                let mut rows = st.query([]).map_err(sql)?;
                let mut ciphertext = false;
                let mut order: Vec<Arc<Row>> = Vec::with_capacity(old.order.len());
                let mut changed: Vec<Arc<Row>> = Vec::new();
                let mut removed: Vec<Arc<str>> = Vec::new();
                let mut o = old.order.iter().peekable();
                while let Some(row) = rows.next().map_err(sql)? {
                    if *kind == Kind::Sessions && !ciphertext {
                        ciphertext = row_has_ciphertext(row, cipher_cols).map_err(sql)?;
                    }
                    let rowid: i64 = row.get(0).map_err(sql)?;
                    // Old rows before this rowid are gone.
                    while let Some(r) = o.next_if(|r| r.rowid < rowid) {
                        removed.push(r.key.clone());
                    }
                    if let Some(r) = o.next_if(|r| r.rowid == rowid) {
                        if raw_eq(row, n, &r.raw).map_err(sql)? {
                            order.push(r.clone());
                            continue;
                        }
                        removed.push(r.key.clone());
                    }
                    let key: Arc<str> = match row.get_ref(key_col).map_err(sql)? {
                        rusqlite::types::ValueRef::Integer(k) => k.to_string().into(),
                        v => v.as_str().map_err(|e| sql(e.into()))?.into(),
                    };
                    let raw = raw_row(row, n).map_err(sql)?;
                    let (id, out) =
                        arbiter::render(*kind, row, self.crypt.as_ref()).map_err(sql)?;
                    let (bytes, bad) = match out {
                        Ok(b) => (b, None),
                        Err((why, shown)) => {
                            (shown, Some(format!("{} {id}: {why}", kind.singular())))
                        }
                    };
                    let r = Arc::new(Row {
                        rowid,
                        key,
                        view: RecordView {
                            id,
                            bytes: bytes.into(),
                            mtime: now,
                            ctime: now,
                            mode: None,
                        },
                        raw: raw.into(),
                        bad,
                    });
                    order.push(r.clone());
                    changed.push(r);
                }
                removed.extend(o.map(|r| r.key.clone()));
                tracing::debug!(
                    table = name,
                    rendered = changed.len(),
                    removed = removed.len(),
                    "reload"
                );
                tables[i] =
                    if changed.is_empty() && removed.is_empty() && old.ciphertext == ciphertext {
                        // Unchanged: the same Arc, so the watcher skips the table by pointer.
                        old.clone()
                    } else {
                        let mut rows = old.rows.clone();
                        for k in &removed {
                            rows.remove(k);
                        }
                        for r in changed {
                            rows.insert(r.key.clone(), r);
                        }
                        Arc::new(Table {
                            rows,
                            order: Arc::new(order),
                            ciphertext,
                        })
                    };
            }
            Ok(Snapshot {
                data_version: dv,
                tables,
            })
        })();
        let _ = conn.execute_batch("COMMIT");
        let us = t0.elapsed().as_micros() as u64;
        self.last_reload_us.store(us, Ordering::Relaxed);
        tracing::debug!(us, "reloaded the database");
        r
    }

    /// Before a write: if the database file changed since it was last verified (a
    /// checkpoint, or another program writing it without SQLite), `PRAGMA quick_check` on
    /// a fresh connection (ours may hold cached pages). A database that fails is never
    /// written: the last good view is served and writes get EIO until it checks again.
    fn verify_file(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let fp = std::fs::metadata(&self.path)
            .map(|m| {
                (
                    m.ino(),
                    m.size(),
                    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
                )
            })
            .map_err(|e| StoreError::io(format!("stat {}", self.path.display()), e))?;
        if let Some((at, damage)) = &*self.checked.lock()
            && *at == fp
        {
            return match damage {
                None => Ok(()),
                Some(msg) => Err(StoreError::Corrupt(msg.clone())),
            };
        }
        let check = || -> std::result::Result<String, rusqlite::Error> {
            let c = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_NOFOLLOW,
            )?;
            c.busy_timeout(self.options.lock_timeout)?;
            c.query_row("PRAGMA quick_check", [], |r| r.get(0))
        };
        match check() {
            Ok(ok) if ok == "ok" => {
                if self
                    .checked
                    .lock()
                    .as_ref()
                    .is_some_and(|(_, d)| d.is_some())
                {
                    tracing::info!(db = %self.path.display(), "the database checks again");
                }
                *self.checked.lock() = Some((fp, None));
                Ok(())
            }
            Ok(problem) => self.damaged(fp, format!("PRAGMA quick_check: {problem}")),
            Err(e) => match sql_error("PRAGMA quick_check", e) {
                e @ StoreError::Again(_) => Err(e),
                e => self.damaged(fp, e.to_string()),
            },
        }
    }

    fn damaged(&self, fp: FileId, why: String) -> Result<()> {
        let msg = format!(
            "{} is damaged ({why}): serving the last good view, refusing writes",
            self.path.display()
        );
        tracing::error!("{msg}");
        *self.checked.lock() = Some((fp, Some(msg.clone())));
        Err(StoreError::Corrupt(msg))
    }

    /// Why the database is known damaged now, if it is.
    fn damage(&self) -> Option<String> {
        self.checked.lock().as_ref().and_then(|(_, d)| d.clone())
    }

    fn writable(&self, kind: Kind) -> Result<()> {
        if self.options.read_only {
            return Err(StoreError::ReadOnly("the store is open read-only".into()));
        }
        if let Some(why) = self.read_only_reason.lock().clone() {
            return Err(StoreError::ReadOnly(why));
        }
        if let Some(e) = self.damage() {
            return Err(StoreError::Corrupt(e));
        }
        if let Some(e) = self.error.lock().clone() {
            return Err(StoreError::Corrupt(format!(
                "the database cannot be read ({e}): writes are refused until it reads again"
            )));
        }
        arbiter::table(kind).map(|_| ()).ok_or_else(|| {
            StoreError::Invalid(format!(
                "an arbiter database has no {} collection",
                kind.dir_name()
            ))
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and brings the snapshot up to date:
    /// patched with the rows `touched` when nobody else committed meanwhile, reloaded
    /// otherwise.
    fn transact(
        &self,
        kind: Kind,
        touched: &[&str],
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<()>,
    ) -> Result<()> {
        self.writable(kind)?;
        self.verify_file()?;
        // Bring the snapshot to the database's version first, so the patch below applies
        // to the version this transaction starts from.
        self.current()?;
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_error("begin the write", e))?;
        if kind == Kind::Sessions && self.crypt.is_none() {
            // The snapshot knows unless another connection committed since it was taken.
            let snap = self.snap.read().clone();
            let dv: i64 = tx
                .query_row("PRAGMA data_version", [], |r| r.get(0))
                .map_err(|e| sql_error("read the data version", e))?;
            let ciphertext = match snap.table(Kind::Sessions) {
                Some(t) if dv == snap.data_version => t.ciphertext,
                _ => has_ciphertext(&tx)?,
            };
            if ciphertext {
                let why = format!(
                    "the sessions table holds encrypted fields and {} is not set: writing plaintext beside them is refused",
                    crypt::KEY_VAR
                );
                tracing::warn!("{why}");
                *self.read_only_reason.lock() = Some(why.clone());
                return Err(StoreError::ReadOnly(why));
            }
        }
        f(&tx)?;
        // Render the touched rows as the transaction leaves them, before committing.
        let mut patched = Vec::new();
        let (name, key) = arbiter::table(kind).unwrap_or(("", ""));
        let now = SystemTime::now();
        for id in touched {
            let read = |e| sql_error("read back the row", e);
            let mut st = tx
                .prepare_cached(&format!(
                    "SELECT rowid AS {ROWID}, * FROM {name} WHERE {key} = ?1"
                ))
                .map_err(read)?;
            let n = st.column_count();
            let cipher_cols = cipher_columns(&st).map_err(read)?;
            let mut rows = st.query([Self::key_value(kind, id)]).map_err(read)?;
            let r = match rows.next().map_err(read)? {
                Some(row) => {
                    let raw = raw_row(row, n).map_err(read)?;
                    let cipher = kind == Kind::Sessions
                        && row_has_ciphertext(row, cipher_cols).map_err(read)?;
                    let (rid, out) =
                        arbiter::render(kind, row, self.crypt.as_ref()).map_err(read)?;
                    let (bytes, bad) = match out {
                        Ok(b) => (b, None),
                        Err((why, shown)) => {
                            (shown, Some(format!("{} {rid}: {why}", kind.singular())))
                        }
                    };
                    let rowid: i64 = row.get(0).map_err(read)?;
                    let view = RecordView {
                        id: rid.clone(),
                        bytes: bytes.into(),
                        mtime: now,
                        ctime: now,
                        mode: None,
                    };
                    Some((
                        Arc::new(Row {
                            rowid,
                            key: rid.into(),
                            view,
                            raw: raw.into(),
                            bad,
                        }),
                        cipher,
                    ))
                }
                None => None,
            };
            patched.push((id.to_string(), r));
        }
        tx.commit().map_err(|e| sql_error("commit", e))?;
        let dv: i64 = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| sql_error("read the data version", e))?;
        let mut snap = self.snap.write();
        if dv != snap.data_version {
            // Another connection committed between our last look and our write: the next
            // access reloads (the snapshot's version no longer matches).
            return Ok(());
        }
        let i = COLLECTIONS.iter().position(|k| *k == kind).unwrap_or(0);
        let mut t = Table::clone(&snap.tables[i]);
        let mut order = Vec::clone(&t.order);
        for (id, r) in patched {
            if let Some(old) = t.rows.remove(id.as_str()) {
                order.retain(|o| !Arc::ptr_eq(o, &old));
            }
            if let Some((row, cipher)) = r {
                t.ciphertext |= cipher;
                let at = order.partition_point(|o| o.rowid < row.rowid);
                order.insert(at, row.clone());
                t.rows.insert(row.key.clone(), row);
            }
        }
        t.order = Arc::new(order);
        let mut tables = snap.tables.clone();
        tables[i] = Arc::new(t);
        *snap = Arc::new(Snapshot {
            data_version: dv,
            tables,
        });
        Ok(())
    }

    fn key_value(kind: Kind, id: &str) -> rusqlite::types::Value {
        match kind {
            Kind::Delegations => rusqlite::types::Value::Integer(id.parse().unwrap_or(0)),
            _ => rusqlite::types::Value::Text(id.to_string()),
        }
    }

    fn view(&self, kind: Kind, id: &str) -> Result<RecordView> {
        self.current()?
            .table(kind)
            .and_then(|t| t.rows.get(id).map(|r| r.view.clone()))
            .ok_or_else(|| {
                StoreError::NotFound(format!("{} {id} vanished after its write", kind.singular()))
            })
    }
}

/// Whether any session row holds arbiter's ciphertext (a JSON-array column that is not
/// a JSON array): such a database was written with `ARBITER_STORAGE_ENCRYPTION_KEY`.
fn has_ciphertext(conn: &Connection) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sessions
            WHERE substr(ltrim(authorized_tools), 1, 1) <> '['
               OR substr(ltrim(delegation_chain_snapshot), 1, 1) <> '[')",
        [],
        |r| r.get::<_, bool>(0),
    )
    .map_err(|e| sql_error("look for encrypted fields", e))
}

impl Backend for Sqlite {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn collections(&self) -> &'static [Kind] {
        &COLLECTIONS
    }

    fn check_id(&self, kind: Kind, id: &str) -> Result<()> {
        arbiter::check_id(kind, id)
    }

    fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>> {
        Ok(self
            .current()?
            .table(kind)
            .and_then(|t| t.rows.get(id).map(|r| r.view.clone())))
    }

    fn list(&self, kind: Kind) -> Result<ListView> {
        let s = self.current()?;
        Ok(ListView {
            records: s
                .table(kind)
                .map(|t| t.rows.values().map(|r| r.view.clone()).collect())
                .unwrap_or_default(),
            error: self.collection_error(kind),
        })
    }

    fn count(&self, kind: Kind) -> usize {
        self.current()
            .ok()
            .and_then(|s| s.table(kind).map(|t| t.rows.len()))
            .unwrap_or(0)
    }

    fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView> {
        self.writable(kind)?;
        let rec = arbiter::parse(kind, id, bytes, self.options.max_record_bytes)?;
        self.transact(kind, &[id], |tx| {
            arbiter::write(tx, &rec, self.crypt.as_ref())
        })?;
        self.view(kind, id)
    }

    fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        arbiter::check_id(kind, id)?;
        let (name, key) = arbiter::table(kind).unwrap_or(("", ""));
        self.transact(kind, &[id], |tx| {
            let n = tx
                .execute(
                    &format!("DELETE FROM {name} WHERE {key} = ?1"),
                    [Self::key_value(kind, id)],
                )
                .map_err(|e| sql_error("delete the row", e))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("no {} {id}", kind.singular())));
            }
            Ok(())
        })
    }

    fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView> {
        arbiter::check_new_id(kind, to)?;
        if from == to {
            return self
                .get(kind, from)?
                .ok_or_else(|| StoreError::NotFound(format!("no {} {from}", kind.singular())));
        }
        let (name, key) = arbiter::table(kind).unwrap_or(("", ""));
        self.transact(kind, &[from, to], |tx| {
            tx.execute(
                &format!("DELETE FROM {name} WHERE {key} = ?1"),
                [Self::key_value(kind, to)],
            )
            .map_err(|e| sql_error("replace the target row", e))?;
            let n = tx
                .execute(
                    &format!("UPDATE {name} SET {key} = ?1 WHERE {key} = ?2"),
                    [Self::key_value(kind, to), Self::key_value(kind, from)],
                )
                .map_err(|e| sql_error("re-key the row", e))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!(
                    "no {} {from}",
                    kind.singular()
                )));
            }
            Ok(())
        })?;
        self.view(kind, to)
    }

    /// Only a database that cannot be read (writes are refused); rows arbiter cannot load
    /// are reported by `.status` (`unloadable_rows`) and block nothing: arbiter itself can
    /// still write beside them.
    fn collection_error(&self, kind: Kind) -> Option<String> {
        let _ = kind;
        self.damage().or_else(|| self.error.lock().clone())
    }

    fn max_record_bytes(&self) -> u64 {
        self.options.max_record_bytes
    }

    fn read_only_reason(&self) -> Option<String> {
        self.read_only_reason.lock().clone()
    }

    fn root_time(&self) -> SystemTime {
        mtime_of(&self.path)
    }

    fn access(&self) -> Option<crate::backend::Access> {
        let m = std::fs::symlink_metadata(&self.path).ok()?;
        crate::backend::Access::of(&[m])
    }

    fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.agentmount", self.path.display()))
    }

    fn statfs_path(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn watch(self: Arc<Self>, sink: Arc<dyn ChangeSink>) -> Result<()> {
        watch::start(self, sink)
    }

    fn status(&self) -> serde_json::Value {
        let errs: serde_json::Map<String, serde_json::Value> = COLLECTIONS
            .iter()
            .map(|k| (k.dir_name().to_string(), json!(self.collection_error(*k))))
            .collect();
        let snap = self.snap.read().clone();
        let unloadable: serde_json::Map<String, serde_json::Value> = COLLECTIONS
            .iter()
            .zip(&snap.tables)
            .map(|(k, t)| (k.dir_name().to_string(), json!(t.bad())))
            .collect();
        json!({
            "unloadable_rows": unloadable,
            "backend": "sqlite",
            "store": {
                "database": self.path,
                "schema": "arbiter-storage 0.5",
                "encryption": match (&self.crypt, &*self.read_only_reason.lock()) {
                    (Some(_), _) => "key set: encrypted fields are decrypted in files and encrypted in the database",
                    (None, Some(_)) => "encrypted fields, no key: read-only",
                    (None, None) => "none",
                },
            },
            "cache": {
                "reloads": self.reloads.load(Ordering::Relaxed),
                "hits": self.hits.load(Ordering::Relaxed),
                "last_reload_us": self.last_reload_us.load(Ordering::Relaxed),
            },
            "last_error": errs,
        })
    }
}

/// `agentmount fsck` of a database: SQLite's `PRAGMA integrity_check`, arbiter's tables,
/// and every row as arbiter would load it. Changes nothing.
pub fn fsck(path: &Path, options: Options) -> Result<crate::store::fsck::FsckReport> {
    let mut r = crate::store::fsck::FsckReport::default();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sql_error(&format!("open {}", path.display()), e))?;
    conn.busy_timeout(options.lock_timeout)
        .map_err(|e| sql_error("set the busy timeout", e))?;
    let mut st = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| sql_error("PRAGMA integrity_check", e))?;
    let lines: Vec<String> = st
        .query_map([], |row| row.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| sql_error("PRAGMA integrity_check", e))?;
    r.problems.extend(
        lines
            .into_iter()
            .filter(|l| l != "ok")
            .map(|l| format!("integrity_check: {l}")),
    );
    drop(st);
    drop(conn);
    if !r.problems.is_empty() {
        return Ok(r);
    }
    match Sqlite::open(path, options) {
        Ok(s) => {
            let snap = s.current()?;
            for (kind, t) in COLLECTIONS.iter().zip(&snap.tables) {
                r.checked_files += t.rows.len() as u64;
                r.problems.extend(t.bad());
                r.problems
                    .extend(t.rows.keys().filter_map(|k| key_problem(*kind, k)));
            }
        }
        Err(e) => r.problems.push(e.to_string()),
    }
    // arbiter numbers delegation links from the largest id SQLite remembers, even one
    // whose row is gone.
    if let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        && let Ok(seq) = conn.query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'delegation_links'",
            [],
            |row| row.get::<_, i64>(0),
        )
        && seq > arbiter::DELEGATION_ID_MAX
    {
        r.problems.push(format!(
            "{}: sqlite_sequence numbers arbiter's next delegation link {} (the largest id ever given is {seq}, above 2^53 = {}){}; fsck cannot lower it without knowing no link was ever given those ids",
            path.display(),
            seq.saturating_add(1),
            arbiter::DELEGATION_ID_MAX,
            if seq == i64::MAX {
                ": at i64's maximum arbiter cannot insert a delegation link at all (SQLITE_FULL)"
            } else {
                ""
            }
        ));
    }
    Ok(r)
}

/// Why a row's key breaks the mount or arbiter, if it does: a key the mount cannot name
/// a file by (the row is hidden), a delegation id above 2^53.
fn key_problem(kind: Kind, key: &str) -> Option<String> {
    let (table, _) = arbiter::table(kind)?;
    if let Err(e) = arbiter::check_id(kind, key) {
        return Some(format!(
            "{table} row {}: hidden from the mount ({e}); fsck changes no row: fix its key with sqlite3",
            crate::error::bounded(&format!("{key:?}"), 200)
        ));
    }
    if arbiter::check_new_id(kind, key).is_err() {
        return Some(format!(
            "{table} row {key}: id above 2^53 ({}): JSON readers round it, and arbiter numbers its next link after it (at i64's maximum it cannot insert one: SQLITE_FULL); fsck changes no row: remove or renumber it with sqlite3 (or rm delegations/{key}.json)",
            arbiter::DELEGATION_ID_MAX
        ));
    }
    None
}
