//! Server-side printing: the `meta.k8s.io` `Table` that `kubectl get` asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`. Pure functions with `now`
//! passed in.
//!
//! Columns follow the apiserver's printers: pods `Name, Ready, Status, Restarts, Age` and,
//! at priority 1 (shown by `-o wide`), `IP, Node, Nominated Node, Readiness Gates`;
//! namespaces `Name, Status, Age`; events `Last Seen, Type, Reason, Object, Message`;
//! service accounts `Name, Secrets, Age`; roles and cluster roles `Name, Created At`;
//! role bindings and cluster role bindings `Name, Role, Age` and, at priority 1, `Users,
//! Groups, ServiceAccounts`; mutating webhook configurations `Name, Webhooks, Age`.
//! Each row carries the object as `PartialObjectMetadata` (default, `includeObject=Metadata`),
//! the full object (`includeObject=Object`) or nothing (`includeObject=None`).

use serde_json::{Value, json};

use super::clock::{human_duration, parse_rfc3339};
use super::resource::Kind;

/// What each row's `object` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    #[default]
    Metadata,
    /// The full object.
    Object,
}

impl IncludeObject {
    /// Parses the `includeObject` query parameter (unknown values: the default).
    pub fn parse(text: Option<&str>) -> IncludeObject {
        match text {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// List metadata copied into the table.
#[derive(Debug, Clone, Default)]
pub struct TableMeta {
    /// `metadata.resourceVersion`
    pub resource_version: String,
    /// `metadata.continue`
    pub continue_token: Option<String>,
    /// `metadata.remainingItemCount`
    pub remaining_item_count: Option<usize>,
}

fn column(name: &str, kind: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({
        "name": name,
        "type": kind,
        "format": format,
        "description": description,
        "priority": priority,
    })
}

const NAME_DESCRIPTION: &str = "Name must be unique within a namespace.";
const AGE_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the server time \
                               when this object was created.";

/// The column definitions for a kind.
pub fn columns(kind: Kind) -> Vec<Value> {
    match kind {
        Kind::Pod => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column(
                "Ready",
                "string",
                "",
                0,
                "The aggregate readiness state of this pod.",
            ),
            column(
                "Status",
                "string",
                "",
                0,
                "The aggregate status of the containers.",
            ),
            column(
                "Restarts",
                "string",
                "",
                0,
                "The number of times the containers restarted.",
            ),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
            column("IP", "string", "", 1, "IP address allocated to the pod."),
            column(
                "Node",
                "string",
                "",
                1,
                "Name of the node the pod is scheduled on.",
            ),
            column(
                "Nominated Node",
                "string",
                "",
                1,
                "Node nominated by the scheduler.",
            ),
            column(
                "Readiness Gates",
                "string",
                "",
                1,
                "Readiness gates that are true.",
            ),
        ],
        Kind::Namespace => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column("Status", "string", "", 0, "The status of the namespace."),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
        ],
        Kind::Event | Kind::EventV1 => vec![
            column(
                "Last Seen",
                "string",
                "",
                0,
                "Time of the most recent occurrence.",
            ),
            column("Type", "string", "", 0, "Type of this event."),
            column("Reason", "string", "", 0, "Why the action was taken."),
            column("Object", "string", "", 0, "The object this event is about."),
            column("Message", "string", "", 0, "A description of the event."),
        ],
        Kind::Node => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column(
                "Taints",
                "string",
                "",
                0,
                "The node's taints (key=value:effect).",
            ),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
        ],
        Kind::ServiceAccount => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column(
                "Secrets",
                "string",
                "",
                0,
                "Secrets the service account's pods may use.",
            ),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
        ],
        Kind::Role | Kind::ClusterRole => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column("Created At", "date", "", 0, AGE_DESCRIPTION),
        ],
        Kind::RoleBinding | Kind::ClusterRoleBinding => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column("Role", "string", "", 0, "The role the binding grants."),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
            column("Users", "string", "", 1, "Users the binding applies to."),
            column("Groups", "string", "", 1, "Groups the binding applies to."),
            column(
                "ServiceAccounts",
                "string",
                "",
                1,
                "Service accounts the binding applies to.",
            ),
        ],
        Kind::MutatingWebhookConfiguration => vec![
            column("Name", "string", "name", 0, NAME_DESCRIPTION),
            column(
                "Webhooks",
                "integer",
                "",
                0,
                "Webhooks indicates the number of webhooks registered in this configuration.",
            ),
            column("Age", "string", "", 0, AGE_DESCRIPTION),
        ],
    }
}

