//! An in-memory Kubernetes API server that speaks the real protocol well enough for the
//! real `kubectl` and kube-rs: core/v1 pods, namespaces, events and service accounts,
//! events.k8s.io/v1 events, rbac.authorization.k8s.io/v1 roles, cluster roles and their
//! bindings, and admissionregistration.k8s.io/v1 mutating webhook configurations, with
//! discovery, list with pagination and selectors, watch with resourceVersion
//! resumption, bookmarks, 410 Expired and streaming lists, create / replace / merge,
//! strategic-merge and JSON patches / delete, and server-side Tables for `kubectl get`.
//!
//! It also authenticates and authorises like an apiserver: TokenRequest
//! (`serviceaccounts/{name}/token`, `kubectl create token`) issues JWT-shaped service
//! account tokens, optionally bound to a pod; TokenReview checks them (audiences, expiry,
//! the service account and bound pod still existing) and static user tokens
//! ([`KubeEmulator::add_user_token`]); requests with `Authorization: Bearer` act as that
//! user and are authorised with RBAC (403 with the apiserver's message when denied), while
//! requests without credentials act as a cluster admin (`system:masters`), so clients that
//! do not care about identity need nothing; SubjectAccessReview and
//! SelfSubjectAccessReview (`kubectl auth can-i`) answer from the same RBAC evaluation, and
//! SelfSubjectReview answers `kubectl auth whoami`. A fresh emulator holds the default
//! cluster roles a real cluster has for discovery and self-reviews (see
//! [`DEFAULT_CLUSTER_ROLES`]).
//!
//! Pods created over HTTP go through mutating admission webhooks first, as on a real
//! cluster: every `MutatingWebhookConfiguration` whose rules and selectors match gets an
//! `AdmissionReview` over TLS (trusting only its `caBundle`) and may patch the pod, deny it,
//! or fail (see [`webhook`]). Services named in `clientConfig.service` are reached through
//! [`KubeEmulator::route_service`]; calls are logged in [`KubeEmulator::webhook_calls`].
//! Namespaces carry the label `kubernetes.io/metadata.name` as on a real cluster.
//!
//! It runs in-process on loopback ([`KubeEmulator::start`]), plain HTTP and TLS on the same
//! port (kubectl sends tokens only over TLS); tests and the e2e harness also read and write
//! objects directly ([`KubeEmulator::create`], [`KubeEmulator::merge_patch`], …) and mint
//! tokens ([`KubeEmulator::mint_token`]) without going through HTTP. Every write, whichever
//! way it arrives, bumps the one global resourceVersion and reaches every watch.
//!
//! How the files fit:
//! - [`store`]: objects, resourceVersion, watch history, broadcast (the only mutable state
//!   besides the token table).
//! - [`auth`]: the token authority (issued tokens, static users, TokenReview fault and
//!   counters) and the RBAC policy read from the store.
//! - [`http`]: accept loop (plain or TLS), authentication and authorisation of every
//!   request, routing to handlers, the one error → `Status` mapping.
//! - [`watch`]: one watch response stream (initial events, replay, live, bookmarks).
//! - [`webhook`]: calling mutating admission webhooks on pod creation (TLS, timeouts,
//!   failure policies, service routes, the call log).
//! - [`route`], [`attributes`], [`rbac`], [`token`], [`protobuf`], [`selector`], [`patch`],
//!   [`paging`], [`table`], [`clock`], [`admission`]: pure logic with table-driven unit tests
//!   (request routing; request → authorization attributes; RBAC evaluation and 403 messages;
//!   token claims, TokenRequest validation and review; kubectl's protobuf bodies → JSON;
//!   which webhooks a pod creation goes to and what their answers mean; …).
//! - [`resource`]: the served kinds and review resources, and the discovery documents.
//! - [`tls`]: the throwaway CA and server certificate.
//! - [`error`]: the error type, [`EmulatorError`], and its `Status` form.
//!
//! ```no_run
//! # async fn demo() -> Result<(), podiam_tests::kube_emulator::EmulatorError> {
//! use podiam_tests::kube_emulator::{EmulatorOptions, Kind, KubeEmulator, namespace, pod};
//! let emulator = KubeEmulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default()).await?;
//! emulator.write_kubeconfig("/tmp/kubeconfig")?;
//! emulator.create(namespace("team-a", &[("iam.amazonaws.com/permitted", "app-.*")]))?;
//! emulator.create(pod("team-a", "web", "10.1.0.5", &[("iam.amazonaws.com/role", "app-reader")]))?;
//! let web = emulator.get(Kind::Pod, Some("team-a"), "web")?;
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod attributes;
pub mod auth;
pub mod clock;
pub mod error;
pub mod http;
pub mod paging;
pub mod patch;
pub mod protobuf;
pub mod rbac;
pub mod resource;
pub mod route;
pub mod selector;
pub mod store;
pub mod table;
pub mod tls;
pub mod token;
pub mod watch;
pub mod webhook;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::EmulatorError;
pub use http::RequestRecord;
pub use patch::PatchType;
pub use resource::Kind;
pub use store::PodDeletion;
pub use token::{API_AUDIENCE, EXPIRY_LEEWAY_SECONDS};
pub use webhook::{WebhookCall, WebhookOutcome};

