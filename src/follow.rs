//! `agentmount watch MNT`: follows a mount's change feed (`.changes`) and prints each
//! change as it happens, one line each (`--json`: the feed's own lines).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::error::escape_text;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// What to print.
pub struct Filter {
    pub collection: Option<String>,
    pub id: Option<String>,
    /// Print changes from this sequence number on (the feed's newest lines first, then
    /// what follows); without it, only changes from now on.
    pub since: Option<u64>,
    pub json: bool,
}

impl Filter {
    fn wants(&self, v: &Value) -> bool {
        let seq = v["seq"].as_u64().unwrap_or(0);
        self.since.is_none_or(|s| seq >= s)
            && self
                .collection
                .as_deref()
                .is_none_or(|c| v["collection"].as_str() == Some(c))
            && self
                .id
                .as_deref()
                .is_none_or(|id| v["id"].as_str() == Some(id) || v["to"].as_str() == Some(id))
    }
}

/// One change as a line: time, collection/id, op (-> to), who. Every value is escaped
/// (backslash, newline and other control characters): a label or id another program chose
/// can neither forge a line nor drive the terminal.
pub fn describe(v: &Value) -> String {
    let s = |k: &str| escape_text(v[k].as_str().unwrap_or("")).into_owned();
    let mut out = format!("{} {}/{} {}", s("time"), s("collection"), s("id"), s("op"));
    if let Some(to) = v["to"].as_str() {
        out.push_str(&format!(" -> {}", escape_text(to)));
    }
    if let Some(l) = v.get("label").filter(|l| !l.is_null()) {
        out.push_str(&format!(" label={}", escape_text(l.as_str().unwrap_or(""))));
    }
    out.push_str(&format!(" by {}", s("source")));
    if let (Some(pid), Some(uid)) = (v["pid"].as_u64(), v["uid"].as_u64()) {
        out.push_str(&format!(" pid={pid} uid={uid}"));
    }
    out
}

pub fn run(mountpoint: &Path, filter: Filter) -> ExitCode {
    let path = mountpoint.join(".changes");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "agentmount: cannot read {}: {e} (an agentmount mount with its journal on?)",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut file = file;
    let mut offset = 0u64;
    let mut last_seq = 0u64;
    let mut first = true;
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    while !STOP.load(Ordering::SeqCst) {
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                eprintln!("agentmount: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        };
        if len < offset {
            // The feed was rotated (its oldest lines dropped): read it again, skipping
            // what was printed.
            match File::open(&path) {
                Ok(f) => file = f,
                Err(e) => {
                    eprintln!("agentmount: {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            offset = 0;
            pending.clear();
        }
        if len > offset {
            let mut buf = vec![0u8; (len - offset) as usize];
            let n = match file.read_at(&mut buf, offset) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("agentmount: read {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            };
            offset += n as u64;
            pending.extend_from_slice(&buf[..n]);
            let mut out = stdout.lock();
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let seq = v["seq"].as_u64().unwrap_or(0);
                if seq <= last_seq && last_seq > 0 {
                    continue;
                }
                last_seq = seq;
                // Without --since, what was there at start is history, not news.
                if first && filter.since.is_none() {
                    continue;
                }
                if filter.wants(&v) {
                    let text = if filter.json {
                        String::from_utf8_lossy(line.trim_ascii_end()).into_owned()
                    } else {
                        describe(&v)
                    };
                    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                        // stdout closed (a pipe into head): done.
                        return ExitCode::SUCCESS;
                    }
                }
            }
        }
        first = false;
        std::thread::sleep(Duration::from_millis(10));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_or_id_with_a_newline_cannot_forge_a_line() {
        let v = serde_json::json!({
            "seq": 7, "time": "2026-01-01T00:00:00Z", "collection": "attachments",
            "id": "ab\\cd", "op": "update", "source": "mount", "pid": 1, "uid": 0,
            "label": "x.png\n2026-01-01T00:00:01Z sessions/evil delete by gc\u{1b}[2J",
        });
        let line = describe(&v);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains("ab\\\\cd"), "{line}");
        assert!(
            line.contains(
                "label=x.png\\n2026-01-01T00:00:01Z sessions/evil delete by gc\\u{1b}[2J by mount"
            ),
            "{line}"
        );
    }
}
