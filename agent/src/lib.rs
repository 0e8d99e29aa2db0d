//! podiam's per-node agent: the instance-metadata service pods see.
//!
//! - [`config`]: the `serve` and `uninstall` commands and their validation.
//! - [`routes`]: path normalisation and routing (pure).
//! - [`token`]: IMDSv2 tokens, bound to the asking pod's address and UID (pure), and their
//!   keys, kept on the node and rotated, so that tokens outlive the agent process.
//! - [`imds`]: EC2's exact response documents (pure).
//! - [`identity`]: the agent's projected token, re-read and put on every server call.
//! - [`decision`]: what the servers say, in the agent's own types (a pod's decision, a
//!   call's failure), converted from the wire once.
//! - [`replicas`]: the server replicas, their health, and calls that fail over between them.
//! - [`servers`]: gRPC calls to the servers, readiness, and the node stream.
//! - [`pods`]: the pod table: this node's pods and their decisions, from the node stream.
//! - [`cache`]: each pod's credentials, so that a hit needs no server call.
//! - [`http`]: the pod-facing server, the health server, and the one failure → HTTP mapping.
//! - [`container`]: the container-credentials endpoint (169.254.170.23), where a pod proves
//!   itself with its projected ServiceAccount token as well as its address: its token checks
//!   and its document (pure); `container_service` answers its requests.
//! - [`iptables`]: the DNAT chain that sends pods' 169.254.169.254 traffic here.
//! - [`node_metadata`]: the node's own metadata service, for allow-listed paths only.
//! - [`metrics`]: the Prometheus metrics on the health listener.
//!
//! [`Agent`] is the whole agent as a value: [`Agent::build`] makes it from a checked
//! configuration ([`config::ValidConfig`]), [`Agent::serve`] serves it on listeners it is
//! given until a shutdown it is given. `main.rs` checks the flags, sets up logging, builds,
//! binds the listeners (SO_REUSEPORT), installs and keeps the iptables rules, handles
//! signals, and says where it listens (`--listen-address-file`). In-process tests dial the
//! servers and serve pods over an in-memory network ([`Agent::build_over`]).

pub mod cache;
pub mod config;
pub mod container;
mod container_service;
pub mod decision;
pub mod elsewhere;
pub mod http;
pub mod identity;
pub mod imds;
#[cfg(test)]
mod in_process_tests;
pub mod intercepted;
pub mod iptables;
pub mod limit;
pub mod metrics;
pub mod node_metadata;
pub mod pods;
pub mod reach;
pub mod replicas;
pub mod routes;
pub mod servers;
pub mod token;

use std::sync::Arc;

use anyhow::Context;
use podiam_runtime::net::{Dialer, Listener, Tcp};
use podiam_runtime::rotate::Rotating;
use podiam_runtime::serve::Limits;
use rustls::ClientConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ValidConfig;
use crate::http::{MetadataService, ServiceOptions};
use crate::identity::AgentToken;
use crate::metrics::Metrics;
use crate::node_metadata::NodeMetadata;
use crate::replicas::ServerSet;
use crate::servers::Servers;
use crate::token::KeyKeeper;

/// How long the agent's start waits for the servers' names to resolve before it binds its
/// ports and serves anyway (resolving goes on in the background).
pub const START_RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Resolves the servers' names once at start, waiting [`START_RESOLVE_TIMEOUT`] at most: a
/// cluster DNS that drops queries would hold the resolver for the sum of its timeouts over
/// every search domain (minutes), and the agent's ports unbound. The lookup goes on on its
/// own task and is used when it answers. A failure is only logged: the agent serves anyway
/// and retries.
async fn resolve_at_start(servers: &Arc<ServerSet>) {
    let first = tokio::spawn({
        let servers = Arc::clone(servers);
        async move { servers.resolve().await }
    });
    match tokio::time::timeout(START_RESOLVE_TIMEOUT, first).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "no server replica resolved yet; serving anyway and retrying");
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "resolving the servers failed; serving anyway and retrying");
        }
        Err(_) if servers.replicas().is_empty() => tracing::warn!(
            timeout = ?START_RESOLVE_TIMEOUT,
            "no server replica resolved yet (the lookup goes on); serving anyway and retrying"
        ),
        Err(_) => tracing::warn!(
            timeout = ?START_RESOLVE_TIMEOUT,
            "a server name is still being looked up; serving with the replicas resolved"
        ),
    }
}

