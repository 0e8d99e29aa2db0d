//! Credentials from STS: the AssumeRole call and a single-flight cache in front of it.
//!
//! - [`AssumeRole`] is the one STS operation podiam uses, as a trait so the cache's logic
//!   is tested with an in-process fake; [`SdkAssumeRole`] is the aws-sdk-sts implementation
//!   (endpoint overridable, so moto serves it in tests).
//! - [`CredentialCache`] keys credentials by (role ARN, external ID, session name). Concurrent
//!   misses on one key collapse into one STS call, and that call runs in a task of its own:
//!   a caller that gives up (its pod hung up) never cancels the call the other callers are
//!   waiting for. Credentials are served only while they have at least `min_remaining` left;
//!   after that the next caller refreshes them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::task::TaskTracker;

/// What a credential cache entry is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
}

/// Temporary credentials for one role session.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Seconds since the Unix epoch.
    pub expiration_unix: i64,
    /// Seconds since the Unix epoch.
    pub issued_unix: i64,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration_unix", &self.expiration_unix)
            .field("issued_unix", &self.issued_unix)
            .finish()
    }
}

impl Issued {
    /// Whether these credentials still have at least `min_remaining` of life at `now_unix`.
    pub fn servable(&self, now_unix: i64, min_remaining: Duration) -> bool {
        self.expiration_unix - now_unix >= min_remaining.as_secs() as i64
    }
}

/// Why STS gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS answered and said no (AccessDenied, a malformed request…): retrying won't help.
    #[error("STS refused AssumeRole ({code}): {message}")]
    Refused { code: String, message: String },
    /// STS could not be reached, throttled us or failed: retrying may help.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
}

/// One AssumeRole request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRequest {
    pub key: CacheKey,
    pub duration: Duration,
}

/// The STS AssumeRole operation.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(&self, request: AssumeRequest) -> BoxFuture<'static, Result<Issued, StsError>>;
}

/// AssumeRole through aws-sdk-sts.
#[derive(Clone, Debug)]
pub struct SdkAssumeRole {
    client: aws_sdk_sts::Client,
}

impl SdkAssumeRole {
    /// Builds an STS client from the default credential chain (env, web identity, the node's
    /// instance profile…) for `region`, at `endpoint` if given.
    pub async fn new(region: String, endpoint: Option<String>) -> SdkAssumeRole {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region));
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        SdkAssumeRole {
            client: aws_sdk_sts::Client::new(&config),
        }
    }
}

/// Error codes that mean "retrying will not help".
const REFUSAL_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
    "ExpiredTokenException",
    "ValidationError",
    "InvalidParameterValue",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
];

impl AssumeRole for SdkAssumeRole {
    fn assume_role(&self, request: AssumeRequest) -> BoxFuture<'static, Result<Issued, StsError>> {
        let client = self.client.clone();
        Box::pin(async move {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            let duration = i32::try_from(request.duration.as_secs()).unwrap_or(i32::MAX);
            let result = client
                .assume_role()
                .role_arn(&request.key.role_arn)
                .role_session_name(&request.key.session_name)
                .set_external_id(request.key.external_id.clone())
                .duration_seconds(duration)
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                Err(err) => {
                    let code = err.code().unwrap_or_default().to_string();
                    let message = err.message().unwrap_or_default().to_string();
                    return Err(if REFUSAL_CODES.contains(&code.as_str()) {
                        StsError::Refused { code, message }
                    } else if code.is_empty() {
                        StsError::Unavailable(
                            aws_sdk_sts::error::DisplayErrorContext(&err).to_string(),
                        )
                    } else {
                        StsError::Unavailable(format!("{code}: {message}"))
                    });
                }
            };
            let creds = output.credentials().ok_or_else(|| {
                StsError::Unavailable("AssumeRole answered without credentials".into())
            })?;
            Ok(Issued {
                access_key_id: creds.access_key_id().to_string(),
                secret_access_key: creds.secret_access_key().to_string(),
                session_token: creds.session_token().to_string(),
                expiration_unix: creds.expiration().secs(),
                issued_unix: now_unix(),
            })
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

type Slot = Arc<AsyncMutex<Option<Issued>>>;

/// Credentials per (role, external ID, session name), fetched once however many ask.
pub struct CredentialCache {
    sts: Arc<dyn AssumeRole>,
    slots: Mutex<HashMap<CacheKey, Slot>>,
    tasks: TaskTracker,
    session_duration: Duration,
    min_remaining: Duration,
}

impl fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCache")
            .field("session_duration", &self.session_duration)
            .field("min_remaining", &self.min_remaining)
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        session_duration: Duration,
        min_remaining: Duration,
    ) -> Self {
        CredentialCache {
            sts,
            slots: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            session_duration,
            min_remaining,
        }
    }

