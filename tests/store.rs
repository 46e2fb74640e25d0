//! Store tests: no mount, real files.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use agentmount::store::attachments::to_hex;
use agentmount::store::gc::GcOptions;
use agentmount::store::{Kind, Layout, Options, Store};
use common::*;
use serde_json::{Value, json};
use sha2::Digest;

fn open(dir: &Path) -> Store {
    Store::open(Layout::new(dir), Options::default()).unwrap()
}

fn session(task: &str) -> Value {
    json!({"tmux_name": "tm-x", "cwd": "/w", "task": task, "state": "active", "created_at": "2026-11-20T09:12:03Z"})
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[test]
fn fixture_round_trips_every_field_including_unknown_ones() {
    let d = fixture_copy();
    let s = open(d.path());
    let before = json(&d.path().join("session-manager/sessions.json"));
    let future = s.get(Kind::Sessions, S_FUTURE).unwrap().unwrap();
    let v: Value = serde_json::from_slice(&future.bytes).unwrap();
    assert_eq!(v, before["sessions"][S_FUTURE]);
    assert_eq!(
        v["future_field_from_newer_platform"]["note"],
        "unknown fields must round-trip"
    );
    // Rewrite one record as read: the whole file keeps its meaning, unknown fields included.
    s.upsert(Kind::Sessions, S_FUTURE, &future.bytes).unwrap();
    assert_eq!(
        json(&d.path().join("session-manager/sessions.json")),
        before
    );
    let g = s.get(Kind::Goals, "g-1a2b3c4d").unwrap().unwrap();
    s.upsert(Kind::Goals, "g-1a2b3c4d", &g.bytes).unwrap();
    assert_eq!(
        json(&d.path().join("sm/goals.json")),
        json(&Path::new(FIXTURE).join("sm/goals.json"))
    );
    let c = s.get(Kind::Conversations, "login-flake").unwrap().unwrap();
    s.upsert(Kind::Conversations, "login-flake", &c.bytes)
        .unwrap();
    assert_eq!(
        json(&d.path().join("sm/conversation-login-flake.json")),
        json(&Path::new(FIXTURE).join("sm/conversation-login-flake.json"))
    );
    // Presented bytes are pretty JSON plus a newline, the same on every read of a version.
    assert!(future.bytes.ends_with(b"}\n"));
    assert_eq!(
        s.get(Kind::Sessions, S_FUTURE).unwrap().unwrap().bytes,
        future.bytes
    );
}

#[test]
fn missing_store_reads_empty_and_is_created_on_first_write() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("new-store");
    let s = open(&root);
    assert!(s.list(Kind::Sessions).unwrap().records.is_empty());
    assert!(s.list(Kind::Goals).unwrap().records.is_empty());
    assert!(s.list(Kind::Conversations).unwrap().records.is_empty());
    assert!(!root.exists(), "opening must not create the store");
    let id = "11111111-2222-4333-8444-555555555555";
    s.upsert(Kind::Sessions, id, &bytes(&session("first")))
        .unwrap();
    assert_eq!(
        json(&root.join("session-manager/sessions.json"))["sessions"][id]["id"],
        id
    );
}

#[test]
fn same_length_writes_within_one_clock_tick_are_both_seen() {
    let d = fixture_copy();
    let s = open(d.path());
    let p = d.path().join("session-manager/sessions.json");
    let orig = std::fs::read_to_string(&p).unwrap();
    for task in ["aaaa", "bbbb", "cccc"] {
        // Same length, written by rename as trusty-mpm does, back to back.
        let text = orig.replace("fix flaky login test", &format!("fix flaky login {task}"));
        std::fs::write(p.with_extension("tmp"), &text).unwrap();
        std::fs::rename(p.with_extension("tmp"), &p).unwrap();
        let v: Value =
            serde_json::from_slice(&s.get(Kind::Sessions, S_ACTIVE).unwrap().unwrap().bytes)
                .unwrap();
        assert_eq!(v["task"], format!("fix flaky login {task}"));
    }
    // And an in-place rewrite with the same length (same inode): ctime/mtime ns catch it.
    let text = orig.replace("fix flaky login test", "fix flaky login zzzz");
    std::fs::write(&p, &text).unwrap();
    let v: Value =
        serde_json::from_slice(&s.get(Kind::Sessions, S_ACTIVE).unwrap().unwrap().bytes).unwrap();
    assert_eq!(v["task"], "fix flaky login zzzz");
}

#[test]
fn unparseable_store_file_keeps_last_good_view_and_refuses_writes() {
    let d = fixture_copy();
    let s = open(d.path());
    assert_eq!(s.list(Kind::Goals).unwrap().records.len(), 2);
    let p = d.path().join("sm/goals.json");
    std::fs::write(&p, b"[{\"id\": \"g-1a2b").unwrap();
    let l = s.list(Kind::Goals).unwrap();
    assert_eq!(l.records.len(), 2, "last good version is served");
    assert!(l.error.as_deref().unwrap_or("").contains("invalid JSON"));
    let e = s
        .upsert(
            Kind::Goals,
            "g-00000000",
            br#"{"description":"x","status":"pending"}"#,
        )
        .unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        b"[{\"id\": \"g-1a2b",
        "an unparseable file is never overwritten"
    );
    std::fs::copy(Path::new(FIXTURE).join("sm/goals.json"), &p).unwrap();
    assert!(s.list(Kind::Goals).unwrap().error.is_none());
    s.upsert(
        Kind::Goals,
        "g-00000000",
        br#"{"description":"x","status":"pending"}"#,
    )
    .unwrap();
}

