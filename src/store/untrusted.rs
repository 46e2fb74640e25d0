//! Opening entries of a store that others can write.
//!
//! The daemon often runs as root beside a store its users (and the platform, and other
//! hosts) can write, so every entry in it is untrusted input. Nothing here is followed or
//! opened out of the store: a path is resolved with `openat2(RESOLVE_NO_SYMLINKS)` (a
//! symlink in any component fails with ELOOP), a file is opened `O_NOFOLLOW|O_NONBLOCK`
//! after an lstat says it is a regular file and checked again by fstat (a FIFO, socket or
//! device never blocks or answers a read), and whole-file reads are bounded.
//!
//! The store's root is the user's choice and may be reached through a symlink: it is
//! resolved once ([`trusted_path`]) and everything under it is checked.
//!
//! Entries refused this way are recorded once per path and reason ([`skipped`]) for the
//! log, `.errors` ([`take_skipped`]) and fsck.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::error::StoreError;

/// The most a store file read whole (a collection, a sidecar, the manifest) may hold.
pub const MAX_STORE_FILE_BYTES: u64 = 1 << 30;

/// What an entry is when it is not something the store may hold there.
pub fn describe(ft: &fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "a regular file"
    }
}

/// The error for an entry of the wrong type: ELOOP for a symlink, EINVAL for the rest
/// (never a type the caller would treat as "absent").
fn wrong_type(path: &Path, ft: &fs::FileType, wanted: &str) -> io::Error {
    let what = describe(ft);
    let errno = if ft.is_symlink() {
        libc::ELOOP
    } else if wanted == "a directory" {
        libc::ENOTDIR
    } else {
        libc::EINVAL
    };
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        Untrusted(format!(
            "{} is {what}, not {wanted}: not followed or opened (the store is untrusted input)",
            path.display()
        )),
    )
}

/// Refuses a directory that is not ours alone: owned by another user, or writable by
/// group or others (they could swap what we create in it).
pub fn ours_alone(path: &Path, m: &Metadata) -> io::Result<()> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() == me && m.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        Untrusted(format!(
            "{} is owned by uid {} with mode {:o}: agentmount keeps its state only where no other user ({me} is ours) can change it",
            path.display(),
            m.uid(),
            m.mode() & 0o7777
        )),
    ))
}

/// Records that a store entry of type `ft` was skipped (never followed or opened) and
/// returns the reason.
pub fn skip_entry(path: &Path, ft: &fs::FileType) -> String {
    let why = format!(
        "{} is {}, not a regular file: skipped, never followed or opened (the store is untrusted input)",
        path.display(),
        describe(ft)
    );
    skipped(path, &why);
    why
}

/// The reason an untrusted-entry refusal carries (its Display is the whole message).
#[derive(Debug)]
pub struct Untrusted(pub String);

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untrusted {}

/// Whether an I/O error is a refusal of an untrusted entry (a symlink on the path, a
/// special file), and its message if so.
pub fn refusal(e: &io::Error, path: &Path) -> Option<String> {
    if let Some(u) = e.get_ref().and_then(|r| r.downcast_ref::<Untrusted>()) {
        return Some(u.0.clone());
    }
    (e.raw_os_error() == Some(libc::ELOOP)).then(|| {
        format!(
            "{} is, or passes through, a symbolic link: not followed (the store is untrusted input)",
            path.display()
        )
    })
}

