//! A whole podiam installation on this machine, for the end-to-end tests and the demo.
//!
//! [`World::start`] brings up, in order: certificates; the Kubernetes API emulator with the
//! namespaces and pods asked for; moto as STS; `podiam-server` (root namespace, loopback);
//! a node namespace with one pod namespace per pod (each pod's IP is its `status.podIP`);
//! and, unless told not to, `podiam-agent serve --iptables` inside the node namespace.
//!
//! Two kinds of loopback bridge stand in for the cluster network: node → server (the agent's
//! gRPC) and pod → moto (so the AWS CLI in a pod can call STS with what it was given).
//!
//! Everything is torn down when the `World` drops — processes first, then namespaces (and
//! with them every veth and iptables rule) — whether the test passed or panicked.
//!
//! In parts: [`fleet`] (the API emulator, `kubectl`, moto, the server replicas and their
//! faults), [`node`] (the agent, the node's rules, pods), [`clients`] (SDKs and the CLI in a
//! pod, gRPC clients, kubeconfigs) and [`observe`] (metrics and logs).

mod clients;
mod fleet;
mod node;
mod observe;
mod pod_identity;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bridge::Bridge;
use crate::identity;
use crate::kube_emulator::{EmulatorOptions, KubeEmulator};
use crate::moto::Moto;
use crate::netns::{self, Node};
use crate::process::{ChildGuard, scratch_dir};
use crate::sts_proxy::StsProxy;

pub use clients::{Boto3Mode, GoSdk, Identity, Via, go_client};
pub use fleet::{ServerReplica, agent_material, health_synced, spawn_server, start_server_within};
use fleet::{create_namespace, kube_client, start_server_at_level};
pub use node::{POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE, WorldPod, create_pod};
pub use observe::{http_get_text, metric_value};
pub use pod_identity::ContainerSetup;

/// Role names are placed under this base ARN (moto's account).
pub const BASE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/";

/// The node name the pods are scheduled on and the agent reports.
pub const NODE_NAME: &str = "node-1";

/// The agent's pod-facing port inside the node namespace.
pub const AGENT_PORT: u16 = 8181;

/// The agent's health port inside the node namespace.
pub const AGENT_HEALTH_PORT: u16 = 8182;

/// How long start-up steps may take before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for one in-pod HTTP request (the SDKs' own budget is 1 s per attempt).
pub const POD_HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// A namespace to create: name and optional `iam.amazonaws.com/permitted` regex.
#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    pub name: String,
    pub permitted: Option<String>,
}

/// A pod to create: its Kubernetes name and namespace, and optional role annotation.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub role: Option<String>,
    /// Create the Pod object at start (otherwise only its network namespace exists until
    /// [`World::register_pod`]: the start-up race, where a pod talks before the API knows
    /// its IP).
    pub registered: bool,
    /// `spec.serviceAccountName` (none: the namespace's `default`).
    pub service_account: Option<String>,
    /// Its address families (`status.podIPs` says the same).
    pub family: netns::Family,
}

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct WorldConfig {
    pub namespaces: Vec<NamespaceSpec>,
    pub pods: Vec<PodSpec>,
    /// Start the agent in [`World::start`] (otherwise call [`World::start_agent`]).
    pub start_agent: bool,
    /// Extra `podiam-agent serve` flags (e.g. `--require-token`).
    pub agent_args: Vec<String>,
    /// Extra `podiam-server` flags (e.g. `--session-tags`).
    pub server_args: Vec<String>,
    /// Server replicas to run (0 means 1); the agent is given every one of them.
    pub servers: usize,
    /// Put a recording, fault-injecting [`StsProxy`] between the server and moto.
    pub sts_proxy: bool,
    /// Run the servers as the Deployment's replicas do: replica `i` is named
    /// `podiam-server-i` (POD_NAME) and has a pod in namespace `podiam` labelled
    /// `app.kubernetes.io/name=podiam-server`, Ready from its first sync on and not Ready
    /// once killed or stopped (what the kubelet's readiness probe reports). The replicas then
    /// share credential keys' upkeep. Otherwise each replica upkeeps every key.
    pub replica_set: bool,
    /// Serve a stand-in for the node's own metadata service on 169.254.169.254 in the node.
    pub fake_node_metadata: bool,
    /// The servers' admission webhook, configured as deploy/components/pod-identity and
    /// `podiam-certs --webhook-ca-patch` configure it, every namespace opted in: registered
    /// pods are created once it is (see [`World::configure_pod_identity`]).
    pub pod_identity: bool,
    /// The iptables program the agent and the checks use (default `iptables`, the nft back
    /// end on Debian; `iptables-legacy` for the other).
    pub iptables_bin: Option<String>,
    /// The agent's `--interface` (default: [`netns::POD_INTERFACE_PATTERN`], every pod veth).
    pub interface: Option<String>,
    /// Run the agent from this container image with podman (scripts/images), instead of the
    /// binary: its own iptables, root with NET_ADMIN only, a read-only root filesystem.
    pub agent_image: Option<String>,
    /// The log filter of the agent and of every server replica (`trace`, or any `RUST_LOG`
    /// directive), given to them as `RUST_LOG` so that it also wins over the test runner's
    /// own; otherwise the harness's levels (info, podiam's crates at debug).
    pub log_level: Option<String>,
}

