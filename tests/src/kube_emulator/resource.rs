//! The resource types the emulator serves and the discovery documents that describe them.
//!
//! Everything here is static data: which kinds exist, their plural names, group/version,
//! whether they are namespaced, and the `/version`, `/api`, `/api/v1`, `/apis` and
//! `/apis/events.k8s.io/v1` documents built from that table.
//!
//! Discovery is served in the legacy (non-aggregated) form with `Content-Type:
//! application/json`. kubectl 1.32 asks for aggregated discovery
//! (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,…,application/json`)
//! but lists plain `application/json` last; client-go looks at the response Content-Type and,
//! when it is not the aggregated type, falls back to `/api` + `/apis` + one request per
//! group-version. That is all kubectl needs.

use serde_json::{Value, json};

/// A kind of object the emulator stores. Each variant is one REST resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 `Pod` (namespaced, `pods`).
    Pod,
    /// core/v1 `Namespace` (cluster-scoped, `namespaces`).
    Namespace,
    /// core/v1 `Event` (namespaced, `events`).
    Event,
    /// events.k8s.io/v1 `Event` (namespaced, `events` in group `events.k8s.io`), the API that
    /// kube-rs' `kube::runtime::events::Recorder` writes. Stored separately from core/v1 events
    /// (the real apiserver converts between the two; the emulator does not).
    EventV1,
}

/// The API group `events.k8s.io`.
pub const EVENTS_GROUP: &str = "events.k8s.io";

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Kind; 4] = [Kind::Pod, Kind::Namespace, Kind::Event, Kind::EventV1];

    /// The `kind` field of an object of this type.
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Event | Kind::EventV1 => "Event",
        }
    }

    /// The resource's plural name as it appears in URLs and error messages.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Event | Kind::EventV1 => "events",
        }
    }

    /// The singular name (used in discovery).
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::Event | Kind::EventV1 => "event",
        }
    }

    /// The API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EventV1 => EVENTS_GROUP,
            _ => "",
        }
    }

    /// The `apiVersion` field of an object of this type.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EventV1 => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace)
    }

    /// Short names accepted by kubectl.
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["po"],
            Kind::Namespace => &["ns"],
            Kind::Event => &["ev"],
            Kind::EventV1 => &[],
        }
    }

    /// The `kind` of a list of these objects (`PodList`, …).
    pub fn list_kind(self) -> String {
        format!("{}List", self.kind_name())
    }

    /// Whether the resource has a `status` subresource.
    pub fn has_status(self) -> bool {
        matches!(self, Kind::Pod | Kind::Namespace)
    }

    /// The kind named by an object's `apiVersion` and `kind` fields.
    pub fn from_type_meta(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind_name() == kind)
    }

    /// The resource named `plural` in API group `group`.
    pub fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }
}

/// `/version`: a v1.33 server, within kubectl 1.32's supported skew.
pub fn version_document() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-podiam-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: the legacy core group's versions.
pub fn api_versions_document(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    })
}

/// `/apis`: the named groups (only `events.k8s.io`).
pub fn api_group_list_document() -> Value {
    let version = json!({"groupVersion": "events.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [{
            "name": EVENTS_GROUP,
            "versions": [version.clone()],
            "preferredVersion": version,
        }],
    })
}

/// `/apis/events.k8s.io`: one group.
pub fn api_group_document() -> Value {
    let version = json!({"groupVersion": "events.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": EVENTS_GROUP,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// The verbs every emulated resource supports.
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/api/v1` (group "") or `/apis/events.k8s.io/v1`: the resources of one group-version.
pub fn api_resource_list_document(group: &str) -> Value {
    let mut resources = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let mut entry = json!({
            "name": kind.plural(),
            "singularName": kind.singular(),
            "namespaced": kind.namespaced(),
            "kind": kind.kind_name(),
            "verbs": VERBS,
            "storageVersionHash": "",
        });
        if !kind.short_names().is_empty() {
            entry["shortNames"] = json!(kind.short_names());
        }
        if kind == Kind::Pod {
            entry["categories"] = json!(["all"]);
        }
        resources.push(entry);
        if kind.has_status() {
            resources.push(json!({
                "name": format!("{}/status", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "kind": kind.kind_name(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

/// The OpenAPI v3 path key of a group-version (`api/v1`, `apis/events.k8s.io/v1`).
pub fn openapi_v3_key(group: &str) -> String {
    if group.is_empty() {
        "api/v1".to_string()
    } else {
        format!("apis/{group}/v1")
    }
}

/// `/openapi/v3`: the index of per-group-version documents.
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    for group in ["", EVENTS_GROUP] {
        let key = openapi_v3_key(group);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=podiam-emulator")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` and `/openapi/v3/apis/events.k8s.io/v1`: a minimal OpenAPI document.
///
/// It carries no schemas, only one operation per verb kubectl inspects: `kubectl create -f`
/// and `apply` look for a PATCH operation tagged with the kind's
/// `x-kubernetes-group-version-kind` that accepts the `fieldValidation` query parameter, and
/// then leave validation to the server (which the emulator accepts and ignores) instead of
/// failing with "failed to download openapi".
pub fn openapi_v3_document(group: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let gvk = json!({"group": group, "version": "v1", "kind": kind.kind_name()});
        let parameters = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
        ]);
        let operation = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", kind.kind_name()),
                "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let prefix = format!("/{}", openapi_v3_key(group));
        let (collection, item) = if kind.namespaced() {
            (
                format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural()),
                format!(
                    "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
                    kind.plural()
                ),
            )
        } else {
            (
                format!("{prefix}/{}", kind.plural()),
                format!("{prefix}/{}/{{name}}", kind.plural()),
            )
        };
        paths.insert(collection, json!({"post": operation("post")}));
        paths.insert(
            item,
            json!({"patch": operation("patch"), "put": operation("put")}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (podiam emulator)", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_type_meta_and_plural() {
        for kind in Kind::ALL {
            assert_eq!(
                Kind::from_type_meta(kind.api_version(), kind.kind_name()),
                Some(kind)
            );
            assert_eq!(Kind::from_plural(kind.group(), kind.plural()), Some(kind));
        }
        assert_eq!(Kind::from_plural("", "deployments"), None);
    }

    #[test]
    fn core_discovery_lists_pods_namespaces_events_and_status() {
        let doc = api_resource_list_document("");
        let names: Vec<&str> = doc["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "pods",
                "pods/status",
                "namespaces",
                "namespaces/status",
                "events"
            ]
        );
        assert_eq!(doc["resources"][0]["shortNames"], json!(["po"]));
        assert_eq!(doc["resources"][2]["namespaced"], json!(false));
    }
}
