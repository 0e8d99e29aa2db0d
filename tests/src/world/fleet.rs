//! The fleet: the Kubernetes API (the emulator, the real `kubectl`), moto, and the server
//! replicas with the faults a test can inflict on them (kill, stop, pause, slow, restart).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use nix::sys::signal::Signal;
use podiam_proto::Reason;
use podiam_proto::v1::GetPodRoleRequest;
use serde_json::json;

use super::{BASE_ROLE_ARN, NamespaceSpec, START_TIMEOUT, World, binary, metric_value, path_str};
use crate::bridge::Bridge;
use crate::kube_emulator::{Kind, KubeEmulator};
use crate::moto::Moto;
use crate::process::{ChildGuard, listen_addresses, scratch_dir, wait_until};
use crate::sts_proxy::StsProxy;

/// One `podiam-server` replica: its process (none while killed), its loopback addresses,
/// and the bridge the agent's node namespace reaches it through.
#[derive(Debug)]
pub struct ServerReplica {
    pub(super) process: Option<ChildGuard>,
    /// The gRPC address (root namespace, loopback).
    pub addr: SocketAddr,
    /// The health and metrics address.
    pub health: SocketAddr,
    /// The admission webhook's address, when it serves one.
    pub webhook: Option<SocketAddr>,
    pub(super) bridge: Bridge,
    /// Logs of processes that ran before a restart.
    pub(super) earlier_logs: Vec<PathBuf>,
    /// Its name in the replica set ([`super::WorldConfig::replica_set`]).
    pub name: Option<String>,
}

impl ServerReplica {
    fn process_mut(&mut self) -> anyhow::Result<&mut ChildGuard> {
        let addr = self.addr;
        self.process
            .as_mut()
            .with_context(|| format!("the server replica at {addr} is not running"))
    }
}

impl World {
    /// The server replicas.
    pub fn replicas(&self) -> &[ServerReplica] {
        &self.servers
    }

    pub(super) fn replica(&self, i: usize) -> &ServerReplica {
        match self.servers.get(i) {
            Some(replica) => replica,
            None => panic!("the world has no server replica {i}"),
        }
    }

    pub(super) fn replica_mut(&mut self, i: usize) -> &mut ServerReplica {
        match self.servers.get_mut(i) {
            Some(replica) => replica,
            None => panic!("the world has no server replica {i}"),
        }
    }

    /// The process ID of server replica `i`, while it runs.
    pub fn server_pid(&self, i: usize) -> Option<u32> {
        self.replica(i).process.as_ref().map(ChildGuard::pid)
    }

    /// The (first) server's gRPC address (root namespace, loopback).
    pub fn server_addr(&self) -> SocketAddr {
        self.replica(0).addr
    }

