//! Interop with arbiter's own client code on real mounts: databases created, written and
//! read by arbiter-storage 0.5's `SqliteStorage` (its migrations, WAL, its encryption),
//! mounted with `agentmount mount --store DB`. Every file must be exactly arbiter's serde
//! form of the row, and every write through the mount must be what arbiter then loads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arbiter_storage::sqlite::SqliteStorage;
use arbiter_storage::{
    AgentStore, DelegationStore, FieldEncryptor, SessionStore, StorageError, StoredAgent,
    StoredDataSensitivity, StoredDelegationLink, StoredSession, StoredSessionStatus,
    StoredTrustLevel,
};
use chrono::{TimeZone, Utc};
use common::{BIN, Mount, sh_ok, wait_until, write_close};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

const KEY_VAR: &str = "ARBITER_STORAGE_ENCRYPTION_KEY";
const KEY: &str = "5f2c9a7e31d04b8c96e1a2f3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7";

/// arbiter's storage client on a database file, driven from a test thread.
struct Arbiter {
    rt: tokio::runtime::Runtime,
    st: SqliteStorage,
}

impl Arbiter {
    /// `SqliteStorage::new("sqlite://<path>")` (creates the file, WAL, runs the migrations),
    /// with the field encryptor when a key is given.
    fn open(db: &Path, key: Option<&str>) -> Arbiter {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("sqlite://{}", db.display());
        let st = rt
            .block_on(SqliteStorage::new(&url))
            .unwrap_or_else(|e| panic!("arbiter cannot open {url}: {e}"))
            .with_optional_encryptor(key.map(|k| FieldEncryptor::from_hex_key(k).unwrap()));
        Arbiter { rt, st }
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn session(&self, id: Uuid) -> Result<StoredSession, StorageError> {
        self.run(self.st.get_session(id))
    }

    fn agent(&self, id: Uuid) -> Result<StoredAgent, StorageError> {
        self.run(self.st.get_agent(id))
    }

    fn delegation(&self, id: i64) -> Option<StoredDelegationLink> {
        self.run(self.st.list_delegations())
            .unwrap()
            .into_iter()
            .find(|d| d.id == id)
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        self.rt.block_on(self.st.close());
    }
}

struct Seeded {
    agents: Vec<StoredAgent>,
    sessions: Vec<StoredSession>,
    delegations: Vec<StoredDelegationLink>,
}

const INTENT_0: &str = "修复登录测试 — «ünïcødé» 🚀\nsecond line with \"quotes\" and \\ backslash";

/// Rows inserted through arbiter's API: every optional both ways, every enum, non-ASCII.
fn seed(a: &Arbiter) -> Seeded {
    let now = Utc::now(); // sub-second precision, as arbiter stamps its rows
    let fixed = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    let agent = |owner: &str, caps: &[&str], trust, expires, active| StoredAgent {
        id: Uuid::new_v4(),
        owner: owner.into(),
        model: "claude-opus-4".into(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        trust_level: trust,
        created_at: now,
        expires_at: expires,
        active,
    };
    let agents = vec![
        agent(
            "équipe-données 東京",
            &["read", "écrire ✍"],
            StoredTrustLevel::Verified,
            Some(now + chrono::Duration::days(30)),
            true,
        ),
        agent("ops", &[], StoredTrustLevel::Untrusted, None, false),
        agent(
            "ci-bot",
            &["run_tests"],
            StoredTrustLevel::Trusted,
            Some(fixed),
            true,
        ),
        agent("intern", &["read"], StoredTrustLevel::Basic, None, true),
    ];
    for ag in &agents {
        a.run(a.st.insert_agent(ag)).unwrap();
    }
    let mut delegations = vec![
        StoredDelegationLink {
            id: 0,
            from_agent: agents[0].id,
            to_agent: agents[2].id,
            scope_narrowing: vec!["read".into(), "run_tests".into()],
            created_at: now,
            expires_at: Some(now + chrono::Duration::hours(8)),
        },
        StoredDelegationLink {
            id: 0,
            from_agent: agents[2].id,
            to_agent: agents[3].id,
            scope_narrowing: vec![],
            created_at: fixed,
            expires_at: None,
        },
    ];
    for d in &mut delegations {
        d.id = a.run(a.st.insert_delegation(d)).unwrap();
    }
    let session = |agent: &StoredAgent, intent: &str, rate: Option<u64>, sens, status, created| {
        StoredSession {
            session_id: Uuid::new_v4(),
            agent_id: agent.id,
            delegation_chain_snapshot: vec![agents[0].id.to_string(), agent.id.to_string()],
            declared_intent: intent.into(),
            authorized_tools: vec!["read_file".into(), "run_tests".into()],
            time_limit_secs: 3600,
            call_budget: 100,
            calls_made: 3,
            rate_limit_per_minute: rate,
            rate_window_start: created,
            rate_window_calls: 2,
            rate_limit_window_secs: 60,
            data_sensitivity_ceiling: sens,
            created_at: created,
            status,
        }
    };
    let mut sessions = vec![
        session(
            &agents[2],
            INTENT_0,
            Some(60),
            StoredDataSensitivity::Internal,
            StoredSessionStatus::Active,
            now,
        ),
        session(
            &agents[0],
            "close the incident",
            None,
            StoredDataSensitivity::Restricted,
            StoredSessionStatus::Closed,
            fixed,
        ),
        session(
            &agents[3],
            "",
            Some(0),
            StoredDataSensitivity::Public,
            StoredSessionStatus::Expired,
            fixed,
        ),
        session(
            &agents[2],
            "read the quarterly numbers",
            Some(1000),
            StoredDataSensitivity::Confidential,
            StoredSessionStatus::Active,
            now,
        ),
    ];
    sessions[1].delegation_chain_snapshot.clear();
    sessions[1].authorized_tools.clear();
    sessions[2].call_budget = 1 << 40;
    sessions[2].time_limit_secs = -1;
    for s in &sessions {
        a.run(a.st.insert_session(s)).unwrap();
    }
    Seeded {
        agents,
        sessions,
        delegations,
    }
}

fn val<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

fn read_json(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} is not JSON: {e}\n{}",
            p.display(),
            String::from_utf8_lossy(&bytes)
        )
    })
}

