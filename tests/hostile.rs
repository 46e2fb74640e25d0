//! A hostile store: whoever can write the store must not make the daemon (often root) read
//! or write anything outside it, wedge it, or show a private store to other users.
//! Everything here runs on a real mount, the daemon as root, the store planted by hand.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const USER: &str = "agentmount-hostile";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn ensure_user() {
    let exists = Command::new("id")
        .arg(USER)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        let o = Command::new("useradd")
            .args(["--system", "--no-create-home", USER])
            .output()
            .unwrap();
        assert!(
            o.status.success() || String::from_utf8_lossy(&o.stderr).contains("exists"),
            "useradd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn as_user(script: &str) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "bash", "-c", script])
        .current_dir("/")
        .output()
        .unwrap()
}

fn uid_of(user: &str) -> u32 {
    let o = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// A temp dir others may traverse, holding a fixture store and a root-only secret.
fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = d.path().join("store");
    copy_dir(Path::new(FIXTURE), &store);
    let secret = d.path().join("secret.json");
    std::fs::write(&secret, br#"{"secret": "root only"}"#).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    (d, store, secret)
}

fn errors(m: &Mount) -> String {
    std::fs::read_to_string(m.p(".errors")).unwrap()
}

#[test]
fn symlinks_fifos_and_devices_planted_as_records_are_skipped_not_followed() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    ensure_user();
    let (_d, store, secret) = setup();
    let sm = store.join("sm");
    std::os::unix::fs::symlink(&secret, sm.join("conversation-leak.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", sm.join("conversation-zero.json")).unwrap();
    sh_ok("mkfifo conversation-fifo.json", &sm);

    // The FIFO never blocks the mount, the watcher or a listing.
    let t0 = Instant::now();
    let m = Mount::new(&store, &["--allow-other"]);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let names = sh_ok("ls conversations", m.path());
    assert_eq!(
        names.trim(),
        "login-flake.json",
        "only the real conversation"
    );
    assert!(std::fs::read(m.p("conversations/leak.json")).is_err());
    let o = as_user(&format!("cat {}", m.p("conversations/leak.json").display()));
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("root only"));

    let errs = errors(&m);
    for name in ["conversation-leak.json", "conversation-zero.json"] {
        assert!(
            errs.lines()
                .any(|l| l.contains(name) && l.contains("symbolic link") && l.contains("\"skip\"")),
            "{name} reported in .errors: {errs}"
        );
    }
    assert!(errs.contains("is a FIFO"), "{errs}");
    let status = json(&m.p(".status"));
    assert!(status["untrusted_entries"]["skipped"].as_u64().unwrap() >= 3);

    // A write to a planted name never writes through it.
    assert!(write_close(&m.p("conversations/leak.json"), br#"{"total_rounds": 1}"#).is_err());
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        br#"{"secret": "root only"}"#
    );
    assert!(
        std::fs::symlink_metadata(sm.join("conversation-leak.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_store_file_or_directory_swapped_for_a_symlink_is_never_read_or_written_through() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (d, store, _secret) = setup();
    // sessions.json -> another store's sessions; sm/ -> a directory outside the store.
    let other = d.path().join("other-sessions.json");
    std::fs::rename(store.join("session-manager/sessions.json"), &other).unwrap();
    std::os::unix::fs::symlink(&other, store.join("session-manager/sessions.json")).unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::rename(store.join("sm"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.join("sm")).unwrap();
    let before_other = std::fs::read(&other).unwrap();
    let before_elsewhere = tree(&elsewhere);

    let m = Mount::new(&store, &[]);
    assert_eq!(sh_ok("ls sessions | wc -l", m.path()).trim(), "0");
    assert_eq!(sh_ok("ls goals | wc -l", m.path()).trim(), "0");
    let e = write_close(
        &m.p("goals/g-0000beef.json"),
        br#"{"description": "x", "status": "pending"}"#,
    );
    assert_eq!(e, Err(libc::EIO), "{}", errors(&m));
    let e = write_close(
        &m.p(&format!("sessions/{S_FUTURE}.json")),
        br#"{"tmux_name": "x", "cwd": "/", "task": "t", "state": "active", "created_at": "2026-01-01T00:00:00Z"}"#,
    );
    assert_eq!(e, Err(libc::EIO), "{}", errors(&m));
    assert!(errors(&m).contains("symbolic link"));
    drop(m);
    assert_eq!(std::fs::read(&other).unwrap(), before_other);
    assert_eq!(tree(&elsewhere), before_elsewhere);
}

#[test]
fn blobs_are_served_only_as_regular_files_whose_bytes_hash_to_their_name() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (_d, store, secret) = setup();
    let shard = |hex: &str| store.join("attachments/sha256").join(&hex[..2]).join(hex);
    // The pixel's bytes become a symlink to the secret (its sidecar and label stay); the
    // notes' bytes are tampered with in place.
    std::fs::remove_file(shard(PIXEL)).unwrap();
    std::os::unix::fs::symlink(&secret, shard(PIXEL)).unwrap();
    std::fs::write(shard(NOTES), b"tampered").unwrap();

    let m = Mount::new(&store, &["--allow-other"]);
    let ls = sh_ok("ls attachments", m.path());
    assert!(!ls.contains(PIXEL), "a symlinked blob is not listed: {ls}");
    assert!(!ls.contains("pixel.png"), "nor its label: {ls}");
    assert!(std::fs::read(m.p("attachments/pixel.png")).is_err());
    let e = std::fs::read(m.p("attachments/notes.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let errs = errors(&m);
    assert!(errs.contains("does not hash to its name"), "{errs}");
    assert!(
        errs.contains(PIXEL) && errs.contains("symbolic link"),
        "{errs}"
    );

    // Writing the real bytes back heals it: the put by address replaces the planted entry.
    let pixel =
        std::fs::read(Path::new(FIXTURE).join("attachments/sha256/b1").join(PIXEL)).unwrap();
    write_close(&m.p(&format!("attachments/{PIXEL}")), &pixel).unwrap();
    assert_eq!(
        std::fs::read(m.p(&format!("attachments/{PIXEL}"))).unwrap(),
        pixel
    );
    assert!(std::fs::symlink_metadata(shard(PIXEL)).unwrap().is_file());
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        br#"{"secret": "root only"}"#
    );
}

#[test]
fn the_daemons_own_files_are_never_reached_through_symlinks() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (d, store, secret) = setup();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"root's file\n").unwrap();

    // The log: the mount refuses, naming it, and never appends to what it points at.
    std::os::unix::fs::symlink(&victim, store.join("agentmount.log")).unwrap();
    let mp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["mount", "--store"])
        .arg(&store)
        .arg(mp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("agentmount.log") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file\n");
    std::fs::remove_file(store.join("agentmount.log")).unwrap();

    // The state directory and the writer lock.
    let elsewhere = d.path().join("journal-elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.join(".agentmount")).unwrap();
    let created = d.path().join("created-by-root");
    std::os::unix::fs::symlink(&created, store.join(".agentmount.lock")).unwrap();
    let m = Mount::new(&store, &[]);
    let status = json(&m.p(".status"));
    let journal = status["journal"].as_str().unwrap_or_default().to_string();
    assert!(journal.contains("symbolic link"), "{status}");
    let e = write_close(
        &m.p("goals/g-0000beef.json"),
        br#"{"description": "x", "status": "pending"}"#,
    );
    assert_eq!(e, Err(libc::EIO));
    assert!(errors(&m).contains(".agentmount.lock"));
    drop(m);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(!created.exists());
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        br#"{"secret": "root only"}"#
    );
}

#[test]
fn a_private_store_stays_private_under_allow_other() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    ensure_user();
    let (_d, store, _secret) = setup();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
    let m = Mount::new(&store, &["--allow-other"]);
    let rec = m.p(&format!("sessions/{S_ACTIVE}.json"));
    assert_eq!(std::fs::metadata(&rec).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(m.p("sessions")).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(std::fs::metadata(m.path()).unwrap().mode() & 0o777, 0o700);
    for path in [rec.clone(), m.p(".changes"), m.p(".status")] {
        let o = as_user(&format!("cat {}", path.display()));
        assert!(
            !o.status.success(),
            "{} readable by another user",
            path.display()
        );
    }
    let o = as_user(&format!("ls {}", m.p("sessions").display()));
    assert!(!o.status.success());
    // The owner can still chmod to what is shown (cp -p, sed -i do).
    sh_ok(&format!("chmod 0600 {}", rec.display()), m.path());
    drop(m);

    // A readable store with a private sessions file: no record shows more than 0600.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        store.join("session-manager/sessions.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let m = Mount::new(&store, &["--allow-other"]);
    let rec = m.p(&format!("sessions/{S_ACTIVE}.json"));
    assert_eq!(std::fs::metadata(&rec).unwrap().mode() & 0o777, 0o600);
    let o = as_user(&format!("cat {}", rec.display()));
    assert!(!o.status.success(), "a 0600 sessions.json is private");
}

#[test]
fn a_root_daemon_keeps_the_platforms_owner_and_mode_on_files_it_replaces() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    ensure_user();
    let (_d, store, _secret) = setup();
    sh_ok(
        &format!("chown -R {USER} . && chmod 0640 sm/goals.json"),
        &store,
    );
    let uid = uid_of(USER);
    let m = Mount::new(&store, &[]);
    // Files show the store's owner, not the daemon's.
    assert_eq!(
        std::fs::metadata(m.p("goals/g-1a2b3c4d.json"))
            .unwrap()
            .uid(),
        uid
    );
    sh_ok(
        "sed -i 's/\"inProgress\"/\"blocked\"/' goals/g-1a2b3c4d.json",
        m.path(),
    );
    drop(m);
    let md = std::fs::metadata(store.join("sm/goals.json")).unwrap();
    assert_eq!(md.uid(), uid, "still the platform's file");
    assert_eq!(md.mode() & 0o777, 0o640);
    assert!(
        std::fs::read_to_string(store.join("sm/goals.json"))
            .unwrap()
            .contains("blocked")
    );
}

#[test]
fn fsck_reports_every_planted_entry() {
    let (d, store, secret) = setup();
    let sm = store.join("sm");
    std::os::unix::fs::symlink(&secret, sm.join("conversation-leak.json")).unwrap();
    sh_ok("mkfifo conversation-fifo.json", &sm);
    std::os::unix::fs::symlink(&secret, store.join("agentmount.log")).unwrap();
    std::os::unix::fs::symlink(d.path(), store.join(".agentmount")).unwrap();
    let blob = store.join("attachments/sha256/b1").join(PIXEL);
    std::fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(&secret, &blob).unwrap();
    let o = Command::new(BIN)
        .args(["fsck", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    for planted in [
        "conversation-leak.json: is a symbolic link",
        "conversation-fifo.json: is a FIFO",
        "agentmount.log: is a symbolic link",
        ".agentmount: is a symbolic link",
        &format!("{PIXEL}: is a symbolic link"),
    ] {
        assert!(out.contains(planted), "fsck names {planted}: {out}");
    }
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        br#"{"secret": "root only"}"#
    );
}

#[test]
fn a_store_reached_through_the_users_own_symlink_still_mounts() {
    let (d, store, _secret) = setup();
    let link = d.path().join("store-link");
    std::os::unix::fs::symlink(&store, &link).unwrap();
    let m = Mount::new(&link, &[]);
    assert!(m.p(&format!("sessions/{S_ACTIVE}.json")).exists());
    sh_ok(
        "sed -i 's/\"inProgress\"/\"blocked\"/' goals/g-1a2b3c4d.json",
        m.path(),
    );
    drop(m);
    let o = Command::new(BIN)
        .args(["fsck", "--store"])
        .arg(&link)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_journal_is_kept_only_in_a_directory_of_the_daemons_own() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    ensure_user();
    let (_d, store, secret) = setup();
    sh_ok(&format!("chown -R {USER} ."), &store);
    // A state directory the store's writer made: never used.
    let o = as_user(&format!("mkdir {}", store.join(".agentmount").display()));
    assert!(o.status.success());
    let m = Mount::new(&store, &[]);
    let journal = json(&m.p(".status"))["journal"].to_string();
    assert!(journal.contains("owned by uid"), "{journal}");
    drop(m);

    // Ours, then swapped by the store's writer while mounted: the mount keeps reading its
    // own (held open), never what was planted in its place.
    std::fs::remove_dir(store.join(".agentmount")).unwrap();
    let m = Mount::new(&store, &["--allow-other"]);
    let goal = m.p("goals/g-1a2b3c4d.json");
    let before = std::fs::read(&goal).unwrap();
    sh_ok(
        "sed -i 's/\"inProgress\"/\"blocked\"/' goals/g-1a2b3c4d.json",
        m.path(),
    );
    let v = sh_ok("ls .history/goals/g-1a2b3c4d", m.path());
    let v = v.trim();
    assert!(!v.is_empty());
    let planted = format!(
        "cd {} && mv .agentmount .old && mkdir -p .agentmount/history/goals/g-1a2b3c4d && ln -s {} .agentmount/history/goals/g-1a2b3c4d/{v}",
        store.display(),
        secret.display()
    );
    let o = as_user(&planted);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = as_user(&format!(
        "cat {}/.history/goals/g-1a2b3c4d/{v}",
        m.path().display()
    ));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("root only"));
    assert_eq!(o.stdout, before, "the version the mount kept");
}

#[test]
fn gc_never_removes_through_a_shard_planted_as_a_symlink() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (d, store, _secret) = setup();
    // Root's files elsewhere, named like a blob of the store.
    let victim = d.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let bytes = b"root's own bytes";
    let hex = sha256_hex(bytes);
    std::fs::write(victim.join(&hex), bytes).unwrap();
    std::fs::write(victim.join(format!("{hex}.json")), b"{}").unwrap();
    // The store's writer: a shard symlinked there and an old, uncommitted intent for it.
    std::os::unix::fs::symlink(&victim, store.join("attachments/sha256").join(&hex[..2])).unwrap();
    let manifest = store.join("attachments/manifest.json");
    let mut doc = json(&manifest);
    doc["intents"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "attachment_id": hex, "session_id": null, "canonical_uri": format!("sha256:{hex}"),
            "intent_at_epoch_ms": 1000, "committed_at_epoch_ms": null,
        }));
    std::fs::write(&manifest, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let m = Mount::new(&store, &[]);
    let _ = std::fs::write(m.p(".gc"), b"run\n");
    drop(m);
    assert_eq!(std::fs::read(victim.join(&hex)).unwrap(), bytes);
    assert!(victim.join(format!("{hex}.json")).exists());
}

