//! Proves the harness's parts that need no root: child processes die with their guards and
//! keep their logs, `wait_until` says what it waited for, and moto's STS behaves as the
//! suites assume (the real AWS CLI against it, on loopback).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podiam_tests::moto::{MOTO_ACCOUNT_ID, Moto, aws_cli_json as aws};
use podiam_tests::process::{ChildGuard, ProcessError, wait_until};

#[tokio::test]
async fn child_guard_logs_kills_on_drop_and_waits() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo started; echo oops >&2; exec sleep 600"]);
    let guard = ChildGuard::spawn("sleeper", cmd).unwrap();
    let pid = guard.pid();
    let log = guard.log_path().to_owned();
    wait_until(
        Duration::from_secs(5),
        "the sleeper to log its start",
        || {
            let log = log.clone();
            async move { std::fs::read_to_string(&log).is_ok_and(|s| s.contains("oops")) }
        },
    )
    .await
    .unwrap();
    assert_eq!(guard.log_tail(1), "oops");
    assert_eq!(guard.log_tail(5), "started\noops");
    drop(guard);
    // Reaped, not a zombie: the pid no longer exists.
    assert!(kill(Pid::from_raw(pid as i32), None).is_err());

    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "exit 3"]);
    let mut quick = ChildGuard::spawn("quick", cmd).unwrap();
    let status = quick.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.code(), Some(3));

    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    let mut slow = ChildGuard::spawn("slow", cmd).unwrap();
    let err = slow.wait_exit(Duration::from_millis(50)).await.unwrap_err();
    assert!(err.to_string().contains("slow to exit"), "{err}");
    slow.signal(Signal::SIGTERM).unwrap();
    let status = slow.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert!(!status.success());
}

#[tokio::test]
async fn wait_until_names_what_it_waited_for() {
    let err = wait_until(
        Duration::from_millis(60),
        "the moon to turn blue",
        || async { false },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProcessError::Timeout { .. }));
    assert_eq!(
        err.to_string(),
        "timed out after 60ms waiting for the moon to turn blue"
    );
}

#[tokio::test]
async fn moto_assume_role_and_caller_identity() {
    let moto = Moto::start().await.unwrap();
    assert_eq!(moto.endpoint(), format!("http://127.0.0.1:{}", moto.port()));

    // The role need not exist; moto's own identity is in account 123456789012.
    let me = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "get-caller-identity",
        ]),
        &[],
    )
    .await;
    assert_eq!(me["Account"], MOTO_ACCOUNT_ID);

    let assumed = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "assume-role",
            "--role-arn",
            "arn:aws:iam::123456789012:role/app-reader",
            "--role-session-name",
            "harness-session",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        assumed["AssumedRoleUser"]["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-reader/harness-session"
    );
    let creds = &assumed["Credentials"];
    let key = creds["AccessKeyId"].as_str().unwrap().to_owned();
    let secret = creds["SecretAccessKey"].as_str().unwrap().to_owned();
    let token = creds["SessionToken"].as_str().unwrap().to_owned();
    assert!(key.starts_with("ASIA"), "{key}");
    assert!(creds["Expiration"].as_str().unwrap().ends_with('Z'));
    let with_creds = [
        ("AWS_ACCESS_KEY_ID", key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("AWS_SESSION_TOKEN", token.as_str()),
    ];
    let who = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "get-caller-identity",
        ]),
        &with_creds,
    )
    .await;
    assert_eq!(
        who["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-reader/harness-session"
    );
    assert_eq!(who["Account"], MOTO_ACCOUNT_ID);
    assert!(
        who["UserId"]
            .as_str()
            .unwrap()
            .ends_with(":harness-session")
    );

    // A role path is dropped from the assumed-role ARN.
    let pathed = aws(
        tokio::process::Command::new("aws").args([
            "--endpoint-url",
            &moto.endpoint(),
            "sts",
            "assume-role",
            "--role-arn",
            "arn:aws:iam::123456789012:role/team/app-writer",
            "--role-session-name",
            "s2",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        pathed["AssumedRoleUser"]["Arn"],
        "arn:aws:sts::123456789012:assumed-role/app-writer/s2"
    );
}
