//! podiam's server: the only part of podiam allowed to call `sts:AssumeRole`.
//!
//! - [`config`]: flags and their validation.
//! - [`watch`]: pods and namespaces from the Kubernetes API into the [`index`]es.
//! - [`policy`]: role resolution and the namespace's permitted regex (pure functions).
//! - [`preflight`]: start-up checks that need the network (base ARN detection, STS reachable).
//! - [`session`]: session names and tags per pod.
//! - [`sts`]: the AssumeRole call and the single-flight credential cache.
//! - [`service`]: the gRPC service agents call, and its one refusal → status mapping.
//! - [`events`]: Kubernetes Events on refused pods, throttled.
//! - [`metrics`]: Prometheus metrics and `/live`, `/ready` on the health listener.
//!
//! [`run`] wires them together; `main.rs` only parses flags, sets up logging and calls it.

pub mod config;
pub mod events;
pub mod index;
pub mod metrics;
pub mod policy;
pub mod preflight;
pub mod service;
pub mod session;
pub mod sts;
pub mod watch;

use std::sync::Arc;

use anyhow::Context;
use podiam_proto::tls::TlsFiles;
use podiam_proto::v1::podiam_server::PodiamServer;
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

/// Runs the server until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = TlsFiles {
        ca: config.tls_ca.clone(),
        cert: config.tls_cert.clone(),
        key: config.tls_key.clone(),
    }
    .load()?
    .server_config();
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
    let metrics = metrics::Metrics::new();
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
    let service = PodiamService::new(
        Arc::clone(&cluster),
        Arc::clone(&cache),
        ServiceSettings {
            base_arn: config.base_role_arn.clone(),
            sessions,
        },
        Arc::new(events),
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving gRPC with mutual TLS");

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(events::deliver(
        client.clone(),
        std::env::var("POD_NAME").ok(),
        event_queue,
        metrics.events.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(watch::run(client, Arc::clone(&cluster), shutdown.clone()));
    tasks.spawn(maintain_credentials(
        service.clone(),
        Arc::clone(&cluster),
        Arc::clone(&cache),
        metrics.duplicate_ip_pods.clone(),
        shutdown.clone(),
    ));
    {
        let addr = config.health_listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /live, /ready and /metrics");
        let metrics = Arc::new(metrics);
        let cluster = Arc::clone(&cluster);
        let handler = move |_, request: http::Request<hyper::body::Incoming>| {
            let response = metrics::health(&cluster, &metrics, request.uri().path());
            async move { response }
        };
        tasks.spawn(podiam_proto::serve::serve_http(
            listener,
            podiam_proto::serve::Limits::default(),
            handler,
            shutdown.clone(),
        ));
    }
    let served = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .add_service(PodiamServer::new(service))
        .serve_with_incoming_shutdown(no_delay(listener), shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    cache.drain().await;
    served.context("serving gRPC")
}

/// Accepted connections with Nagle's algorithm off: a small gRPC answer waiting for the
/// client's delayed ACK costs ~40 ms (tonic sets this only on listeners it binds itself).
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

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
