//! podiam's servers as the plugin reaches them: TLS that verifies the servers, and the
//! user's own Kubernetes token on every call. No podiam key or certificate is needed.
//!
//! - **Which replicas.** Each `--server` URL (`https://HOST:PORT`) is resolved once per
//!   command, and every address found is a replica: the headless Service's name gives every
//!   ready server pod, as it does to the agent.
//! - **TLS.** Each replica is dialled with [`podiam_runtime::tls::ca_only_client_config`]: the
//!   server's certificate must chain to `--tls-ca` and name `--server-name` (else the URL's
//!   host); the plugin presents no certificate. The CA file is read and checked before
//!   anything is dialled, so a bad one is one clear error.
//! - **Who asks.** Every call carries `authorization: Bearer TOKEN`, the user's own token
//!   ([`crate::credentials`]), as sensitive metadata. The servers review it and check the
//!   user's RBAC: `Explain` of a pod needs `get pods` in its namespace, `Status` needs `list
//!   pods` cluster-wide. Their refusal is passed on as they word it ([`Asked::Refused`]).
//!   `Health` needs no token.
//!
//! A command asks each replica itself:
//!
//! - [`Servers::explain`] asks every replica's `Health` at once and the ready ones' `Explain`
//!   in turn: a replica that has not synced would call every pod unknown.
//! - [`Servers::statuses`] asks every replica's `Status` at once.
//!
//! Each command's calls together are bounded by `--server-timeout`: resolving, connecting,
//! health and the calls share one deadline, so a command never waits for the servers longer
//! than that. (Getting the user's token, like building the Kubernetes client, comes before.)

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use podiam_proto::v1::podiam_client::PodiamClient;
use podiam_proto::v1::{
    ExplainRequest, ExplainResponse, HealthRequest, HealthResponse, StatusRequest, StatusResponse,
};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cli::ServerArgs;
use crate::credentials::BearerToken;
use crate::error::Error;

/// One `--server` URL: what to resolve, on which port, and the name the certificates of the
/// replicas found must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub name: ServerName<'static>,
}

/// `HOST` and `PORT` of an `https://HOST:PORT` URL (the port defaults to 443); `None` for
/// anything else.
pub fn parse_url(url: &str) -> Option<(String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri.host()?.trim_matches(['[', ']']).to_string();
    Some((host, uri.port_u16().unwrap_or(443)))
}

/// Opens TCP to one replica and makes the TLS handshake, checking the server's certificate
/// against one name. tonic adds TLS of its own only to `https://` endpoints, so channels
/// using it are built on `http://ADDRESS`: every byte is inside this TLS.
#[derive(Clone)]
struct Dial {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: Arc<ClientConfig>,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, name) = (self.addr, self.name.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls));
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}

/// Puts the user's token on every call.
#[derive(Clone)]
struct Authorize(Option<MetadataValue<Ascii>>);

impl Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = PodiamClient<InterceptedService<Channel, Authorize>>;

/// One replica at one address.
struct Replica {
    addr: SocketAddr,
    client: Client,
}

/// The replicas behind the `--server` URLs.
pub struct Servers {
    targets: Vec<Target>,
    tls: Arc<ClientConfig>,
    urls: Vec<String>,
    deadline: Duration,
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("urls", &self.urls)
            .field("deadline", &self.deadline)
            .field("authorized", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}

/// One replica's answer, or what went wrong asking it.
pub type Answer<T> = (SocketAddr, Result<T, Asked>);

/// Why a replica gave no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Asked {
    /// It refused the caller (`Unauthenticated`, `PermissionDenied`): its words, which name
    /// the permission missing. Every replica checks the same way.
    #[error("{0}")]
    Refused(String),
    /// Anything else: unreachable, too slow, not ready, an error.
    #[error("{0}")]
    Failed(String),
}

/// Why no replica explained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoExplanation {
    /// A replica refused the caller: no other would answer otherwise.
    Refused(String),
    /// What each replica's problem was.
    Unanswered(Vec<String>),
}

