//! The agent's command line: `serve` (the DaemonSet's command) and `uninstall` (the explicit
//! removal of the iptables rules). Every flag is also an environment variable; `serve`'s
//! flags are validated before anything is bound or installed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use podiam_runtime::telemetry::{LogFormat, parse_duration};
use podiam_runtime::tls::TlsFiles;

use crate::iptables::valid_interface;
use crate::replicas::Target;

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

/// The default pod-facing port, and so the DNAT target's: 254, like the last byte of
/// 169.254.169.254, and below 1024 on purpose. While no agent listens (stopped, crashed,
/// between two), the DNAT rule stays and points at this port; a privileged port cannot be
/// bound by an unprivileged process on the node to answer pods with keys of its own (binding
/// it needs root or `CAP_NET_BIND_SERVICE`). No common node daemon uses it (IANA leaves
/// 249-255 unassigned).
pub const DEFAULT_POD_PORT: u16 = 254;

/// The default container-credentials port (the DNAT target for 169.254.170.23:80): privileged
/// for the same reason as [`DEFAULT_POD_PORT`], and as unassigned.
pub const DEFAULT_CONTAINER_PORT: u16 = 253;

/// Connections one pod may hold by default. An SDK client uses one connection at a time and
/// the agent answers in milliseconds, so 16 lets 16 processes of one pod ask at the same
/// instant; idle connections beyond it make room for new ones. 64 pods at this limit fill the
/// default `--max-connections` (1024), and then give up connections to pods holding fewer; a
/// node runs at most 110 pods by default (the kubelet's
/// `--max-pods`), of which only a flooding few ever reach it.
pub const MAX_CONNECTIONS_PER_POD: usize = 16;

/// The most runtime threads the agent starts with by default (`--worker-threads`).
pub const DEFAULT_MAX_WORKER_THREADS: usize = 2;

/// The default `--worker-threads`: the CPUs this process may use (its affinity and its
/// cgroup's CPU limit counted), at most [`DEFAULT_MAX_WORKER_THREADS`].
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(DEFAULT_MAX_WORKER_THREADS)
}

