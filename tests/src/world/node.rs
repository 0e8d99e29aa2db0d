//! The node and its pods: the agent in the node namespace (start, roll, stop, crash,
//! uninstall, its iptables rules), pods as network namespaces and their Pod objects.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use serde_json::json;

use super::{
    AGENT_HEALTH_PORT, AGENT_PORT, NODE_NAME, PodSpec, START_TIMEOUT, World, binary, path_str,
};
use crate::bridge::Bridge;
use crate::kube_emulator::{self, Kind};
use crate::netns::{Family, Node, PodNet};
use crate::process::{ChildGuard, wait_until};

/// A pod of the world: its spec, its network namespace, and its bridge to moto.
#[derive(Debug)]
pub struct WorldPod {
    pub spec: PodSpec,
    // Drop order: the bridge's listener lives in the pod namespace.
    pub(super) moto_bridge: Bridge,
    pub net: PodNet,
}

impl WorldPod {
    pub fn ip(&self) -> Ipv4Addr {
        self.net.ip
    }

    /// The pod's addresses as its `status.podIPs` lists them: IPv4 first when it has one.
    pub fn addresses(&self) -> Vec<IpAddr> {
        addresses_of(self.spec.family, &self.net)
    }

    /// The STS endpoint as seen from inside this pod.
    pub fn sts_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_bridge.port())
    }
}

impl World {
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

    /// Runs `podiam-agent serve` as [`World::start_agent`] does, for an agent that cannot
    /// start: waits for it to exit and returns its exit status and its log.
    pub async fn run_failing_agent(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let mut agent = self.spawn_agent()?;
        let status = agent.wait_exit(timeout).await?;
        Ok((status, agent.log_tail(40)))
    }

    /// A new `podiam-agent serve` process in the node namespace, with every server replica.
    fn spawn_agent(&self) -> anyhow::Result<ChildGuard> {
        let mut command = match &self.agent_image {
            None => self
                .node
                .netns()
                .command(binary("podiam-agent")?.to_str().context("path")?),
            Some(image) => self.agent_container(image)?,
        };
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
            .args(["--host-ipv6", &self.node.ip6().to_string()])
            .args(["--interface", &self.interface])
            .args(["--iptables-bin", &self.iptables_bin])
            .args(&self.agent_args)
            .env("PODIAM_LOG_LEVEL", "info,podiam_agent=debug");
        if let Some(level) = &self.log_level {
            command.env("RUST_LOG", level);
        }
        Ok(ChildGuard::spawn("podiam-agent", command)?)
    }

    /// `podman run` of the agent `image` in the node's network namespace, as deploy/ runs it:
    /// root with only NET_ADMIN and NET_BIND_SERVICE (and NET_RAW for the legacy back end),
    /// a read-only root with a tmpfs on /run (the xtables lock), no new privileges. The
    /// world's directory is mounted at its own path, so the agent's flags name the same
    /// files. Its iptables is the image's own.
    fn agent_container(&self, image: &str) -> anyhow::Result<tokio::process::Command> {
        let mut command = tokio::process::Command::new("podman");
        let dir = path_str(&self.dir)?;
        let mut caps = "NET_ADMIN,NET_BIND_SERVICE".to_string();
        if self.iptables_bin.contains("legacy") {
            caps.push_str(",NET_RAW");
        }
        command
            .env(
                "CONTAINERS_CONF",
                crate::process::repo_root().join("scripts/containers.conf"),
            )
            .args(["run", "--rm", "--name", &self.agent_container_name()])
            .arg(format!("--network=ns:/run/netns/{}", self.node.name()))
            .args(["--cap-drop=all", &format!("--cap-add={caps}")])
            .args([
                "--read-only",
                "--tmpfs=/run",
                "--security-opt=no-new-privileges",
            ])
            .args(["--user=0:0", "-v", &format!("{dir}:{dir}")])
            .args(["-e", "PODIAM_LOG_LEVEL=info,podiam_agent=debug"])
            .arg(image);
        Ok(command)
    }

