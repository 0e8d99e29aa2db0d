//! The gRPC service: a thin adapter between the wire and the decisions.
//!
//! Each call first learns who calls ([`crate::identity`]): an agent proven by its token, or
//! an operator authorised by a SubjectAccessReview. The decisions themselves are
//! [`podiam_policy::decision`]'s, over the view the watches keep. [`Failure`] lists every way
//! a call fails, and [`Failure::status`] is the one place that turns one into a gRPC status
//! (with its [`Reason`] for the agent). Refusals are the pods' business, logged at debug;
//! node-binding refusals are logged as warnings with the caller's proven node, agent pod
//! and peer address; credentials issued get one audit line each, never the secret.
//!
//! What callers send is checked for its shape before it is used or logged: addresses parse,
//! role names are IAM's, namespaces and pod names are Kubernetes names, node names too; a
//! request that fails is refused `invalid-argument` without quoting it. Refusal messages,
//! which may quote what STS or the API said about a caller's input, are logged
//! [`Escaped`]: no caller can end a log line and forge the next.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use podiam_policy::decision::{
    AgentAccount, BindingRefusal, Decision, ExplainTarget, PodTokenRefusal, ProvenAgent, Refusal,
    ReviewedUser, Scope, View, bind_agent, pod_ref, prove_pod,
};
use podiam_policy::index::{ByUid, PodRecord};
use podiam_policy::policy::Role;
use podiam_proto::v1::{
    AgentStatus, Credentials, ExplainRequest, ExplainResponse, GetCredentialsRequest,
    GetCredentialsResponse, GetPodRoleRequest, GetPodRoleResponse, HealthRequest, HealthResponse,
    NodeEvent, NodeReadyRequest, NodeReadyResponse, StatusRequest, StatusResponse,
    WatchNodeRequest, explain_request, node_event, podiam_server::Podiam,
};
use podiam_proto::{InvalidIp, Reason, valid_role_name};
use podiam_runtime::clock::now_unix;
use podiam_runtime::telemetry::Escaped;
use podiam_runtime::telemetry::LogThrottle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::buckets::KeyedBuckets;
use crate::events::{Events, Notice};
use crate::identity::{Access, Asker, Identities, Review, bearer};
use crate::session::SessionNaming;
use crate::sts::{CacheKey, CredentialCache, Issued, KeyHealth, StsError};
use crate::watch::Cluster;

/// What node binding does with an agent call it cannot prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BindingMode {
    /// Refuse it (the default).
    Enforce,
    /// Log and count it, and answer as if it were proven (for migrating a live cluster:
    /// roll out agents with tokens, watch the refusals metric fall to zero, then enforce).
    Warn,
}

/// How agents prove their node.
#[derive(Clone, Debug)]
pub struct Binding {
    pub mode: BindingMode,
    /// The ServiceAccount agents run as.
    pub account: AgentAccount,
    /// The audience of agents' projected tokens.
    pub audience: String,
    /// The audience of the tokens pods present at the container-credentials endpoint.
    pub pod_audience: String,
}

/// Every way a call fails.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Sts(#[from] StsError),
    #[error("{0}")]
    Binding(BindingFailure),
    #[error("{0}")]
    Operator(OperatorFailure),
    /// A request's address is not one: the caller's mistake, not a refusal.
    #[error("{0}")]
    BadIp(#[from] InvalidIp),
    #[error("{0}")]
    BadRequest(String),
    /// The pod's own token does not prove the pod at the address.
    #[error("{0}")]
    PodToken(#[from] PodTokenRefusal),
    /// The pod's own token could not be checked now.
    #[error("the pod's token cannot be checked now: {0}")]
    PodTokenUnavailable(String),
}

/// Why an agent call proves no node.
#[derive(Debug, thiserror::Error)]
pub enum BindingFailure {
    #[error("agent calls need the podiam CA's client certificate")]
    NoCertificate,
    #[error(
        "agent calls need the agent's projected service account token (authorization metadata)"
    )]
    NoToken,
    #[error("the agent's token is not accepted: {0}")]
    BadToken(String),
    #[error("the token proves no agent: {0}")]
    NotAgent(BindingRefusal),
    #[error("the agent's token cannot be checked now: {0}")]
    Unavailable(String),
    #[error("this agent runs on node {proven}; it may not follow node {asked:?}")]
    OtherNodeStream { proven: String, asked: String },
    #[error("the agent's pod {0} is gone")]
    AgentGone(String),
}

impl BindingFailure {
    /// The metric label.
    fn label(&self) -> &'static str {
        match self {
            BindingFailure::NoCertificate => "no-certificate",
            BindingFailure::NoToken => "no-token",
            BindingFailure::BadToken(_) => "bad-token",
            BindingFailure::NotAgent(_) | BindingFailure::AgentGone(_) => "not-agent",
            BindingFailure::Unavailable(_) => "review-unavailable",
            BindingFailure::OtherNodeStream { .. } => "other-node",
        }
    }
}

/// Why an operator call is refused.
#[derive(Debug, thiserror::Error)]
pub enum OperatorFailure {
    #[error(
        "explain and status need your Kubernetes credentials: a bearer token (kubeconfig token, tokenFile or exec plugin)"
    )]
    NoToken,
    #[error("the Kubernetes API does not accept your token: {0}")]
    BadToken(String),
    #[error("agent tokens may not call explain or status")]
    AgentToken,
    #[error("{user:?} may not {access}, which this needs (give it the podiam-operator ClusterRole){}", why_suffix(.why))]
    Forbidden {
        user: String,
        access: Access,
        why: String,
    },
    #[error("your permissions cannot be checked now: {0}")]
    Unavailable(String),
}

fn why_suffix(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(": {why}")
    }
}

impl Failure {
    /// The one mapping from failures to gRPC statuses.
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Failure::BadRequest(_) | Failure::BadIp(_) => Status::invalid_argument(message),
            Failure::Refused(refusal) => refusal.reason().status(message),
            Failure::Sts(error) => {
                let mut status = sts_reason(error).status(error.public());
                if matches!(error, StsError::Throttled(_)) {
                    status.metadata_mut().insert(
                        podiam_proto::STS_THROTTLED_METADATA_KEY,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                }
                status
            }
            Failure::Binding(BindingFailure::Unavailable(_)) => {
                Reason::IdentityUnavailable.status(message)
            }
            Failure::Binding(BindingFailure::OtherNodeStream { .. }) => {
                Reason::OtherNode.status(message)
            }
            Failure::Binding(_) => Reason::AgentUnauthenticated.status(message),
            Failure::PodToken(_) => Reason::PodTokenRefused.status(message),
            Failure::PodTokenUnavailable(_) => Reason::IdentityUnavailable.status(message),
            Failure::Operator(failure) => match failure {
                OperatorFailure::NoToken | OperatorFailure::BadToken(_) => {
                    Status::unauthenticated(message)
                }
                OperatorFailure::AgentToken | OperatorFailure::Forbidden { .. } => {
                    Status::permission_denied(message)
                }
                OperatorFailure::Unavailable(_) => Status::unavailable(message),
            },
        }
    }
}

/// The reason an STS failure is refused for.
fn sts_reason(error: &StsError) -> Reason {
    match error {
        StsError::Refused { .. } => Reason::StsRefused,
        StsError::Unavailable(_) | StsError::Throttled(_) => Reason::StsUnavailable,
    }
}

/// Who an agent call comes from.
#[derive(Clone, Debug)]
enum Caller {
    /// Proven by its token.
    Agent(ProvenAgent),
    /// Not proven, answered anyway (`--node-binding warn`).
    Unproven,
}

impl Caller {
    fn scope(&self) -> Scope<'_> {
        match self {
            Caller::Agent(agent) => Scope::Node(&agent.node),
            Caller::Unproven => Scope::Cluster,
        }
    }

    fn node(&self) -> &str {
        match self {
            Caller::Agent(agent) => &agent.node,
            Caller::Unproven => "",
        }
    }

    fn pod(&self) -> &str {
        match self {
            Caller::Agent(agent) => &agent.pod,
            Caller::Unproven => "",
        }
    }
}