/// The listeners the agent is served on, bound by its caller: the pod-facing metadata port,
/// the container-credentials port when that endpoint is on, and the health port (TCP, or in
/// tests in-memory ones).
#[derive(Debug)]
pub struct Listeners<P = TcpListener, H = TcpListener> {
    pub pods: P,
    pub container: Option<P>,
    /// The IPv6 DNAT targets' listeners (the node's IPv6 address), with `--host-ipv6`.
    pub pods6: Option<P>,
    pub container6: Option<P>,
    pub health: H,
}

/// A whole agent, built and not yet serving.
#[derive(Debug)]
pub struct Agent {
    tls: Arc<Rotating<ClientConfig>>,
    tls_reload_interval: std::time::Duration,
    token: Arc<AgentToken>,
    servers: Arc<ServerSet>,
    server_urls: Vec<String>,
    server_resolve_interval: std::time::Duration,
    upstream: Arc<Servers>,
    /// Taken by the task that keeps the IMDSv2 token keys once serving starts.
    key_keeper: Option<KeyKeeper>,
    table: Arc<pods::PodTable>,
    cache: Arc<cache::CredentialCache>,
    service: Arc<MetadataService>,
    metrics: Arc<Metrics>,
    limits: Limits,
    keep_alive: Option<::http::HeaderValue>,
}

impl Agent {
    /// The agent `config` describes, dialling the servers over TCP: its TLS files and token
    /// loaded, its token keys opened, the servers resolved once (a failure, or no answer within
    /// [`START_RESOLVE_TIMEOUT`], is only logged: it serves anyway and retries). Nothing is
    /// bound or served yet.
    pub async fn build(config: ValidConfig) -> anyhow::Result<Agent> {
        Agent::build_over(config, Arc::new(Tcp)).await
    }

    /// [`Agent::build`], dialling the servers with `dialer` (in-process tests: an in-memory
    /// network).
    pub async fn build_over(config: ValidConfig, dialer: Arc<dyn Dialer>) -> anyhow::Result<Agent> {
        let tls = Arc::new(
            Rotating::load(config.tls.clone(), podiam_runtime::tls::client_config)
                .context("loading the agent's TLS files")?,
        );
        let metrics = Arc::new(Metrics::new());
        let token = Arc::new(AgentToken::from_file(&config.token_file));
        if let Err(error) = token.reload() {
            tracing::error!(%error, "no agent token yet; the servers refuse this agent until it can be read");
        }
        let servers = Arc::new(
            ServerSet::new(
                config.servers.clone(),
                Arc::clone(&tls),
                config.server_timeout,
                metrics.failovers.clone(),
                Arc::clone(&token),
            )
            .over(dialer),
        );
        resolve_at_start(&servers).await;
        let upstream = Arc::new(Servers::new(
            Arc::clone(&servers),
            config.node_name.clone(),
            metrics.node_stream.clone(),
        ));
        let (tokens, key_keeper) =
            KeyKeeper::open(&config.token_key_file, podiam_runtime::clock::now_unix())
                .context("no IMDSv2 token key")?;
        let options = ServiceOptions {
            require_token: config.require_token,
            allow: config
                .allow
                .map(|(regex, upstream)| (regex, NodeMetadata::new(&upstream))),
            request_timeout: config.request_timeout,
        };
        let table = Arc::new(pods::PodTable::default());
        let cache = Arc::new(cache::CredentialCache::new(config.min_remaining));
        let service = Arc::new(MetadataService::new(
            Arc::clone(&upstream),
            Arc::clone(&table),
            Arc::clone(&cache),
            tokens,
            options,
            Arc::clone(&metrics),
        ));
        Ok(Agent {
            tls,
            tls_reload_interval: config.tls_reload_interval,
            token,
            servers,
            server_urls: config.server_urls,
            server_resolve_interval: config.server_resolve_interval,
            upstream,
            key_keeper: Some(key_keeper),
            table,
            cache,
            service,
            metrics,
            limits: config.limits,
            keep_alive: keep_alive_header(config.limits.idle_timeout),
        })
    }

    /// Reports this node's rules in place to the servers until one accepts it (see
    /// [`Servers::report_node_ready`]): run it once the rules are installed.
    pub fn report_node_ready(
        &self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let upstream = Arc::clone(&self.upstream);
        async move { upstream.report_node_ready(shutdown).await }
    }

