//! Integration tests of the emulator's authentication and authorisation against the real
//! clients: `kubectl` (create serviceaccount/role/rolebinding/clusterrole/
//! clusterrolebinding/token, apply, auth can-i, auth whoami, and requests as a token user)
//! and kube-rs (`Api::<TokenReview>`, `Api::<SubjectAccessReview>`, requests as a token
//! user over TLS), plus raw HTTP where the wire form matters (status codes, Status bodies).
//!
//! Nothing sleeps: every step is a request answered before the next one starts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    SubjectAccessReviewStatus,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use podiam_tests::fixtures::ApiFixture;
use podiam_tests::kube_emulator::{
    API_AUDIENCE, EmulatorOptions, Kind, agent_pod, cluster_role, cluster_role_binding, namespace,
    pod, role, role_binding, service_account,
};
use serde_json::{Value, json};

/// Generous bound for anything that should take milliseconds, on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);
const TEN_MINUTES: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// The shared API fixture, with this suite's helpers.
struct Fixture(ApiFixture);

impl std::ops::Deref for Fixture {
    type Target = ApiFixture;
    fn deref(&self) -> &ApiFixture {
        &self.0
    }
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture(ApiFixture::start("kube-auth", EmulatorOptions::default()).await)
    }

    /// A kubeconfig file for `token` (over TLS).
    fn kubeconfig_for(&self, file: &str, token: &str) -> PathBuf {
        let path = self.dir.join(file);
        self.emulator
            .write_kubeconfig_for_token(&path, token)
            .unwrap();
        path
    }

    /// Runs kubectl as the admin and requires success; returns stdout.
    async fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_ok_with(&self.kubeconfig, args).await
    }

    async fn kubectl_ok_with(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let out = self.kubectl_with(kubeconfig, args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Runs kubectl as the admin and requires failure; returns stderr.
    async fn kubectl_err(&self, args: &[&str]) -> String {
        let out = self.kubectl_with(&self.kubeconfig, args).await;
        assert!(
            !out.ok,
            "kubectl {args:?} should have failed: {}",
            out.stdout
        );
        out.stderr
    }

    async fn admin_client(&self) -> kube::Client {
        self.client_for(&self.kubeconfig).await
    }

    /// One plain-HTTP request, optionally with a bearer token; returns (status, JSON body).
    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        self.0.request(method, path, &headers, body).await
    }

    /// Namespace `podiam` with service account `agent` and its pod `agent-x` on `node-3`;
    /// returns the pod's uid.
    fn setup_agent(&self) -> String {
        self.emulator.create(namespace("podiam", &[])).unwrap();
        self.emulator
            .create(service_account("podiam", "agent"))
            .unwrap();
        let pod = self
            .emulator
            .create(agent_pod("podiam", "agent-x", "node-3", "agent"))
            .unwrap();
        pod["metadata"]["uid"].as_str().unwrap().to_string()
    }

    async fn token_review(&self, token: &str, audiences: &[&str]) -> TokenReviewStatus {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!audiences.is_empty())
                    .then(|| audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..TokenReview::default()
        };
        Api::<TokenReview>::all(self.admin_client().await)
            .create(&PostParams::default(), &review)
            .await
            .expect("a TokenReview")
            .status
            .expect("a TokenReview status")
    }
}

fn in_ten_minutes() -> SystemTime {
    SystemTime::now() + TEN_MINUTES
}

/// The claims of a JWT-shaped token, unverified.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).unwrap()
}

