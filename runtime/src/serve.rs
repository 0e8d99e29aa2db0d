//! Serving HTTP/1 with the limits every podiam listener needs: the agent's pod-facing and
//! health ports and the server's health port share this accept loop.
//!
//! One client must not be able to take the connections every other client needs (issue 13:
//! one pod holding 1100 keep-alive connections starved every other pod of its node). So:
//!
//! - **Per peer address** (a pod, on the agent's port) at most
//!   [`Limits::max_connections_per_peer`] connections. A new connection beyond that takes the
//!   place of the same address's longest-idle one, which is closed; if none is idle the new
//!   one is refused (closed at once). A flood only ever competes with itself.
//! - **All addresses together** at most [`Limits::max_connections`]. At that limit a new
//!   connection takes the place of one (idle, else waiting for its head) of the address
//!   holding the most, when that is more than the new one's address holds: many addresses
//!   flooding together (any pod reaches a node's health port) cannot keep a probe or a new pod
//!   waiting in the kernel's queue. One holding as many as any other is refused at once.
//! - **Deadlines a trickle cannot extend.** A request head must arrive whole within
//!   [`Limits::header_read_timeout`], counted from accept for a connection's first request and
//!   from the first byte of each later one; bytes arriving meanwhile do not move it. Between
//!   requests a connection may stay idle for [`Limits::idle_timeout`], deliberately longer
//!   than clients keep pooled connections (see [`IDLE_TIMEOUT`]), so that the client, not the
//!   server, is the one to close an idle connection and never loses a request to the race.
//! - **Requests per connection** at most [`Limits::max_requests_per_connection`]; the last
//!   answer says `Connection: close`.
//!
//! Each connection's phase (waiting for a head, answering, idle) is kept by the connection's
//! own reads ([`Watched`]) and its service; a small watchdog beside the hyper connection
//! closes it when its phase's deadline passes. Both run in the connection's one task, so a
//! phase change needs no wake-up: after each poll of the connection the watchdog looks at the
//! deadline and moves its one timer only when the deadline came earlier than the timer. A
//! busy keep-alive connection's deadline only moves later, so its timer is set about once per
//! header timeout, not twice per request (issue 17: the agent's answers on the real path).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::Listener;

/// How long in-flight connections get to finish at shutdown, and how long a connection being
/// closed (idle, or giving its place to a newer one) may take to finish an answer under way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, how long an open keep-alive connection is still served (each answer then
/// says `Connection: close`) before an idle one is closed. Closing an idle connection at once
/// races a client that is just sending its next request on it; an SDK's token, role and
/// credentials requests follow each other within milliseconds.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pending connections a listener queues (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 1024;

/// Each accepted socket's kernel buffers, each way (the kernel doubles it for its own
/// bookkeeping). A request head is at most [`MAX_HEAD_BYTES`] and an answer a few KiB (the
/// agent's largest, passed on from the node's metadata service, 64 KiB), so this costs
/// nothing in speed; it bounds what a client that sends and never reads can make the
/// kernel hold for it (requests queued unread, answers unsent), charged to this process's
/// memory: the default buffers grow to 128 KiB and more a connection.
const SOCKET_BUFFER_BYTES: usize = 16 * 1024;

/// Binds `addr` with SO_REUSEPORT, so that a new process can listen beside this one during a
/// handover (the agent's rolling update) and the kernel spreads connections over both until
/// the old one stops accepting. Accepted sockets have fixed [`SOCKET_BUFFER_BYTES`] buffers:
/// for listeners of small requests and answers only.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    // Set on the listening socket, before it listens: accepted sockets inherit them.
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES as u32)?;
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES as u32)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
/// Largest request head (request line and headers) read; SDKs send well under 1 KiB.
/// hyper's floor for this buffer is 8 KiB.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one request; SDKs send fewer than 10.
const MAX_HEADERS: usize = 32;

/// Connections served at once by default.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a whole request head may take by default: SDKs send theirs in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a keep-alive connection may stay idle by default: longer than any AWS SDK's HTTP
/// client keeps an idle pooled connection, so that the client always drops it first and never
/// sends a request on a connection the server is closing at that instant. The longest are
/// 90 s: hyper-util's pool (`pool_idle_timeout`, which the Rust SDK's client leaves at its
/// default) and Go's `net/http` `DefaultTransport` (`IdleConnTimeout`, the Go SDK's). Node's
/// global agent drops idle sockets after 5 s, exactly when a 5 s server limit closed them too
/// (the JavaScript SDK's metadata client itself closes its socket after each answer);
/// urllib3 (botocore) has no limit and checks that a pooled connection is still open before
/// reusing it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests one connection may carry by default: nginx's `keepalive_requests` default. Real
/// clients honour the `Connection: close` of the last answer and open a new connection.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 1000;

/// Limits on the connections one listener serves.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once. At the limit a new connection takes the place of an idle
    /// (or head-waiting) one of the address holding the most, if that is more than the new
    /// one's address holds; else it is refused, or, when its address holds none, waits for an
    /// answer under way to end.
    pub max_connections: usize,
    /// Connections served at once from one peer address. At the limit a new connection
    /// replaces the address's longest-idle one, or is refused when none is idle. The default
    /// is `max_connections` (no separate limit): a listener whose clients are pods sets it.
    pub max_connections_per_peer: usize,
    /// A request head must arrive whole within this time: from accept for a connection's
    /// first request, from its first byte for each later one. Trickled bytes do not extend it.
    /// A write blocked for as long (the client takes none of an answer) closes it too.
    pub header_read_timeout: Duration,
    /// A connection with no request under way is closed after this long.
    pub idle_timeout: Duration,
    /// Requests answered on one connection; the last answer says `Connection: close`.
    pub max_requests_per_connection: usize,
    /// At the per-peer limit, a connection still waiting for its request head may give its
    /// place too (the longest-waiting one, when none is idle). For a port whose answers are
    /// instant and whose honest clients send at once (probes): a client that opens
    /// connections and sends nothing then cannot keep them from a probe.
    pub evict_waiting_heads: bool,
    /// All of loopback (127/8 and ::1) as one peer with this many connections. Without it
    /// each loopback address is a peer of its own, and a process of the node, which may
    /// connect from any of 127/8 with no privilege, could hold `max_connections` by itself.
    pub loopback_share: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_peer: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_requests_per_connection: MAX_REQUESTS_PER_CONNECTION,
            evict_waiting_heads: false,
            loopback_share: None,
        }
    }
}

