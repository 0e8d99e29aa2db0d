//! Proves the harness's network: namespaces and veths carry a pod's packets to its node,
//! bridges carry bytes both ways (moto's too), the fake node metadata service answers when
//! nothing intercepts, and namespaces vanish even when a test panics. (Child processes and
//! moto alone, which need no root, are proven in `harness_tools.rs`.)
//!
//! Every test here touches network namespaces: it needs root and fails (never skips)
//! without it.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use podiam_tests::bridge::Bridge;
use podiam_tests::moto::{MOTO_ACCOUNT_ID, Moto, aws_cli_json as aws};
use podiam_tests::netns::{
    self, NODE_METADATA_BODY, Netns, Node, POD_INTERFACE_PATTERN, require_root,
};
use podiam_tests::process::wait_until;
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
