//! The agent's TLS dialler: a connector for tonic channels that opens TCP to one server
//! replica and makes the handshake with the client configuration current at that moment
//! (see [`crate::rotate`]), checking the server's certificate against one name.
//!
//! tonic applies its own TLS to `https://` endpoints only, so channels using this connector
//! are built on an `http://ADDRESS` endpoint: the scheme only tells tonic not to add a
//! second TLS layer; every byte on the wire is inside this connector's TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::client::TlsStream;

use crate::net::{Dialer, Io, Tcp};
use crate::rotate::Rotating;

/// Dials one server address with mutual TLS, over TCP unless told otherwise
/// ([`TlsConnector::over`]).
#[derive(Clone)]
pub struct TlsConnector {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<Rotating<ClientConfig>>,
    dialer: Arc<dyn Dialer>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("dialer", &self.dialer)
            .finish_non_exhaustive()
    }
}

/// Why a name cannot be checked against a certificate.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a DNS name or IP address a certificate can name")]
pub struct BadServerName(String);

impl TlsConnector {
    /// A connector to `addr` that expects the server's certificate to name `server_name`.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<Rotating<ClientConfig>>,
    ) -> Result<TlsConnector, BadServerName> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| BadServerName(server_name.to_string()))?;
        Ok(TlsConnector {
            addr,
            server_name,
            tls,
            dialer: Arc::new(Tcp),
        })
    }

    /// The same connector, opening its connections with `dialer` instead of TCP (an
    /// in-process test's in-memory network).
    pub fn over(self, dialer: Arc<dyn Dialer>) -> TlsConnector {
        TlsConnector { dialer, ..self }
    }
}

impl tonic::codegen::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<Box<dyn Io>>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let server_name = self.server_name.clone();
        let connector = tokio_rustls::TlsConnector::from(self.tls.current());
        let dialing = self.dialer.dial(self.addr);
        Box::pin(async move {
            let io = dialing.await?;
            let tls = connector.connect(server_name, io).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
