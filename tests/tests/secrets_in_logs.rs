//! What reaches the daemons' logs: never a secret, and never a line a caller forged.
//!
//! No secret in any log line: both daemons run at `RUST_LOG=trace` — every crate, so that
//! tonic, h2, rustls, kube and the AWS SDK log what they log about headers and bodies —
//! through an issue, an operator's explain, a refresh, failures and a revocation; then every
//! line either daemon wrote is searched for every secret of the run. None may be there.
//!
//! The secrets: every `SecretAccessKey` and `SessionToken` STS issued (read off the wire by
//! the STS proxy, so refreshes no pod fetched count too) and every one a client was served;
//! the IMDSv2 tokens the clients got (a real botocore's and the test's own); the agent's
//! projected token; a pod's projected token sent to the container-credentials endpoint
//! (whole, and its signature); the operators' bearer tokens (a good one and a refused one); the agent's
//! IMDSv2 token keys; the private keys of the mutual-TLS certificates. Each is looked for as
//! written and percent-encoded.
//!
//! The logs are checked to be really at trace (h2's TRACE lines in each), so the test cannot
//! pass because logging was off. The one way known to put secrets there, the AWS SDK's
//! `LOG_SENSITIVE_BODIES=true`, stops the server from starting (`refused_at_start.rs`).
//!
//! No forged line: a CR LF in every string a caller sends (a role name from a pod and from
//! an agent, an explained namespace and pod name, an agent's version) is refused or
//! escaped, so no log line starts where the caller wanted one to.
//!
//! Needs root (the World's network namespaces).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use podiam_proto::v1::{
    ExplainRequest, GetCredentialsRequest, PodRef, StatusRequest, WatchNodeRequest, explain_request,
};
use podiam_tests::identity::ADMIN_TOKEN;
use podiam_tests::process::{wait_for, wait_until};
use podiam_tests::world::{
    BASE_ROLE_ARN, NODE_NAME, POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE, World, WorldConfig, metric_value,
};

/// Deadline for each step: a refresh is due 5 s after an issue and upkeep runs every 10 s.
const WAIT: Duration = Duration::from_secs(60);
/// The TTL header of an IMDSv2 token request.
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The token header of a metadata request.
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// Every secret of the run, each with what it is (the failure message names that, never the
/// secret: test output is a log too). Shared by the probes of condition waits.
#[derive(Default)]
struct Secrets(Mutex<Vec<(String, String)>>);

impl Secrets {
    fn add(&self, what: impl Into<String>, value: &str) {
        let (what, value) = (what.into(), value.trim());
        // Shorter strings would match by chance; none of the secrets here is that short.
        assert!(value.len() >= 16, "{what} is too short to be a secret");
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !all.iter().any(|(_, v)| v == value) {
            all.push((what, value.to_string()));
        }
    }

    /// Each secret as written, and percent-encoded (as in a query string or a form).
    fn forms(&self) -> Vec<(String, String)> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .flat_map(|(what, value)| {
                let encoded = percent_encoding::utf8_percent_encode(
                    value,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string();
                [(what.clone(), value.clone()), (what.clone(), encoded)]
            })
            .collect()
    }
}

/// An IMDSv2 token for `pod`, kept as a secret.
async fn imds_token(world: &World, pod: &str, secrets: &Secrets) -> String {
    let reply = world
        .metadata_request(pod, "PUT", "/latest/api/token", &[(TTL_HEADER, "21600")])
        .await
        .expect("token request");
    assert_eq!(reply.status, 200, "token for {pod}: {}", reply.body);
    secrets.add(format!("an IMDSv2 token of {pod}"), &reply.body);
    reply.body
}

/// What `pod` is answered for `role`'s credentials: the access key id on success, with the
/// secret key and session token kept as secrets; else the status and body.
async fn fetch(
    world: &World,
    pod: &str,
    role: &str,
    token: &str,
    secrets: &Secrets,
) -> Result<String, (u16, String)> {
    let reply = world
        .metadata_request(
            pod,
            "GET",
            &format!("/latest/meta-data/iam/security-credentials/{role}"),
            &[(TOKEN_HEADER, token)],
        )
        .await
        .expect("credentials request");
    if reply.status != 200 {
        return Err((reply.status, reply.body));
    }
    let document: serde_json::Value = serde_json::from_str(&reply.body).expect("a JSON document");
    let key = document["AccessKeyId"].as_str().expect("AccessKeyId");
    for field in ["SecretAccessKey", "Token"] {
        secrets.add(
            format!("the {field} served to {pod} with {key}"),
            document[field].as_str().expect("secret fields"),
        );
    }
    Ok(key.to_string())
}

