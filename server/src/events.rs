//! Kubernetes Events on pods that are refused their role or whose credentials STS will not
//! give, so `kubectl describe pod` shows why.
//!
//! Producers ([`Events::report`]) never wait: a notice passes the [`Throttle`] (at most one
//! event per pod and reason per `repeat_after`, a token bucket over all pods so a
//! namespace-wide mistake cannot flood the API server, and one per namespace so that one
//! namespace's thousands of refused pods leave room for the others'), then goes into a bounded queue that
//! one task ([`deliver`]) empties into the events.k8s.io/v1 API through kube-rs's recorder
//! (which folds repeats into the event's series). A full queue drops the notice and counts
//! it; an API failure is logged and counted. Events are best effort: the audit log and the
//! pod's own answer carry the same facts.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use podiam_proto::Reason;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buckets::{Bucket, KeyedBuckets};
use crate::sts::{Clock, SystemClock};

/// Something to tell about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: Reason,
    /// One human-readable line (the refusal's message).
    pub note: String,
}

impl Notice {
    /// The event's PascalCase reason and the action it concerns.
    fn reason_and_action(&self) -> (&'static str, &'static str) {
        match self.reason {
            Reason::RoleNotPermitted => ("RoleNotPermitted", "CheckRole"),
            Reason::InvalidRole => ("InvalidRole", "CheckRole"),
            Reason::AmbiguousPod => ("DuplicatePodIP", "IdentifyPod"),
            Reason::StsRefused => ("STSRefused", "AssumeRole"),
            Reason::StsUnavailable => ("STSUnavailable", "AssumeRole"),
            _ => ("CredentialsRefused", "CheckRole"),
        }
    }
}

/// Events by what became of them (exported as `podiam_server_events_total{result}`).
#[derive(Clone, Debug, Default)]
pub struct EventCounters {
    /// Written to the API.
    pub sent: Counter,
    /// Not written: the rate limit or the full queue.
    pub dropped: Counter,
    /// The API refused or could not be reached.
    pub failed: Counter,
}

/// How often events may be written.
#[derive(Clone, Debug)]
pub struct EventLimits {
    /// The same reason for the same pod is told again only after this long.
    pub repeat_after: Duration,
    /// Events allowed in a burst, over all pods.
    pub burst: u32,
    /// Sustained events per second, over all pods.
    pub per_second: f64,
    /// Events allowed in a burst, and sustained per second, for the pods of one namespace:
    /// a namespace with thousands of refused pods takes its own share, not the cluster's.
    pub namespace_burst: u32,
    pub namespace_per_second: f64,
    /// Notices waiting for the API at most.
    pub queue: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            // The recorder folds repeats into one event's series for 6 minutes; telling
            // again every 5 keeps a lasting refusal visible without writing per request.
            repeat_after: Duration::from_secs(5 * 60),
            // client-go's event broadcaster allows a burst of 25 per object and a refill
            // of one per 5 minutes per object; over all pods a modest global rate is enough.
            burst: 50,
            per_second: 10.0,
            namespace_burst: 10,
            namespace_per_second: 1.0,
            queue: 1024,
        }
    }
}

/// What the throttle says about a notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Write it.
    Tell,
    /// Told recently: nothing new.
    AlreadyTold,
    /// Over the global rate: dropped (counted).
    RateLimited,
}

/// Which notices become events: per pod and reason, and a token bucket over all.
#[derive(Debug)]
pub struct Throttle {
    limits: EventLimits,
    /// Per pod UID: the last reason told and when (ms).
    told: HashMap<String, (Reason, i64)>,
    /// The bucket over all pods, and one per namespace.
    all: Bucket,
    namespaces: KeyedBuckets,
}

/// Namespaces whose buckets are kept; beyond, those that are full again are forgotten.
const NAMESPACE_BUCKETS: usize = 4096;

impl Throttle {
    pub fn new(limits: EventLimits) -> Throttle {
        Throttle {
            all: Bucket::full(limits.burst),
            namespaces: KeyedBuckets::new(
                limits.namespace_burst,
                limits.namespace_per_second,
                NAMESPACE_BUCKETS,
            ),
            limits,
            told: HashMap::new(),
        }
    }

