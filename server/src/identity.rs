//! Who is calling: agents proven by their projected ServiceAccount token, operators by their
//! own Kubernetes credentials.
//!
//! - [`Identities::agent`]: an agent call carries `authorization: Bearer TOKEN` (its
//!   projected token, audience `--agent-token-audience`). The token is checked with a
//!   TokenReview; the pod it is bound to is looked up in the server's own view, and that
//!   pod's `spec.nodeName` is the agent's node ([`podiam_policy::decision::bind_agent`]).
//! - [`Identities::operator`]: Explain and Status carry the user's own bearer token, checked
//!   with a TokenReview for the API's audience, and each call is authorised with a
//!   SubjectAccessReview.
//!
//! Reviews are cached by a digest of the token (never the token itself) until the token
//! expires ([`REVIEW_CACHE_MAX`] at most, [`OPERATOR_REVIEW_CACHE_MAX`] for operators'), so
//! an agent's calls cost no API request after the first; refused tokens are remembered for [`NEGATIVE_REVIEW_TTL`]. Concurrent reviews of
//! one token share one request, and at most [`REVIEWS_IN_FLIGHT`] run at once. While the
//! API cannot answer, cached reviews keep working and new tokens are refused as
//! unavailable: fail closed, recover by themselves.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use podiam_policy::decision::ReviewedUser;

/// Longest a review is trusted without asking again, whatever the token's own expiry: the
/// kubelet rotates projected tokens at 80% of their life (48 min for the 1 h the DaemonSet
/// asks), so an agent costs about one review per rotation.
pub const REVIEW_CACHE_MAX: Duration = Duration::from_secs(3600);
/// Longest an operator's review (a token for the API's own audience: explain, status) is
/// trusted: deleting its ServiceAccount, or the pod its token is bound to, ends it at the API
/// at once, and nothing else here looks again, as agents' and pods' tokens are looked at
/// against live pods at every call.
pub const OPERATOR_REVIEW_CACHE_MAX: Duration = Duration::from_secs(60);
/// How long a review is trusted when the token's expiry cannot be read from it.
pub const REVIEW_CACHE_DEFAULT: Duration = Duration::from_secs(300);
/// How long a refused token stays refused without asking again: a caller repeating a bad
/// token costs the API one review per this interval, not one per call.
pub const NEGATIVE_REVIEW_TTL: Duration = Duration::from_secs(10);
/// Most TokenReviews waiting on the API at once (SubjectAccessReviews have
/// [`ACCESS_REVIEWS_IN_FLIGHT`] of their own); callers beyond this
/// wait their turn. A flood of made-up tokens cannot turn into a flood of API requests.
pub const REVIEWS_IN_FLIGHT: usize = 16;
/// Of those, the most one caller's address may have running at once. Agent calls need the
/// agents' client certificate, which every node holds, and a token is reviewed before it can
/// be refused: root on one node could otherwise fill every slot with made-up tokens, and
/// every other node's new agent and pod tokens would wait behind its flood.
pub const REVIEWS_IN_FLIGHT_PER_ADDRESS: usize = 4;
/// The most reviews one address may have waiting or running; a new token beyond it is
/// refused at once as unavailable (the agent retries). Well above the new tokens an honest
/// node presents at once (its agent's, and a pod token for each of its pods, at most 250),
/// and a bound on what one address's flood keeps in memory.
pub const REVIEWS_PENDING_PER_ADDRESS: usize = 256;
/// The most reviews waiting or running for all addresses together: root on one node may
/// call from many addresses (its pods', or an IPv6 prefix), and each waiting review keeps its
/// token (up to 16 KiB) in memory. Past it, a new token from an address is refused at once
/// as unavailable, unless the address is a running agent's (a node's: see
/// [`Identities::with_agent_addresses`]) or the asker is a proven agent's node, and it has
/// fewer than [`REVIEWS_IN_FLIGHT_PER_ADDRESS`] under way: a flood from one node's many
/// addresses cannot turn every other node's few new tokens away, and what it keeps stays
/// bounded (beyond this, at most that many per node).
pub const REVIEWS_PENDING: usize = 2048;
/// SubjectAccessReviews (one per operator call) waiting on the API at once, apart from the
/// token reviews' slots: any pod's own ServiceAccount token is a valid operator token (its
/// call is then refused by the review), so operator calls must not be able to take the slots
/// that agents' and pods' new tokens need.
pub const ACCESS_REVIEWS_IN_FLIGHT: usize = 4;
/// Access reviews one user's calls may have running; the user's further calls wait behind
/// them, not in front of other users'. A pod that floods operator calls with its own token
/// must not make everyone else's wait behind them.
pub const ACCESS_REVIEWS_PER_USER: usize = 2;
/// Access reviews one user's calls may have waiting or running; the next is refused at once
/// as unavailable. Well above a script that explains a few hundred pods at once.
pub const ACCESS_REVIEWS_PENDING_PER_USER: usize = 256;
/// New operator tokens (never reviewed, or no longer remembered) reviewed per second, and
/// the burst allowed: operator calls need no client certificate, so anyone who reaches the
/// port could otherwise turn made-up tokens into TokenReviews at will. People run a few
/// commands a minute; each asks every replica once.
pub const OPERATOR_REVIEWS_PER_SECOND: f64 = 5.0;
pub const OPERATOR_REVIEWS_BURST: f64 = 20.0;
/// Most reviews remembered; past it, expired ones go first, then the ones expiring soonest.
/// Far above one token per agent per node of any cluster.
pub const REVIEW_CACHE_ENTRIES: usize = 16_384;
/// Reviews kept per node ([`Identities::keep`]): an agent's token and the one that replaces
/// it, with room for a restart.
pub const KEPT_PER_NODE: usize = 4;
/// Time limit of one review request to the API: an agent's call must fail over or answer
/// within the SDKs' 1 s per attempt budget... after the first call; the first review of a
/// token may take this long while the API is slow.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(3);

/// What a TokenReview answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Review {
    Authenticated(ReviewedUser),
    /// The API does not accept the token (unknown, expired, another audience, its pod
    /// gone…), with the API's reason.
    Unauthenticated(String),
}

/// The API could not answer a review.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReviewUnavailable(pub String);

/// A resource access to authorise, as a SubjectAccessReview's resourceAttributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub verb: &'static str,
    pub resource: &'static str,
    /// `None`: cluster-wide.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Access {
    /// `list pods` cluster-wide: what explaining an address (it may be any namespace's pod)
    /// and the status of every agent need.
    pub const LIST_PODS: Access = Access {
        verb: "list",
        resource: "pods",
        namespace: None,
        name: None,
    };
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        match &self.namespace {
            Some(namespace) => write!(f, " in namespace {namespace}"),
            None => f.write_str(" cluster-wide"),
        }
    }
}

/// The Kubernetes API's TokenReview and SubjectAccessReview, as the server uses them.
pub trait Reviewer: Send + Sync + std::fmt::Debug {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>>;

