//! Calling mutating admission webhooks on pod creation, as the apiserver does: the async
//! side of [`super::admission`].
//!
//! [`Webhooks::admit_pod_create`] runs for every pod POSTed over HTTP, after authentication
//! and authorisation and before the store: each webhook of every
//! `MutatingWebhookConfiguration` (by name, then in order) that applies gets an
//! `AdmissionReview` about the pod as it stands, earlier webhooks' patches included, and may
//! patch it (JSON patch) or deny the creation. Nothing is locked while a webhook is called:
//! the configurations and the namespace are read (copied) from the store first.
//!
//! A call is HTTP/1.1 `POST` of JSON over TLS that trusts only the webhook's `caBundle`,
//! checks the server's name (the URL's host, or `NAME.NAMESPACE.svc` for a service) and ends
//! after `timeoutSeconds`. The emulator cannot resolve service names: a test routes a service
//! to an address with [`Webhooks::route_service`], and an unrouted service is a failed call.
//! A failed call (no connection, TLS, timeout, a status other than 200, an answer that is not
//! a matching AdmissionReview, a patch that does not apply) rejects the creation with 500
//! InternalError under `failurePolicy: Fail`, and is skipped under `Ignore`. Every call is
//! recorded ([`Webhooks::calls`]).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::admission::{
    Endpoint, FailurePolicy, Hook, PodCreate, Verdict, apply_mutation, hooks, read_response,
    review_request,
};
use super::attributes::UserInfo;
use super::error::EmulatorError;
use super::resource::Kind;
use super::store::{ListOptions, Store};

/// How many calls the call log keeps.
const CALL_LOG_CAPACITY: usize = 10_000;

/// The largest answer read from a webhook.
const MAX_RESPONSE_BYTES: usize = 3 * 1024 * 1024;

/// What one webhook call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The webhook allowed the creation; `patched` when it sent a JSON patch (applied).
    Allowed {
        /// Whether a patch was applied.
        patched: bool,
    },
    /// The webhook denied the creation with this status code and message.
    Denied {
        /// The HTTP status code the client got.
        code: u16,
        /// The message the client got.
        message: String,
    },
    /// The call failed (`error`: `failed calling webhook "NAME": why`); `ignored` under
    /// `failurePolicy: Ignore` (the creation went on), else the creation was rejected.
    Failed {
        /// Why.
        error: String,
        /// Whether the failure was ignored.
        ignored: bool,
    },
}

/// One call of a mutating admission webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCall {
    /// The `MutatingWebhookConfiguration`'s name.
    pub configuration: String,
    /// The webhook's name.
    pub webhook: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name ("" when it has only a `generateName`).
    pub pod: String,
    /// What came of it.
    pub outcome: WebhookOutcome,
}

/// Service routes and the call log.
#[derive(Debug, Default)]
pub struct Webhooks {
    routes: Mutex<HashMap<(String, String, u16), SocketAddr>>,
    calls: Mutex<VecDeque<WebhookCall>>,
}

