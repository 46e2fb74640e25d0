//! Scratch files (names in a record directory that are not records: editor swap files,
//! `sed -i` temps, `X.json.bak`) keep their bytes on disk, in the backend's state dir:
//! `<state_dir>/scratch/<collection>/<name>` (directories 0700; a file carries the mode
//! and times the mount shows). Reads and writes are pread/pwrite on a descriptor, so a
//! scratch file is never held in memory, and it survives an unmount.
//!
//! The state dir of a directory store lies inside the store, which is untrusted input:
//! every directory is opened with O_NOFOLLOW and used through its descriptor (`*at`
//! calls), and a file is used only when it is a regular file with one link, owned by the
//! daemon's user; a planted symlink, FIFO, device or hard link is never opened.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// The directories scratch files live in.
pub(super) struct ScratchDir {
    /// `<state_dir>/scratch`, for messages.
    base: PathBuf,
    dirs: HashMap<Kind, OwnedFd>,
    /// Files being made durable before they take their name (`.tmp`).
    tmp: Option<OwnedFd>,
    read_only: bool,
    /// Why scratch files cannot be made here, when they cannot.
    broken: Option<String>,
    next_tmp: AtomicU64,
}

fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is written by fstat before it is read; `fd` is a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn fstatat(dir: RawFd, name: &str) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: as fstat; AT_SYMLINK_NOFOLLOW: a symlink is described, never followed.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// A file we may use: a regular file with one link, ours.
fn usable(st: &libc::stat) -> io::Result<()> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 || st.st_uid != euid() {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// Opens (making it first unless read-only) directory `name` under `parent`, never
/// through a symlink; it must be a directory of ours.
fn open_dir_at(parent: RawFd, name: &str, create: bool) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    if create {
        // SAFETY: a plain syscall on a descriptor we hold and a NUL-terminated name.
        let r = unsafe { libc::mkdirat(parent, c.as_ptr(), 0o700) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
    }
    // SAFETY: as above; the descriptor returned is owned by the OwnedFd.
    let fd = cvt(unsafe {
        libc::openat(
            parent,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd())?;
    if st.st_uid != euid() {
        return Err(io::Error::other("not owned by the mounting user"));
    }
    Ok(fd)
}

/// The names in a directory (not `.` and `..`).
fn names(dir: RawFd) -> io::Result<Vec<String>> {
    // SAFETY: fdopendir takes over a duplicate of `dir`, released by closedir; readdir's
    // entries are read before the next call.
    let dup = cvt(unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) })?;
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(dup) };
        return Err(e);
    }
    unsafe { libc::rewinddir(d) };
    let mut out = Vec::new();
    loop {
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        if let Ok(n) = name.to_str()
            && n != "."
            && n != ".."
        {
            out.push(n.to_string());
        }
    }
    unsafe { libc::closedir(d) };
    Ok(out)
}

fn io_err(what: &str, path: &Path, e: io::Error) -> FsError {
    FsError::refuse(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("scratch file {what} in {}: {e}", path.display()),
    )
}

impl ScratchDir {
    /// Opens `<state_dir>/scratch` and its directories, making them unless `read_only`
    /// (a read-only mount shows the scratch files there are and makes none).
    pub(super) fn open(state_dir: &Path, kinds: &[Kind], read_only: bool) -> ScratchDir {
        let base = state_dir.join("scratch");
        let mut d = ScratchDir {
            base: base.clone(),
            dirs: HashMap::new(),
            tmp: None,
            read_only,
            broken: None,
            next_tmp: AtomicU64::new(0),
        };
        if let Err(e) = d.open_dirs(state_dir, kinds) {
            let absent = read_only && e.kind() == io::ErrorKind::NotFound;
            if !absent {
                let why = format!("cannot keep scratch files in {}: {e}", base.display());
                tracing::warn!("{why}");
                d.broken = Some(why);
            }
        }
        d
    }

