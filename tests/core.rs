//! The fast lane: the mount's core driven in-process (no FUSE, no kernel) against every
//! backend, through the same `Core` calls `src/fs/fuse.rs` makes (tests/common/harness.rs).
//! The cases are a subset of tests/mount.rs and tests/conformance.rs that run in
//! milliseconds; `seam_failures` makes each seam call of each change fail in turn
//! (tests/common/failing.rs) and checks that the change is refused with the error's errno
//! and leaves the store byte for byte as it was.
//!
//! `cargo test --test core sqlite` runs one backend's cases.

mod common;
#[path = "common/failing.rs"]
mod failing;
#[path = "common/harness.rs"]
mod harness;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use agentmount::backend::Backend;
use agentmount::fs::{FsResult, SetAttr};
use common::{NOTES, PIXEL};
use failing::{Failing, Fault};
use harness::{Store, Vfs, Which, errno};
use serde_json::{Value, json};
use sha2::Digest;

const NEW: &str = "c0000000-0000-4000-8000-000000000001";

fn vfs(s: &Store) -> Vfs {
    Vfs::new(s.backend.clone(), true)
}

fn session_path(id: &str) -> String {
    format!("sessions/{id}.json")
}

fn last_error(v: &Vfs) -> Value {
    v.errors().pop().expect("a line in .errors")
}

fn write_a_record_and_read_it_back(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    v.write_file(&session_path(NEW), &s.session(NEW, "made here"))
        .unwrap();
    let back = v.read_file(&session_path(NEW)).unwrap();
    assert_eq!(s.marker_in(&back), "made here");
    let shown: Value = serde_json::from_slice(&back).unwrap();
    assert_eq!(shown[s.id_field()], NEW, "the id is the file name's");
    assert_eq!(s.stored_marker(NEW).as_deref(), Some("made here"));
    assert_eq!(
        v.lookup(&session_path(NEW)).unwrap().size,
        back.len() as u64
    );
    assert!(
        v.readdir("sessions")
            .unwrap()
            .contains(&format!("{NEW}.json"))
    );
    // Over an existing record: one upsert, the others untouched.
    let [a, b, _] = s.sessions();
    let other = s.stored_marker(&b);
    v.write_file(&session_path(&a), &s.session(&a, "changed"))
        .unwrap();
    assert_eq!(s.stored_marker(&a).as_deref(), Some("changed"));
    assert_eq!(s.stored_marker(&b), other);
}

fn invalid_json_is_einval_with_a_reason_and_changes_nothing(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, ..] = s.sessions();
    let before = s.dump();
    let r = v.write_file(&session_path(&a), b"{\"task\": ");
    assert_eq!(errno(&r), libc::EINVAL);
    let e = last_error(&v);
    assert_eq!(e["errno"], "EINVAL", "{e}");
    assert_eq!(e["path"], format!("/sessions/{a}.json"), "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("invalid JSON"),
        "{e}"
    );
    assert_eq!(s.dump(), before, "the store is byte-identical");
    // A name that is no id of the collection: EINVAL at create.
    let r = v.write_file("sessions/not-a-uuid.json", &s.session(&a, "x"));
    assert_eq!(errno(&r), libc::EINVAL);
    assert_eq!(s.dump(), before);
}

fn an_id_that_disagrees_with_the_name_is_einval(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, b, _] = s.sessions();
    let mut rec: Value = serde_json::from_slice(&s.session(&a, "x")).unwrap();
    rec[s.id_field()] = json!(b);
    let before = s.dump();
    let r = v.write_file(&session_path(&a), &serde_json::to_vec(&rec).unwrap());
    assert_eq!(errno(&r), libc::EINVAL);
    assert_eq!(last_error(&v)["errno"], "EINVAL");
    assert_eq!(s.dump(), before);
}

fn rename_rekeys(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, ..] = s.sessions();
    let marker = s.stored_marker(&a).unwrap();
    v.rename(&session_path(&a), &session_path(NEW)).unwrap();
    assert_eq!(errno(&v.lookup(&session_path(&a))), libc::ENOENT);
    let moved: Value = serde_json::from_slice(&v.read_file(&session_path(NEW)).unwrap()).unwrap();
    assert_eq!(moved[s.id_field()], NEW, "the id is rewritten");
    assert_eq!(moved[s.marker_field()], marker.as_str());
    assert_eq!(s.stored_marker(&a), None);
    assert_eq!(s.stored_marker(NEW), Some(marker));
    // Between collections: EXDEV (mv then copies, which validates).
    let other = s.backend.collections()[1].dir_name();
    let r = v.rename(&session_path(NEW), &format!("{other}/x.json"));
    assert_eq!(errno(&r), libc::EXDEV);
}

