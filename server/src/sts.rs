//! Credentials from STS: the AssumeRole call and a single-flight cache in front of it.
//!
//! - [`AssumeRole`] is the one STS operation podiam uses, as a trait so the cache's logic
//!   is tested with an in-process fake; [`SdkAssumeRole`] is the aws-sdk-sts implementation
//!   (endpoint overridable, so moto serves it in tests).
//! - [`CredentialCache`] keys credentials by (role ARN, external ID, session name). Concurrent
//!   misses on one key collapse into one STS call, and that call runs in a task of its own:
//!   a caller that gives up (its pod hung up) never cancels the call the other callers are
//!   waiting for (kiam failed them all). Credentials are served while they have at least
//!   `min_remaining` left, also while a call for their key is in flight (a refresh waits for
//!   STS without holding up the pods; a request that needs the call waits for it
//!   [`IN_FLIGHT_PATIENCE`], then is served what is left above the outage floor, if
//!   anything); [`CredentialCache::maintain`] refreshes them in the background at
//!   half-life, prefetches keys that live pods need, and drops keys no pod needs — of the
//!   keys this replica owns (`podiam_proto::owner`); another replica's key is fetched only
//!   when a pod asks for it here.
//! - Every STS call waits for the [`Budget`]: a pod's request first, then refreshes, then
//!   prefetches; a throttled call pauses upkeep.
//! - Failures: a refusal (AccessDenied…) is passed on and remembered briefly, so a denied pod
//!   cannot hammer STS; an outage or throttling backs off exponentially with jitter while
//!   still-valid credentials keep being served, and recovery needs nothing but time.
//! - Time comes from a [`Clock`], so tests run an outage of minutes in microseconds.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::task::TaskTracker;

use crate::budget::{Budget, BudgetCounters, Priority, UPKEEP};

/// What a credential cache entry is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    /// Session tags (empty unless `--session-tags`; then each pod has its own key).
    pub tags: Vec<(String, String)>,
    /// The tags are transitive (`--session-tags-transitive`).
    pub transitive_tags: bool,
}

impl CacheKey {
    /// The key's digest on the wire (`PodState.credential_key`): what replicas and agents
    /// agree on the key's owner by. Fixed across processes (`podiam_proto::owner`).
    pub fn digest(&self) -> u64 {
        podiam_proto::owner::credential_key(
            &self.role_arn,
            self.external_id.as_deref(),
            &self.session_name,
            &self.tags,
            self.transitive_tags,
        )
    }
}

/// Temporary credentials for one role session.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// STS's `Expiration`, seconds since the Unix epoch by STS's clock: what pods are told.
    pub expiration_unix: i64,
    /// When the server had them, seconds since the Unix epoch by its own clock.
    pub issued_unix: i64,
    /// How far the server's clock was ahead of STS's when they came (ms, negative if behind;
    /// from the answer's `Date`, 0 without one or when under [`CLOCK_OFFSET_IGNORED`]): the
    /// cache judges their expiry on its own clock, so that a server minutes off neither calls
    /// STS on every request (ahead) nor serves credentials past their end (behind).
    pub clock_offset_ms: i64,
}

impl Issued {
    /// When they expire, in ms since the Unix epoch by the server's clock.
    pub fn expires_ms(&self) -> i64 {
        self.expiration_unix
            .saturating_mul(1000)
            .saturating_add(self.clock_offset_ms)
    }

    /// How long they stay valid from `now_ms` (the server's clock), none if they have expired.
    pub fn valid_for_ms(&self, now_ms: i64) -> i64 {
        self.expires_ms().saturating_sub(now_ms).max(0)
    }
}

/// Offsets between the server's clock and STS's under this are not applied: the `Date` of an
/// answer is to the second, and the call itself takes time.
pub const CLOCK_OFFSET_IGNORED: Duration = Duration::from_secs(5);

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration_unix", &self.expiration_unix)
            .field("issued_unix", &self.issued_unix)
            .field("clock_offset_ms", &self.clock_offset_ms)
            .finish()
    }
}

/// Why STS gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS answered and said no (AccessDenied, a malformed request…): retrying won't help.
    #[error("STS refused AssumeRole ({code}): {message}")]
    Refused { code: String, message: String },
    /// STS could not be reached or failed: retrying may help.
    #[error("STS unavailable: {0}")]
    Unavailable(String),
    /// STS throttled the call (the account's AssumeRole rate is spent, shared with everything
    /// else in it): retrying later helps, and so does calling less.
    #[error("STS throttled AssumeRole: {0}")]
    Throttled(String),
}

impl StsError {
    /// What pods and their namespaces' Events are told: the kind of failure and STS's error
    /// code. Not STS's message, which names the server's own identity (its role and the
    /// instance it runs on), nor a transport error's details: the server's log has those.
    pub fn public(&self) -> String {
        match self {
            StsError::Refused { code, .. } => format!(
                "STS refused AssumeRole ({code}); the podiam server's log has STS's message"
            ),
            StsError::Unavailable(_) => "STS unavailable; retry shortly".to_string(),
            StsError::Throttled(_) => "STS throttled AssumeRole; retry shortly".to_string(),
        }
    }
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

/// How the server reaches STS.
#[derive(Clone, Debug)]
pub struct StsOptions {
    /// Region of the (regional) STS endpoint.
    pub region: String,
    /// Endpoint URL instead of the region's.
    pub endpoint: Option<String>,
    /// A role assumed first, with the server's own credentials; pods' roles are then
    /// assumed with its credentials (role chaining; STS caps chained sessions at 1 hour).
    pub via_role: Option<String>,
    /// Time limit of one attempt (connect and answer); the cache makes up to three.
    pub attempt_timeout: Duration,
}

/// The session name of the server's own session on `--assume-role-arn`.
pub const INTERMEDIATE_SESSION_NAME: &str = "podiam-server";

impl SdkAssumeRole {
    /// Builds an STS client from the default credential chain (env, web identity, the node's
    /// instance profile…), through the intermediate role if one is given.
    pub async fn new(options: StsOptions) -> SdkAssumeRole {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(options.attempt_timeout.min(Duration::from_secs(3)))
            .operation_attempt_timeout(options.attempt_timeout)
            .operation_timeout(options.attempt_timeout)
            .build();
        // One attempt per call: the cache makes the further attempts, each within the STS
        // budget, which the SDK's own retries would bypass.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(options.region))
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
        if let Some(endpoint) = options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        let client = match options.via_role {
            None => aws_sdk_sts::Client::new(&config),
            Some(via_role) => {
                // The provider refreshes the intermediate session itself before it expires.
                let provider = aws_config::sts::AssumeRoleProvider::builder(via_role)
                    .session_name(INTERMEDIATE_SESSION_NAME)
                    .configure(&config)
                    .build()
                    .await;
                let chained = aws_sdk_sts::config::Builder::from(&config)
                    .credentials_provider(provider)
                    .build();
                aws_sdk_sts::Client::from_conf(chained)
            }
        };
        SdkAssumeRole { client }
    }
}

/// Reads the `Date` of STS's answer as it arrives: how far the server's clock is from STS's.
/// Holds (STS's `Date` in ms, the server's clock minus it), of the last answer with one.
#[derive(Clone, Debug, Default)]
struct StsClockReading(Arc<Mutex<Option<(i64, i64)>>>);

impl StsClockReading {
    /// The server's clock minus STS's (ms) for credentials ending at `expiration_ms` (STS's
    /// time) after a session of `duration`: 0 if no answer had a readable `Date`, if the two
    /// clocks are under [`CLOCK_OFFSET_IGNORED`] apart, or if the `Date` does not fit the
    /// session (its end not `duration` after it, give or take a minute: not STS's own time,
    /// but something's between, which is not taken).
    fn offset_ms(&self, expiration_ms: i64, duration: Duration) -> i64 {
        let Some((date_ms, offset)) = *self.0.lock().unwrap_or_else(|e| e.into_inner()) else {
            return 0;
        };
        let session_ms = duration.as_millis() as i64;
        let fits = (expiration_ms - date_ms - session_ms).abs() <= 60_000;
        if !fits || offset.unsigned_abs() < CLOCK_OFFSET_IGNORED.as_millis() as u64 {
            0
        } else {
            offset
        }
    }
}

impl aws_sdk_sts::config::Intercept for StsClockReading {
    fn name(&self) -> &'static str {
        "StsClockReading"
    }