#[test]
fn a_database_row_whose_id_is_a_path_reaches_nothing_outside() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    make_arbiter_db(&db);
    let escape = d.path().join("ESCAPE");
    let evil = format!("../../../../../../../..{}", escape.display());
    let insert = format!(
        "INSERT INTO sessions SELECT '{evil}', agent_id, delegation_chain_snapshot, declared_intent, authorized_tools, time_limit_secs, call_budget, calls_made, rate_limit_per_minute, rate_window_start, rate_window_calls, rate_limit_window_secs, data_sensitivity_ceiling, created_at, status FROM sessions LIMIT 1"
    );
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg(&insert)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Mount::new(&db, &[]);
    // The listing works for everyone, without the row.
    let ls = sh_ok("ls sessions", m.path());
    assert!(!ls.contains("ESCAPE"), "{ls}");
    // A change to it keeps no history outside.
    let o = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "UPDATE sessions SET calls_made = calls_made + 1 WHERE session_id = '{evil}'"
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let _ = sh("ls -l sessions .history/sessions 2>/dev/null", m.path());
    drop(m);
    assert!(!escape.exists(), "nothing created outside the store");
}

#[test]
fn bytes_planted_under_a_blobs_name_are_replaced_not_kept_by_dedupe() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (d, store, _secret) = setup();
    let good = b"hello-poc\n";
    let hex = sha256_hex(good);
    let shard = store.join("attachments/sha256").join(&hex[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(&hex), b"EVIL-BYTES").unwrap();
    let src = d.path().join("good.txt");
    std::fs::write(&src, good).unwrap();
    let m = Mount::new(&store, &[]);
    assert!(std::fs::read(m.p(&format!("attachments/{hex}"))).is_err());
    sh_ok(
        &format!("cp {} attachments/report.txt", src.display()),
        m.path(),
    );
    assert_eq!(std::fs::read(m.p("attachments/report.txt")).unwrap(), good);
    assert_eq!(
        std::fs::read(m.p(&format!("attachments/{hex}"))).unwrap(),
        good
    );
    assert_eq!(std::fs::read(shard.join(&hex)).unwrap(), good);
}

