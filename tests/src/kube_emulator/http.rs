//! The HTTP surface: the accept loop, one hyper HTTP/1.1 connection task per client, and
//! the handlers that turn requests into store calls and store results into apiserver
//! responses.
//!
//! Each connection is plain HTTP or TLS, told apart by its first byte (see [`super::tls`]).
//! Every request is first authenticated ([`Authority::authenticate`]: no credentials means
//! the cluster admin) and, unless the user is in `system:masters`, authorised with RBAC
//! ([`request_attributes`] → [`authorize`]), both before routing, as the apiserver does.
//!
//! A pod creation goes through the mutating admission webhooks ([`create_pod`], the one
//! async step, with no store lock held) before it is stored.
//!
//! [`dispatch`] is the only place that decides what a request means; [`error_response`] is
//! the only place that turns an [`EmulatorError`] into a wire response (a `kind: Status`).
//! Every request is logged at debug level and recorded in a bounded request log
//! ([`RequestRecord`]) that tests read to see what kubectl actually sent.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::EmulatorOptions;
use super::attributes::{Attributes, UserInfo, request_attributes};
use super::auth::{Authority, policy};
use super::clock::now_unix;
use super::error::EmulatorError;
use super::paging::ContinueToken;
use super::patch::{PatchType, apply_patch};
use super::protobuf::{self, ProtobufError};
use super::rbac::{authorize, forbidden};
use super::resource::{
    Kind, Review, api_group_document, api_group_list_document, api_resource_list_document,
    api_versions_document, openapi_v3_document, openapi_v3_root, version_document,
};
use super::route::{Query, Representation, Route, negotiate, parse_route};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{DeleteOptions, ListOptions, Store, UpdateScope, WatchFrom};
use super::table::{IncludeObject, TableMeta, table};
use super::tls::{TLS_HANDSHAKE_RECORD, TlsIdentity};
use super::token::{parse_token_request, token_request_response};
use super::watch::{WatchFilter, WatchOutput, WatchSettings, WatchStream, event_line};
use super::webhook::Webhooks;

/// The response body type: whole JSON documents or a watch stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How many requests the request log keeps.
const REQUEST_LOG_CAPACITY: usize = 10_000;

/// One request as the emulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, e.g. `PATCH`.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string ("" if none).
    pub query: String,
    /// `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// `Accept` header, if any.
    pub accept: Option<String>,
    /// `User-Agent` header, if any.
    pub user_agent: Option<String>,
    /// Who made the request (`system:admin` without credentials); `None` if its
    /// credentials were refused.
    pub user: Option<String>,
    /// Whether the request came over TLS.
    pub tls: bool,
    /// The response status code.
    pub status: u16,
}

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// The objects.
    pub store: Store,
    /// The emulator's options.
    pub options: EmulatorOptions,
    /// `host:port` the emulator listens on (for `/api`'s serverAddressByClientCIDRs).
    pub server_address: String,
    /// Cancelled when the emulator shuts down.
    pub shutdown: CancellationToken,
    /// The bounded request log.
    pub requests: Mutex<VecDeque<RequestRecord>>,
    /// How long each list (not watch) request waits before it is answered: a slow API
    /// server, so that a client's relist takes a while.
    pub list_delay: Mutex<Duration>,
    /// While true, list (not watch) requests wait until it is false again: a relist held
    /// open for as long as a test needs.
    pub list_hold: tokio::sync::watch::Sender<bool>,
    /// While true, connections are neither read nor written: a partition
    /// ([`KubeEmulator::go_silent`](super::KubeEmulator::go_silent)).
    pub silent: tokio::sync::watch::Sender<bool>,
    /// The paths of the list requests waiting on [`Shared::list_hold`] now.
    pub held_lists: Mutex<Vec<String>>,
    /// Tokens, static users, the TokenReview fault and the review counters.
    pub authority: Authority,
    /// The certificate for TLS connections.
    pub tls: TlsIdentity,
    /// Mutating admission webhooks: service routes and the call log.
    pub webhooks: Webhooks,
}

impl Shared {
    fn record(&self, record: RequestRecord) {
        let mut log = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= REQUEST_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(record);
    }
}

