//! The podiam server replicas this agent asks, and calls that survive one of them dying or
//! hanging.
//!
//! - **Which replicas.** Every `--server` URL is resolved every `--server-resolve-interval`;
//!   each address found is a replica (a headless Service's name resolves to every ready
//!   server pod). A failed resolution keeps the replicas known so far.
//! - **Which is healthy.** Each replica is asked `Health` every [`HEALTH_INTERVAL`] with a
//!   short deadline; it is *ready* when it answers synced and not draining. A call that
//!   fails on a replica's transport marks it *suspect* for [`SUSPECT_FOR`] (or until its
//!   next good health check), so the next requests go elsewhere at once. A ready replica
//!   whose Health says its view is *stale* (a watch of the API failing for a while: it may
//!   miss revocations) is passed over for one whose view is current, and used when none is:
//!   an API server outage makes every replica stale, and credentials go on.
//! - **Spreading and failing over.** Each agent starts its turns at a random replica, so
//!   agents' node streams spread over the replicas. [`ServerSet::call`] starts on the
//!   replica of the agent's node stream when it is ready — its answers agree with the
//!   decisions the agent holds, even while replicas' views of the cluster differ (for a few
//!   seconds after an API server outage) — else on the next ready replica in turn. If it
//!   fails on transport, or has not answered after [`HEDGE_AFTER`], the same call is made on
//!   another replica and the first good answer wins — one retry, inside the SDKs' 1-second
//!   budget. A replica that answers with a refusal (a decision about the pod) is believed,
//!   except "not ready" and "STS unavailable", which another replica may not share (its own
//!   way to STS): a replica that cannot reach STS must not cut off the pods whose keys it
//!   owns. That second replica is the key's runner-up ([`ServerSet::owners`]: the owner were
//!   the first gone), so a key failing everywhere is tried by two replicas, not all; and
//!   none is asked when the first says STS throttles (the account's rate is spent).
//! - **Owners.** A pod's GetCredentials goes first to the replica that owns its credential
//!   key ([`ServerSet::owner`]: `podiam_proto::owner` over the names replicas give in their
//!   Health answers), which holds those credentials: one STS call per session for the whole
//!   cluster. The replicas it is computed over are those with a good health answer in the
//!   last [`OWNER_MEMORY`], not only those whose last check was in time: the servers count a
//!   replica as long as its pod is Ready, and one late answer on a busy node must not send
//!   calls to a replica that would have to call STS again.
//!
//! Every replica has its own HTTP/2 connection with keep-alive pings, so a replica that
//! vanishes without closing its connections is noticed within the ping timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use podiam_proto::Reason;
use podiam_proto::v1::HealthRequest;
use podiam_proto::v1::podiam_client::PodiamClient;
use podiam_runtime::connect::TlsConnector;
use podiam_runtime::net::{Dialer, Tcp};
use podiam_runtime::rotate::Rotating;
use prometheus_client::metrics::counter::Counter;
use rustls::ClientConfig;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::decision::ServerError;
use crate::identity::{AgentToken, Authorize};

/// Replicas' addresses, each with the name its certificate must carry.
type Addresses = Vec<(SocketAddr, String)>;

/// A client of one replica whose every call carries the agent's token.
pub type Client = PodiamClient<InterceptedService<Channel, Authorize>>;

/// How often each replica's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one health check: a replica slower than this is not one to send pods to.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a call waits for one replica before asking another as well. A warm answer takes
/// about a millisecond and a first AssumeRole some tens; this leaves room for the second
/// replica inside the SDKs' 1 s budget (botocore: 1 s timeout, 1 attempt).
pub const HEDGE_AFTER: Duration = Duration::from_millis(300);
/// How long a replica whose transport failed is passed over (unless its health check
/// succeeds first).
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// How long a replica's last good health answer keeps it among the owners of keys.
pub const OWNER_MEMORY: Duration = Duration::from_secs(5);
/// TCP + TLS connect deadline: a dead replica's address must fail fast.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 ping interval and timeout on each replica's connection: a replica that hangs or
/// vanishes without a FIN is dropped within about 3 seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// One `--server` URL: what to resolve, and the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses an `https://HOST:PORT` URL (the port defaults to 443).
    pub fn parse(url: &str) -> Option<Target> {
        let uri: http::Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("https") {
            return None;
        }
        let host = uri.host()?.trim_matches(['[', ']']).to_string();
        Some(Target {
            host,
            port: uri.port_u16().unwrap_or(443),
        })
    }
}

