//! Mutating admission webhooks, the pure part: what a `MutatingWebhookConfiguration` says
//! (its defaults and validation, as the apiserver applies them on every write), which of its
//! webhooks a pod creation goes to (rules, namespace and object selectors), the
//! `AdmissionReview` the emulator sends, and what the webhook's answer means (allowed with
//! or without a JSON patch, or denied, or an answer that counts as a failed call).
//!
//! The calls themselves (TLS, HTTP, timeouts, failure policies, the call log) are in
//! [`super::webhook`]. Only what a pod CREATE needs is interpreted: a rule matches when its
//! operations, groups, versions, resources and scope admit `CREATE` of core `v1` `pods`;
//! `matchPolicy`, `matchConditions` and `reinvocationPolicy` are stored but not acted on
//! (a webhook is called at most once per request, as with `reinvocationPolicy: Never`).

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use super::patch::json_patch;

/// `timeoutSeconds` when a webhook gives none.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
/// The longest `timeoutSeconds` the API accepts.
pub const MAX_TIMEOUT_SECONDS: u64 = 30;
/// The `apiVersion` of the reviews sent and expected back.
pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Where a webhook is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `clientConfig.url` (checked when called: `https://` only).
    Url(String),
    /// `clientConfig.service`: reached through a route a test gives
    /// ([`super::KubeEmulator::route_service`]); the certificate must name
    /// `NAME.NAMESPACE.svc`.
    Service {
        /// The service's namespace.
        namespace: String,
        /// The service's name.
        name: String,
        /// The service port (default 443).
        port: u16,
        /// The URL path (default `/`).
        path: String,
    },
}

/// What happens when a call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Reject the request (the default).
    Fail,
    /// Skip the webhook and go on.
    Ignore,
}

/// One entry of a configuration's `webhooks[]`, as far as calling it goes.
#[derive(Debug, Clone)]
pub struct Hook {
    /// The configuration's `metadata.name`.
    pub configuration: String,
    /// The webhook's `name`.
    pub name: String,
    /// Where to send the review; `None` when the configuration names neither.
    pub endpoint: Option<Endpoint>,
    /// `clientConfig.caBundle`: base64 of PEM certificates, the only trust roots.
    pub ca_bundle: String,
    /// `failurePolicy`.
    pub failure_policy: FailurePolicy,
    /// `timeoutSeconds`, within 1..=30.
    pub timeout: Duration,
    rules: Value,
    namespace_selector: Value,
    object_selector: Value,
}

