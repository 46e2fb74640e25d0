//! Validation of records written through agentmount. Known fields must have their types;
//! unknown fields are data and pass untouched.

use serde_json::{Map, Value};

use super::Kind;
use crate::error::{Result, StoreError};

pub const SESSION_STATES: &[&str] = &[
    "provisioning",
    "active",
    "stopped",
    "errored",
    "decommissioned",
    "deleted",
];
pub const RUNTIMES: &[&str] = &["claude-code", "tcode"];
pub const GOAL_STATUSES: &[&str] = &["pending", "inProgress", "blocked", "done", "abandoned"];
pub const GOAL_SESSION_STATES: &[&str] = &["launched", "running", "verified", "failed"];

/// Whether `id` is a valid record id for the collection (and so a safe file name).
pub fn valid_id(kind: Kind, id: &str) -> bool {
    match kind {
        Kind::Sessions => canonical_uuid(id).as_deref() == Some(id),
        Kind::Goals | Kind::Conversations => {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
        Kind::Agents | Kind::Delegations => false,
    }
}

/// The one spelling of a UUID every backend keys by (lowercase, hyphenated), for any text
/// that parses as one (uppercase, braced, `urn:uuid:`, undashed); None for other text.
/// Two spellings of one UUID would otherwise be two records.
pub fn canonical_uuid(id: &str) -> Option<String> {
    uuid::Uuid::parse_str(id)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

pub fn check_id(kind: Kind, id: &str) -> Result<()> {
    if valid_id(kind, id) {
        return Ok(());
    }
    Err(StoreError::Invalid(match kind {
        Kind::Sessions => match canonical_uuid(id) {
            Some(c) => format!(
                "{id:?} is not how a session id is written: name it {c:?} (a lowercase hyphenated UUID)"
            ),
            None => format!("{id:?} is not a session id: sessions are named by UUID"),
        },
        Kind::Agents | Kind::Delegations => {
            format!("a directory store has no {} collection", kind.dir_name())
        }
        _ => format!(
            "{id:?} is not a valid {} id: 1-128 characters of [A-Za-z0-9_-]",
            kind.singular()
        ),
    }))
}

/// Parses and validates the bytes written for record `id`; returns the record to store,
/// with `id` filled in where the collection carries one and it was absent.
pub fn parse_record(
    kind: Kind,
    id: &str,
    bytes: &[u8],
    max_len: u64,
) -> Result<Map<String, Value>> {
    parse_record_filled(kind, id, bytes, max_len).map(|(obj, _)| obj)
}

/// As [`parse_record`], also saying whether `id` was filled in (the bytes written are then
/// not the record's bytes as stored).
pub fn parse_record_filled(
    kind: Kind,
    id: &str,
    bytes: &[u8],
    max_len: u64,
) -> Result<(Map<String, Value>, bool)> {
    check_id(kind, id)?;
    if bytes.len() as u64 > max_len {
        return Err(StoreError::TooBig(format!(
            "{} {id}: {} bytes is over the record size limit of {max_len} bytes",
            kind.singular(),
            bytes.len()
        )));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StoreError::Invalid(format!(
            "{} {id}: empty record (write a JSON object)",
            kind.singular()
        )));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Invalid(format!("{} {id}: invalid JSON: {e}", kind.singular())))?;
    let Value::Object(mut obj) = value else {
        return Err(StoreError::Invalid(format!(
            "{} {id}: a record must be a JSON object, not {}",
            kind.singular(),
            type_name(&value)
        )));
    };
    let filled = obj.get("id").is_none() && kind != Kind::Conversations;
    match obj.get("id") {
        None if kind != Kind::Conversations => {
            // Put the id first, as the platform writes it.
            let mut with_id = Map::new();
            with_id.insert("id".into(), Value::String(id.into()));
            with_id.extend(obj);
            obj = with_id;
        }
        None => {}
        Some(Value::String(s)) if s == id => {}
        Some(other) => {
            return Err(StoreError::Invalid(format!(
                "{} {id}: field \"id\" is {other} but the file name says {id:?}",
                kind.singular()
            )));
        }
    }
    let mut v = Validator {
        what: format!("{} {id}", kind.singular()),
    };
    match kind {
        Kind::Sessions => v.session(&obj)?,
        Kind::Goals => v.goal(&obj)?,
        Kind::Conversations => v.conversation(&obj)?,
        Kind::Agents | Kind::Delegations => {
            return Err(StoreError::Invalid(format!(
                "a directory store has no {} collection",
                kind.dir_name()
            )));
        }
    }
    Ok((obj, filled))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Need {
    Required,
    Optional,
    Nullable,
}

struct Validator {
    what: String,
}

impl Validator {
    fn fail<T>(&self, field: &str, msg: impl std::fmt::Display) -> Result<T> {
        Err(StoreError::Invalid(format!(
            "{}: field {field:?} {msg}",
            self.what
        )))
    }

    /// Returns the field's value when present and not (allowed) null.
    fn get<'a>(
        &self,
        obj: &'a Map<String, Value>,
        field: &str,
        need: Need,
    ) -> Result<Option<&'a Value>> {
        match obj.get(field) {
            None if need == Need::Required => self.fail(field, "is missing"),
            None => Ok(None),
            Some(Value::Null) if need == Need::Nullable => Ok(None),
            Some(Value::Null) => self.fail(field, "must not be null"),
            Some(v) => Ok(Some(v)),
        }
    }

    fn string<'a>(
        &self,
        obj: &'a Map<String, Value>,
        field: &str,
        need: Need,
    ) -> Result<Option<&'a str>> {
        match self.get(obj, field, need)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => self.fail(
                field,
                format_args!("must be a string, not {}", type_name(v)),
            ),
        }
    }

    fn one_of(
        &self,
        obj: &Map<String, Value>,
        field: &str,
        need: Need,
        allowed: &[&str],
    ) -> Result<Option<String>> {
        match self.string(obj, field, need)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s) => Ok(Some(s.to_string())),
            Some(s) => self.fail(
                field,
                format_args!("is {s:?}; expected one of {}", allowed.join("|")),
            ),
        }
    }

    fn time(&self, obj: &Map<String, Value>, field: &str, need: Need) -> Result<()> {
        if let Some(s) = self.string(obj, field, need)?
            && chrono::DateTime::parse_from_rfc3339(s).is_err()
        {
            return self.fail(field, format_args!("is {s:?}, not an RFC 3339 time"));
        }
        Ok(())
    }

    fn boolean(&self, obj: &Map<String, Value>, field: &str, need: Need) -> Result<()> {
        match self.get(obj, field, need)? {
            None | Some(Value::Bool(_)) => Ok(()),
            Some(v) => self.fail(
                field,
                format_args!("must be a boolean, not {}", type_name(v)),
            ),
        }
    }

    fn integer(
        &self,
        obj: &Map<String, Value>,
        field: &str,
        need: Need,
        range: (i64, i64),
    ) -> Result<()> {
        match self.get(obj, field, need)? {
            None => Ok(()),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) if i >= range.0 && i <= range.1 => Ok(()),
                _ => self.fail(
                    field,
                    format_args!(
                        "is {n}; expected a whole number from {} to {}",
                        range.0, range.1
                    ),
                ),
            },
            Some(v) => self.fail(
                field,
                format_args!("must be a number, not {}", type_name(v)),
            ),
        }
    }

    fn array<'a>(
        &self,
        obj: &'a Map<String, Value>,
        field: &str,
        need: Need,
    ) -> Result<&'a [Value]> {
        match self.get(obj, field, need)? {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(v) => self.fail(
                field,
                format_args!("must be an array, not {}", type_name(v)),
            ),
        }
    }

    fn object<'a>(
        &self,
        obj: &'a Map<String, Value>,
        field: &str,
        need: Need,
    ) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(obj, field, need)? {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => self.fail(
                field,
                format_args!("must be an object, not {}", type_name(v)),
            ),
        }
    }

    /// Runs `check` on each element of array `field`, each as an object.
    fn each_object(
        &mut self,
        obj: &Map<String, Value>,
        field: &str,
        mut check: impl FnMut(&mut Self, &Map<String, Value>) -> Result<()>,
    ) -> Result<()> {
        let outer = self.what.clone();
        for (i, item) in self.array(obj, field, Need::Optional)?.iter().enumerate() {
            let Value::Object(o) = item else {
                return self.fail(
                    field,
                    format_args!("[{i}] must be an object, not {}", type_name(item)),
                );
            };
            self.what = format!("{outer}: {field}[{i}]");
            let r = check(self, o);
            self.what = outer.clone();
            r?;
        }
        Ok(())
    }

    fn session(&mut self, o: &Map<String, Value>) -> Result<()> {
        use Need::*;
        for f in ["tmux_name", "cwd", "task"] {
            self.string(o, f, Required)?;
        }
        self.one_of(o, "state", Required, SESSION_STATES)?;
        self.time(o, "created_at", Required)?;
        self.time(o, "last_activity_at", Nullable)?;
        self.time(o, "terminal_at", Nullable)?;
        for f in [
            "workspace_path",
            "repo_url",
            "branch",
            "pending_decision",
            "proposed_default",
            "pane_id",
            "claude_session_id",
            "scrollback_path",
            "last_cwd",
        ] {
            self.string(o, f, Nullable)?;
        }
        for f in ["ephemeral", "workspace_owned"] {
            self.boolean(o, f, Optional)?;
        }
        self.one_of(o, "runtime", Nullable, RUNTIMES)?;
        if let Some(c) = self.object(o, "correlation", Nullable)? {
            let inner = format!("{}: correlation", self.what);
            let outer = std::mem::replace(&mut self.what, inner);
            let r = (|| {
                self.string(c, "worktree", Nullable)?;
                self.string(c, "branch", Nullable)?;
                self.integer(c, "pr_id", Nullable, (0, i64::MAX))?;
                self.integer(c, "issue_id", Nullable, (0, i64::MAX))
            })();
            self.what = outer;
            r?;
        }
        Ok(())
    }

    fn goal(&mut self, o: &Map<String, Value>) -> Result<()> {
        use Need::*;
        self.string(o, "description", Required)?;
        let status = self.one_of(o, "status", Required, GOAL_STATUSES)?;
        for (i, a) in self.array(o, "acceptance", Optional)?.iter().enumerate() {
            if !a.is_string() {
                return self.fail(
                    "acceptance",
                    format_args!("[{i}] must be a string, not {}", type_name(a)),
                );
            }
        }
        let mut unverified = Vec::new();
        self.each_object(o, "sessions", |v, s| {
            if let Some(id) = v.string(s, "session_id", Required)?
                && uuid::Uuid::parse_str(id).is_err()
            {
                return v.fail("session_id", format_args!("is {id:?}, not a UUID"));
            }
            v.string(s, "task", Optional)?;
            let state = v.one_of(s, "state", Required, GOAL_SESSION_STATES)?;
            v.string(s, "evidence", Nullable)?;
            if state.as_deref() != Some("verified") {
                unverified.push(
                    s.get("session_id")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                );
            }
            Ok(())
        })?;
        self.integer(o, "progress", Optional, (0, 100))?;
        self.time(o, "created", Optional)?;
        self.time(o, "updated", Optional)?;
        match o.get("notes") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            Some(_) => return self.fail("notes", "must be a string or an array of strings"),
        }
        if status.as_deref() == Some("done") && !unverified.is_empty() {
            return self.fail(
                "status",
                format_args!(
                    "is \"done\" but linked sessions are not verified: {}",
                    unverified.join(", ")
                ),
            );
        }
        Ok(())
    }

    fn conversation(&mut self, o: &Map<String, Value>) -> Result<()> {
        use Need::*;
        self.string(o, "compressed_context", Nullable)?;
        self.each_object(o, "recent_rounds", |v, r| {
            v.string(r, "user", Optional)?;
            v.string(r, "assistant", Optional)?;
            v.time(r, "ts", Optional)?;
            v.each_object(r, "tool_calls", |v, t| {
                v.string(t, "name", Required)?;
                v.string(t, "summary", Nullable)?;
                Ok(())
            })
        })?;
        self.integer(o, "total_rounds", Optional, (0, i64::MAX))?;
        self.integer(o, "token_estimate", Optional, (0, i64::MAX))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_has_one_spelling_and_the_refusal_names_it() {
        let id = "6f1c2a9e-4b7d-4e21-9a55-0c3d8e7f1a22";
        assert!(check_id(Kind::Sessions, id).is_ok());
        for other in [
            id.to_ascii_uppercase(),
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.replace('-', ""),
        ] {
            let e = check_id(Kind::Sessions, &other).unwrap_err();
            assert!(e.to_string().contains(&format!("name it {id:?}")), "{e}");
        }
        let e = check_id(Kind::Sessions, "not-a-uuid").unwrap_err();
        assert!(e.to_string().contains("named by UUID"), "{e}");
    }
}
