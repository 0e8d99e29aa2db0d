//! Clients as applications hold them, run inside a pod's namespace (the AWS CLI, boto3, the
//! Rust SDK, the Go SDKs v1 and v2, raw metadata requests), and gRPC clients of the servers as
//! an agent or an operator, and kubeconfigs for users.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use anyhow::Context;

use super::{POD_HTTP_TIMEOUT, World, agent_material, binary};
use crate::identity;
use crate::netns::{self, HttpReply};

/// How boto3 talks to the metadata service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boto3Mode {
    /// botocore's default: a token first, IMDSv1 if the token PUT fails.
    Default,
    /// No token is ever requested.
    V1,
    /// `AWS_EC2_METADATA_V1_DISABLED=true`: tokens only.
    V2Only,
}

impl Boto3Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Boto3Mode::Default => "default",
            Boto3Mode::V1 => "v1",
            Boto3Mode::V2Only => "v2",
        }
    }
}

/// Which AWS SDK for Go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GoSdk {
    /// `github.com/aws/aws-sdk-go`: `ec2metadata` and `ec2rolecreds`.
    V1,
    /// `github.com/aws/aws-sdk-go-v2`: `feature/ec2/imds` and `credentials/ec2rolecreds`.
    V2,
}

impl GoSdk {
    /// The client's `-sdk` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            GoSdk::V1 => "v1",
            GoSdk::V2 => "v2",
        }
    }
}

/// The Go SDKs' client (`tests/go`), which `scripts/setup` builds.
pub fn go_client() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/go/podiam-go-client");
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run scripts/setup, which builds it with the Go SDKs",
        path.display()
    );
    Ok(path)
}

/// Where an SDK in a pod gets its credentials from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The instance metadata chain (169.254.169.254), the SDKs' last resort.
    Metadata,
    /// The container-credentials endpoint: `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` as the admission webhook set them in the
    /// stored pod, the pod's projected token where the webhook mounted it. The world needs
    /// [`crate::world::WorldConfig::pod_identity`].
    Container,
}

/// What a client in a pod saw: its ARN, and its credentials' remaining life in seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub arn: String,
    pub remaining_secs: i64,
}

impl Identity {
    /// Parses a client's two output lines: ARN, then remaining seconds.
    fn parse(output: &str) -> Result<Identity, String> {
        let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
        let arn = lines.next().ok_or("no ARN printed")?.to_string();
        let remaining_secs = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| format!("no remaining seconds after {arn}"))?;
        Ok(Identity {
            arn,
            remaining_secs,
        })
    }
}

impl World {
    /// A command run inside `pod`'s namespace with a clean AWS environment: no credentials,
    /// no config files, so the SDKs must use the instance-metadata chain.
    pub fn pod_command(&self, pod: &str, program: &str) -> tokio::process::Command {
        let mut command = self.pod(pod).net.netns.command(program);
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            command.env_remove(var);
        }
        let home = self.dir.join("home");
        command
            .env("HOME", &home)
            .env("AWS_CONFIG_FILE", home.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("NO_PROXY", "*")
            .kill_on_drop(true);
        command
    }

    /// A [`World::pod_command`] whose SDKs take credentials `via` the given endpoint: for
    /// the container endpoint, run as the pod's container runs, with what the webhook put
    /// in it (see [`World::container_command`]).
    pub fn pod_command_via(
        &self,
        pod: &str,
        program: &str,
        via: Via,
    ) -> anyhow::Result<tokio::process::Command> {
        match via {
            Via::Metadata => Ok(self.pod_command(pod, program)),
            Via::Container => self.container_command(pod, program),
        }
    }

