//! An in-memory Kubernetes API server (core/v1 pods, namespaces and events, plus
//! events.k8s.io/v1 events) that speaks the real protocol well enough for the real `kubectl`
//! and kube-rs' `watcher`: discovery, list with pagination and selectors, watch with
//! resourceVersion resumption, bookmarks, 410 Expired and streaming lists, create / replace
//! / merge, strategic-merge and JSON patches / delete, and server-side Tables for
//! `kubectl get`.
//!
//! It runs in-process over plain HTTP on loopback ([`KubeEmulator::start`]); tests and the
//! e2e harness also read and write objects directly ([`KubeEmulator::create`],
//! [`KubeEmulator::merge_patch`], …) without going through HTTP. Every write, whichever way
//! it arrives, bumps the one global resourceVersion and reaches every watch.
//!
//! How the files fit:
//! - [`store`]: objects, resourceVersion, watch history, broadcast (the only mutable state).
//! - [`http`]: accept loop, routing to handlers, the one error → `Status` mapping.
//! - [`watch`]: one watch response stream (initial events, replay, live, bookmarks).
//! - [`route`], [`selector`], [`patch`], [`paging`], [`table`], [`clock`]: pure logic with
//!   table-driven unit tests.
//! - [`attributes`], [`rbac`], [`token`], [`protobuf`]: pure logic for authentication and
//!   authorisation (request → attributes, RBAC evaluation, service account token claims
//!   and review, kubectl's protobuf bodies), not yet served.
//! - [`resource`]: the served kinds and the discovery documents.
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

pub mod attributes;
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
pub mod token;
pub mod watch;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::EmulatorError;
pub use http::RequestRecord;
pub use patch::PatchType;
pub use resource::Kind;
pub use store::PodDeletion;

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
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            store,
            options,
            server_address: addr.to_string(),
            shutdown: shutdown.clone(),
            requests: Mutex::new(VecDeque::new()),
            list_delay: Mutex::new(Duration::ZERO),
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

    /// Makes every list request wait `delay` before its answer (zero: answer at once).
    pub fn set_list_delay(&self, delay: Duration) {
        *self
            .shared
            .list_delay
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| {
            EmulatorError::WriteKubeconfig {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Stops serving and waits for every connection task to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Creates an object; its kind comes from its `apiVersion` and `kind` (`v1` `Pod`,
    /// `Namespace`, `Event`; `events.k8s.io/v1` `Event`), its namespace from
    /// `metadata.namespace` (default `default`). Returns the stored object.
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
