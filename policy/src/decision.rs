//! Every decision a server makes about a request, as pure functions over a [`View`] of the
//! cluster (the indexes only the watch writes), and every way a request is refused
//! ([`Refusal`], each with its wire [`Reason`]).
//!
//! - [`View::decide`]: the pod behind an address and its role, for a caller whose
//!   [`Scope`] is one node (an agent, proven by its token) or the whole cluster (an
//!   operator, the server's own upkeep).
//! - [`View::pod_state`]: what an agent's node stream carries for one pod.
//! - [`View::explain`]: why a pod gets its role or not, for operators.
//! - [`bind_agent`]: which node an agent's reviewed token proves it runs on.
//!
//! Nothing here does I/O or knows about gRPC transport; the server's service turns these
//! answers into messages and statuses, and `kubectl iam explain` runs the same code over
//! what it read from the API itself.

use std::net::IpAddr;
use std::sync::Arc;

use podiam_proto::Reason;
use podiam_proto::v1::{ExplainResponse, PodRef, PodState};

use crate::index::{Lookup, NamespaceIndex, PodIndex, PodRecord};
use crate::policy::{self, Permitted, Role, Verdict};

/// A read-only view of the cluster as one server replica sees it.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub pods: &'a PodIndex,
    pub namespaces: &'a NamespaceIndex,
    /// Whether both indexes have been listed completely at least once.
    pub synced: bool,
    /// Where role names are placed (`arn:aws:iam::ACCOUNT:role/`).
    pub base_arn: Option<&'a str>,
}

/// Whose question a decision answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// An agent proven to run on this node: it learns only about pods scheduled there.
    Node(&'a str),
    /// An operator or the server itself: every node.
    Cluster,
}

/// A pod and the role it may have.
#[derive(Clone, Debug)]
pub struct Decision {
    pub pod: Arc<PodRecord>,
    pub role: Role,
}

/// Every way a decision refuses.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not an IP address")]
    BadIp(String),
    #[error("server not ready: the pod and namespace caches have not synced yet")]
    NotReady,
    #[error("no pod known with IP {0}")]
    UnknownPod(IpAddr),
    #[error(
        "pod {0} is not a live pod with an IP (not found, not yet scheduled, finished, or on the host network)"
    )]
    NotLive(String),
    #[error("IP {ip} is claimed by several live pods ({}); refusing all", names(pods))]
    AmbiguousPod {
        ip: IpAddr,
        pods: Vec<Arc<PodRecord>>,
    },
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
    /// The address belongs to no pod of the asking agent's node. Names nothing of the pod
    /// elsewhere: an agent learns only about its own node.
    #[error("no pod on node {node} has IP {ip}")]
    OtherNode { ip: IpAddr, node: String },
}

impl Refusal {
    /// The reason carried on the wire; `None` for a malformed request (not a refusal a pod
    /// could get).
    pub fn reason(&self) -> Option<Reason> {
        Some(match self {
            Refusal::BadIp(_) => return None,
            Refusal::NotReady => Reason::NotReady,
            Refusal::UnknownPod(_) | Refusal::NotLive(_) => Reason::UnknownPod,
            Refusal::AmbiguousPod { .. } => Reason::AmbiguousPod,
            Refusal::NoRole(_) => Reason::NoRole,
            Refusal::InvalidRole { .. } => Reason::InvalidRole,
            Refusal::NotPermitted { .. } => Reason::RoleNotPermitted,
            Refusal::WrongRole { .. } => Reason::WrongRole,
            Refusal::OtherNode { .. } => Reason::OtherNode,
        })
    }
}

fn names(pods: &[Arc<PodRecord>]) -> String {
    pods.iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn on_node(pod: &PodRecord, node: &str) -> bool {
    pod.node_name.as_deref() == Some(node)
}

/// `namespace/name`
fn pod_name(pod: &PodRecord) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// The wire reference to a pod.
pub fn pod_ref(pod: &PodRecord) -> PodRef {
    PodRef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    }
}

