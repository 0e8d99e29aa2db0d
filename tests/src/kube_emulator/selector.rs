//! Label and field selectors: parsing the query-string forms and matching them against
//! objects. Pure functions.
//!
//! Label selectors support `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)` and `k notin (a,b)`
//! (the set-based forms `kubectl -l` accepts; `gt`/`lt` are not supported). As in the
//! apiserver, `k!=v` and `k notin (…)` also match objects without the label.
//!
//! Field selectors support `path=v`, `path==v` and `path!=v` over any dotted field path
//! (the apiserver allows only a per-kind list; the emulator is more lenient). Values are
//! compared as strings: booleans and numbers print as JSON does, a missing field is `""`,
//! except `spec.hostNetwork`, which defaults to `false` as in the apiserver's pod field set.

use std::collections::BTreeMap;

use serde_json::Value;

/// A selector that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// One condition on a label.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector: all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<(String, LabelOp)>,
}

/// Splits `text` on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_value_set(text: &str) -> Result<Vec<String>, SelectorError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| SelectorError(format!("expected (values) in {text:?}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn parse_label_requirement(term: &str) -> Result<(String, LabelOp), SelectorError> {
    let term = term.trim();
    let bad = || SelectorError(term.to_string());
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return valid_label_key(key)
            .then(|| (key.to_string(), LabelOp::DoesNotExist))
            .ok_or_else(bad);
    }
    if let Some(open) = term.find('(') {
        let mut words = term[..open].split_whitespace();
        let (key, op) = (words.next().ok_or_else(bad)?, words.next().ok_or_else(bad)?);
        if words.next().is_some() || !valid_label_key(key) {
            return Err(bad());
        }
        let values = parse_value_set(&term[open..])?;
        let op = match op {
            "in" => LabelOp::In(values),
            "notin" => LabelOp::NotIn(values),
            _ => return Err(bad()),
        };
        return Ok((key.to_string(), op));
    }
    let (key, op) = if let Some((k, v)) = term.split_once("!=") {
        (k, LabelOp::NotEquals(v.trim().to_string()))
    } else if let Some((k, v)) = term.split_once("==") {
        (k, LabelOp::Equals(v.trim().to_string()))
    } else if let Some((k, v)) = term.split_once('=') {
        (k, LabelOp::Equals(v.trim().to_string()))
    } else {
        (term, LabelOp::Exists)
    };
    let key = key.trim();
    valid_label_key(key)
        .then(|| (key.to_string(), op))
        .ok_or_else(bad)
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter. An empty string selects everything.
    pub fn parse(text: &str) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for term in split_top_level(text) {
            requirements.push(parse_label_requirement(term)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let value = labels.get(key);
            match op {
                LabelOp::Equals(v) => value == Some(v),
                LabelOp::NotEquals(v) => value != Some(v),
                LabelOp::In(vs) => value.is_some_and(|x| vs.contains(x)),
                LabelOp::NotIn(vs) => value.is_none_or(|x| !vs.contains(x)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
            }
        })
    }

    /// Whether the object's `metadata.labels` satisfy the selector.
    pub fn matches(&self, object: &Value) -> bool {
        if self.requirements.is_empty() {
            return true;
        }
        let labels = object["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        self.matches_labels(&labels)
    }
}

/// A parsed field selector: all terms must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    /// (field path, wanted value, true for `=`/`==`, false for `!=`)
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter. An empty string selects everything.
    pub fn parse(text: &str) -> Result<FieldSelector, SelectorError> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, v, true)
            } else {
                return Err(SelectorError(format!(
                    "{term}: field selectors need =, == or !="
                )));
            };
            let path = path.trim();
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(SelectorError(term.to_string()));
            }
            terms.push((path.to_string(), value.trim().to_string(), equal));
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the object satisfies every term.
    pub fn matches(&self, object: &Value) -> bool {
        self.terms
            .iter()
            .all(|(path, want, equal)| (field_value(object, path) == *want) == *equal)
    }
}

/// The string value of a dotted field path, as field selectors compare it.
pub fn field_value(object: &Value, path: &str) -> String {
    let found = path
        .split('.')
        .try_fold(object, |node, part| node.get(part));
    match found {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None if path == "spec.hostNetwork" => "false".to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "team-a",
                         "labels": {"app": "web", "tier": "front"}},
            "spec": {"nodeName": "node-1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5"},
        })
    }

    #[test]
    fn label_selectors_match_like_the_apiserver() {
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("app in (db, web)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("missing notin (db)", true),
            ("missing in (db)", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web,db),tier", true),
        ];
        for (selector, want) in cases {
            let parsed = LabelSelector::parse(selector).expect(selector);
            assert_eq!(parsed.matches(&pod()), want, "{selector}");
        }
    }

    #[test]
    fn bad_label_selectors_are_rejected() {
        for selector in ["app in web", "a b=c", "=x", "!", "app in (x", "k foo (x)"] {
            assert!(LabelSelector::parse(selector).is_err(), "{selector}");
        }
    }

    #[test]
    fn field_selectors_match_fields() {
        let cases = [
            ("", true),
            ("metadata.name=web", true),
            ("metadata.name==web", true),
            ("metadata.name!=web", false),
            ("metadata.namespace=team-a,status.phase=Running", true),
            ("spec.nodeName=node-2", false),
            ("status.podIP=10.0.0.5", true),
            ("spec.hostNetwork=false", true),
            ("spec.hostNetwork!=true", true),
            ("status.nominatedNodeName=", true),
        ];
        for (selector, want) in cases {
            let parsed = FieldSelector::parse(selector).expect(selector);
            assert_eq!(parsed.matches(&pod()), want, "{selector}");
        }
        let host = json!({"spec": {"hostNetwork": true}});
        assert!(
            FieldSelector::parse("spec.hostNetwork=true")
                .unwrap()
                .matches(&host)
        );
    }

    #[test]
    fn bad_field_selectors_are_rejected() {
        for selector in ["metadata.name", "=web", "metadata..name=x"] {
            assert!(FieldSelector::parse(selector).is_err(), "{selector}");
        }
    }
}