#[test]
fn every_validation_refusal_has_its_errno() {
    let d = fixture_copy();
    let s = Store::open(
        Layout::new(d.path()),
        Options {
            max_record_bytes: 4096,
            ..Options::default()
        },
    )
    .unwrap();
    let before = tree(d.path());
    let sid = "11111111-2222-4333-8444-555555555555";
    let mut big = session("x");
    big["blob"] = json!("y".repeat(5000));
    let long_id = "g".repeat(129);
    let cases: Vec<(Kind, &str, Vec<u8>, i32, &str)> = vec![
        (
            Kind::Sessions,
            sid,
            b"{\"task\": ".to_vec(),
            libc::EINVAL,
            "invalid JSON",
        ),
        (Kind::Sessions, sid, b"".to_vec(), libc::EINVAL, "empty"),
        (
            Kind::Sessions,
            sid,
            b"[1,2]".to_vec(),
            libc::EINVAL,
            "must be a JSON object",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": 1, "cwd": "/", "task": "t", "state": "active", "created_at": "2026-11-20T09:12:03Z"}),
            ),
            libc::EINVAL,
            "\"tmux_name\" must be a string",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": "t", "cwd": "/", "task": "t", "state": "running", "created_at": "2026-11-20T09:12:03Z"}),
            ),
            libc::EINVAL,
            "expected one of provisioning",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": "t", "cwd": "/", "task": "t", "state": "active", "created_at": "yesterday"}),
            ),
            libc::EINVAL,
            "not an RFC 3339 time",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": "t", "cwd": "/", "state": "active", "created_at": "2026-11-20T09:12:03Z"}),
            ),
            libc::EINVAL,
            "\"task\" is missing",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"id": S_ACTIVE, "tmux_name": "t", "cwd": "/", "task": "t", "state": "active", "created_at": "2026-11-20T09:12:03Z"}),
            ),
            libc::EINVAL,
            "file name says",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": "t", "cwd": "/", "task": "t", "state": "active", "created_at": "2026-11-20T09:12:03Z", "runtime": "vim"}),
            ),
            libc::EINVAL,
            "\"runtime\"",
        ),
        (
            Kind::Sessions,
            sid,
            bytes(
                &json!({"tmux_name": "t", "cwd": "/", "task": "t", "state": "active", "created_at": "2026-11-20T09:12:03Z", "correlation": {"pr_id": "x"}}),
            ),
            libc::EINVAL,
            "correlation",
        ),
        (
            Kind::Sessions,
            "not-a-uuid",
            bytes(&session("t")),
            libc::EINVAL,
            "UUID",
        ),
        (Kind::Sessions, sid, bytes(&big), libc::EFBIG, "size limit"),
        (
            Kind::Goals,
            "g-1",
            bytes(&json!({"description": "d", "status": "finished"})),
            libc::EINVAL,
            "\"status\"",
        ),
        (
            Kind::Goals,
            "g-1",
            bytes(&json!({"description": "d", "status": "pending", "progress": 101})),
            libc::EINVAL,
            "\"progress\"",
        ),
        (
            Kind::Goals,
            "g-1",
            bytes(&json!({"description": "d", "status": "pending", "acceptance": "all"})),
            libc::EINVAL,
            "\"acceptance\"",
        ),
        (
            Kind::Goals,
            "g-1",
            bytes(
                &json!({"description": "d", "status": "done", "sessions": [{"session_id": S_ACTIVE, "state": "running"}]}),
            ),
            libc::EINVAL,
            "not verified",
        ),
        (
            Kind::Goals,
            "g-1",
            bytes(
                &json!({"description": "d", "status": "pending", "sessions": [{"session_id": "x", "state": "running"}]}),
            ),
            libc::EINVAL,
            "not a UUID",
        ),
        (
            Kind::Goals,
            "g-1",
            bytes(&json!({"description": "d", "status": "pending", "updated": 5})),
            libc::EINVAL,
            "\"updated\"",
        ),
        (
            Kind::Goals,
            "../evil",
            bytes(&json!({"description": "d", "status": "pending"})),
            libc::EINVAL,
            "not a valid goal id",
        ),
        (
            Kind::Goals,
            &long_id,
            bytes(&json!({"description": "d", "status": "pending"})),
            libc::EINVAL,
            "1-128",
        ),
        (
            Kind::Conversations,
            "c1",
            bytes(&json!({"total_rounds": -1})),
            libc::EINVAL,
            "total_rounds",
        ),
        (
            Kind::Conversations,
            "c1",
            bytes(&json!({"recent_rounds": [{"ts": "soon"}]})),
            libc::EINVAL,
            "recent_rounds[0]",
        ),
        (
            Kind::Conversations,
            "c1",
            bytes(&json!({"id": "c2"})),
            libc::EINVAL,
            "file name says",
        ),
        (
            Kind::Conversations,
            "a/b",
            bytes(&json!({})),
            libc::EINVAL,
            "not a valid conversation id",
        ),
    ];
    for (kind, id, data, errno, needle) in cases {
        let e = s
            .upsert(kind, id, &data)
            .expect_err(&format!("{kind:?} {id} {needle} must be refused"));
        assert_eq!(e.errno(), errno, "{needle}: {e}");
        assert!(
            e.to_string().contains(needle),
            "reason {e:?} should mention {needle:?}"
        );
    }
    assert_eq!(
        tree(d.path()),
        before,
        "refusals change nothing in the store"
    );
    // The goal rule passes once every linked session is verified.
    s.upsert(Kind::Goals, "g-1", &bytes(&json!({"description": "d", "status": "done", "sessions": [{"session_id": S_ACTIVE, "state": "verified"}]}))).unwrap();
}