fn unlink_removes(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, b, _] = s.sessions();
    v.unlink(&session_path(&a)).unwrap();
    assert_eq!(errno(&v.lookup(&session_path(&a))), libc::ENOENT);
    assert_eq!(s.stored_marker(&a), None);
    assert!(s.stored_marker(&b).is_some());
    let listed = v.readdir("sessions").unwrap();
    assert!(!listed.contains(&format!("{a}.json")), "{listed:?}");
}

/// `sed -i`, `vim`, `rsync`: a scratch file written, then renamed over the record.
fn a_scratch_file_renamed_onto_a_record_upserts_it(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, ..] = s.sessions();
    let before = s.dump();
    let tmp = format!("sessions/.{a}.json.sedXyZ");
    v.write_file(&tmp, &s.session(&a, "via sed -i")).unwrap();
    assert_eq!(s.dump(), before, "a scratch file is never in the store");
    assert_eq!(s.marker_in(&v.read_file(&tmp).unwrap()), "via sed -i");
    v.rename(&tmp, &session_path(&a)).unwrap();
    assert_eq!(s.stored_marker(&a).as_deref(), Some("via sed -i"));
    assert_eq!(errno(&v.lookup(&tmp)), libc::ENOENT);
    // Refused bytes leave the scratch file where it was.
    v.write_file(&tmp, b"{broken").unwrap();
    let before = s.dump();
    assert_eq!(errno(&v.rename(&tmp, &session_path(&a))), libc::EINVAL);
    assert_eq!(s.dump(), before);
    assert_eq!(v.read_file(&tmp).unwrap(), b"{broken");
}

fn chmod_that_changes_nothing_succeeds_and_one_that_would_is_eperm(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let [a, ..] = s.sessions();
    let p = session_path(&a);
    let perm = v.lookup(&p).unwrap().perm;
    let same = SetAttr {
        mode: Some(libc::S_IFREG | perm as u32),
        ..SetAttr::default()
    };
    v.setattr(&p, same).unwrap();
    let other = SetAttr {
        mode: Some(libc::S_IFREG | 0o600),
        ..SetAttr::default()
    };
    assert_eq!(errno(&v.setattr(&p, other)), libc::EPERM);
}

fn sha_hex(b: &[u8]) -> String {
    agentmount::store::attachments::to_hex(&sha2::Sha256::digest(b))
}

fn attachment_ingest_then_label(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    v.write_file("attachments/hello.txt", b"hello\n").unwrap();
    let hex = sha_hex(b"hello\n");
    assert_eq!(v.readlink("attachments/hello.txt").unwrap(), hex);
    assert_eq!(
        v.read_file(&format!("attachments/{hex}")).unwrap(),
        b"hello\n"
    );
    let sidecar = v.read_json(&format!("attachments/{hex}.json"));
    assert_eq!(sidecar["label"], "hello.txt");
    v.rename("attachments/hello.txt", "attachments/greeting.txt")
        .unwrap();
    assert_eq!(v.readlink("attachments/greeting.txt").unwrap(), hex);
    assert_eq!(errno(&v.lookup("attachments/hello.txt")), libc::ENOENT);
    v.symlink(PIXEL, "attachments/dot.png").unwrap();
    assert_eq!(v.readlink("attachments/dot.png").unwrap(), PIXEL);
    v.unlink("attachments/greeting.txt").unwrap();
    assert_eq!(errno(&v.lookup("attachments/greeting.txt")), libc::ENOENT);
    assert!(v.exists(&format!("attachments/{hex}")), "the bytes stay");
    // Bytes leave only through .gc.
    assert_eq!(errno(&v.unlink(&format!("attachments/{hex}"))), libc::EPERM);
    let names = v.readdir("attachments").unwrap();
    for n in [hex.clone(), format!("{hex}.json"), "dot.png".into()] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
}

