//! RBAC evaluation as pure functions over plain data: a [`Policy`] built from the stored
//! Roles, ClusterRoles and their bindings, and [`authorize`], which answers whether a
//! [`UserInfo`] may do what [`Attributes`] describe, and why.
//!
//! The semantics follow the apiserver's RBAC authorizer:
//! - members of `system:masters` may do anything, before any rule is read;
//! - ClusterRoleBindings grant their ClusterRole everywhere; RoleBindings grant a Role of
//!   their namespace, or a ClusterRole, only for requests in their namespace;
//! - a rule matches when its `verbs`, `apiGroups` and `resources` (`*`, `pods`,
//!   `pods/status`, `pods/*`, `*/status`) cover the request, and its `resourceNames` (if any)
//!   contain the request's name; requests without a name (list, create) never match a rule
//!   with `resourceNames`. Non-resource requests match `nonResourceURLs` (`*`, exact, or a
//!   prefix ending in `*`);
//! - subjects are `User` (by name), `Group` (by membership) and `ServiceAccount` (the user
//!   `system:serviceaccount:NS:NAME`; a RoleBinding's subject without namespace means the
//!   binding's);
//! - anything not allowed is denied.
//!
//! Aggregated ClusterRoles (`aggregationRule`) are not expanded, and there is no escalation
//! check on writes to RBAC objects.

use std::collections::BTreeMap;

use serde_json::Value;

use super::attributes::{Attributes, ResourceAttributes, UserInfo, service_account_username};
use super::error::EmulatorError;

/// One rule of a Role or ClusterRole.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyRule {
    /// `verbs`
    pub verbs: Vec<String>,
    /// `apiGroups`
    pub api_groups: Vec<String>,
    /// `resources`
    pub resources: Vec<String>,
    /// `resourceNames`
    pub resource_names: Vec<String>,
    /// `nonResourceURLs`
    pub non_resource_urls: Vec<String>,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

const ALL: &str = "*";

impl PolicyRule {
    /// A rule from its JSON form (missing lists are empty).
    pub fn from_json(rule: &Value) -> PolicyRule {
        PolicyRule {
            verbs: strings(&rule["verbs"]),
            api_groups: strings(&rule["apiGroups"]),
            resources: strings(&rule["resources"]),
            resource_names: strings(&rule["resourceNames"]),
            non_resource_urls: strings(&rule["nonResourceURLs"]),
        }
    }

    fn covers_verb(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == ALL || v == verb)
    }

    fn covers_resource(&self, resource: &str, subresource: &str) -> bool {
        let combined = if subresource.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{subresource}")
        };
        self.resources.iter().any(|r| {
            r == ALL
                || *r == combined
                || (!subresource.is_empty()
                    && (*r == format!("{resource}/*") || *r == format!("*/{subresource}")))
        })
    }

    fn covers_path(&self, path: &str) -> bool {
        self.non_resource_urls.iter().any(|url| {
            url == ALL
                || url == path
                || url
                    .strip_suffix('*')
                    .is_some_and(|prefix| path.starts_with(prefix))
        })
    }

    /// Whether this rule allows the request.
    pub fn allows(&self, attributes: &Attributes) -> bool {
        match attributes {
            Attributes::Resource(r) => {
                self.covers_verb(&r.verb)
                    && self.api_groups.iter().any(|g| g == ALL || *g == r.group)
                    && self.covers_resource(&r.resource, &r.subresource)
                    && (self.resource_names.is_empty()
                        || (!r.name.is_empty() && self.resource_names.contains(&r.name)))
            }
            Attributes::NonResource { verb, path } => {
                self.covers_verb(verb) && self.covers_path(path)
            }
        }
    }
}

/// Who a binding grants its role to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subject {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: String,
    /// The user, group or service account name.
    pub name: String,
    /// A service account's namespace.
    pub namespace: String,
}

impl Subject {
    /// Whether `user` is this subject, for a binding in `binding_namespace` ("" for a
    /// ClusterRoleBinding).
    pub fn matches(&self, user: &UserInfo, binding_namespace: &str) -> bool {
        match self.kind.as_str() {
            "User" => user.username == self.name,
            "Group" => user.groups.contains(&self.name),
            "ServiceAccount" => {
                let namespace = if self.namespace.is_empty() {
                    binding_namespace
                } else {
                    &self.namespace
                };
                !namespace.is_empty()
                    && user.username == service_account_username(namespace, &self.name)
            }
            _ => false,
        }
    }

