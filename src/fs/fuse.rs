//! The fuser adapter: turns kernel requests into calls on `Core` and its results into
//! replies. No filesystem rules live here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use parking_lot::Mutex;

use super::{Attr, Caller, Commit, Core, FileKind, FsError, OpenMode, SetAttr};

/// `.status` `data_path.attachments` until the first open of an attachment tries
/// passthrough (the kernel offers it; whether the daemon may use it is known only then).
const PASSTHROUGH_UNTRIED: &str =
    "passthrough offered by the kernel, not tried yet (decided at the first open of an attachment)";

pub struct AgentFs {
    pub core: Arc<Core>,
    passthrough: Passthrough,
}

impl AgentFs {
    pub fn new(core: Arc<Core>) -> Self {
        AgentFs {
            core,
            passthrough: Passthrough::default(),
        }
    }
}

/// FUSE passthrough for attachment bytes: the kernel reads the store file itself, so warm
/// reads run at the backing filesystem's speed. The kernel fails an open (EIO) that mixes
/// passthrough and cached modes on one inode, so every open of a blob shares one backing id
/// while any is open, and the first failure to make one (no CAP_SYS_ADMIN, say) turns
/// passthrough off for good: later blobs are served from the page cache (keep_cache).
#[derive(Default)]
struct Passthrough {
    /// Whether new backing ids may be made (negotiated at init, cleared on a failure).
    enabled: AtomicBool,
    by_ino: Mutex<HashMap<u64, Weak<BackingId>>>,
    by_fh: Mutex<HashMap<u64, Arc<BackingId>>>,
}

impl Passthrough {
    /// The backing id for `ino`'s open `fh`: the one its other opens share, or a new one
    /// from `make`. `None`: serve this open from the page cache.
    fn backing(
        &self,
        ino: u64,
        fh: u64,
        make: impl FnOnce() -> Option<std::io::Result<BackingId>>,
        on_failure: impl FnOnce(&std::io::Error),
    ) -> Option<Arc<BackingId>> {
        let mut by_ino = self.by_ino.lock();
        let id = match by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None if !self.enabled.load(Ordering::Relaxed) => return None,
            None => match make()? {
                Ok(id) => {
                    let id = Arc::new(id);
                    by_ino.insert(ino, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    self.enabled.store(false, Ordering::Relaxed);
                    on_failure(&e);
                    return None;
                }
            },
        };
        by_ino.retain(|_, w| w.strong_count() > 0);
        self.by_fh.lock().insert(fh, id.clone());
        Some(id)
    }

    fn release(&self, fh: u64) {
        self.by_fh.lock().remove(&fh);
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        st_ino: (a.st_ino != 0 && a.st_ino != a.ino).then_some(INodeNo(a.st_ino)),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: if a.kind == FileKind::Dir { 2 } else { a.nlink },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Who a request comes from, as the kernel names it.
fn caller_of(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno)
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::EINVAL)
}

/// Why a name that is not UTF-8 cannot be made here (every name in the tree is text: ids,
/// labels, JSON keys).
const NOT_UTF8: &str =
    "the name is not UTF-8 (shown with \\xNN for its other bytes): names here are text";