/// Where the node's kernel says unprivileged ports begin (`net.ipv4.ip_unprivileged_port_start`,
/// per network namespace; 1024 unless changed). `None` when it cannot be read.
pub fn unprivileged_port_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// Pod-facing address (the DNAT target's port). Keep the port below 1024: while no agent
    /// runs, no unprivileged process can bind it and answer pods (docs/security.md).
    #[arg(long, env = "PODIAM_AGENT_LISTEN", default_value = "0.0.0.0:254")]
    pub listen: SocketAddr,
    /// The container-credentials endpoint's address (the DNAT target's port for
    /// 169.254.170.23:80): pods that present their projected ServiceAccount token get their
    /// role's credentials there. Keep the port below 1024, as --listen's.
    #[arg(
        long,
        env = "PODIAM_AGENT_CONTAINER_LISTEN",
        default_value = "0.0.0.0:253"
    )]
    pub container_listen: SocketAddr,
    /// Serve the container-credentials endpoint (and, with --iptables, intercept
    /// 169.254.170.23). `false` leaves that address alone, for nodes where the EKS Pod
    /// Identity Agent answers it.
    #[arg(
        long,
        env = "PODIAM_CONTAINER_ENDPOINT",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub container_endpoint: bool,
    /// Address for /live and /ready; never the pod-facing one.
    #[arg(
        long,
        env = "PODIAM_AGENT_HEALTH_LISTEN",
        default_value = "0.0.0.0:8182"
    )]
    pub health_listen: SocketAddr,
    /// Once the listeners are bound (and the iptables rules installed), write their
    /// addresses to this file (`listen ADDRESS`, `container-listen ADDRESS` when that
    /// endpoint is on, `listen6` and `container-listen6` on a node with an IPv6 address, and
    /// `health-listen ADDRESS`, one a line; replaced atomically): with port 0 in a listen
    /// address, this is how a supervisor learns the ports.
    #[arg(long, env = "PODIAM_AGENT_LISTEN_ADDRESS_FILE")]
    pub listen_address_file: Option<PathBuf>,
    /// The servers' gRPC URL: a name that resolves to every replica (a headless Service),
    /// re-resolved every --server-resolve-interval. Repeat (or comma-separate) to list
    /// replicas one by one.
    #[arg(
        long,
        env = "PODIAM_SERVER",
        value_delimiter = ',',
        default_value = "https://podiam-server.podiam.svc:8443"
    )]
    pub server: Vec<String>,
    /// The name the servers' certificates must carry, when it differs from the URLs' host.
    #[arg(long, env = "PODIAM_SERVER_NAME")]
    pub server_name: Option<String>,
    /// How often the --server names are resolved again, so replicas that come and go are
    /// followed (CoreDNS caches a headless Service's answer for 30 s by default).
    #[arg(long, env = "PODIAM_SERVER_RESOLVE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub server_resolve_interval: Duration,
    /// How often the TLS files are re-read; changed files that check out are used for new
    /// connections without a restart.
    #[arg(long, env = "PODIAM_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// CA certificate (PEM) the server's certificate must chain to.
    #[arg(long, env = "PODIAM_TLS_CA")]
    pub tls_ca: PathBuf,
    /// The agent's client certificate (PEM).
    #[arg(long, env = "PODIAM_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The agent's private key (PEM).
    #[arg(long, env = "PODIAM_TLS_KEY")]
    pub tls_key: PathBuf,
    /// This node's name (from the downward API's spec.nodeName). Required: the servers
    /// answer an agent only about the node its token proves, and this must be that node.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// The agent's projected ServiceAccount token (audience `podiam`), re-read as the
    /// kubelet rotates it and sent with every call: the servers check it with a TokenReview
    /// and learn from it which node this agent runs on.
    #[arg(
        long,
        env = "PODIAM_TOKEN_FILE",
        default_value = "/var/run/secrets/podiam/token"
    )]
    pub token_file: PathBuf,
    /// The keys that sign pods' IMDSv2 tokens, kept on the node so that the tokens SDKs hold
    /// survive agent restarts and rolling updates: created (mode 0600) if absent, read by
    /// every agent of the node, rotated every 6 hours. A file that cannot be used is logged and
    /// the agent signs with keys of its own process instead.
    #[arg(
        long,
        env = "PODIAM_TOKEN_KEY_FILE",
        default_value = "/var/lib/podiam/imds-token-keys"
    )]
    pub token_key_file: PathBuf,
    /// Install the iptables DNAT rule for pod interfaces at start.
    #[arg(long, env = "PODIAM_IPTABLES")]
    pub iptables: bool,
    /// The node's IP: the DNAT target (required with --iptables when --listen is 0.0.0.0).
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,
    /// The node's IPv6 address: with --iptables, pods' IPv6 requests to [fd00:ec2::254]:80
    /// and [fd00:ec2::23]:80 are DNATed here (ip6tables), to the same ports as IPv4's, and
    /// the agent listens on it too. Not given: nothing over IPv6 is intercepted.
    #[arg(long, env = "HOST_IPV6")]
    pub host_ipv6: Option<std::net::Ipv6Addr>,
    /// The node's addresses (the downward API's status.hostIPs, comma-separated): without
    /// --host-ipv6, its IPv6 address is taken from here, so dual-stack nodes intercept
    /// IPv6 and IPv4-only nodes do not.
    #[arg(long, env = "HOST_IPS", value_delimiter = ',')]
    pub host_ips: Vec<IpAddr>,
    /// The ip6tables program (default: --iptables-bin's, ip6tables for iptables).
    #[arg(long, env = "PODIAM_IP6TABLES_BIN")]
    pub ip6tables_bin: Option<String>,
    /// Pod interface patterns to intercept (repeat, or comma-separate): cali+, eni+, cni0…;
    /// or, alone, every interface but one: !eth0 (kiam's --host-interface=!eth0).
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
    /// Deadline for one call to one server replica (SDKs give the metadata service about
    /// 1 s; a replica that has not answered after 300 ms is joined by a second one).
    #[arg(long, env = "PODIAM_SERVER_TIMEOUT", default_value = "900ms", value_parser = parse_duration)]
    pub server_timeout: Duration,
    /// Cached credentials are served while they have at least this much life left; keep it
    /// equal to the server's --min-remaining.
    #[arg(long, env = "PODIAM_MIN_REMAINING", default_value = "30m", value_parser = parse_duration)]
    pub min_remaining: Duration,
    /// Every pod request is answered within this time (504 otherwise).
    #[arg(long, env = "PODIAM_REQUEST_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Pass paths matching this regex (against the whole normalised path, e.g.
    /// `/latest/meta-data/placement/.*`) to the node's metadata service. User-data, the node's
    /// credentials, identity-credentials and signed identity documents stay blocked regardless,
    /// and so does any path with a byte other than ASCII letters, digits and `-_.:+=,@~`.
    #[arg(long, env = "PODIAM_ALLOW_ROUTE_REGEXP")]
    pub allow_route_regexp: Option<String>,
    /// The node's metadata service, for allow-listed paths.
    #[arg(
        long,
        env = "PODIAM_METADATA_UPSTREAM",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_upstream: String,
    /// Pod connections served at once, all pods together. At the limit a new connection takes
    /// the place of an idle one of the pod holding the most, if it holds more than the new
    /// one's pod; a pod holding as many as any other is refused.
    #[arg(long, env = "PODIAM_MAX_CONNECTIONS", default_value_t = podiam_runtime::serve::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections one pod (one source address) may hold at once. At the limit a new
    /// connection takes the place of that pod's longest-idle one, or is refused when none is
    /// idle: one pod cannot take the connections the others need.
    #[arg(long, env = "PODIAM_MAX_CONNECTIONS_PER_POD", default_value_t = MAX_CONNECTIONS_PER_POD)]
    pub max_connections_per_pod: usize,
    /// A request head must arrive whole within this time, counted from the connection's
    /// accept (its first request) or from the head's first byte (later ones); bytes trickling
    /// in do not extend it. A pod that takes none of an answer for as long is closed too.
    #[arg(long, env = "PODIAM_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request under way is closed after this long. Keep it
    /// longer than clients keep idle pooled connections (90 s in the Go and Rust SDKs' HTTP
    /// clients), so that a client never reuses a connection just as the agent closes it.
    #[arg(long, env = "PODIAM_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Requests one connection may carry; the last answer says `Connection: close` and the
    /// client opens a new connection.
    #[arg(long, env = "PODIAM_MAX_REQUESTS_PER_CONNECTION", default_value_t = podiam_runtime::serve::MAX_REQUESTS_PER_CONNECTION)]
    pub max_requests_per_connection: usize,
    /// How often the iptables rules are checked and repaired (with --iptables).
    #[arg(long, env = "PODIAM_IPTABLES_SYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub iptables_sync_interval: Duration,
    /// Delete conntrack entries toward the intercepted addresses (needs the `conntrack`
    /// tool): at a start that finds no rules of the agent's in place, all of them, so
    /// connections opened before the rules existed cannot bypass them; after a repair of the
    /// rules, those of connections that went straight to the node's service meanwhile.
    /// Connections DNATed to an agent are left alone (a restart, a rolling update).
    #[arg(long, env = "PODIAM_FLUSH_CONNTRACK")]
    pub flush_conntrack: bool,
    /// Threads of the agent's runtime (answering pods, talking to the servers). Default: the
    /// CPUs the agent may use (its cgroup's CPU limit counted), at most 2.
    #[arg(long, env = "PODIAM_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

