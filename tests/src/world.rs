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

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::bridge::Bridge;
use crate::identity;
use crate::kube_emulator::{EmulatorOptions, KubeEmulator};
use crate::moto::Moto;
use crate::netns::{self, HttpReply, Node, POD_INTERFACE_PATTERN, PodNet};
use crate::process::{ChildGuard, listen_addresses, scratch_dir, wait_until};
use crate::sts_proxy::StsProxy;

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
    /// Serve a stand-in for the node's own metadata service on 169.254.169.254 in the node.
    pub fake_node_metadata: bool,
    /// The iptables program the agent and the checks use (default `iptables`, the nft back
    /// end on Debian; `iptables-legacy` for the other).
    pub iptables_bin: Option<String>,
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
        });
        self
    }
}

/// How boto3 talks to the metadata service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boto3Mode {
    /// botocore's default: a token first, IMDSv1 if the token PUT fails.
    Default,
    /// No token is ever requested.
    V1,
    /// `AWS_EC2_METADATA_V1_DISABLED=true`: tokens only.
    V2Only,
}

impl Boto3Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Boto3Mode::Default => "default",
            Boto3Mode::V1 => "v1",
            Boto3Mode::V2Only => "v2",
        }
    }
}

/// What a client in a pod saw: its ARN, and its credentials' remaining life in seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub arn: String,
    pub remaining_secs: i64,
}

impl Identity {
    /// Parses a client's two output lines: ARN, then remaining seconds.
    fn parse(output: &str) -> Result<Identity, String> {
        let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
        let arn = lines.next().ok_or("no ARN printed")?.to_string();
        let remaining_secs = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| format!("no remaining seconds after {arn}"))?;
        Ok(Identity {
            arn,
            remaining_secs,
        })
    }
}

/// A pod of the world: its spec, its network namespace, and its bridge to moto.
#[derive(Debug)]
pub struct WorldPod {
    pub spec: PodSpec,
    // Drop order: the bridge's listener lives in the pod namespace.
    moto_bridge: Bridge,
    pub net: PodNet,
}

impl WorldPod {
    pub fn ip(&self) -> Ipv4Addr {
        self.net.ip
    }

    /// The STS endpoint as seen from inside this pod.
    pub fn sts_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_bridge.port())
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

/// One `podiam-server` replica: its process (none while killed), its loopback addresses,
/// and the bridge the agent's node namespace reaches it through.
#[derive(Debug)]
pub struct ServerReplica {
    process: Option<ChildGuard>,
    /// The gRPC address (root namespace, loopback).
    pub addr: SocketAddr,
    /// The health and metrics address.
    pub health: SocketAddr,
    bridge: Bridge,
    /// Logs of processes that ran before a restart.
    earlier_logs: Vec<PathBuf>,
}

