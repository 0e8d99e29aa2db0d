//! The agent under attack from a pod (issue 13): encoded delimiters toward the node's own
//! metadata service, and one pod trying to starve the others of connections. Needs root;
//! each test builds its own [`World`].

use std::time::Duration;

use podiam_tests::fixtures::team_a_with_agent;
use podiam_tests::world::{World, metric_value};
use serde_json::json;

const NODE_BODY: &str = podiam_tests::netns::NODE_METADATA_BODY;

/// Sends each path, byte for byte, as `GET PATH HTTP/1.1` on a connection of its own from
/// inside a pod, and prints one `[status, body]` per path (status "closed" or "timeout" when
/// there was no answer).
const RAW_GETS: &str = r#"
import json, socket, sys
results = []
for path in json.loads(sys.argv[1]):
    s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    data = b""
    try:
        s.sendall(b"GET " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        results.append(["timeout", ""])
        continue
    except ConnectionResetError:
        pass
    finally:
        s.close()
    if not data:
        results.append(["closed", ""])
        continue
    head, _, body = data.partition(b"\r\n\r\n")
    results.append([head.split(b" ")[1].decode(), body.decode("utf-8", "replace")])
print(json.dumps(results))
"#;

/// `(status, body)` for each path, sent raw from `pod`.
async fn raw_gets(world: &World, pod: &str, paths: &[&str]) -> Vec<(String, String)> {
    let output = world
        .pod_command(pod, "python3")
        .args(["-c", RAW_GETS, &json!(paths).to_string()])
        .output()
        .await
        .expect("the raw client runs");
    assert!(
        output.status.success(),
        "raw client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the raw client's results")
}

/// Row a: with an allow-list as wide as `.*`, no path whose decoded form hides a `?`, `#`,
/// `%`, control or non-ASCII byte reaches the node's metadata service, and the node's
/// service hears nothing at all while they are tried.
#[tokio::test(flavor = "multi_thread")]
async fn encoded_delimiters_never_reach_the_node_metadata_service() {
    let mut config = team_a_with_agent();
    config.fake_node_metadata = true;
    config.agent_args = vec!["--allow-route-regexp".into(), ".*".into()];
    let world = World::start(config).await.expect("world starts");

    // An allowed path first: the node's service answers it (the agent's own upstream token
    // is fetched on the way), so the count below starts after that.
    let allowed = raw_gets(&world, "web", &["/latest/meta-data/ami-id"]).await;
    assert_eq!(allowed[0].0, "200", "{allowed:?}\n{}", world.agent_log());
    assert!(allowed[0].1.contains(NODE_BODY), "{allowed:?}");
    let heard_before = world.node().fake_node_metadata_clients().len();
    assert!(heard_before >= 1);

    let blocked = [
        "/latest/user-data%23",
        "/latest/user-data%3F",
        "/latest/user-data%3fx=1",
        "/latest/user-data%25",
        "/latest/user-data%00",
        "/latest/user-data%0D%0A",
        "/latest/dynamic/instance-identity/pkcs7%3F",
        "/latest/dynamic/instance-identity/signature%23",
        "/latest/dynamic/instance-identity/rsa2048%3Fx",
        "/latest/meta-data/iam%3F",
        "/latest/meta-data/iam%23/security-credentials/",
        "/latest/meta-data/identity-credentials%3F/ec2/security-credentials/ec2-instance",
        "/latest%2Fuser-data",
        "/latest/meta-data%2F..%2Fuser-data%23",
        "/latest/User-Data",
        "/latest/meta-data/ami-id%C3%A9",
    ];
    let answers = raw_gets(&world, "web", &blocked).await;
    let mut failures = Vec::new();
    for (path, (status, body)) in blocked.iter().zip(&answers) {
        if status != "404" || body.contains(NODE_BODY) {
            failures.push(format!("{path}: {status} {body:.120}"));
        }
    }
    let heard = world.node().fake_node_metadata_clients();
    assert!(
        failures.is_empty() && heard.len() == heard_before,
        "blocked paths answered:\n{}\nthe node's service heard {} requests more\nagent log:\n{}",
        failures.join("\n"),
        heard.len() - heard_before,
        world.agent_log()
    );

    // And the count above is live: one more allowed request is heard.
    let again = raw_gets(&world, "web", &["/latest/meta-data%2Fami-id"]).await;
    assert_eq!(again[0].0, "200", "{again:?}");
    podiam_tests::process::wait_until(
        Duration::from_secs(5),
        "the node's service to log the allowed request",
        || async { world.node().fake_node_metadata_clients().len() > heard_before },
    )
    .await
    .expect("heard");
}

/// A pod that tries to take every connection the agent has: `KEEP` keep-alive connections,
/// each sending a whole request every 2 s (a pace that kept an idle limit from ever closing
/// them), and `TRICKLE` connections sending a request head one byte every 300 ms. A
/// connection the agent closes is opened again a second later. Runs until its stdin closes
/// or for `SECONDS` at most; prints `ready` once every connection has been opened,
/// `flooding` once every one has sent its first bytes, and at the end a JSON line of what it
/// saw.
const FLOOD: &str = r#"
import errno, json, select, socket, sys, time
keep, trickle, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
REQUEST = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
stop_at = time.time() + seconds
stats = {"opened": 0, "closed_by_agent": 0, "answers": 0}

def open_one(kind):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("169.254.169.254", 80))
    stats["opened"] += 1
    return {"sock": s, "kind": kind, "next": time.time() + 0.2, "sent": 0, "reopen": None, "started": False}

