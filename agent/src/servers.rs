//! The agent's side of the gRPC contract: calls to the servers (through the failover of
//! [`crate::replicas`]), the node stream, and the readiness they imply. Answers leave here
//! in the agent's own types ([`crate::decision`]).
//!
//! Connections are made lazily, so an unreachable server never stops the agent from
//! starting: it serves (answering 503), reports not-ready, and keeps retrying.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podiam_proto::Reason;
use podiam_proto::v1::{
    Credentials, GetCredentialsRequest, GetPodRoleRequest, NodeEvent, NodeReadyRequest,
    WatchNodeRequest, node_event,
};
use podiam_runtime::telemetry::Escaped;
use tokio_util::sync::CancellationToken;

use crate::cache::CredentialCache;
use crate::decision::{PodDecision, Refusal, Role, ServerError};
use crate::metrics::NodeStreamMetrics;
use crate::pods::PodTable;
use crate::replicas::{HEALTH_INTERVAL, Replica, ServerSet};

/// Wait before re-opening a node stream that failed twice in a row (the first retry, on
/// another replica, is immediate); doubles up to the maximum.
const STREAM_RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between attempts to re-open the node stream.
const STREAM_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest wait between NodeReady reports that found no replica to accept them.
const NODE_READY_RETRY_MAX: Duration = Duration::from_secs(30);
/// A stream that carried heartbeats and then is silent this long is broken: three of the
/// server's heartbeats (one a second) missed.
const STREAM_SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// Health checks of the stream's replica that must fail in a row, while another replica's
/// pass, before the stream moves: one late answer on a busy machine is not enough.
const LEAVE_AFTER_CHECKS: u32 = 2;

/// Credentials the servers issued, and the pod they issued them for.
pub struct Issued {
    /// The UID of the pod the servers found at the address.
    pub pod_uid: String,
    pub credentials: Credentials,
    /// The STS session they are of (0: a server that did not say).
    pub credential_key: u64,
}

impl std::fmt::Debug for Issued {
    /// Written by hand, with the key id and the expiry only (the credentials' own `Debug`
    /// redacts their secrets too; this one does not depend on it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("pod_uid", &self.pod_uid)
            .field("access_key_id", &self.credentials.access_key_id)
            .field("expiration_unix", &self.credentials.expiration_unix)
            .finish_non_exhaustive()
    }
}

/// The podiam servers as this agent talks to them: every call goes through the
/// [`ServerSet`]'s failover.
#[derive(Debug)]
pub struct Servers {
    replicas: Arc<ServerSet>,
    node_name: String,
    /// Set when the agent is shutting down: it reports not ready from then on.
    stopping: AtomicBool,
    /// Set while the servers refuse this agent's identity (its token): it reports not
    /// ready, since every pod would be refused.
    refused_identity: AtomicBool,
    /// The replica whose node stream is synced now: calls go there first.
    stream_replica: Mutex<Option<SocketAddr>>,
    stream_metrics: NodeStreamMetrics,
}

impl Servers {
    pub fn new(
        replicas: Arc<ServerSet>,
        node_name: String,
        stream_metrics: NodeStreamMetrics,
    ) -> Servers {
        Servers {
            replicas,
            node_name,
            stopping: AtomicBool::new(false),
            refused_identity: AtomicBool::new(false),
            stream_replica: Mutex::new(None),
            stream_metrics,
        }
    }

