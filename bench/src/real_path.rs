//! The real path: where pods really are. The load comes from inside a pod's network namespace,
//! through its veth and the agent's own DNAT rule in the node's namespace, from a third-party
//! load generator (`wrk`), so that neither the path nor the measuring tool is ours.
//!
//! The cluster is the test harness's [`World`]: a node namespace running `podiam-agent serve
//! --iptables`, one pod namespace with a role. Beside the agent, in the node namespace and
//! reached over the same veth, nginx and the minimal Rust server serve the agent's exact
//! credentials bytes on the node's address (the agent's DNAT target). Each target is loaded in
//! turn at each connection count, keep-alive GETs of the credentials path, and the IMDSv2
//! pair (`PUT /latest/api/token`, then the GET with the token) against the minimal server
//! (nginx has no token PUT).
//!
//! Needs root (namespaces, veths, iptables in the node's namespace); without it the section
//! says so and is skipped. Every namespace, veth and rule goes when the `World` drops, on
//! success or failure: the rules live only in the node's namespace, which is deleted whole.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use podiam_tests::netns::{METADATA_IP, Netns};
use podiam_tests::process::ChildGuard;
use podiam_tests::world::{World, WorldConfig};
use serde::Serialize;
use serde_json::{Value, json};

use crate::baseline::{self, MINIMAL_TOKEN};
use crate::{CREDS_PATH, NAMESPACE, Plan, ROLE, Target, proc_stats, target};

/// The one pod the load comes from.
const POD: &str = "wrk";

/// The goal: the agent's throughput at least this share of nginx's …
const GOAL_THROUGHPUT: f64 = 0.9;
/// … and its p99 at most this multiple of nginx's (issue 17).
const GOAL_P99: f64 = 1.2;

/// Connections one pod may hold at the agent during the run: above the largest connection
/// count, since all of them come from one pod here (the default, 16, is a per-pod fairness
/// cap, not a speed limit; a 128-connection run from one address would be mostly refused).
const MAX_CONNECTIONS_PER_POD: usize = 256;

/// wrk's script for keep-alive GETs as given on its command line: only the figures, as one
/// JSON line after `PODIAM-WRK` (latencies in microseconds). With no `request` function wrk
/// sends its one prepared request, as fast as it can.
const WRK_REPORT: &str = r#"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PODIAM-WRK {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    math.floor(latency:percentile(99.9)), math.floor(latency.max)))
end
"#;

/// wrk's script for IMDSv2 (with [`WRK_REPORT`] after it): each connection's requests
/// alternate `PUT /latest/api/token` and the GET of the URL's path with the token given as
/// the script's argument. Each PUT and each GET is one request in the figures.
const WRK_TOKEN: &str = r#"
local put, get
local n = 0

function init(args)
  put = wrk.format("PUT", "/latest/api/token", {["X-aws-ec2-metadata-token-ttl-seconds"] = "21600"})
  get = wrk.format("GET", wrk.path, {["X-aws-ec2-metadata-token"] = args[1]})
end

function request()
  n = n + 1
  if n % 2 == 1 then return put end
  return get
end
"#;

