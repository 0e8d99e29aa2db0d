//! The server's Prometheus metrics and its health endpoints, on the health listener only
//! (`--health-listen`): `/live`, `/ready` (the pod and namespace caches have synced) and
//! `/metrics`. Every metric is prefixed `podiam_server_`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::events::EventCounters;
use crate::identity::IdentityCounters;
use crate::sts::StsCallCounters;
use crate::watch::{Cluster, ResourceLabels};

/// Labels of an STS call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StsLabels {
    result: &'static str,
}

/// Labels of an STS budget wait.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

/// Labels of a Kubernetes Event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    result: &'static str,
}

/// Labels of a counter by result alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    /// STS AssumeRole calls by outcome (ok, refused, unavailable, throttled).
    pub sts_calls: StsCallCounters,
    /// Kubernetes Events by outcome (sent, dropped, failed).
    pub events: EventCounters,
    /// Live pods sharing their IP with another live pod.
    pub duplicate_ip_pods: Gauge,
    /// Agents' node streams open on this replica.
    pub node_streams: Gauge,
    /// Complete (re)lists of each watched resource.
    pub relists: Family<ResourceLabels, Counter>,
    /// TLS handshakes refused (a certificate from another CA, expired…).
    pub tls_refused: Counter,
    /// gRPC calls refused because too many calls' requests were still arriving.
    pub calls_shed: Counter,
    /// Agents' calls shed for being over their node's share of the replica.
    pub agent_calls_limited: Counter,
    /// When the server's certificate in use expires (Unix seconds).
    pub tls_expiry: Gauge,
    /// 1 while the view of the cluster is stale (set at each scrape).
    pub view_stale: Gauge,
    /// TokenReviews and node-binding refusals.
    pub identity: IdentityCounters,
    /// Admission reviews the webhook answered, by result.
    pub webhook_reviews: Family<ResultLabels, Counter>,
    /// Nodes whose agent-not-ready taint this replica removed.
    pub node_taints_removed: Counter,
    /// Server replicas seen ready (the set credential keys are shared over).
    pub replicas_ready: Gauge,
    /// Credential keys live pods need, and of those, the ones this replica upkeeps.
    pub credential_keys: Gauge,
    pub credential_keys_owned: Gauge,
    /// The heap's allocated and resident bytes (jemalloc's figures, read at each scrape).
    heap_allocated: Gauge,
    heap_resident: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        let family = Family::<StsLabels, Counter>::default();
        // The counters the cache increments are the family's members. Each guard returned by
        // get_or_create must be dropped before the next call (they share one lock).
        let ok = family.get_or_create(&StsLabels { result: "ok" }).clone();
        let refused = family
            .get_or_create(&StsLabels { result: "refused" })
            .clone();
        let unavailable = family
            .get_or_create(&StsLabels {
                result: "unavailable",
            })
            .clone();
        let throttled = family
            .get_or_create(&StsLabels {
                result: "throttled",
            })
            .clone();
        let event_family = Family::<EventLabels, Counter>::default();
        let sent = event_family
            .get_or_create(&EventLabels { result: "sent" })
            .clone();
        let dropped = event_family
            .get_or_create(&EventLabels { result: "dropped" })
            .clone();
        let failed = event_family
            .get_or_create(&EventLabels { result: "failed" })
            .clone();
        let mut metrics = Metrics {
            sts_calls: StsCallCounters {
                ok,
                refused,
                unavailable,
                throttled,
                budget: crate::budget::BudgetCounters::default(),
                clock_offset: Gauge::default(),
            },
            events: EventCounters {
                sent,
                dropped,
                failed,
            },
            duplicate_ip_pods: Gauge::default(),
            node_streams: Gauge::default(),
            relists: Family::default(),
            tls_refused: Counter::default(),
            calls_shed: Counter::default(),
            agent_calls_limited: Counter::default(),
            tls_expiry: Gauge::default(),
            view_stale: Gauge::default(),
            identity: IdentityCounters::new(),
            webhook_reviews: Family::default(),
            node_taints_removed: Counter::default(),
            replicas_ready: Gauge::default(),
            credential_keys: Gauge::default(),
            credential_keys_owned: Gauge::default(),
            heap_allocated: Gauge::default(),
            heap_resident: Gauge::default(),
            registry: Registry::with_prefix("podiam_server"),
        };
        metrics.register_all(family, event_family);
        metrics.register_view();
        metrics.register_upkeep();
        metrics.register_heap();
        metrics
    }

    /// Registers the heap's figures (read at each scrape, see [`Metrics::encode`]).
    fn register_heap(&mut self) {
        self.registry.register(
            "heap_allocated_bytes",
            "Heap memory allocated and not freed (the allocator's figure)",
            self.heap_allocated.clone(),
        );
        self.registry.register(
            "heap_resident_bytes",
            "Heap memory in resident pages: allocated, plus freed pages not yet returned to \
             the kernel, the allocator's metadata and fragmentation",
            self.heap_resident.clone(),
        );
    }

    /// Registers every metric, with its help text, in the registry `/metrics` encodes; the
    /// STS and Event families are registered whole, their members being the counters above.
    fn register_all(
        &mut self,
        sts_calls: Family<StsLabels, Counter>,
        events: Family<EventLabels, Counter>,
    ) {
        let registry = &mut self.registry;
        registry.register(
            "token_reviews",
            "TokenReviews asked of the Kubernetes API (agents' tokens and operators'), by \
             result: authenticated, unauthenticated, error (the API did not answer)",
            self.identity.token_reviews.clone(),
        );
        registry.register(
            "node_binding_refusals",
            "Agent calls refused by node binding (with --node-binding warn: only counted), \
             by reason: other-node, no-token, bad-token, not-agent, no-certificate, \
             review-unavailable",
            self.identity.binding_refusals.clone(),
        );
        registry.register(
            "tls_handshakes_refused",
            "TLS handshakes refused on the gRPC port (a client certificate from another \
             CA, expired or not yet valid, or no handshake in time)",
            self.tls_refused.clone(),
        );
        registry.register(
            "grpc_calls_shed",
            "gRPC calls refused unread (RESOURCE_EXHAUSTED) because too many calls' requests \
             were still arriving: 256 of a proven agent's node or 1024 of all proven agents; \
             256 from one address or 1024 in all of anyone else",
            self.calls_shed.clone(),
        );
        registry.register(
            "agent_calls_limited",
            "Proven agents' calls refused (RESOURCE_EXHAUSTED) for being over their node's share \
             of this replica (--agent-call-rate, when set, a second after a burst of five seconds' worth)",
            self.agent_calls_limited.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the server certificate in use expires, in Unix seconds (rotated files are \
             picked up without a restart)",
            self.tls_expiry.clone(),
        );
        registry.register(
            "events",
            "Kubernetes Events about refused pods, by result (sent; dropped by the rate limit \
             or a full queue; failed at the API)",
            events,
        );
        registry.register(
            "webhook_reviews",
            "Admission reviews of pod creations the webhook answered (--webhook-listen), by \
             result: mutated (a role applies: given what it lacked), unchanged, error (not \
             answered: a malformed review, or the view not synced yet)",
            self.webhook_reviews.clone(),
        );
        registry.register(
            "node_taints_removed",
            "Nodes whose agent-not-ready taint (--agent-not-ready-taint) this replica removed, \
             once their agent reported its iptables rules in place",
            self.node_taints_removed.clone(),
        );
        registry.register(
            "sts_calls",
            "STS AssumeRole calls (attempts), by result (ok, refused, unavailable, throttled)",
            sts_calls,
        );
        registry.register(
            "sts_clock_offset_seconds",
            "This server's clock minus STS's at the last successful AssumeRole, from the answer's \
             Date (0 when under 5 s apart); credentials' expiry is judged on STS's time",
            self.sts_calls.clock_offset.clone(),
        );
    }

    /// Registers the metrics of the replica's view of the cluster and the node streams it
    /// serves from it.
    fn register_view(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "watch_relists",
            "Complete lists of a watched resource (pods, namespaces): the first sync, and every \
             relist after a watch expired (410 Gone) or the API server was unreachable",
            self.relists.clone(),
        );
        registry.register(
            "view_stale",
            "1 while a watch of the Kubernetes API has failed twice or more over 15 s with no \
             success between: the replica answers from a view that may miss revocations, and agents \
             prefer replicas whose view is current",
            self.view_stale.clone(),
        );
        registry.register(
            "duplicate_ip_pods",
            "Live pods whose IP another live pod also claims (all of them are refused)",
            self.duplicate_ip_pods.clone(),
        );
        registry.register(
            "node_streams",
            "Agents' node streams (WatchNode) open on this replica",
            self.node_streams.clone(),
        );
    }

    /// Registers the metrics of credential upkeep shared among replicas: the STS budget's
    /// waits and pauses, the replica set, the keys needed and owned.
    fn register_upkeep(&mut self) {
        let registry = &mut self.registry;
        let waits = Family::<PriorityLabels, Counter>::default();
        for priority in crate::budget::Priority::ALL {
            // The family's members are the budget's counters, as for the STS calls above.
            let member = waits
                .get_or_create(&PriorityLabels {
                    priority: priority.as_str(),
                })
                .clone();
            self.sts_calls.budget.waits[priority as usize] = member;
        }
        registry.register(
            "sts_budget_waits",
            "STS calls that waited for the --sts-rate budget, by priority (request, refresh, \
             prefetch)",
            waits,
        );
        registry.register(
            "sts_budget_pauses",
            "Pauses of prefetches and refreshes after STS throttled a call",
            self.sts_calls.budget.pauses.clone(),
        );
        registry.register(
            "replicas_ready",
            "Server replicas seen ready, over which credential keys' upkeep is shared (0: \
             this replica upkeeps every key)",
            self.replicas_ready.clone(),
        );
        registry.register(
            "credential_keys",
            "STS sessions (role, session name, tags) that live pods need, as of the last \
             credential upkeep",
            self.credential_keys.clone(),
        );
        registry.register(
            "credential_keys_owned",
            "Of those, the sessions this replica owns: it prefetches and refreshes them",
            self.credential_keys_owned.clone(),
        );
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        if let Some(heap) = crate::heap::figures() {
            self.heap_allocated
                .set(i64::try_from(heap.allocated).unwrap_or(i64::MAX));
            self.heap_resident
                .set(i64::try_from(heap.resident).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The health listener's answers. A draining server (shutting down) is not ready.
pub fn health(
    cluster: &Cluster,
    draining: bool,
    metrics: &Metrics,
    path: &str,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain";
    match path {
        "/live" => text(StatusCode::OK, "ok\n", PLAIN),
        "/ready" if draining => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
            PLAIN,
        ),
        "/ready" if cluster.synced() => text(StatusCode::OK, "ready\n", PLAIN),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: caches not synced\n",
            PLAIN,
        ),
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_calls_are_exported_by_result() {
        let metrics = Metrics::new();
        metrics.sts_calls.ok.inc();
        metrics.sts_calls.ok.inc();
        metrics.sts_calls.unavailable.inc();
        let text = metrics.encode();
        assert!(
            text.contains("podiam_server_sts_calls_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("podiam_server_sts_calls_total{result=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podiam_server_sts_calls_total{result=\"refused\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("podiam_server_sts_calls_total{result=\"throttled\"} 0"),
            "{text}"
        );
    }
}