    fn read_after_transmit(
        &self,
        context: &aws_sdk_sts::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _components: &aws_sdk_sts::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sts::config::ConfigBag,
    ) -> Result<(), aws_sdk_sts::error::BoxError> {
        let sts_ms = context
            .response()
            .headers()
            .get("date")
            .and_then(|date| {
                aws_sdk_sts::primitives::DateTime::from_str(
                    date,
                    aws_sdk_sts::primitives::DateTimeFormat::HttpDate,
                )
                .ok()
            })
            .and_then(|date| date.to_millis().ok());
        if let Some(sts_ms) = sts_ms {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((sts_ms, SystemClock.now_ms() - sts_ms));
        }
        Ok(())
    }
}

/// What an error code STS answered with means for the caller.
fn classify(code: String, message: String) -> StsError {
    if REFUSAL_CODES.contains(&code.as_str()) {
        StsError::Refused { code, message }
    } else if THROTTLING_CODES.contains(&code.as_str()) {
        StsError::Throttled(format!("{code}: {message}"))
    } else {
        StsError::Unavailable(format!("{code}: {message}"))
    }
}

/// Exports the offset between the server's clock and STS's, and says so in the log when it
/// is first seen or is [`CLOCK_OFFSET_IGNORED`] or more from the offset last logged (not
/// again as readings at the threshold come and go): the session ends pods are told are
/// STS's, which their SDKs read on their nodes' clocks.
fn note_clock_offset(gauge: &prometheus_client::metrics::gauge::Gauge, offset_ms: i64) {
    static LAST_LOGGED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let offset_s = offset_ms / 1000;
    gauge.set(offset_s);
    let logged = LAST_LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    if offset_s != 0 && (offset_s - logged).unsigned_abs() >= CLOCK_OFFSET_IGNORED.as_secs() {
        LAST_LOGGED.store(offset_s, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            offset_seconds = offset_s,
            "this server's clock is off from STS's (positive: ahead); credentials are judged \
             by STS's time, but check the node's time synchronisation"
        );
    }
}

/// Error codes with which STS (and AWS's other query APIs) say a caller is over its rate.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
];

/// Error codes about the role asked for or the request for it: the role's answer, which
/// retrying will not change. Codes about the server's own credentials (`InvalidClientTokenId`,
/// `SignatureDoesNotMatch` — also a clock off by minutes —, `ExpiredToken`) are not among them:
/// they say nothing of the role, and the server's credentials may come right (a new instance
/// profile session, the clock corrected), so they count as STS being unusable, and the
/// credentials a key holds are served on while they last.
const REFUSAL_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
    "ValidationError",
    "InvalidParameterValue",
];