impl ServerReplica {
    fn process_mut(&mut self) -> anyhow::Result<&mut ChildGuard> {
        let addr = self.addr;
        self.process
            .as_mut()
            .with_context(|| format!("the server replica at {addr} is not running"))
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
            let net = node.add_pod()?;
            if spec.registered {
                create_pod(&client, spec, net.ip).await?;
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
        let mut servers = Vec::new();
        for _ in 0..config.servers.max(1) {
            let (process, addr, health) = start_server_at_level(
                &certs,
                &kubeconfig,
                &sts_endpoint,
                &config.server_args,
                config.log_level.as_deref(),
                START_TIMEOUT,
            )
            .await?;
            servers.push(ServerReplica {
                process: Some(process),
                addr,
                health,
                bridge: Bridge::start(node.name(), 0, addr)?,
                earlier_logs: Vec::new(),
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
            server_args: config.server_args.clone(),
            agent_args: config.agent_args.clone(),
            iptables_bin: config
                .iptables_bin
                .clone()
                .unwrap_or_else(|| "iptables".into()),
            log_level: config.log_level.clone(),
        };
        if config.fake_node_metadata {
            world.node.serve_fake_node_metadata().await?;
        }
        if config.start_agent {
            world.start_agent().await?;
        }
        Ok(world)
    }

    /// Starts `podiam-agent serve --iptables` in the node namespace and waits until it is
    /// ready (its server answers).
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.agent = Some(self.spawn_agent()?);
        let node = self.node.netns();
        let ready = wait_until(START_TIMEOUT, "the agent to report ready", || async {
            node.http_get(
                &format!("http://127.0.0.1:{AGENT_HEALTH_PORT}/ready"),
                Duration::from_secs(1),
            )
            .await
            .is_ok_and(|reply| reply.status == 200)
        })
        .await;
        if let Err(error) = ready {
            bail!("{error}; agent log:\n{}", self.agent_log());
        }
        Ok(())
    }

    /// A new `podiam-agent serve` process in the node namespace, with every server replica.
    fn spawn_agent(&self) -> anyhow::Result<ChildGuard> {
        let mut command = self
            .node
            .netns()
            .command(binary("podiam-agent")?.to_str().context("path")?);
        command
            .arg("serve")
            .args(["--listen", &format!("0.0.0.0:{AGENT_PORT}")])
            .args(["--health-listen", &format!("127.0.0.1:{AGENT_HEALTH_PORT}")]);
        for server in &self.servers {
            command.args([
                "--server",
                &format!("https://127.0.0.1:{}", server.bridge.port()),
            ]);
        }
        command
            .args(["--server-name", "localhost"])
            .args(["--tls-ca", path_str(&self.certs.ca_cert)?])
            .args(["--tls-cert", path_str(&self.certs.agent_cert)?])
            .args(["--tls-key", path_str(&self.certs.agent_key)?])
            .args(["--node-name", NODE_NAME])
            .arg("--token-file")
            .arg(&self.agent_token_file)
            .arg("--token-key-file")
            .arg(self.agent_token_key_file())
            .arg("--iptables")
            .args(["--host-ip", &self.node.ip().to_string()])
            .args(["--interface", POD_INTERFACE_PATTERN])
            .args(["--iptables-bin", &self.iptables_bin])
            .args(&self.agent_args)
            .env("PODIAM_LOG_LEVEL", "info,podiam_agent=debug");
        if let Some(level) = &self.log_level {
            command.env("RUST_LOG", level);
        }
        Ok(ChildGuard::spawn("podiam-agent", command)?)
    }

    /// A rolling update of the agent, as a DaemonSet with maxSurge does it: a new agent
    /// starts beside the running one (both bind the pod port with SO_REUSEPORT), and once
    /// its node stream has synced the old one gets SIGTERM and must exit cleanly.
    pub async fn roll_agent(&mut self) -> anyhow::Result<()> {
        let mut old = self.agent.take().context("the agent is not running")?;
        let new = self.spawn_agent()?;
        let new_log = new.log_path().to_path_buf();
        self.agent = Some(new);
        wait_until(START_TIMEOUT, "the new agent's node stream to sync", || {
            let log = std::fs::read_to_string(&new_log).unwrap_or_default();
            async move { log.contains("node stream synced") }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; new agent's log:\n{}", self.agent_log()))?;
        self.earlier_agent_logs.push(old.log_path().to_path_buf());
        Ok(old.terminate(Duration::from_secs(15)).await?)
    }

    /// Stops the agent with SIGTERM (a plain stop: its iptables rules stay).
    pub async fn stop_agent(&mut self) -> anyhow::Result<()> {
        let mut agent = self.agent.take().context("the agent is not running")?;
        self.earlier_agent_logs.push(agent.log_path().to_path_buf());
        Ok(agent.terminate(Duration::from_secs(10)).await?)
    }

    /// Kills the agent with SIGKILL (a crash: nothing of it runs on the way out).
    pub async fn kill_agent(&mut self) -> anyhow::Result<()> {
        let mut agent = self.agent.take().context("the agent is not running")?;
        agent.signal(Signal::SIGKILL)?;
        agent.wait_exit(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// Runs the node's iptables program with `args` in the node namespace.
    pub async fn node_iptables(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self
            .node
            .netns()
            .command(&self.iptables_bin)
            .args(args)
            .output()
            .await?)
    }

    /// Runs `podiam-agent uninstall` in the node namespace (the explicit clean-up), as the
    /// uninstall DaemonSet does: the rules and the token key file.
    pub async fn uninstall_agent_rules(&self) -> anyhow::Result<Output> {
        let key_file = self.agent_token_key_file();
        let output = self
            .node
            .netns()
            .command(binary("podiam-agent")?.to_str().context("path")?)
            .arg("uninstall")
            .args(["--iptables-bin", &self.iptables_bin])
            .arg("--token-key-file")
            .arg(&key_file)
            .output()
            .await?;
        Ok(output)
    }

    /// The node namespace's nat table, as `iptables -S` prints it.
    pub async fn node_nat_rules(&self) -> anyhow::Result<String> {
        let output = self
            .node
            .netns()
            .command(&self.iptables_bin)
            .args(["-w", "-t", "nat", "-S"])
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "iptables -S failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn pod(&self, name: &str) -> &WorldPod {
        match self.pods.get(name) {
            Some(pod) => pod,
            None => panic!("the world has no pod {name:?}"),
        }
    }

    /// A command run inside `pod`'s namespace with a clean AWS environment: no credentials,
    /// no config files, so the SDKs must use the instance-metadata chain.
    pub fn pod_command(&self, pod: &str, program: &str) -> tokio::process::Command {
        let mut command = self.pod(pod).net.netns.command(program);
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            command.env_remove(var);
        }
        let home = self.dir.join("home");
        command
            .env("HOME", &home)
            .env("AWS_CONFIG_FILE", home.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("NO_PROXY", "*")
            .kill_on_drop(true);
        command
    }

    /// `aws sts get-caller-identity` in `pod`: the caller's ARN, or the CLI's error text.
    pub async fn aws_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        let output = self
            .pod_command(pod, "aws")
            .args([
                "sts",
                "get-caller-identity",
                "--query",
                "Arn",
                "--output",
                "text",
            ])
            .args(["--endpoint-url", &self.pod(pod).sts_endpoint()])
            .output()
            .await
            .context("running the AWS CLI")?;
        Ok(outcome(output))
    }

    /// boto3 in `pod` in the given mode: the caller's ARN, or the error.
    pub async fn boto3_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        Ok(self
            .boto3_identity(pod, Boto3Mode::V2Only)
            .await?
            .map(|id| id.arn))
    }

    /// boto3 in `pod`: who it is and how long its credentials have left, or the error.
    pub async fn boto3_identity(
        &self,
        pod: &str,
        mode: Boto3Mode,
    ) -> anyhow::Result<Result<Identity, String>> {
        const SCRIPT: &str = r#"
import sys, time, boto3, botocore.utils
if sys.argv[2] == "v1":
    # IMDSv1: never ask for a token, as an SDK facing an IMDSv1-only service ends up doing.
    botocore.utils.IMDSFetcher._fetch_metadata_token = lambda self: None
session = boto3.Session()
creds = session.get_credentials()
if creds is None:
    sys.exit("boto3 found no credentials")
if creds.method != "iam-role":
    sys.exit("credentials came from %s, not instance metadata" % creds.method)
remaining = int(creds._expiry_time.timestamp() - time.time())
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sts.get_caller_identity()["Arn"])
print(remaining)
"#;
        let mut command = self.pod_command(pod, "python3");
        command.args(["-c", SCRIPT, &self.pod(pod).sts_endpoint(), mode.as_arg()]);
        if mode == Boto3Mode::V2Only {
            command.env("AWS_EC2_METADATA_V1_DISABLED", "true");
        }
        let output = command.output().await.context("running boto3")?;
        Ok(outcome(output).and_then(|out| Identity::parse(&out)))
    }

    /// The Rust SDK's IMDS credentials provider in `pod`: the caller's ARN, or the error.
    pub async fn rust_sdk_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        Ok(self.rust_sdk_identity(pod).await?.map(|id| id.arn))
    }

    /// The Rust SDK in `pod`: who it is and how long its credentials have left, or the error.
    pub async fn rust_sdk_identity(&self, pod: &str) -> anyhow::Result<Result<Identity, String>> {
        let client = binary("podiam-sdk-client")?;
        let output = self
            .pod_command(pod, client.to_str().context("path")?)
            .args(["--sts-endpoint", &self.pod(pod).sts_endpoint()])
            .output()
            .await
            .context("running the Rust SDK client")?;
        Ok(outcome(output).and_then(|out| Identity::parse(&out)))
    }

    /// The agent's `/metrics` text, read inside the node namespace.
    pub async fn agent_metrics(&self) -> anyhow::Result<String> {
        let reply = self
            .node
            .netns()
            .http_get(
                &format!("http://127.0.0.1:{AGENT_HEALTH_PORT}/metrics"),
                Duration::from_secs(2),
            )
            .await?;
        if reply.status != 200 {
            bail!("/metrics answered {}", reply.status);
        }
        Ok(reply.body)
    }

    /// One HTTP request from inside `pod` to `http://169.254.169.254{path}`.
    pub async fn metadata_request(
        &self,
        pod: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        let url = format!("http://{}{path}", netns::METADATA_IP);
        Ok(self
            .pod(pod)
            .net
            .netns
            .http_request(method, &url, headers, POD_HTTP_TIMEOUT)
            .await?)
    }

    /// Creates the Pod object of `pod` (Running, with its namespace's IP).
    pub async fn register_pod(&self, pod: &str) -> anyhow::Result<()> {
        let pod = self.pod(pod);
        create_pod(&self.client, &pod.spec, pod.ip()).await
    }

    /// Deletes the Pod object of `pod` and creates it again: same name and IP, new UID
    /// (a new pod reusing the IP).
    pub async fn recreate_pod(&self, pod: &str) -> anyhow::Result<()> {
        let spec = &self.pod(pod).spec;
        Api::<Pod>::namespaced(self.client.clone(), &spec.namespace)
            .delete(&spec.name, &Default::default())
            .await
            .with_context(|| format!("deleting pod {}", spec.name))?;
        self.register_pod(pod).await
    }

    /// A gRPC client of the (first) server with the agent's certificate and token (a test
    /// acting as this world's agent).
    pub async fn server_client(&self) -> anyhow::Result<identity::Client> {
        let token = std::fs::read_to_string(&self.agent_token_file)?;
        self.agent_client(self.server_addr(), Some(&token)).await
    }

    /// A gRPC client of the server at `addr` with the agent's certificate and `token`.
    pub async fn agent_client(
        &self,
        addr: SocketAddr,
        token: Option<&str>,
    ) -> anyhow::Result<identity::Client> {
        let material = agent_material(&self.certs)?;
        let ca = std::fs::read(&self.certs.ca_cert)?;
        identity::client(addr, &ca, Some(&material), token).await
    }

    /// A gRPC client of the (first) server as an operator: no podiam key, `token` (a user's
    /// own Kubernetes token) on every call.
    pub async fn operator_client(&self, token: Option<&str>) -> anyhow::Result<identity::Client> {
        let ca = std::fs::read(&self.certs.ca_cert)?;
        identity::client(self.server_addr(), &ca, None, token).await
    }

    /// A gRPC client of the (first) server as an operator allowed everything.
    pub async fn admin_client(&self) -> anyhow::Result<identity::Client> {
        self.operator_client(Some(identity::ADMIN_TOKEN)).await
    }

    /// A kubeconfig for the user with `token` (over TLS: kubectl sends credentials to TLS
    /// servers only), written once under the world's directory.
    pub fn user_kubeconfig(&self, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!(
            "kubeconfig-{}",
            token
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(24)
                .collect::<String>()
        ));
        self.emulator.write_kubeconfig_for_token(&path, token)?;
        Ok(path)
    }