#[derive(Clone, Debug, Args)]
pub struct UninstallConfig {
    /// The iptables program (iptables, iptables-nft, iptables-legacy).
    #[arg(long, env = "PODIAM_IPTABLES_BIN", default_value = "iptables")]
    pub iptables_bin: String,
    /// The ip6tables program (default: --iptables-bin's, ip6tables for iptables).
    #[arg(long, env = "PODIAM_IP6TABLES_BIN")]
    pub ip6tables_bin: Option<String>,
    /// Also delete the node's IMDSv2 token key file (the agent's --token-key-file), so that
    /// nothing of podiam stays on the node. Not given: the file is left alone.
    #[arg(long)]
    pub token_key_file: Option<PathBuf>,
}

impl ServeConfig {
    /// Where the DNAT rule sends pods' metadata requests.
    pub fn dnat_target(&self) -> Option<SocketAddr> {
        let ip = self
            .host_ip
            .or_else(|| (!self.listen.ip().is_unspecified()).then(|| self.listen.ip()))?;
        Some(SocketAddr::new(ip, self.listen.port()))
    }

    /// The node's IPv6 address to intercept IPv6 for: --host-ipv6, else the first IPv6
    /// address of --host-ips.
    pub fn node_ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.host_ipv6.or_else(|| {
            self.host_ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unspecified() => Some(*v6),
                _ => None,
            })
        })
    }

    /// Where the DNAT rule sends pods' container-credentials requests, when that endpoint
    /// is on.
    pub fn container_target(&self) -> Option<SocketAddr> {
        if !self.container_endpoint {
            return None;
        }
        let listen = self.container_listen;
        let ip = self
            .host_ip
            .or_else(|| (!listen.ip().is_unspecified()).then(|| listen.ip()))?;
        Some(SocketAddr::new(ip, listen.port()))
    }

    /// The pod-facing listener's connection limits.
    pub fn limits(&self) -> podiam_runtime::serve::Limits {
        podiam_runtime::serve::Limits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_pod,
            header_read_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            max_requests_per_connection: self.max_requests_per_connection,
            evict_waiting_heads: false,
            // Pods never come from loopback (each has its own network namespace): the node's
            // own processes do, from any of 127/8. A quarter of the pool at most.
            loopback_share: Some((self.max_connections / 4).max(self.max_connections_per_pod)),
        }
    }

    /// The servers to resolve, each with the name its certificate must carry.
    pub fn targets(&self) -> Vec<(Target, String)> {
        self.server
            .iter()
            .filter_map(|url| Target::parse(url))
            .map(|target| {
                let name = self
                    .server_name
                    .clone()
                    .unwrap_or_else(|| target.host.clone());
                (target, name)
            })
            .collect()
    }

    /// Checks every flag and parses each once: the configuration the agent serves with, or
    /// every mistake, one line each.
    pub fn validate(self) -> Result<ValidConfig, Vec<String>> {
        let mut problems = self.server_problems();
        problems.extend(self.node_problems());
        problems.extend(self.limit_problems());
        let allow = match &self.allow_route_regexp {
            Some(source) => match crate::routes::allow_list(source) {
                Ok(regex) => Some(regex),
                Err(error) => {
                    let error = error.to_string();
                    let last = error.lines().last().unwrap_or_default().trim().to_string();
                    problems.push(format!(
                        "--allow-route-regexp {source:?} does not compile: {last}"
                    ));
                    None
                }
            },
            None => None,
        };
        match self.metadata_upstream.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
            _ => problems.push(format!(
                "--metadata-upstream {:?} must be an http:// URL",
                self.metadata_upstream
            )),
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(self.into_valid(allow))
    }

    /// The checked values, assembled.
    fn into_valid(self, allow: Option<regex::Regex>) -> ValidConfig {
        let iptables = self
            .dnat_target()
            .filter(|_| self.iptables)
            .map(|target| Interception {
                target,
                container_target: self.container_target(),
                v6: self.node_ipv6().map(|host| Interception6 {
                    program: ip6tables_program(&self.iptables_bin, self.ip6tables_bin.as_deref()),
                    target: SocketAddr::new(host.into(), self.listen.port()),
                    container_target: self
                        .container_endpoint
                        .then(|| SocketAddr::new(host.into(), self.container_listen.port())),
                }),
                interfaces: self.interfaces.clone(),
                program: self.iptables_bin.clone(),
                sync_interval: self.iptables_sync_interval,
                flush_conntrack: self.flush_conntrack,
            });
        ValidConfig {
            servers: self.targets(),
            limits: self.limits(),
            worker_threads: self
                .worker_threads
                .map_or_else(default_worker_threads, std::num::NonZeroUsize::get),
            iptables,
            listen: self.listen,
            container_listen: self.container_endpoint.then_some(self.container_listen),
            listen6: self
                .node_ipv6()
                .map(|host| SocketAddr::new(host.into(), self.listen.port())),
            container_listen6: self
                .node_ipv6()
                .filter(|_| self.container_endpoint)
                .map(|host| SocketAddr::new(host.into(), self.container_listen.port())),
            health_listen: self.health_listen,
            listen_address_file: self.listen_address_file,
            server_urls: self.server,
            server_resolve_interval: self.server_resolve_interval,
            server_timeout: self.server_timeout,
            tls: TlsFiles {
                ca: self.tls_ca,
                cert: self.tls_cert,
                key: self.tls_key,
            },
            tls_reload_interval: self.tls_reload_interval,
            node_name: self.node_name,
            token_file: self.token_file,
            token_key_file: self.token_key_file,
            require_token: self.require_token,
            min_remaining: self.min_remaining,
            request_timeout: self.request_timeout,
            allow: allow.map(|regex| (regex, self.metadata_upstream)),
        }
    }

    /// The servers and this node's name.
    fn server_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.server.is_empty() {
            problems.push("--server: at least one server URL is needed".into());
        }
        if self.node_name.trim().is_empty() {
            problems.push(
                "--node-name (NODE_NAME) is required: set it from the downward API's spec.nodeName"
                    .into(),
            );
        }
        for url in self
            .server
            .iter()
            .filter(|url| Target::parse(url).is_none())
        {
            problems.push(format!(
                "--server {url:?} must be an https:// URL (the server speaks mutual TLS only)"
            ));
        }
        problems
    }

    /// The DNAT target, the token key file, pod interfaces and the two listeners.
    fn node_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.iptables && self.dnat_target().is_none() {
            problems.push(
                "--iptables needs --host-ip (or a specific --listen address) as the DNAT target"
                    .to_string(),
            );
        }
        // (One problem at a time: --host-ip answers both.)
        if self.iptables
            && self.container_endpoint
            && self.dnat_target().is_some()
            && self.container_target().is_none()
        {
            problems.push(
                "--iptables needs --host-ip (or a specific --container-listen address) as the \
                 container endpoint's DNAT target"
                    .to_string(),
            );
        }
        if self.token_key_file.as_os_str().is_empty() || self.token_key_file.ends_with("..") {
            problems.push(
                "--token-key-file must name a file (on a node directory only the agent reads)"
                    .into(),
            );
        }
        if self.interfaces.is_empty() {
            problems.push("--interface: at least one pod interface pattern is needed".into());
        }
        for bad in self.interfaces.iter().filter(|i| !valid_interface(i)) {
            problems.push(format!(
                "--interface {bad:?} is not an interface name or prefix like cali+ (or one \
                 excluded, like !eth0)"
            ));
        }
        // Jumps are alternatives: `!eth0` beside any other pattern would also match eth0
        // (through the other), so an exclusion stands alone.
        if self.interfaces.len() > 1 && self.interfaces.iter().any(|i| i.starts_with('!')) {
            problems.push(format!(
                "--interface {}: an excluded interface (!NAME) must be the only pattern",
                self.interfaces.join(",")
            ));
        }
        // Port 0 asks the kernel for a free port: two such listeners never collide.
        if self.listen == self.health_listen && self.listen.port() != 0 {
            problems.push(
                "--health-listen must differ from --listen (health is never pod-facing)".into(),
            );
        }
        if self.container_endpoint && self.container_listen.port() != 0 {
            for (flag, other) in [
                ("--listen", self.listen),
                ("--health-listen", self.health_listen),
            ] {
                if other == self.container_listen {
                    problems.push(format!("--container-listen must differ from {flag}"));
                }
            }
        }
        problems
    }

    /// Durations that must not be zero, and the connection limits.
    fn limit_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (flag, value) in [
            ("--server-timeout", self.server_timeout),
            ("--server-resolve-interval", self.server_resolve_interval),
            ("--tls-reload-interval", self.tls_reload_interval),
            ("--request-timeout", self.request_timeout),
            ("--header-timeout", self.header_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--iptables-sync-interval", self.iptables_sync_interval),
        ] {
            if value.is_zero() {
                problems.push(format!("{flag} must be more than zero"));
            }
        }
        if self.max_connections == 0 {
            problems.push("--max-connections must be at least 1".into());
        }
        if self.max_connections_per_pod == 0 {
            problems.push("--max-connections-per-pod must be at least 1".into());
        } else if self.max_connections > 0 && self.max_connections_per_pod > self.max_connections {
            problems.push("--max-connections-per-pod must be at most --max-connections".into());
        }
        if self.max_requests_per_connection == 0 {
            problems.push("--max-requests-per-connection must be at least 1".into());
        }
        problems
    }
}

