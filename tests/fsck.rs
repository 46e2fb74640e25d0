//! `agentmount fsck` against stores a hostile or careless writer left (issue 30 item 5):
//! plain fsck names every problem and changes nothing; `--repair` mends what the mount
//! already shows one way, and leaves what it cannot decide.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn fsck(store: &Path, repair: bool) -> (i32, String) {
    let mut c = Command::new(BIN);
    c.args(["fsck", "--store"]).arg(store);
    if repair {
        c.arg("--repair");
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// The lines of `out` that start with `kind` ("problem: ", "repaired: ").
fn lines<'a>(out: &'a str, kind: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(kind)).collect()
}

fn has(out: &[&str], needles: &[&str]) -> bool {
    out.iter().any(|l| needles.iter().all(|n| l.contains(n)))
}

const DEAD_PID: &str = "999999999";
const BIG: usize = 3 << 20;

/// The fixture, damaged the ways issue 30 lists.
fn damaged_store() -> tempfile::TempDir {
    let d = fixture_copy();
    let root = d.path();
    // sessions.json: S_ACTIVE given twice (the last wins in the mount), S_STOPPED whose
    // record says another id, a key in uppercase (hidden: not a canonical UUID).
    let sessions = json(&root.join("session-manager/sessions.json"));
    let mut active = sessions["sessions"][S_ACTIVE].clone();
    let mut stopped = sessions["sessions"][S_STOPPED].clone();
    let future = sessions["sessions"][S_FUTURE].clone();
    stopped["id"] = json!("not-its-key");
    let mut first = active.clone();
    first["task"] = json!("first copy");
    active["task"] = json!("last copy");
    let upper = S_FUTURE.to_uppercase();
    let text = format!(
        "{{\"sessions\": {{\n\"{S_ACTIVE}\": {first},\n\"{S_STOPPED}\": {stopped},\n\"{upper}\": {future},\n\"{S_FUTURE}\": {future},\n\"{S_ACTIVE}\": {active}\n}}}}\n"
    );
    std::fs::write(root.join("session-manager/sessions.json"), text).unwrap();
    // goals.json: g-1a2b3c4d twice (the mount shows the first), one id with a slash, one
    // without an id.
    let mut goals = json(&root.join("sm/goals.json"));
    let arr = goals.as_array_mut().unwrap();
    let mut again = arr[0].clone();
    again["description"] = json!("a later copy");
    arr.push(again);
    arr.push(json!({"id": "a/b", "description": "slash", "status": "pending"}));
    arr.push(json!({"description": "no id", "status": "pending"}));
    std::fs::write(
        root.join("sm/goals.json"),
        serde_json::to_vec_pretty(&goals).unwrap(),
    )
    .unwrap();
    // An ingest killed with -9: its temp file, large, in attachments/.
    std::fs::write(
        root.join(format!("attachments/.ingest.agentmount-tmp.{DEAD_PID}.1.0")),
        vec![7u8; BIG],
    )
    .unwrap();
    // The notes sidecar claims pixel.png's label, and names another id.
    let side = root
        .join("attachments/sha256")
        .join(&NOTES[..2])
        .join(format!("{NOTES}.json"));
    let mut v = json(&side);
    v["label"] = json!("pixel.png");
    v["id"] = json!("deadbeef");
    std::fs::write(&side, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    // The pixel's sidecar is older: the mount shows the label as the notes blob's.
    let pixel_side = root
        .join("attachments/sha256")
        .join(&PIXEL[..2])
        .join(format!("{PIXEL}.json"));
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&pixel_side)
        .unwrap()
        .set_modified(old)
        .unwrap();
    d
}

