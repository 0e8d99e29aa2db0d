//! Proves the harness itself: namespaces and veths carry a pod's packets to its node, bridges
//! carry bytes both ways, the fake node metadata service answers when nothing intercepts,
//! namespaces vanish even when a test panics, child processes die with their guards, and
//! moto's STS behaves as the suites assume.
//!
//! Tests that touch network namespaces need root and fail (never skip) without it.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podiam_tests::bridge::Bridge;
use podiam_tests::moto::{MOTO_ACCOUNT_ID, Moto};
use podiam_tests::netns::{
    self, NODE_METADATA_BODY, Netns, Node, POD_INTERFACE_PATTERN, require_root,
};
use podiam_tests::process::{ChildGuard, ProcessError, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn netns_exists(name: &str) -> bool {
    netns::list_all().unwrap().iter().any(|n| n == name)
}

#[tokio::test]
async fn pod_reaches_node_ip_over_its_veth_and_is_seen_by_its_own_ip() {
    require_root();
    let node = Node::create().unwrap();
    let pod = node.add_pod().unwrap();
    let other = node.add_pod().unwrap();
    assert_ne!(pod.ip, other.ip);
    assert!(
        pod.host_if
            .starts_with(POD_INTERFACE_PATTERN.trim_end_matches('+'))
    );
    assert!(pod.host_if.len() <= 15);
    // The root namespace never sees a veth end.
    let root_links = netns::ip(&["-o", "link"]).unwrap();
    assert!(!root_links.contains(&pod.host_if), "{root_links}");

    let node_ip = node.ip();
    let listener = node
        .netns()
        .run(|| std::net::TcpListener::bind((node_ip, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(b"pong").unwrap();
        (peer, buf)
    });
    let out = pod
        .netns
        .command("python3")
        .args([
            "-c",
            "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); \
             s.sendall(b'ping'); print(s.recv(4).decode())",
            &node_ip.to_string(),
            &port.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pong");
    let (peer, buf) = server.join().unwrap();
    assert_eq!(&buf, b"ping");
    // The node sees the pod's own address: what the agent identifies pods by.
    assert_eq!(peer.ip(), pod.ip);
}

#[tokio::test]
async fn bridge_carries_bytes_both_ways() {
    require_root();
    let node = Node::create().unwrap();
    // A root-namespace loopback server that upper-cases what it reads, then says "bye".
    let target = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let target_addr = target.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        let mut buf = vec![0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf.to_ascii_uppercase()).await.unwrap();
        s.write_all(b" bye").await.unwrap();
        s.shutdown().await.unwrap();
    });
    let bridge = Bridge::start(node.name(), 0, target_addr).unwrap();
    assert_ne!(bridge.port(), 0);
    let port = bridge.port();
    let client = node
        .netns()
        .run(|| std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)))
        .unwrap()
        .unwrap();
    let reply = tokio::task::spawn_blocking(move || {
        let mut client = client;
        client.write_all(b"hello").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        reply
    })
    .await
    .unwrap();
    assert_eq!(reply, "HELLO bye");
    server.await.unwrap();

    // After drop, nothing listens there any more.
    drop(bridge);
    let refused = wait_until(
        Duration::from_secs(5),
        "the bridge to stop listening",
        || async {
            node.netns()
                .run(|| std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err())
                .unwrap()
        },
    )
    .await;
    refused.unwrap();
}

