//! The operators' documentation agrees with the binaries.
//!
//! - **Flags.** Every `--flag` the docs name for `podiam-server`, `podiam-agent` or
//!   `podiam-certs` exists in that binary's `--help`; so does every `PODIAM_…` variable.
//!   Every `kubectl iam COMMAND` the docs show is a command of the plugin `kubectl-iam`,
//!   and its flags are in that command's `--help`.
//!   Files: `docs/*.md`, `README.md`, `ARCHITECTURE.md`, `deploy/README.md`, and the
//!   manifests and settings files under `deploy/` (whose container args `deploy.rs` checks
//!   per container as well).
//! - **Metrics.** `docs/metrics.md` documents every metric both daemons export, under the
//!   name Prometheus sees (`_total` on counters, `_bucket`/`_sum`/`_count` on histograms),
//!   and nothing else; every metric the Grafana dashboard queries is documented, and so is
//!   every metric the shipped alerts (`deploy/components/monitoring/rules.yaml`) name; the
//!   dashboard is importable (datasource variable, Prometheus targets, unique panel ids).
//! - **Refusals.** `docs/troubleshooting.md` has a row for every refusal reason of the wire
//!   contract, with the HTTP status the agent answers it with.
//! - **Links** between the docs resolve, anchors included.
//!
//! ## How a flag is attributed to a binary
//!
//! Text is cut into units: each logical line of a fenced code block (lines ending in `\`
//! joined), each inline code span, each stretch of prose between code spans, each line of a
//! file under `deploy/`. A unit is read word by word, and shell separators (`|`, `&&`,
//! `||`, `;`) start over:
//!
//! - after the word `podiam-server`, `podiam-certs` or `podiam-agent` (also as the last part
//!   of a path), flags belong to that binary; for `podiam-agent`, a following `serve` or
//!   `uninstall` selects that subcommand's help;
//! - after `kubectl iam` (kubectl running the plugin) or `kubectl-iam`, flags belong to the
//!   plugin, and the next word, if it looks like a command (lowercase letters and `-`), is
//!   one of its commands, which must exist and whose help then holds the flags that follow;
//! - after the name of another program ([`OTHER_PROGRAMS`]: kubectl, kiam, kube2iam, aws,
//!   iptables, docker…), flags are that program's and are not checked;
//! - a flag before any program word is a bare mention. It must exist in at least one podiam
//!   binary, except inside a Markdown table column whose header names another tool
//!   ([`OTHER_TOOL_COLUMNS`]: the kiam and kube2iam columns of the migration tables).
//!
//! So another tool's flag is written after that tool's name (`kiam agent
//! --no-iptables-remove`) or in that tool's table column, and a podiam flag written bare is
//! still checked, if only against all three binaries.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use podiam_tests::fixtures::repo_root;
use podiam_tests::help::{Help, parse_help};
use podiam_tests::kube_emulator::{EmulatorOptions, KubeEmulator};
use podiam_tests::moto::Moto;
use podiam_tests::process::{ChildGuard, listen_addresses, scratch_dir};
use podiam_tests::world::{binary, start_server_within};
use serde_json::Value;

const BINARIES: [&str; 3] = ["podiam-server", "podiam-agent", "podiam-certs"];
/// The kubectl plugin: `kubectl iam …` runs it.
const PLUGIN: &str = "kubectl-iam";
const AGENT_SUBCOMMANDS: [&str; 2] = ["serve", "uninstall"];
/// Programs whose flags the docs may name and that are not podiam's.
const OTHER_PROGRAMS: &[&str] = &[
    "kubectl",
    "kiam",
    "kube2iam",
    "helm",
    "aws",
    "docker",
    "iptables",
    "iptables-legacy",
    "iptables-nft",
    "ip",
    "curl",
    "cargo",
    "python3",
    "pip",
    "apt-get",
    "xargs",
    "grep",
    "sed",
    "kops",
    "eksctl",
    "kubelet",
    "bootstrap.sh",
    "checkov",
    "skopeo",
    "podman",
    "buildah",
    "conntrack",
    "git",
    "bash",
    "sh",
];
/// Table columns headed by these words hold another tool's flags.
const OTHER_TOOL_COLUMNS: &[&str] = &["kiam", "kube2iam"];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    for wanted in [
        "install.md",
        "migrating.md",
        "troubleshooting.md",
        "security.md",
        "metrics.md",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(wanted)),
            "docs/{wanted} is missing"
        );
    }
    files
}

