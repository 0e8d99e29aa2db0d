//! The resource types the emulator serves and the discovery documents that describe them.
//!
//! Everything here is static data: which kinds are stored, their plural names,
//! group/version, whether they are namespaced; which create-only review resources exist
//! ([`Review`]); and the `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}` and
//! `/apis/{group}/v1` documents built from those tables.
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
    /// core/v1 `Node` (cluster-scoped, `nodes`): registered by the test, as a kubelet would,
    /// with the taints it starts with.
    Node,
    /// core/v1 `Event` (namespaced, `events`).
    Event,
    /// events.k8s.io/v1 `Event` (namespaced, `events` in group `events.k8s.io`), the API that
    /// kube-rs' `kube::runtime::events::Recorder` writes. Stored separately from core/v1 events
    /// (the real apiserver converts between the two; the emulator does not).
    EventV1,
    /// core/v1 `ServiceAccount` (namespaced, `serviceaccounts`), with the `token`
    /// subresource (TokenRequest).
    ServiceAccount,
    /// rbac.authorization.k8s.io/v1 `Role` (namespaced, `roles`).
    Role,
    /// rbac.authorization.k8s.io/v1 `RoleBinding` (namespaced, `rolebindings`).
    RoleBinding,
    /// rbac.authorization.k8s.io/v1 `ClusterRole` (cluster-scoped, `clusterroles`).
    ClusterRole,
    /// rbac.authorization.k8s.io/v1 `ClusterRoleBinding` (cluster-scoped,
    /// `clusterrolebindings`).
    ClusterRoleBinding,
    /// admissionregistration.k8s.io/v1 `MutatingWebhookConfiguration` (cluster-scoped,
    /// `mutatingwebhookconfigurations`): the webhooks pod creations over HTTP are sent to
    /// (see [`super::webhook`]).
    MutatingWebhookConfiguration,
}

/// The API group `events.k8s.io`.
pub const EVENTS_GROUP: &str = "events.k8s.io";
/// The API group `rbac.authorization.k8s.io`.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// The API group `authentication.k8s.io` (TokenReview, TokenRequest, SelfSubjectReview).
pub const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";
/// The API group `authorization.k8s.io` (SubjectAccessReview, SelfSubjectAccessReview).
pub const AUTHORIZATION_GROUP: &str = "authorization.k8s.io";
/// The API group `admissionregistration.k8s.io` (MutatingWebhookConfiguration).
pub const ADMISSION_REGISTRATION_GROUP: &str = "admissionregistration.k8s.io";

/// The named groups (everything but core), in discovery order. Each serves only `v1`.
pub const NAMED_GROUPS: [&str; 5] = [
    EVENTS_GROUP,
    RBAC_GROUP,
    AUTHENTICATION_GROUP,
    AUTHORIZATION_GROUP,
    ADMISSION_REGISTRATION_GROUP,
];

/// The groups with stored kinds (and so with OpenAPI documents), core ("") first.
pub const STORED_GROUPS: [&str; 4] = ["", EVENTS_GROUP, RBAC_GROUP, ADMISSION_REGISTRATION_GROUP];

/// The `&'static` spelling of a named group, if the emulator serves it.
pub fn named_group(group: &str) -> Option<&'static str> {
    NAMED_GROUPS.into_iter().find(|g| *g == group)
}