/// The names of a binding's subjects of `kind`, comma-separated (service accounts as
/// `namespace/name`).
fn subject_names(binding: &Value, kind: &str) -> String {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["kind"] == kind)
        .map(|s| {
            let name = s["name"].as_str().unwrap_or_default();
            if kind == "ServiceAccount" {
                let namespace = s["namespace"]
                    .as_str()
                    .or_else(|| binding["metadata"]["namespace"].as_str())
                    .unwrap_or_default();
                format!("{namespace}/{name}")
            } else {
                name.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn text_or_none(value: &Value) -> String {
    value
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("<none>")
        .to_string()
}

fn age(timestamp: &Value, now: i64) -> String {
    timestamp
        .as_str()
        .and_then(parse_rfc3339)
        .map_or_else(|| "<unknown>".to_string(), |t| human_duration(now - t))
}

/// The printed cells of one object.
pub fn cells(kind: Kind, object: &Value, now: i64) -> Vec<Value> {
    let metadata = &object["metadata"];
    let name = json!(metadata["name"].as_str().unwrap_or_default());
    match kind {
        Kind::Pod => {
            let containers = object["spec"]["containers"].as_array().map_or(0, Vec::len);
            let statuses = object["status"]["containerStatuses"].as_array();
            let ready = statuses.map_or(0, |s| {
                s.iter()
                    .filter(|c| c["ready"].as_bool() == Some(true))
                    .count()
            });
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            let status = if metadata["deletionTimestamp"].is_string() {
                "Terminating".to_string()
            } else {
                object["status"]["reason"]
                    .as_str()
                    .or_else(|| object["status"]["phase"].as_str())
                    .unwrap_or("Unknown")
                    .to_string()
            };
            vec![
                name,
                json!(format!("{ready}/{containers}")),
                json!(status),
                json!(restarts.to_string()),
                json!(age(&metadata["creationTimestamp"], now)),
                json!(text_or_none(&object["status"]["podIP"])),
                json!(text_or_none(&object["spec"]["nodeName"])),
                json!(text_or_none(&object["status"]["nominatedNodeName"])),
                json!("<none>"),
            ]
        }
        Kind::Namespace => vec![
            name,
            json!(object["status"]["phase"].as_str().unwrap_or("Active")),
            json!(age(&metadata["creationTimestamp"], now)),
        ],
        Kind::Event | Kind::EventV1 => {
            let regarding = if object["regarding"].is_object() {
                &object["regarding"]
            } else {
                &object["involvedObject"]
            };
            let last_seen = ["lastTimestamp", "eventTime", "firstTimestamp"]
                .iter()
                .map(|field| &object[*field])
                .find(|v| v.is_string())
                .unwrap_or(&metadata["creationTimestamp"]);
            vec![
                json!(age(last_seen, now)),
                json!(object["type"].as_str().unwrap_or_default()),
                json!(object["reason"].as_str().unwrap_or_default()),
                json!(format!(
                    "{}/{}",
                    regarding["kind"]
                        .as_str()
                        .unwrap_or_default()
                        .to_ascii_lowercase(),
                    regarding["name"].as_str().unwrap_or_default()
                )),
                json!(
                    object["message"]
                        .as_str()
                        .or_else(|| object["note"].as_str())
                        .unwrap_or_default()
                ),
            ]
        }
        Kind::Node => {
            let taints: Vec<String> = object["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let key = t["key"].as_str().unwrap_or_default();
                    let effect = t["effect"].as_str().unwrap_or_default();
                    match t["value"].as_str() {
                        Some(value) => format!("{key}={value}:{effect}"),
                        None => format!("{key}:{effect}"),
                    }
                })
                .collect();
            vec![
                name,
                json!(if taints.is_empty() {
                    "<none>".to_string()
                } else {
                    taints.join(",")
                }),
                json!(age(&metadata["creationTimestamp"], now)),
            ]
        }
        Kind::ServiceAccount => vec![
            name,
            json!(object["secrets"].as_array().map_or(0, Vec::len)),
            json!(age(&metadata["creationTimestamp"], now)),
        ],
        Kind::Role | Kind::ClusterRole => vec![
            name,
            json!(metadata["creationTimestamp"].as_str().unwrap_or_default()),
        ],
        Kind::RoleBinding | Kind::ClusterRoleBinding => vec![
            name,
            json!(format!(
                "{}/{}",
                object["roleRef"]["kind"].as_str().unwrap_or_default(),
                object["roleRef"]["name"].as_str().unwrap_or_default()
            )),
            json!(age(&metadata["creationTimestamp"], now)),
            json!(subject_names(object, "User")),
            json!(subject_names(object, "Group")),
            json!(subject_names(object, "ServiceAccount")),
        ],
        Kind::MutatingWebhookConfiguration => vec![
            name,
            json!(object["webhooks"].as_array().map_or(0, Vec::len)),
            json!(age(&metadata["creationTimestamp"], now)),
        ],
    }
}

/// The `object` of a row.
fn row_object(object: &Value, include: IncludeObject, api_version: &str) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(object.clone()),
        IncludeObject::Metadata => Some(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": api_version,
            "metadata": object["metadata"],
        })),
    }
}