    /// Whether `user` may do `access`; `Ok(Err(reason))` when the API says no.
    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>>;
}

/// [`Reviewer`] over a kube client.
#[derive(Clone)]
pub struct KubeReviewer {
    client: kube::Client,
}

impl std::fmt::Debug for KubeReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeReviewer").finish_non_exhaustive()
    }
}

impl KubeReviewer {
    pub fn new(client: kube::Client) -> KubeReviewer {
        KubeReviewer { client }
    }
}

/// One extra value of a TokenReview's user, if exactly one.
fn extra(
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    key: &str,
) -> Option<String> {
    match extra?.get(key)?.as_slice() {
        [one] if !one.is_empty() => Some(one.clone()),
        _ => None,
    }
}

async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ReviewUnavailable> {
    match tokio::time::timeout(REVIEW_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(ReviewUnavailable(format!("{what} failed: {error}"))),
        Err(_) => Err(ReviewUnavailable(format!(
            "{what} not answered within {REVIEW_TIMEOUT:?}"
        ))),
    }
}

/// What a TokenReview's `status` says of a token reviewed for `audiences` (empty: the API
/// server's own). Asked for audiences, the API must also name one of them back: an
/// authenticator that ignores audiences authenticates the token with none, and that says
/// only that the token is good for the API server, not that it was issued for podiam.
fn judged(status: TokenReviewStatus, audiences: &[String]) -> Review {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "the token is not authenticated".into());
        return Review::Unauthenticated(why);
    }
    let granted = status.audiences.unwrap_or_default();
    if !audiences.is_empty() && !granted.iter().any(|a| audiences.contains(a)) {
        return Review::Unauthenticated(format!(
            "the API authenticated the token for audiences {granted:?}, not for {audiences:?}"
        ));
    }
    let user = status.user.unwrap_or_default();
    let extras = user.extra.as_ref();
    Review::Authenticated(ReviewedUser {
        username: user.username.clone().unwrap_or_default(),
        uid: user.uid.clone().unwrap_or_default(),
        groups: user.groups.clone().unwrap_or_default(),
        extra: extras.cloned().unwrap_or_default(),
        pod_name: extra(extras, "authentication.kubernetes.io/pod-name"),
        pod_uid: extra(extras, "authentication.kubernetes.io/pod-uid"),
        node_name: extra(extras, "authentication.kubernetes.io/node-name"),
    })
}

/// The SubjectAccessReview of `access` by `user`: who the token said it is, extras included
/// (without them an authoriser that scopes a token by its extras would review the whole
/// user's rights).
fn access_review(user: &ReviewedUser, access: &Access) -> SubjectAccessReviewSpec {
    SubjectAccessReviewSpec {
        user: Some(user.username.clone()),
        uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
        groups: Some(user.groups.clone()),
        extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
        resource_attributes: Some(ResourceAttributes {
            verb: Some(access.verb.to_string()),
            resource: Some(access.resource.to_string()),
            group: Some(String::new()),
            version: Some("v1".into()),
            namespace: access.namespace.clone(),
            name: access.name.clone(),
            ..ResourceAttributes::default()
        }),
        ..SubjectAccessReviewSpec::default()
    }
}

impl Reviewer for KubeReviewer {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>> {
        Box::pin(async move {
            let api = kube::Api::<TokenReview>::all(self.client.clone());
            let request = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
                },
                ..TokenReview::default()
            };
            let answer = bounded(
                "TokenReview",
                api.create(&kube::api::PostParams::default(), &request),
            )
            .await?;
            Ok(judged(answer.status.unwrap_or_default(), audiences))
        })
    }

    fn review_access<'a>(
        &'a self,
        user: &'a ReviewedUser,
        access: &'a Access,
    ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>> {
        Box::pin(async move {
            let api = kube::Api::<SubjectAccessReview>::all(self.client.clone());
            let request = SubjectAccessReview {
                spec: access_review(user, access),
                ..SubjectAccessReview::default()
            };
            let answer = bounded(
                "SubjectAccessReview",
                api.create(&kube::api::PostParams::default(), &request),
            )
            .await?;
            let status = answer.status.unwrap_or_default();
            if status.allowed {
                Ok(Ok(()))
            } else {
                Ok(Err(status.reason.unwrap_or_default()))
            }
        })
    }
}

/// Labels of a TokenReview's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub result: &'static str,
}

/// Labels of a refused agent call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BindingLabels {
    pub reason: &'static str,
}

/// Counters the identity checks keep.
#[derive(Clone, Debug, Default)]
pub struct IdentityCounters {
    /// TokenReviews sent to the API, by result (authenticated, unauthenticated, error).
    pub token_reviews: Family<ReviewLabels, Counter>,
    /// Agent calls refused (or, with `--node-binding warn`, only counted) by node binding.
    pub binding_refusals: Family<BindingLabels, Counter>,
}

impl IdentityCounters {
    /// Counters with every label value present from the start, at 0.
    pub fn new() -> IdentityCounters {
        let counters = IdentityCounters::default();
        for result in ["authenticated", "unauthenticated", "error"] {
            counters
                .token_reviews
                .get_or_create(&ReviewLabels { result })
                .inc_by(0);
        }
        for reason in BINDING_REASONS {
            counters
                .binding_refusals
                .get_or_create(&BindingLabels { reason })
                .inc_by(0);
        }
        counters
    }

    pub fn refused(&self, reason: &'static str) {
        self.binding_refusals
            .get_or_create(&BindingLabels { reason })
            .inc();
    }
}

/// The reasons an agent call is refused by node binding, as the metric labels them.
pub const BINDING_REASONS: [&str; 6] = [
    "other-node",
    "no-token",
    "bad-token",
    "not-agent",
    "no-certificate",
    "review-unavailable",
];

type ReviewFuture = Shared<Pin<Box<dyn Future<Output = Result<Review, ReviewUnavailable>> + Send>>>;

/// A review begun ([`Identities::begin_review`]).
pub enum Begun {
    /// Its answer, remembered.
    Remembered(Review),
    /// The review under way, whose answer it will be.
    Asked(ReviewFuture),
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Begun::Remembered(review) => f.debug_tuple("Remembered").field(review).finish(),
            Begun::Asked(_) => f.write_str("Asked(..)"),
        }
    }
}

/// A remembered review.
#[derive(Clone, Debug)]
struct Cached {
    review: Review,
    /// Unix seconds after which it is asked again.
    until: u64,
    /// It proved a running agent ([`Identities::keep`]): a full cache gives it up last.
    kept: bool,
}

/// Reviews by a digest of (audiences, token), with their in-flight requests.
#[derive(Default)]
struct Cache {
    done: HashMap<[u8; 32], Cached>,
    pending: HashMap<[u8; 32], ReviewFuture>,
    /// The kept reviews of each node's agent, oldest first ([`KEPT_PER_NODE`] at most).
    kept: HashMap<Arc<str>, std::collections::VecDeque<[u8; 32]>>,
}

