//! Fixtures more than one suite uses: the usual namespace and pods, the repository's root,
//! and a role granted or revoked with the real `kubectl`.

use std::path::{Path, PathBuf};

use crate::world::{World, WorldConfig};

/// Where pods list their roles (the IMDS credentials path).
pub const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// team-a permits `app-.*`; pod `web` has `app-reader`, pod `plain` has no role, pod
/// `greedy` asks for `admin` (not permitted). The agent is not started.
pub fn team_a() -> WorldConfig {
    WorldConfig::default()
        .namespace("team-a", Some("app-.*"))
        .pod("team-a", "web", Some("app-reader"))
        .pod("team-a", "plain", None)
        .pod("team-a", "greedy", Some("admin"))
}

/// [`team_a`] with the agent started.
pub fn team_a_with_agent() -> WorldConfig {
    WorldConfig {
        start_agent: true,
        ..team_a()
    }
}

/// `kubectl annotate pod POD -n NAMESPACE iam.amazonaws.com/role=ROLE` (`None`: removes the
/// annotation, a revocation), as a team would.
pub async fn set_pod_role(
    world: &World,
    namespace: &str,
    pod: &str,
    role: Option<&str>,
) -> anyhow::Result<()> {
    let annotation = match role {
        Some(role) => format!("iam.amazonaws.com/role={role}"),
        None => "iam.amazonaws.com/role-".to_string(),
    };
    let mut args = vec!["annotate", "pod", pod, "-n", namespace, annotation.as_str()];
    if role.is_some() {
        args.push("--overwrite");
    }
    world.kubectl_ok(&args).await?;
    Ok(())
}
