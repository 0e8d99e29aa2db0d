//! Service account tokens as pure functions with `now` passed in: the TokenRequest spec
//! (defaults and validation), binding to a pod, the JWT-shaped token text, and the checks a
//! TokenReview makes.
//!
//! Tokens look like the apiserver's: `base64url(header).base64url(claims).base64url(sig)`
//! without padding, header `{"alg":"RS256","kid":…}`, claims `iss`, `sub`
//! (`system:serviceaccount:NS:SA`), `aud` (an array), `exp`, `iat`, `nbf`, `jti` and
//! `kubernetes.io` {`namespace`, `serviceaccount` {name, uid}, `pod` {name, uid} and `node`
//! {name} when bound to a pod that has a node}. Clients may decode the claims (to learn
//! `exp`); the signature is random bytes, and validity is decided by the emulator, which
//! remembers every token it issued (see [`super::auth`]): a token it did not issue, or one
//! with any byte changed, is unknown.
//!
//! Review follows the apiserver: the token's audiences must intersect the requested ones
//! (none requested means the API server's own, [`API_AUDIENCE`]); `exp` and `nbf` are
//! checked with the same one-minute leeway for clock skew ([`EXPIRY_LEEWAY_SECONDS`]); the
//! service account must still exist with the uid in the token, and a bound pod must still
//! exist with its uid and not have been deleted more than the leeway ago.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use super::attributes::{AUTHENTICATED_GROUP, SERVICE_ACCOUNTS_GROUP, UserInfo};
use super::clock::{format_rfc3339, parse_rfc3339};
use super::error::EmulatorError;

/// The API server's own audience, and the issuer of its tokens (a cluster's default
/// `--service-account-issuer` and `--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// `spec.expirationSeconds` when a TokenRequest leaves it out (the apiserver's default).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

/// The shortest expiry a TokenRequest may ask for (the apiserver rejects less than ten
/// minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

/// The longest expiry a TokenRequest may ask for (the apiserver's validation limit, 2^32 s).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;

/// Clock-skew leeway on `exp` and `nbf`: the apiserver validates service account tokens
/// with its JWT library's default leeway of one minute, so a token is reviewed as expired
/// only once `exp` is more than this far in the past.
pub const EXPIRY_LEEWAY_SECONDS: i64 = 60;

/// `status.user.extra` key: the bound pod's name.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `status.user.extra` key: the bound pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `status.user.extra` key: the node of the bound pod.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// `status.user.extra` key: the node's uid (only when known; the emulator stores no nodes).
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
/// `status.user.extra` key: `JTI=<jti>`.
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// The key id in every token's header.
const KEY_ID: &str = "podiam-emulator";

/// The pod a token is bound to, as it was when the token was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
    /// `spec.nodeName`, if the pod had one.
    pub node: Option<String>,
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The service account's uid.
    pub service_account_uid: String,
    /// `aud`
    pub audiences: Vec<String>,
    /// `iat` and `nbf`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`
    pub id: String,
    /// The bound pod, if any.
    pub pod: Option<BoundPod>,
}

impl Claims {
    /// `system:serviceaccount:NS:SA`
    pub fn subject(&self) -> String {
        super::attributes::service_account_username(&self.namespace, &self.service_account)
    }

    /// The JWT claims set.
    pub fn to_json(&self) -> Value {
        let mut kubernetes = json!({
            "namespace": self.namespace,
            "serviceaccount": {"name": self.service_account, "uid": self.service_account_uid},
        });
        if let Some(pod) = &self.pod {
            kubernetes["pod"] = json!({"name": pod.name, "uid": pod.uid});
            if let Some(node) = &pod.node {
                kubernetes["node"] = json!({"name": node});
            }
        }
        json!({
            "aud": self.audiences,
            "exp": self.expires_at,
            "iat": self.issued_at,
            "iss": API_AUDIENCE,
            "jti": self.id,
            "kubernetes.io": kubernetes,
            "nbf": self.issued_at,
            "sub": self.subject(),
        })
    }

