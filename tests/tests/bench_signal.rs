//! The benchmark stopped by a signal (^C, SIGTERM) removes what it started, as it does when
//! it ends or fails: its processes (the emulator, moto, the server, the agent, nginx, the
//! minimal server, wrk) stop, and its network namespaces (with their veths and the rules in
//! them) go.
//!
//! Needs root (the real-path section's namespaces), `wrk` and nginx (`scripts/setup`), and
//! the built binaries.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use podiam_tests::netns::require_root;
use podiam_tests::process::{ChildGuard, wait_until};
use podiam_tests::world::binary;

/// The processes descending from `root` now (not `root` itself).
fn descendants(root: u32) -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = BTreeSet::from([root]);
    loop {
        let before = found.len();
        for (pid, ppid) in &parents {
            if found.contains(ppid) {
                found.insert(*pid);
            }
        }
        if found.len() == before {
            found.remove(&root);
            return found;
        }
    }
}

/// The network namespaces whose names a process with `pid` gives its own.
fn namespaces_of(pid: u32) -> Vec<String> {
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("pdm-{pid}-")))
        .map(str::to_string)
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is dead: its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_benchmark_stopped_by_a_signal_leaves_nothing_behind() {
    require_root();
    let out = podiam_tests::process::scratch_dir("bench-signal").expect("a directory");
    let mut command = tokio::process::Command::new(binary("podiam-bench").expect("built"));
    command
        .args(["--quick", "--only", "real-path", "--out"])
        .arg(out.join("results.json"));
    let mut bench = ChildGuard::spawn("bench", command).expect("started");
    let pid = bench.pid();
    // Its cluster, the baselines and the first wrk run are up once the table's head is out.
    wait_until(
        Duration::from_secs(120),
        "the real path's first table",
        || {
            let log = std::fs::read_to_string(bench.log_path()).unwrap_or_default();
            async move { log.contains("conns server") }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bench.log_tail(30)));
    let started = descendants(pid);
    let namespaces = namespaces_of(pid);
    assert!(started.len() >= 4, "the benchmark's processes: {started:?}");
    assert!(!namespaces.is_empty(), "the benchmark's network namespaces");

    bench.signal(Signal::SIGINT).expect("signalled");
    let status = bench
        .wait_exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bench.log_tail(30)));
    assert!(!status.success(), "a stopped run is not a result");
    let log = std::fs::read_to_string(bench.log_path()).expect("its log");
    assert!(
        log.contains("stopped by a signal"),
        "{}",
        bench.log_tail(30)
    );
    // A process sent SIGKILL as the bench ends may take a moment to be gone.
    let gone = wait_until(
        Duration::from_secs(10),
        "the bench's processes to end",
        || {
            let started = started.clone();
            async move { !started.iter().any(|pid| alive(*pid)) }
        },
    )
    .await;
    let left: Vec<u32> = started.into_iter().filter(|pid| alive(*pid)).collect();
    assert!(
        gone.is_ok() && left.is_empty(),
        "processes left running: {left:?}"
    );
    assert_eq!(namespaces_of(pid), Vec::<String>::new(), "namespaces left");
}
