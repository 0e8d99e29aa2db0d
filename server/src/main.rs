//! `podiam-server`: check the flags, set up logging, make the start-up checks, bind the
//! listeners, and serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use podiam_server::config::{Config, ValidConfig};
use podiam_server::{Listeners, Server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc. Every relist replaces the pod index and every
/// cluster change has the service survey all pods (`service.rs`), tens of MiB of short-lived
/// allocations at 100k pods; glibc returns freed memory to the kernel only from the top of
/// a heap, so each relist left more of it resident (benchmark, 100k pods, RSS after each of
/// ten relists: 148 rising to 170 MiB), while jemalloc purges freed pages wherever they lie
/// (121 to 135 MiB a second after each, no trend; 98.5 to 99.3 MiB since `heap` purges the
/// replaced index's pages at each relist). Built from source with the machine's C compiler.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let environment = podiam_server::config::environment_problems(|name| std::env::var(name).ok());
    let mut config = match Config::parse().validate() {
        Ok(config) if environment.is_empty() => config,
        Ok(_) => return refuse(environment),
        Err(mut problems) => {
            problems.extend(environment);
            return refuse(problems);
        }
    };
    podiam_runtime::telemetry::init(config.log_format, &config.log_level);
    podiam_runtime::tls::install_crypto_provider();
    if let Err(error) = podiam_server::heap::enable_background_purging() {
        tracing::warn!(%error, "freed memory is returned to the kernel only while the server allocates");
    }
    let problems = podiam_server::preflight::preflight(&mut config).await;
    if !problems.is_empty() {
        return refuse(problems);
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints every problem, one line each, and exits 2.
fn refuse(problems: Vec<String>) -> ExitCode {
    for problem in problems {
        eprintln!("podiam-server: {problem}");
    }
    ExitCode::from(2)
}

async fn run(config: ValidConfig) -> anyhow::Result<()> {
    let address_file = config.listen_address_file.clone();
    let (listen, health_listen) = (config.listen, config.health_listen);
    let webhook_listen = config.webhook.as_ref().map(|webhook| webhook.listen);
    let server = Server::build(config).await?;
    let webhook = match webhook_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let listeners = Listeners {
        grpc: bind(listen).await?,
        health: bind(health_listen).await?,
        webhook,
    };
    if let Some(path) = &address_file {
        let mut addresses = vec![
            ("listen", listeners.grpc.local_addr()?),
            ("health-listen", listeners.health.local_addr()?),
        ];
        if let Some(webhook) = &listeners.webhook {
            addresses.push(("webhook-listen", webhook.local_addr()?));
        }
        podiam_runtime::net::write_address_file(path, &addresses)
            .with_context(|| format!("writing --listen-address-file {}", path.display()))?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(
        shutdown.clone(),
    ));
    server.serve(listeners, shutdown).await
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}
