//! One watch response: a stream of newline-delimited JSON watch events
//! (`{"type":"ADDED","object":{…}}`), as the apiserver sends them over a chunked HTTP/1.1
//! response.
//!
//! The stream starts with what [`Store::watch`](super::store::Store::watch) handed over
//! (synthetic ADDED events for the current state, or history to replay), then follows the
//! live broadcast. It ends when the client's `timeoutSeconds` passes, when the emulator
//! shuts down or [`close_watches`](super::KubeEmulator::close_watches) is called, or when
//! the watcher falls more than the broadcast capacity behind (the apiserver also drops
//! watchers that cannot keep up; the client resumes from its last resourceVersion). Writers
//! never wait for watchers.
//!
//! Selector semantics follow the apiserver's watch cache: an object that starts matching is
//! sent as ADDED, one that stops matching as DELETED (its previous content, stamped with the
//! new resourceVersion).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::clock::now_unix;
use super::resource::Kind;
use super::store::{EventType, ListOptions, WatchRecord, WatchStart, set_path};
use super::table::{IncludeObject, TableMeta, table};

/// Which objects a watch reports.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    /// The watched resource.
    pub kind: Kind,
    /// Only this namespace, if set.
    pub namespace: Option<String>,
    /// Label and field selectors (paging fields unused).
    pub selectors: ListOptions,
}

impl WatchFilter {
    fn selects(&self, object: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
            && self.selectors.selects(object)
    }
}

/// The event a watch with `filter` sends for `record`, if any.
pub fn visible_event(filter: &WatchFilter, record: &WatchRecord) -> Option<(EventType, Value)> {
    if record.kind != filter.kind {
        return None;
    }
    let now_matches = filter.selects(&record.object);
    match record.event {
        EventType::Added | EventType::Deleted => {
            now_matches.then(|| (record.event, record.object.clone()))
        }
        EventType::Modified => {
            let previous = record.previous.as_ref().filter(|p| filter.selects(p));
            match (previous, now_matches) {
                (Some(_), true) => Some((EventType::Modified, record.object.clone())),
                (None, true) => Some((EventType::Added, record.object.clone())),
                (Some(previous), false) => {
                    let mut gone = previous.clone();
                    set_path(
                        &mut gone,
                        &["metadata", "resourceVersion"],
                        json!(record.resource_version.to_string()),
                    );
                    Some((EventType::Deleted, gone))
                }
                (None, false) => None,
            }
        }
    }
}

/// How event objects are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchOutput {
    /// The objects themselves.
    Json,
    /// One-row Tables (`kubectl get -w`), with the Table apiVersion and row object form.
    Table(&'static str, IncludeObject),
}

/// Per-watch settings from the query string and the emulator options.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// Send BOOKMARK events this often (`allowWatchBookmarks=true`).
    pub bookmark_interval: Option<Duration>,
    /// End the stream after this long (`timeoutSeconds`).
    pub timeout: Option<Duration>,
    /// Object form.
    pub output: WatchOutput,
}

/// One encoded watch event line.
pub fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event, "object": object})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// A BOOKMARK object: kind, apiVersion and only `metadata.resourceVersion` (plus the
/// `k8s.io/initial-events-end` annotation when it closes the initial events).
pub fn bookmark_object(kind: Kind, resource_version: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.kind_name(), "apiVersion": kind.api_version(), "metadata": metadata})
}

/// The running state of one watch response.
#[derive(Debug)]
pub struct WatchStream {
    pending: VecDeque<Bytes>,
    start: WatchStart,
    filter: WatchFilter,
    settings: WatchSettings,
    /// The newest resourceVersion this watch has processed (sent or filtered out).
    seen: u64,
    bookmarks: Option<Interval>,
    deadline: Option<Instant>,
    shutdown: CancellationToken,
}

enum Step {
    Stop,
    Record(Arc<WatchRecord>),
    Bookmark,
}

impl WatchStream {
    /// Builds the stream, queueing its initial events.
    pub fn new(
        start: WatchStart,
        filter: WatchFilter,
        settings: WatchSettings,
        shutdown: CancellationToken,
    ) -> WatchStream {
        let now = Instant::now();
        let mut stream = WatchStream {
            pending: VecDeque::new(),
            seen: start.start_resource_version,
            bookmarks: settings
                .bookmark_interval
                .filter(|i| !i.is_zero())
                .map(|i| tokio::time::interval_at(now + i, i)),
            deadline: settings.timeout.map(|t| now + t),
            start,
            filter,
            settings,
            shutdown,
        };
        let initial = std::mem::take(&mut stream.start.initial_objects);
        for object in &initial {
            if stream.filter.selects(object) {
                stream.push_event(EventType::Added, object);
            }
        }
        for record in std::mem::take(&mut stream.start.replay) {
            stream.push_record(&record);
        }
        if stream.start.initial_events_end {
            stream.push_bookmark(true);
        }
        stream
    }