/// `serve`'s configuration, checked: every flag parsed once into the value that uses it
/// ([`ServeConfig::validate`]). [`crate::Agent::build`] takes nothing else.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    /// The pod-facing address (bound by `main`).
    pub listen: SocketAddr,
    /// The container-credentials endpoint's address, when it is on (bound by `main`).
    pub container_listen: Option<SocketAddr>,
    /// The IPv6 DNAT targets (`--host-ipv6`), bound by `main` beside the others.
    pub listen6: Option<SocketAddr>,
    pub container_listen6: Option<SocketAddr>,
    /// The health address (bound by `main`).
    pub health_listen: SocketAddr,
    /// Where `main` writes the bound addresses once it serves.
    pub listen_address_file: Option<PathBuf>,
    /// The servers to resolve, each with the name its certificates must carry.
    pub servers: Vec<(Target, String)>,
    /// The `--server` URLs as given, for the log.
    pub server_urls: Vec<String>,
    pub server_resolve_interval: Duration,
    /// Deadline of one call to one replica.
    pub server_timeout: Duration,
    pub tls: TlsFiles,
    pub tls_reload_interval: Duration,
    pub node_name: String,
    pub token_file: PathBuf,
    pub token_key_file: PathBuf,
    /// The DNAT rule `main` installs and keeps (`--iptables`).
    pub iptables: Option<Interception>,
    pub require_token: bool,
    /// Cached credentials are served while they have this much life left.
    pub min_remaining: Duration,
    pub request_timeout: Duration,
    /// Paths passed to the node's metadata service (compiled whole-path regex), and its URL.
    pub allow: Option<(regex::Regex, String)>,
    /// The pod-facing listener's connection limits.
    pub limits: podiam_runtime::serve::Limits,
    /// Threads of the agent's runtime (built by `main`).
    pub worker_threads: usize,
}