fn pretty(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

/// Every row of arbiter's tables (and its AUTOINCREMENT counter), read raw with rusqlite.
fn dump(db: &Path) -> Vec<String> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut out = Vec::new();
    for t in ["agents", "sessions", "delegation_links", "sqlite_sequence"] {
        let mut st = c
            .prepare(&format!("SELECT * FROM {t} ORDER BY rowid"))
            .unwrap();
        let n = st.column_count();
        let rows = st
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get::<_, rusqlite::types::Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap();
        for r in rows {
            out.push(format!("{t}: {:?}", r.unwrap()));
        }
    }
    out
}

/// The three encrypted columns of a session as stored: intent, tools, chain.
fn raw_session(db: &Path, id: Uuid) -> [String; 3] {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    c.query_row(
        "SELECT declared_intent, authorized_tools, delegation_chain_snapshot FROM sessions WHERE session_id = ?1",
        [id.to_string()],
        |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?]),
    )
    .unwrap()
}

fn record_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The directory holds exactly `want` (id → arbiter's record as JSON), one `<id>.json`
/// each; every file deserializes into arbiter's type `T` and is exactly its serde form.
fn assert_collection<T: DeserializeOwned + Serialize>(dir: &Path, want: Vec<(String, Value)>) {
    let files = record_files(dir);
    let want: BTreeMap<String, Value> = want
        .into_iter()
        .map(|(id, v)| (format!("{id}.json"), v))
        .collect();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}: one file for each row arbiter lists",
        dir.display()
    );
    for (name, bytes) in &files {
        let typed: T = serde_json::from_slice(bytes).unwrap_or_else(|e| {
            panic!(
                "{}/{name} does not deserialize into arbiter's {}: {e}\n{}",
                dir.display(),
                std::any::type_name::<T>(),
                String::from_utf8_lossy(bytes)
            )
        });
        assert_eq!(
            val(&typed),
            want[name],
            "{}/{name}: as arbiter's type it equals what arbiter loads",
            dir.display()
        );
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(
            raw,
            want[name],
            "{}/{name}: the file is exactly arbiter's serde form (no extra, missing or respelled fields)",
            dir.display()
        );
        assert_eq!(
            raw.as_object().unwrap().keys().collect::<Vec<_>>(),
            want[name].as_object().unwrap().keys().collect::<Vec<_>>(),
            "{}/{name}: the fields come in the order arbiter serializes them",
            dir.display()
        );
    }
}