#[test]
fn upsert_remove_and_rekey_each_collection() {
    let d = fixture_copy();
    let s = open(d.path());
    let new = "11111111-2222-4333-8444-555555555555";
    s.rekey(Kind::Sessions, S_ACTIVE, new).unwrap();
    let doc = json(&d.path().join("session-manager/sessions.json"));
    assert!(doc["sessions"].get(S_ACTIVE).is_none());
    assert_eq!(doc["sessions"][new]["id"], new);
    assert_eq!(doc["sessions"][new]["tmux_name"], "tm-quiet-falcon");
    s.remove(Kind::Sessions, new).unwrap();
    assert_eq!(
        json(&d.path().join("session-manager/sessions.json"))["sessions"]
            .as_object()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        s.remove(Kind::Sessions, new).unwrap_err().errno(),
        libc::ENOENT
    );

    // Goals stay ordered by id.
    s.upsert(
        Kind::Goals,
        "g-00000001",
        br#"{"description":"first","status":"pending"}"#,
    )
    .unwrap();
    s.rekey(Kind::Goals, "g-9f8e7d6c", "g-55555555").unwrap();
    let ids: Vec<String> = json(&d.path().join("sm/goals.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["g-00000001", "g-1a2b3c4d", "g-55555555"]);

    s.rekey(Kind::Conversations, "login-flake", "login-flake-2")
        .unwrap();
    assert!(!d.path().join("sm/conversation-login-flake.json").exists());
    assert_eq!(
        json(&d.path().join("sm/conversation-login-flake-2.json"))["total_rounds"],
        14
    );
    s.remove(Kind::Conversations, "login-flake-2").unwrap();
    assert!(s.list(Kind::Conversations).unwrap().records.is_empty());
}

#[test]
fn attachments_ingest_dedupes_and_labels_come_from_sidecars() {
    let d = fixture_copy();
    let s = open(d.path());
    let png = std::fs::read(Path::new(FIXTURE).join("attachments/sha256/b1").join(PIXEL)).unwrap();
    let hex = s.ingest_reader(&png[..], Some("again.png")).unwrap();
    assert_eq!(hex, PIXEL, "same bytes, same address");
    let hex2 = s
        .ingest_reader(&b"hello world\n"[..], Some("hello.txt"))
        .unwrap();
    let blob = d
        .path()
        .join("attachments/sha256")
        .join(&hex2[..2])
        .join(&hex2);
    assert_eq!(std::fs::read(&blob).unwrap(), b"hello world\n");
    let meta = json(&blob.with_extension("json"));
    assert_eq!(
        meta["media_type"],
        json!({"kind": "file", "type": "text/plain"})
    );
    assert_eq!(meta["byte_len"], 12);
    let pmeta = json(
        &d.path()
            .join("attachments/sha256/b1")
            .join(format!("{PIXEL}.json")),
    );
    assert_eq!(
        (
            pmeta["width"].as_u64(),
            pmeta["height"].as_u64(),
            pmeta["label"].as_str()
        ),
        (Some(1), Some(1), Some("again.png"))
    );
    // Labels survive a reopen: they live in the sidecars.
    let s2 = open(d.path());
    let l = s2.attachment_listing().unwrap();
    let label =
        |l: &agentmount::store::blob_index::Listing, name: &str| l.label(name).map(|id| to_hex(id));
    assert_eq!(label(&l, "hello.txt"), Some(hex2.clone()));
    assert_eq!(label(&l, "again.png").as_deref(), Some(PIXEL));
    assert_eq!(label(&l, "notes.txt").as_deref(), Some(NOTES));
    // Intents are written ahead and uncommitted until a record references them. They are
    // journaled beside the manifest and folded into it (idle, at gc, at close, or here).
    assert!(
        !s2.manifest
            .current()
            .unwrap()
            .find(&hex2)
            .unwrap()
            .committed()
    );
    s2.manifest.fold().unwrap();
    let m = json(&d.path().join("attachments/manifest.json"));
    let row = m["intents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["attachment_id"] == hex2.as_str())
        .unwrap()
        .clone();
    assert!(row["committed_at_epoch_ms"].is_null());
    s2.upsert(
        Kind::Conversations,
        "c1",
        format!(r#"{{"compressed_context": "see sha256:{hex2}"}}"#).as_bytes(),
    )
    .unwrap();
    assert!(
        s2.manifest
            .current()
            .unwrap()
            .find(&hex2)
            .unwrap()
            .committed()
    );
    s2.manifest.fold().unwrap();
    let m = json(&d.path().join("attachments/manifest.json"));
    let row = m["intents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["attachment_id"] == hex2.as_str())
        .unwrap()
        .clone();
    assert!(row["committed_at_epoch_ms"].is_i64());
    s2.unlabel("hello.txt").unwrap();
    assert!(blob.exists(), "rm of a label removes the name only");
    assert!(
        s2.attachment_listing()
            .unwrap()
            .label("hello.txt")
            .is_none()
    );
}

/// Another program adds, relabels and removes attachments behind the store's back; the
/// index sees each change at its next access, whether it watches (inotify, as the mount
/// does) or stats every shard (as the CLI does).
#[test]
fn attachment_index_sees_external_changes_at_the_next_access() {
    for watched in [false, true] {
        let d = fixture_copy();
        let s = open(d.path());
        if watched {
            s.attachments.index.watch();
            assert_eq!(s.attachments.index.mode(), "inotify");
        }
        let l = s.attachment_listing().unwrap();
        assert_eq!((l.len(), l.labels().len()), (2, 2), "watched={watched}");
        let cas = d.path().join("attachments/sha256");
        let put = |bytes: &[u8], label: &str| {
            let hex = to_hex(&sha2::Sha256::digest(bytes));
            let dir = cas.join(&hex[..2]);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&hex), bytes).unwrap();
            let meta = json!({"id": hex, "media_type": {"kind": "file", "type": "text/plain"}, "byte_len": bytes.len(), "label": label});
            let tmp = dir.join("incoming.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&meta).unwrap()).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{hex}.json"))).unwrap();
            hex
        };
        // A new blob, in a new shard directory and in an existing one.
        let a = put(b"external a", "ext-a.txt");
        let l = s.attachment_listing().unwrap();
        assert_eq!(l.len(), 3, "watched={watched}");
        assert_eq!(l.label("ext-a.txt").map(|id| to_hex(id)), Some(a.clone()));
        assert_eq!(l.get_hex(&a).unwrap().size, 10);
        // The same label on newer bytes: the newest sidecar wins the name.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = put(b"external b, newer", "ext-a.txt");
        let l = s.attachment_listing().unwrap();
        assert_eq!(
            l.label("ext-a.txt").map(|id| to_hex(id)),
            Some(b.clone()),
            "watched={watched}"
        );
        // Its bytes go: the label falls back to the older holder.
        std::fs::remove_file(cas.join(&b[..2]).join(&b)).unwrap();
        let l = s.attachment_listing().unwrap();
        assert!(l.get_hex(&b).is_none(), "watched={watched}");
        assert_eq!(
            l.label("ext-a.txt").map(|id| to_hex(id)),
            Some(a.clone()),
            "watched={watched}"
        );
        // The whole directory goes, and comes back.
        std::fs::rename(&cas, d.path().join("cas-aside")).unwrap();
        assert!(
            s.attachment_listing().unwrap().is_empty(),
            "watched={watched}"
        );
        std::fs::rename(d.path().join("cas-aside"), &cas).unwrap();
        let l = s.attachment_listing().unwrap();
        assert_eq!(
            (l.len(), l.label("notes.txt").is_some()),
            (3, true),
            "watched={watched}"
        );
    }
}

#[test]
fn media_types_from_magic_bytes() {
    use agentmount::store::attachments::detect_media;
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&640u32.to_be_bytes());
    png.extend_from_slice(&480u32.to_be_bytes());
    assert_eq!(
        detect_media(&png, None),
        (json!({"kind":"image","type":"png"}), Some((640, 480)))
    );
    let gif = b"GIF89a\x20\x03\x58\x02rest";
    assert_eq!(
        detect_media(gif, None),
        (json!({"kind":"image","type":"gif"}), Some((800, 600)))
    );
    let jpeg = [
        0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0, 0xff, 0xc0, 0, 17, 8, 0, 120, 0, 160, 3, 0, 0,
    ];
    assert_eq!(
        detect_media(&jpeg, None),
        (json!({"kind":"image","type":"jpeg"}), Some((160, 120)))
    );
    let mut bmp = b"BM".to_vec();
    bmp.resize(26, 0);
    bmp[18..22].copy_from_slice(&32i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&(-16i32).to_le_bytes());
    assert_eq!(
        detect_media(&bmp, None),
        (json!({"kind":"image","type":"bmp"}), Some((32, 16)))
    );
    assert_eq!(
        detect_media(b"%PDF-1.7", None).0,
        json!({"kind":"file","type":"application/pdf"})
    );
    assert_eq!(
        detect_media(b"{}", Some("x.json")).0,
        json!({"kind":"file","type":"application/json"})
    );
    assert_eq!(
        detect_media(&[0, 159, 146, 150], Some("x.bin")).0,
        json!({"kind":"file","type":"application/octet-stream"})
    );
}

