//! `kubectl iam status`: podiam's servers and agents, from the API and from the servers.
//!
//! - From the API: the server and agent pods in the podiam namespace (by their
//!   `app.kubernetes.io/name` labels): node, phase, Ready condition, IP, image.
//! - From every server replica behind `--server`: its `Status` (version, synced, draining,
//!   the pods and namespaces in its view, and the agents whose node streams it serves, with
//!   their node, the agent pod its token proved, version and since when), asked with the
//!   user's own token (`Status` needs `list pods` cluster-wide). A replica is matched to its
//!   pod by IP (servers run on the host network, so a replica dialled directly has its pod's
//!   IP).
//!
//! Agents are shown per node, joining the agent pods on that node with the node streams
//! replicas serve for it (a stream goes with the pod it proved, else in turn): an agent pod
//! that is Running but has no stream is one the servers do not hear from, and a stream whose
//! pod is `unproven` is one a server answers without proof (node binding in warn mode).
//!
//! The exit code is for scripts: 0 when at least one server replica is ready — by its own
//! `Status` when `--server` is given, else by its pod's Ready condition (the readiness probe
//! is the server's `/ready`) — and 1 otherwise, with the reason ([`verdict`]). When every
//! replica refused the caller (no permission), the error is their refusal, as worded.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use podiam_proto::v1::StatusResponse;
use serde::Serialize;

use crate::cli::{Output, StatusArgs};
use crate::cluster::Cluster;
use crate::error::Error;
use crate::servers::{Answer, Asked, Servers};
use crate::table::{Escaped, table};
use crate::{AGENT_LABEL, SERVER_LABEL};

/// One pod of podiam's, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodSummary {
    pub name: String,
    pub node: String,
    pub phase: String,
    /// Its Ready condition is True.
    pub ready: bool,
    pub ip: String,
    pub images: Vec<String>,
}

impl PodSummary {
    pub fn of(pod: &Pod) -> PodSummary {
        let status = pod.status.as_ref();
        PodSummary {
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            ip: status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
            images: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .filter_map(|c| c.image.clone())
                .collect(),
        }
    }
}

/// Pods listed by label, or why they could not be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub pods: Vec<PodSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An agent whose node stream a replica serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamReport {
    pub node: String,
    /// The agent's pod, `namespace/name`, as its token proved it to the replica; "" when the
    /// replica answers it unproven.
    pub agent_pod: String,
    pub agent_version: String,
    /// The replica serving it.
    pub server: String,
    pub since_unix: i64,
}

/// One replica's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplicaReport {
    pub address: String,
    /// The server pod with this replica's IP, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Answered, synced and not draining.
    pub ready: bool,
    /// Why it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// It refused the caller (`error` is its refusal, naming the permission missing).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    pub version: String,
    pub synced: bool,
    pub draining: bool,
    /// Its view of the cluster is stale: a watch of the API has failed for 15 s or more.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    pub pods: u64,
    pub namespaces: u64,
    pub agents: usize,
}

/// What the servers behind `--server` said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServersReport {
    pub urls: String,
    /// Why no replica could be asked (the URLs did not resolve).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub replicas: Vec<ReplicaReport>,
    pub streams: Vec<StreamReport>,
}

/// Everything `status` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    pub podiam_namespace: String,
    pub server_pods: Listing,
    pub agent_pods: Listing,
    /// `None` when no `--server` was given.
    pub servers: Option<ServersReport>,
    /// At least one server replica is ready.
    pub ready: bool,
    /// One line: how many are ready, or why none is.
    pub summary: String,
}

fn listing(result: Result<Vec<Pod>, Error>) -> Listing {
    match result {
        Ok(pods) => {
            let mut pods: Vec<PodSummary> = pods.iter().map(PodSummary::of).collect();
            pods.sort_by(|a, b| a.name.cmp(&b.name));
            Listing { pods, error: None }
        }
        Err(error) => Listing {
            pods: Vec::new(),
            error: Some(error.one_line()),
        },
    }
}

