//! The server's view of the cluster: live pods by IP, namespaces' permitted rules and
//! default roles, and the roles ServiceAccounts give their pods.
//!
//! One task per resource owns the writes (see `watch`); gRPC handlers only read. Records
//! are slimmed to the fields decisions use; whole Pod objects are never kept.
//!
//! Fail-closed rules of the IP lookup:
//! - only live pods are indexed: phase Pending or Running, an IP set, not host network;
//! - an IP claimed by two live pods answers [`Lookup::Ambiguous`] — neither gets a role;
//! - a pod that turns terminal (Succeeded/Failed) or is deleted leaves the index at once, so
//!   a later pod reusing its IP is the only claimant;
//! - a terminating pod (its `deletionTimestamp` set) holds its IP only while no pod that is
//!   not terminating claims it too. Alone it keeps its role through its graceful shutdown;
//!   once a new pod has the address, the new pod is the one found (never ambiguous, so the
//!   new pod is not blocked for the old one's grace period), the old one is refused, and
//!   agents' node streams no longer carry it ([`PodIndex::on_node`]), so no agent can
//!   answer the address as the old pod.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::policy::{
    DEFAULT_ROLE_ANNOTATION, EXTERNAL_ID_ANNOTATION, KUBE2IAM_ALLOWED_ROLES_ANNOTATION,
    PERMITTED_ANNOTATION, POD_IDENTITY_LABEL, Permitted, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION,
    TOKEN_REQUIRED,
};
use crate::slim::{SlimPod, SlimPodSpec};

/// The fields of a pod that podiam's decisions use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `status.podIP`, parsed once here ([`podiam_proto::parse_ip`]): every lookup compares
    /// addresses, never spellings.
    pub ip: Option<IpAddr>,
    /// The pod's other addresses (`status.podIPs` beyond `podIP`: a dual-stack pod's other
    /// family), parsed the same way; it is found by each.
    pub more_ips: Vec<IpAddr>,
    /// The names below are shared by many pods: the index holds one copy of each
    /// ([`PodIndex`]).
    pub phase: Option<Arc<str>>,
    pub host_network: bool,
    pub node_name: Option<Arc<str>>,
    pub service_account: Option<Arc<str>>,
    pub role: Option<Arc<str>>,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    pub deleting: bool,
    /// Whether a container of the pod is set up for the container-credentials endpoint
    /// (`AWS_CONTAINER_CREDENTIALS_FULL_URI` naming its address): explain says so.
    pub container_endpoint: bool,
    /// Whether the pod is a static pod's mirror (annotation [`MIRROR_ANNOTATION`]): made by
    /// a kubelet, which may make one in any namespace with any annotations and set its IP.
    /// Never given a role: see [`crate::decision::View::decide_pod`].
    pub mirror: bool,
}

/// Longest annotation value kept as it is (a role, an external ID, a session name): longer
/// than any AWS takes (a role ARN is under 700 characters, an external ID 1224 at most, a
/// session name 64). A longer one, a tenant's up to 256 KiB, is kept as
/// [`crate::policy::quoted`] gives it: invalid as a role or an external ID, the same session
/// name (its first 64 characters), and small wherever it is copied for each pod.
pub const MAX_KEPT: usize = 2048;

/// An annotation's value as the index keeps it ([`MAX_KEPT`]).
fn kept(value: &str) -> String {
    if value.len() <= MAX_KEPT {
        value.to_string()
    } else {
        crate::policy::quoted(value)
    }
}

/// The annotation the kubelet puts on the mirror of each static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

impl PodRecord {
    /// Slims a Kubernetes Pod to the fields podiam uses; `None` if it has no UID or name.
    pub fn from_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Option<PodRecord> {
        PodRecord::from_slim(&SlimPod::from(pod), ROLE_ANNOTATION)
    }

    /// [`PodRecord::from_pod`] of a pod decoded slim, the role read from the annotation
    /// `role_key` (podiam-server --role-annotation: kube2iam's --iam-role-key).
    pub fn from_slim(pod: &SlimPod, role_key: &str) -> Option<PodRecord> {
        let meta = &pod.metadata;
        let annotation = |key: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(|v| kept(v.trim()))
                .filter(|v| !v.is_empty())
        };
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let primary = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| podiam_proto::parse_ip(ip).ok());
        let mut more_ips: Vec<IpAddr> = Vec::new();
        for ip in status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| podiam_proto::parse_ip(&ip.ip).ok())
        {
            if Some(ip) != primary && !more_ips.contains(&ip) {
                more_ips.push(ip);
            }
        }
        // Without a primary address the others are not trusted either.
        if primary.is_none() {
            more_ips.clear();
        }
        Some(PodRecord {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone()?,
            // An IP that does not parse is no IP: the pod cannot be found by one.
            ip: primary,
            more_ips,
            phase: status.and_then(|s| s.phase.as_deref()).map(Arc::from),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            node_name: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
            service_account: spec
                .and_then(|s| s.service_account_name.as_deref())
                .map(Arc::from),
            role: annotation(role_key).map(Arc::from),
            external_id: annotation(EXTERNAL_ID_ANNOTATION),
            session_name: annotation(SESSION_NAME_ANNOTATION),
            deleting: meta.deletion_timestamp.is_some(),
            container_endpoint: spec.is_some_and(SlimPodSpec::uses_container_endpoint),
            // Present at all (its value is a hash of the static pod's file).
            mirror: meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)),
        })
    }

    /// Whether this is a host-network pod that runs (or is starting) on a node: how agent
    /// pods look. Such pods are never found by IP (they share their node's).
    pub fn is_running_on_host(&self) -> bool {
        self.host_network
            && self.node_name.as_deref().is_some_and(|n| !n.is_empty())
            && matches!(self.phase.as_deref(), Some("Pending") | Some("Running"))
    }

    /// Every address the pod is found by: `podIP` first, then the others.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.into_iter().chain(self.more_ips.iter().copied())
    }

    /// Whether this pod may be found by its IP at all.
    pub fn is_live(&self) -> bool {
        self.ip.is_some()
            && !self.host_network
            && matches!(self.phase.as_deref(), Some("Pending") | Some("Running"))
    }
}

/// What an IP lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<PodRecord>),
    Unknown,
    /// Several live pods claim the IP (each of them, sorted by namespace and name).
    Ambiguous(Vec<Arc<PodRecord>>),
}

/// Live pods indexed by IP, by node (for agents' node streams), and by UID so that
/// updates find the pod's previous IP and node; and the host-network pods that run (agents
/// among them), by UID, so that an agent's bound pod can be found.
///
/// Memory (a server holds one index, two during a relist): every map holds the same
/// `Arc<PodRecord>`, never a copy of its UID; node, ServiceAccount, role and phase names
/// are interned ([`Interner`]); an address with one claimant, as nearly all have, takes no
/// allocation of its own ([`Claimants`]). A record that did not change is kept, so an
/// update that touched only fields podiam does not read costs nothing, and a relist
/// ([`PodIndex::for_relist`]) reuses the records it finds unchanged: it allocates its maps,
/// not a second copy of every pod. At 100k pods (the benchmark's) this took the index from
/// 87 to 44 MiB, and what a relist adds while both indexes exist from 87 to 13 MiB.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_uid: HashSet<ByUid>,
    /// Host-network pods that are Pending or Running on a node: never found by IP.
    host: HashSet<ByUid>,
    by_ip: HashMap<IpAddr, Claimants>,
    /// Keyed by the interned node name (empty for none).
    by_node: HashMap<Arc<str>, HashSet<ByUid>>,
    strings: Interner,
    /// During a relist, the index being replaced: its records are reused where unchanged.
    previous: Option<HashSet<ByUid>>,
    /// The pod annotation naming the role, when not [`ROLE_ANNOTATION`].
    role_key: Option<Arc<str>>,
}

