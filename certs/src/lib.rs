//! Certificates for podiam's mutual TLS: one CA, a server certificate, an agent certificate.
//!
//! [`generate`] builds a [`CertBundle`] in memory from [`CertOptions`]: a self-signed CA, a
//! server certificate (serverAuth, with the in-cluster Service's DNS names plus any extra DNS
//! and IP SANs) and an agent client certificate (clientAuth, CN [`AGENT_COMMON_NAME`]), both
//! signed by the CA. [`CertBundle::write_to`] writes the six PEM files (keys mode 0600, never
//! overwriting unless asked), and [`CertBundle::secret_manifests`] renders the Kubernetes
//! Secrets the deployment mounts. [`cli`] holds the `podiam-certs` flags; `main.rs` only
//! parses, generates, writes and reports.
//!
//! [`renew`] issues new server and agent certificates from an existing CA (rotating the
//! leaves; [`CertBundle::replace_leaves_in`] swaps the files in place).
//!
//! Keys are ECDSA P-256 made by aws-lc-rs (rcgen's `aws_lc_rs` feature): the workspace compiles
//! exactly one TLS crypto provider. Calling [`generate`] twice gives two unrelated CAs, which
//! is how tests get a bundle the server must refuse.

pub mod cli;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Common name of the agent's client certificate; the server may check it.
pub const AGENT_COMMON_NAME: &str = "podiam-agent";
/// Common name of the generated CA.
pub const CA_COMMON_NAME: &str = "podiam CA";
/// Default namespace of the server's Service (and of the Secrets).
pub const DEFAULT_NAMESPACE: &str = "podiam";
/// Default name of the server's Service.
pub const DEFAULT_SERVICE: &str = "podiam-server";
/// The Service the API server calls the servers' admission webhook through
/// (deploy/components/pod-identity): a ClusterIP Service, as webhooks need, beside the
/// headless one agents resolve. Its names are in the server certificate too.
pub const WEBHOOK_SERVICE: &str = "podiam-webhook";
/// Default validity of the server and agent certificates.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Default validity of the CA: ten times the leaves', so leaves can be re-issued for years
/// under the same trust anchor.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;

/// Longest validity given, in days (a century): dates far beyond it do not fit in the
/// certificates' time format, and the tool would fail computing them.
pub const MAX_VALIDITY_DAYS: u32 = 36_500;
/// Certificates start this long in the past, so a node whose clock lags a little still
/// accepts a freshly generated certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

/// Secret holding the server's certificate, key and the CA.
pub const SERVER_SECRET_NAME: &str = "podiam-server-tls";
/// Secret holding the agent's certificate, key and the CA.
pub const AGENT_SECRET_NAME: &str = "podiam-agent-tls";

/// File names written by [`CertBundle::write_to`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// See [`CA_CERT_FILE`].
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// See [`CA_CERT_FILE`].
pub const SERVER_CERT_FILE: &str = "server.pem";
/// See [`CA_CERT_FILE`].
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// See [`CA_CERT_FILE`].
pub const AGENT_CERT_FILE: &str = "agent.pem";
/// See [`CA_CERT_FILE`].
pub const AGENT_KEY_FILE: &str = "agent-key.pem";

const KEY_FILE_MODE: u32 = 0o600;
const CERT_FILE_MODE: u32 = 0o644;

/// Errors of certificate generation and writing.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The options cannot give usable certificates.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// A DNS name is not acceptable as a SAN.
    #[error("invalid DNS name {name:?}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why rcgen rejected it.
        #[source]
        source: rcgen::Error,
    },
    /// Key generation failed.
    #[error("generating the {which} key")]
    GenerateKey {
        /// Which key.
        which: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// Signing a certificate failed.
    #[error("signing the {which} certificate")]
    Sign {
        /// Which certificate.
        which: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The existing CA certificate or key could not be used to sign.
    #[error("reading the existing CA certificate and key")]
    ReadCa(#[source] rcgen::Error),
    /// A target file exists and `force` was not given.
    #[error("refusing to overwrite {} (use --force to replace existing files)", .0.display())]
    AlreadyExists(PathBuf),
    /// Creating the output directory failed.
    #[error("creating directory {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("writing {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// What to put in the certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertOptions {
    /// Namespace of the server's Service; also the namespace of the Secrets.
    pub namespace: String,
    /// Name of the server's Service.
    pub service: String,
    /// DNS SANs of the server certificate in addition to the Service's names
    /// (`S`, `S.NS`, `S.NS.svc`, `S.NS.svc.cluster.local`).
    pub extra_dns_names: Vec<String>,
    /// IP SANs of the server certificate.
    pub ip_addresses: Vec<IpAddr>,
    /// Validity of the server and agent certificates, in days.
    pub validity_days: u32,
    /// Validity of the CA, in days; at least `validity_days`.
    pub ca_validity_days: u32,
}

impl Default for CertOptions {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            service: DEFAULT_SERVICE.to_owned(),
            extra_dns_names: vec!["localhost".to_owned()],
            ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            validity_days: DEFAULT_VALIDITY_DAYS,
            ca_validity_days: DEFAULT_CA_VALIDITY_DAYS,
        }
    }
}

