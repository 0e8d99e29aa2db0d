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
//! So a call takes a slot among those being read — at most [`MAX_READING_PER_ADDRESS`] for
//! one address and [`MAX_READING`] in all — when it
//! arrives, and gives it back once its request has ended (its handler starts) or it is
//! dropped. A call that finds no slot is refused at once with `RESOURCE_EXHAUSTED`, its
//! request never read; one whose request has not ended [`READ_TIMEOUT`] after it arrived
//! fails with `DEADLINE_EXCEEDED`. An honest caller's request arrives with its headers, so
//! its slot is held for microseconds: the caps only ever meet callers that open calls and
//! send them slowly or not at all.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::accept::{OpenConnections, Slot};

/// Calls from one address whose requests are being read at once: one connection's worth
/// of streams, arriving together (an agent's burst of pods starting).
pub const MAX_READING_PER_ADDRESS: usize = 256;
/// Calls whose requests are being read at once, from all addresses together. With 16 KiB
/// of headers and a 32 KiB message each, at most about 48 MiB.
pub const MAX_READING: usize = 1024;
/// The longest a call's request may take to arrive in full, from its headers to its end.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The layer: [`Reading`] around a gRPC server's routes. Clones share one count.
#[derive(Clone)]
pub struct ReadingLayer {
    open: Arc<OpenConnections>,
    timeout: Duration,
    on_refused: Arc<dyn Fn() + Send + Sync>,
}

impl ReadingLayer {
    /// The port's bounds: [`MAX_READING_PER_ADDRESS`], [`MAX_READING`] and [`READ_TIMEOUT`].
    /// `on_refused` is called for each call refused for want of a slot (a metric).
    pub fn new(on_refused: Arc<dyn Fn() + Send + Sync>) -> ReadingLayer {
        ReadingLayer::with(
            MAX_READING_PER_ADDRESS,
            MAX_READING,
            READ_TIMEOUT,
            on_refused,
        )
    }

    fn with(
        per_address: usize,
        total: usize,
        timeout: Duration,
        on_refused: Arc<dyn Fn() + Send + Sync>,
    ) -> ReadingLayer {
        ReadingLayer {
            open: Arc::new(OpenConnections::new(per_address, total, None)),
            timeout,
            on_refused,
        }
    }
}

impl std::fmt::Debug for ReadingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadingLayer")
            .field("open", &self.open)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
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
        let Some(slot) = self.limits.open.admit(address) else {
            (self.limits.on_refused)();
            let status = tonic::Status::resource_exhausted(format!(
                "too many calls whose requests are still arriving ({MAX_READING_PER_ADDRESS} \
                 from one address, {MAX_READING} in all): try again"
            ));
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

/// A request's body holding its call's slot until it ends, fails or is dropped, and failing
/// once its time is up.
struct Bounded {
    body: Body,
    slot: Option<Slot>,
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

    fn layer(
        per_address: usize,
        total: usize,
    ) -> (Reading<ReadsAll>, Arc<std::sync::atomic::AtomicUsize>) {
        let shed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&shed);
        let limits = ReadingLayer::with(
            per_address,
            total,
            Duration::from_secs(5),
            Arc::new(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        (limits.layer(ReadsAll), shed)
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