/// A pod record in a set or map keyed by its UID (found by `&str`), so that no map holds a
/// copy of the UID (the index's sets, and what each server's node stream remembers).
#[derive(Clone, Debug)]
pub struct ByUid(pub Arc<PodRecord>);

impl std::hash::Hash for ByUid {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it (`Borrow`).
        self.0.uid.as_str().hash(state);
    }
}

impl PartialEq for ByUid {
    fn eq(&self, other: &Self) -> bool {
        self.0.uid == other.0.uid
    }
}

impl Eq for ByUid {}

impl std::borrow::Borrow<str> for ByUid {
    fn borrow(&self) -> &str {
        &self.0.uid
    }
}

/// The live pods claiming one address: one, as nearly always, held without a vector.
#[derive(Clone, Debug)]
enum Claimants {
    One(Arc<PodRecord>),
    Many(Vec<Arc<PodRecord>>),
}

impl Claimants {
    fn as_slice(&self) -> &[Arc<PodRecord>] {
        match self {
            Claimants::One(pod) => std::slice::from_ref(pod),
            Claimants::Many(pods) => pods,
        }
    }

    fn add(&mut self, pod: Arc<PodRecord>) {
        match self {
            Claimants::One(first) => *self = Claimants::Many(vec![Arc::clone(first), pod]),
            Claimants::Many(pods) => pods.push(pod),
        }
    }

    /// Takes the pod `uid` away; `None` when no claimant is left.
    fn without(self, uid: &str) -> Option<Claimants> {
        match self {
            Claimants::One(pod) if pod.uid == uid => None,
            Claimants::One(pod) => Some(Claimants::One(pod)),
            Claimants::Many(mut pods) => {
                pods.retain(|pod| pod.uid != uid);
                match pods.len() {
                    0 => None,
                    1 => pods.pop().map(Claimants::One),
                    _ => Some(Claimants::Many(pods)),
                }
            }
        }
    }
}

/// The one copy of each name many pods share: their nodes, ServiceAccounts, roles and
/// phases. A name no record uses any more is dropped at the next sweep, which comes each
/// time the set has doubled since the last, so the set stays within twice the names in
/// use and sweeping costs O(1) per name added.
#[derive(Clone, Debug, Default)]
struct Interner {
    names: HashSet<Arc<str>>,
    /// How many names the last sweep left.
    swept_to: usize,
}

/// Names an interner holds before it first sweeps.
const INTERNER_FIRST_SWEEP: usize = 1024;

impl Interner {
    fn intern(&mut self, name: &Arc<str>) -> Arc<str> {
        if let Some(held) = self.names.get(name) {
            return Arc::clone(held);
        }
        if self.names.len() >= (2 * self.swept_to).max(INTERNER_FIRST_SWEEP) {
            // Names held here only.
            self.names.retain(|held| Arc::strong_count(held) > 1);
            self.swept_to = self.names.len();
        }
        self.names.insert(Arc::clone(name));
        Arc::clone(name)
    }

    fn intern_opt(&mut self, name: &mut Option<Arc<str>>) {
        if let Some(name) = name {
            *name = self.intern(name);
        }
    }
}

impl PodIndex {
    /// An empty index that reads pods' roles from the annotation `role_key`.
    pub fn keyed(role_key: &str) -> PodIndex {
        PodIndex {
            role_key: (role_key != ROLE_ANNOTATION).then(|| Arc::from(role_key)),
            ..PodIndex::default()
        }
    }

    /// An empty index to relist into, with this one's role annotation, that reuses this
    /// one's records and names where the relist finds them unchanged.
    /// [`PodIndex::relisted`] lets go of the rest.
    pub fn for_relist(&self) -> PodIndex {
        let mut previous = self.by_uid.clone();
        previous.extend(self.host.iter().cloned());
        PodIndex {
            strings: self.strings.clone(),
            previous: Some(previous),
            role_key: self.role_key.clone(),
            ..PodIndex::default()
        }
    }

    /// Ends a relist: forgets the replaced index's records.
    pub fn relisted(&mut self) {
        self.previous = None;
    }

    /// The pod annotation this index reads roles from.
    pub fn role_key(&self) -> &str {
        self.role_key.as_deref().unwrap_or(ROLE_ANNOTATION)
    }

    /// Records a Kubernetes Pod, its role read from [`PodIndex::role_key`]; whether that
    /// changed the index (see [`PodIndex::apply`]).
    pub fn apply_pod(&mut self, pod: &SlimPod) -> bool {
        match PodRecord::from_slim(pod, self.role_key()) {
            Some(record) => self.apply(record),
            None => false,
        }
    }

    /// Records the pod's current state: indexes it if live, forgets it otherwise. False
    /// when the index already held exactly this record: most of a pod's updates (labels,
    /// container statuses, conditions) change nothing podiam keeps, and nothing that
    /// follows the index needs to look again.
    pub fn apply(&mut self, pod: PodRecord) -> bool {
        let held = self.by_uid(&pod.uid);
        if held.as_deref() == Some(&pod) {
            return false;
        }
        let reused = self
            .previous
            .as_ref()
            .and_then(|previous| previous.get(pod.uid.as_str()))
            .filter(|previous| *previous.0 == pod)
            .map(|previous| Arc::clone(&previous.0));
        self.remove(&pod.uid);
        let live = pod.is_live();
        if !live && !pod.is_running_on_host() {
            // Forgotten if it was held; a pod that never was (pending, no address) changed
            // nothing however often it is updated.
            return held.is_some();
        }
        let pod = reused.unwrap_or_else(|| Arc::new(self.interned(pod)));
        if !live {
            self.host.insert(ByUid(pod));
            return true;
        }
        for ip in pod.ips() {
            match self.by_ip.get_mut(&ip) {
                Some(claimants) => claimants.add(Arc::clone(&pod)),
                None => {
                    self.by_ip.insert(ip, Claimants::One(Arc::clone(&pod)));
                }
            }
        }
        let node = self.node_key(&pod);
        self.by_node
            .entry(node)
            .or_default()
            .insert(ByUid(Arc::clone(&pod)));
        self.by_uid.insert(ByUid(pod));
        true
    }

    /// `pod` with its shared names replaced by the index's copies.
    fn interned(&mut self, mut pod: PodRecord) -> PodRecord {
        for name in [
            &mut pod.phase,
            &mut pod.node_name,
            &mut pod.service_account,
            &mut pod.role,
        ] {
            self.strings.intern_opt(name);
        }
        pod
    }