    /// The user a valid token authenticates as.
    pub fn user(&self) -> UserInfo {
        let mut extra = std::collections::BTreeMap::new();
        if let Some(pod) = &self.pod {
            extra.insert(EXTRA_POD_NAME.to_string(), vec![pod.name.clone()]);
            extra.insert(EXTRA_POD_UID.to_string(), vec![pod.uid.clone()]);
            if let Some(node) = &pod.node {
                extra.insert(EXTRA_NODE_NAME.to_string(), vec![node.clone()]);
            }
        }
        extra.insert(
            EXTRA_CREDENTIAL_ID.to_string(),
            vec![format!("JTI={}", self.id)],
        );
        UserInfo {
            username: self.subject(),
            uid: self.service_account_uid.clone(),
            groups: vec![
                SERVICE_ACCOUNTS_GROUP.to_string(),
                format!("{SERVICE_ACCOUNTS_GROUP}:{}", self.namespace),
                AUTHENTICATED_GROUP.to_string(),
            ],
            extra,
        }
    }
}

/// The token text: header, claims and `signature`, each base64url without padding.
pub fn encode(claims: &Claims, signature: &[u8]) -> String {
    let header = json!({"alg": "RS256", "kid": KEY_ID});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_json().to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// The claims of a JWT-shaped token, decoded without any check (what a client does to
/// learn `exp`). `None` if it is not three base64url parts with a JSON object in the middle.
pub fn unverified_claims(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

/// A TokenRequest's `spec.boundObjectRef` (only pods are supported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundObject {
    /// The pod's name.
    pub name: String,
    /// The uid the pod must have, if given.
    pub uid: Option<String>,
}

/// A TokenRequest's spec after defaults and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestSpec {
    /// `spec.audiences` ([`API_AUDIENCE`] if none).
    pub audiences: Vec<String>,
    /// `spec.expirationSeconds` ([`DEFAULT_EXPIRATION_SECONDS`] if absent).
    pub expiration_seconds: i64,
    /// `spec.boundObjectRef`
    pub bound: Option<BoundObject>,
}

/// Reads and validates a TokenRequest body for the service account `name`.
pub fn parse_token_request(body: &Value, name: &str) -> Result<TokenRequestSpec, EmulatorError> {
    let invalid = |message: String| EmulatorError::Invalid {
        kind: "TokenRequest",
        name: name.to_string(),
        message,
    };
    if let Some(kind) = body["kind"].as_str().filter(|k| *k != "TokenRequest") {
        return Err(EmulatorError::BadRequest(format!(
            "the body is a {kind}, not a TokenRequest"
        )));
    }
    let spec = &body["spec"];
    let mut audiences: Vec<String> = spec["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    if audiences.is_empty() {
        audiences.push(API_AUDIENCE.to_string());
    }
    let expiration_seconds = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION_SECONDS,
        value => value.as_i64().ok_or_else(|| {
            EmulatorError::BadRequest(format!("spec.expirationSeconds is not an integer: {value}"))
        })?,
    };
    if expiration_seconds < MIN_EXPIRATION_SECONDS {
        return Err(invalid(format!(
            "spec.expirationSeconds: Invalid value: {expiration_seconds}: must be at least \
             {MIN_EXPIRATION_SECONDS} seconds (10 minutes)"
        )));
    }
    if expiration_seconds > MAX_EXPIRATION_SECONDS {
        return Err(invalid(format!(
            "spec.expirationSeconds: Invalid value: {expiration_seconds}: must be at most 2^32 \
             seconds"
        )));
    }
    let bound = match &spec["boundObjectRef"] {
        Value::Null => None,
        reference => {
            let kind = reference["kind"].as_str().unwrap_or_default();
            if kind != "Pod" {
                return Err(EmulatorError::BadRequest(format!(
                    "cannot bind a token to an object of kind {kind:?}: the emulator binds \
                     tokens only to pods"
                )));
            }
            if let Some(api_version) = reference["apiVersion"]
                .as_str()
                .filter(|v| !v.is_empty() && *v != "v1")
            {
                return Err(EmulatorError::BadRequest(format!(
                    "cannot bind a token to a Pod of apiVersion {api_version:?}"
                )));
            }
            let pod_name = reference["name"].as_str().unwrap_or_default();
            if pod_name.is_empty() {
                return Err(invalid(
                    "spec.boundObjectRef.name: Required value".to_string(),
                ));
            }
            Some(BoundObject {
                name: pod_name.to_string(),
                uid: reference["uid"]
                    .as_str()
                    .filter(|u| !u.is_empty())
                    .map(str::to_string),
            })
        }
    };
    Ok(TokenRequestSpec {
        audiences,
        expiration_seconds,
        bound,
    })
}

