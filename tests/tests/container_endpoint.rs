//! The container-credentials endpoint end to end: pods send their projected ServiceAccount
//! token to `http://169.254.170.23/v1/credentials` through the agent's DNAT rule, and the
//! real AWS CLI, boto3 (botocore's container provider) and the Rust SDK (aws-config's ECS
//! provider, unmodified) get the pod's role with it; tokens that do not prove the pod at the
//! address get no credentials. Needs root.
//!
//! Tokens are minted by the Kubernetes API emulator as the kubelet gets them (TokenRequest
//! bound to the pod, audience `podiam`), and checked by the servers with TokenReview.

use std::time::Duration;

use podiam_tests::fixtures::{set_pod_role, team_a_with_agent};
use podiam_tests::kube_emulator::{self, Kind};
use podiam_tests::plugin::{iam, server_flags};
use podiam_tests::process::{CHANGE_DEADLINE, wait_until};
use podiam_tests::world::{
    POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE, Via, World, WorldConfig, metric_value,
};

const ROLE_ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/";
/// What the SDK matrix requires of the credentials it gets.
const MIN_LIFE_SECS: i64 = 30 * 60;

/// team-a with the agent, and a second pod with a permitted role of its own; the servers'
/// admission webhook configured and team-a opted in, so that pods with a role are set up
/// for the container endpoint when created.
fn world_config() -> WorldConfig {
    WorldConfig {
        pod_identity: true,
        ..team_a_with_agent().pod("team-a", "worker", Some("app-writer"))
    }
}

fn expect_role(result: Result<String, String>, role: &str, what: &str, world: &World) {
    match result {
        Ok(arn) => assert!(
            arn.starts_with(&format!("{ROLE_ARN_PREFIX}{role}/")),
            "{what}: expected an assumed-role ARN for {role}, got {arn:?}"
        ),
        Err(error) => panic!(
            "{what}: expected credentials for {role}, got: {error}\nagent log:\n{}\nserver log:\n{}",
            world.agent_log(),
            world.server_log()
        ),
    }
}

/// `GET /v1/credentials` from `pod` with `token` as its `Authorization` (none: no header).
async fn fetch(world: &World, pod: &str, token: Option<&str>) -> podiam_tests::netns::HttpReply {
    let headers: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
    world
        .container_request(pod, "GET", "/v1/credentials", &headers)
        .await
        .expect("the endpoint answers")
}

/// [`fetch`] until the answer is not a gateway error (502–504: a review or server call that a
/// busy machine held past the agent's deadline), within [`CHANGE_DEADLINE`]: the answer a
/// request settles on. A 200 is returned at once, for the caller to fail on.
async fn settled(world: &World, pod: &str, token: Option<&str>) -> podiam_tests::netns::HttpReply {
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    loop {
        let reply = fetch(world, pod, token).await;
        if !matches!(reply.status, 502..=504) || tokio::time::Instant::now() > deadline {
            return reply;
        }
    }
}

