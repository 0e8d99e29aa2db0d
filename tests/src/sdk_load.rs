//! Steady load from real SDK clients in pods, counting what the clients saw.
//!
//! [`SdkLoad::start`] runs one python process per pod (inside the pod's namespace) that
//! fetches credentials with botocore's own instance-metadata fetcher in a loop — the code
//! every boto3 and AWS CLI user runs, with botocore's defaults: a 1 s timeout and a single
//! attempt, an IMDSv2 token first. Each fetch builds a new fetcher (a new connection pool), as
//! a new process would. Every fetch prints one line, `ok EPOCH ROLE MS` or
//! `fail EPOCH MS WHY`, into the client's log, so the test can read progress at any time;
//! a fetch counts as ok only with the expected role, a session token and at least the
//! required life left.
//!
//! The clients stop when [`SdkLoad::stop`] creates their stop file; the processes are killed
//! if the load is dropped first (a failed test).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::process::{ChildGuard, scratch_dir, wait_until};
use crate::world::World;

/// The client loop (python, botocore).
const CLIENT: &str = r#"
import datetime, logging, os, sys, time
import botocore.utils

stop_file, expected, min_left, pause = sys.argv[1], set(sys.argv[2].split(",")), int(sys.argv[3]), float(sys.argv[4])

class Last(logging.Handler):
    """Keeps botocore's last complaint: why a fetch came back empty."""
    message = ""
    def emit(self, record):
        Last.message = record.getMessage().replace("\n", " ")

logger = logging.getLogger("botocore.utils")
logger.setLevel(logging.DEBUG)
logger.addHandler(Last())

while not os.path.exists(stop_file):
    Last.message = ""
    began = time.time()
    fetcher = botocore.utils.InstanceMetadataFetcher(timeout=1, num_attempts=1)
    creds = fetcher.retrieve_iam_role_credentials()
    took = int((time.time() - began) * 1000)
    role = creds.get("role_name", "")
    why = ""
    if not creds:
        why = "no credentials: " + Last.message
    elif role not in expected:
        why = "role %s, expected one of %s" % (role, sorted(expected))
    elif not creds.get("token"):
        why = "no session token"
    else:
        expiry = datetime.datetime.strptime(creds["expiry_time"], "%Y-%m-%dT%H:%M:%SZ")
        left = (expiry.replace(tzinfo=datetime.timezone.utc) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        if left < min_left:
            why = "only %ds left" % left
    if why:
        print("fail %.3f %d %s" % (began, took, why), flush=True)
    else:
        print("ok %.3f %s %d" % (began, role, took), flush=True)
    time.sleep(pause)
"#;

/// One fetch as a client saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetch {
    Ok { at: f64, role: String, millis: u64 },
    Failed { at: f64, millis: u64, why: String },
}

/// What one client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub pod: String,
    pub fetches: Vec<Fetch>,
}

impl ClientReport {
    /// Successful fetches that began in `[from, to)` (Unix seconds).
    pub fn ok_between(&self, from: f64, to: f64) -> usize {
        self.fetches
            .iter()
            .filter(|f| matches!(f, Fetch::Ok { at, .. } if *at >= from && *at < to))
            .count()
    }

    /// Roles seen, with counts.
    pub fn roles(&self) -> BTreeMap<String, usize> {
        let mut roles = BTreeMap::new();
        for fetch in &self.fetches {
            if let Fetch::Ok { role, .. } = fetch {
                *roles.entry(role.clone()).or_default() += 1;
            }
        }
        roles
    }

    /// The role of the last successful fetch.
    pub fn last_role(&self) -> Option<&str> {
        self.fetches.iter().rev().find_map(|f| match f {
            Fetch::Ok { role, .. } => Some(role.as_str()),
            Fetch::Failed { .. } => None,
        })
    }
}

/// What every client saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub clients: Vec<ClientReport>,
}

impl LoadReport {
    /// Every failed fetch, with its pod.
    pub fn failures(&self) -> Vec<(String, Fetch)> {
        self.clients
            .iter()
            .flat_map(|c| {
                c.fetches
                    .iter()
                    .filter(|f| matches!(f, Fetch::Failed { .. }))
                    .map(|f| (c.pod.clone(), f.clone()))
            })
            .collect()
    }

    /// Every fetch, by every client.
    pub fn fetches(&self) -> usize {
        self.clients.iter().map(|c| c.fetches.len()).sum()
    }

    /// Successful fetches that began in `[from, to)`, all clients.
    pub fn ok_between(&self, from: f64, to: f64) -> usize {
        self.clients.iter().map(|c| c.ok_between(from, to)).sum()
    }

    /// The slowest successful fetch, in milliseconds.
    pub fn slowest_ok_millis(&self) -> u64 {
        self.clients
            .iter()
            .flat_map(|c| &c.fetches)
            .filter_map(|f| match f {
                Fetch::Ok { millis, .. } => Some(*millis),
                Fetch::Failed { .. } => None,
            })
            .max()
            .unwrap_or_default()
    }