# Interleaved, so that trickles are among the first connections of every wave of reopening.
kinds = ["keep"] * keep
for i in range(trickle):
    kinds.insert(i * (keep + trickle) // max(trickle, 1), "trickle")
conns = [open_one(kind) for kind in kinds]
print("ready", flush=True)
flooding = False
while time.time() < stop_at:
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
        break
    now = time.time()
    for c in conns:
        if c["reopen"] is not None:
            if now >= c["reopen"]:
                c.update(open_one(c["kind"]))
            continue
        s = c["sock"]
        try:
            data = s.recv(65536)
            if data:
                stats["answers"] += data.count(b"HTTP/1.1 ")
            else:
                raise ConnectionResetError()
        except BlockingIOError:
            pass
        except OSError as e:
            if getattr(e, "errno", None) in (errno.ENOTCONN, errno.EINPROGRESS):
                continue
            stats["closed_by_agent"] += 1
            s.close()
            c["reopen"] = now + 1.0
            continue
        if now < c["next"]:
            continue
        try:
            c["started"] = True
            if c["kind"] == "keep":
                s.send(REQUEST)
                c["next"] = now + 2.0
            else:
                s.send(REQUEST[c["sent"] % len(REQUEST):][:1])
                c["sent"] += 1
                c["next"] = now + 0.3
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            stats["closed_by_agent"] += 1
            s.close()
            c["reopen"] = now + 1.0
    if not flooding and all(c["started"] or c["reopen"] is not None for c in conns):
        flooding = True
        print("flooding", flush=True)
    time.sleep(0.05)
print(json.dumps(stats), flush=True)
"#;

/// Row b: one pod holds many keep-alive connections busy and trickles others, and another
/// pod's botocore still gets every fetch answered. The node-wide pool is made small here
/// (`--max-connections 200`) so that a bounded flood (300 + 40 connections, 40 s at most)
/// could fill it; the per-pod limit is the default.
#[tokio::test(flavor = "multi_thread")]
async fn one_pod_flooding_the_agent_does_not_starve_another() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut config = team_a_with_agent();
    config.agent_args = vec!["--max-connections".into(), "200".into()];
    let world = World::start(config).await.expect("world starts");
    assert!(
        world.boto3_caller_arn("web").await.expect("runs").is_ok(),
        "before the flood"
    );

    let mut flood = world
        .pod_command("greedy", "python3")
        .args(["-c", FLOOD, "300", "40", "40"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the flood starts");
    let mut lines = BufReader::new(flood.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the flood opens its connections within 10 s")
        .expect("reads");
    assert_eq!(ready.as_deref(), Some("ready"));
    // Every flood connection has sent its first request and the trickles have started.
    let flooding = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("every flood connection sends within 10 s")
        .expect("reads");
    assert_eq!(flooding.as_deref(), Some("flooding"));

    // The other pod: botocore as boto3 users run it (a 1 s timeout, one attempt), one new
    // process after another, for as long as the flood's requests keep coming.
    let mut fetches = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let began = std::time::Instant::now();
        let fetched = world.boto3_caller_arn("web").await.expect("runs");
        fetches.push((began.elapsed(), fetched));
    }
    drop(flood.stdin.take());
    let stats = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = None;
        while let Ok(Some(line)) = lines.next_line().await {
            last = Some(line);
        }
        last
    })
    .await
    .expect("the flood ends")
    .unwrap_or_default();
    let _ = flood.wait().await;

    let failed: Vec<String> = fetches
        .iter()
        .filter(|(_, fetched)| fetched.is_err())
        .map(|(took, fetched)| {
            let why = fetched
                .as_ref()
                .err()
                .map_or("", |e| e.lines().last().unwrap_or(""));
            format!("after {took:?}: {why}")
        })
        .collect();
    assert!(
        fetches.len() >= 3 && failed.is_empty(),
        "{} of {} fetches of pod web failed during the flood ({stats}):\n{}\nagent log:\n{}",
        failed.len(),
        fetches.len(),
        failed.join("\n"),
        world.agent_log()
    );
    // The flood was answered too, within its fair share: the pod's connections beyond its
    // limit gave way to one another, and its trickles were cut at the header deadline.
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("the flood's stats");
    assert!(stats["answers"].as_u64() > Some(0), "{stats}");
    let metrics = world.agent_metrics().await.expect("metrics");
    let closed = |reason: &str| {
        metric_value(
            &metrics,
            &format!("podiam_agent_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(
        closed("pod-limit-evicted") + closed("pod-limit-refused") > 0,
        "{metrics}"
    );
    assert!(closed("header-timeout") > 0, "{metrics}");
    eprintln!(
        "flood: {stats}; web: {} fetches, slowest {:?}",
        fetches.len(),
        fetches.iter().map(|(took, _)| *took).max()
    );
}