// ---------------------------------------------------------------------------------------
// Help

/// Every command's help, keyed `podiam-server`, `podiam-agent`, `podiam-agent serve`…
fn helps() -> BTreeMap<String, Help> {
    let mut all = BTreeMap::new();
    let mut commands: Vec<(String, Option<&str>)> =
        BINARIES.iter().map(|b| (b.to_string(), None)).collect();
    commands.extend(
        AGENT_SUBCOMMANDS
            .iter()
            .map(|s| ("podiam-agent".to_string(), Some(*s))),
    );
    for (program, subcommand) in commands {
        let output = Command::new(binary(&program).unwrap())
            .args(subcommand)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success(), "{program} --help");
        let help = parse_help(&String::from_utf8_lossy(&output.stdout));
        assert!(help.flags.len() > 3, "{program}: {help:?}");
        let key = match subcommand {
            Some(s) => format!("{program} {s}"),
            None => program,
        };
        all.insert(key, help);
    }
    // The plugin and each command its help lists.
    let help_of = |command: Option<&str>| {
        let output = Command::new(binary(PLUGIN).unwrap())
            .args(command)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success(), "{PLUGIN} {command:?} --help");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let top = help_of(None);
    let commands = plugin_commands(&top);
    assert!(commands.len() >= 5, "{PLUGIN} commands: {commands:?}");
    all.insert(PLUGIN.to_string(), parse_help(&top));
    for command in commands {
        let help = parse_help(&help_of(Some(&command)));
        assert!(help.flags.len() > 3, "{PLUGIN} {command}: {help:?}");
        all.insert(format!("{PLUGIN} {command}"), help);
    }
    all
}

/// The commands a clap `--help` lists under `Commands:` (but `help`).
fn plugin_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Attributing flags

/// Whose a flag is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    /// A podiam command: `podiam-server`, `podiam-agent serve`…
    Command(String),
    /// A bare mention: some podiam binary must have it.
    AnyPodiam,
    /// Another program's: not checked.
    Other,
}

/// A flag named somewhere, and whose it is. An empty `flag` names no flag: it says that
/// the owner's command itself must exist (`kubectl iam COMMAND`).
#[derive(Debug)]
struct Mention {
    flag: String,
    owner: Owner,
    place: String,
}

fn program_word(word: &str) -> &str {
    let word = word.trim_matches(|c: char| c == '`' || c == '"' || c == '\'' || c == '(');
    word.rsplit('/').next().unwrap_or(word)
}