/// Accepts connections until `stop` (the emulator's shutdown, or an outage), serving each
/// on its own task, tracked by `tasks` and by `connections`; every connection ends with
/// `stop` too.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    (stop, connections): (CancellationToken, TaskTracker),
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tasks.spawn(connections.track_future(accept_connection(
                    stream,
                    peer,
                    Arc::clone(&shared),
                    stop.clone(),
                )));
            }
            Err(error) => {
                warn!(%error, "accepting a connection failed");
                // Back off briefly so a persistent error (fd exhaustion) does not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one connection over TLS if it opens with a TLS handshake, else as plain HTTP.
async fn accept_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut silent = shared.silent.subscribe();
    if *silent.borrow_and_update() {
        // Accepted by the kernel, never answered; closed (dropped) when the partition heals.
        until_heard(&mut silent, &stop).await;
        return;
    }
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        _ = stop.cancelled() => return,
        peeked = stream.peek(&mut first) => peeked,
    };
    match peeked {
        Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {
            let acceptor = shared.tls.acceptor.clone();
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = acceptor.accept(stream) => accepted,
            };
            match accepted {
                Ok(tls) => serve_connection(tls, true, peer, shared, stop).await,
                Err(error) => debug!(%peer, %error, "TLS handshake failed"),
            }
        }
        Ok(_) => serve_connection(stream, false, peer, shared, stop).await,
        Err(error) => debug!(%peer, %error, "reading from a new connection failed"),
    }
}

async fn serve_connection<I>(
    io: I,
    tls: bool,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut silent, mut heal) = (shared.silent.subscribe(), shared.silent.subscribe());
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, request, tls).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    // Pinned here so that a partition can stop polling it without dropping (closing) it.
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // An outage or shutdown ends the connection before anything more is written.
        biased;
        _ = stop.cancelled() => {}
        () = async { let _ = silent.wait_for(|silent| *silent).await; } => {
            // A partition: nothing more is read or written until it heals; then the
            // connection is closed.
            until_heard(&mut heal, &stop).await;
        }
        result = &mut connection => {
            if let Err(error) = result {
                debug!(%peer, %error, "connection ended with an error");
            }
        }
    }
}

/// Waits until the emulator is no longer silent, or `stop`.
async fn until_heard(silent: &mut tokio::sync::watch::Receiver<bool>, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        // An error means the sender is gone: the emulator is shutting down.
        _ = silent.wait_for(|silent| !silent) => {}
    }
}

fn header_text(request: &Request<Incoming>, name: header::HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Handles one request, end to end.
async fn handle(shared: &Shared, request: Request<Incoming>, tls: bool) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let raw_query = request.uri().query().unwrap_or_default().to_string();
    let accept = header_text(&request, header::ACCEPT);
    let content_type = header_text(&request, header::CONTENT_TYPE);
    let user_agent = header_text(&request, header::USER_AGENT);
    let authorization = header_text(&request, header::AUTHORIZATION);
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            debug!(%error, "reading the request body failed");
            Bytes::new()
        }
    };
    let incoming = ParsedRequest {
        method: &method,
        path: &path,
        query: Query::parse(Some(&raw_query)),
        representation: negotiate(accept.as_deref()),
        content_type: content_type.as_deref(),
        body: &body,
    };
    let route = parse_route(&path);
    match route {
        Some(Route::Review(Review::TokenReview)) => shared.authority.count_token_review(),
        Some(Route::Review(Review::SubjectAccessReview)) => {
            shared.authority.count_subject_access_review();
        }
        _ => {}
    }
    let delay = *shared.list_delay.lock().unwrap_or_else(|p| p.into_inner());
    if method == Method::GET && !delay.is_zero() && !incoming.query.flag("watch") {
        tokio::time::sleep(delay).await;
    }
    if method == Method::GET && !incoming.query.flag("watch") {
        hold_list(shared, &path).await;
    }
    let user = shared
        .authority
        .authenticate(&shared.store, authorization.as_deref(), now_unix());
    let response = match &user {
        Ok(user) => match admit(shared, &incoming, user) {
            Ok(()) => respond(shared, &incoming, route, user).await,
            Err(error) => error_response(&error),
        },
        Err(error) => error_response(error),
    };
    let user = user.ok().map(|u| u.username);
    debug!(
        %method, %path, query = %raw_query, content_type = ?content_type, user = ?user,
        status = response.status().as_u16(), "request"
    );
    shared.record(RequestRecord {
        method: method.to_string(),
        path,
        query: raw_query,
        content_type,
        accept,
        user_agent,
        user,
        tls,
        status: response.status().as_u16(),
    });
    response
}

