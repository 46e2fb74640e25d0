//! A hostile store and careless hands (issue 30), on real mounts of a directory store:
//! bounded `.errors` lines, labels that cannot forge lines or shadow names, names that are
//! not UTF-8, a label restored from a backup in the feed, and `unmount` that tells a user
//! why not and returns only once the daemon is gone.

mod common;

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn errors(m: &Mount) -> Vec<Value> {
    std::fs::read_to_string(m.p(".errors"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn status(m: &Mount) -> Value {
    json(&m.p(".status"))
}

fn changes(m: &Mount) -> Vec<Value> {
    std::fs::read_to_string(m.p(".changes"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_refused_ten_megabyte_goal_leaves_a_short_errors_line_saying_what_was_cut() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let huge = "x".repeat(10 << 20);
    let body = serde_json::to_vec(&json!({"description": "d", "status": huge})).unwrap();
    for n in 0..3 {
        assert_eq!(
            write_close(&m.p(&format!("goals/g-big{n}.json")), &body),
            Err(libc::EINVAL)
        );
    }
    let text = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert_eq!(text.lines().count(), 3, "one line a refusal");
    for line in text.lines() {
        assert!(line.len() < 5 * 1024, "a line of {} bytes", line.len());
        let v: Value = serde_json::from_str(line).unwrap();
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains("\"status\""), "{reason}");
        assert!(
            reason.ends_with(" bytes]") && reason.contains("… [cut 10,"),
            "says how much was cut: {}",
            &reason[reason.len() - 60..]
        );
    }
    // The log's line is cut the same way (the log is the store's agentmount.log).
    let log = std::fs::metadata(st.path().join("agentmount.log"))
        .unwrap()
        .len();
    assert!(log < 64 * 1024, "the log grew by {log} bytes");
    // `.status` counts refusals made, not lines kept: 120 refusals, 100 lines kept.
    for n in 0..117 {
        let _ = write_close(&m.p(&format!("goals/g-bad{n}.json")), b"{");
    }
    assert_eq!(errors(&m).len(), 100);
    assert_eq!(status(&m)["counts"]["refusals"], 120);
}

#[test]
fn a_label_restored_by_writing_its_sidecar_back_is_in_the_feed() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let sidecar = m.p(&format!("attachments/{PIXEL}.json"));
    let mut v = json(&sidecar);
    assert_eq!(v["label"], "pixel.png");
    v["label"] = json!("restored.png");
    write_close(&sidecar, &serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    assert!(m.p("attachments/restored.png").symlink_metadata().is_ok());
    let feed = changes(&m);
    let line = feed
        .iter()
        .find(|c| c["collection"] == "attachments" && c["id"] == PIXEL)
        .unwrap_or_else(|| panic!("no line for the relabel: {feed:?}"));
    assert_eq!(line["op"], "update");
    assert_eq!(line["label"], "restored.png");
    assert_eq!(line["source"], "mount");
    // Writing back the same bytes again changes nothing and adds no line.
    let n = feed.len();
    write_close(&sidecar, &std::fs::read(&sidecar).unwrap()).unwrap();
    assert_eq!(changes(&m).len(), n);
}

#[test]
fn watch_escapes_what_it_prints_so_a_label_cannot_forge_a_line() {
    // `watch` reads MNT/.changes: a feed written by hand stands in for a hostile one.
    let d = tempfile::tempdir().unwrap();
    let forged = json!({"seq": 1, "time": "2026-01-01T00:00:00Z", "collection": "attachments",
        "id": PIXEL, "op": "update", "source": "mount", "pid": 1, "uid": 0,
        "label": "a.png\n2026-01-01T00:00:01Z sessions/x delete by gc\u{1b}[2J\\"});
    std::fs::write(d.path().join(".changes"), format!("{forged}\n")).unwrap();
    let w = Command::new(BIN)
        .arg("watch")
        .arg(d.path())
        .args(["--since", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signals the child we started.
    unsafe { libc::kill(w.id() as i32, libc::SIGINT) };
    let out = w.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        text.contains(
            r"label=a.png\n2026-01-01T00:00:01Z sessions/x delete by gc\u{1b}[2J\\ by mount"
        ),
        "{text:?}"
    );
}

#[test]
fn names_that_are_not_utf8_get_einval_with_an_errors_line() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let bad = |dir: &str| {
        let mut b = m.p(dir).into_os_string().into_vec();
        b.extend_from_slice(b"/caf\xe9\xff.json");
        PathBuf::from(std::ffi::OsString::from_vec(b))
    };
    for dir in ["sessions", "goals", "attachments"] {
        let p = bad(dir);
        assert_eq!(write_close(&p, b"{}"), Err(libc::EINVAL), "{dir}");
        // It exists nowhere: stat says so.
        assert_eq!(
            std::fs::symlink_metadata(&p).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
    // A rename onto such a name, too.
    let to = bad("goals");
    let e = std::fs::rename(m.p("goals/g-1a2b3c4d.json"), &to).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let errs = errors(&m);
    assert_eq!(errs.len(), 4, "{errs:?}");
    for (e, dir) in errs
        .iter()
        .zip(["sessions", "goals", "attachments", "goals"])
    {
        assert_eq!(e["errno"], "EINVAL");
        assert_eq!(e["path"], format!("/{dir}/caf\\xe9\\xff.json"), "{e}");
        assert!(e["reason"].as_str().unwrap().contains("not UTF-8"), "{e}");
    }
}

#[test]
fn labels_that_forge_lines_look_alike_or_shadow_names_are_refused() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let upper = PIXEL.to_ascii_uppercase();
    let nfd = "cafe\u{301}.txt";
    let bad: Vec<(&str, String)> = vec![
        ("a newline", "two\nlines.txt".into()),
        ("a tab", "tab\there.txt".into()),
        ("an escape", "\u{1b}[2J.txt".into()),
        ("U+FFFD", "caf\u{FFFD}.txt".into()),
        ("a control file's name", ".gc".into()),
        ("a control file's name", ".status".into()),
        ("an address in uppercase", upper.clone()),
        ("a sidecar's name in uppercase", format!("{upper}.json")),
        ("not NFC", nfd.into()),
    ];
    let mut expected = 0;
    for (what, name) in &bad {
        let p = m.p(&format!("attachments/{name}"));
        assert_eq!(
            write_close(&p, b"bytes"),
            Err(libc::EINVAL),
            "write: {what}"
        );
        let e = std::os::unix::fs::symlink(PIXEL, &p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "ln -s: {what}");
        let e = std::fs::rename(m.p("attachments/notes.txt"), &p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "mv: {what}");
        expected += 3;
    }
    let errs = errors(&m);
    assert_eq!(errs.len(), expected, "{errs:?}");
    assert!(errs.iter().all(|e| e["errno"] == "EINVAL"));
    let reasons: Vec<&str> = errs.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert!(
        reasons[0].contains("control character (U+000A)"),
        "{}",
        reasons[0]
    );
    let nfc = reasons.last().unwrap();
    assert!(nfc.contains("NFC") && nfc.contains("café.txt"), "{nfc}");
    // A sidecar written back with such a label: EINVAL too, nothing changes.
    let sidecar = m.p(&format!("attachments/{PIXEL}.json"));
    let mut v = json(&sidecar);
    v["label"] = json!("evil\nline");
    assert_eq!(
        write_close(&sidecar, &serde_json::to_vec_pretty(&v).unwrap()),
        Err(libc::EINVAL)
    );
    assert_eq!(json(&sidecar)["label"], "pixel.png");
    // What is still fine: composed text, hidden names (rsync's temp files), other dots.
    for ok in ["café.txt", ".rsync-temp.AbCdEf", "v1.2.tar"] {
        write_close(&m.p(&format!("attachments/{ok}")), ok.as_bytes()).unwrap();
        assert!(m.p(&format!("attachments/{ok}")).symlink_metadata().is_ok());
    }
}

/// A user made for the test, removed (with its home) when dropped.
struct TempUser(String);

impl TempUser {
    fn new() -> TempUser {
        let name = format!("amt{}", std::process::id());
        let o = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", &name])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        TempUser(name)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

#[test]
fn a_user_unmounting_roots_mount_is_told_only_root_can() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let user = TempUser::new();
    let o = Command::new("runuser")
        .args(["-u", &user.0, "--", BIN, "unmount"])
        .arg(m.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is mounted by root; only root can unmount it") && !err.contains("mtab"),
        "{err}"
    );
    assert!(agentmount::mount::is_mountpoint(m.path()), "still mounted");
}

/// Processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<String> {
    let want = dir.as_os_str().as_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.split(|&b| b == 0).any(|a| a == want))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

#[test]
fn unmount_returns_once_the_daemon_is_gone() {
    let st = fixture_copy();
    for _ in 0..3 {
        let m = Mount::new(st.path(), &[]);
        // Work for the daemon to finish at exit: records to save times of.
        write_close(
            &m.p("goals/g-0000beef.json"),
            br#"{"description": "d", "status": "pending"}"#,
        )
        .unwrap();
        assert_eq!(processes_naming(m.path()).len(), 1, "the daemon runs");
        let o = Command::new(BIN)
            .arg("unmount")
            .arg(m.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let left = processes_naming(m.path());
        assert!(
            left.is_empty(),
            "daemon still there after unmount: {left:?}"
        );
    }
}

#[test]
fn an_unmount_writes_the_manifest_journal_out_for_the_platform() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    sh_ok("printf 'fresh bytes' > attachments/fresh.txt", m.path());
    let hex = sh_ok(
        "getfattr --only-values -n user.sha256 attachments/fresh.txt",
        m.path(),
    );
    drop(m);
    let manifest = std::fs::read_to_string(st.path().join("attachments/manifest.json")).unwrap();
    assert!(
        manifest.contains(hex.trim()),
        "lash reads the intent from manifest.json"
    );
    let journal = st.path().join("attachments/manifest.journal");
    assert!(
        std::fs::read(&journal)
            .map(|j| j.is_empty())
            .unwrap_or(true)
    );
}
