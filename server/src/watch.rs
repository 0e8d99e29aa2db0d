//! Keeps the [`Cluster`] view current from the Kubernetes API.
//!
//! One task per resource (pods, namespaces, ServiceAccounts) owns that index's writes. A (re)list is
//! collected into a fresh index and swapped in whole when it completes, so lookups keep
//! answering from the previous view during a relist — after a 410 Gone, an API server that
//! was away, a list that broke half-way — instead of seeing a half-filled one: no pod is
//! ever "unknown" because the server happened to be relisting. Every failed list or watch
//! is retried with [`WatchBackoff`].
//!
//! A watch that keeps failing (twice or more), with no success between, for [`STALE_AFTER`]
//! makes the view *stale* ([`WatchFailures`]): the replica still answers from it (an API server outage must
//! not stop the cluster's credentials), and says so in its Health answers and metrics, so
//! that agents prefer a replica whose view is current (revocations, reused addresses). So
//! does a relist after the first sync that has run for [`RELIST_STALE_AFTER`]: its watch's
//! changes wait until it is complete (a 410 Gone in a cluster of 100k pods: many seconds),
//! and a pod deleted meanwhile, its address given to another, would be answered as the
//! first.
//!
//! A namespace relist starts from the current index's compiled rules
//! ([`NamespaceIndex::for_relist`]), so unchanged rules are not compiled again and count
//! once against the rules' memory budget while both indexes exist. A namespace whose rule
//! is refused (invalid, or over the budget) is logged as a warning when its rule changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use podiam_policy::slim::{SlimPod, SlimServiceAccount};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use crate::index::{AccountIndex, NamespaceIndex, PodIndex};
use crate::policy::Permitted;

/// Labels of a watched resource's relists (`podiam_server_watch_relists_total`; registered
/// by [`crate::metrics`], which reads this module and is not read by it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

/// The server's cached view of the cluster, shared by all request handlers.
#[derive(Debug)]
pub struct Cluster {
    pub pods: RwLock<PodIndex>,
    pub namespaces: RwLock<NamespaceIndex>,
    /// The ServiceAccounts that give their pods a role.
    pub accounts: RwLock<AccountIndex>,
    pods_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    accounts_synced: AtomicBool,
    /// Bumped after every change to any index (and at first sync); agents' node streams
    /// wait on it.
    changes: tokio::sync::watch::Sender<u64>,
    /// The watches' spells of failing: whether the view is stale.
    pub failures: WatchFailures,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            pods: RwLock::default(),
            namespaces: RwLock::default(),
            accounts: RwLock::default(),
            pods_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            accounts_synced: AtomicBool::new(false),
            changes: tokio::sync::watch::Sender::new(0),
            failures: WatchFailures::default(),
        }
    }
}

impl Cluster {
    /// An empty view whose pods and ServiceAccounts name their role in the annotation
    /// `role_key` (podiam-server --role-annotation).
    pub fn with_role_key(role_key: &str) -> Cluster {
        Cluster {
            pods: RwLock::new(PodIndex::keyed(role_key)),
            accounts: RwLock::new(AccountIndex::keyed(role_key)),
            ..Cluster::default()
        }
    }

    /// The pod index, for reading (a poisoned lock still holds a usable index).
    pub fn pods(&self) -> std::sync::RwLockReadGuard<'_, PodIndex> {
        self.pods.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespace index, for reading.
    pub fn namespaces(&self) -> std::sync::RwLockReadGuard<'_, NamespaceIndex> {
        self.namespaces.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The ServiceAccount index, for reading.
    pub fn accounts(&self) -> std::sync::RwLockReadGuard<'_, AccountIndex> {
        self.accounts.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that wakes after each change to the cluster view.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// True once pods, namespaces and ServiceAccounts have each been listed completely at
    /// least once.
    pub fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::Acquire)
            && self.namespaces_synced.load(Ordering::Acquire)
            && self.accounts_synced.load(Ordering::Acquire)
    }

    /// Whether a watch has been failing for [`STALE_AFTER`] and is failing still: the
    /// view may miss changes (revocations, addresses reused) since its last success.
    pub fn stale(&self) -> bool {
        self.failures.stale(tokio::time::Instant::now()).is_some()
    }

    /// Declares the view complete as it is: for a view filled by other means than the watches
    /// (`kubectl iam explain` computing a decision from what it read itself).
    pub fn mark_synced(&self) {
        self.pods_synced.store(true, Ordering::Release);
        self.namespaces_synced.store(true, Ordering::Release);
        self.accounts_synced.store(true, Ordering::Release);
        self.changed();
    }
}

