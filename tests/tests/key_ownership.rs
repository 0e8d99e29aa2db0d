//! One STS call per session for the whole cluster: three server replicas run as the
//! Deployment's (named, with Ready pods), moto behind the recording proxy, and the proxy's
//! record as the judge.
//!
//! - Pods sharing a role share one session: the replicas make one AssumeRole for it in
//!   all, and the agent's requests go to its owner, which holds it.
//! - A replica killed mid-session hands its keys to the others: one call per moved key,
//!   none for the keys that stayed.
//! - `--sts-rate N`: no second sees more than N calls, and a pod's own request goes before
//!   the prefetches queued ahead of it.
//! - A namespace whose pods queue many requests for the budget does not hold up another
//!   namespace's pod: namespaces take turns.
//!
//! Needs root (the World's node namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use podiam_proto::v1::GetCredentialsRequest;
use podiam_tests::process::wait_until;
use podiam_tests::sts_proxy::StsCall;
use podiam_tests::world::{PodSpec, World, WorldConfig, create_pod, metric_value};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/app-reader";

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 89, (i / 250) as u8, (i % 250 + 1) as u8)
}

async fn create_pods(world: &World, count: usize) {
    let client = world.kube_client();
    let creates = (0..count).map(|i| {
        let client = client.clone();
        let spec = PodSpec {
            name: format!("app-{i}"),
            namespace: "team-a".into(),
            role: Some("app-reader".into()),
            registered: true,
            service_account: None,
            family: Default::default(),
        };
        async move { create_pod(&client, &spec, &[ip(i).into()]).await }
    });
    for created in futures::future::join_all(creates).await {
        created.expect("pod created");
    }
}

/// A replica's gauge (or counter) `name`, 0 when it cannot be read (a killed replica).
async fn gauge(world: &World, i: usize, name: &str) -> u64 {
    match world.server_metrics_of(i).await {
        Ok(metrics) => metric_value(&metrics, name),
        Err(_) => 0,
    }
}

/// Waits until every replica in `replicas` sees `ready` ready replicas.
async fn replica_set_seen(world: &World, replicas: &[usize], ready: u64) {
    wait_until(
        Duration::from_secs(30),
        "every replica to see the replica set",
        || async {
            for &i in replicas {
                if gauge(world, i, "podiam_server_replicas_ready").await != ready {
                    return false;
                }
            }
            true
        },
    )
    .await
    .expect("replica set seen");
}

/// Waits until the replicas in `replicas` each need `keys` keys and own them all between
/// them: each has run its upkeep over the pods there are now.
async fn keys_shared(world: &World, replicas: &[usize], keys: u64) {
    wait_until(
        Duration::from_secs(60),
        "the replicas to share every key",
        || async {
            let mut owned = 0;
            for &i in replicas {
                if gauge(world, i, "podiam_server_credential_keys").await != keys {
                    return false;
                }
                owned += gauge(world, i, "podiam_server_credential_keys_owned").await;
            }
            owned == keys
        },
    )
    .await
    .expect("keys shared");
}

/// The successful AssumeRole calls, by session name.
fn sessions(calls: &[StsCall]) -> BTreeMap<String, usize> {
    let mut by_session = BTreeMap::new();
    for call in calls.iter().filter(|c| c.status == 200) {
        let name = call
            .param("RoleSessionName")
            .unwrap_or_default()
            .to_string();
        *by_session.entry(name).or_default() += 1;
    }
    by_session
}

