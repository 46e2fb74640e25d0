//! One error type for the store layer. Every variant knows its errno, so the FUSE
//! adapter never invents one, and the message is the reason shown in `.errors` and the log.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bad input: invalid JSON, wrong type, unknown enum value, id mismatch, bad name.
    #[error("{0}")]
    Invalid(String),
    /// A record over the size limit.
    #[error("{0}")]
    TooBig(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// A garbage collection is already running.
    #[error("{0}")]
    Busy(String),
    /// The writer lock was not taken in time, or other writers kept winning the race.
    #[error("{0}")]
    Again(String),
    /// A store file does not parse: the last good view is served, writes are refused.
    #[error("{0}")]
    Corrupt(String),
    /// The operation is never allowed on this object (attachment bytes, mkdir, links).
    #[error("{0}")]
    NotPermitted(String),
    #[error("{0}")]
    ReadOnly(String),
    /// An entry of the store that is not what the store may hold there (a symlink, a FIFO,
    /// a device, a file over the read bound): never followed or opened, reported instead.
    #[error("{0}")]
    Untrusted(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Invalid(_) => libc::EINVAL,
            StoreError::TooBig(_) => libc::EFBIG,
            StoreError::NotFound(_) => libc::ENOENT,
            StoreError::Exists(_) => libc::EEXIST,
            StoreError::Busy(_) => libc::EBUSY,
            StoreError::Again(_) => libc::EAGAIN,
            StoreError::Corrupt(_) => libc::EIO,
            StoreError::NotPermitted(_) => libc::EPERM,
            StoreError::ReadOnly(_) => libc::EROFS,
            StoreError::Untrusted(_) => libc::EIO,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long a reason `.errors` and the log keep: a refused record's reason can quote the
/// value it refused (serde's "invalid type: string \"…\""), and five refused 15 MB goals
/// once filled a disk with their reasons.
pub const REASON_MAX: usize = 4096;

/// `s` cut to at most `max` bytes (on a char boundary), saying how much was cut.
pub fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let keep = s.floor_char_boundary(max);
    std::borrow::Cow::Owned(format!(
        "{}… [cut {} bytes]",
        &s[..keep],
        thousands(s.len() - keep)
    ))
}

/// `s` for a line of text output: backslash and control characters (newline, tab, escape,
/// C1, U+2028/U+2029) written as escapes (`\\`, `\n`, `\t`, `\u{1b}`), so a value can
/// neither forge a line nor move the terminal's cursor.
pub fn escape_text(s: &str) -> std::borrow::Cow<'_, str> {
    let special = |c: char| c == '\\' || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !s.chars().any(special) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if special(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A name that may not be UTF-8 (a file name from the kernel), as text: its UTF-8 runs
/// through [`escape_text`], every other byte as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&escape_text(chunk.valid()));
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// `n` with commas between groups of three digits: 15,728,512.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The symbolic name of an errno, as `.errors` shows it.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        libc::EIO => "EIO",
        libc::EPERM => "EPERM",
        libc::EROFS => "EROFS",
        libc::EXDEV => "EXDEV",
        libc::ENOSPC => "ENOSPC",
        libc::EACCES => "EACCES",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EBADF => "EBADF",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        _ => "EOTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reasons_pass_long_ones_are_cut_on_a_char_boundary_saying_how_much() {
        assert_eq!(bounded("short", 10), "short");
        let long = format!("a{}", "é".repeat(10_000)); // 20,001 bytes
        let cut = bounded(&long, 4096);
        assert!(cut.len() < 4096 + 40, "{}", cut.len());
        // 4096 falls inside an "é" (odd offsets start one): 4095 bytes kept.
        assert!(cut.ends_with("… [cut 15,906 bytes]"), "{}", &cut[4000..]);
        assert_eq!(thousands(15_728_512), "15,728,512");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(0), "0");
    }

    #[test]
    fn text_output_escapes_backslash_and_control_characters() {
        assert_eq!(escape_text("plain ünï"), "plain ünï");
        assert_eq!(
            escape_text("a\nb\\c\td\u{1b}[2J\u{85}\u{2028}"),
            "a\\nb\\\\c\\td\\u{1b}[2J\\u{85}\\u{2028}"
        );
        assert_eq!(escape_bytes(b"ok\xff\xfe.json"), "ok\\xff\\xfe.json");
        assert_eq!(escape_bytes("é\n".as_bytes()), "é\\n");
    }
}