    /// The key of `pod`'s node in `by_node`: its interned name, empty for none.
    fn node_key(&mut self, pod: &PodRecord) -> Arc<str> {
        match &pod.node_name {
            Some(node) => Arc::clone(node),
            None => self.strings.intern(&Arc::from("")),
        }
    }

    /// Forgets a pod (deleted); whether the index held it.
    pub fn remove(&mut self, uid: &str) -> bool {
        let on_host = self.host.remove(uid);
        let Some(ByUid(old)) = self.by_uid.take(uid) else {
            return on_host;
        };
        for ip in old.ips() {
            if let Some(claimants) = self.by_ip.remove(&ip)
                && let Some(left) = claimants.without(uid)
            {
                self.by_ip.insert(ip, left);
            }
        }
        let node = old.node_name.as_deref().unwrap_or_default();
        if let Some(uids) = self.by_node.get_mut(node) {
            uids.remove(uid);
            if uids.is_empty() {
                self.by_node.remove(node);
            }
        }
        true
    }

    /// The live pod `namespace/name`, if any (a scan: for operators' questions only).
    pub fn by_name(&self, namespace: &str, name: &str) -> Option<Arc<PodRecord>> {
        self.by_uid
            .iter()
            .find(|p| p.0.namespace == namespace && p.0.name == name)
            .map(|p| Arc::clone(&p.0))
    }

    /// The pod with this UID if it is live, or runs on a node's host network (an agent).
    /// Whether a Pending or Running host-network pod of `namespace` with `service_account`
    /// has `ip`: an agent of that account at its node's address. Looks through the
    /// host-network pods (a few per node); for the rare caller that needs it.
    pub fn host_pod_at(&self, ip: IpAddr, namespace: &str, service_account: &str) -> bool {
        self.host.iter().any(|ByUid(pod)| {
            (pod.ip == Some(ip) || pod.more_ips.contains(&ip))
                && pod.namespace == namespace
                && pod.service_account.as_deref() == Some(service_account)
        })
    }

    pub fn by_uid(&self, uid: &str) -> Option<Arc<PodRecord>> {
        self.by_uid
            .get(uid)
            .or_else(|| self.host.get(uid))
            .map(|p| Arc::clone(&p.0))
    }

    /// The live pods scheduled on `node` that hold their IP (every one of them when `node`
    /// is empty): what agents' node streams carry, and what the server surveys. A
    /// terminating pod whose IP another pod has taken is left out.
    pub fn on_node(&self, node: &str) -> Vec<Arc<PodRecord>> {
        let pods = if node.is_empty() {
            Some(&self.by_uid)
        } else {
            self.by_node.get(node)
        };
        pods.into_iter()
            .flatten()
            .filter(|pod| self.holds_ip(&pod.0))
            .map(|pod| Arc::clone(&pod.0))
            .collect()
    }

    /// Whether `pod` still holds its IPs: it is not terminating, or no pod of its node that
    /// is not terminating claims any of them too.
    pub fn holds_ip(&self, pod: &PodRecord) -> bool {
        !pod.deleting
            || pod
                .ips()
                .all(|ip| self.claimants(ip, pod.node_name.as_deref()).1.is_empty())
    }

    /// The live pods claiming `ip`, those on `node` only when one is given: (terminating
    /// ones, the others).
    fn claimants(
        &self,
        ip: IpAddr,
        node: Option<&str>,
    ) -> (Vec<&Arc<PodRecord>>, Vec<&Arc<PodRecord>>) {
        self.by_ip
            .get(&ip)
            .map(Claimants::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|pod| node.is_none_or(|node| pod.node_name.as_deref() == Some(node)))
            .partition(|pod| pod.deleting)
    }

    /// The one live pod holding this IP, if exactly one: the one pod claiming it that is not
    /// terminating, or, when every claimant is terminating, the only one.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.lookup_among(ip, None)
    }

    /// As [`PodIndex::lookup`], among the pods of `node` only. A packet from a pod's address
    /// reaches its own node's agent (the DNAT rule is the node's), so another node's pod
    /// claiming the same address (a stale status; or a status written with one node's
    /// kubelet credentials to make a pod elsewhere ambiguous) has no say in what this node's
    /// pod is.
    pub fn lookup_on(&self, ip: IpAddr, node: &str) -> Lookup {
        self.lookup_among(ip, Some(node))
    }

    fn lookup_among(&self, ip: IpAddr, node: Option<&str>) -> Lookup {
        let (terminating, others) = self.claimants(ip, node);
        let pods = if others.is_empty() {
            terminating
        } else {
            others
        };
        match pods.as_slice() {
            [] => Lookup::Unknown,
            [pod] => Lookup::Found(Arc::clone(pod)),
            many => {
                let mut pods: Vec<Arc<PodRecord>> = many.iter().map(|p| Arc::clone(p)).collect();
                pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                Lookup::Ambiguous(pods)
            }
        }
    }

    /// Number of live pods indexed.
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    /// Whether no live pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}

/// How much memory the compiled permitted rules of every namespace may take together, as
/// [`Permitted::cost`] counts it: 64 MiB, an eighth of the server's 512 MiB limit in
/// `deploy/`. Typical rules cost 11 to 28 KiB each (`team-a/.*` 11, `\w{20}|n1` 15 to 17,
/// `(app|web|db)-[a-z0-9-]{1,40}` 28), so some 4000 namespaces with a rule of their own
/// fit; namespaces with the same value share one rule.
/// A rule that would go over is invalid (nothing permitted in its namespace, and it says
/// why) until room is made.
pub const COMPILED_RULES_BUDGET: usize = 64 << 20;

/// A compiled rule, the namespaces using it, and what it counts against the budget.
#[derive(Clone, Debug)]
struct Compiled {
    rule: Arc<Permitted>,
    cost: usize,
    users: usize,
}

/// The namespace's [`POD_IDENTITY_LABEL`] value, if it has one.
pub fn pod_identity_label(ns: &k8s_openapi::api::core::v1::Namespace) -> Option<&str> {
    ns.metadata
        .labels
        .as_ref()?
        .get(POD_IDENTITY_LABEL)
        .map(String::as_str)
}

/// Namespaces' permitted rules, compiled once per annotation value, all within one memory
/// budget.
///
/// Every compiled rule a namespace uses is in `compiled` and counted in `compiled_bytes`, so
/// the budget covers all of them; a rule leaves when its last namespace does. A rule refused
/// for the budget is remembered with its namespace and compiled again, in namespace order,
/// whenever rules leave.
#[derive(Clone, Debug)]
pub struct NamespaceIndex {
    rules: HashMap<String, Arc<Permitted>>,
    /// Namespaces' `iam.amazonaws.com/default-role`, where set.
    default_roles: HashMap<String, String>,
    /// Namespaces with kube2iam's `iam.amazonaws.com/allowed-roles`, which podiam does not
    /// read: named in their refusals, so that the migration step is not missed.
    kube2iam_allowed: HashSet<String>,
    /// Namespaces labelled `podiam.io/pod-identity=required`: their pods' roles are given
    /// with the pod's token only.
    token_required: HashSet<String>,
    /// Compiled rules by annotation value (trimmed).
    compiled: HashMap<String, Compiled>,
    compiled_bytes: usize,
    budget: usize,
    /// Namespaces whose rule did not fit, with its value.
    over_budget: BTreeMap<String, String>,
}

