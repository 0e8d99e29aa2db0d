//! Faults under load: a pod's SDK must never notice a server replica dying or hanging, the
//! API server blinking, certificates rotating, the agent being updated, or STS being down.
//!
//! Each scenario runs 3 server replicas and 12 pods, each pod with a botocore client fetching
//! credentials in a loop with botocore's defaults (1 s timeout, one attempt: the strictest
//! SDK). It inflicts one fault and asserts that no fetch failed, and that fetches kept
//! succeeding while the fault lasted (so the load really ran through it). The scenarios run
//! one at a time: each is a whole cluster on 2 cores. Needs root.
//!
//! Also here: no false "unknown pod" during a forced, slow relist of 2,000 pods.

use std::time::Duration;

use nix::sys::signal::Signal;
use podiam_proto::Reason;
use podiam_proto::v1::GetPodRoleRequest;
use podiam_tests::fixtures::{pod_name, role_of};
use podiam_tests::kube_emulator::Kind;
use podiam_tests::process::wait_until;
use podiam_tests::sdk_load::{ClientSpec, LoadReport, SdkLoad, now};
use podiam_tests::world::{World, WorldConfig, metric_value};
use serde_json::json;

/// One scenario at a time (a tokio mutex: it is held across awaits and never poisoned).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PODS: usize = 12;
const REPLICAS: usize = 3;

/// 3 replicas, 12 pods with roles in `team-a` (which permits `app-.*`), the agent running;
/// plus `late`, a pod whose Pod object is created during the fault.
fn fleet(server_args: &[&str], agent_args: &[&str]) -> WorldConfig {
    let mut config = WorldConfig {
        servers: REPLICAS,
        start_agent: true,
        server_args: server_args.iter().map(|a| a.to_string()).collect(),
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    };
    for i in 0..PODS {
        config = config.pod("team-a", &pod_name(i), Some(role_of(i)));
    }
    config.unregistered_pod("team-a", "late", Some("app-reader"))
}

/// The fleet of `config` started, its 12 clients fetching, each with 3 good fetches behind
/// it.
/// The world of `config` with `specs`' clients fetching, every one of them warm (three
/// fetches each), and when they were: failures from then on count ([`assert_unnoticed`]).
async fn under_load(config: WorldConfig, specs: Vec<ClientSpec>) -> (World, SdkLoad, f64) {
    let world = World::start(config).await.expect("world starts");
    // Clients start once the agent holds the node's pods, as on a node whose agent has run
    // a while: the faults, not the agent's first seconds, are what the tests are about.
    world.wait_node_stream_synced().await.expect("synced");
    let load = SdkLoad::start(&world, &specs).expect("load");
    load.wait_each_ok(3, 0.0, Duration::from_secs(30))
        .await
        .expect("warm");
    // Before this, a dozen SDK processes start at once on two cores; a first fetch that
    // times out while the others import their SDKs is not what any of these tests is about.
    (world, load, now())
}

fn clients() -> Vec<ClientSpec> {
    (0..PODS)
        .map(|i| ClientSpec::new(&pod_name(i), &[role_of(i)]))
        .collect()
}

/// Asserts no client saw a failure once all were warm (`warm`, from [`under_load`]), and
/// that every client kept fetching during `[from, to)`: at least `per_client` successes
/// each.
fn assert_unnoticed(
    report: &LoadReport,
    warm: f64,
    (from, to): (f64, f64),
    per_client: usize,
    world: &World,
) {
    let failures = report.failures_from(warm);
    assert!(
        failures.is_empty(),
        "{}\nagent log:\n{}",
        report.summary(),
        world.agent_log()
    );
    for client in &report.clients {
        assert!(
            client.ok_between(from, to) >= per_client,
            "{} fetched only {} times during the fault ({:.1}s): {}",
            client.pod,
            client.ok_between(from, to),
            to - from,
            report.summary()
        );
    }
    println!("{}", report.summary());
}

