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

use crate::index::{AccountIndex, Lookup, NamespaceIndex, PodIndex, PodRecord};
use crate::policy::{self, Permitted, Role, Verdict};

/// A read-only view of the cluster as one server replica sees it.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub pods: &'a PodIndex,
    pub namespaces: &'a NamespaceIndex,
    pub accounts: &'a AccountIndex,
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
    /// Where the role came from.
    pub source: RoleSource,
}

/// Where a pod's role comes from, first found first: the pod's own
/// `iam.amazonaws.com/role`, its ServiceAccount's, its namespace's
/// `iam.amazonaws.com/default-role`. The namespace's `permitted` regex decides over each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleSource {
    Pod,
    ServiceAccount,
    NamespaceDefault,
}

impl RoleSource {
    /// The name explain shows.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleSource::Pod => "pod",
            RoleSource::ServiceAccount => "service-account",
            RoleSource::NamespaceDefault => "namespace-default",
        }
    }
}

/// Every way a decision refuses.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("server not ready: the pod and namespace caches have not synced yet")]
    NotReady,
    #[error("no pod known with IP {0}")]
    UnknownPod(IpAddr),
    #[error(
        "pod {0} is not a live pod with an IP (not found, not yet scheduled, finished, or on the host network)"
    )]
    NotLive(String),
    /// The pod is terminating and a pod that is not has been given its address: the address,
    /// and whatever a request from it may get, is the new pod's.
    #[error("pod {pod} is terminating and its IP {ip} is now another pod's")]
    AddressTaken { pod: String, ip: IpAddr },
    /// Several live pods claim the address. The Event on a pod names only pods of
    /// `namespace`, its own, whose users may see them anyway; asked by address, or carried in
    /// a node stream's state (`namespace` none: the agent answers whoever sends from the
    /// address, which may be any claimant) it names none. Operators get every claimant from
    /// [`Refusal::detail`], through explain.
    #[error(
        "IP {ip} is claimed by {} live pods{}; refusing all",
        pods.len(),
        claimants_seen_from(pods, namespace.as_deref())
    )]
    AmbiguousPod {
        ip: IpAddr,
        pods: Vec<Arc<PodRecord>>,
        namespace: Option<String>,
    },
    #[error(
        "pod {0} has no {role} annotation, nor its service account, nor a {default} on its namespace",
        role = policy::ROLE_ANNOTATION,
        default = policy::DEFAULT_ROLE_ANNOTATION
    )]
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
    /// Asked by address alone (the metadata endpoint) for a pod whose namespace requires
    /// its token ([`policy::TOKEN_REQUIRED`]).
    #[error(
        "pod {pod} gets its role only from the container-credentials endpoint, with its token: \
         its namespace {namespace} is labelled {label}={required}",
        label = policy::POD_IDENTITY_LABEL,
        required = policy::TOKEN_REQUIRED
    )]
    TokenRequired { pod: String, namespace: String },
}