/// Settings the service needs besides the cluster view and the cache.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub base_arn: Option<String>,
    pub sessions: SessionNaming,
    pub binding: Binding,
}

/// The podiam gRPC service.
#[derive(Debug, Clone)]
pub struct PodiamService {
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    settings: ServiceSettings,
    events: Arc<Events>,
    identities: Arc<Identities>,
    /// Cancelled when the replica starts shutting down: Health says draining and node
    /// streams end, so agents move elsewhere.
    draining: CancellationToken,
    /// Node streams open on this replica.
    node_streams: Gauge,
    /// The agents those streams serve, by stream.
    agents: Arc<Mutex<HashMap<u64, AgentStatus>>>,
    /// Node streams open, per caller and in all, within their caps.
    slots: Arc<Mutex<StreamSlots>>,
    /// The tasks serving node streams, so that the server waits for them (they end when
    /// draining starts) before it says it has stopped.
    streams: TaskTracker,
    /// Agents' NodeReady reports: the agent-not-ready taint they lift.
    readiness: crate::nodes::NodeReadiness,
    /// Refused agent calls, logged once per reason and address (other-node: per agent node)
    /// a minute: any holder of an agent certificate can make them as fast as it likes, and
    /// choose the pod addresses it asks about.
    refusals_logged: Arc<LogThrottle<(&'static str, String)>>,
    /// Node streams opened and closed, logged at info once per agent and event a minute (at
    /// debug after that): an agent's certificate and token can open and close streams in a
    /// loop.
    streams_logged: Arc<LogThrottle<(&'static str, String)>>,
    /// This replica's name in the replica set (Health tells agents), if it has one.
    replica: Option<Arc<str>>,
    /// Calls per proven agent's node ([`NODE_CALL_BURST_SECONDS`]; none: no limit), and
    /// those refused for it.
    node_calls: Option<Arc<Mutex<KeyedBuckets>>>,
    node_calls_limited: Counter,
}

/// The calls one node's agent may make to a replica at once are this many seconds' worth of
/// its rate (`--agent-call-rate`, calls a second; GetCredentials, GetPodRole, NodeReady), when
/// one is set: the holder of one node's certificate and token, which already opens that
/// node's pods' roles, then cannot take every replica's time from the other nodes' agents.
/// Over it, calls are shed (`ResourceExhausted` without a reason: the agent asks another
/// replica, then answers 503).
pub const NODE_CALL_BURST_SECONDS: u32 = 5;
/// Nodes whose call buckets are kept (a cluster has at most 5000 nodes).
const NODE_CALL_BUCKETS: usize = 16_384;

/// Longest pod token accepted: projected tokens are about 1 KiB; this bounds what one call
/// can make the server hash and send to the API.
pub const MAX_POD_TOKEN_BYTES: usize = 16 * 1024;

/// Most node streams one agent may hold on one replica. An agent needs one; a restarted
/// agent's old stream lingers until HTTP/2 keep-alive notices (15 s), a rolling update runs
/// two agents (two pods) side by side.
pub const MAX_STREAMS_PER_AGENT: usize = 4;
/// Most node streams one replica serves in all: two per node of a 5000-node cluster whose
/// other replicas are down.
pub const MAX_NODE_STREAMS: usize = 10_000;
/// Most agents a Status answer lists (sorted by node); `agents_total` says how many there
/// are. Keeps the answer well under gRPC's 4 MiB message limit.
pub const MAX_STATUS_AGENTS: usize = 5_000;

/// Node streams open per caller (a proven agent's pod UID, or an unproven caller's address)
/// and in all.
#[derive(Debug, Default)]
pub struct StreamSlots {
    by_caller: HashMap<String, usize>,
    total: usize,
}

impl StreamSlots {
    /// Takes a slot for `caller`, or says which cap is reached.
    pub fn take(&mut self, caller: &str) -> Result<(), &'static str> {
        if self.total >= MAX_NODE_STREAMS {
            return Err("this replica serves as many node streams as it may");
        }
        let held = self.by_caller.entry(caller.to_string()).or_default();
        if *held >= MAX_STREAMS_PER_AGENT {
            return Err("this agent holds as many node streams as it may");
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives `caller`'s slot back.
    pub fn give_back(&mut self, caller: &str) {
        if let Some(held) = self.by_caller.get_mut(caller) {
            *held -= 1;
            if *held == 0 {
                self.by_caller.remove(caller);
            }
            self.total -= 1;
        }
    }
}

/// Numbers the node streams (for the agents' registry).
static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

/// How often a node stream carries a heartbeat, whatever else it carries. Agents treat three
/// missed heartbeats as a hung replica, so a stopped or frozen replica is left within a few
/// seconds.
pub const NODE_STREAM_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long an agent call whose token names a pod this server has not seen yet waits for
/// the watch to bring it: a new agent pod calls within moments of starting, and the API's
/// watch delivers the pod within a fraction of a second. Under the agent's 900 ms call
/// deadline (`--server-timeout`), so the agent hears the refusal rather than a time-out.
const AGENT_POD_WAIT: std::time::Duration = std::time::Duration::from_millis(800);
/// Refused agent calls are logged once per reason and caller in this long.
const REFUSALS_LOGGED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest agent version kept for the status view; longer ones are cut.
const MAX_AGENT_VERSION: usize = 64;
/// How many times one request fetches credentials again because the pod's session (name,
/// external ID, tags) changed while STS answered, before it is answered unavailable.
const SESSION_CHANGES_FOLLOWED: usize = 2;

/// An agent's version as the status view keeps it: printable characters only (operators'
/// terminals show it), at most [`MAX_AGENT_VERSION`] of them.
fn agent_version(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_AGENT_VERSION)
        .collect()
}

/// What credential upkeep learns from one pass over every live pod.
#[derive(Debug, Default)]
pub struct Survey {
    /// The credential keys live, permitted pods need.
    pub needed: HashSet<CacheKey>,
    /// Live pods sharing their IP with another live pod (all of them refused).
    pub duplicate_ip_pods: usize,
}

/// Whether `name` is a valid Kubernetes node name (a DNS-1123 subdomain).
pub fn valid_node_name(name: &str) -> bool {
    dns_subdomain(name)
}

/// Whether `key` is a Kubernetes qualified name, as taint, label and annotation keys are: an
/// optional DNS-subdomain prefix and `/`, then a name of at most 63 letters, digits, `-`, `_`
/// and `.`, alphanumeric at both ends.
pub fn valid_qualified_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let alphanumeric = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    prefix.is_none_or(dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && alphanumeric(name.bytes().next())
        && alphanumeric(name.bytes().last())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain: what Kubernetes requires of node and pod names.
fn dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(dns_label)
}

/// A DNS-1123 label: what Kubernetes requires of namespace names.
fn dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// What an Explain asks about, its names checked: a namespace is a DNS-1123 label and a pod
/// name a DNS-1123 subdomain, as Kubernetes has them. Otherwise why the request is malformed,
/// without quoting it (an address is quoted escaped).
fn explain_target(request: ExplainRequest) -> Result<ExplainTarget, String> {
    match request.target {
        Some(explain_request::Target::Ip(ip)) => podiam_proto::parse_ip(&ip)
            .map(ExplainTarget::Ip)
            .map_err(|error| error.to_string()),
        Some(explain_request::Target::Pod(pod)) => {
            if !dns_label(&pod.namespace) {
                return Err(
                    "the namespace is not a Kubernetes namespace name (a DNS-1123 label)".into(),
                );
            }
            if !dns_subdomain(&pod.name) {
                return Err(
                    "the pod name is not a Kubernetes pod name (a DNS-1123 subdomain)".into(),
                );
            }
            Ok(ExplainTarget::Pod {
                namespace: pod.namespace,
                name: pod.name,
            })
        }
        None => Err("explain needs an ip or a pod".into()),
    }
}

impl PodiamService {
    pub fn new(
        cluster: Arc<Cluster>,
        cache: Arc<CredentialCache>,
        settings: ServiceSettings,
        events: Arc<Events>,
        identities: Arc<Identities>,
    ) -> Self {
        PodiamService {
            cluster,
            cache,
            settings,
            events,
            identities,
            draining: CancellationToken::new(),
            node_streams: Gauge::default(),
            agents: Arc::default(),
            slots: Arc::default(),
            streams: TaskTracker::new(),
            refusals_logged: Arc::new(LogThrottle::new(REFUSALS_LOGGED_EVERY)),
            streams_logged: Arc::new(LogThrottle::new(REFUSALS_LOGGED_EVERY)),
            readiness: crate::nodes::NodeReadiness::new(None, None, Counter::default()),
            replica: None,
            node_calls: None,
            node_calls_limited: Counter::default(),
        }
    }

    /// Limits each node's agent to `per_second` calls a second to this replica (0: no
    /// limit), counting the calls shed in `limited`.
    pub fn with_node_call_limit(mut self, per_second: u32, limited: Counter) -> Self {
        self.node_calls = (per_second > 0).then(|| {
            Arc::new(Mutex::new(KeyedBuckets::new(
                per_second.saturating_mul(NODE_CALL_BURST_SECONDS),
                f64::from(per_second),
                NODE_CALL_BUCKETS,
            )))
        });
        self.node_calls_limited = limited;
        self
    }

    /// Names the replica in Health answers: agents send each pod's calls first to the
    /// replica that owns its credential key ([`crate::peers`]).
    pub fn with_replica_name(mut self, name: Option<&str>) -> Self {
        self.replica = name.map(Arc::from);
        self
    }

    /// Lifts nodes' agent-not-ready taint when their agents report their rules in place.
    pub fn with_node_readiness(mut self, readiness: crate::nodes::NodeReadiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Waits until every node stream's task has ended (after draining started, they do).
    pub async fn streams_ended(&self) {
        self.streams.close();
        self.streams.wait().await;
    }

    /// Ties the service to the server's shutdown (`draining`) and counts its node streams in
    /// `node_streams`.
    pub fn with_lifecycle(mut self, draining: CancellationToken, node_streams: Gauge) -> Self {
        self.draining = draining;
        self.node_streams = node_streams;
        self
    }

    /// Runs `f` over the current view of the cluster.
    fn with_view<R>(&self, f: impl FnOnce(View<'_>) -> R) -> R {
        let pods = self.cluster.pods();
        let namespaces = self.cluster.namespaces();
        let accounts = self.cluster.accounts();
        f(View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: self.cluster.synced(),
            base_arn: self.settings.base_arn.as_deref(),
        })
    }

    /// Who an agent call comes from: its client certificate, then its token, then the pod
    /// the token is bound to in this server's view. With `--node-binding warn`, a call that
    /// proves nothing is logged, counted and answered.
    async fn agent<T>(&self, request: &Request<T>, call: &'static str) -> Result<Caller, Status> {
        let peer = request.remote_addr();
        // The TLS layer checked any certificate presented; agent calls must present one.
        let certified = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        // Before its first list, this server knows no agent pod to bind a token to: it is not
        // ready (the agent asks another replica), which is not the agent's identity refused.
        if certified && !self.cluster.synced() {
            return Err(Reason::NotReady.status("the server has not yet listed the cluster"));
        }
        let proven = if certified {
            self.prove(request.metadata(), peer.map(|p| p.ip().to_canonical()))
                .await
        } else {
            Err(BindingFailure::NoCertificate)
        };
        match proven {
            Ok(agent) => Ok(Caller::Agent(agent)),
            Err(failure) => {
                self.identities.counters().refused(failure.label());
                let no_certificate = matches!(failure, BindingFailure::NoCertificate);
                let warn_only = self.settings.binding.mode == BindingMode::Warn && !no_certificate;
                let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                let why = Escaped(&failure);
                if no_certificate {
                    // Anyone who reaches the port can make these, as fast as they like: counted
                    // (podiam_server_agent_calls_refused_total), not logged above debug.
                    tracing::debug!(call, peer, %why, "agent call without a client certificate");
                } else if let Some(held_back) = self.log_refusal(
                    failure.label(),
                    request
                        .remote_addr()
                        .map(|p| p.ip().to_canonical().to_string())
                        .unwrap_or_default(),
                ) {
                    tracing::warn!(
                        call,
                        peer,
                        %why,
                        answered = warn_only,
                        held_back,
                        "agent call not proven by node binding"
                    );
                }
                if warn_only {
                    Ok(Caller::Unproven)
                } else {
                    Err(Failure::Binding(failure).status())
                }
            }
        }
    }

    /// The agent the request's token (from `peer`) proves.
    async fn prove(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<IpAddr>,
    ) -> Result<ProvenAgent, BindingFailure> {
        let token = bearer(metadata).ok_or(BindingFailure::NoToken)?;
        // Only the spelling the API server issues: each other spelling of one token would be
        // reviewed, and remembered, as a token of its own.
        podiam_runtime::jwt::payload(token).map_err(|why| BindingFailure::BadToken(why.into()))?;
        let audiences = [self.settings.binding.audience.clone()];
        let asker = peer.map(Asker::Address);
        let user = match self.identities.review_from(token, &audiences, asker).await {
            Ok(Review::Authenticated(user)) => user,
            Ok(Review::Unauthenticated(why)) => return Err(BindingFailure::BadToken(why)),
            Err(error) => return Err(BindingFailure::Unavailable(error.0)),
        };
        // A new agent's first calls can come before this server's watch has seen its pod:
        // the view is given a moment to catch up before the agent is refused.
        let account = &self.settings.binding.account;
        let deadline = tokio::time::Instant::now() + AGENT_POD_WAIT;
        let mut changes = self.cluster.subscribe();
        loop {
            changes.mark_unchanged();
            let bound = bind_agent(&self.cluster.pods(), account, &user);
            match bound {
                Err(BindingRefusal::UnknownPod { .. })
                    if tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_ok_and(|changed| changed.is_ok()) => {}
                Ok(agent) => {
                    self.identities.keep(token, &audiences, &agent.node);
                    return Ok(agent);
                }
                Err(refusal) => return Err(BindingFailure::NotAgent(refusal)),
            }
        }
    }

    /// The node of the proven agent whose call has these headers, from what this server
    /// already knows (its token's review remembered, its pod running in the view); `None`
    /// for anyone else, and while the token is not yet reviewed. The gRPC port's reading
    /// bounds share places by it ([`podiam_runtime::reading`]).
    pub fn proven_node(&self, headers: &http::HeaderMap) -> Option<Arc<str>> {
        let token = crate::identity::bearer_header(headers)?;
        let audiences = [self.settings.binding.audience.clone()];
        let user = self.identities.remembered_user(token, &audiences)?;
        let agent = bind_agent(&self.cluster.pods(), &self.settings.binding.account, &user);
        agent.ok().map(|agent| Arc::from(agent.node))
    }

    /// Reviews, in the background, the agent token of a certified call refused for want of
    /// a place among callers not yet proven ([`podiam_runtime::reading`]), within `address`'s
    /// share of reviews (as its call would have been): an agent whose token is new to this
    /// server while others fill those places has its next call read in its node's. A token
    /// already reviewed (whatever the answer) or under review is not asked about again.
    pub fn learn(&self, headers: &http::HeaderMap, address: IpAddr) {
        let Some(token) = crate::identity::bearer_header(headers) else {
            return;
        };
        if podiam_runtime::jwt::payload(token).is_err() {
            return;
        }
        let audiences = [self.settings.binding.audience.clone()];
        let asker = Some(Asker::Address(address.to_canonical()));
        // Begun here, not in a task of its own: a token remembered or under review costs
        // nothing more, however many calls bring it (the review records itself).
        let _ = self.identities.begin_review(token, &audiences, asker);
    }

    /// [`PodiamService::agent`] for a call counted against the node's share of this replica
    /// (`--agent-call-rate`): GetCredentials, GetPodRole, NodeReady. A node stream is not
    /// counted (the streams an agent may hold are capped), so that a node's agent over its
    /// share still follows its node and answers from its cache.
    async fn counted_agent<T>(
        &self,
        request: &Request<T>,
        call: &'static str,
    ) -> Result<Caller, Status> {
        let caller = self.agent(request, call).await?;
        if let Caller::Agent(agent) = &caller {
            self.within_node_rate(&agent.node, call)?;
        }
        Ok(caller)
    }

    /// Refuses a call of `node`'s agent over the node's share of this replica
    /// (`--agent-call-rate`): counted, logged once a minute per node.
    fn within_node_rate(&self, node: &str, call: &'static str) -> Result<(), Status> {
        let Some(node_calls) = &self.node_calls else {
            return Ok(());
        };
        let now = self.cache.now_ms();
        let admitted = node_calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(now, node);
        if admitted {
            return Ok(());
        }
        self.node_calls_limited.inc();
        if let Some(held_back) = self.log_refusal("node-rate", node.to_string()) {
            tracing::warn!(
                call,
                node,
                held_back,
                "an agent's calls over its node's share of this replica; shed"
            );
        }
        Err(Status::resource_exhausted(
            "this node's agent is over its share of this replica's calls; ask another",
        ))
    }

    /// Whether a refused agent call, for `reason` from `whom`, is to be logged: the first of
    /// each in a minute is (`Some`: lines not logged in the minute before), the rest only
    /// counted (`podiam_server_agent_calls_refused_total`).
    fn log_refusal(&self, reason: &'static str, whom: String) -> Option<u64> {
        self.refusals_logged
            .admit((reason, whom), std::time::Instant::now())
    }

    /// The decision for `ip` as `caller` may have it. A pod on another node is refused (and
    /// counted and logged with the caller's proven identity); with `--node-binding warn` it
    /// is counted and logged, then answered.
    fn decide(
        &self,
        ip: IpAddr,
        caller: &Caller,
        peer: Option<SocketAddr>,
        call: &'static str,
    ) -> Result<Decision, Refusal> {
        let decided = self.with_view(|view| view.decide(ip, caller.scope()));
        match decided {
            Err(refusal @ Refusal::OtherNode { .. }) => {
                self.identities.counters().refused("other-node");
                let warn_only = self.settings.binding.mode == BindingMode::Warn;
                if let Some(held_back) = self.log_refusal(
                    "other-node",
                    match caller.node() {
                        "" => peer.map(|p| p.ip().to_canonical().to_string()),
                        node => Some(node.to_string()),
                    }
                    .unwrap_or_default(),
                ) {
                    tracing::warn!(
                        call,
                        %ip,
                        agent_node = %caller.node(),
                        agent_pod = %caller.pod(),
                        peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
                        answered = warn_only,
                        held_back,
                        "agent asked about a pod on another node"
                    );
                }
                if warn_only {
                    self.with_view(|view| view.decide(ip, Scope::Cluster))
                } else {
                    Err(refusal)
                }
            }
            other => other,
        }
    }

    async fn credentials(
        &self,
        caller: &Caller,
        peer: Option<SocketAddr>,
        request: GetCredentialsRequest,
    ) -> Result<GetCredentialsResponse, Failure> {
        let ip = podiam_proto::parse_ip(&request.ip)?;
        // No token: the pod is known by its address alone (the metadata endpoint).
        let by_address = request.pod_token.is_empty();
        // A pod proving itself with its token asks for its own role, whatever it is.
        let own_role = request.role_name.is_empty() && !by_address;
        if !own_role && !valid_role_name(&request.role_name) {
            return Err(Failure::BadRequest(
                "role_name is not an IAM role name (1 to 64 of A-Z a-z 0-9 + = , . @ _ -)".into(),
            ));
        }
        let decision = self.decide(ip, caller, peer, "GetCredentials")?;
        let decision = if by_address {
            self.with_view(|view| view.by_address(decision))?
        } else {
            decision
        };
        let Decision { pod, role, source } = decision;
        if !own_role && request.role_name != role.name {
            return Err(Refusal::WrongRole {
                pod: format!("{}/{}", pod.namespace, pod.name),
                asked: request.role_name,
                actual: role.name,
            }
            .into());
        }
        let identity = if by_address {
            "address"
        } else {
            // A proven agent's pod tokens take its node's share, from whichever address.
            let from = match caller {
                Caller::Agent(agent) => Some(Asker::Node(Arc::from(agent.node.as_str()))),
                Caller::Unproven => peer.map(|p| Asker::Address(p.ip().to_canonical())),
            };
            self.prove_pod_token(&pod, &request.pod_token, from).await?;
            "address and token"
        };
        let (issued, key) = self.fetch_granted(ip, &pod, &role, by_address).await?;
        tracing::info!(
            target: "podiam::audit",
            pod = %pod.name,
            namespace = %pod.namespace,
            role = %role.arn,
            role_source = source.as_str(),
            session = %key.session_name,
            access_key_id = %issued.access_key_id,
            expiration = issued.expiration_unix,
            agent_node = %caller.node(),
            agent_pod = %caller.pod(),
            peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
            identity,
            "credentials issued"
        );
        let valid_for_ms = issued.valid_for_ms(self.cache.now_ms());
        Ok(GetCredentialsResponse {
            pod: Some(pod_ref(&pod)),
            credential_key: key.digest(),
            credentials: Some(Credentials {
                access_key_id: issued.access_key_id,
                secret_access_key: issued.secret_access_key,
                session_token: issued.session_token,
                expiration_unix: issued.expiration_unix,
                issued_unix: issued.issued_unix,
                role_arn: role.arn,
                valid_for_ms,
            }),
        })
    }

    /// `pod`'s credentials for `role`, fetched (or found) for its session and handed out
    /// only if the grant still stands when they arrive ([`PodiamService::still_granted`]). A session
    /// that changed meanwhile (name, external ID, tags) is fetched in turn.
    async fn fetch_granted(
        &self,
        ip: IpAddr,
        pod: &PodRecord,
        role: &Role,
        by_address: bool,
    ) -> Result<(Issued, CacheKey), Failure> {
        let mut key = self.cache_key(pod, &role.arn);
        let mut fetches = 0;
        loop {
            let issued = match self.cache.get(key.clone(), &pod.namespace).await {
                Ok(issued) => issued,
                Err(error) => {
                    self.events
                        .report(notice(pod, sts_reason(&error), error.public()));
                    return Err(Failure::Sts(error));
                }
            };
            let now = self.still_granted(ip, pod, role, by_address)?;
            if now == key {
                return Ok((issued, key));
            }
            fetches += 1;
            if fetches > SESSION_CHANGES_FOLLOWED {
                return Err(Failure::Sts(StsError::Unavailable(
                    "the pod's session kept changing while STS answered; ask again".into(),
                )));
            }
            key = now;
        }
    }

    /// Whether the grant decided for `pod` (`role`) still stands, decided again now that its
    /// credentials are here: a TokenReview or an STS call may take seconds, and meanwhile the
    /// role may have been revoked, the namespace's permission narrowed, or the pod deleted and
    /// its address given to another. Credentials are handed out only if the same pod still
    /// holds the address with the same role; otherwise the request gets what it would get if
    /// it arrived now (the refusal, or the pod's role is not the one fetched). The caller's
    /// node was checked before: a pod never moves to another node, so the same pod is still
    /// on it. `by_address`: the request proves the pod by its address alone, which the pod's
    /// namespace may have come to refuse meanwhile ([`View::by_address`]). The session the
    /// pod's credentials are for now.
    fn still_granted(
        &self,
        ip: IpAddr,
        pod: &PodRecord,
        role: &Role,
        by_address: bool,
    ) -> Result<CacheKey, Refusal> {
        // On the pod's node, as the agent asked: another node's claim of the address
        // (stale, or written with its kubelet's credentials) cannot refuse it here either.
        let scope = pod.node_name.as_deref().map_or(Scope::Cluster, Scope::Node);
        let now = self.with_view(|view| {
            let decided = view.decide(ip, scope)?;
            if by_address {
                view.by_address(decided)
            } else {
                Ok(decided)
            }
        })?;
        if now.pod.uid != pod.uid {
            return Err(Refusal::AddressTaken {
                pod: format!("{}/{}", pod.namespace, pod.name),
                ip,
            });
        }
        if now.role.arn != role.arn {
            return Err(Refusal::WrongRole {
                pod: format!("{}/{}", pod.namespace, pod.name),
                asked: role.name.clone(),
                actual: now.role.name,
            });
        }
        Ok(self.cache_key(&now.pod, &now.role.arn))
    }

    /// Whether `token`, presented by the pod at the request's address, proves `pod`: the API
    /// accepts it for the pods' audience (a review remembered for the token's life), and it
    /// is bound to that very pod ([`prove_pod`]). A token of a deleted pod stops at once: the
    /// pod is no longer the one at the address. `from`: whose share of the reviews a new token
    /// takes (the proven agent's node).
    async fn prove_pod_token(
        &self,
        pod: &PodRecord,
        token: &str,
        from: Option<Asker>,
    ) -> Result<(), Failure> {
        if token.len() > MAX_POD_TOKEN_BYTES {
            return Err(Failure::BadRequest(format!(
                "pod_token is over {MAX_POD_TOKEN_BYTES} bytes"
            )));
        }
        if let Err(why) = podiam_runtime::jwt::payload(token) {
            return Err(Failure::BadRequest(format!("pod_token: {why}")));
        }
        let audiences = [self.settings.binding.pod_audience.clone()];
        let user = match self.identities.review_from(token, &audiences, from).await {
            Ok(Review::Authenticated(user)) => user,
            Ok(Review::Unauthenticated(why)) => {
                return Err(PodTokenRefusal::NotAccepted(why).into());
            }
            Err(error) => return Err(Failure::PodTokenUnavailable(error.0)),
        };
        Ok(prove_pod(pod, &user)?)
    }

    /// The user an operator call comes from, if the API accepts their token and they may
    /// do `access`.
    async fn operator(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<ReviewedUser, OperatorFailure> {
        let token = bearer(metadata).ok_or(OperatorFailure::NoToken)?;
        // No audience: the API server's own, which users' credentials are for. Agents'
        // tokens are for another audience and are not accepted here.
        let user = match self.identities.review_operator(token).await {
            Ok(Review::Authenticated(user)) => user,
            Ok(Review::Unauthenticated(why)) => return Err(OperatorFailure::BadToken(why)),
            Err(error) => return Err(OperatorFailure::Unavailable(error.0)),
        };
        if user.username == self.settings.binding.account.username() {
            return Err(OperatorFailure::AgentToken);
        }
        Ok(user)
    }

    async fn authorize(&self, user: &ReviewedUser, access: Access) -> Result<(), OperatorFailure> {
        match self.identities.may(user, &access).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(OperatorFailure::Forbidden {
                user: user.username.clone(),
                access,
                why,
            }),
            Err(error) => Err(OperatorFailure::Unavailable(error.0)),
        }
    }

    /// Explains the decision for an IP or a named pod, for an operator who may see it: `get
    /// pods` in the pod's namespace, or `list pods` cluster-wide when no single pod is
    /// concerned.
    async fn explain_for(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: ExplainRequest,
    ) -> Result<ExplainResponse, Failure> {
        let user = self.operator(metadata).await.map_err(Failure::Operator)?;
        let target = explain_target(request).map_err(Failure::BadRequest)?;
        let access = match &target {
            ExplainTarget::Pod { namespace, name } => Access {
                verb: "get",
                resource: "pods",
                namespace: Some(namespace.clone()),
                name: Some(name.clone()),
            },
            ExplainTarget::Ip(_) => Access::LIST_PODS,
        };
        self.authorize(&user, access)
            .await
            .map_err(Failure::Operator)?;
        Ok(self.with_view(|view| view.explain(&target))?)
    }

    /// One pass over every live pod: the credential keys permitted pods need (for prefetch
    /// and upkeep), and an Event for each pod refused for a reason its owners can fix — a
    /// role not permitted or invalid, an IP shared with another pod, STS refusing or failing
    /// its role. Pods without a role annotation are not refused in any way worth telling.
    pub fn survey(&self) -> Survey {
        let mut survey = Survey::default();
        let mut notices = Vec::new();
        // Each permitted pod with the number of its key: pods sharing a session hold no copy
        // of its key each (100k pods, a few hundred keys).
        let mut permitted: Vec<(Arc<PodRecord>, usize)> = Vec::new();
        let mut keys: Vec<CacheKey> = Vec::new();
        let mut numbers: HashMap<CacheKey, usize> = HashMap::new();
        self.with_view(|view| {
            for pod in view.pods.on_node("") {
                match view.decide_live(&pod) {
                    Ok(Decision { pod, role, .. }) => {
                        let key = self.cache_key(&pod, &role.arn);
                        let n = match numbers.get(&key) {
                            Some(&n) => n,
                            None => {
                                keys.push(key.clone());
                                numbers.insert(key, keys.len() - 1);
                                keys.len() - 1
                            }
                        };
                        permitted.push((pod, n));
                    }
                    Err(refusal) => {
                        if matches!(refusal, Refusal::AmbiguousPod { .. }) {
                            survey.duplicate_ip_pods += 1;
                        }
                        if matches!(
                            refusal,
                            Refusal::AmbiguousPod { .. }
                                | Refusal::NotPermitted { .. }
                                | Refusal::InvalidRole { .. }
                        ) {
                            notices.push(notice(&pod, refusal.reason(), refusal.to_string()));
                        }
                    }
                }
            }
        });
        drop(numbers);
        // A key being fetched right now keeps its pods' memory of what they were told.
        let health: Vec<KeyHealth> = keys.iter().map(|key| self.cache.health(key)).collect();
        let mut keep: HashSet<&str> = HashSet::new();
        for (pod, n) in &permitted {
            match &health[*n] {
                KeyHealth::Fine => {}
                KeyHealth::Busy => {
                    keep.insert(&pod.uid);
                }
                KeyHealth::Failing(error) => {
                    notices.push(notice(pod, sts_reason(error), error.public()));
                }
            }
        }
        survey.needed = keys.into_iter().collect();
        keep.extend(notices.iter().map(|n| n.uid.as_str()));
        self.events.retain(&keep);
        for notice in notices {
            self.events.report(notice);
        }
        survey
    }

    /// The node whose stream `caller` may follow, asking for `asked`, and the agent it is
    /// proven to be: its own node, or (with `--node-binding warn`, or unproven) the node it
    /// asks for. Another node's stream is refused to a proven agent, counted and logged.
    fn stream_node(
        &self,
        caller: Caller,
        asked: &str,
        peer: Option<SocketAddr>,
    ) -> Result<(String, Option<ProvenAgent>), Status> {
        match caller {
            Caller::Agent(agent) if agent.node == asked => Ok((agent.node.clone(), Some(agent))),
            Caller::Agent(agent) => {
                let answered = self.settings.binding.mode == BindingMode::Warn;
                let failure = self.other_node(&agent, asked, peer, "stream", answered);
                if !answered {
                    return Err(Failure::Binding(failure).status());
                }
                Ok((asked.to_string(), None))
            }
            Caller::Unproven => Ok((asked.to_string(), None)),
        }
    }

    /// A proven agent asking about another node than its own (`what`: its stream, or its
    /// readiness): counted, and logged with the proven node, agent pod and peer address (the
    /// first of each proven node's in a minute; `held_back`: those not logged before).
    fn other_node(
        &self,
        agent: &ProvenAgent,
        asked: &str,
        peer: Option<SocketAddr>,
        what: &str,
        answered: bool,
    ) -> BindingFailure {
        let failure = BindingFailure::OtherNodeStream {
            proven: agent.node.clone(),
            asked: asked.to_string(),
        };
        self.identities.counters().refused(failure.label());
        if let Some(held_back) = self.log_refusal("other-node-asked", agent.node.clone()) {
            tracing::warn!(
                agent_node = %agent.node,
                agent_pod = %agent.pod,
                asked = %Escaped(asked),
                peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
                answered,
                held_back,
                "agent asked for another node's {what}"
            );
        }
        failure
    }

    /// Serves one node stream into `tx` until it ends, registered among the agents (for
    /// Status) and holding its caller's slot meanwhile; tells the agent why it ended when
    /// that is the replica's doing.
    async fn serve_node_stream(
        self,
        stream: NodeStream,
        tx: mpsc::Sender<Result<NodeEvent, Status>>,
    ) {
        let NodeStream {
            node,
            agent,
            agent_version,
            caller,
        } = stream;
        self.node_streams.inc();
        let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let agent_pod = agent.as_ref().map(|a| a.pod.clone()).unwrap_or_default();
        self.agents().insert(
            id,
            AgentStatus {
                node_name: node.clone(),
                agent_version: agent_version.clone(),
                connected_unix: now_unix(),
                agent_pod: agent_pod.clone(),
            },
        );
        match self.stream_logged("opened", &caller) {
            Some(held_back) => {
                tracing::info!(node = %node, agent_pod = %agent_pod, agent_version = ?agent_version, held_back, "agent's node stream opened");
            }
            None => {
                tracing::debug!(node = %node, agent_pod = %agent_pod, agent_version = ?agent_version, "agent's node stream opened");
            }
        }
        let ended = self.follow_node(&node, agent.as_ref(), &tx).await;
        self.agents().remove(&id);
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(&caller);
        self.node_streams.dec();
        match ended {
            StreamEnd::Draining => {
                let _ = tx
                    .send(Err(Reason::NotReady.status("server shutting down")))
                    .await;
            }
            StreamEnd::AgentUnbound => {
                let failure = Failure::Binding(BindingFailure::AgentGone(agent_pod.clone()));
                let _ = tx.send(Err(failure.status())).await;
            }
            StreamEnd::AgentGone => {}
        }
        match self.stream_logged("closed", &caller) {
            Some(held_back) => {
                tracing::info!(node = %node, why = ?ended, held_back, "agent's node stream closed");
            }
            None => tracing::debug!(node = %node, why = ?ended, "agent's node stream closed"),
        }
    }

    /// Whether a node stream's `event` for `caller` is logged at info now (`Some`: lines not
    /// logged at info in the minute before), or at debug only.
    fn stream_logged(&self, event: &'static str, caller: &str) -> Option<u64> {
        self.streams_logged
            .admit((event, caller.to_string()), std::time::Instant::now())
    }

    /// The agents' registry (a poisoned lock still holds a usable map).
    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AgentStatus>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the proven agent's pod still runs on its node in this server's view.
    fn still_there(&self, agent: &ProvenAgent) -> bool {
        self.cluster
            .pods()
            .by_uid(&agent.pod_uid)
            .is_some_and(|pod| pod.node_name.as_deref() == Some(agent.node.as_str()))
    }

    /// Streams `node`'s pod states into `tx`: a snapshot once the caches have synced, then
    /// every change, and a heartbeat every second. A proven agent's stream ends
    /// once its pod is gone from the view.
    async fn follow_node(
        &self,
        node: &str,
        agent: Option<&ProvenAgent>,
        tx: &mpsc::Sender<Result<NodeEvent, Status>>,
    ) -> StreamEnd {
        let mut changes = self.cluster.subscribe();
        // The first snapshot waits for the caches' first sync.
        while !self.cluster.synced() {
            tokio::select! {
                () = tx.closed() => return StreamEnd::AgentGone,
                () = self.draining.cancelled() => return StreamEnd::Draining,
                changed = changes.changed() => if changed.is_err() { return StreamEnd::AgentGone },
            }
        }
        let mut sent = HashMap::new();
        let mut snapshot_done = false;
        let heartbeat = NodeEvent {
            event: Some(node_event::Event::Heartbeat(true)),
        };
        // Every second whatever else happens: changes elsewhere in the cluster wake this
        // stream often without sending it anything, and must not put its heartbeat off.
        let mut beat = tokio::time::interval_at(
            tokio::time::Instant::now() + NODE_STREAM_HEARTBEAT,
            NODE_STREAM_HEARTBEAT,
        );
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            changes.mark_unchanged();
            if agent.is_some_and(|agent| !self.still_there(agent)) {
                return StreamEnd::AgentUnbound;
            }
            match self.send_changes(node, tx, &sent).await {
                Ok(now_sent) => sent = now_sent,
                Err(_) => return StreamEnd::AgentGone,
            }
            if !snapshot_done {
                snapshot_done = true;
                let synced = NodeEvent {
                    event: Some(node_event::Event::Synced(true)),
                };
                if tx.send(Ok(synced)).await.is_err() {
                    return StreamEnd::AgentGone;
                }
                tracing::debug!(node = %node, pods = sent.len(), "agent's node stream synced");
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return StreamEnd::AgentGone,
                    () = self.draining.cancelled() => return StreamEnd::Draining,
                    changed = changes.changed() => {
                        if changed.is_err() { return StreamEnd::AgentGone }
                        break;
                    }
                    _ = beat.tick() => {
                        // A full buffer means the agent is behind: it will hear soon enough.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(heartbeat.clone())) {
                            return StreamEnd::AgentGone;
                        }
                    }
                }
            }
        }
    }