/// The webhooks of `configurations`, configurations by name, each's webhooks in order.
pub fn hooks(configurations: &[Value]) -> Vec<Hook> {
    let mut sorted: Vec<&Value> = configurations.iter().collect();
    sorted.sort_by_key(|c| {
        c["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    let mut hooks = Vec::new();
    for configuration in sorted {
        let configuration_name = configuration["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        for webhook in configuration["webhooks"].as_array().into_iter().flatten() {
            hooks.push(Hook::from_json(configuration_name, webhook));
        }
    }
    hooks
}

impl Hook {
    /// Reads one `webhooks[]` entry (absent fields take the API's defaults).
    pub fn from_json(configuration: &str, webhook: &Value) -> Hook {
        let client = &webhook["clientConfig"];
        let service = &client["service"];
        let endpoint = match (client["url"].as_str(), service.is_object()) {
            (Some(url), _) => Some(Endpoint::Url(url.to_string())),
            (None, true) => Some(Endpoint::Service {
                namespace: text(&service["namespace"]),
                name: text(&service["name"]),
                port: service["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(443),
                path: service["path"].as_str().unwrap_or("/").to_string(),
            }),
            (None, false) => None,
        };
        let seconds = webhook["timeoutSeconds"]
            .as_u64()
            .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
            .clamp(1, MAX_TIMEOUT_SECONDS);
        Hook {
            configuration: configuration.to_string(),
            name: text(&webhook["name"]),
            endpoint,
            ca_bundle: text(&client["caBundle"]),
            failure_policy: match webhook["failurePolicy"].as_str() {
                Some("Ignore") => FailurePolicy::Ignore,
                _ => FailurePolicy::Fail,
            },
            timeout: Duration::from_secs(seconds),
            rules: webhook["rules"].clone(),
            namespace_selector: webhook["namespaceSelector"].clone(),
            object_selector: webhook["objectSelector"].clone(),
        }
    }

    /// Whether a pod CREATE goes to this webhook: a rule admits it, the pod's namespace
    /// (with `namespace_labels`) passes `namespaceSelector` and the pod as it stands passes
    /// `objectSelector`. An unusable selector is an error (a failed call).
    pub fn applies_to_pod_create(
        &self,
        namespace_labels: &Value,
        pod: &Value,
    ) -> Result<bool, String> {
        let rule_admits = self
            .rules
            .as_array()
            .is_some_and(|rules| rules.iter().any(rule_admits_pod_create));
        if !rule_admits {
            return Ok(false);
        }
        Ok(
            selector_matches(&self.namespace_selector, namespace_labels)?
                && selector_matches(&self.object_selector, &pod["metadata"]["labels"])?,
        )
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// Whether one `rules[]` entry admits `CREATE` of core `v1` `pods` (namespaced).
pub fn rule_admits_pod_create(rule: &Value) -> bool {
    let lists = |field: &str, wanted: &[&str]| {
        rule[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|item| wanted.contains(&item))
    };
    // `pods`, `*`, `pods/*` and `*/*` name the pods themselves; `pods/status` does not.
    let resource = rule["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|item| {
            let (resource, subresource) = item.split_once('/').unwrap_or((item, ""));
            matches!(resource, "pods" | "*") && matches!(subresource, "" | "*")
        });
    let scope = matches!(
        rule["scope"].as_str(),
        None | Some("*") | Some("Namespaced")
    );
    lists("operations", &["CREATE", "*"])
        && lists("apiGroups", &["", "*"])
        && lists("apiVersions", &["v1", "*"])
        && resource
        && scope
}

/// Whether `labels` (a JSON map, or null for none) pass a `LabelSelector` (`matchLabels`
/// and `matchExpressions` with `In`, `NotIn`, `Exists`, `DoesNotExist`); an absent or empty
/// selector passes everything.
pub fn selector_matches(selector: &Value, labels: &Value) -> Result<bool, String> {
    let label = |key: &str| labels[key].as_str();
    if let Some(wanted) = selector["matchLabels"].as_object() {
        for (key, value) in wanted {
            if label(key) != value.as_str() || value.as_str().is_none() {
                return Ok(false);
            }
        }
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let operator = expression["operator"].as_str().unwrap_or_default();
        let holds = match operator {
            "In" if !values.is_empty() => label(key).is_some_and(|v| values.contains(&v)),
            "NotIn" if !values.is_empty() => label(key).is_none_or(|v| !values.contains(&v)),
            "Exists" if values.is_empty() => label(key).is_some(),
            "DoesNotExist" if values.is_empty() => label(key).is_none(),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {
                return Err(format!(
                    "a selector's {operator:?} expression on {key:?} has the wrong values"
                ));
            }
            other => return Err(format!("a selector has the unknown operator {other:?}")),
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the emulator knows of the request under review.
#[derive(Debug, Clone)]
pub struct PodCreate {
    /// The pod's namespace.
    pub namespace: String,
    /// The caller, as `authentication.k8s.io/v1` `UserInfo`.
    pub user: Value,
    /// `?dryRun=All`.
    pub dry_run: bool,
}

/// The `AdmissionReview` for a pod CREATE with request `uid`, about `pod` as it stands.
pub fn review_request(uid: &str, request: &PodCreate, pod: &Value) -> Value {
    let kind = json!({"group": "", "version": "v1", "kind": "Pod"});
    let resource = json!({"group": "", "version": "v1", "resource": "pods"});
    json!({
        "apiVersion": REVIEW_API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "namespace": request.namespace,
            "name": pod["metadata"]["name"].as_str().unwrap_or_default(),
            "operation": "CREATE",
            "userInfo": request.user,
            "object": pod,
            "oldObject": null,
            "dryRun": request.dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    })
}

/// What a webhook answered, once read.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Allowed, with the JSON patch operations it sent, if any.
    Allowed(Option<Value>),
    /// Denied: the status code (at least 400), the Status reason ("" for none) and the
    /// message the client gets.
    Denied {
        /// The HTTP status code.
        code: u16,
        /// The webhook's `status.reason`.
        reason: String,
        /// `admission webhook "NAME" denied the request: …`.
        message: String,
    },
}

/// Reads a webhook's answer to the review with `uid`; an `Err` is why it counts as a failed
/// call (not an AdmissionReview, another uid, a patch of the wrong type or not base64 JSON).
pub fn read_response(hook: &str, uid: &str, body: &[u8]) -> Result<Verdict, String> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|error| format!("received invalid webhook response: {error}"))?;
    let (api_version, kind) = (text(&review["apiVersion"]), text(&review["kind"]));
    if api_version != REVIEW_API_VERSION || kind != "AdmissionReview" {
        return Err(format!(
            "expected webhook response of {REVIEW_API_VERSION}, Kind=AdmissionReview, got \
             {api_version}, Kind={kind}"
        ));
    }
    let response = review
        .get("response")
        .filter(|r| r.is_object())
        .ok_or("webhook response was absent")?;
    let answered = text(&response["uid"]);
    if answered != uid {
        return Err(format!(
            "expected response.uid={uid:?}, got response.uid={answered:?}"
        ));
    }
    if response["allowed"].as_bool() != Some(true) {
        return Ok(denial(hook, &response["status"]));
    }
    let patch = text(&response["patch"]);
    let patch_type = response["patchType"].as_str();
    match patch_type {
        None | Some("JSONPatch") => {}
        Some(other) => {
            return Err(format!(
                "webhook returned invalid response.patchType {other:?}"
            ));
        }
    }
    if patch.is_empty() {
        return Ok(Verdict::Allowed(None));
    }
    if patch_type.is_none() {
        return Err("webhook returned response.patch but not response.patchType".into());
    }
    let bytes = BASE64.decode(patch.as_bytes()).map_err(|error| {
        format!("received invalid webhook response: patch is not base64: {error}")
    })?;
    let operations: Value = serde_json::from_slice(&bytes).map_err(|error| {
        format!("received invalid webhook response: patch is not JSON: {error}")
    })?;
    Ok(Verdict::Allowed(Some(operations)))
}

/// The denial of webhook `hook` with the answer's `status`.
fn denial(hook: &str, status: &Value) -> Verdict {
    let denied_by = format!("admission webhook {hook:?} denied the request");
    let (message, reason) = (text(&status["message"]), text(&status["reason"]));
    let message = match (message.is_empty(), reason.is_empty()) {
        (false, _) => format!("{denied_by}: {message}"),
        (true, false) => format!("{denied_by}: {reason}"),
        (true, true) => format!("{denied_by} without explanation"),
    };
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..=599).contains(c))
        .unwrap_or(400);
    Verdict::Denied {
        code,
        reason,
        message,
    }
}

/// `pod` with a webhook's JSON patch `operations` applied; an `Err` says why the patch is
/// unusable.
pub fn apply_mutation(pod: &Value, operations: &Value) -> Result<Value, String> {
    let mut patched = pod.clone();
    json_patch(&mut patched, operations)
        .map_err(|error| format!("the webhook's JSON patch cannot be applied: {error}"))?;
    if !patched.is_object() {
        return Err("the webhook's JSON patch leaves no object".into());
    }
    Ok(patched)
}

/// The API's defaults for each of a configuration's `webhooks[]`, applied on every write.
pub fn apply_defaults(configuration: &mut Value) {
    let Some(webhooks) = configuration["webhooks"].as_array_mut() else {
        return;
    };
    for webhook in webhooks.iter_mut().filter_map(Value::as_object_mut) {
        let defaults = [
            ("failurePolicy", json!("Fail")),
            ("matchPolicy", json!("Equivalent")),
            ("namespaceSelector", json!({})),
            ("objectSelector", json!({})),
            ("timeoutSeconds", json!(DEFAULT_TIMEOUT_SECONDS)),
            ("reinvocationPolicy", json!("Never")),
        ];
        for (field, value) in defaults {
            if webhook.get(field).is_none_or(Value::is_null) {
                webhook.insert(field.into(), value);
            }
        }
        for rule in webhook
            .get_mut("rules")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            rule.entry("scope").or_insert(json!("*"));
        }
        if let Some(service) = webhook
            .get_mut("clientConfig")
            .and_then(|c| c.get_mut("service"))
            .and_then(Value::as_object_mut)
        {
            service.entry("port").or_insert(json!(443));
        }
    }
}

/// The API's validation of a configuration, as the first problem's
/// `field.path: what is wrong`.
pub fn validate_configuration(configuration: &Value) -> Result<(), String> {
    let webhooks = match &configuration["webhooks"] {
        Value::Null => return Ok(()),
        Value::Array(webhooks) => webhooks,
        _ => return Err("webhooks: Invalid value: must be a list".into()),
    };
    let mut names = BTreeSet::new();
    for (i, webhook) in webhooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        let name = text(&webhook["name"]);
        if name.is_empty() {
            return Err(format!("{at}.name: Required value"));
        }
        if name.split('.').filter(|s| !s.is_empty()).count() < 3 {
            return Err(format!(
                "{at}.name: Invalid value: {name:?}: should be a domain with at least three \
                 segments separated by dots"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("{at}.name: Duplicate value: {name:?}"));
        }
        validate_client_config(&at, &webhook["clientConfig"])?;
        validate_settings(&at, webhook)?;
    }
    Ok(())
}

fn validate_client_config(at: &str, client: &Value) -> Result<(), String> {
    let service = &client["service"];
    match (client["url"].as_str(), service.is_object()) {
        (Some(url), false) => {
            if !url.starts_with("https://") {
                return Err(format!(
                    "{at}.clientConfig.url: Invalid value: {url:?}: 'https' is the only allowed \
                     URL scheme"
                ));
            }
        }
        (None, true) => {
            for field in ["namespace", "name"] {
                if text(&service[field]).is_empty() {
                    return Err(format!("{at}.clientConfig.service.{field}: Required value"));
                }
            }
            let port = service["port"].as_u64().unwrap_or(443);
            if !(1..=65535).contains(&port) {
                return Err(format!(
                    "{at}.clientConfig.service.port: Invalid value: {port}: port is not valid"
                ));
            }
        }
        _ => {
            return Err(format!(
                "{at}.clientConfig: Required value: exactly one of url or service is required"
            ));
        }
    }
    Ok(())
}

fn validate_settings(at: &str, webhook: &Value) -> Result<(), String> {
    let one_of = |field: &str, allowed: &[&str], required: bool| -> Result<(), String> {
        match webhook[field].as_str() {
            None if !required => Ok(()),
            Some(value) if allowed.contains(&value) => Ok(()),
            None => Err(format!(
                "{at}.{field}: Required value: must specify one of {}",
                allowed.join(", ")
            )),
            Some(value) => Err(format!(
                "{at}.{field}: Unsupported value: {value:?}: supported values: {allowed:?}"
            )),
        }
    };
    one_of("sideEffects", &["None", "NoneOnDryRun"], true)?;
    one_of("failurePolicy", &["Fail", "Ignore"], false)?;
    one_of("reinvocationPolicy", &["Never", "IfNeeded"], false)?;
    let versions = webhook["admissionReviewVersions"].as_array();
    if !versions.is_some_and(|v| v.iter().any(|v| v == "v1" || v == "v1beta1")) {
        return Err(format!(
            "{at}.admissionReviewVersions: Required value: must specify one of v1, v1beta1"
        ));
    }
    if let Some(seconds) = webhook.get("timeoutSeconds").filter(|t| !t.is_null())
        && !seconds
            .as_u64()
            .is_some_and(|s| (1..=MAX_TIMEOUT_SECONDS).contains(&s))
    {
        return Err(format!(
            "{at}.timeoutSeconds: Invalid value: {seconds}: the timeout value must be between \
             1 and {MAX_TIMEOUT_SECONDS} seconds"
        ));
    }
    for selector in ["namespaceSelector", "objectSelector"] {
        selector_matches(&webhook[selector], &Value::Object(Map::new()))
            .map_err(|error| format!("{at}.{selector}: Invalid value: {error}"))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hook(webhook: Value) -> Hook {
        Hook::from_json("config", &webhook)
    }

    fn pods_rule() -> Value {
        json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
               "resources": ["pods"]})
    }

    #[test]
    fn rules_admit_pod_creations_only() {
        let with = |field: &str, value: Value| {
            let mut rule = pods_rule();
            rule[field] = value;
            rule
        };
        let cases = [
            (pods_rule(), true),
            (with("operations", json!(["*"])), true),
            (with("operations", json!(["UPDATE", "DELETE"])), false),
            (with("apiGroups", json!(["*"])), true),
            (with("apiGroups", json!(["apps"])), false),
            (with("apiVersions", json!(["*"])), true),
            (with("apiVersions", json!(["v1beta1"])), false),
            (with("resources", json!(["*"])), true),
            (with("resources", json!(["*/*"])), true),
            (with("resources", json!(["pods/*"])), true),
            (with("resources", json!(["pods/status"])), false),
            (with("resources", json!(["deployments", "pods"])), true),
            (with("resources", json!(["deployments"])), false),
            (with("scope", json!("*")), true),
            (with("scope", json!("Namespaced")), true),
            (with("scope", json!("Cluster")), false),
            (json!({}), false),
        ];
        for (rule, want) in cases {
            assert_eq!(rule_admits_pod_create(&rule), want, "{rule}");
        }
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels = json!({"team": "a", "tier": "web"});
        let expression = |key: &str, operator: &str, values: Value| json!({"matchExpressions": [{"key": key, "operator": operator, "values": values}]});
        let cases = [
            (Value::Null, true),
            (json!({}), true),
            (json!({"matchLabels": {"team": "a"}}), true),
            (json!({"matchLabels": {"team": "a", "tier": "db"}}), false),
            (json!({"matchLabels": {"other": "a"}}), false),
            (expression("team", "In", json!(["a", "b"])), true),
            (expression("team", "In", json!(["b"])), false),
            (expression("other", "In", json!(["a"])), false),
            (expression("team", "NotIn", json!(["b"])), true),
            (expression("team", "NotIn", json!(["a"])), false),
            (expression("other", "NotIn", json!(["a"])), true),
            (expression("team", "Exists", json!([])), true),
            (expression("other", "Exists", Value::Null), false),
            (expression("other", "DoesNotExist", json!([])), true),
            (expression("team", "DoesNotExist", json!([])), false),
        ];
        for (selector, want) in cases {
            assert_eq!(selector_matches(&selector, &labels), Ok(want), "{selector}");
        }
        assert_eq!(selector_matches(&json!({}), &Value::Null), Ok(true));
        assert_eq!(
            selector_matches(&json!({"matchLabels": {"team": "a"}}), &Value::Null),
            Ok(false)
        );
        for bad in [
            expression("team", "In", json!([])),
            expression("team", "Exists", json!(["a"])),
            expression("team", "Near", json!(["a"])),
        ] {
            assert!(selector_matches(&bad, &labels).is_err(), "{bad}");
        }
    }

    #[test]
    fn webhooks_apply_by_rule_and_selectors() {
        let pod = json!({"metadata": {"name": "web", "labels": {"app": "web"}}});
        let namespace = json!({"kubernetes.io/metadata.name": "team-a"});
        let cases = [
            (json!({"rules": [pods_rule()]}), true),
            (json!({}), false),
            (
                json!({"rules": [pods_rule()], "namespaceSelector": {"matchLabels":
                    {"kubernetes.io/metadata.name": "team-b"}}}),
                false,
            ),
            (
                json!({"rules": [pods_rule()], "objectSelector": {"matchLabels": {"app": "web"}}}),
                true,
            ),
            (
                json!({"rules": [pods_rule()], "objectSelector": {"matchExpressions":
                    [{"key": "app", "operator": "NotIn", "values": ["web"]}]}}),
                false,
            ),
        ];
        for (webhook, want) in cases {
            assert_eq!(
                hook(webhook.clone()).applies_to_pod_create(&namespace, &pod),
                Ok(want),
                "{webhook}"
            );
        }
    }

    #[test]
    fn webhooks_read_their_client_config_and_policies() {
        let service = hook(json!({"name": "a.b.c", "clientConfig": {
            "service": {"namespace": "ns", "name": "hook"}, "caBundle": "Q0E="}}));
        assert_eq!(
            service.endpoint,
            Some(Endpoint::Service {
                namespace: "ns".into(),
                name: "hook".into(),
                port: 443,
                path: "/".into()
            })
        );
        assert_eq!(service.ca_bundle, "Q0E=");
        assert_eq!(service.failure_policy, FailurePolicy::Fail);
        assert_eq!(service.timeout, Duration::from_secs(10));
        let url = hook(json!({"clientConfig": {"url": "https://localhost:1/m"},
                              "failurePolicy": "Ignore", "timeoutSeconds": 99}));
        assert_eq!(
            url.endpoint,
            Some(Endpoint::Url("https://localhost:1/m".into()))
        );
        assert_eq!(url.failure_policy, FailurePolicy::Ignore);
        assert_eq!(url.timeout, Duration::from_secs(30));
        assert_eq!(hook(json!({})).endpoint, None);
        let configurations = [
            json!({"metadata": {"name": "b"}, "webhooks": [{"name": "b1"}]}),
            json!({"metadata": {"name": "a"}, "webhooks": [{"name": "a1"}, {"name": "a2"}]}),
        ];
        let names: Vec<String> = hooks(&configurations).into_iter().map(|h| h.name).collect();
        assert_eq!(names, ["a1", "a2", "b1"]);
    }

    #[test]
    fn the_review_names_the_pod_and_the_caller() {
        let request = PodCreate {
            namespace: "team-a".into(),
            user: json!({"username": "alice", "groups": ["devs"]}),
            dry_run: false,
        };
        let pod = json!({"metadata": {"generateName": "web-"}});
        let review = review_request("u-1", &request, &pod);
        let r = &review["request"];
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(r["uid"], "u-1");
        assert_eq!(
            r["kind"],
            json!({"group": "", "version": "v1", "kind": "Pod"})
        );
        assert_eq!(r["requestResource"]["resource"], "pods");
        assert_eq!(r["namespace"], "team-a");
        assert_eq!(r["name"], "");
        assert_eq!(r["operation"], "CREATE");
        assert_eq!(r["userInfo"]["username"], "alice");
        assert_eq!(r["object"], pod);
        assert_eq!(r["oldObject"], Value::Null);
        assert_eq!(r["dryRun"], false);
        assert_eq!(r["options"]["kind"], "CreateOptions");
    }

    fn answer(response: Value) -> Vec<u8> {
        json!({"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn responses_allow_patch_or_deny() {
        let ops = json!([{"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}]);
        let patch = BASE64.encode(ops.to_string());
        let read = |response: Value| read_response("w.x.y", "u-1", &answer(response));
        assert_eq!(
            read(json!({"uid": "u-1", "allowed": true})),
            Ok(Verdict::Allowed(None))
        );
        assert_eq!(
            read(json!({"uid": "u-1", "allowed": true, "patchType": "JSONPatch", "patch": patch})),
            Ok(Verdict::Allowed(Some(ops)))
        );
        let denied =
            |status: Value| read(json!({"uid": "u-1", "allowed": false, "status": status}));
        let prefix = "admission webhook \"w.x.y\" denied the request";
        let cases = [
            (
                json!({"code": 403, "reason": "Forbidden", "message": "no"}),
                403,
                "Forbidden",
                format!("{prefix}: no"),
            ),
            (
                json!({"reason": "NotAllowed"}),
                400,
                "NotAllowed",
                format!("{prefix}: NotAllowed"),
            ),
            (
                json!({"code": 200}),
                400,
                "",
                format!("{prefix} without explanation"),
            ),
            (
                Value::Null,
                400,
                "",
                format!("{prefix} without explanation"),
            ),
        ];
        for (status, code, reason, message) in cases {
            assert_eq!(
                denied(status.clone()),
                Ok(Verdict::Denied {
                    code,
                    reason: reason.into(),
                    message
                }),
                "{status}"
            );
        }
    }

    #[test]
    fn unusable_responses_are_failed_calls() {
        let read = |body: &[u8]| read_response("w.x.y", "u-1", body);
        let cases: [(Vec<u8>, &str); 7] = [
            (b"not json".to_vec(), "invalid webhook response"),
            (
                json!({"apiVersion": "v1", "kind": "Status"})
                    .to_string()
                    .into_bytes(),
                "Kind=AdmissionReview, got v1, Kind=Status",
            ),
            (
                json!({"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview"})
                    .to_string()
                    .into_bytes(),
                "webhook response was absent",
            ),
            (
                answer(json!({"uid": "u-2", "allowed": true})),
                "expected response.uid=\"u-1\", got response.uid=\"u-2\"",
            ),
            (
                answer(json!({"uid": "u-1", "allowed": true, "patch": "W10="})),
                "but not response.patchType",
            ),
            (
                answer(
                    json!({"uid": "u-1", "allowed": true, "patchType": "Merge", "patch": "e30="}),
                ),
                "invalid response.patchType",
            ),
            (
                answer(
                    json!({"uid": "u-1", "allowed": true, "patchType": "JSONPatch", "patch": "%%"}),
                ),
                "not base64",
            ),
        ];
        for (body, want) in cases {
            let error = read(&body).unwrap_err();
            assert!(error.contains(want), "{error:?} lacks {want:?}");
        }
    }

    #[test]
    fn mutations_apply_json_patches() {
        let pod = json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app"}]}});
        let ops = json!([
            {"op": "add", "path": "/spec/containers/0/env", "value": [{"name": "A", "value": "1"}]},
            {"op": "add", "path": "/spec/volumes", "value": []},
            {"op": "add", "path": "/spec/volumes/-", "value": {"name": "v", "emptyDir": {}}},
            {"op": "add", "path": "/metadata/annotations", "value": {"a~b/c": "x"}},
            {"op": "test", "path": "/metadata/annotations/a~0b~1c", "value": "x"},
        ]);
        let patched = apply_mutation(&pod, &ops).unwrap();
        assert_eq!(patched["spec"]["containers"][0]["env"][0]["name"], "A");
        assert_eq!(patched["spec"]["volumes"][0]["name"], "v");
        let missing = json!([{"op": "replace", "path": "/spec/nothing/x", "value": 1}]);
        assert!(apply_mutation(&pod, &missing).is_err());
        let failing_test = json!([{"op": "test", "path": "/metadata/name", "value": "db"}]);
        assert!(apply_mutation(&pod, &failing_test).is_err());
        assert!(apply_mutation(&pod, &json!({"op": "add"})).is_err());
    }

    fn valid_webhook() -> Value {
        json!({"name": "inject.podiam.test", "sideEffects": "None",
               "admissionReviewVersions": ["v1"],
               "clientConfig": {"service": {"namespace": "ns", "name": "hook"}},
               "rules": [pods_rule()]})
    }

    #[test]
    fn configurations_are_defaulted_and_validated() {
        let mut configuration = json!({"webhooks": [valid_webhook()]});
        apply_defaults(&mut configuration);
        let webhook = &configuration["webhooks"][0];
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["timeoutSeconds"], 10);
        assert_eq!(webhook["namespaceSelector"], json!({}));
        assert_eq!(webhook["rules"][0]["scope"], "*");
        assert_eq!(webhook["clientConfig"]["service"]["port"], 443);
        assert_eq!(validate_configuration(&configuration), Ok(()));
        assert_eq!(validate_configuration(&json!({})), Ok(()));
        let broken = |field: &str, value: Value| {
            let mut webhook = valid_webhook();
            webhook[field] = value;
            validate_configuration(&json!({"webhooks": [webhook]})).unwrap_err()
        };
        let cases = [
            (
                broken("name", json!("inject")),
                "webhooks[0].name: Invalid value",
            ),
            (
                broken("sideEffects", Value::Null),
                "webhooks[0].sideEffects: Required value",
            ),
            (
                broken("sideEffects", json!("Some")),
                "webhooks[0].sideEffects: Unsupported",
            ),
            (
                broken("admissionReviewVersions", json!(["v2"])),
                "admissionReviewVersions",
            ),
            (
                broken("timeoutSeconds", json!(31)),
                "webhooks[0].timeoutSeconds",
            ),
            (
                broken("failurePolicy", json!("Maybe")),
                "webhooks[0].failurePolicy",
            ),
            (
                broken("clientConfig", json!({})),
                "exactly one of url or service",
            ),
            (
                broken("clientConfig", json!({"url": "http://x.y"})),
                "'https' is the only allowed URL scheme",
            ),
            (
                broken(
                    "objectSelector",
                    json!({"matchExpressions": [{"key": "a", "operator": "In"}]}),
                ),
                "webhooks[0].objectSelector: Invalid value",
            ),
        ];
        for (error, want) in cases {
            assert!(error.contains(want), "{error:?} lacks {want:?}");
        }
        let twice = json!({"webhooks": [valid_webhook(), valid_webhook()]});
        assert!(
            validate_configuration(&twice)
                .unwrap_err()
                .starts_with("webhooks[1].name: Duplicate value")
        );
    }
}
