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

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;

use crate::process::{ChildGuard, wait_until};

/// The token the minimal server hands out.
pub const MINIMAL_TOKEN: &str = "baseline-token";

/// Serves `body` on `listen` until killed (the `podiam-bench minimal-server` subcommand).
pub async fn serve_minimal(listen: SocketAddr, body: Bytes) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let handler = move |_, request: http::Request<hyper::body::Incoming>| {
        let body = if request.method() == http::Method::PUT {
            Bytes::from_static(MINIMAL_TOKEN.as_bytes())
        } else {
            body.clone()
        };
        async move {
            let mut response = http::Response::new(Full::new(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            response
        }
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

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(10), what, || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Starts the minimal server (this same program, re-executed) on `addr`.
pub async fn start_minimal(addr: SocketAddr, body_file: &Path) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("minimal-server")
        .args(["--listen", &addr.to_string()])
        .arg("--body-file")
        .arg(body_file);
    let guard = ChildGuard::spawn("minimal-server", command)?;
    wait_listening(addr, "the minimal server to listen").await?;
    Ok(guard)
}

/// Starts nginx serving `body` at `path` on `addr`, with everything under `dir`; `None` when
/// nginx is not installed.
pub async fn start_nginx(
    dir: &Path,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Option<ChildGuard>> {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return Ok(None);
    };
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
        .args(["-g", "daemon off;"]);
    let guard = ChildGuard::spawn("nginx", command)?;
    wait_listening(addr, "nginx to listen").await?;
    Ok(Some(guard))
}
