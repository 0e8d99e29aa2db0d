//! What a pod's STS session is called and tagged with.
//!
//! The session name comes from `--session-name`: a literal (the default `podiam`: pods
//! sharing a role share one session and one AssumeRole), or a template with `{namespace}`,
//! `{pod}`, `{uid}` and `{service-account}` placeholders (per-pod names, so CloudTrail names
//! the pod — at the price of one AssumeRole per pod).
//!
//! A pod's `iam.amazonaws.com/session-name` annotation names its session only under a
//! literal, where names identify no pod anyway (kube2iam's behaviour). Under a template it
//! is ignored: the operator chose names that say which pod acted, and a pod must not be able
//! to act under another pod's name (`team-b.pod-c` from team-a's pod). Forcing the
//! annotation under the namespace would still let a pod take a neighbour's name in its own
//! namespace, so it is not used at all.
//!
//! Names are made valid for STS (2–64 of `[\w+=,.@-]`): other characters become `-` and
//! long names are cut. `--session-tags` adds the pod's identity as session tags, which also
//! makes every session a pod's own. The tags are EKS Pod Identity's, by the same names, so
//! that policies written for it (`aws:PrincipalTag/kubernetes-namespace`…) hold:
//! `kubernetes-namespace`, `kubernetes-service-account`, `kubernetes-pod-name`,
//! `kubernetes-pod-uid`, and `eks-cluster-name` when `--cluster-name` is given.
//! `--session-tags-transitive` makes them transitive (kept through role chaining).

use crate::index::PodRecord;

/// The placeholders a session-name template may use.
const PLACEHOLDERS: [&str; 4] = ["{namespace}", "{pod}", "{uid}", "{service-account}"];

/// The longest role session name STS accepts.
const MAX_SESSION_NAME: usize = 64;

/// How sessions are named and tagged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionNaming {
    template: String,
    /// Whether the template has a placeholder: names are then the template's alone.
    per_pod: bool,
    tags: bool,
    /// The cluster's name, tagged as `eks-cluster-name` (with tags).
    cluster: Option<String>,
    /// Tags are transitive.
    transitive: bool,
}

impl SessionNaming {
    /// Checks the template: only known placeholders, and literal text STS accepts.
    pub fn new(template: &str, tags: bool) -> Result<SessionNaming, String> {
        let mut literal = template.to_string();
        for placeholder in PLACEHOLDERS {
            literal = literal.replace(placeholder, "");
        }
        if literal.contains(['{', '}']) {
            return Err(format!(
                "{template:?} has an unknown placeholder; known: {}",
                PLACEHOLDERS.join(" ")
            ));
        }
        if let Some(bad) = literal.chars().find(|c| !valid_char(*c)) {
            return Err(format!(
                "{template:?} contains {bad:?}; session names allow [A-Za-z0-9_+=,.@-]"
            ));
        }
        if template.len() < 2 || (literal == template && template.len() > MAX_SESSION_NAME) {
            return Err(format!(
                "{template:?} is not 2 to {MAX_SESSION_NAME} characters long"
            ));
        }
        Ok(SessionNaming {
            template: template.to_string(),
            per_pod: literal != template,
            tags,
            cluster: None,
            transitive: false,
        })
    }

    /// Tags also `eks-cluster-name` = `cluster` (when given), and makes the tags transitive
    /// when `transitive`.
    pub fn with_tag_options(self, cluster: Option<String>, transitive: bool) -> SessionNaming {
        SessionNaming {
            cluster,
            transitive,
            ..self
        }
    }

    /// Whether the tags are to be transitive.
    pub fn transitive(&self) -> bool {
        self.tags && self.transitive
    }

    /// The session name for `pod`: the template filled in; under a literal, the pod's
    /// annotation if it has one.
    pub fn name_for(&self, pod: &PodRecord) -> String {
        let annotated = pod
            .session_name
            .as_deref()
            .map(str::trim)
            .filter(|name| !name.is_empty() && !self.per_pod);
        let raw = match annotated {
            Some(annotated) => annotated.to_string(),
            None => self
                .template
                .replace("{namespace}", &pod.namespace)
                .replace("{pod}", &pod.name)
                .replace("{uid}", &pod.uid)
                .replace(
                    "{service-account}",
                    pod.service_account.as_deref().unwrap_or("default"),
                ),
        };
        sanitise(&raw)
    }

