//! What changed, when, by whom: per-record times, `.changes`, `agentmount watch` and
//! `.history`, on real mounts of both backends, with another process writing the store.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WRITER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/conformance_writer.py"
);

fn changes(m: &Mount) -> Vec<Value> {
    std::fs::read_to_string(m.p(".changes"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mtime(p: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

fn sid(n: u64) -> String {
    format!("d0000000-0000-4000-8000-{n:012x}")
}

/// A store of 100 sessions.
fn hundred() -> tempfile::TempDir {
    let st = fixture_copy();
    let mut doc = json(&st.path().join("session-manager/sessions.json"));
    for n in 0..97 {
        let id = sid(n);
        doc["sessions"][&id] = json!({"id": id, "tmux_name": "t", "cwd": "/", "task": format!("task {n}"),
            "state": "active", "created_at": "2026-11-20T09:12:03Z"});
    }
    std::fs::write(
        st.path().join("session-manager/sessions.json"),
        serde_json::to_vec_pretty(&doc).unwrap(),
    )
    .unwrap();
    st
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        agentmount::store::attachments::to_hex(&sha2::Sha256::digest(b))
    )
}

#[test]
fn an_external_change_moves_only_that_records_time_and_is_fed_and_watched() {
    let st = hundred();
    let m = Mount::new(st.path(), &[]);
    let before: HashMap<String, (i64, i64)> = std::fs::read_dir(m.p("sessions"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                mtime(&e.path()),
            )
        })
        .collect();
    assert_eq!(before.len(), 100);
    // `agentmount watch` follows the feed from now on.
    let mut watch = Command::new(BIN)
        .arg("watch")
        .arg(m.path())
        .args(["--collection", "sessions"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send((Instant::now(), line.unwrap())).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let target = sid(42);
    let o = Command::new("python3")
        .args([WRITER, "files"])
        .arg(st.path())
        .args(["set", &target, "changed outside"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let written = Instant::now();
    let (at, line) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("watch printed the change");
    let lag = at.saturating_duration_since(written);
    println!("figures: watch printed an external change {lag:?} after the writer returned");
    assert!(lag < Duration::from_millis(100), "watch lag {lag:?}");
    assert!(
        line.contains(&format!("sessions/{target} update")) && line.contains("external"),
        "{line}"
    );
    // Only that record's time moved.
    std::thread::sleep(Duration::from_millis(50));
    let mut moved = Vec::new();
    for (name, t) in &before {
        if mtime(&m.p(&format!("sessions/{name}"))) != *t {
            moved.push(name.clone());
        }
    }
    assert_eq!(moved, vec![format!("{target}.json")]);
    let ls = sh_ok("ls -t sessions | head -1", m.path());
    assert_eq!(ls.trim(), format!("{target}.json"), "ls -lt lists it first");
    let feed: Vec<Value> = changes(&m)
        .into_iter()
        .filter(|v| v["collection"] == "sessions")
        .collect();
    assert_eq!(feed.len(), 1, "{feed:?}");
    assert_eq!(feed[0]["op"], "update");
    assert_eq!(feed[0]["source"], "external");
    assert_eq!(
        feed[0]["after"],
        sha(&std::fs::read(m.p(&format!("sessions/{target}.json"))).unwrap())
    );
    // SIGINT stops watch cleanly.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let status = watch.wait().unwrap();
    assert!(status.success(), "watch exits 0 on SIGINT: {status:?}");
}

#[test]
fn writes_deletes_renames_are_fed_with_the_writers_pid_and_history_restores() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let goal = m.p("goals/g-1a2b3c4d.json");
    let original = std::fs::read(&goal).unwrap();
    // A write by a child process: its pid in the line.
    let child = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import json,os; p='{}'; g=json.load(open(p)); g['progress']=42; open(p,'w').write(json.dumps(g)); print(os.getpid())",
            goal.display()
        ))
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "{}",
        String::from_utf8_lossy(&child.stderr)
    );
    let pid: u64 = String::from_utf8_lossy(&child.stdout)
        .trim()
        .parse()
        .unwrap();
    let feed = changes(&m);
    let w = feed.last().unwrap();
    assert_eq!(
        (w["op"].as_str(), w["source"].as_str()),
        (Some("update"), Some("mount"))
    );
    assert_eq!(w["pid"].as_u64(), Some(pid), "{w}");
    assert_eq!(w["before"], sha(&original));
    assert_eq!(w["after"], sha(&std::fs::read(&goal).unwrap()));
    // The earlier version is in .history, byte-exact, and cp restores it.
    let versions = sh_ok("ls .history/goals/g-1a2b3c4d", m.path());
    let v: Vec<&str> = versions.lines().collect();
    assert_eq!(v.len(), 1);
    assert_eq!(
        std::fs::read(m.p(&format!(".history/goals/g-1a2b3c4d/{}", v[0]))).unwrap(),
        original
    );
    sh_ok(
        &format!(
            "cp .history/goals/g-1a2b3c4d/{} goals/g-1a2b3c4d.json",
            v[0]
        ),
        m.path(),
    );
    let now: Value = serde_json::from_slice(&std::fs::read(&goal).unwrap()).unwrap();
    assert_eq!(now["progress"], 0, "restored");
    // Rename and delete lines; a deleted record keeps its last version.
    sh_ok("mv goals/g-1a2b3c4d.json goals/g-000000aa.json", m.path());
    sh_ok("rm goals/g-000000aa.json", m.path());
    let feed = changes(&m);
    let n = feed.len();
    assert_eq!(feed[n - 2]["op"], "rename");
    assert_eq!(feed[n - 2]["to"], "g-000000aa");
    assert_eq!(feed[n - 1]["op"], "delete");
    assert_eq!(feed[n - 1]["after"], Value::Null);
    let kept = sh_ok("ls .history/goals/g-000000aa", m.path());
    assert_eq!(kept.lines().count(), 1, "the deleted record's last version");
    // Names in .history sort by time.
    let seqs: Vec<u64> = feed.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // An attachment ingested, relabelled, reclaimed: in the feed too.
    std::fs::write(m.p("attachments/new.txt"), b"fresh bytes").unwrap();
    sh_ok("mv attachments/new.txt attachments/renamed.txt", m.path());
    sh_ok("rm attachments/renamed.txt && echo grace=0 > .gc", m.path());
    let att: Vec<Value> = changes(&m)
        .into_iter()
        .filter(|v| v["collection"] == "attachments")
        .collect();
    let ops: Vec<&str> = att.iter().map(|v| v["op"].as_str().unwrap()).collect();
    assert!(ops.starts_with(&["create", "update", "update"]), "{ops:?}");
    assert!(ops.contains(&"delete"), "{ops:?}");
}

#[test]
fn times_feed_and_history_survive_a_remount_and_rsync_sends_only_what_changed() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let s = m.p(&format!("sessions/{S_ACTIVE}.json"));
    sh_ok(
        &format!(
            "jq '.task=\"moved\"' {0} > /tmp/j.$$ && cat /tmp/j.$$ > {0}; rm /tmp/j.$$",
            s.display()
        ),
        m.path(),
    );
    let t = mtime(&s);
    let feed = changes(&m);
    let hist = sh_ok(&format!("ls .history/sessions/{S_ACTIVE}"), m.path());
    let backup = tempfile::tempdir().unwrap();
    sh_ok(
        &format!("rsync -a sessions/ {}/", backup.path().display()),
        m.path(),
    );
    drop(m);
    let m = Mount::new(st.path(), &[]);
    assert_eq!(mtime(&m.p(&format!("sessions/{S_ACTIVE}.json"))), t);
    assert_eq!(changes(&m), feed);
    assert_eq!(
        sh_ok(&format!("ls .history/sessions/{S_ACTIVE}"), m.path()),
        hist
    );
    // One record changes: rsync -a transfers that file only.
    sh_ok(
        &format!(
            "jq '.task=\"again\"' sessions/{S_STOPPED}.json > /tmp/k.$$ && cat /tmp/k.$$ > sessions/{S_STOPPED}.json; rm /tmp/k.$$"
        ),
        m.path(),
    );
    let o = sh_ok(
        &format!(
            "rsync -a --itemize-changes sessions/ {}/",
            backup.path().display()
        ),
        m.path(),
    );
    let sent: Vec<&str> = o.lines().filter(|l| l.starts_with(">f")).collect();
    assert_eq!(sent.len(), 1, "{o}");
    assert!(sent[0].contains(S_STOPPED), "{o}");
    // A record changed while nothing was mounted: seen as an external change at mount.
    drop(m);
    let o = Command::new("python3")
        .args([WRITER, "files"])
        .arg(st.path())
        .args(["set", S_FUTURE, "while unmounted"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let m = Mount::new(st.path(), &[]);
    let last = changes(&m).pop().unwrap();
    assert_eq!(
        (last["id"].as_str(), last["source"].as_str()),
        (Some(S_FUTURE), Some("external"))
    );
}

#[test]
fn the_journal_works_the_same_on_arbiters_database() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    make_arbiter_db(&db);
    let m = Mount::new(&db, &[]);
    let id = "5e000000-0000-4000-8000-000000000001";
    let t0 = mtime(&m.p(&format!("sessions/{id}.json")));
    std::thread::sleep(Duration::from_millis(20));
    let o = Command::new("python3")
        .args([WRITER, "sqlite"])
        .arg(&db)
        .args(["set", id, "from arbiter"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let seen = wait_until(Duration::from_secs(2), || {
        changes(&m)
            .iter()
            .any(|v| v["id"] == id && v["source"] == "external")
    });
    assert!(seen.is_some(), "{:?}", changes(&m));
    assert!(mtime(&m.p(&format!("sessions/{id}.json"))) > t0);
    assert!(
        sh_ok(&format!("ls .history/sessions/{id}"), m.path())
            .lines()
            .count()
            == 1
    );
}

/// kill -9 of the daemon while writes go on: afterwards the feed agrees with the store
/// (every record's last fed version is its current one, once the next mount has recorded
/// what the crash left unfed), and no acknowledged write is missing from the store.
#[test]
fn after_kill_9_the_feed_agrees_with_the_store() {
    let st = fixture_copy();
    for cycle in 0..4u64 {
        let m = Mount::new(st.path(), &[]);
        let pid = json(&m.p(".status"))["pid"].as_i64().unwrap() as i32;
        let p = m.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            for i in 0.. {
                let body = json!({"description": format!("c{cycle} i{i}"), "status": "pending"});
                if std::fs::write(
                    p.join(format!("goals/g-{:08x}.json", (cycle << 16) | (i % 5))),
                    serde_json::to_vec(&body).unwrap(),
                )
                .is_err()
                {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(80 + cycle * 40));
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = Command::new(BIN)
            .args(["unmount", "--force"])
            .arg(m.path())
            .output();
        writer.join().unwrap();
        drop(m);
    }
    let m = Mount::new(st.path(), &[]);
    let mut last: HashMap<(String, String), Value> = HashMap::new();
    for v in changes(&m) {
        let key = (
            v["collection"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        );
        if v["op"] == "rename" {
            last.remove(&key);
            last.insert(
                (key.0, v["to"].as_str().unwrap().to_string()),
                v["after"].clone(),
            );
        } else {
            last.insert(key, v["after"].clone());
        }
    }
    for e in std::fs::read_dir(m.p("goals")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let id = name.trim_end_matches(".json").to_string();
        let bytes = std::fs::read(e.path()).unwrap();
        if let Some(fed) = last.get(&("goals".into(), id.clone())) {
            assert_eq!(
                *fed,
                Value::String(sha(&bytes)),
                "goal {id}: the feed's last version is the stored one"
            );
        }
    }
    let fed_goals = last.keys().filter(|(c, _)| c == "goals").count();
    assert!(fed_goals > 0, "writes were fed");
}

#[test]
fn tail_f_follows_the_change_feed() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let mut tail = Command::new("tail")
        .args(["-n", "0", "-f"])
        .arg(m.p(".changes"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tail.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(
        m.p("goals/g-000000f1.json"),
        br#"{"description": "followed", "status": "pending"}"#,
    )
    .unwrap();
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("tail -f printed it");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["op"].as_str()),
        (Some("g-000000f1"), Some("create"))
    );
    let _ = tail.kill();
    let _ = tail.wait();
}

/// The same on a shared Postgres store: another host's write is fed as external and moves
/// only that record's time, this host's own as mount with the writer's pid; `.history`
/// keeps the earlier version and `cp` restores it; all of it survives a remount.
#[test]
fn the_journal_works_the_same_on_a_postgres_store() {
    let url = common::pg::fixture_db();
    let store = std::path::PathBuf::from(&url);
    let state = tempfile::tempdir().unwrap();
    let args = ["--state-dir", state.path().to_str().unwrap()];
    let m = Mount::new(&store, &args);
    let other = Mount::new(&store, &[]);
    let (a, b) = (
        format!("sessions/{S_ACTIVE}.json"),
        format!("sessions/{S_STOPPED}.json"),
    );
    let (ta, tb) = (mtime(&m.p(&a)), mtime(&m.p(&b)));
    std::thread::sleep(Duration::from_millis(20));
    let mut v = json(&other.p(&a));
    let before = std::fs::read(m.p(&a)).unwrap();
    v["task"] = json!("changed on the other host");
    write_close(&other.p(&a), &serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let seen = wait_until(Duration::from_secs(2), || {
        changes(&m)
            .iter()
            .any(|c| c["id"] == S_ACTIVE && c["source"] == "external")
    });
    assert!(seen.is_some(), "{:?}", changes(&m));
    assert!(mtime(&m.p(&a)) > ta, "the changed record's time moved");
    assert_eq!(mtime(&m.p(&b)), tb, "no other record's time moved");
    // This host's own write: source mount, with our pid.
    let mut w = json(&m.p(&b));
    w["task"] = json!("changed here");
    write_close(&m.p(&b), &serde_json::to_vec_pretty(&w).unwrap()).unwrap();
    let mine = changes(&m)
        .into_iter()
        .find(|c| c["id"] == S_STOPPED && c["source"] == "mount")
        .expect("own write fed");
    // The kernel names the calling thread.
    assert_eq!(mine["pid"], json!(unsafe { libc::gettid() }));
    // .history has the earlier version, byte for byte; cp restores it.
    let versions = sh_ok(&format!("ls .history/sessions/{S_ACTIVE}"), m.path());
    let first = versions.lines().next().unwrap().to_string();
    assert_eq!(
        std::fs::read(m.p(&format!(".history/sessions/{S_ACTIVE}/{first}"))).unwrap(),
        before
    );
    sh_ok(
        &format!("cp .history/sessions/{S_ACTIVE}/{first} {a}"),
        m.path(),
    );
    assert_eq!(
        std::fs::read(other.p(&a)).unwrap(),
        before,
        "restored on every host"
    );
    let fed = changes(&m).len();
    let t_now = mtime(&m.p(&a));
    drop(m);
    let m = Mount::new(&store, &args);
    assert_eq!(changes(&m).len(), fed, "the feed survives a remount");
    assert_eq!(mtime(&m.p(&a)), t_now, "times survive a remount");
}