/// Connections one address may hold at a health port. Such a port is on the node's address,
/// where every pod and process of the node reaches it too: with a pod-sized share a handful
/// of them could take the connections the kubelet's probes need, and the kubelet would
/// restart the daemon. The kubelet opens one connection per probe and Prometheus keeps one.
pub const HEALTH_CONNECTIONS_PER_PEER: usize = 4;

impl Limits {
    /// These limits for a health port: [`HEALTH_CONNECTIONS_PER_PEER`] per address and for all
    /// of loopback together, and a connection that has sent no request yet gives its place to
    /// a new one (the kubelet's probes share the node's address with every process of the
    /// node).
    pub fn health(self) -> Limits {
        Limits {
            max_connections_per_peer: HEALTH_CONNECTIONS_PER_PEER
                .min(self.max_connections_per_peer),
            evict_waiting_heads: true,
            loopback_share: Some(HEALTH_CONNECTIONS_PER_PEER),
            ..self
        }
    }
}

/// Why the server closed (or refused) a connection on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Closed {
    /// Its peer address was at its limit with no idle connection to give up.
    PeerLimitRefused,
    /// It was its peer address's longest-idle connection, closed for a new one.
    PeerLimitEvicted,
    /// Its request head did not arrive whole in time.
    HeaderTimeout,
    /// It stayed idle for the idle limit.
    IdleTimeout,
    /// It carried the most requests one connection may.
    RequestLimit,
    /// Every connection of the listener was in use and its address held the most: as its
    /// longest-idle (or longest-waiting) one, it was closed for an address holding fewer.
    PoolEvicted,
    /// Every connection of the listener was in use, and its address held as many as any
    /// other with none to give up: refused (closed at once) rather than queued, so that it
    /// cannot hold up the connections of addresses holding fewer.
    PoolRefused,
    /// It did not come the way the listener's connections must (for the agent's pod ports:
    /// through its DNAT rules): closed as soon as it was accepted.
    NotIntercepted,
    /// Its client took none of an answer for the head deadline: it sends and does not read.
    WriteTimeout,
}

impl Closed {
    pub const ALL: [Closed; 9] = [
        Closed::PeerLimitRefused,
        Closed::PeerLimitEvicted,
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::RequestLimit,
        Closed::PoolEvicted,
        Closed::PoolRefused,
        Closed::NotIntercepted,
        Closed::WriteTimeout,
    ];

    /// A short name for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Closed::PeerLimitRefused => "peer-limit-refused",
            Closed::PeerLimitEvicted => "peer-limit-evicted",
            Closed::HeaderTimeout => "header-timeout",
            Closed::IdleTimeout => "idle-timeout",
            Closed::RequestLimit => "request-limit",
            Closed::PoolEvicted => "pool-evicted",
            Closed::PoolRefused => "pool-refused",
            Closed::NotIntercepted => "not-intercepted",
            Closed::WriteTimeout => "write-timeout",
        }
    }
}

/// Told what a listener's connections do, for metrics. Calls are made on the connections'
/// tasks: keep them cheap.
pub trait ConnectionObserver: Send + Sync {
    /// A connection was admitted; it is open until the matching [`ConnectionObserver::ended`].
    fn opened(&self) {}
    /// An admitted connection ended, for whatever reason.
    fn ended(&self) {}
    /// The server closed or refused a connection on its own, for `why`.
    fn closed(&self, why: Closed) {
        let _ = why;
    }
}

/// The observer of listeners nobody watches.
#[derive(Debug)]
struct Unobserved;

impl ConnectionObserver for Unobserved {}

/// Where a connection is in its life; each phase but answering has a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a whole request head since `since` (accept, or the head's first byte).
    Head { since: Instant },
    /// A request is being answered; `more`: bytes arrived meanwhile (a pipelined request).
    Answering { more: bool },
    /// No request under way since `since`.
    Idle { since: Instant },
}

/// One connection's state, shared by its reads, its writes, its service and its watchdog.
#[derive(Debug)]
struct Conn {
    phase: Mutex<Phase>,
    /// Since when a write has found the socket's buffer full (the client not reading), if
    /// one has: a deadline of its own, whatever the phase.
    blocked: Mutex<Option<Instant>>,
    /// Whether `blocked` is set: what a write that goes through looks at.
    is_blocked: AtomicBool,
    /// Cancelled when a newer connection of the same peer takes this one's place.
    evicted: CancellationToken,
    requests: AtomicUsize,
}

impl Conn {
    fn new(now: Instant) -> Conn {
        Conn {
            phase: Mutex::new(Phase::Head { since: now }),
            blocked: Mutex::new(None),
            is_blocked: AtomicBool::new(false),
            evicted: CancellationToken::new(),
            requests: AtomicUsize::new(0),
        }
    }

    /// A write found the socket's buffer full; the first such since the last that went
    /// through starts the write's deadline.
    fn write_blocked(&self) {
        if !self.is_blocked.load(Ordering::Relaxed) {
            *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.is_blocked.store(true, Ordering::Relaxed);
        }
    }