/// What the mount shows of the damaged records, read through a real mount.
fn shown(store: &Path) -> Vec<(String, Vec<u8>)> {
    let m = Mount::new(store, &["--no-journal", "--read-only"]);
    let mut out = Vec::new();
    for rel in [
        format!("sessions/{S_ACTIVE}.json"),
        format!("sessions/{S_STOPPED}.json"),
        format!("sessions/{S_FUTURE}.json"),
        "goals/g-1a2b3c4d.json".to_string(),
        "goals/g-9f8e7d6c.json".to_string(),
    ] {
        out.push((rel.clone(), std::fs::read(m.p(&rel)).unwrap()));
    }
    let target = std::fs::read_link(m.p("attachments/pixel.png")).unwrap();
    out.push((
        "attachments/pixel.png".into(),
        target.to_string_lossy().as_bytes().to_vec(),
    ));
    let mut names: Vec<String> = std::fs::read_dir(m.p("goals"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    out.push(("goals/".into(), names.join(" ").into_bytes()));
    out
}

#[test]
fn fsck_of_a_sound_store_says_0_problems() {
    let d = fixture_copy();
    let (code, out) = fsck(d.path(), false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 problems, 0 repaired"), "{out}");
}

#[test]
fn plain_fsck_names_each_problem_and_changes_nothing() {
    let d = damaged_store();
    let before = tree(d.path());
    let (code, out) = fsck(d.path(), false);
    assert_eq!(code, 1, "{out}");
    let p = lines(&out, "problem: ");
    assert!(lines(&out, "repaired: ").is_empty(), "{out}");
    let sessions = "session-manager/sessions.json";
    for want in [
        &[sessions, S_ACTIVE, "given 2 times", "the last"][..],
        &[sessions, S_STOPPED, "\"not-its-key\""],
        &[
            sessions,
            &S_FUTURE.to_uppercase(),
            "hidden from the mount",
            S_FUTURE,
        ],
        &["sm/goals.json", "g-1a2b3c4d", "given 2 times", "the first"],
        &["sm/goals.json", "\"a/b\"", "hidden from the mount"],
        &["sm/goals.json", "no string \"id\"", "hidden"],
        &[
            &format!("attachments/.ingest.agentmount-tmp.{DEAD_PID}.1.0"),
            "stray temp file",
            &format!("({BIG} bytes)"),
        ],
        &[&format!("{NOTES}.json"), "\"deadbeef\"", "its name says"],
        &["label \"pixel.png\" is given by 2 sidecars", NOTES, PIXEL],
    ] {
        assert!(has(&p, want), "a problem line with {want:?}: {out}");
    }
    assert!(
        out.contains(&format!("{} problems, 0 repaired", p.len())),
        "{out}"
    );
    assert_eq!(tree(d.path()), before, "plain fsck changed the store");
    // Twice: the same answer (nothing was mended behind the report).
    assert_eq!(fsck(d.path(), false), (code, out));
}

#[test]
fn repair_keeps_what_the_mount_shows_and_leaves_what_it_cannot_decide() {
    let d = damaged_store();
    let root = d.path();
    let before = shown(root);
    // The mount's choices, which the repair must keep.
    let text = |rel: &str| {
        let (_, b) = before.iter().find(|(r, _)| r == rel).unwrap();
        String::from_utf8_lossy(b).into_owned()
    };
    assert!(text(&format!("sessions/{S_ACTIVE}.json")).contains("last copy"));
    assert!(!text("goals/g-1a2b3c4d.json").contains("a later copy"));
    assert!(text("attachments/pixel.png").contains(NOTES));

    let (code, out) = fsck(root, true);
    // Hidden ids stay problems: fsck cannot tell which id was meant.
    assert_eq!(code, 1, "{out}");
    let r = lines(&out, "repaired: ");
    for want in [
        &["sessions.json", S_ACTIVE, "kept the last"][..],
        &["sessions.json", S_STOPPED, "set to its key"],
        &["goals.json", "g-1a2b3c4d", "removed the 1 later"],
        &[
            ".ingest.agentmount-tmp.",
            &format!("({BIG} bytes)"),
            "removed",
        ],
        &[&format!("{NOTES}.json"), "set to"],
        &["label \"pixel.png\"", &format!("taken from {PIXEL}")],
    ] {
        assert!(has(&r, want), "a repaired line with {want:?}: {out}");
    }
    let p = lines(&out, "problem: ");
    assert_eq!(p.len(), 3, "only the hidden ids are left: {out}");
    assert!(p.iter().all(|l| l.contains("hidden")), "{out}");
    assert!(
        !root
            .join(format!("attachments/.ingest.agentmount-tmp.{DEAD_PID}.1.0"))
            .exists()
    );

    // The mount shows what it showed, except the id it could not have written back.
    let after = shown(root);
    for ((rel, a), (_, b)) in before.iter().zip(&after) {
        if rel == &format!("sessions/{S_STOPPED}.json") {
            let (a, b): (Value, Value) = (
                serde_json::from_slice(a).unwrap(),
                serde_json::from_slice(b).unwrap(),
            );
            assert_eq!(b["id"], json!(S_STOPPED));
            let mut a = a;
            a["id"] = json!(S_STOPPED);
            assert_eq!(a, b);
        } else {
            assert_eq!(
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(b),
                "{rel} changed in the mount"
            );
        }
    }
    // The store files now say it once.
    let raw = std::fs::read_to_string(root.join("session-manager/sessions.json")).unwrap();
    assert_eq!(raw.matches(S_ACTIVE).count(), 2, "one key, one id: {raw}");
    let goals = json(&root.join("sm/goals.json"));
    let n = goals
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["id"] == json!("g-1a2b3c4d"))
        .count();
    assert_eq!(n, 1);
    let pixel = json(
        &root
            .join("attachments/sha256")
            .join(&PIXEL[..2])
            .join(format!("{PIXEL}.json")),
    );
    assert!(pixel.get("label").is_none(), "{pixel}");

    // Again: nothing left to repair, the same three problems.
    let (code, again) = fsck(root, true);
    assert_eq!(code, 1);
    assert!(lines(&again, "repaired: ").is_empty(), "{again}");
    let left = lines(&again, "problem: ");
    assert_eq!(left.len(), 3, "{again}");
    assert!(left.iter().all(|l| l.contains("hidden")), "{again}");
}

/// A temp file whose writer is alive is not a problem (it is being written); one whose
/// writer is gone is, in every store directory, and only --repair removes it.
#[test]
fn stray_temps_in_every_directory_are_problems_until_repaired() {
    let d = fixture_copy();
    let root = d.path();
    let me = std::process::id();
    let live = root.join(format!("sm/.goals.json.agentmount-tmp.{me}.1.0"));
    std::fs::write(&live, b"being written").unwrap();
    let dead = [
        root.join(format!("sm/.goals.json.agentmount-tmp.{DEAD_PID}.1.0")),
        root.join(format!(
            "session-manager/.sessions.json.agentmount-tmp.{DEAD_PID}.2.0"
        )),
        root.join(format!(
            "attachments/sha256/b1/.x.agentmount-tmp.{DEAD_PID}.3.0"
        )),
    ];
    for p in &dead {
        std::fs::write(p, b"half").unwrap();
    }
    let (code, out) = fsck(root, false);
    assert_eq!(code, 1, "{out}");
    assert_eq!(lines(&out, "problem: ").len(), 3, "{out}");
    assert!(dead.iter().all(|p| p.exists()));
    let (code, out) = fsck(root, true);
    assert_eq!(code, 0, "{out}");
    assert_eq!(lines(&out, "repaired: ").len(), 3, "{out}");
    assert!(dead.iter().all(|p| !p.exists()));
    assert!(live.exists(), "a live writer's temp file is left alone");
}

#[test]
fn fsck_of_an_arbiter_database_names_hidden_rows_and_ids_above_2_53() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    make_arbiter_db(&db);
    let (code, out) = fsck(&db, false);
    assert_eq!(code, 0, "{out}");
    let sql = |q: &str| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(q).unwrap();
    };
    sql(
        "INSERT INTO delegation_links (id, from_agent, to_agent, scope_narrowing, created_at)
           SELECT 9007199254740993, from_agent, to_agent, scope_narrowing, created_at
           FROM delegation_links LIMIT 1;
         UPDATE sessions SET session_id = upper(session_id)
           WHERE session_id = '5e000000-0000-4000-8000-000000000001';",
    );
    let (code, out) = fsck(&db, false);
    assert_eq!(code, 1, "{out}");
    let p = lines(&out, "problem: ");
    assert!(
        has(
            &p,
            &[
                "sessions row \"5E000000-0000-4000-8000-000000000001\"",
                "hidden"
            ]
        ),
        "{out}"
    );
    assert!(
        has(&p, &["delegation_links row 9007199254740993", "above 2^53"]),
        "{out}"
    );
    // The row removed, SQLite still remembers the id: arbiter's next link is above 2^53.
    sql("DELETE FROM delegation_links WHERE id = 9007199254740993;");
    let (_, out) = fsck(&db, true);
    let p = lines(&out, "problem: ");
    assert!(has(&p, &["sqlite_sequence", "9007199254740994"]), "{out}");
    assert!(lines(&out, "repaired: ").is_empty(), "{out}");
}
