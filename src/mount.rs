//! `agentmount mount` / `unmount`: checks, daemonizing with a readiness pipe, the session,
//! its helper threads (invalidation sender, store watcher, signal handler).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::backend::{Backend, StoreKind};
use crate::cli::{Command, StoreArgs};
use crate::fs::fuse::AgentFs;
use crate::fs::{Core, MountOptions, invalidate};
use crate::store::Store;

pub struct MountArgs {
    pub store: StoreArgs,
    pub foreground: bool,
    pub read_only: bool,
    pub allow_other: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub no_xattr: bool,
    pub threads: usize,
    pub no_journal: bool,
    pub max_scratch_bytes: u64,
    pub journal: crate::journal::JournalOptions,
    pub log_level: String,
    pub mountpoint: PathBuf,
}

pub fn run_cli(cmd: Command) -> ExitCode {
    let Command::Mount {
        store,
        foreground,
        read_only,
        allow_other,
        uid,
        gid,
        no_xattr,
        threads,
        no_journal,
        changes_max,
        history_per_record,
        history_total,
        max_scratch_bytes,
        log_level,
        mountpoint,
    } = cmd
    else {
        return ExitCode::from(2);
    };
    let args = MountArgs {
        store,
        foreground,
        read_only,
        allow_other,
        uid,
        gid,
        no_xattr,
        threads,
        no_journal,
        max_scratch_bytes,
        journal: crate::journal::JournalOptions {
            changes_max,
            history_per_record,
            history_total,
        },
        log_level,
        mountpoint,
    };
    if let Err(msg) = preflight(&args) {
        eprintln!(
            "agentmount: cannot mount {}: {msg}",
            args.mountpoint.display()
        );
        return ExitCode::from(1);
    }
    if args.foreground {
        return match serve(&args, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!(
                    "agentmount: cannot mount {}: {msg}",
                    args.mountpoint.display()
                );
                ExitCode::from(1)
            }
        };
    }
    // Fork before any thread exists; the child reports "ok" or the exact failure through
    // a pipe, so `mount` returns only when the filesystem is ready.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("agentmount: pipe: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: the descriptors were just created and are owned here alone.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no threads exist yet, so the child may go on running Rust code after fork.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("agentmount: fork: {}", std::io::Error::last_os_error());
            ExitCode::from(1)
        }
        0 => {
            drop(rd);
            // SAFETY: setsid detaches the child from the terminal's session; no memory involved.
            unsafe { libc::setsid() };
            let report = std::cell::RefCell::new(Some(File::from(wr)));
            match serve(&args, Some(&report)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    if let Some(mut r) = report.borrow_mut().take() {
                        let _ = r.write_all(format!("error: {msg}").as_bytes());
                    }
                    ExitCode::from(1)
                }
            }
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            if msg.trim() == "ok" {
                ExitCode::SUCCESS
            } else {
                let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
                let msg = if msg.is_empty() {
                    "the mount process exited before it was ready"
                } else {
                    msg
                };
                eprintln!(
                    "agentmount: cannot mount {}: {msg}",
                    args.mountpoint.display()
                );
                ExitCode::from(1)
            }
        }
    }
}

/// Checks what can be checked before forking, so the common mistakes get a clear message.
fn preflight(args: &MountArgs) -> Result<(), String> {
    args.store.check_exists()?;
    let mp = &args.mountpoint;
    let meta = std::fs::metadata(mp).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the mountpoint does not exist".to_string(),
        _ => format!("cannot stat the mountpoint: {e}"),
    })?;
    if !meta.is_dir() {
        return Err("the mountpoint is not a directory".into());
    }
    if is_mountpoint(mp) {
        return Err("something is already mounted there".into());
    }
    if std::fs::read_dir(mp)
        .map_err(|e| format!("cannot read the mountpoint: {e}"))?
        .next()
        .is_some()
    {
        return Err("the mountpoint is not empty".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist (load the fuse module: modprobe fuse)".into());
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if which("fusermount3").is_none() && which("fusermount").is_none() {
            return Err(
                "mounting as a non-root user needs fusermount3 (apt-get install fuse3)".into(),
            );
        }
        // SAFETY: access only checks the path's permissions for the real user.
        let c = c"/dev/fuse";
        if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
            return Err("/dev/fuse is not readable and writable by this user (distributions make it mode 0666; as root: chmod 0666 /dev/fuse, or add a udev rule)".into());
        }
        if args.allow_other {
            let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
            if !conf.lines().any(|l| l.trim() == "user_allow_other") {
                return Err(
                    "--allow-other as a non-root user needs `user_allow_other` in /etc/fuse.conf"
                        .into(),
                );
            }
        }
    }
    Ok(())
}

