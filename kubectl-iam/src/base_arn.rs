//! The servers' base role ARN, for the commands that judge a role without a server.
//!
//! A role annotation that is a name (`app-reader`) or a path (`team/app-reader`) means a role
//! under the servers' `--base-role-arn`, and the namespace's regex is tried against the full
//! ARN as well as the path/name. To judge such a role as the servers would, the plugin needs
//! their base ARN. In order:
//!
//! 1. `--base-role-arn` (or `PODIAM_BASE_ROLE_ARN`) given to the plugin;
//! 2. the server pods' own setting, read from their spec as the server's flag parser would
//!    see it: the `--base-role-arn` argument, else the `PODIAM_BASE_ROLE_ARN` variable
//!    (a value, or a ConfigMap key), else the ConfigMaps of `envFrom` (the last one that has
//!    it wins, as in the kubelet; deploy/ puts it there);
//! 3. unknown: servers that detect it at start (`--base-role-arn-autodetect`), a Secret, a
//!    ConfigMap the user may not read. Callers then place names under
//!    [`PLACEHOLDER_BASE_ARN`] and say so.
//!
//! [`setting`] is the pure part (a pod's spec in, where the value lives out).

use k8s_openapi::api::core::v1::{Container, Pod};
use podiam_policy::policy::valid_base_arn;

use crate::SERVER_LABEL;
use crate::cluster::Cluster;
use crate::error::Error;

/// The server's flag and its variable.
const FLAG: &str = "--base-role-arn";
const AUTODETECT_FLAG: &str = "--base-role-arn-autodetect";
const VARIABLE: &str = "PODIAM_BASE_ROLE_ARN";
const AUTODETECT_VARIABLE: &str = "PODIAM_BASE_ROLE_ARN_AUTODETECT";

/// Where names are placed when the base ARN is unknown: a syntactically valid base ARN of an
/// account that does not exist, so that a regex over path/name still decides as it would.
pub const PLACEHOLDER_BASE_ARN: &str = "arn:aws:iam::000000000000:role/";

/// Where a server pod's base ARN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Written in the spec.
    Value(String),
    /// In ConfigMaps, as (name, key), the one that wins first.
    ConfigMaps(Vec<(String, String)>),
    /// From a Secret (not read: the plugin has no business reading Secrets).
    Secret(String),
    /// Detected by the server at start.
    Autodetect,
    /// Not set at all.
    Unset,
}

/// What the plugin knows of the servers' base ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseArn {
    Known {
        arn: String,
        from: String,
    },
    /// Unknown, and why.
    Unknown(String),
}

impl BaseArn {
    /// The base ARN to decide with: the known one, else the placeholder.
    pub fn for_deciding(&self) -> &str {
        match self {
            BaseArn::Known { arn, .. } => arn,
            BaseArn::Unknown(_) => PLACEHOLDER_BASE_ARN,
        }
    }

    /// A note for an answer about `role_annotation` when the base ARN mattered and was
    /// unknown (a role given by name or path); `None` otherwise.
    pub fn note_for(&self, role_annotation: &str) -> Option<String> {
        let BaseArn::Unknown(why) = self else {
            return None;
        };
        let role = role_annotation.trim();
        if role.is_empty() || role.starts_with("arn:") {
            return None;
        }
        Some(format!(
            "the servers' base role ARN is unknown here ({why}), so role {role:?} was placed \
             under {PLACEHOLDER_BASE_ARN}: a regex naming the account may be judged wrongly; \
             pass --base-role-arn"
        ))
    }
}

/// The value of `--base-role-arn` (or the autodetect flag) in a container's command line.
fn from_args(container: &Container) -> Option<Setting> {
    let words: Vec<&str> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(String::as_str)
        .collect();
    let mut found = None;
    for (i, word) in words.iter().enumerate() {
        if let Some(value) = word.strip_prefix(&format!("{FLAG}=")) {
            found = Some(Setting::Value(value.to_string()));
        } else if *word == FLAG {
            if let Some(value) = words.get(i + 1) {
                found = Some(Setting::Value(value.to_string()));
            }
        } else if *word == AUTODETECT_FLAG || *word == format!("{AUTODETECT_FLAG}=true") {
            found = Some(Setting::Autodetect);
        }
    }
    found
}

/// The value from the container's `env` list (which wins over `envFrom`).
fn from_env(container: &Container) -> Option<Setting> {
    let env = container.env.as_deref().unwrap_or_default();
    if let Some(var) = env.iter().rev().find(|v| v.name == VARIABLE) {
        if let Some(value) = &var.value {
            return Some(Setting::Value(value.clone()));
        }
        let from = var.value_from.as_ref();
        if let Some(key) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
            return Some(Setting::ConfigMaps(vec![(
                key.name.clone(),
                key.key.clone(),
            )]));
        }
        if let Some(key) = from.and_then(|f| f.secret_key_ref.as_ref()) {
            return Some(Setting::Secret(key.name.clone()));
        }
    }
    env.iter()
        .any(|v| v.name == AUTODETECT_VARIABLE && v.value.as_deref() == Some("true"))
        .then_some(Setting::Autodetect)
}