    /// `aws sts get-caller-identity` in `pod`: the caller's ARN, or the CLI's error text.
    pub async fn aws_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        self.aws_caller_arn_via(pod, Via::Metadata).await
    }

    /// `aws sts get-caller-identity` in `pod` with credentials `via` an endpoint.
    pub async fn aws_caller_arn_via(
        &self,
        pod: &str,
        via: Via,
    ) -> anyhow::Result<Result<String, String>> {
        let output = self
            .pod_command_via(pod, "aws", via)?
            .args([
                "sts",
                "get-caller-identity",
                "--query",
                "Arn",
                "--output",
                "text",
            ])
            .args(["--endpoint-url", &self.pod(pod).sts_endpoint()])
            .output()
            .await
            .context("running the AWS CLI")?;
        Ok(outcome(output))
    }

    /// boto3 in `pod` in the given mode: the caller's ARN, or the error.
    pub async fn boto3_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        Ok(self
            .boto3_identity(pod, Boto3Mode::V2Only)
            .await?
            .map(|id| id.arn))
    }

    /// boto3 in `pod`: who it is and how long its credentials have left, or the error.
    pub async fn boto3_identity(
        &self,
        pod: &str,
        mode: Boto3Mode,
    ) -> anyhow::Result<Result<Identity, String>> {
        self.boto3_identity_via(pod, mode, Via::Metadata).await
    }

    /// boto3 in `pod` with credentials `via` an endpoint (botocore's container provider
    /// for the container endpoint; `mode` is then moot).
    pub async fn boto3_identity_via(
        &self,
        pod: &str,
        mode: Boto3Mode,
        via: Via,
    ) -> anyhow::Result<Result<Identity, String>> {
        const SCRIPT: &str = r#"
import sys, time, boto3, botocore.utils
if sys.argv[2] == "v1":
    # IMDSv1: never ask for a token, as an SDK facing an IMDSv1-only service ends up doing.
    botocore.utils.IMDSFetcher._fetch_metadata_token = lambda self: None
session = boto3.Session()
creds = session.get_credentials()
if creds is None:
    sys.exit("boto3 found no credentials")
if creds.method != sys.argv[3]:
    sys.exit("credentials came from %s, not %s" % (creds.method, sys.argv[3]))
remaining = int(creds._expiry_time.timestamp() - time.time())
sts = session.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sts.get_caller_identity()["Arn"])
print(remaining)
"#;
        let method = match via {
            Via::Metadata => "iam-role",
            Via::Container => "container-role",
        };
        let mut command = self.pod_command_via(pod, "python3", via)?;
        let sts = self.pod(pod).sts_endpoint();
        command.args(["-c", SCRIPT, &sts, mode.as_arg(), method]);
        if mode == Boto3Mode::V2Only {
            command.env("AWS_EC2_METADATA_V1_DISABLED", "true");
        }
        let output = command.output().await.context("running boto3")?;
        Ok(outcome(output).and_then(|out| Identity::parse(&out)))
    }

    /// The Rust SDK's IMDS credentials provider in `pod`: the caller's ARN, or the error.
    pub async fn rust_sdk_caller_arn(&self, pod: &str) -> anyhow::Result<Result<String, String>> {
        Ok(self.rust_sdk_identity(pod).await?.map(|id| id.arn))
    }

    /// The Rust SDK in `pod`: who it is and how long its credentials have left, or the error.
    pub async fn rust_sdk_identity(&self, pod: &str) -> anyhow::Result<Result<Identity, String>> {
        self.rust_sdk_identity_via(pod, Via::Metadata).await
    }

    /// The Rust SDK in `pod` with credentials `via` an endpoint: aws-config's IMDS
    /// provider, or its ECS (container) provider.
    pub async fn rust_sdk_identity_via(
        &self,
        pod: &str,
        via: Via,
    ) -> anyhow::Result<Result<Identity, String>> {
        let client = binary("podiam-sdk-client")?;
        let provider = match via {
            Via::Metadata => "imds",
            Via::Container => "container",
        };
        let output = self
            .pod_command_via(pod, client.to_str().context("path")?, via)?
            .args(["--sts-endpoint", &self.pod(pod).sts_endpoint()])
            .args(["--provider", provider])
            .output()
            .await
            .context("running the Rust SDK client")?;
        Ok(outcome(output).and_then(|out| Identity::parse(&out)))
    }

    /// The AWS SDK for Go (`sdk`) in `pod`: its default credential chain, which must end at
    /// the EC2 role provider, then STS: who it is and how long its credentials have left, or
    /// the error.
    pub async fn go_sdk_identity(
        &self,
        pod: &str,
        sdk: GoSdk,
    ) -> anyhow::Result<Result<Identity, String>> {
        let client = go_client()?;
        let output = self
            .pod_command(pod, client.to_str().context("path")?)
            .args(["identity", "-sdk", sdk.as_arg()])
            .args(["-sts", &self.pod(pod).sts_endpoint()])
            .output()
            .await
            .context("running the Go SDK client")?;
        Ok(outcome(output).and_then(|out| Identity::parse(&out)))
    }

    /// One HTTP request from inside `pod` to the container-credentials endpoint,
    /// `http://169.254.170.23{path}`.
    pub async fn container_request(
        &self,
        pod: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        let url = format!("http://{}{path}", netns::CONTAINER_IP);
        Ok(self
            .pod(pod)
            .net
            .netns
            .http_request(method, &url, headers, POD_HTTP_TIMEOUT)
            .await?)
    }

    /// One HTTP request from inside `pod` to `url`.
    pub async fn pod_request(
        &self,
        pod: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        Ok(self
            .pod(pod)
            .net
            .netns
            .http_request(method, url, headers, POD_HTTP_TIMEOUT)
            .await?)
    }

    /// One HTTP request from inside `pod` to `http://169.254.169.254{path}`.
    pub async fn metadata_request(
        &self,
        pod: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        let url = format!("http://{}{path}", netns::METADATA_IP);
        Ok(self
            .pod(pod)
            .net
            .netns
            .http_request(method, &url, headers, POD_HTTP_TIMEOUT)
            .await?)
    }

    /// A gRPC client of the (first) server with the agent's certificate and token (a test
    /// acting as this world's agent).
    pub async fn server_client(&self) -> anyhow::Result<identity::Client> {
        let token = std::fs::read_to_string(&self.agent_token_file)?;
        self.agent_client(self.server_addr(), Some(&token)).await
    }

    /// A gRPC client of the server at `addr` with the agent's certificate and `token`.
    pub async fn agent_client(
        &self,
        addr: SocketAddr,
        token: Option<&str>,
    ) -> anyhow::Result<identity::Client> {
        let material = agent_material(&self.certs)?;
        let ca = std::fs::read(&self.certs.ca_cert)?;
        identity::client(addr, &ca, Some(&material), token).await
    }

    /// A gRPC client of the (first) server as an operator: no podiam key, `token` (a user's
    /// own Kubernetes token) on every call.
    pub async fn operator_client(&self, token: Option<&str>) -> anyhow::Result<identity::Client> {
        let ca = std::fs::read(&self.certs.ca_cert)?;
        identity::client(self.server_addr(), &ca, None, token).await
    }

    /// A gRPC client of the (first) server as an operator allowed everything.
    pub async fn admin_client(&self) -> anyhow::Result<identity::Client> {
        self.operator_client(Some(identity::ADMIN_TOKEN)).await
    }

    /// A kubeconfig for the user with `token` (over TLS: kubectl sends credentials to TLS
    /// servers only), written once under the world's directory.
    pub fn user_kubeconfig(&self, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!(
            "kubeconfig-{}",
            token
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(24)
                .collect::<String>()
        ));
        self.emulator.write_kubeconfig_for_token(&path, token)?;
        Ok(path)
    }

    /// A kubeconfig for an operator allowed everything, with a bearer token.
    pub fn admin_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        self.user_kubeconfig(identity::ADMIN_TOKEN)
    }
}

/// A client's outcome: its trimmed stdout on success, its stderr (and stdout) otherwise.
fn outcome(output: Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{} {stdout}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
