//! The agent-not-ready taint: fail closed from a node's first boot.
//!
//! Until a node's agent has installed its iptables rules, a pod on the node reaches the
//! node's own metadata service. Nodes therefore register with a `NoSchedule` taint
//! (`podiam.io/agent-not-ready` by default, set by the node's own configuration: kubelet
//! `--register-with-taints`), which the agent tolerates and other pods do not. Once an
//! agent has its rules in place it says so (`NodeReady`); the server checks that the
//! agent's token proves that node and removes the taint. Agents need no permission on Node
//! objects: only the servers may patch them.

use std::fmt;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;

/// How many times a removal is retried when the node changed between read and write.
const CONFLICT_RETRIES: usize = 5;

/// Removes a taint from a node.
pub trait NodeTaints: Send + Sync + 'static {
    /// Removes every taint with `key` from `node`; `Ok(true)` if there was one.
    fn remove<'a>(&'a self, node: &'a str, key: &'a str) -> BoxFuture<'a, Result<bool, String>>;
}

/// [`NodeTaints`] through the Kubernetes API: read the node, then a merge patch of its
/// taints that carries the resourceVersion read, so that a concurrent change (the kubelet,
/// another replica) makes it fail with a conflict and it is read again.
#[derive(Clone)]
pub struct KubeNodeTaints {
    client: kube::Client,
}

impl fmt::Debug for KubeNodeTaints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeNodeTaints").finish_non_exhaustive()
    }
}

impl KubeNodeTaints {
    pub fn new(client: kube::Client) -> KubeNodeTaints {
        KubeNodeTaints { client }
    }
}

impl NodeTaints for KubeNodeTaints {
    fn remove<'a>(&'a self, node: &'a str, key: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let api = Api::<Node>::all(self.client.clone());
            for _ in 0..CONFLICT_RETRIES {
                let current = api
                    .get(node)
                    .await
                    .map_err(|e| format!("reading node {node}: {e}"))?;
                let taints = current
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default();
                if !taints.iter().any(|t| t.key == key) {
                    return Ok(false);
                }
                let kept: Vec<_> = taints.into_iter().filter(|t| t.key != key).collect();
                let patch = json!({
                    "metadata": { "resourceVersion": current.metadata.resource_version },
                    "spec": { "taints": if kept.is_empty() { json!(null) } else { json!(kept) } },
                });
                match api
                    .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => return Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => {
                        return Err(format!("removing the taint {key} from node {node}: {e}"));
                    }
                }
            }
            Err(format!(
                "removing the taint {key} from node {node}: it kept changing ({CONFLICT_RETRIES} conflicts)"
            ))
        })
    }
}

/// What the server does with agents' `NodeReady` reports.
#[derive(Clone)]
pub struct NodeReadiness {
    /// The taint's key; `None`: reports are answered and nothing is removed.
    pub taint: Option<String>,
    pub nodes: Option<std::sync::Arc<dyn NodeTaints>>,
    /// Taints removed (exported as `podiam_server_node_taints_removed_total`).
    pub removed: Counter,
}

impl fmt::Debug for NodeReadiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeReadiness")
            .field("taint", &self.taint)
            .field("api", &self.nodes.is_some())
            .finish_non_exhaustive()
    }
}

impl NodeReadiness {
    /// Removes the taint from `node` (already proven to be the caller's): whether it was there.
    pub async fn ready(&self, node: &str) -> Result<bool, String> {
        let (Some(key), Some(nodes)) = (&self.taint, &self.nodes) else {
            return Ok(false);
        };
        let removed = nodes.remove(node, key).await?;
        if removed {
            self.removed.inc();
            tracing::info!(node = %node, taint = %key, "agent's rules in place: node untainted");
        }
        Ok(removed)
    }
}
