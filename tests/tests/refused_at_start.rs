//! A server started with a configuration it cannot work with stops at once, exit code 2,
//! and says why in one line per mistake. No root needed: nothing is served. Build the
//! binaries first (`cargo build --workspace --bins`).

use podiam_tests::world::binary;

/// Runs `podiam-server` with TLS files that do not exist (never reached: the checks come
/// first), `args` and `env`; returns its exit code and stderr.
async fn server_refuses(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(binary("podiam-server").expect("built"))
        .args([
            "--tls-ca",
            "/nonexistent/ca",
            "--tls-cert",
            "/nonexistent/c",
            "--tls-key",
            "/nonexistent/k",
        ])
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .expect("runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start_one_line_per_mistake() {
    let (code, stderr) = server_refuses(
        &[
            "--refresh-after",
            "2h",
            "--base-role-arn",
            "arn:aws:iam::123:role",
            "--session-duration",
            "20m",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for want in [
        "--refresh-after 7200s is beyond the session length",
        "--base-role-arn",
        "--min-remaining 1800s must be shorter than --session-duration 1200s",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "{want:?} in {stderr}"
        );
    }

    // Flags fine, but nothing listens at the STS endpoint (a port held, never listening).
    let closed = podiam_tests::process::ClosedPort::bind().expect("port");
    let endpoint = format!("http://{}", closed.addr());
    let (code, stderr) =
        server_refuses(&["--sts-endpoint", &endpoint, "--sts-timeout", "2s"], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("podiam-server:"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!(
            "the STS endpoint {endpoint} (from --sts-endpoint) is unreachable"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_server_told_to_log_sensitive_sdk_bodies_refuses_to_start() {
    let (code, stderr) = server_refuses(&[], &[("LOG_SENSITIVE_BODIES", "true")]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("LOG_SENSITIVE_BODIES=true makes the AWS SDK log the credentials"),
        "{stderr}"
    );
}
