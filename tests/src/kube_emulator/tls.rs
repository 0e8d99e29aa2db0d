//! The emulator's TLS identity: a throwaway CA and a server certificate for `127.0.0.1`,
//! `::1` and `localhost`, made at start.
//!
//! Why TLS at all: kubectl (client-go's kubeconfig loader) applies a user's credentials
//! only when the connection to the cluster is TLS, so over plain `http://` kubectl never
//! sends a bearer token. The emulator therefore speaks both on the same port: a connection
//! whose first byte is a TLS handshake record is served over TLS, anything else as plain
//! HTTP. Kubeconfigs without credentials keep using `http://`; kubeconfigs for a token
//! ([`super::KubeEmulator::kubeconfig_yaml_for_token`]) use `https://` and carry the CA.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::error::EmulatorError;

/// The first byte of a TLS record carrying a handshake (a ClientHello starts with it; no
/// HTTP/1.1 request line does).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The CA (for clients) and the acceptor (for the server).
#[derive(Clone)]
pub struct TlsIdentity {
    /// The CA certificate, PEM, that clients trust.
    pub ca_pem: String,
    /// Accepts TLS connections with the server certificate.
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key lives in the acceptor; only say what is public.
        f.debug_struct("TlsIdentity")
            .field("ca_pem_len", &self.ca_pem.len())
            .finish_non_exhaustive()
    }
}

fn tls_error(step: &str, error: impl std::fmt::Display) -> EmulatorError {
    EmulatorError::Tls(format!("{step}: {error}"))
}

/// A fresh CA and server certificate, and a rustls acceptor serving HTTP/1.1 with them.
pub fn generate() -> Result<TlsIdentity, EmulatorError> {
    let ca_key = KeyPair::generate().map_err(|e| tls_error("generating the CA key", e))?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "podiam kube emulator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| tls_error("signing the CA", e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(|e| tls_error("generating the server key", e))?;
    let mut server_params = CertificateParams::default();
    server_params
        .distinguished_name
        .push(DnType::CommonName, "podiam kube emulator");
    let localhost = "localhost"
        .to_string()
        .try_into()
        .map_err(|e| tls_error("naming localhost", e))?;
    server_params.subject_alt_names = vec![
        SanType::DnsName(localhost),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(|e| tls_error("signing the server certificate", e))?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("choosing TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .map_err(|e| tls_error("loading the server certificate", e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsIdentity {
        ca_pem: ca_cert.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}