impl Servers {
    /// The servers `args` name, with the CA loaded and checked; `None` when no `--server` was
    /// given. Usage errors for URLs that are not `https://HOST:PORT`, a server name no
    /// certificate can carry, and a missing `--tls-ca`.
    pub fn from_args(args: &ServerArgs) -> Result<Option<Servers>, Error> {
        if args.server.is_empty() {
            return Ok(None);
        }
        let mut targets = Vec::new();
        for url in &args.server {
            let (host, port) = parse_url(url).ok_or_else(|| {
                Error::Usage(format!(
                    "--server {url:?} must be an https:// URL (the servers speak TLS only)"
                ))
            })?;
            let name = args.server_name.clone().unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                Error::Usage(format!(
                    "{name:?} is not a DNS name or IP address a certificate can name \
                     (--server-name, or the --server URL's host)"
                ))
            })?;
            targets.push(Target { host, port, name });
        }
        let Some(ca) = &args.tls_ca else {
            return Err(Error::Usage(
                "--server needs --tls-ca, the CA certificate the servers' certificates chain \
                 to (ca.crt of Secret podiam-server-tls)"
                    .into(),
            ));
        };
        let tls = podiam_runtime::tls::ca_only_client_config(ca).map_err(Error::Tls)?;
        Ok(Some(Servers {
            targets,
            tls: Arc::new(tls),
            urls: args.server.clone(),
            deadline: args.server_timeout,
            authorization: None,
        }))
    }

    /// The same servers, every call carrying `token`.
    pub fn with_token(mut self, token: &BearerToken) -> Result<Servers, Error> {
        let value = token.authorization().ok_or_else(|| {
            Error::Credentials(crate::credentials::CredentialError::Failed(
                "the token is not a valid gRPC metadata value".into(),
            ))
        })?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// The URLs as given, for messages.
    pub fn urls(&self) -> String {
        self.urls.join(", ")
    }

    /// Resolves the URLs into replicas, by `until`. An error only when nothing resolved.
    async fn replicas(&self, until: Instant) -> Result<Vec<Replica>, String> {
        let resolve = async {
            let mut addrs = BTreeMap::new();
            let mut errors = Vec::new();
            for target in &self.targets {
                match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                    Ok(found) => {
                        for addr in found {
                            addrs.entry(addr).or_insert_with(|| target.name.clone());
                        }
                    }
                    Err(error) => errors.push(format!("{}: {error}", target.host)),
                }
            }
            (addrs, errors)
        };
        let (addrs, errors) = tokio::time::timeout_at(until, resolve)
            .await
            .map_err(|_| format!("{} did not resolve within {:?}", self.urls(), self.deadline))?;
        if addrs.is_empty() {
            let why = if errors.is_empty() {
                "no address found".to_string()
            } else {
                errors.join("; ")
            };
            return Err(format!("{} did not resolve: {why}", self.urls()));
        }
        for error in errors {
            tracing::warn!(%error, "a server name did not resolve; asking the others");
        }
        Ok(addrs
            .into_iter()
            .map(|(addr, name)| self.replica(addr, name))
            .collect())
    }

    /// A lazily connected client of the replica at `addr`.
    fn replica(&self, addr: SocketAddr, name: ServerName<'static>) -> Replica {
        let dial = Dial {
            addr,
            name,
            tls: Arc::clone(&self.tls),
        };
        // An address always makes a valid URI; the deadline bounds connecting and calls.
        let channel = Endpoint::from(
            http::Uri::try_from(format!("http://{addr}")).unwrap_or_else(|_| http::Uri::default()),
        )
        .tcp_nodelay(true)
        .connect_with_connector_lazy(dial);
        Replica {
            addr,
            client: PodiamClient::with_interceptor(channel, Authorize(self.authorization.clone())),
        }
    }

    /// One call, answered by `until`, its failure in words.
    async fn ask<T>(
        &self,
        until: Instant,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Asked> {
        match tokio::time::timeout_at(until, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(asked(&status)),
            Err(_) => Err(Asked::Failed(format!(
                "no answer within {:?}",
                self.deadline
            ))),
        }
    }

    /// Every replica's `Health`.
    async fn health(&self, replicas: &[Replica], until: Instant) -> Vec<Answer<HealthResponse>> {
        let asks = replicas.iter().map(|replica| async move {
            let mut client = replica.client.clone();
            let answer = self.ask(until, client.health(HealthRequest {})).await;
            (replica.addr, answer)
        });
        futures::future::join_all(asks).await
    }

    /// The first ready replica's explanation (replicas whose view is current asked before
    /// stale ones), and which replica gave it; otherwise a replica's refusal of the caller
    /// (named: one replica's word, asked only once none answered), or what each replica's
    /// problem was.
    pub async fn explain(
        &self,
        request: ExplainRequest,
    ) -> Result<(SocketAddr, ExplainResponse), NoExplanation> {
        let until = Instant::now() + self.deadline;
        let replicas = self
            .replicas(until)
            .await
            .map_err(|e| NoExplanation::Unanswered(vec![e]))?;
        let mut problems = Vec::new();
        let mut ready = Vec::new();
        let health = self.health(&replicas, until).await;
        for ((addr, health), replica) in health.into_iter().zip(&replicas) {
            match health {
                Ok(health) if health.draining => problems.push(format!("{addr}: shutting down")),
                Ok(health) if !health.synced => {
                    problems.push(format!("{addr}: caches not synced yet"))
                }
                Ok(health) => ready.push((health.stale, replica)),
                Err(error) => problems.push(format!("{addr}: {error}")),
            }
        }
        // A stale view may miss a revocation the others have seen.
        ready.sort_by_key(|(stale, _)| *stale);
        let mut refused = None;
        for (_, replica) in ready {
            let mut client = replica.client.clone();
            match self.ask(until, client.explain(request.clone())).await {
                Ok(answer) => return Ok((replica.addr, answer)),
                Err(Asked::Refused(message)) => {
                    refused.get_or_insert(format!("server {}: {message}", replica.addr));
                }
                Err(error) => problems.push(format!("{}: {error}", replica.addr)),
            }
        }
        match refused {
            Some(message) => Err(NoExplanation::Refused(message)),
            None => Err(NoExplanation::Unanswered(problems)),
        }
    }

    /// Every replica's `Status`, or why none could be asked.
    pub async fn statuses(&self) -> Result<Vec<Answer<StatusResponse>>, String> {
        let until = Instant::now() + self.deadline;
        let replicas = self.replicas(until).await?;
        let asks = replicas.iter().map(|replica| async move {
            let mut client = replica.client.clone();
            let answer = self.ask(until, client.status(StatusRequest {})).await;
            (replica.addr, answer)
        });
        Ok(futures::future::join_all(asks).await)
    }
}

