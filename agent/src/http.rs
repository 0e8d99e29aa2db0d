//! The pod-facing HTTP server and the health server.
//!
//! [`MetadataService::answer`] answers one request given the TCP peer's IP — the only thing
//! that identifies a pod; no header is ever trusted for it. A request reads top to bottom:
//! what the pod table knows of the peer, the IMDSv2 token checked against it, then the
//! answer — at once from the table's decision and the cache (`MetadataService::answer_now`),
//! or, when it must wait, from the table waited for or one server call when the table cannot
//! say (`MetadataService::answer_later`: `resolve`, then `ask`). [`Refused::response`] is the one
//! place that turns a failure into an HTTP answer: each cause has its own status and a
//! one-line message, with no secret and no node detail in it.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use podiam_proto::Reason;
use podiam_runtime::telemetry::{Escaped, LogThrottle};

use crate::cache::{CredentialCache, Fetched, Held, Source};
use crate::decision::{PodDecision, PodId, Refusal, Role, ServerError};
use crate::imds;
use crate::metrics::{Metrics, ServerErrorLabels};
use crate::node_metadata::{NodeMetadata, NodeMetadataError};
use crate::pods::{Known, PodTable};
use crate::routes::{Document, Route, route};
use crate::servers::Servers;
use crate::token::{TokenError, TokenKey, parse_ttl};
use podiam_runtime::clock::now_unix;
pub use podiam_runtime::serve::Limits;

/// A response, or the future of one.
pub enum Answer {
    /// Made at once.
    Now(Response<Full<Bytes>>),
    /// Needs a wait (the table, a server or the node), within the request's deadline.
    Later(futures::future::BoxFuture<'static, Response<Full<Bytes>>>),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The response may carry credentials: only its status is shown.
        match self {
            Answer::Now(response) => write!(f, "Answer::Now({})", response.status()),
            Answer::Later(_) => f.write_str("Answer::Later"),
        }
    }
}

// Header names as constants: a name given as text is parsed and checked at every lookup.
/// The IMDSv2 token header.
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
/// The IMDSv2 token TTL header, echoed on the token response (the Rust SDK requires it).
const TTL_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
/// Set by proxies: a token request that carries it was relayed, and gets no token.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Largest request body accepted: no metadata request carries one.
const MAX_BODY_BYTES: u64 = 1024;

/// Why a request was not answered with what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not found")]
    Denied,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("missing or invalid {TTL_HEADER} header (1-21600)")]
    BadTtl,
    #[error("token requests through a proxy (X-Forwarded-For) are refused")]
    Forwarded,
    #[error("an IMDSv2 token is required")]
    TokenRequired,
    #[error("invalid IMDSv2 token: {0}")]
    BadToken(TokenError),
    #[error("request bodies are not accepted")]
    Body,
    /// The container-credentials endpoint's token is missing or cannot be one.
    #[error("{0}")]
    PodToken(crate::container::TokenProblem),
    /// Too many tokens not yet proven from one address (each costs the servers a review).
    #[error("too many new pod tokens from this address; retry in a few seconds")]
    TooManyNewTokens,
    /// Too many requests passed to the node's metadata service, by this pod or the node's.
    #[error("too many requests for the node's metadata; retry in a few seconds")]
    TooManyNodeRequests,
    #[error("no answer within the request deadline")]
    Deadline,
    #[error("{0}")]
    NodeMetadata(#[from] NodeMetadataError),
    /// The servers refuse the pod: their decision, from the node stream or a call.
    #[error("{0}")]
    ByServers(Refusal),
    /// The agent refuses the pod itself.
    #[error("{0}")]
    ByAgent(AgentRefusal),
    /// A token asked for from an address no pod of this node is known to have, even after
    /// the waits (or that the servers place on another node): not refused for good (EC2
    /// never answers a token request 404, and SDKs take a 403, 404 or 405 there for a
    /// service without IMDSv2, which several then never ask again), but for now: 503, as
    /// for servers out of reach.
    #[error("{0}; no token for this address now: retry shortly")]
    TokenForUnknown(AgentRefusal),
    /// The servers refused credentials for a reason a 404 is answered with (no such pod or
    /// role), or answered for another pod at the address, while this node's view of the pod,
    /// which lists its role, still grants it: the two views differ for a moment (a change
    /// not yet streamed, a stream behind). A 404 here
    /// would contradict the role listing, and SDKs that get a 404 for a listed role ask the
    /// listing again at once, some without end (Ruby): 503 until the views agree.
    #[error("{0} (this node's view still lists the role; the views differ for now: retry shortly)")]
    ViewsDiffer(Refusal),
    /// No server answered.
    #[error("server unavailable: {0}")]
    ServersUnavailable(String),
    /// A server answered with an error podiam does not define.
    #[error("server error: {0}")]
    ServerFailed(String),
}

impl From<ServerError> for Refused {
    fn from(error: ServerError) -> Refused {
        match error {
            ServerError::Refused(refusal) => Refused::ByServers(refusal),
            ServerError::Unavailable(why) => Refused::ServersUnavailable(why),
            ServerError::Other(why) => Refused::ServerFailed(why),
        }
    }
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Refused {
        Refused::ByServers(refusal)
    }
}

impl Held for Refused {
    fn refusal(&self) -> Option<&Refusal> {
        match self {
            Refused::ByServers(refusal) => Some(refusal),
            _ => None,
        }
    }
}

/// Why the agent refuses a pod on its own word, not the servers'.
#[derive(Debug, thiserror::Error)]
pub enum AgentRefusal {
    /// No pod of this node has the address: the table does not know it after the wait, nor
    /// do the servers (or they did not answer). The message says what they said.
    #[error("{0}")]
    UnknownPod(String),
    /// The table does not know the address after the wait, and the servers place it on
    /// another node.
    #[error("{0}")]
    ElsewherePod(String),
    /// The pod asked for a role that is not its own (as the pod table has it).
    #[error("pod {pod} has role {actual}, not {asked}")]
    WrongRole {
        pod: PodId,
        asked: String,
        actual: String,
    },
    /// The servers answered for another pod than the table's at this address.
    #[error("the pod at this address changed; retry")]
    PodChanged,
}

