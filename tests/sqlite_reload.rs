//! A mounted database reloaded by difference (only rows whose raw values changed are
//! rendered again) shows exactly what a fresh mount of the same database shows, after
//! any mix of external updates, inserts, deletes and key changes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::*;

const MAKE_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/arbiter/make_db.py");

fn files(m: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in ["sessions", "agents", "delegations"] {
        for e in std::fs::read_dir(m.join(dir)).unwrap() {
            let e = e.unwrap();
            let name = format!("{dir}/{}", e.file_name().to_string_lossy());
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// A small deterministic generator (no dependency needed for this).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn a_reload_by_difference_equals_a_fresh_mount_after_random_external_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    let o = Command::new("python3")
        .arg(MAKE_DB)
        .arg(&db)
        .args(["--sessions", "200"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let m = Mount::new(&db, &[]);
    let c = rusqlite::Connection::open(&db).unwrap();
    let mut rng = Lcg(7);
    let mut next_id = 1000u64;
    for round in 0..25 {
        let tx = c.unchecked_transaction().unwrap();
        for _ in 0..(1 + rng.next(6)) {
            let ids: Vec<String> = {
                let mut st = tx.prepare("SELECT session_id FROM sessions").unwrap();
                st.query_map([], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            };
            let pick = &ids[rng.next(ids.len() as u64) as usize];
            match rng.next(6) {
                0 => {
                    tx.execute("DELETE FROM sessions WHERE session_id = ?1", [pick])
                        .unwrap();
                }
                1 => {
                    next_id += 1;
                    let new = format!("5e000000-0000-4000-8000-{next_id:012x}");
                    tx.execute(
                        "UPDATE sessions SET session_id = ?1 WHERE session_id = ?2",
                        [&new, pick],
                    )
                    .unwrap();
                }
                2 => {
                    next_id += 1;
                    let new = format!("5e000000-0000-4000-8000-{next_id:012x}");
                    tx.execute(
                        "INSERT INTO sessions SELECT ?1, agent_id, delegation_chain_snapshot,
                         declared_intent || ' copy', authorized_tools, time_limit_secs, call_budget,
                         calls_made, rate_limit_per_minute, rate_window_start, rate_window_calls,
                         rate_limit_window_secs, data_sensitivity_ceiling, created_at, status
                         FROM sessions WHERE session_id = ?2",
                        [&new, pick],
                    )
                    .unwrap();
                }
                3 => {
                    // Same length, other bytes.
                    tx.execute(
                        "UPDATE sessions SET status = CASE status WHEN 'active' THEN 'closed' ELSE 'active' END WHERE session_id = ?1",
                        [pick],
                    )
                    .unwrap();
                }
                4 => {
                    tx.execute(
                        "UPDATE sessions SET rate_limit_per_minute = CASE WHEN rate_limit_per_minute IS NULL THEN 7 ELSE NULL END WHERE session_id = ?1",
                        [pick],
                    )
                    .unwrap();
                }
                _ => {
                    // A row arbiter cannot load, and back.
                    tx.execute(
                        "UPDATE sessions SET created_at = CASE WHEN created_at = 'garbage' THEN '2026-11-20T09:10:00+00:00' ELSE 'garbage' END WHERE session_id = ?1",
                        [pick],
                    )
                    .unwrap();
                }
            }
        }
        tx.commit().unwrap();
        let seen = files(m.path());
        let fresh = Mount::new(&db, &["--read-only"]);
        assert_eq!(seen, files(fresh.path()), "round {round}");
    }
}
