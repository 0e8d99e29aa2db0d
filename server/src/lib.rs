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
//! [`run`] wires them together; `main.rs` only parses flags, sets up logging and calls it.

pub mod config;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod preflight;
pub mod service;
pub mod session;
pub mod sts;
pub mod watch;

/// The decision crate's modules, where the server's code has always found them.
pub use podiam_policy::{index, policy};

use std::sync::Arc;

use anyhow::Context;
use podiam_proto::v1::podiam_server::PodiamServer;
use podiam_runtime::rotate::Rotating;
use podiam_runtime::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{EventLimits, Events};
use crate::service::{PodiamService, ServiceSettings};
use crate::session::SessionNaming;
use crate::sts::{CachePolicy, CredentialCache, SdkAssumeRole, StsOptions, SystemClock};
use crate::watch::Cluster;

/// Builds a Kubernetes client from `--kubeconfig`, or the in-cluster/default configuration.
async fn kube_client(config: &Config) -> anyhow::Result<kube::Client> {
    let kube_config = match &config.kubeconfig {
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
    kube::Client::try_from(kube_config).context("building the Kubernetes client")
}

/// Runs the server until `shutdown` is cancelled (SIGTERM), then drains:
///
/// 1. at once: `/ready` and the gRPC Health turn not-ready (draining) and every agent's node
///    stream is ended, so agents move to other replicas;
/// 2. for `--shutdown-delay`: requests still arriving are answered (agents that have not yet
///    noticed, Kubernetes removing the endpoint);
/// 3. then: no new connections; requests under way get `--shutdown-timeout` to finish.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = Arc::new(
        Rotating::load(
            TlsFiles {
                ca: config.tls_ca.clone(),
                cert: config.tls_cert.clone(),
                key: config.tls_key.clone(),
            },
            podiam_runtime::tls::server_config,
        )
        .context("loading the server's TLS files")?,
    );
    let client = kube_client(&config).await?;
    let sessions = SessionNaming::new(&config.session_name, config.session_tags)
        .map_err(|why| anyhow::anyhow!("--session-name {why}"))?;
    let sts = SdkAssumeRole::new(StsOptions {
        region: config.region.clone(),
        endpoint: config.sts_endpoint.clone(),
        via_role: config.assume_role_arn.clone(),
        attempt_timeout: config.sts_timeout,
    })
    .await;
    let metrics = Arc::new(metrics::Metrics::new());
    let cache = Arc::new(CredentialCache::new(
        Arc::new(sts),
        Arc::new(SystemClock),
        CachePolicy {
            refresh_after: config.refresh_after,
            ..CachePolicy::new(config.session_duration, config.min_remaining)
        },
        metrics.sts_calls.clone(),
    ));
    let cluster = Arc::new(Cluster::default());
    let (events, event_queue) = Events::new(EventLimits::default(), metrics.events.clone());
    let draining = CancellationToken::new();
    let account = podiam_policy::decision::AgentAccount::parse(&config.agent_service_account)
        .context("--agent-service-account")?;
    let identities = Arc::new(identity::Identities::new(
        Arc::new(identity::KubeReviewer::new(client.clone())),
        metrics.identity.clone(),
    ));
    match config.node_binding {
        service::BindingMode::Enforce => tracing::info!(
            agents = %account,
            audience = %config.agent_token_audience,
            "node binding enforced: agents answered only about their own node's pods"
        ),
        service::BindingMode::Warn => tracing::warn!(
            agents = %account,
            audience = %config.agent_token_audience,
            "node binding in WARN mode: agent calls that prove no node, or ask about another \
             node's pods, are logged and counted but ANSWERED; use --node-binding enforce \
             once podiam_server_node_binding_refusals_total stays at 0"
        ),
    }
    let service = PodiamService::new(
        Arc::clone(&cluster),
        Arc::clone(&cache),
        ServiceSettings {
            base_arn: config.base_role_arn.clone(),
            sessions,
            binding: service::Binding {
                mode: config.node_binding,
                account,
                audience: config.agent_token_audience.clone(),
            },
        },
        Arc::new(events),
        identities,
    )
    .with_lifecycle(draining.clone(), metrics.node_streams.clone());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving gRPC with mutual TLS");

    // Background work stops with `stop`, after the drain; the health listener goes on
    // answering (not ready) during the drain.
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(events::deliver(
        client.clone(),
        std::env::var("POD_NAME").ok(),
        event_queue,
        metrics.events.clone(),
        stop.clone(),
    ));
    tasks.spawn(watch::run(
        client,
        Arc::clone(&cluster),
        metrics.relists.clone(),
        stop.clone(),
    ));
    tasks.spawn(maintain_credentials(
        service.clone(),
        Arc::clone(&cluster),
        Arc::clone(&cache),
        metrics.duplicate_ip_pods.clone(),
        stop.clone(),
    ));
    tasks.spawn(Arc::clone(&tls).follow(config.tls_reload_interval, stop.clone()));
    {
        let addr = config.health_listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /live, /ready and /metrics");
        let metrics = Arc::clone(&metrics);
        let cluster = Arc::clone(&cluster);
        let tls = Arc::clone(&tls);
        let draining = draining.clone();
        let handler = move |_, request: http::Request<hyper::body::Incoming>| {
            metrics.tls_expiry.set(tls.not_after());
            let response = metrics::health(
                &cluster,
                draining.is_cancelled(),
                &metrics,
                request.uri().path(),
            );
            async move { response }
        };
        tasks.spawn(podiam_runtime::serve::serve_http(
            listener,
            podiam_runtime::serve::Limits::default(),
            handler,
            stop.clone(),
        ));
    }

    // Accepting ends when the drain's delay is over; the gRPC server then finishes what is
    // under way.
    let accepting = CancellationToken::new();
    let refused = {
        let counter = metrics.tls_refused.clone();
        Arc::new(move || {
            counter.inc();
        })
    };
    let incoming = podiam_runtime::accept::accept_tls(
        listener,
        Arc::clone(&tls),
        accepting.clone(),
        &tasks,
        refused,
    );
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .add_service(PodiamServer::new(service))
        .serve_with_incoming_shutdown(incoming, accepting.clone().cancelled_owned());
    let mut grpc = std::pin::pin!(grpc);

    let served = tokio::select! {
        served = grpc.as_mut() => Some(served),
        () = shutdown.cancelled() => None,
    };
    let served = match served {
        // The gRPC server ended on its own: an error, nothing to drain.
        Some(served) => served.context("serving gRPC"),
        None => {
            tracing::info!(
                delay = ?config.shutdown_delay,
                "draining: not ready, node streams ended; still answering"
            );
            draining.cancel();
            let delayed = tokio::time::timeout(config.shutdown_delay, grpc.as_mut()).await;
            accepting.cancel();
            let result = match delayed {
                Ok(served) => served,
                Err(_) => {
                    tracing::info!(timeout = ?config.shutdown_timeout, "no longer accepting; finishing requests under way");
                    match tokio::time::timeout(config.shutdown_timeout, grpc.as_mut()).await {
                        Ok(served) => served,
                        Err(_) => {
                            tracing::warn!(
                                "requests still under way after the shutdown timeout; exiting"
                            );
                            Ok(())
                        }
                    }
                }
            };
            result.context("serving gRPC")
        }
    };
    draining.cancel();
    accepting.cancel();
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    cache.drain().await;
    tracing::info!("server stopped");
    served
}

/// HTTP/2 pings to each agent's connection: a vanished agent's streams are closed within
/// interval + timeout instead of lingering until TCP gives up (minutes).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most HTTP/2 streams (calls) at once on one connection. An agent's one connection carries
/// its node stream and a call per pod cache miss; 1000 streams opened by one caller on one
/// connection must not be served.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// How often credential upkeep runs when nothing in the cluster changes: often enough that a
/// refresh due at half-life (30 minutes into a 1 h session) is never late by much.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps the credential cache in step with the cluster: prefetch for pods that appear,
/// refresh at half-life, drop keys no pod needs. Runs after every cluster change (so a new
/// pod's credentials are fetched before it asks) and every [`MAINTENANCE_INTERVAL`].
async fn maintain_credentials(
    service: PodiamService,
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    duplicate_ip_pods: prometheus_client::metrics::gauge::Gauge,
    shutdown: CancellationToken,
) {
    let mut changes = cluster.subscribe();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
        }
        changes.mark_unchanged();
        if cluster.synced() {
            let survey = service.survey();
            duplicate_ip_pods.set(survey.duplicate_ip_pods as i64);
            cache.maintain(&survey.needed).await;
        }
    }
}
