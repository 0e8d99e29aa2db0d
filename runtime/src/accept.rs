//! The server's TLS accept loop: TCP connections in, mutually authenticated TLS streams out,
//! each handshake made with the configuration current at that moment (see
//! [`crate::rotate`]).
//!
//! Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so one slow or
//! silent client never holds up the others. A refused handshake (no client certificate, one
//! from another CA, expired, not yet valid) is logged once with the peer's address and
//! rustls's reason, and the connection is closed.
//!
//! One address holds at most [`MAX_CONNECTIONS_PER_ADDRESS`] handshaken connections at once,
//! from its handshake to its close ([`Held`]): the ports take connections without a client
//! certificate (operators' calls), so without a cap one pod could open connections until a
//! server ran out of memory. Beyond it a new connection is closed once handshaken.
//! Connections with no client certificate (operators' calls: agents always present one) are
//! counted apart and are fewer: [`MAX_UNCERTIFIED_PER_ADDRESS`] per address and
//! [`MAX_UNCERTIFIED`] in all, since each may carry up to 256 calls whose requests are read
//! before anything can refuse them. Loopback (`kubectl port-forward` arrives there; no pod
//! can) is one address with a share of its own, [`MAX_UNCERTIFIED_LOOPBACK`], outside the
//! total: pods cannot take port-forwards' places, and the node's own processes cannot take
//! more by using all of 127/8. So what an address's connections without a certificate hold
//! never keeps out a certified one from the same address (a pod whose traffic the CNI
//! masquerades as its node's address, beside that node's agent).
//!
//! Handshakes under way are [`MAX_HANDSHAKES_PER_ADDRESS`] per address: at that number a new
//! connection from the address takes the place of its oldest handshake, so an agent's (a few
//! milliseconds) is not kept out by silent connections from its own address. They are
//! [`MAX_HANDSHAKES`] at most, all addresses together; at that number a new connection takes
//! the place of the oldest handshake of the address with the most under way, if that is more
//! than its own address has, else of the oldest handshake once it has been under way for
//! [`HANDSHAKE_GIVES_WAY_AFTER`]; otherwise it is closed.

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
use crate::telemetry::LogThrottle;

/// What kind of refusal `why` is, for the log's throttle: its first words, without the
/// numbers in them. rustls's text names times and counts that change every second (an
/// expired certificate's "… seconds ago") and may quote what the client sent (the key
/// usages of its certificate), which must not make each refusal a kind of its own.
fn refusal_class(why: &str) -> String {
    why.chars()
        .filter(|c| !c.is_ascii_digit())
        .take(REFUSAL_CLASS_CHARS)
        .collect()
}

/// How much of a refusal's text tells its kind ([`refusal_class`]).
const REFUSAL_CLASS_CHARS: usize = 48;

/// The handshakes under way, oldest first, each with its address and what gives it up, and
/// how many each address has under way.
#[derive(Debug, Default)]
struct UnderWay {
    next: u64,
    order: std::collections::VecDeque<(u64, IpAddr, tokio::time::Instant, CancellationToken)>,
    per_address: HashMap<IpAddr, usize>,
}

impl UnderWay {
    /// A place for a new handshake from `address` begun at `now`. At
    /// [`MAX_HANDSHAKES_PER_ADDRESS`] of its own: the oldest of them (silent connections from
    /// an agent's address cannot keep its handshake out). At [`MAX_HANDSHAKES`]: the oldest
    /// handshake of the address with the most under way, if that is more than `address` has
    /// (so many addresses' silent connections cannot keep an agent's out); else the oldest's,
    /// if it has been under way for [`HANDSHAKE_GIVES_WAY_AFTER`]. The handshake given up is
    /// told so; `None`: no place.
    fn begin(
        &mut self,
        address: IpAddr,
        now: tokio::time::Instant,
    ) -> Option<(u64, CancellationToken)> {
        let mine = self.per_address.get(&address).copied().unwrap_or(0);
        if mine >= MAX_HANDSHAKES_PER_ADDRESS {
            self.give_up(address);
        } else if self.order.len() >= MAX_HANDSHAKES {
            let crowded = (self.per_address.iter())
                .filter(|(_, n)| **n > mine)
                .max_by_key(|(_, n)| **n)
                .map(|(from, _)| *from);
            match crowded {
                Some(crowded) => self.give_up(crowded),
                None => {
                    let (_, oldest, since, _) = self.order.front()?;
                    if now.saturating_duration_since(*since) < HANDSHAKE_GIVES_WAY_AFTER {
                        return None;
                    }
                    let oldest = *oldest;
                    self.give_up(oldest);
                }
            }
        }
        let id = self.next;
        self.next += 1;
        let given_up = CancellationToken::new();
        self.order.push_back((id, address, now, given_up.clone()));
        *self.per_address.entry(address).or_default() += 1;
        Some((id, given_up))
    }

