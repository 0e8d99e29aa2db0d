//! The credential path end to end, with real parts: the real binaries, moto as STS, the
//! Kubernetes API emulator, the real `kubectl`, the real AWS CLI, boto3, the Rust SDK and the
//! Go SDKs (v1 and v2), pods as network namespaces and the agent's own iptables rules. Needs
//! root.
//!
//! Each test builds its own [`World`] (unique namespace names), so they run in parallel, and
//! everything is removed when the world drops, whether the test passed or not.

use podiam_tests::fixtures::{CREDS_PATH, set_pod_role, team_a};
use podiam_tests::netns::NODE_METADATA_BODY;
use podiam_tests::process::{CHANGE_DEADLINE, wait_for};
use podiam_tests::world::GoSdk;
use podiam_tests::world::World;

const ROLE_ARN_PREFIX: &str = "arn:aws:sts::123456789012:assumed-role/";

fn expect_assumed(result: Result<String, String>, role: &str, world: &World) {
    match result {
        Ok(arn) => assert!(
            arn.starts_with(&format!("{ROLE_ARN_PREFIX}{role}/")),
            "expected an assumed-role ARN for {role}, got {arn:?}"
        ),
        Err(error) => panic!(
            "expected credentials for {role}, got: {error}\nagent log:\n{}\nserver log:\n{}",
            world.agent_log(),
            world.server_log()
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_cli_gets_the_pods_role_only_through_the_agents_dnat_rule() {
    let mut world = World::start(team_a()).await.expect("world starts");

    // Before the agent has installed its rule, nothing answers at 169.254.169.254.
    let before = world.metadata_request("web", "GET", CREDS_PATH, &[]).await;
    assert!(
        before.is_err(),
        "no metadata service should answer without the rule: {before:?}"
    );
    assert!(world.aws_caller_arn("web").await.expect("runs").is_err());

    world.start_agent().await.expect("agent starts");
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(rules.contains("-N PODIAM"), "{rules}");
    assert!(
        rules.contains("-i podv+") && rules.contains("-j PODIAM"),
        "{rules}"
    );

    let arn = world.aws_caller_arn("web").await.expect("runs");
    expect_assumed(arn, "app-reader", &world);

    // The listing and the document are EC2's.
    let listing = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!((listing.status, listing.body.as_str()), (200, "app-reader"));
    let doc = world
        .metadata_request("web", "GET", &format!("{CREDS_PATH}app-reader"), &[])
        .await
        .expect("answers");
    assert_eq!(doc.status, 200, "{}", doc.body);
    let parsed: serde_json::Value = serde_json::from_str(&doc.body).expect("JSON");
    assert_eq!(parsed["Code"], "Success");
    assert_eq!(parsed["Type"], "AWS-HMAC");
    let expiration = parsed["Expiration"].as_str().expect("Expiration");
    assert_eq!(
        expiration.len(),
        "2026-01-01T00:00:00Z".len(),
        "{expiration}"
    );
    assert!(expiration.ends_with('Z'));

    // Taking the rule away (explicitly) makes the request fail again: the rule is what
    // carries it.
    let out = world.uninstall_agent_rules().await.expect("uninstall runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = world.metadata_request("web", "GET", CREDS_PATH, &[]).await;
    assert!(
        after.is_err(),
        "with the rule removed nothing should answer: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_the_rust_sdk_and_the_go_sdks_get_credentials_with_imdsv2_only() {
    // IMDSv2-only: a client that skipped the token PUT would be refused.
    let mut config = team_a();
    config.start_agent = true;
    config.agent_args = vec!["--require-token".into()];
    let world = World::start(config).await.expect("world starts");

    let v1 = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(
        v1.status, 401,
        "tokenless GET in IMDSv2-only mode: {}",
        v1.body
    );

    let token = world
        .metadata_request(
            "web",
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        )
        .await
        .expect("answers");
    assert_eq!(token.status, 200, "{}", token.body);
    assert_eq!(
        token.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("60")
    );
    let with_token = world
        .metadata_request(
            "web",
            "GET",
            CREDS_PATH,
            &[("X-aws-ec2-metadata-token", &token.body)],
        )
        .await
        .expect("answers");
    assert_eq!(
        (with_token.status, with_token.body.as_str()),
        (200, "app-reader")
    );
    the_extended_document_is_the_legacy_one_with_the_account(&world, &token.body).await;
    // A token is bound to its pod.
    let stolen = world
        .metadata_request(
            "plain",
            "GET",
            CREDS_PATH,
            &[("X-aws-ec2-metadata-token", &token.body)],
        )
        .await
        .expect("answers");
    assert_eq!(stolen.status, 401, "{}", stolen.body);
    let no_ttl = world
        .metadata_request("web", "PUT", "/latest/api/token", &[])
        .await
        .expect("answers");
    assert_eq!(no_ttl.status, 400);
    let forwarded = world
        .metadata_request(
            "web",
            "PUT",
            "/latest/api/token",
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-Forwarded-For", "10.0.0.1"),
            ],
        )
        .await
        .expect("answers");
    assert_eq!(forwarded.status, 403);

    every_sdk_gets_the_pods_role(&world).await;
}

/// boto3 (IMDSv2 only), the Rust SDK and the Go SDKs v1 and v2 in pod `web` get credentials
/// for its role, app-reader.
async fn every_sdk_gets_the_pods_role(world: &World) {
    let boto3 = world.boto3_caller_arn("web").await.expect("runs");
    expect_assumed(boto3, "app-reader", world);
    let rust = world.rust_sdk_caller_arn("web").await.expect("runs");
    expect_assumed(rust, "app-reader", world);
    for sdk in [GoSdk::V1, GoSdk::V2] {
        let go = world.go_sdk_identity("web", sdk).await.expect("runs");
        expect_assumed(go.map(|id| id.arn), "app-reader", world);
    }
}

/// What recent SDKs (Java v2, Go v2, Ruby, PHP; none this suite runs) ask first, through the
/// DNAT rule with the pod's IMDSv2 `token`: `…/security-credentials-extended/` lists the
/// pod's role, and its document is the legacy one's credentials and the role's account;
/// tokenless, refused alike.
async fn the_extended_document_is_the_legacy_one_with_the_account(world: &World, token: &str) {
    const EXTENDED: &str = "/latest/meta-data/iam/security-credentials-extended/";
    let with = [("X-aws-ec2-metadata-token", token)];
    let listing = world
        .metadata_request("web", "GET", EXTENDED, &with)
        .await
        .expect("answers");
    assert_eq!((listing.status, listing.body.as_str()), (200, "app-reader"));
    // The extended document both fetched (first) and from the agent's cache (after the
    // legacy one).
    let mut documents = Vec::new();
    for path in [EXTENDED, CREDS_PATH, EXTENDED] {
        let reply = world
            .metadata_request("web", "GET", &format!("{path}app-reader"), &with)
            .await
            .expect("answers");
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let document: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
        documents.push(document);
    }
    let legacy = &documents[1];
    assert!(legacy.get("AccountId").is_none(), "{legacy}");
    for extended in [&documents[0], &documents[2]] {
        assert_eq!(extended["AccountId"], "123456789012", "{extended}");
        for key in [
            "Code",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration",
        ] {
            assert_eq!(extended[key], legacy[key], "{key}");
        }
    }
    let tokenless = world
        .metadata_request("web", "GET", &format!("{EXTENDED}app-reader"), &[])
        .await
        .expect("answers");
    assert_eq!(tokenless.status, 401, "{}", tokenless.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_without_a_permitted_role_of_their_own_get_nothing() {
    let mut config = team_a();
    config.start_agent = true;
    let world = World::start(config).await.expect("world starts");

    // No annotation.
    let plain = world.aws_caller_arn("plain").await.expect("runs");
    assert!(
        plain
            .as_ref()
            .is_err_and(|e| e.contains("Unable to locate credentials")),
        "{plain:?}"
    );
    let listing = world
        .metadata_request("plain", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(listing.status, 404);
    assert!(listing.body.contains("no-role"), "{}", listing.body);

    // A role its namespace does not permit.
    let greedy = world.aws_caller_arn("greedy").await.expect("runs");
    assert!(greedy.is_err(), "{greedy:?}");
    let listing = world
        .metadata_request("greedy", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(listing.status, 403);
    assert!(
        listing.body.contains("role-not-permitted"),
        "{}",
        listing.body
    );
    let creds = world
        .metadata_request("greedy", "GET", &format!("{CREDS_PATH}admin"), &[])
        .await
        .expect("answers");
    assert_eq!(creds.status, 403, "{}", creds.body);
    assert!(!creds.body.contains("SecretAccessKey"));

    // Another role, asked for by name.
    for pod in ["web", "plain"] {
        let other = world
            .metadata_request(pod, "GET", &format!("{CREDS_PATH}app-writer"), &[])
            .await
            .expect("answers");
        assert!(
            matches!(other.status, 403 | 404),
            "{pod}: {} {}",
            other.status,
            other.body
        );
        assert!(
            !other.body.contains("SecretAccessKey"),
            "{pod}: {}",
            other.body
        );
    }

    // Everything outside the credential routes is denied.
    let user_data = world
        .metadata_request("web", "GET", "/latest/user-data", &[])
        .await
        .expect("answers");
    assert_eq!(user_data.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_annotate_grants_and_revokes() {
    let mut config = team_a();
    config.start_agent = true;
    let world = World::start(config).await.expect("world starts");
    assert!(world.aws_caller_arn("plain").await.expect("runs").is_err());

    world
        .kubectl_ok(&[
            "annotate",
            "pod",
            "plain",
            "-n",
            "team-a",
            "iam.amazonaws.com/role=app-writer",
        ])
        .await
        .expect("kubectl annotate");
    let granted = wait_for(CHANGE_DEADLINE, "the grant to reach pod plain", || async {
        world.aws_caller_arn("plain").await.ok()?.ok()
    })
    .await
    .expect("granted");
    assert!(
        granted.starts_with(&format!("{ROLE_ARN_PREFIX}app-writer/")),
        "{granted}"
    );

    set_pod_role(&world, "team-a", "web", None)
        .await
        .expect("kubectl annotate role-");
    wait_for(
        CHANGE_DEADLINE,
        "the revocation to reach pod web",
        || async {
            let reply = world
                .metadata_request("web", "GET", CREDS_PATH, &[])
                .await
                .ok()?;
            (reply.status == 404 && reply.body.contains("no-role")).then_some(())
        },
    )
    .await
    .expect("revoked");
    assert!(world.aws_caller_arn("web").await.expect("runs").is_err());

    // The namespace's rule is live too: narrowing it refuses the granted pod.
    world
        .kubectl_ok(&[
            "annotate",
            "namespace",
            "team-a",
            "--overwrite",
            "iam.amazonaws.com/permitted=app-reader",
        ])
        .await
        .expect("kubectl annotate namespace");
    wait_for(
        CHANGE_DEADLINE,
        "the narrowed namespace rule to refuse pod plain",
        || async {
            let reply = world
                .metadata_request("plain", "GET", CREDS_PATH, &[])
                .await
                .ok()?;
            (reply.status == 403).then_some(())
        },
    )
    .await
    .expect("refused after narrowing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_stop_fails_closed_and_only_uninstall_removes_the_rule() {
    let mut config = team_a();
    config.start_agent = true;
    config.fake_node_metadata = true;
    let mut world = World::start(config).await.expect("world starts");
    expect_assumed(
        world.aws_caller_arn("web").await.expect("runs"),
        "app-reader",
        &world,
    );

    world.stop_agent().await.expect("agent stops on SIGTERM");
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(
        rules.contains("-j PODIAM") && rules.contains("DNAT"),
        "rules must survive a stop:\n{rules}"
    );
    for path in [CREDS_PATH, "/latest/meta-data/", "/latest/user-data"] {
        let reply = world.metadata_request("web", "GET", path, &[]).await;
        match reply {
            Err(_) => {}
            Ok(reply) => panic!(
                "with the agent stopped, {path} answered {} {:?}",
                reply.status, reply.body
            ),
        }
    }
    assert!(world.aws_caller_arn("web").await.expect("runs").is_err());

    // An uninstall that cannot read the rules (no capabilities) says so and fails; it never
    // reports a removal it did not make.
    let agent = podiam_tests::world::binary("podiam-agent").expect("agent binary");
    let unprivileged = world
        .node()
        .netns()
        .command("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(agent)
        .arg("uninstall")
        .output()
        .await
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(!unprivileged.status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(
        world
            .node_nat_rules()
            .await
            .expect("rules")
            .contains("-j PODIAM"),
        "the rules are still there"
    );

    assert!(
        world.agent_token_key_file().exists(),
        "the agent kept its token keys on the node"
    );
    let rules = world
        .uninstall_and_read_rules()
        .await
        .expect("uninstall cleans up");
    assert!(
        !rules.contains("PODIAM"),
        "uninstall leaves nothing of ours:\n{rules}"
    );
    assert!(
        !world.agent_token_key_file().exists(),
        "uninstall removed the token key file"
    );
    // Proof that the stopped agent's rule was what kept the pod from the node's own service.
    let reply = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("node answers");
    assert_eq!(reply.body, NODE_METADATA_BODY);
    // Uninstalling twice is fine.
    let again = world.uninstall_agent_rules().await.expect("uninstall runs");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_agent_does_not_duplicate_its_rules() {
    let mut config = team_a();
    config.start_agent = true;
    let mut world = World::start(config).await.expect("world starts");
    let first = world.node_nat_rules().await.expect("rules");
    world.stop_agent().await.expect("stops");
    world.start_agent().await.expect("starts again");
    let second = world.node_nat_rules().await.expect("rules");
    assert_eq!(first, second, "a restart re-installs nothing twice");
    // One jump and one DNAT rule per intercepted address (metadata, container credentials).
    assert_eq!(second.matches("-j PODIAM").count(), 2, "{second}");
    assert_eq!(second.matches("-j DNAT").count(), 2, "{second}");
    expect_assumed(
        world.aws_caller_arn("web").await.expect("runs"),
        "app-reader",
        &world,
    );
}
