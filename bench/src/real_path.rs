//! The real path: where pods really are. The load comes from inside a pod's network namespace,
//! through its veth and the agent's own DNAT rule in the node's namespace, from a third-party
//! load generator (`wrk`), so that neither the path nor the measuring tool is ours.
//!
//! The cluster is the test harness's [`World`]: a node namespace running `podiam-agent serve
//! --iptables`, one pod namespace with a role. Beside the agent, in the node namespace and
//! reached over the same veth through a DNAT rule each (as the agent is), nginx and the
//! minimal Rust server serve the agent's exact credentials bytes; the minimal server gives
//! the agent's headers too, checked before any run, so the pairs compare the same wire
//! bytes. At each connection count the targets take turns in rounds, keep-alive GETs of the
//! credentials path, and the IMDSv2
//! pair (`PUT /latest/api/token`, then the GET with the token) against the minimal server
//! (nginx has no token PUT). This machine kind is shared: the other tenants' load comes and
//! goes within seconds, and one long run per target let it decide which target looked
//! faster (nginx's p99 at 16 connections ranged 0.7–3.3 ms between runs). So the ratios are
//! taken round by round, between runs a few seconds apart, and the median round's ratio is
//! the figure; every round's is in the JSON.
//!
//! As fast as it can, wrk and the servers share the machine's two cores, and a server that
//! answers more requests a second leaves wrk less time to read its answers: its p99 then
//! measures a heavier load than a slower server's, and two busy cores' run queues. So the
//! GETs run twice more: as fast as they can with wrk on one core and the server on the other
//! ([`Mode::Pinned`]), so that neither waits for the other's core; and paced, each connection
//! pausing between an answer and its next request ([`pace_ms`]), which gives every server the
//! same load, well under what any of them can answer, and compares p99s at it. Each run also
//! reads the server's CPU time and context switches and wrk's own CPU time.
//!
//! Needs root (namespaces, veths, iptables in the node's namespace); without it the section
//! says so and is skipped. Every namespace, veth and rule goes when the `World` drops, on
//! success or failure: the rules live only in the node's namespace, which is deleted whole.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use podiam_tests::netns::{HttpReply, METADATA_IP, Netns};
use podiam_tests::process::ChildGuard;
use podiam_tests::world::{World, WorldConfig};
use serde::Serialize;
use serde_json::{Value, json};

use crate::baseline;
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

/// wrk's script for paced GETs (with [`WRK_REPORT`] after it): each connection waits the
/// script's argument in milliseconds between an answer and its next request. wrk times a
/// request from when it is written, so the pause is not in the latency.
const WRK_PACED: &str = r#"
local pause = 1

function init(args)
  pause = tonumber(args[1])
end

function delay()
  return pause
end
"#;

/// The pause of each connection between requests in the paced runs, in milliseconds: one
/// per 16 connections, so 16 connections make about 10k requests a second and 128 about 15k,
/// well under what any of the three servers answers at once (30k and more here).
fn pace_ms(connections: usize) -> u64 {
    connections.div_ceil(16).max(1) as u64
}

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
    /// CPU time (user and system) the server's processes used during the run, and per
    /// request.
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_request: f64,
    /// Context switches of the server's threads during the run: waiting for work, and put
    /// off the core with work to do ([`proc_stats::context_switches_of`]).
    pub server_voluntary_switches: u64,
    pub server_involuntary_switches: u64,
    /// CPU time wrk itself used: near the seconds of the run times the cores it may use, wrk
    /// is the bottleneck and its own queueing is in the latencies.
    pub wrk_cpu_seconds: f64,
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
            server_cpu_seconds: 0.0,
            server_cpu_us_per_request: 0.0,
            server_voluntary_switches: 0,
            server_involuntary_switches: 0,
            wrk_cpu_seconds: 0.0,
        })
    }
}

