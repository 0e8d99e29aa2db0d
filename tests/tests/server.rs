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
            service_account: None,
            family: Default::default(),
        };
        async move { create_pod(&client, &spec, &[ip(i).into()]).await }
    });
    for created in futures::future::join_all(creates).await {
        created.expect("pod created");
    }
}

/// Whether the server's Explain names a pod for the IP numbered `i`.
async fn known(client: &podiam_tests::identity::Client, i: usize) -> bool {
    use podiam_proto::v1::{ExplainRequest, explain_request::Target};
    client
        .clone()
        .explain(ExplainRequest {
            target: Some(Target::Ip(ip(i).to_string())),
        })
        .await
        .is_ok_and(|answer| !answer.into_inner().pods.is_empty())
}

/// Whether the server's Explain allows every pod with an IP numbered in `range`.
async fn all_allowed(
    client: &podiam_tests::identity::Client,
    range: std::ops::Range<usize>,
) -> bool {
    use podiam_proto::v1::{ExplainRequest, explain_request::Target};
    let asks = range.map(|i| {
        let mut client = client.clone();
        async move {
            client
                .explain(ExplainRequest {
                    target: Some(Target::Ip(ip(i).to_string())),
                })
                .await
                .is_ok_and(|answer| answer.into_inner().allowed)
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .all(|ok| ok)
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
    let admin = world.admin_client().await.expect("admin client");
    // The API has all 200 pods; wait until the server's watch has delivered them all too.
    wait_until(
        Duration::from_secs(20),
        "the server to know all 200 pods",
        || all_allowed(&admin, 0..200),
    )
    .await
    .expect("all pods known");
    let asks = (0..200).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .get_credentials(GetCredentialsRequest {
                    ip: ip(i).to_string(),
                    role_name: "app-reader".into(),
                    node_name: String::new(),
                    pod_token: String::new(),
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
                        pod_token: String::new(),
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
            service_account: None,
            family: Default::default(),
        };
        create_pod(&client, &spec, &[ip(1000 + n).into()])
            .await
            .expect("pod created");
    }
    let server = world.admin_client().await.expect("admin client");
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
        assert_eq!(reason_name(answer.reason), reason, "{answer:?}");
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
    assert_eq!(reason_name(twin.reason), "ambiguous-pod", "{twin:?}");
    let gone = explain(Target::Pod(PodRef {
        namespace: "team-a".into(),
        name: "nobody".into(),
        uid: String::new(),
    }))
    .await;
    assert_eq!(reason_name(gone.reason), "unknown-pod", "{gone:?}");

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
    // The server counts an event once the API has answered for it, which may be just
    // after the API shows it.
    let sent =
        |metrics: &str| metric_value(metrics, r#"podiam_server_events_total{result="sent"}"#);
    wait_until(Duration::from_secs(10), "the events counted", || async {
        world
            .server_metrics()
            .await
            .is_ok_and(|m| sent(&m) >= expected.len() as u64)
    })
    .await
    .expect("counted");
    let metrics = world.server_metrics().await.expect("metrics");
    assert_eq!(metric_value(&metrics, "podiam_server_duplicate_ip_pods"), 2);
    assert_eq!(
        sent(&metrics),
        5,
        "one event per refused pod, not one per upkeep pass"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_failing_answers_unavailable_tells_the_pod_and_recovers_by_itself() {
    let world = World::start(WorldConfig {
        sts_proxy: true,
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    })
    .await
    .expect("world starts");
    // STS fails (503 at the proxy) before any pod needs it.
    world.sts_proxy().set_failing(true);
    create_pods(&world, 0, 1, "app-writer").await;
    let mut client = world.server_client().await.expect("client");
    let admin = world.admin_client().await.expect("admin client");
    // The pod must be in the server's view before its refusal can be about STS.
    wait_until(Duration::from_secs(10), "the server to see the pod", || {
        let admin = admin.clone();
        async move { known(&admin, 0).await }
    })
    .await
    .expect("pod seen");
    let request = GetCredentialsRequest {
        ip: ip(0).to_string(),
        role_name: "app-writer".into(),
        node_name: String::new(),
        pod_token: String::new(),
    };
    let refused = client
        .get_credentials(request.clone())
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

    // STS comes back: the pod gets its credentials without anyone doing anything.
    world.sts_proxy().set_failing(false);
    wait_until(
        Duration::from_secs(90),
        "credentials after STS recovers",
        || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.get_credentials(request).await.is_ok() }
        },
    )
    .await
    .expect("recovered");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_chained_named_per_pod_and_tagged_as_configured() {
    let hop = "arn:aws:iam::123456789012:role/podiam-hop";
    let world = World::start(WorldConfig {
        sts_proxy: true,
        server_args: [
            "--assume-role-arn",
            hop,
            "--session-name",
            "{namespace}.{pod}",
            "--session-tags",
            "--cluster-name",
            "prod-eu",
            "--session-tags-transitive",
        ]
        .map(String::from)
        .to_vec(),
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    })
    .await
    .expect("world starts");
    create_pods(&world, 0, 2, "app-reader").await;
    let proxy = world.sts_proxy();
    wait_until(
        Duration::from_secs(20),
        "both pods' sessions prefetched",
        || async {
            proxy
                .assume_role_calls()
                .iter()
                .filter(|c| c.status == 200)
                .count()
                >= 3
        },
    )
    .await
    .expect("prefetched");
    let calls = proxy.assume_role_calls();
    let (hops, apps): (Vec<_>, Vec<_>) =
        calls.iter().partition(|c| c.param("RoleArn") == Some(hop));
    assert_eq!(
        hops.len(),
        1,
        "the intermediate session is made once: {calls:#?}"
    );
    let hop_call = hops[0];
    let server_key = podiam_tests::moto::Moto::client_env()
        .into_iter()
        .find(|(k, _)| *k == "AWS_ACCESS_KEY_ID")
        .map(|(_, v)| v)
        .expect("moto's key");
    assert_eq!(
        hop_call.signed_by, server_key,
        "the hop is assumed with the server's own key"
    );
    assert_eq!(hop_call.param("RoleSessionName"), Some("podiam-server"));
    let hop_key = hop_call.issued_key.clone().expect("the hop's session key");

    assert_eq!(apps.len(), 2, "one session per pod: {calls:#?}");
    let mut names = Vec::new();
    for call in &apps {
        assert_eq!(
            call.signed_by, hop_key,
            "pods' roles are assumed from the hop's session"
        );
        assert_eq!(
            call.param("RoleArn"),
            Some("arn:aws:iam::123456789012:role/app-reader")
        );
        let name = call
            .param("RoleSessionName")
            .expect("session name")
            .to_string();
        let tags = call.tags();
        let tag = |key: &str| {
            tags.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(tag("kubernetes-namespace"), "team-a", "{tags:?}");
        assert_eq!(
            format!("team-a.{}", tag("kubernetes-pod-name")),
            name,
            "{tags:?}"
        );
        assert!(!tag("kubernetes-pod-uid").is_empty(), "{tags:?}");
        assert_eq!(tag("kubernetes-service-account"), "default", "{tags:?}");
        assert_eq!(tag("eks-cluster-name"), "prod-eu", "{tags:?}");
        // Every tag transitive, as asked.
        let transitive: Vec<&str> = (1..)
            .map_while(|n| call.param(&format!("TransitiveTagKeys.member.{n}")))
            .collect();
        let keys: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(transitive, keys, "{call:?}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["team-a.app-reader-0", "team-a.app-reader-1"]);

    // What a pod is handed is its own session's credentials.
    let mut client = world.server_client().await.expect("client");
    let creds = client
        .get_credentials(GetCredentialsRequest {
            ip: ip(0).to_string(),
            role_name: "app-reader".into(),
            node_name: String::new(),
            pod_token: String::new(),
        })
        .await
        .expect("credentials")
        .into_inner()
        .credentials
        .expect("creds");
    let own = apps
        .iter()
        .find(|c| c.param("RoleSessionName") == Some("team-a.app-reader-0"))
        .and_then(|c| c.issued_key.clone());
    assert_eq!(Some(creds.access_key_id), own);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_names_the_replica_and_the_agents_it_serves() {
    let world = World::start(podiam_tests::fixtures::web_with_agent())
        .await
        .expect("world starts");
    let client = world.admin_client().await.expect("admin client");
    let status = podiam_tests::process::wait_for(
        Duration::from_secs(10),
        "the agent's node stream on the replica",
        || {
            let mut client = client.clone();
            async move {
                let status = client
                    .status(podiam_proto::v1::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                // One stream: not a reopened one beside the old, still closing.
                (status.agents.len() == 1).then_some(status)
            }
        },
    )
    .await
    .expect("status");
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert!(status.synced && !status.draining, "{status:?}");
    assert_eq!(status.agents.len(), 1, "{status:?}");
    let agent = &status.agents[0];
    assert_eq!(agent.node_name, podiam_tests::world::NODE_NAME);
    // The node as its token proves it, and the pod that token is bound to.
    assert_eq!(
        agent.agent_pod,
        format!(
            "podiam/{}",
            podiam_tests::identity::agent_pod_name(podiam_tests::world::NODE_NAME)
        )
    );
    assert_eq!(agent.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(agent.connected_unix > 1_700_000_000, "{agent:?}");
    assert_eq!(status.pods, 1);
    // default, kube-system, team-a, podiam
    assert_eq!(status.namespaces, 4);
}

/// A wire reason by the name pods read ("" for none).
fn reason_name(wire: i32) -> &'static str {
    podiam_proto::Reason::from_wire(wire).map_or("", podiam_proto::Reason::as_str)
}