    /// How the apiserver names the subject in a reason: `User "alice"`,
    /// `ServiceAccount "agent/podiam"`.
    fn describe(&self, binding_namespace: &str) -> String {
        match self.kind.as_str() {
            "ServiceAccount" => {
                let namespace = if self.namespace.is_empty() {
                    binding_namespace
                } else {
                    &self.namespace
                };
                format!("ServiceAccount \"{}/{namespace}\"", self.name)
            }
            kind => format!("{kind} \"{}\"", self.name),
        }
    }
}

/// A RoleBinding or ClusterRoleBinding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Binding {
    /// The binding's name.
    pub name: String,
    /// Its namespace ("" for a ClusterRoleBinding).
    pub namespace: String,
    /// `roleRef.kind`: `Role` or `ClusterRole`.
    pub role_kind: String,
    /// `roleRef.name`
    pub role_name: String,
    /// `subjects`
    pub subjects: Vec<Subject>,
}

impl Binding {
    /// A binding from its JSON form.
    pub fn from_json(binding: &Value) -> Binding {
        Binding {
            name: text(&binding["metadata"]["name"]),
            namespace: text(&binding["metadata"]["namespace"]),
            role_kind: text(&binding["roleRef"]["kind"]),
            role_name: text(&binding["roleRef"]["name"]),
            subjects: binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Subject {
                    kind: text(&s["kind"]),
                    name: text(&s["name"]),
                    namespace: text(&s["namespace"]),
                })
                .collect(),
        }
    }
}

/// Every role and binding, indexed for evaluation.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// ClusterRole name → rules.
    pub cluster_roles: BTreeMap<String, Vec<PolicyRule>>,
    /// (namespace, Role name) → rules.
    pub roles: BTreeMap<(String, String), Vec<PolicyRule>>,
    /// ClusterRoleBindings, in name order.
    pub cluster_role_bindings: Vec<Binding>,
    /// RoleBindings, in (namespace, name) order.
    pub role_bindings: Vec<Binding>,
}

fn rules_of(role: &Value) -> Vec<PolicyRule> {
    role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(PolicyRule::from_json)
        .collect()
}

impl Policy {
    /// A policy from stored objects (each list as the store returns it, sorted).
    pub fn from_objects(
        cluster_roles: &[Value],
        roles: &[Value],
        cluster_role_bindings: &[Value],
        role_bindings: &[Value],
    ) -> Policy {
        Policy {
            cluster_roles: cluster_roles
                .iter()
                .map(|r| (text(&r["metadata"]["name"]), rules_of(r)))
                .collect(),
            roles: roles
                .iter()
                .map(|r| {
                    (
                        (
                            text(&r["metadata"]["namespace"]),
                            text(&r["metadata"]["name"]),
                        ),
                        rules_of(r),
                    )
                })
                .collect(),
            cluster_role_bindings: cluster_role_bindings
                .iter()
                .map(Binding::from_json)
                .collect(),
            role_bindings: role_bindings.iter().map(Binding::from_json).collect(),
        }
    }

    fn rules_for(&self, binding: &Binding) -> &[PolicyRule] {
        let rules = match (binding.role_kind.as_str(), binding.namespace.is_empty()) {
            ("ClusterRole", _) => self.cluster_roles.get(&binding.role_name),
            ("Role", false) => self
                .roles
                .get(&(binding.namespace.clone(), binding.role_name.clone())),
            _ => None,
        };
        rules.map_or(&[], Vec::as_slice)
    }
}

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Why (which binding allowed it); "" when denied or when allowed by privilege.
    pub reason: String,
}

