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
    GetCredentialsRequest, GetCredentialsResponse, GetPodRoleRequest, GetPodRoleResponse,
    HealthRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How often readiness is re-checked against the server.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
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
