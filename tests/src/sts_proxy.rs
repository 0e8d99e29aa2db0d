//! A recording, fault-injecting HTTP proxy in front of moto's STS, on loopback.
//!
//! Tests see what the server really asked STS — the signing access key (which proves role
//! chaining), the action, role ARN, session name and tags — and can make STS fail on demand
//! (503, as an overloaded STS answers) without stopping moto.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

/// One request the proxy saw.
#[derive(Clone, Default)]
pub struct StsCall {
    /// The access key ID in the request's SigV4 `Authorization` header.
    pub signed_by: String,
    /// The form parameters of the request body (Action, RoleArn, RoleSessionName, Tags…).
    pub params: Vec<(String, String)>,
    /// The status answered.
    pub status: u16,
    /// When the request arrived (its body read).
    pub received: Option<std::time::Instant>,
    /// When moto's answer had come back whole (none if it never reached moto).
    pub answered: Option<std::time::Instant>,
    /// The `AccessKeyId` in the answer, if any.
    pub issued_key: Option<String>,
    /// The `SecretAccessKey` and `SessionToken` in the answer, if any: what a test looks for
    /// where no secret may be (logs).
    pub issued_secrets: Vec<String>,
}

impl std::fmt::Debug for StsCall {
    /// Counts the issued secrets and shows none of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCall")
            .field("signed_by", &self.signed_by)
            .field("params", &self.params)
            .field("status", &self.status)
            .field("received", &self.received)
            .field("answered", &self.answered)
            .field("issued_key", &self.issued_key)
            .field("issued_secrets", &self.issued_secrets.len())
            .finish()
    }
}

impl StsCall {
    /// The first value of form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The session tags, as (key, value) pairs in order.
    pub fn tags(&self) -> Vec<(String, String)> {
        (1..)
            .map_while(|n| {
                let key = self.param(&format!("Tags.member.{n}.Key"))?;
                let value = self.param(&format!("Tags.member.{n}.Value"))?;
                Some((key.to_string(), value.to_string()))
            })
            .collect()
    }
}

/// The proxy; stops when dropped.
#[derive(Debug)]
pub struct StsProxy {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<StsCall>>>,
    failing: Arc<AtomicBool>,
    /// How far STS's clock reads from this host's (seconds; negative: behind).
    clock_offset: Arc<AtomicI64>,
    stop: CancellationToken,
}

impl Drop for StsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StsProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream` (moto).
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<StsProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let clock_offset = Arc::new(AtomicI64::new(0));
        let stop = CancellationToken::new();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let handler = {
            let calls = Arc::clone(&calls);
            let failing = Arc::clone(&failing);
            let clock_offset = Arc::clone(&clock_offset);
            move |_, request: http::Request<hyper::body::Incoming>| {
                let calls = Arc::clone(&calls);
                let failing = failing.load(Ordering::SeqCst);
                let offset = clock_offset.load(Ordering::SeqCst);
                let client = client.clone();
                async move {
                    let (call, mut response) = forward(client, upstream, request, failing).await;
                    if offset != 0 {
                        shift_clock(&mut response, offset).await;
                    }
                    calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
                    response
                }
            }
        };
        tokio::spawn(podiam_runtime::serve::serve_http(
            listener,
            podiam_runtime::serve::Limits::default(),
            handler,
            stop.clone(),
        ));
        Ok(StsProxy {
            addr,
            calls,
            failing,
            clock_offset,
            stop,
        })
    }

    /// The URL to give the server as `--sts-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far.
    pub fn calls(&self) -> Vec<StsCall> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The AssumeRole requests seen so far.
    pub fn assume_role_calls(&self) -> Vec<StsCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.param("Action") == Some("AssumeRole"))
            .collect()
    }

    /// While set, every request is answered 503 without reaching moto.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes STS's clock read `seconds` from this host's (negative: behind) in what it
    /// answers: the `Date` header and the credentials' `Expiration`, as a real STS's would
    /// to a server whose clock is off.
    pub fn set_sts_clock_offset(&self, seconds: i64) {
        self.clock_offset.store(seconds, Ordering::SeqCst);
    }
}