impl AssumeRole for SdkAssumeRole {
    fn assume_role(&self, request: AssumeRequest) -> BoxFuture<'static, Result<Issued, StsError>> {
        let client = self.client.clone();
        Box::pin(async move {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            let duration = i32::try_from(request.duration.as_secs()).unwrap_or(i32::MAX);
            let reading = StsClockReading::default();
            let tags = request
                .key
                .tags
                .iter()
                .map(|(key, value)| {
                    aws_sdk_sts::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build()
                        .map_err(|e| StsError::Unavailable(format!("building a session tag: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let result = client
                .assume_role()
                .role_arn(&request.key.role_arn)
                .role_session_name(&request.key.session_name)
                .set_external_id(request.key.external_id.clone())
                .set_transitive_tag_keys((request.key.transitive_tags && !tags.is_empty()).then(
                    || {
                        request
                            .key
                            .tags
                            .iter()
                            .map(|(key, _)| key.clone())
                            .collect()
                    },
                ))
                .set_tags((!tags.is_empty()).then_some(tags))
                .duration_seconds(duration)
                .customize()
                .interceptor(reading.clone())
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                Err(err) => {
                    let code = err.code().unwrap_or_default().to_string();
                    let message = err.message().unwrap_or_default().to_string();
                    return Err(if code.is_empty() {
                        StsError::Unavailable(
                            aws_sdk_sts::error::DisplayErrorContext(&err).to_string(),
                        )
                    } else {
                        classify(code, message)
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
                issued_unix: SystemClock.now_ms() / 1000,
                clock_offset_ms: reading.offset_ms(
                    creds.expiration().to_millis().unwrap_or_default(),
                    request.duration,
                ),
            })
        })
    }
}

/// Where the cache reads the time: milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system's clock: its wall time when first read, then the time since by the clock that
/// counts from boot (suspended time included). A step of the wall clock meanwhile (time
/// synchronisation correcting it) moves nothing the cache judged on it: credentials' expiry,
/// refusals remembered, back-offs. How far STS's clock is from it is read from each of STS's
/// answers ([`Issued::clock_offset_ms`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        static ANCHOR: std::sync::OnceLock<(i64, i64)> = std::sync::OnceLock::new();
        let (boot_ms, wall_ms) = ANCHOR.get_or_init(|| {
            let wall_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            (podiam_runtime::clock::since_boot_ms(), wall_ms)
        });
        wall_ms.saturating_add(podiam_runtime::clock::since_boot_ms() - boot_ms)
    }
}

/// How the cache treats time and failure.
#[derive(Clone, Debug)]
pub struct CachePolicy {
    /// Session length asked of STS.
    pub session_duration: Duration,
    /// Credentials are served while they have at least this much left.
    pub min_remaining: Duration,
    /// Credentials are refreshed this long after they were issued (half their life when
    /// unset), and in any case before they fall below `min_remaining`.
    pub refresh_after: Option<Duration>,
    /// While STS is failing, credentials with at least this much left are still served
    /// (better than nothing: SDKs will ask again soon).
    pub outage_floor: Duration,
    /// How long a refusal is remembered before STS is asked again.
    pub refusal_memory: Duration,
    /// First wait after a failed call; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// STS calls made at once by prefetch and background refresh.
    pub maintenance_concurrency: usize,
    /// At most this many STS calls start in any second (the [`Budget`]; 0: no limit).
    pub sts_rate: usize,
    /// Attempts per call when STS is unavailable (not when it refuses or throttles): the
    /// SDK makes one attempt each, so that every attempt passes the budget.
    pub attempts: u32,
}

impl CachePolicy {
    /// The defaults, with the given session length and served-life floor.
    pub fn new(session_duration: Duration, min_remaining: Duration) -> CachePolicy {
        CachePolicy {
            session_duration,
            min_remaining,
            refresh_after: None,
            // SDKs treat credentials with under 15 minutes as expiring and ask again; five
            // minutes still lets a pending call finish.
            outage_floor: Duration::from_secs(5 * 60),
            // Long enough to absorb a crash-looping pod's retries, short enough that a fixed
            // trust policy is picked up quickly.
            refusal_memory: Duration::from_secs(30),
            // client-go's and the AWS SDKs' retry bases are of this order; STS throttling
            // recovers within seconds to a minute.
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            // STS's default AssumeRole rate is far higher; this only bounds a burst of
            // prefetches when many roles appear at once.
            maintenance_concurrency: 8,
            sts_rate: 0,
            attempts: 1,
        }
    }
}

/// What the cache knows about one key.
#[derive(Debug, Default)]
struct Entry {
    current: Option<Issued>,
    /// A remembered refusal and when to ask again (ms).
    refused: Option<(StsError, i64)>,
    failures: u32,
    /// No call before this time (ms) after a failure.
    retry_at_ms: i64,
    last_error: Option<StsError>,
}

impl Entry {
    fn servable(&self, now_ms: i64, floor: Duration) -> Option<&Issued> {
        self.current
            .as_ref()
            .filter(|c| c.expires_ms() - now_ms >= floor.as_millis() as i64)
    }

    /// Whether the credentials are due for refresh (or there are none): past the refresh
    /// point (half their life by default), or about to fall below the served-life floor.
    fn refresh_due(&self, now_ms: i64, policy: &CachePolicy) -> bool {
        match &self.current {
            None => true,
            Some(c) => {
                let issued_ms = c.issued_unix.saturating_mul(1000);
                let after_ms = match policy.refresh_after {
                    Some(after) => after.as_millis() as i64,
                    None => (c.expires_ms() - issued_ms) / 2,
                };
                let due_ms = (issued_ms + after_ms)
                    .min(c.expires_ms() - policy.min_remaining.as_millis() as i64);
                now_ms >= due_ms
            }
        }
    }

    fn blocked(&self, now_ms: i64) -> bool {
        self.refused
            .as_ref()
            .is_some_and(|(_, until)| now_ms < *until)
            || now_ms < self.retry_at_ms
    }
}

/// How long a request waits for a call already in flight for its key before it is served
/// what the key holds above the outage floor: far under the agents' deadline for a server's
/// answer (900 ms), far over what STS takes when it is well.
const IN_FLIGHT_PATIENCE: Duration = Duration::from_millis(300);

/// One key: its entry, locked by the call in flight, and a copy of the entry's credentials
/// that requests read without waiting for that call (a refresh, or a slow STS).
#[derive(Debug, Default)]
struct KeySlot {
    entry: Arc<AsyncMutex<Entry>>,
    served: ServedCopy,
}

impl KeySlot {
    /// The credentials held, if they have at least `floor` left at `now_ms`, read without
    /// the entry's lock.
    fn servable(&self, now_ms: i64, floor: Duration) -> Option<Issued> {
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served
            .as_ref()
            .filter(|c| c.expires_ms() - now_ms >= floor.as_millis() as i64)
            .cloned()
    }
}

type Slot = Arc<KeySlot>;

/// A slot's copy of its entry's credentials, written when a call ends.
type ServedCopy = Arc<Mutex<Option<Issued>>>;

/// How a key's STS calls are going.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyHealth {
    /// Never asked, or the last call succeeded.
    Fine,
    /// A call is in flight.
    Busy,
    /// The last call failed (a refusal still remembered, or an outage).
    Failing(StsError),
}

/// Credentials per (role, external ID, session name), fetched once however many ask.
pub struct CredentialCache {
    sts: Arc<dyn AssumeRole>,
    clock: Arc<dyn Clock>,
    policy: CachePolicy,
    slots: Mutex<HashMap<CacheKey, Slot>>,
    tasks: TaskTracker,
    calls: StsCallCounters,
    budget: Arc<Budget>,
}

/// STS calls made, by outcome (exported as `podiam_server_sts_calls_total`).
#[derive(Clone, Debug, Default)]
pub struct StsCallCounters {
    pub ok: prometheus_client::metrics::counter::Counter,
    pub refused: prometheus_client::metrics::counter::Counter,
    pub unavailable: prometheus_client::metrics::counter::Counter,
    pub throttled: prometheus_client::metrics::counter::Counter,
    /// Calls that waited for the budget, and upkeep's pauses after throttling.
    pub budget: BudgetCounters,
    /// The server's clock minus STS's at the last successful call (seconds; 0 under
    /// [`CLOCK_OFFSET_IGNORED`]), exported as `podiam_server_sts_clock_offset_seconds`.
    pub clock_offset: prometheus_client::metrics::gauge::Gauge,
}

impl fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCache")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        clock: Arc<dyn Clock>,
        policy: CachePolicy,
        calls: StsCallCounters,
    ) -> Self {
        let budget = Arc::new(Budget::new(policy.sts_rate, calls.budget.clone()));
        CredentialCache {
            sts,
            clock,
            policy,
            slots: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            calls,
            budget,
        }
    }

