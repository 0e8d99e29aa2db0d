//! The agent under attack from a pod (issue 13): encoded delimiters toward the node's own
//! metadata service, and one pod trying to starve the others of connections. Needs root;
//! each test builds its own [`World`].

use std::time::Duration;

use podiam_tests::world::{World, WorldConfig};
use serde_json::json;

const NODE_BODY: &str = podiam_tests::netns::NODE_METADATA_BODY;

fn team_a() -> WorldConfig {
    WorldConfig {
        start_agent: true,
        ..WorldConfig::default()
    }
    .namespace("team-a", Some("app-.*"))
    .pod("team-a", "web", Some("app-reader"))
    .pod("team-a", "greedy", Some("admin"))
}

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
    let mut config = team_a();
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