/// The mountinfo line of a mountpoint, found without touching the mount itself (a stat of
/// a mount whose daemon died would hang): only the parent directory is resolved.
fn mountinfo_line(p: &Path) -> Option<String> {
    let want = mount_path(p, None)?.to_string_lossy().replace(' ', "\\040");
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .map(str::to_string)
}

/// `p` as mountinfo names a mountpoint: absolute (relative to `cwd`, else ours), its parent
/// resolved, the last component as it is (resolving it would touch the mount).
fn mount_path(p: &Path, cwd: Option<&Path>) -> Option<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        match cwd {
            Some(c) => c.join(p),
            None => std::env::current_dir().ok()?.join(p),
        }
    };
    let name = abs.file_name()?.to_owned();
    let parent = abs.parent()?.canonicalize().ok()?;
    Some(parent.join(name))
}

/// Who owns a FUSE mount (the `user_id=` the kernel keeps in its options).
fn mount_owner(line: &str) -> Option<u32> {
    line.split(" - ")
        .nth(1)?
        .split(' ')
        .nth(2)?
        .split(',')
        .find_map(|o| o.strip_prefix("user_id=")?.parse().ok())
}

/// The agentmount daemons serving `mountpoint`, found in /proc by their command line
/// (`agentmount mount … MNT`, or `mount.agentmount SRC MNT …` from mount(8)), a relative
/// MNT taken from the process's working directory. The daemon is the process `mount`
/// forked, with the same command line.
fn daemon_pids(mountpoint: &Path) -> Vec<u32> {
    let Some(want) = mount_path(mountpoint, None) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let prog = args
                .first()
                .and_then(|a| a.rsplit(|&b| b == b'/').next())
                .unwrap_or_default();
            let mounting = (prog == b"agentmount" && args.get(1) == Some(&&b"mount"[..]))
                || prog.starts_with(b"mount.agentmount");
            if !mounting {
                return false;
            }
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            args.iter().skip(1).any(|a| {
                use std::os::unix::ffi::OsStrExt;
                let p = Path::new(std::ffi::OsStr::from_bytes(a));
                !a.is_empty() && mount_path(p, cwd.as_deref()).as_deref() == Some(want.as_path())
            })
        })
        .collect()
}

/// Whether process `pid` is gone (or a zombie: it has exited, its parent not yet told).
fn exited(pid: u32) -> bool {
    !crate::store::atomic::pid_alive(pid as i32)
}

/// How long `unmount` waits for the daemon to exit after the kernel let the mount go.
const DAEMON_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn is_mountpoint(p: &Path) -> bool {
    mountinfo_line(p).is_some()
}

/// Aborts a FUSE mount's connection through fusectl, as `echo 1 > .../abort` does: every
/// waiting request fails, so a mount whose daemon died (or hangs) can be unmounted.
pub fn abort_connection(mountpoint: &Path) -> Result<(), String> {
    let line = mountinfo_line(mountpoint).ok_or("not mounted")?;
    let minor = line
        .split(' ')
        .nth(2)
        .and_then(|d| d.split(':').nth(1))
        .ok_or("mountinfo has no device")?;
    let conns = Path::new("/sys/fs/fuse/connections");
    if !conns.join(minor).exists() {
        // fusectl may not be mounted yet (root only).
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(conns)
            .output();
    }
    std::fs::write(conns.join(minor).join("abort"), b"1")
        .map_err(|e| format!("cannot abort FUSE connection {minor} (needs root and fusectl): {e}"))
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|c| c.is_file())
    })
}

/// The log file's name: `agentmount.log` in a directory store, `<db>.agentmount.log`
/// beside a database.
fn log_name(root: &Path, kind: &StoreKind) -> String {
    match kind {
        StoreKind::Directory | StoreKind::Postgres => "agentmount.log".into(),
        StoreKind::Sqlite => format!(
            "{}.agentmount.log",
            root.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "store".into())
        ),
    }
}

/// Where the daemon logs, for `.status`: the file, or why there is none.
enum LogPlace {
    Stderr,
    File(PathBuf),
    /// The store's directory refused the file (a user who may only read the store): the
    /// log went to the user's state directory instead.
    Moved {
        path: PathBuf,
        why: String,
    },
    /// No file could be made anywhere: the daemon runs without a file log.
    Off(String),
}