    /// Gives up the oldest handshake of `address`, telling it so.
    fn give_up(&mut self, address: IpAddr) {
        if let Some(i) = self
            .order
            .iter()
            .position(|(_, from, _, _)| *from == address)
        {
            self.remove(i).cancel();
        }
    }

    /// Takes the `i`th handshake out of those under way, returning what gives it up.
    fn remove(&mut self, i: usize) -> CancellationToken {
        let Some((_, from, _, given_up)) = self.order.remove(i) else {
            return CancellationToken::new();
        };
        if let Some(n) = self.per_address.get_mut(&from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&from);
            }
        }
        given_up
    }

    /// Handshake `id` ended (nothing happens if it was given up: it is gone already).
    fn end(&mut self, id: u64) {
        if let Some(i) = self.order.iter().position(|(at, _, _, _)| *at == id) {
            self.remove(i);
        }
    }
}

/// `mutex`'s value, also when a thread panicked holding it (every change to it is whole).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Longest a client may take to complete its TLS handshake: a healthy agent needs a few
/// milliseconds; this only bounds stuck or hostile clients.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshaken connections waiting for the gRPC server to pick them up.
const ACCEPTED_BUFFER: usize = 64;
/// Handshakes under way at once, all addresses together. Each holds a socket and the TLS
/// state until it completes or [`HANDSHAKE_TIMEOUT`] passes: without a total, clients that
/// open connections from many addresses and never finish their handshakes (any pod can
/// reach the port) would grow the server's memory with the number of addresses.
pub const MAX_HANDSHAKES: usize = 1024;
/// Handshakes under way from one address; at this number its oldest gives way to a new one.
/// An agent has one or two under way, and its take milliseconds: to keep it out, silent
/// connections from its address would have to arrive this many at a time within them.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// At [`MAX_HANDSHAKES`], when no address has more under way than the new connection's, a
/// handshake under way for this long gives its place to it (an agent's takes milliseconds, a
/// silent client's all of [`HANDSHAKE_TIMEOUT`]); when even the oldest is younger (a burst
/// of agents reconnecting at once), the new connection is closed instead, and its client
/// connects again.
pub const HANDSHAKE_GIVES_WAY_AFTER: Duration = Duration::from_secs(1);
/// Refused handshakes are logged once per address and reason in this long.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);
/// Handshaken connections one address may hold open at once, those without a client
/// certificate on a port that counts them apart ([`accept_tls_certified`]) aside. An agent
/// holds one or two to each replica (two while its certificate rotates); a holder of one
/// node's certificate gets no further than this.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Handshaken connections held in all on a port without client certificates (the admission
/// webhook's, which any pod can reach): at this number a new connection takes the place of
/// the oldest of the address holding the most, if that is more than its own address holds,
/// else it is closed. The API server holds a few, so pods of any number of addresses can
/// neither grow a server's memory with connections kept busy nor keep the API server out
/// while any of them holds more than it.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections without a client certificate one address other than loopback may hold: an
/// operator's pod runs a command or two at a time.
pub const MAX_UNCERTIFIED_PER_ADDRESS: usize = 4;
/// Connections without a client certificate from loopback (all of 127/8 and ::1 together):
/// operators' port-forwards, a command each, and whatever else runs on the server's node.
pub const MAX_UNCERTIFIED_LOOPBACK: usize = 8;
/// Connections without a client certificate held in all: what the requests of their calls
/// may hold in memory before anything checks them stays bounded however many addresses
/// (pods) open them.
pub const MAX_UNCERTIFIED: usize = 16;

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
    let open = OpenConnections::plain();
    accept_tls_with(listener, tls, stop, tasks, on_refused, (open, None))
}