/// `--flag=value),` → `--flag`; None for anything that is not a long flag.
fn flag_word(word: &str) -> Option<String> {
    let word = word.trim_start_matches(['(', '`', '"', '\'', '[']);
    let rest = word.strip_prefix("--")?;
    if !rest.starts_with(|c: char| c.is_ascii_lowercase()) {
        return None;
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some(format!("--{}", name.trim_end_matches('-')))
}

/// The flags of one unit of text, attributed as the module doc says. `bare` is the owner of
/// flags before any program word.
fn attribute(unit: &str, bare: &Owner, place: &str, out: &mut Vec<Mention>) {
    let mut owner = bare.clone();
    let mut agent_pending = false;
    // After `kubectl`, `iam` runs the plugin; after the plugin, a command may follow.
    let mut kubectl_pending = false;
    let mut plugin_pending = false;
    for word in unit.split_whitespace() {
        if matches!(word, "|" | "||" | "&&" | ";") {
            owner = bare.clone();
            agent_pending = false;
            kubectl_pending = false;
            plugin_pending = false;
            continue;
        }
        if let Some(flag) = flag_word(word) {
            out.push(Mention {
                flag,
                owner: owner.clone(),
                place: place.to_string(),
            });
            kubectl_pending = false;
            plugin_pending = false;
            continue;
        }
        let program = program_word(word);
        if std::mem::take(&mut kubectl_pending) && program == "iam" {
            owner = Owner::Command(PLUGIN.to_string());
            plugin_pending = true;
            continue;
        }
        let command = program.trim_end_matches([',', '.', ':', ')']);
        let command_like = command.starts_with(|c: char| c.is_ascii_lowercase())
            && command.chars().all(|c| c.is_ascii_lowercase() || c == '-');
        if std::mem::take(&mut plugin_pending) && command_like {
            owner = Owner::Command(format!("{PLUGIN} {command}"));
            out.push(Mention {
                flag: String::new(),
                owner: owner.clone(),
                place: place.to_string(),
            });
            continue;
        }
        if program == PLUGIN {
            owner = Owner::Command(PLUGIN.to_string());
            plugin_pending = true;
            agent_pending = false;
        } else if agent_pending && AGENT_SUBCOMMANDS.contains(&program) {
            owner = Owner::Command(format!("podiam-agent {program}"));
            agent_pending = false;
        } else if BINARIES.contains(&program) {
            owner = Owner::Command(program.to_string());
            agent_pending = program == "podiam-agent";
        } else if OTHER_PROGRAMS.contains(&program) {
            owner = Owner::Other;
            agent_pending = false;
            kubectl_pending = program == "kubectl";
        }
        if word.ends_with(';') {
            owner = bare.clone();
            agent_pending = false;
            kubectl_pending = false;
            plugin_pending = false;
        }
    }
}

/// Inline code spans and the prose between them.
fn spans(line: &str) -> Vec<&str> {
    line.split('`').collect()
}

/// Splits a table row into cells, ignoring `|` inside code spans.
fn cells(row: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut in_code = false;
    let row = row.trim().trim_start_matches('|').trim_end_matches('|');
    for c in row.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                cell.push(c);
            }
            '|' if !in_code => cells.push(std::mem::take(&mut cell)),
            _ => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

/// Every flag mentioned in a Markdown file.
fn markdown_mentions(path: &Path) -> Vec<Mention> {
    let text = read(path);
    let name = path
        .strip_prefix(repo_root())
        .unwrap()
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut in_block = false;
    let mut logical = String::new();
    let mut header: Option<Vec<String>> = None;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let place = format!("{name}:{}", i + 1);
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            logical.push_str(line.trim_end_matches('\\'));
            logical.push(' ');
            if !line.ends_with('\\') {
                attribute(&logical, &Owner::AnyPodiam, &place, &mut out);
                logical.clear();
            }
            continue;
        }
        if line.trim_start().starts_with('|') {
            let row = cells(line);
            let is_separator = row
                .iter()
                .all(|c| c.trim().chars().all(|ch| ch == '-' || ch == ':'));
            if is_separator {
                continue;
            }
            let Some(columns) = &header else {
                header = Some(row.iter().map(|c| c.to_lowercase()).collect());
                continue;
            };
            for (cell, column) in row.iter().zip(columns) {
                let bare = if OTHER_TOOL_COLUMNS.iter().any(|t| column.trim() == *t) {
                    Owner::Other
                } else {
                    Owner::AnyPodiam
                };
                for unit in spans(cell) {
                    attribute(unit, &bare, &place, &mut out);
                }
            }
            continue;
        }
        header = None;
        for unit in spans(line) {
            attribute(unit, &Owner::AnyPodiam, &place, &mut out);
        }
    }
    assert!(!in_block, "{name}: unclosed code block");
    out
}

/// Every flag mentioned in the manifests and settings under deploy/ (one unit per line).
fn deploy_mentions() -> Vec<Mention> {
    let mut out = Vec::new();
    let mut stack = vec![repo_root().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "env") {
                continue;
            }
            let name = path
                .strip_prefix(repo_root())
                .unwrap()
                .display()
                .to_string();
            for (i, line) in read(&path).lines().enumerate() {
                for unit in spans(line) {
                    attribute(
                        unit,
                        &Owner::AnyPodiam,
                        &format!("{name}:{}", i + 1),
                        &mut out,
                    );
                }
            }
        }
    }
    out
}