fn gc_takes_exactly_its_words(which: Which) {
    let s = Store::open(which);
    let v = vfs(&s);
    let orphan = format!("attachments/{NOTES}");
    for bad in ["bogus", "\n", "dryrun", "Run", "run now\n", "run\n\n"] {
        assert_eq!(
            errno(&v.write_file(".gc", bad.as_bytes())),
            libc::EINVAL,
            "{bad:?}"
        );
        assert!(v.exists(&orphan), "{bad:?} deleted the orphan");
    }
    let last = last_error(&v);
    for word in ["`run`", "`dry-run`", "`grace=<seconds>`"] {
        assert!(last["reason"].as_str().unwrap().contains(word), "{last}");
    }
    v.write_file(".gc", b"dry-run\n").unwrap();
    assert_eq!(v.read_json(".gc")["dry_run"], true);
    assert!(v.exists(&orphan));
    // A copied-in store's intents start their grace at the copy (Postgres): no grace then.
    let run: &[u8] = match which {
        Which::Postgres => b"grace=0\n",
        _ => b"run\n",
    };
    v.write_file(".gc", run).unwrap();
    let report = v.read_json(".gc");
    assert_eq!(report["reclaimed_ids"], json!([NOTES]), "{report}");
    assert_eq!(errno(&v.lookup(&orphan)), libc::ENOENT);
    assert!(v.exists("attachments/pixel.png"));
}

// ---- every seam call of every change failing in turn ----

/// A change made through the mount: `setup` (unfailing) prepares it, `run` makes it.
struct Change {
    name: &'static str,
    attachments: bool,
    setup: fn(&Vfs, &Store),
    run: fn(&Vfs, &Store) -> FsResult<()>,
}

fn nothing(_: &Vfs, _: &Store) {}

fn scratch_name(s: &Store) -> String {
    format!("sessions/.{}.json.swp", s.sessions()[0])
}

const CHANGES: &[Change] = &[
    Change {
        name: "upsert (write over a record)",
        attachments: false,
        setup: nothing,
        run: |v, s| {
            let a = &s.sessions()[0];
            v.write_file(&session_path(a), &s.session(a, "changed"))
        },
    },
    Change {
        name: "upsert (a new record)",
        attachments: false,
        setup: nothing,
        run: |v, s| v.write_file(&session_path(NEW), &s.session(NEW, "new")),
    },
    Change {
        name: "upsert (a scratch file renamed onto a record)",
        attachments: false,
        setup: |v, s| {
            let a = &s.sessions()[0];
            v.write_file(&scratch_name(s), &s.session(a, "via rename"))
                .unwrap()
        },
        run: |v, s| v.rename(&scratch_name(s), &session_path(&s.sessions()[0])),
    },
    Change {
        name: "remove (unlink)",
        attachments: false,
        setup: nothing,
        run: |v, s| v.unlink(&session_path(&s.sessions()[0])),
    },
    Change {
        name: "remove (a record renamed to a scratch name)",
        attachments: false,
        setup: nothing,
        run: |v, s| {
            let a = session_path(&s.sessions()[0]);
            v.rename(&a, &format!("{a}.bak"))
        },
    },
    Change {
        name: "rekey (rename)",
        attachments: false,
        setup: nothing,
        run: |v, s| v.rename(&session_path(&s.sessions()[0]), &session_path(NEW)),
    },
    Change {
        name: "ingest finish (a new attachment)",
        attachments: true,
        setup: nothing,
        run: |v, _| v.write_file("attachments/new.txt", b"new bytes\n"),
    },
    Change {
        name: "relabel (rename a label)",
        attachments: true,
        setup: nothing,
        run: |v, _| v.rename("attachments/pixel.png", "attachments/dot.png"),
    },
    Change {
        name: "relabel (ln -s <hex> label)",
        attachments: true,
        setup: nothing,
        run: |v, _| v.symlink(PIXEL, "attachments/dot.png"),
    },
    Change {
        name: "unlabel (rm a label)",
        attachments: true,
        setup: nothing,
        run: |v, _| v.unlink("attachments/pixel.png"),
    },
    Change {
        name: "gc (write .gc)",
        attachments: true,
        setup: nothing,
        run: |v, s| {
            let word: &[u8] = match s.which {
                Which::Postgres => b"grace=0\n",
                _ => b"run\n",
            };
            v.write_file(".gc", word)
        },
    },
];