/// Checks that `pod` (the stored object named by `bound`) may carry a token of the service
/// account `service_account`: the uid matches if one was given (else 409, as for a pod
/// deleted and recreated), and the pod runs as that service account (else 400).
pub fn bind_pod(
    pod: &Value,
    bound: &BoundObject,
    service_account: &str,
) -> Result<BoundPod, EmulatorError> {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    if let Some(wanted) = &bound.uid
        && wanted != uid
    {
        return Err(EmulatorError::Conflict {
            resource: "pods",
            name: bound.name.clone(),
            reason: format!(
                "the bound object reference names uid {wanted} but the pod's uid is {uid} \
                 (was it deleted and recreated?)"
            ),
        });
    }
    let runs_as = pod["spec"]["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    if runs_as != service_account {
        return Err(EmulatorError::BadRequest(format!(
            "cannot bind a token of service account {service_account:?} to pod {:?}, which \
             runs as service account {runs_as:?}",
            bound.name
        )));
    }
    Ok(BoundPod {
        name: bound.name.clone(),
        uid: uid.to_string(),
        node: pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string),
    })
}

/// The TokenRequest answer: the request echoed with `status.token` and
/// `status.expirationTimestamp`.
pub fn token_request_response(
    namespace: &str,
    name: &str,
    spec: &TokenRequestSpec,
    token: &str,
    claims: &Claims,
) -> Value {
    let mut spec_json = Map::new();
    spec_json.insert("audiences".into(), json!(spec.audiences));
    spec_json.insert("expirationSeconds".into(), json!(spec.expiration_seconds));
    if let Some(pod) = &claims.pod {
        spec_json.insert(
            "boundObjectRef".into(),
            json!({"kind": "Pod", "apiVersion": "v1", "name": pod.name, "uid": pod.uid}),
        );
    }
    json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": format_rfc3339(claims.issued_at),
        },
        "spec": spec_json,
        "status": {
            "token": token,
            "expirationTimestamp": format_rfc3339(claims.expires_at),
        },
    })
}

/// The stored objects a token's claims refer to, as they are now (looked up by the caller).
#[derive(Debug, Clone, Default)]
pub struct Referents<'a> {
    /// The service account's current uid, `None` if it no longer exists.
    pub service_account_uid: Option<&'a str>,
    /// The bound pod, if the token has one and it still exists.
    pub pod: Option<&'a Value>,
}

/// The audiences to review against: the requested ones, or the API server's if none.
pub fn review_audiences(requested: &[String]) -> Vec<String> {
    if requested.is_empty() {
        vec![API_AUDIENCE.to_string()]
    } else {
        requested.to_vec()
    }
}