    /// Checks every `interval`, and a second after the pod table changes, that the route
    /// to each of this node's pods leaves through an interface one of `patterns` matches
    /// ([`reach`]); `own`: the node's addresses. Sets `podiam_agent_pods_not_intercepted`
    /// and names each interface that misses in the log once. Until `shutdown`.
    pub fn check_reach(
        &self,
        patterns: Vec<String>,
        own: Vec<std::net::IpAddr>,
        interval: std::time::Duration,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let table = Arc::clone(&self.table);
        let gauge = self.metrics.pods_not_intercepted.clone();
        let (patterns, own) = (Arc::new(patterns), Arc::new(own));
        async move {
            let mut changes = table.changes();
            let mut named = reach::Named::default();
            let mut unreadable_told = false;
            loop {
                let pods = table.addresses();
                let (patterns_now, own_now) = (Arc::clone(&patterns), Arc::clone(&own));
                // Reading and matching the tables is the kernel's and the CPU's, not I/O
                // the runtime waits on: off its threads.
                let found = tokio::task::spawn_blocking(move || {
                    reach::Routes::read().map(|routes| {
                        reach::not_intercepted(&pods, &own_now, &routes, &patterns_now)
                    })
                })
                .await;
                match found {
                    Ok(Ok((missed, interfaces))) => {
                        gauge.set(missed as i64);
                        for interface in interfaces.iter().filter(|i| named.first_time(i)) {
                            tracing::warn!(
                                interface = %podiam_runtime::telemetry::Escaped(interface),
                                patterns = %patterns.join(","),
                                "pods are routed through an interface no --interface pattern \
                                 matches: their metadata requests are not intercepted"
                            );
                        }
                    }
                    Ok(Err(error)) if !unreadable_told => {
                        unreadable_told = true;
                        tracing::warn!(%error, "cannot read the routing table; whether the rules reach every pod is not checked");
                    }
                    _ => {}
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                    _ = changes.changed() => {
                        // A batch of changes (a node's pods starting) is checked once.
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        }
                        changes.mark_unchanged();
                    }
                }
            }
        }
    }

    /// What is told of the pod-facing connections (for listeners that close some before
    /// serving them: [`intercepted::Intercepted`]).
    pub fn connection_observer(&self) -> Arc<dyn podiam_runtime::serve::ConnectionObserver> {
        Arc::clone(&self.metrics) as Arc<dyn podiam_runtime::serve::ConnectionObserver>
    }

    /// The counter of iptables repairs (exported as `podiam_agent_iptables_repairs_total`).
    pub fn iptables_repairs(&self) -> prometheus_client::metrics::counter::Counter {
        self.metrics.iptables_repairs.clone()
    }

    /// Serves pods and health on `listeners` until `shutdown` (SIGTERM), then: reports not
    /// ready, stops accepting pods' connections (a successor bound beside it with
    /// SO_REUSEPORT takes them), lets open ones finish, and returns. The iptables rules are
    /// its caller's: installed before serving and deliberately left in place afterwards,
    /// also on a stop (see [`iptables`]); only `podiam-agent uninstall` removes them.
    pub async fn serve<P: Listener, H: Listener>(
        mut self,
        listeners: Listeners<P, H>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        tracing::info!(
            listen = %listeners.pods.local_addr()?,
            health = %listeners.health.local_addr()?,
            servers = ?self.server_urls,
            "serving pods' metadata requests"
        );
        // Background work runs until the pod-facing server has drained.
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        self.spawn_background(&tasks, &stop);
        tasks.spawn(podiam_runtime::serve::serve_http(
            listeners.health,
            self.limits.health(),
            self.health_handler(),
            stop.clone(),
        ));
        {
            // Readiness goes first on a stop.
            let upstream = Arc::clone(&self.upstream);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                upstream.stop();
                tracing::info!("stopping: not ready, no new connections; open ones finish");
            });
        }
        for (listener, endpoint) in [
            (listeners.container, Endpoint::Container),
            (listeners.pods6, Endpoint::Metadata),
            (listeners.container6, Endpoint::Container),
        ] {
            if let Some(listener) = listener {
                tracing::info!(listen = %listener.local_addr()?, ?endpoint, "serving pods");
                tasks.spawn(self.pod_server(listener, endpoint, shutdown.clone()));
            }
        }
        self.pod_server(listeners.pods, Endpoint::Metadata, shutdown.clone())
            .await;
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    /// Serves `endpoint` to pods on `listener` until `shutdown`, then lets open connections
    /// finish. The TCP peer's address is how a pod is known; no header is trusted for it.
    fn pod_server<P: Listener>(
        &self,
        listener: P,
        endpoint: Endpoint,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let service = Arc::clone(&self.service);
        let keep_alive = self.keep_alive.clone();
        let handler = move |peer: std::net::SocketAddr, request| {
            use futures::FutureExt;
            let peer = peer.ip().to_canonical();
            let finish = with_keep_alive(keep_alive.clone());
            // An answer made at once is no future at all (see `MetadataService::answer`);
            // the container endpoint's always is one, boxed.
            let later = match endpoint {
                Endpoint::Metadata => match service.answer(peer, request) {
                    http::Answer::Now(response) => {
                        return futures::future::Either::Left(std::future::ready(finish(response)));
                    }
                    http::Answer::Later(later) => later,
                },
                Endpoint::Container => {
                    let service = Arc::clone(&service);
                    async move { service.handle_container(peer, request).await }.boxed()
                }
            };
            futures::future::Either::Right(later.map(finish))
        };
        podiam_runtime::serve::serve_http_observed(
            listener,
            self.limits,
            Arc::clone(&self.metrics) as Arc<dyn podiam_runtime::serve::ConnectionObserver>,
            handler,
            shutdown,
        )
    }

    /// Following the servers' names, their health and this node's stream; reloading the
    /// TLS files, the agent's token and the IMDSv2 token keys: on `tasks` until `stop`.
    fn spawn_background(&mut self, tasks: &TaskTracker, stop: &CancellationToken) {
        {
            let servers = Arc::clone(&self.servers);
            let (interval, stop) = (self.server_resolve_interval, stop.clone());
            tasks.spawn(async move { servers.follow_dns(interval, stop).await });
        }
        {
            let servers = Arc::clone(&self.servers);
            let stop = stop.clone();
            tasks.spawn(async move { servers.follow_health(stop).await });
        }
        {
            let upstream = Arc::clone(&self.upstream);
            let (table, cache) = (Arc::clone(&self.table), Arc::clone(&self.cache));
            let stop = stop.clone();
            tasks.spawn(async move { upstream.follow_node(&table, &cache, stop).await });
        }
        tasks.spawn(Arc::clone(&self.tls).follow(self.tls_reload_interval, stop.clone()));
        tasks.spawn(Arc::clone(&self.token).follow(stop.clone()));
        if let Some(key_keeper) = self.key_keeper.take() {
            tasks.spawn(key_keeper.follow(stop.clone()));
        }
    }

    /// The health listener's handler: `/live`, `/ready` (a server answers), `/metrics`.
    fn health_handler(
        &self,
    ) -> impl Fn(
        std::net::SocketAddr,
        ::http::Request<hyper::body::Incoming>,
    ) -> std::future::Ready<::http::Response<http_body_util::Full<bytes::Bytes>>>
    + Clone
    + Send
    + Sync
    + 'static {
        let upstream = Arc::clone(&self.upstream);
        let metrics = Arc::clone(&self.metrics);
        let tls = Arc::clone(&self.tls);
        move |_, request: ::http::Request<hyper::body::Incoming>| {
            metrics.ready.set(i64::from(upstream.ready()));
            metrics.tls_expiry.set(tls.not_after());
            metrics.observe_replicas(upstream.replicas());
            std::future::ready(http::health(&upstream, &metrics, request.uri().path()))
        }
    }
}