use http::Shared;
use store::{DeleteOptions, ListOptions, Store, StoreConfig, UpdateScope};

/// Default interval between BOOKMARK events on watches that allow them. The apiserver sends
/// them about once a minute; tests need them quickly.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Default number of writes kept for watch resumption (the apiserver's watch cache keeps a
/// window of recent events; 10 000 is far more than any test produces before it compacts on
/// purpose).
pub const DEFAULT_HISTORY: usize = 10_000;

/// Default capacity of the live event broadcast: a watch that falls this many events behind
/// is ended, like the apiserver ends watchers that cannot keep up.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// Namespaces every emulator starts with, like a fresh cluster.
pub const DEFAULT_NAMESPACES: [&str; 2] = ["default", "kube-system"];

/// ClusterRoles (each with a ClusterRoleBinding of the same name) every emulator starts
/// with, as a fresh cluster's RBAC bootstrap creates them: `cluster-admin` for
/// `system:masters`; `system:discovery`, `system:basic-user` and `system:public-info-viewer`
/// for every authenticated user (discovery, version and OpenAPI paths; self reviews); and
/// `system:auth-delegator` (TokenReview and SubjectAccessReview), unbound, for servers that
/// delegate authentication and authorisation, as podiam's does.
pub const DEFAULT_CLUSTER_ROLES: [&str; 5] = [
    "cluster-admin",
    "system:discovery",
    "system:basic-user",
    "system:public-info-viewer",
    "system:auth-delegator",
];

/// How the emulator behaves.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Interval between BOOKMARK events on watches with `allowWatchBookmarks=true`.
    pub bookmark_interval: Duration,
    /// Writes kept for watch resumption; older resourceVersions get 410 Expired.
    pub history: usize,
    /// Capacity of the live event broadcast per watcher.
    pub watch_buffer: usize,
    /// What deleting a pod does.
    pub pod_deletion: PodDeletion,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            history: DEFAULT_HISTORY,
            watch_buffer: DEFAULT_WATCH_BUFFER,
            pod_deletion: PodDeletion::Immediate,
        }
    }
}

/// A running emulator. Shuts down (ending every connection and watch) on
/// [`KubeEmulator::shutdown`] or when dropped.
#[derive(Debug)]
pub struct KubeEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The current listener's life (cancelled by [`KubeEmulator::go_down`]) and its
    /// connections.
    serving: Mutex<(CancellationToken, TaskTracker)>,
}

