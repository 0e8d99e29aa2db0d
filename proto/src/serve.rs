//! Serving HTTP/1 with the limits every podiam listener needs: the agent's pod-facing and
//! health ports and the server's health port share this accept loop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long in-flight connections get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, how long an open keep-alive connection is still served (each answer then
/// says `Connection: close`) before an idle one is closed. Closing an idle connection at once
/// races a client that is just sending its next request on it; an SDK's token, role and
/// credentials requests follow each other within milliseconds.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pending connections a listener queues (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 1024;

/// Binds `addr` with SO_REUSEPORT, so that a new process can listen beside this one during a
/// handover (the agent's rolling update) and the kernel spreads connections over both until
/// the old one stops accepting.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
/// Largest request head (request line and headers) read; SDKs send well under 1 KiB.
/// hyper's floor for this buffer is 8 KiB.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one request; SDKs send fewer than 10.
const MAX_HEADERS: usize = 32;

/// Limits on the connections one listener serves.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client must send a whole request head within this time (slow clients, idle
    /// keep-alive connections).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(5),
        }
    }
}

/// The next connection on `listener`. A failed accept (out of file descriptors and the like)
/// is logged and retried after a pause instead of spinning.
pub async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/1 on `listener` with `handler(peer, request)` until `shutdown`; then stops
/// accepting (the listener closes), answers what still arrives on open connections for
/// [`CLOSE_GRACE`] with `Connection: close`, and lets requests under way finish (bounded by
/// [`DRAIN_TIMEOUT`]).
pub async fn serve_http<H, F>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let connections = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        // At the limit, stop accepting until a connection ends; the kernel queues the rest.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let closing = shutdown.clone();
            let service = hyper::service::service_fn(move |request| {
                let response = handler(peer, request);
                let closing = closing.clone();
                async move {
                    let mut response = response.await;
                    if closing.is_cancelled() {
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    let ended = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
                    if ended.is_err() {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}
