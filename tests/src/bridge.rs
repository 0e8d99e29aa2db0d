//! A loopback forwarder from inside a network namespace to the root namespace, in-process.
//!
//! [`Bridge::start`] creates the listening socket inside the named namespace (via
//! [`crate::netns::in_netns`]: a short-lived thread `setns`es and binds; the socket keeps
//! that namespace), then one tokio task accepts there and splices each connection to a
//! target address dialled from the root namespace. Uses: the agent in a node namespace
//! reaching the server on root loopback, a pod reaching moto. Dropping the bridge stops the
//! accept task and every open connection with it.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::netns::{NetnsError, in_netns};

/// Errors of bridge start-up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Binding inside the namespace failed.
    #[error("binding {addr} inside network namespace {netns}")]
    Bind {
        /// The namespace.
        netns: String,
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Handing the listener to tokio failed (no runtime, or a socket error).
    #[error("registering the listener of network namespace {netns} with tokio")]
    Register {
        /// The namespace.
        netns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A running forwarder; stops on drop.
#[derive(Debug)]
pub struct Bridge {
    netns: String,
    listen: SocketAddr,
    target: SocketAddr,
    task: JoinHandle<()>,
}

impl Bridge {
    /// Listens on `127.0.0.1:listen_port` (0 = any free port) inside `netns` and forwards
    /// to `target` in the root namespace. Must be called inside a tokio runtime.
    pub fn start(netns: &str, listen_port: u16, target: SocketAddr) -> Result<Self, BridgeError> {
        Self::start_on(
            netns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port)),
            target,
        )
    }

    /// Like [`Bridge::start`], on any address of the namespace (e.g. its node IP).
    pub fn start_on(
        netns: &str,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<Self, BridgeError> {
        let bind_err = |source| BridgeError::Bind {
            netns: netns.to_owned(),
            addr: listen,
            source,
        };
        let std_listener =
            in_netns(netns, || std::net::TcpListener::bind(listen))?.map_err(bind_err)?;
        let register = |source| BridgeError::Register {
            netns: netns.to_owned(),
            source,
        };
        let listen = std_listener.local_addr().map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(register)?;
        let listener = TcpListener::from_std(std_listener).map_err(register)?;
        let label = netns.to_owned();
        let task = tokio::spawn(accept_loop(listener, target, label));
        Ok(Self {
            netns: netns.to_owned(),
            listen,
            target,
            task,
        })
    }

    /// The port listened on inside the namespace.
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// The address listened on inside the namespace.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The root-namespace address connections go to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The namespace listened in.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, netns: String) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(splice(inbound, target, netns.clone()));
                }
                Err(err) => {
                    tracing::warn!(%netns, error = %err, "bridge accept failed");
                    // Transient (e.g. EMFILE); don't spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn splice(mut inbound: TcpStream, target: SocketAddr, netns: String) {
    let mut outbound = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(%netns, %target, error = %err, "bridge target unreachable");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    if let Err(err) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        tracing::debug!(%netns, %target, error = %err, "bridge connection ended with an error");
    }
}
