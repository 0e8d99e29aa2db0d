//! `kubectl iam`, the real `kubectl-iam` binary (and once through the real `kubectl`),
//! against the Kubernetes API emulator and running podiam servers and an agent.
//!
//! - grant / revoke / permit: the objects read back, and the server's decision changing;
//!   what is refused is not written.
//! - explain: through a server, and computed locally (no `--server`; an unreachable one),
//!   the same decision for each kind of case.
//! - status: replicas' versions, the agent's node stream, podiam's pods from the API; the
//!   exit code scripts rely on.
//!
//! Needs root (the [`World`]'s node namespace); `plugin_usage.rs` holds what needs only the
//! emulator.
//! Build the binaries first (`cargo build --workspace --bins`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use podiam_proto::v1::{ExplainRequest, ExplainResponse, PodRef, explain_request};
use podiam_tests::kube_emulator::{Kind, pod};
use podiam_tests::plugin::{iam, plugin, run_program, server_flags};
use podiam_tests::process::{wait_for, wait_until};
use podiam_tests::world::{BASE_ROLE_ARN, NODE_NAME, World, WorldConfig};
use serde_json::{Value, json};

const ROLE: &str = "iam.amazonaws.com/role";
const PERMITTED: &str = "iam.amazonaws.com/permitted";
/// How long the server may take to see a change (its watch); polled, not slept.
const SEEN_WITHIN: Duration = Duration::from_secs(15);

fn with<'a>(args: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    args.iter()
        .copied()
        .chain(more.iter().map(String::as_str))
        .collect()
}

/// The server's own Explain of `namespace/name`.
async fn server_explain(
    client: &podiam_tests::identity::Client,
    namespace: &str,
    name: &str,
) -> ExplainResponse {
    client
        .clone()
        .explain(ExplainRequest {
            target: Some(explain_request::Target::Pod(PodRef {
                namespace: namespace.into(),
                name: name.into(),
                uid: String::new(),
            })),
        })
        .await
        .expect("the server explains")
        .into_inner()
}

/// Waits until the server's decision for `namespace/name` has `reason` ("" = allowed).
async fn server_decides(
    client: &podiam_tests::identity::Client,
    namespace: &str,
    name: &str,
    reason: &str,
) {
    let decided = wait_until(
        SEEN_WITHIN,
        &format!("{namespace}/{name}: {reason:?}"),
        || async {
            let answer = server_explain(client, namespace, name).await;
            reason_name(answer.reason) == reason && answer.allowed == reason.is_empty()
        },
    )
    .await;
    if decided.is_err() {
        panic!(
            "the server's decision for {namespace}/{name} is not {reason:?}: {:?}",
            server_explain(client, namespace, name).await
        );
    }
}