/// Every file of the mount against arbiter's `list_*` and `get_*` on the same database.
fn assert_mount_matches_arbiter(m: &Mount, a: &Arbiter) {
    let sessions = a.run(a.st.list_sessions()).unwrap();
    let want = sessions
        .iter()
        .map(|s| {
            let got = a.session(s.session_id).unwrap();
            assert_eq!(val(&got), val(s), "get_session and list_sessions agree");
            (s.session_id.to_string(), val(&got))
        })
        .collect();
    assert_collection::<StoredSession>(&m.p("sessions"), want);

    let agents = a.run(a.st.list_agents()).unwrap();
    let want = agents
        .iter()
        .map(|ag| {
            let got = a.agent(ag.id).unwrap();
            assert_eq!(val(&got), val(ag), "get_agent and list_agents agree");
            (ag.id.to_string(), val(&got))
        })
        .collect();
    assert_collection::<StoredAgent>(&m.p("agents"), want);

    let links = a.run(a.st.list_delegations()).unwrap();
    let want = links
        .iter()
        .map(|d| {
            let from = a.run(a.st.get_delegations_from(d.from_agent)).unwrap();
            let got = from
                .iter()
                .find(|x| x.id == d.id)
                .expect("get_delegations_from finds the link");
            assert_eq!(val(got), val(d));
            (d.id.to_string(), val(d))
        })
        .collect();
    assert_collection::<StoredDelegationLink>(&m.p("delegations"), want);
}

fn session_path(m: &Mount, id: Uuid) -> PathBuf {
    m.p(&format!("sessions/{id}.json"))
}

#[test]
fn every_file_is_the_record_arbiter_loads_from_a_database_it_created() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::new(&db, &[]);

    assert_mount_matches_arbiter(&m, &a);

    // What arbiter inserted is what the files show, value for value.
    for s in &seeded.sessions {
        assert_eq!(read_json(&session_path(&m, s.session_id)), val(s));
    }
    for ag in &seeded.agents {
        assert_eq!(read_json(&m.p(&format!("agents/{}.json", ag.id))), val(ag));
    }
    for l in &seeded.delegations {
        assert_eq!(
            read_json(&m.p(&format!("delegations/{}.json", l.id))),
            val(l)
        );
    }
    let s0 = read_json(&session_path(&m, seeded.sessions[0].session_id));
    assert_eq!(s0["declared_intent"], INTENT_0);
    assert_eq!(s0["rate_limit_per_minute"], json!(60));
    let s1 = read_json(&session_path(&m, seeded.sessions[1].session_id));
    assert_eq!(s1["rate_limit_per_minute"], Value::Null);
    let a1 = read_json(&m.p(&format!("agents/{}.json", seeded.agents[1].id)));
    assert_eq!(a1["expires_at"], Value::Null);
    assert_eq!(a1["active"], json!(false));

    let status = read_json(&m.p(".status"));
    assert_eq!(status["backend"], "sqlite", "{status}");
    assert_eq!(status["read_only_reason"], Value::Null, "{status}");
    assert_eq!(status["read_only"], json!(false), "{status}");
}

#[test]
fn changes_arbiter_commits_while_mounted_show_up_in_the_files() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::new(&db, &[]);
    assert_mount_matches_arbiter(&m, &a);

    let mut s0 = seeded.sessions[0].clone();
    s0.calls_made += 1;
    s0.rate_window_calls += 1;
    a.run(a.st.update_session(&s0)).unwrap();
    let mut fresh = seeded.sessions[1].clone();
    fresh.session_id = Uuid::new_v4();
    fresh.declared_intent = "ajoutée par arbiter pendant le montage".into();
    a.run(a.st.insert_session(&fresh)).unwrap();
    a.run(a.st.deactivate_agent(seeded.agents[0].id)).unwrap();
    let mut link = seeded.delegations[1].clone();
    link.scope_narrowing = vec!["deploy".into()];
    link.id = a.run(a.st.insert_delegation(&link)).unwrap();

    let shows = |p: PathBuf, want: Value| {
        let seen = wait_until(Duration::from_secs(10), || {
            std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| v == want)
        });
        assert!(
            seen.is_some(),
            "{} never showed arbiter's commit {want}",
            p.display()
        );
    };
    shows(session_path(&m, s0.session_id), val(&s0));
    shows(session_path(&m, fresh.session_id), val(&fresh));
    let mut agent0 = seeded.agents[0].clone();
    agent0.active = false;
    shows(m.p(&format!("agents/{}.json", agent0.id)), val(&agent0));
    shows(m.p(&format!("delegations/{}.json", link.id)), val(&link));
    assert_mount_matches_arbiter(&m, &a);

    // arbiter's cleanup removes the expired session: its file goes.
    let expired = session_path(&m, seeded.sessions[2].session_id);
    assert_eq!(a.run(a.st.delete_expired_sessions()).unwrap(), 1);
    assert!(
        wait_until(Duration::from_secs(10), || !expired.exists()).is_some(),
        "the expired session's file is gone"
    );
    assert_mount_matches_arbiter(&m, &a);
}