impl KubeEmulator {
    /// Binds `bind` (use `127.0.0.1:0` in tests) and starts serving. Must be called inside a
    /// tokio runtime. The namespaces in [`DEFAULT_NAMESPACES`] exist from the start.
    pub async fn start(
        bind: SocketAddr,
        options: EmulatorOptions,
    ) -> Result<KubeEmulator, EmulatorError> {
        let listener = TcpListener::bind(bind).await.map_err(EmulatorError::Bind)?;
        let addr = listener.local_addr().map_err(EmulatorError::Bind)?;
        let store = Store::new(StoreConfig {
            history: options.history.max(1),
            watch_buffer: options.watch_buffer.max(1),
            pod_deletion: options.pod_deletion,
        });
        for name in DEFAULT_NAMESPACES {
            store.create(Kind::Namespace, None, namespace(name, &[]), false)?;
        }
        for object in default_rbac() {
            let kind = Kind::from_type_meta(
                object["apiVersion"].as_str().unwrap_or_default(),
                object["kind"].as_str().unwrap_or_default(),
            )
            .ok_or_else(|| EmulatorError::BadRequest("a default RBAC object".into()))?;
            store.create(kind, None, object, false)?;
        }
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            store,
            options,
            server_address: addr.to_string(),
            shutdown: shutdown.clone(),
            requests: Mutex::new(VecDeque::new()),
            list_delay: Mutex::new(Duration::ZERO),
            list_hold: tokio::sync::watch::Sender::new(false),
            silent: tokio::sync::watch::Sender::new(false),
            held_lists: Mutex::new(Vec::new()),
            authority: auth::Authority::new(),
            tls: tls::generate()?,
            webhooks: webhook::Webhooks::default(),
        });
        let tasks = TaskTracker::new();
        let serving = (shutdown.child_token(), TaskTracker::new());
        tasks.spawn(http::serve(
            listener,
            Arc::clone(&shared),
            tasks.clone(),
            serving.clone(),
        ));
        Ok(KubeEmulator {
            addr,
            shared,
            shutdown,
            tasks,
            serving: Mutex::new(serving),
        })
    }

    /// An API server outage: stops listening (connections are refused) and ends every open
    /// connection and watch; returns once they have all ended, so that nothing changed from
    /// then on reaches a client. The objects stay, and can still be changed directly.
    pub async fn go_down(&self) {
        let (stop, connections) = self
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        stop.cancel();
        connections.close();
        connections.wait().await;
    }

    /// The end of an outage: listens on the same address again.
    pub async fn come_back(&self) -> Result<(), EmulatorError> {
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(EmulatorError::Bind)?;
        let serving = (self.shutdown.child_token(), TaskTracker::new());
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = serving.clone();
        self.tasks.spawn(http::serve(
            listener,
            Arc::clone(&self.shared),
            self.tasks.clone(),
            serving,
        ));
        Ok(())
    }

    /// A network partition that drops packets rather than refusing them: from now until
    /// [`KubeEmulator::speak_again`], open connections (watches too) are neither read nor
    /// written, and new ones are accepted but never answered, so a client sees nothing: no
    /// error, no end. Connections held this way are closed when the partition heals, as a
    /// peer that lost its state answers a resent segment with a reset.
    pub fn go_silent(&self) {
        self.shared.silent.send_replace(true);
    }

    /// The end of [`KubeEmulator::go_silent`]'s partition.
    pub fn speak_again(&self) {
        self.shared.silent.send_replace(false);
    }

    /// Makes every list request wait `delay` before its answer (zero: answer at once).
    pub fn set_list_delay(&self, delay: Duration) {
        *self
            .shared
            .list_delay
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Holds every list request (not watches) from now until [`KubeEmulator::release_lists`]:
    /// a relist that stays under way for as long as a test needs.
    pub fn hold_lists(&self) {
        self.shared.list_hold.send_replace(true);
    }

    /// Lets held list requests, and every later one, through.
    pub fn release_lists(&self) {
        self.shared.list_hold.send_replace(false);
    }

    /// The paths of the list requests held now.
    pub fn held_lists(&self) -> Vec<String> {
        self.shared
            .held_lists
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT`: the same server over TLS (trust [`KubeEmulator::ca_pem`]).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The PEM certificate of the CA that signed the emulator's TLS certificate.
    pub fn ca_pem(&self) -> &str {
        &self.shared.tls.ca_pem
    }

    /// A kubeconfig with one cluster, context and user (no credentials), pointing at this
    /// emulator over plain HTTP, default namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: podiam-emulator\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: podiam-emulator\n  context:\n    cluster: podiam-emulator\n    \
             user: podiam-emulator\n    namespace: default\n\
             current-context: podiam-emulator\n\
             preferences: {{}}\n\
             users:\n\
             - name: podiam-emulator\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`KubeEmulator::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), EmulatorError> {
        write_file(path.as_ref(), &self.kubeconfig_yaml())
    }

    /// A kubeconfig whose user presents `token` (a service account token or a static user
    /// token). It points at the emulator over TLS (`https://`, with the emulator's CA),
    /// because kubectl sends a kubeconfig's credentials only to TLS servers; kube-rs works
    /// with it too. Default namespace `default`.
    pub fn kubeconfig_yaml_for_token(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: podiam-emulator\n  cluster:\n    server: {url}\n    \
             certificate-authority-data: {ca}\n\
             contexts:\n\
             - name: podiam-emulator\n  context:\n    cluster: podiam-emulator\n    \
             user: token-user\n    namespace: default\n\
             current-context: podiam-emulator\n\
             preferences: {{}}\n\
             users:\n\
             - name: token-user\n  user:\n    token: {token}\n",
            url = self.https_url(),
            ca = BASE64.encode(self.ca_pem()),
            token = serde_json::Value::String(token.to_string()),
        )
    }

    /// Writes [`KubeEmulator::kubeconfig_yaml_for_token`] to `path`.
    pub fn write_kubeconfig_for_token(
        &self,
        path: impl AsRef<Path>,
        token: &str,
    ) -> Result<(), EmulatorError> {
        write_file(path.as_ref(), &self.kubeconfig_yaml_for_token(token))
    }

    /// Issues a service account token as TokenRequest does (the service account must exist;
    /// a bound pod `(name, uid)` must exist with that uid and run as this service account),
    /// but with any expiry, also one already past. No audiences means the API server's
    /// ([`API_AUDIENCE`]). `iat`/`nbf` are now, or ten minutes before `expires_at` if that is
    /// earlier. Note that TokenReview, like the apiserver, allows
    /// [`EXPIRY_LEEWAY_SECONDS`] of clock skew: a token reviews as expired only once
    /// `expires_at` is more than a minute past.
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        expires_at: SystemTime,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String, EmulatorError> {
        let expires_at = unix_seconds(expires_at);
        let issued_at = clock::now_unix().min(expires_at - token::MIN_EXPIRATION_SECONDS);
        let bound = bound_pod.map(|(name, uid)| token::BoundObject {
            name: name.to_string(),
            uid: Some(uid.to_string()),
        });
        let (token, _) = self.shared.authority.issue(
            &self.shared.store,
            namespace,
            service_account,
            audiences.iter().map(|a| a.to_string()).collect(),
            (issued_at, expires_at),
            bound.as_ref(),
        )?;
        Ok(token)
    }

    /// Registers a static user token, like a line of kube-apiserver's token file: requests
    /// with `Authorization: Bearer {token}` act as `username` in `groups` (plus
    /// `system:authenticated`), and TokenReview accepts it for the API server's audience
    /// only (a review for audience `podiam` says unauthenticated).
    pub fn add_user_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.shared
            .authority
            .add_user_token(token, username, groups);
    }

    /// While `down`, every TokenReview request is answered 503 ServiceUnavailable (other
    /// requests are unaffected); counted by [`KubeEmulator::token_reviews`] all the same.
    pub fn set_token_review_down(&self, down: bool) {
        self.shared.authority.set_token_review_down(down);
    }

    /// TokenReview requests received so far, failed ones included.
    pub fn token_reviews(&self) -> u64 {
        self.shared.authority.token_reviews()
    }

    /// SubjectAccessReview requests received so far, failed ones included
    /// (SelfSubjectAccessReviews are not counted).
    pub fn subject_access_reviews(&self) -> u64 {
        self.shared.authority.subject_access_reviews()
    }

    /// Stops serving and waits for every connection task to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Creates an object; its kind comes from its `apiVersion` and `kind` (`v1` `Pod`,
    /// `Namespace`, `Event`, `ServiceAccount`; `events.k8s.io/v1` `Event`;
    /// `rbac.authorization.k8s.io/v1` `Role`, `RoleBinding`, `ClusterRole`,
    /// `ClusterRoleBinding`; `admissionregistration.k8s.io/v1`
    /// `MutatingWebhookConfiguration`), its namespace from `metadata.namespace` (default
    /// `default`). Returns the stored object. Pods created this way do not go through the
    /// mutating admission webhooks (only creations over HTTP do).
    pub fn create(&self, object: Value) -> Result<Value, EmulatorError> {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1");
        let kind_name = object["kind"].as_str().unwrap_or_default();
        let kind = Kind::from_type_meta(api_version, kind_name).ok_or_else(|| {
            EmulatorError::BadRequest(format!(
                "the emulator does not serve {api_version} {kind_name:?}"
            ))
        })?;
        self.shared.store.create(kind, None, object, false)
    }

    /// One object (`namespace` is ignored for namespaces).
    pub fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, EmulatorError> {
        self.shared.store.get(kind, namespace, name)
    }

    /// All objects of `kind` in `namespace` (or everywhere), sorted by namespace and name.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Value>, EmulatorError> {
        Ok(self
            .shared
            .store
            .list(kind, namespace, &ListOptions::default())?
            .items)
    }

    /// Edits an object in place through `edit` (any field, `status` included; name,
    /// namespace, uid and timestamps are kept). A no-op edit writes nothing.
    pub fn update(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Value, EmulatorError> {
        self.shared.store.update_with(
            kind,
            namespace,
            name,
            UpdateScope::Everything,
            false,
            |old| {
                let mut new = old.clone();
                edit(&mut new);
                Ok(new)
            },
        )
    }

    /// Replaces an object with `object` (identified by its kind, namespace and name). If
    /// `object` carries a `metadata.resourceVersion`, it must be current (else Conflict).
    pub fn replace(&self, object: Value) -> Result<Value, EmulatorError> {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1");
        let kind_name = object["kind"].as_str().unwrap_or_default();
        let kind = Kind::from_type_meta(api_version, kind_name).ok_or_else(|| {
            EmulatorError::BadRequest(format!(
                "the emulator does not serve {api_version} {kind_name:?}"
            ))
        })?;
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        self.shared.store.update_with(
            kind,
            Some(&namespace),
            &name,
            UpdateScope::Everything,
            false,
            move |_| Ok(object),
        )
    }

    /// Applies an RFC 7386 merge patch (e.g.
    /// `json!({"metadata": {"annotations": {"iam.amazonaws.com/role": null}}})`).
    pub fn merge_patch(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Result<Value, EmulatorError> {
        self.shared.store.update_with(
            kind,
            namespace,
            name,
            UpdateScope::Everything,
            false,
            |old| {
                let mut new = old.clone();
                patch::merge_patch(&mut new, &patch);
                Ok(new)
            },
        )
    }

    /// Deletes an object as a default `kubectl delete` would (a namespace takes its
    /// contents with it; with [`PodDeletion::Graceful`] a pod is only marked terminating).
    pub fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, EmulatorError> {
        self.shared
            .store
            .delete(kind, namespace, name, &DeleteOptions::default())
    }

    /// Deletes an object at once (grace period 0), whatever [`PodDeletion`] says.
    pub fn force_delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, EmulatorError> {
        let options = DeleteOptions {
            grace_period_seconds: Some(0),
            ..DeleteOptions::default()
        };
        self.shared.store.delete(kind, namespace, name, &options)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.resource_version()
    }

    /// Drops all watch history: a watch or continue token from any resourceVersion issued
    /// before this call gets 410 Expired (as after an etcd compaction). Open watches keep
    /// running; combine with [`KubeEmulator::close_watches`] to force clients to resume.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Ends every open watch stream, as an apiserver restart would. Clients reconnect from
    /// their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.store.close_watches();
    }

    /// Routes calls to the Service `namespace/name`, port `port`, of a webhook's
    /// `clientConfig.service` to `addr` (the emulator resolves no cluster DNS). The webhook's
    /// certificate must name `NAME.NAMESPACE.svc`. A webhook whose service is not routed
    /// fails its calls. Routing the same service again replaces the address.
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, addr: SocketAddr) {
        self.shared
            .webhooks
            .route_service(namespace, name, port, addr);
    }

    /// The mutating admission webhook calls made so far (the most recent 10 000), oldest
    /// first: which webhook, for which pod, and what came of it.
    pub fn webhook_calls(&self) -> Vec<WebhookCall> {
        self.shared.webhooks.calls()
    }

    /// The requests served so far (the most recent 10 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), EmulatorError> {
    std::fs::write(path, contents).map_err(|source| EmulatorError::WriteKubeconfig {
        path: path.to_path_buf(),
        source,
    })
}