    fn push_event(&mut self, event: EventType, object: &Value) {
        let line = match self.settings.output {
            WatchOutput::Json => event_line(event.as_str(), object),
            WatchOutput::Table(api_version, include) => {
                let meta = TableMeta {
                    resource_version: object["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    ..TableMeta::default()
                };
                let one = std::slice::from_ref(object);
                let rows = table(
                    self.filter.kind,
                    one,
                    include,
                    api_version,
                    &meta,
                    now_unix(),
                );
                event_line(event.as_str(), &rows)
            }
        };
        self.pending.push_back(line);
    }

    fn push_record(&mut self, record: &WatchRecord) {
        if record.resource_version <= self.seen {
            return;
        }
        self.seen = record.resource_version;
        if let Some((event, object)) = visible_event(&self.filter, record) {
            self.push_event(event, &object);
        }
    }

    fn push_bookmark(&mut self, initial_events_end: bool) {
        let object = bookmark_object(self.filter.kind, self.seen, initial_events_end);
        self.pending.push_back(event_line("BOOKMARK", &object));
    }

    /// The next chunk to send, or `None` when the stream ends.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            let deadline = self.deadline;
            let bookmarks = &mut self.bookmarks;
            let step = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Step::Stop,
                _ = self.start.closed.cancelled() => Step::Stop,
                _ = async {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                } => Step::Stop,
                received = self.start.receiver.recv() => match received {
                    Ok(record) => Step::Record(record),
                    Err(RecvError::Lagged(missed)) => {
                        debug!(missed, "watch fell behind the broadcast; ending it");
                        Step::Stop
                    }
                    Err(RecvError::Closed) => Step::Stop,
                },
                _ = async {
                    match bookmarks {
                        Some(interval) => { interval.tick().await; }
                        None => std::future::pending().await,
                    }
                } => Step::Bookmark,
            };
            match step {
                Step::Stop => return None,
                Step::Record(record) => self.push_record(&record),
                Step::Bookmark => self.push_bookmark(false),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kube_emulator::selector::LabelSelector;

    fn filter(selector: &str) -> WatchFilter {
        WatchFilter {
            kind: Kind::Pod,
            namespace: Some("a".into()),
            selectors: ListOptions {
                label_selector: Some(LabelSelector::parse(selector).unwrap()),
                ..ListOptions::default()
            },
        }
    }

    fn pod(ns: &str, app: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": ns, "labels": {"app": app},
                            "resourceVersion": "5"}})
    }

    fn record(event: EventType, object: Value, previous: Option<Value>) -> WatchRecord {
        WatchRecord {
            resource_version: 5,
            kind: Kind::Pod,
            event,
            object,
            previous,
        }
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let f = filter("app=web");
        let cases = [
            (
                record(EventType::Added, pod("a", "web"), None),
                Some(EventType::Added),
            ),
            (record(EventType::Added, pod("a", "db"), None), None),
            (record(EventType::Added, pod("b", "web"), None), None),
            (
                record(EventType::Modified, pod("a", "web"), Some(pod("a", "web"))),
                Some(EventType::Modified),
            ),
            (
                record(EventType::Modified, pod("a", "web"), Some(pod("a", "db"))),
                Some(EventType::Added),
            ),
            (
                record(EventType::Modified, pod("a", "db"), Some(pod("a", "web"))),
                Some(EventType::Deleted),
            ),
            (
                record(EventType::Modified, pod("a", "db"), Some(pod("a", "db"))),
                None,
            ),
            (
                record(EventType::Deleted, pod("a", "web"), None),
                Some(EventType::Deleted),
            ),
        ];
        for (i, (record, want)) in cases.iter().enumerate() {
            let got = visible_event(&f, record);
            assert_eq!(got.as_ref().map(|(e, _)| *e), *want, "case {i}");
        }
        let stopped = record(EventType::Modified, pod("a", "db"), Some(pod("a", "web")));
        let (_, object) = visible_event(&f, &stopped).unwrap();
        assert_eq!(
            object["metadata"]["labels"]["app"], "web",
            "previous content is sent"
        );
    }

    #[test]
    fn bookmarks_carry_only_the_resource_version() {
        let bookmark = bookmark_object(Kind::Pod, 42, true);
        assert_eq!(
            bookmark,
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {
                "resourceVersion": "42",
                "annotations": {"k8s.io/initial-events-end": "true"}}})
        );
        let line = event_line("BOOKMARK", &bookmark);
        assert!(line.ends_with(b"\n"));
    }
}