#[test]
fn a_private_file_in_a_readable_store_stays_private() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    ensure_user();
    let (_d, store, _secret) = setup();
    let conv = store.join("sm/conversation-c-secret.json");
    std::fs::write(&conv, br#"{"compressed_context": "TOP SECRET"}"#).unwrap();
    std::fs::set_permissions(&conv, std::fs::Permissions::from_mode(0o600)).unwrap();
    let blob = store.join("attachments/sha256/05").join(NOTES);
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = Mount::new(&store, &["--allow-other"]);
    let rec = m.p("conversations/c-secret.json");
    assert_eq!(std::fs::metadata(&rec).unwrap().mode() & 0o777, 0o600);
    let o = as_user(&format!("cat {}", rec.display()));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("TOP SECRET"));
    let b = m.p(&format!("attachments/{NOTES}"));
    assert_eq!(std::fs::metadata(&b).unwrap().mode() & 0o777, 0o400);
    assert!(!as_user(&format!("cat {}", b.display())).status.success());
    // Other records keep the collection's mode.
    let other = m.p("conversations/login-flake.json");
    assert_eq!(std::fs::metadata(&other).unwrap().mode() & 0o777, 0o644);
}

#[test]
fn a_sparse_file_planted_as_a_blob_is_refused_without_reading_it() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (_d, store, _secret) = setup();
    let hex = "ee".repeat(32);
    let shard = store.join("attachments/sha256/ee");
    std::fs::create_dir_all(&shard).unwrap();
    let f = std::fs::File::create(shard.join(&hex)).unwrap();
    f.set_len(20 << 30).unwrap();
    let m = Mount::new(&store, &[]);
    let t0 = Instant::now();
    let e = std::fs::read(m.p(&format!("attachments/{hex}"))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refused before it is read"
    );
    assert!(errors(&m).contains("is sparse"));
}
