//! The server's TLS accept loop: TCP connections in, mutually authenticated TLS streams out,
//! each handshake made with the configuration current at that moment (see
//! [`crate::rotate`]).
//!
//! Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so one slow or
//! silent client never holds up the others. A refused handshake (no client certificate, one
//! from another CA, expired, not yet valid) is logged once with the peer's address and
//! rustls's reason, and the connection is closed.
//!
//! One address holds at most [`MAX_CONNECTIONS_PER_ADDRESS`] connections at once, from its
//! accept to its close ([`Held`]): the ports take connections without a client certificate
//! (operators' calls), so without a cap one pod could open connections until a server ran
//! out of memory. Beyond it a new connection is closed at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::net::Listener;
use crate::rotate::Rotating;

/// Longest a client may take to complete its TLS handshake: a healthy agent needs a few
/// milliseconds; this only bounds stuck or hostile clients.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshaken connections waiting for the gRPC server to pick them up.
const ACCEPTED_BUFFER: usize = 64;
/// Connections one address may hold open at once. An agent holds one or two to each
/// replica (two while its certificate rotates); operators' port-forwards arrive from the
/// node's own address a few at a time; a hostile pod gets no further than this.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

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
) -> ReceiverStream<std::io::Result<TlsStream<Held<L::Io>>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    let open = Arc::new(OpenConnections::default());
    tasks.spawn(async move {
        let handshakes = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let Some(slot) = open.admit(peer.ip().to_canonical()) else {
                tracing::debug!(%peer, "connection limit of this address: closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            let on_refused = on_refused.clone();
            let nodelay = L::set_nodelay(&stream);
            let stream = Held {
                io: stream,
                _slot: slot,
            };
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

/// How many connections each address holds open.
#[derive(Debug, Default)]
struct OpenConnections(Mutex<HashMap<IpAddr, usize>>);

impl OpenConnections {
    /// A slot for one more connection of `address`, if it has fewer than
    /// [`MAX_CONNECTIONS_PER_ADDRESS`] open.
    fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_default();
        if *count >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Slot {
            open: Arc::clone(self),
            address,
        })
    }
}

/// One open connection of an address, given back when dropped.
#[derive(Debug)]
struct Slot {
    open: Arc<OpenConnections>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// An accepted connection, holding its address's slot until it is dropped (closed).
#[derive(Debug)]
pub struct Held<T> {
    io: T,
    _slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Held<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the gRPC server learns of the connection (its peer's address) is the connection's own.
impl<T: Connected> Connected for Held<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn connections_beyond_an_addresss_share_are_closed_until_one_closes() {
        crate::tls::install_crypto_provider();
        let (_dir, files) = crate::tls::test_files::written();
        let server = crate::tls::test_files::server_files(&files);
        let tls = Arc::new(Rotating::load(server, crate::tls::server_config).expect("server TLS"));
        let agent = crate::tls::TlsFiles {
            ca: files.ca_cert.clone(),
            cert: files.agent_cert.clone(),
            key: files.agent_key.clone(),
        };
        let checked = agent
            .load_checked(std::time::SystemTime::now())
            .expect("agent files");
        let client = Arc::new(crate::tls::client_config(&checked).expect("client TLS"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("bound");
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut incoming = accept_tls(listener, tls, stop.clone(), &tasks, Arc::new(|| {}));
        let connect = || {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client));
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                connector.connect(name, tcp).await
            }
        };
        let mut clients = Vec::new();
        let mut served = Vec::new();
        for i in 0..MAX_CONNECTIONS_PER_ADDRESS {
            clients.push(
                connect()
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}")),
            );
            let accepted = incoming.next().await.expect("the loop runs");
            served.push(accepted.expect("handshaken"));
        }
        // One more from the same address: closed before its handshake.
        assert!(
            connect().await.is_err(),
            "a connection beyond the cap was served"
        );
        // One of them closes (the server drops a finished connection): room for one more.
        served.pop();
        clients.push(connect().await.expect("a slot given back"));
        let accepted = incoming.next().await.expect("the loop runs");
        served.push(accepted.expect("handshaken"));
        stop.cancel();
        tasks.close();
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_slots_back_as_connections_close() {
        let open = Arc::new(OpenConnections::default());
        let pod: IpAddr = "10.1.0.7".parse().expect("ip");
        let other: IpAddr = "10.1.0.8".parse().expect("ip");
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_ADDRESS)
            .map(|i| open.admit(pod).unwrap_or_else(|| panic!("slot {i}")))
            .collect();
        assert!(open.admit(pod).is_none(), "one more than the cap");
        // Another address is not held back by it.
        let theirs = open.admit(other).expect("another address");
        // A connection closes: its slot is free again, and one only.
        held.pop();
        let again = open.admit(pod).expect("a slot given back");
        assert!(open.admit(pod).is_none());
        drop((held, again, theirs));
        assert!(
            open.0.lock().expect("not poisoned").is_empty(),
            "closed addresses are forgotten"
        );
    }
}
