//! podiam's per-node agent: the instance-metadata service pods see.
//!
//! - [`config`]: the `serve` and `uninstall` commands and their validation.
//! - [`routes`]: path normalisation and routing (pure).
//! - [`token`]: IMDSv2 tokens, bound to the asking pod's address and UID (pure), and their
//!   keys, kept on the node and rotated, so that tokens outlive the agent process.
//! - [`imds`]: EC2's exact response documents (pure).
//! - [`identity`]: the agent's projected token, re-read and put on every server call.
//! - [`replicas`]: the server replicas, their health, and calls that fail over between them.
//! - [`upstream`]: gRPC calls to the servers, readiness, and the node stream.
//! - [`pods`]: this node's pods and their decisions, from the server's node stream.
//! - [`cache`]: each pod's credentials, so that a hit needs no server call.
//! - [`http`]: the pod-facing server, the health server, and the one failure → HTTP mapping.
//! - [`iptables`]: the DNAT chain that sends pods' 169.254.169.254 traffic here.
//! - [`node_metadata`]: the node's own metadata service, for allow-listed paths only.
//! - [`metrics`]: the Prometheus metrics on the health listener.
//!
//! [`run`] wires them; `main.rs` only parses flags, sets up logging and calls it.

pub mod cache;
pub mod config;
pub mod http;
pub mod identity;
pub mod imds;
pub mod iptables;
pub mod metrics;
pub mod node_metadata;
pub mod pods;
pub mod replicas;
pub mod routes;
pub mod token;
pub mod upstream;

use std::sync::Arc;

use anyhow::Context;
use podiam_runtime::rotate::Rotating;
use podiam_runtime::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::http::{MetadataService, ServiceOptions};
use crate::identity::AgentToken;
use crate::iptables::Iptables;
use crate::metrics::Metrics;
use crate::node_metadata::NodeMetadata;
use crate::replicas::ServerSet;
use crate::token::KeyKeeper;
use crate::upstream::Upstream;