/// [`fetch`] until it is answered 200 (within [`CHANGE_DEADLINE`]): a token's first use
/// costs a TokenReview and a server call, which a busy machine may hold past the agent's
/// deadline once.
async fn served(world: &World, pod: &str, token: &str) {
    wait_until(
        CHANGE_DEADLINE,
        &format!("{pod}'s token to be served"),
        || async { fetch(world, pod, Some(token)).await.status == 200 },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `kubectl iam explain web -n team-a`, answered by the world's servers: its output.
async fn explain_web(world: &World) -> String {
    let kubeconfig = world.admin_kubeconfig().expect("kubeconfig");
    let mut args = vec!["explain", "web", "-n", "team-a"];
    let servers = server_flags(world);
    args.extend(servers.iter().map(String::as_str));
    iam(&kubeconfig, &args).await.ok().stdout
}

fn pod_token(world: &World, pod: &str) -> String {
    world
        .mint_pod_token("team-a", pod, POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE)
        .expect("token")
}

#[tokio::test(flavor = "multi_thread")]
async fn sdks_get_the_pods_role_with_its_token() {
    let world = World::start(world_config()).await.expect("world starts");

    // What the webhook put in the stored pods: the SDKs' two variables and the token
    // volume for pods with a role; nothing for a pod without one.
    let setup = world.container_setup("web").expect("web was set up");
    assert_eq!(
        setup.env,
        [
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_string(),
                "http://169.254.170.23/v1/credentials".to_string()
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".to_string(),
                "/var/run/secrets/podiam.io/serviceaccount/token".to_string()
            ),
        ]
    );
    assert_eq!(
        setup.mount_path,
        "/var/run/secrets/podiam.io/serviceaccount"
    );
    assert!(world.container_setup("plain").is_err(), "plain has no role");
    let server_metrics = world.server_metrics().await.expect("metrics");
    for (result, count) in [("mutated", 3), ("unchanged", 1)] {
        let sample = format!("podiam_server_webhook_reviews_total{{result=\"{result}\"}}");
        assert_eq!(
            metric_value(&server_metrics, &sample),
            count,
            "{server_metrics}"
        );
    }

    expect_role(
        world
            .aws_caller_arn_via("web", Via::Container)
            .await
            .expect("runs"),
        "app-reader",
        "AWS CLI",
        &world,
    );
    let boto3 = world
        .boto3_identity_via(
            "web",
            podiam_tests::world::Boto3Mode::Default,
            Via::Container,
        )
        .await
        .expect("runs");
    let rust = world
        .rust_sdk_identity_via("worker", Via::Container)
        .await
        .expect("runs");
    for (what, identity, role) in [
        ("boto3", boto3, "app-reader"),
        ("Rust SDK", rust, "app-writer"),
    ] {
        let identity = identity
            .unwrap_or_else(|error| panic!("{what}: {error}\nagent log:\n{}", world.agent_log()));
        expect_role(Ok(identity.arn.clone()), role, what, &world);
        assert!(
            identity.remaining_secs >= MIN_LIFE_SECS,
            "{what}: only {} s left",
            identity.remaining_secs
        );
    }

    // Explain says how the pod is known now.
    let explained = explain_web(&world).await;
    assert!(
        explained.contains(
            "known by:    its address and its service account token (container credentials, 169.254.170.23)"
        ),
        "{explained}"
    );

    // Each SDK asked the container endpoint, none fell back to instance metadata.
    let metrics = world.agent_metrics().await.expect("metrics");
    let counted = |route: &str, status: u16| {
        let sample =
            format!("podiam_agent_requests_total{{route=\"{route}\",status=\"{status}\"}}");
        metric_value(&metrics, &sample)
    };
    assert!(counted("container-credentials", 200) >= 3, "{metrics}");
    assert_eq!(counted("credentials", 200), 0, "{metrics}");

    // The document itself: the EKS Pod Identity Agent's keys, JSON, UTC times ending in Z.
    // A new token, proven first (its first use may meet a busy machine's deadline).
    let token = pod_token(&world, "web");
    served(&world, "web", &token).await;
    let reply = fetch(&world, "web", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let content_type = reply
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_str());
    assert_eq!(content_type, Some("application/json"));
    let document: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    let keys: Vec<&str> = document
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "AccountId",
        "Expiration",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert_eq!(document["AccountId"], "123456789012");
    let expiration = document["Expiration"].as_str().expect("a string");
    assert!(
        expiration.ends_with('Z') && expiration.parse::<jiff::Timestamp>().is_ok(),
        "{expiration}"
    );

    // Anything but GET or HEAD of the one path is not served.
    let auth = [("Authorization", token.as_str())];
    let head = world
        .container_request("web", "HEAD", "/v1/credentials", &auth)
        .await
        .expect("answers");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    for (method, path, status) in [
        ("POST", "/v1/credentials", 405),
        ("GET", "/v1/credentials/", 404),
        ("GET", "/latest/meta-data/iam/security-credentials/", 404),
        ("GET", "/", 404),
    ] {
        let reply = world
            .container_request("web", method, path, &auth)
            .await
            .expect("answers");
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        assert!(!reply.body.contains("SecretAccessKey"), "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_do_not_prove_the_pod_get_nothing() {
    let world = World::start(world_config()).await.expect("world starts");
    // A pod of the same namespace and role on another node: its token is genuine.
    let mut remote = kube_emulator::pod(
        "team-a",
        "remote",
        "10.200.0.9",
        &[("iam.amazonaws.com/role", "app-reader")],
    );
    remote["spec"]["nodeName"] = serde_json::json!("node-2");
    world.emulator().create(remote).expect("remote pod");

    let web_token = pod_token(&world, "web");
    let expired = world
        .emulator()
        .mint_token(
            "team-a",
            "default",
            &[POD_TOKEN_AUDIENCE],
            std::time::SystemTime::now() - Duration::from_secs(3600),
            None,
        )
        .expect("an expired token");
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("no token", "web", None, 400, "no pod token"),
        (
            "an empty token",
            "web",
            Some(String::new()),
            400,
            "no pod token",
        ),
        (
            "not a token",
            "web",
            Some("stolen-secret".into()),
            400,
            "not a JWT",
        ),
        (
            "a Bearer scheme",
            "web",
            Some(format!("Bearer {web_token}")),
            400,
            "without a Bearer scheme",
        ),
        ("an expired token", "web", Some(expired), 400, "expired"),
        (
            "another pod's token, from a pod with a role of its own",
            "worker",
            Some(web_token.clone()),
            400,
            "pod-token-refused",
        ),
        (
            "a token for another audience",
            "web",
            Some(
                world
                    .mint_pod_token("team-a", "web", "sts.amazonaws.com", POD_TOKEN_LIFE)
                    .expect("token"),
            ),
            400,
            "pod-token-refused",
        ),
        (
            "a token of a pod on another node",
            "web",
            Some(pod_token(&world, "remote")),
            400,
            "pod-token-refused",
        ),
        (
            "its own token, from a pod without a role",
            "plain",
            Some(pod_token(&world, "plain")),
            404,
            "no-role",
        ),
        (
            "its own token, for a role the namespace does not permit",
            "greedy",
            Some(pod_token(&world, "greedy")),
            403,
            "role-not-permitted",
        ),
    ];
    for (what, pod, token, status, says) in cases {
        let reply = settled(&world, pod, token.as_deref()).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        assert!(reply.body.contains(says), "{what}: {}", reply.body);
        assert!(!reply.body.contains("SecretAccessKey"), "{what}");
    }
    // The agent's log names no token.
    let log = world.agent_log();
    assert!(
        !log.contains(&web_token[web_token.len() - 40..]),
        "a token in the agent's log"
    );
    // The pods' own tokens still work.
    served(&world, "web", &web_token).await;

    // A flood of made-up tokens (well-formed, unexpired), from one process as fast as it
    // can: each would cost a TokenReview, so an address gets a burst of 8 and then 2 a
    // second; the rest are 429. Its proven token is not held back.
    const FLOOD: &str = r#"
import base64, json, sys, time, urllib.request, urllib.error
exp = int(time.time()) + 3600
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
statuses = []
for n in range(40):
    claims = json.dumps({"exp": exp, "jti": "forged-%d" % n}).encode()
    payload = base64.urlsafe_b64encode(claims).decode().rstrip("=")
    request = urllib.request.Request("http://169.254.170.23/v1/credentials",
        headers={"Authorization": "eyJhbGciOiJSUzI1NiJ9.%s.c2ln" % payload})
    try:
        statuses.append(opener.open(request, timeout=5).status)
    except urllib.error.HTTPError as error:
        statuses.append(error.code)
print(json.dumps(statuses))
"#;
    let started = std::time::Instant::now();
    let output = world
        .pod_command("worker", "python3")
        .args(["-c", FLOOD])
        .output()
        .await
        .expect("python runs");
    let elapsed = started.elapsed().as_secs_f64();
    let statuses: Vec<u16> =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {output:?}"));
    // Refused after a review (400), or, on a busy machine, a review or call that missed the
    // agent's deadline (502–504): either way a token let through the limit, never served.
    let refused = statuses
        .iter()
        .filter(|s| matches!(**s, 400 | 502..=504))
        .count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(refused + limited, 40, "{statuses:?}");
    // At most the burst and what refilled while the flood ran.
    let allowed = 8 + (2.0 * elapsed).ceil() as usize;
    assert!(
        refused <= allowed,
        "{refused} refused in {elapsed:.1} s: {statuses:?}"
    );
    assert!(limited > 0 || elapsed > 16.0, "{statuses:?}");
    assert_eq!(fetch(&world, "web", Some(&web_token)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proven_token_stops_with_its_pod_and_its_role() {
    let mut world = World::start(world_config()).await.expect("world starts");
    let token = pod_token(&world, "web");
    served(&world, "web", &token).await;
    // Proven once, served from the agent's cache since.
    assert_eq!(fetch(&world, "web", Some(&token)).await.status, 200);

    // The pod deleted and created again under its name and address: a new UID. The old
    // pod's token, proven and cached a moment ago, gets nothing.
    world.recreate_pod("web").await.expect("recreated");
    wait_until(
        CHANGE_DEADLINE,
        "the old pod's token to be refused",
        || async { fetch(&world, "web", Some(&token)).await.status == 400 },
    )
    .await
    .expect("refused");
    let fresh = pod_token(&world, "web");
    served(&world, "web", &fresh).await;
    assert_eq!(
        fetch(&world, "web", Some(&token)).await.status,
        400,
        "still refused"
    );

    // Revoked with kubectl annotate: refused however proven the token is.
    set_pod_role(&world, "team-a", "web", None)
        .await
        .expect("annotate");
    wait_until(
        CHANGE_DEADLINE,
        "the revocation to reach the endpoint",
        || async { fetch(&world, "web", Some(&fresh)).await.status == 404 },
    )
    .await
    .expect("revoked");

    // Deleted outright, its token still unexpired: nobody is at the address any more.
    let worker_token = pod_token(&world, "worker");
    served(&world, "worker", &worker_token).await;
    world
        .emulator()
        .delete(Kind::Pod, Some("team-a"), "worker")
        .expect("deleted");
    wait_until(
        CHANGE_DEADLINE,
        "the deleted pod's token to be refused",
        || async { fetch(&world, "worker", Some(&worker_token)).await.status == 404 },
    )
    .await
    .expect("refused");

    // Fail closed: with the agent stopped nothing answers at 169.254.170.23.
    world.stop_agent().await.expect("stops");
    assert!(
        world
            .container_request(
                "web",
                "GET",
                "/v1/credentials",
                &[("Authorization", &fresh)]
            )
            .await
            .is_err(),
        "something answered with the agent stopped"
    );
}

/// A namespace labelled `podiam.io/pod-identity=required` with the real kubectl: its pods'
/// roles come with their tokens only. The metadata path refuses them — also once the agent
/// holds their credentials again from the container endpoint, so an address alone (a reused
/// IP, a request the pod was tricked into sending) gets nothing — and gives them again once
/// the label is taken back.
#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_that_requires_tokens_keeps_its_roles_off_the_metadata_path() {
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/app-reader";
    let world = World::start(world_config()).await.expect("world starts");
    world.wait_node_stream_synced().await.expect("synced");
    let imds = |path: &'static str| {
        let world = &world;
        async move {
            world
                .metadata_request("web", "GET", path, &[])
                .await
                .expect("the metadata path answers")
        }
    };
    let token = pod_token(&world, "web");
    // Both ways in while the namespace is `enabled`; the agent then holds web's credentials.
    wait_until(CHANGE_DEADLINE, "web's credentials both ways", || async {
        imds(CREDS).await.status == 200 && fetch(&world, "web", Some(&token)).await.status == 200
    })
    .await
    .expect("served");

    // Labels team-a `podiam.io/pod-identity=VALUE` with the real kubectl, then waits for
    // the metadata path to answer web's credentials with `status`.
    let relabel = |value: &'static str, status: u16, what: &'static str| {
        let world = &world;
        async move {
            let label = format!("podiam.io/pod-identity={value}");
            world
                .kubectl_ok(&["label", "namespace", "team-a", &label, "--overwrite"])
                .await
                .expect("labelled");
            wait_until(CHANGE_DEADLINE, what, || async {
                imds(CREDS).await.status == status
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    relabel("required", 403, "the metadata path to refuse web").await;
    for path in [CREDS, "/latest/meta-data/iam/security-credentials/"] {
        let refused = imds(path).await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
        assert!(
            refused.body.contains("token-required")
                && refused.body.contains("podiam.io/pod-identity=required")
                && !refused.body.contains("AccessKeyId"),
            "{path}: {}",
            refused.body
        );
    }
    assert!(
        world.boto3_caller_arn("web").await.expect("runs").is_err(),
        "boto3 on the metadata path got credentials"
    );
    // The token still opens the role, to the SDKs as to a plain request; the agent holds
    // the credentials again, and the address alone still gets none of them.
    served(&world, "web", &token).await;
    for path in [CREDS, "/latest/meta-data/iam/info"] {
        let refused = imds(path).await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
        assert!(!refused.body.contains("AccessKeyId"), "{}", refused.body);
    }
    expect_role(
        world
            .boto3_identity_via(
                "web",
                podiam_tests::world::Boto3Mode::Default,
                Via::Container,
            )
            .await
            .expect("runs")
            .map(|identity| identity.arn),
        "app-reader",
        "boto3 on the container endpoint",
        &world,
    );
    // Explain says how the pod is known.
    let explained = explain_web(&world).await;
    assert!(
        explained.contains("podiam.io/pod-identity=required: instance metadata refuses it"),
        "{explained}"
    );

    // Taken back to `enabled`: the address alone is enough again.
    relabel("enabled", 200, "the metadata path to serve web again").await;
}