/// Token and access reviews, cached and bounded.
pub struct Identities {
    reviewer: Arc<dyn Reviewer>,
    /// Shared with the reviews under way, which record their own answers.
    cache: Arc<Mutex<Cache>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The access reviews' own slots ([`ACCESS_REVIEWS_IN_FLIGHT`]).
    access_in_flight: tokio::sync::Semaphore,
    /// Each user's access reviews waiting or running ([`ACCESS_REVIEWS_PER_USER`],
    /// [`ACCESS_REVIEWS_PENDING_PER_USER`]).
    access_users: Arc<Queues<String>>,
    counters: IdentityCounters,
    now: Clock,
    /// What is left of the operators' review budget, and when it was last topped up.
    operator_budget: Mutex<Budget>,
    /// The token reviews each asker has waiting or running ([`REVIEWS_IN_FLIGHT_PER_ADDRESS`],
    /// [`REVIEWS_PENDING_PER_ADDRESS`]).
    addresses: Arc<Queues<Asker>>,
    /// Whether an address is a running agent's, asked only past [`REVIEWS_PENDING`].
    agent_addresses: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
}

/// Whose share of the reviews a new token takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Asker {
    /// A caller not yet proven (an agent's own token): its address.
    Address(IpAddr),
    /// Pods' tokens an agent proven to run on this node passes on: the node, however many
    /// addresses it calls from.
    Node(Arc<str>),
}

/// One queue of reviews per key (an asker, a user): each key has at most `running` under
/// way and `pending` waiting or running; its further reviews wait behind its own.
struct Queues<K> {
    queues: Mutex<HashMap<K, Queue>>,
    running: usize,
    pending: usize,
    /// All keys' reviews waiting or running (changed under `queues`' lock).
    all: std::sync::atomic::AtomicUsize,
    /// Whose reviews, in a refusal: "this address's", "this user's".
    whose: &'static str,
}

/// One key's reviews: how many are waiting or running, and its running slots.
struct Queue {
    pending: usize,
    running: Arc<tokio::sync::Semaphore>,
}

impl<K: Clone + Eq + std::hash::Hash> Queues<K> {
    fn new(running: usize, pending: usize, whose: &'static str) -> Queues<K> {
        Queues {
            queues: Mutex::default(),
            running,
            pending,
            all: std::sync::atomic::AtomicUsize::new(0),
            whose,
        }
    }

    /// A place in `key`'s queue, unless it has `pending` already or `admit` (given its own
    /// count and all keys') refuses.
    fn take(
        self: &Arc<Self>,
        key: K,
        admit: impl FnOnce(usize, usize) -> Result<(), ReviewUnavailable>,
    ) -> Result<Place<K>, ReviewUnavailable> {
        let mut queues = lock(&self.queues);
        let own = queues.get(&key).map_or(0, |queue| queue.pending);
        admit(own, self.all())?;
        if own >= self.pending {
            return Err(ReviewUnavailable(format!(
                "too many of {} reviews under way; retry in a few seconds",
                self.whose
            )));
        }
        let queue = queues.entry(key.clone()).or_insert_with(|| Queue {
            pending: 0,
            running: Arc::new(tokio::sync::Semaphore::new(self.running)),
        });
        queue.pending += 1;
        self.all.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Place {
            queues: Arc::clone(self),
            key,
            running: Arc::clone(&queue.running),
        })
    }

    /// All keys' reviews waiting or running.
    fn all(&self) -> usize {
        self.all.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        lock(&self.queues).is_empty()
    }
}

/// A review's place in its key's queue, given back when it ends.
struct Place<K: Eq + std::hash::Hash> {
    queues: Arc<Queues<K>>,
    key: K,
    /// The key's running slots.
    running: Arc<tokio::sync::Semaphore>,
}

impl<K: Eq + std::hash::Hash> Drop for Place<K> {
    fn drop(&mut self) {
        let mut queues = lock(&self.queues.queues);
        self.queues
            .all
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(queue) = queues.get_mut(&self.key) {
            queue.pending -= 1;
            if queue.pending == 0 {
                queues.remove(&self.key);
            }
        }
    }
}

/// A token bucket: what is left of it, and when it was last topped up.
type Budget = (f64, tokio::time::Instant);

/// Tops `budget` up at `rate` a second to `burst`, then takes one from it if it can.
fn take(budget: &mut Budget, rate: f64, burst: f64) -> bool {
    let now = tokio::time::Instant::now();
    let refill = now.duration_since(budget.1).as_secs_f64() * rate;
    budget.0 = (budget.0 + refill).min(burst);
    budget.1 = now;
    if budget.0 >= 1.0 {
        budget.0 -= 1.0;
        true
    } else {
        false
    }
}

/// Unix seconds now; injected in tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("reviewer", &self.reviewer)
            .finish_non_exhaustive()
    }
}

/// The `exp` claim of a JWT-shaped token, read without checking anything: only to know how
/// long a review the API has just made may be trusted.
pub fn token_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// Until when (Unix seconds) a review made at `now` may be trusted.
/// `audiences`: those the review was for (none: the API's own, an operator's token).
pub fn trust_until(review: &Review, token: &str, audiences: &[String], now: u64) -> u64 {
    match review {
        Review::Unauthenticated(_) => now + NEGATIVE_REVIEW_TTL.as_secs(),
        Review::Authenticated(_) => {
            let most = if audiences.is_empty() {
                OPERATOR_REVIEW_CACHE_MAX
            } else {
                REVIEW_CACHE_MAX
            };
            let cap = now + most.as_secs();
            match token_expiry(token) {
                Some(exp) => exp.min(cap),
                None => cap.min(now + REVIEW_CACHE_DEFAULT.as_secs()),
            }
        }
    }
}

fn digest(token: &str, audiences: &[String]) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for audience in audiences {
        context.update(audience.as_bytes());
        context.update(&[0]);
    }
    context.update(&[1]);
    context.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

impl Identities {
    pub fn new(reviewer: Arc<dyn Reviewer>, counters: IdentityCounters) -> Identities {
        Identities::with_clock(
            reviewer,
            counters,
            Arc::new(|| u64::try_from(podiam_runtime::clock::now_unix()).unwrap_or_default()),
        )
    }

