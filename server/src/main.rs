//! `podiam-server`: parse flags, set up logging, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use podiam_server::config::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = Config::parse();
    let mut problems = config.problems();
    problems.extend(podiam_server::config::environment_problems(|name| {
        std::env::var(name).ok()
    }));
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("podiam-server: {problem}");
        }
        return ExitCode::from(2);
    }
    podiam_runtime::telemetry::init(config.log_format, &config.log_level);
    podiam_runtime::tls::install_crypto_provider();
    let problems = podiam_server::preflight::preflight(&mut config).await;
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("podiam-server: {problem}");
        }
        return ExitCode::from(2);
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(
        shutdown.clone(),
    ));
    match podiam_server::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
