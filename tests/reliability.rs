//! Reliability: external writers, lost updates, kill -9 of the daemon, hostile input, load,
//! and fuzzing. Sizes come from env vars: small here, large in scripts/soak.sh, which also
//! collects the "figures:" lines these tests print.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn env_n(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const WRITER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/external_writer.py"
);

fn session(task: &str) -> Value {
    json!({"tmux_name": "t", "cwd": "/", "task": task, "state": "active", "created_at": "2026-11-20T09:12:03Z"})
}

fn sid(a: u64, b: u64) -> String {
    format!("{a:08x}-0000-4000-8000-{b:012x}")
}

#[test]
fn coherence_with_external_writers_of_every_collection() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let trials = env_n("AGENTMOUNT_COHERENCE_TRIALS", 1000);
    let (sessions, goals) = (
        st.path().join("session-manager/sessions.json"),
        st.path().join("sm/goals.json"),
    );
    let conv = st.path().join("sm/conversation-login-flake.json");
    let originals: Vec<(PathBuf, String, &str, String)> = vec![
        (
            sessions.clone(),
            std::fs::read_to_string(&sessions).unwrap(),
            "fix flaky login test",
            format!("sessions/{S_ACTIVE}.json"),
        ),
        (
            goals.clone(),
            std::fs::read_to_string(&goals).unwrap(),
            "suspect clock skew in fixture",
            "goals/g-1a2b3c4d.json".into(),
        ),
        (
            conv.clone(),
            std::fs::read_to_string(&conv).unwrap(),
            "suspected clock skew.",
            "conversations/login-flake.json".into(),
        ),
    ];
    let mut stale = 0;
    for i in 0..trials {
        let (file, orig, needle, rel) = &originals[i as usize % 3];
        // Same length each time, renamed into place, back to back (within one clock tick).
        let marker = format!("{:0width$}", i, width = needle.len());
        std::fs::write(file.with_extension("tmp"), orig.replace(needle, &marker)).unwrap();
        std::fs::rename(file.with_extension("tmp"), file).unwrap();
        let mut f = std::fs::File::open(m.p(rel)).unwrap();
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut f, &mut buf).unwrap();
        if !buf.contains(&marker) || f.metadata().unwrap().len() != buf.len() as u64 {
            stale += 1;
        }
    }
    println!("figures: coherence trials={trials} stale={stale}");
    assert_eq!(stale, 0);
}

#[test]
fn no_lost_updates_between_mount_writers_and_locking_external_writers() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let secs = env_n("AGENTMOUNT_LOST_SECS", 3);
    let ext_id = sid(0xe, 1);
    let mut ext = Command::new("python3")
        .arg(WRITER)
        .arg(st.path())
        .arg(&ext_id)
        .arg(secs.to_string())
        .arg("--lock")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let (p, stop) = (m.path().to_path_buf(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut last = 0;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let path = p.join(format!("sessions/{}.json", sid(t, 1)));
                if write_close(
                    &path,
                    &serde_json::to_vec(&session(&format!("mount {n}"))).unwrap(),
                )
                .is_ok()
                {
                    last = n;
                }
            }
            (t, last)
        }));
    }
    let acks = BufReader::new(ext.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("ack"))
        .count();
    ext.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let lasts: Vec<(u64, u64)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let doc = json(&st.path().join("session-manager/sessions.json"));
    let mut lost = 0;
    for (t, last) in lasts {
        if doc["sessions"][sid(t, 1)]["task"] != format!("mount {last}") {
            lost += 1;
        }
    }
    if doc["sessions"][&ext_id]["task"] != format!("ext {acks}") {
        lost += 1;
    }
    println!("figures: lost-updates locking writers: external acks={acks} lost={lost}");
    assert_eq!(lost, 0);
    assert!(acks > 0);
}

