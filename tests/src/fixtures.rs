//! Fixtures more than one suite uses: the usual namespace and pods, the repository's root,
//! a role granted or revoked with the real `kubectl`, the names of pods under load, and the
//! API emulator alone with kubectl beside it ([`ApiFixture`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::kube_emulator::{EmulatorOptions, KubeEmulator};
use crate::world::{World, WorldConfig};

/// Where pods list their roles (the IMDS credentials path).
pub const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

pub use crate::process::repo_root;

/// team-a permits `app-.*`; pod `web` has `app-reader`, pod `plain` has no role, pod
/// `greedy` asks for `admin` (not permitted). The agent is not started.
pub fn team_a() -> WorldConfig {
    WorldConfig::default()
        .namespace("team-a", Some("app-.*"))
        .pod("team-a", "web", Some("app-reader"))
        .pod("team-a", "plain", None)
        .pod("team-a", "greedy", Some("admin"))
}

/// [`team_a`] with the agent started.
pub fn team_a_with_agent() -> WorldConfig {
    WorldConfig {
        start_agent: true,
        ..team_a()
    }
}

/// The smallest installation with the agent: team-a permits `app-.*` and pod `web` has
/// `app-reader`.
pub fn web_with_agent() -> WorldConfig {
    WorldConfig {
        start_agent: true,
        ..WorldConfig::default()
            .namespace("team-a", Some("app-.*"))
            .pod("team-a", "web", Some("app-reader"))
    }
}

/// `kubectl annotate pod POD -n NAMESPACE iam.amazonaws.com/role=ROLE` (`None`: removes the
/// annotation, a revocation), as a team would.
pub async fn set_pod_role(
    world: &World,
    namespace: &str,
    pod: &str,
    role: Option<&str>,
) -> anyhow::Result<()> {
    let annotation = match role {
        Some(role) => format!("iam.amazonaws.com/role={role}"),
        None => "iam.amazonaws.com/role-".to_string(),
    };
    let mut args = vec!["annotate", "pod", pod, "-n", namespace, annotation.as_str()];
    if role.is_some() {
        args.push("--overwrite");
    }
    world.kubectl_ok(&args).await?;
    Ok(())
}

/// The name of pod `i` of a fleet of pods under load (`app-0`, `app-1`, …).
pub fn pod_name(i: usize) -> String {
    format!("app-{i}")
}

/// The role of pod `i` of a fleet under load: `app-reader` and `app-writer` by turns, so
/// that both roles are fetched at once.
pub fn role_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "app-reader"
    } else {
        "app-writer"
    }
}

/// What a run of the real `kubectl` gave.
#[derive(Debug)]
pub struct Kubectl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The real kubectl (the machine image has it; the tests need the real one).
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// How long one kubectl run or one request may take on a busy 2-core machine.
const API_DEADLINE: Duration = Duration::from_secs(30);

/// The Kubernetes API emulator alone, in-process (no root), with a private HOME and the
/// admin's kubeconfig under a directory of its own that is removed on drop: the fixture of
/// the suites that test the emulator and the API's authentication.
pub struct ApiFixture {
    pub emulator: KubeEmulator,
    pub dir: PathBuf,
    /// The admin's kubeconfig (plain HTTP, no credentials: everything allowed).
    pub kubeconfig: PathBuf,
    pub http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for ApiFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiFixture")
            .field("url", &self.emulator.url())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ApiFixture {
    /// Starts an emulator with `options`; `suite` names the directory.
    pub async fn start(suite: &str, options: EmulatorOptions) -> ApiFixture {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "podiam-{suite}-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let emulator = KubeEmulator::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options)
            .await
            .expect("starting the emulator");
        let kubeconfig = dir.join("kubeconfig");
        emulator
            .write_kubeconfig(&kubeconfig)
            .expect("writing the kubeconfig");
        ApiFixture {
            emulator,
            dir,
            kubeconfig,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Runs the real kubectl with `kubeconfig` and the fixture's private HOME.
    pub async fn kubectl_with(&self, kubeconfig: &Path, args: &[&str]) -> Kubectl {
        assert!(
            Path::new(KUBECTL).exists(),
            "{KUBECTL} is missing: these tests need the real kubectl (it is on the machine image)"
        );
        let output = tokio::time::timeout(
            API_DEADLINE,
            tokio::process::Command::new(KUBECTL)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(args)
                .env("HOME", &self.dir)
                .env_remove("KUBECONFIG")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {API_DEADLINE:?}"))
        .expect("running kubectl");
        Kubectl {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A kube-rs client from `kubeconfig`.
    pub async fn client_for(&self, kubeconfig: &Path) -> kube::Client {
        podiam_runtime::tls::install_crypto_provider();
        let kubeconfig =
            kube::config::Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("building a kube config");
        kube::Client::try_from(config).expect("building a kube client")
    }

    /// One plain-HTTP request with `headers`; returns the status and the JSON body (`Null`
    /// when the body is not JSON).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.emulator.url()));
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = tokio::time::timeout(
            API_DEADLINE,
            self.http
                .request(builder.body(Full::new(body)).expect("a request")),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path} did not finish within {API_DEADLINE:?}"))
        .expect("sending the request");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("reading the body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

impl Drop for ApiFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
