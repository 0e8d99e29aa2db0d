//! The emulator's object store: every object, the global resourceVersion counter, the
//! bounded watch history and the broadcast channel that feeds live watches.
//!
//! One `std::sync::Mutex` guards the whole state; no `.await` happens while it is held.
//! Every write bumps the counter, stamps the object, appends a [`WatchRecord`] to the
//! history and broadcasts it — all under the lock, so a watch that subscribes under the
//! same lock sees neither gaps nor duplicates between its replay and its live events.
//!
//! Server-managed fields follow the apiserver: `uid`, `creationTimestamp`,
//! `resourceVersion`, `namespace` are set on create and cannot be changed by updates or
//! patches (changing name or namespace is a 400, a different uid or a stale
//! resourceVersion a 409). Over HTTP, writes to the main resource keep the old `status` and
//! writes to `/status` change only `status`, as the apiserver's pod and namespace strategies
//! do; in-process writes ([`UpdateScope::Everything`]) may change both.
//!
//! Simplifications: list `resourceVersion`/`resourceVersionMatch` are accepted but lists are
//! always served from the current state (which satisfies "" , "0" and `NotOlderThan`);
//! namespaces are deleted at once with everything in them (no `Terminating` phase that
//! lingers, no finalizers); pods are deleted at once unless [`PodDeletion::Graceful`].

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::admission;
use super::clock::{format_rfc3339, now_unix};
use super::error::EmulatorError;
use super::paging::{ContinueToken, paginate};
use super::resource::Kind;
use super::selector::{FieldSelector, LabelSelector};

/// (namespace, name); namespace is "" for cluster-scoped objects.
pub type ObjectKey = (String, String);

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`
    Added,
    /// `MODIFIED`
    Modified,
    /// `DELETED`
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as kept in the history and sent to live watches.
#[derive(Debug)]
pub struct WatchRecord {
    /// The resourceVersion the write produced.
    pub resource_version: u64,
    /// The kind written.
    pub kind: Kind,
    /// What happened.
    pub event: EventType,
    /// The object after the write (for deletes: its last state, stamped with the delete's
    /// resourceVersion, as the apiserver sends it).
    pub object: Value,
    /// The object before the write, for `Modified` (selector transitions need it).
    pub previous: Option<Value>,
}

/// What deleting a pod does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodDeletion {
    /// Remove the pod at once (what a pod on a dead node with `--grace-period=0` sees).
    #[default]
    Immediate,
    /// Mark the pod terminating (`deletionTimestamp`, `deletionGracePeriodSeconds`; a
    /// MODIFIED event) and keep it until a delete with grace period 0 (like a kubelet
    /// confirming the kill) removes it.
    Graceful,
}

/// Which parts of an object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateScope {
    /// The main resource over HTTP: everything but `status`.
    Main,
    /// The `/status` subresource: only `status`.
    Status,
    /// In-process harness writes: everything but server-managed metadata.
    Everything,
}

/// List filters and paging.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// `labelSelector`
    pub label_selector: Option<LabelSelector>,
    /// `fieldSelector`
    pub field_selector: Option<FieldSelector>,
    /// `limit` (0 or none: everything)
    pub limit: Option<usize>,
    /// `continue`
    pub continue_token: Option<ContinueToken>,
}

impl ListOptions {
    /// Whether `object` passes both selectors.
    pub fn selects(&self, object: &Value) -> bool {
        self.label_selector
            .as_ref()
            .is_none_or(|s| s.matches(object))
            && self
                .field_selector
                .as_ref()
                .is_none_or(|s| s.matches(object))
    }
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListResult {
    /// The objects.
    pub items: Vec<Value>,
    /// `metadata.resourceVersion` of the list.
    pub resource_version: u64,
    /// `metadata.continue`
    pub continue_token: Option<String>,
    /// `metadata.remainingItemCount` (omitted when selectors were used, as the apiserver does).
    pub remaining_item_count: Option<usize>,
}

/// Options of a DELETE.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// `gracePeriodSeconds`
    pub grace_period_seconds: Option<i64>,
    /// `preconditions.uid`
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`
    pub resource_version: Option<String>,
    /// `dryRun=All`
    pub dry_run: bool,
}

/// Where a new watch starts.
#[derive(Debug, Clone, Default)]
pub struct WatchFrom {
    /// A specific resourceVersion to resume after; `None` for "" or "0" (synthetic ADDED
    /// events for the current state first).
    pub resource_version: Option<u64>,
    /// `sendInitialEvents=true`: ADDED for the current state, then a bookmark marking the
    /// end of the initial events.
    pub send_initial_events: bool,
}

