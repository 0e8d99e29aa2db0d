//! Bounds on the gRPC calls whose requests are still being read: a tower layer for the
//! server's gRPC port ([`ReadingLayer`]).
//!
//! A call's request is read in full before anything can check who sent it (tonic decodes
//! the message, then waits for the end of the stream, and only then runs the handler that
//! reviews the caller's token). Until then the call holds its headers (up to 16 KiB) and a
//! buffer the size its message declares (up to the decoding limit), and the caps on
//! connections alone do not bound that: 64 connections from one address at 256 streams each
//! is 16,384 calls, near a gigabyte, open to anyone holding the agents' shared certificate.
//!
//! So a call takes a slot among those being read when it arrives, and gives it back once
//! its request has ended (its handler starts) or it is dropped. Whose slots it takes is
//! decided from its headers alone ([`Identify`]):
//! - a call whose token the server has already reviewed and bound to an agent takes its
//!   **node's**: at most [`MAX_READING_PER_NODE`] per node, [`MAX_READING_PROVEN`] in all;
//! - any other call (an agent's first calls with a new token, operators, anyone without a
//!   token) takes its **address's**: at most [`MAX_READING_PER_ADDRESS`] per address,
//!   [`MAX_READING_UNPROVEN`] in all.
//!
//! The two pools are apart, so that nobody who holds the agents' shared certificate, not
//! even root on a node sending from all of its pods' addresses, can take the places of
//! agents already proven: it holds its own node's share and the unproven pool, and other
//! nodes' agents go on. An agent's call refused in the unproven pool (its token new to this
//! server: a new agent, or its hourly token rotation, while someone fills the pool) has its
//! token reviewed in the background ([`Learn`]), so that its next call is read in its node's
//! places. A call that finds no slot is refused at once with
//! `RESOURCE_EXHAUSTED`, its request never read; one whose request has not ended
//! [`READ_TIMEOUT`] after it arrived fails with `DEADLINE_EXCEEDED`. An honest caller's
//! request arrives with its headers, so its slot is held for microseconds: the caps only
//! ever meet callers that open calls and send them slowly or not at all.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::accept::{OpenConnections, Slot};

/// Calls of one proven agent's node whose requests are being read at once: one
/// connection's worth of streams, arriving together (an agent's burst of pods starting;
/// each is read in microseconds, but a busy server may take a while to poll them all).
pub const MAX_READING_PER_NODE: usize = 256;
/// Calls of proven agents whose requests are being read at once, all nodes together.
pub const MAX_READING_PROVEN: usize = 1024;
/// Calls from one address, not of a proven agent, whose requests are being read at once:
/// as many as a node's (agents under `--node-binding warn` send no token, and every agent's
/// first calls with a new token come here).
pub const MAX_READING_PER_ADDRESS: usize = 256;
/// Calls not of a proven agent whose requests are being read at once, from all addresses.
pub const MAX_READING_UNPROVEN: usize = 1024;
/// Calls whose requests are being read at once, both pools together. With 16 KiB of
/// headers and a 32 KiB message each, at most about 96 MiB.
pub const MAX_READING: usize = MAX_READING_PROVEN + MAX_READING_UNPROVEN;
/// The longest a call's request may take to arrive in full, from its headers to its end.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The proven agent's node a call's headers show, if any, and whether it came with a client
/// certificate (agents always present one): a synchronous look at what the server already
/// knows (a token reviewed before, bound to a running agent pod), never a review of its own.
pub type Identify = Arc<dyn Fn(&http::HeaderMap, bool) -> Option<Arc<str>> + Send + Sync>;

/// Told of a call with a client certificate refused in the unproven pool (its headers and
/// address): the server reviews its token in the background, within the address's share of
/// reviews, so that an agent's next call is [identified](Identify).
pub type Learn = Arc<dyn Fn(&http::HeaderMap, IpAddr) + Send + Sync>;

/// The layer: [`Reading`] around a gRPC server's routes. Clones share one count.
#[derive(Clone)]
pub struct ReadingLayer {
    /// Calls not of a proven agent, by address.
    open: Arc<OpenConnections>,
    /// Calls of proven agents, by node.
    nodes: Arc<Places<Arc<str>>>,
    identify: Identify,
    learn: Learn,
    timeout: Duration,
    on_refused: Arc<dyn Fn() + Send + Sync>,
}

/// How many slots each pool has, and how many of them one node or address may hold.
#[derive(Clone, Copy, Debug)]
struct Shares {
    per_node: usize,
    proven: usize,
    per_address: usize,
    unproven: usize,
}