/// [`fetch`] until it succeeds (within [`WAIT`]): this test is about what the logs hold, and a
/// first server call at trace level in a debug build on a busy machine may miss the agent's
/// deadline.
async fn fetched(world: &World, pod: &str, role: &str, token: &str, secrets: &Secrets) -> String {
    wait_for(WAIT, &format!("{pod}'s credentials"), || async {
        fetch(world, pod, role, token, secrets).await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The container endpoint's answer to `pod` with `auth`, asked until it is `status` (within
/// [`WAIT`]); credentials where a refusal is awaited fail at once.
async fn answered(
    world: &World,
    pod: &str,
    auth: &[(&str, &str)],
    status: u16,
) -> podiam_tests::netns::HttpReply {
    wait_for(WAIT, &format!("{pod} to be answered {status}"), || async {
        let reply = world
            .container_request(pod, "GET", "/v1/credentials", auth)
            .await
            .ok()?;
        assert!(
            status == 200 || reply.status != 200,
            "{pod} got credentials where {status} was awaited"
        );
        (reply.status == status).then_some(reply)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// botocore in `pod`, IMDSv2 only, recording the tokens it got: its ARN, the tokens and the
/// secrets of the credentials it used.
const BOTOCORE: &str = r#"
import json, sys, boto3, botocore.utils
tokens = []
fetch_token = botocore.utils.IMDSFetcher._fetch_metadata_token
def recording(self):
    token = fetch_token(self)
    tokens.append(token)
    return token
botocore.utils.IMDSFetcher._fetch_metadata_token = recording
session = boto3.Session()
creds = session.get_credentials()
if creds is None or creds.method != "iam-role":
    sys.exit("no credentials from instance metadata")
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
arn = sts.get_caller_identity()["Arn"]
frozen = creds.get_frozen_credentials()
print(json.dumps({"arn": arn, "tokens": tokens, "secrets": [frozen.secret_key, frozen.token]}))
"#;

async fn botocore_issue(world: &World, pod: &str, secrets: &Secrets) -> String {
    let output = world
        .pod_command(pod, "python3")
        .args(["-c", BOTOCORE, &world.pod(pod).sts_endpoint()])
        .env("AWS_EC2_METADATA_V1_DISABLED", "true")
        // This test is about what the logs hold, not about latency: a first answer slowed by
        // trace logging in a debug build on a busy machine is waited for and asked again.
        .env("AWS_METADATA_SERVICE_TIMEOUT", "5")
        .env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "3")
        .output()
        .await
        .expect("running botocore");
    assert!(
        output.status.success(),
        "botocore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).expect("botocore JSON");
    let tokens = answer["tokens"].as_array().expect("tokens");
    assert!(!tokens.is_empty(), "botocore asked for an IMDSv2 token");
    for token in tokens {
        secrets.add(
            format!("an IMDSv2 token botocore got in {pod}"),
            token.as_str().expect("token"),
        );
    }
    for secret in answer["secrets"].as_array().expect("secrets") {
        secrets.add(
            format!("a secret botocore used in {pod}"),
            secret.as_str().expect("secret"),
        );
    }
    answer["arn"].as_str().expect("arn").to_string()
}

/// The secret lines of a PEM private key (its base64 body).
fn pem_body_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("key file")
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .map(str::to_string)
        .collect()
}

/// Server replica `i`'s count of STS calls with `result`.
async fn sts_calls(world: &World, i: usize, result: &str) -> u64 {
    world.server_metrics_of(i).await.map_or(0, |metrics| {
        metric_value(
            &metrics,
            &format!("podiam_server_sts_calls_total{{result=\"{result}\"}}"),
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_log_line_at_trace() {
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let world = World::start(WorldConfig {
        start_agent: true,
        servers: 2,
        sts_proxy: true,
        log_level: Some("trace".into()),
        // Sessions of STS's shortest length, refreshed 5 s after issue; the agent keeps
        // credentials for 5 s, so the pod sees the refreshed ones soon after.
        server_args: args(&[
            "--session-duration",
            "15m",
            "--min-remaining",
            "14m",
            "--refresh-after",
            "5s",
        ]),
        agent_args: args(&["--min-remaining", "895s"]),
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "web", Some("app-reader"))
            .pod("team-a", "db", Some("app-writer"))
    })
    .await
    .expect("world starts");
    let secrets = Secrets::default();
    let secrets = &secrets;

    // An issue, to a real client.
    let arn = botocore_issue(&world, "web", secrets).await;
    assert!(arn.contains(":assumed-role/app-reader/"), "{arn}");
    let web_token = imds_token(&world, "web", secrets).await;
    let first_key = fetched(&world, "web", "app-reader", &web_token, secrets).await;
    let db_token = imds_token(&world, "db", secrets).await;
    fetched(&world, "db", "app-writer", &db_token, secrets).await;

    // Operators: one allowed to explain, one whose token the API refuses.
    let mut admin = world.admin_client().await.expect("admin client");
    let explained = admin
        .explain(ExplainRequest {
            target: Some(explain_request::Target::Pod(PodRef {
                namespace: "team-a".into(),
                name: "web".into(),
                uid: String::new(),
            })),
        })
        .await
        .expect("explain")
        .into_inner();
    assert!(explained.allowed, "{explained:?}");
    secrets.add("the operator's token", ADMIN_TOKEN);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let bogus = format!("not-a-kubernetes-token-{nanos}");
    secrets.add("a refused operator token", &bogus);
    let refused = world
        .operator_client(Some(&bogus))
        .await
        .expect("operator client")
        .explain(ExplainRequest {
            target: Some(explain_request::Target::Ip("10.0.0.1".into())),
        })
        .await
        .expect_err("a token the API does not accept");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // A failure at the agent: web's token replayed from db.
    let (status, _) = fetch(&world, "db", "app-writer", &web_token, secrets)
        .await
        .expect_err("another pod's token");
    assert_eq!(status, 401);

    // The container-credentials endpoint: web's own pod token accepted, then replayed from
    // db and refused.
    let pod_token = world
        .mint_pod_token("team-a", "web", POD_TOKEN_AUDIENCE, POD_TOKEN_LIFE)
        .expect("web's pod token");
    secrets.add("web's pod token", &pod_token);
    let signature = pod_token.rsplit('.').next().expect("a JWT");
    secrets.add("the signature of web's pod token", signature);
    let auth = [("Authorization", pod_token.as_str())];
    // Asked until answered (a TokenReview and a server call under trace logging): what
    // matters here is what the logs hold of it.
    let reply = answered(&world, "web", &auth, 200).await;
    let document: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    for field in ["SecretAccessKey", "Token"] {
        secrets.add(
            format!("the {field} of web's container document"),
            document[field].as_str().expect("secret fields"),
        );
    }
    let replayed = answered(&world, "db", &auth, 400).await;
    assert!(
        replayed.body.contains("pod-token-refused"),
        "{}",
        replayed.body
    );

    // A refresh: STS is asked again for web's role, and web is served the new credentials.
    let web_arn = format!("{BASE_ROLE_ARN}app-reader");
    wait_until(WAIT, "a refresh of web's credentials at STS", || async {
        world
            .sts_proxy()
            .assume_role_calls()
            .iter()
            .filter(|c| c.status == 200 && c.param("RoleArn") == Some(web_arn.as_str()))
            .count()
            >= 4 // two replicas, each an issue and a refresh
    })
    .await
    .expect("refreshed");
    let second_key = wait_for(WAIT, "web to be served refreshed credentials", || {
        let (world, token, first_key) = (&world, &web_token, &first_key);
        async move {
            fetch(world, "web", "app-reader", token, secrets)
                .await
                .ok()
                .filter(|key| key != first_key)
        }
    })
    .await
    .expect("refreshed credentials served");
    assert_ne!(second_key, first_key);

    // A failure at STS: db's new role cannot be had while STS answers 503.
    world.sts_proxy().set_failing(true);
    world
        .kubectl_ok(&[
            "annotate",
            "pod",
            "-n",
            "team-a",
            "db",
            "--overwrite",
            "iam.amazonaws.com/role=app-admin",
        ])
        .await
        .expect("db's role changed");
    wait_until(WAIT, "db to be refused for STS", || {
        let (world, token) = (&world, &db_token);
        async move {
            matches!(
                fetch(world, "db", "app-admin", token, secrets).await,
                Err((502, body)) if body.contains("sts-unavailable")
            )
        }
    })
    .await
    .expect("db refused while STS fails");
    assert!(
        sts_calls(&world, 0, "unavailable").await + sts_calls(&world, 1, "unavailable").await > 0
    );
    world.sts_proxy().set_failing(false);
    wait_until(WAIT, "db to get its new role once STS is back", || {
        let (world, token) = (&world, &db_token);
        async move {
            fetch(world, "db", "app-admin", token, secrets)
                .await
                .is_ok()
        }
    })
    .await
    .expect("db's new credentials");

    // A revocation: web loses its role and is refused.
    world
        .kubectl_ok(&[
            "annotate",
            "pod",
            "-n",
            "team-a",
            "web",
            "iam.amazonaws.com/role-",
        ])
        .await
        .expect("web's role removed");
    wait_until(WAIT, "web to be refused once its role is gone", || {
        let (world, token) = (&world, &web_token);
        async move {
            matches!(
                fetch(world, "web", "app-reader", token, secrets).await,
                Err((404, _))
            )
        }
    })
    .await
    .expect("web refused");

    // Every line of every daemon, every process of the run: read before the secrets are
    // listed, as sessions go on being issued (`--refresh-after`), so that every secret a line
    // read could hold is searched for.
    let mut logs = vec![("the agent".to_string(), world.agent_log_text())];
    for i in 0..world.replicas().len() {
        logs.push((format!("server replica {i}"), world.server_log_text_of(i)));
    }

    // Everything STS issued, and the standing secrets.
    let calls = world.sts_proxy().calls();
    let issued: usize = calls.iter().map(|c| c.issued_secrets.len()).sum();
    assert!(
        issued >= 8,
        "STS issued at least 4 sessions: {issued} secrets"
    );
    for call in calls {
        for secret in &call.issued_secrets {
            secrets.add(
                format!(
                    "a secret STS issued with {}",
                    call.issued_key.as_deref().unwrap_or("?")
                ),
                secret,
            );
        }
    }
    let agent_token = std::fs::read_to_string(world.agent_token_file()).expect("agent token");
    secrets.add("the agent's projected token", &agent_token);
    let keys = std::fs::read_to_string(world.agent_token_key_file()).expect("token keys");
    for key in keys
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
    {
        secrets.add("an IMDSv2 token key", key);
    }
    let certs = world.certs();
    for (what, path) in [
        ("the CA's private key", &certs.ca_key),
        ("the server's private key", &certs.server_key),
        ("the agent's private key", &certs.agent_key),
    ] {
        for line in pem_body_lines(path) {
            secrets.add(what, &line);
        }
    }

    for (whose, log) in &logs {
        let trace_lines = log.lines().filter(|l| l.contains(" TRACE ")).count();
        assert!(
            log.lines()
                .any(|l| l.contains(" TRACE ") && l.contains(" h2::")),
            "{whose}'s log is not at trace ({trace_lines} TRACE lines, none from h2)"
        );
        assert!(
            trace_lines > 100,
            "{whose}'s log has only {trace_lines} TRACE lines"
        );
    }
    // The search reads the right lines: the audit line of the first issue names its access
    // key id (not a secret).
    assert!(
        logs.iter()
            .any(|(_, log)| log.contains(&format!("access_key_id={first_key}"))),
        "no audit line names {first_key}"
    );
    let forms = secrets.forms();
    let mut leaks = Vec::new();
    for (whose, log) in &logs {
        for (number, line) in log.lines().enumerate() {
            for (what, secret) in &forms {
                if line.contains(secret.as_str()) {
                    leaks.push(format!("{what}: {whose}'s log, line {}", number + 1));
                }
            }
        }
    }
    let lines: usize = logs.iter().map(|(_, log)| log.lines().count()).sum();
    assert!(
        leaks.is_empty(),
        "secrets in the logs ({} secrets, {lines} lines searched):\n{}",
        forms.len() / 2,
        leaks.join("\n")
    );
    eprintln!(
        "{} secrets, none in {lines} log lines ({} bytes)",
        forms.len() / 2,
        logs.iter().map(|(_, log)| log.len()).sum::<usize>()
    );
}

/// The start of the line a caller tries to forge with a CR LF.
const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO podiam::audit: forged";

/// `text` with a CR LF and a forged line after it.
fn injected(text: &str) -> String {
    format!("{text}\r\n{FORGED}")
}

#[tokio::test(flavor = "multi_thread")]
async fn no_caller_string_forges_a_log_line() {
    let world = World::start(podiam_tests::fixtures::web_with_agent())
        .await
        .expect("world starts");
    let invalid = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(!status.message().contains(FORGED), "{status:?}");
    };

    // An agent's call naming a role with a CR LF in it (a pod's request passed on).
    let agent = world.server_client().await.expect("agent client");
    let refused = agent
        .clone()
        .get_credentials(GetCredentialsRequest {
            ip: world.pod("web").ip().to_string(),
            role_name: injected("app-reader"),
            node_name: NODE_NAME.into(),
            pod_token: String::new(),
        })
        .await
        .expect_err("not a role name");
    invalid(refused);

    // Explain of such a namespace, by an operator the API lets explain nothing (the refusal
    // would name the namespace), and of such a pod, by one allowed everything.
    let nobody = "token-of-an-operator-with-no-rights";
    world.emulator().add_user_token(nobody, "nobody", &[]);
    for (token, namespace, name) in [
        (nobody, injected("team-a"), "web".to_string()),
        (ADMIN_TOKEN, "team-a".to_string(), injected("web")),
    ] {
        let refused = world
            .operator_client(Some(token))
            .await
            .expect("operator client")
            .explain(ExplainRequest {
                target: Some(explain_request::Target::Pod(PodRef {
                    namespace,
                    name,
                    uid: String::new(),
                })),
            })
            .await
            .expect_err("not Kubernetes names");
        invalid(refused);
    }

    // A node stream whose agent says its version has a CR LF and a terminal escape in it:
    // operators see the version printable.
    let _stream = agent
        .clone()
        .watch_node(WatchNodeRequest {
            node_name: NODE_NAME.into(),
            agent_version: injected("0.1.0\u{1b}[2J"),
        })
        .await
        .expect("node stream");
    let status = world
        .admin_client()
        .await
        .expect("admin client")
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let versions: Vec<&str> = status
        .agents
        .iter()
        .map(|a| a.agent_version.as_str())
        .collect();
    assert!(
        versions.iter().any(|v| v.contains("forged")),
        "{versions:?}"
    );
    assert!(
        versions
            .iter()
            .all(|v| !v.contains(|c: char| c.is_control())),
        "{versions:?}"
    );

    // A pod asking for such a role.
    let reply = world
        .metadata_request(
            "web",
            "GET",
            "/latest/meta-data/iam/security-credentials/app-reader%0D%0A2026-01-01T00:00:00Z%20INFO",
            &[],
        )
        .await
        .expect("request");
    assert_eq!(reply.status, 404, "{}", reply.body);

    // The pod's own role still works, and every line of every log starts where a line does.
    let reply = world
        .metadata_request(
            "web",
            "GET",
            "/latest/meta-data/iam/security-credentials/app-reader",
            &[],
        )
        .await
        .expect("request");
    assert_eq!(reply.status, 200);
    let mut logs = vec![("the agent".to_string(), world.agent_log_text())];
    for i in 0..world.replicas().len() {
        logs.push((format!("server replica {i}"), world.server_log_text_of(i)));
    }
    for (whose, log) in &logs {
        let forged: Vec<&str> = log
            .lines()
            .filter(|line| line.starts_with(FORGED) || line.starts_with("2026-01-01T00:00:00Z"))
            .collect();
        assert!(
            forged.is_empty(),
            "{whose}'s log has forged lines: {forged:?}"
        );
    }
    assert!(
        logs[1].1.contains("role_name is not an IAM role name"),
        "the server logged the refusal (at debug)"
    );
}
