//! Node binding against the real server: a stolen agent key opens one node, not the cluster.
//!
//! Two nodes: `node-1` runs this world's real agent; `node-2` has an agent pod in the API
//! whose token a test client presents, as agent B. Every call here is made with a gRPC
//! client of the test's own (the project's generated stubs, not the agent), holding the
//! agent's client certificate, so what is refused is refused by the server itself. Operator
//! calls (Explain, Status) use users' own bearer tokens and RBAC. Needs root (the World's
//! node namespace).

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use podiam_proto::Reason;
use podiam_proto::v1::{
    ExplainRequest, GetCredentialsRequest, GetPodRoleRequest, NodeEvent, NodeReadyRequest, PodRef,
    StatusRequest, WatchNodeRequest, explain_request, node_event,
};
use podiam_tests::identity::{self, AGENT_AUDIENCE, Client};
use podiam_tests::kube_emulator::{Kind, pod};
use podiam_tests::process::{scratch_dir, wait_for, wait_until};
use podiam_tests::world::{NODE_NAME, World, WorldConfig, metric_value};
use serde_json::json;

const REMOTE_NODE: &str = "node-2";
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 9);
const WAIT: Duration = Duration::from_secs(15);

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// A world with pod `web` on node-1 (the real agent's, running when `agent`) and pod
/// `remote` on node-2, both with a permitted role.
async fn two_nodes(agent: bool) -> World {
    let world = World::start(WorldConfig {
        start_agent: agent,
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "web", Some("app-reader"))
    })
    .await
    .expect("world starts");
    add_remote_pod(&world);
    world
}

/// Pod `remote` on node-2, with a permitted role.
fn add_remote_pod(world: &World) {
    let mut remote = pod(
        "team-a",
        "remote",
        &REMOTE_IP.to_string(),
        &[("iam.amazonaws.com/role", "app-reader")],
    );
    remote["spec"]["nodeName"] = REMOTE_NODE.into();
    world.emulator().create(remote).expect("remote pod");
}

/// Agent B's token (its pod on node-2, created on first use).
fn token_of(world: &World, node: &str) -> String {
    identity::agent_token(world.emulator(), node, AGENT_AUDIENCE, in_an_hour())
        .expect("token")
        .0
}

fn agent_a_token(world: &World) -> String {
    std::fs::read_to_string(world.agent_token_file()).expect("agent A's token")
}

async fn credentials(client: &Client, ip: &str) -> Result<String, tonic::Status> {
    client
        .clone()
        .get_credentials(GetCredentialsRequest {
            ip: ip.into(),
            role_name: "app-reader".into(),
            node_name: String::new(),
            pod_token: String::new(),
        })
        .await
        .map(|answer| {
            let pod = answer.into_inner().pod.unwrap_or_default();
            format!("{}/{}", pod.namespace, pod.name)
        })
}

async fn pod_role(client: &Client, ip: &str) -> Result<String, tonic::Status> {
    client
        .clone()
        .get_pod_role(GetPodRoleRequest {
            ip: ip.into(),
            node_name: String::new(),
        })
        .await
        .map(|answer| answer.into_inner().role_name)
}