#[test]
fn lost_updates_without_the_lock_are_measured_not_hidden() {
    // trusty-mpm's own writer takes no lock: report how often a mount write and its
    // reload-then-rename cross (the fingerprint check narrows this; only the lock closes it).
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let secs = env_n("AGENTMOUNT_LOST_SECS", 3);
    let ext_id = sid(0xe, 2);
    let mut ext = Command::new("python3")
        .arg(WRITER)
        .arg(st.path())
        .arg(&ext_id)
        .arg(secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let p = m.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let (mut n, mut history) = (0, Vec::new());
        while !s2.load(Ordering::Relaxed) {
            n += 1;
            if write_close(
                &p.join(format!("sessions/{}.json", sid(7, 7))),
                &serde_json::to_vec(&session(&format!("mount {n}"))).unwrap(),
            )
            .is_ok()
            {
                history.push(n);
            }
        }
        history
    });
    let acks = BufReader::new(ext.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("ack"))
        .count();
    ext.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let ours = writer.join().unwrap();
    let doc = json(&st.path().join("session-manager/sessions.json"));
    let ours_lost = doc["sessions"][sid(7, 7)]["task"]
        != format!("mount {}", ours.last().copied().unwrap_or(0));
    let ext_lost = doc["sessions"][&ext_id]["task"] != format!("ext {acks}");
    println!(
        "figures: lost-updates unlocked external writer: mount writes={} external writes={acks} final-state lost: mount={ours_lost} external={ext_lost}",
        ours.len()
    );
}

