//! The server's timing, in process on paused time ([`tokio::time::pause`]): the drain on
//! SIGTERM (`--shutdown-delay`, then `--shutdown-timeout`) and the credential engine's
//! upkeep loop (prefetch when a pod appears, refresh at half-life, backoff while STS fails).
//!
//! The server is assembled from fakes ([`Backends`]): no Kubernetes API (the test fills the
//! view), an STS and a clock on tokio's paused time, a reviewer that accepts no token (agent
//! calls are answered under `--node-binding warn`). It is served on an in-memory network
//! ([`MemoryNetwork`]) and called there over mutual TLS with the agent's certificate, so no
//! byte waits for the kernel and the clock only moves when everything waits for a timer:
//! every duration below is exact, and a test of minutes runs in milliseconds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use podiam_proto::Reason;
use podiam_proto::v1::podiam_client::PodiamClient;
use podiam_proto::v1::{
    GetCredentialsRequest, GetCredentialsResponse, GetPodRoleRequest, HealthRequest,
    WatchNodeRequest, node_event,
};
use podiam_runtime::connect::TlsConnector;
use podiam_runtime::memory::MemoryNetwork;
use podiam_runtime::rotate::Rotating;
use podiam_runtime::tls::TlsFiles;
use rustls::ClientConfig;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use clap::Parser;

use crate::config::Config;
use crate::identity::{Access, Review, ReviewUnavailable, Reviewer};
use crate::index::PodRecord;
use crate::sts::{AssumeRequest, AssumeRole, Clock, Issued, StsError};
use crate::watch::Cluster;
use crate::{Backends, Listeners, Server, load_tls};

const GRPC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8443);
const HEALTH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 9090);
/// Where the test's calls come from (an agent's node).
const CALLER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1));
const NODE: &str = "node-1";
const WEB_IP: &str = "10.1.0.5";
/// How long a test waits for a condition, in paused time: far beyond anything awaited.
const PATIENCE: Duration = Duration::from_secs(3 * 3600);

/// The credential cache's clock on tokio's paused time.
#[derive(Debug)]
struct PausedClock {
    start: Instant,
    /// Milliseconds since the Unix epoch at `start`.
    epoch_ms: i64,
}

impl Clock for PausedClock {
    fn now_ms(&self) -> i64 {
        self.epoch_ms + i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// An STS on the paused clock: 1-hour credentials after `latency`, or a failure while
/// `down`. Counts calls made and credentials issued.
#[derive(Clone)]
struct FakeSts {
    clock: Arc<PausedClock>,
    latency: Arc<Mutex<Duration>>,
    down: Arc<AtomicBool>,
    calls: Arc<watch::Sender<usize>>,
    issued: Arc<watch::Sender<usize>>,
}

impl AssumeRole for FakeSts {
    fn assume_role(&self, _: AssumeRequest) -> BoxFuture<'static, Result<Issued, StsError>> {
        let sts = self.clone();
        Box::pin(async move {
            sts.calls.send_modify(|n| *n += 1);
            let latency = *sts.latency.lock().expect("not poisoned");
            tokio::time::sleep(latency).await;
            if sts.down.load(Ordering::SeqCst) {
                return Err(StsError::Unavailable("Throttling: Rate exceeded".into()));
            }
            sts.issued.send_modify(|n| *n += 1);
            let now = sts.clock.now_ms() / 1000;
            Ok(Issued {
                access_key_id: format!("ASIA{}", *sts.issued.borrow()),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration_unix: now + 3600,
                issued_unix: now,
                clock_offset_ms: 0,
            })
        })
    }
}

/// A token spelt as the API server issues them (a JWT; the server refuses any other
/// spelling unreviewed), standing for `name` to [`NoReviews`].
fn token(name: &str) -> String {
    use base64::Engine;
    let part = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let payload = serde_json::json!({ "name": name }).to_string();
    format!(
        "{}.{}.{}",
        part(br#"{"alg":"RS256"}"#),
        part(payload.as_bytes()),
        part(b"signature")
    )
}

/// The name a [`token`] stands for.
fn token_name(token: &str) -> Option<String> {
    let payload = podiam_runtime::jwt::payload(token).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    Some(claims["name"].as_str()?.to_string())
}

/// A Kubernetes API that accepts no token but pods' own: `token("pod-token:NAME")`, for the
/// audience `podiam`, is a projected token of `team-a`'s default ServiceAccount bound to pod
/// NAME (uid `uid-NAME`). Reviewing a token of a name starting with "slow" takes an hour (a
/// call stuck in the API). Counts its reviews.
#[derive(Debug)]
struct NoReviews {
    reviews: watch::Sender<usize>,
}

impl Reviewer for NoReviews {
    fn review_token<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Review, ReviewUnavailable>> {
        Box::pin(async move {
            self.reviews.send_modify(|n| *n += 1);
            let Some(token) = token_name(token) else {
                return Ok(Review::Unauthenticated("not a token of this test".into()));
            };
            if token.starts_with("slow") {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if let Some(node) = token.strip_prefix("agent-token:") {
                return Ok(Review::Authenticated(agent_user(node)));
            }
            match token.strip_prefix("pod-token:") {
                Some(pod) if audiences == ["podiam".to_string()] => Ok(Review::Authenticated(
                    podiam_policy::decision::ReviewedUser {
                        username: "system:serviceaccount:team-a:default".into(),
                        uid: "sa-uid".into(),
                        groups: vec!["system:serviceaccounts".into()],
                        pod_name: Some(pod.into()),
                        pod_uid: Some(format!("uid-{pod}")),
                        node_name: Some(NODE.into()),
                        extra: Default::default(),
                    },
                )),
                Some(_) => Ok(Review::Unauthenticated(
                    "token audiences are invalid".into(),
                )),
                None => Ok(Review::Unauthenticated("not a token of this test".into())),
            }
        })
    }

    fn review_access<'a>(
        &'a self,
        _: &'a podiam_policy::decision::ReviewedUser,
        _: &'a Access,
    ) -> BoxFuture<'a, Result<Result<(), String>, ReviewUnavailable>> {
        Box::pin(async { Ok(Err("no operator in this test".to_string())) })
    }
}

/// What the review of `token("agent-token:NODE")` says: the agents' ServiceAccount (the server's
/// default), bound to the pod `agent-NODE` on NODE ([`Rig::add_agent_pod`]).
fn agent_user(node: &str) -> podiam_policy::decision::ReviewedUser {
    podiam_policy::decision::ReviewedUser {
        username: "system:serviceaccount:podiam:podiam-agent".into(),
        uid: "agent-sa-uid".into(),
        groups: vec!["system:serviceaccounts".into()],
        pod_name: Some(format!("agent-{node}")),
        pod_uid: Some(format!("uid-agent-{node}")),
        node_name: Some(node.into()),
        extra: Default::default(),
    }
}

/// A server built from fakes, not yet serving, and what the test needs to call it.
struct Rig {
    _dir: tempfile::TempDir,
    network: MemoryNetwork,
    agent_tls: Arc<Rotating<ClientConfig>>,
    sts: FakeSts,
    reviews: watch::Receiver<usize>,
    cluster: Arc<Cluster>,
    server: Option<Server>,
}

impl Rig {
    /// A server with `flags` (besides its certificates, a base ARN and `--node-binding
    /// warn` unless they say otherwise) and an empty, synced view of the cluster but for the namespace `team-a`
    /// permitting `app-.*`.
    fn new(flags: &[&str]) -> Rig {
        let rig = Rig::unsynced(flags);
        rig.cluster.mark_synced();
        rig
    }