impl CertOptions {
    /// All DNS SANs of the server certificate: the Service's names first, the webhook
    /// Service's `NAME.NAMESPACE.svc` (the name the API server checks), then the extra names,
    /// without duplicates.
    pub fn server_dns_names(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        let mut names = vec![
            s.clone(),
            format!("{s}.{ns}"),
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
            format!("{WEBHOOK_SERVICE}.{ns}.svc"),
        ];
        for name in &self.extra_dns_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    fn validate(&self) -> Result<(), CertsError> {
        if self.validity_days == 0 {
            return Err(CertsError::InvalidOptions(
                "validity days must be at least 1".into(),
            ));
        }
        if self.ca_validity_days > MAX_VALIDITY_DAYS {
            return Err(CertsError::InvalidOptions(format!(
                "validity days must be at most {MAX_VALIDITY_DAYS}"
            )));
        }
        if self.ca_validity_days < self.validity_days {
            return Err(CertsError::InvalidOptions(format!(
                "the CA's validity ({} days) must be at least the certificates' ({} days)",
                self.ca_validity_days, self.validity_days
            )));
        }
        if self.service.is_empty() || self.namespace.is_empty() {
            return Err(CertsError::InvalidOptions(
                "service and namespace must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// The six PEM documents. Key fields are secrets: `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct CertBundle {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key (PKCS#8).
    pub ca_key: String,
    /// Server certificate.
    pub server_cert: String,
    /// Server private key (PKCS#8).
    pub server_key: String,
    /// Agent client certificate.
    pub agent_cert: String,
    /// Agent private key (PKCS#8).
    pub agent_key: String,
}

impl fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const REDACTED: &str = "<redacted>";
        f.debug_struct("CertBundle")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &REDACTED)
            .field("server_cert", &self.server_cert)
            .field("server_key", &REDACTED)
            .field("agent_cert", &self.agent_cert)
            .field("agent_key", &REDACTED)
            .finish()
    }
}

/// Paths of the files [`CertBundle::write_to`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFiles {
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca-key.pem`.
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server-key.pem`.
    pub server_key: PathBuf,
    /// `agent.pem`.
    pub agent_cert: PathBuf,
    /// `agent-key.pem`.
    pub agent_key: PathBuf,
}

impl WrittenFiles {
    fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
            agent_cert: dir.join(AGENT_CERT_FILE),
            agent_key: dir.join(AGENT_KEY_FILE),
        }
    }
}

