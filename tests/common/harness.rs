//! The fast lane: the mounted tree's core (`agentmount::fs::Core`) driven in-process, by
//! path, without FUSE or the kernel, over any backend. [`Vfs`] makes the calls
//! `src/fs/fuse.rs` makes for each system call, with the same arguments: the caller set
//! before every call that fuse.rs sets it for, the lock owner on write and close, a
//! lookup of each path component first, `flush("close")` then `flush("release")` and
//! `release` at close. [`Store`] opens a fresh store of each backend and dumps it, so a
//! test can say "byte for byte as before".
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use agentmount::backend::{Backend, Kind};
use agentmount::fs::{Attr, Caller, Commit, Core, FsError, FsResult, MountOptions, SetAttr};
use agentmount::journal::{Journal, JournalOptions};
use serde_json::{Value, json};

use crate::common::{self, FIXTURE, S_ACTIVE, S_FUTURE, S_STOPPED};

pub const ROOT: u64 = 1;
const MAKE_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/arbiter/make_db.py");

/// Which backend a [`Store`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Files,
    Sqlite,
    Postgres,
}

impl Which {
    /// Every backend this machine can open (Postgres needs its programs and root).
    pub fn available() -> Vec<Which> {
        let mut v = vec![Which::Files, Which::Sqlite];
        if postgres_available() {
            v.push(Which::Postgres);
        } else {
            eprintln!("harness: no PostgreSQL server can be started here; skipping Postgres");
        }
        v
    }

    pub fn has_attachments(self) -> bool {
        self != Which::Sqlite
    }
}

/// Whether `tests/common/pg.rs` can start a server: PostgreSQL installed, and root (it runs
/// initdb as the `postgres` user).
pub fn postgres_available() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().any(|e| e.path().join("bin/pg_ctl").exists()))
        .unwrap_or(false)
}

/// A fresh store of one backend holding the sample data (the fixture store; for SQLite the
/// database `examples/arbiter/make_db.py` makes), removed when dropped.
pub struct Store {
    pub which: Which,
    pub backend: Arc<dyn Backend>,
    dir: tempfile::TempDir,
    /// The Postgres URL.
    url: Option<String>,
}

/// A SQLite database as make_db.py makes it, made once per test binary and copied.
fn sqlite_template() -> &'static Path {
    static T: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &T.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("arbiter.db");
        let o = Command::new("python3")
            .arg(MAKE_DB)
            .arg(&db)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (d, db)
    })
    .1
}

/// A Postgres database holding the fixture store, made once per test binary; each store is
/// a copy (`CREATE DATABASE … TEMPLATE`), which takes milliseconds.
fn postgres_template() -> &'static str {
    static T: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    T.get_or_init(common::pg::fixture_db)
}

fn db_name(url: &str) -> &str {
    let path = url.split('?').next().unwrap();
    &path[path.rfind('/').unwrap() + 1..]
}