/// Whether `user` may do what `attributes` describe under `policy`.
pub fn authorize(policy: &Policy, user: &UserInfo, attributes: &Attributes) -> Decision {
    if user.is_privileged() {
        return Decision {
            allowed: true,
            reason: String::new(),
        };
    }
    let namespace = match attributes {
        Attributes::Resource(r) => r.namespace.as_str(),
        Attributes::NonResource { .. } => "",
    };
    let role_bindings = policy
        .role_bindings
        .iter()
        .filter(|b| !namespace.is_empty() && b.namespace == namespace);
    for binding in policy.cluster_role_bindings.iter().chain(role_bindings) {
        let Some(subject) = binding
            .subjects
            .iter()
            .find(|s| s.matches(user, &binding.namespace))
        else {
            continue;
        };
        if policy
            .rules_for(binding)
            .iter()
            .any(|rule| rule.allows(attributes))
        {
            let binding_name = if binding.namespace.is_empty() {
                format!("ClusterRoleBinding \"{}\"", binding.name)
            } else {
                format!("RoleBinding \"{}/{}\"", binding.name, binding.namespace)
            };
            return Decision {
                allowed: true,
                reason: format!(
                    "RBAC: allowed by {binding_name} of {} \"{}\" to {}",
                    binding.role_kind,
                    binding.role_name,
                    subject.describe(&binding.namespace)
                ),
            };
        }
    }
    Decision {
        allowed: false,
        reason: String::new(),
    }
}