/// The late pod appears during the fault and must get its credentials within the fault too.
/// Its client starts once the replicas other than `victim` have its event: what is judged
/// is that the agent gets past the replica at fault, not how fast the API's watch is.
async fn late_pod_appears(world: &World, victim: usize) -> SdkLoad {
    world.register_pod("late").await.expect("late pod created");
    let others: Vec<usize> = (0..world.replicas().len())
        .filter(|&i| i != victim)
        .collect();
    world
        .wait_pod_seen("late", &others)
        .await
        .expect("the other replicas see the late pod");
    SdkLoad::start(world, &[ClientSpec::new("late", &["app-reader"])]).expect("late client")
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, warm) = under_load(fleet(&[], &[]), clients()).await;
    let victim = world
        .wait_stream_holder()
        .await
        .expect("a replica holds the stream");

    let from = now();
    world.kill_server(victim).await.expect("killed");
    let late = late_pod_appears(&world, victim).await;
    wait_until(
        Duration::from_secs(10),
        "the node stream on another replica",
        || async { world.stream_holder().await.is_some_and(|i| i != victim) },
    )
    .await
    .expect("stream moved");
    load.wait_each_ok(5, from, Duration::from_secs(30))
        .await
        .expect("fetching on");
    late.wait_each_ok(3, from, Duration::from_secs(30))
        .await
        .expect("the late pod is served");
    let to = now();

    let report = load.stop().await.expect("report");
    assert_unnoticed(&report, warm, (from, to), 5, &world);
    assert_unnoticed(
        &late.stop().await.expect("late report"),
        // The late pod's first fetch is in the fault: every one counts.
        0.0,
        (from, to),
        3,
        &world,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_stopped_by_a_rolling_update_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, warm) =
        under_load(fleet(&["--shutdown-delay", "2s"], &[]), clients()).await;
    let victim = world
        .wait_stream_holder()
        .await
        .expect("a replica holds the stream");

    let from = now();
    let took = world.stop_server(victim).await.expect("drained and exited");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "a drain keeps answering for --shutdown-delay, then ends promptly: took {took:?}"
    );
    let log = world.server_log_text_of(victim);
    let draining = log.find("draining: not ready").expect("draining logged");
    let stopped = log.find("server stopped").expect("stop logged");
    assert!(draining < stopped, "{log}");
    world.restart_server(victim).await.expect("back");
    load.wait_each_ok(5, from, Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();
    assert_unnoticed(
        &load.stop().await.expect("report"),
        warm,
        (from, to),
        5,
        &world,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_hangs_for_twenty_seconds_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, warm) = under_load(fleet(&[], &[]), clients()).await;
    let victim = world
        .wait_stream_holder()
        .await
        .expect("a replica holds the stream");

    let from = now();
    world
        .signal_server(victim, Signal::SIGSTOP)
        .expect("stopped");
    // The fault: 20 s of a replica that accepts connections and answers nothing. A pod is
    // created meanwhile; the hung replica's stream cannot tell the agent about it.
    let late = late_pod_appears(&world, victim).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let hung_until = now();
    world
        .signal_server(victim, Signal::SIGCONT)
        .expect("resumed");
    load.wait_each_ok(2, hung_until, Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();

    let report = load.stop().await.expect("report");
    // At least one fetch every two seconds per client (they make about four a second on an
    // idle machine) all through the hang.
    assert_unnoticed(&report, warm, (from, hung_until), 10, &world);
    assert_unnoticed(
        &late.stop().await.expect("late report"),
        // The late pod's first fetch is in the fault: every one counts.
        0.0,
        (from, to),
        10,
        &world,
    );
    // The agent left the hung replica's stream, by whichever notice came first: 3 s without
    // a heartbeat, or two failed health checks while another replica passes them (each is
    // timed exactly by the agent's in-process tests).
    let metrics = world.agent_metrics().await.expect("agent metrics");
    let log = world.agent_log_text();
    assert!(
        log.contains("the replica hangs") || log.contains("health checks fail while"),
        "the agent noticed the hung replica:\n{}\n{metrics}",
        world.agent_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_stream_moves_off_a_slow_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (world, load, warm) = under_load(fleet(&[], &[]), clients()).await;
    let victim = world
        .wait_stream_holder()
        .await
        .expect("a replica holds the stream");

    // The fault: the replica still answers everything, heartbeats included, 800 ms late —
    // past the agent's health-check deadline, so the agent marks it not ready. Every grant
    // and revocation on its stream would reach the agent 800 ms late too.
    let from = now();
    world.slow_server(victim, Duration::from_millis(800));
    wait_until(
        Duration::from_secs(15),
        "the node stream on another replica",
        || async { world.stream_holder().await.is_some_and(|i| i != victim) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", world.agent_log()));
    load.wait_each_ok(3, from, Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();
    assert_unnoticed(
        &load.stop().await.expect("report"),
        warm,
        (from, to),
        3,
        &world,
    );
    assert!(
        world.agent_log_text().contains("health checks fail while"),
        "{}",
        world.agent_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_away_for_thirty_seconds_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut specs = clients();
    // app-0's role changes while the API server is away: either role is right until the
    // servers can know.
    specs[0] = ClientSpec::new(&pod_name(0), &["app-reader", "app-writer"]);
    let (world, load, warm) = under_load(fleet(&[], &[]), specs).await;

    let from = now();
    world.emulator().go_down().await;
    world
        .emulator()
        .merge_patch(
            Kind::Pod,
            Some("team-a"),
            &pod_name(0),
            json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "app-writer"}}}),
        )
        .expect("changed while away");
    // The replicas keep answering from what they know, and still say they are ready.
    for i in 0..REPLICAS {
        let url = format!("http://{}/ready", world.replicas()[i].health);
        let ready = podiam_tests::world::http_get_text(&url).await;
        assert!(
            ready.is_ok(),
            "replica {i} not ready during the outage: {ready:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Every replica's watches have failed again and again for 30 s: each says its view is
    // stale, and agents, with no current replica to prefer, go on with the stale ones.
    wait_until(Duration::from_secs(10), "every replica stale", || {
        every_replica_stale(&world, 1)
    })
    .await
    .expect("stale during the outage");
    let away_until = now();
    world.emulator().come_back().await.expect("back");
    wait_until(
        Duration::from_secs(20),
        "app-0 to get the role it was given while the API server was away",
        || {
            let report = load.report();
            async move { report.clients[0].last_role() == Some("app-writer") }
        },
    )
    .await
    .expect("the change arrived");
    // Current again once the watches work (a quiet resource's 40 s after its last failure).
    wait_until(Duration::from_secs(60), "every replica current", || {
        every_replica_stale(&world, 0)
    })
    .await
    .expect("current after the outage");
    let to = now();

    let mut report = load.stop().await.expect("report");
    let writer_from = report.clients[0].fetches.iter().find_map(|f| match f {
        podiam_tests::sdk_load::Fetch::Ok { at, role, .. } if role == "app-writer" => Some(*at),
        _ => None,
    });
    assert!(
        writer_from.is_some_and(|at| at >= away_until),
        "app-0 got the new role at {writer_from:?}, before the API server was back at {away_until} (away from {from})"
    );
    // The metadata protocol names the role in one request (the listing) and asks for its
    // credentials in the next. A change landing between the two refuses the second
    // (`wrong-role`, as EC2 refuses the old name of a replaced instance profile), and the SDK
    // gets the new role at its next fetch. That moment, and only it, may cost app-0 one
    // fetch: one that began after the API server was back and before the new role was
    // first served.
    let writer_from = writer_from.unwrap_or(f64::MAX);
    let at_the_change = |f: &podiam_tests::sdk_load::Fetch| {
        !f.is_ok() && f.at() >= away_until && f.at() < writer_from
    };
    let changed = &mut report.clients[0].fetches;
    assert!(
        changed.iter().filter(|f| at_the_change(f)).count() <= 1,
        "{changed:?}"
    );
    changed.retain(|f| !at_the_change(f));
    assert_unnoticed(&report, warm, (from, away_until), 30, &world);
    assert!(report.ok_between(away_until, to) > 0);
}

/// Whether every replica's `podiam_server_view_stale` is `want`.
async fn every_replica_stale(world: &World, want: u64) -> bool {
    for i in 0..REPLICAS {
        let metrics = world.server_metrics_of(i).await.unwrap_or_default();
        if metric_value(&metrics, "podiam_server_view_stale") != want {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_that_answers_nothing_is_seen_and_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (world, load, warm) = under_load(fleet(&["--api-timeout", "3s"], &[]), clients()).await;

    // A partition that drops packets: the replicas' connections to the API server, their
    // watches' among them, get no answer, no error and no end. Only the replicas' own
    // timeout (nothing received for --api-timeout) can tell them; then their watches fail
    // again and again, and each says its view is stale.
    let from = now();
    world.emulator().go_silent();
    wait_until(Duration::from_secs(60), "every replica stale", || {
        every_replica_stale(&world, 1)
    })
    .await
    .expect("stale while the API server answers nothing");
    let healed = now();
    world.emulator().speak_again();
    // Current again once the watches work (a quiet resource's 40 s after its last failure).
    wait_until(Duration::from_secs(60), "every replica current", || {
        every_replica_stale(&world, 0)
    })
    .await
    .expect("current once the API server answers again");
    let to = now();
    let report = load.stop().await.expect("report");
    assert_unnoticed(&report, warm, (from, to), 30, &world);
    assert!(report.ok_between(from, healed) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotated_mid_load_are_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, warm) = under_load(
        fleet(
            &["--tls-reload-interval", "1s"],
            &["--tls-reload-interval", "1s"],
        ),
        clients(),
    )
    .await;

    let from = now();
    // New server and agent certificates from the same CA, as cert-manager renews them.
    let certs = world.certs().clone();
    let ca_cert = std::fs::read_to_string(&certs.ca_cert).expect("ca");
    let ca_key = std::fs::read_to_string(&certs.ca_key).expect("ca key");
    let renewed = podiam_certs::renew(&ca_cert, &ca_key, &podiam_certs::CertOptions::default())
        .expect("renewed");
    renewed
        .replace_leaves_in(certs.ca_cert.parent().expect("certs dir"))
        .expect("files replaced");
    wait_until(
        Duration::from_secs(10),
        "every daemon to rotate",
        || async {
            (0..REPLICAS).all(|i| {
                world
                    .server_log_text_of(i)
                    .contains("TLS certificate rotated")
            }) && world.agent_log_text().contains("TLS certificate rotated")
        },
    )
    .await
    .expect("rotated");
    // New connections: a replica restarts, and the agent dials it with its new certificate.
    let victim = world.wait_stream_holder().await.expect("stream holder");
    world.kill_server(victim).await.expect("killed");
    world.restart_server(victim).await.expect("restarted");
    let new_serial = serial_of(&renewed.agent_cert);
    wait_until(
        Duration::from_secs(15),
        "the agent to connect with its new certificate",
        || async {
            world
                .server_log_text_of(victim)
                .lines()
                .any(|l| l.contains("TLS client connected") && l.contains(&new_serial))
        },
    )
    .await
    .expect("new certificate in use");
    load.wait_each_ok(3, now(), Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();
    assert_unnoticed(
        &load.stop().await.expect("report"),
        warm,
        (from, to),
        5,
        &world,
    );
}

/// A certificate's serial as x509-parser prints it (`raw_serial_as_string`).
fn serial_of(pem: &str) -> String {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    let cert = der.parse_x509().expect("certificate");
    cert.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_rolling_update_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    // As deploy/ runs it: the new agent cuts connections that bypass the rules at start,
    // and must not cut those DNATed to the old one, or those waiting for itself.
    let (mut world, load, warm) = under_load(fleet(&[], &["--flush-conntrack"]), clients()).await;

    let from = now();
    world
        .roll_agent()
        .await
        .expect("new agent in, old agent out");
    load.wait_each_ok(5, now(), Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();
    assert_unnoticed(
        &load.stop().await.expect("report"),
        warm,
        (from, to),
        5,
        &world,
    );
    // The old agent left its rules as they were: one chain, one jump per intercepted address.
    let rules = world.node_nat_rules().await.expect("rules");
    assert_eq!(rules.matches("-N PODIAM").count(), 1, "{rules}");
    assert_eq!(rules.matches("-j PODIAM").count(), 2, "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_for_a_minute_is_not_noticed() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Short sessions refreshed every minute, so that STS is really called — and fails —
    // during the outage; credentials with 5 minutes left are still served.
    let server = [
        "--session-duration",
        "15m",
        "--min-remaining",
        "5m",
        "--refresh-after",
        "30s",
    ];
    let specs: Vec<ClientSpec> = clients()
        .into_iter()
        .map(|spec| ClientSpec {
            min_left: Duration::from_secs(5 * 60),
            ..spec
        })
        .collect();
    let config = WorldConfig {
        sts_proxy: true,
        ..fleet(&server, &["--min-remaining", "5m"])
    };
    let (world, load, warm) = under_load(config, specs).await;

    let from = now();
    world.sts_proxy().set_failing(true);
    tokio::time::sleep(Duration::from_secs(60)).await;
    world.sts_proxy().set_failing(false);
    let down_until = now();
    load.wait_each_ok(2, down_until, Duration::from_secs(30))
        .await
        .expect("fetching on");
    let to = now();

    let report = load.stop().await.expect("report");
    assert_unnoticed(&report, warm, (from, down_until), 60, &world);
    assert!(report.ok_between(down_until, to) > 0);
    let failed_calls = world
        .sts_proxy()
        .assume_role_calls()
        .iter()
        .filter(|c| c.status == 503)
        .count();
    assert!(
        failed_calls > 0,
        "the servers tried STS during the outage (refreshes) and were refused"
    );
}

/// The most memory a process has held (`VmHWM`, KiB).
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relist_of_pods_bloated_by_a_tenant_takes_what_the_index_keeps() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start(WorldConfig::default().namespace("team-a", Some("app-.*")))
        .await
        .expect("world starts");
    // Pods any tenant may create: 40 of 60,000 environment variables each, about 1 MiB of
    // JSON apiece (etcd takes 1.5). Decoded whole, each variable took some 280 bytes: 670
    // MiB for the list. Decoded slim, the list's text and little else.
    const PODS: usize = 40;
    let env: Vec<serde_json::Value> = (0..60_000)
        .map(|i| json!({"name": format!("V{i}")}))
        .collect();
    for i in 0..PODS {
        let mut pod = podiam_tests::kube_emulator::pod(
            "team-a",
            &format!("bloated-{i}"),
            &format!("10.91.0.{}", i + 1),
            &[("iam.amazonaws.com/role", "app-reader")],
        );
        pod["spec"]["containers"][0]["env"] = json!(env);
        world.emulator().create(pod).expect("pod created");
    }
    let relists = async || {
        let metrics = world.server_metrics().await.expect("metrics");
        metric_value(
            &metrics,
            r#"podiam_server_watch_relists_total{resource="pods"}"#,
        )
    };
    let before = relists().await;
    world.emulator().compact();
    world.emulator().close_watches();
    wait_until(
        Duration::from_secs(60),
        "the server to relist pods",
        || async { relists().await > before },
    )
    .await
    .expect("relisted");
    let pid = world.server_pid(0).expect("the server runs");
    let peak_mib = peak_kib(pid) / 1024;
    assert!(
        peak_mib < 250,
        "the server's memory peaked at {peak_mib} MiB for a list of {PODS} pods"
    );
    // And it decided on them as usual.
    let mut client = world.server_client().await.expect("client");
    let role = client
        .get_pod_role(GetPodRoleRequest {
            ip: "10.91.0.1".into(),
            node_name: String::new(),
        })
        .await
        .expect("the pod's role");
    assert_eq!(role.into_inner().role_name, "app-reader");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_pod_is_unknown_during_a_slow_forced_relist_of_two_thousand_pods() {
    let _one = ONE_AT_A_TIME.lock().await;
    // One node with 2000 pods, each asked about again and again: no per-node call limit
    // (no node has that many pods, nor asks about them in rounds).
    let world = World::start(WorldConfig {
        server_args: vec!["--agent-call-rate".into(), "0".into()],
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    })
    .await
    .expect("world starts");
    const N: usize = 2000;
    let ip = |i: usize| format!("10.90.{}.{}", i / 250, i % 250 + 1);
    for i in 0..N {
        let mut pod = podiam_tests::kube_emulator::pod(
            "team-a",
            &format!("many-{i}"),
            &ip(i),
            &[("iam.amazonaws.com/role", "app-reader")],
        );
        pod["spec"]["nodeName"] = json!(podiam_tests::world::NODE_NAME);
        world.emulator().create(pod).expect("pod created");
    }
    let client = world.server_client().await.expect("client");
    let ask_all = || {
        let client = client.clone();
        async move {
            let asks = (0..N).map(|i| {
                let mut client = client.clone();
                let request = GetPodRoleRequest {
                    ip: ip(i),
                    node_name: String::new(),
                };
                async move { client.get_pod_role(request).await }
            });
            futures::future::join_all(asks).await
        }
    };
    // A generous bound: on a busy machine the first sync of 2000 pods and a round of 2000
    // asks each take seconds.
    wait_until(
        Duration::from_secs(120),
        "the server to know all 2000 pods",
        || async { ask_all().await.iter().all(Result::is_ok) },
    )
    .await
    .expect("all known");
    let relists = |metrics: &str| {
        metric_value(
            metrics,
            r#"podiam_server_watch_relists_total{resource="pods"}"#,
        )
    };
    let before = relists(&world.server_metrics().await.expect("metrics"));

    // The relist: old resourceVersions expire and every watch ends, so the server's watcher
    // must list again, and the emulator holds that list until every pod has been asked
    // about, three times over, while it is under way.
    world.emulator().hold_lists();
    world.emulator().compact();
    world.emulator().close_watches();
    let mut unknown = Vec::new();
    let mut other_errors = Vec::new();
    let mut ask_and_sort = async || {
        for (i, answer) in ask_all().await.into_iter().enumerate() {
            match answer {
                Ok(_) => {}
                Err(status) if Reason::of(&status) == Some(Reason::UnknownPod) => {
                    unknown.push(ip(i))
                }
                Err(status) => other_errors.push(format!("{}: {status:?}", ip(i))),
            }
        }
    };
    wait_until(
        Duration::from_secs(30),
        "the server's relist of pods to begin",
        || async {
            world
                .emulator()
                .held_lists()
                .iter()
                .any(|path| path.ends_with("/pods"))
        },
    )
    .await
    .expect("the server relists");
    for _ in 0..3 {
        ask_and_sort().await;
    }
    // Then through the rest of the relist, until the server has it all.
    world.emulator().release_lists();
    for round in 0.. {
        ask_and_sort().await;
        let metrics = world.server_metrics().await.expect("metrics");
        if relists(&metrics) > before {
            break;
        }
        assert!(
            round < 200,
            "the relist never ended:\n{}",
            world.server_log()
        );
    }
    assert!(
        unknown.is_empty(),
        "{} false unknown-pod answers",
        unknown.len()
    );
    assert!(other_errors.is_empty(), "{other_errors:?}");
    // And the server stayed ready all along (its view was never half-filled).
    assert!(
        podiam_tests::world::http_get_text(&format!("http://{}/ready", world.replicas()[0].health))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_replica_that_restarts_gets_the_node_stream_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut world = World::start(podiam_tests::fixtures::web_with_agent())
        .await
        .expect("world starts");
    world.wait_node_stream_synced().await.expect("synced");
    assert_eq!(world.wait_stream_holder().await.expect("holder"), 0);
    async fn syncs(world: &World) -> (u64, u64) {
        let metrics = world.agent_metrics().await.expect("agent metrics");
        (
            metric_value(&metrics, "podiam_agent_node_stream_synced"),
            metric_value(&metrics, "podiam_agent_node_stream_syncs_total"),
        )
    }
    wait_until(
        Duration::from_secs(15),
        "the first node stream synced",
        || async { syncs(&world).await.0 == 1 },
    )
    .await
    .expect("synced");
    let before = syncs(&world).await.1;
    world.kill_server(0).await.expect("killed");
    world.restart_server(0).await.expect("restarted");
    // Synced again, by the agent's own account (the server counts a stream as soon as it
    // is opened, before its snapshot is in). (A busy machine may delay a heartbeat enough
    // for the agent to open a stream once more: at least one new snapshot.)
    wait_until(
        Duration::from_secs(15),
        "the agent's node stream synced again on the only replica",
        || async {
            let (synced, total) = syncs(&world).await;
            synced == 1 && total > before
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", world.agent_log()));
    assert_eq!(world.wait_stream_holder().await.expect("holder"), 0);
}