/// The `apiVersion` of objects in `group` (which serves only `v1`).
pub fn group_version(group: &str) -> String {
    if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    }
}

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Kind; 11] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::Node,
        Kind::Event,
        Kind::EventV1,
        Kind::ServiceAccount,
        Kind::Role,
        Kind::RoleBinding,
        Kind::ClusterRole,
        Kind::ClusterRoleBinding,
        Kind::MutatingWebhookConfiguration,
    ];

    /// The `kind` field of an object of this type.
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Event | Kind::EventV1 => "Event",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Role => "Role",
            Kind::RoleBinding => "RoleBinding",
            Kind::ClusterRole => "ClusterRole",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
            Kind::MutatingWebhookConfiguration => "MutatingWebhookConfiguration",
        }
    }

    /// The resource's plural name as it appears in URLs and error messages.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Event | Kind::EventV1 => "events",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Role => "roles",
            Kind::RoleBinding => "rolebindings",
            Kind::ClusterRole => "clusterroles",
            Kind::ClusterRoleBinding => "clusterrolebindings",
            Kind::MutatingWebhookConfiguration => "mutatingwebhookconfigurations",
        }
    }

    /// The singular name (used in discovery).
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::Node => "node",
            Kind::Event | Kind::EventV1 => "event",
            Kind::ServiceAccount => "serviceaccount",
            Kind::Role => "role",
            Kind::RoleBinding => "rolebinding",
            Kind::ClusterRole => "clusterrole",
            Kind::ClusterRoleBinding => "clusterrolebinding",
            Kind::MutatingWebhookConfiguration => "mutatingwebhookconfiguration",
        }
    }

    /// The API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EventV1 => EVENTS_GROUP,
            Kind::Role | Kind::RoleBinding | Kind::ClusterRole | Kind::ClusterRoleBinding => {
                RBAC_GROUP
            }
            Kind::MutatingWebhookConfiguration => ADMISSION_REGISTRATION_GROUP,
            Kind::Pod | Kind::Namespace | Kind::Node | Kind::Event | Kind::ServiceAccount => "",
        }
    }

    /// The `apiVersion` field of an object of this type.
    pub fn api_version(self) -> &'static str {
        match self.group() {
            EVENTS_GROUP => "events.k8s.io/v1",
            RBAC_GROUP => "rbac.authorization.k8s.io/v1",
            ADMISSION_REGISTRATION_GROUP => "admissionregistration.k8s.io/v1",
            _ => "v1",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Namespace
                | Kind::Node
                | Kind::ClusterRole
                | Kind::ClusterRoleBinding
                | Kind::MutatingWebhookConfiguration
        )
    }

    /// Short names accepted by kubectl.
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["po"],
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
            Kind::Event => &["ev"],
            Kind::ServiceAccount => &["sa"],
            Kind::EventV1
            | Kind::Role
            | Kind::RoleBinding
            | Kind::ClusterRole
            | Kind::ClusterRoleBinding
            | Kind::MutatingWebhookConfiguration => &[],
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

/// A create-only, cluster-scoped resource that stores nothing: the answer is computed from
/// the request (the review APIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Review {
    /// authentication.k8s.io/v1 `TokenReview` (`tokenreviews`).
    TokenReview,
    /// authentication.k8s.io/v1 `SelfSubjectReview` (`selfsubjectreviews`, what
    /// `kubectl auth whoami` asks).
    SelfSubjectReview,
    /// authorization.k8s.io/v1 `SubjectAccessReview` (`subjectaccessreviews`).
    SubjectAccessReview,
    /// authorization.k8s.io/v1 `SelfSubjectAccessReview` (`selfsubjectaccessreviews`, what
    /// `kubectl auth can-i` asks).
    SelfSubjectAccessReview,
}

impl Review {
    /// Every review resource, in discovery order.
    pub const ALL: [Review; 4] = [
        Review::TokenReview,
        Review::SelfSubjectReview,
        Review::SubjectAccessReview,
        Review::SelfSubjectAccessReview,
    ];