/// How the keep-alive GETs are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// As fast as each server answers, wrk and the server on any core.
    Full,
    /// As fast as each server answers, wrk confined to [`WRK_CPU`] and the server to
    /// [`SERVER_CPU`]: neither takes the other's core, so the latencies are the server's and
    /// the path's, not the scheduler sharing two cores among wrk's and the server's threads.
    Pinned,
    /// Each connection pausing [`pace_ms`] between requests.
    Paced,
}

impl Mode {
    /// The section's name in the list of targets.
    fn section(self) -> &'static str {
        match self {
            Mode::Full => "real path",
            Mode::Pinned => "real path, a core each",
            Mode::Paced => "real path, paced",
        }
    }
}

/// The core wrk runs on in [`Mode::Pinned`] …
const WRK_CPU: usize = 0;
/// … and the core of the server under load.
const SERVER_CPU: usize = 1;

/// What the load is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load<'a> {
    /// Keep-alive GETs of the credentials path.
    Get,
    /// IMDSv2 pairs with this token.
    TokenPair(&'a str),
    /// Keep-alive GETs, each connection pausing this many milliseconds between requests.
    PacedGet(u64),
}

/// wrk's two scripts, written once.
struct Scripts {
    get: std::path::PathBuf,
    token: std::path::PathBuf,
    paced: std::path::PathBuf,
}

impl Scripts {
    fn write(dir: &Path) -> anyhow::Result<Scripts> {
        let scripts = Scripts {
            get: dir.join("podiam-get.lua"),
            token: dir.join("podiam-token.lua"),
            paced: dir.join("podiam-paced.lua"),
        };
        std::fs::write(&scripts.get, WRK_REPORT)?;
        std::fs::write(&scripts.token, format!("{WRK_TOKEN}{WRK_REPORT}"))?;
        std::fs::write(&scripts.paced, format!("{WRK_PACED}{WRK_REPORT}"))?;
        Ok(scripts)
    }
}

/// Runs wrk in `pod` against `url` with `connections` keep-alive connections for `duration`,
/// on core `cpu` alone when one is given.
async fn wrk(
    pod: &Netns,
    scripts: &Scripts,
    url: &str,
    connections: usize,
    duration: Duration,
    load: Load<'_>,
    cpu: Option<usize>,
) -> anyhow::Result<WrkResult> {
    // Two threads (the machine's cores) unless one connection: wrk needs a connection per
    // thread.
    let threads = connections.clamp(1, 2);
    let mut command = match cpu {
        Some(cpu) => {
            let mut command = pod.command("taskset");
            command.args(["--cpu-list", &cpu.to_string(), "wrk"]);
            command
        }
        None => pod.command("wrk"),
    };
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
            Load::PacedGet(_) => &scripts.paced,
        })
        .arg(url)
        .kill_on_drop(true);
    match load {
        Load::Get => {}
        Load::TokenPair(token) => {
            command.args(["--", token]);
        }
        Load::PacedGet(pause_ms) => {
            command.args(["--", &pause_ms.to_string()]);
        }
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
    agent: Server,
    /// nginx on the node's address, when installed.
    nginx: Option<Server>,
    /// The minimal server on the node's address.
    minimal: Server,
}

/// One server: its URL for the pod, and its processes (whose CPU time each run reads).
struct Server {
    url: String,
    pids: Vec<u32>,
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