/// The pods a node stream for `node` carries until its snapshot is complete, or why it was
/// refused.
async fn node_stream(client: &Client, node: &str) -> Result<Vec<String>, tonic::Status> {
    let mut stream = client
        .clone()
        .watch_node(WatchNodeRequest {
            node_name: node.into(),
            agent_version: "test".into(),
        })
        .await?
        .into_inner();
    let mut pods = Vec::new();
    loop {
        let event: Option<NodeEvent> = tokio::time::timeout(WAIT, stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no snapshot"))??;
        match event.and_then(|e| e.event) {
            Some(node_event::Event::Upsert(state)) => {
                let pod = state.pod.unwrap_or_default();
                pods.push(format!("{}/{}", pod.namespace, pod.name));
            }
            Some(node_event::Event::Synced(_)) | None => break,
            _ => {}
        }
    }
    pods.sort();
    Ok(pods)
}

/// Agent B (node-2's agent, with its own token), once the server gives it its pod's
/// credentials: the server has seen the pod and proven the agent.
async fn agent_b_served(world: &World) -> Client {
    let agent_b = world
        .agent_client(world.server_addr(), Some(&token_of(world, REMOTE_NODE)))
        .await
        .expect("agent B");
    wait_until(WAIT, "agent B to get its pod's credentials", || {
        let agent_b = agent_b.clone();
        async move { credentials(&agent_b, &REMOTE_IP.to_string()).await.is_ok() }
    })
    .await
    .expect("agent B served");
    agent_b
}

/// `token` with one character in the middle of its signature changed (a character there
/// carries six whole bits: the signature's bytes change).
fn with_signature_changed(token: &str) -> String {
    let (head, signature) = token.rsplit_once('.').expect("a JWT");
    let mut signature: Vec<char> = signature.chars().collect();
    let middle = signature.len() / 2;
    signature[middle] = if signature[middle] == 'A' { 'B' } else { 'A' };
    format!("{head}.{}", signature.into_iter().collect::<String>())
}

/// `signed`'s header and signature around `claims`' payload: another agent's claims under
/// this one's signature.
fn with_claims_of(signed: &str, claims: &str) -> String {
    let parts: Vec<&str> = signed.split('.').collect();
    let payload = claims.split('.').nth(1).expect("a JWT");
    format!("{}.{payload}.{}", parts[0], parts[2])
}

/// Waits until `client`'s credentials for node-2's pod are refused for `why`.
async fn until_refused(client: &Client, why: Reason, what: &str) {
    wait_until(WAIT, &format!("{what} to be refused {why}"), || {
        let client = client.clone();
        async move {
            credentials(&client, &REMOTE_IP.to_string())
                .await
                .is_err_and(|s| reason(&s) == Some(why))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

fn reason(status: &tonic::Status) -> Option<Reason> {
    Reason::of(status)
}

fn refusals(metrics: &str, why: &str) -> u64 {
    metric_value(
        metrics,
        &format!("podiam_server_node_binding_refusals_total{{reason=\"{why}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_answered_only_about_its_own_node() {
    let world = two_nodes(false).await;
    let web_ip = world.pod("web").ip().to_string();
    let remote_ip = REMOTE_IP.to_string();
    let agent_a = world.server_client().await.expect("agent A");
    // Each agent gets its own node's pod once the server has seen both.
    let agent_b = agent_b_served(&world).await;
    assert_eq!(
        credentials(&agent_a, &web_ip).await.expect("A's own pod"),
        "team-a/web"
    );
    let before = world.server_metrics().await.expect("metrics");

    // Agent A, with a valid certificate and token, asks about node-2's pod in every way.
    let refused = credentials(&agent_a, &remote_ip)
        .await
        .expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::OtherNode), "{refused:?}");
    assert!(
        !refused.message().contains("remote"),
        "the refusal names nothing of the other node's pod: {}",
        refused.message()
    );
    let refused = pod_role(&agent_a, &remote_ip).await.expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::OtherNode), "{refused:?}");
    for node in [REMOTE_NODE, "", "made-up-node"] {
        let refused = node_stream(&agent_a, node).await.expect_err("refused");
        assert_eq!(
            reason(&refused),
            Some(Reason::OtherNode),
            "{node:?}: {refused:?}"
        );
    }
    // Its own node's stream carries its own node's pods only.
    assert_eq!(
        node_stream(&agent_a, NODE_NAME).await.expect("own stream"),
        vec!["team-a/web".to_string()]
    );
    // And B likewise the other way round.
    let refused = credentials(&agent_b, &web_ip).await.expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::OtherNode), "{refused:?}");
    assert_eq!(
        node_stream(&agent_b, REMOTE_NODE)
            .await
            .expect("own stream"),
        vec!["team-a/remote".to_string()]
    );

    // Counted, and audited with A's proven node and pod and its peer address.
    let after = world.server_metrics().await.expect("metrics");
    assert!(
        refusals(&after, "other-node") >= refusals(&before, "other-node") + 6,
        "{after}"
    );
    let log = world.server_log_text();
    let audit = log
        .lines()
        .find(|l| l.contains("agent asked about a pod on another node") && l.contains(&remote_ip))
        .unwrap_or_else(|| panic!("no audit line in:\n{log}"));
    assert!(
        audit.contains(&format!("agent_node={NODE_NAME}"))
            && audit.contains(&format!("podiam/{}", identity::agent_pod_name(NODE_NAME)))
            && audit.contains("peer=127.0.0.1:"),
        "{audit}"
    );

    // A's token presented by B's process (same certificate: there is one per cluster)
    // binds to node-1, whatever it claims.
    let a_token_b_process = world
        .agent_client(world.server_addr(), Some(&agent_a_token(&world)))
        .await
        .expect("client");
    let refused = node_stream(&a_token_b_process, REMOTE_NODE)
        .await
        .expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::OtherNode));
    let refused = credentials(&a_token_b_process, &remote_ip)
        .await
        .expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::OtherNode));
    assert_eq!(
        node_stream(&a_token_b_process, NODE_NAME)
            .await
            .expect("node-1's stream"),
        vec!["team-a/web".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_prove_no_agent_get_nothing() {
    let world = two_nodes(false).await;
    let remote_ip = REMOTE_IP.to_string();
    let emulator = world.emulator();
    // Well past the minute of clock skew API servers allow.
    let past = SystemTime::now() - Duration::from_secs(3600);
    let (expired, _) =
        identity::agent_token(emulator, REMOTE_NODE, AGENT_AUDIENCE, past).expect("token");
    let (wrong_audience, _) =
        identity::agent_token(emulator, REMOTE_NODE, "not-podiam", in_an_hour()).expect("token");
    let user_token = "a-user-token";
    emulator.add_user_token(user_token, "alice", &["developers"]);
    // A token of another ServiceAccount bound to a pod of its own on node-2.
    emulator
        .create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "intruder", "namespace": "team-a"}}))
        .expect("service account");
    let mut intruder_pod = pod("team-a", "intruder", "10.66.0.10", &[]);
    intruder_pod["spec"]["nodeName"] = REMOTE_NODE.into();
    intruder_pod["spec"]["serviceAccountName"] = "intruder".into();
    let intruder_pod = emulator.create(intruder_pod).expect("pod");
    let intruder = emulator
        .mint_token(
            "team-a",
            "intruder",
            &[AGENT_AUDIENCE],
            in_an_hour(),
            Some((
                "intruder",
                intruder_pod["metadata"]["uid"].as_str().expect("uid"),
            )),
        )
        .expect("token");
    let forged_signature = with_signature_changed(&token_of(&world, REMOTE_NODE));
    let forged_claims = with_claims_of(&agent_a_token(&world), &token_of(&world, REMOTE_NODE));

    let cases: [(&str, Option<&str>); 7] = [
        ("no token", None),
        ("an expired token", Some(&expired)),
        ("a token for another audience", Some(&wrong_audience)),
        ("a user's token", Some(user_token)),
        ("another ServiceAccount's pod token", Some(&intruder)),
        ("a token with a changed signature", Some(&forged_signature)),
        (
            "node-2's claims under node-1's signature",
            Some(&forged_claims),
        ),
    ];
    for (what, token) in cases {
        let client = world
            .agent_client(world.server_addr(), token)
            .await
            .expect("client");
        let refused = credentials(&client, &remote_ip).await.expect_err(what);
        assert_eq!(
            reason(&refused),
            Some(Reason::AgentUnauthenticated),
            "{what}: {refused:?}"
        );
        let refused = pod_role(&client, &remote_ip).await.expect_err(what);
        assert_eq!(
            reason(&refused),
            Some(Reason::AgentUnauthenticated),
            "{what}"
        );
        let refused = node_stream(&client, REMOTE_NODE).await.expect_err(what);
        assert_eq!(
            reason(&refused),
            Some(Reason::AgentUnauthenticated),
            "{what}"
        );
    }

    // A valid agent token without the agent's client certificate: refused too.
    let no_cert = world
        .operator_client(Some(&token_of(&world, REMOTE_NODE)))
        .await
        .expect("client");
    let refused = credentials(&no_cert, &remote_ip)
        .await
        .expect_err("refused");
    assert_eq!(reason(&refused), Some(Reason::AgentUnauthenticated));
    let metrics = world.server_metrics().await.expect("metrics");
    for why in ["no-token", "bad-token", "not-agent", "no-certificate"] {
        assert!(refusals(&metrics, why) >= 1, "{why}: {metrics}");
    }
    // Each refusal is counted; the log has the first of each reason from this address in
    // the minute, not 21 lines a caller could multiply at will.
    let counted: u64 = ["no-token", "bad-token", "not-agent"]
        .iter()
        .map(|why| refusals(&metrics, why))
        .sum();
    assert!(counted >= 21, "{metrics}");
    let log = world.server_log_text();
    let logged = log
        .lines()
        .filter(|l| l.contains("agent call not proven by node binding"))
        .count();
    assert!((1..=3).contains(&logged), "{logged} lines:\n{log}");

    // A deleted agent pod's token stops working at once, although its review is cached:
    // the server finds the pod gone from its own view.
    let node_3 = world
        .agent_client(world.server_addr(), Some(&token_of(&world, "node-3")))
        .await
        .expect("client");
    // Its pod was created a moment ago: the server waits for its watch to bring the pod
    // (up to 800 ms) rather than refuse a new agent's first call; a busy machine's watch may
    // take longer, so the proof is waited for here.
    until_refused(
        &node_3,
        Reason::OtherNode,
        "a new agent's token, proven first,",
    )
    .await;
    emulator
        .delete(
            Kind::Pod,
            Some(identity::PODIAM_NAMESPACE),
            &identity::agent_pod_name("node-3"),
        )
        .expect("deleted");
    until_refused(
        &node_3,
        Reason::AgentUnauthenticated,
        "the deleted agent's token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_down_keeps_known_agents_and_refuses_new_ones_until_it_is_back() {
    let world = two_nodes(false).await;
    let remote_ip = REMOTE_IP.to_string();
    let agent_b = agent_b_served(&world).await;
    // A new agent, on a new node: its token has never been reviewed.
    let newcomer = world
        .agent_client(world.server_addr(), Some(&token_of(&world, "node-5")))
        .await
        .expect("a new agent");

    world.emulator().set_token_review_down(true);
    let reviews = world.emulator().token_reviews();
    for _ in 0..5 {
        assert_eq!(
            credentials(&agent_b, &remote_ip)
                .await
                .expect("cached review"),
            "team-a/remote"
        );
    }
    let refused = credentials(&newcomer, &remote_ip)
        .await
        .expect_err("unavailable");
    assert_eq!(
        reason(&refused),
        Some(Reason::IdentityUnavailable),
        "{refused:?}"
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        world.emulator().token_reviews() > reviews,
        "the newcomer was reviewed"
    );
    let metrics = world.server_metrics().await.expect("metrics");
    assert!(refusals(&metrics, "review-unavailable") >= 1, "{metrics}");
    assert!(
        metric_value(
            &metrics,
            r#"podiam_server_token_reviews_total{result="error"}"#
        ) >= 1,
        "{metrics}"
    );

    // Back: the newcomer is proven (it is node-5's agent, so node-2's pod is another
    // node's) without anything restarted.
    world.emulator().set_token_review_down(false);
    until_refused(&newcomer, Reason::OtherNode, "the newcomer, proven").await;
}