impl ReadingLayer {
    /// The port's bounds ([`MAX_READING_PER_NODE`], [`MAX_READING_PROVEN`],
    /// [`MAX_READING_PER_ADDRESS`], [`MAX_READING_UNPROVEN`], [`READ_TIMEOUT`]), calls' nodes
    /// told by `identify`, and `learn` told of certified calls refused in the unproven pool.
    /// `on_refused` is called for each call refused for want of a slot (a metric).
    pub fn new(
        identify: Identify,
        learn: Learn,
        on_refused: Arc<dyn Fn() + Send + Sync>,
    ) -> ReadingLayer {
        let shares = Shares {
            per_node: MAX_READING_PER_NODE,
            proven: MAX_READING_PROVEN,
            per_address: MAX_READING_PER_ADDRESS,
            unproven: MAX_READING_UNPROVEN,
        };
        ReadingLayer::with(shares, (identify, learn), READ_TIMEOUT, on_refused)
    }

    fn with(
        shares: Shares,
        (identify, learn): (Identify, Learn),
        timeout: Duration,
        on_refused: Arc<dyn Fn() + Send + Sync>,
    ) -> ReadingLayer {
        let open = OpenConnections::new(shares.per_address, shares.unproven, None);
        ReadingLayer {
            open: Arc::new(open),
            nodes: Arc::new(Places::new(shares.per_node, shares.proven)),
            identify,
            learn,
            timeout,
            on_refused,
        }
    }

    /// A slot for `request`'s call, from `address`, in its pool; `None`: refused (and a
    /// certified caller's token learnt).
    fn admit(&self, request: &http::Request<Body>, address: IpAddr) -> Option<Place> {
        let headers = request.headers();
        let certified = certified(request);
        Some(match (self.identify)(headers, certified) {
            Some(node) => Place {
                _address: None,
                _node: Some(self.nodes.admit(node)?),
            },
            None => match self.open.admit(address) {
                Some(slot) => Place {
                    _address: Some(slot),
                    _node: None,
                },
                None => {
                    if certified {
                        (self.learn)(headers, address);
                    }
                    return None;
                }
            },
        })
    }
}

impl std::fmt::Debug for ReadingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadingLayer")
            .field("open", &self.open)
            .field("nodes", &self.nodes)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Slots by key: at most `per_key` held for one key and `total` in all.
#[derive(Debug)]
struct Places<K> {
    /// Each key's slots held, and all of them.
    held: Mutex<(HashMap<K, usize>, usize)>,
    per_key: usize,
    total: usize,
}

impl<K: Hash + Eq + Clone> Places<K> {
    fn new(per_key: usize, total: usize) -> Places<K> {
        Places {
            held: Mutex::new((HashMap::new(), 0)),
            per_key,
            total,
        }
    }

    fn admit(self: &Arc<Self>, key: K) -> Option<KeySlot<K>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (by_key, all) = &mut *held;
        if *all >= self.total {
            return None;
        }
        let count = by_key.entry(key.clone()).or_default();
        if *count >= self.per_key {
            return None;
        }
        *count += 1;
        *all += 1;
        Some(KeySlot {
            places: Arc::clone(self),
            key: Some(key),
        })
    }
}

/// One slot of [`Places`], given back when dropped.
#[derive(Debug)]
struct KeySlot<K: Hash + Eq + Clone> {
    places: Arc<Places<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Drop for KeySlot<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut held = self.places.held.lock().unwrap_or_else(|e| e.into_inner());
        let (by_key, all) = &mut *held;
        if let Some(count) = by_key.get_mut(&key) {
            *count = count.saturating_sub(1);
            *all = all.saturating_sub(1);
            if *count == 0 {
                by_key.remove(&key);
            }
        }
    }
}

/// A call's slot, in the pool it was admitted to (one of the two), given back when dropped.
#[derive(Debug)]
struct Place {
    _address: Option<Slot>,
    _node: Option<KeySlot<Arc<str>>>,
}

impl<S> tower_layer::Layer<S> for ReadingLayer {
    type Service = Reading<S>;

    fn layer(&self, inner: S) -> Reading<S> {
        Reading {
            inner,
            limits: self.clone(),
        }
    }
}

/// A gRPC service whose calls' requests are read under [`ReadingLayer`]'s bounds.
#[derive(Clone, Debug)]
pub struct Reading<S> {
    inner: S,
    limits: ReadingLayer,
}

type Answer<R, E> = Pin<Box<dyn Future<Output = Result<http::Response<R>, E>> + Send>>;

