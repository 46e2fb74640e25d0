//! A store shared by many hosts: agentmount's own schema in PostgreSQL (DESIGN §5.2,
//! docs/POSTGRES.md). Every host runs a daemon against the same database:
//!
//! - records are rows holding their exact bytes, with a store-wide version that a trigger
//!   moves on every change; every read checks the version of what it serves in one round
//!   trip (the body comes back only when it changed), every change is one transaction;
//! - a trigger announces every change with `NOTIFY agentmount`; each daemon's listener
//!   (`listen.rs`) turns them into exact kernel invalidations, and after a dropped connection
//!   reconnects with backoff, LISTENs again and resynchronises by version;
//! - attachments (`blobs.rs`) are chunked into a table, streamed both ways, and read through
//!   a bounded local content-addressed cache;
//! - while the server is away, reads serve the last good view and changes fail with EIO
//!   (`.status` says since when and why); nothing is ever half-applied.

mod blobs;
mod fsck;
pub use fsck::fsck;
mod listen;
pub mod schema;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use postgres::error::SqlState;
use postgres::{Client, Statement};
use serde_json::{Value, json};

use super::{AttachmentStore, Backend, ChangeSink, Kind, ListView, RecordView};
use crate::error::{Result, StoreError};
use crate::store::{Options, collection, validate};

/// Whether a `--store` value names a Postgres database.
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// A `--store` URL with its password (if any) replaced, for messages, the fsname and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Credentials run to the first `@`, wherever it is, as rust-postgres reads them (a
    // password may hold an unencoded `/` or `?`).
    let (creds, rest) = match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => (format!("{user}:***@"), host),
            None => (format!("{userinfo}@"), host),
        },
        None => (String::new(), rest),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://{creds}{path}");
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|kv| {
                let (k, _) = kv.split_once('=').unwrap_or((kv, ""));
                if tls::percent_decode(k).eq_ignore_ascii_case("password") {
                    format!("{k}=***")
                } else {
                    kv.to_string()
                }
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// A Postgres error as one line (the server's message and its SQLSTATE; never the URL).
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

/// How to reach the server: rust-postgres's settings and the TLS connector `sslmode` asks for.
#[derive(Clone)]
pub struct Conninfo {
    pub cfg: postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// What `sslmode` means here, for `.status`.
    pub ssl: String,
    /// How long a statement waits for a lock before it fails (--lock-timeout).
    pub lock_timeout_ms: Option<u64>,
}

impl Conninfo {
    /// A new connection, or why not. The whole of it (TCP, TLS, login, setup) has a
    /// deadline: a peer that accepts and then never answers (a stuck proxy) fails it in
    /// seconds instead of holding a file operation forever.
    pub fn connect(&self) -> std::result::Result<Client, String> {
        let deadline = self
            .cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(3))
            + CONNECT_GRACE;
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        std::thread::Builder::new()
            .name("pg-connect".into())
            .spawn(move || {
                let _ = tx.send(me.connect_now());
            })
            .map_err(|e| format!("cannot start a connection: {e}"))?;
        match rx.recv_timeout(deadline) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {} s while connecting and logging in",
                deadline.as_secs()
            )),
        }
    }

    fn connect_now(&self) -> std::result::Result<Client, String> {
        let mut c = self
            .cfg
            .connect(self.tls.clone())
            .map_err(|e| describe(&e))?;
        if let Some(ms) = self.lock_timeout_ms {
            // A session setting, not a startup option: connection poolers (pgbouncer)
            // refuse unknown startup options.
            c.batch_execute(&format!("SET lock_timeout = {ms}"))
                .map_err(|e| describe(&e))?;
        }
        Ok(c)
    }
}

/// How long TLS, the login and the session setup may take beyond the connect timeout.
const CONNECT_GRACE: Duration = Duration::from_secs(7);

