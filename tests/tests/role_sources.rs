//! Where a pod's role comes from, end to end with the real `kubectl`: its own
//! `iam.amazonaws.com/role`, else its ServiceAccount's, else its namespace's
//! `iam.amazonaws.com/default-role` — each still under the namespace's `permitted` regex —
//! granted and revoked one step at a time, as pods see it on both endpoints, and as
//! `kubectl iam explain` names it. Needs root.

use std::time::Instant;

use podiam_tests::fixtures::CREDS_PATH;
use podiam_tests::plugin::{iam, server_flags};
use podiam_tests::process::{CHANGE_DEADLINE, wait_until};
use podiam_tests::world::{BASE_ROLE_ARN, POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE, World, WorldConfig};

/// What the metadata endpoint lists for `pod`: its role's name, or the refusal's status and
/// reason.
async fn listed(world: &World, pod: &str) -> String {
    match world.metadata_request(pod, "GET", CREDS_PATH, &[]).await {
        Ok(reply) if reply.status == 200 => reply.body,
        Ok(reply) => {
            let reason = reply
                .body
                .strip_prefix("podiam: ")
                .and_then(|rest| rest.split(':').next())
                .unwrap_or("?")
                .to_string();
            format!("{} {reason}", reply.status)
        }
        Err(error) => format!("no answer: {error}"),
    }
}