    /// As [`Rig::new`], its view not yet synced (a server before its first list).
    fn unsynced(flags: &[&str]) -> Rig {
        podiam_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let files = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(dir.path(), false)
            .expect("written");
        let config = Config::try_parse_from(server_args(&files, flags))
            .expect("flags parse")
            .validate()
            .expect("valid");
        let clock = Arc::new(PausedClock {
            start: Instant::now(),
            epoch_ms: 1_800_000_000_000,
        });
        let sts = FakeSts {
            clock: Arc::clone(&clock),
            latency: Arc::default(),
            down: Arc::default(),
            calls: Arc::new(watch::Sender::new(0)),
            issued: Arc::new(watch::Sender::new(0)),
        };
        let reviewer = NoReviews {
            reviews: watch::Sender::new(0),
        };
        let reviews = reviewer.reviews.subscribe();
        let tls = load_tls(&config.tls).expect("server TLS");
        let server = Server::assemble(
            config,
            tls,
            Backends {
                kube: None,
                reviewer: Arc::new(reviewer),
                sts: Arc::new(sts.clone()),
                clock,
            },
        );
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": "team-a",
                "annotations": { "iam.amazonaws.com/permitted": "app-.*" },
            },
        }))
        .expect("namespace");
        let cluster = Arc::clone(server.cluster());
        cluster
            .namespaces
            .write()
            .expect("not poisoned")
            .apply(&namespace);
        let agent_tls = Rotating::load(
            TlsFiles {
                ca: files.ca_cert,
                cert: files.agent_cert,
                key: files.agent_key,
            },
            podiam_runtime::tls::client_config,
        )
        .expect("agent TLS");
        Rig {
            _dir: dir,
            network: MemoryNetwork::new(),
            agent_tls: Arc::new(agent_tls),
            sts,
            reviews,
            cluster,
            server: Some(server),
        }
    }

    /// Puts the running pod `name` of `team-a` at `ip` on [`NODE`], with `role`, into the
    /// server's view (as its watch would).
    fn add_pod(&self, name: &str, ip: &str, role: &str) {
        self.add_pod_on(NODE, name, ip, role);
    }

    /// Labels `team-a` `podiam.io/pod-identity=required` in the server's view (as its watch
    /// would): its pods' roles with their tokens only.
    fn require_tokens(&self) {
        let required: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": "team-a",
                "annotations": { "iam.amazonaws.com/permitted": "app-.*" },
                "labels": { "podiam.io/pod-identity": "required" },
            },
        }))
        .expect("namespace");
        self.cluster
            .namespaces
            .write()
            .expect("not poisoned")
            .apply(&required);
    }

    /// [`Rig::add_pod`] on `node`.
    fn add_pod_on(&self, node: &str, name: &str, ip: &str, role: &str) {
        self.put_pod(node, name, ip, json!({ "iam.amazonaws.com/role": role }));
    }

    /// [`Rig::add_pod`] on `node`, with `annotations`.
    fn put_pod(&self, node: &str, name: &str, ip: &str, annotations: serde_json::Value) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "uid": format!("uid-{name}"),
                "annotations": annotations,
            },
            "spec": { "nodeName": node, "containers": [] },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
        }))
        .expect("pod");
        self.apply_pod(&pod);
    }

    /// Puts `pod` in the view, and tells everyone who follows it (the credential upkeep,
    /// node streams).
    fn apply_pod(&self, pod: &Pod) {
        let record = PodRecord::from_pod(pod).expect("a pod record");
        self.cluster
            .pods
            .write()
            .expect("not poisoned")
            .apply(record);
        self.cluster.mark_synced();
    }

    /// The agent pod of `node` (`agent-NODE`, running as the agents' ServiceAccount), whose
    /// token is `token("agent-token:NODE")`.
    fn add_agent_pod(&self, node: &str) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": format!("agent-{node}"),
                "namespace": "podiam",
                "uid": format!("uid-agent-{node}"),
            },
            "spec": { "nodeName": node, "serviceAccountName": "podiam-agent", "containers": [] },
            "status": { "phase": "Running", "podIP": "10.2.0.1", "podIPs": [{ "ip": "10.2.0.1" }] },
        }))
        .expect("pod");
        self.apply_pod(&pod);
    }

    /// Serves the server on the in-memory network until `shutdown`; what `serve` returned,
    /// and when.
    fn serve(
        &mut self,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<(anyhow::Result<()>, Instant)> {
        let server = self.server.take().expect("served once");
        let listeners = Listeners {
            grpc: self.network.listen(GRPC),
            health: self.network.listen(HEALTH),
            webhook: None,
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let served = server.serve(listeners, shutdown).await;
            (served, Instant::now())
        })
    }

    /// A new connection to the server, as the agent makes it.
    async fn connect(&self) -> Result<PodiamClient<Channel>, tonic::transport::Error> {
        Ok(PodiamClient::new(self.channel().await?))
    }

    /// A new connection to the server with the agent's certificate, from [`CALLER`].
    async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        let connector = TlsConnector::new(GRPC, "localhost", Arc::clone(&self.agent_tls))
            .expect("a server name")
            .over(self.network.dialer(CALLER));
        Endpoint::from_static("http://10.0.0.1:8443")
            .connect_with_connector(connector)
            .await
    }
}