impl View<'_> {
    /// The pod behind `ip` and its permitted role, as `scope` may know it.
    pub fn decide(&self, ip: IpAddr, scope: Scope<'_>) -> Result<Decision, Refusal> {
        if !self.synced {
            return Err(Refusal::NotReady);
        }
        match self.pods.lookup(&ip.to_string()) {
            Lookup::Unknown => Err(Refusal::UnknownPod(ip)),
            Lookup::Found(pod) => match scope {
                Scope::Node(node) if !on_node(&pod, node) => Err(Refusal::OtherNode {
                    ip,
                    node: node.to_string(),
                }),
                _ => self.decide_pod(pod),
            },
            Lookup::Ambiguous(pods) => match scope {
                Scope::Node(node) if !pods.iter().any(|p| on_node(p, node)) => {
                    Err(Refusal::OtherNode {
                        ip,
                        node: node.to_string(),
                    })
                }
                _ => Err(Refusal::AmbiguousPod { ip, pods }),
            },
        }
    }

    /// The role `pod` may have, its IP already resolved to it alone.
    pub fn decide_pod(&self, pod: Arc<PodRecord>) -> Result<Decision, Refusal> {
        let annotation = pod
            .role
            .as_deref()
            .ok_or_else(|| Refusal::NoRole(pod_name(&pod)))?;
        let role = policy::resolve_role(annotation, self.base_arn).map_err(|error| {
            Refusal::InvalidRole {
                pod: pod_name(&pod),
                error,
            }
        })?;
        let rule = self.namespaces.rule(&pod.namespace);
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

    /// The decision for a live pod as a request from its IP would get it: refused when
    /// another live pod claims the same IP.
    pub fn decide_live(&self, pod: &Arc<PodRecord>) -> Result<Decision, Refusal> {
        let ip = pod.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
        if let Some(ip) = ip
            && let Lookup::Ambiguous(pods) = self.pods.lookup(&ip.to_string())
        {
            return Err(Refusal::AmbiguousPod { ip, pods });
        }
        self.decide_pod(Arc::clone(pod))
    }

    /// The state an agent's node stream carries for `pod`: its role, or why it is refused.
    pub fn pod_state(&self, pod: &Arc<PodRecord>) -> PodState {
        let mut state = PodState {
            pod: Some(pod_ref(pod)),
            ip: pod.ip.clone().unwrap_or_default(),
            ..PodState::default()
        };
        match self.decide_live(pod) {
            Ok(Decision { role, .. }) => {
                state.role_name = role.name;
                state.role_arn = role.arn;
            }
            Err(refusal) => {
                state.refusal_reason = refusal
                    .reason()
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_default();
                state.refusal_message = refusal.to_string();
            }
        }
        state
    }

    /// Why the pod at an address, or a named pod, gets its role or not: for operators, who
    /// see every node.
    pub fn explain(&self, target: &ExplainTarget) -> Result<ExplainResponse, Refusal> {
        if !self.synced {
            return Err(Refusal::NotReady);
        }
        let mut answer = ExplainResponse::default();
        let pod = match target {
            ExplainTarget::Ip(ip) => {
                answer.ip = ip.to_string();
                match self.pods.lookup(&ip.to_string()) {
                    Lookup::Found(pod) => pod,
                    Lookup::Unknown => return Ok(refused(answer, &Refusal::UnknownPod(*ip))),
                    Lookup::Ambiguous(pods) => {
                        answer.pods = pods.iter().map(|p| pod_ref(p)).collect();
                        let refusal = Refusal::AmbiguousPod { ip: *ip, pods };
                        return Ok(refused(answer, &refusal));
                    }
                }
            }
            ExplainTarget::Pod { namespace, name } => match self.pods.by_name(namespace, name) {
                Some(pod) => pod,
                None => {
                    answer.namespace = namespace.clone();
                    let refusal = Refusal::NotLive(format!("{namespace}/{name}"));
                    return Ok(refused(answer, &refusal));
                }
            },
        };
        answer.pods = vec![pod_ref(&pod)];
        answer.node_name = pod.node_name.clone().unwrap_or_default();
        answer.ip = pod.ip.clone().unwrap_or_default();
        answer.namespace = pod.namespace.clone();
        answer.role_annotation = pod.role.clone().unwrap_or_default();
        answer.permitted_regex = match &*self.namespaces.rule(&pod.namespace) {
            Permitted::Nothing => String::new(),
            Permitted::Invalid { source, .. } | Permitted::Regex { source, .. } => source.clone(),
        };
        match self.decide_live(&pod) {
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
}

/// What an operator asks to have explained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExplainTarget {
    Ip(IpAddr),
    Pod { namespace: String, name: String },
}

/// An explanation that ends in a refusal.
fn refused(mut answer: ExplainResponse, refusal: &Refusal) -> ExplainResponse {
    answer.allowed = false;
    answer.reason = refusal
        .reason()
        .map(|r| r.as_str().to_string())
        .unwrap_or_default();
    answer.message = refusal.to_string();
    answer
}

/// The ServiceAccount agents run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAccount {
    pub namespace: String,
    pub name: String,
}