/// What one wrk run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// The JSON line of [`WRK_SCRIPT`], read from wrk's output.
#[derive(serde::Deserialize)]
struct WrkLine {
    requests: u64,
    duration_us: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
    status_errors: u64,
    timeouts: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl WrkResult {
    fn parse(output: &str) -> anyhow::Result<WrkResult> {
        let line = output
            .lines()
            .find_map(|l| l.strip_prefix("PODIAM-WRK "))
            .context("wrk printed no figures")?;
        let w: WrkLine = serde_json::from_str(line).context("wrk's figures")?;
        let seconds = w.duration_us as f64 / 1e6;
        Ok(WrkResult {
            requests: w.requests,
            errors: w.connect_errors
                + w.read_errors
                + w.write_errors
                + w.status_errors
                + w.timeouts,
            seconds,
            per_second: if seconds > 0.0 {
                w.requests as f64 / seconds
            } else {
                0.0
            },
            p50_us: w.p50_us,
            p99_us: w.p99_us,
            p999_us: w.p999_us,
            max_us: w.max_us,
        })
    }
}

/// What the load is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load<'a> {
    /// Keep-alive GETs of the credentials path.
    Get,
    /// IMDSv2 pairs with this token.
    TokenPair(&'a str),
}

/// wrk's two scripts, written once.
struct Scripts {
    get: std::path::PathBuf,
    token: std::path::PathBuf,
}

impl Scripts {
    fn write(dir: &Path) -> anyhow::Result<Scripts> {
        let scripts = Scripts {
            get: dir.join("podiam-get.lua"),
            token: dir.join("podiam-token.lua"),
        };
        std::fs::write(&scripts.get, WRK_REPORT)?;
        std::fs::write(&scripts.token, format!("{WRK_TOKEN}{WRK_REPORT}"))?;
        Ok(scripts)
    }
}

/// Runs wrk in `pod` against `url` with `connections` keep-alive connections for `duration`.
async fn wrk(
    pod: &Netns,
    scripts: &Scripts,
    url: &str,
    connections: usize,
    duration: Duration,
    load: Load<'_>,
) -> anyhow::Result<WrkResult> {
    // Two threads (the machine's cores) unless one connection: wrk needs a connection per
    // thread.
    let threads = connections.clamp(1, 2);
    let mut command = pod.command("wrk");
    command
        .args(["-t", &threads.to_string()])
        .args(["-c", &connections.to_string()])
        // wrk takes whole seconds (and no milliseconds unit).
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s"])
        .arg("-s")
        .arg(match load {
            Load::Get => &scripts.get,
            Load::TokenPair(_) => &scripts.token,
        })
        .arg(url)
        .kill_on_drop(true);
    if let Load::TokenPair(token) = load {
        command.args(["--", token]);
    }
    let output = tokio::time::timeout(duration + Duration::from_secs(30), command.output())
        .await
        .context("wrk did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    WrkResult::parse(&stdout)
}

/// The three servers on the path, as the pod reaches them.
struct Targets {
    /// The agent, by the metadata address its DNAT rule intercepts.
    agent: String,
    /// nginx on the node's address, when installed.
    nginx: Option<String>,
    /// The minimal server on the node's address.
    minimal: String,
}

/// Why the section cannot run here, if it cannot: root, `wrk`.
pub fn cannot_run() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "needs root: it creates network namespaces, veth pairs and the agent's iptables \
             rules in a node namespace of its own (run scripts/bench as root)"
                .into(),
        );
    }
    let found = std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        return Some("wrk is not installed (scripts/setup installs it)".into());
    }
    None
}

