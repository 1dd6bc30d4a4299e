//! TLS: aiq has one stack, rustls with the aws-lc-rs crypto provider, for Redis, PostgreSQL and
//! the providers' HTTPS alike. This module installs that provider for the process. Reading and
//! checking the settings' PEM files and telling a TLS refusal from a network failure live with
//! the Redis connections in the queue crate (`aiq_queue::tls`), re-exported here; `store` uses
//! them for PostgreSQL.

pub use aiq_queue::tls::{PemFile, Server, TlsFailure, TlsFailureKind};

/// Installs aws-lc-rs as the process's rustls crypto provider, for the libraries that ask rustls
/// for the process default (redis-rs does). Called once at start, before any connection; a later
/// call changes nothing.
pub fn install_crypto_provider() {
    // An error only says that a provider is installed already: ours, from an earlier call.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as StdError;
    use std::io;

    #[test]
    fn a_rustls_error_inside_an_sqlx_error_is_found_and_a_pool_timeout_is_not() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let sqlx = sqlx::Error::Io(io::Error::new(io::ErrorKind::InvalidData, unknown_ca));
        let found = TlsFailure::find(Server::Postgres, "h:1", &sqlx)
            .unwrap_or_else(|| panic!("no TLS failure found in {sqlx:?}"));
        assert_eq!(found.kind, TlsFailureKind::ServerCertificate);
        let timeout: &(dyn StdError + 'static) = &sqlx::Error::PoolTimedOut;
        assert!(TlsFailure::find(Server::Postgres, "h:1", timeout).is_none());
    }
}
