//! arbiter's records (arbiter-storage 0.5 `StoredSession`, `StoredAgent`,
//! `StoredDelegationLink`): the same serde forms, read from and written to its rows the
//! way its `SqliteStorage` does (timestamps `to_rfc3339()`, enums lowercase, JSON-array
//! columns, `active` 0/1, unsigned counters bound as i64, encrypted session fields).

use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Row, Transaction, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::crypt::Crypt;
use crate::backend::Kind;
use crate::error::{Result, StoreError};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustLevel {
    Untrusted,
    Basic,
    Verified,
    Trusted,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Active,
    Closed,
    Expired,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    Public,
    Internal,
    Confidential,
    Restricted,
}

/// `StoredAgent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub id: Uuid,
    pub owner: String,
    pub model: String,
    pub capabilities: Vec<String>,
    pub trust_level: TrustLevel,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub active: bool,
}

/// `StoredDelegationLink`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    pub id: i64,
    pub from_agent: Uuid,
    pub to_agent: Uuid,
    pub scope_narrowing: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// `StoredSession`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub session_id: Uuid,
    pub agent_id: Uuid,
    pub delegation_chain_snapshot: Vec<String>,
    pub declared_intent: String,
    pub authorized_tools: Vec<String>,
    pub time_limit_secs: i64,
    pub call_budget: u64,
    pub calls_made: u64,
    pub rate_limit_per_minute: Option<u64>,
    pub rate_window_start: DateTime<Utc>,
    pub rate_window_calls: u64,
    pub rate_limit_window_secs: u64,
    pub data_sensitivity_ceiling: Sensitivity,
    pub created_at: DateTime<Utc>,
    pub status: SessionStatus,
}

/// The table behind a collection, its key column, and the key as JSON.
pub fn table(kind: Kind) -> Option<(&'static str, &'static str)> {
    match kind {
        Kind::Sessions => Some(("sessions", "session_id")),
        Kind::Agents => Some(("agents", "id")),
        Kind::Delegations => Some(("delegation_links", "id")),
        _ => None,
    }
}

/// Whether `id` is the canonical text of a key of `kind` (what arbiter writes, so the
/// file name and the row agree byte for byte).
pub fn valid_id(kind: Kind, id: &str) -> bool {
    match kind {
        Kind::Sessions | Kind::Agents => {
            Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
        }
        Kind::Delegations => id
            .parse::<i64>()
            .is_ok_and(|n| n > 0 && n.to_string() == id),
        _ => false,
    }
}

pub fn check_id(kind: Kind, id: &str) -> Result<()> {
    if valid_id(kind, id) {
        return Ok(());
    }
    Err(StoreError::Invalid(match kind {
        Kind::Sessions | Kind::Agents => match crate::store::validate::canonical_uuid(id) {
            Some(c) => format!(
                "{id:?} is not how a {} id is written: name it {c:?} (a lowercase hyphenated UUID)",
                kind.singular()
            ),
            None => format!(
                "{id:?} is not a valid {} id: a lowercase hyphenated UUID",
                kind.singular()
            ),
        },
        Kind::Delegations => {
            format!("{id:?} is not a valid delegation id: a positive integer")
        }
        _ => format!("an arbiter database has no {} collection", kind.dir_name()),
    }))
}

/// The largest delegation id a write through the mount may give a row: 2^53 (also the
/// largest integer every JSON reader keeps exactly). arbiter numbers its delegation links
/// itself (`AUTOINCREMENT`), and SQLite remembers the largest id ever inserted
/// (`sqlite_sequence`, even after the row goes): one row at i64's maximum and arbiter could
/// never insert a delegation link again (SQLITE_FULL).
pub const DELEGATION_ID_MAX: i64 = 1 << 53;

/// EINVAL unless `id` may be given to a row by a write (a create, an update, a re-key's
/// target): [`check_id`], and a delegation id at most [`DELEGATION_ID_MAX`].
pub fn check_new_id(kind: Kind, id: &str) -> Result<()> {
    check_id(kind, id)?;
    if kind == Kind::Delegations && id.parse::<i64>().is_ok_and(|n| n > DELEGATION_ID_MAX) {
        return Err(StoreError::Invalid(format!(
            "delegation id {id} is above {DELEGATION_ID_MAX} (2^53), the largest a write may \
             give: arbiter numbers delegation links itself and could not insert one again"
        )));
    }
    Ok(())
}

