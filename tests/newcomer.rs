//! A newcomer's path: non-root mounting, mount(8)/fstab through the helper, completions,
//! man page, help, and the Python example — each against a real mount.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

const USER: &str = "agentmount-test";

/// An unprivileged user, and a world-traversable temp dir holding a store copy, a
/// mountpoint and a copy of the binary, all owned by that user.
fn unprivileged_setup() -> (tempfile::TempDir, PathBuf) {
    if Command::new("id")
        .arg(USER)
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        let o = Command::new("useradd")
            .args(["--system", "--no-create-home", USER])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // As distributions set it (scripts/setup.sh does the same).
    let _ = Command::new("chmod").args(["0666", "/dev/fuse"]).status();
    let d = tempfile::tempdir().unwrap();
    copy_dir(Path::new(FIXTURE), &d.path().join("store"));
    std::fs::create_dir(d.path().join("mnt")).unwrap();
    let bin = d.path().join("agentmount");
    std::fs::copy(BIN, &bin).unwrap();
    sh_ok(
        &format!("chmod 0755 . && chown -R {USER} store mnt"),
        d.path(),
    );
    (d, bin)
}

fn as_user(script: &str, cwd: &Path) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "bash", "-c", script])
        .current_dir(cwd)
        .output()
        .unwrap()
}