async fn kubectl(world: &World, args: &[&str]) {
    world.kubectl_ok(args).await.expect("kubectl");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_roles_namespace_defaults_and_pod_overrides() {
    let world = World::start(WorldConfig {
        start_agent: true,
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod_as("team-a", "web", "web")
            .pod("team-a", "plain", None)
    })
    .await
    .expect("world starts");
    kubectl(&world, &["create", "serviceaccount", "web", "-n", "team-a"]).await;
    let annotate = |kind: &'static str, name: &'static str, value: &'static str| {
        let world = &world;
        async move {
            let mut args = vec!["annotate", kind, name, "--overwrite", value];
            if kind != "namespace" {
                args.extend(["-n", "team-a"]);
            }
            kubectl(world, &args).await;
        }
    };
    // (what is done with kubectl, what web and plain then list)
    type Step = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );
    let steps: &[Step] = &[
        (
            "serviceaccount",
            "web",
            "iam.amazonaws.com/role=app-web",
            "app-web",
            "404 no-role",
        ),
        (
            "namespace",
            "team-a",
            "iam.amazonaws.com/default-role=app-default",
            "app-web",
            "app-default",
        ),
        (
            "pod",
            "web",
            "iam.amazonaws.com/role=app-own",
            "app-own",
            "app-default",
        ),
        // Narrowed: the namespace's default is no longer permitted; neither is web's own.
        (
            "namespace",
            "team-a",
            "iam.amazonaws.com/permitted=app-web",
            "403 role-not-permitted",
            "403 role-not-permitted",
        ),
        // Each revoked in turn.
        (
            "pod",
            "web",
            "iam.amazonaws.com/role-",
            "app-web",
            "403 role-not-permitted",
        ),
        (
            "namespace",
            "team-a",
            "iam.amazonaws.com/permitted=app-.*",
            "app-web",
            "app-default",
        ),
        (
            "serviceaccount",
            "web",
            "iam.amazonaws.com/role-",
            "app-default",
            "app-default",
        ),
        (
            "namespace",
            "team-a",
            "iam.amazonaws.com/default-role-",
            "404 no-role",
            "404 no-role",
        ),
    ];
    for (kind, name, value, web, plain) in steps {
        annotate(kind, name, value).await;
        let started = Instant::now();
        let seen = wait_until(CHANGE_DEADLINE, "both pods to see the change", || async {
            listed(&world, "web").await == *web && listed(&world, "plain").await == *plain
        })
        .await;
        if seen.is_err() {
            panic!(
                "after `kubectl annotate {kind} {name} {value}`: web lists {:?} (want {web:?}), \
                 plain {:?} (want {plain:?})\nserver log:\n{}",
                listed(&world, "web").await,
                listed(&world, "plain").await,
                world.server_log()
            );
        }
        eprintln!(
            "kubectl annotate {kind} {name} {value}: seen by both pods in {} ms",
            started.elapsed().as_millis()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_names_where_the_role_comes_from_and_how_the_pod_is_known() {
    let world = World::start(WorldConfig {
        start_agent: true,
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod_as("team-a", "web", "web")
    })
    .await
    .expect("world starts");
    kubectl(&world, &["create", "serviceaccount", "web", "-n", "team-a"]).await;
    kubectl(
        &world,
        &[
            "annotate",
            "serviceaccount",
            "web",
            "-n",
            "team-a",
            "iam.amazonaws.com/role=app-web",
        ],
    )
    .await;
    wait_until(CHANGE_DEADLINE, "web to get its account's role", || async {
        listed(&world, "web").await == "app-web"
    })
    .await
    .expect("granted");
    // The same role through the container-credentials endpoint, with web's own token.
    let token = world
        .mint_pod_token("team-a", "web", POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE)
        .expect("token");
    // The role is new to the server: its first answer may wait for STS, so asked until it
    // comes (this test is about where the role comes from, not about a first fetch's time).
    let authorization = [("Authorization", token.as_str())];
    let ask = || world.container_request("web", "GET", "/v1/credentials", &authorization);
    let answered = wait_until(
        CHANGE_DEADLINE,
        "web's credentials by its token",
        || async { ask().await.is_ok_and(|reply| reply.status == 200) },
    )
    .await;
    if answered.is_err() {
        // The last answer, never a credentials body.
        let last = ask()
            .await
            .map(|r| (r.status, (r.status != 200).then_some(r.body)));
        panic!("no credentials by web's token: {last:?}");
    }

    let kubeconfig = world.admin_kubeconfig().expect("kubeconfig");
    let servers = server_flags(&world);
    let mut by_server = vec!["explain", "web", "-n", "team-a"];
    by_server.extend(servers.iter().map(String::as_str));
    let base = format!("--base-role-arn={BASE_ROLE_ARN}");
    let locally = ["explain", "web", "-n", "team-a", base.as_str()];
    for (how, args, answered) in [
        (
            "by a server",
            &by_server[..],
            "answered by: podiam server replica",
        ),
        ("locally", &locally[..], "answered by: computed locally"),
    ] {
        let run = iam(&kubeconfig, args).await.ok();
        for want in [
            "role:        app-web (arn:aws:iam::123456789012:role/app-web), from service account web's annotation\n",
            "known by:    its address (instance metadata, 169.254.169.254)\n",
            "decision:    allowed\n",
            answered,
        ] {
            assert!(
                run.stdout.contains(want),
                "{how}: {want:?} in:\n{}",
                run.stdout
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_role_annotation_names_the_role_of_pods_and_service_accounts() {
    // kube2iam's --iam-role-key: a cluster whose pods carry their role under another key.
    const KEY: &str = "example.com/iam-role";
    let world = World::start(WorldConfig {
        start_agent: true,
        server_args: vec!["--role-annotation".into(), KEY.into()],
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod_as("team-a", "web", "web")
            .pod("team-a", "plain", None)
    })
    .await
    .expect("world starts");
    kubectl(&world, &["create", "serviceaccount", "web", "-n", "team-a"]).await;
    let annotate = |kind: &'static str, name: &'static str, value: String| {
        let world = &world;
        async move {
            let args = [
                "annotate",
                kind,
                name,
                "--overwrite",
                &value,
                "-n",
                "team-a",
            ];
            kubectl(world, &args).await;
        }
    };
    // The usual key is not read: only the configured one names the role (the change under
    // the configured key comes after, so seeing it means the first was seen too).
    annotate("pod", "plain", "iam.amazonaws.com/role=app-reader".into()).await;
    annotate("pod", "plain", format!("{KEY}=app-writer")).await;
    wait_until(CHANGE_DEADLINE, "plain to list app-writer", || async {
        let now = listed(&world, "plain").await;
        assert_ne!(now, "app-reader", "the usual key was read");
        now == "app-writer"
    })
    .await
    .expect("plain's role");
    // And on a ServiceAccount.
    assert_eq!(listed(&world, "web").await, "404 no-role");
    annotate("serviceaccount", "web", format!("{KEY}=app-web")).await;
    wait_until(
        CHANGE_DEADLINE,
        "web to list its account's app-web",
        || async { listed(&world, "web").await == "app-web" },
    )
    .await
    .expect("web's role");
}
