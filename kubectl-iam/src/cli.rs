//! The command line: `kubectl iam COMMAND`, with the flags kubectl users expect.
//!
//! kubectl hands a plugin every word after its name, so the Kubernetes flags
//! (`--kubeconfig`, `--context`, `-n`) are global: they work before or after the command.
//! The flags of one command (how to reach the servers, `-o`) belong to that command.
//! Reaching the servers takes no podiam key: their CA to verify them (`--tls-ca`), and the
//! user's own Kubernetes credentials from the kubeconfig, which must give a bearer token.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use podiam_runtime::telemetry::parse_duration;

/// Give pods AWS IAM roles with podiam, and find out why a pod gets its role or not.
///
/// Installed as `kubectl-iam` on the PATH, it runs as `kubectl iam`. grant, revoke and permit
/// set podiam's annotations (what `kubectl annotate` would, checked first); explain and
/// status ask podiam's servers when --server is given, and the Kubernetes API otherwise.
///
/// Calls to the servers carry your own Kubernetes token (from the kubeconfig: a token, a
/// tokenFile or an exec credential plugin such as `aws eks get-token`), and the servers answer
/// only what your RBAC lets you read (the podiam-operator ClusterRole grants it).
#[derive(Debug, Parser)]
#[command(name = "kubectl-iam", bin_name = "kubectl iam", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Log what the plugin does to stderr (RUST_LOG wins when set).
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

/// Which cluster, as kubectl chooses it.
#[derive(Clone, Debug, Args)]
pub struct KubeArgs {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the pod's
    /// service account when run inside a cluster).
    #[arg(long, global = true, value_name = "PATH", help_heading = CLUSTER)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, help_heading = CLUSTER)]
    pub context: Option<String>,
    /// The pod's namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, help_heading = CLUSTER)]
    pub namespace: Option<String>,
    /// The namespace podiam's servers and agents run in.
    #[arg(long, global = true, default_value = "podiam", help_heading = CLUSTER)]
    pub podiam_namespace: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Give a pod a role: set its iam.amazonaws.com/role annotation. Warns (and still
    /// grants) when the pod's namespace does not permit the role; refuses a malformed role.
    Grant(GrantArgs),
    /// Take a pod's role away: remove its iam.amazonaws.com/role annotation.
    Revoke(RevokeArgs),
    /// Permit roles in a namespace: set its iam.amazonaws.com/permitted regex, which must
    /// match the whole role. Refuses a regex the servers would treat as invalid.
    Permit(PermitArgs),
    /// Why a pod gets its role, or does not: asks a podiam server (as you: you need `get
    /// pods` in the pod's namespace), or works it out from the Kubernetes API with the
    /// servers' own decision code when no server is given or none answers.
    Explain(ExplainArgs),
    /// podiam's servers and agents: their pods, and what each server replica that answers
    /// says (version, sync, the agents it serves and the pods they proved; as you: you need
    /// `list pods` cluster-wide). Exits 1 when no server replica is ready.
    Status(StatusArgs),
    /// What each namespace's kube2iam or kiam policy becomes under podiam: kube2iam's
    /// iam.amazonaws.com/allowed-roles as one iam.amazonaws.com/permitted regex, and kiam
    /// regexes whose top-level `|` kiam read differently. `--write` writes the converted
    /// regexes of namespaces that have none yet, and nothing else.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Write iam.amazonaws.com/permitted on the namespaces that have kube2iam's list and no
    /// permitted regex (checked with the servers' rules first).
    #[arg(long)]
    pub write: bool,
    /// How kube2iam read the lists (its --namespace-restriction-format).
    #[arg(long, value_enum, default_value = "glob")]
    pub kube2iam_format: Kube2iamFormat,
    /// The base ARN kube2iam put in front of regexes (regexp format only).
    #[command(flatten)]
    pub base: BaseArnArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

/// kube2iam's `--namespace-restriction-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kube2iamFormat {
    /// Globs: `*` matches anything (kube2iam's default).
    Glob,
    /// Regular expressions matched anywhere in the role.
    Regexp,
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The pod (`NAME` or `pod/NAME`), in --namespace.
    pub pod: String,
    /// The role: a name (`app-reader`), a path and name (`team/app-reader`), or a role ARN.
    pub role: String,
    #[command(flatten)]
    pub base: BaseArnArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The pod (`NAME` or `pod/NAME`), in --namespace.
    pub pod: String,
}

#[derive(Debug, Args)]
pub struct PermitArgs {
    /// The namespace (`NAME` or `namespace/NAME`).
    pub namespace: String,
    /// The regular expression (Rust regex syntax) the whole role must match: its ARN, or
    /// its path/name under the servers' base ARN. `app-.*` permits app-reader.
    pub regex: String,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The pod (`NAME` or `pod/NAME`), in --namespace.
    pub pod: String,
    #[command(flatten)]
    pub servers: ServerArgs,
    #[command(flatten)]
    pub base: BaseArnArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

/// How to reach podiam's servers: TLS verified against their CA, and your own Kubernetes
/// token on every call (no client certificate).
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// A podiam server's gRPC URL, https://HOST:PORT: a name that resolves to every replica
    /// (the headless Service), or one replica. Repeat, or comma-separate, to list replicas.
    /// Without it, no server is asked.
    #[arg(long, env = "PODIAM_SERVER", value_delimiter = ',', value_name = "URL", help_heading = SERVERS)]
    pub server: Vec<String>,
    /// The name the servers' certificates must carry, when it differs from the URLs' host
    /// (podiam-server.podiam.svc when dialling a replica by its IP).
    #[arg(long, env = "PODIAM_SERVER_NAME", value_name = "NAME", help_heading = SERVERS)]
    pub server_name: Option<String>,
    /// CA certificate (PEM) the servers' certificates must chain to (ca.crt of Secret
    /// podiam-server-tls). Nothing else is needed from podiam: calls carry your own
    /// Kubernetes token from the kubeconfig.
    #[arg(long, env = "PODIAM_TLS_CA", value_name = "PATH", help_heading = SERVERS)]
    pub tls_ca: Option<PathBuf>,
    /// How long the servers get to answer, resolving and connecting included (one deadline
    /// for the whole command); explain then works it out from the API instead.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION", help_heading = SERVERS)]
    pub server_timeout: Duration,
}

/// The servers' base role ARN, for commands that decide without a server.
#[derive(Clone, Debug, Args)]
pub struct BaseArnArgs {
    /// The servers' base role ARN (arn:aws:iam::ACCOUNT:role/), under which role names are
    /// placed. Default: read from the server pods' --base-role-arn or PODIAM_BASE_ROLE_ARN
    /// (their ConfigMap included).
    #[arg(long, env = "PODIAM_BASE_ROLE_ARN", value_name = "ARN")]
    pub base_role_arn: Option<String>,
}

/// `-o`: for people or for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text.
    Text,
    /// One JSON document.
    Json,
}

