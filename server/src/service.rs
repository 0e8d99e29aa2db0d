//! The gRPC service: find the pod behind an IP, decide its role, hand out credentials.
//!
//! [`Refusal`] lists every way a request is refused, and [`Refusal::status`] is the one place
//! that turns a refusal into a gRPC status (with its [`Reason`] for the agent). Refusals are
//! the pods' business, logged at debug; credentials issued get one audit line each, never the
//! secret.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use podiam_proto::Reason;
use podiam_proto::v1::{
    AgentStatus, ExplainRequest, ExplainResponse, StatusRequest, StatusResponse, explain_request,
};
use podiam_proto::v1::{
    Credentials, GetCredentialsRequest, GetCredentialsResponse, GetPodRoleRequest,
    GetPodRoleResponse, HealthRequest, HealthResponse, NodeEvent, PodRef, PodState,
    WatchNodeRequest, node_event, podiam_server::Podiam,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::events::{Events, Notice};
use crate::index::{Lookup, PodRecord};
use crate::policy::{self, Permitted, Role, Verdict};
use crate::session::SessionNaming;
use crate::sts::{CacheKey, CredentialCache, KeyHealth, StsError};
use crate::watch::Cluster;

/// Every way a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not an IP address")]
    BadIp(String),
    #[error("server not ready: the pod and namespace caches have not synced yet")]
    NotReady,
    #[error("no pod known with IP {0}")]
    UnknownPod(String),
    #[error(
        "pod {0} is not a live pod with an IP (not found, not yet scheduled, finished, or on the host network)"
    )]
    NotLive(String),
    #[error("IP {ip} is claimed by several live pods ({}); refusing all", pods.join(", "))]
    AmbiguousPod { ip: String, pods: Vec<String> },
    #[error("pod {0} has no {role} annotation", role = policy::ROLE_ANNOTATION)]
    NoRole(String),
    #[error("pod {pod}: {error}")]
    InvalidRole {
        pod: String,
        error: policy::RoleError,
    },
    #[error("role {role} is not permitted in namespace {namespace}: {why}")]
    NotPermitted {
        role: String,
        namespace: String,
        why: String,
    },
    #[error("pod {pod} has role {actual}, not {asked}")]
    WrongRole {
        pod: String,
        asked: String,
        actual: String,
    },
    #[error("{0}")]
    Sts(#[from] StsError),
}

impl Refusal {
    /// The one mapping from refusals to gRPC statuses.
    pub fn status(&self) -> Status {
        let reason = match self {
            Refusal::BadIp(_) => return Status::invalid_argument(self.to_string()),
            Refusal::NotReady => Reason::NotReady,
            Refusal::UnknownPod(_) | Refusal::NotLive(_) => Reason::UnknownPod,
            Refusal::AmbiguousPod { .. } => Reason::AmbiguousPod,
            Refusal::NoRole(_) => Reason::NoRole,
            Refusal::InvalidRole { .. } => Reason::InvalidRole,
            Refusal::NotPermitted { .. } => Reason::RoleNotPermitted,
            Refusal::WrongRole { .. } => Reason::WrongRole,
            Refusal::Sts(StsError::Refused { .. }) => Reason::StsRefused,
            Refusal::Sts(StsError::Unavailable(_)) => Reason::StsUnavailable,
        };
        reason.status(self.to_string())
    }
}

/// A pod and the role it may have.
#[derive(Debug)]
struct Decision {
    pod: Arc<PodRecord>,
    role: Role,
}

/// Settings the service needs besides the cluster view and the cache.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub base_arn: Option<String>,
    pub sessions: SessionNaming,
}

/// The podiam gRPC service.
#[derive(Debug, Clone)]
pub struct PodiamService {
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    settings: ServiceSettings,
    events: Arc<Events>,
    /// Cancelled when the replica starts shutting down: Health says draining and node
    /// streams end, so agents move elsewhere.
    draining: CancellationToken,
    /// Node streams open on this replica.
    node_streams: Gauge,
    /// The agents those streams serve, by stream.
    agents: Arc<Mutex<HashMap<u64, AgentStatus>>>,
}

