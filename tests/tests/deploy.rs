//! deploy/ rendered and checked, the way an operator would apply it.
//!
//! Every kustomization is rendered with `kubectl kustomize`: the base (`deploy/`), each
//! overlay under `deploy/overlays/`, all components of `deploy/components/` together (they
//! must compose), and `deploy/uninstall/`. Then:
//!
//! - **Schema**: every built-in object is validated by `kubernetes-validate --strict` (a PyPI
//!   package that bundles the Kubernetes JSON schemas and works offline) against the oldest
//!   and newest Kubernetes versions in [`KUBERNETES_VERSIONS`]. Strict means a field the API
//!   does not have fails, at any depth; [`the_validators_reject_misspelled_fields`] proves
//!   it on every run. cert-manager's objects have no bundled schema: [`cert_manager_problems`]
//!   checks their apiVersion, kind, required and known fields, and the references between
//!   them, and is proved the same way.
//! - **Properties**: what the issue asks of the base (two replicas, PodDisruptionBudget,
//!   anti-affinity, non-root, read-only root, RuntimeDefault seccomp, control-plane
//!   scheduling, headless Service, RBAC verbs exactly, host-network agent with NET_ADMIN and
//!   NET_BIND_SERVICE only (its pods' port is privileged),
//!   Secrets mounted as directories), node binding (the agent's projected ServiceAccount
//!   token, audience `podiam`, where `--token-file` reads it; the server's TokenReview and
//!   SubjectAccessReview rights and its agent settings matching the agent), the
//!   `podiam-operator` roles, and what each overlay changes.
//! - **The binaries agree**: every `--flag` and every environment variable (including the
//!   keys of the ConfigMaps a container loads with `envFrom`) given to a podiam binary exists
//!   in that binary's `--help`; the rendered server and agent configurations pass the
//!   binaries' own start-up checks (the only complaint allowed is the base role ARN
//!   placeholder); the Secrets are the ones `podiam-certs --secrets` writes, with the keys
//!   the TLS flags name; the Dockerfile puts the binaries where the manifests run them.
//!
//! Needs `kubectl` with kustomize v5 and `kubernetes-validate==1.37.0` for the `python3` on
//! PATH (scripts/setup installs both, the validator into `.venv`, which scripts/test puts
//! first on PATH); fails with that message when either is missing.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use podiam_tests::fixtures::repo_root;
use podiam_tests::help::{Help, parse_help};
use podiam_tests::process::scratch_dir;
use podiam_tests::world::binary;
use serde_json::{Value, json};

/// Kubernetes versions the built-in objects are validated against: an old one still in use
/// and the newest the pinned validator bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// What scripts/setup installs; named in failure messages.
const VALIDATOR_REQUIREMENT: &str = "kubernetes-validate==1.37.0";
/// The namespace everything of the base lives in.
const NAMESPACE: &str = "podiam";
const SERVER_SECRET: &str = "podiam-server-tls";
const AGENT_SECRET: &str = "podiam-agent-tls";
/// Labels that mark control-plane nodes: current and pre-1.24 (kops).
const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

// ---------------------------------------------------------------------------------------
// Rendering

/// One rendered kustomization.
#[derive(Debug)]
struct Rendering {
    /// Its directory relative to deploy/ ("." for the base).
    name: String,
    /// The rendered YAML stream, as written to disk for the validator.
    file: PathBuf,
    objects: Vec<Value>,
}

impl Rendering {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    /// A ConfigMap by the name it was generated from (kustomize appends a content hash).
    fn config_map(&self, generated_from: &str) -> &Value {
        let found: Vec<&Value> = self
            .all("ConfigMap")
            .into_iter()
            .filter(|o| config_map_base_name(str_at(o, "/metadata/name")) == generated_from)
            .collect();
        assert_eq!(found.len(), 1, "{}: ConfigMap {generated_from}", self.name);
        found[0]
    }

    fn server(&self) -> &Value {
        self.get("Deployment", "podiam-server")
    }

    fn agent(&self) -> &Value {
        self.get("DaemonSet", "podiam-agent")
    }
}

/// `podiam-server-79h98khhhb` → `podiam-server`.
fn config_map_base_name(name: &str) -> &str {
    name.rsplit_once('-').map_or(name, |(base, _)| base)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// Runs a command to completion; panics with its output when it cannot start or fails.
fn run(command: &mut Command, hint: &str) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}. {hint}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn require_tools() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let version = run(
            Command::new("kubectl").args(["version", "--client"]),
            "kubectl (with kustomize v5) is needed: scripts/setup installs it",
        );
        let version = String::from_utf8_lossy(&version.stdout);
        assert!(
            version.contains("Kustomize Version: v5"),
            "kubectl's built-in kustomize must be v5 or later (components, labels); this kubectl says:\n{version}"
        );
        run(
            Command::new("python3").args(["-c", "import kubernetes_validate, yaml"]),
            &python_module_missing_hint(),
        );
    });
}

fn python_module_missing_hint() -> String {
    format!(
        "the python3 on PATH lacks the validator '{VALIDATOR_REQUIREMENT}': scripts/setup installs it into .venv; put .venv/bin first on PATH (scripts/test does)"
    )
}

/// YAML stream → JSON objects, with PyYAML (a dependency of kubernetes-validate).
fn yaml_to_json(file: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let output = run(
        Command::new("python3").args(["-c", SCRIPT]).arg(file),
        &python_module_missing_hint(),
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn render(dir: &Path, name: &str, out: &Path) -> Rendering {
    let output = run(
        Command::new("kubectl").arg("kustomize").arg(dir),
        "kubectl is needed: scripts/setup installs it",
    );
    let file = out.join(format!("{}.yaml", name.replace(['/', '.'], "_")));
    std::fs::write(&file, &output.stdout).unwrap();
    let objects = yaml_to_json(&file);
    assert!(!objects.is_empty(), "{name} rendered nothing");
    Rendering {
        name: name.to_string(),
        file,
        objects,
    }
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A path from `from` to `to` made of `..` steps (kustomize refuses absolute paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let ups = from.components().count() - 1;
    let mut path = PathBuf::new();
    for _ in 0..ups {
        path.push("..");
    }
    path.join(to.strip_prefix("/").unwrap())
}

/// Every kustomization of deploy/, rendered once per test process.
fn renderings() -> &'static [Rendering] {
    static ALL: OnceLock<Vec<Rendering>> = OnceLock::new();
    ALL.get_or_init(|| {
        require_tools();
        let deploy = repo_root().join("deploy");
        let out = scratch_dir("deploy-render").unwrap();
        let mut all = vec![render(&deploy, ".", &out)];
        for overlay in subdirs(&deploy.join("overlays")) {
            let name = format!("overlays/{overlay}");
            all.push(render(&deploy.join(&name), &name, &out));
        }
        // All components at once: they must compose (an EKS cluster on old nodes may need
        // ordinary-nodes, cert-manager and iptables-legacy together).
        let combined = out.join("all-components");
        std::fs::create_dir_all(&combined).unwrap();
        let components: Vec<String> = subdirs(&deploy.join("components"))
            .iter()
            .map(|c| {
                let path = relative(&combined, &deploy.join("components").join(c));
                format!("  - {}\n", path.display())
            })
            .collect();
        let kustomization = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{}",
            relative(&combined, &deploy.join("base")).display(),
            components.concat()
        );
        std::fs::write(combined.join("kustomization.yaml"), kustomization).unwrap();
        all.push(render(&combined, "all-components", &out));
        all.push(render(&deploy.join("uninstall"), "uninstall", &out));
        all
    })
}

fn rendering(name: &str) -> &'static Rendering {
    renderings()
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rendering {name}"))
}

fn base() -> &'static Rendering {
    rendering(".")
}

// ---------------------------------------------------------------------------------------
// Schema validation

/// Objects of the Prometheus Operator's CRDs (deploy/components/monitoring): no bundled
/// schema either; [`monitoring_problems`] checks them.
fn is_monitoring(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

fn is_cert_manager(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("cert-manager.io/"))
}

/// Runs kubernetes-validate --strict on `files` for every version in
/// [`KUBERNETES_VERSIONS`]; returns the problems found (empty when all passed).
/// `expected_passes` is how many built-in objects the files hold: each must be reported
/// as passed, so that an object the validator silently skipped is noticed too.
fn schema_problems(files: &[&Path], expected_passes: usize) -> Vec<String> {
    let mut problems = Vec::new();
    for version in KUBERNETES_VERSIONS {
        let output = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(files)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("python3: {e}; {}", python_module_missing_hint()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !text.contains("No module named kubernetes_validate"),
            "{}",
            python_module_missing_hint()
        );
        let passes = text.lines().filter(|l| l.contains(" passed for ")).count();
        for line in text.lines() {
            let schemaless = line.contains("Couldn't find schema");
            let custom =
                line.contains("cert-manager.io/") || line.contains("monitoring.coreos.com/");
            if line.starts_with("ERROR") || (schemaless && !custom) {
                problems.push(format!("{version}: {line}"));
            }
        }
        if !output.status.success() && problems.is_empty() {
            problems.push(format!("{version}: validator failed: {text}"));
        }
        if problems.is_empty() && passes != expected_passes {
            problems.push(format!(
                "{version}: {passes} objects passed, {expected_passes} expected:\n{text}"
            ));
        }
    }
    problems
}

#[test]
fn every_kustomization_renders_and_its_objects_validate() {
    let all = renderings();
    let files: Vec<&Path> = all.iter().map(|r| r.file.as_path()).collect();
    let built_in = all
        .iter()
        .flat_map(|r| &r.objects)
        .filter(|o| !is_cert_manager(o) && !is_monitoring(o))
        .count();
    let problems = schema_problems(&files, built_in);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for r in all {
        let mut problems = cert_manager_problems(r);
        problems.extend(monitoring_problems(r));
        assert!(problems.is_empty(), "{}: {}", r.name, problems.join("\n"));
    }
}

