//! Identities in the test world, as a real cluster has them: agent pods with projected
//! ServiceAccount tokens (minted by the emulator's TokenRequest, bound to the agent's pod),
//! and operators with bearer tokens of their own, with or without RBAC.
//!
//! Also the gRPC clients a test uses to act as an agent (client certificate + token) or as
//! an operator (token only, no podiam key).

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use podiam_proto::v1::podiam_client::PodiamClient;
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::kube_emulator::KubeEmulator;

/// The namespace podiam runs in.
pub const PODIAM_NAMESPACE: &str = "podiam";
/// The ServiceAccount agents run as (the server's default `--agent-service-account`).
pub const AGENT_SERVICE_ACCOUNT: &str = "podiam-agent";
/// The audience of agents' tokens (the server's default `--agent-token-audience`).
pub const AGENT_AUDIENCE: &str = "podiam";
/// How long minted agent tokens last: longer than any test.
pub const AGENT_TOKEN_LIFE: Duration = Duration::from_secs(3600);
/// An operator who may do anything (group `system:masters`).
pub const ADMIN_TOKEN: &str = "podiam-test-admin-token";

/// Puts a bearer token (or nothing) on every call. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.0.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        f.debug_tuple("Bearer").field(&shown).finish()
    }
}

impl Bearer {
    pub fn new(token: Option<&str>) -> Bearer {
        Bearer(token.and_then(|t| {
            let mut value: MetadataValue<Ascii> = format!("Bearer {t}").parse().ok()?;
            value.set_sensitive(true);
            Some(value)
        }))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A gRPC client of a podiam server that sends a bearer token.
pub type Client = PodiamClient<InterceptedService<Channel, Bearer>>;

/// A client of the server at `addr`: with the agent's certificate when `agent_material` is
/// given (an agent), with CA verification only otherwise (an operator), and `token` on
/// every call.
pub async fn client(
    addr: std::net::SocketAddr,
    ca: &[u8],
    agent_material: Option<&podiam_runtime::tls::TlsMaterial>,
    token: Option<&str>,
) -> anyhow::Result<Client> {
    client_from(addr, None, ca, agent_material, token).await
}

/// [`client`], connecting from `local` (a loopback address of its own: a server takes at
/// most 64 connections from one address, and many simulated agents are more).
pub async fn client_from(
    addr: std::net::SocketAddr,
    local: Option<std::net::IpAddr>,
    ca: &[u8],
    agent_material: Option<&podiam_runtime::tls::TlsMaterial>,
    token: Option<&str>,
) -> anyhow::Result<Client> {
    let tls = match agent_material {
        Some(material) => material.client_config("localhost"),
        None => ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost"),
    };
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .local_address(local)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(PodiamClient::with_interceptor(channel, Bearer::new(token)))
}

/// The name of the agent pod on `node`.
pub fn agent_pod_name(node: &str) -> String {
    format!("podiam-agent-{node}")
}

/// A Running host-network agent pod on `node`, as the DaemonSet makes it.
fn agent_pod(node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": agent_pod_name(node),
            "namespace": PODIAM_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "podiam-agent"},
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "serviceAccountName": AGENT_SERVICE_ACCOUNT,
            "containers": [{"name": "agent", "image": "registry.invalid/podiam-agent:test"}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.77.255.1",
            "podIPs": [{"ip": "10.77.255.1"}],
            "hostIP": "10.77.255.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

/// Creates podiam's namespace and the agents' ServiceAccount (once per emulator).
pub fn install_podiam_identity(emulator: &KubeEmulator) -> anyhow::Result<()> {
    if emulator
        .get(
            crate::kube_emulator::Kind::Namespace,
            None,
            PODIAM_NAMESPACE,
        )
        .is_err()
    {
        emulator.create(crate::kube_emulator::namespace(PODIAM_NAMESPACE, &[]))?;
    }
    emulator.create(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": AGENT_SERVICE_ACCOUNT, "namespace": PODIAM_NAMESPACE},
    }))?;
    emulator.add_user_token(ADMIN_TOKEN, "test-admin", &["system:masters"]);
    Ok(())
}

/// An agent on `node`: its pod (created if missing) and a token bound to it, valid for
/// `audience` until `expires_at`. Returns the token and the pod's UID.
pub fn agent_token(
    emulator: &KubeEmulator,
    node: &str,
    audience: &str,
    expires_at: SystemTime,
) -> anyhow::Result<(String, String)> {
    let name = agent_pod_name(node);
    let pod = match emulator.get(
        crate::kube_emulator::Kind::Pod,
        Some(PODIAM_NAMESPACE),
        &name,
    ) {
        Ok(pod) => pod,
        Err(_) => emulator.create(agent_pod(node))?,
    };
    let uid = pod["metadata"]["uid"]
        .as_str()
        .context("the agent pod has no uid")?
        .to_string();
    let token = emulator.mint_token(
        PODIAM_NAMESPACE,
        AGENT_SERVICE_ACCOUNT,
        &[audience],
        expires_at,
        Some((&name, &uid)),
    )?;
    Ok((token, uid))
}

/// Writes a fresh token of the agent on `node` to `path` (as the kubelet does), readable by
/// the agent alone.
pub fn write_agent_token(emulator: &KubeEmulator, node: &str, path: &Path) -> anyhow::Result<()> {
    let (token, _) = agent_token(
        emulator,
        node,
        AGENT_AUDIENCE,
        SystemTime::now() + AGENT_TOKEN_LIFE,
    )?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Gives `user` the `podiam-operator` ClusterRole (get and list pods, namespaces and
/// ServiceAccounts): in
/// `namespace` through a RoleBinding, or cluster-wide through a ClusterRoleBinding.
pub fn grant_operator(
    emulator: &KubeEmulator,
    user: &str,
    namespace: Option<&str>,
) -> anyhow::Result<()> {
    if emulator
        .get(
            crate::kube_emulator::Kind::ClusterRole,
            None,
            "podiam-operator",
        )
        .is_err()
    {
        emulator.create(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "podiam-operator"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces", "serviceaccounts"],
                       "verbs": ["get", "list"]}],
        }))?;
    }
    let role_ref = json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                          "name": "podiam-operator"});
    let subjects = json!([{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]);
    let binding = match namespace {
        Some(namespace) => json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{user}-operates"), "namespace": namespace},
            "roleRef": role_ref, "subjects": subjects,
        }),
        None => json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{user}-operates")},
            "roleRef": role_ref, "subjects": subjects,
        }),
    };
    emulator.create(binding)?;
    Ok(())
}
