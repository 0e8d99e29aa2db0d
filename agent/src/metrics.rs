//! The agent's Prometheus metrics, served on the health listener's `/metrics` only.
//!
//! One registry is created in [`crate::run`] and handed down; every metric is prefixed
//! `podiam_agent_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use podiam_runtime::serve::{Closed, ConnectionObserver};

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

/// Labels of a request's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// Labels of a failed server call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerErrorLabels {
    pub kind: &'static str,
}

/// Latency buckets from 100 µs to about 1.6 s: a local answer is sub-millisecond, and SDKs
/// give the whole answer 1 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// Labels of connections the agent closed on its own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub reason: &'static str,
}

/// The `reason` label of a connection closed for `why` (the peers of the pod port are pods).
fn closed_reason(why: Closed) -> &'static str {
    match why {
        Closed::PeerLimitRefused => "pod-limit-refused",
        Closed::PeerLimitEvicted => "pod-limit-evicted",
        Closed::HeaderTimeout => "header-timeout",
        Closed::IdleTimeout => "idle-timeout",
        Closed::RequestLimit => "request-limit",
        Closed::PoolEvicted => "pool-evicted",
        Closed::PoolRefused => "pool-refused",
        Closed::NotIntercepted => "not-intercepted",
        Closed::WriteTimeout => "write-timeout",
    }
}

/// Labels of the server replicas gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub state: &'static str,
}

/// The node stream's state, kept by [`crate::servers::Servers`].
#[derive(Clone, Debug, Default)]
pub struct NodeStreamMetrics {
    pub synced: Gauge,
    pub syncs: Counter,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub server_errors: Family<ServerErrorLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub ready: Gauge,
    /// Server calls sent to a second replica (the first failed or was slow).
    pub failovers: Counter,
    /// Server replicas known, by state (ready, not_ready).
    pub replicas: Family<ReplicaLabels, Gauge>,
    /// When the agent's client certificate in use expires (Unix seconds).
    pub tls_expiry: Gauge,
    /// Pod-facing connections open.
    pub connections: Gauge,
    /// The node stream: whether one is synced now, and how many snapshots it has taken.
    pub node_stream: NodeStreamMetrics,
    /// Pod-facing connections the agent closed or refused on its own, by reason.
    pub connections_closed: Family<ClosedLabels, Counter>,
    /// Times the periodic check found the iptables rules changed and put them back.
    pub iptables_repairs: Counter,
    /// This node's pods routed through an interface no `--interface` pattern matches.
    pub pods_not_intercepted: Gauge,
    /// The request counter and latency histogram of each of [`ANSWERED_ROUTES`]' answered
    /// (200) requests, taken from their families once: a family hashes the labels and takes
    /// its lock on every lookup, and these are the series nearly every request adds to.
    answered: [std::sync::OnceLock<(Counter, Histogram)>; ANSWERED_ROUTES.len()],
    registry: Registry,
}