/// Runs the agent until `shutdown` (SIGTERM), then: reports not ready, stops accepting pods'
/// connections (a successor bound beside it with SO_REUSEPORT takes them), lets open ones
/// finish, and exits. The iptables rules are installed before serving and deliberately left
/// in place afterwards, also on a stop (see [`iptables`]): only `podiam-agent uninstall`
/// removes them.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = Arc::new(
        Rotating::load(
            TlsFiles {
                ca: config.tls_ca.clone(),
                cert: config.tls_cert.clone(),
                key: config.tls_key.clone(),
            },
            podiam_runtime::tls::client_config,
        )
        .context("loading the agent's TLS files")?,
    );
    let metrics = Arc::new(Metrics::new());
    let token = Arc::new(AgentToken::from_file(&config.token_file));
    if let Err(error) = token.reload() {
        tracing::error!(%error, "no agent token yet; the servers refuse this agent until it can be read");
    }
    let servers = Arc::new(ServerSet::new(
        config.targets(),
        Arc::clone(&tls),
        config.server_timeout,
        metrics.failovers.clone(),
        Arc::clone(&token),
    ));
    if let Err(error) = servers.resolve().await {
        tracing::warn!(%error, "no server replica resolved yet; serving anyway and retrying");
    }
    let upstream = Arc::new(Upstream::new(
        Arc::clone(&servers),
        config.node_name.clone(),
        metrics.node_stream.clone(),
    ));
    let (tokens, key_keeper) = KeyKeeper::open(&config.token_key_file, token::now_unix())
        .context("no IMDSv2 token key")?;
    let allow = match &config.allow_route_regexp {
        Some(source) => Some((
            routes::allow_list(source).context("--allow-route-regexp")?,
            NodeMetadata::new(&config.metadata_upstream),
        )),
        None => None,
    };
    let options = ServiceOptions {
        require_token: config.require_token,
        allow,
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
    let limits = config.limits();

    // Both ports with SO_REUSEPORT: during a rolling update (DaemonSet maxSurge) the new
    // agent binds beside the old one; the kernel spreads connections over both until the old
    // one stops accepting. The kubelet's probes may meanwhile reach either agent, which is
    // harmless: both serve.
    let listener = podiam_runtime::serve::bind_reuseport(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    let health_listener = podiam_runtime::serve::bind_reuseport(config.health_listen)
        .with_context(|| format!("binding {}", config.health_listen))?;
    // Background work runs until the pod-facing server has drained.
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    if let Some(warning) = config.pod_port_warning(config::unprivileged_port_start()) {
        tracing::warn!("{warning}");
    }
    if config.iptables {
        let target = config.dnat_target().context("no DNAT target")?;
        let iptables = Iptables::new(&config.iptables_bin);
        iptables
            .install(target, &config.interfaces)
            .await
            .context("installing the iptables rules")?;
        tracing::info!(%target, interfaces = ?config.interfaces, "iptables rules in place");
        if config.flush_conntrack {
            iptables::flush_conntrack("conntrack")
                .await
                .context("flushing conntrack entries toward 169.254.169.254")?;
            tracing::info!("stale conntrack entries toward 169.254.169.254 flushed");
        }
        tasks.spawn(keep_rules(
            iptables,
            target,
            config.interfaces.clone(),
            config.iptables_sync_interval,
            stop.clone(),
        ));
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        health = %health_listener.local_addr()?,
        servers = ?config.server,
        "serving pods' metadata requests"
    );

    {
        let servers = Arc::clone(&servers);
        let (interval, stop) = (config.server_resolve_interval, stop.clone());
        tasks.spawn(async move { servers.follow_dns(interval, stop).await });
    }
    {
        let servers = Arc::clone(&servers);
        let stop = stop.clone();
        tasks.spawn(async move { servers.follow_health(stop).await });
    }
    {
        let upstream = Arc::clone(&upstream);
        let stop = stop.clone();
        tasks.spawn(async move { upstream.follow_node(&table, &cache, stop).await });
    }
    tasks.spawn(Arc::clone(&tls).follow(config.tls_reload_interval, stop.clone()));
    tasks.spawn(Arc::clone(&token).follow(stop.clone()));
    tasks.spawn(key_keeper.follow(stop.clone()));
    {
        let upstream = Arc::clone(&upstream);
        let metrics = Arc::clone(&metrics);
        let tls = Arc::clone(&tls);
        let handler = move |_, request: ::http::Request<hyper::body::Incoming>| {
            metrics.ready.set(i64::from(upstream.ready()));
            metrics.tls_expiry.set(tls.not_after());
            metrics.observe_replicas(upstream.servers());
            let response = http::health(&upstream, &metrics, request.uri().path());
            async move { response }
        };
        tasks.spawn(podiam_runtime::serve::serve_http(
            health_listener,
            limits,
            handler,
            stop.clone(),
        ));
    }
    let keep_alive = keep_alive_header(config.idle_timeout);
    let handler = move |peer: std::net::SocketAddr, request| {
        let service = Arc::clone(&service);
        let keep_alive = keep_alive.clone();
        async move {
            let mut response = service.handle(peer.ip().to_canonical(), request).await;
            if let Some(value) = keep_alive {
                response.headers_mut().insert(KEEP_ALIVE, value);
            }
            response
        }
    };
    {
        // Readiness goes first on a stop.
        let upstream = Arc::clone(&upstream);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            shutdown.cancelled().await;
            upstream.stop();
            tracing::info!("stopping: not ready, no new connections; open ones finish");
        });
    }
    podiam_runtime::serve::serve_http_observed(
        listener,
        limits,
        Arc::clone(&metrics) as Arc<dyn podiam_runtime::serve::ConnectionObserver>,
        handler,
        shutdown.clone(),
    )
    .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    if config.iptables {
        tracing::info!("stopped; the iptables rules stay (podiam-agent uninstall removes them)");
    }
    Ok(())
}

/// The `Keep-Alive` response header.
const KEEP_ALIVE: ::http::HeaderName = ::http::HeaderName::from_static("keep-alive");

/// `Keep-Alive: timeout=N` for an idle keep-alive connection closed after `idle`
/// (`--idle-timeout`). Clients that honour it stop reusing a connection before the agent
/// closes it, instead of racing the close: Node's HTTP agent retires an idle socket one second
/// before the announced timeout when that is sooner than its own 5 s. (The idle limit itself
/// is longer than the SDKs' pools keep connections, see `podiam_runtime::serve::IDLE_TIMEOUT`;
/// it was once the 5 s header timeout, Node's own, and a request sent at 5.0 s met a closing
/// connection.) `None` under a second (nothing to announce).
fn keep_alive_header(idle: std::time::Duration) -> Option<::http::HeaderValue> {
    let seconds = idle.as_secs();
    if seconds == 0 {
        return None;
    }
    ::http::HeaderValue::from_str(&format!("timeout={seconds}")).ok()
}

/// Checks the iptables rules every `interval` and repairs them if someone removed them.
async fn keep_rules(
    iptables: Iptables,
    target: std::net::SocketAddr,
    interfaces: Vec<String>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match iptables.install(target, &interfaces).await {
            Ok(true) => tracing::warn!("iptables rules were changed by someone else; repaired"),
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "checking the iptables rules failed"),
        }
    }
}
