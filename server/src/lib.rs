//! podiam's server: the only part of podiam allowed to call `sts:AssumeRole`.
//!
//! - [`config`]: flags and their validation.
//! - [`watch`]: pods and namespaces from the Kubernetes API into the view
//!   ([`podiam_policy::index`]) that the decisions ([`podiam_policy::decision`]) read.
//! - [`identity`]: agents proven by their projected token (TokenReview), operators
//!   authorised by SubjectAccessReview; reviews cached and bounded.
//! - [`preflight`]: start-up checks that need the network (base ARN detection, STS reachable).
//! - [`session`]: session names and tags per pod.
//! - [`sts`]: the AssumeRole call and the single-flight credential cache.
//! - [`service`]: the gRPC service (a thin adapter over the decisions), and its one
//!   failure → status mapping.
//! - [`events`]: Kubernetes Events on refused pods, throttled.
//! - [`metrics`]: Prometheus metrics and `/live`, `/ready` on the health listener.
//!
//! [`Server`] is the whole server as a value: [`Server::build`] makes it from a checked
//! configuration ([`config::ValidConfig`]), [`Server::serve`] serves it on listeners it is
//! given until a shutdown it is given, then drains. `main.rs` checks the flags, sets up
//! logging, makes the start-up checks, binds the listeners, handles signals, and says where
//! it listens (`--listen-address-file`). In-process tests assemble a server from fakes
//! ([`Server::assemble`], [`Backends`]) and serve it on an in-memory network.

pub mod admission;
pub mod buckets;
pub mod budget;
pub mod config;
pub mod events;
pub mod heap;
pub mod identity;
#[cfg(test)]
mod in_process_tests;
pub mod metrics;
pub mod nodes;
pub mod peers;
pub mod places;
pub mod preflight;
pub mod service;
pub mod session;
pub mod sts;
pub mod watch;
pub mod webhook;

/// The decision crate's modules, where the server's code has always found them.
pub use podiam_policy::{index, policy};

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use podiam_proto::v1::podiam_server::PodiamServer;
use podiam_runtime::net::Listener;
use podiam_runtime::rotate::Rotating;
use podiam_runtime::tls::TlsFiles;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::config::{Drain, ValidConfig};
use crate::events::{EventLimits, Events};
use crate::identity::{Identities, KubeReviewer, Reviewer};
use crate::metrics::Metrics;
use crate::service::{PodiamService, ServiceSettings};
use crate::sts::{AssumeRole, Clock, CredentialCache, SdkAssumeRole, SystemClock};
use crate::watch::Cluster;

/// Builds a Kubernetes client from `--kubeconfig`, or the in-cluster/default configuration,
/// whose connections are dropped after `api_timeout` with nothing received (`--api-timeout`).
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    api_timeout: std::time::Duration,
) -> anyhow::Result<kube::Client> {
    let mut kube_config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding a Kubernetes configuration")?,
    };
    // Nothing received for this long: the connection is lost (a watch's too, since watches
    // are ended sooner: `watch::watch_config`). Counted from the last write as well, so that
    // time a connection spent idle in the pool is not held against its next request; and a
    // connection that cannot be made in that time fails as soon.
    kube_config.read_timeout = Some(api_timeout);
    kube_config.reset_reader_on_write = true;
    kube_config.connect_timeout = Some(api_timeout);
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}

/// The server's certificate, key and client CA, kept current as the files change.
pub fn load_tls(files: &TlsFiles) -> anyhow::Result<Arc<Rotating<ServerConfig>>> {
    let tls = Rotating::load(files.clone(), podiam_runtime::tls::server_config)
        .context("loading the server's TLS files")?;
    Ok(Arc::new(tls))
}

/// What the server talks to outside itself. [`Server::build`] makes the real ones; in-process
/// tests give fakes.
pub struct Backends {
    /// The Kubernetes API, for the pod and namespace watches and for Events. `None`: nothing
    /// but the caller fills the view ([`Server::cluster`]), and no Event is written.
    pub kube: Option<kube::Client>,
    /// TokenReviews and SubjectAccessReviews.
    pub reviewer: Arc<dyn Reviewer>,
    /// STS.
    pub sts: Arc<dyn AssumeRole>,
    /// The credential cache's time.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("kube", &self.kube.is_some())
            .field("reviewer", &self.reviewer)
            .finish_non_exhaustive()
    }
}