/// How `--store postgresql://…` is connected: the URL's settings, `sslmode` as libpq means
/// it (tls.rs), the password from the URL, `PGPASSWORD` or `~/.pgpass`, a short connect
/// timeout (a host that is away must not hang a file operation for long).
pub fn connect_config(url: &str) -> Result<Conninfo> {
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Invalid(format!("{} is not a usable Postgres URL: {e}", redact(url)))
    };
    let asked = tls::take(url).map_err(|e| bad(&e))?;
    let mut cfg = postgres::Config::from_str(&asked.rest).map_err(|e| bad(&e))?;
    let (connector, mode, ssl) = tls::connector(&asked).map_err(|e| bad(&e))?;
    let unix = !cfg.get_hosts().is_empty()
        && cfg
            .get_hosts()
            .iter()
            .all(|h| matches!(h, postgres::config::Host::Unix(_)));
    let ssl = if unix {
        // No TLS over a Unix socket (libpq ignores sslmode there too).
        cfg.ssl_mode(postgres::config::SslMode::Disable);
        "not used (Unix socket)".to_string()
    } else {
        cfg.ssl_mode(mode);
        ssl
    };
    if cfg.get_user().is_none() {
        let user = std::env::var("PGUSER")
            .ok()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        cfg.user(&user);
    }
    if cfg.get_dbname().is_none()
        && let Ok(db) = std::env::var("PGDATABASE")
    {
        cfg.dbname(&db);
    }
    if cfg.get_password().is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            cfg.password(p);
        } else if let Some(p) = pgpass(&cfg) {
            cfg.password(p);
        }
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(3));
    }
    // A server that stops answering (a network partition) must fail a file operation in
    // seconds, not hang it until TCP gives up (~15 min): unacknowledged data times out after
    // 10 s, and keepalives find a silent peer on an idle connection.
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(10));
    }
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(10));
    cfg.application_name("agentmount");
    Ok(Conninfo {
        cfg,
        tls: connector,
        ssl,
        lock_timeout_ms: None,
    })
}

/// The password `~/.pgpass` (or `$PGPASSFILE`) gives this connection, as libpq reads it:
/// `host:port:database:user:password`, `*` matching anything, the first match wins.
fn pgpass(cfg: &postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the password file is readable by others and is ignored (chmod 0600 it), as libpq does");
            return None;
        }
    }
    let text = std::fs::read_to_string(path).ok()?;
    let host = match cfg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(_)) | None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = cfg.get_user().unwrap_or_default().to_string();
    let db = cfg.get_dbname().unwrap_or(&user).to_string();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        // Fields split at unescaped colons; `\:` and `\\` stand for `:` and `\`.
        let mut f = vec![String::new()];
        let mut chars = line.chars();
        while let Some(ch) = chars.next() {
            match ch {
                '\\' => f.last_mut()?.push(chars.next().unwrap_or('\\')),
                ':' if f.len() < 5 => f.push(String::new()),
                c => f.last_mut()?.push(c),
            }
        }
        if f.len() != 5 {
            continue;
        }
        let want = [host.as_str(), &port, &db, &user];
        if f[..4].iter().zip(want).all(|(f, w)| f == "*" || f == w) {
            return Some(f[4].clone());
        }
    }
    None
}

/// A transaction of a change, and the prepared statements of its connection.
pub(crate) type Tx<'a> = postgres::Transaction<'a>;
pub(crate) type Stmts = HashMap<&'static str, Statement>;

/// A pooled connection with its prepared statements.
pub(crate) struct Conn {
    pub client: Client,
    stmts: HashMap<&'static str, Statement>,
    last_used: Instant,
}

impl Conn {
    /// Statement `sql`, prepared once per connection.
    pub fn stmt(&mut self, sql: &'static str) -> std::result::Result<Statement, postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }
}

/// Whether the server is reachable, as the last attempt found it.
#[derive(Default)]
struct Health {
    /// Set while the server is unreachable: since when, and why.
    down: Option<(SystemTime, String)>,
    /// No new connection is tried before this (backoff while the server is away).
    next_try: Option<Instant>,
    backoff: Duration,
}

#[derive(Clone)]
struct Cached {
    version: i64,
    view: RecordView,
}

#[derive(Default)]
struct Stats {
    round_trips: AtomicU64,
    bodies_fetched: AtomicU64,
    served_while_down: AtomicU64,
    reconnects: AtomicU64,
    notifications: AtomicU64,
    resyncs: AtomicU64,
}

pub struct Postgres {
    conn: Conninfo,
    shown: String,
    options: Options,
    pool: Mutex<Vec<Conn>>,
    health: Mutex<Health>,
    records: RwLock<HashMap<(Kind, String), Cached>>,
    /// Rows another program left unreadable (not a JSON object): served as last good, never
    /// overwritten through the mount.
    damaged: Mutex<HashMap<(Kind, String), String>>,
    state_dir: PathBuf,
    blobs: blobs::Blobs,
    stats: Stats,
    listener: Mutex<listen::State>,
    started: SystemTime,
}

/// Where a record is damaged: its stored bytes are not a JSON object.
fn damage_of(body: &str) -> Option<String> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(_)) => None,
        Ok(_) => Some("the stored record is not a JSON object".into()),
        Err(e) => Some(format!("the stored record does not parse: {e}")),
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.dir_name() == name)
}

