//! `kubectl iam explain POD`: why a pod gets its role, or does not.
//!
//! With `--server`, the first ready replica's `Explain` answers, asked with the user's own
//! Kubernetes token: the server answers only users who may `get` the pod. Its refusal of the
//! caller (no or bad token, a missing permission) is the command's error, as the server words
//! it. When no server is given or none answers within `--server-timeout`, the plugin computes
//! the answer itself, from the Kubernetes API, with the servers' own decision code
//! (`podiam-policy`): the pod, its namespace and every pod claiming the same IP go through the
//! same slimming ([`PodRecord::from_pod`]) into the same indexes ([`PodIndex`],
//! [`NamespaceIndex`]) a server's watches fill, and the answer is [`View::explain`] over them
//! — the very function behind the gRPC `Explain`. So a local answer can differ from a
//! server's only where the inputs differ:
//!
//! - the servers' base role ARN, which the plugin reads from the server pods' settings or
//!   `--base-role-arn` (see [`crate::base_arn`]; a note says when it was unknown);
//! - a server's view lags the API by the watch's delay (milliseconds), and a server that has
//!   not synced yet knows no pod — such replicas are never asked;
//! - the state of a pod's credentials at STS is in no answer: `Explain` decides whether the
//!   pod may have the role, not whether STS agrees.
//!
//! The answer says which way it was made.

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use podiam_policy::decision::{ExplainTarget, View};
use podiam_policy::index::{AccountIndex, NamespaceIndex, PodIndex, PodRecord};
use podiam_policy::policy::{
    DEFAULT_ROLE_ANNOTATION, PERMITTED_ANNOTATION, ROLE_ANNOTATION, valid_base_arn,
};
use podiam_proto::v1::{ExplainRequest, ExplainResponse, PodRef, explain_request};
use serde::Serialize;

use crate::base_arn::{self, BaseArn};
use crate::cli::{ExplainArgs, Output, POD_KINDS, object_name};
use crate::cluster::Cluster;
use crate::error::Error;
use crate::servers::{NoExplanation, Servers};
use crate::table::Escaped;

/// An explanation, whichever way it was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The pod asked about, `namespace/name`.
    pub pod: String,
    /// `server` or `local`.
    pub source: &'static str,
    /// Which replica answered, or why the answer was computed locally.
    pub answered_by: String,
    /// The pods concerned (several when they share an IP).
    pub pods: Vec<String>,
    pub node: String,
    pub ip: String,
    pub namespace: String,
    /// The role annotation that applies as written, and the ARN it resolves to.
    pub role_annotation: String,
    pub role_arn: String,
    /// Where that annotation is: `pod`, `service-account`, `namespace-default` ("" when
    /// none applies).
    pub role_source: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
    /// How the pod proves itself: `address`, `address and token`, `address and token,
    /// required`, or `token required, not set up` (no way in).
    pub identity: String,
    /// The namespace's permitted regex as written ("" when none).
    pub permitted_regex: String,
    pub allowed: bool,
    /// When refused: the reason's name and the message a pod would get.
    pub reason: String,
    pub message: String,
    /// What the answer could not take into account.
    pub notes: Vec<String>,
}

impl Explanation {
    fn new(
        pod: String,
        source: &'static str,
        answered_by: String,
        answer: ExplainResponse,
        notes: Vec<String>,
    ) -> Explanation {
        Explanation {
            pod,
            source,
            answered_by,
            pods: answer
                .pods
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            node: answer.node_name,
            ip: answer.ip,
            namespace: answer.namespace,
            role_annotation: answer.role_annotation,
            role_arn: answer.role_arn,
            role_source: answer.role_source,
            service_account: answer.service_account,
            identity: answer.identity,
            permitted_regex: answer.permitted_regex,
            allowed: answer.allowed,
            reason: reason_name(answer.reason),
            message: answer.message,
            notes,
        }
    }