    /// Whether to tell `reason` about pod `uid` of `namespace` now, recording it if so.
    pub fn admit(&mut self, now_ms: i64, namespace: &str, uid: &str, reason: Reason) -> Admission {
        if let Some((last, at)) = self.told.get(uid)
            && *last == reason
            && now_ms - at < self.limits.repeat_after.as_millis() as i64
        {
            return Admission::AlreadyTold;
        }
        let own_has = self.namespaces.has(now_ms, namespace);
        let all_has = self
            .all
            .refill(now_ms, self.limits.burst, self.limits.per_second);
        if !own_has || !all_has {
            return Admission::RateLimited;
        }
        self.namespaces.take(namespace);
        self.all.tokens -= 1.0;
        self.told.insert(uid.to_string(), (reason, now_ms));
        Admission::Tell
    }

    /// Forgets pods that are gone or no longer refused, so their next refusal is told at once.
    pub fn retain(&mut self, keep: &HashSet<&str>) {
        self.told.retain(|uid, _| keep.contains(uid.as_str()));
    }
}

/// The producers' side: throttle and queue.
#[derive(Debug)]
pub struct Events {
    throttle: Mutex<Throttle>,
    queue: Option<mpsc::Sender<Notice>>,
    counters: EventCounters,
}

impl Events {
    /// Events written by [`deliver`] reading the returned receiver.
    pub fn new(limits: EventLimits, counters: EventCounters) -> (Events, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let events = Events {
            throttle: Mutex::new(Throttle::new(limits)),
            queue: Some(tx),
            counters,
        };
        (events, rx)
    }

    /// Events that go nowhere (for tests of other parts).
    pub fn disabled() -> Events {
        Events {
            throttle: Mutex::new(Throttle::new(EventLimits::default())),
            queue: None,
            counters: EventCounters::default(),
        }
    }

    /// Tells `notice` unless told recently; never waits.
    pub fn report(&self, notice: Notice) {
        let Some(queue) = &self.queue else { return };
        let admitted = {
            let mut throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
            throttle.admit(
                SystemClock.now_ms(),
                &notice.namespace,
                &notice.uid,
                notice.reason,
            )
        };
        match admitted {
            Admission::Tell => {
                if queue.try_send(notice).is_err() {
                    self.counters.dropped.inc();
                }
            }
            Admission::AlreadyTold => {}
            Admission::RateLimited => {
                self.counters.dropped.inc();
            }
        }
    }

    /// After a survey of the whole cluster: only the pods in `refused` keep their memory.
    pub fn retain(&self, refused: &HashSet<&str>) {
        self.throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(refused);
    }
}

/// The controller name events are reported under.
pub const REPORTER: &str = "podiam-server";