/// The replicas' answers, matched with the server pods by IP.
fn servers_report(
    urls: String,
    answers: Result<Vec<Answer<StatusResponse>>, String>,
    server_pods: &Listing,
) -> ServersReport {
    let answers = match answers {
        Ok(answers) => answers,
        Err(error) => {
            return ServersReport {
                urls,
                error: Some(error),
                ..ServersReport::default()
            };
        }
    };
    let mut report = ServersReport {
        urls,
        ..ServersReport::default()
    };
    for (addr, answer) in answers {
        let pod = server_pods
            .pods
            .iter()
            .find(|p| !p.ip.is_empty() && p.ip == addr.ip().to_string())
            .map(|p| p.name.clone());
        let replica = match answer {
            Ok(status) => {
                report
                    .streams
                    .extend(status.agents.iter().map(|agent| StreamReport {
                        node: agent.node_name.clone(),
                        agent_pod: agent.agent_pod.clone(),
                        agent_version: agent.agent_version.clone(),
                        server: addr.to_string(),
                        since_unix: agent.connected_unix,
                    }));
                ReplicaReport {
                    address: addr.to_string(),
                    pod,
                    ready: status.synced && !status.draining,
                    error: None,
                    refused: false,
                    version: status.version,
                    synced: status.synced,
                    draining: status.draining,
                    stale: status.stale,
                    pods: status.pods,
                    namespaces: status.namespaces,
                    agents: status.agents.len(),
                }
            }
            Err(error) => ReplicaReport {
                address: addr.to_string(),
                pod,
                ready: false,
                refused: matches!(error, Asked::Refused(_)),
                error: Some(error.to_string()),
                version: String::new(),
                synced: false,
                draining: false,
                stale: false,
                pods: 0,
                namespaces: 0,
                agents: 0,
            },
        };
        report.replicas.push(replica);
    }
    report
        .streams
        .sort_by(|a, b| (&a.node, &a.server).cmp(&(&b.node, &b.server)));
    report
}

/// Whether a server replica is ready, and one line saying so or why not.
pub fn verdict(
    podiam_namespace: &str,
    server_pods: &Listing,
    servers: Option<&ServersReport>,
) -> (bool, String) {
    let pods_ready = server_pods.pods.iter().filter(|p| p.ready).count();
    let from_api = format!(
        "{pods_ready} of {} server pods in {podiam_namespace} are Ready",
        server_pods.pods.len()
    );
    match servers {
        Some(servers) => {
            let ready = servers.replicas.iter().filter(|r| r.ready).count();
            if ready > 0 {
                return (
                    true,
                    format!(
                        "{ready} of {} server replicas ready",
                        servers.replicas.len()
                    ),
                );
            }
            if let Some(refusal) = refusal(servers) {
                return (false, refusal);
            }
            let why = match &servers.error {
                Some(error) => error.clone(),
                None if servers.replicas.is_empty() => format!("{} has no replica", servers.urls),
                None => {
                    let each: Vec<String> = servers
                        .replicas
                        .iter()
                        .map(|r| format!("{}: {}", r.address, replica_state(r)))
                        .collect();
                    format!(
                        "none of the replicas at {} is ready ({})",
                        servers.urls,
                        each.join("; ")
                    )
                }
            };
            let hint = if pods_ready > 0 {
                format!("; the API says {from_api}: are they reachable from here?")
            } else {
                String::new()
            };
            (false, format!("{why}{hint}"))
        }
        None => {
            if let Some(error) = &server_pods.error {
                return (
                    false,
                    format!("cannot tell: no --server given, and {error}"),
                );
            }
            if server_pods.pods.is_empty() {
                return (
                    false,
                    format!("no pod labelled {SERVER_LABEL} in namespace {podiam_namespace}"),
                );
            }
            (
                pods_ready > 0,
                format!("{from_api} (no --server given: the servers were not asked)"),
            )
        }
    }
}

/// The replicas' refusal of the caller, when every replica refused: the first one's words
/// (they check alike, and name the permission missing).
pub fn refusal(servers: &ServersReport) -> Option<String> {
    if servers.replicas.is_empty() || !servers.replicas.iter().all(|r| r.refused) {
        return None;
    }
    servers.replicas.first().and_then(|r| r.error.clone())
}

/// A replica's state in a word or a sentence.
fn replica_state(replica: &ReplicaReport) -> String {
    match &replica.error {
        Some(error) => error.clone(),
        None if replica.draining => "draining".into(),
        None if !replica.synced => "not synced yet".into(),
        None if replica.stale => {
            "ready; its view is stale (a watch of the API failing for 15 s or more)".into()
        }
        None => "ready".into(),
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

/// How long ago `since` (Unix seconds) was, in whole seconds.
fn age(now_unix: i64, since_unix: i64) -> String {
    let seconds = u64::try_from(now_unix - since_unix).unwrap_or_default();
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

fn pods_table(listing: &Listing, label: &str, namespace: &str) -> String {
    if let Some(error) = &listing.error {
        return format!("  cannot list them: {error}\n");
    }
    if listing.pods.is_empty() {
        return format!("  none labelled {label} in namespace {namespace}\n");
    }
    let rows = listing
        .pods
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                or_dash(&p.node),
                or_dash(&p.phase),
                yes_no(p.ready),
                or_dash(&p.ip),
                or_dash(&p.images.join(",")),
            ]
        })
        .collect();
    table(&["NAME", "NODE", "PHASE", "READY", "IP", "IMAGE"], rows)
}