/// [`accept_tls`] for a port whose clients present the podiam CA's certificates, where
/// those that do not (operators' calls) are held to [`MAX_UNCERTIFIED_PER_ADDRESS`] and
/// [`MAX_UNCERTIFIED`] connections, from loopback (port-forwards) to
/// [`MAX_UNCERTIFIED_LOOPBACK`]. Not for the admission webhook's port: the API server
/// presents no certificate there.
pub fn accept_tls_certified<L: Listener>(
    listener: L,
    tls: Arc<Rotating<ServerConfig>>,
    stop: CancellationToken,
    tasks: &TaskTracker,
    on_refused: Arc<dyn Fn() + Send + Sync>,
) -> ReceiverStream<std::io::Result<TlsStream<Held<L::Io>>>> {
    let certified = OpenConnections::new(MAX_CONNECTIONS_PER_ADDRESS, usize::MAX, None);
    let uncertified = Arc::new(OpenConnections::uncertified());
    accept_tls_with(
        listener,
        tls,
        stop,
        tasks,
        on_refused,
        (certified, Some(uncertified)),
    )
}

fn accept_tls_with<L: Listener>(
    listener: L,
    tls: Arc<Rotating<ServerConfig>>,
    stop: CancellationToken,
    tasks: &TaskTracker,
    on_refused: Arc<dyn Fn() + Send + Sync>,
    (open, uncertified): (OpenConnections, Option<Arc<OpenConnections>>),
) -> ReceiverStream<std::io::Result<TlsStream<Held<L::Io>>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    let shared = Arc::new(Handshaking {
        tx,
        on_refused,
        open: Arc::new(open),
        uncertified,
        under_way: Mutex::new(UnderWay::default()),
        refusals: LogThrottle::new(REFUSALS_LOGGED_EVERY),
    });
    tasks.spawn(async move {
        let handshakes = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let now = tokio::time::Instant::now();
            let Some(place) = lock(&shared.under_way).begin(peer.ip().to_canonical(), now) else {
                tracing::debug!(%peer, "{MAX_HANDSHAKES} handshakes under way, none for long: closed");
                (shared.on_refused)();
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let nodelay = L::set_nodelay(&stream).map_err(|e| e.to_string());
            let stream = Held {
                io: stream,
                peer,
                slot: None,
            };
            handshakes.spawn(Arc::clone(&shared).shake(acceptor, stream, nodelay, place));
        }
        // The listener closes here: no new connections. Handshakes under way may finish.
        drop(listener);
        handshakes.close();
        handshakes.wait().await;
    });
    ReceiverStream::new(rx)
}

