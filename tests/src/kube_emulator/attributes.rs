//! Authorization attributes: who is asking ([`UserInfo`]) and what for ([`Attributes`]),
//! derived from a request the way the apiserver derives them, as pure functions.
//!
//! [`request_attributes`] reads any path, served or not, because the apiserver authorises a
//! request before it routes it: a token user without RBAC gets 403 for
//! `/api/v1/services` even though the emulator would answer 404. Paths under `/api/v1/…`
//! and `/apis/{group}/{version}/…` that name a resource are resource requests; everything
//! else (`/version`, `/api`, `/apis/rbac.authorization.k8s.io/v1`, `/openapi/v3`, …) is a
//! non-resource request whose verb is the lower-cased HTTP method.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};

use super::route::Query;

/// The group every authenticated user is in.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// The group whose members may do anything (the apiserver's privileged group; no RBAC
/// rule is consulted for them).
pub const MASTERS_GROUP: &str = "system:masters";
/// The group every service account is in.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// The user requests without credentials act as (the emulator is a cluster admin's view
/// unless a test presents a token).
pub const ADMIN_USER: &str = "system:admin";

/// The identity of a requester: what an authenticator found and what a
/// SubjectAccessReview's spec names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    /// `system:serviceaccount:NS:NAME`, or a static token's user name.
    pub username: String,
    /// The service account's uid ("" for static users).
    pub uid: String,
    /// Group names.
    pub groups: Vec<String>,
    /// Extra attributes (`authentication.kubernetes.io/pod-name`, …).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// `system:serviceaccount:NS:NAME`
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

impl UserInfo {
    /// The identity of a request without credentials: `system:admin` in `system:masters`.
    pub fn admin() -> UserInfo {
        UserInfo {
            username: ADMIN_USER.to_string(),
            uid: String::new(),
            groups: vec![MASTERS_GROUP.to_string(), AUTHENTICATED_GROUP.to_string()],
            extra: BTreeMap::new(),
        }
    }

    /// Whether the user is in `system:masters`.
    pub fn is_privileged(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS_GROUP)
    }

    /// The `authentication.k8s.io/v1` `UserInfo` JSON form (empty fields omitted).
    pub fn to_json(&self) -> Value {
        let mut user = Map::new();
        user.insert("username".into(), json!(self.username));
        if !self.uid.is_empty() {
            user.insert("uid".into(), json!(self.uid));
        }
        if !self.groups.is_empty() {
            user.insert("groups".into(), json!(self.groups));
        }
        if !self.extra.is_empty() {
            user.insert("extra".into(), json!(self.extra));
        }
        Value::Object(user)
    }

    /// The identity a SubjectAccessReview spec names (`user`, `groups`, `uid`, `extra`), used
    /// as given: nothing (not even `system:authenticated`) is added.
    pub fn from_review_spec(spec: &Value) -> UserInfo {
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        };
        UserInfo {
            username: spec["user"].as_str().unwrap_or_default().to_string(),
            uid: spec["uid"].as_str().unwrap_or_default().to_string(),
            groups: strings(&spec["groups"]),
            extra: spec["extra"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(key, values)| (key.clone(), strings(values)))
                .collect(),
        }
    }
}

/// What a request would do to a resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceAttributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`, …
    pub verb: String,
    /// The API group ("" for core).
    pub group: String,
    /// The resource's plural name.
    pub resource: String,
    /// The subresource ("" for none), e.g. `status`, `token`.
    pub subresource: String,
    /// The namespace ("" for cluster scope, or all namespaces).
    pub namespace: String,
    /// The object's name ("" for collections and creates).
    pub name: String,
}

/// What a request asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    /// Something done to a resource.
    Resource(ResourceAttributes),
    /// A request for a path that names no resource (`/version`, `/api`, `/healthz`).
    NonResource {
        /// The lower-cased HTTP method (`get`, `post`, …).
        verb: String,
        /// The URL path.
        path: String,
    },
}