fn explain_pod(namespace: &str, name: &str) -> ExplainRequest {
    ExplainRequest {
        target: Some(explain_request::Target::Pod(PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: String::new(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_and_status_are_for_operators_with_rbac() {
    let world = two_nodes(true).await;
    let emulator = world.emulator();
    // alice may get pods in team-a; bob may do nothing; carol may list pods everywhere.
    emulator.add_user_token("alice-token", "alice", &["developers"]);
    emulator.add_user_token("bob-token", "bob", &[]);
    emulator.add_user_token("carol-token", "carol", &["sre"]);
    emulator
        .create(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "podiam-operator"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"],
                       "verbs": ["get", "list"]}]}),
        )
        .expect("cluster role");
    emulator
        .create(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "alice-operates", "namespace": "team-a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "podiam-operator"},
            "subjects": [{"kind": "User", "name": "alice",
                          "apiGroup": "rbac.authorization.k8s.io"}]}),
        )
        .expect("role binding");
    emulator
        .create(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "sre-operates"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "podiam-operator"},
            "subjects": [{"kind": "Group", "name": "sre",
                          "apiGroup": "rbac.authorization.k8s.io"}]}),
        )
        .expect("cluster role binding");

    let alice = world
        .operator_client(Some("alice-token"))
        .await
        .expect("alice");
    let answer = wait_for(WAIT, "alice's explanation", || {
        let mut alice = alice.clone();
        async move {
            alice
                .explain(explain_pod("team-a", "web"))
                .await
                .ok()
                .map(|a| a.into_inner())
                .filter(|a| a.allowed)
        }
    })
    .await
    .expect("alice explains web");
    assert_eq!(answer.node_name, NODE_NAME);

    let bob = world.operator_client(Some("bob-token")).await.expect("bob");
    let refused = bob
        .clone()
        .explain(explain_pod("team-a", "web"))
        .await
        .expect_err("bob may not");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("get pods in namespace team-a"),
        "names the missing permission: {}",
        refused.message()
    );
    // Alice may not look into another namespace, nor list every agent.
    let refused = alice
        .clone()
        .explain(explain_pod("default", "web"))
        .await
        .expect_err("not her namespace");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = alice
        .clone()
        .status(StatusRequest {})
        .await
        .expect_err("status needs list pods cluster-wide");
    assert!(
        refused.message().contains("list pods cluster-wide"),
        "{}",
        refused.message()
    );
    let carol = world
        .operator_client(Some("carol-token"))
        .await
        .expect("carol");
    let status = wait_for(WAIT, "the agent's stream in the status", || {
        let mut carol = carol.clone();
        async move {
            let status = carol.status(StatusRequest {}).await.ok()?.into_inner();
            (!status.agents.is_empty()).then_some(status)
        }
    })
    .await
    .expect("carol sees the status");
    assert_eq!(status.agents[0].node_name, NODE_NAME);
    assert_eq!(
        status.agents[0].agent_pod,
        format!("podiam/{}", identity::agent_pod_name(NODE_NAME))
    );

    // No secret of anyone's reached a log line.
    let agent_token = agent_a_token(&world);
    for (log, whose) in [
        (world.server_log_text(), "the server's"),
        (world.agent_log_text(), "the agent's"),
    ] {
        for secret in [
            agent_token.as_str(),
            "alice-token",
            "bob-token",
            "carol-token",
        ] {
            assert!(!log.contains(secret), "{whose} log shows a token");
        }
        let signature = agent_token.rsplit('.').next().expect("a JWT");
        assert!(
            !log.contains(signature),
            "{whose} log shows a token's signature"
        );
    }

    // No token, and agents' tokens, get nothing from Explain or Status.
    let anonymous = world.operator_client(None).await.expect("anonymous");
    let refused = anonymous
        .clone()
        .explain(explain_pod("team-a", "web"))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    for client in [
        world
            .server_client()
            .await
            .expect("agent A with its certificate"),
        world
            .operator_client(Some(&agent_a_token(&world)))
            .await
            .expect("agent A's token alone"),
    ] {
        let refused = client
            .clone()
            .explain(explain_pod("team-a", "web"))
            .await
            .expect_err("agent token");
        assert!(
            matches!(
                refused.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ),
            "{refused:?}"
        );
        let refused = client
            .clone()
            .status(StatusRequest {})
            .await
            .expect_err("agent token");
        assert!(
            matches!(
                refused.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ),
            "{refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn warn_mode_answers_unproven_agents_and_counts_them() {
    let world = World::start(WorldConfig {
        server_args: vec!["--node-binding".into(), "warn".into()],
        ..WorldConfig::default().namespace("team-a", Some("app-.*"))
    })
    .await
    .expect("world starts");
    add_remote_pod(&world);
    assert!(
        world
            .server_log_text()
            .contains("node binding in WARN mode"),
        "the server says at start that it does not enforce"
    );
    // An agent of the old kind (certificate, no token), and node-1's agent asking about
    // node-2: both answered, both counted and logged.
    let tokenless = world
        .agent_client(world.server_addr(), None)
        .await
        .expect("client");
    let answered = wait_for(WAIT, "the tokenless agent to be answered", || {
        let tokenless = tokenless.clone();
        async move { credentials(&tokenless, &REMOTE_IP.to_string()).await.ok() }
    })
    .await
    .expect("answered in warn mode");
    assert_eq!(answered, "team-a/remote");
    let agent_a = world.server_client().await.expect("agent A");
    assert_eq!(
        credentials(&agent_a, &REMOTE_IP.to_string())
            .await
            .expect("answered in warn mode"),
        "team-a/remote"
    );
    let metrics = world.server_metrics().await.expect("metrics");
    assert!(refusals(&metrics, "no-token") >= 1, "{metrics}");
    assert!(refusals(&metrics, "other-node") >= 1, "{metrics}");
    let log = world.server_log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("agent asked about a pod on another node")
                && l.contains("answered=true")),
        "{log}"
    );
    // Without a client certificate, nothing is answered even in warn mode.
    let no_cert = world
        .operator_client(Some(&agent_a_token(&world)))
        .await
        .expect("client");
    let refused = credentials(&no_cert, &REMOTE_IP.to_string())
        .await
        .expect_err("a client certificate is always required");
    assert_eq!(reason(&refused), Some(Reason::AgentUnauthenticated));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agent_cannot_hold_more_than_a_few_node_streams() {
    let world = two_nodes(false).await;
    let agent_a = world.server_client().await.expect("agent A");
    // Streams held open, as a hostile holder of one node's key and token would.
    let mut held = Vec::new();
    for _ in 0..4 {
        let stream = agent_a
            .clone()
            .watch_node(WatchNodeRequest {
                node_name: NODE_NAME.into(),
                agent_version: "test".into(),
            })
            .await
            .expect("a stream within the cap")
            .into_inner();
        held.push(stream);
    }
    let refused = agent_a
        .clone()
        .watch_node(WatchNodeRequest {
            node_name: NODE_NAME.into(),
            agent_version: "x".repeat(10_000),
        })
        .await
        .expect_err("past the cap");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // Another node's agent is not affected, and a stream given back frees its slot.
    let agent_b = world
        .agent_client(world.server_addr(), Some(&token_of(&world, REMOTE_NODE)))
        .await
        .expect("agent B");
    // Its token's pod may be a moment from the server's view: asked until it is.
    wait_until(WAIT, "agent B's node stream", || {
        let agent_b = agent_b.clone();
        async move { node_stream(&agent_b, REMOTE_NODE).await.is_ok() }
    })
    .await
    .expect("agent B is not held to agent A's cap");
    drop(held.pop());
    wait_until(WAIT, "the slot to come back", || {
        let agent_a = agent_a.clone();
        async move { node_stream(&agent_a, NODE_NAME).await.is_ok() }
    })
    .await
    .expect("a slot again");
    // Status lists the streams with the agent version cut to size.
    let status = world
        .admin_client()
        .await
        .expect("admin")
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.agents_total >= 3, "{status:?}");
    assert!(status.agents.iter().all(|a| a.agent_version.len() <= 64));
}