    /// The time by the cache's clock (ms since the Unix epoch).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn slot(&self, key: &CacheKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Credentials for `key` with at least `min_remaining` left: from the cache, from STS,
    /// or — while STS is failing — the still-valid ones we have. `tenant`: whose request it
    /// is (the pod's namespace), for the budget's turns.
    pub async fn get(&self, key: CacheKey, tenant: &str) -> Result<Issued, StsError> {
        let slot = self.slot(&key);
        // Served while a call for the key is in flight too: a refresh holds the entry's lock
        // for as long as STS takes, and pods must not wait for it.
        if let Some(issued) = slot.servable(self.clock.now_ms(), self.policy.min_remaining) {
            return Ok(issued);
        }
        let served = Arc::clone(&slot.served);
        let lock = Arc::clone(&slot.entry).lock_owned();
        tokio::pin!(lock);
        // A call in flight for the key (a refresh, another pod's miss) is waited for a moment
        // only: if STS is slow, what the key still holds above the outage floor is served,
        // rather than the pod's request outliving its agent's deadline.
        let entry = match tokio::time::timeout(IN_FLIGHT_PATIENCE, &mut lock).await {
            Ok(entry) => entry,
            Err(_) => match slot.servable(self.clock.now_ms(), self.policy.outage_floor) {
                Some(issued) => return Ok(issued),
                None => lock.await,
            },
        };
        let now = self.clock.now_ms();
        if let Some(issued) = entry.servable(now, self.policy.min_remaining) {
            return Ok(issued.clone());
        }
        if let Some((refusal, until)) = &entry.refused
            && now < *until
        {
            return Err(refusal.clone());
        }
        if now < entry.retry_at_ms {
            return self.fallback(&entry, now);
        }
        let claim = Claim {
            priority: Priority::Request,
            tenant: Arc::from(tenant),
        };
        self.call(key, (entry, served), claim, false).await
    }

    /// What a failed or backed-off key can still serve.
    fn fallback(&self, entry: &Entry, now_ms: i64) -> Result<Issued, StsError> {
        if let Some(issued) = entry.servable(now_ms, self.policy.outage_floor) {
            return Ok(issued.clone());
        }
        Err(entry
            .last_error
            .clone()
            .unwrap_or_else(|| StsError::Unavailable("STS is backing off after failures".into())))
    }

    /// Calls STS for `key` in a detached task holding the entry's lock, once the budget lets
    /// the call start (again for each attempt; `acquired`: the first already has its place),
    /// and records the outcome, in the entry and in the slot's copy of its credentials.
    async fn call(
        &self,
        key: CacheKey,
        (mut entry, served): (tokio::sync::OwnedMutexGuard<Entry>, ServedCopy),
        claim: Claim,
        acquired: bool,
    ) -> Result<Issued, StsError> {
        let sts = Arc::clone(&self.sts);
        let clock = Arc::clone(&self.clock);
        let policy = self.policy.clone();
        let calls = self.calls.clone();
        let budget = Arc::clone(&self.budget);
        let role_arn = key.role_arn.clone();
        let request = AssumeRequest {
            key,
            duration: policy.session_duration,
        };
        let handle = self.tasks.spawn(async move {
            let result = attempts(&*sts, &budget, &calls, request, claim, acquired, &policy).await;
            let now = clock.now_ms();
            let outcome = match result {
                Ok(issued) => {
                    calls.ok.inc();
                    budget.succeeded();
                    note_clock_offset(&calls.clock_offset, issued.clock_offset_ms);
                    *entry = Entry {
                        current: Some(issued.clone()),
                        ..Entry::default()
                    };
                    Ok(issued)
                }
                Err(refusal @ StsError::Refused { .. }) => {
                    calls.refused.inc();
                    // Once per refusal remembered: what pods are told is only its code.
                    tracing::warn!(
                        role = %podiam_runtime::telemetry::Escaped(&role_arn),
                        error = %podiam_runtime::telemetry::Escaped(&refusal),
                        "STS refused AssumeRole"
                    );
                    // The role's trust no longer lets us in: stop serving what we had.
                    entry.current = None;
                    entry.refused = Some((
                        refusal.clone(),
                        now + policy.refusal_memory.as_millis() as i64,
                    ));
                    Err(refusal)
                }
                Err(error @ (StsError::Unavailable(_) | StsError::Throttled(_))) => {
                    if matches!(error, StsError::Throttled(_)) {
                        calls.throttled.inc();
                        budget.throttled();
                    } else {
                        calls.unavailable.inc();
                    }
                    entry.failures = entry.failures.saturating_add(1);
                    entry.retry_at_ms = now + backoff(&policy, entry.failures).as_millis() as i64;
                    entry.last_error = Some(error.clone());
                    match entry.servable(now, policy.outage_floor) {
                        Some(issued) => Ok(issued.clone()),
                        None => Err(error),
                    }
                }
            };
            *served.lock().unwrap_or_else(|e| e.into_inner()) = entry.current.clone();
            outcome
        });
        handle
            .await
            .unwrap_or_else(|e| Err(StsError::Unavailable(format!("STS call task failed: {e}"))))
    }