    // The pod's credentials and a token once through the real path: the answers (bytes and
    // headers) every baseline gives.
    let first = first_credentials(pod, &agent_url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; agent log:\n{}", world.agent_log()))?;
    let body = first.body.clone();
    let dir = world.dir().join("real-path");
    std::fs::create_dir_all(&dir)?;
    let scripts = Scripts::write(&dir)?;
    let token = pod
        .http_request(
            "PUT",
            &format!("http://{METADATA_IP}/latest/api/token"),
            &TOKEN_REQUEST_HEADERS,
            Duration::from_secs(3),
        )
        .await?;
    if token.status != 200 {
        bail!("the agent gave no IMDSv2 token: {token:?}");
    }
    let agent_pid = world.agent_pid().context("the agent is not running")?;
    let (servers, _baselines) = start_baselines(node, &dir, &first, &token, agent_pid).await?;
    same_answers(pod, &servers.minimal.url, &first, &token).await?;
    if servers.nginx.is_none() {
        println!("(nginx is not installed: its baseline is left out; scripts/bench installs it)");
    }
    let ctx = Run {
        pod,
        scripts: &scripts,
        rounds: plan.real_rounds.max(1),
        duration: plan.real_duration,
        warmup: plan.real_warmup,
    };
    let keep_alive = ctx
        .keep_alive(&servers, &plan.concurrency, Mode::Full, targets)
        .await?;
    let pinned = if two_cores() {
        json!(
            ctx.keep_alive(&servers, &plan.concurrency, Mode::Pinned, targets)
                .await?
        )
    } else {
        println!("(one core: no run with wrk and the server on a core each)");
        Value::Null
    };
    let paced = ctx
        .keep_alive(&servers, &plan.concurrency, Mode::Paced, targets)
        .await?;
    let token_pairs = ctx
        .token_pairs(&servers, &plan.concurrency, &token.body, targets)
        .await?;
    println!(
        "agent RSS peak {:.1} MiB; body {} bytes; wrk {}; {} per server and count",
        proc_stats::peak_rss_mib(agent_pid)?,
        body.len(),
        wrk_version(),
        ctx.plan_text(),
    );
    Ok(json!({
        "path": "pod netns → veth → DNAT 169.254.169.254:80 → agent in the node netns; nginx and the minimal server in the node netns over the same veth, each through a DNAT rule of its own (169.254.171.2:80, 169.254.171.1:80)",
        "generator": wrk_version(),
        "body_bytes": body.len(),
        "seconds_per_run": plan.real_duration.as_secs_f64(),
        "rounds": plan.real_rounds,
        "agent_max_connections_per_pod": MAX_CONNECTIONS_PER_POD,
        "keep_alive": keep_alive,
        "keep_alive_a_core_each": pinned,
        "paced": paced,
        "token": token_pairs,
        "agent_rss_peak_mib": proc_stats::peak_rss_mib(agent_pid)?,
    }))
}

/// True when this process may run on both [`WRK_CPU`] and [`SERVER_CPU`].
fn two_cores() -> bool {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).is_ok_and(|set| {
        [WRK_CPU, SERVER_CPU]
            .iter()
            .all(|&cpu| set.is_set(cpu).unwrap_or(false))
    })
}

/// The IMDSv2 token request's headers.
const TOKEN_REQUEST_HEADERS: [(&str, &str); 1] =
    [("X-aws-ec2-metadata-token-ttl-seconds", "21600")];

/// The baselines' processes, running until dropped.
struct Baselines {
    _minimal: ChildGuard,
    _nginx: Option<ChildGuard>,
}