    /// Credentials for `key` with at least `min_remaining` left, from the cache or from STS.
    pub async fn get(&self, key: CacheKey) -> Result<Issued, StsError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(key.clone()).or_default())
        };
        let mut guard = slot.lock_owned().await;
        if let Some(issued) = guard.as_ref()
            && issued.servable(now_unix(), self.min_remaining)
        {
            return Ok(issued.clone());
        }
        let sts = Arc::clone(&self.sts);
        let request = AssumeRequest {
            key,
            duration: self.session_duration,
        };
        // The call and the store run detached, holding the slot's lock, so a caller that is
        // dropped mid-call neither cancels it nor lets a second call start.
        let call = self.tasks.spawn(async move {
            let result = sts.assume_role(request).await;
            if let Ok(issued) = &result {
                *guard = Some(issued.clone());
            }
            result
        });
        call.await
            .unwrap_or_else(|e| Err(StsError::Unavailable(format!("STS call task failed: {e}"))))
    }

    /// Waits for detached STS calls to finish (at shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct FakeSts {
        calls: AtomicUsize,
        lifetime: i64,
        gate: tokio::sync::Semaphore,
        refuse: bool,
    }

    impl AssumeRole for Arc<FakeSts> {
        fn assume_role(
            &self,
            request: AssumeRequest,
        ) -> BoxFuture<'static, Result<Issued, StsError>> {
            let me = Arc::clone(self);
            Box::pin(async move {
                let n = me.calls.fetch_add(1, Ordering::SeqCst);
                let _permit = me
                    .gate
                    .acquire()
                    .await
                    .map_err(|e| StsError::Unavailable(e.to_string()))?;
                if me.refuse {
                    return Err(StsError::Refused {
                        code: "AccessDenied".into(),
                        message: format!("not {}", request.key.role_arn),
                    });
                }
                Ok(Issued {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration_unix: now_unix() + me.lifetime,
                    issued_unix: now_unix(),
                })
            })
        }
    }

    fn key(role: &str) -> CacheKey {
        CacheKey {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            external_id: None,
            session_name: "podiam".into(),
        }
    }

    fn fake(lifetime: i64, open: bool, refuse: bool) -> Arc<FakeSts> {
        Arc::new(FakeSts {
            calls: AtomicUsize::new(0),
            lifetime,
            gate: tokio::sync::Semaphore::new(if open { 1000 } else { 0 }),
            refuse,
        })
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const HALF: Duration = Duration::from_secs(1800);

    #[tokio::test]
    async fn concurrent_misses_make_one_call_and_hits_make_none() {
        let sts = fake(3600, false, false);
        let cache = Arc::new(CredentialCache::new(Arc::new(Arc::clone(&sts)), HOUR, HALF));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get(key("a")).await })
            })
            .collect();
        sts.gate.add_permits(1000);
        for w in waiters {
            assert_eq!(
                w.await.expect("joins").expect("creds").access_key_id,
                "ASIA0"
            );
        }
        cache.get(key("a")).await.expect("hit");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
        cache.get(key("b")).await.expect("other key");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_fail_the_others() {
        let sts = fake(3600, false, false);
        let cache = Arc::new(CredentialCache::new(Arc::new(Arc::clone(&sts)), HOUR, HALF));
        let first = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(key("a")).await })
        };
        // Wait until the first caller's STS call is under way, then cancel that caller.
        while sts.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(key("a")).await })
        };
        first.abort();
        sts.gate.add_permits(1000);
        let creds = second
            .await
            .expect("joins")
            .expect("the second caller gets credentials");
        assert_eq!(creds.access_key_id, "ASIA0");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn credentials_near_expiry_are_refreshed_not_served() {
        // STS hands out credentials that already have less than the floor left.
        let sts = fake(600, true, false);
        let cache = CredentialCache::new(Arc::new(Arc::clone(&sts)), HOUR, HALF);
        cache.get(key("a")).await.expect("first");
        cache.get(key("a")).await.expect("second");
        assert_eq!(
            sts.calls.load(Ordering::SeqCst),
            2,
            "stale credentials are never reused"
        );
    }

    #[tokio::test]
    async fn refusals_pass_through() {
        let sts = fake(3600, true, true);
        let cache = CredentialCache::new(Arc::new(Arc::clone(&sts)), HOUR, HALF);
        assert!(matches!(
            cache.get(key("a")).await,
            Err(StsError::Refused { .. })
        ));
    }

    #[test]
    fn issued_debug_redacts() {
        let issued = Issued {
            access_key_id: "ASIAX".into(),
            secret_access_key: "s3cr3t".into(),
            session_token: "t0k3n".into(),
            expiration_unix: 0,
            issued_unix: 0,
        };
        let shown = format!("{issued:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0k3n"),
            "{shown}"
        );
    }
}
