//! The command line (clap definitions only; main.rs wires them up).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "agentmount",
    version,
    about = "Mount an AI-agent platform's state (sessions, goals, conversations, attachments) as plain files",
    after_help = "Examples:\n  agentmount mount ~/agents            # mount the default store\n  agentmount mount --store ~/.trusty-mpm ~/agents\n  agentmount gc --dry-run\n  agentmount fsck --store ./store\n  agentmount unmount ~/agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store: a directory (trusty-mpm/lash layout), arbiter's SQLite database file, or
    /// a shared Postgres database (postgresql://user@host/db, ?host=/dir for a Unix socket;
    /// the password from PGPASSWORD or ~/.pgpass, never on the command line)
    /// [default: $AGENTMOUNT_STORE, else $XDG_DATA_HOME/agentmount, else ~/.local/share/agentmount].
    /// A --store or $AGENTMOUNT_STORE that does not exist is refused (a typo must not
    /// become an empty store); only the default store is created on first use
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Create the --store directory if it does not exist (to start a new store there)
    #[arg(long)]
    pub create: bool,
    /// Override the sessions file (default: <store>/session-manager/sessions.json)
    #[arg(long, value_name = "FILE", hide_short_help = true)]
    pub sessions_file: Option<PathBuf>,
    /// Override the goals file (default: <store>/sm/goals.json)
    #[arg(long, value_name = "FILE", hide_short_help = true)]
    pub goals_file: Option<PathBuf>,
    /// Override the conversations directory (default: <store>/sm)
    #[arg(long, value_name = "DIR", hide_short_help = true)]
    pub conversations_dir: Option<PathBuf>,
    /// Override the attachments directory (default: <store>/attachments)
    #[arg(long, value_name = "DIR", hide_short_help = true)]
    pub attachments_dir: Option<PathBuf>,
    /// Largest record accepted, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    pub max_record_bytes: u64,
    /// How long a write waits for the store's writer lock (a SQLite database: its lock)
    /// before it fails with EAGAIN
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_secs)]
    pub lock_timeout: std::time::Duration,
    /// A Postgres store: where this host keeps its journal, log and attachment cache
    /// [default: $XDG_STATE_HOME/agentmount/postgres/<hash of the URL and mountpoint>]
    #[arg(long, value_name = "DIR", hide_short_help = true)]
    pub state_dir: Option<PathBuf>,
    /// A Postgres store: the local attachment read cache [default: <state-dir>/blobs]
    #[arg(long, value_name = "DIR", hide_short_help = true)]
    pub cache_dir: Option<PathBuf>,
    /// A Postgres store: the most bytes the local attachment cache keeps (least recently
    /// used files go first; K, M, G suffixes)
    #[arg(long, value_name = "BYTES", default_value = "4G", value_parser = parse_bytes, hide_short_help = true)]
    pub cache_size: u64,
}

/// What `agentmount mount --help` and `agentmount man mount` add: fstab options and the
/// errno of every refusal.
const MOUNT_LONG_HELP: &str = "\
Examples:
  agentmount mount /tmp/agents
  agentmount mount --store ~/.trusty-mpm --read-only /mnt/agents
  agentmount mount --store /var/lib/arbiter/arbiter.db /mnt/arbiter
  PGPASSWORD=... agentmount mount --store postgresql://agents@db.internal/agents ~/agents
  agentmount mount --foreground --log-level debug /tmp/agents

The store is a directory (trusty-mpm/lash layout), arbiter's SQLite database (told apart
by the file's first bytes), or a postgresql:// URL: a store shared by many hosts (sslmode
and sslrootcert as libpq; ?host=/dir for a Unix socket; the password from PGPASSWORD or
~/.pgpass). A --store that does not exist is refused unless --create.

As a mount(8) helper (ln -s $(command -v agentmount) /sbin/mount.agentmount):
  mount -t agentmount STORE MOUNTPOINT -o OPTIONS
  fstab: STORE MOUNTPOINT agentmount defaults,allow_other,_netdev,nofail 0 0
  options: ro, allow_other, noxattr, uid=N, gid=N, threads=N, log_level=L,
           max_record_bytes=N, max_scratch_bytes=N, lock_timeout=SECONDS; defaults,
           noauto, nofail, _netdev, x-* and the like are accepted; anything else is
           refused.