impl Postgres {
    /// Connects, brings the schema up to date and loads every record.
    pub fn open(
        url: &str,
        options: Options,
        state_dir: PathBuf,
        cache_dir: PathBuf,
        cache_bytes: u64,
    ) -> Result<Postgres> {
        let mut conn = connect_config(url)?;
        // Every connection waits for a lock at most --lock-timeout (then EAGAIN): set once
        // a connection, so no statement of a change is spent on it.
        conn.lock_timeout_ms = Some(options.lock_timeout.as_millis().max(1) as u64);
        let shown = redact(url);
        let mut client = conn.connect().map_err(|why| {
            StoreError::io(format!("connect to {shown}"), std::io::Error::other(why))
        })?;
        if options.read_only {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = 'agentmount_schema'",
                    &[],
                )
                .map_err(|e| StoreError::Invalid(describe(&e)))
                .and_then(|r| col(&r, 0))?;
            if n == 0 {
                return Err(StoreError::Invalid(format!(
                    "{shown} has no agentmount schema yet, and a read-only mount does not create one"
                )));
            }
        } else {
            schema::migrate(&mut client).map_err(|e| {
                StoreError::Invalid(format!("{shown}: cannot prepare the schema: {e}"))
            })?;
        }
        private_dir(&state_dir)?;
        let pg = Postgres {
            conn,
            shown,
            options,
            pool: Mutex::new(vec![Conn {
                client,
                stmts: HashMap::new(),
                last_used: Instant::now(),
            }]),
            health: Mutex::default(),
            records: RwLock::default(),
            damaged: Mutex::default(),
            blobs: blobs::Blobs::new(cache_dir, cache_bytes)?,
            state_dir,
            stats: Stats::default(),
            listener: Mutex::default(),
            started: SystemTime::now(),
        };
        for kind in Kind::ALL {
            pg.list(kind)?;
        }
        Ok(pg)
    }

    /// A connection: an idle pooled one, or a new one unless the server was just found away.
    fn checkout(&self) -> Result<Conn> {
        if let Some(c) = self.pool.lock().pop() {
            return Ok(c);
        }
        {
            let h = self.health.lock();
            if let (Some(at), Some((_, why))) = (h.next_try, &h.down)
                && Instant::now() < at
            {
                return Err(unreachable(&self.shown, why));
            }
        }
        match self.conn.connect() {
            Ok(client) => {
                self.up();
                Ok(Conn {
                    client,
                    stmts: HashMap::new(),
                    last_used: Instant::now(),
                })
            }
            Err(why) => {
                self.down(&why);
                Err(unreachable(&self.shown, &why))
            }
        }
    }

    fn checkin(&self, mut c: Conn) {
        if c.client.is_closed() {
            return;
        }
        c.last_used = Instant::now();
        let mut p = self.pool.lock();
        if p.len() < 16 {
            p.push(c);
        }
    }

    fn up(&self) {
        let mut h = self.health.lock();
        if h.down.take().is_some() {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(store = %self.shown, "Postgres is reachable again");
        }
        h.next_try = None;
        h.backoff = Duration::ZERO;
    }

    fn down(&self, why: &str) {
        let mut h = self.health.lock();
        if h.down.is_none() {
            tracing::warn!(store = %self.shown, error = %why, "Postgres is unreachable; serving the last good view, refusing changes");
            h.down = Some((SystemTime::now(), why.to_string()));
        }
        h.backoff = (h.backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        h.next_try = Some(Instant::now() + h.backoff);
        // Every pooled connection went to the same server.
        self.pool.lock().clear();
    }

    /// Runs a read; a connection that turns out closed (the server restarted, or the
    /// backend was terminated) is replaced once.
    fn read<T>(
        &self,
        f: impl Fn(&mut Conn) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        for attempt in 0..2 {
            let mut c = self.checkout()?;
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
            match f(&mut c) {
                Ok(v) => {
                    self.checkin(c);
                    return Ok(v);
                }
                Err(e) if c.client.is_closed() || e.is_closed() => {
                    self.pool.lock().clear();
                    if attempt == 1 {
                        self.down(&describe(&e));
                        return Err(unreachable(&self.shown, &describe(&e)));
                    }
                }
                Err(e) => {
                    self.checkin(c);
                    return Err(self.map_err(&e));
                }
            }
        }
        Err(unreachable(&self.shown, "no connection"))
    }

    /// Runs one change in one transaction. A connection found closed at BEGIN (the server
    /// restarted, or the backend was terminated, while it sat in the pool) is replaced once:
    /// nothing was sent on it. Any later failure aborts the whole transaction (Postgres rolls
    /// back what a broken connection left), so a change is applied entirely or not at all.
    fn write<T>(&self, f: impl FnOnce(&mut Tx<'_>, &mut Stmts) -> Result<T>) -> Result<T> {
        if self.options.read_only {
            return Err(StoreError::ReadOnly("the mount is read-only".into()));
        }
        self.tx(f)
    }

    /// One transaction (as `write`, also on a read-only mount: for reads that must see
    /// one snapshot under locks, such as a gc dry run).
    fn tx<T>(&self, f: impl FnOnce(&mut Tx<'_>, &mut Stmts) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        for attempt in 0..2 {
            let mut c = self.checkout()?;
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
            let result = {
                let Conn { client, stmts, .. } = &mut c;
                match client.transaction() {
                    Err(e) if e.is_closed() && attempt == 0 => {
                        // Its pool mates went to the same server: drop them too.
                        self.pool.lock().clear();
                        continue;
                    }
                    Err(e) => Err(self.map_err(&e)),
                    Ok(mut tx) => (|| {
                        let f = f.take().ok_or_else(|| {
                            StoreError::io("Postgres", std::io::Error::other("change ran twice"))
                        })?;
                        let v = f(&mut tx, stmts)?;
                        tx.commit().map_err(|e| self.map_err(&e))?;
                        Ok(v)
                    })(),
                }
            };
            if c.client.is_closed() {
                if let Err(e) = &result {
                    self.down(&e.to_string());
                }
            } else {
                self.checkin(c);
            }
            return result;
        }
        Err(unreachable(&self.shown, "no connection"))
    }

    fn map_err(&self, e: &postgres::Error) -> StoreError {
        if e.is_closed() && e.code().is_none() {
            return unreachable(&self.shown, &describe(e));
        }
        pg_io(e)
    }

    fn view_of(id: &str, body: String, changed: SystemTime) -> RecordView {
        RecordView {
            id: id.to_string(),
            bytes: body.into_bytes().into(),
            mtime: changed,
            ctime: changed,
            mode: None,
        }
    }

    /// Takes a fetched row into the cache (or records its damage); returns what to serve.
    fn take_row(
        &self,
        kind: Kind,
        id: &str,
        version: i64,
        body: String,
        changed: SystemTime,
    ) -> Result<Option<RecordView>> {
        self.stats.bodies_fetched.fetch_add(1, Ordering::Relaxed);
        let key = (kind, id.to_string());
        if let Some(why) = damage_of(&body) {
            let msg = format!("{} {id}: {why}", kind.singular());
            if self
                .damaged
                .lock()
                .insert(key.clone(), msg.clone())
                .is_none()
            {
                tracing::warn!(error = %msg, "serving the last good version of a damaged record");
            }
            return match self.records.read().get(&key) {
                Some(c) => Ok(Some(c.view.clone())),
                None => Err(StoreError::Corrupt(msg)),
            };
        }
        self.damaged.lock().remove(&key);
        let view = Self::view_of(id, body, changed);
        self.cache_put(key, version, &view);
        Ok(Some(view))
    }

    /// The cached view, when the server cannot be asked.
    fn last_good(&self, kind: Kind, id: &str, e: StoreError) -> Result<Option<RecordView>> {
        if matches!(e, StoreError::Io { .. })
            && let Some(c) = self.records.read().get(&(kind, id.to_string()))
        {
            self.stats.served_while_down.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(c.view.clone()));
        }
        Err(e)
    }

    /// The version the cache holds of a record (-1: none).
    fn cached_version(&self, kind: Kind, id: &str) -> i64 {
        self.records
            .read()
            .get(&(kind, id.to_string()))
            .map_or(-1, |c| c.version)
    }

    /// The stored bytes of a record inside a change, locked for it; refuses damaged rows.
    fn lock_row(
        tx: &mut Tx<'_>,
        stmts: &mut Stmts,
        kind: Kind,
        id: &str,
    ) -> Result<Option<(String, i64, SystemTime)>> {
        const SQL: &str = "SELECT body, version, changed_at FROM agentmount_records
             WHERE collection = $1 AND id = $2 FOR UPDATE";
        let st = prepared(tx, stmts, SQL)?;
        let row = tx
            .query_opt(&st, &[&kind.dir_name(), &id])
            .map_err(|e| pg_io(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let body: String = col(&row, 0)?;
        if let Some(why) = damage_of(&body) {
            return Err(StoreError::Corrupt(format!(
                "{} {id}: {why}; it is left as it is for whoever repairs it (UPDATE agentmount_records), and changes to it are refused until then",
                kind.singular()
            )));
        }
        Ok(Some((body, col(&row, 1)?, col(&row, 2)?)))
    }

    /// Writes record `id`: compare-and-set on the version read under the row lock when it
    /// exists (the lost-update guard: a writer that did not lock first cannot slip in); a
    /// new record is inserted, the last of two concurrent creators winning as on a file.
    fn put_row(
        tx: &mut Tx<'_>,
        stmts: &mut Stmts,
        kind: Kind,
        id: &str,
        body: &str,
        expected: Option<i64>,
    ) -> Result<(i64, SystemTime)> {
        const INSERT: &str =
            "INSERT INTO agentmount_records (collection, id, body) VALUES ($1, $2, $3)
             ON CONFLICT (collection, id) DO UPDATE SET body = EXCLUDED.body
             RETURNING version, changed_at";
        const CAS: &str = "UPDATE agentmount_records SET body = $3
             WHERE collection = $1 AND id = $2 AND version = $4
             RETURNING version, changed_at";
        let row = match expected {
            None => {
                let st = prepared(tx, stmts, INSERT)?;
                tx.query_one(&st, &[&kind.dir_name(), &id, &body])
                    .map_err(|e| pg_io(&e))?
            }
            Some(v) => {
                let st = prepared(tx, stmts, CAS)?;
                tx.query_opt(&st, &[&kind.dir_name(), &id, &body, &v])
                    .map_err(|e| pg_io(&e))?
                    .ok_or_else(|| {
                        StoreError::Again(format!(
                            "{} {id} changed under its lock (version {v} is gone); nothing written",
                            kind.singular()
                        ))
                    })?
            }
        };
        Ok((col(&row, 0)?, col(&row, 1)?))
    }

    /// Commits the write-ahead intents of the attachments a record refers to.
    fn commit_refs(tx: &mut Tx<'_>, stmts: &mut Stmts, body: &str) -> Result<()> {
        let mut refs = std::collections::HashSet::new();
        collection::attachment_refs(body.as_bytes(), &mut refs);
        if refs.is_empty() {
            return Ok(());
        }
        const SQL: &str = "UPDATE agentmount_manifest SET committed_at = clock_timestamp()
             WHERE hex = ANY($1) AND committed_at IS NULL";
        let st = prepared(tx, stmts, SQL)?;
        let refs: Vec<String> = refs.into_iter().collect();
        tx.execute(&st, &[&refs]).map_err(|e| pg_io(&e))?;
        Ok(())
    }

    fn remember(&self, kind: Kind, id: &str, version: i64, view: &RecordView) {
        self.damaged.lock().remove(&(kind, id.to_string()));
        self.cache_put((kind, id.to_string()), version, view);
    }

    /// Caches a version unless a newer one is there already (versions only grow: a slow
    /// read must not replace what a later write of ours or a later read cached).
    fn cache_put(&self, key: (Kind, String), version: i64, view: &RecordView) {
        let mut c = self.records.write();
        if c.get(&key).is_none_or(|old| old.version <= version) {
            c.insert(
                key,
                Cached {
                    version,
                    view: view.clone(),
                },
            );
        }
    }

    fn server_status(&self) -> Value {
        let h = self.health.lock();
        match &h.down {
            None => json!({"reachable": true}),
            Some((since, why)) => json!({
                "reachable": false,
                "since": chrono::DateTime::<chrono::Utc>::from(*since).to_rfc3339(),
                "error": why,
                "serving": "the last good view; changes fail with EIO until the server is back",
            }),
        }
    }
}

/// Column `i` of a row, or why it cannot be read (a table another program altered, text
/// that is not UTF-8 in a database of another encoding): never a panic in a file operation.
pub(crate) fn col<'a, T: postgres::types::FromSql<'a>>(
    row: &'a postgres::Row,
    i: usize,
) -> Result<T> {
    row.try_get(i).map_err(|e| {
        StoreError::Corrupt(format!(
            "column {i} of a row of agentmount's tables cannot be read: {}",
            describe(&e)
        ))
    })
}

fn unreachable(shown: &str, why: &str) -> StoreError {
    StoreError::io(
        format!("Postgres at {shown} is unreachable"),
        std::io::Error::other(why.to_string()),
    )
}

/// What a Postgres error means to the file operation: EAGAIN for a lock not taken within
/// --lock-timeout, a lost race (serialization, deadlock, a name taken at the same moment) or
/// a cancelled statement; EIO for the rest, with the server's reason.
pub(crate) fn pg_io(e: &postgres::Error) -> StoreError {
    let why = describe(e);
    match e.code() {
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => StoreError::Again(format!(
            "locked by another writer past --lock-timeout: {why}"
        )),
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::UNIQUE_VIOLATION =>
        {
            StoreError::Again(format!("another writer won the race: {why}"))
        }
        Some(c) if *c == SqlState::QUERY_CANCELED => {
            StoreError::Again(format!("the statement was cancelled: {why}"))
        }
        _ => StoreError::io("Postgres", std::io::Error::other(why)),
    }
}

pub(crate) fn prepared(tx: &mut Tx<'_>, stmts: &mut Stmts, sql: &'static str) -> Result<Statement> {
    if let Some(s) = stmts.get(sql) {
        return Ok(s.clone());
    }
    let s = tx.prepare(sql).map_err(|e| pg_io(&e))?;
    stmts.insert(sql, s.clone());
    Ok(s)
}

/// Creates `dir` (and parents) for the mounting user alone (0700): it holds the journal,
/// the log and the attachment cache of a store others may not be allowed to read.
///
/// It must be ours alone, and so must the way to it (`untrusted::check_private_path`): the
/// cache is written, renamed and cleaned by path, so a directory another user could swap
/// would let them steer a root daemon's writes and removals.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use crate::store::untrusted;
    if !dir.is_dir() {
        untrusted::create_dir_all_mode(dir, 0o700)
            .map_err(|e| untrusted::store_error(dir, "create", e))?;
    }
    untrusted::check_private_path(dir).map_err(|e| untrusted::store_error(dir, "use", e))
}

/// The per-host directory agentmount keeps for a Postgres store mounted at `mountpoint`:
/// `$XDG_STATE_HOME/agentmount/postgres/<hash of the URL without secrets and the
/// mountpoint>` (two mounts of one store on one host keep separate journals).
pub fn default_state_dir(url: &str, mountpoint: &Path) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| {
            // No home (a bare systemd unit): root's state where root keeps state; anyone
            // else's in a directory of their own (refused if someone else made it first).
            // SAFETY: geteuid cannot fail.
            match unsafe { libc::geteuid() } {
                0 => PathBuf::from("/var/lib"),
                uid => PathBuf::from(format!("/tmp/agentmount-{uid}")),
            }
        });
    let mut h = crate::store::hash::Sha256::new();
    h.update(redact(url).as_bytes());
    h.update(b"\0");
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    h.update(mp.as_os_str().as_encoded_bytes());
    let hex = h.finish_hex();
    base.join("agentmount/postgres").join(&hex[..16])
}

