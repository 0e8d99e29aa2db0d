//! The repository's Dockerfile as the tests read it: what each target stage sets (user,
//! entrypoint, ports, the files it copies from the build stage, the packages it installs).
//! `tests/tests/deploy.rs` checks the manifests against it, `tests/tests/images.rs` the
//! images scripts/images builds.

use std::collections::BTreeMap;

use crate::process::repo_root;

/// What a Dockerfile stage says: its user, entrypoint, exposed ports and copied paths.
#[derive(Debug, Default)]
pub struct Stage {
    /// `USER`, if the stage sets one.
    pub user: Option<String>,
    /// `ENTRYPOINT`, as its JSON array.
    pub entrypoint: Vec<String>,
    /// `EXPOSE`d ports, as `PORT/tcp`.
    pub ports: Vec<String>,
    /// Where `COPY --from=...` puts files.
    pub copied: Vec<String>,
    /// The packages `apt-get install` installs.
    pub apt: Vec<String>,
}

/// The repository's Dockerfile, stage by stage (continued lines joined, comments skipped).
pub fn stages() -> BTreeMap<String, Stage> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("the Dockerfile");
    let mut stages = BTreeMap::new();
    let mut current = String::new();
    let mut continued = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            continued.push_str(head);
            continued.push(' ');
            continue;
        }
        let line = format!("{continued}{line}");
        continued.clear();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", .., "AS", name] => {
                current = name.to_string();
                stages.insert(current.clone(), Stage::default());
            }
            ["USER", user] => {
                stages.get_mut(&current).expect("stage").user = Some(user.to_string())
            }
            ["ENTRYPOINT", ..] => {
                let json = line.trim_start_matches("ENTRYPOINT").trim();
                stages.get_mut(&current).expect("stage").entrypoint =
                    serde_json::from_str(json).expect("ENTRYPOINT as JSON");
            }
            ["EXPOSE", ports @ ..] => stages
                .get_mut(&current)
                .expect("stage")
                .ports
                .extend(ports.iter().map(|p| format!("{p}/tcp"))),
            ["COPY", from, .., destination] if from.starts_with("--from=") => stages
                .get_mut(&current)
                .expect("stage")
                .copied
                .push(destination.to_string()),
            ["RUN", ..] if line.contains("apt-get install") => {
                let after = line.split("--no-install-recommends").nth(1).unwrap_or("");
                let packages = after.split("&&").next().unwrap_or("");
                stages
                    .get_mut(&current)
                    .expect("stage")
                    .apt
                    .extend(packages.split_whitespace().map(str::to_string));
            }
            _ => {}
        }
    }
    stages
}
