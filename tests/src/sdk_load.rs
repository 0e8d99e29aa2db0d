//! Steady load from real SDK clients in pods, counting what the clients saw.
//!
//! [`SdkLoad::start`] runs one client process per [`ClientSpec`] (inside the pod's
//! namespace), each fetching credentials in a loop with an SDK's own instance-metadata code
//! and its defaults (see [`Sdk`]): botocore (the code every boto3 and AWS CLI user runs: a
//! 1 s timeout, a single attempt, an IMDSv2 token first), the AWS SDK for JavaScript v3
//! (`fromInstanceMetadata`), the Rust SDK (aws-config's IMDS client and its credentials
//! provider), and the AWS SDKs for Go v1 and v2 (their EC2 role providers). Every fetch
//! prints one line, `ok EPOCH ROLE MS` or `fail EPOCH MS WHY`, into the client's log, so the
//! test can read progress at any time; a fetch counts as ok only with
//! the expected role (where the SDK names it; `-` otherwise), a session token and at least
//! the required life left. The Rust clients also print `retry EPOCH WHY` for a fetch that
//! succeeded only after one of its HTTP attempts had failed (aws-config retries by itself).
//!
//! The clients stop when [`SdkLoad::stop`] creates their stop file; the processes are killed
//! if the load is dropped first (a failed test).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::process::{ChildGuard, scratch_dir, wait_until};
use crate::world::{GoSdk, World, binary, go_client};

/// The botocore client loop (python). With `fresh`, each fetch builds a new fetcher (a new
/// connection pool), as a new process would; with `long-lived`, one fetcher serves every
/// fetch, as a boto3 session's credential provider holds it.
const CLIENT: &str = r#"
import datetime, logging, os, sys, time
import botocore.utils

stop_file, expected, min_left, pause = sys.argv[1], set(sys.argv[2].split(",")), int(sys.argv[3]), float(sys.argv[4])
long_lived = sys.argv[5] == "long-lived"

class Last(logging.Handler):
    """Keeps botocore's last complaint: why a fetch came back empty."""
    message = ""
    def emit(self, record):
        Last.message = record.getMessage().replace("\n", " ")

logger = logging.getLogger("botocore.utils")
logger.setLevel(logging.DEBUG)
logger.addHandler(Last())

fetcher = botocore.utils.InstanceMetadataFetcher(timeout=1, num_attempts=1)
while not os.path.exists(stop_file):
    Last.message = ""
    began = time.time()
    if not long_lived:
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

/// The JavaScript client loop (node): ONE provider from `@aws-sdk/credential-providers`'
/// `fromInstanceMetadata` with its defaults (1 s timeout, `maxRetries` 0), called for every
/// fetch as an SDK client's credential cache calls it on a refresh. It names no role. Node's
/// global HTTP agent keeps connections alive between fetches, as in any Node application.
const JS_CLIENT: &str = r#"
const fs = require("fs");
const { fromInstanceMetadata } = require("@aws-sdk/credential-providers");
const [stopFile, minLeft, pause] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3])];
const provider = fromInstanceMetadata();
const line = (text) => fs.writeSync(1, text.replace(/\n/g, " ") + "\n");
(async () => {
  while (!fs.existsSync(stopFile)) {
    const began = Date.now();
    let why = "";
    try {
      const creds = await provider();
      const left = (creds.expiration.getTime() - Date.now()) / 1000;
      if (!creds.sessionToken) why = "no session token";
      else if (left < minLeft) why = `only ${Math.floor(left)}s left`;
    } catch (error) {
      why = `${error.name}: ${error.message}` + (error.statusCode ? ` (HTTP ${error.statusCode})` : "") + (error.code ? ` (${error.code})` : "");
    }
    const took = Date.now() - began;
    const at = (began / 1000).toFixed(3);
    line(why ? `fail ${at} ${took} ${why}` : `ok ${at} - ${took}`);
    await new Promise((resolve) => setTimeout(resolve, pause * 1000));
  }
})();
"#;

/// Where `scripts/setup` installs the JavaScript SDK (npm, project-local).
pub fn js_modules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js/node_modules")
}

/// One fetch as a client saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetch {
    Ok { at: f64, role: String, millis: u64 },
    Failed { at: f64, millis: u64, why: String },
}

