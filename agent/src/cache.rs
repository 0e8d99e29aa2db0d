//! Each pod's credentials, kept on the node so that a hit needs no call to the server.
//!
//! Keyed by (pod UID, role ARN), an entry of one STS session of the role (the decision's
//! `credential_key`: a session annotation changed makes another): a pod never receives
//! another pod's entry, nor another session's, and a new pod on a reused IP starts empty. Entries are served while they have at least `min_remaining`
//! left — the same floor the server serves with — so the agent asks again exactly when the
//! server would refresh. Misses on one key collapse into one server call. The pod table
//! drops a pod's entries ([`CredentialCache::forget`]) the moment its decision changes.
//!
//! An entry keeps the credentials documents as served, rendered once (EC2's legacy and
//! extended ones, and the container-credentials endpoint's): a hit is a lookup by borrowed
//! keys under read locks and a reference-count increment, nothing copied or formatted, and
//! no waiting: only a miss takes the key's fill lock (issue 17: every request of a busy pod
//! used to queue on it).
//!
//! A fetch STS failed for (`sts-refused`, `sts-unavailable`) is remembered for
//! [`REFUSAL_HELD`]: requests for the key meanwhile get the same refusal without a call (at
//! the container endpoint, requests with the same pod token). A pod asking again and again
//! for a role STS will not give (a trust policy that does not name the servers, STS
//! throttling) otherwise turned each of its requests into a call to the key's owner, which
//! pays for it in TLS, a lookup and a refusal however quickly it answers. The servers hold
//! such refusals too (an STS refusal for 30 s, an outage for their back-off); the agent holds
//! them only long enough to stop a loop, so a fix is seen within a second.
//!
//! Credentials the servers gave with less than that floor left (they serve such ones while
//! STS fails) are served again for [`BELOW_FLOOR_REUSE`] only.
//!
//! The cache also remembers which pod tokens (by digest) the servers accepted for each pod at
//! the container-credentials endpoint, each until the token expires or for
//! [`PROOF_KEPT_SECS`] at most, so that a pod proves itself once per token and quarter of an
//! hour, not once per request. They go with the pod's entries.
//!
//! Entries hold secrets (the secret key and session token, twice: as fields and in the
//! document), so neither type here derives `Debug`: theirs are written by hand and show the
//! access key id, expiry and counts only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use podiam_proto::v1::Credentials;
use podiam_runtime::clock::since_boot_ms;
use tokio::sync::Mutex as AsyncMutex;

use crate::container::TokenDigest;
use crate::decision::{Refusal, Role};
use crate::imds::{self, Document};
use podiam_proto::Reason;

/// STS's longest session (AssumeRole's `DurationSeconds` up to 12 hours), in ms: a server's
/// `valid_for_ms` beyond it is not taken.
const LONGEST_SESSION_MS: u64 = 12 * 3600 * 1000;

/// How long a key's refusal by STS is answered again without asking the servers.
pub const REFUSAL_HELD: Duration = Duration::from_secs(1);

/// Credentials the servers gave with less than the floor left (while STS fails they serve
/// theirs down to 5 minutes; SDKs then ask again at every AWS call) are served again for this
/// long without asking them: every pod's every call would otherwise be a call to the servers
/// while they are degraded. Short, so that fresh ones are picked up soon after STS recovers.
pub const BELOW_FLOOR_REUSE: Duration = Duration::from_secs(10);
/// … and only while they have this much left (seconds).
const BELOW_FLOOR_LEAST_SECS: i64 = 60;

/// An error a fetch fails with, and what it says of its key: the refusal to hold for
/// [`REFUSAL_HELD`], if it is one STS gave. Anything else (the servers out of reach, another
/// pod at the address, a refusal that depends on the pod's decision) is not held.
pub trait Held: From<Refusal> {
    fn refusal(&self) -> Option<&Refusal>;

    /// The refusal to hold, if this is one.
    fn held(&self) -> Option<&Refusal> {
        self.refusal()
            .filter(|r| matches!(r.reason, Reason::StsRefused | Reason::StsUnavailable))
    }
}

/// Cached credentials and the documents served for them.
#[derive(PartialEq)]
pub struct Entry {
    pub credentials: Credentials,
    /// The EC2-format credentials document.
    pub document: Bytes,
    /// The same with the role's account: EC2's extended document.
    pub extended_document: Bytes,
    /// The container-credentials endpoint's document.
    pub container_document: Bytes,
    /// When the servers gave it.
    fetched: tokio::time::Instant,
    /// When it expires on the clock that counts from boot ([`since_boot_ms`]): when it was
    /// asked for, plus how long the server said it lasts (`valid_for_ms`, on STS's time).
    /// None from servers without it: then the node's wall clock reads `expiration_unix`,
    /// STS's time.
    valid_until_boot_ms: Option<i64>,
}

