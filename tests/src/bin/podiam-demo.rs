//! `podiam-demo`: the whole credential path on this machine, as a person would see it.
//!
//! It starts the Kubernetes API emulator, moto (STS), `podiam-server`, a node namespace
//! running `podiam-agent` with its iptables rule, and two pod namespaces; shows that pod A
//! (annotated, namespace permitted) gets its role and pod B (no annotation) gets nothing;
//! then grants B and revokes A with the real `kubectl annotate` and shows the results flip.
//! Everything is torn down on exit or Ctrl-C. Exits non-zero if anything did not behave.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use podiam_tests::process::wait_for;
use podiam_tests::world::{World, WorldConfig};

const NAMESPACE: &str = "team-a";
const PERMITTED: &str = "app-.*";
/// Revocation and grants hold within a second; polling allows for a loaded machine.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// Run podiam's local demo (needs root: pods are network namespaces).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// After the demo, keep everything running until Ctrl-C, to look around.
    #[arg(long)]
    hold: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "podiam-demo: needs root (network namespaces and iptables); run: sudo bash scripts/demo"
        );
        return ExitCode::from(2);
    }
    // One shutdown source: Ctrl-C or SIGTERM ends the demo wherever it is; the world drops
    // on the way out and takes every namespace, rule and process with it.
    let interrupted = tokio_util::sync::CancellationToken::new();
    tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(
        interrupted.clone(),
    ));
    let outcome = tokio::select! {
        outcome = demo(args.hold, interrupted.clone()) => outcome,
        () = interrupted.cancelled() => {
            println!("\ninterrupted: tearing down");
            Ok(())
        }
    };
    // The world has dropped by now: check that it really took everything with it.
    let left = podiam_tests::netns::list_ours().unwrap_or_default();
    if !left.is_empty() {
        eprintln!(
            "podiam-demo: FAILED: network namespaces left behind: {}",
            left.join(" ")
        );
        return ExitCode::FAILURE;
    }
    match outcome {
        Ok(()) => {
            println!(
                "torn down: no network namespace (so no veth or iptables rule) of the demo is left"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("podiam-demo: FAILED: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: usize, text: &str) {
    println!("\n[{n}/4] {text}");
}

async fn show_identity(world: &World, pod: &str) -> anyhow::Result<Result<String, String>> {
    println!("  {pod}$ aws sts get-caller-identity --query Arn --output text");
    let result = world.aws_caller_arn(pod).await?;
    match &result {
        Ok(arn) => println!("      {arn}"),
        Err(error) => println!(
            "      {}",
            error
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("(failed)")
                .trim()
        ),
    }
    Ok(result)
}

async fn kubectl(world: &World, args: &[&str]) -> anyhow::Result<()> {
    println!("  $ kubectl {}", args.join(" "));
    let out = world.kubectl_ok(args).await?;
    for line in out.lines() {
        println!("      {line}");
    }
    Ok(())
}

fn expect_role(result: &Result<String, String>, pod: &str, role: &str) -> anyhow::Result<()> {
    match result {
        Ok(arn) if arn.contains(&format!(":assumed-role/{role}/")) => Ok(()),
        other => bail!("{pod} should have role {role}, got {other:?}"),
    }
}

fn expect_nothing(result: &Result<String, String>, pod: &str) -> anyhow::Result<()> {
    match result {
        Err(error) if error.contains("Unable to locate credentials") => Ok(()),
        other => bail!("{pod} should find no credentials, got {other:?}"),
    }
}

async fn demo(hold: bool, interrupted: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    podiam_runtime::tls::install_crypto_provider();
    step(
        1,
        "starting: Kubernetes API emulator, moto (STS), podiam-server, a node running podiam-agent, two pods",
    );
    let config = WorldConfig {
        start_agent: true,
        ..WorldConfig::default()
    }
    .namespace(NAMESPACE, Some(PERMITTED))
    .pod(NAMESPACE, "pod-a", Some("app-reader"))
    .pod(NAMESPACE, "pod-b", None);
    let world = World::start(config)
        .await
        .context("starting the demo's world")?;
    println!("  namespace {NAMESPACE}: iam.amazonaws.com/permitted={PERMITTED}");
    kubectl(&world, &["get", "pods", "-n", NAMESPACE, "-o", "wide"]).await?;
    println!(
        "  node {}: iptables -t nat rules of the agent:",
        world.node().name()
    );
    for rule in world
        .node_nat_rules()
        .await?
        .lines()
        .filter(|l| l.contains("PODIAM"))
    {
        println!("      {rule}");
    }

    step(
        2,
        "each pod asks the AWS CLI who it is (credentials come from 169.254.169.254)",
    );
    expect_role(
        &show_identity(&world, "pod-a").await?,
        "pod-a",
        "app-reader",
    )?;
    expect_nothing(&show_identity(&world, "pod-b").await?, "pod-b")?;

    step(3, "grant pod-b a role and revoke pod-a's, with kubectl");
    kubectl(
        &world,
        &[
            "annotate",
            "pod",
            "pod-b",
            "-n",
            NAMESPACE,
            "iam.amazonaws.com/role=app-writer",
        ],
    )
    .await?;
    kubectl(
        &world,
        &[
            "annotate",
            "pod",
            "pod-a",
            "-n",
            NAMESPACE,
            "iam.amazonaws.com/role-",
        ],
    )
    .await?;

    step(4, "the results flip");
    wait_for(
        CHANGE_DEADLINE,
        "pod-b's grant and pod-a's revocation",
        || async {
            let a = world.aws_caller_arn("pod-a").await.ok()?;
            let b = world.aws_caller_arn("pod-b").await.ok()?;
            (a.is_err() && b.is_ok()).then_some(())
        },
    )
    .await?;
    expect_nothing(&show_identity(&world, "pod-a").await?, "pod-a")?;
    expect_role(
        &show_identity(&world, "pod-b").await?,
        "pod-b",
        "app-writer",
    )?;
    println!("\ndemo complete: pod-a was revoked and pod-b granted, live, through kubectl.");

    if hold {
        println!("\nholding until Ctrl-C. Look around (as root):");
        for pod in ["pod-a", "pod-b"] {
            println!(
                "  ip netns exec {} python3 -c \"import urllib.request as u; print(u.urlopen('http://169.254.169.254/latest/meta-data/iam/security-credentials/').read().decode())\"",
                world.pod(pod).net.netns.name()
            );
        }
        println!(
            "  kubectl --kubeconfig {} get pods -A",
            world.dir().join("kubeconfig").display()
        );
        interrupted.cancelled().await;
        println!("\ninterrupted: tearing down");
    }
    Ok(())
}