What each refusal returns (the reason goes to MOUNTPOINT/.errors and the log; a write is
checked at close, so a shell's `>` may not show the error: read .errors):
  EINVAL  invalid JSON, wrong type for a known field, unknown enum value, an id that
          disagrees with the file name, an invalid file name, a name that is not UTF-8,
          a session UUID not written lowercase with hyphens, a label with a control
          character, U+FFFD, a control file's name, an uppercase address or not in NFC,
          an unknown key or a delegation id above 2^53 (arbiter's database), a goal
          `done` with unverified sessions, a .gc command other than exactly run,
          dry-run or grace=SECONDS (a blank line too)
  EFBIG   a record over --max-record-bytes (16 MiB); a scratch file over
          --max-scratch-bytes (1 GiB)
  EROFS   any change on a read-only mount
  EPERM   writes to attachment bytes or sidecars that change them, mkdir, rmdir, hard
          links, device nodes, chmod/chown that would change something
  EXDEV   a move between directories (mv falls back to copy + unlink)
  EAGAIN  the writer lock (a database: its lock) not taken within --lock-timeout
  EIO     a store file that no longer parses, a damaged database: writes are refused;
          a Postgres server that cannot be reached (reads keep the last good view)
  EBUSY   a garbage collection already running (on any host of a Postgres store)
  ENOTSUP setting extended attributes";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a store; returns once the filesystem is ready (backgrounds unless --foreground)
    #[command(
        after_help = "Examples:\n  agentmount mount /tmp/agents\n  agentmount mount --store ~/.trusty-mpm --read-only /mnt/agents\n  agentmount mount --store /var/lib/arbiter/arbiter.db /mnt/arbiter\n  agentmount mount --foreground --log-level debug /tmp/agents",
        after_long_help = MOUNT_LONG_HELP
    )]
    Mount {
        #[command(flatten)]
        store: StoreArgs,
        /// Stay in the foreground and log to stderr
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Refuse every change with EROFS
        #[arg(long)]
        read_only: bool,
        /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)
        #[arg(long)]
        allow_other: bool,
        /// Owner shown for every file [default: the mounting user]
        #[arg(long)]
        uid: Option<u32>,
        /// Group shown for every file [default: the mounting user's group]
        #[arg(long)]
        gid: Option<u32>,
        /// Offer no extended attributes. The kernel forwards the security and ACL lookups
        /// `ls -l` makes for every file to a filesystem that has xattrs, so `ls -l` of a
        /// large directory runs about 4x slower with them; without, attachments' user.sha256,
        /// user.media_type and user.label are not shown (their <hex>.json sidecar says the same)
        #[arg(long)]
        no_xattr: bool,
        /// FUSE worker threads
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Keep no record times, change feed or history (.changes and .history are absent;
        /// records show their store file's times)
        #[arg(long)]
        no_journal: bool,
        /// Lines of .changes kept (the newest)
        #[arg(long, value_name = "N", default_value_t = 100_000)]
        changes_max: usize,
        /// Earlier versions kept per record in .history
        #[arg(long, value_name = "N", default_value_t = 20)]
        history_per_record: usize,
        /// Earlier versions kept in all in .history (the oldest go first)
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        history_total: usize,
        /// Largest scratch file (a name in a record directory that is not a record: editor
        /// swap files, sed -i temps, X.json.bak), kept on disk in the state dir; a write or
        /// truncate past it fails with EFBIG (K, M, G suffixes)
        #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_bytes)]
        max_scratch_bytes: u64,
        /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Where to mount
        mountpoint: PathBuf,
    },
    /// Unmount a mounted store; returns once its daemon has exited (at most 10 s)
    #[command(
        after_help = "Examples:\n  agentmount unmount ~/agents\n  agentmount unmount --force /mnt/agents   # the daemon was killed and the mount hangs"
    )]
    Unmount {
        mountpoint: PathBuf,
        /// Abort the FUSE connection first (root): for a mount whose daemon was killed or hangs
        #[arg(long)]
        force: bool,
    },
    /// DELETE orphaned attachments (referenced by no record, never committed, older than
    /// --grace) and print the report as JSON; --dry-run first to see what would go
    #[command(
        after_help = "Every run without --dry-run deletes. Examples:\n  agentmount gc --dry-run                  # what would be deleted; deletes nothing\n  agentmount gc                            # deletes orphans older than an hour\n  agentmount gc --store ./store --grace 0  # deletes every orphan, even one written a second ago"
    )]
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        /// Keep orphans younger than this; 0 deletes every orphan, however new
        #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
        grace: u64,
        /// Report what would be reclaimed; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify a store: files parse, ids are usable and given once, blobs hash to their
    /// names, no stray temp files; --repair mends what it safely can
    #[command(
        after_help = "Without --repair fsck changes nothing: every problem is a `problem:` line naming the file\nand what is wrong, and the exit status is 1 when there is any, 0 only when there is none.\nWith --repair (a directory store) it first mends what it can decide, each a `repaired:`\nline: stray temp files of dead writers are removed, keys and ids given twice keep the\nrecord the mount shows, an `id` that disagrees with its key or name is set to it, a label\ntwo sidecars give stays with the one the mount shows, an intent whose bytes never landed\nis forgotten. What it cannot decide (ids the mount cannot show, bytes that do not hash to\ntheir name, files that do not parse) stays a problem. Run it while a mount is live if you\nlike: repairs take the writer lock.\n\nExamples:\n  agentmount fsck\n  agentmount fsck --store ~/.trusty-mpm --repair"
    )]
    Fsck {
        #[command(flatten)]
        store: StoreArgs,
        /// Mend what can be mended safely (each repair listed); without it nothing changes
        #[arg(long)]
        repair: bool,
    },
    /// Copy a whole store into another (records, attachments with their sidecars and
    /// labels), between any two backends; idempotent (what is already there is skipped)
    #[command(
        after_help = "FROM and TO are --store values: a directory, an arbiter database, or a postgresql:// URL.\nRecords the target already holds with the same bytes, and blobs it already has, are\nskipped, so a copy that was interrupted is simply run again. A directory TO that does\nnot exist is created. Nothing needs to be mounted.\n\nExamples:\n  agentmount copy ~/.trusty-mpm 'postgresql://agents@db.internal/agents'\n  agentmount copy 'postgresql:///agents?host=/run/postgresql' ./backup"
    )]
    Copy {
        /// The store to copy from
        from: PathBuf,
        /// The store to copy into
        to: PathBuf,
        /// Print no progress line
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Follow a mount's change feed (.changes): print each change as it happens
    #[command(
        after_help = "Each line: time, collection/id, op (create, update, delete, rename -> new id), and who\n(mount with the writer's pid and uid, external, or gc). Ctrl-C stops.\n\nExamples:\n  agentmount watch ~/agents\n  agentmount watch ~/agents --collection goals --since 1\n  agentmount watch ~/agents --id g-1a2b3c4d --json | jq ."
    )]
    Watch {
        mountpoint: PathBuf,
        /// Only this collection (sessions, goals, conversations, attachments, ...)
        #[arg(long)]
        collection: Option<String>,
        /// Only this record (also a rename to it)
        #[arg(long)]
        id: Option<String>,
        /// Start with the changes from this sequence number on (default: from now)
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Print the feed's JSON lines
        #[arg(long)]
        json: bool,
    },
    /// Print a mount's .status
    #[command(after_help = "Example:\n  agentmount status ~/agents | jq .counts")]
    Status { mountpoint: PathBuf },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Example:\n  agentmount completions bash > /etc/bash_completion.d/agentmount"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print a man page (roff): the overview, or one subcommand's page
    #[command(
        after_help = "Examples:\n  agentmount man | man -l -\n  agentmount man mount | man -l -   # options, fstab, every refusal's errno"
    )]
    Man {
        /// The subcommand whose page to print (mount, unmount, gc, fsck, status, ...)
        subcommand: Option<String>,
    },
}

