//! Mounting as an ordinary user through the setuid `fusermount3` helper, as libfuse does:
//! fusermount3 opens /dev/fuse, mounts, and passes the descriptor back over a socket named
//! by `_FUSE_COMMFD`. fuser only falls back to fusermount3 when it can open /dev/fuse
//! itself, which an ordinary user often cannot (mode 0600), so we do the handshake here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    ["fusermount3", "fusermount"].iter().find_map(|b| {
        std::env::split_paths(&path)
            .map(|d| d.join(b))
            .find(|c| c.is_file())
    })
}

/// Mounts `mountpoint` with the comma-separated kernel/fusermount `options`; returns the
/// /dev/fuse descriptor for `fuser::Session::from_fd`.
pub fn mount(mountpoint: &Path, options: &str) -> io::Result<OwnedFd> {
    let bin = binary().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "fusermount3 not found (apt-get install fuse3)",
        )
    })?;
    let (ours, theirs) = UnixStream::pair()?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&bin);
    cmd.arg("-o").arg(options).arg("--").arg(mountpoint);
    cmd.env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe fcntl is called, on a descriptor
    // that exists in the child: it is kept open across exec for fusermount3 to use.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let received = receive_fd(&ours);
    drop(ours);
    let out = child.wait_with_output()?;
    match received {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let kind = if msg.contains("user_allow_other") || msg.contains("ermission denied") {
                io::ErrorKind::PermissionDenied
            } else {
                e.kind()
            };
            Err(io::Error::new(
                kind,
                if msg.is_empty() {
                    format!("fusermount3 failed: {e}")
                } else {
                    msg
                },
            ))
        }
    }
}

fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    // Room for one descriptor's control message.
    let mut cbuf = [0u64; 8];
    loop {
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; every pointer in it refers to buffers that outlive
        // the recvmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: see above; the socket is open.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "fusermount3 closed the socket without a descriptor",
            ));
        }
        // SAFETY: CMSG_* walk the control buffer recvmsg filled, within msg_controllen.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if !cmsg.is_null()
                && (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SCM_RIGHTS
            {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if fd >= 0 {
                    return Ok(OwnedFd::from_raw_fd(fd));
                }
            }
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fusermount3 sent no descriptor",
        ));
    }
}

/// Unmounts through fusermount3 (`-z`: lazily, so a busy mount still goes).
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let bin =
        binary().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "fusermount3 not found"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg("--").arg(mountpoint).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
