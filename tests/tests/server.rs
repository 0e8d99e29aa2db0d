//! The server's credential engine against moto, with the test acting as agents (gRPC with
//! the agent's certificate). Pods here are Pod objects only — no network namespaces are
//! needed to ask the server about an IP. Needs root (the World's node namespace).

use std::net::Ipv4Addr;
use std::time::Duration;

use podiam_proto::v1::GetCredentialsRequest;
use podiam_tests::process::wait_until;
use podiam_tests::world::{PodSpec, World, WorldConfig, create_pod};

/// `podiam_server_sts_calls_total{result="ok"}`.
fn sts_ok(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("podiam_server_sts_calls_total{result=\"ok\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
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