impl WorldConfig {
    pub fn namespace(mut self, name: &str, permitted: Option<&str>) -> Self {
        self.namespaces.push(NamespaceSpec {
            name: name.into(),
            permitted: permitted.map(Into::into),
        });
        self
    }

    pub fn pod(mut self, namespace: &str, name: &str, role: Option<&str>) -> Self {
        self.pods.push(PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            role: role.map(Into::into),
            registered: true,
            service_account: None,
            family: netns::Family::V4,
        });
        self
    }

    /// A pod with `role` whose addresses are of `family` (an IPv6-only or dual-stack pod).
    pub fn pod_of(
        mut self,
        family: netns::Family,
        namespace: &str,
        name: &str,
        role: Option<&str>,
    ) -> Self {
        self = self.pod(namespace, name, role);
        if let Some(spec) = self.pods.last_mut() {
            spec.family = family;
        }
        self
    }

    /// A pod without a role annotation of its own that runs as ServiceAccount `account`.
    pub fn pod_as(mut self, namespace: &str, name: &str, account: &str) -> Self {
        self.pods.push(PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            role: None,
            registered: true,
            service_account: Some(account.into()),
            family: netns::Family::V4,
        });
        self
    }

    /// A pod whose network exists but whose Pod object is created later, by
    /// [`World::register_pod`].
    pub fn unregistered_pod(mut self, namespace: &str, name: &str, role: Option<&str>) -> Self {
        self.pods.push(PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            role: role.map(Into::into),
            registered: false,
            service_account: None,
            family: netns::Family::V4,
        });
        self
    }
}

/// A running podiam installation. Field order is teardown order.
pub struct World {
    agent: Option<ChildGuard>,
    /// Agents that ran before (their logs, for failure messages).
    earlier_agent_logs: Vec<PathBuf>,
    servers: Vec<ServerReplica>,
    pods: BTreeMap<String, WorldPod>,
    node: Node,
    sts_proxy: Option<StsProxy>,
    moto: Moto,
    emulator: KubeEmulator,
    client: kube::Client,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// The agent's projected token, as the kubelet writes it.
    agent_token_file: PathBuf,
    certs: podiam_certs::WrittenFiles,
    sts_endpoint: String,
    server_args: Vec<String>,
    agent_args: Vec<String>,
    /// The agent's `--interface`.
    interface: String,
    /// The agent's image, when it runs from one.
    agent_image: Option<String>,
    iptables_bin: String,
    log_level: Option<String>,
}

impl World {
    /// Builds the world described by `config`. Needs root.
    pub async fn start(config: WorldConfig) -> anyhow::Result<World> {
        netns::require_root();
        podiam_runtime::tls::install_crypto_provider();
        netns::sweep_stale().context("sweeping namespaces left by crashed runs")?;
        let dir = scratch_dir("world")?;

        let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())?
            .write_to(&dir.join("certs"), false)?;