#[test]
fn edits_creates_renames_and_removals_through_the_mount_are_what_arbiter_loads() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::new(&db, &[]);

    // Edit a session's file: status and calls_made.
    let s0 = &seeded.sessions[0];
    let p = session_path(&m, s0.session_id);
    let mut v = read_json(&p);
    v["status"] = json!("closed");
    v["calls_made"] = json!(42);
    write_close(&p, &pretty(&v)).expect("an edited session is accepted");
    let got = a.session(s0.session_id).unwrap();
    assert_eq!(got.status, StoredSessionStatus::Closed);
    assert_eq!(got.calls_made, 42);
    let mut want = s0.clone();
    want.status = StoredSessionStatus::Closed;
    want.calls_made = 42;
    assert_eq!(val(&got), val(&want), "nothing else of the session changed");

    // A new session file named by a new UUID, without session_id: the name gives the id.
    let new_id = Uuid::new_v4();
    let mut body = val(&seeded.sessions[1]);
    body.as_object_mut().unwrap().remove("session_id");
    body["declared_intent"] = json!("créée par le montage 📁");
    write_close(&session_path(&m, new_id), &pretty(&body)).expect("a new session is accepted");
    let got = a
        .session(new_id)
        .expect("arbiter loads the session created through the mount");
    let mut want = seeded.sessions[1].clone();
    want.session_id = new_id;
    want.declared_intent = "créée par le montage 📁".into();
    assert_eq!(val(&got), val(&want));
    assert_eq!(
        read_json(&session_path(&m, new_id))["session_id"],
        json!(new_id.to_string()),
        "the file shows the id its name gave"
    );

    // mv a session to a new UUID name: arbiter finds it under the new id only.
    let s2 = &seeded.sessions[2];
    let moved = Uuid::new_v4();
    sh_ok(
        &format!("mv sessions/{}.json sessions/{moved}.json", s2.session_id),
        m.path(),
    );
    assert!(
        matches!(
            a.session(s2.session_id),
            Err(StorageError::SessionNotFound(_))
        ),
        "the old id is gone"
    );
    let got = a.session(moved).expect("arbiter loads the renamed session");
    let mut want = s2.clone();
    want.session_id = moved;
    assert_eq!(val(&got), val(&want));
    assert!(!session_path(&m, s2.session_id).exists());
    assert_eq!(read_json(&session_path(&m, moved)), val(&want));

    // rm an agent's file: arbiter no longer has the agent.
    let gone = &seeded.agents[1];
    sh_ok(&format!("rm agents/{}.json", gone.id), m.path());
    assert!(matches!(
        a.agent(gone.id),
        Err(StorageError::AgentNotFound(_))
    ));
    assert!(
        !a.run(a.st.list_agents())
            .unwrap()
            .iter()
            .any(|x| x.id == gone.id)
    );

    // Narrow a delegation's scope.
    let d0 = &seeded.delegations[0];
    let p = m.p(&format!("delegations/{}.json", d0.id));
    let mut v = read_json(&p);
    v["scope_narrowing"] = json!(["read", "audit:ログ"]);
    write_close(&p, &pretty(&v)).expect("an edited delegation is accepted");
    let mut want = d0.clone();
    want.scope_narrowing = vec!["read".into(), "audit:ログ".into()];
    assert_eq!(val(&a.delegation(d0.id).unwrap()), val(&want));
    let to = a.run(a.st.get_delegations_to(d0.to_agent)).unwrap();
    assert_eq!(val(to.iter().find(|x| x.id == d0.id).unwrap()), val(&want));

    // A delegation created through the mount takes its id from the name, and arbiter's
    // next insert_delegation does not collide with it (AUTOINCREMENT moves past it).
    let made = seeded.delegations.iter().map(|l| l.id).max().unwrap() + 10;
    let mut body = val(&seeded.delegations[1]);
    body.as_object_mut().unwrap().remove("id");
    write_close(&m.p(&format!("delegations/{made}.json")), &pretty(&body))
        .expect("a new delegation is accepted");
    let mut want = seeded.delegations[1].clone();
    want.id = made;
    assert_eq!(val(&a.delegation(made).unwrap()), val(&want));
    let next = a.run(a.st.insert_delegation(&want)).unwrap();
    assert!(next > made, "arbiter's next id {next} is past {made}");

    // A restarted arbiter (a fresh SqliteStorage on the file) loads exactly the files.
    let restarted = Arbiter::open(&db, None);
    assert_eq!(
        restarted.run(restarted.st.list_sessions()).unwrap().len(),
        5
    );
    wait_until(Duration::from_secs(5), || {
        m.p(&format!("delegations/{next}.json")).exists()
    });
    assert_mount_matches_arbiter(&m, &restarted);
}

