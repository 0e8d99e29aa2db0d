//! A loopback forwarder from inside a network namespace to the root namespace, in-process.
//!
//! [`Bridge::start`] creates the listening socket inside the named namespace (via
//! [`crate::netns::in_netns`]: a short-lived thread `setns`es and binds; the socket keeps
//! that namespace), then one tokio task accepts there and splices each connection to a
//! target address dialled from the root namespace. Uses: the agent in a node namespace
//! reaching the server on root loopback, a pod reaching moto. Dropping the bridge stops the
//! accept task and every open connection with it.
//!
//! A bridge's target can change ([`Bridge::set_target`]: a server replica restarted on new
//! ports); connections opened from then on go to the new one. It can also play a slow
//! network: [`Bridge::set_latency`] holds every byte coming
//! back from the target for that long before it is passed on (the answers of a replica
//! slowed down, with their order and throughput kept), on open connections too.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

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
    target: Arc<RwLock<SocketAddr>>,
    /// Added latency of the target's answers, in microseconds.
    latency: Arc<AtomicU64>,
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
        let latency = Arc::new(AtomicU64::new(0));
        let target = Arc::new(RwLock::new(target));
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&target),
            label,
            Arc::clone(&latency),
        ));
        Ok(Self {
            netns: netns.to_owned(),
            listen,
            target,
            latency,
            task,
        })
    }

    /// From now on, every byte the target sends back reaches the namespace's side `latency`
    /// later (zero: at once), on connections already open as on new ones.
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.store(micros, Ordering::Release);
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
        *self.target.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends connections opened from now on to `target` (open ones stay where they go).
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = target;
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

async fn accept_loop(
    listener: TcpListener,
    target: Arc<RwLock<SocketAddr>>,
    netns: String,
    latency: Arc<AtomicU64>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    let target = *target.read().unwrap_or_else(|e| e.into_inner());
                    connections.spawn(splice(inbound, target, netns.clone(), Arc::clone(&latency)));
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

async fn splice(inbound: TcpStream, target: SocketAddr, netns: String, latency: Arc<AtomicU64>) {
    let outbound = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(%netns, %target, error = %err, "bridge target unreachable");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    // Requests go straight through; answers pass a delay line: each chunk is stamped when
    // read and written once the latency in force then has passed since its stamp.
    let requests = async {
        let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
        let _ = out_write.shutdown().await;
    };
    let (line, mut delayed) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let read_answers = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match out_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if line
                        .send((Instant::now(), buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let write_answers = async {
        while let Some((read_at, chunk)) = delayed.recv().await {
            let micros = latency.load(Ordering::Acquire);
            if micros > 0 {
                tokio::time::sleep_until(read_at + Duration::from_micros(micros)).await;
            }
            if in_write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = in_write.shutdown().await;
    };
    let answers = async { tokio::join!(read_answers, write_answers) };
    tokio::join!(requests, answers);
    tracing::trace!(%netns, %target, "bridge connection ended");
}
