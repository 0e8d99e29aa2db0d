//! The server's configuration: every flag is also an environment variable, and the whole
//! set is validated before any port is bound or any connection made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use podiam_runtime::telemetry::{LogFormat, parse_duration};

use podiam_policy::decision::AgentAccount;
use podiam_runtime::tls::TlsFiles;

use crate::policy::{valid_base_arn, valid_role_arn};
use crate::service::{Binding, BindingMode};
use crate::session::SessionNaming;
use crate::sts::{CachePolicy, StsOptions};

/// STS accepts role sessions from 15 minutes…
const STS_MIN_SESSION: Duration = Duration::from_secs(15 * 60);
/// …to 12 hours (the role's own maximum may be lower; STS then refuses the call).
const STS_MAX_SESSION: Duration = Duration::from_secs(12 * 3600);
/// Sessions assumed with credentials of an assumed role (role chaining) last at most 1 hour.
const CHAINED_MAX_SESSION: Duration = Duration::from_secs(3600);

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
    /// Find the base ARN at start from the node's instance profile (the metadata service's
    /// iam/info): the account the server runs in. Instead of --base-role-arn.
    #[arg(long, env = "PODIAM_BASE_ROLE_ARN_AUTODETECT")]
    pub base_role_arn_autodetect: bool,
    /// Metadata service asked by --base-role-arn-autodetect.
    #[arg(
        long,
        env = "PODIAM_METADATA_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_endpoint: String,
    /// A role the server assumes first; pods' roles are then assumed from its session (role
    /// chaining; STS limits chained sessions to 1 hour).
    #[arg(long, env = "PODIAM_ASSUME_ROLE_ARN")]
    pub assume_role_arn: Option<String>,
    /// AWS region of the STS endpoint.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// STS endpoint URL to use instead of the region's regional endpoint (a VPC endpoint, or
    /// moto in tests). It must be reachable when the server starts.
    #[arg(long, env = "PODIAM_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Time limit of one STS call attempt (connect and answer); a pod's call makes up to three.
    #[arg(long, env = "PODIAM_STS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub sts_timeout: Duration,
    /// Length of the role sessions requested from STS.
    #[arg(long, env = "PODIAM_SESSION_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub session_duration: Duration,
    /// Credentials are handed out only while they have at least this much life left
    /// (botocore treats credentials with under ~25 min as stale).
    #[arg(long, env = "PODIAM_MIN_REMAINING", default_value = "30m", value_parser = parse_duration)]
    pub min_remaining: Duration,
    /// When credentials are refreshed in the background, counted from their issue (default:
    /// half their life). Must leave them at least --min-remaining.
    #[arg(long, env = "PODIAM_REFRESH_AFTER", value_parser = parse_duration)]
    pub refresh_after: Option<Duration>,
    /// Role session name: a literal (pods sharing a role share its session; a pod's
    /// iam.amazonaws.com/session-name annotation replaces it) or a template with {namespace},
    /// {pod}, {uid} and {service-account} (one session per pod, named in CloudTrail; pods'
    /// session-name annotations are then ignored, so no pod can take another's name).
    #[arg(long, env = "PODIAM_SESSION_NAME", default_value = "podiam")]
    pub session_name: String,
    /// Tag each session with the pod's kubernetes-namespace, kubernetes-pod-name,
    /// kubernetes-pod-uid and kubernetes-service-account, EKS Pod Identity's tags (one
    /// session per pod; the role's trust policy must allow sts:TagSession).
    #[arg(long, env = "PODIAM_SESSION_TAGS")]
    pub session_tags: bool,
    /// With --session-tags, also tag sessions with eks-cluster-name set to this name.
    #[arg(long, env = "PODIAM_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// With --session-tags, make the tags transitive: they stay on sessions the pod's role
    /// chains into (AssumeRole from the pod's credentials).
    #[arg(long, env = "PODIAM_SESSION_TAGS_TRANSITIVE")]
    pub session_tags_transitive: bool,
    /// A connection to the Kubernetes API that receives nothing for this long is taken as
    /// dead and made again (a watch on a lost connection would otherwise wait forever, its
    /// view going stale unseen), and so is one that cannot be made in that time. Watches ask
    /// the API server to end them a little sooner (26 s at 30 s), so a quiet watch that
    /// works never trips it. 3s to 30s.
    #[arg(long, env = "PODIAM_API_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub api_timeout: Duration,
    /// How often the TLS files are re-read; changed files that check out are used for new
    /// connections without a restart (a Secret update reaches the pod within about a minute).
    #[arg(long, env = "PODIAM_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// On SIGTERM, how long the server keeps answering after it turned not-ready (agents
    /// move their streams at once and stop choosing it within their health interval) before it
    /// stops accepting connections.
    #[arg(long, env = "PODIAM_SHUTDOWN_DELAY", default_value = "3s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// On SIGTERM, after --shutdown-delay, how long requests under way get to finish before
    /// the server exits regardless. Keep the two under the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "PODIAM_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Address for /live, /ready and /metrics (plain HTTP; never the gRPC port).
    #[arg(long, env = "PODIAM_HEALTH_LISTEN", default_value = "0.0.0.0:9090")]
    pub health_listen: SocketAddr,
    /// Once the listeners are bound, write their addresses to this file (`listen ADDRESS`,
    /// `health-listen ADDRESS`, and `webhook-listen ADDRESS` when the webhook is on, one a
    /// line; replaced atomically): with port 0 in a listen address, this is how a supervisor
    /// learns the ports.
    #[arg(long, env = "PODIAM_LISTEN_ADDRESS_FILE")]
    pub listen_address_file: Option<PathBuf>,
    /// Serve the mutating admission webhook (HTTPS with the server's certificate,
    /// `POST /mutate-pods`) on this address: pods of namespaces that opt in get their
    /// projected token and the container-credentials endpoint's variables
    /// (docs/pod-identity.md). Not given: no webhook.
    #[arg(long, env = "PODIAM_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,
    /// The `expirationSeconds` of the token volume the webhook adds (at least 10m, as the API
    /// server requires; the kubelet renews the token at 80 % of it).
    #[arg(long, env = "PODIAM_WEBHOOK_TOKEN_EXPIRATION", default_value = "24h", value_parser = parse_duration)]
    pub webhook_token_expiration: Duration,
    /// The AWS_CONTAINER_CREDENTIALS_FULL_URI the webhook gives pods: the IPv4 address, or
    /// http://[fd00:ec2::23]/v1/credentials for clusters whose pods have IPv6 only (the
    /// SDKs accept no other http:// address there).
    #[arg(
        long,
        env = "PODIAM_WEBHOOK_ENDPOINT_URL",
        default_value = crate::webhook::ENDPOINT_URL
    )]
    pub webhook_endpoint_url: String,
    /// What to do with an agent call whose node its token does not prove (no token, a token
    /// the API refuses, not an agent's, or a pod on another node): `enforce` refuses it;
    /// `warn` logs and counts it (podiam_server_node_binding_refusals_total) and answers, for
    /// migrating a live cluster to agents with tokens.
    #[arg(
        long,
        env = "PODIAM_NODE_BINDING",
        value_enum,
        default_value = "enforce"
    )]
    pub node_binding: BindingMode,
    /// The ServiceAccount agents run as, NAMESPACE/NAME: only tokens of its pods prove a node.
    #[arg(
        long,
        env = "PODIAM_AGENT_SERVICE_ACCOUNT",
        default_value = "podiam/podiam-agent"
    )]
    pub agent_service_account: String,
    /// The audience of the agents' projected ServiceAccount tokens (the DaemonSet's
    /// serviceAccountToken volume must ask for the same).
    #[arg(long, env = "PODIAM_AGENT_TOKEN_AUDIENCE", default_value = "podiam")]
    pub agent_token_audience: String,
    /// The audience of the projected ServiceAccount tokens pods present at the
    /// container-credentials endpoint (the webhook's token volume asks for the same).
    #[arg(long, env = "PODIAM_POD_TOKEN_AUDIENCE", default_value = "podiam")]
    pub pod_token_audience: String,
    /// The annotation on pods (and ServiceAccounts) that names their role, for clusters whose
    /// pods carry kube2iam's --iam-role-key. `kubectl iam` decides locally, and grants,
    /// with iam.amazonaws.com/role: give it --server to ask the servers instead.
    #[arg(
        long,
        env = "PODIAM_ROLE_ANNOTATION",
        default_value = "iam.amazonaws.com/role"
    )]
    pub role_annotation: String,
    /// The taint nodes register with until their agent's iptables rules are in place
    /// (kubelet --register-with-taints=KEY=true:NoExecute): removed from a node, whatever its
    /// effect, once its agent, proven by its token, reports its rules. Empty: no taint is
    /// removed.
    #[arg(
        long,
        env = "PODIAM_AGENT_NOT_READY_TAINT",
        default_value = "podiam.io/agent-not-ready"
    )]
    pub agent_not_ready_taint: String,
    /// At most this many STS AssumeRole calls start in any second on this replica: pods'
    /// requests first, then refreshes, then prefetches. STS allows an account about 600 a
    /// second in a region, shared with everything else in it. 0: no limit.
    #[arg(long, env = "PODIAM_STS_RATE", default_value_t = 50)]
    pub sts_rate: usize,
    /// At most this many calls a second from one node's agent to this replica, after a burst
    /// of five seconds' worth (GetCredentials, GetPodRole, NodeReady); past it a call is shed
    /// (RESOURCE_EXHAUSTED) and the agent asks another replica. It bounds what root on one
    /// node can take of the replicas from the other nodes' agents. An agent synced with its
    /// node stream asks only on its cache's misses; one that is not (starting, or its stream
    /// moving) asks for every request of its pods: set it well above that. 0: no limit.
    #[arg(long, env = "PODIAM_AGENT_CALL_RATE", default_value_t = 0)]
    pub agent_call_rate: u32,
    /// This replica's name: its pod's (the Deployment sets POD_NAME from metadata.name).
    /// With --replica-namespace, each credential key is prefetched and refreshed by one
    /// ready replica only, its owner; unset, this replica upkeeps every key.
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,
    /// The namespace of the server replicas' pods (POD_NAMESPACE from metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub replica_namespace: Option<String>,
    /// The label selector of the server replicas' pods in --replica-namespace: the ready ones
    /// share the credential keys. Empty: this replica upkeeps every key.
    #[arg(
        long,
        env = "PODIAM_REPLICA_SELECTOR",
        default_value = "app.kubernetes.io/name=podiam-server"
    )]
    pub replica_selector: String,
    /// Log format.
    #[arg(long, env = "PODIAM_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level filter (RUST_LOG wins when set).
    #[arg(long, env = "PODIAM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// The bounds of `--api-timeout`: below 3 s a watch would be made again every two seconds;