/// A Table of `objects`. `api_version` is `meta.k8s.io/v1` or `meta.k8s.io/v1beta1`,
/// whichever the client asked for.
pub fn table(
    kind: Kind,
    objects: &[Value],
    include: IncludeObject,
    api_version: &str,
    meta: &TableMeta,
    now: i64,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut row = json!({"cells": cells(kind, object, now)});
            if let Some(embedded) = row_object(object, include, api_version) {
                row["object"] = embedded;
            }
            row
        })
        .collect();
    let mut metadata = json!({"resourceVersion": meta.resource_version});
    if let Some(token) = &meta.continue_token {
        metadata["continue"] = json!(token);
    }
    if let Some(count) = meta.remaining_item_count {
        metadata["remainingItemCount"] = json!(count);
    }
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": metadata,
        "columnDefinitions": columns(kind),
        "rows": rows,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kube_emulator::clock::format_rfc3339;

    const NOW: i64 = 1_735_787_045;

    #[test]
    fn pod_cells() {
        let pod = json!({
            "metadata": {"name": "web", "creationTimestamp": format_rfc3339(NOW - 200)},
            "spec": {"nodeName": "node-1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "containerStatuses": [{"ready": true, "restartCount": 2},
                                             {"ready": false, "restartCount": 1}]},
        });
        assert_eq!(
            cells(Kind::Pod, &pod, NOW),
            vec![
                json!("web"),
                json!("1/2"),
                json!("Running"),
                json!("3"),
                json!("3m20s"),
                json!("10.0.0.5"),
                json!("node-1"),
                json!("<none>"),
                json!("<none>"),
            ]
        );
        let mut terminating = pod.clone();
        terminating["metadata"]["deletionTimestamp"] = json!(format_rfc3339(NOW));
        assert_eq!(cells(Kind::Pod, &terminating, NOW)[2], json!("Terminating"));
        assert_eq!(columns(Kind::Pod).len(), cells(Kind::Pod, &pod, NOW).len());
    }

    #[test]
    fn namespace_table_with_metadata_rows() {
        let ns = json!({"metadata": {"name": "team-a", "creationTimestamp": format_rfc3339(NOW - 5)},
                        "status": {"phase": "Active"}});
        let meta = TableMeta {
            resource_version: "7".into(),
            continue_token: None,
            remaining_item_count: None,
        };
        let table = table(
            Kind::Namespace,
            &[ns],
            IncludeObject::Metadata,
            "meta.k8s.io/v1",
            &meta,
            NOW,
        );
        assert_eq!(table["kind"], "Table");
        assert_eq!(table["rows"][0]["cells"], json!(["team-a", "Active", "5s"]));
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(table["rows"][0]["object"]["metadata"]["name"], "team-a");
        assert_eq!(table["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn rbac_and_service_account_cells() {
        let created = format_rfc3339(NOW - 90);
        let binding = json!({
            "metadata": {"name": "readers", "namespace": "team-a", "creationTimestamp": created},
            "roleRef": {"kind": "ClusterRole", "name": "view"},
            "subjects": [
                {"kind": "User", "name": "alice"}, {"kind": "User", "name": "bob"},
                {"kind": "Group", "name": "devs"},
                {"kind": "ServiceAccount", "name": "agent"},
                {"kind": "ServiceAccount", "name": "x", "namespace": "podiam"},
            ],
        });
        let cases = [
            (
                Kind::RoleBinding,
                binding,
                json!([
                    "readers",
                    "ClusterRole/view",
                    "90s",
                    "alice, bob",
                    "devs",
                    "team-a/agent, podiam/x"
                ]),
            ),
            (
                Kind::ClusterRole,
                json!({"metadata": {"name": "view", "creationTimestamp": created}}),
                json!(["view", created]),
            ),
            (
                Kind::ServiceAccount,
                json!({"metadata": {"name": "agent", "creationTimestamp": created},
                       "secrets": [{"name": "s"}]}),
                json!(["agent", 1, "90s"]),
            ),
        ];
        for (kind, object, want) in cases {
            assert_eq!(json!(cells(kind, &object, NOW)), want, "{kind:?}");
            assert_eq!(columns(kind).len(), cells(kind, &object, NOW).len());
        }
    }

    #[test]
    fn include_object_parsing() {
        assert_eq!(IncludeObject::parse(None), IncludeObject::Metadata);
        assert_eq!(IncludeObject::parse(Some("Object")), IncludeObject::Object);
        assert_eq!(IncludeObject::parse(Some("None")), IncludeObject::None);
    }
}
