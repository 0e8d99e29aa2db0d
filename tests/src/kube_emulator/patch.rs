//! The three PATCH flavours the apiserver accepts for built-in types, as pure functions over
//! `serde_json::Value`:
//!
//! - JSON merge patch (RFC 7386, `application/merge-patch+json`): what `kubectl annotate`
//!   and `kubectl label` send.
//! - Strategic merge patch (`application/strategic-merge-patch+json`): `kubectl patch`'s
//!   default. Simplified: maps merge and `null` deletes as in a merge patch; lists whose field
//!   name has a well-known merge key in the pod API (`containers`/`volumes`/`env`… by `name`,
//!   `conditions` by `type`, `ownerReferences` by `uid`, …, see [`merge_key_for`]) merge
//!   element-wise by that key, other lists are replaced, and `finalizers` are unioned.
//!   Directives: `$patch: replace|delete` on maps and list elements, `$retainKeys`,
//!   `$deleteFromPrimitiveList/<field>`; `$setElementOrder/<field>` is accepted and ignored
//!   (merged lists keep the existing order and append new elements).
//! - JSON patch (RFC 6902, `application/json-patch+json`): add, remove, replace, move,
//!   copy, test.
//!
//! Server-side apply (`application/apply-patch+yaml`) is not supported.

use serde_json::{Map, Value};

/// The PATCH flavour, from the request's Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    StrategicMerge,
    /// `application/json-patch+json`
    Json,
}

impl PatchType {
    /// The flavour named by a Content-Type header value (parameters ignored).
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media.to_ascii_lowercase().as_str() {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/json-patch+json" => Some(PatchType::Json),
            _ => None,
        }
    }

    /// The media type string of this flavour.
    pub fn media_type(self) -> &'static str {
        match self {
            PatchType::Merge => "application/merge-patch+json",
            PatchType::StrategicMerge => "application/strategic-merge-patch+json",
            PatchType::Json => "application/json-patch+json",
        }
    }
}

/// A patch that could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    /// The patch document has the wrong shape for its flavour.
    #[error("invalid patch: {0}")]
    Malformed(String),
    /// A JSON patch operation named a path that does not exist.
    #[error("path {0:?} does not exist")]
    MissingPath(String),
    /// A JSON patch `test` operation did not hold.
    #[error("test operation at {0:?} failed")]
    TestFailed(String),
}

/// Applies a patch of the given flavour to a copy of `target`.
pub fn apply_patch(
    patch_type: PatchType,
    target: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let mut result = target.clone();
    match patch_type {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(PatchError::Malformed(
                    "a merge patch must be a JSON object".into(),
                ));
            }
            merge_patch(&mut result, patch);
        }
        PatchType::StrategicMerge => {
            if !patch.is_object() {
                return Err(PatchError::Malformed(
                    "a strategic merge patch must be a JSON object".into(),
                ));
            }
            strategic_merge_patch(&mut result, patch);
        }
        PatchType::Json => json_patch(&mut result, patch)?,
    }
    Ok(result)
}

/// RFC 7386 JSON merge patch, in place.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The merge key of a list field in the core/v1 pod, event and service account types (and
/// a webhook configuration's `webhooks`), if the list merges element-wise under a strategic
/// merge patch.
pub fn merge_key_for(field: &str) -> Option<&'static str> {
    match field {
        "webhooks"
        | "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "secrets"
        | "resourceClaims" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "ports" => Some("containerPort"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        "hostAliases" | "podIPs" | "hostIPs" => Some("ip"),
        "readinessGates" => Some("conditionType"),
        _ => None,
    }
}

/// Fields that hold lists of scalars merged as sets.
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const RETAIN_KEYS: &str = "$retainKeys";
const PATCH_DIRECTIVE: &str = "$patch";