/// The apiserver's 403 for a denied request, e.g. `pods is forbidden: User "alice" cannot
/// list resource "pods" in API group "" in the namespace "team-a"`.
pub fn forbidden(username: &str, attributes: &Attributes) -> EmulatorError {
    match attributes {
        Attributes::NonResource { verb, path } => EmulatorError::Forbidden {
            message: format!("forbidden: User \"{username}\" cannot {verb} path \"{path}\""),
            name: String::new(),
            group: String::new(),
            resource: String::new(),
        },
        Attributes::Resource(ResourceAttributes {
            verb,
            group,
            resource,
            subresource,
            namespace,
            name,
        }) => {
            let qualified = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            let what = if name.is_empty() {
                qualified
            } else {
                format!("{qualified} \"{name}\"")
            };
            let full_resource = if subresource.is_empty() {
                resource.clone()
            } else {
                format!("{resource}/{subresource}")
            };
            let scope = if namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace \"{namespace}\"")
            };
            EmulatorError::Forbidden {
                message: format!(
                    "{what} is forbidden: User \"{username}\" cannot {verb} resource \
                     \"{full_resource}\" in API group \"{group}\" {scope}"
                ),
                name: name.clone(),
                group: group.clone(),
                resource: resource.clone(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn res(verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> Attributes {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes::Resource(ResourceAttributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    fn path(verb: &str, path: &str) -> Attributes {
        Attributes::NonResource {
            verb: verb.into(),
            path: path.into(),
        }
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..UserInfo::default()
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_names_and_urls() {
        let rule = |value: Value| PolicyRule::from_json(&value);
        let pods_get = rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}));
        let cases = [
            ("exact", &pods_get, res("get", "", "pods", "a", "web"), true),
            (
                "other verb",
                &pods_get,
                res("list", "", "pods", "a", ""),
                false,
            ),
            (
                "other group",
                &pods_get,
                res("get", "apps", "pods", "a", "x"),
                false,
            ),
            (
                "other resource",
                &pods_get,
                res("get", "", "secrets", "a", "x"),
                false,
            ),
            (
                "no subresource",
                &pods_get,
                res("get", "", "pods/status", "a", "x"),
                false,
            ),
            ("not a path rule", &pods_get, path("get", "/api"), false),
        ];
        for (name, rule, attributes, want) in cases {
            assert_eq!(rule.allows(&attributes), want, "{name}");
        }
        let table = [
            (
                json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
                vec![
                    (
                        res("delete", "rbac.authorization.k8s.io", "roles", "a", "r"),
                        true,
                    ),
                    (res("patch", "", "pods/status", "a", "web"), true),
                    (path("get", "/version"), false),
                ],
            ),
            (
                json!({"verbs": ["get", "patch"], "apiGroups": [""], "resources": ["pods/status"]}),
                vec![
                    (res("patch", "", "pods/status", "a", "web"), true),
                    (res("patch", "", "pods", "a", "web"), false),
                ],
            ),
            (
                json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods/*"]}),
                vec![
                    (res("get", "", "pods/log", "a", "web"), true),
                    (res("get", "", "pods", "a", "web"), false),
                ],
            ),
            (
                json!({"verbs": ["create"], "apiGroups": [""], "resources": ["*/token"]}),
                vec![
                    (res("create", "", "serviceaccounts/token", "a", "sa"), true),
                    (res("create", "", "serviceaccounts", "a", ""), false),
                ],
            ),
            (
                json!({"verbs": ["get", "watch"], "apiGroups": [""], "resources": ["pods"],
                       "resourceNames": ["web"]}),
                vec![
                    (res("get", "", "pods", "a", "web"), true),
                    (res("watch", "", "pods", "a", "web"), true),
                    (res("get", "", "pods", "a", "api"), false),
                    (res("list", "", "pods", "a", ""), false),
                ],
            ),
            (
                json!({"verbs": ["get"], "nonResourceURLs": ["/api", "/apis/*", "/healthz"]}),
                vec![
                    (path("get", "/api"), true),
                    (path("get", "/api/v1"), false),
                    (path("get", "/apis/rbac.authorization.k8s.io/v1"), true),
                    (path("get", "/apis"), false),
                    (path("post", "/healthz"), false),
                    (res("get", "", "pods", "a", "web"), false),
                ],
            ),
            (
                json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
                vec![(path("delete", "/anything"), true)],
            ),
        ];
        for (rule_json, checks) in table {
            let rule = rule(rule_json.clone());
            for (attributes, want) in checks {
                assert_eq!(rule.allows(&attributes), want, "{rule_json} {attributes:?}");
            }
        }
    }

    fn policy() -> Policy {
        let cluster_role =
            |name: &str, rules: Value| json!({"metadata": {"name": name}, "rules": rules});
        let role = |ns: &str, name: &str, rules: Value| json!({"metadata": {"name": name, "namespace": ns}, "rules": rules});
        let binding = |ns: Option<&str>, name: &str, kind: &str, role: &str, subjects: Value| {
            json!({
                "metadata": {"name": name, "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                "subjects": subjects,
            })
        };
        Policy::from_objects(
            &[
                cluster_role(
                    "pod-reader",
                    json!([{"verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["pods"]}]),
                ),
                cluster_role(
                    "discovery",
                    json!([{"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/version"]}]),
                ),
                cluster_role(
                    "reviewer",
                    json!([{"verbs": ["create"], "apiGroups": ["authentication.k8s.io"],
                            "resources": ["tokenreviews"]}]),
                ),
            ],
            &[role(
                "team-a",
                "web-editor",
                json!([{"verbs": ["patch"], "apiGroups": [""], "resources": ["pods"],
                        "resourceNames": ["web"]}]),
            )],
            &[
                binding(
                    None,
                    "everyone-discovers",
                    "ClusterRole",
                    "discovery",
                    json!([{"kind": "Group", "name": "system:authenticated"}]),
                ),
                binding(
                    None,
                    "podiam-reviews",
                    "ClusterRole",
                    "reviewer",
                    json!([{"kind": "ServiceAccount", "name": "server", "namespace": "podiam"}]),
                ),
            ],
            &[
                binding(
                    Some("team-a"),
                    "readers",
                    "ClusterRole",
                    "pod-reader",
                    json!([{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "devs"}]),
                ),
                binding(
                    Some("team-a"),
                    "agents",
                    "ClusterRole",
                    "pod-reader",
                    json!([{"kind": "ServiceAccount", "name": "agent"}]),
                ),
                binding(
                    Some("team-a"),
                    "web-editors",
                    "Role",
                    "web-editor",
                    json!([{"kind": "User", "name": "bob"}]),
                ),
                binding(
                    Some("team-a"),
                    "dangling",
                    "Role",
                    "missing",
                    json!([{"kind": "User", "name": "carol"}]),
                ),
            ],
        )
    }

    #[test]
    fn bindings_grant_roles_to_subjects() {
        let policy = policy();
        let alice = user("alice", &["system:authenticated"]);
        let dev = user("dave", &["devs", "system:authenticated"]);
        let bob = user("bob", &["system:authenticated"]);
        let carol = user("carol", &[]);
        let agent = user(
            "system:serviceaccount:team-a:agent",
            &["system:serviceaccounts"],
        );
        let other_agent = user("system:serviceaccount:team-b:agent", &[]);
        let server = user("system:serviceaccount:podiam:server", &[]);
        let admin = UserInfo::admin();
        let cases = [
            (
                "RoleBinding to ClusterRole, by User",
                &alice,
                res("list", "", "pods", "team-a", ""),
                Some(
                    r#"RBAC: allowed by RoleBinding "readers/team-a" of ClusterRole "pod-reader" to User "alice""#,
                ),
            ),
            (
                "not in another namespace",
                &alice,
                res("list", "", "pods", "team-b", ""),
                None,
            ),
            (
                "not at cluster scope",
                &alice,
                res("list", "", "pods", "", ""),
                None,
            ),
            (
                "not another verb",
                &alice,
                res("delete", "", "pods", "team-a", "web"),
                None,
            ),
            (
                "by Group",
                &dev,
                res("get", "", "pods", "team-a", "web"),
                Some(
                    r#"RBAC: allowed by RoleBinding "readers/team-a" of ClusterRole "pod-reader" to Group "devs""#,
                ),
            ),
            (
                "ServiceAccount subject defaults to the binding's namespace",
                &agent,
                res("watch", "", "pods", "team-a", ""),
                Some(
                    r#"RBAC: allowed by RoleBinding "agents/team-a" of ClusterRole "pod-reader" to ServiceAccount "agent/team-a""#,
                ),
            ),
            (
                "same SA name elsewhere",
                &other_agent,
                res("watch", "", "pods", "team-a", ""),
                None,
            ),
            (
                "Role with resourceNames",
                &bob,
                res("patch", "", "pods", "team-a", "web"),
                Some(
                    r#"RBAC: allowed by RoleBinding "web-editors/team-a" of Role "web-editor" to User "bob""#,
                ),
            ),
            (
                "resourceNames exclude others",
                &bob,
                res("patch", "", "pods", "team-a", "api"),
                None,
            ),
            (
                "dangling roleRef",
                &carol,
                res("patch", "", "pods", "team-a", "web"),
                None,
            ),
            (
                "ClusterRoleBinding to a group, non-resource",
                &alice,
                path("get", "/api/v1"),
                Some(
                    r#"RBAC: allowed by ClusterRoleBinding "everyone-discovers" of ClusterRole "discovery" to Group "system:authenticated""#,
                ),
            ),
            (
                "no path for the unauthenticated",
                &carol,
                path("get", "/version"),
                None,
            ),
            (
                "ClusterRoleBinding to a ServiceAccount",
                &server,
                res("create", "authentication.k8s.io", "tokenreviews", "", ""),
                Some(
                    r#"RBAC: allowed by ClusterRoleBinding "podiam-reviews" of ClusterRole "reviewer" to ServiceAccount "server/podiam""#,
                ),
            ),
            (
                "system:masters",
                &admin,
                res("delete", "", "namespaces", "x", "x"),
                Some(""),
            ),
            (
                "deny by default",
                &carol,
                res("get", "", "pods", "team-a", "web"),
                None,
            ),
        ];
        for (name, user, attributes, want) in cases {
            let decision = authorize(&policy, user, &attributes);
            match want {
                Some(reason) => {
                    assert!(decision.allowed, "{name}: {decision:?}");
                    assert_eq!(decision.reason, reason, "{name}");
                }
                None => assert_eq!(
                    decision,
                    Decision {
                        allowed: false,
                        reason: String::new()
                    },
                    "{name}"
                ),
            }
        }
    }

    #[test]
    fn forbidden_messages_read_like_the_apiserver() {
        let cases = [
            (
                res("list", "", "pods", "team-a", ""),
                r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-a""#,
            ),
            (
                res("get", "", "namespaces", "", ""),
                r#"namespaces is forbidden: User "alice" cannot get resource "namespaces" in API group "" at the cluster scope"#,
            ),
            (
                res("create", "", "serviceaccounts/token", "a", "agent"),
                r#"serviceaccounts "agent" is forbidden: User "alice" cannot create resource "serviceaccounts/token" in API group "" in the namespace "a""#,
            ),
            (
                res("list", "rbac.authorization.k8s.io", "clusterroles", "", ""),
                r#"clusterroles.rbac.authorization.k8s.io is forbidden: User "alice" cannot list resource "clusterroles" in API group "rbac.authorization.k8s.io" at the cluster scope"#,
            ),
            (
                path("get", "/healthz"),
                r#"forbidden: User "alice" cannot get path "/healthz""#,
            ),
        ];
        for (attributes, want) in cases {
            let error = forbidden("alice", &attributes);
            assert_eq!(error.to_string(), want);
            assert_eq!(error.code_and_reason(), (403, "Forbidden"));
        }
    }
}