/// How a watched resource updates its index.
trait Indexed:
    kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static
{
    type Index: Default + Send + Sync + 'static;
    const WHAT: &'static str;
    /// The index a relist fills, given the current one.
    fn relist_from(_current: &Self::Index) -> Self::Index {
        Self::Index::default()
    }
    /// A relist into `fresh` is complete.
    fn relisted(_fresh: &mut Self::Index) {}
    /// Records `object`; whether that may have changed what the index answers.
    fn apply(index: &mut Self::Index, object: &Self) -> bool;
    /// Forgets `object` (deleted); whether that changed the index.
    fn remove(index: &mut Self::Index, object: &Self) -> bool;
    fn slot(cluster: &Cluster) -> (&RwLock<Self::Index>, &AtomicBool);
}

impl Indexed for SlimPod {
    type Index = PodIndex;
    const WHAT: &'static str = "pods";
    fn relist_from(current: &PodIndex) -> PodIndex {
        current.for_relist()
    }
    fn relisted(fresh: &mut PodIndex) {
        fresh.relisted();
    }
    fn apply(index: &mut PodIndex, pod: &SlimPod) -> bool {
        index.apply_pod(pod)
    }
    fn remove(index: &mut PodIndex, pod: &SlimPod) -> bool {
        pod.metadata
            .uid
            .as_ref()
            .is_some_and(|uid| index.remove(uid))
    }
    fn slot(cluster: &Cluster) -> (&RwLock<PodIndex>, &AtomicBool) {
        (&cluster.pods, &cluster.pods_synced)
    }
}

impl Indexed for Namespace {
    type Index = NamespaceIndex;
    const WHAT: &'static str = "namespaces";
    fn relist_from(current: &NamespaceIndex) -> NamespaceIndex {
        current.for_relist()
    }
    fn relisted(fresh: &mut NamespaceIndex) {
        fresh.relisted();
    }
    fn apply(index: &mut NamespaceIndex, ns: &Namespace) -> bool {
        let Some(name) = ns.metadata.name.as_deref() else {
            return false;
        };
        let changed = index.apply(ns);
        if changed && let Permitted::Invalid { error, .. } = &*index.rule(name) {
            tracing::warn!(
                namespace = %name,
                %error,
                compiled_rules = index.compiled_len(),
                compiled_bytes = index.compiled_bytes(),
                "the namespace's permitted rule is refused: nothing is permitted in it"
            );
        }
        use podiam_policy::policy::{POD_IDENTITY_ENABLED, POD_IDENTITY_LABEL, TOKEN_REQUIRED};
        if let Some(value) = podiam_policy::index::pod_identity_label(ns)
            && value != POD_IDENTITY_ENABLED
            && value != TOKEN_REQUIRED
        {
            // Neither the webhook's selector nor the token requirement reads it: a typo
            // would silently leave the namespace's roles to the address alone.
            tracing::warn!(
                namespace = %name,
                label = POD_IDENTITY_LABEL,
                value = %podiam_runtime::telemetry::Escaped(value),
                "the namespace's pod-identity label is neither enabled nor required: ignored"
            );
        }
        // Only a change of what pods are decided on wakes the node streams and upkeep: each
        // wake costs every replica a pass over all pods, and labels and other annotations
        // of a namespace may change often.
        changed
    }
    fn remove(index: &mut NamespaceIndex, ns: &Namespace) -> bool {
        if let Some(name) = &ns.metadata.name {
            index.remove(name);
        }
        // Namespaces are the cluster's administrators' to delete: taken as a change.
        true
    }
    fn slot(cluster: &Cluster) -> (&RwLock<NamespaceIndex>, &AtomicBool) {
        (&cluster.namespaces, &cluster.namespaces_synced)
    }
}