/// `mount.agentmount STORE MOUNTPOINT [-o OPTIONS]`, as mount(8) and /etc/fstab call a
/// helper: maps the options onto `agentmount mount` flags.
pub fn helper_args(args: &[String]) -> Result<Vec<String>, String> {
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.extend(
                it.next()
                    .ok_or("-o needs options")?
                    .split(',')
                    .map(str::to_string),
            ),
            // mount(8) may pass: -n (no mtab), -s (sloppy), -f (fake), -v (verbose).
            "-n" | "-s" | "-f" | "-v" => {}
            "-N" => {
                it.next();
            }
            s if s.starts_with("-o") => opts.extend(s[2..].split(',').map(str::to_string)),
            s if s.starts_with('-') => return Err(format!("unknown helper flag {s}")),
            s => pos.push(s.to_string()),
        }
    }
    let [store, mountpoint] = <[String; 2]>::try_from(pos)
        .map_err(|_| "usage: mount.agentmount STORE MOUNTPOINT [-o OPTIONS]".to_string())?;
    let mut out = vec![
        "agentmount".to_string(),
        "mount".into(),
        "--store".into(),
        store,
    ];
    for o in opts.iter().filter(|o| !o.is_empty()) {
        let (k, v) = o
            .split_once('=')
            .map(|(k, v)| (k, Some(v)))
            .unwrap_or((o.as_str(), None));
        match (k, v) {
            ("ro", None) => out.push("--read-only".into()),
            ("allow_other", None) => out.push("--allow-other".into()),
            ("foreground", None) => out.push("--foreground".into()),
            ("noxattr", None) => out.push("--no-xattr".into()),
            (
                "uid" | "gid" | "threads" | "max_record_bytes" | "max_scratch_bytes"
                | "lock_timeout" | "log_level",
                Some(v),
            ) => {
                out.push(format!("--{}", k.replace('_', "-")));
                out.push(v.to_string());
            }
            // Generic options that mean nothing more here: the mount is always
            // nodev,nosuid,noatime, and fstab bookkeeping is mount(8)'s.
            (
                "rw" | "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "nofail"
                | "_netdev" | "nodev" | "nosuid" | "noexec" | "exec" | "dev" | "suid" | "atime"
                | "noatime" | "relatime",
                None,
            ) => {}
            (k, _) if k.starts_with("x-") || k.starts_with("comment") => {}
            _ => {
                return Err(format!(
                    "unknown mount option {o:?} (known: ro, allow_other, noxattr, uid=N, gid=N, threads=N, log_level=L, max_record_bytes=N, max_scratch_bytes=N, lock_timeout=SECONDS)"
                ));
            }
        }
    }
    out.push(mountpoint);
    Ok(out)
}