/// What an accept loop's handshakes share.
struct Handshaking<T> {
    /// Where handshaken streams go.
    tx: mpsc::Sender<std::io::Result<TlsStream<T>>>,
    on_refused: Arc<dyn Fn() + Send + Sync>,
    /// The handshaken connections of each address.
    open: Arc<OpenConnections>,
    /// Those without a client certificate, when they are counted apart.
    uncertified: Option<Arc<OpenConnections>>,
    under_way: Mutex<UnderWay>,
    /// Anyone who reaches the port can have handshakes refused as fast as they like.
    refusals: LogThrottle<(IpAddr, String)>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Handshaking<Held<I>> {
    /// The handshake of `stream` (`nodelay`: whether setting TCP_NODELAY worked), in its
    /// `place` among those under way; handed out, or refused and logged.
    async fn shake(
        self: Arc<Self>,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: Held<I>,
        nodelay: Result<(), String>,
        (id, given_up): (u64, CancellationToken),
    ) {
        let peer = stream.peer;
        let handshaken = tokio::select! {
            () = given_up.cancelled() => Err(format!(
                "given up for a newer connection: {MAX_HANDSHAKES_PER_ADDRESS} handshakes of this \
                 address, or {MAX_HANDSHAKES} of all, were under way"
            )),
            handshaken = async {
                nodelay?;
                handshake(acceptor, stream, peer).await
            } => handshaken,
        };
        lock(&self.under_way).end(id);
        match handshaken.and_then(|stream| self.counted(stream, peer)) {
            Ok(stream) => {
                let _ = self.tx.send(Ok(stream)).await;
            }
            Err(why) => {
                (self.on_refused)();
                // Logged once per address and reason a minute; `held_back`: refusals not
                // logged in the minute before (all are counted).
                let key = (peer.ip().to_canonical(), refusal_class(&why));
                if let Some(held_back) = self.refusals.admit(key, std::time::Instant::now()) {
                    tracing::warn!(%peer, %why, held_back, "TLS handshake refused");
                }
            }
        }
    }
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

impl<T> Handshaking<Held<T>> {
    /// `stream` with a slot among its address's connections: those without a client
    /// certificate, where they are counted apart, else all of them; refused when there is
    /// no slot.
    fn counted(
        &self,
        mut stream: TlsStream<Held<T>>,
        peer: SocketAddr,
    ) -> Result<TlsStream<Held<T>>, String> {
        let certified = stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|certs| !certs.is_empty());
        let address = peer.ip().to_canonical();
        let slot = match &self.uncertified {
            Some(uncertified) if !certified => uncertified.admit(address).ok_or_else(|| {
                format!(
                    "connections without a client certificate: {MAX_UNCERTIFIED_PER_ADDRESS} \
                     per address and {MAX_UNCERTIFIED} in all, {MAX_UNCERTIFIED_LOOPBACK} \
                     from loopback, are open"
                )
            })?,
            _ => self.open.admit(address).ok_or_else(|| {
                format!(
                    "{MAX_CONNECTIONS_PER_ADDRESS} connections of this address are open, or \
                     {MAX_CONNECTIONS} in all on a port without client certificates"
                )
            })?,
        };
        stream.get_mut().0.slot = Some(slot);
        Ok(stream)
    }
}

/// How many connections (or calls, or reads) each address holds open, at most `per_address`
/// each and `total` in all. With `loopback` set, every loopback address counts as one
/// ([`LOOPBACK`]), with that share of its own, outside the total. With `give_way` set, at the
/// total a new connection takes the place of the oldest of the address holding the most, if
/// that is more than its own address holds: that one is told to close ([`Slot::given_up`]).
#[derive(Debug)]
pub struct OpenConnections {
    open: Mutex<Open>,
    per_address: usize,
    total: usize,
    loopback: Option<usize>,
    give_way: bool,
}

/// What [`OpenConnections`] holds: each address's connections, oldest first, each with what
/// tells it to give way.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    by_address: HashMap<IpAddr, std::collections::VecDeque<(u64, CancellationToken)>>,
}

impl Open {
    /// Forgets connection `id` of `address`, and the address once it holds none.
    fn remove(&mut self, address: IpAddr, id: u64) {
        if let Some(held) = self.by_address.get_mut(&address) {
            held.retain(|(at, _)| *at != id);
            if held.is_empty() {
                self.by_address.remove(&address);
            }
        }
    }
}

/// The one address all of loopback counts as, when it has a share of its own.
const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

impl OpenConnections {
    pub fn new(per_address: usize, total: usize, loopback: Option<usize>) -> OpenConnections {
        OpenConnections {
            open: Mutex::default(),
            per_address,
            total,
            loopback,
            give_way: false,
        }
    }

    /// The bounds of a certified port's connections without a certificate.
    fn uncertified() -> OpenConnections {
        OpenConnections::new(
            MAX_UNCERTIFIED_PER_ADDRESS,
            MAX_UNCERTIFIED,
            Some(MAX_UNCERTIFIED_LOOPBACK),
        )
    }

    /// The bounds of a port without client certificates: [`MAX_CONNECTIONS_PER_ADDRESS`]
    /// each, [`MAX_CONNECTIONS`] in all, the most crowded address giving way.
    fn plain() -> OpenConnections {
        OpenConnections {
            give_way: true,
            ..OpenConnections::new(MAX_CONNECTIONS_PER_ADDRESS, MAX_CONNECTIONS, None)
        }
    }

    /// A slot for one more connection of `address`, if it has fewer than its share open
    /// and all have fewer than the total (or, with `give_way`, another address holding more
    /// gives up its oldest).
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let loopback = self.loopback.filter(|_| address.is_loopback());
        let (address, share) = match loopback {
            Some(share) => (LOOPBACK, share),
            None => (address, self.per_address),
        };
        let mine = open.by_address.get(&address).map_or(0, |held| held.len());
        if mine >= share {
            return None;
        }
        if loopback.is_none() && self.total != usize::MAX {
            let counted = |a: &IpAddr| self.loopback.is_none() || *a != LOOPBACK;
            let all: usize = (open.by_address.iter())
                .filter(|(a, _)| counted(a))
                .map(|(_, held)| held.len())
                .sum();
            if all >= self.total {
                if !self.give_way {
                    return None;
                }
                let crowded = (open.by_address.iter())
                    .filter(|(a, held)| counted(a) && held.len() > mine)
                    .max_by_key(|(_, held)| held.len())
                    .map(|(a, _)| *a)?;
                let (oldest, given_up) = (open.by_address.get(&crowded))
                    .and_then(|held| held.front())
                    .map(|(id, given_up)| (*id, given_up.clone()))?;
                given_up.cancel();
                open.remove(crowded, oldest);
            }
        }
        let id = open.next;
        open.next += 1;
        let given_up = CancellationToken::new();
        (open.by_address.entry(address).or_default()).push_back((id, given_up.clone()));
        Some(Slot {
            open: Arc::clone(self),
            address,
            id,
            given_up,
        })
    }
}

