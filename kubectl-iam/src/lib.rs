//! `kubectl iam`: podiam's kubectl plugin.
//!
//! An executable named `kubectl-iam` on the PATH is run by `kubectl iam …` with every word
//! after `iam`. It sets podiam's annotations (`grant`, `revoke`, `permit`), explains a
//! pod's decision (`explain`) and shows podiam's servers and agents (`status`).
//!
//! - [`cli`]: the command line (clap; Kubernetes flags are global, as kubectl users expect).
//! - [`cluster`]: the Kubernetes client, chosen as kubectl chooses it, and its few calls.
//! - [`credentials`]: the user's own bearer token from the same kubeconfig (token,
//!   tokenFile, exec plugin), for the servers' operator calls; redacted everywhere.
//! - [`annotate`]: `grant`, `revoke`, `permit`, with the servers' own checks first.
//! - [`servers`]: podiam's servers over mutual TLS, resolved as the agent resolves them.
//! - [`explain`]: a server's `Explain`, or the same computed from the API with the server
//!   crate's decision code.
//! - [`base_arn`]: the servers' base role ARN, read from their pods, for local decisions.
//! - [`status`]: pods from the API, replicas' `Status`, agents joined by node; the exit code.
//! - [`table`]: aligned text output.
//! - [`error`]: the errors, and the one mapping to exit codes (2 usage, 1 failure).
//!
//! [`run`] dispatches; `main.rs` parses, installs the TLS provider, runs and exits.

pub mod annotate;
pub mod base_arn;
pub mod cli;
pub mod cluster;
pub mod credentials;
pub mod error;
pub mod explain;
pub mod servers;
pub mod status;
pub mod table;

use cli::{Cli, Command};
use cluster::Cluster;
pub use error::Error;

/// The label the server pods carry (deploy/base/server.yaml).
pub const SERVER_LABEL: &str = "app.kubernetes.io/name=podiam-server";
/// The label the agent pods carry (deploy/base/agent.yaml).
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=podiam-agent";

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let cluster = Cluster::connect(&cli.kube).await?;
    let podiam = cli.kube.podiam_namespace.as_str();
    match &cli.command {
        Command::Grant(args) => annotate::grant(&cluster, podiam, args).await,
        Command::Revoke(args) => annotate::revoke(&cluster, args).await,
        Command::Permit(args) => annotate::permit(&cluster, args).await,
        Command::Explain(args) => explain::run(&cluster, podiam, args).await,
        Command::Status(args) => status::run(&cluster, podiam, args).await,
    }
}