impl Entry {
    /// An entry of `credentials` asked for at `asked` ([`since_boot_ms`]).
    fn new(credentials: Credentials, asked: i64) -> Entry {
        let valid_until_boot_ms = u64::try_from(credentials.valid_for_ms)
            .ok()
            .filter(|&ms| ms > 0 && ms <= LONGEST_SESSION_MS)
            .map(|ms| asked.saturating_add(ms as i64));
        let document = imds::credentials_document(&credentials, Document::Legacy).into();
        let extended_document = imds::credentials_document(&credentials, Document::Extended).into();
        let container_document = crate::container::credentials_json(&credentials).into();
        Entry {
            credentials,
            document,
            extended_document,
            container_document,
            fetched: tokio::time::Instant::now(),
            valid_until_boot_ms,
        }
    }

    /// Seconds left at `now` (the node's wall clock, seconds since the Unix epoch). Counted
    /// from when they were asked for, for as long as the server said, on the clock that
    /// counts from boot: a node whose clock is off from STS's neither asks the servers on
    /// every request (ahead) nor serves credentials past their end (behind), a step of its
    /// clock (time synchronisation correcting it) changes nothing, and time the node spent
    /// suspended counts.
    fn left_secs(&self, now: i64) -> i64 {
        match self.valid_until_boot_ms {
            Some(until) => (until - since_boot_ms()).div_euclid(1000),
            None => self.credentials.expiration_unix - now,
        }
    }

    /// The EC2 document asked for.
    pub fn imds_document(&self, document: Document) -> Bytes {
        match document {
            Document::Legacy => self.document.clone(),
            Document::Extended => self.extended_document.clone(),
        }
    }
}

impl std::fmt::Debug for Entry {
    /// The credentials' own `Debug` redacts their secrets; the documents, which hold them in
    /// the clear, are shown by their lengths only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("credentials", &self.credentials)
            .field("document_bytes", &self.document.len())
            .field("extended_document_bytes", &self.extended_document.len())
            .field("container_document_bytes", &self.container_document.len())
            .finish()
    }
}

/// One key's entry. Hits read `current` and never wait; a miss takes `fill`, so that misses
/// on one key collapse into one server call, and looks again once it has it.
#[derive(Default)]
struct Slot {
    /// The STS session its credentials are of (`Role::credential_key`; 0: unknown): a slot
    /// of another session than a request's is not used, and is replaced when one is made.
    session: u64,
    current: RwLock<Option<Arc<Entry>>>,
    fill: AsyncMutex<()>,
    /// The last fetch's refusal by STS, until when it is answered again, and the pod token
    /// of the call it answered if that token was not proven (answered again to that token
    /// only; `None`: to [`CredentialCache::get`]).
    refused: Mutex<Option<Hold>>,
}

/// A refusal held: until when, what, and for which unproven token, if any.
type Hold = (tokio::time::Instant, Refusal, Option<TokenDigest>);

impl Slot {
    /// The entry, if it has at least `min_remaining_secs` left at `now`, or was fetched with
    /// less under [`BELOW_FLOOR_REUSE`] ago and has [`BELOW_FLOOR_LEAST_SECS`] left.
    fn fresh(&self, now: i64, min_remaining_secs: i64) -> Option<Arc<Entry>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|cached| {
                let left = cached.left_secs(now);
                left >= min_remaining_secs
                    || (left >= BELOW_FLOOR_LEAST_SECS
                        && cached.fetched.elapsed() < BELOW_FLOOR_REUSE)
            })
            .cloned()
    }

    fn set(&self, entry: Arc<Entry>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(entry);
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The refusal still held for calls with the unproven token `token` (`None`: calls of
    /// [`CredentialCache::get`]), if any.
    fn held(&self, token: Option<&TokenDigest>) -> Option<Refusal> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .as_ref()
            .filter(|(until, _, held_for)| {
                tokio::time::Instant::now() < *until && held_for.as_ref() == token
            })
            .map(|(_, refusal, _)| refusal.clone())
    }

    fn hold(&self, refusal: &Refusal, token: Option<TokenDigest>) {
        let until = tokio::time::Instant::now() + REFUSAL_HELD;
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((until, refusal.clone(), token));
    }
}

/// What a fetch brings: credentials, and whether they are kept for the key asked (not when
/// the servers answered for another session of the role than the pod's decision names: a
/// replica's view behind a session annotation's change, or replicas naming sessions
/// differently while a rollout changes how; answered once, asked again next time).
pub struct Fetched {
    pub credentials: Credentials,
    pub keep: bool,
}

impl From<Credentials> for Fetched {
    fn from(credentials: Credentials) -> Fetched {
        Fetched {
            credentials,
            keep: true,
        }
    }
}

impl std::fmt::Debug for Fetched {
    /// The credentials' own `Debug` redacts their secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("credentials", &self.credentials)
            .field("keep", &self.keep)
            .finish()
    }
}