impl CertBundle {
    /// Writes the six files into `dir` (created if missing). Key files get mode 0600,
    /// certificates 0644. Unless `force`, nothing is written when any of the six exists.
    pub fn write_to(&self, dir: &Path, force: bool) -> Result<WrittenFiles, CertsError> {
        let paths = WrittenFiles::in_dir(dir);
        if !force {
            check_absent(dir, None)?;
        }
        let files = [
            (&paths.ca_cert, &self.ca_cert, CERT_FILE_MODE),
            (&paths.ca_key, &self.ca_key, KEY_FILE_MODE),
            (&paths.server_cert, &self.server_cert, CERT_FILE_MODE),
            (&paths.server_key, &self.server_key, KEY_FILE_MODE),
            (&paths.agent_cert, &self.agent_cert, CERT_FILE_MODE),
            (&paths.agent_key, &self.agent_key, KEY_FILE_MODE),
        ];
        fs::create_dir_all(dir).map_err(|source| CertsError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        for (path, contents, mode) in files {
            write_file(path, contents, mode, force)?;
        }
        Ok(paths)
    }

    /// Replaces the server and agent certificates and keys in `dir`, each file through a
    /// rename so that a daemon re-reading them never sees half a file; the CA files are left
    /// as they are (see [`renew`]).
    pub fn replace_leaves_in(&self, dir: &Path) -> Result<WrittenFiles, CertsError> {
        let paths = WrittenFiles::in_dir(dir);
        let files = [
            (&paths.server_cert, &self.server_cert, CERT_FILE_MODE),
            (&paths.server_key, &self.server_key, KEY_FILE_MODE),
            (&paths.agent_cert, &self.agent_cert, CERT_FILE_MODE),
            (&paths.agent_key, &self.agent_key, KEY_FILE_MODE),
        ];
        for (path, contents, mode) in files {
            let mut staging = path.as_os_str().to_owned();
            staging.push(".new");
            let staging = PathBuf::from(staging);
            write_file(&staging, contents, mode, true)?;
            fs::rename(&staging, path).map_err(|source| CertsError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(paths)
    }

    /// Kubernetes Secret manifests (`kubernetes.io/tls`, keys `tls.crt`, `tls.key`,
    /// `ca.crt`) named [`SERVER_SECRET_NAME`] and [`AGENT_SECRET_NAME`], as one YAML stream.
    pub fn secret_manifests(&self, namespace: &str) -> String {
        let server = secret_manifest(
            SERVER_SECRET_NAME,
            namespace,
            &self.server_cert,
            &self.server_key,
            &self.ca_cert,
        );
        let agent = secret_manifest(
            AGENT_SECRET_NAME,
            namespace,
            &self.agent_cert,
            &self.agent_key,
            &self.ca_cert,
        );
        format!("{server}---\n{agent}")
    }

    /// Writes [`Self::secret_manifests`] to `path` with mode 0600 (it holds private keys),
    /// refusing to overwrite unless `force`.
    pub fn write_secrets(
        &self,
        path: &Path,
        namespace: &str,
        force: bool,
    ) -> Result<(), CertsError> {
        if !force && path.symlink_metadata().is_ok() {
            return Err(CertsError::AlreadyExists(path.to_owned()));
        }
        write_file(
            path,
            &self.secret_manifests(namespace),
            KEY_FILE_MODE,
            force,
        )
    }
}

/// The name of the MutatingWebhookConfiguration and its webhook in
/// deploy/components/pod-identity.
pub const WEBHOOK_CONFIGURATION: &str = "podiam";
pub const WEBHOOK_NAME: &str = "pods.podiam.io";

/// Writes [`webhook_ca_patch`] of `ca_cert` to `path`, replacing what is there (it is
/// public and made again from the CA) without following a link.
pub fn write_webhook_ca_patch(path: &Path, ca_cert: &str) -> Result<(), CertsError> {
    write_file(path, &webhook_ca_patch(ca_cert), CERT_FILE_MODE, true)
}

/// A kustomize patch giving deploy/components/pod-identity's webhook `ca_cert` (PEM) as its
/// `caBundle`: the API server then trusts the servers' certificate. Public: no secret in it.
pub fn webhook_ca_patch(ca_cert: &str) -> String {
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_cert);
    format!(
        "# podiam's CA for the admission webhook (podiam-certs --webhook-ca-patch): list this\n\
         # file under `patches:` in the kustomization that uses components/pod-identity.\n\
         apiVersion: admissionregistration.k8s.io/v1\n\
         kind: MutatingWebhookConfiguration\n\
         metadata:\n  name: {WEBHOOK_CONFIGURATION}\n\
         webhooks:\n  - name: {WEBHOOK_NAME}\n    clientConfig:\n      caBundle: {bundle}\n"
    )
}

/// Fails with [`CertsError::AlreadyExists`] if any of the six files in `dir`, or `secrets`,
/// exists: lets a caller refuse before writing anything at all.
pub fn check_absent(dir: &Path, secrets: Option<&Path>) -> Result<(), CertsError> {
    let names = [
        CA_CERT_FILE,
        CA_KEY_FILE,
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        AGENT_CERT_FILE,
        AGENT_KEY_FILE,
    ];
    let candidates = names
        .iter()
        .map(|n| dir.join(n))
        .chain(secrets.map(Path::to_owned));
    for path in candidates {
        if path.symlink_metadata().is_ok() {
            return Err(CertsError::AlreadyExists(path));
        }
    }
    Ok(())
}

fn secret_manifest(name: &str, namespace: &str, cert: &str, key: &str, ca: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  \
           name: {name}\n  \
           namespace: {namespace}\n  \
           labels:\n    \
             app.kubernetes.io/part-of: podiam\n\
         type: kubernetes.io/tls\n\
         data:\n  \
           tls.crt: {}\n  \
           tls.key: {}\n  \
           ca.crt: {}\n",
        BASE64.encode(cert),
        BASE64.encode(key),
        BASE64.encode(ca),
    )
}

/// Writes `contents` with `mode` into a file made new. With `force` what is at `path` is
/// removed first (a symbolic link itself, not what it points to); without it, creation fails
/// if something is there. Either way nothing at `path` is followed: a link planted in the
/// output directory makes the write fail rather than overwrite the file it names.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    let mut options = OpenOptions::new();
    options.write(true).mode(mode).create_new(true);
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertsError::AlreadyExists(path.to_owned())
        } else {
            err(source)
        }
    })?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Generates a fresh CA and the server and agent certificates it signs.