/// RBAC for everyone but `system:masters`.
fn admit(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    user: &UserInfo,
) -> Result<(), EmulatorError> {
    if user.is_privileged() {
        return Ok(());
    }
    let attributes = request_attributes(request.method.as_str(), request.path, &request.query);
    if authorize(&policy(&shared.store)?, user, &attributes).allowed {
        Ok(())
    } else {
        Err(forbidden(&user.username, &attributes))
    }
}

/// Answers an admitted request: pod creations through [`create_pod`], the rest through
/// [`dispatch`].
async fn respond(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    route: Option<Route>,
    user: &UserInfo,
) -> Response<Body> {
    let result = match route {
        Some(Route::Collection {
            kind: Kind::Pod,
            namespace,
            watch: false,
        }) if *request.method == Method::POST => {
            create_pod(shared, request, namespace.as_deref(), user).await
        }
        route => dispatch(shared, request, route, user),
    };
    result.unwrap_or_else(|error| error_response(&error))
}

/// POST of a pod: the mutating admission webhooks, then the store. A body the store would
/// refuse before admission (not an object, another type, another namespace than the URL's)
/// goes straight to the store, which refuses it; so does a namespace that does not exist.
async fn create_pod(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    url_namespace: Option<&str>,
    user: &UserInfo,
) -> Result<Response<Body>, EmulatorError> {
    let mut pod = request.object_body()?;
    let own_namespace = pod["metadata"]["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let namespace = url_namespace
        .map(str::to_string)
        .or_else(|| own_namespace.clone())
        .unwrap_or_else(|| "default".to_string());
    let admissible = pod.is_object()
        && (pod["metadata"].is_object() || pod["metadata"].is_null())
        && pod["apiVersion"].as_str().is_none_or(|v| v == "v1")
        && pod["kind"].as_str().is_none_or(|k| k == "Pod")
        && own_namespace.as_ref().is_none_or(|own| *own == namespace);
    if admissible {
        pod["metadata"]["namespace"] = json!(namespace);
        pod = shared
            .webhooks
            .admit_pod_create(&shared.store, user, &namespace, pod, request.dry_run())
            .await?;
    }
    let created = shared
        .store
        .create(Kind::Pod, url_namespace, pod, request.dry_run())?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// A request, parsed as far as [`dispatch`] needs.
struct ParsedRequest<'a> {
    method: &'a Method,
    path: &'a str,
    query: Query,
    representation: Representation,
    content_type: Option<&'a str>,
    body: &'a Bytes,
}

impl ParsedRequest<'_> {
    fn dry_run(&self) -> bool {
        self.query.get("dryRun") == Some("All")
    }

    fn json_body(&self) -> Result<Value, EmulatorError> {
        serde_json::from_slice(self.body)
            .map_err(|error| EmulatorError::BadRequest(format!("the body is not JSON: {error}")))
    }

    /// The body of a create, replace or review: JSON, or the protobuf kubectl's typed
    /// clients send (for the types [`protobuf`] knows; others are 415).
    fn object_body(&self) -> Result<Value, EmulatorError> {
        if protobuf::is_protobuf(self.content_type) {
            return protobuf::decode_object(self.body).map_err(|error| match error {
                ProtobufError::UnknownType { .. } => {
                    EmulatorError::UnsupportedMediaType(error.to_string())
                }
                _ => EmulatorError::BadRequest(error.to_string()),
            });
        }
        self.require_json_content()?;
        self.json_body()
    }

    fn require_json_content(&self) -> Result<(), EmulatorError> {
        match self.content_type {
            Some(ct) if !ct.starts_with("application/json") && !ct.starts_with("*/*") => {
                Err(EmulatorError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: application/json (got {ct})"
                )))
            }
            _ => Ok(()),
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The one mapping from errors to responses.
pub fn error_response(error: &EmulatorError) -> Response<Body> {
    let (code, _) = error.code_and_reason();
    if code >= 500 {
        warn!(%error, "internal error");
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error.to_status())
}

/// Routes one request from `user`.
fn dispatch(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    route: Option<Route>,
    user: &UserInfo,
) -> Result<Response<Body>, EmulatorError> {
    let route = route.ok_or(EmulatorError::UnknownPath)?;
    let method = request.method;
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value));
    match route {
        Route::Version if method == Method::GET => ok(version_document()),
        Route::CoreVersions if method == Method::GET => {
            ok(api_versions_document(&shared.server_address))
        }
        Route::Groups if method == Method::GET => ok(api_group_list_document()),
        Route::Group { group } if method == Method::GET => ok(api_group_document(group)),
        Route::Resources { group } if method == Method::GET => {
            ok(api_resource_list_document(group))
        }
        Route::OpenApiV3Root if method == Method::GET => ok(openapi_v3_root()),
        Route::OpenApiV3 { group } if method == Method::GET => ok(openapi_v3_document(group)),
        Route::Collection {
            kind,
            namespace,
            watch,
        } => match method.clone() {
            Method::GET if watch || request.query.flag("watch") => {
                watch_response(shared, request, kind, namespace, None)
            }
            Method::GET => list_response(shared, request, kind, namespace.as_deref()),
            Method::POST => {
                let created = shared.store.create(
                    kind,
                    namespace.as_deref(),
                    request.object_body()?,
                    request.dry_run(),
                )?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            other => Err(method_not_allowed(&other, request.path)),
        },
        Route::Object {
            kind,
            namespace,
            name,
            status,
            watch,
        } => {
            let ns = namespace.as_deref();
            let scope = if status {
                UpdateScope::Status
            } else {
                UpdateScope::Main
            };
            match method.clone() {
                Method::GET if watch || request.query.flag("watch") => {
                    watch_response(shared, request, kind, namespace.clone(), Some(name))
                }
                Method::GET => {
                    let object = shared.store.get(kind, ns, &name)?;
                    Ok(single_object_response(request, kind, object, shared))
                }
                Method::PUT => {
                    let body = request.object_body()?;
                    let updated = shared.store.update_with(
                        kind,
                        ns,
                        &name,
                        scope,
                        request.dry_run(),
                        move |_| Ok(body),
                    )?;
                    ok(updated)
                }
                Method::PATCH => {
                    let content_type = request.content_type.unwrap_or_default();
                    let patch_type =
                        PatchType::from_content_type(content_type).ok_or_else(|| {
                            EmulatorError::UnsupportedMediaType(format!(
                                "the body of the request was in an unknown format - accepted media \
                             types include: application/json-patch+json, \
                             application/merge-patch+json, \
                             application/strategic-merge-patch+json (got {content_type:?})"
                            ))
                        })?;
                    let patch = request.json_body()?;
                    let patched = shared.store.update_with(
                        kind,
                        ns,
                        &name,
                        scope,
                        request.dry_run(),
                        |old| {
                            apply_patch(patch_type, old, &patch).map_err(|error| {
                                EmulatorError::Invalid {
                                    kind: kind.kind_name(),
                                    name: name.clone(),
                                    message: error.to_string(),
                                }
                            })
                        },
                    )?;
                    ok(patched)
                }
                Method::DELETE if !status => {
                    let options = delete_options(request)?;
                    ok(shared.store.delete(kind, ns, &name, &options)?)
                }
                other => Err(method_not_allowed(&other, request.path)),
            }
        }
        Route::TokenRequest { namespace, name } if method == Method::POST => {
            let spec = parse_token_request(&request.object_body()?, &name)?;
            let now = now_unix();
            let (token, claims) = shared.authority.issue(
                &shared.store,
                &namespace,
                &name,
                spec.audiences.clone(),
                (now, now + spec.expiration_seconds),
                spec.bound.as_ref(),
            )?;
            let answer = token_request_response(&namespace, &name, &spec, &token, &claims);
            Ok(json_response(StatusCode::CREATED, &answer))
        }
        Route::Review(review) if method == Method::POST => {
            if review == Review::TokenReview && shared.authority.token_review_down() {
                return Err(EmulatorError::ServiceUnavailable(
                    "the token review service is unavailable (an emulated fault)".into(),
                ));
            }
            let mut body = request.object_body()?;
            if body["kind"]
                .as_str()
                .is_some_and(|k| k != review.kind_name())
            {
                return Err(EmulatorError::BadRequest(format!(
                    "the body is a {}, not a {}",
                    body["kind"],
                    review.kind_name()
                )));
            }
            let status = review_status(shared, review, &body["spec"], user)?;
            body["apiVersion"] = json!(review.api_version());
            body["kind"] = json!(review.kind_name());
            if !body["metadata"].is_object() {
                body["metadata"] = json!({});
            }
            body["metadata"]["creationTimestamp"] = Value::Null;
            body["status"] = status;
            Ok(json_response(StatusCode::CREATED, &body))
        }
        _ => Err(method_not_allowed(method, request.path)),
    }
}

