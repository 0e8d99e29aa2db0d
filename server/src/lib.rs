//! podiam's server: the only part of podiam allowed to call `sts:AssumeRole`.
//!
//! - [`config`]: flags and their validation.
//! - [`watch`]: pods and namespaces from the Kubernetes API into the [`index`]es.
//! - [`policy`]: role resolution and the namespace's permitted regex (pure functions).
//! - [`sts`]: the AssumeRole call and the single-flight credential cache.
//! - [`service`]: the gRPC service agents call, and its one refusal → status mapping.
//!
//! [`run`] wires them together; `main.rs` only parses flags, sets up logging and calls it.

pub mod config;
pub mod index;
pub mod policy;
pub mod service;
pub mod sts;
pub mod watch;

use std::sync::Arc;

use anyhow::Context;
use podiam_proto::tls::TlsFiles;
use podiam_proto::v1::podiam_server::PodiamServer;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{PodiamService, ServiceSettings};
use crate::sts::{CredentialCache, SdkAssumeRole};
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
    let sts = SdkAssumeRole::new(config.region.clone(), config.sts_endpoint.clone()).await;
    let cache = Arc::new(CredentialCache::new(
        Arc::new(sts),
        config.session_duration,
        config.min_remaining,
    ));
    let cluster = Arc::new(Cluster::default());
    let service = PodiamService::new(
        Arc::clone(&cluster),
        Arc::clone(&cache),
        ServiceSettings {
            base_arn: config.base_role_arn.clone(),
            default_session_name: config.session_name.clone(),
        },
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving gRPC with mutual TLS");

    let watching = tokio::spawn(watch::run(client, cluster, shutdown.clone()));
    let served = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .add_service(PodiamServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    shutdown.cancel();
    let _ = watching.await;
    cache.drain().await;
    served.context("serving gRPC")
}