impl Fetch {
    /// When the fetch began (Unix seconds).
    pub fn at(&self) -> f64 {
        match self {
            Fetch::Ok { at, .. } | Fetch::Failed { at, .. } => *at,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Fetch::Ok { .. })
    }
}

/// What one client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub pod: String,
    pub sdk: Sdk,
    pub fetches: Vec<Fetch>,
    /// Fetches that succeeded only after a failed HTTP attempt (Rust clients): when, and the
    /// first failure.
    pub retries: Vec<(f64, String)>,
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

    /// Failed fetches.
    pub fn failures(&self) -> Vec<&Fetch> {
        self.fetches
            .iter()
            .filter(|f| matches!(f, Fetch::Failed { .. }))
            .collect()
    }

    /// The first fetch that began at or after `from` (Unix seconds).
    pub fn first_from(&self, from: f64) -> Option<&Fetch> {
        self.fetches.iter().find(|f| f.at() >= from)
    }

    /// A label for messages: the pod and the SDK.
    pub fn label(&self) -> String {
        format!("{} ({})", self.pod, self.sdk)
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
    /// Every failed fetch, with its client's label (pod, and SDK unless botocore's default).
    pub fn failures(&self) -> Vec<(String, Fetch)> {
        self.failures_from(f64::NEG_INFINITY)
    }

    /// [`LoadReport::failures`] of fetches that began at or after `from` (Unix seconds).
    pub fn failures_from(&self, from: f64) -> Vec<(String, Fetch)> {
        self.clients
            .iter()
            .flat_map(|c| {
                let label = match c.sdk {
                    Sdk::BotocoreFresh => c.pod.clone(),
                    _ => c.label(),
                };
                c.failures()
                    .into_iter()
                    .filter(move |f| f.at() >= from)
                    .map(move |f| (label.clone(), f.clone()))
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

/// The SDK a client runs, and what it holds for its whole life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sdk {
    /// botocore's `InstanceMetadataFetcher`, a new one per fetch (a new process each time).
    #[default]
    BotocoreFresh,
    /// botocore's `InstanceMetadataFetcher`, one for the client's life (its connection pool
    /// too), as a boto3 session's credential provider holds it.
    Botocore,
    /// The AWS SDK for JavaScript v3: one `fromInstanceMetadata` provider (Node's global
    /// keep-alive agent underneath).
    JavaScript,
    /// The Rust SDK: one `aws_config::imds::Client` (its token cached for its TTL).
    RustImdsClient,
    /// The Rust SDK: one `ImdsCredentialsProvider`.
    RustProvider,
    /// The AWS SDK for Go v1: one `ec2rolecreds.EC2RoleProvider` over one `ec2metadata`
    /// client (its token cached for its 6 hours).
    GoV1,
    /// The AWS SDK for Go v2: one `ec2rolecreds` provider over one `imds` client.
    GoV2,
}

impl Sdk {
    /// Every SDK whose clients live long, as applications hold them.
    pub const LONG_LIVED: [Sdk; 6] = [
        Sdk::JavaScript,
        Sdk::RustImdsClient,
        Sdk::RustProvider,
        Sdk::Botocore,
        Sdk::GoV1,
        Sdk::GoV2,
    ];
}

impl std::fmt::Display for Sdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sdk::BotocoreFresh => "botocore, a fetcher per fetch",
            Sdk::Botocore => "botocore",
            Sdk::JavaScript => "JavaScript v3",
            Sdk::RustImdsClient => "Rust IMDS client",
            Sdk::RustProvider => "Rust credentials provider",
            Sdk::GoV1 => "Go v1",
            Sdk::GoV2 => "Go v2",
        })
    }
}

/// A client's wishes: its pod, the roles it accepts, the life credentials must have, and
/// the SDK it runs.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub pod: String,
    pub roles: Vec<String>,
    pub min_left: Duration,
    pub sdk: Sdk,
}

impl ClientSpec {
    /// A botocore client of `pod` (a fetcher per fetch) accepting `roles`, asking for
    /// botocore's comfortable 25 minutes.
    pub fn new(pod: &str, roles: &[&str]) -> ClientSpec {
        ClientSpec {
            pod: pod.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            min_left: Duration::from_secs(25 * 60),
            sdk: Sdk::default(),
        }
    }

    /// The same wishes, with `sdk`.
    pub fn with_sdk(self, sdk: Sdk) -> ClientSpec {
        ClientSpec { sdk, ..self }
    }
}

