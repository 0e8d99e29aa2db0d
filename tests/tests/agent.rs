//! The agent's surface against real clients: the SDK matrix, revocation, the iptables chain
//! across restarts and a crash (both iptables back ends) and its repair, a server name whose
//! lookup hangs, and a table of adversarial requests. Needs root; each test builds its own
//! [`World`].

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use podiam_tests::fixtures::{CREDS_PATH, set_pod_role, team_a_with_agent};
use podiam_tests::process::{CHANGE_DEADLINE, wait_for, wait_until};
use podiam_tests::world::{Boto3Mode, World, metric_value};
use serde_json::json;

const ROLE_ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/";
/// What SDKs need: botocore treats credentials with under ~25 minutes as stale.
const MIN_REMAINING_SECS: i64 = 30 * 60;
const NODE_BODY: &str = podiam_tests::netns::NODE_METADATA_BODY;
/// The addresses the agent intercepts (instance metadata, container credentials): one DNAT
/// rule each, and one jump each per interface pattern.
const INTERCEPTED_ADDRESSES: usize = 2;

/// The counter `podiam_agent_requests_total{route=ROUTE,status=STATUS}` (0 when absent).
fn requests_counted(metrics: &str, route: &str, status: u16) -> u64 {
    let sample = format!("podiam_agent_requests_total{{route=\"{route}\",status=\"{status}\"}}");
    metric_value(metrics, &sample)
}

fn seconds_until(expiration: &str) -> i64 {
    let at: jiff::Timestamp = expiration.parse().expect("an RFC 3339 expiration");
    at.as_second() - jiff::Timestamp::now().as_second()
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_matrix_gets_credentials_with_thirty_minutes_left() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    let fail = |who: &str, error: String| -> ! {
        panic!("{who}: {error}\nagent log:\n{}", world.agent_log())
    };

    // AWS CLI: it prints no expiry, so the document it was served is checked too.
    let arn = world.aws_caller_arn("web").await.expect("runs");
    let arn = arn.unwrap_or_else(|e| fail("aws cli", e));
    assert!(
        arn.starts_with(&format!("{ROLE_ARN_PREFIX}app-reader/")),
        "{arn}"
    );
    let doc = world
        .metadata_request("web", "GET", &format!("{CREDS_PATH}app-reader"), &[])
        .await
        .expect("answers");
    let doc: serde_json::Value = serde_json::from_str(&doc.body).expect("JSON");
    let left = seconds_until(doc["Expiration"].as_str().expect("Expiration"));
    assert!(
        left >= MIN_REMAINING_SECS,
        "served credentials have only {left}s left"
    );

    // boto3 in each IMDS mode; IMDSv1 must really use no token.
    let tokens_before =
        requests_counted(&world.agent_metrics().await.expect("metrics"), "token", 200);
    let v1 = world
        .boto3_identity("web", Boto3Mode::V1)
        .await
        .expect("runs");
    let v1 = v1.unwrap_or_else(|e| fail("boto3 IMDSv1", e));
    let tokens_after =
        requests_counted(&world.agent_metrics().await.expect("metrics"), "token", 200);
    assert_eq!(
        tokens_before, tokens_after,
        "the IMDSv1 client asked for a token"
    );
    for (who, identity) in [
        ("boto3 IMDSv1", Ok(v1)),
        (
            "boto3 default (IMDSv2)",
            world
                .boto3_identity("web", Boto3Mode::Default)
                .await
                .expect("runs"),
        ),
        (
            "boto3 AWS_EC2_METADATA_V1_DISABLED",
            world
                .boto3_identity("web", Boto3Mode::V2Only)
                .await
                .expect("runs"),
        ),
        (
            "Rust SDK",
            world.rust_sdk_identity("web").await.expect("runs"),
        ),
    ] {
        let identity = identity.unwrap_or_else(|e| fail(who, e));
        assert!(
            identity
                .arn
                .starts_with(&format!("{ROLE_ARN_PREFIX}app-reader/")),
            "{who}: {identity:?}"
        );
        assert!(
            identity.remaining_secs >= MIN_REMAINING_SECS,
            "{who}: only {}s left",
            identity.remaining_secs
        );
    }
    let tokens_final =
        requests_counted(&world.agent_metrics().await.expect("metrics"), "token", 200);
    assert!(
        tokens_final > tokens_after,
        "the IMDSv2 clients fetched tokens"
    );
}

