//! `podiam-kube-emulator`: runs the in-memory Kubernetes API emulator as a process, for the
//! demo and for poking at it with kubectl by hand.
//!
//! Writes a kubeconfig, prints `listening on http://ADDR` once bound, and serves until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use podiam_tests::kube_emulator::{
    DEFAULT_BOOKMARK_INTERVAL, DEFAULT_HISTORY, EmulatorOptions, KubeEmulator,
};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

/// An in-memory Kubernetes API (pods, namespaces, events, service accounts, RBAC, token
/// requests and reviews) for podiam's tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (loopback only makes sense).
    #[arg(long, env = "PODIAM_EMULATOR_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig pointing at the emulator.
    #[arg(long, env = "PODIAM_EMULATOR_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Interval between watch BOOKMARK events, in milliseconds.
    #[arg(long, env = "PODIAM_EMULATOR_BOOKMARK_INTERVAL_MS", default_value_t = DEFAULT_BOOKMARK_INTERVAL.as_millis() as u64)]
    bookmark_interval_ms: u64,
    /// Number of writes kept for watch resumption.
    #[arg(long, env = "PODIAM_EMULATOR_HISTORY", default_value_t = DEFAULT_HISTORY)]
    history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = EmulatorOptions {
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms.max(1)),
        history: args.history,
        ..EmulatorOptions::default()
    };
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let emulator = KubeEmulator::start(args.listen, options)
        .await
        .context("starting the emulator")?;
    emulator
        .write_kubeconfig(&args.kubeconfig)
        .context("writing the kubeconfig")?;
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("listening on {}\n", emulator.url()).as_bytes())
        .await
        .context("writing to stdout")?;
    stdout.flush().await.context("flushing stdout")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    emulator.shutdown().await;
    Ok(())
}
