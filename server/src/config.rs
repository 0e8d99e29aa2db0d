//! The server's configuration: every flag is also an environment variable, and the whole
//! set is validated before any port is bound or any connection made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use podiam_proto::telemetry::{LogFormat, parse_duration};

use crate::policy::valid_base_arn;

/// STS accepts role sessions from 15 minutes…
const STS_MIN_SESSION: Duration = Duration::from_secs(15 * 60);
/// …to 12 hours (the role's own maximum may be lower; STS then refuses the call).
const STS_MAX_SESSION: Duration = Duration::from_secs(12 * 3600);

/// podiam-server: decides which pod gets which IAM role and fetches its credentials from STS.
#[derive(Clone, Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the gRPC service (mutual TLS) listens on.
    #[arg(long, env = "PODIAM_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// CA certificate (PEM) that agents' client certificates must chain to.
    #[arg(long, env = "PODIAM_TLS_CA")]
    pub tls_ca: PathBuf,
    /// The server's certificate (PEM).
    #[arg(long, env = "PODIAM_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The server's private key (PEM).
    #[arg(long, env = "PODIAM_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Kubeconfig to use; without it, the in-cluster service account (or the usual
    /// kubeconfig discovery) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Base ARN that role names are placed under, e.g. `arn:aws:iam::123456789012:role/`.
    #[arg(long, env = "PODIAM_BASE_ROLE_ARN")]
    pub base_role_arn: Option<String>,
    /// AWS region of the STS endpoint.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// STS endpoint URL to use instead of the region's (a VPC endpoint, or moto in tests).
    #[arg(long, env = "PODIAM_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Length of the role sessions requested from STS.
    #[arg(long, env = "PODIAM_SESSION_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub session_duration: Duration,
    /// Credentials are handed out only while they have at least this much life left
    /// (botocore treats credentials with under ~25 min as stale).
    #[arg(long, env = "PODIAM_MIN_REMAINING", default_value = "30m", value_parser = parse_duration)]
    pub min_remaining: Duration,
    /// Role session name used when a pod has no iam.amazonaws.com/session-name annotation.
    #[arg(long, env = "PODIAM_SESSION_NAME", default_value = "podiam")]
    pub session_name: String,
    /// Address for /live, /ready and /metrics (plain HTTP; never the gRPC port).
    #[arg(long, env = "PODIAM_HEALTH_LISTEN", default_value = "0.0.0.0:9090")]
    pub health_listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "PODIAM_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level filter (RUST_LOG wins when set).
    #[arg(long, env = "PODIAM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Config {
    /// Every mistake in the configuration, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(base) = &self.base_role_arn
            && !valid_base_arn(base)
        {
            problems.push(format!(
                "--base-role-arn {base:?} is not a role ARN prefix like arn:aws:iam::123456789012:role/"
            ));
        }
        if self.session_duration < STS_MIN_SESSION || self.session_duration > STS_MAX_SESSION {
            problems.push(format!(
                "--session-duration {}s is outside what STS accepts (900s to 43200s)",
                self.session_duration.as_secs()
            ));
        }
        if self.min_remaining >= self.session_duration {
            problems.push(format!(
                "--min-remaining {}s must be shorter than --session-duration {}s, or no credentials could ever be served",
                self.min_remaining.as_secs(),
                self.session_duration.as_secs()
            ));
        }
        if self.listen == self.health_listen && self.listen.port() != 0 {
            problems.push("--health-listen must differ from --listen".to_string());
        }
        let name = &self.session_name;
        if name.len() < 2
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        {
            problems.push(format!(
                "--session-name {name:?} is not a valid STS session name (2-64 of [A-Za-z0-9_+=,.@-])"
            ));
        }
        if let Some(endpoint) = &self.sts_endpoint
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            problems.push(format!("--sts-endpoint {endpoint:?} is not an http(s) URL"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Config {
        let mut args = vec![
            "podiam-server",
            "--tls-ca",
            "ca",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).expect("parses")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(parse(&[]).problems(), Vec::<String>::new());
    }

    #[test]
    fn mistakes_are_each_reported() {
        let config = parse(&[
            "--base-role-arn",
            "arn:aws:iam::123:role",
            "--session-duration",
            "10m",
            "--min-remaining",
            "2h",
            "--session-name",
            "bad name",
            "--sts-endpoint",
            "localhost:5000",
        ]);
        let problems = config.problems();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().all(|p| !p.contains('\n')));
    }
}