/// Starts nginx (when installed) and the minimal server in the node's namespace, each reached
/// through a DNAT rule of its own, the minimal server giving the agent's `credentials` and
/// `token` answers (bodies and headers); the three targets, and the baselines' processes.
async fn start_baselines(
    node: &podiam_tests::netns::Node,
    dir: &Path,
    credentials: &HttpReply,
    token: &HttpReply,
    agent_pid: u32,
) -> anyhow::Result<(Targets, Baselines)> {
    let body_file = dir.join("credentials.json");
    std::fs::write(&body_file, &credentials.body)?;
    // The minimal server hands out the agent's own token: the pairs carry the same bytes.
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token.body)?;
    let listen = SocketAddr::new(IpAddr::V4(node.ip()), 0);
    let headers = [
        ("get-header", baseline::header_lines(&credentials.headers)),
        ("put-header", baseline::header_lines(&token.headers)),
    ];
    let (minimal, minimal_addr) = baseline::start_minimal_at(
        dir,
        &body_file,
        Some(&token_file),
        listen,
        Some(node.netns()),
        &headers,
    )
    .await?;
    let nginx = start_nginx_in_node(dir, node.netns(), listen, credentials.body.as_bytes()).await?;
    // The baselines are reached as the agent is: by an address of their own that a DNAT rule
    // in the node's namespace sends to them, so each pays the same translation per packet.
    let minimal_url = dnat_url(node.netns(), MINIMAL_IP, minimal_addr).await?;
    let nginx_url = match &nginx {
        Some((_, addr)) => Some(dnat_url(node.netns(), NGINX_IP, *addr).await?),
        None => None,
    };
    let targets = Targets {
        agent: Server {
            url: format!("http://{METADATA_IP}{CREDS_PATH}"),
            pids: vec![agent_pid],
        },
        nginx: nginx
            .as_ref()
            .zip(nginx_url)
            .map(|((guard, _), url)| Server {
                url,
                // The master and its workers, started and answering by now.
                pids: proc_stats::with_children(guard.pid()),
            }),
        minimal: Server {
            url: minimal_url,
            pids: vec![minimal.pid()],
        },
    };
    let baselines = Baselines {
        _minimal: minimal,
        _nginx: nginx.map(|(guard, _)| guard),
    };
    Ok((targets, baselines))
}

/// Checks that the minimal server at `url` answers `pod` as the agent did (`credentials`,
/// `token`): the same status, body and headers but the date. The pairs' figures compare
/// the agent's work with none only if the bytes on the wire are the same.
async fn same_answers(
    pod: &Netns,
    url: &str,
    credentials: &HttpReply,
    token: &HttpReply,
) -> anyhow::Result<()> {
    let token_url = url.replace(CREDS_PATH, "/latest/api/token");
    let timeout = Duration::from_secs(3);
    let got_credentials = pod.http_get(url, timeout).await?;
    let got_token = pod
        .http_request("PUT", &token_url, &TOKEN_REQUEST_HEADERS, timeout)
        .await?;
    for (what, agent, minimal) in [
        ("credentials", credentials, &got_credentials),
        ("token", token, &got_token),
    ] {
        if comparable(agent) != comparable(minimal) {
            bail!(
                "the minimal server's {what} answer differs from the agent's:\n  agent: {:?}\n  minimal: {:?}",
                comparable(agent),
                comparable(minimal)
            );
        }
    }
    Ok(())
}

/// An answer without its date, headers by name.
fn comparable(reply: &HttpReply) -> (u16, &str, std::collections::BTreeSet<(String, &str)>) {
    let headers = reply
        .headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("date"))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.as_str()))
        .collect();
    (reply.status, reply.body.as_str(), headers)
}

/// The address pods reach the minimal server by, and nginx by: link-local like the metadata
/// address, each sent on by a DNAT rule like the agent's.
const MINIMAL_IP: &str = "169.254.171.1";
const NGINX_IP: &str = "169.254.171.2";