/// The `status` of a review's answer.
fn review_status(
    shared: &Shared,
    review: Review,
    spec: &Value,
    requester: &UserInfo,
) -> Result<Value, EmulatorError> {
    let invalid = |message: String| EmulatorError::Invalid {
        kind: review.kind_name(),
        name: String::new(),
        message,
    };
    let access = |user: &UserInfo| -> Result<Value, EmulatorError> {
        let attributes = Attributes::from_review_spec(spec).map_err(invalid)?;
        let decision = authorize(&policy(&shared.store)?, user, &attributes);
        let mut status = json!({"allowed": decision.allowed, "denied": false});
        if !decision.reason.is_empty() {
            status["reason"] = json!(decision.reason);
        }
        Ok(status)
    };
    match review {
        Review::TokenReview => {
            let token = spec["token"].as_str().unwrap_or_default();
            if token.is_empty() {
                return Err(EmulatorError::BadRequest(
                    "spec.token: Required value: a TokenReview needs a token".into(),
                ));
            }
            let audiences: Vec<String> = spec["audiences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            Ok(
                match shared
                    .authority
                    .review_token(&shared.store, token, &audiences, now_unix())
                {
                    Ok((user, audiences)) => json!({
                        "authenticated": true,
                        "user": user.to_json(),
                        "audiences": audiences,
                    }),
                    Err(error) => json!({
                        "authenticated": false,
                        "user": {},
                        "error": error,
                    }),
                },
            )
        }
        Review::SelfSubjectReview => Ok(json!({"userInfo": requester.to_json()})),
        Review::SubjectAccessReview => {
            let subject = UserInfo::from_review_spec(spec);
            if subject.username.is_empty() && subject.groups.is_empty() {
                return Err(invalid(
                    "spec.user: Invalid value: \"\": at least one of user or groups must be set"
                        .into(),
                ));
            }
            access(&subject)
        }
        Review::SelfSubjectAccessReview => access(requester),
    }
}