// ---------------------------------------------------------------------------------------
// Fail closed from boot: the agent-not-ready taint

/// The taint nodes register with until their agent's rules are in place (the server's
/// default `--agent-not-ready-taint`).
const NOT_READY_TAINT: &str = "podiam.io/agent-not-ready";

/// A Node as the kubelet registers it with `--register-with-taints`.
fn node_object(name: &str, taints: &[&str]) -> serde_json::Value {
    let taints: Vec<serde_json::Value> = taints
        .iter()
        .map(|key| json!({"key": key, "value": "true", "effect": "NoExecute"}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"taints": taints},
    })
}

fn taint_keys(world: &World, node: &str) -> Vec<String> {
    let node = world.emulator().get(Kind::Node, None, node).expect("node");
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t["key"].as_str().expect("a taint key").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_booting_node_is_untainted_by_its_own_agent_only_once_its_rules_are_in_place() {
    // The node's iptables (and ip6tables, which the agent finds beside it), through
    // wrappers that fail while `broken` exists.
    let dir = scratch_dir("boot-taint").expect("dir");
    let broken = dir.join("broken");
    for program in ["iptables", "ip6tables"] {
        let wrapper = dir.join(program);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nif [ -e {} ]; then echo '{program}: broken for this test' >&2; exit 1; fi\nexec {program} \"$@\"\n",
                broken.display()
            ),
        )
        .expect("wrapper");
        let mut permissions = std::fs::metadata(&wrapper).expect("wrapper").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&wrapper, permissions).expect("chmod");
    }
    let wrapper = dir.join("iptables");
    let mut world = World::start(WorldConfig {
        start_agent: false,
        iptables_bin: Some(wrapper.to_str().expect("a UTF-8 path").to_string()),
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "web", Some("app-reader"))
    })
    .await
    .expect("world starts");
    // Both nodes registered with the taint (node-1 with another of its own); node-1 has just
    // booted: none of the agent's rules.
    for (name, taints) in [
        (NODE_NAME, &[NOT_READY_TAINT, "example.com/gpu"][..]),
        (REMOTE_NODE, &[NOT_READY_TAINT][..]),
    ] {
        world
            .emulator()
            .create(node_object(name, taints))
            .expect("node");
    }
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(!rules.contains("PODIAM"), "{rules}");

    // Nobody but node-1's agent lifts node-1's taint: not node-2's agent (its token proves
    // node-2), not a caller with the agent key and no token.
    let other = world
        .agent_client(world.server_addr(), Some(&token_of(&world, REMOTE_NODE)))
        .await
        .expect("client");
    // Its token's pod may be a moment from the server's view (refused as unproven until
    // then): asked until it is proven, and refused as another node's.
    wait_until(
        WAIT,
        "node-2's agent to be refused as another node's",
        || {
            let mut other = other.clone();
            async move {
                match other
                    .node_ready(NodeReadyRequest {
                        node_name: NODE_NAME.into(),
                    })
                    .await
                {
                    Ok(lifted) => panic!("node-2's agent lifted node-1's taint: {lifted:?}"),
                    Err(refused) => reason(&refused) == Some(Reason::OtherNode),
                }
            }
        },
    )
    .await
    .expect("refused");
    let tokenless = world
        .agent_client(world.server_addr(), None)
        .await
        .expect("client");
    tokenless
        .clone()
        .node_ready(NodeReadyRequest {
            node_name: NODE_NAME.into(),
        })
        .await
        .expect_err("no token, no node");

    // An agent that cannot install its rules exits without a word to the servers.
    std::fs::write(&broken, "").expect("break iptables");
    let (status, log) = world
        .run_failing_agent(WAIT)
        .await
        .expect("the agent exits");
    assert!(!status.success(), "{log}");
    assert!(log.contains("installing the iptables rules"), "{log}");
    assert_eq!(
        taint_keys(&world, NODE_NAME),
        [NOT_READY_TAINT, "example.com/gpu"]
    );

    // With iptables working the agent installs its rules, then reports them: the taint is
    // lifted, and by then the rules are there.
    std::fs::remove_file(&broken).expect("mend iptables");
    world.start_agent().await.expect("agent starts");
    wait_until(WAIT, "node-1's taint to be lifted", || async {
        !taint_keys(&world, NODE_NAME).contains(&NOT_READY_TAINT.to_string())
    })
    .await
    .expect("untainted");
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(rules.contains("-j PODIAM"), "{rules}");
    // Only that taint, only that node.
    assert_eq!(taint_keys(&world, NODE_NAME), ["example.com/gpu"]);
    assert_eq!(taint_keys(&world, REMOTE_NODE), [NOT_READY_TAINT]);
    // Counted once the API has answered the removal, which may be just after it shows.
    let removed = |m: &str| metric_value(m, "podiam_server_node_taints_removed_total");
    wait_until(WAIT, "the removal counted", || async {
        world.server_metrics().await.is_ok_and(|m| removed(&m) >= 1)
    })
    .await
    .expect("counted");
    let metrics = world.server_metrics().await.expect("metrics");
    assert_eq!(removed(&metrics), 1);
    // And node-1's agent serves its pod.
    let reply = world
        .metadata_request(
            "web",
            "GET",
            "/latest/meta-data/iam/security-credentials/app-reader",
            &[],
        )
        .await
        .expect("answers");
    assert_eq!(reply.status, 200);
}