/// above 30 s a watch's failing attempts could come further apart than a stale spell lasts
/// (`watch::SPELL_OVER_AFTER`).
const MIN_API_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_API_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts per STS call while STS is unavailable (`--sts-timeout` each).
const STS_ATTEMPTS: u32 = 3;

/// The server's configuration, checked: every flag parsed once into the value that uses it
/// ([`Config::validate`]). [`crate::Server::build`] takes nothing else.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    /// Where the gRPC service listens (bound by `main`).
    pub listen: SocketAddr,
    /// Calls a second from one node's agent (`--agent-call-rate`; 0: no limit).
    pub agent_call_rate: u32,
    /// Where /live, /ready and /metrics are served (bound by `main`).
    pub health_listen: SocketAddr,
    /// Where `main` writes the bound addresses once both are bound.
    pub listen_address_file: Option<PathBuf>,
    /// The admission webhook, when on.
    pub webhook: Option<WebhookConfig>,
    pub tls: TlsFiles,
    pub tls_reload_interval: Duration,
    pub kubeconfig: Option<PathBuf>,
    /// `--api-timeout`.
    pub api_timeout: Duration,
    /// The base ARN role names are placed under; filled in by [`crate::preflight`] when
    /// detected.
    pub base_role_arn: Option<String>,
    /// The metadata service to detect the base ARN from (`--base-role-arn-autodetect`).
    pub detect_base_arn_from: Option<String>,
    pub sts: StsOptions,
    /// Session length, served-life floor and refresh point of the credential cache.
    pub cache: CachePolicy,
    pub sessions: SessionNaming,
    pub binding: Binding,
    /// `--agent-not-ready-taint`, unless empty.
    pub agent_not_ready_taint: Option<String>,
    /// `--role-annotation`.
    pub role_annotation: String,
    /// Where the replica set comes from, when this replica shares keys with others
    /// (`--replica-name`, `--replica-namespace`, `--replica-selector`).
    pub peers: Option<crate::peers::PeerSource>,
    pub drain: Drain,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// The admission webhook's listener (bound by `main`) and what it injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub injection: crate::webhook::Injection,
}

