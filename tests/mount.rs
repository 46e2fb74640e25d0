//! Integration tests: a real FUSE mount of a fixture copy, driven with real tools and by
//! another process writing the store.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn every_file_reads_back_what_the_store_holds() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let names = |d: &str| {
        let mut v: Vec<String> = std::fs::read_dir(m.p(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names("."),
        [
            ".changes",
            ".errors",
            ".gc",
            ".history",
            ".status",
            "attachments",
            "conversations",
            "goals",
            "sessions"
        ]
    );
    let doc = json(&st.path().join("session-manager/sessions.json"));
    for (id, rec) in doc["sessions"].as_object().unwrap() {
        let p = m.p(&format!("sessions/{id}.json"));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), *rec);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            bytes.len() as u64,
            "st_size is exact"
        );
    }
    for g in json(&st.path().join("sm/goals.json")).as_array().unwrap() {
        assert_eq!(
            json(&m.p(&format!("goals/{}.json", g["id"].as_str().unwrap()))),
            *g
        );
    }
    assert_eq!(
        json(&m.p("conversations/login-flake.json")),
        json(&st.path().join("sm/conversation-login-flake.json"))
    );
    assert_eq!(
        std::fs::read(m.p(&format!("attachments/{PIXEL}"))).unwrap(),
        std::fs::read(st.path().join("attachments/sha256/b1").join(PIXEL)).unwrap()
    );
    assert_eq!(
        std::fs::read(m.p(&format!("attachments/{NOTES}.json"))).unwrap(),
        std::fs::read(
            st.path()
                .join("attachments/sha256/05")
                .join(format!("{NOTES}.json"))
        )
        .unwrap()
    );
    assert_eq!(
        std::fs::read_link(m.p("attachments/pixel.png"))
            .unwrap()
            .to_str(),
        Some(PIXEL)
    );
    assert_eq!(
        std::fs::read(m.p("attachments/notes.txt")).unwrap(),
        b"2.4 release notes draft\n- faster login\n"
    );
    // Modes, owner, mtimes from the store.
    let md = std::fs::metadata(m.p(&format!("sessions/{S_ACTIVE}.json"))).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(md.uid(), unsafe { libc::getuid() });
    assert_eq!(
        md.mtime(),
        std::fs::metadata(st.path().join("session-manager/sessions.json"))
            .unwrap()
            .mtime()
    );
    assert_eq!(
        std::fs::metadata(m.p(&format!("attachments/{PIXEL}")))
            .unwrap()
            .mode()
            & 0o7777,
        0o444
    );
    assert_eq!(
        std::fs::metadata(m.p("goals")).unwrap().mode() & 0o7777,
        0o755
    );
    // Stable inode numbers for a name while it exists.
    let i1 = std::fs::metadata(m.p("goals/g-1a2b3c4d.json"))
        .unwrap()
        .ino();
    assert_eq!(
        std::fs::metadata(m.p("goals/g-1a2b3c4d.json"))
            .unwrap()
            .ino(),
        i1
    );
    // .status is JSON with counts.
    let s = json(&m.p(".status"));
    assert_eq!(s["counts"]["sessions"], 3);
    assert_eq!(s["counts"]["attachments"], 2);
    // xattrs on attachment bytes.
    let out = sh_ok(
        &format!("getfattr -d --absolute-names attachments/{PIXEL}"),
        m.path(),
    );
    assert!(out.contains(&format!("user.sha256=\"{PIXEL}\"")), "{out}");
    assert!(out.contains("user.media_type=\"image/png\""), "{out}");
    assert!(out.contains("user.label=\"pixel.png\""), "{out}");
}