/// Writes queued notices as events until `shutdown`.
pub async fn deliver(
    client: kube::Client,
    instance: Option<String>,
    mut queue: mpsc::Receiver<Notice>,
    counters: EventCounters,
    shutdown: CancellationToken,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: REPORTER.into(),
            instance,
        },
    );
    loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => return,
            notice = queue.recv() => match notice {
                Some(notice) => notice,
                None => return,
            },
        };
        let (reason, action) = notice.reason_and_action();
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            // The API limits notes to 1 kB.
            note: Some(truncate(&notice.note, 1024)),
            action: action.into(),
            secondary: None,
        };
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(notice.namespace.clone()),
            name: Some(notice.name.clone()),
            uid: Some(notice.uid.clone()),
            ..ObjectReference::default()
        };
        match recorder.publish(&event, &regarding).await {
            Ok(()) => {
                counters.sent.inc();
            }
            Err(error) => {
                counters.failed.inc();
                tracing::warn!(
                    pod = %notice.name,
                    namespace = %notice.namespace,
                    reason,
                    %error,
                    "could not write an event"
                );
            }
        };
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EventLimits {
        EventLimits {
            repeat_after: Duration::from_secs(300),
            burst: 3,
            per_second: 1.0,
            namespace_burst: 3,
            namespace_per_second: 1.0,
            queue: 8,
        }
    }

    #[test]
    fn one_namespace_takes_its_own_share_and_leaves_the_rest_to_others() {
        let mut throttle = Throttle::new(EventLimits::default());
        let mut told = |now_ms: i64, namespace: &str, pods: std::ops::Range<usize>| {
            pods.filter(|i| {
                throttle.admit(
                    now_ms,
                    namespace,
                    &format!("{namespace}-{i}"),
                    Reason::StsRefused,
                ) == Admission::Tell
            })
            .count()
        };
        // A namespace of 3000 refused pods: its burst, then one a second.
        assert_eq!(told(0, "noisy", 0..3000), 10);
        assert_eq!(told(1_000, "noisy", 3000..6000), 1);
        // Another namespace's pods are told meanwhile, up to its own burst.
        assert_eq!(told(1_000, "quiet", 0..20), 10);
        // The buckets kept are bounded, however many namespaces are told.
        let mut throttle = Throttle::new(EventLimits {
            burst: u32::MAX,
            ..EventLimits::default()
        });
        for i in 0..NAMESPACE_BUCKETS + 100 {
            let namespace = format!("ns-{i}");
            throttle.admit(0, &namespace, &namespace, Reason::StsRefused);
        }
        assert_eq!(throttle.namespaces.len(), NAMESPACE_BUCKETS);
        // Those full again are forgotten for newcomers.
        throttle.admit(60_000, "late", "late", Reason::StsRefused);
        assert_eq!(throttle.namespaces.len(), 1);
    }

    #[test]
    fn a_pod_is_told_once_per_reason_until_the_repeat_interval() {
        let mut throttle = Throttle::new(limits());
        assert_eq!(
            throttle.admit(0, "ns", "a", Reason::RoleNotPermitted),
            Admission::Tell
        );
        assert_eq!(
            throttle.admit(1_000, "ns", "a", Reason::RoleNotPermitted),
            Admission::AlreadyTold
        );
        // A different reason is news.
        assert_eq!(
            throttle.admit(2_000, "ns", "a", Reason::StsUnavailable),
            Admission::Tell
        );
        assert_eq!(
            throttle.admit(3_000, "ns", "a", Reason::StsUnavailable),
            Admission::AlreadyTold
        );
        // Told again after the interval.
        assert_eq!(
            throttle.admit(303_000, "ns", "a", Reason::StsUnavailable),
            Admission::Tell
        );
        // A pod no longer refused is forgotten and told at once next time.
        throttle.retain(&HashSet::new());
        assert_eq!(
            throttle.admit(304_000, "ns", "a", Reason::StsUnavailable),
            Admission::Tell
        );
    }

    #[test]
    fn the_global_bucket_bounds_a_burst_and_refills() {
        let mut throttle = Throttle::new(limits());
        let admitted: Vec<_> = (0..5)
            .map(|i| {
                throttle.admit(
                    0,
                    &format!("ns{i}"),
                    &format!("p{i}"),
                    Reason::RoleNotPermitted,
                )
            })
            .collect();
        assert_eq!(
            admitted,
            [
                Admission::Tell,
                Admission::Tell,
                Admission::Tell,
                Admission::RateLimited,
                Admission::RateLimited
            ]
        );
        // One token per second.
        assert_eq!(
            throttle.admit(1_000, "ns3", "p3", Reason::RoleNotPermitted),
            Admission::Tell
        );
        assert_eq!(
            throttle.admit(1_000, "ns4", "p4", Reason::RoleNotPermitted),
            Admission::RateLimited
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let counters = EventCounters::default();
        let (events, _rx) = Events::new(
            EventLimits {
                burst: 100,
                queue: 2,
                ..limits()
            },
            counters.clone(),
        );
        for i in 0..5 {
            events.report(Notice {
                namespace: "ns".into(),
                name: format!("p{i}"),
                uid: format!("u{i}"),
                reason: Reason::RoleNotPermitted,
                note: "no".into(),
            });
        }
        assert_eq!(counters.dropped.get(), 3);
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("ab", 5), "ab");
        assert_eq!(truncate("aé", 2), "a");
    }
}