    fn cache_key(&self, pod: &PodRecord, role_arn: &str) -> CacheKey {
        CacheKey {
            role_arn: role_arn.to_string(),
            external_id: pod.external_id.clone(),
            session_name: self.settings.sessions.name_for(pod),
            tags: self.settings.sessions.tags_for(pod),
            transitive_tags: self.settings.sessions.transitive(),
        }
    }

    /// Sends `node`'s pod states that differ from the digests `sent` remembers, and deletes
    /// for the pods gone; returns the digests of the states now current. States are made
    /// and sent one at a time: 200 agents' snapshots at once must not each hold a copy of
    /// every state of their node.
    async fn send_changes(
        &self,
        node: &str,
        tx: &mpsc::Sender<Result<NodeEvent, Status>>,
        sent: &HashMap<ByUid, u64>,
    ) -> Result<HashMap<ByUid, u64>, mpsc::error::SendError<Result<NodeEvent, Status>>> {
        let pods = self.cluster.pods().on_node(node);
        let mut now_sent = HashMap::with_capacity(pods.len());
        for pod in pods {
            let mut state = self.with_view(|view| view.pod_state(&pod));
            if !state.role_arn.is_empty() {
                // Which replica the agent asks first for this pod's credentials.
                state.credential_key = self.cache_key(&pod, &state.role_arn).digest();
            }
            let digest = digest(&state);
            if sent.get(pod.uid.as_str()) != Some(&digest) {
                tx.send(Ok(NodeEvent {
                    event: Some(node_event::Event::Upsert(state)),
                }))
                .await?;
            }
            // The index's own record, not a copy of its UID: 200 streams remembering their
            // nodes' pods at 100k pods held about 8 MiB of UIDs (heap 77.6 -> 69.9 MiB).
            now_sent.insert(ByUid(pod), digest);
        }
        for ByUid(gone) in sent
            .keys()
            .filter(|pod| !now_sent.contains_key(pod.0.uid.as_str()))
        {
            tx.send(Ok(NodeEvent {
                event: Some(node_event::Event::DeleteUid(gone.uid.clone())),
            }))
            .await?;
        }
        Ok(now_sent)
    }
}

