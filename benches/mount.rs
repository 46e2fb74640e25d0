//! Mount benchmarks against native work in the same run (scripts/bench.sh runs this).
//! Prints a table of ratios; asserts nothing. BENCH_QUICK=1 shrinks every size;
//! BENCH_ONLY=sqlite,sessions (any of attachments, cp, sessions, sqlite, scratch, journal, gc,
//! postgres) runs only those.

#[path = "support/postgres_rows.rs"]
mod postgres_rows;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_agentmount");

struct Row {
    what: String,
    ours: String,
    native: String,
    ratio: String,
    target: &'static str,
}

/// Our time over native time, as the tables print it.
fn ratio(ours: Duration, native: Duration) -> String {
    format!("{:.2}x", ours.as_secs_f64() / native.as_secs_f64())
}

fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok()
}

/// Whether BENCH_ONLY (a comma-separated list of sections) leaves `section` in.
fn want(section: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(v) => v.split(',').any(|s| s.trim() == section),
        Err(_) => true,
    }
}

/// The record counts a sessions section runs at (none when BENCH_ONLY leaves it out).
fn sizes(section: &str) -> Vec<usize> {
    match (want(section), quick()) {
        (false, _) => vec![],
        (true, true) => vec![100, 1000],
        (true, false) => vec![100, 10_000],
    }
}

fn hex(b: &[u8]) -> String {
    agentmount::store::attachments::to_hex(&sha2::Sha256::digest(b))
}

struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(store: &Path, mp: &Path) -> Mounted {
        Self::with(store, mp, &[])
    }
    fn with(store: &Path, mp: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mp).unwrap();
        if !store.exists() {
            // A new store: mount refuses a --store that does not exist.
            std::fs::create_dir_all(store).unwrap();
        }
        let o = Command::new(BIN)
            .arg("mount")
            .args(extra)
            .arg("--store")
            .arg(store)
            .arg(mp)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Mounted {
            dir: mp.to_path_buf(),
        }
    }
    fn status(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join(".status")).unwrap()).unwrap()
    }
    fn pid(&self) -> i64 {
        self.status()["pid"].as_i64().unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(BIN).arg("unmount").arg(&self.dir).output();
    }
}

fn session(i: usize) -> (String, Value) {
    let id = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
    let v = json!({
        "id": id, "tmux_name": format!("tm-{i}"), "cwd": "/home/dev/projects/api", "task": format!("task number {i}"),
        "state": "active", "created_at": "2026-11-20T09:12:03Z", "last_activity_at": null, "workspace_path": null,
        "repo_url": "https://example.invalid/acme/api.git", "branch": "main", "pending_decision": null, "proposed_default": null,
        "correlation": {"worktree": null, "branch": null, "pr_id": i, "issue_id": null}, "runtime": "claude-code",
        "ephemeral": false, "workspace_owned": false, "pane_id": "%5", "injection_status": "not_applicable", "terminal_at": null
    });
    (id, v)
}

fn write_sessions(store: &Path, n: usize, extra: impl Fn(usize, &mut Value)) -> Vec<String> {
    let p = store.join("session-manager/sessions.json");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut ids = Vec::new();
    let mut m = serde_json::Map::new();
    for i in 0..n {
        let (id, mut v) = session(i);
        extra(i, &mut v);
        ids.push(id.clone());
        m.insert(id, v);
    }
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&json!({"sessions": m})).unwrap(),
    )
    .unwrap();
    ids
}

fn per<R>(n: usize, mut f: impl FnMut(usize) -> R) -> Duration {
    let t0 = Instant::now();
    for i in 0..n {
        std::hint::black_box(f(i));
    }
    t0.elapsed() / n as u32
}

