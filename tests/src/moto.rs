//! moto's STS (and every other AWS service it emulates) on a loopback port.
//!
//! [`Moto::start`] runs `moto_server -H 127.0.0.1 -p 0` under a [`ChildGuard`]: the kernel
//! picks the port and moto's server (werkzeug) says which in its start-up line
//! ` * Running on http://127.0.0.1:PORT`, so no port is guessed and none can be taken by
//! another process in between. It returns once moto answers its own
//! `/moto-api/data.json` there and has answered one `AssumeRole` of its own: moto loads a
//! service's code on the first request for it, which takes over a second on two busy cores,
//! and a real STS has no such first call, so no test's first credentials pay for it. Facts
//! the suites rely on (proved in `tests/harness.rs`):
//! - any role ARN can be assumed, the role need not exist in moto's IAM, any account id
//!   in the ARN is accepted;
//! - `get-caller-identity` with the returned credentials prints
//!   `arn:aws:sts::ACCOUNT:assumed-role/ROLE_NAME/SESSION` (a role's path is dropped);
//! - moto's own account is [`MOTO_ACCOUNT_ID`]; any dummy credentials
//!   ([`Moto::client_env`]) sign requests it accepts;
//! - the AWS CLI rejects session names shorter than 2 characters before sending.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::{ChildGuard, ProcessError, wait_for, wait_until};

/// The account moto uses for its own identities and as the default.
pub const MOTO_ACCOUNT_ID: &str = "123456789012";
/// The program started; from PyPI `moto[server]`.
pub const MOTO_SERVER: &str = "moto_server";
/// moto imports its whole service catalogue lazily but Flask start-up still takes one to
/// three seconds on two cores; the bound only catches a broken install.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What werkzeug's start-up line says before the address it listens on.
const RUNNING_ON: &str = "Running on http://127.0.0.1:";
/// A readiness probe's own bound.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of starting moto.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// Spawning or awaiting failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// moto exited, or never said where it listens or answered there.
    #[error("moto_server did not start: {why}; log:\n{log}")]
    NotStarted {
        /// What went wrong.
        why: String,
        /// Its log's tail.
        log: String,
    },
}

/// A running moto server; stopped on drop.
#[derive(Debug)]
pub struct Moto {
    guard: ChildGuard,
    port: u16,
}

impl Moto {
    /// Starts moto on a loopback port of the kernel's choosing and waits until it answers
    /// HTTP there.
    pub async fn start() -> Result<Self, MotoError> {
        let mut cmd = Command::new(MOTO_SERVER);
        cmd.args(["-H", "127.0.0.1", "-p", "0"]);
        let mut guard = ChildGuard::spawn("moto", cmd)?;
        let not_started = |guard: &ChildGuard, why: String| MotoError::NotStarted {
            why,
            log: guard.log_tail(20),
        };
        let log = guard.log_path().to_path_buf();
        let port = wait_for(START_TIMEOUT, "moto_server to say its port", || {
            let exited = !matches!(guard.try_status(), Ok(None));
            let port = std::fs::read_to_string(&log)
                .ok()
                .and_then(|text| listening_port(&text));
            async move {
                match port {
                    Some(port) => Some(Some(port)),
                    None if exited => Some(None),
                    None => None,
                }
            }
        })
        .await
        .map_err(|e| not_started(&guard, e.to_string()))?
        .ok_or_else(|| not_started(&guard, "it exited".into()))?;
        wait_until(START_TIMEOUT, "moto_server to answer HTTP", || {
            answers_as_moto(port)
        })
        .await
        .map_err(|e| not_started(&guard, e.to_string()))?;
        wait_until(START_TIMEOUT, "moto_server to answer an AssumeRole", || {
            answers(port, WARM_UP, "<AssumeRoleResponse")
        })
        .await
        .map_err(|e| not_started(&guard, e.to_string()))?;
        Ok(Self { guard, port })
    }

    /// `http://127.0.0.1:PORT`, for `--endpoint-url` / `AWS_ENDPOINT_URL_STS`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The loopback address moto listens on (a [`crate::bridge::Bridge`] target).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The moto process.
    pub fn process(&self) -> &ChildGuard {
        &self.guard
    }

    /// Dummy credentials and region for clients of moto (the server under test, the AWS
    /// CLI): moto accepts any signature.
    pub fn client_env() -> [(&'static str, &'static str); 4] {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

/// The port of werkzeug's start-up line in moto's log, once the line is there whole.
fn listening_port(log: &str) -> Option<u16> {
    let (_, rest) = log.split_once(RUNNING_ON)?;
    let (line, _) = rest.split_once('\n')?;
    line.trim_end().parse().ok().filter(|port| *port != 0)
}

/// moto's own data, as JSON.
const DATA_JSON: &[u8] = b"GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
/// An STS `AssumeRole` (moto takes any signature; the credential scope names the service).
const WARM_UP: &[u8] = b"POST / HTTP/1.0\r\nHost: 127.0.0.1\r\n\
Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00\r\n\
Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 117\r\n\r\n\
Action=AssumeRole&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/moto-warm-up&RoleSessionName=moto-warm-up";

/// True when something on `port` answers `/moto-api/data.json` like moto (200, JSON).
async fn answers_as_moto(port: u16) -> bool {
    answers(port, DATA_JSON, "{").await
}

/// True when something on `port` answers `request` with 200 and a body that starts with
/// `starts`, within [`PROBE_TIMEOUT`].
async fn answers(port: u16, request: &[u8], starts: &str) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        stream.write_all(request).await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some(
            head.starts_with("HTTP/1.")
                && head.contains(" 200 ")
                && body.trim_start().starts_with(starts),
        )
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// Runs the AWS CLI `command` against moto with `creds` (environment variables) and no
/// config or credentials file, and returns its JSON output; panics if it fails.
pub async fn aws_cli_json(
    command: &mut tokio::process::Command,
    creds: &[(&str, &str)],
) -> serde_json::Value {
    for (key, value) in Moto::client_env() {
        command.env(key, value);
    }
    command
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    for (key, value) in creds {
        command.env(key, value);
    }
    let output = command
        .args(["--output", "json"])
        .output()
        .await
        .expect("the AWS CLI runs");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("the AWS CLI printed JSON")
}

#[cfg(test)]
mod tests {
    use super::{WARM_UP, listening_port};

    #[test]
    fn the_port_is_read_from_werkzeugs_start_up_line() {
        let log = "WARNING: This is a development server.\n * Running on http://127.0.0.1:40827\nPress CTRL+C to quit\n";
        assert_eq!(listening_port(log), Some(40827));
        assert_eq!(
            listening_port(" * Running on http://127.0.0.1:4\r\n"),
            Some(4)
        );
        // Half-written: not yet.
        assert_eq!(listening_port(" * Running on http://127.0.0.1:4"), None);
        assert_eq!(
            listening_port("WARNING: This is a development server.\n"),
            None
        );
    }

    #[test]
    fn the_warm_up_request_says_its_body_length() {
        let text = std::str::from_utf8(WARM_UP).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let length = format!("Content-Length: {}", body.len());
        assert!(head.split("\r\n").any(|line| line == length), "{head}");
    }
}
