//! Issue 13's policy holes, against the real server: a role path climbing out of the
//! permitted path (d), a pod renaming its STS session under a template (e), the memory one
//! namespace's permitted regex may cost (g), a terminating pod's address given to a new pod
//! (j), and refusals that named another namespace's pods (l). Also: a server whose clock is
//! off from STS's.
//!
//! Each test runs its own Kubernetes API emulator, moto and one `podiam-server` process (no
//! network namespaces, so no root), and acts as the agent of `node-1` with the agent's
//! client certificate and a projected token, or as an operator with the admin's token.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use podiam_proto::Reason;
use podiam_proto::v1::{
    ExplainRequest, GetCredentialsRequest, GetPodRoleRequest, NodeEvent, PodState, StatusRequest,
    WatchNodeRequest, explain_request, node_event,
};
use podiam_tests::identity::{self, ADMIN_TOKEN, AGENT_AUDIENCE, Client};
use podiam_tests::kube_emulator::{EmulatorOptions, Kind, KubeEmulator, PodDeletion};
use podiam_tests::moto::Moto;
use podiam_tests::process::{ChildGuard, scratch_dir, wait_for, wait_until};
use podiam_tests::sts_proxy::StsProxy;
use podiam_tests::world::{
    NODE_NAME, agent_material, http_get_text, metric_value, start_server_within,
};

const WAIT: Duration = Duration::from_secs(20);

/// An emulator, moto (behind a recording proxy), and one server.
struct Setup {
    server: ChildGuard,
    /// node-1's agent token (its pod exists before the server starts, so the server's first
    /// list has it).
    agent_token: String,
    addr: std::net::SocketAddr,
    health: std::net::SocketAddr,
    certs: podiam_certs::WrittenFiles,
    proxy: StsProxy,
    emulator: KubeEmulator,
    _moto: Moto,
    _dir: PathBuf,
}

impl Setup {
    async fn start(deletion: PodDeletion, server_args: &[&str]) -> Setup {
        podiam_runtime::tls::install_crypto_provider();
        let dir = scratch_dir("hardening-policy").expect("scratch directory");
        let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(&dir.join("certs"), false)
            .expect("certificates written");
        let emulator = KubeEmulator::start(
            "127.0.0.1:0".parse().expect("address"),
            EmulatorOptions {
                pod_deletion: deletion,
                ..EmulatorOptions::default()
            },
        )
        .await
        .expect("emulator");
        let kubeconfig = dir.join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        identity::install_podiam_identity(&emulator).expect("podiam's identities");
        let (agent_token, _) = identity::agent_token(
            &emulator,
            NODE_NAME,
            AGENT_AUDIENCE,
            SystemTime::now() + Duration::from_secs(3600),
        )
        .expect("agent token");
        let moto = Moto::start().await.expect("moto");
        let proxy = StsProxy::start(moto.addr()).await.expect("STS proxy");
        let args: Vec<String> = server_args.iter().map(|a| a.to_string()).collect();
        let (server, addr, health) =
            start_server_within(&certs, &kubeconfig, &proxy.endpoint(), &args, WAIT)
                .await
                .expect("server starts");
        Setup {
            server,
            agent_token,
            addr,
            health,
            certs,
            proxy,
            emulator,
            _moto: moto,
            _dir: dir,
        }
    }

    /// node-1's agent: the agent certificate and a token bound to its pod.
    async fn agent(&self) -> Client {
        let token = &self.agent_token;
        let material = agent_material(&self.certs).expect("agent TLS");
        let ca = std::fs::read(&self.certs.ca_cert).expect("CA");
        identity::client(self.addr, &ca, Some(&material), Some(token))
            .await
            .expect("agent client")
    }

    /// An operator allowed everything.
    async fn admin(&self) -> Client {
        let ca = std::fs::read(&self.certs.ca_cert).expect("CA");
        identity::client(self.addr, &ca, None, Some(ADMIN_TOKEN))
            .await
            .expect("admin client")
    }

    fn namespace(&self, name: &str, permitted: &str) {
        self.emulator
            .create(podiam_tests::kube_emulator::namespace(
                name,
                &[("iam.amazonaws.com/permitted", permitted)],
            ))
            .expect("namespace created");
    }

    fn pod(&self, namespace: &str, name: &str, ip: Ipv4Addr, annotations: &[(&str, &str)]) {
        self.emulator
            .create(podiam_tests::kube_emulator::pod(
                namespace,
                name,
                &ip.to_string(),
                annotations,
            ))
            .expect("pod created");
    }
}

