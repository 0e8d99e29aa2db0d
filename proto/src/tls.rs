//! Mutual TLS between agent and server.
//!
//! Both sides load three PEM files: the CA that signs every podiam certificate, their own
//! certificate and their own key. The server accepts only clients presenting a certificate
//! signed by that CA (tonic requires the client certificate once a client CA root is set);
//! the agent trusts only that CA and checks that the server's certificate names the host it
//! dialled (or the name given with `--server-name`).
//!
//! The whole workspace compiles exactly one rustls crypto provider, aws-lc-rs;
//! [`install_crypto_provider`] makes it the process default and must run first in every
//! binary and test that uses TLS.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The three PEM files one side of the mutual TLS needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate that signs both sides' certificates.
    pub ca: PathBuf,
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This side's private key, PEM.
    pub key: PathBuf,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} from {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} at {path} holds no PEM block")]
    NotPem { what: &'static str, path: PathBuf },
}

/// The PEM contents of [`TlsFiles`], read once.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_bytes", &self.ca.len())
            .field("cert_bytes", &self.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Reads all three files, failing with the first one that is missing or not PEM.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial {
            ca: read_pem("CA certificate", &self.ca)?,
            cert: read_pem("certificate", &self.cert)?,
            key: read_pem("private key", &self.key)?,
        })
    }
}

impl TlsMaterial {
    /// Builds material from PEM bytes already in memory (tests, generated bundles).
    pub fn from_pem(
        ca: impl Into<Vec<u8>>,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        TlsMaterial {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// The server's side: present our certificate, demand a client certificate from the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// The agent's side: trust only the CA, present our certificate, and expect the server's
    /// certificate to name `server_name`.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(server_name)
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent; safe to call from
/// every test.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
