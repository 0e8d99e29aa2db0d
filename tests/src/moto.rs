//! moto's STS (and every other AWS service it emulates) on a free loopback port.
//!
//! [`Moto::start`] runs `moto_server -H 127.0.0.1 -p PORT` under a [`ChildGuard`], retrying
//! with another port when the chosen one turns out taken, and returns once moto answers its
//! own `/moto-api/data.json`. Facts the suites rely on (proved in `tests/harness.rs`):
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

use crate::process::{ChildGuard, ProcessError, free_loopback_port, wait_until};

/// The account moto uses for its own identities and as the default.
pub const MOTO_ACCOUNT_ID: &str = "123456789012";
/// The program started; from PyPI `moto[server]`.
pub const MOTO_SERVER: &str = "moto_server";
/// moto imports its whole service catalogue lazily but Flask start-up still takes one to
/// three seconds on two cores; the bound only catches a broken install.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries with fresh ports when the one chosen was taken in the meantime.
const START_ATTEMPTS: usize = 4;
/// A readiness probe's own bound.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of starting moto.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// Spawning or awaiting failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// moto exited or never answered, on every attempt.
    #[error("moto_server did not start after {attempts} attempts; last log:\n{log}")]
    NotStarted {
        /// Attempts made.
        attempts: usize,
        /// The last attempt's log tail.
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
    /// Starts moto on a free loopback port and waits until it answers HTTP.
    pub async fn start() -> Result<Self, MotoError> {
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_loopback_port()?;
            let mut cmd = Command::new(MOTO_SERVER);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            let mut guard = ChildGuard::spawn("moto", cmd)?;
            let ready = wait_until(START_TIMEOUT, "moto_server to answer HTTP", || {
                let exited = !matches!(guard.try_status(), Ok(None));
                async move { exited || answers_as_moto(port).await }
            })
            .await;
            // Exited (e.g. the port was taken): try another port.
            if guard.try_status()?.is_none() {
                ready?;
                return Ok(Self { guard, port });
            }
            last_log = guard.log_tail(20);
        }
        Err(MotoError::NotStarted {
            attempts: START_ATTEMPTS,
            log: last_log,
        })
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

/// True when something on `port` answers `/moto-api/data.json` like moto (200, JSON).
async fn answers_as_moto(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        stream
            .write_all(b"GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some(
            head.starts_with("HTTP/1.")
                && head.contains(" 200 ")
                && body.trim_start().starts_with('{'),
        )
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}
