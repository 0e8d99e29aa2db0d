//! The `kubectl-iam` binary run as a user runs it: arguments, `--kubeconfig`, what it printed
//! and how it exited.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::world::binary;

/// One plugin run, however slow the machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// What one run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Requires exit code 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }

    /// Stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Runs `program args…` with `--kubeconfig` appended (`PATH` extended when asked).
pub async fn run_program(
    program: &Path,
    args: &[&str],
    kubeconfig: &Path,
    path: Option<&str>,
) -> Run {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .env_remove("PODIAM_SERVER")
        .env_remove("PODIAM_BASE_ROLE_ARN")
        .kill_on_drop(true);
    if let Some(path) = path {
        command.env("PATH", path);
    }
    let output = tokio::time::timeout(RUN_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish", program.display()))
        .expect("runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The built `kubectl-iam`.
pub fn plugin() -> PathBuf {
    binary("kubectl-iam").expect("kubectl-iam is built")
}

/// `kubectl-iam args… --kubeconfig K`.
pub async fn iam(kubeconfig: &Path, args: &[&str]) -> Run {
    run_program(&plugin(), args, kubeconfig, None).await
}

/// The flags that reach `world`'s server replicas: the CA only, no podiam key (the user's
/// own token comes from the kubeconfig). 30 s for the command's calls, not the default 3:
/// a new process's handshake and calls on a busy machine must not fall back to a local
/// answer where a test asserts the servers' (tests of the fallback give their own).
pub fn server_flags(world: &crate::world::World) -> Vec<String> {
    let mut flags = Vec::new();
    for replica in world.replicas() {
        flags.extend(["--server".to_string(), format!("https://{}", replica.addr)]);
    }
    let certs = world.certs();
    flags.extend(["--tls-ca".to_string(), certs.ca_cert.display().to_string()]);
    flags.extend(["--server-name".to_string(), "localhost".to_string()]);
    flags.extend(["--server-timeout".to_string(), "30s".to_string()]);
    flags
}