fn read_all(p: &Path) -> u64 {
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// trusty-mpm's own upsert: reload, change one session, temp file, fsync, rename.
fn native_upsert(path: &Path, id: &str, rec: &Value) {
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["sessions"][id] = rec.clone();
    let tmp = path.with_extension("native-tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(&serde_json::to_vec_pretty(&doc).unwrap())
        .unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

fn rss_kib(pid: i64, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The medians of `n` runs each of `a` and `b`, each run timed alone and the two
/// alternated, so both see the same machine (other processes' I/O moves fsync times).
/// Polls `stat` of `p` from now until its size is no longer `before` (at most 3 s): how
/// long that took, and whether it changed at all.
fn until_size_changes(p: &Path, before: u64) -> (Duration, bool) {
    let t0 = Instant::now();
    while std::fs::metadata(p).unwrap().len() == before {
        if t0.elapsed() > Duration::from_secs(3) {
            return (t0.elapsed(), false);
        }
        std::hint::spin_loop();
    }
    (t0.elapsed(), true)
}

/// The watcher's own time for the last change, from reading the event to the last
/// invalidation sent (`.status`), read once it has surely finished.
fn watcher_us(m: &Mounted) -> u64 {
    std::thread::sleep(Duration::from_millis(30));
    m.status()["invalidation"]["last_latency_us"]
        .as_u64()
        .unwrap_or(0)
}

fn medians<R, S>(
    n: usize,
    mut a: impl FnMut(usize) -> R,
    mut b: impl FnMut(usize) -> S,
) -> (Duration, Duration) {
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t0 = Instant::now();
        std::hint::black_box(a(i));
        ta.push(t0.elapsed());
        let t0 = Instant::now();
        std::hint::black_box(b(i));
        tb.push(t0.elapsed());
    }
    ta.sort();
    tb.sort();
    (ta[n / 2], tb[n / 2])
}

/// arbiter's SQLite database mounted (`--store arbiter.db`), at `n` sessions, against a
/// native client: rusqlite on its own connection in this process, on a byte-for-byte copy
/// of the database in another directory (same file system), so its commits do not make
/// the mount reload while the two are timed in turns.
fn sqlite_rows(b: &Path, n: usize, rows: &mut Vec<Row>) {
    use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
    let (dir, native_dir) = (
        b.join(format!("arbiter-{n}")),
        b.join(format!("native-{n}")),
    );
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&native_dir).unwrap();
    let db = dir.join("arbiter.db");
    let o = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/arbiter/make_db.py"
        ))
        .arg(&db)
        .args(["--sessions", &n.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // make_db.py closed its connection: the WAL is checkpointed, the .db file is all.
    std::fs::copy(&db, native_dir.join("arbiter.db")).unwrap();
    let id = format!("5e000000-0000-4000-8000-{:012x}", n / 2);
    let m = Mounted::new(&db, &b.join(format!("mnt-arbiter-{n}")));
    let rec = m.dir.join(format!("sessions/{id}.json"));
    // Opened as the mount opens it (src/backend/sqlite/mod.rs): rusqlite's defaults, so the
    // same journal mode (the database's: WAL) and the same `synchronous`.
    let open = |p: &Path| {
        Connection::open_with_flags(
            p,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap()
    };
    let mut native = open(&native_dir.join("arbiter.db"));
    let mut other = open(&db);
    let journal: String = native
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: usize = native
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    let sync = ["OFF", "NORMAL", "FULL", "EXTRA"][sync];

    // Read one session: open+read+close of its file vs a prepared SELECT of its row,
    // every column fetched.
    std::fs::read(&rec).unwrap();
    let mut st = native
        .prepare("SELECT * FROM sessions WHERE session_id = ?1")
        .unwrap();
    let cols = st.column_count();
    let (ours_read, native_read) = medians(
        2000,
        |_| std::fs::read(&rec).unwrap(),
        |_| {
            let mut r = st.query([&id]).unwrap();
            let row = r.next().unwrap().unwrap();
            (0..cols)
                .map(|i| row.get::<_, rusqlite::types::Value>(i).unwrap())
                .collect::<Vec<_>>()
        },
    );
    drop(st);

    // Upsert one session: the whole file written with two fields changed, then closed (the
    // close returns after the commit), vs one transaction updating the same two columns.
    let k = if quick() { 20 } else { 50 };
    let mut v: Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let (ours_upsert, native_upsert) = medians(
        k,
        |i| {
            v["declared_intent"] = json!(format!("ours {i}"));
            v["calls_made"] = json!(1000 + i);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&rec)
                .unwrap();
            f.write_all(&serde_json::to_vec_pretty(&v).unwrap())
                .unwrap();
        },
        |i| {
            let tx = native
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            tx.prepare_cached(
                "UPDATE sessions SET declared_intent = ?1, calls_made = ?2 WHERE session_id = ?3",
            )
            .unwrap()
            .execute(params![format!("native {i}"), 1000 + i as i64, id])
            .unwrap();
            tx.commit().unwrap();
        },
    );
    let stored: String = other
        .query_row(
            "SELECT declared_intent FROM sessions WHERE session_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, format!("ours {}", k - 1), "the mount's upsert");

    // Another connection commits an UPDATE that changes the session's size; stat through
    // the mount (answered from the kernel's attribute cache, TTL 1 s) is polled from the
    // moment COMMIT returned until it shows the new size.
    let (mut lat, mut watcher, mut stale) = (Vec::new(), Vec::new(), 0);
    for i in 0..50 {
        let before = std::fs::metadata(&rec).unwrap().len();
        let tx = other
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        tx.execute(
            "UPDATE sessions SET declared_intent = ?1 WHERE session_id = ?2",
            params!["x".repeat(1 + i % 2), id],
        )
        .unwrap();
        tx.commit().unwrap();
        let (took, seen) = until_size_changes(&rec, before);
        stale += u32::from(!seen);
        lat.push(took);
        watcher.push(watcher_us(&m));
    }
    lat.sort();
    watcher.sort();

    rows.push(Row {
        what: format!("sqlite: read one session at {n} (open+read+close, median)"),
        ours: us(ours_read),
        native: format!(
            "{} (rusqlite, prepared SELECT * WHERE session_id = ?, {cols} columns fetched, own connection)",
            us(native_read)
        ),
        ratio: ratio(ours_read, native_read),
        target: "report",
    });
    rows.push(Row {
        what: format!(
            "sqlite: upsert one session at {n} (write whole file + close, median; journal_mode={journal}, synchronous={sync} on both sides)"
        ),
        ours: ms(ours_upsert),
        native: format!(
            "{} (rusqlite: BEGIN IMMEDIATE; UPDATE 2 columns; COMMIT)",
            ms(native_upsert)
        ),
        ratio: ratio(ours_upsert, native_upsert),
        target: "report",
    });
    rows.push(Row {
        what: format!("sqlite: external commit -> stat through the mount shows it, at {n}"),
        ours: format!(
            "median {} p90 {} max {} after COMMIT returned ({} trials{}); watcher median {} µs max {} µs from the event",
            us(lat[lat.len() / 2]),
            us(lat[lat.len() * 9 / 10]),
            us(lat[lat.len() - 1]),
            lat.len(),
            if stale > 0 {
                format!(", {stale} not seen within 3 s")
            } else {
                String::new()
            },
            watcher[watcher.len() / 2],
            watcher[watcher.len() - 1]
        ),
        native: "-".into(),
        ratio: "-".into(),
        target: "< 10 ms median",
    });
}

/// The journal's cost (record times, .changes, .history): the same build with it on and
/// with --no-journal, on two copies of one store of `n` sessions, timed in turns.
fn journal_rows(b: &Path, n: usize, rows: &mut Vec<Row>) {
    let (on_store, off_store) = (b.join(format!("j-on-{n}")), b.join(format!("j-off-{n}")));
    let ids = write_sessions(&on_store, n, |_, _| {});
    write_sessions(&off_store, n, |_, _| {});
    let on = Mounted::new(&on_store, &b.join(format!("mnt-jon-{n}")));
    let off = Mounted::with(
        &off_store,
        &b.join(format!("mnt-joff-{n}")),
        &["--no-journal"],
    );
    let id = &ids[n / 2];
    let (_, mut v) = session(n / 2);
    let k = if n > 1000 { 31 } else { 61 };
    let mut upsert = |m: &Mounted, i: usize| {
        v["task"] = json!(format!("journal {i}"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.dir.join(format!("sessions/{id}.json")))
            .unwrap();
        f.write_all(&serde_json::to_vec(&v).unwrap()).unwrap();
        f.sync_all().unwrap();
    };
    let (mut t_on, mut t_off) = (Vec::new(), Vec::new());
    for i in 0..k {
        let t0 = Instant::now();
        upsert(&on, i);
        t_on.push(t0.elapsed());
        let t0 = Instant::now();
        upsert(&off, i);
        t_off.push(t0.elapsed());
    }
    t_on.sort();
    t_off.sort();
    let (a, c) = (t_on[k / 2], t_off[k / 2]);
    rows.push(Row {
        what: format!("journal: upsert one session at {n}, on vs --no-journal (median)"),
        ours: ms(a),
        native: format!("{} (--no-journal)", ms(c)),
        ratio: ratio(a, c),
        target: "<= 1.05x",
    });
    // External reload: another process renames sessions.json with one session changed;
    // stat through the mount is polled until it shows the new size.
    let ext = |store: &Path, m: &Mounted, i: usize| {
        let file = store.join("session-manager/sessions.json");
        let rec = m.dir.join(format!("sessions/{id}.json"));
        let before = std::fs::metadata(&rec).unwrap().len();
        let mut doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        doc["sessions"][id.as_str()]["task"] = json!("y".repeat(1 + i % 2));
        let tmp = file.with_extension("j-tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        until_size_changes(&rec, before).0
    };
    let (mut e_on, mut e_off) = (Vec::new(), Vec::new());
    let k = if n > 1000 { 11 } else { 41 };
    for i in 0..k {
        e_on.push(ext(&on_store, &on, i));
        e_off.push(ext(&off_store, &off, i));
    }
    e_on.sort();
    e_off.sort();
    let (a, c) = (e_on[k / 2], e_off[k / 2]);
    rows.push(Row {
        what: format!(
            "journal: external change -> stat shows it at {n}, on vs --no-journal (median)"
        ),
        ours: us(a),
        native: format!("{} (--no-journal)", us(c)),
        ratio: ratio(a, c),
        target: "<= 1.05x",
    });
    let st = on.status();
    let j = &st["journal"];
    let versions = j["history_versions"].as_u64().unwrap_or(0).max(1);
    let du = |p: &Path| -> u64 {
        let o = Command::new("du").args(["-sb"]).arg(p).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    let hist = du(&on_store.join(".agentmount/history"));
    let feed = std::fs::metadata(on_store.join(".agentmount/changes.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0);
    let lines = j["feed_lines"].as_u64().unwrap_or(0).max(1);
    rows.push(Row {
        what: format!("journal: storage per change at {n}"),
        ours: format!(
            "history {} B/version ({} versions; a session is ~{} B), feed {} B/line",
            hist / versions,
            versions,
            std::fs::metadata(on.dir.join(format!("sessions/{id}.json")))
                .map(|m| m.len())
                .unwrap_or(0),
            feed / lines
        ),
        native: "-".into(),
        ratio: "-".into(),
        target: "report",
    });
}

/// Scratch files (editors', sed -i's and SQLite's temp files live there): where one small
/// write spends its time, against the same operations on a native file and against the
/// FUSE round-trip floor (an fstat of the open file, which scratch files answer uncached).
fn scratch_rows(b: &Path, rows: &mut Vec<Row>) {
    use std::os::unix::fs::FileExt;
    let store = b.join("scratch-store");
    write_sessions(&store, 10, |_, _| {});
    let m = Mounted::new(&store, &b.join("mnt-scratch"));
    let ours = m.dir.join("sessions/fsx.scratch");
    let native = b.join("native.scratch");
    let size = 1usize << 20;
    let block = vec![7u8; 4096];
    let open = |p: &Path| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(p)
            .unwrap();
        f.write_all_at(&vec![0u8; size], 0).unwrap();
        f
    };
    let (fo, fnat) = (open(&ours), open(&native));
    let n = if quick() { 500 } else { 5000 };
    let at = |i: usize| ((i * 7919) % (size / 4096)) as u64 * 4096;
    let (w_ours, w_nat) = medians(
        n,
        |i| fo.write_all_at(&block, at(i)).unwrap(),
        |i| fnat.write_all_at(&block, at(i)).unwrap(),
    );
    let (mut buf, mut buf2) = (vec![0u8; 4096], vec![0u8; 4096]);
    let (r_ours, r_nat) = medians(
        n,
        |i| fo.read_at(&mut buf, at(i)).unwrap(),
        |i| fnat.read_at(&mut buf2, at(i)).unwrap(),
    );
    let (s_ours, s_nat) = medians(
        n,
        |_| fo.metadata().unwrap().len(),
        |_| fnat.metadata().unwrap().len(),
    );
    rows.push(Row {
        what: "scratch file: 4 KiB pwrite into 1 MiB (median)".into(),
        ours: us(w_ours),
        native: us(w_nat),
        ratio: ratio(w_ours, w_nat),
        target: "report",
    });
    rows.push(Row {
        what: "scratch file: 4 KiB pread (median)".into(),
        ours: us(r_ours),
        native: us(r_nat),
        ratio: ratio(r_ours, r_nat),
        target: "report",
    });
    rows.push(Row {
        what: "scratch file: fstat, the FUSE round-trip floor (median)".into(),
        ours: us(s_ours),
        native: us(s_nat),
        ratio: ratio(s_ours, s_nat),
        target: "report",
    });
}

fn main() {
    let base =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let b = base.path();
    let mut rows = Vec::new();
    let q = quick();

    // 1. Large attachment reads, warm.
    if want("attachments") {
        let store = b.join("big");
        for size_mib in if q { vec![16usize] } else { vec![256, 1024] } {
            let data: Vec<u8> = (0..size_mib << 20).map(|i| (i * 31 % 251) as u8).collect();
            let h = hex(&data);
            let p = store.join("attachments/sha256").join(&h[..2]).join(&h);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &data).unwrap();
            drop(data);
            let m = Mounted::new(&store, &b.join("mnt-big"));
            let mp = m.dir.join("attachments").join(&h);
            read_all(&mp);
            read_all(&p);
            let ours = per(3, |_| read_all(&mp));
            let native = per(3, |_| read_all(&p));
            let gbps = |d: Duration| size_mib as f64 / 1024.0 / d.as_secs_f64();
            let path = m.status()["data_path"]["attachments"]
                .as_str()
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string();
            rows.push(Row {
                what: format!("read {size_mib} MiB attachment, warm ({path})"),
                ours: format!("{:.2} GB/s", gbps(ours)),
                native: format!("{:.2} GB/s", gbps(native)),
                ratio: ratio(native, ours), // throughput: ours / native
                target: ">= 0.95x throughput",
            });
            drop(m);
            std::fs::remove_file(&p).unwrap();
        }
    }

    // 2. cp into attachments/ vs cp into a plain directory.
    if want("cp") {
        let store = b.join("cp");
        let plain = b.join("plain-cp");
        std::fs::create_dir_all(&plain).unwrap();
        let m = Mounted::new(&store, &b.join("mnt-cp"));
        for size_mib in if q { vec![16usize] } else { vec![128, 1024] } {
            let src = b.join(format!("src-{size_mib}.bin"));
            let mut f = std::fs::File::create(&src).unwrap();
            let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 17 % 253) as u8).collect();
            for k in 0..size_mib {
                let mut c = chunk.clone();
                c[..8].copy_from_slice(&(k as u64).to_le_bytes());
                f.write_all(&c).unwrap();
            }
            drop(f);
            read_all(&src);
            let cp = |dst: &Path, fsync: bool| {
                let t0 = Instant::now();
                assert!(
                    Command::new("cp")
                        .arg(&src)
                        .arg(dst)
                        .status()
                        .unwrap()
                        .success()
                );
                if fsync {
                    std::fs::File::open(dst).unwrap().sync_all().unwrap();
                }
                t0.elapsed()
            };
            let native = cp(&plain.join(format!("f{size_mib}")), false);
            let ours = cp(&m.dir.join(format!("attachments/f{size_mib}.bin")), false);
            // agentmount's close() returns once the bytes are durable: the like-for-like
            // native work is cp followed by an fsync of the copy.
            let durable = cp(&plain.join(format!("g{size_mib}")), true);
            // One SHA-256 stream over the same bytes: the floor for content addressing.
            let hash = {
                let t0 = Instant::now();
                let f = std::fs::File::open(&src).unwrap();
                agentmount::store::hash::hash_reader(f).unwrap();
                t0.elapsed()
            };
            rows.push(Row {
                what: format!("cp {size_mib} MiB into attachments/"),
                ours: ms(ours),
                native: ms(native),
                ratio: ratio(ours, native),
                target: "<= 1.2x time",
            });
            rows.push(Row {
                what: format!("cp {size_mib} MiB into attachments/ vs durable cp (cp + fsync)"),
                ours: ms(ours),
                native: ms(durable),
                ratio: ratio(ours, durable),
                target: "report",
            });
            // Where the daemon's time went (.status last_ingest); the rest of the wall time is
            // cp and the FUSE write path.
            let p = &m.status()["last_ingest"];
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            let floor = durable.max(hash);
            rows.push(Row {
                what: format!(
                    "cp {size_mib} MiB into attachments/ vs its floor (the larger of durable cp and one SHA-256 stream)"
                ),
                ours: ms(ours),
                native: ms(floor),
                ratio: ratio(ours, floor),
                target: "<= 1.25x",
            });
            rows.push(Row {
                what: format!("… where the {size_mib} MiB ingest's time went (daemon side)"),
                ours: format!(
                    "writes {:.0} ms, hash feed {:.0} ms, hash wait at close {:.0} ms, fsync {:.0} ms, lock {:.1} ms, manifest {:.1} ms, rename {:.1} ms, sidecar {:.1} ms; open to close {:.0} ms",
                    f("writes_ms"),
                    f("hash_feed_ms"),
                    f("hash_wait_ms"),
                    f("fsync_ms"),
                    f("lock_ms"),
                    f("manifest_ms"),
                    f("rename_ms"),
                    f("sidecar_ms"),
                    f("total_ms")
                ),
                native: "-".into(),
                ratio: "-".into(),
                target: "report",
            });
            rows.push(Row {
                what: format!("SHA-256 of {size_mib} MiB, one stream (the hashing floor)"),
                ours: ms(hash),
                native: "-".into(),
                ratio: format!(
                    "{:.0} MB/s",
                    (size_mib << 20) as f64 / 1e6 / hash.as_secs_f64()
                ),
                target: "report",
            });
            std::fs::remove_file(&src).unwrap();
        }
    }

    // 3-6. Sessions at 100 and 10,000.
    for n in sizes("sessions") {
        let store = b.join(format!("s{n}"));
        let ids = write_sessions(&store, n, |_, _| {});
        let file = store.join("session-manager/sessions.json");
        let m = Mounted::new(&store, &b.join(format!("mnt-s{n}")));
        let id = &ids[n / 2];
        let rec = m.dir.join(format!("sessions/{id}.json"));
        std::fs::read(&rec).unwrap();
        let iters = if n > 1000 { 200 } else { 2000 };
        let ours = per(iters, |_| std::fs::read(&rec).unwrap());
        let native = per(if n > 1000 { 10 } else { 200 }, |_| {
            let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            doc["sessions"][id.as_str()].clone()
        });
        rows.push(Row {
            what: format!("read one session at {n}"),
            ours: us(ours),
            native: us(native),
            ratio: format!("{:.0}x faster", native.as_secs_f64() / ours.as_secs_f64()),
            target: ">= 50x faster at 10,000",
        });
        let (_, mut v) = session(n / 2);
        let k = if n > 1000 { 10 } else { 50 };
        let ours = per(k, |i| {
            v["task"] = json!(format!("ours {i}"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&rec)
                .unwrap();
            f.write_all(&serde_json::to_vec(&v).unwrap()).unwrap();
            f.sync_all().unwrap();
        });
        let native = per(k, |i| {
            v["task"] = json!(format!("native {i}"));
            native_upsert(&file, id, &v)
        });
        rows.push(Row {
            what: format!("upsert one session at {n}"),
            ours: ms(ours),
            native: ms(native),
            ratio: ratio(ours, native),
            target: "<= 1.1x time",
        });
        if n >= 1000 {
            let plain = b.join(format!("plain-s{n}"));
            std::fs::create_dir_all(&plain).unwrap();
            for id in &ids {
                std::fs::write(plain.join(format!("{id}.json")), b"{}").unwrap();
            }
            let ls = |d: &Path| {
                let run = || {
                    Command::new("ls")
                        .arg("-l")
                        .arg(d)
                        .stdout(std::process::Stdio::null())
                        .status()
                        .unwrap()
                };
                run();
                per(3, |_| run())
            };
            let ours = ls(&m.dir.join("sessions"));
            let native = ls(&plain);
            rows.push(Row {
                what: format!("ls -l sessions/ at {n}"),
                ours: ms(ours),
                native: ms(native),
                ratio: ratio(ours, native),
                target: "<= 1.5x",
            });
            {
                let nx = Mounted::with(&store, &b.join(format!("mnt-nx{n}")), &["--no-xattr"]);
                let ours = ls(&nx.dir.join("sessions"));
                rows.push(Row {
                    what: format!("ls -l sessions/ at {n}, --no-xattr"),
                    ours: ms(ours),
                    native: ms(native),
                    ratio: ratio(ours, native),
                    target: "<= 1.5x",
                });
            }
            let pf = plain.join(format!("{id}.json"));
            std::fs::write(&pf, std::fs::read(&rec).unwrap()).unwrap();
            let ours = per(5000, |_| std::fs::metadata(&rec).unwrap());
            let native = per(5000, |_| std::fs::metadata(&pf).unwrap());
            rows.push(Row {
                what: format!("stat a record at {n}"),
                ours: us(ours),
                native: us(native),
                ratio: ratio(ours, native),
                target: "report",
            });
            let ours = per(2000, |_| std::fs::read(&rec).unwrap());
            let native = per(2000, |_| std::fs::read(&pf).unwrap());
            rows.push(Row {
                what: format!("open+read+close a record at {n}"),
                ours: us(ours),
                native: us(native),
                ratio: ratio(ours, native),
                target: "<= 5x",
            });
            // The floor of an open that checks the store: one FUSE round trip (an fstat of
            // .changes, whose attributes the kernel never caches, is exactly one), plus the
            // native open+read+close.
            if let Ok(f) = std::fs::File::open(m.dir.join(".changes")) {
                let trip = per(2000, |_| f.metadata().unwrap());
                rows.push(Row {
                    what: format!(
                        "  its floor at {n}: one FUSE round trip ({}) + native open+read+close",
                        us(trip)
                    ),
                    ours: us(ours),
                    native: us(trip + native),
                    ratio: ratio(ours, trip + native),
                    target: "report",
                });
            }
        }
        // Invalidation latency, end to end: another process's rename returns, then stat
        // through the mount (answered from the kernel's attribute cache, TTL 1 s) is polled
        // until it shows the new size. Without invalidation this takes up to the TTL.
        let (_, mut v) = session(n / 2);
        let (mut lat, mut watcher) = (Vec::new(), Vec::new());
        for i in 0..if n > 1000 { 20 } else { 50 } {
            let before = std::fs::metadata(&rec).unwrap().len();
            v["task"] = json!("x".repeat(1 + i % 2));
            let mut doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            doc["sessions"][id.as_str()] = v.clone();
            let tmp = file.with_extension("lat-tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
            lat.push(until_size_changes(&rec, before).0);
            // (The watcher's time partly overlaps the writer's rename, which frees the old
            // file's blocks.)
            watcher.push(watcher_us(&m));
        }
        lat.sort();
        watcher.sort();
        rows.push(Row {
            what: format!(
                "invalidation latency at {n}: external rename -> stat through the mount shows it"
            ),
            ours: format!(
                "median {} max {} after the rename returned; watcher median {} µs max {} µs from the event",
                us(lat[lat.len() / 2]),
                us(lat[lat.len() - 1]),
                watcher[watcher.len() / 2],
                watcher[watcher.len() - 1]
            ),
            native: "-".into(),
            ratio: "-".into(),
            target: "< 10 ms",
        });
        if n == 100 {
            // Cost of coherence: reads/s with and without an external writer renaming 100x/s.
            let reads = |secs: f64| {
                let t0 = Instant::now();
                let mut k = 0u64;
                while t0.elapsed().as_secs_f64() < secs {
                    std::fs::read(&rec).unwrap();
                    k += 1;
                }
                k as f64 / secs
            };
            let quiet = reads(2.0);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (s2, f2) = (stop.clone(), file.clone());
            let orig = std::fs::read(&file).unwrap();
            let w = std::thread::spawn(move || {
                let mut i = 0;
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let tmp = f2.with_extension(format!("w{i}"));
                    std::fs::write(&tmp, &orig).unwrap();
                    std::fs::rename(&tmp, &f2).unwrap();
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let busy = reads(2.0);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            w.join().unwrap();
            rows.push(Row {
                what: "reads/s while sessions.json is renamed 100x/s".into(),
                ours: format!("{busy:.0}/s"),
                native: format!("{quiet:.0}/s quiet"),
                ratio: format!("{:.2}x", busy / quiet),
                target: "report",
            });
        }
    }

    // 7. arbiter's SQLite database at 100 and 10,000 sessions.
    for n in sizes("sqlite") {
        sqlite_rows(b, n, &mut rows);
    }

    // 7a. Scratch files.
    if want("scratch") {
        scratch_rows(b, &mut rows);
    }

    // 7b. The journal's cost: the same build with and without it.
    for n in sizes("journal") {
        journal_rows(b, n, &mut rows);
    }

    // 8-9. gc over 100,000 attachments and 10,000 records; daemon RSS.
    if want("gc") {
        let (na, ns) = if q {
            (5_000usize, 1_000usize)
        } else {
            (100_000, 10_000)
        };
        let store = b.join("gc");
        let t_build = Instant::now();
        let mut intents = Vec::with_capacity(na);
        let mut hexes = Vec::with_capacity(na);
        let old = chrono::Utc::now().timestamp_millis() - 7_200_000;
        for i in 0..na {
            let bytes = format!("attachment {i}").into_bytes();
            let h = hex(&bytes);
            let p = store.join("attachments/sha256").join(&h[..2]).join(&h);
            if i < 256 || !p.parent().unwrap().exists() {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            }
            std::fs::write(&p, &bytes).unwrap();
            std::fs::write(p.with_extension("json"), serde_json::to_vec_pretty(&json!({"id": h, "media_type": {"kind": "file", "type": "text/plain"}, "byte_len": bytes.len(), "label": format!("a{i}.txt")})).unwrap()).unwrap();
            // One in ten is an old uncommitted orphan; the rest are referenced or committed.
            let committed = if i % 10 == 0 || i < ns {
                Value::Null
            } else {
                json!(old + 1)
            };
            intents.push(json!({"attachment_id": h, "session_id": null, "canonical_uri": format!("sha256:{h}"), "intent_at_epoch_ms": old, "committed_at_epoch_ms": committed}));
            hexes.push(h);
        }
        std::fs::write(
            store.join("attachments/manifest.json"),
            serde_json::to_vec_pretty(&json!({"intents": intents})).unwrap(),
        )
        .unwrap();
        let h2 = hexes.clone();
        write_sessions(&store, ns, move |i, v| {
            if i % 10 != 0 {
                v["task"] = json!(format!("see sha256:{}", h2[i]));
            }
        });
        let build = t_build.elapsed();
        let m = Mounted::new(&store, &b.join("mnt-gc"));
        let pid = m.pid();
        let t0 = Instant::now();
        let n_ls = std::fs::read_dir(m.dir.join("attachments"))
            .unwrap()
            .count();
        let ls_time = t0.elapsed();
        std::fs::read_dir(m.dir.join("sessions")).unwrap().count();
        let t0 = Instant::now();
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir.join(".gc"))
            .unwrap()
            .write_all(b"run")
            .unwrap();
        let gc = t0.elapsed();
        let report: Value =
            serde_json::from_slice(&std::fs::read(m.dir.join(".gc")).unwrap()).unwrap();
        rows.push(Row {
            what: format!(".gc over {na} attachments, {ns} records"),
            ours: format!("{} (reclaimed {})", ms(gc), report["reclaimed"]),
            native: "-".into(),
            ratio: "-".into(),
            target: "<= 10 s",
        });
        rows.push(Row {
            what: format!("readdir attachments/ ({n_ls} names)"),
            ours: ms(ls_time),
            native: "-".into(),
            ratio: "-".into(),
            target: "report",
        });
        let peak = rss_kib(pid, "VmHWM:");
        rows.push(Row {
            what: format!("daemon peak RSS, {ns} sessions + {na} attachments"),
            ours: format!("{:.1} MiB", peak as f64 / 1024.0),
            native: "-".into(),
            ratio: "-".into(),
            target: "<= 150 MiB",
        });
        eprintln!("(built the gc store in {build:?})");
    }

    if want("postgres") {
        postgres_rows::rows(b, &mut rows);
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "agentmount {} benchmarks — {} cores, {cpu}, kernel {}{}",
        env!("CARGO_PKG_VERSION"),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim(),
        if q {
            " (BENCH_QUICK: reduced sizes)"
        } else {
            ""
        }
    );
    println!();
    println!("| what | agentmount | native | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.native, r.ratio, r.target
        );
    }
}