impl<S, R> tower_service::Service<http::Request<Body>> for Reading<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Answer<R, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let address = peer(&request).map_or(IpAddr::from([0, 0, 0, 0]), |ip| ip.to_canonical());
        let Some(slot) = self.limits.admit(&request, address) else {
            (self.limits.on_refused)();
            let status = tonic::Status::resource_exhausted(
                "too many calls whose requests are still arriving, from this node or address \
                 or from all: try again",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let request = request.map(|body| {
            Body::new(Bounded {
                body,
                slot: Some(slot),
                deadline: Box::pin(tokio::time::sleep(self.limits.timeout)),
                timeout: self.limits.timeout,
            })
        });
        Box::pin(self.inner.call(request))
    }
}

/// The address a request came from, as the accept loop's connection reports it.
fn peer<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
    tls.map(TlsConnectInfo::get_ref)
        .or_else(|| extensions.get::<TcpConnectInfo>())
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
}

/// Whether a request came on a connection with a client certificate.
fn certified<B>(request: &http::Request<B>) -> bool {
    let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    tls.and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty())
}

/// A request's body holding its call's slot until it ends, fails or is dropped, and failing
/// once its time is up.
struct Bounded {
    body: Body,
    slot: Option<Place>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl hyper::body::Body for Bounded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.slot.is_none() {
            return Pin::new(&mut this.body).poll_frame(cx);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.slot = None;
                    return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                        "the request did not arrive in full within {:?}",
                        this.timeout
                    )))));
                }
            }
            Poll::Ready(Some(Ok(_))) if !this.body.is_end_stream() => {}
            Poll::Ready(_) => this.slot = None,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A service that reads each request to its end and answers 200, or with the status
    /// reading it failed with.
    #[derive(Clone)]
    struct ReadsAll;

    impl Service<http::Request<Body>> for ReadsAll {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future =
            Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            Box::pin(async move {
                Ok(match request.into_body().collect().await {
                    Ok(_) => http::Response::new(Body::empty()),
                    Err(status) => status.into_http(),
                })
            })
        }
    }

    type Sender = mpsc::Sender<Result<Frame<Bytes>, tonic::Status>>;

    /// A request from `ip` whose body arrives as its sender sends it, and ends when the
    /// sender is dropped.
    fn request_from(ip: [u8; 4]) -> (http::Request<Body>, Sender) {
        let (tx, rx) = mpsc::channel(4);
        let mut request = http::Request::new(Body::new(StreamBody::new(ReceiverStream::new(rx))));
        let info = TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(SocketAddr::from((ip, 40000))),
        };
        request.extensions_mut().insert(info);
        (request, tx)
    }

    /// The gRPC status of an answer: 0 when it has none (the service's own 200).
    fn grpc_status(answer: &http::Response<Body>) -> i32 {
        tonic::Status::from_header_map(answer.headers()).map_or(0, |s| s.code() as i32)
    }

    /// The test's identification: a call is of the proven agent of the node its `node`
    /// header names.
    fn by_node_header() -> Identify {
        Arc::new(|headers: &http::HeaderMap, _certified: bool| {
            let node = headers.get("node")?.to_str().ok()?;
            Some(Arc::from(node))
        })
    }

    fn layer(
        per_address: usize,
        total: usize,
    ) -> (Reading<ReadsAll>, Arc<std::sync::atomic::AtomicUsize>) {
        let shares = Shares {
            per_node: 2,
            proven: 3,
            per_address,
            unproven: total,
        };
        layer_of(shares)
    }

    fn layer_of(shares: Shares) -> (Reading<ReadsAll>, Arc<std::sync::atomic::AtomicUsize>) {
        let shed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&shed);
        let learn: Learn = Arc::new(|_: &http::HeaderMap, _: IpAddr| {});
        let limits = ReadingLayer::with(
            shares,
            (by_node_header(), learn),
            Duration::from_secs(5),
            Arc::new(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        (limits.layer(ReadsAll), shed)
    }

    /// [`request_from`] with a `node` header: a call of that node's proven agent.
    fn request_of_node(ip: [u8; 4], node: &str) -> (http::Request<Body>, Sender) {
        let (mut request, body) = request_from(ip);
        let value = http::HeaderValue::from_str(node).expect("a header value");
        request.headers_mut().insert("node", value);
        (request, body)
    }

    #[tokio::test]
    async fn proven_agents_read_by_node_apart_from_everyone_else() {
        let (mut service, shed) = layer_of(Shares {
            per_node: 2,
            proven: 3,
            per_address: 1,
            unproven: 2,
        });
        let a = [10, 1, 0, 1];
        let mut held = Vec::new();
        // Calls that never end from address a fill the unproven pool's share of a, and
        // from another address the pool.
        let (call, body) = request_from(a);
        held.push((tokio::spawn(service.call(call)), body));
        let (call, body) = request_from([10, 1, 0, 2]);
        held.push((tokio::spawn(service.call(call)), body));
        let (call, _) = request_from([10, 1, 0, 3]);
        let refused = service.call(call).await.expect("answered");
        assert_eq!(grpc_status(&refused), tonic::Code::ResourceExhausted as i32);
        // A proven agent's call from that same address still has its node's places…
        for _ in 0..2 {
            let (call, body) = request_of_node(a, "node-1");
            held.push((tokio::spawn(service.call(call)), body));
        }
        // …two of them, whichever addresses it calls from…
        let (call, _) = request_of_node([10, 1, 0, 9], "node-1");
        let refused = service.call(call).await.expect("answered");
        assert_eq!(grpc_status(&refused), tonic::Code::ResourceExhausted as i32);
        // …and another node's agent has its own, up to the proven pool's total.
        let (call, body) = request_of_node(a, "node-2");
        held.push((tokio::spawn(service.call(call)), body));
        let (call, _) = request_of_node(a, "node-3");
        let refused = service.call(call).await.expect("answered");
        assert_eq!(grpc_status(&refused), tonic::Code::ResourceExhausted as i32);
        assert_eq!(shed.load(std::sync::atomic::Ordering::SeqCst), 3);
        // Every call ends: every slot is given back, in both pools.
        for (call, body) in held {
            drop(body);
            let answered = call.await.expect("ran").expect("answered");
            assert_eq!(grpc_status(&answered), 0);
        }
        for (call, body) in [request_of_node(a, "node-3"), request_from(a)] {
            drop(body);
            let answered = service.call(call).await.expect("answered");
            assert_eq!(grpc_status(&answered), 0, "slots were given back");
        }
        let nodes = &service.limits.nodes;
        assert_eq!(
            *nodes.held.lock().expect("not poisoned"),
            (HashMap::new(), 0)
        );
    }

    #[tokio::test]
    async fn calls_still_arriving_are_bounded_per_address_and_in_all_and_refused_unread() {
        let (mut service, shed) = layer(2, 3);
        let a = [10, 1, 0, 1];
        // Two calls from one address whose requests have not ended: its share.
        let (first, first_body) = request_from(a);
        let first = tokio::spawn(service.call(first));
        let (second, _second_body) = request_from(a);
        let _second = tokio::spawn(service.call(second));
        // A third from it is answered at once, RESOURCE_EXHAUSTED, its body never read.
        let (third, third_body) = request_from(a);
        let refused = service.call(third).await.expect("answered");
        assert_eq!(grpc_status(&refused), tonic::Code::ResourceExhausted as i32);
        assert!(
            third_body.is_closed(),
            "the refused request's body was dropped unread"
        );
        // Another address has a share of its own, up to the total.
        let (other, _other_body) = request_from([10, 1, 0, 2]);
        let _other = tokio::spawn(service.call(other));
        let (beyond, _) = request_from([10, 1, 0, 3]);
        let refused = service.call(beyond).await.expect("answered");
        assert_eq!(grpc_status(&refused), tonic::Code::ResourceExhausted as i32);
        assert_eq!(shed.load(std::sync::atomic::Ordering::SeqCst), 2);
        // The first request ends: its slot is given back, and the address may call again.
        first_body
            .send(Ok(Frame::data(Bytes::from_static(b"message"))))
            .await
            .expect("sent");
        drop(first_body);
        let answered = first.await.expect("ran").expect("answered");
        assert_eq!(grpc_status(&answered), 0);
        let (again, again_body) = request_from(a);
        drop(again_body);
        let answered = service.call(again).await.expect("answered");
        assert_eq!(grpc_status(&answered), 0, "a slot was given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_arrived_within_its_time_fails_and_gives_its_slot_back() {
        let (mut service, _) = layer(1, 1);
        let (slow, slow_body) = request_from([10, 1, 0, 1]);
        let began = tokio::time::Instant::now();
        let answered = service.call(slow).await.expect("answered");
        assert_eq!(began.elapsed(), Duration::from_secs(5));
        assert_eq!(grpc_status(&answered), tonic::Code::DeadlineExceeded as i32);
        drop(slow_body);
        let (next, next_body) = request_from([10, 1, 0, 1]);
        drop(next_body);
        let answered = service.call(next).await.expect("answered");
        assert_eq!(grpc_status(&answered), 0, "the slot was given back");
    }
}