#[test]
fn the_validators_reject_misspelled_fields() {
    require_tools();
    let out = scratch_dir("deploy-misspelled").unwrap();
    let text = std::fs::read_to_string(&base().file).unwrap();
    // One misspelling deep in a pod template, one at the top of a Service's spec.
    for (right, wrong) in [
        ("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
        ("clusterIP", "clusterIp"),
    ] {
        assert!(text.contains(right));
        let file = out.join(format!("{wrong}.yaml"));
        std::fs::write(&file, text.replace(right, wrong)).unwrap();
        let problems = schema_problems(&[&file], usize::MAX);
        assert!(
            problems.iter().any(|p| p.contains(wrong)),
            "{wrong} was not rejected: {problems:?}"
        );
    }
    let mut manager = rendering("overlays/cert-manager").objects.clone();
    let server_cert = manager
        .iter_mut()
        .find(|o| o["kind"] == "Certificate" && o["metadata"]["name"] == "podiam-server")
        .unwrap();
    let names = server_cert["spec"]["dnsNames"].take();
    server_cert["spec"]["dnsName"] = names;
    let mutated = Rendering {
        name: "misspelled".into(),
        file: PathBuf::new(),
        objects: manager,
    };
    let problems = cert_manager_problems(&mutated);
    assert!(
        problems.iter().any(|p| p.contains("dnsName")),
        "{problems:?}"
    );
}

// ---------------------------------------------------------------------------------------
// cert-manager

/// Fields of cert-manager.io/v1 specs (cert-manager 1.x), for the strict check.
const CERTIFICATE_FIELDS: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
];
const ISSUER_TYPES: &[&str] = &["acme", "ca", "selfSigned", "vault", "venafi"];
const KEY_USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

fn unknown_fields(object: &Value, allowed: &[&str], what: &str, problems: &mut Vec<String>) {
    match object.as_object() {
        Some(map) => {
            for key in map.keys().filter(|k| !allowed.contains(&k.as_str())) {
                problems.push(format!("{what}: unknown field {key}"));
            }
        }
        None => problems.push(format!("{what}: not an object")),
    }
}

/// A Go duration as cert-manager parses it, in hours/minutes/seconds ("2160h", "90m").
fn is_duration(text: &str) -> bool {
    let mut rest = text;
    let mut any = false;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let unit = rest[digits..].chars().next();
        if digits == 0 || !matches!(unit, Some('h' | 'm' | 's')) {
            return false;
        }
        rest = &rest[digits + 1..];
        any = true;
    }
    any
}

/// The structural check of cert-manager objects: apiVersion, kinds, known and required
/// fields, enumerations, and that every reference (issuerRef, a CA issuer's Secret) resolves
/// within the rendering.
fn cert_manager_problems(r: &Rendering) -> Vec<String> {
    let mut problems = Vec::new();
    let objects: Vec<&Value> = r.objects.iter().filter(|o| is_cert_manager(o)).collect();
    let issuers: BTreeMap<&str, &Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Issuer")
        .map(|o| (o["metadata"]["name"].as_str().unwrap_or_default(), *o))
        .collect();
    let ca_secrets: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Certificate" && o["spec"]["isCA"] == true)
        .filter_map(|o| o["spec"]["secretName"].as_str())
        .collect();
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap_or("<unnamed>");
        let what = format!("{} {name}", o["kind"]);
        if o["apiVersion"] != "cert-manager.io/v1" {
            problems.push(format!("{what}: apiVersion {}", o["apiVersion"]));
        }
        if o["metadata"]["namespace"] != NAMESPACE {
            problems.push(format!("{what}: not in namespace {NAMESPACE}"));
        }
        unknown_fields(
            &o["metadata"],
            &["name", "namespace", "labels", "annotations"],
            &what,
            &mut problems,
        );
        let spec = &o["spec"];
        match o["kind"].as_str() {
            Some("Issuer") => {
                unknown_fields(spec, ISSUER_TYPES, &what, &mut problems);
                let types = spec.as_object().map_or(0, |m| m.len());
                if types != 1 {
                    problems.push(format!("{what}: {types} issuer types, exactly one needed"));
                }
                if let Some(ca) = spec.get("ca") {
                    unknown_fields(
                        ca,
                        &[
                            "secretName",
                            "crlDistributionPoints",
                            "ocspServers",
                            "issuingCertificateURLs",
                        ],
                        &what,
                        &mut problems,
                    );
                    match ca["secretName"].as_str() {
                        Some(secret) if ca_secrets.contains(secret) => {}
                        other => problems.push(format!(
                            "{what}: ca.secretName {other:?} is no CA Certificate's Secret"
                        )),
                    }
                }
                if let Some(selfsigned) = spec.get("selfSigned") {
                    unknown_fields(selfsigned, &["crlDistributionPoints"], &what, &mut problems);
                }
            }
            Some("Certificate") => {
                unknown_fields(spec, CERTIFICATE_FIELDS, &what, &mut problems);
                if spec["secretName"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{what}: spec.secretName is required"));
                }
                let issuer_ref = &spec["issuerRef"];
                unknown_fields(issuer_ref, &["name", "kind", "group"], &what, &mut problems);
                let kind_ok = issuer_ref.get("kind").is_none_or(|k| k == "Issuer");
                let group_ok = issuer_ref
                    .get("group")
                    .is_none_or(|g| g == "cert-manager.io");
                match issuer_ref["name"].as_str() {
                    Some(issuer) if kind_ok && group_ok && issuers.contains_key(issuer) => {}
                    _ => problems.push(format!(
                        "{what}: issuerRef {issuer_ref} names no Issuer of this rendering"
                    )),
                }
                for field in ["duration", "renewBefore"] {
                    if let Some(d) = spec.get(field)
                        && !d.as_str().is_some_and(is_duration)
                    {
                        problems.push(format!("{what}: {field} {d} is not a duration"));
                    }
                }
                if let Some(key) = spec.get("privateKey") {
                    unknown_fields(
                        key,
                        &["algorithm", "encoding", "rotationPolicy", "size"],
                        &what,
                        &mut problems,
                    );
                    let algorithm = key["algorithm"].as_str().unwrap_or("RSA");
                    if !["RSA", "ECDSA", "Ed25519"].contains(&algorithm) {
                        problems.push(format!("{what}: privateKey.algorithm {algorithm}"));
                    }
                    if algorithm == "ECDSA"
                        && !key["size"]
                            .as_u64()
                            .is_some_and(|s| [256, 384, 521].contains(&s))
                    {
                        problems.push(format!("{what}: ECDSA size {}", key["size"]));
                    }
                    if let Some(policy) = key.get("rotationPolicy")
                        && policy != "Never"
                        && policy != "Always"
                    {
                        problems.push(format!("{what}: rotationPolicy {policy}"));
                    }
                }
                for usage in spec["usages"].as_array().into_iter().flatten() {
                    if !usage.as_str().is_some_and(|u| KEY_USAGES.contains(&u)) {
                        problems.push(format!("{what}: usage {usage}"));
                    }
                }
                if let Some(template) = spec.get("secretTemplate") {
                    unknown_fields(template, &["annotations", "labels"], &what, &mut problems);
                }
            }
            other => problems.push(format!("{what}: unexpected kind {other:?}")),
        }
    }
    problems
}

#[test]
fn cert_manager_overlay_issues_the_secrets_the_pods_mount() {
    let r = rendering("overlays/cert-manager");
    let ca = r.get("Certificate", "podiam-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    let ca_issuer_of = |cert: &Value| {
        let issuer = r.get("Issuer", str_at(cert, "/spec/issuerRef/name"));
        issuer["spec"].clone()
    };
    // The CA is self-signed; the leaves are signed by the CA issuer.
    assert!(ca_issuer_of(ca).get("selfSigned").is_some());
    let ca_secret = str_at(ca, "/spec/secretName");
    let server_cert = r.get("Certificate", "podiam-server");
    let agent_cert = r.get("Certificate", "podiam-agent");
    for (cert, secret, usage) in [
        (server_cert, SERVER_SECRET, "server auth"),
        (agent_cert, AGENT_SECRET, "client auth"),
    ] {
        assert_eq!(str_at(cert, "/spec/secretName"), secret);
        assert_eq!(ca_issuer_of(cert)["ca"]["secretName"], ca_secret);
        assert_ne!(cert["spec"]["isCA"], true);
        let usages: Vec<&str> = cert["spec"]["usages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert!(usages.contains(&usage), "{secret}: {usages:?}");
    }
    let names: Vec<&str> = server_cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for expected in [
        "podiam-server",
        "podiam-server.podiam.svc",
        "podiam-server.podiam.svc.cluster.local",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
    // The name the agents check the server's certificate against is one of them.
    let server_url = flag_value(container(r.agent(), "agent"), "--server").unwrap();
    let host = server_url
        .strip_prefix("https://")
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    assert!(names.contains(&host), "{host} not in {names:?}");
    assert_eq!(str_at(agent_cert, "/spec/commonName"), "podiam-agent");
    // Nothing else of the base changed.
    let rest = |r: &Rendering| -> Vec<Value> {
        r.objects
            .iter()
            .filter(|o| !is_cert_manager(o))
            .cloned()
            .collect()
    };
    assert_eq!(rest(r), rest(base()));
}

// ---------------------------------------------------------------------------------------
// The pods

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(workload: &Value) -> Vec<&Value> {
    let spec = pod_spec(workload);
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The value of `--flag=value` in a container's args.
fn flag_value<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    args(container)
        .into_iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

fn port_of(address: &str) -> u64 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn string_set(value: &Value) -> BTreeSet<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap())
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().unwrap();
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k] == *v)
}