/// The ConfigMaps of `envFrom` that could hold the variable: last source first (the kubelet
/// lets the last source of a duplicated variable win), keys with their prefix removed.
fn from_env_from(container: &Container) -> Option<Setting> {
    let mut maps = Vec::new();
    for source in container.env_from.iter().flatten().rev() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        let Some(key) = VARIABLE.strip_prefix(prefix) else {
            continue;
        };
        if let Some(map) = &source.config_map_ref {
            maps.push((map.name.clone(), key.to_string()));
        } else if let Some(secret) = &source.secret_ref
            && maps.is_empty()
        {
            return Some(Setting::Secret(secret.name.clone()));
        }
    }
    (!maps.is_empty()).then_some(Setting::ConfigMaps(maps))
}

/// Where a server pod's base ARN comes from: its first container that says.
pub fn setting(pod: &Pod) -> Setting {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
    for container in containers.unwrap_or_default() {
        if let Some(found) = from_args(container)
            .or_else(|| from_env(container))
            .or_else(|| from_env_from(container))
        {
            return found;
        }
    }
    Setting::Unset
}

/// A value read from the servers' settings, checked.
fn known(value: &str, from: String) -> BaseArn {
    let value = value.trim();
    if valid_base_arn(value) {
        BaseArn::Known {
            arn: value.to_string(),
            from,
        }
    } else {
        BaseArn::Unknown(format!("{from} holds {value:?}, not a base role ARN"))
    }
}

/// The servers' base ARN: `flag` if given (checked: a usage error if malformed), else read
/// from the server pods in `podiam_namespace`. Failing to read it is not an error: the
/// answer is [`BaseArn::Unknown`] with the reason.
pub async fn discover(
    cluster: &Cluster,
    podiam_namespace: &str,
    flag: Option<&str>,
) -> Result<BaseArn, Error> {
    if let Some(flag) = flag {
        return match known(flag, "--base-role-arn".into()) {
            BaseArn::Unknown(_) => Err(Error::Usage(format!(
                "--base-role-arn {flag:?} is not a base role ARN (arn:aws:iam::ACCOUNT:role/, \
                 ending in /)"
            ))),
            found => Ok(found),
        };
    }
    let mut pods = match cluster
        .list_pods(Some(podiam_namespace), Some(SERVER_LABEL), None)
        .await
    {
        Ok(pods) => pods,
        Err(error) => return Ok(BaseArn::Unknown(error.one_line())),
    };
    if pods.is_empty() {
        return Ok(BaseArn::Unknown(format!(
            "no pod labelled {SERVER_LABEL} in namespace {podiam_namespace} to read it from"
        )));
    }
    // Running pods first: in a rollout, they are the ones answering.
    pods.sort_by_key(|p| {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        (!running, p.metadata.name.clone())
    });
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let found = match setting(pod) {
            Setting::Unset => continue,
            Setting::Value(value) => known(&value, format!("server pod {name}")),
            Setting::Autodetect => BaseArn::Unknown(format!(
                "server pod {name} detects it at start ({AUTODETECT_FLAG})"
            )),
            Setting::Secret(secret) => {
                BaseArn::Unknown(format!("server pod {name} reads it from Secret {secret}"))
            }
            Setting::ConfigMaps(maps) => {
                from_config_maps(cluster, podiam_namespace, &name, &maps).await
            }
        };
        return Ok(found);
    }
    Ok(BaseArn::Unknown(format!(
        "the server pods in {podiam_namespace} set no {FLAG}"
    )))
}

