//! The agent's side of the gRPC contract: calls to the server, with a deadline each, and the
//! readiness they imply.
//!
//! The channel connects lazily, so an unreachable server never stops the agent from
//! starting: it serves (answering 503), reports not-ready, and keeps retrying.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use podiam_proto::Reason;
use podiam_proto::v1::podiam_client::PodiamClient;
use podiam_proto::v1::{
    ExplainRequest, ExplainResponse, GetCredentialsRequest, GetCredentialsResponse,
    GetPodRoleRequest, GetPodRoleResponse, HealthRequest, WatchNodeRequest, explain_request,
    node_event,
};

use crate::cache::CredentialCache;
use crate::pods::PodTable;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How often readiness is re-checked against the server.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// First wait before re-opening a broken node stream; doubles up to the maximum.
const STREAM_RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between attempts to re-open the node stream.
const STREAM_RETRY_MAX: Duration = Duration::from_secs(5);
/// TCP + TLS connect deadline: well inside an SDK's 1 s budget.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why the server gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The server refused, saying why.
    #[error("{message}")]
    Refused { reason: Reason, message: String },
    /// The server could not be reached or did not answer in time.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server answered with an error podiam does not define.
    #[error("server error: {0}")]
    Other(String),
}

impl From<tonic::Status> for UpstreamError {
    fn from(status: tonic::Status) -> Self {
        if let Some(reason) = Reason::of(&status) {
            return UpstreamError::Refused {
                reason,
                message: status.message().to_string(),
            };
        }
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                UpstreamError::Unavailable(status.message().to_string())
            }
            _ => UpstreamError::Other(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

/// A lazily connected client of the podiam server.
#[derive(Debug)]
pub struct Upstream {
    client: PodiamClient<Channel>,
    node_name: String,
    ready: AtomicBool,
}

impl Upstream {
    /// Prepares the channel; nothing is dialled until the first call.
    pub fn new(
        url: &str,
        tls: ClientTlsConfig,
        timeout: Duration,
        node_name: String,
    ) -> Result<Upstream, tonic::transport::Error> {
        let channel = Endpoint::from_shared(url.to_string())?
            .tls_config(tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        Ok(Upstream {
            client: PodiamClient::new(channel),
            node_name,
            ready: AtomicBool::new(false),
        })
    }

    pub async fn pod_role(&self, ip: IpAddr) -> Result<GetPodRoleResponse, UpstreamError> {
        let request = GetPodRoleRequest {
            ip: ip.to_string(),
            node_name: self.node_name.clone(),
        };
        Ok(self
            .client
            .clone()
            .get_pod_role(request)
            .await?
            .into_inner())
    }

    pub async fn credentials(
        &self,
        ip: IpAddr,
        role_name: &str,
    ) -> Result<GetCredentialsResponse, UpstreamError> {
        let request = GetCredentialsRequest {
            ip: ip.to_string(),
            role_name: role_name.to_string(),
            node_name: self.node_name.clone(),
        };
        Ok(self
            .client
            .clone()
            .get_credentials(request)
            .await?
            .into_inner())
    }

    /// The server's explanation of what it knows about `ip`.
    pub async fn explain_ip(&self, ip: IpAddr) -> Result<ExplainResponse, UpstreamError> {
        let request = ExplainRequest {
            target: Some(explain_request::Target::Ip(ip.to_string())),
        };
        Ok(self.client.clone().explain(request).await?.into_inner())
    }

    /// The node this agent serves.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Whether the last health check found a synced server.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Checks the server's health every few seconds until `shutdown`, logging changes.
    pub async fn watch_health(&self, shutdown: CancellationToken) {
        loop {
            let healthy = match self.client.clone().health(HealthRequest {}).await {
                Ok(response) if response.get_ref().synced => Ok(()),
                Ok(_) => Err("server has not synced its caches yet".to_string()),
                Err(status) => Err(UpstreamError::from(status).to_string()),
            };
            let was = self.ready.swap(healthy.is_ok(), Ordering::AcqRel);
            match (&healthy, was) {
                (Ok(()), false) => tracing::info!("server reachable: ready"),
                (Err(why), true) => tracing::warn!(%why, "server unreachable: not ready"),
                (Err(why), false) => tracing::debug!(%why, "server still unreachable"),
                (Ok(()), true) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            }
        }
    }
}

impl Upstream {
    /// Follows the server's stream of this node's pods into `table` until `shutdown`,
    /// dropping cached credentials of every pod whose decision changes. A broken stream marks
    /// the table unsynced (requests then ask the server directly) and is re-opened with
    /// backoff; each new stream starts with a full snapshot that replaces the table.
    pub async fn follow_node(
        &self,
        table: &PodTable,
        cache: &CredentialCache,
        shutdown: CancellationToken,
    ) {
        let mut retry = STREAM_RETRY_MIN;
        loop {
            let request = WatchNodeRequest {
                node_name: self.node_name.clone(),
            };
            let mut client = self.client.clone();
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                opened = client.watch_node(request) => opened,
            };
            match opened {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let mut snapshot = Some(Vec::new());
                    loop {
                        let message = tokio::select! {
                            () = shutdown.cancelled() => return,
                            message = stream.message() => message,
                        };
                        let event = match message {
                            Ok(Some(message)) => message.event,
                            Ok(None) => {
                                tracing::warn!(
                                    "node stream ended; answering from the server until it is back"
                                );
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(error = %UpstreamError::from(status), "node stream broke; answering from the server until it is back");
                                break;
                            }
                        };
                        match (event, snapshot.as_mut()) {
                            (Some(node_event::Event::Upsert(state)), Some(pods)) => {
                                pods.push(state)
                            }
                            (Some(node_event::Event::Upsert(state)), None) => {
                                if let Some(uid) = table.update(|t| t.upsert(state)) {
                                    cache.forget(&uid);
                                }
                            }
                            (Some(node_event::Event::DeleteUid(uid)), Some(pods)) => {
                                pods.retain(|p| p.pod.as_ref().is_none_or(|r| r.uid != uid));
                            }
                            (Some(node_event::Event::DeleteUid(uid)), None) => {
                                table.update(|t| t.remove(&uid));
                                cache.forget(&uid);
                            }
                            (Some(node_event::Event::Synced(_)), Some(_)) => {
                                let pods = snapshot.take().unwrap_or_default();
                                let count = pods.len();
                                for uid in table.update(|t| t.replace(pods)) {
                                    cache.forget(&uid);
                                }
                                retry = STREAM_RETRY_MIN;
                                tracing::info!(pods = count, "node stream synced");
                            }
                            (Some(node_event::Event::Synced(_)), None) | (None, _) => {}
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(error = %UpstreamError::from(status), "cannot open the node stream yet");
                }
            }
            table.update(|t| t.unsync());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(STREAM_RETRY_MAX);
        }
    }
}
