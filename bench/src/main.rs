//! `podiam-bench`: podiam's performance as figures and ratios, in one run on this machine.
//!
//! Sections (all by default; `--only real-path,warm,cold,revocation,scale,sts`):
//! - **real-path**: credentials where pods really are: `wrk` inside a pod's network
//!   namespace, through the veth and the agent's own DNAT rule, at 1/16/128 keep-alive
//!   connections and for IMDSv2 token pairs, beside nginx and the minimal server on the same
//!   path; agent÷nginx throughput and p99 with met / not met (goal: ≥ 0.9 and ≤ 1.2×).
//!   Needs root; without it, it says so and is skipped ([`real_path`]).
//! - **warm**: credentials through the agent at 1/16/128 clients, keep-alive, a new connection
//!   per request, and IMDSv2 token + GET, side by side with a minimal Rust server and nginx
//!   returning the same bytes; agent RSS idle and at its peak.
//! - **cold**: a new pod → its first credentials (role already cached; role never seen), and
//!   moto's own AssumeRole time measured in the same run.
//! - **revocation**: role annotation removed → the pod's first refusal.
//! - **scale**: the server with N pods in 1k namespaces and 200 simulated agents (gRPC node
//!   streams and GetCredentials): sync time, RSS, CPU seconds, gRPC p99; then 10 forced
//!   relists, with the peak RSS during each and RSS after it.
//! - **sts** ([`sts`]): AssumeRole calls three replicas make for 10k pods, replicas alone vs
//!   as a replica set sharing the keys, shared and per-pod sessions; a cluster start under
//!   the STS budget (time to every session fetched, calls per second, new pods' first
//!   request).
//!
//! Every section but real-path runs on loopback: pods are 127.x addresses the load generator
//! binds its sockets to, so no root and no network namespace is needed. It prints a table and writes
//! JSON (`--out`; a run of some sections merges them into the file there, [`results`]); it
//! asserts nothing. `--quick` is a smoke run of every section (under a minute, figures
//! meaningless, written to `target/bench-quick.json` unless `--out` says otherwise).
//!
//! Its parts: [`load`] (the HTTP load generator: keep-alive, a new connection per request,
//! IMDSv2 token + GET, clients bound to pod source addresses on loopback), [`baseline`] (the
//! minimal Rust server and nginx, returning the agent's exact bytes) and [`proc_stats`]
//! (resident memory and CPU time of a process, from `/proc`). The cluster it measures is the
//! test harness's (`podiam-tests`).

mod baseline;
mod load;
mod proc_stats;
mod real_path;
mod results;
mod sts;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use load::{LoadResult, LoadSpec, Mode, quantile};
use podiam_proto::v1::{GetCredentialsRequest, WatchNodeRequest, node_event};
use podiam_tests::identity;
use podiam_tests::kube_emulator::{EmulatorOptions, Kind, KubeEmulator, namespace, pod};
use podiam_tests::moto::Moto;
use podiam_tests::process::{ChildGuard, listen_addresses, scratch_dir, wait_until};
use podiam_tests::world::{binary, http_get_text, metric_value, start_server_within};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "podiam's benchmark: figures and ratios to baselines, in one run")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// A smoke run of every section: short, small, figures meaningless (under a minute).
    #[arg(long)]
    quick: bool,
    /// Run only these sections.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Pod counts for the scale section.
    #[arg(long, value_delimiter = ',')]
    scale_pods: Option<Vec<usize>>,
    /// Connection counts for the real path and the warm section (1,16,128 unless given).
    #[arg(long, value_delimiter = ',')]
    connections: Option<Vec<usize>>,
    /// Where the results go, as JSON (bench/results.json unless given; a quick run's:
    /// target/bench-quick.json). A run of some sections (--only) replaces those sections in
    /// the file and keeps the others.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The minimal baseline server (started by the benchmark itself).
    MinimalServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        body_file: PathBuf,
        /// The IMDSv2 token to hand out, from this file (the real path gives it the agent's own
        /// token, so that both carry the same bytes); without it a short fixed one.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where to write the address listened on (port 0 in --listen: the kernel's pick).
        #[arg(long)]
        listen_address_file: PathBuf,
        /// A header of the answer to a GET, `name: value` (repeated); none: a `text/plain`
        /// content type.
        #[arg(long = "get-header")]
        get_headers: Vec<String>,
        /// A header of the answer to a PUT, as --get-header.
        #[arg(long = "put-header")]
        put_headers: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    RealPath,
    Warm,
    Cold,
    Revocation,
    Scale,
    Sts,
}

/// How long and how big, full or quick.
struct Plan {
    /// The real path's rounds at each connection count (each target once per round, in turn),
    /// one round's wrk run, and the warm-up of each target before the first round.
    real_rounds: usize,
    real_duration: Duration,
    real_warmup: Duration,
    warm_duration: Duration,
    concurrency: Vec<usize>,
    cold_trials: usize,
    revocation_trials: usize,
    scale_pods: Vec<usize>,
    scale_namespaces: usize,
    scale_agents: usize,
    scale_load: Duration,
    sts: sts::StsPlan,
}

