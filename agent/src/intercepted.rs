//! Pod-facing listeners that take only what the agent's DNAT rules sent them.
//!
//! The agent listens on the node's address, so anything that can reach the node can open a
//! connection to its pod ports directly: pods of other nodes, where pod addresses route
//! between nodes (the VPC CNI). Such a connection is never from a pod of this node, yet it
//! would hold one of the agent's connections while the agent looked for its address, as
//! long as it kept requests coming. With the rules installed (`--iptables`), a connection is
//! taken only if its original destination (the kernel's connection tracking,
//! `SO_ORIGINAL_DST`) is an address the rules intercept, port 80; any other is closed as
//! soon as it is accepted, before it is given a place, and counted
//! (`podiam_agent_connections_closed_total{reason="not-intercepted"}`). Loopback stays open
//! (the node's own processes, refused later as unknown pods; benchmarks). Without the rules
//! nothing is checked: what sends pods here is then someone else's.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt};
use podiam_runtime::net::Listener;
use podiam_runtime::serve::{Closed, ConnectionObserver};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener that, when `check` is on, closes connections that did not come through
/// the DNAT rules.
pub struct Intercepted {
    inner: TcpListener,
    check: bool,
    observer: Arc<dyn ConnectionObserver>,
}

impl std::fmt::Debug for Intercepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercepted")
            .field("inner", &self.inner)
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl Intercepted {
    /// `inner`, checking each connection when `check`; closed ones are told to `observer`.
    pub fn new(inner: TcpListener, check: bool, observer: Arc<dyn ConnectionObserver>) -> Self {
        Intercepted {
            inner,
            check,
            observer,
        }
    }

    /// Whether `stream`, from `peer`, may be served.
    fn admits(&self, stream: &TcpStream, peer: SocketAddr) -> bool {
        !self.check
            || peer.ip().to_canonical().is_loopback()
            || original_destination(stream).is_some_and(intercepted)
    }
}

impl Listener for Intercepted {
    type Io = TcpStream;

    async fn accept(&self) -> (TcpStream, SocketAddr) {
        loop {
            let (stream, peer) = Listener::accept(&self.inner).await;
            if self.admits(&stream, peer) {
                return (stream, peer);
            }
            tracing::debug!(%peer, "a connection the DNAT rules did not send here: closed");
            self.observer.closed(Closed::NotIntercepted);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn set_nodelay(io: &TcpStream) -> io::Result<()> {
        io.set_nodelay(true)
    }
}

/// The addresses the DNAT rules intercept ([`crate::iptables`]'s, as addresses: checked on
/// every accepted connection, so not parsed there).
const INTERCEPTED: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];

/// Whether `destination` is one the agent's DNAT rules take: an intercepted address, port 80.
pub fn intercepted(destination: SocketAddr) -> bool {
    destination.port() == 80 && INTERCEPTED.contains(&destination.ip().to_canonical())
}

/// Where the peer sent `stream` before any DNAT, by connection tracking; `None` when the
/// kernel knows nothing of it.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let raw = getsockopt(stream, sockopt::OriginalDst).ok()?;
            let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(raw.sin_port))))
        }
        SocketAddr::V6(_) => {
            let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(raw.sin6_port))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::{CONTAINER_IP, CONTAINER_IP6, METADATA_IP, METADATA_IP6};

    #[test]
    fn the_addresses_are_the_rules_addresses() {
        let rules = [METADATA_IP, CONTAINER_IP, METADATA_IP6, CONTAINER_IP6]
            .map(|a| a.parse::<IpAddr>().expect("an address"));
        assert_eq!(INTERCEPTED, rules);
    }

    #[test]
    fn only_the_intercepted_addresses_on_port_80() {
        for yes in [
            "169.254.169.254:80",
            "169.254.170.23:80",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::23]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(intercepted(yes.parse().expect("address")), "{yes}");
        }
        for no in [
            "169.254.169.254:81",
            "10.0.0.1:254",
            "169.254.169.253:80",
            "[fd00:ec2::255]:80",
        ] {
            assert!(!intercepted(no.parse().expect("address")), "{no}");
        }
    }
}
