//! The tests' "cluster network": network namespaces as nodes and pods.
//!
//! - [`Netns`]: a namespace created with `ip netns add` and deleted on drop (also while a
//!   test panics). Deleting a namespace deletes its veth ends, addresses and iptables rules.
//! - [`Node`]: a node namespace with a node IP on `lo` ([`NODE_IP_BASE`]`.N`/32), and
//!   [`Node::add_pod`] giving a [`PodNet`]: a fresh pod namespace joined to the node by a veth
//!   pair made directly between the two namespaces (nothing ever appears in the root
//!   namespace). Each pod gets its own /30 out of `10.77.0.0/16` below `10.77.255.0`: node
//!   side `.4k+1` on `podv<k>` (matched by [`POD_INTERFACE_PATTERN`]), pod side `.4k+2` on
//!   `eth0`, default route via the node side. A packet from a pod to 169.254.169.254 so
//!   arrives in the node namespace on that pod's `podv` interface.
//! - [`Node::serve_fake_node_metadata`]: a stand-in for the node's real metadata service on
//!   169.254.169.254:80 inside the node namespace, answering [`NODE_METADATA_BODY`] to
//!   everything, so tests can prove pods never fall through to it.
//! - Names: `pdm-<pid>-<counter>-<role>`, unique across the tests of one process and across
//!   concurrent runs; [`sweep_stale`] deletes those whose pid is dead, [`list_ours`] lists
//!   this process's.
//! - [`in_netns`]: run a closure on a short-lived thread inside a namespace; sockets made
//!   there keep that namespace (used by [`crate::bridge`]).
//!
//! Network hygiene: traffic only to loopback or to addresses inside namespaces the test
//! created; the host's root namespace interfaces and iptables are never touched.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command as StdCommand;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::process::{ChildGuard, ProcessError, wait_until};