/// The key as the record's JSON carries it.
fn key_json(kind: Kind, id: &str) -> Value {
    match kind {
        Kind::Delegations => id
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(id.into())),
        _ => Value::String(id.into()),
    }
}

fn ts(s: &str, what: &str) -> std::result::Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| format!("invalid {what} {s:?}: {e}"))
}

fn uuid(s: &str, what: &str) -> std::result::Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|e| format!("invalid {what} UUID {s:?}: {e}"))
}

fn strings(raw: &str, what: &str) -> std::result::Result<Vec<String>, String> {
    serde_json::from_str(raw).map_err(|e| format!("{what} is not a JSON array of strings: {e}"))
}

fn enum_of<T: for<'de> Deserialize<'de>>(s: &str, what: &str) -> std::result::Result<T, String> {
    serde_json::from_value(Value::String(s.to_lowercase()))
        .map_err(|_| format!("unknown {what}: {s}"))
}

/// The bytes a record shows: arbiter's serde form, pretty, with a final newline.
pub fn present<T: Serialize>(v: &T) -> std::result::Result<Vec<u8>, String> {
    let mut b = serde_json::to_vec_pretty(v).map_err(|e| e.to_string())?;
    b.push(b'\n');
    Ok(b)
}

/// A row's bytes in arbiter's serde form, or why arbiter could not load it and the row's
/// raw columns as JSON.
pub type Rendered = std::result::Result<Vec<u8>, (String, Vec<u8>)>;

/// A row as arbiter's `row_to_*` reads it, then as its serde form. `Err` carries the
/// reason arbiter itself would fail on the row, and the raw columns to show instead.
pub fn render(
    kind: Kind,
    row: &Row<'_>,
    crypt: Option<&Crypt>,
) -> rusqlite::Result<(String, Rendered)> {
    let id: String = match kind {
        Kind::Delegations => row.get::<_, i64>("id")?.to_string(),
        Kind::Sessions => row.get("session_id")?,
        _ => row.get("id")?,
    };
    let typed = match kind {
        Kind::Sessions => session(row, crypt)?.and_then(|s| present(&s)),
        Kind::Agents => agent(row)?.and_then(|a| present(&a)),
        _ => delegation(row)?.and_then(|d| present(&d)),
    };
    let out = match typed {
        Ok(b) => Ok(b),
        Err(why) => {
            // Shown as it is stored, so nothing is hidden; the reason goes to .status.
            let mut m = Map::new();
            for (i, name) in row.as_ref().column_names().iter().enumerate() {
                if name.starts_with("_agentmount") {
                    continue;
                }
                let v = match row.get::<_, SqlValue>(i)? {
                    SqlValue::Null => Value::Null,
                    SqlValue::Integer(n) => Value::from(n),
                    SqlValue::Real(f) => Value::from(f),
                    SqlValue::Text(t) => Value::String(t),
                    SqlValue::Blob(b) => Value::String(format!("<{} bytes>", b.len())),
                };
                m.insert((*name).to_string(), v);
            }
            let raw = present(&Value::Object(m)).unwrap_or_default();
            Err((why, raw))
        }
    };
    Ok((id, out))
}

type Parsed<T> = rusqlite::Result<std::result::Result<T, String>>;

fn agent(row: &Row<'_>) -> Parsed<Agent> {
    let id: String = row.get("id")?;
    let caps: String = row.get("capabilities")?;
    let trust: String = row.get("trust_level")?;
    let created: String = row.get("created_at")?;
    let expires: Option<String> = row.get("expires_at")?;
    let active: i64 = row.get("active")?;
    Ok((|| {
        Ok(Agent {
            id: uuid(&id, "agent")?,
            owner: row.get("owner").map_err(|e| e.to_string())?,
            model: row.get("model").map_err(|e| e.to_string())?,
            capabilities: strings(&caps, "capabilities")?,
            trust_level: enum_of(&trust, "trust level")?,
            created_at: ts(&created, "created_at")?,
            expires_at: expires.map(|s| ts(&s, "expires_at")).transpose()?,
            active: active != 0,
        })
    })())
}

