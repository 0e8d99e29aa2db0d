//! IPv6: a dual-stack pod and an IPv6-only pod get their roles at `[fd00:ec2::254]` (instance
//! metadata) and `[fd00:ec2::23]` (container credentials), through the agent's ip6tables
//! rules, with the real AWS CLI, boto3 and Rust SDK; with the agent down they reach nothing
//! over IPv6 either, and `uninstall` removes the IPv6 rules too. Needs root.

use podiam_tests::fixtures::CREDS_PATH;
use podiam_tests::netns::Family;
use podiam_tests::process::{CHANGE_DEADLINE, wait_until};
use podiam_tests::world::{Boto3Mode, POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE, Via, World, WorldConfig};

const METADATA6: &str = "http://[fd00:ec2::254]";
const CONTAINER6: &str = "http://[fd00:ec2::23]/v1/credentials";
const ROLE_ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/";
/// What the SDK matrix requires of the credentials it gets.
const MIN_LIFE_SECS: i64 = 30 * 60;

/// A dual-stack pod and an IPv6-only one; the webhook tells pods the IPv6 address of the
/// container endpoint, as an IPv6-only cluster would be configured.
fn config() -> WorldConfig {
    WorldConfig {
        start_agent: true,
        pod_identity: true,
        // The node's own metadata service answers on both families: pods must never reach it.
        fake_node_metadata: true,
        server_args: vec!["--webhook-endpoint-url".into(), CONTAINER6.into()],
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod_of(Family::Dual, "team-a", "dual", Some("app-reader"))
            .pod_of(Family::V6, "team-a", "six", Some("app-writer"))
    }
}

