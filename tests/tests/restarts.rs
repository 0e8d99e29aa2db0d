//! The agent restarted or updated under SDKs that live long, as applications hold them.
//!
//! Four pods each run six clients for the whole test: the AWS SDK for JavaScript v3 (one
//! `fromInstanceMetadata` provider, default retries), the Rust SDK (one aws-config IMDS
//! client with its default 6-hour token, and one `ImdsCredentialsProvider`), botocore (one
//! `InstanceMetadataFetcher`) and the AWS SDKs for Go v1 and v2 (one EC2 role provider each,
//! over one metadata client holding its token: 6 hours for v1, 5 minutes for v2), each
//! fetching credentials in a loop (`podiam_tests::sdk_load`).
//!
//! - Through rolling updates of the agent (a new agent beside the old one, then SIGTERM to
//!   the old one) no fetch may fail: the tokens the SDKs hold, issued by the old agent, must
//!   be accepted by the new one.
//! - After a SIGKILL, while no agent runs, fetches fail (the metadata address is closed, never
//!   the node's own service: fail closed). Once the restarted agent is ready, the first fetch
//!   of every client must succeed; the time the agent was down is the only gap.
//! - When the token keys are lost (a SIGKILL, then a corrupt key file: the new agent signs
//!   with keys of its own), each SDK does what docs/troubleshooting.md says it does with a
//!   refused token.
//!
//! Needs root, the built binaries, and the JavaScript SDK and the Go client (`scripts/setup`).
//! The drills run one at a time: each is a whole cluster and 24 SDK processes on 2 cores.

use std::time::Duration;

use podiam_tests::fixtures::{pod_name, role_of};
use podiam_tests::process::wait_until;
use podiam_tests::sdk_load::{ClientReport, ClientSpec, Fetch, LoadReport, Sdk, SdkLoad, now};
use podiam_tests::world::{World, WorldConfig};

/// One test at a time (a tokio mutex: held across awaits, never poisoned).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PODS: usize = 4;
/// Rolling updates in a row (the drill that found the problem made three).
const ROLLS: usize = 3;
/// Every client fetches at least this often after a fault before the next step.
const FETCHES_AFTER_EACH_STEP: usize = 5;
/// How long a step may take to show its effect in every client.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// 2 server replicas, the agent, and `PODS` pods with roles in team-a.
fn cluster() -> WorldConfig {
    let mut config = WorldConfig {
        servers: 2,
        start_agent: true,
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    };
    for i in 0..PODS {
        config = config.pod("team-a", &pod_name(i), Some(role_of(i)));
    }
    config
}

/// Every long-lived SDK in every pod.
fn clients() -> Vec<ClientSpec> {
    (0..PODS)
        .flat_map(|i| {
            Sdk::LONG_LIVED
                .into_iter()
                .map(move |sdk| ClientSpec::new(&pod_name(i), &[role_of(i)]).with_sdk(sdk))
        })
        .collect()
}

/// The cluster with every client fetching, each with 3 good fetches behind it.
/// The world with every client fetching and warm (three fetches each), and when they were.
async fn under_load() -> (World, SdkLoad, f64) {
    let world = World::start(cluster()).await.expect("world starts");
    // Clients start once the agent holds the node's pods: the restarts, not the agent's
    // first seconds, are what the tests are about.
    world.wait_node_stream_synced().await.expect("synced");
    let load = SdkLoad::start(&world, &clients()).expect("clients start");
    load.wait_each_ok(3, 0.0, STEP_DEADLINE)
        .await
        .expect("every client fetches before the fault");
    // Before this, 24 SDK processes start at once on two cores: a first fetch that
    // times out meanwhile is not about restarts.
    (world, load, now())
}

