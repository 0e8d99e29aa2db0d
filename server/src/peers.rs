//! The replicas this one shares the cluster's credential keys with, and which keys are its.
//!
//! Each replica watches the server pods (its own namespace, `--peer-selector`) and takes the
//! ready ones — Ready condition true, not being deleted — as the replica set: the set the
//! headless Service's DNS gives agents, who check each replica's health themselves. A key is
//! this replica's when rendezvous hashing (`podiam_proto::owner`) over the ready replicas'
//! names picks its own name. Only the owner prefetches and refreshes a key, so a cluster of
//! any number of replicas makes one STS call per key per session; a replica coming or going
//! moves only its own share.
//!
//! Without a name (`--replica-name`, the pod's name) or with no ready replica seen, a
//! replica owns every key: what one replica alone, or a replica whose API view is not there
//! yet, must do. Ownership only decides upkeep: a replica asked for a key it does not own
//! fetches it once, so no pod ever fails because of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::watch::WatchBackoff;

/// Where the replica set comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSource {
    /// This replica's name (its pod's): `None` owns every key.
    pub me: Option<String>,
    /// The server pods' namespace and label selector.
    pub namespace: String,
    pub selector: String,
}

/// The ready replicas, as this replica last saw them, and which keys are its own.
#[derive(Clone, Debug)]
pub struct Peers {
    me: Option<Arc<str>>,
    ready: tokio::sync::watch::Receiver<Arc<Vec<String>>>,
}

impl Peers {
    /// A replica alone (or without a name): every key is its own.
    pub fn alone() -> Peers {
        Peers {
            me: None,
            ready: tokio::sync::watch::channel(Arc::new(Vec::new())).1,
        }
    }

    /// This replica's name, given to agents in Health answers.
    pub fn me(&self) -> Option<&str> {
        self.me.as_deref()
    }

    /// Whether the key with `digest` is this replica's to prefetch and refresh.
    pub fn owns(&self, digest: u64) -> bool {
        let Some(me) = self.me.as_deref() else {
            return true;
        };
        let ready = self.ready.borrow();
        if ready.is_empty() {
            return true;
        }
        podiam_proto::owner::owner(digest, ready.iter().map(String::as_str)) == Some(me)
    }

    /// The ready replicas' names, sorted.
    pub fn ready(&self) -> Arc<Vec<String>> {
        Arc::clone(&self.ready.borrow())
    }

    /// A receiver that wakes when the replica set changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Vec<String>>> {
        self.ready.clone()
    }
}

/// What keeps a [`Peers`] view current: [`Follower::run`].
pub struct Follower {
    api: Api<Pod>,
    config: watcher::Config,
    tx: tokio::sync::watch::Sender<Arc<Vec<String>>>,
    gauge: Gauge,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

/// The [`Peers`] view of `source`'s server pods, and what keeps it current (watching with
/// `config`, setting `gauge` to the number of ready replicas).
pub fn follow(
    client: kube::Client,
    source: &PeerSource,
    config: watcher::Config,
    gauge: Gauge,
) -> (Peers, Follower) {
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let peers = Peers {
        me: source.me.as_deref().map(Arc::from),
        ready: rx,
    };
    let follower = Follower {
        api: Api::namespaced(client, &source.namespace),
        config: config.labels(&source.selector),
        tx,
        gauge,
    };
    (peers, follower)
}

impl Follower {
    /// Watches the server pods until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Follower {
            api,
            config,
            tx,
            gauge,
        } = self;
        let stream = watcher::watcher(api, config).backoff(WatchBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut known: BTreeMap<String, bool> = BTreeMap::new();
        let mut relist: Option<BTreeMap<String, bool>> = None;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = stream.try_next() => event,
            };
            match event {
                Ok(Some(Event::Init)) => relist = Some(BTreeMap::new()),
                Ok(Some(Event::InitApply(pod))) => {
                    if let (Some(fresh), Some(name)) = (relist.as_mut(), pod.metadata.name.clone())
                    {
                        fresh.insert(name, ready(&pod));
                    }
                }
                Ok(Some(Event::InitDone)) => {
                    if let Some(fresh) = relist.take() {
                        known = fresh;
                    }
                }
                Ok(Some(Event::Apply(pod))) => {
                    if let Some(name) = pod.metadata.name.clone() {
                        known.insert(name, ready(&pod));
                    }
                }
                Ok(Some(Event::Delete(pod))) => {
                    if let Some(name) = &pod.metadata.name {
                        known.remove(name);
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "watching the server replicas failed; retrying");
                    continue;
                }
            }
            if relist.is_some() {
                continue;
            }
            let now: Vec<String> = known
                .iter()
                .filter(|(_, ready)| **ready)
                .map(|(name, _)| name.clone())
                .collect();
            if **tx.borrow() != now {
                tracing::info!(replicas = ?now, "the ready server replicas changed");
                gauge.set(now.len() as i64);
                tx.send_replace(Arc::new(now));
            }
        }
    }
}

/// Whether a server pod counts as a ready replica: Ready, and not being deleted (a replica
/// draining turns not ready at once, but its pod's condition follows only at the next
/// probe).
fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(me: Option<&str>, ready: &[&str]) -> Peers {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(
            ready.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ));
        std::mem::forget(tx);
        Peers {
            me: me.map(Arc::from),
            ready: rx,
        }
    }

    #[test]
    fn each_key_has_exactly_one_owner_among_the_ready_replicas() {
        let names = ["s-0", "s-1", "s-2"];
        let replicas: Vec<Peers> = names.iter().map(|n| peers(Some(n), &names)).collect();
        for key in 0..3_000u64 {
            let owners = replicas.iter().filter(|p| p.owns(key)).count();
            assert_eq!(owners, 1, "key {key}");
        }
    }

    #[test]
    fn without_a_name_or_a_replica_set_a_replica_owns_everything() {
        assert!((0..100).all(|k| peers(None, &["s-0", "s-1"]).owns(k)));
        assert!((0..100).all(|k| peers(Some("s-0"), &[]).owns(k)));
        assert!((0..100).all(|k| Peers::alone().owns(k)));
    }

    #[test]
    fn a_replica_not_yet_ready_owns_nothing() {
        let starting = peers(Some("s-3"), &["s-0", "s-1"]);
        assert!((0..1_000).all(|k| !starting.owns(k)));
    }

    #[test]
    fn readiness_is_the_ready_condition_of_a_pod_not_being_deleted() {
        let pod = |condition: &str, deleting: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "s-0",
                    "deletionTimestamp": deleting.then_some("2026-01-01T00:00:00Z"),
                },
                "status": {"conditions": [{"type": "Ready", "status": condition}]},
            }))
            .expect("a pod")
        };
        assert!(ready(&pod("True", false)));
        assert!(!ready(&pod("False", false)));
        assert!(!ready(&pod("True", true)));
        assert!(!ready(
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).expect("a pod")
        ));
    }
}