    /// A write went through (or the socket failed: the connection ends anyway).
    fn write_done(&self) {
        if self.is_blocked.load(Ordering::Relaxed) {
            *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.is_blocked.store(false, Ordering::Relaxed);
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// Bytes were read from the client.
    fn bytes_arrived(&self) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match *phase {
            Phase::Idle { .. } => {
                *phase = Phase::Head {
                    since: Instant::now(),
                };
            }
            Phase::Answering { .. } => *phase = Phase::Answering { more: true },
            Phase::Head { .. } => {}
        }
    }

    /// A request head was read whole; returns how many requests this connection has carried.
    fn request_started(&self) -> usize {
        self.set(Phase::Answering { more: false });
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The answer is ready.
    fn request_done(&self) {
        let now = Instant::now();
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *phase = match *phase {
            Phase::Answering { more: true } => Phase::Head { since: now },
            _ => Phase::Idle { since: now },
        };
    }

    /// When this connection must be closed if nothing happens, and why: a write blocked
    /// for the head deadline (a client that sends and does not read holds the kernel's
    /// buffers and its place until then, not for the idle limit), else its phase's.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Closed)> {
        let blocked = if self.is_blocked.load(Ordering::Relaxed) {
            *self.blocked.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            None
        };
        let phase = match self.phase() {
            Phase::Head { since } => {
                Some((since + limits.header_read_timeout, Closed::HeaderTimeout))
            }
            Phase::Idle { since } => Some((since + limits.idle_timeout, Closed::IdleTimeout)),
            Phase::Answering { .. } => None,
        };
        match (blocked, phase) {
            (Some(since), phase) => {
                let write = (since + limits.header_read_timeout, Closed::WriteTimeout);
                Some(phase.filter(|(at, _)| *at < write.0).unwrap_or(write))
            }
            (None, phase) => phase,
        }
    }
}

/// The connections open per peer address.
#[derive(Debug)]
struct Peers {
    limit: usize,
    evict_waiting_heads: bool,
    loopback_share: Option<usize>,
    open: Mutex<HashMap<IpAddr, Vec<Arc<Conn>>>>,
}

/// Which of `conns` gives its place to a new connection: the longest-idle, else (with
/// `waiting_heads`) the one waiting longest for its request head; none while all answer.
fn give_way(conns: &[Arc<Conn>], waiting_heads: bool) -> Option<usize> {
    conns
        .iter()
        .enumerate()
        .filter_map(|(i, conn)| match conn.phase() {
            Phase::Idle { since } => Some(((0, since), i)),
            Phase::Head { since } if waiting_heads => Some(((1, since), i)),
            _ => None,
        })
        .min_by_key(|(order, _)| *order)
        .map(|(_, i)| i)
}

/// What [`Peers::make_room`] did.
#[derive(Debug, PartialEq, Eq)]
enum Crowd {
    /// A connection of an address holding more was told to close; its place comes free.
    Evicted,
    /// Nobody holds more than the newcomer, which holds some, none able to give way:
    /// refuse it.
    Full,
    /// The newcomer holds none, and no connection could give way now: wait for one to end.
    Wait,
}

/// Whether a new connection may be served.
enum Admission {
    /// Yes; `evicted`: the peer's longest-idle connection was told to close for it.
    Admitted { conn: Arc<Conn>, evicted: bool },
    /// No: the peer is at its limit and every one of its connections is busy.
    Refused,
}

impl Peers {
    fn new(limits: &Limits) -> Peers {
        Peers {
            limit: limits.max_connections_per_peer.max(1),
            evict_waiting_heads: limits.evict_waiting_heads,
            loopback_share: limits.loopback_share.map(|share| share.max(1)),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The peer `address` counts as: itself, or all of loopback as one when loopback has a
    /// share of its own.
    fn key(&self, address: IpAddr) -> IpAddr {
        match self.loopback_share {
            Some(_) if address.is_loopback() => IpAddr::from([127, 0, 0, 1]),
            _ => address,
        }
    }

    /// The connections `peer` (a [`Peers::key`]) may hold.
    fn limit_of(&self, peer: IpAddr) -> usize {
        match self.loopback_share {
            Some(share) if peer.is_loopback() => share,
            _ => self.limit,
        }
    }

    /// `peer` is a [`Peers::key`].
    fn admit(&self, peer: IpAddr) -> Admission {
        let limit = self.limit_of(peer);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let conns = open.entry(peer).or_default();
        let mut evicted = false;
        if conns.len() >= limit {
            let Some(i) = give_way(conns, self.evict_waiting_heads) else {
                return Admission::Refused;
            };
            conns.swap_remove(i).evicted.cancel();
            evicted = true;
        }
        let conn = Arc::new(Conn::new(Instant::now()));
        conns.push(Arc::clone(&conn));
        Admission::Admitted { conn, evicted }
    }

    /// Every connection is in use and `newcomer` (a [`Peers::key`]) wants one. Below its own
    /// limit, it takes the place of a connection of an address holding more than it does:
    /// of those holding the most, the longest-idle, else the longest-waiting for its head.
    /// Otherwise, as at its own limit, one of its own gives way (the longest-idle; the
    /// longest-waiting too where heads give way). [`Crowd::Full`]: none can; [`Crowd::Wait`]:
    /// it holds none, and every connection of those holding more is answering.
    fn make_room(&self, newcomer: IpAddr) -> Crowd {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let holding = open.get(&newcomer).map_or(0, Vec::len);
        if holding < self.limit_of(newcomer) {
            let victim = (open.iter())
                .filter(|(_, conns)| conns.len() > holding)
                .flat_map(|(address, conns)| {
                    (conns.iter().enumerate()).filter_map(move |(i, conn)| {
                        let order = match conn.phase() {
                            Phase::Idle { since } => (0, since),
                            Phase::Head { since } => (1, since),
                            Phase::Answering { .. } => return None,
                        };
                        Some(((std::cmp::Reverse(conns.len()), order), (*address, i)))
                    })
                })
                .min_by_key(|(order, _)| *order)
                .map(|(_, at)| at);
            if let Some((address, i)) = victim
                && let Some(conns) = open.get_mut(&address)
            {
                conns.swap_remove(i).evicted.cancel();
                return Crowd::Evicted;
            }
        }
        let Some(own) = open.get_mut(&newcomer).filter(|own| !own.is_empty()) else {
            return Crowd::Wait;
        };
        match give_way(own, self.evict_waiting_heads) {
            Some(i) => {
                own.swap_remove(i).evicted.cancel();
                Crowd::Evicted
            }
            None => Crowd::Full,
        }
    }

    /// `conn` of `peer` ended (nothing happens if it was evicted: it is gone already).
    fn leave(&self, peer: IpAddr, conn: &Arc<Conn>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = open.get_mut(&peer) {
            conns.retain(|c| !Arc::ptr_eq(c, conn));
            if conns.is_empty() {
                open.remove(&peer);
            }
        }
    }
}

/// A client stream whose reads move its connection's phase: the first byte after an answer
/// starts the next head's deadline.
#[derive(Debug)]
struct Watched<T> {
    io: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_arrived();
        }
        polled
    }
}

impl<T> Watched<T> {
    /// `polled`, a write's outcome, noted on the connection: blocked, or through.
    fn noted<R>(&self, polled: Poll<R>) -> Poll<R> {
        match polled {
            Poll::Pending => self.conn.write_blocked(),
            Poll::Ready(_) => self.conn.write_done(),
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.noted(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// One of `slots` for a new connection of `address` (a [`Peers::key`]): at the limit, an
/// address holding more than this one gives up a connection ([`Peers::make_room`]); one
/// holding no more than anyone else, none of its own able to give way, is refused
/// (`Continue(None)`), so that no set of addresses can keep the others' connections waiting
/// in the kernel's queue. While `address` holds none and every other connection is
/// answering, it looks again every [`LOOK_AGAIN`], for `patience` at most. `Break`:
/// `shutdown`.
async fn place_for(
    address: IpAddr,
    patience: Duration,
    slots: &Arc<tokio::sync::Semaphore>,
    peers: &Peers,
    observer: &dyn ConnectionObserver,
    shutdown: &CancellationToken,
) -> ControlFlow<(), Option<tokio::sync::OwnedSemaphorePermit>> {
    if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
        return ControlFlow::Continue(Some(slot));
    }
    // While this address holds none and every other connection is answering, look again
    // every few milliseconds (an answer ending leaves its connection idle, not closed), for
    // at most `patience`; then refuse, so that no set of connections kept answering can hold
    // the accept loop.
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        match peers.make_room(address) {
            Crowd::Evicted => {
                tracing::debug!(%address, "every connection in use: a connection of an address holding more closes");
                observer.closed(Closed::PoolEvicted);
            }
            Crowd::Full => {
                observer.closed(Closed::PoolRefused);
                return ControlFlow::Continue(None);
            }
            Crowd::Wait if tokio::time::Instant::now() >= give_up => {
                observer.closed(Closed::PoolRefused);
                return ControlFlow::Continue(None);
            }
            Crowd::Wait => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return ControlFlow::Break(()),
            slot = Arc::clone(slots).acquire_owned() => return match slot {
                Ok(slot) => ControlFlow::Continue(Some(slot)),
                Err(_) => ControlFlow::Break(()),
            },
            () = tokio::time::sleep(LOOK_AGAIN) => {}
        }
    }
}

/// How often [`place_for`] looks again for a connection to give way while every one is
/// answering.
const LOOK_AGAIN: Duration = Duration::from_millis(10);

/// Serves HTTP/1 on `listener` (TCP, or in tests an in-memory one: see
/// [`crate::net::Listener`]) with `handler(peer, request)` until `shutdown`; then stops
/// accepting (the listener closes), answers what still arrives on open connections for
/// [`CLOSE_GRACE`] with `Connection: close`, and lets requests under way finish (bounded by
/// [`DRAIN_TIMEOUT`]).
pub async fn serve_http<L, H, F>(
    listener: L,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
) where
    L: Listener,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_http_observed(listener, limits, Arc::new(Unobserved), handler, shutdown).await;
}

/// [`serve_http`], telling `observer` what the connections do.
pub async fn serve_http_observed<L, H, F>(
    listener: L,
    limits: Limits,
    observer: Arc<dyn ConnectionObserver>,
    handler: H,
    shutdown: CancellationToken,
) where
    L: Listener,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let connections = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let peers = Arc::new(Peers::new(&limits));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let address = peers.key(peer.ip().to_canonical());
        let patience = limits.header_read_timeout;
        let slot = match place_for(address, patience, &slots, &peers, &*observer, &shutdown).await {
            ControlFlow::Continue(Some(slot)) => slot,
            ControlFlow::Continue(None) => {
                tracing::debug!(%peer, "every connection in use, none held by an address holding more: refused");
                continue;
            }
            ControlFlow::Break(()) => break,
        };
        let conn = match peers.admit(address) {
            Admission::Admitted { conn, evicted } => {
                if evicted {
                    tracing::debug!(%peer, "connection limit of this address: its longest-idle connection closes");
                    observer.closed(Closed::PeerLimitEvicted);
                }
                conn
            }
            Admission::Refused => {
                tracing::debug!(%peer, "connection limit of this address, none idle: refused");
                observer.closed(Closed::PeerLimitRefused);
                continue;
            }
        };
        observer.opened();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let observer = Arc::clone(&observer);
        let peers = Arc::clone(&peers);
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(stream, peer, &conn, limits, &*observer, handler, shutdown).await;
            peers.leave(address, &conn);
            observer.ended();
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

/// Serves one connection until it ends, the watchdog closes it, or shutdown has drained it.
async fn serve_connection<S, H, F>(
    stream: S,
    peer: SocketAddr,
    conn: &Arc<Conn>,
    limits: Limits,
    observer: &dyn ConnectionObserver,
    handler: H,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // Its own token, cancelled with the listener's: each look at it (every answer, every
    // poll) takes its own lock, not the one every connection of the listener would share.
    let shutdown = shutdown.child_token();
    let service = counted_service(peer, conn, limits, handler, shutdown.clone());
    let io = Watched {
        io: stream,
        conn: Arc::clone(conn),
    };
    let builder = http1_builder();
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut shutdown_wait = std::pin::pin!(shutdown.cancelled());
    let mut evicted_wait = std::pin::pin!(conn.evicted.cancelled());
    let mut watchdog = Watchdog::new();
    // Set once the connection has been told to finish (graceful shutdown): it may then take
    // until this instant to do so.
    let mut finishing: Option<Instant> = None;
    let mut drained = false;
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            if !drained && shutdown_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            if evicted_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Evicted);
            }
            // The connection's poll above is where its phase changes: look at the deadline
            // now, every time.
            let deadline = finishing.or_else(|| conn.deadline(&limits).map(|(at, _)| at));
            watchdog.poll_deadline(cx, deadline)
        })
        .await;
        match event {
            Event::Ended(result) => return ended(result, conn, &limits, peer, observer),
            Event::Shutdown => {
                drained = true;
                // Answers say `Connection: close` now; a client gets CLOSE_GRACE to send what
                // it was about to, then the connection is told to finish.
                let ended = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
                if ended.is_ok() {
                    return;
                }
                connection.as_mut().graceful_shutdown();
                finishing = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            // Idle (or waiting for a head) when it was chosen, it has nothing under way to
            // finish; and it no longer counts against its address, so it must not keep a slot
            // of the listener while a client that stopped reading leaves its last answer
            // unflushed (also when it was already finishing): a flood of such connections
            // would fill every slot, and a new connection waiting for its slot would hold the
            // accept loop. Dropped at once.
            Event::Evicted => return,
            Event::Deadline => match due(conn, &limits, finishing, peer, observer) {
                Due::Drop => return,
                Due::Finish => {
                    connection.as_mut().graceful_shutdown();
                    finishing = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                // The deadline moved on since the timer was set: it is set again.
                Due::NotYet => {}
            },
        }
    }
}