#[test]
fn gc_reclaims_the_fixture_orphan_and_keeps_the_referenced_pixel() {
    let d = fixture_copy();
    let s = open(d.path());
    let dry = s
        .gc(&GcOptions {
            grace_secs: 3600,
            dry_run: true,
        })
        .unwrap();
    assert_eq!(
        (dry.reclaimed, dry.kept_referenced, dry.bytes_freed),
        (1, 1, 39)
    );
    assert!(
        d.path().join("attachments/sha256/05").join(NOTES).exists(),
        "dry-run deletes nothing"
    );
    let r = s.gc(&GcOptions::default()).unwrap();
    assert_eq!(r.reclaimed_ids, [NOTES]);
    assert!(!d.path().join("attachments/sha256/05").join(NOTES).exists());
    assert!(
        !d.path()
            .join("attachments/sha256/05")
            .join(format!("{NOTES}.json"))
            .exists()
    );
    assert!(d.path().join("attachments/sha256/b1").join(PIXEL).exists());
    let m = json(&d.path().join("attachments/manifest.json"));
    assert_eq!(
        m["intents"].as_array().unwrap().len(),
        1,
        "the orphan's intent is forgotten"
    );
    // Young uncommitted attachments are kept; bytes without an intent of ours are never touched.
    let young = s.ingest_reader(&b"young"[..], Some("young.txt")).unwrap();
    let foreign = d.path().join("attachments/sha256/ff").join("f".repeat(64));
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, b"someone else's").unwrap();
    let r = s
        .gc(&GcOptions {
            grace_secs: 3600,
            dry_run: false,
        })
        .unwrap();
    assert_eq!((r.reclaimed, r.kept_young), (0, 1));
    let r = s
        .gc(&GcOptions {
            grace_secs: 0,
            dry_run: false,
        })
        .unwrap();
    assert_eq!(r.reclaimed_ids, [young]);
    assert!(foreign.exists());
    // Exactly the documented words, each with at most one trailing newline.
    for bad in [
        "bogus",
        "",
        "\n",
        "dryrun",
        "Run",
        "run\n\n",
        " run",
        "grace=",
        "grace=+5",
        "grace=5 dry-run\n",
        "run,dry-run",
    ] {
        assert!(GcOptions::parse_command(bad).is_err(), "{bad:?} accepted");
    }
    assert!(!GcOptions::parse_command("run\n").unwrap().dry_run);
    assert!(GcOptions::parse_command("dry-run").unwrap().dry_run);
    assert_eq!(GcOptions::parse_command("grace=5\n").unwrap().grace_secs, 5);
}

