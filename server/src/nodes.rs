//! The agent-not-ready taint: fail closed from a node's first boot.
//!
//! Until a node's agent has installed its iptables rules, a pod on the node reaches the
//! node's own metadata service. Nodes therefore register with a `NoExecute` taint
//! (`podiam.io/agent-not-ready` by default, set by the node's own configuration: kubelet
//! `--register-with-taints`), which the agent tolerates and other pods do not: the kubelet
//! refuses a pod that does not tolerate it even when the pod names the node itself. Every
//! taint with the key is removed, whatever its effect (nodes registered with `NoSchedule`). Once an
//! agent has its rules in place it says so (`NodeReady`); the server checks that the
//! agent's token proves that node and removes the taint. Agents need no permission on Node
//! objects: only the servers may patch them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio::time::Instant;

/// How many times a removal is retried when the node changed between read and write.
const CONFLICT_RETRIES: usize = 5;

/// How long a node's report, once handled, answers a repeated one from memory (no API
/// call). Short, so that a taint put back on the node (by hand, or a Node object registered
/// again under the same name) is lifted at the agent's next report after it.
pub const REPORT_REMEMBERED: Duration = Duration::from_secs(10);

/// How many nodes' reports are remembered before the old ones are forgotten.
const REPORTS_KEPT: usize = 16_384;

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
    /// Reports under way and handled lately, by node: each node's agent costs the API at
    /// most one read (and patch) a [`REPORT_REMEMBERED`], however often it reports.
    pub reports: Arc<Reports>,
}

/// The reports of nodes under way or handled lately.
#[derive(Debug, Default)]
pub struct Reports {
    nodes: Mutex<HashMap<String, Report>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    UnderWay,
    Handled(Instant),
}

/// What to do with a report.
#[derive(Debug, PartialEq, Eq)]
enum Begin {
    /// Handle it (its task ends it).
    Go,
    /// Handled lately: nothing to do.
    Remembered,
    /// Another call handles it now.
    UnderWay,
}

impl Reports {
    fn begin(&self, node: &str, now: Instant) -> Begin {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        match nodes.get(node) {
            Some(Report::UnderWay) => return Begin::UnderWay,
            Some(Report::Handled(at)) if now.duration_since(*at) < REPORT_REMEMBERED => {
                return Begin::Remembered;
            }
            _ => {}
        }
        if nodes.len() >= REPORTS_KEPT {
            nodes.retain(|_, report| match report {
                Report::UnderWay => true,
                Report::Handled(at) => now.duration_since(*at) < REPORT_REMEMBERED,
            });
        }
        nodes.insert(node.to_string(), Report::UnderWay);
        Begin::Go
    }

    /// Ends `node`'s report: remembered when `handled`, else forgotten (the next one is
    /// handled again).
    fn end(&self, node: &str, handled: Option<Instant>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        match handled {
            Some(at) => nodes.insert(node.to_string(), Report::Handled(at)),
            None => nodes.remove(node),
        };
    }
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
    /// A readiness with the taint `taint` (none: nothing is removed), removed through
    /// `nodes`, counted in `removed`.
    pub fn new(
        taint: Option<String>,
        nodes: Option<Arc<dyn NodeTaints>>,
        removed: Counter,
    ) -> NodeReadiness {
        NodeReadiness {
            taint,
            nodes,
            removed,
            reports: Arc::default(),
        }
    }