fn fopen(m: OpenMode) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if m.direct_io {
        f |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if m.keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if m.noflush {
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

fn time_of(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

impl Filesystem for AgentFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open (so `echo > file` is one buffered write); attachment
        // pages are dropped if their mtime ever changes; shared mmap of direct-I/O records;
        // READDIRPLUS so `ls -l` gets attributes with the names, not a lookup per name.
        for cap in [
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::info!(?cap, "kernel does not offer capability");
            }
        }
        let _ = config.set_max_write(1 << 20);
        // Passthrough needs the kernel's consent and a stacking depth for the backing files
        // (2: the store may itself be on overlayfs).
        let why_not = match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            Err(_) => Some("the kernel does not offer FUSE passthrough".to_string()),
            Ok(()) => match config.set_max_stack_depth(2) {
                Ok(_) => None,
                Err(max) => config
                    .set_max_stack_depth(max)
                    .err()
                    .map(|_| "the kernel refused a passthrough stacking depth".to_string()),
            },
        };
        let path = match why_not {
            None => {
                self.passthrough.enabled.store(true, Ordering::Relaxed);
                PASSTHROUGH_UNTRIED.to_string()
            }
            Some(why) => {
                tracing::info!("attachment reads through the page cache: {why}");
                format!("page cache (keep_cache): {why}")
            }
        };
        *self.core.attachment_data_path.lock() = path;
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // No such name exists; making one is refused (with a reason) where it is made.
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        match self.core.lookup(parent.0, name) {
            Ok(a) => reply.entry_with_ttls(&a.ttl, &a.ttl, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&a.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let caller = caller_of(req);
        match self.core.setattr(
            caller,
            ino.0,
            fh.map(|f| f.0),
            SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: time_of(atime),
                mtime: time_of(mtime),
            },
        ) {
            Ok(a) => reply.attr(&a.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.refuse(
            parent,
            name,
            "mknod",
            "device nodes, fifos and sockets cannot be made here",
        );
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.refuse(
            parent,
            name,
            "mkdir",
            "the tree's directories are fixed: mkdir is not allowed",
        );
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = caller_of(req);
        let Some(name) = self.utf8_name(parent, name, "unlink") else {
            return reply.error(Errno::EINVAL);
        };
        match self.core.unlink(caller, parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.refuse(
            parent,
            name,
            "rmdir",
            "the tree's directories are fixed: rmdir is not allowed",
        );
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let caller = caller_of(req);
        let Some(name) = self.utf8_name(parent, link_name, "symlink") else {
            return reply.error(Errno::EINVAL);
        };
        match self.core.symlink(caller, parent.0, name, target) {
            Ok(a) => reply.entry_with_ttls(&a.ttl, &a.ttl, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let caller = caller_of(req);
        let (Some(name), Some(newname)) = (
            self.utf8_name(parent, name, "rename"),
            self.utf8_name(newparent, newname, "rename"),
        ) else {
            return reply.error(Errno::EINVAL);
        };
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        match self.core.rename(
            caller,
            parent.0,
            name,
            newparent.0,
            newname,
            noreplace,
            exchange,
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.refuse(newparent, newname, "link", "hard links are not allowed");
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = flags.0 & libc::O_TRUNC != 0;
        let (fh, m) = match self.core.open(ino.0, write, trunc) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(&e)),
        };
        let backing = if m.passthrough {
            self.passthrough.backing(
                ino.0,
                fh,
                || self.core.with_blob_file(fh, |f| reply.open_backing(f)),
                |e| {
                    tracing::warn!(error = %e, "FUSE passthrough unavailable; attachment reads go through the page cache");
                    *self.core.attachment_data_path.lock() =
                        format!("page cache (keep_cache): passthrough failed: {e}");
                },
            )
        } else {
            None
        };
        if backing.is_some() {
            let mut p = self.core.attachment_data_path.lock();
            if *p == PASSTHROUGH_UNTRIED {
                *p = "passthrough (the kernel reads the store file)".into();
            }
        }
        match backing {
            // The kernel takes only passthrough-compatible flags here (no KEEP_CACHE: the
            // backing file's own page cache is used).
            Some(id) => reply.opened_passthrough(
                FileHandle(fh),
                fopen(OpenMode {
                    keep_cache: false,
                    ..m
                }),
                &id,
            ),
            None => reply.opened(FileHandle(fh), fopen(m)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.core.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.core.write(fh.0, offset, data, lock.map(|l| l.0)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        let caller = caller_of(req);
        match self
            .core
            .flush(caller, fh.0, Commit::Close { owner: lock.0 })
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let caller = caller_of(req);
        // A last flush in case the kernel did not send one (its errors cannot reach close).
        let _ = self.core.flush(caller, fh.0, Commit::Release);
        self.core.release(fh.0);
        self.passthrough.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let caller = caller_of(req);
        match self.core.flush(caller, fh.0, Commit::Fsync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.core.dir_page(fh.0, offset, |e, next| {
            // d_ino is the number stat shows (a record keeps one across its versions).
            let ino = match &e.attr {
                Some(a) if a.st_ino != 0 => a.st_ino,
                _ => self.core.st_ino(e.ino).unwrap_or(e.ino),
            };
            reply.add(INodeNo(ino), next, file_type(e.kind), &e.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.core.dir_page(fh.0, offset, |e, next| {
            // A name that vanished between listing and now is skipped rather than faked. A
            // record's name may have a newer node id than the listing's, and a node id shows
            // its own version, which may be newer than the listing.
            let Some(ino) = self.core.listed_ino(e.ino) else {
                return false;
            };
            let mut attr = match (self.core.pinned_attr(ino), &e.attr) {
                (Some(a), _) => a,
                (None, Some(a)) if ino == e.ino => a.clone(),
                _ => match self.core.getattr(ino, None) {
                    Ok(a) => a,
                    Err(_) => return false,
                },
            };
            if attr.st_ino == 0 {
                attr.st_ino = self.core.st_ino(ino).unwrap_or(0);
            }
            let full = reply.add(
                INodeNo(ino),
                next,
                &e.name,
                &attr.ttl,
                &to_attr(&attr),
                Generation(0),
            );
            if !full {
                self.core.handed_out(ino);
            }
            full
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every change is already durable when the call that made it returns.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.core.statfs();
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // ENOSYS once, and the kernel stops asking: every later call gets EOPNOTSUPP.
        if !self.core.opts.xattrs {
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        // The mount has no security labels and no ACLs (DESIGN §7): EOPNOTSUPP, not
        // ENODATA, so `ls -l` (coreutils remembers an unsupported filesystem per device)
        // stops asking after the first file, and cp -a, rsync -A and tar --acls treat the
        // mount as a filesystem without ACLs. FUSE_POSIX_ACL is not negotiated, so the
        // kernel's permission checks use the mode bits alone and never ask.
        let n = name.as_encoded_bytes();
        if n.starts_with(b"security.") || n.starts_with(b"system.posix_acl_") {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let attrs = match self.core.xattrs(ino.0) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(&e)),
        };
        let Some((_, v)) = attrs.iter().find(|(n, _)| OsStr::new(n) == name) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        if size == 0 {
            reply.size(v.len() as u32);
        } else if (size as usize) < v.len() {
            reply.error(Errno::from_i32(libc::ERANGE));
        } else {
            reply.data(v);
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.core.opts.xattrs {
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        let attrs = match self.core.xattrs(ino.0) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut buf = Vec::new();
        for (n, _) in &attrs {
            buf.extend_from_slice(n.as_bytes());
            buf.push(0);
        }
        if size == 0 {
            reply.size(buf.len() as u32);
        } else if (size as usize) < buf.len() {
            reply.error(Errno::from_i32(libc::ERANGE));
        } else {
            reply.data(&buf);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in: &[u8],
        _out: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Terminal probes (TCGETS from cat, shells): not a terminal, quietly.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(name) = self.utf8_name(parent, name, "create") else {
            return reply.error(Errno::EINVAL);
        };
        match self.core.create(parent.0, name, mode) {
            Ok((a, fh, m)) => reply.created(
                &a.ttl,
                &to_attr(&a),
                Generation(0),
                FileHandle(fh),
                fopen(m),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl AgentFs {
    /// `name` as text, or None after recording in `.errors` why a name that is not UTF-8
    /// cannot be made (shown escaped).
    fn utf8_name<'a>(&self, parent: INodeNo, name: &'a OsStr, op: &str) -> Option<&'a str> {
        if let Ok(n) = name_str(name) {
            return Some(n);
        }
        self.core.report(
            &self.shown_path(parent, name),
            op,
            &FsError::refuse(libc::EINVAL, NOT_UTF8),
        );
        None
    }

    /// The path of `name` in `parent` for `.errors`: bytes that are not UTF-8 and control
    /// characters escaped.
    fn shown_path(&self, parent: INodeNo, name: &OsStr) -> String {
        use std::os::unix::ffi::OsStrExt;
        self.core
            .path_of(parent.0, &crate::error::escape_bytes(name.as_bytes()))
    }

    fn refuse(&self, parent: INodeNo, name: &OsStr, op: &str, reason: &str) {
        let path = self.shown_path(parent, name);
        self.core
            .report(&path, op, &FsError::refuse(libc::EPERM, reason));
    }
}