/// One server replica at one address.
#[derive(Debug)]
pub struct Replica {
    pub addr: SocketAddr,
    client: Client,
    ready: AtomicBool,
    suspect_until: Mutex<Option<Instant>>,
    /// Its name in the replica set, as its Health answers say (empty: none given).
    name: Mutex<Arc<str>>,
    /// When it last answered its health check synced and not draining.
    last_good: Mutex<Option<Instant>>,
    /// Whether its last Health answer said its view of the cluster is stale.
    stale: AtomicBool,
}

impl Replica {
    fn new(
        addr: SocketAddr,
        connector: TlsConnector,
        call_timeout: Duration,
        token: Arc<AgentToken>,
    ) -> Result<Replica, tonic::transport::Error> {
        // The scheme only keeps tonic from adding TLS of its own; the connector does it.
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(call_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_with_connector_lazy(connector);
        Ok(Replica {
            addr,
            client: PodiamClient::with_interceptor(channel, Authorize(token)),
            ready: AtomicBool::new(false),
            suspect_until: Mutex::new(None),
            name: Mutex::new(Arc::from("")),
            last_good: Mutex::new(None),
            stale: AtomicBool::new(false),
        })
    }

    /// A client of this replica (cheap: the connection is shared).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Its name in the replica set, from its last Health answer (empty: none).
    pub fn name(&self) -> Arc<str> {
        Arc::clone(&self.name.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the last health check found it synced and not draining.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn suspect(&self) -> bool {
        let until = *self.suspect_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Passes this replica over for a while: its transport just failed.
    pub fn mark_suspect(&self) {
        *self.suspect_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + SUSPECT_FOR);
    }

    /// The replica said it is shutting down (or not synced): not ready until its health says
    /// otherwise, and no owner of keys.
    pub fn mark_not_ready(&self) {
        self.ready.store(false, Ordering::Release);
        *self.last_good.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether it counts among the owners of keys: a good health answer within
    /// [`OWNER_MEMORY`], and a name.
    fn owns_keys(&self) -> bool {
        let last_good = *self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        last_good.is_some_and(|at| at.elapsed() < OWNER_MEMORY) && !self.name().is_empty()
    }

    /// Whether its last Health answer said its view is stale.
    pub fn stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// How good a choice it is, best first: 0 ready, not suspect and current; 1 the same but
    /// stale; 2 anything else.
    fn rank(&self) -> u8 {
        match (self.ready() && !self.suspect(), self.stale()) {
            (true, false) => 0,
            (true, true) => 1,
            (false, _) => 2,
        }
    }

    async fn check_health(&self) -> Result<(), String> {
        let answer =
            tokio::time::timeout(HEALTH_TIMEOUT, self.client().health(HealthRequest {})).await;
        let late = answer.is_err();
        let result = match answer {
            Ok(Ok(response)) => {
                let health = response.into_inner();
                if **self.name.lock().unwrap_or_else(|e| e.into_inner()) != *health.replica {
                    *self.name.lock().unwrap_or_else(|e| e.into_inner()) =
                        Arc::from(health.replica.as_str());
                }
                self.stale.store(health.stale, Ordering::Release);
                if health.draining {
                    Err("shutting down".to_string())
                } else if !health.synced {
                    Err("caches not synced yet".to_string())
                } else {
                    Ok(())
                }
            }
            Ok(Err(status)) => Err(ServerError::from(status).to_string()),
            Err(_) => Err(format!("no health answer within {HEALTH_TIMEOUT:?}")),
        };
        let was = self.ready.swap(result.is_ok(), Ordering::AcqRel);
        match &result {
            Ok(()) => {
                *self.suspect_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *self.last_good.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            // Shutting down, not synced, unreachable: no owner from now on. Late: still one,
            // for a while.
            Err(_) if !late => {
                *self.last_good.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(_) => {}
        }
        match (&result, was) {
            (Ok(()), false) => tracing::info!(replica = %self.addr, "server replica ready"),
            (Err(why), true) => {
                tracing::warn!(replica = %self.addr, %why, "server replica not ready")
            }
            _ => {}
        }
        result
    }
}

/// The replicas, how to reach them, and which to ask next.
#[derive(Debug)]
pub struct ServerSet {
    /// What to resolve, each with the name its certificates must carry.
    targets: Vec<(Target, String)>,
    tls: Arc<Rotating<ClientConfig>>,
    /// How connections to replicas are opened (TCP; in-process tests, in memory).
    dialer: Arc<dyn Dialer>,
    /// The agent's token, put on every call.
    token: Arc<AgentToken>,
    call_timeout: Duration,
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    /// Each target's addresses from its last lookup (`None`: none yet, or it failed).
    resolved: Mutex<Vec<Option<Addresses>>>,
    next: AtomicUsize,
    /// Calls sent to a second replica because the first failed or was slow.
    failovers: Counter,
}

/// How a call on one replica ended, for the failover decision.
enum Attempt<T> {
    Done(Result<T, ServerError>),
    /// Worth asking another replica (transport failure, deadline, not ready).
    Retry(ServerError),
}

fn classify<T>(result: Result<T, tonic::Status>, replica: &Replica) -> Attempt<T> {
    match result {
        Ok(value) => Attempt::Done(Ok(value)),
        Err(status) => match Reason::of(&status) {
            Some(Reason::NotReady) => {
                replica.mark_not_ready();
                Attempt::Retry(ServerError::from(status))
            }
            // The replica is otherwise sound: not passed over for other calls. Not when STS
            // throttles: the account's rate is spent, and another replica would add to it.
            Some(Reason::StsUnavailable) if !podiam_proto::sts_throttled(&status) => {
                Attempt::Retry(ServerError::from(status))
            }
            Some(_) => Attempt::Done(Err(ServerError::from(status))),
            None => {
                let error = ServerError::from(status);
                match error {
                    ServerError::Unavailable(_) => {
                        replica.mark_suspect();
                        Attempt::Retry(error)
                    }
                    other => Attempt::Done(Err(other)),
                }
            }
        },
    }
}

impl ServerSet {
    /// A set for `targets` (nothing resolved yet; see [`ServerSet::resolve`]), each with the
    /// name its replicas' certificates must carry, each call bounded by `call_timeout`.
    pub fn new(
        targets: Vec<(Target, String)>,
        tls: Arc<Rotating<ClientConfig>>,
        call_timeout: Duration,
        failovers: Counter,
        token: Arc<AgentToken>,
    ) -> ServerSet {
        ServerSet {
            resolved: Mutex::new(vec![None; targets.len()]),
            targets,
            tls,
            dialer: Arc::new(Tcp),
            token,
            call_timeout,
            replicas: RwLock::new(Arc::new(Vec::new())),
            // Each agent starts its turns at its own replica, so that agents' node streams
            // (each agent's first pick) spread over the replicas.
            next: AtomicUsize::new(fastrand::usize(..)),
            failovers,
        }
    }

    /// The same set, opening its connections with `dialer` instead of TCP.
    pub fn over(self, dialer: Arc<dyn Dialer>) -> ServerSet {
        ServerSet { dialer, ..self }
    }

    /// The replicas known now.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        Arc::clone(&self.replicas.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Another replica to use instead of `replica` when that one is better: ready and not
    /// suspect while `replica`'s last health check failed, or also current while
    /// `replica`'s view is stale; `None` while `replica` is ready and current, or no other
    /// one is better.
    pub fn instead_of(&self, replica: &Replica) -> Option<SocketAddr> {
        let good_enough = match (replica.ready(), replica.stale()) {
            (true, false) => return None,
            (true, true) => 0,
            (false, _) => 1,
        };
        let replicas = self.replicas();
        let others = || replicas.iter().filter(|other| other.addr != replica.addr);
        (0..=good_enough)
            .find_map(|rank| others().find(|other| other.rank() == rank))
            .map(|other| other.addr)
    }

    /// Whether a replica is ready, not suspect and current.
    fn any_current(&self) -> bool {
        self.replicas().iter().any(|r| r.rank() == 0)
    }

    /// Whether any replica is ready.
    pub fn any_ready(&self) -> bool {
        self.replicas().iter().any(|r| r.ready())
    }

    /// Makes the replicas exactly `addrs` (each with its certificate's name): known ones are
    /// kept (with their connections and health), new ones added, vanished ones dropped once
    /// their calls end.
    pub fn set_addresses(&self, addrs: Vec<(SocketAddr, String)>) {
        let addrs: BTreeMap<SocketAddr, String> = addrs.into_iter().collect();
        let current = self.replicas();
        if current.iter().map(|r| r.addr).eq(addrs.keys().copied()) {
            return;
        }
        let known: BTreeMap<SocketAddr, Arc<Replica>> =
            current.iter().map(|r| (r.addr, Arc::clone(r))).collect();
        let mut fresh = Vec::with_capacity(addrs.len());
        for (addr, name) in addrs {
            if let Some(replica) = known.get(&addr) {
                fresh.push(Arc::clone(replica));
                continue;
            }
            let replica = TlsConnector::new(addr, &name, Arc::clone(&self.tls))
                .map(|connector| connector.over(Arc::clone(&self.dialer)))
                .map_err(|e| e.to_string())
                .and_then(|connector| {
                    Replica::new(addr, connector, self.call_timeout, Arc::clone(&self.token))
                        .map_err(|e| e.to_string())
                });
            match replica {
                Ok(replica) => fresh.push(Arc::new(replica)),
                Err(error) => tracing::error!(%addr, %error, "cannot use this server address"),
            }
        }
        tracing::info!(
            replicas = ?fresh.iter().map(|r| r.addr).collect::<Vec<_>>(),
            "server replicas"
        );
        *self.replicas.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
    }

    /// Resolves every target once, all at the same time, and makes the replicas what is
    /// known each time a lookup answers: a target whose lookup hangs (a DNS server that drops
    /// queries) holds up neither the others nor, once they are known, the replicas. A
    /// target's addresses are replaced by its lookup's; those of a target still being looked
    /// up, or whose lookup failed, stay from its last lookup until the end, when the failed
    /// ones' are dropped if another target answered. If none did, every replica known stays,
    /// and it is an error.
    pub async fn resolve(&self) -> Result<(), String> {
        let mut lookups: FuturesUnordered<_> = self
            .targets
            .iter()
            .enumerate()
            .map(|(at, (target, name))| async move {
                let found = tokio::net::lookup_host((target.host.as_str(), target.port))
                    .await
                    .map(|found| found.map(|addr| (addr, name.clone())).collect::<Vec<_>>());
                (at, found)
            })
            .collect();
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        let mut answered = false;
        while let Some((at, found)) = lookups.next().await {
            let host = &self.targets[at].0.host;
            match found {
                Ok(addrs) if !addrs.is_empty() => {
                    answered = true;
                    self.resolved_now(|resolved| resolved[at] = Some(addrs));
                }
                Ok(_) => {
                    errors.push(format!("{host}: no address found"));
                    failed.push(at);
                }
                Err(error) => {
                    errors.push(format!("{host}: {error}"));
                    failed.push(at);
                }
            }
        }
        if !answered {
            return Err(if errors.is_empty() {
                "no address found".to_string()
            } else {
                errors.join("; ")
            });
        }
        self.resolved_now(|resolved| {
            for at in failed {
                resolved[at] = None;
            }
        });
        for error in errors {
            tracing::warn!(%error, "a server name did not resolve; using the others");
        }
        Ok(())
    }

    /// Changes the targets' addresses with `change`, and makes the replicas all of them.
    fn resolved_now(&self, change: impl FnOnce(&mut Vec<Option<Addresses>>)) {
        let known: Addresses = {
            let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            change(&mut resolved);
            resolved.iter().flatten().flatten().cloned().collect()
        };
        if !known.is_empty() {
            self.set_addresses(known);
        }
    }

    /// Re-resolves the targets every `interval` (every second while nothing is known) until
    /// `shutdown`.
    pub async fn follow_dns(&self, interval: Duration, shutdown: CancellationToken) {
        loop {
            // A lookup may hang for minutes; shutting down does not wait for it.
            let resolved = tokio::select! {
                () = shutdown.cancelled() => return,
                resolved = self.resolve() => resolved,
            };
            if let Err(error) = resolved {
                if self.replicas().is_empty() {
                    tracing::warn!(%error, "no server replica resolved yet; retrying");
                } else {
                    tracing::warn!(%error, "resolving the servers failed; keeping the replicas known");
                }
            }
            let wait = if self.replicas().is_empty() {
                Duration::from_secs(1).min(interval)
            } else {
                interval
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Checks every replica's health every [`HEALTH_INTERVAL`] until `shutdown`.
    pub async fn follow_health(&self, shutdown: CancellationToken) {
        loop {
            let replicas = self.replicas();
            futures::future::join_all(replicas.iter().map(|r| r.check_health())).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            }
        }
    }

    /// The replica to ask next, not `except`: the next one in turn of the best
    /// [rank](Replica::rank) there is (ready, not suspect and current; else the same but
    /// stale; else any).
    pub fn pick(&self, except: Option<SocketAddr>) -> Option<Arc<Replica>> {
        let replicas = self.replicas();
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(u8, &Arc<Replica>)> = None;
        for replica in (0..n)
            .map(|i| &replicas[(start + i) % n])
            .filter(|r| Some(r.addr) != except)
        {
            let rank = replica.rank();
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, replica));
            }
        }
        best.map(|(_, replica)| Arc::clone(replica))
    }

    /// The replica that owns the credential key `key` (`podiam_proto::owner` over the names
    /// of the replicas that count as owners: see the module's docs), if any.
    pub fn owner(&self, key: u64) -> Option<SocketAddr> {
        self.owners(key).0
    }

    /// The owner of `key` ([`ServerSet::owner`]) and its runner-up: the owner over the other
    /// names, which would own the key were the owner gone.
    pub fn owners(&self, key: u64) -> (Option<SocketAddr>, Option<SocketAddr>) {
        if key == 0 {
            return (None, None);
        }
        let replicas = self.replicas();
        let named: Vec<(Arc<str>, SocketAddr)> = replicas
            .iter()
            .filter(|r| r.owns_keys())
            .map(|r| (r.name(), r.addr))
            .collect();
        let names = || named.iter().map(|(name, _)| &**name);
        let address = |name: &str| {
            (named.iter())
                .find(|(n, _)| &**n == name)
                .map(|(_, addr)| *addr)
        };
        let Some(owner) = podiam_proto::owner::owner(key, names()) else {
            return (None, None);
        };
        let runner_up = podiam_proto::owner::owner(key, names().filter(|n| *n != owner));
        (address(owner), runner_up.and_then(address))
    }

    /// `prefer` when it is known, ready and not suspect, and current unless no replica is,
    /// else [`ServerSet::pick`].
    fn pick_first(&self, prefer: Option<SocketAddr>) -> Option<Arc<Replica>> {
        self.usable(prefer).or_else(|| self.pick(None))
    }

    /// The replica at `addr` when it is known, ready and not suspect, and current unless no
    /// replica is.
    fn usable(&self, addr: Option<SocketAddr>) -> Option<Arc<Replica>> {
        addr.and_then(|addr| self.replicas().iter().find(|r| r.addr == addr).cloned())
            .filter(|replica| match replica.rank() {
                0 => true,
                1 => !self.any_current(),
                _ => false,
            })
    }

    /// Makes one call, failing over to a second replica as described in the module docs.
    /// The call goes first to `prefer` when it is given and ready: the replica whose node
    /// stream the agent follows, so that the answer agrees with the decisions the agent
    /// holds (replicas' views of the cluster can differ for a few seconds, after an API
    /// server outage for one).
    pub async fn call<T, F, Fut>(
        &self,
        prefer: Option<SocketAddr>,
        call: F,
    ) -> Result<T, ServerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_from(self.pick_first(prefer), None, call).await
    }

    /// [`ServerSet::call`], first to the owner of the credential key `key` when there is one
    /// ([`ServerSet::owner`]) — even while it is suspect after one slow answer: another
    /// replica holds nothing for the key and would call STS again; the hedge after
    /// [`HEDGE_AFTER`] still covers an owner that does not answer. Not while the owner's view
    /// is stale and another's is current: a decision matters more than an STS call.
    pub async fn call_owner_first<T, F, Fut>(
        &self,
        key: u64,
        prefer: Option<SocketAddr>,
        call: F,
    ) -> Result<T, ServerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (owner, runner_up) = self.owners(key);
        let owner = owner
            .and_then(|addr| self.replicas().iter().find(|r| r.addr == addr).cloned())
            .filter(|owner| !owner.stale() || !self.any_current());
        let then = runner_up.filter(|_| owner.is_some());
        self.call_from(owner.or_else(|| self.pick_first(prefer)), then, call)
            .await
    }

    /// The call on `first`, then (failing over) on `then` when it is ready and not suspect,
    /// else on [`ServerSet::pick`]'s.
    async fn call_from<T, F, Fut>(
        &self,
        first: Option<Arc<Replica>>,
        then: Option<SocketAddr>,
        call: F,
    ) -> Result<T, ServerError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let Some(first) = first else {
            return Err(ServerError::Unavailable(
                "no podiam server replica is known (yet)".into(),
            ));
        };
        let attempt = |replica: Arc<Replica>| {
            let call = call(replica.client());
            async move { classify(call.await.map(tonic::Response::into_inner), &replica) }
        };
        let a = attempt(Arc::clone(&first));
        let mut a = std::pin::pin!(a);
        let first_failed = tokio::select! {
            outcome = a.as_mut() => match outcome {
                Attempt::Done(result) => return result,
                Attempt::Retry(error) => Some(error),
            },
            () = tokio::time::sleep(HEDGE_AFTER) => None,
        };
        let then = self.usable(then.filter(|addr| *addr != first.addr));
        let Some(second) = then.or_else(|| self.pick(Some(first.addr))) else {
            // Nobody else to ask: the first answer is all there is.
            return match first_failed {
                Some(error) => Err(error),
                None => match a.await {
                    Attempt::Done(result) => result,
                    Attempt::Retry(error) => Err(error),
                },
            };
        };
        self.failovers.inc();
        tracing::debug!(
            from = %first.addr,
            to = %second.addr,
            why = if first_failed.is_some() { "failed" } else { "slow" },
            "asking another server replica"
        );
        let b = attempt(second);
        let mut b = std::pin::pin!(b);
        if let Some(error) = first_failed {
            return match b.await {
                Attempt::Done(result) => result,
                Attempt::Retry(_) => Err(error),
            };
        }
        // Both under way: the first good answer wins; a retryable failure of one waits for
        // the other.
        tokio::select! {
            outcome = a.as_mut() => match outcome {
                Attempt::Done(result) => result,
                Attempt::Retry(error) => match b.await {
                    Attempt::Done(result) => result,
                    Attempt::Retry(_) => Err(error),
                },
            },
            outcome = b.as_mut() => match outcome {
                Attempt::Done(result) => {
                    // The first replica is slower than a second one asked 300 ms later: pass
                    // it over until its health check vouches for it again.
                    first.mark_suspect();
                    result
                }
                Attempt::Retry(error) => match a.await {
                    Attempt::Done(result) => result,
                    Attempt::Retry(_) => Err(error),
                },
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_https_urls() {
        assert_eq!(
            Target::parse("https://podiam-server.podiam.svc:8443"),
            Some(Target {
                host: "podiam-server.podiam.svc".into(),
                port: 8443
            })
        );
        assert_eq!(
            Target::parse("https://[::1]:9"),
            Some(Target {
                host: "::1".into(),
                port: 9
            })
        );
        assert_eq!(Target::parse("https://server").map(|t| t.port), Some(443));
        assert_eq!(Target::parse("http://server:80"), None);
        assert_eq!(Target::parse("server:80"), None);
    }

    /// A set of `targets` with freshly made agent certificates (kept in the returned
    /// directory).
    pub(crate) fn set(targets: Vec<(Target, String)>) -> (tempfile::TempDir, ServerSet) {
        podiam_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let files = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(dir.path(), false)
            .expect("written");
        let tls = Rotating::load(
            podiam_runtime::tls::TlsFiles {
                ca: files.ca_cert,
                cert: files.agent_cert,
                key: files.agent_key,
            },
            podiam_runtime::tls::client_config,
        )
        .expect("tls");
        let set = ServerSet::new(
            targets,
            Arc::new(tls),
            Duration::from_millis(900),
            Counter::default(),
            Arc::new(AgentToken::none()),
        );
        (dir, set)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[tokio::test]
    async fn replicas_follow_what_the_names_resolve_to() {
        let localhost = Target {
            host: "localhost".into(),
            port: 9,
        };
        let (_dir, set) = set(vec![(localhost, "localhost".into())]);
        assert!(set.pick(None).is_none(), "nothing resolved yet");
        set.resolve().await.expect("localhost resolves");
        let found: Vec<SocketAddr> = set.replicas().iter().map(|r| r.addr).collect();
        assert!(found.contains(&addr("127.0.0.1:9")), "{found:?}");

        // Replicas that stay keep their connection and health; gone ones go; new ones come.
        let name = || "localhost".to_string();
        set.set_addresses(vec![
            (addr("10.0.0.1:8443"), name()),
            (addr("10.0.0.2:8443"), name()),
        ]);
        let first = set.replicas();
        set.set_addresses(vec![
            (addr("10.0.0.2:8443"), name()),
            (addr("10.0.0.3:8443"), name()),
        ]);
        let second = set.replicas();
        assert_eq!(
            second.iter().map(|r| r.addr).collect::<Vec<_>>(),
            vec![addr("10.0.0.2:8443"), addr("10.0.0.3:8443")]
        );
        assert!(
            Arc::ptr_eq(&first[1], &second[0]),
            "the replica that stayed is the same"
        );
    }

    /// `set` made of `n` replicas at 10.0.0.1:8443, 10.0.0.2:8443…, each ready.
    fn ready_replicas(set: &ServerSet, n: u8) -> Arc<Vec<Arc<Replica>>> {
        let addresses = (1..=n).map(|i| (addr(&format!("10.0.0.{i}:8443")), "localhost".into()));
        set.set_addresses(addresses.collect());
        let replicas = set.replicas();
        for replica in replicas.iter() {
            replica.ready.store(true, Ordering::Release);
        }
        replicas
    }

    #[tokio::test]
    async fn a_keys_runner_up_owns_it_once_its_owner_is_gone() {
        let (_dir, set) = set(Vec::new());
        let replicas = ready_replicas(&set, 3);
        for (i, replica) in replicas.iter().enumerate() {
            *replica.name.lock().expect("not poisoned") = Arc::from(format!("s-{i}").as_str());
            *replica.last_good.lock().expect("not poisoned") = Some(Instant::now());
        }
        for key in 1..50 {
            let (Some(owner), Some(runner_up)) = set.owners(key) else {
                panic!("key {key}: an owner and a runner-up among three");
            };
            assert_ne!(owner, runner_up);
            assert_eq!(set.owner(key), Some(owner));
            let gone = replicas.iter().find(|r| r.addr == owner).expect("known");
            let was = gone.last_good.lock().expect("not poisoned").take();
            assert_eq!(set.owner(key), Some(runner_up), "key {key}");
            *gone.last_good.lock().expect("not poisoned") = was;
        }
        assert_eq!(set.owners(0), (None, None), "no key");
    }

    #[tokio::test]
    async fn picks_go_round_ready_replicas_and_avoid_suspect_ones() {
        let (_dir, set) = set(Vec::new());
        let replicas = ready_replicas(&set, 3);
        let picked: std::collections::BTreeSet<SocketAddr> = (0..6)
            .filter_map(|_| set.pick(None))
            .map(|r| r.addr)
            .collect();
        assert_eq!(picked.len(), 3, "requests spread over every ready replica");

        replicas[0].mark_suspect();
        replicas[1].mark_not_ready();
        for _ in 0..6 {
            assert_eq!(set.pick(None).map(|r| r.addr), Some(addr("10.0.0.3:8443")));
        }
        // The second attempt never goes back to the first one's replica…
        assert_eq!(
            set.pick(Some(addr("10.0.0.3:8443")))
                .map(|r| r.addr)
                .filter(|a| *a == addr("10.0.0.3:8443")),
            None
        );
        // …and with nobody preferred, anyone is better than no one.
        replicas[0].mark_not_ready();
        replicas[2].mark_not_ready();
        assert!(set.pick(None).is_some());
        assert!(!set.any_ready());
    }

    #[tokio::test]
    async fn a_stream_leaves_a_replica_only_for_a_better_one() {
        let (_dir, set) = set(Vec::new());
        let replicas = ready_replicas(&set, 2);
        let (held, other) = (&replicas[0], &replicas[1]);
        assert_eq!(
            set.instead_of(held),
            None,
            "a ready replica keeps its stream"
        );
        held.mark_not_ready();
        assert_eq!(set.instead_of(held), Some(other.addr));
        // Not for one that is no better: suspect, or not ready itself.
        other.mark_suspect();
        assert_eq!(set.instead_of(held), None);
        *other.suspect_until.lock().expect("not poisoned") = None;
        other.mark_not_ready();
        assert_eq!(set.instead_of(held), None);
    }

    #[tokio::test]
    async fn a_stale_replica_is_used_only_when_no_replica_is_current() {
        let (_dir, set) = set(Vec::new());
        let replicas = ready_replicas(&set, 2);
        let (stale, current) = (&replicas[0], &replicas[1]);
        stale.stale.store(true, Ordering::Release);
        for _ in 0..4 {
            assert_eq!(set.pick(None).map(|r| r.addr), Some(current.addr));
        }
        // Not even for the node stream's replica, and the stream leaves it…
        assert_eq!(
            set.pick_first(Some(stale.addr)).map(|r| r.addr),
            Some(current.addr)
        );
        assert_eq!(set.instead_of(stale), Some(current.addr));
        assert_eq!(set.instead_of(current), None);
        // …but a second attempt may go to it, and a stale replica is better than one that
        // is not ready.
        assert_eq!(
            set.pick(Some(current.addr)).map(|r| r.addr),
            Some(stale.addr)
        );
        current.mark_not_ready();
        assert_eq!(set.pick(None).map(|r| r.addr), Some(stale.addr));
        assert_eq!(set.instead_of(current), Some(stale.addr));
        assert_eq!(set.instead_of(stale), None, "nothing better");
        // Every replica stale (an API server outage): the node stream's replica first, as
        // when all are current.
        current.ready.store(true, Ordering::Release);
        current.stale.store(true, Ordering::Release);
        for prefer in [stale.addr, current.addr] {
            assert_eq!(set.pick_first(Some(prefer)).map(|r| r.addr), Some(prefer));
        }
        assert_eq!(set.instead_of(stale), None);
        let picked: std::collections::BTreeSet<SocketAddr> = (0..4)
            .filter_map(|_| set.pick(None))
            .map(|r| r.addr)
            .collect();
        assert_eq!(picked.len(), 2, "calls still spread over both");
    }
}