impl Store {
    pub fn open(which: Which) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let mut url = None;
        let backend: Arc<dyn Backend> = match which {
            Which::Files => {
                common::copy_dir(Path::new(FIXTURE), &dir.path().join("store"));
                Arc::new(Self::open_files(&dir.path().join("store")))
            }
            Which::Sqlite => {
                let db = dir.path().join("arbiter.db");
                std::fs::copy(sqlite_template(), &db).unwrap();
                Arc::new(Self::open_sqlite(&db))
            }
            Which::Postgres => {
                let template = postgres_template();
                let server = common::pg::Server::get();
                let name = format!("{}_c{}", db_name(template), next_copy());
                let mut c = common::pg::client(&server.url("postgres"));
                c.batch_execute(&format!(
                    "CREATE DATABASE {name} TEMPLATE {}",
                    db_name(template)
                ))
                .unwrap();
                let u = server.url(&name);
                let b = Self::open_postgres(&u, dir.path());
                url = Some(u);
                Arc::new(b)
            }
        };
        Store {
            which,
            backend,
            dir,
            url,
        }
    }

    fn open_files(root: &Path) -> agentmount::store::Store {
        agentmount::store::Store::open(
            agentmount::store::Layout::new(root),
            agentmount::store::Options::default(),
        )
        .unwrap()
    }

    fn open_sqlite(db: &Path) -> agentmount::backend::sqlite::Sqlite {
        agentmount::backend::sqlite::Sqlite::open(db, agentmount::store::Options::default())
            .unwrap()
    }

    fn open_postgres(url: &str, dir: &Path) -> agentmount::backend::postgres::Postgres {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let state = dir.join(format!(
            "pg-state-{}",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        agentmount::backend::postgres::Postgres::open(
            url,
            agentmount::store::Options::default(),
            state.clone(),
            state.join("blobs"),
            1 << 30,
        )
        .unwrap()
    }

    /// Another handle on the same store (a second writer).
    pub fn reopen(&self) -> Arc<dyn Backend> {
        match self.which {
            Which::Files => Arc::new(Self::open_files(&self.dir.path().join("store"))),
            Which::Sqlite => Arc::new(Self::open_sqlite(&self.dir.path().join("arbiter.db"))),
            Which::Postgres => Arc::new(Self::open_postgres(
                self.url.as_deref().unwrap(),
                self.dir.path(),
            )),
        }
    }

    /// Everything the store holds, to compare with "before": every file of the directory
    /// store (its bytes; agentmount's own state left out), every row of a database.
    pub fn dump(&self) -> String {
        match self.which {
            Which::Files => format!("{:?}", common::tree(&self.dir.path().join("store"))),
            Which::Sqlite => {
                let c = rusqlite::Connection::open(self.dir.path().join("arbiter.db")).unwrap();
                let mut out = String::new();
                for (t, k) in [
                    ("sessions", "session_id"),
                    ("agents", "id"),
                    ("delegation_links", "id"),
                ] {
                    let mut st = c
                        .prepare(&format!("SELECT * FROM {t} ORDER BY {k}"))
                        .unwrap();
                    let n = st.column_count();
                    let rows = st
                        .query_map([], |r| {
                            (0..n)
                                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                                .collect::<rusqlite::Result<Vec<_>>>()
                        })
                        .unwrap();
                    for r in rows {
                        out.push_str(&format!("{t}: {:?}\n", r.unwrap()));
                    }
                }
                out
            }
            Which::Postgres => {
                let mut c = common::pg::client(self.url.as_deref().unwrap());
                let mut out = String::new();
                for q in [
                    "SELECT collection || '/' || id || ' ' || version || ' ' || body FROM agentmount_records ORDER BY 1",
                    "SELECT hex || ' ' || size || ' ' || created_at FROM agentmount_blobs ORDER BY 1",
                    "SELECT hex || ' ' || encode(body, 'escape') || ' ' || coalesce(label, '-') FROM agentmount_sidecars ORDER BY 1",
                    "SELECT hex || ' ' || coalesce(committed_at::text, '-') FROM agentmount_manifest ORDER BY 1",
                    "SELECT hex || ' ' || n || ' ' || md5(data) FROM agentmount_chunks ORDER BY hex, n",
                ] {
                    for r in c.query(q, &[]).unwrap() {
                        out.push_str(&r.get::<_, String>(0));
                        out.push('\n');
                    }
                }
                out
            }
        }
    }

    /// Sessions the sample data holds.
    pub fn sessions(&self) -> [String; 3] {
        match self.which {
            Which::Sqlite => [0, 1, 2].map(|i| format!("5e000000-0000-4000-8000-{i:012x}")),
            _ => [S_ACTIVE, S_STOPPED, S_FUTURE].map(String::from),
        }
    }

    /// Valid bytes for session `id` whose marker (a string field writers change) is
    /// `marker`.
    pub fn session(&self, id: &str, marker: &str) -> Vec<u8> {
        let v = match self.which {
            Which::Sqlite => json!({
                "session_id": id,
                "agent_id": "1a000000-0000-4000-8000-000000000001",
                "delegation_chain_snapshot": [],
                "declared_intent": marker,
                "authorized_tools": ["read_file"],
                "time_limit_secs": 3600,
                "call_budget": 100,
                "calls_made": 1,
                "rate_limit_per_minute": null,
                "rate_window_start": "2026-11-20T09:10:00Z",
                "rate_window_calls": 0,
                "rate_limit_window_secs": 60,
                "data_sensitivity_ceiling": "internal",
                "created_at": "2026-11-20T09:10:00Z",
                "status": "active"
            }),
            _ => json!({"tmux_name": "t", "cwd": "/", "task": marker, "state": "active",
                "created_at": "2026-11-20T09:12:03Z"}),
        };
        serde_json::to_vec_pretty(&v).unwrap()
    }

    /// The field of a session that holds its marker, and the one that holds its id.
    pub fn marker_field(&self) -> &'static str {
        match self.which {
            Which::Sqlite => "declared_intent",
            _ => "task",
        }
    }

    pub fn id_field(&self) -> &'static str {
        match self.which {
            Which::Sqlite => "session_id",
            _ => "id",
        }
    }

    pub fn marker_in(&self, bytes: &[u8]) -> String {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        v[self.marker_field()]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Session `id`'s marker as the store holds it, read through a handle of its own.
    pub fn stored_marker(&self, id: &str) -> Option<String> {
        let v = self.reopen().get(Kind::Sessions, id).unwrap()?;
        Some(self.marker_in(&v.bytes))
    }
}