#[tokio::test]
async fn fake_node_metadata_answers_a_pod_when_nothing_intercepts() {
    require_root();
    let mut node = Node::create().unwrap();
    let pod = node.add_pod().unwrap();
    node.serve_fake_node_metadata().await.unwrap();
    let reply = pod
        .netns
        .http_get(
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            HTTP_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, NODE_METADATA_BODY);
    let put = pod
        .netns
        .http_request(
            "PUT",
            "http://169.254.169.254/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
            HTTP_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(put.body, NODE_METADATA_BODY);
}

#[test]
fn namespaces_are_deleted_when_a_test_panics() {
    require_root();
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let node = Node::create().unwrap();
        let a = node.add_pod().unwrap();
        let b = node.add_pod().unwrap();
        let mut names = names.lock().unwrap();
        names.extend([
            node.name().to_owned(),
            a.netns.name().to_owned(),
            b.netns.name().to_owned(),
        ]);
        for name in names.iter() {
            assert!(netns_exists(name), "{name} should exist inside the scope");
        }
        drop(names);
        panic!("deliberate panic inside the scope");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let left = netns::list_all().unwrap();
    for name in &names {
        assert!(!left.contains(name), "{name} left behind: {left:?}");
        assert!(!netns::list_ours().unwrap().contains(name));
    }
}

#[test]
fn sweep_stale_deletes_namespaces_of_dead_runs_only() {
    require_root();
    // A pid that is certainly dead: a child we ran and reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    assert!(kill(Pid::from_raw(dead_pid as i32), None).is_err());
    let stale = format!("pdm-{dead_pid}-0-stale");
    netns::ip(&["netns", "add", &stale]).unwrap();
    let ours = Netns::create(&netns::unique_name("live")).unwrap();

    let deleted = netns::sweep_stale().unwrap();
    assert!(deleted.contains(&stale), "{deleted:?}");
    assert!(!netns_exists(&stale));
    assert!(
        netns_exists(ours.name()),
        "a live run's namespace was swept"
    );
    let name = ours.name().to_owned();
    drop(ours);
    assert!(!netns_exists(&name));
}

#[tokio::test]
async fn child_guard_logs_kills_on_drop_and_waits() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo started; echo oops >&2; exec sleep 600"]);
    let guard = ChildGuard::spawn("sleeper", cmd).unwrap();
    let pid = guard.pid();
    let log = guard.log_path().to_owned();
    wait_until(
        Duration::from_secs(5),
        "the sleeper to log its start",
        || {
            let log = log.clone();
            async move { std::fs::read_to_string(&log).is_ok_and(|s| s.contains("oops")) }
        },
    )
    .await
    .unwrap();
    assert_eq!(guard.log_tail(1), "oops");
    assert_eq!(guard.log_tail(5), "started\noops");
    drop(guard);
    // Reaped, not a zombie: the pid no longer exists.
    assert!(kill(Pid::from_raw(pid as i32), None).is_err());

    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "exit 3"]);
    let mut quick = ChildGuard::spawn("quick", cmd).unwrap();
    let status = quick.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.code(), Some(3));

    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    let mut slow = ChildGuard::spawn("slow", cmd).unwrap();
    let err = slow.wait_exit(Duration::from_millis(50)).await.unwrap_err();
    assert!(err.to_string().contains("slow to exit"), "{err}");
    slow.signal(Signal::SIGTERM).unwrap();
    let status = slow.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert!(!status.success());
}

#[tokio::test]
async fn wait_until_names_what_it_waited_for() {
    let err = wait_until(
        Duration::from_millis(60),
        "the moon to turn blue",
        || async { false },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProcessError::Timeout { .. }));
    assert_eq!(
        err.to_string(),
        "timed out after 60ms waiting for the moon to turn blue"
    );
}

/// Runs the AWS CLI against moto with the given credentials, returning parsed JSON.
async fn aws(cmd: &mut tokio::process::Command, creds: &[(&str, &str)]) -> serde_json::Value {
    for (k, v) in Moto::client_env() {
        cmd.env(k, v);
    }
    cmd.env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    for (k, v) in creds {
        cmd.env(k, v);
    }
    let out = cmd.args(["--output", "json"]).output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn moto_assume_role_and_caller_identity() {
    let moto = Moto::start().await.unwrap();
    assert_eq!(moto.endpoint(), format!("http://127.0.0.1:{}", moto.port()));

    // The role need not exist; moto's own identity is in account 123456789012.
    let me = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "get-caller-identity",
        ]),
        &[],
    )
    .await;
    assert_eq!(me["Account"], MOTO_ACCOUNT_ID);

    let assumed = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "assume-role",
            "--role-arn",
            "arn:aws:iam::123456789012:role/app-reader",
            "--role-session-name",
            "harness-session",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        assumed["AssumedRoleUser"]["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-reader/harness-session"
    );
    let creds = &assumed["Credentials"];
    let key = creds["AccessKeyId"].as_str().unwrap().to_owned();
    let secret = creds["SecretAccessKey"].as_str().unwrap().to_owned();
    let token = creds["SessionToken"].as_str().unwrap().to_owned();
    assert!(key.starts_with("ASIA"), "{key}");
    assert!(creds["Expiration"].as_str().unwrap().ends_with('Z'));
    let with_creds = [
        ("AWS_ACCESS_KEY_ID", key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("AWS_SESSION_TOKEN", token.as_str()),
    ];
    let who = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "get-caller-identity",
        ]),
        &with_creds,
    )
    .await;
    assert_eq!(
        who["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-reader/harness-session"
    );
    assert_eq!(who["Account"], MOTO_ACCOUNT_ID);
    assert!(
        who["UserId"]
            .as_str()
            .unwrap()
            .ends_with(":harness-session")
    );

    // A role path is dropped from the assumed-role ARN.
    let pathed = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "assume-role",
            "--role-arn",
            "arn:aws:iam::123456789012:role/team/app-writer",
            "--role-session-name",
            "s2",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        pathed["AssumedRoleUser"]["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-writer/s2"
    );
}

#[tokio::test]
async fn a_pod_reaches_moto_through_a_bridge() {
    require_root();
    let moto = Moto::start().await.unwrap();
    let node = Node::create().unwrap();
    let pod = node.add_pod().unwrap();
    let bridge = Bridge::start(pod.netns.name(), 0, moto.addr()).unwrap();
    let endpoint = format!("http://127.0.0.1:{}", bridge.port());
    let who = aws(
        pod.netns
            .command("aws")
            .args(["--endpoint-url", &endpoint, "sts", "get-caller-identity"]),
        &[],
    )
    .await;
    assert_eq!(who["Account"], MOTO_ACCOUNT_ID);
    let _: SocketAddr = bridge.target();
}