#[test]
fn cli_gc_and_fsck_on_the_fixture() {
    let d = fixture_copy();
    let out = Command::new(BIN)
        .args(["gc", "--dry-run", "--store"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["reclaimed"].as_u64(), r["dry_run"].as_bool()),
        (Some(1), Some(true))
    );
    assert!(d.path().join("attachments/sha256/05").join(NOTES).exists());
    let out = Command::new(BIN)
        .args(["gc", "--store"])
        .arg(d.path())
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["reclaimed_ids"], json!([NOTES]));
    assert!(!d.path().join("attachments/sha256/05").join(NOTES).exists());
    let fsck = |p: &Path| {
        Command::new(BIN)
            .args(["fsck", "--store"])
            .arg(p)
            .output()
            .unwrap()
    };
    let o = fsck(d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // A blob whose bytes changed fails fsck.
    let blob = d.path().join("attachments/sha256/b1").join(PIXEL);
    let mut b = std::fs::read(&blob).unwrap();
    b[20] ^= 1;
    std::fs::write(&blob, b).unwrap();
    let o = fsck(d.path());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("hash to"));
    // A stray temp file of a dead writer is a problem fsck leaves; --repair removes it.
    let dd = fixture_copy();
    let stray = dd
        .path()
        .join("sm/.goals.json.agentmount-tmp.999999999.1.0");
    std::fs::write(&stray, b"half").unwrap();
    let o = fsck(dd.path());
    assert!(!o.status.success());
    assert!(stray.exists());
    let o = Command::new(BIN)
        .args(["fsck", "--repair", "--store"])
        .arg(dd.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(!stray.exists());
}

// ---- several writers ----

