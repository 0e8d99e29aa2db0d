//! Pods and ServiceAccounts as the servers read them from the API: only the fields the
//! indexes take, decoded as the list or watch answer streams by.
//!
//! Any tenant who may create pods or ServiceAccounts writes objects of up to 1.5 MiB (etcd's
//! limit), and a relist decodes a whole page of them at once. Decoded into k8s-openapi's full
//! types, a pod's container `env` entry `{"name":"A"}` (12 bytes) became a struct of some
//! 280, a ServiceAccount's `secrets` entry one of 168, and `managedFields` (which clients may
//! set) a tree of JSON values: a page of such objects took gigabytes, and every replica, at
//! every relist, ran out of memory. Here a container's environment is reduced to one bit as
//! it is read (does it point an SDK at the container-credentials endpoint), and everything
//! else an index does not read is skipped unread: a slim object costs about what the index
//! keeps of it.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};

/// The environment variable that points AWS SDKs at a container-credentials endpoint.
const FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";

/// Whether `name=value` points an SDK at the agent's container-credentials endpoint.
pub fn points_at_container_endpoint(name: &str, value: Option<&str>) -> bool {
    name == FULL_URI
        && value.is_some_and(|url| url.contains("169.254.170.23") || url.contains("[fd00:ec2::23]"))
}

/// A Pod, slimmed as it is decoded.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimPod {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimPodSpec>,
    #[serde(default)]
    pub status: Option<SlimPodStatus>,
}

/// The parts of a PodSpec the index reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Whether a container or an init container has [`points_at_container_endpoint`] in its
    /// environment.
    #[serde(default, rename = "containers", deserialize_with = "any_uses_endpoint")]
    pub containers_use_endpoint: bool,
    #[serde(
        default,
        rename = "initContainers",
        deserialize_with = "any_uses_endpoint"
    )]
    pub init_containers_use_endpoint: bool,
}

impl SlimPodSpec {
    /// Whether any container is set up for the container-credentials endpoint.
    pub fn uses_container_endpoint(&self) -> bool {
        self.containers_use_endpoint || self.init_containers_use_endpoint
    }
}

/// The parts of a PodStatus the index reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<SlimPodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimPodIp {
    #[serde(default)]
    pub ip: String,
}

/// A ServiceAccount, slimmed as it is decoded: its metadata (its `secrets` and
/// `imagePullSecrets` are skipped unread).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimServiceAccount {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
}

/// Makes a slim type a namespaced core/v1 resource with `ObjectMeta`, as kube-rs needs.
macro_rules! core_v1_resource {
    ($slim:ty, $kind:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = "v1";
            const GROUP: &'static str = "";
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

core_v1_resource!(SlimPod, "Pod", "pods");
core_v1_resource!(SlimServiceAccount, "ServiceAccount", "serviceaccounts");

impl From<&k8s_openapi::api::core::v1::Pod> for SlimPod {
    /// The same slimming for a pod already decoded whole (`kubectl iam explain`, tests).
    fn from(pod: &k8s_openapi::api::core::v1::Pod) -> SlimPod {
        let uses = |containers: Option<&Vec<k8s_openapi::api::core::v1::Container>>| {
            containers
                .into_iter()
                .flatten()
                .flat_map(|c| c.env.iter().flatten())
                .any(|var| points_at_container_endpoint(&var.name, var.value.as_deref()))
        };
        SlimPod {
            metadata: slimmed(&pod.metadata),
            spec: pod.spec.as_ref().map(|spec| SlimPodSpec {
                node_name: spec.node_name.clone(),
                host_network: spec.host_network,
                service_account_name: spec.service_account_name.clone(),
                containers_use_endpoint: uses(Some(&spec.containers)),
                init_containers_use_endpoint: uses(spec.init_containers.as_ref()),
            }),
            status: pod.status.as_ref().map(|status| SlimPodStatus {
                phase: status.phase.clone(),
                pod_ip: status.pod_ip.clone(),
                pod_ips: status.pod_ips.as_ref().map(|ips| {
                    ips.iter()
                        .map(|ip| SlimPodIp { ip: ip.ip.clone() })
                        .collect()
                }),
            }),
        }
    }
}

/// The metadata fields the indexes read (and the watch's resource version).
fn slimmed(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        deletion_timestamp: meta.deletion_timestamp.clone(),
        annotations: meta.annotations.clone(),
        ..ObjectMeta::default()
    }
}

/// Metadata decoded into [`slimmed`]'s fields only; labels, `managedFields`, owner
/// references and the rest are skipped unread. Missing or `null`: empty, as k8s-openapi
/// reads it.
fn slim_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        deletion_timestamp: Option<Time>,
        #[serde(default)]
        annotations: Option<BTreeMap<String, String>>,
    }
    let Some(meta) = Option::<Meta>::deserialize(deserializer)? else {
        return Ok(ObjectMeta::default());
    };
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        annotations: meta.annotations,
        ..ObjectMeta::default()
    })
}