/// Each of `replicas`' count of successful STS calls, once their sum is the proxy's count of
/// successful AssumeRole calls: the proxy records a call before its answer reaches the
/// replica, which counts it after (within 30 s; what they are then, if not).
async fn ok_calls_counted(world: &World, replicas: &[usize]) -> Vec<u64> {
    let counts = || async {
        futures::future::join_all(replicas.iter().map(|&i| async move {
            gauge(world, i, r#"podiam_server_sts_calls_total{result="ok"}"#).await
        }))
        .await
    };
    let proxy_ok = || {
        sessions(&world.sts_proxy().assume_role_calls())
            .values()
            .sum::<usize>()
    };
    let _ = wait_until(
        Duration::from_secs(30),
        "replicas to count their calls",
        || async { counts().await.iter().sum::<u64>() as usize == proxy_ok() },
    )
    .await;
    counts().await
}

async fn proxy_ok_calls_reach(world: &World, n: usize, what: &str) {
    let proxy = world.sts_proxy();
    wait_until(Duration::from_secs(60), what, || async {
        sessions(&proxy.assume_role_calls()).values().sum::<usize>() >= n
    })
    .await
    .expect(what);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_make_one_assume_role_for_two_hundred_pods_sharing_a_role() {
    let mut world = World::start(WorldConfig {
        servers: 3,
        replica_set: true,
        sts_proxy: true,
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .unregistered_pod("team-a", "app", Some("app-reader"))
    })
    .await
    .expect("world starts");
    replica_set_seen(&world, &[0, 1, 2], 3).await;
    // The node as the kubelet registers it, so that the agent's one NodeReady report
    // succeeds: its failovers are then only its calls for pods.
    world
        .emulator()
        .create(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-1"},
            "spec": {},
        }))
        .expect("node created");
    world.start_agent().await.expect("agent starts");

    create_pods(&world, 200).await;
    world.register_pod("app").await.expect("pod registered");
    keys_shared(&world, &[0, 1, 2], 1).await;
    proxy_ok_calls_reach(&world, 1, "the shared session fetched").await;
    // The 200 pods' key was needed before app existed, so the waits above say nothing of
    // app: its first requests below are not to race its event through a busy machine.
    world
        .wait_pod_seen("app", &[0, 1, 2])
        .await
        .expect("every replica sees app");

    // The pod's SDKs through the agent, several times: the agent asks the owner, which
    // holds the session.
    for _ in 0..2 {
        let arn = world.rust_sdk_caller_arn("app").await.expect("runs");
        assert!(
            arn.as_ref().is_ok_and(|a| a.contains("app-reader")),
            "{arn:?}"
        );
        let arn = world.boto3_caller_arn("app").await.expect("runs");
        assert!(
            arn.as_ref().is_ok_and(|a| a.contains("app-reader")),
            "{arn:?}"
        );
    }
    // Every replica has had its upkeep over all 201 pods (one key), and the agent's
    // requests were answered: still one call in all — but for a call the agent also sent to
    // a second replica because the owner had not answered within 300 ms (a busy machine):
    // that replica holds nothing and fetches once. That is the fault path, and counted.
    keys_shared(&world, &[0, 1, 2], 1).await;
    let failovers = metric_value(
        &world.agent_metrics().await.expect("agent metrics"),
        "podiam_agent_server_failovers_total",
    ) as usize;
    let per_replica = ok_calls_counted(&world, &[0, 1, 2]).await;
    let calls = world.sts_proxy().assume_role_calls();
    assert!(
        !calls.is_empty() && calls.len() <= 1 + failovers,
        "{} calls, {failovers} failovers, per replica {per_replica:?}: {calls:#?}\nagent log:\n{}",
        calls.len(),
        world.agent_log()
    );
    assert!(calls.iter().all(|c| c.param("RoleArn") == Some(ROLE_ARN)));
    assert_eq!(
        per_replica.iter().sum::<u64>() as usize,
        calls.len(),
        "{per_replica:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replica_hands_over_its_keys_with_one_call_each_and_no_other() {
    const PODS: usize = 60;
    let mut world = World::start(WorldConfig {
        servers: 3,
        replica_set: true,
        sts_proxy: true,
        server_args: ["--session-name", "{namespace}.{pod}"]
            .map(String::from)
            .to_vec(),
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    })
    .await
    .expect("world starts");
    replica_set_seen(&world, &[0, 1, 2], 3).await;
    create_pods(&world, PODS).await;
    keys_shared(&world, &[0, 1, 2], PODS as u64).await;
    proxy_ok_calls_reach(&world, PODS, "every pod's session fetched").await;
    let before = sessions(&world.sts_proxy().assume_role_calls());
    assert_eq!(before.len(), PODS, "{before:?}");
    assert!(
        before.values().all(|&n| n == 1),
        "a session fetched twice: {before:?}"
    );

    // The keys replica 2 owns, by the rendezvous every replica and agent computes.
    let names = ["podiam-server-0", "podiam-server-1", "podiam-server-2"];
    let owned_by_2: BTreeSet<String> = before
        .keys()
        .filter(|session| {
            let key = podiam_proto::owner::credential_key(ROLE_ARN, None, session, &[], false);
            podiam_proto::owner::owner(key, names) == Some("podiam-server-2")
        })
        .cloned()
        .collect();
    let killed_fetched = ok_calls_counted(&world, &[0, 1, 2]).await[2];
    assert_eq!(killed_fetched as usize, owned_by_2.len(), "{owned_by_2:?}");
    assert!(!owned_by_2.is_empty(), "replica 2 owned no key of {PODS}");

    world.kill_server(2).await.expect("killed");
    replica_set_seen(&world, &[0, 1], 2).await;
    keys_shared(&world, &[0, 1], PODS as u64).await;
    proxy_ok_calls_reach(&world, PODS + owned_by_2.len(), "the moved keys fetched").await;
    let after = sessions(&world.sts_proxy().assume_role_calls());
    let fetched_again: BTreeSet<String> = after
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(session, _)| session.clone())
        .collect();
    assert_eq!(
        fetched_again, owned_by_2,
        "the keys fetched again are not the moved ones"
    );
    assert!(after.values().all(|&n| n <= 2), "{after:?}");
    assert_eq!(after.values().sum::<usize>(), PODS + owned_by_2.len());
}