#[test]
fn real_tools_write_through_to_the_store_keeping_other_records_and_unknown_fields() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let sessions = st.path().join("session-manager/sessions.json");
    // jq + shell redirection
    sh_ok(
        &format!(
            "jq '.state=\"stopped\"' sessions/{S_ACTIVE}.json > /tmp/am-$$.json && cat /tmp/am-$$.json > sessions/{S_ACTIVE}.json; rm -f /tmp/am-$$.json"
        ),
        m.path(),
    );
    assert_eq!(json(&sessions)["sessions"][S_ACTIVE]["state"], "stopped");
    // sed -i (temp file + rename in the directory)
    sh_ok(
        &format!("sed -i 's/tm-calm-heron/tm-calm-egret/' sessions/{S_FUTURE}.json"),
        m.path(),
    );
    let doc = json(&sessions);
    assert_eq!(doc["sessions"][S_FUTURE]["tmux_name"], "tm-calm-egret");
    assert_eq!(
        doc["sessions"][S_FUTURE]["future_field_from_newer_platform"]["note"],
        "unknown fields must round-trip"
    );
    assert_eq!(doc["sessions"].as_object().unwrap().len(), 3);
    // perl -i
    sh_ok(
        &format!(
            "perl -pi -e 's/release notes for 2.4/release notes for 2.5/' sessions/{S_STOPPED}.json"
        ),
        m.path(),
    );
    assert_eq!(
        json(&sessions)["sessions"][S_STOPPED]["task"],
        "write release notes for 2.5"
    );
    // vim, with backup and swap files on
    sh_ok(
        &format!(
            "vim -u NONE -es -c 'set backup writebackup backupcopy=no swapfile' -c '%s/tm-quiet-falcon/tm-loud-falcon/' -c 'wq' sessions/{S_ACTIVE}.json"
        ),
        m.path(),
    );
    assert_eq!(
        json(&sessions)["sessions"][S_ACTIVE]["tmux_name"],
        "tm-loud-falcon"
    );
    sh_ok(
        &format!(
            "vim -u NONE -es -c 'set nobackup nowritebackup' -c '%s/tm-loud-falcon/tm-louder-falcon/' -c 'wq' sessions/{S_ACTIVE}.json"
        ),
        m.path(),
    );
    assert_eq!(
        json(&sessions)["sessions"][S_ACTIVE]["tmux_name"],
        "tm-louder-falcon"
    );
    assert_eq!(
        std::fs::read_dir(m.p("sessions")).unwrap().count(),
        3,
        "no backup or swap files left behind"
    );
    // cp a goal in, mv (re-key) it, tee, python json.dump, rm
    let goal = json!({"description": "ship it", "status": "pending", "acceptance": ["green"], "progress": 0});
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(&goal).unwrap()).unwrap();
    sh_ok(
        &format!("cp {} goals/g-00c0ffee.json", tmp.path().display()),
        m.path(),
    );
    sh_ok("mv goals/g-00c0ffee.json goals/g-0000beef.json", m.path());
    let goals = json(&st.path().join("sm/goals.json"));
    let ids: Vec<&str> = goals
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["g-0000beef", "g-1a2b3c4d", "g-9f8e7d6c"]);
    sh_ok(
        r#"python3 -c "
import json
p='goals/g-0000beef.json'
g=json.load(open(p)); g['progress']=55
with open(p,'w') as f: json.dump(g, f)
""#,
        m.path(),
    );
    assert_eq!(json(&m.p("goals/g-0000beef.json"))["progress"], 55);
    sh_ok(
        r#"echo '{"compressed_context": "new", "total_rounds": 1}' | tee conversations/fresh-1.json > /dev/null"#,
        m.path(),
    );
    assert_eq!(
        json(&st.path().join("sm/conversation-fresh-1.json"))["total_rounds"],
        1
    );
    sh_ok(
        "rm goals/g-0000beef.json conversations/fresh-1.json",
        m.path(),
    );
    assert_eq!(
        json(&st.path().join("sm/goals.json"))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!st.path().join("sm/conversation-fresh-1.json").exists());
    // rsync into a collection (temp file + rename)
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("g-12345678.json"),
        br#"{"description": "via rsync", "status": "blocked"}"#,
    )
    .unwrap();
    sh_ok(
        &format!("rsync -r {}/ goals/", src.path().display()),
        m.path(),
    );
    assert_eq!(json(&m.p("goals/g-12345678.json"))["status"], "blocked");
}

#[test]
fn refused_writes_fail_with_errno_leave_the_store_identical_and_show_in_errors() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let before = tree(st.path());
    let write = |rel: &str, data: &[u8]| -> i32 {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.p(rel))
            .and_then(|mut f| {
                f.write_all(data)?;
                f.sync_all()
            });
        errno_of(r)
    };
    assert_eq!(
        write(&format!("sessions/{S_ACTIVE}.json"), b"{\"state\": "),
        libc::EINVAL
    );
    assert_eq!(write("goals/g-1a2b3c4d.json", br#"{"description":"x","status":"done","sessions":[{"session_id":"6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22","state":"running"}]}"#), libc::EINVAL);
    assert_eq!(write("goals/bad id.json", b"{}"), libc::EINVAL);
    assert_eq!(write("sessions/not-a-uuid.json", b"{}"), libc::EINVAL);
    assert_eq!(write(&format!("attachments/{PIXEL}"), b"x"), libc::EPERM);
    assert_eq!(
        write(&format!("attachments/{PIXEL}.json"), b"x"),
        libc::EPERM
    );
    assert_eq!(write(".status", b"x"), libc::EPERM);
    assert_eq!(errno_of(std::fs::create_dir(m.p("goals/sub"))), libc::EPERM);
    assert_eq!(
        errno_of(std::fs::hard_link(
            m.p("goals/g-1a2b3c4d.json"),
            m.p("goals/g-2.json")
        )),
        libc::EPERM
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", m.p("attachments/link"))),
        libc::EPERM
    );
    assert_eq!(
        errno_of(std::fs::remove_file(m.p(&format!("attachments/{PIXEL}")))),
        libc::EPERM
    );
    assert_eq!(
        errno_of(std::fs::rename(
            m.p("goals/g-1a2b3c4d.json"),
            m.p(&format!("sessions/{S_ACTIVE}.json"))
        )),
        libc::EXDEV
    );
    let chmod = sh(&format!("chmod 600 sessions/{S_ACTIVE}.json"), m.path());
    assert!(!chmod.status.success());
    // A chmod/chown that changes nothing, and touch, succeed.
    sh_ok(
        &format!(
            "chmod 644 sessions/{S_ACTIVE}.json && chown $(id -u):$(id -g) sessions/{S_ACTIVE}.json && touch sessions/{S_ACTIVE}.json"
        ),
        m.path(),
    );
    assert_eq!(tree(st.path()), before, "the store is byte-identical");
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    let lines: Vec<Value> = errors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["errno"] == "EINVAL"
                && l["reason"].as_str().unwrap().contains("invalid JSON")),
        "{errors}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["reason"].as_str().unwrap().contains("not verified")),
        "{errors}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["errno"] == "EPERM" && l["op"] == "mkdir"),
        "{errors}"
    );
    assert!(lines.iter().any(|l| l["errno"] == "EXDEV"), "{errors}");
    // The daemon still serves.
    assert_eq!(json(&m.p("goals/g-1a2b3c4d.json"))["status"], "inProgress");
}