/// Probes are on the health listener's port, at /live and /ready.
fn assert_probes(c: &Value) {
    let health_port = port_of(flag_value(c, "--health-listen").unwrap());
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], health_port, "{probe}");
    }
}

/// The workload's TLS Secret is mounted read-only as a directory (never subPath, so
/// rotated certificates reach the pod) and the TLS flags name its files.
fn assert_tls_mount(workload: &Value, c: &Value, secret: &str) {
    let volumes = pod_spec(workload)["volumes"].as_array().unwrap();
    let volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == secret)
        .unwrap_or_else(|| panic!("no volume of Secret {secret}"));
    let mounts: Vec<&Value> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == volume["name"])
        .collect();
    assert_eq!(mounts.len(), 1, "{secret}");
    let mount = mounts[0];
    assert_eq!(mount["readOnly"], true, "{secret}");
    assert!(mount.get("subPath").is_none() && mount.get("subPathExpr").is_none());
    assert!(volume["secret"].get("items").is_none(), "items hide keys");
    let dir = str_at(mount, "/mountPath");
    for (flag, key) in [
        ("--tls-ca", "ca.crt"),
        ("--tls-cert", "tls.crt"),
        ("--tls-key", "tls.key"),
    ] {
        assert_eq!(
            flag_value(c, flag),
            Some(format!("{dir}/{key}").as_str()),
            "{flag}"
        );
    }
    // No Secret is mounted anywhere with subPath, in any container.
    for c in containers(workload) {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            assert!(m.get("subPath").is_none(), "{m}");
        }
    }
}

fn capabilities(c: &Value) -> (BTreeSet<&str>, BTreeSet<&str>) {
    let caps = &c["securityContext"]["capabilities"];
    (string_set(&caps["add"]), string_set(&caps["drop"]))
}

#[test]
fn base_server_is_replicated_hardened_and_on_the_control_plane() {
    let r = base();
    let server = r.server();
    assert_eq!(server["metadata"]["namespace"], NAMESPACE);
    assert_eq!(server["spec"]["replicas"], 2);
    let spec = pod_spec(server);
    let pod_labels = &server["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(&server["spec"]["selector"], pod_labels));

    // One replica per node.
    let anti =
        spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .unwrap();
    assert!(anti.iter().any(|term| {
        term["topologyKey"] == "kubernetes.io/hostname"
            && labels_match(&term["labelSelector"], pod_labels)
    }));

    // A disruption budget that leaves a replica.
    let pdbs: Vec<&Value> = r
        .all("PodDisruptionBudget")
        .into_iter()
        .filter(|p| labels_match(&p["spec"]["selector"], pod_labels))
        .collect();
    assert_eq!(pdbs.len(), 1);
    assert_eq!(pdbs[0]["spec"]["maxUnavailable"], 1);

    // Control-plane nodes, current and older labels: node affinity and tolerations.
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    for label in CONTROL_PLANE_LABELS {
        assert!(
            terms
                .iter()
                .any(|t| t["matchExpressions"] == json!([{"key": label, "operator": "Exists"}])),
            "{label}: {terms:?}"
        );
        assert!(
            spec["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["key"] == label && t["operator"] == "Exists"),
            "{label}"
        );
    }

    // Hardened.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(spec["securityContext"]["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(server, "server");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let (add, drop) = capabilities(c);
    assert!(add.is_empty(), "{add:?}");
    assert_eq!(drop, BTreeSet::from(["ALL"]));
    for resource in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][resource].is_string(),
            "{resource}"
        );
    }
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Host network (its AWS credentials are the node's), with cluster DNS.
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_probes(c);
    assert_tls_mount(server, c, SERVER_SECRET);
    assert_eq!(spec["serviceAccountName"], "podiam-server");
}

#[test]
fn base_service_is_headless_and_reaches_the_grpc_port() {
    let r = base();
    let service = r.get("Service", "podiam-server");
    assert_eq!(service["spec"]["clusterIP"], "None");
    let server = r.server();
    assert!(labels_match(
        &json!({"matchLabels": service["spec"]["selector"]}),
        &server["spec"]["template"]["metadata"]["labels"]
    ));
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], 8443);
    let c = container(server, "server");
    let target = ports[0]["targetPort"].as_str().unwrap();
    let container_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == target)
        .unwrap();
    let listen = port_of(flag_value(c, "--listen").unwrap());
    assert_eq!(container_port["containerPort"], listen);
    // The agents' --server is this Service, in this namespace, on this port.
    let url = flag_value(container(r.agent(), "agent"), "--server").unwrap();
    assert_eq!(
        url,
        format!(
            "https://{}.{}.svc:{}",
            str_at(service, "/metadata/name"),
            str_at(service, "/metadata/namespace"),
            ports[0]["port"]
        )
    );
}

/// The RBAC rules of a rendering as (API group, resource, verb) triples.
fn rbac_triples(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut triples = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in string_set(&rule["apiGroups"]) {
            for resource in string_set(&rule["resources"]) {
                for verb in string_set(&rule["verbs"]) {
                    triples.insert((group.into(), resource.into(), verb.into()));
                }
            }
        }
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
    }
    triples
}

/// (API group, resource, verb) triples from `(group, resources, verbs)` rows.
fn triples(rows: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut triples = BTreeSet::new();
    for (group, resources, verbs) in rows {
        for resource in *resources {
            for verb in *verbs {
                triples.insert((group.to_string(), resource.to_string(), verb.to_string()));
            }
        }
    }
    triples
}

fn names(objects: &[&Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| str_at(o, "/metadata/name").to_string())
        .collect()
}

#[test]
fn base_rbac_grants_exactly_what_the_server_needs_and_nothing_to_the_agent() {
    let r = base();
    assert_eq!(
        names(&r.all("ClusterRole")),
        BTreeSet::from(["podiam-operator".into(), "podiam-server".into()])
    );
    assert_eq!(
        names(&r.all("Role")),
        BTreeSet::from(["podiam-operator-port-forward".into()])
    );
    // The server: its watches and events, and the reviews that tell it who calls (an
    // agent's projected token, an operator's own token) and what an operator may see.
    let expected = triples(&[
        (
            "",
            &["pods", "namespaces", "serviceaccounts"],
            &["get", "list", "watch"],
        ),
        // Lifting a node's agent-not-ready taint.
        ("", &["nodes"], &["get", "patch"]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
        ("authentication.k8s.io", &["tokenreviews"], &["create"]),
        (
            "authorization.k8s.io",
            &["subjectaccessreviews"],
            &["create"],
        ),
    ]);
    assert_eq!(
        rbac_triples(r.get("ClusterRole", "podiam-server")),
        expected
    );

    // Only the server is bound: operators' bindings name the cluster's own users and
    // groups, and are theirs to write (docs/install.md).
    assert!(r.all("RoleBinding").is_empty());
    let bindings = r.all("ClusterRoleBinding");
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        bindings[0]["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podiam-server"})
    );
    assert_eq!(
        bindings[0]["subjects"],
        json!([{"kind": "ServiceAccount", "name": "podiam-server", "namespace": NAMESPACE}])
    );
    // The agent's account exists, is bound to nothing, and has no API token mounted (its
    // projected podiam token is checked in base_agent_proves_its_node_with_a_projected_token).
    let agent_sa = r.get("ServiceAccount", "podiam-agent");
    assert_eq!(agent_sa["automountServiceAccountToken"], false);
    assert_eq!(pod_spec(r.agent())["serviceAccountName"], "podiam-agent");
    assert_eq!(pod_spec(r.agent())["automountServiceAccountToken"], false);
}

#[test]
fn base_operator_roles_allow_explain_status_and_the_port_forward_only() {
    let r = base();
    // Explain and status, with or without a server: read pods, namespaces and the pod's
    // ServiceAccount.
    assert_eq!(
        rbac_triples(r.get("ClusterRole", "podiam-operator")),
        triples(&[(
            "",
            &["pods", "namespaces", "serviceaccounts"],
            &["get", "list"]
        )])
    );
    // `kubectl -n podiam port-forward deploy/podiam-server 8443`, the servers' settings and
    // the published CA certificate: in namespace podiam, and nothing more.
    let role = r.get("Role", "podiam-operator-port-forward");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rbac_triples(role),
        triples(&[
            ("apps", &["deployments"], &["get"]),
            ("", &["pods"], &["get", "list"]),
            ("", &["pods/portforward"], &["create"]),
            ("", &["configmaps"], &["get"]),
        ])
    );
    // The Deployment it names exists in that namespace.
    assert_eq!(r.server()["metadata"]["namespace"], NAMESPACE);
}

/// A setting of a podiam container: its `--flag=value`, else its environment variable
/// (ConfigMaps included).
fn setting(r: &Rendering, c: &Value, flag: &str, variable: &str) -> Option<String> {
    flag_value(c, flag)
        .map(str::to_string)
        .or_else(|| container_env(r, c).get(variable).cloned())
}