/// Which pod-facing endpoint a listener serves.
#[derive(Clone, Copy, Debug)]
enum Endpoint {
    /// EC2's instance metadata (169.254.169.254).
    Metadata,
    /// The container-credentials endpoint (169.254.170.23).
    Container,
}

/// The `Keep-Alive` response header.
const KEEP_ALIVE: ::http::HeaderName = ::http::HeaderName::from_static("keep-alive");

/// The response with `keep_alive` as its `Keep-Alive` header, if there is one.
fn with_keep_alive(
    keep_alive: Option<::http::HeaderValue>,
) -> impl FnOnce(
    ::http::Response<http_body_util::Full<bytes::Bytes>>,
) -> ::http::Response<http_body_util::Full<bytes::Bytes>> {
    move |mut response| {
        if let Some(value) = keep_alive {
            response.headers_mut().insert(KEEP_ALIVE, value);
        }
        response
    }
}

/// `Keep-Alive: timeout=N` for an idle keep-alive connection closed after `idle`
/// (`--idle-timeout`). Clients that honour it stop reusing a connection before the agent
/// closes it, instead of racing the close: Node's HTTP agent retires an idle socket one second
/// before the announced timeout when that is sooner than its own 5 s. (The idle limit itself
/// is longer than the SDKs' pools keep connections, see `podiam_runtime::serve::IDLE_TIMEOUT`;
/// it was once the 5 s header timeout, Node's own, and a request sent at 5.0 s met a closing
/// connection.) `None` under a second (nothing to announce).
///
/// The text is made static (a few bytes, once per agent): every response carries a copy of
/// the value, and a copy of static bytes touches no reference count that the runtime's
/// threads would share.
fn keep_alive_header(idle: std::time::Duration) -> Option<::http::HeaderValue> {
    let seconds = idle.as_secs();
    if seconds == 0 {
        return None;
    }
    let text: &'static str = Box::leak(format!("timeout={seconds}").into_boxed_str());
    Some(::http::HeaderValue::from_static(text))
}