/// `NAME` from `NAME`, `KIND/NAME` for the kind's names (`pod`, `pods`, `po`), refusing
/// another kind.
pub fn object_name<'a>(arg: &'a str, kinds: &[&str]) -> Result<&'a str, String> {
    let name = match arg.split_once('/') {
        None => arg,
        Some((kind, name)) if kinds.contains(&kind.to_ascii_lowercase().as_str()) => name,
        Some(_) => {
            return Err(format!(
                "{arg:?}: expected NAME or {}/NAME",
                kinds.first().copied().unwrap_or_default()
            ));
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!("{arg:?} is not a name"));
    }
    Ok(name)
}

/// The help heading of the flags that choose the cluster.
const CLUSTER: &str = "Cluster options";
/// The help heading of the flags that reach podiam's servers.
const SERVERS: &str = "Server options (TLS; calls carry your Kubernetes token)";

/// The kinds a pod argument may be written as.
pub const POD_KINDS: &[&str] = &["pod", "pods", "po"];
/// The kinds a namespace argument may be written as.
pub const NAMESPACE_KINDS: &[&str] = &["namespace", "namespaces", "ns"];

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kubernetes_flags_go_before_or_after_the_command() {
        for args in [
            &["kubectl-iam", "-n", "team-a", "revoke", "web"][..],
            &["kubectl-iam", "revoke", "web", "-n", "team-a"][..],
            &["kubectl-iam", "revoke", "--namespace=team-a", "web"][..],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.kube.namespace.as_deref(), Some("team-a"), "{args:?}");
        }
    }

    #[test]
    fn servers_repeat_or_comma_separate() {
        let cli = Cli::try_parse_from([
            "kubectl-iam",
            "status",
            "--server",
            "https://a:1,https://b:2",
            "--server",
            "https://c:3",
        ])
        .expect("parses");
        let Command::Status(status) = cli.command else {
            panic!("status")
        };
        assert_eq!(status.servers.server.len(), 3);
        assert_eq!(status.servers.server_timeout, Duration::from_secs(3));
    }

    #[test]
    fn object_names_take_an_optional_kind() {
        assert_eq!(object_name("web", POD_KINDS), Ok("web"));
        assert_eq!(object_name("pod/web", POD_KINDS), Ok("web"));
        assert_eq!(object_name("Pods/web", POD_KINDS), Ok("web"));
        assert_eq!(object_name("ns/team-a", NAMESPACE_KINDS), Ok("team-a"));
        assert!(object_name("deployment/web", POD_KINDS).is_err());
        assert!(object_name("pod/", POD_KINDS).is_err());
        assert!(object_name("pod/a/b", POD_KINDS).is_err());
    }
}