    /// The `kind` of the request and response objects.
    pub fn kind_name(self) -> &'static str {
        match self {
            Review::TokenReview => "TokenReview",
            Review::SelfSubjectReview => "SelfSubjectReview",
            Review::SubjectAccessReview => "SubjectAccessReview",
            Review::SelfSubjectAccessReview => "SelfSubjectAccessReview",
        }
    }

    /// The resource's plural name.
    pub fn plural(self) -> &'static str {
        match self {
            Review::TokenReview => "tokenreviews",
            Review::SelfSubjectReview => "selfsubjectreviews",
            Review::SubjectAccessReview => "subjectaccessreviews",
            Review::SelfSubjectAccessReview => "selfsubjectaccessreviews",
        }
    }

    /// The API group.
    pub fn group(self) -> &'static str {
        match self {
            Review::TokenReview | Review::SelfSubjectReview => AUTHENTICATION_GROUP,
            Review::SubjectAccessReview | Review::SelfSubjectAccessReview => AUTHORIZATION_GROUP,
        }
    }

    /// The `apiVersion` of the request and response objects.
    pub fn api_version(self) -> String {
        group_version(self.group())
    }

    /// The review resource named `plural` in `group`.
    pub fn from_plural(group: &str, plural: &str) -> Option<Review> {
        Review::ALL
            .into_iter()
            .find(|r| r.group() == group && r.plural() == plural)
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

/// `/apis`: the named groups.
pub fn api_group_list_document() -> Value {
    let groups: Vec<Value> = NAMED_GROUPS.into_iter().map(group_entry).collect();
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups,
    })
}

fn group_entry(group: &str) -> Value {
    let version = json!({"groupVersion": group_version(group), "version": "v1"});
    json!({
        "name": group,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// `/apis/{group}`: one named group.
pub fn api_group_document(group: &str) -> Value {
    let mut document = group_entry(group);
    document["kind"] = json!("APIGroup");
    document["apiVersion"] = json!("v1");
    document
}

/// The verbs every stored resource supports.
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/api/v1` (group "") or `/apis/{group}/v1`: the resources of one group-version.
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
        if kind == Kind::ServiceAccount {
            // A subresource in another group's type: TokenRequest lives in
            // authentication.k8s.io, so the entry names its group and version.
            resources.push(json!({
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": true,
                "group": AUTHENTICATION_GROUP,
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
    }
    for review in Review::ALL.into_iter().filter(|r| r.group() == group) {
        resources.push(json!({
            "name": review.plural(),
            "singularName": review.kind_name().to_ascii_lowercase(),
            "namespaced": false,
            "kind": review.kind_name(),
            "verbs": ["create"],
        }));
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(group),
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

/// `/openapi/v3`: the index of per-group-version documents (groups with stored kinds).
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    for group in STORED_GROUPS {
        let key = openapi_v3_key(group);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=podiam-emulator")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/{group}/v1`: a minimal OpenAPI document.
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
        for review in Review::ALL {
            assert_eq!(
                Review::from_plural(review.group(), review.plural()),
                Some(review)
            );
        }
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
                "nodes",
                "events",
                "serviceaccounts",
                "serviceaccounts/token",
            ]
        );
        assert_eq!(doc["resources"][0]["shortNames"], json!(["po"]));
        assert_eq!(doc["resources"][2]["namespaced"], json!(false));
    }

    #[test]
    fn named_groups_list_rbac_kinds_and_reviews() {
        let names = |group: &str| -> Vec<String> {
            api_resource_list_document(group)["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect()
        };
        let cases = [
            (
                RBAC_GROUP,
                vec![
                    "roles",
                    "rolebindings",
                    "clusterroles",
                    "clusterrolebindings",
                ],
            ),
            (
                AUTHENTICATION_GROUP,
                vec!["tokenreviews", "selfsubjectreviews"],
            ),
            (
                AUTHORIZATION_GROUP,
                vec!["subjectaccessreviews", "selfsubjectaccessreviews"],
            ),
            (EVENTS_GROUP, vec!["events"]),
            (
                ADMISSION_REGISTRATION_GROUP,
                vec!["mutatingwebhookconfigurations"],
            ),
        ];
        for (group, want) in cases {
            assert_eq!(names(group), want, "{group}");
            assert_eq!(
                api_resource_list_document(group)["groupVersion"],
                format!("{group}/v1")
            );
        }
        let groups = api_group_list_document();
        assert_eq!(groups["groups"].as_array().map(Vec::len), Some(5));
        assert_eq!(api_group_document(RBAC_GROUP)["name"], RBAC_GROUP);
        let openapi = openapi_v3_document(RBAC_GROUP);
        assert!(
            openapi["paths"]
                ["/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/{name}"]
                ["patch"]
                .is_object()
        );
    }
}