#[test]
fn every_flag_the_docs_name_exists_in_its_binary() {
    let helps = helps();
    let mut files = docs();
    files.extend(
        ["README.md", "ARCHITECTURE.md", "deploy/README.md"]
            .iter()
            .map(|f| repo_root().join(f)),
    );
    let mut mentions: Vec<Mention> = files.iter().flat_map(|f| markdown_mentions(f)).collect();
    mentions.extend(deploy_mentions());
    let mut problems = Vec::new();
    let mut checked = 0;
    for m in &mentions {
        let ok = match &m.owner {
            Owner::Other => continue,
            Owner::Command(command) => match helps.get(command) {
                Some(help) => m.flag.is_empty() || help.flags.contains(&m.flag),
                None => {
                    checked += 1;
                    problems.push(format!("{}: no command `{command}`", m.place));
                    continue;
                }
            },
            Owner::AnyPodiam => helps.values().any(|h| h.flags.contains(&m.flag)),
        };
        checked += 1;
        if !ok {
            problems.push(format!("{}: {} ({:?})", m.place, m.flag, m.owner));
        }
    }
    assert!(
        problems.is_empty(),
        "flags no podiam binary has:\n{}",
        problems.join("\n")
    );
    assert!(checked > 100, "only {checked} flag mentions checked");
    // The attribution rule itself, on the shapes the docs use.
    let mut probe = Vec::new();
    attribute(
        "podiam-agent serve --iptables | grep x --count; kiam agent --no-iptables-remove",
        &Owner::AnyPodiam,
        "probe",
        &mut probe,
    );
    attribute(
        "kubectl iam explain POD --server-timeout 2s && kubectl get pods --all-namespaces",
        &Owner::AnyPodiam,
        "probe",
        &mut probe,
    );
    attribute(
        "kubectl iam --context c; path/to/kubectl-iam status -o json; kubectl iam …; \
         install kubectl-iam /usr/local/bin/ --mode",
        &Owner::AnyPodiam,
        "probe",
        &mut probe,
    );
    let owners: Vec<(&str, &Owner)> = probe.iter().map(|m| (m.flag.as_str(), &m.owner)).collect();
    let plugin = |command: &str| Owner::Command(format!("{PLUGIN}{command}"));
    assert_eq!(
        owners,
        [
            ("--iptables", &Owner::Command("podiam-agent serve".into())),
            ("--count", &Owner::Other),
            ("--no-iptables-remove", &Owner::Other),
            ("", &plugin(" explain")),
            ("--server-timeout", &plugin(" explain")),
            ("--all-namespaces", &Owner::Other),
            ("--context", &plugin("")),
            ("", &plugin(" status")),
            ("--mode", &plugin("")),
        ]
    );
}

#[test]
fn every_podiam_variable_the_docs_name_exists() {
    let helps = helps();
    let known: BTreeSet<&String> = helps.values().flat_map(|h| &h.envs).collect();
    let mut files = docs();
    files.push(repo_root().join("deploy/README.md"));
    for dir in ["deploy/base", "deploy/components/iptables-legacy"] {
        for entry in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    let mut problems = Vec::new();
    for file in files {
        let text = read(&file);
        let mut rest = text.as_str();
        while let Some(at) = rest.find("PODIAM_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !known.contains(&name) {
                problems.push(format!("{}: {name}", file.display()));
            }
            rest = &rest[at + name.len()..];
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Metrics

/// Every `podiam_agent_…` / `podiam_server_…` name registered in the daemons' metrics.rs.
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["agent/src/metrics.rs", "server/src/metrics.rs"] {
        let text = read(&repo_root().join(file));
        let prefix = text
            .split("Registry::with_prefix(\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("{file}: no Registry::with_prefix"))
            .to_string();
        for call in text.split(".register(").skip(1) {
            let name = call.split('"').nth(1).unwrap();
            names.insert(format!("{prefix}_{name}"));
        }
    }
    assert!(names.len() > 10, "{names:?}");
    names
}

/// `# TYPE name kind` lines of an OpenMetrics exposition.
fn exposed_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The names Prometheus sees for a metric of this kind.
fn series_names(base: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{base}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
        "info" => vec![format!("{base}_info")],
        _ => vec![base.to_string()],
    }
}

/// A minimal HTTP/1.0 exchange; returns the body.
fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string())
}