    fn open_dirs(&mut self, state_dir: &Path, kinds: &[Kind]) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        if !self.read_only && !state_dir.is_dir() {
            crate::store::untrusted::create_dir_all_mode(state_dir, 0o700)?;
        }
        let c = CString::new(state_dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated path; the descriptor is owned by the OwnedFd.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        let state = unsafe { OwnedFd::from_raw_fd(fd) };
        // Only a state directory of our own user that no one else can write (as the
        // journal's): in one another user made, they could swap what we create in it.
        crate::store::untrusted::ours_alone(
            state_dir,
            &std::fs::File::from(state.try_clone()?).metadata()?,
        )?;
        let create = !self.read_only;
        let root = open_dir_at(state.as_raw_fd(), "scratch", create)?;
        for k in kinds {
            match open_dir_at(root.as_raw_fd(), k.dir_name(), create) {
                Ok(fd) => {
                    self.dirs.insert(*k, fd);
                }
                Err(e) if self.read_only && e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if create {
            let tmp = open_dir_at(root.as_raw_fd(), ".tmp", true)?;
            // What a crash left while making a file durable.
            for n in names(tmp.as_raw_fd()).unwrap_or_default() {
                if let Ok(c) = cstr(&n) {
                    // SAFETY: unlinkat removes the name itself, never what it points to.
                    unsafe { libc::unlinkat(tmp.as_raw_fd(), c.as_ptr(), 0) };
                }
            }
            self.tmp = Some(tmp);
        }
        Ok(())
    }

    fn dir(&self, kind: Kind) -> FsResult<RawFd> {
        match self.dirs.get(&kind) {
            Some(fd) => Ok(fd.as_raw_fd()),
            None if self.read_only => Err(FsError::refuse(libc::EROFS, "the mount is read-only")),
            None => Err(FsError::refuse(
                libc::EIO,
                self.broken
                    .clone()
                    .unwrap_or_else(|| "no scratch directory".into()),
            )),
        }
    }

    fn path(&self, kind: Kind, name: &str) -> PathBuf {
        self.base.join(kind.dir_name()).join(name)
    }

    /// The scratch files of a collection there are on disk (regular files of ours only).
    pub(super) fn list(&self, kind: Kind) -> Vec<String> {
        let Some(dir) = self.dirs.get(&kind) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in names(dir.as_raw_fd()).unwrap_or_default() {
            match fstatat(dir.as_raw_fd(), &n).and_then(|st| usable(&st)) {
                Ok(()) => out.push(n),
                Err(e) => tracing::warn!(
                    file = %self.path(kind, &n).display(),
                    error = %e,
                    "not a scratch file of ours (a regular file with one link): left alone"
                ),
            }
        }
        out
    }

    /// The stat of a scratch file by name.
    fn stat(&self, kind: Kind, name: &str) -> FsResult<libc::stat> {
        let st = fstatat(self.dir(kind)?, name)
            .map_err(|e| io_err("stat", &self.path(kind, name), e))?;
        usable(&st).map_err(|_| FsError::new(libc::ENOENT))?;
        Ok(st)
    }

    fn openat(
        dir: RawFd,
        name: &CString,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<File> {
        let base = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: a plain syscall; the descriptor is owned by the File. O_NOATIME (ours
        // to set: we own the file) keeps our reads from moving the atime the mount shows.
        let mut fd = unsafe { libc::openat(dir, name.as_ptr(), base | libc::O_NOATIME, mode) };
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
            fd = unsafe { libc::openat(dir, name.as_ptr(), base, mode) };
        }
        cvt(fd)?;
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens an existing scratch file (read-write unless the mount is read-only or the
    /// file's mode forbids it).
    fn open_file(&self, kind: Kind, name: &str) -> FsResult<File> {
        let dir = self.dir(kind)?;
        let path = self.path(kind, name);
        let before = self.stat(kind, name)?;
        let c = cstr(name).map_err(|e| io_err("open", &path, e))?;
        let f = match Self::openat(
            dir,
            &c,
            if self.read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            },
            0,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                Self::openat(dir, &c, libc::O_RDONLY, 0)
            }
            r => r,
        }
        .map_err(|e| io_err("open", &path, e))?;
        let st = fstat(f.as_raw_fd()).map_err(|e| io_err("stat", &path, e))?;
        if usable(&st).is_err() || (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) {
            return Err(FsError::refuse(
                libc::EIO,
                format!("{} changed while it was opened", path.display()),
            ));
        }
        Ok(f)
    }

    /// Makes a new, empty scratch file (replacing any file of that name).
    fn create(&self, kind: Kind, name: &str, mode: u32) -> FsResult<File> {
        let dir = self.dir(kind)?;
        let path = self.path(kind, name);
        let c = cstr(name).map_err(|e| io_err("create", &path, e))?;
        // SAFETY: unlinkat removes the name itself, never what a symlink points to.
        unsafe { libc::unlinkat(dir, c.as_ptr(), 0) };
        let f = Self::openat(dir, &c, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .map_err(|e| io_err("create", &path, e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| io_err("chmod", &path, e))?;
        Ok(f)
    }

    fn rename(&self, kind: Kind, from: &str, to: &str) -> FsResult<()> {
        let dir = self.dir(kind)?;
        let path = self.path(kind, from);
        let (f, t) = (
            cstr(from).map_err(|e| io_err("rename", &path, e))?,
            cstr(to).map_err(|e| io_err("rename", &path, e))?,
        );
        // SAFETY: a plain syscall on names in a directory we hold.
        cvt(unsafe { libc::renameat(dir, f.as_ptr(), dir, t.as_ptr()) })
            .map_err(|e| io_err("rename", &path, e))?;
        Ok(())
    }

    fn unlink(&self, kind: Kind, name: &str) {
        if let (Ok(dir), Ok(c)) = (self.dir(kind), cstr(name)) {
            // SAFETY: unlinkat removes the name itself.
            unsafe { libc::unlinkat(dir, c.as_ptr(), 0) };
        }
    }

    /// Writes `bytes` as scratch file `name`, durably (file and directory fsynced), in
    /// place of any file of that name. Returns what undoes it: the temp name the replaced
    /// file now has in `.tmp`, if there was one.
    fn put_durable(&self, kind: Kind, name: &str, bytes: &[u8], mode: u32) -> FsResult<Put> {
        let dir = self.dir(kind)?;
        let path = self.path(kind, name);
        let err = |e| io_err("write", &path, e);
        let tmp = self
            .tmp
            .as_ref()
            .ok_or_else(|| FsError::refuse(libc::EIO, "no scratch directory"))?
            .as_raw_fd();
        let tname = format!(
            "{}-{}",
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        );
        let tc = cstr(&tname).map_err(err)?;
        let nc = cstr(name).map_err(err)?;
        let f = Self::openat(tmp, &tc, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .map_err(err)?;
        let unlink_tmp = || unsafe { libc::unlinkat(tmp, tc.as_ptr(), 0) };
        let written = f
            .write_all_at(bytes, 0)
            .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)))
            .and_then(|()| f.sync_all());
        if let Err(e) = written {
            unlink_tmp();
            return Err(err(e));
        }
        // SAFETY: plain syscalls on names in directories we hold.
        let exists = fstatat(dir, name).is_ok();
        let r = if exists {
            unsafe { libc::renameat2(tmp, tc.as_ptr(), dir, nc.as_ptr(), libc::RENAME_EXCHANGE) }
        } else {
            unsafe { libc::renameat2(tmp, tc.as_ptr(), dir, nc.as_ptr(), libc::RENAME_NOREPLACE) }
        };
        if let Err(e) = cvt(r) {
            unlink_tmp();
            return Err(err(e));
        }
        let synced = File::from(dir_dup(dir).map_err(err)?)
            .sync_all()
            .and_then(|()| File::from(dir_dup(tmp)?).sync_all());
        let put = Put {
            kind,
            name: name.to_string(),
            replaced: exists.then_some(tname),
        };
        if let Err(e) = synced {
            self.undo(put);
            return Err(err(e));
        }
        Ok(put)
    }

    /// Takes back a `put_durable`: the replaced file gets its name again.
    fn undo(&self, put: Put) {
        let (Ok(dir), Some(tmp)) = (self.dir(put.kind), self.tmp.as_ref()) else {
            return;
        };
        let Ok(nc) = cstr(&put.name) else { return };
        // SAFETY: plain syscalls on names in directories we hold.
        match put.replaced.as_deref().map(cstr) {
            Some(Ok(tc)) => unsafe {
                libc::renameat2(
                    tmp.as_raw_fd(),
                    tc.as_ptr(),
                    dir,
                    nc.as_ptr(),
                    libc::RENAME_EXCHANGE,
                );
                libc::unlinkat(tmp.as_raw_fd(), tc.as_ptr(), 0);
            },
            _ => unsafe {
                libc::unlinkat(dir, nc.as_ptr(), 0);
            },
        }
    }

    /// Keeps a `put_durable`: the replaced file goes (its descriptors keep its bytes).
    fn keep(&self, put: Put) {
        if let (Some(tmp), Some(Ok(tc))) = (self.tmp.as_ref(), put.replaced.as_deref().map(cstr)) {
            // SAFETY: unlinkat removes the name itself.
            unsafe { libc::unlinkat(tmp.as_raw_fd(), tc.as_ptr(), 0) };
        }
    }
}

fn dir_dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the duplicate is owned by the OwnedFd.
    let d = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// A scratch file made durable under its name; `ScratchDir::undo` or `keep` finishes it.
struct Put {
    kind: Kind,
    name: String,
    replaced: Option<String>,
}

fn time_of(sec: i64, nsec: i64) -> SystemTime {
    let d = Duration::new(sec.unsigned_abs(), nsec.clamp(0, 999_999_999) as u32);
    if sec >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

impl Core {
    /// Scratch files already on disk become names in their directories (at mount).
    pub(super) fn load_scratch(&self) {
        for &kind in self.store.collections() {
            for name in self.scratch_dir.list(kind) {
                if name.len() > 255
                    || !crate::store::collection::safe_name(&name)
                    || !matches!(classify(&*self.store, kind, &name), Class::Scratch)
                {
                    continue;
                }
                let ino = self.inodes.ino(&Node::Scratch(kind, name.clone()));
                self.scratch.lock().insert(
                    ino,
                    Arc::new(Mutex::new(Scratch {
                        kind,
                        name,
                        file: None,
                        nlink: 1,
                    })),
                );
            }
        }
    }

    /// A scratch file's descriptor on disk (opened the first time it is needed).
    pub(super) fn scratch_fd(&self, s: &mut Scratch) -> FsResult<Arc<File>> {
        if let Some(f) = &s.file {
            return Ok(f.clone());
        }
        if s.nlink == 0 {
            return Err(FsError::new(libc::ENOENT));
        }
        let f = Arc::new(self.scratch_dir.open_file(s.kind, &s.name)?);
        s.file = Some(f.clone());
        Ok(f)
    }

    /// Attributes of a scratch file: its file's size, mode and times.
    pub(super) fn scratch_attr(&self, ino: u64, s: &Scratch) -> FsResult<Attr> {
        let st = match &s.file {
            Some(f) => fstat(f.as_raw_fd())
                .map_err(|e| io_err("stat", &self.scratch_dir.path(s.kind, &s.name), e))?,
            None if s.nlink == 0 => return Err(FsError::new(libc::ENOENT)),
            None => self.scratch_dir.stat(s.kind, &s.name)?,
        };
        let mut a = self.attr(
            ino,
            FileKind::File,
            st.st_size as u64,
            (
                time_of(st.st_mtime, st.st_mtime_nsec),
                time_of(st.st_ctime, st.st_ctime_nsec),
            ),
            (st.st_mode & 0o7777) as u16,
            Duration::ZERO,
        );
        a.atime = time_of(st.st_atime, st.st_atime_nsec);
        a.nlink = s.nlink;
        Ok(a)
    }

    fn scratch_limit(&self, s: &Scratch, end: u64) -> FsResult<()> {
        let limit = self.opts.max_scratch_bytes;
        if end > limit {
            return Err(FsError::refuse(
                libc::EFBIG,
                format!(
                    "{}: a scratch file of {end} bytes is over the limit of {limit} (--max-scratch-bytes)",
                    s.name
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn scratch_read(
        &self,
        s: &mut Scratch,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        let f = self.scratch_fd(s)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", &self.scratch_dir.path(s.kind, &s.name), e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(super) fn scratch_write(&self, s: &mut Scratch, offset: u64, data: &[u8]) -> FsResult<()> {
        self.scratch_limit(s, offset.saturating_add(data.len() as u64))?;
        let f = self.scratch_fd(s)?;
        f.write_all_at(data, offset)
            .map_err(|e| io_err("write", &self.scratch_dir.path(s.kind, &s.name), e))
    }

    /// Truncates or extends (sparse) a scratch file. `always`: mark mtime and ctime even
    /// when the size stays (O_TRUNC).
    pub(super) fn scratch_set_len(&self, s: &mut Scratch, n: u64, always: bool) -> FsResult<()> {
        self.scratch_limit(s, n)?;
        let f = self.scratch_fd(s)?;
        let path = self.scratch_dir.path(s.kind, &s.name);
        let cur = fstat(f.as_raw_fd()).map_err(|e| io_err("stat", &path, e))?;
        if cur.st_size as u64 != n {
            f.set_len(n).map_err(|e| io_err("truncate", &path, e))?;
        } else if always {
            let now = SystemTime::now();
            let t = std::fs::FileTimes::new().set_modified(now);
            f.set_times(t).map_err(|e| io_err("utimes", &path, e))?;
        }
        Ok(())
    }

    /// Sets a scratch file's mode and times (ctime moves with them).
    pub(super) fn scratch_set_meta(
        &self,
        s: &mut Scratch,
        mode: Option<u32>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<()> {
        let f = self.scratch_fd(s)?;
        let path = self.scratch_dir.path(s.kind, &s.name);
        if let Some(m) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(m & 0o777))
                .map_err(|e| io_err("chmod", &path, e))?;
        }
        let mut t = std::fs::FileTimes::new();
        if let Some(a) = atime {
            t = t.set_accessed(a);
        }
        if let Some(m) = mtime {
            t = t.set_modified(m);
        }
        f.set_times(t).map_err(|e| io_err("utimes", &path, e))?;
        Ok(())
    }

    /// Replaces a scratch file's bytes (a record descriptor whose name became scratch).
    pub(super) fn scratch_replace(&self, s: &mut Scratch, data: &[u8]) -> FsResult<()> {
        self.scratch_set_len(s, 0, true)?;
        self.scratch_write(s, 0, data)
    }

    /// A new, empty scratch file named `name` in `kind`'s directory.
    pub(super) fn new_scratch(&self, kind: Kind, name: &str, mode: u32) -> FsResult<ScratchFile> {
        let f = self.scratch_dir.create(kind, name, mode)?;
        Ok(Arc::new(Mutex::new(Scratch {
            kind,
            name: name.to_string(),
            file: Some(Arc::new(f)),
            nlink: 1,
        })))
    }

    /// The whole of a scratch file, for a rename onto a record (at most `limit` bytes:
    /// a record is never larger).
    pub(super) fn scratch_bytes(&self, s: &mut Scratch, limit: u64) -> FsResult<Vec<u8>> {
        let f = self.scratch_fd(s)?;
        let path = self.scratch_dir.path(s.kind, &s.name);
        let size = fstat(f.as_raw_fd())
            .map_err(|e| io_err("stat", &path, e))?
            .st_size as u64;
        if size > limit {
            return Err(FsError::refuse(
                libc::EFBIG,
                format!("{}: record over the size limit of {limit} bytes", s.name),
            ));
        }
        let mut buf = vec![0u8; size as usize];
        f.read_exact_at(&mut buf, 0)
            .map_err(|e| io_err("read", &path, e))?;
        Ok(buf)
    }

    /// A record's bytes become scratch file `name`, durable on disk before `remove`
    /// (which takes the record away) runs; undone if it fails.
    pub(super) fn record_to_scratch(
        &self,
        kind: Kind,
        name: &str,
        bytes: &[u8],
        remove: impl FnOnce() -> FsResult<()>,
    ) -> FsResult<ScratchFile> {
        self.writable()?;
        let s = Scratch {
            kind,
            name: name.to_string(),
            file: None,
            nlink: 1,
        };
        self.scratch_limit(&s, bytes.len() as u64)?;
        let put = self.scratch_dir.put_durable(kind, name, bytes, 0o644)?;
        if let Err(e) = remove() {
            self.scratch_dir.undo(put);
            return Err(e);
        }
        self.scratch_dir.keep(put);
        Ok(Arc::new(Mutex::new(s)))
    }

    /// Renames a scratch file on disk (replacing any file of the new name).
    pub(super) fn rename_scratch_file(&self, s: &mut Scratch, to: &str) -> FsResult<()> {
        self.scratch_dir.rename(s.kind, &s.name, to)?;
        s.name = to.to_string();
        Ok(())
    }

    /// Removes a scratch file's name, on disk too; descriptors still open keep its bytes
    /// (nlink 0).
    pub(super) fn unlink_scratch(&self, ino: u64) {
        if let Some(s) = self.forget_scratch(ino) {
            let s = s.lock();
            self.scratch_dir.unlink(s.kind, &s.name);
        }
    }

    /// Takes a scratch file out of its directory (its name on disk was replaced): nlink 0.
    pub(super) fn forget_scratch(&self, ino: u64) -> Option<ScratchFile> {
        let f = self.scratch.lock().remove(&ino)?;
        f.lock().nlink = 0;
        Some(f)
    }

    /// fsync of a scratch file.
    pub(super) fn scratch_sync(&self, s: &Scratch) -> FsResult<()> {
        match &s.file {
            Some(f) => f
                .sync_all()
                .map_err(|e| io_err("fsync", &self.scratch_dir.path(s.kind, &s.name), e)),
            None => Ok(()),
        }
    }
}
