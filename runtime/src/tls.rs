//! Mutual TLS between agent and server.
//!
//! Both sides load three PEM files: the CA (or a bundle of CAs, during a CA rotation) that
//! signs every podiam certificate, their own certificate and their own key. The server
//! accepts only clients presenting a certificate signed by one of those CAs; the agent trusts
//! only those CAs and checks that the server's certificate names the host it dialled (or the
//! name given with `--server-name`).
//!
//! - [`TlsFiles::load_checked`] reads and checks the files: PEM that parses, a key that
//!   matches the certificate, a certificate valid now and signed (through any intermediates
//!   in its file) by one of the CAs. A problem is one clear error naming the file and the
//!   dates, never a handshake failure later; a rotation caught half-written (a new CA beside
//!   the old certificate) is refused and the configuration in use kept until it is whole.
//! - [`server_config`] / [`client_config`] build the rustls configurations both daemons
//!   serve and dial with ([`crate::rotate`] keeps them current as the files change on disk).
//! - [`TlsMaterial`] builds tonic's own TLS configurations, for tests and tools acting as an
//!   agent.
//!
//! The whole workspace compiles exactly one rustls crypto provider, aws-lc-rs;
//! [`install_crypto_provider`] makes it the process default and must run first in every
//! binary and test that uses TLS. The configurations here name that provider explicitly, so
//! they never depend on the process default.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The three PEM files one side of the mutual TLS needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign both sides' certificates.
    pub ca: PathBuf,
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This side's private key, PEM.
    pub key: PathBuf,
}

/// Why TLS material could not be loaded or used.
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
    #[error("{what} at {path} does not parse: {reason}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("certificate {path} expired at {not_after} (now {now})")]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("certificate {path} is not valid before {not_before} (now {now}; is the clock right?)")]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("private key {key} does not belong to certificate {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("certificate {cert} is not signed by the CA(s) in {ca}: {reason}")]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// The PEM contents of [`TlsFiles`], read once (for tonic's own TLS, in tests and tools).
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

/// Checked TLS material: parsed, matching, and valid when it was loaded.
pub struct Checked {
    /// The CA certificates trusted for the other side.
    pub cas: Vec<CertificateDer<'static>>,
    /// This side's chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The leaf's validity window, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The leaf's subject and serial, for log lines.
    pub subject: String,
    pub serial: String,
    /// The three files' bytes as read, to notice a change cheaply.
    pub(crate) source: [Vec<u8>; 3],
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("cas", &self.cas.len())
            .field("subject", &self.subject)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Seconds since the Unix epoch at `time`.
pub fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A Unix time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| format!("{unix} (Unix time)"))
}

fn certificates(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let parse = |reason: String| TlsError::Parse {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse(e.to_string()))?;
    if certs.is_empty() {
        return Err(parse("no CERTIFICATE block".into()));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| parse(e.to_string()))?;
    }
    Ok(certs)
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

    /// Reads and checks all three files at `now`: every certificate parses, the key matches
    /// the leaf certificate, the leaf is valid now and chains to one of the CAs.
    pub fn load_checked(&self, now: SystemTime) -> Result<Checked, TlsError> {
        let source = [
            read_pem("CA certificate", &self.ca)?,
            read_pem("certificate", &self.cert)?,
            read_pem("private key", &self.key)?,
        ];
        self.check(source, now)
    }

    pub(crate) fn check(&self, source: [Vec<u8>; 3], now: SystemTime) -> Result<Checked, TlsError> {
        let cas = certificates("CA certificate", &self.ca, &source[0])?;
        let chain = certificates("certificate", &self.cert, &source[1])?;
        let key = PrivateKeyDer::from_pem_slice(&source[2]).map_err(|e| TlsError::Parse {
            what: "private key",
            path: self.key.clone(),
            reason: e.to_string(),
        })?;
        let (_, leaf) =
            x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| TlsError::Parse {
                what: "certificate",
                path: self.cert.clone(),
                reason: e.to_string(),
            })?;
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        let subject = leaf.subject().to_string();
        let serial = leaf.raw_serial_as_string();
        let now = unix_seconds(now);
        if now > not_after {
            return Err(TlsError::Expired {
                path: self.cert.clone(),
                not_after: utc(not_after),
                now: utc(now),
            });
        }
        if now < not_before {
            return Err(TlsError::NotYetValid {
                path: self.cert.clone(),
                not_before: utc(not_before),
                now: utc(now),
            });
        }
        let provider = provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| TlsError::KeyMismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                reason: e.to_string(),
            },
        )?;
        self.chains_to(&cas, &chain, now, provider)?;
        Ok(Checked {
            cas,
            chain,
            key,
            not_before,
            not_after,
            subject,
            serial,
            source,
        })
    }
}