impl LogPlace {
    fn status(&self) -> serde_json::Value {
        match self {
            LogPlace::Stderr => serde_json::json!("stderr (--foreground)"),
            LogPlace::File(p) => serde_json::json!(p),
            LogPlace::Moved { path, why } => {
                serde_json::json!(format!("{} (not beside the store: {why})", path.display()))
            }
            LogPlace::Off(why) => serde_json::json!(format!("off: {why}")),
        }
    }
}

/// The log's place when the store's directory refuses it: `$XDG_STATE_HOME/agentmount/`
/// (else `~/.local/state/agentmount/`), named after the store so two stores' logs differ.
fn fallback_log_path(store_dir: &Path, log_name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".local/state"))
        })?;
    let store_dir = std::fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    let mut h = crate::store::hash::Sha256::new();
    h.update(store_dir.join(log_name).as_os_str().as_encoded_bytes());
    let hex = h.finish_hex();
    let stem = log_name.strip_suffix(".log").unwrap_or(log_name);
    Some(
        base.join("agentmount")
            .join(format!("{stem}-{}.log", &hex[..16])),
    )
}

/// Whether an error says this user may not make the file there (not that the store is
/// hostile: a planted symlink still refuses the mount).
fn not_allowed(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

fn init_logging(args: &MountArgs, layout_root: &Path, log_name: &str) -> Result<LogPlace, String> {
    // fuser tries to unmount again when its session ends; after a normal unmount that
    // fails with EINVAL and fuser warns: its session warnings are left out unless RUST_LOG
    // asks for them (our own unmount failures are logged by us).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(format!(
                "{},fuser::session=error",
                args.log_level
            ))
        })
        .map_err(|e| format!("bad --log-level {:?}: {e}", args.log_level))?;
    if args.foreground {
        use std::io::IsTerminal;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init();
        return Ok(LogPlace::Stderr);
    }
    let layout_root = crate::store::untrusted::trusted_path(layout_root);
    std::fs::create_dir_all(&layout_root).map_err(|e| {
        format!(
            "cannot create the store directory {}: {e}",
            layout_root.display()
        )
    })?;
    // The log sits in a store others may write: never appended through a symlink planted
    // there (root would write wherever it points), never a FIFO or device.
    let path = layout_root.join(log_name);
    let (file, place) = match crate::store::untrusted::open_write(&path, true, 0o600) {
        Ok(f) => (Some(f), LogPlace::File(path)),
        Err(e) if crate::store::untrusted::refusal(&e, &path).is_none() && not_allowed(&e) => {
            // A store this user may read but not write (a --read-only mount of another
            // user's store): the log goes to the user's own state directory, or nowhere.
            let why = format!("{}: {e}", path.display());
            match fallback_log_path(&layout_root, log_name) {
                Some(p) => {
                    // The user's own directory, not the store: their symlinks are theirs.
                    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
                    let opened = p
                        .parent()
                        .map_or(Ok(()), |d| {
                            std::fs::DirBuilder::new()
                                .recursive(true)
                                .mode(0o700)
                                .create(d)
                        })
                        .and_then(|()| {
                            std::fs::OpenOptions::new()
                                .append(true)
                                .create(true)
                                .mode(0o600)
                                .open(&p)
                        });
                    match opened {
                        Ok(f) => (Some(f), LogPlace::Moved { path: p, why }),
                        Err(e2) => (
                            None,
                            LogPlace::Off(format!(
                                "{why}; and {}: {e2}; set XDG_STATE_HOME to a directory you may write",
                                p.display()
                            )),
                        ),
                    }
                }
                None => (
                    None,
                    LogPlace::Off(format!(
                        "{why}; no state directory (XDG_STATE_HOME or HOME) to put it in"
                    )),
                ),
            }
        }
        Err(e) => {
            let why = crate::store::untrusted::refusal(&e, &path).unwrap_or_else(|| e.to_string());
            return Err(format!(
                "cannot open the log file {}: {why}",
                path.display()
            ));
        }
    };
    match file {
        Some(file) => {
            let file = Arc::new(file);
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(move || LogFile(file.clone()))
                .try_init();
        }
        None => {
            // No file: warnings and errors still go somewhere a user may look (the
            // daemon's stderr is /dev/null once it detaches, so .status says why).
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::io::sink)
                .try_init();
        }
    }
    Ok(place)
}