        let emulator = KubeEmulator::start("127.0.0.1:0".parse()?, EmulatorOptions::default())
            .await
            .context("starting the Kubernetes API emulator")?;
        let kubeconfig = dir.join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig)?;
        let client = kube_client(&kubeconfig).await?;
        for ns in &config.namespaces {
            create_namespace(&client, ns).await?;
        }
        // The agent's identity, as the DaemonSet gives it: its pod on the node and a
        // projected token bound to that pod.
        identity::install_podiam_identity(&emulator)?;
        let agent_token_file = dir.join("agent-token");
        identity::write_agent_token(&emulator, NODE_NAME, &agent_token_file)?;

        let moto = Moto::start().await.context("starting moto")?;
        let node = Node::create()?;
        let mut pods = BTreeMap::new();
        for spec in &config.pods {
            let net = node.add_pod_with(spec.family)?;
            // With the webhook, pods are created once it is configured (below).
            if spec.registered && !config.pod_identity {
                let pod_ips = node::addresses_of(spec.family, &net);
                create_pod(&client, spec, &pod_ips).await?;
            }
            let moto_bridge = Bridge::start(net.netns.name(), 0, moto.addr())?;
            pods.insert(
                spec.name.clone(),
                WorldPod {
                    spec: spec.clone(),
                    moto_bridge,
                    net,
                },
            );
        }

        let sts_proxy = if config.sts_proxy {
            Some(StsProxy::start(moto.addr()).await?)
        } else {
            None
        };
        let sts_endpoint = sts_proxy
            .as_ref()
            .map_or_else(|| moto.endpoint(), StsProxy::endpoint);
        let mut server_args = config.server_args.clone();
        if config.pod_identity {
            server_args.extend(["--webhook-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        let mut servers = Vec::new();
        for i in 0..config.servers.max(1) {
            let name = config.replica_set.then(|| fleet::replica_name(i));
            let started = start_server_at_level(
                &certs,
                &kubeconfig,
                &sts_endpoint,
                &fleet::replica_args(&server_args, name.as_deref()),
                config.log_level.as_deref(),
                START_TIMEOUT,
            )
            .await?;
            if let Some(name) = &name {
                fleet::set_replica_ready(&emulator, name, true)?;
            }
            servers.push(ServerReplica {
                process: Some(started.process),
                addr: started.addr,
                health: started.health,
                webhook: started.webhook,
                bridge: Bridge::start(node.name(), 0, started.addr)?,
                earlier_logs: Vec::new(),
                name,
            });
        }
        let mut world = World {
            agent: None,
            earlier_agent_logs: Vec::new(),
            servers,
            pods,
            node,
            sts_proxy,
            moto,
            emulator,
            client,
            dir,
            kubeconfig,
            agent_token_file,
            certs,
            sts_endpoint,
            server_args,
            agent_args: config.agent_args.clone(),
            agent_image: config.agent_image.clone(),
            interface: config
                .interface
                .clone()
                .unwrap_or_else(|| netns::POD_INTERFACE_PATTERN.to_string()),
            iptables_bin: config
                .iptables_bin
                .clone()
                .unwrap_or_else(|| "iptables".into()),
            log_level: config.log_level.clone(),
        };
        if config.pod_identity {
            world.configure_pod_identity(&config).await?;
        }
        if config.fake_node_metadata {
            world.node.serve_fake_node_metadata().await?;
        }
        if config.start_agent {
            world.start_agent().await?;
        }
        Ok(world)
    }

    pub fn certs(&self) -> &podiam_certs::WrittenFiles {
        &self.certs
    }

    /// The kubeconfig pointing at the emulator.
    /// The STS endpoint the servers call (moto, or the recording proxy before it).
    pub fn sts_endpoint(&self) -> &str {
        &self.sts_endpoint
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A scratch directory owned by this world.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("dir", &self.dir)
            .field(
                "servers",
                &self.servers.iter().map(|s| s.addr).collect::<Vec<_>>(),
            )
            .field("node", &self.node.name())
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .field("agent_running", &self.agent.is_some())
            .finish_non_exhaustive()
    }
}

/// The directory holding the project's built binaries (`target/debug`): `PODIAM_BIN_DIR`,
/// else derived from the running executable (a test in `target/debug/deps`, or a binary in
/// `target/debug`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PODIAM_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("finding the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of one of the project's binaries, checked to exist.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