/// How the server drains on SIGTERM (see [`crate::Server::serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// `--shutdown-delay`: still answering, not ready.
    pub delay: Duration,
    /// `--shutdown-timeout`: no longer accepting; requests under way may finish.
    pub timeout: Duration,
}

impl Config {
    /// Checks every flag and parses each once: the configuration the server runs with, or
    /// every mistake, one line each.
    pub fn validate(self) -> Result<ValidConfig, Vec<String>> {
        let mut problems = self.session_problems();
        if self.listen == self.health_listen && self.listen.port() != 0 {
            problems.push("--health-listen must differ from --listen".to_string());
        }
        let account = AgentAccount::parse(&self.agent_service_account);
        if account.is_none() {
            problems.push(format!(
                "--agent-service-account {:?} is not NAMESPACE/NAME",
                self.agent_service_account
            ));
        }
        if self.agent_token_audience.trim().is_empty() {
            problems.push("--agent-token-audience must not be empty".to_string());
        }
        if self.pod_token_audience.trim().is_empty() {
            problems.push("--pod-token-audience must not be empty".to_string());
        }
        if !crate::service::valid_qualified_key(&self.role_annotation) {
            problems.push(format!(
                "--role-annotation {:?} is not an annotation key (like iam.amazonaws.com/role)",
                self.role_annotation
            ));
        }
        if !self.agent_not_ready_taint.is_empty()
            && !crate::service::valid_qualified_key(&self.agent_not_ready_taint)
        {
            problems.push(format!(
                "--agent-not-ready-taint {:?} is not a taint key (like podiam.io/agent-not-ready), nor empty",
                self.agent_not_ready_taint
            ));
        }
        problems.extend(self.webhook_problems());
        for (flag, value) in [
            ("--replica-name", &self.replica_name),
            ("--replica-namespace", &self.replica_namespace),
        ] {
            if let Some(value) = value
                && !crate::service::valid_node_name(value)
            {
                problems.push(format!("{flag} {value:?} is not a pod or namespace name"));
            }
        }
        if (self.cluster_name.is_some() || self.session_tags_transitive) && !self.session_tags {
            problems.push(
                "--cluster-name and --session-tags-transitive need --session-tags".to_string(),
            );
        }
        if let Some(cluster) = &self.cluster_name
            && (cluster.is_empty()
                || cluster.len() > 256
                || !cluster
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:/=+-@ ".contains(c)))
        {
            problems.push(format!(
                "--cluster-name {cluster:?} is not a session tag value (1-256 of letters, digits, spaces and _.:/=+-@)"
            ));
        }
        let sessions = SessionNaming::new(&self.session_name, self.session_tags)
            .map(|naming| {
                naming.with_tag_options(self.cluster_name.clone(), self.session_tags_transitive)
            })
            .map_err(|why| problems.push(format!("--session-name {why}")))
            .ok();
        problems.extend(self.sts_problems());
        problems.extend(self.endpoint_and_interval_problems());
        match (account, sessions) {
            (Some(account), Some(sessions)) if problems.is_empty() => {
                Ok(self.into_valid(account, sessions))
            }
            _ => Err(problems),
        }
    }

    /// The admission webhook's settings.
    fn webhook_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.webhook_token_expiration < Duration::from_secs(600)
            || self.webhook_token_expiration.as_secs() > 1 << 32
        {
            problems.push(
                "--webhook-token-expiration must be at least 10m (the API server's minimum)"
                    .to_string(),
            );
        }
        if ![
            crate::webhook::ENDPOINT_URL,
            crate::webhook::ENDPOINT_URL_IPV6,
        ]
        .contains(&self.webhook_endpoint_url.as_str())
        {
            problems.push(format!(
                "--webhook-endpoint-url {:?} must be {} or {}",
                self.webhook_endpoint_url,
                crate::webhook::ENDPOINT_URL,
                crate::webhook::ENDPOINT_URL_IPV6
            ));
        }
        if let Some(webhook) = self.webhook_listen
            && webhook.port() != 0
            && (webhook == self.listen || webhook == self.health_listen)
        {
            problems.push("--webhook-listen must differ from --listen and --health-listen".into());
        }
        problems
    }