/// `config` with the recording proxy before moto, a session per pod (`{namespace}.{pod}`)
/// and a budget of `rate` STS calls a second.
fn budgeted(rate: usize, config: WorldConfig) -> WorldConfig {
    WorldConfig {
        sts_proxy: true,
        server_args: [
            "--session-name",
            "{namespace}.{pod}",
            "--sts-rate",
            &rate.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        ..config
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_of_five_calls_a_second_is_never_exceeded_and_a_pods_request_goes_first() {
    const PODS: usize = 50;
    const RATE: usize = 5;
    let world = World::start(budgeted(
        RATE,
        WorldConfig::default().namespace("team-a", Some("app-.*")),
    ))
    .await
    .expect("world starts");
    create_pods(&world, PODS).await;
    // While the prefetches are still queued (50 at 5 a second take ten seconds), a new
    // pod asks: its call goes before the queue's.
    proxy_ok_calls_reach(&world, RATE, "the first prefetches").await;
    let newcomer = PODS;
    let client = world.kube_client();
    let spec = PodSpec {
        name: "newcomer".into(),
        namespace: "team-a".into(),
        role: Some("app-reader".into()),
        registered: true,
        service_account: None,
        family: Default::default(),
    };
    create_pod(&client, &spec, &[ip(newcomer).into()])
        .await
        .expect("pod created");
    let mut agent = world.server_client().await.expect("client");
    let request = GetCredentialsRequest {
        ip: ip(newcomer).to_string(),
        role_name: "app-reader".into(),
        node_name: String::new(),
        pod_token: String::new(),
    };
    let answered = wait_until(
        Duration::from_secs(30),
        "the newcomer's credentials",
        || {
            let mut agent = agent.clone();
            let request = request.clone();
            async move { agent.get_credentials(request).await.is_ok() }
        },
    )
    .await;
    answered.expect("the newcomer is answered");
    let _ = agent.get_credentials(request).await.expect("credentials");
    proxy_ok_calls_reach(&world, PODS + 1, "every session fetched").await;

    let calls = world.sts_proxy().assume_role_calls();
    let mut times: Vec<Instant> = calls.iter().filter_map(|c| c.received).collect();
    assert_eq!(times.len(), calls.len());
    times.sort();
    // The server sends at most RATE calls in any 1.1 s; the proxy stamps each when its
    // body is in, which a busy machine may delay for one call and not the next. Counted
    // over 3 s of stamps (at most 3.3 s of sends, with up to 0.3 s of such delay): at most
    // 3 × RATE. A budget that let 5.5 calls a second through would show 16 or more. The
    // first RATE calls open the server's connections to STS, which may hold them up to a
    // whole window: the first RATE stamps are left out (no window starts at or before them).
    let window = Duration::from_secs(3);
    let most = (RATE.min(times.len())..times.len())
        .map(|i| {
            times
                .iter()
                .filter(|&&t| t >= times[i] && t.duration_since(times[i]) < window)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most <= 3 * RATE,
        "{most} AssumeRole calls within {window:?}"
    );
    // The newcomer's session was not the last: it went before prefetches queued earlier.
    let position = calls
        .iter()
        .position(|c| c.param("RoleSessionName") == Some("team-a.newcomer"))
        .expect("the newcomer's call");
    assert!(
        position < calls.len() - RATE,
        "the newcomer's call came {position}th of {}",
        calls.len()
    );
    let metrics = world.server_metrics().await.expect("metrics");
    assert!(
        metric_value(
            &metrics,
            r#"podiam_server_sts_budget_waits_total{priority="prefetch"}"#
        ) > 0
    );
}

/// A pod `name` in `namespace` with the role `app-reader`, at `ip(i)`.
async fn pod_in(world: &World, namespace: &str, name: String, i: usize) {
    let spec = PodSpec {
        name,
        namespace: namespace.into(),
        role: Some("app-reader".into()),
        registered: true,
        service_account: None,
        family: Default::default(),
    };
    create_pod(&world.kube_client(), &spec, &[ip(i).into()])
        .await
        .expect("pod created");
}

fn request_for(i: usize) -> GetCredentialsRequest {
    GetCredentialsRequest {
        ip: ip(i).to_string(),
        role_name: "app-reader".into(),
        node_name: String::new(),
        pod_token: String::new(),
    }
}

/// AssumeRole calls the proxy has seen for sessions of `namespace` (`{namespace}.{pod}`).
fn calls_of(world: &World, namespace: &str) -> usize {
    let prefix = format!("{namespace}.");
    world
        .sts_proxy()
        .assume_role_calls()
        .iter()
        .filter(|c| {
            c.param("RoleSessionName")
                .is_some_and(|s| s.starts_with(&prefix))
        })
        .count()
}

/// `podiam_server_sts_budget_waits_total{priority="request"}` of the one replica.
async fn request_waits(world: &World) -> usize {
    world.server_metrics().await.map_or(0, |metrics| {
        metric_value(
            &metrics,
            r#"podiam_server_sts_budget_waits_total{priority="request"}"#,
        ) as usize
    })
}

/// Requests for `pods`' credentials, each in its own task, asked again while refused (a
/// pod the server's view does not hold yet).
fn ask_for(
    world_client: &podiam_tests::identity::Client,
    pods: std::ops::Range<usize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    pods.map(|i| {
        let mut agent = world_client.clone();
        tokio::spawn(async move {
            while agent.get_credentials(request_for(i)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_queueing_many_requests_does_not_hold_up_another_namespaces_pod() {
    // Sixty pods of one namespace ask at once, each its own session: twenty seconds of
    // calls at three a second. Another namespace's pod asks, and while it waits sixty more
    // of the first namespace's pods ask.
    const WAVE: usize = 60;
    const RATE: usize = 3;
    let world = World::start(budgeted(
        RATE,
        WorldConfig::default()
            .namespace("team-busy", Some("app-.*"))
            .namespace("team-quiet", Some("app-.*")),
    ))
    .await
    .expect("world starts");
    futures::future::join_all(
        (0..2 * WAVE).map(|i| pod_in(&world, "team-busy", format!("app-{i}"), i)),
    )
    .await;
    let agent = world.server_client().await.expect("client");
    let mut busy = ask_for(&agent, 0..WAVE);
    // Every request of the first wave is in: fetched already (prefetched, or at once) or
    // waiting for the budget (a few may wait for a prefetch in flight instead).
    wait_until(
        Duration::from_secs(60),
        "the first wave to queue",
        || async { request_waits(&world).await + calls_of(&world, "team-busy") + RATE >= WAVE },
    )
    .await
    .expect("first wave queued");
    let queued = request_waits(&world).await;
    let before = calls_of(&world, "team-busy");
    assert!(
        before <= WAVE / 2,
        "{before} of the first wave already fetched"
    );

    // The quiet pod asks; once its request waits for the budget, the second wave asks.
    pod_in(&world, "team-quiet", "app-0".into(), 2 * WAVE).await;
    let quiet = agent.clone();
    let answer = tokio::spawn(async move {
        wait_until(
            Duration::from_secs(60),
            "the quiet pod's credentials",
            || {
                let mut quiet = quiet.clone();
                async move { quiet.get_credentials(request_for(2 * WAVE)).await.is_ok() }
            },
        )
        .await
    });
    wait_until(
        Duration::from_secs(30),
        "the quiet pod's request to wait",
        || async { request_waits(&world).await > queued },
    )
    .await
    .expect("the quiet pod waits");
    let waiting_since = std::time::Instant::now();
    busy.extend(ask_for(&agent, WAVE..2 * WAVE));
    answer
        .await
        .expect("joins")
        .expect("the quiet pod is answered");
    // In the order STS received them: namespaces in turn, so one call of the busy namespace
    // goes before the quiet pod's, not the rest of the first wave (first come, first served:
    // about thirty) or the second wave (last come, first served: sixty). Up to one window's
    // calls more may arrive after the wait was seen, begun before it (granted, on their way).
    let calls = world.sts_proxy().assume_role_calls();
    let session = |c: &StsCall| c.param("RoleSessionName").unwrap_or_default().to_string();
    let quiet_received = calls
        .iter()
        .find(|c| session(c) == "team-quiet.app-0")
        .and_then(|c| c.received)
        .expect("the quiet pod's call");
    let busy_first = calls
        .iter()
        .filter(|c| session(c).starts_with("team-busy."))
        .filter(|c| {
            c.received
                .is_some_and(|r| r > waiting_since && r < quiet_received)
        })
        .count();
    assert!(
        busy_first <= 2 * RATE,
        "{busy_first} busy calls went before the quiet pod's, after it waited"
    );
    assert_eq!(calls_of(&world, "team-quiet"), 1);
    for handle in busy {
        handle.abort();
    }
}