    /// Background upkeep, given the keys live pods need now and which of them this replica
    /// owns: drops every key not needed, prefetches owned keys not yet fetched, and refreshes
    /// owned credentials past half their life — refreshes first, at most
    /// `maintenance_concurrency` calls at once and within the budget, none for keys in
    /// backoff or with a remembered refusal, none for keys a request is already fetching.
    /// A key this replica does not own is kept while needed (a pod asked here for it), and
    /// left to its owner's upkeep.
    pub async fn maintain(
        &self,
        needed: &HashSet<CacheKey>,
        owns: &(dyn Fn(&CacheKey) -> bool + Sync),
    ) {
        let mut due: Vec<(CacheKey, Slot, Priority)> = {
            let now = self.clock.now_ms();
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            // Keep what a request is using (holding the slot, locked or about to lock it:
            // dropped, its call's outcome would be lost to the next request), and failure
            // memory until it runs out: dropping it would let the next request call STS at
            // once.
            slots.retain(|key, slot| {
                needed.contains(key)
                    || Arc::strong_count(slot) > 1
                    || slot
                        .entry
                        .try_lock()
                        .map_or(true, |entry| entry.blocked(now))
            });
            for key in needed {
                slots.entry(key.clone()).or_default();
            }
            slots
                .iter()
                .filter(|(key, _)| needed.contains(*key) && owns(key))
                .filter_map(|(key, slot)| {
                    let priority = match slot.entry.try_lock() {
                        Ok(entry) if entry.current.is_some() => Priority::Refresh,
                        Ok(_) => Priority::Prefetch,
                        Err(_) => return None, // a request is fetching it right now
                    };
                    Some((key.clone(), Arc::clone(slot), priority))
                })
                .collect()
        };
        // The semaphore below is first come, first served: refreshes come first.
        due.sort_by_key(|(_, _, priority)| *priority as u8);
        let limit = Arc::new(tokio::sync::Semaphore::new(
            self.policy.maintenance_concurrency.max(1),
        ));
        let upkeep: Arc<str> = Arc::from(UPKEEP);
        let refreshes = due.into_iter().map(|(key, slot, priority)| {
            let limit = Arc::clone(&limit);
            let upkeep = Arc::clone(&upkeep);
            async move {
                let Ok(_permit) = limit.acquire().await else {
                    return;
                };
                let due = |entry: &Entry| {
                    let now = self.clock.now_ms();
                    entry.refresh_due(now, &self.policy) && !entry.blocked(now)
                };
                // Asked again now: the replica set may have changed while this pass waited (a
                // cluster start, where each replica owns everything until it sees the others).
                if !owns(&key) || !slot.entry.try_lock().is_ok_and(|entry| due(&entry)) {
                    return;
                }
                // The budget first, the entry's lock after: a pod asking for this key while
                // upkeep waits for the budget must not wait behind it.
                let claim = Claim {
                    priority,
                    tenant: upkeep,
                };
                self.budget.acquire(priority, &claim.tenant).await;
                let Ok(entry) = Arc::clone(&slot.entry).try_lock_owned() else {
                    return; // a request is fetching it right now
                };
                if !due(&entry) {
                    return; // a request fetched it meanwhile
                }
                let served = Arc::clone(&slot.served);
                let _ = self.call(key, (entry, served), claim, true).await;
            }
        });
        futures::future::join_all(refreshes).await;
    }