impl Plan {
    fn new(args: &Args) -> Plan {
        let mut plan = if args.quick {
            Plan {
                real_rounds: 1,
                real_duration: Duration::from_secs(1),
                real_warmup: Duration::ZERO,
                warm_duration: Duration::from_millis(250),
                concurrency: vec![1, 16, 128],
                cold_trials: 3,
                revocation_trials: 5,
                scale_pods: vec![2_000],
                scale_namespaces: 50,
                scale_agents: 20,
                scale_load: Duration::from_secs(1),
                sts: sts::StsPlan {
                    pods: 300,
                    roles: 5,
                    newcomers: 5,
                    rate: 50,
                },
            }
        } else {
            Plan {
                real_rounds: 5,
                real_duration: Duration::from_secs(2),
                real_warmup: Duration::from_secs(1),
                warm_duration: Duration::from_secs(3),
                concurrency: vec![1, 16, 128],
                cold_trials: 20,
                revocation_trials: 50,
                scale_pods: vec![10_000, 50_000, 100_000],
                scale_namespaces: 1_000,
                scale_agents: 200,
                scale_load: Duration::from_secs(5),
                sts: sts::StsPlan {
                    pods: 10_000,
                    roles: 20,
                    newcomers: 20,
                    rate: 50,
                },
            }
        };
        if let Some(pods) = &args.scale_pods {
            plan.scale_pods = pods.clone();
        }
        if let Some(counts) = &args.connections {
            plan.concurrency = counts.clone();
        }
        plan
    }
}

const NODE: &str = "node-1";
const NAMESPACE: &str = "bench";
const ROLE: &str = "app-reader";
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/app-reader";

fn pod_ip(block: u8, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, block, (n / 250) as u8, (n % 250 + 1) as u8)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::MinimalServer {
        listen,
        body_file,
        token_file,
        listen_address_file,
        get_headers,
        put_headers,
    }) = &args.command
    {
        let headers = |lines: &[String]| match lines {
            [] => baseline::parse_headers(&["content-type: text/plain".to_string()]),
            lines => baseline::parse_headers(lines),
        };
        let answers = baseline::MinimalAnswers {
            body: Bytes::from(std::fs::read(body_file)?),
            get_headers: headers(get_headers)?,
            token: match token_file {
                Some(path) => Bytes::from(std::fs::read(path)?),
                None => Bytes::from_static(baseline::MINIMAL_TOKEN.as_bytes()),
            },
            put_headers: headers(put_headers)?,
        };
        return baseline::serve_minimal(*listen, listen_address_file, answers).await;
    }
    // Stopped by a signal, the run is dropped here, and with it everything it started: its
    // processes are stopped and its network namespaces, veths and rules removed, as on an
    // error. Otherwise a ^C would leave them behind.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(stop.clone()));
    tokio::select! {
        result = run(args) => result,
        () = stop.cancelled() => {
            bail!("stopped by a signal: what the benchmark had started is stopped and removed")
        }
    }
}

/// The benchmark's sections as `args` choose them, then the targets and the JSON file.
async fn run(args: Args) -> anyhow::Result<()> {
    podiam_runtime::tls::install_crypto_provider();
    let plan = Plan::new(&args);
    let wanted = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let began = Instant::now();
    let mut results = json!({
        "machine": machine(),
        "quick": args.quick,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    let mut targets: Vec<Target> = Vec::new();

    if wanted(Section::RealPath) {
        results["real_path"] = match real_path::cannot_run() {
            None => real_path::real_path(&plan, &mut targets).await?,
            Some(why) => {
                println!("\n== real path: NOT RUN: {why}");
                real_path::skipped(&why)
            }
        };
        label(&mut targets, "real_path");
    }
    if wanted(Section::Warm) || wanted(Section::Cold) || wanted(Section::Revocation) {
        let rig = Rig::start().await?;
        if wanted(Section::Warm) {
            results["warm"] = warm(&rig, &plan, &mut targets).await?;
            label(&mut targets, "warm");
        }
        if wanted(Section::Cold) {
            results["cold"] = cold(&rig, &plan, &mut targets).await?;
            label(&mut targets, "cold");
        }
        if wanted(Section::Revocation) {
            results["revocation"] = revocation(&rig, &plan, &mut targets).await?;
            label(&mut targets, "revocation");
        }
    }
    if wanted(Section::Scale) {
        results["scale"] = scale(&plan, &mut targets).await?;
        label(&mut targets, "scale");
    }
    if wanted(Section::Sts) {
        results["sts"] = sts::sts(&plan.sts, &mut targets).await?;
        label(&mut targets, "sts");
    }

    println!("\n== targets");
    for t in &targets {
        println!(
            "{:<60} {:>14} {:>12}  {}",
            t.name,
            t.value,
            t.goal,
            if t.met { "met" } else { "NOT MET" }
        );
    }
    results["targets"] = serde_json::to_value(
        targets
            .iter()
            .map(|t| {
                json!({"section": t.section, "name": t.name, "value": t.value, "goal": t.goal,
                    "met": t.met})
            })
            .collect::<Vec<_>>(),
    )?;
    results["seconds"] = json!(began.elapsed().as_secs_f64());
    write_results(&args, results)?;
    println!("({:.0} s in all)", began.elapsed().as_secs_f64());
    Ok(())
}

/// Writes the run's figures to `--out` (or its default), merged into what is there when the
/// run was of some sections only ([`results::merge`]).
fn write_results(args: &Args, results: Value) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| match args.quick {
        true => PathBuf::from("target/bench-quick.json"),
        false => PathBuf::from("bench/results.json"),
    });
    let earlier = std::fs::read_to_string(&out).ok();
    let (results, written) = results::merge(earlier.as_deref(), results, !args.only.is_empty());
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
    match written {
        results::Written::Whole => println!("\nwrote {}", out.display()),
        results::Written::Merged { kept } => println!(
            "\nwrote this run's sections into {}; kept from an earlier run: {}",
            out.display(),
            if kept.is_empty() {
                "none".to_string()
            } else {
                kept.join(", ")
            }
        ),
        results::Written::Replaced { why } => {
            println!("\nwrote {}, replacing the file there: {why}", out.display())
        }
    }
    Ok(())
}