/// The real-path section: the table, the targets, the figures as JSON.
pub async fn real_path(plan: &Plan, targets: &mut Vec<Target>) -> anyhow::Result<Value> {
    println!("\n== real path: pod namespace → veth → the agent's DNAT rule → agent (wrk)");
    let world = World::start(WorldConfig {
        start_agent: true,
        agent_args: vec![
            "--max-connections-per-pod".into(),
            MAX_CONNECTIONS_PER_POD.to_string(),
        ],
        // The agent's own default level: the harness's debug level logs every request.
        log_level: Some("info".into()),
        ..WorldConfig::default()
            .namespace(NAMESPACE, Some("app-.*"))
            .pod(NAMESPACE, POD, Some(ROLE))
    })
    .await?;
    let pod = &world.pod(POD).net.netns;
    let node = world.node();
    let agent_url = format!("http://{METADATA_IP}{CREDS_PATH}");

    // The pod's credentials once through the real path: the bytes every baseline serves.
    let body = first_credentials(pod, &agent_url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", world.agent_log()))?;
    let dir = world.dir().join("real-path");
    std::fs::create_dir_all(&dir)?;
    let body_file = dir.join("credentials.json");
    std::fs::write(&body_file, &body)?;
    let scripts = Scripts::write(&dir)?;

    let listen = SocketAddr::new(IpAddr::V4(node.ip()), 0);
    let (_minimal, minimal_addr) =
        baseline::start_minimal_at(&dir, &body_file, listen, Some(node.netns())).await?;
    let nginx = start_nginx_in_node(&dir, node.netns(), listen, body.as_bytes()).await?;
    let servers = Targets {
        agent: agent_url.clone(),
        nginx: nginx
            .as_ref()
            .map(|(_, addr)| format!("http://{addr}{CREDS_PATH}")),
        minimal: format!("http://{minimal_addr}{CREDS_PATH}"),
    };
    if servers.nginx.is_none() {
        println!("(nginx is not installed: its baseline is left out; scripts/bench installs it)");
    }
    let agent_pid = world.agent_pid().context("the agent is not running")?;
    let token = pod
        .http_request(
            "PUT",
            &format!("http://{METADATA_IP}/latest/api/token"),
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
            Duration::from_secs(3),
        )
        .await?;
    if token.status != 200 {
        bail!("the agent gave no IMDSv2 token: {token:?}");
    }
    let ctx = Run {
        pod,
        scripts: &scripts,
        duration: plan.real_duration,
        warmup: plan.real_warmup,
    };
    let keep_alive = ctx
        .keep_alive(&servers, &plan.concurrency, agent_pid, targets)
        .await?;
    let token_pairs = ctx
        .token_pairs(&servers, &plan.concurrency, &token.body, targets)
        .await?;
    println!(
        "agent RSS peak {:.1} MiB; body {} bytes; wrk {}; {} s per run",
        proc_stats::peak_rss_mib(agent_pid)?,
        body.len(),
        wrk_version(),
        plan.real_duration.as_secs_f64()
    );
    Ok(json!({
        "path": "pod netns → veth → DNAT 169.254.169.254:80 → agent in the node netns; nginx and the minimal server on the node's address over the same veth",
        "generator": wrk_version(),
        "body_bytes": body.len(),
        "seconds_per_run": plan.real_duration.as_secs_f64(),
        "agent_max_connections_per_pod": MAX_CONNECTIONS_PER_POD,
        "keep_alive": keep_alive,
        "token": token_pairs,
        "agent_rss_peak_mib": proc_stats::peak_rss_mib(agent_pid)?,
    }))
}

/// The first credentials `pod` gets at `url`, asked until they come (STS behind the server,
/// moto here, takes a moment the first time).
async fn first_credentials(pod: &Netns, url: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = pod.http_get(url, Duration::from_secs(3)).await;
        match reply {
            Ok(reply) if reply.status == 200 => return Ok(reply.body),
            other if std::time::Instant::now() > deadline => {
                bail!("the pod never got credentials: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// nginx in the node namespace on `listen`'s address: the socket is made there and handed
/// over, and whether it answers is asked from there too.
async fn start_nginx_in_node(
    dir: &Path,
    node: &Netns,
    listen: SocketAddr,
    body: &[u8],
) -> anyhow::Result<Option<(ChildGuard, SocketAddr)>> {
    if baseline::nginx_binary().is_none() {
        return Ok(None);
    }
    let listener = node.run(|| std::net::TcpListener::bind(listen))??;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}{CREDS_PATH}");
    let probe = || {
        let url = url.clone();
        async move {
            node.http_get(&url, Duration::from_secs(2))
                .await
                .is_ok_and(|r| r.status == 200)
        }
    };
    let guard =
        baseline::start_nginx_on(&dir.join("nginx"), CREDS_PATH, body, listener, probe).await?;
    Ok(Some((guard, addr)))
}

fn wrk_version() -> String {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split_whitespace().nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// One pod's runs.
struct Run<'a> {
    pod: &'a Netns,
    scripts: &'a Scripts,
    duration: Duration,
    warmup: Duration,
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn row(name: &str, r: &WrkResult) -> String {
    format!(
        "{name:<9} {:>10.0} {:>8} {:>8} {:>9}{}",
        r.per_second,
        ms(r.p50_us),
        ms(r.p99_us),
        ms(r.p999_us),
        if r.errors > 0 {
            format!("  ({} errors)", r.errors)
        } else {
            String::new()
        }
    )
}

impl Run<'_> {
    /// A warm-up (not counted), then the measured run.
    async fn measure(
        &self,
        url: &str,
        connections: usize,
        load: Load<'_>,
    ) -> anyhow::Result<WrkResult> {
        if !self.warmup.is_zero() {
            wrk(self.pod, self.scripts, url, connections, self.warmup, load).await?;
        }
        wrk(
            self.pod,
            self.scripts,
            url,
            connections,
            self.duration,
            load,
        )
        .await
    }

    /// Keep-alive GETs of the credentials path: agent, nginx, minimal at each count.
    async fn keep_alive(
        &self,
        servers: &Targets,
        counts: &[usize],
        agent_pid: u32,
        targets: &mut Vec<Target>,
    ) -> anyhow::Result<Vec<Value>> {
        println!("keep-alive GET of the credentials path");
        println!(
            "{:>5} {:<9} {:>10} {:>8} {:>8} {:>9}",
            "conns", "server", "req/s", "p50 ms", "p99 ms", "p99.9 ms"
        );
        let mut rows = Vec::new();
        for &connections in counts {
            let cpu_before = proc_stats::cpu_seconds(agent_pid)?;
            let agent = self.measure(&servers.agent, connections, Load::Get).await?;
            let agent_cpu = proc_stats::cpu_seconds(agent_pid)? - cpu_before;
            let nginx = match &servers.nginx {
                Some(url) => Some(self.measure(url, connections, Load::Get).await?),
                None => None,
            };
            let minimal = self
                .measure(&servers.minimal, connections, Load::Get)
                .await?;
            println!("{connections:>5} {}", row("agent", &agent));
            if let Some(nginx) = &nginx {
                println!("{:>5} {}", "", row("nginx", nginx));
            }
            println!("{:>5} {}", "", row("minimal", &minimal));
            let verdict = nginx.as_ref().map(|nginx| {
                let throughput = agent.per_second / nginx.per_second.max(1e-9);
                let p99 = agent.p99_us as f64 / (nginx.p99_us.max(1)) as f64;
                (throughput, p99)
            });
            if let Some((throughput, p99)) = verdict {
                let met_t = throughput >= GOAL_THROUGHPUT && agent.errors == 0;
                let met_p = p99 <= GOAL_P99 && agent.errors == 0;
                println!(
                    "{:>5} agent÷nginx req/s {throughput:.2} ({}), p99 {p99:.2}× ({}); agent÷minimal req/s {:.2}; agent CPU {agent_cpu:.1} s",
                    "",
                    if met_t { "met" } else { "NOT MET" },
                    if met_p { "met" } else { "NOT MET" },
                    agent.per_second / minimal.per_second.max(1e-9),
                );
                target(
                    targets,
                    &format!("real path: agent÷nginx req/s, {connections} conns"),
                    format!("{throughput:.2}"),
                    ">= 0.90",
                    met_t,
                );
                target(
                    targets,
                    &format!("real path: agent p99 ÷ nginx p99, {connections} conns"),
                    format!("{p99:.2}"),
                    "<= 1.20",
                    met_p,
                );
            }
            rows.push(json!({
                "connections": connections,
                "agent": agent,
                "nginx": nginx,
                "minimal": minimal,
                "agent_cpu_seconds": agent_cpu,
                "agent_over_nginx_throughput": verdict.map(|v| v.0),
                "agent_over_nginx_p99": verdict.map(|v| v.1),
                "agent_over_minimal_throughput": agent.per_second / minimal.per_second.max(1e-9),
                "throughput_met": verdict.map(|v| v.0 >= GOAL_THROUGHPUT && agent.errors == 0),
                "p99_met": verdict.map(|v| v.1 <= GOAL_P99 && agent.errors == 0),
            }));
        }
        Ok(rows)
    }

    /// IMDSv2 pairs (each PUT and each GET a request): the agent against the minimal server.
    async fn token_pairs(
        &self,
        servers: &Targets,
        counts: &[usize],
        token: &str,
        targets: &mut Vec<Target>,
    ) -> anyhow::Result<Vec<Value>> {
        println!("IMDSv2: PUT /latest/api/token and GET with the token, alternating");
        let mut rows = Vec::new();
        for &connections in counts {
            let agent = self
                .measure(&servers.agent, connections, Load::TokenPair(token))
                .await?;
            let minimal = self
                .measure(
                    &servers.minimal,
                    connections,
                    Load::TokenPair(MINIMAL_TOKEN),
                )
                .await?;
            let throughput = agent.per_second / minimal.per_second.max(1e-9);
            let p99 = agent.p99_us as f64 / (minimal.p99_us.max(1)) as f64;
            println!("{connections:>5} {}", row("agent", &agent));
            println!("{:>5} {}", "", row("minimal", &minimal));
            println!(
                "{:>5} agent÷minimal req/s {throughput:.2}, p99 {p99:.2}×",
                ""
            );
            if connections == 16 {
                target(
                    targets,
                    "real path: token pairs agent÷minimal req/s, 16 conns",
                    format!("{throughput:.2}"),
                    ">= 0.90",
                    throughput >= GOAL_THROUGHPUT && agent.errors == 0,
                );
            }
            rows.push(json!({
                "connections": connections,
                "agent": agent,
                "minimal": minimal,
                "agent_over_minimal_throughput": throughput,
                "agent_over_minimal_p99": p99,
            }));
        }
        Ok(rows)
    }
}

/// The section's JSON when it cannot run.
pub fn skipped(why: &str) -> Value {
    json!({ "skipped": why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_figures() {
        let out = "Running 1s test\n  2 threads\nPODIAM-WRK {\"requests\":1000,\"duration_us\":2000000,\"connect_errors\":0,\"read_errors\":0,\"write_errors\":0,\"status_errors\":2,\"timeouts\":1,\"p50_us\":100,\"p99_us\":900,\"p999_us\":1500,\"max_us\":3000}\nRequests/sec: 500\n";
        let r = WrkResult::parse(out).expect("parses");
        assert_eq!(r.requests, 1000);
        assert_eq!(r.errors, 3);
        assert!((r.per_second - 500.0).abs() < 1e-6);
        assert_eq!((r.p50_us, r.p99_us, r.p999_us), (100, 900, 1500));
        assert!(WrkResult::parse("no figures").is_err());
    }
}