/// The listeners the server is served on, bound by its caller: the gRPC port (TCP, or in
/// tests an in-memory one), the health port, and the admission webhook's when it is on.
#[derive(Debug)]
pub struct Listeners<G = TcpListener, H = TcpListener> {
    pub grpc: G,
    pub health: H,
    pub webhook: Option<H>,
}

/// A whole server, built and not yet serving.
pub struct Server {
    tls: Arc<Rotating<ServerConfig>>,
    tls_reload_interval: std::time::Duration,
    drain: Drain,
    service: PodiamService,
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    metrics: Arc<Metrics>,
    /// Cancelled when the drain begins: not ready, node streams end.
    draining: CancellationToken,
    /// The Kubernetes API and the Events queue it delivers, when there is an API.
    kube: Option<(kube::Client, tokio::sync::mpsc::Receiver<events::Notice>)>,
    /// The watches' settings (`--api-timeout`).
    watch_config: kube::runtime::watcher::Config,
    /// The admission webhook and its HTTPS configuration, when it is on.
    webhook: Option<(Arc<webhook::Webhook>, Arc<Rotating<ServerConfig>>)>,
    /// The replicas this one shares credential keys with, and what keeps that view.
    peers: peers::Peers,
    peer_follower: Option<peers::Follower>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("drain", &self.drain)
            .field("cache", &self.cache)
            .field("watching", &self.kube.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The server `config` describes, with its TLS files loaded and its Kubernetes and STS
    /// clients made. Nothing is bound or served yet.
    pub async fn build(config: ValidConfig) -> anyhow::Result<Server> {
        let tls = load_tls(&config.tls)?;
        let webhook_tls = match &config.webhook {
            Some(_) => Some(Arc::new(
                Rotating::load(config.tls.clone(), podiam_runtime::tls::https_server_config)
                    .context("loading the server's TLS files for the webhook")?,
            )),
            None => None,
        };
        let client = kube_client(config.kubeconfig.as_deref(), config.api_timeout).await?;
        let sts = SdkAssumeRole::new(config.sts.clone()).await;
        let backends = Backends {
            kube: Some(client.clone()),
            reviewer: Arc::new(KubeReviewer::new(client)),
            sts: Arc::new(sts),
            clock: Arc::new(SystemClock),
        };
        let injection = config.webhook.as_ref().map(|w| w.injection.clone());
        let mut server = Server::assemble(config, tls, backends);
        if let (Some(injection), Some(webhook_tls)) = (injection, webhook_tls) {
            let webhook = webhook::Webhook::new(Arc::clone(&server.cluster), injection);
            server.webhook = Some((Arc::new(webhook), webhook_tls));
        }
        Ok(server)
    }

    /// The server from its parts: what [`Server::build`] does once it has reached outside,
    /// and what in-process tests do with fakes.
    pub fn assemble(
        config: ValidConfig,
        tls: Arc<Rotating<ServerConfig>>,
        backends: Backends,
    ) -> Server {
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(CredentialCache::new(
            backends.sts,
            backends.clock,
            config.cache,
            metrics.sts_calls.clone(),
        ));
        let cluster = Arc::new(Cluster::with_role_key(&config.role_annotation));
        let watch_config = watch::watch_config(config.api_timeout);
        let (peers, peer_follower) = match (&backends.kube, &config.peers) {
            (Some(client), Some(source)) => {
                let (peers, follower) = peers::follow(
                    client.clone(),
                    source,
                    watch_config.clone(),
                    metrics.replicas_ready.clone(),
                );
                (peers, Some(follower))
            }
            _ => (peers::Peers::alone(), None),
        };
        let node_taints = backends.kube.as_ref().map(|client| {
            Arc::new(nodes::KubeNodeTaints::new(client.clone())) as Arc<dyn nodes::NodeTaints>
        });
        let (events, kube) = match backends.kube {
            Some(client) => {
                let (events, queue) = Events::new(EventLimits::default(), metrics.events.clone());
                (events, Some((client, queue)))
            }
            None => (Events::disabled(), None),
        };
        let identities = identities(
            &cluster,
            &config.binding,
            backends.reviewer,
            metrics.identity.clone(),
        );
        log_binding(&config.binding);
        let draining = CancellationToken::new();
        let service = PodiamService::new(
            Arc::clone(&cluster),
            Arc::clone(&cache),
            ServiceSettings {
                base_arn: config.base_role_arn,
                sessions: config.sessions,
                binding: config.binding,
            },
            Arc::new(events),
            identities,
        )
        .with_lifecycle(draining.clone(), metrics.node_streams.clone())
        .with_node_call_limit(config.agent_call_rate, metrics.agent_calls_limited.clone())
        .with_node_readiness(nodes::NodeReadiness::new(
            config.agent_not_ready_taint,
            node_taints,
            metrics.node_taints_removed.clone(),
        ))
        .with_replica_name(peers.me());
        Server {
            tls,
            tls_reload_interval: config.tls_reload_interval,
            drain: config.drain,
            service,
            cluster,
            cache,
            metrics,
            draining,
            kube,
            watch_config,
            webhook: None,
            peers,
            peer_follower,
        }
    }

    /// The view of the cluster the decisions read: kept by the watches, or filled by an
    /// in-process test that has no Kubernetes API.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves on `listeners` until `shutdown` is cancelled (SIGTERM), then drains:
    ///
    /// 1. at once: `/ready` and the gRPC Health turn not-ready (draining) and every agent's
    ///    node stream is ended, so agents move to other replicas;
    /// 2. for `--shutdown-delay`: requests still arriving are answered (agents that have
    ///    not yet noticed, Kubernetes removing the endpoint);
    /// 3. then: no new connections; requests under way get `--shutdown-timeout` to finish.
    ///
    /// Background work (watches, Events, credential upkeep, certificate reloads) stops after
    /// the drain, and the STS calls under way are waited for.
    pub async fn serve<G, H>(
        mut self,
        listeners: Listeners<G, H>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()>
    where
        G: Listener,
        G::Io: Connected,
        H: Listener,
    {
        tracing::info!(addr = %listeners.grpc.local_addr()?, "serving gRPC with mutual TLS");
        // Background work stops with `stop`, after the drain; the health listener goes on
        // answering (not ready) during the drain.
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        self.spawn_background(&tasks, &stop);
        tracing::info!(addr = %listeners.health.local_addr()?, "serving /live, /ready and /metrics");
        tasks.spawn(podiam_runtime::serve::serve_http(
            listeners.health,
            podiam_runtime::serve::Limits::default().health(),
            self.health_handler(),
            stop.clone(),
        ));
        if let (Some(listener), Some((webhook, tls))) = (listeners.webhook, self.webhook.take()) {
            tracing::info!(addr = %listener.local_addr()?, path = webhook::PATH, "serving the admission webhook");
            tasks.spawn(Arc::clone(&tls).follow(self.tls_reload_interval, stop.clone()));
            webhook::serve(
                listener,
                tls,
                webhook,
                self.metrics.webhook_reviews.clone(),
                stop.clone(),
                &tasks,
            );
        }
        // Accepting ends when the drain's delay is over; the gRPC server then finishes what
        // is under way.
        let accepting = CancellationToken::new();
        let refused = {
            let counter = self.metrics.tls_refused.clone();
            Arc::new(move || {
                counter.inc();
            })
        };
        let incoming = podiam_runtime::accept::accept_tls_certified(
            listeners.grpc,
            Arc::clone(&self.tls),
            accepting.clone(),
            &tasks,
            refused,
        );
        let grpc = tonic::transport::Server::builder()
            .layer(self.reading_layer())
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .timeout(CALL_TIMEOUT)
            .add_service(
                PodiamServer::new(self.service.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, accepting.clone().cancelled_owned());
        let served = drain(grpc, &shutdown, &self.draining, &accepting, self.drain).await;
        self.draining.cancel();
        accepting.cancel();
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        self.service.streams_ended().await;
        self.cache.drain().await;
        tracing::info!("server stopped");
        served
    }

    /// The watches and Events (with a Kubernetes API), credential upkeep and certificate
    /// reloads, on `tasks` until `stop`.
    fn spawn_background(&mut self, tasks: &TaskTracker, stop: &CancellationToken) {
        if let Some((client, queue)) = self.kube.take() {
            tasks.spawn(events::deliver(
                client.clone(),
                std::env::var("POD_NAME").ok(),
                queue,
                self.metrics.events.clone(),
                stop.clone(),
            ));
            tasks.spawn(watch::run(
                client,
                self.watch_config.clone(),
                Arc::clone(&self.cluster),
                self.metrics.relists.clone(),
                stop.clone(),
            ));
        }
        if let Some(follower) = self.peer_follower.take() {
            tasks.spawn(follower.run(stop.clone()));
        }
        tasks.spawn(maintain_credentials(
            self.service.clone(),
            Arc::clone(&self.cluster),
            Arc::clone(&self.cache),
            self.peers.clone(),
            Arc::clone(&self.metrics),
            stop.clone(),
        ));
        tasks.spawn(Arc::clone(&self.tls).follow(self.tls_reload_interval, stop.clone()));
    }

    /// The gRPC port's bounds on calls whose requests are still arriving: proven agents'
    /// calls read in their nodes' places ([`PodiamService::proven_node`]), refusals counted.
    fn reading_layer(&self) -> podiam_runtime::reading::ReadingLayer {
        let service = self.service.clone();
        let learning = self.service.clone();
        let counter = self.metrics.calls_shed.clone();
        podiam_runtime::reading::ReadingLayer::new(
            // Agents always present the client certificate: a call without one is nobody's.
            Arc::new(move |headers: &http::HeaderMap, certified| {
                certified.then(|| service.proven_node(headers)).flatten()
            }),
            Arc::new(move |headers: &http::HeaderMap, address| learning.learn(headers, address)),
            Arc::new(move || {
                counter.inc();
            }),
        )
    }

    /// The health listener's handler: `/live`, `/ready` (synced and not draining),
    /// `/metrics`.
    fn health_handler(
        &self,
    ) -> impl Fn(
        std::net::SocketAddr,
        http::Request<hyper::body::Incoming>,
    ) -> std::future::Ready<http::Response<http_body_util::Full<bytes::Bytes>>>
    + Clone
    + Send
    + Sync
    + 'static {
        let metrics = Arc::clone(&self.metrics);
        let cluster = Arc::clone(&self.cluster);
        let tls = Arc::clone(&self.tls);
        let draining = self.draining.clone();
        move |_, request: http::Request<hyper::body::Incoming>| {
            metrics.tls_expiry.set(tls.not_after());
            metrics.view_stale.set(i64::from(cluster.stale()));
            std::future::ready(metrics::health(
                &cluster,
                draining.is_cancelled(),
                &metrics,
                request.uri().path(),
            ))
        }
    }
}

/// Token reviews, which know running agents' addresses from `cluster` (the pods of
/// `binding`'s agent account on the host network).
fn identities(
    cluster: &Arc<Cluster>,
    binding: &service::Binding,
    reviewer: Arc<dyn Reviewer>,
    counters: identity::IdentityCounters,
) -> Arc<Identities> {
    let agents = {
        let (cluster, account) = (Arc::clone(cluster), binding.account.clone());
        move |ip| (cluster.pods()).host_pod_at(ip, &account.namespace, &account.name)
    };
    Arc::new(Identities::new(reviewer, counters).with_agent_addresses(Arc::new(agents)))
}

/// Says at start how node binding treats agents.
fn log_binding(binding: &service::Binding) {
    match binding.mode {
        service::BindingMode::Enforce => tracing::info!(
            agents = %binding.account,
            audience = %binding.audience,
            "node binding enforced: agents answered only about their own node's pods"
        ),
        service::BindingMode::Warn => tracing::warn!(
            agents = %binding.account,
            audience = %binding.audience,
            "node binding in WARN mode: agent calls that prove no node, or ask about another \
             node's pods, are logged and counted but ANSWERED; use --node-binding enforce \
             once podiam_server_node_binding_refusals_total stays at 0"
        ),
    }
}

/// Runs `grpc` until `shutdown`, then drains it as [`Server::serve`] describes; its result.
async fn drain<F>(
    grpc: F,
    shutdown: &CancellationToken,
    draining: &CancellationToken,
    accepting: &CancellationToken,
    drain: Drain,
) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut grpc = std::pin::pin!(grpc);
    let served = tokio::select! {
        served = grpc.as_mut() => Some(served),
        () = shutdown.cancelled() => None,
    };
    // The gRPC server ended on its own: an error, nothing to drain.
    if let Some(served) = served {
        return served.context("serving gRPC");
    }
    tracing::info!(
        delay = ?drain.delay,
        "draining: not ready, node streams ended; still answering"
    );
    draining.cancel();
    let delayed = tokio::time::timeout(drain.delay, grpc.as_mut()).await;
    accepting.cancel();
    let served = match delayed {
        Ok(served) => served,
        Err(_) => {
            tracing::info!(timeout = ?drain.timeout, "no longer accepting; finishing requests under way");
            match tokio::time::timeout(drain.timeout, grpc.as_mut()).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!("requests still under way after the shutdown timeout; exiting");
                    Ok(())
                }
            }
        }
    };
    served.context("serving gRPC")
}