/// Sends `ip`:80 to `target` with a DNAT rule in the node's namespace (`node`: deleted whole
/// with the world, and the rule with it); the credentials URL by that address.
async fn dnat_url(node: &Netns, ip: &str, target: SocketAddr) -> anyhow::Result<String> {
    let output = node
        .command("iptables")
        .args([
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &format!("{ip}/32"),
        ])
        .args(["-p", "tcp", "--dport", "80", "-j", "DNAT"])
        .args(["--to-destination", &target.to_string()])
        .output()
        .await
        .context("running iptables in the node's namespace")?;
    if !output.status.success() {
        bail!(
            "iptables refused the DNAT rule for {ip}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(format!("http://{ip}{CREDS_PATH}"))
}

/// The first credentials `pod` gets at `url`, asked until they come (STS behind the server,
/// moto here, takes a moment the first time).
async fn first_credentials(pod: &Netns, url: &str) -> anyhow::Result<HttpReply> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = pod.http_get(url, Duration::from_secs(3)).await;
        match reply {
            Ok(reply) if reply.status == 200 => return Ok(reply),
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
    rounds: usize,
    duration: Duration,
    warmup: Duration,
}

/// A goal's verdict as the tables print it.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn row(name: &str, r: &WrkResult) -> String {
    let per_request = |n: u64| n as f64 / r.requests.max(1) as f64;
    format!(
        "{name:<9} {:>10.0} {:>8} {:>8} {:>9} {:>10.1} {:>6.2}/{:<5.2} {:>7.2}{}",
        r.per_second,
        ms(r.p50_us),
        ms(r.p99_us),
        ms(r.p999_us),
        r.server_cpu_us_per_request,
        per_request(r.server_voluntary_switches),
        per_request(r.server_involuntary_switches),
        r.wrk_cpu_seconds / r.seconds.max(1e-9),
        if r.errors > 0 {
            format!("  ({} errors)", r.errors)
        } else {
            String::new()
        }
    )
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One target's runs at one connection count, one per round.
#[derive(Clone, Debug, Default)]
struct Runs(Vec<WrkResult>);

impl Runs {
    /// The runs as one: requests and errors summed, throughput over the summed time, each
    /// percentile the median of the rounds' (a round the machine's other load hit does not
    /// decide it), the largest maximum.
    fn summary(&self) -> WrkResult {
        let runs = &self.0;
        let requests = runs.iter().map(|r| r.requests).sum();
        let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
        let cpu: f64 = runs.iter().map(|r| r.server_cpu_seconds).sum();
        let of = |f: fn(&WrkResult) -> u64| median(runs.iter().map(|r| f(r) as f64).collect());
        WrkResult {
            requests,
            errors: runs.iter().map(|r| r.errors).sum(),
            seconds,
            per_second: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_us: of(|r| r.p50_us) as u64,
            p99_us: of(|r| r.p99_us) as u64,
            p999_us: of(|r| r.p999_us) as u64,
            max_us: runs.iter().map(|r| r.max_us).max().unwrap_or(0),
            server_cpu_seconds: cpu,
            server_cpu_us_per_request: cpu * 1e6 / requests.max(1) as f64,
            server_voluntary_switches: runs.iter().map(|r| r.server_voluntary_switches).sum(),
            server_involuntary_switches: runs.iter().map(|r| r.server_involuntary_switches).sum(),
            wrk_cpu_seconds: runs.iter().map(|r| r.wrk_cpu_seconds).sum(),
        }
    }
}

/// `a` against `b` round by round: each round's throughput ratio and p99 ratio, and their
/// medians. Runs of the same round ran one after the other, so each round's ratio compares
/// the two under the same load from the machine's other tenants.
#[derive(Clone, Debug, Serialize)]
struct Compared {
    throughput: f64,
    p99: f64,
    throughput_by_round: Vec<f64>,
    p99_by_round: Vec<f64>,
}

impl Compared {
    fn new(a: &Runs, b: &Runs) -> Compared {
        let pairs = || a.0.iter().zip(&b.0);
        let throughput_by_round: Vec<f64> = pairs()
            .map(|(a, b)| a.per_second / b.per_second.max(1e-9))
            .collect();
        let p99_by_round: Vec<f64> = pairs()
            .map(|(a, b)| a.p99_us as f64 / b.p99_us.max(1) as f64)
            .collect();
        Compared {
            throughput: median(throughput_by_round.clone()),
            p99: median(p99_by_round.clone()),
            throughput_by_round,
            p99_by_round,
        }
    }

    /// The spread over the rounds, for the printed line: "0.95–1.10".
    fn spread(values: &[f64]) -> String {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if values.len() < 2 {
            String::new()
        } else {
            format!(" [{lo:.2}–{hi:.2}]")
        }
    }
}

impl Run<'_> {
    /// "5 rounds of 2 s", "1 round of 1 s".
    fn plan_text(&self) -> String {
        let plural = if self.rounds == 1 { "" } else { "s" };
        format!(
            "{} round{plural} of {} s",
            self.rounds,
            self.duration.as_secs()
        )
    }

    /// Each target's warm-up (not counted), then `rounds` rounds, each running every target
    /// once, the order turned by one each round so that no target always runs first or last;
    /// `pinned`: wrk and the server on a core each ([`Mode::Pinned`]).
    async fn rounds(
        &self,
        targets: &[(&Server, Load<'_>)],
        connections: usize,
        pinned: bool,
    ) -> anyhow::Result<Vec<Runs>> {
        if !self.warmup.is_zero() {
            for &(server, load) in targets {
                self.run(server, load, connections, self.warmup, pinned)
                    .await?;
            }
        }
        let mut runs = vec![Runs::default(); targets.len()];
        for round in 0..self.rounds {
            for i in 0..targets.len() {
                let at = (i + round) % targets.len();
                let (server, load) = targets[at];
                let result = self
                    .run(server, load, connections, self.duration, pinned)
                    .await?;
                runs[at].0.push(result);
            }
        }
        Ok(runs)
    }

    /// One wrk run against `server`, with the server's CPU time and context switches and
    /// wrk's own CPU time during it; `pinned`: wrk on [`WRK_CPU`], the server's threads on
    /// [`SERVER_CPU`] for the run and on every core again after it.
    async fn run(
        &self,
        server: &Server,
        load: Load<'_>,
        connections: usize,
        duration: Duration,
        pinned: bool,
    ) -> anyhow::Result<WrkResult> {
        if pinned {
            proc_stats::pin_threads(&server.pids, Some(&[SERVER_CPU]))?;
        }
        let cpu_before = proc_stats::cpu_seconds_of(&server.pids)?;
        let switches_before = proc_stats::context_switches_of(&server.pids)?;
        let wrk_before = proc_stats::ended_children_cpu_seconds()?;
        let url = &server.url;
        let cpu = pinned.then_some(WRK_CPU);
        let result = wrk(
            self.pod,
            self.scripts,
            url,
            connections,
            duration,
            load,
            cpu,
        )
        .await;
        let cpu_after = proc_stats::cpu_seconds_of(&server.pids);
        let switches_after = proc_stats::context_switches_of(&server.pids);
        if pinned {
            proc_stats::pin_threads(&server.pids, None)?;
        }
        let mut result = result?;
        result.server_cpu_seconds = cpu_after? - cpu_before;
        result.server_cpu_us_per_request =
            result.server_cpu_seconds * 1e6 / result.requests.max(1) as f64;
        result.wrk_cpu_seconds = proc_stats::ended_children_cpu_seconds()? - wrk_before;
        let switches_after = switches_after?;
        result.server_voluntary_switches = switches_after.0.saturating_sub(switches_before.0);
        result.server_involuntary_switches = switches_after.1.saturating_sub(switches_before.1);
        Ok(result)
    }

    /// Keep-alive GETs of the credentials path: agent, nginx, minimal at each count, run as
    /// `mode` says.
    async fn keep_alive(
        &self,
        servers: &Targets,
        counts: &[usize],
        mode: Mode,
        targets: &mut Vec<Target>,
    ) -> anyhow::Result<Vec<Value>> {
        let paced = mode == Mode::Paced;
        let plan = self.plan_text();
        match mode {
            Mode::Full => {
                println!("keep-alive GET of the credentials path ({plan}; medians of the rounds)")
            }
            Mode::Pinned => println!(
                "keep-alive GET, wrk on CPU {WRK_CPU} and the server on CPU {SERVER_CPU}: \
                 neither takes the other's core ({plan})"
            ),
            Mode::Paced => println!(
                "paced keep-alive GET: each connection waits 1 ms per 16 connections between an \
                 answer and its next request, the same load for every server ({plan})"
            ),
        }
        println!(
            "{:>5} {:<9} {:>10} {:>8} {:>8} {:>9} {:>10} {:>12} {:>7}",
            "conns",
            "server",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "CPU µs/req",
            "switches/req",
            "wrk CPU"
        );
        let mut rows = Vec::new();
        for &connections in counts {
            let load = if paced {
                Load::PacedGet(pace_ms(connections))
            } else {
                Load::Get
            };
            let mut list = vec![(&servers.agent, load)];
            if let Some(nginx) = &servers.nginx {
                list.push((nginx, load));
            }
            list.push((&servers.minimal, load));
            let mut runs = self
                .rounds(&list, connections, mode == Mode::Pinned)
                .await?;
            let minimal_runs = runs.pop().context("the minimal server's runs")?;
            let nginx_runs = servers.nginx.as_ref().and_then(|_| runs.pop());
            let agent_runs = runs.pop().context("the agent's runs")?;
            let agent = agent_runs.summary();
            let nginx = nginx_runs.as_ref().map(Runs::summary);
            let minimal = minimal_runs.summary();
            println!("{connections:>5} {}", row("agent", &agent));
            if let Some(nginx) = &nginx {
                println!("{:>5} {}", "", row("nginx", nginx));
            }
            println!("{:>5} {}", "", row("minimal", &minimal));
            let over_nginx = nginx_runs.as_ref().map(|n| Compared::new(&agent_runs, n));
            let over_minimal = Compared::new(&agent_runs, &minimal_runs);
            let met_p = over_nginx
                .as_ref()
                .map(|c| c.p99 <= GOAL_P99 && agent.errors == 0);
            // Paced, the pace sets the load: no throughput goal.
            let met_t = over_nginx
                .as_ref()
                .filter(|_| !paced)
                .map(|c| c.throughput >= GOAL_THROUGHPUT && agent.errors == 0);
            if let (Some(c), Some(met_p)) = (&over_nginx, met_p) {
                if let Some(met_t) = met_t {
                    println!(
                        "{:>5} agent÷nginx req/s {:.2}{} ({}), p99 {:.2}×{} ({}); agent÷minimal req/s {:.2}",
                        "",
                        c.throughput,
                        Compared::spread(&c.throughput_by_round),
                        verdict(met_t),
                        c.p99,
                        Compared::spread(&c.p99_by_round),
                        verdict(met_p),
                        over_minimal.throughput,
                    );
                    target(
                        targets,
                        &format!("{}: agent÷nginx req/s, {connections} conns", mode.section()),
                        format!("{:.2}", c.throughput),
                        ">= 0.90",
                        met_t,
                    );
                } else {
                    println!(
                        "{:>5} at {:.2}× nginx's load: agent p99 {:.2}× nginx's{} ({}), {:.2}× the minimal server's",
                        "",
                        c.throughput,
                        c.p99,
                        Compared::spread(&c.p99_by_round),
                        verdict(met_p),
                        over_minimal.p99,
                    );
                }
                target(
                    targets,
                    &format!(
                        "{}: agent p99 ÷ nginx p99, {connections} conns",
                        mode.section()
                    ),
                    format!("{:.2}", c.p99),
                    "<= 1.20",
                    met_p,
                );
            }
            rows.push(json!({
                "connections": connections,
                "pause_ms": paced.then(|| pace_ms(connections)),
                "wrk_and_server_on_a_core_each": mode == Mode::Pinned,
                "rounds": self.rounds,
                "agent": agent,
                "nginx": nginx,
                "minimal": minimal,
                "agent_over_nginx": over_nginx,
                "agent_over_minimal": over_minimal,
                "throughput_met": met_t,
                "p99_met": met_p,
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
        println!(
            "IMDSv2: PUT /latest/api/token and GET with the token, alternating ({})",
            self.plan_text()
        );
        let mut rows = Vec::new();
        for &connections in counts {
            let list = [
                (&servers.agent, Load::TokenPair(token)),
                (&servers.minimal, Load::TokenPair(token)),
            ];
            let runs = self.rounds(&list, connections, false).await?;
            let (agent_runs, minimal_runs) = (&runs[0], &runs[1]);
            let (agent, minimal) = (agent_runs.summary(), minimal_runs.summary());
            let c = Compared::new(agent_runs, minimal_runs);
            println!("{connections:>5} {}", row("agent", &agent));
            println!("{:>5} {}", "", row("minimal", &minimal));
            println!(
                "{:>5} agent÷minimal req/s {:.2}{}, p99 {:.2}×{}",
                "",
                c.throughput,
                Compared::spread(&c.throughput_by_round),
                c.p99,
                Compared::spread(&c.p99_by_round),
            );
            target(
                targets,
                &format!("real path: token pairs agent÷minimal req/s, {connections} conns"),
                format!("{:.2}", c.throughput),
                ">= 0.90",
                c.throughput >= GOAL_THROUGHPUT && agent.errors == 0,
            );
            target(
                targets,
                &format!("real path: token pairs agent p99 ÷ minimal p99, {connections} conns"),
                format!("{:.2}", c.p99),
                "<= 1.20",
                c.p99 <= GOAL_P99 && agent.errors == 0,
            );
            rows.push(json!({
                "connections": connections,
                "rounds": self.rounds,
                "agent": agent,
                "minimal": minimal,
                "agent_over_minimal": c,
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
    fn the_pace_is_a_millisecond_per_sixteen_connections() {
        let paces: Vec<u64> = [1, 16, 17, 128].into_iter().map(pace_ms).collect();
        assert_eq!(paces, [1, 1, 2, 8]);
    }

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

    fn run(per_second: f64, p99_us: u64, cpu: f64) -> WrkResult {
        WrkResult {
            requests: (per_second * 2.0) as u64,
            seconds: 2.0,
            per_second,
            p50_us: p99_us / 4,
            p99_us,
            p999_us: p99_us * 2,
            max_us: p99_us * 3,
            server_cpu_seconds: cpu,
            ..WrkResult::default()
        }
    }

    #[test]
    fn rounds_are_summed_and_their_percentiles_and_ratios_are_medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        // The third round of `a` was hit by another tenant's load: the medians are not moved
        // by it, the sums are.
        let a = Runs(vec![
            run(100.0, 1000, 0.1),
            run(110.0, 900, 0.1),
            run(10.0, 90_000, 0.2),
        ]);
        let b = Runs(vec![
            run(100.0, 1000, 0.1),
            run(100.0, 1000, 0.1),
            run(100.0, 1000, 0.1),
        ]);
        let s = a.summary();
        assert_eq!(s.requests, 440);
        assert!((s.seconds - 6.0).abs() < 1e-9);
        assert!((s.per_second - 440.0 / 6.0).abs() < 1e-9);
        assert_eq!(
            (s.p50_us, s.p99_us, s.p999_us, s.max_us),
            (250, 1000, 2000, 270_000)
        );
        assert!((s.server_cpu_us_per_request - 0.4 * 1e6 / 440.0).abs() < 1e-6);
        let c = Compared::new(&a, &b);
        assert_eq!(c.throughput_by_round.len(), 3);
        assert!((c.throughput - 1.0).abs() < 1e-9, "{c:?}");
        assert!((c.p99 - 1.0).abs() < 1e-9, "{c:?}");
        assert!((c.p99_by_round[2] - 90.0).abs() < 1e-9);
        assert_eq!(Compared::spread(&c.throughput_by_round), " [0.10–1.10]");
        assert_eq!(Compared::spread(&[1.0]), "");
    }
}