impl Indexed for SlimServiceAccount {
    type Index = AccountIndex;
    const WHAT: &'static str = "serviceaccounts";
    fn relist_from(current: &AccountIndex) -> AccountIndex {
        AccountIndex::keyed(current.role_key())
    }
    fn apply(index: &mut AccountIndex, account: &SlimServiceAccount) -> bool {
        index.apply_meta(&account.metadata)
    }
    fn remove(index: &mut AccountIndex, account: &SlimServiceAccount) -> bool {
        index.remove_meta(&account.metadata)
    }
    fn slot(cluster: &Cluster) -> (&RwLock<AccountIndex>, &AtomicBool) {
        (&cluster.accounts, &cluster.accounts_synced)
    }
}

/// Watches pods, namespaces and ServiceAccounts into `cluster` until `shutdown`, counting
/// complete lists in `relists`.
pub async fn run(
    client: kube::Client,
    config: watcher::Config,
    cluster: Arc<Cluster>,
    relists: Family<ResourceLabels, Counter>,
    shutdown: CancellationToken,
) {
    let watching = Watching {
        config,
        cluster,
        relists,
        shutdown,
    };
    tokio::join!(
        watch::<SlimPod>(Api::all(client.clone()), &watching),
        watch::<Namespace>(Api::all(client.clone()), &watching),
        watch::<SlimServiceAccount>(Api::all(client), &watching),
    );
}

/// What every watch of [`run`] shares.
struct Watching {
    config: watcher::Config,
    cluster: Arc<Cluster>,
    relists: Family<ResourceLabels, Counter>,
    shutdown: CancellationToken,
}

/// The watches' settings for a client whose connections time out after `api_timeout` with
/// nothing received. The API server is asked to end each watch before that, so a quiet
/// watch that works ends, and is made again from where it was, before the client would
/// take its connection for lost; and late enough that the watcher's own idle limit
/// (kube-runtime: the watch's time plus [`WATCHER_IDLE_MARGIN`]) comes after the read
/// timeout, which is what counts a lost connection as a failure (the idle limit makes the
/// watch again without a word). Two thirds of `api_timeout`, or up to 4 s short of it.
pub fn watch_config(api_timeout: Duration) -> watcher::Config {
    let whole = api_timeout.as_secs();
    let seconds = (whole * 2 / 3)
        .max(whole.saturating_sub(WATCHER_IDLE_MARGIN.as_secs() - 1))
        .clamp(1, whole.saturating_sub(1).max(1));
    watcher::Config::default()
        .timeout(u32::try_from(seconds).unwrap_or(u32::MAX))
        .page_size(LIST_PAGE_SIZE)
}

/// Objects per page of a list. The client holds a page's whole text while it decodes it,
/// and any tenant may write objects of up to 1.5 MiB (etcd's limit): a page of
/// this many is at most 150 MiB of text, decoded slim ([`podiam_policy::slim`]) into little
/// more than what the index keeps. (kube-runtime's default, 500, let such a page take 750
/// MiB of text alone.) 100k pods are a thousand pages; each page costs a round trip, so
/// fewer objects a page would make relists slower (50: twice as long at 100k pods).
pub const LIST_PAGE_SIZE: u32 = 100;

/// kube-runtime's watcher gives a watch its time plus this before it takes the stream for
/// idle and makes it again.
const WATCHER_IDLE_MARGIN: Duration = Duration::from_secs(5);