/// A container list (or `null`) read one container at a time: whether any has
/// [`points_at_container_endpoint`] in its environment.
fn any_uses_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    struct Container {
        #[serde(default, deserialize_with = "env_uses_endpoint")]
        env: bool,
    }
    any_of(deserializer, |c: Container| c.env)
}

/// An `env` list (or `null`) read one variable at a time.
fn env_uses_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    struct Var {
        #[serde(default)]
        name: String,
        #[serde(default)]
        value: Option<String>,
    }
    any_of(deserializer, |v: Var| {
        points_at_container_endpoint(&v.name, v.value.as_deref())
    })
}

/// Whether `test` holds for any element of a list (or `null`: none), each element decoded,
/// tested and dropped before the next: a list of any length takes one element's memory.
fn any_of<'de, D, T, F>(deserializer: D, test: F) -> Result<bool, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
    F: Fn(T) -> bool,
{
    struct AnyOf<T, F>(F, std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>, F: Fn(T) -> bool> Visitor<'de> for AnyOf<T, F> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list or null")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }

        fn visit_some<D2: Deserializer<'de>>(self, deserializer: D2) -> Result<bool, D2::Error> {
            deserializer.deserialize_seq(self)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            let mut any = false;
            while let Some(element) = seq.next_element::<T>()? {
                any = any || (self.0)(element);
            }
            Ok(any)
        }
    }

    deserializer.deserialize_option(AnyOf(test, std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_read_for_what_the_index_takes_and_nothing_more() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {"iam.amazonaws.com/role": "app"},
                "labels": {"a": "b"},
                "managedFields": [{"manager": "m", "fieldsV1": {"f:x": {}}}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "y"}]
            },
            "spec": {
                "nodeName": "n1", "hostNetwork": false, "serviceAccountName": "sa",
                "initContainers": null,
                "containers": [
                    {"name": "a", "image": "i", "env": [{"name": "A", "value": "1"}]},
                    {"name": "b", "env": [
                        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                        {"name": FULL_URI, "value": "http://169.254.170.23/v1/credentials"}
                    ]}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        let pod: SlimPod = serde_json::from_value(json.clone()).expect("decodes");
        let meta = &pod.metadata;
        assert_eq!(
            (
                meta.name.as_deref(),
                meta.namespace.as_deref(),
                meta.uid.as_deref()
            ),
            (Some("p"), Some("ns"), Some("u"))
        );
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert!(meta.deletion_timestamp.is_some());
        assert!(meta.labels.is_none() && meta.managed_fields.is_none());
        assert!(meta.owner_references.is_none());
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert!(spec.uses_container_endpoint());
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.pod_ips.as_ref().map(Vec::len), Some(2));
        // The same as slimming the whole decoded pod.
        let whole: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json).expect("pod");
        let from_whole = SlimPod::from(&whole);
        assert_eq!(format!("{from_whole:?}"), format!("{pod:?}"));
    }

    #[test]
    fn an_environment_of_any_length_is_one_bit_and_null_lists_are_empty() {
        let env: Vec<serde_json::Value> = (0..100_000)
            .map(|i| serde_json::json!({"name": format!("V{i}")}))
            .collect();
        let json = serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "env": env}], "initContainers": [
                {"name": "i", "env": null},
                {"name": "j", "env": [{"name": FULL_URI, "value": "http://[fd00:ec2::23]/v1"}]}
            ]}
        });
        let pod: SlimPod = serde_json::from_value(json).expect("decodes");
        let spec = pod.spec.expect("spec");
        assert!(!spec.containers_use_endpoint);
        assert!(spec.init_containers_use_endpoint);
        let account: SlimServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sa", "namespace": "ns", "annotations": {"k": "v"}},
            "secrets": [{}, {}, {"name": "s"}],
            "imagePullSecrets": [{"name": "r"}]
        }))
        .expect("decodes");
        assert_eq!(account.metadata.name.as_deref(), Some("sa"));
        let pod: SlimPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": null, "nodeName": null}
        }))
        .expect("nulls decode");
        assert!(!pod.spec.expect("spec").uses_container_endpoint());
        for metadata in [serde_json::json!({}), serde_json::json!({"metadata": null})] {
            let pod: SlimPod = serde_json::from_value(metadata).expect("no metadata decodes");
            assert_eq!(pod.metadata, ObjectMeta::default());
        }
    }
}