/// Failed fetches per client that began in `[from, to)`, as `label: n` lines (clients
/// without failures left out).
fn failures_between(report: &LoadReport, from: f64, to: f64) -> Vec<String> {
    report
        .clients
        .iter()
        .filter_map(|c| {
            let failed: Vec<_> = c
                .failures()
                .into_iter()
                .filter(|f| f.at() >= from && f.at() < to)
                .collect();
            (!failed.is_empty()).then(|| {
                let first = failed.first().map(|f| format!("{f:?}")).unwrap_or_default();
                format!("{}: {} failed, first {first}", c.label(), failed.len())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_updates_of_the_agent_are_invisible_to_every_sdk() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, warm) = under_load().await;

    let mut rolls = Vec::new();
    for _ in 0..ROLLS {
        let from = now();
        world
            .roll_agent()
            .await
            .expect("new agent in, old agent out");
        if let Err(error) = load
            .wait_each_ok(FETCHES_AFTER_EACH_STEP, now(), STEP_DEADLINE)
            .await
        {
            panic!(
                "after roll {}: {error}
failed fetches per client since the roll:
{}",
                rolls.len() + 1,
                failures_between(&load.report(), from, f64::MAX).join("\n")
            );
        }
        rolls.push((from, now()));
    }

    let report = load.stop().await.expect("report");
    for (i, (from, to)) in rolls.iter().enumerate() {
        println!(
            "roll {}: {:?}",
            i + 1,
            failures_between(&report, *from, *to)
        );
    }
    println!("{}", report.summary());
    let failures = report.failures_from(warm);
    assert!(
        failures.is_empty(),
        "{} failed fetches through {ROLLS} rolling updates:\n{}\nagent logs:\n{}",
        failures.len(),
        report.summary(),
        world.agent_log()
    );
    // Each client fetched through every roll (the load really ran through them).
    for client in &report.clients {
        for (from, to) in &rolls {
            assert!(
                client.ok_between(*from, *to) >= FETCHES_AFTER_EACH_STEP,
                "{} fetched too little during a roll: {}",
                client.label(),
                report.summary()
            );
        }
    }
}

/// How long a client went without credentials because of the kill: from the start of its
/// last good fetch before its first failure after `killed`, to the start of its first good
/// fetch after that failure.
fn gap(client: &ClientReport, killed: f64) -> Option<f64> {
    let failed = client
        .fetches
        .iter()
        .find(|f| !f.is_ok() && f.at() >= killed)?
        .at();
    let last_before = client
        .fetches
        .iter()
        .filter(|f| f.is_ok() && f.at() < failed)
        .map(|f| f.at())
        .reduce(f64::max)?;
    let first_after = client
        .fetches
        .iter()
        .find(|f| f.is_ok() && f.at() > failed)?
        .at();
    Some(first_after - last_before)
}

/// A client may begin its first fetch after the agent is back this late: its pause between
/// fetches (0.2 s) after a fetch that was under way while the agent started (at most the
/// SDKs' 1 s timeout), with room for a loaded machine.
const FIRST_FETCH_SLACK: f64 = 3.0;

#[tokio::test(flavor = "multi_thread")]
async fn after_a_sigkill_every_sdk_succeeds_on_its_first_request_once_the_agent_is_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, _) = under_load().await;

    let killed = now();
    world.kill_agent().await.expect("agent killed");
    // Every client meets the closed address (fail closed) before the agent comes back: the
    // outage really happened for each of them.
    wait_until(STEP_DEADLINE, "every client to see the agent gone", || {
        let report = load.report();
        async move {
            report
                .clients
                .iter()
                .all(|c| c.failures().iter().any(|f| f.at() >= killed))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", load.report().summary()));
    world.start_agent().await.expect("agent back");
    let back = now();
    load.wait_each_ok(FETCHES_AFTER_EACH_STEP, back, STEP_DEADLINE)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nfailed fetches per client since the agent was back:\n{}\nagent log:\n{}",
                failures_between(&load.report(), back, f64::MAX).join("\n"),
                world.agent_log()
            )
        });

    let report = load.stop().await.expect("report");
    let down = back - killed;
    println!("the agent was down for {down:.2}s (SIGKILL until ready again)");
    let mut problems = Vec::new();
    for client in &report.clients {
        let gap = gap(client, killed);
        println!(
            "{}: no credentials for {}",
            client.label(),
            gap.map_or("ever".to_string(), |g| format!("{g:.2}s"))
        );
        if gap.is_none_or(|g| g > down + FIRST_FETCH_SLACK) {
            problems.push(format!(
                "{}: without credentials for {gap:?}s, the agent down for {down:.2}s",
                client.label()
            ));
        }
        match client.first_from(back) {
            Some(first) if first.is_ok() => {}
            first => problems.push(format!(
                "{}: the first fetch once the agent was back: {first:?}",
                client.label()
            )),
        }
        let later: Vec<_> = client
            .failures()
            .into_iter()
            .filter(|f| f.at() >= back)
            .collect();
        if !later.is_empty() {
            problems.push(format!(
                "{}: {} failed after the agent was back, first {:?}",
                client.label(),
                later.len(),
                later[0]
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n{}\nagent log:\n{}",
        problems.join("\n"),
        report.summary(),
        world.agent_log()
    );
}

/// Node's HTTP agent, as the JavaScript SDK's metadata provider uses it (the global agent:
/// keep-alive, idle sockets retired after 5 s, or 1 s before a `Keep-Alive: timeout=N` the
/// server announces), next to a bare connection that waits for the agent to close it.
/// Prints `pooled WHO MS` (who closed the pooled connection, after how long idle) and
/// `bare MS KEEP-ALIVE` (when the agent closed an idle connection, what it announced).
const NODE_IDLE: &str = r#"
const http = require("http");
const net = require("net");
const ttl = { "x-aws-ec2-metadata-token-ttl-seconds": "60" };
const hold = setTimeout(() => {}, 60000);
let lines = 0;
const done = (line) => { console.log(line); if (++lines === 2) clearTimeout(hold); };
const req = http.request({ host: "169.254.169.254", path: "/latest/api/token", method: "PUT", headers: ttl }, (res) => {
  res.resume();
  res.on("end", () => {
    const socket = req.socket;
    const idle = Date.now();
    let who = "";
    socket.on("end", () => { who = who || "agent"; });
    socket.on("timeout", () => { who = who || "client"; });
    socket.on("close", () => done(`pooled ${who || "unknown"} ${Date.now() - idle}`));
  });
});
req.end();
const bare = net.connect(80, "169.254.169.254", () => {
  bare.write("PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n");
});
let head = "";
let answered = 0;
bare.on("data", (chunk) => {
  head += chunk.toString();
  if (!answered && head.includes("\r\n\r\n")) answered = Date.now();
});
bare.on("end", () => {
  const announced = (/^keep-alive: *(.*)$/im.exec(head) || [])[1] || "none";
  done(`bare ${Date.now() - answered} ${announced.trim()}`);
});
"#;

#[tokio::test(flavor = "multi_thread")]
async fn node_retires_an_idle_connection_before_the_agent_closes_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A 10 s idle limit instead of the default 120 s, so the bare connection's close is seen
    // soon; Node's own 5 s is still the shorter of the two.
    let config = WorldConfig {
        start_agent: true,
        agent_args: vec!["--idle-timeout".into(), "10s".into()],
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "app-0", Some("app-reader"))
    };
    let world = World::start(config).await.expect("world starts");
    let output = world
        .pod_command("app-0", "node")
        .args(["-e", NODE_IDLE])
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    let line = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // The agent announces how long it keeps an idle connection, and keeps it that long.
    let bare = line("bare ");
    let closed_after: u64 = bare[0].parse().expect("ms");
    let announced: u64 = bare
        .get(1)
        .and_then(|a| a.strip_prefix("timeout="))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no Keep-Alive timeout announced: {stdout}"));
    assert!(
        closed_after + 500 >= announced * 1000,
        "announced {announced}s, closed after {closed_after}ms"
    );
    // Node retires its idle socket first (a second before the announced time), so a request
    // never meets a connection the agent is closing.
    let pooled = line("pooled ");
    assert_eq!(pooled[0], "client", "{stdout}");
    let idle: u64 = pooled[1].parse().expect("ms");
    assert!(idle + 500 < closed_after, "{stdout}");
}

/// Whether `sdk` keeps its IMDSv2 token across fetches with no way to drop a refused one:
/// the Rust SDK's IMDS client (and the credentials provider over it) retries a 401 with the
/// same token until the token expires (6 hours), where the others get a new token at once.
fn keeps_a_refused_token(sdk: Sdk) -> bool {
    matches!(sdk, Sdk::RustImdsClient | Sdk::RustProvider)
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_token_keys_are_lost_every_sdk_does_what_troubleshooting_md_says() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (mut world, load, _) = under_load().await;

    // The keys every token the clients hold was signed with are lost: the agent crashes and
    // its key file is found corrupt, so the new agent signs with keys of its own.
    let killed = now();
    world.kill_agent().await.expect("agent killed");
    std::fs::write(world.agent_token_key_file(), b"not podiam's keys\n").expect("corrupted");
    world.start_agent().await.expect("agent back");
    let back = now();
    wait_until(
        STEP_DEADLINE,
        "every client to fetch since the keys were lost",
        || {
            let report = load.report();
            async move {
                report.clients.iter().all(|c| {
                    if keeps_a_refused_token(c.sdk) {
                        c.fetches.iter().any(|f| f.at() >= back)
                    } else {
                        c.ok_between(back, f64::MAX) >= FETCHES_AFTER_EACH_STEP
                    }
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", load.report().summary()));

    let report = load.stop().await.expect("report");
    assert!(
        world
            .agent_log_text()
            .contains("the token key file is corrupt"),
        "the agent says why tokens are refused:\n{}",
        world.agent_log()
    );
    let mut problems = Vec::new();
    for client in &report.clients {
        let since: Vec<&Fetch> = client.fetches.iter().filter(|f| f.at() >= back).collect();
        let failed = since.iter().filter(|f| !f.is_ok()).count();
        // Fetches refused for their token (401), since the agent went down: a fetch that
        // met the new agent may have begun a moment before it was seen ready.
        let refused = client
            .fetches
            .iter()
            .filter(|f| matches!(f, Fetch::Failed { at, why, .. } if *at >= killed && why.contains("401")))
            .count();
        println!(
            "{}: {} fetches since the keys were lost, {failed} failed; {refused} refused for the token",
            client.label(),
            since.len()
        );
        let expected = match client.sdk {
            // A new token before every fetch: the new keys from the first fetch on.
            Sdk::Botocore | Sdk::BotocoreFresh | Sdk::JavaScript => refused == 0 && failed == 0,
            // Its token dropped on the 401 and the request retried with a new one.
            Sdk::GoV2 => refused == 0 && failed == 0,
            // Its token dropped on the 401, which fails that fetch only.
            Sdk::GoV1 => refused == 1 && failed <= 1 && since.last().is_some_and(|f| f.is_ok()),
            // The refused token kept: nothing succeeds until it expires.
            Sdk::RustImdsClient | Sdk::RustProvider => failed > 0 && failed == since.len(),
        };
        if !expected {
            problems.push(format!(
                "{}: {failed} of {} fetches failed since the keys were lost, {refused} refused \
                 for the token since the agent went down, first {:?}",
                client.label(),
                since.len(),
                since.iter().find(|f| !f.is_ok())
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "not as docs/troubleshooting.md says:\n{}\n{}",
        problems.join("\n"),
        report.summary()
    );
}