/// One open connection of an address, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    open: Arc<OpenConnections>,
    address: IpAddr,
    id: u64,
    given_up: CancellationToken,
}

impl Slot {
    /// Cancelled when the connection is to close to make room for another address's.
    pub fn given_up(&self) -> &CancellationToken {
        &self.given_up
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(self.address, self.id);
    }
}

/// An accepted connection, holding its address's slot from its handshake until it is
/// dropped (closed).
#[derive(Debug)]
pub struct Held<T> {
    io: T,
    peer: SocketAddr,
    /// Its slot among its address's connections (those without a client certificate, if it
    /// has none and they are counted apart); none while it is handshaking.
    slot: Option<Slot>,
}

impl<T> Held<T> {
    /// The address the connection came from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Cancelled when the connection is to close to make room for another address's (on a
    /// port without client certificates, at [`MAX_CONNECTIONS`]); its server should end it
    /// gracefully.
    pub fn given_up(&self) -> CancellationToken {
        (self.slot.as_ref()).map_or_else(CancellationToken::new, |slot| slot.given_up.clone())
    }
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

    #[test]
    fn at_the_limit_the_most_crowded_address_gives_way_and_a_burst_is_closed() {
        let t0 = tokio::time::Instant::now();
        let mut under_way = UnderWay::default();
        let address = |i: usize| IpAddr::from([10, 0, 0, u8::try_from(i).expect("small")]);
        // 32 addresses, 32 handshakes each, all young.
        let begun: Vec<(u64, CancellationToken)> = (0..MAX_HANDSHAKES)
            .map(|i| under_way.begin(address(i % 32), t0).expect("a place"))
            .collect();
        // One of them, holding as many as any other: no place while all are young…
        assert!(under_way.begin(address(3), t0).is_none());
        assert!(begun.iter().all(|(_, token)| !token.is_cancelled()));
        // …and the oldest's once it has waited a second.
        assert!(
            under_way
                .begin(address(3), t0 + HANDSHAKE_GIVES_WAY_AFTER)
                .is_some()
        );
        assert!(begun[0].1.is_cancelled());
        // A new address (an agent's) takes the place of an address holding the most at
        // once, however young its handshakes.
        let given_up = |begun: &[(u64, CancellationToken)]| {
            begun
                .iter()
                .filter(|(_, token)| token.is_cancelled())
                .count()
        };
        let (_, agent) = under_way
            .begin(address(200), t0)
            .expect("the agent's place");
        assert_eq!(given_up(&begun), 2);
        assert!(!agent.is_cancelled());
        // One that ends frees its place; the places stay at the most.
        under_way.end(begun[5].0);
        assert!(under_way.begin(address(201), t0).is_some());
        assert_eq!(under_way.order.len(), MAX_HANDSHAKES);
    }

    #[test]
    fn at_an_addresss_limit_its_oldest_handshake_gives_way_and_no_other_address_is_touched() {
        let t0 = tokio::time::Instant::now();
        let mut under_way = UnderWay::default();
        let (node, other) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let theirs = under_way.begin(other, t0).expect("a place");
        let silent: Vec<(u64, CancellationToken)> = (0..MAX_HANDSHAKES_PER_ADDRESS)
            .map(|_| under_way.begin(node, t0).expect("a place"))
            .collect();
        // However young they are, the address's next handshake takes its oldest's place.
        let (_, agent) = under_way.begin(node, t0).expect("the agent's place");
        assert!(silent[0].1.is_cancelled());
        assert!(silent[1..].iter().all(|(_, token)| !token.is_cancelled()));
        assert!(!agent.is_cancelled() && !theirs.1.is_cancelled());
        assert_eq!(under_way.per_address[&node], MAX_HANDSHAKES_PER_ADDRESS);
        // Ended and given-up handshakes are forgotten, and so are addresses with none.
        under_way.end(silent[0].0);
        under_way.end(theirs.0);
        assert_eq!(under_way.per_address.get(&other), None);
        assert_eq!(under_way.order.len(), MAX_HANDSHAKES_PER_ADDRESS);
    }