impl AgentAccount {
    /// Parses `NAMESPACE/NAME`.
    pub fn parse(text: &str) -> Option<AgentAccount> {
        let (namespace, name) = text.split_once('/')?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        (valid(namespace) && valid(name)).then(|| AgentAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The username its tokens authenticate as.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for AgentAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a TokenReview established about a token: who it authenticates, and the pod it is
/// bound to (the `authentication.kubernetes.io/pod-name`, `pod-uid` and `node-name` extras).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReviewedUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
}

/// An agent as its token and the server's own view prove it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenAgent {
    /// The node its pod is scheduled on (`spec.nodeName` in the server's view).
    pub node: String,
    /// Its pod, `namespace/name`.
    pub pod: String,
    pub pod_uid: String,
}

/// Why a reviewed token proves no agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingRefusal {
    #[error("the token authenticates {user}, not the agents' service account {expected}")]
    NotAgentAccount { user: String, expected: String },
    #[error("the token is not bound to a pod (use a projected service account token)")]
    NotBound,
    #[error("the token's pod {pod} (uid {uid}) is not a running pod in this server's view")]
    UnknownPod { pod: String, uid: String },
    #[error("the token's pod {pod} does not run as {expected}")]
    PodNotAgent { pod: String, expected: String },
    #[error("the token says node {token_node}, but its pod {pod} is on node {pod_node}")]
    NodeMismatch {
        pod: String,
        token_node: String,
        pod_node: String,
    },
}

/// The node an agent's reviewed token proves. The token must authenticate the agents'
/// ServiceAccount and be bound to a pod; that pod must run in `pods` (the server's own
/// view, never the caller's word), in the account's namespace, as the account, scheduled on
/// a node. Its `spec.nodeName` is the node; a node named by the review too must agree.
pub fn bind_agent(
    pods: &PodIndex,
    account: &AgentAccount,
    user: &ReviewedUser,
) -> Result<ProvenAgent, BindingRefusal> {
    if user.username != account.username() {
        return Err(BindingRefusal::NotAgentAccount {
            user: user.username.clone(),
            expected: account.to_string(),
        });
    }
    let (Some(name), Some(uid)) = (&user.pod_name, &user.pod_uid) else {
        return Err(BindingRefusal::NotBound);
    };
    let shown = format!("{}/{name}", account.namespace);
    let pod = pods
        .by_uid(uid)
        .filter(|p| p.namespace == account.namespace && &p.name == name)
        .ok_or_else(|| BindingRefusal::UnknownPod {
            pod: shown.clone(),
            uid: uid.clone(),
        })?;
    if pod.service_account.as_deref() != Some(account.name.as_str()) {
        return Err(BindingRefusal::PodNotAgent {
            pod: shown,
            expected: account.to_string(),
        });
    }
    let running = matches!(pod.phase.as_deref(), Some("Pending") | Some("Running"));
    let node = pod.node_name.clone().filter(|n| !n.is_empty());
    let Some(node) = node.filter(|_| running) else {
        return Err(BindingRefusal::UnknownPod {
            pod: shown,
            uid: uid.clone(),
        });
    };
    if let Some(token_node) = &user.node_name
        && token_node != &node
    {
        return Err(BindingRefusal::NodeMismatch {
            pod: shown,
            token_node: token_node.clone(),
            pod_node: node,
        });
    }
    Ok(ProvenAgent {
        node,
        pod: format!("{}/{}", pod.namespace, pod.name),
        pod_uid: pod.uid.clone(),
    })
}