/// Removes every `$…` directive key from a patch fragment that is stored as-is.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|item| item.get(PATCH_DIRECTIVE).is_none())
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Strategic merge patch (simplified, see the module docs), in place.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = strip_directives(patch);
        return;
    };
    match patch_map.get(PATCH_DIRECTIVE).and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (key, value) in patch_map {
        if key == PATCH_DIRECTIVE || key == RETAIN_KEYS || key.starts_with(SET_ELEMENT_ORDER) {
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
            if let (Some(Value::Array(existing)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                existing.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if value.is_null() || value.get(PATCH_DIRECTIVE).and_then(Value::as_str) == Some("delete") {
            target_map.remove(key);
            continue;
        }
        match value {
            Value::Object(_) => {
                strategic_merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value)
            }
            Value::Array(items) => {
                let existing = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_list(key, existing, items);
            }
            scalar => {
                target_map.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let Some(Value::Array(retain)) = patch_map.get(RETAIN_KEYS) {
        target_map.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
}

/// Merges a patch list into the list stored under `field`.
fn merge_list(field: &str, existing: &mut Value, items: &[Value]) {
    let replace_whole = items
        .iter()
        .any(|item| item.get(PATCH_DIRECTIVE).and_then(Value::as_str) == Some("replace"));
    let Value::Array(current) = existing else {
        *existing = strip_directives(&Value::Array(items.to_vec()));
        return;
    };
    if replace_whole {
        *existing = strip_directives(&Value::Array(items.to_vec()));
        return;
    }
    if is_set_list(field) {
        for item in items {
            if !current.contains(item) {
                current.push(item.clone());
            }
        }
        return;
    }
    let Some(merge_key) = merge_key_for(field) else {
        *existing = strip_directives(&Value::Array(items.to_vec()));
        return;
    };
    for item in items {
        let key_value = item.get(merge_key);
        let position = key_value.and_then(|kv| {
            current
                .iter()
                .position(|element| element.get(merge_key) == Some(kv))
        });
        let delete = item.get(PATCH_DIRECTIVE).and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                current.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge_patch(&mut current[i], item),
            (None, false) => current.push(strip_directives(item)),
        }
    }
}

/// Splits an RFC 6901 JSON pointer into unescaped reference tokens.
fn pointer_tokens(pointer: &str) -> Result<Vec<String>, PatchError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Malformed(format!("path {pointer:?} must start with /")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// The container that holds the last token of `tokens`, and that token.
fn parent_of<'a>(
    root: &'a mut Value,
    tokens: &[String],
    pointer: &str,
) -> Result<(&'a mut Value, String), PatchError> {
    let (last, parents) = tokens
        .split_last()
        .ok_or_else(|| PatchError::Malformed(format!("path {pointer:?} names the root")))?;
    let mut node = root;
    for token in parents {
        node = match node {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| PatchError::MissingPath(pointer.to_string()))?;
    }
    Ok((node, last.clone()))
}

fn get_pointer<'a>(root: &'a Value, pointer: &str) -> Result<&'a Value, PatchError> {
    let missing = || PatchError::MissingPath(pointer.to_string());
    pointer_tokens(pointer)?
        .iter()
        .try_fold(root, |node, token| match node {
            Value::Object(map) => map.get(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
        .ok_or_else(missing)
}

fn add_at(root: &mut Value, pointer: &str, value: Value) -> Result<(), PatchError> {
    let tokens = pointer_tokens(pointer)?;
    if tokens.is_empty() {
        *root = value;
        return Ok(());
    }
    let (parent, last) = parent_of(root, &tokens, pointer)?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| PatchError::MissingPath(pointer.to_string()))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(PatchError::MissingPath(pointer.to_string())),
    }
}

fn remove_at(root: &mut Value, pointer: &str) -> Result<Value, PatchError> {
    let tokens = pointer_tokens(pointer)?;
    let (parent, last) = parent_of(root, &tokens, pointer)?;
    let removed = match parent {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => last
            .parse::<usize>()
            .ok()
            .filter(|i| *i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| PatchError::MissingPath(pointer.to_string()))
}

/// RFC 6902 JSON patch, in place. On error `target` may be partly patched; callers apply
/// it to a copy (see [`apply_patch`]).
pub fn json_patch(target: &mut Value, operations: &Value) -> Result<(), PatchError> {
    let operations = operations
        .as_array()
        .ok_or_else(|| PatchError::Malformed("a JSON patch must be an array".into()))?;
    for operation in operations {
        let field = |name: &str| {
            operation
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("operation without {name:?}")))
        };
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| PatchError::Malformed("operation without \"value\"".into()))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => add_at(target, path, value()?)?,
            "remove" => {
                remove_at(target, path)?;
            }
            "replace" => {
                remove_at(target, path)?;
                add_at(target, path, value()?)?;
            }
            "move" => {
                let moved = remove_at(target, field("from")?)?;
                add_at(target, path, moved)?;
            }
            "copy" => {
                let copied = get_pointer(target, field("from")?)?.clone();
                add_at(target, path, copied)?;
            }
            "test" => {
                if *get_pointer(target, path)? != value()? {
                    return Err(PatchError::TestFailed(path.to_string()));
                }
            }
            other => {
                return Err(PatchError::Malformed(format!(
                    "unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386_examples() {
        // The examples of RFC 7386 appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, want, "{target} + {patch}");
        }
    }

    #[test]
    fn kubectl_annotate_patches_add_and_remove_annotations() {
        let pod = json!({"metadata": {"name": "web", "annotations": {"a": "1"}}});
        let added = apply_patch(
            PatchType::Merge,
            &pod,
            &json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "r"}}}),
        )
        .unwrap();
        assert_eq!(
            added["metadata"]["annotations"],
            json!({"a": "1", "iam.amazonaws.com/role": "r"})
        );
        let removed = apply_patch(
            PatchType::Merge,
            &added,
            &json!({"metadata": {"annotations": {"iam.amazonaws.com/role": null}}}),
        )
        .unwrap();
        assert_eq!(removed, pod);
        assert!(apply_patch(PatchType::Merge, &pod, &json!([1])).is_err());
    }

    #[test]
    fn strategic_merge_patch_cases() {
        let pod = json!({
            "metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {
                "containers": [
                    {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "side:1"}
                ],
                "tolerations": [{"key": "k1"}],
                "nodeSelector": {"zone": "a", "disk": "ssd"}
            }
        });
        let cases = [
            (
                "maps merge and null deletes",
                json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
                json!({"b": "2", "c": "3"}),
                "/metadata/labels",
            ),
            (
                "containers merge by name",
                json!({"spec": {"containers": [{"name": "app", "image": "app:2"}]}}),
                json!([
                    {"name": "app", "image": "app:2", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "side:1"}
                ]),
                "/spec/containers",
            ),
            (
                "new element is appended, $setElementOrder ignored",
                json!({"spec": {"$setElementOrder/containers": [{"name": "app"}],
                                "containers": [{"name": "new", "image": "n"}]}}),
                json!([
                    {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "side:1"},
                    {"name": "new", "image": "n"}
                ]),
                "/spec/containers",
            ),
            (
                "$patch delete removes a list element",
                json!({"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}),
                json!([{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]}]),
                "/spec/containers",
            ),
            (
                "lists without merge key are replaced",
                json!({"spec": {"tolerations": [{"key": "k2"}]}}),
                json!([{"key": "k2"}]),
                "/spec/tolerations",
            ),
            (
                "finalizers are unioned",
                json!({"metadata": {"finalizers": ["y", "x"]}}),
                json!(["x", "y"]),
                "/metadata/finalizers",
            ),
            (
                "$deleteFromPrimitiveList",
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
                json!([]),
                "/metadata/finalizers",
            ),
            (
                "$patch replace on a map",
                json!({"spec": {"nodeSelector": {"$patch": "replace", "zone": "b"}}}),
                json!({"zone": "b"}),
                "/spec/nodeSelector",
            ),
            (
                "$retainKeys drops other keys",
                json!({"spec": {"nodeSelector": {"$retainKeys": ["zone"], "zone": "c"}}}),
                json!({"zone": "c"}),
                "/spec/nodeSelector",
            ),
        ];
        for (name, patch, want, pointer) in cases {
            let got = apply_patch(PatchType::StrategicMerge, &pod, &patch).unwrap();
            assert_eq!(got.pointer(pointer), Some(&want), "{name}");
        }
    }

    #[test]
    fn json_patch_operations() {
        let doc = json!({"metadata": {"annotations": {"a/b": "1"}}, "list": [1, 2]});
        let cases: [(&str, Value, Result<Value, PatchError>); 9] = [
            (
                "add key with escaped slash",
                json!([{"op": "add", "path": "/metadata/annotations/c~1d", "value": "2"}]),
                Ok(json!({"metadata": {"annotations": {"a/b": "1", "c/d": "2"}}, "list": [1, 2]})),
            ),
            (
                "remove",
                json!([{"op": "remove", "path": "/metadata/annotations/a~1b"}]),
                Ok(json!({"metadata": {"annotations": {}}, "list": [1, 2]})),
            ),
            (
                "replace",
                json!([{"op": "replace", "path": "/list/0", "value": 9}]),
                Ok(json!({"metadata": {"annotations": {"a/b": "1"}}, "list": [9, 2]})),
            ),
            (
                "append with -",
                json!([{"op": "add", "path": "/list/-", "value": 3}]),
                Ok(json!({"metadata": {"annotations": {"a/b": "1"}}, "list": [1, 2, 3]})),
            ),
            (
                "move",
                json!([{"op": "move", "from": "/list", "path": "/moved"}]),
                Ok(json!({"metadata": {"annotations": {"a/b": "1"}}, "moved": [1, 2]})),
            ),
            (
                "test passes",
                json!([{"op": "test", "path": "/list/1", "value": 2}]),
                Ok(doc.clone()),
            ),
            (
                "test fails",
                json!([{"op": "test", "path": "/list/1", "value": 3}]),
                Err(PatchError::TestFailed("/list/1".into())),
            ),
            (
                "remove missing",
                json!([{"op": "remove", "path": "/nope"}]),
                Err(PatchError::MissingPath("/nope".into())),
            ),
            (
                "replace missing",
                json!([{"op": "replace", "path": "/a/b", "value": 1}]),
                Err(PatchError::MissingPath("/a/b".into())),
            ),
        ];
        for (name, ops, want) in cases {
            assert_eq!(apply_patch(PatchType::Json, &doc, &ops), want, "{name}");
        }
        assert!(matches!(
            apply_patch(PatchType::Json, &doc, &json!({"op": "add"})),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn content_types_select_the_flavour() {
        let cases = [
            ("application/merge-patch+json", Some(PatchType::Merge)),
            (
                "application/strategic-merge-patch+json; charset=utf-8",
                Some(PatchType::StrategicMerge),
            ),
            ("application/json-patch+json", Some(PatchType::Json)),
            ("application/apply-patch+yaml", None),
            ("application/json", None),
        ];
        for (content_type, want) in cases {
            assert_eq!(
                PatchType::from_content_type(content_type),
                want,
                "{content_type}"
            );
        }
    }
}