/// HTTP/2 pings to each agent's connection: a vanished agent's streams are closed within
/// interval + timeout instead of lingering until TCP gives up (minutes).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most HTTP/2 streams (calls) at once on one connection. An agent's one connection carries
/// its node stream and a call per pod cache miss; 1000 streams opened by one caller on one
/// connection must not be served.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The largest request message read. The largest any caller sends is a GetCredentials with
/// a pod's token (at most [`service::MAX_POD_TOKEN_BYTES`]); tonic's default, 4 MiB, let a
/// caller without a client certificate (the port takes them, for operator calls) hold 4 MiB
/// per stream, 256 streams per connection, before any check could refuse it.
const MAX_REQUEST_BYTES: usize = 32 * 1024;

/// The longest a call may take to be answered (a stream, to start), its request read
/// included: a request sent slowly and never finished holds its stream no longer than this.
/// Far above any honest call: a review has 3 s, and agents give up after a second or two.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often credential upkeep runs when nothing in the cluster changes: often enough that a
/// refresh due at half-life (30 minutes into a 1 h session) is never late by much.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps the credential cache in step with the cluster: prefetch for pods that appear,
/// refresh at half-life, drop keys no pod needs — upkeep of the keys this replica owns
/// among `peers`. Runs after every cluster change (so a new pod's credentials are fetched
/// before it asks), after every change of the replica set (a key whose owner left is
/// fetched by its new owner) and every [`MAINTENANCE_INTERVAL`].
async fn maintain_credentials(
    service: PodiamService,
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    peers: peers::Peers,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = cluster.subscribe();
    let mut replicas = peers.subscribe();
    // A replica alone has no replica set to follow: its channel is closed from the start.
    let mut replicas_followed = replicas.has_changed().is_ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            followed = replicas.changed(), if replicas_followed => {
                replicas_followed = followed.is_ok();
            }
            () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
        }
        changes.mark_unchanged();
        replicas.mark_unchanged();
        if cluster.synced() {
            let survey = service.survey();
            metrics
                .duplicate_ip_pods
                .set(survey.duplicate_ip_pods as i64);
            let owned = survey
                .needed
                .iter()
                .filter(|key| peers.owns(key.digest()))
                .count();
            metrics.credential_keys.set(survey.needed.len() as i64);
            metrics.credential_keys_owned.set(owned as i64);
            cache
                .maintain(&survey.needed, &|key| peers.owns(key.digest()))
                .await;
        }
    }
}