/// A digest of a pod state: what a node stream remembers of each state it sent (a whole
/// copy per pod per stream would cost tens of MiB at 100k pods).
fn digest(state: &podiam_proto::v1::PodState) -> u64 {
    use prost::Message;
    use std::hash::Hasher;
    // 64 bits of SipHash over the encoded state: a collision (a change not sent) is as
    // likely as a 1 in 2^64 draw per change.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(&state.encode_to_vec());
    hasher.finish()
}

/// One node stream, as [`PodiamService::serve_node_stream`] serves it.
#[derive(Debug)]
struct NodeStream {
    /// The node whose pods it carries.
    node: String,
    /// The agent it is proven to serve, if any.
    agent: Option<ProvenAgent>,
    agent_version: String,
    /// Whose slot it holds (see [`StreamSlots`]).
    caller: String,
}

/// Why a node stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// The agent closed it (or its connection died).
    AgentGone,
    /// The proven agent's pod left this server's view (deleted, finished, moved).
    AgentUnbound,
    /// This replica is shutting down; the agent is told so.
    Draining,
}

/// How many node events may wait for a slow agent before the stream's task waits too.
const NODE_STREAM_BUFFER: usize = 256;

/// The Event to tell about a pod refused for `reason`, saying `note`.
fn notice(pod: &PodRecord, reason: Reason, note: String) -> Notice {
    Notice {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        reason,
        note,
    }
}