#[test]
fn base_agent_proves_its_node_with_a_projected_token() {
    // In every rendering that has the agent: no overlay may lose the token or move it.
    let mut checked = 0;
    for r in renderings() {
        let Some(agent) = r
            .all("DaemonSet")
            .into_iter()
            .find(|d| d["metadata"]["name"] == "podiam-agent")
        else {
            continue;
        };
        let spec = pod_spec(agent);
        let c = container(agent, "agent");
        // Exactly one projected ServiceAccount token, for the servers' audience.
        let tokens: Vec<(&Value, &Value)> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|v| {
                v["projected"]["sources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.get("serviceAccountToken"))
                    .map(move |t| (v, t))
            })
            .collect();
        assert_eq!(tokens.len(), 1, "{}: {tokens:?}", r.name);
        let (volume, token) = tokens[0];
        assert_eq!(token["audience"], "podiam", "{}", r.name);
        // Short-lived (the API server's floor is 600 s); the kubelet rotates it and the
        // agent re-reads it.
        let lifetime = token["expirationSeconds"].as_u64().unwrap();
        assert!((600..=3600).contains(&lifetime), "{}: {lifetime}", r.name);
        // Mounted read-only as a directory (a subPath would never see the rotated token),
        // where the agent reads it.
        let mounts: Vec<&Value> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == volume["name"])
            .collect();
        assert_eq!(mounts.len(), 1, "{}", r.name);
        assert_eq!(mounts[0]["readOnly"], true);
        assert!(mounts[0].get("subPath").is_none());
        let path = format!(
            "{}/{}",
            str_at(mounts[0], "/mountPath"),
            str_at(token, "/path")
        );
        let token_file = setting(r, c, "--token-file", "PODIAM_TOKEN_FILE")
            .unwrap_or_else(|| "/var/run/secrets/podiam/token".to_string());
        assert_eq!(token_file, path, "{}: the agent reads another file", r.name);
        // The token is the agent pod's own, of its own ServiceAccount; the API token is
        // not mounted at all.
        assert_eq!(spec["serviceAccountName"], "podiam-agent");
        assert_eq!(spec["automountServiceAccountToken"], false);
        // The node name the agent claims comes from its pod (and is required).
        let node = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .unwrap_or_else(|| panic!("{}: no NODE_NAME", r.name));
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");

        // The servers check what the agents present: this audience, this ServiceAccount,
        // and node binding enforced.
        let server = container(r.server(), "server");
        let audience = setting(
            r,
            server,
            "--agent-token-audience",
            "PODIAM_AGENT_TOKEN_AUDIENCE",
        )
        .unwrap_or_else(|| "podiam".to_string());
        assert_eq!(json!(audience), token["audience"], "{}", r.name);
        let account = setting(
            r,
            server,
            "--agent-service-account",
            "PODIAM_AGENT_SERVICE_ACCOUNT",
        )
        .unwrap_or_else(|| "podiam/podiam-agent".to_string());
        assert_eq!(
            account,
            format!(
                "{}/{}",
                str_at(agent, "/metadata/namespace"),
                str_at(spec, "/serviceAccountName")
            ),
            "{}",
            r.name
        );
        let binding = setting(r, server, "--node-binding", "PODIAM_NODE_BINDING")
            .unwrap_or_else(|| "enforce".to_string());
        assert_eq!(binding, "enforce", "{}", r.name);
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} renderings have the agent");
}

#[test]
fn base_agent_runs_on_every_node_with_only_net_admin_and_a_privileged_port() {
    let r = base();
    let agent = r.agent();
    let spec = pod_spec(agent);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(
        spec["tolerations"]
            .as_array()
            .unwrap()
            .contains(&json!({"operator": "Exists"}))
    );
    assert!(spec.get("nodeSelector").is_none() && spec.get("affinity").is_none());
    assert_eq!(
        agent["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let all = containers(agent);
    assert_eq!(all.len(), 1);
    let c = all[0];
    let (add, drop) = capabilities(c);
    // NET_BIND_SERVICE for the pods' port, below 1024 so that no unprivileged process on the
    // node can take it while no agent listens.
    assert_eq!(add, BTreeSet::from(["NET_ADMIN", "NET_BIND_SERVICE"]));
    assert_eq!(drop, BTreeSet::from(["ALL"]));
    let listen = r.config_map("podiam-agent")["data"]["PODIAM_AGENT_LISTEN"]
        .as_str()
        .expect("PODIAM_AGENT_LISTEN");
    assert!(port_of(listen) < 1024, "{listen}");
    assert_eq!(c["securityContext"]["runAsUser"], 0);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_ne!(c["securityContext"]["privileged"], true);
    // Declared ports on the host network are host ports: the surge pod could not be
    // scheduled beside the old one.
    assert!(c.get("ports").is_none(), "the agent must declare no ports");
    // Stopping leaves the iptables rules: no hook may remove them.
    assert!(c.get("lifecycle").is_none());
    let a = args(c);
    assert_eq!(a[0], "serve");
    assert!(a.contains(&"--iptables"));
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("HOST_IP", "status.hostIP"),
        ("HOST_IPS", "status.hostIPs"),
    ] {
        let var = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    assert_eq!(
        r.config_map("podiam-agent")["data"]["PODIAM_INTERFACES"],
        "cali+"
    );
    assert_probes(c);
    assert_tls_mount(agent, c, AGENT_SECRET);
    let lock = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/run/xtables.lock")
        .unwrap();
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == lock["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], "/run/xtables.lock");
}

#[test]
fn base_namespace_admits_the_agent_and_everything_is_in_it() {
    let r = base();
    let ns = r.get("Namespace", NAMESPACE);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for o in &r.objects {
        if !cluster_scoped.contains(&o["kind"].as_str().unwrap()) {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{}", o["metadata"]);
        }
    }
}

/// The admission policy that keeps podiam's pod annotations out of pods/status writes.
const ANNOTATIONS_POLICY: &str = "podiam-annotations-not-through-status";

/// An admission policy of `r` named `name`, with its binding: cluster-scoped (no namespace,
/// or "" where kustomize gave one: cluster-scoped.yaml), denying, failing closed, and
/// matching updates of `resource` alone.
fn denying_policy<'a>(r: &'a Rendering, name: &str, resource: &str) -> &'a Value {
    let policy = r.get("ValidatingAdmissionPolicy", name);
    let binding = r.get("ValidatingAdmissionPolicyBinding", name);
    for object in [policy, binding] {
        let namespace = object["metadata"].get("namespace");
        assert!(namespace.is_none_or(|n| n == ""), "{object}");
    }
    assert_eq!(binding["spec"]["policyName"], name);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        policy["spec"]["matchConstraints"]["resourceRules"],
        json!([{
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["UPDATE"],
            "resources": [resource],
        }])
    );
    policy
}

/// Evaluates the CEL `expression` with cel-python (`.venv-cel`, from scripts/setup) for
/// each case `(what the write does, oldObject, object, allowed)`, and asserts that it holds
/// exactly for the allowed ones.
fn assert_cel(expression: &str, cases: &[(&str, Value, Value, bool)]) {
    const SCRIPT: &str = r#"
import json, sys, celpy
env = celpy.Environment()
program = env.program(env.compile(sys.argv[1]))
out = []
for old, new in json.loads(sys.stdin.read()):
    result = program.evaluate({"oldObject": celpy.json_to_cel(old), "object": celpy.json_to_cel(new)})
    out.append(bool(result) if isinstance(result, celpy.celtypes.BoolType) else repr(result))
print(json.dumps(out))
"#;
    let python = podiam_tests::process::repo_root().join(".venv-cel/bin/python3");
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT, expression])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}; run `bash scripts/setup`", python.display()));
    let pairs: Vec<(&Value, &Value)> = cases.iter().map(|(_, old, new, _)| (old, new)).collect();
    let input = serde_json::to_vec(&pairs).expect("JSON");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), &input).expect("written");
    let output = child.wait_with_output().expect("cel-python ends");
    assert!(
        output.status.success(),
        "cel-python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(results.len(), cases.len());
    for ((what, _, _, allowed), result) in cases.iter().zip(&results) {
        assert_eq!(*result, json!(allowed), "{what}");
    }
}

#[test]
fn base_refuses_podiam_annotations_changed_through_pod_status() {
    use podiam_policy::policy::{EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION};
    let r = base();
    let policy = denying_policy(r, ANNOTATIONS_POLICY, "pods/status");
    // Whoever writes: no matchConditions, no paramKind.
    assert!(policy["spec"].get("matchConditions").is_none());
    let validations = policy["spec"]["validations"]
        .as_array()
        .expect("validations");
    assert_eq!(validations.len(), 1);
    let expression = str_at(&validations[0], "/expression");
    for key in [
        ROLE_ANNOTATION,
        EXTERNAL_ID_ANNOTATION,
        SESSION_NAME_ANNOTATION,
    ] {
        assert!(
            expression.contains(&format!("'{key}'")),
            "{key}: {expression}"
        );
    }

    let pod = |annotations: Option<Value>| match annotations {
        Some(a) => json!({"metadata": {"name": "web", "annotations": a}, "status": {}}),
        None => json!({"metadata": {"name": "web"}, "status": {}}),
    };
    let role = |r: &str| json!({ROLE_ANNOTATION: r, "other": "x"});
    // (what the write does, old, new, allowed)
    let cases = [
        (
            "status only",
            pod(Some(role("a"))),
            pod(Some(role("a"))),
            true,
        ),
        ("no annotations at all", pod(None), pod(None), true),
        (
            "another annotation added",
            pod(Some(role("a"))),
            pod(Some(
                json!({ROLE_ANNOTATION: "a", "other": "y", "new": "z"}),
            )),
            true,
        ),
        (
            "the role changed",
            pod(Some(role("a"))),
            pod(Some(role("admin"))),
            false,
        ),
        ("a role added", pod(None), pod(Some(role("admin"))), false),
        (
            "a role added beside others",
            pod(Some(json!({"other": "x"}))),
            pod(Some(role("admin"))),
            false,
        ),
        ("the role removed", pod(Some(role("a"))), pod(None), false),
        (
            "the role removed, others kept",
            pod(Some(role("a"))),
            pod(Some(json!({"other": "x"}))),
            false,
        ),
        (
            "an external ID changed",
            pod(Some(
                json!({ROLE_ANNOTATION: "a", EXTERNAL_ID_ANNOTATION: "1"}),
            )),
            pod(Some(
                json!({ROLE_ANNOTATION: "a", EXTERNAL_ID_ANNOTATION: "2"}),
            )),
            false,
        ),
        (
            "a session name added",
            pod(Some(role("a"))),
            pod(Some(
                json!({ROLE_ANNOTATION: "a", "other": "x", SESSION_NAME_ANNOTATION: "s"}),
            )),
            false,
        ),
    ];
    assert_cel(expression, &cases);
}