    fn stream_replica(&self) -> Option<SocketAddr> {
        *self
            .stream_replica
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The replica whose stream has just synced (`None`: the stream broke).
    fn set_stream_replica(&self, replica: Option<SocketAddr>) {
        *self
            .stream_replica
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = replica;
        self.stream_metrics.synced.set(i64::from(replica.is_some()));
        if replica.is_some() {
            self.stream_metrics.syncs.inc();
        }
    }

    /// The replicas and their failover.
    pub fn replicas(&self) -> &ServerSet {
        &self.replicas
    }

    /// The role of the pod at `ip`, as the servers decide it now, and the UID of that pod
    /// (empty if a server did not say).
    pub async fn pod_role(&self, ip: IpAddr) -> Result<(Role, String), ServerError> {
        let request = GetPodRoleRequest {
            ip: ip.to_string(),
            node_name: self.node_name.clone(),
        };
        let answer = self
            .replicas
            .call(self.stream_replica(), |mut client| {
                let request = request.clone();
                async move { client.get_pod_role(request).await }
            })
            .await?;
        let role = Role {
            name: answer.role_name,
            arn: answer.role_arn,
            credential_key: 0,
        };
        Ok((role, answer.pod.map(|p| p.uid).unwrap_or_default()))
    }

    /// Credentials for the pod at `ip`, if `role_name` is its role (empty with a
    /// `pod_token`: whatever its role is). A non-empty `pod_token` is the pod's own token,
    /// which must prove the pod at `ip` too. The call goes first to the ready replica that
    /// owns `credential_key` (the one that keeps those credentials; 0: unknown), else to the
    /// replica this node's stream comes from.
    pub async fn credentials(
        &self,
        ip: IpAddr,
        role_name: &str,
        pod_token: &str,
        credential_key: u64,
    ) -> Result<Issued, ServerError> {
        let request = GetCredentialsRequest {
            ip: ip.to_string(),
            role_name: role_name.to_string(),
            node_name: self.node_name.clone(),
            pod_token: pod_token.to_string(),
        };
        let answer = self
            .replicas
            .call_owner_first(credential_key, self.stream_replica(), |mut client| {
                let request = request.clone();
                async move { client.get_credentials(request).await }
            })
            .await?;
        let credentials = answer
            .credentials
            .ok_or_else(|| ServerError::Other("answer without credentials".into()))?;
        Ok(Issued {
            pod_uid: answer.pod.map(|p| p.uid).unwrap_or_default(),
            credentials,
            credential_key: answer.credential_key,
        })
    }

    /// Tells a server replica that this node's interception rules are in place, so that it
    /// lifts the node's agent-not-ready taint: whether there was one.
    pub async fn node_ready(&self) -> Result<bool, ServerError> {
        let request = NodeReadyRequest {
            node_name: self.node_name.clone(),
        };
        let answer = self
            .replicas
            .call(self.stream_replica(), |mut client| {
                let request = request.clone();
                async move { client.node_ready(request).await }
            })
            .await?;
        Ok(answer.taint_removed)
    }

    /// Reports the node ready ([`Servers::node_ready`]) until a replica accepts it, retrying
    /// with backoff while none can (not reachable yet, or refusing this agent's token for
    /// now); gives up at `shutdown`.
    pub async fn report_node_ready(&self, shutdown: CancellationToken) {
        let mut retry = STREAM_RETRY_MIN;
        loop {
            match self.node_ready().await {
                Ok(taint_removed) => {
                    tracing::info!(taint_removed, "reported this node's rules in place");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry, "could not report this node's rules in place");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).clamp(STREAM_RETRY_MIN, NODE_READY_RETRY_MAX);
        }
    }

    /// The node this agent serves.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Ready: some server replica is ready, the servers accept this agent's token, and the
    /// agent is not shutting down.
    pub fn ready(&self) -> bool {
        !self.stopping.load(Ordering::Acquire)
            && !self.refused_identity.load(Ordering::Acquire)
            && self.replicas.any_ready()
    }

    /// The agent is shutting down: report not ready from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

impl Servers {
    /// Follows a server replica's stream of this node's pods into `table` until `shutdown`,
    /// dropping cached credentials of every pod whose decision changes. A broken stream —
    /// ended, failed, or silent for [`STREAM_SILENCE_LIMIT`] after heartbeats were seen —
    /// marks the table unsynced (requests then ask the servers directly) and is re-opened on
    /// another replica at once, then with backoff; each new stream starts with a full
    /// snapshot that replaces the table.
    pub async fn follow_node(
        &self,
        table: &PodTable,
        cache: &CredentialCache,
        shutdown: CancellationToken,
    ) {
        let mut retry = Duration::ZERO;
        let mut last: Option<SocketAddr> = None;
        loop {
            // Another replica than the one whose stream just broke, if there is one.
            let picked = self
                .replicas
                .pick(last)
                .or_else(|| self.replicas.pick(None));
            let Some(replica) = picked else {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(STREAM_RETRY_MIN) => {}
                }
                continue;
            };
            last = Some(replica.addr);
            let ended = self.follow_replica(&replica, table, cache, &shutdown).await;
            if let StreamEnded::Synced(_) = &ended {
                retry = Duration::ZERO;
            }
            if !self.judge(&replica, &ended) {
                return;
            }
            table.unsync();
            if !retry.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
            }
            retry = (retry * 2).clamp(STREAM_RETRY_MIN, STREAM_RETRY_MAX);
        }
    }

