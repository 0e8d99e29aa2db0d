//! The mutating admission webhook that sets pods up for the container-credentials endpoint.
//!
//! The API server calls it (AdmissionReview v1 over HTTPS, `POST /mutate-pods`) when a pod is
//! created in a namespace that opts in: the MutatingWebhookConfiguration's
//! `namespaceSelector` (`podiam.io/pod-identity` `enabled` or `required`) does the choosing.
//! A pod that a
//! role applies to — its own `iam.amazonaws.com/role`, its ServiceAccount's, its namespace's
//! default, as the decisions read them — gets, idempotently:
//!
//! - a projected ServiceAccount token volume, [`VOLUME`], for the pods' audience
//!   (`--pod-token-audience`) and `--webhook-token-expiration`;
//! - in every container and init container: the volume mounted read-only at [`MOUNT_PATH`],
//!   `AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
//!
//! What the pod already has is left alone: a variable of either name (set by its owner), a
//! volume or mount of that name, a mount at that path. The webhook never refuses a pod: it
//! answers allowed, with or without a patch. While the server's view has not synced it
//! cannot know who has a role and answers 503: the configuration's `failurePolicy: Ignore`
//! then admits the pod unchanged. It gets its credentials from the metadata path, except in a
//! `required` namespace, where it gets none until it is created again. No pod ever falls back
//! to the node's role.
//!
//! A review's body is read into [`crate::admission`]'s types, not a generic JSON tree: it
//! costs about its size however it is made up, and a pod of more than
//! [`admission::MAX_CONTAINERS`] containers is answered as a bad request rather than patched.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use podiam_policy::decision::View;
use podiam_policy::index::MIRROR_ANNOTATION;
use podiam_runtime::telemetry::LogThrottle;
use serde_json::{Value, json};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::admission;
use crate::metrics::ResultLabels;
use crate::places::{PlaceHeld, Places};
use crate::watch::Cluster;