    /// With an injected clock (Unix seconds), for tests.
    pub fn with_clock(
        reviewer: Arc<dyn Reviewer>,
        counters: IdentityCounters,
        now: Clock,
    ) -> Identities {
        Identities {
            reviewer,
            cache: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT)),
            access_in_flight: tokio::sync::Semaphore::new(ACCESS_REVIEWS_IN_FLIGHT),
            access_users: Arc::new(Queues::new(
                ACCESS_REVIEWS_PER_USER,
                ACCESS_REVIEWS_PENDING_PER_USER,
                "this user's",
            )),
            counters,
            now,
            operator_budget: Mutex::new((OPERATOR_REVIEWS_BURST, tokio::time::Instant::now())),
            addresses: Arc::new(Queues::new(
                REVIEWS_IN_FLIGHT_PER_ADDRESS,
                REVIEWS_PENDING_PER_ADDRESS,
                "this address's",
            )),
            agent_addresses: None,
        }
    }

    /// Tells apart, once [`REVIEWS_PENDING`] are waiting, the addresses of running agents
    /// (nodes' addresses, a bounded set): their few new tokens are still taken.
    pub fn with_agent_addresses(
        mut self,
        is_agent: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    ) -> Identities {
        self.agent_addresses = Some(is_agent);
        self
    }

    pub fn counters(&self) -> &IdentityCounters {
        &self.counters
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// The user `token` was reviewed as for `audiences`, if its review is remembered, still
    /// trusted, and authenticated it; never a review of its own.
    pub fn remembered_user(&self, token: &str, audiences: &[String]) -> Option<ReviewedUser> {
        let now = (self.now)();
        let key = digest(token, audiences);
        let cache = self.cache();
        match cache.done.get(&key) {
            Some(Cached {
                review: Review::Authenticated(user),
                until,
                ..
            }) if *until > now => Some(user.clone()),
            _ => None,
        }
    }

    /// Remembers that `token`'s review for `audiences` proved the agent of `node`: a full
    /// cache gives such reviews up last, so that tokens reviewed for nothing, however many,
    /// cannot push proven agents' reviews out (and their calls back among the unproven, to
    /// be reviewed again). A node's agent has one or two tokens live; more can only come
    /// from that node's credentials minting them, so each node keeps its [`KEPT_PER_NODE`]
    /// latest, and an older one loses its place.
    pub fn keep(&self, token: &str, audiences: &[String], node: &str) {
        let key = digest(token, audiences);
        let mut cache = self.cache();
        let Cache { done, kept, .. } = &mut *cache;
        let Some(cached) = done.get_mut(&key) else {
            return;
        };
        if cached.kept {
            return;
        }
        cached.kept = true;
        if kept.len() >= REVIEW_CACHE_ENTRIES {
            // Nodes come and go: forget those whose kept reviews are all gone.
            kept.retain(|_, keys| {
                keys.retain(|key| done.get(key).is_some_and(|cached| cached.kept));
                !keys.is_empty()
            });
        }
        let of_node = kept.entry(Arc::from(node)).or_default();
        // Once kept, let go (expired, reviewed again) and kept anew: the latest place only.
        of_node.retain(|k| *k != key);
        of_node.push_back(key);
        if of_node.len() > KEPT_PER_NODE
            && let Some(oldest) = of_node.pop_front()
            && let Some(cached) = done.get_mut(&oldest)
        {
            cached.kept = false;
        }
    }

    /// Whether `token` has a remembered, still trusted review for `audiences`, whatever it
    /// said.
    pub fn remembered(&self, token: &str, audiences: &[String]) -> bool {
        let now = (self.now)();
        let key = digest(token, audiences);
        self.cache()
            .done
            .get(&key)
            .is_some_and(|cached| cached.until > now)
    }

    /// Takes one review from the operators' budget, if any is left.
    fn operator_budget_allows(&self) -> bool {
        let mut budget = self
            .operator_budget
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        take(
            &mut budget,
            OPERATOR_REVIEWS_PER_SECOND,
            OPERATOR_REVIEWS_BURST,
        )
    }

    /// An operator's token reviewed for the API's own audience: as [`Identities::review`],
    /// but a token not remembered is reviewed only within the operators' budget
    /// ([`OPERATOR_REVIEWS_PER_SECOND`]).
    pub async fn review_operator(&self, token: &str) -> Result<Review, ReviewUnavailable> {
        if !self.remembered(token, &[]) && !self.operator_budget_allows() {
            return Err(ReviewUnavailable(
                "too many operator requests with new tokens; retry in a few seconds".into(),
            ));
        }
        self.review(token, &[]).await
    }

    /// The review of `token` for `audiences` (empty: the API's own): remembered, or asked.
    pub async fn review(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<Review, ReviewUnavailable> {
        self.review_from(token, audiences, None).await
    }

    /// A place in `address`'s queue of reviews, unless it has
    /// [`REVIEWS_PENDING_PER_ADDRESS`] already, or all have [`REVIEWS_PENDING`] and it has
    /// its running share or is not a node's own.
    fn turn(&self, address: Asker) -> Result<Place<Asker>, ReviewUnavailable> {
        self.addresses.take(address.clone(), |own, all| {
            let share_spent = own >= REVIEWS_IN_FLIGHT_PER_ADDRESS;
            if all >= REVIEWS_PENDING && (share_spent || !self.nodes_own(&address)) {
                return Err(ReviewUnavailable(
                    "too many token reviews under way; retry in a few seconds".into(),
                ));
            }
            Ok(())
        })
    }

    /// Whether `asker` is a node's own: a proven agent's node, or a running agent's address.
    fn nodes_own(&self, asker: &Asker) -> bool {
        match asker {
            Asker::Node(_) => true,
            Asker::Address(ip) => self.agent_addresses.as_ref().is_some_and(|is| is(*ip)),
        }
    }

    /// As [`Identities::review`], for `address` (`None`: unattributed): a token that has to
    /// be asked about is asked within the asker's share of the slots
    /// ([`REVIEWS_IN_FLIGHT_PER_ADDRESS`], [`REVIEWS_PENDING_PER_ADDRESS`]).
    pub async fn review_from(
        &self,
        token: &str,
        audiences: &[String],
        address: Option<Asker>,
    ) -> Result<Review, ReviewUnavailable> {
        match self.begin_review(token, audiences, address)? {
            Begun::Remembered(review) => Ok(review),
            Begun::Asked(pending) => pending.await,
        }
    }

    /// The part of [`Identities::review_from`] that needs no waiting: the review remembered,
    /// or the one under way for the token (joined), or a new one started (within the asker's
    /// share). A review started goes on, and records its answer, if what is returned is
    /// dropped.
    pub fn begin_review(
        &self,
        token: &str,
        audiences: &[String],
        address: Option<Asker>,
    ) -> Result<Begun, ReviewUnavailable> {
        let key = digest(token, audiences);
        let now = (self.now)();
        let pending = {
            let mut cache = self.cache();
            if let Some(cached) = cache.done.get(&key) {
                if cached.until > now {
                    return Ok(Begun::Remembered(cached.review.clone()));
                }
                cache.done.remove(&key);
            }
            match cache.pending.get(&key) {
                Some(pending) => pending.clone(),
                None => {
                    // The review is a task of its own, which records its answer and takes
                    // itself off the pending list however its callers fare: a caller that
                    // gives up (its deadline, a reset stream) cannot leave a review holding
                    // one of the slots, or its token in memory, forever.
                    let turn = address.map(|address| self.turn(address)).transpose()?;
                    let reviewer = Arc::clone(&self.reviewer);
                    let permits = Arc::clone(&self.in_flight);
                    let token = token.to_string();
                    let audiences = audiences.to_vec();
                    let counters = self.counters.clone();
                    let shared_cache = Arc::clone(&self.cache);
                    let clock = Arc::clone(&self.now);
                    let task = tokio::spawn(async move {
                        let answer = {
                            // The address's own slot first, then one of all: an address's
                            // reviews wait behind each other, not in front of the others'.
                            let own = match &turn {
                                Some(turn) => Some(Arc::clone(&turn.running).acquire_owned().await),
                                None => None,
                            };
                            match (own.transpose(), permits.acquire_owned().await) {
                                (Ok(_own), Ok(_permit)) => {
                                    reviewer.review_token(&token, &audiences).await
                                }
                                _ => Err(ReviewUnavailable("the server is shutting down".into())),
                            }
                        };
                        drop(turn);
                        let result = match &answer {
                            Ok(Review::Authenticated(_)) => "authenticated",
                            Ok(Review::Unauthenticated(_)) => "unauthenticated",
                            Err(_) => "error",
                        };
                        counters
                            .token_reviews
                            .get_or_create(&ReviewLabels { result })
                            .inc();
                        let now = clock();
                        record(
                            &mut lock(&shared_cache),
                            key,
                            (&token, &audiences),
                            &answer,
                            now,
                        );
                        answer
                    });
                    let future: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                        task.await.unwrap_or_else(|_| {
                            Err(ReviewUnavailable("the token review stopped".into()))
                        })
                    });
                    let shared = future.shared();
                    // Inserted under the lock the task needs to take itself off: before it can.
                    cache.pending.insert(key, shared.clone());
                    shared
                }
            }
        };
        Ok(Begun::Asked(pending))
    }

    /// Whether `user` may do `access`, asked of the API each time (operators' calls are
    /// few, and a revoked permission must apply at once).
    pub async fn may(
        &self,
        user: &ReviewedUser,
        access: &Access,
    ) -> Result<Result<(), String>, ReviewUnavailable> {
        let turn = (self.access_users).take(user.username.clone(), |_, _| Ok(()))?;
        let _own = turn
            .running
            .acquire()
            .await
            .map_err(|_| ReviewUnavailable("the server is shutting down".into()))?;
        let _permit = self
            .access_in_flight
            .acquire()
            .await
            .map_err(|_| ReviewUnavailable("the server is shutting down".into()))?;
        self.reviewer.review_access(user, access).await
    }

    /// Reviews remembered now (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache().done.len()
    }
}

