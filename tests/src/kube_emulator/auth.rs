//! The emulator's token authority: it issues service account tokens (TokenRequest and
//! [`super::KubeEmulator::mint_token`]), remembers them, knows the static user tokens tests
//! register, reviews tokens (TokenReview and every request's `Authorization: Bearer`), and
//! builds the RBAC [`Policy`] from the store. The decisions themselves are the pure
//! functions in [`super::token`] and [`super::rbac`]; this file holds the state and the
//! store lookups around them.
//!
//! A token is valid only if the emulator issued exactly that text: the table of issued
//! tokens is the "signature check", so a forged or edited token is unknown. Tokens and
//! their table are secrets: nothing here prints them (`Debug` shows counts only).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value;
use tracing::debug;

use super::attributes::{AUTHENTICATED_GROUP, UserInfo};
use super::error::EmulatorError;
use super::rbac::Policy;
use super::resource::Kind;
use super::store::{ListOptions, Store};
use super::token::{
    API_AUDIENCE, BoundObject, Claims, Referents, bind_pod, encode, review, review_audiences,
};

/// Length of a token's (random) signature: that of an RS256 signature with a 2048-bit key.
const SIGNATURE_LENGTH: usize = 256;

/// Issued tokens, static user tokens, fault switches and counters.
pub struct Authority {
    issued: Mutex<HashMap<String, Claims>>,
    users: Mutex<HashMap<String, UserInfo>>,
    token_review_down: AtomicBool,
    token_reviews: AtomicU64,
    subject_access_reviews: AtomicU64,
    random: RandomState,
    counter: AtomicU64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let issued = self.issued.lock().map_or(0, |t| t.len());
        let users = self.users.lock().map_or(0, |t| t.len());
        f.debug_struct("Authority")
            .field("issued_tokens", &issued)
            .field("user_tokens", &users)
            .field(
                "token_review_down",
                &self.token_review_down.load(Ordering::SeqCst),
            )
            .finish_non_exhaustive()
    }
}