/// What a new watch starts with, taken atomically with its subscription.
#[derive(Debug)]
pub struct WatchStart {
    /// Current objects of the kind, for synthetic ADDED events (unfiltered by namespace or
    /// selector; the watch filters).
    pub initial_objects: Vec<Value>,
    /// History records after the requested resourceVersion, to replay.
    pub replay: Vec<Arc<WatchRecord>>,
    /// The resourceVersion the watch has caught up to once `initial_objects` and `replay`
    /// are sent.
    pub start_resource_version: u64,
    /// Whether to send the `k8s.io/initial-events-end` bookmark after the initial objects.
    pub initial_events_end: bool,
    /// Live records.
    pub receiver: broadcast::Receiver<Arc<WatchRecord>>,
    /// Cancelled by [`Store::close_watches`].
    pub closed: CancellationToken,
}

/// Store tuning, from the emulator options.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Records kept for watch resumption.
    pub history: usize,
    /// Capacity of the live broadcast; a watch that falls further behind is ended.
    pub watch_buffer: usize,
    /// What deleting a pod does.
    pub pod_deletion: PodDeletion,
}

#[derive(Debug)]
struct State {
    resource_version: u64,
    objects: BTreeMap<Kind, BTreeMap<ObjectKey, Value>>,
    history: VecDeque<Arc<WatchRecord>>,
    /// A watch or continue token from a resourceVersion below this is Expired.
    oldest_valid: u64,
    events: broadcast::Sender<Arc<WatchRecord>>,
    watches_closed: CancellationToken,
    counter: u64,
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
    config: StoreConfig,
    random: RandomState,
}

