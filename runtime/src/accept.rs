//! The server's TLS accept loop: TCP connections in, mutually authenticated TLS streams out,
//! each handshake made with the configuration current at that moment (see
//! [`crate::rotate`]).
//!
//! Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so one slow or
//! silent client never holds up the others. A refused handshake (no client certificate, one
//! from another CA, expired, not yet valid) is logged once with the peer's address and
//! rustls's reason, and the connection is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::Listener;
use crate::rotate::Rotating;

/// Longest a client may take to complete its TLS handshake: a healthy agent needs a few
/// milliseconds; this only bounds stuck or hostile clients.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshaken connections waiting for the gRPC server to pick them up.
const ACCEPTED_BUFFER: usize = 64;

/// Accepts on `listener` until `stop`, handing out TLS streams; the stream of connections
/// ends once `stop` is cancelled and the handshakes under way have finished. The accept loop
/// runs on `tasks`. Each refused handshake calls `on_refused` (a metric) as well as being
/// logged.
pub fn accept_tls<L: Listener>(
    listener: L,
    tls: Arc<Rotating<ServerConfig>>,
    stop: CancellationToken,
    tasks: &TaskTracker,
    on_refused: Arc<dyn Fn() + Send + Sync>,
) -> ReceiverStream<std::io::Result<TlsStream<L::Io>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    tasks.spawn(async move {
        let handshakes = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            let on_refused = on_refused.clone();
            let nodelay = L::set_nodelay(&stream);
            handshakes.spawn(async move {
                let handshaken = match nodelay {
                    Ok(()) => handshake(acceptor, stream, peer).await,
                    Err(error) => Err(error.to_string()),
                };
                match handshaken {
                    Ok(stream) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(why) => {
                        tracing::warn!(%peer, %why, "TLS handshake refused");
                        on_refused();
                    }
                }
            });
        }
        // The listener closes here: no new connections. Handshakes under way may finish.
        drop(listener);
        handshakes.close();
        handshakes.wait().await;
    });
    ReceiverStream::new(rx)
}

async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: T,
    peer: SocketAddr,
) -> Result<TlsStream<T>, String> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        && let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf)
    {
        tracing::debug!(
            %peer,
            subject = %cert.subject(),
            serial = %cert.raw_serial_as_string(),
            "TLS client connected"
        );
    }
    Ok(stream)
}
