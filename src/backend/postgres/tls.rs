//! `sslmode` as libpq means it, over rustls (pure Rust, on the `ring` already used for
//! hashing): rust-postgres itself knows only disable/prefer/require and no root
//! certificates, so agentmount reads `sslmode` and `sslrootcert` from the URL itself.
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | – |
//! | `allow`, `prefer` (libpq's default) | if the server offers TLS | no |
//! | `require` | yes, or the connection fails | only if a root certificate exists (then as `verify-ca`) |
//! | `verify-ca` | yes | chain to `sslrootcert` (default `~/.postgresql/root.crt`) |
//! | `verify-full` | yes | chain, and the host name in the URL |
//!
//! Over a Unix socket there is no TLS (as in libpq, `sslmode` does not apply).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Result, StoreError};

/// libpq's sslmode values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What the URL asked of TLS, taken out of it (rust-postgres refuses what it does not know).
pub struct Asked {
    pub mode: SslMode,
    pub rootcert: Option<PathBuf>,
    /// The URL without `sslmode` and `sslrootcert`.
    pub rest: String,
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query (`PGSSLMODE`/`PGSSLROOTCERT`
/// when absent, as libpq).
pub fn take(url: &str) -> Result<Asked> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut mode = std::env::var("PGSSLMODE").ok();
    let mut rootcert = std::env::var("PGSSLROOTCERT").ok();
    let mut kept = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "sslmode" => mode = Some(percent_decode(v)),
            "sslrootcert" => rootcert = Some(percent_decode(v)),
            _ => kept.push(kv),
        }
    }
    let mode = match mode.as_deref().unwrap_or("prefer") {
        "disable" => SslMode::Disable,
        "allow" | "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(StoreError::Invalid(format!(
                "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Asked {
        mode,
        rootcert: rootcert.filter(|r| !r.is_empty()).map(PathBuf::from),
        rest,
    })
}

/// The root certificates file libpq would read: `sslrootcert`, else
/// `~/.postgresql/root.crt` when it exists.
fn root_file(asked: &Asked) -> Option<PathBuf> {
    if let Some(p) = &asked.rootcert {
        return Some(p.clone());
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".postgresql/root.crt");
    p.exists().then_some(p)
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| StoreError::Invalid(format!("sslrootcert {}: {e}", path.display())))?;
    for c in certs {
        let c =
            c.map_err(|e| StoreError::Invalid(format!("sslrootcert {}: {e}", path.display())))?;
        roots
            .add(c)
            .map_err(|e| StoreError::Invalid(format!("sslrootcert {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invalid(format!(
            "sslrootcert {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// How the server's certificate is checked. The handshake's signatures are always
/// verified; `chain`: the certificate must chain to these roots (libpq's `verify-ca`), and
/// with `name` also name the host (`verify-full`); without `chain` it is not checked at
/// all (libpq's `prefer`/`require` without a root certificate: encrypted, not
/// authenticated).
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The connector for what was asked, and the mode rust-postgres is to use.
pub fn connector(asked: &Asked) -> Result<(MakeRustlsConnect, postgres::config::SslMode, String)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Invalid(format!("TLS: {e}")))?;
    let root = root_file(asked);
    let chain = match (asked.mode, &root) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => None,
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(StoreError::Invalid(format!(
                "sslmode={} needs the root certificate to check the server against: give sslrootcert=FILE (or put it in ~/.postgresql/root.crt)",
                asked.mode.name()
            )));
        }
        (_, Some(path)) => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(path)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| StoreError::Invalid(format!("TLS: {e}")))?,
        ),
    };
    let verifier = Arc::new(Verifier {
        provider: provider.clone(),
        chain,
        name: asked.mode == SslMode::VerifyFull,
    });
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let pg_mode = match asked.mode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        SslMode::Prefer => postgres::config::SslMode::Prefer,
        _ => postgres::config::SslMode::Require,
    };
    let shown = match (asked.mode, &root) {
        (SslMode::Disable, _) => "disable".to_string(),
        (SslMode::Prefer, _) => {
            "prefer (encrypted when the server offers TLS; certificate not checked)".into()
        }
        (SslMode::Require, None) => {
            "require (encrypted; certificate not checked: no root certificate)".into()
        }
        (m, Some(p)) => format!("{} (against {})", m.name(), p.display()),
        (m, None) => m.name().to_string(),
    };
    Ok((MakeRustlsConnect::new(config), pg_mode, shown))
}