/// Unix seconds of `at` (negative before the epoch).
fn unix_seconds(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Binding subjects as `(kind, name)`.
type Subjects<'a> = &'a [(&'a str, &'a str)];

/// The objects of [`DEFAULT_CLUSTER_ROLES`] and their bindings.
fn default_rbac() -> Vec<Value> {
    let authenticated = [("Group", "system:authenticated")];
    let read = |paths: &[&str]| json!([{"verbs": ["get"], "nonResourceURLs": paths}]);
    let self_reviews = |group: &str, resources: &[&str]| json!({"verbs": ["create"], "apiGroups": [group], "resources": resources});
    let roles: [(&str, Value, Subjects<'_>); 5] = [
        (
            "cluster-admin",
            json!([
                {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]},
                {"verbs": ["*"], "nonResourceURLs": ["*"]},
            ]),
            &[("Group", "system:masters")],
        ),
        (
            "system:discovery",
            read(&[
                "/api",
                "/api/*",
                "/apis",
                "/apis/*",
                "/healthz",
                "/livez",
                "/openapi",
                "/openapi/*",
                "/readyz",
                "/version",
                "/version/",
            ]),
            &authenticated,
        ),
        (
            "system:basic-user",
            json!([
                self_reviews(
                    "authorization.k8s.io",
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                ),
                self_reviews("authentication.k8s.io", &["selfsubjectreviews"]),
            ]),
            &authenticated,
        ),
        (
            "system:public-info-viewer",
            read(&["/healthz", "/livez", "/readyz", "/version", "/version/"]),
            &[
                ("Group", "system:authenticated"),
                ("Group", "system:unauthenticated"),
            ],
        ),
        (
            "system:auth-delegator",
            json!([
                self_reviews("authentication.k8s.io", &["tokenreviews"]),
                self_reviews("authorization.k8s.io", &["subjectaccessreviews"]),
            ]),
            &[],
        ),
    ];
    let labels = [("kubernetes.io/bootstrapping", "rbac-defaults")];
    let mut objects = Vec::new();
    for (name, rules, subjects) in roles {
        let mut role = cluster_role(name, rules);
        role["metadata"]["labels"] = json!(annotation_map(&labels));
        objects.push(role);
        if !subjects.is_empty() {
            let mut binding = cluster_role_binding(name, name, subjects);
            binding["metadata"]["labels"] = json!(annotation_map(&labels));
            objects.push(binding);
        }
    }
    objects
}

fn annotation_map(annotations: &[(&str, &str)]) -> Map<String, Value> {
    annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

/// A Running pod on `node-1` with one ready container, `status.podIP`/`podIPs` = `ip`,
/// `spec.hostNetwork: false`, and the given annotations.
pub fn pod(namespace: &str, name: &str, ip: &str, annotations: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
            "annotations": annotation_map(annotations),
        },
        "spec": {
            "nodeName": "node-1",
            "hostNetwork": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:latest"}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "app",
                "ready": true,
                "started": true,
                "restartCount": 0,
                "image": "registry.invalid/app:latest",
                "imageID": "",
                "state": {"running": {}},
            }],
        },
    })
}