    /// Removes the taint from `node` (already proven to be the caller's): whether it was there.
    /// A report repeated within [`REPORT_REMEMBERED`] of one handled is answered `false` with
    /// no API call, and one made while another is under way is refused (ask again). The
    /// removal runs on a task of its own, so that a caller who gives up half-way (and asks
    /// again) does not cut it short and start another: it ends, and is remembered.
    pub async fn ready(&self, node: &str) -> Result<bool, String> {
        let (Some(key), Some(nodes)) = (&self.taint, &self.nodes) else {
            return Ok(false);
        };
        match self.reports.begin(node, Instant::now()) {
            Begin::Go => {}
            Begin::Remembered => return Ok(false),
            Begin::UnderWay => {
                return Err(format!("a report of node {node} is under way; ask again"));
            }
        }
        let removal = {
            let (nodes, reports) = (Arc::clone(nodes), Arc::clone(&self.reports));
            let (node, key, counter) = (node.to_string(), key.clone(), self.removed.clone());
            tokio::spawn(async move {
                let removed = nodes.remove(&node, &key).await;
                reports.end(&node, removed.is_ok().then(Instant::now));
                if removed == Ok(true) {
                    counter.inc();
                    tracing::info!(node = %node, taint = %key, "agent's rules in place: node untainted");
                }
                removed
            })
        };
        match removal.await {
            Ok(removed) => removed,
            Err(error) => {
                self.reports.end(node, None);
                Err(format!("removing the taint from node {node}: {error}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Nodes whose taint is always there: each removal takes 50 ms and is counted; fails
    /// while `failing`.
    #[derive(Default)]
    struct Tainted {
        calls: AtomicUsize,
        failing: AtomicBool,
    }

    impl NodeTaints for Tainted {
        fn remove<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.failing.load(Ordering::SeqCst) {
                    return Err("the API is away".into());
                }
                Ok(true)
            })
        }
    }

    fn readiness() -> (NodeReadiness, Arc<Tainted>) {
        let nodes = Arc::new(Tainted::default());
        let readiness = NodeReadiness::new(
            Some("podiam.io/agent-not-ready".into()),
            Some(Arc::clone(&nodes) as Arc<dyn NodeTaints>),
            Counter::default(),
        );
        (readiness, nodes)
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_reporting_without_pause_costs_one_api_call_a_window() {
        let (readiness, nodes) = readiness();
        let calls = || nodes.calls.load(Ordering::SeqCst);
        let results = futures::future::join_all((0..100).map(|_| readiness.ready("node-1"))).await;
        assert_eq!(calls(), 1);
        assert_eq!(results.iter().filter(|r| **r == Ok(true)).count(), 1);
        assert!(
            results
                .iter()
                .filter(|r| r.is_err())
                .all(|r| r.as_ref().is_err_and(|e| e.contains("under way"))),
            "{results:?}"
        );
        // Handled: answered from memory, with no call, until the window has passed.
        for _ in 0..100 {
            assert_eq!(readiness.ready("node-1").await, Ok(false));
        }
        assert_eq!(calls(), 1);
        // Another node is its own.
        assert_eq!(readiness.ready("node-2").await, Ok(true));
        assert_eq!(calls(), 2);
        tokio::time::sleep(REPORT_REMEMBERED).await;
        assert_eq!(readiness.ready("node-1").await, Ok(true));
        assert_eq!(calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_that_failed_is_not_remembered_and_one_given_up_still_counts() {
        let (readiness, nodes) = readiness();
        let calls = || nodes.calls.load(Ordering::SeqCst);
        nodes.failing.store(true, Ordering::SeqCst);
        assert!(readiness.ready("node-1").await.is_err());
        nodes.failing.store(false, Ordering::SeqCst);
        assert_eq!(readiness.ready("node-1").await, Ok(true));
        assert_eq!(calls(), 2);
        // Callers that give up half-way (their clients gone), again and again, do not make a
        // removal each: the first runs to its end and is remembered.
        tokio::time::sleep(REPORT_REMEMBERED).await;
        for _ in 0..10 {
            let given_up =
                tokio::time::timeout(Duration::from_millis(10), readiness.ready("node-1")).await;
            assert!(matches!(given_up, Err(_) | Ok(Err(_))), "{given_up:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(readiness.ready("node-1").await, Ok(false));
        assert_eq!(calls(), 3);
        // Both removals counted, the one nobody waited for too.
        assert_eq!(readiness.removed.get(), 2);
    }
}