impl Webhooks {
    /// Sends calls to service `namespace/name` port `port` to `addr`.
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, addr: SocketAddr) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.to_string(), name.to_string(), port), addr);
    }

    /// The calls made so far (the most recent 10 000), oldest first.
    pub fn calls(&self) -> Vec<WebhookCall> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.iter().cloned().collect()
    }

    fn record(&self, call: WebhookCall) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.len() >= CALL_LOG_CAPACITY {
            calls.pop_front();
        }
        calls.push_back(call);
    }

    /// Runs the mutating webhooks for a pod CREATE by `user` in `namespace` (which must
    /// exist) and returns the pod as they left it, or the error that rejects the creation.
    pub async fn admit_pod_create(
        &self,
        store: &Store,
        user: &UserInfo,
        namespace: &str,
        mut pod: Value,
        dry_run: bool,
    ) -> Result<Value, EmulatorError> {
        let namespace_labels =
            store.get(Kind::Namespace, None, namespace)?["metadata"]["labels"].clone();
        let configurations = store
            .list(
                Kind::MutatingWebhookConfiguration,
                None,
                &ListOptions::default(),
            )?
            .items;
        let request = PodCreate {
            namespace: namespace.to_string(),
            user: user.to_json(),
            dry_run,
        };
        for hook in hooks(&configurations) {
            match hook.applies_to_pod_create(&namespace_labels, &pod) {
                Ok(false) => continue,
                Ok(true) => {
                    let result = self.call(&hook, &request, &pod).await;
                    pod = self.conclude(&hook, &request, pod, result)?;
                }
                Err(why) => pod = self.conclude(&hook, &request, pod, Err(why))?,
            }
        }
        Ok(pod)
    }

    /// Records what a call came to and applies it: the patched pod, the pod unchanged, or
    /// the error that rejects the creation.
    fn conclude(
        &self,
        hook: &Hook,
        request: &PodCreate,
        pod: Value,
        result: Result<Answer, String>,
    ) -> Result<Value, EmulatorError> {
        let record = |outcome: WebhookOutcome| {
            debug!(webhook = %hook.name, outcome = ?outcome, "mutating webhook called");
            self.record(WebhookCall {
                configuration: hook.configuration.clone(),
                webhook: hook.name.clone(),
                namespace: request.namespace.clone(),
                pod: pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                outcome,
            });
        };
        match result {
            Ok(Answer::Unchanged) => {
                record(WebhookOutcome::Allowed { patched: false });
                Ok(pod)
            }
            Ok(Answer::Patched(patched)) => {
                record(WebhookOutcome::Allowed { patched: true });
                Ok(patched)
            }
            Ok(Answer::Denied {
                code,
                reason,
                message,
            }) => {
                record(WebhookOutcome::Denied {
                    code,
                    message: message.clone(),
                });
                Err(EmulatorError::Denied {
                    code,
                    reason,
                    message,
                })
            }
            Err(why) => {
                let error = format!("failed calling webhook {:?}: {why}", hook.name);
                let ignored = hook.failure_policy == FailurePolicy::Ignore;
                record(WebhookOutcome::Failed {
                    error: error.clone(),
                    ignored,
                });
                if ignored {
                    Ok(pod)
                } else {
                    Err(EmulatorError::Internal(error))
                }
            }
        }
    }

    /// Calls one webhook about `pod`: its answer (the patch applied), or why the call failed.
    async fn call(&self, hook: &Hook, request: &PodCreate, pod: &Value) -> Result<Answer, String> {
        let target = self.target(hook)?;
        let uid = fresh_uid();
        let review = review_request(&uid, request, pod);
        let answer = tokio::time::timeout(hook.timeout, post(&target, &hook.ca_bundle, &review))
            .await
            .map_err(|_| {
                format!(
                    "failed to call webhook: Post {:?}: context deadline exceeded",
                    target.url
                )
            })??;
        Ok(match read_response(&hook.name, &uid, &answer)? {
            Verdict::Allowed(None) => Answer::Unchanged,
            Verdict::Allowed(Some(operations)) => {
                Answer::Patched(apply_mutation(pod, &operations)?)
            }
            Verdict::Denied {
                code,
                reason,
                message,
            } => Answer::Denied {
                code,
                reason,
                message,
            },
        })
    }

    /// Where a call to `hook` goes.
    fn target(&self, hook: &Hook) -> Result<Target, String> {
        let timeout = format!("timeout={}s", hook.timeout.as_secs());
        match &hook.endpoint {
            None => Err("the webhook has neither a url nor a service".into()),
            Some(Endpoint::Url(url)) => Target::from_url(url, &timeout),
            Some(Endpoint::Service {
                namespace,
                name,
                port,
                path,
            }) => {
                let host = format!("{name}.{namespace}.svc");
                let path = with_query(path, &timeout);
                let url = format!("https://{host}:{port}{path}");
                let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
                let addr = routes
                    .get(&(namespace.clone(), name.clone(), *port))
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "failed to call webhook: Post {url:?}: service {namespace}/{name} \
                             port {port} is not routed (KubeEmulator::route_service)"
                        )
                    })?;
                Ok(Target {
                    connect: Connect::Addr(addr),
                    server_name: host.clone(),
                    host_header: format!("{host}:{port}"),
                    path,
                    url,
                })
            }
        }
    }
}

/// A webhook's answer, its patch applied.
#[derive(Debug)]
enum Answer {
    /// Allowed as it stands.
    Unchanged,
    /// Allowed, and the pod as patched.
    Patched(Value),
    /// Denied (see [`Verdict::Denied`]).
    Denied {
        code: u16,
        reason: String,
        message: String,
    },
}

/// Where to connect and what to ask for.
#[derive(Debug, Clone)]
struct Target {
    connect: Connect,
    /// The name the certificate must carry.
    server_name: String,
    host_header: String,
    /// Path and query.
    path: String,
    /// The whole URL, for messages.
    url: String,
}

#[derive(Debug, Clone)]
enum Connect {
    Addr(SocketAddr),
    Host(String, u16),
}

impl Target {
    /// A `https://HOST[:PORT][/PATH]` webhook URL.
    fn from_url(url: &str, timeout: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("the webhook's url {url:?} is not https"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        let bad = || format!("the webhook's url {url:?} has no usable host and port");
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(bad)?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = port.map_or(Ok(443), str::parse::<u16>).map_err(|_| bad())?;
        if host.is_empty() || host.contains('@') {
            return Err(bad());
        }
        let path = with_query(path, timeout);
        Ok(Target {
            connect: Connect::Host(host.to_string(), port),
            server_name: host.to_string(),
            host_header: authority.to_string(),
            url: format!("https://{authority}{path}"),
            path,
        })
    }
}

fn with_query(path: &str, query: &str) -> String {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}{query}")
}