fn annotation(object: &Value, key: &str) -> Option<String> {
    object["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

/// A pod of podiam's own in the emulator: `app.kubernetes.io/name` = `component`, on
/// `node`, with `ip`, Ready or not, its container's args.
fn podiam_pod(
    component: &str,
    name: &str,
    node: &str,
    ip: &str,
    ready: bool,
    args: &[&str],
) -> Value {
    let mut object = pod("podiam", name, ip, &[]);
    object["metadata"]["labels"]["app.kubernetes.io/name"] = json!(component);
    object["spec"]["nodeName"] = json!(node);
    object["spec"]["containers"][0]["image"] = json!(format!("registry.invalid/{component}:0.1.0"));
    object["spec"]["containers"][0]["args"] = json!(args);
    object["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
    object
}

#[tokio::test(flavor = "multi_thread")]
async fn grant_revoke_and_permit_change_the_objects_and_the_servers_decision() {
    let world = World::start(WorldConfig::default().namespace("team-a", Some("app-.*")))
        .await
        .expect("world starts");
    let emulator = world.emulator();
    emulator
        .create(pod("team-a", "web", "10.99.0.1", &[]))
        .expect("pod");
    emulator
        .create(pod("default", "plain", "10.99.0.2", &[]))
        .expect("pod");
    let client = world.admin_client().await.expect("admin client");
    let admin_kubeconfig = world.admin_kubeconfig().expect("kubeconfig");
    let kubeconfig = admin_kubeconfig.as_path();
    let read_pod = |ns: &str, name: &str| emulator.get(Kind::Pod, Some(ns), name).expect("pod");
    let read_ns = |name: &str| emulator.get(Kind::Namespace, None, name).expect("ns");
    server_decides(&client, "team-a", "web", "no-role").await;

    // Through the real kubectl: an executable kubectl-iam on the PATH is `kubectl iam`.
    let bin_dir = plugin().parent().expect("bin dir").display().to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let kubectl = std::env::var("PODIAM_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let kubectl = which(&kubectl, &path);
    let granted = run_program(
        &kubectl,
        &["iam", "grant", "web", "app-reader", "-n", "team-a"],
        kubeconfig,
        Some(&path),
    )
    .await
    .ok();
    assert_eq!(granted.stdout, "pod team-a/web: role app-reader granted\n");
    assert_eq!(granted.stderr, "", "a permitted role: no warning");
    assert_eq!(
        annotation(&read_pod("team-a", "web"), ROLE).as_deref(),
        Some("app-reader")
    );
    server_decides(&client, "team-a", "web", "").await;
    let help = run_program(&kubectl, &["iam", "--help"], kubeconfig, Some(&path))
        .await
        .ok();
    assert!(help.stdout.contains("Usage: kubectl iam"), "{help:?}");

    // A role the namespace does not permit: granted, with a warning saying why.
    let granted = iam(
        kubeconfig,
        &["grant", "pod/web", "db-admin", "-n", "team-a"],
    )
    .await
    .ok();
    assert!(
        granted.stderr.contains(
            "warning: namespace team-a does not permit role db-admin: the role does not match \"app-.*\""
        ),
        "{granted:?}"
    );
    assert_eq!(
        annotation(&read_pod("team-a", "web"), ROLE).as_deref(),
        Some("db-admin")
    );
    server_decides(&client, "team-a", "web", "role-not-permitted").await;

    // An invalid regex is refused and nothing is written.
    let refused = iam(kubeconfig, &["permit", "team-a", "app-("]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert_eq!(refused.stdout, "");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .starts_with("kubectl-iam: regex \"app-(\" is invalid (")
            && refused.stderr.contains("namespace team-a was not changed"),
        "{refused:?}"
    );
    let too_long = "a".repeat(4097);
    assert_eq!(
        iam(kubeconfig, &["permit", "team-a", &too_long]).await.code,
        1
    );
    assert_eq!(iam(kubeconfig, &["permit", "team-a", " "]).await.code, 1);
    assert_eq!(
        annotation(&read_ns("team-a"), PERMITTED).as_deref(),
        Some("app-.*")
    );

    // Permitting the role lets the server give it.
    let permitted = iam(kubeconfig, &["permit", "ns/team-a", "app-.*|db-.*"])
        .await
        .ok();
    assert!(
        permitted
            .stdout
            .contains("namespace team-a: roles matching \"app-.*|db-.*\" permitted")
    );
    assert_eq!(
        annotation(&read_ns("team-a"), PERMITTED).as_deref(),
        Some("app-.*|db-.*")
    );
    server_decides(&client, "team-a", "web", "").await;

    // Revoking removes the annotation; the server refuses from then on.
    let revoked = iam(kubeconfig, &["revoke", "web", "--namespace", "team-a"])
        .await
        .ok();
    assert_eq!(revoked.stdout, "pod team-a/web: role db-admin revoked\n");
    assert_eq!(annotation(&read_pod("team-a", "web"), ROLE), None);
    server_decides(&client, "team-a", "web", "no-role").await;
    let again = iam(kubeconfig, &["revoke", "web", "-n", "team-a"])
        .await
        .ok();
    assert!(again.stdout.contains("has no role"), "{again:?}");

    // A malformed role is refused and nothing is written; a missing pod is an error.
    let malformed = iam(kubeconfig, &["grant", "web", "bad name", "-n", "team-a"]).await;
    assert_eq!(malformed.code, 1, "{malformed:?}");
    assert!(
        malformed.stderr.contains("not a valid role name"),
        "{malformed:?}"
    );
    let arn = iam(
        kubeconfig,
        &["grant", "web", "arn:aws:s3:::bucket", "-n", "team-a"],
    )
    .await;
    assert_eq!(arn.code, 1, "{arn:?}");
    assert_eq!(annotation(&read_pod("team-a", "web"), ROLE), None);
    let missing = iam(
        kubeconfig,
        &["grant", "missing", "app-reader", "-n", "team-a"],
    )
    .await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(
        missing.stderr,
        "kubectl-iam: pod team-a/missing not found\n"
    );

    // The namespace comes from the context when -n is not given; --context chooses one.
    iam(
        kubeconfig,
        &[
            "grant",
            "plain",
            "app-reader",
            "--context",
            "podiam-emulator",
        ],
    )
    .await
    .ok();
    assert_eq!(
        annotation(&read_pod("default", "plain"), ROLE).as_deref(),
        Some("app-reader")
    );
    let no_context = iam(kubeconfig, &["revoke", "plain", "--context", "nowhere"]).await;
    assert_eq!(no_context.code, 1, "{no_context:?}");
    assert_eq!(
        annotation(&read_pod("default", "plain"), ROLE).as_deref(),
        Some("app-reader")
    );
}

/// `program` as found on `path` (kubectl looks plugins up on the PATH it is given, so it is
/// run with that PATH).
fn which(program: &str, path: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{program} is not on the PATH"))
}

/// The fields both ways of explaining must agree on.
fn decision(explanation: &Value) -> Value {
    let mut decision = serde_json::Map::new();
    for key in [
        "pod",
        "pods",
        "node",
        "ip",
        "namespace",
        "role_annotation",
        "role_arn",
        "permitted_regex",
        "allowed",
        "reason",
        "message",
    ] {
        decision.insert(key.into(), explanation[key].clone());
    }
    Value::Object(decision)
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_through_a_server_and_locally_gives_the_same_decision() {
    let world = World::start(
        WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .namespace("team-b", Some("app-("))
            .namespace("podiam", None),
    )
    .await
    .expect("world starts");
    let emulator = world.emulator();
    // The server pod carries the base ARN the local explanation needs for role names.
    let base_flag = format!("--base-role-arn={BASE_ROLE_ARN}");
    emulator
        .create(podiam_pod(
            "podiam-server",
            "podiam-server-0",
            "cp-1",
            "10.98.0.1",
            true,
            &["--listen=0.0.0.0:8443", &base_flag],
        ))
        .expect("server pod");
    let pods: &[(&str, &str, &str, Option<&str>)] = &[
        ("team-a", "allowed", "10.99.1.1", Some("app-reader")),
        ("team-a", "forbidden", "10.99.1.2", Some("db-admin")),
        ("team-a", "no-role", "10.99.1.3", None),
        ("team-a", "malformed", "10.99.1.4", Some("bad name")),
        ("team-a", "dup-a", "10.99.1.5", Some("app-reader")),
        ("team-b", "dup-b", "10.99.1.5", None),
        ("team-b", "bad-regex", "10.99.1.6", Some("app-reader")),
        (
            "team-a",
            "other-account",
            "10.99.1.7",
            Some("arn:aws:iam::999999999999:role/app-x"),
        ),
        ("team-a", "by-path", "10.99.1.8", Some("team/app-y")),
    ];
    for (ns, name, ip, role) in pods {
        let annotations: Vec<(&str, &str)> = role.iter().map(|r| (ROLE, *r)).collect();
        emulator
            .create(pod(ns, name, ip, &annotations))
            .expect("pod");
    }
    let cases: &[(&str, &str, &str)] = &[
        ("team-a", "allowed", ""),
        ("team-a", "forbidden", "role-not-permitted"),
        ("team-a", "no-role", "no-role"),
        ("team-a", "malformed", "invalid-role"),
        ("team-a", "dup-a", "ambiguous-pod"),
        ("team-b", "bad-regex", "role-not-permitted"),
        ("team-a", "other-account", "role-not-permitted"),
        ("team-a", "by-path", "role-not-permitted"),
        ("team-a", "missing", "unknown-pod"),
    ];
    let client = world.admin_client().await.expect("admin client");
    for (ns, name, reason) in cases {
        server_decides(&client, ns, name, reason).await;
    }
    let admin_kubeconfig = world.admin_kubeconfig().expect("kubeconfig");
    let kubeconfig = admin_kubeconfig.as_path();
    let servers = server_flags(&world);
    for (ns, name, reason) in cases {
        let by_server = iam(
            kubeconfig,
            &with(&["explain", name, "-n", ns, "-o", "json"], &servers),
        )
        .await
        .ok()
        .json();
        assert_eq!(by_server["source"], "server", "{by_server}");
        assert_eq!(by_server["reason"], *reason, "{by_server}");
        let locally = iam(kubeconfig, &["explain", name, "-n", ns, "-o", "json"])
            .await
            .ok()
            .json();
        assert_eq!(locally["source"], "local", "{locally}");
        assert_eq!(decision(&locally), decision(&by_server), "{ns}/{name}");
        // The base ARN came from the server pod, and said so where it mattered.
        let notes = locally["notes"].to_string();
        assert!(!notes.contains("unknown here"), "{notes}");
    }
    let allowed = iam(
        kubeconfig,
        &["explain", "allowed", "-n", "team-a", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        allowed["role_arn"],
        format!("{BASE_ROLE_ARN}app-reader"),
        "{allowed}"
    );
    assert!(
        allowed["notes"]
            .to_string()
            .contains("server pod podiam-server-0")
    );

    // An unreachable server: the same decision, computed locally, within the deadline.
    let started = Instant::now();
    let unreachable = iam(
        kubeconfig,
        &[
            "explain",
            "forbidden",
            "-n",
            "team-a",
            "-o",
            "json",
            "--server",
            "https://127.0.0.1:1",
            "--server-timeout",
            "2s",
            "--tls-ca",
            &world.certs().ca_cert.display().to_string(),
        ],
    )
    .await
    .ok()
    .json();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(unreachable["source"], "local");
    assert!(
        unreachable["answered_by"]
            .as_str()
            .is_some_and(|by| by.contains("no server at https://127.0.0.1:1 answered")),
        "{unreachable}"
    );
    let by_server = iam(
        kubeconfig,
        &with(
            &["explain", "forbidden", "-n", "team-a", "-o", "json"],
            &servers,
        ),
    )
    .await
    .ok()
    .json();
    assert_eq!(decision(&unreachable), decision(&by_server));

    // In text, for people: which way it was made, and why.
    let text = iam(kubeconfig, &["explain", "forbidden", "-n", "team-a"])
        .await
        .ok();
    for want in [
        "pod:         team-a/forbidden\n",
        "node:        node-1\n",
        "ip:          10.99.1.2\n",
        "role:        db-admin (arn:aws:iam::123456789012:role/db-admin), from the pod's annotation\n",
        "decision:    refused (role-not-permitted)\n",
        "computed locally from the Kubernetes API",
        "without a server (no --server given)",
    ] {
        assert!(text.stdout.contains(want), "{want:?} in:\n{}", text.stdout);
    }
    let text = iam(
        kubeconfig,
        &with(&["explain", "allowed", "-n", "team-a"], &servers),
    )
    .await
    .ok();
    assert!(
        text.stdout.contains("decision:    allowed\n"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains(&format!(
            "answered by: podiam server replica {}",
            world.server_addr()
        )),
        "{}",
        text.stdout
    );

    // --base-role-arn wins; without any base ARN, names are judged under a placeholder and
    // the answer says so.
    let other_base = iam(
        kubeconfig,
        &[
            "explain",
            "allowed",
            "-n",
            "team-a",
            "-o",
            "json",
            "--base-role-arn",
            "arn:aws:iam::111111111111:role/",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        other_base["role_arn"],
        "arn:aws:iam::111111111111:role/app-reader"
    );
    let unknown_base = iam(
        kubeconfig,
        &[
            "explain",
            "allowed",
            "-n",
            "team-a",
            "-o",
            "json",
            "--podiam-namespace",
            "nowhere",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(unknown_base["allowed"], true, "{unknown_base}");
    assert!(
        unknown_base["notes"]
            .to_string()
            .contains("base role ARN is unknown here"),
        "{unknown_base}"
    );
    let bad_base = iam(
        kubeconfig,
        &["explain", "allowed", "--base-role-arn", "nope"],
    )
    .await;
    assert_eq!(bad_base.code, 2, "{bad_base:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_replicas_agents_and_podiams_pods() {
    let world = World::start(WorldConfig {
        servers: 2,
        start_agent: true,
        ..WorldConfig::default().namespace("podiam", None)
    })
    .await
    .expect("world starts");
    let emulator = world.emulator();
    // Servers on the host network: a replica dialled directly has its pod's IP.
    for object in [
        podiam_pod(
            "podiam-server",
            "podiam-server-a",
            "cp-1",
            "127.0.0.1",
            true,
            &[],
        ),
        podiam_pod(
            "podiam-server",
            "podiam-server-b",
            "cp-2",
            "10.98.0.2",
            true,
            &[],
        ),
        podiam_pod(
            "podiam-agent",
            "podiam-agent-x1",
            NODE_NAME,
            "10.98.1.1",
            true,
            &[],
        ),
        podiam_pod(
            "podiam-agent",
            "podiam-agent-x2",
            "node-2",
            "10.98.1.2",
            true,
            &[],
        ),
    ] {
        emulator.create(object).expect("podiam pod");
    }
    let admin_kubeconfig = world.admin_kubeconfig().expect("kubeconfig");
    let kubeconfig = admin_kubeconfig.as_path();
    let servers = server_flags(&world);
    let version = env!("CARGO_PKG_VERSION");

    let report = wait_for(SEEN_WITHIN, "the agent's node stream in status", || async {
        let run = iam(kubeconfig, &with(&["status", "-o", "json"], &servers)).await;
        let report = run.json();
        let streams = report["servers"]["streams"].as_array()?;
        // One stream, as a moment later: not the old one still closing beside its successor.
        (run.code == 0 && streams.len() == 1).then_some(report)
    })
    .await
    .expect("the agent registers");
    assert_eq!(report["ready"], true, "{report}");
    assert_eq!(
        report["summary"], "2 of 2 server replicas ready",
        "{report}"
    );
    let replicas = report["servers"]["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{report}");
    for replica in replicas {
        assert_eq!(replica["version"], version, "{replica}");
        assert_eq!(replica["synced"], true);
        assert_eq!(replica["draining"], false);
        assert_eq!(
            replica["pod"], "podiam-server-a",
            "matched by IP: {replica}"
        );
        assert!(
            replica["namespaces"].as_u64().is_some_and(|n| n >= 3),
            "{replica}"
        );
    }
    let streams = report["servers"]["streams"].as_array().expect("streams");
    assert_eq!(streams.len(), 1, "{report}");
    assert_eq!(streams[0]["node"], NODE_NAME);
    assert_eq!(streams[0]["agent_version"], version);
    let names = |listing: &Value| -> Vec<String> {
        listing["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        names(&report["server_pods"]),
        ["podiam-server-a", "podiam-server-b"]
    );
    // The world's own agent pod (its token is bound to it) and the two made here.
    assert_eq!(
        names(&report["agent_pods"]),
        ["podiam-agent-node-1", "podiam-agent-x1", "podiam-agent-x2"]
    );
    assert_eq!(report["agent_pods"]["pods"][1]["node"], NODE_NAME);
    assert_eq!(report["agent_pods"]["pods"][1]["ready"], true);
    assert_eq!(
        report["agent_pods"]["pods"][1]["images"][0],
        "registry.invalid/podiam-agent:0.1.0"
    );

    // In text: each replica, and each node's agent with its stream (or none).
    let text = iam(kubeconfig, &with(&["status"], &servers))
        .await
        .ok()
        .stdout;
    let row = |start: &str| -> String {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row {start:?} in:\n{text}"))
    };
    let first = world.replicas()[0].addr;
    assert!(
        row(&first.to_string()).contains(&format!("podiam-server-a {version}")),
        "{text}"
    );
    assert!(row(&first.to_string()).ends_with(" ready"), "{text}");
    // The node's stream is shown beside the agent pod its token proved.
    let node_1 = row(&format!("{NODE_NAME} podiam-agent-node-1"));
    assert!(
        node_1.starts_with(&format!(
            "{NODE_NAME} podiam-agent-node-1 Running yes registry.invalid/podiam-agent:test {version} 127.0.0.1:"
        )),
        "{text}"
    );
    assert!(
        row("node-2 podiam-agent-x2").ends_with(" none none -"),
        "an agent no server hears from:\n{text}"
    );
    assert!(text.ends_with("\n2 of 2 server replicas ready\n"), "{text}");

    // Without --server: the pods' Ready conditions decide.
    let from_api = iam(kubeconfig, &["status"]).await.ok();
    assert!(
        from_api.stdout.contains("Server replicas: not asked"),
        "{from_api:?}"
    );
    assert!(
        from_api
            .stdout
            .contains("2 of 2 server pods in podiam are Ready")
    );

    // No replica answering is a failure scripts can see, with the reason.
    let certs = world.certs();
    let unreachable = iam(
        kubeconfig,
        &[
            "status",
            "--server",
            "https://127.0.0.1:1",
            "--server-timeout",
            "2s",
            "--tls-ca",
            &certs.ca_cert.display().to_string(),
        ],
    )
    .await;
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(
        unreachable.stderr.starts_with(
            "kubectl-iam: no podiam server replica is ready: none of the replicas at https://127.0.0.1:1 is ready (127.0.0.1:1: "
        ) && unreachable.stderr.contains("are they reachable from here?"),
        "{unreachable:?}"
    );
    for name in ["podiam-server-a", "podiam-server-b"] {
        emulator
            .update(Kind::Pod, Some("podiam"), name, |pod| {
                pod["status"]["conditions"][0]["status"] = json!("False");
            })
            .expect("not ready");
    }
    let none_ready = iam(kubeconfig, &["status"]).await;
    assert_eq!(none_ready.code, 1, "{none_ready:?}");
    assert_eq!(
        none_ready.stderr,
        "kubectl-iam: no podiam server replica is ready: 0 of 2 server pods in podiam are Ready (no --server given: the servers were not asked)\n"
    );
}

/// An emulator alone (no root needed) and a kubeconfig for it.
#[tokio::test(flavor = "multi_thread")]
async fn explain_through_a_server_is_authorised_with_the_users_own_rbac() {
    let world = World::start(
        WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "web", Some("app-reader")),
    )
    .await
    .expect("world starts");
    let emulator = world.emulator();
    emulator.add_user_token("alice-token", "alice", &["developers"]);
    emulator.add_user_token("bob-token", "bob", &["developers"]);
    podiam_tests::identity::grant_operator(emulator, "alice", Some("team-a")).expect("rbac");
    let alice = world.user_kubeconfig("alice-token").expect("kubeconfig");
    let bob = world.user_kubeconfig("bob-token").expect("kubeconfig");
    let servers = server_flags(&world);
    let args = |extra: &[&'static str]| -> Vec<String> {
        ["explain", "web", "-n", "team-a", "-o", "json"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain(servers.iter().cloned())
            .collect()
    };
    let alice_args = args(&[]);
    let alice_args: Vec<&str> = alice_args.iter().map(String::as_str).collect();
    // No podiam key anywhere: only the CA and alice's own token.
    let answer = wait_for(Duration::from_secs(15), "alice's explanation", || {
        let alice = alice.clone();
        let alice_args = alice_args.clone();
        async move {
            let run = iam(&alice, &alice_args).await;
            (run.code == 0 && run.stdout.contains("\"allowed\": true")).then_some(run)
        }
    })
    .await
    .expect("alice, who may get pods in team-a, gets the server's explanation");
    assert!(answer.stdout.contains(NODE_NAME), "{answer:?}");

    let bob_args = args(&[]);
    let bob_args: Vec<&str> = bob_args.iter().map(String::as_str).collect();
    let refused = iam(&bob, &bob_args).await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("get")
            && refused.stderr.contains("pods")
            && refused.stderr.contains("team-a"),
        "the refusal names the missing permission: {refused:?}"
    );
}

/// A wire reason by the name pods read ("" for none).
fn reason_name(wire: i32) -> &'static str {
    podiam_proto::Reason::from_wire(wire).map_or("", podiam_proto::Reason::as_str)
}
