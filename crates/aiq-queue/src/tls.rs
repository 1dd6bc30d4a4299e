//! TLS, the part the queue's Redis connections need and the daemon shares: aiq has one stack,
//! rustls with the aws-lc-rs crypto provider (aiq's `tls` installs it for the process). This
//! module reads and checks the PEM files the settings name, and tells a TLS refusal (a
//! certificate that did not verify, a server that refused ours, a port that does not speak TLS)
//! from a network failure, for Redis and PostgreSQL alike: no retry can fix a refusal, so
//! start-up stops at once with a message that names the server and the setting to check.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::AlertDescription;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that a setting names, read and checked when the settings load, so a missing or
/// malformed file stops start-up naming its setting. Only its path ever prints: it may hold a
/// private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    path: PathBuf,
    pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PemFile").field(&self.path).finish()
    }
}

impl PemFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes as read at load.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    fn read(path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    /// Reads `path`, which must hold one or more PEM certificates (a CA bundle, or a client
    /// certificate and its chain) and nothing else that claims to be PEM.
    pub fn certificates(path: &Path) -> Result<Self, String> {
        let pem = Self::read(path)?;
        let mut store = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
            store.add(cert).map_err(|e| {
                format!(
                    "{} holds a certificate that cannot be read: {e}",
                    path.display()
                )
            })?;
        }
        if store.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)",
                path.display()
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            pem,
        })
    }

    /// Reads `path`, which must hold a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn private_key(path: &Path) -> Result<Self, String> {
        let pem = Self::read(path)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            format!(
                "{} holds no PEM private key (a -----BEGIN PRIVATE KEY----- block): {e}",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
            pem,
        })
    }

    /// Checks that `key` is the private key of the first certificate in `cert`.
    pub fn check_key_pair(cert: &PemFile, key: &PemFile) -> Result<(), String> {
        let chain = CertificateDer::pem_slice_iter(&cert.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| e.to_string())?;
        rustls::sign::CertifiedKey::from_der(
            chain,
            der,
            &rustls::crypto::aws_lc_rs::default_provider(),
        )
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{} is not the key of the certificate in {}: {e}",
                key.path.display(),
                cert.path.display()
            )
        })
    }
}

/// The server a connection was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Redis,
    Postgres,
}

/// What TLS refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailureKind {
    /// The server's certificate did not verify: no trusted CA signed it, it names another host,
    /// it expired, or the server sent none.
    ServerCertificate,
    /// The server refused this client's certificate, or wanted one and got none.
    ClientCertificate,
    /// Anything else of TLS: the port does not speak TLS, the server refused TLS, no protocol
    /// version or cipher in common.
    Handshake,
}

/// TLS refused a connection. No retry can change that, so start-up stops at once with this
/// message, which says what failed, for which server, and which setting to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    pub server: Server,
    /// `host:port` (never the URL, which may hold a password).
    pub addr: String,
    pub kind: TlsFailureKind,
    /// What the TLS library said.
    pub reason: String,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Server::*;
        use TlsFailureKind::*;
        let what = match self.kind {
            ServerCertificate => "TLS verification failed: the server's certificate is not trusted",
            ClientCertificate => {
                "TLS verification failed: the server refused this client's certificate"
            }
            Handshake => "TLS handshake failed",
        };
        let server = match self.server {
            Redis => "Redis",
            Postgres => "PostgreSQL",
        };
        let check = match (self.server, self.kind) {
            (Redis, ServerCertificate) => {
                "AIQ_REDIS_CA_FILE (the CA that signed the server's certificate; without it, the system's roots) and the host name in AIQ_REDIS_URL"
            }
            (Redis, ClientCertificate) => {
                "AIQ_REDIS_CLIENT_CERT_FILE and AIQ_REDIS_CLIENT_KEY_FILE (a certificate the server's CA signed)"
            }
            (Redis, Handshake) => "that AIQ_REDIS_URL names the server's TLS port",
            (Postgres, ServerCertificate) => {
                "sslrootcert in AIQ_DATABASE_URL or AIQ_DATABASE_CA_FILE (the CA that signed the server's certificate) and the host name in AIQ_DATABASE_URL"
            }
            (Postgres, ClientCertificate) => "sslcert and sslkey in AIQ_DATABASE_URL",
            (Postgres, Handshake) => "sslmode in AIQ_DATABASE_URL and that the server has ssl=on",
        };
        write!(
            f,
            "{what} ({server} at {}: {}); check {check}",
            self.addr, self.reason
        )
    }
}