fn get_metrics(health: SocketAddr) -> String {
    http(health, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
}

/// Starts an agent (no iptables, no server to talk to) on loopback ports the kernel picks,
/// makes it answer a token request and a credentials request (which fails: no server), and
/// returns its metric types.
async fn agent_metric_types(certs: &podiam_certs::WrittenFiles) -> BTreeMap<String, String> {
    let address_file = certs.ca_cert.with_file_name("agent-addresses");
    let mut command = tokio::process::Command::new(binary("podiam-agent").unwrap());
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--health-listen", "127.0.0.1:0"])
        .arg("--listen-address-file")
        .arg(&address_file)
        .args(["--server", "https://127.0.0.1:1"])
        .args(["--node-name", "node-1"])
        .arg("--tls-ca")
        .arg(&certs.ca_cert)
        .arg("--tls-cert")
        .arg(&certs.agent_cert)
        .arg("--tls-key")
        .arg(&certs.agent_key)
        // Its IMDSv2 token keys in the test's own directory, never the machine's /var/lib.
        .arg("--token-key-file")
        .arg(certs.ca_cert.with_file_name("imds-token-keys"));
    let mut agent = ChildGuard::spawn("docs-agent", command).unwrap();
    let addresses = listen_addresses(&mut agent, &address_file, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}; agent: {}", agent.log_tail(20)));
    let (listen, health) = (addresses["listen"], addresses["health-listen"]);
    let token =
        "PUT /latest/api/token HTTP/1.0\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
    let credentials = "GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n";
    tokio::task::spawn_blocking(move || {
        http(listen, token);
        http(listen, credentials);
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || get_metrics(health))
        .await
        .unwrap();
    drop(agent);
    exposed_types(&text)
}

/// Starts the Kubernetes API emulator, moto and a server, and returns its metric types.
async fn server_metric_types(
    dir: &Path,
    certs: &podiam_certs::WrittenFiles,
) -> BTreeMap<String, String> {
    let emulator = KubeEmulator::start("127.0.0.1:0".parse().unwrap(), EmulatorOptions::default())
        .await
        .unwrap();
    let kubeconfig = dir.join("kubeconfig");
    emulator.write_kubeconfig(&kubeconfig).unwrap();
    let moto = Moto::start().await.unwrap();
    let (server, _grpc, health) = start_server_within(
        certs,
        &kubeconfig,
        &moto.endpoint(),
        &[],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || get_metrics(health))
        .await
        .unwrap();
    drop(server);
    drop(moto);
    emulator.shutdown().await;
    exposed_types(&text)
}

/// `podiam_agent_…` and `podiam_server_…` words in a text.
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    for prefix in ["podiam_agent_", "podiam_server_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let word: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            words.insert(word.clone());
            rest = &rest[at + word.len()..];
        }
    }
    words
}

