//! `kubectl-iam`: parse the command line, run the command, exit 0, 1 (failure) or 2 (usage).

use std::process::ExitCode;

use clap::Parser;
use kubectl_iam::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    podiam_runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    if cli.verbose {
        podiam_runtime::telemetry::init(podiam_runtime::telemetry::LogFormat::Text, "info");
    }
    match kubectl_iam::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "kubectl-iam: {}",
                kubectl_iam::table::Escaped(&error.one_line())
            );
            ExitCode::from(error.exit_code())
        }
    }
}