impl AgentRefusal {
    /// The reason it is answered with, as the servers' refusals are.
    pub fn reason(&self) -> Reason {
        match self {
            AgentRefusal::UnknownPod(_)
            | AgentRefusal::ElsewherePod(_)
            | AgentRefusal::PodChanged => Reason::UnknownPod,
            AgentRefusal::WrongRole { .. } => Reason::WrongRole,
        }
    }
}

/// The HTTP status a refusal for `reason` gets.
fn reason_status(reason: Reason) -> StatusCode {
    match reason {
        // EC2 answers 404 when an instance has no role, or for another role's name.
        Reason::UnknownPod | Reason::NoRole | Reason::WrongRole | Reason::OtherNode => {
            StatusCode::NOT_FOUND
        }
        Reason::AmbiguousPod
        | Reason::RoleNotPermitted
        | Reason::InvalidRole
        | Reason::StsRefused
        | Reason::TokenRequired => StatusCode::FORBIDDEN,
        Reason::StsUnavailable => StatusCode::BAD_GATEWAY,
        // The container endpoint only; EKS Auth answers 400 for a token it does not accept.
        Reason::PodTokenRefused => StatusCode::BAD_REQUEST,
        Reason::NotReady | Reason::AgentUnauthenticated | Reason::IdentityUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl Refused {
    /// The one mapping from failures to HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Denied => StatusCode::NOT_FOUND,
            Refused::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refused::BadTtl => StatusCode::BAD_REQUEST,
            Refused::Forwarded => StatusCode::FORBIDDEN,
            Refused::TokenRequired | Refused::BadToken(_) => StatusCode::UNAUTHORIZED,
            Refused::Body => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::PodToken(_) => StatusCode::BAD_REQUEST,
            Refused::TooManyNewTokens | Refused::TooManyNodeRequests => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refused::Deadline => StatusCode::GATEWAY_TIMEOUT,
            Refused::NodeMetadata(_) => StatusCode::BAD_GATEWAY,
            Refused::ByServers(refusal) => reason_status(refusal.reason),
            Refused::ByAgent(refusal) => reason_status(refusal.reason()),
            Refused::ServersUnavailable(_)
            | Refused::TokenForUnknown(_)
            | Refused::ViewsDiffer(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refused::ServerFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The answer to the pod: the status and a one-line message naming the cause.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let message = match self {
            // What the servers say of this agent's own standing with them (its identity, their
            // readiness, the API behind them) names the node's agent pod, nodes and the API's
            // errors: for the agent's log, not for pods.
            Refused::ByServers(refusal) => match refusal.reason {
                reason if about_this_agent(reason) => {
                    format!(
                        "podiam: {}: the podiam servers cannot answer for this node now; \
                         retry shortly (the agent's log says why)\n",
                        refusal.reason
                    )
                }
                _ => format!("podiam: {}: {}\n", refusal.reason, refusal.message),
            },
            Refused::ByAgent(refusal) => format!("podiam: {}: {refusal}\n", refusal.reason()),
            Refused::TokenForUnknown(refusal) => format!("podiam: {}: {self}\n", refusal.reason()),
            Refused::ViewsDiffer(refusal) => format!("podiam: {}: {self}\n", refusal.reason),
            // Transport details (addresses, TLS errors) are for the agent's log only.
            Refused::ServersUnavailable(_) => {
                "podiam: server-unavailable: no podiam server answered; retry shortly\n".to_string()
            }
            Refused::ServerFailed(_) => {
                "podiam: server-error: the podiam server failed; see the agent's log\n".to_string()
            }
            Refused::NodeMetadata(_) => {
                "podiam: node-metadata-unavailable: the node's metadata service did not answer\n"
                    .to_string()
            }
            other => format!("podiam: {other}\n"),
        };
        text(self.status(), message)
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

/// How the metadata service behaves (from the agent's flags).
pub struct ServiceOptions {
    /// Refuse requests without an IMDSv2 token.
    pub require_token: bool,
    /// Paths passed to the node's metadata service (whole-path regex), and that service.
    pub allow: Option<(regex::Regex, NodeMetadata)>,
    /// Every request is answered within this time.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ServiceOptions {
    /// The allow-list by its source; the node's metadata client holds the agent's own token
    /// for that service and shows only whether it has one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceOptions")
            .field("require_token", &self.require_token)
            .field(
                "allow",
                &self
                    .allow
                    .as_ref()
                    .map(|(regex, node)| (regex.as_str(), node)),
            )
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// The metadata service pods talk to.
pub struct MetadataService {
    pub(crate) servers: Arc<Servers>,
    pub(crate) table: Arc<PodTable>,
    pub(crate) cache: Arc<CredentialCache>,
    tokens: TokenKey,
    pub(crate) options: ServiceOptions,
    pub(crate) metrics: Arc<Metrics>,
    /// Calls with tokens not yet proven, limited per address.
    pub(crate) new_tokens: crate::container::NewTokens,
    /// Addresses the servers placed on another node a moment ago: refused without a call
    /// (after the table's wait, which a pod of this node taking the address over ends).
    elsewhere: crate::elsewhere::Elsewhere,
    /// Failed server calls logged once a window per pod and kind: while the servers are out
    /// of reach every request of every pod fails alike, and a pod asking in a loop would
    /// otherwise write a line a request.
    failures_logged: LogThrottle<(IpAddr, &'static str)>,
}

/// The window of [`MetadataService::failures_logged`].
const FAILURES_LOGGED_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for MetadataService {
    /// Written by hand, like every `Debug` over a secret: the cache (credentials), the token
    /// key and the node's metadata token show nothing of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataService")
            .field("node", &self.servers.node_name())
            .field("cache", &self.cache)
            .field("tokens", &self.tokens)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl MetadataService {
    pub fn new(
        servers: Arc<Servers>,
        table: Arc<PodTable>,
        cache: Arc<CredentialCache>,
        tokens: TokenKey,
        options: ServiceOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        MetadataService {
            servers,
            table,
            cache,
            tokens,
            options,
            metrics,
            new_tokens: Default::default(),
            elsewhere: Default::default(),
            failures_logged: LogThrottle::new(FAILURES_LOGGED_EVERY),
        }
    }

    /// Answers one request from the pod at `peer`: at once when it can, else in a future.
    ///
    /// Most answers need no wait: a token for a pod in the table, a cached credentials
    /// document, the role of a pod in the table, a refusal. Those are made here, before any
    /// future exists, and with no deadline timer; only an answer that waits (for the table, a
    /// server or the node) is a future, boxed, with the request's deadline. hyper keeps the
    /// handler's future per connection and moves it for every request, so the common answer
    /// costs it no more than the response itself.
    pub fn answer<B>(self: &Arc<Self>, peer: IpAddr, request: Request<B>) -> Answer
    where
        B: Send + Sync + 'static,
    {
        let allow = self.options.allow.as_ref().map(|(regex, _)| regex);
        let route = route(request.method(), request.uri().path(), allow);
        let started = std::time::Instant::now();
        match self.answer_now(peer, &route, request.headers()) {
            Now::Done(result) => {
                Answer::Now(self.finish(peer, route.label(), started, &request, result))
            }
            Now::Wait { known, now } => {
                // On tokio's clock, as the waits are.
                let came = tokio::time::Instant::now();
                // The route may borrow the request's path; the future owns both.
                let route = route.into_owned();
                let service = Arc::clone(self);
                Answer::Later(Box::pin(async move {
                    let headers = request.headers();
                    let later = service.patient(peer, came, &known, |known| {
                        service.answer_later(peer, &route, headers, known, now)
                    });
                    let result = tokio::time::timeout(service.options.request_timeout, later)
                        .await
                        .unwrap_or(Err(Refused::Deadline));
                    let result = match (&route, result) {
                        (Route::Token, Err(Refused::ByAgent(refusal))) => {
                            Err(Refused::TokenForUnknown(refusal))
                        }
                        (_, result) => result,
                    };
                    service.finish(peer, route.label(), started, &request, result)
                }))
            }
        }
    }

    /// The response for `result`, the answer to `request` from `peer` started at `started`:
    /// a refusal turned into its HTTP answer (a server's failure logged and counted), the
    /// request counted and timed under `label`, a HEAD's body dropped.
    pub(crate) fn finish<B>(
        &self,
        peer: IpAddr,
        label: &'static str,
        started: std::time::Instant,
        request: &Request<B>,
        result: Result<Response<Full<Bytes>>, Refused>,
    ) -> Response<Full<Bytes>> {
        let mut response = match result {
            Ok(response) => response,
            Err(refused) => {
                let kind = match &refused {
                    Refused::ServersUnavailable(e) => Some(("unavailable", e)),
                    Refused::ServerFailed(e) => Some(("other", e)),
                    _ => None,
                };
                if let Some((kind, error)) = kind {
                    // tokio's clock: the same as the system's, but for tests in paused time.
                    let now = tokio::time::Instant::now().into_std();
                    // All of loopback is one sender (the node's own processes): using every
                    // address of 127/8 must not take the log's places from pods.
                    let sender = if peer.is_loopback() {
                        IpAddr::from([127, 0, 0, 1])
                    } else {
                        peer
                    };
                    if let Some(held_back) = self.failures_logged.admit((sender, kind), now) {
                        // A server's message may quote what the pod asked.
                        tracing::warn!(%peer, error = %Escaped(error), held_back, "server call failed");
                    }
                    self.metrics
                        .server_errors
                        .get_or_create(&ServerErrorLabels { kind })
                        .inc();
                }
                if let Refused::NodeMetadata(error) = &refused {
                    tracing::warn!(%peer, error = %Escaped(error), "node metadata call failed");
                }
                if let Refused::ByServers(refusal) = &refused
                    && about_this_agent(refusal.reason)
                {
                    // Every pod's request says the same while it lasts: the node stream's
                    // failure is the warning.
                    tracing::debug!(%peer, reason = %refusal.reason, message = %Escaped(&refusal.message), "servers cannot answer for this node");
                }
                refused.response()
            }
        };
        self.metrics.request(
            label,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
        tracing::debug!(
            %peer,
            method = %request.method(),
            path = request.uri().path(),
            status = response.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "request"
        );
        if request.method() == Method::HEAD {
            *response.body_mut() = Full::new(Bytes::new());
        }
        response
    }

    /// The request's answer, if it needs no wait: what the pod table knows of `peer`, the
    /// IMDSv2 token checked against it (before anything waits or calls), then the route's
    /// answer when the table (and the cache) can give it.
    fn answer_now(&self, peer: IpAddr, route: &Route<'_>, headers: &HeaderMap) -> Now {
        if let Err(refused) = refuse_bodies(headers) {
            return Now::Done(Err(refused));
        }
        let now = now_unix();
        let known = self.table.known(peer);
        if *route == Route::Token {
            let ttl = match token_ttl(headers) {
                Ok(ttl) => ttl,
                Err(refused) => return Now::Done(Err(refused)),
            };
            let uid = match &known {
                Known::Pod(decision) => decision.pod.uid.as_str(),
                // No table: bound to the address alone, without asking anyone.
                Known::Unsynced => "",
                Known::Nobody => return Now::Wait { known, now },
            };
            return Now::Done(Ok(self.token_response(peer, uid, now, ttl)));
        }
        if let Err(refused) = self.check_token(peer, &known, headers, now) {
            return Now::Done(Err(refused));
        }
        match (route, &known) {
            // The token was answered above; kept for exhaustiveness.
            (Route::Token | Route::Denied, _) => Now::Done(Err(Refused::Denied)),
            (Route::MethodNotAllowed, _) => Now::Done(Err(Refused::MethodNotAllowed)),
            (Route::ListRoles | Route::Info | Route::Credentials(..), Known::Pod(decision)) => {
                match self.for_pod(decision, route, now) {
                    Some(result) => Now::Done(result),
                    None => Now::Wait { known, now },
                }
            }
            _ => Now::Wait { known, now },
        }
    }

    /// The answer [`MetadataService::answer_now`] could not give at once (`known`: what the
    /// table knew of `peer` then, `now`: the request's time): the table waited for, or a
    /// server or the node asked.
    async fn answer_later(
        &self,
        peer: IpAddr,
        route: &Route<'_>,
        headers: &HeaderMap,
        known: Known,
        now: i64,
    ) -> Result<Response<Full<Bytes>>, Refused> {
        match route {
            // An address the synced table does not know even after the wait gets a token
            // only if the servers place a pod there on this node; bound to the pod they name.
            Route::Token => {
                let ttl = token_ttl(headers)?;
                let uid = match self.resolve(peer, known).await {
                    Known::Pod(decision) => decision.pod.uid.clone(),
                    Known::Unsynced => String::new(),
                    unlisted @ Known::Nobody => {
                        match self.ask(peer, &unlisted, self.servers.pod_role(peer)).await {
                            // The pod is here, with its role (bound to the pod the servers
                            // name) or refused one (its token is its own business; bound
                            // to the address).
                            Ok((_, uid)) => uid,
                            Err(Refused::ByServers(refusal)) if places_pod_here(refusal.reason) => {
                                String::new()
                            }
                            // Unknown here (waited out by `patient`, then answered 503:
                            // see `Refused::TokenForUnknown`).
                            Err(refused) => return Err(refused),
                        }
                    }
                };
                Ok(self.token_response(peer, &uid, now, ttl))
            }
            Route::Proxy(path) => {
                let Some((_, node)) = &self.options.allow else {
                    return Err(Refused::Denied);
                };
                // The node's own metadata is for the pods of this node only, not for any
                // address that reaches the node's port.
                self.pod_here(peer, known, headers, now).await?;
                if !node.admit(peer) {
                    return Err(Refused::TooManyNodeRequests);
                }
                let (status, body) = Box::pin(node.get(path)).await?;
                Ok(text(status, body))
            }
            Route::ListRoles | Route::Info | Route::Credentials(..) => {
                match self.resolve(peer, known).await {
                    Known::Pod(decision) => {
                        self.token_fits(peer, headers, &decision.pod.uid, now)?;
                        match (self.for_pod(&decision, route, now), route) {
                            (Some(result), _) => result,
                            (None, Route::Credentials(_, document)) => {
                                self.fetch_credentials(peer, &decision, *document, now)
                                    .await
                            }
                            // Only credentials can be missing from the cache.
                            (None, _) => Err(Refused::Denied),
                        }
                    }
                    unlisted => self.ask_for(peer, route, headers, &unlisted, now).await,
                }
            }
            Route::Denied => Err(Refused::Denied),
            Route::MethodNotAllowed => Err(Refused::MethodNotAllowed),
        }
    }

    /// The answer to `route` (a role, info or credentials request) for the pod `decision` is
    /// about, from its decision and the cache; `None` when the credentials are not cached
    /// (see [`MetadataService::fetch_credentials`]).
    fn for_pod(
        &self,
        decision: &PodDecision,
        route: &Route<'_>,
        now: i64,
    ) -> Option<Result<Response<Full<Bytes>>, Refused>> {
        let own = match decision.role_by_address() {
            Ok(own) => own,
            Err(refusal) => return Some(Err(Refused::ByServers(refusal.clone()))),
        };
        match route {
            Route::ListRoles => Some(Ok(text(StatusCode::OK, own.name.clone()))),
            Route::Info => Some(Ok(text(StatusCode::OK, imds::info_document(&own.arn, now)))),
            Route::Credentials(role, _) if *role != own.name => {
                Some(Err(Refused::ByAgent(AgentRefusal::WrongRole {
                    pod: decision.pod.clone(),
                    asked: role.to_string(),
                    actual: own.name.clone(),
                })))
            }
            Route::Credentials(_, document) => {
                let entry = self.cache.fresh(&decision.pod.uid, own, now)?;
                self.metrics.cache_hits.inc();
                Some(Ok(text(StatusCode::OK, entry.imds_document(*document))))
            }
            _ => Some(Err(Refused::Denied)),
        }
    }

    /// The answer to `route` (a role, info or credentials request) from `peer`, whom the
    /// table does not know (`unlisted`): the servers' answer to one call.
    async fn ask_for(
        &self,
        peer: IpAddr,
        route: &Route<'_>,
        headers: &HeaderMap,
        unlisted: &Known,
        now: i64,
    ) -> Result<Response<Full<Bytes>>, Refused> {
        match route {
            Route::Credentials(role, document) => {
                let call = self.servers.credentials(peer, role, "", 0);
                let issued = self.ask(peer, unlisted, call).await?;
                self.token_fits(peer, headers, &issued.pod_uid, now)?;
                let document = imds::credentials_document(&issued.credentials, *document);
                Ok(text(StatusCode::OK, document))
            }
            Route::ListRoles | Route::Info => {
                let (role, uid) = self
                    .ask(peer, unlisted, self.servers.pod_role(peer))
                    .await?;
                self.token_fits(peer, headers, &uid, now)?;
                Ok(match route {
                    Route::Info => text(StatusCode::OK, imds::info_document(&role.arn, now)),
                    _ => text(StatusCode::OK, role.name),
                })
            }
            _ => Err(Refused::Denied),
        }
    }

    /// A new IMDSv2 token for the pod at `peer`, bound to its UID (empty: to the address
    /// alone), valid `ttl` seconds from `now`.
    fn token_response(&self, peer: IpAddr, uid: &str, now: i64, ttl: u64) -> Response<Full<Bytes>> {
        let mut response = text(StatusCode::OK, self.tokens.issue(peer, uid, now, ttl));
        response
            .headers_mut()
            .insert(TTL_HEADER, HeaderValue::from(ttl));
        response
    }

    /// Checks the request's IMDSv2 token, if it has one (and that it has one, if required),
    /// against `peer` and the UID of the pod the table has there.
    fn check_token(
        &self,
        peer: IpAddr,
        known: &Known,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<(), Refused> {
        let Some(token) = headers.get(TOKEN_HEADER) else {
            if self.options.require_token {
                return Err(Refused::TokenRequired);
            }
            return Ok(());
        };
        let uid = match known {
            Known::Pod(decision) => Some(decision.pod.uid.as_str()),
            Known::Nobody | Known::Unsynced => None,
        };
        self.validate_token(peer, token, uid, now)
    }

    /// Checks the request's IMDSv2 token, if it has one, against the pod with `uid` (empty:
    /// not known) that an answer is for. The token was checked against the table as it was
    /// when the request came; one that waited may be answered for a pod the table did not
    /// name then (an address nobody had, a pod that replaced another), or by the servers.
    fn token_fits(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        uid: &str,
        now: i64,
    ) -> Result<(), Refused> {
        match headers.get(TOKEN_HEADER) {
            Some(token) => self.validate_token(peer, token, (!uid.is_empty()).then_some(uid), now),
            None => Ok(()),
        }
    }

    /// Checks the IMDSv2 `token` against `peer` and the pod with `uid`, if known.
    fn validate_token(
        &self,
        peer: IpAddr,
        token: &HeaderValue,
        uid: Option<&str>,
        now: i64,
    ) -> Result<(), Refused> {
        let token = token
            .to_str()
            .map_err(|_| Refused::BadToken(TokenError::Malformed))?;
        self.tokens
            .validate(token, peer, uid, now)
            .map_err(Refused::BadToken)
    }

    /// What can be known of `peer` without a server call: the table's word, waited for up
    /// to [`UNKNOWN_POD_WAIT`] when the synced table does not know the address yet (the
    /// start-up race: the pod's IP not yet in the API, or a node stream a moment behind its
    /// replica).
    pub(crate) async fn resolve(&self, peer: IpAddr, known: Known) -> Known {
        match known {
            Known::Nobody => Box::pin(self.table.wait_known(peer, UNKNOWN_POD_WAIT)).await,
            known => known,
        }
    }

    /// `answer` for what the table knows of `peer` (`known` when the request came, at
    /// `came`); answered again once if the address was unknown to the table and the
    /// servers alike and its pod reaches the table within [`UNKNOWN_POD_PATIENCE`] of the
    /// request: the servers' answer came early, and the rest of the SDKs' budget is better
    /// spent on waiting than on a 404 the SDK would not retry.
    pub(crate) async fn patient<T, Fut>(
        &self,
        peer: IpAddr,
        came: tokio::time::Instant,
        known: &Known,
        answer: impl Fn(Known) -> Fut,
    ) -> Result<T, Refused>
    where
        Fut: Future<Output = Result<T, Refused>>,
    {
        let first = answer(known.clone()).await;
        let unanswered = match &first {
            Err(Refused::ByAgent(AgentRefusal::UnknownPod(_))) => true,
            // The servers cannot answer for this agent now: the table may still learn the pod.
            Err(Refused::ByServers(refusal)) => about_this_agent(refusal.reason),
            _ => false,
        };
        if *known != Known::Nobody || !unanswered {
            return first;
        }
        let left = UNKNOWN_POD_PATIENCE.saturating_sub(came.elapsed());
        match Box::pin(self.table.wait_known(peer, left)).await {
            appeared @ Known::Pod(_) => answer(appeared).await,
            _ => first,
        }
    }

    /// Whether a pod of this node has `peer`'s address: the table's word (waited for as
    /// [`MetadataService::resolve`] does), or else the servers' (a pod of theirs here, with
    /// its role or refused one). Anything else is refused: unknown-pod, or the servers out
    /// of reach — never answered as if it were a pod.
    async fn pod_here(
        &self,
        peer: IpAddr,
        known: Known,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<(), Refused> {
        let unlisted = match self.resolve(peer, known).await {
            Known::Pod(decision) => return self.token_fits(peer, headers, &decision.pod.uid, now),
            unlisted => unlisted,
        };
        match self.ask(peer, &unlisted, self.servers.pod_role(peer)).await {
            Ok((_, uid)) => self.token_fits(peer, headers, &uid, now),
            Err(Refused::ByServers(refusal)) if places_pod_here(refusal.reason) => Ok(()),
            Err(refused) => Err(refused),
        }
    }

    /// The one server call for a pod the table cannot answer for (`unlisted` is what
    /// [`MetadataService::resolve`] found: unsynced, or nobody). With no table, the servers'
    /// answer is the answer. For an address the synced table still does not know, the
    /// servers are given [`ASK_WAIT`], and their answer stands only if it places the pod on
    /// this node (its role or credentials, or a refusal only a pod found here gets);
    /// anything else is unknown-pod, saying what the servers said ([`AgentRefusal::ElsewherePod`]
    /// when they place the pod on another node, else [`AgentRefusal::UnknownPod`], which
    /// [`MetadataService::patient`] may wait out).
    pub(crate) async fn ask<T>(
        &self,
        peer: IpAddr,
        unlisted: &Known,
        call: impl Future<Output = Result<T, ServerError>>,
    ) -> Result<T, Refused> {
        // Boxed, like every server call here: a call's future is several KiB, and an unboxed
        // one would make every connection's request future (allocated with the connection and
        // kept while it is open) that large, for the cache hits too.
        let call = Box::pin(call);
        if *unlisted != Known::Nobody {
            return call.await.map_err(Refused::from);
        }
        if self.elsewhere.recent(peer, tokio::time::Instant::now()) {
            return Err(self.placed_elsewhere(peer));
        }
        let answer = tokio::time::timeout(ASK_WAIT, call).await;
        let why = match answer {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(ServerError::Refused(refusal)))
                if places_pod_here(refusal.reason) || about_this_agent(refusal.reason) =>
            {
                return Err(Refused::ByServers(refusal));
            }
            Ok(Err(ServerError::Refused(Refusal {
                reason: Reason::OtherNode,
                ..
            }))) => {
                self.elsewhere.remember(peer, tokio::time::Instant::now());
                return Err(self.placed_elsewhere(peer));
            }
            Ok(Err(ServerError::Refused(Refusal { message, .. }))) if !message.is_empty() => {
                message
            }
            Ok(Err(_)) | Err(_) => format!(
                "no pod known with IP {peer} on node {}",
                self.servers.node_name()
            ),
        };
        Err(Refused::ByAgent(AgentRefusal::UnknownPod(why)))
    }

    /// The refusal of `peer`, an address the servers place on another node.
    fn placed_elsewhere(&self, peer: IpAddr) -> Refused {
        Refused::ByAgent(AgentRefusal::ElsewherePod(format!(
            "no pod on this node ({}) has IP {peer}; the server places it on another node",
            self.servers.node_name()
        )))
    }

    /// The credentials `document` of the pod `decision` is about, for its own role, from the
    /// servers (one call, shared by the requests that miss the cache together).
    async fn fetch_credentials(
        &self,
        peer: IpAddr,
        decision: &PodDecision,
        document: Document,
        now: i64,
    ) -> Result<Response<Full<Bytes>>, Refused> {
        let own = decision
            .role_by_address()
            .map_err(|refusal| Refused::ByServers(refusal.clone()))?;
        let pod = &decision.pod;
        // Boxed: see [`MetadataService::ask`].
        let fetch = || {
            Box::pin(async {
                let issued = self
                    .servers
                    .credentials(peer, &own.name, "", own.credential_key)
                    .await?;
                kept_for(issued, pod, own)
            })
        };
        let (entry, source) = match self.cache.get(&pod.uid, own, now, fetch).await {
            Ok(found) => found,
            Err(refused) => return Err(self.as_views_stand(peer, pod, own, refused)),
        };
        // The pod's decision may have changed while this request waited (its role, or its
        // namespace come to require its token; another request's fetch, with its token, may
        // be what this one joined): answered only as the decision stands now.
        still_granted(
            &self.table.known(peer),
            pod,
            own,
            PodDecision::role_by_address,
        )?;
        match source {
            Source::Cache => self.metrics.cache_hits.inc(),
            Source::Server => self.metrics.cache_misses.inc(),
        };
        Ok(text(StatusCode::OK, entry.imds_document(document)))
    }

    /// `refused`, the servers' answer to a credentials fetch for pod `pod` with role `own`,
    /// as it is answered while the table still lists that role for the pod at `peer`: a 404
    /// (no such pod or role at the servers, or another pod there) is the views differing.
    fn as_views_stand(&self, peer: IpAddr, pod: &PodId, own: &Role, refused: Refused) -> Refused {
        let not_found = match &refused {
            Refused::ByServers(refusal) => reason_status(refusal.reason) == StatusCode::NOT_FOUND,
            Refused::ByAgent(AgentRefusal::PodChanged) => true,
            _ => false,
        };
        if !not_found || !self.lists_role(peer, pod, own) {
            return refused;
        }
        match refused {
            Refused::ByServers(refusal) => Refused::ViewsDiffer(refusal),
            changed => Refused::ViewsDiffer(Refusal {
                reason: Reason::UnknownPod,
                message: changed.to_string(),
            }),
        }
    }

    /// Whether the table has pod `pod` at `peer` now, with role `own`: what the role listing
    /// answers it with.
    fn lists_role(&self, peer: IpAddr, pod: &PodId, own: &Role) -> bool {
        match self.table.known(peer) {
            Known::Pod(current) => {
                current.pod.uid == pod.uid
                    && current
                        .role_by_address()
                        .is_ok_and(|role| role.arn == own.arn)
            }
            Known::Nobody | Known::Unsynced => false,
        }
    }
}

/// The credentials of `issued`, a server's answer for the pod `pod` with role `own` as this
/// node's table had it, if they are for that pod; kept in the cache only if they are of the
/// session of the role the table names. The server decided on what it saw, which may differ
/// for a moment (an address given to another pod, a session annotation changed, a rollout
/// changing how replicas name sessions), and what is cached is served for half an hour.
pub(crate) fn kept_for(
    issued: crate::servers::Issued,
    pod: &PodId,
    own: &Role,
) -> Result<Fetched, Refused> {
    if issued.pod_uid != pod.uid {
        return Err(Refused::ByAgent(AgentRefusal::PodChanged));
    }
    let keep = issued.credential_key == 0
        || own.credential_key == 0
        || issued.credential_key == own.credential_key;
    if !keep {
        tracing::debug!(
            pod = %pod,
            "credentials of another session than this node's view names: answered, not kept"
        );
    }
    Ok(Fetched {
        credentials: issued.credentials,
        keep,
    })
}

/// Whether credentials of `own`, pod `pod`'s role before a wait, may still be answered with,
/// now that the table knows `now` of the address: when it has the same pod, only if that
/// pod's role (by `role_of`) is still `own`. A role changed meanwhile is refused as a
/// request naming the old role would be (`wrong-role`); the pod gets its new role at its
/// next fetch. When another pod has the address now, nothing fetched for `pod` is answered
/// (`PodChanged`): the request may be the new pod's, sent before the table knew it. An
/// address the table does not know (yet), or a table not synced, is left to what the
/// servers said.
pub(crate) fn still_granted(
    now: &Known,
    pod: &PodId,
    own: &Role,
    role_of: for<'a> fn(&'a PodDecision) -> Result<&'a Role, &'a Refusal>,
) -> Result<(), Refused> {
    let Known::Pod(current) = now else {
        return Ok(());
    };
    if current.pod.uid != pod.uid {
        return Err(Refused::ByAgent(AgentRefusal::PodChanged));
    }
    let role = role_of(current).map_err(|refusal| Refused::ByServers(refusal.clone()))?;
    if role.arn != own.arn {
        return Err(Refused::ByAgent(AgentRefusal::WrongRole {
            pod: pod.clone(),
            asked: own.name.clone(),
            actual: role.name.clone(),
        }));
    }
    Ok(())
}

/// What [`MetadataService::answer_now`] found.
enum Now {
    /// The answer (or the refusal), made at once.
    Done(Result<Response<Full<Bytes>>, Refused>),
    /// The answer needs a wait; `known` is what the table knew of the peer at `now`.
    Wait { known: Known, now: i64 },
}

/// The TTL an IMDSv2 token request asks for, or why it gets no token: a request relayed
/// through a proxy, or no valid TTL header.
fn token_ttl(headers: &HeaderMap) -> Result<u64, Refused> {
    if headers.contains_key(X_FORWARDED_FOR) {
        return Err(Refused::Forwarded);
    }
    parse_ttl(headers.get(TTL_HEADER).and_then(|v| v.to_str().ok())).ok_or(Refused::BadTtl)
}

/// How long a request from an unknown address waits for its pod to appear before the servers
/// are asked: half of the SDKs' 1 s budget, leaving the rest for the one server call (and,
/// if they know nothing either, for more of the same wait: [`UNKNOWN_POD_PATIENCE`]).
const UNKNOWN_POD_WAIT: Duration = Duration::from_millis(500);

/// How long the servers are given to answer about an address the table did not know even
/// after [`UNKNOWN_POD_WAIT`]: room for a second replica to be asked after
/// [`HEDGE_AFTER`](crate::replicas::HEDGE_AFTER), and the whole answer within the SDKs' 1 s.
const ASK_WAIT: Duration = Duration::from_millis(400);

/// Longest a request from an address nobody knows is held for its pod to reach the table:
/// the first wait and the servers' time together, within the SDKs' 1 s.
const UNKNOWN_POD_PATIENCE: Duration = Duration::from_millis(900);

/// Whether a server's refusal is about this agent's own standing with it (its identity, the
/// API behind it, its readiness), not about the pod asked for: its message names the agent's
/// pod, nodes and the API's errors, for the agent's log only (see [`Refused::response`]).
fn about_this_agent(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::AgentUnauthenticated | Reason::IdentityUnavailable | Reason::NotReady
    )
}

/// Whether a refusal is one the servers make only about a pod they found on this agent's
/// node (so the pod is here, merely refused).
fn places_pod_here(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::NoRole
            | Reason::RoleNotPermitted
            | Reason::InvalidRole
            | Reason::AmbiguousPod
            | Reason::WrongRole
            | Reason::StsRefused
            | Reason::StsUnavailable
            | Reason::PodTokenRefused
            | Reason::TokenRequired
    )
}

/// Refuses requests with a body: none of the metadata service's requests carries one.
pub(crate) fn refuse_bodies(headers: &HeaderMap) -> Result<(), Refused> {
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if headers.contains_key(header::TRANSFER_ENCODING)
        || content_length.is_some_and(|n| n > MAX_BODY_BYTES)
    {
        return Err(Refused::Body);
    }
    Ok(())
}

/// The health server's handler: `/live` always, `/ready` when a server answers, and
/// `/metrics`.
pub fn health(servers: &Servers, metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/live" => text(StatusCode::OK, "ok\n"),
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/ready" if servers.ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no podiam server answers\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_made_at_once_are_no_future() {
        // hyper keeps the handler's future per open connection, sized by its type, and moves
        // it for every request (issue 17): an answer made at once is the response alone, and
        // whatever waits (server calls are several KiB each) is boxed.
        let (_dir, replicas) = crate::replicas::tests::set(Vec::new());
        let servers = Arc::new(Servers::new(
            Arc::new(replicas),
            "node".into(),
            Default::default(),
        ));
        let service = Arc::new(MetadataService::new(
            servers,
            Arc::default(),
            Arc::new(CredentialCache::new(Duration::from_secs(1800))),
            TokenKey::generate().expect("token key"),
            ServiceOptions {
                require_token: false,
                allow: None,
                request_timeout: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        ));
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        // No table yet: a token is bound to the address alone, at once …
        let put = Request::put("/latest/api/token")
            .header(TTL_HEADER, "60")
            .body(())
            .expect("request");
        let Answer::Now(response) = service.answer(peer, put) else {
            panic!("a token needs no wait");
        };
        assert_eq!(response.status(), StatusCode::OK);
        // … and so is a refusal.
        let denied = Request::get("/latest/user-data").body(()).expect("request");
        assert!(
            matches!(service.answer(peer, denied), Answer::Now(r) if r.status() == StatusCode::NOT_FOUND)
        );
        // Credentials with no table wait for it, within the deadline.
        let get = Request::get("/latest/meta-data/iam/security-credentials/app")
            .body(())
            .expect("request");
        assert!(matches!(service.answer(peer, get), Answer::Later(_)));
        // 144 bytes on x86-64 (the response); the request future was 704 before, and 1288
        // when every request was awaited under a deadline timer.
        let size = std::mem::size_of::<Answer>();
        assert!(size <= 192, "an answer takes {size} bytes");
    }

    #[tokio::test]
    async fn debug_output_shows_no_secret() {
        // Everything the service holds, with a secret in each place one can be: cached
        // credentials and the document served for them, the token key, and the agent's own
        // token for the node's metadata service.
        let (_dir, replicas) = crate::replicas::tests::set(Vec::new());
        let servers = Arc::new(Servers::new(
            Arc::new(replicas),
            "node".into(),
            Default::default(),
        ));
        let cache = Arc::new(CredentialCache::new(Duration::from_secs(1800)));
        let secret = podiam_proto::v1::Credentials {
            access_key_id: "ASIAVISIBLE".into(),
            secret_access_key: "secret-access-key-xyz".into(),
            session_token: "session-token-xyz".into(),
            expiration_unix: 3600,
            issued_unix: 0,
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            valid_for_ms: 0,
        };
        cache
            .get("uid", "arn", 0, || async { Ok::<_, Refused>(secret) })
            .await
            .expect("cached");
        let node = NodeMetadata::new("http://169.254.169.254");
        node.remember_token("node-imds-token-xyz").await;
        let service = MetadataService::new(
            servers,
            Arc::default(),
            cache,
            TokenKey::generate().expect("token key"),
            ServiceOptions {
                require_token: false,
                allow: Some((crate::routes::allow_list(".*").expect("regex"), node)),
                request_timeout: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        );
        for shown in [format!("{service:?}"), format!("{service:#?}")] {
            for secret in [
                "secret-access-key-xyz",
                "session-token-xyz",
                "node-imds-token-xyz",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("MetadataService"), "{shown}");
        }
    }

    fn refused(reason: Reason) -> Refused {
        Refused::ByServers(Refusal {
            reason,
            message: "why".into(),
        })
    }

    fn wrong_role() -> Refused {
        Refused::ByAgent(AgentRefusal::WrongRole {
            pod: PodId {
                namespace: "ns".into(),
                name: "web".into(),
                uid: "u".into(),
            },
            asked: "admin".into(),
            actual: "app".into(),
        })
    }

    #[test]
    fn every_failure_has_its_status() {
        let cases: Vec<(Refused, u16, &str)> = vec![
            (Refused::Denied, 404, "not found"),
            (Refused::MethodNotAllowed, 405, "method not allowed"),
            (Refused::BadTtl, 400, "ttl"),
            (Refused::Forwarded, 403, "X-Forwarded-For"),
            (Refused::TokenRequired, 401, "token is required"),
            (Refused::BadToken(TokenError::Expired), 401, "expired"),
            (
                Refused::BadToken(TokenError::WrongAddress),
                401,
                "another address",
            ),
            (Refused::Body, 413, "bodies"),
            (Refused::Deadline, 504, "deadline"),
            (refused(Reason::UnknownPod), 404, "unknown-pod"),
            (refused(Reason::NoRole), 404, "no-role"),
            (refused(Reason::WrongRole), 404, "wrong-role"),
            (refused(Reason::AmbiguousPod), 403, "ambiguous-pod"),
            (refused(Reason::RoleNotPermitted), 403, "role-not-permitted"),
            (refused(Reason::InvalidRole), 403, "invalid-role"),
            (refused(Reason::StsRefused), 403, "sts-refused"),
            (refused(Reason::StsUnavailable), 502, "sts-unavailable"),
            (refused(Reason::NotReady), 503, "not-ready"),
            (refused(Reason::OtherNode), 404, "other-node"),
            (
                refused(Reason::AgentUnauthenticated),
                503,
                "agent-unauthenticated",
            ),
            (
                refused(Reason::IdentityUnavailable),
                503,
                "identity-unavailable",
            ),
            (refused(Reason::PodTokenRefused), 400, "pod-token-refused"),
            (refused(Reason::TokenRequired), 403, "token-required"),
            (
                Refused::PodToken(crate::container::TokenProblem::Missing),
                400,
                "no pod token",
            ),
            (
                Refused::PodToken(crate::container::TokenProblem::Expired),
                400,
                "expired",
            ),
            (Refused::TooManyNewTokens, 429, "too many new pod tokens"),
            (
                Refused::TooManyNodeRequests,
                429,
                "too many requests for the node's metadata",
            ),
            (
                Refused::ServersUnavailable("dial tcp 10.1.2.3:8443".into()),
                503,
                "server-unavailable",
            ),
            (
                Refused::TokenForUnknown(AgentRefusal::UnknownPod("nobody here".into())),
                503,
                "unknown-pod: nobody here; no token for this address now: retry shortly",
            ),
            (
                Refused::ViewsDiffer(Refusal {
                    reason: Reason::NoRole,
                    message: "why".into(),
                }),
                503,
                "no-role: why (this node",
            ),
            (
                Refused::ServerFailed("Internal: secret detail".into()),
                502,
                "server-error",
            ),
            // The agent's own refusals read as the servers' would.
            (
                Refused::ByAgent(AgentRefusal::UnknownPod("nobody here".into())),
                404,
                "unknown-pod",
            ),
            (
                Refused::ByAgent(AgentRefusal::ElsewherePod("another node's".into())),
                404,
                "unknown-pod",
            ),
            (
                Refused::ByAgent(AgentRefusal::PodChanged),
                404,
                "unknown-pod",
            ),
            (wrong_role(), 404, "wrong-role"),
        ];
        for (failure, status, words) in cases {
            let response = failure.response();
            assert_eq!(response.status().as_u16(), status, "{failure:?}");
            let body = format!("{:?}", response.body());
            assert!(body.contains(words), "{failure:?}: {body}");
            // The servers' word on this agent's standing is for its log.
            if let Refused::ByServers(Refusal {
                reason:
                    Reason::AgentUnauthenticated | Reason::IdentityUnavailable | Reason::NotReady,
                ..
            }) = &failure
            {
                assert!(!body.contains(": why"), "{failure:?}: {body}");
            }
            // Transport and internal details stay in the agent's log.
            assert!(
                !body.contains("10.1.2.3") && !body.contains("secret detail"),
                "{body}"
            );
        }
    }

    #[test]
    fn every_server_error_becomes_its_refusal() {
        let refusal = Refusal {
            reason: Reason::NoRole,
            message: "why".into(),
        };
        assert!(matches!(
            Refused::from(ServerError::Refused(refusal.clone())),
            Refused::ByServers(r) if r == refusal
        ));
        assert!(matches!(
            Refused::from(ServerError::Unavailable("x".into())),
            Refused::ServersUnavailable(_)
        ));
        assert!(matches!(
            Refused::from(ServerError::Other("x".into())),
            Refused::ServerFailed(_)
        ));
        // The agent's refusal of a role says whose role it is, and which was asked.
        let body = format!("{:?}", wrong_role().response().body());
        assert!(
            body.contains("podiam: wrong-role: pod ns/web has role app, not admin"),
            "{body}"
        );
    }

    /// A server's answer is for the table's pod, and kept for the table's session only:
    /// another pod at the address is refused; another session of the role (a replica behind
    /// a session annotation's change) is answered and not cached; a server or table that
    /// does not name the session (0) is taken at its word.
    #[test]
    fn answers_are_kept_for_the_tables_pod_and_session_only() {
        let pod = PodId {
            namespace: "ns".into(),
            name: "web".into(),
            uid: "uid-1".into(),
        };
        let own = Role {
            name: "app".into(),
            arn: "arn:aws:iam::123456789012:role/app".into(),
            credential_key: 7,
        };
        let answer = |uid: &str, credential_key: u64| crate::servers::Issued {
            pod_uid: uid.into(),
            credentials: podiam_proto::v1::Credentials::default(),
            credential_key,
        };
        let kept = |issued, own: &Role| kept_for(issued, &pod, own).map(|fetched| fetched.keep);
        assert!(matches!(kept(answer("uid-1", 7), &own), Ok(true)));
        assert!(matches!(kept(answer("uid-1", 0), &own), Ok(true)));
        let unknown = Role {
            credential_key: 0,
            ..own.clone()
        };
        assert!(matches!(kept(answer("uid-1", 8), &unknown), Ok(true)));
        assert!(matches!(kept(answer("uid-1", 8), &own), Ok(false)));
        assert!(matches!(
            kept_for(answer("uid-2", 7), &pod, &own),
            Err(Refused::ByAgent(AgentRefusal::PodChanged))
        ));
    }
}
