//! Pure request parsing: URL path → [`Route`], query string → [`Query`], `Accept` →
//! [`Representation`]. No I/O, table-driven tests.

use std::collections::HashMap;

use percent_encoding::percent_decode_str;

use super::resource::{Kind, Review, STORED_GROUPS, named_group};

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/version`
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}` for a named group the emulator serves.
    Group {
        /// The API group.
        group: &'static str,
    },
    /// `/api/v1` (group "") or `/apis/{group}/v1`.
    Resources {
        /// The API group ("" for core).
        group: &'static str,
    },
    /// `/openapi/v3`: the index of OpenAPI v3 documents.
    OpenApiV3Root,
    /// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/v1` (groups with stored kinds).
    OpenApiV3 {
        /// The API group ("" for core).
        group: &'static str,
    },
    /// A collection: `…/pods`, `…/namespaces/{ns}/pods`, `…/namespaces`.
    Collection {
        /// The resource.
        kind: Kind,
        /// The namespace, for namespaced resources listed within one.
        namespace: Option<String>,
        /// A legacy `/watch/` path.
        watch: bool,
    },
    /// One object: `…/namespaces/{ns}/pods/{name}[/status]`, `…/namespaces/{name}[/status]`.
    Object {
        /// The resource.
        kind: Kind,
        /// The namespace (namespaced resources only).
        namespace: Option<String>,
        /// The object's name.
        name: String,
        /// Whether the path ends in `/status`.
        status: bool,
        /// A legacy `/watch/` path.
        watch: bool,
    },
    /// `/api/v1/namespaces/{ns}/serviceaccounts/{name}/token`: TokenRequest.
    TokenRequest {
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
    /// `/apis/authentication.k8s.io/v1/tokenreviews` and the other review resources.
    Review(Review),
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// Parses a request path. `None` for paths the emulator does not serve.
pub fn parse_route(path: &str) -> Option<Route> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let stored_group = |group: &str| STORED_GROUPS.into_iter().find(|g| *g == group);
    let (group, rest): (&'static str, &[&str]) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", group] => {
            return named_group(group).map(|group| Route::Group { group });
        }
        ["openapi", "v3"] => return Some(Route::OpenApiV3Root),
        ["openapi", "v3", "api", "v1"] => return Some(Route::OpenApiV3 { group: "" }),
        ["openapi", "v3", "apis", group, "v1"] => {
            return stored_group(group)
                .filter(|g| !g.is_empty())
                .map(|group| Route::OpenApiV3 { group });
        }
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, "v1", rest @ ..] => (named_group(group)?, rest),
        _ => return None,
    };
    let (watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let resource = |plural: &str| Kind::from_plural(group, plural);
    let namespaces = |group: &str| group.is_empty();
    let object = |kind: Kind, namespace: Option<&str>, name: &str, status: bool| {
        (!status || kind.has_status()).then(|| Route::Object {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            status,
            watch,
        })
    };
    match rest {
        [] if !watch => Some(Route::Resources { group }),
        ["namespaces"] if namespaces(group) => Some(Route::Collection {
            kind: Kind::Namespace,
            namespace: None,
            watch,
        }),
        ["namespaces", name] if namespaces(group) => object(Kind::Namespace, None, name, false),
        ["namespaces", name, "status"] if namespaces(group) => {
            object(Kind::Namespace, None, name, true)
        }
        ["namespaces", ns, plural] => {
            let kind = resource(plural).filter(|k| k.namespaced())?;
            Some(Route::Collection {
                kind,
                namespace: Some(ns.to_string()),
                watch,
            })
        }
        ["namespaces", ns, plural, name] => object(
            resource(plural).filter(|k| k.namespaced())?,
            Some(ns),
            name,
            false,
        ),
        ["namespaces", ns, "serviceaccounts", name, "token"] if namespaces(group) && !watch => {
            Some(Route::TokenRequest {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        ["namespaces", ns, plural, name, "status"] => object(
            resource(plural).filter(|k| k.namespaced())?,
            Some(ns),
            name,
            true,
        ),
        [plural] => match Review::from_plural(group, plural) {
            Some(review) if !watch => Some(Route::Review(review)),
            Some(_) => None,
            None => Some(Route::Collection {
                kind: resource(plural)?,
                namespace: None,
                watch,
            }),
        },
        [plural, name] => object(
            resource(plural).filter(|k| !k.namespaced())?,
            None,
            name,
            false,
        ),
        _ => None,
    }
}

/// Decoded query parameters (the last occurrence of a key wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    params: HashMap<String, String>,
}

impl Query {
    /// Parses `a=b&c=d` with `+` as space and percent-decoding.
    pub fn parse(query: Option<&str>) -> Query {
        let params = query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let unplus = |s: &str| decode(&s.replace('+', " "));
                (unplus(key), unplus(value))
            })
            .collect();
        Query { params }
    }

    /// A parameter's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// A parameter's value, if present and non-empty.
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    /// A boolean parameter (`true`/`1`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1" | "True"))
    }
}