#[test]
fn base_lets_the_servers_only_lift_their_taint_from_nodes() {
    const POLICY: &str = "podiam-server-only-lifts-its-taint";
    let r = base();
    let policy = denying_policy(r, POLICY, "nodes");
    // The servers' own ServiceAccount, as the base names it.
    let account = r.get("ServiceAccount", "podiam-server");
    let user = format!(
        "system:serviceaccount:{}:{}",
        str_at(account, "/metadata/namespace"),
        str_at(account, "/metadata/name")
    );
    assert_eq!(
        str_at(&policy["spec"]["matchConditions"][0], "/expression"),
        format!("request.userInfo.username == '{user}'")
    );
    assert_eq!(
        str_at(r.server(), "/spec/template/spec/serviceAccountName"),
        "podiam-server"
    );
    let expression = str_at(&policy["spec"]["validations"][0], "/expression");
    assert!(
        expression.contains(&format!("'{NOT_READY_TAINT}'")),
        "{expression}"
    );

    let taint = |key: &str| json!({"key": key, "value": "true", "effect": "NoExecute"});
    let node = |labels: Value, taints: Value| json!({"metadata": {"name": "node-1", "labels": labels}, "spec": {"taints": taints}});
    let labels = json!({"kubernetes.io/hostname": "node-1"});
    let old = node(
        labels.clone(),
        json!([taint(NOT_READY_TAINT), taint("dedicated")]),
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut new = node(labels.clone(), json!([taint("dedicated")]));
        f(&mut new);
        new
    };
    let lifted = || with(&|_| {});
    // (what the write does, old, new, allowed)
    let cases: Vec<(&str, Value, Value, bool)> = vec![
        ("lifts the not-ready taint", old.clone(), lifted(), true),
        ("changes nothing", old.clone(), old.clone(), true),
        (
            "lifts it, the last taint",
            node(labels.clone(), json!([taint(NOT_READY_TAINT)])),
            json!({"metadata": {"name": "node-1", "labels": labels}, "spec": {}}),
            true,
        ),
        (
            "lifts another taint",
            old.clone(),
            node(labels.clone(), json!([taint(NOT_READY_TAINT)])),
            false,
        ),
        (
            "adds a taint",
            old.clone(),
            with(&|n| n["spec"]["taints"] = json!([taint("dedicated"), taint("x")])),
            false,
        ),
        (
            "relabels",
            old.clone(),
            with(&|n| n["metadata"]["labels"]["role"] = json!("db")),
            false,
        ),
        (
            "annotates",
            old.clone(),
            with(&|n| n["metadata"]["annotations"] = json!({"a": "b"})),
            false,
        ),
        (
            "cordons",
            old.clone(),
            with(&|n| n["spec"]["unschedulable"] = json!(true)),
            false,
        ),
        (
            "gives it an owner",
            old.clone(),
            with(&|n| {
                n["metadata"]["ownerReferences"] =
                    json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}])
            }),
            false,
        ),
        (
            "adds a finalizer",
            old.clone(),
            with(&|n| n["metadata"]["finalizers"] = json!(["x/y"])),
            false,
        ),
        (
            "sets its provider ID",
            old.clone(),
            with(&|n| n["spec"]["providerID"] = json!("aws:///i-1")),
            false,
        ),
    ];
    assert_cel(expression, &cases);
}

/// The server's `--agent-not-ready-taint` default: nodes register with it until their agent
/// has its rules in place.
const NOT_READY_TAINT: &str = "podiam.io/agent-not-ready";

fn not_ready_toleration() -> Value {
    json!({"key": NOT_READY_TAINT, "operator": "Exists"})
}

/// Whether a pod with `tolerations` may be scheduled onto a node with `taint`, by the
/// scheduler's rule: some toleration matches its key (or tolerates every key with
/// `Exists`), its value (`Exists`, or `Equal` and the same value) and its effect (or all).
fn tolerates(tolerations: &Value, taint: &Value) -> bool {
    tolerations.as_array().into_iter().flatten().any(|t| {
        let key = t["key"].as_str().unwrap_or_default();
        let exists = t["operator"] == "Exists";
        let key_ok = key == taint["key"] || (key.is_empty() && exists);
        let value_ok = exists || t["value"] == taint["value"];
        let effect_ok = t
            .get("effect")
            .is_none_or(|e| e == "" || *e == taint["effect"]);
        key_ok && value_ok && effect_ok
    })
}

#[test]
fn a_node_tainted_at_boot_takes_agents_and_servers_and_nothing_else() {
    // NoExecute, as the docs say to register nodes (the kubelet also refuses a pod that
    // names the node itself); NoSchedule, as clusters set up before that do.
    for effect in ["NoExecute", "NoSchedule"] {
        tainted_at_boot(&json!({"key": NOT_READY_TAINT, "value": "true", "effect": effect}));
    }
}

/// Agents and servers run on a node with `taint`, and ordinary pods do not.
fn tainted_at_boot(taint: &Value) {
    let taint = taint.clone();
    let help = run(
        Command::new(binary("podiam-server").unwrap()).arg("--help"),
        "podiam-server --help",
    );
    assert!(
        String::from_utf8_lossy(&help.stdout).contains(&format!("[default: {NOT_READY_TAINT}]")),
        "the server lifts {NOT_READY_TAINT} by default"
    );
    for r in renderings().iter().filter(|r| r.name != "uninstall") {
        for workload in [r.agent(), r.server()] {
            assert!(
                tolerates(&pod_spec(workload)["tolerations"], &taint),
                "{}: {} must run on a node still tainted",
                r.name,
                str_at(workload, "/metadata/name")
            );
        }
    }
    // An ordinary pod (none of podiam's) waits for the agent.
    assert!(!tolerates(&json!([]), &taint));
    assert!(!tolerates(
        &json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]),
        &taint
    ));
}

#[test]
fn ordinary_nodes_overlay_only_lifts_control_plane_scheduling() {
    let r = rendering("overlays/ordinary-nodes");
    let spec = pod_spec(r.server());
    assert_eq!(spec["tolerations"], json!([not_ready_toleration()]));
    assert!(spec["affinity"].get("nodeAffinity").is_none());
    assert!(spec["affinity"].get("podAntiAffinity").is_some());
    let mut expected = base().server().clone();
    let template = &mut expected["spec"]["template"]["spec"];
    template["tolerations"] = json!([not_ready_toleration()]);
    template["affinity"]
        .as_object_mut()
        .unwrap()
        .remove("nodeAffinity");
    assert_eq!(*r.server(), expected);
    assert_eq!(r.agent(), base().agent());
    // And the base does tolerate the control plane (asserted in detail above).
    assert!(pod_spec(base().server()).get("tolerations").is_some());
}

/// How many server pods a drain may evict at once, as the disruption controller counts it,
/// on a cluster with `nodes` nodes the server may run on: required anti-affinity puts at most
/// one replica on each, and the rest stay Pending (unhealthy).
fn disruptions_allowed(r: &Rendering, nodes: i64) -> i64 {
    let replicas = r.server()["spec"]["replicas"].as_i64().unwrap();
    let anti_affinity = &pod_spec(r.server())["affinity"]["podAntiAffinity"];
    assert!(anti_affinity["requiredDuringSchedulingIgnoredDuringExecution"].is_array());
    let healthy = replicas.min(nodes);
    let budget = r.get("PodDisruptionBudget", "podiam-server");
    let max_unavailable = budget["spec"]["maxUnavailable"].as_i64().unwrap();
    (healthy - (replicas - max_unavailable)).max(0)
}

#[test]
fn single_replica_overlay_lets_a_one_node_control_plane_drain() {
    let r = rendering("overlays/single-replica");
    // The hole it closes: the base on one control-plane node keeps its second replica
    // Pending and its budget then allows no eviction, so no drain of that node finishes.
    assert_eq!(disruptions_allowed(base(), 1), 0);
    assert_eq!(disruptions_allowed(base(), 2), 1);
    assert_eq!(disruptions_allowed(r, 1), 1);
    // And it changes nothing else.
    let mut expected = base().server().clone();
    expected["spec"]["replicas"] = json!(1);
    assert_eq!(*r.server(), expected);
    assert_eq!(r.agent(), base().agent());
    assert_eq!(
        r.get("PodDisruptionBudget", "podiam-server"),
        base().get("PodDisruptionBudget", "podiam-server")
    );
}

#[test]
fn iptables_legacy_overlay_adds_net_raw_and_the_legacy_back_end() {
    let r = rendering("overlays/iptables-legacy");
    let (add, _) = capabilities(container(r.agent(), "agent"));
    assert_eq!(
        add,
        BTreeSet::from(["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"])
    );
    assert_eq!(
        r.config_map("podiam-agent")["data"]["PODIAM_IPTABLES_BIN"],
        "iptables-legacy"
    );
    assert_eq!(r.server(), base().server());
}

#[test]
fn all_components_compose() {
    let r = rendering("all-components");
    assert_eq!(
        pod_spec(r.server())["tolerations"],
        json!([not_ready_toleration()])
    );
    assert_eq!(r.server()["spec"]["replicas"], 1);
    assert_eq!(r.all("PrometheusRule").len(), 1);
    let (add, _) = capabilities(container(r.agent(), "agent"));
    assert!(add.contains("NET_RAW"));
    assert_eq!(r.all("Certificate").len(), 3);
}

