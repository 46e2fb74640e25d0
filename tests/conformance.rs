//! The conformance suite: the same cases, on real mounts, against every backend (the
//! directory store of trusty-mpm/lash and arbiter's SQLite database), each with a second
//! process writing the store the way its platform does (tests/support/conformance_writer.py:
//! flock + rename for files, SQLite transactions for the database).
//!
//! A backend joins by implementing [`Backend`] below and adding one line to `conformance!`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WRITER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/conformance_writer.py"
);
const MAKE_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/arbiter/make_db.py");

fn env_n(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn new_id(n: u64) -> String {
    format!("c0000000-0000-4000-8000-{n:012x}")
}

/// What the suite needs to know of a backend. Every backend has a `sessions/` collection
/// named by UUID; the "marker" is one string field of a session that writers change.
trait Backend: Sized + 'static {
    const NAME: &'static str;
    /// A fresh store with at least three sessions.
    fn create() -> Self;
    /// The `--store` value.
    fn store(&self) -> PathBuf;
    fn existing_ids(&self) -> Vec<String>;
    /// Valid bytes for session `id` carrying `marker`.
    fn record(id: &str, marker: &str) -> Vec<u8>;
    /// The marker a session's bytes carry.
    fn marker_in(bytes: &[u8]) -> String;
    /// Session `id`'s marker as the store holds it (read without the mount).
    fn stored_marker(&self, id: &str) -> Option<String>;
    /// Everything the store holds, for "nothing changed".
    fn dump(&self) -> String;
    /// The store is consistent: `agentmount fsck` finds no problem (a backend may check
    /// more, as SQLite's PRAGMA integrity_check).
    fn check_integrity(&self) {
        let o = Command::new(BIN)
            .args(["fsck", "--store"])
            .arg(self.store())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "fsck: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    /// After a kill -9: `agentmount fsck --repair` mends what a crash legitimately leaves
    /// (the dead daemon's temp file) and leaves no problem. Plain fsck reports those, and
    /// changes nothing.
    fn mend_after_crash(&self) {
        let o = Command::new(BIN)
            .args(["fsck", "--repair", "--store"])
            .arg(self.store())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "fsck --repair: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    /// Records the backend refuses, with the errno: (what, bytes, errno).
    fn bad_records(&self, id: &str) -> Vec<(&'static str, Vec<u8>, i32)>;
    /// Another program damages the store behind session `existing_ids()[0]` (not through
    /// its protocol); returns the damaged file, or for a server a description of the row.
    fn damage(&self) -> PathBuf;
    /// The damaged thing's bytes as the store holds them now (never overwritten).
    fn damaged_bytes(&self, damaged: &std::path::Path) -> Vec<u8> {
        std::fs::read(damaged).unwrap()
    }

    fn writer(&self, args: &[&str]) -> Command {
        let mut c = Command::new("python3");
        c.arg(WRITER).arg(Self::NAME).arg(self.store()).args(args);
        c
    }

    /// Another process changes (or creates) session `id`; returns once it committed.
    fn external_set(&self, id: &str, marker: &str) {
        let o = self.writer(&["set", id, marker]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn external_delete(&self, id: &str) {
        let o = self.writer(&["delete", id]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

struct Files {
    dir: tempfile::TempDir,
}

impl Backend for Files {
    const NAME: &'static str = "files";

    fn create() -> Self {
        Files {
            dir: fixture_copy(),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn existing_ids(&self) -> Vec<String> {
        Self::existing_ids_of()
    }

    fn record(_id: &str, marker: &str) -> Vec<u8> {
        serde_json::to_vec_pretty(&json!({"tmux_name": "t", "cwd": "/", "task": marker,
            "state": "active", "created_at": "2026-11-20T09:12:03Z"}))
        .unwrap()
    }

    fn marker_in(bytes: &[u8]) -> String {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        v["task"].as_str().unwrap_or_default().to_string()
    }

    fn stored_marker(&self, id: &str) -> Option<String> {
        let doc = json(&self.dir.path().join("session-manager/sessions.json"));
        doc["sessions"][id]["task"].as_str().map(str::to_string)
    }

    fn dump(&self) -> String {
        format!("{:?}", tree(self.dir.path()))
    }

    fn damage(&self) -> PathBuf {
        let p = self.dir.path().join("session-manager/sessions.json");
        let tmp = p.with_extension("garbage");
        std::fs::write(&tmp, b"{\"sessions\": {\"6f1c2a9e-").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    fn bad_records(&self, id: &str) -> Vec<(&'static str, Vec<u8>, i32)> {
        Self::bad_records_for(id)
    }
}

impl Files {
    fn existing_ids_of() -> Vec<String> {
        vec![S_ACTIVE.into(), S_STOPPED.into(), S_FUTURE.into()]
    }

    fn bad_records_for(id: &str) -> Vec<(&'static str, Vec<u8>, i32)> {
        let mut other =
            serde_json::from_slice::<Value>(&<Files as Backend>::record(id, "x")).unwrap();
        other["id"] = json!(S_STOPPED);
        vec![
            ("invalid JSON", b"{\"task\": ".to_vec(), libc::EINVAL),
            (
                "wrong type",
                br#"{"task": 5, "state": "active"}"#.to_vec(),
                libc::EINVAL,
            ),
            (
                "unknown enum value",
                br#"{"task": "t", "state": "sleeping"}"#.to_vec(),
                libc::EINVAL,
            ),
            (
                "id that disagrees with the name",
                serde_json::to_vec(&other).unwrap(),
                libc::EINVAL,
            ),
        ]
    }
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn db(&self) -> PathBuf {
        self.dir.path().join("arbiter.db")
    }

    fn conn(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.db()).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }
}

impl Backend for Sqlite {
    const NAME: &'static str = "sqlite";

    fn create() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("python3")
            .arg(MAKE_DB)
            .arg(dir.path().join("arbiter.db"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Sqlite { dir }
    }

    fn store(&self) -> PathBuf {
        self.db()
    }

    fn existing_ids(&self) -> Vec<String> {
        (0..3)
            .map(|i| format!("5e000000-0000-4000-8000-{i:012x}"))
            .collect()
    }

    fn record(id: &str, marker: &str) -> Vec<u8> {
        serde_json::to_vec_pretty(&json!({
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
        }))
        .unwrap()
    }

    fn marker_in(bytes: &[u8]) -> String {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        v["declared_intent"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn stored_marker(&self, id: &str) -> Option<String> {
        self.conn()
            .query_row(
                "SELECT declared_intent FROM sessions WHERE session_id = ?1",
                [id],
                |r| r.get(0),
            )
            .ok()
    }

    fn dump(&self) -> String {
        let c = self.conn();
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

    fn damage(&self) -> PathBuf {
        // Scribble over the pages after the header, in place, as a careless program would.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.db())
            .unwrap();
        let junk: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        f.write_all_at(&junk, 4096).unwrap();
        f.sync_all().unwrap();
        self.db()
    }

    fn check_integrity(&self) {
        let ok: String = self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "PRAGMA integrity_check");
    }

    fn bad_records(&self, id: &str) -> Vec<(&'static str, Vec<u8>, i32)> {
        let base: Value = serde_json::from_slice(&Self::record(id, "x")).unwrap();
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            serde_json::to_vec(&b).unwrap()
        };
        vec![
            (
                "invalid JSON",
                b"{\"declared_intent\": ".to_vec(),
                libc::EINVAL,
            ),
            (
                "wrong type",
                with("calls_made", json!("many")),
                libc::EINVAL,
            ),
            (
                "unknown enum value",
                with("status", json!("sleeping")),
                libc::EINVAL,
            ),
            (
                "id that disagrees with the name",
                with("session_id", json!("5e000000-0000-4000-8000-000000000001")),
                libc::EINVAL,
            ),
            (
                "unknown key (a row has no place to keep it)",
                with("color", json!("blue")),
                libc::EINVAL,
            ),
            (
                "missing field",
                br#"{"status": "active"}"#.to_vec(),
                libc::EINVAL,
            ),
        ]
    }
}

/// agentmount's shared schema in a real PostgreSQL server (a database per test), filled
/// with the sample store by `agentmount copy`; the other writer is `psql`, as any SQL
/// program on any host would write it.
struct Postgres {
    url: String,
}

impl Postgres {
    fn client(&self) -> ::postgres::Client {
        common::pg::client(&self.url)
    }
}

impl Backend for Postgres {
    const NAME: &'static str = "postgres";

    fn create() -> Self {
        Postgres {
            url: common::pg::fixture_db(),
        }
    }

    fn store(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }

    fn existing_ids(&self) -> Vec<String> {
        Files::existing_ids_of()
    }

    fn record(id: &str, marker: &str) -> Vec<u8> {
        Files::record(id, marker)
    }

    fn marker_in(bytes: &[u8]) -> String {
        Files::marker_in(bytes)
    }

    fn stored_marker(&self, id: &str) -> Option<String> {
        self.client()
            .query_opt(
                "SELECT body::json->>'task' FROM agentmount_records WHERE collection = 'sessions' AND id = $1",
                &[&id],
            )
            .unwrap()
            .and_then(|r| r.get(0))
    }

    fn dump(&self) -> String {
        let mut c = self.client();
        let mut out = String::new();
        for q in [
            "SELECT collection || '/' || id || ' ' || version || ' ' || body FROM agentmount_records ORDER BY 1",
            "SELECT hex || ' ' || size || ' ' || created_at FROM agentmount_blobs ORDER BY 1",
            "SELECT hex || ' ' || encode(body, 'escape') || ' ' || coalesce(label, '-') FROM agentmount_sidecars ORDER BY 1",
            "SELECT hex || ' ' || coalesce(committed_at::text, '-') FROM agentmount_manifest ORDER BY 1",
        ] {
            for r in c.query(q, &[]).unwrap() {
                out.push_str(&r.get::<_, String>(0));
                out.push('\n');
            }
        }
        out
    }

    fn bad_records(&self, id: &str) -> Vec<(&'static str, Vec<u8>, i32)> {
        Files::bad_records_for(id)
    }

    fn damage(&self) -> PathBuf {
        let id = &self.existing_ids()[0];
        self.client()
            .execute(
                "UPDATE agentmount_records SET body = '{\"sessions\": {\"6f1c2a9e-' WHERE collection = 'sessions' AND id = $1",
                &[id],
            )
            .unwrap();
        PathBuf::from(format!("sessions/{id}"))
    }

    fn damaged_bytes(&self, _damaged: &std::path::Path) -> Vec<u8> {
        let id = &self.existing_ids()[0];
        self.client()
            .query_one(
                "SELECT body FROM agentmount_records WHERE collection = 'sessions' AND id = $1",
                &[id],
            )
            .unwrap()
            .get::<_, String>(0)
            .into_bytes()
    }
}

fn read(m: &Mount, id: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(m.p(&format!("sessions/{id}.json")))
}

/// After another process's write returned: an open reads the new bytes (and fstat agrees),
/// a record created outside is found at the next lookup, and one removed outside is gone
/// within the invalidation latency (at the latest the TTL).
fn freshness_after_an_external_write<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &[]);
    let ids = b.existing_ids();
    let mut latencies = Vec::new();
    for round in 0..20 {
        // Cache the old attributes in the kernel, then change the record outside.
        let before = std::fs::metadata(m.p(&format!("sessions/{}.json", ids[0]))).unwrap();
        let marker = format!("external round {round} {}", "x".repeat(round));
        b.external_set(&ids[0], &marker);
        let t0 = Instant::now();
        let mut f = std::fs::File::open(m.p(&format!("sessions/{}.json", ids[0]))).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        assert_eq!(
            B::marker_in(&bytes),
            marker,
            "{}: an open after the write returned reads the new bytes",
            B::NAME
        );
        assert_eq!(
            f.metadata().unwrap().len(),
            bytes.len() as u64,
            "fstat agrees"
        );
        drop(f);
        // stat (no open) shows the new size once the watcher invalidated the kernel's copy.
        let seen = wait_until(Duration::from_millis(1500), || {
            std::fs::metadata(m.p(&format!("sessions/{}.json", ids[0])))
                .map(|a| a.len() == bytes.len() as u64)
                .unwrap_or(false)
        });
        assert!(seen.is_some(), "stat showed the new size within the TTL");
        if before.len() != bytes.len() as u64 {
            latencies.push(t0.elapsed());
        }
    }
    let fresh = new_id(77);
    b.external_set(&fresh, "made outside");
    assert_eq!(
        B::marker_in(&read(&m, &fresh).unwrap()),
        "made outside",
        "a record created outside is found at the next lookup"
    );
    b.external_delete(&ids[1]);
    let gone = wait_until(Duration::from_millis(1500), || {
        std::fs::metadata(m.p(&format!("sessions/{}.json", ids[1]))).is_err()
    });
    assert!(gone.is_some(), "a record removed outside disappears");
    assert!(read(&m, &ids[1]).is_err());
    let listed = sh_ok("ls sessions", m.path());
    assert!(listed.contains(&fresh) && !listed.contains(&ids[1]));
    latencies.sort();
    let status = json(&m.p(".status"));
    println!(
        "figures: {} external-change-to-stat median={:?} max={:?} watcher-last-us={}",
        B::NAME,
        latencies.get(latencies.len() / 2),
        latencies.last(),
        status["invalidation"]["last_latency_us"]
    );
}

/// A writer through the mount and another process writing the store at once: neither loses
/// the other's updates, and two writers on one record leave one whole version of it.
fn no_lost_updates_between_two_writers<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &[]);
    let ids = b.existing_ids();
    let rounds = env_n("AGENTMOUNT_CONFORMANCE_ROUNDS", 25);
    let (ext_id, mnt_id, shared) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let mut ext = b
        .writer(&["loop", &format!("{ext_id},{shared}"), &rounds.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut written = vec![];
    for r in 0..rounds {
        for id in [&mnt_id, &shared] {
            let marker = format!("mnt-{r}");
            write_close(
                &m.p(&format!("sessions/{id}.json")),
                &B::record(id, &marker),
            )
            .unwrap_or_else(|e| panic!("{}: write through the mount: errno {e}", B::NAME));
            written.push(marker);
        }
    }
    let acks = BufReader::new(ext.stdout.take().unwrap()).lines().count();
    assert!(ext.wait().unwrap().success());
    assert_eq!(acks as u64, 2 * rounds);
    let last = format!("ext-{}", rounds - 1);
    let mine = format!("mnt-{}", rounds - 1);
    assert_eq!(b.stored_marker(&ext_id).as_deref(), Some(last.as_str()));
    assert_eq!(b.stored_marker(&mnt_id).as_deref(), Some(mine.as_str()));
    assert_eq!(B::marker_in(&read(&m, &ext_id).unwrap()), last);
    assert_eq!(B::marker_in(&read(&m, &mnt_id).unwrap()), mine);
    // The record both wrote holds one whole version: the last of one writer or the other.
    let s = b.stored_marker(&shared).unwrap();
    assert!(
        s == last || s == mine,
        "{}: shared record is {s:?}",
        B::NAME
    );
    assert_eq!(B::marker_in(&read(&m, &shared).unwrap()), s);
    b.check_integrity();
}

/// kill -9 of the daemon while writers are busy: every write that returned is in the store,
/// and the store is consistent.
fn kill_9_loses_no_acknowledged_write<B: Backend>() {
    let cycles = env_n("AGENTMOUNT_CONFORMANCE_KILLS", 6);
    let b = B::create();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for cycle in 0..cycles {
        let m = Mount::new(&b.store(), &[]);
        let pid = json(&m.p(".status"))["pid"].as_i64().unwrap() as i32;
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (p, stop, acked) = (m.path().to_path_buf(), stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let id = new_id((cycle << 24) | (t << 20) | i);
                        let marker = format!("c{cycle} t{t} i{i}");
                        match write_close(
                            &p.join(format!("sessions/{id}.json")),
                            &B::record(&id, &marker),
                        ) {
                            Ok(()) => acked.lock().unwrap().push((id, marker)),
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(40 + (cycle * 53) % 160));
        unsafe { libc::kill(pid, libc::SIGKILL) };
        stop.store(true, Ordering::Relaxed);
        let o = Command::new(BIN)
            .args(["unmount", "--force"])
            .arg(m.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for t in threads {
            t.join().unwrap();
        }
        drop(m);
        b.mend_after_crash();
        b.check_integrity();
    }
    let acked = acked.lock().unwrap();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(id, mk)| b.stored_marker(id).as_deref() != Some(mk.as_str()))
        .collect();
    println!(
        "figures: {} kill-9 cycles={cycles} acked={} lost={}",
        B::NAME,
        acked.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{}: lost acknowledged writes: {lost:?}",
        B::NAME
    );
    assert!(acked.len() as u64 > cycles, "writers made progress");
    // It mounts again and serves them.
    let m = Mount::new(&b.store(), &[]);
    let (id, mk) = &acked[acked.len() - 1];
    assert_eq!(&B::marker_in(&read(&m, id).unwrap()), mk);
}

/// Every bad input fails at the call that caused it with its errno, says why in `.errors`,
/// and leaves the store byte for byte as it was.
fn bad_input_gets_its_errno_and_changes_nothing<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &["--max-record-bytes", "65536"]);
    let id = b.existing_ids()[0].clone();
    let before = b.dump();
    let target = m.p(&format!("sessions/{id}.json"));
    let mut expected = 0;
    for (what, bytes, errno) in b.bad_records(&id) {
        assert_eq!(
            write_close(&target, &bytes),
            Err(errno),
            "{}: {what}",
            B::NAME
        );
        expected += 1;
    }
    // A record over the size limit: EFBIG.
    let mut big = B::record(&id, &"y".repeat(70_000));
    big.truncate(big.len());
    assert_eq!(
        write_close(&target, &big),
        Err(libc::EFBIG),
        "{}: size",
        B::NAME
    );
    expected += 1;
    // A name that is not an id of the collection: EINVAL at create.
    assert_eq!(
        write_close(&m.p("sessions/not-a-uuid.json"), &B::record(&id, "z")),
        Err(libc::EINVAL),
        "{}: bad name",
        B::NAME
    );
    expected += 1;
    // Never allowed in a record directory: mkdir, hard links, symlinks.
    let e = std::fs::create_dir(m.p("sessions/sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{}: mkdir", B::NAME);
    let e = std::fs::hard_link(&target, m.p(&format!("sessions/{}.json", new_id(9)))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{}: link", B::NAME);
    // A move out of its collection: EXDEV (mv then copies, which validates).
    let e = std::fs::rename(&target, m.p("x.json")).unwrap_err();
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        "{}: rename out of sessions: {e}",
        B::NAME
    );
    assert_eq!(b.dump(), before, "{}: the store did not change", B::NAME);
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert!(
        errors.lines().count() >= expected,
        "{}: .errors has a line per refusal: {errors}",
        B::NAME
    );
    drop(m);
    // Any change on a read-only mount: EROFS.
    let m = Mount::new(&b.store(), &["--read-only"]);
    assert_eq!(
        write_close(&m.p(&format!("sessions/{id}.json")), &B::record(&id, "ro")),
        Err(libc::EROFS)
    );
    let e = std::fs::remove_file(m.p(&format!("sessions/{id}.json"))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    drop(m);
    assert_eq!(b.dump(), before, "{}: the store did not change", B::NAME);
}

/// A session named by another spelling of a UUID (uppercase, braced, urn, undashed) would be
/// a second record beside the lowercase one: every backend refuses it (EINVAL), naming the
/// one spelling, and the store does not change.
fn non_canonical_session_names_are_refused<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &[]);
    let id = b.existing_ids()[0].clone();
    let before = b.dump();
    let upper = id.to_ascii_uppercase();
    for name in [
        upper.clone(),
        format!("{{{id}}}"),
        format!("urn:uuid:{id}"),
        id.replace('-', ""),
    ] {
        assert_eq!(
            write_close(
                &m.p(&format!("sessions/{name}.json")),
                &B::record(&id, "twin")
            ),
            Err(libc::EINVAL),
            "{}: {name}",
            B::NAME
        );
        let e = std::fs::rename(
            m.p(&format!("sessions/{id}.json")),
            m.p(&format!("sessions/{name}.json")),
        )
        .unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINVAL),
            "{}: mv to {name}",
            B::NAME
        );
    }
    assert_eq!(b.dump(), before, "{}: the store did not change", B::NAME);
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert_eq!(errors.lines().count(), 8, "{}: {errors}", B::NAME);
    assert!(
        errors
            .lines()
            .all(|l| l.contains(&format!("name it \\\"{id}\\\""))),
        "{}: each reason names the canonical form: {errors}",
        B::NAME
    );
}

/// Another writer holds the store's lock past the lock timeout: a write through the mount
/// fails with EAGAIN and changes nothing; once the lock is free, writes go through.
fn a_store_locked_past_the_timeout_gets_eagain<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &["--lock-timeout", "0.3"]);
    let id = b.existing_ids()[0].clone();
    let before = b.dump();
    let mut holder = b
        .writer(&["hold", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let t0 = Instant::now();
    let target = m.p(&format!("sessions/{id}.json"));
    assert_eq!(
        write_close(&target, &B::record(&id, "while locked")),
        Err(libc::EAGAIN),
        "{}: a write past the lock timeout",
        B::NAME
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "{}: waited {waited:?}",
        B::NAME
    );
    assert_eq!(b.dump(), before, "{}: nothing changed", B::NAME);
    assert!(holder.wait().unwrap().success());
    write_close(&target, &B::record(&id, "after the lock")).unwrap();
    assert_eq!(b.stored_marker(&id).as_deref(), Some("after the lock"));
}

/// Another program damages the store: the mount keeps serving the last good view, says
/// why in `.status`, refuses writes with EIO, and never writes over the damaged file.
fn a_damaged_store_serves_the_last_good_view_and_is_never_overwritten<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &[]);
    let id = b.existing_ids()[0].clone();
    let good = read(&m, &id).unwrap();
    let damaged = b.damage();
    let bytes = b.damaged_bytes(&damaged);
    // Reads: the last good view (also after the TTL and a fresh open).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(read(&m, &id).unwrap(), good, "{}: last good view", B::NAME);
    assert_eq!(
        write_close(
            &m.p(&format!("sessions/{id}.json")),
            &B::record(&id, "onto damage")
        ),
        Err(libc::EIO),
        "{}: a write to a damaged store",
        B::NAME
    );
    let e = std::fs::remove_file(m.p(&format!("sessions/{id}.json"))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: unlink", B::NAME);
    assert_eq!(
        b.damaged_bytes(&damaged),
        bytes,
        "{}: never overwritten",
        B::NAME
    );
    let status = json(&m.p(".status"));
    assert!(
        !status["last_error"]["sessions"].is_null(),
        "{}: .status says why: {status}",
        B::NAME
    );
    assert_eq!(read(&m, &id).unwrap(), good);
}

/// Writes, re-keys and removals through the mount land in the store as the platform reads
/// it, and read back through the mount.
fn writes_renames_and_removals_reach_the_store<B: Backend>() {
    let b = B::create();
    let m = Mount::new(&b.store(), &[]);
    let ids = b.existing_ids();
    let fresh = new_id(1);
    sh_ok(
        &format!(
            "cat > sessions/{fresh}.json <<'EOF'\n{}\nEOF",
            String::from_utf8(B::record(&fresh, "made by cat")).unwrap()
        ),
        m.path(),
    );
    assert_eq!(b.stored_marker(&fresh).as_deref(), Some("made by cat"));
    let moved = new_id(2);
    sh_ok(
        &format!("mv sessions/{fresh}.json sessions/{moved}.json"),
        m.path(),
    );
    assert_eq!(b.stored_marker(&fresh), None);
    assert_eq!(b.stored_marker(&moved).as_deref(), Some("made by cat"));
    let v: Value = serde_json::from_slice(&read(&m, &moved).unwrap()).unwrap();
    assert!(
        v.to_string().contains(&moved),
        "the id is rewritten on a re-key"
    );
    sh_ok(&format!("rm sessions/{moved}.json"), m.path());
    assert_eq!(b.stored_marker(&moved), None);
    assert!(read(&m, &moved).is_err());
    // An editor's way: write a scratch file, rename it over the record.
    let path = format!("sessions/{}.json", ids[0]);
    sh_ok(
        &format!(
            "cat > sessions/.edit.swp <<'EOF'\n{}\nEOF\nmv sessions/.edit.swp {path}",
            String::from_utf8(B::record(&ids[0], "via scratch")).unwrap()
        ),
        m.path(),
    );
    assert_eq!(b.stored_marker(&ids[0]).as_deref(), Some("via scratch"));
    let listed = sh_ok("ls -a sessions", m.path());
    assert!(
        !listed.contains(".edit.swp"),
        "the scratch file became the record"
    );
    let counts = json(&m.p(".status"))["counts"]["sessions"]
        .as_u64()
        .unwrap();
    assert_eq!(counts as usize, ids.len());
    let mut per: HashMap<String, String> = HashMap::new();
    for id in &ids {
        per.insert(id.clone(), B::marker_in(&read(&m, id).unwrap()));
    }
    assert_eq!(per[&ids[0]], "via scratch");
}

/// No ordinary command loses data: a record moved to a scratch name (`mv X.json X.json.bak`)
/// keeps its bytes on disk across an unmount and moves back; a shell's `>` into
/// attachments/ stores what it wrote.
fn ordinary_commands_lose_nothing_across_a_remount<B: Backend>() {
    let b = B::create();
    let ids = b.existing_ids();
    let path = format!("sessions/{}.json", ids[0]);
    // A Postgres mount's state dir is per host and mountpoint unless named.
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap();
    let args: &[&str] = if B::NAME == "postgres" {
        &["--state-dir", state_arg]
    } else {
        &[]
    };
    let before;
    let attachments;
    {
        let m = Mount::new(&b.store(), args);
        before = read(&m, &ids[0]).unwrap();
        sh_ok(&format!("mv {path} {path}.bak"), m.path());
        assert_eq!(b.stored_marker(&ids[0]), None, "the record went");
        assert_eq!(std::fs::read(m.p(&format!("{path}.bak"))).unwrap(), before);
        attachments = m.p("attachments").is_dir();
        if attachments {
            assert_eq!(
                sh_ok(
                    "echo hello > attachments/new.txt && cat attachments/new.txt",
                    m.path()
                ),
                "hello\n"
            );
            sh_ok(
                "exec 3>attachments/x; /bin/echo a >&3; echo b >&3; exec 3>&-",
                m.path(),
            );
        }
    }
    let mut args = args.to_vec();
    args.push("--no-journal");
    let m = Mount::new(&b.store(), &args);
    let ls = sh_ok("ls sessions/", m.path());
    assert!(ls.contains(&format!("{}.json.bak", ids[0])), "{ls}");
    sh_ok(&format!("mv {path}.bak {path}"), m.path());
    assert_eq!(b.stored_marker(&ids[0]), Some(B::marker_in(&before)));
    assert!(!m.p(&format!("{path}.bak")).exists());
    if attachments {
        assert_eq!(
            std::fs::read(m.p("attachments/new.txt")).unwrap(),
            b"hello\n"
        );
        assert_eq!(std::fs::read(m.p("attachments/x")).unwrap(), b"a\nb\n");
    }
}

/// Instantiates every case for every backend: `cargo test --test conformance sqlite`.
macro_rules! conformance {
    ($($backend:ident => $ty:ty),* $(,)?) => {$(
        mod $backend {
            use super::*;
            #[test]
            fn freshness_after_an_external_write() {
                super::freshness_after_an_external_write::<$ty>()
            }
            #[test]
            fn no_lost_updates_between_two_writers() {
                super::no_lost_updates_between_two_writers::<$ty>()
            }
            #[test]
            fn kill_9_loses_no_acknowledged_write() {
                super::kill_9_loses_no_acknowledged_write::<$ty>()
            }
            #[test]
            fn bad_input_gets_its_errno_and_changes_nothing() {
                super::bad_input_gets_its_errno_and_changes_nothing::<$ty>()
            }
            #[test]
            fn a_store_locked_past_the_timeout_gets_eagain() {
                super::a_store_locked_past_the_timeout_gets_eagain::<$ty>()
            }
            #[test]
            fn a_damaged_store_serves_the_last_good_view_and_is_never_overwritten() {
                super::a_damaged_store_serves_the_last_good_view_and_is_never_overwritten::<$ty>()
            }
            #[test]
            fn non_canonical_session_names_are_refused() {
                super::non_canonical_session_names_are_refused::<$ty>()
            }
            #[test]
            fn writes_renames_and_removals_reach_the_store() {
                super::writes_renames_and_removals_reach_the_store::<$ty>()
            }
            #[test]
            fn ordinary_commands_lose_nothing_across_a_remount() {
                super::ordinary_commands_lose_nothing_across_a_remount::<$ty>()
            }
        }
    )*};
}

conformance! {
    files => Files,
    sqlite => Sqlite,
    postgres => Postgres,
}