/// `response` as STS would answer with its clock `offset` seconds from this host's: a `Date`
/// of its time, and `Expiration`s moved by `offset`.
async fn shift_clock(response: &mut http::Response<Full<Bytes>>, offset: i64) {
    let shift = jiff::SignedDuration::from_secs(offset);
    let sts_now = jiff::Timestamp::now() + shift;
    let date = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&sts_now)
        .unwrap_or_default();
    if let Ok(date) = http::HeaderValue::from_str(&date) {
        response.headers_mut().insert(http::header::DATE, date);
    }
    let body = std::mem::replace(response.body_mut(), Full::new(Bytes::new()));
    let text = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let mut shifted = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find("<Expiration>") {
        let start = start + "<Expiration>".len();
        let Some(end) = rest[start..].find("</Expiration>") else {
            break;
        };
        shifted.push_str(&rest[..start]);
        match rest[start..start + end].parse::<jiff::Timestamp>() {
            Ok(at) => shifted.push_str(&(at + shift).to_string()),
            Err(_) => shifted.push_str(&rest[start..start + end]),
        }
        rest = &rest[start + end..];
    }
    shifted.push_str(rest);
    *response.body_mut() = Full::new(Bytes::from(shifted));
}

async fn forward(
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    upstream: SocketAddr,
    request: http::Request<hyper::body::Incoming>,
    failing: bool,
) -> (StsCall, http::Response<Full<Bytes>>) {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut call = StsCall {
        signed_by: signing_key(&parts.headers),
        params: parse_form(&body),
        received: Some(std::time::Instant::now()),
        ..StsCall::default()
    };
    let respond = |status: u16, body: Bytes| {
        let mut response = http::Response::new(Full::new(body));
        *response.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        response
    };
    if failing {
        call.status = 503;
        let body = "<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code>\
                    <Message>injected by the test</Message></Error></ErrorResponse>";
        return (call, respond(503, Bytes::from(body)));
    }
    let uri = format!(
        "http://{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut upstream_request = http::Request::new(Full::new(body));
    *upstream_request.method_mut() = parts.method;
    *upstream_request.headers_mut() = parts.headers;
    match uri.parse() {
        Ok(uri) => *upstream_request.uri_mut() = uri,
        Err(_) => return (call, respond(502, Bytes::new())),
    }
    let Ok(answer) = client.request(upstream_request).await else {
        call.status = 502;
        return (call, respond(502, Bytes::new()));
    };
    let status = answer.status().as_u16();
    let body = answer
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    call.status = status;
    call.answered = Some(std::time::Instant::now());
    call.issued_key = between(&body, "<AccessKeyId>", "</AccessKeyId>");
    call.issued_secrets = [
        ("<SecretAccessKey>", "</SecretAccessKey>"),
        ("<SessionToken>", "</SessionToken>"),
    ]
    .into_iter()
    .filter_map(|(open, close)| between(&body, open, close))
    .collect();
    (call, respond(status, body))
}

/// The access key ID of a SigV4 `Authorization: AWS4-HMAC-SHA256 Credential=AKID/…` header.
fn signing_key(headers: &http::HeaderMap) -> String {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|v| v.split('/').next())
        .unwrap_or_default()
        .to_string()
}

fn between(body: &[u8], open: &str, close: &str) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(text[start..end].to_string())
}

/// An `application/x-www-form-urlencoded` body as (name, value) pairs.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_tags_are_read() {
        let call = StsCall {
            params: parse_form(
                b"Action=AssumeRole&RoleSessionName=team-a.web&Tags.member.1.Key=kubernetes-namespace\
                  &Tags.member.1.Value=team-a&Tags.member.2.Key=k&Tags.member.2.Value=a%2Fb+c",
            ),
            ..StsCall::default()
        };
        assert_eq!(call.param("RoleSessionName"), Some("team-a.web"));
        assert_eq!(
            call.tags(),
            [
                ("kubernetes-namespace".to_string(), "team-a".to_string()),
                ("k".into(), "a/b c".into())
            ]
        );
    }
}
