//! podiam's servers as the plugin reaches them: over the same mutual TLS and with the same
//! `--server` URLs as the agent.
//!
//! The replicas come from the agent's own [`ServerSet`] (`podiam_agent::replicas`): every URL
//! is resolved once and each address found is a replica, dialled with
//! [`podiam_proto::connect::TlsConnector`] and the client configuration of
//! [`podiam_proto::tls::client_config`], loaded once and checked
//! ([`podiam_proto::rotate::Rotating::load`]: a certificate that is expired or does not match
//! its key is one clear error, not a handshake failure). The set's failover and health loops
//! are for a long-running agent; a command asks each replica itself:
//!
//! - [`Servers::explain`] asks every replica's `Health` at once and the ready ones' `Explain`
//!   in turn: a replica that has not synced would call every pod unknown.
//! - [`Servers::statuses`] asks every replica's `Status` at once.
//!
//! Each command's calls together are bounded by `--server-timeout`: resolving, health and the
//! calls share one deadline, so a command never waits for the servers longer than that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use podiam_agent::replicas::{Replica, ServerSet, Target};
use podiam_agent::upstream::UpstreamError;
use podiam_proto::rotate::Rotating;
use podiam_proto::tls::TlsFiles;
use podiam_proto::v1::{
    ExplainRequest, ExplainResponse, HealthRequest, HealthResponse, StatusRequest, StatusResponse,
};

use crate::cli::ServerArgs;
use crate::error::Error;

/// The replicas behind the `--server` URLs.
#[derive(Debug)]
pub struct Servers {
    set: ServerSet,
    urls: Vec<String>,
    deadline: Duration,
}

/// One replica's answer, or what went wrong asking it.
pub type Answer<T> = (SocketAddr, Result<T, String>);

impl Servers {
    /// The servers `args` name, with their TLS files loaded and checked; `None` when no
    /// `--server` was given. Usage errors for URLs that are not `https://HOST:PORT` and for
    /// missing TLS files.
    pub fn from_args(args: &ServerArgs) -> Result<Option<Servers>, Error> {
        if args.server.is_empty() {
            return Ok(None);
        }
        let mut targets = Vec::new();
        for url in &args.server {
            let target = Target::parse(url).ok_or_else(|| {
                Error::Usage(format!(
                    "--server {url:?} must be an https:// URL (the servers speak mutual TLS only)"
                ))
            })?;
            let name = args
                .server_name
                .clone()
                .unwrap_or_else(|| target.host.clone());
            targets.push((target, name));
        }
        let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key)
        else {
            return Err(Error::Usage(
                "--server needs --tls-ca, --tls-cert and --tls-key (the agent's certificate \
                 works: Secret podiam-agent-tls)"
                    .into(),
            ));
        };
        let tls = Rotating::load(
            TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            podiam_proto::tls::client_config,
        )
        .map_err(Error::Tls)?;
        Ok(Some(Servers {
            set: ServerSet::new(
                targets,
                Arc::new(tls),
                args.server_timeout,
                prometheus_client::metrics::counter::Counter::default(),
            ),
            urls: args.server.clone(),
            deadline: args.server_timeout,
        }))
    }

    /// The URLs as given, for messages.
    pub fn urls(&self) -> String {
        self.urls.join(", ")
    }

    /// Resolves the URLs into replicas (once), by `until`.
    async fn replicas(&self, until: Instant) -> Result<Arc<Vec<Arc<Replica>>>, String> {
        match tokio::time::timeout_at(until, self.set.resolve()).await {
            // Addresses whose dialler cannot be made (a --server-name no certificate can
            // carry) are left out of the set.
            Ok(Ok(())) if self.set.replicas().is_empty() => Err(format!(
                "{} resolved to no usable replica (is --server-name a DNS name?)",
                self.urls()
            )),
            Ok(Ok(())) => Ok(self.set.replicas()),
            Ok(Err(error)) => Err(format!("{} did not resolve: {error}", self.urls())),
            Err(_) => Err(format!(
                "{} did not resolve within {:?}",
                self.urls(),
                self.deadline
            )),
        }
    }

    /// One call, answered by `until`, its failure in words.
    async fn ask<T>(
        &self,
        until: Instant,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        match tokio::time::timeout_at(until, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(UpstreamError::from(status).to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.deadline)),
        }
    }

    /// Every replica's `Health`.
    async fn health(
        &self,
        replicas: &[Arc<Replica>],
        until: Instant,
    ) -> Vec<Answer<HealthResponse>> {
        let asks = replicas.iter().map(|replica| async move {
            let answer = self
                .ask(until, replica.client().health(HealthRequest {}))
                .await;
            (replica.addr, answer)
        });
        futures::future::join_all(asks).await
    }

    /// The first ready replica's explanation, and which replica gave it; otherwise what each
    /// replica's problem was.
    pub async fn explain(
        &self,
        request: ExplainRequest,
    ) -> Result<(SocketAddr, ExplainResponse), Vec<String>> {
        let until = Instant::now() + self.deadline;
        let replicas = self.replicas(until).await.map_err(|e| vec![e])?;
        let mut problems = Vec::new();
        let mut ready = Vec::new();
        let health = self.health(&replicas, until).await;
        for ((addr, health), replica) in health.into_iter().zip(&*replicas) {
            match health {
                Ok(health) if health.draining => problems.push(format!("{addr}: shutting down")),
                Ok(health) if !health.synced => {
                    problems.push(format!("{addr}: caches not synced yet"))
                }
                Ok(_) => ready.push(replica),
                Err(error) => problems.push(format!("{addr}: {error}")),
            }
        }
        for replica in ready {
            match self
                .ask(until, replica.client().explain(request.clone()))
                .await
            {
                Ok(answer) => return Ok((replica.addr, answer)),
                Err(error) => problems.push(format!("{}: {error}", replica.addr)),
            }
        }
        Err(problems)
    }

    /// Every replica's `Status`, or why none could be asked.
    pub async fn statuses(&self) -> Result<Vec<Answer<StatusResponse>>, String> {
        let until = Instant::now() + self.deadline;
        let replicas = self.replicas(until).await?;
        let asks = replicas.iter().map(|replica| async move {
            let answer = self
                .ask(until, replica.client().status(StatusRequest {}))
                .await;
            (replica.addr, answer)
        });
        Ok(futures::future::join_all(asks).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(server: &[&str]) -> ServerArgs {
        ServerArgs {
            server: server.iter().map(|s| s.to_string()).collect(),
            server_name: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            server_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn no_server_means_none_is_asked() {
        assert!(matches!(Servers::from_args(&args(&[])), Ok(None)));
    }

    #[test]
    fn bad_urls_and_missing_tls_files_are_usage_errors() {
        let error = Servers::from_args(&args(&["http://a:1"])).expect_err("http");
        assert!(
            matches!(&error, Error::Usage(m) if m.contains("https://")),
            "{error}"
        );
        let error = Servers::from_args(&args(&["https://a:1"])).expect_err("no TLS");
        assert!(
            matches!(&error, Error::Usage(m) if m.contains("--tls-ca")),
            "{error}"
        );
    }
}
