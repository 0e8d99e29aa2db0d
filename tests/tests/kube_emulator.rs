//! Integration tests of the Kubernetes API emulator against the real clients that will use
//! it: `kubectl` (the binary on the machine image) and kube-rs (`Client`, `Api`,
//! `kube::runtime::watcher`), plus raw HTTP for protocol details the clients hide (410 as a
//! watch ERROR event, bookmarks, strategic merge patches, Status errors).
//!
//! Every wait is a condition polled against a deadline; nothing sleeps and hopes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use podiam_tests::fixtures::{ApiFixture, KUBECTL, Kubectl};
use podiam_tests::kube_emulator::{
    EmulatorOptions, Kind, PodDeletion, WebhookOutcome, namespace, pod,
};
use podiam_tests::process::{ClosedPort, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

/// Generous bound for anything that should take milliseconds, on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// The shared API fixture, with this suite's helpers.
struct Fixture(ApiFixture);

impl std::ops::Deref for Fixture {
    type Target = ApiFixture;
    fn deref(&self) -> &ApiFixture {
        &self.0
    }
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::with_options(EmulatorOptions {
            bookmark_interval: Duration::from_millis(100),
            ..EmulatorOptions::default()
        })
        .await
    }

    async fn with_options(options: EmulatorOptions) -> Fixture {
        Fixture(ApiFixture::start("kube-emulator", options).await)
    }

    /// Runs kubectl against the emulator with a private HOME; returns (success, stdout, stderr).
    async fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let run = self.kubectl_with(&self.kubeconfig, args).await;
        (run.ok, run.stdout, run.stderr)
    }

    /// Runs kubectl and requires success; returns stdout.
    async fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.kubectl(args).await;
        assert!(
            ok,
            "kubectl {args:?} failed:\nstdout: {stdout}\nstderr: {stderr}"
        );
        stdout
    }

    async fn kube_client(&self) -> kube::Client {
        self.client_for(&self.kubeconfig).await
    }

    /// One HTTP request; returns (status, parsed JSON body).
    async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let headers: Vec<(&str, String)> = content_type
            .map(|c| ("content-type", c.to_string()))
            .into_iter()
            .collect();
        self.0.request(method, path, &headers, body).await
    }

    /// Opens a watch (GET with `?watch=1…`) and returns its line stream.
    async fn watch(&self, path_and_query: &str) -> WatchLines {
        let request = http::Request::get(format!("{}{path_and_query}", self.emulator.url()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.http.request(request).await.expect("opening the watch");
        assert_eq!(response.status(), 200, "watch {path_and_query}");
        WatchLines {
            body: response.into_body(),
            buffer: Vec::new(),
        }
    }

    fn setup_team_a(&self) {
        self.emulator.create(namespace("team-a", &[])).unwrap();
        self.emulator
            .create(pod("team-a", "web", "10.1.0.5", &[]))
            .unwrap();
    }
}

/// Newline-delimited JSON events of a watch response.
struct WatchLines {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl WatchLines {
    /// The next event, `None` at the end of the stream; panics after the deadline.
    async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buffer.drain(..=end).collect();
                    return Some(serde_json::from_slice(&line).expect("a JSON watch event"));
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buffer.extend_from_slice(&data);
                        }
                    }
                    Some(Err(error)) => panic!("watch body failed: {error}"),
                    None => return None,
                }
            }
        })
        .await
        .expect("no watch event within the deadline")
    }

    /// Skips events until one satisfies `want`.
    async fn next_matching(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            let event = self
                .next()
                .await
                .expect("the watch ended before the expected event");
            if want(&event) {
                return event;
            }
        }
    }
}