    /// The explanation for people.
    pub fn render(&self) -> String {
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let mut lines = Vec::new();
        let mut field = |name: &str, value: String| lines.push(format!("{name:<12} {value}"));
        field("pod:", self.pod.clone());
        if self.pods.len() > 1 {
            field("same IP:", self.pods.join(", "));
        }
        // No pod found: nothing about a role or a namespace was looked at.
        let found = !self.pods.is_empty();
        if found {
            field("node:", or_dash(&self.node));
            field("ip:", or_dash(&self.ip));
        }
        let role = match (self.role_annotation.as_str(), self.role_arn.as_str()) {
            ("", _) => format!(
                "none (no {ROLE_ANNOTATION} annotation on the pod or its service account, \
                 no {DEFAULT_ROLE_ANNOTATION} on its namespace)"
            ),
            (annotation, "") => annotation.to_string(),
            (annotation, arn) if annotation == arn => arn.to_string(),
            (annotation, arn) => format!("{annotation} ({arn})"),
        };
        let from = match self.role_source.as_str() {
            "pod" => Some("the pod's annotation".to_string()),
            "service-account" => Some(format!(
                "service account {}'s annotation",
                or_dash(&self.service_account)
            )),
            "namespace-default" => Some(format!(
                "namespace {}'s default-role",
                or_dash(&self.namespace)
            )),
            "" => None,
            other => Some(other.to_string()),
        };
        let role = match from {
            Some(from) => format!("{role}, from {from}"),
            None => role,
        };
        let identity = known_by(&self.identity);
        let namespace = or_dash(&self.namespace);
        let permitted = if self.permitted_regex.is_empty() {
            format!("nothing in namespace {namespace} (no {PERMITTED_ANNOTATION} annotation)")
        } else {
            format!(
                "{:?} in namespace {namespace} (the whole role must match)",
                self.permitted_regex
            )
        };
        if found {
            field("role:", role);
            field("permitted:", permitted);
            field("known by:", identity);
        }
        if self.allowed {
            field("decision:", "allowed".into());
        } else {
            field("decision:", format!("refused ({})", or_dash(&self.reason)));
            field("", self.message.clone());
        }
        field("answered by:", self.answered_by.clone());
        for note in &self.notes {
            lines.push(format!("note: {note}"));
        }
        // Each line safe for a terminal, a newline within one written as such.
        let lines: Vec<_> = lines.iter().map(|line| Escaped(line).to_string()).collect();
        lines.join("\n") + "\n"
    }
}

/// A refusal's reason by the name pods read ("" when there is none); a reason this plugin
/// does not know (a newer server's) by its number.
fn reason_name(wire: i32) -> String {
    match podiam_proto::Reason::from_wire(wire) {
        Some(reason) => reason.as_str().to_string(),
        None if wire == 0 => String::new(),
        None => format!("reason {wire}, unknown to this plugin"),
    }
}

/// What the API says about a pod: the pod, its namespace, and every pod with its IP.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub pod: Option<Pod>,
    pub namespace: Option<Namespace>,
    /// The pod's ServiceAccount (a role of its own applies to the pod).
    pub service_account: Option<ServiceAccount>,
    pub same_ip: Vec<Pod>,
    /// What could not be read (not fatal).
    pub notes: Vec<String>,
}

/// Reads the facts about `namespace/name`.
pub async fn facts(cluster: &Cluster, namespace: &str, name: &str) -> Result<Facts, Error> {
    let (pod, ns) = tokio::join!(cluster.pod(namespace, name), cluster.namespace(namespace));
    let mut facts = Facts {
        pod: pod?,
        namespace: ns?,
        ..Facts::default()
    };
    let account = facts
        .pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "default".to_string());
    if facts.pod.is_some() {
        match cluster.service_account(namespace, &account).await {
            Ok(found) => facts.service_account = found,
            Err(error) => facts.notes.push(format!(
                "whether ServiceAccount {account} gives the pod a role is unknown ({})",
                error.one_line()
            )),
        }
    }
    let ip = facts
        .pod
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    if let Some(ip) = ip {
        match cluster
            .list_pods(None, None, Some(&format!("status.podIP={ip}")))
            .await
        {
            Ok(pods) => facts.same_ip = pods,
            Err(error) => facts.notes.push(format!(
                "whether another pod claims IP {ip} is unknown ({})",
                error.one_line()
            )),
        }
    }
    Ok(facts)
}

/// The servers' decision over `facts`, made by the servers' own code: the facts go into the
/// indexes a server's watches fill, and [`View::explain`] answers from them. What was read is
/// all there is to know, so the view counts as synced.
pub fn decide(
    facts: &Facts,
    namespace: &str,
    name: &str,
    base_arn: &str,
) -> Result<ExplainResponse, Error> {
    let mut pods = PodIndex::default();
    for pod in facts.pod.iter().chain(&facts.same_ip) {
        if let Some(record) = PodRecord::from_pod(pod) {
            pods.apply(record);
        }
    }
    let mut namespaces = NamespaceIndex::default();
    if let Some(ns) = &facts.namespace {
        namespaces.apply(ns);
    }
    let mut accounts = AccountIndex::default();
    if let Some(account) = &facts.service_account {
        accounts.apply(account);
    }
    let view = View {
        pods: &pods,
        namespaces: &namespaces,
        accounts: &accounts,
        synced: true,
        base_arn: Some(base_arn),
    };
    view.explain(&ExplainTarget::Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
    .map_err(|refusal| Error::Refused(refusal.to_string()))
}

fn request(namespace: &str, name: &str) -> ExplainRequest {
    ExplainRequest {
        target: Some(explain_request::Target::Pod(PodRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: String::new(),
        })),
    }
}