impl Default for NamespaceIndex {
    fn default() -> Self {
        NamespaceIndex::with_budget(COMPILED_RULES_BUDGET)
    }
}

impl NamespaceIndex {
    /// An empty index whose rules may take `budget` bytes together.
    pub fn with_budget(budget: usize) -> NamespaceIndex {
        NamespaceIndex {
            rules: HashMap::new(),
            default_roles: HashMap::new(),
            kube2iam_allowed: HashSet::new(),
            token_required: HashSet::new(),
            compiled: HashMap::new(),
            compiled_bytes: 0,
            budget,
            over_budget: BTreeMap::new(),
        }
    }

    /// An empty index to relist into, holding this one's compiled rules for reuse: a relist
    /// compiles only what changed, and the rules both indexes hold count once against the
    /// budget. [`NamespaceIndex::relisted`] lets go of those no namespace took up again.
    pub fn for_relist(&self) -> NamespaceIndex {
        NamespaceIndex {
            compiled: self
                .compiled
                .iter()
                .map(|(source, compiled)| {
                    let reusable = Compiled {
                        users: 0,
                        ..compiled.clone()
                    };
                    (source.clone(), reusable)
                })
                .collect(),
            compiled_bytes: self.compiled_bytes,
            ..NamespaceIndex::with_budget(self.budget)
        }
    }

    /// Ends a relist: drops the reusable rules no namespace took up, and gives their room to
    /// rules that did not fit.
    pub fn relisted(&mut self) {
        if self.evict_unused() {
            self.retry_over_budget();
        }
    }

    /// Records a namespace's annotations and its [`POD_IDENTITY_LABEL`]; recompiles only
    /// when the annotation changed. Returns whether what its pods are decided on changed.
    pub fn apply(&mut self, ns: &k8s_openapi::api::core::v1::Namespace) -> bool {
        let Some(name) = ns.metadata.name.as_deref() else {
            return false;
        };
        let annotation = |key: &str| {
            ns.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let default_role_changed = match annotation(DEFAULT_ROLE_ANNOTATION).map(kept) {
            Some(role) if self.default_roles.get(name) == Some(&role) => false,
            Some(role) => {
                self.default_roles.insert(name.to_string(), role);
                true
            }
            None => self.default_roles.remove(name).is_some(),
        };
        let allowed_toggled = if annotation(KUBE2IAM_ALLOWED_ROLES_ANNOTATION).is_some() {
            self.kube2iam_allowed.insert(name.to_string())
        } else {
            self.kube2iam_allowed.remove(name)
        };
        let required = pod_identity_label(ns) == Some(TOKEN_REQUIRED);
        let required_toggled = if required {
            self.token_required.insert(name.to_string())
        } else {
            self.token_required.remove(name)
        };
        let others_changed = allowed_toggled || required_toggled || default_role_changed;
        let value = annotation(PERMITTED_ANNOTATION);
        let unchanged = self
            .rules
            .get(name)
            .is_some_and(|rule| source_of(rule) == value);
        if unchanged {
            return others_changed;
        }
        let freed = self.release(name);
        let rule = self.acquire(name, value);
        self.rules.insert(name.to_string(), rule);
        if freed {
            self.retry_over_budget();
        }
        true
    }

    /// Forgets a namespace.
    pub fn remove(&mut self, name: &str) {
        self.default_roles.remove(name);
        self.kube2iam_allowed.remove(name);
        self.token_required.remove(name);
        if self.release(name) {
            self.retry_over_budget();
        }
    }

    /// Takes the namespace's rule away, and its compiled rule with it if no other namespace
    /// uses it; returns whether that made room.
    fn release(&mut self, name: &str) -> bool {
        self.over_budget.remove(name);
        let Some(rule) = self.rules.remove(name) else {
            return false;
        };
        let Some(source) = source_of(&rule) else {
            return false;
        };
        let Some(compiled) = self.compiled.get_mut(source) else {
            return false;
        };
        if !Arc::ptr_eq(&compiled.rule, &rule) {
            // An invalid rule of the same text: it never counted.
            return false;
        }
        compiled.users = compiled.users.saturating_sub(1);
        if compiled.users > 0 {
            return false;
        }
        let cost = compiled.cost;
        self.compiled.remove(source);
        self.compiled_bytes -= cost;
        true
    }

    /// The rule for namespace `name` with annotation `value`: shared with namespaces of the
    /// same value, else compiled, and counted against the budget.
    fn acquire(&mut self, name: &str, value: Option<&str>) -> Arc<Permitted> {
        let Some(source) = value else {
            return Arc::new(Permitted::Nothing);
        };
        if let Some(compiled) = self.compiled.get_mut(source) {
            compiled.users += 1;
            return Arc::clone(&compiled.rule);
        }
        let rule = Permitted::compile(Some(source));
        if !matches!(rule, Permitted::Regex { .. }) {
            return Arc::new(rule);
        }
        let cost = rule.cost();
        if self.compiled_bytes + cost > self.budget {
            self.evict_unused();
        }
        if self.compiled_bytes + cost > self.budget {
            self.over_budget
                .insert(name.to_string(), source.to_string());
            return Arc::new(Permitted::Invalid {
                source: source.to_string(),
                error: format!(
                    "the server's memory for permitted rules is used up ({} KiB of {} KiB, by {} rules); this one needs {} KiB",
                    self.compiled_bytes.div_ceil(1024),
                    self.budget >> 10,
                    self.compiled.len(),
                    cost.div_ceil(1024)
                ),
            });
        }
        let rule = Arc::new(rule);
        self.compiled.insert(
            source.to_string(),
            Compiled {
                rule: Arc::clone(&rule),
                cost,
                users: 1,
            },
        );
        self.compiled_bytes += cost;
        rule
    }

    /// Drops compiled rules no namespace uses (kept from before a relist); returns whether
    /// any went.
    fn evict_unused(&mut self) -> bool {
        let before = self.compiled.len();
        let mut freed = 0;
        self.compiled.retain(|_, compiled| {
            let keep = compiled.users > 0;
            if !keep {
                freed += compiled.cost;
            }
            keep
        });
        self.compiled_bytes -= freed;
        self.compiled.len() != before
    }

    /// Compiles the rules refused for the budget again, in namespace order, until one still
    /// does not fit: each time rules leave, at most one compilation is spent in vain.
    fn retry_over_budget(&mut self) {
        while let Some((name, source)) = self.over_budget.pop_first() {
            self.rules.remove(&name);
            let rule = self.acquire(&name, Some(&source));
            self.rules.insert(name.clone(), rule);
            if self.over_budget.contains_key(&name) {
                break;
            }
        }
    }

    /// Number of namespaces known.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no namespace is known.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Number of distinct compiled rules held.
    pub fn compiled_len(&self) -> usize {
        self.compiled.len()
    }

    /// The memory the compiled rules take, as the budget counts it.
    pub fn compiled_bytes(&self) -> usize {
        self.compiled_bytes
    }

    /// The namespace's rule; an unknown namespace permits nothing.
    pub fn rule(&self, name: &str) -> Arc<Permitted> {
        self.rules
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Permitted::Nothing))
    }

    /// The namespace's `iam.amazonaws.com/default-role`, if it has one.
    pub fn default_role(&self, name: &str) -> Option<&str> {
        self.default_roles.get(name).map(String::as_str)
    }

    /// Whether the namespace carries kube2iam's `iam.amazonaws.com/allowed-roles`.
    pub fn has_kube2iam_allowed_roles(&self, name: &str) -> bool {
        self.kube2iam_allowed.contains(name)
    }

    /// Whether the namespace is labelled `podiam.io/pod-identity=required`: its pods' roles
    /// are given with their tokens only.
    pub fn token_required(&self, name: &str) -> bool {
        self.token_required.contains(name)
    }
}