/// Every namespace this harness creates starts with this.
pub const NAME_PREFIX: &str = "pdm-";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Where `ip netns exec NAME` finds files it puts over /etc's for the programs it starts
/// (`/etc/netns/NAME/resolv.conf` over `/etc/resolv.conf`).
pub const NETNS_ETC_DIR: &str = "/etc/netns";
/// Prefix of the node-side veth ends.
pub const POD_INTERFACE_PREFIX: &str = "podv";
/// iptables interface pattern matching every node-side pod veth (`-i podv+`).
pub const POD_INTERFACE_PATTERN: &str = "podv+";
/// Node IPs are `10.77.255.N`.
pub const NODE_IP_BASE: [u8; 3] = [10, 77, 255];
/// The link-local metadata address pods ask.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The instance metadata service's IPv6 address (Nitro instances), which the fake node
/// metadata service also answers on.
pub const METADATA_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The container-credentials address (EKS Pod Identity's), intercepted like the metadata one.
pub const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// What the fake node metadata service answers to every request.
pub const NODE_METADATA_BODY: &str = "NODE-METADATA-SERVICE";
/// Pod subnets are /30s in 10.77.0.0 – 10.77.254.255: 16320 pods per test process.
const MAX_PODS: u32 = 255 * 64;
/// The python one-liner's start-up (interpreter + bind) takes well under a second; the
/// bound only keeps a broken environment from hanging a test.
const FAKE_METADATA_START_TIMEOUT: Duration = Duration::from_secs(15);

static NAME_COUNTER: AtomicU32 = AtomicU32::new(0);
static POD_COUNTER: AtomicU32 = AtomicU32::new(0);
static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command could not be run.
    #[error("running `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Setting a sysctl inside a namespace failed.
    #[error("setting {name}")]
    Sysctl {
        /// The sysctl.
        name: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Opening a namespace handle failed.
    #[error("opening {}", .path.display())]
    Open {
        /// The handle's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `setns` failed.
    #[error("entering network namespace {name}")]
    Setns {
        /// The namespace.
        name: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// The helper thread panicked.
    #[error("the thread inside network namespace {0} panicked")]
    ThreadPanicked(String),
    /// All pod subnets of this process are used.
    #[error("out of pod subnets ({MAX_PODS} per test process)")]
    OutOfPodSubnets,
    /// Starting or awaiting a helper process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// Panics unless running as root: these tests need network namespaces and iptables. They
/// always fail without root, never pass silently.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root: it creates network namespaces, veth pairs and iptables \
             rules (run the end-to-end suites as root, e.g. in CI or with sudo)"
        );
    }
}

/// A new namespace name: `pdm-<pid>-<counter>-<role>`. `role` is truncated to 8 characters.
pub fn unique_name(role: &str) -> String {
    let n = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
    let role: String = role
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("{NAME_PREFIX}{}-{n}-{role}", std::process::id())
}

/// The pid encoded in one of our namespace names.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn command_line(cmd: &StdCommand) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let mut cmd = StdCommand::new("ip");
    cmd.args(args);
    let command = command_line(&cmd);
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all network namespaces (`ip netns list`, without the `(id: N)` suffix).
pub fn list_all() -> Result<Vec<String>, NetnsError> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// This process's namespaces that still exist.
pub fn list_ours() -> Result<Vec<String>, NetnsError> {
    let ours = format!("{NAME_PREFIX}{}-", std::process::id());
    Ok(list_all()?
        .into_iter()
        .filter(|n| n.starts_with(&ours))
        .collect())
}

/// Deletes `pdm-` namespaces left by processes that no longer run (crashed or killed
/// earlier runs). Returns the names deleted. Namespaces of live runs are left alone.
pub fn sweep_stale() -> Result<Vec<String>, NetnsError> {
    let mut deleted = Vec::new();
    for name in list_all()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        let alive = kill(Pid::from_raw(pid), None).is_ok();
        if !alive {
            remove_etc_files(&name);
            match ip(&["netns", "del", &name]) {
                Ok(_) => deleted.push(name),
                // Another test of this process swept it first.
                Err(_) if !PathBuf::from(NETNS_RUN_DIR).join(&name).exists() => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(deleted)
}

/// Runs `f` on a fresh thread that has entered network namespace `name`; sockets created in
/// `f` stay in that namespace wherever they are used afterwards.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = PathBuf::from(NETNS_RUN_DIR).join(name);
    let handle = File::open(&path).map_err(|source| NetnsError::Open { path, source })?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetnsError::Setns {
                    name: name.to_owned(),
                    source,
                }
            })?;
            Ok(f())
        });
        thread
            .join()
            .map_err(|_| NetnsError::ThreadPanicked(name.to_owned()))?
    })
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` and brings `lo` up. Use [`unique_name`] for `name`.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        ip(&["netns", "add", name])?;
        // From here on, drop deletes it even if the rest fails.
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes `text` the `/etc/resolv.conf` of every program started in the namespace from
    /// now on ([`Netns::command`]); removed with the namespace.
    pub fn set_resolv_conf(&self, text: &str) -> Result<(), NetnsError> {
        let dir = PathBuf::from(NETNS_ETC_DIR).join(&self.name);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("resolv.conf"), text))
            .map_err(|source| NetnsError::Spawn {
                command: format!("writing {}/resolv.conf", dir.display()),
                source,
            })
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A tokio `Command` running `program` inside the namespace (`ip netns exec NAME
    /// program`); add arguments and environment as usual.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        self.std_command(program).into()
    }

    /// The `std` flavour of [`Netns::command`].
    pub fn std_command(&self, program: &str) -> StdCommand {
        let mut cmd = StdCommand::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` inside this namespace; see [`in_netns`].
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, NetnsError> {
        in_netns(&self.name, f)
    }

    /// An HTTP request from inside the namespace with python's urllib (what an SDK in a pod
    /// does), `timeout` bounding the whole request. Non-2xx statuses are answers too.
    pub async fn http_request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<HttpReply, NetnsError> {
        const SCRIPT: &str = r#"
import sys, urllib.request, urllib.error, json
method, url, headers, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method in ("PUT", "POST") else None)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    r = opener.open(req, timeout=timeout)
    status, hdrs, body = r.status, r.headers, r.read()
except urllib.error.HTTPError as e:
    status, hdrs, body = e.code, e.headers, e.read()
sys.stdout.write(json.dumps({"status": status, "headers": [[k, v] for k, v in hdrs.items()], "body": body.decode("utf-8", "replace")}))
"#;
        let header_json = serde_json::to_string(
            &headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap_or_else(|_| "{}".to_owned());
        let mut cmd = self.command("python3");
        cmd.args(["-c", SCRIPT, method, url, &header_json])
            .arg(timeout.as_secs_f64().to_string())
            .kill_on_drop(true);
        let command = format!("python3 {method} {url} in {}", self.name);
        let out = tokio::time::timeout(timeout + Duration::from_secs(5), cmd.output())
            .await
            .map_err(|_| NetnsError::Command {
                command: command.clone(),
                stderr: "timed out".into(),
            })?
            .map_err(|source| NetnsError::Spawn {
                command: command.clone(),
                source,
            })?;
        let parsed: Option<RawReply> = serde_json::from_slice(&out.stdout).ok();
        match parsed {
            Some(raw) if out.status.success() => Ok(HttpReply {
                status: raw.status,
                headers: raw.headers.into_iter().map(|[k, v]| (k, v)).collect(),
                body: raw.body,
            }),
            _ => Err(NetnsError::Command {
                command,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
        }
    }

    /// `GET url` from inside the namespace; see [`Netns::http_request`].
    pub async fn http_get(&self, url: &str, timeout: Duration) -> Result<HttpReply, NetnsError> {
        self.http_request("GET", url, &[], timeout).await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %err, "deleting network namespace failed");
        }
        remove_etc_files(&self.name);
    }
}

/// Removes the files [`Netns::set_resolv_conf`] wrote for namespace `name`, if any, and
/// `/etc/netns` itself when nothing else is left in it.
fn remove_etc_files(name: &str) {
    let dir = PathBuf::from(NETNS_ETC_DIR).join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            let _ = std::fs::remove_dir(NETNS_ETC_DIR);
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "removing a namespace's /etc files failed");
        }
    }
}

#[derive(serde::Deserialize)]
struct RawReply {
    status: u16,
    headers: Vec<[String; 2]>,
    body: String,
}

/// An HTTP answer obtained from inside a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Response headers in order.
    pub headers: Vec<(String, String)>,
    /// Body, decoded as UTF-8 (lossy).
    pub body: String,
}

impl HttpReply {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A pod: its namespace, its IP on `eth0`, and the node-side veth end's name.
#[derive(Debug)]
pub struct PodNet {
    /// The pod's namespace (deleting it deletes both veth ends).
    pub netns: Netns,
    /// The pod's IPv4 address (`eth0`; not configured for an IPv6-only pod).
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (`fd00:77:K::2/64` on `eth0`), unless IPv4-only.
    pub ip6: Option<Ipv6Addr>,
    /// The node-side interface, inside the node namespace (`podv<k>`).
    pub host_if: String,
    /// The node side's address, the pod's default gateway.
    pub gateway: Ipv4Addr,
}

/// A node: a namespace with a node IP on `lo`, pods attached by veth pairs.
#[derive(Debug)]
pub struct Node {
    // Field order matters: the metadata server stops before the namespace goes.
    fake_metadata: Option<ChildGuard>,
    netns: Netns,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
}

/// Which address families a pod has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    #[default]
    V4,
    V6,
    Dual,
}

impl Node {
    /// Creates a node namespace (`pdm-…-node`) with its node IP on `lo`.
    pub fn create() -> Result<Self, NetnsError> {
        let netns = Netns::create(&unique_name("node"))?;
        let n = NODE_COUNTER.fetch_add(1, Ordering::Relaxed) % 254 + 1;
        let [a, b, c] = NODE_IP_BASE;
        let ip = Ipv4Addr::new(a, b, c, u8::try_from(n).unwrap_or(1));
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        let ip6 = Ipv6Addr::new(
            0xfd00,
            0x77,
            0xffff,
            0,
            0,
            0,
            0,
            u16::try_from(n).unwrap_or(1),
        );
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        // As the install guide recommends for nodes: connections queued on a listener that
        // closes move to another listener of its SO_REUSEPORT group (the agent's rolling
        // update) instead of being reset. Per network namespace; this one is ours.
        netns
            .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?
            .map_err(|source| NetnsError::Sysctl {
                name: "net.ipv4.tcp_migrate_req",
                source,
            })?;
        Ok(Self {
            fake_metadata: None,
            netns,
            ip,
            ip6,
        })
    }

    /// The node namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node namespace's name.
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// The node IP (on the node's `lo`), reachable from every pod of this node.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node's IPv6 address (on its `lo`), reachable from pods with IPv6.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// Creates a pod namespace joined to this node: `podv<k>` here, `eth0` there, a /30
    /// between them, the pod's default route via the node side.
    pub fn add_pod(&self) -> Result<PodNet, NetnsError> {
        self.add_pod_with(Family::V4)
    }

    /// [`Node::add_pod`] with the address families `family`: IPv6 is `fd00:77:K::2/64`,
    /// the node side `fd00:77:K::1`, the pod's default IPv6 route via it; an IPv6-only pod
    /// has no IPv4 address or route at all.
    pub fn add_pod_with(&self, family: Family) -> Result<PodNet, NetnsError> {
        let k = POD_COUNTER.fetch_add(1, Ordering::Relaxed);
        if k >= MAX_PODS {
            return Err(NetnsError::OutOfPodSubnets);
        }
        let base = u32::from(Ipv4Addr::new(10, 77, 0, 0)) + 4 * k;
        let gateway = Ipv4Addr::from(base + 1);
        let pod_ip = Ipv4Addr::from(base + 2);
        let host_if = format!("{POD_INTERFACE_PREFIX}{k}");
        let pod = Netns::create(&unique_name("pod"))?;
        self.netns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        self.netns
            .ip(&["addr", "add", &format!("{gateway}/30"), "dev", &host_if])?;
        let ip6 = (family != Family::V4).then(|| {
            let k = u16::try_from(k).unwrap_or(u16::MAX);
            (
                Ipv6Addr::new(0xfd00, 0x77, k, 0, 0, 0, 0, 1),
                Ipv6Addr::new(0xfd00, 0x77, k, 0, 0, 0, 0, 2),
            )
        });
        if let Some((gateway6, _)) = ip6 {
            let address = format!("{gateway6}/64");
            self.netns
                .ip(&["-6", "addr", "add", &address, "dev", &host_if, "nodad"])?;
        }
        self.netns.ip(&["link", "set", &host_if, "up"])?;
        if family != Family::V6 {
            pod.ip(&["addr", "add", &format!("{pod_ip}/30"), "dev", "eth0"])?;
        }
        if let Some((_, pod_ip6)) = ip6 {
            pod.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{pod_ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        pod.ip(&["link", "set", "eth0", "up"])?;
        if family != Family::V6 {
            pod.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        }
        if let Some((gateway6, _)) = ip6 {
            pod.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ])?;
        }
        Ok(PodNet {
            netns: pod,
            ip: pod_ip,
            ip6: ip6.map(|(_, pod_ip6)| pod_ip6),
            host_if,
            gateway,
        })
    }

    /// Adds 169.254.169.254/32 to the node's `lo` and serves [`NODE_METADATA_BODY`] on
    /// 169.254.169.254:80 inside the node namespace (python's http.server), owned by this
    /// node. Returns once the server accepts connections.
    /// The client addresses of every HTTP request the fake node metadata service answered
    /// (read from its request log); empty when it is not running.
    pub fn fake_node_metadata_clients(&self) -> Vec<String> {
        let Some(server) = &self.fake_metadata else {
            return Vec::new();
        };
        let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
        // http.server logs `ADDRESS - - [date] "METHOD PATH HTTP/1.1" STATUS -` per request.
        log.lines()
            .filter(|line| line.contains(" - - ["))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    pub async fn serve_fake_node_metadata(&mut self) -> Result<(), NetnsError> {
        const SCRIPT: &str = r#"
import http.server, socket, threading
BODY = b"NODE-METADATA-SERVICE"
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(BODY)
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer
class Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
threading.Thread(target=Server6(("fd00:ec2::254", 80), H).serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("169.254.169.254", 80), H).serve_forever()
"#;
        if self.fake_metadata.is_some() {
            return Ok(());
        }
        self.netns
            .ip(&["addr", "add", &format!("{METADATA_IP}/32"), "dev", "lo"])?;
        self.netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{METADATA_IP6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        let mut cmd = self.netns.std_command("python3");
        cmd.args(["-u", "-c", SCRIPT]);
        let mut guard = ChildGuard::spawn("fake-node-metadata", cmd)?;
        let name = self.netns.name().to_owned();
        let ready = wait_until(
            FAKE_METADATA_START_TIMEOUT,
            "the fake node metadata service to accept on 169.254.169.254:80 and [fd00:ec2::254]:80",
            || {
                let name = name.clone();
                let exited = !matches!(guard.try_status(), Ok(None));
                async move {
                    exited
                        || in_netns(&name, || {
                            std::net::TcpStream::connect((METADATA_IP, 80)).is_ok()
                                && std::net::TcpStream::connect((METADATA_IP6, 80)).is_ok()
                        })
                        .unwrap_or(false)
                }
            },
        )
        .await;
        if let Some(status) = guard.try_status()? {
            return Err(NetnsError::Command {
                command: "fake node metadata service".into(),
                stderr: format!("exited with {status}: {}", guard.log_tail(20)),
            });
        }
        ready?;
        self.fake_metadata = Some(guard);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_the_pid() {
        let a = unique_name("node");
        let b = unique_name("node");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id() as i32));
        assert!(a.starts_with(NAME_PREFIX));
        assert_eq!(owner_pid("other-1-2"), None);
        assert_eq!(owner_pid("pdm-x-2"), None);
    }

    #[test]
    fn interface_names_fit_linux_limit() {
        let longest = format!("{POD_INTERFACE_PREFIX}{}", MAX_PODS - 1);
        assert!(longest.len() <= 15, "{longest}");
        assert!(POD_INTERFACE_PATTERN.starts_with(POD_INTERFACE_PREFIX));
        let last = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 0)) + 4 * (MAX_PODS - 1) + 3);
        assert!(last < Ipv4Addr::new(10, 77, 255, 0), "{last}");
    }
}