const GENERATE_NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Runs `edit` on the object's `metadata` map, creating it (and making the object a map)
/// if needed.
fn with_metadata<R>(object: &mut Value, edit: impl FnOnce(&mut Map<String, Value>) -> R) -> R {
    let mut root = match std::mem::take(object) {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let mut metadata = match root.remove("metadata") {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let result = edit(&mut metadata);
    root.insert("metadata".into(), Value::Object(metadata));
    *object = Value::Object(root);
    result
}

/// Sets `value` at a nested `path`, replacing anything in the way that is not a map
/// (`serde_json`'s `IndexMut` would panic there).
pub(crate) fn set_path(target: &mut Value, path: &[&str], value: Value) {
    let mut node = target;
    for part in path {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        node = match node {
            Value::Object(map) => map.entry(part.to_string()).or_insert(Value::Null),
            _ => return,
        };
    }
    *node = value;
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str().filter(|s| !s.is_empty())
}

/// Drops empty `labels`/`annotations` maps (the apiserver omits them).
fn normalize(object: &mut Value) {
    with_metadata(object, |metadata| {
        for field in ["labels", "annotations"] {
            let empty = match metadata.get(field) {
                Some(Value::Object(map)) => map.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                metadata.remove(field);
            }
        }
    });
}

fn without_resource_version(object: &Value) -> Value {
    let mut copy = object.clone();
    with_metadata(&mut copy, |metadata| metadata.remove("resourceVersion"));
    copy
}

impl Store {
    /// An empty store (no namespaces; the emulator creates the defaults).
    pub fn new(config: StoreConfig) -> Store {
        let (events, _) = broadcast::channel(config.watch_buffer.max(1));
        Store {
            state: Mutex::new(State {
                resource_version: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest_valid: 0,
                events,
                watches_closed: CancellationToken::new(),
                counter: 0,
            }),
            config,
            random: RandomState::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn random_u64(&self, state: &mut State) -> u64 {
        state.counter += 1;
        self.random.hash_one(state.counter)
    }

    fn new_uid(&self, state: &mut State) -> String {
        let (a, b) = (self.random_u64(state), self.random_u64(state));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// The key of an object of `kind` named `name` in `namespace`.
    fn key(kind: Kind, namespace: Option<&str>, name: &str) -> Result<ObjectKey, EmulatorError> {
        if kind.namespaced() {
            let namespace = namespace.filter(|n| !n.is_empty()).ok_or_else(|| {
                EmulatorError::BadRequest(format!("{} are namespaced", kind.plural()))
            })?;
            Ok((namespace.to_string(), name.to_string()))
        } else {
            Ok((String::new(), name.to_string()))
        }
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// One object.
    pub fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, EmulatorError> {
        let key = Self::key(kind, namespace, name)?;
        self.lock()
            .objects
            .get(&kind)
            .and_then(|objects| objects.get(&key))
            .cloned()
            .ok_or_else(|| EmulatorError::NotFound {
                resource: kind.plural(),
                name: name.to_string(),
            })
    }

    /// Creates an object. `namespace` is the namespace from the URL, if any; otherwise the
    /// object's own `metadata.namespace`, otherwise `default`.
    pub fn create(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, EmulatorError> {
        if !object.is_object() {
            return Err(EmulatorError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        check_type_meta(kind, &object)?;
        set_path(&mut object, &["apiVersion"], json!(kind.api_version()));
        set_path(&mut object, &["kind"], json!(kind.kind_name()));
        let mut state = self.lock();
        let object_namespace = meta_str(&object, "namespace").map(str::to_string);
        let namespace = if kind.namespaced() {
            let namespace = match (namespace, object_namespace.as_deref()) {
                (Some(url), Some(own)) if url != own => {
                    return Err(EmulatorError::BadRequest(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request"
                            .into(),
                    ));
                }
                (Some(url), _) => url.to_string(),
                (None, Some(own)) => own.to_string(),
                (None, None) => "default".to_string(),
            };
            let exists = state
                .objects
                .get(&Kind::Namespace)
                .is_some_and(|n| n.contains_key(&(String::new(), namespace.clone())));
            if !exists {
                return Err(EmulatorError::NotFound {
                    resource: Kind::Namespace.plural(),
                    name: namespace,
                });
            }
            namespace
        } else {
            String::new()
        };
        let name = match (meta_str(&object, "name"), meta_str(&object, "generateName")) {
            (Some(name), _) => name.to_string(),
            (None, Some(prefix)) => {
                let prefix = prefix.to_string();
                loop {
                    let random = self.random_u64(&mut state);
                    let suffix: String = (0..5)
                        .map(|i| {
                            let index = (random >> (i * 8)) as usize % GENERATE_NAME_ALPHABET.len();
                            char::from(GENERATE_NAME_ALPHABET[index])
                        })
                        .collect();
                    let candidate = format!("{prefix}{suffix}");
                    let taken = state.objects.get(&kind).is_some_and(|objects| {
                        objects.contains_key(&(namespace.clone(), candidate.clone()))
                    });
                    if !taken {
                        break candidate;
                    }
                }
            }
            (None, None) => {
                return Err(EmulatorError::Invalid {
                    kind: kind.kind_name(),
                    name: String::new(),
                    message: "metadata.name: Required value: name or generateName is required"
                        .into(),
                });
            }
        };
        let key = (namespace.clone(), name.clone());
        if state
            .objects
            .get(&kind)
            .is_some_and(|objects| objects.contains_key(&key))
        {
            return Err(EmulatorError::AlreadyExists {
                resource: kind.plural(),
                name,
            });
        }
        let uid = self.new_uid(&mut state);
        with_metadata(&mut object, |metadata| {
            metadata.insert("name".into(), json!(name));
            if kind.namespaced() {
                metadata.insert("namespace".into(), json!(namespace));
            } else {
                metadata.remove("namespace");
            }
            metadata.insert("uid".into(), json!(uid));
            metadata.insert(
                "creationTimestamp".into(),
                json!(format_rfc3339(now_unix())),
            );
            metadata.remove("resourceVersion");
            metadata.remove("deletionTimestamp");
            metadata.remove("deletionGracePeriodSeconds");
        });
        apply_defaults(kind, &mut object);
        normalize(&mut object);
        validate(kind, &object, None)?;
        if dry_run {
            return Ok(object);
        }
        Ok(state.commit_put(kind, key, object, None, &self.config))
    }

    /// Updates an object through `change`, which gets the current object and returns the
    /// proposed new one (a PUT body, a patched copy, or a harness edit).
    pub fn update_with(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        scope: UpdateScope,
        dry_run: bool,
        change: impl FnOnce(&Value) -> Result<Value, EmulatorError>,
    ) -> Result<Value, EmulatorError> {
        let key = Self::key(kind, namespace, name)?;
        let mut state = self.lock();
        let old = state
            .objects
            .get(&kind)
            .and_then(|objects| objects.get(&key))
            .cloned()
            .ok_or_else(|| EmulatorError::NotFound {
                resource: kind.plural(),
                name: name.to_string(),
            })?;
        let proposed = change(&old)?;
        let new = reconcile_update(kind, &old, proposed, scope)?;
        if without_resource_version(&new) == without_resource_version(&old) {
            return Ok(old);
        }
        if dry_run {
            return Ok(new);
        }
        Ok(state.commit_put(kind, key, new, Some(old), &self.config))
    }

    /// Deletes an object and returns it as it was last seen (for a namespace: with
    /// `status.phase: Terminating`, after deleting everything in it).
    pub fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, EmulatorError> {
        let key = Self::key(kind, namespace, name)?;
        let mut state = self.lock();
        let old = state
            .objects
            .get(&kind)
            .and_then(|objects| objects.get(&key))
            .cloned()
            .ok_or_else(|| EmulatorError::NotFound {
                resource: kind.plural(),
                name: name.to_string(),
            })?;
        let conflict = |reason: String| EmulatorError::Conflict {
            resource: kind.plural(),
            name: name.to_string(),
            reason,
        };
        if let Some(uid) = options.uid.as_deref().filter(|u| !u.is_empty()) {
            let current = meta_str(&old, "uid").unwrap_or_default();
            if uid != current {
                return Err(conflict(format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {current}"
                )));
            }
        }
        if let Some(rv) = options
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty())
        {
            let current = meta_str(&old, "resourceVersion").unwrap_or_default();
            if rv != current {
                return Err(conflict(format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, \
                     ResourceVersion in object meta: {current}"
                )));
            }
        }
        let graceful = kind == Kind::Pod
            && self.config.pod_deletion == PodDeletion::Graceful
            && options.grace_period_seconds != Some(0);
        if options.dry_run {
            return Ok(old);
        }
        if graceful {
            if old["metadata"]["deletionTimestamp"].is_string() {
                return Ok(old);
            }
            let grace = options
                .grace_period_seconds
                .or_else(|| old["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            let mut marked = old.clone();
            with_metadata(&mut marked, |metadata| {
                metadata.insert(
                    "deletionTimestamp".into(),
                    json!(format_rfc3339(now_unix() + grace)),
                );
                metadata.insert("deletionGracePeriodSeconds".into(), json!(grace));
            });
            return Ok(state.commit_put(kind, key, marked, Some(old), &self.config));
        }
        let mut last = old;
        if kind == Kind::Namespace {
            for child_kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
                let children: Vec<(ObjectKey, Value)> = state
                    .objects
                    .get(&child_kind)
                    .map(|objects| {
                        objects
                            .iter()
                            .filter(|((ns, _), _)| ns == name)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                for (child_key, child) in children {
                    state.commit_delete(child_kind, child_key, child, &self.config);
                }
            }
            with_metadata(&mut last, |metadata| {
                metadata.insert(
                    "deletionTimestamp".into(),
                    json!(format_rfc3339(now_unix())),
                );
            });
            set_path(&mut last, &["status", "phase"], json!("Terminating"));
        }
        Ok(state.commit_delete(kind, key, last, &self.config))
    }

    /// Lists objects of `kind`, in `namespace` or in all namespaces.
    pub fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        options: &ListOptions,
    ) -> Result<ListResult, EmulatorError> {
        let state = self.lock();
        if let Some(token) = &options.continue_token
            && token.resource_version < state.oldest_valid
        {
            return Err(EmulatorError::Expired(
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter."
                    .into(),
            ));
        }
        let list_rv = options
            .continue_token
            .as_ref()
            .map_or(state.resource_version, |t| t.resource_version);
        let start = match &options.continue_token {
            Some(token) => Bound::Excluded((token.namespace.clone(), token.name.clone())),
            None => Bound::Unbounded,
        };
        let empty = BTreeMap::new();
        let matching = state
            .objects
            .get(&kind)
            .unwrap_or(&empty)
            .range((start, Bound::Unbounded))
            .filter(|((ns, _), object)| {
                namespace.is_none_or(|n| n == ns) && options.selects(object)
            });
        let filtered = options.label_selector.is_some() || options.field_selector.is_some();
        let page = paginate(
            matching,
            options.continue_token.as_ref(),
            options.limit,
            list_rv,
            !filtered,
        );
        let remaining_item_count =
            (page.continue_token.is_some() && !filtered).then_some(page.remaining);
        let page_items: Vec<Value> = page.items.into_iter().cloned().collect();
        Ok(ListResult {
            items: page_items,
            resource_version: list_rv,
            continue_token: page.continue_token.map(|t| t.encode()),
            remaining_item_count,
        })
    }

    /// Subscribes a new watch on `kind`.
    pub fn watch(&self, kind: Kind, from: &WatchFrom) -> Result<WatchStart, EmulatorError> {
        let state = self.lock();
        let receiver = state.events.subscribe();
        let closed = state.watches_closed.child_token();
        let current = |state: &State| -> Vec<Value> {
            state
                .objects
                .get(&kind)
                .map(|objects| objects.values().cloned().collect())
                .unwrap_or_default()
        };
        match from.resource_version {
            Some(rv) if !from.send_initial_events => {
                if rv < state.oldest_valid {
                    return Err(EmulatorError::Expired(format!(
                        "too old resource version: {rv} ({})",
                        state.oldest_valid
                    )));
                }
                let replay = state
                    .history
                    .iter()
                    .filter(|record| record.resource_version > rv)
                    .cloned()
                    .collect();
                Ok(WatchStart {
                    initial_objects: Vec::new(),
                    replay,
                    start_resource_version: rv.min(state.resource_version),
                    initial_events_end: false,
                    receiver,
                    closed,
                })
            }
            _ => Ok(WatchStart {
                initial_objects: current(&state),
                replay: Vec::new(),
                start_resource_version: state.resource_version,
                initial_events_end: from.send_initial_events,
                receiver,
                closed,
            }),
        }
    }

    /// Drops the watch history: watches and continue tokens from any resourceVersion issued
    /// before now get 410 Expired. Bumps the resourceVersion (the compaction is itself a
    /// revision), so a fresh list's resourceVersion can be watched from.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.resource_version += 1;
        state.history.clear();
        state.oldest_valid = state.resource_version;
    }

    /// Ends every open watch stream (clients reconnect from their last resourceVersion).
    pub fn close_watches(&self) {
        let mut state = self.lock();
        state.watches_closed.cancel();
        state.watches_closed = CancellationToken::new();
    }
}

impl State {
    fn record(&mut self, record: WatchRecord, config: &StoreConfig) {
        let record = Arc::new(record);
        self.history.push_back(Arc::clone(&record));
        while self.history.len() > config.history {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_valid = self.oldest_valid.max(dropped.resource_version);
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(record);
    }

    fn commit_put(
        &mut self,
        kind: Kind,
        key: ObjectKey,
        mut object: Value,
        previous: Option<Value>,
        config: &StoreConfig,
    ) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        with_metadata(&mut object, |m| {
            m.insert("resourceVersion".into(), json!(rv.to_string()))
        });
        self.objects
            .entry(kind)
            .or_default()
            .insert(key, object.clone());
        let event = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(
            WatchRecord {
                resource_version: rv,
                kind,
                event,
                object: object.clone(),
                previous,
            },
            config,
        );
        object
    }

    fn commit_delete(
        &mut self,
        kind: Kind,
        key: ObjectKey,
        mut object: Value,
        config: &StoreConfig,
    ) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        if let Some(objects) = self.objects.get_mut(&kind) {
            objects.remove(&key);
        }
        with_metadata(&mut object, |m| {
            m.insert("resourceVersion".into(), json!(rv.to_string()))
        });
        self.record(
            WatchRecord {
                resource_version: rv,
                kind,
                event: EventType::Deleted,
                object: object.clone(),
                previous: None,
            },
            config,
        );
        object
    }
}

/// Rejects an object whose `apiVersion`/`kind` name a different type.
fn check_type_meta(kind: Kind, object: &Value) -> Result<(), EmulatorError> {
    let api_version = object["apiVersion"].as_str().unwrap_or(kind.api_version());
    let object_kind = object["kind"].as_str().unwrap_or(kind.kind_name());
    if api_version != kind.api_version() || object_kind != kind.kind_name() {
        return Err(EmulatorError::BadRequest(format!(
            "the body is a {api_version} {object_kind}, not a {} {}",
            kind.api_version(),
            kind.kind_name()
        )));
    }
    Ok(())
}

/// The apiserver's defaults for a new object.
fn apply_defaults(kind: Kind, object: &mut Value) {
    match kind {
        Kind::Namespace => {
            if !object["spec"]["finalizers"].is_array() {
                set_path(object, &["spec", "finalizers"], json!(["kubernetes"]));
            }
            if !object["status"]["phase"].is_string() {
                set_path(object, &["status", "phase"], json!("Active"));
            }
        }
        Kind::Pod => {
            if !object["status"]["phase"].is_string() {
                set_path(object, &["status", "phase"], json!("Pending"));
            }
        }
        Kind::RoleBinding | Kind::ClusterRoleBinding => {
            // User and Group subjects belong to the RBAC group unless they say otherwise.
            if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
                for subject in subjects {
                    let person = matches!(subject["kind"].as_str(), Some("User" | "Group"));
                    if person && subject.get("apiGroup").is_none_or(Value::is_null) {
                        set_path(subject, &["apiGroup"], json!(super::resource::RBAC_GROUP));
                    }
                }
            }
        }
        Kind::Event
        | Kind::EventV1
        | Kind::Node
        | Kind::ServiceAccount
        | Kind::Role
        | Kind::ClusterRole
        | Kind::MutatingWebhookConfiguration => {}
    }
    apply_write_defaults(kind, object);
}

/// The label every namespace carries, naming it (set by the apiserver on every write).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The apiserver's defaults on every write, creations and updates alike: a namespace's
/// [`NAMESPACE_NAME_LABEL`], a webhook configuration's defaulted fields.
fn apply_write_defaults(kind: Kind, object: &mut Value) {
    match kind {
        Kind::Namespace => {
            let name = meta_str(object, "name").unwrap_or_default().to_string();
            with_metadata(object, |metadata| {
                let labels = metadata
                    .entry("labels")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !labels.is_object() {
                    *labels = Value::Object(Map::new());
                }
                labels[NAMESPACE_NAME_LABEL] = json!(name);
            });
        }
        Kind::MutatingWebhookConfiguration => admission::apply_defaults(object),
        _ => {}
    }
}

/// The apiserver's validation of the fields the emulator interprets: a webhook
/// configuration (see [`admission::validate_configuration`]); a binding's
/// `roleRef` must name a ClusterRole (or, in a RoleBinding, a Role) and, on update, stay
/// the same.
fn validate(kind: Kind, object: &Value, old: Option<&Value>) -> Result<(), EmulatorError> {
    if kind == Kind::MutatingWebhookConfiguration {
        return admission::validate_configuration(object).map_err(|message| {
            EmulatorError::Invalid {
                kind: kind.kind_name(),
                name: meta_str(object, "name").unwrap_or_default().to_string(),
                message,
            }
        });
    }
    if !matches!(kind, Kind::RoleBinding | Kind::ClusterRoleBinding) {
        return Ok(());
    }
    let invalid = |message: String| EmulatorError::Invalid {
        kind: kind.kind_name(),
        name: meta_str(object, "name").unwrap_or_default().to_string(),
        message,
    };
    let role_ref = &object["roleRef"];
    let role_kind = role_ref["kind"].as_str().unwrap_or_default();
    let allowed = match kind {
        Kind::RoleBinding => &["Role", "ClusterRole"][..],
        _ => &["ClusterRole"][..],
    };
    if !allowed.contains(&role_kind) {
        return Err(invalid(format!(
            "roleRef.kind: Unsupported value: {role_kind:?}: supported values: {allowed:?}"
        )));
    }
    if role_ref["name"].as_str().unwrap_or_default().is_empty() {
        return Err(invalid("roleRef.name: Required value".into()));
    }
    if let Some(old) = old
        && old["roleRef"] != *role_ref
    {
        return Err(invalid(
            "roleRef: Invalid value: the role a binding refers to cannot be changed".into(),
        ));
    }
    Ok(())
}

/// Turns a proposed update into the object to store, enforcing what an update may change.
fn reconcile_update(
    kind: Kind,
    old: &Value,
    mut new: Value,
    scope: UpdateScope,
) -> Result<Value, EmulatorError> {
    if !new.is_object() {
        return Err(EmulatorError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    check_type_meta(kind, &new)?;
    set_path(&mut new, &["apiVersion"], json!(kind.api_version()));
    set_path(&mut new, &["kind"], json!(kind.kind_name()));
    let name = meta_str(old, "name").unwrap_or_default().to_string();
    let conflict = |reason: String| EmulatorError::Conflict {
        resource: kind.plural(),
        name: name.clone(),
        reason,
    };
    match meta_str(&new, "name") {
        Some(new_name) if new_name != name => {
            return Err(EmulatorError::BadRequest(format!(
                "the name of the object ({new_name}) does not match the name on the URL ({name})"
            )));
        }
        _ => {}
    }
    let old_namespace = meta_str(old, "namespace").map(str::to_string);
    match meta_str(&new, "namespace") {
        Some(ns) if kind.namespaced() && Some(ns) != old_namespace.as_deref() => {
            return Err(EmulatorError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on \
                 the request"
                    .into(),
            ));
        }
        _ => {}
    }
    let old_uid = meta_str(old, "uid").unwrap_or_default().to_string();
    if let Some(uid) = meta_str(&new, "uid")
        && uid != old_uid
    {
        return Err(conflict(format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
        )));
    }
    let old_rv = meta_str(old, "resourceVersion").unwrap_or_default();
    if let Some(rv) = meta_str(&new, "resourceVersion")
        && rv != old_rv
    {
        return Err(conflict(
            "the object has been modified; please apply your changes to the latest version \
             and try again"
                .into(),
        ));
    }
    let mut result = match scope {
        UpdateScope::Status => {
            let mut result = old.clone();
            match new.get("status") {
                Some(status) => set_path(&mut result, &["status"], status.clone()),
                None => {
                    if let Some(map) = result.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            result
        }
        UpdateScope::Main => {
            if let Some(map) = new.as_object_mut() {
                match old.get("status") {
                    Some(status) => {
                        map.insert("status".into(), status.clone());
                    }
                    None => {
                        map.remove("status");
                    }
                }
            }
            new
        }
        UpdateScope::Everything => new,
    };
    with_metadata(&mut result, |metadata| {
        metadata.insert("name".into(), json!(name));
        match old_namespace {
            Some(ns) => metadata.insert("namespace".into(), json!(ns)),
            None => metadata.remove("namespace"),
        };
        metadata.insert("uid".into(), json!(old_uid));
        metadata.insert("resourceVersion".into(), json!(old_rv));
        for field in [
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(field) {
                Some(value) => metadata.insert(field.into(), value.clone()),
                None => metadata.remove(field),
            };
        }
    });
    apply_write_defaults(kind, &mut result);
    normalize(&mut result);
    validate(kind, &result, Some(old))?;
    Ok(result)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store(history: usize) -> Store {
        let store = Store::new(StoreConfig {
            history,
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
    }

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {}})
    }

    #[test]
    fn create_sets_server_fields_and_rejects_duplicates() {
        let store = store(100);
        let created = store
            .create(Kind::Pod, Some("a"), pod("web"), false)
            .unwrap();
        assert_eq!(created["metadata"]["namespace"], "a");
        assert_eq!(created["metadata"]["resourceVersion"], "2");
        assert_eq!(created["kind"], "Pod");
        assert_eq!(created["status"]["phase"], "Pending");
        assert_eq!(created["metadata"]["uid"].as_str().map(str::len), Some(36));
        let again = store.create(Kind::Pod, Some("a"), pod("web"), false);
        assert!(matches!(again, Err(EmulatorError::AlreadyExists { .. })));
        let missing_ns = store.create(Kind::Pod, Some("nope"), pod("web"), false);
        assert!(matches!(
            missing_ns,
            Err(EmulatorError::NotFound {
                resource: "namespaces",
                ..
            })
        ));
        let generated = store
            .create(
                Kind::Pod,
                Some("a"),
                json!({"metadata": {"generateName": "w-"}}),
                false,
            )
            .unwrap();
        let name = generated["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("w-") && name.len() == 7, "{name}");
    }

    #[test]
    fn updates_guard_identity_and_resource_version() {
        let store = store(100);
        let created = store
            .create(Kind::Pod, Some("a"), pod("web"), false)
            .unwrap();
        type Check = fn(&Result<Value, EmulatorError>) -> bool;
        let cases: [(&str, Value, Check); 4] = [
            ("rename", json!({"metadata": {"name": "other"}}), |r| {
                matches!(r, Err(EmulatorError::BadRequest(_)))
            }),
            (
                "stale rv",
                json!({"metadata": {"name": "web", "resourceVersion": "1"}}),
                |r| matches!(r, Err(EmulatorError::Conflict { .. })),
            ),
            ("other uid", json!({"metadata": {"uid": "x"}}), |r| {
                matches!(r, Err(EmulatorError::Conflict { .. }))
            }),
            ("label", json!({"metadata": {"labels": {"x": "y"}}}), |r| {
                r.as_ref()
                    .is_ok_and(|o| o["metadata"]["labels"]["x"] == "y")
            }),
        ];
        for (name, body, check) in cases {
            let result = store.update_with(
                Kind::Pod,
                Some("a"),
                "web",
                UpdateScope::Main,
                false,
                |_| Ok(body.clone()),
            );
            assert!(check(&result), "{name}: {result:?}");
        }
        let updated = store.get(Kind::Pod, Some("a"), "web").unwrap();
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
        assert_eq!(
            updated["status"], created["status"],
            "main resource keeps status"
        );
        let unchanged = store
            .update_with(Kind::Pod, Some("a"), "web", UpdateScope::Main, false, |o| {
                Ok(o.clone())
            })
            .unwrap();
        assert_eq!(
            unchanged["metadata"]["resourceVersion"],
            updated["metadata"]["resourceVersion"]
        );
    }

    #[test]
    fn history_trimming_and_compaction_expire_old_versions() {
        let store = store(2);
        for name in ["p1", "p2", "p3"] {
            store
                .create(Kind::Pod, Some("a"), pod(name), false)
                .unwrap();
        }
        // rv 1 = namespace, 2..4 = pods; history keeps rv 3 and 4.
        assert!(matches!(
            store.watch(
                Kind::Pod,
                &WatchFrom {
                    resource_version: Some(1),
                    ..Default::default()
                }
            ),
            Err(EmulatorError::Expired(_))
        ));
        let resumed = store
            .watch(
                Kind::Pod,
                &WatchFrom {
                    resource_version: Some(2),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(resumed.replay.len(), 2);
        store.compact();
        let current = store.resource_version();
        assert!(
            store
                .watch(
                    Kind::Pod,
                    &WatchFrom {
                        resource_version: Some(current - 1),
                        ..Default::default()
                    }
                )
                .is_err()
        );
        assert!(
            store
                .watch(
                    Kind::Pod,
                    &WatchFrom {
                        resource_version: Some(current),
                        ..Default::default()
                    }
                )
                .is_ok()
        );
    }

    #[test]
    fn bindings_need_a_role_ref_that_never_changes() {
        let store = store(100);
        let binding = |kind: &str, name: &str| {
            json!({"metadata": {"name": "b"}, "roleRef": {"kind": kind, "name": name},
                   "subjects": [{"kind": "User", "name": "alice"}]})
        };
        type Check = fn(&Result<Value, EmulatorError>) -> bool;
        let invalid: Check = |r| matches!(r, Err(EmulatorError::Invalid { .. }));
        let cases: [(Kind, Value, Check); 4] = [
            (Kind::ClusterRoleBinding, binding("Role", "r"), invalid),
            (Kind::RoleBinding, binding("Pod", "r"), invalid),
            (Kind::RoleBinding, binding("Role", ""), invalid),
            (Kind::RoleBinding, binding("ClusterRole", "view"), |r| {
                r.as_ref()
                    .is_ok_and(|b| b["subjects"][0]["apiGroup"] == "rbac.authorization.k8s.io")
            }),
        ];
        for (kind, object, check) in cases {
            let result = store.create(kind, Some("a"), object.clone(), false);
            assert!(check(&result), "{kind:?} {object}: {result:?}");
        }
        let changed = store.update_with(
            Kind::RoleBinding,
            Some("a"),
            "b",
            UpdateScope::Main,
            false,
            |old| {
                let mut new = old.clone();
                new["roleRef"]["name"] = json!("edit");
                Ok(new)
            },
        );
        assert!(invalid(&changed), "{changed:?}");
    }

    #[test]
    fn deleting_a_namespace_deletes_its_pods() {
        let store = store(100);
        store
            .create(Kind::Pod, Some("a"), pod("web"), false)
            .unwrap();
        let deleted = store
            .delete(Kind::Namespace, None, "a", &DeleteOptions::default())
            .unwrap();
        assert_eq!(deleted["status"]["phase"], "Terminating");
        assert!(
            store
                .list(Kind::Pod, None, &ListOptions::default())
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn namespaces_are_labelled_with_their_name_on_every_write() {
        let store = store(100);
        let name_label = |store: &Store| {
            store.get(Kind::Namespace, None, "a").unwrap()["metadata"]["labels"]
                [NAMESPACE_NAME_LABEL]
                .clone()
        };
        assert_eq!(name_label(&store), "a");
        store
            .update_with(
                Kind::Namespace,
                None,
                "a",
                UpdateScope::Main,
                false,
                |old| {
                    let mut new = old.clone();
                    new["metadata"]["labels"] = json!({"team": "a"});
                    Ok(new)
                },
            )
            .unwrap();
        assert_eq!(name_label(&store), "a");
        let labels = &store.get(Kind::Namespace, None, "a").unwrap()["metadata"]["labels"];
        assert_eq!(labels["team"], "a");
    }

    #[test]
    fn webhook_configurations_are_defaulted_and_validated() {
        let store = store(100);
        let configuration = |side_effects: &str| {
            json!({"metadata": {"name": "inject"}, "webhooks": [{
                "name": "inject.podiam.test", "sideEffects": side_effects,
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": "https://localhost:8443/mutate"},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""],
                           "apiVersions": ["v1"], "resources": ["pods"]}]}]})
        };
        let kind = Kind::MutatingWebhookConfiguration;
        let refused = store.create(kind, None, configuration("Some"), false);
        assert!(
            matches!(&refused, Err(EmulatorError::Invalid { message, .. })
                     if message.starts_with("webhooks[0].sideEffects: Unsupported value")),
            "{refused:?}"
        );
        let created = store
            .create(kind, None, configuration("None"), false)
            .unwrap();
        assert_eq!(created["apiVersion"], "admissionregistration.k8s.io/v1");
        assert!(created["metadata"].get("namespace").is_none());
        assert_eq!(created["webhooks"][0]["failurePolicy"], "Fail");
        assert_eq!(created["webhooks"][0]["timeoutSeconds"], 10);
        assert_eq!(created["webhooks"][0]["rules"][0]["scope"], "*");
    }
}