#[test]
fn external_rename_is_seen_by_the_next_open_every_time() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let trials: usize = std::env::var("AGENTMOUNT_COHERENCE_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let store_file = st.path().join("session-manager/sessions.json");
    let orig = std::fs::read_to_string(&store_file).unwrap();
    let rec = m.p(&format!("sessions/{S_ACTIVE}.json"));
    let mut stale = 0;
    for i in 0..trials {
        // Same length every time, often within one clock tick: as trusty-mpm writes.
        let task = format!("fix flaky login {:04}", i % 10000);
        let text = orig.replace("fix flaky login test", &task);
        let tmp = store_file.with_extension(format!("tmp{i}"));
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, &store_file).unwrap();
        let mut f = std::fs::File::open(&rec).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        let size = f.metadata().unwrap().len();
        let v: Value = serde_json::from_slice(&buf).unwrap();
        if v["task"] != task.as_str() || size != buf.len() as u64 {
            stale += 1;
        }
    }
    eprintln!("coherence: {trials} trials, {stale} stale");
    assert_eq!(stale, 0);
}

#[test]
fn external_changes_appear_and_disappear_within_the_invalidation_latency() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let conv = st.path().join("sm/conversation-ext-1.json");
    // Created outside: found at the next lookup (no negative caching).
    assert!(!m.p("conversations/ext-1.json").exists());
    std::fs::write(&conv, br#"{"total_rounds": 3}"#).unwrap();
    assert_eq!(json(&m.p("conversations/ext-1.json"))["total_rounds"], 3);
    // Changed outside: stat shows the new size without a new open.
    let p = m.p("conversations/ext-1.json");
    let old = std::fs::metadata(&p).unwrap().len();
    std::fs::write(
        conv.with_extension("tmp"),
        br#"{"total_rounds": 3, "token_estimate": 123456}"#,
    )
    .unwrap();
    std::fs::rename(conv.with_extension("tmp"), &conv).unwrap();
    let lat = wait_until(Duration::from_secs(3), || {
        std::fs::metadata(&p)
            .map(|m| m.len() != old)
            .unwrap_or(false)
    })
    .expect("new size never seen");
    eprintln!("invalidation latency (change): {lat:?}");
    // Removed outside: disappears.
    std::fs::remove_file(&conv).unwrap();
    let lat =
        wait_until(Duration::from_secs(3), || !p.exists()).expect("removed record still visible");
    eprintln!("invalidation latency (removal): {lat:?}");
    assert!(
        lat < Duration::from_millis(1500),
        "must be gone by the TTL at the latest"
    );
    let s = json(&m.p(".status"));
    assert!(s["invalidation"]["external_changes"].as_u64().unwrap() >= 2);
}