#[tokio::test]
async fn every_exported_metric_is_documented_and_the_dashboard_uses_only_those() {
    podiam_runtime::tls::install_crypto_provider();
    let dir = scratch_dir("docs-metrics").unwrap();
    let certs = podiam_certs::generate(&podiam_certs::CertOptions::default())
        .unwrap()
        .write_to(&dir.join("certs"), false)
        .unwrap();
    let mut live = agent_metric_types(&certs).await;
    live.extend(server_metric_types(&dir, &certs).await);

    // What the code registers is what the running daemons export. A family with no sample
    // yet is absent from an exposition, so a registered name the runs above did not see is
    // only checked by name.
    let registered = registered_metrics();
    for name in live.keys() {
        assert!(
            registered.contains(name),
            "{name} is exported but not registered in a metrics.rs"
        );
    }
    let mut expected = BTreeSet::new();
    for base in &registered {
        match live.get(base) {
            Some(kind) => expected.extend(series_names(base, kind)),
            None => {
                expected.insert(format!("{base}?"));
            }
        }
    }

    let documented = metric_words(&read(&repo_root().join("docs/metrics.md")));
    // The shipped alerts may name only exported metrics too.
    let alerting = metric_words(&read(
        &repo_root().join("deploy/components/monitoring/rules.yaml"),
    ));
    assert!(alerting.len() > 10, "{alerting:?}");
    let mut problems = Vec::new();
    for name in &expected {
        match name.strip_suffix('?') {
            // Kind unknown: some series of it must be documented.
            Some(base) => {
                if !documented.iter().any(|d| d.starts_with(base)) {
                    problems.push(format!("{base} is not documented"));
                }
            }
            None => {
                if !documented.contains(name) {
                    problems.push(format!("{name} is not documented"));
                }
            }
        }
    }
    for name in documented.iter().chain(&alerting) {
        let known = expected.contains(name)
            || expected.iter().any(|e| {
                e.strip_suffix('?')
                    .is_some_and(|base| name == base || name.starts_with(&format!("{base}_")))
            });
        if !known {
            problems.push(format!(
                "{name} is documented or alerted on but not exported"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/metrics.md:\n{}",
        problems.join("\n")
    );

    // The dashboard: importable, and over documented metrics only.
    let path = repo_root().join("deploy/grafana/podiam-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 30);
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus datasource variable");
    let reference = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let mut ids = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{}", panel["title"]);
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"],
            reference.as_str(),
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let words = metric_words(expr);
            assert!(!words.is_empty(), "{}: {expr}", panel["title"]);
            queried.extend(words);
        }
    }
    let undocumented: Vec<&String> = queried.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "the dashboard queries undocumented metrics: {undocumented:?}"
    );
    assert!(queried.len() >= 10, "{queried:?}");
}

// ---------------------------------------------------------------------------------------
// Refusals

/// (reason, HTTP status) pairs from the agent's table test `every_failure_has_its_status`
/// in agent/src/http.rs: each `"slug"` there follows its status.
fn agent_statuses() -> Vec<(String, u16)> {
    let text = read(&repo_root().join("agent/src/http.rs"));
    let table = text
        .split("fn every_failure_has_its_status")
        .nth(1)
        .expect("agent/src/http.rs has no test every_failure_has_its_status");
    let mut pairs = Vec::new();
    let mut status = None;
    for token in table.split([',', '(', ')', '\n']) {
        let token = token.trim();
        if token.len() == 3
            && let Ok(code) = token.parse::<u16>()
        {
            status = Some(code);
        }
        if let Some(slug) = token.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
            && slug.contains('-')
            && slug.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        {
            pairs.push((slug.to_string(), status.take().unwrap()));
        }
    }
    assert!(pairs.len() >= 9, "{pairs:?}");
    pairs
}

/// The reason names of the wire contract (proto/src/lib.rs `Reason::as_str`).
fn reasons() -> Vec<String> {
    let text = read(&repo_root().join("proto/src/lib.rs"));
    let body = text
        .split("pub fn as_str(self)")
        .nth(1)
        .unwrap()
        .split("\n    }")
        .next()
        .unwrap();
    let reasons: Vec<String> = body
        .lines()
        .filter_map(|l| l.split("=> \"").nth(1))
        .map(|r| r.trim_end_matches([',', '"']).to_string())
        .collect();
    assert!(reasons.len() >= 9, "{reasons:?}");
    reasons
}

#[test]
fn troubleshooting_explains_every_refusal_with_its_status() {
    let text = read(&repo_root().join("docs/troubleshooting.md"));
    let statuses = agent_statuses();
    for reason in reasons() {
        assert!(
            statuses.iter().any(|(s, _)| *s == reason),
            "reason {reason} has no status in the agent's table"
        );
    }
    for (slug, status) in statuses {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| `{slug}` |")))
            .unwrap_or_else(|| panic!("docs/troubleshooting.md has no row for {slug}"));
        assert!(
            row.contains(&format!("| {status} |")),
            "{slug} is answered {status}: {row}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Links

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(path: &Path) -> BTreeSet<String> {
    let mut in_block = false;
    read(path)
        .lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_block = !in_block;
            }
            !in_block && l.starts_with('#')
        })
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn links_between_the_docs_resolve() {
    let mut files = docs();
    files.push(repo_root().join("deploy/README.md"));
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = read(file);
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            checked += 1;
            if !resolved.exists() {
                problems.push(format!("{}: {target} does not exist", file.display()));
                continue;
            }
            if !anchor.is_empty() && !anchors(&resolved).contains(anchor) {
                problems.push(format!("{}: no heading for #{anchor}", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 10, "only {checked} links");
}