/// Reviews an issued token: `Ok` with the audiences it is valid for among `requested`
/// ([`review_audiences`]), or `Err` with why it is not.
pub fn review(
    claims: &Claims,
    requested: &[String],
    now: i64,
    referents: &Referents<'_>,
) -> Result<Vec<String>, String> {
    let wanted = review_audiences(requested);
    let matching: Vec<String> = wanted
        .iter()
        .filter(|a| claims.audiences.contains(a))
        .cloned()
        .collect();
    if matching.is_empty() {
        return Err(format!(
            "token audiences {:?} do not include any of the requested audiences {wanted:?}",
            claims.audiences
        ));
    }
    if now - EXPIRY_LEEWAY_SECONDS > claims.expires_at {
        return Err("service account token has expired".to_string());
    }
    if now + EXPIRY_LEEWAY_SECONDS < claims.issued_at {
        return Err("service account token is not valid yet".to_string());
    }
    let account = format!("{}/{}", claims.namespace, claims.service_account);
    match referents.service_account_uid {
        None => return Err(format!("service account {account} no longer exists")),
        Some(uid) if uid != claims.service_account_uid => {
            return Err(format!(
                "service account {account} has uid {uid}, the token was issued for uid {}",
                claims.service_account_uid
            ));
        }
        Some(_) => {}
    }
    if let Some(bound) = &claims.pod {
        let pod_name = format!("{}/{}", claims.namespace, bound.name);
        let Some(pod) = referents.pod else {
            return Err(format!(
                "pod {pod_name} the token is bound to no longer exists"
            ));
        };
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != bound.uid {
            return Err(format!(
                "pod {pod_name} has uid {uid}, the token is bound to uid {}",
                bound.uid
            ));
        }
        let deleted_at = pod["metadata"]["deletionTimestamp"]
            .as_str()
            .and_then(parse_rfc3339);
        if deleted_at.is_some_and(|at| at + EXPIRY_LEEWAY_SECONDS < now) {
            return Err(format!(
                "pod {pod_name} the token is bound to has been deleted"
            ));
        }
    }
    Ok(matching)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_735_787_045;

    fn claims(audiences: &[&str], pod: Option<BoundPod>) -> Claims {
        Claims {
            namespace: "podiam".into(),
            service_account: "agent".into(),
            service_account_uid: "sa-uid".into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            issued_at: NOW,
            expires_at: NOW + 600,
            id: "jti-1".into(),
            pod,
        }
    }

    fn bound(node: Option<&str>) -> Option<BoundPod> {
        Some(BoundPod {
            name: "agent-x".into(),
            uid: "pod-uid".into(),
            node: node.map(str::to_string),
        })
    }

    #[test]
    fn tokens_are_jwt_shaped_with_real_claims() {
        let claims = claims(&["podiam"], bound(Some("node-1")));
        let token = encode(&claims, &[7; 256]);
        assert_eq!(token.split('.').count(), 3);
        assert!(!token.contains('='), "no padding: {token}");
        let payload = unverified_claims(&token).unwrap();
        assert_eq!(
            payload,
            json!({
                "aud": ["podiam"], "exp": NOW + 600, "iat": NOW, "nbf": NOW,
                "iss": API_AUDIENCE, "jti": "jti-1",
                "sub": "system:serviceaccount:podiam:agent",
                "kubernetes.io": {
                    "namespace": "podiam",
                    "serviceaccount": {"name": "agent", "uid": "sa-uid"},
                    "pod": {"name": "agent-x", "uid": "pod-uid"},
                    "node": {"name": "node-1"},
                },
            })
        );
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(unverified_claims("a.b"), None);
        assert_eq!(unverified_claims("a.!!.c"), None);
    }

    #[test]
    fn users_of_tokens() {
        let user = claims(&["podiam"], bound(Some("node-1"))).user();
        assert_eq!(user.username, "system:serviceaccount:podiam:agent");
        assert_eq!(user.uid, "sa-uid");
        assert_eq!(
            user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:podiam",
                "system:authenticated"
            ]
        );
        assert_eq!(user.extra[EXTRA_POD_NAME], ["agent-x"]);
        assert_eq!(user.extra[EXTRA_POD_UID], ["pod-uid"]);
        assert_eq!(user.extra[EXTRA_NODE_NAME], ["node-1"]);
        assert_eq!(user.extra[EXTRA_CREDENTIAL_ID], ["JTI=jti-1"]);
        let unbound = claims(&["podiam"], None).user();
        assert!(!unbound.extra.contains_key(EXTRA_POD_NAME));
        let off_node = claims(&["podiam"], bound(None)).user();
        assert!(!off_node.extra.contains_key(EXTRA_NODE_NAME));
    }

    #[test]
    fn token_request_specs() {
        let ok = |body: Value| parse_token_request(&body, "agent");
        assert_eq!(
            ok(json!({"spec": {}})).unwrap(),
            TokenRequestSpec {
                audiences: vec![API_AUDIENCE.into()],
                expiration_seconds: 3600,
                bound: None
            }
        );
        assert_eq!(
            ok(json!({"kind": "TokenRequest", "spec": {
                "audiences": ["podiam"], "expirationSeconds": 600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u"}}}))
            .unwrap(),
            TokenRequestSpec {
                audiences: vec!["podiam".into()],
                expiration_seconds: 600,
                bound: Some(BoundObject {
                    name: "p".into(),
                    uid: Some("u".into())
                }),
            }
        );
        type Check = fn(&EmulatorError) -> bool;
        let invalid: Check = |e| matches!(e, EmulatorError::Invalid { .. });
        let bad: Check = |e| matches!(e, EmulatorError::BadRequest(_));
        let cases: [(Value, Check); 6] = [
            (json!({"spec": {"expirationSeconds": 599}}), invalid),
            (json!({"spec": {"expirationSeconds": 0}}), invalid),
            (
                json!({"spec": {"expirationSeconds": 5_000_000_000_i64}}),
                invalid,
            ),
            (
                json!({"spec": {"boundObjectRef": {"kind": "Secret", "name": "s"}}}),
                bad,
            ),
            (
                json!({"spec": {"boundObjectRef": {"kind": "Pod"}}}),
                invalid,
            ),
            (json!({"kind": "Pod", "spec": {}}), bad),
        ];
        for (body, check) in cases {
            let error = ok(body.clone()).unwrap_err();
            assert!(check(&error), "{body}: {error:?}");
        }
    }

    #[test]
    fn pods_bind_only_with_their_uid_and_service_account() {
        let pod = json!({"metadata": {"name": "p", "uid": "u1"},
                         "spec": {"serviceAccountName": "agent", "nodeName": "node-2"}});
        let reference = |uid: Option<&str>| BoundObject {
            name: "p".into(),
            uid: uid.map(str::to_string),
        };
        assert_eq!(
            bind_pod(&pod, &reference(Some("u1")), "agent").unwrap(),
            BoundPod {
                name: "p".into(),
                uid: "u1".into(),
                node: Some("node-2".into())
            }
        );
        assert!(bind_pod(&pod, &reference(None), "agent").is_ok());
        assert!(matches!(
            bind_pod(&pod, &reference(Some("u2")), "agent"),
            Err(EmulatorError::Conflict { .. })
        ));
        assert!(matches!(
            bind_pod(&pod, &reference(None), "other"),
            Err(EmulatorError::BadRequest(_))
        ));
        let default_sa = json!({"metadata": {"uid": "u1"}, "spec": {}});
        assert!(bind_pod(&default_sa, &reference(None), "default").is_ok());
    }

    /// (name, claims, requested audiences, referents, Ok(audiences) or Err(part of the error))
    type Case<'a> = (
        &'a str,
        &'a Claims,
        &'a [String],
        Referents<'a>,
        Result<Vec<&'a str>, &'a str>,
    );

    #[test]
    fn reviews() {
        let pod = json!({"metadata": {"uid": "pod-uid"}});
        let recreated = json!({"metadata": {"uid": "other"}});
        let deleted_long_ago = json!({"metadata": {"uid": "pod-uid",
            "deletionTimestamp": format_rfc3339(NOW - 61)}});
        let terminating = json!({"metadata": {"uid": "pod-uid",
            "deletionTimestamp": format_rfc3339(NOW + 30)}});
        let live = |pod| Referents {
            service_account_uid: Some("sa-uid"),
            pod,
        };
        let podiam = claims(&["podiam"], bound(None));
        let api = claims(&[API_AUDIENCE, "podiam"], None);
        let mut expired = podiam.clone();
        expired.expires_at = NOW - 61;
        let mut within_leeway = podiam.clone();
        within_leeway.expires_at = NOW - 59;
        let mut future = podiam.clone();
        future.issued_at = NOW + 120;
        let podiam_only = ["podiam".to_string()];
        let cases: [Case<'_>; 13] = [
            (
                "valid",
                &podiam,
                &podiam_only,
                live(Some(&pod)),
                Ok(vec!["podiam"]),
            ),
            (
                "no audiences means the API's",
                &podiam,
                &[],
                live(Some(&pod)),
                Err("do not include"),
            ),
            (
                "API audience",
                &api,
                &[],
                live(None),
                Ok(vec![API_AUDIENCE]),
            ),
            (
                "intersection only",
                &api,
                &["podiam".to_string(), "other".to_string()],
                live(None),
                Ok(vec!["podiam"]),
            ),
            (
                "expired",
                &expired,
                &podiam_only,
                live(Some(&pod)),
                Err("expired"),
            ),
            (
                "leeway",
                &within_leeway,
                &podiam_only,
                live(Some(&pod)),
                Ok(vec!["podiam"]),
            ),
            (
                "not yet",
                &future,
                &podiam_only,
                live(Some(&pod)),
                Err("not valid yet"),
            ),
            (
                "service account gone",
                &podiam,
                &podiam_only,
                Referents {
                    service_account_uid: None,
                    pod: Some(&pod),
                },
                Err("no longer exists"),
            ),
            (
                "service account recreated",
                &podiam,
                &podiam_only,
                Referents {
                    service_account_uid: Some("new"),
                    pod: Some(&pod),
                },
                Err("has uid new"),
            ),
            (
                "pod gone",
                &podiam,
                &podiam_only,
                live(None),
                Err("no longer exists"),
            ),
            (
                "pod recreated",
                &podiam,
                &podiam_only,
                live(Some(&recreated)),
                Err("has uid other"),
            ),
            (
                "pod deleted",
                &podiam,
                &podiam_only,
                live(Some(&deleted_long_ago)),
                Err("has been deleted"),
            ),
            (
                "pod terminating",
                &podiam,
                &podiam_only,
                live(Some(&terminating)),
                Ok(vec!["podiam"]),
            ),
        ];
        for (name, claims, requested, referents, want) in cases {
            let got = review(claims, requested, NOW, &referents);
            match (want, got) {
                (Ok(want), Ok(got)) => assert_eq!(got, want, "{name}"),
                (Err(want), Err(got)) => assert!(got.contains(want), "{name}: {got}"),
                (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
            }
        }
    }
}