impl Refusal {
    /// Why, as the wire and the pod's answer name it.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::NotReady => Reason::NotReady,
            Refusal::UnknownPod(_) | Refusal::NotLive(_) | Refusal::AddressTaken { .. } => {
                Reason::UnknownPod
            }
            Refusal::AmbiguousPod { .. } => Reason::AmbiguousPod,
            Refusal::NoRole(_) => Reason::NoRole,
            Refusal::InvalidRole { .. } => Reason::InvalidRole,
            Refusal::NotPermitted { .. } => Reason::RoleNotPermitted,
            Refusal::WrongRole { .. } => Reason::WrongRole,
            Refusal::OtherNode { .. } => Reason::OtherNode,
            Refusal::TokenRequired { .. } => Reason::TokenRequired,
        }
    }

    /// The refusal as an operator may read it: every pod claiming an ambiguous address
    /// named, whatever its namespace. Never for pods, agents or Events: see
    /// [`Refusal::AmbiguousPod`].
    pub fn detail(&self) -> String {
        match self {
            Refusal::AmbiguousPod { ip, pods, .. } => format!(
                "IP {ip} is claimed by {} live pods ({}); refusing all",
                pods.len(),
                pods.iter()
                    .map(|p| pod_name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        }
    }
}

/// The claimants of an address as a pod of `namespace` may see them: those of its own
/// namespace by name, the others counted; nothing without a namespace.
fn claimants_seen_from(pods: &[Arc<PodRecord>], namespace: Option<&str>) -> String {
    let Some(namespace) = namespace else {
        return String::new();
    };
    let (own, others): (Vec<_>, Vec<_>) = pods.iter().partition(|p| p.namespace == namespace);
    let mut parts: Vec<String> = own.iter().map(|p| pod_name(p)).collect();
    match others.len() {
        0 => {}
        1 => parts.push("1 in another namespace".into()),
        n => parts.push(format!("{n} in other namespaces")),
    }
    format!(" ({})", parts.join(", "))
}

/// `refusal` as a node stream carries it: the agent answers it to whoever sends from the
/// pod's address, which for an address several pods claim may be any of them, so the
/// claimants are counted, not named.
fn answered_by_address(refusal: Refusal) -> Refusal {
    match refusal {
        Refusal::AmbiguousPod { ip, pods, .. } => Refusal::AmbiguousPod {
            ip,
            pods,
            namespace: None,
        },
        other => other,
    }
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
        let found = match scope {
            Scope::Node(node) => match self.pods.lookup_on(ip, node) {
                Lookup::Unknown if self.pods.lookup(ip) != Lookup::Unknown => {
                    return Err(Refusal::OtherNode {
                        ip,
                        node: node.to_string(),
                    });
                }
                found => found,
            },
            Scope::Cluster => self.pods.lookup(ip),
        };
        match found {
            Lookup::Unknown => Err(Refusal::UnknownPod(ip)),
            Lookup::Found(pod) => self.decide_pod(pod),
            Lookup::Ambiguous(pods) => Err(Refusal::AmbiguousPod {
                ip,
                pods,
                namespace: None,
            }),
        }
    }

    /// The role annotation that applies to `pod` and where it is: the pod's own, its
    /// ServiceAccount's, or its namespace's default.
    pub fn role_annotation<'p>(&'p self, pod: &'p PodRecord) -> Option<(&'p str, RoleSource)> {
        self.role_for(
            &pod.namespace,
            pod.service_account.as_deref(),
            pod.role.as_deref(),
        )
    }

    /// The role annotation that applies to a pod of `namespace` running as `account` (none:
    /// `default`) with `own` as its own annotation, and where it is.
    pub fn role_for<'p>(
        &'p self,
        namespace: &str,
        account: Option<&str>,
        own: Option<&'p str>,
    ) -> Option<(&'p str, RoleSource)> {
        if let Some(role) = own {
            return Some((role, RoleSource::Pod));
        }
        let account = account.filter(|a| !a.is_empty()).unwrap_or("default");
        if let Some(role) = self.accounts.role(namespace, account) {
            return Some((role, RoleSource::ServiceAccount));
        }
        self.namespaces
            .default_role(namespace)
            .map(|role| (role, RoleSource::NamespaceDefault))
    }

    /// The role `pod` may have, its IP already resolved to it alone.
    pub fn decide_pod(&self, pod: Arc<PodRecord>) -> Result<Decision, Refusal> {
        let (annotation, source) = self
            .role_annotation(&pod)
            .ok_or_else(|| Refusal::NoRole(pod_name(&pod)))?;
        // A node's kubelet may create a static pod's mirror in any namespace, with any
        // annotations and IP: a role for mirrors would let one node's credentials open every
        // namespace's roles.
        if pod.mirror {
            return Err(Refusal::NotPermitted {
                role: annotation.to_string(),
                namespace: pod.namespace.clone(),
                why: format!(
                    "pod {} is a static pod (its {} annotation): a node can create those in any \
                     namespace, so they are given no role",
                    pod.name,
                    crate::index::MIRROR_ANNOTATION
                ),
            });
        }
        let role = policy::resolve_role(annotation, self.base_arn).map_err(|error| {
            Refusal::InvalidRole {
                pod: pod_name(&pod),
                error,
            }
        })?;
        let rule = self.namespaces.rule(&pod.namespace);
        let why = match policy::check(&rule, &role) {
            Verdict::Permitted => return Ok(Decision { pod, role, source }),
            Verdict::NothingPermitted
                if self.namespaces.has_kube2iam_allowed_roles(&pod.namespace) =>
            {
                format!(
                    "the namespace has no {} annotation; its {} (kube2iam's) is not read: \
                     write it as a {0} regex (docs/migrating.md)",
                    policy::PERMITTED_ANNOTATION,
                    policy::KUBE2IAM_ALLOWED_ROLES_ANNOTATION
                )
            }
            Verdict::NothingPermitted => {
                format!(
                    "the namespace has no {} annotation",
                    policy::PERMITTED_ANNOTATION
                )
            }
            // The namespace's text quoted short: this message goes to every refused pod, its
            // node's stream and its Events.
            Verdict::InvalidRegex { source, error } => format!(
                "its permitted regex {:?} is invalid ({error})",
                policy::quoted(&source)
            ),
            Verdict::NotMatched { source } => {
                format!("it does not match {:?}", policy::quoted(&source))
            }
        };
        Err(Refusal::NotPermitted {
            role: role.arn,
            namespace: pod.namespace.clone(),
            why,
        })
    }

    /// The decision for a live pod as a request from its IP would get it: refused when
    /// another live pod claims the same IP, or when the pod is terminating and a pod that is
    /// not has its IP now.
    pub fn decide_live(&self, pod: &Arc<PodRecord>) -> Result<Decision, Refusal> {
        for ip in pod.ips() {
            let taken = || Refusal::AddressTaken {
                pod: pod_name(pod),
                ip,
            };
            // Among its own node's pods: see `PodIndex::lookup_on`.
            let found = match pod.node_name.as_deref() {
                Some(node) => self.pods.lookup_on(ip, node),
                None => self.pods.lookup(ip),
            };
            match found {
                Lookup::Found(holder) if holder.uid != pod.uid => return Err(taken()),
                Lookup::Ambiguous(pods) if pods.iter().any(|p| p.uid == pod.uid) => {
                    return Err(Refusal::AmbiguousPod {
                        ip,
                        pods,
                        namespace: Some(pod.namespace.clone()),
                    });
                }
                Lookup::Ambiguous(_) => return Err(taken()),
                Lookup::Found(_) | Lookup::Unknown => {}
            }
        }
        self.decide_pod(Arc::clone(pod))
    }

    /// Whether `decision` may be given to a request that proves its pod by address alone
    /// (the metadata endpoint): not when the pod's namespace requires its token.
    pub fn by_address(&self, decision: Decision) -> Result<Decision, Refusal> {
        if self.namespaces.token_required(&decision.pod.namespace) {
            return Err(Refusal::TokenRequired {
                pod: pod_name(&decision.pod),
                namespace: decision.pod.namespace.clone(),
            });
        }
        Ok(decision)
    }

    /// The state an agent's node stream carries for `pod`: its role, or why it is refused.
    /// A pod whose namespace requires its token has its role and, beside it, the refusal
    /// the metadata endpoint gives it ([`Refusal::TokenRequired`]).
    pub fn pod_state(&self, pod: &Arc<PodRecord>) -> PodState {
        let mut state = PodState {
            pod: Some(pod_ref(pod)),
            ip: pod.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            more_ips: pod.more_ips.iter().map(IpAddr::to_string).collect(),
            ..PodState::default()
        };
        match self.decide_live(pod) {
            Ok(decision) => {
                if let Err(refusal) = self.by_address(decision.clone()) {
                    let reason = refusal.reason();
                    state.refusal_reason = reason.to_wire().into();
                    state.refusal_message = refusal.to_string();
                    // Agents of the previous release read this name beside a role as a
                    // refusal of both paths: fail closed.
                    #[allow(deprecated)]
                    {
                        state.legacy_refusal_reason = reason.as_str().to_string();
                    }
                }
                state.role_name = decision.role.name;
                state.role_arn = decision.role.arn;
            }
            Err(refusal) => {
                let reason = refusal.reason();
                state.refusal_reason = reason.to_wire().into();
                state.refusal_message = answered_by_address(refusal).to_string();
                #[allow(deprecated)]
                {
                    state.legacy_refusal_reason = reason.as_str().to_string();
                }
            }
        }
        state
    }

    /// How `pod` can prove itself, as explain names it.
    fn identity(&self, pod: &PodRecord) -> &'static str {
        let required = self.namespaces.token_required(&pod.namespace);
        match (required, pod.container_endpoint) {
            (true, true) => "address and token, required",
            // No way in at all: the metadata path refuses it, and it has no token to send.
            (true, false) => "token required, not set up",
            (false, true) => "address and token",
            (false, false) => "address",
        }
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
                match self.pods.lookup(*ip) {
                    Lookup::Found(pod) => pod,
                    Lookup::Unknown => return Ok(refused(answer, &Refusal::UnknownPod(*ip))),
                    Lookup::Ambiguous(pods) => {
                        // Asked by address, with `list pods` in every namespace: every
                        // claimant is named.
                        answer.pods = pods.iter().map(|p| pod_ref(p)).collect();
                        let refusal = Refusal::AmbiguousPod {
                            ip: *ip,
                            pods,
                            namespace: None,
                        };
                        let mut answer = refused(answer, &refusal);
                        answer.message = refusal.detail();
                        return Ok(answer);
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
        // Asked by name (`get pods` in the pod's namespace only), the answer carries the
        // pod's own message: other namespaces' claimants of its address are counted, not
        // named.
        answer.pods = vec![pod_ref(&pod)];
        answer.node_name = pod.node_name.as_deref().unwrap_or_default().to_string();
        answer.ip = pod.ip.map(|ip| ip.to_string()).unwrap_or_default();
        answer.namespace = pod.namespace.clone();
        if let Some((annotation, source)) = self.role_annotation(&pod) {
            answer.role_annotation = annotation.to_string();
            answer.role_source = source.as_str().to_string();
        }
        answer.service_account = pod
            .service_account
            .as_deref()
            .unwrap_or("default")
            .to_string();
        answer.identity = self.identity(&pod).to_string();
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
    let reason = refusal.reason();
    answer.allowed = false;
    answer.reason = reason.to_wire().into();
    answer.message = refusal.to_string();
    #[allow(deprecated)]
    {
        answer.legacy_reason = reason.as_str().to_string();
    }
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
    /// Every extra the token carries, as the API named them: an authoriser may scope what
    /// the user can do by them (a scoped token), so access is reviewed with them.
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
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
    let node = pod.node_name.as_deref().filter(|n| !n.is_empty());
    let Some(node) = node.filter(|_| running) else {
        return Err(BindingRefusal::UnknownPod {
            pod: shown,
            uid: uid.clone(),
        });
    };
    if let Some(token_node) = &user.node_name
        && token_node != node
    {
        return Err(BindingRefusal::NodeMismatch {
            pod: shown,
            token_node: token_node.clone(),
            pod_node: node.to_string(),
        });
    }
    Ok(ProvenAgent {
        node: node.to_string(),
        pod: format!("{}/{}", pod.namespace, pod.name),
        pod_uid: pod.uid.clone(),
    })
}

/// Why a pod's own token (the container-credentials endpoint's proof) does not prove the
/// pod at the request's address. The message goes back to whoever sent the request, who is
/// not that pod when the token is another's: it names only what the token itself says, never
/// the pod at the address nor its ServiceAccount (those are in the fields, for the server's
/// log).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodTokenRefusal {
    /// The API does not accept the token for podiam's audience (unknown, expired, another
    /// audience, its pod gone), with the API's reason.
    #[error("the pod's token is not accepted: {0}")]
    NotAccepted(String),
    #[error("the pod's token is not bound to a pod (use a projected service account token)")]
    NotBound,
    #[error(
        "the token is bound to pod {token_pod} (uid {token_uid}), not to the pod at this address"
    )]
    OtherPod {
        token_pod: String,
        token_uid: String,
        pod: String,
    },
    #[error("the token authenticates {user}, not the service account of the pod at this address")]
    OtherAccount {
        user: String,
        pod: String,
        expected: String,
    },
}

