//! The agent's command line: `serve` (the DaemonSet's command) and `uninstall` (the explicit
//! removal of the iptables rules). Every flag is also an environment variable; `serve`'s
//! flags are validated before anything is bound or installed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use podiam_proto::telemetry::{LogFormat, parse_duration};

use crate::iptables::valid_interface;

/// podiam-agent: answers pods' instance-metadata requests with their own role's credentials.
#[derive(Clone, Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "PODIAM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log level filter (RUST_LOG wins when set).
    #[arg(long, global = true, env = "PODIAM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Serve pods' metadata requests (and, with --iptables, intercept them).
    Serve(Box<ServeConfig>),
    /// Remove the agent's iptables chain and jumps, then exit. Stopping `serve` never does
    /// this: while no agent runs, pods must reach no metadata service at all.
    Uninstall(UninstallConfig),
}

#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// Pod-facing address (the DNAT target's port).
    #[arg(long, env = "PODIAM_AGENT_LISTEN", default_value = "0.0.0.0:8181")]
    pub listen: SocketAddr,
    /// Address for /live and /ready; never the pod-facing one.
    #[arg(
        long,
        env = "PODIAM_AGENT_HEALTH_LISTEN",
        default_value = "0.0.0.0:8182"
    )]
    pub health_listen: SocketAddr,
    /// The server's gRPC URL.
    #[arg(
        long,
        env = "PODIAM_SERVER",
        default_value = "https://podiam-server.podiam.svc:8443"
    )]
    pub server: String,
    /// The name the server's certificate must carry, when it differs from the URL's host.
    #[arg(long, env = "PODIAM_SERVER_NAME")]
    pub server_name: Option<String>,
    /// CA certificate (PEM) the server's certificate must chain to.
    #[arg(long, env = "PODIAM_TLS_CA")]
    pub tls_ca: PathBuf,
    /// The agent's client certificate (PEM).
    #[arg(long, env = "PODIAM_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The agent's private key (PEM).
    #[arg(long, env = "PODIAM_TLS_KEY")]
    pub tls_key: PathBuf,
    /// This node's name (from the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Install the iptables DNAT rule for pod interfaces at start.
    #[arg(long, env = "PODIAM_IPTABLES")]
    pub iptables: bool,
    /// The node's IP: the DNAT target (required with --iptables when --listen is 0.0.0.0).
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,
    /// Pod interface patterns to intercept (repeat, or comma-separate): cali+, eni+, cni0…
    #[arg(
        long = "interface",
        env = "PODIAM_INTERFACES",
        value_delimiter = ',',
        default_value = "cali+"
    )]
    pub interfaces: Vec<String>,
    /// The iptables program (iptables, iptables-nft, iptables-legacy).
    #[arg(long, env = "PODIAM_IPTABLES_BIN", default_value = "iptables")]
    pub iptables_bin: String,
    /// Refuse requests without an IMDSv2 token (IMDSv2-only).
    #[arg(long, env = "PODIAM_REQUIRE_TOKEN")]
    pub require_token: bool,
    /// Deadline for one call to the server (SDKs give the metadata service about 1 s).
    #[arg(long, env = "PODIAM_SERVER_TIMEOUT", default_value = "900ms", value_parser = parse_duration)]
    pub server_timeout: Duration,
}

#[derive(Clone, Debug, Args)]
pub struct UninstallConfig {
    /// The iptables program (iptables, iptables-nft, iptables-legacy).
    #[arg(long, env = "PODIAM_IPTABLES_BIN", default_value = "iptables")]
    pub iptables_bin: String,
}

impl ServeConfig {
    /// Where the DNAT rule sends pods' metadata requests.
    pub fn dnat_target(&self) -> Option<SocketAddr> {
        let ip = self
            .host_ip
            .or_else(|| (!self.listen.ip().is_unspecified()).then(|| self.listen.ip()))?;
        Some(SocketAddr::new(ip, self.listen.port()))
    }

    /// The name the server's certificate is checked against.
    pub fn server_name(&self) -> Option<String> {
        self.server_name.clone().or_else(|| {
            let uri: http::Uri = self.server.parse().ok()?;
            uri.host().map(|h| h.trim_matches(['[', ']']).to_string())
        })
    }

    /// Every mistake in the configuration, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.server.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
            _ => problems.push(format!(
                "--server {:?} must be an https:// URL (the server speaks mutual TLS only)",
                self.server
            )),
        }
        if self.iptables && self.dnat_target().is_none() {
            problems.push(
                "--iptables needs --host-ip (or a specific --listen address) as the DNAT target"
                    .to_string(),
            );
        }
        if self.interfaces.is_empty() {
            problems.push("--interface: at least one pod interface pattern is needed".into());
        }
        for bad in self.interfaces.iter().filter(|i| !valid_interface(i)) {
            problems.push(format!(
                "--interface {bad:?} is not an interface name or prefix like cali+"
            ));
        }
        if self.listen == self.health_listen {
            problems.push(
                "--health-listen must differ from --listen (health is never pod-facing)".into(),
            );
        }
        if self.server_timeout.is_zero() {
            problems.push("--server-timeout must be more than zero".into());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(extra: &[&str]) -> ServeConfig {
        let mut args = vec![
            "podiam-agent",
            "serve",
            "--tls-ca",
            "a",
            "--tls-cert",
            "b",
            "--tls-key",
            "c",
        ];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args).expect("parses").command {
            Command::Serve(config) => *config,
            Command::Uninstall(_) => panic!("serve expected"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = serve(&[]);
        assert_eq!(config.problems(), Vec::<String>::new());
        assert_eq!(
            config.server_name().as_deref(),
            Some("podiam-server.podiam.svc")
        );
    }

    #[test]
    fn dnat_target_comes_from_host_ip_or_listen() {
        assert_eq!(serve(&["--iptables"]).problems().len(), 1);
        let config = serve(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--interface",
            "cali+,eni+",
        ]);
        assert_eq!(config.problems(), Vec::<String>::new());
        assert_eq!(
            config.dnat_target(),
            Some("10.0.0.5:8181".parse().expect("addr"))
        );
        assert_eq!(config.interfaces, vec!["cali+", "eni+"]);
        let config = serve(&["--listen", "10.0.0.6:9000"]);
        assert_eq!(
            config.dnat_target(),
            Some("10.0.0.6:9000".parse().expect("addr"))
        );
    }

    #[test]
    fn mistakes_are_each_reported() {
        let config = serve(&[
            "--server",
            "http://x:1",
            "--interface",
            "bad iface",
            "--health-listen",
            "0.0.0.0:8181",
        ]);
        assert_eq!(config.problems().len(), 3, "{:#?}", config.problems());
    }
}