fn method_not_allowed(method: &Method, path: &str) -> EmulatorError {
    EmulatorError::MethodNotAllowed(format!(
        "the server does not allow this method on the requested resource ({method} {path})"
    ))
}

/// DeleteOptions from the body (if any) and the query string.
fn delete_options(request: &ParsedRequest<'_>) -> Result<DeleteOptions, EmulatorError> {
    let body: Value = if request.body.is_empty() {
        Value::Null
    } else {
        request.json_body()?
    };
    let query_grace = request
        .query
        .non_empty("gracePeriodSeconds")
        .map(|g| {
            g.parse::<i64>()
                .map_err(|_| EmulatorError::BadRequest(format!("invalid gracePeriodSeconds {g:?}")))
        })
        .transpose()?;
    let body_dry_run = body["dryRun"]
        .as_array()
        .is_some_and(|d| d.iter().any(|v| v == "All"));
    Ok(DeleteOptions {
        grace_period_seconds: query_grace.or_else(|| body["gracePeriodSeconds"].as_i64()),
        uid: body["preconditions"]["uid"].as_str().map(str::to_string),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        dry_run: request.dry_run() || body_dry_run,
    })
}

/// Label/field selectors from the query string.
fn selectors(query: &Query) -> Result<ListOptions, EmulatorError> {
    let bad = |error: super::selector::SelectorError| EmulatorError::BadRequest(error.to_string());
    Ok(ListOptions {
        label_selector: query
            .non_empty("labelSelector")
            .map(LabelSelector::parse)
            .transpose()
            .map_err(bad)?,
        field_selector: query
            .non_empty("fieldSelector")
            .map(FieldSelector::parse)
            .transpose()
            .map_err(bad)?,
        limit: None,
        continue_token: None,
    })
}