/// STS failures refused to callers, logged once a window per kind, with how many were not:
/// during an outage or throttling every pod missing its cache is refused alike, and a pod
/// asking in a loop would otherwise write a line a call (every call's outcome is counted in
/// `podiam_server_sts_calls_total`).
static STS_FAILURES_LOGGED: std::sync::LazyLock<LogThrottle<&'static str>> =
    std::sync::LazyLock::new(|| LogThrottle::new(REFUSALS_LOGGED_EVERY));

fn refuse(failure: Failure) -> Status {
    refuse_logged(failure, &STS_FAILURES_LOGGED)
}

/// [`refuse`], STS failures logged through `sts_failures`.
fn refuse_logged(failure: Failure, sts_failures: &LogThrottle<&'static str>) -> Status {
    // A refusal may quote what STS or the API said about a caller's input.
    let logged = Escaped(&failure);
    match &failure {
        Failure::Sts(error @ (StsError::Unavailable(_) | StsError::Throttled(_))) => {
            let kind = if matches!(error, StsError::Throttled(_)) {
                "throttled"
            } else {
                "unavailable"
            };
            match sts_failures.admit(kind, std::time::Instant::now()) {
                Some(held_back) => tracing::warn!(failure = %logged, held_back, "refused"),
                None => tracing::debug!(failure = %logged, "refused"),
            }
        }
        // The caller is told only what its token says; the log has whose address it used.
        Failure::PodToken(
            refusal @ (PodTokenRefusal::OtherPod { .. } | PodTokenRefusal::OtherAccount { .. }),
        ) => tracing::info!(refusal = ?refusal, "pod token refused"),
        _ => tracing::debug!(failure = %logged, "refused"),
    }
    failure.status()
}