/// Whether a pod's reviewed token proves `pod`, the pod the server's view has at the
/// request's address: the token must be bound to that very pod (its name and UID: a pod
/// recreated under the same name has another) and authenticate its ServiceAccount. Two
/// proofs that do not lean on each other: the network's (the address) and the API's (the
/// token).
pub fn prove_pod(pod: &PodRecord, user: &ReviewedUser) -> Result<(), PodTokenRefusal> {
    let shown = format!("{}/{}", pod.namespace, pod.name);
    let (Some(name), Some(uid)) = (&user.pod_name, &user.pod_uid) else {
        return Err(PodTokenRefusal::NotBound);
    };
    let account = pod.service_account.as_deref().unwrap_or("default");
    let expected = format!("system:serviceaccount:{}:{account}", pod.namespace);
    if user.username != expected {
        return Err(PodTokenRefusal::OtherAccount {
            user: user.username.clone(),
            pod: shown,
            expected,
        });
    }
    if name != &pod.name || uid != &pod.uid {
        return Err(PodTokenRefusal::OtherPod {
            token_pod: format!("{}/{name}", pod.namespace),
            token_uid: uid.clone(),
            pod: shown,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn pod(uid: &str, ns: &str, node: &str, ip: &str, role: Option<&str>) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("pod-{uid}"),
            ip: Some(ip.parse().expect("ip")),
            more_ips: Vec::new(),
            phase: Some("Running".into()),
            host_network: false,
            node_name: Some(node.into()),
            service_account: Some("default".into()),
            role: role.map(Into::into),
            external_id: None,
            session_name: None,
            deleting: false,
            container_endpoint: false,
            mirror: false,
        }
    }

    /// `pod`, being deleted (its `deletionTimestamp` set; still Running).
    fn terminating(pod: PodRecord) -> PodRecord {
        PodRecord {
            deleting: true,
            ..pod
        }
    }

    fn agent_pod(uid: &str, node: &str, sa: &str, phase: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            namespace: "podiam".into(),
            name: format!("agent-{uid}"),
            ip: Some("192.168.0.1".parse().expect("ip")),
            more_ips: Vec::new(),
            phase: Some(phase.into()),
            host_network: true,
            node_name: Some(node.into()),
            service_account: Some(sa.into()),
            role: None,
            external_id: None,
            session_name: None,
            deleting: false,
            container_endpoint: false,
            mirror: false,
        }
    }

    /// No ServiceAccount gives a role.
    fn no_accounts() -> &'static AccountIndex {
        static NONE: std::sync::OnceLock<AccountIndex> = std::sync::OnceLock::new();
        NONE.get_or_init(AccountIndex::default)
    }

    /// An object's metadata with `annotations`.
    fn meta(
        namespace: Option<&str>,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// The namespaces `with` their annotations, and in each in turn a pod asking for
    /// `app-a`: `p1` at 10.1.0.1, `p2` at 10.1.0.2, …
    fn a_pod_in_each(with: &[(&str, &[(&str, &str)])]) -> (NamespaceIndex, PodIndex) {
        let mut namespaces = NamespaceIndex::default();
        let mut pods = PodIndex::default();
        for (at, (name, annotations)) in with.iter().enumerate() {
            namespaces.apply(&k8s_openapi::api::core::v1::Namespace {
                metadata: meta(None, name, annotations),
                ..Default::default()
            });
            let n = at + 1;
            pods.apply(pod(
                &format!("p{n}"),
                name,
                "n",
                &format!("10.1.0.{n}"),
                Some("app-a"),
            ));
        }
        (namespaces, pods)
    }

    #[test]
    fn a_namespace_with_only_kube2iams_allowed_roles_is_told_what_to_write() {
        let kube2iam = [(policy::KUBE2IAM_ALLOWED_ROLES_ANNOTATION, r#"["app-*"]"#)];
        let (mut namespaces, pods) = a_pod_in_each(&[("old", &kube2iam[..]), ("bare", &[][..])]);
        let accounts = AccountIndex::default();
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: true,
            base_arn: Some(BASE),
        };
        let refusal = |address| {
            view.decide(ip(address), Scope::Cluster)
                .expect_err("nothing permitted")
                .to_string()
        };
        let old = refusal("10.1.0.1");
        assert!(
            old.contains("iam.amazonaws.com/allowed-roles (kube2iam's) is not read"),
            "{old}"
        );
        let bare = refusal("10.1.0.2");
        assert!(
            bare.contains("has no iam.amazonaws.com/permitted annotation"),
            "{bare}"
        );
        assert!(!bare.contains("allowed-roles"), "{bare}");
        // Converted: the hint goes with the annotation.
        let converted = [
            (policy::PERMITTED_ANNOTATION, "app-.*"),
            (policy::KUBE2IAM_ALLOWED_ROLES_ANNOTATION, r#"["app-*"]"#),
        ];
        assert!(namespaces.apply(&k8s_openapi::api::core::v1::Namespace {
            metadata: meta(None, "old", &converted),
            ..Default::default()
        }));
        assert!(
            namespaces.apply(&k8s_openapi::api::core::v1::Namespace {
                metadata: meta(None, "bare", &kube2iam),
                ..Default::default()
            }),
            "the hint alone changes the namespace's refusals"
        );
    }

    #[test]
    fn a_long_permitted_regex_is_quoted_short_in_refusals() {
        let long_invalid = format!("({}", "a".repeat(200_000));
        let long_valid = format!("x{}", "y".repeat(4_000));
        let (namespaces, pods) = a_pod_in_each(&[
            (
                "bad",
                &[(policy::PERMITTED_ANNOTATION, long_invalid.as_str())][..],
            ),
            (
                "narrow",
                &[(policy::PERMITTED_ANNOTATION, long_valid.as_str())][..],
            ),
        ]);
        let accounts = AccountIndex::default();
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: true,
            base_arn: Some(BASE),
        };
        for address in ["10.1.0.1", "10.1.0.2"] {
            let refusal = view
                .decide(ip(address), Scope::Cluster)
                .expect_err("not permitted");
            let Refusal::NotPermitted { why, .. } = &refusal else {
                panic!("{refusal:?}");
            };
            assert!(why.len() < 300, "{address}: {} bytes: {why}", why.len());
            assert!(why.contains("bytes)"), "{why}");
        }
    }

    #[test]
    fn where_a_role_comes_from() {
        let mut namespaces = NamespaceIndex::default();
        for (name, annotations) in [
            (
                "team-a",
                &[
                    (policy::PERMITTED_ANNOTATION, "app-.*"),
                    (policy::DEFAULT_ROLE_ANNOTATION, "app-default"),
                ][..],
            ),
            ("team-b", &[(policy::PERMITTED_ANNOTATION, "b-.*")][..]),
        ] {
            namespaces.apply(&k8s_openapi::api::core::v1::Namespace {
                metadata: meta(None, name, annotations),
                ..Default::default()
            });
        }
        let mut accounts = AccountIndex::default();
        for (namespace, name, role) in [
            ("team-a", "web", Some("app-web")),
            ("team-a", "admin", Some("app-admin")),
            ("team-a", "plain", None),
            ("team-b", "default", Some("admin")),
        ] {
            let annotations: Vec<(&str, &str)> = role
                .map(|role| (policy::ROLE_ANNOTATION, role))
                .into_iter()
                .collect();
            accounts.apply(&k8s_openapi::api::core::v1::ServiceAccount {
                metadata: meta(Some(namespace), name, &annotations),
                ..Default::default()
            });
        }
        assert_eq!(accounts.len(), 3);
        let as_account = |record: PodRecord, account: Option<&str>| PodRecord {
            service_account: account.map(Into::into),
            ..record
        };
        let mut pods = PodIndex::default();
        for record in [
            as_account(
                pod("p1", "team-a", "n", "10.1.0.1", Some("app-own")),
                Some("web"),
            ),
            as_account(pod("p2", "team-a", "n", "10.1.0.2", None), Some("web")),
            as_account(pod("p3", "team-a", "n", "10.1.0.3", None), Some("plain")),
            as_account(pod("p4", "team-a", "n", "10.1.0.4", None), None),
            as_account(pod("p5", "team-b", "n", "10.1.0.5", None), None),
            as_account(pod("p6", "team-b", "n", "10.1.0.6", None), Some("other")),
            // Static pods' mirrors, which a node can create in any namespace.
            PodRecord {
                mirror: true,
                ..pod("p7", "team-a", "n", "10.1.0.7", Some("app-own"))
            },
            PodRecord {
                mirror: true,
                ..as_account(pod("p8", "team-a", "n", "10.1.0.8", None), Some("web"))
            },
            PodRecord {
                mirror: true,
                ..pod("p9", "team-a", "n", "10.1.0.9", None)
            },
        ] {
            pods.apply(record);
        }
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: true,
            base_arn: Some(BASE),
        };
        // (address, the role and where it came from, or the refusal)
        type Want = Result<(&'static str, RoleSource), Reason>;
        let table: &[(&str, Want)] = &[
            ("10.1.0.1", Ok(("app-own", RoleSource::Pod))),
            ("10.1.0.2", Ok(("app-web", RoleSource::ServiceAccount))),
            (
                "10.1.0.3",
                Ok(("app-default", RoleSource::NamespaceDefault)),
            ),
            // No serviceAccountName: the namespace's "default" account, which has none here.
            (
                "10.1.0.4",
                Ok(("app-default", RoleSource::NamespaceDefault)),
            ),
            // The ServiceAccount's role is still the namespace's to permit.
            ("10.1.0.5", Err(Reason::RoleNotPermitted)),
            ("10.1.0.6", Err(Reason::NoRole)),
            // A mirror gets no role from anywhere: its own, its account's, the namespace's.
            ("10.1.0.7", Err(Reason::RoleNotPermitted)),
            ("10.1.0.8", Err(Reason::RoleNotPermitted)),
            ("10.1.0.9", Err(Reason::RoleNotPermitted)),
        ];
        for (address, want) in table {
            let got = view
                .decide(ip(address), Scope::Cluster)
                .map(|d| (d.role.name.clone(), d.source))
                .map_err(|r| r.reason());
            let got = got.as_ref().map(|(n, s)| (n.as_str(), *s)).map_err(|r| *r);
            assert_eq!(got, *want, "{address}");
        }
        let explained = view
            .explain(&ExplainTarget::Pod {
                namespace: "team-a".into(),
                name: "pod-p2".into(),
            })
            .expect("synced");
        assert_eq!(
            (
                explained.role_annotation.as_str(),
                explained.role_source.as_str(),
                explained.service_account.as_str(),
                explained.identity.as_str()
            ),
            ("app-web", "service-account", "web", "address")
        );
        // The annotation removed from the ServiceAccount: the namespace default applies.
        accounts.apply(&k8s_openapi::api::core::v1::ServiceAccount {
            metadata: meta(Some("team-a"), "web", &[]),
            ..Default::default()
        });
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: true,
            base_arn: Some(BASE),
        };
        let decided = view
            .decide(ip("10.1.0.2"), Scope::Cluster)
            .expect("allowed");
        assert_eq!(decided.source, RoleSource::NamespaceDefault);
    }

    fn namespaces() -> NamespaceIndex {
        let mut index = NamespaceIndex::default();
        for (name, permitted) in [("team-a", "app-.*"), ("team-b", "b-.*")] {
            let ns = k8s_openapi::api::core::v1::Namespace {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(name.into()),
                    annotations: Some(
                        [(
                            policy::PERMITTED_ANNOTATION.to_string(),
                            permitted.to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                ..Default::default()
            };
            index.apply(&ns);
        }
        index
    }

    /// Two nodes: a and b, a pod with a role on each, one without, a shared IP across nodes.
    fn cluster() -> PodIndex {
        let mut pods = PodIndex::default();
        for record in [
            pod("a1", "team-a", "node-a", "10.0.0.1", Some("app-reader")),
            pod("a2", "team-a", "node-a", "10.0.0.2", None),
            pod("b1", "team-b", "node-b", "10.0.1.1", Some("b-writer")),
            pod("b2", "team-b", "node-b", "10.0.1.2", Some("app-reader")),
            // 10.0.9.9 is claimed on both nodes; 10.0.8.8 twice on node b.
            pod("x1", "team-a", "node-a", "10.0.9.9", Some("app-reader")),
            pod("x2", "team-b", "node-b", "10.0.9.9", Some("b-writer")),
            pod("y1", "team-b", "node-b", "10.0.8.8", Some("b-writer")),
            pod("y2", "team-b", "node-b", "10.0.8.8", Some("b-writer")),
            // 10.0.5.5 is claimed twice on node a, by pods of two namespaces.
            pod("z1", "team-a", "node-a", "10.0.5.5", Some("app-reader")),
            pod("z2", "team-b", "node-a", "10.0.5.5", Some("b-writer")),
            // 10.0.7.7: a terminating pod with a role, and the new pod given its address
            // (with a role of its own); 10.0.7.8 the same, the new pod without a role;
            // 10.0.6.6: a terminating pod alone.
            terminating(pod("t1", "team-a", "node-a", "10.0.7.7", Some("app-admin"))),
            pod("n1", "team-a", "node-a", "10.0.7.7", Some("app-reader")),
            terminating(pod("t2", "team-a", "node-a", "10.0.7.8", Some("app-admin"))),
            pod("n2", "team-a", "node-a", "10.0.7.8", None),
            terminating(pod(
                "t3",
                "team-a",
                "node-a",
                "10.0.6.6",
                Some("app-reader"),
            )),
            agent_pod("ag-a", "node-a", "podiam-agent", "Running"),
            agent_pod("ag-b", "node-b", "podiam-agent", "Running"),
            agent_pod("ag-pending", "node-c", "podiam-agent", "Pending"),
            agent_pod("ag-done", "node-d", "podiam-agent", "Succeeded"),
            agent_pod("impostor", "node-a", "default", "Running"),
        ] {
            pods.apply(record);
        }
        pods
    }

    /// A synced view of `pods` and `namespaces` under [`BASE`].
    fn synced_view<'a>(pods: &'a PodIndex, namespaces: &'a NamespaceIndex) -> View<'a> {
        View {
            pods,
            namespaces,
            accounts: no_accounts(),
            synced: true,
            base_arn: Some(BASE),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// The reason a wire enum field names.
    fn wire(value: i32) -> Option<Reason> {
        Reason::from_wire(value)
    }

    #[test]
    fn node_binding_table() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = synced_view(&pods, &namespaces);
        let a = Scope::Node("node-a");
        let b = Scope::Node("node-b");
        // (asking scope, address, Ok(pod uid) or the refusal's reason)
        let table: &[(Scope, &str, Result<&str, Reason>)] = &[
            (a, "10.0.0.1", Ok("a1")),
            (a, "10.0.0.2", Err(Reason::NoRole)),
            (a, "10.0.1.1", Err(Reason::OtherNode)),
            (a, "10.0.1.2", Err(Reason::OtherNode)),
            (b, "10.0.1.1", Ok("b1")),
            (b, "10.0.1.2", Err(Reason::RoleNotPermitted)),
            (b, "10.0.0.1", Err(Reason::OtherNode)),
            (a, "10.9.9.9", Err(Reason::UnknownPod)),
            // Claimed on both nodes: each node's agent has its own node's pod there (a packet
            // from the address reaches the agent of the node it comes from). Another node's
            // claim, a stale status or one written with that node's kubelet credentials,
            // cannot make this node's pod ambiguous.
            (a, "10.0.9.9", Ok("x1")),
            (b, "10.0.9.9", Ok("x2")),
            (Scope::Cluster, "10.0.9.9", Err(Reason::AmbiguousPod)),
            // Shared on node b only: node a learns nothing of it.
            (a, "10.0.8.8", Err(Reason::OtherNode)),
            (b, "10.0.8.8", Err(Reason::AmbiguousPod)),
            // A node with no pods, and the empty node name an old agent sent.
            (Scope::Node("node-z"), "10.0.0.1", Err(Reason::OtherNode)),
            (Scope::Node(""), "10.0.0.1", Err(Reason::OtherNode)),
            // Agents' host-network pods are never found by IP.
            (a, "192.168.0.1", Err(Reason::UnknownPod)),
            (Scope::Cluster, "10.0.1.1", Ok("b1")),
            (Scope::Cluster, "10.0.0.1", Ok("a1")),
            // A terminating pod's address given to a new pod is the new pod's: its own role,
            // or none, never the old pod's.
            (a, "10.0.7.7", Ok("n1")),
            (Scope::Cluster, "10.0.7.7", Ok("n1")),
            (a, "10.0.7.8", Err(Reason::NoRole)),
            // A terminating pod alone at its address keeps its role while it shuts down.
            (a, "10.0.6.6", Ok("t3")),
        ];
        for (scope, address, want) in table {
            let got = view
                .decide(ip(address), *scope)
                .map(|d| d.pod.uid.clone())
                .map_err(|r| r.reason());
            assert_eq!(
                got.as_ref().map(String::as_str).map_err(|r| *r),
                *want,
                "{scope:?} asking about {address}"
            );
        }
        // An other-node refusal names nothing of the pod elsewhere.
        let refusal = view.decide(ip("10.0.1.1"), a).expect_err("refused");
        let message = refusal.to_string();
        assert!(
            !message.contains("team-b") && !message.contains("pod-b1"),
            "{message}"
        );
    }

    #[test]
    fn a_terminating_pod_that_lost_its_address_has_no_role() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = synced_view(&pods, &namespaces);
        let a = Scope::Node("node-a");
        let role = |address: &str| {
            view.decide(ip(address), a)
                .map(|d| d.role.name)
                .unwrap_or_default()
        };
        assert_eq!(role("10.0.7.7"), "app-reader");
        assert_eq!(role("10.0.7.8"), "");
        // The old pods are refused, and their node's stream no longer carries them at the
        // address (an agent keeps one pod per address: the new one).
        for old in ["t1", "t2"] {
            let pod = pods.by_uid(old).expect("still known");
            let refusal = view.decide_live(&pod).expect_err("refused");
            assert_eq!(refusal.reason(), Reason::UnknownPod, "{refusal}");
            assert!(refusal.to_string().contains("terminating"), "{refusal}");
            let state = view.pod_state(&pod);
            assert!(state.role_arn.is_empty(), "{state:?}");
            assert_eq!(
                wire(state.refusal_reason),
                Some(Reason::UnknownPod),
                "{state:?}"
            );
            let streamed: Vec<String> = pods
                .on_node("node-a")
                .iter()
                .map(|p| p.uid.clone())
                .collect();
            assert!(!streamed.contains(&old.to_string()), "{streamed:?}");
            let explained = view
                .explain(&ExplainTarget::Pod {
                    namespace: "team-a".into(),
                    name: format!("pod-{old}"),
                })
                .expect("synced");
            assert!(!explained.allowed, "{explained:?}");
            assert_eq!(
                wire(explained.reason),
                Some(Reason::UnknownPod),
                "{explained:?}"
            );
        }
        // Alone, a terminating pod is still streamed with its role.
        let t3 = pods.by_uid("t3").expect("known");
        assert_eq!(view.pod_state(&t3).role_name, "app-reader");
    }

    #[test]
    fn a_pods_refusal_names_nothing_outside_its_namespace() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = synced_view(&pods, &namespaces);
        // 10.0.5.5 is claimed by team-a/pod-z1 and team-b/pod-z2, both on node a.
        let state = |uid: &str| view.pod_state(&pods.by_uid(uid).expect("pod"));
        for (uid, own, other) in [("z1", "team-a", "team-b"), ("z2", "team-b", "team-a")] {
            let told = state(uid);
            assert_eq!(
                wire(told.refusal_reason),
                Some(Reason::AmbiguousPod),
                "{told:?}"
            );
            let other_pod = if uid == "z1" { "pod-z2" } else { "pod-z1" };
            for secret in [other, other_pod] {
                assert!(
                    !told.refusal_message.contains(secret),
                    "{own}'s pod is told about {secret}: {:?}",
                    told.refusal_message
                );
            }
            // The same words become the Event on the pod (the server's survey).
            let pod = pods.by_uid(uid).expect("pod");
            let event = view.decide_live(&pod).expect_err("refused").to_string();
            assert!(
                !event.contains(other) && !event.contains(other_pod),
                "{event}"
            );
        }
        // Asked by address, the answer goes to whichever pod is there: it names nobody.
        for scope in [Scope::Node("node-a"), Scope::Node("node-b"), Scope::Cluster] {
            let refusal = view.decide(ip("10.0.5.5"), scope).expect_err("refused");
            let message = refusal.to_string();
            assert!(
                !["team-a", "team-b", "pod-z1", "pod-z2"]
                    .iter()
                    .any(|s| message.contains(s)),
                "{scope:?}: {message}"
            );
        }
        // A node stream's state is answered to whoever sends from the address, which may be
        // a claimant of another namespace: even pods of the same namespace are only counted
        // there. The Event on a pod, in its own namespace, names them.
        let y1 = state("y1");
        assert!(!y1.refusal_message.contains("pod-y2"), "{y1:?}");
        let event = view
            .decide_live(&pods.by_uid("y1").expect("pod"))
            .expect_err("refused")
            .to_string();
        assert!(event.contains("pod-y2"), "{event}");
        // Operators get every claimant: by address (cluster-wide `list pods`) in the message
        // and the pods…
        let by_ip = view
            .explain(&ExplainTarget::Ip(ip("10.0.5.5")))
            .expect("synced");
        assert!(
            by_ip.message.contains("team-b/pod-z2") && by_ip.message.contains("team-a/pod-z1"),
            "{by_ip:?}"
        );
        assert_eq!(by_ip.pods.len(), 2);
        // …and by name (`get pods` in one namespace) only what that namespace holds.
        let by_name = view
            .explain(&ExplainTarget::Pod {
                namespace: "team-a".into(),
                name: "pod-z1".into(),
            })
            .expect("synced");
        assert_eq!(wire(by_name.reason), Some(Reason::AmbiguousPod));
        assert!(
            !by_name.message.contains("team-b") && !by_name.message.contains("pod-z2"),
            "{by_name:?}"
        );
    }

    #[test]
    fn an_unsynced_view_decides_nothing() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: no_accounts(),
            synced: false,
            base_arn: Some(BASE),
        };
        assert!(matches!(
            view.decide(ip("10.0.0.1"), Scope::Cluster),
            Err(Refusal::NotReady)
        ));
        let target = ExplainTarget::Ip(ip("10.0.0.1"));
        assert!(matches!(view.explain(&target), Err(Refusal::NotReady)));
    }

    fn user(sa: &str, pod: Option<(&str, &str)>, node: Option<&str>) -> ReviewedUser {
        ReviewedUser {
            username: format!("system:serviceaccount:podiam:{sa}"),
            uid: "sa-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            pod_name: pod.map(|(name, _)| name.to_string()),
            pod_uid: pod.map(|(_, uid)| uid.to_string()),
            node_name: node.map(Into::into),
            extra: Default::default(),
        }
    }

    #[test]
    fn agent_binding_table() {
        let pods = cluster();
        let account = AgentAccount::parse("podiam/podiam-agent").expect("account");
        type Want = Result<&'static str, fn(&BindingRefusal) -> bool>;
        let table: Vec<(&str, ReviewedUser, Want)> = vec![
            (
                "agent a's token",
                user("podiam-agent", Some(("agent-ag-a", "ag-a")), Some("node-a")),
                Ok("node-a"),
            ),
            (
                "agent b's token, without the node extra (older API servers)",
                user("podiam-agent", Some(("agent-ag-b", "ag-b")), None),
                Ok("node-b"),
            ),
            (
                "a pending agent pod on its node",
                user(
                    "podiam-agent",
                    Some(("agent-ag-pending", "ag-pending")),
                    None,
                ),
                Ok("node-c"),
            ),
            (
                "a finished agent pod",
                user("podiam-agent", Some(("agent-ag-done", "ag-done")), None),
                Err(|r| matches!(r, BindingRefusal::UnknownPod { .. })),
            ),
            (
                "another service account",
                user("default", Some(("agent-ag-a", "ag-a")), None),
                Err(|r| matches!(r, BindingRefusal::NotAgentAccount { .. })),
            ),
            (
                "a token not bound to a pod (a legacy or TokenRequest without a pod)",
                user("podiam-agent", None, None),
                Err(|r| matches!(r, BindingRefusal::NotBound)),
            ),
            (
                "a deleted agent pod",
                user("podiam-agent", Some(("agent-gone", "gone")), None),
                Err(|r| matches!(r, BindingRefusal::UnknownPod { .. })),
            ),
            (
                "a pod name that does not match its uid",
                user("podiam-agent", Some(("agent-ag-b", "ag-a")), None),
                Err(|r| matches!(r, BindingRefusal::UnknownPod { .. })),
            ),
            (
                "a pod of the agents' account name but running as another account",
                user("podiam-agent", Some(("agent-impostor", "impostor")), None),
                Err(|r| matches!(r, BindingRefusal::PodNotAgent { .. })),
            ),
            (
                "the token's node disagrees with the pod's",
                user("podiam-agent", Some(("agent-ag-a", "ag-a")), Some("node-b")),
                Err(|r| matches!(r, BindingRefusal::NodeMismatch { .. })),
            ),
            (
                "an ordinary pod's uid",
                user("podiam-agent", Some(("pod-a1", "a1")), None),
                Err(|r| matches!(r, BindingRefusal::UnknownPod { .. })),
            ),
        ];
        for (what, reviewed, want) in table {
            let got = bind_agent(&pods, &account, &reviewed);
            match (&got, want) {
                (Ok(agent), Ok(node)) => assert_eq!(agent.node, node, "{what}"),
                (Err(refusal), Err(check)) => assert!(check(refusal), "{what}: {refusal:?}"),
                _ => panic!("{what}: got {got:?}"),
            }
        }
    }

    #[test]
    fn agent_accounts_parse() {
        assert_eq!(
            AgentAccount::parse("podiam/podiam-agent").map(|a| a.username()),
            Some("system:serviceaccount:podiam:podiam-agent".to_string())
        );
        for bad in ["", "podiam", "/x", "x/", "a/b/c", "A/b", "a b/c"] {
            assert_eq!(AgentAccount::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn explain_table() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = synced_view(&pods, &namespaces);
        let by_ip = |s: &str| ExplainTarget::Ip(ip(s));
        let by_name = |ns: &str, name: &str| ExplainTarget::Pod {
            namespace: ns.into(),
            name: name.into(),
        };
        // (target, allowed, reason, pods named, node)
        let table = [
            (by_ip("10.0.0.1"), true, None, 1, "node-a"),
            (by_name("team-a", "pod-a1"), true, None, 1, "node-a"),
            (
                by_name("team-a", "pod-a2"),
                false,
                Some(Reason::NoRole),
                1,
                "node-a",
            ),
            (
                by_name("team-b", "pod-b2"),
                false,
                Some(Reason::RoleNotPermitted),
                1,
                "node-b",
            ),
            (by_ip("10.0.9.9"), false, Some(Reason::AmbiguousPod), 2, ""),
            // Claimed on another node too: its own node's agent answers it all the same.
            (by_name("team-a", "pod-x1"), true, None, 1, "node-a"),
            (
                by_name("team-a", "pod-z1"),
                false,
                Some(Reason::AmbiguousPod),
                1,
                "node-a",
            ),
            (by_ip("10.9.9.9"), false, Some(Reason::UnknownPod), 0, ""),
            (
                by_name("team-a", "nope"),
                false,
                Some(Reason::UnknownPod),
                0,
                "",
            ),
        ];
        for (target, allowed, reason, named, node) in table {
            let answer = view.explain(&target).expect("synced");
            assert_eq!(answer.allowed, allowed, "{target:?}");
            assert_eq!(wire(answer.reason), reason, "{target:?}");
            assert_eq!(answer.pods.len(), named, "{target:?}");
            assert_eq!(answer.node_name, node, "{target:?}");
        }
        let answer = view.explain(&by_name("team-b", "pod-b2")).expect("synced");
        assert_eq!(answer.role_arn, format!("{BASE}app-reader"));
        assert_eq!(answer.permitted_regex, "b-.*");
    }

    #[test]
    fn pod_states_carry_role_or_reason() {
        let pods = cluster();
        let namespaces = namespaces();
        let view = synced_view(&pods, &namespaces);
        let state = |uid: &str| view.pod_state(&pods.by_uid(uid).expect("pod"));
        let a1 = state("a1");
        assert_eq!(a1.role_name, "app-reader");
        assert_eq!(wire(a1.refusal_reason), None, "{a1:?}");
        assert_eq!(wire(state("a2").refusal_reason), Some(Reason::NoRole));
        assert_eq!(wire(state("y1").refusal_reason), Some(Reason::AmbiguousPod));
        assert_eq!(
            wire(state("b2").refusal_reason),
            Some(Reason::RoleNotPermitted)
        );
        // Agents of the previous release read the reason's name, while a cluster upgrades.
        #[allow(deprecated)]
        let legacy = state("b2").legacy_refusal_reason;
        assert_eq!(legacy, "role-not-permitted");
    }

    #[test]
    fn a_namespace_that_requires_tokens_keeps_its_roles_off_the_address_alone() {
        let pods = cluster();
        let mut namespaces = namespaces();
        let labelled = |value: &str| k8s_openapi::api::core::v1::Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("team-a".into()),
                annotations: Some(
                    [(policy::PERMITTED_ANNOTATION.to_string(), "app-.*".into())].into(),
                ),
                labels: Some([(policy::POD_IDENTITY_LABEL.to_string(), value.into())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        // Labelled `enabled` (the webhook's opt-in): nothing changes for the decision.
        assert!(!namespaces.apply(&labelled("enabled")));
        assert!(!namespaces.token_required("team-a"));
        // `required`: a change, and the role stands beside the metadata endpoint's refusal.
        assert!(namespaces.apply(&labelled(policy::TOKEN_REQUIRED)));
        let view = synced_view(&pods, &namespaces);
        let a1 = view.pod_state(&pods.by_uid("a1").expect("pod"));
        assert_eq!(a1.role_name, "app-reader");
        assert_eq!(wire(a1.refusal_reason), Some(Reason::TokenRequired));
        assert!(
            a1.refusal_message
                .contains("podiam.io/pod-identity=required"),
            "{a1:?}"
        );
        // Agents of the previous release see a refusal too (they read the name).
        #[allow(deprecated)]
        let legacy = a1.legacy_refusal_reason;
        assert_eq!(legacy, "token-required");
        let decision = view
            .decide(ip("10.0.0.1"), Scope::Cluster)
            .expect("permitted");
        assert!(matches!(
            view.by_address(decision),
            Err(Refusal::TokenRequired { .. })
        ));
        let answer = view
            .explain(&ExplainTarget::Ip(ip("10.0.0.1")))
            .expect("synced");
        assert!(answer.allowed);
        // a1's containers are not set up for the container endpoint: it has no way in.
        assert_eq!(answer.identity, "token required, not set up");
        // Refusals stay what they were; another namespace is not concerned.
        assert_eq!(
            wire(
                view.pod_state(&pods.by_uid("a2").expect("pod"))
                    .refusal_reason
            ),
            Some(Reason::NoRole)
        );
        let b1 = view
            .decide(ip("10.0.1.1"), Scope::Cluster)
            .expect("permitted");
        assert!(view.by_address(b1).is_ok());
        // Taken back: a change, and the address alone is enough again.
        assert!(namespaces.apply(&labelled("enabled")));
        let view = synced_view(&pods, &namespaces);
        let decision = view
            .decide(ip("10.0.0.1"), Scope::Cluster)
            .expect("permitted");
        assert!(view.by_address(decision).is_ok());
        assert_eq!(
            wire(
                view.pod_state(&pods.by_uid("a1").expect("pod"))
                    .refusal_reason
            ),
            None
        );
    }

    #[test]
    fn pod_token_table() {
        let web = PodRecord {
            service_account: Some("web".into()),
            ..pod("w1", "team-a", "node-a", "10.0.0.5", Some("app-reader"))
        };
        let defaulted = PodRecord {
            service_account: None,
            ..pod("d1", "team-a", "node-a", "10.0.0.6", Some("app-reader"))
        };
        let token = |ns: &str, sa: &str, bound: Option<(&str, &str)>| ReviewedUser {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            uid: "sa-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            pod_name: bound.map(|(name, _)| name.to_string()),
            pod_uid: bound.map(|(_, uid)| uid.to_string()),
            node_name: Some("node-a".into()),
            extra: Default::default(),
        };
        type Want = fn(&Result<(), PodTokenRefusal>) -> bool;
        let table: Vec<(&str, &PodRecord, ReviewedUser, Want)> = vec![
            (
                "the pod's own bound token",
                &web,
                token("team-a", "web", Some(("pod-w1", "w1"))),
                |r| r.is_ok(),
            ),
            (
                "no service account on the pod means default",
                &defaulted,
                token("team-a", "default", Some(("pod-d1", "d1"))),
                |r| r.is_ok(),
            ),
            (
                "another pod's token, same account",
                &web,
                token("team-a", "web", Some(("pod-w2", "w2"))),
                |r| matches!(r, Err(PodTokenRefusal::OtherPod { .. })),
            ),
            (
                "the same name recreated (another uid)",
                &web,
                token("team-a", "web", Some(("pod-w1", "w1-old"))),
                |r| matches!(r, Err(PodTokenRefusal::OtherPod { .. })),
            ),
            (
                "another account of the namespace",
                &web,
                token("team-a", "default", Some(("pod-w1", "w1"))),
                |r| matches!(r, Err(PodTokenRefusal::OtherAccount { .. })),
            ),
            (
                "the same account name in another namespace",
                &web,
                token("team-b", "web", Some(("pod-w1", "w1"))),
                |r| matches!(r, Err(PodTokenRefusal::OtherAccount { .. })),
            ),
            (
                "a token bound to no pod (a secret-based or unbound token)",
                &web,
                token("team-a", "web", None),
                |r| matches!(r, Err(PodTokenRefusal::NotBound)),
            ),
        ];
        for (what, pod, user, want) in table {
            let got = prove_pod(pod, &user);
            assert!(want(&got), "{what}: {got:?}");
        }
    }
}