/// The cache, also when a thread panicked holding it (every change to it is whole).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A review's `answer` for `token` (under `key`), made at `now`: off the pending list, and
/// remembered for as long as it may be trusted (errors are not).
fn record(
    cache: &mut Cache,
    key: [u8; 32],
    (token, audiences): (&str, &[String]),
    answer: &Result<Review, ReviewUnavailable>,
    now: u64,
) {
    cache.pending.remove(&key);
    if let Ok(review) = answer {
        let until = trust_until(review, token, audiences, now);
        if until > now {
            if cache.done.len() >= REVIEW_CACHE_ENTRIES {
                evict(&mut cache.done, now);
            }
            cache.done.insert(
                key,
                Cached {
                    review: review.clone(),
                    until,
                    kept: false,
                },
            );
        }
    }
}

/// Makes room in a full cache: expired reviews go; if that is not enough, an eighth of it
/// goes, the soonest to expire of those not kept first, then of those kept. Each of these
/// passes goes over the whole cache under its lock, so each makes room for many reviews:
/// a flood of made-up tokens costs a pass per two thousand reviews, not one per review.
fn evict(done: &mut HashMap<[u8; 32], Cached>, now: u64) {
    done.retain(|_, cached| cached.until > now);
    if done.len() < REVIEW_CACHE_ENTRIES {
        return;
    }
    let excess = done.len() - (REVIEW_CACHE_ENTRIES - REVIEW_CACHE_ENTRIES / 8);
    let mut order: Vec<((bool, u64), [u8; 32])> = done
        .iter()
        .map(|(key, cached)| ((cached.kept, cached.until), *key))
        .collect();
    order.select_nth_unstable_by_key(excess - 1, |(rank, _)| *rank);
    for (_, key) in &order[..excess] {
        done.remove(key);
    }
}

/// The bearer token of a request's `authorization` metadata, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    bearer_header(metadata.as_ref())
}

