//! POSIX where POSIX applies, on a real mount: what pjdfstest and fsx found in scratch files
//! and timestamps (unlinked open files, atime, long names, directory and file times), and
//! the attribute families the mount does not have.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::*;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn fstat(fd: i32) -> libc::stat {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0, "fstat");
    st
}

fn ns(m: &std::fs::Metadata) -> (i128, i128) {
    (
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
    )
}

fn tick() {
    std::thread::sleep(Duration::from_millis(15));
}

#[test]
fn an_unlinked_file_that_is_still_open_keeps_working() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let p = m.p("sessions/nf");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    use std::os::fd::AsRawFd;
    f.write_all_at(b"abc", 0).unwrap();
    std::fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let s = fstat(f.as_raw_fd());
    assert_eq!((s.st_nlink, s.st_size), (0, 3), "fstat: nlink 0, its size");
    let mut buf = [0u8; 8];
    assert_eq!(f.read_at(&mut buf, 0).unwrap(), 3);
    assert_eq!(&buf[..3], b"abc");
    f.write_all_at(b"def", 3).unwrap();
    f.set_len(4).unwrap();
    assert_eq!(f.read_at(&mut buf, 0).unwrap(), 4);
    assert_eq!(&buf[..4], b"abcd");
    drop(f);
    // A name made again is a new file.
    std::fs::write(&p, b"x").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"x");

    // A descriptor open on a file replaced by rename(b, a) keeps reading the old bytes.
    let (a, b) = (m.p("sessions/a"), m.p("sessions/b"));
    std::fs::write(&a, b"old").unwrap();
    std::fs::write(&b, b"new").unwrap();
    let f = std::fs::File::open(&a).unwrap();
    std::fs::rename(&b, &a).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(f.read_at(&mut buf, 0).unwrap(), 3);
    assert_eq!(&buf[..3], b"old");
    assert_eq!(std::fs::read(&a).unwrap(), b"new");

    // A record removed while open: its descriptor keeps the version it opened.
    let r = m.p(&format!("sessions/{S_ACTIVE}.json"));
    let before = std::fs::read(&r).unwrap();
    let f = std::fs::File::open(&r).unwrap();
    std::fs::remove_file(&r).unwrap();
    let s = fstat(f.as_raw_fd());
    assert_eq!(s.st_nlink, 0);
    assert_eq!(s.st_size as usize, before.len());
    let mut got = vec![0u8; before.len() + 10];
    let n = f.read_at(&mut got, 0).unwrap();
    assert_eq!(&got[..n], &before[..]);
}

#[test]
fn atime_is_kept_apart_from_mtime() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let p = m.p("goals/scratch.txt");
    std::fs::write(&p, b"x").unwrap();
    let c = cpath(&p);
    let times = [
        libc::timespec {
            tv_sec: 1_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 2_000,
            tv_nsec: 0,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.mtime()), (1_000, 2_000));
    // atime alone (mtime UTIME_OMIT).
    let times = [
        libc::timespec {
            tv_sec: 3_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.mtime()), (3_000, 2_000));
}

#[test]
fn names_up_to_the_reported_limit_work_and_longer_ones_are_enametoolong() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(cpath(m.path()).as_ptr(), &mut sv) },
        0
    );
    let max = sv.f_namemax as usize;
    assert_eq!(max, 255);
    for n in [250, 251, 254, 255] {
        let p = m.p(&format!("sessions/{}", "a".repeat(n)));
        std::fs::write(&p, b"x").unwrap_or_else(|e| panic!("{n}-byte name: {e}"));
        std::fs::rename(&p, m.p(&format!("sessions/{}", "b".repeat(n)))).unwrap();
    }
    let e = std::fs::write(m.p(&format!("sessions/{}", "a".repeat(256))), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
}

#[test]
fn timestamps_move_as_posix_says() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let dir = m.p("sessions");
    // Creating, renaming and unlinking an entry change its directory's mtime and ctime.
    let d0 = ns(&std::fs::metadata(&dir).unwrap());
    tick();
    std::fs::write(m.p("sessions/f"), b"1").unwrap();
    let d1 = ns(&std::fs::metadata(&dir).unwrap());
    assert!(d1.0 > d0.0 && d1.1 > d0.1, "create: {d0:?} -> {d1:?}");
    tick();
    std::fs::rename(m.p("sessions/f"), m.p("sessions/g")).unwrap();
    let d2 = ns(&std::fs::metadata(&dir).unwrap());
    assert!(d2.0 > d1.0 && d2.1 > d1.1, "rename");
    tick();
    std::fs::remove_file(m.p("sessions/g")).unwrap();
    let d3 = ns(&std::fs::metadata(&dir).unwrap());
    assert!(d3.0 > d2.0 && d3.1 > d2.1, "unlink");

    // pwrite and O_TRUNC mark mtime and ctime; a truncation that changes the size too.
    let p = m.p("sessions/t");
    std::fs::write(&p, b"12345").unwrap();
    let t0 = ns(&std::fs::metadata(&p).unwrap());
    tick();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"x", 1)
        .unwrap();
    let t1 = ns(&std::fs::metadata(&p).unwrap());
    assert!(t1.0 > t0.0 && t1.1 > t0.1, "pwrite: {t0:?} -> {t1:?}");
    tick();
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap(),
    );
    let t2 = ns(&std::fs::metadata(&p).unwrap());
    assert!(t2.0 > t1.0 && t2.1 > t1.1, "O_TRUNC");
    tick();
    let c = cpath(&p);
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 100) }, 0);
    let t3 = ns(&std::fs::metadata(&p).unwrap());
    assert!(t3.0 > t2.0 && t3.1 > t2.1, "truncate that changes the size");
    // posix_fallocate (emulated by writing: fallocate(2) is not offered) marks them too.
    tick();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 200) }, 0);
    drop(f);
    let t4 = ns(&std::fs::metadata(&p).unwrap());
    assert!(t4.0 > t3.0 && t4.1 > t3.1, "posix_fallocate");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 200);
    // Hole punching is not offered: EOPNOTSUPP (the README's limits say so).
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            10,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
}

