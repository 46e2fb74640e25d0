//! `.errors`: the last refusals as JSON lines (time, path, operation, errno, reason).

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde_json::json;

use crate::error::{REASON_MAX, bounded, errno_name};

pub const KEEP: usize = 100;

pub struct ErrorLog {
    lines: Mutex<VecDeque<String>>,
    changed: Mutex<std::time::SystemTime>,
    /// Every refusal recorded since the mount started (`.status` `counts.refusals`), not
    /// only the ones still kept.
    total: std::sync::atomic::AtomicU64,
}

impl Default for ErrorLog {
    fn default() -> Self {
        ErrorLog {
            lines: Mutex::default(),
            changed: Mutex::new(std::time::SystemTime::now()),
            total: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl ErrorLog {
    pub fn push(&self, path: &str, op: &str, errno: i32, reason: &str) {
        let reason = &*bounded(reason, REASON_MAX);
        let path = &*bounded(path, REASON_MAX);
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(path, op, errno = errno_name(errno), reason, "refused");
        let line = json!({
            "time": chrono::Utc::now().to_rfc3339(),
            "path": path,
            "op": op,
            "errno": errno_name(errno),
            "reason": reason,
        })
        .to_string();
        let mut l = self.lines.lock();
        if l.len() == KEEP {
            l.pop_front();
        }
        l.push_back(line);
        *self.changed.lock() = std::time::SystemTime::now();
    }

    /// When the last refusal was recorded (or the mount started): `.errors`' mtime.
    pub fn changed(&self) -> std::time::SystemTime {
        *self.changed.lock()
    }

    pub fn render(&self) -> Vec<u8> {
        let l = self.lines.lock();
        let mut out = Vec::new();
        for line in l.iter() {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// How many refusals were recorded since the mount started.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}