/// [`bearer`] from a request's HTTP headers.
pub fn bearer_header(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A clock of a test's own, and the handle that moves it.
    fn clock() -> (Arc<AtomicU64>, Clock) {
        let time = Arc::new(AtomicU64::new(1_000_000));
        let read = Arc::clone(&time);
        (time, Arc::new(move || read.load(Ordering::SeqCst)))
    }

    /// A reviewer that knows one good token and counts its calls; it can be made to fail.
    #[derive(Debug, Default)]
    struct Fake {
        calls: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl Reviewer for Fake {
        fn review_token<'a>(
            &'a self,
            token: &'a str,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if self.down.load(Ordering::SeqCst) {
                    return Err(ReviewUnavailable("down".into()));
                }
                if token.starts_with("good") {
                    Ok(Review::Authenticated(ReviewedUser {
                        username: "u".into(),
                        ..ReviewedUser::default()
                    }))
                } else {
                    Ok(Review::Unauthenticated("no".into()))
                }
            })
        }

        fn review_access<'a>(
            &'a self,
            _: &'a ReviewedUser,
            _: &'a Access,
        ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>> {
            Box::pin(async { Ok(Ok(())) })
        }
    }

    /// A JWT-shaped token expiring at `exp`.
    fn jwt(prefix: &str, exp: u64) -> String {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{exp},\"sub\":\"x\"}}"));
        format!("{prefix}.{claims}.sig")
    }

    #[test]
    fn a_token_reviewed_for_audiences_must_be_granted_one_of_them() {
        let status = |authenticated: bool, granted: Option<&[&str]>| TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: granted.map(|g| g.iter().map(|a| (*a).to_string()).collect()),
            user: Some(k8s_openapi::api::authentication::v1::UserInfo {
                username: Some("system:serviceaccount:podiam:podiam-agent".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let podiam = ["podiam".to_string()];
        let ok = |review: &Review| matches!(review, Review::Authenticated(_));
        assert!(ok(&judged(status(true, Some(&["podiam"])), &podiam)));
        assert!(ok(&judged(
            status(true, Some(&["other", "podiam"])),
            &podiam
        )));
        // Authenticated, but with no audience named back (an authenticator that ignores
        // them), or only others: not a token for podiam.
        assert!(!ok(&judged(status(true, None), &podiam)));
        assert!(!ok(&judged(status(true, Some(&[])), &podiam)));
        assert!(!ok(&judged(
            status(true, Some(&["https://kubernetes.default.svc"])),
            &podiam
        )));
        assert!(!ok(&judged(status(false, Some(&["podiam"])), &podiam)));
        // Reviewed for the API server's own audience (operators): none needs naming.
        assert!(ok(&judged(status(true, None), &[])));
    }

    #[test]
    fn access_is_reviewed_as_the_token_scopes_its_user() {
        let extra: std::collections::BTreeMap<String, Vec<String>> = [
            (
                "scopes.example.io/scope".to_string(),
                vec!["read:team-a".to_string()],
            ),
            (
                "authentication.kubernetes.io/pod-name".to_string(),
                vec!["web".to_string()],
            ),
        ]
        .into();
        let status = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(k8s_openapi::api::authentication::v1::UserInfo {
                username: Some("alice".into()),
                uid: Some("a-1".into()),
                groups: Some(vec!["devs".into()]),
                extra: Some(extra.clone()),
            }),
            ..Default::default()
        };
        let Review::Authenticated(user) = judged(status, &[]) else {
            panic!("authenticated");
        };
        assert_eq!(user.pod_name.as_deref(), Some("web"));
        let spec = access_review(&user, &Access::LIST_PODS);
        assert_eq!(spec.user.as_deref(), Some("alice"));
        assert_eq!(spec.uid.as_deref(), Some("a-1"));
        assert_eq!(spec.groups, Some(vec!["devs".to_string()]));
        assert_eq!(spec.extra, Some(extra));
        let attributes = spec.resource_attributes.expect("attributes");
        assert_eq!(
            (attributes.verb.as_deref(), attributes.resource.as_deref()),
            (Some("list"), Some("pods"))
        );
        // No extras: none sent.
        assert_eq!(
            access_review(&ReviewedUser::default(), &Access::LIST_PODS).extra,
            None
        );
    }

    #[test]
    fn expiry_is_read_from_the_payload_and_capped() {
        let now = 1000;
        let good = Review::Authenticated(ReviewedUser::default());
        assert_eq!(token_expiry(&jwt("h", 1600)), Some(1600));
        assert_eq!(token_expiry("not-a-jwt"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
        let agents = ["podiam".to_string()];
        let until = |token: &str| trust_until(&good, token, &agents, now);
        assert_eq!(until(&jwt("h", 1600)), 1600);
        assert_eq!(
            until(&jwt("h", now + 999_999)),
            now + REVIEW_CACHE_MAX.as_secs()
        );
        assert_eq!(until("opaque"), now + REVIEW_CACHE_DEFAULT.as_secs());
        assert_eq!(
            trust_until(
                &Review::Unauthenticated("x".into()),
                &jwt("h", 1600),
                &agents,
                now
            ),
            now + NEGATIVE_REVIEW_TTL.as_secs()
        );
        // An expired token is not remembered at all.
        assert!(until(&jwt("h", 10)) <= now);
        // An operator's (the API's own audience): a minute at most, whatever its expiry.
        for token in [jwt("h", now + 3600), "opaque".to_string()] {
            assert_eq!(
                trust_until(&good, &token, &[], now),
                now + OPERATOR_REVIEW_CACHE_MAX.as_secs()
            );
        }
    }

    #[tokio::test]
    async fn reviews_are_remembered_for_the_tokens_life_and_survive_an_outage() {
        let fake = Arc::new(Fake::default());
        let (time, now) = clock();
        let ids = Identities::with_clock(fake.clone(), IdentityCounters::new(), now.clone());
        let token = jwt("good", now() + 600);
        for _ in 0..5 {
            assert!(matches!(
                ids.review(&token, &[]).await,
                Ok(Review::Authenticated(_))
            ));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        // The API goes away: the remembered review still answers, a new token cannot be
        // checked.
        fake.down.store(true, Ordering::SeqCst);
        assert!(ids.review(&token, &[]).await.is_ok());
        let other = jwt("good-2", now() + 600);
        assert!(ids.review(&other, &[]).await.is_err());
        // Errors are not remembered: once the API is back, the same token passes.
        fake.down.store(false, Ordering::SeqCst);
        assert!(ids.review(&other, &[]).await.is_ok());
        // Past the token's expiry, it is asked again.
        let calls = fake.calls.load(Ordering::SeqCst);
        time.fetch_add(601, Ordering::SeqCst);
        let _ = ids.review(&token, &[]).await;
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls + 1);
    }

    #[tokio::test]
    async fn proven_agents_reviews_outlast_a_flood_of_other_tokens() {
        let fake = Arc::new(Fake::default());
        let (_, now) = clock();
        let ids = Identities::with_clock(fake.clone(), IdentityCounters::new(), now.clone());
        let agents = ["podiam".to_string()];
        // node-b's agent, proven with a token reviewed a while ago: the soonest to expire.
        let honest = jwt("good-agent-b", now() + 3000);
        ids.review(&honest, &agents).await.expect("reviewed");
        ids.keep(&honest, &agents, "node-b");
        // node-a's credentials mint more tokens than the cache holds, each trusted longer;
        // a few prove node-a's agent (more than a node keeps).
        for i in 0..REVIEW_CACHE_ENTRIES + 10 {
            let token = jwt(&format!("good-{i}"), now() + 7200);
            ids.review(&token, &agents).await.expect("reviewed");
            if i < 2 * KEPT_PER_NODE {
                ids.keep(&token, &agents, "node-a");
            }
        }
        assert!(ids.cached() <= REVIEW_CACHE_ENTRIES);
        assert!(
            ids.remembered_user(&honest, &agents).is_some(),
            "node-b's agent's review was pushed out"
        );
        let kept = ids.cache().done.values().filter(|c| c.kept).count();
        assert_eq!(kept, 1 + KEPT_PER_NODE);
    }

    #[tokio::test]
    async fn a_bad_token_is_refused_without_asking_for_each_call() {
        let fake = Arc::new(Fake::default());
        let ids = Identities::with_clock(fake.clone(), IdentityCounters::new(), clock().1);
        for _ in 0..10 {
            assert!(matches!(
                ids.review("bad", &[]).await,
                Ok(Review::Unauthenticated(_))
            ));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_reviews_of_one_token_share_one_request() {
        let fake = Arc::new(Fake::default());
        let (_, now) = clock();
        let ids = Arc::new(Identities::with_clock(
            fake.clone(),
            IdentityCounters::new(),
            now.clone(),
        ));
        let token = jwt("good", now() + 600);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let ids = Arc::clone(&ids);
                let token = token.clone();
                tokio::spawn(async move { ids.review(&token, &[]).await })
            })
            .collect();
        for call in calls {
            assert!(call.await.expect("task").is_ok());
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    /// A reviewer whose answers (refusals) wait until the test opens its gate.
    #[derive(Debug)]
    struct Gated {
        gate: tokio::sync::Semaphore,
        started: AtomicUsize,
    }

    impl Reviewer for Gated {
        fn review_token<'a>(
            &'a self,
            _: &'a str,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>> {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                let _open = self.gate.acquire().await;
                Ok(Review::Unauthenticated("no".into()))
            })
        }

        fn review_access<'a>(
            &'a self,
            _: &'a ReviewedUser,
            _: &'a Access,
        ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>> {
            Box::pin(async { Ok(Ok(())) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_its_callers_gave_up_on_ends_and_gives_its_slot_back() {
        let gated = Arc::new(Gated {
            gate: tokio::sync::Semaphore::new(0),
            started: AtomicUsize::new(0),
        });
        let ids = Identities::with_clock(gated.clone(), IdentityCounters::new(), clock().1);
        // Every slot taken by a review of a made-up token whose caller gives up (a short
        // gRPC deadline, a reset stream) while the API has not answered.
        for i in 0..REVIEWS_IN_FLIGHT {
            let gave_up =
                tokio::time::timeout(Duration::from_millis(1), ids.review(&format!("x{i}"), &[]))
                    .await;
            assert!(
                gave_up.is_err(),
                "review {i} answered before the gate opened"
            );
        }
        assert_eq!(gated.started.load(Ordering::SeqCst), REVIEWS_IN_FLIGHT);
        // The API answers: the reviews end with nobody waiting for them, give their slots
        // back, and are remembered; another token is then reviewed.
        gated.gate.add_permits(REVIEWS_IN_FLIGHT + 1);
        let next = tokio::time::timeout(Duration::from_secs(60), ids.review("next", &[])).await;
        assert!(
            matches!(next, Ok(Ok(Review::Unauthenticated(_)))),
            "a new token's review waited for slots nobody gives back: {next:?}"
        );
        assert_eq!(gated.started.load(Ordering::SeqCst), REVIEWS_IN_FLIGHT + 1);
        assert_eq!(ids.cached(), REVIEWS_IN_FLIGHT + 1);
        assert!(ids.cache().pending.is_empty(), "reviews left pending");
    }

    #[tokio::test(start_paused = true)]
    async fn one_addresss_flood_of_new_tokens_takes_its_share_of_the_slots_and_no_more() {
        let gated = Arc::new(Gated {
            gate: tokio::sync::Semaphore::new(0),
            started: AtomicUsize::new(0),
        });
        let ids = Identities::with_clock(gated.clone(), IdentityCounters::new(), clock().1);
        let node: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let started = || gated.started.load(Ordering::SeqCst);
        let ask = |token: String, from: IpAddr, within: Duration| {
            let ids = &ids;
            async move {
                tokio::time::timeout(
                    within,
                    ids.review_from(&token, &[], Some(Asker::Address(from))),
                )
                .await
            }
        };
        // Root on one node: as many made-up tokens as one address may have under way, each
        // caller giving up while the API has not answered.
        for i in 0..REVIEWS_PENDING_PER_ADDRESS {
            let gave_up = ask(format!("flood-{i}"), node, Duration::from_millis(1)).await;
            assert!(
                gave_up.is_err(),
                "review {i} answered before the gate opened"
            );
        }
        // Only the address's share of the slots reached the API.
        assert_eq!(started(), REVIEWS_IN_FLIGHT_PER_ADDRESS);
        // One more from it is refused at once, without asking the API.
        let refused = ask("flood-more".into(), node, Duration::from_millis(1)).await;
        assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
        assert_eq!(started(), REVIEWS_IN_FLIGHT_PER_ADDRESS);
        // Another node's new token is asked about at once, not behind the flood.
        let theirs = ask("theirs".into(), other, Duration::from_millis(1)).await;
        assert!(theirs.is_err(), "answered before the gate opened");
        assert_eq!(started(), REVIEWS_IN_FLIGHT_PER_ADDRESS + 1);
        // The API answers: the flood drains, the address's queue goes, it may ask again.
        gated.gate.add_permits(REVIEWS_PENDING_PER_ADDRESS + 2);
        while !ids.addresses.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(started(), REVIEWS_PENDING_PER_ADDRESS + 1);
        let again = ask("again".into(), node, Duration::from_secs(60)).await;
        assert!(
            matches!(again, Ok(Ok(Review::Unauthenticated(_)))),
            "{again:?}"
        );
        assert!(ids.addresses.is_empty(), "a queue left behind");
        assert!(ids.cache().pending.is_empty(), "reviews left pending");
    }

    #[tokio::test(start_paused = true)]
    async fn floods_from_many_addresses_wait_in_bounded_numbers() {
        let gated = Arc::new(Gated {
            gate: tokio::sync::Semaphore::new(0),
            started: AtomicUsize::new(0),
        });
        // 10.9.0.1 is a running agent's address (a node's).
        let agent_node = IpAddr::from([10, 9, 0, 1]);
        let ids = Identities::with_clock(gated.clone(), IdentityCounters::new(), clock().1)
            .with_agent_addresses(Arc::new(move |ip| ip == agent_node));
        // Root on one node calling from many addresses: each address's full share.
        let addresses = REVIEWS_PENDING / REVIEWS_PENDING_PER_ADDRESS;
        for a in 0..addresses {
            let from = IpAddr::from([10, 1, 0, u8::try_from(a).expect("small")]);
            for i in 0..REVIEWS_PENDING_PER_ADDRESS {
                let token = format!("flood-{a}-{i}");
                let gave_up = tokio::time::timeout(
                    Duration::from_millis(1),
                    ids.review_from(&token, &[], Some(Asker::Address(from))),
                )
                .await;
                assert!(gave_up.is_err(), "{token} answered before the gate opened");
            }
        }
        assert_eq!(ids.addresses.all(), REVIEWS_PENDING);
        // The next new token from any other address is refused at once, a fresh one too:
        // memory stays bounded however many addresses the flood has.
        for from in [IpAddr::from([10, 1, 0, 0]), IpAddr::from([10, 2, 0, 1])] {
            let refused = tokio::time::timeout(
                Duration::from_millis(1),
                ids.review_from("one-more", &[], Some(Asker::Address(from))),
            )
            .await;
            assert!(matches!(refused, Ok(Err(_))), "{from}: {refused:?}");
        }
        // Another node's few new tokens, its agent's from its address and its pods' from its
        // proven agent, still wait for their turn rather than being turned away: up to their
        // running share, then refused too.
        for honest in [Asker::Address(agent_node), Asker::Node("node-b".into())] {
            for i in 0..REVIEWS_IN_FLIGHT_PER_ADDRESS {
                let waits = tokio::time::timeout(
                    Duration::from_millis(1),
                    ids.review_from(&format!("{honest:?}-{i}"), &[], Some(honest.clone())),
                )
                .await;
                assert!(waits.is_err(), "{honest:?}-{i}: {waits:?}");
            }
            let refused = tokio::time::timeout(
                Duration::from_millis(1),
                ids.review_from("honest-more", &[], Some(honest.clone())),
            )
            .await;
            assert!(matches!(refused, Ok(Err(_))), "{honest:?}: {refused:?}");
        }
        let honest = 2 * REVIEWS_IN_FLIGHT_PER_ADDRESS;
        assert_eq!(ids.addresses.all(), REVIEWS_PENDING + honest);
        // Once the API answers, the count goes back to nothing.
        gated.gate.add_permits(REVIEWS_PENDING + honest);
        while ids.addresses.all() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(ids.addresses.is_empty(), "a queue left behind");
    }

    /// A reviewer whose access reviews wait until the test opens its gate; token reviews
    /// (refusals) are answered at once.
    #[derive(Debug)]
    struct SlowAccess {
        gate: tokio::sync::Semaphore,
    }

    impl Reviewer for SlowAccess {
        fn review_token<'a>(
            &'a self,
            _: &'a str,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>> {
            Box::pin(async { Ok(Review::Unauthenticated("no".into())) })
        }

        fn review_access<'a>(
            &'a self,
            _: &'a ReviewedUser,
            _: &'a Access,
        ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>> {
            Box::pin(async move {
                let _open = self.gate.acquire().await;
                Ok(Ok(()))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn operator_calls_access_reviews_do_not_hold_up_token_reviews() {
        let slow = Arc::new(SlowAccess {
            gate: tokio::sync::Semaphore::new(0),
        });
        let ids = Arc::new(Identities::with_clock(
            slow.clone(),
            IdentityCounters::new(),
            clock().1,
        ));
        let user = ReviewedUser {
            username: "system:serviceaccount:team-a:default".into(),
            uid: "u".into(),
            groups: Vec::new(),
            pod_name: None,
            pod_uid: None,
            node_name: None,
            extra: Default::default(),
        };
        // Any pod's own token is an operator token: its calls flood access reviews the API
        // is slow to answer.
        let flood: Vec<_> = (0..ACCESS_REVIEWS_PENDING_PER_USER)
            .map(|_| {
                let (ids, user) = (Arc::clone(&ids), user.clone());
                tokio::spawn(async move { ids.may(&user, &Access::LIST_PODS).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Past its 256 waiting or running, the user's next call is refused at once.
        let refused =
            tokio::time::timeout(Duration::from_millis(1), ids.may(&user, &Access::LIST_PODS))
                .await;
        assert!(
            matches!(refused, Ok(Err(ReviewUnavailable(_)))),
            "{refused:?}"
        );
        // A node's new token is reviewed at once all the same.
        let node: IpAddr = "10.0.0.1".parse().expect("ip");
        let review = tokio::time::timeout(
            Duration::from_millis(1),
            ids.review_from(
                "new-agent-token",
                &["podiam".to_string()],
                Some(Asker::Address(node)),
            ),
        )
        .await;
        assert!(
            matches!(review, Ok(Ok(Review::Unauthenticated(_)))),
            "{review:?}"
        );
        // The pod's calls beyond its 2 running wait behind them; an operator's call takes
        // one of the slots left rather than waiting behind the flood.
        let alice = ReviewedUser {
            username: "alice".into(),
            ..user.clone()
        };
        let theirs = {
            let ids = Arc::clone(&ids);
            tokio::spawn(async move { ids.may(&alice, &Access::LIST_PODS).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            ids.access_in_flight.available_permits(),
            ACCESS_REVIEWS_IN_FLIGHT - ACCESS_REVIEWS_PER_USER - 1
        );
        slow.gate.add_permits(ACCESS_REVIEWS_PENDING_PER_USER + 1);
        for call in flood {
            assert!(matches!(call.await, Ok(Ok(Ok(())))));
        }
        assert!(matches!(theirs.await, Ok(Ok(Ok(())))));
        assert!(ids.access_users.is_empty(), "a user's count left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn new_operator_tokens_are_reviewed_within_a_budget() {
        let fake = Arc::new(Fake::default());
        let ids = Identities::with_clock(fake.clone(), IdentityCounters::new(), clock().1);
        let burst = OPERATOR_REVIEWS_BURST as usize;
        for i in 0..burst {
            assert!(
                ids.review_operator(&format!("bad-{i}")).await.is_ok(),
                "{i}"
            );
        }
        assert!(ids.review_operator("bad-one-too-many").await.is_err());
        assert_eq!(fake.calls.load(Ordering::SeqCst), burst);
        // A token already reviewed needs no budget.
        assert!(ids.review_operator("bad-0").await.is_ok());
        // The budget comes back with time.
        tokio::time::advance(Duration::from_secs(1)).await;
        for i in 0..OPERATOR_REVIEWS_PER_SECOND as usize {
            assert!(
                ids.review_operator(&format!("later-{i}")).await.is_ok(),
                "{i}"
            );
        }
        assert!(ids.review_operator("later-too-many").await.is_err());
    }

    #[test]
    fn audiences_and_tokens_make_distinct_keys() {
        assert_ne!(digest("t", &[]), digest("t", &["podiam".into()]));
        assert_ne!(digest("t", &["a".into()]), digest("u", &["a".into()]));
        assert_ne!(
            digest("t", &["ab".into()]),
            digest("t", &["a".into(), "b".into()])
        );
    }

    /// Review `i`'s cache key.
    fn key_of(i: u64) -> [u8; 32] {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&i.to_le_bytes());
        key
    }

    /// A full cache: review `i` trusted until `until(i)`, kept when `kept(i)`.
    fn full_cache(
        until: impl Fn(u64) -> u64,
        kept: impl Fn(u64) -> bool,
    ) -> HashMap<[u8; 32], Cached> {
        (0..REVIEW_CACHE_ENTRIES as u64)
            .map(|i| {
                let cached = Cached {
                    review: Review::Unauthenticated(String::new()),
                    until: until(i),
                    kept: kept(i),
                };
                (key_of(i), cached)
            })
            .collect()
    }

    #[test]
    fn a_full_cache_drops_expired_then_soonest() {
        let mut done = full_cache(|i| 100 + i, |_| false);
        evict(&mut done, 150);
        assert_eq!(done.len(), REVIEW_CACHE_ENTRIES - 51);
        assert!(done.values().all(|c| c.until > 150));
    }

    #[test]
    fn a_full_cache_of_live_reviews_makes_room_for_an_eighth_more() {
        // Every other one kept: those go last, whenever they expire.
        let mut done = full_cache(|i| 1_000 + i, |i| i % 2 == 0);
        evict(&mut done, 150);
        let room = REVIEW_CACHE_ENTRIES / 8;
        assert_eq!(done.len(), REVIEW_CACHE_ENTRIES - room);
        // The soonest to expire of those not kept went; every kept one stayed.
        let gone: Vec<u64> = (0..REVIEW_CACHE_ENTRIES as u64)
            .filter(|i| !done.contains_key(&key_of(*i)))
            .collect();
        let soonest_not_kept: Vec<u64> = (0..REVIEW_CACHE_ENTRIES as u64)
            .filter(|i| i % 2 == 1)
            .take(room)
            .collect();
        assert_eq!(gone, soonest_not_kept);
    }

    #[test]
    fn bearer_tokens_are_read_from_metadata() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&metadata), None);
        metadata.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), Some("abc"));
        metadata.insert("authorization", "bearer  abc ".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), Some("abc"));
        metadata.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), None);
        metadata.insert("authorization", "Bearer ".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), None);
    }
}
