//! Many hosts, one store (DESIGN §5.2): two daemons on two mountpoints stand for two hosts
//! sharing one real PostgreSQL server. Every case drives the mounts with real file
//! operations; the database is also written directly, as any SQL program would.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{Server, client, fixture_db, store_with_fixture};
use common::*;
use serde_json::{Value, json};

fn goal(id: &str, title: &str) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({"id": id, "title": title, "description": "d",
        "status": "pending", "sessions": []}))
    .unwrap()
}

fn title(bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap();
    v["title"].as_str().unwrap_or_default().to_string()
}

fn new_id(n: u64) -> String {
    format!("c0000000-0000-4000-8000-{n:012x}")
}

fn session(id: &str, task: &str) -> Vec<u8> {
    serde_json::to_vec_pretty(
        &json!({"id": id, "tmux_name": "t", "cwd": "/", "task": task,
        "state": "active", "created_at": "2026-11-20T09:12:03Z"}),
    )
    .unwrap()
}

fn task(bytes: &[u8]) -> String {
    let v: Value = serde_json::from_slice(bytes).unwrap();
    v["task"].as_str().unwrap_or_default().to_string()
}

fn stored_task(url: &str, id: &str) -> Option<String> {
    client(url)
        .query_opt(
            "SELECT body::json->>'task' FROM agentmount_records WHERE collection = 'sessions' AND id = $1",
            &[&id],
        )
        .unwrap()
        .and_then(|r| r.get(0))
}

/// A write acknowledged on host A is what the next open on host B reads (B checks the
/// record's version at every open), and B's cached attributes follow within the TTL
/// (NOTIFY → invalidation).
#[test]
fn a_write_on_one_host_is_read_by_an_open_on_the_other() {
    let url = fixture_db();
    let store = PathBuf::from(&url);
    let (a, b) = (Mount::new(&store, &[]), Mount::new(&store, &[]));
    let g = "goals/g-1a2b3c4d.json";
    let mut to_stat = Vec::new();
    for round in 0..30 {
        let _ = std::fs::metadata(b.p(g)).unwrap();
        let t = format!("round {round} {}", "x".repeat(round));
        write_close(&a.p(g), &goal("g-1a2b3c4d", &t)).unwrap();
        let t0 = Instant::now();
        assert_eq!(
            title(&std::fs::read(b.p(g)).unwrap()),
            t,
            "an open on B after A's write returned reads the new bytes"
        );
        let want = std::fs::metadata(a.p(g)).unwrap().len();
        let seen = wait_until(Duration::from_millis(1000), || {
            std::fs::metadata(b.p(g))
                .map(|m| m.len() == want)
                .unwrap_or(false)
        });
        assert!(seen.is_some(), "B's stat shows the new size within the TTL");
        to_stat.push(t0.elapsed());
    }
    // A record made on A is found on B; one removed on B is gone on A.
    let fresh = "goals/g-made-on-a.json";
    write_close(&a.p(fresh), &goal("g-made-on-a", "new")).unwrap();
    assert_eq!(title(&std::fs::read(b.p(fresh)).unwrap()), "new");
    std::fs::remove_file(b.p(fresh)).unwrap();
    let gone = wait_until(Duration::from_millis(1000), || {
        std::fs::metadata(a.p(fresh)).is_err()
    });
    assert!(gone.is_some(), "a removal on B reaches A");
    assert!(!sh_ok("ls goals", a.path()).contains("g-made-on-a"));
    to_stat.sort();
    let sb = json(&b.p(".status"));
    assert!(sb["listener"]["connected"].as_bool().unwrap());
    println!(
        "figures: write-on-A to stat-on-B median={:?} max={:?}; B notifications={}",
        to_stat[to_stat.len() / 2],
        to_stat.last().unwrap(),
        sb["cache"]["notifications"]
    );
}

