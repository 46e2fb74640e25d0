//! The defaults a newcomer trusts: each test does what a new user did and asserts what
//! they should have seen (issue "The defaults a newcomer trusts").

mod common;

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn store_files(store: &Path) -> Vec<(String, Vec<u8>, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for (p, bytes) in tree(store) {
        let m = std::fs::metadata(store.join(&p)).unwrap();
        out.push((
            p.display().to_string(),
            bytes,
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
        ));
    }
    out
}

#[test]
fn a_mistyped_store_is_refused_naming_it_and_nothing_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let typo = tmp.path().join("agnets");
    let mp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["mount", "--store"])
        .arg(&typo)
        .arg(mp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&typo.display().to_string()) && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        err.contains("--create"),
        "says how to start a new store: {err}"
    );
    assert!(!typo.exists(), "nothing created");
    assert!(!agentmount::mount::is_mountpoint(mp.path()));
    // The same through $AGENTMOUNT_STORE, and for gc and fsck.
    let o = Command::new(BIN)
        .args(["fsck"])
        .env("AGENTMOUNT_STORE", &typo)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("AGENTMOUNT_STORE"));
    let o = run(&["gc", "--dry-run", "--store", &typo.display().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!typo.exists());
    // --create starts a new store there.
    let m = Mount::new(&typo, &["--create"]);
    assert!(typo.is_dir());
    std::fs::write(
        m.p("goals/g-00000001.json"),
        br#"{"description": "first", "status": "pending"}"#,
    )
    .unwrap();
    assert!(typo.join("sm/goals.json").exists());
}

#[test]
fn gc_says_plainly_that_every_command_but_dry_run_deletes() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let usage = std::fs::read_to_string(m.p(".gc")).unwrap();
    assert!(
        usage.contains("dry-run") && usage.contains("deletes nothing"),
        "{usage}"
    );
    assert!(usage.contains("DELETES"), "{usage}");
    assert!(usage.contains("grace=0"), "{usage}");
    assert!(
        usage.find("dry-run").unwrap() < usage.find("DELETES").unwrap(),
        "dry-run shown first: {usage}"
    );
    let help = String::from_utf8_lossy(&run(&["gc", "--help"]).stdout).into_owned();
    assert!(
        help.contains("DELETE") && help.contains("--dry-run"),
        "{help}"
    );
    // A bad command says which ones delete.
    let e = std::fs::write(m.p(".gc"), b"purge").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert!(errors.contains("deletes nothing"), "{errors}");
}

/// `cp -a` and `rsync -a` of a backup of attachments/ back into the mount succeed and
/// change nothing; into an empty store they restore it byte for byte.
#[test]
fn restoring_a_backup_of_attachments_succeeds_and_changes_nothing() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let backup = tempfile::tempdir().unwrap();
    let bk = backup.path().join("attachments");
    sh_ok(&format!("cp -a attachments {}", bk.display()), m.path());
    let before = store_files(st.path());
    sh_ok(&format!("cp -a {}/. attachments/", bk.display()), m.path());
    assert_eq!(
        store_files(st.path()),
        before,
        "cp -a changed nothing (bytes and mtimes)"
    );
    sh_ok(
        &format!("rsync -a {}/ attachments/", bk.display()),
        m.path(),
    );
    assert_eq!(store_files(st.path()), before, "rsync -a changed nothing");
    let o = sh(
        &format!(
            "rsync -a --dry-run --itemize-changes {}/ attachments/",
            bk.display()
        ),
        m.path(),
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .lines()
            .all(|l| l.starts_with(".d")),
        "rsync sees nothing to send: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Bytes that do not hash to the name they are written to: EPERM at close, nothing stored.
    assert_eq!(
        write_close(&m.p(&format!("attachments/{NOTES}")), b"nope"),
        Err(libc::EPERM)
    );
    // A sidecar that says something else about the bytes: EPERM.
    let side = std::fs::read_to_string(m.p(&format!("attachments/{NOTES}.json"))).unwrap();
    assert_eq!(
        write_close(
            &m.p(&format!("attachments/{NOTES}.json")),
            side.replace("39", "40").as_bytes()
        ),
        Err(libc::EPERM)
    );
    assert_eq!(store_files(st.path()), before);
    // ln -s labels an existing blob; a target that is not a blob's name is refused.
    sh_ok(&format!("ln -s {PIXEL} attachments/again.png"), m.path());
    assert_eq!(
        std::fs::read_link(m.p("attachments/again.png")).unwrap(),
        Path::new(PIXEL)
    );
    let o = sh("ln -s /etc/passwd attachments/evil", m.path());
    assert!(!o.status.success());
    drop(m);

    // Into an empty store: the same files, byte for byte. A sidecar or label needs its
    // bytes first (cp -a copies in the backup directory's order), so bytes go first.
    let empty = tempfile::tempdir().unwrap();
    let m = Mount::new(empty.path(), &[]);
    sh_ok(
        &format!(
            "cp -a {0}/{NOTES} {0}/{PIXEL} attachments/ && cp -a {0}/. attachments/",
            bk.display()
        ),
        m.path(),
    );
    let shown = sh_ok("ls attachments", m.path());
    assert!(
        shown.contains("notes.txt") && shown.contains("pixel.png"),
        "{shown}"
    );
    for hex in [NOTES, PIXEL] {
        for name in [hex.to_string(), format!("{hex}.json")] {
            assert_eq!(
                std::fs::read(m.p(&format!("attachments/{name}"))).unwrap(),
                std::fs::read(bk.join(&name)).unwrap(),
                "{name} restored byte for byte"
            );
        }
    }
}