/// What the server answers node-1's agent about `ip`: the role's name, or the refusal.
async fn role_of(agent: &Client, ip: Ipv4Addr) -> Result<String, (Option<Reason>, String)> {
    agent
        .clone()
        .get_pod_role(GetPodRoleRequest {
            ip: ip.to_string(),
            node_name: NODE_NAME.into(),
        })
        .await
        .map(|r| r.into_inner().role_name)
        .map_err(|status| (Reason::of(&status), status.message().to_string()))
}

/// Waits until the server knows a pod at `ip` (any answer but unknown-pod).
async fn wait_known(agent: &Client, ip: Ipv4Addr) {
    wait_until(WAIT, "the server to see the pod", || async {
        !matches!(role_of(agent, ip).await, Err((Some(Reason::UnknownPod), _)))
    })
    .await
    .expect("pod seen");
}

/// Waits until the server answers the pod at `ip` with the role `want`. Pods and namespaces
/// come to the server on watches of their own, so a new pod may be known before its
/// namespace's rule is, and refused until then.
async fn wait_role(agent: &Client, ip: Ipv4Addr, want: &str) {
    let granted = wait_until(WAIT, "the server to grant the pod its role", || async {
        matches!(role_of(agent, ip).await, Ok(role) if role == want)
    })
    .await;
    if granted.is_err() {
        panic!(
            "{ip}: want {want}, the server answers {:?}",
            role_of(agent, ip).await
        );
    }
}

/// node-1's stream snapshot: every pod state it carries, by UID.
async fn node_snapshot(agent: &Client) -> HashMap<String, PodState> {
    let mut stream = agent
        .clone()
        .watch_node(WatchNodeRequest {
            node_name: NODE_NAME.into(),
            agent_version: "test".into(),
        })
        .await
        .expect("stream opens")
        .into_inner();
    let mut states = HashMap::new();
    let read = async {
        while let Some(NodeEvent { event }) = stream.message().await.expect("stream reads") {
            match event {
                Some(node_event::Event::Upsert(state)) => {
                    let uid = state
                        .pod
                        .as_ref()
                        .map(|p| p.uid.clone())
                        .unwrap_or_default();
                    states.insert(uid, state);
                }
                Some(node_event::Event::DeleteUid(uid)) => {
                    states.remove(&uid);
                }
                Some(node_event::Event::Synced(true)) => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("snapshot within the deadline");
    states
}

/// d: `team-b/../admin` is not a role under `team-b/`, and never `admin`.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_path_cannot_climb_out_of_the_permitted_path() {
    let setup = Setup::start(PodDeletion::Immediate, &[]).await;
    setup.namespace("team-b", "team-b/.*");
    let honest = Ipv4Addr::new(10, 61, 0, 1);
    let climbers: &[(&str, &str)] = &[
        ("climber", "team-b/../admin"),
        ("dotter", "team-b/./admin"),
        ("doubler", "team-b//admin"),
        (
            "arn-climber",
            "arn:aws:iam::123456789012:role/team-b/../admin",
        ),
    ];
    setup.pod(
        "team-b",
        "honest",
        honest,
        &[("iam.amazonaws.com/role", "team-b/app")],
    );
    for (i, (name, role)) in climbers.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 61, 0, 10 + i as u8);
        setup.pod("team-b", name, ip, &[("iam.amazonaws.com/role", role)]);
    }
    let agent = setup.agent().await;
    wait_role(&agent, honest, "app").await;
    for (i, (name, role)) in climbers.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 61, 0, 10 + i as u8);
        wait_known(&agent, ip).await;
        let answer = role_of(&agent, ip).await;
        assert!(
            matches!(&answer, Err((Some(Reason::InvalidRole), _))),
            "{name} ({role}): {answer:?}"
        );
        let credentials = agent
            .clone()
            .get_credentials(GetCredentialsRequest {
                ip: ip.to_string(),
                role_name: "admin".into(),
                node_name: NODE_NAME.into(),
                pod_token: String::new(),
            })
            .await;
        assert!(credentials.is_err(), "{name} ({role}) got credentials");
    }
    // Nothing was ever asked of STS for a role outside team-b/, nor with a dot segment.
    for call in setup.proxy.assume_role_calls() {
        let arn = call.param("RoleArn").unwrap_or_default();
        assert_eq!(arn, "arn:aws:iam::123456789012:role/team-b/app", "{call:?}");
    }
}