/// Writers on both hosts at once: nothing is lost (records and attachments), and two
/// writers on one record leave one whole version of it.
#[test]
fn writers_on_both_hosts_lose_nothing() {
    let url = fixture_db();
    let store = PathBuf::from(&url);
    let (a, b) = (Mount::new(&store, &[]), Mount::new(&store, &[]));
    let shared = S_ACTIVE;
    let rounds = 30u64;
    let run = |m: PathBuf, host: u64| {
        std::thread::spawn(move || {
            let mut blobs = Vec::new();
            for r in 0..rounds {
                let id = new_id((host << 32) | r);
                write_close(
                    &m.join(format!("sessions/{id}.json")),
                    &session(&id, &format!("h{host} r{r}")),
                )
                .unwrap();
                write_close(
                    &m.join(format!("sessions/{shared}.json")),
                    &session(shared, &format!("shared h{host} r{r}")),
                )
                .unwrap();
                if r % 5 == 0 {
                    let bytes = format!("attachment from host {host} round {r}\n").repeat(100);
                    let label = format!("h{host}-r{r}.txt");
                    write_close(&m.join(format!("attachments/{label}")), bytes.as_bytes()).unwrap();
                    blobs.push((label, bytes));
                }
            }
            blobs
        })
    };
    let (ta, tb) = (
        run(a.path().to_path_buf(), 1),
        run(b.path().to_path_buf(), 2),
    );
    let blobs: Vec<_> = ta
        .join()
        .unwrap()
        .into_iter()
        .chain(tb.join().unwrap())
        .collect();
    for host in [1u64, 2] {
        for r in 0..rounds {
            let id = new_id((host << 32) | r);
            let want = format!("h{host} r{r}");
            assert_eq!(stored_task(&url, &id).as_deref(), Some(want.as_str()));
            for m in [&a, &b] {
                assert_eq!(
                    task(&std::fs::read(m.p(&format!("sessions/{id}.json"))).unwrap()),
                    want
                );
            }
        }
    }
    let s = stored_task(&url, shared).unwrap();
    let last = [
        format!("shared h1 r{}", rounds - 1),
        format!("shared h2 r{}", rounds - 1),
    ];
    assert!(
        last.contains(&s),
        "the shared record is one whole last version: {s:?}"
    );
    for m in [&a, &b] {
        assert_eq!(
            task(&std::fs::read(m.p(&format!("sessions/{shared}.json"))).unwrap()),
            s
        );
        for (label, bytes) in &blobs {
            let got = wait_until(Duration::from_millis(1000), || {
                std::fs::read(m.p(&format!("attachments/{label}")))
                    .ok()
                    .as_deref()
                    == Some(bytes.as_bytes())
            });
            assert!(got.is_some(), "attachment {label} on both hosts");
        }
    }
    let o = Command::new(BIN)
        .args(["fsck", "--store", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// kill -9 of one host's daemon while it writes: every write it acknowledged is read on the
/// other host.
#[test]
fn kill_9_on_one_host_loses_nothing_the_other_host_reads() {
    let url = fixture_db();
    let store = PathBuf::from(&url);
    let b = Mount::new(&store, &[]);
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for cycle in 0..3u64 {
        let a = Mount::new(&store, &[]);
        let pid = json(&a.p(".status"))["pid"].as_i64().unwrap() as i32;
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (p, stop, acked) = (a.path().to_path_buf(), stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let id = new_id((cycle << 24) | (t << 20) | i);
                        let mk = format!("c{cycle} t{t} i{i}");
                        match write_close(
                            &p.join(format!("sessions/{id}.json")),
                            &session(&id, &mk),
                        ) {
                            Ok(()) => acked.lock().unwrap().push((id, mk)),
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150 + cycle * 70));
        unsafe { libc::kill(pid, libc::SIGKILL) };
        stop.store(true, Ordering::Relaxed);
        let o = Command::new(BIN)
            .args(["unmount", "--force"])
            .arg(a.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for t in threads {
            t.join().unwrap();
        }
    }
    let acked = acked.lock().unwrap();
    assert!(acked.len() > 10, "writers made progress");
    let lost: Vec<_> = acked
        .iter()
        .filter(|(id, mk)| {
            std::fs::read(b.p(&format!("sessions/{id}.json")))
                .map(|bytes| task(&bytes) != *mk)
                .unwrap_or(true)
        })
        .collect();
    println!("figures: kill-9 acked={} lost={}", acked.len(), lost.len());
    assert!(lost.is_empty(), "lost on the other host: {lost:?}");
}

/// The server restarted, and the daemon's connections terminated, while both hosts work:
/// no partial change, writes fail clearly while it is away (reads keep the last good
/// view), the daemon reconnects by itself, later writes work, and what changed while it
/// was away is seen (no stale view survives).
#[test]
fn server_restart_and_terminated_connections_heal_by_themselves() {
    let pg = Server::private("restart");
    let url = pg.new_db();
    store_with_fixture(&url);
    let store = PathBuf::from(&url);
    let (a, b) = (Mount::new(&store, &[]), Mount::new(&store, &[]));
    let g = "goals/g-1a2b3c4d.json";
    let before = std::fs::read(a.p(g)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failed: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
    let writer = {
        let (p, stop, acked, failed) = (
            a.path().to_path_buf(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
        );
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = new_id(0x5000 + i);
                let mk = format!("w{i}");
                match write_close(&p.join(format!("sessions/{id}.json")), &session(&id, &mk)) {
                    Ok(()) => acked.lock().unwrap().push((id, mk)),
                    Err(e) => *failed.lock().unwrap().entry(e).or_default() += 1,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // 1. Every connection of the daemons terminated by the server's administrator.
    client(&url)
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'agentmount'",
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // 2. The server goes away: reads keep the last good view, writes fail with EIO.
    pg.stop();
    assert_eq!(std::fs::read(a.p(g)).unwrap(), before, "the last good view");
    assert_eq!(
        write_close(&a.p(g), &goal("g-1a2b3c4d", "while away")),
        Err(libc::EIO),
        "a write while the server is away"
    );
    let st = json(&a.p(".status"));
    assert_eq!(st["server"]["reachable"], json!(false), "{st}");
    std::thread::sleep(Duration::from_millis(300));
    pg.start();
    // A change made while the daemons were cut off, by another SQL program.
    let mut c = client(&url);
    c.execute(
        "UPDATE agentmount_records SET body = $1 WHERE collection = 'goals' AND id = 'g-1a2b3c4d'",
        &[&String::from_utf8(goal("g-1a2b3c4d", "changed while away")).unwrap()],
    )
    .unwrap();
    // Both hosts see it, by themselves, and writes work again.
    for m in [&a, &b] {
        let seen = wait_until(Duration::from_secs(10), || {
            std::fs::read(m.p(g))
                .map(|b| title(&b) == "changed while away")
                .unwrap_or(false)
        });
        assert!(seen.is_some(), "no stale view survives the outage");
        let healed = wait_until(Duration::from_secs(10), || {
            json(&m.p(".status"))["listener"]["connected"] == json!(true)
        });
        assert!(healed.is_some(), "the listener reconnected");
    }
    let ok = wait_until(Duration::from_secs(10), || {
        write_close(&a.p(g), &goal("g-1a2b3c4d", "after the outage")).is_ok()
    });
    assert!(ok.is_some(), "writes work again");
    assert_eq!(title(&std::fs::read(b.p(g)).unwrap()), "after the outage");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // Every acknowledged write is there; every failure was a clear errno and left nothing.
    let acked = acked.lock().unwrap();
    for (id, mk) in acked.iter() {
        assert_eq!(
            stored_task(&url, id).as_deref(),
            Some(mk.as_str()),
            "acked {id}"
        );
    }
    let failed = failed.lock().unwrap();
    for e in failed.keys() {
        assert!([libc::EIO, libc::EAGAIN].contains(e), "errno {e}");
    }
    let st = json(&a.p(".status"));
    println!(
        "figures: restart acked={} failed={:?} reconnects={} resyncs={}",
        acked.len(),
        *failed,
        st["cache"]["reconnects"],
        st["cache"]["resyncs"]
    );
    drop((a, b));
}

fn random_file(path: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

/// An attachment ingested on A reads back byte-identical on B, first fetched from the
/// server (hash checked), then from B's local cache.
#[test]
fn an_attachment_ingested_on_one_host_reads_back_on_the_other() {
    let url = fixture_db();
    let store = PathBuf::from(&url);
    let (a, b) = (Mount::new(&store, &[]), Mount::new(&store, &[]));
    let src = tempfile::NamedTempFile::new().unwrap();
    random_file(src.path(), 5 << 20 | 12345, 7);
    sh_ok(
        &format!("cp {} attachments/big.bin", src.path().display()),
        a.path(),
    );
    let hex = std::fs::read_link(a.p("attachments/big.bin"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned());
    let sa = json(&a.p(".status"));
    assert_eq!(
        sa["cache"]["attachments"]["ingests_streamed"],
        json!(1),
        "5 MiB were streamed in while they arrived: {sa}"
    );
    let listed = sh_ok("ls attachments", b.path());
    assert!(listed.contains("big.bin"), "{listed}");
    for _ in 0..2 {
        let o = sh(
            &format!("cmp {} attachments/big.bin", src.path().display()),
            b.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
    let st = json(&b.p(".status"));
    let cache = &st["cache"]["attachments"];
    assert_eq!(cache["fetches"], json!(1), "{cache}");
    // The same bytes again, streamed in from B: nothing new is stored, nothing is left over.
    sh_ok(
        &format!("cp {} attachments/again.bin", src.path().display()),
        b.path(),
    );
    // (One label a blob: the newest name takes it.)
    assert_eq!(
        std::fs::read_link(b.p("attachments/again.bin"))
            .ok()
            .map(|t| t.to_string_lossy().into_owned()),
        hex
    );
    let o = Command::new(BIN)
        .args(["fsck", "--store", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    println!("figures: attachment {hex:?} B cache {cache}");
    // A cached copy a crash cut short (the cache is not fsynced) is found out by its hash
    // at the first use after a restart, and fetched again.
    let state = tempfile::tempdir().unwrap();
    let args = ["--state-dir", state.path().to_str().unwrap()];
    let c = Mount::new(&store, &args);
    let want = std::fs::read(src.path()).unwrap();
    assert!(std::fs::read(c.p("attachments/again.bin")).unwrap() == want);
    drop(c);
    let cached = state.path().join("blobs").join(hex.as_deref().unwrap());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&cached),
            0o600,
            "cached bytes are the mounting user's alone"
        );
        assert_eq!(mode(&state.path().join("blobs")), 0o700);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    let c = Mount::new(&store, &args);
    assert!(
        std::fs::read(c.p("attachments/again.bin")).unwrap() == want,
        "the cut copy was not served"
    );
    assert_eq!(
        json(&c.p(".status"))["cache"]["attachments"]["fetches"],
        json!(1)
    );
}

/// `agentmount copy` of the sample store into Postgres and back: the same records byte for
/// byte, the same attachments and sidecars; copying again changes nothing.
#[test]
fn copy_into_postgres_and_back_yields_the_same_store() {
    let url = Server::get().new_db();
    store_with_fixture(&url);
    let before = client(&url)
        .query_one("SELECT max(version) FROM agentmount_records", &[])
        .unwrap()
        .get::<_, Option<i64>>(0);
    store_with_fixture(&url);
    let after = client(&url)
        .query_one("SELECT max(version) FROM agentmount_records", &[])
        .unwrap()
        .get::<_, Option<i64>>(0);
    assert_eq!(before, after, "a second copy changes nothing");
    let back = tempfile::tempdir().unwrap();
    let out = back.path().join("store");
    let o = Command::new(BIN)
        .args(["copy", &url])
        .arg(&out)
        .env("XDG_STATE_HOME", common::pg::state_home())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Each blob's intent state came through (so gc keeps what it kept before).
    let intents = |p: &Path| {
        let mut v: Vec<(String, bool)> = json(&p.join("attachments/manifest.json"))["intents"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r["attachment_id"].as_str().unwrap_or("").to_string(),
                            !r["committed_at_epoch_ms"].is_null(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let want = intents(Path::new(FIXTURE));
    assert_eq!(want.len(), 2, "the fixture's manifest has two intents");
    assert_eq!(intents(&out), want);
    let orig = fixture_copy();
    let (m1, m2) = (
        Mount::new(orig.path(), &["--no-journal"]),
        Mount::new(&out, &["--no-journal"]),
    );
    for dir in ["sessions", "goals", "conversations", "attachments"] {
        let t1 = tree(&m1.p(dir));
        let t2 = tree(&m2.p(dir));
        assert_eq!(t1.len(), t2.len(), "{dir}");
        for (x, y) in t1.iter().zip(&t2) {
            assert_eq!(x.0, y.0);
            assert!(x.1 == y.1, "{dir}/{} differs", x.0.display());
        }
    }
}

/// `.gc` runs once across all hosts (another host's run: EBUSY), and never reclaims bytes
/// a record on any host refers to.
#[test]
fn gc_runs_once_across_hosts_and_keeps_what_any_host_refers_to() {
    let url = fixture_db();
    let store = PathBuf::from(&url);
    let (a, b) = (Mount::new(&store, &[]), Mount::new(&store, &[]));
    write_close(&b.p("attachments/orphan.txt"), b"nobody refers to me\n").unwrap();
    write_close(&a.p("attachments/kept.txt"), b"a goal refers to me\n").unwrap();
    let kept = std::fs::read_link(a.p("attachments/kept.txt"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let orphan = std::fs::read_link(b.p("attachments/orphan.txt"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut g: Value = serde_json::from_slice(&goal("g-refers", "t")).unwrap();
    g["evidence"] = json!(format!("sha256:{kept}"));
    write_close(
        &b.p("goals/g-refers.json"),
        &serde_json::to_vec(&g).unwrap(),
    )
    .unwrap();
    // Another host is collecting: this one gets EBUSY.
    let mut holder = client(&url);
    let mut tx = holder.transaction().unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&agentmount::backend::postgres::schema::GC_LOCK],
    )
    .unwrap();
    assert_eq!(write_close(&a.p(".gc"), b"grace=0"), Err(libc::EBUSY));
    tx.rollback().unwrap();
    write_close(&a.p(".gc"), b"grace=0").unwrap();
    let report = json(&a.p(".gc"));
    let ids: Vec<String> = report["reclaimed_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(ids.contains(&orphan), "{report}");
    assert!(!ids.contains(&kept), "{report}");
    for m in [&a, &b] {
        let gone = wait_until(Duration::from_millis(1500), || {
            std::fs::metadata(m.p(&format!("attachments/{orphan}"))).is_err()
        });
        assert!(gone.is_some(), "the orphan is gone on every host");
        assert_eq!(
            std::fs::read(m.p(&format!("attachments/{kept}"))).unwrap(),
            b"a goal refers to me\n"
        );
    }
}

/// The password reaches the server from `PGPASSWORD` or `~/.pgpass` (or the URL, with a
/// warning), and never appears in `.status`, `.errors`, the log or `/proc/mounts`.
#[test]
fn passwords_come_from_pgpassword_or_pgpass_and_are_never_shown() {
    use common::pg::PASSWORD;
    let url = Server::get().new_db_for_pwuser();
    let store = PathBuf::from(&url);
    // No password anywhere: refused, saying why.
    let mp = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    // A mount with no PGPASSWORD, HOME (so ~/.pgpass) the test's own.
    let mount = || {
        Command::new(BIN)
            .args(["mount", "--store", &url])
            .arg(mp.path())
            .env_remove("PGPASSWORD")
            .env("HOME", home.path())
            .env("XDG_STATE_HOME", common::pg::state_home())
            .output()
            .unwrap()
    };
    let o = mount();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("password"), "{err}");
    // PGPASSWORD.
    let m = Mount::with_env(&store, &[], &[("PGPASSWORD", Some(PASSWORD))]);
    write_close(&m.p("goals/g-pw.json"), &goal("g-pw", "via PGPASSWORD")).unwrap();
    let _ = write_close(&m.p("goals/g-pw.json"), b"{ not json");
    let shown = [
        std::fs::read_to_string(m.p(".status")).unwrap(),
        std::fs::read_to_string(m.p(".errors")).unwrap(),
        std::fs::read_to_string("/proc/mounts").unwrap(),
    ];
    for s in &shown {
        assert!(!s.contains(PASSWORD), "the password shows: {s}");
    }
    drop(m);
    // ~/.pgpass, as libpq reads it: ignored while others may read it, used once 0600.
    let pgpass = home.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!("# host:port:db:user:password\nother\\:host:*:*:*:wrong\nlocalhost:5432:*:pwuser:{PASSWORD}\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = mount();
    assert!(
        !o.status.success(),
        "a world-readable ~/.pgpass is not used"
    );
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = Mount::with_env(
        &store,
        &[],
        &[
            ("PGPASSWORD", None),
            ("HOME", Some(home.path().to_str().unwrap())),
        ],
    );
    assert_eq!(
        title(&std::fs::read(m.p("goals/g-pw.json")).unwrap()),
        "via PGPASSWORD"
    );
    drop(m);
    // In the URL: works, with a warning; shown nowhere.
    let with_pw = url.replace("pwuser@", &format!("pwuser:{PASSWORD}@"));
    let mp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["mount", "--store", &with_pw])
        .arg(mp.path())
        .env_remove("PGPASSWORD")
        .env("XDG_STATE_HOME", common::pg::state_home())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("visible to every user"));
    let status = std::fs::read_to_string(mp.path().join(".status")).unwrap();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let _ = Command::new(BIN).arg("unmount").arg(mp.path()).output();
    assert!(!status.contains(PASSWORD) && !mounts.contains(PASSWORD));
    // Nor in any log of this test binary's daemons.
    let logs = Command::new("grep")
        .args(["-rl", PASSWORD])
        .arg(common::pg::state_home())
        .output()
        .unwrap();
    assert!(
        logs.stdout.is_empty(),
        "the password is in {}",
        String::from_utf8_lossy(&logs.stdout)
    );
}

/// `sslmode` as libpq means it, against a server that takes TCP clients only over TLS (a
/// certificate for `localhost` from a test CA): require encrypts, verify-ca checks the
/// chain, verify-full also the name; disable is turned away by the server; a wrong CA or
/// name is refused with the reason.
#[test]
fn sslmode_is_honoured_over_tcp() {
    let pg = Server::private_tls("tls");
    let unix = pg.new_db();
    store_with_fixture(&unix);
    let db = unix["postgresql://postgres@/".len()..]
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let port = pg.port.unwrap();
    let certs = pg.dir.join("certs");
    let other = tempfile::tempdir().unwrap();
    common::pg::make_certs(other.path(), "other");
    let ca = certs.join("ca.crt");
    let url = |host: &str, q: &str| format!("postgresql://postgres@{host}:{port}/{db}?{q}");
    let fsck = |u: &str| {
        let o = Command::new(BIN)
            .args(["fsck", "--store", u])
            .env("HOME", other.path())
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let ok = |u: String| {
        let (good, out) = fsck(&u);
        assert!(good, "{u}: {out}");
    };
    let refused = |u: String, why: &str| {
        let (good, out) = fsck(&u);
        assert!(!good, "{u} was accepted");
        assert!(out.contains(why), "{u}: {out}");
    };
    ok(url("localhost", "sslmode=require"));
    ok(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ));
    ok(url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ));
    refused(
        url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        ),
        "certificate",
    );
    refused(
        url(
            "localhost",
            &format!(
                "sslmode=verify-ca&sslrootcert={}",
                other.path().join("other.crt").display()
            ),
        ),
        "certificate",
    );
    refused(url("localhost", "sslmode=verify-full"), "sslrootcert");
    refused(url("localhost", "sslmode=disable"), "no encryption");
    refused(url("localhost", "sslmode=sometimes"), "sslmode");
    // A real mount over verified TLS: reads, writes, and the server says it is encrypted.
    let store = PathBuf::from(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ));
    let m = Mount::new(&store, &[]);
    write_close(&m.p("goals/g-tls.json"), &goal("g-tls", "over TLS")).unwrap();
    assert_eq!(
        title(&std::fs::read(m.p("goals/g-tls.json")).unwrap()),
        "over TLS"
    );
    let st = json(&m.p(".status"));
    assert!(
        st["store"]["tls"]
            .as_str()
            .unwrap_or("")
            .starts_with("verify-full"),
        "{st}"
    );
    let encrypted: i64 = client(&unix)
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE application_name = 'agentmount' AND ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        encrypted >= 2,
        "the daemon's connections are encrypted: {encrypted}"
    );
    drop(m);
}

/// The daemon's connections terminated while a large attachment streams in: the copy
/// either fails with EIO or lands whole (the stream's transaction is rolled back and the
/// bytes are stored from the local copy at close); nothing partial is ever left, and the
/// next ingest works.
#[test]
fn a_stream_cut_mid_ingest_leaves_nothing_partial() {
    let url = fixture_db();
    let db = url["postgresql://postgres@/".len()..]
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let store = PathBuf::from(&url);
    let m = Mount::new(&store, &[]);
    let src = tempfile::NamedTempFile::new().unwrap();
    random_file(src.path(), 48 << 20, 11);
    let (mp, sp) = (m.path().to_path_buf(), src.path().to_path_buf());
    let cp = std::thread::spawn(move || {
        Command::new("cp")
            .arg(&sp)
            .arg(mp.join("attachments/cut.bin"))
            .output()
            .unwrap()
    });
    // Cut every connection of the daemon to this database while the bytes flow.
    let mut admin = client(&url);
    let t0 = Instant::now();
    let mut cut = 0;
    while t0.elapsed() < Duration::from_secs(10) && cut == 0 {
        cut = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'agentmount'
                   AND query LIKE 'COPY%'",
                &[&db],
            )
            .unwrap()
            .get::<_, i64>(0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = cp.join().unwrap();
    let landed = out.status.success();
    if landed {
        let o = sh(
            &format!("cmp {} attachments/cut.bin", src.path().display()),
            m.path(),
        );
        assert!(o.status.success(), "what landed is whole");
    } else {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let o = Command::new(BIN)
        .args(["fsck", "--store", &url])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "no partial chunks: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The next ingest works.
    write_close(&m.p("attachments/after.txt"), b"after the cut\n").unwrap();
    assert_eq!(
        std::fs::read(m.p("attachments/after.txt")).unwrap(),
        b"after the cut\n"
    );
    println!("figures: stream cut: terminated={cut} copy landed={landed}");
}

/// A server that accepts the connection and then never answers (a stuck proxy): the mount
/// fails within the connect deadline, saying so, instead of hanging.
#[test]
fn a_peer_that_never_answers_fails_the_mount_in_seconds() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts, reads nothing, answers nothing, keeps the sockets open.
    let held = std::thread::spawn(move || {
        let mut socks = Vec::new();
        for s in listener.incoming().take(4) {
            socks.push(s);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let url = format!("postgresql://u@127.0.0.1:{port}/db?sslmode=disable&connect_timeout=1");
    let mp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = Command::new(BIN)
        .args(["mount", "--store", &url])
        .arg(mp.path())
        .env("XDG_STATE_HOME", common::pg::state_home())
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no answer within"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(held);
}