impl TlsFiles {
    /// Checks that the leaf of `chain` is signed by one of `cas`, through the rest of `chain`,
    /// every certificate on the way valid at `now` (Unix seconds), for a server's use or a
    /// client's: the agent's certificate is a client's only, the server's a server's only, and
    /// a certificate with no extended key usage is either. Checked the way the peer will check
    /// it, with the same verifier, so that files that load are files peers accept.
    fn chains_to(
        &self,
        cas: &[CertificateDer<'static>],
        chain: &[CertificateDer<'static>],
        now: i64,
        provider: rustls::crypto::CryptoProvider,
    ) -> Result<(), TlsError> {
        let refused = |error: rustls::Error| TlsError::NotSignedByCa {
            cert: self.cert.clone(),
            ca: self.ca.clone(),
            reason: error.to_string(),
        };
        let roots = Arc::new(roots(cas)?);
        let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now).unwrap_or(0),
        ));
        let (leaf, intermediates) = (&chain[0], &chain[1..]);
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(refused)?;
        let as_server = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            at,
            provider.signature_verification_algorithms.all,
        );
        let Err(server_error) = as_server else {
            return Ok(());
        };
        let client = WebPkiClientVerifier::builder_with_provider(roots, Arc::new(provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        match client.verify_client_cert(leaf, intermediates, at) {
            Ok(_) => Ok(()),
            // A client's certificate fails as a server's for its purpose alone; any other
            // failure is the same either way, and the server's wording is kept.
            Err(client_error) if is_purpose(&server_error) => Err(refused(client_error)),
            Err(_) => Err(refused(server_error)),
        }
    }
}

/// Whether `error` is a certificate's extended key usage not allowing the use asked for.
fn is_purpose(error: &rustls::Error) -> bool {
    use rustls::CertificateError::{InvalidPurpose, InvalidPurposeContext};
    matches!(
        error,
        rustls::Error::InvalidCertificate(InvalidPurpose | InvalidPurposeContext { .. })
    )
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// HTTP/2 is the only protocol either side speaks (gRPC).
const ALPN_H2: &[u8] = b"h2";

/// The server's side: present our certificate, demand a client certificate from the CA(s).
pub fn server_config(checked: &Checked) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(provider());
    // A client certificate is checked when presented, but not demanded: operators' calls
    // (explain, status) authenticate with their Kubernetes token instead. Agent calls
    // without one are refused by the server's service.
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&checked.cas)?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(checked.chain.clone(), checked.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// An HTTPS server's side (the admission webhook the API server calls): present our
/// certificate, ask for none (the API server presents no client certificate by default),
/// speak HTTP/1.1.
pub fn https_server_config(checked: &Checked) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(checked.chain.clone(), checked.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The agent's side: trust only the CA(s), present our certificate. The server's name is
/// checked per connection (see [`crate::connect`]).
pub fn client_config(checked: &Checked) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&checked.cas)?)
        .with_client_auth_cert(checked.chain.clone(), checked.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// An operator tool's side (`kubectl iam`): trust only the CA(s) in the PEM file `ca`,
/// present no certificate. The caller proves who it is inside the calls instead (its
/// Kubernetes token), and checks the server's name per connection as the agent does. Same
/// provider, protocol versions and ALPN as [`client_config`]; a CA file that is missing or
/// does not parse is an error naming it.
pub fn ca_only_client_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let bytes = read_pem("CA certificate", ca)?;
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA certificate", ca, &bytes)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", ca.display())))?;
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
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

    /// tonic's server TLS: present our certificate, demand a client certificate from the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// tonic's client TLS: trust only the CA, present our certificate, and expect the
    /// server's certificate to name `server_name`.
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

/// Certificates on disk for the tests of this crate (TLS loading and rotation).
#[cfg(test)]
pub(crate) mod test_files {
    use super::TlsFiles;

    /// A fresh CA with server and agent certificates, written to a temporary directory.
    pub(crate) fn written() -> (tempfile::TempDir, podiam_certs::WrittenFiles) {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(dir.path(), false)
            .expect("written");
        (dir, files)
    }