/// A namespace with the given annotations.
pub fn namespace(name: &str, annotations: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotation_map(annotations)},
    })
}

/// A service account.
pub fn service_account(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    })
}

/// A Running host-network pod on `node` that runs as `service_account`, like a podiam
/// agent of a DaemonSet: `spec.hostNetwork: true`, `status.podIP` = `hostIP` = a node
/// address derived from the node's name, label `app: podiam-agent`.
pub fn agent_pod(namespace: &str, name: &str, node: &str, service_account: &str) -> Value {
    let node_ip = format!("192.0.2.{}", node_octet(node));
    let mut object = pod(namespace, name, &node_ip, &[]);
    object["metadata"]["labels"] = json!({"app": "podiam-agent"});
    object["spec"]["nodeName"] = json!(node);
    object["spec"]["hostNetwork"] = json!(true);
    object["spec"]["serviceAccountName"] = json!(service_account);
    object["status"]["hostIP"] = json!(node_ip);
    object["status"]["hostIPs"] = json!([{"ip": node_ip}]);
    object
}

/// A stable host octet (1..=254) for a node name: the number at its end if it has one
/// (`node-7` → 7), else a hash of the name.
fn node_octet(node: &str) -> u8 {
    let digits: String = node
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let number = digits.parse::<u32>().unwrap_or_else(|_| {
        node.bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
    });
    u8::try_from(number % 254 + 1).unwrap_or(1)
}