impl StatusReport {
    /// The report for people; `now_unix` for the streams' ages.
    pub fn render(&self, now_unix: i64) -> String {
        let ns = &self.podiam_namespace;
        let mut out = format!("Server pods ({SERVER_LABEL} in {ns}):\n");
        out += &pods_table(&self.server_pods, SERVER_LABEL, ns);
        match &self.servers {
            None => out += "\nServer replicas: not asked (no --server given)\n",
            Some(servers) => {
                out += &format!("\nServer replicas ({}):\n", Escaped(&servers.urls));
                match &servers.error {
                    Some(error) => out += &format!("  {}\n", Escaped(error)),
                    None => {
                        let rows = servers
                            .replicas
                            .iter()
                            .map(|r| {
                                let answered = r.error.is_none();
                                let number = |n: u64| {
                                    if answered { n.to_string() } else { "-".into() }
                                };
                                vec![
                                    r.address.clone(),
                                    r.pod.clone().unwrap_or_else(|| "-".into()),
                                    or_dash(&r.version),
                                    number(r.pods),
                                    number(r.namespaces),
                                    number(r.agents as u64),
                                    replica_state(r),
                                ]
                            })
                            .collect();
                        out += &table(
                            &[
                                "ADDRESS",
                                "POD",
                                "VERSION",
                                "PODS",
                                "NAMESPACES",
                                "AGENTS",
                                "STATE",
                            ],
                            rows,
                        );
                    }
                }
            }
        }
        out += &format!("\nAgents ({AGENT_LABEL} in {ns}, and the node streams servers serve):\n");
        out += &self.agents_table(now_unix);
        out += &format!("\n{}\n", Escaped(&self.summary));
        out
    }

    /// One row per agent pod and per node stream, joined by node.
    fn agents_table(&self, now_unix: i64) -> String {
        let mut by_node: BTreeMap<&str, (Vec<&PodSummary>, Vec<&StreamReport>)> = BTreeMap::new();
        for pod in &self.agent_pods.pods {
            by_node.entry(&pod.node).or_default().0.push(pod);
        }
        let streams = self.servers.iter().flat_map(|s| &s.streams);
        for stream in streams {
            by_node.entry(&stream.node).or_default().1.push(stream);
        }
        let mut out = String::new();
        if let Some(error) = &self.agent_pods.error {
            out += &format!("  cannot list the agent pods: {}\n", Escaped(error));
        }
        if by_node.is_empty() {
            out += &format!(
                "  none labelled {AGENT_LABEL} in namespace {}",
                self.podiam_namespace
            );
            if self.servers.is_some() {
                out += ", and no server serves a node stream";
            }
            out += "\n";
            return out;
        }
        let asked = self.servers.is_some();
        let unknown = if asked { "none" } else { "?" };
        let mut rows = Vec::new();
        for (node, (pods, streams)) in by_node {
            for (pod, stream) in pair(&self.podiam_namespace, &pods, &streams) {
                let pod_field = |f: fn(&PodSummary) -> String| pod.map_or("-".into(), f);
                rows.push(vec![
                    or_dash(node),
                    pod_field(|p| p.name.clone()),
                    pod_field(|p| or_dash(&p.phase)),
                    pod_field(|p| yes_no(p.ready)),
                    pod_field(|p| or_dash(&p.images.join(","))),
                    stream.map_or(unknown.into(), |s| or_dash(&s.agent_version)),
                    stream.map_or(unknown.into(), |s| s.server.clone()),
                    stream.map_or(unknown.into(), |s| {
                        if s.agent_pod.is_empty() {
                            "unproven".into()
                        } else {
                            s.agent_pod.clone()
                        }
                    }),
                    stream.map_or("-".into(), |s| {
                        format!(
                            "{} ({} ago)",
                            podiam_runtime::tls::utc(s.since_unix),
                            age(now_unix, s.since_unix)
                        )
                    }),
                ]);
            }
        }
        out += &table(
            &[
                "NODE", "POD", "PHASE", "READY", "IMAGE", "VERSION", "STREAM", "PROVEN", "SINCE",
            ],
            rows,
        );
        if !asked {
            out += "  (agent versions and node streams come from the servers: give --server)\n";
        }
        out
    }
}

