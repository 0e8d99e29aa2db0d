//! The STS section: how many AssumeRole calls server replicas make for a cluster's pods, and
//! a cluster start under the STS budget. moto is STS, behind the harness's recording proxy,
//! which counts every call.
//!
//! - **Calls per session window**: `pods` pods over `roles` roles deployed into three running
//!   replicas, shared sessions (the default literal session name) and per-pod sessions
//!   (`{namespace}.{pod}`), each run twice: replicas on their own (no replica set: what every
//!   release before key ownership did) and as a replica set sharing the keys. Counted once
//!   every replica's upkeep has covered every pod; refreshes repeat the same count each
//!   session window.
//! - **A cluster start**: the same pods with per-pod sessions, three replicas started at once
//!   under `--sts-rate 50` each: time until every session is fetched, the calls made (the
//!   replicas own everything until they see each other Ready) and the most in any second;
//!   meanwhile new pods appear and ask at once, timed from the ask to the credentials.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use podiam_proto::v1::GetCredentialsRequest;
use podiam_tests::identity;
use podiam_tests::kube_emulator::{EmulatorOptions, KubeEmulator, namespace, pod};
use podiam_tests::moto::Moto;
use podiam_tests::process::{ChildGuard, scratch_dir, wait_until};
use podiam_tests::sts_proxy::StsProxy;
use podiam_tests::world::{http_get_text, metric_value, start_server_within};
use serde_json::{Value, json};

use crate::{Target, target};

/// How big.
pub struct StsPlan {
    pub pods: usize,
    pub roles: usize,
    /// New pods asking during the cluster start.
    pub newcomers: usize,
    /// The per-replica budget of the cluster start.
    pub rate: usize,
}

const REPLICAS: usize = 3;
const NAMESPACE: &str = "apps";
const NODE: &str = "node-0";

/// A cluster of pods in the emulator, moto behind the recording proxy.
struct Cluster {
    emulator: KubeEmulator,
    kubeconfig: std::path::PathBuf,
    certs: podiam_certs::WrittenFiles,
    moto: Moto,
    proxy: StsProxy,
}

impl Cluster {
    /// The cluster, with `pods` of the plan's pods created.
    async fn start(plan: &StsPlan, pods: usize) -> anyhow::Result<Cluster> {
        let dir = scratch_dir("bench-sts")?;
        let emulator =
            KubeEmulator::start("127.0.0.1:0".parse()?, EmulatorOptions::default()).await?;
        let kubeconfig = dir.join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig)?;
        let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())?
            .write_to(&dir.join("certs"), false)?;
        identity::install_podiam_identity(&emulator)?;
        emulator.create(namespace(
            NAMESPACE,
            &[("iam.amazonaws.com/permitted", "app-.*")],
        ))?;
        for i in 0..pods {
            emulator.create(app_pod(i, plan.roles))?;
        }
        let moto = Moto::start().await?;
        let proxy = StsProxy::start(moto.addr()).await?;
        Ok(Cluster {
            emulator,
            kubeconfig,
            certs,
            moto,
            proxy,
        })
    }

    /// Starts the replicas with `args` (named, when `named`) all at once; waits for each
    /// one's first sync; when named, marks their pods Ready, as the kubelet would.
    async fn replicas(&self, named: bool, args: &[&str]) -> anyhow::Result<Vec<Replica>> {
        let starts = (0..REPLICAS).map(|i| {
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            // One node carries every pod here, asked as fast as the replicas answer: not the
            // per-node call limit's case (no node has ten thousand pods).
            args.extend(["--agent-call-rate", "0"].map(String::from));
            if named {
                args.extend(
                    [
                        "--replica-name",
                        &replica_name(i),
                        "--replica-namespace",
                        "podiam",
                    ]
                    .map(String::from),
                );
            }
            async move {
                start_server_within(
                    &self.certs,
                    &self.kubeconfig,
                    &self.proxy.endpoint(),
                    &args,
                    Duration::from_secs(300),
                )
                .await
            }
        });
        let started = futures::future::try_join_all(starts).await?;
        if named {
            for i in 0..REPLICAS {
                self.emulator.create(replica_pod(i))?;
            }
        }
        Ok(started
            .into_iter()
            .map(|(process, addr, health)| Replica {
                _process: process,
                addr,
                health,
            })
            .collect())
    }

    /// Sessions fetched so far.
    fn sessions(&self) -> usize {
        self.proxy
            .assume_role_calls()
            .iter()
            .filter(|c| c.status == 200)
            .filter_map(|c| c.param("RoleSessionName").map(String::from))
            .collect::<BTreeSet<String>>()
            .len()
    }

    /// Successful AssumeRole calls so far.
    fn calls(&self) -> usize {
        self.proxy
            .assume_role_calls()
            .iter()
            .filter(|c| c.status == 200)
            .count()
    }
}

