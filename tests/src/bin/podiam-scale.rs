//! `podiam-scale`: the server at scale, as figures (it asserts nothing).
//!
//! Loads the Kubernetes API emulator with `--pods` pods across `--namespaces` namespaces
//! (sharing `--roles` roles), starts moto and the real `podiam-server`, and prints: the time
//! to the server's first full sync, its resident memory then, and the time from one new
//! pod's creation to its credentials being prefetched (an STS call completed before any
//! request). Loopback only; no root needed.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use podiam_tests::kube_emulator::{EmulatorOptions, KubeEmulator, namespace, pod};
use podiam_tests::moto::Moto;
use podiam_tests::process::scratch_dir;
use podiam_tests::world::{http_get_text, metric_value, start_server_within};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    namespaces: usize,
    #[arg(long, default_value_t = 20)]
    roles: usize,
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// STS calls the server has completed successfully (0 while it does not answer).
async fn sts_ok(health: std::net::SocketAddr) -> u64 {
    let metrics = http_get_text(&format!("http://{health}/metrics")).await;
    metrics.map_or(0, |m| {
        metric_value(&m, r#"podiam_server_sts_calls_total{result="ok"}"#)
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    podiam_proto::tls::install_crypto_provider();
    let args = Args::parse();
    let dir = scratch_dir("scale")?;
    let emulator = KubeEmulator::start("127.0.0.1:0".parse()?, EmulatorOptions::default()).await?;
    let kubeconfig = dir.join("kubeconfig");
    emulator.write_kubeconfig(&kubeconfig)?;
    let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())?
        .write_to(&dir.join("certs"), false)?;

    let loading = Instant::now();
    for n in 0..args.namespaces {
        emulator.create(namespace(
            &format!("ns-{n}"),
            &[("iam.amazonaws.com/permitted", "app-.*")],
        ))?;
    }
    for i in 0..args.pods {
        let ns = format!("ns-{}", i % args.namespaces);
        let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
        let role = format!("app-{}", i % args.roles.max(1));
        emulator.create(pod(
            &ns,
            &format!("pod-{i}"),
            &ip,
            &[("iam.amazonaws.com/role", &role)],
        ))?;
    }
    println!(
        "loaded {} pods in {} namespaces ({} roles) into the emulator in {:.1?}",
        args.pods,
        args.namespaces,
        args.roles,
        loading.elapsed()
    );

    let moto = Moto::start().await?;
    let started = Instant::now();
    let (server, _addr, health) = start_server_within(
        &certs,
        &kubeconfig,
        &moto.endpoint(),
        &[],
        Duration::from_secs(300),
    )
    .await?;
    let sync = started.elapsed();
    println!(
        "server first full sync: {sync:.2?} (from process start, includes TLS and kube client set-up)"
    );
    println!("server RSS after sync: {:.1} MiB", rss_mib(server.pid())?);

    // Let the prefetch of the existing roles finish, then time a new pod with a new role.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sts_ok(health).await < args.roles as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sts_ok(health).await;
    let created = Instant::now();
    emulator.create(pod(
        "ns-0",
        "newcomer",
        "10.250.0.1",
        &[("iam.amazonaws.com/role", "app-newcomer")],
    ))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sts_ok(health).await <= before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let prefetch = created.elapsed();
    let start = Instant::now();
    let _ = moto_assume_role_time(&moto).await;
    println!(
        "pod created → its credentials prefetched: {prefetch:.1?} (one AssumeRole at moto alone: {:.1?})",
        start.elapsed()
    );
    println!("server RSS at the end: {:.1} MiB", rss_mib(server.pid())?);
    Ok(())
}

/// One AssumeRole straight at moto, for the baseline.
async fn moto_assume_role_time(moto: &Moto) -> anyhow::Result<()> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            "testing", "testing", None, None, "static",
        ))
        .load()
        .await;
    aws_sdk_sts::Client::new(&config)
        .assume_role()
        .role_arn("arn:aws:iam::123456789012:role/baseline")
        .role_session_name("baseline")
        .send()
        .await?;
    Ok(())
}