#[test]
fn an_ordinary_user_mounts_through_fusermount3() {
    if !is_root() {
        eprintln!("skipped: needs root to create the unprivileged test user");
        return;
    }
    let (d, _bin) = unprivileged_setup();
    let o = as_user(
        "./agentmount mount --store store mnt && id -u && stat -c %u mnt/sessions/6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22.json",
        d.path(),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let guard = scopeguard(d.path().join("mnt"));
    assert!(
        o.status.success(),
        "{}{}",
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], lines[1], "files belong to the mounting user");
    let w = as_user(
        r#"echo '{"description": "by a user", "status": "pending"}' > mnt/goals/g-00000abc.json && cat mnt/goals/g-00000abc.json"#,
        d.path(),
    );
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(
        std::fs::read_to_string(d.path().join("store/sm/goals.json"))
            .unwrap()
            .contains("g-00000abc")
    );
    // Attachment bytes read back for a user too: FUSE passthrough needs CAP_SYS_ADMIN, so
    // the mount falls back to the page cache and says so.
    let r = as_user(
        "cmp mnt/attachments/pixel.png store/attachments/sha256/b1/b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640 && cat mnt/.status",
        d.path(),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let status: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let path = status["data_path"]["attachments"].as_str().unwrap();
    assert!(path.starts_with("page cache"), "{path}");
    // The store's new files belong to the user, not root.
    assert_eq!(
        std::fs::metadata(d.path().join("store/sm/goals.json"))
            .unwrap()
            .uid(),
        std::fs::metadata(d.path().join("store")).unwrap().uid()
    );
    // Scratch files (sed -i's temp, a note) are the user's files in the state dir.
    let s = as_user(
        "echo kept > mnt/goals/notes.tmp && sed -i 's/by a user/by sed/' mnt/goals/g-00000abc.json && cat mnt/goals/notes.tmp",
        d.path(),
    );
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert_eq!(String::from_utf8_lossy(&s.stdout), "kept\n");
    let scratch = d.path().join("store/.agentmount/scratch/goals/notes.tmp");
    assert_eq!(
        std::fs::metadata(&scratch).unwrap().uid(),
        std::fs::metadata(d.path().join("store")).unwrap().uid()
    );
    let o = as_user("./agentmount unmount mnt", d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!agentmount::mount::is_mountpoint(&d.path().join("mnt")));
    // ... and are there again at the next mount.
    let o = as_user(
        "./agentmount mount --store store mnt && cat mnt/goals/notes.tmp && ./agentmount unmount mnt",
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "kept\n");
    drop(guard);
}

#[test]
fn allow_other_as_a_user_says_what_fuse_conf_needs() {
    if !is_root() {
        eprintln!("skipped: needs root to create the unprivileged test user");
        return;
    }
    if std::fs::read_to_string("/etc/fuse.conf")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "user_allow_other")
    {
        eprintln!("skipped: this machine allows user_allow_other");
        return;
    }
    let (d, _bin) = unprivileged_setup();
    let o = as_user(
        "./agentmount mount --allow-other --store store mnt",
        d.path(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("user_allow_other") && err.contains("/etc/fuse.conf"),
        "{err}"
    );
}

/// Unmounts (lazily) when dropped, whatever happened.
struct Unmount(PathBuf);
fn scopeguard(p: PathBuf) -> Unmount {
    Unmount(p)
}
impl Drop for Unmount {
    fn drop(&mut self) {
        if agentmount::mount::is_mountpoint(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn mount_helper_works_from_mount_t_and_an_fstab_line() {
    if !is_root() {
        eprintln!("skipped: installing /sbin/mount.agentmount needs root");
        return;
    }
    let helper = Path::new("/sbin/mount.agentmount");
    let _ = std::fs::remove_file(helper);
    std::os::unix::fs::symlink(BIN, helper).unwrap();
    struct Remove;
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file("/sbin/mount.agentmount");
        }
    }
    let _remove = Remove;
    let st = fixture_copy();
    let mnt = tempfile::tempdir().unwrap();
    let _g = scopeguard(mnt.path().to_path_buf());
    let o = Command::new("mount")
        .args(["-t", "agentmount", "-o", "ro,uid=4321,noatime"])
        .arg(st.path())
        .arg(mnt.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mount -t agentmount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let md = std::fs::metadata(mnt.path().join("goals/g-1a2b3c4d.json")).unwrap();
    assert_eq!(md.uid(), 4321);
    let w = std::fs::write(mnt.path().join("goals/g-1a2b3c4d.json"), b"{}");
    assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert!(
        Command::new("umount")
            .arg(mnt.path())
            .status()
            .unwrap()
            .success()
    );
    // An fstab line (in a file of its own: mount -T), as /etc/fstab would hold it.
    let fstab = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        fstab.path(),
        format!(
            "{} {} agentmount defaults,noauto,nofail,_netdev,threads=2 0 0\n",
            st.path().display(),
            mnt.path().display()
        ),
    )
    .unwrap();
    let o = Command::new("mount")
        .arg("-T")
        .arg(fstab.path())
        .arg(mnt.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mount via fstab: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(
        mnt.path().join("goals/g-00000fab.json"),
        br#"{"description": "from fstab", "status": "pending"}"#,
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(st.path().join("sm/goals.json"))
            .unwrap()
            .contains("g-00000fab")
    );
    assert!(
        Command::new("umount")
            .arg(mnt.path())
            .status()
            .unwrap()
            .success()
    );
    // A bad option is refused with a message, before anything is mounted.
    let o = Command::new("mount")
        .args(["-t", "agentmount", "-o", "bogus=1"])
        .arg(st.path())
        .arg(mnt.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown mount option"));
}

#[test]
fn helper_maps_fstab_options_to_flags() {
    let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        agentmount::cli::helper_args(&args("/srv/store /mnt/a -o rw,ro,allow_other,noxattr,uid=5,gid=6,threads=2,_netdev,x-systemd.automount")).unwrap(),
        args("agentmount mount --store /srv/store --read-only --allow-other --no-xattr --uid 5 --gid 6 --threads 2 /mnt/a")
    );
    assert!(agentmount::cli::helper_args(&args("/srv/store")).is_err());
    assert!(agentmount::cli::helper_args(&args("/a /b -o frobnicate")).is_err());
}

#[test]
fn version_help_completions_and_man_page() {
    let run = |a: &[&str]| Command::new(BIN).args(a).output().unwrap();
    let v = run(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("agentmount {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in [
        "mount",
        "unmount",
        "gc",
        "fsck",
        "status",
        "completions",
        "man",
    ] {
        let h = run(&[sub, "--help"]);
        assert!(h.status.success(), "{sub} --help");
        let text = String::from_utf8_lossy(&h.stdout);
        assert!(text.contains("Usage: agentmount"), "{sub} --help: {text}");
    }
    for sub in [
        "mount",
        "unmount",
        "gc",
        "fsck",
        "status",
        "completions",
        "man",
    ] {
        assert!(
            String::from_utf8_lossy(&run(&[sub, "--help"]).stdout).contains("Example"),
            "{sub} --help has examples"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let c = run(&["completions", shell]);
        assert!(
            c.status.success() && String::from_utf8_lossy(&c.stdout).contains("agentmount"),
            "{shell}"
        );
    }
    let bash = run(&["completions", "bash"]);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &bash.stdout).unwrap();
    assert!(
        Command::new("bash")
            .arg("-n")
            .arg(f.path())
            .status()
            .unwrap()
            .success(),
        "bash completion parses"
    );
    let man = String::from_utf8_lossy(&run(&["man"]).stdout).into_owned();
    assert!(man.contains(".TH agentmount 1"), "{man}");
    // Unknown subcommands are usage errors (exit 2).
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn python_example_reads_and_writes_through_a_real_mount() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/agent_state.py"
    );
    let py = |args: &[&str]| {
        Command::new("python3")
            .arg(script)
            .arg(m.path())
            .args(args)
            .output()
            .unwrap()
    };
    let o = py(&["sessions"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("fix flaky login test") && out.contains("provisioning"),
        "{out}"
    );
    let o = py(&["goal", "g-9f8e7d6c"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("100% (1/1 sessions verified)"));
    let o = py(&["set-progress", "g-1a2b3c4d", "60"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&st.path().join("sm/goals.json"))[0]["progress"], 60);
    let o = py(&["set-progress", "g-1a2b3c4d", "160"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Invalid argument"));
    assert_eq!(
        json(&st.path().join("sm/goals.json"))[0]["progress"],
        60,
        "refused write changed nothing"
    );
    let src = tempfile::tempdir().unwrap();
    let shot = src.path().join("shot.png");
    std::fs::copy(
        Path::new(FIXTURE).join("attachments/sha256/b1").join(PIXEL),
        &shot,
    )
    .unwrap();
    let o = py(&["attach", shot.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("shot.png -> sha256:{PIXEL} (image/png)")),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
