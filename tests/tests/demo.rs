//! The README's first command runs `podiam-demo`; this proves it shows what it promises and
//! tears everything down, both when it finishes and when interrupted with Ctrl-C. Needs root.

use std::time::Duration;

use nix::sys::signal::Signal;
use podiam_tests::netns::{self, NAME_PREFIX};
use podiam_tests::process::{ChildGuard, wait_until};
use podiam_tests::world::binary;

const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

/// The demo's namespaces still present (they are named after its pid).
fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("{NAME_PREFIX}{pid}-");
    netns::list_all()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Starts the demo; on drop (a failed test) it gets SIGTERM, which tears its world down.
fn start_demo(args: &[&str]) -> ChildGuard {
    netns::require_root();
    let mut command = tokio::process::Command::new(binary("podiam-demo").expect("built"));
    command.args(args);
    ChildGuard::spawn("podiam-demo", command).expect("spawns")
}

fn log(demo: &ChildGuard) -> String {
    std::fs::read_to_string(demo.log_path()).expect("demo log")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_shows_grant_and_revoke_and_cleans_up() {
    let mut demo = start_demo(&[]);
    let status = demo
        .wait_exit(DEMO_TIMEOUT)
        .await
        .expect("the demo finishes in time");
    let output = log(&demo);
    assert!(status.success(), "demo failed:\n{output}");
    // Before: A has its role, B has nothing; after: the reverse.
    let before = output.split("[3/4]").next().expect("before");
    let after = output.split("[4/4]").nth(1).expect("after");
    assert!(before.contains("assumed-role/app-reader/"), "{output}");
    assert!(before.contains("Unable to locate credentials"), "{output}");
    assert!(after.contains("assumed-role/app-writer/"), "{output}");
    assert!(after.contains("Unable to locate credentials"), "{output}");
    assert!(!after.contains("app-reader"), "{output}");
    assert!(output.contains("pod/pod-b annotated"), "{output}");
    assert!(output.contains("torn down"), "{output}");
    assert_eq!(namespaces_of(demo.pid()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_tears_the_demo_down() {
    let mut demo = start_demo(&["--hold"]);
    let log_path = demo.log_path().to_path_buf();
    wait_until(DEMO_TIMEOUT, "the demo to reach its hold", || {
        let log_path = log_path.clone();
        async move {
            std::fs::read_to_string(log_path).is_ok_and(|l| l.contains("holding until Ctrl-C"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", log(&demo)));
    assert!(
        !namespaces_of(demo.pid()).is_empty(),
        "while holding, the demo's namespaces exist"
    );

    demo.signal(Signal::SIGINT).expect("SIGINT");
    let status = demo.wait_exit(DEMO_TIMEOUT).await.expect("exits in time");
    let output = log(&demo);
    assert!(status.success(), "{status}: {output}");
    assert!(
        output.contains("interrupted: tearing down") && output.contains("torn down"),
        "{output}"
    );
    assert_eq!(namespaces_of(demo.pid()), Vec::<String>::new());
}
