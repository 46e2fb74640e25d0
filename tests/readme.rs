//! The README's example block, run as written on a real mount of the fixture.

mod common;

use common::*;

#[test]
fn readme_examples_run_on_a_real_mount() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```sh\ncd /tmp/agents\n")
        .expect("the example block")
        + "```sh\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let st = fixture_copy();
    let m = Mount::new(st.path(), &[]);
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("my-goal.json"),
        br#"{"description": "ship 2.5", "status": "pending"}"#,
    )
    .unwrap();
    std::fs::copy(
        std::path::Path::new(FIXTURE)
            .join("attachments/sha256/b1")
            .join(PIXEL),
        home.path().join("screenshot.png"),
    )
    .unwrap();
    let script = format!(
        "set -euo pipefail\n{}",
        block.replace("cd /tmp/agents", &format!("cd {}", m.path().display()))
    );
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("HOME", home.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "README block failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("fix flaky login test: active"), "{out}");
    assert!(out.contains(&format!("user.sha256=\"{PIXEL}\"")), "{out}");
    let sessions = json(&st.path().join("session-manager/sessions.json"));
    assert_eq!(sessions["sessions"][S_ACTIVE]["state"], "stopped");
    assert_eq!(
        json(&st.path().join("sm/goals.json"))[0]["status"],
        "blocked"
    );
    assert_eq!(
        json(&st.path().join("sm/goals.json"))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(m.p("attachments/screenshot.png").exists());
    assert!(
        !st.path().join("attachments/sha256/05").join(NOTES).exists(),
        "echo run > .gc reclaimed the orphan"
    );
}

#[test]
fn readme_arbiter_example_runs_on_a_real_mount() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme
        .find("```sh\npython3 examples/arbiter/make_db.py")
        .expect("the arbiter example block")
        + "```sh\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let tmp = tempfile::tempdir().unwrap();
    let (db, mnt) = (tmp.path().join("arbiter.db"), tmp.path().join("arbiter"));
    let script = format!(
        "set -euo pipefail\n{}",
        block
            .replace("/tmp/arbiter.db", &db.display().to_string())
            .replace("/tmp/arbiter", &mnt.display().to_string())
            .replace(
                "/tmp/s.json",
                &tmp.path().join("s.json").display().to_string()
            )
            .replace(
                "/tmp/bad.json",
                &tmp.path().join("bad.json").display().to_string()
            )
            .replace("target/release/agentmount", BIN)
    );
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root)
        .output()
        .unwrap();
    if agentmount::mount::is_mountpoint(&mnt) {
        let _ = std::process::Command::new(BIN)
            .args(["unmount", "--force"])
            .arg(&mnt)
            .status();
    }
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "README block failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("triage flaky login test 0: active"), "{out}");
    assert!(
        out.contains("closed|1"),
        "the write is in the database: {out}"
    );
    assert!(
        out.contains("\nexpired\n"),
        "the external commit is seen: {out}"
    );
    assert!(out.contains("unknown variant `sleeping`"), "{out}");
    let c = rusqlite::Connection::open(&db).unwrap();
    let trust: String = c
        .query_row(
            "SELECT trust_level FROM agents WHERE id='1a000000-0000-4000-8000-000000000001'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(trust, "trusted", "sed -i through the mount");
}