fn pod_token(world: &World, pod: &str) -> String {
    world
        .mint_pod_token("team-a", pod, POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE)
        .expect("token")
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_and_ipv6_only_pods_get_their_roles_on_both_endpoints() {
    let world = World::start(config()).await.expect("world starts");
    for (pod, role) in [("dual", "app-reader"), ("six", "app-writer")] {
        let listed = world
            .pod_request(pod, "GET", &format!("{METADATA6}{CREDS_PATH}"), &[])
            .await
            .expect("answers over IPv6");
        assert_eq!((listed.status, listed.body.as_str()), (200, role), "{pod}");
        // IMDSv2 over IPv6: the token is bound to the pod's IPv6 address.
        let token = world
            .pod_request(
                pod,
                "PUT",
                &format!("{METADATA6}/latest/api/token"),
                &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
            )
            .await
            .expect("a token");
        assert_eq!(token.status, 200, "{pod}: {}", token.body);
        let creds = world
            .pod_request(
                pod,
                "GET",
                &format!("{METADATA6}{CREDS_PATH}{role}"),
                &[("X-aws-ec2-metadata-token", &token.body)],
            )
            .await
            .expect("credentials");
        assert_eq!(creds.status, 200, "{pod}: {}", creds.body);
        assert!(creds.body.contains("\"AccessKeyId\""), "{pod}");
        // A token's first use costs a TokenReview and a server call, which a busy machine may
        // hold past the agent's deadline once: asked until served, never refused otherwise.
        let token = pod_token(&world, pod);
        let container = || async {
            world
                .pod_request(pod, "GET", CONTAINER6, &[("Authorization", &token)])
                .await
                .expect("the container endpoint answers over IPv6")
        };
        wait_until(
            CHANGE_DEADLINE,
            "the container endpoint over IPv6",
            || async {
                let reply = container().await;
                assert!(
                    matches!(reply.status, 200 | 502..=504),
                    "{pod}: {} {}",
                    reply.status,
                    reply.body
                );
                reply.status == 200
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{pod}: {e}"));
    }
    // The dual-stack pod is the same pod over IPv4; the IPv6-only one has no IPv4 at all.
    let v4 = world
        .metadata_request("dual", "GET", CREDS_PATH, &[])
        .await
        .expect("answers over IPv4");
    assert_eq!((v4.status, v4.body.as_str()), (200, "app-reader"));
    assert!(
        world
            .metadata_request("six", "GET", CREDS_PATH, &[])
            .await
            .is_err()
    );

    // Real clients: the AWS CLI on the IPv6 metadata endpoint; boto3 and the Rust SDK on
    // the container endpoint the webhook gave them (the IPv6 URL).
    let cli = world
        .pod_command("six", "aws")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
        .args([
            "sts",
            "get-caller-identity",
            "--query",
            "Arn",
            "--output",
            "text",
        ])
        .args(["--endpoint-url", &world.pod("six").sts_endpoint()])
        .output()
        .await
        .expect("the AWS CLI runs");
    let arn = String::from_utf8_lossy(&cli.stdout);
    assert!(
        arn.starts_with(&format!("{ROLE_ARN_PREFIX}app-writer/")),
        "{cli:?}\nagent log:\n{}",
        world.agent_log()
    );
    let setup = world.container_setup("six").expect("set up by the webhook");
    assert!(
        setup.env.iter().any(|(_, value)| value == CONTAINER6),
        "{setup:?}"
    );
    let rust = world
        .rust_sdk_identity_via("six", Via::Container)
        .await
        .expect("runs");
    let boto3 = world
        .boto3_identity_via("dual", Boto3Mode::Default, Via::Container)
        .await
        .expect("runs");
    for (what, identity, role) in [
        ("Rust SDK", rust, "app-writer"),
        ("boto3", boto3, "app-reader"),
    ] {
        let identity =
            identity.unwrap_or_else(|error| panic!("{what}: {error}\n{}", world.agent_log()));
        assert!(
            identity
                .arn
                .starts_with(&format!("{ROLE_ARN_PREFIX}{role}/")),
            "{what}: {identity:?}"
        );
        assert!(
            identity.remaining_secs >= MIN_LIFE_SECS,
            "{what}: {identity:?}"
        );
    }
}

/// The node's IPv6 nat table, as `ip6tables -S` prints it.
async fn rules6(world: &World) -> String {
    let output = world
        .node()
        .netns()
        .command("ip6tables")
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .await
        .expect("ip6tables runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_agent_down_nothing_answers_over_ipv6() {
    let mut world = World::start(config()).await.expect("world starts");
    let rules = rules6(&world).await;
    for rule in [
        "-d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j DNAT",
        "-d fd00:ec2::23/128 -p tcp -m tcp --dport 80 -j DNAT",
    ] {
        assert!(rules.contains(rule), "{rule} missing:\n{rules}");
    }
    world.stop_agent().await.expect("stops");
    assert!(
        rules6(&world).await.contains("-j PODIAM"),
        "the IPv6 rules stay"
    );
    let token = pod_token(&world, "six");
    for url in [format!("{METADATA6}{CREDS_PATH}"), CONTAINER6.to_string()] {
        let reply = world
            .pod_request("six", "GET", &url, &[("Authorization", &token)])
            .await;
        assert!(
            reply.is_err(),
            "{url} answered with the agent down: {reply:?}"
        );
    }
    let six = std::net::IpAddr::V6(world.pod("six").net.ip6.expect("IPv6"));
    let seen = world.node().fake_node_metadata_clients();
    assert!(
        !seen.iter().any(|client| client.parse().ok() == Some(six)),
        "the node's metadata service saw the pod: {seen:?}"
    );
    let out = world.uninstall_agent_rules().await.expect("uninstall runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !rules6(&world).await.contains("PODIAM"),
        "uninstall removes the IPv6 rules"
    );
    // Proof that the stopped agent's rules were what kept the pod from the node's own
    // service over IPv6.
    let reply = world
        .pod_request("six", "GET", &format!("{METADATA6}{CREDS_PATH}"), &[])
        .await
        .expect("the node answers");
    assert_eq!(reply.body, podiam_tests::netns::NODE_METADATA_BODY);
}
