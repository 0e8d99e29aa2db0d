//! podiam's per-node agent: the instance-metadata service pods see.
//!
//! - [`config`]: the `serve` and `uninstall` commands and their validation.
//! - [`routes`]: path normalisation and routing (pure).
//! - [`token`]: IMDSv2 tokens, bound to the asking pod's address (pure).
//! - [`imds`]: EC2's exact response documents (pure).
//! - [`upstream`]: gRPC calls to the server, readiness, and the node stream.
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
pub mod imds;
pub mod iptables;
pub mod metrics;
pub mod node_metadata;
pub mod pods;
pub mod routes;
pub mod token;
pub mod upstream;

use std::sync::Arc;

use anyhow::Context;
use podiam_proto::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::http::{Limits, MetadataService, ServiceOptions};
use crate::iptables::Iptables;
use crate::metrics::Metrics;
use crate::node_metadata::NodeMetadata;
use crate::token::TokenKey;
use crate::upstream::Upstream;

/// Runs the agent until `shutdown`. The iptables rules are installed before serving and
/// deliberately left in place afterwards (see [`iptables`]).
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = TlsFiles {
        ca: config.tls_ca.clone(),
        cert: config.tls_cert.clone(),
        key: config.tls_key.clone(),
    }
    .load()?;
    let server_name = config
        .server_name()
        .context("--server has no host to check the certificate against")?;
    let upstream = Arc::new(
        Upstream::new(
            &config.server,
            tls.client_config(&server_name),
            config.server_timeout,
            config.node_name.clone(),
        )
        .context("configuring the server connection")?,
    );
    let tokens = TokenKey::generate().map_err(|_| anyhow::anyhow!("generating the token key"))?;
    let metrics = Arc::new(Metrics::new());
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
    let limits = Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_timeout,
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let health_listener = TcpListener::bind(config.health_listen)
        .await
        .with_context(|| format!("binding {}", config.health_listen))?;
    let tasks = tokio_util::task::TaskTracker::new();
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
            shutdown.clone(),
        ));
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        health = %health_listener.local_addr()?,
        server = %config.server,
        "serving pods' metadata requests"
    );

    {
        let upstream = Arc::clone(&upstream);
        let shutdown = shutdown.clone();
        tasks.spawn(async move { upstream.watch_health(shutdown).await });
    }
    {
        let upstream = Arc::clone(&upstream);
        let shutdown = shutdown.clone();
        tasks.spawn(async move { upstream.follow_node(&table, &cache, shutdown).await });
    }
    {
        let upstream = Arc::clone(&upstream);
        let metrics = Arc::clone(&metrics);
        let handler = move |_, request: ::http::Request<hyper::body::Incoming>| {
            metrics.ready.set(i64::from(upstream.ready()));
            let response = http::health(&upstream, &metrics, request.uri().path());
            async move { response }
        };
        tasks.spawn(podiam_proto::serve::serve_http(
            health_listener,
            limits,
            handler,
            shutdown.clone(),
        ));
    }
    let handler = move |peer: std::net::SocketAddr, request| {
        let service = Arc::clone(&service);
        async move { service.handle(peer.ip().to_canonical(), request).await }
    };
    podiam_proto::serve::serve_http(listener, limits, handler, shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
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