/// A role taken away with `kubectl annotate` is refused at the pod's next requests. How
/// soon is a figure, printed here (under a second on an idle machine), not a bound this
/// test holds a busy machine to: it allows [`CHANGE_DEADLINE`].
#[tokio::test(flavor = "multi_thread")]
async fn revocation_refuses_the_pods_next_requests() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    let creds = format!("{CREDS_PATH}app-reader");
    let before = world
        .metadata_request("web", "GET", &creds, &[])
        .await
        .expect("answers");
    assert_eq!(before.status, 200, "{}", before.body);

    set_pod_role(&world, "team-a", "web", None)
        .await
        .expect("kubectl annotate");
    // Each request from the pod starts a process in its namespace, which a busy machine may
    // take a while to run: what is measured is when a request that still got credentials
    // was begun, not how long the refused one took to come back.
    let revoked = std::time::Instant::now();
    let mut last_served = Duration::ZERO;
    let refused = loop {
        let begun = std::time::Instant::now();
        let reply = world
            .metadata_request("web", "GET", &creds, &[])
            .await
            .expect("answers");
        if reply.status != 200 {
            break reply;
        }
        assert!(
            begun.duration_since(revoked) < CHANGE_DEADLINE,
            "a request begun {:?} after the revocation still got credentials",
            begun.duration_since(revoked)
        );
        last_served = begun.duration_since(revoked);
    };
    println!("the last request served was begun {last_served:?} after the revocation");
    assert_eq!(refused.status, 404, "{}", refused.body);
    assert!(
        refused.body.contains("no-role") && !refused.body.contains("SecretAccessKey"),
        "{}",
        refused.body
    );
}

/// Pod `web` asks the metadata address for its role's name and gets `app-reader`: the agent
/// answers it.
async fn assert_web_gets_its_role(world: &World) {
    let reply = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!((reply.status, reply.body.as_str()), (200, "app-reader"));
}

/// With the agent down, nothing at 169.254.169.254 answers the pod.
async fn assert_no_metadata_service(world: &World) {
    for path in [
        CREDS_PATH,
        "/latest/user-data",
        "/latest/meta-data/instance-id",
    ] {
        let reply = world.metadata_request("web", "GET", path, &[]).await;
        assert!(reply.is_err(), "with no agent, {path} answered: {reply:?}");
    }
}