    /// The session tags for `pod` (none unless `--session-tags`).
    pub fn tags_for(&self, pod: &PodRecord) -> Vec<(String, String)> {
        if !self.tags {
            return Vec::new();
        }
        let mut tags = vec![
            ("kubernetes-namespace".into(), pod.namespace.clone()),
            ("kubernetes-pod-name".into(), pod.name.clone()),
            ("kubernetes-pod-uid".into(), pod.uid.clone()),
            (
                "kubernetes-service-account".into(),
                pod.service_account
                    .as_deref()
                    .unwrap_or("default")
                    .to_string(),
            ),
        ];
        if let Some(cluster) = &self.cluster {
            tags.push(("eks-cluster-name".into(), cluster.clone()));
        }
        tags
    }
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// A valid STS session name made from `raw`.
fn sanitise(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| if valid_char(c) { c } else { '-' })
        .take(MAX_SESSION_NAME)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(session_name: Option<&str>) -> PodRecord {
        PodRecord {
            uid: "0b5e-11".into(),
            namespace: "team-a".into(),
            name: "web-7f9c".into(),
            ip: Some([10, 0, 0, 1].into()),
            more_ips: Vec::new(),
            phase: Some("Running".into()),
            host_network: false,
            node_name: Some("node-1".into()),
            service_account: Some("web".into()),
            role: Some("app".into()),
            external_id: None,
            session_name: session_name.map(Into::into),
            deleting: false,
            container_endpoint: false,
            mirror: false,
        }
    }

    #[test]
    fn names_come_from_the_annotation_or_the_template() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("podiam", None, "podiam"),
            ("podiam", Some("batch-42"), "batch-42"),
            ("{namespace}.{pod}", None, "team-a.web-7f9c"),
            ("{service-account}@{namespace}", None, "web@team-a"),
            ("pod-{uid}", None, "pod-0b5e-11"),
            // Annotations are made valid too.
            ("podiam", Some("my session/1"), "my-session-1"),
            ("podiam", Some("x"), "x-"),
            ("podiam", Some("   "), "podiam"),
            // With a per-pod template the operator decides what CloudTrail shows: a pod's
            // annotation cannot name it after another pod, in its namespace or any other.
            ("{namespace}.{pod}", Some("team-b.pod-c"), "team-a.web-7f9c"),
            ("{namespace}.{pod}", Some("team-a.db-0"), "team-a.web-7f9c"),
            ("{namespace}.{pod}", Some("batch-42"), "team-a.web-7f9c"),
            ("pod-{uid}", Some("pod-0b5e-12"), "pod-0b5e-11"),
            (
                "{service-account}@{namespace}",
                Some("admin@team-b"),
                "web@team-a",
            ),
            ("x-{pod}", Some("x-web-7f9c"), "x-web-7f9c"),
        ];
        for (template, annotation, want) in cases {
            let naming = SessionNaming::new(template, false).expect("valid template");
            assert_eq!(
                naming.name_for(&pod(*annotation)),
                *want,
                "{template} {annotation:?}"
            );
        }
        let long = SessionNaming::new("{pod}-{pod}-{pod}-{pod}-{pod}-{pod}-{pod}-{pod}", false)
            .expect("valid");
        assert_eq!(long.name_for(&pod(None)).len(), 64);
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in ["{name}", "a b", "x", "{pod", &"a".repeat(65)] {
            assert!(SessionNaming::new(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_only_when_asked() {
        assert!(
            SessionNaming::new("podiam", false)
                .unwrap_or_else(|e| panic!("{e}"))
                .tags_for(&pod(None))
                .is_empty()
        );
        let tags = SessionNaming::new("podiam", true)
            .unwrap_or_else(|e| panic!("{e}"))
            .tags_for(&pod(None));
        assert_eq!(
            tags,
            [
                ("kubernetes-namespace".to_string(), "team-a".to_string()),
                ("kubernetes-pod-name".into(), "web-7f9c".into()),
                ("kubernetes-pod-uid".into(), "0b5e-11".into()),
                ("kubernetes-service-account".into(), "web".into()),
            ]
        );
        let naming = SessionNaming::new("podiam", true)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_tag_options(Some("prod-eu".into()), true);
        let tags = naming.tags_for(&pod(None));
        assert_eq!(tags.len(), 5);
        assert_eq!(tags[4], ("eks-cluster-name".into(), "prod-eu".into()));
        assert!(naming.transitive());
        // Without tags, nothing is transitive.
        let untagged = SessionNaming::new("podiam", false)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_tag_options(Some("prod-eu".into()), true);
        assert!(untagged.tags_for(&pod(None)).is_empty() && !untagged.transitive());
    }
}