/// A target the benchmark reports as met or not.
struct Target {
    /// The results' key of the section it belongs to ([`label`]).
    section: &'static str,
    name: String,
    value: String,
    goal: String,
    met: bool,
}

fn target(targets: &mut Vec<Target>, name: &str, value: String, goal: &str, met: bool) {
    targets.push(Target {
        section: "",
        name: name.into(),
        value,
        goal: goal.into(),
        met,
    });
}

/// Gives the targets a section has just added the name of that section.
fn label(targets: &mut [Target], section: &'static str) {
    for t in targets.iter_mut().filter(|t| t.section.is_empty()) {
        t.section = section;
    }
}

fn machine() -> Value {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (memory_gib * 10.0).round() / 10.0,
        "load_average_1m_at_start": load,
    })
}

/// Emulator, moto, server and agent on loopback, with the bench namespace.
struct Rig {
    agent: ChildGuard,
    agent_addr: SocketAddr,
    _server: ChildGuard,
    server_health: SocketAddr,
    moto: Moto,
    emulator: KubeEmulator,
    dir: PathBuf,
}

impl Rig {
    async fn start() -> anyhow::Result<Rig> {
        let dir = scratch_dir("bench")?;
        let emulator =
            KubeEmulator::start("127.0.0.1:0".parse()?, EmulatorOptions::default()).await?;
        let kubeconfig = dir.join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig)?;
        emulator.create(namespace(
            NAMESPACE,
            &[("iam.amazonaws.com/permitted", "app-.*")],
        ))?;
        let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())?
            .write_to(&dir.join("certs"), false)?;
        // The agent's projected token, bound to its pod on the node.
        identity::install_podiam_identity(&emulator)?;
        let token_file = dir.join("agent-token");
        identity::write_agent_token(&emulator, NODE, &token_file)?;
        let moto = Moto::start().await?;
        let (server, server_addr, server_health) = start_server_within(
            &certs,
            &kubeconfig,
            &moto.endpoint(),
            &[],
            Duration::from_secs(60),
        )
        .await?;
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let address_file = dir.join("agent-addresses");
        let mut command = std::process::Command::new(binary("podiam-agent")?);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--health-listen", "127.0.0.1:0"])
            .args(["--listen-address-file", &path(&address_file)])
            .args(["--server", &format!("https://{server_addr}")])
            .args(["--server-name", "localhost"])
            .args(["--tls-ca", &path(&certs.ca_cert)])
            .args(["--tls-cert", &path(&certs.agent_cert)])
            .args(["--tls-key", &path(&certs.agent_key)])
            .args(["--node-name", NODE])
            .args(["--token-file", &path(&token_file)])
            .args(["--token-key-file", &path(&dir.join("imds-token-keys"))]);
        let mut agent = ChildGuard::spawn("podiam-agent", command)?;
        let addresses = listen_addresses(&mut agent, &address_file, Duration::from_secs(20))
            .await
            .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", agent.log_tail(20)))?;
        let (agent_addr, health) = (addresses["listen"], addresses["health-listen"]);
        wait_until(Duration::from_secs(20), "the agent to be ready", || async {
            http_get_text(&format!("http://{health}/ready"))
                .await
                .is_ok()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", agent.log_tail(20)))?;
        Ok(Rig {
            agent,
            agent_addr,
            _server: server,
            server_health,
            moto,
            emulator,
            dir,
        })
    }

    fn create_pod(&self, name: &str, ip: Ipv4Addr, role: &str) -> anyhow::Result<()> {
        self.emulator.create(pod(
            NAMESPACE,
            name,
            &ip.to_string(),
            &[("iam.amazonaws.com/role", role)],
        ))?;
        Ok(())
    }

    /// One GET from `source` on a new connection: status and body.
    async fn get(&self, source: Ipv4Addr, path: &str) -> anyhow::Result<(u16, Bytes)> {
        one_get(self.agent_addr, source.into(), path).await
    }
}