/// No security labels and no ACLs: EOPNOTSUPP (DESIGN §7), so `ls -l` asks once per device
/// instead of twice per file, and ACL-aware copies treat the mount as having none.
#[test]
fn security_and_acl_attributes_are_not_supported_and_ls_stops_asking() {
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let p = cpath(&m.p(&format!("sessions/{S_ACTIVE}.json")));
    for name in ["security.selinux", "system.posix_acl_access"] {
        let n = CString::new(name).unwrap();
        let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "{name}"
        );
    }
    // user.* attributes of attachments are still there.
    let out = sh_ok(
        "getfattr -n user.sha256 --only-values attachments/pixel.png",
        m.path(),
    );
    assert_eq!(out, PIXEL);
    // A permission check still works on mode bits alone.
    assert!(std::fs::read(m.p(&format!("sessions/{S_ACTIVE}.json"))).is_ok());
    // cp -a, rsync -aAX and tar --acls work from and back into the mount.
    let tmp = tempfile::tempdir().unwrap();
    sh_ok(
        &format!(
            "cp -a goals {0}/g && rsync -aAX goals/ {0}/r/ && tar --acls --xattrs -cf {0}/t.tar goals && cp -a {0}/g/. goals/ && rsync -aA {0}/r/ goals/",
            tmp.path().display()
        ),
        m.path(),
    );
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok()
    {
        let o = sh(
            "strace -f -c -e trace=getxattr,lgetxattr ls -l sessions goals attachments 2>&1 >/dev/null",
            m.path(),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        let calls: u64 = text
            .lines()
            .filter(|l| l.ends_with("getxattr"))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
            .sum();
        assert!(calls <= 4, "ls -l asked {calls} times: {text}");
    }
}

/// Records are read from the kernel's page cache. A descriptor keeps the version it opened,
/// whole, while the platform renames a longer version into place and while a writer
/// through the mount replaces the record; new opens and stat see each new version at once;
/// the record keeps one inode number throughout, as a file written in place does.
#[test]
fn a_record_read_from_the_page_cache_keeps_its_version_while_it_changes() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let rec = m.p(&format!("sessions/{S_ACTIVE}.json"));
    let store_file = st.path().join("session-manager/sessions.json");
    let read_whole = |f: &std::fs::File| {
        let mut buf = vec![0u8; 1 << 16];
        let n = f.read_at(&mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    };
    // Read it twice, so the second open finds its pages.
    let v1 = std::fs::read(&rec).unwrap();
    let held = std::fs::File::open(&rec).unwrap();
    assert_eq!(read_whole(&held), v1);
    let ino = std::fs::metadata(&rec).unwrap().ino();

    // The platform renames a longer version into place.
    let long = "x".repeat(9000);
    let orig = std::fs::read_to_string(&store_file).unwrap();
    let text = orig.replace("fix flaky login test", &long);
    let tmp = store_file.with_extension("tmp");
    std::fs::write(&tmp, &text).unwrap();
    std::fs::rename(&tmp, &store_file).unwrap();
    let mut v2 = Vec::new();
    std::fs::File::open(&rec)
        .unwrap()
        .read_to_end(&mut v2)
        .unwrap();
    let task = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap()["task"].clone();
    assert_eq!(
        task(&v2),
        long.as_str(),
        "an open after the rename reads the new version"
    );
    let md = std::fs::metadata(&rec).unwrap();
    assert_eq!(
        md.len() as usize,
        v2.len(),
        "stat shows the new version's size"
    );
    assert_eq!(md.ino(), ino, "the record keeps its inode number");
    assert_eq!(
        read_whole(&held),
        v1,
        "the held descriptor reads its version, whole"
    );
    assert_eq!(fstat(held.as_raw_fd()).st_size as usize, v1.len());

    // A writer through the mount replaces it while the descriptor is still held (a shorter
    // version, O_TRUNC), then a reader reads it twice.
    let mut short: serde_json::Value = serde_json::from_slice(&v1).unwrap();
    short["task"] = "short".into();
    std::fs::write(&rec, serde_json::to_vec(&short).unwrap()).unwrap();
    assert_eq!(
        read_whole(&held),
        v1,
        "still whole after a write through the mount"
    );
    for _ in 0..2 {
        let mut v3 = Vec::new();
        std::fs::File::open(&rec)
            .unwrap()
            .read_to_end(&mut v3)
            .unwrap();
        assert_eq!(task(&v3), "short");
        assert_eq!(std::fs::metadata(&rec).unwrap().len() as usize, v3.len());
    }
    assert_eq!(std::fs::metadata(&rec).unwrap().ino(), ino);
    drop(held);
    // The platform's next version, after every descriptor closed, is read at once too.
    let text = orig.replace("fix flaky login test", "after");
    std::fs::write(&tmp, &text).unwrap();
    std::fs::rename(&tmp, &store_file).unwrap();
    for _ in 0..2 {
        let v4 = std::fs::read(&rec).unwrap();
        assert_eq!(task(&v4), "after");
        assert_eq!(std::fs::metadata(&rec).unwrap().len() as usize, v4.len());
    }
}