fn subjects(subjects: &[(&str, &str)]) -> Value {
    subjects
        .iter()
        .map(|(kind, name)| {
            if *kind == "ServiceAccount" {
                let (namespace, name) = name.split_once(':').unwrap_or(("", name));
                json!({"kind": "ServiceAccount", "name": name, "namespace": namespace})
            } else {
                json!({"kind": kind, "apiGroup": resource::RBAC_GROUP, "name": name})
            }
        })
        .collect()
}

/// A ClusterRole with `rules` (a JSON array of PolicyRules).
pub fn cluster_role(name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rules,
    })
}

/// A Role in `namespace` with `rules` (a JSON array of PolicyRules).
pub fn role(namespace: &str, name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules,
    })
}

/// A ClusterRoleBinding of the ClusterRole `role` to `subjects`, each `(kind, name)`:
/// `("User", "alice")`, `("Group", "devs")`, `("ServiceAccount", "podiam:agent")`
/// (namespace:name).
pub fn cluster_role_binding(name: &str, role: &str, subjects_: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": resource::RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": subjects(subjects_),
    })
}

/// A RoleBinding in `namespace` of `role_ref` — `("Role", name)` or `("ClusterRole", name)`
/// — to `subjects`, as for [`cluster_role_binding`] (a `ServiceAccount` subject without
/// `ns:` means one in `namespace`).
pub fn role_binding(
    namespace: &str,
    name: &str,
    role_ref: (&str, &str),
    subjects_: &[(&str, &str)],
) -> Value {
    let mut subjects = subjects(subjects_);
    if let Value::Array(items) = &mut subjects {
        for subject in items {
            if subject["namespace"] == "" {
                subject["namespace"] = json!(namespace);
            }
        }
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": resource::RBAC_GROUP, "kind": role_ref.0, "name": role_ref.1},
        "subjects": subjects,
    })
}