fn list_response(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    kind: Kind,
    namespace: Option<&str>,
) -> Result<Response<Body>, EmulatorError> {
    let mut options = selectors(&request.query)?;
    options.limit = request
        .query
        .non_empty("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| EmulatorError::BadRequest(format!("invalid limit {l:?}")))
        })
        .transpose()?;
    options.continue_token = request
        .query
        .non_empty("continue")
        .map(ContinueToken::decode)
        .transpose()
        .map_err(|error| EmulatorError::BadRequest(error.to_string()))?;
    let result = shared.store.list(kind, namespace, &options)?;
    let body = match request.representation {
        Representation::Json => {
            let mut metadata = json!({"resourceVersion": result.resource_version.to_string()});
            if let Some(token) = &result.continue_token {
                metadata["continue"] = json!(token);
            }
            if let Some(count) = result.remaining_item_count {
                metadata["remainingItemCount"] = json!(count);
            }
            json!({
                "kind": kind.list_kind(),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
                "items": result.items,
            })
        }
        Representation::Table(api_version) => {
            let meta = TableMeta {
                resource_version: result.resource_version.to_string(),
                continue_token: result.continue_token.clone(),
                remaining_item_count: result.remaining_item_count,
            };
            let include = IncludeObject::parse(request.query.get("includeObject"));
            table(kind, &result.items, include, api_version, &meta, now_unix())
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn single_object_response(
    request: &ParsedRequest<'_>,
    kind: Kind,
    object: Value,
    shared: &Shared,
) -> Response<Body> {
    match request.representation {
        Representation::Json => json_response(StatusCode::OK, &object),
        Representation::Table(api_version) => {
            let meta = TableMeta {
                resource_version: shared.store.resource_version().to_string(),
                ..TableMeta::default()
            };
            let include = IncludeObject::parse(request.query.get("includeObject"));
            let rows = table(kind, &[object], include, api_version, &meta, now_unix());
            json_response(StatusCode::OK, &rows)
        }
    }
}

fn watch_response(
    shared: &Shared,
    request: &ParsedRequest<'_>,
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
) -> Result<Response<Body>, EmulatorError> {
    let query = &request.query;
    let mut selectors = selectors(query)?;
    if let Some(name) = name {
        let by_name = format!("metadata.name={name}");
        let combined = match query.non_empty("fieldSelector") {
            Some(existing) => format!("{existing},{by_name}"),
            None => by_name,
        };
        selectors.field_selector = Some(
            FieldSelector::parse(&combined)
                .map_err(|error| EmulatorError::BadRequest(error.to_string()))?,
        );
    }
    let resource_version =
        match query.non_empty("resourceVersion") {
            None | Some("0") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                EmulatorError::BadRequest(format!("invalid resourceVersion {rv:?}"))
            })?),
        };
    let from = WatchFrom {
        resource_version,
        send_initial_events: query.flag("sendInitialEvents"),
    };
    let output = match request.representation {
        Representation::Json => WatchOutput::Json,
        Representation::Table(api_version) => WatchOutput::Table(
            api_version,
            IncludeObject::parse(query.get("includeObject")),
        ),
    };
    let timeout = query
        .non_empty("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let settings = WatchSettings {
        bookmark_interval: query
            .flag("allowWatchBookmarks")
            .then_some(shared.options.bookmark_interval),
        timeout,
        output,
    };
    let start = match shared.store.watch(kind, &from) {
        Ok(start) => start,
        Err(error @ EmulatorError::Expired(_)) => {
            // The apiserver answers 200 and sends the 410 as a single ERROR event.
            let line = event_line("ERROR", &error.to_status());
            return Ok(streaming_response(futures::stream::once(
                async move { line },
            )));
        }
        Err(error) => return Err(error),
    };
    let filter = WatchFilter {
        kind,
        namespace,
        selectors,
    };
    let stream = WatchStream::new(start, filter, settings, shared.shutdown.clone());
    let chunks = futures::stream::unfold(stream, |mut stream| async move {
        stream.next_chunk().await.map(|chunk| (chunk, stream))
    });
    Ok(streaming_response(chunks))
}

fn streaming_response(
    chunks: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response<Body> {
    use futures::StreamExt;
    let body = StreamBody::new(chunks.map(|chunk| Ok::<_, Infallible>(Frame::data(chunk))));
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Waits while lists are held ([`Shared::list_hold`]), listed meanwhile in
/// [`Shared::held_lists`].
async fn hold_list(shared: &Shared, path: &str) {
    let mut hold = shared.list_hold.subscribe();
    if !*hold.borrow_and_update() {
        return;
    }
    let held = |f: &mut dyn FnMut(&mut Vec<String>)| {
        f(&mut shared.held_lists.lock().unwrap_or_else(|p| p.into_inner()));
    };
    held(&mut |lists| lists.push(path.to_string()));
    // An error means the sender is gone: the emulator is shutting down.
    let _ = hold.wait_for(|held| !held).await;
    held(&mut |lists| {
        if let Some(i) = lists.iter().position(|p| p == path) {
            lists.remove(i);
        }
    });
}
