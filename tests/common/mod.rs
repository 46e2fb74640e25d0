//! Shared helpers: fixture copies and real mounts that always unmount.
#![allow(dead_code)]

pub mod pg;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store");
pub const BIN: &str = env!("CARGO_BIN_EXE_agentmount");

pub const S_ACTIVE: &str = "6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22";
pub const S_STOPPED: &str = "0b9e77d1-2c3f-4a8b-8e6d-5f4a3b2c1d0e";
pub const S_FUTURE: &str = "c4d5e6f7-0819-4a2b-bc3d-e4f5a6b7c8d9";
pub const PIXEL: &str = "b1ff9c8ea3a780bad09b346c423d2d0e46815926879b18e841d928376a946640";
pub const NOTES: &str = "054e7968a55d96393430999a1399b2e94a881aef5b51cdc828b76fa9d4182222";

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
            let mut p = std::fs::metadata(&dst).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            p.set_readonly(false);
            std::fs::set_permissions(&dst, p).unwrap();
        }
    }
}

/// A temp dir holding a copy of the fixture store.
pub fn fixture_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(Path::new(FIXTURE), d.path());
    d
}

/// Every file under a directory with its bytes (for "the store is byte-identical").
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(d: &Path, root: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            // agentmount's own files beside the platform's (lock, log, journal).
            if name == ".agentmount.lock" || name == "agentmount.log" || name == ".agentmount" {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .unwrap()
}

/// A real mount of a store; unmounted (lazily if need be) when dropped, even on panic.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Mount {
    pub fn new(store: &Path, extra: &[&str]) -> Mount {
        Self::with_env(store, extra, &[])
    }

    /// As [`Mount::new`], with the daemon's environment adjusted: `(name, Some(v))` sets a
    /// variable, `(name, None)` removes it (the daemon inherits the mount command's env).
    pub fn with_env(store: &Path, extra: &[&str], env: &[(&str, Option<&str>)]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--store")
            .arg(store)
            .args(extra)
            .arg(dir.path());
        if store.to_str().is_some_and(|s| s.starts_with("postgres")) {
            cmd.env("XDG_STATE_HOME", pg::state_home());
        }
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir,
            store: store.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !agentmount::mount::is_mountpoint(self.dir.path()) {
            return;
        }
        let run = |args: &[&str]| {
            Command::new(BIN)
                .args(args)
                .arg(self.dir.path())
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !run(&["unmount"]) && !run(&["unmount", "--force"]) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// An arbiter database made as arbiter-storage makes one (examples/arbiter/make_db.py).
pub fn make_arbiter_db(db: &Path) {
    let o = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/arbiter/make_db.py"
        ))
        .arg(db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

pub fn sh(script: &str, cwd: &Path) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Runs a shell script that must succeed; returns its stdout.
pub fn sh_ok(script: &str, cwd: &Path) -> String {
    let o = sh(script, cwd);
    assert!(
        o.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Opens (creating, truncating), writes and closes with `close(2)` itself, returning the
/// errno of whichever call failed: the close is where the mount commits or refuses, and
/// Rust's File drop (like the shell's `>`) ignores its error.
pub fn write_close(path: &Path, data: &[u8]) -> Result<(), i32> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    f.write_all(data)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by the File, so it is closed exactly once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(())
}