impl StoreArgs {
    /// The store named explicitly (`--store`, else `$AGENTMOUNT_STORE`), if any.
    pub fn explicit(&self) -> Option<PathBuf> {
        self.store.clone().or_else(|| {
            std::env::var_os("AGENTMOUNT_STORE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
    }

    /// Refuses an explicitly named store that does not exist, unless `--create` asks for
    /// it (then creates the directory). The default store is created on first use.
    pub fn check_exists(&self) -> Result<(), String> {
        let Some(p) = self.explicit() else {
            return Ok(());
        };
        if let Some(url) = p.to_str().filter(|s| crate::backend::postgres::is_url(s)) {
            if self.store.is_some() && crate::backend::postgres::redact(url) != url {
                eprintln!(
                    "agentmount: warning: the password in --store is visible to every user of this host (ps, /proc/*/cmdline); give it in PGPASSWORD, ~/.pgpass or $AGENTMOUNT_STORE instead"
                );
            }
            // Whether it exists is for the server to say, at mount.
            return crate::backend::postgres::connect_config(url)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        if p.exists() {
            return Ok(());
        }
        let via = if self.store.is_some() {
            "--store"
        } else {
            "$AGENTMOUNT_STORE"
        };
        if !self.create {
            return Err(format!(
                "the store {} ({via}) does not exist; check the path, or add --create to start a new store there",
                p.display()
            ));
        }
        std::fs::create_dir_all(&p)
            .map_err(|e| format!("cannot create the store {}: {e}", p.display()))
    }

    pub fn layout(&self) -> crate::store::Layout {
        let root = self
            .store
            .clone()
            .unwrap_or_else(crate::store::default_store_dir);
        let mut l = crate::store::Layout::new(root);
        if let Some(p) = &self.sessions_file {
            l.sessions = p.clone();
        }
        if let Some(p) = &self.goals_file {
            l.goals = p.clone();
        }
        if let Some(p) = &self.conversations_dir {
            l.conversations = p.clone();
        }
        if let Some(p) = &self.attachments_dir {
            l.manifest = p.join("manifest.json");
            l.attachments = p.clone();
        }
        l
    }

    pub fn options(&self, read_only: bool) -> crate::store::Options {
        crate::store::Options {
            max_record_bytes: self.max_record_bytes,
            lock_timeout: self.lock_timeout,
            read_only,
        }
    }

    /// What the backend opens: these flags as a plain config.
    pub fn config(&self, read_only: bool) -> crate::backend::StoreConfig {
        crate::backend::StoreConfig {
            layout: self.layout(),
            options: self.options(read_only),
            state_dir: self.state_dir.clone(),
            cache_dir: self.cache_dir.clone(),
            cache_size: self.cache_size,
        }
    }
}

/// A byte count with an optional K, M, G or T suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: the suffix must be K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a number of bytes"))
}

/// Seconds as a duration: a non-negative number, fractions allowed.
fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|f| std::time::Duration::try_from_secs_f64(f).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds (0 or more)"))
}