impl Attributes {
    /// The attributes a SubjectAccessReview or SelfSubjectAccessReview spec asks about:
    /// exactly one of `resourceAttributes` and `nonResourceAttributes`.
    pub fn from_review_spec(spec: &Value) -> Result<Attributes, String> {
        let text =
            |value: &Value, field: &str| value[field].as_str().unwrap_or_default().to_string();
        let resource = spec["resourceAttributes"]
            .as_object()
            .map(|_| &spec["resourceAttributes"]);
        let non_resource = spec["nonResourceAttributes"]
            .as_object()
            .map(|_| &spec["nonResourceAttributes"]);
        match (resource, non_resource) {
            (Some(r), None) => Ok(Attributes::Resource(ResourceAttributes {
                verb: text(r, "verb"),
                group: text(r, "group"),
                resource: text(r, "resource"),
                subresource: text(r, "subresource"),
                namespace: text(r, "namespace"),
                name: text(r, "name"),
            })),
            (None, Some(n)) => Ok(Attributes::NonResource {
                verb: text(n, "verb"),
                path: text(n, "path"),
            }),
            _ => Err(
                "spec: exactly one of resourceAttributes and nonResourceAttributes must \
                      be set"
                    .to_string(),
            ),
        }
    }
}

/// The attributes of an HTTP request (`path` as received, percent-encoded).
pub fn request_attributes(method: &str, path: &str, query: &Query) -> Attributes {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let non_resource = || Attributes::NonResource {
        verb: method.to_ascii_lowercase(),
        path: path.to_string(),
    };
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return non_resource(),
    };
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    // `namespaces/{ns}/{resource}/…` is scoped to `ns`; `namespaces/{name}[/{sub}]` is the
    // namespace object itself, which the apiserver also treats as scoped to that namespace
    // (so a RoleBinding there can grant `get` on it).
    let (namespace, rest) = match rest {
        ["namespaces", ns, resource, tail @ ..] if !matches!(*resource, "status" | "finalize") => {
            (*ns, {
                let mut parts = vec![*resource];
                parts.extend_from_slice(tail);
                parts
            })
        }
        ["namespaces", ns, tail @ ..] => (*ns, {
            let mut parts = vec!["namespaces", *ns];
            parts.extend_from_slice(tail);
            parts
        }),
        rest => ("", rest.to_vec()),
    };
    let (resource, mut name, subresource) = match rest.as_slice() {
        [] => return non_resource(),
        [resource] => (*resource, "", ""),
        [resource, name] => (*resource, *name, ""),
        [resource, name, subresource, ..] => (*resource, *name, *subresource),
    };
    let watch = watch_path || query.flag("watch");
    let verb = match method.to_ascii_uppercase().as_str() {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if name.is_empty() => "list",
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if name.is_empty() => "deletecollection",
        "DELETE" => "delete",
        _ => return non_resource(),
    };
    // A list or watch narrowed to one object by `metadata.name` is authorised as a request
    // for that object, so `resourceNames` rules can allow single-object watches.
    let by_name = query.non_empty("fieldSelector").and_then(single_name);
    if name.is_empty()
        && matches!(verb, "list" | "watch")
        && let Some(selected) = by_name.as_deref()
    {
        name = selected;
    }
    Attributes::Resource(ResourceAttributes {
        verb: verb.to_string(),
        group: group.to_string(),
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// The name in a field selector that is exactly `metadata.name=X` (or `==`).
fn single_name(selector: &str) -> Option<String> {
    let (field, value) = selector
        .split_once("==")
        .or_else(|| selector.split_once('='))?;
    (field.trim() == "metadata.name" && !value.contains(',') && !value.is_empty())
        .then(|| value.trim().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn resource(
        verb: &str,
        group: &str,
        resource: &str,
        subresource: &str,
        namespace: &str,
        name: &str,
    ) -> Attributes {
        Attributes::Resource(ResourceAttributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    fn non_resource(verb: &str, path: &str) -> Attributes {
        Attributes::NonResource {
            verb: verb.into(),
            path: path.into(),
        }
    }

    #[test]
    fn requests_become_attributes() {
        let rbac = "rbac.authorization.k8s.io";
        let cases = [
            ("GET", "/version", "", non_resource("get", "/version")),
            ("GET", "/api", "", non_resource("get", "/api")),
            ("GET", "/api/v1", "", non_resource("get", "/api/v1")),
            (
                "GET",
                "/apis/x.io/v1",
                "",
                non_resource("get", "/apis/x.io/v1"),
            ),
            ("GET", "/openapi/v3", "", non_resource("get", "/openapi/v3")),
            ("POST", "/healthz", "", non_resource("post", "/healthz")),
            (
                "GET",
                "/api/v1/pods",
                "",
                resource("list", "", "pods", "", "", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods",
                "watch=true",
                resource("watch", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/a/pods/web",
                "",
                resource("watch", "", "pods", "", "a", "web"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods",
                "fieldSelector=metadata.name%3Dweb&watch=1",
                resource("watch", "", "pods", "", "a", "web"),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods",
                "fieldSelector=metadata.name%3Dweb%2Cstatus.phase%3DRunning",
                resource("list", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/web",
                "",
                resource("get", "", "pods", "", "a", "web"),
            ),
            (
                "PATCH",
                "/api/v1/namespaces/a/pods/web/status",
                "",
                resource("patch", "", "pods", "status", "a", "web"),
            ),
            (
                "POST",
                "/api/v1/namespaces/a/serviceaccounts/agent/token",
                "",
                resource("create", "", "serviceaccounts", "token", "a", "agent"),
            ),
            (
                "PUT",
                "/api/v1/namespaces/a/pods/web",
                "",
                resource("update", "", "pods", "", "a", "web"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/pods/web",
                "",
                resource("delete", "", "pods", "", "a", "web"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/pods",
                "",
                resource("deletecollection", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces",
                "",
                resource("list", "", "namespaces", "", "", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a",
                "",
                resource("get", "", "namespaces", "", "a", "a"),
            ),
            (
                "PUT",
                "/api/v1/namespaces/a/status",
                "",
                resource("update", "", "namespaces", "status", "a", "a"),
            ),
            (
                "POST",
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                "",
                resource("create", rbac, "clusterrolebindings", "", "", ""),
            ),
            (
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/namespaces/a/roles/r",
                "",
                resource("get", rbac, "roles", "", "a", "r"),
            ),
            (
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                "",
                resource(
                    "create",
                    "authorization.k8s.io",
                    "selfsubjectaccessreviews",
                    "",
                    "",
                    "",
                ),
            ),
            (
                "GET",
                "/api/v1/services",
                "",
                resource("list", "", "services", "", "", ""),
            ),
        ];
        for (method, path, query, want) in cases {
            let query = Query::parse(Some(query));
            assert_eq!(
                request_attributes(method, path, &query),
                want,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn review_specs_become_attributes_and_users() {
        let spec = json!({
            "user": "alice",
            "groups": ["devs"],
            "extra": {"k": ["v"]},
            "resourceAttributes": {"namespace": "a", "verb": "get", "resource": "pods", "name": "web"},
        });
        assert_eq!(
            Attributes::from_review_spec(&spec),
            Ok(resource("get", "", "pods", "", "a", "web"))
        );
        let user = UserInfo::from_review_spec(&spec);
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["devs"]);
        assert_eq!(user.extra["k"], ["v"]);
        assert_eq!(
            Attributes::from_review_spec(
                &json!({"nonResourceAttributes": {"path": "/version", "verb": "get"}})
            ),
            Ok(non_resource("get", "/version"))
        );
        assert!(Attributes::from_review_spec(&json!({})).is_err());
        assert!(
            Attributes::from_review_spec(
                &json!({"resourceAttributes": {}, "nonResourceAttributes": {}})
            )
            .is_err()
        );
    }
}