    /// Opens `replica`'s node stream and follows it into `table` until it ends.
    async fn follow_replica(
        &self,
        replica: &Replica,
        table: &PodTable,
        cache: &CredentialCache,
        shutdown: &CancellationToken,
    ) -> StreamEnded {
        let request = WatchNodeRequest {
            node_name: self.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let mut client = replica.client();
        let opened = tokio::select! {
            () = shutdown.cancelled() => return StreamEnded::Shutdown,
            opened = client.watch_node(request) => opened,
        };
        let response = match opened {
            Ok(response) => response,
            Err(status) => return StreamEnded::NotOpened(ServerError::from(status)),
        };
        let synced = || {
            self.set_stream_replica(Some(replica.addr));
            if self.refused_identity.swap(false, Ordering::AcqRel) {
                tracing::info!("the servers accept this agent's token again");
            }
        };
        let elsewhere = || self.replicas.instead_of(replica);
        let follow = Follow {
            shutdown,
            synced,
            elsewhere,
        };
        let ended = follow_stream(response.into_inner(), Applier::new(table, cache), follow).await;
        self.set_stream_replica(None);
        if let StreamEnded::Synced(why) = &ended {
            tracing::warn!(replica = %replica.addr, why = %Escaped(why), "node stream broke; answering from the servers until it is back");
        }
        ended
    }

    /// What a stream's end says of `replica` (and of this agent); false when the agent is
    /// stopping.
    fn judge(&self, replica: &Replica, ended: &StreamEnded) -> bool {
        match ended {
            StreamEnded::Shutdown => return false,
            StreamEnded::Synced(why) | StreamEnded::NotOpened(why) if refuses_identity(why) => {
                // The agent's own fault, not the replica's: every replica would say the
                // same. Not ready until a stream opens; said once per spell.
                if !self.refused_identity.swap(true, Ordering::AcqRel) {
                    tracing::error!(replica = %replica.addr, why = %Escaped(why), "the server refuses this agent's identity (its projected token, or its node name); not ready");
                }
            }
            StreamEnded::Synced(why) | StreamEnded::NotOpened(why) => {
                // A draining (or not yet synced) replica says so: skip it until its health
                // says otherwise; any other end makes it suspect.
                if matches!(
                    why,
                    ServerError::Refused(Refusal {
                        reason: Reason::NotReady,
                        ..
                    })
                ) {
                    replica.mark_not_ready();
                } else {
                    replica.mark_suspect();
                }
                if let StreamEnded::NotOpened(why) = ended {
                    tracing::debug!(replica = %replica.addr, why = %Escaped(why), "cannot open the node stream there");
                }
            }
        }
        true
    }
}

/// Whether the server refused the agent itself rather than failed: its token is missing,
/// not accepted or not an agent's, or its node name is not the node its token proves.
fn refuses_identity(why: &ServerError) -> bool {
    matches!(
        why,
        ServerError::Refused(Refusal {
            reason: Reason::AgentUnauthenticated | Reason::OtherNode,
            ..
        })
    )
}

/// How one node stream ended.
enum StreamEnded {
    /// The agent is stopping.
    Shutdown,
    /// The stream had synced and then broke, for this reason.
    Synced(ServerError),
    /// The stream could not be opened or broke before its snapshot was complete.
    NotOpened(ServerError),
}

/// What one followed stream reports to, besides the table.
struct Follow<'a, S, E> {
    shutdown: &'a CancellationToken,
    /// Called once the stream's snapshot is in.
    synced: S,
    /// Another replica to follow instead, when this one's health checks fail.
    elsewhere: E,
}