async fn watch<K>(api: Api<K>, watching: &Watching)
where
    K: Indexed,
    K::DynamicType: Default,
{
    let Watching {
        config,
        cluster,
        relists,
        shutdown,
    } = watching;
    let (index, synced) = K::slot(cluster);
    let stream = watcher(api, config.clone());
    let mut stream = std::pin::pin!(stream);
    let mut relist: Option<K::Index> = None;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = stream.try_next() => event,
        };
        let relisting = synced.load(Ordering::Acquire);
        note_outcome(&cluster.failures, K::WHAT, &event, relisting);
        match event {
            Ok(Some(Event::Init)) => {
                let current = index.read().unwrap_or_else(|e| e.into_inner());
                relist = Some(K::relist_from(&current));
            }
            Ok(Some(Event::InitApply(object))) => {
                if let Some(fresh) = relist.as_mut() {
                    K::apply(fresh, &object);
                }
            }
            Ok(Some(Event::InitDone)) => {
                if let Some(fresh) = relist.take() {
                    replace_view::<K>(index, fresh);
                }
                relists
                    .get_or_create(&ResourceLabels { resource: K::WHAT })
                    .inc();
                if !synced.swap(true, Ordering::AcqRel) {
                    tracing::info!(resource = K::WHAT, "first sync complete");
                }
                cluster.changed();
            }
            Ok(Some(Event::Apply(object))) => {
                // Node streams and the credential upkeep look again at every change; an
                // update that changed nothing podiam keeps does not wake them.
                let changed = K::apply(
                    &mut index.write().unwrap_or_else(|e| e.into_inner()),
                    &object,
                );
                if changed {
                    cluster.changed();
                }
            }
            Ok(Some(Event::Delete(object))) => {
                let changed = K::remove(
                    &mut index.write().unwrap_or_else(|e| e.into_inner()),
                    &object,
                );
                if changed {
                    cluster.changed();
                }
            }
            Ok(None) => {
                tracing::warn!(resource = K::WHAT, "watch stream ended");
                return;
            }
            Err(error) => {
                tracing::warn!(resource = K::WHAT, %error, "watch failed; retrying with backoff");
            }
        }
    }
}

/// Counts a watch's event towards (or against) the view being stale, and says when it
/// turns stale or current again. A success is a relist complete or a change seen: Init comes
/// before its list is asked for, and InitApply may come from a first page of a relist whose
/// next pages fail.
/// `synced`: whether the resource had synced before (a list is then a relist, which makes
/// the view stale while it runs long: see [`RELIST_STALE_AFTER`]).
fn note_outcome<K>(
    failures: &WatchFailures,
    what: &'static str,
    event: &Result<Option<Event<K>>, watcher::Error>,
    synced: bool,
) {
    let now = tokio::time::Instant::now();
    match event {
        Ok(Some(Event::Init)) if synced => failures.relist_began(what, now),
        Ok(Some(Event::Init | Event::InitApply(_))) | Ok(None) => {}
        Ok(Some(Event::InitDone)) => {
            if let Some(took) = failures.relist_done(what, now)
                && took >= RELIST_STALE_AFTER
            {
                tracing::info!(
                    resource = what,
                    took_s = took.as_secs(),
                    "relist complete; the view counted as stale while it ran"
                );
            }
            if let Some(stale_for) = failures.succeeded(what, now) {
                tracing::info!(
                    resource = what,
                    stale_for_s = stale_for.as_secs(),
                    "watch works again; the view is current"
                );
            }
        }
        Ok(Some(Event::Apply(_) | Event::Delete(_))) => {
            if let Some(stale_for) = failures.succeeded(what, now) {
                tracing::info!(
                    resource = what,
                    stale_for_s = stale_for.as_secs(),
                    "watch works again; the view is current"
                );
            }
        }
        Err(_) => {
            if failures.failed(what, now) {
                tracing::warn!(
                    resource = what,
                    after_s = STALE_AFTER.as_secs(),
                    "watch failing with no success since: the view is stale (still answering from it; agents prefer replicas whose view is current)"
                );
            }
        }
    }
}

