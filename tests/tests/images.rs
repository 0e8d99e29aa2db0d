//! podiam's images, built by `scripts/images` (buildah, bases from Debian packages; here
//! with the debug binaries the suite has built) and run with podman (runc):
//!
//! - the images and the Dockerfile's targets agree: entrypoints, users, ports, the binaries'
//!   paths, the agent's tools; each image has an SBOM;
//! - the Dockerfile's build context, as its `.dockerignore` leaves it, holds the whole
//!   workspace: `cargo metadata --locked` passes on exactly those files;
//! - the certs image writes into a mounted directory as 65532;
//! - the agent image, in a test node's network namespace, as root with NET_ADMIN (and
//!   NET_RAW for the legacy back end) and a read-only root, installs its rules with the
//!   image's own iptables, nft and legacy, serves a pod end to end, and `uninstall` from the
//!   same image removes the rules;
//! - the server image, as 65532 with a read-only root, answers an agent.
//!
//! Needs root (buildah's storage, network namespaces) and buildah, podman and runc
//! (scripts/setup installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use podiam_proto::v1::GetPodRoleRequest;
use podiam_tests::fixtures::{CREDS_PATH, repo_root};
use podiam_tests::moto::Moto;
use podiam_tests::netns;
use podiam_tests::process::{ChildGuard, listen_addresses, scratch_dir, wait_until};
use podiam_tests::world::{World, WorldConfig, agent_material, health_synced};
use serde_json::Value;

/// The tag the test builds its images with.
const TAG: &str = "test";

fn image(name: &str) -> String {
    format!("localhost/podiam-{name}:{TAG}")
}

fn containers_conf() -> PathBuf {
    repo_root().join("scripts/containers.conf")
}

fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (scripts/setup installs buildah and podman)"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn podman(args: &[&str]) -> Output {
    run(Command::new("podman")
        .env("CONTAINERS_CONF", containers_conf())
        .args(args))
}

/// The three images, built once per test process; returns the directory of their SBOMs.
fn built() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        netns::require_root();
        let out = scratch_dir("images").expect("dir");
        run(Command::new("bash")
            .arg(repo_root().join("scripts/images"))
            .args(["--debug", "--no-build", "--tag", TAG, "--out"])
            .arg(&out));
        out
    })
}

/// `podman image inspect` of an image: its config.
fn config(name: &str) -> Value {
    let output = podman(&["image", "inspect", &image(name)]);
    let inspected: Value = serde_json::from_slice(&output.stdout).expect("json");
    inspected[0]["Config"].clone()
}

/// The image's root filesystem, mounted read-only for looking at; unmounted on drop.
struct Mounted {
    name: String,
    root: PathBuf,
}

impl Mounted {
    fn new(name: &str) -> Mounted {
        let output = podman(&["image", "mount", &image(name)]);
        let root = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Mounted {
            name: image(name),
            root: PathBuf::from(root),
        }
    }

    fn has(&self, path: &str) -> bool {
        self.root.join(path.trim_start_matches('/')).exists()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .env("CONTAINERS_CONF", containers_conf())
            .args(["image", "unmount", &self.name])
            .output();
    }
}

