//! The container-credentials endpoint's set-up as a cluster has it: the servers' admission
//! webhook configured from deploy/components/pod-identity with the CA patch
//! `podiam-certs --webhook-ca-patch` writes (rendered by the real `kubectl kustomize`,
//! applied by the real `kubectl`), namespaces opted in with `kubectl label`, pods created
//! through the API so that the emulator calls the webhook; and the kubelet's part for a
//! pod: the token of the projected volume the webhook added, at the path it mounted,
//! in a private mount namespace of each client process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::{World, WorldConfig, create_pod};
use crate::kube_emulator::Kind;
use crate::process::repo_root;

/// What a pod's container got from the webhook, read back from the stored pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSetup {
    /// The container's `AWS_CONTAINER_*` variables, as stored.
    pub env: Vec<(String, String)>,
    /// The token volume's mount path in the container.
    pub mount_path: String,
    /// Where the harness, as the kubelet, keeps that volume's files.
    pub volume_dir: PathBuf,
}

impl World {
    /// Sends the API server's calls to the webhook Service to the server at `addr`.
    pub(super) fn route_webhook(&self, addr: std::net::SocketAddr) {
        self.emulator
            .route_service("podiam", "podiam-webhook", 443, addr);
    }

    /// Configures the webhook as an operator would, opts every namespace of `config` in,
    /// and creates the registered pods (through the API: the webhook sees them).
    pub(super) async fn configure_pod_identity(&self, config: &WorldConfig) -> anyhow::Result<()> {
        let webhook = self
            .servers
            .iter()
            .find_map(|replica| replica.webhook)
            .context("no server replica serves the webhook")?;
        self.route_webhook(webhook);
        let configuration = self.render_webhook_configuration().await?;
        self.kubectl_ok(&["apply", "-f", configuration.to_str().context("path")?])
            .await?;
        for namespace in &config.namespaces {
            self.kubectl_ok(&[
                "label",
                "namespace",
                &namespace.name,
                "podiam.io/pod-identity=enabled",
            ])
            .await?;
        }
        let registered: Vec<_> = config.pods.iter().filter(|spec| spec.registered).collect();
        for spec in &registered {
            create_pod(&self.client, spec, &self.pod(&spec.name).addresses()).await?;
        }
        // Created after the servers synced, unlike the other worlds' pods: a world is handed
        // over once every replica has them, as it is in those.
        let replicas: Vec<usize> = (0..self.servers.len()).collect();
        for spec in registered {
            self.wait_pod_seen(&spec.name, &replicas).await?;
        }
        Ok(())
    }

    /// The MutatingWebhookConfiguration of deploy/components/pod-identity with this world's
    /// CA patched in, as `kubectl kustomize` renders it; written to a file.
    async fn render_webhook_configuration(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("pod-identity-kustomization");
        std::fs::create_dir_all(&dir)?;
        let ca = std::fs::read_to_string(&self.certs.ca_cert)?;
        std::fs::write(dir.join("ca.yaml"), podiam_certs::webhook_ca_patch(&ca))?;
        let component = repo_root().join("deploy/components/pod-identity");
        let up = dir.components().count() - 1;
        let relative = format!(
            "{}{}",
            "../".repeat(up),
            component.strip_prefix("/").unwrap_or(&component).display()
        );
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 components:\n  - {relative}\npatches:\n  - path: ca.yaml\n"
            ),
        )?;
        let rendered = self
            .kubectl_ok(&["kustomize", dir.to_str().context("path")?])
            .await?;
        let document = rendered
            .split("\n---\n")
            .find(|doc| doc.contains("kind: MutatingWebhookConfiguration"))
            .context("the component renders no MutatingWebhookConfiguration")?;
        let path = dir.join("webhook.yaml");
        std::fs::write(&path, document)?;
        Ok(path)
    }

    /// What `pod`'s first container got from the webhook, with its token written as the
    /// kubelet writes a projected volume's: for the volume's audience and expiry, bound to
    /// the pod. Fails when the stored pod was not set up.
    pub fn container_setup(&self, pod: &str) -> anyhow::Result<ContainerSetup> {
        let spec = &self.pod(pod).spec;
        let stored = self
            .emulator
            .get(Kind::Pod, Some(&spec.namespace), &spec.name)?;
        let container = &stored["spec"]["containers"][0];
        let env: Vec<(String, String)> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|var| Some((var["name"].as_str()?, var["value"].as_str()?)))
            .filter(|(name, _)| name.starts_with("AWS_CONTAINER_"))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        if env.len() != 2 {
            bail!(
                "pod {pod} was not set up by the webhook: {container}; the API's webhook calls: {:?}",
                self.emulator.webhook_calls()
            );
        }
        let (volume, mount_path) = token_mount(&stored, container)
            .with_context(|| format!("pod {pod} has no projected token mounted"))?;
        let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
        let audience = source["audience"].as_str().context("an audience")?;
        let life = source["expirationSeconds"].as_u64().unwrap_or(3600);
        let file = source["path"].as_str().context("a path")?;
        let token = self.mint_pod_token(
            &spec.namespace,
            &spec.name,
            audience,
            Duration::from_secs(life),
        )?;
        let volume_dir = self.dir.join("pods").join(&spec.name).join("token-volume");
        std::fs::create_dir_all(&volume_dir)?;
        let tmp = volume_dir.join(".tmp");
        std::fs::write(&tmp, token)?;
        std::fs::rename(&tmp, volume_dir.join(file))?;
        Ok(ContainerSetup {
            env,
            mount_path,
            volume_dir,
        })
    }

    /// A command run in `pod`'s namespace as its container runs: the webhook's variables
    /// set, its token volume mounted where the webhook said, in a mount namespace of its
    /// own (nothing of it is seen outside the process).
    pub fn container_command(
        &self,
        pod: &str,
        program: &str,
    ) -> anyhow::Result<tokio::process::Command> {
        let setup = self.container_setup(pod)?;
        if setup.volume_dir.starts_with("/run") || setup.volume_dir.starts_with("/var/run") {
            bail!("the run directory must not be below /run (TMPDIR)");
        }
        // A tmpfs over /run (/var/run's target) in the private mount namespace holds the
        // mount point; the host's /run is untouched.
        const MOUNT: &str = r#"set -e
mount -t tmpfs podiam-pod /run
mkdir -p "$2"
mount --bind "$1" "$2"
shift 2
exec "$@""#;
        let mut command = self.pod_command(pod, "unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                MOUNT,
                "sh",
            ])
            .arg(&setup.volume_dir)
            .arg(run_path(&setup.mount_path)?)
            .arg(program)
            .envs(setup.env);
        Ok(command)
    }
}

/// The projected volume mounted in `container` that carries a ServiceAccount token, and
/// where it is mounted.
fn token_mount<'p>(pod: &'p Value, container: &Value) -> Option<(&'p Value, String)> {
    let volumes = pod["spec"]["volumes"].as_array()?;
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find_map(|mount| {
            let volume = volumes.iter().find(|v| {
                v["name"] == mount["name"]
                    && v["projected"]["sources"][0]["serviceAccountToken"].is_object()
            })?;
            Some((volume, mount["mountPath"].as_str()?.to_string()))
        })
}

/// `path` below /run, which the mount namespace covers with a tmpfs: /var/run/… is
/// /run/… on every current distribution.
fn run_path(path: &str) -> anyhow::Result<String> {
    let below = path
        .strip_prefix("/var/run/")
        .or_else(|| path.strip_prefix("/run/"))
        .with_context(|| format!("the token is mounted at {path}, outside /run"))?;
    Ok(format!("/run/{below}"))
}