/// The one path served.
pub const PATH: &str = "/mutate-pods";
pub use crate::admission::{MOUNT_PATH, VOLUME};
/// The token's file in the volume.
pub const TOKEN_FILE: &str = "token";
/// The container-credentials endpoint as pods are told it: over IPv4 (the default), or
/// over IPv6 for clusters whose pods have IPv6 only (`--webhook-endpoint-url`).
pub const ENDPOINT_URL: &str = admission::ENDPOINT_URLS[0];
pub const ENDPOINT_URL_IPV6: &str = admission::ENDPOINT_URLS[1];
/// Largest AdmissionReview accepted: the API server's own limit on a request is 3 MiB.
const MAX_REVIEW_BYTES: usize = 3 << 20;
/// How long a review's body may take to arrive whole: the API server sends it at once. A
/// body sent slowly and never finished would otherwise hold up to 3 MiB, and a place among
/// those being read, for as long as its sender liked.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Reviews whose bodies are held at once (being read, or read and waiting for their turn),
/// from one address and from all. The port answers
/// anyone who reaches it (the API server presents no certificate): without a bound, 64
/// connections from each of a few addresses, each sending 3 MiB slowly, would take a
/// server's memory. An honest body arrives at once, so its place is held for a moment; one
/// address (a pod) sending slowly takes 4 places at most, and a body still arriving after
/// 100 ms gives its place to a new review when none is free ([`crate::places`]), so slow
/// senders of any number of addresses delay the API server's reviews by 100 ms at most.
const READING_PER_ADDRESS: usize = 4;
const READING: usize = 16;
/// Reviews parsed and answered at once: a parsed review can be about 16 times its body (a
/// body of small numbers). Two at once answer thousands of honest reviews a second.
const REVIEWS_AT_ONCE: usize = 2;
/// How long a review waits for a place to be read, and then for its turn to be answered,
/// before it is answered 503: within the API server's `timeoutSeconds` (5). Its
/// `failurePolicy: Ignore` then admits the pod unchanged.
const TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the webhook puts in pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// The token's audience (the servers' `--pod-token-audience`).
    pub audience: String,
    /// The token's `expirationSeconds` (the kubelet renews it at 80 % of that).
    pub expiration_seconds: i64,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`: [`ENDPOINT_URL`] or [`ENDPOINT_URL_IPV6`].
    pub endpoint_url: String,
}

/// The JSON patch (RFC 6902) that sets a pod (its `spec`, read as [`admission::Spec`]) up
/// for the container endpoint: only what it lacks, so that applying it to its own result adds
/// nothing. A container that names a credentials endpoint or token of its own (the
/// container-credential variables set to anything but what the webhook sets) is its owner's
/// and gets nothing: given the token file, its SDK would send the pod's token to that
/// endpoint. A pod whose containers are all such gets no volume either. Refused for a pod of
/// more than [`admission::MAX_CONTAINERS`] containers.
pub fn patch_for(spec: &admission::Spec, injection: &Injection) -> Result<Vec<Value>, ReviewError> {
    let lists = [
        ("initContainers", &spec.init_containers),
        ("containers", &spec.containers),
    ];
    let count: usize = lists
        .iter()
        .map(|(_, list)| list.as_ref().map_or(0, |list| list.count))
        .sum();
    if count > admission::MAX_CONTAINERS {
        return Err(ReviewError::BadRequest(format!(
            "a pod of {count} containers (more than {}) is left unchanged",
            admission::MAX_CONTAINERS
        )));
    }
    let ours: Vec<(String, &admission::Container)> = lists
        .iter()
        .filter_map(|(list, kept)| kept.as_ref().map(|kept| (list, kept)))
        .flat_map(|(list, kept)| {
            kept.kept
                .iter()
                .enumerate()
                .map(move |(i, c)| (format!("/spec/{list}/{i}"), c))
        })
        .filter(|(_, c)| !c.env.is_some_and(|env| env.names_its_own_endpoint()))
        .collect();
    let mut patch = Vec::new();
    if ours.is_empty() {
        return Ok(patch);
    }
    if spec.volumes.is_none() {
        patch.push(json!({"op": "add", "path": "/spec/volumes", "value": []}));
    }
    if !spec.volumes.is_some_and(|volumes| volumes.has_ours) {
        patch.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume(injection)}));
    }
    for (at, container) in ours {
        patch.extend(container_patch(&at, container, &injection.endpoint_url));
    }
    Ok(patch)
}

/// The projected token volume.
fn volume(injection: &Injection) -> Value {
    json!({
        "name": VOLUME,
        "projected": {
            "sources": [{"serviceAccountToken": {
                "audience": injection.audience,
                "expirationSeconds": injection.expiration_seconds,
                "path": TOKEN_FILE,
            }}],
        },
    })
}

/// What one container at `at` lacks: the two variables (the endpoint's `url`) and the
/// mount.
fn container_patch(at: &str, container: &admission::Container, url: &str) -> Vec<Value> {
    let mut patch = Vec::new();
    if container.env.is_none() {
        patch.push(json!({"op": "add", "path": format!("{at}/env"), "value": []}));
    }
    let has = container.env.map_or([false; 2], |env| env.has);
    let values = [url, admission::TOKEN_PATH];
    for ((name, value), has) in admission::VARIABLES.into_iter().zip(values).zip(has) {
        if !has {
            patch.push(json!({"op": "add", "path": format!("{at}/env/-"),
                              "value": {"name": name, "value": value}}));
        }
    }
    if !container.volume_mounts.is_some_and(|mounts| mounts.ours) {
        if container.volume_mounts.is_none() {
            patch.push(json!({"op": "add", "path": format!("{at}/volumeMounts"), "value": []}));
        }
        patch.push(json!({"op": "add", "path": format!("{at}/volumeMounts/-"),
                          "value": {"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": true}}));
    }
    patch
}

/// How a review turned out, for the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A role applies: the pod was given what it lacked (possibly nothing).
    Mutated,
    /// No role applies, or not a pod creation: admitted as it is.
    Unchanged,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// A body that is not the JSON of an AdmissionReview, said without quoting it: serde's
/// message quotes what it found (a string of megabytes, escaped to six times its size),
/// which would go into the log and back to the sender.
fn bad_json(error: serde_json::Error) -> ReviewError {
    let what = match error.classify() {
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "a field of the wrong type",
        serde_json::error::Category::Eof => "JSON that ends early",
        serde_json::error::Category::Io => "a body that could not be read",
    };
    ReviewError::BadRequest(format!(
        "{what} at line {} column {}",
        error.line(),
        error.column()
    ))
}

/// Why a review got no AdmissionReview answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview v1 request: {0}")]
    BadRequest(String),
    #[error("the server's view of pods, namespaces and ServiceAccounts has not synced yet")]
    NotSynced,
}

/// The webhook: the server's view, and what it injects.
#[derive(Debug)]
pub struct Webhook {
    cluster: Arc<Cluster>,
    injection: Injection,
    /// Places to read a review's body ([`READING_PER_ADDRESS`], [`READING`]; a slow body's
    /// taken by a new review, see [`crate::places`]).
    reading: Places,
    /// Turns to parse and answer a review ([`REVIEWS_AT_ONCE`]).
    turns: tokio::sync::Semaphore,
    /// Reviews not answered, logged once a minute per address and kind: anyone who reaches
    /// the port can send them.
    refusals_logged: LogThrottle<(IpAddr, &'static str)>,
}

/// How often a review not answered is logged per address and kind.
const REFUSALS_LOGGED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Webhook {
    pub fn new(cluster: Arc<Cluster>, injection: Injection) -> Webhook {
        Webhook {
            cluster,
            injection,
            reading: Places::new(READING_PER_ADDRESS, READING),
            turns: tokio::sync::Semaphore::new(REVIEWS_AT_ONCE),
            refusals_logged: LogThrottle::new(REFUSALS_LOGGED_EVERY),
        }
    }

    /// `body` read whole ([`MAX_REVIEW_BYTES`] at most, within [`BODY_TIMEOUT`]) in a place
    /// among those being read, with that place: a body read waits for its turn in it, so that
    /// bodies held in memory are never more than the places. The answer to give instead when
    /// it is not read.
    async fn read_body<B>(
        &self,
        peer: IpAddr,
        body: B,
        counted: &impl Fn(&'static str),
    ) -> Result<(Bytes, PlaceHeld<'_>), Response<Full<Bytes>>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Ok(place) = tokio::time::timeout(TURN_WAIT, self.reading.take(peer)).await else {
            counted("error");
            return Err(busy());
        };
        let read = Limited::new(body, MAX_REVIEW_BYTES).collect();
        let pushed_out = || {
            counted("error");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the review arrived too slowly: another took its place\n",
            )
        };
        let read = tokio::select! {
            // Pushed out first: a body done at that moment has lost its place already.
            biased;
            () = place.pushed_out() => return Err(pushed_out()),
            read = tokio::time::timeout(BODY_TIMEOUT, read) => read,
        };
        match read {
            // Its place kept from here on, unless it was given away as the body arrived.
            Ok(Ok(body)) if place.arrived() => Ok((body.to_bytes(), place)),
            Ok(Ok(_)) => Err(pushed_out()),
            Ok(Err(_)) => {
                counted("error");
                Err(plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the review is too large\n",
                ))
            }
            Err(_) => {
                counted("error");
                Err(plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the review did not arrive in time\n",
                ))
            }
        }
    }

    /// The answer to one AdmissionReview, `body` its JSON ([`admission`]: read without a
    /// generic tree).
    pub fn review(&self, body: &[u8]) -> Result<(Value, Outcome), ReviewError> {
        let review: admission::Review = serde_json::from_slice(body).map_err(bad_json)?;
        let request = review
            .request
            .ok_or_else(|| ReviewError::BadRequest("no request".into()))?;
        let uid = admission::text(&request.uid)
            .filter(|uid| !uid.is_empty())
            .ok_or_else(|| ReviewError::BadRequest("no request.uid".into()))?;
        let mut response = json!({"uid": uid, "allowed": true});
        let text = admission::text;
        let kind = request.kind.as_ref();
        let is_pod_create = kind.and_then(|k| text(&k.kind)) == Some("Pod")
            && kind.and_then(|k| text(&k.group)) == Some("")
            && text(&request.operation) == Some("CREATE");
        let pod: admission::Pod = match request.object.filter(|_| is_pod_create) {
            Some(object) => serde_json::from_str(object.get()).map_err(bad_json)?,
            None => admission::Pod::default(),
        };
        let outcome = if is_pod_create && self.applies(&pod, text(&request.namespace))? {
            let patch = patch_for(&pod.spec.unwrap_or_default(), &self.injection)?;
            if !patch.is_empty() {
                let patch = serde_json::to_vec(&patch).unwrap_or_default();
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(BASE64.encode(patch));
            }
            Outcome::Mutated
        } else {
            Outcome::Unchanged
        };
        let answer = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        });
        Ok((answer, outcome))
    }

    /// Whether a role applies to `pod`, being created in the review's `namespace`, and it can
    /// reach the endpoint. A pod
    /// on the node's own network is never given a role (it has the node's address) and its
    /// requests to 169.254.170.23 never meet the agent's rules (they are on the pods'
    /// interfaces): its token would go to whatever answers there, and its SDK's chain stop at
    /// a variable that leads nowhere. It is left as it is.
    fn applies(&self, pod: &admission::Pod, namespace: Option<&str>) -> Result<bool, ReviewError> {
        if !self.cluster.synced() {
            return Err(ReviewError::NotSynced);
        }
        let spec = pod.spec.as_ref();
        if spec.and_then(|spec| spec.host_network) == Some(true) {
            return Ok(false);
        }
        let metadata = pod.metadata.as_ref();
        let namespace = metadata
            .and_then(|m| admission::text(&m.namespace))
            .or(namespace)
            .unwrap_or_default();
        // The annotations are the pod's, up to 3 MiB: read before the view is locked.
        let role_key = self.cluster.pods().role_key().to_owned();
        let [own, mirror] = match metadata.and_then(|m| m.annotations) {
            Some(annotations) => {
                admission::annotations(annotations, [role_key.as_str(), MIRROR_ANNOTATION])
                    .map_err(bad_json)?
            }
            None => [None, None],
        };
        // A static pod's mirror never gets a role, and the API server refuses one with a
        // projected token volume.
        if mirror.is_some() {
            return Ok(false);
        }
        let own = own
            .as_deref()
            .map(str::trim)
            .filter(|role| !role.is_empty());
        let account = spec.and_then(|spec| spec.service_account_name.as_deref());
        let pods = self.cluster.pods();
        let namespaces = self.cluster.namespaces();
        let accounts = self.cluster.accounts();
        let view = View {
            pods: &pods,
            namespaces: &namespaces,
            accounts: &accounts,
            synced: true,
            base_arn: None,
        };
        Ok(view.role_for(namespace, account, own).is_some())
    }

    /// Answers one HTTP request: `POST /mutate-pods` with an AdmissionReview.
    pub async fn handle<B>(
        &self,
        peer: IpAddr,
        request: Request<B>,
        counted: impl Fn(&'static str),
    ) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.uri().path() != PATH {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        if request.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
        }
        let (body, place) = match self.read_body(peer, request.into_body(), &counted).await {
            Ok(read) => read,
            Err(answer) => return answer,
        };
        let Ok(Ok(_turn)) = tokio::time::timeout(TURN_WAIT, self.turns.acquire()).await else {
            counted("error");
            return busy();
        };
        drop(place);
        let answer = self.review(&body);
        match answer {
            Ok((answer, outcome)) => {
                counted(outcome.label());
                let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(error) => {
                counted("error");
                let (status, kind) = match error {
                    ReviewError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
                    ReviewError::NotSynced => (StatusCode::SERVICE_UNAVAILABLE, "not-synced"),
                };
                let now = std::time::Instant::now();
                if let Some(held_back) = self.refusals_logged.admit((peer, kind), now) {
                    tracing::warn!(
                        %peer,
                        %error,
                        held_back,
                        "admission review not answered (once a minute per address and kind)"
                    );
                }
                plain(status, format!("{error}\n"))
            }
        }
    }
}

/// Longest a connection may take to send a request's head: the API server sends at once.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest request head read (hyper's floor for its buffer is 8 KiB); bodies are read in
/// pieces of it.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request: the API server sends about ten.
const MAX_HEADERS: usize = 32;
/// How long a connection that gave its place to another address's may still answer the
/// request under way: the connections no longer counted stay this few.
const GIVEN_UP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `webhook` over HTTPS (`tls`, no client certificate) on `listener` until `stop`;
/// connections and the accept loop run on `tasks`. Reviews are counted in `reviews` by
/// outcome (mutated, unchanged, error).
pub fn serve<L: podiam_runtime::net::Listener>(
    listener: L,
    tls: Arc<podiam_runtime::rotate::Rotating<rustls::ServerConfig>>,
    webhook: Arc<Webhook>,
    reviews: Family<ResultLabels, Counter>,
    stop: tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
    let refused = Arc::new(|| {});
    let mut incoming =
        podiam_runtime::accept::accept_tls(listener, tls, stop.clone(), tasks, refused);
    let connections = tasks.clone();
    tasks.spawn(async move {
        use futures::StreamExt;
        while let Some(accepted) = incoming.next().await {
            let Ok(stream) = accepted else { continue };
            let peer = stream.get_ref().0.peer().ip().to_canonical();
            // Told to end when the server stops, or when its place goes to another address's
            // connection (see `podiam_runtime::accept::MAX_CONNECTIONS`).
            let given_up = stream.get_ref().0.given_up();
            let (webhook, reviews, stop) = (Arc::clone(&webhook), reviews.clone(), stop.clone());
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let (webhook, reviews) = (Arc::clone(&webhook), reviews.clone());
                    async move {
                        let count = |result: &'static str| {
                            reviews.get_or_create(&ResultLabels { result }).inc();
                        };
                        Ok::<_, std::convert::Infallible>(
                            webhook.handle(peer, request, count).await,
                        )
                    }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    // The API server's heads are small; hyper's default (about 400 KiB a
                    // connection, for heads of up to 100 headers) let every connection of
                    // any address that reaches the port hold that much.
                    .max_buf_size(MAX_HEAD_BYTES)
                    .max_headers(MAX_HEADERS)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let ending = async {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = given_up.cancelled() => {}
                    }
                };
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = ending => {
                        connection.as_mut().graceful_shutdown();
                        if given_up.is_cancelled() {
                            // Its place is another's already: a request under way has a
                            // moment to be answered, and the connection no longer.
                            let _ = tokio::time::timeout(GIVEN_UP_GRACE, connection).await;
                        } else {
                            let _ = connection.await;
                        }
                    }
                }
            });
        }
    });
}

/// 503: no place or turn in time.
fn busy() -> Response<Full<Bytes>> {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many reviews under way; try again\n",
    )
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection() -> Injection {
        Injection {
            audience: "podiam".into(),
            expiration_seconds: 86400,
            endpoint_url: ENDPOINT_URL.into(),
        }
    }

    /// The patch for `pod`, its spec read from its JSON as a review's is.
    fn patch_of(pod: &Value) -> Vec<Value> {
        let spec = serde_json::from_str(&pod["spec"].to_string()).expect("a spec");
        patch_for(&spec, &injection()).expect("a patch")
    }

    /// Applies `patch` as the API server would (only `add`, which is all the webhook uses).
    fn apply(mut object: Value, patch: &[Value]) -> Value {
        for op in patch {
            assert_eq!(op["op"], "add", "{op}");
            let path = op["path"].as_str().expect("path");
            let (parent, last) = path.rsplit_once('/').expect("a parent");
            let target = object.pointer_mut(parent).expect("the parent exists");
            match (target, last) {
                (Value::Array(items), "-") => items.push(op["value"].clone()),
                (Value::Object(map), key) => {
                    map.insert(key.to_string(), op["value"].clone());
                }
                (other, _) => panic!("cannot add at {path} to {other}"),
            }
        }
        object
    }

    #[test]
    fn a_pod_gets_the_volume_the_variables_and_the_mounts_once() {
        let pod = json!({"spec": {
            "initContainers": [{"name": "init", "image": "i"}],
            "containers": [
                {"name": "app", "image": "a", "env": [{"name": "KEEP", "value": "1"}]},
                {"name": "side", "image": "s", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }});
        let mutated = apply(pod.clone(), &patch_of(&pod));
        let volumes = mutated["spec"]["volumes"].as_array().expect("volumes");
        assert_eq!(volumes.len(), 2);
        let source = &volumes[1]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(source["audience"], "podiam");
        assert_eq!(source["expirationSeconds"], 86400);
        for container in ["initContainers", "containers"]
            .iter()
            .flat_map(|list| mutated["spec"][list].as_array().expect("containers"))
        {
            let env = &container["env"];
            let var = |name: &str| {
                env.as_array()
                    .expect("env")
                    .iter()
                    .find(|v| v["name"] == name)
                    .map(|v| v["value"].clone())
            };
            assert_eq!(
                var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
                Some(json!(ENDPOINT_URL))
            );
            assert_eq!(
                var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
                Some(json!(format!("{MOUNT_PATH}/{TOKEN_FILE}")))
            );
            let mounts = container["volumeMounts"].as_array().expect("mounts");
            assert!(
                mounts
                    .iter()
                    .any(|m| m["name"] == VOLUME && m["readOnly"] == true)
            );
        }
        assert_eq!(mutated["spec"]["containers"][0]["env"][0]["name"], "KEEP");
        // Idempotent: the mutated pod lacks nothing.
        assert_eq!(patch_of(&mutated), Vec::<Value>::new());
        // Called again after another webhook added a sidecar (reinvocationPolicy:
        // IfNeeded): the sidecar alone gets what it lacks, the volume is not added twice.
        let mut with_sidecar = mutated.clone();
        (with_sidecar["spec"]["containers"]
            .as_array_mut()
            .expect("containers"))
        .push(json!({"name": "proxy", "image": "p"}));
        let again = apply(with_sidecar.clone(), &patch_of(&with_sidecar));
        assert_eq!(again["spec"]["volumes"], mutated["spec"]["volumes"]);
        assert_eq!(
            again["spec"]["containers"][0],
            mutated["spec"]["containers"][0]
        );
        let proxy = &again["spec"]["containers"][2];
        assert_eq!(proxy["env"], mutated["spec"]["initContainers"][0]["env"]);
        assert_eq!(
            proxy["volumeMounts"],
            mutated["spec"]["initContainers"][0]["volumeMounts"]
        );
    }

    #[test]
    fn what_the_pod_sets_itself_is_left_alone() {
        let pod = json!({"spec": {"containers": [{"name": "app", "image": "a",
            "env": [{"name": "OTHER", "value": "1"}],
            "volumeMounts": [{"name": "mine", "mountPath": MOUNT_PATH}]}]}});
        let mutated = apply(pod.clone(), &patch_of(&pod));
        let container = &mutated["spec"]["containers"][0];
        assert_eq!(container["env"].as_array().expect("env").len(), 3);
        assert_eq!(
            container["volumeMounts"].as_array().expect("mounts").len(),
            1
        );
    }

    #[test]
    fn a_container_naming_its_own_credentials_endpoint_or_token_gets_nothing() {
        for (name, value) in [
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "https://broker.example/creds",
            ),
            (
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/x",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "secret"),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "/var/run/mine/token",
            ),
        ] {
            let own = json!({"name": "own", "image": "a", "env": [{"name": name, "value": value}]});
            // Alone in its pod: no patch at all, not even the volume.
            let pod = json!({"spec": {"containers": [own]}});
            assert_eq!(patch_of(&pod), Vec::<Value>::new(), "{name}");
            // Beside a container that names none: only that one is set up.
            let pod = json!({"spec": {"containers": [own, {"name": "app", "image": "a"}]}});
            let mutated = apply(pod.clone(), &patch_of(&pod));
            assert_eq!(mutated["spec"]["containers"][0], own, "{name}");
            let app = &mutated["spec"]["containers"][1];
            assert_eq!(app["env"].as_array().expect("env").len(), 2, "{name}");
            assert_eq!(mutated["spec"]["volumes"][0]["name"], VOLUME, "{name}");
        }
        // A container copied from a pod the webhook set up (its variables, not its volume or
        // mount) is set up again: it gets the mount and the pod the volume, once.
        let copied = json!({"spec": {"containers": [{"name": "app", "image": "a", "env": [
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": ENDPOINT_URL},
            {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": admission::TOKEN_PATH},
        ]}]}});
        let mutated = apply(copied.clone(), &patch_of(&copied));
        let app = &mutated["spec"]["containers"][0];
        assert_eq!(app["env"], copied["spec"]["containers"][0]["env"]);
        assert_eq!(app["volumeMounts"][0]["mountPath"], MOUNT_PATH);
        assert_eq!(mutated["spec"]["volumes"][0]["name"], VOLUME);
        assert_eq!(patch_of(&mutated), Vec::<Value>::new());
        assert_eq!(admission::TOKEN_PATH, format!("{MOUNT_PATH}/{TOKEN_FILE}"));
    }

    fn review(object: Value, operation: &str) -> Vec<u8> {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation, "namespace": "team-a", "object": object}})
        .to_string()
        .into_bytes()
    }

    fn synced_cluster() -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::default());
        cluster.mark_synced();
        cluster
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_whose_body_never_ends_is_answered_408_after_3_s() {
        let webhook = Webhook::new(synced_cluster(), injection());
        let request = Request::post(PATH).body(never_ending()).expect("a request");
        let counts = std::sync::Mutex::new(Vec::new());
        let began = tokio::time::Instant::now();
        let response = webhook
            .handle(API_SERVER, request, |result| {
                counts.lock().expect("not poisoned").push(result);
            })
            .await;
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(began.elapsed(), BODY_TIMEOUT);
        assert_eq!(*counts.lock().expect("not poisoned"), ["error"]);
    }

    /// The first bytes of a review, then nothing more, and the connection kept open.
    fn never_ending() -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> {
        use futures::StreamExt;
        let first = hyper::body::Frame::data(Bytes::from_static(b"{\"request\": "));
        http_body_util::StreamBody::new(
            futures::stream::iter([Ok::<_, std::convert::Infallible>(first)])
                .chain(futures::stream::pending()),
        )
    }

    use std::time::Duration;

    const API_SERVER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 10));

    fn a_review() -> Request<Full<Bytes>> {
        let body = Full::new(Bytes::from(review(json!({}), "CREATE")));
        Request::post(PATH).body(body).expect("a request")
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_sending_slowly_holds_4_places_and_the_api_servers_reviews_go_on() {
        let webhook = Arc::new(Webhook::new(synced_cluster(), injection()));
        let pod = IpAddr::from([10, 1, 0, 9]);
        let began = tokio::time::Instant::now();
        // A pod sends reviews slowly: 4 are read at once, until their time is up...
        let held: Vec<_> = (0..READING_PER_ADDRESS)
            .map(|_| {
                let webhook = Arc::clone(&webhook);
                tokio::spawn(async move {
                    let request = Request::post(PATH).body(never_ending()).expect("a request");
                    webhook.handle(pod, request, |_| {}).await.status()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        // ...a fifth of its waits for a place, 2 s at most, then is answered 503...
        let waiting = {
            let webhook = Arc::clone(&webhook);
            tokio::spawn(async move {
                let request = Request::post(PATH).body(never_ending()).expect("a request");
                webhook.handle(pod, request, |_| {}).await.status()
            })
        };
        // ...while the API server's reviews are answered at once.
        let response = webhook.handle(API_SERVER, a_review(), |_| {}).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(began.elapsed(), Duration::ZERO);
        assert_eq!(
            waiting.await.expect("joins"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(began.elapsed(), TURN_WAIT);
        for held in held {
            assert_eq!(held.await.expect("joins"), StatusCode::REQUEST_TIMEOUT);
        }
        assert_eq!(began.elapsed(), BODY_TIMEOUT);
        // Their places given back, the pod's next review is read at once.
        let response = webhook.handle(pod, a_review(), |_| {}).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(began.elapsed(), BODY_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_senders_of_many_addresses_delay_the_api_servers_review_by_100_ms_at_most() {
        let webhook = Arc::new(Webhook::new(synced_cluster(), injection()));
        let began = tokio::time::Instant::now();
        // Pods of 4 addresses send reviews slowly, 4 each: every place is taken.
        let held: Vec<_> = (0..READING)
            .map(|i| {
                let webhook = Arc::clone(&webhook);
                let pod = IpAddr::from([10, 1, 0, (i / READING_PER_ADDRESS) as u8]);
                tokio::spawn(async move {
                    let request = Request::post(PATH).body(never_ending()).expect("a request");
                    webhook.handle(pod, request, |_| {}).await.status()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        // The API server's review takes the place of the slowest once it is slow.
        let response = webhook.handle(API_SERVER, a_review(), |_| {}).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(began.elapsed(), crate::places::SLOW);
        let mut statuses = Vec::new();
        for held in held {
            statuses.push(held.await.expect("joins"));
        }
        let pushed_out = statuses
            .iter()
            .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        assert_eq!(pushed_out, 1, "{statuses:?}");
        assert_eq!(
            statuses.len() - pushed_out,
            statuses
                .iter()
                .filter(|s| **s == StatusCode::REQUEST_TIMEOUT)
                .count()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_given_back_lets_a_waiting_review_in_at_once() {
        let webhook = Arc::new(Webhook::new(synced_cluster(), injection()));
        let pod = IpAddr::from([10, 1, 0, 9]);
        let held: Vec<_> = (0..READING_PER_ADDRESS)
            .map(|_| {
                let webhook = Arc::clone(&webhook);
                tokio::spawn(async move {
                    let request = Request::post(PATH).body(never_ending()).expect("a request");
                    webhook.handle(pod, request, |_| {}).await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let began = tokio::time::Instant::now();
        let waiting = {
            let webhook = Arc::clone(&webhook);
            tokio::spawn(async move { webhook.handle(pod, a_review(), |_| {}).await.status() })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        // One of the slow ones goes away half-read (its connection closed).
        held[0].abort();
        assert_eq!(waiting.await.expect("joins"), StatusCode::OK);
        assert_eq!(began.elapsed(), Duration::from_millis(500));
    }

    #[test]
    fn a_pod_of_more_containers_than_the_most_is_left_unchanged() {
        let webhook = Webhook::new(synced_cluster(), injection());
        let pod = |n: usize| {
            json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "app"}},
                   "spec": {"initContainers": [{}], "containers": vec![json!({}); n - 1]}})
        };
        let (answer, outcome) = webhook
            .review(&review(pod(admission::MAX_CONTAINERS), "CREATE"))
            .expect("answered");
        assert_eq!(outcome, Outcome::Mutated);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let refused = webhook.review(&review(pod(admission::MAX_CONTAINERS + 1), "CREATE"));
        assert!(
            matches!(&refused, Err(ReviewError::BadRequest(why)) if why.contains("1025 containers")),
            "{refused:?}"
        );
    }

    #[test]
    fn only_pods_a_role_applies_to_are_changed() {
        let webhook = Webhook::new(synced_cluster(), injection());
        let with_role = json!({"metadata": {"namespace": "team-a",
            "annotations": {"iam.amazonaws.com/role": "app-reader"}},
            "spec": {"containers": [{"name": "app", "image": "a"}]}});
        let (answer, outcome) = webhook
            .review(&review(with_role.clone(), "CREATE"))
            .expect("answered");
        assert_eq!(outcome, Outcome::Mutated);
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let patch: Vec<Value> = serde_json::from_slice(
            &BASE64
                .decode(answer["response"]["patch"].as_str().expect("patch"))
                .expect("base64"),
        )
        .expect("JSON");
        assert_eq!(patch, patch_of(&with_role));
        let without = json!({"metadata": {"namespace": "team-a"},
            "spec": {"containers": [{"name": "app", "image": "a"}]}});
        let mut host_network = with_role.clone();
        host_network["spec"]["hostNetwork"] = json!(true);
        let mut mirror = with_role.clone();
        mirror["metadata"]["annotations"][MIRROR_ANNOTATION] = json!("0123abcd");
        for (object, operation) in [
            (without, "CREATE"),
            (with_role, "UPDATE"),
            (host_network, "CREATE"),
            (mirror, "CREATE"),
        ] {
            let (answer, outcome) = webhook
                .review(&review(object, operation))
                .expect("answered");
            assert_eq!(outcome, Outcome::Unchanged);
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none());
        }
        // Before the view has synced nobody can be told apart: no answer (failurePolicy).
        let unsynced = Webhook::new(Arc::new(Cluster::default()), injection());
        let pod = json!({"metadata": {"namespace": "team-a"}, "spec": {"containers": []}});
        assert!(matches!(
            unsynced.review(&review(pod, "CREATE")),
            Err(ReviewError::NotSynced)
        ));
        assert!(matches!(
            webhook.review(br#"{"request": {}}"#),
            Err(ReviewError::BadRequest(_))
        ));
    }

    #[test]
    fn a_review_that_is_no_pod_is_answered_briefly_and_logged_once_a_minute_per_address() {
        let webhook = Webhook::new(synced_cluster(), injection());
        let ask = |peer: IpAddr, body: Vec<u8>| {
            let request = Request::post(PATH)
                .body(Full::new(Bytes::from(body)))
                .expect("a request");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime");
            runtime.block_on(webhook.handle(peer, request, |_| {}))
        };
        // Strings where objects belong: serde's message would quote them, six bytes for
        // each control character.
        let filler = json!("\u{7f}".repeat(500_000));
        let bodies = [
            review(filler.clone(), "CREATE"),
            review(json!({"metadata": {"annotations": filler}}), "CREATE"),
        ];
        let other: IpAddr = [10, 0, 0, 9].into();
        let lines = podiam_runtime::telemetry::logged_text(|| {
            for body in &bodies {
                for _ in 0..10 {
                    let response = ask(API_SERVER, body.clone());
                    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("a runtime");
                    let text = runtime
                        .block_on(response.into_body().collect())
                        .expect("a body")
                        .to_bytes();
                    assert!(text.len() < 200, "{} bytes", text.len());
                    assert!(!text.contains(&0x7f), "the answer quotes the review");
                }
            }
            ask(other, bodies[0].clone());
        });
        // Twenty from the API server's address, one from another: a line each.
        assert_eq!(
            lines.matches("admission review not answered").count(),
            2,
            "{lines}"
        );
        assert!(lines.len() < 2000, "{} bytes logged", lines.len());
    }
}