    /// The checked values, assembled.
    fn into_valid(self, account: AgentAccount, sessions: SessionNaming) -> ValidConfig {
        ValidConfig {
            listen: self.listen,
            agent_call_rate: self.agent_call_rate,
            health_listen: self.health_listen,
            listen_address_file: self.listen_address_file,
            webhook: self.webhook_listen.map(|listen| WebhookConfig {
                listen,
                injection: crate::webhook::Injection {
                    audience: self.pod_token_audience.clone(),
                    expiration_seconds: self.webhook_token_expiration.as_secs() as i64,
                    endpoint_url: self.webhook_endpoint_url.clone(),
                },
            }),
            tls: TlsFiles {
                ca: self.tls_ca,
                cert: self.tls_cert,
                key: self.tls_key,
            },
            tls_reload_interval: self.tls_reload_interval,
            kubeconfig: self.kubeconfig,
            api_timeout: self.api_timeout,
            base_role_arn: self.base_role_arn,
            detect_base_arn_from: self
                .base_role_arn_autodetect
                .then_some(self.metadata_endpoint),
            sts: StsOptions {
                region: self.region,
                endpoint: self.sts_endpoint,
                via_role: self.assume_role_arn,
                attempt_timeout: self.sts_timeout,
            },
            cache: CachePolicy {
                refresh_after: self.refresh_after,
                sts_rate: self.sts_rate,
                attempts: STS_ATTEMPTS,
                ..CachePolicy::new(self.session_duration, self.min_remaining)
            },
            sessions,
            binding: Binding {
                mode: self.node_binding,
                account,
                audience: self.agent_token_audience,
                pod_audience: self.pod_token_audience,
            },
            agent_not_ready_taint: (!self.agent_not_ready_taint.is_empty())
                .then(|| self.agent_not_ready_taint.clone()),
            role_annotation: self.role_annotation.clone(),
            peers: match (&self.replica_name, &self.replica_namespace) {
                (Some(me), Some(namespace)) if !self.replica_selector.trim().is_empty() => {
                    Some(crate::peers::PeerSource {
                        me: Some(me.clone()),
                        namespace: namespace.clone(),
                        selector: self.replica_selector.clone(),
                    })
                }
                _ => None,
            },
            drain: Drain {
                delay: self.shutdown_delay,
                timeout: self.shutdown_timeout,
            },
            log_format: self.log_format,
            log_level: self.log_level,
        }
    }