/// One stream's events, applied: gathered into a snapshot until it is complete, then each
/// applied to the table, dropping the cached credentials of every pod whose decision
/// changed.
struct Applier<'a> {
    table: &'a PodTable,
    cache: &'a CredentialCache,
    /// The snapshot so far; `None` once it is in the table.
    snapshot: Option<Vec<(Vec<IpAddr>, PodDecision)>>,
    /// Whether the stream has sent a heartbeat.
    heartbeats: bool,
}

impl<'a> Applier<'a> {
    fn new(table: &'a PodTable, cache: &'a CredentialCache) -> Applier<'a> {
        Applier {
            table,
            cache,
            snapshot: Some(Vec::new()),
            heartbeats: false,
        }
    }

    /// How the stream ended, for `why`: after its snapshot was in, or before.
    fn ended(&self, why: ServerError) -> StreamEnded {
        match self.snapshot {
            None => StreamEnded::Synced(why),
            Some(_) => StreamEnded::NotOpened(why),
        }
    }

    /// Applies one event; true when it completed the snapshot.
    fn apply(&mut self, event: node_event::Event) -> bool {
        match (event, self.snapshot.as_mut()) {
            (node_event::Event::Upsert(state), pods) => {
                // Converted once, here; a state the agent cannot read is left out, as if
                // the pod were not there (its requests are then refused or asked about).
                let (ips, decision) = match PodDecision::from_state(state) {
                    Ok(pod) => pod,
                    Err(error) => {
                        // The names in it are the server's, escaped like every server text.
                        tracing::warn!(error = %Escaped(&error), "a node stream's pod state left out");
                        return false;
                    }
                };
                match pods {
                    Some(pods) => pods.push((ips, decision)),
                    None => {
                        if let Some(uid) = self.table.upsert(ips, decision) {
                            self.cache.forget(&uid);
                        }
                    }
                }
            }
            (node_event::Event::DeleteUid(uid), Some(pods)) => {
                pods.retain(|(_, decision)| decision.pod.uid != uid);
            }
            (node_event::Event::DeleteUid(uid), None) => {
                self.table.remove(&uid);
                self.cache.gone(&uid);
            }
            (node_event::Event::Synced(_), Some(_)) => {
                let pods = self.snapshot.take().unwrap_or_default();
                let count = pods.len();
                for uid in self.table.replace(pods) {
                    // Not in the new snapshot: deleted (or gone from this node) meanwhile,
                    // and what a fetch under way brings for it is not kept.
                    if self.table.has(&uid) {
                        self.cache.forget(&uid);
                    } else {
                        self.cache.gone(&uid);
                    }
                }
                tracing::info!(pods = count, "node stream synced");
                return true;
            }
            (node_event::Event::Heartbeat(_), _) => self.heartbeats = true,
            (node_event::Event::Synced(_), None) => {}
        }
        false
    }

    /// How long the stream may be silent: [`STREAM_SILENCE_LIMIT`] once it has sent a
    /// heartbeat; a server that sends none (an older one) is trusted while the stream
    /// lasts, as before.
    fn silence(&self) -> Duration {
        if self.heartbeats {
            STREAM_SILENCE_LIMIT
        } else {
            Duration::from_secs(86_400)
        }
    }
}