/// The pod-facing routes whose answered requests [`Metrics::request`] counts without a
/// lookup in the families.
const ANSWERED_ROUTES: [&str; 5] = [
    "token",
    "credentials",
    "list-roles",
    "info",
    "container-credentials",
];

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            server_errors: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            ready: Gauge::default(),
            failovers: Counter::default(),
            replicas: Family::default(),
            tls_expiry: Gauge::default(),
            connections: Gauge::default(),
            node_stream: NodeStreamMetrics::default(),
            connections_closed: Family::default(),
            iptables_repairs: Counter::default(),
            pods_not_intercepted: Gauge::default(),
            answered: Default::default(),
            registry: Registry::with_prefix("podiam_agent"),
        };
        // Every label value exported from the start (at 0), so that rates and alerts over
        // them need no `or vector(0)`.
        for kind in ["unavailable", "other"] {
            let _ = metrics
                .server_errors
                .get_or_create(&ServerErrorLabels { kind });
        }
        for why in Closed::ALL {
            let _ = metrics.connections_closed.get_or_create(&ClosedLabels {
                reason: closed_reason(why),
            });
        }
        metrics.register_pod_facing();
        metrics.register_server_side();
        metrics
    }

    /// Counts a pod-facing request to `route` answered with `status` in `seconds`.
    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        let answered = ANSWERED_ROUTES
            .iter()
            .position(|name| *name == route)
            .filter(|_| status == 200);
        if let Some(index) = answered {
            let (count, latency) = self.answered[index].get_or_init(|| {
                let labels = RequestLabels { route, status };
                (
                    self.requests.get_or_create_owned(&labels),
                    self.latency.get_or_create_owned(&RouteLabels { route }),
                )
            });
            count.inc();
            latency.observe(seconds);
            return;
        }
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    /// What pods see: requests, their latency, connections.
    fn register_pod_facing(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "requests",
            "Pod-facing requests answered, by route and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a pod-facing request, by route",
            self.latency.clone(),
        );
        registry.register(
            "connections",
            "Pod-facing connections open",
            self.connections.clone(),
        );
        registry.register(
            "connections_closed",
            "Pod-facing connections the agent closed or refused on its own, by reason \
             (pod-limit-refused, pod-limit-evicted, header-timeout, write-timeout, idle-timeout, \
             request-limit, pool-evicted, pool-refused, not-intercepted)",
            self.connections_closed.clone(),
        );
        registry.register(
            "credential_cache_hits",
            "Credential requests answered from the agent's cache, with no server call",
            self.cache_hits.clone(),
        );
        registry.register(
            "credential_cache_misses",
            "Credential requests that needed a call to the server",
            self.cache_misses.clone(),
        );
    }

    /// The agent's side of the servers: readiness, replicas, failovers, the node stream.
    fn register_server_side(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "server_errors",
            "Calls to the podiam server that failed (unavailable: no answer in time; other: an undefined error)",
            self.server_errors.clone(),
        );
        registry.register(
            "ready",
            "1 when a synced server replica answers and the agent is not stopping, else 0",
            self.ready.clone(),
        );
        registry.register(
            "server_failovers",
            "Server calls also sent to a second replica because the first failed or had not \
             answered within 300 ms",
            self.failovers.clone(),
        );
        registry.register(
            "server_replicas",
            "Server replicas known (from --server), by state: ready (synced, not draining) \
             or not_ready",
            self.replicas.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the agent's client certificate in use expires, in Unix seconds (rotated \
             files are picked up without a restart)",
            self.tls_expiry.clone(),
        );
        registry.register(
            "node_stream_synced",
            "1 while the agent follows a synced node stream from a server replica, else 0 \
             (requests are then checked with the servers one by one)",
            self.node_stream.synced.clone(),
        );
        registry.register(
            "node_stream_syncs",
            "Node stream snapshots taken: one per stream opened and synced (the first, then \
             one after each broken stream)",
            self.node_stream.syncs.clone(),
        );
        registry.register(
            "iptables_repairs",
            "Times the periodic check found the iptables rules removed or changed by someone \
             else and put them back",
            self.iptables_repairs.clone(),
        );
        registry.register(
            "pods_not_intercepted",
            "This node's pods whose route leaves through an interface no --interface pattern \
             matches: their traffic to the metadata address is not intercepted (0 on a \
             healthy node, and where the agent does not intercept)",
            self.pods_not_intercepted.clone(),
        );
    }

    /// Sets the replicas gauge from what `servers` knows now.
    pub fn observe_replicas(&self, servers: &crate::replicas::ServerSet) {
        let replicas = servers.replicas();
        let ready = replicas.iter().filter(|r| r.ready()).count();
        self.replicas
            .get_or_create(&ReplicaLabels { state: "ready" })
            .set(ready as i64);
        self.replicas
            .get_or_create(&ReplicaLabels { state: "not_ready" })
            .set((replicas.len() - ready) as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl ConnectionObserver for Metrics {
    fn opened(&self) {
        self.connections.inc();
    }

    fn ended(&self) {
        self.connections.dec();
    }

    fn closed(&self, why: Closed) {
        self.connections_closed
            .get_or_create(&ClosedLabels {
                reason: closed_reason(why),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_alike_on_either_way_to_their_series() {
        let metrics = Metrics::new();
        for (route, status) in [
            ("credentials", 200),
            ("credentials", 200),
            ("credentials", 404),
            ("denied", 404),
            ("token", 200),
        ] {
            metrics.request(route, status, 0.0004);
        }
        let text = metrics.encode();
        for (series, count) in [
            ("requests_total{route=\"credentials\",status=\"200\"}", 2),
            ("requests_total{route=\"credentials\",status=\"404\"}", 1),
            ("requests_total{route=\"denied\",status=\"404\"}", 1),
            ("requests_total{route=\"token\",status=\"200\"}", 1),
            ("request_duration_seconds_count{route=\"credentials\"}", 3),
            ("request_duration_seconds_count{route=\"denied\"}", 1),
            ("request_duration_seconds_count{route=\"token\"}", 1),
        ] {
            let line = format!("podiam_agent_{series} {count}\n");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn metrics_are_exported_with_their_labels() {
        let metrics = Metrics::new();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "credentials",
                status: 200,
            })
            .inc();
        metrics
            .latency
            .get_or_create(&RouteLabels {
                route: "credentials",
            })
            .observe(0.0004);
        let text = metrics.encode();
        assert!(
            text.contains("podiam_agent_requests_total{route=\"credentials\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podiam_agent_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("podiam_agent_ready 0"), "{text}");
        assert!(
            text.contains("podiam_agent_credential_cache_hits_total 0"),
            "{text}"
        );
        assert!(
            text.contains("podiam_agent_credential_cache_misses_total 0"),
            "{text}"
        );
        metrics.opened();
        metrics.closed(Closed::PeerLimitEvicted);
        let text = metrics.encode();
        assert!(text.contains("podiam_agent_connections 1"), "{text}");
        assert!(
            text.contains("podiam_agent_connections_closed_total{reason=\"pod-limit-evicted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podiam_agent_connections_closed_total{reason=\"header-timeout\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