/// A store behind a `Failing` wrapper (not failing yet) and a core over it: `spare` if
/// given (a store a refused change left as it was), else a fresh one.
fn failing_store(which: Which, spare: Option<Store>) -> (Store, Arc<Failing<dyn Backend>>, Vfs) {
    let s = spare.unwrap_or_else(|| Store::open(which));
    let f = Failing::new(s.backend.clone());
    let v = Vfs::new(f.clone(), true);
    (s, f, v)
}

/// Seam calls whose failure is a known bug (each with a test of its own below):
/// (change, call number, why). None now.
const KNOWN: &[(&str, usize, &str)] = &[];

/// What one failing run came to.
enum Outcome {
    /// Refused as it must be; the store, when it is as it was and may be used again.
    Refused(Option<Store>),
    /// Made whole: the failing call was not needed for it.
    Made,
    /// The run made fewer calls than the count.
    NotReached,
}

/// Change `c` with seam call `n` failing with `fault`. All is well when it is refused with
/// the fault's errno and the store is as it was (and, with `retry`, the same change asked
/// again is made), or when it is made whole because the failing call was not needed (a
/// read after the commit).
fn fail_one(
    which: Which,
    c: &Change,
    n: usize,
    fault: Fault,
    spare: Option<Store>,
    retry: bool,
) -> Result<Outcome, String> {
    let (s, f, v) = failing_store(which, spare);
    (c.setup)(&v, &s);
    let before = s.dump();
    f.fail_at(n, fault);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| (c.run)(&v, &s)));
    let fired = f.fired();
    f.count();
    let Some((_, call)) = fired else {
        return Ok(Outcome::NotReached);
    };
    let what = format!(
        "{which:?}: {}: seam call {n} ({call}) failing with {fault:?}",
        c.name
    );
    let after = s.dump();
    match r {
        Err(_) => Err(format!("{what}: panicked")),
        Ok(Ok(())) if after == before => Err(format!("{what}: succeeded and changed nothing")),
        Ok(Ok(())) => Ok(Outcome::Made),
        Ok(Err(e)) => {
            let mut bad = Vec::new();
            if e.errno != fault.errno() {
                bad.push(format!("errno {} instead of {}", e.errno, fault.errno()));
            }
            if after != before {
                bad.push("the store changed".to_string());
            }
            if retry && let Err(e) = (c.run)(&v, &s) {
                bad.push(format!("asked again without a failure: errno {}", e.errno));
            }
            if !bad.is_empty() {
                return Err(format!("{what}: refused, but {}", bad.join("; ")));
            }
            drop(v);
            Ok(Outcome::Refused((!retry).then_some(s)))
        }
    }
}

/// Every change, with each seam call it makes failing in turn (EIO, then EAGAIN): each
/// refusal leaves the store as it was and gives the error's errno.
fn seam_failures(which: Which) {
    let t0 = Instant::now();
    // A Postgres store costs a database (~0.15 s): one a refusal left unchanged is used
    // again, so a change is not asked again there after its refusal.
    let retry = which != Which::Postgres;
    let (mut runs, mut made, mut bugs) = (0, Vec::new(), Vec::new());
    let mut spare = None;
    for c in CHANGES {
        if c.attachments && !which.has_attachments() {
            continue;
        }
        let (s, f, v) = failing_store(which, None);
        (c.setup)(&v, &s);
        f.count();
        (c.run)(&v, &s).unwrap_or_else(|e| panic!("{which:?}: {}: {e:?}", c.name));
        let calls = f.calls();
        for (n, call) in calls.iter().enumerate() {
            if let Some((.., test)) = KNOWN.iter().find(|k| k.0 == c.name && k.1 == n) {
                println!("{which:?}: {} #{n} ({call}): known bug, see {test}", c.name);
                continue;
            }
            for fault in Fault::ALL {
                runs += 1;
                match fail_one(which, c, n, fault, spare.take(), retry) {
                    Ok(Outcome::Refused(s)) => spare = s,
                    Ok(Outcome::Made) if fault == Fault::Io => {
                        made.push(format!("{} #{n} {call}", c.name))
                    }
                    Ok(_) => {}
                    Err(bug) => bugs.push(bug),
                }
            }
        }
    }
    println!(
        "figures: {which:?} seam failures: {runs} runs in {:?}; made anyway with the call failing: {made:?}",
        t0.elapsed()
    );
    assert!(
        bugs.is_empty(),
        "{} problems:\n{}",
        bugs.len(),
        bugs.join("\n")
    );
}