/// Numbers the node streams (for the agents' registry).
static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

/// How often a node stream with no change carries a heartbeat. Agents treat three missed
/// heartbeats as a hung replica, so a stopped or frozen replica is left within a few seconds.
pub const NODE_STREAM_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// What credential upkeep learns from one pass over every live pod.
#[derive(Debug, Default)]
pub struct Survey {
    /// The credential keys live, permitted pods need.
    pub needed: HashSet<CacheKey>,
    /// Live pods sharing their IP with another live pod (all of them refused).
    pub duplicate_ip_pods: usize,
}

impl PodiamService {
    pub fn new(
        cluster: Arc<Cluster>,
        cache: Arc<CredentialCache>,
        settings: ServiceSettings,
        events: Arc<Events>,
    ) -> Self {
        PodiamService {
            cluster,
            cache,
            settings,
            events,
            draining: CancellationToken::new(),
            node_streams: Gauge::default(),
            agents: Arc::default(),
        }
    }

    /// Ties the service to the server's shutdown (`draining`) and counts its node streams in
    /// `node_streams`.
    pub fn with_lifecycle(mut self, draining: CancellationToken, node_streams: Gauge) -> Self {
        self.draining = draining;
        self.node_streams = node_streams;
        self
    }

    /// The pod behind `ip` and its permitted role.
    fn decide(&self, ip: &str) -> Result<Decision, Refusal> {
        let ip = ip
            .parse::<IpAddr>()
            .map_err(|_| Refusal::BadIp(ip.to_string()))?
            .to_string();
        if !self.cluster.synced() {
            return Err(Refusal::NotReady);
        }
        let lookup = self.cluster.pods().lookup(&ip);
        match lookup {
            Lookup::Found(pod) => self.decide_pod(pod),
            Lookup::Unknown => Err(Refusal::UnknownPod(ip)),
            Lookup::Ambiguous(pods) => Err(Refusal::AmbiguousPod { ip, pods }),
        }
    }

    /// The role `pod` may have (its IP already resolved to it alone).
    fn decide_pod(&self, pod: Arc<PodRecord>) -> Result<Decision, Refusal> {
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        let annotation = pod
            .role
            .as_deref()
            .ok_or_else(|| Refusal::NoRole(pod_name.clone()))?;
        let role = policy::resolve_role(annotation, self.settings.base_arn.as_deref()).map_err(
            |error| Refusal::InvalidRole {
                pod: pod_name,
                error,
            },
        )?;
        let rule = self.cluster.namespaces().rule(&pod.namespace);
        let why = match policy::check(&rule, &role) {
            Verdict::Permitted => return Ok(Decision { pod, role }),
            Verdict::NothingPermitted => {
                format!(
                    "the namespace has no {} annotation",
                    policy::PERMITTED_ANNOTATION
                )
            }
            Verdict::InvalidRegex { source, error } => {
                format!("its permitted regex {source:?} is invalid ({error})")
            }
            Verdict::NotMatched { source } => format!("it does not match {source:?}"),
        };
        Err(Refusal::NotPermitted {
            role: role.arn,
            namespace: pod.namespace.clone(),
            why,
        })
    }

    async fn credentials(
        &self,
        request: GetCredentialsRequest,
    ) -> Result<GetCredentialsResponse, Refusal> {
        let Decision { pod, role } = self.decide(&request.ip)?;
        if request.role_name != role.name {
            return Err(Refusal::WrongRole {
                pod: format!("{}/{}", pod.namespace, pod.name),
                asked: request.role_name,
                actual: role.name,
            });
        }
        let key = self.cache_key(&pod, &role);
        let issued = match self.cache.get(key.clone()).await {
            Ok(issued) => issued,
            Err(error) => {
                let refusal = Refusal::Sts(error);
                self.events.report(notice(&pod, &refusal));
                return Err(refusal);
            }
        };
        tracing::info!(
            target: "podiam::audit",
            pod = %pod.name,
            namespace = %pod.namespace,
            role = %role.arn,
            session = %key.session_name,
            access_key_id = %issued.access_key_id,
            expiration = issued.expiration_unix,
            node = %request.node_name,
            "credentials issued"
        );
        Ok(GetCredentialsResponse {
            pod: Some(pod_ref(&pod)),
            credentials: Some(Credentials {
                access_key_id: issued.access_key_id,
                secret_access_key: issued.secret_access_key,
                session_token: issued.session_token,
                expiration_unix: issued.expiration_unix,
                issued_unix: issued.issued_unix,
                role_arn: role.arn,
            }),
        })
    }
}