/// The usage mistakes of `args` that clap cannot see (a malformed pod or base ARN), checked
/// before anything is read or asked.
pub fn check(args: &ExplainArgs) -> Result<(), Error> {
    object_name(&args.pod, POD_KINDS).map_err(Error::Usage)?;
    if let Some(flag) = &args.base.base_role_arn
        && !valid_base_arn(flag)
    {
        return Err(Error::Usage(format!(
            "--base-role-arn {flag:?} is not a base role ARN (arn:aws:iam::ACCOUNT:role/)"
        )));
    }
    Ok(())
}

/// The explanation for `namespace/name`: a server's when `servers` are given and one
/// answers, else computed locally. A server's refusal of the caller is an error.
pub async fn explain(
    cluster: &Cluster,
    podiam_namespace: &str,
    args: &ExplainArgs,
    servers: Option<&Servers>,
) -> Result<Explanation, Error> {
    check(args)?;
    let name = object_name(&args.pod, POD_KINDS).map_err(Error::Usage)?;
    let namespace = cluster.namespace.as_str();
    let pod = format!("{namespace}/{name}");
    let why_local = match servers {
        None => "no --server given".to_string(),
        Some(servers) => match servers.explain(request(namespace, name)).await {
            Ok((addr, answer)) => {
                let by = format!("podiam server replica {addr}");
                return Ok(Explanation::new(pod, "server", by, answer, Vec::new()));
            }
            // Every replica checks the caller the same way: no other would answer.
            Err(NoExplanation::Refused(message)) => return Err(Error::ServerRefused(message)),
            Err(NoExplanation::Unanswered(problems)) => format!(
                "no server at {} answered: {}",
                servers.urls(),
                problems.join("; ")
            ),
        },
    };
    let (base, facts) = tokio::join!(
        base_arn::discover(
            cluster,
            podiam_namespace,
            args.base.base_role_arn.as_deref()
        ),
        facts(cluster, namespace, name),
    );
    let (base, facts) = (base?, facts?);
    let answer = decide(&facts, namespace, name, base.for_deciding())?;
    let mut notes = facts.notes.clone();
    notes.extend(base.note_for(&answer.role_annotation));
    if let BaseArn::Known { from, .. } = &base
        && !answer.role_annotation.is_empty()
        && !answer.role_annotation.starts_with("arn:")
    {
        notes.push(format!("the servers' base role ARN came from {from}"));
    }
    let by = format!(
        "computed locally from the Kubernetes API with podiam's decision code, without a \
         server ({why_local})"
    );
    Ok(Explanation::new(pod, "local", by, answer, notes))
}

/// Runs `explain` and prints the answer.
pub async fn run(
    cluster: &Cluster,
    podiam_namespace: &str,
    args: &ExplainArgs,
    servers: Option<&Servers>,
) -> Result<(), Error> {
    let explanation = explain(cluster, podiam_namespace, args, servers).await?;
    match args.output {
        Output::Text => print!("{}", explanation.render()),
        Output::Json => println!(
            "{}",
            crate::table::json_text(&explanation, true).map_err(Error::Json)?
        ),
    }
    Ok(())
}