fn delegation(row: &Row<'_>) -> Parsed<Delegation> {
    let id: i64 = row.get("id")?;
    let from: String = row.get("from_agent")?;
    let to: String = row.get("to_agent")?;
    let scope: String = row.get("scope_narrowing")?;
    let created: String = row.get("created_at")?;
    let expires: Option<String> = row.get("expires_at")?;
    Ok((|| {
        Ok(Delegation {
            id,
            from_agent: uuid(&from, "from_agent")?,
            to_agent: uuid(&to, "to_agent")?,
            scope_narrowing: strings(&scope, "scope_narrowing")?,
            created_at: ts(&created, "created_at")?,
            expires_at: expires.map(|s| ts(&s, "expires_at")).transpose()?,
        })
    })())
}

fn session(row: &Row<'_>, crypt: Option<&Crypt>) -> Parsed<Session> {
    let sid: String = row.get("session_id")?;
    let aid: String = row.get("agent_id")?;
    let chain: String = row.get("delegation_chain_snapshot")?;
    let intent: String = row.get("declared_intent")?;
    let tools: String = row.get("authorized_tools")?;
    let rlpm: Option<i64> = row.get("rate_limit_per_minute")?;
    let rws: String = row.get("rate_window_start")?;
    let sens: String = row.get("data_sensitivity_ceiling")?;
    let created: String = row.get("created_at")?;
    let status: String = row.get("status")?;
    let time_limit_secs: i64 = row.get("time_limit_secs")?;
    let call_budget: i64 = row.get("call_budget")?;
    let calls_made: i64 = row.get("calls_made")?;
    let rate_window_calls: i64 = row.get("rate_window_calls")?;
    let rate_limit_window_secs: i64 = row.get("rate_limit_window_secs")?;
    Ok((|| {
        let (chain, intent, tools) = match crypt {
            Some(c) => (
                c.decrypt(&chain)
                    .map_err(|e| format!("delegation_chain_snapshot: {e}"))?,
                c.decrypt(&intent)
                    .map_err(|e| format!("declared_intent: {e}"))?,
                c.decrypt(&tools)
                    .map_err(|e| format!("authorized_tools: {e}"))?,
            ),
            None => (chain, intent, tools),
        };
        Ok(Session {
            session_id: uuid(&sid, "session")?,
            agent_id: uuid(&aid, "agent")?,
            delegation_chain_snapshot: strings(&chain, "delegation_chain_snapshot")?,
            declared_intent: intent,
            authorized_tools: strings(&tools, "authorized_tools")?,
            time_limit_secs,
            call_budget: call_budget as u64,
            calls_made: calls_made as u64,
            rate_limit_per_minute: rlpm.map(|v| v as u64),
            rate_window_start: ts(&rws, "rate_window_start")?,
            rate_window_calls: rate_window_calls as u64,
            rate_limit_window_secs: rate_limit_window_secs as u64,
            data_sensitivity_ceiling: enum_of(&sens, "data sensitivity")?,
            created_at: ts(&created, "created_at")?,
            status: enum_of(&status, "session status")?,
        })
    })())
}

/// A record as written: parsed and checked against arbiter's type (an unknown key, a
/// wrong type, an unknown enum value, an id that disagrees with the name: EINVAL).
pub enum Typed {
    Session(Session),
    Agent(Agent),
    Delegation(Delegation),
}

pub fn parse(kind: Kind, id: &str, bytes: &[u8], max_len: u64) -> Result<Typed> {
    check_new_id(kind, id)?;
    let what = format!("{} {id}", kind.singular());
    if bytes.len() as u64 > max_len {
        return Err(StoreError::TooBig(format!(
            "{what}: {} bytes is over the record size limit of {max_len} bytes",
            bytes.len()
        )));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Invalid(format!("{what}: invalid JSON: {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(StoreError::Invalid(format!(
            "{what}: a record must be a JSON object"
        )));
    };
    let (_, key) = table(kind).ok_or_else(|| {
        StoreError::Invalid(format!(
            "an arbiter database has no {} collection",
            kind.dir_name()
        ))
    })?;
    let want = key_json(kind, id);
    match obj.get(key) {
        None => {
            obj.insert(key.to_string(), want);
        }
        Some(have) if *have == want => {}
        Some(have) => {
            return Err(StoreError::Invalid(format!(
                "{what}: field {key:?} is {have} but the file name says {id:?}"
            )));
        }
    }
    let bad = |e: serde_json::Error| StoreError::Invalid(format!("{what}: {e}"));
    let v = Value::Object(obj);
    Ok(match kind {
        Kind::Sessions => Typed::Session(serde_json::from_value(v).map_err(bad)?),
        Kind::Agents => Typed::Agent(serde_json::from_value(v).map_err(bad)?),
        _ => Typed::Delegation(serde_json::from_value(v).map_err(bad)?),
    })
}