/// A failed call in words: the servers' refusal of the caller as they word it; a podiam
/// refusal reason's own message; anything else with its code.
fn asked(status: &tonic::Status) -> Asked {
    let message = status.message().to_string();
    if podiam_proto::Reason::of(status).is_some() {
        return Asked::Failed(message);
    }
    Asked::Failed(match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            return Asked::Refused(message);
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            format!("server unavailable: {message}")
        }
        code => format!("server error: {code:?}: {message}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: &[&str], ca: Option<&std::path::Path>) -> ServerArgs {
        ServerArgs {
            server: server.iter().map(|s| s.to_string()).collect(),
            server_name: None,
            tls_ca: ca.map(|p| p.to_path_buf()),
            // No test here waits for it: generous, for a busy machine's TLS handshakes.
            server_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn urls_are_https_with_a_default_port() {
        assert_eq!(
            parse_url("https://podiam-server.podiam.svc:8443"),
            Some(("podiam-server.podiam.svc".into(), 8443))
        );
        assert_eq!(
            parse_url("https://10.0.0.1"),
            Some(("10.0.0.1".into(), 443))
        );
        assert_eq!(parse_url("https://[::1]:8443"), Some(("::1".into(), 8443)));
        assert_eq!(parse_url("http://podiam:8443"), None);
        assert_eq!(parse_url("podiam:8443"), None);
    }

    #[test]
    fn no_server_means_none_is_asked() {
        assert!(matches!(Servers::from_args(&args(&[], None)), Ok(None)));
    }

    #[test]
    fn bad_urls_names_and_a_missing_ca_are_usage_errors() {
        let error = Servers::from_args(&args(&["http://a:1"], None)).expect_err("http");
        assert!(
            matches!(&error, Error::Usage(m) if m.contains("https://")),
            "{error}"
        );
        let error = Servers::from_args(&args(&["https://a:1"], None)).expect_err("no CA");
        assert!(
            matches!(&error, Error::Usage(m) if m.contains("--tls-ca") && !m.contains("agent")),
            "{error}"
        );
        let mut bad_name = args(&["https://a:1"], None);
        bad_name.server_name = Some("not a name".into());
        let error = Servers::from_args(&bad_name).expect_err("name");
        assert!(
            matches!(&error, Error::Usage(m) if m.contains("--server-name")),
            "{error}"
        );
        let error = Servers::from_args(&args(
            &["https://a:1"],
            Some(std::path::Path::new("/nonexistent/ca.crt")),
        ))
        .expect_err("no CA file");
        assert!(error.one_line().contains("/nonexistent/ca.crt"), "{error}");
    }

    #[test]
    fn refusals_of_the_caller_are_kept_as_worded() {
        let denied = "\"alice\" may not get pods in namespace team-a, which this needs \
                      (give it the podiam-operator ClusterRole)";
        assert_eq!(
            asked(&tonic::Status::permission_denied(denied)),
            Asked::Refused(denied.into())
        );
        assert_eq!(
            asked(&tonic::Status::unauthenticated("bad token")),
            Asked::Refused("bad token".into())
        );
        assert_eq!(
            asked(&tonic::Status::unavailable("refused")),
            Asked::Failed("server unavailable: refused".into())
        );
        let not_ready = podiam_proto::Reason::NotReady.status("server not ready");
        assert_eq!(asked(&not_ready), Asked::Failed("server not ready".into()));
    }

    /// A podiam server of the test's own on 127.0.0.1, with the certificates podiam-certs
    /// makes: `Health` answers ready; `Explain` allows the token `good`, refuses any other
    /// as the servers word it, and wants one. It stops when the sender is dropped.
    mod fake {
        use podiam_proto::v1::podiam_server::{Podiam, PodiamServer};
        use podiam_proto::v1::*;
        use std::net::SocketAddr;
        use tonic::{Request, Response, Status};

        /// A replica: `hostile` refuses everyone; `stale` says its view is; `allowed` is its
        /// answer to a good token.
        #[derive(Clone, Copy, Default)]
        pub struct Fake {
            pub hostile: bool,
            pub stale: bool,
            pub allowed: bool,
        }

        type Nodes = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<NodeEvent, Status>> + Send + 'static>,
        >;

        #[tonic::async_trait]
        impl Podiam for Fake {
            type WatchNodeStream = Nodes;

            async fn get_pod_role(
                &self,
                _: Request<GetPodRoleRequest>,
            ) -> Result<Response<GetPodRoleResponse>, Status> {
                Err(Status::unimplemented("not here"))
            }

            async fn get_credentials(
                &self,
                _: Request<GetCredentialsRequest>,
            ) -> Result<Response<GetCredentialsResponse>, Status> {
                Err(Status::unimplemented("not here"))
            }

            async fn watch_node(
                &self,
                _: Request<WatchNodeRequest>,
            ) -> Result<Response<Nodes>, Status> {
                Err(Status::unimplemented("not here"))
            }

            async fn explain(
                &self,
                request: Request<ExplainRequest>,
            ) -> Result<Response<ExplainResponse>, Status> {
                match request.metadata().get("authorization") {
                    Some(value) if value == "Bearer good" && !self.hostile => {
                        Ok(Response::new(ExplainResponse {
                            allowed: self.allowed,
                            ..ExplainResponse::default()
                        }))
                    }
                    Some(_) => Err(Status::permission_denied(
                        "\"bob\" may not get pods in namespace team-a, which this needs \
                         (give it the podiam-operator ClusterRole)",
                    )),
                    None => Err(Status::unauthenticated("no token")),
                }
            }

            async fn status(
                &self,
                _: Request<StatusRequest>,
            ) -> Result<Response<StatusResponse>, Status> {
                Err(Status::unimplemented("not here"))
            }

            async fn node_ready(
                &self,
                _: Request<podiam_proto::v1::NodeReadyRequest>,
            ) -> Result<Response<podiam_proto::v1::NodeReadyResponse>, Status> {
                Err(Status::unimplemented("not here"))
            }

            async fn health(
                &self,
                _: Request<HealthRequest>,
            ) -> Result<Response<HealthResponse>, Status> {
                Ok(Response::new(HealthResponse {
                    version: "test".into(),
                    synced: true,
                    draining: false,
                    replica: String::new(),
                    stale: self.stale,
                }))
            }
        }

        pub async fn serve(
            files: &podiam_certs::WrittenFiles,
            fake: Fake,
        ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
            let tls = podiam_runtime::tls::TlsMaterial::from_pem(
                std::fs::read(&files.ca_cert).expect("ca"),
                std::fs::read(&files.server_cert).expect("cert"),
                std::fs::read(&files.server_key).expect("key"),
            )
            .server_config()
            .client_auth_optional(true);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let incoming = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| stream);
                Some((accepted, listener))
            });
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tonic::transport::Server::builder()
                .tls_config(tls)
                .expect("tls")
                .add_service(PodiamServer::new(fake))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                });
            // Ends when the test drops `stop`.
            tokio::spawn(server);
            (addr, stop)
        }
    }

    /// The TLS provider installed, and a CA with server certificates written to a directory
    /// kept as long as its guard.
    fn certificates() -> (tempfile::TempDir, podiam_certs::WrittenFiles) {
        podiam_runtime::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("dir");
        let files = podiam_certs::generate(&podiam_certs::CertOptions::default())
            .expect("certificates")
            .write_to(dir.path(), false)
            .expect("written");
        (dir, files)
    }

    #[tokio::test]
    async fn replicas_are_verified_by_the_ca_and_get_the_token() {
        let (_dir, files) = certificates();
        let honest = fake::Fake {
            allowed: true,
            ..fake::Fake::default()
        };
        let (addr, _stop) = fake::serve(&files, honest).await;
        let url = format!("https://{addr}");
        let request = ExplainRequest::default();

        // The right CA and name, a token: the answer.
        let servers = Servers::from_args(&args(&[&url], Some(&files.ca_cert)))
            .expect("args")
            .expect("servers")
            .with_token(&BearerToken::for_tests("good"))
            .expect("token");
        let (by, answer) = servers.explain(request.clone()).await.expect("explained");
        assert_eq!(by, addr);
        assert!(answer.allowed);

        // Another token: the server's refusal, as worded.
        let servers = Servers::from_args(&args(&[&url], Some(&files.ca_cert)))
            .expect("args")
            .expect("servers")
            .with_token(&BearerToken::for_tests("other"))
            .expect("token");
        let refused = servers.explain(request.clone()).await.expect_err("refused");
        assert!(
            matches!(&refused, NoExplanation::Refused(m) if m.contains("podiam-operator")),
            "{refused:?}"
        );

        // A name the certificate does not carry: no answer, whatever the token.
        let mut wrong_name = args(&[&url], Some(&files.ca_cert));
        wrong_name.server_name = Some("elsewhere.example".into());
        let servers = Servers::from_args(&wrong_name)
            .expect("args")
            .expect("servers")
            .with_token(&BearerToken::for_tests("good"))
            .expect("token");
        let unverified = servers.explain(request).await.expect_err("not verified");
        assert!(
            matches!(&unverified, NoExplanation::Unanswered(p) if p.len() == 1),
            "{unverified:?}"
        );
    }

    #[tokio::test]
    async fn one_replica_refusing_does_not_stop_the_others_and_current_views_go_first() {
        let (_dir, files) = certificates();
        // The replicas at `addrs`, asked with a good token.
        let explain = |addrs: &[SocketAddr]| {
            let urls: Vec<String> = addrs.iter().map(|a| format!("https://{a}")).collect();
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            let servers = Servers::from_args(&args(&urls, Some(&files.ca_cert)))
                .expect("args")
                .expect("servers")
                .with_token(&BearerToken::for_tests("good"))
                .expect("token");
            async move { servers.explain(ExplainRequest::default()).await }
        };
        // A replica that refuses everyone (asked first: its view is the current one) and an
        // honest one whose view is stale: the honest one answers.
        let hostile = fake::Fake {
            hostile: true,
            ..fake::Fake::default()
        };
        let stale = fake::Fake {
            stale: true,
            allowed: true,
            ..fake::Fake::default()
        };
        let (hostile, _h) = fake::serve(&files, hostile).await;
        let (stale_addr, _s) = fake::serve(&files, stale).await;
        let (by, answer) = explain(&[hostile, stale_addr]).await.expect("explained");
        assert_eq!(by, stale_addr);
        assert!(answer.allowed);
        // A current replica's answer is taken before a stale one's, whatever their order.
        let current = fake::Fake::default();
        let (current, _c) = fake::serve(&files, current).await;
        let (by, answer) = explain(&[stale_addr, current]).await.expect("explained");
        assert_eq!(by, current);
        assert!(!answer.allowed);
        // All refusing: the refusal, with who said it.
        let refused = explain(&[hostile]).await.expect_err("refused");
        assert!(
            matches!(&refused, NoExplanation::Refused(m) if m.starts_with(&format!("server {hostile}: "))),
            "{refused:?}"
        );
    }
}