/// `token` with one character of its claims changed.
fn forge(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let claims = &mut parts[1];
    let middle = claims.len() / 2;
    let replacement = if &claims[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    claims.replace_range(middle..=middle, replacement);
    parts.join(".")
}

// ---------------------------------------------------------------------------------------
// Stored kinds through kubectl
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_creates_applies_and_lists_service_accounts_and_rbac_objects() {
    let fx = Fixture::start().await;
    // Typed `kubectl create` commands send protobuf bodies.
    fx.kubectl_ok(&["create", "namespace", "team-a"]).await;
    fx.kubectl_ok(&["create", "serviceaccount", "agent", "-n", "team-a"])
        .await;
    let listed = fx
        .kubectl_ok(&["get", "serviceaccounts", "-n", "team-a"])
        .await;
    assert!(
        listed.contains("SECRETS") && listed.lines().any(|l| l.starts_with("agent ")),
        "{listed}"
    );
    fx.kubectl_ok(&[
        "create",
        "role",
        "pod-reader",
        "-n",
        "team-a",
        "--verb=get,list",
        "--resource=pods",
        "--resource-name=web",
    ])
    .await;
    fx.kubectl_ok(&[
        "create",
        "rolebinding",
        "readers",
        "-n",
        "team-a",
        "--role=pod-reader",
        "--user=alice",
        "--group=devs",
        "--serviceaccount=team-a:agent",
    ])
    .await;
    fx.kubectl_ok(&[
        "create",
        "clusterrole",
        "health",
        "--verb=get",
        "--non-resource-url=/healthz",
    ])
    .await;
    fx.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "health",
        "--clusterrole=health",
        "--user=bob",
    ])
    .await;

    let role = fx
        .emulator
        .get(Kind::Role, Some("team-a"), "pod-reader")
        .unwrap();
    assert_eq!(
        role["rules"],
        json!([{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"],
                "resourceNames": ["web"]}])
    );
    let binding = fx
        .emulator
        .get(Kind::RoleBinding, Some("team-a"), "readers")
        .unwrap();
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"})
    );
    assert_eq!(binding["subjects"].as_array().unwrap().len(), 3);
    let health = fx.emulator.get(Kind::ClusterRole, None, "health").unwrap();
    assert_eq!(health["rules"][0]["nonResourceURLs"], json!(["/healthz"]));

    let wide = fx
        .kubectl_ok(&["get", "rolebindings", "-n", "team-a", "-o", "wide"])
        .await;
    let row = wide.lines().find(|l| l.starts_with("readers")).unwrap();
    for cell in ["Role/pod-reader", "alice", "devs", "team-a/agent"] {
        assert!(row.contains(cell), "{wide}");
    }
    let bindings = fx.kubectl_ok(&["get", "clusterrolebindings"]).await;
    assert!(
        bindings.contains("health") && bindings.contains("cluster-admin"),
        "{bindings}"
    );

    // `kubectl apply -f` creates, then changes, the same kinds (JSON and patches).
    let manifest = fx.dir.join("rbac.yaml");
    let write = |verbs: &str| {
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: server\n  namespace: team-a\n\
                 ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: podiam-server\n\
                 rules:\n- apiGroups: [\"\"]\n  resources: [pods, namespaces]\n  verbs: [{verbs}]\n\
                 ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: podiam-server\n\
                 roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: podiam-server\n\
                 subjects:\n- kind: ServiceAccount\n  name: server\n  namespace: team-a\n\
                 ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: server-view\n  namespace: team-a\n\
                 roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: pod-reader\n\
                 subjects:\n- kind: ServiceAccount\n  name: server\n"
            ),
        )
        .unwrap();
    };
    write("get, list, watch");
    let applied = fx
        .kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()])
        .await;
    for created in [
        "serviceaccount/server created",
        "clusterrole.rbac.authorization.k8s.io/podiam-server created",
        "clusterrolebinding.rbac.authorization.k8s.io/podiam-server created",
        "rolebinding.rbac.authorization.k8s.io/server-view created",
    ] {
        assert!(applied.contains(created), "{applied}");
    }
    write("get, list");
    let applied = fx
        .kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()])
        .await;
    assert!(
        applied.contains("clusterrole.rbac.authorization.k8s.io/podiam-server configured"),
        "{applied}"
    );
    let changed = fx
        .emulator
        .get(Kind::ClusterRole, None, "podiam-server")
        .unwrap();
    assert_eq!(changed["rules"][0]["verbs"], json!(["get", "list"]));

    // A binding's roleRef cannot change, as on a real cluster.
    let stderr = fx
        .kubectl_err(&[
            "patch",
            "rolebinding",
            "server-view",
            "-n",
            "team-a",
            "--type=merge",
            "-p",
            r#"{"roleRef":{"name":"other"}}"#,
        ])
        .await;
    assert!(stderr.contains("cannot be changed"), "{stderr}");

    fx.kubectl_ok(&["delete", "clusterrolebinding", "health"])
        .await;
    assert!(
        fx.emulator
            .get(Kind::ClusterRoleBinding, None, "health")
            .is_err()
    );
    // Deleting the namespace takes its service accounts, roles and bindings.
    fx.kubectl_ok(&["delete", "namespace", "team-a"]).await;
    for kind in [Kind::ServiceAccount, Kind::Role, Kind::RoleBinding] {
        assert!(fx.emulator.list(kind, Some("team-a")).unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// TokenRequest and TokenReview
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_create_token_issues_bound_tokens_that_review_as_the_pod() {
    let fx = Fixture::start().await;
    let pod_uid = fx.setup_agent();
    let account = fx
        .emulator
        .get(Kind::ServiceAccount, Some("podiam"), "agent")
        .unwrap();
    let account_uid = account["metadata"]["uid"].as_str().unwrap();

    let token = fx
        .kubectl_ok(&[
            "create",
            "token",
            "agent",
            "-n",
            "podiam",
            "--audience",
            "podiam",
            "--duration",
            "10m",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "agent-x",
            "--bound-object-uid",
            &pod_uid,
        ])
        .await;
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");
    assert!(!token.contains('='), "{token}");
    let claims = claims(token);
    assert_eq!(claims["iss"], API_AUDIENCE);
    assert_eq!(claims["sub"], "system:serviceaccount:podiam:agent");
    assert_eq!(claims["aud"], json!(["podiam"]));
    let (exp, iat) = (
        claims["exp"].as_i64().unwrap(),
        claims["iat"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 600);
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(
        claims["kubernetes.io"],
        json!({
            "namespace": "podiam",
            "serviceaccount": {"name": "agent", "uid": account_uid},
            "pod": {"name": "agent-x", "uid": pod_uid},
            "node": {"name": "node-3"},
        })
    );

    let before = fx.emulator.token_reviews();
    let status = fx.token_review(token, &["podiam"]).await;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences, Some(vec!["podiam".to_string()]));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:podiam:agent")
    );
    assert_eq!(user.uid.as_deref(), Some(account_uid));
    assert_eq!(
        user.groups.unwrap(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:podiam",
            "system:authenticated"
        ]
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["agent-x"]);
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        [pod_uid.as_str()]
    );
    assert_eq!(extra["authentication.kubernetes.io/node-name"], ["node-3"]);
    assert_eq!(
        extra["authentication.kubernetes.io/credential-id"],
        [format!("JTI={}", claims["jti"].as_str().unwrap())]
    );
    assert_eq!(fx.emulator.token_reviews(), before + 1);

    // The default expiry and audience, over raw HTTP: 201 with the expiration timestamp.
    let (code, answer) = fx
        .request(
            "POST",
            "/api/v1/namespaces/podiam/serviceaccounts/agent/token",
            None,
            Some(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {}}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{answer}");
    let unbound = claims_of(&answer);
    assert_eq!(unbound["aud"], json!([API_AUDIENCE]));
    assert_eq!(
        unbound["exp"].as_i64().unwrap() - unbound["iat"].as_i64().unwrap(),
        3600
    );
    assert!(unbound["kubernetes.io"].get("pod").is_none());
    assert!(answer["status"]["expirationTimestamp"].is_string());

    // What the apiserver refuses, kubectl reports.
    fx.emulator
        .create(agent_pod("podiam", "other-x", "node-4", "other"))
        .unwrap();
    let cases = [
        (
            vec![
                "create",
                "token",
                "agent",
                "-n",
                "podiam",
                "--duration",
                "5m",
            ],
            "must be at least 600 seconds",
        ),
        (
            vec!["create", "token", "nobody", "-n", "podiam"],
            "serviceaccounts \"nobody\" not found",
        ),
        (
            vec![
                "create",
                "token",
                "agent",
                "-n",
                "podiam",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                "agent-x",
                "--bound-object-uid",
                "not-the-uid",
            ],
            "Operation cannot be fulfilled on pods \"agent-x\"",
        ),
        (
            vec![
                "create",
                "token",
                "agent",
                "-n",
                "podiam",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                "missing",
            ],
            "pods \"missing\" not found",
        ),
        (
            vec![
                "create",
                "token",
                "agent",
                "-n",
                "podiam",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                "other-x",
            ],
            "runs as service account \"other\"",
        ),
    ];
    for (args, want) in cases {
        let stderr = fx.kubectl_err(&args).await;
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

fn claims_of(token_request: &Value) -> Value {
    claims(token_request["status"]["token"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn token_reviews_refuse_what_the_apiserver_refuses() {
    let fx = Fixture::start().await;
    let pod_uid = fx.setup_agent();
    let bound = Some(("agent-x", pod_uid.as_str()));
    let mint = |audiences: &[&str], expires: SystemTime, bound: Option<(&str, &str)>| {
        fx.emulator
            .mint_token("podiam", "agent", audiences, expires, bound)
            .unwrap()
    };
    let valid = mint(&["podiam"], in_ten_minutes(), bound);
    let expired = mint(
        &["podiam"],
        SystemTime::now() - Duration::from_secs(300),
        bound,
    );
    let for_api = mint(&[], in_ten_minutes(), None);
    fx.emulator
        .add_user_token("alice-token", "alice", &["devs"]);

    let cases: [(&str, String, &[&str], Option<&str>); 8] = [
        ("valid", valid.clone(), &["podiam"], None),
        ("expired", expired, &["podiam"], Some("expired")),
        (
            "wrong audience",
            valid.clone(),
            &["vault"],
            Some("audiences"),
        ),
        (
            "no audiences means the API server's",
            valid.clone(),
            &[],
            Some("audiences"),
        ),
        (
            "forged",
            forge(&valid),
            &["podiam"],
            Some("invalid bearer token"),
        ),
        ("API audience", for_api, &[], None),
        (
            "user token, audience podiam",
            "alice-token".into(),
            &["podiam"],
            Some("audience"),
        ),
        (
            "never issued",
            "a.b.c".into(),
            &["podiam"],
            Some("invalid bearer token"),
        ),
    ];
    for (name, token, audiences, error) in cases {
        let status = fx.token_review(&token, audiences).await;
        match error {
            None => assert_eq!(status.authenticated, Some(true), "{name}: {status:?}"),
            Some(error) => {
                assert_ne!(status.authenticated, Some(true), "{name}: {status:?}");
                let text = status.error.unwrap_or_default();
                assert!(text.contains(error), "{name}: {text}");
            }
        }
    }

    // A user token is good for the API server's own audience.
    let status = fx.token_review("alice-token", &[]).await;
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(status.audiences, Some(vec![API_AUDIENCE.to_string()]));
    let user = status.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("alice"));
    assert_eq!(user.groups.unwrap(), ["devs", "system:authenticated"]);

    // Unauthenticated is a 201 with a status, not an HTTP error.
    let (code, answer) = fx
        .request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            None,
            Some(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "spec": {"token": forge(&valid), "audiences": ["podiam"]}}),
            ),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(answer["status"]["authenticated"], false);
    assert!(answer["status"]["error"].is_string());

    // The bound pod is deleted: the token dies with it; so for a pod recreated under the
    // same name (another uid).
    assert_eq!(
        fx.token_review(&valid, &["podiam"]).await.authenticated,
        Some(true)
    );
    fx.emulator
        .delete(Kind::Pod, Some("podiam"), "agent-x")
        .unwrap();
    let status = fx.token_review(&valid, &["podiam"]).await;
    assert_ne!(status.authenticated, Some(true));
    assert!(status.error.unwrap().contains("no longer exists"));
    fx.emulator
        .create(agent_pod("podiam", "agent-x", "node-3", "agent"))
        .unwrap();
    let status = fx.token_review(&valid, &["podiam"]).await;
    assert_ne!(status.authenticated, Some(true));
    assert!(status.error.unwrap().contains("the token is bound to uid"));

    // The service account is deleted: its tokens die too.
    let unbound = mint(&["podiam"], in_ten_minutes(), None);
    assert_eq!(
        fx.token_review(&unbound, &["podiam"]).await.authenticated,
        Some(true)
    );
    fx.emulator
        .delete(Kind::ServiceAccount, Some("podiam"), "agent")
        .unwrap();
    let status = fx.token_review(&unbound, &["podiam"]).await;
    assert_ne!(status.authenticated, Some(true));
    assert!(
        status
            .error
            .unwrap()
            .contains("service account podiam/agent")
    );

    // Minting checks what TokenRequest checks.
    assert!(
        fx.emulator
            .mint_token("podiam", "agent", &["podiam"], in_ten_minutes(), None)
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_outage_answers_503_and_recovers() {
    let fx = Fixture::start().await;
    fx.setup_agent();
    let token = fx
        .emulator
        .mint_token("podiam", "agent", &["podiam"], in_ten_minutes(), None)
        .unwrap();
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                      "spec": {"token": token, "audiences": ["podiam"]}});

    fx.emulator.set_token_review_down(true);
    let before = fx.emulator.token_reviews();
    let (code, status) = fx
        .request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            None,
            Some(body.clone()),
        )
        .await;
    assert_eq!(code, 503);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "ServiceUnavailable");
    assert_eq!(fx.emulator.token_reviews(), before + 1, "failed ones count");
    // Nothing else is affected.
    Api::<Pod>::all(fx.admin_client().await)
        .list(&ListParams::default())
        .await
        .unwrap();

    // kube-rs without its retry layer sees the 503 …
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec!["podiam".into()]),
        },
        ..TokenReview::default()
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&fx.kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_retry = false;
    let no_retry = Api::<TokenReview>::all(kube::Client::try_from(config).unwrap());
    match no_retry.create(&PostParams::default(), &review).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 503);
            assert_eq!(status.reason, "ServiceUnavailable");
        }
        other => panic!("expected 503, got {other:?}"),
    }

    // … while its default client retries 503s (with backoff): once the fault clears, the
    // review it is retrying succeeds.
    let retrying = Api::<TokenReview>::all(fx.admin_client().await);
    let seen = fx.emulator.token_reviews();
    let pending =
        tokio::spawn(async move { retrying.create(&PostParams::default(), &review).await });
    let start = std::time::Instant::now();
    while fx.emulator.token_reviews() < seen + 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "kube-rs did not retry the TokenReview"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fx.emulator.set_token_review_down(false);
    let answer = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the retried review finishes")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status.unwrap().authenticated, Some(true));
    let (code, answer) = fx
        .request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            None,
            Some(body),
        )
        .await;
    assert_eq!(
        (code, &answer["status"]["authenticated"]),
        (201, &json!(true))
    );
}

