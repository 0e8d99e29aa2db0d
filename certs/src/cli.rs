//! The `podiam-certs` command line: every flag is also a `PODIAM_CERTS_…` environment variable.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::{
    CertOptions, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_NAMESPACE, DEFAULT_SERVICE,
    DEFAULT_VALIDITY_DAYS,
};

/// Generate the CA, server and agent certificates for podiam's mutual TLS.
#[derive(Debug, Clone, Parser)]
#[command(name = "podiam-certs", version, about)]
pub struct Args {
    /// Directory to write ca.pem, ca-key.pem, server.pem, server-key.pem, agent.pem and
    /// agent-key.pem into (created if missing).
    #[arg(long, env = "PODIAM_CERTS_OUT")]
    pub out: PathBuf,

    /// Replace existing files instead of refusing.
    #[arg(long, env = "PODIAM_CERTS_FORCE")]
    pub force: bool,

    /// Keep the CA in --out (ca.pem, ca-key.pem) and issue new server and agent
    /// certificates from it, replacing the old ones (certificate rotation: the daemons pick
    /// the new files up without a restart). With --secrets, the Secret manifests are
    /// rewritten too.
    #[arg(long, env = "PODIAM_CERTS_RENEW")]
    pub renew: bool,

    /// Namespace of the server's Service and of the Secrets.
    #[arg(long, env = "PODIAM_CERTS_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// Name of the server's Service; its in-cluster DNS names are always in the server
    /// certificate.
    #[arg(long, env = "PODIAM_CERTS_SERVICE", default_value = DEFAULT_SERVICE)]
    pub service: String,

    /// Extra DNS name for the server certificate (repeatable; replaces the default).
    #[arg(
        long = "dns-name",
        env = "PODIAM_CERTS_DNS_NAMES",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub dns_names: Vec<String>,

    /// IP address for the server certificate (repeatable; replaces the default).
    #[arg(
        long = "ip",
        env = "PODIAM_CERTS_IPS",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    pub ips: Vec<IpAddr>,

    /// Validity of the server and agent certificates, in days.
    #[arg(long, env = "PODIAM_CERTS_DAYS", default_value_t = DEFAULT_VALIDITY_DAYS)]
    pub days: u32,

    /// Validity of the CA, in days (at least --days).
    #[arg(long, env = "PODIAM_CERTS_CA_DAYS", default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
    pub ca_days: u32,

    /// Also write Kubernetes Secret manifests (podiam-server-tls, podiam-agent-tls) to this
    /// file (mode 0600: it holds private keys).
    #[arg(long, env = "PODIAM_CERTS_SECRETS")]
    pub secrets: Option<PathBuf>,

    /// Also write a kustomize patch that gives the admission webhook
    /// (deploy/components/pod-identity) the CA as its caBundle, to this file.
    #[arg(long, env = "PODIAM_CERTS_WEBHOOK_CA_PATCH")]
    pub webhook_ca_patch: Option<PathBuf>,
}

impl Args {
    /// The generation options these flags ask for.
    pub fn options(&self) -> CertOptions {
        CertOptions {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            extra_dns_names: self.dns_names.clone(),
            ip_addresses: self.ips.clone(),
            validity_days: self.days,
            ca_validity_days: self.ca_days,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_match_library_defaults() {
        let args = Args::try_parse_from(["podiam-certs", "--out", "x"]).unwrap();
        assert_eq!(args.options(), CertOptions::default());
    }

    #[test]
    fn repeatable_sans() {
        let args = Args::try_parse_from([
            "podiam-certs",
            "--out",
            "x",
            "--dns-name",
            "a.example",
            "--dns-name",
            "b.example",
            "--ip",
            "10.0.0.1",
            "--ip",
            "::1",
        ])
        .unwrap();
        let opts = args.options();
        assert_eq!(opts.extra_dns_names, ["a.example", "b.example"]);
        assert_eq!(opts.ip_addresses.len(), 2);
    }
}