/// A fresh request uid, shaped like a UUID.
fn fresh_uid() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new();
    let (a, b) = (random.hash_one(n), random.hash_one(!n));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// A TLS client configuration that trusts only `ca_bundle` (base64 of PEM certificates),
/// with the process's crypto provider (aws-lc-rs if none is installed).
fn client_tls(ca_bundle: &str) -> Result<Arc<ClientConfig>, String> {
    let pem = BASE64
        .decode(ca_bundle.trim())
        .map_err(|error| format!("the caBundle is not base64: {error}"))?;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate =
            certificate.map_err(|error| format!("the caBundle is not PEM: {error}"))?;
        roots
            .add(certificate)
            .map_err(|error| format!("the caBundle holds an unusable certificate: {error}"))?;
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS configuration: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// POSTs `review` to `target` and returns the body of a 200 answer.
async fn post(target: &Target, ca_bundle: &str, review: &Value) -> Result<Bytes, String> {
    let fail = |what: String| format!("failed to call webhook: Post {:?}: {what}", target.url);
    let tls = client_tls(ca_bundle).map_err(fail)?;
    let tcp = match &target.connect {
        Connect::Addr(addr) => TcpStream::connect(addr).await,
        Connect::Host(host, port) => TcpStream::connect((host.as_str(), *port)).await,
    }
    .map_err(|error| fail(format!("dial tcp: {error}")))?;
    let name = ServerName::try_from(target.server_name.clone())
        .map_err(|error| fail(format!("server name: {error}")))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|error| fail(format!("tls: {error}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| fail(format!("HTTP handshake: {error}")))?;
    let request = Request::post(target.path.as_str())
        .header(header::HOST, target.host_header.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .map_err(|error| fail(error.to_string()))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = drive(exchange, connection).await.map_err(fail)?;
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(fail(format!("the webhook answered {status}: {text:?}")));
    }
    Ok(body)
}

/// Runs `exchange` while driving `connection`; the connection ends when this returns.
async fn drive<T>(
    exchange: impl Future<Output = Result<T, String>>,
    connection: impl Future<Output = Result<(), hyper::Error>>,
) -> Result<T, String> {
    tokio::pin!(exchange, connection);
    tokio::select! {
        biased;
        answer = &mut exchange => answer,
        ended = &mut connection => match ended {
            // Closed after its answer (`Connection: close`): the body is already in hand.
            Ok(()) => exchange.await,
            Err(error) => Err(format!("connection: {error}")),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_and_path() {
        let target = Target::from_url("https://localhost:8443/mutate", "timeout=10s").unwrap();
        assert!(matches!(&target.connect, Connect::Host(h, 8443) if h == "localhost"));
        assert_eq!(target.server_name, "localhost");
        assert_eq!(target.path, "/mutate?timeout=10s");
        assert_eq!(target.url, "https://localhost:8443/mutate?timeout=10s");
        let v6 = Target::from_url("https://[::1]/x?a=b", "timeout=1s").unwrap();
        assert!(matches!(&v6.connect, Connect::Host(h, 443) if h == "::1"));
        assert_eq!(v6.server_name, "::1");
        assert_eq!(v6.path, "/x?a=b&timeout=1s");
        let bare = Target::from_url("https://hook.example", "timeout=1s").unwrap();
        assert_eq!(bare.path, "/?timeout=1s");
        for bad in [
            "http://localhost/x",
            "https://:80/x",
            "https://h:port/x",
            "https://u@h/",
        ] {
            assert!(Target::from_url(bad, "timeout=1s").is_err(), "{bad}");
        }
    }

    #[test]
    fn services_need_a_route() {
        let webhooks = Webhooks::default();
        let hook = Hook::from_json(
            "c",
            &serde_json::json!({"name": "a.b.c", "clientConfig": {"service":
                {"namespace": "ns", "name": "hook", "path": "/mutate"}}}),
        );
        let error = webhooks.target(&hook).unwrap_err();
        assert!(error.contains("is not routed"), "{error}");
        let addr: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        webhooks.route_service("ns", "hook", 443, addr);
        let target = webhooks.target(&hook).unwrap();
        assert!(matches!(target.connect, Connect::Addr(a) if a == addr));
        assert_eq!(target.server_name, "hook.ns.svc");
        assert_eq!(target.url, "https://hook.ns.svc:443/mutate?timeout=10s");
    }

    #[test]
    fn uids_are_fresh() {
        let uids: std::collections::BTreeSet<String> = (0..100).map(|_| fresh_uid()).collect();
        assert_eq!(uids.len(), 100);
        assert_eq!(fresh_uid().len(), 36);
    }

    #[test]
    fn ca_bundles_must_be_base64_pem() {
        assert!(client_tls("%%").unwrap_err().contains("not base64"));
        assert!(client_tls(&BASE64.encode("-----BEGIN CERTIFICATE-----\nAAAA\n")).is_err());
        // No certificates at all: a configuration that trusts nobody.
        assert!(client_tls("").is_ok());
    }
}
