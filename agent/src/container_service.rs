//! The container-credentials endpoint's answers (see [`crate::container`] for what it is):
//! the request's method and path, its token checked, the pod at the address resolved as on
//! the metadata endpoint, then credentials from the cache once the servers accepted the
//! token for that pod, else from a server call that checks it.

use std::net::IpAddr;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::Full;
use podiam_runtime::clock::now_unix;

use crate::cache::Source;
use crate::container::{PATH, PodToken, credentials_json};
use crate::decision::PodDecision;
use crate::http::{AgentRefusal, MetadataService, Refused, still_granted};
use crate::pods::Known;
use podiam_proto::Reason;

/// What the endpoint does with a request's method and path.
fn allowed(method: &Method, path: &str) -> Result<(), Refused> {
    if path != PATH {
        return Err(Refused::Denied);
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(Refused::MethodNotAllowed);
    }
    Ok(())
}

impl MetadataService {
    /// Answers one request to the container-credentials endpoint from the pod at `peer`.
    pub async fn handle_container<B>(
        &self,
        peer: IpAddr,
        request: Request<B>,
    ) -> Response<Full<Bytes>> {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            self.options.request_timeout,
            self.answer_container(peer, &request, tokio::time::Instant::now()),
        );
        let result = answer.await.unwrap_or(Err(Refused::Deadline));
        let result = result.map(|document| {
            let mut response = Response::new(Full::new(document));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        });
        self.finish(peer, "container-credentials", started, &request, result)
    }

    async fn answer_container<B>(
        &self,
        peer: IpAddr,
        request: &Request<B>,
        came: tokio::time::Instant,
    ) -> Result<Bytes, Refused> {
        allowed(request.method(), request.uri().path())?;
        crate::http::refuse_bodies(request.headers())?;
        let now = now_unix();
        let token = PodToken::from_headers(request.headers(), now).map_err(Refused::PodToken)?;
        let known = self.table.known(peer);
        self.patient(peer, came, &known, |known| {
            self.container_for(peer, &token, known, now)
        })
        .await
    }

    /// The container document for the pod at `peer` that presented `token`, as the table
    /// knows it (`known`, waited for) or else the servers do.
    async fn container_for(
        &self,
        peer: IpAddr,
        token: &PodToken,
        known: Known,
        now: i64,
    ) -> Result<Bytes, Refused> {
        match self.resolve(peer, known).await {
            Known::Pod(decision) => self.proven_credentials(peer, &decision, token, now).await,
            unlisted => {
                // No pod in the table: the servers' answer, once, for the pod they see here.
                self.admit(peer, token, now)?;
                let call = self.servers.credentials(peer, "", &token.text, 0);
                let issued =
                    self.judged(peer, token, Box::pin(self.ask(peer, &unlisted, call)).await)?;
                Ok(credentials_json(&issued.credentials).into())
            }
        }
    }

    /// The container document for the pod `decision` is about, which presented `token`:
    /// from the cache once the servers have accepted the token for this pod, else from a
    /// server call that checks it.
    async fn proven_credentials(
        &self,
        peer: IpAddr,
        decision: &PodDecision,
        token: &PodToken,
        now: i64,
    ) -> Result<Bytes, Refused> {
        let own = decision
            .role()
            .map_err(|refusal| Refused::ByServers(refusal.clone()))?;
        let pod = &decision.pod;
        // Boxed: see `MetadataService::ask`.
        let fetch = || {
            Box::pin(async {
                let issued = self
                    .servers
                    .credentials(peer, &own.name, &token.text, own.credential_key)
                    .await?;
                crate::http::kept_for(issued, pod, own)
            })
        };
        if self.cache.proven(&pod.uid, &token.digest, now) {
            let (entry, source) = self.cache.get(&pod.uid, own, now, fetch).await?;
            // The pod's role may have changed while this request waited (on its own fetch,
            // or on another request's it joined): answered only as the decision stands now.
            still_granted(&self.table.known(peer), pod, own, PodDecision::role)?;
            match source {
                Source::Cache => self.metrics.cache_hits.inc(),
                Source::Server => self.metrics.cache_misses.inc(),
            };
            return Ok(entry.container_document.clone());
        }
        // A token not proven yet for this pod: the servers check it on every such call,
        // whatever the cache holds.
        self.admit(peer, token, now)?;
        let asked = podiam_runtime::clock::since_boot_ms();
        let fetched = self
            .cache
            .unproven(&pod.uid, own, &token.digest, fetch)
            .await;
        let credentials = self.judged(peer, token, fetched)?;
        self.cache.prove(&pod.uid, token.digest, token.expires, now);
        // Kept, and answered, only as the decision stands once any fill under way for the
        // key is done (this request may have waited behind it).
        let entry = self
            .cache
            .put_if(&pod.uid, own, credentials, asked, || {
                still_granted(&self.table.known(peer), pod, own, PodDecision::role)
            })
            .await?;
        self.metrics.cache_misses.inc();
        Ok(entry.container_document.clone())
    }

    /// A call to the servers with `token`, not proven for its pod, from `peer` at `now`:
    /// refused when the address presents too many new tokens.
    fn admit(&self, peer: IpAddr, token: &PodToken, now: i64) -> Result<(), Refused> {
        if self
            .new_tokens
            .admit(peer, &token.digest, token.expires, now)
        {
            Ok(())
        } else {
            Err(Refused::TooManyNewTokens)
        }
    }

    /// `result`, the servers' answer to a call with `token` from `peer`; a token they
    /// refused, or one from an address that is no pod of this node (which no review can
    /// prove), is new again: its next call is charged to the address.
    fn judged<T>(
        &self,
        peer: IpAddr,
        token: &PodToken,
        result: Result<T, Refused>,
    ) -> Result<T, Refused> {
        let unproven = match &result {
            Err(Refused::ByServers(refusal)) => matches!(
                refusal.reason,
                Reason::PodTokenRefused | Reason::UnknownPod | Reason::OtherNode
            ),
            Err(Refused::ByAgent(AgentRefusal::UnknownPod(_) | AgentRefusal::ElsewherePod(_))) => {
                true
            }
            _ => false,
        };
        if unproven {
            self.new_tokens.forget(peer, &token.digest);
        }
        result
    }
}

/// The 404/405 the endpoint gives for anything but its one path and method, for tests.
#[cfg(test)]
fn route_status(method: &Method, path: &str) -> http::StatusCode {
    match allowed(method, path) {
        Ok(()) => http::StatusCode::OK,
        Err(refused) => refused.status(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn one_path_two_methods() {
        assert_eq!(route_status(&Method::GET, PATH), StatusCode::OK);
        assert_eq!(route_status(&Method::HEAD, PATH), StatusCode::OK);
        assert_eq!(
            route_status(&Method::POST, PATH),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for path in [
            "/",
            "/v1/credentials/",
            "/v1/credentials/x",
            "/v1//credentials",
            "/V1/credentials",
            "/latest/meta-data/",
        ] {
            assert_eq!(
                route_status(&Method::GET, path),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }
}