/// Which of a pod's credentials: its role's ARN and the STS session they are of (the
/// decision's `credential_key`; 0: unknown). A pod has one session per role at a time; its
/// annotations changing the session (its name, external ID, tags) make credentials of the
/// old one useless to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleKey<'a> {
    pub arn: &'a str,
    pub session: u64,
}

impl<'a> From<&'a Role> for RoleKey<'a> {
    fn from(role: &'a Role) -> RoleKey<'a> {
        RoleKey {
            arn: &role.arn,
            session: role.credential_key,
        }
    }
}

impl<'a> From<&'a str> for RoleKey<'a> {
    /// A role of an unknown session.
    fn from(arn: &'a str) -> RoleKey<'a> {
        RoleKey { arn, session: 0 }
    }
}

/// Credentials per (pod UID, role ARN), of one session each.
pub struct CredentialCache {
    /// Pod UID → role ARN → slot.
    slots: RwLock<HashMap<String, HashMap<String, Arc<Slot>>>>,
    /// Pod UID → the pod tokens the servers accepted for it, with their expiry.
    proven: Mutex<HashMap<String, Vec<(TokenDigest, i64)>>>,
    /// Pods deleted lately ([`CredentialCache::gone`]), the newest [`GONE_REMEMBERED`]: a
    /// fetch or a proof that ends after its pod was deleted stores nothing (no UID is ever
    /// used again), where it would otherwise stay for good, live credentials and all.
    /// Locked under `slots`' write lock.
    gone: Mutex<(HashSet<String>, VecDeque<String>)>,
    min_remaining: Duration,
}

/// Deleted pods remembered: far more than a node deletes while one fetch is under way.
const GONE_REMEMBERED: usize = 4096;

/// Longest a token the servers accepted is taken without asking them again (seconds), so that
/// a token the API server stops taking (its ServiceAccount deleted) stops working here soon
/// after the servers stop trusting their TokenReview of it (an hour at most), not at the
/// token's own expiry, which may be a day off: within an hour and a quarter in all. Asking
/// again costs one call to the servers, which answer from their review.
pub const PROOF_KEPT_SECS: i64 = 900;

/// Most tokens remembered per pod: one per container that reads its own projected token,
/// and the kubelet's rotation overlapping; an older one is proven again when used.
const PROVEN_PER_POD: usize = 8;

impl std::fmt::Debug for CredentialCache {
    /// Counts only: the entries hold secrets (see [`Entry`]'s `Debug`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("entries", &self.len())
            .field("min_remaining", &self.min_remaining)
            .finish()
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Server,
}

impl CredentialCache {
    pub fn new(min_remaining: Duration) -> CredentialCache {
        CredentialCache {
            slots: RwLock::new(HashMap::new()),
            proven: Mutex::new(HashMap::new()),
            gone: Mutex::default(),
            min_remaining,
        }
    }