struct Replica {
    _process: ChildGuard,
    addr: SocketAddr,
    health: SocketAddr,
}

impl Replica {
    async fn gauge(&self, name: &str) -> u64 {
        http_get_text(&format!("http://{}/metrics", self.health))
            .await
            .map_or(0, |m| metric_value(&m, name))
    }
}

fn replica_name(i: usize) -> String {
    format!("podiam-server-{i}")
}

fn replica_pod(i: usize) -> Value {
    let mut object = pod("podiam", &replica_name(i), "192.0.2.250", &[]);
    object["metadata"]["labels"] = json!({"app.kubernetes.io/name": "podiam-server"});
    object["spec"]["hostNetwork"] = json!(true);
    object
}

fn app_pod(i: usize, roles: usize) -> Value {
    let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
    let role = format!("app-{}", i % roles.max(1));
    let mut object = pod(
        NAMESPACE,
        &format!("pod-{i}"),
        &ip,
        &[("iam.amazonaws.com/role", &role)],
    );
    object["spec"]["nodeName"] = json!(NODE);
    object
}

/// Waits until every replica needs `keys` keys and, as a replica set (`shared`), they own
/// them all between them, and the proxy has seen `calls` calls for `sessions` sessions.
async fn settled(
    cluster: &Cluster,
    replicas: &[Replica],
    keys: u64,
    shared: bool,
    (calls, sessions): (usize, usize),
) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(900),
        "every replica's upkeep over every pod",
        || async {
            let mut owned = 0;
            for replica in replicas {
                if replica.gauge("podiam_server_credential_keys").await != keys {
                    return false;
                }
                owned += replica.gauge("podiam_server_credential_keys_owned").await;
            }
            (!shared || owned == keys) && cluster.calls() >= calls && cluster.sessions() >= sessions
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// One count: sessions shared or per pod, replicas alone or as a set; the pods deployed
/// into the running replicas (a cluster start is [`cluster_start`]'s).
async fn count(plan: &StsPlan, per_pod: bool, shared_keys: bool) -> anyhow::Result<usize> {
    let cluster = Cluster::start(plan, 0).await?;
    let mut args = vec!["--sts-rate", "0"];
    if per_pod {
        args.extend(["--session-name", "{namespace}.{pod}"]);
    }
    let replicas = cluster.replicas(shared_keys, &args).await?;
    if shared_keys {
        wait_until(
            Duration::from_secs(60),
            "the replicas to see each other",
            || async {
                for replica in &replicas {
                    if replica.gauge("podiam_server_replicas_ready").await != REPLICAS as u64 {
                        return false;
                    }
                }
                true
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for i in 0..plan.pods {
        cluster.emulator.create(app_pod(i, plan.roles))?;
    }
    let keys = if per_pod { plan.pods } else { plan.roles };
    // Alone, each replica fetches every key; as a set, each key once.
    let expected = if shared_keys { keys } else { keys * REPLICAS };
    let sessions = if per_pod { keys } else { 1 };
    settled(
        &cluster,
        &replicas,
        keys as u64,
        shared_keys,
        (expected, sessions),
    )
    .await?;
    Ok(cluster.calls())
}

/// The section: prints its tables, returns its JSON.
pub async fn sts(plan: &StsPlan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!(
        "\n== STS: AssumeRole calls per session window, {} pods over {} roles, {REPLICAS} replicas",
        plan.pods, plan.roles
    );
    println!(
        "{:<22} {:>22} {:>22} {:>8}",
        "sessions", "replicas alone", "replica set", "ratio"
    );
    let mut rows = Vec::new();
    for (label, per_pod) in [("shared (per role)", false), ("per pod", true)] {
        let alone = count(plan, per_pod, false).await?;
        let set = count(plan, per_pod, true).await?;
        let keys = if per_pod { plan.pods } else { plan.roles };
        println!(
            "{label:<22} {alone:>22} {set:>22} {:>8.2}",
            set as f64 / alone.max(1) as f64
        );
        target(
            targets,
            &format!("STS calls, {label} sessions, {REPLICAS} replicas"),
            set.to_string(),
            &format!("= {keys} keys"),
            set == keys,
        );
        rows.push(
            json!({"sessions": label, "keys": keys, "replicas_alone": alone, "replica_set": set}),
        );
    }
    let start = cluster_start(plan, targets).await?;
    Ok(
        json!({"replicas": REPLICAS, "pods": plan.pods, "roles": plan.roles, "calls": rows, "cluster_start": start}),
    )
}

/// How long a new pod's call may wait in its replica before reaching STS during a cluster
/// start: far under one budget window (1.1 s), which is what waiting behind prefetches
/// would cost.
const NEW_POD_BEFORE_STS_GOAL_MS: f64 = 100.0;

/// Three replicas started at once under the budget, per-pod sessions; new pods asking
/// meanwhile.
async fn cluster_start(plan: &StsPlan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    let cluster = Cluster::start(plan, plan.pods).await?;
    let rate = plan.rate.to_string();
    let began = Instant::now();
    let replicas = cluster
        .replicas(
            true,
            &["--sts-rate", &rate, "--session-name", "{namespace}.{pod}"],
        )
        .await?;
    let synced = began.elapsed();
    // New pods, one every 200 ms, each asking its owner at once (as its agent would).
    let certs = &cluster.certs;
    let material = podiam_tests::world::agent_material(certs)?;
    let ca = std::fs::read(&certs.ca_cert)?;
    let (token, _) = identity::agent_token(
        &cluster.emulator,
        NODE,
        identity::AGENT_AUDIENCE,
        std::time::SystemTime::now() + identity::AGENT_TOKEN_LIFE,
    )?;
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(identity::client(replica.addr, &ca, Some(&material), Some(&token)).await?);
    }
    let names: Vec<String> = (0..REPLICAS).map(replica_name).collect();
    let mut first_requests = Vec::new();
    let mut last_calls = Vec::new();
    let mut moto_times = Vec::new();
    // Each new pod's answered call: its session, when it was made and answered.
    let mut answered_calls: Vec<(String, Instant, Instant)> = Vec::new();
    for n in 0..plan.newcomers {
        let i = plan.pods + n;
        cluster.emulator.create(app_pod(i, plan.roles))?;
        let object = app_pod(i, plan.roles);
        let ip = object["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let role = format!("app-{}", i % plan.roles.max(1));
        let session = format!("{NAMESPACE}.pod-{i}");
        let key = podiam_proto::owner::credential_key(
            &format!("arn:aws:iam::123456789012:role/{role}"),
            None,
            &session,
            &[],
            false,
        );
        let owner = podiam_proto::owner::owner(key, names.iter().map(String::as_str))
            .and_then(|name| names.iter().position(|n| n == name))
            .unwrap_or(0);
        let request = GetCredentialsRequest {
            ip,
            role_name: role,
            node_name: NODE.into(),
            pod_token: String::new(),
        };
        let asked = Instant::now();
        // The first ask can beat the pod's arrival in the replica's view: asked again.
        loop {
            let mut client = clients[owner].clone();
            let call = Instant::now();
            match client.get_credentials(request.clone()).await {
                Ok(_) => {
                    last_calls.push(call.elapsed());
                    answered_calls.push((session.clone(), call, Instant::now()));
                    break;
                }
                Err(_) if asked.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => anyhow::bail!("a new pod got no credentials: {status}"),
            }
        }
        first_requests.push(asked.elapsed());
        // moto's own AssumeRole time in the same burst: what STS itself takes here.
        let moto_time = crate::moto_assume_role_times(&cluster.moto, 1).await?;
        moto_times.extend(moto_time);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keys = plan.pods + plan.newcomers;
    settled(&cluster, &replicas, keys as u64, true, (keys, keys)).await?;
    let all_fetched = began.elapsed();
    let calls = cluster.proxy.assume_role_calls();
    let sessions: BTreeSet<&str> = calls
        .iter()
        .filter_map(|c| c.param("RoleSessionName"))
        .collect();
    let mut times: Vec<Instant> = calls.iter().filter_map(|c| c.received).collect();
    times.sort();
    let most_in_a_second = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| t.duration_since(times[i]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    // Where each new pod's answered call spent its time, from the proxy's record of its
    // AssumeRole: in the replica before STS (the budget, a connection to STS), in STS
    // (moto), and after (the answer back to the pod).
    let mut before_sts = Vec::new();
    let mut in_sts = Vec::new();
    for (session, made, done) in &answered_calls {
        let record = calls.iter().find(|c| {
            c.param("RoleSessionName") == Some(session.as_str())
                && c.received.is_some_and(|at| at >= *made && at <= *done)
        });
        if let Some((received, answered)) = record.and_then(|c| Some((c.received?, c.answered?))) {
            before_sts.push(received.duration_since(*made));
            in_sts.push(answered.duration_since(received));
        }
    }
    before_sts.sort();
    in_sts.sort();
    let (before50, before99) = crate::summary(&before_sts);
    let (sts50, sts99) = crate::summary(&in_sts);
    first_requests.sort();
    let (p50, p99) = crate::summary(&first_requests);
    last_calls.sort();
    let (call50, call99) = crate::summary(&last_calls);
    moto_times.sort();
    let (moto50, moto99) = crate::summary(&moto_times);
    println!(
        "\n== STS: a cluster start, {keys} per-pod sessions, {REPLICAS} replicas at --sts-rate {} each",
        plan.rate
    );
    println!(
        "replicas synced                 {:>10.1} s",
        synced.as_secs_f64()
    );
    println!(
        "every session fetched           {:>10.1} s",
        all_fetched.as_secs_f64()
    );
    println!(
        "AssumeRole calls                {:>10}   ({} sessions; {} more while the replicas did not yet see each other Ready)",
        calls.len(),
        sessions.len(),
        calls.len().saturating_sub(sessions.len())
    );
    println!(
        "most calls in any second        {most_in_a_second:>10}   (budget {} x {REPLICAS})",
        plan.rate
    );
    println!(
        "new pods' first request         p50 {p50:.1} ms  p99 {p99:.1} ms  ({} pods during the start; from the pod's creation)",
        first_requests.len()
    );
    println!(
        "  of which the answered call    p50 {call50:.1} ms  p99 {call99:.1} ms  (the rest: the replica learning of the pod)"
    );
    println!(
        "    in the replica before STS   p50 {before50:.1} ms  p99 {before99:.1} ms  (the budget, a connection to STS; {} calls found at the proxy)",
        before_sts.len()
    );
    println!(
        "    in STS (moto)               p50 {sts50:.1} ms  p99 {sts99:.1} ms  (the same calls, at the proxy)"
    );
    println!(
        "moto's own AssumeRole meanwhile p50 {moto50:.1} ms  p99 {moto99:.1} ms  (one straight call after each new pod's)"
    );
    target(
        targets,
        "STS calls in any second, cluster start",
        most_in_a_second.to_string(),
        &format!("<= {}", plan.rate * REPLICAS),
        most_in_a_second <= plan.rate * REPLICAS,
    );
    // What podiam adds to a new pod's first request during the burst: its wait for the
    // budget and a connection to STS. The whole request also holds STS's answer, which here
    // is moto's under the burst's load (seconds at its tail), not the budget's doing.
    target(
        targets,
        "cluster start: new pod's wait in the replica, p99",
        format!("{before99:.1} ms"),
        &format!("<= {NEW_POD_BEFORE_STS_GOAL_MS} ms"),
        before_sts.len() == answered_calls.len() && before99 <= NEW_POD_BEFORE_STS_GOAL_MS,
    );
    target(
        targets,
        "cluster start: new pod's first request, p99",
        format!("{p99:.0} ms"),
        "—",
        true,
    );
    Ok(json!({
        "rate_per_replica": plan.rate,
        "sessions": keys,
        "synced_s": synced.as_secs_f64(),
        "all_fetched_s": all_fetched.as_secs_f64(),
        "calls": calls.len(),
        "duplicate_calls": calls.len().saturating_sub(sessions.len()),
        "most_calls_in_a_second": most_in_a_second,
        "new_pod_first_request_ms": {"p50": p50, "p99": p99, "n": first_requests.len()},
        "new_pod_answered_call_ms": {"p50": call50, "p99": call99},
        "moto_assume_role_during_ms": {"p50": moto50, "p99": moto99},
        "new_pod_call_before_sts_ms": {"p50": before50, "p99": before99, "n": before_sts.len()},
        "new_pod_call_in_sts_ms": {"p50": sts50, "p99": sts99},
    }))
}