    /// The name of the agent's container when it runs from an image (one per world).
    fn agent_container_name(&self) -> String {
        let id: String = self
            .dir
            .to_string_lossy()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        format!("podiam-test-agent-{}", &id[id.len().saturating_sub(24)..])
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

    /// The agent's `--interface` from its next start on (rules of the one before stay
    /// until uninstalled).
    pub fn set_agent_interface(&mut self, pattern: &str) {
        self.interface = pattern.to_string();
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

    /// [`World::uninstall_agent_rules`], which must succeed (its stderr in the error), then
    /// the node's nat table as it leaves it.
    pub async fn uninstall_and_read_rules(&self) -> anyhow::Result<String> {
        let out = self.uninstall_agent_rules().await?;
        if !out.status.success() {
            bail!(
                "podiam-agent uninstall failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.node_nat_rules().await
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

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The running agent's process id (for a benchmark's CPU and memory figures, or a
    /// profiler), when it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(ChildGuard::pid)
    }

    pub fn pod(&self, name: &str) -> &WorldPod {
        match self.pods.get(name) {
            Some(pod) => pod,
            None => panic!("the world has no pod {name:?}"),
        }
    }

    /// Creates the Pod object of `pod` (Running, with its namespace's IP).
    pub async fn register_pod(&self, pod: &str) -> anyhow::Result<()> {
        let pod = self.pod(pod);
        create_pod(&self.client, &pod.spec, &pod.addresses()).await
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

    /// A projected ServiceAccount token of the Pod object `namespace/name` as the kubelet
    /// gets one: for its service account (`default` when it names none, created if the
    /// namespace lacks it, as the API's controller would have), audience `audience`, bound
    /// to the pod's name and current UID, expiring in `life`.
    pub fn mint_pod_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        life: Duration,
    ) -> anyhow::Result<String> {
        let emulator = self.emulator();
        let pod = emulator
            .get(Kind::Pod, Some(namespace), name)
            .with_context(|| format!("pod {namespace}/{name}"))?;
        let account = pod["spec"]["serviceAccountName"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        if emulator
            .get(Kind::ServiceAccount, Some(namespace), &account)
            .is_err()
        {
            emulator.create(kube_emulator::service_account(namespace, &account))?;
        }
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        Ok(emulator.mint_token(
            namespace,
            &account,
            &[audience],
            SystemTime::now() + life,
            Some((name, uid)),
        )?)
    }
}

/// The audience of pods' tokens for the container-credentials endpoint (the server's
/// default `--pod-token-audience`).
pub const POD_TOKEN_AUDIENCE: &str = "podiam";

/// How long a pod token a test mints lives: the kubelet's default for projected tokens.
pub const POD_TOKEN_LIFE: Duration = Duration::from_secs(3600);

/// The addresses of a pod of `family` on `net`, as its `status.podIPs` lists them: IPv4
/// first when it has one.
pub(super) fn addresses_of(family: Family, net: &PodNet) -> Vec<IpAddr> {
    let v4 = (family != Family::V6).then_some(IpAddr::V4(net.ip));
    v4.into_iter().chain(net.ip6.map(IpAddr::V6)).collect()
}

/// Creates a Running pod on [`NODE_NAME`] with `addresses` as its `status.podIPs` (the
/// first is its `status.podIP`).
pub async fn create_pod(
    client: &kube::Client,
    spec: &PodSpec,
    addresses: &[IpAddr],
) -> anyhow::Result<()> {
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
            "serviceAccountName": spec.service_account,
            "containers": [{ "name": "app", "image": "example.invalid/app:1" }],
        },
    }))?;
    let api = Api::<Pod>::namespaced(client.clone(), &spec.namespace);
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {}/{}", spec.namespace, spec.name))?;
    let ip = addresses.first().context("a pod needs an address")?;
    let pod_ips: Vec<serde_json::Value> = addresses
        .iter()
        .map(|ip| json!({ "ip": ip.to_string() }))
        .collect();
    let status = json!({ "status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": pod_ips,
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
