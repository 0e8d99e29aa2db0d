//! The server's credential engine against moto, with the test acting as agents (gRPC with
//! the agent's certificate). Pods here are Pod objects only — no network namespaces are
//! needed to ask the server about an IP. Needs root (the World's node namespace).

use std::net::Ipv4Addr;
use std::time::Duration;

use podiam_proto::v1::GetCredentialsRequest;
use podiam_tests::process::wait_until;
use podiam_tests::world::{PodSpec, World, WorldConfig, create_pod, metric_value};

/// `podiam_server_sts_calls_total{result="ok"}`.
fn sts_ok(metrics: &str) -> u64 {
    metric_value(metrics, r#"podiam_server_sts_calls_total{result="ok"}"#)
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, (i / 250) as u8, (i % 250 + 1) as u8)
}

async fn create_pods(world: &World, from: usize, count: usize, role: &str) {
    let client = world.kube_client();
    let creates = (from..from + count).map(|i| {
        let client = client.clone();
        let spec = PodSpec {
            name: format!("{role}-{i}"),
            namespace: "team-a".into(),
            role: Some(role.into()),
            registered: true,
        };
        async move { create_pod(&client, &spec, ip(i)).await }
    });
    for created in futures::future::join_all(creates).await {
        created.expect("pod created");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_sharing_a_role_cause_one_assume_role_and_concurrent_misses_collapse() {
    let world = World::start(WorldConfig::default().namespace("team-a", Some("app-.*")))
        .await
        .expect("world starts");

    // 200 pods sharing one role: prefetched with one AssumeRole.
    create_pods(&world, 0, 200, "app-reader").await;
    wait_until(
        Duration::from_secs(20),
        "the shared role to be prefetched",
        || async { world.server_metrics().await.is_ok_and(|m| sts_ok(&m) >= 1) },
    )
    .await
    .expect("prefetched");
    let client = world.server_client().await.expect("client");
    let asks = (0..200).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .get_credentials(GetCredentialsRequest {
                    ip: ip(i).to_string(),
                    role_name: "app-reader".into(),
                    node_name: String::new(),
                })
                .await
        }
    });
    let answers = futures::future::join_all(asks).await;
    let keys: std::collections::HashSet<String> = answers
        .into_iter()
        .map(|a| {
            a.expect("credentials")
                .into_inner()
                .credentials
                .expect("creds")
                .access_key_id
        })
        .collect();
    assert_eq!(keys.len(), 1, "all 200 pods share one session");
    assert_eq!(
        sts_ok(&world.server_metrics().await.expect("metrics")),
        1,
        "exactly one AssumeRole"
    );

    // 50 pods of a new role, each asking at once as soon as it exists: still one call
    // (requests and the prefetch collapse onto one STS call).
    create_pods(&world, 200, 50, "app-writer").await;
    let asks = (200..250).map(|i| {
        let mut client = client.clone();
        async move {
            // Until the server's watch has seen the pod it answers unknown-pod; ask again.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let answer = client
                    .get_credentials(GetCredentialsRequest {
                        ip: ip(i).to_string(),
                        role_name: "app-writer".into(),
                        node_name: String::new(),
                    })
                    .await;
                match answer {
                    Err(status)
                        if podiam_proto::Reason::of(&status)
                            == Some(podiam_proto::Reason::UnknownPod)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        }
    });
    for answer in futures::future::join_all(asks).await {
        answer.expect("credentials for the new role");
    }
    assert_eq!(
        sts_ok(&world.server_metrics().await.expect("metrics")),
        2,
        "one more AssumeRole for the new role"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_says_why_for_each_kind_of_decision() {
    use podiam_proto::v1::{ExplainRequest, ExplainResponse, PodRef, explain_request::Target};
    let world = World::start(
        WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .namespace("team-bad", Some("app-("))
            .namespace("team-none", None),
    )
    .await
    .expect("world starts");
    let client = world.kube_client();
    let pods: &[(&str, &str, Option<&str>, usize)] = &[
        ("team-a", "allowed", Some("app-reader"), 1),
        ("team-a", "plain", None, 2),
        ("team-a", "greedy", Some("admin"), 3),
        ("team-bad", "broken", Some("app-reader"), 4),
        ("team-none", "lonely", Some("app-reader"), 5),
        ("team-a", "twin-1", Some("app-reader"), 6),
        ("team-a", "twin-2", Some("app-reader"), 6),
    ];
    for (namespace, name, role, n) in pods {
        let spec = PodSpec {
            name: (*name).into(),
            namespace: (*namespace).into(),
            role: role.map(Into::into),
            registered: true,
        };
        create_pod(&client, &spec, ip(1000 + n))
            .await
            .expect("pod created");
    }
    let server = world.server_client().await.expect("client");
    let explain = |target: Target| {
        let mut server = server.clone();
        async move {
            server
                .explain(ExplainRequest {
                    target: Some(target),
                })
                .await
                .expect("explains")
                .into_inner()
        }
    };
    let by_ip = |n: usize| Target::Ip(ip(1000 + n).to_string());
    // Wait until the server has seen every pod (the last one makes the twins' IP ambiguous).
    wait_until(
        Duration::from_secs(10),
        "the server to see all pods",
        || async {
            explain(by_ip(6)).await.pods.len() == 2 && explain(by_ip(5)).await.pods.len() == 1
        },
    )
    .await
    .expect("synced");

    let check = |answer: ExplainResponse, allowed: bool, reason: &str, words: &[&str]| {
        assert_eq!(answer.allowed, allowed, "{answer:?}");
        assert_eq!(answer.reason, reason, "{answer:?}");
        for word in words {
            assert!(
                answer.message.contains(word) || answer.permitted_regex.contains(word),
                "{word:?} in {answer:?}"
            );
        }
        answer
    };
    let allowed = check(explain(by_ip(1)).await, true, "", &[]);
    assert_eq!(
        allowed.role_arn,
        "arn:aws:iam::123456789012:role/app-reader"
    );
    assert_eq!(
        (allowed.namespace.as_str(), allowed.permitted_regex.as_str()),
        ("team-a", "app-.*")
    );
    assert_eq!(allowed.pods[0].name, "allowed");
    // The same by name.
    let named = explain(Target::Pod(PodRef {
        namespace: "team-a".into(),
        name: "allowed".into(),
        uid: String::new(),
    }))
    .await;
    assert!(named.allowed, "{named:?}");

    check(
        explain(by_ip(2)).await,
        false,
        "no-role",
        &["iam.amazonaws.com/role"],
    );
    let greedy = check(
        explain(by_ip(3)).await,
        false,
        "role-not-permitted",
        &["app-.*", "does not match"],
    );
    assert_eq!(greedy.role_arn, "arn:aws:iam::123456789012:role/admin");
    check(
        explain(by_ip(4)).await,
        false,
        "role-not-permitted",
        &["invalid", "app-("],
    );
    check(
        explain(by_ip(5)).await,
        false,
        "role-not-permitted",
        &["no iam.amazonaws.com/permitted annotation"],
    );
    let unknown = check(
        explain(by_ip(999)).await,
        false,
        "unknown-pod",
        &["no pod known"],
    );
    assert!(unknown.pods.is_empty());
    let twins = check(
        explain(by_ip(6)).await,
        false,
        "ambiguous-pod",
        &["twin-1", "twin-2"],
    );
    assert_eq!(twins.pods.len(), 2);
    // Each twin, asked by name, is refused the same way.
    let twin = explain(Target::Pod(PodRef {
        namespace: "team-a".into(),
        name: "twin-1".into(),
        uid: String::new(),
    }))
    .await;
    assert_eq!(twin.reason, "ambiguous-pod", "{twin:?}");
    let gone = explain(Target::Pod(PodRef {
        namespace: "team-a".into(),
        name: "nobody".into(),
        uid: String::new(),
    }))
    .await;
    assert_eq!(gone.reason, "unknown-pod", "{gone:?}");

    // The pods refused for a reason their owners can fix get a Warning Event (read back with
    // the real kubectl); the pod without a role and the allowed pod get none.
    let reasons = || async {
        let listed = world
            .kubectl_ok(&["get", "events.events.k8s.io", "-A", "-o", "json"])
            .await
            .expect("kubectl lists events");
        let list: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
        let mut found: Vec<(String, String, String)> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| {
                assert_eq!(e["type"], "Warning", "{e}");
                assert_eq!(e["reportingController"], "podiam-server", "{e}");
                assert_eq!(e["regarding"]["kind"], "Pod", "{e}");
                (
                    e["regarding"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        found.sort();
        found
    };
    let expected = ["broken", "greedy", "lonely", "twin-1", "twin-2"];
    wait_until(
        Duration::from_secs(20),
        "an event per refused pod",
        || async { reasons().await.len() >= expected.len() },
    )
    .await
    .expect("events written");
    let found = reasons().await;
    let names: Vec<&str> = found.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, expected, "{found:#?}");
    for (name, reason, note) in &found {
        let want = if name.starts_with("twin") {
            "DuplicatePodIP"
        } else {
            "RoleNotPermitted"
        };
        assert_eq!(reason, want, "{name}: {note}");
        assert!(!note.is_empty() && !note.contains('\n'), "{name}: {note:?}");
    }
    let metrics = world.server_metrics().await.expect("metrics");
    assert_eq!(metric_value(&metrics, "podiam_server_duplicate_ip_pods"), 2);
    assert_eq!(
        metric_value(&metrics, r#"podiam_server_events_total{result="sent"}"#),
        5,
        "one event per refused pod, not one per upkeep pass"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_answers_unavailable_and_tells_the_pod() {
    let world = World::start(WorldConfig::default().namespace("team-a", Some("app-.*")))
        .await
        .expect("world starts");
    // STS goes away for good before any pod needs it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(world.moto().process().pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("moto killed");
    create_pods(&world, 0, 1, "app-writer").await;
    let mut client = world.server_client().await.expect("client");
    let refused = client
        .get_credentials(GetCredentialsRequest {
            ip: ip(0).to_string(),
            role_name: "app-writer".into(),
            node_name: String::new(),
        })
        .await
        .expect_err("no STS, no credentials");
    assert_eq!(
        podiam_proto::Reason::of(&refused),
        Some(podiam_proto::Reason::StsUnavailable),
        "{refused:?}"
    );
    wait_until(
        Duration::from_secs(20),
        "an STSUnavailable event",
        || async {
            world
                .emulator()
                .list(podiam_tests::kube_emulator::Kind::EventV1, Some("team-a"))
                .is_ok_and(|events| {
                    events.iter().any(|e| {
                        e["reason"] == "STSUnavailable" && e["regarding"]["name"] == "app-writer-0"
                    })
                })
        },
    )
    .await
    .expect("event written");
}
