//! The node's own metadata service, for allow-listed paths only (see [`crate::routes`]).
//!
//! The agent holds its own IMDSv2 token for the upstream (pods' tokens are the agent's and mean
//! nothing there) and renews it before it expires; an upstream that refuses tokens is used
//! without one. Answers are passed through with their status, capped in size.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

use crate::limit::PerAddress;

/// The TTL of the agent's own upstream token: the most EC2 allows.
const UPSTREAM_TOKEN_TTL: Duration = Duration::from_secs(21600);
/// Renew the upstream token this long before it expires.
const UPSTREAM_TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// Largest upstream answer passed on (metadata documents are a few KiB).
const MAX_UPSTREAM_BODY: usize = 64 * 1024;
/// Requests one pod may pass to the node's metadata service, a second, and at once. SDKs and
/// agents read a few documents (the region, the instance identity) at their start; a pod
/// asking in a loop would otherwise reach EC2's limit on the node's metadata traffic (1024
/// packets a second per network interface), which then throttles the node's own daemons.
const POD_REQUESTS_PER_SECOND: f64 = 10.0;
const POD_REQUESTS_BURST: f64 = 50.0;
/// The same for all the node's pods together.
const NODE_REQUESTS_PER_SECOND: f64 = 100.0;
const NODE_REQUESTS_BURST: f64 = 200.0;
/// Pods whose buckets are kept: more than a node has.
const PODS_COUNTED: usize = 4096;

/// Why the node's metadata service gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum NodeMetadataError {
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("the node's metadata service did not answer: {0}")]
    Unreachable(#[from] hyper_util::client::legacy::Error),
    #[error("reading the node's metadata answer: {0}")]
    Body(String),
}

/// A client of the node's metadata service.
pub struct NodeMetadata {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    token: Mutex<Option<(String, Instant)>>,
    /// Requests passed on, per pod and for the node ([`NodeMetadata::admit`]).
    pods: PerAddress,
    node: PerAddress,
}

impl std::fmt::Debug for NodeMetadata {
    /// The agent's token for the node's metadata service is a secret: only whether there is
    /// one is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = match self.token.try_lock() {
            Ok(slot) if slot.is_some() => "<redacted>",
            Ok(_) => "none",
            Err(_) => "<in use>",
        };
        f.debug_struct("NodeMetadata")
            .field("base", &self.base)
            .field("token", &token)
            .finish_non_exhaustive()
    }
}

impl NodeMetadata {
    /// `base` is the upstream's URL, e.g. `http://169.254.169.254`.
    pub fn new(base: &str) -> NodeMetadata {
        NodeMetadata {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: base.trim_end_matches('/').to_string(),
            token: Mutex::new(None),
            pods: PerAddress::new(POD_REQUESTS_PER_SECOND, POD_REQUESTS_BURST, PODS_COUNTED),
            node: PerAddress::new(NODE_REQUESTS_PER_SECOND, NODE_REQUESTS_BURST, 1),
        }
    }

    /// Whether the pod at `peer` may pass one more request on now: within its own rate and
    /// the node's. A request the node's limit refuses is not charged to the pod.
    pub fn admit(&self, peer: IpAddr) -> bool {
        if !self.pods.allow(peer) {
            return false;
        }
        if !self.node.allow(IpAddr::from([0, 0, 0, 0])) {
            self.pods.refund(peer);
            return false;
        }
        true
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        header: Option<(&str, &str)>,
    ) -> Result<(StatusCode, Bytes), NodeMetadataError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let response = self.client.request(request.body(Empty::new())?).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_UPSTREAM_BODY)
            .collect()
            .await
            .map_err(|e| NodeMetadataError::Body(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// Keeps `token` as the agent's upstream token (as a fetch does), for tests.
    #[cfg(test)]
    pub(crate) async fn remember_token(&self, token: &str) {
        *self.token.lock().await = Some((token.to_string(), Instant::now() + UPSTREAM_TOKEN_TTL));
    }

    /// The agent's upstream token, fetched or renewed as needed; `None` if the upstream
    /// does not issue tokens (IMDSv1 only).
    async fn token(&self) -> Result<Option<String>, NodeMetadataError> {
        let mut slot = self.token.lock().await;
        if let Some((token, renew_at)) = slot.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(Some(token.clone()));
        }
        let ttl = UPSTREAM_TOKEN_TTL.as_secs().to_string();
        let (status, body) = self
            .send(
                Method::PUT,
                "/latest/api/token",
                Some(("x-aws-ec2-metadata-token-ttl-seconds", &ttl)),
            )
            .await?;
        if status != StatusCode::OK {
            return Ok(None);
        }
        let token = String::from_utf8_lossy(&body).trim().to_string();
        *slot = Some((
            token.clone(),
            Instant::now() + UPSTREAM_TOKEN_TTL - UPSTREAM_TOKEN_MARGIN,
        ));
        Ok(Some(token))
    }

    /// GETs `path` (already normalised and allowed) from the node's metadata service.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), NodeMetadataError> {
        let token = self.token().await?;
        let header = token.as_deref().map(|t| ("x-aws-ec2-metadata-token", t));
        let (status, body) = self.send(Method::GET, path, header).await?;
        if status == StatusCode::UNAUTHORIZED && token.is_some() {
            // The upstream forgot our token (it restarted): fetch a new one, once.
            *self.token.lock().await = None;
            let token = self.token().await?;
            let header = token.as_deref().map(|t| ("x-aws-ec2-metadata-token", t));
            return self.send(Method::GET, path, header).await;
        }
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_passed_on_are_limited_per_pod_and_for_the_node() {
        let node = NodeMetadata::new("http://169.254.169.254");
        let pod = |n: u8| IpAddr::from([10, 1, 0, n]);
        let burst = (0..100).take_while(|_| node.admit(pod(1))).count();
        assert_eq!(burst as f64, POD_REQUESTS_BURST, "one pod's burst");
        assert!(node.admit(pod(2)), "another pod has its own");
        // Pods together: the node's burst (the first pod's 50, the second's 1, then more).
        let mut passed = burst + 1;
        for n in 3..10 {
            passed += (0..100).take_while(|_| node.admit(pod(n))).count();
        }
        assert_eq!(passed as f64, NODE_REQUESTS_BURST, "the node's burst");
        // The node's limit refused pod 10's requests: they were not charged to it.
        assert!(!node.admit(pod(10)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(node.admit(pod(1)), "refilled");
        let own = (0..100).take_while(|_| node.admit(pod(10))).count();
        assert_eq!(
            own as f64, POD_REQUESTS_BURST,
            "pod 10 still has its whole burst"
        );
    }
}