impl PodiamService {
    /// The decision for a live pod as a request from its IP would get it: refused when
    /// another live pod claims the same IP.
    fn decide_live(&self, pod: &Arc<PodRecord>) -> Result<Decision, Refusal> {
        let ip = pod.ip.clone().unwrap_or_default();
        let lookup = self.cluster.pods().lookup(&ip);
        match lookup {
            Lookup::Ambiguous(pods) => Err(Refusal::AmbiguousPod { ip, pods }),
            _ => self.decide_pod(Arc::clone(pod)),
        }
    }

    /// The state the agent on `pod`'s node needs: its decision, or why it is refused.
    fn pod_state(&self, pod: &Arc<PodRecord>) -> PodState {
        let ip = pod.ip.clone().unwrap_or_default();
        let decision = self.decide_live(pod);
        let mut state = PodState {
            pod: Some(pod_ref(pod)),
            ip,
            ..PodState::default()
        };
        match decision {
            Ok(Decision { role, .. }) => {
                state.role_name = role.name;
                state.role_arn = role.arn;
            }
            Err(refusal) => {
                let status = refusal.status();
                state.refusal_reason = Reason::of(&status)
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_default();
                state.refusal_message = status.message().to_string();
            }
        }
        state
    }

    /// Explains the decision for an IP or a named pod. A replica that has not synced yet
    /// says so rather than call every pod unknown.
    pub fn explain(&self, request: ExplainRequest) -> Result<ExplainResponse, Status> {
        if !self.cluster.synced() {
            return Err(Refusal::NotReady.status());
        }
        let mut answer = ExplainResponse::default();
        let pod = match request.target {
            Some(explain_request::Target::Ip(ip)) => {
                let parsed = ip
                    .parse::<IpAddr>()
                    .map_err(|_| Refusal::BadIp(ip.clone()).status())?
                    .to_string();
                answer.ip = parsed.clone();
                let lookup = self.cluster.pods().lookup(&parsed);
                match lookup {
                    Lookup::Found(pod) => pod,
                    Lookup::Unknown => {
                        return Ok(refused(answer, &Refusal::UnknownPod(parsed)));
                    }
                    Lookup::Ambiguous(pods) => {
                        answer.pods = pods
                            .iter()
                            .map(|p| {
                                let (namespace, name) = p.split_once('/').unwrap_or(("", p));
                                PodRef {
                                    namespace: namespace.into(),
                                    name: name.into(),
                                    uid: String::new(),
                                }
                            })
                            .collect();
                        return Ok(refused(answer, &Refusal::AmbiguousPod { ip: parsed, pods }));
                    }
                }
            }
            Some(explain_request::Target::Pod(target)) => {
                let found = self.cluster.pods().by_name(&target.namespace, &target.name);
                match found {
                    Some(pod) => pod,
                    None => {
                        let name = format!("{}/{}", target.namespace, target.name);
                        answer.namespace = target.namespace;
                        return Ok(refused(answer, &Refusal::NotLive(name)));
                    }
                }
            }
            None => return Err(Status::invalid_argument("explain needs an ip or a pod")),
        };
        answer.pods = vec![pod_ref(&pod)];
        answer.node_name = pod.node_name.clone().unwrap_or_default();
        answer.ip = pod.ip.clone().unwrap_or_default();
        answer.namespace = pod.namespace.clone();
        answer.role_annotation = pod.role.clone().unwrap_or_default();
        answer.permitted_regex = match &*self.cluster.namespaces().rule(&pod.namespace) {
            Permitted::Nothing => String::new(),
            Permitted::Invalid { source, .. } | Permitted::Regex { source, .. } => source.clone(),
        };
        // A named pod whose IP another live pod claims is refused like its IP would be.
        if let Lookup::Ambiguous(pods) = self.cluster.pods().lookup(&answer.ip) {
            let ip = answer.ip.clone();
            return Ok(refused(answer, &Refusal::AmbiguousPod { ip, pods }));
        }
        match self.decide_pod(pod) {
            Ok(Decision { role, .. }) => {
                answer.role_arn = role.arn;
                answer.allowed = true;
                Ok(answer)
            }
            Err(refusal) => {
                if let Refusal::NotPermitted { role, .. } = &refusal {
                    answer.role_arn = role.clone();
                }
                Ok(refused(answer, &refusal))
            }
        }
    }

