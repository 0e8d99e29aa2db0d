//! `podiam-agent`: parse flags, set up logging, then serve or uninstall.

use std::process::ExitCode;

use clap::Parser;
use podiam_agent::config::{Cli, Command};
use podiam_agent::iptables::Iptables;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve(config) = &cli.command {
        let problems = config.problems();
        if !problems.is_empty() {
            for problem in problems {
                eprintln!("podiam-agent: {problem}");
            }
            return ExitCode::from(2);
        }
    }
    podiam_runtime::telemetry::init(cli.log_format, &cli.log_level);
    podiam_runtime::tls::install_crypto_provider();

    let result = match cli.command {
        Command::Serve(config) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(
                shutdown.clone(),
            ));
            podiam_agent::run(*config, shutdown).await
        }
        Command::Uninstall(config) => uninstall(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes the iptables rules and, when asked, the token key file. Either missing is fine:
/// uninstalling twice succeeds.
async fn uninstall(config: podiam_agent::config::UninstallConfig) -> anyhow::Result<()> {
    Iptables::new(config.iptables_bin).uninstall().await?;
    tracing::info!("iptables rules removed");
    if let Some(path) = config.token_key_file {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "token key file removed"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no token key file to remove");
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("removing the token key file {}", path.display())));
            }
        }
    }
    Ok(())
}