/// The roles ServiceAccounts give their pods (`iam.amazonaws.com/role` on the
/// ServiceAccount): only annotated accounts are kept, by namespace and name.
#[derive(Debug, Default)]
pub struct AccountIndex {
    roles: HashMap<String, HashMap<String, String>>,
    /// The ServiceAccount annotation naming the role, when not [`ROLE_ANNOTATION`].
    role_key: Option<Arc<str>>,
}

impl AccountIndex {
    /// An empty index that reads ServiceAccounts' roles from the annotation `role_key`.
    pub fn keyed(role_key: &str) -> AccountIndex {
        AccountIndex {
            role_key: (role_key != ROLE_ANNOTATION).then(|| Arc::from(role_key)),
            ..AccountIndex::default()
        }
    }

    /// The annotation this index reads roles from.
    pub fn role_key(&self) -> &str {
        self.role_key.as_deref().unwrap_or(ROLE_ANNOTATION)
    }

    /// Records a ServiceAccount's role annotation (or its absence); whether that changed the
    /// role it gives (its other updates change nothing podiam keeps).
    pub fn apply(&mut self, account: &k8s_openapi::api::core::v1::ServiceAccount) -> bool {
        self.apply_meta(&account.metadata)
    }

    /// [`AccountIndex::apply`], given the ServiceAccount's metadata.
    pub fn apply_meta(
        &mut self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> bool {
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            return false;
        };
        let role = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(self.role_key()))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty());
        match role {
            Some(role) if self.role(namespace, name) == Some(kept(role).as_str()) => false,
            Some(role) => {
                self.roles
                    .entry(namespace.to_string())
                    .or_default()
                    .insert(name.to_string(), kept(role));
                true
            }
            None => self.forget(namespace, name),
        }
    }

    /// Forgets a ServiceAccount.
    pub fn remove(&mut self, account: &k8s_openapi::api::core::v1::ServiceAccount) -> bool {
        self.remove_meta(&account.metadata)
    }

    /// [`AccountIndex::remove`], given the ServiceAccount's metadata.
    pub fn remove_meta(
        &mut self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> bool {
        match (meta.namespace.as_deref(), meta.name.as_deref()) {
            (Some(namespace), Some(name)) => self.forget(namespace, name),
            _ => false,
        }
    }

    /// Forgets a ServiceAccount's role; whether it gave one.
    fn forget(&mut self, namespace: &str, name: &str) -> bool {
        let Some(accounts) = self.roles.get_mut(namespace) else {
            return false;
        };
        let gave = accounts.remove(name).is_some();
        if accounts.is_empty() {
            self.roles.remove(namespace);
        }
        gave
    }

    /// The role ServiceAccount `namespace/name` gives its pods, if any.
    pub fn role(&self, namespace: &str, name: &str) -> Option<&str> {
        self.roles.get(namespace)?.get(name).map(String::as_str)
    }

    /// How many ServiceAccounts give a role.
    pub fn len(&self) -> usize {
        self.roles.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }
}