    /// One pass over every live pod: the credential keys permitted pods need (for prefetch
    /// and upkeep), and an Event for each pod refused for a reason its owners can fix — a
    /// role not permitted or invalid, an IP shared with another pod, STS refusing or failing
    /// its role. Pods without a role annotation are not refused in any way worth telling.
    pub fn survey(&self) -> Survey {
        let pods = self.cluster.pods().on_node("");
        let mut survey = Survey::default();
        let mut notices = Vec::new();
        let mut permitted = Vec::new();
        for pod in pods {
            match self.decide_live(&pod) {
                Ok(Decision { pod, role }) => {
                    let key = self.cache_key(&pod, &role);
                    survey.needed.insert(key.clone());
                    permitted.push((pod, key));
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
                        notices.push(notice(&pod, &refusal));
                    }
                }
            }
        }
        // A key being fetched right now keeps its pods' memory of what they were told.
        let mut busy = HashSet::new();
        let mut failing = HashMap::new();
        for key in &survey.needed {
            match self.cache.health(key) {
                KeyHealth::Fine => {}
                KeyHealth::Busy => {
                    busy.insert(key);
                }
                KeyHealth::Failing(error) => {
                    failing.insert(key, Refusal::Sts(error));
                }
            }
        }
        let mut keep: HashSet<&str> = HashSet::new();
        for (pod, key) in &permitted {
            if let Some(refusal) = failing.get(key) {
                notices.push(notice(pod, refusal));
            } else if busy.contains(key) {
                keep.insert(&pod.uid);
            }
        }
        keep.extend(notices.iter().map(|n| n.uid.as_str()));
        self.events.retain(&keep);
        for notice in notices {
            self.events.report(notice);
        }
        survey
    }

    /// The agents' registry (a poisoned lock still holds a usable map).
    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AgentStatus>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams `node`'s pod states into `tx`: a snapshot once the caches have synced, then
    /// every change, with a heartbeat when nothing changes.
    async fn follow_node(
        &self,
        node: &str,
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
        loop {
            changes.mark_unchanged();
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
                    () = tokio::time::sleep(NODE_STREAM_HEARTBEAT) => {
                        // A full buffer means the agent is behind: it will hear soon enough.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(heartbeat.clone())) {
                            return StreamEnd::AgentGone;
                        }
                    }
                }
            }
        }
    }

    fn cache_key(&self, pod: &PodRecord, role: &Role) -> CacheKey {
        CacheKey {
            role_arn: role.arn.clone(),
            external_id: pod.external_id.clone(),
            session_name: self.settings.sessions.name_for(pod),
            tags: self.settings.sessions.tags_for(pod),
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
        sent: &HashMap<String, u64>,
    ) -> Result<HashMap<String, u64>, mpsc::error::SendError<Result<NodeEvent, Status>>> {
        let pods = self.cluster.pods().on_node(node);
        let mut now_sent = HashMap::with_capacity(pods.len());
        for pod in pods {
            let state = self.pod_state(&pod);
            let digest = digest(&state);
            if sent.get(&pod.uid) != Some(&digest) {
                tx.send(Ok(NodeEvent {
                    event: Some(node_event::Event::Upsert(state)),
                }))
                .await?;
            }
            now_sent.insert(pod.uid.clone(), digest);
        }
        for uid in sent.keys().filter(|uid| !now_sent.contains_key(*uid)) {
            tx.send(Ok(NodeEvent {
                event: Some(node_event::Event::DeleteUid(uid.clone())),
            }))
            .await?;
        }
        Ok(now_sent)
    }
}