#[test]
fn uninstall_removes_the_rules_of_both_back_ends_on_every_node() {
    let r = rendering("uninstall");
    let daemonsets = r.all("DaemonSet");
    assert_eq!(daemonsets.len(), 1);
    let ds = daemonsets[0];
    let spec = pod_spec(ds);
    assert_eq!(spec["hostNetwork"], true);
    assert!(
        spec["tolerations"]
            .as_array()
            .unwrap()
            .contains(&json!({"operator": "Exists"}))
    );
    let namespace = str_at(ds, "/metadata/namespace");
    let ns = r.get("Namespace", namespace);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let mut back_ends = BTreeSet::new();
    for c in spec["initContainers"].as_array().unwrap() {
        assert_eq!(c["command"], json!(["/usr/local/bin/podiam-agent"]));
        assert_eq!(args(c)[0], "uninstall");
        back_ends.insert(flag_value(c, "--iptables-bin").unwrap());
        let (add, drop) = capabilities(c);
        assert_eq!(add, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));
        assert_eq!(drop, BTreeSet::from(["ALL"]));
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == "/run/xtables.lock")
        );
    }
    assert_eq!(
        back_ends,
        BTreeSet::from(["iptables-legacy", "iptables-nft"])
    );
    // One of them deletes the token key file the agent keeps on the node, where the
    // agent keeps it.
    let agent_key_file = flag_value(container(base().agent(), "agent"), "--token-key-file")
        .expect("the agent's key file");
    let deleting: Vec<_> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| flag_value(c, "--token-key-file") == Some(agent_key_file))
        .collect();
    assert_eq!(deleting.len(), 1, "{spec:#}");
    let mount = deleting[0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/podiam")
        .expect("the key directory mounted");
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    assert_eq!(volume["hostPath"]["path"], "/var/lib/podiam");
    // Nothing in it serves: a running agent would put the rules back.
    for c in containers(ds) {
        assert_ne!(args(c).first(), Some(&"serve"));
    }
    // Same agent image as the base, so one `images:` change covers both.
    assert_eq!(
        container(ds, "remove-nft-rules")["image"],
        container(base().agent(), "agent")["image"]
    );
}

// ---------------------------------------------------------------------------------------
// The binaries agree with the manifests

/// `BINARY [SUBCOMMAND] --help`, parsed.
fn help(binary_name: &str, subcommand: Option<&str>) -> Help {
    let mut command = Command::new(binary(binary_name).unwrap());
    command.args(subcommand).arg("--help");
    let output = run(
        &mut command,
        "build the binaries: cargo build --workspace --bins",
    );
    let help = parse_help(&String::from_utf8_lossy(&output.stdout));
    assert!(help.flags.len() > 3, "{binary_name}: {help:?}");
    help
}

/// A podiam container's binary and subcommand, from its command and args.
fn podiam_command(c: &Value) -> Option<(String, Option<String>)> {
    let program = c["command"][0].as_str()?;
    let name = program.rsplit('/').next()?;
    if !name.starts_with("podiam-") {
        return None;
    }
    let subcommand = (name == "podiam-agent").then(|| args(c)[0].to_string());
    Some((name.to_string(), subcommand))
}

/// The environment a podiam container gets: its env (downward-API values stand in as
/// fixed ones) and the keys of the ConfigMaps it loads.
fn container_env(r: &Rendering, c: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = str_at(from, "/configMapRef/name");
        let map = r
            .all("ConfigMap")
            .into_iter()
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: ConfigMap {name} is not rendered", r.name));
        for (key, value) in map["data"].as_object().unwrap() {
            env.insert(key.clone(), value.as_str().unwrap().to_string());
        }
    }
    for var in c["env"].as_array().into_iter().flatten() {
        let value = match var.get("value") {
            Some(v) => v.as_str().unwrap().to_string(),
            None => match str_at(var, "/valueFrom/fieldRef/fieldPath") {
                "spec.nodeName" => "node-1".to_string(),
                "metadata.name" => "podiam-server-0".to_string(),
                "metadata.namespace" => "podiam".to_string(),
                "status.hostIP" => "10.0.0.10".to_string(),
                "status.hostIPs" => "10.0.0.10,fd00:10::10".to_string(),
                other => panic!("unexpected fieldRef {other}"),
            },
        };
        env.insert(str_at(var, "/name").to_string(), value);
    }
    env
}