/// The first of `maps` that holds the key (or the autodetect switch).
async fn from_config_maps(
    cluster: &Cluster,
    namespace: &str,
    pod: &str,
    maps: &[(String, String)],
) -> BaseArn {
    for (name, key) in maps {
        let map = match cluster.config_map(namespace, name).await {
            Ok(Some(map)) => map,
            Ok(None) => continue,
            Err(error) => {
                return BaseArn::Unknown(format!(
                    "server pod {pod} reads it from a ConfigMap: {}",
                    error.one_line()
                ));
            }
        };
        let data = map.data.unwrap_or_default();
        if let Some(value) = data.get(key) {
            return known(value, format!("ConfigMap {namespace}/{name}"));
        }
        let autodetect = key.replace(VARIABLE, AUTODETECT_VARIABLE);
        if data.get(&autodetect).map(|v| v.trim()) == Some("true") {
            return BaseArn::Unknown(format!(
                "server pod {pod} detects it at start (ConfigMap {name}: {AUTODETECT_VARIABLE})"
            ));
        }
    }
    BaseArn::Unknown(format!(
        "server pod {pod}'s ConfigMaps ({}) do not set it",
        maps.iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(container: serde_json::Value) -> Pod {
        let mut server = json!({"name": "server", "image": "podiam-server"});
        if let (Some(server), Some(extra)) = (server.as_object_mut(), container.as_object()) {
            server.extend(extra.clone());
        }
        serde_json::from_value(json!({
            "metadata": {"name": "podiam-server-0", "namespace": "podiam"},
            "spec": {"containers": [server]},
        }))
        .expect("a pod")
    }

    const ARN: &str = "arn:aws:iam::123456789012:role/";

    #[test]
    fn the_setting_is_found_where_the_servers_flag_parser_would_find_it() {
        let value = || Setting::Value(ARN.into());
        let cases = [
            (json!({"args": [format!("--base-role-arn={ARN}")]}), value()),
            (json!({"args": ["--base-role-arn", ARN]}), value()),
            (
                json!({"command": ["/usr/local/bin/podiam-server", "--base-role-arn", ARN]}),
                value(),
            ),
            (
                json!({"args": ["--base-role-arn-autodetect"]}),
                Setting::Autodetect,
            ),
            // The argument wins over the variable, as in clap.
            (
                json!({"args": [format!("--base-role-arn={ARN}")],
                       "env": [{"name": VARIABLE, "value": "arn:aws:iam::999999999999:role/"}]}),
                value(),
            ),
            (json!({"env": [{"name": VARIABLE, "value": ARN}]}), value()),
            (
                json!({"env": [{"name": AUTODETECT_VARIABLE, "value": "true"}]}),
                Setting::Autodetect,
            ),
            (
                json!({"env": [{"name": VARIABLE, "valueFrom":
                    {"configMapKeyRef": {"name": "settings", "key": "base"}}}]}),
                Setting::ConfigMaps(vec![("settings".into(), "base".into())]),
            ),
            (
                json!({"env": [{"name": VARIABLE, "valueFrom":
                    {"secretKeyRef": {"name": "hidden", "key": "base"}}}]}),
                Setting::Secret("hidden".into()),
            ),
            // env wins over envFrom.
            (
                json!({"env": [{"name": VARIABLE, "value": ARN}],
                       "envFrom": [{"configMapRef": {"name": "podiam-server-abc"}}]}),
                value(),
            ),
            // deploy/: envFrom the generated ConfigMap; the last source wins; prefixes count.
            (
                json!({"envFrom": [{"configMapRef": {"name": "first"}},
                                   {"configMapRef": {"name": "podiam-server-abc"}},
                                   {"prefix": "OTHER_", "configMapRef": {"name": "unrelated"}},
                                   {"prefix": "PODIAM_", "configMapRef": {"name": "prefixed"}}]}),
                Setting::ConfigMaps(vec![
                    ("prefixed".into(), "BASE_ROLE_ARN".into()),
                    ("podiam-server-abc".into(), VARIABLE.into()),
                    ("first".into(), VARIABLE.into()),
                ]),
            ),
            (json!({"args": ["--listen=0.0.0.0:8443"]}), Setting::Unset),
        ];
        for (container, want) in cases {
            assert_eq!(setting(&pod(container.clone())), want, "{container}");
        }
    }

    #[test]
    fn notes_only_when_an_unknown_base_mattered() {
        let unknown = BaseArn::Unknown("why".into());
        assert!(unknown.note_for("app-reader").is_some());
        assert!(unknown.note_for("team/app").is_some());
        assert!(
            unknown
                .note_for("arn:aws:iam::123456789012:role/x")
                .is_none()
        );
        assert!(unknown.note_for("").is_none());
        assert_eq!(unknown.for_deciding(), PLACEHOLDER_BASE_ARN);
        let known = BaseArn::Known {
            arn: ARN.into(),
            from: "--base-role-arn".into(),
        };
        assert!(known.note_for("app-reader").is_none());
        assert_eq!(known.for_deciding(), ARN);
        assert!(valid_base_arn(PLACEHOLDER_BASE_ARN));
    }

    #[test]
    fn a_malformed_value_is_unknown_not_used() {
        assert!(matches!(known(ARN, "x".into()), BaseArn::Known { .. }));
        assert!(matches!(
            known("arn:aws:iam::ACCOUNT_ID:role/", "x".into()),
            BaseArn::Unknown(why) if why.contains("ACCOUNT_ID")
        ));
    }
}