    /// Whether `key`'s last STS call failed, without waiting for a call in flight.
    pub fn health(&self, key: &CacheKey) -> KeyHealth {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(key) {
                Some(slot) => Arc::clone(slot),
                None => return KeyHealth::Fine,
            }
        };
        let Ok(entry) = slot.entry.try_lock() else {
            return KeyHealth::Busy;
        };
        let now = self.clock.now_ms();
        if let Some((refusal, until)) = &entry.refused
            && now < *until
        {
            return KeyHealth::Failing(refusal.clone());
        }
        match &entry.last_error {
            Some(error) if entry.failures > 0 => KeyHealth::Failing(error.clone()),
            _ => KeyHealth::Fine,
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for detached STS calls to finish (at shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Whose call it is, for the budget.
#[derive(Clone, Debug)]
struct Claim {
    priority: Priority,
    /// The namespace of the pod asking, or [`UPKEEP`].
    tenant: Arc<str>,
}

/// One call: up to `policy.attempts` attempts while STS is unavailable, each once the budget
/// lets it start, a short jittered pause between them. Failed attempts before the last are
/// counted here; the call's outcome is counted by the caller. Upkeep's calls (prefetches,
/// refreshes) make one attempt: the key's lock is held for the whole call, and a pod's
/// request for the key must not wait behind an upkeep attempt queued for the budget after
/// every pod's (the next upkeep pass after the backoff tries again).
async fn attempts(
    sts: &dyn AssumeRole,
    budget: &Budget,
    calls: &StsCallCounters,
    request: AssumeRequest,
    claim: Claim,
    mut acquired: bool,
    policy: &CachePolicy,
) -> Result<Issued, StsError> {
    let most = match claim.priority {
        Priority::Request => policy.attempts,
        Priority::Refresh | Priority::Prefetch => 1,
    };
    let mut attempt = 1;
    loop {
        if !acquired {
            budget.acquire(claim.priority, &claim.tenant).await;
        }
        acquired = false;
        match sts.assume_role(request.clone()).await {
            Err(StsError::Unavailable(why)) if attempt < most => {
                calls.unavailable.inc();
                tracing::debug!(attempt, %why, "STS unavailable; trying again");
                let pause = RETRY_PAUSE.saturating_mul(1 << (attempt - 1).min(4));
                tokio::time::sleep(pause / 2 + (pause / 2).mul_f64(fastrand::f64())).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The pause before a call's second attempt (doubling for a third): of the order of the AWS
/// SDKs' own, and short beside a pod's one-second metadata budget.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The wait after the `failures`-th failure in a row: base × 2^(n-1), capped, with
/// "equal jitter" (half fixed, half random) so agents' retries do not synchronise.
fn backoff(policy: &CachePolicy, failures: u32) -> Duration {
    let exp = policy
        .backoff_base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

    /// A clock the test moves by hand.
    #[derive(Default)]
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl ManualClock {
        fn advance(&self, by: Duration) {
            self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
        }
    }

    /// An STS that issues credentials for `lifetime` from the manual clock's now, can be held
    /// at a gate, and can be made to fail.
    struct FakeSts {
        clock: Arc<ManualClock>,
        calls: AtomicUsize,
        lifetime: Duration,
        gate: tokio::sync::Semaphore,
        down: AtomicBool,
        /// Fails as an STS that cannot be reached.
        unreachable: AtomicBool,
        refuse: AtomicBool,
        /// How far STS's clock is behind the manual clock (ms; negative: ahead), as the
        /// `Date` of its answers tells the real client.
        behind_ms: AtomicI64,
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
                if me.down.load(Ordering::SeqCst) {
                    return Err(StsError::Throttled("Throttling: Rate exceeded".into()));
                }
                if me.unreachable.load(Ordering::SeqCst) {
                    return Err(StsError::Unavailable("connection refused".into()));
                }
                if me.refuse.load(Ordering::SeqCst) {
                    return Err(StsError::Refused {
                        code: "AccessDenied".into(),
                        message: format!("not {}", request.key.role_arn),
                    });
                }
                let now = me.clock.now_ms() / 1000;
                let behind_ms = me.behind_ms.load(Ordering::SeqCst);
                Ok(Issued {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration_unix: now - behind_ms / 1000 + me.lifetime.as_secs() as i64,
                    issued_unix: now,
                    clock_offset_ms: behind_ms,
                })
            })
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const HALF: Duration = Duration::from_secs(1800);
    const MINUTE: Duration = Duration::from_secs(60);

    struct Rig {
        clock: Arc<ManualClock>,
        sts: Arc<FakeSts>,
        cache: Arc<CredentialCache>,
    }

    fn rig(lifetime: Duration, open: bool) -> Rig {
        rig_with(lifetime, open, CachePolicy::new(HOUR, HALF))
    }

    fn rig_with(lifetime: Duration, open: bool, policy: CachePolicy) -> Rig {
        let clock = Arc::new(ManualClock(AtomicI64::new(1_800_000_000_000)));
        let sts = Arc::new(FakeSts {
            clock: Arc::clone(&clock),
            calls: AtomicUsize::new(0),
            lifetime,
            gate: tokio::sync::Semaphore::new(if open { 100_000 } else { 0 }),
            down: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            behind_ms: AtomicI64::new(0),
        });
        let cache = Arc::new(CredentialCache::new(
            Arc::new(Arc::clone(&sts)),
            Arc::clone(&clock) as Arc<dyn Clock>,
            policy,
            StsCallCounters::default(),
        ));
        Rig { clock, sts, cache }
    }

    impl Rig {
        fn calls(&self) -> usize {
            self.sts.calls.load(Ordering::SeqCst)
        }
    }

    fn key(role: &str) -> CacheKey {
        CacheKey {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            external_id: None,
            session_name: "podiam".into(),
            tags: Vec::new(),
            transitive_tags: false,
        }
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_call_and_hits_make_none() {
        let r = rig(HOUR, false);
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let cache = Arc::clone(&r.cache);
                tokio::spawn(async move { cache.get(key("a"), "ns").await })
            })
            .collect();
        r.sts.gate.add_permits(100_000);
        for w in waiters {
            assert_eq!(
                w.await.expect("joins").expect("creds").access_key_id,
                "ASIA0"
            );
        }
        r.cache.get(key("a"), "ns").await.expect("hit");
        assert_eq!(r.calls(), 1);
        r.cache.get(key("b"), "ns").await.expect("other key");
        assert_eq!(r.calls(), 2);
        assert_eq!(r.cache.calls.ok.get(), 2);
    }

    /// A server 45 minutes ahead of STS: STS's `Expiration`, read on the server's clock, is
    /// 15 minutes off, under the 30-minute floor, and every request would call STS. Judged on
    /// STS's time (the offset its answer's `Date` gave), one call serves the session until
    /// its refresh point, half the session later.
    #[tokio::test]
    async fn a_server_clock_ahead_of_sts_still_makes_one_call_per_session() {
        let r = rig(HOUR, true);
        r.sts.behind_ms.store(45 * 60 * 1000, Ordering::SeqCst);
        let needed: HashSet<CacheKey> = [key("a")].into();
        for minute in 0..29 {
            let issued = r.cache.get(key("a"), "ns").await.expect("creds");
            assert_eq!(issued.access_key_id, "ASIA0");
            assert_eq!(
                issued.valid_for_ms(r.clock.now_ms()),
                (60 - minute) * 60 * 1000,
                "what agents are told: the session's time left by STS's clock"
            );
            r.cache.maintain(&needed, &|_| true).await;
            r.clock.advance(MINUTE);
        }
        assert_eq!(r.calls(), 1, "one call for the first 29 minutes");
        r.clock.advance(2 * MINUTE);
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 2, "refreshed past half the session");
    }

    /// A server 45 minutes behind STS: STS's `Expiration`, read on the server's clock, is an
    /// hour and 45 minutes off. Judged on STS's time, the credentials are served an hour and
    /// no longer, even while STS is failing (not down to what would be 45 minutes past their
    /// end).
    #[tokio::test]
    async fn a_server_clock_behind_sts_serves_nothing_past_its_end() {
        let r = rig(HOUR, true);
        r.sts.behind_ms.store(-45 * 60 * 1000, Ordering::SeqCst);
        let issued = r.cache.get(key("a"), "ns").await.expect("creds");
        assert_eq!(issued.valid_for_ms(r.clock.now_ms()), 60 * 60 * 1000);
        r.sts.unreachable.store(true, Ordering::SeqCst);
        r.clock.advance(54 * MINUTE);
        let held = r
            .cache
            .get(key("a"), "ns")
            .await
            .expect("6 minutes left: served");
        assert_eq!(held.access_key_id, "ASIA0");
        r.clock.advance(2 * MINUTE);
        assert!(
            r.cache.get(key("a"), "ns").await.is_err(),
            "4 minutes left by STS's time: under the outage floor"
        );
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_fail_the_others() {
        let r = rig(HOUR, false);
        let first = {
            let cache = Arc::clone(&r.cache);
            tokio::spawn(async move { cache.get(key("a"), "ns").await })
        };
        while r.calls() == 0 {
            tokio::task::yield_now().await;
        }
        let second = {
            let cache = Arc::clone(&r.cache);
            tokio::spawn(async move { cache.get(key("a"), "ns").await })
        };
        first.abort();
        r.sts.gate.add_permits(100_000);
        let creds = second
            .await
            .expect("joins")
            .expect("the second caller gets credentials");
        assert_eq!(creds.access_key_id, "ASIA0");
        assert_eq!(r.calls(), 1);
    }

    /// Key `a` fetched, then STS hung (the returned permit held) and a refresh of `a` started
    /// `after` later: the refresh is in flight and holds the key when this returns.
    async fn refresh_hanging(r: &Rig, after: Duration) -> tokio::task::JoinHandle<()> {
        r.sts.gate.add_permits(1);
        r.cache.get(key("a"), "ns").await.expect("first fetch");
        r.sts.gate.forget_permits(1);
        r.clock.advance(after);
        let upkeep = {
            let cache = Arc::clone(&r.cache);
            tokio::spawn(async move { cache.maintain(&[key("a")].into(), &|_| true).await })
        };
        for _ in 0..10_000 {
            if r.calls() >= 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(r.calls(), 2, "the refresh is under way");
        assert_eq!(r.cache.health(&key("a")), KeyHealth::Busy);
        upkeep
    }

    #[tokio::test]
    async fn a_refresh_in_flight_does_not_hold_up_requests_for_fresh_credentials() {
        let policy = CachePolicy {
            refresh_after: Some(20 * MINUTE),
            ..CachePolicy::new(HOUR, HALF)
        };
        let r = rig_with(HOUR, false, policy);
        let upkeep = refresh_hanging(&r, 21 * MINUTE).await;
        let creds = r
            .cache
            .get(key("a"), "ns")
            .now_or_never()
            .expect("answered without waiting for the refresh")
            .expect("the held credentials");
        assert_eq!(creds.access_key_id, "ASIA0");
        r.sts.gate.add_permits(1);
        upkeep.await.expect("upkeep ends");
        let creds = r.cache.get(key("a"), "ns").await.expect("refreshed");
        assert_eq!((creds.access_key_id.as_str(), r.calls()), ("ASIA1", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_in_flight_serves_what_is_left_above_the_outage_floor() {
        let r = rig(HOUR, false);
        let upkeep = refresh_hanging(&r, 31 * MINUTE).await;
        // Below the floor, so the request waits for the refresh: a moment only.
        let asked = tokio::time::Instant::now();
        let creds = r
            .cache
            .get(key("a"), "ns")
            .await
            .expect("still-valid credentials");
        assert_eq!(creds.access_key_id, "ASIA0");
        assert_eq!(asked.elapsed(), IN_FLIGHT_PATIENCE);
        assert_eq!(r.calls(), 2, "no call of its own");
        // Nothing left above the outage floor: it waits for the call, however long.
        r.clock.advance(25 * MINUTE);
        let waiting = {
            let cache = Arc::clone(&r.cache);
            tokio::spawn(async move { cache.get(key("a"), "ns").await })
        };
        tokio::time::sleep(10 * IN_FLIGHT_PATIENCE).await;
        assert!(!waiting.is_finished(), "waits for the call in flight");
        r.sts.gate.add_permits(1);
        upkeep.await.expect("upkeep ends");
        let creds = waiting.await.expect("joins").expect("the refreshed ones");
        assert_eq!((creds.access_key_id.as_str(), r.calls()), ("ASIA1", 2));
    }

    #[tokio::test]
    async fn credentials_below_the_floor_are_refreshed_not_served() {
        // STS hands out credentials that already have less than the floor left.
        let r = rig(Duration::from_secs(600), true);
        r.cache.get(key("a"), "ns").await.expect("first");
        r.cache.get(key("a"), "ns").await.expect("second");
        assert_eq!(r.calls(), 2, "stale credentials are never reused");
    }

    #[tokio::test]
    async fn maintenance_prefetches_refreshes_at_half_life_and_drops_unneeded_keys() {
        let r = rig(HOUR, true);
        let needed: HashSet<CacheKey> = [key("a"), key("b")].into();
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 2, "both keys prefetched");
        r.cache.get(key("a"), "ns").await.expect("hit");
        assert_eq!(r.calls(), 2, "a prefetched key is a hit");
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 2, "nothing due yet");
        r.clock.advance(31 * MINUTE);
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 4, "past half-life: refreshed in the background");
        let creds = r.cache.get(key("a"), "ns").await.expect("hit");
        assert!(
            creds.expiration_unix * 1000 - r.clock.now_ms() > 55 * 60 * 1000,
            "fresh credentials served"
        );
        r.cache.maintain(&[key("a")].into(), &|_| true).await;
        assert_eq!(r.cache.len(), 1, "b is no longer needed");
    }

    #[tokio::test]
    async fn upkeep_leaves_other_replicas_keys_alone_and_a_pod_asking_here_gets_them_once() {
        let r = rig(HOUR, true);
        let needed: HashSet<CacheKey> = [key("mine"), key("theirs")].into();
        let mine = |k: &CacheKey| k.role_arn.ends_with("/mine");
        r.cache.maintain(&needed, &mine).await;
        assert_eq!(r.calls(), 1, "only the owned key prefetched");
        // A pod asks this replica for the other key (its owner is away): fetched once…
        r.cache
            .get(key("theirs"), "ns")
            .await
            .expect("fetched on demand");
        r.cache.get(key("theirs"), "ns").await.expect("then a hit");
        assert_eq!(r.calls(), 2);
        // …kept while needed, and left to its owner's refresh.
        r.clock.advance(31 * MINUTE);
        r.cache.maintain(&needed, &mine).await;
        assert_eq!(r.calls(), 3, "only the owned key refreshed");
        assert_eq!(r.cache.len(), 2);
        // The other replica leaves: the key is this one's now, and refreshed.
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_waits_for_the_budget_and_unavailable_calls_are_tried_three_times() {
        let policy = CachePolicy {
            sts_rate: 2,
            attempts: 3,
            ..CachePolicy::new(HOUR, HALF)
        };
        let r = rig_with(HOUR, true, policy);
        r.sts.unreachable.store(true, Ordering::SeqCst);
        let began = tokio::time::Instant::now();
        let error = r.cache.get(key("a"), "ns").await.expect_err("STS is down");
        assert!(matches!(error, StsError::Unavailable(_)), "{error:?}");
        assert_eq!(r.calls(), 3, "three attempts");
        // Two attempts in the first window, the third in the next.
        assert!(
            began.elapsed() >= crate::budget::WINDOW,
            "{:?}",
            began.elapsed()
        );
        assert_eq!(r.cache.calls.unavailable.get(), 3);
        assert_eq!(r.cache.calls.budget.waits[0].get(), 1);
    }

    /// A prefetch that finds STS unavailable makes one attempt and lets go of the key: a pod
    /// asking for it meanwhile is answered at once, not after the prefetch's further attempts
    /// have each waited for the budget behind every pod's call.
    #[tokio::test(start_paused = true)]
    async fn a_failing_prefetch_does_not_hold_the_key_for_further_attempts() {
        let policy = CachePolicy {
            sts_rate: 1,
            attempts: 3,
            ..CachePolicy::new(HOUR, HALF)
        };
        let r = rig_with(HOUR, true, policy);
        r.sts.unreachable.store(true, Ordering::SeqCst);
        let needed: HashSet<CacheKey> = [key("a")].into();
        let upkeep = {
            let cache = Arc::clone(&r.cache);
            tokio::spawn(async move { cache.maintain(&needed, &|_| true).await })
        };
        while r.calls() == 0 {
            tokio::task::yield_now().await;
        }
        let began = tokio::time::Instant::now();
        let error = r.cache.get(key("a"), "ns").await.expect_err("STS is down");
        assert!(matches!(error, StsError::Unavailable(_)), "{error:?}");
        assert!(
            began.elapsed() < IN_FLIGHT_PATIENCE + Duration::from_millis(1),
            "the pod waited {:?}",
            began.elapsed()
        );
        upkeep.await.expect("upkeep ends");
        assert_eq!(r.calls(), 1, "one attempt for the prefetch");
    }

    #[tokio::test]
    async fn a_configured_refresh_point_is_kept_and_never_passes_the_floor() {
        let policy = CachePolicy {
            refresh_after: Some(10 * MINUTE),
            ..CachePolicy::new(HOUR, HALF)
        };
        let r = rig_with(HOUR, true, policy);
        let needed: HashSet<CacheKey> = [key("a")].into();
        r.cache.maintain(&needed, &|_| true).await;
        r.clock.advance(9 * MINUTE);
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 1, "before the refresh point");
        r.clock.advance(2 * MINUTE);
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 2, "refreshed 10 minutes after issue");

        // A refresh point past the floor is pulled in to the floor.
        let late = CachePolicy {
            refresh_after: Some(50 * MINUTE),
            ..CachePolicy::new(HOUR, HALF)
        };
        let r = rig_with(HOUR, true, late);
        r.cache.maintain(&needed, &|_| true).await;
        r.clock.advance(30 * MINUTE);
        r.cache.maintain(&needed, &|_| true).await;
        assert_eq!(r.calls(), 2, "refreshed when 30 minutes were left");
    }

    #[tokio::test]
    async fn a_five_minute_sts_outage_is_absorbed_and_recovers_by_itself() {
        let r = rig(HOUR, true);
        r.cache.maintain(&[key("cached")].into(), &|_| true).await;
        // A new pod with a new role appears just as STS goes down.
        let needed: HashSet<CacheKey> = [key("cached"), key("new-pod-role")].into();
        r.clock.advance(31 * MINUTE); // past half-life: refreshes will be attempted
        r.sts.down.store(true, Ordering::SeqCst);
        let calls_at_start = r.calls();
        // Five minutes of outage, in ten-second steps of maintenance and pod requests.
        for _ in 0..30 {
            r.cache.maintain(&needed, &|_| true).await;
            let cached = r.cache.get(key("cached"), "ns").await;
            assert!(
                cached.is_ok(),
                "a pod with cached credentials keeps getting them: {cached:?}"
            );
            let fresh = r.cache.get(key("new-pod-role"), "ns").await;
            assert!(
                matches!(&fresh, Err(StsError::Throttled(m)) if m.contains("Throttling")),
                "a new role gets a clear STS-unavailable answer: {fresh:?}"
            );
            r.clock.advance(Duration::from_secs(10));
        }
        // Without backoff: two keys, a maintenance pass and a request every 10 s → 120 calls.
        // With it (waits 0.5-1 s doubling to a 30-60 s cap, polled every 10 s) at most 15 per key.
        let during = r.calls() - calls_at_start;
        assert!(
            during <= 30,
            "backoff keeps STS from being hammered: {during} calls in 5 minutes"
        );
        r.sts.down.store(false, Ordering::SeqCst);
        // Recovery: within one maximum backoff, maintenance and requests succeed again.
        r.clock.advance(CachePolicy::new(HOUR, HALF).backoff_max);
        r.cache.maintain(&needed, &|_| true).await;
        let creds = r
            .cache
            .get(key("cached"), "ns")
            .await
            .expect("refreshed after recovery");
        assert!(creds.expiration_unix * 1000 - r.clock.now_ms() > 55 * 60 * 1000);
        r.cache
            .get(key("new-pod-role"), "ns")
            .await
            .expect("the new role works after recovery");
    }

    #[tokio::test]
    async fn refusals_pass_through_and_are_remembered_briefly() {
        let r = rig(HOUR, true);
        r.sts.refuse.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            assert!(matches!(
                r.cache.get(key("a"), "ns").await,
                Err(StsError::Refused { .. })
            ));
        }
        assert_eq!(r.calls(), 1, "a denied pod cannot hammer STS");
        r.sts.refuse.store(false, Ordering::SeqCst);
        r.clock.advance(Duration::from_secs(31));
        r.cache
            .get(key("a"), "ns")
            .await
            .expect("asked again after the memory");
        assert_eq!(r.calls(), 2);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = CachePolicy::new(HOUR, HALF);
        for failures in 1..20 {
            let cap = policy
                .backoff_base
                .saturating_mul(1u32 << (failures - 1).min(16))
                .min(policy.backoff_max);
            let wait = backoff(&policy, failures);
            assert!(
                wait >= cap / 2 && wait <= cap,
                "{failures}: {wait:?} vs {cap:?}"
            );
        }
    }

    /// An offset is taken from a `Date` that fits the session it came with (its end the
    /// session's length after it), not from one that does not, nor when under 5 s.
    #[test]
    fn a_date_is_taken_only_when_it_fits_its_session() {
        let reading = |date_ms: i64, offset_ms: i64| {
            StsClockReading(Arc::new(Mutex::new(Some((date_ms, offset_ms)))))
        };
        let date = 1_800_000_000_000;
        let end = date + HOUR.as_millis() as i64;
        assert_eq!(reading(date, 2_700_000).offset_ms(end, HOUR), 2_700_000);
        assert_eq!(
            reading(date, -2_700_000).offset_ms(end + 1_000, HOUR),
            -2_700_000
        );
        assert_eq!(reading(date, 4_999).offset_ms(end, HOUR), 0, "under 5 s");
        assert_eq!(
            reading(date - 86_400_000, 86_400_000).offset_ms(end, HOUR),
            0,
            "a Date a day before its session"
        );
        assert_eq!(
            reading(date + 3_000_000, -3_000_000).offset_ms(end, HOUR),
            0,
            "a Date near its session's end"
        );
        assert_eq!(
            StsClockReading::default().offset_ms(end, HOUR),
            0,
            "no Date"
        );
    }

    /// The server's clock starts at the wall time and then only moves on.
    #[test]
    fn the_system_clock_starts_at_the_wall_time_and_never_goes_back() {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let first = SystemClock.now_ms();
        assert!(
            (first - wall_ms).abs() < 60_000,
            "{first} against {wall_ms}"
        );
        let mut last = first;
        for _ in 0..1000 {
            let now = SystemClock.now_ms();
            assert!(now >= last, "{now} after {last}");
            last = now;
        }
    }

    #[test]
    fn issued_debug_redacts() {
        let issued = Issued {
            access_key_id: "ASIAX".into(),
            secret_access_key: "s3cr3t".into(),
            session_token: "t0k3n".into(),
            expiration_unix: 0,
            issued_unix: 0,
            clock_offset_ms: 0,
        };
        let shown = format!("{issued:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0k3n"),
            "{shown}"
        );
    }

    #[test]
    fn sts_error_codes_are_refusals_throttling_or_outages() {
        let of = |code: &str| classify(code.to_string(), "m".to_string());
        assert!(matches!(of("AccessDenied"), StsError::Refused { .. }));
        for code in ["Throttling", "ThrottlingException", "RequestLimitExceeded"] {
            assert_eq!(of(code), StsError::Throttled(format!("{code}: m")));
        }
        // The server's own credentials (or its clock), not the role: not a refusal of the
        // role, so what a key holds is served on.
        for code in [
            "InternalFailure",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "ExpiredTokenException",
        ] {
            assert_eq!(of(code), StsError::Unavailable(format!("{code}: m")));
        }
    }
}