/// e: with `--session-name '{namespace}.{pod}'`, a pod's session-name annotation changes
/// nothing: CloudTrail names the pod the server knows.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cannot_rename_its_session_under_a_template() {
    let setup = Setup::start(
        PodDeletion::Immediate,
        &["--session-name", "{namespace}.{pod}"],
    )
    .await;
    setup.namespace("team-b", "team-b/.*");
    let ip = Ipv4Addr::new(10, 62, 0, 1);
    setup.pod(
        "team-b",
        "pod-a",
        ip,
        &[
            ("iam.amazonaws.com/role", "team-b/app"),
            ("iam.amazonaws.com/session-name", "team-b.pod-c"),
        ],
    );
    let agent = setup.agent().await;
    wait_role(&agent, ip, "app").await;
    agent
        .clone()
        .get_credentials(GetCredentialsRequest {
            ip: ip.to_string(),
            role_name: "app".into(),
            node_name: NODE_NAME.into(),
            pod_token: String::new(),
        })
        .await
        .expect("credentials");
    let calls = setup.proxy.assume_role_calls();
    let names: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.param("RoleSessionName"))
        .collect();
    assert!(!names.is_empty(), "{calls:#?}");
    assert!(
        names.iter().all(|n| *n == "team-b.pod-a"),
        "sessions named {names:?}"
    );
}

/// j: a terminating pod keeps its role while it is alone at its address; once a new pod
/// has the address, the new pod is answered (its own role), the old one has none, and the
/// node stream carries only the new one at that address.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_pod_at_a_terminating_pods_address_gets_its_own_role() {
    let setup = Setup::start(PodDeletion::Graceful, &[]).await;
    setup.namespace("team-a", "app-.*");
    let ip = Ipv4Addr::new(10, 63, 0, 1);
    setup.pod(
        "team-a",
        "old",
        ip,
        &[("iam.amazonaws.com/role", "app-writer")],
    );
    let agent = setup.agent().await;
    wait_role(&agent, ip, "app-writer").await;

    // Deleted: terminating, still alone at its address, so it keeps its role.
    setup
        .emulator
        .delete(Kind::Pod, Some("team-a"), "old")
        .expect("old pod terminating");
    let old = setup
        .emulator
        .get(Kind::Pod, Some("team-a"), "old")
        .expect("still there");
    assert!(old["metadata"]["deletionTimestamp"].is_string(), "{old}");
    assert_eq!(role_of(&agent, ip).await, Ok("app-writer".to_string()));

    // The address goes to a new pod before the old one is gone.
    setup.pod(
        "team-a",
        "new",
        ip,
        &[("iam.amazonaws.com/role", "app-reader")],
    );
    let answer = wait_for(WAIT, "the new pod to be answered", || async {
        match role_of(&agent, ip).await {
            Ok(role) if role == "app-reader" => Some(Ok(role)),
            Ok(role) if role == "app-writer" => None,
            other => Some(other),
        }
    })
    .await;
    assert_eq!(answer.ok(), Some(Ok("app-reader".to_string())));
    let snapshot = node_snapshot(&agent).await;
    let at_ip: Vec<(&str, &str)> = snapshot
        .values()
        .filter(|s| s.ip == ip.to_string())
        .map(|s| {
            (
                s.pod.as_ref().map_or("", |p| p.name.as_str()),
                s.role_name.as_str(),
            )
        })
        .collect();
    assert_eq!(at_ip, [("new", "app-reader")], "{snapshot:#?}");
    let explained = setup
        .admin()
        .await
        .explain(ExplainRequest {
            target: Some(explain_request::Target::Pod(podiam_proto::v1::PodRef {
                namespace: "team-a".into(),
                name: "old".into(),
                uid: String::new(),
            })),
        })
        .await
        .expect("explains")
        .into_inner();
    assert!(!explained.allowed, "{explained:?}");
    assert!(explained.message.contains("terminating"), "{explained:?}");
}

