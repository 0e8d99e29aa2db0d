//! The agent's timing, in process on paused time ([`tokio::time::pause`]): hedging a slow
//! replica after [`HEDGE_AFTER`](crate::replicas::HEDGE_AFTER), leaving a node stream
//! silent for 3 s or whose replica fails two health checks in a row, and waiting 500 ms for
//! an address the node's pods do not have, then at most 900 ms in all if the servers do not
//! know it either.
//!
//! A whole agent ([`Agent::build_over`], [`Agent::serve`]) runs against two fake server
//! replicas, each a tonic server over mutual TLS whose answers the test scripts; pods are
//! connections from their own addresses. Everything travels on an in-memory network
//! ([`MemoryNetwork`]): no byte waits for the kernel, so the paused clock only moves when
//! every task waits for a timer, and every duration measured below is exact.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::Stream;
use http_body_util::{BodyExt, Empty};
use podiam_proto::Reason;
use podiam_proto::v1::podiam_server::{Podiam, PodiamServer};
use podiam_proto::v1::{
    Credentials, ExplainRequest, ExplainResponse, GetCredentialsRequest, GetCredentialsResponse,
    GetPodRoleRequest, GetPodRoleResponse, HealthRequest, HealthResponse, NodeEvent, PodRef,
    PodState, StatusRequest, StatusResponse, WatchNodeRequest, node_event,
};
use podiam_runtime::memory::MemoryNetwork;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::config::{Cli, Command};
use crate::container::PATH;
use crate::{Agent, Listeners};

const AGENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)), 254);
const CONTAINER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)), 253);
const AGENT_HEALTH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)), 8182);
const REPLICAS: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8443),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8443),
];
const NODE: &str = "node-1";
const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const API: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 6);
const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/app-reader";
/// How long a test waits for a condition, in paused time: far beyond anything awaited.
const PATIENCE: Duration = Duration::from_secs(600);

/// A running pod of `team-a` on [`NODE`] with role `app-reader`.
fn pod(name: &str, ip: Ipv4Addr) -> PodState {
    PodState {
        pod: Some(PodRef {
            namespace: "team-a".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }),
        ip: ip.to_string(),
        role_name: "app-reader".into(),
        role_arn: "arn:aws:iam::123456789012:role/app-reader".into(),
        ..PodState::default()
    }
}

/// One fake replica: what it answers, and what it saw.
#[derive(Debug, Default)]
struct Replica {
    /// The pods it knows (all on [`NODE`]), by IP.
    pods: Mutex<BTreeMap<String, PodState>>,
    /// Addresses of pods it places on another node (node binding: refused `other-node`,
    /// naming nothing of the pod).
    elsewhere: Mutex<Vec<String>>,
    /// How long GetCredentials takes.
    credentials_delay: Mutex<Duration>,
    /// How long Health takes.
    health_delay: Mutex<Duration>,
    /// Its node streams send a heartbeat every second while this is set.
    heartbeats: AtomicBool,
    credentials_calls: AtomicUsize,
    pod_role_calls: AtomicUsize,
    /// The nodes agents reported ready (NodeReady).
    ready_reports: Mutex<Vec<String>>,
    /// NodeReady calls still to refuse (unavailable) before one is accepted.
    ready_refusals: AtomicUsize,
    /// When each node stream was opened.
    streams: Mutex<Vec<Instant>>,
    /// When its last heartbeat was sent.
    last_heartbeat: Mutex<Option<Instant>>,
    /// Events pushed into its latest node stream.
    push: Mutex<Option<mpsc::UnboundedSender<NodeEvent>>>,
    /// Its name in the replica set, given in Health answers.
    name: Mutex<String>,
    /// Its Health answers say its view is stale while this is set.
    stale: AtomicBool,
    /// Node streams are refused (unavailable) while this is set: the agent's table stays
    /// unsynced and every request is a server call.
    streams_refused: AtomicBool,
    /// The pod tokens it accepts (for the pod at the request's address, whichever it is);
    /// any other is refused as the API server would.
    pod_tokens: Mutex<Vec<String>>,
    /// STS refuses every AssumeRole while this is set (the pod and its token checked first,
    /// as the servers do).
    sts_refuses: AtomicBool,
    /// GetCredentials fails with an error podiam does not define while this is set.
    fails: AtomicBool,
    /// STS cannot be reached from this replica while this is set (its answer says so once
    /// the pod is checked, as the servers' does).
    sts_unavailable: AtomicBool,
    /// STS throttles this replica's AssumeRole calls while this is set (the account's rate
    /// spent), its refusal marked so.
    sts_throttled: AtomicBool,
    /// Calls about pods are refused as from an agent it cannot prove while this is set (its
    /// token's pod not in its view yet), the refusal naming the agent's pod; node streams
    /// go on.
    agent_unproven: AtomicBool,
}

impl Replica {
    /// The refusal of an agent call while [`Replica::agent_unproven`] is set.
    fn unproven(&self) -> Result<(), Status> {
        if self.agent_unproven.load(Ordering::SeqCst) {
            return Err(Reason::AgentUnauthenticated
                .status("the token's pod podiam/podiam-agent-x7 (uid 9f3c) is not a running pod"));
        }
        Ok(())
    }
}

impl Replica {
    fn streams(&self) -> Vec<Instant> {
        self.streams.lock().expect("not poisoned").clone()
    }

    fn set_credentials_delay(&self, delay: Duration) {
        *self.credentials_delay.lock().expect("not poisoned") = delay;
    }

    /// Adds a pod, telling the node stream open on this replica, if any.
    fn add_pod(&self, state: PodState) {
        self.pods
            .lock()
            .expect("not poisoned")
            .insert(state.ip.clone(), state.clone());
        self.announce(state);
    }

    /// Tells the node stream open on this replica, if any, of a pod its other calls do not
    /// know yet (a stream from a replica whose view is ahead of the one answering them).
    fn announce(&self, state: PodState) {
        if let Some(push) = self.push.lock().expect("not poisoned").as_ref() {
            let _ = push.send(NodeEvent {
                event: Some(node_event::Event::Upsert(state)),
            });
        }
    }

    /// Adds a pod without telling any node stream: the replica knows it, the agent's table
    /// does not (a stream behind its replica, or from another one).
    fn place_pod(&self, state: PodState) {
        let mut pods = self.pods.lock().expect("not poisoned");
        pods.insert(state.ip.clone(), state);
    }

    /// Removes the pod at `ip`, telling the node stream open on this replica, if any.
    fn remove_pod(&self, ip: Ipv4Addr) {
        let removed = self
            .pods
            .lock()
            .expect("not poisoned")
            .remove(&ip.to_string());
        let uid = removed.and_then(|state| state.pod).map(|pod| pod.uid);
        if let (Some(uid), Some(push)) = (uid, self.push.lock().expect("not poisoned").as_ref()) {
            let _ = push.send(NodeEvent {
                event: Some(node_event::Event::DeleteUid(uid)),
            });
        }
    }

    fn pod_at(&self, ip: &str) -> Option<PodState> {
        self.pods.lock().expect("not poisoned").get(ip).cloned()
    }
}

/// The gRPC face of a [`Replica`].
#[derive(Clone, Debug)]
struct Fake(Arc<Replica>);