#[test]
fn with_arbiters_key_files_are_plaintext_and_writes_are_stored_as_arbiters_ciphertext() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, Some(KEY));
    let seeded = seed(&a);
    let enc = FieldEncryptor::from_hex_key(KEY).unwrap();
    let s0 = &seeded.sessions[0];
    let [intent, _, _] = raw_session(&db, s0.session_id);
    assert_eq!(
        enc.decrypt_field(&intent).unwrap(),
        INTENT_0,
        "arbiter stored ciphertext"
    );

    let m = Mount::with_env(&db, &[], &[(KEY_VAR, Some(KEY))]);
    let status = read_json(&m.p(".status"));
    assert_eq!(status["read_only_reason"], Value::Null, "{status}");
    assert_eq!(status["read_only"], json!(false), "{status}");
    assert_mount_matches_arbiter(&m, &a);
    assert_eq!(
        read_json(&session_path(&m, s0.session_id))["declared_intent"],
        INTENT_0
    );

    // Edit the encrypted fields through the mount.
    let secret = "rotate the 鍵 on staging — never prod";
    let tools = ["deploy_staging", "rotate_keys"];
    let chain = ["root-operator-7f3a"];
    let p = session_path(&m, s0.session_id);
    let mut v = read_json(&p);
    v["declared_intent"] = json!(secret);
    v["authorized_tools"] = json!(tools);
    v["delegation_chain_snapshot"] = json!(chain);
    v["calls_made"] = json!(7);
    write_close(&p, &pretty(&v)).expect("an edited encrypted session is accepted");

    let [intent, stored_tools, stored_chain] = raw_session(&db, s0.session_id);
    for (column, stored, plain) in [
        ("declared_intent", &intent, secret),
        ("authorized_tools", &stored_tools, tools[0]),
        ("authorized_tools", &stored_tools, tools[1]),
        ("delegation_chain_snapshot", &stored_chain, chain[0]),
    ] {
        assert!(
            !stored.contains(plain),
            "{column} is stored in plaintext: {stored}"
        );
    }
    assert_ne!(stored_tools, serde_json::to_string(&tools).unwrap());
    // arbiter's own decryption reads what the mount stored.
    assert_eq!(enc.decrypt_field(&intent).unwrap(), secret);
    assert_eq!(enc.decrypt_string_vec(&stored_tools).unwrap(), tools);
    assert_eq!(enc.decrypt_string_vec(&stored_chain).unwrap(), chain);
    let mut want = s0.clone();
    want.declared_intent = secret.into();
    want.authorized_tools = tools.iter().map(|t| t.to_string()).collect();
    want.delegation_chain_snapshot = chain.iter().map(|t| t.to_string()).collect();
    want.calls_made = 7;
    assert_eq!(val(&a.session(s0.session_id).unwrap()), val(&want));

    // A session created through the mount is stored encrypted too.
    let new_id = Uuid::new_v4();
    let mut body = val(&seeded.sessions[3]);
    body.as_object_mut().unwrap().remove("session_id");
    body["declared_intent"] = json!("nouvelle intention chiffrée");
    write_close(&session_path(&m, new_id), &pretty(&body)).expect("a new session is accepted");
    let [intent, _, _] = raw_session(&db, new_id);
    assert!(
        !intent.contains("chiffrée"),
        "stored in plaintext: {intent}"
    );
    assert_eq!(
        enc.decrypt_field(&intent).unwrap(),
        "nouvelle intention chiffrée"
    );

    // A restarted arbiter with the key loads everything the files show.
    let restarted = Arbiter::open(&db, Some(KEY));
    assert_eq!(
        restarted.session(new_id).unwrap().declared_intent,
        "nouvelle intention chiffrée"
    );
    assert_mount_matches_arbiter(&m, &restarted);
}