impl Backend for Postgres {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    fn location(&self) -> String {
        self.shown.clone()
    }

    fn collections(&self) -> &'static [Kind] {
        &Kind::ALL
    }

    fn check_id(&self, kind: Kind, id: &str) -> Result<()> {
        validate::check_id(kind, id)
    }

    fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>> {
        const SQL: &str =
            "SELECT version, CASE WHEN version = $3 THEN NULL ELSE body END, changed_at
             FROM agentmount_records WHERE collection = $1 AND id = $2";
        let mut known = self.cached_version(kind, id);
        let mut row = self.read(|c| {
            let st = c.stmt(SQL)?;
            c.client.query_opt(&st, &[&kind.dir_name(), &id, &known])
        });
        // "Unchanged", but a listing or resync dropped the cached copy meanwhile: ask for
        // the bytes.
        if let Ok(Some(r)) = &row
            && matches!(col::<Option<String>>(r, 1), Ok(None))
            && self.cached_version(kind, id) != known
        {
            known = -1;
            row = self.read(|c| {
                let st = c.stmt(SQL)?;
                c.client.query_opt(&st, &[&kind.dir_name(), &id, &known])
            });
        }
        match row {
            Ok(None) => {
                self.records.write().remove(&(kind, id.to_string()));
                self.damaged.lock().remove(&(kind, id.to_string()));
                Ok(None)
            }
            Ok(Some(row)) => {
                let version: i64 = col(&row, 0)?;
                // A body that is not even text (a database of another encoding) is damage.
                let body =
                    col::<Option<String>>(&row, 1).unwrap_or_else(|e| Some(format!("\u{0}{e}")));
                match body {
                    None => Ok(self
                        .records
                        .read()
                        .get(&(kind, id.to_string()))
                        .map(|c| c.view.clone())),
                    Some(body) => self.take_row(kind, id, version, body, col(&row, 2)?),
                }
            }
            Err(e) => self.last_good(kind, id, e),
        }
    }

    fn list(&self, kind: Kind) -> Result<ListView> {
        const VERSIONS: &str =
            "SELECT id, version FROM agentmount_records WHERE collection = $1 ORDER BY id";
        const BODIES: &str = "SELECT id, version, body, changed_at FROM agentmount_records
             WHERE collection = $1 AND id = ANY($2)";
        let rows = match self.read(|c| {
            let st = c.stmt(VERSIONS)?;
            c.client.query(&st, &[&kind.dir_name()])
        }) {
            Ok(r) => r,
            Err(e @ StoreError::Io { .. }) => {
                // The server is away: the last good view, and why.
                let mut records: Vec<RecordView> = self
                    .records
                    .read()
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .map(|(_, c)| c.view.clone())
                    .collect();
                records.sort_by(|a, b| a.id.cmp(&b.id));
                return Ok(ListView {
                    records,
                    error: Some(e.to_string()),
                });
            }
            Err(e) => return Err(e),
        };
        let mut stale = Vec::new();
        let mut present = std::collections::HashSet::with_capacity(rows.len());
        {
            let cache = self.records.read();
            for r in &rows {
                let id: String = col(r, 0)?;
                let v: i64 = col(r, 1)?;
                if cache.get(&(kind, id.clone())).map(|c| c.version) != Some(v) {
                    stale.push(id.clone());
                }
                present.insert(id);
            }
        }
        if !stale.is_empty() {
            let fetched = self.read(|c| {
                let st = c.stmt(BODIES)?;
                c.client.query(&st, &[&kind.dir_name(), &stale])
            })?;
            for r in fetched {
                let id: String = col(&r, 0)?;
                // A damaged row without a good version is left out (its error is in .status);
                // a body that is not even text (another encoding) is damage too.
                let body = col::<String>(&r, 2).unwrap_or_else(|e| format!("\u{0}{e}"));
                let _ = self.take_row(kind, &id, col(&r, 1)?, body, col(&r, 3)?);
            }
        }
        let mut cache = self.records.write();
        cache.retain(|(k, id), _| *k != kind || present.contains(id));
        let mut records: Vec<RecordView> = cache
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, c)| c.view.clone())
            .collect();
        drop(cache);
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ListView {
            records,
            error: None,
        })
    }

    fn count(&self, kind: Kind) -> usize {
        const SQL: &str = "SELECT count(*) FROM agentmount_records WHERE collection = $1";
        let n = self
            .read(|c| {
                let st = c.stmt(SQL)?;
                c.client.query_one(&st, &[&kind.dir_name()])
            })
            .and_then(|r| col::<i64>(&r, 0));
        match n {
            Ok(n) => n.max(0) as usize,
            // The server is away: what the last good view holds.
            Err(_) => self
                .records
                .read()
                .keys()
                .filter(|(k, _)| *k == kind)
                .count(),
        }
    }

    fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView> {
        let (obj, filled) =
            validate::parse_record_filled(kind, id, bytes, self.options.max_record_bytes)?;
        // The exact bytes written, unless the id had to be filled in.
        let body = if filled {
            String::from_utf8_lossy(&collection::present(&Value::Object(obj))).into_owned()
        } else {
            String::from_utf8(bytes.to_vec()).map_err(|e| {
                StoreError::Invalid(format!("{} {id}: not UTF-8: {e}", kind.singular()))
            })?
        };
        let (version, changed, body) = self.write(|tx, stmts| {
            let cur = Self::lock_row(tx, stmts, kind, id)?;
            if let Some((b, v, t)) = &cur
                && *b == body
            {
                // Identical bytes: nothing changes (a restore of an unchanged backup).
                return Ok((*v, *t, body));
            }
            let (v, t) = Self::put_row(tx, stmts, kind, id, &body, cur.map(|c| c.1))?;
            Self::commit_refs(tx, stmts, &body)?;
            Ok((v, t, body))
        })?;
        let view = Self::view_of(id, body, changed);
        self.remember(kind, id, version, &view);
        Ok(view)
    }

    fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        validate::check_id(kind, id)?;
        self.write(|tx, stmts| {
            if Self::lock_row(tx, stmts, kind, id)?.is_none() {
                return Err(StoreError::NotFound(format!("no {} {id}", kind.singular())));
            }
            const SQL: &str = "DELETE FROM agentmount_records WHERE collection = $1 AND id = $2";
            let st = prepared(tx, stmts, SQL)?;
            tx.execute(&st, &[&kind.dir_name(), &id])
                .map_err(|e| pg_io(&e))?;
            Ok(())
        })?;
        self.records.write().remove(&(kind, id.to_string()));
        Ok(())
    }

    fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView> {
        validate::check_id(kind, to)?;
        if from == to {
            return self
                .get(kind, from)?
                .ok_or_else(|| StoreError::NotFound(format!("no {} {from}", kind.singular())));
        }
        let (version, changed, body) = self.write(|tx, stmts| {
            let Some((body, _, _)) = Self::lock_row(tx, stmts, kind, from)? else {
                return Err(StoreError::NotFound(format!(
                    "no {} {from}",
                    kind.singular()
                )));
            };
            let replaced = Self::lock_row(tx, stmts, kind, to)?.map(|c| c.1);
            let value: Value = serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("{} {from}: {e}", kind.singular())))?;
            let body = match &value {
                Value::Object(m) if m.contains_key("id") || kind != Kind::Conversations => {
                    String::from_utf8_lossy(&collection::present(&collection::with_id(value, to)))
                        .into_owned()
                }
                _ => body,
            };
            const DEL: &str = "DELETE FROM agentmount_records WHERE collection = $1 AND id = $2";
            let st = prepared(tx, stmts, DEL)?;
            tx.execute(&st, &[&kind.dir_name(), &from])
                .map_err(|e| pg_io(&e))?;
            let (v, t) = Self::put_row(tx, stmts, kind, to, &body, replaced)?;
            Ok((v, t, body))
        })?;
        self.records.write().remove(&(kind, from.to_string()));
        let view = Self::view_of(to, body, changed);
        self.remember(kind, to, version, &view);
        Ok(view)
    }

    fn collection_error(&self, _kind: Kind) -> Option<String> {
        // Damage is per row (refused per record); an unreachable server fails the write.
        None
    }

    fn max_record_bytes(&self) -> u64 {
        self.options.max_record_bytes
    }

    fn root_time(&self) -> SystemTime {
        self.started
    }

    fn collection_time(&self, kind: Kind) -> SystemTime {
        self.records
            .read()
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, c)| c.view.mtime)
            .max()
            .unwrap_or(self.started)
            .max(self.started)
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir.join("journal")
    }

    fn statfs_path(&self) -> PathBuf {
        self.blobs.cache_dir()
    }

    fn attachments(&self) -> Option<&dyn AttachmentStore> {
        Some(self)
    }

    fn watch(self: Arc<Self>, sink: Arc<dyn ChangeSink>) -> Result<()> {
        std::thread::Builder::new()
            .name("agentmount-listen".into())
            .spawn(move || listen::run(self, sink))
            .map_err(|e| StoreError::io("start the Postgres listener", e))?;
        Ok(())
    }

    fn status(&self) -> Value {
        let s = &self.stats;
        let damaged = self.damaged.lock();
        let errs: serde_json::Map<String, Value> = Kind::ALL
            .iter()
            .map(|k| {
                let first = damaged
                    .iter()
                    .filter(|((kk, _), _)| kk == k)
                    .map(|(_, m)| m.clone())
                    .min();
                (k.dir_name().to_string(), json!(first))
            })
            .collect();
        json!({
            "backend": "postgres",
            "store": {
                "url": self.shown,
                "schema_version": schema::VERSION,
                "tls": self.conn.ssl,
                "state_dir": self.state_dir,
            },
            "server": self.server_status(),
            "listener": self.listener.lock().status(),
            "cache": {
                "records": self.records.read().len(),
                "round_trips": s.round_trips.load(Ordering::Relaxed),
                "bodies_fetched": s.bodies_fetched.load(Ordering::Relaxed),
                "served_while_down": s.served_while_down.load(Ordering::Relaxed),
                "reconnects": s.reconnects.load(Ordering::Relaxed),
                "notifications": s.notifications.load(Ordering::Relaxed),
                "resyncs": s.resyncs.load(Ordering::Relaxed),
                "attachments": self.blobs.status(),
            },
            "last_error": errs,
            "last_ingest": *self.blobs.last_ingest.lock(),
        })
    }
}

impl Postgres {
    /// Names collections by their directory name (for notifications).
    pub(crate) fn kind_named(name: &str) -> Option<Kind> {
        kind_of(name)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_every_form_of_password() {
        for (url, want) in [
            ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
            (
                "postgresql://u:ab/cd?e@db/agents",
                "postgresql://u:***@db/agents",
            ),
            (
                "postgresql://h/db?password=s3cret",
                "postgresql://h/db?password=***",
            ),
            (
                "postgresql://h/db?sslmode=require&PASSWORD=x",
                "postgresql://h/db?sslmode=require&PASSWORD=***",
            ),
            (
                "postgresql://h/db?pass%77ord=x",
                "postgresql://h/db?pass%77ord=***",
            ),
            (
                "postgresql://u@/db?host=/run/pg",
                "postgresql://u@/db?host=/run/pg",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
            assert!(!redact(url).contains("s3cret") && !redact(url).contains("pw@"));
        }
    }
}