    /// The base ARN and the session's length and served-life floor.
    fn session_problems(&self) -> Vec<String> {
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
                "--min-remaining {}s must be shorter than --session-duration {}s, or no \
                 credentials could ever be served (short sessions, as kiam's and kube2iam's \
                 15 minutes: lower both, e.g. --session-duration 15m --min-remaining 10m, and \
                 the agents' --min-remaining to match; docs/migrating.md)",
                self.min_remaining.as_secs(),
                self.session_duration.as_secs()
            ));
        }
        problems
    }

    /// The refresh point, the base ARN's source, and role chaining.
    fn sts_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(after) = self.refresh_after {
            let floor_at = self.session_duration.saturating_sub(self.min_remaining);
            if after >= self.session_duration {
                problems.push(format!(
                    "--refresh-after {}s is beyond the session length (--session-duration {}s)",
                    after.as_secs(),
                    self.session_duration.as_secs()
                ));
            } else if after > floor_at {
                problems.push(format!(
                    "--refresh-after {}s leaves credentials less than --min-remaining {}s: refresh at most {}s after issue",
                    after.as_secs(),
                    self.min_remaining.as_secs(),
                    floor_at.as_secs()
                ));
            } else if after.is_zero() {
                problems.push("--refresh-after must be more than 0s".to_string());
            }
        }
        if self.base_role_arn.is_some() && self.base_role_arn_autodetect {
            problems.push(
                "--base-role-arn and --base-role-arn-autodetect exclude each other".to_string(),
            );
        }
        if let Some(via) = &self.assume_role_arn {
            if !valid_role_arn(via) {
                problems.push(format!(
                    "--assume-role-arn {via:?} is not a role ARN like arn:aws:iam::123456789012:role/NAME"
                ));
            }
            if self.session_duration > CHAINED_MAX_SESSION {
                problems.push(format!(
                    "--session-duration {}s is longer than the 3600s STS allows for sessions assumed through --assume-role-arn",
                    self.session_duration.as_secs()
                ));
            }
        }
        problems
    }

    /// URLs, the STS attempt limit, and the intervals that must not be zero.
    fn endpoint_and_interval_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.sts_timeout.is_zero() || self.sts_timeout > Duration::from_secs(60) {
            problems.push(format!(
                "--sts-timeout {}ms is outside 1ms to 60s",
                self.sts_timeout.as_millis()
            ));
        }
        if !(self.metadata_endpoint.starts_with("http://")
            || self.metadata_endpoint.starts_with("https://"))
        {
            problems.push(format!(
                "--metadata-endpoint {:?} is not an http(s) URL",
                self.metadata_endpoint
            ));
        }
        if let Some(endpoint) = &self.sts_endpoint
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            problems.push(format!("--sts-endpoint {endpoint:?} is not an http(s) URL"));
        }
        if self.api_timeout < MIN_API_TIMEOUT || self.api_timeout > MAX_API_TIMEOUT {
            problems.push(format!(
                "--api-timeout {}ms is outside 3s to 30s",
                self.api_timeout.as_millis()
            ));
        }
        if self.tls_reload_interval.is_zero() {
            problems.push("--tls-reload-interval must be more than zero".to_string());
        }
        if self.shutdown_timeout.is_zero() {
            problems.push("--shutdown-timeout must be more than zero".to_string());
        }
        problems
    }
}

