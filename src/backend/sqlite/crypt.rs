//! arbiter's field encryption (arbiter-storage 0.5 `FieldEncryptor`): AES-256-GCM with a
//! fresh random 12-byte nonce per value, stored as `base64(nonce ‖ ciphertext+tag)`; the
//! key is `ARBITER_STORAGE_ENCRYPTION_KEY`, 64 hex characters.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::error::{Result, StoreError};

/// The variable arbiter reads its key from.
pub const KEY_VAR: &str = "ARBITER_STORAGE_ENCRYPTION_KEY";

#[derive(Clone)]
pub struct Crypt {
    cipher: Aes256Gcm,
}

impl Crypt {
    /// From the environment, as arbiter does: absent or blank = no encryption; present
    /// but not 64 hex characters = an error (never a silent plaintext fallback).
    pub fn from_env() -> Result<Option<Crypt>> {
        match std::env::var(KEY_VAR) {
            Ok(v) if !v.trim().is_empty() => Crypt::from_hex(&v).map(Some),
            _ => Ok(None),
        }
    }

    pub fn from_hex(hex: &str) -> Result<Crypt> {
        let hex = hex.trim();
        let bad = || {
            StoreError::Invalid(format!(
                "{KEY_VAR} must be 64 hex characters (a 32-byte key); it has {} characters",
                hex.len()
            ))
        };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Crypt {
            cipher: Aes256Gcm::new(&key.into()),
        })
    }

    pub fn encrypt(&self, plaintext: &str) -> Result<String> {
        let mut nonce = [0u8; 12];
        fill_random(&mut nonce)?;
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .map_err(|e| StoreError::Invalid(format!("encryption failed: {e}")))?;
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(BASE64.encode(out))
    }

    pub fn decrypt(&self, encoded: &str) -> std::result::Result<String, String> {
        let raw = BASE64
            .decode(encoded)
            .map_err(|e| format!("not base64 ciphertext: {e}"))?;
        if raw.len() < 13 {
            return Err("ciphertext too short".into());
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| {
                "decryption failed (wrong key, or not arbiter's ciphertext)".to_string()
            })?;
        String::from_utf8(pt).map_err(|e| format!("decrypted bytes are not UTF-8: {e}"))
    }
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(StoreError::io("getrandom for a nonce", e));
        }
        got += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fresh_nonces() {
        let c = Crypt::from_hex(&"ab".repeat(32)).unwrap();
        let a = c.encrypt("secret intent").unwrap();
        let b = c.encrypt("secret intent").unwrap();
        assert_ne!(a, b);
        assert!(!a.contains("secret"));
        assert_eq!(c.decrypt(&a).unwrap(), "secret intent");
        assert!(Crypt::from_hex("abc").is_err());
        assert!(Crypt::from_hex(&"zz".repeat(32)).is_err());
    }
}