/// The hyper connection finished with `result`: an error logged, the request limit counted.
fn ended(
    result: Result<(), hyper::Error>,
    conn: &Conn,
    limits: &Limits,
    peer: SocketAddr,
    observer: &dyn ConnectionObserver,
) {
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
    if conn.requests.load(Ordering::Relaxed) >= limits.max_requests_per_connection {
        observer.closed(Closed::RequestLimit);
    }
}

/// What the watchdog's timer firing means for a connection.
enum Due {
    /// Drop it now.
    Drop,
    /// Tell it to finish (answer what is under way, then close).
    Finish,
    /// Nothing is due yet.
    NotYet,
}

/// What is due for `conn` now that the timer fired; `finishing`: when it was told to finish
/// by, if it was. A deadline passed is counted on `observer`.
fn due(
    conn: &Conn,
    limits: &Limits,
    finishing: Option<Instant>,
    peer: SocketAddr,
    observer: &dyn ConnectionObserver,
) -> Due {
    let now = Instant::now();
    if let Some(until) = finishing {
        // Told to finish and did not in time: dropped.
        return if until <= now { Due::Drop } else { Due::NotYet };
    }
    match conn.deadline(limits) {
        Some((at, Closed::HeaderTimeout)) if at <= now => {
            // Half a head is not worth an answer: dropped.
            tracing::debug!(%peer, "request head not received in time; closing");
            observer.closed(Closed::HeaderTimeout);
            Due::Drop
        }
        Some((at, Closed::WriteTimeout)) if at <= now => {
            // A client that does not read would not read the rest either: dropped.
            tracing::debug!(%peer, "the client took no answer in time; closing");
            observer.closed(Closed::WriteTimeout);
            Due::Drop
        }
        Some((at, why)) if at <= now => {
            observer.closed(why);
            Due::Finish
        }
        _ => Due::NotYet,
    }
}