/// Child roles, run by re-executing this test binary (see `spawn_child`).
#[test]
fn child_role() {
    let Ok(role) = std::env::var("AGENTMOUNT_TEST_ROLE") else {
        return;
    };
    let store = std::env::var("AGENTMOUNT_TEST_STORE").unwrap();
    let s = open(Path::new(&store));
    let me: usize = std::env::var("AGENTMOUNT_TEST_N").unwrap().parse().unwrap();
    match role.as_str() {
        "writer" => {
            for i in 0..40 {
                let id = format!("{:08x}-0000-4000-8000-{:012x}", me, i);
                s.upsert(Kind::Sessions, &id, &bytes(&session(&format!("w{me}-{i}"))))
                    .unwrap();
            }
        }
        "crasher" => {
            // Upserts and ingests forever, saying on stdout which writes have returned.
            let mut i = 0u64;
            loop {
                let id = format!("{:08x}-0000-4000-8000-{:012x}", me, i);
                s.upsert(Kind::Sessions, &id, &bytes(&session(&format!("c{i}"))))
                    .unwrap();
                println!("session {id}");
                let hex = s
                    .ingest_reader(
                        format!("blob {me} {i}").as_bytes(),
                        Some(&format!("b{i}.txt")),
                    )
                    .unwrap();
                println!("blob {hex}");
                s.upsert(
                    Kind::Goals,
                    &format!("g-{i:08x}"),
                    &bytes(&json!({"description": "d", "status": "pending"})),
                )
                .unwrap();
                println!("goal g-{i:08x}");
                i += 1;
            }
        }
        "ingester" => {
            // Ingests forever, folding the manifest journal every 16, referencing every
            // third blob from a conversation; says on stdout which ingests have returned.
            let mut i = 0u64;
            loop {
                let hex = s
                    .ingest_reader(format!("ingest {me} {i}").as_bytes(), None)
                    .unwrap();
                println!("blob {hex}");
                if i.is_multiple_of(3) {
                    let body = format!(r#"{{"compressed_context": "see sha256:{hex}"}}"#);
                    s.upsert(Kind::Conversations, &format!("r{me}-{i}"), body.as_bytes())
                        .unwrap();
                }
                if i % 16 == 15 {
                    s.manifest.fold().unwrap();
                }
                i += 1;
            }
        }
        _ => {}
    }
}

fn spawn_child(role: &str, store: &Path, n: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("AGENTMOUNT_TEST_ROLE", role)
        .env("AGENTMOUNT_TEST_STORE", store)
        .env("AGENTMOUNT_TEST_N", n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn concurrent_processes_lose_no_updates() {
    let d = fixture_copy();
    let children: Vec<_> = (0..4).map(|n| spawn_child("writer", d.path(), n)).collect();
    for c in children {
        assert!(c.wait_with_output().unwrap().status.success());
    }
    let doc = json(&d.path().join("session-manager/sessions.json"));
    let sessions = doc["sessions"].as_object().unwrap();
    assert_eq!(sessions.len(), 3 + 4 * 40, "0 lost updates");
    for n in 0..4 {
        for i in 0..40 {
            let id = format!("{:08x}-0000-4000-8000-{:012x}", n, i);
            assert_eq!(sessions[&id]["task"], format!("w{n}-{i}"));
        }
    }
}

#[test]
fn kill_9_at_random_moments_leaves_every_file_old_or_new() {
    let cycles: usize = std::env::var("AGENTMOUNT_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let d = fixture_copy();
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    for cycle in 0..cycles {
        let mut child = spawn_child("crasher", d.path(), cycle);
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let ms = 20 + (cycle * 37) % 150;
        std::thread::sleep(std::time::Duration::from_millis(ms as u64));
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            if let Some((k, v)) = line.split_once(' ') {
                acked.entry(k.to_string()).or_default().push(v.to_string());
            }
        }
        // Every store file parses, every acknowledged write is there.
        let s = open(d.path());
        let sessions = json(&d.path().join("session-manager/sessions.json"));
        for id in acked.get("session").into_iter().flatten() {
            assert!(
                sessions["sessions"].get(id).is_some(),
                "acknowledged session {id} lost"
            );
        }
        let goals = s.list(Kind::Goals).unwrap();
        assert!(goals.error.is_none());
        for id in acked.get("goal").into_iter().flatten() {
            assert!(
                goals.records.iter().any(|r| &r.id == id),
                "acknowledged goal {id} lost"
            );
        }
        for hex in acked.get("blob").into_iter().flatten() {
            assert!(
                d.path()
                    .join("attachments/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .exists(),
                "acknowledged blob {hex} lost"
            );
        }
        // What a crash legitimately leaves (an intent whose bytes never landed) is
        // mended; nothing else may be wrong.
        let r = s.fsck_repair();
        assert!(r.ok(), "fsck after crash {cycle}: {:?}", r.problems);
    }
    let n: usize = acked.values().map(Vec::len).sum();
    println!(
        "figures: store-crash (kill -9 of a writing process) cycles={cycles} acked-writes={n} lost-acked-writes=0 fsck=ok"
    );
    assert!(
        acked.get("session").map(Vec::len).unwrap_or(0) > cycles,
        "the children made progress"
    );
}

/// Ingests append to the manifest's journal; every intent is in the merged view at once,
/// in another handle's view, and in `manifest.json` once folded (at the threshold, by
/// `fold`, at close), commits and forgets included.
#[test]
fn ingests_are_journaled_and_every_intent_reaches_the_manifest_when_folded() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let n = 2500; // over the 1024 entries at which a writer folds the journal itself
    let hexes: Vec<String> = (0..n)
        .map(|i| {
            s.ingest_reader(format!("attachment {i}").as_bytes(), None)
                .unwrap()
        })
        .collect();
    let doc = s.manifest.current().unwrap();
    assert_eq!(doc.rows.len(), n);
    assert!(
        hexes
            .iter()
            .all(|h| doc.find(h).is_some_and(|r| !r.committed()))
    );
    drop(doc);
    let pending = s.manifest.pending().unwrap();
    assert!(
        pending > 0 && pending < 1024,
        "folded at the threshold: {pending}"
    );
    let other = open(d.path());
    assert_eq!(other.manifest.current().unwrap().rows.len(), n);
    s.manifest.fold().unwrap();
    assert_eq!(s.manifest.pending().unwrap(), 0);
    let journal = d.path().join("attachments/manifest.journal");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    let ids = |m: &Value| -> Vec<String> {
        let mut v: Vec<String> = m["intents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["attachment_id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let mut want = hexes.clone();
    want.sort();
    let m = json(&d.path().join("attachments/manifest.json"));
    assert_eq!(ids(&m), want, "every intent, once");
    // A commit and a forget are journaled (the manifest file is not rewritten) ...
    let before = std::fs::read(d.path().join("attachments/manifest.json")).unwrap();
    let body = format!(r#"{{"compressed_context": "see sha256:{}"}}"#, hexes[0]);
    s.upsert(Kind::Conversations, "c1", body.as_bytes())
        .unwrap();
    {
        let _g = s.lock.acquire().unwrap();
        s.manifest.forget(&[hexes[1].clone()].into()).unwrap();
    }
    assert_eq!(
        std::fs::read(d.path().join("attachments/manifest.json")).unwrap(),
        before
    );
    assert_eq!(s.manifest.pending().unwrap(), 2);
    assert!(other.manifest.current().unwrap().find(&hexes[1]).is_none());
    // ... and folded when the stores close.
    drop(s);
    drop(other);
    let m = json(&d.path().join("attachments/manifest.json"));
    want.retain(|h| h != &hexes[1]);
    assert_eq!(ids(&m), want);
    let row0 = m["intents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["attachment_id"] == hexes[0].as_str())
        .unwrap();
    assert!(row0["committed_at_epoch_ms"].is_i64());
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    let s = open(d.path());
    assert!(s.fsck().ok());
}

/// kill -9 of a process that ingests and folds the journal: the intent of every ingest
/// that returned survives (gc with no grace then reclaims exactly the unreferenced ones,
/// which it could not without their intents), and fsck is clean.
#[test]
fn kill_9_during_ingests_and_folds_keeps_every_acknowledged_intent() {
    let cycles: usize = std::env::var("AGENTMOUNT_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let d = tempfile::tempdir().unwrap();
    let mut total = 0;
    for cycle in 0..cycles {
        let mut child = spawn_child("ingester", d.path(), cycle);
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let ms = 40 + (cycle * 37) % 150;
        std::thread::sleep(std::time::Duration::from_millis(ms as u64));
        child.kill().unwrap();
        child.wait().unwrap();
        let acked: Vec<String> = reader
            .join()
            .unwrap()
            .into_iter()
            .filter_map(|l| l.strip_prefix("blob ").map(str::to_string))
            .collect();
        total += acked.len();
        let s = open(d.path());
        let doc = s.manifest.current().unwrap();
        assert!(s.manifest.error().is_none(), "{:?}", s.manifest.error());
        for hex in &acked {
            assert!(
                doc.find(hex).is_some(),
                "cycle {cycle}: the intent of acknowledged ingest {hex} is lost"
            );
        }
        drop(doc);
        // A kill between an intent and its bytes legitimately leaves an intent with no
        // bytes: --repair forgets it, and then nothing else is wrong.
        let r = s.fsck_repair();
        assert!(
            r.ok(),
            "fsck --repair after crash {cycle}: {:?}",
            r.problems
        );
        let refs = s.referenced_attachments().unwrap();
        s.gc(&GcOptions {
            grace_secs: 0,
            dry_run: false,
        })
        .unwrap();
        let doc = s.manifest.current().unwrap();
        for hex in &acked {
            let there = s.attachments.blob_path(hex).exists();
            if refs.contains(hex) {
                assert!(there, "referenced {hex} reclaimed");
                assert!(doc.find(hex).is_some_and(|r| r.committed()));
            } else {
                assert!(!there, "{hex} kept: gc found no intent for it");
                assert!(doc.find(hex).is_none());
            }
        }
        let r = s.fsck();
        assert!(r.ok(), "fsck after gc {cycle}: {:?}", r.problems);
    }
    println!("figures: manifest-crash cycles={cycles} acked-ingests={total} lost-intents=0");
    assert!(total > cycles, "the children made progress");
}

// ---- a model check: two handles (two writers) against an in-memory reference ----

/// The same model for every backend, through the seam (`&dyn Backend`): two handles on one
/// store (two writers, each with its caches) upsert, remove and re-key records of three
/// collections, and a third handle opened afterwards must list exactly what the model says.
mod model {
    use super::*;
    use agentmount::backend::Backend;
    use harness::Which;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[derive(Debug, Clone)]
    enum Op {
        /// (handle, collection, record, value)
        Upsert(usize, usize, usize, u8),
        Remove(usize, usize, usize),
        Rekey(usize, usize, usize, usize),
    }

    fn kinds(which: Which) -> [Kind; 3] {
        match which {
            Which::Sqlite => [Kind::Sessions, Kind::Agents, Kind::Delegations],
            _ => Kind::ALL,
        }
    }

    fn id(kind: Kind, n: usize) -> String {
        match kind {
            Kind::Sessions => format!("00000000-0000-4000-8000-{n:012}"),
            Kind::Agents => format!("00000000-0000-4000-8000-{:012}", 100 + n),
            Kind::Delegations => format!("{}", 10 + n),
            Kind::Goals => format!("g-{n:08x}"),
            Kind::Conversations => format!("conv-{n}"),
        }
    }

    /// The field that holds a record's id (none for a conversation), and its value.
    fn id_field(which: Which, kind: Kind, id: &str) -> Option<(&'static str, Value)> {
        match (which, kind) {
            (_, Kind::Conversations) => None,
            (Which::Sqlite, Kind::Sessions) => Some(("session_id", json!(id))),
            (_, Kind::Delegations) => Some(("id", json!(id.parse::<i64>().unwrap()))),
            _ => Some(("id", json!(id))),
        }
    }

    /// The bytes written for record `id` with value `v`.
    fn record(which: Which, kind: Kind, id: &str, v: u8) -> Value {
        let mut rec = match kind {
            Kind::Sessions if which == Which::Sqlite => json!({
                "agent_id": "1a000000-0000-4000-8000-000000000001",
                "delegation_chain_snapshot": [], "declared_intent": format!("t{v}"),
                "authorized_tools": ["read_file"], "time_limit_secs": 3600, "call_budget": 100,
                "calls_made": v, "rate_limit_per_minute": null,
                "rate_window_start": "2026-11-20T09:10:00Z", "rate_window_calls": 0,
                "rate_limit_window_secs": 60, "data_sensitivity_ceiling": "internal",
                "created_at": "2026-11-20T09:10:00Z", "status": "active"}),
            Kind::Agents => json!({"owner": format!("o{v}"), "model": "m", "capabilities": [],
                "trust_level": "basic", "created_at": "2026-11-20T09:00:00Z",
                "expires_at": null, "active": v.is_multiple_of(2)}),
            Kind::Delegations => json!({"from_agent": "1a000000-0000-4000-8000-000000000001",
                "to_agent": "1a000000-0000-4000-8000-000000000002",
                "scope_narrowing": [format!("s{v}")], "created_at": "2026-11-20T09:05:00Z",
                "expires_at": null}),
            Kind::Sessions => session(&format!("t{v}")),
            Kind::Goals => json!({"description": format!("d{v}"), "status": "pending"}),
            Kind::Conversations => {
                json!({"compressed_context": format!("c{v}"), "total_rounds": v})
            }
        };
        // arbiter's records carry their id; the directory store's get it from the name.
        if which == Which::Sqlite
            && let Some((f, idv)) = id_field(which, kind, id)
        {
            rec[f] = idv;
        }
        rec
    }

    /// What the store shows of record `id` written with value `v`: the record, its id in it.
    fn shown(which: Which, kind: Kind, id: &str, v: u8) -> Value {
        let rec = record(which, kind, id, v);
        match id_field(which, kind, id) {
            Some((f, idv)) => {
                let mut m = serde_json::Map::new();
                m.insert(f.into(), idv);
                m.extend(rec.as_object().unwrap().clone());
                Value::Object(m)
            }
            None => rec,
        }
    }

    fn listed(b: &dyn Backend, k: Kind) -> HashMap<String, Value> {
        b.list(k)
            .unwrap()
            .records
            .into_iter()
            .map(|r| (r.id, serde_json::from_slice(&r.bytes).unwrap()))
            .collect()
    }

    /// Runs `ops` with `handles` on one store (whatever it holds at first), then checks a
    /// handle opened afterwards (`fresh`) against the model.
    fn check(
        which: Which,
        handles: [Arc<dyn Backend>; 2],
        fresh: impl Fn() -> Arc<dyn Backend>,
        ops: Vec<Op>,
    ) -> Result<(), TestCaseError> {
        let ks = kinds(which);
        let mut model: HashMap<(Kind, String), Value> = HashMap::new();
        for k in ks {
            for (i, v) in listed(&*handles[0], k) {
                model.insert((k, i), v);
            }
        }
        for op in ops {
            match op {
                Op::Upsert(h, k, i, v) => {
                    let (k, id) = (ks[k], id(ks[k], i));
                    let bytes = serde_json::to_vec(&record(which, k, &id, v)).unwrap();
                    let r = handles[h].upsert(k, &id, &bytes);
                    prop_assert!(r.is_ok(), "upsert {:?} {}: {:?}", k, id, r.err());
                    model.insert((k, id.clone()), shown(which, k, &id, v));
                }
                Op::Remove(h, k, i) => {
                    let (k, id) = (ks[k], id(ks[k], i));
                    let r = handles[h].remove(k, &id);
                    prop_assert_eq!(r.is_ok(), model.remove(&(k, id)).is_some());
                }
                Op::Rekey(h, k, a, b) => {
                    let (k, a, b) = (ks[k], id(ks[k], a), id(ks[k], b));
                    let r = handles[h].rekey(k, &a, &b);
                    match model.remove(&(k, a.clone())) {
                        Some(mut v) => {
                            prop_assert!(r.is_ok(), "rekey {:?} {} {}: {:?}", k, a, b, r.err());
                            if let Some((f, idv)) = id_field(which, k, &b) {
                                v[f] = idv;
                            }
                            model.insert((k, b), v);
                        }
                        None => prop_assert!(r.is_err(), "rekey {:?} of absent {}", k, a),
                    }
                }
            }
        }
        let fresh = fresh();
        for k in ks {
            let want: HashMap<String, Value> = model
                .iter()
                .filter(|((mk, _), _)| *mk == k)
                .map(|((_, i), v)| (i.clone(), v.clone()))
                .collect();
            prop_assert_eq!(listed(&*fresh, k), want, "{:?}", k);
        }
        Ok(())
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..2usize, 0..3usize, 0..5usize, any::<u8>())
                .prop_map(|(h, k, i, v)| Op::Upsert(h, k, i, v)),
            (0..2usize, 0..3usize, 0..5usize).prop_map(|(h, k, i)| Op::Remove(h, k, i)),
            (0..2usize, 0..3usize, 0..5usize, 0..5usize)
                .prop_map(|(h, k, a, b)| Op::Rekey(h, k, a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The directory store, from an empty directory (created by the first write).
        #[test]
        fn two_writers_match_the_reference_model(ops in proptest::collection::vec(op(), 1..30)) {
            let d = tempfile::tempdir().unwrap();
            let h = || -> Arc<dyn Backend> { Arc::new(open(d.path())) };
            check(Which::Files, [h(), h()], h, ops)?;
        }

        /// arbiter's database (make_db.py's sample rows to begin with).
        #[test]
        fn two_writers_of_a_sqlite_store_match_the_reference_model(ops in proptest::collection::vec(op(), 1..30)) {
            let s = harness::Store::open(Which::Sqlite);
            check(Which::Sqlite, [s.backend.clone(), s.reopen()], || s.reopen(), ops)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        /// Postgres (a database copied from the sample store), when a server can be started.
        #[test]
        fn two_writers_of_a_postgres_store_match_the_reference_model(ops in proptest::collection::vec(op(), 1..30)) {
            if harness::postgres_available() {
                let s = harness::Store::open(Which::Postgres);
                check(Which::Postgres, [s.backend.clone(), s.reopen()], || s.reopen(), ops)?;
            }
        }
    }
}

/// Long ingests hash on a helper thread; whatever order the bytes come in (in order, an
/// earlier piece rewritten, truncated and started again), the address is the SHA-256 of
/// the final bytes, checked here with an independent implementation.
#[test]
fn large_ingests_are_addressed_by_the_sha256_of_their_final_bytes() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let data: Vec<u8> = (0..10_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let want = to_hex(&sha2::Sha256::digest(&data));
    let hex = s.ingest_reader(&data[..], Some("in-order.bin")).unwrap();
    assert_eq!(hex, want);
    // An earlier piece rewritten after the hasher moved on: a second pass gets it right.
    let mut ing = s.begin_ingest().unwrap();
    for (i, c) in data.chunks(1 << 20).enumerate() {
        ing.write_at((i << 20) as u64, c).unwrap();
    }
    ing.write_at(5, &data[5..1000]).unwrap();
    ing.write_at(7 << 20, b"changed").unwrap();
    let mut changed = data.clone();
    changed[7 << 20..(7 << 20) + 7].copy_from_slice(b"changed");
    let hex = s.finish_ingest(ing, Some("rewritten.bin")).unwrap();
    assert_eq!(hex, to_hex(&sha2::Sha256::digest(&changed)));
    // Truncated to nothing halfway and written again.
    let mut ing = s.begin_ingest().unwrap();
    for (i, c) in data.chunks(1 << 20).take(9).enumerate() {
        ing.write_at((i << 20) as u64, c).unwrap();
    }
    ing.truncate(0).unwrap();
    ing.write_at(0, &data[..6_000_000]).unwrap();
    let hex = s.finish_ingest(ing, Some("again.bin")).unwrap();
    assert_eq!(hex, to_hex(&sha2::Sha256::digest(&data[..6_000_000])));
    assert!(s.fsck().ok());
}