/// l: two pods of two namespaces claim one address. Neither pod's answer, stream state or
/// Event names the other namespace's pod; an operator's explain by address names both.
#[tokio::test(flavor = "multi_thread")]
async fn a_pods_refusal_names_nothing_of_another_namespace() {
    let setup = Setup::start(PodDeletion::Immediate, &[]).await;
    setup.namespace("team-a", "app-.*");
    setup.namespace("team-secret", "app-.*");
    let ip = Ipv4Addr::new(10, 64, 0, 1);
    setup.pod(
        "team-a",
        "web",
        ip,
        &[("iam.amazonaws.com/role", "app-reader")],
    );
    setup.pod(
        "team-secret",
        "payroll-exporter",
        ip,
        &[("iam.amazonaws.com/role", "app-payroll")],
    );
    let agent = setup.agent().await;
    let admin = setup.admin().await;
    let explained = wait_for(WAIT, "both pods at the address", || {
        let mut admin = admin.clone();
        async move {
            let answer = admin
                .explain(ExplainRequest {
                    target: Some(explain_request::Target::Ip(ip.to_string())),
                })
                .await
                .ok()?
                .into_inner();
            (answer.pods.len() == 2).then_some(answer)
        }
    })
    .await
    .expect("both seen");
    assert!(
        explained.message.contains("team-secret/payroll-exporter")
            && explained.message.contains("team-a/web"),
        "operators see every claimant: {explained:?}"
    );

    let secrets = |other: &str| -> Vec<String> {
        if other == "team-secret" {
            vec!["team-secret".into(), "payroll-exporter".into()]
        } else {
            vec!["team-a".into(), "web".into()]
        }
    };
    // What the pod at the address is answered names nobody.
    let answer = role_of(&agent, ip).await;
    let Err((Some(Reason::AmbiguousPod), message)) = &answer else {
        panic!("{answer:?}");
    };
    for secret in secrets("team-secret").iter().chain(&secrets("team-a")) {
        assert!(!message.contains(secret.as_str()), "{message}");
    }
    // The stream's states name nothing of the other namespace.
    let snapshot = node_snapshot(&agent).await;
    for state in snapshot.values() {
        let own = state.pod.as_ref().map_or("", |p| p.namespace.as_str());
        let other = if own == "team-a" {
            "team-secret"
        } else {
            "team-a"
        };
        assert_eq!(
            Reason::from_wire(state.refusal_reason),
            Some(Reason::AmbiguousPod),
            "{state:?}"
        );
        for secret in secrets(other) {
            assert!(!state.refusal_message.contains(&secret), "{state:?}");
        }
    }
    // Nor do the Events written on each pod, which its namespace's users can read.
    let notes = wait_for(WAIT, "an Event on each pod", || async {
        let events = setup.emulator.list(Kind::EventV1, None).ok()?;
        let notes: Vec<(String, String)> = events
            .iter()
            .filter(|e| e["reason"] == "DuplicatePodIP")
            .map(|e| {
                (
                    e["regarding"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        (notes.len() >= 2).then_some(notes)
    })
    .await
    .expect("events written");
    for (namespace, note) in notes {
        let other = if namespace == "team-a" {
            "team-secret"
        } else {
            "team-a"
        };
        for secret in secrets(other) {
            assert!(!note.contains(&secret), "{namespace}: {note}");
        }
    }
}

/// The server process's resident memory, in bytes.
fn rss(server: &ChildGuard) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Namespaces with a regex of their own each.
const RULE_NAMESPACES: usize = 1000;
/// One pod in every this many of them, so that rules are matched too (a regex's match-time
/// caches grow on first use).
const POD_EVERY: usize = 10;
/// How much the server's resident memory may grow for [`RULE_NAMESPACES`] namespaces with
/// `\w{20}|nN` (and a pod in every tenth): 32 KiB per namespace. Compiled ASCII-only, each
/// such rule is 7 KiB of automata, 15 to 17 KiB as the rules' budget counts it; the server
/// measured here grew by about 18 KiB per namespace (rule, namespace record, watch buffers,
/// allocator), so the bound leaves it room to vary but not to double. Compiled with Unicode
/// classes, as before issue 13, the same namespaces grew it by 1.25 MiB each: 1254 MiB.
const RSS_GROWTH_BOUND: u64 = 32 * 1024 * RULE_NAMESPACES as u64;

/// g: a thousand namespaces' permitted rules cost the server megabytes, not a gigabyte.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_namespaces_rules_cost_the_server_little_memory() {
    let setup = Setup::start(PodDeletion::Immediate, &[]).await;
    let admin = setup.admin().await;
    let ip = |i: usize| Ipv4Addr::new(10, 65, (i / 250) as u8, (i % 250 + 1) as u8);
    // Warm up: a namespace and a pod seen and decided once, so that what is measured next
    // is the rules and not the server's first use of its code paths.
    setup.namespace("warm-up", r"\w{20}|warm");
    setup.pod(
        "warm-up",
        "warm",
        ip(9999),
        &[("iam.amazonaws.com/role", "warm")],
    );
    let agent = setup.agent().await;
    wait_role(&agent, ip(9999), "warm").await;
    let before = rss(&setup.server);
    // The namespaces the server knows now (the warm-up's, the set-up's): every rule
    // namespace is waited for on top of them, not only most.
    let existing = setup.admin().await.status(StatusRequest {}).await;
    let existing = existing.expect("status").into_inner().namespaces as usize;

    for i in 0..RULE_NAMESPACES {
        let name = format!("rules-{i}");
        setup.namespace(&name, &format!(r"\w{{20}}|n{i}"));
        if i % POD_EVERY == 0 {
            let role = format!("n{i}");
            setup.pod(&name, "app", ip(i), &[("iam.amazonaws.com/role", &role)]);
        }
    }
    // Every namespace seen (the last one's pod is permitted), generously timed: compiled as
    // Unicode, a thousand such rules take minutes in a debug build.
    let last = RULE_NAMESPACES - POD_EVERY;
    wait_until(Duration::from_secs(600), "every rule compiled", || async {
        let status = setup.admin().await.status(StatusRequest {}).await;
        status.is_ok_and(|s| s.into_inner().namespaces as usize == existing + RULE_NAMESPACES)
            && role_of(&agent, ip(last)).await == Ok(format!("n{last}"))
    })
    .await
    .expect("rules compiled");
    // Every pod's rule matched, on the server's threads.
    for i in (0..RULE_NAMESPACES).step_by(POD_EVERY) {
        let mut admin = admin.clone();
        let answer = admin
            .explain(ExplainRequest {
                target: Some(explain_request::Target::Ip(ip(i).to_string())),
            })
            .await
            .expect("explains")
            .into_inner();
        assert!(answer.allowed, "{answer:?}");
        assert_eq!(role_of(&agent, ip(i)).await, Ok(format!("n{i}")));
    }
    let after = rss(&setup.server);
    let growth = after.saturating_sub(before);
    eprintln!(
        "server RSS {} MiB -> {} MiB (+{} KiB, {} bytes per namespace)",
        before >> 20,
        after >> 20,
        growth >> 10,
        growth / RULE_NAMESPACES as u64
    );
    assert!(
        growth <= RSS_GROWTH_BOUND,
        "{RULE_NAMESPACES} namespaces' rules grew the server by {} MiB (bound {} MiB)",
        growth >> 20,
        RSS_GROWTH_BOUND >> 20
    );
}

/// A server whose clock is 45 minutes ahead of STS's (the proxy moves the `Date` and the
/// `Expiration`s of STS's answers back): STS's `Expiration` read on the server's clock is 15
/// minutes off, under the 30-minute floor, so that every request would call STS again. The
/// server reads STS's time from the answer's `Date`: one AssumeRole serves every request, the
/// agent is told the session has its hour, the pod is told STS's `Expiration`, and the offset
/// is exported.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_clock_ahead_of_sts_calls_sts_once_for_the_session() {
    let setup = Setup::start(PodDeletion::Immediate, &[]).await;
    setup.proxy.set_sts_clock_offset(-45 * 60);
    setup.namespace("team-b", "team-b/.*");
    let ip = Ipv4Addr::new(10, 66, 0, 1);
    setup.pod(
        "team-b",
        "pod-a",
        ip,
        &[("iam.amazonaws.com/role", "team-b/app")],
    );
    let agent = setup.agent().await;
    wait_role(&agent, ip, "app").await;
    for _ in 0..5 {
        let credentials = agent
            .clone()
            .get_credentials(GetCredentialsRequest {
                ip: ip.to_string(),
                role_name: "app".into(),
                node_name: NODE_NAME.into(),
                pod_token: String::new(),
            })
            .await
            .expect("credentials")
            .into_inner()
            .credentials
            .expect("credentials");
        let told = credentials.expiration_unix - podiam_runtime::clock::now_unix();
        assert!(
            (14 * 60..=15 * 60).contains(&told),
            "the pod is told STS's Expiration, 15 minutes from now by this host: {told} s"
        );
        assert!(
            credentials.valid_for_ms > 59 * 60 * 1000,
            "the agent is told the session's hour: {} ms",
            credentials.valid_for_ms
        );
    }
    let calls = setup.proxy.assume_role_calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let metrics = http_get_text(&format!("http://{}/metrics", setup.health))
        .await
        .expect("metrics");
    let offset = metric_value(&metrics, "podiam_server_sts_clock_offset_seconds");
    assert!((2700..=2702).contains(&offset), "offset {offset}");
}