    /// The server's files of `files`.
    pub(crate) fn server_files(files: &podiam_certs::WrittenFiles) -> TlsFiles {
        TlsFiles {
            ca: files.ca_cert.clone(),
            cert: files.server_cert.clone(),
            key: files.server_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use test_files::{server_files, written};

    #[test]
    fn good_files_load_and_build_both_configs() {
        let (_dir, files) = written();
        let checked = server_files(&files)
            .load_checked(SystemTime::now())
            .expect("checks out");
        assert!(checked.not_before < checked.not_after);
        assert!(checked.subject.contains("podiam-server"), "{checked:?}");
        assert!(!format!("{checked:?}").contains("PRIVATE"));
        let server = server_config(&checked).expect("server config");
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
        let agent = TlsFiles {
            ca: files.ca_cert.clone(),
            cert: files.agent_cert.clone(),
            key: files.agent_key.clone(),
        }
        .load_checked(SystemTime::now())
        .expect("agent checks out");
        assert!(client_config(&agent).is_ok());
    }

    #[test]
    fn expired_and_future_certificates_are_refused_with_their_dates() {
        let (_dir, files) = written();
        let tls = server_files(&files);
        let checked = tls.load_checked(SystemTime::now()).expect("valid now");
        let at = |unix: i64| UNIX_EPOCH + Duration::from_secs(unix as u64);
        let expired = tls
            .load_checked(at(checked.not_after + 1))
            .expect_err("expired");
        let message = expired.to_string();
        assert!(matches!(expired, TlsError::Expired { .. }), "{message}");
        assert!(message.contains(&utc(checked.not_after)), "{message}");
        assert!(message.contains("server.pem"), "{message}");
        let early = tls
            .load_checked(at(checked.not_before - 1))
            .expect_err("not yet valid");
        assert!(matches!(early, TlsError::NotYetValid { .. }), "{early}");
        assert!(early.to_string().contains("clock"), "{early}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (_dir, files) = written();
        let tls = TlsFiles {
            key: files.agent_key.clone(),
            ..server_files(&files)
        };
        let error = tls.load_checked(SystemTime::now()).expect_err("mismatch");
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
    }

    #[test]
    fn a_certificate_another_ca_signed_is_refused_and_a_bundle_of_both_cas_accepts_it() {
        let (dir, files) = written();
        let other = podiam_certs::generate(&podiam_certs::CertOptions::default()).expect("CA");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write");
            path
        };
        let server = TlsFiles {
            cert: write("other-server.pem", &other.server_cert),
            key: write("other-server-key.pem", &other.server_key),
            ..server_files(&files)
        };
        let agent = TlsFiles {
            cert: write("other-agent.pem", &other.agent_cert),
            key: write("other-agent-key.pem", &other.agent_key),
            ..server_files(&files)
        };
        for tls in [&server, &agent] {
            let error = tls
                .load_checked(SystemTime::now())
                .expect_err("another CA's");
            let message = error.to_string();
            assert!(matches!(error, TlsError::NotSignedByCa { .. }), "{message}");
            assert!(
                message.contains("other-") && message.contains("ca.pem"),
                "{message}"
            );
            // The agent's certificate is a client's: refused for its signer, not its purpose.
            assert!(!message.to_lowercase().contains("purpose"), "{message}");
        }
        // During a CA rotation the CA file holds both: either CA's certificates load.
        let ours = std::fs::read_to_string(&files.ca_cert).expect("CA");
        let both = write("both.pem", &format!("{ours}{}", other.ca_cert));
        for tls in [server, agent, server_files(&files)] {
            let tls = TlsFiles {
                ca: both.clone(),
                ..tls
            };
            assert!(tls.load_checked(SystemTime::now()).is_ok(), "{tls:?}");
        }
    }

    #[test]
    fn garbage_is_refused_naming_the_file() {
        let (dir, files) = written();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
        let error = TlsFiles {
            cert: junk.clone(),
            ..server_files(&files)
        }
        .load_checked(SystemTime::now())
        .expect_err("junk");
        assert!(error.to_string().contains("junk.pem"), "{error}");
        std::fs::write(&junk, "no pem at all").expect("write");
        let error = TlsFiles {
            ca: junk,
            ..server_files(&files)
        }
        .load_checked(SystemTime::now())
        .expect_err("not pem");
        assert!(matches!(error, TlsError::NotPem { .. }), "{error}");
    }
}