type Events = Pin<Box<dyn Stream<Item = Result<NodeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Podiam for Fake {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        self.0.pod_role_calls.fetch_add(1, Ordering::SeqCst);
        self.0.unproven()?;
        let ip = request.into_inner().ip;
        if self.0.elsewhere.lock().expect("not poisoned").contains(&ip) {
            return Err(Reason::OtherNode.status(format!("{ip} is no pod of node {NODE}")));
        }
        let state = self.0.pod_at(&ip).ok_or_else(|| {
            Reason::UnknownPod.status(format!("no pod known with IP {ip} on node {NODE}"))
        })?;
        Ok(Response::new(GetPodRoleResponse {
            pod: state.pod,
            role_name: state.role_name,
            role_arn: state.role_arn,
        }))
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<GetCredentialsResponse>, Status> {
        self.0.credentials_calls.fetch_add(1, Ordering::SeqCst);
        let delay = *self.0.credentials_delay.lock().expect("not poisoned");
        tokio::time::sleep(delay).await;
        if self.0.fails.load(Ordering::SeqCst) {
            return Err(Status::internal("the test's replica fails"));
        }
        self.0.unproven()?;
        let request = request.into_inner();
        let tokens = self.0.pod_tokens.lock().expect("not poisoned");
        let refused = !request.pod_token.is_empty() && !tokens.contains(&request.pod_token);
        drop(tokens);
        if refused {
            return Err(Reason::PodTokenRefused.status("the token is not accepted"));
        }
        let ip = request.ip;
        let state = self
            .0
            .pod_at(&ip)
            .ok_or_else(|| Reason::UnknownPod.status("no such pod"))?;
        if state.role_arn.is_empty() {
            return Err(Reason::NoRole.status("the pod has no role"));
        }
        if self.0.sts_refuses.load(Ordering::SeqCst) {
            return Err(Reason::StsRefused.status("STS refused AssumeRole: AccessDenied"));
        }
        if self.0.sts_unavailable.load(Ordering::SeqCst) {
            return Err(Reason::StsUnavailable.status("STS could not be reached"));
        }
        if self.0.sts_throttled.load(Ordering::SeqCst) {
            let mut status = Reason::StsUnavailable.status("STS throttled AssumeRole");
            status.metadata_mut().insert(
                podiam_proto::STS_THROTTLED_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("true"),
            );
            return Err(status);
        }
        let now = podiam_runtime::clock::now_unix();
        Ok(Response::new(GetCredentialsResponse {
            pod: state.pod,
            credentials: Some(Credentials {
                access_key_id: "ASIATEST".into(),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration_unix: now + 3600,
                issued_unix: now,
                role_arn: state.role_arn,
                valid_for_ms: 0,
            }),
            credential_key: state.credential_key,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let delay = *self.0.health_delay.lock().expect("not poisoned");
        tokio::time::sleep(delay).await;
        Ok(Response::new(HealthResponse {
            version: "test".into(),
            synced: true,
            draining: false,
            replica: self.0.name.lock().expect("not poisoned").clone(),
            stale: self.0.stale.load(Ordering::SeqCst),
        }))
    }

    type WatchNodeStream = Events;

    /// A snapshot of the pods, then what the test pushes, and a heartbeat every second
    /// while heartbeats are on; it never ends by itself.
    async fn watch_node(&self, _: Request<WatchNodeRequest>) -> Result<Response<Events>, Status> {
        if self.0.streams_refused.load(Ordering::SeqCst) {
            return Err(Status::unavailable("node streams refused by the test"));
        }
        self.0
            .streams
            .lock()
            .expect("not poisoned")
            .push(Instant::now());
        let (push, pushed) = mpsc::unbounded_channel();
        for state in self.0.pods.lock().expect("not poisoned").values() {
            let _ = push.send(NodeEvent {
                event: Some(node_event::Event::Upsert(state.clone())),
            });
        }
        let _ = push.send(NodeEvent {
            event: Some(node_event::Event::Synced(true)),
        });
        *self.0.push.lock().expect("not poisoned") = Some(push);
        let beats = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let events = futures::stream::unfold(
            (pushed, beats, Arc::clone(&self.0)),
            |(mut pushed, mut beats, replica)| async move {
                loop {
                    tokio::select! {
                        event = pushed.recv() => {
                            return event.map(|event| (Ok(event), (pushed, beats, replica)));
                        }
                        _ = beats.tick() => {
                            if replica.heartbeats.load(Ordering::SeqCst) {
                                *replica.last_heartbeat.lock().expect("not poisoned") =
                                    Some(Instant::now());
                                let beat = NodeEvent {
                                    event: Some(node_event::Event::Heartbeat(true)),
                                };
                                return Some((Ok(beat), (pushed, beats, replica)));
                            }
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(events)))
    }

    async fn explain(
        &self,
        _: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn node_ready(
        &self,
        request: Request<podiam_proto::v1::NodeReadyRequest>,
    ) -> Result<Response<podiam_proto::v1::NodeReadyResponse>, Status> {
        let node = request.into_inner().node_name;
        let refuse = self
            .0
            .ready_refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Err(Status::unavailable("cannot patch the node now"));
        }
        self.0
            .ready_reports
            .lock()
            .expect("not poisoned")
            .push(node);
        Ok(Response::new(podiam_proto::v1::NodeReadyResponse {
            taint_removed: true,
        }))
    }
}

/// Two fake replicas and an agent, on an in-memory network.
struct Rig {
    _dir: tempfile::TempDir,
    network: MemoryNetwork,
    replicas: [Arc<Replica>; 2],
    tasks: TaskTracker,
    stop: CancellationToken,
    /// The agent's NodeReady report, not yet started ([`Rig::report_ready`]).
    report: Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
}

impl Rig {
    /// Both replicas knowing `pods`, with heartbeats on, and the agent serving.
    async fn start(pods: &[PodState]) -> Rig {
        Rig::start_with(pods, false).await
    }

    /// [`Rig::start`], with every node stream refused from the start when `streams_refused`
    /// (the agent's table then never syncs).
    async fn start_with(pods: &[PodState], streams_refused: bool) -> Rig {
        podiam_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let files = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(dir.path(), false)
            .expect("written");
        let network = MemoryNetwork::new();
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let server_tls = Arc::new(
            podiam_runtime::rotate::Rotating::load(
                podiam_runtime::tls::TlsFiles {
                    ca: files.ca_cert.clone(),
                    cert: files.server_cert.clone(),
                    key: files.server_key.clone(),
                },
                podiam_runtime::tls::server_config,
            )
            .expect("server TLS"),
        );
        let replicas = [Arc::new(Replica::default()), Arc::new(Replica::default())];
        for (replica, addr) in replicas.iter().zip(REPLICAS) {
            for state in pods {
                replica.add_pod(state.clone());
            }
            replica.heartbeats.store(true, Ordering::SeqCst);
            replica
                .streams_refused
                .store(streams_refused, Ordering::SeqCst);
            let incoming = podiam_runtime::accept::accept_tls(
                network.listen(addr),
                Arc::clone(&server_tls),
                stop.clone(),
                &tasks,
                Arc::new(|| {}),
            );
            let server = tonic::transport::Server::builder()
                .add_service(PodiamServer::new(Fake(Arc::clone(replica))))
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
            tasks.spawn(server);
        }
        let path = |p: &std::path::Path| p.display().to_string();
        let args = [
            "podiam-agent".to_string(),
            "serve".to_string(),
            format!("--tls-ca={}", path(&files.ca_cert)),
            format!("--tls-cert={}", path(&files.agent_cert)),
            format!("--tls-key={}", path(&files.agent_key)),
            format!("--node-name={NODE}"),
            format!("--server=https://{},https://{}", REPLICAS[0], REPLICAS[1]),
            "--server-name=localhost".to_string(),
            format!("--token-file={}", path(&dir.path().join("no-token"))),
            format!("--token-key-file={}", path(&dir.path().join("keys"))),
        ];
        let Command::Serve(config) = Cli::try_parse_from(args).expect("flags parse").command else {
            panic!("serve expected");
        };
        let config = config.validate().expect("valid");
        let agent = Agent::build_over(config, network.dialer(AGENT.ip()))
            .await
            .expect("built");
        let listeners = Listeners {
            pods: network.listen(AGENT),
            container: Some(network.listen(CONTAINER)),
            pods6: None,
            container6: None,
            health: network.listen(AGENT_HEALTH),
        };
        let report = Box::pin(agent.report_node_ready(stop.clone()));
        tasks.spawn(agent.serve(listeners, stop.clone()));
        Rig {
            _dir: dir,
            network,
            replicas,
            tasks,
            stop,
            report: Mutex::new(Some(report)),
        }
    }

    /// Starts the agent's NodeReady report, as `main` does once the rules are in place.
    fn report_ready(&self) {
        let report = self.report.lock().expect("not poisoned").take();
        self.tasks.spawn(report.expect("reported once"));
    }

    /// Every NodeReady report the replicas accepted.
    fn ready_reports(&self) -> Vec<String> {
        self.replicas
            .iter()
            .flat_map(|r| r.ready_reports.lock().expect("not poisoned").clone())
            .collect()
    }

    /// One GET from `from` on a new connection to `to`: status and body.
    async fn get_from(&self, from: Ipv4Addr, to: SocketAddr, path: &str) -> (u16, String) {
        self.get_with(from, to, path, None).await
    }

    /// One GET from `from` on a new connection to `to`, with `authorization` as its
    /// `Authorization` header if given: status and body.
    async fn get_with(
        &self,
        from: Ipv4Addr,
        to: SocketAddr,
        path: &str,
        authorization: Option<&str>,
    ) -> (u16, String) {
        let authorization =
            authorization.map(|token| (::http::header::AUTHORIZATION.as_str(), token));
        self.send(from, to, "GET", path, authorization.as_slice())
            .await
    }

    /// One request from `from` on a new connection to `to`, with `headers`: status and body.
    async fn send(
        &self,
        from: Ipv4Addr,
        to: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let stream = self.network.connect(from.into(), to).expect("connects");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        let mut request = ::http::Request::builder()
            .method(method)
            .uri(path)
            .header(::http::header::HOST, "169.254.169.254");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).expect("request");
        let exchange = async move {
            let response = sender.send_request(request).await.expect("answered");
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.expect("body");
            (
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            )
        };
        let (answer, _) = tokio::join!(exchange, connection);
        answer
    }

    /// A pod's GET of the metadata service.
    async fn get(&self, pod: Ipv4Addr, path: &str) -> (u16, String) {
        self.get_from(pod, AGENT, path).await
    }

    /// Asks `path` from `pod` every 10 ms until it is answered `status` (the table has heard
    /// what the test told the node stream), failing after [`PATIENCE`] naming `what`.
    async fn wait_for_status(&self, pod: Ipv4Addr, path: &str, status: u16, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.get(pod, path).await.0 != status {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The agent's metric `name`, 0 when absent.
    async fn metric(&self, name: &str) -> u64 {
        let (_, text) = self
            .get_from(Ipv4Addr::LOCALHOST, AGENT_HEALTH, "/metrics")
            .await;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the agent holds a synced node stream, and returns the index of the
    /// replica it comes from: the pod `probe` is then answered from the agent's table,
    /// with no server call.
    async fn stream_synced(&self, probe: Ipv4Addr) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let calls = self.pod_role_calls();
            let holders: Vec<usize> = (0..2)
                .filter(|i| !self.replicas[*i].streams().is_empty())
                .collect();
            let (status, _) = self.get(probe, ROLES).await;
            if status == 200 && self.pod_role_calls() == calls && holders.len() == 1 {
                return holders[0];
            }
            assert!(Instant::now() < deadline, "no node stream synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pod_role_calls(&self) -> usize {
        self.replicas
            .iter()
            .map(|r| r.pod_role_calls.load(Ordering::SeqCst))
            .sum()
    }

    fn credentials_calls(&self) -> usize {
        self.replicas
            .iter()
            .map(|r| r.credentials_calls.load(Ordering::SeqCst))
            .sum()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_has_not_answered_after_300_ms_is_joined_by_another() {
    let rig = Rig::start(&[pod("web", WEB), pod("api", API)]).await;
    let holder = rig.stream_synced(WEB).await;
    let (slow, other) = (&rig.replicas[holder], &rig.replicas[1 - holder]);
    let credentials = format!("{ROLES}app-reader");

    // The stream's replica (asked first) takes 2 s: the other one is asked at 300 ms and
    // its answer wins.
    slow.set_credentials_delay(Duration::from_secs(2));
    let began = Instant::now();
    let (status, body) = rig.get(WEB, &credentials).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(began.elapsed(), crate::replicas::HEDGE_AFTER);
    assert_eq!(slow.credentials_calls.load(Ordering::SeqCst), 1);
    assert_eq!(other.credentials_calls.load(Ordering::SeqCst), 1);
    assert_eq!(rig.metric("podiam_agent_server_failovers_total").await, 1);

    // One that answers within 300 ms is the only one asked (the slow one was passed over
    // until its next good health check).
    tokio::time::sleep(crate::replicas::HEALTH_INTERVAL * 2).await;
    slow.set_credentials_delay(Duration::from_millis(250));
    let began = Instant::now();
    let (status, body) = rig.get(API, &credentials).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(began.elapsed(), Duration::from_millis(250));
    assert_eq!(slow.credentials_calls.load(Ordering::SeqCst), 2);
    assert_eq!(other.credentials_calls.load(Ordering::SeqCst), 1);
    assert_eq!(rig.metric("podiam_agent_server_failovers_total").await, 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_node_is_reported_ready_once_and_refusals_are_retried_with_backoff() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    for replica in &rig.replicas {
        replica.ready_refusals.store(2, Ordering::SeqCst);
    }
    let began = Instant::now();
    rig.report_ready();
    let deadline = Instant::now() + PATIENCE;
    while rig.ready_reports().is_empty() {
        assert!(Instant::now() < deadline, "never reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rig.ready_reports(), [NODE]);
    // Each replica refused twice first: the agent kept trying, with backoff between the
    // attempts (at least its first 200 ms step), not in a busy loop.
    assert!(
        began.elapsed() >= Duration::from_millis(200),
        "{:?}",
        began.elapsed()
    );
    // Accepted once, never again.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(rig.ready_reports(), [NODE]);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_stream_silent_for_three_seconds_moves_to_another_replica() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    let holder = rig.stream_synced(WEB).await;
    let (silent, other) = (&rig.replicas[holder], &rig.replicas[1 - holder]);
    // Heartbeats flow, then stop: the replica hangs with its stream open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    silent.heartbeats.store(false, Ordering::SeqCst);
    let last = silent
        .last_heartbeat
        .lock()
        .expect("not poisoned")
        .expect("heartbeats were sent");

    let deadline = Instant::now() + PATIENCE;
    while other.streams().is_empty() {
        assert!(Instant::now() < deadline, "the stream never moved");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(other.streams()[0] - last, Duration::from_secs(3));
    assert_eq!(silent.streams().len(), 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_stream_moves_off_a_replica_failing_two_health_checks_in_a_row() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    let holder = rig.stream_synced(WEB).await;
    let (slow, other) = (&rig.replicas[holder], &rig.replicas[1 - holder]);
    // Heartbeats keep coming, but health answers come after the agent's 500 ms deadline.
    *slow.health_delay.lock().expect("not poisoned") = Duration::from_millis(600);
    let slowed = Instant::now();
    let deadline = slowed + PATIENCE;
    while other.streams().is_empty() {
        assert!(Instant::now() < deadline, "the stream never moved");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first check to miss its deadline ends within 1.5 s (a check a second, 500 ms
    // each); the stream leaves at the second of its own once-a-second ticks after that.
    let moved = other.streams()[0] - slowed;
    assert!(
        moved > Duration::from_secs(1) && moved <= Duration::from_millis(3500),
        "moved {moved:?} after the replica slowed"
    );
    let last = slow
        .last_heartbeat
        .lock()
        .expect("not poisoned")
        .expect("heartbeats");
    assert!(
        other.streams()[0] - last < Duration::from_secs(3),
        "not for silence"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_stream_that_never_sent_heartbeats_is_trusted() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    for replica in &rig.replicas {
        replica.heartbeats.store(false, Ordering::SeqCst);
    }
    let holder = rig.stream_synced(WEB).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(rig.replicas[holder].streams().len(), 1);
    assert!(rig.replicas[1 - holder].streams().is_empty());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_address_is_waited_for_then_refused_saying_why() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    let holder = rig.stream_synced(WEB).await;

    // Never a pod: refused as unknown after the waits, with one server call once the first
    // is over — the call the answer needs: GetPodRole for the role's name, GetCredentials
    // (and nothing else) for credentials; the servers know nothing of it either, so the
    // table is waited for until 900 ms.
    let stranger = Ipv4Addr::new(10, 1, 0, 9);
    for (path, role_calls, credentials_calls) in [(ROLES, 1, 0), (CREDENTIALS, 0, 1)] {
        let calls = (rig.pod_role_calls(), rig.credentials_calls());
        let began = Instant::now();
        let (status, body) = rig.get(stranger, path).await;
        assert_eq!(began.elapsed(), Duration::from_millis(900), "{path}");
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("unknown-pod"), "{path}: {body}");
        assert_eq!(
            (
                rig.pod_role_calls() - calls.0,
                rig.credentials_calls() - calls.1
            ),
            (role_calls, credentials_calls),
            "{path}: (GetPodRole, GetCredentials) calls"
        );
    }

    // A pod the servers place on another node: refused after the first wait, saying so
    // (a wrong --node-name is found at once), and naming nothing of that pod.
    let misplaced = Ipv4Addr::new(10, 1, 0, 8);
    for replica in &rig.replicas {
        replica
            .elsewhere
            .lock()
            .expect("not poisoned")
            .push(misplaced.to_string());
    }
    let calls = rig.pod_role_calls();
    let began = Instant::now();
    let (status, body) = rig.get(misplaced, ROLES).await;
    assert_eq!(began.elapsed(), Duration::from_millis(500));
    assert_eq!(rig.pod_role_calls() - calls, 1);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(&format!("no pod on this node ({NODE}) has IP {misplaced}"))
            && body.contains("another node"),
        "{body}"
    );
    // Its next requests, for a while, are refused the same after the table's wait, with
    // no call (a pod looping over every node's port costs each agent no server call);
    // after that the servers are asked again.
    for _ in 0..10 {
        let began = Instant::now();
        let again = rig.get(misplaced, ROLES).await;
        assert_eq!(began.elapsed(), Duration::from_millis(500));
        assert_eq!(again.0, 404, "{}", again.1);
        assert!(again.1.contains("another node"), "{}", again.1);
    }
    let credentials_calls = rig.credentials_calls();
    let (status, body) = rig.get(misplaced, CREDENTIALS).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(rig.credentials_calls(), credentials_calls);
    assert_eq!(rig.pod_role_calls() - calls, 1);
    tokio::time::sleep(crate::elsewhere::REMEMBERED_FOR).await;
    let (status, _) = rig.get(misplaced, ROLES).await;
    assert_eq!(status, 404);
    assert_eq!(rig.pod_role_calls() - calls, 2);

    // A pod whose IP reaches the node stream 150 ms into its first request's wait: answered
    // from the table the moment it does.
    let early = Ipv4Addr::new(10, 1, 0, 7);
    let stream_replica = Arc::clone(&rig.replicas[holder]);
    let began = Instant::now();
    let (answer, ()) = tokio::join!(rig.get(early, ROLES), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream_replica.add_pod(pod("early", early));
    });
    assert_eq!(began.elapsed(), Duration::from_millis(150));
    assert_eq!(answer, (200, "app-reader".to_string()));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_arrives_after_the_servers_were_asked_is_answered_from_the_table() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;

    // A pod whose IP reaches the node stream 700 ms into its first request, after the
    // servers were asked and knew nothing of it either: answered from the table the moment
    // it does — the role's name, its credentials, the container endpoint's — after one server
    // call that found nothing (and one for the credentials once the pod is here).
    let token = accepted_token(&rig, "system:serviceaccount:team-a:default");
    for (what, i, calls_made) in [
        ("role", 10, 1),
        ("credentials", 11, 2),
        ("container", 12, 2),
    ] {
        let late = Ipv4Addr::new(10, 1, 0, i);
        let asked = async {
            match what {
                "role" => rig.get(late, ROLES).await,
                "credentials" => rig.get(late, CREDENTIALS).await,
                _ => rig.get_with(late, CONTAINER, PATH, Some(&token)).await,
            }
        };
        let calls = rig.pod_role_calls() + rig.credentials_calls();
        let began = Instant::now();
        let ((status, body), ()) = tokio::join!(asked, async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            for replica in &rig.replicas {
                replica.add_pod(pod(&format!("late-{i}"), late));
            }
        });
        assert_eq!(began.elapsed(), Duration::from_millis(700), "{what}");
        assert_eq!(status, 200, "{what}: {body}");
        let made = rig.pod_role_calls() + rig.credentials_calls() - calls;
        assert_eq!(made, calls_made, "{what}: server calls");
    }
    rig.stop().await;
}

/// Removes the pod at `ip` from every replica, and waits until the agent's table has let it
/// go: a listing from there is refused (after the waits).
async fn gone_from_the_table(rig: &Rig, ip: Ipv4Addr) {
    for replica in &rig.replicas {
        replica.remove_pod(ip);
    }
    rig.wait_for_status(
        ip,
        ROLES,
        404,
        &format!("the pod at {ip} never left the table"),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_token_of_the_pod_that_had_the_address_opens_nothing_for_the_next_one() {
    let old = Ipv4Addr::new(10, 1, 0, 20);
    let rig = Rig::start(&[pod("web", WEB), pod("old", old)]).await;
    rig.stream_synced(WEB).await;
    let ttl = [("x-aws-ec2-metadata-token-ttl-seconds", "300")];
    let (status, token) = rig.send(old, AGENT, "PUT", "/latest/api/token", &ttl).await;
    assert_eq!(status, 200, "{token}");
    let with_token = [("x-aws-ec2-metadata-token", token.as_str())];
    let (status, _) = rig.send(old, AGENT, "GET", CREDENTIALS, &with_token).await;
    assert_eq!(status, 200, "the old pod's own token");

    // The old pod goes; a new pod gets its address while a request with the old pod's token
    // waits for the table (which knew nobody there when the request came): once the new
    // pod is in, the token is the old pod's, and it opens nothing — on the first wait, and
    // on the one after the servers knew nobody either.
    for (i, comes_after) in [(0, 200), (1, 700)] {
        gone_from_the_table(&rig, old).await;
        let asked = rig.send(old, AGENT, "GET", CREDENTIALS, &with_token);
        let ((status, body), ()) = tokio::join!(asked, async {
            tokio::time::sleep(Duration::from_millis(comes_after)).await;
            for replica in &rig.replicas {
                replica.add_pod(pod(&format!("new-{i}"), old));
            }
        });
        assert_eq!(status, 401, "{comes_after} ms: {body}");
        assert!(body.contains("another pod"), "{comes_after} ms: {body}");
    }

    // The servers know the next pod before the table does: their answer is for that pod,
    // and the old token opens nothing of it; a token asked for now is bound to the pod the
    // servers name, and opens nothing of the one after.
    gone_from_the_table(&rig, old).await;
    for replica in &rig.replicas {
        replica.place_pod(pod("next", old));
    }
    let (status, body) = rig.send(old, AGENT, "GET", CREDENTIALS, &with_token).await;
    assert_eq!(status, 401, "the servers' answer: {body}");
    let (status, next_token) = rig.send(old, AGENT, "PUT", "/latest/api/token", &ttl).await;
    assert_eq!(status, 200, "{next_token}");
    for replica in &rig.replicas {
        replica.place_pod(pod("after-next", old));
    }
    let with_next_token = [("x-aws-ec2-metadata-token", next_token.as_str())];
    let (status, body) = rig.send(old, AGENT, "GET", ROLES, &with_next_token).await;
    assert_eq!(status, 401, "a token the servers bound: {body}");

    // With no table (the node stream gone, none to be had), the servers answer for the pod
    // at the address: the next one's credentials and role are not the old token's either.
    for replica in &rig.replicas {
        replica.streams_refused.store(true, Ordering::SeqCst);
        replica.push.lock().expect("not poisoned").take();
    }
    let deadline = Instant::now() + PATIENCE;
    while rig.metric("podiam_agent_node_stream_synced").await != 0 {
        assert!(Instant::now() < deadline, "the node stream never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for path in [CREDENTIALS, ROLES] {
        let (status, body) = rig.send(old, AGENT, "GET", path, &with_token).await;
        assert_eq!(status, 401, "unsynced, {path}: {body}");
    }
    rig.stop().await;
}

/// A rig whose replicas are named `s-0` and `s-1` in their Health answers, with web's
/// session owned by `web_owner` and api's by `api_owner`.
async fn rig_with_sessions_owned_by(web_owner: &str, api_owner: &str) -> Rig {
    let names = ["s-0", "s-1"];
    let key_of = |owner: &str| {
        (1u64..)
            .find(|k| podiam_proto::owner::owner(*k, names) == Some(owner))
            .expect("a key")
    };
    let rig = Rig::start(&[
        PodState {
            credential_key: key_of(web_owner),
            ..pod("web", WEB)
        },
        PodState {
            credential_key: key_of(api_owner),
            ..pod("api", API)
        },
    ])
    .await;
    for (replica, name) in rig.replicas.iter().zip(names) {
        *replica.name.lock().expect("not poisoned") = name.to_string();
    }
    rig
}

#[tokio::test(start_paused = true)]
async fn credentials_are_asked_of_the_replica_that_owns_the_pods_session() {
    let rig = rig_with_sessions_owned_by("s-1", "s-0").await;
    rig.stream_synced(WEB).await;
    // The agent learns the names from the next health checks.
    tokio::time::sleep(crate::replicas::HEALTH_INTERVAL * 2).await;
    for pod in [WEB, API] {
        let (status, body) = rig.get(pod, CREDENTIALS).await;
        assert_eq!(status, 200, "{body}");
    }
    // Each pod's call went to its session's owner, wherever the node stream comes from.
    let calls: Vec<usize> = rig
        .replicas
        .iter()
        .map(|r| r.credentials_calls.load(Ordering::SeqCst))
        .collect();
    assert_eq!(calls, [1, 1]);
    assert_eq!(rig.metric("podiam_agent_server_failovers_total").await, 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_owner_that_cannot_reach_sts_does_not_cut_its_pods_off() {
    // web's key belongs to s-1, whose own way to STS is broken (its node's NAT, say) while
    // its pod stays Ready: s-0 is asked once s-1 says so, and fetches the credentials.
    let rig = rig_with_sessions_owned_by("s-1", "s-0").await;
    rig.stream_synced(WEB).await;
    tokio::time::sleep(crate::replicas::HEALTH_INTERVAL * 2).await;
    rig.replicas[1]
        .sts_unavailable
        .store(true, Ordering::SeqCst);
    let began = Instant::now();
    let (status, body) = rig.get(WEB, CREDENTIALS).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(began.elapsed(), Duration::ZERO, "no wait for a hedge");
    let calls = |r: &Replica| r.credentials_calls.load(Ordering::SeqCst);
    assert_eq!((calls(&rig.replicas[0]), calls(&rig.replicas[1])), (1, 1));
    assert_eq!(rig.metric("podiam_agent_server_failovers_total").await, 1);
    // With STS out of reach from both, the pod is told so (502), each asked once.
    rig.replicas[0]
        .sts_unavailable
        .store(true, Ordering::SeqCst);
    let (status, body) = rig.get(API, CREDENTIALS).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("sts-unavailable"), "{body}");
    assert_eq!((calls(&rig.replicas[0]), calls(&rig.replicas[1])), (2, 2));
    // STS throttling the owner (the account's rate spent): no other replica is asked, as
    // it would only add to it.
    rig.replicas[0]
        .sts_unavailable
        .store(false, Ordering::SeqCst);
    rig.replicas[1]
        .sts_unavailable
        .store(false, Ordering::SeqCst);
    rig.replicas[0].sts_throttled.store(true, Ordering::SeqCst);
    tokio::time::advance(crate::cache::REFUSAL_HELD).await;
    let (status, body) = rig.get(API, CREDENTIALS).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!((calls(&rig.replicas[0]), calls(&rig.replicas[1])), (3, 2));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_stream_and_calls_move_off_a_replica_whose_view_is_stale() {
    let rig = rig_with_sessions_owned_by("s-0", "s-1").await;
    let holder = rig.stream_synced(WEB).await;
    let (stale, current) = (&rig.replicas[holder], &rig.replicas[1 - holder]);
    tokio::time::sleep(crate::replicas::HEALTH_INTERVAL * 2).await;
    // The node stream's replica says its view is stale (its watches of the API failing);
    // the other's is current.
    stale.stale.store(true, Ordering::SeqCst);
    let since = Instant::now();
    let deadline = since + PATIENCE;
    while current.streams().is_empty() {
        assert!(Instant::now() < deadline, "the stream never moved");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Seen at the next health check, left at the second tick after it.
    let moved = current.streams()[0] - since;
    assert!(
        moved <= Duration::from_millis(3500),
        "moved after {moved:?}"
    );
    // Both pods' credentials come from the current replica, the stale one's keys too.
    for pod in [WEB, API] {
        let (status, body) = rig.get(pod, CREDENTIALS).await;
        assert_eq!(status, 200, "{body}");
    }
    let calls = |r: &Replica| r.credentials_calls.load(Ordering::SeqCst);
    assert_eq!((calls(stale), calls(current)), (0, 2));
    assert_eq!(stale.streams().len(), 1);
    rig.stop().await;
}

/// `state` with its namespace requiring the pod's token: the role, and beside it the
/// metadata endpoint's refusal.
fn token_required(state: PodState) -> PodState {
    PodState {
        refusal_reason: Reason::TokenRequired.to_wire().into(),
        refusal_message: "its role only from the container-credentials endpoint".into(),
        ..state
    }
}

#[tokio::test(start_paused = true)]
async fn a_pod_whose_namespace_comes_to_require_its_token_gets_nothing_by_address() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    // A metadata request waiting for credentials when the namespace comes to require
    // tokens: answered as the decision stands when they arrive (the fake servers, unlike
    // the real ones, would hand them out).
    for replica in &rig.replicas {
        replica.set_credentials_delay(Duration::from_millis(200));
    }
    let flip = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for replica in &rig.replicas {
            replica.add_pod(token_required(pod("web", WEB)));
        }
    };
    let ((status, body), ()) = tokio::join!(rig.get(WEB, CREDENTIALS), flip);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token-required"), "{body}");
    // The pod's token still gets its role, and the agent keeps the credentials…
    for replica in &rig.replicas {
        replica.set_credentials_delay(Duration::ZERO);
    }
    let token = accepted_token(&rig, "web");
    let (status, body) = rig.get_with(WEB, CONTAINER, PATH, Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let calls = rig.credentials_calls();
    // …which the address alone never gets, nor the role's name or info.
    for path in [CREDENTIALS, ROLES, "/latest/meta-data/iam/info"] {
        let (status, body) = rig.get(WEB, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            !body.contains("ASIATEST") && !body.contains("app-reader"),
            "{body}"
        );
    }
    assert_eq!(
        rig.credentials_calls(),
        calls,
        "refused before any server call"
    );
    rig.stop().await;
}

/// `state` with another role.
fn writer(state: PodState) -> PodState {
    PodState {
        role_name: "app-writer".into(),
        role_arn: "arn:aws:iam::123456789012:role/app-writer".into(),
        ..state
    }
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_role_taken_away_meanwhile_are_not_answered() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    let token = accepted_token(&rig, "web");
    // Requests waiting for app-reader's credentials when the pod's role becomes app-writer:
    // answered as the decision stands when the credentials arrive (the fake servers, unlike
    // the real ones, would hand out the old role's).
    for replica in &rig.replicas {
        replica.set_credentials_delay(Duration::from_millis(200));
    }
    let flip = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for replica in &rig.replicas {
            replica.add_pod(writer(pod("web", WEB)));
        }
    };
    let (by_address, by_token, ()) = tokio::join!(
        rig.get(WEB, CREDENTIALS),
        rig.get_with(WEB, CONTAINER, PATH, Some(&token)),
        flip
    );
    for (status, body) in [by_address, by_token] {
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("wrong-role"), "{body}");
        assert!(!body.contains("ASIATEST"), "{body}");
    }
    // The new role's credentials, at the next fetch.
    for replica in &rig.replicas {
        replica.set_credentials_delay(Duration::ZERO);
    }
    let (status, body) = rig
        .get(WEB, "/latest/meta-data/iam/security-credentials/app-writer")
        .await;
    assert_eq!(status, 200, "{body}");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn credentials_fetched_for_a_pod_whose_address_another_pod_took_meanwhile_are_not_answered() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    // Two requests from web's address wait for its credentials (one fetch, the other joins
    // it) when the node stream gives the address to a new pod; the servers still answer for
    // web. The address is the new pod's now: neither request gets web's credentials.
    for replica in &rig.replicas {
        replica.set_credentials_delay(Duration::from_millis(200));
    }
    let successor = PodState {
        pod: Some(PodRef {
            namespace: "team-a".into(),
            name: "web-2".into(),
            uid: "uid-web-2".into(),
        }),
        ..pod("web", WEB)
    };
    let flip = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for replica in &rig.replicas {
            replica.announce(successor.clone());
        }
    };
    let (first, second, ()) =
        tokio::join!(rig.get(WEB, CREDENTIALS), rig.get(WEB, CREDENTIALS), flip);
    for (status, body) in [first, second] {
        assert_eq!(status, 404, "{body}");
        assert!(!body.contains("ASIATEST"), "{body}");
    }
    rig.stop().await;
}

/// A JWT's shape with `claims` as its payload.
fn jwt(claims: &serde_json::Value) -> String {
    crate::container::tests::jwt(&claims.to_string())
}

/// `n` GETs of the container endpoint from `from` at once, each on its own connection, with
/// `token`: their statuses and bodies.
async fn container_gets(rig: &Rig, from: Ipv4Addr, token: &str, n: usize) -> Vec<(u16, String)> {
    let gets = (0..n).map(|_| rig.get_with(from, CONTAINER, PATH, Some(token)));
    futures::future::join_all(gets).await
}

/// A token the fake replicas accept, for any pod.
fn accepted_token(rig: &Rig, subject: &str) -> String {
    let exp = podiam_runtime::clock::now_unix() + 3600;
    let token = jwt(&serde_json::json!({"exp": exp, "sub": subject}));
    for replica in &rig.replicas {
        replica
            .pod_tokens
            .lock()
            .expect("not poisoned")
            .push(token.clone());
    }
    token
}

/// Made-up tokens from `from`, one after another: how many the servers refused (400) and how
/// many the agent held back (429), and how long (paused time) that took.
async fn made_up_tokens(rig: &Rig, from: Ipv4Addr, n: usize) -> (usize, usize, Duration) {
    let exp = podiam_runtime::clock::now_unix() + 3600;
    let began = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..n {
        let forged = jwt(&serde_json::json!({"exp": exp, "jti": format!("forged-{i}")}));
        statuses.push(rig.get_with(from, CONTAINER, PATH, Some(&forged)).await.0);
    }
    let refused = statuses.iter().filter(|s| **s == 400).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(refused + limited, n, "{statuses:?}");
    (refused, limited, began.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_pods_token_is_new_once_however_many_of_its_processes_present_it() {
    // A pod's processes presenting its new token at once (a pod starting its workers; 12:
    // more than the burst, within the agent's 16 connections per address): each call goes
    // to the servers, which review the token once, and the agent's limit on new tokens (8
    // at once, then 2 a second per address: each may cost a TokenReview) is charged once,
    // not 12 times (the Rust SDK does not retry a 429).
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    let token = accepted_token(&rig, "web");
    for (status, body) in container_gets(&rig, WEB, &token, 12).await {
        assert_eq!(status, 200, "{body}");
    }
    // Made-up tokens are each new: the 7 left of the burst, and what refilled.
    let (refused, limited, took) = made_up_tokens(&rig, WEB, 20).await;
    let refilled = (2.0 * took.as_secs_f64()) as usize;
    let counts = format!("{refused} refused, {limited} held back in {took:?}");
    assert!(
        refused >= 7 && refused <= 7 + refilled && limited > 0,
        "{counts}"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn while_unsynced_a_token_the_servers_accepted_is_not_held_back_as_new() {
    // No node stream: the table stays unsynced, so every container-credentials request is
    // a server call that checks the token, and none is proven for a pod the table knows.
    // A token the address presented before is still not new.
    let rig = Rig::start_with(&[pod("web", WEB)], true).await;
    let token = accepted_token(&rig, "web");
    let calls = rig.credentials_calls();
    for (status, body) in container_gets(&rig, WEB, &token, 12).await {
        assert_eq!(status, 200, "at once: {body}");
    }
    for n in 0..30 {
        let (status, body) = rig.get_with(WEB, CONTAINER, PATH, Some(&token)).await;
        assert_eq!(status, 200, "request {n}: {body}");
        assert!(
            body.contains("\"AccessKeyId\":\"ASIATEST\""),
            "request {n}: {body}"
        );
    }
    // Each was asked of the servers: the table cannot say, and nothing is answered from a
    // cache it cannot vouch for.
    assert_eq!(rig.credentials_calls() - calls, 42);

    // Made-up tokens from the same address are each new: what is left of the burst (the
    // pod's own token took one), and what refilled, then 429.
    let (refused, limited, took) = made_up_tokens(&rig, WEB, 20).await;
    let refilled = (2.0 * took.as_secs_f64()) as usize;
    let counts = format!("{refused} refused, {limited} held back in {took:?}");
    assert!(
        refused >= 7 && refused <= 7 + refilled && limited > 0,
        "{counts}"
    );
    // The pod's own token is not held back by them.
    let (status, body) = rig.get_with(WEB, CONTAINER, PATH, Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_from_an_address_that_is_no_pod_is_charged_at_every_call() {
    // A process of the node (from any of 127/8) or an address no pod has presents a
    // made-up token: nobody can place the address, so the token is not remembered as
    // admitted. Remembered, its later calls would reach the servers uncharged, and made-up
    // tokens from thousands of addresses would hold every place of the agent's limiter.
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    charged_at_every_call(rig).await;
}

#[tokio::test(start_paused = true)]
async fn while_unsynced_a_token_from_an_address_that_is_no_pod_is_charged_at_every_call() {
    // The same while the table is unsynced (an agent starting): the servers' own refusal
    // (unknown-pod) comes back as it is, and the token is not remembered either.
    let rig = Rig::start_with(&[pod("web", WEB)], true).await;
    charged_at_every_call(rig).await;
}

/// A token from an address no pod has, then the address's burst spent: the token again is
/// held back (429), not let through as one admitted before.
async fn charged_at_every_call(rig: Rig) {
    let stranger = Ipv4Addr::new(10, 1, 0, 99);
    let made_up = |name: &str| {
        let exp = podiam_runtime::clock::now_unix() + 3600;
        jwt(&serde_json::json!({"exp": exp, "jti": name}))
    };
    // A token the servers would accept, had the address a pod: they place the address
    // first, as the real servers do, and find none.
    let token = accepted_token(&rig, "stranger");
    let (status, body) = rig.get_with(stranger, CONTAINER, PATH, Some(&token)).await;
    assert!(status != 200 && status != 429, "{status} {body}");
    // The address's burst, spent at once by new tokens, whose calls wait for the table;
    // then the first token again: new again, so held back.
    let burst: Vec<String> = (0..12).map(|i| made_up(&format!("burst-{i}"))).collect();
    let spent = futures::future::join_all(
        (burst.iter()).map(|t| rig.get_with(stranger, CONTAINER, PATH, Some(t))),
    );
    let again = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rig.get_with(stranger, CONTAINER, PATH, Some(&token)).await
    };
    let (spent, (status, body)) = tokio::join!(spent, again);
    assert!(spent.iter().any(|(s, _)| *s == 429), "{spent:?}");
    assert_eq!(status, 429, "{body}");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_pod_cannot_take_the_health_ports_connections() {
    // A pod of the node reaches the health port too (it is on the node's address). Holding
    // connections busy (heads begun, not finished), it gets 4 of them, not the 16 a pod may
    // hold at the metadata port: a fifth takes the place of its longest-waiting one. The
    // kubelet's probes, from the node's address, are served.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start(&[pod("web", WEB)]).await;
    let mut held = Vec::new();
    for _ in 0..=podiam_runtime::serve::HEALTH_CONNECTIONS_PER_PEER {
        let mut stream = rig
            .network
            .connect(WEB.into(), AGENT_HEALTH)
            .expect("connects");
        stream
            .write_all(b"GET /live HTTP/1.1\r\n")
            .await
            .expect("sends");
        held.push(stream);
    }
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1), held[0].read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the pod's first busy connection gave its place to its fifth: {read:?}"
    );
    let node = Ipv4Addr::new(10, 9, 0, 1);
    let (status, body) = rig.get_from(node, AGENT_HEALTH, "/live").await;
    assert_eq!(status, 200, "{body}");
    drop(held);
    rig.stop().await;
}

/// The extended document's path, as newer SDKs ask it first.
const EXTENDED: &str = "/latest/meta-data/iam/security-credentials-extended/";

#[tokio::test(start_paused = true)]
async fn the_extended_credentials_path_answers_the_same_credentials_with_the_account() {
    for streams_refused in [false, true] {
        let rig = Rig::start_with(&[pod("web", WEB)], streams_refused).await;
        if !streams_refused {
            rig.stream_synced(WEB).await;
        }
        let (status, role) = rig.get(WEB, EXTENDED).await;
        assert_eq!((status, role.as_str()), (200, "app-reader"));
        let (status, body) = rig.get(WEB, &format!("{EXTENDED}app-reader")).await;
        assert_eq!(status, 200, "{body}");
        let extended: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(extended["AccountId"], "123456789012", "{body}");
        let (status, body) = rig.get(WEB, CREDENTIALS).await;
        assert_eq!(status, 200, "{body}");
        let mut legacy: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(legacy.get("AccountId").is_none(), "{body}");
        // The same credentials otherwise (the fake servers' are the same at every call, but
        // for their times when the table answers from its cache).
        legacy["AccountId"] = extended["AccountId"].clone();
        for key in [
            "Code",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "AccountId",
        ] {
            assert_eq!(legacy[key], extended[key], "{key}");
        }
        // Asked again (from the cache, when the table knows the pod): still the extended one.
        let (status, body) = rig.get(WEB, &format!("{EXTENDED}app-reader")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"AccountId\" : \"123456789012\""), "{body}");
        // Another role's name (judged by the table: the fake servers, unlike the real ones,
        // hand out any role asked of them), or an address no pod has: 404, as on the legacy
        // path, which sends an SDK back to the listing (or to the legacy path), nothing else.
        if !streams_refused {
            let (status, body) = rig.get(WEB, &format!("{EXTENDED}app-writer")).await;
            assert_eq!(status, 404, "{body}");
            assert!(!body.contains("ASIATEST"), "{body}");
        }
        let (status, body) = rig.get(API, &format!("{EXTENDED}app-reader")).await;
        assert_eq!(status, 404, "{body}");
        rig.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn credentials_the_servers_refuse_while_the_table_lists_the_role_are_not_a_404() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    // The servers take web's role away, and the node stream has not told the table yet: the
    // listing still names the role, so the credentials' refusal is "not now" (503), not the
    // "no such role" (404) that would send SDKs straight back to the listing.
    let roleless = PodState {
        role_name: String::new(),
        role_arn: String::new(),
        refusal_reason: Reason::NoRole.to_wire().into(),
        refusal_message: "pod team-a/web has no iam.amazonaws.com/role annotation".into(),
        ..pod("web", WEB)
    };
    for replica in &rig.replicas {
        replica.place_pod(roleless.clone());
    }
    let (status, role) = rig.get(WEB, ROLES).await;
    assert_eq!((status, role.as_str()), (200, "app-reader"));
    let (status, body) = rig.get(WEB, CREDENTIALS).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("podiam: no-role: ") && body.contains("retry shortly"),
        "{body}"
    );
    // Once the stream tells the table, both say 404 alike.
    for replica in &rig.replicas {
        replica.announce(roleless.clone());
    }
    rig.wait_for_status(WEB, ROLES, 404, "the table never heard")
        .await;
    let (status, body) = rig.get(WEB, CREDENTIALS).await;
    assert_eq!(status, 404, "{body}");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_for_an_address_no_pod_has_is_refused_for_now_not_for_good() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    let stranger = Ipv4Addr::new(10, 1, 0, 9);
    // Not 404: that tells SDKs the service has no IMDSv2, and several never ask again. 503,
    // after the same waits as any request from an unknown address.
    let began = Instant::now();
    let ttl = [("x-aws-ec2-metadata-token-ttl-seconds", "300")];
    let (status, body) = rig
        .send(stranger, AGENT, "PUT", "/latest/api/token", &ttl)
        .await;
    assert_eq!(began.elapsed(), Duration::from_millis(900));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("podiam: unknown-pod: ") && body.contains("retry shortly"),
        "{body}"
    );
    // A pod whose IP reaches the table 700 ms into the wait (after the servers knew nothing
    // of it) gets its token then.
    let early = Ipv4Addr::new(10, 1, 0, 7);
    let began = Instant::now();
    let ((status, token), ()) = tokio::join!(
        rig.send(early, AGENT, "PUT", "/latest/api/token", &ttl),
        async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            for replica in &rig.replicas {
                replica.add_pod(pod("early", early));
            }
        }
    );
    assert_eq!(began.elapsed(), Duration::from_millis(700));
    assert_eq!(status, 200, "{token}");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn what_the_servers_say_of_the_agents_own_standing_is_not_told_to_pods() {
    // The table synced, but the replicas refuse this agent's calls about pods (its token's
    // pod not yet in their view, say). A new pod the table does not list yet is told to
    // retry (503), not that it is unknown (a 404 SDKs do not retry), and nothing of the
    // agent's pod; it gets no token bound to its address alone either.
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    for replica in &rig.replicas {
        replica.agent_unproven.store(true, Ordering::SeqCst);
    }
    let new = Ipv4Addr::new(10, 1, 0, 9);
    let ttl = [("x-aws-ec2-metadata-token-ttl-seconds", "300")];
    let token = rig.send(new, AGENT, "PUT", "/latest/api/token", &ttl).await;
    for (what, (status, body)) in [
        ("roles", rig.get(new, ROLES).await),
        ("credentials", rig.get(new, CREDENTIALS).await),
        ("token", token),
    ] {
        assert_eq!(status, 503, "{what}: {body}");
        assert!(body.contains("retry shortly"), "{what}: {body}");
        assert!(!body.contains("podiam-agent-x7"), "{what}: {body}");
    }
    // A pod that reaches the table after the servers' refusal, within the patience, is
    // answered from it.
    let asked = rig.pod_role_calls();
    let ((status, body), ()) = tokio::join!(rig.get(new, ROLES), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        for replica in &rig.replicas {
            replica.announce(pod("new", new));
        }
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rig.pod_role_calls() - asked,
        1,
        "the servers were asked first"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn credentials_the_servers_give_another_pod_while_the_table_lists_this_one_are_not_a_404() {
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    // The servers have another pod at web's address already; the table still lists web and
    // its role: not a 404 for the role the listing names, but 503 until the views agree.
    for replica in &rig.replicas {
        replica.place_pod(pod("web-2", WEB));
    }
    let (status, body) = rig.get(WEB, CREDENTIALS).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("podiam: unknown-pod: ") && body.contains("retry shortly"),
        "{body}"
    );
    assert!(!body.contains("ASIATEST"), "{body}");
    // Once the table has the new pod, it is answered as itself.
    for replica in &rig.replicas {
        replica.announce(pod("web-2", WEB));
    }
    rig.wait_for_status(WEB, CREDENTIALS, 200, "the table never heard")
        .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_role_sts_refuses_costs_the_servers_a_call_a_second_however_often_the_pod_asks() {
    // A pod whose role STS will not give (a trust policy that does not name the servers)
    // asking in a loop, by address and with its token: the refusal is held for a second,
    // so each second costs the servers one call per key, not one per request.
    let rig = Rig::start(&[pod("web", WEB), pod("api", API)]).await;
    rig.stream_synced(WEB).await;
    let token = accepted_token(&rig, "api");
    for replica in &rig.replicas {
        replica.sts_refuses.store(true, Ordering::SeqCst);
    }
    // web by its address, api with its token (two pods: the two paths share a pod's cache).
    for (from, port, path, token) in [
        (WEB, AGENT, CREDENTIALS, None),
        (API, CONTAINER, PATH, Some(token.as_str())),
    ] {
        let calls = rig.credentials_calls();
        for _ in 0..20 {
            let (status, body) = rig.get_with(from, port, path, token).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert!(body.contains("sts-refused"), "{path}: {body}");
        }
        assert_eq!(rig.credentials_calls() - calls, 1, "{path}: server calls");
        // A second on, the servers are asked again, and answer once STS does.
        for replica in &rig.replicas {
            replica.sts_refuses.store(false, Ordering::SeqCst);
        }
        let (status, _) = rig.get_with(from, port, path, token).await;
        assert_eq!(status, 403, "{path}: still held");
        tokio::time::advance(crate::cache::REFUSAL_HELD).await;
        let (status, body) = rig.get_with(from, port, path, token).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(rig.credentials_calls() - calls, 2, "{path}: server calls");
        for replica in &rig.replicas {
            replica.sts_refuses.store(true, Ordering::SeqCst);
        }
    }
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_server_calls_are_logged_once_a_window_per_pod_however_often_it_asks() {
    // Every replica failing credentials calls: each request for credentials fails alike
    // (as it does while the servers are out of reach). The failure is counted every time,
    // logged once a window.
    let (_guard, logs) = podiam_runtime::telemetry::capture_logs();
    let rig = Rig::start(&[pod("web", WEB)]).await;
    rig.stream_synced(WEB).await;
    for replica in &rig.replicas {
        replica.fails.store(true, Ordering::SeqCst);
    }
    let warnings = || {
        logs.text()
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains("server call failed"))
            .count()
    };
    for _ in 0..10 {
        let (status, body) = rig.get(WEB, CREDENTIALS).await;
        assert_eq!(status, 502, "{body}");
    }
    assert_eq!(warnings(), 1, "{}", logs.text());
    let counted = rig
        .metric("podiam_agent_server_errors_total{kind=\"other\"}")
        .await;
    assert_eq!(counted, 10);
    // The next window, one line more, saying how many were not written.
    tokio::time::advance(Duration::from_secs(10)).await;
    let (status, _) = rig.get(WEB, CREDENTIALS).await;
    assert_eq!(status, 502);
    assert_eq!(warnings(), 2, "{}", logs.text());
    assert!(logs.text().contains("held_back=9"), "{}", logs.text());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_nodes_own_processes_are_one_sender_to_the_failure_log() {
    // No node stream (the table unsynced: every request is a server call) and the servers
    // failing: a process of the node asking from many loopback addresses is logged as one
    // sender, so it cannot take the log's places from pods.
    let (_guard, logs) = podiam_runtime::telemetry::capture_logs();
    let rig = Rig::start_with(&[pod("web", WEB)], true).await;
    for replica in &rig.replicas {
        replica.fails.store(true, Ordering::SeqCst);
    }
    for last in 2..12 {
        let (status, body) = rig.get(Ipv4Addr::new(127, 0, 0, last), CREDENTIALS).await;
        assert_eq!(status, 502, "{body}");
    }
    let warnings = logs
        .text()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("server call failed"))
        .count();
    assert_eq!(warnings, 1, "{}", logs.text());
    rig.stop().await;
}