#[test]
fn without_the_key_an_encrypted_database_mounts_read_only_and_says_why() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, Some(KEY));
    let seeded = seed(&a);
    let before = dump(&db);

    let m = Mount::with_env(&db, &[], &[(KEY_VAR, None)]);
    let status = read_json(&m.p(".status"));
    let reason = status["read_only_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no read_only_reason: {status}"));
    assert!(reason.contains(KEY_VAR), "{reason}");
    assert_eq!(status["read_only"], json!(true), "{status}");

    let s0 = &seeded.sessions[0];
    let p = session_path(&m, s0.session_id);
    let shown = std::fs::read_to_string(&p).unwrap();
    assert!(
        !shown.contains("修复登录测试"),
        "no plaintext without the key: {shown}"
    );
    let mut v = read_json(&p);
    v["calls_made"] = json!(99);
    assert_eq!(write_close(&p, &pretty(&v)), Err(libc::EROFS));
    assert_eq!(
        write_close(
            &session_path(&m, Uuid::new_v4()),
            &pretty(&val(&seeded.sessions[1]))
        ),
        Err(libc::EROFS)
    );
    assert_eq!(
        std::fs::remove_file(m.p(&format!("agents/{}.json", seeded.agents[0].id)))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // Agents are not encrypted: still arbiter's records.
    let agents = a.run(a.st.list_agents()).unwrap();
    assert_collection::<StoredAgent>(
        &m.p("agents"),
        agents.iter().map(|x| (x.id.to_string(), val(x))).collect(),
    );
    drop(m);
    assert_eq!(dump(&db), before, "the database is unchanged");
    assert_eq!(val(&a.session(s0.session_id).unwrap()), val(s0));
}

#[test]
fn once_arbiter_stores_ciphertext_a_keyless_mount_refuses_plaintext_session_writes() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::with_env(&db, &[], &[(KEY_VAR, None)]);
    let s0 = &seeded.sessions[0];
    let p = session_path(&m, s0.session_id);
    let mut v = read_json(&p);
    v["calls_made"] = json!(4);
    write_close(&p, &pretty(&v)).expect("a plaintext database is writable without a key");

    // arbiter, now run with a key, writes an encrypted session while the mount is up.
    let keyed = Arbiter::open(&db, Some(KEY));
    let mut s = seeded.sessions[1].clone();
    s.session_id = Uuid::new_v4();
    keyed.run(keyed.st.insert_session(&s)).unwrap();
    let before = dump(&db);

    v["calls_made"] = json!(5);
    assert_eq!(
        write_close(&p, &pretty(&v)),
        Err(libc::EROFS),
        "plaintext beside arbiter's ciphertext is refused"
    );
    let mut body = val(&seeded.sessions[3]);
    body.as_object_mut().unwrap().remove("session_id");
    assert_eq!(
        write_close(&session_path(&m, Uuid::new_v4()), &pretty(&body)),
        Err(libc::EROFS),
        "creating a session is refused as editing one is: EROFS, for the missing key"
    );
    assert_eq!(dump(&db), before, "the database is unchanged");
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert!(errors.contains(KEY_VAR), "the refusal says why:\n{errors}");
    assert_eq!(a.session(s0.session_id).unwrap().calls_made, 4);
    assert_eq!(
        keyed.session(s.session_id).unwrap().declared_intent,
        s.declared_intent
    );
}