/// Pods' metadata traffic sent to the agent (see [`crate::iptables`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interception {
    /// Where the DNAT rule sends pods' metadata requests.
    pub target: SocketAddr,
    /// Where the DNAT rule sends pods' container-credentials requests (169.254.170.23), when
    /// that endpoint is on.
    pub container_target: Option<SocketAddr>,
    /// The same over IPv6 (`--host-ipv6`).
    pub v6: Option<Interception6>,
    /// Pod interface patterns.
    pub interfaces: Vec<String>,
    /// The iptables program.
    pub program: String,
    /// How often the rules are checked and repaired.
    pub sync_interval: Duration,
    /// Delete conntrack entries that bypass the rules: at start, and after a repair.
    pub flush_conntrack: bool,
}

/// Pods' IPv6 metadata and container-credentials traffic sent to the agent (ip6tables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interception6 {
    pub program: String,
    /// Where [fd00:ec2::254]:80 goes.
    pub target: SocketAddr,
    /// Where [fd00:ec2::23]:80 goes, when the container endpoint is on.
    pub container_target: Option<SocketAddr>,
}

impl Interception6 {
    /// The DNAT rules: the metadata address, then the container-credentials address.
    pub fn dnats(&self) -> Vec<crate::iptables::Dnat> {
        use crate::iptables::{CONTAINER_IP6, Dnat, METADATA_IP6};
        let metadata = Dnat {
            address: METADATA_IP6,
            target: self.target,
        };
        let container = self.container_target.map(|target| Dnat {
            address: CONTAINER_IP6,
            target,
        });
        std::iter::once(metadata).chain(container).collect()
    }
}