// ---------------------------------------------------------------------------------------
// Requests as a token user: authentication and RBAC
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn token_users_are_authorised_with_rbac() {
    let fx = Fixture::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    fx.emulator
        .create(pod("team-a", "web", "10.1.0.5", &[]))
        .unwrap();
    fx.emulator
        .add_user_token("alice-token", "alice", &["devs"]);
    let alice = fx.kubeconfig_for("alice.yaml", "alice-token");

    // Authenticated but not authorised: 403 with the apiserver's words.
    let out = fx
        .kubectl_with(&alice, &["get", "pods", "-n", "team-a"])
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains(
            r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-a""#
        ),
        "{}",
        out.stderr
    );
    // kubectl really sent the token (over TLS) and discovery was allowed.
    let records = fx.emulator.requests();
    let forbidden = records
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/team-a/pods" && r.status == 403)
        .expect("the list request");
    assert_eq!(forbidden.user.as_deref(), Some("alice"));
    assert!(forbidden.tls);

    fx.emulator
        .create(cluster_role(
            "pod-reader",
            json!([{"verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["pods"]}]),
        ))
        .unwrap();
    fx.kubectl_ok(&[
        "create",
        "rolebinding",
        "alice-reads",
        "-n",
        "team-a",
        "--clusterrole=pod-reader",
        "--user=alice",
    ])
    .await;
    let pods = fx
        .kubectl_ok_with(&alice, &["get", "pods", "-n", "team-a", "-o", "name"])
        .await;
    assert_eq!(pods.trim(), "pod/web");
    // Still nothing elsewhere, nor writes.
    let out = fx
        .kubectl_with(&alice, &["delete", "pod", "web", "-n", "team-a"])
        .await;
    assert!(
        out.stderr
            .contains(r#"pods "web" is forbidden: User "alice" cannot delete resource "pods""#),
        "{}",
        out.stderr
    );

    // Unknown tokens are 401, as are expired service account tokens.
    let stranger = fx.kubeconfig_for("stranger.yaml", "no-such-token");
    let out = fx.kubectl_with(&stranger, &["get", "pods"]).await;
    assert!(out.stderr.contains("Unauthorized"), "{}", out.stderr);
    fx.emulator
        .create(service_account("team-a", "app"))
        .unwrap();
    let expired = fx
        .emulator
        .mint_token(
            "team-a",
            "app",
            &[],
            SystemTime::now() - Duration::from_secs(300),
            None,
        )
        .unwrap();
    let (code, status) = fx
        .request(
            "GET",
            "/api/v1/namespaces/team-a/pods",
            Some(&expired),
            None,
        )
        .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (401, Some("Unauthorized"))
    );
    // A token for another audience cannot be used against the API server either.
    let for_podiam = fx
        .emulator
        .mint_token("team-a", "app", &["podiam"], in_ten_minutes(), None)
        .unwrap();
    let (code, _) = fx
        .request(
            "GET",
            "/api/v1/namespaces/team-a/pods",
            Some(&for_podiam),
            None,
        )
        .await;
    assert_eq!(code, 401);

    // A service account token for the API audience acts as the service account, with
    // kube-rs over TLS; a RoleBinding to its ServiceAccount subject grants it access.
    let app_token = fx
        .emulator
        .mint_token("team-a", "app", &[], in_ten_minutes(), None)
        .unwrap();
    let app = fx
        .client_for(&fx.kubeconfig_for("app.yaml", &app_token))
        .await;
    let pods = Api::<Pod>::namespaced(app.clone(), "team-a");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(
                status.message.contains(
                    r#"User "system:serviceaccount:team-a:app" cannot list resource "pods""#
                ),
                "{}",
                status.message
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
    fx.emulator
        .create(role_binding(
            "team-a",
            "app-reads",
            ("ClusterRole", "pod-reader"),
            &[("ServiceAccount", "app")],
        ))
        .unwrap();
    let listed = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);

    // Requests without credentials are still the cluster admin.
    let (code, _) = fx
        .request("DELETE", "/api/v1/namespaces/team-a/pods/web", None, None)
        .await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_auth_can_i_and_whoami_answer_for_the_token_user() {
    let fx = Fixture::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    fx.emulator
        .add_user_token("alice-token", "alice", &["devs"]);
    let alice = fx.kubeconfig_for("alice.yaml", "alice-token");
    let can_i = |args: &'static [&'static str]| {
        let alice = alice.clone();
        let fx = &fx;
        async move {
            let mut all = vec!["auth", "can-i"];
            all.extend_from_slice(args);
            fx.kubectl_with(&alice, &all)
                .await
                .stdout
                .trim()
                .to_string()
        }
    };

    assert_eq!(can_i(&["get", "pods", "-n", "team-a"]).await, "no");
    fx.kubectl_ok(&[
        "create",
        "role",
        "web-reader",
        "-n",
        "team-a",
        "--verb=get",
        "--resource=pods",
        "--resource-name=web",
    ])
    .await;
    fx.kubectl_ok(&[
        "create",
        "rolebinding",
        "devs-read-web",
        "-n",
        "team-a",
        "--role=web-reader",
        "--group=devs",
    ])
    .await;
    assert_eq!(can_i(&["get", "pods/web", "-n", "team-a"]).await, "yes");
    assert_eq!(can_i(&["get", "pods/api", "-n", "team-a"]).await, "no");
    assert_eq!(can_i(&["get", "pods", "-n", "team-b"]).await, "no");
    fx.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "alice-admin",
        "--clusterrole=cluster-admin",
        "--user=alice",
    ])
    .await;
    assert_eq!(can_i(&["delete", "namespaces"]).await, "yes");

    let whoami = fx
        .kubectl_ok_with(&alice, &["auth", "whoami", "-o", "json"])
        .await;
    let review: Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(review["status"]["userInfo"]["username"], "alice");
    assert_eq!(
        review["status"]["userInfo"]["groups"],
        json!(["devs", "system:authenticated"])
    );
}