/// The response form a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Representation {
    /// Plain JSON objects.
    Json,
    /// A `meta.k8s.io` Table, with the given apiVersion (`meta.k8s.io/v1` or `/v1beta1`).
    Table(&'static str),
}

/// Chooses the representation from an `Accept` header: a Table if any media range asks
/// for `as=Table` in `meta.k8s.io` v1 or v1beta1, else JSON. (Protobuf and the aggregated
/// discovery types are never chosen; the client's JSON fallback is used.)
pub fn negotiate(accept: Option<&str>) -> Representation {
    for range in accept.unwrap_or_default().split(',') {
        let mut params = HashMap::new();
        for param in range.split(';').skip(1) {
            if let Some((k, v)) = param.split_once('=') {
                params.insert(k.trim(), v.trim());
            }
        }
        if params.get("as") == Some(&"Table") && params.get("g") == Some(&"meta.k8s.io") {
            match params.get("v") {
                Some(&"v1") => return Representation::Table("meta.k8s.io/v1"),
                Some(&"v1beta1") => return Representation::Table("meta.k8s.io/v1beta1"),
                _ => {}
            }
        }
    }
    Representation::Json
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kube_emulator::resource::{AUTHENTICATION_GROUP, EVENTS_GROUP, RBAC_GROUP};

    fn collection(kind: Kind, namespace: Option<&str>) -> Option<Route> {
        Some(Route::Collection {
            kind,
            namespace: namespace.map(str::to_string),
            watch: false,
        })
    }

    fn object(kind: Kind, namespace: Option<&str>, name: &str, status: bool) -> Option<Route> {
        Some(Route::Object {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            status,
            watch: false,
        })
    }

    #[test]
    fn routes() {
        let cases = [
            ("/version", Some(Route::Version)),
            ("/version/", Some(Route::Version)),
            ("/api", Some(Route::CoreVersions)),
            ("/apis", Some(Route::Groups)),
            (
                "/apis/events.k8s.io",
                Some(Route::Group {
                    group: EVENTS_GROUP,
                }),
            ),
            (
                "/apis/rbac.authorization.k8s.io",
                Some(Route::Group { group: RBAC_GROUP }),
            ),
            ("/apis/apps", None),
            ("/api/v1", Some(Route::Resources { group: "" })),
            (
                "/apis/events.k8s.io/v1",
                Some(Route::Resources {
                    group: EVENTS_GROUP,
                }),
            ),
            ("/openapi/v3", Some(Route::OpenApiV3Root)),
            ("/openapi/v3/api/v1", Some(Route::OpenApiV3 { group: "" })),
            ("/openapi/v2", None),
            ("/api/v1/pods", collection(Kind::Pod, None)),
            (
                "/api/v1/namespaces/team-a/pods",
                collection(Kind::Pod, Some("team-a")),
            ),
            (
                "/api/v1/namespaces/team-a/pods/web",
                object(Kind::Pod, Some("team-a"), "web", false),
            ),
            (
                "/api/v1/namespaces/team-a/pods/web/status",
                object(Kind::Pod, Some("team-a"), "web", true),
            ),
            ("/api/v1/namespaces", collection(Kind::Namespace, None)),
            (
                "/api/v1/namespaces/team-a",
                object(Kind::Namespace, None, "team-a", false),
            ),
            (
                "/api/v1/namespaces/team-a/status",
                object(Kind::Namespace, None, "team-a", true),
            ),
            ("/api/v1/events", collection(Kind::Event, None)),
            (
                "/api/v1/namespaces/a/events/e1",
                object(Kind::Event, Some("a"), "e1", false),
            ),
            (
                "/apis/events.k8s.io/v1/namespaces/a/events",
                collection(Kind::EventV1, Some("a")),
            ),
            (
                "/api/v1/watch/namespaces/a/pods",
                Some(Route::Collection {
                    kind: Kind::Pod,
                    namespace: Some("a".into()),
                    watch: true,
                }),
            ),
            (
                "/api/v1/namespaces/a/serviceaccounts",
                collection(Kind::ServiceAccount, Some("a")),
            ),
            (
                "/api/v1/namespaces/a/serviceaccounts/agent/token",
                Some(Route::TokenRequest {
                    namespace: "a".into(),
                    name: "agent".into(),
                }),
            ),
            (
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/view",
                object(Kind::ClusterRole, None, "view", false),
            ),
            (
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                collection(Kind::ClusterRoleBinding, None),
            ),
            (
                "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings/rb",
                object(Kind::RoleBinding, Some("a"), "rb", false),
            ),
            (
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(Route::Review(Review::TokenReview)),
            ),
            (
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                Some(Route::Review(Review::SelfSubjectAccessReview)),
            ),
            (
                "/apis/authentication.k8s.io/v1",
                Some(Route::Resources {
                    group: AUTHENTICATION_GROUP,
                }),
            ),
            (
                "/openapi/v3/apis/rbac.authorization.k8s.io/v1",
                Some(Route::OpenApiV3 { group: RBAC_GROUP }),
            ),
            ("/openapi/v3/apis/authentication.k8s.io/v1", None),
            ("/api/v1/namespaces/a/pods/web/token", None),
            ("/api/v1/pods/web", None),
            ("/apis/rbac.authorization.k8s.io/v1/roles/r", None),
            ("/api/v1/namespaces/a/events/e1/status", None),
            ("/api/v1/namespaces/a/namespaces", None),
            ("/api/v1/services", None),
            ("/apis/apps/v1", None),
            ("/healthz", None),
        ];
        for (path, want) in cases {
            assert_eq!(parse_route(path), want, "{path}");
        }
    }

    #[test]
    fn query_decoding() {
        let query = Query::parse(Some(
            "labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&limit=&fieldSelector=metadata.name%3Dweb",
        ));
        assert_eq!(query.get("labelSelector"), Some("app=web,tier in (a)"));
        assert_eq!(query.get("fieldSelector"), Some("metadata.name=web"));
        assert!(query.flag("watch"));
        assert_eq!(query.non_empty("limit"), None);
        assert!(!query.flag("missing"));
    }

    #[test]
    fn accept_negotiation() {
        let cases = [
            (None, Representation::Json),
            (Some("application/json"), Representation::Json),
            (
                Some(
                    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                ),
                Representation::Table("meta.k8s.io/v1"),
            ),
            (
                Some("application/json;as=Table;v=v1beta1;g=meta.k8s.io"),
                Representation::Table("meta.k8s.io/v1beta1"),
            ),
            (
                Some(
                    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
                ),
                Representation::Json,
            ),
        ];
        for (accept, want) in cases {
            assert_eq!(negotiate(accept), want, "{accept:?}");
        }
    }
}