#[test]
fn the_images_are_laid_out_as_the_dockerfile_targets() {
    let out = built();
    let stages = podiam_tests::dockerfile::stages();
    for name in ["server", "certs", "agent"] {
        let stage = &stages[name];
        let config = config(name);
        // The user: the Dockerfile's, or root where it names none.
        let user = config["User"].as_str().unwrap_or_default();
        match &stage.user {
            Some(wanted) => assert_eq!(user, wanted, "{name}"),
            None => assert!(["", "0", "0:0", "root"].contains(&user), "{name}: {user}"),
        }
        let entrypoint: Vec<String> =
            serde_json::from_value(config["Entrypoint"].clone()).expect("entrypoint");
        assert_eq!(entrypoint, stage.entrypoint, "{name}");
        let mut ports: Vec<String> = config["ExposedPorts"]
            .as_object()
            .map(|p| {
                p.keys()
                    .map(|k| format!("{}/tcp", k.trim_end_matches("/tcp")))
                    .collect()
            })
            .unwrap_or_default();
        ports.sort();
        let mut wanted = stage.ports.clone();
        wanted.sort();
        assert_eq!(ports, wanted, "{name}");
        let root = Mounted::new(name);
        for path in &stage.copied {
            assert!(root.has(path), "{name}: no {path}");
        }
        assert!(root.has("/etc/ssl/certs/ca-certificates.crt"), "{name}");
        assert!(root.has("/etc/os-release"), "{name}");
        let passwd = std::fs::read_to_string(root.root.join("etc/passwd")).expect("passwd");
        assert!(passwd.contains(":65532:65532:"), "{name}: {passwd}");
        // Each image's SBOM lists its Debian packages and crates with versions.
        let sbom: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("podiam-{name}.sbom.json"))).expect("sbom"),
        )
        .expect("sbom json");
        let packages: Vec<&str> = sbom["debian_packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        assert!(packages.contains(&"libc6"), "{name}: {packages:?}");
        for package in &stage.apt {
            assert!(packages.contains(&package.as_str()), "{name}: {package}");
        }
        let crates = sbom["crates"].as_array().expect("crates");
        assert!(
            crates
                .iter()
                .any(|c| c["name"] == format!("podiam-{name}") && c["version"] == "0.1.0"),
            "{name}"
        );
    }
    let agent = Mounted::new("agent");
    for tool in [
        "/usr/sbin/iptables",
        "/usr/sbin/iptables-legacy",
        "/usr/sbin/ip6tables",
        "/usr/sbin/ip6tables-legacy",
        "/usr/sbin/conntrack",
    ] {
        assert!(agent.has(tool), "agent: no {tool}");
    }
    // deploy/uninstall runs `sleep` by its name (PATH).
    assert!(agent.has("/bin/sleep") || agent.has("/usr/bin/sleep"));
    // The Dockerfile installs exactly the agent tools the image carries.
    assert_eq!(stages["agent"].apt, ["iptables", "conntrack"]);
}

#[test]
fn the_dockerfile_build_context_holds_the_whole_workspace() {
    netns::require_root();
    // What a `docker build .` sends: the repository as its .dockerignore leaves it, copied
    // by buildah (which reads the same file) into an image, then read back.
    let dir = scratch_dir("context").expect("dir");
    let containerfile = dir.join("Containerfile");
    std::fs::write(&containerfile, "FROM scratch\nCOPY . /src\n").expect("write");
    let name = format!("localhost/podiam-context:{TAG}");
    run(Command::new("buildah")
        .args(["bud", "--quiet", "--layers=false", "-t", &name, "-f"])
        .arg(&containerfile)
        .arg(repo_root()));
    let output = podman(&["image", "mount", &name]);
    let root = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let src = root.join("src");
    // This machine's platform only, as the build stage resolves it: crates for other
    // platforms need not have been downloaded.
    let rustc = run(Command::new("rustc").arg("-vV"));
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc names its host");
    let metadata = Command::new("cargo")
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host])
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .stdin(Stdio::null())
        .output()
        .expect("cargo");
    let sent_target = src.join("target").exists() || src.join(".git").exists();
    let _ = podman(&["image", "unmount", &name]);
    let _ = Command::new("podman")
        .env("CONTAINERS_CONF", containers_conf())
        .args(["rmi", "-f", &name])
        .output();
    assert!(
        metadata.status.success(),
        "cargo metadata --locked over the build context: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    assert!(!sent_target, "the context must leave out target/ and .git");
    let metadata: Value = serde_json::from_slice(&metadata.stdout).expect("metadata");
    let members = metadata["workspace_members"].as_array().expect("members");
    assert_eq!(members.len(), 9, "{members:?}");
}

#[test]
fn the_certs_image_writes_into_a_mounted_directory_as_non_root() {
    built();
    let dir = scratch_dir("certs-image").expect("dir");
    nix::unistd::chown(&dir, Some(65532.into()), Some(65532.into())).expect("chown");
    let mount = format!("{}:/certs", dir.display());
    podman(&[
        "run",
        "--rm",
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop=all",
        "-v",
        &mount,
        &image("certs"),
        "--out",
        "/certs",
    ]);
    for file in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        let meta = std::fs::metadata(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65532, "{file}");
    }
}

