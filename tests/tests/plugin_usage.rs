//! `kubectl iam` without a server: usage mistakes, help, and `status` when no replica
//! exists, against the Kubernetes API emulator alone. No root needed (the suites with
//! servers and an agent are in `plugin.rs`). Build the binaries first
//! (`cargo build --workspace --bins`).

use std::path::{Path, PathBuf};

use kubectl_iam::cli::{Kube2iamFormat, KubeArgs};
use kubectl_iam::cluster::Cluster;
use kubectl_iam::migrate;
use podiam_tests::kube_emulator::{EmulatorOptions, Kind, KubeEmulator, namespace};
use podiam_tests::plugin::iam;
use podiam_tests::process::scratch_dir;
use serde_json::{Value, json};

async fn emulator_only(label: &str) -> (KubeEmulator, PathBuf) {
    let emulator = KubeEmulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        EmulatorOptions::default(),
    )
    .await
    .expect("emulator");
    let kubeconfig = scratch_dir(label).expect("dir").join("kubeconfig");
    emulator.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (emulator, kubeconfig)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_fails_when_there_is_no_server() {
    let (emulator, kubeconfig) = emulator_only("plugin-status").await;
    let run = iam(&kubeconfig, &["status", "-o", "json"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        "kubectl-iam: no podiam server replica is ready: no pod labelled \
         app.kubernetes.io/name=podiam-server in namespace podiam\n"
    );
    let report = run.json();
    assert_eq!(report["ready"], false);
    assert_eq!(report["servers"], Value::Null);
    emulator
        .create(namespace("podiam", &[]))
        .expect("namespace");
    let text = iam(&kubeconfig, &["status"]).await;
    assert_eq!(text.code, 1);
    assert!(
        text.stdout
            .contains("none labelled app.kubernetes.io/name=podiam-server in namespace podiam"),
        "{text:?}"
    );
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_mistakes_exit_2_and_every_command_has_help() {
    let (emulator, kubeconfig) = emulator_only("plugin-usage").await;
    for args in [
        &[][..],
        &["bogus"][..],
        &["grant", "web"][..],
        &["explain"][..],
        &["explain", "deployment/web"][..],
        &["explain", "web", "--server", "http://podiam:8443"][..],
        &["explain", "web", "--server", "https://podiam:8443"][..],
        &["status", "-o", "yaml"][..],
    ] {
        let run = iam(&kubeconfig, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}");
    }
    for command in ["grant", "revoke", "permit", "explain", "status"] {
        let help = iam(&kubeconfig, &[command, "--help"]).await.ok();
        assert!(
            help.stdout
                .contains(&format!("Usage: kubectl iam {command}")),
            "{help:?}"
        );
        assert!(help.stdout.contains("--kubeconfig"), "{command}");
    }
    // An API that does not answer is a failure, not a usage mistake.
    let dead = tempfile_kubeconfig(&kubeconfig, "http://127.0.0.1:1");
    let run = iam(&dead, &["revoke", "web"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("kubectl-iam: reading pod default/web"),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    emulator.shutdown().await;
}

/// A copy of `kubeconfig` pointing at `server`.
fn tempfile_kubeconfig(kubeconfig: &Path, server: &str) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let rewritten: String = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("server:") {
                format!("    server: {server}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let path = kubeconfig.with_file_name("dead-kubeconfig");
    std::fs::write(&path, rewritten).expect("written");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_converts_kube2iam_lists_and_reports_kiam_alternations() {
    let (emulator, kubeconfig) = emulator_only("plugin-migrate").await;
    for (name, annotations) in [
        (
            "from-kube2iam",
            &[(
                "iam.amazonaws.com/allowed-roles",
                r#"["app-*", "db-reader"]"#,
            )][..],
        ),
        (
            "from-kiam",
            &[("iam.amazonaws.com/permitted", "app-a|app-b")][..],
        ),
        ("fine", &[("iam.amazonaws.com/permitted", "app-.*")][..]),
        ("untouched", &[][..]),
    ] {
        emulator
            .create(namespace(name, annotations))
            .expect("namespace");
    }
    let report = iam(&kubeconfig, &["migrate", "-o", "json"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    let rows = report.json()["namespaces"].clone();
    let row = |name: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|r| r["namespace"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name}: {rows}"))
    };
    assert_eq!(row("from-kube2iam")["permitted"], "app-[^:]*|db-reader");
    assert_eq!(row("from-kube2iam")["written"], false);
    assert!(
        row("from-kiam")["note"]
            .as_str()
            .expect("note")
            .contains("(?:app-a).*|.*(?:app-b)"),
        "{rows}"
    );
    assert_eq!(row("fine")["note"], "the same under podiam");
    assert_eq!(rows.as_array().expect("rows").len(), 3, "{rows}");
    // Nothing written without --write.
    let stored = |name: &str| {
        emulator
            .get(podiam_tests::kube_emulator::Kind::Namespace, None, name)
            .expect("namespace")["metadata"]["annotations"]["iam.amazonaws.com/permitted"]
            .clone()
    };
    assert_eq!(stored("from-kube2iam"), Value::Null);

    let written = iam(&kubeconfig, &["migrate", "--write"]).await;
    assert_eq!(written.code, 0, "{written:?}");
    assert!(written.stdout.contains("written"), "{written:?}");
    assert_eq!(stored("from-kube2iam"), "app-[^:]*|db-reader");
    // kiam's regex is left as it is: its reading is for people to decide.
    assert_eq!(stored("from-kiam"), "app-a|app-b");
    emulator.shutdown().await;
}

/// `migrate --write` writes a converted regex only over the namespace as it read it: one
/// changed between the list and the write (here someone permits a role by hand) keeps that
/// change, and the next run reads it. The library's own list and write, with the change made
/// between them, as the command would meet it.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_writes_nothing_over_a_namespace_changed_since_it_was_read() {
    let (emulator, kubeconfig) = emulator_only("plugin-migrate-changed").await;
    for name in ["changed", "unchanged"] {
        emulator
            .create(namespace(
                name,
                &[("iam.amazonaws.com/allowed-roles", r#"["app-*"]"#)],
            ))
            .expect("namespace");
    }
    let cluster = Cluster::connect(&KubeArgs {
        kubeconfig: Some(kubeconfig.clone()),
        context: None,
        namespace: None,
        podiam_namespace: "podiam".into(),
    })
    .await
    .expect("cluster");
    let mut plans: Vec<migrate::Plan> = cluster
        .list_namespaces()
        .await
        .expect("namespaces")
        .iter()
        .filter_map(|ns| migrate::plan(ns, Kube2iamFormat::Glob, None))
        .collect();
    assert_eq!(plans.len(), 2, "{plans:?}");
    emulator
        .merge_patch(
            Kind::Namespace,
            None,
            "changed",
            json!({"metadata": {"annotations": {"iam.amazonaws.com/permitted": "db-reader"}}}),
        )
        .expect("the change by hand");
    let written = migrate::write(&cluster, &mut plans)
        .await
        .expect("the writes");
    assert_eq!(written, ["unchanged"]);
    let stored = |name: &str| {
        emulator
            .get(Kind::Namespace, None, name)
            .expect("namespace")["metadata"]["annotations"]["iam.amazonaws.com/permitted"]
            .clone()
    };
    assert_eq!(stored("changed"), "db-reader");
    assert_eq!(stored("unchanged"), "app-[^:]*");
    let changed = plans
        .iter()
        .find(|p| p.namespace == "changed")
        .expect("its plan");
    assert_eq!(changed.note, migrate::CHANGED);
    // Run again, the command finds a regex there and leaves it.
    let again = iam(&kubeconfig, &["migrate", "--write"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(stored("changed"), "db-reader");
    emulator.shutdown().await;
}