/// What ended a wait of [`serve_connection`]'s loop.
enum Event {
    /// The hyper connection finished.
    Ended(Result<(), hyper::Error>),
    /// The listener is shutting down.
    Shutdown,
    /// A newer connection of the same peer takes this one's place.
    Evicted,
    /// The timer passed the deadline it was set to (which may have moved later since).
    Deadline,
}

/// One connection's timer: set to a deadline, and moved only when a deadline comes earlier
/// than it. A deadline that moved later is found when the timer fires early; the loop then
/// sets it again. So a connection answering request after request sets it about once per
/// head timeout, with no timer work per request.
struct Watchdog {
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Where the timer is set, if it is.
    armed: Option<Instant>,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog {
            // Boxed once per connection; set before its first use.
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        }
    }

    /// Polls the timer for `deadline` (none: nothing to wait for): ready once it passes the
    /// instant it is set to, which is never later than `deadline`.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Option<Instant>) -> Poll<Event> {
        match (deadline, self.armed) {
            (Some(at), Some(armed)) if at < armed => {
                self.timer.as_mut().reset(at);
                self.armed = Some(at);
            }
            (Some(at), None) => {
                self.timer.as_mut().reset(at);
                self.armed = Some(at);
            }
            // Later (or the same): the timer fires first and the loop looks again.
            (Some(_), Some(_)) => {}
            // No deadline (an answer under way): an armed timer may fire; the loop finds
            // nothing due and it is not set again until there is a deadline.
            (None, _) => {}
        }
        if self.armed.is_none() {
            return Poll::Pending;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.armed = None;
                Poll::Ready(Event::Deadline)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// HTTP/1 with bounded heads. hyper's own header timer is off: the connection's watchdog
/// replaces it, since hyper's starts when it begins to read a head, which is right after an
/// answer, so it would close idle connections too.
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder
}