    /// A server's TLS set-up and a listener, and clients' configurations: an agent's (with
    /// its certificate) and an operator's (the CA alone).
    struct TlsRig {
        _dir: tempfile::TempDir,
        tls: Arc<Rotating<ServerConfig>>,
        agent: Arc<rustls::ClientConfig>,
        bare: Arc<rustls::ClientConfig>,
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
    }

    impl TlsRig {
        async fn new() -> TlsRig {
            crate::tls::install_crypto_provider();
            let (dir, files) = crate::tls::test_files::written();
            let server = crate::tls::test_files::server_files(&files);
            let tls =
                Arc::new(Rotating::load(server, crate::tls::server_config).expect("server TLS"));
            let agent = crate::tls::TlsFiles {
                ca: files.ca_cert.clone(),
                cert: files.agent_cert.clone(),
                key: files.agent_key.clone(),
            };
            let checked = agent
                .load_checked(std::time::SystemTime::now())
                .expect("agent files");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binds");
            TlsRig {
                tls,
                agent: Arc::new(crate::tls::client_config(&checked).expect("client TLS")),
                bare: Arc::new(crate::tls::ca_only_client_config(&files.ca_cert).expect("CA")),
                addr: listener.local_addr().expect("bound"),
                listener,
                _dir: dir,
            }
        }
    }