/// One node's agent pods and node streams, in rows, in the pods' order: each pod with the
/// stream that proved it (`podiam_namespace/name`), else with the next stream no pod claims;
/// streams left over get rows without a pod.
fn pair<'a>(
    podiam_namespace: &str,
    pods: &[&'a PodSummary],
    streams: &[&'a StreamReport],
) -> Vec<(Option<&'a PodSummary>, Option<&'a StreamReport>)> {
    let mut rest: Vec<&StreamReport> = streams.to_vec();
    let mut proven: Vec<Option<&StreamReport>> = pods
        .iter()
        .map(|pod| {
            let name = format!("{podiam_namespace}/{}", pod.name);
            let at = rest.iter().position(|s| s.agent_pod == name)?;
            Some(rest.remove(at))
        })
        .collect();
    let mut rest = rest.into_iter();
    for slot in proven.iter_mut().filter(|slot| slot.is_none()) {
        *slot = rest.next();
    }
    let mut rows: Vec<_> = pods.iter().map(|&pod| Some(pod)).zip(proven).collect();
    rows.extend(rest.map(|stream| (None, Some(stream))));
    rows
}

/// Gathers the report, asking `servers` when given.
pub async fn status(
    cluster: &Cluster,
    podiam_namespace: &str,
    servers: Option<&Servers>,
) -> Result<StatusReport, Error> {
    let (server_pods, agent_pods, answers) = tokio::join!(
        cluster.list_pods(Some(podiam_namespace), Some(SERVER_LABEL), None),
        cluster.list_pods(Some(podiam_namespace), Some(AGENT_LABEL), None),
        async {
            match servers {
                Some(servers) => Some((servers.urls(), servers.statuses().await)),
                None => None,
            }
        },
    );
    let server_pods = listing(server_pods);
    let servers = answers.map(|(urls, answers)| servers_report(urls, answers, &server_pods));
    let (ready, summary) = verdict(podiam_namespace, &server_pods, servers.as_ref());
    Ok(StatusReport {
        podiam_namespace: podiam_namespace.to_string(),
        server_pods,
        agent_pods: listing(agent_pods),
        servers,
        ready,
        summary,
    })
}

/// Runs `status`, prints the report, and fails when no server replica is ready (with the
/// replicas' refusal when they all refused the caller).
pub async fn run(
    cluster: &Cluster,
    podiam_namespace: &str,
    args: &StatusArgs,
    servers: Option<&Servers>,
) -> Result<(), Error> {
    let report = status(cluster, podiam_namespace, servers).await?;
    match args.output {
        Output::Text => {
            let now = podiam_runtime::clock::now_unix();
            print!("{}", report.render(now));
        }
        Output::Json => println!(
            "{}",
            crate::table::json_text(&report, true).map_err(Error::Json)?
        ),
    }
    if report.ready {
        Ok(())
    } else if let Some(refusal) = report.servers.as_ref().and_then(refusal) {
        Err(Error::ServerRefused(refusal))
    } else {
        Err(Error::NotReady(report.summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podiam_proto::v1::AgentStatus;
    use std::net::SocketAddr;

    fn summary(name: &str, node: &str, ready: bool, ip: &str) -> PodSummary {
        PodSummary {
            name: name.into(),
            node: node.into(),
            phase: "Running".into(),
            ready,
            ip: ip.into(),
            images: vec!["podiam:0.1.0".into()],
        }
    }

    fn listing_of(pods: Vec<PodSummary>) -> Listing {
        Listing { pods, error: None }
    }

    /// A replica's answer; agents as (node, version, proven pod).
    fn answer(synced: bool, draining: bool, agents: &[(&str, &str, &str)]) -> StatusResponse {
        StatusResponse {
            version: "0.1.0".into(),
            synced,
            draining,
            agents: agents
                .iter()
                .map(|(node, version, pod)| AgentStatus {
                    node_name: node.to_string(),
                    agent_version: version.to_string(),
                    connected_unix: 1_000,
                    agent_pod: pod.to_string(),
                })
                .collect(),
            pods: 12,
            namespaces: 3,
            agents_total: agents.len() as u64,
            stale: false,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn replicas_decide_when_asked_and_pods_otherwise() {
        let pods = listing_of(vec![
            summary("server-a", "cp-1", true, "10.0.0.1"),
            summary("server-b", "cp-2", false, "10.0.0.2"),
        ]);
        // Asked: the replicas' own word.
        let report = servers_report(
            "https://s:8443".into(),
            Ok(vec![
                (
                    addr("10.0.0.1:8443"),
                    Ok(answer(true, false, &[("n1", "0.1.0", "podiam/agent-n1")])),
                ),
                (addr("10.0.0.2:8443"), Ok(answer(false, false, &[]))),
                (
                    addr("10.0.0.3:8443"),
                    Err(Asked::Failed("server unavailable: refused".into())),
                ),
            ]),
            &pods,
        );
        assert_eq!(report.replicas[0].pod.as_deref(), Some("server-a"));
        assert_eq!(report.replicas[2].pod, None);
        let (ready, line) = verdict("podiam", &pods, Some(&report));
        assert!(ready, "{line}");
        assert_eq!(line, "1 of 3 server replicas ready");

        let draining = servers_report(
            "https://s:8443".into(),
            Ok(vec![(addr("10.0.0.1:8443"), Ok(answer(true, true, &[])))]),
            &pods,
        );
        let (ready, line) = verdict("podiam", &pods, Some(&draining));
        assert!(!ready);
        assert!(line.contains("10.0.0.1:8443: draining"), "{line}");
        assert!(line.contains("the API says 1 of 2 server pods"), "{line}");

        let unresolved = servers_report(
            "https://s:8443".into(),
            Err("s did not resolve".into()),
            &pods,
        );
        let (ready, line) = verdict("podiam", &pods, Some(&unresolved));
        assert!(!ready);
        assert!(line.starts_with("s did not resolve"), "{line}");

        // Not asked: the pods' Ready condition.
        let (ready, line) = verdict("podiam", &pods, None);
        assert!(ready, "{line}");
        assert!(
            line.contains("1 of 2 server pods in podiam are Ready"),
            "{line}"
        );
        let none_ready = listing_of(vec![summary("server-b", "cp-2", false, "10.0.0.2")]);
        assert!(!verdict("podiam", &none_ready, None).0);
        let (ready, line) = verdict("podiam", &listing_of(vec![]), None);
        assert!(!ready);
        assert!(
            line.contains("no pod labelled app.kubernetes.io/name=podiam-server"),
            "{line}"
        );
    }

    #[test]
    fn a_replica_whose_view_is_stale_is_ready_and_says_so() {
        let pods = listing_of(vec![summary("server-a", "cp-1", true, "10.0.0.1")]);
        let report = servers_report(
            "https://s:8443".into(),
            Ok(vec![(
                addr("10.0.0.1:8443"),
                Ok(StatusResponse {
                    stale: true,
                    ..answer(true, false, &[])
                }),
            )]),
            &pods,
        );
        assert!(report.replicas[0].ready && report.replicas[0].stale);
        assert_eq!(
            replica_state(&report.replicas[0]),
            "ready; its view is stale (a watch of the API failing for 15 s or more)"
        );
        assert!(verdict("podiam", &pods, Some(&report)).0);
        let json = serde_json::to_value(&report.replicas[0]).expect("json");
        assert_eq!(json["stale"], true);
        let current = servers_report(
            "https://s:8443".into(),
            Ok(vec![(addr("10.0.0.1:8443"), Ok(answer(true, false, &[])))]),
            &pods,
        );
        assert_eq!(replica_state(&current.replicas[0]), "ready");
        let json = serde_json::to_value(&current.replicas[0]).expect("json");
        assert!(json.get("stale").is_none(), "{json}");
    }

    #[test]
    fn agents_are_joined_with_their_node_streams() {
        let server_pods = listing_of(vec![summary("server-a", "cp-1", true, "10.0.0.1")]);
        let servers = servers_report(
            "https://s:8443".into(),
            Ok(vec![(
                addr("10.0.0.1:8443"),
                Ok(answer(
                    true,
                    false,
                    &[
                        ("node-1", "0.1.0", "podiam/agent-1"),
                        ("node-3", "0.0.9", ""),
                    ],
                )),
            )]),
            &server_pods,
        );
        let (ready, summary_line) = verdict("podiam", &server_pods, Some(&servers));
        let report = StatusReport {
            podiam_namespace: "podiam".into(),
            server_pods,
            agent_pods: listing_of(vec![
                summary("agent-1", "node-1", true, "10.1.0.1"),
                summary("agent-2", "node-2", true, "10.1.0.2"),
            ]),
            servers: Some(servers),
            ready,
            summary: summary_line,
        };
        let text = report.render(1_065);
        let line = |node: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(node))
                .unwrap_or_else(|| panic!("no row for {node} in:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("node-1"),
            "node-1 agent-1 Running yes podiam:0.1.0 0.1.0 10.0.0.1:8443 podiam/agent-1 1970-01-01T00:16:40Z (1m 5s ago)"
        );
        // A running agent no server hears from, and an unproven stream from a node without
        // an agent pod.
        assert_eq!(
            line("node-2"),
            "node-2 agent-2 Running yes podiam:0.1.0 none none none -"
        );
        assert!(line("node-3").starts_with("node-3 - - - - 0.0.9 10.0.0.1:8443 unproven"));
        assert!(text.contains("PROVEN"), "{text}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["servers"]["streams"][0]["agent_pod"], "podiam/agent-1");
        assert_eq!(json["servers"]["streams"][1]["agent_pod"], "");
        assert!(text.contains("10.0.0.1:8443  server-a  0.1.0"), "{text}");
        assert!(text.ends_with("\n1 of 1 server replicas ready\n"), "{text}");
    }

    #[test]
    fn streams_go_with_the_pods_they_proved() {
        let pods = [
            summary("agent-a", "n1", true, "10.1.0.1"),
            summary("agent-b", "n1", false, "10.1.0.2"),
        ];
        let stream = |pod: &str, server: &str| StreamReport {
            node: "n1".into(),
            agent_pod: pod.into(),
            agent_version: "0.1.0".into(),
            server: server.into(),
            since_unix: 0,
        };
        let streams = [
            stream("podiam/agent-b", "s1"),
            stream("", "s2"),
            stream("", "s3"),
        ];
        let pod_refs: Vec<&PodSummary> = pods.iter().collect();
        let stream_refs: Vec<&StreamReport> = streams.iter().collect();
        let rows: Vec<(Option<&str>, Option<&str>)> = pair("podiam", &pod_refs, &stream_refs)
            .into_iter()
            .map(|(p, s)| (p.map(|p| p.name.as_str()), s.map(|s| s.server.as_str())))
            .collect();
        assert_eq!(
            rows,
            [
                (Some("agent-a"), Some("s2")),
                (Some("agent-b"), Some("s1")),
                (None, Some("s3")),
            ]
        );
    }

    #[test]
    fn replicas_refusing_the_caller_say_so_in_their_words() {
        let pods = listing_of(vec![summary("server-a", "cp-1", true, "10.0.0.1")]);
        let denied = "\"alice\" may not list pods cluster-wide, which this needs (give it the \
                      podiam-operator ClusterRole)";
        let refused = servers_report(
            "https://s:8443".into(),
            Ok(vec![
                (addr("10.0.0.1:8443"), Err(Asked::Refused(denied.into()))),
                (addr("10.0.0.2:8443"), Err(Asked::Refused(denied.into()))),
            ]),
            &pods,
        );
        assert!(refused.replicas.iter().all(|r| r.refused && !r.ready));
        let (ready, line) = verdict("podiam", &pods, Some(&refused));
        assert!(!ready);
        assert_eq!(line, denied);
        assert_eq!(refusal(&refused).as_deref(), Some(denied));
        let json = serde_json::to_value(&refused).expect("json");
        assert_eq!(json["replicas"][0]["refused"], true);
        assert_eq!(json["replicas"][0]["error"], denied);

        // One replica unreachable: not a refusal of the caller by every replica.
        let mixed = servers_report(
            "https://s:8443".into(),
            Ok(vec![
                (addr("10.0.0.1:8443"), Err(Asked::Refused(denied.into()))),
                (
                    addr("10.0.0.2:8443"),
                    Err(Asked::Failed("server unavailable: refused".into())),
                ),
            ]),
            &pods,
        );
        assert_eq!(refusal(&mixed), None);
        let (_, line) = verdict("podiam", &pods, Some(&mixed));
        assert!(
            line.contains(denied) && line.contains("10.0.0.2:8443"),
            "{line}"
        );
        // A replica that answered is not flagged.
        let fine = servers_report(
            "https://s:8443".into(),
            Ok(vec![(addr("10.0.0.1:8443"), Ok(answer(true, false, &[])))]),
            &pods,
        );
        let json = serde_json::to_value(&fine).expect("json");
        assert!(json["replicas"][0].get("refused").is_none(), "{json}");
    }
}