/// Follows one stream into `applier` until it ends, or until its replica has failed
/// [`LEAVE_AFTER_CHECKS`] health checks in a row while another replica passes them: a
/// replica too slow to answer its health checks in time is late with every grant and
/// revocation too, so the stream moves as it does off a silent one.
async fn follow_stream<S, E>(
    mut stream: tonic::Streaming<NodeEvent>,
    mut applier: Applier<'_>,
    follow: Follow<'_, S, E>,
) -> StreamEnded
where
    S: Fn(),
    E: Fn() -> Option<SocketAddr>,
{
    let mut checks = tokio::time::interval_at(
        tokio::time::Instant::now() + HEALTH_INTERVAL,
        HEALTH_INTERVAL,
    );
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_checks = 0;
    // Silence is counted from the last message, across the health checks' ticks.
    let mut last_message = tokio::time::Instant::now();
    loop {
        let silent_until = last_message + applier.silence();
        let message = tokio::select! {
            () = follow.shutdown.cancelled() => return StreamEnded::Shutdown,
            message = tokio::time::timeout_at(silent_until, stream.message()) => message,
            _ = checks.tick() => {
                let other = (follow.elsewhere)();
                failed_checks = if other.is_some() { failed_checks + 1 } else { 0 };
                if let Some(other) = other
                    && failed_checks >= LEAVE_AFTER_CHECKS
                {
                    let why = format!("its health checks fail while {other}'s pass");
                    return applier.ended(ServerError::Unavailable(why));
                }
                continue;
            }
        };
        last_message = tokio::time::Instant::now();
        let event = match message {
            Ok(Ok(Some(message))) => message.event,
            Ok(Ok(None)) => {
                return applier.ended(ServerError::Unavailable("the server ended it".into()));
            }
            Ok(Err(status)) => return applier.ended(ServerError::from(status)),
            Err(_) => {
                let why = format!("no heartbeat for {STREAM_SILENCE_LIMIT:?}: the replica hangs");
                return applier.ended(ServerError::Unavailable(why));
            }
        };
        if let Some(event) = event
            && applier.apply(event)
        {
            (follow.synced)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podiam_proto::v1::{Credentials, PodRef, PodState};

    const ARN: &str = "arn:aws:iam::123456789012:role/app";

    fn upsert(uid: &str, ip: &str) -> node_event::Event {
        node_event::Event::Upsert(PodState {
            pod: Some(PodRef {
                namespace: "ns".into(),
                name: format!("pod-{uid}"),
                uid: uid.into(),
            }),
            ip: ip.into(),
            role_name: "app".into(),
            role_arn: ARN.into(),
            ..PodState::default()
        })
    }

    /// A stream's snapshot of `pods` (uid, address), applied.
    fn snapshot(table: &PodTable, cache: &CredentialCache, pods: &[(&str, &str)]) {
        let mut applier = Applier::new(table, cache);
        for (uid, ip) in pods {
            assert!(!applier.apply(upsert(uid, ip)));
        }
        assert!(applier.apply(node_event::Event::Synced(true)));
    }

    /// Whether credentials that arrive for `uid` now are kept.
    async fn kept(cache: &CredentialCache, uid: &str) -> bool {
        let credentials = Credentials {
            access_key_id: format!("ASIA{uid}"),
            expiration_unix: 4_000_000_000,
            ..Credentials::default()
        };
        cache.put(uid, ARN, credentials).await;
        cache.fresh(uid, ARN, 1_000_000_000).is_some()
    }

    #[tokio::test]
    async fn a_pod_missing_from_a_resync_is_gone_and_cacheable_again_once_listed() {
        let (table, cache) = (
            PodTable::default(),
            CredentialCache::new(Duration::from_secs(60)),
        );
        snapshot(&table, &cache, &[("a", "10.0.0.1"), ("b", "10.0.0.2")]);
        assert!(kept(&cache, "a").await && kept(&cache, "b").await);
        // The stream breaks; b is deleted before the next stream's snapshot, which has only
        // a: b is gone, and what a fetch under way brings for it is not kept. a keeps its
        // credentials, its decision unchanged.
        snapshot(&table, &cache, &[("a", "10.0.0.1")]);
        assert!(table.has("a") && !table.has("b"));
        assert!(cache.fresh("a", ARN, 1_000_000_000).is_some());
        assert!(cache.fresh("b", ARN, 1_000_000_000).is_none());
        assert!(!kept(&cache, "b").await, "a gone pod's credentials kept");
        // Listed again (it was only away from this node's view): cacheable again.
        snapshot(&table, &cache, &[("a", "10.0.0.1"), ("b", "10.0.0.2")]);
        assert!(kept(&cache, "b").await);
        // A delete once the stream is synced: gone too.
        let mut applier = Applier::new(&table, &cache);
        applier.snapshot = None;
        assert!(!applier.apply(node_event::Event::DeleteUid("a".into())));
        assert!(!table.has("a"));
        assert!(!kept(&cache, "a").await);
    }
}