/// The ip6tables program beside `iptables` (`iptables-nft` → `ip6tables-nft`), unless
/// `given`.
pub fn ip6tables_program(iptables: &str, given: Option<&str>) -> String {
    if let Some(given) = given {
        return given.to_string();
    }
    match iptables.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{}", name.replacen("iptables", "ip6tables", 1)),
        None => iptables.replacen("iptables", "ip6tables", 1),
    }
}

impl Interception {
    /// The DNAT rules: the metadata address, then the container-credentials address.
    pub fn dnats(&self) -> Vec<crate::iptables::Dnat> {
        use crate::iptables::{CONTAINER_IP, Dnat, METADATA_IP};
        let metadata = Dnat {
            address: METADATA_IP,
            target: self.target,
        };
        let container = self.container_target.map(|target| Dnat {
            address: CONTAINER_IP,
            target,
        });
        std::iter::once(metadata).chain(container).collect()
    }
}

impl ValidConfig {
    /// A warning when pods' DNAT target is a port that processes without privileges could
    /// bind on this node while no agent listens: at or above `unprivileged_start` (the
    /// node's `net.ipv4.ip_unprivileged_port_start`, 1024 when unknown).
    pub fn pod_port_warning(&self, unprivileged_start: Option<u16>) -> Option<String> {
        let start = unprivileged_start.unwrap_or(1024);
        let port = std::iter::once(self.listen)
            .chain(self.container_listen)
            .map(|address| address.port())
            .find(|port| *port >= start)?;
        self.iptables.is_some().then(|| {
            format!(
                "the pods' port {port} is not privileged on this node \
                 (net.ipv4.ip_unprivileged_port_start={start}): while no agent listens, any \
                 process on the node could bind it and answer pods; use a port below {start}"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` with its required flags and `extra`, as clap parses it.
    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut args = vec![
            "podiam-agent",
            "serve",
            "--tls-ca",
            "a",
            "--tls-cert",
            "b",
            "--tls-key",
            "c",
            "--node-name",
            "node-a",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args)
    }

    fn serve(extra: &[&str]) -> ServeConfig {
        match parse(extra).expect("parses").command {
            Command::Serve(config) => *config,
            Command::Uninstall(_) => panic!("serve expected"),
        }
    }

    /// Every mistake `validate` finds (none when it succeeds).
    fn problems(config: ServeConfig) -> Vec<String> {
        config.validate().err().unwrap_or_default()
    }

    fn valid(extra: &[&str]) -> ValidConfig {
        serve(extra).validate().expect("valid")
    }

    #[test]
    fn defaults_are_valid() {
        let config = valid(&[]);
        assert_eq!(config.iptables, None);
        assert!(config.allow.is_none());
        let targets = config.servers;
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].0.host, "podiam-server.podiam.svc");
        assert_eq!(targets[0].0.port, 8443);
        assert_eq!(targets[0].1, "podiam-server.podiam.svc");
    }

    #[test]
    fn worker_threads_are_at_most_two_by_default_and_as_given() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(
            valid(&[]).worker_threads,
            cpus.min(DEFAULT_MAX_WORKER_THREADS)
        );
        assert_eq!(valid(&["--worker-threads", "6"]).worker_threads, 6);
        for bad in ["0", "-1", "two"] {
            assert!(
                parse(&["--worker-threads", bad]).is_err(),
                "--worker-threads {bad}"
            );
        }
    }

    #[test]
    fn several_servers_share_one_certificate_name_when_given() {
        let config = serve(&[
            "--server",
            "https://127.0.0.1:9001,https://127.0.0.1:9002",
            "--server",
            "https://[::1]:9003",
            "--server-name",
            "localhost",
        ]);
        let targets = config.validate().expect("valid").servers;
        assert_eq!(targets.len(), 3);
        assert!(targets.iter().all(|(_, name)| name == "localhost"));
        assert_eq!(targets[2].0.host, "::1");
    }

    #[test]
    fn dnat_target_comes_from_host_ip_or_listen() {
        assert_eq!(problems(serve(&["--iptables"])).len(), 1);
        let config = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--interface",
            "cali+,eni+",
        ]);
        let iptables = config.iptables.expect("intercepting");
        assert_eq!(
            iptables.target,
            SocketAddr::from(([10, 0, 0, 5], DEFAULT_POD_PORT))
        );
        assert_eq!(
            iptables.container_target,
            Some(SocketAddr::from(([10, 0, 0, 5], DEFAULT_CONTAINER_PORT)))
        );
        assert_eq!(iptables.interfaces, vec!["cali+", "eni+"]);
        let config = serve(&["--listen", "10.0.0.6:9000"]);
        assert_eq!(
            config.dnat_target(),
            Some("10.0.0.6:9000".parse().expect("addr"))
        );
        // A specific --listen without a specific --container-listen is half a target.
        let half = problems(serve(&["--iptables", "--listen", "10.0.0.6:9000"]));
        assert_eq!(half.len(), 1, "{half:?}");
        assert!(half[0].contains("--container-listen"), "{half:?}");
        let both = valid(&[
            "--iptables",
            "--listen",
            "10.0.0.6:9000",
            "--container-listen",
            "10.0.0.6:9001",
        ]);
        let dnats = both.iptables.expect("intercepting").dnats();
        assert_eq!(dnats.len(), 2);
        assert_eq!(dnats[1].address, crate::iptables::CONTAINER_IP);
        assert_eq!(dnats[1].target, "10.0.0.6:9001".parse().expect("addr"));
        // The endpoint off: no listener, no rule for its address.
        let off = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--container-endpoint",
            "false",
        ]);
        assert_eq!(off.container_listen, None);
        assert_eq!(off.iptables.expect("intercepting").dnats().len(), 1);
        assert!(!problems(serve(&["--container-listen", "0.0.0.0:254"])).is_empty());
    }

    #[test]
    fn ipv6_interception_follows_host_ipv6() {
        let config = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--host-ipv6",
            "fd00:77::5",
        ]);
        let v6 = config.iptables.expect("intercepting").v6.expect("IPv6 too");
        assert_eq!(v6.program, "ip6tables");
        let dnats = v6.dnats();
        assert_eq!(dnats.len(), 2);
        assert_eq!(dnats[0].address, crate::iptables::METADATA_IP6);
        assert_eq!(dnats[0].target, "[fd00:77::5]:254".parse().expect("addr"));
        assert_eq!(dnats[1].address, crate::iptables::CONTAINER_IP6);
        assert_eq!(dnats[1].target, "[fd00:77::5]:253".parse().expect("addr"));
        assert_eq!(
            config.listen6,
            Some("[fd00:77::5]:254".parse().expect("addr"))
        );
        assert_eq!(
            config.container_listen6,
            Some("[fd00:77::5]:253".parse().expect("addr"))
        );
        // From the downward API's list, as deploy/ passes it.
        let listed = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--host-ips",
            "10.0.0.5,fd00:77::9",
        ]);
        assert_eq!(
            listed.listen6,
            Some("[fd00:77::9]:254".parse().expect("addr"))
        );
        let v4_only = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--host-ips",
            "10.0.0.5",
        ]);
        assert_eq!(v4_only.listen6, None);
        let without = valid(&["--iptables", "--host-ip", "10.0.0.5"]);
        assert!(without.iptables.expect("intercepting").v6.is_none());
        assert_eq!(without.listen6, None);
        for (iptables, want) in [
            ("iptables", "ip6tables"),
            ("iptables-nft", "ip6tables-nft"),
            ("iptables-legacy", "ip6tables-legacy"),
            ("/usr/sbin/iptables-legacy", "/usr/sbin/ip6tables-legacy"),
        ] {
            assert_eq!(ip6tables_program(iptables, None), want);
        }
        assert_eq!(ip6tables_program("iptables", Some("/opt/ip6")), "/opt/ip6");
    }

    #[test]
    fn the_default_dnat_target_is_a_privileged_port() {
        // While no agent listens (stopped, crashed, between two), the DNAT target must not be
        // a port any unprivileged process on the node could bind and answer pods from.
        let config = valid(&["--iptables", "--host-ip", "10.0.0.5"]);
        assert!(config.listen.port() < 1024, "{}", config.listen);
        let target = config.iptables.as_ref().expect("a target").target;
        assert!(target.port() < 1024, "{target}");
        assert_ne!(config.health_listen.port(), config.listen.port());
        assert_eq!(config.pod_port_warning(Some(1024)), None);
        assert_eq!(config.pod_port_warning(None), None);
    }

    #[test]
    fn a_pod_port_others_could_bind_is_warned_about() {
        let config = valid(&[
            "--iptables",
            "--host-ip",
            "10.0.0.5",
            "--listen",
            "0.0.0.0:8181",
        ]);
        let warning = config.pod_port_warning(Some(1024)).expect("a warning");
        assert!(
            warning.contains("8181") && warning.contains("1024"),
            "{warning}"
        );
        // A node that lowered the start makes the default port unprivileged too.
        let config = valid(&["--iptables", "--host-ip", "10.0.0.5"]);
        assert!(config.pod_port_warning(Some(0)).is_some());
        assert!(config.pod_port_warning(Some(80)).is_some());
        assert_eq!(config.pod_port_warning(Some(255)), None);
        // Without --iptables no pod is sent to the port.
        let config = valid(&["--listen", "0.0.0.0:8181"]);
        assert_eq!(config.pod_port_warning(Some(1024)), None);
    }

    #[test]
    fn connection_limits_come_from_the_flags() {
        let limits = valid(&[]).limits;
        assert_eq!(limits.max_connections, 1024);
        assert_eq!(limits.max_connections_per_peer, MAX_CONNECTIONS_PER_POD);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(5));
        // Longer than the longest idle time of SDKs' pooled connections (90 s).
        assert!(limits.idle_timeout > Duration::from_secs(90));
        assert_eq!(limits.max_requests_per_connection, 1000);
        let limits = valid(&[
            "--max-connections",
            "100",
            "--max-connections-per-pod",
            "4",
            "--idle-timeout",
            "3m",
            "--max-requests-per-connection",
            "7",
        ])
        .limits;
        assert_eq!(
            (
                limits.max_connections,
                limits.max_connections_per_peer,
                limits.idle_timeout,
                limits.max_requests_per_connection
            ),
            (100, 4, Duration::from_secs(180), 7)
        );
        for wrong in [
            &["--max-connections-per-pod", "0"][..],
            &["--max-connections", "8", "--max-connections-per-pod", "9"],
            &["--idle-timeout", "0s"],
            &["--max-requests-per-connection", "0"],
        ] {
            assert_eq!(problems(serve(wrong)).len(), 1, "{wrong:?}");
        }
    }

    #[test]
    fn an_excluded_interface_stands_alone() {
        let base = [
            "--server",
            "https://podiam-server.podiam.svc:8443",
            "--iptables",
            "--host-ip",
            "10.0.0.5",
        ];
        let with = |interfaces: &str| {
            let mut args = base.to_vec();
            args.extend(["--interface", interfaces]);
            serve(&args)
        };
        let config = with("!eth0").validate().expect("valid");
        assert_eq!(config.iptables.expect("intercepting").interfaces, ["!eth0"]);
        for mixed in ["!eth0,cali+", "!eth0,!eth1"] {
            let problems = problems(with(mixed));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].contains("must be the only pattern"),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn mistakes_are_each_reported() {
        let config = serve(&[
            "--server",
            "http://x:1",
            "--interface",
            "bad iface",
            "--health-listen",
            "0.0.0.0:254",
            "--allow-route-regexp",
            "(",
            "--request-timeout",
            "0s",
        ]);
        let problems = problems(config);
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn the_token_key_file_is_a_file_on_the_node() {
        assert_eq!(
            serve(&[]).token_key_file,
            PathBuf::from("/var/lib/podiam/imds-token-keys")
        );
        let problems = problems(serve(&["--token-key-file", "/var/lib/.."]));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("--token-key-file"), "{problems:#?}");
        let empty = Cli::try_parse_from([
            "podiam-agent",
            "serve",
            "--tls-ca=a",
            "--tls-cert=b",
            "--tls-key=c",
            "--token-key-file=",
        ]);
        assert!(empty.is_err(), "an empty path is refused while parsing");
    }

    #[test]
    fn an_agent_without_a_node_name_refuses_to_start() {
        for empty in ["", "  "] {
            let mut config = serve(&[]);
            config.node_name = empty.into();
            let problems = problems(config);
            assert_eq!(problems.len(), 1, "{problems:#?}");
            assert!(problems[0].starts_with("--node-name"), "{problems:#?}");
        }
    }
}