/// Running clients.
#[derive(Debug)]
pub struct SdkLoad {
    clients: Vec<(String, Sdk, ChildGuard)>,
    stop_file: PathBuf,
}

/// Pause between one client's fetches: a client makes under 5 fetches a second, so the 24
/// of the restart drill make about 100 in all, a steady load that leaves the 2 cores room
/// for the daemons under test.
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
        let stop = stop_file.to_str().context("path")?;
        for spec in specs {
            let roles = spec.roles.join(",");
            let min_left = spec.min_left.as_secs().to_string();
            let command = match spec.sdk {
                Sdk::BotocoreFresh | Sdk::Botocore => {
                    let mut command = world.pod_command(&spec.pod, "python3");
                    let life = if spec.sdk == Sdk::Botocore {
                        "long-lived"
                    } else {
                        "fresh"
                    };
                    command.args(["-c", CLIENT, stop, &roles, &min_left, PAUSE, life]);
                    command
                }
                Sdk::JavaScript => {
                    let modules = js_modules();
                    if !modules.join("@aws-sdk/credential-providers").is_dir() {
                        bail!(
                            "the AWS SDK for JavaScript is not in {}: run scripts/setup",
                            modules.display()
                        );
                    }
                    let mut command = world.pod_command(&spec.pod, "node");
                    command
                        .args(["-e", JS_CLIENT, stop, &min_left, PAUSE])
                        .env("NODE_PATH", modules);
                    command
                }
                Sdk::RustImdsClient | Sdk::RustProvider => {
                    let program = binary("podiam-sdk-client")?;
                    let mut command =
                        world.pod_command(&spec.pod, program.to_str().context("path")?);
                    let api = if spec.sdk == Sdk::RustProvider {
                        "provider"
                    } else {
                        "imds-client"
                    };
                    command
                        .args(["load", "--api", api, "--stop-file", stop])
                        .args(["--roles", &roles, "--min-left", &min_left])
                        .args(["--pause", PAUSE]);
                    command
                }
                Sdk::GoV1 | Sdk::GoV2 => {
                    let program = go_client()?;
                    let mut command =
                        world.pod_command(&spec.pod, program.to_str().context("path")?);
                    let sdk = match spec.sdk {
                        Sdk::GoV1 => GoSdk::V1,
                        _ => GoSdk::V2,
                    };
                    command
                        .args(["load", "-sdk", sdk.as_arg(), "-stop", stop])
                        .args(["-min-left", &min_left, "-pause", PAUSE]);
                    command
                }
            };
            let name = match spec.sdk {
                Sdk::BotocoreFresh => format!("sdk-{}", spec.pod),
                sdk => format!("sdk-{}-{sdk:?}", spec.pod),
            };
            let guard = ChildGuard::spawn(&name, command)?;
            clients.push((spec.pod.clone(), spec.sdk, guard));
        }
        Ok(SdkLoad { clients, stop_file })
    }

    /// What the clients have seen so far.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            clients: self
                .clients
                .iter()
                .map(|(pod, sdk, guard)| {
                    let log = std::fs::read_to_string(guard.log_path()).unwrap_or_default();
                    ClientReport {
                        pod: pod.clone(),
                        sdk: *sdk,
                        fetches: parse(&log),
                        retries: parse_retries(&log),
                    }
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
        for (pod, _, guard) in &mut self.clients {
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

/// The `retry EPOCH WHY` lines of a client's log.
fn parse_retries(log: &str) -> Vec<(f64, String)> {
    log.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("retry ")?;
            let (at, why) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((at.parse().ok()?, why.to_string()))
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
                   retry 1700000001.500 HTTP 401\n\
                   fail 1700000001.500 1003 no credentials: Max number of attempts exceeded (1)\n";
        let fetches = parse(log);
        assert_eq!(
            parse_retries(log),
            vec![(1_700_000_001.5, "HTTP 401".into())]
        );
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
                ..ClientReport::default()
            }],
        };
        assert_eq!(report.failures().len(), 1);
        assert_eq!(report.ok_between(1_700_000_000.0, 1_700_000_001.0), 1);
        assert_eq!(report.clients[0].last_role(), Some("app-reader"));
        assert!(
            report.clients[0]
                .first_from(1_700_000_000.2)
                .is_some_and(|f| !f.is_ok())
        );
    }
}