    /// The cached credentials for (uid, role ARN) if they have enough life left at
    /// `now`, else the result of the future `fetch` makes (stored when it succeeds with
    /// credentials to keep, see [`Fetched`]; held when STS refused it, see [`Held`]); the
    /// future is only made on a miss with no refusal held.
    pub async fn get<'a, C, E, F>(
        &self,
        uid: &str,
        role: impl Into<RoleKey<'a>>,
        now: i64,
        fetch: impl FnOnce() -> F,
    ) -> Result<(Arc<Entry>, Source), E>
    where
        C: Into<Fetched>,
        E: Held,
        F: Future<Output = Result<C, E>>,
    {
        let slot = self.slot(uid, role.into());
        let min_remaining = self.min_remaining.as_secs() as i64;
        if let Some(cached) = slot.fresh(now, min_remaining) {
            return Ok((cached, Source::Cache));
        }
        let _filling = slot.fill.lock().await;
        // Another request may have filled it, or been refused, while this one waited.
        if let Some(cached) = slot.fresh(now, min_remaining) {
            return Ok((cached, Source::Cache));
        }
        if let Some(refusal) = slot.held(None) {
            return Err(E::from(refusal));
        }
        let asked = since_boot_ms();
        match fetch().await {
            Ok(fetched) => {
                let Fetched { credentials, keep } = fetched.into();
                let fetched = Arc::new(Entry::new(credentials, asked));
                if keep {
                    slot.set(Arc::clone(&fetched));
                }
                Ok((fetched, Source::Server))
            }
            Err(error) => {
                if let Some(refusal) = error.held() {
                    slot.hold(refusal, None);
                }
                Err(error)
            }
        }
    }

    /// The result of `fetch`, a call for (uid, role ARN) with a pod token the servers have
    /// not accepted for the pod yet (`token`), which the cache does not answer; but a refusal
    /// by STS is held, as [`CredentialCache::get`] holds one, and answered again for
    /// [`REFUSAL_HELD`] to calls with the same token only. (A refusal proves nothing of the
    /// token: the servers may have judged it against another pod at the address.)
    pub async fn unproven<'a, T, E, F>(
        &self,
        uid: &str,
        role: impl Into<RoleKey<'a>>,
        token: &TokenDigest,
        fetch: impl FnOnce() -> F,
    ) -> Result<T, E>
    where
        E: Held,
        F: Future<Output = Result<T, E>>,
    {
        // Taken before the call: a decision changing meanwhile leaves this slot, and what it
        // holds, behind.
        let slot = self.slot(uid, role.into());
        if let Some(refusal) = slot.held(Some(token)) {
            return Err(E::from(refusal));
        }
        let result = fetch().await;
        if let Err(error) = &result
            && let Some(refusal) = error.held()
        {
            slot.hold(refusal, Some(*token));
        }
        result
    }

    /// The cached credentials for (uid, role ARN) if they have enough life left at `now`:
    /// what [`CredentialCache::get`] answers without waiting. Makes no slot on a miss.
    pub fn fresh<'a>(
        &self,
        uid: &str,
        role: impl Into<RoleKey<'a>>,
        now: i64,
    ) -> Option<Arc<Entry>> {
        self.existing_slot(uid, role.into())?
            .fresh(now, self.min_remaining.as_secs() as i64)
    }

    /// The slot of (uid, role), if there is one of the role's session: found under the read
    /// lock, which is all a hit takes.
    fn existing_slot(&self, uid: &str, role: RoleKey<'_>) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .and_then(|roles| roles.get(role.arn))
            .filter(|slot| slot.session == role.session)
            .cloned()
    }

    /// The slot of (uid, role), made empty if there is none of the role's session (one of
    /// another session is replaced); for a pod deleted meanwhile, one that is not kept.
    fn slot(&self, uid: &str, role: RoleKey<'_>) -> Arc<Slot> {
        let existing = self.existing_slot(uid, role);
        existing.unwrap_or_else(|| {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let made = || {
                Arc::new(Slot {
                    session: role.session,
                    ..Slot::default()
                })
            };
            if self.is_gone(uid) {
                return made();
            }
            let slot = slots
                .entry(uid.to_string())
                .or_default()
                .entry(role.arn.to_string())
                .or_insert_with(made);
            if slot.session != role.session {
                *slot = made();
            }
            Arc::clone(slot)
        })
    }

    fn is_gone(&self, uid: &str) -> bool {
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        gone.0.contains(uid)
    }

    /// Stores `credentials` the servers just gave for (uid, role ARN), replacing what was
    /// there, and returns the new entry (tests: the daemon stores with
    /// [`CredentialCache::put_if`]).
    #[cfg(test)]
    pub async fn put<'a>(
        &self,
        uid: &str,
        role: impl Into<RoleKey<'a>>,
        credentials: Credentials,
    ) -> Arc<Entry> {
        let put = self.put_if(uid, role, credentials, since_boot_ms(), || {
            Ok::<(), std::convert::Infallible>(())
        });
        match put.await {
            Ok(entry) => entry,
            Err(never) => match never {},
        }
    }

    /// Stores credentials the servers just gave for (uid, role), asked for at `asked`
    /// ([`since_boot_ms`]), replacing what was there, if `still` says they may still be
    /// answered once any fill under way is done (a decision may change meanwhile); what
    /// `fetched` says is not kept is answered, and not stored.
    pub async fn put_if<'a, E>(
        &self,
        uid: &str,
        role: impl Into<RoleKey<'a>>,
        fetched: impl Into<Fetched>,
        asked: i64,
        still: impl FnOnce() -> Result<(), E>,
    ) -> Result<Arc<Entry>, E> {
        let Fetched { credentials, keep } = fetched.into();
        let entry = Arc::new(Entry::new(credentials, asked));
        if !keep {
            still()?;
            return Ok(entry);
        }
        let slot = self.slot(uid, role.into());
        // After any fill under way, as before: what the servers just gave is the newest.
        let _filling = slot.fill.lock().await;
        still()?;
        slot.set(Arc::clone(&entry));
        Ok(entry)
    }

    /// Whether the servers accepted the token with `digest` for the pod with `uid`, and it
    /// has not expired at `now`.
    pub fn proven(&self, uid: &str, digest: &TokenDigest, now: i64) -> bool {
        self.proven
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .is_some_and(|tokens| tokens.iter().any(|(d, until)| d == digest && *until > now))
    }

    /// Remembers that the servers accepted the token with `digest` for the pod with `uid`,
    /// until `until` (the token's expiry), or [`PROOF_KEPT_SECS`] from `now` if sooner. Only
    /// pods in the pod table are remembered, and [`CredentialCache::forget`] drops them with
    /// the pod.
    pub fn prove(&self, uid: &str, digest: TokenDigest, until: i64, now: i64) {
        let until = until.min(now.saturating_add(PROOF_KEPT_SECS));
        let mut proven = self.proven.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_gone(uid) {
            return;
        }
        let tokens = proven.entry(uid.to_string()).or_default();
        tokens.retain(|(d, until)| *d != digest && *until > now);
        if tokens.len() >= PROVEN_PER_POD {
            // The one expiring first goes.
            if let Some(first) = (0..tokens.len()).min_by_key(|&i| tokens[i].1) {
                tokens.swap_remove(first);
            }
        }
        tokens.push((digest, until));
    }

    /// Drops every entry of the pod with `uid`, and the tokens it proved itself with: its
    /// decision changed. The table lists it, so it is no longer taken for gone.
    pub fn forget(&self, uid: &str) {
        self.drop_entries(uid);
        let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if gone.0.remove(uid) {
            gone.1.retain(|g| g != uid);
        }
    }

    fn drop_entries(&self, uid: &str) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        self.proven
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// The pod with `uid` was deleted: [`CredentialCache::forget`], and what a fetch or a
    /// proof under way for it would store is not kept.
    pub fn gone(&self, uid: &str) {
        {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
            let (set, order) = &mut *gone;
            if set.insert(uid.to_string()) {
                order.push_back(uid.to_string());
                if order.len() > GONE_REMEMBERED
                    && let Some(oldest) = order.pop_front()
                {
                    set.remove(&oldest);
                }
            }
            slots.remove(uid);
        }
        self.drop_entries(uid);
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(HashMap::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch's failure: the servers out of reach, or their refusal.
    #[derive(Debug, PartialEq)]
    enum Failed {
        Down,
        Refused(Refusal),
    }

    impl From<Refusal> for Failed {
        fn from(refusal: Refusal) -> Failed {
            Failed::Refused(refusal)
        }
    }

    impl Held for Failed {
        fn refusal(&self) -> Option<&Refusal> {
            match self {
                Failed::Refused(refusal) => Some(refusal),
                Failed::Down => None,
            }
        }
    }

    fn creds(id: &str, expiration_unix: i64) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            expiration_unix,
            ..Credentials::default()
        }
    }

    const FLOOR: Duration = Duration::from_secs(1800);

    #[tokio::test(start_paused = true)]
    async fn hits_need_no_fetch_until_the_floor() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, 3600)) };
        let got = |r: Result<(Arc<Entry>, Source), Failed>| {
            r.map(|(entry, source)| (entry.credentials.access_key_id.clone(), source))
        };
        assert_eq!(
            got(cache.get("a", "r", 0, || fetch("1")).await),
            Ok(("1".to_string(), Source::Server))
        );
        let (hit, source) = cache
            .get("a", "r", 1800, || fetch("2"))
            .await
            .expect("cached");
        assert_eq!(
            (hit.credentials.access_key_id.as_str(), source),
            ("1", Source::Cache)
        );
        assert!(
            String::from_utf8_lossy(&hit.document).contains("\"AccessKeyId\" : \"1\""),
            "the served document is rendered once, with the entry"
        );
        // Below the floor (and past the moment a below-floor entry is reused): fetched again.
        tokio::time::advance(BELOW_FLOOR_REUSE).await;
        assert_eq!(
            got(cache.get("a", "r", 1801, || fetch("3")).await),
            Ok(("3".to_string(), Source::Server))
        );
        // Another pod, another role: separate entries.
        assert_eq!(
            cache.get("b", "r", 0, || fetch("4")).await.map(|r| r.1),
            Ok(Source::Server)
        );
        assert_eq!(
            cache.get("a", "r2", 0, || fetch("5")).await.map(|r| r.1),
            Ok(Source::Server)
        );
        assert_eq!(cache.len(), 3);
    }

    /// The node's clock an hour ahead of the servers': credentials the server says last just
    /// over the floor (`valid_for_ms`) are served from the cache, counted from when they were
    /// asked for, though their `Expiration` is already past on the node's clock; and fetched
    /// again once that time has passed on the clock that counts from boot, whatever the
    /// node's wall clock says.
    #[tokio::test(start_paused = true)]
    async fn how_long_credentials_last_is_counted_from_when_they_were_asked_for() {
        let cache = CredentialCache::new(FLOOR);
        let node_now = 10_000;
        let fetch = |id: &'static str| async move {
            Ok::<_, Failed>(Credentials {
                valid_for_ms: FLOOR.as_millis() as i64 + 200,
                // The servers' now and STS's, which is the node's now less an hour.
                ..creds(id, node_now - 3600 + FLOOR.as_secs() as i64)
            })
        };
        let source = |r: Result<(Arc<Entry>, Source), Failed>| r.map(|(_, source)| source);
        assert_eq!(
            source(cache.get("a", "r", node_now, || fetch("1")).await),
            Ok(Source::Server)
        );
        assert_eq!(
            source(cache.get("a", "r", node_now, || fetch("2")).await),
            Ok(Source::Cache),
            "over the floor by what the server said, though past its end by the node's clock"
        );
        // 200 ms on: under the floor (and past the moment a below-floor entry is reused).
        let asked = since_boot_ms();
        while since_boot_ms() - asked <= 200 {
            std::thread::sleep(Duration::from_millis(50));
        }
        tokio::time::advance(BELOW_FLOOR_REUSE).await;
        assert_eq!(
            source(cache.get("a", "r", node_now, || fetch("3")).await),
            Ok(Source::Server),
            "under the floor, counted from when they were asked for: fetched again"
        );
        // A server without the field: the node's wall clock decides, as before.
        let cache = CredentialCache::new(FLOOR);
        let old = |id: &'static str| async move { Ok::<_, Failed>(creds(id, node_now + 3600)) };
        assert_eq!(
            source(cache.get("a", "r", node_now, || old("1")).await),
            Ok(Source::Server)
        );
        assert_eq!(
            source(cache.get("a", "r", node_now + 1800, || old("2")).await),
            Ok(Source::Cache)
        );
    }

    /// A pod's role with its session changed (a session-name or external-ID annotation): the
    /// old session's credentials are not served for the new one, and are replaced by its
    /// own; a request still of the old session does not get the new one's either.
    #[tokio::test]
    async fn credentials_are_kept_per_session_of_a_role() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, 3600)) };
        let old = RoleKey {
            arn: "r",
            session: 1,
        };
        let new = RoleKey { session: 2, ..old };
        let id = |r: Result<(Arc<Entry>, Source), Failed>| {
            r.map(|(entry, source)| (entry.credentials.access_key_id.clone(), source))
        };
        assert_eq!(
            id(cache.get("a", old, 0, || fetch("1")).await),
            Ok(("1".to_string(), Source::Server))
        );
        assert!(cache.fresh("a", new, 0).is_none());
        assert_eq!(
            id(cache.get("a", new, 0, || fetch("2")).await),
            Ok(("2".to_string(), Source::Server))
        );
        assert_eq!(
            id(cache.get("a", new, 0, || fetch("3")).await),
            Ok(("2".to_string(), Source::Cache))
        );
        assert!(cache.fresh("a", old, 0).is_none());
        assert_eq!(
            cache.len(),
            1,
            "one slot per role: the old session's is replaced"
        );
        // An answer not to keep (the servers named another session) is answered, not kept.
        let other = || async {
            Ok::<_, Failed>(Fetched {
                credentials: creds("4", 3600),
                keep: false,
            })
        };
        let third = RoleKey { session: 3, ..old };
        assert_eq!(
            id(cache.get("a", third, 0, other).await),
            Ok(("4".to_string(), Source::Server))
        );
        assert!(cache.fresh("a", third, 0).is_none());
    }

    /// Credentials put under a condition (the decision standing once the fill under way is
    /// done) are stored only if it holds then.
    #[tokio::test]
    async fn a_put_whose_grant_no_longer_stands_stores_nothing() {
        let cache = CredentialCache::new(FLOOR);
        let refused = cache
            .put_if("a", "r", creds("1", 3600), 0, || Err("revoked meanwhile"))
            .await;
        assert_eq!(refused.err(), Some("revoked meanwhile"));
        assert!(cache.fresh("a", "r", 0).is_none());
        let stored = cache
            .put_if("a", "r", creds("2", 3600), 0, || Ok::<(), &str>(()))
            .await;
        assert!(stored.is_ok());
        assert!(cache.fresh("a", "r", 0).is_some());
    }

    #[tokio::test]
    async fn forgetting_a_pod_drops_its_entries_only() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, 3600)) };
        cache
            .get("a", "r", 0, || fetch("1"))
            .await
            .expect("fetched");
        cache
            .get("a", "r2", 0, || fetch("2"))
            .await
            .expect("fetched");
        cache
            .get("b", "r", 0, || fetch("3"))
            .await
            .expect("fetched");
        cache.prove("a", [1; 32], 100, 0);
        cache.prove("b", [2; 32], 100, 0);
        cache.forget("a");
        assert_eq!(cache.len(), 1);
        assert!(!cache.proven("a", &[1; 32], 0), "a's tokens go with it");
        assert!(cache.proven("b", &[2; 32], 0));
        assert_eq!(
            cache.get("a", "r", 0, || fetch("4")).await.map(|r| r.1),
            Ok(Source::Server)
        );
    }

    #[tokio::test]
    async fn what_a_fetch_brings_after_its_pod_was_deleted_is_not_kept() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, 3600)) };
        // A fetch under way (its slot taken) when the pod is deleted.
        let slot = cache.slot("a", "r".into());
        cache.gone("a");
        slot.set(Arc::new(Entry::new(creds("1", 3600), 0)));
        assert!(cache.is_empty(), "the slot went with the pod");
        // Whatever comes after is answered but not kept: no entry, no proof.
        assert_eq!(
            cache.get("a", "r", 0, || fetch("2")).await.map(|r| r.1),
            Ok(Source::Server)
        );
        cache.put("a", "r", creds("3", 3600)).await;
        cache.prove("a", [1; 32], 100, 0);
        assert!(cache.is_empty());
        assert!(!cache.proven("a", &[1; 32], 0));
        // Listed again (a snapshot's pod that a delete overtook), it is cached again.
        cache.forget("a");
        cache.put("a", "r", creds("6", 3600)).await;
        assert_eq!(cache.len(), 1);
        cache.gone("a");
        // A pod whose decision changed (forgotten, not gone) is cached again.
        cache
            .get("b", "r", 0, || fetch("4"))
            .await
            .expect("fetched");
        cache.forget("b");
        cache
            .get("b", "r2", 0, || fetch("5"))
            .await
            .expect("fetched");
        assert_eq!(cache.len(), 1);
    }

    fn secret_creds() -> Credentials {
        Credentials {
            access_key_id: "ASIAVISIBLE".into(),
            secret_access_key: "secret-access-key-xyz".into(),
            session_token: "session-token-xyz".into(),
            expiration_unix: 3600,
            issued_unix: 0,
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            valid_for_ms: 0,
        }
    }

    /// The secrets a Debug output must never show, with the rendered document's spelling.
    fn assert_no_secret(shown: &str) {
        for secret in ["secret-access-key-xyz", "session-token-xyz"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[tokio::test]
    async fn debug_output_shows_no_secret() {
        let cache = CredentialCache::new(FLOOR);
        let (entry, _) = cache
            .get("a", "r", 0, || async { Ok::<_, Failed>(secret_creds()) })
            .await
            .expect("fetched");
        assert!(
            String::from_utf8_lossy(&entry.document).contains("secret-access-key-xyz"),
            "the served document does hold the secret"
        );
        assert!(
            String::from_utf8_lossy(&entry.container_document).contains("session-token-xyz"),
            "the container document does hold the secret"
        );
        let shown = format!("{entry:?}");
        assert_no_secret(&shown);
        assert!(shown.contains("ASIAVISIBLE"), "{shown}");
        assert_no_secret(&format!("{entry:#?}"));
        let shown = format!("{cache:?}");
        assert_no_secret(&shown);
        assert!(shown.contains("entries: 1"), "{shown}");
        assert_no_secret(&format!("{cache:#?}"));
    }

    #[test]
    fn proven_tokens_expire_are_per_pod_and_bounded() {
        let cache = CredentialCache::new(FLOOR);
        cache.prove("a", [1; 32], 100, 0);
        assert!(cache.proven("a", &[1; 32], 99));
        assert!(!cache.proven("a", &[1; 32], 100), "expired with the token");
        assert!(
            !cache.proven("b", &[1; 32], 0),
            "another pod's proof is not b's"
        );
        assert!(!cache.proven("a", &[9; 32], 0));
        cache.prove("c", [2; 32], 86_400, 0);
        assert!(cache.proven("c", &[2; 32], PROOF_KEPT_SECS - 1));
        assert!(
            !cache.proven("c", &[2; 32], PROOF_KEPT_SECS),
            "a quarter of an hour at most, whatever the token's expiry"
        );
        for i in 0..20u8 {
            cache.prove("a", [i + 10; 32], 1000 + i64::from(i), 0);
        }
        let kept = (0..20u8)
            .filter(|i| cache.proven("a", &[i + 10; 32], 0))
            .count();
        assert_eq!(kept, PROVEN_PER_POD);
        assert!(cache.proven("a", &[29; 32], 0), "the latest is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_below_the_floor_are_served_again_for_a_moment_only() {
        let cache = CredentialCache::new(FLOOR);
        let left = FLOOR.as_secs() as i64 - 600;
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, left)) };
        let (_, source) = cache
            .get("a", "r", 0, || fetch("1"))
            .await
            .expect("fetched");
        assert_eq!(source, Source::Server);
        tokio::time::advance(BELOW_FLOOR_REUSE - Duration::from_millis(1)).await;
        let (hit, source) = cache.get("a", "r", 9, || fetch("2")).await.expect("again");
        assert_eq!(
            (hit.credentials.access_key_id.as_str(), source),
            ("1", Source::Cache)
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let (hit, source) = cache.get("a", "r", 10, || fetch("3")).await.expect("asked");
        assert_eq!(
            (hit.credentials.access_key_id.as_str(), source),
            ("3", Source::Server)
        );
        // Never with under a minute left, however new.
        let (_, source) = cache
            .get("a", "r", left - 59, || fetch("4"))
            .await
            .expect("asked");
        assert_eq!(source, Source::Server);
    }

    #[tokio::test]
    async fn put_replaces_the_entry() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, Failed>(creds(id, 3600)) };
        cache
            .get("a", "r", 0, || fetch("1"))
            .await
            .expect("fetched");
        let put = cache.put("a", "r", creds("2", 3600)).await;
        assert_eq!(put.credentials.access_key_id, "2");
        let (hit, source) = cache.get("a", "r", 0, || fetch("3")).await.expect("hit");
        assert_eq!(
            (hit.credentials.access_key_id.as_str(), source),
            ("2", Source::Cache)
        );
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_call_and_hits_never_wait() {
        let cache = Arc::new(CredentialCache::new(FLOOR));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(AsyncMutex::new(Some(released)));
        let mut waiters = Vec::new();
        for _ in 0..8 {
            let (cache, calls, released) = (cache.clone(), calls.clone(), released.clone());
            waiters.push(tokio::spawn(async move {
                let fetch = || async move {
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Some(gate) = released.lock().await.take() {
                        let _ = gate.await;
                    }
                    Ok::<_, Failed>(creds("1", 3600))
                };
                cache
                    .get("a", "r", 0, fetch)
                    .await
                    .map(|(_, source)| source)
            }));
        }
        tokio::task::yield_now().await;
        let _ = release.send(());
        let mut sources = Vec::new();
        for waiter in waiters {
            sources.push(waiter.await.expect("joins").expect("credentials"));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            sources.iter().filter(|s| **s == Source::Server).count(),
            1,
            "{sources:?}"
        );
        // A hit while another key of the same pod is being fetched does not wait for it.
        let (_hold, held) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let fetch = || async move {
                    let _ = held.await;
                    Ok::<_, Failed>(creds("2", 3600))
                };
                cache.get("a", "other", 0, fetch).await.map(|_| ())
            })
        };
        tokio::task::yield_now().await;
        let hit = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get("a", "r", 0, || async {
                Err::<Credentials, _>(Failed::Down)
            }),
        )
        .await
        .expect("a hit does not wait")
        .expect("cached");
        assert_eq!(hit.1, Source::Cache);
        slow.abort();
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = CredentialCache::new(FLOOR);
        assert_eq!(
            cache
                .get("a", "r", 0, || async {
                    Err::<Credentials, _>(Failed::Down)
                })
                .await
                .map(|r| r.1),
            Err(Failed::Down)
        );
        let ok = cache
            .get("a", "r", 0, || async { Ok::<_, Failed>(creds("1", 3600)) })
            .await;
        assert_eq!(ok.map(|r| r.1), Ok(Source::Server));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_sts_is_answered_again_for_a_second_without_a_fetch() {
        let cache = CredentialCache::new(FLOOR);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let refused = |reason| {
            let calls = &calls;
            move || async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err::<Credentials, _>(Failed::Refused(Refusal {
                    reason,
                    message: "AccessDenied".into(),
                }))
            }
        };
        let count = || calls.load(std::sync::atomic::Ordering::SeqCst);
        for reason in [Reason::StsRefused, Reason::StsUnavailable] {
            let first = cache.get("a", "r", 0, refused(reason)).await.map(|r| r.1);
            let held = count();
            for _ in 0..100 {
                let again = cache.get("a", "r", 0, refused(reason)).await.map(|r| r.1);
                assert_eq!(again, first);
            }
            assert_eq!(
                count(),
                held,
                "{reason:?}: a held refusal was fetched again"
            );
            // Another key of the pod, and another pod, are asked for as ever.
            let _ = cache.get("a", "r2", 0, refused(reason)).await;
            let _ = cache.get("b", "r", 0, refused(reason)).await;
            assert_eq!(count(), held + 2);
            // A second on, the servers are asked again.
            tokio::time::advance(REFUSAL_HELD).await;
            let _ = cache.get("a", "r", 0, refused(reason)).await;
            assert_eq!(count(), held + 3);
            tokio::time::advance(REFUSAL_HELD).await;
        }
        // Refusals that depend on the pod's decision, not on STS, are asked again each time.
        let before = count();
        for _ in 0..3 {
            let _ = cache.get("c", "r", 0, refused(Reason::NoRole)).await;
        }
        assert_eq!(count(), before + 3);
        // A refusal of a call with an unproven pod token is held for that token only: not for
        // another token, nor for the cache's own fetches.
        let (mine, other): (TokenDigest, TokenDigest) = ([1; 32], [2; 32]);
        let before = count();
        let unproven = |token| cache.unproven("e", "r", token, refused(Reason::StsRefused));
        let first = unproven(&mine).await.map(|_: Credentials| ());
        assert!(first.is_err());
        assert!(unproven(&mine).await.is_err());
        assert_eq!(count(), before + 1, "held for the same token");
        let _ = unproven(&other).await;
        let _ = cache.get("e", "r", 0, refused(Reason::StsRefused)).await;
        assert_eq!(
            count(),
            before + 3,
            "not held for another token, nor for get"
        );
        // A pod's decision changing drops the hold with the pod's entries.
        let _ = cache.get("d", "r", 0, refused(Reason::StsRefused)).await;
        cache.forget("d");
        let ok = cache
            .get("d", "r", 0, || async { Ok::<_, Failed>(creds("1", 3600)) })
            .await;
        assert_eq!(ok.map(|r| r.1), Ok(Source::Server));
    }
}