#[tonic::async_trait]
impl Podiam for PodiamService {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        let caller = self.counted_agent(&request, "GetPodRole").await?;
        let peer = request.remote_addr();
        let request = request.into_inner();
        let ip = podiam_proto::parse_ip(&request.ip).map_err(|e| refuse(e.into()))?;
        // Only the metadata endpoint asks for a pod's role by its address.
        let Decision { pod, role, .. } = self
            .decide(ip, &caller, peer, "GetPodRole")
            .and_then(|decision| self.with_view(|view| view.by_address(decision)))
            .map_err(|r| refuse(r.into()))?;
        Ok(Response::new(GetPodRoleResponse {
            pod: Some(pod_ref(&pod)),
            role_name: role.name,
            role_arn: role.arn,
        }))
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<GetCredentialsResponse>, Status> {
        let caller = self.counted_agent(&request, "GetCredentials").await?;
        let peer = request.remote_addr();
        self.credentials(&caller, peer, request.into_inner())
            .await
            .map(Response::new)
            .map_err(refuse)
    }

    type WatchNodeStream = ReceiverStream<Result<NodeEvent, Status>>;

    async fn watch_node(
        &self,
        request: Request<WatchNodeRequest>,
    ) -> Result<Response<Self::WatchNodeStream>, Status> {
        if self.draining.is_cancelled() {
            return Err(Reason::NotReady.status("server shutting down"));
        }
        let caller = self.agent(&request, "WatchNode").await?;
        let peer = request.remote_addr();
        let request = request.into_inner();
        // A name no node can have is refused before anything is looked up or logged.
        if !request.node_name.is_empty() && !valid_node_name(&request.node_name) {
            return Err(Status::invalid_argument(
                "node_name is not a Kubernetes node name",
            ));
        }
        let agent_version = agent_version(&request.agent_version);
        let (node, agent) = self.stream_node(caller, &request.node_name, peer)?;
        // Never the node "": its pods would be the cluster's, streamed to one caller under
        // --node-binding warn. (A proven agent asking for it has been refused, or audited
        // as asking about another node, already.)
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "node_name is not a Kubernetes node name",
            ));
        }
        let caller = match &agent {
            Some(agent) => agent.pod_uid.clone(),
            None => format!(
                "peer {}",
                peer.map(|p| p.ip().to_string()).unwrap_or_default()
            ),
        };
        let taken = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&caller);
        if let Err(why) = taken {
            if let Some(held_back) = self.log_refusal("node-stream-places", caller.clone()) {
                tracing::warn!(node = %node, caller = %caller, why, held_back, "node stream refused");
            }
            return Err(Status::resource_exhausted(why));
        }
        let (tx, rx) = mpsc::channel(NODE_STREAM_BUFFER);
        // The service's parts are shared handles. The task ends when the stream closes (the
        // agent went away), the agent's pod goes, or the replica starts draining.
        let stream = NodeStream {
            node,
            agent,
            agent_version,
            caller,
        };
        self.streams
            .spawn(self.clone().serve_node_stream(stream, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.explain_for(&metadata, request)
            .await
            .map(Response::new)
            .map_err(refuse)
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let user = self
            .operator(request.metadata())
            .await
            .map_err(|f| refuse(Failure::Operator(f)))?;
        self.authorize(&user, Access::LIST_PODS)
            .await
            .map_err(|f| refuse(Failure::Operator(f)))?;
        let mut agents: Vec<AgentStatus> = self.agents().values().cloned().collect();
        agents.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        let agents_total = agents.len() as u64;
        agents.truncate(MAX_STATUS_AGENTS);
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            synced: self.cluster.synced(),
            draining: self.draining.is_cancelled(),
            agents,
            pods: self.cluster.pods().len() as u64,
            namespaces: self.cluster.namespaces().len() as u64,
            agents_total,
            stale: self.cluster.stale(),
        }))
    }

    async fn node_ready(
        &self,
        request: Request<NodeReadyRequest>,
    ) -> Result<Response<NodeReadyResponse>, Status> {
        let caller = self.counted_agent(&request, "NodeReady").await?;
        let peer = request.remote_addr();
        let asked = request.into_inner().node_name;
        if !valid_node_name(&asked) {
            return Err(Status::invalid_argument(
                "node_name is not a Kubernetes node name",
            ));
        }
        // Only a node-bound agent lifts a taint, and only its own node's, whatever
        // --node-binding says: an unproven caller opening nodes to pods would fail open.
        let node = match caller {
            Caller::Agent(agent) if agent.node == asked => agent.node,
            Caller::Agent(agent) => {
                let failure = self.other_node(&agent, &asked, peer, "readiness", false);
                return Err(Failure::Binding(failure).status());
            }
            Caller::Unproven => {
                return Err(Status::permission_denied(
                    "only an agent whose token proves its node may report it ready",
                ));
            }
        };
        match self.readiness.ready(&node).await {
            Ok(taint_removed) => Ok(Response::new(NodeReadyResponse { taint_removed })),
            Err(why) => {
                // Also when another report for the node is under way: logged once a minute.
                if let Some(held_back) = self.log_refusal("node-ready", node.clone()) {
                    tracing::warn!(node = %node, error = %why, held_back, "could not lift the agent-not-ready taint");
                }
                Err(Status::unavailable(why))
            }
        }
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            synced: self.cluster.synced(),
            draining: self.draining.is_cancelled(),
            replica: self.replica.as_deref().unwrap_or_default().to_string(),
            stale: self.cluster.stale(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podiam_proto::v1::PodRef;

    const FORGED: &str = "\r\n2026-01-01T00:00:00.000000Z  INFO podiam::audit: credentials issued";

    #[test]
    fn a_refusal_quoting_a_caller_is_one_log_line() {
        let refusals = [
            Failure::Refused(Refusal::WrongRole {
                pod: "team-a/web".into(),
                asked: format!("app-reader{FORGED}"),
                actual: "app-reader".into(),
            }),
            Failure::Refused(Refusal::NotLive(format!("team-a/web{FORGED}"))),
            Failure::Sts(StsError::Unavailable(format!("throttled{FORGED}"))),
            Failure::Operator(OperatorFailure::Forbidden {
                user: "someone".into(),
                access: Access {
                    verb: "get",
                    resource: "pods",
                    namespace: Some(format!("team-a{FORGED}")),
                    name: Some("web".into()),
                },
                why: String::new(),
            }),
        ];
        for failure in refusals {
            let text = failure.to_string();
            let lines = podiam_runtime::telemetry::logged_text(|| {
                refuse(failure);
            });
            assert_eq!(lines.lines().count(), 1, "{text:?}:\n{lines}");
            assert!(lines.contains(r"\r\n2026-01-01"), "{lines}");
        }
    }

    #[test]
    fn sts_throttling_is_marked_for_agents_and_nothing_else_is() {
        // Agents ask a second replica when the first cannot reach STS, not when STS
        // throttles: the account's rate is spent.
        let throttled = Failure::Sts(StsError::Throttled("Rate exceeded".into())).status();
        assert_eq!(Reason::of(&throttled), Some(Reason::StsUnavailable));
        assert!(podiam_proto::sts_throttled(&throttled));
        let unavailable = Failure::Sts(StsError::Unavailable("timed out".into())).status();
        assert_eq!(Reason::of(&unavailable), Some(Reason::StsUnavailable));
        assert!(!podiam_proto::sts_throttled(&unavailable));
    }

    #[test]
    fn sts_failures_refused_alike_are_one_warning_a_window() {
        let throttle = LogThrottle::new(REFUSALS_LOGGED_EVERY);
        let lines = podiam_runtime::telemetry::logged_text(|| {
            for _ in 0..5 {
                let failure = Failure::Sts(StsError::Throttled("Rate exceeded".into()));
                refuse_logged(failure, &throttle);
            }
            refuse_logged(
                Failure::Sts(StsError::Unavailable("timed out".into())),
                &throttle,
            );
        });
        // Each logged, one warning per kind, the others at debug level.
        assert_eq!(lines.lines().count(), 6, "{lines}");
        let warnings: Vec<&str> = lines.lines().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warnings.len(), 2, "{lines}");
        assert!(warnings[0].contains("Rate exceeded") && warnings[1].contains("timed out"));
    }

    #[test]
    fn explain_names_must_be_kubernetes_names() {
        let pod = |namespace: &str, name: &str| ExplainRequest {
            target: Some(explain_request::Target::Pod(PodRef {
                namespace: namespace.into(),
                name: name.into(),
                uid: String::new(),
            })),
        };
        assert_eq!(
            explain_target(pod("team-a", "web-0.api")).ok(),
            Some(ExplainTarget::Pod {
                namespace: "team-a".into(),
                name: "web-0.api".into()
            })
        );
        let forged = format!("team-a{FORGED}");
        for request in [
            pod(&forged, "web"),
            pod("team-a", &forged),
            pod("Team-A", "web"),
            pod("team.a", "web"),
            pod("", "web"),
            pod("team-a", ""),
            pod(&"a".repeat(64), "web"),
            pod("team-a", &format!("{}.b", "a".repeat(253))),
            ExplainRequest {
                target: Some(explain_request::Target::Ip(format!("10.0.0.1{FORGED}"))),
            },
            ExplainRequest { target: None },
        ] {
            let status = match explain_target(request.clone()) {
                Ok(target) => panic!("{request:?} gave {target:?}"),
                Err(why) => Failure::BadRequest(why).status(),
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{request:?}");
            assert!(!status.message().contains(['\r', '\n']), "{status:?}");
        }
    }

    #[test]
    fn agent_versions_are_printable_and_short() {
        assert_eq!(agent_version("0.1.0"), "0.1.0");
        assert_eq!(agent_version("0.1.0\r\n\u{1b}[2Jx"), "0.1.0[2Jx");
        assert_eq!(
            agent_version(&"é".repeat(100)).chars().count(),
            MAX_AGENT_VERSION
        );
    }

    #[test]
    fn node_streams_are_capped_per_agent_and_in_all() {
        let mut slots = StreamSlots::default();
        for _ in 0..MAX_STREAMS_PER_AGENT {
            assert!(slots.take("agent-a").is_ok());
        }
        assert!(slots.take("agent-a").is_err(), "one agent past its cap");
        assert!(
            slots.take("agent-b").is_ok(),
            "another agent is not affected"
        );
        slots.give_back("agent-a");
        assert!(
            slots.take("agent-a").is_ok(),
            "a slot given back is free again"
        );
        slots.give_back("nobody");
        assert_eq!(slots.total, MAX_STREAMS_PER_AGENT + 1);
        let mut full = StreamSlots {
            total: MAX_NODE_STREAMS,
            ..StreamSlots::default()
        };
        assert!(full.take("agent-c").is_err(), "the replica's cap");
    }

    #[test]
    fn a_bad_address_is_the_callers_mistake_not_a_refusal() {
        for bad in ["10.0.0", "", "10.0.0.1:80", "pod-a"] {
            let error = podiam_proto::parse_ip(bad).expect_err("not an address");
            let status = Failure::from(error).status();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert_eq!(Reason::of(&status), None, "{bad:?}: no refusal reason");
            assert!(
                status
                    .message()
                    .contains(&format!("{bad:?} is not an IP address")),
                "{status:?}"
            );
        }
    }

    #[test]
    fn every_refusal_travels_with_its_own_reason() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        let cases: Vec<(Failure, Reason)> = vec![
            (Refusal::NotReady.into(), Reason::NotReady),
            (Refusal::UnknownPod(ip).into(), Reason::UnknownPod),
            (Refusal::NoRole("ns/pod".into()).into(), Reason::NoRole),
            (
                Refusal::OtherNode {
                    ip,
                    node: "node-a".into(),
                }
                .into(),
                Reason::OtherNode,
            ),
            (
                StsError::Refused {
                    code: "AccessDenied".into(),
                    message: "no".into(),
                }
                .into(),
                Reason::StsRefused,
            ),
            (
                StsError::Unavailable("throttled".into()).into(),
                Reason::StsUnavailable,
            ),
            (
                Failure::Binding(BindingFailure::NoToken),
                Reason::AgentUnauthenticated,
            ),
            (
                Failure::Binding(BindingFailure::Unavailable("api down".into())),
                Reason::IdentityUnavailable,
            ),
            (PodTokenRefusal::NotBound.into(), Reason::PodTokenRefused),
            (
                Failure::PodTokenUnavailable("api down".into()),
                Reason::IdentityUnavailable,
            ),
        ];
        for (failure, reason) in cases {
            let status = failure.status();
            assert_eq!(Reason::of(&status), Some(reason), "{failure}");
            assert_eq!(status.code(), reason.code(), "{failure}");
            match &failure {
                // Pods and Events get STS's code only; the server's log gets its message.
                Failure::Sts(error) => {
                    assert_eq!(status.message(), error.public());
                    assert!(!status.message().contains(": no"), "{status:?}");
                }
                _ => assert_eq!(status.message(), failure.to_string()),
            }
        }
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        for good in ["node-a", "ip-10-0-0-1.ec2.internal", "a", &"a".repeat(63)] {
            assert!(valid_node_name(good), "{good}");
        }
        let long = format!("{}.{}", "a".repeat(63), "b".repeat(200));
        for bad in [
            "",
            "Node",
            "a..b",
            "-a",
            "a-",
            "a b",
            "a\r\nb",
            "é",
            &"a".repeat(64),
            &long,
        ] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }
}