#[test]
fn a_refused_write_reports_the_same_errno_at_close_and_commits_nothing() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let before = tree(st.path());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p(&format!("sessions/{S_ACTIVE}.json")))
        .unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut refused = None;
    for _ in 0..17 {
        if let Err(e) = f.write_all(&chunk) {
            refused = e.raw_os_error();
            break;
        }
    }
    assert_eq!(refused, Some(libc::EFBIG), "the write over 16 MiB");
    let fd = f.into_raw_fd();
    let rc = unsafe { libc::close(fd) };
    let close_errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!(rc, -1);
    assert_eq!(
        close_errno,
        Some(libc::EFBIG),
        "close reports the same errno"
    );
    assert_eq!(tree(st.path()), before, "nothing committed");
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert!(
        !errors.contains("EINVAL"),
        "no second, different refusal: {errors}"
    );
}

#[test]
fn the_python_example_cleans_up_after_a_refusal_and_its_help_exits_0() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let ex = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/agent_state.py"
    );
    let o = Command::new("python3")
        .arg(ex)
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("set-progress"));
    // progress is 0-100: 500 is refused by the mount.
    let o = Command::new("python3")
        .arg(ex)
        .arg(m.path())
        .args(["set-progress", "g-1a2b3c4d", "500"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(".errors"));
    let left = sh_ok("ls -a goals", m.path());
    assert!(!left.contains(".tmp"), "no scratch file left: {left}");
}

#[test]
fn no_colour_codes_in_pipes_or_the_log_and_no_warning_at_a_clean_unmount() {
    let st = fixture_copy();
    // A stray temp file makes fsck log a line.
    std::fs::write(st.path().join("sm/.goals.json.agentmount-tmp-1-1"), b"x").unwrap();
    let o = Command::new(BIN)
        .args(["fsck", "--store"])
        .arg(st.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let all = [o.stdout, o.stderr].concat();
    assert!(
        !all.contains(&0x1b),
        "no ANSI escapes: {}",
        String::from_utf8_lossy(&all)
    );
    let m = Mount::new(st.path(), &[]);
    let _ = std::fs::read(m.p("sessions").join(format!("{S_ACTIVE}.json")));
    drop(m);
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read(st.path().join("agentmount.log")).unwrap();
    assert!(!log.contains(&0x1b), "no ANSI escapes in the log");
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("unmounted"), "{log}");
    assert!(
        !log.contains("WARN"),
        "a clean unmount warns of nothing: {log}"
    );
}

#[test]
fn status_says_not_tried_yet_and_its_size_is_what_a_read_returns() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let s = json(&m.p(".status"));
    let path = s["data_path"]["attachments"].as_str().unwrap().to_string();
    assert!(
        path.contains("not tried yet") || path.starts_with("page cache"),
        "before any attachment is opened: {path}"
    );
    std::fs::read(m.p(&format!("attachments/{PIXEL}"))).unwrap();
    let s = json(&m.p(".status"));
    let path = s["data_path"]["attachments"].as_str().unwrap();
    assert!(
        !path.contains("not tried yet"),
        "after a read it is known: {path}"
    );
    // stat's size is the size a read returns, so tar archives what cat shows.
    let size = std::fs::metadata(m.p(".status")).unwrap().len();
    let bytes = std::fs::read(m.p(".status")).unwrap();
    assert!(size > 0);
    assert_eq!(size, bytes.len() as u64);
    let out = tempfile::tempdir().unwrap();
    sh_ok(
        &format!(
            "tar -cf {0}/s.tar .status && tar -xf {0}/s.tar -C {0}",
            out.path().display()
        ),
        m.path(),
    );
    let archived = std::fs::read(out.path().join(".status")).unwrap();
    assert!(!archived.is_empty());
    serde_json::from_slice::<serde_json::Value>(&archived).expect("tar archived whole JSON");
}

#[test]
fn every_subcommand_has_a_man_page_and_mounts_lists_options_and_errnos() {
    let page = String::from_utf8_lossy(&run(&["man", "mount"]).stdout).into_owned();
    for want in [
        "agentmount\\-mount",
        "\\-\\-store",
        "fstab",
        "EAGAIN",
        "EXDEV",
        "lock_timeout",
    ] {
        assert!(page.contains(want), "man mount has {want}");
    }
    for sub in ["unmount", "gc", "fsck", "status"] {
        let o = run(&["man", sub]);
        assert!(o.status.success(), "man {sub}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("agentmount\\-{sub}")));
    }
    assert_eq!(run(&["man", "nosuch"]).status.code(), Some(2));
}