impl Default for Authority {
    fn default() -> Self {
        Authority::new()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Authority {
    /// No tokens yet.
    pub fn new() -> Authority {
        Authority {
            issued: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            token_review_down: AtomicBool::new(false),
            token_reviews: AtomicU64::new(0),
            subject_access_reviews: AtomicU64::new(0),
            random: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    fn random_u64(&self) -> u64 {
        self.random
            .hash_one(self.counter.fetch_add(1, Ordering::SeqCst))
    }

    fn new_id(&self) -> String {
        let (a, b) = (self.random_u64(), self.random_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Issues a token for the service account `namespace/name`, optionally bound to a pod,
    /// after the checks TokenRequest makes: the service account exists (404), the pod exists
    /// (404), has the given uid (409) and runs as this service account (400).
    pub fn issue(
        &self,
        store: &Store,
        namespace: &str,
        name: &str,
        audiences: Vec<String>,
        (issued_at, expires_at): (i64, i64),
        bound: Option<&BoundObject>,
    ) -> Result<(String, Claims), EmulatorError> {
        let account = store.get(Kind::ServiceAccount, Some(namespace), name)?;
        let pod = match bound {
            Some(bound) => {
                let pod = store.get(Kind::Pod, Some(namespace), &bound.name)?;
                Some(bind_pod(&pod, bound, name)?)
            }
            None => None,
        };
        let claims = Claims {
            namespace: namespace.to_string(),
            service_account: name.to_string(),
            service_account_uid: account["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            audiences: review_audiences(&audiences),
            issued_at,
            expires_at,
            id: self.new_id(),
            pod,
        };
        let signature: Vec<u8> = (0..SIGNATURE_LENGTH / 8)
            .flat_map(|_| self.random_u64().to_le_bytes())
            .collect();
        let token = encode(&claims, &signature);
        lock(&self.issued).insert(token.clone(), claims.clone());
        Ok((token, claims))
    }

    /// Registers a static user token (like a line of kube-apiserver's token file). The user
    /// is also in `system:authenticated`, as the apiserver adds it to every authenticated
    /// request.
    pub fn add_user_token(&self, token: &str, username: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
            groups.push(AUTHENTICATED_GROUP.to_string());
        }
        let user = UserInfo {
            username: username.to_string(),
            groups,
            ..UserInfo::default()
        };
        lock(&self.users).insert(token.to_string(), user);
    }

    /// Reviews a token for the `requested` audiences (none: the API server's): the user and
    /// the audiences it is valid for, or why it is not valid.
    pub fn review_token(
        &self,
        store: &Store,
        token: &str,
        requested: &[String],
        now: i64,
    ) -> Result<(UserInfo, Vec<String>), String> {
        let static_user = lock(&self.users).get(token).cloned();
        if let Some(user) = static_user {
            // Static tokens carry no audience: like the apiserver, accept them only for its
            // own audience.
            return if review_audiences(requested)
                .iter()
                .any(|a| a == API_AUDIENCE)
            {
                Ok((user, vec![API_AUDIENCE.to_string()]))
            } else {
                Err(format!(
                    "invalid bearer token, a static token is valid only for the audience \
                     {API_AUDIENCE:?}, not {requested:?}"
                ))
            };
        }
        let claims = lock(&self.issued)
            .get(token)
            .cloned()
            .ok_or_else(|| "invalid bearer token".to_string())?;
        let account_uid = store
            .get(
                Kind::ServiceAccount,
                Some(&claims.namespace),
                &claims.service_account,
            )
            .ok()
            .and_then(|a| a["metadata"]["uid"].as_str().map(str::to_string));
        let pod = claims
            .pod
            .as_ref()
            .and_then(|p| store.get(Kind::Pod, Some(&claims.namespace), &p.name).ok());
        let referents = Referents {
            service_account_uid: account_uid.as_deref(),
            pod: pod.as_ref(),
        };
        review(&claims, requested, now, &referents)
            .map(|audiences| (claims.user(), audiences))
            .map_err(|reason| format!("invalid bearer token, {reason}"))
    }

    /// Who sent a request with this `Authorization` header: without one, the cluster
    /// admin ([`UserInfo::admin`]); with `Bearer T`, the user of a token valid for the API
    /// server's audience; anything else is 401.
    pub fn authenticate(
        &self,
        store: &Store,
        authorization: Option<&str>,
        now: i64,
    ) -> Result<UserInfo, EmulatorError> {
        let Some(header) = authorization else {
            return Ok(UserInfo::admin());
        };
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(EmulatorError::Unauthorized)?;
        self.review_token(store, token, &[], now)
            .map(|(user, _)| user)
            .map_err(|reason| {
                debug!(%reason, "a request's bearer token was refused");
                EmulatorError::Unauthorized
            })
    }

    /// Makes TokenReview answer 503 (or answer again).
    pub fn set_token_review_down(&self, down: bool) {
        self.token_review_down.store(down, Ordering::SeqCst);
    }

    /// Whether TokenReview is made to fail.
    pub fn token_review_down(&self) -> bool {
        self.token_review_down.load(Ordering::SeqCst)
    }

    /// Counts one TokenReview request.
    pub fn count_token_review(&self) {
        self.token_reviews.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts one SubjectAccessReview request.
    pub fn count_subject_access_review(&self) {
        self.subject_access_reviews.fetch_add(1, Ordering::SeqCst);
    }

    /// TokenReview requests received.
    pub fn token_reviews(&self) -> u64 {
        self.token_reviews.load(Ordering::SeqCst)
    }

    /// SubjectAccessReview requests received.
    pub fn subject_access_reviews(&self) -> u64 {
        self.subject_access_reviews.load(Ordering::SeqCst)
    }
}

/// The RBAC policy as stored now.
pub fn policy(store: &Store) -> Result<Policy, EmulatorError> {
    let all = |kind: Kind| -> Result<Vec<Value>, EmulatorError> {
        Ok(store.list(kind, None, &ListOptions::default())?.items)
    };
    Ok(Policy::from_objects(
        &all(Kind::ClusterRole)?,
        &all(Kind::Role)?,
        &all(Kind::ClusterRoleBinding)?,
        &all(Kind::RoleBinding)?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kube_emulator::store::{PodDeletion, StoreConfig};

    fn store() -> Store {
        let store = Store::new(StoreConfig {
            history: 100,
            watch_buffer: 16,
            pod_deletion: PodDeletion::Immediate,
        });
        store
            .create(
                Kind::Namespace,
                None,
                json!({"metadata": {"name": "a"}}),
                false,
            )
            .unwrap();
        store
            .create(
                Kind::ServiceAccount,
                Some("a"),
                json!({"metadata": {"name": "agent"}}),
                false,
            )
            .unwrap();
        store
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let store = store();
        let authority = Authority::new();
        authority.add_user_token("static-secret", "alice", &[]);
        let (token, _) = authority
            .issue(&store, "a", "agent", vec![], (100, 1000), None)
            .unwrap();
        let shown = format!("{authority:?}");
        assert!(
            !shown.contains(&token) && !shown.contains("static-secret"),
            "{shown}"
        );
        assert!(shown.contains("issued_tokens: 1"), "{shown}");
    }

    #[test]
    fn requests_authenticate_by_bearer_token_or_as_admin() {
        let store = store();
        let authority = Authority::new();
        authority.add_user_token("alice-token", "alice", &["devs"]);
        let now = 1_000;
        let (api_token, _) = authority
            .issue(&store, "a", "agent", vec![], (now, now + 600), None)
            .unwrap();
        let (podiam_token, _) = authority
            .issue(
                &store,
                "a",
                "agent",
                vec!["podiam".into()],
                (now, now + 600),
                None,
            )
            .unwrap();
        let bearer = |token: &str| format!("Bearer {token}");
        let cases = [
            (None, Some("system:admin")),
            (Some(bearer("alice-token")), Some("alice")),
            (
                Some(bearer(&api_token)),
                Some("system:serviceaccount:a:agent"),
            ),
            (
                Some(format!("bearer  {api_token}")),
                Some("system:serviceaccount:a:agent"),
            ),
            (Some(bearer(&podiam_token)), None),
            (Some(bearer("unknown")), None),
            (Some("Bearer ".to_string()), None),
            (Some("Basic YWxpY2U6cHc=".to_string()), None),
        ];
        for (header, want) in cases {
            let got = authority.authenticate(&store, header.as_deref(), now);
            match want {
                Some(name) => assert_eq!(got.unwrap().username, name, "{header:?}"),
                None => assert!(
                    matches!(got, Err(EmulatorError::Unauthorized)),
                    "{header:?}: {got:?}"
                ),
            }
        }
    }
}