/// The server's command line in a [`Rig`]: its certificates in `files`, a base ARN,
/// `--node-binding warn` unless `flags` name a mode, then `flags`.
fn server_args(files: &podiam_certs::WrittenFiles, flags: &[&str]) -> Vec<String> {
    let path = |p: &std::path::Path| p.display().to_string();
    let mut args = vec![
        "podiam-server".to_string(),
        format!("--tls-ca={}", path(&files.ca_cert)),
        format!("--tls-cert={}", path(&files.server_cert)),
        format!("--tls-key={}", path(&files.server_key)),
        "--base-role-arn=arn:aws:iam::123456789012:role/".to_string(),
    ];
    if !flags.iter().any(|f| f.starts_with("--node-binding")) {
        args.push("--node-binding=warn".to_string());
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    args
}

/// Waits until the count `counter` reaches `n`.
async fn count_reaches(counter: &watch::Sender<usize>, n: usize, what: &str) {
    let mut seen = counter.subscribe();
    tokio::time::timeout(PATIENCE, seen.wait_for(|count| *count >= n))
        .await
        .unwrap_or_else(|_| panic!("{what}: {} after {PATIENCE:?}", *counter.borrow()))
        .expect("the counter lives");
}

fn credentials_of_web() -> GetCredentialsRequest {
    GetCredentialsRequest {
        ip: WEB_IP.into(),
        role_name: "app-reader".into(),
        node_name: NODE.into(),
        pod_token: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_ends_node_streams_at_once_then_answers_until_its_delay_is_over() {
    let mut rig = Rig::new(&["--shutdown-delay=3s", "--shutdown-timeout=10s"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let health = client.health(HealthRequest {}).await.expect("health");
    assert!(health.get_ref().synced && !health.get_ref().draining);
    let mut stream = synced_stream(&mut client).await;
    // A call under way when the drain begins, whose STS call takes 5 s: within the delay
    // and the timeout together.
    *rig.sts.latency.lock().expect("not poisoned") = Duration::from_secs(5);
    let slow = {
        let mut client = client.clone();
        tokio::spawn(async move { client.get_credentials(credentials_of_web()).await })
    };
    count_reaches(&rig.sts.calls, 1, "the slow call reaching STS").await;

    let began = Instant::now();
    shutdown.cancel();
    // At once: the node stream ends saying not-ready, and Health says draining.
    let ended = stream.message().await.expect_err("the stream ends");
    assert_eq!(Reason::of(&ended), Some(Reason::NotReady), "{ended:?}");
    assert_eq!(began.elapsed(), Duration::ZERO);
    let health = client.health(HealthRequest {}).await.expect("health");
    assert!(health.get_ref().draining);
    // During the delay a new connection is still taken and answered…
    tokio::time::sleep_until(began + Duration::from_millis(2999)).await;
    let mut late = rig.connect().await.expect("accepted during the delay");
    let health = late.health(HealthRequest {}).await.expect("answered");
    assert!(health.get_ref().draining);
    // …and none once it is over.
    tokio::time::sleep_until(began + Duration::from_millis(3001)).await;
    assert!(rig.connect().await.is_err(), "a connection after the delay");
    // The call under way is answered, and the server stops as soon as nothing is under way.
    let answered = slow.await.expect("joins").expect("answered");
    assert!(answered.get_ref().credentials.is_some());
    let (served, stopped) = serving.await.expect("joins");
    served.expect("a clean stop");
    assert_eq!(stopped - began, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn no_stream_follows_a_node_without_a_name() {
    // Under --node-binding warn an unproven caller is answered; a stream of the node ""
    // would carry every pod of the cluster.
    let mut rig = Rig::new(&["--node-binding=warn"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    for node_name in ["", "Not_A_Node"] {
        let refused = client
            .watch_node(WatchNodeRequest {
                node_name: node_name.into(),
                agent_version: "test".into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{node_name:?}"
        );
    }
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn node_streams_opened_and_refused_in_a_loop_are_logged_once_a_minute() {
    let (_guard, logs) = podiam_runtime::telemetry::capture_logs();
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..20 {
        let asked = client
            .watch_node(WatchNodeRequest {
                node_name: NODE.into(),
                agent_version: "test".into(),
            })
            .await;
        match asked {
            Ok(stream) => open.push(stream),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("{status:?}"),
        }
    }
    assert_eq!((open.len(), refused), (4, 16), "four places per caller");
    let text = logs.text();
    let lines = |level: &str, what: &str| {
        text.lines()
            .filter(|l| l.contains(level) && l.contains(what))
            .count()
    };
    assert_eq!(lines(" INFO ", "node stream opened"), 1, "{text}");
    assert_eq!(lines(" DEBUG ", "node stream opened"), 3, "{text}");
    assert_eq!(lines(" WARN ", "node stream refused"), 1, "{text}");
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_node_stream_beats_every_second_while_other_nodes_change() {
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let mut stream = synced_stream(&mut client).await;
    // Pods come to another node every 400 ms: nothing for this stream to send, but each
    // change wakes it. Its agent must still hear from it every second.
    let began = Instant::now();
    let mut changes = 0;
    let mut beats = Vec::new();
    while beats.len() < 3 {
        tokio::select! {
            event = stream.message() => {
                let event = event.expect("an event").expect("open");
                assert!(
                    matches!(event.event, Some(node_event::Event::Heartbeat(_))),
                    "only heartbeats: {event:?}"
                );
                beats.push(began.elapsed());
            }
            () = tokio::time::sleep(Duration::from_millis(400)) => {
                changes += 1;
                assert!(changes < 20, "no heartbeat in 8 s of changes elsewhere: {beats:?}");
                let ip = format!("10.2.0.{changes}");
                rig.add_pod_on("node-2", &format!("busy-{changes}"), &ip, "app-reader");
            }
        }
    }
    let second = Duration::from_secs(1);
    assert_eq!(beats, [second, 2 * second, 3 * second]);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn health_says_the_view_is_stale_while_a_watch_keeps_failing_and_no_longer() {
    let mut rig = Rig::new(&[]);
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let stale = |client: &mut PodiamClient<Channel>| {
        let mut client = client.clone();
        async move {
            let health = client.health(HealthRequest {}).await.expect("health");
            assert!(health.get_ref().synced, "still synced, still answering");
            health.get_ref().stale
        }
    };
    assert!(!stale(&mut client).await);
    // The pods watch fails every 5 s (the watches' longest backoff), with no success.
    let began = Instant::now();
    for _ in 0..3 {
        rig.cluster.failures.failed("pods", Instant::now());
        assert!(!stale(&mut client).await, "at {:?}", began.elapsed());
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(stale(&mut client).await, "failing for 15 s");
    // A success ends it at once.
    rig.cluster.failures.succeeded("pods", Instant::now());
    assert!(!stale(&mut client).await);
    // Failures that stop (the watch made again, on a resource with nothing to say) end it
    // 40 s after the last one.
    for _ in 0..4 {
        rig.cluster.failures.failed("namespaces", Instant::now());
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(stale(&mut client).await);
    tokio::time::sleep(Duration::from_secs(34)).await;
    assert!(stale(&mut client).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!stale(&mut client).await);
    // One failure alone, however long ago, is no spell of failing.
    rig.cluster.failures.failed("pods", Instant::now());
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!stale(&mut client).await);
    shutdown.cancel();
    serving.await.expect("joins").0.expect("a clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_drain_gives_requests_under_way_the_timeout_and_no_more() {
    let mut rig = Rig::new(&["--shutdown-delay=1s", "--shutdown-timeout=2s"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let client = rig.connect().await.expect("connects");
    // A call stuck in a TokenReview for an hour.
    let _stuck = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut request = tonic::Request::new(GetPodRoleRequest {
                ip: WEB_IP.into(),
                node_name: NODE.into(),
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", token("slow")).parse().expect("ascii"),
            );
            client.get_pod_role(request).await
        })
    };
    let mut reviews = rig.reviews.clone();
    reviews
        .wait_for(|n| *n >= 1)
        .await
        .expect("the stuck call is reviewed");

    let began = Instant::now();
    shutdown.cancel();
    let (served, stopped) = serving.await.expect("joins");
    served.expect("a clean stop");
    assert_eq!(stopped - began, Duration::from_secs(1 + 2));
}

#[tokio::test(start_paused = true)]
async fn credentials_are_prefetched_refreshed_at_half_life_and_retried_with_backoff() {
    let mut rig = Rig::new(&[]);
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");

    // A pod appears: its role's credentials are fetched at once, before it asks…
    let began = Instant::now();
    rig.add_pod("web", WEB_IP, "app-reader");
    count_reaches(&rig.sts.issued, 1, "prefetch").await;
    assert_eq!(began.elapsed(), Duration::ZERO);
    // …so its first request needs no STS call.
    let first = client
        .get_credentials(credentials_of_web())
        .await
        .expect("credentials")
        .into_inner()
        .credentials
        .expect("credentials");
    assert_eq!(*rig.sts.calls.borrow(), 1);

    // Refreshed in the background at half their hour, by the upkeep that runs every 10 s.
    count_reaches(&rig.sts.issued, 2, "refresh").await;
    let refreshed_at = began.elapsed();
    assert!(
        refreshed_at >= Duration::from_secs(1800) && refreshed_at <= Duration::from_secs(1810),
        "refreshed {refreshed_at:?} after issue"
    );
    let second = client
        .get_credentials(credentials_of_web())
        .await
        .expect("credentials")
        .into_inner()
        .credentials
        .expect("credentials");
    assert_ne!(second.access_key_id, first.access_key_id);

    // STS fails from the next refresh on (half an hour later), for five minutes.
    rig.sts.down.store(true, Ordering::SeqCst);
    let calls = *rig.sts.calls.borrow();
    count_reaches(&rig.sts.calls, calls + 1, "the refresh that fails").await;
    let outage = Instant::now();
    tokio::time::sleep_until(outage + Duration::from_secs(300)).await;
    let during = *rig.sts.calls.borrow() - calls;
    // Backoff (1 s doubling to 60 s, with equal jitter) on the 10 s upkeep: 10 to 15 calls
    // (the most with the least jitter), not one per upkeep pass (30); an upkeep call makes
    // one attempt.
    assert!(
        (8..=15).contains(&during),
        "{during} STS calls in a 5-minute outage"
    );
    // Meanwhile the pod is still served what the cache holds.
    let served = client
        .get_credentials(credentials_of_web())
        .await
        .expect("still served during the outage")
        .into_inner()
        .credentials
        .expect("credentials");
    assert_eq!(served.access_key_id, second.access_key_id);

    // Back: fresh credentials within one longest backoff and one upkeep interval.
    rig.sts.down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    count_reaches(&rig.sts.issued, 3, "the refresh after the outage").await;
    assert!(
        recovered.elapsed() <= Duration::from_secs(60 + 10),
        "refreshed {:?} after STS came back",
        recovered.elapsed()
    );
    shutdown.cancel();
    let (served, _) = serving.await.expect("joins");
    served.expect("a clean stop");
}

#[tokio::test(start_paused = true)]
async fn before_its_first_list_a_server_tells_agents_it_is_not_ready() {
    // Enforced binding: before its first list the server knows no agent pod to bind a token
    // to. That is the server not ready (the agent asks another replica), not the agent's
    // identity refused (which would make the agent report itself not ready).
    let mut rig = Rig::unsynced(&["--node-binding=enforce"]);
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let refused = client
        .get_credentials(credentials_of_web())
        .await
        .expect_err("nothing is known yet");
    assert_eq!(Reason::of(&refused), Some(Reason::NotReady), "{refused:?}");
    // Synced, the same call (it carries no token) is the agent's identity refused.
    rig.add_pod("web", WEB_IP, "app-reader");
    let refused = client
        .get_credentials(credentials_of_web())
        .await
        .expect_err("no token");
    assert_eq!(
        Reason::of(&refused),
        Some(Reason::AgentUnauthenticated),
        "{refused:?}"
    );
    shutdown.cancel();
    let (served, _) = serving.await.expect("joined");
    served.expect("served");
}

#[tokio::test(start_paused = true)]
async fn an_unproven_caller_lifts_no_taint_even_when_binding_only_warns() {
    // --node-binding warn answers unproven agents' questions; a node's taint is another
    // matter: lifting it for an unproven caller would open the node to pods before its rules.
    let mut rig = Rig::new(&[]);
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let refused = client
        .node_ready(podiam_proto::v1::NodeReadyRequest {
            node_name: NODE.to_string(),
        })
        .await
        .expect_err("an agent without a token proves no node");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A name no node can have is refused before anything is looked up or logged.
    let refused = client
        .node_ready(podiam_proto::v1::NodeReadyRequest {
            node_name: "x".repeat(30_000),
        })
        .await
        .expect_err("not a node name");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    shutdown.cancel();
    let (served, _) = serving.await.expect("joined");
    served.expect("served");
}

#[tokio::test(start_paused = true)]
async fn a_namespace_that_requires_tokens_gives_its_roles_with_the_pods_token_only() {
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    rig.require_tokens();
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    // By address alone (the metadata endpoint): neither the role nor credentials.
    let role = client
        .get_pod_role(GetPodRoleRequest {
            ip: WEB_IP.into(),
            node_name: NODE.into(),
        })
        .await
        .expect_err("refused");
    let credentials = client
        .get_credentials(credentials_of_web())
        .await
        .expect_err("refused");
    for refused in [role, credentials] {
        assert_eq!(
            Reason::of(&refused),
            Some(Reason::TokenRequired),
            "{refused:?}"
        );
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused
                .message()
                .contains("podiam.io/pod-identity=required"),
            "{refused:?}"
        );
    }
    // With the pod's own token: its credentials.
    let issued = client
        .get_credentials(GetCredentialsRequest {
            pod_token: token("pod-token:web"),
            ..credentials_of_web()
        })
        .await
        .expect("the pod's token")
        .into_inner();
    assert_eq!(issued.pod.expect("a pod").name, "web");
    shutdown.cancel();
    serving.await.expect("joined").0.expect("served");
}

#[tokio::test(start_paused = true)]
async fn a_pods_token_proves_only_the_pod_at_the_address() {
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    rig.add_pod("other", "10.1.0.6", "app-reader");
    let shutdown = CancellationToken::new();
    let serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let with_token = |token: &str| GetCredentialsRequest {
        pod_token: token.into(),
        ..credentials_of_web()
    };
    let issued = client
        .get_credentials(with_token(&token("pod-token:web")))
        .await
        .expect("web's own token, from web's address")
        .into_inner();
    assert_eq!(issued.pod.expect("a pod").name, "web");
    for (name, says) in [
        ("pod-token:other", "bound to pod team-a/other"),
        ("a-stolen-jwt", "not accepted"),
    ] {
        let token = token(name);
        let refused = client
            .get_credentials(with_token(&token))
            .await
            .expect_err("refused");
        assert_eq!(
            Reason::of(&refused),
            Some(Reason::PodTokenRefused),
            "{token}"
        );
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{token}");
        assert!(refused.message().contains(says), "{token}: {refused:?}");
        // The sender of another pod's token is not told whose address it used.
        assert!(!refused.message().contains("team-a/web"), "{refused:?}");
    }
    let oversized = client
        .get_credentials(with_token(
            &"x".repeat(crate::service::MAX_POD_TOKEN_BYTES + 1),
        ))
        .await
        .expect_err("refused");
    assert_eq!(oversized.code(), tonic::Code::InvalidArgument);
    // Another spelling of web's own token (the API server would take it: it strips the
    // `=`) is refused unreviewed, so that no spelling costs a review of its own.
    let reviewed = *rig.reviews.borrow();
    let padded = format!("{}=", token("pod-token:web"));
    let refused = client
        .get_credentials(with_token(&padded))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("not base64url"), "{refused:?}");
    assert_eq!(*rig.reviews.borrow(), reviewed, "no review");
    shutdown.cancel();
    serving.await.expect("joined").0.expect("served");
}

/// Asks for web's credentials while STS takes 10 s to answer, and at 5 s (the request then
/// waits for STS: on paused time nothing else is due before) lets `meanwhile` change the
/// cluster; what the server answers.
async fn asked_while(
    meanwhile: impl FnOnce(&Rig),
) -> Result<tonic::Response<GetCredentialsResponse>, tonic::Status> {
    let mut rig = Rig::new(&[]);
    *rig.sts.latency.lock().expect("not poisoned") = Duration::from_secs(10);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let asked = tokio::spawn(async move { client.get_credentials(credentials_of_web()).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(*rig.sts.calls.borrow(), 1, "the request waits for STS");
    assert_eq!(*rig.sts.issued.borrow(), 0, "the request waits for STS");
    meanwhile(&rig);
    let answer = asked.await.expect("joins");
    assert_eq!(*rig.sts.issued.borrow(), 1, "STS answered");
    answer
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_grant_that_stands_are_handed_out() {
    let answer = asked_while(|_| {}).await.expect("credentials");
    assert!(answer.into_inner().credentials.is_some());
}

#[tokio::test(start_paused = true)]
async fn another_nodes_claim_of_the_address_meanwhile_does_not_refuse_the_pod() {
    // A pod on another node claims web's address (a stale record there, or one written
    // with that node's kubelet credentials): the asking agent's node still has one pod at
    // the address, the pod the credentials were fetched for.
    let answer = asked_while(|rig| rig.add_pod_on("node-2", "squatter", WEB_IP, "app-reader"))
        .await
        .expect("credentials");
    assert!(answer.into_inner().credentials.is_some());
}

#[tokio::test(start_paused = true)]
async fn credentials_are_for_the_session_the_pod_has_when_they_arrive() {
    let mut rig = Rig::new(&[]);
    *rig.sts.latency.lock().expect("not poisoned") = Duration::from_secs(10);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    let asked = tokio::spawn(async move { client.get_credentials(credentials_of_web()).await });
    count_reaches(&rig.sts.calls, 1, "the request's STS call").await;
    // While STS answers, the pod's external ID changes: another session of the same role.
    rig.put_pod(
        NODE,
        "web",
        WEB_IP,
        json!({ "iam.amazonaws.com/role": "app-reader", "iam.amazonaws.com/external-id": "x-1" }),
    );
    let answer = asked.await.expect("joins").expect("credentials");
    let credentials = answer.into_inner().credentials.expect("credentials");
    // The first call's credentials (ASIA1) were the old session's: not handed out.
    assert!(*rig.sts.issued.borrow() >= 2);
    assert_ne!(credentials.access_key_id, "ASIA1");
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_role_revoked_meanwhile_are_not_handed_out() {
    // The pod's role becomes one its namespace does not permit (`app-.*`).
    let refused = asked_while(|rig| rig.add_pod("web", WEB_IP, "db-admin"))
        .await
        .expect_err("refused");
    assert_eq!(
        Reason::of(&refused),
        Some(Reason::RoleNotPermitted),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_by_address_for_a_namespace_that_came_to_require_tokens_are_not_handed_out()
 {
    let refused = asked_while(Rig::require_tokens).await.expect_err("refused");
    assert_eq!(
        Reason::of(&refused),
        Some(Reason::TokenRequired),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_role_changed_meanwhile_are_not_handed_out() {
    // Another permitted role: the credentials fetched are the old role's.
    let refused = asked_while(|rig| rig.add_pod("web", WEB_IP, "app-writer"))
        .await
        .expect_err("refused");
    assert_eq!(Reason::of(&refused), Some(Reason::WrongRole), "{refused:?}");
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_pod_replaced_meanwhile_are_not_handed_out() {
    // The pod is deleted and its address given to another pod with the same role.
    let refused = asked_while(|rig| {
        rig.cluster
            .pods
            .write()
            .expect("not poisoned")
            .remove("uid-web");
        rig.add_pod("web-2", WEB_IP, "app-reader");
    })
    .await
    .expect_err("refused");
    assert_eq!(
        Reason::of(&refused),
        Some(Reason::UnknownPod),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_over_32_kib_is_not_read_and_a_call_ends_after_30_s() {
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let mut client = rig.connect().await.expect("connects");
    // A pod token is at most 16 KiB: a request of 40 KiB is refused as it arrives,
    // before anything reads its fields.
    let refused = client
        .get_credentials(GetCredentialsRequest {
            pod_token: "x".repeat(40 * 1024),
            ..credentials_of_web()
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    // A call stuck (here in a TokenReview that takes an hour) ends after 30 s.
    let began = Instant::now();
    let mut request = tonic::Request::new(GetPodRoleRequest {
        ip: WEB_IP.into(),
        node_name: NODE.into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("slow")).parse().expect("ascii"),
    );
    let ended = client.get_pod_role(request).await.expect_err("ended");
    assert_eq!(began.elapsed(), Duration::from_secs(30), "{ended:?}");
    shutdown.cancel();
}

/// A GetCredentials call on `channel` whose request never ends: its headers are sent, then
/// nothing, the stream left open. What the server answers.
async fn call_never_sent(channel: Channel) -> Result<(), tonic::Status> {
    call_never_sent_as(channel, None).await
}

/// [`call_never_sent`] with `token` as the call's bearer token.
async fn call_never_sent_as(channel: Channel, token: Option<String>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let never = futures::stream::pending::<GetCredentialsRequest>();
    let path = http::uri::PathAndQuery::from_static("/podiam.v1.Podiam/GetCredentials");
    let codec = tonic_prost::ProstCodec::<GetCredentialsRequest, GetCredentialsResponse>::default();
    let mut request = tonic::Request::new(never);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ascii");
        request.metadata_mut().insert("authorization", value);
    }
    grpc.client_streaming(request, path, codec)
        .await
        .map(|_| ())
}

/// NODE's node stream on `client`, read up to its snapshot's end (Synced).
async fn synced_stream(
    client: &mut PodiamClient<Channel>,
) -> tonic::codec::Streaming<podiam_proto::v1::NodeEvent> {
    let mut stream = client
        .watch_node(WatchNodeRequest {
            node_name: NODE.into(),
            agent_version: "test".into(),
        })
        .await
        .expect("a node stream")
        .into_inner();
    loop {
        let event = stream.message().await.expect("an event").expect("open");
        if matches!(event.event, Some(node_event::Event::Synced(_))) {
            return stream;
        }
    }
}

/// web's credentials, asked on `channel` by the agent of `node` (its token).
async fn asking_as(
    channel: Channel,
    node: &str,
) -> Result<tonic::Response<GetCredentialsResponse>, tonic::Status> {
    asking_with(channel, &token(&format!("agent-token:{node}"))).await
}

/// web's credentials, asked on `channel` with `token` as the agent's.
async fn asking_with(
    channel: Channel,
    token: &str,
) -> Result<tonic::Response<GetCredentialsResponse>, tonic::Status> {
    let mut request = tonic::Request::new(credentials_of_web());
    let value = format!("Bearer {token}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", value);
    PodiamClient::new(channel).get_credentials(request).await
}

#[tokio::test(start_paused = true)]
async fn another_spelling_of_an_agents_token_is_refused_unreviewed() {
    let mut rig = Rig::new(&["--node-binding=enforce"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    rig.add_agent_pod(NODE);
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let channel = rig.channel().await.expect("connects");
    // The API server would take these as the agent's token (it strips the `=`), but each
    // would be reviewed, and remembered, as a token of its own.
    let own = token(&format!("agent-token:{NODE}"));
    for other in [format!("{own}="), format!("{own}==")] {
        let refused = asking_with(channel.clone(), &other)
            .await
            .expect_err("refused");
        assert_eq!(
            Reason::of(&refused),
            Some(Reason::AgentUnauthenticated),
            "{refused:?}"
        );
        assert!(refused.message().contains("not base64url"), "{refused:?}");
    }
    assert_eq!(*rig.reviews.borrow(), 0, "nothing reviewed");
    asking_with(channel, &own).await.expect("the token itself");
    assert_eq!(*rig.reviews.borrow(), 1);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn proven_agents_calls_are_read_in_their_nodes_places_not_anyones() {
    use podiam_runtime::reading::{MAX_READING_PER_ADDRESS, MAX_READING_PER_NODE};
    let mut rig = Rig::new(&["--node-binding=enforce"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    rig.add_agent_pod(NODE);
    rig.add_agent_pod("node-2");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    // Each batch of calls held unsent fills a connection's streams; the others go on this.
    let channel = rig.channel().await.expect("connects");
    let (held, node_held) = (rig.channel().await, rig.channel().await);
    let (held, node_held) = (held.expect("connects"), node_held.expect("connects"));
    // node-1's agent's token is reviewed at its first call, and remembered.
    asking_as(channel.clone(), NODE)
        .await
        .expect("node-1's agent answered");
    assert_eq!(*rig.reviews.borrow(), 1);
    // From this address (every call here comes from one): calls without a proven token,
    // never sent, take the address's places; one more is refused.
    let mut stuck: Vec<_> = (0..MAX_READING_PER_ADDRESS)
        .map(|_| tokio::spawn(call_never_sent_as(held.clone(), Some(token("made-up")))))
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let refused = call_never_sent(channel.clone()).await.expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // node-1's agent, from the same address, is read in its node's places and answered.
    asking_as(channel.clone(), NODE)
        .await
        .expect("answered beside them");
    // node-2's agent, whose token this server has not seen, is refused among the unproven;
    // its token is reviewed meanwhile, and its next call is read in its node's places
    // (and refused for asking about a pod of another node).
    let first = asking_as(channel.clone(), "node-2")
        .await
        .expect_err("no place");
    assert_eq!(first.code(), tonic::Code::ResourceExhausted, "{first:?}");
    let deadline = Instant::now() + Duration::from_secs(1);
    let other = loop {
        let answer = asking_as(channel.clone(), "node-2")
            .await
            .expect_err("refused");
        if answer.code() != tonic::Code::ResourceExhausted {
            break answer;
        }
        // The review takes no time on this clock: a second of retries is far beyond it.
        assert!(Instant::now() < deadline, "node-2's token never learnt");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert_eq!(*rig.reviews.borrow(), 2, "its token reviewed once");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    // Its node's places are its own: once it holds them all, its next call is refused, and
    // node-2's agent is still read.
    let token = token(&format!("agent-token:{NODE}"));
    stuck.extend(
        (0..MAX_READING_PER_NODE)
            .map(|_| tokio::spawn(call_never_sent_as(node_held.clone(), Some(token.clone())))),
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    let refused = call_never_sent_as(channel.clone(), Some(token.clone()))
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let other = asking_as(channel.clone(), "node-2")
        .await
        .expect_err("read, then refused");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    for call in stuck {
        let ended = call.await.expect("joins").expect_err("ended");
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    }
    shutdown.cancel();
}

/// Whoever holds one node's agent certificate and token, calling in a loop, has its node's
/// share of the replica and no more: its calls past the burst (and the rate since) are shed
/// without a reason, so that an honest agent asks another replica; another node's agent is
/// answered meanwhile; the share comes back with time.
#[tokio::test(start_paused = true)]
async fn one_nodes_agent_calling_in_a_loop_has_its_nodes_share_only() {
    use crate::service::NODE_CALL_BURST_SECONDS;
    const NODE_CALLS_PER_SECOND: f64 = 100.0;
    const NODE_CALL_BURST: u32 = 100 * NODE_CALL_BURST_SECONDS;
    let mut rig = Rig::new(&["--node-binding=enforce", "--agent-call-rate=100"]);
    rig.add_pod("web", WEB_IP, "app-reader");
    rig.add_agent_pod(NODE);
    rig.add_agent_pod("node-2");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    let channel = rig.channel().await.expect("connects");
    let began = Instant::now();
    // What may have been answered by the time `at`: the burst and the rate since.
    let share = |at: Instant| {
        NODE_CALL_BURST as usize
            + (at.duration_since(began).as_secs_f64() * NODE_CALLS_PER_SECOND) as usize
            + 1
    };
    let mut answered = 0;
    let shed = loop {
        match asking_as(channel.clone(), NODE).await {
            Ok(_) => answered += 1,
            Err(status) => break status,
        }
        assert!(answered <= share(Instant::now()), "{answered} answered");
    };
    assert!(answered >= NODE_CALL_BURST as usize, "{answered} answered");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert_eq!(Reason::of(&shed), None, "shed, not refused: {shed:?}");
    // Its node stream is not counted: the agent still follows its node, and answers its
    // pods from its cache.
    let mut request = tonic::Request::new(WatchNodeRequest {
        node_name: NODE.into(),
        agent_version: "test".into(),
    });
    let bearer = format!("Bearer {}", token(&format!("agent-token:{NODE}")));
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().expect("ascii"));
    let mut stream = PodiamClient::new(channel.clone())
        .watch_node(request)
        .await
        .expect("a node stream")
        .into_inner();
    while !matches!(
        stream
            .message()
            .await
            .expect("an event")
            .expect("open")
            .event,
        Some(node_event::Event::Synced(_))
    ) {}
    // node-2's agent is read and answered (refused, as ever, for another node's pod).
    let other = asking_as(channel.clone(), "node-2")
        .await
        .expect_err("another node's pod");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    // A second later node-1's agent has its rate again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..NODE_CALLS_PER_SECOND as usize {
        asking_as(channel.clone(), NODE)
            .await
            .expect("answered again");
    }
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn calls_whose_requests_never_end_are_bounded_per_address_and_end_after_5_s() {
    use podiam_runtime::reading::{MAX_READING_PER_ADDRESS, READ_TIMEOUT};
    let mut rig = Rig::new(&[]);
    rig.add_pod("web", WEB_IP, "app-reader");
    let shutdown = CancellationToken::new();
    let _serving = rig.serve(&shutdown);
    // A holder of the agents' certificate, with no proven agent's token, opens its
    // address's share of calls and sends none of their requests.
    let held = rig.channel().await.expect("connects");
    let began = Instant::now();
    let stuck: Vec<_> = (0..MAX_READING_PER_ADDRESS)
        .map(|_| tokio::spawn(call_never_sent(held.clone())))
        .collect();
    // On paused time the clock moves only once every task waits: the server has taken
    // all their headers in.
    tokio::time::sleep(Duration::from_millis(1)).await;
    // One more from that address, on a new connection, is refused at once, unread.
    let another = rig.channel().await.expect("connects");
    let refused = call_never_sent(another.clone()).await.expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(began.elapsed(), Duration::from_millis(1), "refused at once");
    // The calls whose requests never came end when their time is up, and the address is
    // answered again.
    for call in stuck {
        let ended = call.await.expect("joins").expect_err("ended");
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    }
    assert_eq!(began.elapsed(), READ_TIMEOUT);
    let answer = PodiamClient::new(another)
        .get_credentials(credentials_of_web())
        .await
        .expect("answered again");
    assert!(answer.into_inner().credentials.is_some());
    shutdown.cancel();
}