pub fn generate(opts: &CertOptions) -> Result<CertBundle, CertsError> {
    opts.validate()?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    let ca_key = new_key("CA")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "podiam");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(i64::from(opts.ca_validity_days));
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| CertsError::Sign {
            which: "CA",
            source,
        })?;
    let ca_cert_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    issue(
        ca_cert_pem,
        ca_key_pem,
        &Issuer::new(ca_params, ca_key),
        opts,
    )
}

/// New server and agent certificates (and keys) from an existing CA: the rotation of the
/// leaves, which peers accept without any change since they trust the same CA.
pub fn renew(ca_cert: &str, ca_key: &str, opts: &CertOptions) -> Result<CertBundle, CertsError> {
    opts.validate()?;
    let key = KeyPair::from_pem(ca_key).map_err(CertsError::ReadCa)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, key).map_err(CertsError::ReadCa)?;
    // Leaves that outlive their CA stop working when it does, with no warning before.
    let ca_ends = ca_not_after(ca_cert)?;
    let now = OffsetDateTime::now_utc();
    let days_left = (ca_ends - now).whole_days();
    if days_left < 1 {
        return Err(CertsError::InvalidOptions(format!(
            "the CA expires on {} (in under a day, or it has): make a new CA, and roll it out \
             before it is used",
            ca_ends.date()
        )));
    }
    if now + Duration::days(i64::from(opts.validity_days)) > ca_ends {
        return Err(CertsError::InvalidOptions(format!(
            "the CA expires on {}, before certificates of {} days would: give --days \
             {days_left} at most, or make a new CA (and roll it out before it is used)",
            ca_ends.date(),
            opts.validity_days,
        )));
    }
    issue(ca_cert.to_string(), ca_key.to_string(), &issuer, opts)
}

/// When the CA certificate `pem` expires.
fn ca_not_after(pem: &str) -> Result<OffsetDateTime, CertsError> {
    let unreadable = || CertsError::ReadCa(rcgen::Error::CouldNotParseCertificate);
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| unreadable())?;
    let cert = pem.parse_x509().map_err(|_| unreadable())?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|_| unreadable())
}

/// The server and agent certificates `issuer` signs, in a bundle with the CA's PEM.
fn issue(
    ca_cert: String,
    ca_key: String,
    issuer: &Issuer<'_, KeyPair>,
    opts: &CertOptions,
) -> Result<CertBundle, CertsError> {
    let now = OffsetDateTime::now_utc();
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    let not_after = now + Duration::days(i64::from(opts.validity_days));
    let mut sans = Vec::new();
    for name in opts.server_dns_names() {
        let dns = name
            .clone()
            .try_into()
            .map_err(|source| CertsError::InvalidDnsName { name, source })?;
        sans.push(SanType::DnsName(dns));
    }
    sans.extend(opts.ip_addresses.iter().copied().map(SanType::IpAddress));
    let server_params = leaf_params(
        &opts.service,
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
        not_before,
        not_after,
    );
    let server_key = new_key("server")?;
    let server_cert = server_params
        .signed_by(&server_key, issuer)
        .map_err(|source| CertsError::Sign {
            which: "server",
            source,
        })?;

    let agent_params = leaf_params(
        AGENT_COMMON_NAME,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        not_before,
        not_after,
    );
    let agent_key = new_key("agent")?;
    let agent_cert = agent_params
        .signed_by(&agent_key, issuer)
        .map_err(|source| CertsError::Sign {
            which: "agent",
            source,
        })?;

    Ok(CertBundle {
        ca_cert,
        ca_key,
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        agent_cert: agent_cert.pem(),
        agent_key: agent_key.serialize_pem(),
    })
}

fn new_key(which: &'static str) -> Result<KeyPair, CertsError> {
    KeyPair::generate().map_err(|source| CertsError::GenerateKey { which, source })
}

fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params
}