    /// A kubeconfig for an operator allowed everything, with a bearer token.
    pub fn admin_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        self.user_kubeconfig(identity::ADMIN_TOKEN)
    }

    /// The node's IMDSv2 token keys, shared by every agent of the world as the DaemonSet's
    /// node directory shares them.
    pub fn agent_token_key_file(&self) -> PathBuf {
        self.dir
            .join("node-1-var-lib-podiam")
            .join("imds-token-keys")
    }

    /// The agent's token file (what the kubelet keeps current).
    pub fn agent_token_file(&self) -> &Path {
        &self.agent_token_file
    }

    /// The (first) server's `/metrics` text.
    pub async fn server_metrics(&self) -> anyhow::Result<String> {
        self.server_metrics_of(0).await
    }

    /// Server replica `i`'s `/metrics` text (an error after 2 s: a stopped replica).
    pub async fn server_metrics_of(&self, i: usize) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.replica(i).health);
        tokio::time::timeout(Duration::from_secs(2), http_get_text(&url))
            .await
            .with_context(|| format!("{url} did not answer"))?
    }

    /// The (first) server's whole log so far.
    pub fn server_log_text(&self) -> String {
        self.server_log_text_of(0)
    }

    /// Server replica `i`'s whole log so far, across restarts.
    pub fn server_log_text_of(&self, i: usize) -> String {
        let replica = self.replica(i);
        replica
            .earlier_logs
            .iter()
            .map(PathBuf::as_path)
            .chain(replica.process.as_ref().map(ChildGuard::log_path))
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect()
    }

    /// The server replicas.
    pub fn replicas(&self) -> &[ServerReplica] {
        &self.servers
    }

    fn replica(&self, i: usize) -> &ServerReplica {
        match self.servers.get(i) {
            Some(replica) => replica,
            None => panic!("the world has no server replica {i}"),
        }
    }

    fn replica_mut(&mut self, i: usize) -> &mut ServerReplica {
        match self.servers.get_mut(i) {
            Some(replica) => replica,
            None => panic!("the world has no server replica {i}"),
        }
    }

    /// Sends `signal` to server replica `i` (SIGSTOP / SIGCONT: a replica that hangs).
    pub fn signal_server(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        Ok(self.replica_mut(i).process_mut()?.signal(signal)?)
    }

    /// Slows server replica `i` as the agent sees it: everything it sends the node arrives
    /// `latency` later (zero: back to normal). Its health answers then miss the agent's
    /// deadline while it keeps working, heartbeats included.
    pub fn slow_server(&self, i: usize, latency: Duration) {
        self.replica(i).bridge.set_latency(latency);
    }

    /// Kills server replica `i` (SIGKILL: a crash, nothing of it runs on the way out).
    pub async fn kill_server(&mut self, i: usize) -> anyhow::Result<()> {
        let replica = self.replica_mut(i);
        let mut process = replica.process.take().context("not running")?;
        process.signal(Signal::SIGKILL)?;
        process.wait_exit(Duration::from_secs(10)).await?;
        replica.earlier_logs.push(process.log_path().to_path_buf());
        Ok(())
    }

    /// Stops server replica `i` with SIGTERM and waits for it to drain and exit; returns
    /// how long it took.
    pub async fn stop_server(&mut self, i: usize) -> anyhow::Result<Duration> {
        let replica = self.replica_mut(i);
        let mut process = replica.process.take().context("not running")?;
        let started = std::time::Instant::now();
        replica.earlier_logs.push(process.log_path().to_path_buf());
        process.terminate(Duration::from_secs(30)).await?;
        Ok(started.elapsed())
    }

    /// Starts server replica `i` again (on new ports: its bridge, which the agent dials,
    /// follows) and waits for its first sync.
    pub async fn restart_server(&mut self, i: usize) -> anyhow::Result<()> {
        if self.replica(i).process.is_some() {
            bail!("server replica {i} is running");
        }
        let (process, addr, health) = start_server_at_level(
            &self.certs,
            &self.kubeconfig,
            &self.sts_endpoint,
            &self.server_args,
            self.log_level.as_deref(),
            START_TIMEOUT,
        )
        .await?;
        let replica = self.replica_mut(i);
        replica.bridge.set_target(addr);
        replica.process = Some(process);
        replica.addr = addr;
        replica.health = health;
        Ok(())
    }

    /// Which server replica holds the agent's node stream (by its node-stream gauge).
    pub async fn stream_holder(&self) -> Option<usize> {
        for i in 0..self.servers.len() {
            if self.servers[i].process.is_none() {
                continue;
            }
            if let Ok(metrics) = self.server_metrics_of(i).await
                && metric_value(&metrics, "podiam_server_node_streams") > 0
            {
                return Some(i);
            }
        }
        None
    }

    /// The real `kubectl`, against the emulator.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let output = tokio::process::Command::new(kubectl_program())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", self.dir.join("home"))
            .kill_on_drop(true)
            .output()
            .await
            .context("running kubectl")?;
        Ok(output)
    }

    /// Like [`World::kubectl`], failing with kubectl's stderr unless it succeeds.
    pub async fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.kubectl(args).await?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn kube_client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn emulator(&self) -> &KubeEmulator {
        &self.emulator
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The STS proxy, when the world was started with one.
    pub fn sts_proxy(&self) -> &StsProxy {
        self.sts_proxy
            .as_ref()
            .unwrap_or_else(|| panic!("the world was started without sts_proxy"))
    }

    pub fn moto(&self) -> &Moto {
        &self.moto
    }

    pub fn certs(&self) -> &podiam_certs::WrittenFiles {
        &self.certs
    }

    /// The (first) server's gRPC address (root namespace, loopback).
    pub fn server_addr(&self) -> SocketAddr {
        self.replica(0).addr
    }

    /// The kubeconfig pointing at the emulator.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A scratch directory owned by this world.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's recent log lines (for failure messages).
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map_or_else(|| "(agent not running)".to_string(), |a| a.log_tail(60))
    }

    /// Every agent's whole log so far, oldest first.
    pub fn agent_log_text(&self) -> String {
        self.earlier_agent_logs
            .iter()
            .map(PathBuf::as_path)
            .chain(self.agent.as_ref().map(ChildGuard::log_path))
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect()
    }

    /// The (first) server's recent log lines (for failure messages).
    pub fn server_log(&self) -> String {
        self.replica(0)
            .process
            .as_ref()
            .map_or_else(|| "(server not running)".to_string(), |s| s.log_tail(60))
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

/// GETs a URL from this (root) namespace — loopback only — and returns the body of a 2xx.
pub async fn http_get_text(url: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(url.parse::<http::Uri>()?).await?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The value of one sample in a Prometheus text exposition, named with its labels exactly
/// as exported (`podiam_server_sts_calls_total{result="ok"}`). 0 when the metric is declared
/// (`# TYPE`) but has no sample with these labels yet (a counter not yet counted); panics
/// when the metric is not in the exposition at all (renamed, or never registered), so that
/// an "is 0" assertion cannot pass on a metric that does not exist.
pub fn metric_value(exposition: &str, sample: &str) -> u64 {
    let prefix = format!("{sample} ");
    if let Some(value) = exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
    {
        return value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("sample {sample} is not a whole number: {value:?}"));
    }
    let name = sample.split('{').next().unwrap_or(sample);
    let family = ["_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    let declared = exposition.lines().any(|line| {
        line.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|declared| declared == name || declared == family)
    });
    assert!(
        declared,
        "no metric {name} in the exposition (renamed?); it has:\n{}",
        exposition
            .lines()
            .filter(|line| line.starts_with("# TYPE "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    0
}

fn kubectl_program() -> String {
    std::env::var("PODIAM_KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A client's outcome: its trimmed stdout on success, its stderr (and stdout) otherwise.
fn outcome(output: Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{} {stdout}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

async fn kube_client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn create_namespace(client: &kube::Client, spec: &NamespaceSpec) -> anyhow::Result<()> {
    let mut annotations = serde_json::Map::new();
    if let Some(permitted) = &spec.permitted {
        annotations.insert("iam.amazonaws.com/permitted".into(), json!(permitted));
    }
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": spec.name, "annotations": annotations },
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {}", spec.name))?;
    Ok(())
}

/// Creates a Running pod on [`NODE_NAME`] with `ip` as its `status.podIP`.
pub async fn create_pod(client: &kube::Client, spec: &PodSpec, ip: Ipv4Addr) -> anyhow::Result<()> {
    let mut annotations = serde_json::Map::new();
    if let Some(role) = &spec.role {
        annotations.insert("iam.amazonaws.com/role".into(), json!(role));
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": spec.name, "namespace": spec.namespace, "annotations": annotations },
        "spec": {
            "nodeName": NODE_NAME,
            "containers": [{ "name": "app", "image": "example.invalid/app:1" }],
        },
    }))?;
    let api = Api::<Pod>::namespaced(client.clone(), &spec.namespace);
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {}/{}", spec.namespace, spec.name))?;
    let status = json!({ "status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{ "ip": ip.to_string() }],
        "hostIP": "10.77.255.1",
        "conditions": [{ "type": "Ready", "status": "True" }],
        "containerStatuses": [{
            "name": "app", "ready": true, "restartCount": 0, "started": true,
            "image": "example.invalid/app:1", "imageID": "",
            "state": { "running": {} },
        }],
    }});
    api.patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting pod {}/{}'s status", spec.namespace, spec.name))?;
    Ok(())
}

/// Starts `podiam-server` (gRPC and health on loopback ports the kernel picks, which it
/// writes to its `--listen-address-file`) and waits up to `within` for its first sync: the
/// server, its gRPC address and its health address.
pub async fn start_server_within(
    certs: &podiam_certs::WrittenFiles,
    kubeconfig: &Path,
    sts_endpoint: &str,
    extra_args: &[String],
    within: Duration,
) -> anyhow::Result<(ChildGuard, SocketAddr, SocketAddr)> {
    start_server_at_level(certs, kubeconfig, sts_endpoint, extra_args, None, within).await
}

/// [`start_server_within`] with `log_level` as the server's `RUST_LOG` (see
/// [`WorldConfig::log_level`]).
async fn start_server_at_level(
    certs: &podiam_certs::WrittenFiles,
    kubeconfig: &Path,
    sts_endpoint: &str,
    extra_args: &[String],
    log_level: Option<&str>,
    within: Duration,
) -> anyhow::Result<(ChildGuard, SocketAddr, SocketAddr)> {
    let (mut server, address_file) =
        spawn_server_at_level(certs, kubeconfig, sts_endpoint, extra_args, log_level)?;
    let addresses = listen_addresses(&mut server, &address_file, within)
        .await
        .map_err(|error| anyhow::anyhow!("{error}; server log:\n{}", server.log_tail(40)))?;
    let (Some(&addr), Some(&health)) = (addresses.get("listen"), addresses.get("health-listen"))
    else {
        bail!(
            "{} names no listen and health-listen addresses",
            address_file.display()
        );
    };
    let material = agent_material(certs)?;
    let synced = wait_until(within, "podiam-server to sync", || {
        let material = material.clone();
        async move { health_synced(addr, &material).await }
    })
    .await;
    if let Err(error) = synced {
        bail!("{error}; server log:\n{}", server.log_tail(40));
    }
    Ok((server, addr, health))
}

/// The agent's TLS files, read: what a test acting as an agent dials the server with.
pub fn agent_material(
    certs: &podiam_certs::WrittenFiles,
) -> anyhow::Result<podiam_runtime::tls::TlsMaterial> {
    Ok(podiam_runtime::tls::TlsFiles {
        ca: certs.ca_cert.clone(),
        cert: certs.agent_cert.clone(),
        key: certs.agent_key.clone(),
    }
    .load()?)
}

/// Spawns `podiam-server` on loopback ports the kernel picks, with the world's certificates,
/// kubeconfig and STS endpoint; does not wait for it. Returns the server and the file it
/// writes its addresses to once bound (see [`listen_addresses`]).
pub fn spawn_server(
    certs: &podiam_certs::WrittenFiles,
    kubeconfig: &Path,
    sts_endpoint: &str,
    extra_args: &[String],
) -> anyhow::Result<(ChildGuard, PathBuf)> {
    spawn_server_at_level(certs, kubeconfig, sts_endpoint, extra_args, None)
}

/// [`spawn_server`] with `log_level` as the server's `RUST_LOG` (see
/// [`WorldConfig::log_level`]).
fn spawn_server_at_level(
    certs: &podiam_certs::WrittenFiles,
    kubeconfig: &Path,
    sts_endpoint: &str,
    extra_args: &[String],
    log_level: Option<&str>,
) -> anyhow::Result<(ChildGuard, PathBuf)> {
    let address_file = scratch_dir("server")?.join("addresses");
    let mut command = tokio::process::Command::new(binary("podiam-server")?);
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--health-listen", "127.0.0.1:0"])
        .arg("--listen-address-file")
        .arg(&address_file)
        .args(["--tls-ca", path_str(&certs.ca_cert)?])
        .args(["--tls-cert", path_str(&certs.server_cert)?])
        .args(["--tls-key", path_str(&certs.server_key)?])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--base-role-arn", BASE_ROLE_ARN])
        .args(["--sts-endpoint", sts_endpoint])
        .args(["--region", "us-east-1"])
        .args(extra_args)
        .envs(Moto::client_env())
        .env(
            "PODIAM_LOG_LEVEL",
            "info,podiam_server=debug,podiam_proto=debug,podiam_runtime=debug",
        );
    if let Some(level) = log_level {
        command.env("RUST_LOG", level);
    }
    Ok((ChildGuard::spawn("podiam-server", command)?, address_file))
}

/// Whether the server at `addr` answers Health with synced caches, over mutual TLS.
pub async fn health_synced(addr: SocketAddr, material: &podiam_runtime::tls::TlsMaterial) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("https://{addr}")) else {
        return false;
    };
    let Ok(endpoint) = endpoint.tls_config(material.client_config("localhost")) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = podiam_proto::v1::podiam_client::PodiamClient::new(channel);
    client
        .health(podiam_proto::v1::HealthRequest {})
        .await
        .is_ok_and(|r| r.get_ref().synced)
}

#[cfg(test)]
mod metric_value_tests {
    use super::metric_value;

    const EXPOSITION: &str = "# HELP x_calls Calls.\n# TYPE x_calls counter\n\
        x_calls_total{result=\"ok\"} 3\n# TYPE x_streams gauge\nx_streams 2\n# EOF\n";

    #[test]
    fn a_sample_is_read_and_a_declared_one_without_it_is_zero() {
        assert_eq!(metric_value(EXPOSITION, r#"x_calls_total{result="ok"}"#), 3);
        assert_eq!(metric_value(EXPOSITION, "x_streams"), 2);
        assert_eq!(
            metric_value(EXPOSITION, r#"x_calls_total{result="error"}"#),
            0
        );
    }

    #[test]
    #[should_panic(expected = "no metric x_renamed")]
    fn a_metric_not_in_the_exposition_fails_loudly() {
        metric_value(EXPOSITION, "x_renamed");
    }
}
