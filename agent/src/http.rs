//! The pod-facing HTTP server and the health server.
//!
//! [`MetadataService::handle`] answers one request given the TCP peer's IP — the only thing
//! that identifies a pod; no header is ever trusted for it. [`Refused::response`] is the one
//! place that turns a failure into an HTTP answer: each cause has its own status and a
//! one-line message, with no secret and no node detail in it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use podiam_proto::Reason;
use podiam_runtime::telemetry::Escaped;

use crate::cache::{CredentialCache, Entry, Source};
use crate::decision::ServerError;
use crate::imds;
use crate::metrics::{Metrics, RequestLabels, RouteLabels, ServerErrorLabels};
use crate::node_metadata::{NodeMetadata, NodeMetadataError};
use crate::pods::{Known, PodTable};
use crate::routes::{Route, route};
use crate::servers::Servers;
use crate::token::{TokenError, TokenKey, parse_ttl};
use podiam_proto::v1::{PodRef, PodState};
use podiam_runtime::clock::now_unix;
pub use podiam_runtime::serve::Limits;

/// The IMDSv2 token header.
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The IMDSv2 token TTL header, echoed on the token response (the Rust SDK requires it).
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
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
    #[error("no answer within the request deadline")]
    Deadline,
    #[error("{0}")]
    NodeMetadata(#[from] NodeMetadataError),
    #[error("{0}")]
    Server(#[from] ServerError),
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
            Refused::Deadline => StatusCode::GATEWAY_TIMEOUT,
            Refused::NodeMetadata(_) => StatusCode::BAD_GATEWAY,
            Refused::Server(ServerError::Refused { reason, .. }) => match reason {
                // EC2 answers 404 when an instance has no role, or for another role's name.
                Reason::UnknownPod | Reason::NoRole | Reason::WrongRole | Reason::OtherNode => {
                    StatusCode::NOT_FOUND
                }
                Reason::AmbiguousPod
                | Reason::RoleNotPermitted
                | Reason::InvalidRole
                | Reason::StsRefused => StatusCode::FORBIDDEN,
                Reason::StsUnavailable => StatusCode::BAD_GATEWAY,
                Reason::NotReady | Reason::AgentUnauthenticated | Reason::IdentityUnavailable => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
            Refused::Server(ServerError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Refused::Server(ServerError::Other(_)) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The answer to the pod: the status and a one-line message naming the cause.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let message = match self {
            Refused::Server(ServerError::Refused { reason, message }) => {
                format!("podiam: {reason}: {message}\n")
            }
            // Transport details (addresses, TLS errors) are for the agent's log only.
            Refused::Server(ServerError::Unavailable(_)) => {
                "podiam: server-unavailable: no podiam server answered; retry shortly\n".to_string()
            }
            Refused::Server(ServerError::Other(_)) => {
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
    servers: Arc<Servers>,
    table: Arc<PodTable>,
    cache: Arc<CredentialCache>,
    tokens: TokenKey,
    options: ServiceOptions,
    metrics: Arc<Metrics>,
}

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
        }
    }

    /// Answers one request from the pod at `peer`.
    pub async fn handle<B>(&self, peer: IpAddr, request: Request<B>) -> Response<Full<Bytes>> {
        let allow = self.options.allow.as_ref().map(|(regex, _)| regex);
        let route = route(request.method(), request.uri().path(), allow);
        let head = request.method() == Method::HEAD;
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            self.options.request_timeout,
            self.answer(peer, &route, &request),
        );
        let result = answer.await.unwrap_or(Err(Refused::Deadline));
        let mut response = match result {
            Ok(response) => response,
            Err(refused) => {
                let kind = match &refused {
                    Refused::Server(ServerError::Unavailable(e)) => Some(("unavailable", e)),
                    Refused::Server(ServerError::Other(e)) => Some(("other", e)),
                    _ => None,
                };
                if let Some((kind, error)) = kind {
                    // A server's message may quote what the pod asked.
                    tracing::warn!(%peer, error = %Escaped(error), "server call failed");
                    self.metrics
                        .server_errors
                        .get_or_create(&ServerErrorLabels { kind })
                        .inc();
                }
                if let Refused::NodeMetadata(error) = &refused {
                    tracing::warn!(%peer, error = %Escaped(error), "node metadata call failed");
                }
                refused.response()
            }
        };
        let labels = RequestLabels {
            route: route.label(),
            status: response.status().as_u16(),
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .latency
            .get_or_create(&RouteLabels {
                route: route.label(),
            })
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            %peer,
            method = %request.method(),
            path = request.uri().path(),
            status = response.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "request"
        );
        if head {
            *response.body_mut() = Full::new(Bytes::new());
        }
        response
    }

    async fn answer<B>(
        &self,
        peer: IpAddr,
        route: &Route,
        request: &Request<B>,
    ) -> Result<Response<Full<Bytes>>, Refused> {
        let headers = request.headers();
        let content_length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if headers.contains_key(header::TRANSFER_ENCODING)
            || content_length.is_some_and(|n| n > MAX_BODY_BYTES)
        {
            return Err(Refused::Body);
        }
        let now = now_unix();
        if *route == Route::Token {
            if headers.contains_key("x-forwarded-for") {
                return Err(Refused::Forwarded);
            }
            let ttl = parse_ttl(headers.get(TTL_HEADER).and_then(|v| v.to_str().ok()))
                .ok_or(Refused::BadTtl)?;
            let uid = match self.resolve(peer).await? {
                Resolved::Pod(state) => pod_uid(&state).to_string(),
                Resolved::Unsynced => String::new(),
            };
            let mut response = text(StatusCode::OK, self.tokens.issue(peer, &uid, now, ttl));
            response
                .headers_mut()
                .insert(TTL_HEADER, HeaderValue::from(ttl));
            return Ok(response);
        }
        match headers.get(TOKEN_HEADER) {
            Some(token) => {
                let token = token
                    .to_str()
                    .map_err(|_| Refused::BadToken(TokenError::Malformed))?;
                let current = match self.table.known(peer) {
                    Known::Pod(state) => Some(pod_uid(&state).to_string()),
                    Known::Nobody | Known::Unsynced => None,
                };
                self.tokens
                    .validate(token, peer, current.as_deref(), now)
                    .map_err(Refused::BadToken)?;
            }
            None if self.options.require_token => return Err(Refused::TokenRequired),
            None => {}
        }
        match route {
            // Answered above; kept for exhaustiveness.
            Route::Token => Err(Refused::Denied),
            Route::Denied => Err(Refused::Denied),
            Route::Proxy(path) => {
                let Some((_, node)) = &self.options.allow else {
                    return Err(Refused::Denied);
                };
                let (status, body) = Box::pin(node.get(path)).await?;
                Ok(text(status, body))
            }
            Route::MethodNotAllowed => Err(Refused::MethodNotAllowed),
            Route::ListRoles => {
                let role_name = match self.resolve(peer).await? {
                    Resolved::Pod(state) => permitted(&state)?.role_name.clone(),
                    Resolved::Unsynced => Box::pin(self.servers.pod_role(peer)).await?.role_name,
                };
                Ok(text(StatusCode::OK, role_name))
            }
            Route::Info => {
                let role_arn = match self.resolve(peer).await? {
                    Resolved::Pod(state) => permitted(&state)?.role_arn.clone(),
                    Resolved::Unsynced => Box::pin(self.servers.pod_role(peer)).await?.role_arn,
                };
                Ok(text(StatusCode::OK, imds::info_document(&role_arn, now)))
            }
            Route::Credentials(role) => match self.resolve(peer).await? {
                Resolved::Pod(state) => {
                    let entry = self.cached_credentials(peer, &state, role, now).await?;
                    Ok(text(StatusCode::OK, entry.document.clone()))
                }
                Resolved::Unsynced => {
                    let creds = Box::pin(self.servers.credentials(peer, role))
                        .await?
                        .credentials
                        .ok_or_else(|| ServerError::Other("answer without credentials".into()))?;
                    Ok(text(
                        StatusCode::OK,
                        imds::credentials_document(
                            &creds.access_key_id,
                            &creds.secret_access_key,
                            &creds.session_token,
                            creds.issued_unix,
                            creds.expiration_unix,
                        ),
                    ))
                }
            },
        }
    }

    /// The pod at `peer`. An address this node's table does not know is the start-up race
    /// (the pod's IP not yet in the API), a node stream lagging behind its replica, or no pod
    /// at all: the table is watched for up to [`UNKNOWN_POD_WAIT`] while the server is asked
    /// at once, and if the server has the pod on this node, the request is answered by
    /// asking the server directly.
    async fn resolve(&self, peer: IpAddr) -> Result<Resolved, Refused> {
        match self.table.known(peer) {
            Known::Pod(state) => Ok(Resolved::Pod(state)),
            Known::Unsynced => Ok(Resolved::Unsynced),
            // The slow path is boxed so that its server calls do not size every request.
            Known::Nobody => Box::pin(self.resolve_unknown(peer)).await,
        }
    }

    /// [`MetadataService::resolve`] for an address the table does not know.
    async fn resolve_unknown(&self, peer: IpAddr) -> Result<Resolved, Refused> {
        let table = self.table.wait_known(peer, UNKNOWN_POD_WAIT);
        let asked = self.ask(peer);
        let mut table = std::pin::pin!(table);
        let mut asked = std::pin::pin!(asked);
        let mut answered = false;
        loop {
            tokio::select! {
                known = table.as_mut() => match known {
                    Known::Pod(state) => return Ok(Resolved::Pod(state)),
                    Known::Unsynced => return Ok(Resolved::Unsynced),
                    Known::Nobody => break,
                },
                answer = asked.as_mut(), if !answered => {
                    answered = true;
                    if on_this_node(&answer) {
                        return Ok(Resolved::Unsynced);
                    }
                }
            }
        }
        // Still unknown after the wait: the server's latest word decides.
        let answer = self.ask(peer).await;
        if on_this_node(&answer) {
            return Ok(Resolved::Unsynced);
        }
        Err(refusal(Reason::UnknownPod, self.unknown(peer, answer)))
    }

    /// What the server says of `peer` (within [`ASK_WAIT`]): its pod's role, or why not.
    /// The server answers only about this agent's node.
    async fn ask(&self, peer: IpAddr) -> Option<Result<(), ServerError>> {
        tokio::time::timeout(ASK_WAIT, self.servers.pod_role(peer))
            .await
            .ok()
            .map(|answer| answer.map(|_| ()))
    }

    /// Why no pod of this node has `peer`, as far as the server tells.
    fn unknown(&self, peer: IpAddr, answer: Option<Result<(), ServerError>>) -> String {
        match answer {
            Some(Err(ServerError::Refused {
                reason: Reason::OtherNode,
                ..
            })) => format!(
                "no pod on this node ({}) has IP {peer}; the server places it on another node",
                self.servers.node_name()
            ),
            Some(Err(ServerError::Refused { message, .. })) if !message.is_empty() => message,
            _ => format!(
                "no pod known with IP {peer} on node {}",
                self.servers.node_name()
            ),
        }
    }

    /// The pod's credentials for `role`: from the cache, or from the server.
    async fn cached_credentials(
        &self,
        peer: IpAddr,
        state: &PodState,
        role: &str,
        now: i64,
    ) -> Result<Arc<Entry>, Refused> {
        let state = permitted(state)?;
        let no_pod = PodRef::default();
        let pod = state.pod.as_ref().unwrap_or(&no_pod);
        if role != state.role_name {
            return Err(refusal(
                Reason::WrongRole,
                format!(
                    "pod {}/{} has role {}, not {role}",
                    pod.namespace, pod.name, state.role_name
                ),
            ));
        }
        // Boxed, like every server call here: a call's future is several KiB, and an unboxed
        // one would make every connection's request future (allocated with the connection and
        // kept while it is open) that large, for the cache hits too.
        let fetch = || {
            Box::pin(async {
                let answer = self.servers.credentials(peer, role).await?;
                // The server decided on what it sees now; cache only if it is the same pod.
                if answer.pod.as_ref().map(|p| p.uid.as_str()) != Some(pod.uid.as_str()) {
                    return Err(refusal(
                        Reason::UnknownPod,
                        "the pod at this address changed; retry",
                    ));
                }
                answer.credentials.ok_or_else(|| {
                    Refused::from(ServerError::Other("answer without credentials".into()))
                })
            })
        };
        let (entry, source) = self
            .cache
            .get(&pod.uid, &state.role_arn, now, fetch)
            .await?;
        match source {
            Source::Cache => self.metrics.cache_hits.inc(),
            Source::Server => self.metrics.cache_misses.inc(),
        };
        Ok(entry)
    }
}

/// How long a request from an unknown address waits for its pod to appear: half of the
/// SDKs' 1 s budget, leaving the rest for fetching credentials.
const UNKNOWN_POD_WAIT: Duration = Duration::from_millis(500);

/// How long an unknown address waits for the server's explanation of it: room for a second
/// replica to be asked after [`HEDGE_AFTER`](crate::replicas::HEDGE_AFTER).
const ASK_WAIT: Duration = Duration::from_millis(400);

/// Who is asking, as far as the pod table knows.
enum Resolved {
    Pod(Arc<PodState>),
    /// No pod table (yet): ask the server.
    Unsynced,
}

fn pod_uid(state: &PodState) -> &str {
    state.pod.as_ref().map_or("", |p| p.uid.as_str())
}

/// Whether the server's answer about an address places its pod on this agent's node: a
/// role, or a refusal it could only make about a pod it found there.
fn on_this_node(answer: &Option<Result<(), ServerError>>) -> bool {
    match answer {
        Some(Ok(())) => true,
        Some(Err(ServerError::Refused { reason, .. })) => matches!(
            reason,
            Reason::NoRole
                | Reason::RoleNotPermitted
                | Reason::InvalidRole
                | Reason::AmbiguousPod
                | Reason::WrongRole
        ),
        _ => false,
    }
}

fn refusal(reason: Reason, message: impl Into<String>) -> Refused {
    Refused::Server(ServerError::Refused {
        reason,
        message: message.into(),
    })
}

/// The state itself if the pod may have its role, else its refusal.
fn permitted(state: &PodState) -> Result<&PodState, Refused> {
    let no_reason = i32::from(podiam_proto::v1::Reason::Unspecified);
    if state.refusal_reason == no_reason && !state.role_name.is_empty() {
        return Ok(state);
    }
    // An unknown reason from a newer server, or none, still refuses.
    let reason = Reason::from_wire(state.refusal_reason).unwrap_or(Reason::RoleNotPermitted);
    Err(refusal(reason, state.refusal_message.clone()))
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
    async fn a_request_future_stays_small() {
        // hyper keeps one request future's worth of memory per open connection, sized by the
        // future's type: server calls (several KiB each) must stay boxed behind the fast path.
        let (_dir, replicas) = crate::replicas::tests::set(Vec::new());
        let servers = Arc::new(Servers::new(
            Arc::new(replicas),
            "node".into(),
            Default::default(),
        ));
        let service = MetadataService::new(
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
        );
        let request = Request::builder()
            .uri("/latest/meta-data/iam/security-credentials/app")
            .body(())
            .expect("request");
        let future = service.handle("10.0.0.1".parse().expect("ip"), request);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "a request future takes {size} bytes");
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
        };
        cache
            .get("uid", "arn", 0, || async { Ok::<_, ()>(secret) })
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
        Refused::Server(ServerError::Refused {
            reason,
            message: "why".into(),
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
            (
                Refused::Server(ServerError::Unavailable("dial tcp 10.1.2.3:8443".into())),
                503,
                "server-unavailable",
            ),
            (
                Refused::Server(ServerError::Other("Internal: secret detail".into())),
                502,
                "server-error",
            ),
        ];
        for (failure, status, words) in cases {
            let response = failure.response();
            assert_eq!(response.status().as_u16(), status, "{failure:?}");
            let body = format!("{:?}", response.body());
            assert!(body.contains(words), "{failure:?}: {body}");
            // Transport and internal details stay in the agent's log.
            assert!(
                !body.contains("10.1.2.3") && !body.contains("secret detail"),
                "{body}"
            );
        }
    }
}
