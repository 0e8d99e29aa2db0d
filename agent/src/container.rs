//! The container-credentials endpoint: `GET http://169.254.170.23/v1/credentials`, the
//! address and path AWS SDKs' container credential provider asks when
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` names it (EKS Pod Identity's address).
//!
//! The pod proves itself twice: by the address it connects from (the pod table's pod, as on
//! the metadata endpoint) and by its projected ServiceAccount token, sent raw in
//! `Authorization` (the SDKs read it from `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`). The
//! servers check the token with a TokenReview and give the role only if it is bound to the
//! very pod at the address. The agent checks first what it can without asking anyone (a
//! token at all, its size, its shape, its expiry), and remembers each token the servers
//! accepted for a pod until the token expires, so that a pod proves itself once per token
//! (see [`crate::cache`]).
//!
//! Answers are those of the EKS Pod Identity Agent, which every SDK handles: the JSON
//! document below on success, a one-line `text/plain` error otherwise — 400 for a token that
//! proves nothing, 404 for a pod without a role, 403 for a role the namespace does not
//! permit, 503 while no server answers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use http::{HeaderMap, header};
use podiam_proto::v1::Credentials;

use crate::imds::{account_of, utc_timestamp};
use crate::limit::PerAddress;

/// New tokens one address may present to the servers, per second: each costs the servers a
/// TokenReview at the API server (one per token: concurrent reviews of a token share one
/// request, and the answer is cached). A pod has one token per container, renewed about
/// hourly by the kubelet; a flood of made-up tokens is what this stops.
const NEW_TOKENS_PER_SECOND: f64 = 2.0;
/// How many new tokens one address may present at once.
const NEW_TOKENS_BURST: f64 = 8.0;
/// Addresses remembered by [`NewTokens`]: more than a node has pods.
const NEW_TOKENS_ADDRESSES: usize = 4096;
/// Tokens remembered per address ([`NewTokens::admit`]): a pod has one per container that
/// asks.
const TOKENS_PER_ADDRESS: usize = 16;
/// The longest a token is remembered, whatever expiry it claims: the agent reads `exp` from
/// a token nobody has checked yet, and a made-up one may claim the year 3000. A real token
/// that outlives this is charged once more, then remembered again.
const REMEMBERED_AT_MOST: i64 = 3600;

/// The limit on new tokens: a token bucket per peer address, charged once per token the
/// address presents, not once per call. A token the address presented before (and the
/// servers did not refuse) is not new: however many of the pod's processes present it at
/// once, at its start or while the agent's pod table is not synced (every call then goes to
/// the servers), none is refused 429 for it — which the Rust SDK does not retry.
#[derive(Debug)]
pub struct NewTokens {
    buckets: PerAddress,
    admitted: Mutex<Admitted>,
}

impl Default for NewTokens {
    fn default() -> NewTokens {
        NewTokens {
            buckets: PerAddress::new(
                NEW_TOKENS_PER_SECOND,
                NEW_TOKENS_BURST,
                NEW_TOKENS_ADDRESSES,
            ),
            admitted: Mutex::default(),
        }
    }
}

/// By address: digests of the tokens admitted, and when each expires (Unix seconds).
type Admitted = HashMap<IpAddr, Vec<(TokenDigest, i64)>>;

/// Whether `peer`'s token `digest` is admitted and unexpired at `now`.
fn holds(admitted: &Admitted, peer: IpAddr, digest: &TokenDigest, now: i64) -> bool {
    admitted
        .get(&peer)
        .is_some_and(|tokens| tokens.iter().any(|(d, until)| d == digest && *until > now))
}

/// Remembers `peer`'s token `digest`, expiring at `expires` ([`REMEMBERED_AT_MOST`] from
/// `now` at the latest): per address the soonest to expire gives way; with every address
/// slot held by unexpired tokens, nothing is.
fn remember(admitted: &mut Admitted, peer: IpAddr, digest: TokenDigest, expires: i64, now: i64) {
    let expires = expires.min(now.saturating_add(REMEMBERED_AT_MOST));
    if admitted.len() >= NEW_TOKENS_ADDRESSES && !admitted.contains_key(&peer) {
        admitted.retain(|_, tokens| {
            tokens.retain(|(_, until)| *until > now);
            !tokens.is_empty()
        });
        if admitted.len() >= NEW_TOKENS_ADDRESSES {
            return;
        }
    }
    let tokens = admitted.entry(peer).or_default();
    tokens.retain(|(d, until)| *until > now && *d != digest);
    if tokens.len() >= TOKENS_PER_ADDRESS
        && let Some(soonest) = (0..tokens.len()).min_by_key(|i| tokens[*i].1)
    {
        tokens.swap_remove(soonest);
    }
    tokens.push((digest, expires));
}

impl NewTokens {
    /// Whether a call from `peer` with the token `digest` (expiring at `expires`) may go to
    /// the servers at `now`: at once if the address presented that token before; else if
    /// its bucket has room, which the token takes, and it is remembered. Bounded: per
    /// address the soonest to expire gives way, and with every address slot held by tokens
    /// still valid, a new address's token is admitted but not remembered (its next call is
    /// charged again).
    pub fn admit(&self, peer: IpAddr, digest: &TokenDigest, expires: i64, now: i64) -> bool {
        // One lock across the look, the charge and the remembering: calls racing with one
        // new token charge the bucket once.
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        if holds(&admitted, peer, digest, now) {
            return true;
        }
        if !self.allow(peer) {
            return false;
        }
        remember(&mut admitted, peer, *digest, expires, now);
        true
    }

    /// The servers refused the token `digest` from `peer`, or `peer` is no pod of this node:
    /// a call with it is new again.
    pub fn forget(&self, peer: IpAddr, digest: &TokenDigest) {
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tokens) = admitted.get_mut(&peer) {
            tokens.retain(|(d, _)| d != digest);
            if tokens.is_empty() {
                admitted.remove(&peer);
            }
        }
    }

    /// Takes one from `peer`'s bucket; false when it is empty.
    fn allow(&self, peer: IpAddr) -> bool {
        self.buckets.allow(peer)
    }
}

/// A pod token's SHA-256: what the agent keeps of it.
pub type TokenDigest = [u8; 32];

/// The one path served.
pub const PATH: &str = "/v1/credentials";

/// Longest token accepted: projected tokens are about 1 KiB (the servers accept 16 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How far in the future a token's `nbf` may be: the API server's clock and the node's may
/// differ a little.
const NOT_BEFORE_LEEWAY: i64 = 60;

/// The success document, in the EKS Pod Identity Agent's key order:
/// `AccessKeyId`, `SecretAccessKey`, `Token`, `AccountId` (when the role's ARN names an
/// account), `Expiration` (RFC 3339 in UTC ending in `Z`: the JS and Rust SDKs accept no
/// other offset).
pub fn credentials_json(credentials: &Credentials) -> String {
    let string = |value: &str| serde_json::Value::from(value).to_string();
    let account = account_of(&credentials.role_arn)
        .map(|account| format!(",\"AccountId\":{}", string(account)))
        .unwrap_or_default();
    format!(
        "{{\"AccessKeyId\":{},\"SecretAccessKey\":{},\"Token\":{}{account},\"Expiration\":{}}}",
        string(&credentials.access_key_id),
        string(&credentials.secret_access_key),
        string(&credentials.session_token),
        string(&utc_timestamp(credentials.expiration_unix)),
    )
}

/// A pod token as presented, checked for what can be checked without its signature.
pub struct PodToken {
    /// The token itself, sent on to the servers.
    pub text: String,
    /// Its SHA-256: what the agent remembers of it.
    pub digest: TokenDigest,
    /// Its `exp`, seconds since the Unix epoch.
    pub expires: i64,
}

impl std::fmt::Debug for PodToken {
    /// The token is a credential: shown by its expiry only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodToken")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Why a request's `Authorization` is not a pod token worth asking the servers about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error(
        "no pod token: send the pod's projected service account token in Authorization \
         (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)"
    )]
    Missing,
    #[error("the pod token is over {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the pod token is not a JWT: {0}")]
    Malformed(&'static str),
    #[error("the pod token has expired")]
    Expired,
    #[error("the pod token is not valid yet")]
    NotYetValid,
}

impl PodToken {
    /// The token in `headers`' `Authorization`, as the SDKs send it: the JWT itself, with no
    /// scheme, checked for size, shape and time at `now`.
    pub fn from_headers(headers: &HeaderMap, now: i64) -> Result<PodToken, TokenProblem> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (None, _) => return Err(TokenProblem::Missing),
            (Some(_), Some(_)) => {
                return Err(TokenProblem::Malformed(
                    "more than one Authorization header",
                ));
            }
            (Some(value), None) => value,
        };
        if value.is_empty() {
            return Err(TokenProblem::Missing);
        }
        if value.len() > MAX_TOKEN_BYTES {
            return Err(TokenProblem::TooLong);
        }
        let text = value
            .to_str()
            .map_err(|_| TokenProblem::Malformed("not printable ASCII"))?;
        if text.starts_with("Bearer ") || text.starts_with("bearer ") {
            return Err(TokenProblem::Malformed(
                "send the token itself, without a Bearer scheme",
            ));
        }
        let (expires, not_before) = times(text)?;
        if expires <= now {
            return Err(TokenProblem::Expired);
        }
        if not_before.is_some_and(|nbf| nbf > now + NOT_BEFORE_LEEWAY) {
            return Err(TokenProblem::NotYetValid);
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Ok(PodToken {
            text: text.to_string(),
            digest: bytes,
            expires,
        })
    }
}

/// A JWT's `exp` (required) and `nbf` (optional), read without checking its signature: the
/// API server checks that.
fn times(token: &str) -> Result<(i64, Option<i64>), TokenProblem> {
    // Only the spelling the API server issues: each other spelling of the same token would
    // be reviewed, and remembered, as a token of its own.
    let payload = podiam_runtime::jwt::payload(token).map_err(TokenProblem::Malformed)?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|_| TokenProblem::Malformed("the payload is not JSON"))?;
    let expires = claims.exp.ok_or(TokenProblem::Malformed("no exp claim"))?;
    Ok((expires, claims.nbf))
}

/// The two claims [`times`] reads; the others are skipped unread, not built into a tree.
#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "integer")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "integer")]
    nbf: Option<i64>,
}

/// A claim's value if it is an integer (a time), else none.
fn integer<'de, D: serde::Deserializer<'de>>(claim: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    Ok(serde_json::Value::deserialize(claim)?.as_i64())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_charged_once_per_address_until_it_expires_or_is_refused() {
        let tokens = NewTokens::default();
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let digest = |n: u8| [n; 32];
        // The first call with a token takes one from the burst; the next ones take none.
        for _ in 0..20 {
            assert!(tokens.admit(a, &digest(1), 200, 100));
        }
        let left = (0..20).take_while(|_| tokens.allow(a)).count();
        assert_eq!(left as f64, NEW_TOKENS_BURST - 1.0, "one charged");
        // With the bucket empty: the admitted token still goes, a new one does not, and
        // the same token from another address is new there.
        assert!(tokens.admit(a, &digest(1), 200, 100));
        assert!(!tokens.admit(a, &digest(2), 200, 100));
        assert!(tokens.admit(b, &digest(1), 200, 100), "b's own bucket");
        assert!(!tokens.admit(a, &digest(1), 200, 200), "expired: new again");
        // b's first call with it took one; refused by the servers, it is charged at every
        // call: the 7 left, then no more.
        tokens.forget(b, &digest(1));
        let calls = (0..20)
            .take_while(|_| {
                let admitted = tokens.admit(b, &digest(1), 200, 100);
                tokens.forget(b, &digest(1));
                admitted
            })
            .count();
        assert_eq!(calls as f64, NEW_TOKENS_BURST - 1.0);
    }

    #[test]
    fn the_tokens_remembered_are_bounded() {
        let mut admitted = Admitted::default();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let digest = |n: u8| [n; 32];
        // Per address: the soonest to expire gives way to a new one; the same token again
        // is one entry, with its new expiry.
        for n in 0..TOKENS_PER_ADDRESS as u8 {
            remember(&mut admitted, a, digest(n), 1000 + i64::from(n), 100);
        }
        remember(&mut admitted, a, digest(99), 2000, 100);
        assert!(
            !holds(&admitted, a, &digest(0), 100),
            "the soonest to expire went"
        );
        assert!(holds(&admitted, a, &digest(1), 100));
        remember(&mut admitted, a, digest(99), 3000, 100);
        assert_eq!(admitted[&a].len(), TOKENS_PER_ADDRESS);
        assert!(holds(&admitted, a, &digest(99), 2500));

        // Addresses: with every slot held by an unexpired token, a new address's is not
        // remembered; expired ones make room.
        let mut admitted = Admitted::default();
        let address = |n: usize| IpAddr::from([10, 1, (n >> 8) as u8, n as u8]);
        for n in 0..NEW_TOKENS_ADDRESSES {
            let until = if n == 0 { 150 } else { 1000 };
            remember(&mut admitted, address(n), digest(1), until, 100);
        }
        let newcomer = address(NEW_TOKENS_ADDRESSES);
        remember(&mut admitted, newcomer, digest(1), 1000, 100);
        assert!(!holds(&admitted, newcomer, &digest(1), 100), "no room");
        remember(&mut admitted, newcomer, digest(1), 1000, 160);
        assert!(
            holds(&admitted, newcomer, &digest(1), 160),
            "the expired one made room"
        );
        assert!(holds(&admitted, address(1), &digest(1), 160));
    }

    #[test]
    fn a_token_is_remembered_an_hour_at_most_whatever_it_claims() {
        // Made-up tokens claiming the year 3000 from every address of 127/8 would otherwise
        // hold every address slot for good, and real pods' tokens would be charged at every
        // call.
        let mut admitted = Admitted::default();
        let address = |n: usize| IpAddr::from([127, 1, (n >> 8) as u8, n as u8]);
        let year_3000 = 32_503_680_000;
        for n in 0..NEW_TOKENS_ADDRESSES {
            remember(&mut admitted, address(n), [1; 32], year_3000, 100);
        }
        assert!(holds(
            &admitted,
            address(0),
            &[1; 32],
            100 + REMEMBERED_AT_MOST - 1
        ));
        assert!(!holds(
            &admitted,
            address(0),
            &[1; 32],
            100 + REMEMBERED_AT_MOST
        ));
        let pod: IpAddr = "10.1.0.5".parse().expect("ip");
        let later = 100 + REMEMBERED_AT_MOST;
        remember(&mut admitted, pod, [2; 32], later + 3600, later);
        assert!(
            holds(&admitted, pod, &[2; 32], later),
            "room once they are out"
        );
    }

    /// A JWT's shape with `claims` (JSON) as its payload: the agent reads `exp` and `nbf`
    /// only; the API server (or a test's fake servers) judges the rest.
    pub(crate) fn jwt(claims: &str) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    fn with_authorization(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                header::AUTHORIZATION,
                http::HeaderValue::from_str(value).expect("header"),
            );
        }
        headers
    }

    #[test]
    fn tokens_checked_before_anyone_is_asked() {
        let good = jwt(r#"{"exp":2000,"nbf":900,"sub":"system:serviceaccount:a:b"}"#);
        let token = PodToken::from_headers(&with_authorization(&[&good]), 1000).expect("good");
        assert_eq!(token.expires, 2000);
        assert_eq!(token.text, good);
        let same = PodToken::from_headers(&with_authorization(&[&good]), 1500).expect("good");
        assert_eq!(token.digest, same.digest);
        let bearer = format!("Bearer {good}");
        let long = jwt(&format!(
            r#"{{"exp":2000,"x":"{}"}}"#,
            "a".repeat(MAX_TOKEN_BYTES)
        ));
        let cases: Vec<(&str, HeaderMap, TokenProblem)> = vec![
            ("no header", HeaderMap::new(), TokenProblem::Missing),
            ("empty", with_authorization(&[""]), TokenProblem::Missing),
            (
                "oversized",
                with_authorization(&[&long]),
                TokenProblem::TooLong,
            ),
            (
                "a Bearer scheme",
                with_authorization(&[&bearer]),
                TokenProblem::Malformed("send the token itself, without a Bearer scheme"),
            ),
            (
                "two headers",
                with_authorization(&[&good, &good]),
                TokenProblem::Malformed("more than one Authorization header"),
            ),
            (
                "not a JWT",
                with_authorization(&["opaque-secret"]),
                TokenProblem::Malformed("not three dot-separated parts"),
            ),
            (
                "payload not base64url",
                with_authorization(&["eyJhbGciOiJSUzI1NiJ9.b*c.c2lnbmF0dXJl"]),
                TokenProblem::Malformed("the payload is not base64url"),
            ),
            (
                "an exp that is no time",
                with_authorization(&[&jwt(r#"{"exp":"soon","aud":["a",{"b":[1]}]}"#)]),
                TokenProblem::Malformed("no exp claim"),
            ),
            (
                "no exp",
                with_authorization(&[&jwt(r#"{"sub":"x"}"#)]),
                TokenProblem::Malformed("no exp claim"),
            ),
            (
                "expired",
                with_authorization(&[&jwt(r#"{"exp":1000}"#)]),
                TokenProblem::Expired,
            ),
            (
                "not valid for another minute and more",
                with_authorization(&[&jwt(r#"{"exp":5000,"nbf":1061}"#)]),
                TokenProblem::NotYetValid,
            ),
        ];
        for (what, headers, want) in cases {
            let got = PodToken::from_headers(&headers, 1000).map(|t| t.expires);
            assert_eq!(got, Err(want), "{what}");
        }
        // Within the clock leeway.
        let soon = jwt(r#"{"exp":5000,"nbf":1060}"#);
        assert!(PodToken::from_headers(&with_authorization(&[&soon]), 1000).is_ok());
    }

    #[test]
    fn a_token_is_taken_in_its_one_spelling_only() {
        // The API server would take these as `good` (it strips `=`, and ignores a part's
        // unused bits), but the agent would charge, ask and remember each as a token of its
        // own. "signatures" is `c2lnbmF0dXJlcw`: its `w` carries four unused bits, and `x`
        // sets one of them.
        let good = jwt(r#"{"exp":2000}"#).replace("c2lnbmF0dXJl", "c2lnbmF0dXJlcw");
        let read = |token: &str| PodToken::from_headers(&with_authorization(&[token]), 1000);
        assert!(read(&good).is_ok());
        let unused_bit = good.replace("c2lnbmF0dXJlcw", "c2lnbmF0dXJlcx");
        for other in [format!("{good}="), format!("{good}=="), unused_bit] {
            assert_eq!(
                read(&other).map(|t| t.expires),
                Err(TokenProblem::Malformed("the signature is not base64url")),
                "{other}"
            );
        }
    }

    #[test]
    fn a_tokens_debug_shows_no_token() {
        let good = jwt(r#"{"exp":2000}"#);
        let token = PodToken::from_headers(&with_authorization(&[&good]), 1000).expect("good");
        let shown = format!("{token:?} {token:#?}");
        assert!(!shown.contains(&good[10..30]), "{shown}");
        assert!(shown.contains("2000"), "{shown}");
    }

    #[test]
    fn the_document_sdks_parse() {
        let credentials = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "se\"cret".into(),
            session_token: "tok".into(),
            expiration_unix: 1_700_000_000,
            issued_unix: 1_699_996_400,
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            valid_for_ms: 0,
        };
        assert_eq!(
            credentials_json(&credentials),
            r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"se\"cret","Token":"tok","AccountId":"123456789012","Expiration":"2023-11-14T22:13:20Z"}"#
        );
        let elsewhere = Credentials {
            role_arn: "arn:aws-cn:iam::12345:role/app".into(),
            ..credentials
        };
        assert!(!credentials_json(&elsewhere).contains("AccountId"));
    }
}