impl StdError for TlsFailure {}

impl TlsFailure {
    /// The TLS refusal inside `err`, if it holds one: a rustls error anywhere in its chain,
    /// including inside the `io::Error` that the TLS streams wrap it in.
    pub fn find(server: Server, addr: &str, err: &(dyn StdError + 'static)) -> Option<Self> {
        let e = find_rustls(err)?;
        Some(Self {
            server,
            addr: addr.to_owned(),
            kind: classify(e),
            reason: e.to_string(),
        })
    }

    /// A refusal the library reports only in words (PostgreSQL answering that it does not
    /// speak TLS, for one).
    pub fn handshake(server: Server, addr: &str, reason: impl fmt::Display) -> Self {
        Self {
            server,
            addr: addr.to_owned(),
            kind: TlsFailureKind::Handshake,
            reason: reason.to_string(),
        }
    }
}

/// What a rustls error means for the settings.
fn classify(e: &rustls::Error) -> TlsFailureKind {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType => TlsFailureKind::ServerCertificate,
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::NoCertificate
            | AlertDescription::AccessDenied,
        ) => TlsFailureKind::ClientCertificate,
        _ => TlsFailureKind::Handshake,
    }
}

/// The rustls error in `err`'s chain. The TLS streams return it inside an `io::Error`, whose
/// `source` skips it, and redis-rs keeps its cause behind an `Arc`, so each link is opened by
/// hand.
fn find_rustls<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref)
            && let Some(r) = find_rustls(inner)
        {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<Arc<dyn StdError + Send + Sync>>()
            && let Some(r) = find_rustls(&**inner)
        {
            return Some(r);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_rustls_error_is_found_inside_io_and_redis_errors_and_classified() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsFailureKind::ServerCertificate,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsFailureKind::ServerCertificate,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                TlsFailureKind::ClientCertificate,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                TlsFailureKind::ClientCertificate,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::ProtocolVersion),
                TlsFailureKind::Handshake,
            ),
        ];
        for (e, kind) in cases {
            let redis = redis::RedisError::from(wrapped(e.clone()));
            let io = wrapped(e.clone());
            let errs: [&(dyn StdError + 'static); 2] = [&redis, &io];
            for err in errs {
                let found = TlsFailure::find(Server::Redis, "h:1", err)
                    .unwrap_or_else(|| panic!("no TLS failure found in {err:?}"));
                assert_eq!(found.kind, kind, "{e:?} in {err:?}");
            }
        }
    }

    #[test]
    fn network_failures_are_not_tls_failures() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let redis = redis::RedisError::from(io::Error::new(io::ErrorKind::ConnectionReset, "x"));
        let errs: [&(dyn StdError + 'static); 2] = [&refused, &redis];
        for err in errs {
            assert!(
                TlsFailure::find(Server::Postgres, "h:1", err).is_none(),
                "{err:?}"
            );
        }
    }

    #[test]
    fn the_message_names_the_failure_the_server_and_the_setting() {
        let f = TlsFailure {
            server: Server::Redis,
            addr: "127.0.0.1:6380".into(),
            kind: TlsFailureKind::ServerCertificate,
            reason: "invalid peer certificate: UnknownIssuer".into(),
        };
        let m = f.to_string();
        assert!(m.contains("TLS verification failed"), "{m}");
        assert!(m.contains("Redis at 127.0.0.1:6380"), "{m}");
        assert!(m.contains("AIQ_REDIS_CA_FILE"), "{m}");
        let f = TlsFailure {
            server: Server::Postgres,
            kind: TlsFailureKind::ClientCertificate,
            ..f
        };
        assert!(f.to_string().contains("sslcert and sslkey"));
    }

    #[test]
    fn pem_files_that_are_missing_or_not_pem_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(
            PemFile::certificates(&missing)
                .unwrap_err()
                .contains("cannot read")
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        assert!(
            PemFile::certificates(&junk)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            PemFile::private_key(&junk)
                .unwrap_err()
                .contains("no PEM private key")
        );
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(PemFile::certificates(&bad).is_err());
    }
}