struct LogFile(Arc<File>);

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Mounts and serves until unmounted. With `report`, says "ok" through it once ready.
fn serve(
    args: &MountArgs,
    report: Option<&std::cell::RefCell<Option<File>>>,
) -> Result<(), String> {
    let layout = args.store.layout();
    let kind = crate::backend::detect(&layout.root).map_err(|e| e.to_string())?;
    let log_dir = match kind {
        StoreKind::Directory => layout.root.clone(),
        StoreKind::Sqlite => layout
            .root
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        StoreKind::Postgres => {
            let dir = crate::backend::postgres_state_dir(
                &args.store.config(args.read_only),
                &args.mountpoint,
            );
            crate::backend::postgres::private_dir(&dir).map_err(|e| e.to_string())?;
            dir
        }
    };
    let log_place = init_logging(args, &log_dir, &log_name(&layout.root, &kind))?;
    block_signals();
    limit_malloc_arenas();
    let store: Arc<dyn Backend> = match kind {
        StoreKind::Directory => {
            let store = Store::open(layout, args.store.options(args.read_only))
                .map_err(|e| format!("cannot open the store: {e}"))?;
            // A long-lived process: the attachment index learns of changes from inotify
            // (one non-blocking read per access) instead of a stat of every shard directory.
            store.attachments.index.watch();
            Arc::new(store)
        }
        StoreKind::Sqlite | StoreKind::Postgres => {
            crate::backend::open(&args.store.config(args.read_only), &args.mountpoint)?
        }
    };
    let read_only = args.read_only || store.read_only_reason().is_some();
    if let Some(why) = store.read_only_reason() {
        tracing::warn!(reason = %why, "the store is mounted read-only");
    }
    let mut opts = MountOptions {
        read_only,
        xattrs: !args.no_xattr,
        max_scratch_bytes: args.max_scratch_bytes,
        ..Default::default()
    };
    if let Some(u) = args.uid {
        opts.uid = u;
    }
    if let Some(g) = args.gid {
        opts.gid = g;
    }
    opts.owner_given = args.uid.is_some() || args.gid.is_some();
    let mut journal_off = None;
    let journal = if args.no_journal {
        journal_off = Some("off (--no-journal): records show their store file's times".into());
        None
    } else {
        let dir = store.state_dir();
        match crate::journal::Journal::open(dir.clone(), args.journal.clone(), &*store) {
            Ok(j) => Some(Arc::new(j)),
            // A read-only medium, a full disk: the mount still serves the store, and says
            // what is missing (.status, the log).
            Err(e) => {
                let why = format!(
                    "off: cannot keep the journal in {} ({e}); records show their store file's times, .changes and .history are absent",
                    dir.display()
                );
                tracing::warn!("{why}");
                journal_off = Some(why);
                None
            }
        }
    };
    let journal_at_exit = journal.clone();
    let core = Core::new(store.clone(), opts, journal);
    if let Some(why) = journal_off {
        *core.journal_off.lock() = why;
    }
    *core.log.lock() = log_place.status();
    let mut mount_options = vec![
        MountOption::FSName(format!("agentmount:{}", store.location())),
        MountOption::Subtype("agentmount".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if read_only {
        mount_options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(args.threads.max(1));
    config.clone_fd = args.threads > 1;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let permission_hint = |e: &std::io::Error| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (permission denied: run as root, or as the owner of the mountpoint with fuse3 installed)"
        }
        _ => "",
    };
    let (session, unmounter) = if root {
        let mut s = Session::new(AgentFs::new(core.clone()), &args.mountpoint, &config)
            .map_err(|e| format!("{e}{}", permission_hint(&e)))?;
        let u = Unmounter::Session(s.unmount_callable());
        (s, u)
    } else {
        let mut opts = format!(
            "fsname=agentmount:{},subtype=agentmount,default_permissions,noatime,nodev,nosuid",
            store.location().replace(',', "_")
        );
        if read_only {
            opts.push_str(",ro");
        }
        if args.allow_other {
            opts.push_str(",allow_other");
        }
        let fd = crate::fusermount::mount(&args.mountpoint, &opts)
            .map_err(|e| format!("{e}{}", permission_hint(&e)))?;
        let s = Session::from_fd(AgentFs::new(core.clone()), fd, config.acl, config.clone())
            .map_err(|e| e.to_string())?;
        (s, Unmounter::Fusermount(args.mountpoint.clone()))
    };
    let rx = core.inval.connect(session.notifier());
    {
        let core = core.clone();
        std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || invalidate::run_sender(core, rx))
            .map_err(|e| e.to_string())?;
    }
    if let Err(e) = store.clone().watch(core.clone()) {
        tracing::warn!(error = %e, "cannot start the store watcher; external changes are seen when the TTL runs out")
    }
    let mp = args.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_signal();
            tracing::info!(signal = sig, mountpoint = %mp.display(), "signal received: unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!(error = %e, "unmount failed");
            }
        })
        .map_err(|e| e.to_string())?;
    tracing::info!(mountpoint = %args.mountpoint.display(), store = %store.location(), backend = store.backend_name(), read_only, log = %log_place.status(), "mounted");
    if let Some(r) = report.and_then(|r| r.borrow_mut().take()) {
        // Closing the pipe (dropping `r`) is what lets the parent return.
        let mut r = r;
        let _ = r.write_all(b"ok");
        drop(r);
        detach_stdio();
    }
    session
        .run()
        .map_err(|e| format!("session ended with an error: {e}"))?;
    if let Some(j) = journal_at_exit
        && let Err(e) = j.save_times()
    {
        tracing::warn!(error = %e, "cannot save record times");
    }
    if !read_only && let Err(e) = store.shutdown() {
        tracing::warn!(error = %e, "cannot write out the store's pending state at unmount");
    }
    tracing::info!("unmounted; exiting");
    Ok(())
}