/// The store error for an I/O error on `path` while doing `what` ("read", "create"): an
/// untrusted entry is [`StoreError::Untrusted`] and is recorded as skipped; anything else
/// is plain I/O.
pub fn store_error(path: &Path, what: &str, e: io::Error) -> StoreError {
    match refusal(&e, path) {
        Some(why) => {
            skipped(path, &why);
            StoreError::Untrusted(why)
        }
        None => StoreError::io(format!("{what} {}", path.display()), e),
    }
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`.
fn openat2(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    match openat2_raw(libc::AT_FDCWD, path, flags, mode, resolve) {
        // Kernels before 5.6: the last component is still O_NOFOLLOW.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => legacy_open(&cstr(path)?, flags, mode),
        r => r,
    }
}

/// The openat2(2) call itself: `flags` with O_CLOEXEC|O_NOFOLLOW (and O_NOCTTY, which
/// O_PATH does not take), retried on EINTR and EAGAIN (a rename raced the walk).
fn openat2_raw(dirfd: i32, path: &Path, flags: i32, mode: u32, resolve: u64) -> io::Result<File> {
    // struct open_how of <linux/openat2.h> (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let c = cstr(path)?;
    let extra = if flags & libc::O_PATH != 0 {
        libc::O_CLOEXEC | libc::O_NOFOLLOW
    } else {
        libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY
    };
    let how = OpenHow {
        flags: (flags | extra) as u64,
        mode: mode as u64,
        resolve,
    };
    loop {
        // SAFETY: `c` is a NUL-terminated path (relative to `dirfd`, a descriptor the
        // caller holds, or AT_FDCWD) and `how` a properly sized open_how; both outlive
        // the call, and the descriptor returned is owned by the File below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(unsafe { File::from_raw_fd(fd as i32) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => return Err(e),
        }
    }
}

fn legacy_open(c: &CString, flags: i32, mode: u32) -> io::Result<File> {
    // SAFETY: a NUL-terminated path; the descriptor is owned by the File.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`:
/// `rel` may not leave `dir` (no `..` above it, no absolute path, no symlink anywhere).
fn openat2_beneath(dir: &File, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
    const RESOLVE_BENEATH: u64 = 0x08;
    let resolve = RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    openat2_raw(dir.as_raw_fd(), rel, flags, mode, resolve)
}

/// A directory of ours inside the store (agentmount's state: the journal), held open.
/// Every path below it is resolved beneath this descriptor, so the directory renamed away
/// or swapped while we run, a symlink, or a `..` in a name never reaches outside it; and
/// it is used only when it is ours alone (owned by us, writable by no one else), so nobody
/// else can plant anything in it.
pub struct Beneath {
    fd: File,
    path: PathBuf,
}

impl Beneath {
    /// Creates (0700) or opens `path`, refusing one that is not a directory owned by us
    /// and closed to others.
    pub fn open_private(path: &Path) -> io::Result<Beneath> {
        create_dir_all_mode(path, 0o700)?;
        let fd = open_dir(path)?;
        ours_alone(path, &fd.metadata()?)?;
        Ok(Beneath {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Where it is (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn at(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
        openat2_beneath(&self.fd, rel, flags, mode)
    }

    /// Opens a regular file below it for reading (never a FIFO or device).
    pub fn open_read(&self, rel: &Path) -> io::Result<File> {
        let f = self.at(rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
        regular(f, &self.path.join(rel), false)
    }

    /// A whole file below it, at most `max` bytes; `None` when it does not exist.
    pub fn read_bounded(&self, rel: &Path, max: u64) -> io::Result<Option<(Vec<u8>, Metadata)>> {
        let f = match self.open_read(rel) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = f.metadata()?;
        let buf = read_file_bounded(&f, m.len(), max, &self.path.join(rel))?;
        Ok(Some((buf, m)))
    }

    /// Opens (creating, `mode`) a file below it for appending: a regular file with one link.
    pub fn open_append(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let f = self.at(
            rel,
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_NONBLOCK,
            mode,
        )?;
        regular(f, &self.path.join(rel), true)
    }

    /// Creates a new file below it (it must not exist).
    pub fn create_new(&self, rel: &Path, mode: u32) -> io::Result<File> {
        self.at(rel, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)
    }

    /// Metadata of what is at `rel` (a symlink is not followed); `None` when nothing is.
    pub fn lstat(&self, rel: &Path) -> io::Result<Option<Metadata>> {
        match self.at(rel, libc::O_PATH, 0) {
            Ok(f) => f.metadata().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // The last component is a symlink (O_PATH|O_NOFOLLOW would give it, but
            // RESOLVE_NO_SYMLINKS refuses): something is there, and it is not ours.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(e),
            Err(e) => Err(e),
        }
    }

    /// Creates the directories of `rel` below it (mode `mode`), each one made and then
    /// opened relative to its parent's descriptor: no race can send it elsewhere.
    pub fn mkdir_all(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let mut cur = self.fd.try_clone()?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            let n = CString::new(name.as_bytes())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: a NUL-terminated name relative to a directory descriptor we hold.
            let r = unsafe { libc::mkdirat(cur.as_raw_fd(), n.as_ptr(), mode as libc::mode_t) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            cur = openat2_beneath(&cur, Path::new(name), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        }
        Ok(())
    }

    /// The directory holding `rel`, opened below us, and `rel`'s last name.
    fn parent_of<'a>(&self, rel: &'a Path) -> io::Result<(File, &'a str)> {
        let name = rel
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let dir = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => self.at(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
            None => self.fd.try_clone()?,
        };
        Ok((dir, name))
    }

    /// Renames `from` to `to`, both below it.
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (fd, fname) = self.parent_of(from)?;
        let (td, tname) = self.parent_of(to)?;
        let (f, t) = (
            CString::new(fname).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            CString::new(tname).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        );
        // SAFETY: NUL-terminated names relative to directory descriptors we hold.
        let r = unsafe { libc::renameat(fd.as_raw_fd(), f.as_ptr(), td.as_raw_fd(), t.as_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the file `rel` (a symlink there is removed, never followed).
    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        let (d, name) = self.parent_of(rel)?;
        unlink_in(&d, name)
    }

    /// Removes the empty directory `rel`.
    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        let (d, name) = self.parent_of(rel)?;
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated name relative to a directory descriptor we hold.
        if unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Lists the directory `rel` below it ("" for itself).
    pub fn read_dir(&self, rel: &Path) -> io::Result<fs::ReadDir> {
        let d = if rel.as_os_str().is_empty() {
            self.fd.try_clone()?
        } else {
            self.at(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?
        };
        fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
    }
}

/// lstat: `Ok(None)` when nothing is there.
pub fn lstat(path: &Path) -> io::Result<Option<Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a regular store file for reading: never a symlink (on any component), FIFO,
/// socket or device. `NotFound` when it does not exist.
pub fn open_read(path: &Path) -> io::Result<File> {
    // The lstat first: opening a device, even O_NONBLOCK, may do something.
    if let Some(m) = lstat(path)?
        && !m.file_type().is_file()
    {
        return Err(wrong_type(path, &m.file_type(), "a regular file"));
    }
    let f = openat2(path, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
    regular(f, path, false)
}

/// Opens (creating, mode `mode`, if absent) a regular file of ours for appending or
/// writing: never through a symlink, never a special file.
pub fn open_write(path: &Path, append: bool, mode: u32) -> io::Result<File> {
    if let Some(m) = lstat(path)?
        && !m.file_type().is_file()
    {
        return Err(wrong_type(path, &m.file_type(), "a regular file"));
    }
    let extra = if append { libc::O_APPEND } else { 0 };
    let f = openat2(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | extra,
        mode,
    )?;
    // One link: a hard link planted in the store to a file elsewhere is not written.
    regular(f, path, true)
}

/// Creates a new file (it must not exist): `O_CREAT|O_EXCL`, no symlink on the path.
pub fn create_new(path: &Path, read: bool, mode: u32) -> io::Result<File> {
    let access = if read { libc::O_RDWR } else { libc::O_WRONLY };
    openat2(path, access | libc::O_CREAT | libc::O_EXCL, mode)
}

/// Creates `name` in the open directory `dir` (it must not exist; never a symlink).
pub fn create_in(dir: &File, name: &str, mode: u32) -> io::Result<File> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated name relative to a directory descriptor we hold; the new
    // descriptor is owned by the File.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `renameat(dir, from, dir, to)`: both names in the one directory we hold open.
pub fn rename_in(dir: &File, from: &str, to: &str) -> io::Result<()> {
    let (f, t) = (
        CString::new(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        CString::new(to).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    // SAFETY: NUL-terminated names relative to a directory descriptor we hold.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `unlinkat(dir, name)` (a symlink there is removed, never followed).
pub fn unlink_in(dir: &File, name: &str) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated name relative to a directory descriptor we hold.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a directory of the store (no symlink on the path), e.g. to fsync it.
pub fn open_dir(path: &Path) -> io::Result<File> {
    if let Some(m) = lstat(path)?
        && !m.file_type().is_dir()
    {
        return Err(wrong_type(path, &m.file_type(), "a directory"));
    }
    openat2(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Lists a directory of the store, refusing one reached through a symlink.
pub fn read_dir(path: &Path) -> io::Result<fs::ReadDir> {
    let d = open_dir(path)?;
    // Listing our own verified descriptor: the name cannot be swapped under us.
    fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
}

/// Creates `dir` and its missing parents (mode 0755, or the umask's), refusing any
/// component that is a symlink or not a directory.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    create_dir_all_mode(dir, 0o755)
}

/// `create_dir_all` with the mode new directories get (`0o700` for private state).
///
/// Each directory is made (`mkdirat`) and then opened (`O_NOFOLLOW|O_DIRECTORY`) relative
/// to its parent's descriptor, from the root down: no component may be a symlink, and no
/// swap between a check and a use can send a `mkdir` elsewhere.
pub fn create_dir_all_mode(dir: &Path, mode: u32) -> io::Result<()> {
    let start = if dir.is_absolute() { "/" } else { "." };
    let mut cur = File::open(start)?;
    let mut walked = PathBuf::from(start);
    for c in dir.components() {
        let name = match c {
            Component::Normal(n) => n,
            Component::RootDir | Component::CurDir => continue,
            Component::Prefix(_) | Component::ParentDir => {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        };
        walked.push(name);
        let n = CString::new(name.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated name relative to a directory descriptor we hold.
        if unsafe { libc::mkdirat(cur.as_raw_fd(), n.as_ptr(), mode as libc::mode_t) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        // SAFETY: as above; the new descriptor is owned by the File.
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                n.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match lstat(&walked) {
                Ok(Some(m)) if !m.is_dir() => wrong_type(&walked, &m.file_type(), "a directory"),
                _ => e,
            });
        }
        // SAFETY: a fresh descriptor nobody else owns.
        cur = unsafe { File::from_raw_fd(fd) };
    }
    Ok(())
}

/// Reads a whole regular file, at most `max` bytes (more: EFBIG), with its metadata from
/// the open descriptor. `Ok(None)` when it does not exist.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Option<(Vec<u8>, Metadata)>> {
    let f = match open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    let buf = read_file_bounded(&f, m.len(), max, path)?;
    Ok(Some((buf, m)))
}

/// Reads an open file to its end, refusing more than `max` bytes.
pub fn read_file_bounded(mut f: &File, hint: u64, max: u64, path: &Path) -> io::Result<Vec<u8>> {
    if hint > max {
        return Err(too_big(path, hint, max));
    }
    let mut buf = Vec::with_capacity(hint as usize);
    (&mut f).take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_big(path, buf.len() as u64, max));
    }
    Ok(buf)
}

fn too_big(path: &Path, size: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        Untrusted(format!(
            "{} holds {size} bytes or more, over the limit of {max} for a store file read whole: not read",
            path.display()
        )),
    )
}

/// After an `O_NONBLOCK` open: the file must be a regular file (with one link, when we
/// write to it), then it is made blocking again.
fn regular(f: File, path: &Path, one_link: bool) -> io::Result<File> {
    let m = f.metadata()?;
    if !m.is_file() || (one_link && m.nlink() != 1) {
        let wanted = if one_link {
            "a regular file with one link"
        } else {
            "a regular file"
        };
        return Err(wrong_type(path, &m.file_type(), wanted));
    }
    clear_nonblock(&f);
    Ok(f)
}

fn clear_nonblock(f: &File) {
    // SAFETY: fcntl on a descriptor we own; only the status flags change.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
}

/// A path the user gave (the store's root, a flag's path): symlinks in the part that
/// exists are resolved once, here, so that everything checked under it has none.
pub fn trusted_path(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = fs::canonicalize(existing) {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                existing = p;
            }
            _ => return abs,
        }
    }
}

/// Checks that `dir` is ours alone, and so is the way to it: `dir` owned by us and
/// writable by no one else; every directory above it owned by us or root, and, where others
/// may write it, sticky (so they cannot rename our entries away). A directory others could
/// swap is never used to keep state a root daemon writes.
pub fn check_private_path(dir: &Path) -> io::Result<()> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let deny = |p: &Path, why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            Untrusted(format!(
                "{} {why}: agentmount keeps its state only where no other user can change it",
                p.display()
            )),
        )
    };
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(wrong_type(dir, &m.file_type(), "a directory"));
    }
    ours_alone(dir, &m)?;
    let mut cur = dir.parent();
    while let Some(p) = cur.filter(|p| !p.as_os_str().is_empty()) {
        let m = fs::symlink_metadata(p)?;
        if m.uid() != me && m.uid() != 0 {
            return Err(deny(p, format!("is owned by uid {}", m.uid())));
        }
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return Err(deny(
                p,
                format!("is writable by others (mode {:o})", m.mode() & 0o7777),
            ));
        }
        cur = p.parent();
    }
    Ok(())
}

/// Whether `m` is a file or directory owned by someone other than us and root (for
/// messages: who could have planted it).
pub fn owner_note(m: &Metadata) -> String {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() == me || m.uid() == 0 {
        String::new()
    } else {
        format!(" (owned by uid {})", m.uid())
    }
}

struct Skipped {
    seen: HashSet<(PathBuf, String)>,
    pending: Vec<(PathBuf, String)>,
    /// The newest few, for `.status`.
    recent: std::collections::VecDeque<(PathBuf, String)>,
    total: u64,
}

fn skipped_log() -> &'static Mutex<Skipped> {
    static LOG: OnceLock<Mutex<Skipped>> = OnceLock::new();
    LOG.get_or_init(|| {
        Mutex::new(Skipped {
            seen: HashSet::new(),
            pending: Vec::new(),
            recent: std::collections::VecDeque::new(),
            total: 0,
        })
    })
}

/// Records that a store entry was skipped, and why: logged once per path and reason, and
/// kept for `.errors` until the mount takes it. (One daemon serves one store, so the
/// record is process-wide.)
pub fn skipped(path: &Path, why: &str) {
    let mut l = skipped_log().lock();
    if l.seen.len() > 10_000 {
        l.seen.clear();
    }
    if l.seen.insert((path.to_path_buf(), why.to_string())) {
        tracing::error!(path = %path.display(), reason = why, "store entry skipped");
        if l.pending.len() < 1000 {
            l.pending.push((path.to_path_buf(), why.to_string()));
        }
        if l.recent.len() == 10 {
            l.recent.pop_front();
        }
        l.recent.push_back((path.to_path_buf(), why.to_string()));
        l.total += 1;
    }
}

/// How many distinct entries were skipped, and the newest few (for `.status`).
pub fn skipped_summary() -> (u64, Vec<(PathBuf, String)>) {
    let l = skipped_log().lock();
    (l.total, l.recent.iter().cloned().collect())
}

/// The entries skipped since the last call (for `.errors`).
pub fn take_skipped() -> Vec<(PathBuf, String)> {
    std::mem::take(&mut skipped_log().lock().pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_fifos_and_devices_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = trusted_path(d.path());
        let secret = root.join("secret");
        fs::write(&secret, b"root only").unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink(&secret, root.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("dirlink")).unwrap();
        fs::write(root.join("sub/file"), b"x").unwrap();
        let fifo = cstr(&root.join("fifo")).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        assert_eq!(read_bounded(&secret, 100).unwrap().unwrap().0, b"root only");
        let e = open_read(&root.join("link")).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert!(
            refusal(&e, &root.join("link"))
                .unwrap()
                .contains("symbolic link")
        );
        let e = open_read(&root.join("dirlink/file")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(refusal(&e, &root.join("dirlink/file")).is_some());
        let e = open_read(&root.join("fifo")).unwrap_err();
        assert!(refusal(&e, &root.join("fifo")).unwrap().contains("FIFO"));
        let e = open_read(Path::new("/dev/zero")).unwrap_err();
        assert!(
            refusal(&e, Path::new("/dev/zero"))
                .unwrap()
                .contains("character device")
        );
        assert!(open_write(&root.join("link"), true, 0o600).is_err());
        assert_eq!(fs::read(&secret).unwrap(), b"root only");
        assert!(create_dir_all(&root.join("dirlink/new")).is_err());
        assert!(!root.join("sub/new").exists());
        assert!(read_dir(&root.join("dirlink")).is_err());
        assert!(read_bounded(&root.join("missing"), 10).unwrap().is_none());
        let e = read_bounded(&secret, 4).unwrap_err();
        assert!(refusal(&e, &secret).unwrap().contains("over the limit"));
    }
}

#[cfg(test)]
mod beneath_tests {
    use super::*;

    #[test]
    fn beneath_keeps_everything_below_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let root = trusted_path(d.path());
        let b = Beneath::open_private(&root.join("state")).unwrap();
        b.mkdir_all(Path::new("history/goals/g-1"), 0o700).unwrap();
        let mut f = b
            .create_new(Path::new("history/goals/g-1/.v.tmp"), 0o600)
            .unwrap();
        std::io::Write::write_all(&mut f, b"v1").unwrap();
        b.rename(
            Path::new("history/goals/g-1/.v.tmp"),
            Path::new("history/goals/g-1/v"),
        )
        .unwrap();
        let (data, _) = b
            .read_bounded(Path::new("history/goals/g-1/v"), 10)
            .unwrap()
            .unwrap();
        assert_eq!(data, b"v1");
        assert!(
            b.lstat(Path::new("history/goals/g-1/v"))
                .unwrap()
                .unwrap()
                .is_file()
        );
        assert!(b.mkdir_all(Path::new("../escape"), 0o700).is_err());
        assert!(b.create_new(Path::new("../escape"), 0o600).is_err());
        assert!(!root.join("escape").exists());
        std::os::unix::fs::symlink("/etc/passwd", root.join("state/link")).unwrap();
        assert!(b.open_read(Path::new("link")).is_err());
        b.unlink(Path::new("history/goals/g-1/v")).unwrap();
        b.rmdir(Path::new("history/goals/g-1")).unwrap();
    }

    #[test]
    fn state_is_kept_only_where_no_one_else_can_change_it() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = trusted_path(d.path());
        let mine = root.join("mine");
        create_dir_all_mode(&mine, 0o700).unwrap();
        check_private_path(&mine).unwrap();
        // A parent others may write, not sticky: they could rename ours away.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private_path(&mine).is_err());
        fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
        check_private_path(&mine).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(check_private_path(&mine).is_err());
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            fs::set_permissions(&mine, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&mine, Some(65534), None).unwrap();
            assert!(check_private_path(&mine).is_err());
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
    }
}