/// The agent image as the node's agent, with `iptables` (nf_tables) or `iptables-legacy`.
async fn agent_image_serves_a_pod(iptables: &str) {
    built();
    let mut world = World::start(WorldConfig {
        start_agent: true,
        agent_image: Some(image("agent")),
        iptables_bin: Some(iptables.to_string()),
        ..podiam_tests::fixtures::web_with_agent()
    })
    .await
    .expect("world starts with the agent image");
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(rules.contains("-j PODIAM"), "{rules}");
    let reply = world
        .metadata_request("web", "GET", CREDS_PATH, &[])
        .await
        .expect("answers");
    assert_eq!(reply.status, 200, "{}", reply.body);
    world.stop_agent().await.expect("stops");
    // `uninstall` from the same image, as deploy/uninstall runs it.
    let mut caps = "NET_ADMIN".to_string();
    if iptables.contains("legacy") {
        caps.push_str(",NET_RAW");
    }
    podman(&[
        "run",
        "--rm",
        &format!("--network=ns:/run/netns/{}", world.node().name()),
        "--cap-drop=all",
        &format!("--cap-add={caps}"),
        "--read-only",
        "--tmpfs=/run",
        &image("agent"),
        "uninstall",
        &format!("--iptables-bin={iptables}"),
    ]);
    let rules = world.node_nat_rules().await.expect("rules");
    assert!(!rules.contains("PODIAM"), "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_image_serves_a_pod_with_its_own_iptables_nft() {
    agent_image_serves_a_pod("iptables").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_image_serves_a_pod_with_its_own_iptables_legacy() {
    agent_image_serves_a_pod("iptables-legacy").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_image_answers_an_agent_as_non_root_with_a_read_only_root() {
    built();
    let world = World::start(podiam_tests::fixtures::web_with_agent())
        .await
        .expect("world starts");
    // The server's files, readable by 65532 as a Secret's projection makes them.
    let dir = scratch_dir("server-image").expect("dir");
    let certs = world.certs();
    for (from, to) in [
        (&certs.ca_cert, "ca.pem"),
        (&certs.server_cert, "server.pem"),
        (&certs.server_key, "server-key.pem"),
    ] {
        std::fs::copy(from, dir.join(to)).expect("copy");
    }
    std::fs::copy(world.kubeconfig(), dir.join("kubeconfig")).expect("copy");
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let path = entry.expect("entry").path();
        nix::unistd::chown(&path, Some(65532.into()), Some(65532.into())).expect("chown");
    }
    nix::unistd::chown(&dir, Some(65532.into()), Some(65532.into())).expect("chown");
    let d = dir.display();
    let mut command = tokio::process::Command::new("podman");
    command
        .env("CONTAINERS_CONF", containers_conf())
        .args([
            "run",
            "--rm",
            "--network=host",
            "--read-only",
            "--cap-drop=all",
        ])
        .args(["--user=65532:65532", "-v", &format!("{d}:{d}")]);
    for (key, value) in Moto::client_env() {
        command.args(["-e", &format!("{key}={value}")]);
    }
    command
        .arg(image("server"))
        .args(["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"])
        .arg(format!("--listen-address-file={d}/addresses"))
        .arg(format!("--tls-ca={d}/ca.pem"))
        .arg(format!("--tls-cert={d}/server.pem"))
        .arg(format!("--tls-key={d}/server-key.pem"))
        .arg(format!("--kubeconfig={d}/kubeconfig"))
        .args(["--base-role-arn", podiam_tests::world::BASE_ROLE_ARN])
        .args([
            "--sts-endpoint",
            world.sts_endpoint(),
            "--region",
            "us-east-1",
        ]);
    let mut server = ChildGuard::spawn("podiam-server-image", command).expect("podman run");
    let addresses = listen_addresses(&mut server, &dir.join("addresses"), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log_tail(40)));
    let addr = addresses["listen"];
    let material = agent_material(certs).expect("material");
    wait_until(Duration::from_secs(30), "the server image to sync", || {
        let material = material.clone();
        async move { health_synced(addr, &material).await }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log_tail(40)));
    // An agent (the world's certificate and token) asks it about its node's pod.
    let token = std::fs::read_to_string(world.agent_token_file()).expect("token");
    let mut client = world
        .agent_client(addr, Some(&token))
        .await
        .expect("client");
    let answer = client
        .get_pod_role(GetPodRoleRequest {
            ip: world.pod("web").ip().to_string(),
            node_name: podiam_tests::world::NODE_NAME.to_string(),
        })
        .await
        .expect("the image's server answers the agent")
        .into_inner();
    assert_eq!(answer.role_name, "app-reader");
    server
        .terminate(Duration::from_secs(20))
        .await
        .expect("stops on SIGTERM");
}