/// One GET on a new connection from `source`, with a 2 s bound.
async fn one_get(target: SocketAddr, source: IpAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    use http_body_util::BodyExt;
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, "169.254.169.254")
            .body(http_body_util::Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .context("no answer within 2 s")?
}

fn ms(us: u32) -> String {
    format!("{:.3}", f64::from(us) / 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a".into()
    }
}

async fn warm(rig: &Rig, plan: &Plan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!(
        "\n== warm credentials on loopback (agent vs minimal Rust server vs nginx, same bytes)"
    );
    let sources: Vec<IpAddr> = (0..16).map(|i| pod_ip(1, i).into()).collect();
    for (i, source) in sources.iter().enumerate() {
        let IpAddr::V4(ip) = source else { continue };
        rig.create_pod(&format!("warm-{i}"), *ip, ROLE)?;
    }
    // Every pod answered once (and the body every answer must equal).
    let mut body = Bytes::new();
    for source in &sources {
        let IpAddr::V4(ip) = source else { continue };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rig.get(*ip, CREDS_PATH).await {
                Ok((200, answer)) => {
                    body = answer;
                    break;
                }
                other if Instant::now() > deadline => {
                    bail!("pod {ip} never got credentials: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let body_file = rig.dir.join("credentials.json");
    std::fs::write(&body_file, &body)?;
    let agent_idle = proc_stats::rss_mib(rig.agent.pid())?;

    let (_minimal, minimal_addr) = baseline::start_minimal(&rig.dir, &body_file).await?;
    let nginx = baseline::start_nginx(&rig.dir.join("nginx"), CREDS_PATH, &body).await?;
    if nginx.is_none() {
        println!("(nginx is not installed: its baseline is left out; scripts/bench installs it)");
    }

    println!(
        "{:<16} {:>7}  {:>10} {:>8} {:>8} {:>9}  {:>11} {:>8}  {:>9} {:>8}  {:>8} {:>7}",
        "mode",
        "clients",
        "agent rps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "minimal rps",
        "p99 ms",
        "nginx rps",
        "p99 ms",
        "÷minimal",
        "÷nginx"
    );
    let mut rows = Vec::new();
    let mut agent_cpu = 0.0;
    for mode in Mode::ALL {
        for &concurrency in &plan.concurrency {
            let spec = |target| LoadSpec {
                target,
                sources: sources.clone(),
                path: CREDS_PATH.into(),
                concurrency,
                duration: plan.warm_duration,
                mode,
                expect: body.clone(),
            };
            let cpu_before = proc_stats::cpu_seconds(rig.agent.pid())?;
            let agent = load::run(&spec(rig.agent_addr)).await;
            agent_cpu += proc_stats::cpu_seconds(rig.agent.pid())? - cpu_before;
            let minimal = load::run(&spec(minimal_addr)).await;
            let nginx_result = match (&nginx, mode) {
                (Some((_, nginx_addr)), Mode::KeepAlive | Mode::NewConnection) => {
                    Some(load::run(&spec(*nginx_addr)).await)
                }
                _ => None,
            };
            println!(
                "{:<16} {:>7}  {:>10.0} {:>8} {:>8} {:>9}  {:>11.0} {:>8}  {:>9} {:>8}  {:>8} {:>7}{}",
                mode.label(),
                concurrency,
                agent.per_second,
                ms(agent.p50_us),
                ms(agent.p99_us),
                ms(agent.p999_us),
                minimal.per_second,
                ms(minimal.p99_us),
                nginx_result
                    .as_ref()
                    .map_or("n/a".into(), |n| format!("{:.0}", n.per_second)),
                nginx_result.as_ref().map_or("n/a".into(), |n| ms(n.p99_us)),
                ratio(agent.per_second, minimal.per_second),
                nginx_result
                    .as_ref()
                    .map_or("n/a".into(), |n| ratio(agent.per_second, n.per_second)),
                errors_note(&[&agent, &minimal]),
            );
            if mode == Mode::KeepAlive && concurrency == 16 {
                target(
                    targets,
                    "warm p99 through the agent, 16 keep-alive clients",
                    format!("{} ms", ms(agent.p99_us)),
                    "<= 1 ms",
                    agent.p99_us <= 1000 && agent.errors == 0,
                );
                target(
                    targets,
                    "agent throughput / minimal server, 16 keep-alive clients",
                    ratio(agent.per_second, minimal.per_second),
                    ">= 0.50",
                    agent.per_second >= 0.5 * minimal.per_second,
                );
            }
            rows.push(json!({
                "mode": mode, "clients": concurrency,
                "agent": agent, "minimal": minimal, "nginx": nginx_result,
                "agent_over_minimal": agent.per_second / minimal.per_second.max(1e-9),
                "agent_over_nginx": nginx_result.as_ref().map(|n| agent.per_second / n.per_second.max(1e-9)),
            }));
        }
    }
    let agent_peak = proc_stats::peak_rss_mib(rig.agent.pid())?;
    println!(
        "agent RSS: idle {agent_idle:.1} MiB, peak under load {agent_peak:.1} MiB; agent CPU during its runs {agent_cpu:.1} s"
    );
    target(
        targets,
        "agent RSS under load (peak)",
        format!("{agent_peak:.1} MiB"),
        "<= 20 MiB",
        agent_peak <= 20.0,
    );
    Ok(json!({
        "body_bytes": body.len(),
        "seconds_per_run": plan.warm_duration.as_secs_f64(),
        "runs": rows,
        "agent_rss_idle_mib": agent_idle,
        "agent_rss_peak_mib": agent_peak,
    }))
}

fn errors_note(results: &[&LoadResult]) -> String {
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    if errors == 0 {
        return String::new();
    }
    let first = results
        .iter()
        .find_map(|r| r.first_error.clone())
        .unwrap_or_default();
    format!("  ({errors} errors, first: {first})")
}

/// p50 and p99 of durations, in milliseconds.
fn summary(samples: &[Duration]) -> (f64, f64) {
    let mut us: Vec<u32> = samples
        .iter()
        .map(|d| d.as_micros().min(u32::MAX as u128) as u32)
        .collect();
    us.sort_unstable();
    (
        f64::from(quantile(&us, 0.5)) / 1000.0,
        f64::from(quantile(&us, 0.99)) / 1000.0,
    )
}

/// Time from `start` until `source` gets credentials for `role` (asking on new connections).
async fn until_credentials(
    rig: &Rig,
    source: Ipv4Addr,
    role: &str,
    start: Instant,
) -> anyhow::Result<Duration> {
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let deadline = start + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = rig.get(source, &path).await {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{source} got no credentials for {role} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn cold(rig: &Rig, plan: &Plan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!("\n== cold path ({} trials each)", plan.cold_trials);
    let mut known_role = Vec::new();
    let mut new_role = Vec::new();
    for t in 0..plan.cold_trials {
        let ip = pod_ip(2, t);
        let started = Instant::now();
        rig.create_pod(&format!("cold-known-{t}"), ip, ROLE)?;
        known_role.push(until_credentials(rig, ip, ROLE, started).await?);

        let ip = pod_ip(3, t);
        let role = format!("app-new-{t}");
        let started = Instant::now();
        rig.create_pod(&format!("cold-new-{t}"), ip, &role)?;
        new_role.push(until_credentials(rig, ip, &role, started).await?);
    }
    let moto_times = moto_assume_role_times(&rig.moto, plan.cold_trials).await?;
    let (known50, known99) = summary(&known_role);
    let (new50, new99) = summary(&new_role);
    let (moto50, moto99) = summary(&moto_times);
    println!("{:<58} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    println!(
        "{:<58} {known50:>9.1} {known99:>9.1}",
        "pod appears → first credentials (role already cached)"
    );
    println!(
        "{:<58} {new50:>9.1} {new99:>9.1}",
        "pod appears with a role never seen → first credentials"
    );
    println!(
        "{:<58} {moto50:>9.1} {moto99:>9.1}",
        "moto's own AssumeRole (SDK client, same run)"
    );
    println!(
        "{:<58} {:>9.1}",
        "overhead beyond moto's AssumeRole (p50)",
        new50 - moto50
    );
    let _ = rig.server_health;
    target(
        targets,
        "pod appears → credentials ready (p99, new role)",
        format!("{new99:.0} ms"),
        "<= 1000 ms",
        new99 <= 1000.0,
    );
    Ok(json!({
        "trials": plan.cold_trials,
        "known_role_ms": {"p50": known50, "p99": known99},
        "new_role_ms": {"p50": new50, "p99": new99},
        "moto_assume_role_ms": {"p50": moto50, "p99": moto99},
        "overhead_beyond_moto_p50_ms": new50 - moto50,
    }))
}

/// `n` AssumeRole calls straight at moto, each timed.
async fn moto_assume_role_times(moto: &Moto, n: usize) -> anyhow::Result<Vec<Duration>> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            "testing", "testing", None, None, "static",
        ))
        .load()
        .await;
    let client = aws_sdk_sts::Client::new(&config);
    let mut times = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        client
            .assume_role()
            .role_arn(format!("arn:aws:iam::123456789012:role/baseline-{i}"))
            .role_session_name("baseline")
            .send()
            .await?;
        times.push(started.elapsed());
    }
    Ok(times)
}

async fn revocation(rig: &Rig, plan: &Plan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!(
        "\n== revocation: annotation removed → the pod's first refusal ({} trials)",
        plan.revocation_trials
    );
    let ip = pod_ip(4, 0);
    rig.create_pod("revoked", ip, ROLE)?;
    let mut times = Vec::new();
    let set_role = |role: Value| {
        rig.emulator.merge_patch(
            Kind::Pod,
            Some(NAMESPACE),
            "revoked",
            json!({"metadata": {"annotations": {"iam.amazonaws.com/role": role}}}),
        )
    };
    for _ in 0..plan.revocation_trials {
        until_credentials(rig, ip, ROLE, Instant::now()).await?;
        let started = Instant::now();
        set_role(Value::Null)?;
        let deadline = started + Duration::from_secs(20);
        loop {
            match rig.get(ip, CREDS_PATH).await {
                Ok((200, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok((200, _)) => bail!("still served 20 s after revocation"),
                _ => break,
            }
        }
        times.push(started.elapsed());
        set_role(json!(ROLE))?;
    }
    let (p50, p99) = summary(&times);
    println!("p50 {p50:.1} ms, p99 {p99:.1} ms");
    target(
        targets,
        "revocation → first refusal at the pod (p99)",
        format!("{p99:.0} ms"),
        "<= 1000 ms",
        p99 <= 1000.0,
    );
    Ok(json!({"trials": plan.revocation_trials, "p50_ms": p50, "p99_ms": p99}))
}

async fn scale(plan: &Plan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!(
        "\n== scale: the server with N pods in {} namespaces, {} simulated agents",
        plan.scale_namespaces, plan.scale_agents
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "pods",
        "sync s",
        "RSS MiB",
        "CPU s sync",
        "streams s",
        "gRPC rps",
        "p50 ms",
        "p99 ms",
        "CPU s load",
        "reviews"
    );
    let mut rows = Vec::new();
    for &pods in &plan.scale_pods {
        let row = scale_one(plan, pods).await?;
        if pods == 100_000 {
            let rss = row["rss_mib"].as_f64().unwrap_or(f64::MAX);
            target(
                targets,
                "server RSS with 100k pods",
                format!("{rss:.0} MiB"),
                "<= 100 MiB",
                rss <= SCALE_RSS_GOAL_MIB,
            );
        }
        rows.push(row);
    }
    scale_relists_table(&rows, targets);
    Ok(Value::Array(rows))
}

/// How many relists the scale section forces on the server at each pod count.
const SCALE_RELISTS: usize = 10;
/// The server's resident memory at 100k pods, after sync, under load and after each relist
/// (issue 17).
const SCALE_RSS_GOAL_MIB: f64 = 100.0;
/// What "no growth" across the relists allows: RSS after the last relist at most this much
/// above RSS before the first (page-granular noise of the allocator).
const SCALE_RELIST_GROWTH_MIB: f64 = 2.0;

/// The relists of every pod count, one line per relist, and the targets at 100k pods.
fn scale_relists_table(rows: &[Value], targets: &mut Vec<Target>) {
    println!(
        "\n== scale: {SCALE_RELISTS} forced relists (watch history compacted, watches closed)"
    );
    println!(
        "{:>8} {:>8} {:>10} {:>12} {:>12} {:>12}",
        "pods", "relist", "seconds", "peak MiB", "after MiB", "heap MiB"
    );
    for row in rows {
        let pods = row["pods"].as_u64().unwrap_or(0);
        let before = row["rss_before_relists_mib"].as_f64().unwrap_or(0.0);
        let heap = row["heap_allocated_before_relists_mib"]
            .as_f64()
            .unwrap_or(0.0);
        println!(
            "{pods:>8} {:>8} {:>10} {:>12} {before:>12.1} {heap:>12.1}",
            "before", "", ""
        );
        let relists = row["relists"].as_array().cloned().unwrap_or_default();
        for (n, relist) in relists.iter().enumerate() {
            println!(
                "{pods:>8} {:>8} {:>10.2} {:>12.1} {:>12.1} {:>12.1}",
                n + 1,
                relist["seconds"].as_f64().unwrap_or(0.0),
                relist["peak_rss_mib"].as_f64().unwrap_or(0.0),
                relist["rss_after_mib"].as_f64().unwrap_or(0.0),
                relist["heap_allocated_after_mib"].as_f64().unwrap_or(0.0),
            );
        }
        if pods != 100_000 {
            continue;
        }
        let field = |name: &'static str| relists.iter().filter_map(move |r| r[name].as_f64());
        let peak = field("peak_rss_mib").fold(0.0, f64::max);
        let after = field("rss_after_mib").fold(0.0, f64::max);
        let last = field("rss_after_mib").next_back().unwrap_or(f64::MAX);
        target(
            targets,
            "server RSS with 100k pods after each relist (highest)",
            format!("{after:.0} MiB"),
            "<= 100 MiB",
            after <= SCALE_RSS_GOAL_MIB,
        );
        let first = field("rss_after_mib").next().unwrap_or(f64::MAX);
        target(
            targets,
            "server RSS, 100k pods: after relist 10 − before relist 1",
            format!("{:+.1} MiB", last - before),
            "<= +2 MiB",
            last - before <= SCALE_RELIST_GROWTH_MIB,
        );
        target(
            targets,
            "server RSS, 100k pods: after relist 10 − after relist 1",
            format!("{:+.1} MiB", last - first),
            "<= +2 MiB",
            last - first <= SCALE_RELIST_GROWTH_MIB,
        );
        target(
            targets,
            "server peak RSS during a relist at 100k pods",
            format!("{peak:.0} MiB"),
            "—",
            true,
        );
    }
}

/// The server's heap allocated and not freed, in MiB (its metric).
async fn heap_allocated_mib(health: SocketAddr) -> anyhow::Result<f64> {
    let metrics = http_get_text(&format!("http://{health}/metrics")).await?;
    Ok(metric_value(&metrics, "podiam_server_heap_allocated_bytes") as f64 / (1024.0 * 1024.0))
}

/// Forces [`SCALE_RELISTS`] relists of every watched resource, one after another: each
/// drops the emulator's watch history and closes every watch, so the server's watchers
/// resume from a resourceVersion that has expired (410) and list again. For each: how long
/// until all three resources had relisted, the highest RSS meanwhile (the kernel's
/// high-water mark, reset before the relist) and RSS a second after.
async fn scale_relists(
    emulator: &KubeEmulator,
    pid: u32,
    health: SocketAddr,
) -> anyhow::Result<Vec<Value>> {
    const RESOURCES: [&str; 3] = ["pods", "namespaces", "serviceaccounts"];
    let counts = || async {
        let metrics = http_get_text(&format!("http://{health}/metrics")).await?;
        anyhow::Ok(RESOURCES.map(|resource| {
            metric_value(
                &metrics,
                &format!(r#"podiam_server_watch_relists_total{{resource="{resource}"}}"#),
            )
        }))
    };
    let mut relists = Vec::with_capacity(SCALE_RELISTS);
    for _ in 0..SCALE_RELISTS {
        let before = counts().await?;
        proc_stats::reset_peak_rss(pid)?;
        let started = Instant::now();
        emulator.compact();
        emulator.close_watches();
        wait_until(
            Duration::from_secs(300),
            "the server to relist pods, namespaces and ServiceAccounts",
            || async {
                counts()
                    .await
                    .is_ok_and(|now| now.iter().zip(&before).all(|(n, b)| n > b))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let peak = proc_stats::peak_rss_mib(pid)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        relists.push(json!({
            "seconds": seconds,
            "peak_rss_mib": peak,
            "rss_after_mib": proc_stats::rss_mib(pid)?,
            "heap_allocated_after_mib": heap_allocated_mib(health).await?,
        }));
    }
    Ok(relists)
}

async fn scale_one(plan: &Plan, pods: usize) -> anyhow::Result<Value> {
    let dir = scratch_dir("bench-scale")?;
    let emulator = KubeEmulator::start("127.0.0.1:0".parse()?, EmulatorOptions::default()).await?;
    let kubeconfig = dir.join("kubeconfig");
    emulator.write_kubeconfig(&kubeconfig)?;
    let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())?
        .write_to(&dir.join("certs"), false)?;
    identity::install_podiam_identity(&emulator)?;
    const ROLES: usize = 20;
    for n in 0..plan.scale_namespaces {
        emulator.create(namespace(
            &format!("ns-{n}"),
            &[("iam.amazonaws.com/permitted", "app-.*")],
        ))?;
    }
    // Pods spread over one node per simulated agent.
    let mut by_node: HashMap<usize, Vec<(String, String)>> = HashMap::new();
    for i in 0..pods {
        let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
        let role = format!("app-{}", i % ROLES);
        let node = i % plan.scale_agents;
        let mut object = pod(
            &format!("ns-{}", i % plan.scale_namespaces),
            &format!("pod-{i}"),
            &ip,
            &[("iam.amazonaws.com/role", &role)],
        );
        object["spec"]["nodeName"] = json!(format!("node-{node}"));
        emulator.create(object)?;
        by_node.entry(node).or_default().push((ip, role));
    }
    // Each simulated agent's pod on its node, and its projected token, as the DaemonSet
    // makes them before the agents start.
    let mut tokens = Vec::with_capacity(plan.scale_agents);
    for node in 0..plan.scale_agents {
        let (token, _) = identity::agent_token(
            &emulator,
            &format!("node-{node}"),
            identity::AGENT_AUDIENCE,
            std::time::SystemTime::now() + identity::AGENT_TOKEN_LIFE,
        )?;
        tokens.push(token);
    }
    let moto = Moto::start().await?;
    let started = Instant::now();
    let (server, addr, health) = start_server_within(
        &certs,
        &kubeconfig,
        &moto.endpoint(),
        &[],
        Duration::from_secs(300),
    )
    .await?;
    let sync = started.elapsed().as_secs_f64();
    let rss = proc_stats::rss_mib(server.pid())?;
    let cpu_sync = proc_stats::cpu_seconds(server.pid())?;
    // The roles' prefetch done before the agents come.
    wait_until(
        Duration::from_secs(60),
        "the roles to be prefetched",
        || async {
            http_get_text(&format!("http://{health}/metrics"))
                .await
                .is_ok_and(|m| {
                    metric_value(&m, r#"podiam_server_sts_calls_total{result="ok"}"#)
                        >= ROLES as u64
                })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    // The simulated agents: each its own mTLS connection, projected token (its pod on its
    // node) and node stream.
    let material = podiam_tests::world::agent_material(&certs)?;
    let ca = std::fs::read(&certs.ca_cert)?;
    let streams_started = Instant::now();
    let agents = (0..plan.scale_agents).map(|node| {
        let material = material.clone();
        let ca = ca.clone();
        let token = tokens[node].clone();
        async move {
            // An address each, as agents on their nodes have.
            let local =
                std::net::IpAddr::from([127, 1, (node / 200) as u8, (1 + node % 200) as u8]);
            let mut client =
                identity::client_from(addr, Some(local), &ca, Some(&material), Some(&token))
                    .await?;
            let mut stream = client
                .watch_node(WatchNodeRequest {
                    node_name: format!("node-{node}"),
                    agent_version: "bench".into(),
                })
                .await?
                .into_inner();
            let mut seen = 0usize;
            while let Some(event) = stream.message().await? {
                match event.event {
                    Some(node_event::Event::Synced(_)) => break,
                    Some(node_event::Event::Upsert(_)) => seen += 1,
                    _ => {}
                }
            }
            // Keep the stream open for the load, like an agent.
            anyhow::Ok((client, stream, seen))
        }
    });
    let agents: Vec<(identity::Client, _, usize)> = futures::future::try_join_all(agents).await?;
    let streams = streams_started.elapsed().as_secs_f64();

    // Each agent asks for credentials of its pods at 10 requests a second (200 agents: 2000/s).
    let cpu_before = proc_stats::cpu_seconds(server.pid())?;
    let load_started = Instant::now();
    let deadline = load_started + plan.scale_load;
    let askers = agents.iter().enumerate().map(|(node, (client, _, _))| {
        let mut client = client.clone();
        let pods = by_node.get(&node).cloned().unwrap_or_default();
        let agents = plan.scale_agents.max(1) as u64;
        async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            // Agents are not synchronised: each starts at its own point of the 100 ms period.
            tokio::time::sleep(Duration::from_micros(node as u64 * 100_000 / agents)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut k = 0usize;
            while Instant::now() < deadline && !pods.is_empty() {
                tick.tick().await;
                let (ip, role) = &pods[k % pods.len()];
                k += 1;
                let began = Instant::now();
                let answer = client
                    .get_credentials(GetCredentialsRequest {
                        ip: ip.clone(),
                        role_name: role.clone(),
                        node_name: format!("node-{node}"),
                        pod_token: String::new(),
                    })
                    .await;
                match answer {
                    Ok(_) => latencies.push(began.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }
    });
    let mut latencies = Vec::new();
    let mut errors = 0;
    for (l, e) in futures::future::join_all(askers).await {
        latencies.extend(l);
        errors += e;
    }
    let load_seconds = load_started.elapsed().as_secs_f64();
    let cpu_load = proc_stats::cpu_seconds(server.pid())? - cpu_before;
    latencies.sort_unstable();
    let rps = latencies.len() as f64 / load_seconds;
    let (p50, p99) = (quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    let rss_after = proc_stats::rss_mib(server.pid())?;
    // Every call carried its agent's token: with reviews cached for the token's life, the
    // server asks the API once per agent, however many calls it answers.
    let reviews = emulator.token_reviews();
    println!(
        "{:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.2} {:>12.0} {:>10} {:>10} {:>10.2} {:>10}{}",
        pods,
        sync,
        rss.max(rss_after),
        cpu_sync,
        streams,
        rps,
        ms(p50),
        ms(p99),
        cpu_load,
        reviews,
        if errors > 0 {
            format!("  ({errors} errors)")
        } else {
            String::new()
        }
    );
    // Relists with the agents' node streams open, as in a cluster.
    let rss_before_relists = proc_stats::rss_mib(server.pid())?;
    let heap_before_relists = heap_allocated_mib(health).await?;
    let relists = scale_relists(&emulator, server.pid(), health).await?;
    drop(agents);
    drop(server);
    emulator.shutdown().await;
    Ok(json!({
        "rss_before_relists_mib": rss_before_relists, "relists": relists,
        "heap_allocated_before_relists_mib": heap_before_relists,
        "pods": pods, "namespaces": plan.scale_namespaces, "agents": plan.scale_agents,
        "sync_seconds": sync, "rss_mib": rss.max(rss_after), "rss_after_sync_mib": rss,
        "cpu_seconds_sync": cpu_sync, "node_streams_synced_seconds": streams,
        "grpc_requests_per_second": rps, "grpc_p50_ms": f64::from(p50) / 1000.0,
        "grpc_p99_ms": f64::from(p99) / 1000.0, "grpc_errors": errors,
        "cpu_seconds_load": cpu_load, "token_reviews": reviews,
        "grpc_requests": latencies.len() as u64 + errors,
    }))
}