    /// A TLS connection to `addr` with `config`.
    async fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        connector.connect(name, tcp).await
    }

    /// A counter of refused connections, and the callback that counts them.
    fn refusals() -> (
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<dyn Fn() + Send + Sync>,
    ) {
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&refused);
        let on_refused = Arc::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        (refused, on_refused)
    }

    /// Until `refused` has counted `n` (a failure after 30 s).
    async fn until_refused(refused: &std::sync::atomic::AtomicUsize, n: usize) {
        let counted = async {
            while refused.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), counted)
            .await
            .unwrap_or_else(|_| panic!("{n} refusals: {refused:?} in 30 s"));
    }

    #[tokio::test]
    async fn connections_beyond_an_addresss_share_are_closed_until_one_closes() {
        let rig = TlsRig::new().await;
        let (listener, addr, tls, client) = (rig.listener, rig.addr, rig.tls, rig.agent);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (refused, on_refused) = refusals();
        let mut incoming = accept_tls(listener, tls, stop.clone(), &tasks, on_refused);
        let connect = || connect(addr, &client);
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
        // One more from the same address: closed once handshaken, never served.
        let _closed = connect().await;
        until_refused(&refused, 1).await;
        // One of them closes (the server drops a finished connection): room for one more.
        served.pop();
        clients.push(connect().await.expect("a slot given back"));
        let accepted = incoming.next().await.expect("the loop runs");
        served.push(accepted.expect("handshaken"));
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        stop.cancel();
        tasks.close();
    }

    #[tokio::test]
    async fn silent_connections_from_an_agents_address_do_not_keep_its_connection_out() {
        // A pod whose traffic the CNI masquerades as its node's address opens connections to
        // the port and sends nothing, more than an address may handshake at once, and with
        // connections without a certificate taking all of the address's share of those.
        let rig = TlsRig::new().await;
        let (listener, addr, tls) = (rig.listener, rig.addr, rig.tls);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (refused, on_refused) = refusals();
        let mut incoming = accept_tls_certified(listener, tls, stop.clone(), &tasks, on_refused);
        let (mut bare, mut served) = (Vec::new(), Vec::new());
        for i in 0..MAX_UNCERTIFIED_LOOPBACK {
            bare.push(
                connect(addr, &rig.bare)
                    .await
                    .unwrap_or_else(|e| panic!("{i}: {e}")),
            );
            let accepted = incoming.next().await.expect("the loop runs");
            served.push(accepted.expect("handshaken"));
        }
        let mut silent = Vec::new();
        for _ in 0..2 * MAX_HANDSHAKES_PER_ADDRESS {
            silent.push(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .expect("connects"),
            );
        }
        // The agent's connection from the same address is handshaken and served, and the
        // silent ones it displaced were closed.
        let _agent = connect(addr, &rig.agent)
            .await
            .expect("the agent's handshake");
        let accepted = incoming.next().await.expect("the loop runs");
        assert!(
            accepted
                .expect("handshaken")
                .get_ref()
                .1
                .peer_certificates()
                .is_some()
        );
        until_refused(&refused, MAX_HANDSHAKES_PER_ADDRESS + 1).await;
        stop.cancel();
        tasks.close();
    }

    #[tokio::test]
    async fn connections_without_a_certificate_are_held_to_their_own_share() {
        let rig = TlsRig::new().await;
        let (listener, addr, tls, certified, bare) =
            (rig.listener, rig.addr, rig.tls, rig.agent, rig.bare);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (refused, on_refused) = refusals();
        let mut incoming = accept_tls_certified(listener, tls, stop.clone(), &tasks, on_refused);
        let has_certificate = |stream: &TlsStream<Held<tokio::net::TcpStream>>| {
            stream.get_ref().1.peer_certificates().is_some()
        };
        let mut clients = Vec::new();
        let mut served = Vec::new();
        // The test's clients come from loopback, which has a share of its own.
        for i in 0..MAX_UNCERTIFIED_LOOPBACK {
            clients.push(
                connect(addr, &bare)
                    .await
                    .unwrap_or_else(|e| panic!("{i}: {e}")),
            );
            let accepted = incoming.next().await.expect("the loop runs");
            let stream = accepted.expect("handshaken");
            assert!(!has_certificate(&stream));
            served.push(stream);
        }
        // One more without a certificate: closed after its handshake, never served.
        let _closed = connect(addr, &bare).await;
        until_refused(&refused, 1).await;
        // An agent's connection from the same address is served all the same.
        clients.push(connect(addr, &certified).await.expect("certified"));
        let accepted = incoming.next().await.expect("the loop runs");
        assert!(has_certificate(&accepted.expect("handshaken")));
        // One without a certificate closes: room for one more.
        served.pop();
        clients.push(connect(addr, &bare).await.expect("a slot given back"));
        let accepted = incoming.next().await.expect("the loop runs");
        assert!(!has_certificate(&accepted.expect("handshaken")));
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        stop.cancel();
        tasks.close();
    }

    #[test]
    fn loopback_is_one_address_with_a_share_of_its_own() {
        let open = Arc::new(OpenConnections::uncertified());
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        // Pods take every place of the total...
        let pods: Vec<Slot> = (0..MAX_UNCERTIFIED)
            .map(|i| {
                let address = IpAddr::from([10, 1, 0, (i / MAX_UNCERTIFIED_PER_ADDRESS) as u8]);
                open.admit(address).unwrap_or_else(|| panic!("slot {i}"))
            })
            .collect();
        assert!(open.admit(ip("10.2.0.1")).is_none());
        // ...and port-forwards still get theirs, from any loopback address, all counted as
        // one: using all of 127/8 gets no more.
        let local: Vec<Slot> = (0..MAX_UNCERTIFIED_LOOPBACK)
            .map(|i| {
                let address = [ip("127.0.0.1"), ip("127.9.0.3"), ip("::1")][i % 3];
                open.admit(address)
                    .unwrap_or_else(|| panic!("loopback slot {i}"))
            })
            .collect();
        for other in ["127.0.0.1", "127.200.1.1", "::1"] {
            assert!(open.admit(ip(other)).is_none(), "{other}");
        }
        drop(local);
        assert!(open.admit(ip("127.5.5.5")).is_some());
        drop(pods);
        // Without a loopback share (the connections of an address on any port), loopback
        // addresses are addresses like the others.
        let plain = Arc::new(OpenConnections::new(1, usize::MAX, None));
        let _one = plain.admit(ip("127.0.0.1")).expect("first");
        assert!(plain.admit(ip("127.0.0.2")).is_some());
    }

    #[test]
    fn at_the_total_the_most_crowded_address_gives_up_its_oldest_connection() {
        let open = Arc::new(OpenConnections::plain());
        let pod = |i: usize| IpAddr::from([10, 1, 0, u8::try_from(i).expect("small")]);
        // 16 pods take every place, 64 each.
        let held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|i| {
                open.admit(pod(i / MAX_CONNECTIONS_PER_ADDRESS))
                    .expect("a place")
            })
            .collect();
        assert!(held.iter().all(|slot| !slot.given_up().is_cancelled()));
        // The API server's connection takes the place of the oldest of one of them...
        let api_server: IpAddr = "10.0.0.1".parse().expect("ip");
        let first = open.admit(api_server).expect("the API server's place");
        let given_up: Vec<usize> = (0..held.len())
            .filter(|i| held[*i].given_up().is_cancelled())
            .collect();
        assert_eq!(given_up.len(), 1);
        assert_eq!(given_up[0] % MAX_CONNECTIONS_PER_ADDRESS, 0, "its oldest");
        // ...and so does its next, from another of them (each holds more than it).
        let _second = open.admit(api_server).expect("another place");
        let given_up = held.iter().filter(|s| s.given_up().is_cancelled()).count();
        assert_eq!(given_up, 2);
        assert!(!first.given_up().is_cancelled());
        // A pod holding as many as any other (one none of whose connections gave way) gets
        // no place, and takes none.
        let full = (0..16)
            .find(|p| {
                held[p * MAX_CONNECTIONS_PER_ADDRESS..][..MAX_CONNECTIONS_PER_ADDRESS]
                    .iter()
                    .all(|s| !s.given_up().is_cancelled())
            })
            .expect("a pod with all its connections");
        assert!(open.admit(pod(full)).is_none());
        assert_eq!(
            held.iter().filter(|s| s.given_up().is_cancelled()).count(),
            2
        );
        // Without giving way (a certified port's connections without a certificate), the
        // total simply refuses.
        let strict = Arc::new(OpenConnections::new(2, 2, None));
        let _both = (strict.admit(pod(1)), strict.admit(pod(1)));
        assert!(strict.admit(pod(2)).is_none());
    }

    #[tokio::test]
    async fn a_connection_given_up_for_another_addresss_is_told_so() {
        let rig = TlsRig::new().await;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        // Two places, both of one address's at most.
        let open = OpenConnections {
            give_way: true,
            ..OpenConnections::new(2, 2, None)
        };
        let mut incoming = accept_tls_with(
            rig.listener,
            rig.tls,
            stop.clone(),
            &tasks,
            Arc::new(|| {}),
            (open, None),
        );
        let (addr, bare) = (rig.addr, rig.bare);
        let from = |local: [u8; 4]| {
            let bare = Arc::clone(&bare);
            async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                socket.bind(SocketAddr::from((local, 0))).expect("binds");
                let tcp = socket.connect(addr).await.expect("connects");
                let connector = tokio_rustls::TlsConnector::from(bare);
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                connector.connect(name, tcp).await.expect("handshaken")
            }
        };
        let _a = (from([127, 0, 0, 2]).await, from([127, 0, 0, 2]).await);
        let first = incoming.next().await.expect("runs").expect("served");
        let second = incoming.next().await.expect("runs").expect("served");
        let _b = from([127, 0, 0, 3]).await;
        let third = incoming.next().await.expect("runs").expect("served");
        assert!(
            first.get_ref().0.given_up().is_cancelled(),
            "the oldest gives way"
        );
        assert!(!second.get_ref().0.given_up().is_cancelled());
        assert!(!third.get_ref().0.given_up().is_cancelled());
        stop.cancel();
        tasks.close();
    }

    #[test]
    fn connections_without_a_certificate_are_bounded_in_all() {
        let open = Arc::new(OpenConnections::uncertified());
        let held: Vec<Slot> = (0..MAX_UNCERTIFIED)
            .map(|i| {
                let address = IpAddr::from([10, 1, 0, (i / MAX_UNCERTIFIED_PER_ADDRESS) as u8]);
                open.admit(address).unwrap_or_else(|| panic!("slot {i}"))
            })
            .collect();
        // Every address is under its share, but all together are at the total.
        assert!(open.admit(IpAddr::from([10, 2, 0, 1])).is_none());
        drop(held);
        assert!(open.admit(IpAddr::from([10, 2, 0, 1])).is_some());
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_slots_back_as_connections_close() {
        let open = Arc::new(OpenConnections::new(
            MAX_CONNECTIONS_PER_ADDRESS,
            usize::MAX,
            None,
        ));
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
            open.open
                .lock()
                .expect("not poisoned")
                .by_address
                .is_empty(),
            "closed addresses are forgotten"
        );
    }
}