async fn restarts_and_a_crash(iptables_bin: &str) {
    let mut config = team_a_with_agent();
    config.fake_node_metadata = true;
    config.iptables_bin = Some(iptables_bin.to_string());
    let mut world = World::start(config).await.expect("world starts");
    let pod_ips: Vec<String> = ["web", "plain", "greedy"]
        .iter()
        .map(|p| world.pod(p).ip().to_string())
        .collect();

    for _ in 0..3 {
        world.stop_agent().await.expect("stops");
        assert_no_metadata_service(&world).await;
        world.start_agent().await.expect("starts");
    }
    world.kill_agent().await.expect("kill -9");
    assert_no_metadata_service(&world).await;
    world.start_agent().await.expect("starts after the crash");

    let rules = world.node_nat_rules().await.expect("rules");
    assert_eq!(rules.matches("-N PODIAM").count(), 1, "{rules}");
    assert_eq!(
        rules.matches("-j PODIAM").count(),
        INTERCEPTED_ADDRESSES,
        "one jump per interface and intercepted address:\n{rules}"
    );
    assert_eq!(
        rules.matches("-j DNAT").count(),
        INTERCEPTED_ADDRESSES,
        "{rules}"
    );
    assert_web_gets_its_role(&world).await;

    let seen = world.node().fake_node_metadata_clients();
    assert!(
        seen.iter().all(|client| !pod_ips.contains(client)),
        "the node's metadata service saw a pod: {seen:?}"
    );

    world.stop_agent().await.expect("stops");
    let rules = world
        .uninstall_and_read_rules()
        .await
        .expect("uninstall cleans up");
    assert!(
        !rules.contains("PODIAM") && !rules.contains("DNAT"),
        "{rules}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_excluded_interface_intercepts_every_other_one() {
    // kiam's `--host-interface=!eth0` for the VPC CNI. This node's only interface that is no
    // pod's is `lo`: `!lo` takes every pod's veth, whatever its name.
    let mut config = team_a_with_agent();
    config.interface = Some("!lo".into());
    let mut world = World::start(config).await.expect("world starts");
    let rules = world.node_nat_rules().await.expect("rules");
    assert_eq!(
        rules
            .matches(" ! -i lo -p tcp -m tcp --dport 80 -j PODIAM")
            .count(),
        INTERCEPTED_ADDRESSES,
        "{rules}"
    );
    let reply = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Removed like any other jump.
    world.stop_agent().await.expect("stops");
    let rules = world
        .uninstall_and_read_rules()
        .await
        .expect("uninstall cleans up");
    assert!(!rules.contains("PODIAM"), "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_behind_an_interface_no_pattern_matches_are_counted_and_named() {
    let mut config = team_a_with_agent();
    config.fake_node_metadata = true;
    let mut world = World::start(config).await.expect("world starts");
    let not_intercepted = |m: &str| metric_value(m, "podiam_agent_pods_not_intercepted");
    // A pattern that matches `web`'s interface only, as a pattern missing a CNI's second
    // kind of interface would: the other two pods are not intercepted, and the agent says so.
    world.stop_agent().await.expect("stops");
    world.uninstall_and_read_rules().await.expect("uninstalled");
    let web = world.pod("web").net.host_if.clone();
    let plain = world.pod("plain").net.host_if.clone();
    world.set_agent_interface(&web);
    world.start_agent().await.expect("starts");
    wait_until(
        Duration::from_secs(30),
        "two pods counted as not intercepted",
        || async {
            world
                .agent_metrics()
                .await
                .is_ok_and(|m| not_intercepted(&m) == 2)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", world.agent_log()));
    let named = |log: &str, interface: &str| {
        log.lines().any(|l| {
            l.contains("no --interface pattern matches")
                && l.contains(&format!("interface={interface} "))
        })
    };
    // The gauge is set just before the warning is written: the line may come a moment later.
    wait_until(
        Duration::from_secs(30),
        "the missed interface named",
        || std::future::ready(named(&world.agent_log(), &plain)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", world.agent_log()));
    let log = world.agent_log();
    assert!(!named(&log, &web), "{log}");
    // What it counts is so: `plain` reaches the node's metadata service, `web` the agent.
    let reply = world
        .metadata_request("plain", "GET", "/latest/meta-data/instance-id", &[])
        .await
        .expect("answers");
    assert_eq!(reply.body, NODE_BODY);
    assert_web_gets_its_role(&world).await;

    world.stop_agent().await.expect("stops");
    world.uninstall_and_read_rules().await.expect("uninstalled");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_a_crash_keep_one_set_of_rules_and_never_expose_the_node_nft() {
    restarts_and_a_crash("iptables-nft").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_a_crash_keep_one_set_of_rules_and_never_expose_the_node_legacy() {
    restarts_and_a_crash("iptables-legacy").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_node_without_rules_an_agent_that_cannot_start_still_closes_the_way_to_the_node() {
    let mut config = team_a_with_agent();
    config.fake_node_metadata = true;
    let mut world = World::start(config).await.expect("world starts");
    let web = world.pod("web").ip().to_string();
    // A node just booted: no agent, no rules. A pod then reaches the node's metadata
    // service (what the rules are for), which the fake one records.
    world.stop_agent().await.expect("stops");
    let rules = world.uninstall_and_read_rules().await.expect("uninstalled");
    assert!(!rules.contains("PODIAM"), "{rules}");
    let reply = world
        .metadata_request("web", "GET", "/latest/meta-data/instance-id", &[])
        .await
        .expect("the node's metadata service answers");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(world.node().fake_node_metadata_clients().contains(&web));
    let seen_before = world.node().fake_node_metadata_clients().len();

    // The agent starts with TLS files it cannot use, and exits: by then its rules are in.
    let cert = world.certs().agent_cert.clone();
    let good = std::fs::read(&cert).expect("the agent's certificate");
    std::fs::write(&cert, "not a certificate").expect("break the certificate");
    let (status, log) = world
        .run_failing_agent(Duration::from_secs(30))
        .await
        .expect("the agent exits");
    assert!(!status.success(), "{log}");
    assert!(log.contains("iptables rules in place"), "{log}");
    let rules = world.node_nat_rules().await.expect("rules");
    assert_eq!(
        rules.matches("-j DNAT").count(),
        INTERCEPTED_ADDRESSES,
        "{rules}"
    );
    // With rules in place, an agent that cannot start leaves them as they are (a rolling
    // update to a configuration that fails must not point them elsewhere).
    world.set_agent_interface("other+");
    let (status, log) = world
        .run_failing_agent(Duration::from_secs(30))
        .await
        .expect("the agent exits");
    assert!(!status.success(), "{log}");
    assert_eq!(world.node_nat_rules().await.expect("rules"), rules);
    world.set_agent_interface(podiam_tests::netns::POD_INTERFACE_PATTERN);
    std::fs::write(&cert, good).expect("mend the certificate");
    assert_no_metadata_service(&world).await;
    assert_eq!(
        world.node().fake_node_metadata_clients().len(),
        seen_before,
        "a pod reached the node's metadata service after the agent's start"
    );

    // Once it can start, it answers.
    world.start_agent().await.expect("starts");
    assert_web_gets_its_role(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_rules_are_put_back_and_conntrack_is_flushed_at_start() {
    let mut config = team_a_with_agent();
    config.agent_args = vec![
        "--iptables-sync-interval".into(),
        "200ms".into(),
        "--flush-conntrack".into(),
    ];
    let world = World::start(config).await.expect("world starts");
    let repairs = |n: u32| format!("podiam_agent_iptables_repairs_total {n}\n");
    let metrics = world.agent_metrics().await.expect("metrics");
    assert!(metrics.contains(&repairs(0)), "{metrics}");
    let rules = world.node_nat_rules().await.expect("rules");
    let jump = rules
        .lines()
        .find(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j PODIAM"))
        .expect("a jump")
        .replacen("-A", "-D", 1);
    let args: Vec<&str> = ["-w", "-t", "nat"]
        .into_iter()
        .chain(jump.split_whitespace())
        .collect();
    let out = world.node_iptables(&args).await.expect("iptables runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The repair is counted once the rules are back.
    wait_until(
        Duration::from_secs(10),
        "the agent to put its jump back and count the repair",
        || async {
            world
                .agent_metrics()
                .await
                .is_ok_and(|m| m.contains(&repairs(1)))
        },
    )
    .await
    .expect("repaired");
    let rules = world.node_nat_rules().await.expect("rules");
    assert_eq!(
        rules.matches("-j PODIAM").count(),
        INTERCEPTED_ADDRESSES,
        "{rules}"
    );
    let reply = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_straight_to_the_agents_port_is_closed_unserved() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    let not_intercepted = "podiam_agent_connections_closed_total{reason=\"not-intercepted\"}";
    let closed = || async {
        let metrics = world.agent_metrics().await.expect("metrics");
        metric_value(&metrics, not_intercepted)
    };
    assert_eq!(closed().await, 0);
    // What a pod of another node, where pod addresses route between nodes, can do: open a
    // connection to the node's address and the agent's port, past the DNAT rule. (A pod of
    // this node stands in for it: its address is one the agent knows, which would be
    // served.)
    let straight = format!(
        "http://{}:{}{CREDS_PATH}",
        world.node().ip(),
        podiam_tests::world::AGENT_PORT
    );
    let reply = world
        .pod("web")
        .net
        .netns
        .http_get(&straight, Duration::from_secs(5))
        .await;
    assert!(reply.is_err(), "served past the DNAT rule: {reply:?}");
    wait_until(
        Duration::from_secs(10),
        "the closed connection to be counted",
        || async { closed().await >= 1 },
    )
    .await
    .expect("counted");
    // The same request through the rule is served.
    assert_web_gets_its_role(&world).await;
}

/// An address of the node namespace's `lo` whose DNS queries are dropped on arrival: a DNS
/// server that never answers.
const SILENT_DNS: &str = "10.253.0.53";

#[tokio::test(flavor = "multi_thread")]
async fn a_server_name_whose_lookup_hangs_holds_up_neither_the_start_nor_the_other_servers() {
    // The world's server by address, and a name the node's DNS never answers for: each
    // lookup of it waits 5 × 30 s. That needs glibc to ask the DNS servers of resolv.conf
    // for host names (no systemd-resolved or nscd in between), as on this machine kind.
    let nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let hosts = nsswitch
        .lines()
        .find_map(|l| l.trim().strip_prefix("hosts:"))
        .map(|sources| sources.split_whitespace().collect::<Vec<_>>());
    assert_eq!(
        hosts.as_deref(),
        Some(&["files", "dns"][..]),
        "this test needs `hosts: files dns` in /etc/nsswitch.conf to make a lookup hang"
    );
    let mut config = podiam_tests::fixtures::team_a();
    config.agent_args = vec![
        "--server".into(),
        "https://podiam-server.podiam.svc:8443".into(),
    ];
    let mut world = World::start(config).await.expect("world starts");
    world
        .node()
        .netns()
        .ip(&["addr", "add", &format!("{SILENT_DNS}/32"), "dev", "lo"])
        .expect("the address");
    let drop = [
        "-w", "-A", "INPUT", "-d", SILENT_DNS, "-p", "udp", "--dport", "53", "-j", "DROP",
    ];
    let out = world.node_iptables(&drop).await.expect("iptables runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = world.node().netns();
    node.set_resolv_conf(&format!(
        "nameserver {SILENT_DNS}\noptions timeout:30 attempts:5\n"
    ))
    .expect("resolv.conf");

    // Ready (a server answers) and answering pods long before that lookup could end.
    world
        .start_agent()
        .await
        .expect("the agent starts with the server it resolved");
    assert_web_gets_its_role(&world).await;
    let log = world.agent_log();
    assert!(
        log.contains("a server name is still being looked up"),
        "{log}"
    );
    // And it stops at once, the lookup still hanging.
    world.stop_agent().await.expect("stops");
}

/// Holds one connection to 169.254.169.254:80 from inside a pod: on a line `connect` it
/// connects and prints `connected PORT` (its local port); on a line `send` it sends a GET
/// and prints what came back, `reset`, or `closed`.
const HOLDER: &str = r#"
import socket, sys
sys.stdin.readline()
s = socket.create_connection(("169.254.169.254", 80), timeout=10)
print("connected", s.getsockname()[1], flush=True)
sys.stdin.readline()
try:
    s.sendall(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print(data.decode("utf-8", "replace").replace("\r\n", " ") if data else "closed", flush=True)
except (ConnectionResetError, BrokenPipeError):
    print("reset", flush=True)
"#;

/// A [`HOLDER`] in a pod, driven line by line.
struct Holder {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Holder {
    fn start(world: &World, pod: &str) -> Holder {
        let mut child = world
            .pod_command(pod, "python3")
            .args(["-c", HOLDER])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        Holder {
            _child: child,
            stdin,
            lines,
        }
    }

    /// Sends `command` and returns the line the holder prints back.
    async fn ask(&mut self, command: &str) -> String {
        tokio::io::AsyncWriteExt::write_all(&mut self.stdin, format!("{command}\n").as_bytes())
            .await
            .expect("the holder reads");
        tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("the holder answers in time")
            .expect("the holder's output")
            .expect("a line from the holder")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_opened_while_the_rules_were_gone_does_not_outlive_their_repair() {
    let mut config = team_a_with_agent();
    config.fake_node_metadata = true;
    config.agent_args = vec![
        "--iptables-sync-interval".into(),
        "300ms".into(),
        "--flush-conntrack".into(),
    ];
    let world = World::start(config).await.expect("world starts");
    let pod_ip = world.pod("web").ip();
    let repairs = || async {
        let metrics = world.agent_metrics().await.expect("metrics");
        metric_value(&metrics, "podiam_agent_iptables_repairs_total")
    };
    let rules = world.node_nat_rules().await.expect("rules");
    let jump = rules
        .lines()
        .find(|l| {
            l.starts_with("-A PREROUTING")
                && l.contains("169.254.169.254")
                && l.ends_with("-j PODIAM")
        })
        .expect("the metadata address's jump")
        .replacen("-A", "-D", 1);
    let delete: Vec<&str> = ["-w", "-t", "nat"]
        .into_iter()
        .chain(jump.split_whitespace())
        .collect();

    // Remove the jump and connect before the agent puts it back: the connection goes to the
    // node's own metadata service. Should the agent win the race, try again.
    let mut attempts = 0;
    let (mut holder, repaired_before) = loop {
        attempts += 1;
        assert!(
            attempts <= 20,
            "the agent repaired its rules before every connect"
        );
        let mut holder = Holder::start(&world, "web");
        let before = repairs().await;
        let out = world.node_iptables(&delete).await.expect("iptables runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let connected = holder.ask("connect").await;
        let port = connected.strip_prefix("connected ").expect("connected");
        let direct = world
            .node()
            .netns()
            .command("ss")
            .args(["-Htn", "state", "established"])
            .arg(format!("( sport = :80 and dst {pod_ip}:{port} )"))
            .output()
            .await
            .expect("ss runs");
        let direct = String::from_utf8_lossy(&direct.stdout).into_owned();
        if direct.contains("169.254.169.254:80") {
            break (holder, before);
        }
        // The agent put the jump back first; wait for that repair before the next try.
        wait_until(
            Duration::from_secs(10),
            "the repair to be counted",
            || async { repairs().await > before },
        )
        .await
        .expect("repaired");
    };

    // The agent puts the jump back, and cuts that connection: the pod's next bytes on it
    // reach nobody that answers with the node's metadata.
    wait_until(
        Duration::from_secs(10),
        "the repair to be counted",
        || async { repairs().await > repaired_before },
    )
    .await
    .expect("repaired");
    let seen = world.node().fake_node_metadata_clients();
    let answer = holder.ask("send").await;
    assert!(!answer.contains(NODE_BODY), "{answer}");
    assert!(answer == "reset" || answer == "closed", "{answer}");
    assert_eq!(world.node().fake_node_metadata_clients(), seen);

    // A new connection goes to the agent.
    assert_web_gets_its_role(&world).await;
}

/// Sends raw HTTP requests from inside a pod and reports, per request, the status (or
/// "closed"/"timeout") and the body.
const RAW_CLIENT: &str = r#"
import base64, json, socket, sys, time
results = []
for case in json.loads(sys.argv[1]):
    raw = base64.b64decode(case["raw"])
    s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    s.settimeout(case.get("wait", 5))
    try:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        results.append({"status": "timeout", "body": data.decode("utf-8", "replace")})
        continue
    except ConnectionResetError:
        pass
    finally:
        s.close()
    if not data:
        results.append({"status": "closed", "body": ""})
        continue
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].split(b" ")[1].decode()
    results.append({"status": status, "body": body.decode("utf-8", "replace")})
print(json.dumps(results))
"#;

#[derive(Debug)]
struct Case {
    name: &'static str,
    pod: &'static str,
    raw: String,
    want: &'static str,
    /// May the body carry credentials (the pod's own), or the node's metadata?
    may_carry: Carry,
    wait_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    Nothing,
    Credentials,
    NodeMetadata,
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n")
}

fn request(method: &str, path: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn adversarial_requests_get_their_expected_status_and_leak_nothing() {
    // `ghost` has a network on the node but no Pod object: an address that is no pod's.
    let mut config = team_a_with_agent().unregistered_pod("team-a", "ghost", None);
    config.fake_node_metadata = true;
    config.agent_args = vec![
        "--allow-route-regexp".into(),
        "/latest/meta-data/(placement/.*|instance-id)".into(),
        "--header-timeout".into(),
        "1s".into(),
    ];
    let world = World::start(config).await.expect("world starts");
    let token = world
        .metadata_request(
            "web",
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
        )
        .await
        .expect("token");
    assert_eq!(token.status, 200);
    let token = token.body;
    let web_ip = world.pod("web").ip().to_string();
    let creds = |role: &str| format!("{CREDS_PATH}{role}");
    let big = "x".repeat(10 * 1024);
    let flood: String = (0..100).map(|i| format!("X-Flood-{i}: y\r\n")).collect();
    use Carry::*;
    let c = |name, pod, raw: String, want, may_carry| Case {
        name,
        pod,
        raw,
        want,
        may_carry,
        wait_secs: 5,
    };
    let cases = vec![
        // The routes SDKs use.
        c("listing", "web", get(CREDS_PATH, ""), "200", Nothing),
        c("listing without slash", "web", get("/latest/meta-data/iam/security-credentials", ""), "200", Nothing),
        c("dated listing", "web", get("/2016-09-02/meta-data/iam/security-credentials/", ""), "200", Nothing),
        c("credentials", "web", get(&creds("app-reader"), ""), "200", Credentials),
        c("dated credentials", "web", get("/2021-01-03/meta-data/iam/security-credentials/app-reader", ""), "200", Credentials),
        c("iam info", "web", get("/latest/meta-data/iam/info", ""), "200", Nothing),
        c("double slashes", "web", get("//latest//meta-data//iam//security-credentials//app-reader", ""), "200", Credentials),
        c("dot segments", "web", get("/latest/meta-data/./iam/./security-credentials/app-reader", ""), "200", Credentials),
        c("dot-dot inside", "web", get("/latest/meta-data/x/../iam/security-credentials/app-reader", ""), "200", Credentials),
        c("encoded letters", "web", get("/latest/meta-data/%69am/security-credentials/app-reader", ""), "200", Credentials),
        c("HEAD listing", "web", format!("HEAD {CREDS_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), "200", Nothing),
        // Path tricks toward what must stay closed.
        c("user-data", "web", get("/latest/user-data", ""), "404", Nothing),
        c("user-data slash", "web", get("/latest/user-data/", ""), "404", Nothing),
        c("dot-dot to user-data", "web", get("/latest/meta-data/../user-data", ""), "404", Nothing),
        c("encoded dot-dot", "web", get("/latest/meta-data/%2e%2e/user-data", ""), "404", Nothing),
        c("encoded slash dot-dot", "web", get("/latest/meta-data/..%2fuser-data", ""), "404", Nothing),
        c("encoded slashes", "web", get("/latest/meta-data%2f..%2fuser-data", ""), "404", Nothing),
        c("double-encoded dot-dot", "web", get("/latest/meta-data/%252e%252e/user-data", ""), "404", Nothing),
        c("traversal through creds", "web", get("/latest/meta-data/iam/security-credentials/..%2f..%2f..%2fuser-data", ""), "404", Nothing),
        c("traversal through allowed", "web", get("/latest/meta-data/instance-id/../../user-data", ""), "404", Nothing),
        c("pkcs7", "web", get("/latest/dynamic/instance-identity/pkcs7", ""), "404", Nothing),
        c("signature", "web", get("/latest/dynamic/instance-identity/signature", ""), "404", Nothing),
        c("rsa2048", "web", get("/latest/dynamic/instance-identity/rsa2048", ""), "404", Nothing),
        c("identity-credentials", "web", get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance", ""), "404", Nothing),
        c("meta-data index", "web", get("/latest/meta-data/", ""), "404", Nothing),
        c("root", "web", get("/", ""), "404", Nothing),
        c("not allow-listed", "web", get("/latest/meta-data/ami-id", ""), "404", Nothing),
        c("allow-list prefix only", "web", get("/latest/meta-data/instance-id-x", ""), "404", Nothing),
        c("allowed instance-id", "web", get("/latest/meta-data/instance-id", ""), "200", NodeMetadata),
        c("allowed placement", "web", get("/latest/meta-data/placement/region", ""), "200", NodeMetadata),
        // The node's metadata is for its pods only: unknown-pod for any other address.
        c("allowed path from no pod", "ghost", get("/latest/meta-data/instance-id", ""), "404", Nothing),
        c("allowed placement from no pod", "ghost", get("/latest/meta-data/placement/region", ""), "404", Nothing),
        // A decoded `?` or `#` would be cut off in the node's URI: refused, never passed on.
        c("allowed path with encoded ?", "web", get("/latest/meta-data/placement/region%3F", ""), "404", Nothing),
        c("allowed path with encoded #", "web", get("/latest/meta-data/placement/x%23/../../../user-data", ""), "404", Nothing),
        c("allowed path with encoded %", "web", get("/latest/meta-data/placement/region%2525", ""), "404", Nothing),
        // Other roles.
        c("another role by name", "web", get(&creds("app-writer"), ""), "404", Nothing),
        c("the node's role by name", "web", get(&creds("node-role"), ""), "404", Nothing),
        c("no role asks for one", "plain", get(&creds("app-reader"), ""), "404", Nothing),
        c("role not permitted", "greedy", get(&creds("admin"), ""), "403", Nothing),
        c("not permitted, listing", "greedy", get(CREDS_PATH, ""), "403", Nothing),
        // Other methods.
        c("POST listing", "web", request("POST", CREDS_PATH, ""), "405", Nothing),
        c("DELETE credentials", "web", request("DELETE", &creds("app-reader"), ""), "405", Nothing),
        c("PUT credentials", "web", request("PUT", &creds("app-reader"), ""), "405", Nothing),
        c("GET token", "web", get("/latest/api/token", ""), "405", Nothing),
        c("PATCH token", "web", request("PATCH", "/latest/api/token", ""), "405", Nothing),
        // Tokens.
        c("token without TTL", "web", request("PUT", "/latest/api/token", ""), "400", Nothing),
        c("token TTL 0", "web", request("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0\r\n"), "400", Nothing),
        c("token TTL too long", "web", request("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 21601\r\n"), "400", Nothing),
        c("token TTL not a number", "web", request("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: abc\r\n"), "400", Nothing),
        c("token through a proxy", "web", request("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\n"), "403", Nothing),
        c("token", "web", request("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n"), "200", Nothing),
        c("garbage token", "web", get(CREDS_PATH, "X-aws-ec2-metadata-token: garbage\r\n"), "401", Nothing),
        c("own token", "web", get(&creds("app-reader"), &format!("X-aws-ec2-metadata-token: {token}\r\n")), "200", Credentials),
        c("token replayed in another pod", "plain", get(&creds("app-reader"), &format!("X-aws-ec2-metadata-token: {token}\r\n")), "401", Nothing),
        // Identity comes from the peer address only.
        c("forged X-Forwarded-For", "plain", get(&creds("app-reader"), &format!("X-Forwarded-For: {web_ip}\r\n")), "404", Nothing),
        c("forged Forwarded", "plain", get(&creds("app-reader"), &format!("Forwarded: for={web_ip}\r\n")), "404", Nothing),
        c("forged X-Real-IP", "greedy", get(&creds("admin"), &format!("X-Real-IP: {web_ip}\r\n")), "403", Nothing),
        // Malformed and oversized requests.
        c("oversized header", "web", get(CREDS_PATH, &format!("X-Big: {big}\r\n")), "431", Nothing),
        c("header flood", "web", get(CREDS_PATH, &flood), "431", Nothing),
        c("large body", "web", format!("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n{}", "b".repeat(5000)), "413", Nothing),
        c("chunked body", "web", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(), "413", Nothing),
        c("garbage request line", "web", "HELLO\r\n\r\n".into(), "400", Nothing),
        c("metrics not on the pod port", "web", get("/metrics", ""), "404", Nothing),
        c("readiness not on the pod port", "web", get("/ready", ""), "404", Nothing),
        Case {
            name: "slow client",
            pod: "web",
            raw: format!("GET {CREDS_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n"),
            want: "closed",
            may_carry: Nothing,
            wait_secs: 4,
        },
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());

    // Run each pod's cases in one client process.
    let mut by_pod: BTreeMap<&str, Vec<&Case>> = BTreeMap::new();
    for case in &cases {
        by_pod.entry(case.pod).or_default().push(case);
    }
    let secret_marker = "SecretAccessKey";
    let mut failures = Vec::new();
    for (pod, cases) in by_pod {
        let spec: Vec<_> = cases
            .iter()
            .map(|c| json!({ "raw": base64::engine::general_purpose::STANDARD.encode(&c.raw), "wait": c.wait_secs }))
            .collect();
        let output = world
            .pod_command(pod, "python3")
            .args([
                "-c",
                RAW_CLIENT,
                &serde_json::to_string(&spec).expect("json"),
            ])
            .output()
            .await
            .expect("raw client runs");
        assert!(
            output.status.success(),
            "raw client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let results: Vec<serde_json::Value> =
            serde_json::from_slice(&output.stdout).expect("results");
        for (case, result) in cases.iter().zip(results) {
            let status = result["status"].as_str().unwrap_or_default().to_string();
            let body = result["body"].as_str().unwrap_or_default().to_string();
            if status != case.want {
                failures.push(format!(
                    "{} ({}): got {status}, want {}: {body:.200}",
                    case.name, case.pod, case.want
                ));
            }
            if case.may_carry != Carry::Credentials && body.contains(secret_marker) {
                failures.push(format!("{}: credentials leaked: {body:.200}", case.name));
            }
            if case.may_carry != Carry::NodeMetadata && body.contains(NODE_BODY) {
                failures.push(format!(
                    "{}: the node's metadata leaked: {body:.200}",
                    case.name
                ));
            }
            if case.may_carry == Carry::Credentials
                && case.want == "200"
                && !body.contains(secret_marker)
            {
                failures.push(format!(
                    "{}: expected the pod's credentials: {body:.200}",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nagent log:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        world.agent_log()
    );
    // The node's metadata service only ever heard from the agent, never from a pod.
    let pod_ips: Vec<String> = ["web", "plain", "greedy"]
        .iter()
        .map(|p| world.pod(p).ip().to_string())
        .collect();
    let seen = world.node().fake_node_metadata_clients();
    assert!(
        !seen.is_empty(),
        "the allowed paths reached the node's service"
    );
    assert!(seen.iter().all(|c| !pod_ips.contains(c)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_live_on_their_own_port() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    // Listed once (a first request may wait for the agent's view past its deadline on a
    // busy machine, and is answered 503 or 504 then).
    wait_until(CHANGE_DEADLINE, "the role listing", || async {
        world
            .metadata_request("web", "GET", CREDS_PATH, &[])
            .await
            .is_ok_and(|reply| reply.status == 200)
    })
    .await
    .expect("listed");
    let metrics = world.agent_metrics().await.expect("metrics");
    assert!(
        requests_counted(&metrics, "list-roles", 200) >= 1,
        "{metrics}"
    );
    assert!(
        metrics.contains("podiam_agent_request_duration_seconds_bucket{"),
        "{metrics}"
    );
    assert!(metrics.contains("podiam_agent_ready 1"), "{metrics}");
    for (path, status) in [("/live", 200), ("/ready", 200), ("/nothing", 404)] {
        let reply = world
            .node()
            .netns()
            .http_get(
                &format!(
                    "http://127.0.0.1:{}{path}",
                    podiam_tests::world::AGENT_HEALTH_PORT
                ),
                Duration::from_secs(2),
            )
            .await
            .expect("answers");
        assert_eq!(reply.status, status, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_bound_to_its_pod_not_just_its_ip() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    // Before its table of the node's pods is in place the agent binds a token to the address
    // alone; this test is about the binding to the pod.
    world.wait_node_stream_synced().await.expect("synced");
    let ttl = [("X-aws-ec2-metadata-token-ttl-seconds", "300")];
    let token = world
        .metadata_request("web", "PUT", "/latest/api/token", &ttl)
        .await
        .expect("token");
    assert_eq!(token.status, 200);
    let with_token = [("X-aws-ec2-metadata-token", token.body.as_str())];
    let ok = world
        .metadata_request("web", "GET", CREDS_PATH, &with_token)
        .await
        .expect("answers");
    assert_eq!(ok.status, 200, "{}", ok.body);

    // The pod is replaced by a new one (new UID) on the same IP: the old token is dead.
    world.recreate_pod("web").await.expect("recreated");
    // A delete, a create and a status through the API, the servers and the node stream.
    let stale = wait_for(
        Duration::from_secs(20),
        "the old token to be refused",
        || async {
            let reply = world
                .metadata_request("web", "GET", CREDS_PATH, &with_token)
                .await
                .ok()?;
            (reply.status == 401).then_some(reply)
        },
    )
    .await
    .expect("refused");
    assert!(stale.body.contains("another pod"), "{}", stale.body);
    // A fresh token for the new pod works.
    let token = world
        .metadata_request("web", "PUT", "/latest/api/token", &ttl)
        .await
        .expect("token");
    let fresh = [("X-aws-ec2-metadata-token", token.body.as_str())];
    let ok = world
        .metadata_request("web", "GET", CREDS_PATH, &fresh)
        .await
        .expect("answers");
    assert_eq!((ok.status, ok.body.as_str()), (200, "app-reader"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_credentials_are_served_without_asking_the_server() {
    let world = World::start(team_a_with_agent())
        .await
        .expect("world starts");
    // The cache is the table's: before the node stream syncs every request asks a server.
    world.wait_node_stream_synced().await.expect("synced");
    let creds = format!("{CREDS_PATH}app-reader");
    let first = world
        .metadata_request("web", "GET", &creds, &[])
        .await
        .expect("answers");
    assert_eq!(first.status, 200);
    for _ in 0..5 {
        let again = world
            .metadata_request("web", "GET", &creds, &[])
            .await
            .expect("answers");
        assert_eq!(
            again.body, first.body,
            "the same credentials from the cache"
        );
    }
    let issued = world
        .server_log_text()
        .matches("credentials issued")
        .count();
    assert_eq!(issued, 1, "only the first request reached the server");
    let metrics = world.agent_metrics().await.expect("metrics");
    assert_eq!(
        metric_value(&metrics, "podiam_agent_credential_cache_hits_total"),
        5,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "podiam_agent_credential_cache_misses_total"),
        1,
        "{metrics}"
    );
}