#[test]
fn a_database_made_by_make_db_py_opens_in_arbiter_and_the_mount_serves_it() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("made.db");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/arbiter/make_db.py"
        ))
        .arg(&db)
        .args(["--sessions", "5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make_db.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    // SqliteStorage::new re-validates the recorded migrations (sqlx checksums).
    let a = Arbiter::open(&db, None);
    let sessions = a.run(a.st.list_sessions()).unwrap();
    assert_eq!(sessions.len(), 5);
    assert!(sessions.iter().any(|s| s.session_id == first));
    assert_eq!(
        sessions
            .iter()
            .filter(|s| s.rate_limit_per_minute.is_none())
            .count(),
        3
    );
    assert_eq!(a.run(a.st.list_agents()).unwrap().len(), 2);
    assert_eq!(a.run(a.st.list_delegations()).unwrap().len(), 1);

    let m = Mount::new(&db, &[]);
    assert_mount_matches_arbiter(&m, &a);
}

#[test]
fn a_sqlite_database_without_arbiters_tables_is_refused_at_mount() {
    let cases: [(&str, &[&str]); 2] = [
        (
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
            &["sessions", "agents", "delegation_links"],
        ),
        (
            "CREATE TABLE agents (id TEXT PRIMARY KEY NOT NULL)",
            &["sessions", "delegation_links"],
        ),
    ];
    for (schema, missing) in cases {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("other.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch(schema)
            .unwrap();
        let tables = |db: &Path| -> Vec<String> {
            let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let mut st = c
                .prepare("SELECT name FROM sqlite_master ORDER BY name")
                .unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        let schema_before = tables(&db);
        // A guard that unmounts should the mount wrongly succeed.
        let guard = Mount {
            dir: tempfile::tempdir().unwrap(),
            store: db.clone(),
        };
        let out = Command::new(BIN)
            .arg("mount")
            .arg("--store")
            .arg(&db)
            .arg(guard.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{schema}: stderr: {stderr}");
        assert!(
            !agentmount::mount::is_mountpoint(guard.path()),
            "{schema}: nothing is mounted"
        );
        let named = stderr
            .split_once("missing")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(list, _)| list)
            .unwrap_or_else(|| panic!("{schema}: the message names no missing tables: {stderr}"));
        for t in ["sessions", "agents", "delegation_links"] {
            assert_eq!(
                named.contains(t),
                missing.contains(&t),
                "{schema}: missing tables named {named:?} (want {missing:?}); stderr: {stderr}"
            );
        }
        assert_eq!(
            tables(&db),
            schema_before,
            "{schema}: the mount created or migrated nothing"
        );
    }
}

#[test]
fn records_arbiter_could_not_load_are_refused_with_einval_and_the_database_is_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::new(&db, &[]);
    let before = dump(&db);

    let sp = session_path(&m, seeded.sessions[0].session_id);
    let ap = m.p(&format!("agents/{}.json", seeded.agents[0].id));
    let dp = m.p(&format!("delegations/{}.json", seeded.delegations[0].id));
    let new_session = session_path(&m, Uuid::new_v4());
    let new_delegation = m.p("delegations/4242.json");
    let (s, ag, dl) = (read_json(&sp), read_json(&ap), read_json(&dp));
    let with = |base: &Value, key: &str, x: Value| {
        let mut v = base.clone();
        v[key] = x;
        v
    };
    let without = |base: &Value, key: &str| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(key);
        v
    };
    let cases: Vec<(&str, &PathBuf, Value)> = vec![
        (
            "session: unknown key",
            &sp,
            with(&s, "approved_by", json!("me")),
        ),
        (
            "session: unknown status",
            &sp,
            with(&s, "status", json!("paused")),
        ),
        (
            "session: unknown sensitivity",
            &sp,
            with(&s, "data_sensitivity_ceiling", json!("top-secret")),
        ),
        (
            "session: calls_made as text",
            &sp,
            with(&s, "calls_made", json!("ten")),
        ),
        (
            "session: negative calls_made",
            &sp,
            with(&s, "calls_made", json!(-1)),
        ),
        (
            "session: fractional rate limit",
            &sp,
            with(&s, "rate_limit_per_minute", json!(1.5)),
        ),
        (
            "session: tools not a list",
            &sp,
            with(&s, "authorized_tools", json!("read_file")),
        ),
        (
            "session: timestamp not RFC 3339",
            &sp,
            with(&s, "created_at", json!("yesterday")),
        ),
        ("session: field missing", &sp, without(&s, "agent_id")),
        (
            "session: session_id disagrees with the file name",
            &sp,
            with(&s, "session_id", json!(Uuid::new_v4().to_string())),
        ),
        (
            "agent: unknown trust level",
            &ap,
            with(&ag, "trust_level", json!("omnipotent")),
        ),
        (
            "agent: capabilities not a list",
            &ap,
            with(&ag, "capabilities", json!("read")),
        ),
        (
            "agent: active as a number",
            &ap,
            with(&ag, "active", json!(1)),
        ),
        (
            "agent: id disagrees with the file name",
            &ap,
            with(&ag, "id", json!(Uuid::new_v4().to_string())),
        ),
        (
            "delegation: id disagrees with the file name",
            &dp,
            with(&dl, "id", json!(99)),
        ),
        (
            "delegation: from_agent not a UUID",
            &dp,
            with(&dl, "from_agent", json!("agent-7")),
        ),
        (
            "new session: unknown status",
            &new_session,
            without(&with(&s, "status", json!("paused")), "session_id"),
        ),
        (
            "new delegation: unknown key",
            &new_delegation,
            with(&without(&dl, "id"), "approved", json!(true)),
        ),
    ];
    for (what, path, body) in &cases {
        assert_eq!(
            write_close(path, &pretty(body)),
            Err(libc::EINVAL),
            "{what}: {body}"
        );
    }
    assert_eq!(
        write_close(&sp, b"{\"status\": "),
        Err(libc::EINVAL),
        "bad JSON"
    );
    assert_eq!(dump(&db), before, "no refused write reached the database");

    for p in [&new_session, &new_delegation] {
        assert!(
            wait_until(Duration::from_secs(2), || !p.exists()).is_some(),
            "a refused new record does not linger: {}",
            p.display()
        );
    }
    assert_mount_matches_arbiter(&m, &a);
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    let refusals = errors
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["errno"] == "EINVAL")
        .count();
    assert!(
        refusals > cases.len(),
        "each refusal is in .errors:\n{errors}"
    );
    assert!(
        errors.contains("paused"),
        "the reason names the bad value:\n{errors}"
    );
}