    /// Waits until each server replica in `replicas` knows `pod` at each of its addresses:
    /// it answers this node's agent about them with the role or a refusal about the pod
    /// (the pod's event has reached the replica's watch). For a test whose subject is not
    /// how long a new pod's event takes to arrive, before the pod's first request.
    pub async fn wait_pod_seen(&self, pod: &str, replicas: &[usize]) -> anyhow::Result<()> {
        let token = std::fs::read_to_string(&self.agent_token_file)?;
        let addresses = self.pod(pod).addresses();
        for &i in replicas {
            let client = self
                .agent_client(self.replica(i).addr, Some(&token))
                .await?;
            for ip in &addresses {
                let request = GetPodRoleRequest {
                    ip: ip.to_string(),
                    node_name: super::NODE_NAME.into(),
                };
                let what = format!("replica {i} to see pod {pod} at {ip}");
                wait_until(START_TIMEOUT, &what, || {
                    let mut client = client.clone();
                    let request = request.clone();
                    async move {
                        // Its role, or a refusal only a pod it found gets.
                        match client.get_pod_role(request).await {
                            Ok(_) => true,
                            Err(status) => matches!(
                                Reason::of(&status),
                                Some(
                                    Reason::NoRole
                                        | Reason::RoleNotPermitted
                                        | Reason::InvalidRole
                                        | Reason::OtherNode
                                        | Reason::AmbiguousPod
                                        | Reason::TokenRequired
                                )
                            ),
                        }
                    }
                })
                .await?;
            }
        }
        Ok(())
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
    /// In a replica set, its pod then turns not Ready, as the kubelet's probe would say.
    pub async fn kill_server(&mut self, i: usize) -> anyhow::Result<()> {
        let replica = self.replica_mut(i);
        let mut process = replica.process.take().context("not running")?;
        process.signal(Signal::SIGKILL)?;
        process.wait_exit(Duration::from_secs(10)).await?;
        replica.earlier_logs.push(process.log_path().to_path_buf());
        self.replica_not_ready(i)
    }

    /// Marks replica `i`'s pod not Ready, when the replicas run as a replica set.
    fn replica_not_ready(&self, i: usize) -> anyhow::Result<()> {
        match &self.replica(i).name {
            Some(name) => set_replica_ready(&self.emulator, name, false),
            None => Ok(()),
        }
    }

    /// Stops server replica `i` with SIGTERM and waits for it to drain and exit; returns
    /// how long it took.
    pub async fn stop_server(&mut self, i: usize) -> anyhow::Result<Duration> {
        let replica = self.replica_mut(i);
        let mut process = replica.process.take().context("not running")?;
        let started = std::time::Instant::now();
        replica.earlier_logs.push(process.log_path().to_path_buf());
        process.terminate(Duration::from_secs(30)).await?;
        let took = started.elapsed();
        self.replica_not_ready(i)?;
        Ok(took)
    }

    /// Starts server replica `i` again (on new ports: its bridge, which the agent dials,
    /// follows) and waits for its first sync.
    pub async fn restart_server(&mut self, i: usize) -> anyhow::Result<()> {
        if self.replica(i).process.is_some() {
            bail!("server replica {i} is running");
        }
        let name = self.replica(i).name.clone();
        let started = start_server_at_level(
            &self.certs,
            &self.kubeconfig,
            &self.sts_endpoint,
            &replica_args(&self.server_args, name.as_deref()),
            self.log_level.as_deref(),
            START_TIMEOUT,
        )
        .await?;
        if let Some(name) = &name {
            set_replica_ready(&self.emulator, name, true)?;
        }
        let replica = self.replica_mut(i);
        replica.bridge.set_target(started.addr);
        replica.process = Some(started.process);
        replica.addr = started.addr;
        replica.health = started.health;
        replica.webhook = started.webhook;
        if let Some(webhook) = started.webhook {
            self.route_webhook(webhook);
        }
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

    /// [`World::stream_holder`], asked until a replica answers that it holds the stream
    /// (within 20 s): a metrics read that times out on a busy machine, or an agent between
    /// two streams, is not "nobody".
    pub async fn wait_stream_holder(&self) -> anyhow::Result<usize> {
        Ok(crate::process::wait_for(
            std::time::Duration::from_secs(20),
            "a replica to hold the node stream",
            || self.stream_holder(),
        )
        .await?)
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

    /// The STS proxy, when the world was started with one.
    pub fn sts_proxy(&self) -> &StsProxy {
        self.sts_proxy
            .as_ref()
            .unwrap_or_else(|| panic!("the world was started without sts_proxy"))
    }

    pub fn moto(&self) -> &Moto {
        &self.moto
    }
}

pub(super) async fn kube_client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

pub(super) async fn create_namespace(
    client: &kube::Client,
    spec: &NamespaceSpec,
) -> anyhow::Result<()> {
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

/// The name of server replica `i` in a replica set.
pub(super) fn replica_name(i: usize) -> String {
    format!("podiam-server-{i}")
}

/// The server flags of a replica named `name` (none: no replica set).
pub(super) fn replica_args(args: &[String], name: Option<&str>) -> Vec<String> {
    let mut args = args.to_vec();
    if let Some(name) = name {
        args.extend(["--replica-name", name, "--replica-namespace", "podiam"].map(String::from));
    }
    args
}

/// Creates or updates the pod of replica `name` as the Deployment's would be: Running,
/// host network, and Ready or not.
pub(super) fn set_replica_ready(
    emulator: &KubeEmulator,
    name: &str,
    ready: bool,
) -> anyhow::Result<()> {
    let condition = json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
    if emulator.get(Kind::Pod, Some("podiam"), name).is_ok() {
        emulator.merge_patch(
            Kind::Pod,
            Some("podiam"),
            name,
            json!({"status": {"conditions": condition}}),
        )?;
        return Ok(());
    }
    let mut pod = crate::kube_emulator::pod("podiam", name, "192.0.2.250", &[]);
    pod["metadata"]["labels"] = json!({
        "app.kubernetes.io/name": "podiam-server",
        "app.kubernetes.io/component": "server",
    });
    pod["spec"]["hostNetwork"] = json!(true);
    pod["spec"]["nodeName"] = json!("control-plane-1");
    pod["status"]["conditions"] = condition;
    emulator.create(pod)?;
    Ok(())
}

fn kubectl_program() -> String {
    std::env::var("PODIAM_KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
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
    let started =
        start_server_at_level(certs, kubeconfig, sts_endpoint, extra_args, None, within).await?;
    Ok((started.process, started.addr, started.health))
}

/// A server started and synced: the process and the addresses it bound.
#[derive(Debug)]
pub(super) struct Started {
    pub process: ChildGuard,
    pub addr: SocketAddr,
    pub health: SocketAddr,
    pub webhook: Option<SocketAddr>,
}

/// [`start_server_within`] with `log_level` as the server's `RUST_LOG` (see
/// [`WorldConfig::log_level`]).
pub(super) async fn start_server_at_level(
    certs: &podiam_certs::WrittenFiles,
    kubeconfig: &Path,
    sts_endpoint: &str,
    extra_args: &[String],
    log_level: Option<&str>,
    within: Duration,
) -> anyhow::Result<Started> {
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
    Ok(Started {
        process: server,
        addr,
        health,
        webhook: addresses.get("webhook-listen").copied(),
    })
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
