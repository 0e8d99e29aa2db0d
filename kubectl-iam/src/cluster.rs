//! The Kubernetes API as the plugin uses it: a client chosen the way kubectl chooses one
//! (and, for calls to podiam's servers, the user's bearer token from the same credentials),
//! and the few reads and merge patches the commands need, each failing with an error that
//! names the object.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

use crate::cli::KubeArgs;
use crate::credentials::{self, BearerToken, CredentialError};
use crate::error::{Error, api_error};

/// How long one API request may take. kubectl waits forever by default; a command-line tool
/// that hangs on an API server that accepted the connection and never answered helps no one,
/// and every request here is a single small object or a selective list.
const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the cluster, and the namespace pods are looked up in.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The client configuration: `--kubeconfig`, else `$KUBECONFIG` (a list of files, merged),
/// else `~/.kube/config`; with none of them and no `--context`, the in-cluster service
/// account (as kubectl does inside a pod).
async fn config(args: &KubeArgs) -> Result<Config, Error> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let (kubeconfig, path) = match &args.kubeconfig {
        Some(path) => (
            Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: Some(path.clone()),
                source,
            })?,
            Some(path.clone()),
        ),
        None => match Kubeconfig::read() {
            Ok(kubeconfig) => (kubeconfig, None),
            Err(source) => {
                if args.context.is_none()
                    && let Ok(config) = Config::incluster()
                {
                    return Ok(config);
                }
                return Err(Error::Kubeconfig { path: None, source });
            }
        },
    };
    Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| Error::Kubeconfig { path, source })
}

impl Cluster {
    /// Connects as `args` say (no request is made yet).
    pub async fn connect(args: &KubeArgs) -> Result<Cluster, Error> {
        Cluster::from_config(config(args).await?, args)
    }

    /// Connects as `args` say, and gets the user's bearer token for the servers' operator
    /// calls: the very token this client sends the API server, obtained once (a credential
    /// plugin runs once per command, as with kubectl). A user without a bearer token is one
    /// clear error ([`credentials`]).
    pub async fn connect_with_token(args: &KubeArgs) -> Result<(Cluster, BearerToken), Error> {
        let mut config = config(args).await?;
        let token = credentials::bearer_token(&config)
            .await
            .map_err(Error::Credentials)?;
        credentials::pin(&mut config.auth_info, &token);
        Ok((Cluster::from_config(config, args)?, token))
    }

    fn from_config(mut config: Config, args: &KubeArgs) -> Result<Cluster, Error> {
        config.read_timeout = Some(API_REQUEST_TIMEOUT);
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|error| match error {
            // A credential plugin's failure, in the words that never quote its stdout.
            kube::Error::Auth(auth) => {
                Error::Credentials(CredentialError::Failed(credentials::describe(&auth)))
            }
            other => Error::Client(other),
        })?;
        Ok(Cluster { client, namespace })
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The pod, or `None` when it does not exist.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, Error> {
        self.pods(namespace)
            .get_opt(name)
            .await
            .map_err(|e| api_error(format!("reading pod {namespace}/{name}"), e))
    }

    /// The namespace, or `None` when it does not exist.
    pub async fn namespace(&self, name: &str) -> Result<Option<Namespace>, Error> {
        Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|e| api_error(format!("reading namespace {name}"), e))
    }

    /// The ServiceAccount, or `None` when it does not exist.
    pub async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ServiceAccount>, Error> {
        Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| api_error(format!("reading ServiceAccount {namespace}/{name}"), e))
    }

    /// The ConfigMap, or `None` when it does not exist.
    pub async fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ConfigMap>, Error> {
        Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| api_error(format!("reading ConfigMap {namespace}/{name}"), e))
    }

    /// Every namespace.
    pub async fn list_namespaces(&self) -> Result<Vec<Namespace>, Error> {
        Api::<Namespace>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map(|list| list.items)
            .map_err(|e| api_error("listing namespaces".to_string(), e))
    }

    /// Pods in `namespace` (every namespace when `None`) matching the selectors.
    pub async fn list_pods(
        &self,
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Vec<Pod>, Error> {
        let api = match namespace {
            Some(namespace) => self.pods(namespace),
            None => Api::all(self.client.clone()),
        };
        let mut params = ListParams::default();
        if let Some(labels) = labels {
            params = params.labels(labels);
        }
        if let Some(fields) = fields {
            params = params.fields(fields);
        }
        let what = format!(
            "listing pods{}{}{}",
            namespace
                .map(|n| format!(" in {n}"))
                .unwrap_or_else(|| " in every namespace".into()),
            labels.map(|l| format!(" labelled {l}")).unwrap_or_default(),
            fields.map(|f| format!(" with {f}")).unwrap_or_default(),
        );
        api.list(&params)
            .await
            .map(|list| list.items)
            .map_err(|e| api_error(what, e))
    }

    /// Sets (`Some`) or removes (`None`) one annotation of a pod with a JSON merge patch, as
    /// `kubectl annotate` does; returns the pod as stored.
    pub async fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Pod, Error> {
        self.pods(namespace)
            .patch(name, &PatchParams::default(), &annotation_patch(key, value))
            .await
            .map_err(|e| api_error(format!("pod {namespace}/{name}"), e))
    }

    /// Sets (`Some`) or removes (`None`) one annotation of a namespace.
    pub async fn annotate_namespace(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Namespace, Error> {
        Api::<Namespace>::all(self.client.clone())
            .patch(name, &PatchParams::default(), &annotation_patch(key, value))
            .await
            .map_err(|e| api_error(format!("namespace {name}"), e))
    }

    /// Sets one annotation of a namespace only if the namespace is still as it was read
    /// (`resource_version`, which the API gives every object it lists): a value worked out
    /// from what was read is not written over a change made since. The API server checks
    /// it, and answers Conflict if not.
    pub async fn annotate_namespace_as_read(
        &self,
        name: &str,
        resource_version: Option<&str>,
        key: &str,
        value: &str,
    ) -> Result<AsRead, Error> {
        let mut metadata = json!({ "annotations": { key: value } });
        if let Some(version) = resource_version {
            metadata["resourceVersion"] = json!(version);
        }
        let patch = Patch::Merge(json!({ "metadata": metadata }));
        match Api::<Namespace>::all(self.client.clone())
            .patch(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(AsRead::Written),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(AsRead::Changed),
            Err(e) => Err(api_error(format!("namespace {name}"), e)),
        }
    }
}

/// What a write conditional on the object being as it was read did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsRead {
    Written,
    /// The object had changed since: nothing was written.
    Changed,
}

/// A JSON merge patch that sets or (with `null`) removes one annotation.
fn annotation_patch(key: &str, value: Option<&str>) -> Patch<serde_json::Value> {
    Patch::Merge(json!({ "metadata": { "annotations": { key: value } } }))
}

/// One annotation of an object's metadata.
pub fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_set_or_remove_one_annotation() {
        let Patch::Merge(set) = annotation_patch("iam.amazonaws.com/role", Some("app")) else {
            panic!("a merge patch")
        };
        assert_eq!(
            set,
            json!({"metadata": {"annotations": {"iam.amazonaws.com/role": "app"}}})
        );
        let Patch::Merge(remove) = annotation_patch("iam.amazonaws.com/role", None) else {
            panic!("a merge patch")
        };
        assert_eq!(
            remove,
            json!({"metadata": {"annotations": {"iam.amazonaws.com/role": null}}})
        );
    }
}
