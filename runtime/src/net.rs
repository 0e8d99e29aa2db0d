//! Where the daemons' connections come from and go to: a [`Listener`] hands out accepted
//! connections, a [`Dialer`] opens them. The daemons listen on and dial TCP; in-process
//! tests give them the in-memory network of [`crate::memory`] instead (feature
//! `test-util`), so that a whole daemon runs on paused time with no socket at all.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// Bound, listening, and handing out connections with their peers' addresses.
pub trait Listener: Send + Sync + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection and its peer's address. A failed accept is the listener's own to
    /// retry: this only ever returns a connection.
    fn accept(&self) -> impl Future<Output = (Self::Io, SocketAddr)> + Send;

    /// The address bound (with the port the kernel chose for port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Sends small writes at once (`TCP_NODELAY`) where the transport has such a thing: a
    /// small gRPC answer waiting for the peer's delayed ACK costs ~40 ms.
    fn set_nodelay(io: &Self::Io) -> io::Result<()>;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    fn accept(&self) -> impl Future<Output = (TcpStream, SocketAddr)> + Send {
        accept(self)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }

    fn set_nodelay(io: &TcpStream) -> io::Result<()> {
        io.set_nodelay(true)
    }
}

/// The next connection on `listener`. A failed accept (out of file descriptors and the like)
/// is logged and retried after a pause instead of spinning.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connection a [`Dialer`] opened.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A connection being opened.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>>;

/// Opens connections to addresses.
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    fn dial(&self, addr: SocketAddr) -> Dialing;
}

/// TCP, with `TCP_NODELAY`: what the agent dials the servers with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

impl Dialer for Tcp {
    fn dial(&self, addr: SocketAddr) -> Dialing {
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp) as Box<dyn Io>)
        })
    }
}

/// Writes where a daemon listens to `path`, `NAME ADDRESS` one a line (the name of each
/// listener's flag, without dashes in front), atomically: written beside it, then renamed
/// over it, so a reader sees no file or the whole file. With port 0 in a listen flag, this
/// is how whoever started the daemon learns its ports, with no race for a free port.
pub fn write_address_file(path: &Path, addresses: &[(&str, SocketAddr)]) -> io::Result<()> {
    let text: String = addresses
        .iter()
        .map(|(name, addr)| format!("{name} {addr}\n"))
        .collect();
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

/// The addresses of a file [`write_address_file`] wrote, by name; lines that do not parse
/// are left out.
pub fn read_address_file(text: &str) -> BTreeMap<String, SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let (name, addr) = line.split_once(' ')?;
            Some((name.to_string(), addr.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_file_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("addresses");
        let listen: SocketAddr = "127.0.0.1:41000".parse().expect("addr");
        let health: SocketAddr = "[::1]:41001".parse().expect("addr");
        write_address_file(&path, &[("listen", listen), ("health-listen", health)])
            .expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "listen 127.0.0.1:41000\nhealth-listen [::1]:41001\n");
        let read = read_address_file(&text);
        assert_eq!(read.get("listen"), Some(&listen));
        assert_eq!(read.get("health-listen"), Some(&health));
        // Nothing but the file itself is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("addresses")]);
    }

    #[tokio::test]
    async fn a_tcp_listener_on_port_zero_says_its_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = Listener::local_addr(&listener).expect("addr");
        assert_ne!(addr.port(), 0);
        let (client, (_, peer)) =
            tokio::join!(TcpStream::connect(addr), Listener::accept(&listener));
        assert_eq!(peer, client.expect("connects").local_addr().expect("addr"));
    }
}