#[test]
fn kill_9_of_the_daemon_loses_no_acknowledged_write() {
    let cycles = env_n("AGENTMOUNT_DAEMON_KILL_CYCLES", 20);
    let st = fixture_copy();
    let acked_records: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let acked_blobs: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut torn = 0;
    for cycle in 0..cycles {
        let m = Mount::new(st.path(), &[]);
        let pid = json(&m.p(".status"))["pid"].as_i64().unwrap() as i32;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..3u64 {
            let (p, stop, recs, blobs) = (
                m.path().to_path_buf(),
                stop.clone(),
                acked_records.clone(),
                acked_blobs.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let goal = format!("g-{cycle:03}{t}{i:04}");
                    let body =
                        json!({"description": format!("c{cycle} t{t} i{i}"), "status": "pending"});
                    match write_close(
                        &p.join(format!("goals/{goal}.json")),
                        &serde_json::to_vec(&body).unwrap(),
                    ) {
                        Ok(()) => recs
                            .lock()
                            .unwrap()
                            .push((goal, body["description"].as_str().unwrap().to_string())),
                        Err(_) => break,
                    }
                    let bytes = format!("blob cycle {cycle} thread {t} n {i}")
                        .repeat(100)
                        .into_bytes();
                    match write_close(&p.join(format!("attachments/b{cycle}-{t}-{i}.txt")), &bytes)
                    {
                        Ok(()) => blobs.lock().unwrap().push(bytes),
                        Err(_) => break,
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(30 + (cycle * 53) % 170));
        unsafe { libc::kill(pid, libc::SIGKILL) };
        stop.store(true, Ordering::Relaxed);
        // A daemon killed mid-request can leave a thread stuck in a kernel invalidation
        // behind a directory lock one of our writers holds: the mount then hangs until its
        // connection is aborted, which `unmount --force` does (before joining the writers).
        let o = Command::new(BIN)
            .args(["unmount", "--force"])
            .arg(m.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "unmount --force: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for t in threads {
            t.join().unwrap();
        }
        drop(m);
        // Every store file parses and every acknowledged write is there.
        let goals = json(&st.path().join("sm/goals.json"));
        let have: HashMap<&str, &str> = goals
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["id"].as_str().unwrap(),
                    g["description"].as_str().unwrap(),
                )
            })
            .collect();
        for (id, desc) in acked_records.lock().unwrap().iter() {
            if have.get(id.as_str()) != Some(&desc.as_str()) {
                torn += 1;
                eprintln!("acknowledged goal {id} lost or changed");
            }
        }
        // The manifest with its journal: an intent for every acknowledged ingest.
        let store = agentmount::store::Store::open(
            agentmount::store::Layout::new(st.path()),
            agentmount::store::Options {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let manifest = store.manifest.current().unwrap();
        assert!(store.manifest.error().is_none());
        for b in acked_blobs.lock().unwrap().iter() {
            let hex = sha256_hex(b);
            if manifest.find(&hex).is_none() {
                torn += 1;
                eprintln!("the intent of acknowledged attachment {hex} is lost");
            }
        }
        drop((manifest, store));
        for b in acked_blobs.lock().unwrap().iter() {
            let hex = sha256_hex(b);
            if std::fs::read(
                st.path()
                    .join("attachments/sha256")
                    .join(&hex[..2])
                    .join(&hex),
            )
            .ok()
            .as_deref()
                != Some(b.as_slice())
            {
                torn += 1;
                eprintln!("acknowledged attachment {hex} lost");
            }
        }
    }
    // The next mount cleans stray temp files; fsck --repair mends what else a crash
    // legitimately leaves (an intent whose bytes never landed) and then passes.
    drop(Mount::new(st.path(), &[]));
    let o = Command::new(BIN)
        .args(["fsck", "--repair", "--store"])
        .arg(st.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // gc with no grace reclaims every acknowledged attachment (no record references
    // them): it finds each one's intent. The fixture's referenced pixel stays.
    let g = Command::new(BIN)
        .args(["gc", "--grace", "0", "--store"])
        .arg(st.path())
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let report: Value = serde_json::from_slice(&g.stdout).unwrap();
    let reclaimed: std::collections::HashSet<&str> = report["reclaimed_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for b in acked_blobs.lock().unwrap().iter() {
        let hex = sha256_hex(b);
        if !reclaimed.contains(hex.as_str()) {
            torn += 1;
            eprintln!("gc did not reclaim acknowledged attachment {hex}: no intent");
        }
    }
    assert!(st.path().join("attachments/sha256/b1").join(PIXEL).exists());
    let o = Command::new(BIN)
        .args(["fsck", "--store"])
        .arg(st.path())
        .output()
        .unwrap();
    let n_records = acked_records.lock().unwrap().len();
    let n_blobs = acked_blobs.lock().unwrap().len();
    println!(
        "figures: crash cycles={cycles} acked-records={n_records} acked-blobs={n_blobs} lost-acked-writes={torn} fsck={}",
        if o.status.success() { "ok" } else { "FAILED" }
    );
    assert!(
        o.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(torn, 0);
    assert!(n_records > cycles as usize, "writers made progress");
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    agentmount::store::attachments::to_hex(&sha2::Sha256::digest(b))
}

#[test]
fn a_careless_external_writer_killed_mid_write_never_shows_a_torn_file() {
    let st = fixture_copy();
    // Make sessions.json big enough that in-place writes take many pieces.
    {
        let mut doc = json(&st.path().join("session-manager/sessions.json"));
        for i in 0..300 {
            doc["sessions"][sid(0xa, i)] = json!({"id": sid(0xa, i), "tmux_name": "t", "cwd": "/", "task": "padding", "state": "active", "created_at": "2026-11-20T09:12:03Z"});
        }
        std::fs::write(
            st.path().join("session-manager/sessions.json"),
            serde_json::to_vec_pretty(&doc).unwrap(),
        )
        .unwrap();
    }
    let m = Mount::new(st.path(), &[]);
    let (mut reads, mut bad) = (0u64, 0u64);
    for round in 0..env_n("AGENTMOUNT_TORN_ROUNDS", 5) {
        let mut w = Command::new("python3")
            .arg(WRITER)
            .arg(st.path())
            .arg(S_ACTIVE)
            .arg("5")
            .arg("--inplace-torn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let kill_at = Duration::from_millis(100 + round * 61 % 300);
        while t0.elapsed() < kill_at {
            for rel in [
                format!("sessions/{S_ACTIVE}.json"),
                format!("sessions/{}.json", sid(0xa, 7)),
            ] {
                reads += 1;
                match std::fs::read(m.p(&rel)) {
                    Ok(b) if serde_json::from_slice::<Value>(&b).is_ok() => {}
                    other => {
                        bad += 1;
                        eprintln!(
                            "torn or missing read of {rel}: {:?}",
                            other.map(|b| b.len())
                        );
                    }
                }
            }
        }
        w.kill().unwrap();
        w.wait().unwrap();
    }
    // Whatever the killed writer left, the mount still serves a whole record.
    let b = std::fs::read(m.p(&format!("sessions/{S_ACTIVE}.json"))).unwrap();
    assert!(serde_json::from_slice::<Value>(&b).is_ok());
    println!("figures: torn external writes: reads={reads} torn-reads={bad}");
    assert_eq!(bad, 0);
    assert!(reads > 0);
}

/// One operation on the mount.
type Op = Box<dyn Fn(&Path) -> std::io::Result<()>>;

/// What a hostile operation should get.
struct Case {
    what: &'static str,
    errno: i32,
    op: Op,
}

fn case(
    what: &'static str,
    errno: i32,
    op: impl Fn(&Path) -> std::io::Result<()> + 'static,
) -> Case {
    Case {
        what,
        errno,
        op: Box::new(op),
    }
}

fn put(rel: &'static str, data: &'static [u8]) -> impl Fn(&Path) -> std::io::Result<()> {
    move |m: &Path| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.join(rel))?;
        f.write_all(data)?;
        f.sync_all()
    }
}

#[test]
fn hostile_operations_get_their_errno_and_change_nothing() {
    use libc::*;
    let st = fixture_copy();
    let before = tree(st.path());
    let m = Mount::new(st.path(), &[]);
    let pix: &'static str = Box::leak(format!("attachments/{PIXEL}").into_boxed_str());
    let pix_meta: &'static str = Box::leak(format!("attachments/{PIXEL}.json").into_boxed_str());
    let sess: &'static str = Box::leak(format!("sessions/{S_ACTIVE}.json").into_boxed_str());
    let long_name: &'static str =
        Box::leak(format!("goals/{}.json", "g".repeat(200)).into_boxed_str());
    let too_long: &'static str =
        Box::leak(format!("goals/{}.json", "g".repeat(300)).into_boxed_str());
    let cases = vec![
        case("malformed JSON", EINVAL, put(sess, b"{\"state\": active}")),
        case("truncated JSON", EINVAL, put(sess, b"{\"id\": \"6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22\", \"tmux")),
        case("empty file", EINVAL, put(sess, b"")),
        case("whitespace only", EINVAL, put(sess, b"  \n\t ")),
        case("JSON array", EINVAL, put(sess, b"[]")),
        case("JSON string", EINVAL, put(sess, b"\"hello\"")),
        case("trailing garbage", EINVAL, put(sess, b"{} {}")),
        case("binary junk", EINVAL, put(sess, b"\x00\xff\xfe{")),
        case("wrong type: task number", EINVAL, put(sess, br#"{"tmux_name":"t","cwd":"/","task":5,"state":"active","created_at":"2026-11-20T09:12:03Z"}"#)),
        case("unknown state", EINVAL, put(sess, br#"{"tmux_name":"t","cwd":"/","task":"t","state":"sleeping","created_at":"2026-11-20T09:12:03Z"}"#)),
        case("bad time", EINVAL, put(sess, br#"{"tmux_name":"t","cwd":"/","task":"t","state":"active","created_at":"2026-13-45"}"#)),
        case("id mismatch", EINVAL, put(sess, br#"{"id":"0b9e77d1-2c3f-4a8b-8e6d-5f4a3b2c1d0e","tmux_name":"t","cwd":"/","task":"t","state":"active","created_at":"2026-11-20T09:12:03Z"}"#)),
        case("goal status unknown", EINVAL, put("goals/g-1a2b3c4d.json", br#"{"description":"d","status":"finished"}"#)),
        case("goal done with running session", EINVAL, put("goals/g-1a2b3c4d.json", br#"{"description":"d","status":"done","sessions":[{"session_id":"6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22","state":"running"}]}"#)),
        case("goal progress 250", EINVAL, put("goals/g-1a2b3c4d.json", br#"{"description":"d","status":"pending","progress":250}"#)),
        case("conversation rounds not array", EINVAL, put("conversations/login-flake.json", br#"{"recent_rounds": 3}"#)),
        case("session named not-a-uuid", EINVAL, put("sessions/not-a-uuid.json", b"{}")),
        case("goal id with a space", EINVAL, put("goals/a b.json", b"{}")),
        case("goal id with unicode", EINVAL, put("goals/gé-1.json", b"{}")),
        case("goal id with a control character", EINVAL, put("goals/g\x01.json", b"{}")),
        case("id over 128 characters", EINVAL, move |m: &Path| put(long_name, b"{}")(m)),
        case("name over 255 bytes", ENAMETOOLONG, move |m: &Path| put(too_long, b"{}")(m)),
        case("oversize record", EFBIG, move |m: &Path| {
            let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(m.join("goals/g-1a2b3c4d.json"))?;
            f.write_all(&vec![b' '; 17 << 20])?;
            f.sync_all()
        }),
        case("write attachment bytes", EPERM, put(pix, b"x")),
        case("write attachment sidecar", EPERM, put(pix_meta, b"{}")),
        // DESIGN §7: a write to attachment bytes is a put by address, refused when stored
        // unless the bytes hash to the name. A close with nothing written stores nothing
        // (the shell's `>` closes a duplicate before it writes): an O_TRUNC open is refused
        // at fsync, or at the release (in .errors); an ftruncate at once.
        case("truncate attachment bytes", EPERM, move |m: &Path| std::fs::OpenOptions::new().write(true).truncate(true).open(m.join(pix))?.sync_all()),
        case("ftruncate attachment bytes", EPERM, move |m: &Path| std::fs::OpenOptions::new().write(true).open(m.join(pix))?.set_len(0)),
        case("unlink attachment bytes", EPERM, move |m: &Path| std::fs::remove_file(m.join(pix))),
        case("unlink sidecar", EPERM, move |m: &Path| std::fs::remove_file(m.join(pix_meta))),
        case("create a file named like a blob", EPERM, move |m: &Path| write_close(&m.join(format!("attachments/{}", "a".repeat(64))), b"x").map_err(std::io::Error::from_raw_os_error)),
        case("mkdir", EPERM, |m: &Path| std::fs::create_dir(m.join("goals/sub"))),
        case("rmdir", EPERM, |m: &Path| std::fs::remove_dir(m.join("goals"))),
        case("hard link", EPERM, |m: &Path| std::fs::hard_link(m.join("goals/g-1a2b3c4d.json"), m.join("goals/g-2.json"))),
        case("symlink", EPERM, |m: &Path| std::os::unix::fs::symlink("x", m.join("goals/link.json"))),
        case("mknod fifo", EPERM, |m: &Path| {
            let c = std::ffi::CString::new(m.join("goals/fifo").into_os_string().into_encoded_bytes()).unwrap();
            if unsafe { mkfifo(c.as_ptr(), 0o644) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        }),
        case("cross-directory rename", EXDEV, move |m: &Path| std::fs::rename(m.join("goals/g-1a2b3c4d.json"), m.join(sess))),
        case("rename record to a bad id", EINVAL, |m: &Path| std::fs::rename(m.join("goals/g-1a2b3c4d.json"), m.join("goals/bad id.json"))),
        case("rename top-level dir", EPERM, |m: &Path| std::fs::rename(m.join("goals"), m.join("goalz"))),
        case("chmod that changes a mode", EPERM, move |m: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(m.join(sess), std::fs::Permissions::from_mode(0o600))
        }),
        case("chown to another user", EPERM, move |m: &Path| std::os::unix::fs::chown(m.join(sess), Some(12345), None)),
        case("write .status", EPERM, put(".status", b"x")),
        case("write .errors", EPERM, put(".errors", b"x")),
        case("unlink .gc", EPERM, |m: &Path| std::fs::remove_file(m.join(".gc"))),
        case("bad .gc command", EINVAL, |m: &Path| std::fs::OpenOptions::new().write(true).open(m.join(".gc"))?.write_all(b"explode")),
        case("bad .gc grace", EINVAL, |m: &Path| std::fs::OpenOptions::new().write(true).open(m.join(".gc"))?.write_all(b"grace=soon")),
        case("setxattr", ENOTSUP, move |m: &Path| {
            let p = std::ffi::CString::new(m.join(sess).into_os_string().into_encoded_bytes()).unwrap();
            if unsafe { setxattr(p.as_ptr(), c"user.x".as_ptr(), c"1".as_ptr().cast(), 1, 0) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        }),
    ];
    let total = cases.len();
    let mut wrong = Vec::new();
    for c in &cases {
        let got = match (c.op)(m.path()) {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        if got != c.errno {
            wrong.push(format!("{}: expected {}, got {}", c.what, c.errno, got));
        }
    }
    // The daemon still serves, and the store is byte-identical.
    assert_eq!(json(&m.p("goals/g-1a2b3c4d.json"))["status"], "inProgress");
    drop(m);
    let after = tree(st.path());
    println!(
        "figures: bad inputs refused={}/{total}",
        total - wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(total >= 30);
    assert_eq!(after, before, "the store is byte-identical");
}

#[test]
fn load_mixed_operations_from_eight_threads() {
    let secs = env_n("AGENTMOUNT_LOAD_SECS", 5);
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let pid = json(&m.p(".status"))["pid"].as_i64().unwrap();
    let rss = |field: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let ops = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let (p, ops, errors, stop) = (
            m.path().to_path_buf(),
            ops.clone(),
            errors.clone(),
            stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r: Result<(), String> = match (t + i) % 6 {
                    0 => std::fs::read(p.join(format!("sessions/{S_ACTIVE}.json")))
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    1 => write_close(
                        &p.join(format!("sessions/{}.json", sid(t, i % 20))),
                        &serde_json::to_vec(&session(&format!("load {i}"))).unwrap(),
                    )
                    .map_err(|e| format!("errno {e}")),
                    2 => write_close(
                        &p.join(format!("goals/g-load{t}{}.json", i % 10)),
                        br#"{"description":"load","status":"pending"}"#,
                    )
                    .map_err(|e| format!("errno {e}")),
                    // A new name each time: writing over an existing label is EPERM by design
                    // (the label is a symlink to immutable bytes).
                    3 => write_close(
                        &p.join(format!("attachments/load-{t}-{i}.bin")),
                        format!("{t} {}", i % 7).repeat(1000).as_bytes(),
                    )
                    .map_err(|e| format!("errno {e}")),
                    4 => std::fs::read_dir(p.join(
                        ["sessions", "goals", "attachments", "conversations"][(i % 4) as usize],
                    ))
                    .map(|d| d.count())
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                    _ => std::fs::read(p.join("conversations/login-flake.json"))
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                ops.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = r {
                    errors.lock().unwrap().push(e);
                }
            }
        }));
    }
    // A watchdog: the operation count must keep moving (no deadlock).
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let (mut last, mut last_progress) = (0, Instant::now());
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        let now = ops.load(Ordering::Relaxed);
        if now > last {
            (last, last_progress) = (now, Instant::now());
        }
        // Slow disks make single operations slow; ten seconds without any is a deadlock.
        assert!(
            last_progress.elapsed() < Duration::from_secs(10),
            "no operation finished in 10 s: deadlock"
        );
        samples.push(rss("VmRSS:"));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let peak = rss("VmHWM:");
    let n = ops.load(Ordering::Relaxed);
    let errs = errors.lock().unwrap();
    println!(
        "figures: load threads=8 secs={secs} ops={n} errors={} peak-rss-kib={peak} rss-first-kib={} rss-last-kib={}",
        errs.len(),
        samples.first().unwrap_or(&0),
        samples.last().unwrap_or(&0)
    );
    assert!(errs.is_empty(), "{:?}", &errs[..errs.len().min(5)]);
    // The kernel sends RELEASE after close() has returned (asynchronously), so the last
    // handles may take a moment to be released.
    let t0 = Instant::now();
    let mut open = json(&m.p(".status"))["counts"]["open_handles"].clone();
    while open != 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        open = json(&m.p(".status"))["counts"]["open_handles"].clone();
    }
    assert_eq!(open, 0, "every handle was released");
}

mod fuzz {
    use agentmount::store::Kind;
    use agentmount::store::gc::GcOptions;
    use agentmount::store::validate::parse_record;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            prop_oneof![
                Just("active".to_string()),
                Just("done".to_string()),
                Just("2026-11-20T09:12:03Z".to_string()),
                ".{0,12}"
            ]
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("id".to_string()),
                            Just("state".to_string()),
                            Just("status".to_string()),
                            Just("sessions".to_string()),
                            Just("progress".to_string()),
                            Just("recent_rounds".to_string()),
                            "[a-z_]{1,10}"
                        ],
                        inner
                    ),
                    0..8
                )
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("AGENTMOUNT_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(512)))]
        #[test]
        fn validation_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), k in 0..3usize) {
            let kind = Kind::ALL[k];
            if let Err(e) = parse_record(kind, "g-1", &bytes, 1 << 20) {
                prop_assert!(e.errno() == libc::EINVAL || e.errno() == libc::EFBIG);
            }
        }

        #[test]
        fn validation_never_panics_on_json(v in json_value(), k in 0..3usize) {
            let kind = Kind::ALL[k];
            let id = if kind == Kind::Sessions { "6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22" } else { "g-1" };
            match parse_record(kind, id, &serde_json::to_vec(&v).unwrap(), 1 << 20) {
                Ok(obj) => prop_assert!(kind == Kind::Conversations || obj.get("id").and_then(|v| v.as_str()) == Some(id)),
                Err(e) => prop_assert_eq!(e.errno(), libc::EINVAL),
            }
        }

        #[test]
        fn gc_command_parser_never_panics(s in ".{0,40}") {
            if let Err(e) = GcOptions::parse_command(&s) {
                prop_assert_eq!(e.errno(), libc::EINVAL);
            }
        }

        #[test]
        fn collection_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = agentmount::store::collection::parse_doc(agentmount::store::collection::Shape::Map("sessions"), &bytes, None);
            let _ = agentmount::store::collection::parse_doc(agentmount::store::collection::Shape::Array, &bytes, None);
        }

        /// A reload parses only where the file changed: after random byte edits of a pretty
        /// collection file (commas, brackets, quotes, digits, whitespace anywhere), a parse
        /// against the previous version must accept exactly what a fresh parse accepts, with
        /// the same records, and the result must serve as the previous version again.
        #[test]
        fn reparsing_edited_bytes_against_the_previous_version_equals_a_fresh_parse(
            recs in prop::collection::vec(json_value(), 1..6),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, prop::sample::select(vec![b',', b'{', b'}', b'[', b']', b'"', b':', b' ', b'\n', b'a', b'1', b'\\', b'0', 0x0c, b'\t'])), 1..8),
            array in any::<bool>(),
        ) {
            use agentmount::store::collection::{parse_doc, Doc, Shape};
            let recs: Vec<serde_json::Value> = recs.into_iter().enumerate().map(|(i, v)| match v {
                serde_json::Value::Object(mut o) => { o.insert("id".into(), format!("g-{i}").into()); o.into() }
                v => v,
            }).collect();
            let (shape, doc) = if array {
                (Shape::Array, serde_json::Value::Array(recs))
            } else {
                (Shape::Map("sessions"), serde_json::json!({"v": 1, "sessions": recs.into_iter().enumerate().map(|(i, v)| (format!("s{i}"), v)).collect::<serde_json::Map<_, _>>(), "after": [1]}))
            };
            let mut bytes = serde_json::to_vec_pretty(&doc).unwrap();
            let view = |d: &Doc| (d.records.iter().map(|r| (r.id.clone(), r.bytes.to_vec())).collect::<Vec<_>>(), d.top.clone());
            let mut prev = parse_doc(shape, &bytes, None).unwrap();
            for (at, op, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ if i < bytes.len() => bytes[i] = byte,
                    _ => bytes.push(byte),
                }
                let fresh = parse_doc(shape, &bytes, None);
                let diffed = parse_doc(shape, &bytes, Some(&prev));
                prop_assert_eq!(fresh.is_ok(), diffed.is_ok(), "{}", String::from_utf8_lossy(&bytes));
                // And both agree with serde_json reading the whole file as one tree.
                let present = |v: &serde_json::Value| { let mut b = serde_json::to_vec_pretty(v).unwrap(); b.push(b'\n'); b };
                let blank = bytes.iter().all(u8::is_ascii_whitespace);
                let oracle: Option<Vec<(String, Vec<u8>)>> = if blank { Some(vec![]) } else { serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| match (array, v) {
                    (true, serde_json::Value::Array(a)) => Some(a.iter().map(|r| (r.get("id").and_then(|i| i.as_str()).unwrap_or_default().to_string(), present(r))).collect()),
                    (false, serde_json::Value::Object(o)) => match o.get("sessions") {
                        None | Some(serde_json::Value::Null) => Some(vec![]),
                        Some(serde_json::Value::Object(m)) => Some(m.iter().map(|(k, r)| (k.clone(), present(r))).collect()),
                        Some(_) => None,
                    },
                    _ => None,
                }) };
                prop_assert_eq!(oracle.is_some(), fresh.is_ok(), "{}", String::from_utf8_lossy(&bytes));
                if let (Some(o), Ok(f)) = (&oracle, &fresh) {
                    prop_assert_eq!(&view(f).0, o);
                }
                if let (Ok(f), Ok(d)) = (fresh, diffed) {
                    prop_assert_eq!(view(&d), view(&f), "{}", String::from_utf8_lossy(&bytes));
                    prev = d;
                }
            }
        }

        /// A reload reuses the records whose text did not change; what it gives must be
        /// exactly what parsing the new version from nothing gives.
        #[test]
        fn reparsing_against_the_previous_version_equals_a_fresh_parse(
            a in prop::collection::vec(json_value(), 0..6),
            b in prop::collection::vec(json_value(), 0..6),
            keep in prop::collection::vec(any::<bool>(), 6),
            pretty in any::<bool>(),
        ) {
            use agentmount::store::collection::{parse_doc, Shape};
            // Records keyed by their slot; version 2 keeps some of version 1 and changes,
            // drops or adds others.
            let named = |i: usize, v: &serde_json::Value| {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), format!("g-{i}").into());
                }
                (i, v)
            };
            let v1: Vec<_> = a.iter().enumerate().map(|(i, v)| named(i, v)).collect();
            let v2: Vec<_> = (0..6)
                .filter_map(|i| if keep[i] { a.get(i) } else { b.get(i) }.map(|v| named(i, v)))
                .collect();
            let map = |rs: &[(usize, serde_json::Value)]| serde_json::json!({
                "version": 1,
                "sessions": rs.iter().map(|(i, v)| (format!("s{i}"), v.clone())).collect::<serde_json::Map<_, _>>(),
            });
            let arr = |rs: &[(usize, serde_json::Value)]| serde_json::Value::Array(rs.iter().map(|(_, v)| v.clone()).collect());
            let enc = |v: &serde_json::Value, pretty: bool| if pretty { serde_json::to_vec_pretty(v).unwrap() } else { serde_json::to_vec(v).unwrap() };
            for (shape, d1, d2) in [
                (Shape::Map("sessions"), map(&v1), map(&v2)),
                (Shape::Array, arr(&v1), arr(&v2)),
            ] {
                let old = parse_doc(shape, &enc(&d1, true), None).unwrap();
                let bytes = enc(&d2, pretty);
                let fresh = parse_doc(shape, &bytes, None).unwrap();
                let reused = parse_doc(shape, &bytes, Some(&old)).unwrap();
                let view = |d: &agentmount::store::collection::Doc| d.records.iter().map(|r| (r.id.clone(), r.bytes.to_vec())).collect::<Vec<_>>();
                prop_assert_eq!(view(&reused), view(&fresh));
                prop_assert_eq!(&reused.top, &fresh.top);
                // And the reuse happens: an unchanged session in a pretty file is not rebuilt.
                if pretty && shape == Shape::Map("sessions") {
                    for i in (0..a.len()).filter(|&i| keep[i]) {
                        let id = format!("s{i}");
                        prop_assert!(std::sync::Arc::ptr_eq(reused.get(&id).unwrap(), old.get(&id).unwrap()));
                    }
                }
            }
        }
    }
}