enum Unmounter {
    Session(fuser::SessionUnmounter),
    Fusermount(PathBuf),
}

impl Unmounter {
    fn unmount(self) -> std::io::Result<()> {
        match self {
            Unmounter::Session(mut u) => u.unmount(),
            Unmounter::Fusermount(mp) => crate::fusermount::unmount(&mp, true),
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread and every thread it starts, so one
/// thread can take them with sigwait and unmount cleanly.
fn block_signals() {
    let set = signal_set();
    // SAFETY: changes only this thread's signal mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_signal() -> i32 {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: sigwait writes the signal number into `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

fn detach_stdio() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors; /dev/null stays open until then.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

pub fn unmount_cli(mountpoint: &Path, force: bool) -> ExitCode {
    if !is_mountpoint(mountpoint) {
        eprintln!("agentmount: {} is not mounted", mountpoint.display());
        return ExitCode::from(1);
    }
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if me != 0
        && let Some(owner) = mountinfo_line(mountpoint).as_deref().and_then(mount_owner)
        && owner != me
    {
        // fusermount3 would say "entry for … not found in /etc/mtab".
        let who = if owner == 0 {
            "root; only root can unmount it".to_string()
        } else {
            format!("uid {owner}; only that user or root can unmount it")
        };
        eprintln!(
            "agentmount: cannot unmount {}: it is mounted by {who}",
            mountpoint.display()
        );
        return ExitCode::from(1);
    }
    // Found before the mount goes: the daemon's command line names it.
    let daemons = daemon_pids(mountpoint);
    if force {
        // A daemon that was killed can leave the mount hanging: abort its connection first.
        if let Err(e) = abort_connection(mountpoint) {
            eprintln!("agentmount: {e}; unmounting lazily anyway");
        }
    }
    // SAFETY: geteuid cannot fail.
    let r = if unsafe { libc::geteuid() } == 0 {
        let c = match std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            Ok(c) => c,
            Err(_) => {
                eprintln!("agentmount: bad path");
                return ExitCode::from(1);
            }
        };
        // SAFETY: the path is NUL-terminated and outlives the call.
        let flags = if force { libc::MNT_DETACH } else { 0 };
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    } else {
        crate::fusermount::unmount(mountpoint, force).map_err(|e| e.to_string())
    };
    match r {
        Ok(()) => {
            // The daemon notices and exits (saving record times, closing the store): wait
            // for it, so that the store is free and a remount works when this returns.
            let t0 = std::time::Instant::now();
            let mut left = daemons;
            while t0.elapsed() < DAEMON_EXIT_WAIT {
                left.retain(|&p| !exited(p));
                if left.is_empty() && !is_mountpoint(mountpoint) {
                    return ExitCode::SUCCESS;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if left.is_empty() {
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "agentmount: unmounted {}, but its daemon (pid {}) has not exited after {} s: the store may still be in use",
                mountpoint.display(),
                left.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                DAEMON_EXIT_WAIT.as_secs()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            let hint = if force {
                ""
            } else {
                " (if the daemon died or hangs: agentmount unmount --force)"
            };
            eprintln!(
                "agentmount: cannot unmount {}: {e}{hint}",
                mountpoint.display()
            );
            ExitCode::from(1)
        }
    }
}

/// Caps glibc's malloc arenas at two, before any thread starts. By default every thread
/// that allocates may get an arena of its own (up to 8 per core), and memory freed in one
/// is not reused by another: with 4 FUSE threads, the watcher and the invalidator, a gc
/// over 100,000 attachments peaked at 167 MiB instead of 127 MiB with one arena. Small
/// allocations still come from per-thread caches without a lock.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) } != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX) refused; memory use may be higher");
    }
}
