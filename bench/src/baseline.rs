//! The baselines the agent is measured against, each returning the agent's exact bytes:
//!
//! - a minimal Rust server (hyper on a multi-threaded tokio runtime, the fixed body for any
//!   GET and a fixed token for the IMDSv2 PUT): what this machine can do at all with the
//!   agent's own stack, without any of the agent's work;
//! - Debian's nginx serving the same bytes as a static file (GET only: a static server has no
//!   token PUT).
//!
//! Both run as child processes, like the agent, so the load generator never shares a process
//! with what it measures.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;

use podiam_tests::netns::Netns;
use podiam_tests::process::{ChildGuard, listen_addresses, wait_until};

/// The token the minimal server hands out when given none.
pub const MINIMAL_TOKEN: &str = "baseline-token";

/// What the minimal server answers: `body` to a GET and `token` to a PUT, each with its
/// headers (besides those hyper writes itself: see [`header_lines`]).
#[derive(Clone, Debug, Default)]
pub struct MinimalAnswers {
    pub body: Bytes,
    pub get_headers: http::HeaderMap,
    pub token: Bytes,
    pub put_headers: http::HeaderMap,
}

/// Headers given as `name: value` on the command line.
pub fn parse_headers(lines: &[String]) -> anyhow::Result<http::HeaderMap> {
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("header {line:?} is not `name: value`"))?;
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes())?,
            http::HeaderValue::from_str(value.trim())?,
        );
    }
    Ok(headers)
}

/// `headers` as `name: value` lines for [`parse_headers`], without those hyper writes itself.
pub fn header_lines(headers: &[(String, String)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| !is_hypers(name))
        .map(|(name, value)| format!("{}: {value}", name.to_ascii_lowercase()))
        .collect()
}

/// Whether hyper writes the header `name` itself (on every answer, or, `connection`, as the
/// connection's state and the request have it: urllib asks to close, wrk to keep alive).
fn is_hypers(name: &str) -> bool {
    ["date", "content-length", "connection", "transfer-encoding"]
        .iter()
        .any(|own| name.eq_ignore_ascii_case(own))
}

/// Serves `answers` on `listen` until killed (the `podiam-bench minimal-server` subcommand),
/// having written the address bound to `address_file` (as the daemons'
/// `--listen-address-file` does).
pub async fn serve_minimal(
    listen: SocketAddr,
    address_file: &Path,
    answers: MinimalAnswers,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    podiam_runtime::net::write_address_file(address_file, &[("listen", listener.local_addr()?)])?;
    let answers = std::sync::Arc::new(answers);
    let handler = move |_, request: http::Request<hyper::body::Incoming>| {
        let (body, headers) = if request.method() == http::Method::PUT {
            (&answers.token, &answers.put_headers)
        } else {
            (&answers.body, &answers.get_headers)
        };
        let mut response = http::Response::new(Full::new(body.clone()));
        *response.headers_mut() = headers.clone();
        std::future::ready(response)
    };
    podiam_runtime::serve::serve_http(
        listener,
        podiam_runtime::serve::Limits::default(),
        handler,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    Ok(())
}

/// Starts the minimal server (this same program, re-executed) on a loopback port of the
/// kernel's choosing, its files in `dir`; the server and its address.
pub async fn start_minimal(
    dir: &Path,
    body_file: &Path,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    start_minimal_at(dir, body_file, None, listen, None, &[]).await
}

/// Starts the minimal server on `listen` (port 0: the kernel's pick), inside network
/// namespace `netns` when one is given, its files in `dir`, handing out the token in
/// `token_file` when one is given, with `headers` (`name: value` lines for a GET's answer
/// and a PUT's: see [`header_lines`]; none, a `text/plain` content type); the server and its
/// address.
pub async fn start_minimal_at(
    dir: &Path,
    body_file: &Path,
    token_file: Option<&Path>,
    listen: SocketAddr,
    netns: Option<&Netns>,
    headers: &[(&str, Vec<String>)],
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let address_file = dir.join(format!("minimal-addresses-{}", listen.ip()));
    let exe = std::env::current_exe()?;
    let mut command = match netns {
        Some(netns) => netns.std_command(exe.to_str().context("the bench's path is not UTF-8")?),
        None => Command::new(exe),
    };
    command
        .arg("minimal-server")
        .args(["--listen", &listen.to_string()])
        .arg("--body-file")
        .arg(body_file)
        .args(token_file.map(|path| {
            let mut arg = std::ffi::OsString::from("--token-file=");
            arg.push(path);
            arg
        }))
        .arg("--listen-address-file")
        .arg(&address_file);
    for (flag, lines) in headers {
        for line in lines {
            command.arg(format!("--{flag}={line}"));
        }
    }
    let mut guard = ChildGuard::spawn("minimal-server", command)?;
    let addresses = listen_addresses(&mut guard, &address_file, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", guard.log_tail(20)))?;
    let addr = *addresses
        .get("listen")
        .context("the minimal server wrote no address")?;
    Ok((guard, addr))
}

/// Where Debian installs nginx, if it is installed.
pub fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Starts nginx serving `body` at `path` on a loopback port, with everything under `dir`:
/// nginx and its address, or `None` when nginx is not installed.
pub async fn start_nginx(
    dir: &Path,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Option<(ChildGuard, SocketAddr)>> {
    if nginx_binary().is_none() {
        return Ok(None);
    }
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}{path}");
    let probe = || {
        let url = url.clone();
        async move { podiam_tests::world::http_get_text(&url).await.is_ok() }
    };
    let guard = start_nginx_on(dir, path, body, listener, probe).await?;
    Ok(Some((guard, addr)))
}

/// Starts nginx serving `body` at `path` on `listener`, with everything under `dir`, and
/// waits until `answers` says it does. nginx cannot be told to pick a port and say which,
/// so it is handed a socket already listening on a port the kernel picked: nginx takes over
/// the listening sockets its `NGINX` variable names (as in its binary upgrade), and no other
/// process can take the port in between. The socket may belong to another network namespace
/// (the real path's node): nginx serves it where it was made.
pub async fn start_nginx_on<F, Fut>(
    dir: &Path,
    path: &str,
    body: &[u8],
    listener: std::net::TcpListener,
    answers: F,
) -> anyhow::Result<ChildGuard>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let nginx = nginx_binary().context("nginx is not installed")?;
    let addr = listener.local_addr()?;
    // nginx takes an inherited socket as it finds it and its workers wait for connections in
    // epoll: a blocking socket would leave a worker asleep in accept() while the other holds
    // a connection with a request unread, and a load run waiting on that request forever.
    listener.set_nonblocking(true)?;
    // Inherited by nginx (std opens sockets close-on-exec); nothing else is started meanwhile.
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    let root = dir.join("root");
    let file = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().context("path has a parent")?)?;
    std::fs::write(&file, body)?;
    std::fs::create_dir_all(dir.join("logs"))?;
    // As many workers as the agent's runtime has threads; no logging per request.
    let user = if nix::unistd::geteuid().is_root() {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        "{user}
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type text/plain;
    keepalive_requests 1000000;
    server {{
        listen {addr} backlog=4096;
        root {root};
    }}
}}
",
        dir = dir.display(),
        root = root.display(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .env("NGINX", format!("{};", listener.as_raw_fd()));
    let guard = ChildGuard::spawn("nginx", command);
    // nginx has its own copy now (or failed to start).
    drop(listener);
    let guard = guard?;
    // The socket listens from the start: nginx is up once it answers.
    wait_until(Duration::from_secs(10), "nginx to answer", answers)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", guard.log_tail(20)))?;
    Ok(guard)
}