/// Writes a record in the open transaction, as arbiter's insert/update would store it
/// (an upsert on the key).
pub fn write(tx: &Transaction<'_>, rec: &Typed, crypt: Option<&Crypt>) -> Result<()> {
    let sql = |e: rusqlite::Error| super::sql_error("write the row", e);
    match rec {
        Typed::Agent(a) => {
            tx.execute(
                "INSERT INTO agents (id, owner, model, capabilities, trust_level, created_at, expires_at, active)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET owner = excluded.owner, model = excluded.model,
                   capabilities = excluded.capabilities, trust_level = excluded.trust_level,
                   created_at = excluded.created_at, expires_at = excluded.expires_at,
                   active = excluded.active",
                params![
                    a.id.to_string(),
                    a.owner,
                    a.model,
                    to_json(&a.capabilities)?,
                    enum_text(&a.trust_level),
                    a.created_at.to_rfc3339(),
                    a.expires_at.map(|e| e.to_rfc3339()),
                    a.active as i32,
                ],
            )
            .map_err(sql)?;
        }
        Typed::Delegation(d) => {
            tx.execute(
                "INSERT INTO delegation_links (id, from_agent, to_agent, scope_narrowing, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET from_agent = excluded.from_agent,
                   to_agent = excluded.to_agent, scope_narrowing = excluded.scope_narrowing,
                   created_at = excluded.created_at, expires_at = excluded.expires_at",
                params![
                    d.id,
                    d.from_agent.to_string(),
                    d.to_agent.to_string(),
                    to_json(&d.scope_narrowing)?,
                    d.created_at.to_rfc3339(),
                    d.expires_at.map(|e| e.to_rfc3339()),
                ],
            )
            .map_err(sql)?;
        }
        Typed::Session(s) => {
            let vec_field = |v: &Vec<String>| -> Result<String> {
                let j = to_json(v)?;
                match crypt {
                    Some(c) => c.encrypt(&j),
                    None => Ok(j),
                }
            };
            let intent = match crypt {
                Some(c) => c.encrypt(&s.declared_intent)?,
                None => s.declared_intent.clone(),
            };
            tx.execute(
                "INSERT INTO sessions (
                    session_id, agent_id, delegation_chain_snapshot, declared_intent,
                    authorized_tools, time_limit_secs, call_budget, calls_made,
                    rate_limit_per_minute, rate_window_start, rate_window_calls,
                    rate_limit_window_secs, data_sensitivity_ceiling, created_at, status
                 ) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT(session_id) DO UPDATE SET
                    agent_id = excluded.agent_id,
                    delegation_chain_snapshot = excluded.delegation_chain_snapshot,
                    declared_intent = excluded.declared_intent,
                    authorized_tools = excluded.authorized_tools,
                    time_limit_secs = excluded.time_limit_secs,
                    call_budget = excluded.call_budget, calls_made = excluded.calls_made,
                    rate_limit_per_minute = excluded.rate_limit_per_minute,
                    rate_window_start = excluded.rate_window_start,
                    rate_window_calls = excluded.rate_window_calls,
                    rate_limit_window_secs = excluded.rate_limit_window_secs,
                    data_sensitivity_ceiling = excluded.data_sensitivity_ceiling,
                    created_at = excluded.created_at, status = excluded.status",
                params![
                    s.session_id.to_string(),
                    s.agent_id.to_string(),
                    vec_field(&s.delegation_chain_snapshot)?,
                    intent,
                    vec_field(&s.authorized_tools)?,
                    s.time_limit_secs,
                    s.call_budget as i64,
                    s.calls_made as i64,
                    s.rate_limit_per_minute.map(|v| v as i64),
                    s.rate_window_start.to_rfc3339(),
                    s.rate_window_calls as i64,
                    s.rate_limit_window_secs as i64,
                    enum_text(&s.data_sensitivity_ceiling),
                    s.created_at.to_rfc3339(),
                    enum_text(&s.status),
                ],
            )
            .map_err(sql)?;
        }
    }
    Ok(())
}

fn to_json(v: &[String]) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn enum_text<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}