fn annotation(object: &Value, key: &str) -> Option<String> {
    object["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// kubectl
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_gets_namespaces_and_pods() {
    let fx = Fixture::start().await;
    fx.setup_team_a();

    let namespaces = fx.kubectl_ok(&["get", "ns"]).await;
    assert!(
        namespaces.contains("NAME") && namespaces.contains("STATUS"),
        "{namespaces}"
    );
    assert!(
        namespaces
            .lines()
            .any(|l| l.starts_with("team-a") && l.contains("Active")),
        "{namespaces}"
    );

    let pods = fx.kubectl_ok(&["get", "pods", "-n", "team-a"]).await;
    let row = pods
        .lines()
        .find(|l| l.starts_with("web"))
        .unwrap_or_else(|| panic!("{pods}"));
    assert!(row.contains("1/1") && row.contains("Running"), "{pods}");
    assert!(!pods.contains("10.1.0.5"), "IP is a wide column: {pods}");

    let wide = fx
        .kubectl_ok(&["get", "pods", "-n", "team-a", "-o", "wide"])
        .await;
    assert!(
        wide.contains("10.1.0.5") && wide.contains("node-1"),
        "{wide}"
    );

    let all = fx.kubectl_ok(&["get", "pods", "-A"]).await;
    assert!(
        all.lines()
            .any(|l| l.starts_with("team-a") && l.contains("web")),
        "{all}"
    );

    let ip = fx
        .kubectl_ok(&[
            "get",
            "pod",
            "web",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .await;
    assert_eq!(ip, "10.1.0.5");

    let json_out = fx
        .kubectl_ok(&["get", "pod", "web", "-n", "team-a", "-o", "json"])
        .await;
    let object: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(object["kind"], "Pod");
    assert_eq!(object["spec"]["hostNetwork"], false);

    let (ok, _, stderr) = fx.kubectl(&["get", "pod", "nope", "-n", "team-a"]).await;
    assert!(
        !ok && stderr.contains("pods \"nope\" not found"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_annotates_pods_and_namespaces() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let role = "iam.amazonaws.com/role";
    let role_path = "jsonpath={.metadata.annotations.iam\\.amazonaws\\.com/role}";

    fx.kubectl_ok(&[
        "annotate",
        "pod",
        "web",
        "-n",
        "team-a",
        "iam.amazonaws.com/role=app-reader",
    ])
    .await;
    let stored = fx.emulator.get(Kind::Pod, Some("team-a"), "web").unwrap();
    assert_eq!(annotation(&stored, role).as_deref(), Some("app-reader"));
    let shown = fx
        .kubectl_ok(&["get", "pod", "web", "-n", "team-a", "-o", role_path])
        .await;
    assert_eq!(shown, "app-reader");

    // Without --overwrite kubectl refuses to change an existing value; with it, it does.
    let (ok, _, _) = fx
        .kubectl(&[
            "annotate",
            "pod",
            "web",
            "-n",
            "team-a",
            "iam.amazonaws.com/role=other",
        ])
        .await;
    assert!(
        !ok,
        "annotating an existing key without --overwrite must fail"
    );
    fx.kubectl_ok(&[
        "annotate",
        "pod",
        "web",
        "-n",
        "team-a",
        "--overwrite",
        "iam.amazonaws.com/role=other",
    ])
    .await;
    let stored = fx.emulator.get(Kind::Pod, Some("team-a"), "web").unwrap();
    assert_eq!(annotation(&stored, role).as_deref(), Some("other"));

    fx.kubectl_ok(&[
        "annotate",
        "pod",
        "web",
        "-n",
        "team-a",
        "iam.amazonaws.com/role-",
    ])
    .await;
    let stored = fx.emulator.get(Kind::Pod, Some("team-a"), "web").unwrap();
    assert_eq!(annotation(&stored, role), None);
    let shown = fx
        .kubectl_ok(&["get", "pod", "web", "-n", "team-a", "-o", role_path])
        .await;
    assert_eq!(shown, "");

    fx.kubectl_ok(&[
        "annotate",
        "namespace",
        "team-a",
        "iam.amazonaws.com/permitted=app-.*",
    ])
    .await;
    let ns = fx.emulator.get(Kind::Namespace, None, "team-a").unwrap();
    assert_eq!(
        annotation(&ns, "iam.amazonaws.com/permitted").as_deref(),
        Some("app-.*")
    );

    // What kubectl actually sent: JSON merge patches.
    let patches: Vec<_> = fx
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 4, "{patches:#?}");
    for patch in &patches {
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_deletes_a_pod_without_hanging() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let mut watch = fx.watch("/api/v1/namespaces/team-a/pods?watch=true").await;
    watch.next_matching(|e| e["type"] == "ADDED").await;

    let out = fx
        .kubectl_ok(&["delete", "pod", "web", "-n", "team-a"])
        .await;
    assert!(out.contains("pod \"web\" deleted"), "{out}");
    assert!(fx.emulator.get(Kind::Pod, Some("team-a"), "web").is_err());
    let deleted = watch.next_matching(|e| e["type"] == "DELETED").await;
    assert_eq!(deleted["object"]["metadata"]["name"], "web");

    // Deleting the namespace takes its pods with it.
    fx.emulator
        .create(pod("team-a", "api", "10.1.0.6", &[]))
        .unwrap();
    fx.kubectl_ok(&["delete", "namespace", "team-a"]).await;
    assert!(
        fx.emulator
            .list(Kind::Pod, Some("team-a"))
            .unwrap()
            .is_empty()
    );
    assert!(fx.emulator.get(Kind::Namespace, None, "team-a").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_creates_from_manifests_and_watches_tables() {
    let fx = Fixture::start().await;
    // A multi-document manifest (a `kind: List` needs OpenAPI v2 schemas, not emulated).
    let manifest = fx.dir.join("objects.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-b\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: job\n  namespace: team-b\n\
         spec:\n  containers:\n  - name: c\n    image: busybox\n",
    )
    .unwrap();
    let out = fx
        .kubectl_ok(&["create", "-f", manifest.to_str().unwrap()])
        .await;
    assert!(
        out.contains("namespace/team-b created") && out.contains("pod/job created"),
        "{out}"
    );
    let job = fx.emulator.get(Kind::Pod, Some("team-b"), "job").unwrap();
    assert_eq!(job["status"]["phase"], "Pending");

    // `kubectl get -w` watches with Table output; it ends by --request-timeout.
    let (_, watched, stderr) = fx
        .kubectl(&["get", "pods", "-n", "team-b", "-w", "--request-timeout=2s"])
        .await;
    assert!(
        watched.lines().any(|l| l.starts_with("job")),
        "{watched}\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Patches and errors over raw HTTP
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn patches_of_every_flavour() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let path = "/api/v1/namespaces/team-a/pods/web";

    let (status, patched) = fx
        .request(
            "PATCH",
            path,
            Some("application/strategic-merge-patch+json"),
            Some(json!({
                "metadata": {"annotations": {"iam.amazonaws.com/role": "app-reader"}},
                "spec": {"containers": [{"name": "app", "image": "app:2"}]}
            })),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        annotation(&patched, "iam.amazonaws.com/role").as_deref(),
        Some("app-reader")
    );
    assert_eq!(
        patched["spec"]["containers"][0]["name"], "app",
        "merged by name"
    );
    assert_eq!(patched["spec"]["containers"][0]["image"], "app:2");

    let (status, patched) = fx
        .request(
            "PATCH",
            path,
            Some("application/merge-patch+json"),
            Some(json!({"metadata": {"annotations": {"iam.amazonaws.com/role": null}}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(annotation(&patched, "iam.amazonaws.com/role"), None);

    let (status, patched) = fx
        .request(
            "PATCH",
            path,
            Some("application/json-patch+json"),
            Some(json!([
                {"op": "test", "path": "/metadata/name", "value": "web"},
                {"op": "add", "path": "/metadata/labels/tier", "value": "front"}
            ])),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["metadata"]["labels"]["tier"], "front");

    // Status subresource: only status changes.
    let (status, patched) = fx
        .request(
            "PATCH",
            &format!("{path}/status"),
            Some("application/merge-patch+json"),
            Some(json!({"status": {"podIP": "10.1.0.9"}, "metadata": {"labels": {"x": "y"}}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["status"]["podIP"], "10.1.0.9");
    assert!(patched["metadata"]["labels"].get("x").is_none());

    // Identity cannot be patched away; stale resourceVersions conflict; dry runs write nothing.
    let cases = [
        (json!({"metadata": {"name": "other"}}), 400, "BadRequest"),
        (
            json!({"metadata": {"namespace": "other"}}),
            400,
            "BadRequest",
        ),
        (json!({"metadata": {"uid": "other"}}), 409, "Conflict"),
        (
            json!({"metadata": {"resourceVersion": "1"}}),
            409,
            "Conflict",
        ),
    ];
    for (patch, code, reason) in cases {
        let (status, body) = fx
            .request(
                "PATCH",
                path,
                Some("application/merge-patch+json"),
                Some(patch.clone()),
            )
            .await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (code, Some(reason)),
            "{patch}"
        );
    }
    let before = fx.emulator.resource_version();
    let (status, _) = fx
        .request(
            "PATCH",
            &format!("{path}?dryRun=All"),
            Some("application/merge-patch+json"),
            Some(json!({"metadata": {"labels": {"dry": "run"}}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(fx.emulator.resource_version(), before);

    let (status, body) = fx
        .request(
            "PATCH",
            path,
            Some("application/apply-patch+yaml"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (status, body) = fx
        .request(
            "PATCH",
            "/api/v1/namespaces/team-a/pods/nope",
            Some("application/merge-patch+json"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("pods \"nope\" not found"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_status_objects() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let web = fx.emulator.get(Kind::Pod, Some("team-a"), "web").unwrap();

    let mut stale = web.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let cases = [
        (
            "GET",
            "/api/v1/namespaces/team-a/pods/nope",
            None,
            404,
            "NotFound",
        ),
        (
            "POST",
            "/api/v1/namespaces/team-a/pods",
            Some(pod("team-a", "web", "1.1.1.1", &[])),
            409,
            "AlreadyExists",
        ),
        (
            "POST",
            "/api/v1/namespaces/missing/pods",
            Some(pod("missing", "x", "1.1.1.1", &[])),
            404,
            "NotFound",
        ),
        (
            "PUT",
            "/api/v1/namespaces/team-a/pods/web",
            Some(stale),
            409,
            "Conflict",
        ),
        (
            "POST",
            "/api/v1/namespaces/team-a/pods/web",
            Some(json!({})),
            405,
            "MethodNotAllowed",
        ),
        (
            "GET",
            "/api/v1/pods?labelSelector=a%20in%20b",
            None,
            400,
            "BadRequest",
        ),
        (
            "GET",
            "/api/v1/pods?limit=1&continue=garbage",
            None,
            400,
            "BadRequest",
        ),
        ("GET", "/api/v1/services", None, 404, "NotFound"),
    ];
    for (method, path, body, code, reason) in cases {
        let content_type = body.as_ref().map(|_| "application/json");
        let (status, status_object) = fx.request(method, path, content_type, body).await;
        assert_eq!(status, code, "{method} {path}: {status_object}");
        assert_eq!(status_object["kind"], "Status", "{method} {path}");
        assert_eq!(status_object["apiVersion"], "v1");
        assert_eq!(status_object["status"], "Failure");
        assert_eq!(status_object["reason"], reason, "{method} {path}");
        assert_eq!(status_object["code"], code);
    }
    let (_, not_found) = fx
        .request("GET", "/api/v1/namespaces/team-a/pods/nope", None, None)
        .await;
    assert_eq!(not_found["message"], "pods \"nope\" not found");
    assert_eq!(
        not_found["details"],
        json!({"name": "nope", "kind": "pods"})
    );

    // A PUT with the current resourceVersion succeeds and bumps it.
    let mut fresh = web.clone();
    fresh["metadata"]["labels"]["v"] = json!("2");
    let (status, updated) = fx
        .request(
            "PUT",
            "/api/v1/namespaces/team-a/pods/web",
            Some("application/json"),
            Some(fresh),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_ne!(
        updated["metadata"]["resourceVersion"],
        web["metadata"]["resourceVersion"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn selectors_filter_lists_and_watches() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    fx.emulator
        .create(pod("team-a", "db", "10.1.0.7", &[]))
        .unwrap();
    let mut host = pod("team-a", "host", "192.0.2.1", &[]);
    host["spec"]["hostNetwork"] = json!(true);
    fx.emulator.create(host).unwrap();

    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let cases = [
        ("labelSelector=app%3Dweb", vec!["web"]),
        ("labelSelector=app%20in%20(web%2Cdb)", vec!["db", "web"]),
        ("labelSelector=app!%3Dweb", vec!["db", "host"]),
        ("fieldSelector=status.podIP%3D10.1.0.7", vec!["db"]),
        ("fieldSelector=spec.hostNetwork%3Dfalse", vec!["db", "web"]),
        (
            "fieldSelector=metadata.name%3Dweb%2Cspec.nodeName%3Dnode-1",
            vec!["web"],
        ),
        ("fieldSelector=metadata.namespace!%3Dteam-a", vec![]),
    ];
    for (query, want) in cases {
        let (status, list) = fx
            .request("GET", &format!("/api/v1/pods?{query}"), None, None)
            .await;
        assert_eq!(status, 200, "{query}");
        assert_eq!(list["kind"], "PodList");
        assert_eq!(names(&list), want, "{query}");
    }

    // A pod that stops matching a watch's selector is sent as DELETED, then ADDED again.
    let mut watch = fx
        .watch("/api/v1/namespaces/team-a/pods?watch=1&labelSelector=app%3Dweb")
        .await;
    let added = watch.next().await.unwrap();
    assert_eq!(
        (
            added["type"].as_str(),
            added["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("web"))
    );
    fx.emulator
        .merge_patch(
            Kind::Pod,
            Some("team-a"),
            "web",
            json!({"metadata": {"labels": {"app": "other"}}}),
        )
        .unwrap();
    fx.emulator
        .merge_patch(
            Kind::Pod,
            Some("team-a"),
            "db",
            json!({"metadata": {"labels": {"app": "web"}}}),
        )
        .unwrap();
    let gone = watch.next().await.unwrap();
    assert_eq!(gone["type"], "DELETED");
    assert_eq!(gone["object"]["metadata"]["name"], "web");
    let came = watch.next().await.unwrap();
    assert_eq!(
        (
            came["type"].as_str(),
            came["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("db"))
    );
}

// ---------------------------------------------------------------------------------------
// Watch protocol over raw HTTP
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn watches_resume_replay_bookmark_and_time_out() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let rv = fx.emulator.resource_version();
    fx.emulator
        .create(pod("team-a", "later", "10.1.0.8", &[]))
        .unwrap();

    // From a specific resourceVersion: replay of what came after it, then bookmarks.
    let mut watch = fx
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await;
    let replayed = watch.next().await.unwrap();
    assert_eq!(replayed["type"], "ADDED");
    assert_eq!(replayed["object"]["metadata"]["name"], "later");
    let bookmark = watch.next_matching(|e| e["type"] == "BOOKMARK").await;
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    let bookmark_rv: u64 = bookmark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(bookmark_rv, fx.emulator.resource_version());

    // Streaming list: ADDED for everything, then the initial-events-end bookmark.
    let mut streaming = fx
        .watch("/api/v1/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true")
        .await;
    let mut initial = BTreeSet::new();
    let end = loop {
        let event = streaming.next().await.unwrap();
        match event["type"].as_str() {
            Some("ADDED") => {
                initial.insert(
                    event["object"]["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
            Some("BOOKMARK") => break event,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        initial,
        BTreeSet::from(["later".to_string(), "web".to_string()])
    );
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // timeoutSeconds ends the stream.
    let mut short = fx
        .watch("/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion=0")
        .await;
    while short.next().await.is_some() {}

    // Shutting the watches down ends them too.
    let mut closed = fx
        .watch(&format!("/api/v1/pods?watch=1&resourceVersion={rv}"))
        .await;
    closed.next().await.unwrap();
    fx.emulator.close_watches();
    assert!(closed.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_expires_old_resource_versions() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    fx.emulator
        .create(pod("team-a", "x", "10.1.0.9", &[]))
        .unwrap();
    let old_rv = fx.emulator.resource_version();
    let (_, first_page) = fx.request("GET", "/api/v1/pods?limit=1", None, None).await;
    let token = first_page["metadata"]["continue"]
        .as_str()
        .unwrap()
        .to_string();
    fx.emulator.compact();

    // The apiserver answers 200 and sends 410 as a single ERROR event, then ends the stream.
    let mut watch = fx
        .watch(&format!("/api/v1/pods?watch=1&resourceVersion={old_rv}"))
        .await;
    let error = watch.next().await.unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(watch.next().await.is_none());

    let (status, body) = fx
        .request(
            "GET",
            &format!("/api/v1/pods?limit=1&continue={token}"),
            None,
            None,
        )
        .await;
    assert_eq!((status, body["reason"].as_str()), (410, Some("Expired")));

    // A fresh list's resourceVersion can be watched from.
    let (_, list) = fx.request("GET", "/api/v1/pods", None, None).await;
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let mut fresh = fx
        .watch(&format!("/api/v1/pods?watch=1&resourceVersion={rv}"))
        .await;
    fx.emulator.delete(Kind::Pod, Some("team-a"), "x").unwrap();
    assert_eq!(fresh.next().await.unwrap()["type"], "DELETED");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_watchers_do_not_block_writers() {
    let fx = Fixture::with_options(EmulatorOptions {
        watch_buffer: 8,
        ..EmulatorOptions::default()
    })
    .await;
    fx.setup_team_a();
    // Opened and never read.
    let _unread = fx.watch("/api/v1/pods?watch=1").await;
    let big = "x".repeat(4096);
    let writes = tokio::time::timeout(DEADLINE, async {
        for i in 0..500 {
            fx.emulator
                .create(pod(
                    "team-a",
                    &format!("p{i}"),
                    "10.2.0.1",
                    &[("big", &big)],
                ))
                .unwrap();
            tokio::task::yield_now().await;
        }
    });
    writes.await.expect("writes must not wait for watchers");
    let (status, list) = fx
        .request("GET", "/api/v1/namespaces/team-a/pods?limit=1", None, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["metadata"]["remainingItemCount"], 500);
}

// ---------------------------------------------------------------------------------------
// kube-rs
// ---------------------------------------------------------------------------------------

/// Runs a kube-rs reflector over all pods; returns its reader and the task.
fn reflect_pods(
    client: kube::Client,
    config: watcher::Config,
) -> (
    reflector::Store<Pod>,
    JoinHandle<()>,
    std::sync::Arc<AtomicUsize>,
) {
    let (reader, writer) = reflector::store();
    let gone_errors = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&gone_errors);
    let stream = reflector(writer, watcher(Api::<Pod>::all(client), config))
        .default_backoff()
        .inspect_err(move |error| {
            if let watcher::Error::WatchError(status) = error
                && status.code == 410
            {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
    let task = tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    (reader, task, gone_errors)
}

fn pod_names(reader: &reflector::Store<Pod>) -> BTreeSet<String> {
    reader
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_watcher_sees_initial_list_and_changes() {
    for streaming in [false, true] {
        let fx = Fixture::start().await;
        fx.setup_team_a();
        fx.emulator
            .create(pod("team-a", "api", "10.1.0.6", &[]))
            .unwrap();
        let config = if streaming {
            watcher::Config::default().streaming_lists()
        } else {
            watcher::Config::default()
        };
        let (reader, task, _) = reflect_pods(fx.kube_client().await, config);
        tokio::time::timeout(DEADLINE, reader.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            pod_names(&reader),
            set(&["api", "web"]),
            "streaming={streaming}"
        );

        fx.emulator
            .create(pod("team-a", "new", "10.1.0.7", &[]))
            .unwrap();
        wait_until(DEADLINE, "the new pod is seen", || async {
            pod_names(&reader).contains("new")
        })
        .await
        .expect("the condition within the deadline");

        fx.emulator
            .merge_patch(
                Kind::Pod,
                Some("team-a"),
                "web",
                json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "app-reader"}}}),
            )
            .unwrap();
        wait_until(DEADLINE, "the annotation is seen", || async {
            reader.state().iter().any(|p| {
                p.metadata.name.as_deref() == Some("web")
                    && p.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("iam.amazonaws.com/role"))
                        == Some(&"app-reader".to_string())
            })
        })
        .await
        .expect("the condition within the deadline");

        fx.emulator
            .delete(Kind::Pod, Some("team-a"), "api")
            .unwrap();
        wait_until(DEADLINE, "the deleted pod is gone", || async {
            pod_names(&reader) == set(&["new", "web"])
        })
        .await
        .expect("the condition within the deadline");
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_watcher_relists_after_410() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let (reader, task, gone_errors) =
        reflect_pods(fx.kube_client().await, watcher::Config::default());
    tokio::time::timeout(DEADLINE, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let lists_before = fx
        .emulator
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.query.contains("watch"))
        .count();

    // Compact, then end the watch: the watcher resumes from a resourceVersion that is gone,
    // gets 410, and relists.
    fx.emulator.compact();
    fx.emulator.close_watches();
    wait_until(DEADLINE, "the watcher saw 410 Gone", || async {
        gone_errors.load(Ordering::SeqCst) > 0
    })
    .await
    .expect("the condition within the deadline");
    wait_until(DEADLINE, "the watcher relisted", || async {
        fx.emulator
            .requests()
            .iter()
            .filter(|r| r.path == "/api/v1/pods" && !r.query.contains("watch"))
            .count()
            > lists_before
    })
    .await
    .expect("the condition within the deadline");

    fx.emulator
        .create(pod("team-a", "after", "10.1.0.8", &[]))
        .unwrap();
    fx.emulator
        .delete(Kind::Pod, Some("team-a"), "web")
        .unwrap();
    wait_until(DEADLINE, "the watcher converged", || async {
        pod_names(&reader) == set(&["after"])
    })
    .await
    .expect("the condition within the deadline");
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_lists_in_pages() {
    let fx = Fixture::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    for i in 0..5 {
        fx.emulator
            .create(pod("team-a", &format!("p{i}"), &format!("10.3.0.{i}"), &[]))
            .unwrap();
    }
    let api = Api::<Pod>::all(fx.kube_client().await);
    let mut names = Vec::new();
    let mut pages = 0;
    let mut params = ListParams::default().limit(2);
    loop {
        let page = api.list(&params).await.unwrap();
        pages += 1;
        if pages == 1 {
            assert_eq!(page.metadata.remaining_item_count, Some(3));
        }
        names.extend(page.items.iter().filter_map(|p| p.metadata.name.clone()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);

    // A continue token from before a compaction is Expired.
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    fx.emulator.compact();
    let token = first.metadata.continue_.unwrap();
    match api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_pod_deletion_marks_then_removes() {
    let fx = Fixture::with_options(EmulatorOptions {
        pod_deletion: PodDeletion::Graceful,
        ..EmulatorOptions::default()
    })
    .await;
    fx.setup_team_a();
    let marked = fx
        .emulator
        .delete(Kind::Pod, Some("team-a"), "web")
        .unwrap();
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let shown = fx.kubectl_ok(&["get", "pods", "-n", "team-a"]).await;
    assert!(shown.contains("Terminating"), "{shown}");
    fx.emulator
        .force_delete(Kind::Pod, Some("team-a"), "web")
        .unwrap();
    assert!(fx.emulator.get(Kind::Pod, Some("team-a"), "web").is_err());
}

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn binary_prints_its_address_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("podiam-kube-emulator-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_podiam-kube-emulator"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .env("PODIAM_EMULATOR_BOOKMARK_INTERVAL_MS", "200")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the emulator binary");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");

    let output = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "ns", "-o", "name"])
        .env("HOME", &dir)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("namespace/default"));

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_refuses_connections_and_ends_watches_then_service_resumes() {
    let fx = Fixture::start().await;
    fx.setup_team_a();
    let (reader, task, _) = reflect_pods(fx.kube_client().await, watcher::Config::default());
    tokio::time::timeout(DEADLINE, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();

    fx.emulator.go_down().await;
    let (ok, _, stderr) = fx.kubectl(&["get", "pods", "-A"]).await;
    assert!(!ok, "kubectl worked during the outage");
    assert!(stderr.contains("refused"), "{stderr}");
    // Changed while away: no watcher can see it yet.
    fx.emulator
        .create(pod("team-a", "while-away", "10.1.0.9", &[]))
        .unwrap();
    assert!(!pod_names(&reader).contains("while-away"));

    fx.emulator.come_back().await.expect("listening again");
    let listed = fx
        .kubectl_ok(&["get", "pods", "-n", "team-a", "-o", "name"])
        .await;
    assert!(listed.contains("pod/while-away"), "{listed}");
    wait_until(
        DEADLINE,
        "the watcher to see the change made during the outage",
        || async { pod_names(&reader).contains("while-away") },
    )
    .await
    .expect("the condition within the deadline");

    // A slow API server: each list waits, watches do not.
    fx.emulator.set_list_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    fx.kubectl_ok(&["get", "pods", "-n", "team-a"]).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    fx.emulator.set_list_delay(Duration::ZERO);
    task.abort();
}

// ---------------------------------------------------------------------------------------
// Mutating admission webhooks
// ---------------------------------------------------------------------------------------

/// A throwaway CA: its PEM and an issuer of leaf certificates.
fn test_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(params, key))
}

/// What the test webhook saw: each review (with the path it came to), and how many slow
/// calls were abandoned by their caller before the webhook answered.
#[derive(Default)]
struct HookLog {
    reviews: Mutex<Vec<(String, Value)>>,
    abandoned: AtomicUsize,
}

/// A tiny HTTPS admission webhook, its certificate for `localhost`, `127.0.0.1` and
/// `hook.ns.svc`. Paths: `/label` adds the label `podiam.test/labelled: "true"`; `/mutate`
/// adds the env var `INJECTED=yes` to the first container and the volume `injected`;
/// `/deny` denies with 403; `/slow` holds its answer until the caller goes or 20 s pass.
struct TestWebhook {
    addr: SocketAddr,
    /// `caBundle`: base64 of the CA's PEM.
    ca_bundle: String,
    log: Arc<HookLog>,
}

impl TestWebhook {
    async fn start() -> TestWebhook {
        podiam_runtime::tls::install_crypto_provider();
        let (ca_pem, issuer) = test_ca("test webhook CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "hook.ns.svc".into()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(HookLog::default());
        tokio::spawn(serve_webhook(listener, acceptor, Arc::clone(&log)));
        TestWebhook {
            addr,
            ca_bundle: BASE64.encode(ca_pem),
            log,
        }
    }

    /// The reviews received so far, with their paths.
    fn reviews(&self) -> Vec<(String, Value)> {
        self.log.reviews.lock().unwrap().clone()
    }
}

async fn serve_webhook(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    log: Arc<HookLog>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
        tokio::spawn(async move {
            // A caller that does not trust the certificate ends the handshake.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |request| answer_review(Arc::clone(&log), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Counts a slow call as abandoned unless it was answered (dropped with its connection).
struct Holding(Arc<HookLog>, bool);

impl Drop for Holding {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn answer_review(
    log: Arc<HookLog>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let path = request.uri().path().to_string();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    log.reviews
        .lock()
        .unwrap()
        .push((path.clone(), review.clone()));
    let uid = review["request"]["uid"].clone();
    let pod = &review["request"]["object"];
    let patch = |operations: Value| {
        json!({"uid": uid, "allowed": true, "patchType": "JSONPatch",
               "patch": BASE64.encode(operations.to_string())})
    };
    let response = match path.as_str() {
        "/label" => patch(
            json!([{"op": "add", "path": "/metadata/labels/podiam.test~1labelled",
                                   "value": "true"}]),
        ),
        "/mutate" => patch(injection(pod)),
        "/deny" => json!({"uid": uid, "allowed": false, "status": {
            "code": 403, "reason": "Forbidden", "message": "pods in team-a need an owner"}}),
        "/slow" => {
            let mut holding = Holding(Arc::clone(&log), false);
            tokio::time::sleep(Duration::from_secs(20)).await;
            holding.1 = true;
            json!({"uid": uid, "allowed": true})
        }
        _ => json!({"uid": uid, "allowed": true}),
    };
    let answer = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": response});
    let mut reply = http::Response::new(Full::new(Bytes::from(answer.to_string())));
    reply.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(reply)
}

/// The JSON patch of `/mutate`: an env var in the first container and a volume.
fn injection(pod: &Value) -> Value {
    let env = json!({"name": "INJECTED", "value": "yes"});
    let volume = json!({"name": "injected", "emptyDir": {}});
    // Append to a list the pod has, else add the list (a JSON patch cannot do both).
    let append = |path: &str, item: Value| {
        if pod.pointer(path).is_some_and(Value::is_array) {
            json!({"op": "add", "path": format!("{path}/-"), "value": item})
        } else {
            json!({"op": "add", "path": path, "value": [item]})
        }
    };
    let operations = vec![
        append("/spec/containers/0/env", env),
        append("/spec/volumes", volume),
    ];
    Value::Array(operations)
}

/// One `webhooks[]` entry for pod creations, with `extra` fields set over it.
fn pod_webhook(name: &str, client_config: Value, extra: Value) -> Value {
    let mut webhook = json!({
        "name": name,
        "clientConfig": client_config,
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"]}],
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    });
    for (field, value) in extra.as_object().into_iter().flatten() {
        webhook[field] = value.clone();
    }
    webhook
}

impl Fixture {
    /// `kubectl apply -f` of a MutatingWebhookConfiguration; returns kubectl's output.
    async fn apply_webhooks(&self, name: &str, webhooks: &[Value]) -> String {
        let path = self.dir.join(format!("{name}.json"));
        let configuration = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": webhooks,
        });
        std::fs::write(&path, configuration.to_string()).unwrap();
        self.kubectl_ok(&["apply", "-f", path.to_str().unwrap()])
            .await
    }

    /// `kubectl create -f` of a pod `name` in `namespace` with kubeconfig `kubeconfig`.
    async fn kubectl_create_pod(&self, kubeconfig: &Path, namespace: &str, name: &str) -> Kubectl {
        let path = self.dir.join(format!("pod-{namespace}-{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
                 labels:\n    app: {name}\nspec:\n  containers:\n  - name: app\n    \
                 image: registry.invalid/app:latest\n"
            ),
        )
        .unwrap();
        self.kubectl_with(kubeconfig, &["create", "-f", path.to_str().unwrap()])
            .await
    }

    fn stored_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.emulator.get(Kind::Pod, Some(namespace), name).ok()
    }
}

fn injected(pod: &Value) -> bool {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .is_some_and(|env| {
            env.iter()
                .any(|e| e["name"] == "INJECTED" && e["value"] == "yes")
        })
        && pod["spec"]["volumes"]
            .as_array()
            .is_some_and(|volumes| volumes.iter().any(|v| v["name"] == "injected"))
}

/// What the two webhooks of `mutating_webhooks_patch_pods_that_kubectl_creates` were sent
/// about alice's pod `web`, and the calls the emulator logged.
fn check_reviews_and_calls_of_web(fx: &Fixture, hook: &TestWebhook) {
    let reviews = hook.reviews();
    let paths: Vec<&str> = reviews.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(paths, ["/label", "/mutate"]);
    let (first, second) = (&reviews[0].1["request"], &reviews[1].1["request"]);
    assert_eq!(reviews[0].1["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(first["operation"], "CREATE");
    assert_eq!(first["namespace"], "team-a");
    assert_eq!(first["name"], "web");
    assert_eq!(
        first["kind"],
        json!({"group": "", "version": "v1", "kind": "Pod"})
    );
    assert_eq!(
        first["resource"],
        json!({"group": "", "version": "v1", "resource": "pods"})
    );
    assert_eq!(first["userInfo"]["username"], "alice");
    assert!(
        first["userInfo"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("devs"))
    );
    assert_eq!(first["oldObject"], Value::Null);
    assert_eq!(first["dryRun"], false);
    assert_eq!(first["options"]["kind"], "CreateOptions");
    assert_eq!(first["object"]["spec"]["containers"][0]["name"], "app");
    assert!(
        first["object"]["metadata"]["labels"]
            .get("podiam.test/labelled")
            .is_none()
    );
    assert_eq!(
        second["object"]["metadata"]["labels"]["podiam.test/labelled"],
        "true"
    );
    assert!(!first["uid"].as_str().unwrap().is_empty());
    assert_ne!(first["uid"], second["uid"]);
    let calls = fx.emulator.webhook_calls();
    let outcomes: Vec<(&str, &WebhookOutcome)> = calls
        .iter()
        .map(|c| (c.webhook.as_str(), &c.outcome))
        .collect();
    let patched = WebhookOutcome::Allowed { patched: true };
    assert_eq!(
        outcomes,
        [
            ("label.podiam.test", &patched),
            ("inject.podiam.test", &patched)
        ]
    );
    assert_eq!(
        (calls[0].configuration.as_str(), calls[0].pod.as_str()),
        ("inject", "web")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutating_webhooks_patch_pods_that_kubectl_creates() {
    let fx = Fixture::start().await;
    let hook = TestWebhook::start().await;
    for name in ["team-a", "team-b"] {
        fx.emulator.create(namespace(name, &[])).unwrap();
    }
    fx.emulator.route_service("ns", "hook", 443, hook.addr);
    let service = |path: &str| {
        json!({"service": {"namespace": "ns", "name": "hook", "path": path},
               "caBundle": hook.ca_bundle})
    };
    // Only team-a, by the label every namespace carries; the second webhook only sees pods
    // the first one labelled: it gets the pod as the first left it.
    let team_a = json!({"namespaceSelector": {"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a"]}]}});
    let mut inject = team_a.clone();
    inject["objectSelector"] = json!({"matchLabels": {"podiam.test/labelled": "true"}});
    let out = fx
        .apply_webhooks(
            "inject",
            &[
                pod_webhook("label.podiam.test", service("/label"), team_a),
                pod_webhook("inject.podiam.test", service("/mutate"), inject),
            ],
        )
        .await;
    assert!(
        out.contains("mutatingwebhookconfiguration.admissionregistration.k8s.io/inject created"),
        "{out}"
    );
    let listed = fx
        .kubectl_ok(&["get", "mutatingwebhookconfigurations"])
        .await;
    assert!(
        listed.contains("WEBHOOKS")
            && listed
                .lines()
                .any(|l| l.starts_with("inject ") && l.contains(" 2 ")),
        "{listed}"
    );

    // A user the emulator knows by token creates the pod with kubectl.
    fx.emulator
        .add_user_token("alice-token", "alice", &["system:masters", "devs"]);
    let alice = fx.dir.join("alice.kubeconfig");
    fx.emulator
        .write_kubeconfig_for_token(&alice, "alice-token")
        .unwrap();
    let created = fx.kubectl_create_pod(&alice, "team-a", "web").await;
    assert!(created.ok, "{created:?}");
    let web = fx.stored_pod("team-a", "web").unwrap();
    assert!(injected(&web), "{web:#}");
    assert_eq!(web["metadata"]["labels"]["podiam.test/labelled"], "true");

    check_reviews_and_calls_of_web(&fx, &hook);

    // Another namespace: no call, no mutation.
    let created = fx.kubectl_create_pod(&fx.kubeconfig, "team-b", "web").await;
    assert!(created.ok, "{created:?}");
    assert!(!injected(&fx.stored_pod("team-b", "web").unwrap()));
    assert_eq!(hook.reviews().len(), 2);
    assert_eq!(fx.emulator.webhook_calls().len(), 2);

    // Once the configuration is deleted, team-a's pods are created as sent.
    let deleted = fx
        .kubectl_ok(&["delete", "mutatingwebhookconfiguration", "inject"])
        .await;
    assert!(deleted.contains("deleted"), "{deleted}");
    let created = fx
        .kubectl_create_pod(&fx.kubeconfig, "team-a", "plain")
        .await;
    assert!(created.ok, "{created:?}");
    assert!(!injected(&fx.stored_pod("team-a", "plain").unwrap()));
    assert_eq!(hook.reviews().len(), 2);
}

/// Creates pod `name` in team-a with kubectl and requires the creation to fail with
/// `failed calling webhook "WEBHOOK": …` containing `why`; returns kubectl's error.
async fn creation_fails(fx: &Fixture, name: &str, webhook: &str, why: &str) -> String {
    let created = fx.kubectl_create_pod(&fx.kubeconfig, "team-a", name).await;
    assert!(!created.ok, "{created:?}");
    let expected = format!(
        "Error from server (InternalError): error when creating \"{}\": Internal error \
         occurred: failed calling webhook \"{webhook}\": ",
        fx.dir.join(format!("pod-team-a-{name}.yaml")).display()
    );
    assert!(created.stderr.contains(&expected), "{created:?}");
    assert!(created.stderr.contains(why), "{created:?} lacks {why:?}");
    assert!(fx.stored_pod("team-a", name).is_none());
    let last = fx.emulator.webhook_calls().pop().unwrap();
    assert!(
        matches!(&last.outcome, WebhookOutcome::Failed { ignored: false, .. }),
        "{last:?}"
    );
    created.stderr
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_webhooks_follow_their_failure_policy() {
    let fx = Fixture::start().await;
    let hook = TestWebhook::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    let closed = ClosedPort::bind().unwrap();
    let unreachable = json!({"url": format!("https://127.0.0.1:{}/mutate", closed.addr().port()),
                             "caBundle": hook.ca_bundle});
    fx.apply_webhooks(
        "broken",
        &[pod_webhook(
            "unreachable.podiam.test",
            unreachable.clone(),
            json!({}),
        )],
    )
    .await;
    creation_fails(&fx, "refused", "unreachable.podiam.test", "refused").await;
    // The Status on the wire, as the apiserver's.
    let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "raw"},
                      "spec": {"containers": [{"name": "app", "image": "busybox"}]}});
    let (code, status) = fx
        .request(
            "POST",
            "/api/v1/namespaces/team-a/pods",
            Some("application/json"),
            Some(body),
        )
        .await;
    assert_eq!(
        (code, &status["reason"]),
        (500, &json!("InternalError")),
        "{status}"
    );
    assert!(
        status["message"].as_str().unwrap().starts_with(
            "Internal error occurred: failed calling webhook \"unreachable.podiam.test\": "
        ),
        "{status}"
    );

    // Ignore: the pod is created as sent.
    let ignore = json!({"failurePolicy": "Ignore"});
    let out = fx
        .apply_webhooks(
            "broken",
            &[pod_webhook("unreachable.podiam.test", unreachable, ignore)],
        )
        .await;
    assert!(out.contains("configured"), "{out}");
    let created = fx
        .kubectl_create_pod(&fx.kubeconfig, "team-a", "ignored")
        .await;
    assert!(created.ok, "{created:?}");
    assert!(!injected(&fx.stored_pod("team-a", "ignored").unwrap()));
    let last = fx.emulator.webhook_calls().pop().unwrap();
    assert!(
        matches!(&last.outcome, WebhookOutcome::Failed { ignored: true, error } if error.contains("refused")),
        "{last:?}"
    );
    assert!(hook.reviews().is_empty());
    fx.kubectl_ok(&["delete", "mutatingwebhookconfiguration", "broken"])
        .await;

    // A certificate the caBundle does not vouch for.
    fx.emulator.route_service("ns", "hook", 443, hook.addr);
    let (other_ca, _) = test_ca("another CA");
    let untrusted = json!({"service": {"namespace": "ns", "name": "hook", "path": "/mutate"},
                           "caBundle": BASE64.encode(other_ca)});
    fx.apply_webhooks(
        "untrusted",
        &[pod_webhook("untrusted.podiam.test", untrusted, json!({}))],
    )
    .await;
    creation_fails(&fx, "untrusted", "untrusted.podiam.test", "certificate").await;
    assert!(hook.reviews().is_empty());
    fx.kubectl_ok(&["delete", "mutatingwebhookconfiguration", "untrusted"])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_slower_than_their_timeout_fail() {
    let fx = Fixture::start().await;
    let hook = TestWebhook::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    let slow = json!({"url": format!("https://localhost:{}/slow", hook.addr.port()),
                      "caBundle": hook.ca_bundle});
    fx.apply_webhooks(
        "slow",
        &[pod_webhook(
            "slow.podiam.test",
            slow,
            // Time for a handshake and the review on a busy machine; the hook takes 20 s.
            json!({"timeoutSeconds": 8}),
        )],
    )
    .await;
    creation_fails(&fx, "late", "slow.podiam.test", "context deadline exceeded").await;
    assert_eq!(hook.reviews().len(), 1);
    assert!(hook.reviews()[0].1["request"]["uid"].is_string());
    // The emulator hung up: the webhook sees its caller go long before its 20 s are up.
    wait_until(
        DEADLINE,
        "the slow webhook to see its caller go",
        || async { hook.log.abandoned.load(Ordering::SeqCst) == 1 },
    )
    .await
    .expect("the condition within the deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn denying_webhooks_reject_pods_with_their_message() {
    let fx = Fixture::start().await;
    let hook = TestWebhook::start().await;
    fx.emulator.create(namespace("team-a", &[])).unwrap();
    fx.emulator.route_service("ns", "hook", 8443, hook.addr);
    let deny = json!({"service": {"namespace": "ns", "name": "hook", "port": 8443,
                                  "path": "/deny"},
                      "caBundle": hook.ca_bundle});
    fx.apply_webhooks("deny", &[pod_webhook("deny.podiam.test", deny, json!({}))])
        .await;
    let created = fx.kubectl_create_pod(&fx.kubeconfig, "team-a", "web").await;
    assert!(!created.ok, "{created:?}");
    assert!(
        created.stderr.contains(
            "admission webhook \"deny.podiam.test\" denied the request: pods in team-a need an owner"
        ),
        "{created:?}"
    );
    assert!(fx.stored_pod("team-a", "web").is_none());
    let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "raw"},
                      "spec": {"containers": [{"name": "app", "image": "busybox"}]}});
    let (code, status) = fx
        .request(
            "POST",
            "/api/v1/namespaces/team-a/pods",
            Some("application/json"),
            Some(body),
        )
        .await;
    assert_eq!(
        (code, &status["reason"]),
        (403, &json!("Forbidden")),
        "{status}"
    );
    let calls = fx.emulator.webhook_calls();
    assert_eq!(calls.len(), 2);
    assert!(
        matches!(&calls[1].outcome, WebhookOutcome::Denied { code: 403, message }
                 if message.ends_with("need an owner")),
        "{calls:?}"
    );
    // Pods created in process skip admission.
    fx.emulator
        .create(pod("team-a", "in-process", "10.1.0.7", &[]))
        .unwrap();
    assert_eq!(fx.emulator.webhook_calls().len(), 2);
}
