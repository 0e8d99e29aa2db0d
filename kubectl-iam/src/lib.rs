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
//! - [`annotate`]: `grant`, `revoke`, `permit`, with the servers' own checks first
//!   (`podiam-policy`).
//! - [`servers`]: podiam's servers, resolved as the agent resolves them, over TLS that
//!   verifies them against `--tls-ca`, the user's token on every call. No podiam key.
//! - [`explain`]: a server's `Explain`, or the same computed from the API with the servers'
//!   decision code (`podiam-policy`'s `View::explain`).
//! - [`base_arn`]: the servers' base role ARN, read from their pods, for local decisions.
//! - [`status`]: pods from the API, replicas' `Status`, agents joined by node; the exit code.
//! - [`table`]: aligned text output.
//! - [`error`]: the errors, and the one mapping to exit codes (2 usage, 1 failure).
//!
//! The plugin links neither daemon: the decisions come from `podiam-policy`, the wire contract
//! and TLS set-up from `podiam-proto`.
//!
//! [`run`] dispatches; `main.rs` parses, installs the TLS provider, runs and exits.

pub mod annotate;
pub mod base_arn;
pub mod cli;
pub mod cluster;
pub mod credentials;
pub mod error;
pub mod explain;
pub mod migrate;
pub mod servers;
pub mod status;
pub mod table;

use cli::{Cli, Command};
use cluster::Cluster;
pub use error::Error;
use servers::Servers;

/// The label the server pods carry (deploy/base/server.yaml).
pub const SERVER_LABEL: &str = "app.kubernetes.io/name=podiam-server";
/// The label the agent pods carry (deploy/base/agent.yaml).
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=podiam-agent";

/// Runs one command. Usage mistakes are found before anything is read or run; with
/// `--server`, the user's bearer token is obtained with the Kubernetes client (a user
/// without one is one clear error before anything is asked).
pub async fn run(cli: Cli) -> Result<(), Error> {
    let servers = match &cli.command {
        Command::Explain(args) => {
            explain::check(args)?;
            Servers::from_args(&args.servers)?
        }
        Command::Status(args) => Servers::from_args(&args.servers)?,
        Command::Grant(_) | Command::Revoke(_) | Command::Permit(_) | Command::Migrate(_) => None,
    };
    let (cluster, servers) = match servers {
        None => (Cluster::connect(&cli.kube).await?, None),
        Some(servers) => {
            let (cluster, token) = Cluster::connect_with_token(&cli.kube).await?;
            (cluster, Some(servers.with_token(&token)?))
        }
    };
    let podiam = cli.kube.podiam_namespace.as_str();
    let servers = servers.as_ref();
    match &cli.command {
        Command::Grant(args) => annotate::grant(&cluster, podiam, args).await,
        Command::Revoke(args) => annotate::revoke(&cluster, args).await,
        Command::Permit(args) => annotate::permit(&cluster, args).await,
        Command::Explain(args) => explain::run(&cluster, podiam, args, servers).await,
        Command::Status(args) => status::run(&cluster, podiam, args, servers).await,
        Command::Migrate(args) => migrate::run(&cluster, podiam, args).await,
    }
}