#[test]
fn garbage_in_a_store_file_keeps_the_last_good_view_until_fixed() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let goals = st.path().join("sm/goals.json");
    assert_eq!(std::fs::read_dir(m.p("goals")).unwrap().count(), 2);
    std::fs::write(&goals, b"not json at all").unwrap();
    assert_eq!(
        json(&m.p("goals/g-1a2b3c4d.json"))["status"],
        "inProgress",
        "last good view"
    );
    let r = std::fs::write(
        m.p("goals/g-00000001.json"),
        br#"{"description":"x","status":"pending"}"#,
    );
    assert_eq!(errno_of(r), libc::EIO);
    assert_eq!(
        std::fs::read(&goals).unwrap(),
        b"not json at all",
        "never overwritten"
    );
    let s = json(&m.p(".status"));
    assert!(
        s["last_error"]["goals"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
    std::fs::copy(Path::new(FIXTURE).join("sm/goals.json"), &goals).unwrap();
    std::fs::write(
        m.p("goals/g-00000001.json"),
        br#"{"description":"x","status":"pending"}"#,
    )
    .unwrap();
    assert_eq!(json(&goals).as_array().unwrap().len(), 3);
}

fn sha_hex(b: &[u8]) -> String {
    use sha2::Digest;
    agentmount::store::attachments::to_hex(&sha2::Sha256::digest(b))
}

/// What the label `name` names once its ingest is stored (a commit at release comes
/// after the close returns), and the store's bytes of that blob.
fn label_bytes(st: &Path, m: &Mount, name: &str) -> (String, Vec<u8>) {
    let p = m.p(&format!("attachments/{name}"));
    wait_until(Duration::from_secs(5), || {
        std::fs::symlink_metadata(&p).is_ok_and(|md| md.file_type().is_symlink())
    })
    .unwrap_or_else(|| panic!("{name} never became a label"));
    let hex = std::fs::read_link(&p)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let bytes = std::fs::read(st.join("attachments/sha256").join(&hex[..2]).join(&hex)).unwrap();
    (hex, bytes)
}

/// A shell's `>` opens, dup2s and closes the original before it writes: that first close
/// (a FLUSH with nothing written) must not store an empty blob under the name.
#[test]
fn shell_redirections_into_attachments_store_what_was_written() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    assert_eq!(
        sh_ok(
            "echo hello > attachments/new.txt && cat attachments/new.txt",
            m.path()
        ),
        "hello\n"
    );
    let (hex, bytes) = label_bytes(st.path(), &m, "new.txt");
    assert_eq!((hex, bytes), (sha_hex(b"hello\n"), b"hello\n".to_vec()));

    // A descriptor kept open across commands: the builtin echo writes, one close at the end.
    sh_ok(
        "exec 3>attachments/x; echo a >&3; echo b >&3; exec 3>&-",
        m.path(),
    );
    assert_eq!(label_bytes(st.path(), &m, "x").1, b"a\nb\n");
    // A child process writes and exits (its close is a FLUSH with bytes: stored), then the
    // next one writes on: a new ingest from the stored bytes, and the label moves to it.
    sh_ok(
        "exec 3>attachments/y; /bin/echo a >&3; cat attachments/y; /bin/echo b >&3; exec 3>&-",
        m.path(),
    );
    let (hex, bytes) = label_bytes(st.path(), &m, "y");
    assert_eq!(
        (hex.as_str(), &bytes[..]),
        (sha_hex(b"a\nb\n").as_str(), &b"a\nb\n"[..])
    );
    assert_eq!(std::fs::read(m.p("attachments/y")).unwrap(), b"a\nb\n");
    let sidecar = |h: &str| json(&m.p(&format!("attachments/{h}.json")));
    assert_eq!(sidecar(&hex)["label"], "y");
    assert_eq!(
        sidecar(&sha_hex(b"a\n")).get("label"),
        None,
        "one blob holds a label"
    );
    // python3: the same dance with os.dup/os.close, and a write after an fsync.
    let py = r#"
import os, sys
fd = os.open("attachments/p.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.close(os.dup(fd))
os.write(fd, b"py")
os.fsync(fd)
os.write(fd, b"thon\n")
os.close(fd)
print(open("attachments/p.txt").read(), end="")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(py)
        .current_dir(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "python\n");
    assert_eq!(label_bytes(st.path(), &m, "p.txt").1, b"python\n");

    // Files left empty are still empty attachments (stored at the release). Both are the
    // one empty blob, whose one label the newest write takes: checked one at a time.
    for (make, name) in [
        (": > attachments/empty", "empty"),
        ("touch attachments/e", "e"),
    ] {
        sh_ok(make, m.path());
        let (hex, bytes) = label_bytes(st.path(), &m, name);
        assert_eq!((hex, bytes.len()), (sha_hex(b""), 0), "{name}");
    }

    // cp still hears a refused ingest at its close.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("nope"), b"nope").unwrap();
    let o = sh(
        &format!("cp {}/nope attachments/{NOTES}", src.path().display()),
        m.path(),
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn cp_into_attachments_stores_bytes_by_hash_and_leaves_a_label() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let src = tempfile::tempdir().unwrap();
    // Past 4 MiB the hash runs on a helper thread and writeback starts early: 12 MB.
    let data: Vec<u8> = (0..12_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.path().join("big.bin"), &data).unwrap();
    sh_ok(
        &format!("cp {}/big.bin attachments/", src.path().display()),
        m.path(),
    );
    let hex = sh_ok("sha256sum < attachments/big.bin | cut -d' ' -f1", m.path())
        .trim()
        .to_string();
    let blob = st
        .path()
        .join("attachments/sha256")
        .join(&hex[..2])
        .join(&hex);
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    assert_eq!(
        std::fs::read_link(m.p("attachments/big.bin"))
            .unwrap()
            .to_str(),
        Some(hex.as_str())
    );
    assert!(
        std::fs::symlink_metadata(m.p("attachments/big.bin"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let meta = json(&m.p(&format!("attachments/{hex}.json")));
    assert_eq!(
        (meta["byte_len"].as_u64(), meta["label"].as_str()),
        (Some(12_000_000), Some("big.bin"))
    );
    // Identical bytes under another name: deduplicated, a second label, one blob.
    sh_ok(
        &format!("cp {}/big.bin attachments/copy.bin", src.path().display()),
        m.path(),
    );
    assert_eq!(
        std::fs::read_link(m.p("attachments/copy.bin"))
            .unwrap()
            .to_str(),
        Some(hex.as_str())
    );
    // rm of a label removes the name, not the bytes; mv renames the label.
    sh_ok(
        "mv attachments/copy.bin attachments/renamed.bin && rm attachments/renamed.bin",
        m.path(),
    );
    assert!(!m.p("attachments/renamed.bin").exists());
    assert!(blob.exists());
    // Labels survive a remount.
    drop(m);
    let m = Mount::new(st.path(), &[]);
    assert!(m.p("attachments/pixel.png").exists());
    assert_eq!(
        std::fs::read(m.p(&format!("attachments/{hex}")))
            .unwrap()
            .len(),
        data.len()
    );
}

/// `.gc` takes exactly its documented words: a blank line or a near miss deletes nothing.
#[test]
fn gc_refuses_a_blank_line_and_near_misses_and_deletes_nothing() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let blob = st.path().join("attachments/sha256/05").join(NOTES);
    for cmd in [
        "echo > .gc",
        "echo dryrun > .gc",
        "echo Run > .gc",
        "echo run now > .gc",
    ] {
        let o = sh(cmd, m.path());
        assert!(!o.status.success(), "`{cmd}` succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("Invalid argument"), "`{cmd}`: {err}");
        assert!(blob.exists(), "`{cmd}` deleted the orphan");
        assert!(m.p(&format!("attachments/{NOTES}")).exists());
    }
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    let last = errors.lines().last().unwrap_or_default();
    for word in ["`run`", "`dry-run`", "`grace=<seconds>`"] {
        assert!(last.contains(word), "the reason lists {word}: {last}");
    }
    // The documented words still work, with or without echo's newline.
    sh_ok("printf dry-run > .gc && echo dry-run > .gc", m.path());
    assert_eq!(json(&m.p(".gc"))["dry_run"], true);
    assert!(blob.exists());
}

#[test]
fn gc_control_file_reclaims_the_orphan_and_reports() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let bogus = sh("/bin/echo bogus > .gc", m.path());
    assert!(!bogus.status.success());
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("Invalid argument"));
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p(".gc"))
        .and_then(|mut f| f.write_all(b"bogus"));
    assert_eq!(errno_of(r), libc::EINVAL);
    sh_ok("echo dry-run > .gc", m.path());
    assert_eq!(json(&m.p(".gc"))["dry_run"], true);
    assert!(m.p(&format!("attachments/{NOTES}")).exists());
    sh_ok("echo run > .gc", m.path());
    let report = json(&m.p(".gc"));
    assert_eq!(report["reclaimed_ids"], json!([NOTES]));
    assert_eq!(
        (
            report["kept_referenced"].as_u64(),
            report["bytes_freed"].as_u64()
        ),
        (Some(1), Some(39))
    );
    assert!(!st.path().join("attachments/sha256/05").join(NOTES).exists());
    assert!(
        wait_until(Duration::from_secs(2), || !m
            .p(&format!("attachments/{NOTES}"))
            .exists())
        .is_some()
    );
    assert!(!m.p("attachments/notes.txt").exists());
    assert!(m.p("attachments/pixel.png").exists());
}

#[test]
fn read_only_mount_refuses_every_change_with_erofs() {
    let st = fixture_copy();
    let before = tree(st.path());
    let m = Mount::new(st.path(), &["--read-only"]);
    assert_eq!(json(&m.p("goals/g-1a2b3c4d.json"))["id"], "g-1a2b3c4d");
    assert_eq!(
        errno_of(std::fs::write(m.p("goals/g-1a2b3c4d.json"), b"{}")),
        libc::EROFS
    );
    assert_eq!(
        errno_of(std::fs::write(m.p("goals/g-00000001.json"), b"{}")),
        libc::EROFS
    );
    assert_eq!(
        errno_of(std::fs::remove_file(m.p("goals/g-1a2b3c4d.json"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(std::fs::rename(
            m.p("goals/g-1a2b3c4d.json"),
            m.p("goals/g-2.json")
        )),
        libc::EROFS
    );
    assert_eq!(
        errno_of(std::fs::write(m.p("attachments/new.txt"), b"x")),
        libc::EROFS
    );
    drop(m);
    assert_eq!(tree(st.path()), before);
}

#[test]
fn mount_refuses_bad_mountpoints_and_unmount_leaves_nothing_behind() {
    let st = fixture_copy();
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let missing = d.path().join("missing");
    let o = run(&[
        "mount",
        "--store",
        st.path().to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("does not exist"),
        "{err}"
    );
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = run(&[
        "mount",
        "--store",
        st.path().to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a directory"));
    let full = d.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let o = run(&[
        "mount",
        "--store",
        st.path().to_str().unwrap(),
        full.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
    let m = Mount::new(st.path(), &[]);
    let o = run(&[
        "mount",
        "--store",
        st.path().to_str().unwrap(),
        m.path().to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already mounted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let status = run(&["status", m.path().to_str().unwrap()]);
    assert!(status.status.success());
    let pid = serde_json::from_slice::<Value>(&status.stdout).unwrap()["pid"]
        .as_i64()
        .unwrap();
    let o = run(&["unmount", m.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(m.path().to_str().unwrap()),
        "no mount left behind"
    );
    assert!(
        wait_until(Duration::from_secs(5), || unsafe {
            libc::kill(pid as i32, 0)
        } != 0)
        .is_some(),
        "the daemon exits after unmount"
    );
}

#[test]
fn tree_tools_walk_the_mount_like_a_directory() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let out = tempfile::tempdir().unwrap();
    // tar must not see any file change under it (control files have stable size and mtime).
    let tar = sh(
        &format!("tar cf {}/a.tar .", out.path().display()),
        m.path(),
    );
    assert!(
        tar.status.success() && tar.stderr.is_empty(),
        "tar: {}",
        String::from_utf8_lossy(&tar.stderr)
    );
    let list = sh_ok(
        &format!("tar tf {}/a.tar | sort", out.path().display()),
        m.path(),
    );
    assert!(
        list.contains("./sessions/6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22.json")
            && list.contains("./attachments/pixel.png"),
        "{list}"
    );
    sh_ok(&format!("cp -r . {}/copy", out.path().display()), m.path());
    assert_eq!(
        json(&out.path().join("copy/goals/g-9f8e7d6c.json"))["status"],
        "done"
    );
    assert_eq!(
        std::fs::read(out.path().join("copy/attachments/pixel.png"))
            .unwrap()
            .len(),
        69
    );
    let found = sh_ok("find . -name '*.json' -path './goals/*' | sort", m.path());
    assert_eq!(found, "./goals/g-1a2b3c4d.json\n./goals/g-9f8e7d6c.json\n");
    sh_ok("du -s . && df . && stat sessions/*.json", m.path());
    let df = sh_ok("df --output=source . | tail -1", m.path());
    assert!(df.starts_with("agentmount:"), "{df}");
    let py = sh_ok(
        r#"python3 -c "
import os, json
n = 0
for root, dirs, files in os.walk('.'):
    for f in files:
        if f.endswith('.json') and not root.startswith('./attachments'):
            json.load(open(os.path.join(root, f))); n += 1
print(n)
""#,
        m.path(),
    );
    assert_eq!(py.trim(), "6");
}

#[test]
fn sigterm_unmounts_cleanly() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let pid = json(&m.p(".status"))["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        wait_until(Duration::from_secs(5), || !std::fs::read_to_string(
            "/proc/self/mountinfo"
        )
        .unwrap()
        .contains(m.path().to_str().unwrap()))
        .is_some()
    );
    assert!(
        wait_until(Duration::from_secs(5), || unsafe { libc::kill(pid, 0) }
            != 0)
        .is_some()
    );
}

/// `attachments/` is paged out of the index as the kernel asks: with thousands of blobs
/// every name comes exactly once, `ls -l` agrees with the store, and blobs, sidecars and
/// labels that another program adds or removes are seen at the next lookup.
#[test]
fn large_attachment_listings_page_every_name_once_and_follow_external_changes() {
    use sha2::Digest;
    let st = fixture_copy();
    let cas = st.path().join("attachments/sha256");
    let put = |bytes: &[u8], label: &str| {
        let hex = agentmount::store::attachments::to_hex(&sha2::Sha256::digest(bytes));
        let dir = cas.join(&hex[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&hex), bytes).unwrap();
        let meta = json!({"id": hex, "media_type": {"kind": "file", "type": "text/plain"},
            "byte_len": bytes.len(), "label": label});
        std::fs::write(
            dir.join(format!("{hex}.json")),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        hex
    };
    let n = 3000;
    for i in 0..n {
        put(format!("blob {i}").as_bytes(), &format!("b{i}.txt"));
    }
    let m = Mount::new(st.path(), &[]);
    // Every name once: 2 fixture blobs and the new ones, each with a sidecar and a label.
    let names = sh_ok("ls -f attachments", m.path());
    let mut names: Vec<&str> = names.lines().filter(|l| *l != "." && *l != "..").collect();
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!((total, names.len()), (3 * (n + 2), 3 * (n + 2)));
    // ls -l: sizes from the index, labels as symlinks to their blob.
    let long = sh_ok("ls -l attachments | grep -c '^l.* b1234.txt -> '", m.path());
    assert_eq!(long.trim(), "1");
    assert_eq!(
        std::fs::read(m.p("attachments/b1234.txt")).unwrap(),
        b"blob 1234"
    );
    // Another program adds a blob: its bytes, sidecar and label are there at once.
    let hex = put(b"from outside", "outside.txt");
    assert_eq!(
        std::fs::read(m.p("attachments/outside.txt")).unwrap(),
        b"from outside"
    );
    assert_eq!(
        std::fs::metadata(m.p(&format!("attachments/{hex}")))
            .unwrap()
            .len(),
        12
    );
    let attr = sh_ok(
        "getfattr --only-values -n user.label attachments/outside.txt",
        m.path(),
    );
    assert_eq!(attr, "outside.txt");
    // ... and takes it away again: gone at the next lookup.
    std::fs::remove_file(cas.join(&hex[..2]).join(&hex)).unwrap();
    std::fs::remove_file(cas.join(&hex[..2]).join(format!("{hex}.json"))).unwrap();
    wait_until(Duration::from_secs(3), || {
        !m.p("attachments/outside.txt").exists() && !m.p(&format!("attachments/{hex}")).exists()
    })
    .expect("an attachment removed outside stayed visible");
    let s = json(&m.p(".status"));
    assert_eq!(s["attachment_index"], "inotify");
    // As root on this kernel, attachment bytes are read by the kernel from the store file.
    let path = s["data_path"]["attachments"].as_str().unwrap();
    assert!(path.starts_with("passthrough"), "{path}");
    assert_eq!(s["counts"]["attachments"], n + 2);
}

/// `--no-xattr` trades the attachments' xattrs for `ls -l` speed: extended-attribute calls
/// get "not supported" (so the kernel stops forwarding them), everything else is the same.
#[test]
fn no_xattr_mounts_answer_attribute_calls_not_supported() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &["--no-xattr"]);
    let out = sh("getfattr -n user.sha256 attachments/pixel.png", m.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = sh_ok("ls -l sessions attachments | wc -l", m.path());
    assert!(listed.trim().parse::<u32>().unwrap() >= 9, "{listed}");
    assert_eq!(
        std::fs::read(m.p("attachments/pixel.png")).unwrap().len(),
        69
    );
    assert_eq!(json(&m.p(".status"))["xattrs"], false);
}

/// The daemon serving a mountpoint (its command line names it).
fn daemon_pid(m: &Mount) -> u32 {
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(m.path())
        .output()
        .unwrap();
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "one daemon for {}: {pids:?}",
        m.path().display()
    );
    pids[0]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Scratch files keep their bytes on disk in the state dir: `mv X.json X.json.bak` loses
/// nothing at unmount, and moving it back restores the record, with or without the
/// journal; a read-only mount shows them and makes none.
#[test]
fn scratch_files_are_on_disk_and_survive_a_remount() {
    use std::os::unix::fs::PermissionsExt;
    let st = fixture_copy();
    let goal = "goals/g-1a2b3c4d.json";
    let before;
    {
        let m = Mount::new(st.path(), &[]);
        before = std::fs::read(m.p(goal)).unwrap();
        sh_ok(&format!("mv {goal} {goal}.bak"), m.path());
        assert!(!m.p(goal).exists());
        assert!(
            !json(&st.path().join("sm/goals.json"))
                .to_string()
                .contains("g-1a2b3c4d")
        );
        assert_eq!(std::fs::read(m.p(&format!("{goal}.bak"))).unwrap(), before);
        // python3 writes a swap file; its mode is the file's own.
        let py = "import os\nwith open('goals/.g.swp', 'wb') as f:\n    f.write(b'swap' * 1000)\nos.chmod('goals/.g.swp', 0o600)\n";
        let o = Command::new("python3")
            .arg("-c")
            .arg(py)
            .current_dir(m.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::metadata(m.p("goals/.g.swp"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    let scratch = st.path().join(".agentmount/scratch");
    let on_disk = scratch.join("goals/g-1a2b3c4d.json.bak");
    assert_eq!(std::fs::read(&on_disk).unwrap(), before);
    for d in [&scratch, &scratch.join("goals")] {
        assert_eq!(
            std::fs::metadata(d).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
    // Read-only: shown, not made.
    {
        let m = Mount::new(st.path(), &["--read-only"]);
        let ls = sh_ok("ls -a goals/", m.path());
        assert!(
            ls.contains("g-1a2b3c4d.json.bak") && ls.contains(".g.swp"),
            "{ls}"
        );
        let o = sh("echo x > goals/new.tmp", m.path());
        assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only file system"));
    }
    // Without the journal too.
    let m = Mount::new(st.path(), &["--no-journal"]);
    let ls = sh_ok("ls -a goals/", m.path());
    assert!(
        ls.contains("g-1a2b3c4d.json.bak") && ls.contains(".g.swp"),
        "{ls}"
    );
    assert!(!ls.contains("g-1a2b3c4d.json\n"), "{ls}");
    assert_eq!(
        std::fs::read(m.p("goals/.g.swp")).unwrap(),
        b"swap".repeat(1000)
    );
    sh_ok(&format!("mv {goal}.bak {goal}"), m.path());
    assert_eq!(std::fs::read(m.p(goal)).unwrap(), before);
    assert!(
        json(&st.path().join("sm/goals.json"))
            .to_string()
            .contains("g-1a2b3c4d")
    );
    assert!(!m.p(&format!("{goal}.bak")).exists());
    assert!(!on_disk.exists());
    // A descriptor open on a scratch file keeps its bytes after unlink (nlink 0).
    let py = "import os\nf = open('goals/.g.swp', 'rb')\nos.unlink('goals/.g.swp')\nassert not os.path.exists('goals/.g.swp')\nassert os.fstat(f.fileno()).st_nlink == 0\nprint(len(f.read()))\n";
    let o = Command::new("python3")
        .arg("-c")
        .arg(py)
        .current_dir(m.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "4000");
    assert!(!scratch.join("goals/.g.swp").exists());
}

/// A huge scratch file costs the daemon no memory (its bytes are on disk), and one past
/// --max-scratch-bytes is EFBIG.
#[test]
fn scratch_files_cost_no_memory_and_stop_at_their_limit() {
    let st = fixture_copy();
    {
        let m = Mount::new(st.path(), &["--max-scratch-bytes", "3G"]);
        let pid = daemon_pid(&m);
        let rss0 = rss_kib(pid);
        sh_ok(
            "truncate -s 2G goals/big.tmp && dd if=/dev/urandom of=goals/big.tmp bs=1M count=16 seek=100 conv=notrunc status=none",
            m.path(),
        );
        assert_eq!(
            std::fs::metadata(m.p("goals/big.tmp")).unwrap().len(),
            2 << 30
        );
        let rss1 = rss_kib(pid);
        assert!(
            rss1 < rss0 + 100 * 1024,
            "daemon RSS grew from {rss0} kB to {rss1} kB"
        );
        sh_ok("rm goals/big.tmp", m.path());
    }
    let m = Mount::new(st.path(), &["--max-scratch-bytes", "1M"]);
    let o = sh("truncate -s 2M goals/t.tmp", m.path());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("File too large"));
    let o = sh("head -c 1048577 /dev/zero > goals/w.tmp", m.path());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("File too large"),
        "{o:?}"
    );
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert!(errors.contains("--max-scratch-bytes"), "{errors}");
    // Up to the limit is fine.
    sh_ok("head -c 1048576 /dev/zero > goals/w.tmp", m.path());
    assert_eq!(
        std::fs::metadata(m.p("goals/w.tmp")).unwrap().len(),
        1 << 20
    );
}

/// The state dir of a directory store lies inside the store, which is untrusted: a
/// planted symlink, FIFO or hard link among the scratch files is never opened or followed.
#[test]
fn planted_links_among_scratch_files_are_never_followed() {
    use std::os::unix::fs::symlink;
    let st = fixture_copy();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let dir = st.path().join(".agentmount/scratch/goals");
    std::fs::create_dir_all(&dir).unwrap();
    symlink(&victim, dir.join("evil.txt")).unwrap();
    std::fs::hard_link(&victim, dir.join("hard.txt")).unwrap();
    sh_ok(
        &format!("mkfifo {}", dir.join("fifo.txt").display()),
        st.path(),
    );
    std::fs::write(dir.join("fine.txt"), b"fine").unwrap();
    let m = Mount::new(st.path(), &[]);
    let ls = sh_ok("ls goals/", m.path());
    assert!(ls.contains("fine.txt"), "{ls}");
    for n in ["evil.txt", "hard.txt", "fifo.txt"] {
        assert!(!ls.contains(n), "{n} listed: {ls}");
    }
    sh_ok(
        "echo new > goals/evil.txt && echo new > goals/hard.txt",
        m.path(),
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert_eq!(std::fs::read(m.p("goals/evil.txt")).unwrap(), b"new\n");
    drop(m);
    // The scratch directory itself planted as a symlink: not used, the mount still serves.
    let st = fixture_copy();
    std::fs::create_dir_all(st.path().join(".agentmount")).unwrap();
    symlink(outside.path(), st.path().join(".agentmount/scratch")).unwrap();
    let m = Mount::new(st.path(), &[]);
    let o = sh("echo x > goals/x.tmp", m.path());
    assert!(!o.status.success());
    assert!(std::fs::read(m.p("goals/g-1a2b3c4d.json")).is_ok());
    assert!(!outside.path().join("goals").exists());
}