/// `handler` as the connection's service: each request counted on `conn`, and its answer
/// saying `Connection: close` once the agent is shutting down (`closing`) or the connection
/// has carried its last request.
fn counted_service<H, F>(
    peer: SocketAddr,
    conn: &Arc<Conn>,
    limits: Limits,
    handler: H,
    closing: CancellationToken,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + use<H, F>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let conn = Arc::clone(conn);
    hyper::service::service_fn(move |request| {
        let served = conn.request_started();
        let response = handler(peer, request);
        let closing = closing.clone();
        let conn = Arc::clone(&conn);
        async move {
            let mut response = response.await;
            let last = served >= limits.max_requests_per_connection;
            if closing.is_cancelled() || last {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            conn.request_done();
            Ok::<_, Infallible>(response)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";

    /// A listener on 127.0.0.1 serving `limits` with a handler that answers "ok"; stops when
    /// the token is cancelled.
    async fn serving(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let handler = |_, _| async { Response::new(Full::new(Bytes::from_static(b"ok"))) };
        tokio::spawn(serve_http(listener, limits, handler, stop.clone()));
        (addr, stop)
    }

    /// Reads one whole response (bodies here are "ok", two bytes); `None` if the connection
    /// ended first.
    async fn response(stream: &mut TcpStream) -> Option<String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && body.len() >= 2
            {
                return Some(format!("{head}\r\n\r\n{body}"));
            }
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Waits for the server to close `stream`; how long that took from `since`.
    /// Waits (5 s at most) for `condition`, which the server's tasks make true a moment
    /// after the client has seen its connection close (a connection is counted as ended
    /// once its task has finished, after its socket is closed).
    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn closed(stream: &mut TcpStream, since: Instant) -> Duration {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("still open after {:?}", since.elapsed()),
            }
        }
    }

    #[tokio::test]
    async fn all_of_loopback_is_one_peer_at_a_health_port() {
        // A process of the node may connect from any address of 127/8 without privilege.
        // Counted one address at a time, 8 of them would hold every connection of a pool of
        // 8, and a probe would wait in the accept queue; counted as one peer, they hold its
        // share (4), and a probe's connection takes the place of their longest-waiting one.
        let limits = Limits {
            max_connections: 8,
            // Far beyond the answer's wait: the held heads are not cut meanwhile.
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        }
        .health();
        let (addr, _stop) = serving(limits).await;
        let from = |last: u8| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
            socket
                .bind(SocketAddr::from(([127, 0, 0, last], 0)))
                .expect("binds in 127/8");
            socket.connect(addr).await.expect("connects")
        };
        let mut held = Vec::new();
        for last in 2..10 {
            let mut stream = from(last).await;
            stream
                .write_all(b"GET / HTTP/1.1\r\n")
                .await
                .expect("sends");
            held.push(stream);
        }
        let mut probe = from(10).await;
        probe.write_all(GET).await.expect("sends");
        let answer = response(&mut probe).await;
        assert!(
            answer
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "the probe was not answered: {answer:?}"
        );
        drop(held);
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_outlives_the_header_deadline() {
        // SDKs' pools keep a connection and reuse it seconds later: the header deadline
        // must not close a connection between requests (that is the idle limit's job).
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _stop) = serving(limits).await;
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        stream.write_all(GET).await.expect("sends");
        assert!(response(&mut stream).await.is_some(), "first answer");
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(GET).await.expect("sends");
        let second = response(&mut stream).await;
        assert!(
            second
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "the idle connection was closed: {second:?}"
        );
    }

    #[tokio::test]
    async fn a_trickled_head_is_cut_at_its_deadline_from_accept() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(400),
            ..Limits::default()
        };
        let (addr, _stop) = serving(limits).await;
        // Taken before the connection is: its deadline runs from its accept, which comes after.
        let since = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        // One byte every 50 ms for 4 s: each would restart a per-read timer.
        let (mut reader, mut writer) = stream.split();
        let trickle = async {
            for byte in GET.iter().take(GET.len() - 1).cycle().take(80) {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let mut buf = [0u8; 64];
        let read = async {
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return since.elapsed(),
                    Ok(_) => {}
                }
            }
        };
        let took = tokio::select! {
            took = read => took,
            () = trickle => panic!("still open after the whole trickle: {:?}", since.elapsed()),
        };
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );
    }

    /// Counts what [`serve_http_observed`] reports.
    #[derive(Debug, Default)]
    struct Counts {
        open: std::sync::atomic::AtomicI64,
        closed: Mutex<HashMap<Closed, u32>>,
    }

    impl ConnectionObserver for Counts {
        fn opened(&self) {
            self.open.fetch_add(1, Ordering::SeqCst);
        }
        fn ended(&self) {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
        fn closed(&self, why: Closed) {
            *self.closed.lock().expect("lock").entry(why).or_default() += 1;
        }
    }

    impl Counts {
        fn closed(&self, why: Closed) -> u32 {
            self.closed
                .lock()
                .expect("lock")
                .get(&why)
                .copied()
                .unwrap_or_default()
        }
    }

    async fn observed(limits: Limits) -> (SocketAddr, Arc<Counts>, CancellationToken) {
        observed_gated(limits, tokio::sync::watch::Sender::new(true)).await
    }

    /// A connection from a client whose receive buffer is small (4 KiB), and its two halves.
    async fn small_reader(
        addr: SocketAddr,
    ) -> (
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("buffer");
        socket.connect(addr).await.expect("connects").into_split()
    }

    #[tokio::test]
    async fn a_client_that_sends_and_does_not_read_is_closed_at_the_head_deadline() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        // Pipelined requests, never an answer read: the server's answers fill its send
        // buffer and the client's receive buffer (both small), and its writes block.
        let (_reader, mut writer) = small_reader(addr).await;
        let sending = tokio::spawn(async move {
            for _ in 0..20_000 {
                if writer.write_all(GET).await.is_err() {
                    return;
                }
            }
        });
        // Closed for that, not left until the idle limit (120 s) with its buffers full.
        eventually("closed as not reading", || {
            counts.closed(Closed::WriteTimeout) == 1
        })
        .await;
        eventually("gone", || counts.open.load(Ordering::SeqCst) == 0).await;
        sending.abort();
        // A client that reads its answers late, but reads them, is not: its writes blocked a
        // moment, then went through. Idle past the head deadline, it is still served.
        let (mut reader, mut writer) = small_reader(addr).await;
        let requests = 500; // under the 1000 a connection may carry
        let sending = tokio::spawn(async move {
            for _ in 0..requests {
                writer.write_all(GET).await.expect("sends");
            }
            writer
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut answers = 0;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while answers < requests {
            let n = reader.read(&mut buf).await.expect("reads");
            assert!(n > 0, "closed after {answers} answers");
            seen.extend_from_slice(&buf[..n]);
            answers = String::from_utf8_lossy(&seen)
                .matches("HTTP/1.1 200")
                .count();
        }
        let mut writer = sending.await.expect("joins");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        writer.write_all(GET).await.expect("sends");
        let n = reader.read(&mut buf).await.expect("reads");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "not served after its writes went through"
        );
        assert_eq!(counts.closed(Closed::WriteTimeout), 1);
    }

    #[tokio::test]
    async fn accepted_sockets_have_the_listeners_small_buffers() {
        let listener = bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connects");
        let (accepted, _) = listener.accept().await.expect("accepts");
        let socket = tokio::net::TcpSocket::from_std_stream(accepted.into_std().expect("std"));
        // The kernel doubles what is set, for its own bookkeeping.
        let doubled = 2 * SOCKET_BUFFER_BYTES as u32;
        assert_eq!(socket.recv_buffer_size().expect("size"), doubled);
        assert_eq!(socket.send_buffer_size().expect("size"), doubled);
    }

    /// [`observed`], whose answers are held while `open` says false.
    async fn observed_gated(
        limits: Limits,
        open: tokio::sync::watch::Sender<bool>,
    ) -> (SocketAddr, Arc<Counts>, CancellationToken) {
        let listener = bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let counts = Arc::new(Counts::default());
        let handler = move |_, _| {
            let mut open = open.subscribe();
            async move {
                let _ = open.wait_for(|open| *open).await;
                Response::new(Full::new(Bytes::from_static(b"ok")))
            }
        };
        tokio::spawn(serve_http_observed(
            listener,
            limits,
            Arc::clone(&counts) as Arc<dyn ConnectionObserver>,
            handler,
            stop.clone(),
        ));
        (addr, counts, stop)
    }

    /// A connection from `source` (any 127/8 address is local on Linux).
    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .expect("binds the source");
        socket.connect(addr).await.expect("connects")
    }

    /// Sends one request on `stream` and checks it is answered.
    async fn answered(stream: &mut TcpStream) {
        stream.write_all(GET).await.expect("sends");
        let answer = response(stream).await;
        assert!(
            answer
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_at_its_limit_gives_up_its_longest_idle_connection() {
        let limits = Limits {
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let mut oldest = connect_from([127, 0, 0, 1], addr).await;
        answered(&mut oldest).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut newer = connect_from([127, 0, 0, 1], addr).await;
        answered(&mut newer).await;
        // A third connection of the address: the oldest idle one makes room for it.
        let mut third = connect_from([127, 0, 0, 1], addr).await;
        answered(&mut third).await;
        let took = closed(&mut oldest, Instant::now()).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        answered(&mut newer).await;
        assert_eq!(counts.closed(Closed::PeerLimitEvicted), 1);
        assert_eq!(counts.closed(Closed::PeerLimitRefused), 0);
    }

    /// Opens `n` connections from each of `sources` that send half a request head and stay
    /// waiting; returns once the server counts them all open.
    async fn waiting_heads(
        sources: &[[u8; 4]],
        n: usize,
        addr: SocketAddr,
        counts: &Counts,
    ) -> Vec<TcpStream> {
        let mut held = Vec::new();
        for source in sources {
            for _ in 0..n {
                let mut stream = connect_from(*source, addr).await;
                stream.write_all(b"GET /").await.expect("sends");
                held.push(stream);
                let opened = held.len() as i64;
                while counts.open.load(Ordering::SeqCst) != opened {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        held
    }

    #[tokio::test]
    async fn when_every_connection_is_in_use_an_address_holding_fewer_is_served_at_once() {
        // Two addresses hold every connection of the pool at their own limit, as many
        // addresses together could at a real port's. A third address's connection (a probe,
        // a new pod) takes the place of one of theirs rather than waiting in the kernel's
        // queue until one of theirs ends.
        let limits = Limits {
            max_connections: 4,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let _held = waiting_heads(&[[127, 0, 0, 2], [127, 0, 0, 3]], 2, addr, &counts).await;
        // One of them, holding as many as the other and none idle (heads give way here
        // only to addresses holding fewer), is refused at once, not queued.
        let mut again = connect_from([127, 0, 0, 2], addr).await;
        let took = closed(&mut again, Instant::now()).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(counts.closed(Closed::PoolRefused), 1);
        let mut probe = connect_from([127, 0, 0, 4], addr).await;
        tokio::time::timeout(Duration::from_secs(3), answered(&mut probe))
            .await
            .expect("served at once, not after the others' header deadline");
        assert_eq!(counts.closed(Closed::PoolEvicted), 1);
        assert_eq!(counts.closed(Closed::PeerLimitRefused), 0);
        // Its second takes the place of the address still holding two…
        let mut second = connect_from([127, 0, 0, 4], addr).await;
        answered(&mut second).await;
        assert_eq!(counts.closed(Closed::PoolEvicted), 2);
        // …and its third, now that it holds the most, that of its own longest-idle one.
        let mut third = connect_from([127, 0, 0, 4], addr).await;
        answered(&mut third).await;
        let took = closed(&mut probe, Instant::now()).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(counts.closed(Closed::PoolEvicted), 3);
        assert_eq!(counts.closed(Closed::PoolRefused), 1);
    }

    #[tokio::test]
    async fn while_every_connection_answers_a_newcomer_waits_for_one_to_be_idle_not_closed() {
        let limits = Limits {
            max_connections: 2,
            max_connections_per_peer: 1,
            header_read_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let gate = tokio::sync::watch::Sender::new(false);
        let (addr, counts, _stop) = observed_gated(limits, gate.clone()).await;
        // Two addresses' connections, each answering (held), fill the pool.
        let mut busy = Vec::new();
        for source in [[127, 0, 0, 2], [127, 0, 0, 3]] {
            let mut stream = connect_from(source, addr).await;
            stream.write_all(GET).await.expect("sends");
            busy.push(stream);
        }
        // Each held answer holds a receiver of the gate.
        eventually("both answering", || gate.receiver_count() == 2).await;
        // A newcomer finds none to take the place of: none is closed for it, its request
        // is not read, for as long as the answers are held…
        let mut newcomer = connect_from([127, 0, 0, 4], addr).await;
        newcomer.write_all(GET).await.expect("sends");
        let watched = Instant::now();
        while watched.elapsed() < Duration::from_millis(200) {
            assert_eq!(counts.closed(Closed::PoolEvicted), 0);
            assert_eq!(gate.receiver_count(), 2);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // …and once the answers are out, the connections stay open, idle, and one gives way
        // to it at once.
        gate.send_replace(true);
        let took = Instant::now();
        assert!(response(&mut newcomer).await.is_some(), "answered");
        // At once: well before the newcomer's head deadline (2 s), when it would be refused.
        assert!(
            took.elapsed() < Duration::from_millis(1500),
            "{:?}",
            took.elapsed()
        );
        assert_eq!(counts.closed(Closed::PoolEvicted), 1);
        // Held answering for longer than the header deadline, the pool refuses a newcomer
        // rather than hold the accept loop.
        gate.send_replace(false);
        for stream in &mut busy {
            let _ = stream.write_all(GET).await;
        }
        newcomer.write_all(GET).await.expect("sends");
        eventually("both answering again", || gate.receiver_count() == 2).await;
        let mut refused = connect_from([127, 0, 0, 5], addr).await;
        let took = closed(&mut refused, Instant::now()).await;
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert_eq!(counts.closed(Closed::PoolRefused), 1);
        gate.send_replace(true);
    }

    #[tokio::test]
    async fn a_peer_with_no_idle_connection_is_refused_and_others_are_served() {
        let limits = Limits {
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        // Two connections that never finish a head: not idle, so not given up.
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut stream = connect_from([127, 0, 0, 1], addr).await;
            stream.write_all(b"GET /").await.expect("sends");
            busy.push(stream);
        }
        while counts.open.load(Ordering::SeqCst) != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut refused = connect_from([127, 0, 0, 1], addr).await;
        let took = closed(&mut refused, Instant::now()).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(counts.closed(Closed::PeerLimitRefused), 1);
        // Another address is served all along.
        let mut other = connect_from([127, 0, 0, 2], addr).await;
        answered(&mut other).await;
        assert_eq!(counts.open.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn where_waiting_heads_give_way_a_probe_gets_through_silent_connections() {
        let limits = Limits {
            max_connections_per_peer: 2,
            evict_waiting_heads: true,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        // Two connections that send nothing, as a process keeping a probe out would.
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(connect_from([127, 0, 0, 1], addr).await);
            let opened = silent.len() as i64;
            while counts.open.load(Ordering::SeqCst) != opened {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // A probe from the same address takes the longest-waiting one's place.
        let mut probe = connect_from([127, 0, 0, 1], addr).await;
        answered(&mut probe).await;
        let took = closed(&mut silent[0], Instant::now()).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(counts.closed(Closed::PeerLimitEvicted), 1);
        assert_eq!(counts.closed(Closed::PeerLimitRefused), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_closes_after_the_idle_limit() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(400),
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        // Timed from before the request: the idle clock starts when the answer is done,
        // later than this, however long the client then takes to read it.
        let since = Instant::now();
        answered(&mut stream).await;
        let took = closed(&mut stream, since).await;
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );
        assert_eq!(counts.closed(Closed::IdleTimeout), 1);
        assert_eq!(counts.closed(Closed::HeaderTimeout), 0);
        eventually("the connection counted as ended", || {
            counts.open.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn the_last_request_a_connection_may_carry_says_close() {
        let limits = Limits {
            max_requests_per_connection: 3,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        for _ in 0..2 {
            stream.write_all(GET).await.expect("sends");
            let answer = response(&mut stream).await.expect("answered");
            assert!(
                !answer.to_ascii_lowercase().contains("connection: close"),
                "{answer}"
            );
        }
        stream.write_all(GET).await.expect("sends");
        let last = response(&mut stream).await.expect("answered");
        assert!(
            last.to_ascii_lowercase().contains("connection: close"),
            "{last}"
        );
        closed(&mut stream, Instant::now()).await;
        // Counted when the connection's task ends, after its socket closed.
        eventually("the request limit counted", || {
            counts.closed(Closed::RequestLimit) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_answers_is_closed_and_its_slot_freed() {
        // Requests pipelined by a client that never reads: once the answers fill the
        // socket's buffers, no answer can be written. hyper then takes no further request,
        // so the connection is idle (not answering) and the idle limit closes it; the drain
        // that would wait for the unwritten answer is bounded too. It must not stay open,
        // holding a slot of its address and of the listener.
        let limits = Limits {
            idle_timeout: Duration::from_millis(400),
            // Not this limit's `Connection: close` first.
            max_requests_per_connection: usize::MAX,
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("a small buffer");
        let stream = socket.connect(addr).await.expect("connects");
        let (_reader, mut writer) = stream.into_split();
        // Writes until the server stops reading too (its buffers full), never finishing.
        let flood = tokio::spawn(async move {
            let many = GET.repeat(64);
            while writer.write_all(&many).await.is_ok() {}
        });
        let ended = async {
            while counts.open.load(Ordering::SeqCst) != 0 || counts.closed(Closed::IdleTimeout) == 0
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), ended)
            .await
            .expect("the connection that stopped reading ends");
        flood.abort();
    }

    #[tokio::test]
    async fn an_evicted_connection_that_stopped_reading_gives_its_slot_back_at_once() {
        // One address at its limit (2) of a listener with 3 slots, both its connections
        // stuck: requests pipelined, answers (64 KiB each) never read. A third connection
        // from it evicts one; the evicted one must not hold its slot while its unflushed
        // answer waits for the drain timeout (5 s), or another address finds no slot.
        let limits = Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let listener = bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("binds");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let counts = Arc::new(Counts::default());
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        let handler = move |_, _| {
            let big = big.clone();
            async move { Response::new(Full::new(big)) }
        };
        tokio::spawn(serve_http_observed(
            listener,
            limits,
            Arc::clone(&counts) as Arc<dyn ConnectionObserver>,
            handler,
            stop.clone(),
        ));
        let mut stuck = Vec::new();
        for _ in 0..2 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(4096).expect("a small buffer");
            let mut stream = socket.connect(addr).await.expect("connects");
            stream.write_all(&GET.repeat(200)).await.expect("sends");
            stuck.push(stream);
        }
        // Both are served until their answers fill the buffers, and are then idle: a third
        // connection is refused while neither is, and evicts one once one is.
        let mut third = Vec::new();
        while counts.closed(Closed::PeerLimitEvicted) == 0 {
            third.push(TcpStream::connect(addr).await.expect("connects"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another address gets the slot the evicted connection held.
        let mut other = connect_from([127, 0, 0, 2], addr).await;
        tokio::time::timeout(Duration::from_secs(3), answered(&mut other))
            .await
            .expect("another address answered while the evicted connection drained");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_head_started_after_an_answer_has_its_own_deadline() {
        // Idle for longer than the header deadline, then a trickled head: cut at the
        // header deadline counted from its first byte, not at the idle limit.
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        let (addr, counts, _stop) = observed(limits).await;
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        answered(&mut stream).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream.write_all(b"GET /x HT").await.expect("sends");
        let took = closed(&mut stream, Instant::now()).await;
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );
        assert_eq!(counts.closed(Closed::HeaderTimeout), 1);
    }
}
