//! The load generator: `concurrency` clients, each a loop of HTTP/1.1 requests for a fixed
//! time, every client socket bound to a chosen source address (the agent identifies pods by
//! it; on Linux all of 127.0.0.0/8 is local, so pods can be loopback addresses and the load
//! needs neither root nor namespaces). Latencies are kept whole (microseconds) and sorted
//! for percentiles.
//!
//! New-connection clients close with an immediate reset (linger 0), so a run at thousands of
//! connections per second leaves no TIME_WAIT sockets to exhaust the ephemeral ports.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// How each client talks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One connection per client, reused for every request.
    KeepAlive,
    /// A new connection per request, as SDKs' metadata clients do.
    NewConnection,
    /// IMDSv2: `PUT /latest/api/token`, then the GET with the token, on a new connection per
    /// pair; one latency per pair.
    Token,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::KeepAlive, Mode::NewConnection, Mode::Token];

    pub fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConnection => "new connection",
            Mode::Token => "token PUT + GET",
        }
    }
}

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Client source addresses; client `i` uses `sources[i % len]`.
    pub sources: Vec<IpAddr>,
    pub path: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub mode: Mode,
    /// The body every answer must have (anything else counts as an error).
    pub expect: Bytes,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub p999_us: u32,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

/// The latency at quantile `q` of sorted samples.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs `spec` and returns its figures.
pub async fn run(spec: &LoadSpec) -> LoadResult {
    let started = Instant::now();
    let deadline = started + spec.duration;
    let clients = (0..spec.concurrency).map(|i| {
        let spec = spec.clone();
        let source = spec.sources[i % spec.sources.len().max(1)];
        tokio::spawn(async move { client(&spec, source, deadline).await })
    });
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for joined in futures::future::join_all(clients).await {
        match joined {
            Ok((samples, failed, error)) => {
                latencies.extend(samples);
                errors += failed;
                if first_error.is_none() {
                    first_error = error;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    LoadResult {
        requests: latencies.len() as u64,
        errors,
        seconds,
        per_second: latencies.len() as f64 / seconds,
        p50_us: quantile(&latencies, 0.5),
        p99_us: quantile(&latencies, 0.99),
        p999_us: quantile(&latencies, 0.999),
        first_error,
    }
}

type Sender = SendRequest<Empty<Bytes>>;

/// How long one request may take before it counts as an error (and its connection is
/// dropped): a target that never answers is a figure in the table, not a run that hangs.
const REQUEST_BOUND: Duration = Duration::from_secs(5);

/// One client's loop: its latencies, its error count and its first error.
async fn client(
    spec: &LoadSpec,
    source: IpAddr,
    deadline: Instant,
) -> (Vec<u32>, u64, Option<String>) {
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut kept: Option<Sender> = None;
    while Instant::now() < deadline {
        let began = Instant::now();
        let outcome =
            match tokio::time::timeout(REQUEST_BOUND, attempt(spec, source, &mut kept)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    kept = None;
                    Err(format!("no answer within {REQUEST_BOUND:?}"))
                }
            };
        match outcome {
            Ok(()) => samples.push(began.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
                // Do not spin on a refusing target.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    (samples, errors, first_error)
}

/// One request in the spec's mode; a keep-alive connection is taken from and put back in `kept`.
async fn attempt(spec: &LoadSpec, source: IpAddr, kept: &mut Option<Sender>) -> Result<(), String> {
    match spec.mode {
        Mode::KeepAlive => {
            let mut sender = match kept.take() {
                Some(sender) => sender,
                None => connect(spec.target, source).await?,
            };
            let reuse = get(&mut sender, &spec.path, None, &spec.expect).await?;
            // A server that said `Connection: close` (the agent does after its per-connection
            // request cap) gets a new connection next time, as every HTTP client does.
            if reuse == Reuse::Yes {
                *kept = Some(sender);
            }
            Ok(())
        }
        Mode::NewConnection => {
            let mut sender = connect(spec.target, source).await?;
            get(&mut sender, &spec.path, None, &spec.expect).await?;
            Ok(())
        }
        Mode::Token => {
            let mut sender = connect(spec.target, source).await?;
            let token = token(&mut sender).await?;
            get(&mut sender, &spec.path, Some(&token), &spec.expect).await?;
            Ok(())
        }
    }
}

/// Opens an HTTP/1.1 connection from `source`.
async fn connect(target: SocketAddr, source: IpAddr) -> Result<Sender, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("binding {source}: {e}"))?;
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    // Reset on close: no TIME_WAIT left behind at thousands of connections per second.
    // (Deprecated because a non-zero linger blocks the thread on drop; zero never blocks.)
    #[allow(deprecated)]
    socket
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Whether a connection may carry another request after an answer.
#[derive(Debug, PartialEq, Eq)]
enum Reuse {
    Yes,
    /// The answer said `Connection: close`.
    No,
}

async fn get(
    sender: &mut Sender,
    path: &str,
    token: Option<&str>,
    expect: &Bytes,
) -> Result<Reuse, String> {
    let mut request = http::Request::get(path).header(http::header::HOST, "169.254.169.254");
    if let Some(token) = token {
        request = request.header("X-aws-ec2-metadata-token", token);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let closing = response
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != http::StatusCode::OK || body != *expect {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    Ok(if closing { Reuse::No } else { Reuse::Yes })
}

async fn token(sender: &mut Sender) -> Result<String, String> {
    let request = http::Request::put("/latest/api/token")
        .header(http::header::HOST, "169.254.169.254")
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != http::StatusCode::OK {
        return Err(format!("token PUT answered {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_sorted_samples() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), 501);
        assert_eq!(quantile(&samples, 0.99), 990);
        assert_eq!(quantile(&samples, 0.999), 999);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