/// The AWS SDK's switch that logs the bodies of answers marked sensitive — STS's
/// AssumeRole answers, the credentials the server hands out — at trace level.
pub const SDK_SENSITIVE_BODIES: &str = "LOG_SENSITIVE_BODIES";

/// What in the environment (`var` looks a variable up) would break the server's promises:
/// [`SDK_SENSITIVE_BODIES`] set to `true` would put every secret key and session token STS
/// issues in the log, once the log level reaches trace.
pub fn environment_problems(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    match var(SDK_SENSITIVE_BODIES) {
        Some(value) if value.trim().eq_ignore_ascii_case("true") => vec![format!(
            "{SDK_SENSITIVE_BODIES}=true makes the AWS SDK log the credentials STS issues; unset it"
        )],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_may_not_log_sensitive_bodies() {
        let with = |value: Option<&str>| {
            environment_problems(|name| {
                assert_eq!(name, SDK_SENSITIVE_BODIES);
                value.map(str::to_string)
            })
        };
        assert_eq!(with(None).len(), 0);
        assert_eq!(with(Some("false")).len(), 0);
        assert_eq!(with(Some("true")).len(), 1);
        assert_eq!(with(Some("TRUE")).len(), 1);
    }

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

    /// Every mistake `validate` finds (none when it succeeds).
    fn problems(config: Config) -> Vec<String> {
        config.validate().err().unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid() {
        let valid = parse(&[]).validate().expect("valid");
        assert_eq!(valid.cache.session_duration, Duration::from_secs(3600));
        assert_eq!(valid.cache.refresh_after, None);
        assert_eq!(valid.binding.account.to_string(), "podiam/podiam-agent");
        assert_eq!(valid.detect_base_arn_from, None);
        assert_eq!(
            valid.drain,
            Drain {
                delay: Duration::from_secs(3),
                timeout: Duration::from_secs(10)
            }
        );
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
            "--base-role-arn-autodetect",
            "--assume-role-arn",
            "arn:aws:iam::123456789012:user/x",
            "--sts-timeout",
            "0s",
            "--metadata-endpoint",
            "169.254.169.254",
        ]);
        let problems = problems(config);
        assert_eq!(problems.len(), 9, "{problems:#?}");
        assert!(problems.iter().all(|p| !p.contains('\n')));
    }

    #[test]
    fn the_api_timeout_is_kept_within_its_bounds() {
        for (value, wanted) in [("3s", 0), ("30s", 0), ("2999ms", 1), ("31s", 1), ("0s", 1)] {
            let config = parse(&[
                "--base-role-arn",
                "arn:aws:iam::123456789012:role/",
                "--api-timeout",
                value,
            ]);
            let found = match config.validate() {
                Ok(valid) => {
                    assert_eq!(
                        valid.api_timeout,
                        parse_duration(value).expect("a duration")
                    );
                    0
                }
                Err(problems) => {
                    assert!(problems[0].contains("--api-timeout"), "{problems:?}");
                    problems.len()
                }
            };
            assert_eq!(found, wanted, "{value}");
        }
    }

    #[test]
    fn annotation_and_taint_keys_are_qualified_names() {
        for (args, wanted) in [
            (&["--role-annotation", "example.com/iam-role"][..], 0),
            (&["--role-annotation", "iam-role"], 0),
            (&["--role-annotation", ""], 1),
            (&["--role-annotation", "a b/role"], 1),
            (&["--role-annotation", "example.com/-role"], 1),
            (&["--agent-not-ready-taint", ""], 0),
            (&["--agent-not-ready-taint", "podiam.io/x"], 0),
            (&["--agent-not-ready-taint", "podiam.io/x:NoSchedule"], 1),
        ] {
            let mut all = vec!["--base-role-arn", "arn:aws:iam::123456789012:role/"];
            all.extend(args);
            let found = match parse(&all).validate() {
                Ok(_) => 0,
                Err(problems) => problems.len(),
            };
            assert_eq!(found, wanted, "{args:?}");
        }
    }

    #[test]
    fn refresh_points_and_chained_sessions_are_checked() {
        let cases: &[(&[&str], &str)] = &[
            (&["--refresh-after", "2h"], "beyond the session length"),
            (&["--refresh-after", "45m"], "refresh at most 1800s"),
            (&["--refresh-after", "0s"], "more than 0s"),
            (
                &[
                    "--assume-role-arn",
                    "arn:aws:iam::123456789012:role/hop",
                    "--session-duration",
                    "2h",
                ],
                "3600s STS allows",
            ),
            (&["--session-name", "{name}"], "unknown placeholder"),
        ];
        for (flags, want) in cases {
            let problems = problems(parse(flags));
            assert_eq!(problems.len(), 1, "{flags:?}: {problems:#?}");
            assert!(problems[0].contains(want), "{flags:?}: {problems:#?}");
        }
        let valid = parse(&[
            "--refresh-after",
            "20m",
            "--session-name",
            "{namespace}.{pod}",
        ])
        .validate()
        .expect("valid");
        assert_eq!(valid.cache.refresh_after, Some(Duration::from_secs(1200)));
    }
}