/// How a pod proves itself, from the server's `identity` word, as a person reads it.
fn known_by(identity: &str) -> String {
    match identity {
        "address and token" => {
            "its address and its service account token (container credentials, 169.254.170.23)"
                .to_string()
        }
        "address and token, required" => {
            "its address and its service account token only (container credentials, \
             169.254.170.23; its namespace is labelled podiam.io/pod-identity=required: \
             instance metadata refuses it)"
                .to_string()
        }
        "token required, not set up" => {
            "nothing: its namespace is labelled podiam.io/pod-identity=required, so instance \
             metadata refuses it, and its containers are not set up for the container \
             credentials endpoint (roll it so that the webhook sets it up)"
                .to_string()
        }
        "address" => "its address (instance metadata, 169.254.169.254)".to_string(),
        "" => "-".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn pod(namespace: &str, name: &str, ip: &str, role: Option<&str>) -> Pod {
        let annotations = role
            .map(|r| json!({ ROLE_ANNOTATION: r }))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "annotations": annotations},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .expect("a pod")
    }

    fn namespace(name: &str, permitted: Option<&str>) -> Namespace {
        let annotations = permitted
            .map(|p| json!({ PERMITTED_ANNOTATION: p }))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))
            .expect("a namespace")
    }

    fn facts(pod: Option<Pod>, ns: Option<Namespace>, same_ip: Vec<Pod>) -> Facts {
        Facts {
            pod,
            namespace: ns,
            service_account: None,
            same_ip,
            notes: Vec::new(),
        }
    }

    #[test]
    fn the_servers_decision_code_decides_each_kind_of_case() {
        let web = |role| Some(pod("team-a", "web", "10.0.0.1", role));
        let team = |permitted| Some(namespace("team-a", permitted));
        // (facts, allowed, reason, role ARN)
        let cases = [
            (
                facts(web(Some("app-reader")), team(Some("app-.*")), vec![]),
                true,
                "",
                "arn:aws:iam::123456789012:role/app-reader",
            ),
            (
                facts(web(Some("db-admin")), team(Some("app-.*")), vec![]),
                false,
                "role-not-permitted",
                "arn:aws:iam::123456789012:role/db-admin",
            ),
            (
                facts(web(Some("app-reader")), team(None), vec![]),
                false,
                "role-not-permitted",
                "arn:aws:iam::123456789012:role/app-reader",
            ),
            (
                facts(web(Some("app-reader")), team(Some("app-(")), vec![]),
                false,
                "role-not-permitted",
                "arn:aws:iam::123456789012:role/app-reader",
            ),
            (
                facts(web(None), team(Some("app-.*")), vec![]),
                false,
                "no-role",
                "",
            ),
            (
                facts(web(Some("bad name")), team(Some(".*")), vec![]),
                false,
                "invalid-role",
                "",
            ),
            (
                facts(None, team(Some(".*")), vec![]),
                false,
                "unknown-pod",
                "",
            ),
            (
                facts(
                    web(Some("app-reader")),
                    team(Some("app-.*")),
                    vec![pod("team-b", "other", "10.0.0.1", None)],
                ),
                false,
                "ambiguous-pod",
                "",
            ),
        ];
        for (facts, allowed, reason, arn) in cases {
            let answer = decide(&facts, "team-a", "web", BASE).expect("explained");
            let case = format!("{:?}", facts.pod.as_ref().map(|p| &p.metadata.annotations));
            assert_eq!(answer.allowed, allowed, "{case}: {answer:?}");
            assert_eq!(reason_name(answer.reason), reason, "{case}: {answer:?}");
            assert_eq!(answer.role_arn, arn, "{case}");
            assert_eq!(answer.allowed, answer.message.is_empty(), "{case}");
        }
    }

    #[test]
    fn reasons_are_shown_by_name_and_a_newer_servers_by_number() {
        assert_eq!(reason_name(0), "");
        for reason in podiam_proto::Reason::ALL {
            assert_eq!(reason_name(reason.to_wire().into()), reason.as_str());
        }
        assert_eq!(reason_name(9999), "reason 9999, unknown to this plugin");
    }

    /// The local answer about team-a/web, its role annotation `role`, in a namespace that
    /// permits `app-.*`.
    fn web_with_role(role: &str) -> ExplainResponse {
        decide(
            &facts(
                Some(pod("team-a", "web", "10.0.0.1", Some(role))),
                Some(namespace("team-a", Some("app-.*"))),
                vec![],
            ),
            "team-a",
            "web",
            BASE,
        )
        .expect("explained")
    }

    #[test]
    fn the_rendering_says_where_the_answer_came_from() {
        let answer = web_with_role("db-admin");
        let text = Explanation::new(
            "team-a/web".into(),
            "local",
            "computed locally (no --server given)".into(),
            answer,
            vec!["something unknown".into()],
        )
        .render();
        for want in [
            "pod:         team-a/web\n",
            "node:        node-1\n",
            "ip:          10.0.0.1\n",
            "role:        db-admin (arn:aws:iam::123456789012:role/db-admin), from the pod's annotation\n",
            "known by:    its address (instance metadata, 169.254.169.254)\n",
            "permitted:   \"app-.*\" in namespace team-a",
            "decision:    refused (role-not-permitted)\n",
            "does not match \"app-.*\"",
            "answered by: computed locally (no --server given)\n",
            "note: something unknown\n",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        // No pod: only what was looked at.
        let answer = decide(&facts(None, None, vec![]), "team-a", "gone", BASE).expect("explained");
        let text =
            Explanation::new("team-a/gone".into(), "local", "x".into(), answer, vec![]).render();
        assert!(
            !text.contains("role:") && !text.contains("permitted:"),
            "{text}"
        );
        assert!(
            text.contains("decision:    refused (unknown-pod)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_tenants_annotation_cannot_write_to_the_operators_terminal() {
        let answer = web_with_role("app\u{1b}[1A\u{1b}[2K\ndecision:    allowed");
        let text =
            Explanation::new("team-a/web".into(), "local", "x".into(), answer, vec![]).render();
        assert!(!text.chars().any(|c| c == '\u{1b}'), "{text:?}");
        assert!(
            text.contains("role:        app\\u{1b}[1A\\u{1b}[2K\\ndecision:    allowed"),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|line| line.starts_with("decision:    allowed")),
            "{text}"
        );
    }
}