// ---------------------------------------------------------------------------------------
// SubjectAccessReview through kube-rs
// ---------------------------------------------------------------------------------------

fn resource_review(
    user: &str,
    groups: &[&str],
    (verb, resource, namespace, name): (&str, &str, &str, &str),
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: (!groups.is_empty()).then(|| groups.iter().map(|g| g.to_string()).collect()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                name: (!name.is_empty()).then(|| name.to_string()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn subject_access_reviews_follow_rbac() {
    let fx = Fixture::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    fx.emulator
        .create(cluster_role(
            "pod-reader",
            json!([{"verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["pods"]}]),
        ))
        .unwrap();
    fx.emulator
        .create(role(
            "team-a",
            "web-patcher",
            json!([{"verbs": ["patch"], "apiGroups": [""], "resources": ["pods"],
                    "resourceNames": ["web"]}]),
        ))
        .unwrap();
    fx.emulator
        .create(role_binding(
            "team-a",
            "readers",
            ("ClusterRole", "pod-reader"),
            &[
                ("User", "alice"),
                ("Group", "devs"),
                ("ServiceAccount", "podiam:agent"),
            ],
        ))
        .unwrap();
    fx.emulator
        .create(role_binding(
            "team-a",
            "patchers",
            ("Role", "web-patcher"),
            &[("User", "bob")],
        ))
        .unwrap();
    fx.emulator
        .create(cluster_role_binding(
            "operators",
            "pod-reader",
            &[("User", "olga")],
        ))
        .unwrap();
    let api = Api::<SubjectAccessReview>::all(fx.admin_client().await);
    let before = fx.emulator.subject_access_reviews();

    let agent = "system:serviceaccount:podiam:agent";
    let cases = [
        (
            "RoleBinding to a ClusterRole, by User",
            resource_review("alice", &[], ("list", "pods", "team-a", "")),
            Some(
                r#"RBAC: allowed by RoleBinding "readers/team-a" of ClusterRole "pod-reader" to User "alice""#,
            ),
        ),
        (
            "by Group",
            resource_review("dave", &["devs"], ("get", "pods", "team-a", "web")),
            Some(
                r#"RBAC: allowed by RoleBinding "readers/team-a" of ClusterRole "pod-reader" to Group "devs""#,
            ),
        ),
        (
            "by ServiceAccount subject",
            resource_review(
                agent,
                &["system:serviceaccounts"],
                ("watch", "pods", "team-a", ""),
            ),
            Some(
                r#"RBAC: allowed by RoleBinding "readers/team-a" of ClusterRole "pod-reader" to ServiceAccount "agent/podiam""#,
            ),
        ),
        (
            "resourceNames allow the named pod",
            resource_review("bob", &[], ("patch", "pods", "team-a", "web")),
            Some(
                r#"RBAC: allowed by RoleBinding "patchers/team-a" of Role "web-patcher" to User "bob""#,
            ),
        ),
        (
            "resourceNames deny other pods",
            resource_review("bob", &[], ("patch", "pods", "team-a", "api")),
            None,
        ),
        (
            "ClusterRoleBinding, all namespaces",
            resource_review("olga", &[], ("list", "pods", "", "")),
            Some(
                r#"RBAC: allowed by ClusterRoleBinding "operators" of ClusterRole "pod-reader" to User "olga""#,
            ),
        ),
        (
            "a RoleBinding is not cluster-wide",
            resource_review("alice", &[], ("list", "pods", "", "")),
            None,
        ),
        (
            "deny by default",
            resource_review("mallory", &[], ("get", "pods", "team-a", "web")),
            None,
        ),
        (
            "system:masters",
            resource_review(
                "root",
                &["system:masters"],
                ("delete", "namespaces", "", "x"),
            ),
            Some(""),
        ),
    ];
    for (name, review, reason) in cases {
        let status: SubjectAccessReviewStatus = api
            .create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(status.denied, Some(false), "{name}");
        match reason {
            Some(reason) => {
                assert!(status.allowed, "{name}: {status:?}");
                assert_eq!(status.reason.unwrap_or_default(), reason, "{name}");
            }
            None => assert!(!status.allowed, "{name}: {status:?}"),
        }
    }

    // Non-resource paths: discovery is open to every authenticated user.
    let path_review = |groups: Vec<String>| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some("carol".into()),
            groups: Some(groups),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some("/apis/rbac.authorization.k8s.io/v1".into()),
                verb: Some("get".into()),
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let allowed = |review: SubjectAccessReview| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &review)
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        }
    };
    assert!(allowed(path_review(vec!["system:authenticated".into()])).await);
    assert!(!allowed(path_review(vec![])).await);

    // A review without a subject is invalid.
    let mut nobody = resource_review("", &[], ("get", "pods", "team-a", ""));
    nobody.spec.user = None;
    match api.create(&PostParams::default(), &nobody).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422),
        other => panic!("expected 422, got {other:?}"),
    }
    assert_eq!(fx.emulator.subject_access_reviews(), before + 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_a_service_account_token_needs_auth_delegator_to_review() {
    // podiam's server as it runs in a cluster: its own service account token, and the
    // system:auth-delegator ClusterRole bound to it, let it create TokenReviews and
    // SubjectAccessReviews.
    let fx = Fixture::start().await;
    let pod_uid = fx.setup_agent();
    fx.emulator
        .create(service_account("podiam", "server"))
        .unwrap();
    let server_token = fx
        .emulator
        .mint_token("podiam", "server", &[], in_ten_minutes(), None)
        .unwrap();
    let server = fx
        .client_for(&fx.kubeconfig_for("server.yaml", &server_token))
        .await;
    let agent_token = fx
        .emulator
        .mint_token(
            "podiam",
            "agent",
            &["podiam"],
            in_ten_minutes(),
            Some(("agent-x", &pod_uid)),
        )
        .unwrap();
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(agent_token),
            audiences: Some(vec!["podiam".into()]),
        },
        ..TokenReview::default()
    };
    let reviews = Api::<TokenReview>::all(server);
    match reviews.create(&PostParams::default(), &review).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(status.message.contains(r#"cannot create resource "tokenreviews" in API group "authentication.k8s.io" at the cluster scope"#), "{}", status.message);
        }
        other => panic!("expected 403, got {other:?}"),
    }
    fx.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "podiam-server-auth",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=podiam:server",
    ])
    .await;
    let status = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.user.unwrap().extra.unwrap()["authentication.kubernetes.io/node-name"],
        ["node-3"]
    );
}