    /// A one-paragraph account: fetches, failures and the slowest success.
    pub fn summary(&self) -> String {
        let failures = self.failures();
        let mut text = format!(
            "{} clients, {} fetches, {} failed, slowest success {} ms",
            self.clients.len(),
            self.fetches(),
            failures.len(),
            self.slowest_ok_millis()
        );
        for (pod, failure) in failures.iter().take(20) {
            text.push_str(&format!("\n  {pod}: {failure:?}"));
        }
        text
    }
}

/// A client's wishes: its pod, the roles it accepts, and the life credentials must have.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub pod: String,
    pub roles: Vec<String>,
    pub min_left: Duration,
}

impl ClientSpec {
    /// A client of `pod` accepting `roles`, asking for botocore's comfortable 25 minutes.
    pub fn new(pod: &str, roles: &[&str]) -> ClientSpec {
        ClientSpec {
            pod: pod.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            min_left: Duration::from_secs(25 * 60),
        }
    }
}

/// Running clients.
#[derive(Debug)]
pub struct SdkLoad {
    clients: Vec<(String, ChildGuard)>,
    stop_file: PathBuf,
}

/// Pause between one client's fetches: 12 clients then make about 50 fetches a second in
/// all, a steady load that leaves the 2 cores room for the daemons under test.
const PAUSE: &str = "0.2";

/// Unix seconds now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl SdkLoad {
    /// Starts one client per spec, each in its pod's namespace.
    pub fn start(world: &World, specs: &[ClientSpec]) -> anyhow::Result<SdkLoad> {
        let dir = scratch_dir("sdk-load")?;
        let stop_file = dir.join("stop");
        let mut clients = Vec::new();
        for spec in specs {
            let mut command = world.pod_command(&spec.pod, "python3");
            command.args([
                "-c",
                CLIENT,
                stop_file.to_str().context("path")?,
                &spec.roles.join(","),
                &spec.min_left.as_secs().to_string(),
                PAUSE,
            ]);
            let guard = ChildGuard::spawn(&format!("sdk-{}", spec.pod), command)?;
            clients.push((spec.pod.clone(), guard));
        }
        Ok(SdkLoad { clients, stop_file })
    }

    /// What the clients have seen so far.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            clients: self
                .clients
                .iter()
                .map(|(pod, guard)| ClientReport {
                    pod: pod.clone(),
                    fetches: parse(&std::fs::read_to_string(guard.log_path()).unwrap_or_default()),
                })
                .collect(),
        }
    }

    /// Waits until every client has at least `n` successful fetches since `since`.
    pub async fn wait_each_ok(&self, n: usize, since: f64, within: Duration) -> anyhow::Result<()> {
        let waited = wait_until(within, "every SDK client to fetch credentials", || {
            let report = self.report();
            async move {
                report
                    .clients
                    .iter()
                    .all(|c| c.ok_between(since, f64::MAX) >= n)
            }
        })
        .await;
        if let Err(error) = waited {
            bail!("{error}: {}", self.report().summary());
        }
        Ok(())
    }

    /// Stops the clients (each finishes its fetch under way) and returns what they saw.
    pub async fn stop(mut self) -> anyhow::Result<LoadReport> {
        std::fs::write(&self.stop_file, b"stop").context("writing the stop file")?;
        for (pod, guard) in &mut self.clients {
            let status = guard
                .wait_exit(Duration::from_secs(10))
                .await
                .with_context(|| format!("the SDK client of {pod} did not stop"))?;
            if !status.success() {
                bail!(
                    "the SDK client of {pod} exited with {status}:\n{}",
                    guard.log_tail(20)
                );
            }
        }
        Ok(self.report())
    }
}

/// The fetch lines of a client's log (anything else, such as a python warning, is skipped).
fn parse(log: &str) -> Vec<Fetch> {
    log.lines()
        .filter_map(|line| {
            let mut words = line.splitn(4, ' ');
            match words.next()? {
                "ok" => Some(Fetch::Ok {
                    at: words.next()?.parse().ok()?,
                    role: words.next()?.to_string(),
                    millis: words.next()?.trim().parse().ok()?,
                }),
                "fail" => Some(Fetch::Failed {
                    at: words.next()?.parse().ok()?,
                    millis: words.next()?.parse().ok()?,
                    why: words.next().unwrap_or_default().to_string(),
                }),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_lines_parse_and_other_lines_are_skipped() {
        let log = "ok 1700000000.125 app-reader 12\n\
                   Traceback? no: a warning line\n\
                   fail 1700000001.500 1003 no credentials: Max number of attempts exceeded (1)\n";
        let fetches = parse(log);
        assert_eq!(
            fetches,
            vec![
                Fetch::Ok {
                    at: 1_700_000_000.125,
                    role: "app-reader".into(),
                    millis: 12
                },
                Fetch::Failed {
                    at: 1_700_000_001.5,
                    millis: 1003,
                    why: "no credentials: Max number of attempts exceeded (1)".into()
                },
            ]
        );
        let report = LoadReport {
            clients: vec![ClientReport {
                pod: "p".into(),
                fetches,
            }],
        };
        assert_eq!(report.failures().len(), 1);
        assert_eq!(report.ok_between(1_700_000_000.0, 1_700_000_001.0), 1);
        assert_eq!(report.clients[0].last_role(), Some("app-reader"));
    }
}