/// Puts a relist's `fresh` view in place of `index`'s.
fn replace_view<K: Indexed>(index: &RwLock<K::Index>, mut fresh: K::Index) {
    K::relisted(&mut fresh);
    let old = std::mem::replace(
        &mut *index.write().unwrap_or_else(|e| e.into_inner()),
        fresh,
    );
    // The old view is dropped off the lock, and what it held goes back to the kernel at
    // once rather than over jemalloc's decay time. That takes this worker for some 10-20 ms
    // at 100k pods (unchanged records are the new view's own; purging 57 MiB took 16-24 ms
    // on a busy machine), once per relist. Here, not on a blocking thread: a thread of its
    // own kept free pages of its own (benchmark, 100k pods: RSS after each relist
    // 99.4-100.0 MiB that way, 98.5-99.3 here).
    let started = std::time::Instant::now();
    drop(old);
    let arenas = crate::heap::release_freed();
    tracing::debug!(
        resource = K::WHAT,
        arenas,
        elapsed_us = started.elapsed().as_micros() as u64,
        "replaced view dropped, freed pages returned"
    );
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<K>, watcher::Error>>
where
    K: Indexed,
    K::DynamicType: Default,
{
    watcher::watcher(api, config).backoff(WatchBackoff::default())
}

/// How long a watch fails (twice at least), with no success between, before the view
/// counts as stale. A single failure never does: a watch broken once and made again on a
/// quiet resource has nothing to say that would prove it works.
pub const STALE_AFTER: Duration = Duration::from_secs(15);
/// How long a relist after the first sync runs before the view counts as stale until it is
/// complete. A relist of 10k pods takes a second or two.
pub const RELIST_STALE_AFTER: Duration = Duration::from_secs(5);
/// A spell of failing whose last failure is this old is over: the watch was made again and
/// has had nothing to say. Failing attempts come at most [`WATCH_RETRY_MAX`] apart plus the
/// attempt's own time: up to the client's 30 s connect timeout when the API server's address
/// does not answer at all (a network partition), or `--api-timeout` (at most 30 s) when it
/// accepts connections but answers nothing.
const SPELL_OVER_AFTER: Duration = Duration::from_secs(40);

/// One watch's spell of failing.
#[derive(Clone, Copy, Debug)]
struct Spell {
    since: tokio::time::Instant,
    last: tokio::time::Instant,
    /// Failures in it.
    failures: u32,
    /// Whether it has been said to be stale (logged once per spell).
    told: bool,
}

/// The watches' spells of failing, by resource: a failure starts or extends one, any
/// success ends it.
#[derive(Debug, Default)]
pub struct WatchFailures {
    spells: Mutex<Vec<(&'static str, Spell)>>,
    /// The relists under way after the first sync, by resource, and since when (a relist
    /// begun again after a failure half-way keeps its start).
    relists: Mutex<Vec<(&'static str, tokio::time::Instant)>>,
}

impl WatchFailures {
    /// `what`'s watch failed at `now`; true when that makes the view stale (first time in
    /// this spell).
    pub fn failed(&self, what: &'static str, now: tokio::time::Instant) -> bool {
        let mut spells = self.spells.lock().unwrap_or_else(|e| e.into_inner());
        let at = match spells.iter().position(|(w, _)| *w == what) {
            Some(at) if now.saturating_duration_since(spells[at].1.last) < SPELL_OVER_AFTER => at,
            Some(at) => {
                spells.remove(at);
                spells.len()
            }
            None => spells.len(),
        };
        if at == spells.len() {
            let spell = Spell {
                since: now,
                last: now,
                failures: 0,
                told: false,
            };
            spells.push((what, spell));
        }
        let spell = &mut spells[at].1;
        spell.last = now;
        spell.failures = spell.failures.saturating_add(1);
        let tell = !spell.told && spell.stale(now);
        spell.told |= tell;
        tell
    }

    /// `what`'s watch worked at `now`: its spell (if any) is over; how long it had been
    /// stale, if it was.
    pub fn succeeded(&self, what: &'static str, now: tokio::time::Instant) -> Option<Duration> {
        let mut spells = self.spells.lock().unwrap_or_else(|e| e.into_inner());
        let at = spells.iter().position(|(w, _)| *w == what)?;
        let (_, spell) = spells.remove(at);
        spell
            .told
            .then(|| now.saturating_duration_since(spell.since))
    }

    /// The resource whose watch makes the view stale at `now`, and for how long it has been
    /// failing (or relisting): one that failed twice or more over [`STALE_AFTER`], whose spell
    /// is not over, or whose relist has run for [`RELIST_STALE_AFTER`].
    pub fn stale(&self, now: tokio::time::Instant) -> Option<(&'static str, Duration)> {
        let spells = self.spells.lock().unwrap_or_else(|e| e.into_inner());
        let failing = spells
            .iter()
            .find(|(_, spell)| spell.stale(now))
            .map(|(what, spell)| (*what, now.saturating_duration_since(spell.since)));
        drop(spells);
        failing.or_else(|| {
            let relists = self.relists.lock().unwrap_or_else(|e| e.into_inner());
            relists
                .iter()
                .map(|(what, since)| (*what, now.saturating_duration_since(*since)))
                .find(|(_, running)| *running >= RELIST_STALE_AFTER)
        })
    }

    /// A relist of `what` began at `now` (or began again, after failing half-way).
    pub fn relist_began(&self, what: &'static str, now: tokio::time::Instant) {
        let mut relists = self.relists.lock().unwrap_or_else(|e| e.into_inner());
        if !relists.iter().any(|(w, _)| *w == what) {
            relists.push((what, now));
        }
    }

    /// The relist of `what` is complete at `now`; how long it ran, if one was under way.
    pub fn relist_done(&self, what: &'static str, now: tokio::time::Instant) -> Option<Duration> {
        let mut relists = self.relists.lock().unwrap_or_else(|e| e.into_inner());
        let at = relists.iter().position(|(w, _)| *w == what)?;
        let (_, since) = relists.remove(at);
        Some(now.saturating_duration_since(since))
    }
}

impl Spell {
    fn stale(&self, now: tokio::time::Instant) -> bool {
        self.failures >= 2
            && now.saturating_duration_since(self.since) >= STALE_AFTER
            && now.saturating_duration_since(self.last) < SPELL_OVER_AFTER
    }
}

/// First wait after a failed list or watch. client-go's reflectors start at 800 ms; a
/// podiam server is one of two or three clients of this kind, and the sooner its view is
/// current again the sooner a revocation made meanwhile applies.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts (client-go: 30 s). An API server back after an outage is
/// seen within this time.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff with equal jitter between [`WATCH_RETRY_MIN`] and
/// [`WATCH_RETRY_MAX`]; reset by every successful watch event.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_RETRY_MIN,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let step = self.next;
        self.next = (step * 2).min(WATCH_RETRY_MAX);
        // Equal jitter: half fixed, half random, so replicas do not retry in step.
        let half = step / 2;
        Some(half + half.mul_f64(fastrand::f64()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_RETRY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut backoff = WatchBackoff::default();
        let waits: Vec<Duration> = (&mut backoff).take(8).collect();
        let mut step = WATCH_RETRY_MIN;
        for wait in &waits {
            assert!(
                *wait >= step / 2 && *wait <= step,
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(WATCH_RETRY_MAX);
        }
        assert!(waits[7] >= WATCH_RETRY_MAX / 2);
        backoff.reset();
        assert!(backoff.next().expect("a wait") <= WATCH_RETRY_MIN);
    }

    #[test]
    fn a_relist_after_the_first_sync_makes_the_view_stale_while_it_runs_long() {
        let failures = WatchFailures::default();
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let later = at(3_600_000);
        let init = Ok(Some(Event::<SlimPod>::Init));
        let done = Ok(Some(Event::<SlimPod>::InitDone));
        // The first list is no relist: not stale however long it runs (the server is not
        // ready meanwhile anyway).
        note_outcome(&failures, "pods", &init, false);
        assert_eq!(failures.stale(later), None);
        note_outcome(&failures, "pods", &done, false);
        // A relist (a 410 Gone) is: once it has run long, until it is complete.
        note_outcome(&failures, "pods", &init, true);
        assert!(failures.stale(later).is_some());
        note_outcome(&failures, "pods", &done, true);
        assert_eq!(failures.stale(later), None);
        // Current for its first seconds, then stale, also across a failure half-way and the
        // list begun again.
        failures.relist_began("namespaces", at(0));
        assert_eq!(failures.stale(at(4_999)), None);
        assert_eq!(
            failures.stale(at(5_000)),
            Some(("namespaces", RELIST_STALE_AFTER))
        );
        failures.relist_began("namespaces", at(6_000));
        assert_eq!(
            failures.stale(at(7_000)),
            Some(("namespaces", Duration::from_secs(7)))
        );
        let took = failures.relist_done("namespaces", at(8_000));
        assert_eq!(took, Some(Duration::from_secs(8)));
        assert_eq!(failures.stale(at(9_000)), None);
    }

    #[test]
    fn a_watch_failing_with_no_success_for_fifteen_seconds_makes_the_view_stale() {
        let failures = WatchFailures::default();
        let start = tokio::time::Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // Failing every 5 s (the backoff's cap): stale from the 15th second, said once.
        let told: Vec<bool> = (0..=4)
            .map(|i| failures.failed("pods", at(i * 5)))
            .collect();
        assert_eq!(told, [false, false, false, true, false]);
        assert_eq!(failures.stale(at(14)), None);
        assert_eq!(
            failures.stale(at(20)),
            Some(("pods", Duration::from_secs(20)))
        );
        // Still stale between failures; no longer once they have stopped for 40 s (the
        // watch was made again and had nothing to say).
        assert!(failures.stale(at(59)).is_some());
        assert_eq!(failures.stale(at(60)), None);
        // A success ends the spell: the next failure starts a new one.
        assert_eq!(
            failures.succeeded("pods", at(21)),
            Some(Duration::from_secs(21))
        );
        assert_eq!(failures.stale(at(22)), None);
        let told: Vec<bool> = [22, 27, 32, 37]
            .map(|s| failures.failed("pods", at(s)))
            .into();
        assert_eq!(told, [false, false, false, true]);
        assert!(failures.stale(at(37)).is_some());
        assert_eq!(failures.succeeded("namespaces", at(37)), None);
    }

    #[test]
    fn watches_end_well_before_the_client_takes_their_connection_for_lost() {
        for (api_timeout, watch_seconds) in [(3, 2), (4, 2), (10, 6), (15, 11), (30, 26)] {
            let config = watch_config(Duration::from_secs(api_timeout));
            assert_eq!(config.timeout, Some(watch_seconds), "{api_timeout}");
            // Ended by the API server before the read timeout; the watcher's idle limit
            // after it, so that a lost connection is a failure, not a quiet remake.
            assert!(u64::from(watch_seconds) < api_timeout);
            assert!(u64::from(watch_seconds) + WATCHER_IDLE_MARGIN.as_secs() > api_timeout);
        }
    }

    #[test]
    fn one_failure_is_never_stale_and_failures_a_connect_timeout_apart_are() {
        let failures = WatchFailures::default();
        let start = tokio::time::Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // A watch broken once and made again on a quiet resource: nothing more is heard.
        assert!(!failures.failed("namespaces", at(0)));
        for s in [15, 20, 39, 45] {
            assert_eq!(failures.stale(at(s)), None, "at {s} s");
        }
        // A partition: each attempt fails after the client's 30 s connect timeout.
        let told: Vec<bool> = [100, 135, 170]
            .map(|s| failures.failed("pods", at(s)))
            .into();
        assert_eq!(told, [false, true, false]);
        assert!(failures.stale(at(200)).is_some());
        assert_eq!(failures.stale(at(210)), None, "40 s after the last failure");
    }

    #[test]
    fn failures_far_apart_are_separate_spells_and_watches_are_apart() {
        let failures = WatchFailures::default();
        let start = tokio::time::Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // A failure a minute after the last one (the watch worked quietly between) starts
        // a new spell, not one of 60 s.
        assert!(!failures.failed("namespaces", at(0)));
        assert!(!failures.failed("namespaces", at(60)));
        assert_eq!(failures.stale(at(61)), None);
        // One resource's spell is not another's: a pods success leaves namespaces failing.
        assert!(!failures.failed("pods", at(61)));
        for s in [65, 70, 75] {
            failures.failed("namespaces", at(s));
        }
        assert_eq!(failures.succeeded("pods", at(75)), None);
        assert_eq!(
            failures.stale(at(76)),
            Some(("namespaces", Duration::from_secs(16)))
        );
    }
}