/// A digest of a pod state: what a node stream remembers of each state it sent (a whole
/// copy per pod per stream would cost tens of MiB at 100k pods).
fn digest(state: &PodState) -> u64 {
    use prost::Message;
    use std::hash::Hasher;
    // 64 bits of SipHash over the encoded state: a collision (a change not sent) is as
    // likely as a 1 in 2^64 draw per change.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(&state.encode_to_vec());
    hasher.finish()
}

/// Why a node stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// The agent closed it (or its connection died).
    AgentGone,
    /// This replica is shutting down; the agent is told so.
    Draining,
}

/// How many node events may wait for a slow agent before the stream's task waits too.
const NODE_STREAM_BUFFER: usize = 256;

/// An explanation that ends in a refusal.
fn refused(mut answer: ExplainResponse, refusal: &Refusal) -> ExplainResponse {
    let status = refusal.status();
    answer.allowed = false;
    answer.reason = Reason::of(&status)
        .map(|r| r.as_str().to_string())
        .unwrap_or_default();
    answer.message = status.message().to_string();
    answer
}

/// The Event to tell about a refused pod.
fn notice(pod: &PodRecord, refusal: &Refusal) -> Notice {
    let status = refusal.status();
    Notice {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        reason: Reason::of(&status).unwrap_or(Reason::NoRole),
        note: status.message().to_string(),
    }
}

fn pod_ref(pod: &PodRecord) -> PodRef {
    PodRef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    }
}

fn refuse(refusal: Refusal) -> Status {
    match &refusal {
        Refusal::Sts(StsError::Unavailable(_)) => tracing::warn!(%refusal, "refused"),
        _ => tracing::debug!(%refusal, "refused"),
    }
    refusal.status()
}

#[tonic::async_trait]
impl Podiam for PodiamService {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        let request = request.into_inner();
        let Decision { pod, role } = self.decide(&request.ip).map_err(refuse)?;
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
        self.credentials(request.into_inner())
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
        let request = request.into_inner();
        let node = request.node_name;
        let (tx, rx) = mpsc::channel(NODE_STREAM_BUFFER);
        // The service's parts are shared handles. The task ends when the stream closes (the
        // agent went away) or the replica starts draining.
        let service = self.clone();
        tokio::spawn(async move {
            service.node_streams.inc();
            let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
            service.agents().insert(
                id,
                AgentStatus {
                    node_name: node.clone(),
                    agent_version: request.agent_version.clone(),
                    connected_unix: unix_now(),
                },
            );
            tracing::info!(node = %node, agent_version = %request.agent_version, "agent's node stream opened");
            let ended = service.follow_node(&node, &tx).await;
            service.agents().remove(&id);
            service.node_streams.dec();
            if ended == StreamEnd::Draining {
                let _ = tx
                    .send(Err(Reason::NotReady.status("server shutting down")))
                    .await;
            }
            tracing::info!(node = %node, why = ?ended, "agent's node stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        PodiamService::explain(self, request.into_inner()).map(Response::new)
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let mut agents: Vec<AgentStatus> = self.agents().values().cloned().collect();
        agents.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            synced: self.cluster.synced(),
            draining: self.draining.is_cancelled(),
            agents,
            pods: self.cluster.pods().len() as u64,
            namespaces: self.cluster.namespaces().len() as u64,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            synced: self.cluster.synced(),
            draining: self.draining.is_cancelled(),
        }))
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