/// A delegation id so large that arbiter could never insert a delegation link again
/// (AUTOINCREMENT: SQLite keeps the largest id ever inserted, and past i64's maximum it
/// answers SQLITE_FULL) is refused, naming the bound (2^53); up to the bound is accepted,
/// and arbiter's own insert still works afterwards.
#[test]
fn delegation_ids_above_two_to_the_53_are_refused_and_arbiter_can_still_insert() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("arbiter.db");
    let a = Arbiter::open(&db, None);
    let seeded = seed(&a);
    let m = Mount::new(&db, &[]);
    let first = &seeded.delegations[0];
    let body = |id: i64| {
        let mut v = val(first);
        v["id"] = json!(id);
        pretty(&v)
    };
    let before = dump(&db);
    let bound: i64 = 1 << 53;
    for id in [i64::MAX, bound + 1] {
        assert_eq!(
            write_close(&m.p(&format!("delegations/{id}.json")), &body(id)),
            Err(libc::EINVAL),
            "{id}"
        );
        let e = std::fs::rename(
            m.p(&format!("delegations/{}.json", first.id)),
            m.p(&format!("delegations/{id}.json")),
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "mv to {id}");
    }
    assert_eq!(dump(&db), before, "nothing reached the database");
    let errors = std::fs::read_to_string(m.p(".errors")).unwrap();
    assert_eq!(errors.lines().count(), 4, "{errors}");
    assert!(
        errors
            .lines()
            .all(|l| l.contains("9007199254740992 (2^53)")),
        "each reason names the bound: {errors}"
    );
    // The bound itself is accepted; arbiter's next link is numbered after it.
    write_close(&m.p(&format!("delegations/{bound}.json")), &body(bound)).unwrap();
    assert!(a.delegation(bound).is_some());
    let mut next = first.clone();
    next.id = 0;
    let id = a
        .run(a.st.insert_delegation(&next))
        .expect("arbiter can still insert a delegation link");
    assert_eq!(id, bound + 1);
    assert!(a.delegation(id).is_some());
}