#[test]
fn every_flag_and_variable_given_to_a_binary_exists_in_its_help() {
    let mut checked = 0;
    for r in renderings() {
        for workload in r.all("Deployment").into_iter().chain(r.all("DaemonSet")) {
            for c in containers(workload) {
                let Some((program, subcommand)) = podiam_command(c) else {
                    continue;
                };
                let help = help(&program, subcommand.as_deref());
                let where_ = format!("{}: {} {}", r.name, program, c["name"]);
                for arg in args(c).iter().filter(|a| a.starts_with("--")) {
                    let flag = arg.split('=').next().unwrap();
                    assert!(
                        help.flags.contains(flag),
                        "{where_}: {flag} is not in --help"
                    );
                    checked += 1;
                }
                for name in container_env(r, c).keys() {
                    assert!(
                        help.envs.contains(name),
                        "{where_}: environment variable {name} is read by no flag"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} flags and variables checked");
}

/// Runs a binary with a container's args and environment (nothing else inherited) until it
/// exits, for at most 10 s; returns its exit code and stderr.
fn run_like_a_container(program: &str, c: &Value, env: &BTreeMap<String, String>) -> (i32, String) {
    let mut child = Command::new(binary(program).unwrap())
        .args(args(c))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            return (
                status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{program} did not stop at its configuration checks: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_rendered_configurations_pass_the_binaries_own_checks() {
    let r = base();
    // The server: every value parses, and the one complaint is the placeholder account,
    // which must stop it (exit 2, before it touches anything) until an operator sets it.
    let c = container(r.server(), "server");
    let env = container_env(r, c);
    assert!(env["PODIAM_BASE_ROLE_ARN"].contains("ACCOUNT_ID"));
    let (code, stderr) = run_like_a_container("podiam-server", c, &env);
    assert_eq!(code, 2, "{stderr}");
    let complaints: Vec<&str> = stderr.lines().collect();
    assert_eq!(complaints.len(), 1, "{stderr}");
    assert!(complaints[0].contains("--base-role-arn"), "{stderr}");

    // The agent: one deliberate mistake is added so that it stops at its checks (it never
    // reaches its TLS files, sockets or iptables); that must be the only complaint.
    let c = container(r.agent(), "agent");
    let mut with_mistake = c.clone();
    with_mistake["args"]
        .as_array_mut()
        .unwrap()
        .push(json!("--max-connections=0"));
    let env = container_env(r, c);
    let (code, stderr) = run_like_a_container("podiam-agent", &with_mistake, &env);
    assert_eq!(code, 2, "{stderr}");
    let complaints: Vec<&str> = stderr.lines().collect();
    assert_eq!(complaints.len(), 1, "{stderr}");
    assert!(complaints[0].contains("--max-connections"), "{stderr}");
}

#[test]
fn the_mounted_secrets_are_the_ones_podiam_certs_writes() {
    let out = scratch_dir("deploy-certs").unwrap();
    let secrets = out.join("secrets.yaml");
    run(
        Command::new(binary("podiam-certs").unwrap())
            .arg("--out")
            .arg(out.join("pem"))
            .arg("--secrets")
            .arg(&secrets),
        "",
    );
    let written = yaml_to_json(&secrets);
    let names: BTreeSet<&str> = written
        .iter()
        .map(|s| str_at(s, "/metadata/name"))
        .collect();
    assert_eq!(names, BTreeSet::from([SERVER_SECRET, AGENT_SECRET]));
    for secret in &written {
        assert_eq!(secret["metadata"]["namespace"], NAMESPACE);
        assert_eq!(secret["type"], "kubernetes.io/tls");
        let keys: BTreeSet<&str> = secret["data"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // The files the TLS flags name (checked per workload in assert_tls_mount).
        assert_eq!(keys, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"]));
    }
    // The base mounts exactly these.
    let mut mounted = BTreeSet::new();
    for workload in [base().server(), base().agent()] {
        for v in pod_spec(workload)["volumes"].as_array().unwrap() {
            if let Some(name) = v["secret"]["secretName"].as_str() {
                mounted.insert(name);
            }
        }
    }
    assert_eq!(mounted, names);
}

/// `registry.example.com/podiam/podiam-agent:0.1.0` → `agent`: images are named after the
/// Dockerfile target they are built from.
fn image_target(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap().split(':').next().unwrap();
    name.strip_prefix("podiam-").unwrap()
}

#[test]
fn the_dockerfile_puts_each_binary_where_the_manifests_run_it() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let stages = podiam_tests::dockerfile::stages();
    for target in ["server", "agent", "certs"] {
        assert!(
            stages.contains_key(target),
            "no target {target}: {stages:?}"
        );
    }
    for r in renderings() {
        for workload in r.all("Deployment").into_iter().chain(r.all("DaemonSet")) {
            for c in containers(workload) {
                let program = c["command"][0].as_str().unwrap();
                if podiam_command(c).is_none() {
                    continue;
                }
                let target = image_target(c["image"].as_str().unwrap());
                assert!(
                    stages[target].copied.iter().any(|d| d == program),
                    "{}: {program} is not copied into the {target} image",
                    r.name
                );
            }
        }
    }
    // The agent's image carries the tools it runs.
    assert!(dockerfile.contains("iptables conntrack"));
}

#[test]
fn pod_identity_component_serves_the_webhook_and_takes_the_ca_patch() {
    require_tools();
    let deploy = repo_root().join("deploy");
    let out = scratch_dir("deploy-pod-identity").unwrap();
    // As docs/pod-identity.md says: certificates and the CA patch from podiam-certs, the
    // component, and the patch in the user's own kustomization.
    let patch = out.join("webhook-ca.yaml");
    let certs = out.join("certs");
    let made = Command::new(binary("podiam-certs").unwrap())
        .arg("--out")
        .arg(&certs)
        .arg("--webhook-ca-patch")
        .arg(&patch)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n\
         components:\n  - {}\npatches:\n  - path: webhook-ca.yaml\n",
        relative(&out, &deploy.join("base")).display(),
        relative(&out, &deploy.join("components/pod-identity")).display(),
    );
    std::fs::write(out.join("kustomization.yaml"), kustomization).unwrap();
    let r = render(&out, "pod-identity", &out);
    let problems = schema_problems(&[r.file.as_path()], r.objects.len());
    assert!(problems.is_empty(), "{problems:#?}");

    let server = container(r.server(), "server");
    assert_eq!(flag_value(server, "--webhook-listen"), Some("0.0.0.0:9443"));
    let service = r.get("Service", "podiam-webhook");
    assert!(
        service["spec"]["clusterIP"].is_null(),
        "a ClusterIP Service: {service}"
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhook");
    let pod_labels = &r.server()["spec"]["template"]["metadata"]["labels"];
    let selector = service["spec"]["selector"].as_object().unwrap();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels[k] == *v),
        "the Service selects the server pods: {selector:?}"
    );
    assert!(
        server["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "webhook" && p["containerPort"] == 9443)
    );

    let configuration = r.get("MutatingWebhookConfiguration", "podiam");
    let webhook = &configuration["webhooks"][0];
    assert_eq!(webhook["name"], "pods.podiam.io");
    assert_eq!(webhook["failurePolicy"], "Ignore");
    assert_eq!(webhook["sideEffects"], "None");
    // Namespaces labelled `enabled`, or `required` (their roles then with the token only).
    assert_eq!(
        webhook["namespaceSelector"],
        serde_json::json!({"matchExpressions": [{
            "key": "podiam.io/pod-identity",
            "operator": "In",
            "values": ["enabled", "required"],
        }]})
    );
    assert_eq!(webhook["clientConfig"]["service"]["name"], "podiam-webhook");
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/mutate-pods");
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(str_at(webhook, "/clientConfig/caBundle"))
        .unwrap();
    let ca = std::fs::read(certs.join(podiam_certs::CA_CERT_FILE)).unwrap();
    assert_eq!(bundle, ca, "the caBundle is podiam's CA");
}

// ---------------------------------------------------------------------------------------
// The kustomizations the docs tell people to write

/// The docs that show an operator's own kustomization.
const DOCUMENTED: [&str; 2] = ["docs/install.md", "deploy/README.md"];

/// Every fenced YAML block of `markdown` that is a Kustomization, in order.
fn documented_kustomizations(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                if block.contains("kind: Kustomization") {
                    blocks.push(std::mem::take(block));
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Renders `kustomization` from a directory beside `podiam` (a checkout of the repository,
/// reached as `../podiam` the way the docs lay it out).
fn render_beside(podiam: &Path, kustomization: &str, name: &str) -> (Rendering, Value) {
    let dir = scratch_dir("deploy-documented").unwrap();
    std::os::unix::fs::symlink(podiam, dir.join("podiam")).unwrap();
    let mine = dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    let file = mine.join("kustomization.yaml");
    std::fs::write(&file, kustomization).unwrap();
    let parsed = yaml_to_json(&file).remove(0);
    (render(&mine, name, &dir), parsed)
}

/// Images of the rendering's containers that its kustomization's `images:` did not ask for
/// (`newName:newTag`), or every image when it asks for none.
fn images_not_asked_for(r: &Rendering, kustomization: &Value) -> Vec<String> {
    let asked: BTreeSet<String> = kustomization["images"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|i| format!("{}:{}", str_at(i, "/newName"), str_at(i, "/newTag")))
        .collect();
    let mut unexpected = Vec::new();
    for workload in r.all("Deployment").into_iter().chain(r.all("DaemonSet")) {
        let spec = pod_spec(workload);
        for c in spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten()
        {
            let image = str_at(c, "/image").to_string();
            if !asked.contains(&image) {
                unexpected.push(format!("{} {}: {image}", r.name, str_at(c, "/name")));
            }
        }
    }
    unexpected
}

/// The blocks of every documented kustomization, with where they come from.
fn every_documented_kustomization() -> Vec<(String, String)> {
    let mut all = Vec::new();
    for doc in DOCUMENTED {
        let text = std::fs::read_to_string(repo_root().join(doc)).unwrap();
        for (i, block) in documented_kustomizations(&text).into_iter().enumerate() {
            all.push((format!("{doc} #{}", i + 1), block));
        }
    }
    all
}

#[test]
fn the_documented_kustomizations_deploy_the_users_images() {
    require_tools();
    let documented = every_documented_kustomization();
    // install.md: the installation and the uninstall; deploy/README.md: the installation.
    assert_eq!(documented.len(), 3, "{documented:#?}");
    for (name, block) in &documented {
        let (r, kustomization) = render_beside(&repo_root(), block, name);
        assert!(
            !r.all("DaemonSet").is_empty(),
            "{name} renders no DaemonSet"
        );
        assert_eq!(
            images_not_asked_for(&r, &kustomization),
            Vec::<String>::new()
        );
    }
}

#[test]
fn a_base_that_renames_its_images_itself_fails_the_documented_kustomizations() {
    require_tools();
    // The base as it was: its own `images:` rename the bare names, so that an operator's
    // entries for `podiam-server` and `podiam-agent` match nothing and the placeholders stay.
    let old = scratch_dir("deploy-old-spelling").unwrap();
    let podiam = old.join("podiam");
    std::fs::create_dir(&podiam).unwrap();
    run(
        Command::new("cp")
            .arg("-r")
            .arg(repo_root().join("deploy"))
            .arg(&podiam),
        "cp",
    );
    let renamed = |image: &str| {
        format!(
            "  - name: {image}\n    newName: registry.example.com/podiam/{image}\n    newTag: \"0.1.0\"\n"
        )
    };
    for (dir, images) in [
        ("base", vec!["podiam-server", "podiam-agent"]),
        ("uninstall", vec!["podiam-agent"]),
    ] {
        let file = podiam.join("deploy").join(dir).join("kustomization.yaml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("images:\n");
        for image in images {
            text.push_str(&renamed(image));
        }
        std::fs::write(&file, text).unwrap();
    }
    for (name, block) in every_documented_kustomization() {
        let (r, kustomization) = render_beside(&podiam, &block, &format!("old {name}"));
        let unexpected = images_not_asked_for(&r, &kustomization);
        assert!(
            !unexpected.is_empty()
                && unexpected
                    .iter()
                    .all(|u| u.contains("registry.example.com")),
            "{name}: {unexpected:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Monitoring (components/monitoring)

/// The structural check of the Prometheus Operator's objects: apiVersion, kinds, and the
/// fields podiam uses (each known to the operator's v1 CRDs).
fn monitoring_problems(r: &Rendering) -> Vec<String> {
    const RELABEL: &[&str] = &[
        "action",
        "sourceLabels",
        "separator",
        "targetLabel",
        "regex",
        "modulus",
        "replacement",
    ];
    const ENDPOINT: &[&str] = &[
        "port",
        "path",
        "scheme",
        "interval",
        "scrapeTimeout",
        "relabelings",
        "metricRelabelings",
    ];
    const RULE: &[&str] = &["alert", "expr", "for", "labels", "annotations"];
    let mut problems = Vec::new();
    for object in r.objects.iter().filter(|o| is_monitoring(o)) {
        let kind = str_at(object, "/kind");
        let what = format!("{kind} {}", str_at(object, "/metadata/name"));
        if object["apiVersion"] != "monitoring.coreos.com/v1" {
            problems.push(format!("{what}: apiVersion {}", object["apiVersion"]));
        }
        unknown_fields(
            object,
            &["apiVersion", "kind", "metadata", "spec"],
            &what,
            &mut problems,
        );
        let spec = &object["spec"];
        match kind {
            "PodMonitor" | "ServiceMonitor" => {
                let list = if kind == "PodMonitor" {
                    "podMetricsEndpoints"
                } else {
                    "endpoints"
                };
                unknown_fields(
                    spec,
                    &["namespaceSelector", "selector", list],
                    &what,
                    &mut problems,
                );
                for endpoint in spec[list].as_array().into_iter().flatten() {
                    unknown_fields(endpoint, ENDPOINT, &what, &mut problems);
                    for relabel in endpoint["relabelings"].as_array().into_iter().flatten() {
                        unknown_fields(relabel, RELABEL, &what, &mut problems);
                    }
                }
            }
            "PrometheusRule" => {
                for group in spec["groups"].as_array().into_iter().flatten() {
                    unknown_fields(group, &["name", "rules", "interval"], &what, &mut problems);
                    for rule in group["rules"].as_array().into_iter().flatten() {
                        unknown_fields(rule, RULE, &what, &mut problems);
                        if rule.get("for").is_some_and(|f| !is_duration(str_at(f, ""))) {
                            problems.push(format!("{what}: for {}", rule["for"]));
                        }
                    }
                }
            }
            _ => problems.push(format!("{what}: a kind podiam does not ship")),
        }
    }
    problems
}

/// Prometheus' relabelling, for the actions the shipped monitors use: the target's labels
/// after `relabelings`, or `None` when it is dropped.
fn relabel(
    mut labels: BTreeMap<String, String>,
    relabelings: &[Value],
) -> Option<BTreeMap<String, String>> {
    for rule in relabelings {
        let sources: Vec<String> = rule["sourceLabels"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| labels.get(s.as_str().unwrap()).cloned().unwrap_or_default())
            .collect();
        let value = sources.join(rule["separator"].as_str().unwrap_or(";"));
        let pattern = rule["regex"].as_str().unwrap_or("(.*)");
        let regex = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        let captures = regex.captures(&value);
        match rule["action"].as_str().unwrap_or("replace") {
            "keep" if captures.is_none() => return None,
            "drop" if captures.is_some() => return None,
            "keep" | "drop" => {}
            "replace" => {
                if let Some(captures) = captures {
                    let mut out = String::new();
                    captures.expand(rule["replacement"].as_str().unwrap_or("$1"), &mut out);
                    labels.insert(str_at(rule, "/targetLabel").to_string(), out);
                }
            }
            other => panic!("relabel action {other} is not modelled"),
        }
    }
    Some(labels)
}

/// `# alert: NAME, for 5m[: description]` blocks of the PromQL in docs/metrics.md:
/// (name, `for`, expression with its lines joined).
fn documented_alerts() -> Vec<(String, Option<String>, String)> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let mut alerts = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(head) = line.strip_prefix("# alert: ") else {
            continue;
        };
        let head = head.split(": ").next().unwrap();
        let (name, wait) = match head.split_once(", for ") {
            Some((name, wait)) => (name, (wait != "0m").then(|| wait.to_string())),
            None => (head, None),
        };
        let mut expr = Vec::new();
        while let Some(next) = lines.peek() {
            if next.starts_with('#') || next.starts_with("```") || next.is_empty() {
                break;
            }
            expr.push(next.trim());
            lines.next();
        }
        alerts.push((name.to_string(), wait, expr.join(" ")));
    }
    alerts
}

#[test]
fn monitoring_scrapes_every_agent_and_server_and_ships_the_documented_alerts() {
    let r = rendering("all-components");
    // The agents: the PodMonitor selects their pods in their namespace...
    let agent = r.agent();
    let monitor = r.get("PodMonitor", "podiam-agent");
    let template = &agent["spec"]["template"]["metadata"];
    assert!(labels_match(
        &monitor["spec"]["selector"],
        &template["labels"]
    ));
    assert!(
        string_set(&monitor["spec"]["namespaceSelector"]["matchNames"])
            .contains(str_at(agent, "/metadata/namespace"))
    );
    // ...and, as Prometheus discovers a pod without declared ports (one target per
    // container, addressed by the pod's IP alone), its relabelling keeps the agent container
    // and addresses it at the agent's health port, IPv4 and IPv6.
    assert!(
        containers(agent).iter().all(|c| c.get("ports").is_none()),
        "the agent declares no port, so the monitor must not select by one"
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    for field in ["port", "targetPort", "portNumber"] {
        assert!(
            endpoint.get(field).is_none(),
            "{field} would select no agent target"
        );
    }
    let health = port_of(flag_value(container(agent, "agent"), "--health-listen").unwrap());
    assert_eq!(endpoint["path"], "/metrics");
    for (pod_ip, address) in [
        ("10.0.3.7", format!("10.0.3.7:{health}")),
        ("fd00:1::7", format!("[fd00:1::7]:{health}")),
    ] {
        let mut scraped = Vec::new();
        for c in containers(agent) {
            let labels: BTreeMap<String, String> = [
                ("__address__", pod_ip),
                ("__meta_kubernetes_pod_ip", pod_ip),
                ("__meta_kubernetes_pod_container_name", str_at(c, "/name")),
                ("__meta_kubernetes_pod_container_init", "false"),
                ("__meta_kubernetes_pod_node_name", "node-a"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let relabelings = endpoint["relabelings"].as_array().unwrap();
            scraped.extend(relabel(labels, relabelings));
        }
        assert_eq!(scraped.len(), 1, "{scraped:?}");
        assert_eq!(scraped[0]["__address__"], address);
        assert_eq!(scraped[0]["node"], "node-a");
    }
    // A pod monitor by port, as docs/metrics.md once advised, keeps nothing.
    let by_port = [
        json!({"action": "keep", "sourceLabels": ["__meta_kubernetes_pod_container_port_number"], "regex": health.to_string()}),
    ];
    let labels = BTreeMap::from([("__address__".to_string(), "10.0.3.7".to_string())]);
    assert_eq!(relabel(labels, &by_port), None);

    // The servers: ServiceMonitor → Service → the server pods' health port.
    let server = r.server();
    let service = r.get("Service", "podiam-server-metrics");
    let monitor = r.get("ServiceMonitor", "podiam-server");
    assert!(labels_match(
        &monitor["spec"]["selector"],
        &service["metadata"]["labels"]
    ));
    let service_selector = json!({ "matchLabels": service["spec"]["selector"] });
    assert!(labels_match(
        &service_selector,
        &server["spec"]["template"]["metadata"]["labels"]
    ));
    assert!(
        string_set(&monitor["spec"]["namespaceSelector"]["matchNames"])
            .contains(str_at(service, "/metadata/namespace"))
    );
    let port_name = str_at(&monitor["spec"]["endpoints"][0], "/port");
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port_name)
        .expect("the endpoint's port is the Service's");
    let target = str_at(service_port, "/targetPort");
    let server_container = container(server, "server");
    let declared = server_container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == target)
        .expect("the Service's targetPort is a declared port");
    let health = port_of(flag_value(server_container, "--health-listen").unwrap());
    assert_eq!(declared["containerPort"].as_u64(), Some(health));

    // The alerts are docs/metrics.md's, word for word.
    let rules = r.get("PrometheusRule", "podiam");
    let shipped: Vec<(String, Option<String>, String)> = rules["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            let expr: Vec<&str> = str_at(rule, "/expr").lines().map(str::trim).collect();
            (
                str_at(rule, "/alert").to_string(),
                rule.get("for").map(|f| str_at(f, "").to_string()),
                expr.join(" "),
            )
        })
        .collect();
    let documented = documented_alerts();
    assert!(documented.len() >= 15, "{documented:?}");
    assert_eq!(shipped, documented);
    for rule in rules["spec"]["groups"][0]["rules"].as_array().unwrap() {
        assert!(
            rule["labels"]["severity"].is_string() && rule["annotations"]["summary"].is_string()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The policy scan

/// checkov's findings over `files`, as (check, KIND/NAME) pairs.
fn policy_findings(files: &[&Path]) -> BTreeSet<(String, String)> {
    let dir = scratch_dir("deploy-scan").unwrap();
    for (i, file) in files.iter().enumerate() {
        std::fs::copy(file, dir.join(format!("{i}.yaml"))).unwrap();
    }
    let output = Command::new("checkov")
        .args(["--framework", "kubernetes", "--skip-download", "--quiet", "--compact"])
        .args(["--output", "json", "--directory"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("checkov: {e}; scripts/setup installs it into .venv-scan, which scripts/test puts on PATH")
        });
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov's report: {e}\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let reports = match report {
        Value::Array(reports) => reports,
        one => vec![one],
    };
    let mut findings = BTreeSet::new();
    for report in &reports {
        for failed in report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            // KIND.NAMESPACE.NAME, KIND.NAME (cluster-scoped), or for pods checked through
            // their workload, Pod.NAMESPACE.NAME.LABELS...
            let resource = str_at(failed, "/resource");
            let parts: Vec<&str> = resource.split('.').collect();
            let name = if parts.len() >= 3 { parts[2] } else { parts[1] };
            findings.insert((
                str_at(failed, "/check_id").to_string(),
                format!("{}/{name}", parts[0]),
            ));
        }
    }
    findings
}

/// deploy/policy-waivers.yaml: (check, KIND/NAME) pairs, each entry with a reason.
fn policy_waivers() -> BTreeSet<(String, String)> {
    let entries = yaml_to_json(&repo_root().join("deploy/policy-waivers.yaml"));
    let entries = entries[0].as_array().expect("a list of waivers");
    let mut waived = BTreeSet::new();
    for entry in entries {
        let check = str_at(entry, "/check");
        assert!(
            str_at(entry, "/reason").len() > 20,
            "{check}: every waiver says why"
        );
        for resource in entry["resources"].as_array().unwrap() {
            waived.insert((check.to_string(), resource.as_str().unwrap().to_string()));
        }
    }
    waived
}

#[test]
fn the_policy_scan_finds_nothing_but_the_waived_and_catches_a_weakened_manifest() {
    let files: Vec<&Path> = renderings().iter().map(|r| r.file.as_path()).collect();
    let waived = policy_waivers();
    let found = policy_findings(&files);
    let unwaived: Vec<_> = found.difference(&waived).collect();
    let stale: Vec<_> = waived.difference(&found).collect();
    assert!(
        unwaived.is_empty() && stale.is_empty(),
        "findings without a waiver in deploy/policy-waivers.yaml: {unwaived:#?}\nwaivers no finding needs: {stale:#?}"
    );
    // The same scan over the base with the server allowed to escalate privileges, its root
    // filesystem writable, and the agent given every capability: each is found.
    let text = std::fs::read_to_string(&base().file).unwrap();
    let weakened = text
        .replacen(
            "allowPrivilegeEscalation: false",
            "allowPrivilegeEscalation: true",
            1,
        )
        .replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
        )
        .replace(
            "add: [\"NET_ADMIN\", \"NET_BIND_SERVICE\"]",
            "add: [\"ALL\"]",
        );
    assert_ne!(weakened, text);
    let dir = scratch_dir("deploy-weakened").unwrap();
    let file = dir.join("weakened.yaml");
    std::fs::write(&file, weakened).unwrap();
    let found = policy_findings(&[&file]);
    let unwaived: BTreeSet<&str> = found
        .difference(&waived)
        .map(|(check, _)| check.as_str())
        .collect();
    for check in ["CKV_K8S_20", "CKV_K8S_22"] {
        assert!(unwaived.contains(check), "{check} not found: {unwaived:?}");
    }
}