fn next_copy() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// An open file of the harness: the handle the core gave and the node it was opened on.
#[derive(Debug)]
pub struct Fd {
    pub fh: u64,
    pub ino: u64,
}

/// `Core` driven by path, as the kernel would for one process (`pid`, `uid`, and the lock
/// owner of its file table).
pub struct Vfs {
    pub core: Arc<Core>,
    pub pid: u32,
    pub uid: u32,
    pub owner: u64,
}

impl Vfs {
    /// The core a mount of `backend` serves, with its journal (as `mount` without
    /// `--no-journal`) or without.
    pub fn new(backend: Arc<dyn Backend>, journal: bool) -> Vfs {
        let journal = journal.then(|| {
            Arc::new(
                Journal::open(backend.state_dir(), JournalOptions::default(), &*backend).unwrap(),
            )
        });
        Vfs {
            core: Core::new(backend, MountOptions::default(), journal),
            pid: std::process::id(),
            uid: 0,
            owner: 0x5eed_0001,
        }
    }

    /// The caller of a request, as fuse.rs makes it from `req.pid()`/`req.uid()`.
    pub fn caller(&self) -> Caller {
        Caller {
            pid: self.pid,
            uid: self.uid,
            gid: 0,
        }
    }

    /// The directory holding `path` (each component looked up) and the last name.
    pub fn parent<'a>(&self, path: &'a str) -> FsResult<(u64, &'a str)> {
        let path = path.trim_start_matches('/');
        let (dir, name) = match path.rfind('/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path),
        };
        let mut ino = ROOT;
        for c in dir.split('/').filter(|c| !c.is_empty()) {
            ino = self.core.lookup(ino, c)?.ino;
        }
        Ok((ino, name))
    }

    pub fn lookup(&self, path: &str) -> FsResult<Attr> {
        let (p, name) = self.parent(path)?;
        if name.is_empty() {
            return self.core.getattr(p, None);
        }
        self.core.lookup(p, name)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.lookup(path).is_ok()
    }

    /// open(2) with `flags`: a positive lookup then `open` (O_TRUNC passed along, as
    /// FUSE_ATOMIC_O_TRUNC does), or, for O_CREAT of a name that does not exist, `create`.
    pub fn open(&self, path: &str, flags: i32) -> FsResult<Fd> {
        let (p, name) = self.parent(path)?;
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        match self.core.lookup(p, name) {
            Ok(_) if flags & libc::O_CREAT != 0 && flags & libc::O_EXCL != 0 => {
                Err(FsError::new(libc::EEXIST))
            }
            Ok(a) => {
                let trunc = flags & libc::O_TRUNC != 0;
                let (fh, _) = self.core.open(a.ino, write, trunc)?;
                Ok(Fd { fh, ino: a.ino })
            }
            Err(e) if e.errno == libc::ENOENT && flags & libc::O_CREAT != 0 => {
                let (a, fh, _) = self.core.create(p, name, libc::S_IFREG | 0o644)?;
                Ok(Fd { fh, ino: a.ino })
            }
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, fd: &Fd, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.core.write(fd.fh, offset, data, Some(self.owner))
    }

    pub fn read(&self, fd: &Fd, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.core.read(fd.fh, offset, size)
    }

    pub fn fsync(&self, fd: &Fd) -> FsResult<()> {
        self.core.flush(self.caller(), fd.fh, Commit::Fsync)
    }

    /// close(2) of the last descriptor: the kernel's flush (whose errno close returns),
    /// then release (fuse.rs flushes once more, ignoring the result, and releases).
    pub fn close(&self, fd: Fd) -> FsResult<()> {
        let r = self
            .core
            .flush(self.caller(), fd.fh, Commit::Close { owner: self.owner });
        let _ = self.core.flush(self.caller(), fd.fh, Commit::Release);
        self.core.release(fd.fh);
        r
    }

    /// Opens (creating, truncating), writes and closes, returning the first refusal: as
    /// `common::write_close` does on a real mount.
    pub fn write_file(&self, path: &str, data: &[u8]) -> FsResult<()> {
        let fd = self.open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)?;
        let mut off = 0;
        // The kernel's largest write (max_write, negotiated at init: 1 MiB).
        for chunk in data.chunks(1 << 20) {
            if let Err(e) = self.write(&fd, off, chunk) {
                let _ = self.close(fd);
                return Err(e);
            }
            off += chunk.len() as u64;
        }
        self.close(fd)
    }

    pub fn read_file(&self, path: &str) -> FsResult<Vec<u8>> {
        let fd = self.open(path, libc::O_RDONLY)?;
        let mut out = Vec::new();
        loop {
            let b = self.read(&fd, out.len() as u64, 128 << 10)?;
            if b.is_empty() {
                break;
            }
            out.extend_from_slice(&b);
        }
        self.close(fd)?;
        Ok(out)
    }

    pub fn read_json(&self, path: &str) -> Value {
        serde_json::from_slice(&self.read_file(path).unwrap()).unwrap()
    }

    /// rename(2): the kernel looks up the source (and the target) before it asks.
    pub fn rename(&self, from: &str, to: &str) -> FsResult<()> {
        let (p, name) = self.parent(from)?;
        let (np, newname) = self.parent(to)?;
        self.core.lookup(p, name)?;
        match self.core.lookup(np, newname) {
            Err(e) if e.errno != libc::ENOENT => return Err(e),
            _ => {}
        }
        self.core
            .rename(self.caller(), p, name, np, newname, false, false)
    }

    pub fn unlink(&self, path: &str) -> FsResult<()> {
        let (p, name) = self.parent(path)?;
        self.core.lookup(p, name)?;
        self.core.unlink(self.caller(), p, name)
    }

    pub fn symlink(&self, target: &str, path: &str) -> FsResult<()> {
        let (p, name) = self.parent(path)?;
        match self.core.lookup(p, name) {
            Ok(_) => return Err(FsError::new(libc::EEXIST)),
            Err(e) if e.errno != libc::ENOENT => return Err(e),
            Err(_) => {}
        }
        self.core
            .symlink(self.caller(), p, name, Path::new(target))
            .map(|_| ())
    }

    pub fn readlink(&self, path: &str) -> FsResult<String> {
        let a = self.lookup(path)?;
        Ok(String::from_utf8(self.core.readlink(a.ino)?).unwrap())
    }

    /// The names a directory lists (opendir, every page, releasedir).
    pub fn readdir(&self, path: &str) -> FsResult<Vec<String>> {
        let a = self.lookup(path)?;
        let fh = self.core.opendir(a.ino)?;
        let mut names = Vec::new();
        let r = self.core.dir_page(fh, 0, |e, _| {
            names.push(e.name.clone());
            false
        });
        self.core.release(fh);
        r.map(|()| names)
    }

    /// setattr by path (truncate(2), chmod(2), chown(2), utimes(2)).
    pub fn setattr(&self, path: &str, set: SetAttr) -> FsResult<Attr> {
        let a = self.lookup(path)?;
        self.core.setattr(self.caller(), a.ino, None, set)
    }

    /// `.errors` as JSON values, oldest first.
    pub fn errors(&self) -> Vec<Value> {
        String::from_utf8(self.read_file("/.errors").unwrap())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The errno of a result ("0" for success), for `assert_eq!`.
pub fn errno<T>(r: &FsResult<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno,
    }
}