/// The annotation value a rule came from; `None` for no (or an empty) annotation.
fn source_of(rule: &Permitted) -> Option<&str> {
    match rule {
        Permitted::Nothing => None,
        Permitted::Invalid { source, .. } | Permitted::Regex { source, .. } => Some(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: Option<&str>, phase: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("pod-{uid}"),
            ip: ip.map(|ip| ip.parse().expect("ip")),
            more_ips: Vec::new(),
            phase: Some(phase.into()),
            host_network: false,
            node_name: Some("node-1".into()),
            service_account: None,
            role: Some("app".into()),
            external_id: None,
            session_name: None,
            deleting: false,
            container_endpoint: false,
            mirror: false,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn found_uid(index: &PodIndex, address: &str) -> Option<String> {
        match index.lookup(ip(address)) {
            Lookup::Found(p) => Some(p.uid.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_relist_reuses_unchanged_records_and_shares_names() {
        let mut index = PodIndex::default();
        index.apply(pod("a", Some("10.0.0.1"), "Running"));
        index.apply(pod("b", Some("10.0.0.2"), "Running"));
        let (a, b) = (index.by_uid("a").expect("a"), index.by_uid("b").expect("b"));
        // Names many pods share are held once.
        let (a_node, b_node) = (a.node_name.clone(), b.node_name.clone());
        assert!(Arc::ptr_eq(&a_node.expect("node"), &b_node.expect("node")));
        // An update that changes nothing podiam reads keeps the record, and says so (the
        // watch then wakes nobody); one that changes it says that too.
        assert!(!index.apply(pod("a", Some("10.0.0.1"), "Running")));
        assert!(Arc::ptr_eq(&a, &index.by_uid("a").expect("a")));
        assert!(index.apply(pod("a", Some("10.0.0.9"), "Running")));
        assert!(index.apply(pod("a", Some("10.0.0.1"), "Running")));
        let a = index.by_uid("a").expect("a");

        let mut fresh = index.for_relist();
        fresh.apply(pod("a", Some("10.0.0.1"), "Running"));
        fresh.apply(pod("b", Some("10.0.0.3"), "Running"));
        fresh.relisted();
        assert!(Arc::ptr_eq(&a, &fresh.by_uid("a").expect("a")));
        assert_eq!(found_uid(&fresh, "10.0.0.3").as_deref(), Some("b"));
        assert_eq!(fresh.lookup(ip("10.0.0.2")), Lookup::Unknown);
        // A pod the relist did not list is gone, and not brought back from the old index.
        let mut fresh = index.for_relist();
        fresh.apply(pod("a", Some("10.0.0.1"), "Running"));
        fresh.relisted();
        assert!(fresh.by_uid("b").is_none());
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn ip_index_transitions() {
        let mut index = PodIndex::default();
        // Created without an IP: not findable.
        index.apply(pod("a", None, "Pending"));
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // IP assigned.
        index.apply(pod("a", Some("10.0.0.1"), "Pending"));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("a"));
        index.apply(pod("a", Some("10.0.0.1"), "Running"));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("a"));
        // A second live pod on the same IP: nobody gets it.
        index.apply(pod("b", Some("10.0.0.1"), "Running"));
        assert!(matches!(index.lookup(ip("10.0.0.1")), Lookup::Ambiguous(n) if n.len() == 2));
        // The first turns terminal: the IP is b's alone.
        index.apply(pod("a", Some("10.0.0.1"), "Succeeded"));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("b"));
        // b fails: nobody.
        index.apply(pod("b", Some("10.0.0.1"), "Failed"));
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Unknown);
        // IP reuse by a new pod after deletion of the old one.
        index.apply(pod("c", Some("10.0.0.2"), "Running"));
        index.remove("c");
        index.apply(pod("d", Some("10.0.0.2"), "Running"));
        assert_eq!(found_uid(&index, "10.0.0.2").as_deref(), Some("d"));
        // A pod moving IP leaves no trace at the old one.
        index.apply(pod("d", Some("10.0.0.3"), "Running"));
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Unknown);
        assert_eq!(found_uid(&index, "10.0.0.3").as_deref(), Some("d"));
        assert_eq!(index.len(), 1);
        fn on(index: &PodIndex, node: &str) -> Vec<String> {
            index.on_node(node).iter().map(|p| p.uid.clone()).collect()
        }
        assert_eq!(on(&index, "node-1"), vec!["d"]);
        assert_eq!(on(&index, ""), vec!["d"]);
        assert!(on(&index, "node-2").is_empty());
        index.remove("d");
        assert!(on(&index, "node-1").is_empty());
    }

    #[test]
    fn a_terminating_pod_yields_its_ip_to_a_live_claimant() {
        let live = |uid: &str, phase: &str| pod(uid, Some("10.0.0.1"), phase);
        let terminating = |uid: &str| PodRecord {
            deleting: true,
            ..pod(uid, Some("10.0.0.1"), "Running")
        };
        /// What a lookup of 10.0.0.1 should find.
        #[derive(Debug)]
        enum Want {
            Found(&'static str),
            Ambiguous(&'static [&'static str]),
        }
        // (what: pods applied in this order, the lookup, the pods node-1's stream carries)
        let table: Vec<(&str, Vec<PodRecord>, Want, &[&str])> = vec![
            (
                "alone while it terminates, a pod keeps its address (and its role)",
                vec![terminating("old")],
                Want::Found("old"),
                &["old"],
            ),
            (
                "a new pod given the address of a terminating one is the one found",
                vec![terminating("old"), live("new", "Running")],
                Want::Found("new"),
                &["new"],
            ),
            (
                "in either order of events",
                vec![live("new", "Running"), terminating("old")],
                Want::Found("new"),
                &["new"],
            ),
            (
                "a new pod still starting claims the address too",
                vec![terminating("old"), live("new", "Pending")],
                Want::Found("new"),
                &["new"],
            ),
            (
                "the old pod marked terminating after the new one took the address",
                vec![
                    live("old", "Running"),
                    live("new", "Running"),
                    terminating("old"),
                ],
                Want::Found("new"),
                &["new"],
            ),
            (
                "two live pods: nobody, as ever",
                vec![live("a", "Running"), live("b", "Running")],
                Want::Ambiguous(&["a", "b"]),
                &["a", "b"],
            ),
            (
                "two live pods beside a terminating one: nobody, and the terminating one is out",
                vec![
                    terminating("old"),
                    live("a", "Running"),
                    live("b", "Running"),
                ],
                Want::Ambiguous(&["a", "b"]),
                &["a", "b"],
            ),
            (
                "two terminating pods and nobody else: nobody",
                vec![terminating("a"), terminating("b")],
                Want::Ambiguous(&["a", "b"]),
                &["a", "b"],
            ),
        ];
        for (what, pods, want, streamed) in table {
            let mut index = PodIndex::default();
            for p in pods {
                index.apply(p);
            }
            match (index.lookup(ip("10.0.0.1")), &want) {
                (Lookup::Found(p), Want::Found(uid)) => assert_eq!(p.uid, *uid, "{what}"),
                (Lookup::Ambiguous(pods), Want::Ambiguous(uids)) => {
                    let got: Vec<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
                    assert_eq!(got, *uids, "{what}");
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
            for node in ["node-1", ""] {
                let mut on: Vec<String> =
                    index.on_node(node).iter().map(|p| p.uid.clone()).collect();
                on.sort();
                assert_eq!(on, streamed, "{what}: the pods of node {node:?}");
            }
        }
        // The new pod goes before the old one is gone: the old one has the address again
        // (it is still the only pod there), as a relist would find it.
        let mut index = PodIndex::default();
        index.apply(terminating("old"));
        index.apply(live("new", "Running"));
        index.remove("new");
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("old"));
    }

    #[test]
    fn a_pods_address_is_parsed_once_where_its_record_is_made() {
        let k8s_pod = |address: &str| k8s_openapi::api::core::v1::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("v6".into()),
                name: Some("pod-v6".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(address.into()),
                phase: Some("Running".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // However the API spells it, a request's address finds the pod.
        let record = PodRecord::from_pod(&k8s_pod("FD00:0:0::0001")).expect("a record");
        assert_eq!(record.ip, Some(ip("fd00::1")));
        let mut index = PodIndex::default();
        index.apply(record);
        assert_eq!(found_uid(&index, "fd00:0000::1").as_deref(), Some("v6"));
        // An IPv4-mapped spelling is the IPv4 address, as the agent sees its peers.
        let record = PodRecord::from_pod(&k8s_pod("::ffff:10.0.0.7")).expect("a record");
        assert_eq!(record.ip, Some(ip("10.0.0.7")));
        // No address at all: never found by one.
        let record = PodRecord::from_pod(&k8s_pod("not-an-ip")).expect("a record");
        assert_eq!(record.ip, None);
        assert!(!record.is_live());
    }

    #[test]
    fn a_static_pods_mirror_is_marked_as_one() {
        let k8s_pod = |annotations: &[(&str, &str)]| k8s_openapi::api::core::v1::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("m".into()),
                name: Some("etcd-node-1".into()),
                namespace: Some("kube-system".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let mirror = k8s_pod(&[(MIRROR_ANNOTATION, "4c3b2a"), (ROLE_ANNOTATION, "r")]);
        assert!(PodRecord::from_pod(&mirror).expect("a record").mirror);
        // Its value is a hash, and may be anything: present is what counts.
        assert!(
            PodRecord::from_pod(&k8s_pod(&[(MIRROR_ANNOTATION, "")]))
                .expect("a record")
                .mirror
        );
        let plain = k8s_pod(&[(ROLE_ANNOTATION, "r"), ("kubernetes.io/config.hash", "x")]);
        assert!(!PodRecord::from_pod(&plain).expect("a record").mirror);
    }

    #[test]
    fn annotations_longer_than_aws_takes_are_kept_short_and_invalid() {
        let huge = "\u{1}".repeat(256 << 10);
        let k8s_pod = k8s_openapi::api::core::v1::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("big".into()),
                name: Some("big".into()),
                namespace: Some("ns".into()),
                annotations: Some(
                    [
                        ROLE_ANNOTATION,
                        EXTERNAL_ID_ANNOTATION,
                        SESSION_NAME_ANNOTATION,
                    ]
                    .into_iter()
                    .map(|key| (key.to_string(), format!("x{huge}")))
                    .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let record = PodRecord::from_pod(&k8s_pod).expect("a record");
        let role = record.role.as_deref().expect("a role");
        assert!(role.len() < 200, "{} bytes kept", role.len());
        for kept in [
            role,
            record.external_id.as_deref().expect("an id"),
            record.session_name.as_deref().expect("a name"),
        ] {
            assert!(
                kept.starts_with('x') && kept.ends_with(&format!("… ({} bytes)", huge.len() + 1))
            );
        }
        let refused = crate::policy::resolve_role(role, None).expect_err("not a role");
        assert!(refused.to_string().len() < 1024, "{refused}");
        // Within the bound, kept as it is.
        let arn = format!("arn:aws:iam::123456789012:role/{}/r", "p".repeat(400));
        assert_eq!(kept(&arn), arn);

        let mut accounts = AccountIndex::default();
        let account = |role: &str| k8s_openapi::api::core::v1::ServiceAccount {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                annotations: Some([(ROLE_ANNOTATION.to_string(), role.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(accounts.apply(&account(&huge)));
        assert!(accounts.role("ns", "web").expect("a role").len() < 200);
    }

    #[test]
    fn updates_that_change_nothing_kept_are_no_change() {
        let mut index = PodIndex::default();
        // A pending pod, never indexed: updated and deleted again and again, no change.
        let pending = pod("p", None, "Pending");
        assert!(!index.apply(pending.clone()));
        assert!(!index.apply(pending));
        assert!(!index.remove("p"));
        let running = pod("r", Some("10.0.0.1"), "Running");
        assert!(index.apply(running.clone()));
        assert!(!index.apply(running));
        // Gone from the index by an update (it ended) or a delete: a change, once.
        assert!(index.apply(pod("r", Some("10.0.0.1"), "Succeeded")));
        assert!(!index.apply(pod("r", Some("10.0.0.1"), "Succeeded")));
        assert!(index.apply(pod("s", Some("10.0.0.2"), "Running")));
        assert!(index.remove("s"));
        assert!(!index.remove("s"));

        let mut accounts = AccountIndex::default();
        let account = |role: Option<&str>| k8s_openapi::api::core::v1::ServiceAccount {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                annotations: role.map(|r| [(ROLE_ANNOTATION.to_string(), r.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!accounts.apply(&account(None)));
        assert!(accounts.apply(&account(Some("app"))));
        assert!(!accounts.apply(&account(Some(" app "))));
        assert!(accounts.apply(&account(Some("other"))));
        assert!(accounts.apply(&account(None)));
        assert!(!accounts.apply(&account(None)));
        assert!(!accounts.remove(&account(None)));
        assert!(accounts.apply(&account(Some("app"))));
        assert!(accounts.remove(&account(None)));
    }

    #[test]
    fn a_dual_stack_pod_is_found_by_both_addresses() {
        let k8s_pod = |uid: &str, addresses: &[&str]| k8s_openapi::api::core::v1::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some(uid.into()),
                name: Some(format!("pod-{uid}")),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: addresses.first().map(|a| a.to_string()),
                pod_ips: Some(
                    addresses
                        .iter()
                        .map(|a| k8s_openapi::api::core::v1::PodIP { ip: a.to_string() })
                        .collect(),
                ),
                phase: Some("Running".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let record =
            PodRecord::from_pod(&k8s_pod("d", &["10.0.0.5", "FD00:77::5"])).expect("a record");
        assert_eq!(record.ip, Some(ip("10.0.0.5")));
        assert_eq!(record.more_ips, [ip("fd00:77::5")]);
        let mut index = PodIndex::default();
        index.apply(record);
        assert_eq!(found_uid(&index, "10.0.0.5").as_deref(), Some("d"));
        assert_eq!(found_uid(&index, "fd00:77::5").as_deref(), Some("d"));
        // An IPv6-only pod, and one claiming d's IPv6 address: that address is ambiguous,
        // d's IPv4 address is still d's alone.
        let v6 = PodRecord::from_pod(&k8s_pod("six", &["fd00:77::6"])).expect("a record");
        assert!(v6.is_live() && v6.more_ips.is_empty());
        index.apply(v6);
        assert_eq!(found_uid(&index, "fd00:77::6").as_deref(), Some("six"));
        index.apply(PodRecord::from_pod(&k8s_pod("x", &["10.0.0.9", "fd00:77::5"])).expect("x"));
        assert!(matches!(
            index.lookup(ip("fd00:77::5")),
            Lookup::Ambiguous(_)
        ));
        assert_eq!(found_uid(&index, "10.0.0.5").as_deref(), Some("d"));
        // Gone: neither address finds it.
        index.remove("d");
        assert_eq!(found_uid(&index, "10.0.0.5"), None);
        assert_eq!(found_uid(&index, "fd00:77::5").as_deref(), Some("x"));
    }

    #[test]
    fn host_network_pods_are_never_indexed() {
        let mut index = PodIndex::default();
        let mut p = pod("h", Some("10.0.0.9"), "Running");
        p.host_network = true;
        index.apply(p);
        assert_eq!(index.lookup(ip("10.0.0.9")), Lookup::Unknown);
        assert!(index.is_empty());
    }

    fn named_ns(name: &str, value: Option<&str>) -> k8s_openapi::api::core::v1::Namespace {
        k8s_openapi::api::core::v1::Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                annotations: value
                    .map(|v| [(PERMITTED_ANNOTATION.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn an_agents_address_is_that_of_a_host_network_pod_of_its_account() {
        let mut index = PodIndex::default();
        let mut agent = pod("a", Some("10.0.0.9"), "Running");
        agent.host_network = true;
        agent.service_account = Some("podiam-agent".into());
        index.apply(agent.clone());
        assert!(index.host_pod_at(ip("10.0.0.9"), "ns", "podiam-agent"));
        // Another account's, another namespace's, another address, an ordinary pod: not.
        assert!(!index.host_pod_at(ip("10.0.0.9"), "ns", "other"));
        assert!(!index.host_pod_at(ip("10.0.0.9"), "podiam", "podiam-agent"));
        assert!(!index.host_pod_at(ip("10.0.0.8"), "ns", "podiam-agent"));
        let mut ordinary = pod("o", Some("10.0.0.7"), "Running");
        ordinary.service_account = Some("podiam-agent".into());
        index.apply(ordinary);
        assert!(!index.host_pod_at(ip("10.0.0.7"), "ns", "podiam-agent"));
        // Once it has stopped, its address is no agent's.
        agent.phase = Some("Succeeded".into());
        index.apply(agent);
        assert!(!index.host_pod_at(ip("10.0.0.9"), "ns", "podiam-agent"));
    }

    #[test]
    fn namespaces_share_compiled_rules_and_let_go_of_them() {
        let mut index = NamespaceIndex::default();
        index.apply(&named_ns("a", Some("app-.*")));
        index.apply(&named_ns("b", Some(" app-.* ")));
        assert!(Arc::ptr_eq(&index.rule("a"), &index.rule("b")));
        assert_eq!(index.compiled_len(), 1);
        let one = index.compiled_bytes();
        assert!(one > 0);
        index.remove("a");
        assert_eq!((index.compiled_len(), index.compiled_bytes()), (1, one));
        // The last user gone, the rule goes too.
        index.apply(&named_ns("b", Some("other-.*")));
        assert_eq!(index.compiled_len(), 1);
        index.remove("b");
        assert_eq!((index.compiled_len(), index.compiled_bytes()), (0, 0));
        // Invalid rules take nothing.
        index.apply(&named_ns("c", Some("(")));
        assert_eq!((index.compiled_len(), index.compiled_bytes()), (0, 0));
    }

    fn is_regex(index: &NamespaceIndex, name: &str) -> bool {
        matches!(*index.rule(name), Permitted::Regex { .. })
    }

    #[test]
    fn rules_share_one_memory_budget() {
        // Room for ten rules of this size and a half.
        let cost = Permitted::compile(Some("role-00")).cost();
        let mut index = NamespaceIndex::with_budget(10 * cost + cost / 2);
        let name = |i: usize| format!("ns-{i:02}");
        for i in 0..15 {
            index.apply(&named_ns(&name(i), Some(&format!("role-{i:02}"))));
        }
        let valid: Vec<bool> = (0..15).map(|i| is_regex(&index, &name(i))).collect();
        assert_eq!(valid, [[true; 10], [false; 10]].concat()[..15]);
        assert!(index.compiled_bytes() <= 10 * cost + cost / 2);
        // Over budget is reported as such, and permits nothing.
        match &*index.rule("ns-12") {
            Permitted::Invalid { source, error } => {
                assert_eq!(source, "role-12");
                assert!(error.contains("used up"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        // A namespace gone makes room: the first refused one (by name) gets it.
        index.remove("ns-00");
        assert!(is_regex(&index, "ns-10"));
        assert!(!is_regex(&index, "ns-11"));
        // A namespace taking up a rule already compiled makes room too.
        index.apply(&named_ns("ns-01", Some("role-02")));
        assert!(Arc::ptr_eq(&index.rule("ns-01"), &index.rule("ns-02")));
        assert!(is_regex(&index, "ns-11"));
        assert!(!is_regex(&index, "ns-12"));
        // A namespace over budget that changes its value is tried at once, and given up
        // again when it still does not fit.
        index.apply(&named_ns("ns-13", Some("role-03")));
        assert!(is_regex(&index, "ns-13"));
        index.apply(&named_ns("ns-14", Some("role-99")));
        assert!(!is_regex(&index, "ns-14"));
        // Shared rules count once.
        assert_eq!(index.compiled_len(), 10);
        assert!(index.compiled_bytes() <= 10 * cost + cost / 2);
        for i in 0..15 {
            index.remove(&name(i));
        }
        assert_eq!((index.compiled_len(), index.compiled_bytes()), (0, 0));
    }

    #[test]
    fn a_relist_reuses_compiled_rules_and_lets_go_of_the_rest() {
        let mut index = NamespaceIndex::default();
        index.apply(&named_ns("a", Some("app-.*")));
        index.apply(&named_ns("b", Some("old-.*")));
        let app = index.rule("a");
        let mut fresh = index.for_relist();
        fresh.apply(&named_ns("a", Some("app-.*")));
        fresh.apply(&named_ns("b", Some("new-.*")));
        assert!(Arc::ptr_eq(&app, &fresh.rule("a")), "not compiled again");
        fresh.relisted();
        assert_eq!(fresh.compiled_len(), 2);
        let expected = fresh.rule("a").cost() + fresh.rule("b").cost();
        assert_eq!(fresh.compiled_bytes(), expected);
    }

    /// What issue 13 measured at 1.2 MiB a rule, 147 MB for 120 namespaces.
    #[test]
    fn a_thousand_namespaces_with_a_rule_each_fit_in_a_few_mib() {
        let mut index = NamespaceIndex::default();
        for i in 0..1000 {
            index.apply(&named_ns(
                &format!("ns-{i}"),
                Some(&format!(r"\w{{20}}|n{i}")),
            ));
        }
        assert!((0..1000).all(|i| is_regex(&index, &format!("ns-{i}"))));
        assert_eq!(index.compiled_len(), 1000);
        // Under 20 KiB each, counted as the budget counts (automata, text, overhead).
        assert!(
            index.compiled_bytes() < 20 << 20,
            "{} KiB",
            index.compiled_bytes() >> 10
        );
    }

    #[test]
    fn namespace_rules_compile_on_change_only() {
        let mut index = NamespaceIndex::default();
        let ns = |value: Option<&str>| named_ns("team", value);
        assert!(matches!(*index.rule("team"), Permitted::Nothing));
        index.apply(&ns(Some("app-.*")));
        let first = index.rule("team");
        index.apply(&ns(Some("app-.*")));
        assert!(
            Arc::ptr_eq(&first, &index.rule("team")),
            "unchanged value is not recompiled"
        );
        index.apply(&ns(None));
        assert!(matches!(*index.rule("team"), Permitted::Nothing));
        index.apply(&ns(Some("(")));
        assert!(matches!(*index.rule("team"), Permitted::Invalid { .. }));
        index.remove("team");
        assert!(matches!(*index.rule("team"), Permitted::Nothing));
    }

    #[test]
    fn a_namespace_update_is_a_change_only_when_decisions_can_change() {
        let mut index = NamespaceIndex::default();
        let ns = |annotations: &[(&str, &str)], labels: &[(&str, &str)]| {
            let mut ns = named_ns("team", None);
            let pairs = |kv: &[(&str, &str)]| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            };
            ns.metadata.annotations = Some(pairs(annotations));
            ns.metadata.labels = Some(pairs(labels));
            ns
        };
        let permitted = (PERMITTED_ANNOTATION, "app-.*");
        assert!(index.apply(&ns(&[permitted], &[])), "first seen");
        assert!(!index.apply(&ns(&[permitted, ("owner", "a")], &[("env", "x")])));
        assert!(index.apply(&ns(&[permitted, (DEFAULT_ROLE_ANNOTATION, "app")], &[])));
        assert!(!index.apply(&ns(&[permitted, (DEFAULT_ROLE_ANNOTATION, " app ")], &[])));
        assert!(index.apply(&ns(&[permitted, (DEFAULT_ROLE_ANNOTATION, "app-2")], &[])));
        assert!(index.apply(&ns(&[permitted], &[])), "default role gone");
        assert!(index.apply(&ns(&[(PERMITTED_ANNOTATION, "b-.*")], &[])));
        let required = (POD_IDENTITY_LABEL, TOKEN_REQUIRED);
        assert!(index.apply(&ns(&[(PERMITTED_ANNOTATION, "b-.*")], &[required])));
        assert!(!index.apply(&ns(&[(PERMITTED_ANNOTATION, "b-.*")], &[required])));
        // A default role of 256 KiB is kept as the index keeps any long value.
        let huge = "r".repeat(256 * 1024);
        index.apply(&ns(&[(DEFAULT_ROLE_ANNOTATION, &huge)], &[]));
        assert!(
            index
                .default_role("team")
                .is_some_and(|r| r.len() <= MAX_KEPT + 16)
        );
    }
}
