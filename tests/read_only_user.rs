//! Issue 30: a store the user can read but not write mounts `--read-only` (the log goes to
//! the user's state directory, or nowhere; the journal is off; `.status` says both).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const USER: &str = "agentmount-ro";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn as_user(script: &str, cwd: &Path) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "bash", "-c", script])
        .current_dir(cwd)
        .output()
        .unwrap()
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if agentmount::mount::is_mountpoint(&self.0) {
            let _ = Command::new(BIN).arg("unmount").arg(&self.0).status();
        }
    }
}

#[test]
fn a_user_who_may_only_read_the_store_mounts_it_read_only() {
    if !is_root() {
        eprintln!("skipped: needs root to create the unprivileged test user");
        return;
    }
    if !Command::new("id")
        .arg(USER)
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let o = Command::new("useradd")
            .args(["--system", "--no-create-home", USER])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let _ = Command::new("chmod").args(["0666", "/dev/fuse"]).status();
    // root's store, readable by all, writable by root only.
    let d = tempfile::tempdir().unwrap();
    copy_dir(Path::new(FIXTURE), &d.path().join("store"));
    std::fs::create_dir(d.path().join("mnt")).unwrap();
    std::fs::create_dir(d.path().join("state")).unwrap();
    std::fs::copy(BIN, d.path().join("agentmount")).unwrap();
    sh_ok(
        &format!("chmod 0755 . && chmod -R go-w,a+rX store && chown {USER} mnt state"),
        d.path(),
    );
    let before = tree(&d.path().join("store"));
    let mnt = d.path().join("mnt");

    // No state directory the user may write (HOME does not exist): no log file at all.
    let o = as_user("./agentmount mount --read-only --store store mnt", d.path());
    let guard = Unmount(mnt.clone());
    assert!(
        o.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = as_user(
        &format!(
            "cat mnt/.status && cat mnt/sessions/{S_ACTIVE}.json >/dev/null && cmp mnt/attachments/pixel.png store/attachments/sha256/b1/{PIXEL}"
        ),
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let log = status["log"].as_str().unwrap();
    assert!(
        log.starts_with("off: ") && log.contains("agentmount.log"),
        "{log}"
    );
    let journal = status["journal"].as_str().unwrap();
    assert!(journal.starts_with("off: "), "{journal}");
    let w = as_user(
        &format!("echo '{{}}' > mnt/sessions/{S_ACTIVE}.json"),
        d.path(),
    );
    assert!(!w.status.success());
    assert!(
        String::from_utf8_lossy(&w.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&w.stderr)
    );
    let o = as_user("./agentmount unmount mnt", d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // With a state directory of the user's: the log is there, and .status says where.
    let o = as_user(
        "XDG_STATE_HOME=$PWD/state ./agentmount mount --read-only --store store mnt && cat mnt/.status",
        d.path(),
    );
    assert!(
        o.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let log = status["log"].as_str().unwrap();
    assert!(
        log.starts_with(
            &d.path()
                .join("state/agentmount/agentmount-")
                .display()
                .to_string()
        ),
        "{log}"
    );
    let o = as_user("./agentmount unmount mnt", d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(guard);
    let logs: Vec<_> = std::fs::read_dir(d.path().join("state/agentmount"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(text.contains("mounted"), "{text}");
    assert_eq!(
        tree(&d.path().join("store")),
        before,
        "the store is unchanged"
    );
    assert!(!d.path().join("store/agentmount.log").exists());
    assert!(!d.path().join("store/.agentmount").exists());
}
