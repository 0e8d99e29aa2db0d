//! An in-memory network for in-process tests (feature `test-util`): listeners by address,
//! and connections that are pairs of in-memory pipes. A daemon served on a
//! [`MemoryListener`] and dialled through [`MemoryNetwork::dialer`] runs exactly as on TCP,
//! but every byte moves by waking a task, never by waiting for the kernel. Tests on paused
//! time ([`tokio::time::pause`]) stay deterministic that way: the runtime's clock only jumps
//! when every task waits for a timer, never while a reply is on its way through a socket.
//!
//! Connections carry the addresses they were made from and to, and report them to tonic as
//! TCP connections do ([`tonic::transport::server::TcpConnectInfo`]), so a server sees each
//! caller's address and, over TLS, its certificate.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::net::{Dialer, Dialing, Io, Listener};

/// Bytes a connection buffers each way before a writer waits for the reader.
const PIPE_BYTES: usize = 64 * 1024;
/// The first port handed to a dialling side (the kernel's ephemeral range starts here).
const FIRST_EPHEMERAL_PORT: u16 = 32768;

/// A listener's queue of connections not yet accepted, and which listener it is.
type Backlog = (u64, mpsc::UnboundedSender<(MemoryStream, SocketAddr)>);

/// Listeners by address; cheap to clone (clones share the network).
#[derive(Clone, Debug, Default)]
pub struct MemoryNetwork {
    listeners: Arc<Mutex<HashMap<SocketAddr, Backlog>>>,
    next_port: Arc<AtomicU16>,
    next_listener: Arc<AtomicU64>,
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    /// Listens on `addr` (taking it over from any listener there before).
    pub fn listen(&self, addr: SocketAddr) -> MemoryListener {
        let (backlog, accepted) = mpsc::unbounded_channel();
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        self.listeners().insert(addr, (id, backlog));
        MemoryListener {
            id,
            addr,
            accepted: tokio::sync::Mutex::new(accepted),
            network: self.clone(),
        }
    }

    /// A connection from `from` (a fresh port of it) to the listener at `to`; refused when
    /// nothing listens there.
    pub fn connect(&self, from: IpAddr, to: SocketAddr) -> io::Result<MemoryStream> {
        let port = FIRST_EPHEMERAL_PORT
            .wrapping_add(self.next_port.fetch_add(1, Ordering::Relaxed) % 28000);
        let from = SocketAddr::new(from, port);
        let (near, far) = tokio::io::duplex(PIPE_BYTES);
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, format!("{to}: refused"));
        let (_, backlog) = self.listeners().get(&to).cloned().ok_or_else(refused)?;
        let far = MemoryStream {
            pipe: far,
            local: to,
            peer: from,
        };
        backlog.send((far, from)).map_err(|_| refused())?;
        Ok(MemoryStream {
            pipe: near,
            local: from,
            peer: to,
        })
    }

    /// A [`Dialer`] whose connections come from `from`.
    pub fn dialer(&self, from: IpAddr) -> Arc<dyn Dialer> {
        Arc::new(MemoryDialer {
            network: self.clone(),
            from,
        })
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Backlog>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listener of a [`MemoryNetwork`]; dropping it closes it: connections not yet accepted
/// end, new ones are refused.
#[derive(Debug)]
pub struct MemoryListener {
    id: u64,
    addr: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::UnboundedReceiver<(MemoryStream, SocketAddr)>>,
    network: MemoryNetwork,
}

impl Listener for MemoryListener {
    type Io = MemoryStream;

    async fn accept(&self) -> (MemoryStream, SocketAddr) {
        let mut accepted = self.accepted.lock().await;
        match accepted.recv().await {
            Some(connection) => connection,
            // Taken over by another listener: nothing more comes here.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn set_nodelay(_: &MemoryStream) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for MemoryListener {
    fn drop(&mut self) {
        let mut listeners = self.network.listeners();
        // Only this listener's own entry, not that of one that took the address over.
        if listeners
            .get(&self.addr)
            .is_some_and(|(id, _)| *id == self.id)
        {
            listeners.remove(&self.addr);
        }
    }
}

/// One side of an in-memory connection.
#[derive(Debug)]
pub struct MemoryStream {
    pipe: DuplexStream,
    local: SocketAddr,
    peer: SocketAddr,
}

impl MemoryStream {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for MemoryStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemoryStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

impl Connected for MemoryStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: Some(self.local),
            remote_addr: Some(self.peer),
        }
    }
}

/// Dials a [`MemoryNetwork`] from one address.
#[derive(Debug)]
struct MemoryDialer {
    network: MemoryNetwork,
    from: IpAddr,
}

impl Dialer for MemoryDialer {
    fn dial(&self, addr: SocketAddr) -> Dialing {
        let connected = self.network.connect(self.from, addr);
        Box::pin(async move { connected.map(|stream| Box::new(stream) as Box<dyn Io>) })
    }
}