/// `ln -s <hex> attachments/<label>` makes the label, then reads the listing for the
/// entry it returns: when that read fails, symlink(2) says EIO although the label was
/// made (and asked again, EEXIST). DESIGN: a refusal leaves the store as it was.
fn ln_s_succeeds_once_the_label_is_made_even_if_reading_it_back_fails(which: Which) {
    let (s, f, v) = failing_store(which, None);
    let before = s.dump();
    f.count();
    v.symlink(PIXEL, "attachments/dot.png").unwrap();
    let calls = f.calls();
    assert_eq!(&calls[3..5], ["relabel", "listing"], "{calls:?}");
    drop((s, f, v));
    let (s, f, v) = failing_store(which, None);
    f.fail_at(4, Fault::Io);
    let r = v.symlink(PIXEL, "attachments/dot.png");
    assert_eq!(f.fired().map(|c| c.1), Some("listing"));
    let changed = s.dump() != before;
    assert!(
        r.is_ok() || !changed,
        "symlink returned errno {} and the label was made",
        errno(&r)
    );
}

/// rename(2) with RENAME_NOREPLACE onto a record that exists (the kernel's negative dentry
/// was stale: another process made it) must be EEXIST; when the core's own lookup of the
/// target fails, it takes the target for absent and the rename replaces it.
fn a_noreplace_rename_keeps_the_target_when_reading_it_fails(which: Which) {
    let (s, f, v) = failing_store(which, None);
    let [a, b, _] = s.sessions();
    let dir = v.lookup("sessions").unwrap().ino;
    let (na, nb) = (format!("{a}.json"), format!("{b}.json"));
    f.count();
    let r = v.core.rename(v.caller(), dir, &na, dir, &nb, true, false);
    assert_eq!(errno(&r), libc::EEXIST, "{:?}", f.calls());
    let before = s.dump();
    f.fail_at(1, Fault::Io);
    let r = v.core.rename(v.caller(), dir, &na, dir, &nb, true, false);
    assert_eq!(
        f.fired(),
        Some((1, "get")),
        "the lookup of the target failed"
    );
    let replaced = s.dump() != before;
    assert!(
        r.is_err() && !replaced,
        "rename returned errno {} and the target {} replaced",
        errno(&r),
        if replaced { "was" } else { "was not" }
    );
}

/// One case for the backend `which()` of the module it is in, skipped when that backend
/// cannot be opened here (or has no attachments, for the cases that need them).
macro_rules! case {
    ($name:ident $(, $cond:ident)?) => {
        #[test]
        fn $name() {
            let Some(w) = which() else {
                return eprintln!("no PostgreSQL here: skipped");
            };
            $(if !w.$cond() { return; })?
            super::$name(w)
        }
    };
}

/// Instantiates every case for every backend: `cargo test --test core files`.
macro_rules! cases {
    ($($backend:ident => $which:expr),* $(,)?) => {$(
        mod $backend {
            use super::*;
            fn which() -> Option<Which> {
                let w = $which;
                (w != Which::Postgres || harness::postgres_available()).then_some(w)
            }
            case!(write_a_record_and_read_it_back);
            case!(invalid_json_is_einval_with_a_reason_and_changes_nothing);
            case!(an_id_that_disagrees_with_the_name_is_einval);
            case!(rename_rekeys);
            case!(unlink_removes);
            case!(a_scratch_file_renamed_onto_a_record_upserts_it);
            case!(chmod_that_changes_nothing_succeeds_and_one_that_would_is_eperm);
            case!(attachment_ingest_then_label, has_attachments);
            case!(gc_takes_exactly_its_words, has_attachments);
            case!(seam_failures);
            #[test]
            fn a_noreplace_rename_keeps_the_target_when_reading_it_fails() {
                if let Some(w) = which() {
                    super::a_noreplace_rename_keeps_the_target_when_reading_it_fails(w)
                }
            }
            #[test]
            fn ln_s_succeeds_once_the_label_is_made_even_if_reading_it_back_fails() {
                if let Some(w) = which().filter(|w| w.has_attachments()) {
                    super::ln_s_succeeds_once_the_label_is_made_even_if_reading_it_back_fails(w)
                }
            }
        }
    )*};
}

cases! {
    files => Which::Files,
    sqlite => Which::Sqlite,
    postgres => Which::Postgres,
}
